"""The junk requests of ``python -m flare.benchmarks.serve_junk``: each kind is what it says — the front's gate
refuses every one except ``gzip-corrupt`` (a valid NIfTI start, damaged later), which only flare can refuse — and the
process-group memory reader sees this process."""

from __future__ import annotations

import os

import pytest
from flare.runtime.foundation.errors import InputError

pytest.importorskip("tritonclient.grpc.service_pb2")


@pytest.mark.parametrize("kind", ["valid-header", "invalid-header", "gzip", "gzip-corrupt", "grpc-junk", "grpc-valid"])
def test_junk_kinds(kind: str) -> None:
    from flare.benchmarks.serve_junk import junk_request
    from flare.runtime.serving.gate import InferGate

    body, headers = junk_request(kind, 2**20)
    gate = InferGate()

    def check() -> None:
        if headers is None:
            gate.check_grpc(body)
        else:
            gate.check(headers, body[: gate.start_bytes(headers, len(body))], len(body))

    if kind == "gzip-corrupt":
        check()
    else:
        with pytest.raises(InputError, match="^request: (not a NIfTI file|the inference header is not|the gRPC)"):
            check()


def test_group_memory_sees_this_process() -> None:
    from flare.benchmarks.serve_junk import group_memory

    mine = {k: v for k, v in group_memory(os.getpgid(0)).items() if k.endswith(f":{os.getpid()}")}
    assert len(mine) == 1 and all(rss > 0 and pss > 0 for rss, pss in mine.values())
