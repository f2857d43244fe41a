"""The client side of ``flare-serve``: :class:`RemoteSegmenter` and ``flare-run --server``.

The wire protocol (Triton's KServe v2 HTTP/REST or gRPC, model :data:`MODEL`):

* input ``image``: ``BYTES``, shape ``[1]`` — the bytes of a ``.nii`` or ``.nii.gz`` file (gzip is recognised by its
  magic bytes; sending gzip keeps requests small);
* outputs ``labels`` (``BYTES [1]``: the uint8 label map as a NIfTI file in the input's geometry, gzip-compressed
  unless the request says ``compressed: false``) and ``report`` (``BYTES [1]``: the JSON report of ``flare-run``);
* optional request parameters: ``filename`` (names the input in errors and in the report), ``folds`` (use the first N
  folds), ``overlap`` (tile overlap ratio), ``postprocess`` (``paper`` or ``strict``), ``compressed`` (bool).

A bad input fails the request with Triton's error message, whose line starting with :data:`ERROR_MARKER` carries the
one-line :class:`~flare.runtime.foundation.errors.FlareError`; the server keeps serving. tritonclient is imported lazily.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flare.runtime.foundation.errors import FlareError, InputError
from flare.runtime.inference.device import lazy_import

if TYPE_CHECKING:
    from flare.runtime.image.nifti import LoadedImage

__all__ = ["ERROR_MARKER", "MODEL", "RemoteError", "RemoteSegmenter"]

MODEL = "flare"
INPUT = "image"
OUTPUT_LABELS = "labels"
OUTPUT_REPORT = "report"
ERROR_MARKER = "flare-error: "
DEFAULT_TIMEOUT_S = 3600.0


class RemoteError(FlareError):
    """The server rejected the request, failed, or cannot be reached."""


def _split_url(url: str) -> tuple[str, bool]:
    """``host:port`` for tritonclient and whether to use TLS; accepts ``host:port`` or ``http(s)://host:port``."""
    url = url.strip().rstrip("/")
    ssl = url.startswith("https://")
    for scheme in ("http://", "https://"):
        url = url.removeprefix(scheme)
    if not url or "/" in url:
        raise RemoteError(None, f"--server {url!r}: give HOST:PORT, e.g. 127.0.0.1:8000")
    return url, ssl


def flare_error_line(message: str) -> str | None:
    """The one-line FlareError carried by a server error message, if any."""
    for line in message.splitlines():
        at = line.find(ERROR_MARKER)
        if at >= 0:
            return line[at + len(ERROR_MARKER):].strip()
    return None


@dataclass(frozen=True)
class ServerRef:
    """Where a RemoteSegmenter's models are (``root``, like a local bundle's)."""

    root: str


class RemoteSegmenter:
    """A :class:`~flare.runtime.pipeline.segmenter.Segmenter` on a ``flare-serve`` server (Triton HTTP at ``url``).

    ``segment()`` returns ``(labels uint8 in the input grid, input affine, report)`` like the local one; the labels and
    affine are read back from the server's NIfTI with the same validated reader.
    """

    def __init__(self, url: str, folds: int | None = None, overlap: float | None = None,
                 postprocess: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = False) -> None:
        self.url = url
        self._host, self._ssl = _split_url(url)
        self.options: dict[str, Any] = {k: v for k, v in (("folds", folds), ("overlap", overlap),
                                                          ("postprocess", postprocess)) if v is not None}
        self.timeout_s = float(timeout_s)
        self.progress = progress
        #: what flare-run's summary records in place of a local bundle and device
        self.bundle = ServerRef(f"flare-serve at {url}")
        self.device = "server"

    def request(self, blob: bytes, name: str, compressed: bool = True) -> tuple[bytes, dict[str, Any]]:
        """Send one NIfTI file's bytes; returns the label map's NIfTI bytes and the report."""
        http = lazy_import("tritonclient.http", "serve").load()
        utils = lazy_import("tritonclient.utils", "serve").load()
        inp = http.InferInput(INPUT, [1], "BYTES")
        inp.set_data_from_numpy(np.array([blob], dtype=object), binary_data=True)
        outputs = [http.InferRequestedOutput(OUTPUT_LABELS, binary_data=True),
                   http.InferRequestedOutput(OUTPUT_REPORT, binary_data=True)]
        params = {"filename": name, "compressed": bool(compressed), **self.options}
        try:
            client = http.InferenceServerClient(self._host, ssl=self._ssl, connection_timeout=self.timeout_s,
                                                network_timeout=self.timeout_s)
        except Exception as err:  # noqa: BLE001 - tritonclient raises several kinds for a bad address
            raise RemoteError(self.url, f"cannot use the server address ({err})") from None
        try:
            result = client.infer(MODEL, [inp], outputs=outputs, parameters=params)
        except utils.InferenceServerException as err:
            message = err.message() or str(err)
            line = flare_error_line(message)
            if line is not None:
                raise RemoteError(None, line) from None
            raise RemoteError(self.url, f"server error: {message.strip().splitlines()[0] if message else err}"
                              ) from None
        except (OSError, TimeoutError) as err:
            raise RemoteError(self.url, f"cannot reach the flare server ({err.strerror or err})") from None
        finally:
            client.close()
        labels = result.as_numpy(OUTPUT_LABELS)
        report = result.as_numpy(OUTPUT_REPORT)
        if labels is None or report is None or labels.size != 1 or report.size != 1:
            raise RemoteError(self.url, f"the server's answer lacks the {OUTPUT_LABELS}/{OUTPUT_REPORT} outputs "
                                        "(is it a flare-serve server?)")
        return bytes(labels.flat[0]), json.loads(bytes(report.flat[0]))

    def segment(self, image: str | Path | LoadedImage, output: str | Path | None = None, hooks: Any = None
                ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Segment ``image`` on the server: a NIfTI file (its bytes are sent) or a loaded image (sent as NIfTI,
        e.g. a DICOM series read here); writes ``output`` (atomically) when given. ``hooks`` is accepted for
        ``Segmenter`` compatibility (the stages run on the server)."""
        from flare.runtime.foundation.atomic import write_bytes_atomic
        from flare.runtime.image.nifti import image_bytes, read_image_bytes

        if isinstance(image, (str, Path)):
            name, blob = str(image), _read_input(Path(image))
        else:
            name, blob = str(image.path or "image"), image_bytes(image)
        compressed = output is None or str(output).endswith(".gz")
        t0 = time.perf_counter()
        if self.progress:
            print(f"flare-run: sending {name} ({len(blob) / 2**20:.1f} MB) to {self.url}", file=sys.stderr, flush=True)
        labels_blob, report = self.request(blob, name, compressed)
        if self.progress:
            print(f"flare-run: {name} segmented by {self.url} in {time.perf_counter() - t0:.2f} s "
                  f"(server pipeline {report.get('total_s')} s)", file=sys.stderr, flush=True)
        labels = read_image_bytes(labels_blob, name=f"{self.url} (labels of {name})")
        if output is not None:
            write_bytes_atomic(output, labels_blob)
        # a loaded image keeps its own affine (NIfTI stores the sform in float32: an in-memory float64 affine
        # comes back rounded); the labels are in its grid either way
        return labels.data, labels.affine if isinstance(image, (str, Path)) else image.affine, report


def _read_input(path: Path) -> bytes:
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise InputError(path, "is a folder, not a NIfTI file")
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputError(path, f"cannot read: {err.strerror or err}") from None

