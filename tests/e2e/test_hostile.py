"""Untrusted inputs, round 3 (issue 18): batch folders, DICOM, bundles' external data, full disks, signals.

Every hostile case either gives one line naming the file (exit 2, or 3 in a batch) with nothing left behind and
the process's peak RSS (``VmHWM``, measured in the subprocess itself) under 1 GB, or — for well-formed but unusual
inputs (intercept without slope, series without type-2 attributes) — the right output."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from cli_support import flare_run
from conftest import data_path
from dicom_series import write_ct_series

pydicom = pytest.importorskip("pydicom")

RSS_LIMIT_MB = 1024.0
MEASURED = """
import atexit, sys
PEAK = sys.argv[1]
def _peak():
    with open('/proc/self/status') as f:
        hwm = [l for l in f if l.startswith('VmHWM:')][0].split()[1]
    open(PEAK, 'w').write(hwm)
atexit.register(_peak)
sys.argv = ['flare-run'] + sys.argv[2:]
from flare.runtime.app.cli import main
main()
"""


def measured_run(tmp_path: Path, *args: str | Path, env: dict | None = None,
                 **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    """flare-run in a subprocess that records its own peak RSS (MB) at exit."""
    peak = tmp_path / f"peak-{len(list(tmp_path.glob('peak-*')))}.txt"
    full_env = {**os.environ, "FLARE_BUNDLE": "/nonexistent-default-bundle", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", MEASURED, str(peak), *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=300, check=False, **kwargs)
    return proc, int(peak.read_text()) / 1024.0 if peak.exists() else float("nan")


def one_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "site-packages" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def header_bomb(path: Path, shape: tuple[int, int, int], zooms: tuple[float, float, float]) -> Path:
    """A gzip'ed NIfTI whose header declares ``shape`` (uint8 zeros, compressed as far as deflate goes)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.uint8)
    hdr.set_zooms(zooms)
    hdr.set_sform(np.diag([*zooms, 1.0]), code="aligned")
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [comp.compress(hdr.binaryblock + b"\0" * 4)]
    zeros = bytes(2**24)
    left = int(np.prod(shape))
    while left > 0:
        parts.append(comp.compress(zeros[: min(left, len(zeros))]))
        left -= len(zeros)
    parts.append(comp.flush())
    path.write_bytes(b"".join(parts))
    return path


@pytest.fixture
def ct(tmp_path: Path) -> Path:
    dst = tmp_path / "cases" / "ct.nii.gz"
    dst.parent.mkdir()
    shutil.copy(data_path("ts_abdomen_ct_3mm.nii.gz"), dst)
    return dst


def small_series(folder: Path, *, rng: np.random.Generator, n: int = 6) -> list[Path]:
    img = nib.load(data_path("ts_abdomen_ct_3mm.nii.gz"))
    data = np.asarray(img.dataobj)[30:70, 30:70, :n].astype(np.float32)
    return write_ct_series(folder, data, img.affine, rng=rng)


def edit(files: list[Path], **values: object) -> None:
    """Set (value) or delete (None) header elements of every file."""
    for f in files:
        ds = pydicom.dcmread(f)
        for keyword, value in values.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(f)


# ------------------------------------------------------------------------------------------------ folders
def test_fifos_and_flare_outputs_in_case_folders(tiny_bundle: Path, ct: Path, tmp_path: Path, rng) -> None:
    """Row 1 and 'also seen': FIFOs (in a case folder and in a DICOM folder) are never opened; a label map flare
    wrote beside the input is skipped with a note instead of being segmented as a CT."""
    folder = ct.parent
    os.mkfifo(folder / "notes")
    small_series(folder / "series", rng=rng)
    os.mkfifo(folder / "series" / "pipe")
    single = flare_run(ct, "-o", folder / "ct_seg.nii.gz", "--bundle", tiny_bundle, "-q")
    assert single.returncode == 0, single.stderr
    proc, peak = measured_run(tmp_path, folder, "-o", tmp_path / "out", "--bundle", tiny_bundle)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(c["name"] for c in summary["cases"]) == ["ct", "series"], summary
    assert "notes" in proc.stderr and "FIFO" in proc.stderr and "ct_seg.nii.gz" in proc.stderr, proc.stderr
    assert peak < RSS_LIMIT_MB


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_unreadable_subfolder_is_a_failed_case(tmp_path: Path) -> None:
    """Row 13: a folder the process cannot read is reported as a failed case, not skipped. Root reads everything,
    so the search runs without the capabilities that bypass file permissions (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) on a folder owned by ``nobody`` with mode 0700."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(data_path("ts_abdomen_ct_3mm.nii.gz"), tmp_path / name / f"{name}.nii.gz")
    os.chown(tmp_path / "b", 65534, 65534)
    os.chmod(tmp_path / "b", 0o700)
    code = ("import json\nfrom pathlib import Path\nfrom flare.runtime.app.plan import discover\n"
            f"cases, _, skipped = discover([Path({str(tmp_path)!r})])\n"
            "print(json.dumps([[c.name, c.kind, c.error] for c in cases]))")
    proc = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    cases = json.loads(proc.stdout)
    assert [c[:2] for c in cases] == [["a", "nifti"], ["b", "unreadable"]], cases
    assert "Permission denied" in cases[1][2] and str(tmp_path / "b") in cases[1][2]


def test_header_bomb_between_good_cases_is_refused_before_reading(tiny_bundle: Path, ct: Path,
                                                                   tmp_path: Path) -> None:
    """Row 3: a 1 MB .nii.gz declaring 1024x1024x1000 in a batch folder goes through the header preflight."""
    header_bomb(ct.parent / "bomb.nii.gz", (1024, 1024, 1000), (0.8, 0.8, 0.8))
    shutil.copy(ct, ct.parent / "zz.nii.gz")
    proc, peak = measured_run(tmp_path, ct.parent, "-o", tmp_path / "out", "--bundle", tiny_bundle, "-q")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {c["name"]: (c["status"], c["error"]) for c in summary["cases"]}
    assert status["ct"][0] == status["zz"][0] == "ok"
    assert status["bomb"][0] == "failed" and "bomb.nii.gz" in status["bomb"][1], status
    assert not (tmp_path / "out" / "bomb.nii.gz").exists()
    assert peak < RSS_LIMIT_MB, peak


@pytest.mark.parametrize("shape,zooms,words", [((800, 800, 800), (0.1, 0.1, 0.1), "voxels per byte"),
                                               ((16, 16, 16), (150.0, 150.0, 150.0), "mm per axis")])
def test_tiny_file_cannot_buy_minutes_of_work(tiny_bundle: Path, tmp_path: Path, shape, zooms, words) -> None:
    """Rows 7 and 15: a 0.5 MB 800³ image and a 2.4 m cube are refused from the header, whatever the bundle grid."""
    src = header_bomb(tmp_path / "small.nii.gz", shape, zooms)
    env = {"FLARE_MAX_GRID_VOXELS": "100G", "FLARE_MAX_GRID_BYTES": "1T"}  # only the new bounds can refuse
    proc, peak = measured_run(tmp_path, src, "-o", tmp_path / "o.nii.gz", "--bundle", tiny_bundle, "-q", env=env)
    line = one_error(proc, 2)
    assert "small.nii.gz" in line and words in line, line
    assert not (tmp_path / "o.nii.gz").exists() and peak < RSS_LIMIT_MB


# ------------------------------------------------------------------------------------------------ DICOM
def test_intercept_without_slope_gives_hounsfield_units(tmp_path: Path, rng) -> None:
    """Row 8: RescaleIntercept -1024 without RescaleSlope: slope 1 (the voxels are HU, not 1024 too high)."""
    from flare.runtime.image.dicom import read_dicom

    files = small_series(tmp_path / "s", rng=rng)
    reference = read_dicom(tmp_path / "s").data.copy()
    edit(files, RescaleSlope=None)
    assert np.array_equal(read_dicom(tmp_path / "s").data, reference)
    assert reference.min() < -500  # air is there: the intercept was applied


@pytest.mark.parametrize("slope,words", [("0", "RescaleSlope is 0"), ("abc", "not a number"),
                                         ("NaN", "not a finite number"), ("1e999", "not a finite number")])
def test_bad_slope_refused_before_models_load(tiny_bundle: Path, tmp_path: Path, rng, slope: str,
                                             words: str) -> None:
    """Rows 9 and 14: one line naming the file, from the headers: the models are never loaded (this bundle's fold
    files are corrupt, and the error is still the slope's)."""
    files = small_series(tmp_path / "s", rng=rng)
    from pydicom.dataelem import RawDataElement

    raw = slope.encode() + (b" " if len(slope) % 2 else b"")
    for f in files:  # written as raw DS text, whatever pydicom thinks of the value
        ds = pydicom.dcmread(f)
        tag = ds["RescaleSlope"].tag
        ds._dict[tag] = RawDataElement(tag, "DS", len(raw), raw, 0, False, True)
        with pydicom.config.disable_value_validation():
            ds.save_as(f)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "fold0.fp32.onnx").write_bytes(b"corrupt")
    proc = flare_run(tmp_path / "s", "-o", tmp_path / "o.nii.gz", "--bundle", bundle, "-q")
    line = one_error(proc, 2)
    assert words in line and ".dcm" in line, line
    assert not (tmp_path / "o.nii.gz").exists()


def test_large_private_elements_are_not_kept(tmp_path: Path, rng) -> None:
    """Row 5: slices carrying a 20 MB private element: the headers kept for a DICOM-SEG hold no private element,
    and reading stays small."""
    files = small_series(tmp_path / "s", rng=rng, n=4)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.add_new(0x00091010, "OB", bytes(20 * 2**20))
        ds.save_as(f)
    code = ("import sys\nfrom flare.runtime.image.dicom import read_dicom\n"
            f"img = read_dicom({str(tmp_path / 's')!r})\n"
            "assert all(not any(t.is_private for t in ds.keys()) for ds in img.source.datasets)\n"
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) / 1024 < 300, proc.stdout  # 4 x 20 MB would be kept otherwise; the runtime alone ~150


def _deflated_bomb(path: Path, side: int, like: Path) -> None:
    """A Deflated Explicit VR Little Endian CT slice of side x side zeros (a few hundred KB on disk)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(like)
    del ds.PixelData
    ds.Rows = ds.Columns = side
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n = side * side * 2
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + n.to_bytes(4, "little"))]
    zeros = bytes(2**24)
    for start in range(0, n, len(zeros)):
        parts.append(comp.compress(zeros[: min(len(zeros), n - start)]))
    parts.append(comp.flush())
    path.write_bytes(b"\0" * 128 + b"DICM" + meta.getvalue() + b"".join(parts))


def test_deflated_dicom_bomb_is_refused_small(tiny_bundle: Path, tmp_path: Path, rng) -> None:
    """Row 4: two deflate-compressed 12288x12288 slices (300 KB each) are refused before they are inflated."""
    files = small_series(tmp_path / "src", rng=rng, n=2)
    (tmp_path / "bomb").mkdir()
    for k, f in enumerate(files):
        _deflated_bomb(tmp_path / "bomb" / f"{k}.dcm", 12288, f)
    assert sum(p.stat().st_size for p in (tmp_path / "bomb").iterdir()) < 2 * 2**20
    proc, peak = measured_run(tmp_path, tmp_path / "bomb", "-o", tmp_path / "o.nii.gz", "--bundle", tiny_bundle,
                              "-q")
    line = one_error(proc, 2)
    assert "inflates" in line and ".dcm" in line, line
    assert peak < RSS_LIMIT_MB, peak


def test_dicom_seg_from_anonymised_series(tiny_bundle: Path, tmp_path: Path, rng) -> None:
    """Row 16: a series without PatientBirthDate / PatientSex / StudyID: the DICOM-SEG is written with them empty."""
    pytest.importorskip("highdicom")
    img = nib.load(data_path("ts_abdomen_ct_3mm.nii.gz"))
    files = write_ct_series(tmp_path / "s", np.asarray(img.dataobj).astype(np.float32), img.affine, rng=rng)
    edit(files, PatientBirthDate=None, PatientSex=None, StudyID=None, AccessionNumber=None)
    proc = flare_run(tmp_path / "s", "-o", tmp_path / "seg.dcm", "--bundle", tiny_bundle, "-q")
    assert proc.returncode == 0, proc.stderr
    seg = pydicom.dcmread(tmp_path / "seg.dcm")
    assert seg.Modality == "SEG" and seg.PatientBirthDate == "" and seg.PatientID == "FLARE-TEST"


# ------------------------------------------------------------------------------------------------ bundle
def test_onnx_external_data_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    """Row 10: weights in an ONNX external-data file are covered by no sha256: the bundle is refused."""
    onnx = pytest.importorskip("onnx")
    from flare.runtime.bundle.manifest import load_bundle, sha256_file
    from flare.runtime.foundation.errors import BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    model = onnx.load(bundle / "fold0.fp32.onnx")
    onnx.save_model(model, bundle / "fold0.fp32.onnx", save_as_external_data=True, location="fold0.weights",
                    size_threshold=0)
    doc = json.loads((bundle / "bundle.json").read_text())
    doc["folds"][0]["files"]["fp32"]["sha256"] = sha256_file(bundle / "fold0.fp32.onnx")
    (bundle / "bundle.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match="external-data") as err:
        load_bundle(bundle)
    assert "fold0.fp32.onnx" in str(err.value)
    load_bundle(tiny_bundle)  # self-contained models pass


# ------------------------------------------------------------------------------------------------ disk, signals
def _full_folder(tmp_path: Path) -> tuple[Path, bool]:
    """A folder on a full file system: a 2 MB tmpfs filled up (root), else None."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    out = mnt / "out"
    out.mkdir()
    with open(mnt / "filler", "wb") as f:
        try:
            while True:
                f.write(bytes(2**16))
                f.flush()
        except OSError:
            pass
    return out, True


def test_full_disk_in_batch_is_one_line_exit_3(tiny_bundle: Path, ct: Path, tmp_path: Path) -> None:
    """Row 11: no space left for the outputs: each case recorded as failed, one line, exit 3, no traceback."""
    shutil.copy(ct, ct.parent / "second.nii.gz")
    out, _ = _full_folder(tmp_path)
    try:
        proc = flare_run(ct.parent, "-o", out, "--bundle", tiny_bundle, "-q")
        assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
        # one line per failed case, then the summary's (the device choice line of --device auto aside)
        lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("flare: device auto")]
        assert all("No space left on device" in ln for ln in lines), lines
        assert "summary.json" in lines[-1] and "not run" in lines[-1], lines
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    finally:
        subprocess.run(["umount", str(out.parent)], check=False)


def test_sigterm_does_not_wait_for_the_read_ahead(tiny_bundle: Path, ct: Path, tmp_path: Path) -> None:
    """Row 2: SIGTERM while the next case is being read: exit 143 at once (the read-ahead thread is a daemon; it
    is paused here for 60 s, so a join would show as a timeout)."""
    shutil.copy(ct, ct.parent / "second.nii.gz")
    marker = tmp_path / "paused"
    env = {**os.environ, "FLARE_BUNDLE": str(tiny_bundle), "FLARE_TEST_PAUSE_AT": "read:second",
           "FLARE_TEST_PAUSE_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "flare.runtime.app.cli", str(ct.parent), "-o",
                             str(tmp_path / "out"), "-q"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if marker.exists() and (tmp_path / "out" / "ct.nii.gz").exists():  # the first case is written
                break
            if proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.2"], check=False)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)  # far below the 60 s pause
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())  # written on the way out
    assert summary["ok"] == 1 and summary["pending"] == 1, summary


def test_statistics_count_in_slabs(tmp_path: Path) -> None:
    """Row 7: counting labels allocates per slab, not an int64 per voxel."""
    import tracemalloc

    from flare.runtime.ops.stats import label_counts

    labels = np.zeros((256, 256, 256), dtype=np.uint8)
    labels[::7] = 3
    tracemalloc.start()
    counts = label_counts(labels)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(counts, np.bincount(labels.ravel(), minlength=counts.size))
    assert peak < 64 * 2**20, peak  # np.bincount on the whole map: 128 MB of int64


def test_gzip_nifti_still_reads(tmp_path: Path) -> None:
    """The header preflight keeps ordinary files working: a real CT under every bound."""
    from flare.runtime.image.nifti import read_image
    from flare.runtime.pipeline.limits import check_source

    src = data_path("ts_torso_ct_1p5mm_lps.nii.gz")
    img = read_image(src, preflight=check_source)
    assert img.data.shape == (120, 126, 164)
    raw = tmp_path / "torso.nii"
    raw.write_bytes(gzip.decompress(src.read_bytes()))
    assert read_image(raw, preflight=check_source).data.shape == (120, 126, 164)


# ------------------------------------------------------------------------------------------------ the server
def _group_memory(pgid: int) -> dict[str, tuple[float, float]]:
    """(VmRSS, VmHWM) in MB of each process in process group ``pgid``, by ``name:pid``."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            status = dict(line.split(":", 1) for line in (stat.parent / "status").read_text().splitlines())
        except (OSError, ValueError, IndexError):
            continue
        found[f"{status['Name'].strip()}:{stat.parent.name}"] = (int(status["VmRSS"].split()[0]) / 1024,
                                                                  int(status["VmHWM"].split()[0]) / 1024)
    return found


def _post_junk(port: int, total: int, *, chunked: bool, path: str = "/v2/models/flare/infer") -> tuple[int, str]:
    """POST ``total`` bytes of junk (64 KB blocks: the test holds none of it) as curl would; (status, body). Chunked,
    the body starts as a real CT's inference request (what the front checks) and goes on with junk."""
    import http.client

    from serve_support import infer_request

    headers, start = infer_request(data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes())
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Inference-Header-Content-Length", headers["Inference-Header-Content-Length"] if chunked else "0")
        conn.putheader(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(total))))
        conn.endheaders()
        block = os.urandom(2**16)
        try:
            if chunked:
                conn.send(b"%x\r\n%s\r\n" % (len(start), start))
            for _ in range(total // len(block)):
                conn.send(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close early; its answer is still read
        answer = conn.getresponse()
        return answer.status, answer.read().decode()
    finally:
        conn.close()


def _junk_under_the_limit(server, size: int) -> None:
    """Issue 18 row 6, under the limit: 3 junk requests of ``size`` bytes of each kind — random bytes behind a valid
    inference header, behind an invalid one, a gzip stream of random bytes, and random bytes in a gRPC ModelInfer —
    are refused by the front with one line from their first bytes: neither Triton nor the Python-backend stub ever
    holds one (their peak RSS grows less than ``size``)."""
    import grpc
    import tritonclient.grpc.service_pb2 as service
    from serve_support import infer_request

    before = _group_memory(server.proc.pid)
    noise = os.urandom(size)
    kinds = {"valid header": infer_request(noise), "gzip": infer_request(gzip.compress(noise, compresslevel=1)),
             "invalid header": ({"Inference-Header-Content-Length": "200"}, noise)}
    for kind, (headers, body) in kinds.items():
        for _ in range(3):
            request = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/flare/infer", data=body,
                                             headers={**headers, "Content-Type": "application/octet-stream"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=120)
            error = json.loads(refused.value.read())["error"]
            assert refused.value.code == 400 and error.startswith("flare-error: request: ") and "\n" not in error
            assert ("not a JSON object" if kind == "invalid header" else "not a NIfTI file") in error, (kind, error)
    message = service.ModelInferRequest(model_name="flare")
    message.inputs.add(name="image", datatype="BYTES", shape=[1])
    message.raw_input_contents.append(len(noise).to_bytes(4, "little") + noise)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc}", options=[("grpc.max_send_message_length", -1)]) as ch:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as rejected:
                ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(message.SerializeToString(), timeout=120)
            assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert rejected.value.details() == "flare-error: request: not a NIfTI file (no NIfTI-1/NIfTI-2 header)"
    after = _group_memory(server.proc.pid)
    print(f"junk under the limit: RSS/peak MB before {before}\nafter {after}")
    for name in (k for k in before if k.startswith(("tritonserver:", "triton_python_b"))):
        assert after[name][1] < before[name][1] + size / 2**20 / 2, (name, before, after)  # never held one


@pytest.mark.slow
def test_server_refuses_200_mb_bodies_before_buffering(tiny_bundle: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 6: 200 MB junk bodies (with Content-Length, chunked, over gRPC, to the metrics port) are refused by the
    public ports with one line; Triton never buffers them (its peak RSS stays near its start), it keeps serving, and
    the whole server's RSS stays under 1 GB. Junk under the limit is refused from its first bytes
    (:func:`_junk_under_the_limit`). A form-encoded binary body below the limit (curl's default) no longer crashes
    Triton."""
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.http")
    grpc = pytest.importorskip("grpc")
    from serve_support import Started, flare_servers

    limit, junk = 16 * 2**20, 200 * 2**20
    monkeypatch.setenv("FLARE_MAX_REQUEST_BYTES", "16M")
    started: list[Started] = []
    with flare_servers(tiny_bundle, tmp_path, 1, started=started) as (address,):
        server = started[0]
        _junk_under_the_limit(server, 15 * 2**20)
        before = _group_memory(server.proc.pid)
        triton = next(k for k in before if k.startswith("tritonserver:"))
        for chunked in (False, True):
            status, body = _post_junk(server.http, junk, chunked=chunked)
            error = json.loads(body)["error"]
            assert status == 413 and error.startswith("flare-error: request: the body is ") and "\n" not in error
            assert f"limit of {limit} bytes (FLARE_MAX_REQUEST_BYTES)" in error, error
        status, body = _post_junk(server.metrics, junk, chunked=False, path="/metrics")
        assert status == 413 and "metrics port" in json.loads(body)["error"]
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc}", options=[("grpc.max_send_message_length", -1)]) as ch:
            with pytest.raises(grpc.RpcError) as refused:
                ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(os.urandom(2**20) * 200, timeout=120)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert ch.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=30) == b"\x08\x01"
        # 9 MB of binary junk as curl --data-binary / urllib send it (form-encoded): one line, Triton alive
        blob = os.urandom(9 * 2**20)
        header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                         "parameters": {"binary_data_size": len(blob) + 4}}]}).encode()
        request = urllib.request.Request(f"http://{address}/v2/models/flare/infer", method="POST",
                                         data=header + len(blob).to_bytes(4, "little") + blob,
                                         headers={"Inference-Header-Content-Length": str(len(header))})
        with pytest.raises(urllib.error.HTTPError) as rejected:
            urllib.request.urlopen(request, timeout=300)
        assert json.loads(rejected.value.read())["error"] == "flare-error: request: not a NIfTI file (no NIfTI-1/" \
                                                              "NIfTI-2 header)"
        del blob, request
        flare_run = str(Path(sys.executable).parent / "flare-run")
        large = tmp_path / "large.nii"  # a valid 20 MB image (noise: gzip, as it is sent, keeps it 20 MB)
        noise = np.random.default_rng(0).integers(-2**15, 2**15, (160, 160, 400), dtype=np.int16)
        nib.save(nib.Nifti1Image(noise, np.diag([1.0, 1.0, 1.0, 1.0])), large)
        proc = subprocess.run([flare_run, str(large), "-o", str(tmp_path / "large_seg.nii.gz"), "--server", address,
                               "-q"], capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 2 and not (tmp_path / "large_seg.nii.gz").exists()
        line = one_error(proc, 2)
        assert line.startswith(f"flare-run: error: {large}: the body is ") and "FLARE_MAX_REQUEST_BYTES" in line, line
        ct = data_path("ts_abdomen_ct_3mm.nii.gz")
        proc = subprocess.run([flare_run, str(ct), "-o", str(tmp_path / "seg.nii.gz"), "--server", address, "-q"],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0 and (tmp_path / "seg.nii.gz").exists(), proc.stderr
        after = _group_memory(server.proc.pid)
        assert server.proc.poll() is None and triton in after, server.log.read_text()[-2000:]
        print(f"server RSS/peak MB before: {before}\nafter: {after}")
        assert after[triton][1] < before[triton][1] + 2 * limit / 2**20 + 64, (before, after)  # never held 200 MB
        assert sum(rss for rss, _ in after.values()) < RSS_LIMIT_MB, after
