"""flare-bench end to end on a small real run: tiny re-biased bundle, the 3 mm abdomen CT, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import data_path
from flare.benchmarks.cli import app
from typer.testing import CliRunner


@pytest.fixture
def small_run(parity_bundle: Path, tmp_path: Path) -> tuple[dict, Path]:
    from flare.benchmarks.harness import run_benchmark

    out = tmp_path / "bench"
    report = run_benchmark(parity_bundle, [data_path("ts_abdomen_ct_3mm.nii.gz")], reference=True, out_dir=out,
                           repeats=2, device="cpu", cold=1, reference_repeats=1, quiet=True, command="test")
    return report, out


def test_report_files_and_numbers(small_run: tuple[dict, Path]) -> None:
    report, out = small_run
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "memory_runtime.png",
                                                "memory_reference.png"}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["cases"][0]["name"] == "ts_abdomen_ct_3mm.nii.gz"
    case = report["cases"][0]
    cold, warm, ref = case["cold"], case["warm"], case["reference"]
    assert not cold["errors"] and not warm["errors"]
    assert cold["runs"] == 1 and warm["runs"] == 2 and ref["runs"] == 1
    assert cold["wall_s"]["median"] > 0 and warm["wall_s"]["n"] == 2
    assert warm["wall_s"]["min"] <= warm["wall_s"]["median"] <= warm["wall_s"]["max"]
    assert set(warm["stages"]) >= {"read", "locate", "crop_resample", "infer", "postprocess", "restore"}
    assert set(cold["stages"]) == {"read", "locate", "crop_resample", "infer", "postprocess", "restore", "write"}
    assert cold["rss_peak_mb"]["median"] > 50  # the child process, sampled from outside
    assert warm["load_s"] > 0 and ref["load_s"] > 0
    assert case["ratios"]["wall_s"] > 0
    assert case["dice"] and all(0.0 <= v <= 1.0 for v in case["dice"].values())
    # the verdict follows the measured cold wall time (no timed assertion: the box may be loaded)
    assert case["flare"]["time_ok"] == (cold["wall_s"]["median"] <= 15.0)
    if not report["environment"]["gpu"]["available"]:
        assert case["flare"]["gpu_ok"] is None and cold["gpu_device_peak_mb"]["median"] is None
    md = (out / "report.md").read_text()
    assert "ts_abdomen_ct_3mm.nii.gz" in md and "MONAI/PyTorch reference (whole-image-nearest)" in md
    assert "versions:" in md and "CPU:" in md
    if not report["environment"]["gpu"]["available"]:
        assert "n/a" in md
    assert (out / "memory_runtime.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bad_bundle_is_one_line_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--bundle", str(tmp_path / "nope"), "--cases",
                                      str(data_path("ts_abdomen_ct_3mm.nii.gz")), "-o", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("flare-bench: error:") and "bundle" in lines[0]
    assert not (tmp_path / "o" / "report.md").exists()


def test_cli_bad_cases_folder(parity_bundle: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--bundle", str(parity_bundle), "--cases", str(tmp_path / "none"),
                                      "-o", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 2 and "cases folder does not exist" in result.output
    assert not (tmp_path / "o").exists()  # a refused benchmark leaves no output folder


def test_cli_refusals_touch_nothing(parity_bundle: Path, tmp_path: Path) -> None:
    """--runs-log onto a case, a bundle file or a folder, --folds beyond the bundle's, an unknown --proxy: exit 2,
    one line, no output folder, the files as they were."""
    import shutil

    bundle, ct = tmp_path / "bundle", tmp_path / "ct.nii.gz"
    shutil.copytree(parity_bundle, bundle)
    shutil.copy(data_path("ts_abdomen_ct_3mm.nii.gz"), ct)
    before = {p: p.read_bytes() for p in (ct, bundle / "bundle.json")}
    base = ["--bundle", str(bundle), "--cases", str(ct), "-o", str(tmp_path / "o"), "-q", "--repeats", "1",
            "--cold", "0"]
    for extra, words in ((["--runs-log", str(ct)], "is the input"),
                         (["--runs-log", str(bundle / "bundle.json")], "input folder"),
                         (["--runs-log", str(tmp_path)], "existing folder"),
                         (["--folds", "9"], "--folds 9"), (["--proxy", "nope"], "use worst or realistic")):
        result = CliRunner().invoke(app, [*base, *extra])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and words in lines[0], (extra, result.output)
        assert not (tmp_path / "o").exists(), extra
    assert {p: p.read_bytes() for p in before} == before


def test_cli_failed_runs_exit_3(parity_bundle: Path, tmp_path: Path) -> None:
    """A case the runtime refuses: the reports are written with the error, and the exit code says so."""
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not a CT")
    result = CliRunner().invoke(app, ["--bundle", str(parity_bundle), "--cases", str(bad), "-o",
                                      str(tmp_path / "o"), "-q", "--repeats", "1", "--cold", "0", "--no-reference"])
    assert result.exit_code == 3 and "1 run(s) failed, first bad.nii.gz" in result.output, result.output
    assert "## Errors" in (tmp_path / "o" / "report.md").read_text()
