"""Test helper: ``flare-serve`` subprocesses on free loopback ports, each in its own process group, stopped by PID
(SIGTERM, then SIGKILL of the group)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from flare.benchmarks.serve_junk import stop_server

BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 240.0


def free_ports(n: int) -> list[int]:
    """Ports the kernel picks for loopback binds to port 0 (held together so that they differ)."""
    from flare.runtime.serving.server import loopback_ports

    return loopback_ports(n)


def _ready(http: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/flare/ready", timeout=2.0) as r:
            return r.status == 200
    except OSError:
        return False


@dataclass
class Started:
    """A flare-serve subprocess and its ports."""

    proc: subprocess.Popen
    http: int
    grpc: int
    metrics: int
    log: Path


@contextmanager
def flare_servers(bundle: Path, logs: Path, count: int, *extra: str, started: list[Started] | None = None
                  ) -> Iterator[list[str]]:
    """Start ``count`` flare-serve servers (CPU) at once, wait until each serves model ``flare``, yield their
    ``127.0.0.1:PORT`` HTTP addresses (``started``, when given, receives their processes and ports); stop them on
    exit."""
    started = [] if started is None else started
    with ExitStack() as stack:
        for k in range(count):
            http, grpc, metrics = free_ports(3)
            log = logs / f"flare-serve-{k}.log"
            cmd = [str(BIN / "flare-serve"), "--bundle", str(bundle), "--device", "cpu", "--host", "127.0.0.1",
                   "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *extra]
            with open(log, "wb") as sink:
                proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
            stack.callback(stop_server, proc)
            started.append(Started(proc, http, grpc, metrics, log))
        deadline = time.monotonic() + READY_TIMEOUT_S
        for proc, http, log in ((s.proc, s.http, s.log) for s in started):
            while not _ready(http):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"flare-serve did not become ready (exit {proc.poll()}):\n"
                                       f"{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield [f"127.0.0.1:{s.http}" for s in started]


def infer_request(image: bytes, **params: object) -> tuple[dict[str, str], bytes]:
    """(HTTP headers, body) of an inference request for ``image`` as flare's client (tritonclient) sends it."""
    import numpy as np
    from tritonclient import http

    inp = http.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array([image], dtype=object), binary_data=True)
    body, header_length = http.InferenceServerClient.generate_request_body([inp], parameters=params or None)
    return {"Inference-Header-Content-Length": str(header_length)}, body
