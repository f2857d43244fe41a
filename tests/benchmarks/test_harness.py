"""flare-bench harness: fallbacks reach the summary, each run is logged as it ends, and the parent decides CPU or
GPU without creating a CUDA context."""

from __future__ import annotations

import json
from pathlib import Path

from flare.benchmarks.harness import Run, run_fallbacks, run_recorder, summarise_backend
from flare.benchmarks.sampler import MemoryTrace


def _run(report: dict) -> Run:
    return Run(1.5, MemoryTrace(False, "no GPU", t=[0.0, 1.0], rss_mb=[10.0, 20.0]), report)


def test_every_fallback_reaches_the_summary() -> None:
    runs = [_run({"gpu": {"fallback": ["roi (224, 224, 224) out of memory", "cpu"]}}),
            _run({"fallbacks": ["device auto -> cpu: no CUDA provider"], "gpu": {"fallback": []}}),
            _run({})]
    assert run_fallbacks(runs[0].report) == ["gpu: roi (224, 224, 224) out of memory", "gpu: cpu"]
    summary = summarise_backend(runs)
    assert summary["fallbacks"] == ["gpu: roi (224, 224, 224) out of memory", "gpu: cpu",
                                    "device auto -> cpu: no CUDA provider"]
    assert summary["samples"][1]["fallbacks"] == ["device auto -> cpu: no CUDA provider"]


def test_runs_are_appended_as_they_end(tmp_path: Path) -> None:
    log = tmp_path / "results.jsonl"
    record = run_recorder(log, tmp_path / "bundle")
    record("cold", Path("case.nii.gz"), _run({"stages": {"read": 0.1}}))
    record("warm", Path("case.nii.gz"), _run({"gpu": {"fallback": ["cpu"]}}))
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(x["stage"], x["phase"], x["case"]) for x in lines] == [("bench", "cold", "case.nii.gz"),
                                                                    ("bench", "warm", "case.nii.gz")]
    assert lines[0]["stages"] == {"read": 0.1} and lines[1]["fallbacks"] == ["gpu: cpu"]
    run_recorder(None, tmp_path)("cold", Path("x"), _run({}))  # no file: nothing written, no error


def test_the_parent_asks_no_cuda_question() -> None:
    from flare.benchmarks.harness import _on_cpu
    from flare.runtime.inference.device import cupy_status

    cupy_status.cache_clear()
    assert _on_cpu("cpu") is True
    _on_cpu("auto")
    _on_cpu("cuda")
    assert cupy_status.cache_info().currsize == 0  # CuPy (a CUDA context) never touched
