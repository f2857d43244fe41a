"""The bounded front ports of flare-serve (HttpFront, GrpcFront) before real upstream servers on loopback: an aiohttp
server and a grpcio server that record what reaches them (Triton itself: tests/runtime/serving/test_server.py and
tests/e2e/test_hostile.py)."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from conftest import data_path
from serve_support import free_ports

aiohttp = pytest.importorskip("aiohttp")
grpc = pytest.importorskip("grpc")

LIMIT = 2**20


class Upstream:
    """An aiohttp server on loopback recording each request it read in full: (method, path, headers, body size)."""

    def __init__(self) -> None:
        from aiohttp import web

        self.port = free_ports(1)[0]
        self.seen: list[tuple[str, str, dict[str, str], int]] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def handle(request: web.Request) -> web.Response:
            size = 0
            async for chunk in request.content.iter_any():
                size += len(chunk)
            self.seen.append((request.method, request.path_qs, dict(request.headers), size))
            return web.Response(status=201, body=json.dumps({"size": size}).encode(), content_type="application/json",
                                headers={"Inference-Header-Content-Length": "7"})

        async def start() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        def run() -> None:
            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture
def front() -> Iterator[tuple[Any, Upstream]]:
    from flare.runtime.serving.front import HttpFront

    upstream = Upstream()
    proxy = HttpFront("127.0.0.1", free_ports(1)[0], upstream.port, LIMIT, "FLARE_MAX_REQUEST_BYTES")
    proxy.start()
    try:
        yield proxy, upstream
    finally:
        proxy.stop()
        upstream.stop()


def _send(port: int, headers: dict[str, str], body: Iterable[bytes] = (), chunked: bool = False,
          path: str = "/v2/models/flare/infer") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest("POST", path)
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders()
        try:
            for chunk in body:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the front may close before the whole body is sent: its answer is still there
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        conn.close()


def _blocks(total: int, size: int = 2**16) -> Iterator[bytes]:
    block = bytes(range(256)) * (size // 256)
    for _ in range(total // size):
        yield block


def _one_line_413(status: int, body: bytes, words: str) -> None:
    assert status == 413, (status, body)
    error = json.loads(body)["error"]
    assert error.startswith("flare-error: request: the body is ") and words in error and "\n" not in error, error
    assert "FLARE_MAX_REQUEST_BYTES" in error


def test_requests_within_the_limit_pass_through_both_ways(front) -> None:
    proxy, upstream = front
    body = b"x" * 1000
    status, headers, answer = _send(proxy.port, {"Content-Length": "1000", "X-Custom": "kept"}, iter([body]),
                                    path="/v2/models/flare/infer?a=1")
    assert status == 201 and json.loads(answer) == {"size": 1000}
    assert headers["Inference-Header-Content-Length"] == "7"
    status, _, answer = _send(proxy.port, {"Transfer-Encoding": "chunked"}, _blocks(LIMIT), chunked=True)
    assert status == 201 and json.loads(answer) == {"size": LIMIT}  # exactly the limit: accepted
    (method, path, seen, size), _ = upstream.seen
    assert (method, path, size) == ("POST", "/v2/models/flare/infer?a=1", 1000) and seen["X-Custom"] == "kept"


def test_declared_oversize_body_is_refused_unread(front) -> None:
    """Content-Length over the limit: 413 before a byte of the body is sent (the client sends none here)."""
    proxy, upstream = front
    status, _, body = _send(proxy.port, {"Content-Length": str(200 * 2**20)})
    _one_line_413(status, body, f"{200 * 2**20} bytes, more than the limit of {LIMIT} bytes")
    status, _, body = _send(proxy.port, {"Content-Length": str(200 * 2**20), "Expect": "100-continue"})
    _one_line_413(status, body, "more than the limit")
    assert upstream.seen == []


def test_chunked_body_is_cut_at_the_limit(front) -> None:
    proxy, upstream = front
    status, _, body = _send(proxy.port, {"Transfer-Encoding": "chunked"}, _blocks(8 * LIMIT), chunked=True)
    _one_line_413(status, body, f"larger than the limit of {LIMIT} bytes")
    assert upstream.seen == []  # the upstream request was cut: never read in full
    status, _, answer = _send(proxy.port, {"Content-Length": "3"}, iter([b"abc"]))  # the front still serves
    assert status == 201 and json.loads(answer) == {"size": 3}


def test_form_encoded_requests_reach_upstream_as_octet_stream(front) -> None:
    proxy, upstream = front
    form = {"Content-Length": "4", "Content-Type": "application/x-www-form-urlencoded"}
    _send(proxy.port, form, iter([b"\x00\xffab"]))
    _send(proxy.port, {"Content-Length": "2", "Content-Type": "application/json"}, iter([b"{}"]))
    assert [s[2]["Content-Type"] for s in upstream.seen] == ["application/octet-stream", "application/json"]


def test_upstream_down_is_one_line_502() -> None:
    from flare.runtime.serving.front import HttpFront

    proxy = HttpFront("127.0.0.1", free_ports(1)[0], free_ports(1)[0], LIMIT, "FLARE_MAX_REQUEST_BYTES")
    proxy.start()
    try:
        status, _, body = _send(proxy.port, {"Content-Length": "2"}, iter([b"{}"]))
    finally:
        proxy.stop()
    error = json.loads(body)["error"]
    assert status == 502 and error.startswith("flare-error: request: the Triton server") and "\n" not in error


def test_busy_port_is_one_line_error(front) -> None:
    from flare.runtime.foundation.errors import FlareError
    from flare.runtime.serving.front import GrpcFront, HttpFront

    proxy, upstream = front
    for other in (HttpFront("127.0.0.1", proxy.port, upstream.port, LIMIT, "x"),
                  GrpcFront("127.0.0.1", proxy.port, upstream.port, LIMIT)):
        with pytest.raises(FlareError, match=f"cannot listen on 127.0.0.1:{proxy.port}"):
            other.start()
        other.stop()


def test_a_failed_start_leaves_nothing_running_and_can_be_retried(front) -> None:
    """A front that could not bind winds down before start() raises (stop() after it is a no-op, however the
    threads interleave), and starts cleanly once the port is free."""
    from flare.runtime.foundation.errors import FlareError
    from flare.runtime.serving.front import GrpcFront, HttpFront

    proxy, upstream = front

    def fronts_alive() -> int:
        return sum(t.name == f"flare-front-{proxy.port}" and t.is_alive() for t in threading.enumerate())

    http_front = HttpFront("127.0.0.1", proxy.port, upstream.port, LIMIT, "x")
    grpc_front = GrpcFront("127.0.0.1", proxy.port, upstream.port, LIMIT)
    for _ in range(20):  # the race of a stop() right after a failed start is in the first few
        for other in (http_front, grpc_front):
            with pytest.raises(FlareError, match=f"cannot listen on 127.0.0.1:{proxy.port}"):
                other.start()
            assert fronts_alive() == 1  # the fixture's own front only
            other.stop()
    proxy.stop()
    http_front.start()
    try:
        status, _, _ = _send(proxy.port, {"Content-Length": "2"}, iter([b"{}"]))
    finally:
        http_front.stop()
    assert status == 201 and upstream.seen


def test_grpc_front_forwards_and_refuses_large_messages() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from flare.runtime.serving.front import GrpcFront

    calls: list[tuple[str, int, dict]] = []

    class Echo(grpc.GenericRpcHandler):
        def service(self, details):
            def unary(request: bytes, context) -> bytes:
                calls.append((details.method, len(request), dict(context.invocation_metadata())))
                return len(request).to_bytes(8, "little")

            def stream(requests, context):
                for request in requests:
                    yield request[::-1]

            if details.method.endswith("/ModelStreamInfer"):
                return grpc.stream_stream_rpc_method_handler(stream)
            return grpc.unary_unary_rpc_method_handler(unary)

    upstream = grpc.server(ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", -1)])
    upstream.add_generic_rpc_handlers([Echo()])
    upstream_port = upstream.add_insecure_port("127.0.0.1:0")
    upstream.start()
    proxy = GrpcFront("127.0.0.1", free_ports(1)[0], upstream_port, LIMIT, workers=2)
    proxy.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=[("grpc.max_send_message_length", -1)]) as ch:
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
            assert infer(b"x" * LIMIT, metadata=[("x-token", "t")], timeout=30) == LIMIT.to_bytes(8, "little")
            with pytest.raises(grpc.RpcError) as refused:
                infer(b"x" * (LIMIT + 1), timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
            assert list(stream(iter([b"ab", b"cd"]), timeout=30)) == [b"ba", b"dc"]
    finally:
        proxy.stop()
        upstream.stop(None)
    assert [(m, n) for m, n, _ in calls] == [("/inference.GRPCInferenceService/ModelInfer", LIMIT)]
    assert calls[0][2]["x-token"] == "t"


def test_gate_refuses_junk_inference_requests_from_their_first_bytes() -> None:
    """With the InferGate, an inference request that is not a NIfTI image is refused (400, one line) from its first
    bytes, a large body to another path is refused (413), and a real CT's request reaches upstream byte for byte."""
    from flare.runtime.serving.front import HttpFront
    from flare.runtime.serving.gate import OTHER_MAX_BODY, InferGate
    pytest.importorskip("tritonclient.http")
    from serve_support import infer_request as _request

    upstream = Upstream()
    proxy = HttpFront("127.0.0.1", free_ports(1)[0], upstream.port, 64 * LIMIT, "FLARE_MAX_REQUEST_BYTES", InferGate())
    proxy.start()
    try:
        headers, body = _request(b"\x00" * 8 + bytes(range(256)) * (32 * LIMIT // 256))  # 32 MB, not a NIfTI file
        status, _, answer = _send(proxy.port, {**headers, "Content-Length": str(len(body))},
                                  (body[k:k + 2**16] for k in range(0, len(body), 2**16)))
        assert status == 400 and json.loads(answer)["error"] == \
            "flare-error: request: not a NIfTI file (no NIfTI-1/NIfTI-2 header)"
        status, _, answer = _send(proxy.port, {"Content-Length": str(OTHER_MAX_BODY + 1)}, _blocks(OTHER_MAX_BODY),
                                  path="/v2/repository/index")
        assert status == 413 and f"limit of {OTHER_MAX_BODY} bytes" in json.loads(answer)["error"]
        headers, body = _request(data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes(), filename="ct.nii.gz")
        for chunked in (False, True):
            extra = {"Transfer-Encoding": "chunked"} if chunked else {"Content-Length": str(len(body))}
            status, _, answer = _send(proxy.port, {**headers, **extra}, iter([body[:100], body[100:]]), chunked=chunked)
            assert status == 201 and json.loads(answer) == {"size": len(body)}
    finally:
        proxy.stop()
        upstream.stop()
    assert [(s[0], s[1], s[3]) for s in upstream.seen] == [("POST", "/v2/models/flare/infer", len(body))] * 2


def test_grpc_gate_refuses_junk_before_upstream() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from flare.runtime.serving.front import GrpcFront
    from flare.runtime.serving.gate import InferGate

    service = pytest.importorskip("tritonclient.grpc.service_pb2")
    calls: list[str] = []

    class Echo(grpc.GenericRpcHandler):
        def service(self, details):
            def unary(request: bytes, context) -> bytes:
                calls.append(details.method)
                return b""

            return grpc.unary_unary_rpc_method_handler(unary)

    upstream = grpc.server(ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", -1)])
    upstream.add_generic_rpc_handlers([Echo()])
    upstream_port = upstream.add_insecure_port("127.0.0.1:0")
    upstream.start()
    proxy = GrpcFront("127.0.0.1", free_ports(1)[0], upstream_port, 8 * LIMIT, workers=2, gate=InferGate())
    proxy.start()
    request = service.ModelInferRequest(model_name="flare")
    request.inputs.add(name="image", datatype="BYTES", shape=[1])
    junk = bytes(range(256)) * (LIMIT // 256)
    request.raw_input_contents.append(len(junk).to_bytes(4, "little") + junk)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=[("grpc.max_send_message_length", -1)]) as ch:
            with pytest.raises(grpc.RpcError) as refused:
                ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(request.SerializeToString(), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == "flare-error: request: not a NIfTI file (no NIfTI-1/NIfTI-2 header)"
            with pytest.raises(grpc.RpcError) as refused:
                ch.unary_unary("/inference.GRPCInferenceService/ModelConfig")(junk, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "only ModelInfer" in \
                refused.value.details()
            assert ch.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=30) == b""
    finally:
        proxy.stop()
        upstream.stop(None)
    assert calls == ["/inference.GRPCInferenceService/ServerLive"]
