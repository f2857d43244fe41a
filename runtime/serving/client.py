"""The client side of ``flare-serve``: :class:`RemoteSegmenter` and ``flare-run --server``.

The wire protocol is :mod:`flare.runtime.serving.protocol`. tritonclient is imported lazily.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flare.runtime.foundation.errors import FlareError, InputError
from flare.runtime.foundation.lazy import lazy_import
from flare.runtime.pipeline.result import Report, SegmentResult
from flare.runtime.serving.protocol import INPUT, MODEL, OUTPUT_LABELS, OUTPUT_REPORT, flare_error_line

if TYPE_CHECKING:
    from flare.runtime.image.model import LoadedImage

__all__ = ["RemoteError", "RemoteSegmenter"]

DEFAULT_TIMEOUT_S = 3600.0
READY_TIMEOUT_S = 120.0
"""How long a client waits for model ``flare`` to become ready on a server that answers but is still loading it."""


class RemoteError(FlareError):
    """The server rejected the request, failed, or cannot be reached."""


def _split_url(url: str) -> tuple[str, bool]:
    """``host:port`` for tritonclient and whether to use TLS; accepts ``host:port`` or ``http(s)://host:port``."""
    url = url.strip().rstrip("/")
    ssl = url.startswith("https://")
    for scheme in ("http://", "https://"):
        url = url.removeprefix(scheme)
    host, _, port = url.rpartition(":")
    if not url or "/" in url or not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise RemoteError(None, f"--server {url!r}: give HOST:PORT, e.g. 127.0.0.1:8000")
    return url, ssl


@dataclass(frozen=True)
class ServerRef:
    """Where a RemoteSegmenter's models are (``root``, like a local bundle's)."""

    root: str


class RemoteSegmenter:
    """A :class:`~flare.runtime.pipeline.segmenter.Segmenter` on ``flare-serve`` servers (Triton HTTP at ``url``:
    one ``HOST:PORT`` or several, comma-separated).

    ``segment()`` returns a :class:`~flare.runtime.pipeline.result.SegmentResult` like the local one; the labels are
    read back from the server's NIfTI with the same validated reader. It may be called from several threads at once
    (``flare-run --concurrency``): each request goes to the server with the fewest requests in flight from this
    client (ties: the one used least), on its own connection; a server that fails fails only the requests sent to it
    (the error names it), and the report's ``server`` says which server answered.
    """

    def __init__(self, url: str, folds: int | None = None, overlap: float | None = None,
                 postprocess: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = False) -> None:
        import threading

        self.url = url
        self.urls = [u.strip() for u in url.split(",") if u.strip()]
        if not self.urls:
            raise RemoteError(None, f"--server {url!r}: give HOST:PORT, e.g. 127.0.0.1:8000")
        self._hosts = [_split_url(u) for u in self.urls]
        if len(set(self._hosts)) < len(self._hosts):
            raise RemoteError(None, f"--server {url!r} names a server twice")
        # imported here, in the constructing thread: concurrent first imports from the request threads would see
        # a partially initialised tritonclient.http
        self._http = lazy_import("tritonclient.http", "serve").load()
        self._utils = lazy_import("tritonclient.utils", "serve").load()
        self._lock = threading.Lock()
        self._busy = [0] * len(self.urls)
        self._used = [0] * len(self.urls)
        self.options: dict[str, Any] = {k: v for k, v in (("folds", folds), ("overlap", overlap),
                                                          ("postprocess", postprocess)) if v is not None}
        self.timeout_s = float(timeout_s)
        self.progress = progress
        #: what flare-run's summary records in place of a local bundle and device
        self.bundle = ServerRef(f"flare-serve at {url}")
        self.device = "server"
        self._ready = False
        #: called once per distinct model-card warning (e.g. "trained on synthetic data") the servers' reports carry:
        #: the bundle's card is on the server, so flare-run learns it from the first answer
        self.on_model_warning: Callable[[str], None] | None = None
        self._warned: set[str] = set()

    def _wait_ready(self, client: Any, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Before the first request: wait (at most ``timeout_s``) while the server answers but model ``flare`` is not
        ready yet (a server that is starting); a server that does not answer is reported by the request itself."""
        deadline = time.monotonic() + timeout_s
        while not self._ready:
            try:
                self._ready = bool(client.is_model_ready(MODEL))
            except Exception:  # noqa: BLE001 - unreachable: the request gives the one-line error
                return
            if not self._ready:
                if time.monotonic() > deadline:
                    raise RemoteError(self.url, f"model '{MODEL}' is not ready after {timeout_s:.0f} s")
                time.sleep(0.5)

    def _pick(self) -> int:
        with self._lock:
            i = min(range(len(self.urls)), key=lambda k: (self._busy[k], self._used[k], k))
            self._busy[i] += 1
            self._used[i] += 1
            return i

    def request(self, blob: bytes, name: str, compressed: bool = True) -> tuple[bytes, dict[str, Any]]:
        """Send one NIfTI file's bytes to the least busy server; returns the label map's NIfTI bytes and the report
        (with ``server``: the ``HOST:PORT`` that answered)."""
        i = self._pick()
        try:
            labels, report = self._request(i, blob, name, compressed)
        finally:
            with self._lock:
                self._busy[i] -= 1
        report["server"] = self.urls[i]
        return labels, report

    def _request(self, i: int, blob: bytes, name: str, compressed: bool) -> tuple[bytes, dict[str, Any]]:
        url, (host, ssl) = self.urls[i], self._hosts[i]
        http, utils = self._http, self._utils
        inp = http.InferInput(INPUT, [1], "BYTES")
        inp.set_data_from_numpy(np.array([blob], dtype=object), binary_data=True)
        outputs = [http.InferRequestedOutput(OUTPUT_LABELS, binary_data=True),
                   http.InferRequestedOutput(OUTPUT_REPORT, binary_data=True)]
        params = {"filename": name, "compressed": bool(compressed), **self.options}
        try:
            client = http.InferenceServerClient(host, ssl=ssl, connection_timeout=self.timeout_s,
                                                network_timeout=self.timeout_s)
        except Exception as err:  # noqa: BLE001 - tritonclient raises several kinds for a bad address
            raise RemoteError(url, f"cannot use the server address ({err})") from None
        try:
            self._wait_ready(client)
            result = client.infer(MODEL, [inp], outputs=outputs, parameters=params)
        except utils.InferenceServerException as err:
            message = err.message() or str(err)
            line = flare_error_line(message, name)
            if line is not None:
                raise RemoteError(None, line) from None
            raise RemoteError(url, f"server error: {message.strip().splitlines()[0] if message else err}"
                              ) from None
        except (OSError, TimeoutError) as err:
            raise RemoteError(url, f"cannot reach the flare server ({err.strerror or err})") from None
        finally:
            client.close()
        labels = result.as_numpy(OUTPUT_LABELS)
        report = result.as_numpy(OUTPUT_REPORT)
        if labels is None or report is None or labels.size != 1 or report.size != 1:
            raise RemoteError(url, f"the server's answer lacks the {OUTPUT_LABELS}/{OUTPUT_REPORT} outputs "
                                        "(is it a flare-serve server?)")
        return bytes(labels.flat[0]), json.loads(bytes(report.flat[0]))

    def _note_warning(self, warning: Any) -> None:
        with self._lock:
            if not warning or warning in self._warned:
                return
            self._warned.add(warning)
        if self.on_model_warning is not None:
            self.on_model_warning(str(warning))

    def segment(self, image: str | Path | LoadedImage, hooks: Any = None) -> SegmentResult:
        """Segment ``image`` on the server: a NIfTI file (its bytes are sent, and read here too, with the same
        validated reader, for the result's image) or a loaded image (sent as NIfTI, e.g. a DICOM series read here).
        Writes nothing, like the local ``Segmenter`` (the app layer writes). ``hooks`` is accepted for ``Segmenter``
        compatibility (the stages run on the server)."""
        from flare.runtime.image.nifti import image_bytes, read_image_bytes

        if isinstance(image, (str, Path)):
            name, blob = str(image), _read_input(Path(image))
            img = read_image_bytes(blob, name)
        else:
            name, blob, img = str(image.path or "image"), image_bytes(image), image
        t0 = time.perf_counter()
        if self.progress:
            print(f"flare-run: sending {name} ({len(blob) / 2**20:.1f} MB) to {self.url}", file=sys.stderr, flush=True)
        labels_blob, report = self.request(blob, name)
        self._note_warning((report.get("model_card") or {}).get("warning"))
        if self.progress:
            print(f"flare-run: {name} segmented by {report['server']} in {time.perf_counter() - t0:.2f} s "
                  f"(server pipeline {report.get('total_s')} s)", file=sys.stderr, flush=True)
        labels = read_image_bytes(labels_blob, name=f"{self.url} (labels of {name})")
        if labels.shape != img.shape:
            raise RemoteError(self.url, f"the labels of {name} have shape {labels.shape}, the image {img.shape}")
        # the image keeps its own affine (NIfTI stores the sform in float32: an in-memory float64 affine comes back
        # rounded); the labels are in its grid either way
        return SegmentResult(labels.data, img, Report.from_json(report))

def _read_input(path: Path) -> bytes:
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise InputError(path, "is a folder, not a NIfTI file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}") from None

