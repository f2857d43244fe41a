"""The ports a client of ``flare-serve`` talks to: bounded front proxies before Triton.

The ``tritonserver`` that PyTriton 0.7 ships has no request-size option: its HTTP server reads a whole request body
into memory before anything looks at it (a 200 MB junk body raised the server's RSS by about 800 MB and kept it
there), and its gRPC server accepts messages up to 2 GB. So Triton listens on loopback ports of its own and the
public ports are served here:

* :class:`HttpFront` (aiohttp) answers ``Content-Length`` > limit at once, before reading a byte of the body (and
  refuses ``Expect: 100-continue`` uploads before the client sends them); a body of unknown length (chunked) is
  counted while it streams to Triton and cut at the limit. A refused request gets HTTP 413 and Triton's JSON error
  shape with one line, ``{"error": "flare-error: request: ..."}``. Everything else (status, headers, body, both
  ways) passes through streaming, so clients see Triton itself, with one exception: a request declared
  ``Content-Type: application/x-www-form-urlencoded`` (what curl ``--data-binary`` and urllib send by default)
  reaches Triton as ``application/octet-stream``. Triton 2.51's HTTP server parses such a body as a query string
  and crashes (SIGSEGV) on a binary one of a few MB: an 8 MB request killed it in tests; the KServe protocol never
  uses form encoding.
* With an :class:`~flare.runtime.serving.gate.InferGate` (the public HTTP port), an inference request is checked
  from its first bytes (inference header, the image's NIfTI header) and refused with HTTP 400 and one line before
  the rest is read; other paths take small bodies only.
* :class:`GrpcFront` (grpcio) forwards every method of Triton's gRPC service as raw bytes; gRPC refuses a larger
  message from its 5-byte length prefix (``RESOURCE_EXHAUSTED``, "Received message larger than max") without
  buffering it.

aiohttp and grpcio are imported when a front starts (both come with the ``serve`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from flare.runtime.foundation.errors import FlareError
from flare.runtime.foundation.lazy import lazy_import
from flare.runtime.serving.protocol import ERROR_MARKER, MODEL, UNNAMED

if TYPE_CHECKING:
    from flare.runtime.serving.gate import InferGate

__all__ = ["GrpcFront", "HttpFront", "error_body", "return_memory"]

CHUNK = 2**16
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Transfer-Encoding",
    "Upgrade", "Host", "Content-Length", "Expect"))
UPSTREAM_CONNECT_S = 10.0
START_TIMEOUT_S = 30.0

log = logging.getLogger("flare.runtime")


class _TooLarge(Exception):
    """The body being streamed passed the limit."""


def error_body(message: str) -> bytes:
    """Triton's HTTP error shape with the one ``flare-error:`` line (what tritonclient and flare-run read)."""
    return json.dumps({"error": ERROR_MARKER + " ".join(message.split())}).encode()


class HttpFront:
    """An HTTP/1.1 reverse proxy on ``host:port`` to ``127.0.0.1:upstream_port`` that refuses request bodies larger
    than ``max_body`` bytes (413) without buffering them. ``what`` names the limit in the refusal (an environment
    variable); ``gate`` checks inference requests from their first bytes. Runs its own event loop in a daemon thread
    between :meth:`start` and :meth:`stop`."""

    def __init__(self, host: str, port: int, upstream_port: int, max_body: int, what: str,
                 gate: InferGate | None = None) -> None:
        self.host, self.port, self.upstream = host, port, f"http://127.0.0.1:{upstream_port}"
        self.max_body, self.what, self.gate = max_body, what, gate
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._session: Any = None

    # -------------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Listen on ``host:port`` (FlareError when it cannot) and serve in a daemon thread; once."""
        if self._thread is not None:
            return
        web = lazy_import("aiohttp.web", "serve").load()
        started = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._listen(web))
            except BaseException as err:  # noqa: BLE001 - reported to start()
                failure.append(err)
                try:  # the client session and runner that _listen made before the bind failed
                    loop.run_until_complete(self._close())
                finally:
                    loop.close()
                    started.set()  # only now: start() returns to a front with nothing left running
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"flare-front-{self.port}", daemon=True)
        self._thread.start()
        started.wait(START_TIMEOUT_S)
        if failure or not started.is_set():
            err = failure[0] if failure else TimeoutError("no answer")
            self.stop()  # a listen that never answered is stopped; a failed one has already wound down
            self._loop = self._thread = None  # stop() is then a no-op, and start() may be tried again
            raise FlareError(None, f"cannot listen on {self.host}:{self.port}: "
                                   f"{getattr(err, 'strerror', None) or err}") from None

    def stop(self) -> None:
        """Stop listening and close the connections (in-flight requests are cut)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed itself between the check and the call
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=15)

    async def _listen(self, web: Any) -> None:
        aiohttp = lazy_import("aiohttp", "serve").load()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle, expect_handler=self._expect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._session = aiohttp.ClientSession(
            auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=UPSTREAM_CONNECT_S),
            connector=aiohttp.TCPConnector(limit=0, force_close=False))
        await web.TCPSite(self._runner, self.host, self.port, reuse_address=True).start()

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # -------------------------------------------------------------------------------------------- requests
    def _limit(self, request: Any) -> tuple[int, str]:
        """The largest body this request may have, and what sets it."""
        if self.gate is None or self.gate.is_infer(request.method, request.path):
            return self.max_body, self.what
        from flare.runtime.serving.gate import OTHER_MAX_BODY

        return OTHER_MAX_BODY, f"only POST /v2/models/{MODEL}/infer takes more"

    def _refusal(self, request: Any, size: int | None) -> Any:
        web = lazy_import("aiohttp.web", "serve").load()
        limit, what = self._limit(request)
        body = "larger than" if size is None else f"{size} bytes, more than"
        problem = f"{UNNAMED}: the body is {body} the limit of {limit} bytes ({what})"
        return web.Response(status=413, body=error_body(problem), content_type="application/json")

    async def _expect(self, request: Any) -> Any:
        """``Expect: 100-continue`` with a too-large ``Content-Length``: refuse before the client sends the body."""
        if request.content_length is not None and request.content_length > self._limit(request)[0]:
            answer = self._refusal(request, request.content_length)
            answer.force_close()
            return answer
        web_urldispatcher = lazy_import("aiohttp.web_urldispatcher", "serve").load()
        return await web_urldispatcher._default_expect_handler(request)

    async def _handle(self, request: Any) -> Any:
        aiohttp = lazy_import("aiohttp", "serve").load()
        web = lazy_import("aiohttp.web", "serve").load()
        limit = self._limit(request)[0]
        if request.content_length is not None and request.content_length > limit:
            return self._refusal(request, request.content_length)  # the body is drained unread, or the link closed
        start = b""
        if self.gate is not None and self.gate.is_infer(request.method, request.path):
            try:
                start = await self._checked_start(request, self.gate)
            except FlareError as err:
                log.warning("request rejected: %s", err)  # the rest of the body is drained unread
                return web.Response(status=400, body=error_body(str(err)), content_type="application/json")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if "x-www-form-urlencoded" in request.headers.get("Content-Type", "").lower():
            headers["Content-Type"] = "application/octet-stream"  # Triton would parse the body as a query string
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        seen = [0]
        body = self._counted(request, seen, limit, start) if request.body_exists else None
        answer = None
        try:
            async with self._session.request(request.method, self.upstream + request.rel_url.raw_path_qs,
                                             headers=headers, data=body, allow_redirects=False) as upstream:
                answer = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers={
                    k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
                if upstream.content_length is not None:
                    answer.content_length = upstream.content_length
                await answer.prepare(request)
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await answer.write(chunk)
                await answer.write_eof()
                return answer
        except (TimeoutError, aiohttp.ClientError, _TooLarge, OSError) as err:
            if answer is not None and answer.prepared:
                raise  # the answer was under way: the connection is cut
            if seen[0] > limit:
                return self._refusal(request, None)
            return web.Response(status=502, content_type="application/json", body=error_body(
                f"{UNNAMED}: the Triton server behind this port did not answer ({type(err).__name__})"))

    @staticmethod
    async def _checked_start(request: Any, gate: InferGate) -> bytes:
        """The first bytes of an inference request's body, read and checked by ``gate`` (FlareError: refused)."""
        want = gate.start_bytes(request.headers, request.content_length)
        parts, got = [], 0
        while got < want:
            chunk = await request.content.read(want - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        start = b"".join(parts)
        gate.check(request.headers, start, request.content_length)
        return start

    @staticmethod
    async def _counted(request: Any, seen: list[int], limit: int, start: bytes = b"") -> Any:
        """The request body (``start`` already read, then the rest as it arrives), cut when it passes ``limit``."""
        if start:
            seen[0] += len(start)
            yield start
        async for chunk in request.content.iter_chunked(CHUNK):
            seen[0] += len(chunk)
            if seen[0] > limit:
                raise _TooLarge
            yield chunk


class GrpcFront:
    """A gRPC server on ``host:port`` forwarding every call, as raw bytes, to ``127.0.0.1:upstream_port``; messages
    larger than ``max_message`` bytes are refused by gRPC from their length prefix."""

    STREAMING = ("/ModelStreamInfer",)
    """Methods of Triton's ``inference.GRPCInferenceService`` that stream both ways (every other one is unary)."""

    def __init__(self, host: str, port: int, upstream_port: int, max_message: int, workers: int = 16,
                 gate: InferGate | None = None) -> None:
        self.host, self.port, self.upstream_port = host, port, upstream_port
        self.max_message, self.workers, self.gate = max_message, workers, gate
        self._server: Any = None
        self._channel: Any = None

    def start(self) -> None:
        """Listen on ``host:port`` (FlareError when it cannot); once."""
        if self._server is not None:
            return
        from concurrent.futures import ThreadPoolExecutor

        grpc = lazy_import("grpc", "serve").load()
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.upstream_port}", options=unlimited)
        self._server = grpc.server(ThreadPoolExecutor(self.workers, thread_name_prefix="flare-grpc-front"),
                                   options=[("grpc.max_receive_message_length", self.max_message),
                                            ("grpc.max_send_message_length", -1), ("grpc.so_reuseport", 0)])
        self._server.add_generic_rpc_handlers([_Forward(grpc, self._channel, self.STREAMING, self.gate)])
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            bound = self._server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if not bound:
            self.stop()
            self._server = self._channel = None  # stop() is then a no-op, and start() may be tried again
            raise FlareError(None, f"cannot listen on {self.host}:{self.port} (gRPC)")
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
        if self._channel is not None:
            self._channel.close()


class _Forward:
    """grpc.GenericRpcHandler: any method, raw bytes, to the upstream channel with the caller's metadata."""

    INFER = ("/ModelInfer", "/ModelStreamInfer")

    def __init__(self, grpc: Any, channel: Any, streaming: tuple[str, ...], gate: InferGate | None = None) -> None:
        self.grpc, self.channel, self.streaming, self.gate = grpc, channel, streaming, gate

    def _checked(self, method: str, message: bytes) -> None:
        """FlareError when ``gate`` refuses ``message`` (an inference request, or any other one larger than
        :data:`~flare.runtime.serving.gate.OTHER_MAX_BODY`)."""
        if self.gate is None:
            return
        from flare.runtime.serving.gate import OTHER_MAX_BODY

        if method.endswith(self.INFER):
            self.gate.check_grpc(message)
        elif len(message) > OTHER_MAX_BODY:
            raise FlareError(UNNAMED, f"the message is {len(message)} bytes, more than the limit of {OTHER_MAX_BODY} "
                                      f"bytes (only ModelInfer takes more)")

    def _refuse(self, context: Any, err: FlareError) -> None:
        log.warning("request rejected: %s", err)
        return_memory()  # gRPC held the whole message
        context.abort(self.grpc.StatusCode.INVALID_ARGUMENT, ERROR_MARKER + str(err))

    def service(self, details: Any) -> Any:
        grpc, method = self.grpc, details.method
        if method.endswith(self.streaming):
            stream = self.channel.stream_stream(method)

            def relay_stream(requests: Any, context: Any) -> Any:
                refused: list[FlareError] = []

                def checked() -> Any:
                    for message in requests:
                        try:
                            self._checked(method, message)
                        except FlareError as err:
                            refused.append(err)
                            return
                        yield message

                try:
                    yield from stream(checked(), metadata=_metadata(context), timeout=context.time_remaining())
                except grpc.RpcError as err:
                    context.abort(err.code(), err.details() or "")
                if refused:
                    self._refuse(context, refused[0])

            return grpc.stream_stream_rpc_method_handler(relay_stream)
        unary = self.channel.unary_unary(method)

        def relay(request: Any, context: Any) -> Any:
            try:
                self._checked(method, request)
            except FlareError as err:
                request = None
                self._refuse(context, err)
            try:
                return unary(request, metadata=_metadata(context), timeout=context.time_remaining())
            except grpc.RpcError as err:
                context.abort(err.code(), err.details() or "")

        return grpc.unary_unary_rpc_method_handler(relay)


def _metadata(context: Any) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in context.invocation_metadata()
            if not k.startswith((":", "grpc-")) and k not in ("user-agent", "content-type", "te")]


def return_memory() -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``): after a large refused request the
    process would otherwise keep its peak resident size. A no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
