"""Per-tile time of candidate CPU networks on ONNX Runtime's CPU provider, fp32 against static int8, interleaved
(and OpenVINO's fp32 with ``--engines onnxruntime openvino``).

    nice python -m flare.benchmarks.cpu_sweep --nets 16:1,2,2,4 24:1,2,2,4 --tiles 96 128 --repeats 3 -o sweep.json

Random weights (timing only: the int8 models are calibrated on random tiles, their accuracy says nothing); the
int8 models keep in float what ``flare-export --int8`` keeps at its first candidate (stem, head, convolutions under
32 channels). Each
round runs every (network, precision, tile) once, in the same order, so that the load of a shared machine falls on
all of them alike; the median over rounds is reported with the 1-minute load average seen at each run.
This is how ``train/configs/cpu.json``'s network was sized (``docs/cpu.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _net_spec(text: str) -> dict[str, Any]:
    filters, blocks = text.split(":")
    return {"name": "SegResNetDS", "init_filters": int(filters), "blocks_down": [int(b) for b in blocks.split(",")],
            "in_channels": 1, "out_channels": 13, "norm": "batch", "dsdepth": 1}


def build_models(specs: list[str], folder: Path) -> dict[str, dict[str, Path]]:
    """fp32 and int8 ONNX files of each network spec ``FILTERS:B1,B2,...`` (random weights, BatchNorm statistics
    randomised so that the network's activations are not trivially zero)."""
    import torch
    from flare.export.onnx_export import export_onnx
    from flare.export.quantize import FLOAT_LADDER, float_nodes, quantize_file
    from flare.train.networks import build_network, count_parameters

    out: dict[str, dict[str, Path]] = {}
    rng = np.random.default_rng(0)
    calib = [rng.random((1, 1, 32, 32, 32), dtype=np.float32) for _ in range(2)]
    for text in specs:
        torch.manual_seed(0)
        net = build_network(_net_spec(text)).eval()
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_var.uniform_(0.5, 1.5)
        name = f"f{text.replace(':', '_b').replace(',', '')}"
        fp32 = export_onnx(net, folder / f"{name}.fp32.onnx", 1)
        int8 = quantize_file(fp32, folder / f"{name}.int8.onnx", calib, float_nodes(fp32, FLOAT_LADDER[0]))
        out[name] = {"fp32": fp32, "int8": int8, "params": count_parameters(net)}  # type: ignore[dict-item]
    return out


def session(path: Path, threads: int) -> Any:
    """A session as the runtime's CPU engine makes it (:func:`flare.runtime.inference.engines.ort_cpu.cpu_session_options`)."""
    import onnxruntime as ort
    from flare.runtime.inference.engines.ort_cpu import cpu_session_options

    return ort.InferenceSession(str(path), cpu_session_options(threads), providers=["CPUExecutionProvider"])


def runners(models: dict[str, dict[str, Any]], threads: int, engines: list[str]) -> dict[tuple[str, str], Any]:
    """One callable per (network, precision): ONNX Runtime fp32 and int8, OpenVINO fp32 (``fp32@openvino``, made
    and released as the runtime's OpenVINO engine does)."""
    out: dict[tuple[str, str], Any] = {}
    for n, m in models.items():
        if "onnxruntime" in engines:
            for p in ("fp32", "int8"):
                s = session(m[p], threads)
                out[(n, p)] = lambda x, s=s: s.run(None, {"image": x})
        if "openvino" in engines:
            from flare.runtime.inference.engines.openvino_cpu import compile_model

            c = compile_model(m["fp32"], threads)
            out[(n, "fp32@openvino")] = lambda x, c=c: (c({0: x}), c.release_memory())
    return out


def sweep(models: dict[str, dict[str, Any]], tiles: list[int], repeats: int, threads: int,
          engines: list[str] | None = None) -> list[dict[str, Any]]:
    sessions = runners(models, threads, engines or ["onnxruntime"])
    inputs = {t: np.random.default_rng(1).random((1, 1, t, t, t), dtype=np.float32) for t in tiles}
    for run in sessions.values():  # warm-up: first runs allocate
        run(inputs[min(tiles)])
    times: dict[tuple[str, str, int], list[float]] = {}
    loads: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(repeats):
        for t in tiles:
            for (n, p), run in sessions.items():
                t0 = time.perf_counter()
                run(inputs[t])
                times.setdefault((n, p, t), []).append(time.perf_counter() - t0)
                loads.setdefault((n, p, t), []).append(os.getloadavg()[0])
    rows = []
    for (n, p, t), v in times.items():
        rows.append({"net": n, "params": models[n]["params"], "precision": p, "tile": t,
                     "median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3),
                     "us_per_voxel": round(statistics.median(v) / t**3 * 1e6, 3),
                     "load_1min": [round(x, 2) for x in loads[(n, p, t)]]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["16:1,2,2,4", "24:1,2,2,4", "32:1,2,2,4", "16:1,2,2,4,4"])
    ap.add_argument("--tiles", nargs="+", type=int, default=[96, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", nargs="+", default=["onnxruntime"], choices=["onnxruntime", "openvino"])
    ap.add_argument("-o", "--output", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flare-cpu-sweep-") as tmp:
        rows = sweep(build_models(args.nets, Path(tmp)), args.tiles, args.repeats, args.threads, args.engines)
    for r in sorted(rows, key=lambda r: (r["net"], r["tile"], r["precision"])):
        print(f"{r['net']:>16} {r['params'] / 1e6:6.2f} M  {r['precision']:>13}  {r['tile']}^3  {r['median_s']:7.3f} s "
              f"({r['us_per_voxel']} us/voxel)  load {r['load_1min']}")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
