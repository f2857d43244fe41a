"""What ``flare-serve``'s HTTP front checks of an inference request before any of its body goes on to Triton.

A request under ``FLARE_MAX_REQUEST_BYTES`` is still up to that size, and Triton, the Python-backend stub and PyTriton
each keep copies of what they were handed (three 120 MB junk requests left the server's processes ≈ 630 MB larger).
So the front reads only the start of a request to model ``flare`` — the JSON inference header and the first bytes of
the image — and refuses, with one ``flare-error:`` line and without reading the rest, a request that is not exactly
what :mod:`flare.runtime.serving.protocol` describes:

* ``Inference-Header-Content-Length`` (Triton's binary-data extension) present, at most :data:`MAX_HEADER_BYTES`;
  no ``Content-Encoding`` (Triton would inflate a compressed body whole; the image itself may be gzip);
* the header is JSON with one input ``image``, ``BYTES``, shape ``[1]``, sent as binary data whose declared size
  (``binary_data_size``) is what the body holds and what the BYTES element's 4-byte length says;
* the image's first bytes are a NIfTI-1/2 header (a gzip stream is inflated as far as the bytes read go) that passes
  every check :func:`~flare.runtime.image.nifti.read_image_bytes` makes from the header alone, the server's grid
  limits (``preflight``) included.

Other paths (health, metadata, ...) take bodies of at most :data:`OTHER_MAX_BODY` bytes. A request that passes goes on
to Triton unchanged (the bytes read are sent first, then the rest as it streams in). The gRPC front checks a whole
``ModelInferRequest`` message the same way (gRPC has received it whole by then; it never reaches Triton) and takes
other messages of at most :data:`OTHER_MAX_BODY` bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from flare.runtime.foundation.errors import InputError
from flare.runtime.foundation.lazy import lazy_import
from flare.runtime.serving.protocol import INPUT, MODEL, UNNAMED, request_name

__all__ = ["MAX_HEADER_BYTES", "OTHER_MAX_BODY", "PROBE_BYTES", "InferGate"]

MAX_HEADER_BYTES = 2**16
"""The largest JSON inference header accepted (flare's client sends about 300 bytes)."""
PROBE_BYTES = 2**16
"""Bytes of the image read (besides the header) before a request goes on to Triton."""
OTHER_MAX_BODY = 2**16
"""The largest body accepted on any path but ``POST /v2/models/flare[/versions/N]/infer``."""
HEADER_LENGTH = "Inference-Header-Content-Length"

_INFER = re.compile(rf"/v2/models/{re.escape(MODEL)}(/versions/[0-9]+)?/infer")


class InferGate:
    """The checks above; ``preflight`` (``Segmenter.check_grids``) refuses images from their header's grid."""

    def __init__(self, preflight: Callable[..., None] | None = None) -> None:
        self.preflight = preflight

    @staticmethod
    def is_infer(method: str, path: str) -> bool:
        """Whether the request is an inference request to model ``flare`` (the only one with a large body)."""
        return method == "POST" and _INFER.fullmatch(path) is not None

    @staticmethod
    def start_bytes(headers: Mapping[str, str], content_length: int | None) -> int:
        """How many bytes of the body :meth:`check` needs; InputError when the HTTP headers alone refuse it."""
        encoding = headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise InputError(UNNAMED, f"Content-Encoding {encoding} is not accepted (send the image gzip-compressed "
                                      "inside the request instead)")
        text = headers.get(HEADER_LENGTH)
        if text is None:
            raise InputError(UNNAMED, f"the request has no {HEADER_LENGTH}: the image must be sent as binary data")
        try:
            length = int(text)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_HEADER_BYTES or (content_length is not None and length > content_length):
            raise InputError(UNNAMED, f"{HEADER_LENGTH} {text.strip()[:40]!r} is not a length between 1 and "
                                      f"{MAX_HEADER_BYTES} within the body")
        return length + 4 + PROBE_BYTES

    def check(self, headers: Mapping[str, str], start: bytes, content_length: int | None) -> None:
        """Refuse (one-line InputError naming the request's ``filename``) an HTTP request from its first bytes
        ``start`` (:meth:`start_bytes` of them, fewer when the body is shorter)."""
        length = int(headers[HEADER_LENGTH])
        if len(start) < length:
            raise InputError(UNNAMED, f"the body ends inside the inference header ({len(start)} of {length} bytes)")
        header, name = _header(start[:length])
        size = _binary_size(header, name)
        if content_length is not None and content_length - length != size:
            raise InputError(name, f"the body holds {content_length - length} bytes of binary data, the inference "
                                   f"header declares {size}")
        self._check_element(start[length:], name, size)

    def check_grpc(self, message: bytes) -> None:
        """Refuse (one-line InputError) a gRPC ``ModelInferRequest`` (``message``, serialized) to model ``flare``
        that is not one BYTES input ``image`` of shape [1] in ``raw_input_contents`` holding the start of a NIfTI
        file; a request to another model is left to Triton."""
        service = lazy_import("tritonclient.grpc.service_pb2", "serve").load()
        try:
            fields, contents = _split_contents(message)
            request = service.ModelInferRequest.FromString(fields)
        except Exception:  # noqa: BLE001 - ValueError, protobuf's DecodeError and friends
            raise InputError(UNNAMED, "the gRPC message is not a ModelInferRequest") from None
        if request.model_name != MODEL:
            return
        filename = request.parameters["filename"].string_param if "filename" in request.parameters else None
        name = request_name(filename)
        spec = request.inputs[0] if len(request.inputs) == 1 else None
        if spec is None or spec.name != INPUT or spec.datatype != "BYTES" or list(spec.shape) != [1]:
            raise InputError(name, f"the request must have exactly one input {INPUT!r}, BYTES, shape [1]")
        if len(contents) != 1 or spec.HasField("contents"):
            raise InputError(name, f"input {INPUT!r} must be sent in raw_input_contents")
        self._check_element(bytes(contents[0][:4 + PROBE_BYTES]), name, len(contents[0]))

    def _check_element(self, start: bytes, name: str, size: int) -> None:
        """``start``: the first bytes of the one ``size``-byte BYTES element (its 4-byte length, then the file)."""
        from flare.runtime.image.nifti import check_header_start

        element = start[:4]
        if len(element) < 4 or int.from_bytes(element, "little") != size - 4:
            declared = int.from_bytes(element, "little") if len(element) == 4 else None
            raise InputError(name, f"the BYTES element of input {INPUT!r} declares {declared} bytes, "
                                   f"the request holds {size - 4}")
        check_header_start(start[4:], name, size - 4, preflight=self.preflight)


def _header(text: bytes) -> tuple[dict[str, Any], str]:
    """The inference header as a dict and the request's name; InputError unless it is a JSON object."""
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):
        header = None
    if not isinstance(header, dict):
        raise InputError(UNNAMED, "the inference header is not a JSON object")
    params = header.get("parameters")
    return header, request_name(params.get("filename") if isinstance(params, dict) else None)


def _binary_size(header: Mapping[str, Any], name: str) -> int:
    """``binary_data_size`` of the one input ``image`` (BYTES, shape [1]); InputError for any other inputs."""
    inputs = header.get("inputs")
    spec = inputs[0] if isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict) else {}
    if spec.get("name") != INPUT or spec.get("datatype") != "BYTES" or spec.get("shape") != [1]:
        raise InputError(name, f"the request must have exactly one input {INPUT!r}, BYTES, shape [1]")
    params = spec.get("parameters")
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise InputError(name, f"input {INPUT!r} must be sent as binary data (binary_data_size of at least 4)")
    return size


_RAW_INPUT_CONTENTS = 7
"""Field number of ``ModelInferRequest.raw_input_contents`` (repeated bytes) in Triton's ``grpc_service.proto``."""


def _split_contents(message: bytes) -> tuple[bytes, list[memoryview]]:
    """A serialized ``ModelInferRequest`` as (its fields but ``raw_input_contents``, those as views into
    ``message``), so that protobuf parses only the small part: its parser would copy every bytes field (the image)
    and offers no way not to. ValueError when ``message`` is not protobuf wire format or the other fields pass
    :data:`MAX_HEADER_BYTES` (this walk then stops)."""
    view, fields, contents, at = memoryview(message), [], [], 0
    kept = 0
    while at < len(view):
        start = at
        key, at = _varint(view, at)
        wire = key & 7
        if wire == 0:
            at = _varint(view, at)[1]
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        elif wire == 2:
            size, at = _varint(view, at)
            at += size
            if key >> 3 == _RAW_INPUT_CONTENTS:
                contents.append(view[at - size:at])
                continue
        else:
            raise ValueError(f"wire type {wire}")
        kept += at - start
        if at > len(view) or kept > MAX_HEADER_BYTES:
            raise ValueError("truncated, or too many fields")
        fields.append(view[start:at])
    if at > len(view):
        raise ValueError("truncated")
    return b"".join(fields), contents


def _varint(view: memoryview, at: int) -> tuple[int, int]:
    """The protobuf varint at ``at`` and the offset after it."""
    value = shift = 0
    while at < len(view) and shift < 64:
        byte = view[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if byte < 0x80:
            return value, at
    raise ValueError("bad varint")
