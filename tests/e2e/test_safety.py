"""Untrusted inputs, outputs and bundles (issue 12): never clobber, never explode, never trust a declaration.

Every refused case gives exit code 2 and one line naming the file, no traceback, nothing written; signals clean up
and exit with 128 + signal; the report's RSS peak is the process's own."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_support import RUN, flare_run
from conftest import data_path
from flare.runtime.app.output_guard import check_outputs, same_file
from flare.runtime.bundle.manifest import load_bundle, sha256_file
from flare.runtime.foundation.errors import BundleError, InputError, OutputError
from flare.runtime.pipeline.limits import LimitError, Limits, check_grids, parse_size, pipeline_grids


def error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single error line of a refused run (warnings aside), after checking code and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("flare-run: ") and "warning" not in ln]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    dst = tmp_path / "ct.nii.gz"
    shutil.copy(data_path("ts_abdomen_ct_3mm.nii.gz"), dst)
    return dst


# ------------------------------------------------------------------------------------------------ outputs
def test_check_outputs_collisions(tmp_path: Path) -> None:
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    os.link(ct, tmp_path / "hard.nii.gz")
    (tmp_path / "sym.json").symlink_to(ct)
    cases = {
        "is the input": {"segmentation": tmp_path / "seg.nii.gz", "report": ct},
        "same file as the segmentation": {"segmentation": tmp_path / "seg.nii.gz",
                                          "report": tmp_path / "sub" / ".." / "seg.nii.gz"},
        "existing folder": {"segmentation": tmp_path / "seg.nii.gz", "report": tmp_path / "dir"},
        "is the input ": {"segmentation": tmp_path / "hard.nii.gz"},
        "is the input  ": {"statistics": tmp_path / "sym.json"},
    }
    (tmp_path / "sub").mkdir()
    for words, outputs in cases.items():
        with pytest.raises(OutputError, match=words.strip()) as err:
            check_outputs([ct], outputs)
        assert "\n" not in str(err.value)
    check_outputs([ct], {"segmentation": tmp_path / "seg.nii.gz", "report": tmp_path / "r.json", "preview": None})
    assert same_file(ct, tmp_path / "hard.nii.gz") and not same_file(ct, tmp_path / "r.json")


def test_check_outputs_special_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.json")
    for target in ("/dev/null", tmp_path / "fifo.json"):
        with pytest.raises(OutputError, match="not a regular file"):
            check_outputs([], {"report": target})


def test_check_outputs_input_folder(tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"x")
    with pytest.raises(OutputError, match="input folder"):
        check_outputs([series], {"summary": series / "1.dcm"})
    check_outputs([series], {"summary": series / "new.json"})  # a new file beside the inputs is fine


@pytest.mark.parametrize("which", ["output-is-input", "report-is-statistics", "report-folder", "hard-link",
                                   "symlink"])
def test_cli_refuses_clobbering(tiny_bundle: Path, ct: Path, tmp_path: Path, which: str) -> None:
    seg = tmp_path / "seg.nii.gz"
    before = ct.read_bytes()
    (tmp_path / "dir.json").mkdir()
    os.link(ct, tmp_path / "hard.nii.gz")
    (tmp_path / "sym.json").symlink_to(ct)
    args = {"output-is-input": ["-o", ct],
            "report-is-statistics": ["-o", seg, "--report", tmp_path / "r.json", "--statistics",
                                     tmp_path / "x" / ".." / "r.json"],
            "report-folder": ["-o", seg, "--report", tmp_path / "dir.json"],
            "hard-link": ["-o", tmp_path / "hard.nii.gz"],
            "symlink": ["-o", seg, "--report", tmp_path / "sym.json"]}[which]
    (tmp_path / "x").mkdir()
    line = error_line(flare_run(ct, *args, "--bundle", tiny_bundle, "-q"))
    assert str(tmp_path) in line and ("input" in line or "same file" in line or "folder" in line), line
    assert ct.read_bytes() == before and not seg.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz", "dir.json", "hard.nii.gz", "sym.json", "x"]


@pytest.mark.parametrize("how", ["--bundle", "FLARE_BUNDLE", "--bundle bundle.json"])
def test_cli_refuses_overwriting_a_bundle_file(tiny_bundle: Path, ct: Path, tmp_path: Path, how: str) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "notes.json").write_text("{}")  # a file of the bundle folder the manifest does not name
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    where = {"--bundle": ["--bundle", bundle], "FLARE_BUNDLE": [],
             "--bundle bundle.json": ["--bundle", bundle / "bundle.json"]}[how]
    env = {"FLARE_BUNDLE": str(bundle)} if how == "FLARE_BUNDLE" else None
    for option, target in (("--report", "bundle.json"), ("--statistics", "bundle.json"), ("--report", "notes.json")):
        line = error_line(flare_run(ct, "-o", tmp_path / "seg.nii.gz", option, bundle / target, *where, "-q",
                                    env=env))
        assert str(bundle / target) in line and ("input folder" in line or "is the input" in line), line
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before and not (tmp_path / "seg.nii.gz").exists()


def test_api_refuses_overwriting_its_inputs(tiny_bundle: Path, ct: Path, tmp_path: Path) -> None:
    from flare.runtime import segment

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    before = ct.read_bytes(), (bundle / "bundle.json").read_bytes()
    for output, words in ((ct, "is the input"), (bundle / "bundle.json", "input folder"), (tmp_path, "folder"),
                          (tmp_path / "missing" / "seg.nii.gz", "does not exist")):
        with pytest.raises(OutputError, match=words):
            segment(ct, bundle, output=output, device="cpu")
    assert (ct.read_bytes(), (bundle / "bundle.json").read_bytes()) == before


# ------------------------------------------------------------------------------------------------ limits
def _header_only(path: Path, shape: tuple[int, int, int], zooms: tuple[float, float, float],
                 gz: bool = True) -> Path:
    """A NIfTI whose header claims ``shape``/``zooms`` (qform/sform from pixdim), with all-zero uint8 voxels."""
    img = nib.Nifti1Image(np.zeros(shape, np.uint8), np.diag([*zooms, 1.0]))
    raw = img.header.binaryblock + b"\0" * 4 + np.zeros(shape, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw, 9) if gz else raw)
    return path


def test_150mm_spacing_refused_from_header(tiny_bundle: Path, tmp_path: Path) -> None:
    src = _header_only(tmp_path / "tiny150.nii.gz", (16, 16, 16), (150.0, 150.0, 150.0))
    assert src.stat().st_size < 200
    out = tmp_path / "o.nii.gz"
    line = error_line(flare_run(src, "-o", out, "--bundle", tiny_bundle, "-q"))
    assert str(src) in line and "FLARE_MAX_GRID" in line and "grid" not in line.split(":")[0]
    assert not out.exists()


@pytest.mark.parametrize("spacing", [0.0, float("nan"), float("inf"), -2.0, 1e20, 1e-30])
def test_bad_spacing_one_line(tiny_bundle: Path, tmp_path: Path, spacing: float) -> None:
    src = _header_only(tmp_path / "s.nii", (8, 8, 8), (1.0, 1.0, 1.0), gz=False)
    hdr = nib.Nifti1Header.from_fileobj(open(src, "rb"))  # noqa: SIM115 - closed right below by GC
    hdr["pixdim"][1:4] = spacing
    hdr.set_qform(None, code=0)
    hdr.set_sform(None, code=0)
    src.write_bytes(hdr.binaryblock + src.read_bytes()[348:])
    line = error_line(flare_run(src, "-o", tmp_path / "o.nii.gz", "--bundle", tiny_bundle, "-q"))
    assert str(src) in line


def test_pipeline_grids_and_limits(tiny_bundle: Path) -> None:
    b = load_bundle(tiny_bundle)
    grids = {g.name: g for g in pipeline_grids((512, 512, 300), np.diag([0.8, 0.8, 2.5, 1.0]), 2, False, b)}
    assert grids["crop at the model spacing"].shape == (137, 137, 250)  # 3 mm model spacing of the tiny bundle
    assert grids["ensemble accumulator"].channels == 13
    assert grids["locator grid"].shape == (68, 68, 125)
    check_grids("x.nii", grids.values())
    with pytest.raises(InputError, match="x.nii: the input would be 512x512x300"):
        check_grids("x.nii", grids.values(), Limits(max_grid_voxels=1000))
    with pytest.raises(InputError, match="FLARE_MAX_GRID_BYTES"):
        check_grids("x.nii", grids.values(), Limits(max_grid_bytes=2**20))
    assert parse_size("512M", "X") == 512 * 2**20 and parse_size("2g", "X") == 2 * 2**30
    for bad in ("", "-1", "lots", "1e99"):
        with pytest.raises(LimitError):
            parse_size(bad, "FLARE_MAX_GRID_BYTES")
    assert Limits.from_env({"FLARE_MAX_GRID_VOXELS": "1000"}).max_grid_voxels == 1000


def test_limits_from_env_in_cli(tiny_bundle: Path, ct: Path, tmp_path: Path) -> None:
    line = error_line(flare_run(ct, "-o", tmp_path / "o.nii.gz", "--bundle", tiny_bundle, "-q",
                                env={"FLARE_MAX_GRID_VOXELS": "100000"}))
    assert "FLARE_MAX_GRID_VOXELS" in line and str(ct) in line
    line = error_line(flare_run(ct, "-o", tmp_path / "o.nii.gz", "--bundle", tiny_bundle, "-q",
                                env={"FLARE_MAX_GRID_BYTES": "lots"}))
    assert "FLARE_MAX_GRID_BYTES" in line


def test_tile_count_is_bounded(tiny_bundle: Path, ct: Path, tmp_path: Path) -> None:
    """A tile plan beyond FLARE_MAX_TILES is one line before the inference; the Python API refuses an overlap above
    0.95 as the CLI does."""
    from flare.runtime.pipeline.segmenter import Segmenter

    line = error_line(flare_run(ct, "-o", tmp_path / "o.nii.gz", "--bundle", tiny_bundle, "-q", "--overlap", "0.95",
                                env={"FLARE_MAX_TILES": "50"}))
    assert "FLARE_MAX_TILES" in line and "tiles of" in line, line
    assert not (tmp_path / "o.nii.gz").exists()
    with pytest.raises(BundleError, match="overlap must lie in"):
        Segmenter(tiny_bundle, device="cpu", overlap=0.999)


def test_non_regular_inputs_refused_at_once(tmp_path: Path) -> None:
    from flare.runtime.image.nifti import read_image

    fifo = tmp_path / "fifo.nii.gz"
    os.mkfifo(fifo)  # no writer: opening it would block forever
    sock_path = tmp_path / "s.nii"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    try:
        for path, word in ((fifo, "FIFO"), ("/dev/zero", "character device"), (sock_path, "socket"),
                           (tmp_path, "folder")):
            with pytest.raises(InputError, match=word):
                read_image(path)
    finally:
        sock.close()


def test_fifo_input_cli(tiny_bundle: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "in.nii.gz"
    os.mkfifo(fifo)
    line = error_line(flare_run(fifo, "-o", tmp_path / "o.nii.gz", "--bundle", tiny_bundle, "-q"))
    assert "FIFO" in line


# ------------------------------------------------------------------------------------------------ bundle
def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


def _edit(b: Path, edit) -> None:
    doc = json.loads((b / "bundle.json").read_text())
    text = edit(doc)
    (b / "bundle.json").write_text(text if isinstance(text, str) else json.dumps(doc))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["preprocessing"].update(hu_window=["a", "b"]), "hu_window"),
    (lambda d: d["tiling"].update(overlap="lots"), "tiling.overlap"),
    (lambda d: d.update(tiling=[1, 2]), "field tiling"),
    (lambda d: d["tiling"].update(roi=[64, 64, 17]), "not divisible"),
    (lambda d: d["tiling"].update(roi=[64.0, 64, 64]), "tiling.roi"),
    (lambda d: json.dumps(d).replace('"format_version": 1', '"format_version": 1.0'), "format_version 1.0"),
    (lambda d: d.update(format_version=True), "format_version true"),
    (lambda d: "[" * 100_000 + "]" * 100_000, "levels deep"),
    (lambda d: json.dumps(d).replace('"overlap": 0.0', '"overlap": NaN'), "NaN"),
    (lambda d: d["folds"][0].update(out_channels=14), "out_channels"),
    (lambda d: d["folds"][0]["files"]["fp32"].update(sha256="x"), "sha256"),
    (lambda d: d["preprocessing"].update(hu_window=[250, -250]), "low < high"),
    (lambda d: d.update(labels={"labels": [1, 2]}), "labels"),
    (lambda d: " " * (5 * 2**20), "more than the limit"),
])
def test_bundle_schema(tiny_bundle: Path, tmp_path: Path, edit, message: str) -> None:
    b = _copy(tiny_bundle, tmp_path)
    _edit(b, edit)
    with pytest.raises(BundleError, match=message) as err:
        load_bundle(b)
    assert "\n" not in str(err.value) and "bundle.json" in str(err.value)


def test_schema_shipped_as_package_data() -> None:
    from flare.runtime.bundle.manifest import SCHEMA_FILE

    root = Path(__file__).resolve().parents[2]
    assert SCHEMA_FILE.is_file()
    assert '"flare.runtime.bundle" = ["*.schema.json"]' in (root / "pyproject.toml").read_text()


@pytest.mark.parametrize("case", ["locator-as-fold", "input-name", "output-name", "locator-channels", "divisor"])
def test_model_contract(tiny_bundle: Path, tmp_path: Path, case: str) -> None:
    """The declaration is compared with the real model when an engine is created (CLI: exit 2, one line)."""
    b = _copy(tiny_bundle, tmp_path)
    if case == "locator-as-fold":
        shutil.copy(b / "locator.fp32.onnx", b / "fold0.fp32.onnx")
        _edit(b, lambda d: d["folds"][0]["files"]["fp32"].update(sha256=sha256_file(b / "fold0.fp32.onnx")))
    else:
        _edit(b, {"input-name": lambda d: d["folds"][1]["files"]["fp32"].update(input_name="img"),
                  "output-name": lambda d: d["folds"][0]["files"]["fp32"].update(output_name="out"),
                  "locator-channels": lambda d: d["locator"].update(out_channels=3),
                  "divisor": lambda d: d["folds"][0].update(spatial_divisor=8)}[case])
    words = {"locator-as-fold": ("fold0.fp32.onnx", "1 channels", "13"), "input-name": ("fold1.fp32.onnx", "'img'"),
             "output-name": ("fold0.fp32.onnx", "'out'"), "locator-channels": ("locator.fp32.onnx", "3"),
             "divisor": ("fold0.fp32.onnx", "8x8x8")}[case]
    out = tmp_path / "o.nii.gz"
    line = error_line(flare_run(data_path("ts_abdomen_ct_3mm.nii.gz"), "-o", out, "--bundle", b, "-q"))
    assert all(w in line for w in words), line
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ measurements
def test_report_rss_is_the_childs_own_peak(tiny_bundle: Path, ct: Path, tmp_path: Path) -> None:
    """A parent at ~1 GiB runs flare-run: ru_maxrss would carry the parent's peak over, VmHWM does not."""
    rep = tmp_path / "r.json"
    script = ("import subprocess, sys\n"
              "big = bytearray(1024**3)\n"
              "big[::4096] = b'\\x01' * len(big[::4096])  # touch every page: the parent's peak is ~1 GiB\n"
              "sys.exit(subprocess.run(sys.argv[1:]).returncode)\n")
    cmd = [*RUN, str(ct), "-o", str(tmp_path / "o.nii.gz"), "--bundle", str(tiny_bundle), "-q", "--report", str(rep)]
    proc = subprocess.run([sys.executable, "-c", script, *cmd], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    peak = json.loads(rep.read_text())["rss_peak_mb"]
    assert 20 < peak < 900, peak


# ------------------------------------------------------------------------------------------------ signals / stderr
@pytest.mark.parametrize("point", ["before-rename", "stage:infer", "write:labels"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_cleans_up(tiny_bundle: Path, ct: Path, tmp_path: Path, point: str, sig: int) -> None:
    """The run pauses at a test hook (after writing a marker file), the signal arrives there: no output, no temp
    file, exit 128 + signal (130 for SIGINT), one line. At ``write:labels`` the label map is already written and the
    masks, statistics and report are not: all or nothing, the label map goes too."""
    import time

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    marker = tmp_path / "marker"
    env = {**os.environ, "FLARE_BUNDLE": str(tiny_bundle), "FLARE_TEST_PAUSE_AT": point,
           "FLARE_TEST_PAUSE_MARKER": str(marker)}
    # SIGINT at its default in the child: a test run started in the background by a non-interactive shell (as `cmd &`)
    # inherits SIGINT ignored, and Python then keeps it ignored (as a background job should), so nothing would arrive
    proc = subprocess.Popen([*RUN, str(ct), "-o", str(out_dir / "seg.nii.gz"), "-q", "--statistics", "--report",
                             str(out_dir / "r.json"), "--masks", str(out_dir / "m")], env=env,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509 (only resets one signal)
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    line = error_line(done, 128 + sig)
    assert ("interrupted" if sig == signal.SIGINT else signal.Signals(sig).name) in line
    assert list(out_dir.iterdir()) == []


def test_closed_stderr_is_not_a_failure(tiny_bundle: Path, ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.nii.gz"
    read, write = os.pipe()
    os.close(read)  # stderr is a pipe nobody reads: every write raises EPIPE
    try:
        proc = subprocess.run([*RUN, str(ct), "-o", str(out), "--bundle", str(tiny_bundle)], stderr=write,
                              stdout=subprocess.DEVNULL, timeout=300, check=False)
    finally:
        os.close(write)
    assert proc.returncode == 0 and out.is_file()
    out.unlink()
    proc = subprocess.run(" ".join([*RUN, str(ct), "-o", str(out), "--bundle", str(tiny_bundle), "2>&-"]),
                          shell=True, timeout=300, check=False)
    assert proc.returncode == 0 and out.is_file()


def test_atomic_helpers(tmp_path: Path) -> None:
    from flare.runtime.foundation.atomic import atomic_open, write_bytes_atomic, write_text_atomic, write_with

    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "a.txt", "héllo\n")
    write_with(tmp_path / "a.png", lambda p: p.write_bytes(b"png"))
    with atomic_open(tmp_path / "a.json") as f:
        f.write("{}")
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "b.json") as f:
        f.write("partial")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.json", "a.png", "a.txt"]
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"


# ------------------------------------------------------------------------------------------------ found by Hypothesis
# (the cc3d failure on thin masks it also found is covered by tests/runtime/ops/test_components.py)
def test_invalid_xform_codes_refused(tmp_path: Path) -> None:
    """nibabel rewrites an invalid sform_code to 0 on writing, which would move the output: refuse it on reading."""
    from flare.runtime.image.nifti import read_image

    for key, code in (("sform_code", -1), ("qform_code", 7)):
        img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
        img.header[key] = code
        path = tmp_path / f"{key}.nii"
        path.write_bytes(img.header.binaryblock + b"\0" * 4 + np.zeros(64, np.int16).tobytes())
        with pytest.raises(InputError, match=f"invalid {key} {code}"):
            read_image(path)
