#!/usr/bin/env bash
# The one script a GPU session runs on the device machine (see benchmarks/GPU-RUN.md for the whole procedure).
#
# usage: bash benchmarks/gpu_check.sh [STAGE ...]      (from the repository root; default: all)
#   stash   copy the onnxruntime-gpu parts carried in this call into $WORK (parts come one call at a time)
#   setup   unpack onnxruntime-gpu, install the carried wheels, make flare importable, check the CUDA provider
#   export  random-weight flare23-size checkpoints (locator + 5 folds) -> bundle (fp32 + fp16) with flare-export
#   tests   pytest tests/test_gpu_runtime.py (the gpu-marked tests run here)
#   device  device-resident pipeline: memory model sweep, budgets, warm/cold times, fp16 vs fp32 agreement
#   bench   flare-bench on the FLARE-size synthetic cases, with the MONAI reference, on cuda
#   all     setup export tests device bench
#
# Inputs carried into .gpu/ (ignored by git): ort/onnxruntime_gpu.part.NN, whl/*.whl (monai, nibabel,
# connected-components-3d), data/*.nii.gz (copy of ../shared/data), unpack_chunks.py (copy of ../shared/tools).
# Results go to $OUT (at most 8 files come back): gpu_check.log, pytest_gpu.txt, device_check.json,
# memory_model.json, report.md, report.json, bench.tgz.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
GPU_DIR=${FLARE_GPU_DIR:-$REPO/.gpu}
WORK=${FLARE_GPU_WORK:-/tmp/flare-gpu}
OUT=${OUT:-$REPO/gpu-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"

log() { printf '[gpu_check %s] %s\n' "$(date +%T)" "$*" | tee -a "$OUT/gpu_check.log"; }

stash() {
  mkdir -p "$WORK/ort-parts"
  local n=0 part
  for part in "$GPU_DIR"/ort/*.part.*; do
    [ -e "$part" ] || continue
    cp "$part" "$WORK/ort-parts/" && n=$((n + 1))
  done
  log "stashed $n part(s); now in $WORK/ort-parts: $(find "$WORK/ort-parts" -name '*.part.*' | wc -l)"
}

environment() {
  # onnxruntime-gpu first on the path (it shadows the image's CPU onnxruntime), then the carried wheels, then flare
  export PYTHONPATH="$WORK/ort:$WORK/site:$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
  export FLARE_SHARED_DATA="$GPU_DIR/data"
  export XDG_CACHE_HOME="$WORK/cache"
  export PYTHONUNBUFFERED=1
  # CUDA/cuDNN/cuBLAS of the pip-installed nvidia-* packages (what torch uses) for processes that never import torch
  local libs
  libs=$("$PY" - <<'EOF'
import glob, os
try:
    import nvidia
    dirs = {os.path.dirname(p) for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "**", "lib*.so*"),
                                                                                recursive=True)}
    print(":".join(sorted(dirs)))
except ImportError:
    print("")
EOF
)
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

setup() {
  stash
  if [ ! -d "$WORK/ort/onnxruntime" ]; then
    "$PY" "$GPU_DIR/unpack_chunks.py" "$WORK/ort-parts" "$WORK/ort" | tee -a "$OUT/gpu_check.log"
  fi
  if [ ! -d "$WORK/site" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$GPU_DIR"/whl/*.whl
  fi
  mkdir -p "$WORK/shim/flare"
  local pkg
  for pkg in runtime train export benchmarks; do ln -sfn "$REPO/$pkg" "$WORK/shim/flare/$pkg"; done
  environment
  {
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    "$PY" - <<'EOF'
import torch  # loads cuDNN/cuBLAS before onnxruntime
import onnxruntime as ort, cupy, monai, nibabel
print("torch", torch.__version__, "cuda", torch.version.cuda, "| onnxruntime", ort.__version__, ort.__file__)
print("providers", ort.get_available_providers(), "| cupy", cupy.__version__, "| monai", monai.__version__,
      "| nibabel", nibabel.__version__)
assert "CUDAExecutionProvider" in ort.get_available_providers(), "onnxruntime-gpu did not load"
EOF
  } 2>&1 | tee -a "$OUT/gpu_check.log"
}

export_bundle() {
  environment
  if [ -f "$WORK/bundle/bundle.json" ]; then log "bundle exists: $WORK/bundle"; return; fi
  log "random-weight flare23-size checkpoints -> $WORK/ckpt"
  "$PY" - "$WORK/ckpt" <<'EOF'
import sys
from pathlib import Path
import torch
from flare.train.checkpoints import save_checkpoint
from flare.train.networks import FLARE23_NETWORK, LOCATOR_NETWORK, build_network, count_parameters

root = Path(sys.argv[1])
base = {"stage": 2, "spacing_mm": [1.0, 1.0, 1.0], "hu_window": [-250.0, 250.0], "roi": [224, 224, 224],
        "labels": "flare23-merged13"}
for k in range(5):
    torch.manual_seed(k)
    net = build_network(FLARE23_NETWORK).eval()
    save_checkpoint(root / f"fold{k}", net, {**base, "network": FLARE23_NETWORK, "role": "fold", "fold": k})
print("fold parameters", count_parameters(net))
torch.manual_seed(99)
loc = build_network(LOCATOR_NETWORK).eval()
with torch.no_grad():  # bias the organ logit up so the random locator finds a box
    [m for m in loc.modules() if isinstance(m, torch.nn.Conv3d)][-1].bias.fill_(0.5)
save_checkpoint(root / "locator", loc, {**base, "network": LOCATOR_NETWORK, "role": "locator", "fold": None,
                                        "spacing_mm": [4.0, 4.0, 4.0], "roi": [128, 128, 128],
                                        "labels": "organ-union", "locator_margin_mm": 20.0})
EOF
  log "flare-export (fp32 + fp16, no CPU verification: the GPU checks compare paths)"
  "$PY" -m flare.export.cli "$WORK/ckpt" -o "$WORK/bundle" --fp16 --no-verify -q 2>&1 | tee -a "$OUT/gpu_check.log"
}

run_tests() {
  environment
  log "pytest tests/test_gpu_runtime.py (gpu-marked tests included)"
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_runtime.py 2>&1 | tee "$OUT/pytest_gpu.txt" || true
}

device_check() {
  environment
  log "memory model sweep, one fp16 and one fp32 session (fresh process each)"
  local precision
  rm -f "$WORK/sweep.jsonl"
  for precision in fp16 fp32; do
    "$PY" - "$WORK/bundle" "$precision" >>"$WORK/sweep.jsonl" <<'EOF' || log "sweep $precision failed"
import json, sys, time
import numpy as np
import torch  # noqa: F401  (cuDNN/cuBLAS for onnxruntime)
import cupy
from flare.runtime.bundle import load_bundle
from flare.runtime.cuda_engine import CudaOrtEngine
from flare.runtime.gpu import device_memory_used_mb

spec, precision = load_bundle(sys.argv[1]).folds[0], sys.argv[2]
eng = CudaOrtEngine(spec, precision)
for side in (96, 128, 160, 192, 224):
    x = cupy.random.random((1, 1, side, side, side), dtype=cupy.float32)
    eng.run_cupy(x)
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        eng.run_cupy(x)
    cupy.cuda.Device().synchronize()
    ms = (time.perf_counter() - t0) / 3 * 1e3
    print(json.dumps({"precision": precision, "side": side, "used_mb": round(device_memory_used_mb(), 1),
                      "ms": round(ms, 2)}), flush=True)
EOF
  done
  log "device-resident pipeline on a 288x240x400 crop, 5 folds"
  "$PY" - "$WORK/bundle" "$GPU_DIR/data" "$WORK/sweep.jsonl" "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/gpu_check.log"
import json, sys, time
from pathlib import Path
import numpy as np
import torch  # noqa: F401  (cuDNN/cuBLAS for onnxruntime)
import cupy
import nibabel as nib
from flare.runtime import gpu
from flare.runtime.budget import choose_roi, estimate_peak_mb, run_with_fallback
from flare.runtime.bundle import load_bundle
from flare.runtime.cuda_engine import CudaOrtEngine

bundle, data, sweep_file, out = load_bundle(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
sweep = [json.loads(l) for l in sweep_file.read_text().splitlines() if l.strip()]
fits = {}
for precision in ("fp16", "fp32"):
    rows = [r for r in sweep if r["precision"] == precision]
    if len(rows) >= 2:
        v = np.array([r["side"] ** 3 for r in rows], float)
        slope, const = np.polyfit(v, np.array([r["used_mb"] for r in rows]) * 1e6, 1)
        fits[precision] = {"bytes_per_voxel": round(slope, 1), "fixed_mb": round(const / 1e6, 1), "rows": rows}
(out / "memory_model.json").write_text(json.dumps(fits, indent=2) + "\n")
print("memory model", {k: (v["bytes_per_voxel"], v["fixed_mb"]) for k, v in fits.items()})

region = np.asarray(nib.load(data / "ts_body_ct_3mm_int32.nii.gz").dataobj).astype(np.int16)
shape = (288, 240, 400)
sync = cupy.cuda.Device().synchronize
report = {"device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "crop_shape": shape, "runs": []}
peak = gpu.DeviceMemoryPeak()
report["used_before_mb"] = peak.peak_mb
engines, labels = {}, {}
for precision, budget in (("fp16", 2000), ("fp16", 3000), ("fp16", 4000), ("fp32", 8000)):
    if precision not in engines:  # fp32 sessions only after the fp16 runs, so fp16 peaks hold fp16 weights only
        t0 = time.perf_counter()
        engines[precision] = [CudaOrtEngine(s, precision) for s in bundle.folds]
        report[f"load_{precision}_s"] = round(time.perf_counter() - t0, 3)
    roi = choose_roi(budget, shape, "onnxruntime-cuda", precision)
    for rep in range(3):  # rep 0 is cold for this tile shape (cuDNN plans), reps 1-2 warm
        cupy.get_default_memory_pool().free_all_blocks()
        sync(); t = time.perf_counter()
        vol = gpu.crop_resample_xp(region, shape, bundle.hu_window, cupy)
        sync(); t_pre = time.perf_counter() - t
        record = []
        ens = run_with_fallback(
            lambda r: gpu.infer_ensemble_xp(vol, engines[precision], r, cupy, spacing_z=1.0, on_tile=peak.sample),
            [roi], None, record=record)
        total = time.perf_counter() - t
        del vol
        labels[(precision, budget)] = ens.labels
        run = {"precision": precision, "budget_mb": budget, "roi": list(roi), "rep": rep, "tiles": ens.tiles,
               "z_range": ens.z_range, "crop_resample_s": round(t_pre, 4), "total_s": round(total, 4),
               "modelled_peak_mb": round(estimate_peak_mb(roi, shape, "onnxruntime-cuda", precision)),
               "measured_peak_mb": None if peak.peak_mb is None else round(peak.peak_mb), "oom": record}
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
ref = labels[("fp32", 8000)]
report["agreement_vs_fp32"] = {f"{p}/{b}": float((l == ref).mean()) for (p, b), l in labels.items()}
print("agreement", report["agreement_vs_fp32"])
(out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
EOF
}

bench() {
  environment
  log "flare-bench --device cuda --reference on the synthetic FLARE-size cases"
  "$PY" -m flare.benchmarks.cli --bundle "$WORK/bundle" --cases "${BENCH_CASES:-synthetic}" -o "$WORK/bench" \
    --reference --checkpoints "$WORK/ckpt" --device cuda --repeats "${BENCH_REPEATS:-2}" --cold 1 \
    --cache "$WORK/cases" -q 2>&1 | tee -a "$OUT/gpu_check.log" || log "flare-bench failed"
  if [ -d "$WORK/bench" ]; then
    cp "$WORK/bench/report.md" "$WORK/bench/report.json" "$OUT/" 2>/dev/null || true
    tar czf "$OUT/bench.tgz" -C "$WORK/bench" .
  fi
}

[ "$#" -gt 0 ] || set -- all
for stage in "$@"; do
  case "$stage" in
    stash) stash ;;
    setup) setup ;;
    export) export_bundle ;;
    tests) run_tests ;;
    device) device_check ;;
    bench) bench ;;
    all) setup; export_bundle; run_tests; device_check; bench ;;
    *) echo "gpu_check.sh: unknown stage $stage (stash setup export tests device bench all)" >&2; exit 2 ;;
  esac
done
log "done: $*"
