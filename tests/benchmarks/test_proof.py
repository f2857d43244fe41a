"""The proof run's pieces: headline means, the resolution ceiling, and a minimal end-to-end proof through the
runtime (two-stage and naive, learning curve, report files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flare.benchmarks.proof import (
    HELDOUT_SEED,
    LARGE_ORGANS,
    TEST_SEED,
    TRAIN_SEED,
    heldout_entries,
    missing_organs,
    proof_markdown,
    resolution_ceiling,
    run_proof,
    spread,
    summarise,
)
from flare.runtime.foundation import labels as L
from flare.train.phantoms import make_phantoms


def test_summarise_headlines() -> None:
    per_case = [{c: 0.5 for c in L.ORGAN_IDS} | {L.TUMOR: 0.2}, {L.LIVER: 1.0, L.AORTA: 0.0}]
    s = summarise(per_case, missing_organs())
    assert s["cases"] == 2 and s["per_class"]["liver"] == 0.75 and s["per_class"]["aorta"] == 0.25
    assert s["tumor"] == 0.2  # only the case that has a tumour counts
    assert s["large6_mean"] == pytest.approx(np.mean([0.75, 0.5, 0.5, 0.5, 0.25, 0.5]), abs=1e-4)
    assert s["organ_mean"] == pytest.approx((0.75 + 0.25 + 11 * 0.5) / 13, abs=1e-4)
    assert set(missing_organs()).isdisjoint({L.LIVER, L.SPLEEN, L.PANCREAS, L.RIGHT_KIDNEY, L.LEFT_KIDNEY})
    assert L.AORTA in missing_organs() and len(LARGE_ORGANS) == 6


def test_resolution_ceiling_falls_with_spacing(tmp_path: Path) -> None:
    make_phantoms(tmp_path, 2, seed=TEST_SEED, size=48, holdout=2)
    entries = heldout_entries(tmp_path)
    fine, coarse = resolution_ceiling(entries, 1.0), resolution_ceiling(entries, 12.0)
    assert fine["organ_mean"] > 0.95 and fine["per_class"]["liver"] > 0.99
    assert coarse["organ_mean"] < fine["organ_mean"] - 0.1
    assert coarse["per_class"]["liver"] > coarse["per_class"].get("right adrenal gland", 0.0)


@pytest.mark.slow
def test_minimal_proof_through_the_runtime(tmp_path: Path) -> None:
    fast = {"spacing_mm": [8.0, 8.0, 8.0], "network": {"init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2},
            "train": {"epochs": 1, "steps_per_epoch": 2}, "stage2": {"epochs": 2, "snapshot_epochs": [1, 2]},
            "locator": {"train": {"epochs": 1, "steps_per_epoch": 2}}}
    said: list[str] = []
    res = run_proof(tmp_path, train_cases=10, test_cases=2, size=48, overrides=fast, say=said.append, command="t")
    for name in ("proof.json", "proof.md", "curve.png"):
        assert (tmp_path / name).is_file()
    # the proof's test set is neither the training seed nor the demo's held-out seed the proof configs were chosen on
    assert json.loads((tmp_path / "proof.json").read_text())["test_set"]["seed"] == TEST_SEED
    assert TEST_SEED not in (TRAIN_SEED, HELDOUT_SEED)
    assert "strict" not in res["naive"]  # the ablation compares the paper's rules on both
    for model, modes in (("two_stage", ("paper", "strict")), ("naive", ("paper",))):
        for pp in modes:
            rows = res[model][pp]["per_case"]
            assert len(rows) == 2 and all(0.0 <= v <= 1.0 for r in rows for v in r["dice"].values())
        assert len(list((tmp_path / f"seg_{model}").glob("*.nii.gz"))) == 2  # flare-run's outputs, kept
    assert res["naive_training"]["naive"] and res["two_stage_training"]["n_pseudolabelled"] > 0
    # stage 1's end, the stage-2 snapshots, the final model (scored once, above)
    assert [p["step"] for p in res["curve"]] == [2, 4, 6] and res["curve"][-1]["stage"] == "stage 2 (final)"
    assert set(res["ceiling"]) == {"8mm", "6mm", "3mm"}  # at size 48 the truth is already coarse: no ordering
    md = proof_markdown(res)
    assert set(res["spread"]) == {"rounds", "tumor_ci95", "missing_gap_ci95", "missing_cases_two_stage_higher"}
    assert "13-organ mean" in md and "two-stage (strict)" in md and "| 6 |" in md and "Post-processing per case" in md
    assert not list(tmp_path.glob(".view*")) and not list(tmp_path.glob(".curve"))
    # a rerun skips the finished training and reuses the scores of the same checkpoints
    again = run_proof(tmp_path, train_cases=10, test_cases=2, size=48, overrides=fast, command="t")
    assert again["two_stage"] == res["two_stage"] and again["curve"] == res["curve"]


def test_an_existing_phantom_set_of_another_size_is_refused(tmp_path: Path) -> None:
    """A resumed proof with another ``--cases`` must not train on the old set while reporting the new count."""
    from flare.benchmarks.demo import app
    from typer.testing import CliRunner

    make_phantoms(tmp_path / "phantoms", 2, TRAIN_SEED, size=48, holdout=0)
    result = CliRunner().invoke(app, ["--proof", "--out", str(tmp_path), "--cases", "12"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "holds 2 phantoms (seed 0, size 48), this run asks for 12 (seed 0, size" in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "test").exists()  # refused before anything else


def test_spread_brackets_the_headline_and_counts_cases() -> None:
    """The bootstrap over test cases: its interval holds the headline gap, and a model better on every case is
    counted so; cases without tumour leave the tumour interval to the others."""
    missing = [L.name_of(c) for c in missing_organs()]
    rng = np.random.default_rng(3)
    two, naive = [], []
    for i in range(12):
        base = {n: float(rng.uniform(0.3, 0.7)) for n in missing}
        two.append({"case": f"c{i}", "dice": {**{n: v + 0.1 for n, v in base.items()},
                                              **({"tumor": 0.4} if i % 2 else {})}})
        naive.append({"case": f"c{i}", "dice": base})
    res = {"two_stage": {"paper": {"per_case": two}}, "naive": {"paper": {"per_case": naive}}}
    out = spread(res, rounds=200)
    lo, hi = out["missing_gap_ci95"]
    assert lo <= 0.1 + 1e-3 and hi >= 0.1 - 1e-3 and out["missing_cases_two_stage_higher"] == [12, 12]
    assert out["tumor_ci95"] == [0.4, 0.4]
    assert spread({"two_stage": res["two_stage"]}, rounds=10).keys() == {"rounds", "tumor_ci95"}
