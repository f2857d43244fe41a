"""benchmarks/gpu_check.sh and its Python steps: a check that cannot come back empty or green when it failed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
MAX_OUT_FILES = 8  # the device returns at most 8 files


def test_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_out_gets_at_most_eight_files_and_no_folders() -> None:
    text = SCRIPT.read_text()
    names = set(re.findall(r'\$OUT/([A-Za-z0-9_.${}-]+)', text))
    names |= {"gpu_check.log", "results.jsonl"}  # written through $LOG and $RESULTS
    names.discard("$2")  # bench_one's report name: the two literal names below
    assert {"bench-report.json", "bench-worst-report.json"} <= set(re.findall(r"bench_one \S+ (\S+)", text))
    names |= set(re.findall(r"bench_one \S+ (\S+\.json)", text))
    assert all("/" not in n and "$" not in n for n in names), names
    assert len(names) <= MAX_OUT_FILES, sorted(names)


def test_no_pipe_hides_an_exit_code() -> None:
    code = "\n".join(ln.split("#", 1)[0] for ln in SCRIPT.read_text().splitlines())
    assert not re.search(r"\|\s*(cat|tee)\b", code), "a pipe into cat/tee returns cat's exit code, not the stage's"
    assert "set -uo pipefail" in code


def _stage_table(tmp_path: Path, body: str) -> list[list[str]]:
    out = tmp_path / "out"
    subprocess.run(["bash", "-c", f"source '{SCRIPT}' --lib && {body}"], check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "OUT": str(out), "FLARE_GPU_WORK": str(tmp_path / "w"),
                        "GPU_CHECK_DRY_RUN": "1"})
    return [ln.split("\t") for ln in (out / "stages.tsv").read_text().splitlines()]


def test_a_failed_gate_skips_the_rest_and_exit_codes_are_real(tmp_path: Path) -> None:
    rows = _stage_table(tmp_path, "stage a 5 'exit 3'; stage b 5 'false' gate; stage c 5 true; stage d 5 true")
    assert [r[:2] for r in rows] == [["a", "3"], ["b", "1"], ["c", "skipped (b failed (rc 1))"],
                                     ["d", "skipped (b failed (rc 1))"]]


def _step(*args: str) -> tuple[int, list[dict]]:
    proc = subprocess.run([sys.executable, "-m", "flare.benchmarks.gpu_check", *args, "--device", "cpu"],
                          check=False, capture_output=True, text=True)
    return proc.returncode, [json.loads(ln) for ln in proc.stdout.splitlines()]


def test_setup_imports_every_runtime_module() -> None:
    rc, lines = _step("setup")
    assert rc == 0 and lines[0]["ok"] and lines[0]["failed"] == {}
    assert lines[0]["runtime_modules"] >= 30


def test_smoke_runs_one_fp16_tile() -> None:
    rc, lines = _step("smoke", "--side", "32")
    assert rc == 0, lines
    rec = lines[0]
    assert rec["ok"] and rec["finite"] and rec["argmax_agreement"] > 0.99 and rec["tile"] == [32, 32, 32]
    assert set(rec["nvml_used_mb"]) == {"before", "after_session", "after_tile"}


def test_a_failing_step_says_so_in_json_and_exit_code(tmp_path: Path) -> None:
    rc, lines = _step("bundle", "--bundle", str(tmp_path / "missing"))
    assert rc == 1 and lines[-1]["stage"] == "bundle" and lines[-1]["ok"] is False and "missing" in lines[-1]["error"]


def test_budget_step_records_which_design_ran(tiny_bundle: Path) -> None:
    from conftest import data_path

    rc, lines = _step("budget", "--bundle", str(tiny_bundle), "--case", str(data_path("ts_abdomen_ct_3mm.nii.gz")),
                      "--budget", "2000", "--runs", "1")
    assert rc == 0, lines
    design = lines[0]["design"]
    assert design["name"] == "resident" and design["groups"] == [[0, 1]] and "CPU" in design["why"]
