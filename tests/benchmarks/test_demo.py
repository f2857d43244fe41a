"""flare-demo's closing table: the headline over every held-out case and a per-class table, short."""

from __future__ import annotations

import json

import pytest
from flare.benchmarks.demo import summary_lines
from flare.benchmarks.proof import HELDOUT_SEED, summarise
from flare.runtime.foundation import labels as L


def test_summary_is_short_and_has_the_headline() -> None:
    per_case = [{c: 0.5 for c in range(1, L.NUM_FLARE_IDS)} for _ in range(12)]
    summary = {"out": "demo-out", "seconds": {"total": 540.0},
               "results": {"heldout": {"summary": summarise(per_case)}, "load_before": [3.0, 2.0, 1.0],
                           "real_ct": {"organ_mean_dice": 0.1}, "bench_report": "demo-out/bench/report.md",
                           "bench": {"case": "phantom_0000.nii.gz", "mode": "mirror", "runtime_s": 1.25,
                                     "reference_s": 9.5, "agreement": 1.0},
                           "default_bundle": "~/.cache/flare/bundle"}}
    lines = summary_lines(summary)
    assert len(lines) <= 15 and all(len(line) <= 120 for line in lines)
    assert "12 cases" in lines[0] and "13-organ mean Dice 0.5" in lines[0]
    body = "\n".join(lines)
    assert all(L.name_of(c) in body for c in range(1, L.NUM_FLARE_IDS))
    assert "demo-out/demo.json" in body and "load average at start 3.0" in body
    assert "same settings 9.5 s" in body and "agree (Dice) 1.0" in body


@pytest.mark.slow
def test_demo_end_to_end_scores_every_heldout_case(tmp_path) -> None:
    from flare.benchmarks.demo import run_demo
    from flare.train.config import load_config

    cfg = load_config("demo", {"spacing_mm": [8.0, 8.0, 8.0],
                               "network": {"init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2},
                               "train": {"epochs": 1, "steps_per_epoch": 2}, "stage2": {"epochs": 1},
                               "locator": {"train": {"epochs": 1, "steps_per_epoch": 2}}})
    # an impossible time budget: the probe and the stage-2 plan run, and cut to their floors (here the config's 2 steps)
    summary = run_demo(tmp_path, cases=10, test_cases=2, bench=False, install=False, config=cfg, size=48,
                       minutes=0.01)
    assert summary["results"]["budget"]["steps_fraction"] == 0.2
    assert summary["results"]["budget"]["stage2_steps_fraction"] == 0.2
    held = summary["results"]["heldout"]
    assert held["summary"]["cases"] == 2 and len(held["per_case"]) == 2
    assert len(list((tmp_path / "heldout_seg").glob("*.nii.gz"))) == 2
    assert (tmp_path / "demo.json").is_file() and (tmp_path / "bundle" / "bundle.json").is_file()
    assert json.loads((tmp_path / "test" / "dataset.json").read_text())["seed"] == HELDOUT_SEED  # not the proof's


def test_bench_summary_reads_the_runtime_and_same_settings_reference() -> None:
    from flare.benchmarks.demo import bench_summary

    report = {"reference_mode": "mirror",
              "cases": [{"name": "phantom_0010.nii.gz", "warm": {"wall_s": {"median": 4.581, "n": 1}},
                         "reference": {"wall_s": {"median": 27.59, "n": 1}}, "dice": {"1": 1.0, "2": 0.98}}]}
    assert bench_summary(report) == {"case": "phantom_0010.nii.gz", "mode": "mirror", "runtime_s": 4.58,
                                     "reference_s": 27.59, "agreement": 0.99}


def test_time_budget_scales_the_steps_to_the_measured_speed() -> None:
    """``flare-demo --minutes``: on the idle box everything fits; twice as slow, about two fifths of the steps fit in
    8.5 min; never below a fifth. The steps per epoch shrink, epochs (the schedule's shape) stay."""
    from flare.benchmarks.demo import IDLE_FIXED_S, IDLE_PROBE_S, IDLE_STEPS_S, budget_fraction, scale_steps
    from flare.train.config import load_config

    assert budget_fraction(8.5, IDLE_PROBE_S) == (1.0, 1.0)
    assert budget_fraction(8.5, 1.05 * IDLE_PROBE_S)[0] == 1.0  # the probe's scatter cuts nothing
    frac, slow = budget_fraction(8.5, 2 * IDLE_PROBE_S)
    assert slow == 2.0 and frac == pytest.approx((510 - 2 * IDLE_FIXED_S) / (2 * IDLE_STEPS_S))
    assert budget_fraction(8.5, 50 * IDLE_PROBE_S)[0] == 0.2
    cfg = load_config("demo")
    half = scale_steps(cfg, 0.5)
    assert half["train"]["steps_per_epoch"] == cfg["train"]["steps_per_epoch"] // 2
    assert half["locator"]["train"]["steps_per_epoch"] == cfg["locator"]["train"]["steps_per_epoch"] // 2
    assert half["train"]["epochs"] == cfg["train"]["epochs"] and half["stage2"] == cfg["stage2"]
    few = load_config("demo", {"train": {"steps_per_epoch": 4}})
    assert scale_steps(few, 0.2)["train"]["steps_per_epoch"] == 4  # never more steps than the config's


def test_fit_to_budget_probes_this_machine_and_records_the_decision() -> None:
    """A real probe step (torch, the config's network and crops): a generous budget keeps the config, an
    impossible one trains a fifth of the steps and says so in the closing table."""
    from flare.benchmarks.demo import fit_to_budget
    from flare.train.config import load_config

    cfg = load_config("demo")
    results: dict = {}
    assert fit_to_budget(cfg, 1000.0, results) == cfg and results["budget"]["steps_fraction"] == 1.0
    assert results["budget"]["probe_step_s"] > 0
    cut = fit_to_budget(cfg, 0.01, results)
    assert results["budget"]["steps_fraction"] == 0.2
    assert cut["train"]["steps_per_epoch"] == 20 and cut["locator"]["train"]["steps_per_epoch"] == 6
    per_case = [{c: 0.5 for c in range(1, L.NUM_FLARE_IDS)}]
    lines = summary_lines({"out": "o", "seconds": {"total": 1.0},
                           "results": {"heldout": {"summary": summarise(per_case)}, **results}})
    assert any("trained 20% of the locator's and stage 1's steps and 100% of stage 2's" in line for line in lines)


def test_stage2_is_fitted_to_the_time_left_at_the_rate_stage_1_ran() -> None:
    """Before stage 2 the demo re-plans from how fast stage 1 actually trained: the load may have changed since
    the probe. Enough time: every step; half the time: about half; never below a fifth."""
    from flare.benchmarks.demo import IDLE_AFTER_S, IDLE_STAGE1_STEP_S, stage2_fraction, stage2_planner
    from flare.train.config import load_config

    assert stage2_fraction(400.0, 0.2, 1000) == 1.0  # 200 s of steps + the part after: fits
    idle_s = 1000 * IDLE_STAGE1_STEP_S  # at the idle box's rate the part after takes IDLE_AFTER_S
    assert stage2_fraction(0.6 * idle_s, IDLE_STAGE1_STEP_S, 1000) == pytest.approx((0.6 * idle_s - IDLE_AFTER_S) / idle_s)
    assert stage2_fraction(10.0, 0.6, 1000) == 0.2
    full = load_config("demo")
    results: dict = {"budget": {"steps_fraction": 0.2}}
    stage1_steps = full["train"]["epochs"] * full["train"]["steps_per_epoch"]
    plan = stage2_planner(full, 1e6, results)  # all the time in the world: stage 2 trains every step
    assert plan(full, {"seconds": {"stage1": 0.2 * stage1_steps}})["train"]["steps_per_epoch"] == 100
    assert results["budget"] == {"steps_fraction": 0.2, "stage2_steps_fraction": 1.0}
    plan = stage2_planner(full, 0.0, results)  # no time left: the floor
    assert plan(full, {"seconds": {"stage1": 0.2 * stage1_steps}})["train"]["steps_per_epoch"] == 20
    assert results["budget"]["stage2_steps_fraction"] == 0.2


def test_demo_refuses_before_any_work(tmp_path, monkeypatch) -> None:
    """OUT a file, a bad --config, OUT/bundle someone else's, a default bundle folder that is not a bundle: one line,
    exit 2, nothing made (a bad --config used to be found after the phantoms were written)."""
    from flare.benchmarks.demo import app
    from typer.testing import CliRunner

    (tmp_path / "afile").write_text("x")
    (tmp_path / "own" / "bundle").mkdir(parents=True)
    (tmp_path / "own" / "bundle" / "notes.txt").write_text("mine")
    (tmp_path / "cache" / "bundle").mkdir(parents=True)
    (tmp_path / "cache" / "bundle" / "x.txt").write_text("not a bundle")
    monkeypatch.setenv("FLARE_BUNDLE", str(tmp_path / "cache" / "bundle"))
    for args, words in ((["--out", str(tmp_path / "afile")], "exists and is not a folder"),
                        (["--out", str(tmp_path / "d1"), "--config", "nope"], "no such config"),
                        (["--out", str(tmp_path / "own")], "not a flare bundle"),
                        (["--out", str(tmp_path / "d2")], "not a flare bundle; not replacing it")):
        res = CliRunner().invoke(app, args)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and words in lines[0], (args, res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "cache", "own"]
    assert [p.name for p in (tmp_path / "own").iterdir()] == ["bundle"]
