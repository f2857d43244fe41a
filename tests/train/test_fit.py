"""A tiny fit learns on phantoms; resume; the whole ``run`` pipeline (minimal schedule); CLI error handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flare.train.checkpoints import load_checkpoint
from flare.train.cli import app
from flare.train.config import load_config, role_config
from flare.train.data import preprocess
from flare.train.datalist import load_datalist
from flare.train.engine import fit, torch_setup
from flare.train.phantoms import make_phantoms
from flare.train.run import run_all
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fit_phantoms")
    make_phantoms(out, 10, seed=11, size=64, holdout=2, folds=2)
    return out


def test_tiny_fit_lowers_loss_and_beats_chance(phantoms: Path, tmp_path: Path) -> None:
    torch_setup(2)
    small = {"spacing_mm": [6.0, 6.0, 6.0], "network": {"init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2},
             "train": {"epochs": 6, "steps_per_epoch": 6, "val_every": 6, "lr": 0.005}}
    cfg = load_config("tiny", small)
    doc = load_datalist(phantoms)
    entries = [{**e, "label": e["label_full"]} for e in doc["training"]]
    cache = tmp_path / "cache"
    res = fit(cfg, "fold", entries, entries[:2], tmp_path / "fold0", fold=0, stage=1, cache_dir=cache,
              tensorboard=tmp_path / "tb")
    assert np.mean(res["losses"][-2:]) < np.mean(res["losses"][:2])
    assert set(res["val_per_class"]) >= {"left kidney", "right kidney"}  # Table 4's rows: sides scored apart
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # TensorBoard scalars
    net_state = load_checkpoint(tmp_path / "fold0")
    assert net_state["config"]["role"] == "fold" and (tmp_path / "fold0" / "last.pt").is_file()
    # a multi-class network needs more steps than a test can afford to segment organs; the binary organ-union
    # locator learns within a few dozen: its Dice must clearly beat chance (a random mask of the right size scores
    # about the organ prevalence)
    loc_eff = role_config(cfg, "locator")
    loc_items = preprocess(entries[:2], loc_eff)
    loc_small = {"locator": {"network": {"init_filters": 4, "blocks_down": [1, 1, 1]},
                             "train": {"epochs": 6, "steps_per_epoch": 6, "val_every": 6}}}
    loc = fit(load_config(cfg, loc_small), "locator", entries, entries[:2], tmp_path / "locator", cache_dir=cache)
    prevalence = float(np.mean([np.asarray(i["label"]).mean() for i in loc_items]))
    assert loc["best_metric"] > max(0.3, 3 * prevalence)
    # resume continues after the last epoch instead of starting again
    more = load_config(cfg, {"train": {"epochs": 7}})
    res2 = fit(more, "fold", entries, entries[:2], tmp_path / "fold0", fold=0, stage=1, resume=True, cache_dir=cache)
    assert len(res2["losses"]) == 7 and res2["losses"][:6] == res["losses"]


def test_stage2_section_sets_stage2_epochs_and_learning_rate(phantoms: Path, tmp_path: Path) -> None:
    """``stage2.lr``/``warmup_epochs``/``epochs`` apply to stage 2 alone; stage 1 keeps ``train``'s."""
    torch_setup(2)
    small = {"spacing_mm": [8.0, 8.0, 8.0], "network": {"init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2},
             "train": {"epochs": 1, "steps_per_epoch": 1, "val_every": 5, "lr": 0.005},
             "stage2": {"epochs": 2, "lr": 0.001, "warmup_epochs": 0}}
    cfg = load_config("tiny", small)
    entries = [{**e, "label": e["label_full"]} for e in load_datalist(phantoms)["training"][:2]]
    for stage, epochs, lr in ((1, 1, 0.005), (2, 2, 0.001)):
        res = fit(cfg, "fold", entries, entries[:1], tmp_path / f"s{stage}", fold=0, stage=stage,
                  cache_dir=tmp_path / "cache")
        state = torch.load(tmp_path / f"s{stage}" / "last.pt", map_location="cpu", weights_only=False)
        assert len(res["losses"]) == epochs and state["optimizer"]["param_groups"][0]["initial_lr"] == lr


def test_run_all_layout(phantoms: Path, tmp_path: Path) -> None:
    fast = {"spacing_mm": [8.0, 8.0, 8.0], "network": {"init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2},
            "train": {"epochs": 1, "steps_per_epoch": 2, "val_every": 1}, "stage2": {"epochs": 1},
            "locator": {"spacing_mm": [8.0, 8.0, 8.0], "train": {"epochs": 1, "steps_per_epoch": 2}}}
    out = tmp_path / "ckpt"
    summary = run_all(phantoms, out, "tiny", folds=2, overrides=fast, quiet=True)
    for name in ("locator", "fold0", "fold1", "stage1/fold0", "stage1/fold1"):
        assert (out / name / "model.pt").is_file() and (out / name / "config.json").is_file()
    loc = json.loads((out / "locator" / "config.json").read_text())
    assert loc["role"] == "locator" and loc["labels"] == "organ-union" and "locator_margin_mm" in loc
    f1 = json.loads((out / "fold1" / "config.json").read_text())
    assert f1["role"] == "fold" and f1["fold"] == 1 and f1["stage"] == 2 and f1["spacing_mm"] == [8.0, 8.0, 8.0]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["holdout"]["cases"] == 2 and saved["holdout"]["truth"] == "label_full"
    assert summary["n_pseudolabelled"] >= 1 and (out / "dataset_stage2.json").is_file()
    assert (out / "train.log").read_text().count("\n") > 5
    assert all(np.isfinite(v) for v in saved["holdout"]["per_class"].values())
    assert {"left kidney", "right kidney"} <= set(saved["holdout"]["per_class"])  # Table 4's rows
    assert not Path(saved["datalist"]).is_absolute() and (out / saved["datalist"]).resolve().is_file()
    # resumable: a second run skips every finished step and re-uses the pseudo-labels
    again = run_all(phantoms, out, "tiny", folds=2, overrides=fast, quiet=True)
    log = (out / "train.log").read_text()
    assert log.count("finished before, skipped") == 5 and "pseudo-labelling skipped" in log
    assert [f["best_metric"] for f in again["stage2"]] == [f["best_metric"] for f in summary["stage2"]]


def test_same_seed_reproduces_a_fit(phantoms: Path, tmp_path: Path) -> None:
    cfg = load_config("tiny", {"spacing_mm": [8.0, 8.0, 8.0], "train": {"epochs": 1, "steps_per_epoch": 3},
                               "network": {"init_filters": 4, "blocks_down": [1, 1, 1], "dsdepth": 2}})
    entries = [{**e, "label": e["label_full"]} for e in load_datalist(phantoms)["training"]]
    runs = [fit(cfg, "fold", entries, [], tmp_path / f"r{i}", fold=1, stage=1, cache_dir=tmp_path / "cache")
            for i in range(2)]
    assert runs[0]["losses"] == runs[1]["losses"]
    for a, b in zip(runs[0]["net"].parameters(), runs[1]["net"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["analyze", str(tmp_path / "missing.json")])
    assert res.exit_code == 2 and "datalist does not exist" in res.output
    res = runner.invoke(app, ["fit", str(tmp_path / "missing.json"), "--config", "nope"])
    assert res.exit_code == 2 and "no such config" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "phantoms" in res.output and "pseudolabel" in res.output


def test_refused_datalist_makes_no_output_folder(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{bad")
    for command in ("run", "fit", "locator", "pseudolabel"):
        for datalist, problem in (("missing.json", "datalist does not exist"), ("bad.json", "cannot parse datalist")):
            out = tmp_path / f"out_{command}"
            res = CliRunner().invoke(app, [command, str(tmp_path / datalist), "-o", str(out)])
            assert res.exit_code == 2 and problem in res.output, (command, res.output)
            assert not out.exists(), f"flare-train {command} made {out.name} for a refused datalist"


def test_cli_bad_values_are_one_line_errors(phantoms: Path, tmp_path: Path) -> None:
    """Wrongly typed or out-of-range config and datalist values, unusable --init files, OUT a file: exit 2 and one
    line naming the file and the key (each was a traceback)."""
    good = json.loads((phantoms / "dataset.json").read_text())

    def datalist(name: str, change) -> Path:
        doc = json.loads(json.dumps(good))
        change(doc)
        path = phantoms / f"bad_{name}.json"  # beside the phantoms: the datalist's relative paths stay valid
        path.write_text(json.dumps(doc))
        return path

    def config(name: str, text: str | bytes) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    tiny = load_config("tiny")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    (tmp_path / "afile").write_text("x")
    cases = [
        (["fit", str(phantoms), "-c", str(config("s", json.dumps({**tiny, "spacing_mm": "abc"})))], "spacing_mm"),
        (["fit", str(phantoms), "-c", str(config("b", json.dumps({**tiny, "train": {**tiny["train"],
                                                                                    "batch_size": 0}})))],
         "train.batch_size"),
        (["fit", str(phantoms), "-c", str(config("u", b"\xff\xfe{"))], "cannot parse config"),
        (["analyze", str(datalist("img", lambda d: d["training"][0].update(image=5)))], "must be a file path"),
        (["analyze", str(datalist("nf", lambda d: d.update(num_folds=0)))], "num_folds"),
        (["analyze", str(datalist("lp", lambda d: d["training"][0].update(labels_present="abc")))], "labels_present"),
        (["analyze", str(datalist("fold", lambda d: d["training"][0].update(fold="x")))], ".fold must be"),
        (["fit", str(phantoms), "--init", str(tmp_path / "none.pt"), "-o", str(tmp_path / "o1")],
         "checkpoint does not exist"),
        (["fit", str(phantoms), "--init", str(text), "-o", str(tmp_path / "o2")], "cannot load checkpoint"),
        (["run", str(phantoms), "-o", str(tmp_path / "afile")], "exists and is not a folder"),
        (["phantoms", str(tmp_path / "afile"), "-n", "1"], "exists and is not a folder"),
    ]
    for args, words in cases:
        res = CliRunner().invoke(app, args)
        errors = [ln for ln in res.output.splitlines() if ln.startswith("flare-train: ")]
        assert res.exit_code == 2 and len(errors) == 1 and words in errors[0], (args, res.output)
        assert "Traceback" not in res.output
    for args in (["fit", str(phantoms), "--threads", "0"], ["fit", str(phantoms), "--fold", "7"],
                 ["phantoms", str(tmp_path / "p"), "--size", "20000"], ["phantoms", str(tmp_path / "p"), "--seed", "-1"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and "Invalid value" in res.output, (args, res.output)
    assert not (tmp_path / "p").exists() and not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_a_user_error_in_a_dataloader_worker_is_one_line(capsys: pytest.CaptureFixture) -> None:
    """With loader workers (flare23 uses 4) an InputError comes back as a RuntimeError holding the worker's
    traceback as text; flare-train still prints one line and exits 2 (it printed the whole traceback)."""
    import typer
    from flare.runtime.foundation.errors import InputError
    from flare.train.cli import _fail
    from torch.utils.data import DataLoader, Dataset

    class Refusing(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> None:
            raise InputError("/data/l.nii.gz", "label grid (1, 2, 3) differs from its image's (3, 2, 1)")

    with pytest.raises(RuntimeError) as raised:
        next(iter(DataLoader(Refusing(), num_workers=1)))
    with pytest.raises(typer.Exit) as exited:
        _fail(raised.value)
    assert exited.value.exit_code == 2
    assert capsys.readouterr().err == "flare-train: /data/l.nii.gz: label grid (1, 2, 3) differs from its image's (3, 2, 1)\n"
    with pytest.raises(ValueError):  # anything else is not a user error: it propagates as it is
        _fail(ValueError("a bug"))
