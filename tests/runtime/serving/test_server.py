"""flare-serve on a real Triton server (PyTriton) on free loopback ports, flare-run --server and RemoteSegmenter.

One server per module (``--instances 2``, the tiny bundle), started as a ``flare-serve`` subprocess in its own process
group and stopped by its PID; every request loop is bounded in count and time.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import data_path
from serve_support import free_ports as _free_ports
from serve_support import stop_server

REAL_CTS = ("ts_abdomen_ct_3mm.nii.gz", "ts_body_ct_3mm_int32.nii.gz", "ts_torso_ct_1p5mm_lps.nii.gz")
READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 300.0
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------------------ no server needed
def test_read_image_bytes_matches_the_file_reader(tmp_path: Path) -> None:
    from flare.runtime.image.nifti import read_image, read_image_bytes

    path = data_path("ts_torso_ct_1p5mm_lps.nii.gz")
    raw = tmp_path / "torso.nii"
    raw.write_bytes(gzip.decompress(path.read_bytes()))
    for source in (path, raw):
        a, b = read_image(source), read_image_bytes(source.read_bytes(), str(source))
        assert np.array_equal(a.data, b.data) and a.data.dtype == b.data.dtype
        assert np.array_equal(a.affine, b.affine) and b.path == source
        assert a.header.binaryblock == b.header.binaryblock


def test_read_image_bytes_errors_are_the_file_readers(tmp_path: Path) -> None:
    from flare.runtime.foundation.errors import InputError
    from flare.runtime.image.nifti import read_image, read_image_bytes

    blob = data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes()
    for name, bad in (("cut.nii.gz", blob[: len(blob) // 2]), ("text.nii.gz", gzip.compress(b"plain text " * 50)),
                      ("empty.nii", b""), ("short.nii", b"\x5c\x01")):
        path = tmp_path / name
        path.write_bytes(bad)
        with pytest.raises(InputError) as from_file:
            read_image(path)
        with pytest.raises(InputError) as from_bytes:
            read_image_bytes(bad, str(path))
        assert str(from_bytes.value) == str(from_file.value)
        assert "\n" not in str(from_bytes.value)


def test_label_bytes_is_what_write_labels_writes(tmp_path: Path) -> None:
    from flare.runtime.image.nifti import label_bytes, read_image, write_labels

    img = read_image(data_path("ts_torso_ct_1p5mm_lps.nii.gz"))
    labels = (np.arange(img.data.size) % 15).reshape(img.data.shape).astype(np.uint8)
    for name, compressed in (("seg.nii.gz", True), ("seg.nii", False)):
        write_labels(tmp_path / name, labels, img)
        blob = label_bytes(labels, img, compressed)
        assert (blob[:2] == b"\x1f\x8b") == compressed
        on_disk = (tmp_path / name).read_bytes()
        if compressed:
            blob, on_disk = gzip.decompress(blob), gzip.decompress(on_disk)
        assert blob == on_disk


def test_image_bytes_round_trip() -> None:
    from flare.runtime.image.model import from_array
    from flare.runtime.image.nifti import image_bytes, read_image, read_image_bytes

    img = read_image(data_path("ts_torso_ct_1p5mm_lps.nii.gz"))
    arr = from_array(np.linspace(-1000, 1000, 60, dtype=np.float32).reshape(3, 4, 5), np.diag([0.7, 0.8, 2.5, 1]))
    for source in (img, arr):
        back = read_image_bytes(image_bytes(source), "x.nii.gz")
        assert np.array_equal(back.data, source.data) and back.data.dtype == source.data.dtype
        assert np.allclose(back.affine, source.affine, atol=1e-6)  # NIfTI's sform is float32
    assert np.array_equal(read_image_bytes(image_bytes(img), "x.nii.gz").affine, img.affine)  # read from NIfTI: exact


def test_launcher_points_the_stub_at_this_interpreters_libpython() -> None:
    pytest.importorskip("pytriton")
    import sysconfig

    from flare.runtime.serving.server import libpython_path, python_backend_env, stub_libpython

    env = python_backend_env({"LD_LIBRARY_PATH": "/somewhere/else", "PATH": os.environ.get("PATH", "")})
    libdir = sysconfig.get_config_var("LIBDIR")
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [libdir, "/somewhere/else"]
    found = stub_libpython(env)
    if found is None:
        pytest.skip("ldd cannot tell which libpython the stub loads here")
    assert found.resolve() == libpython_path().resolve()


def test_the_stop_deadline_is_disarmed_with_the_handlers_restored(tmp_path: Path) -> None:
    """serve() disarms its stop deadline however it returns: in-process callers keep their process and handlers."""
    from flare.runtime.serving.server import _StopOnSignal

    before = signal.getsignal(signal.SIGTERM)
    stop = _StopOnSignal(tmp_path)
    assert signal.getsignal(signal.SIGTERM) != before
    stop.disarm()
    assert signal.getsignal(signal.SIGTERM) == before and not stop.timer.is_alive() and stop.received == []


def test_connection_refused_is_one_line_exit_2(tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.http")
    port = _free_ports(1)[0]  # nothing listens there
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    out = tmp_path / "seg.nii.gz"
    proc = _flare_run(ct, out, f"127.0.0.1:{port}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flare-run: error: 127.0.0.1:{port}: cannot reach the flare server")
    assert not out.exists()
    for bad in ("a:b", "::::", "host:0", "host:99999", "127.0.0.1"):  # tritonclient printed an ignored exception too
        proc = _flare_run(ct, out, bad)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"flare-run: error: --server {bad!r}: give HOST:PORT, e.g. 127.0.0.1:8000"], proc.stderr


# ------------------------------------------------------------------------------------------------ the server
@dataclass
class Server:
    proc: subprocess.Popen
    http: str  # host:port
    metrics: str  # http://host:port/metrics
    log: Path


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except OSError:
        return 0, ""


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.http")
    http, grpc, metrics = _free_ports(3)
    log = tmp_path_factory.mktemp("serve") / "flare-serve.log"
    cmd = [str(BIN / "flare-serve"), "--bundle", str(tiny_bundle), "--device", "cpu", "--host", "127.0.0.1",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--instances", "2"]
    env = {**os.environ, "FLARE_MAX_TILES": "1000000"}  # the stop test's request runs for an hour
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _get(f"http://127.0.0.1:{http}/v2/models/flare/ready", 2.0)[0] != 200:  # health/ready: before the model
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"flare-serve did not become ready (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield Server(proc, f"127.0.0.1:{http}", f"http://127.0.0.1:{metrics}/metrics", log)
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def local_results(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Each real CT segmented here (the local flare-run path): output file and report."""
    from flare.runtime.app.write import Outputs, write_result
    from flare.runtime.pipeline.segmenter import Segmenter

    out = tmp_path_factory.mktemp("local")
    seg = Segmenter(tiny_bundle, device="cpu")
    results = {}
    for name in REAL_CTS:
        result = seg.segment(data_path(name))
        write_result(result, Outputs(out / name))
        results[name] = (out / name, result.report.to_json())
    return results


def _flare_run(ct: Path, out: Path, server: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flare-run"), str(ct), "-o", str(out), "--server", server, "-q", *extra],
                          capture_output=True, text=True, timeout=REQUEST_TIMEOUT_S, check=False)


def _assert_same_nifti(remote: Path, local: Path) -> None:
    a, b = nib.load(remote), nib.load(local)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert a.get_data_dtype() == np.uint8 == b.get_data_dtype()
    assert np.array_equal(a.affine, b.affine)
    assert a.header.binaryblock == b.header.binaryblock


def _counter(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and 'model="flare"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_health_model_ready_and_loopback_only(server: Server) -> None:
    port = server.http.split(":")[1]
    assert _get(f"http://{server.http}/v2/health/live")[0] == 200
    assert _get(f"http://{server.http}/v2/health/ready")[0] == 200
    assert _get(f"http://{server.http}/v2/models/flare/ready")[0] == 200
    status, meta = _get(f"http://{server.http}/v2/models/flare")
    assert status == 200 and {t["name"] for t in json.loads(meta)["inputs"]} == {"image"}
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=False).stdout
    if listening:
        addrs = [f.split()[3] for f in listening.splitlines() if f.split()[3].endswith(f":{port}")]
        assert addrs and all(a.startswith("127.0.0.1:") for a in addrs), addrs


def test_second_server_on_a_busy_port_or_without_bundle_is_one_line_exit_2(server: Server, tmp_path: Path) -> None:
    grpc, metrics = _free_ports(2)
    for args in (["--bundle", str(tmp_path / "none")],
                 ["--bundle", str(tmp_path / "none"), "--http-port", server.http.split(":")[1], "--grpc-port",
                  str(grpc), "--metrics-port", str(metrics)]):
        proc = subprocess.run([str(BIN / "flare-serve"), *args], capture_output=True, text=True, timeout=120,
                              check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("flare-serve: error: ")
    assert f"cannot listen on {server.http} (--http-port)" in proc.stderr


@pytest.mark.parametrize("name", REAL_CTS)
def test_remote_segmenter_equals_local(server: Server, local_results: dict, name: str) -> None:
    from flare.runtime.serving.client import RemoteSegmenter

    local_file, local_report = local_results[name]
    result = RemoteSegmenter(server.http, timeout_s=REQUEST_TIMEOUT_S).segment(data_path(name))
    labels, affine, report = result.labels, result.affine, result.report.to_json()
    local = nib.load(local_file)
    assert labels.dtype == np.uint8 and np.array_equal(labels, np.asarray(local.dataobj))
    assert np.array_equal(affine, local.affine)
    assert report["voxels"] == local_report["voxels"] and report["crop"] == local_report["crop"]
    assert report["input"] == local_report["input"]


def test_remote_segmenter_takes_a_loaded_image(server: Server, local_results: dict) -> None:
    from flare.runtime.image.nifti import read_image
    from flare.runtime.serving.client import RemoteSegmenter

    name = "ts_torso_ct_1p5mm_lps.nii.gz"
    img = read_image(data_path(name))
    result = RemoteSegmenter(server.http, timeout_s=REQUEST_TIMEOUT_S).segment(img)
    labels, affine = result.labels, result.affine
    local = nib.load(local_results[name][0])
    assert np.array_equal(labels, np.asarray(local.dataobj)) and np.array_equal(affine, local.affine)


def test_four_concurrent_flare_run_clients(server: Server, local_results: dict, tmp_path: Path) -> None:
    before = _counter(_get(server.metrics)[1], "nv_inference_request_success")
    jobs = [*REAL_CTS, REAL_CTS[0]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        procs = list(pool.map(lambda k: _flare_run(data_path(jobs[k]), tmp_path / f"{k}_{jobs[k]}", server.http,
                                                   "--report", str(tmp_path / f"{k}.json")), range(len(jobs))))
    for k, (name, proc) in enumerate(zip(jobs, procs)):
        assert proc.returncode == 0, proc.stderr
        _assert_same_nifti(tmp_path / f"{k}_{name}", local_results[name][0])
        assert json.loads((tmp_path / f"{k}.json").read_text())["voxels"] == local_results[name][1]["voxels"]
    after = _counter(_get(server.metrics)[1], "nv_inference_request_success")
    assert after - before == len(jobs)


def test_uncompressed_output_and_request_options(server: Server, local_results: dict, tiny_bundle: Path,
                                                 tmp_path: Path) -> None:
    from flare.runtime.pipeline.segmenter import Segmenter

    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    out = tmp_path / "seg.nii"
    proc = _flare_run(ct, out, server.http, "--folds", "1", "--overlap", "0.25", "--postprocess", "strict",
                      "--report", str(tmp_path / "r.json"))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:2] != b"\x1f\x8b"  # plain .nii
    result = Segmenter(tiny_bundle, device="cpu", folds=1, overlap=0.25, postprocess="strict").segment(ct)
    labels, affine, report = result.labels, result.affine, result.report.to_json()
    img = nib.load(out)
    assert np.array_equal(np.asarray(img.dataobj), labels) and np.array_equal(img.affine, affine)
    remote = json.loads((tmp_path / "r.json").read_text())
    assert remote["postprocess"] == report["postprocess"] == {"mode": "strict"}
    assert remote["folds"] == report["folds"] and remote["tiles"] == report["tiles"]


def test_bad_request_among_good_ones(server: Server, local_results: dict, tiny_bundle: Path, tmp_path: Path) -> None:
    good = data_path("ts_abdomen_ct_3mm.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(b"this is not a CT " * 100))
    assert _flare_run(good, tmp_path / "a.nii.gz", server.http).returncode == 0
    proc = _flare_run(bad, tmp_path / "b.nii.gz", server.http)
    assert proc.returncode == 2 and not (tmp_path / "b.nii.gz").exists()
    lines = proc.stderr.strip().splitlines()
    local = subprocess.run([str(BIN / "flare-run"), str(bad), "-o", str(tmp_path / "c.nii.gz"), "--bundle",
                            str(tiny_bundle), "--device", "cpu", "-q"], capture_output=True, text=True, check=False,
                           timeout=REQUEST_TIMEOUT_S)
    assert local.returncode == 2 and lines == local.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flare-run: error: {bad}: not a NIfTI file")
    from flare.runtime.serving.client import RemoteError, RemoteSegmenter

    with pytest.raises(RemoteError) as rejected:  # the same bytes sent as they are: the server says the same
        RemoteSegmenter(server.http, timeout_s=REQUEST_TIMEOUT_S).request(bad.read_bytes(), str(bad))
    assert f"flare-run: error: {rejected.value}" == lines[0]
    bad_option = _flare_run(good, tmp_path / "d.nii.gz", server.http, "--folds", "5")
    assert bad_option.returncode == 2
    assert re.fullmatch(r"flare-run: error: .*--folds 5 asked for, the bundle has 2 fold\(s\)", bad_option.stderr.strip())
    assert _flare_run(good, tmp_path / "e.nii.gz", server.http).returncode == 0
    _assert_same_nifti(tmp_path / "e.nii.gz", local_results[good.name][0])
    # (Triton's nv_inference_request_failure does not count these: the proxy answers a refused request with an error
    # response instead of raising, which is what keeps the client's error to one line; the server's log counts them)
    assert f"flare-serve: WARNING: request rejected: {bad}: not a NIfTI file" in server.log.read_text()
    assert server.proc.poll() is None


def _raw_infer(server: Server, body: bytes, params: dict | None = None) -> tuple[int, str]:
    """POST one BYTES tensor with Triton's binary-data extension, as curl would; (status, error text)."""
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(body) + 4}}],
                         "parameters": params or {}}).encode()
    request = urllib.request.Request(f"http://{server.http}/v2/models/flare/infer", method="POST",
                                     data=header + len(body).to_bytes(4, "little") + body,
                                     headers={"Inference-Header-Content-Length": str(len(header))})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as answer:
            return answer.status, ""
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())["error"]


def test_rejected_requests_are_one_line_for_any_client(server: Server) -> None:
    """Issue 18 row 12: whatever a raw HTTP client sends, a rejected request's error is exactly one line, with no
    stack, file paths or line numbers of the server."""
    blob = data_path("ts_abdomen_ct_3mm.nii.gz").read_bytes()
    cases = [(b"", {}), (os.urandom(4096), {}), (gzip.compress(os.urandom(4096)), {}), (blob[: len(blob) // 2], {}),
             (blob, {"folds": "x"}), (blob, {"overlap": "nan?"}), (blob, {"postprocess": "bogus"}),
             (blob, {"overlap": 0.999}), (blob, {"folds": True}),
             (b"junk", {"filename": "a\nb\nc"})]
    for body, params in cases:
        status, error = _raw_infer(server, body, params)
        assert status == 400 or status == 500, (status, error)
        lines = error.strip().splitlines()
        assert len(lines) == 1 and "flare-error: " in lines[0], error
        assert "Traceback" not in error and ".py" not in error and "line " not in error, error
    assert server.proc.poll() is None


def test_flare_bench_server_mode(server: Server, tmp_path: Path) -> None:
    ct = data_path("ts_abdomen_ct_3mm.nii.gz")
    proc = subprocess.run([str(BIN / "flare-bench"), "--server", server.http, "--cases", str(ct), "--requests", "4",
                           "--concurrency", "2", "-o", str(tmp_path), "-q"], capture_output=True, text=True,
                          timeout=REQUEST_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "serve_load.json").read_text())
    assert summary["succeeded"] == 4 and summary["failed"] == 0 and summary["concurrency"] == 2
    assert 0 < summary["latency_s"]["p50"] <= summary["latency_s"]["p95"] <= summary["latency_s"]["max"]
    assert summary["throughput_rps"] > 0 and "| 4 | 2 | 4 | 0 |" in (tmp_path / "serve_load.md").read_text()


def test_sigterm_stops_the_server_gracefully(server: Server, tmp_path: Path) -> None:
    """Runs last in this module: SIGTERM with a request in flight that would compute for an hour (overlap 0.95 on a
    500 x 500 x 600 mm block the locator finds no organ in: about 56,000 tiles per fold); the server still stops
    (Triton's grace period, then the process ends: the computing thread used to keep it alive for the whole hour), and
    the request fails with one line."""
    from flare.runtime.serving.client import RemoteError, RemoteSegmenter

    outcome: list[object] = []
    block = np.full((125, 125, 150), -1000, np.int16)
    block[20:100, 20:100, 20:130] = 40
    ct = tmp_path / "block.nii.gz"
    nib.save(nib.Nifti1Image(block, np.diag([4.0, 4.0, 4.0, 1.0])), ct)

    def request() -> None:
        try:
            outcome.append(RemoteSegmenter(server.http, timeout_s=60, overlap=0.95).segment(ct).labels.shape)
        except RemoteError as err:
            outcome.append(err)

    client = threading.Thread(target=request)
    client.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        code = server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flare-serve still running 60 s after SIGTERM:\n{server.log.read_text()[-2000:]}")
    print(f"flare-serve stopped {time.monotonic() - t0:.1f} s after SIGTERM, exit {code}")
    client.join(timeout=90)
    print(f"in-flight request: {outcome[0] if outcome else None}")
    assert not client.is_alive() and len(outcome) == 1
    assert isinstance(outcome[0], tuple) or "\n" not in str(outcome[0])
    with pytest.raises(ProcessLookupError):  # tritonserver went too: the process group is empty
        for _ in range(100):
            os.killpg(server.proc.pid, 0)
            time.sleep(0.1)
    log = server.log.read_text()
    assert "flare-serve: the stop did not finish within 27 s (a request still computing?)" in log
    work = re.search(r"Triton's log: (\S+)/tritonserver\.log", log)
    assert work is not None and not Path(work.group(1)).exists()  # its working folder (PyTriton's workspace) too
