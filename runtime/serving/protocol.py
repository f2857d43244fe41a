"""What ``flare-serve`` and its clients agree on: model and tensor names, request parameters, the error marker.

The wire protocol (Triton's KServe v2 HTTP/REST or gRPC, model :data:`MODEL`):

* input ``image``: ``BYTES``, shape ``[1]`` — the bytes of a ``.nii`` or ``.nii.gz`` file (gzip is recognised by its
  magic bytes; sending gzip keeps requests small);
* outputs ``labels`` (``BYTES [1]``: the uint8 label map as a NIfTI file in the input's geometry, gzip-compressed
  unless the request says ``compressed: false``) and ``report`` (``BYTES [1]``: the JSON report of ``flare-run``);
* optional request parameters: ``filename`` (names the input in errors and in the report), ``folds`` (use the first N
  folds), ``overlap`` (tile overlap ratio), ``postprocess`` (``paper`` or ``strict``), ``compressed`` (bool).

A bad input fails the request with Triton's error message, whose line starting with :data:`ERROR_MARKER` carries the
one-line :class:`~flare.runtime.foundation.errors.FlareError`; the server keeps serving.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ERROR_MARKER", "INPUT", "MODEL", "OUTPUT_LABELS", "OUTPUT_REPORT", "UNNAMED", "flare_error_line",
           "request_name"]

MODEL = "flare"
INPUT = "image"
OUTPUT_LABELS = "labels"
OUTPUT_REPORT = "report"
ERROR_MARKER = "flare-error: "
UNNAMED = "request"
"""What an error names when the request's ``filename`` is not known (not given, or the body was refused unread)."""


def request_name(value: Any) -> str:
    """A request's ``filename`` parameter as one short line (it names the input in errors), else :data:`UNNAMED`."""
    text = " ".join(str(value or "").split())[:200]
    return text or UNNAMED


def flare_error_line(message: str, name: str | None = None) -> str | None:
    """The one-line FlareError carried by a server error message, if any; with ``name``, an error about an unnamed
    request (e.g. a body refused before it was read) names ``name`` instead."""
    for line in message.splitlines():
        at = line.find(ERROR_MARKER)
        if at >= 0:
            text = line[at + len(ERROR_MARKER):].strip()
            if name is not None and text.startswith(UNNAMED + ": "):
                text = f"{name}: {text[len(UNNAMED) + 2:]}"
            return text
    return None
