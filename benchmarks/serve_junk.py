"""Memory of a real ``flare-serve`` under junk requests (issue 18 row 6): the summed RSS and PSS of every process of
the server (flare-serve, tritonserver, the Python-backend stub, PyTriton's helpers) before, at the peak (sampled every
0.1 s) and after ``--repeat`` requests of each kind.

    python -m flare.benchmarks.serve_junk --bundle BUNDLE --mb 120 --repeat 3

Kinds: ``valid-header`` (random bytes behind a valid inference header), ``invalid-header`` (random bytes, the header
length pointing into them), ``gzip`` (a gzip stream of random bytes behind a valid header), ``gzip-corrupt`` (a valid
NIfTI header of a 512×512×N int16 image, gzip'ed with noise, the stream damaged midway: passes the front's checks and
fails in flare), ``grpc-junk`` (random bytes as a gRPC ModelInfer message), ``grpc-valid`` (random bytes as the image
of a well-formed ModelInferRequest). PSS counts shared memory once (RSS counts it in every process that maps it).
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["KINDS", "group_memory", "junk_request", "main", "stop_server"]

KINDS = ("valid-header", "invalid-header", "gzip", "gzip-corrupt", "grpc-junk", "grpc-valid")


def group_memory(pgid: int) -> dict[str, tuple[float, float]]:
    """(RSS, PSS) in MB of every process in process group ``pgid``, by ``name:pid``."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            status = dict(line.split(":", 1) for line in (stat.parent / "status").read_text().splitlines())
            pss = next(line.split()[1] for line in (stat.parent / "smaps_rollup").read_text().splitlines()
                       if line.startswith("Pss:"))
        except (OSError, ValueError, IndexError, StopIteration):
            continue
        found[f"{status['Name'].strip()}:{stat.parent.name}"] = (int(status["VmRSS"].split()[0]) / 1024,
                                                                  int(pss) / 1024)
    return found


def _sums(memory: dict[str, tuple[float, float]]) -> tuple[float, float]:
    return sum(r for r, _ in memory.values()), sum(p for _, p in memory.values())


def junk_request(kind: str, size: int) -> tuple[bytes, dict[str, str] | None]:
    """(body or gRPC message, HTTP headers or None for gRPC) of one junk request of ``kind`` of about ``size`` bytes."""
    noise = os.urandom(size)
    if kind.startswith("grpc"):
        if kind == "grpc-junk":
            return noise, None
        import tritonclient.grpc.service_pb2 as service

        message = service.ModelInferRequest(model_name="flare")
        message.inputs.add(name="image", datatype="BYTES", shape=[1])
        message.raw_input_contents.append(len(noise).to_bytes(4, "little") + noise)
        return message.SerializeToString(), None
    if kind == "invalid-header":
        return noise, {"Inference-Header-Content-Length": "200"}
    if kind == "gzip":
        noise = gzip.compress(noise, compresslevel=1)
    elif kind == "gzip-corrupt":
        import nibabel as nib
        import numpy as np

        slices = size // (512 * 512 * 2)
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((512, 512, slices))
        hdr.set_data_dtype(np.int16)
        hdr.set_sform(np.eye(4), code="aligned")
        damaged = bytearray(gzip.compress(hdr.binaryblock + bytes(4) + noise[:512 * 512 * 2 * slices], 1))
        damaged[len(damaged) // 2:len(damaged) // 2 + 64] = bytes(64)
        noise = bytes(damaged)
    header = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(noise) + 4}}]}).encode()
    return (header + len(noise).to_bytes(4, "little") + noise,
            {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"})


def _send(ports: dict[str, int], body: bytes, headers: dict[str, str] | None) -> str:
    """One request; its answer as ``status: first 120 characters``."""
    if headers is None:
        import grpc

        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}", options=options) as channel:
            try:
                channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(body, timeout=600)
                return "OK"
            except grpc.RpcError as err:
                return f"{err.code().name}: {(err.details() or '')[:120]}"
    conn = http.client.HTTPConnection("127.0.0.1", ports["http"], timeout=600)
    try:
        conn.request("POST", "/v2/models/flare/infer", body=body, headers=headers)
        answer = conn.getresponse()
        return f"{answer.status}: {answer.read().decode(errors='replace')[:120]}"
    finally:
        conn.close()


def _measure(proc: subprocess.Popen, ports: dict[str, int], kind: str, size: int, repeat: int) -> dict[str, Any]:
    body, headers = junk_request(kind, size)
    before = group_memory(proc.pid)
    peak: list[Any] = [0.0, before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = group_memory(proc.pid)
            if _sums(now)[0] > peak[0]:
                peak[:] = [_sums(now)[0], now]
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    answers = [_send(ports, body, headers) for _ in range(repeat)]
    time.sleep(3.0)
    done.set()
    sampler.join()
    after = group_memory(proc.pid)
    return {"kind": kind, "mb": round(len(body) / 2**20, 1), "repeat": repeat, "answers": sorted(set(answers)),
            **{f"{what}_{m}": round(_sums(mem)[i]) for what, mem in (("before", before), ("peak", peak[1]),
                                                                     ("after", after))
               for i, m in enumerate(("rss_mb", "pss_mb"))},
            "peak_by_process_rss_mb": {k: round(r) for k, (r, _) in peak[1].items()},
            "after_by_process_rss_mb": {k: round(r) for k, (r, _) in after.items()}}


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/flare/ready", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def main(argv: list[str] | None = None) -> None:
    from flare.runtime.serving.server import loopback_ports

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--mb", type=float, default=120.0, help="size of each junk request in MiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args(argv)
    ports = dict(zip(("http", "grpc", "metrics"), loopback_ports(3), strict=True))
    log = Path(tempfile.mkdtemp(prefix="serve-junk-")) / "flare-serve.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "flare-serve"), "--bundle", str(args.bundle),
                                 "--device", "cpu", *(x for k, p in ports.items() for x in (f"--{k}-port", str(p)))],
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not _ready(ports["http"]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"flare-serve did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        time.sleep(3.0)
        rss, pss = _sums(group_memory(proc.pid))
        print(json.dumps({"start_rss_mb": round(rss), "start_pss_mb": round(pss)}), flush=True)
        for kind in args.kinds.split(","):
            print(json.dumps(_measure(proc, ports, kind, int(args.mb * 2**20), args.repeat)), flush=True)
        print(json.dumps({"server_alive": proc.poll() is None, "ready": _ready(ports["http"])}), flush=True)
    finally:
        stop_server(proc)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM a flare-serve started in its own session (graceful stop), then SIGKILL its process group
    (tritonserver and its stubs)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


if __name__ == "__main__":
    main()
