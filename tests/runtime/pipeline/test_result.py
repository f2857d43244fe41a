"""The typed report: its JSON keeps the keys and order of the run report, leaves empty optional keys out, and reads
back (the server's answer) to the same object."""

from __future__ import annotations

import json

from flare.runtime.pipeline.result import STAGES, Report

KEYS = ["input", "crop", "tiles", "backend", "folds", "postprocess", "stages", "total_s", "rss_peak_mb", "gpu_peak_mb"]


def _report() -> Report:
    return Report(input={"path": "ct.nii.gz"}, crop={"lo": [0, 0, 0]}, tiles={"roi": [64, 64, 64]},
                  backend={"device": "cpu"}, folds=2, postprocess={"mode": "paper"},
                  stages={name: 0.5 for name in STAGES}, total_s=3.0, rss_peak_mb=100.0)


def test_json_keys_and_order() -> None:
    report = _report()
    report.voxels, report.volume_ml = {"1": 10}, {"1": 0.27}
    assert list(report.to_json()) == [*KEYS, "voxels", "volume_ml"]  # no gpu, fallbacks, output while empty
    report.gpu, report.gpu_peak_mb, report.fallbacks, report.output = {"budget_mb": 4000}, 812.5, ["cpu"], "seg.nii"
    assert list(report.to_json()) == [*KEYS, "gpu", "voxels", "volume_ml", "fallbacks", "output"]
    assert report.to_json()["gpu_peak_mb"] == 812.5


def test_round_trip_and_stage_times() -> None:
    report = _report()
    report.add_stage_time("read", 0.25)
    assert report.stages["read"] == 0.75 and list(report.stages) == list(STAGES)
    again = Report.from_json({**json.loads(json.dumps(report.to_json())), "from_a_newer_server": 1})
    assert again == report
