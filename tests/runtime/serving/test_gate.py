"""InferGate: the checks the fronts make of an inference request from its first bytes, on requests made the way
flare's client makes them (tritonclient's request body / gRPC message) around real CT files and junk."""

from __future__ import annotations

import gzip
import json
import os

import pytest
from conftest import data_path
from flare.runtime.foundation.errors import InputError
from serve_support import infer_request as _request

pytest.importorskip("tritonclient.http")


def _check(headers: dict[str, str], body: bytes, preflight=None, whole: bool = True) -> None:
    from flare.runtime.serving.gate import InferGate

    gate = InferGate(preflight)
    start = body[: gate.start_bytes(headers, len(body) if whole else None)]
    gate.check(headers, start, len(body) if whole else None)


def _refused(headers: dict[str, str], body: bytes, words: str, **kwargs: object) -> str:
    with pytest.raises(InputError) as refused:
        _check(headers, body, **kwargs)  # type: ignore[arg-type]
    assert words in str(refused.value), refused.value
    return str(refused.value)


@pytest.mark.parametrize("name", ["ts_abdomen_ct_3mm.nii.gz", "ts_body_ct_3mm_int32.nii.gz"])
def test_real_ct_requests_pass(name: str) -> None:
    blob = data_path(name).read_bytes()
    for image in (blob, gzip.decompress(blob)):
        _check(*_request(image, filename=name))
        _check(*_request(image), whole=False)  # chunked: no Content-Length


def test_junk_is_refused_naming_the_request() -> None:
    noise = os.urandom(2**20)
    assert _refused(*_request(noise, filename="a.nii.gz"), "not a NIfTI file") == \
        "a.nii.gz: not a NIfTI file (no NIfTI-1/NIfTI-2 header)"
    assert _refused(*_request(gzip.compress(noise)), "not a NIfTI file").startswith("request: ")
    _refused(*_request(b"\x1f\x8b" + noise), "corrupt gzip data")
    _refused(*_request(b""), "empty file")
    blob = gzip.decompress(data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes())
    _refused(*_request(blob[:100_000]), "truncated: the header needs")  # the header declares more voxels than the file holds


def test_malformed_inference_headers_are_refused() -> None:
    headers, body = _request(gzip.decompress(data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes()))
    length = int(headers["Inference-Header-Content-Length"])
    _refused({}, body, "no Inference-Header-Content-Length")
    _refused({"Inference-Header-Content-Length": "x"}, body, "is not a length")
    _refused({**headers, "Content-Encoding": "gzip"}, body, "Content-Encoding gzip is not accepted")
    _refused(headers, b"{" * length + body[length:], "not a JSON object")
    _refused(headers, body + b"extra", "the body holds")
    header = json.loads(body[:length])
    header["inputs"][0]["datatype"] = "UINT8"
    text = json.dumps(header).encode()
    _refused({"Inference-Header-Content-Length": str(len(text))}, text + body[length:], "exactly one input 'image'")
    element = (len(body) - length).to_bytes(4, "little")  # 4 more than the file
    _refused(headers, body[:length] + element + body[length + 4:], "the BYTES element")


def test_grid_limits_apply_from_the_header() -> None:
    from flare.runtime.foundation.errors import InputError as Refusal

    def preflight(path, shape, *args) -> None:
        raise Refusal(path, f"grid {shape} over the limit")

    _refused(*_request(data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes(), filename="ct"), "ct: grid (122, 101, 30)",
             preflight=preflight)


def test_grpc_requests() -> None:
    service = pytest.importorskip("tritonclient.grpc.service_pb2")
    from flare.runtime.serving.gate import InferGate

    def message(image: bytes, model: str = "flare") -> bytes:
        request = service.ModelInferRequest(model_name=model)
        spec = request.inputs.add(name="image", datatype="BYTES", shape=[1])
        assert spec.name == "image"
        request.parameters["filename"].string_param = "b.nii.gz"
        request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
        return request.SerializeToString()

    gate = InferGate()
    gate.check_grpc(message(data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes()))
    gate.check_grpc(message(os.urandom(1000), model="other"))  # another model: Triton answers
    with pytest.raises(InputError, match="^b.nii.gz: not a NIfTI file"):
        gate.check_grpc(message(os.urandom(2**20)))
    for junk in (os.urandom(2**20), message(data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes())[:-10]):
        with pytest.raises(InputError, match="^request: the gRPC message is not a ModelInferRequest"):
            gate.check_grpc(junk)
    inline = service.ModelInferRequest(model_name="flare")
    inline.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
    with pytest.raises(InputError, match="must be sent in raw_input_contents"):
        gate.check_grpc(inline.SerializeToString())
