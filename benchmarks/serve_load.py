"""``flare-bench --server``: a small load test of a running ``flare-serve`` (N requests at concurrency C).

Each request sends one case's file bytes through :class:`~flare.runtime.serving.client.RemoteSegmenter` (Triton HTTP) and
waits for the label map; latency is measured per request on the client (send → labels received), throughput is
successful requests per second of wall time. One untimed warm-up request per case runs first.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from flare.runtime.foundation.errors import FlareError

__all__ = ["run_load", "write_load_report"]


def _request(remote: Any, case: tuple[Path, bytes]) -> tuple[float, float | None, str | None]:
    """(client latency s, server pipeline s, error line or None) of one request."""
    path, blob = case
    t0 = time.perf_counter()
    try:
        _, report = remote.request(blob, str(path))
    except FlareError as err:
        return time.perf_counter() - t0, None, str(err)
    return time.perf_counter() - t0, report.get("total_s"), None


def _summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "mean": None, "min": None, "max": None}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 3), "p95": round(float(np.percentile(arr, 95)), 3),
            "mean": round(float(arr.mean()), 3), "min": round(float(arr.min()), 3), "max": round(float(arr.max()), 3)}


def run_load(server: str, cases: list[Path], requests: int, concurrency: int, timeout_s: float = 3600.0,
             warmup: bool = True, command: str = "") -> dict[str, Any]:
    """Send ``requests`` requests (cycling through ``cases``) with ``concurrency`` in flight; return the summary."""
    from flare.runtime.serving.client import RemoteSegmenter

    from .environment import environment

    remote = RemoteSegmenter(server, timeout_s=timeout_s)
    blobs = [(p, p.read_bytes()) for p in cases]
    if warmup:
        for case in blobs:
            error = _request(remote, case)[2]
            if error is not None:
                raise FlareError(None, f"warm-up request failed: {error}")
    jobs = [blobs[k % len(blobs)] for k in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda case: _request(remote, case), jobs))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r[2] is None]
    return {
        "command": command,
        "server": server,
        "cases": [{"path": str(p), "mb": round(len(b) / 2**20, 2)} for p, b in blobs],
        "requests": requests,
        "concurrency": concurrency,
        "succeeded": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r[2] for r in results if r[2] is not None}),
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(ok) / wall, 4) if wall > 0 else None,
        "latency_s": _summary([r[0] for r in ok]),
        "server_pipeline_s": _summary([float(r[1]) for r in ok if r[1] is not None]),
        "client": environment("client"),
    }


def write_load_report(summary: dict[str, Any], out_dir: Path) -> Path:
    """``out_dir/serve_load.json`` and ``serve_load.md``; returns the Markdown path."""
    from flare.runtime.foundation.atomic import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "serve_load.json", json.dumps(summary, indent=2) + "\n")
    lat, srv = summary["latency_s"], summary["server_pipeline_s"]
    env = summary["client"]
    md = "\n".join([
        f"# flare-serve load test: {summary['server']}",
        "",
        f"- command: `{summary['command']}`",
        f"- date: {env['date']}; client machine: {env['cpu']}, {env['cores']} cores",
        f"- cases: {', '.join(Path(c['path']).name + ' (' + str(c['mb']) + ' MB)' for c in summary['cases'])}",
        "",
        ("| requests | concurrency | ok | failed | wall s | throughput req/s | latency p50 s | latency p95 s "
        "| server pipeline p50 s |"),
        "|---|---|---|---|---|---|---|---|---|",
        (f"| {summary['requests']} | {summary['concurrency']} | {summary['succeeded']} | {summary['failed']} "
        f"| {summary['wall_s']} | {summary['throughput_rps']} | {lat['p50']} | {lat['p95']} | {srv['p50']} |"),
        "",
    ] + [f"- error: {e}" for e in summary["errors"]])
    write_text_atomic(out_dir / "serve_load.md", md + "\n")
    return out_dir / "serve_load.md"
