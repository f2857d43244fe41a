"""flare-run on several cases (the real console entry, the tiny real bundle, real CTs): one bad case among good ones,
outputs identical to single runs, summary.json, exit codes; statistics, preview and the report on the written grid;
the read-ahead of the next case while the current one is segmented."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_support import assert_clean_failure, flare_run
from conftest import data_path

ABDOMEN, BODY = "ts_abdomen_ct_3mm.nii.gz", "ts_body_ct_3mm_int32.nii.gz"


def _labels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def cases_folder(tmp_path_factory) -> Path:
    """cases/a_abdomen.nii.gz, cases/b_corrupt.nii.gz (truncated gzip), cases/sub/c_body.nii.gz (links, not copies)."""
    root = tmp_path_factory.mktemp("cases")
    (root / "sub").mkdir()
    (root / "a_abdomen.nii.gz").symlink_to(data_path(ABDOMEN))
    raw = data_path(ABDOMEN).read_bytes()
    (root / "b_corrupt.nii.gz").write_bytes(raw[: len(raw) // 2])
    (root / "sub" / "c_body.nii.gz").symlink_to(data_path(BODY))
    (root / "notes.txt").write_text("not an image\n")  # ignored (not NIfTI; not DICOM)
    return root


def test_folder_with_a_corrupt_case(cases_folder: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "segs"
    proc = flare_run(cases_folder, "-o", out, "--bundle", tiny_bundle, "--device", "cpu", "-q",
                     "--statistics", out, "--preview", out)
    assert proc.returncode == 3, proc.stderr
    assert "b_corrupt" in proc.stderr and "Traceback" not in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    status = {c["name"]: c for c in summary["cases"]}
    assert [c["name"] for c in summary["cases"]] == ["a_abdomen", "b_corrupt", "c_body"]
    assert status["a_abdomen"]["status"] == status["c_body"]["status"] == "ok"
    assert status["b_corrupt"]["status"] == "failed" and "b_corrupt.nii.gz" in status["b_corrupt"]["error"]
    assert summary["ok"] == 2 and summary["failed"] == 1 and summary["pending"] == 0
    assert all(c["seconds"] > 0 for c in summary["cases"] if c["status"] == "ok")
    assert sorted(p.name for p in out.iterdir()) == [
        "a_abdomen.nii.gz", "a_abdomen_preview.png", "a_abdomen_stats.json", "c_body.nii.gz", "c_body_preview.png",
        "c_body_stats.json", "summary.json"]
    # identical to single runs
    for name, src in (("a_abdomen", ABDOMEN), ("c_body", BODY)):
        single = tmp_path / f"{name}_single.nii.gz"
        proc1 = flare_run(data_path(src), "-o", single, "--bundle", tiny_bundle, "--device", "cpu", "-q")
        assert proc1.returncode == 0, proc1.stderr
        np.testing.assert_array_equal(_labels(out / f"{name}.nii.gz"), _labels(single))
        np.testing.assert_allclose(nib.load(out / f"{name}.nii.gz").affine, nib.load(src_path := data_path(src)).affine)
        assert nib.load(out / f"{name}.nii.gz").shape == nib.load(src_path).shape


def test_several_inputs_and_name_collisions(tiny_bundle: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "ct.nii.gz").symlink_to(data_path(ABDOMEN))
    (b / "ct.nii.gz").symlink_to(data_path(ABDOMEN))
    out = tmp_path / "out"
    proc = flare_run(a / "ct.nii.gz", b / "ct.nii.gz", "-o", out, "--bundle", tiny_bundle, "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ct.nii.gz", "ct_2.nii.gz", "summary.json"]
    np.testing.assert_array_equal(_labels(out / "ct.nii.gz"), _labels(out / "ct_2.nii.gz"))


def test_nothing_could_start(cases_folder: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "segs"
    assert_clean_failure(flare_run(cases_folder, "-o", out, "--bundle", tmp_path / "nobundle", "-q"),
                         "nobundle", "does not exist")
    assert not out.exists()
    assert_clean_failure(flare_run(cases_folder, "--bundle", tiny_bundle, "-q"), "cases found", "-o")
    afile = tmp_path / "afile.nii.gz"
    afile.write_bytes(b"x")
    assert_clean_failure(flare_run(cases_folder, "-o", afile, "--bundle", tiny_bundle, "-q"), "afile", "folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_failure(flare_run(empty, "-o", out, "--bundle", tiny_bundle, "-q"), "empty", "folder")
    assert_clean_failure(flare_run(cases_folder, "-o", out, "--bundle", tiny_bundle, "--format", "dicom-seg", "-q"),
                         "a_abdomen.nii.gz", "dicom-seg")
    assert not out.exists()


def test_dicom_seg_output_needs_dicom_input(tiny_bundle: Path, tmp_path: Path) -> None:
    proc = flare_run(data_path(ABDOMEN), "-o", tmp_path / "seg.dcm", "--bundle", tiny_bundle, "-q")
    assert_clean_failure(proc, "seg.dcm", "DICOM")
    assert not list(tmp_path.iterdir())


def test_output_onto_an_input_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cts"
    folder.mkdir()
    (folder / "x.nii.gz").symlink_to(data_path(ABDOMEN))
    assert_clean_failure(flare_run(folder, "-o", folder, "--bundle", tiny_bundle, "-q"), "x.nii.gz", "input")
    assert sorted(p.name for p in folder.iterdir()) == ["x.nii.gz"]


def test_statistics_preview_and_report_single(tiny_bundle: Path, tmp_path: Path) -> None:
    ct = data_path("ts_torso_ct_1p5mm_lps.nii.gz")
    out, stats, png, rep = (tmp_path / n for n in ("seg.nii.gz", "stats.json", "preview.png", "report.json"))
    proc = flare_run(ct, "-o", out, "--bundle", tiny_bundle, "--device", "cpu", "-q", "--statistics", stats,
                     "--preview", png, "--report", rep)
    assert proc.returncode == 0, proc.stderr
    seg, img = nib.load(out), nib.load(ct)
    labels, hu = np.asarray(seg.dataobj), np.asarray(img.get_fdata(dtype=np.float64))
    voxel_ml = abs(np.linalg.det(seg.affine[:3, :3])) / 1000.0
    doc = json.loads(stats.read_text())
    report = json.loads(rep.read_text())
    counts = np.bincount(labels.ravel(), minlength=15)
    assert counts[1:].sum() > 0  # the tiny random bundle labels something
    for entry in doc["labels"].values():
        n = int(counts[entry["id"]])
        assert entry["voxels"] == n
        assert entry["volume_ml"] == pytest.approx(n * voxel_ml, rel=0.01, abs=1e-3)
        if n:
            inside = hu[labels == entry["id"]]
            assert entry["hu_mean"] == pytest.approx(inside.mean(), abs=0.01)
            assert entry["hu_std"] == pytest.approx(inside.std(), abs=0.01)
            assert report["voxels"][str(entry["id"])] == n  # the report counts the written grid too
            assert report["volume_ml"][str(entry["id"])] == pytest.approx(n * voxel_ml, rel=0.01)
        else:
            assert entry["hu_mean"] is None and str(entry["id"]) not in report["voxels"]
    assert doc["tumors"]["count"] == len(doc["tumors"]["volumes_ml"])
    from PIL import Image

    with Image.open(png) as im:
        im.load()
        assert im.format == "PNG" and min(im.size) >= 512
    import matplotlib.image as mpimg

    assert mpimg.imread(png).shape[0] >= 512
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.png", "report.json", "seg.nii.gz", "stats.json"]


def test_tumor_count_and_volumes() -> None:
    from flare.runtime.ops.stats import label_statistics

    labels = np.zeros((20, 20, 20), np.uint8)
    labels[1:3, 1:3, 1:3] = 14  # 8 voxels
    labels[10:13, 10:13, 10:13] = 14  # 27 voxels
    labels[5:7, 15:17, 2:4] = 1
    ct = np.full(labels.shape, -1000, np.int16)
    ct[labels == 14] = 50
    affine = np.diag([2.0, 2.0, 0.5, 1.0])  # 2 mm³ voxels
    doc = label_statistics(labels, ct, affine)
    assert doc["tumors"] == {"count": 2, "volumes_ml": [0.054, 0.016]}
    assert doc["labels"]["tumor"]["hu_mean"] == 50 and doc["labels"]["tumor"]["hu_std"] == 0
    assert doc["labels"]["liver"]["volume_ml"] == pytest.approx(8 * 0.002)
    assert doc["labels"]["spleen"] == {"id": 3, "voxels": 0, "volume_ml": 0.0, "hu_mean": None, "hu_std": None}


def test_next_case_is_read_while_the_current_one_is_segmented(tiny_bundle: Path, tmp_path: Path) -> None:
    """Case 2's read must start before case 1 leaves inference: case 1's postprocess stage waits for it."""
    from flare.runtime.app.batch import run_plan
    from flare.runtime.app.plan import Case, make_plan
    from flare.runtime.pipeline.segmenter import Segmenter, StageHooks

    second_read = threading.Event()

    class RecordingCase(Case):
        def read(self, preflight=None):  # type: ignore[no-untyped-def]
            if self.name == "two":
                second_read.set()
            return super().read(preflight)

    (tmp_path / "one.nii.gz").symlink_to(data_path(ABDOMEN))
    (tmp_path / "two.nii.gz").symlink_to(data_path(ABDOMEN))
    plan = make_plan([tmp_path / "one.nii.gz", tmp_path / "two.nii.gz"], output=tmp_path / "out")
    plan.jobs = [type(j)(RecordingCase(**vars(j.case)), j.output) for j in plan.jobs]
    plan.create_folders()
    seen: list[bool] = []

    def hooks_for(job):  # type: ignore[no-untyped-def]
        def start(stage: str) -> None:
            if job.case.name == "one" and stage == "postprocess":
                seen.append(second_read.wait(timeout=120))

        return StageHooks(stage_start=start)

    results = run_plan(plan, Segmenter(tiny_bundle, device="cpu"), hooks_for=hooks_for)
    assert [r.status for r in results] == ["ok", "ok"], results
    assert seen == [True]


# ------------------------------------------------------------------------------------------------ DICOM inputs
@pytest.fixture(scope="module")
def dicom_study(tmp_path_factory) -> tuple[Path, str]:
    """study/ct/: the 3 mm abdomen CT as a shuffled DICOM series (pydicom); returns (study folder, series UID)."""
    pytest.importorskip("pydicom")
    from dicom_series import write_ct_series
    from pydicom import dcmread

    img = nib.load(data_path(ABDOMEN))
    study = tmp_path_factory.mktemp("study")
    files = write_ct_series(study / "ct", np.asarray(img.dataobj), img.affine, rng=np.random.default_rng(3))
    return study, str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def test_dicom_series_in_nifti_and_dicom_seg_out(dicom_study: tuple[Path, str], tiny_bundle: Path,
                                                 tmp_path: Path) -> None:
    study, uid = dicom_study
    ref = tmp_path / "ref.nii.gz"
    assert flare_run(data_path(ABDOMEN), "-o", ref, "--bundle", tiny_bundle, "--device", "cpu", "-q").returncode == 0
    out = tmp_path / "seg.nii.gz"
    proc = flare_run(study, "-o", out, "--bundle", tiny_bundle, "--device", "cpu", "-q")  # a folder of one series
    assert proc.returncode == 0, proc.stderr
    # the DICOM grid runs along the slice normal (here z is flipped against the NIfTI's): compare in RAS. Left/right
    # sides are compared merged: the tiny random bundle's components straddle the midline, where the side decision
    # flips on the 1e-8 mm affine differences between DICOM's decimal strings and the NIfTI header
    from flare.runtime.foundation.labels import merge_left_right

    got, want = nib.as_closest_canonical(nib.load(out)), nib.as_closest_canonical(nib.load(ref))
    assert np.mean(merge_left_right(np.asarray(got.dataobj)) == merge_left_right(np.asarray(want.dataobj))) >= 0.999
    np.testing.assert_allclose(got.affine, want.affine, atol=1e-3)
    seg_path = tmp_path / "seg.dcm"
    stats = tmp_path / "stats.json"
    proc = flare_run(study / "ct", "-o", seg_path, "--bundle", tiny_bundle, "--device", "cpu", "-q",
                     "--statistics", stats)
    assert proc.returncode == 0, proc.stderr
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    refs = {str(s.SeriesInstanceUID) for s in seg.ReferencedSeriesSequence}
    assert refs == {uid}
    present = {e["id"] for e in json.loads(stats.read_text())["labels"].values() if e["voxels"]}
    assert len(seg.SegmentSequence) == len(present)


def test_dicom_default_output_and_series_pick(dicom_study: tuple[Path, str], tiny_bundle: Path,
                                              tmp_path: Path) -> None:
    study, uid = dicom_study
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copytree(study / "ct", mixed / "ct")  # folder links are not followed (as os.walk)
    (mixed / "nifti.nii.gz").symlink_to(data_path(ABDOMEN))
    out = tmp_path / "out"
    proc = flare_run(mixed, "-o", out, "--bundle", tiny_bundle, "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ct.nii.gz", "nifti.nii.gz", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["cases"][1]["series_uid"] == uid
    # --series picks the one DICOM series: one image, -o is a file
    picked = tmp_path / "picked.nii.gz"
    proc = flare_run(mixed, "--series", uid, "-o", picked, "--bundle", tiny_bundle, "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(_labels(picked), _labels(out / "ct.nii.gz"))
    assert_clean_failure(flare_run(mixed, "--series", "1.2.3", "-o", picked, "--bundle", tiny_bundle, "-q"),
                         "1.2.3", "no DICOM series")
    # default output of a DICOM folder: FOLDER_seg.nii.gz beside it
    proc = flare_run(mixed / "ct", "--bundle", tiny_bundle, "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (mixed / "ct_seg.nii.gz").is_file()
    (mixed / "ct_seg.nii.gz").unlink()
    one_file = min((mixed / "ct").iterdir())  # one .dcm file stands for its series; output beside the series
    proc = flare_run(one_file, "--bundle", tiny_bundle, "--device", "cpu", "-q")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(_labels(mixed / "ct_seg.nii.gz"), _labels(out / "ct.nii.gz"))


# ------------------------------------------------------------------------------------------------ planning
def test_plan_names_and_paths(tmp_path: Path) -> None:
    from flare.runtime.app.plan import OutputFormat, make_plan
    from flare.runtime.foundation.errors import OutputError

    root = tmp_path / "cts"
    for rel in ("p1/ct.nii.gz", "p2/ct.nii.gz", "solo.nii", "Solo.nii.gz", ".hidden/x.nii.gz"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    out = root / "segs"  # inside the input folder: not searched
    (out / "old").mkdir(parents=True)
    (out / "old" / "y.nii.gz").write_bytes(b"")
    plan = make_plan([root], output=out, statistics=out, report=tmp_path / "reports")
    names = [j.case.name for j in plan.jobs]
    assert names == ["Solo", "solo_2", "p1_ct", "p2_ct"]  # files of a folder before its subfolders
    assert plan.folder_mode and plan.fmt is OutputFormat.nifti and plan.summary_path == out / "summary.json"
    assert plan.jobs[2].output == out / "p1_ct.nii.gz" and plan.jobs[2].statistics == out / "p1_ct_stats.json"
    assert plan.jobs[1].report == tmp_path / "reports" / "solo_2_report.json"
    assert plan.folders == [tmp_path / "reports"]  # out exists; reports is created before the first case
    assert not (tmp_path / "reports").exists()
    single = make_plan([root / "solo.nii"], output=None)  # one file: -o defaults beside it
    assert not single.folder_mode and single.jobs[0].output == root / "solo_seg.nii.gz"
    with pytest.raises(OutputError, match="same file"):
        make_plan([root / "solo.nii"], output=tmp_path / "x.nii.gz", statistics=tmp_path / "r.json",
                  report=tmp_path / "r.json")
    with pytest.raises(OutputError, match="must end in .png"):
        make_plan([root / "solo.nii"], output=tmp_path / "x.nii.gz", preview=tmp_path / "p.jpg")
    with pytest.raises(OutputError, match="must be a folder"):
        make_plan([root / "solo.nii", root / "p1"], output=tmp_path / "x.nii.gz")
    with pytest.raises(OutputError, match="must be a folder"):
        make_plan([root], output=out, statistics=tmp_path / "s.json")
    with pytest.raises(OutputError, match="does not match"):
        make_plan([root / "solo.nii"], output=tmp_path / "x.nii.gz", fmt=OutputFormat.dicom_seg)


def test_many_quick_failures_write_the_summary_a_few_times(tiny_bundle: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """400 junk files: every one recorded, summary.json written a few times (not once per case: that made a
    batch quadratic, 36 s for 2,000 junk files), the closing line short."""
    from flare.runtime.app.batch import run_plan
    from flare.runtime.app.plan import make_plan
    from flare.runtime.foundation import atomic
    from flare.runtime.pipeline.segmenter import Segmenter

    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(400):
        (junk / f"j{i:03d}.nii.gz").write_bytes(b"\x1f\x8b not a NIfTI " + bytes([i % 256]))
    writes: list[str] = []
    real = atomic.write_text_atomic
    monkeypatch.setattr(atomic, "write_text_atomic", lambda p, text: (writes.append(str(p)), real(p, text))[1])
    plan = make_plan([junk], output=tmp_path / "out")
    plan.create_folders()
    results = run_plan(plan, Segmenter(tiny_bundle, device="cpu"))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(results) == 400 and summary["failed"] == 400 and summary["pending"] == 0
    assert 1 <= writes.count(str(tmp_path / "out" / "summary.json")) <= 20
    proc = flare_run(junk, "-o", tmp_path / "out2", "--bundle", tiny_bundle, "--device", "cpu", "-q")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 3 and last.startswith("flare-run: 400 case(s) failed: j000, ") and "390 more" in last


def test_an_interrupt_wrapped_by_a_library_still_interrupts(tmp_path: Path) -> None:
    """Ctrl-C during a lazy import surfaces as RuntimeError('Error calling __set_name__ …') from KeyboardInterrupt:
    the run stops as interrupted (exit 130), it is not recorded as a failed case (it was: exit 2)."""
    from flare.runtime.app.batch import _run_job
    from flare.runtime.app.plan import make_plan

    plan = make_plan([data_path(ABDOMEN)], output=tmp_path / "seg.nii.gz")

    def loaded():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ctrl_c:
            raise RuntimeError("Error calling __set_name__ on 'x'") from ctrl_c

    with pytest.raises(KeyboardInterrupt):
        _run_job(None, plan, plan.jobs[0], loaded, None)  # type: ignore[arg-type]

    def broken():
        raise ValueError("a real failure")

    assert _run_job(None, plan, plan.jobs[0], broken, None).status == "failed"  # type: ignore[arg-type]
