#!/usr/bin/env bash
# The one script a GPU session runs on the device machine (benchmarks/GPU-RUN.md has the whole procedure).
#
# usage: bash benchmarks/gpu_check.sh stash          (one call per onnxruntime-gpu part, back to back)
#        bash benchmarks/gpu_check.sh run            (one call, <= 8 min: every stage below, most important first)
#        bash benchmarks/gpu_check.sh STAGE ...      (single stages, for reruns on a warm machine)
#
# Stages of `run`, in order, each under its own `timeout` and all within GPU_CHECK_SECONDS (default 470 s):
#   setup    unpack onnxruntime-gpu, install the carried wheels, make flare importable, check the CUDA provider
#   bundle   random-weight flare23-size bundle (locator + fold0 exported fp32+fp16, folds 1-4 = copies of fold0)
#            and the synthetic 512x512x300 case (the issue's worst case: the random locator keeps the whole image)
#   bench    flare-bench --device cuda on that case: cold flare-run processes (the issue's "cold <= 5 s"), warm
#            runs, NVML device peak sampled every 20 ms, per-stage times and backend `load` sub-timings
#   budget   warm runs at --gpu-mem-budget 2000 vs the default 4000, a fresh process each: time, NVML peak,
#            tiles chosen, arena limit (the issue's "peak <= budget at <= 1.5x the default time")
#   sweep    engine memory per tile size, one FRESH process per (precision, side): fixed + bytes/voxel rows
#   tests    pytest tests/runtime/inference/test_gpu_runtime.py (gpu-marked tests: engines, device ensemble, real OOM -> CPU)
#   monai    the MONAI reference on ONE case, one fold (flare-bench --reference): the speed ratio
#
# Carried into .gpu/ (ignored by git): ort/onnxruntime_gpu.part.NN (stash calls), whl/*.whl (monai, nibabel,
# connected-components-3d), data/*.nii.gz (copy of ../shared/data), unpack_chunks.py (copy of ../shared/tools).
# $OUT gets, as each stage finishes: gpu_check.log, stages.tsv (stage, rc, seconds), bench-report.json and
# bench-report.md (commit the json as benchmarks/results/gpu/<date>-<gpu>.json), budget.jsonl, sweep.jsonl,
# pytest_gpu.txt, monai-report.json.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
GPU_DIR=${FLARE_GPU_DIR:-$REPO/.gpu}
WORK=${FLARE_GPU_WORK:-/tmp/flare-gpu}
OUT=${OUT:-$REPO/gpu-out}
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_SECONDS:-470}
DEVICE=${GPU_CHECK_DEVICE:-cuda}  # cpu: a dry run of the scripts on a machine without a GPU (bench/budget/monai)
T0=$(date +%s)
mkdir -p "$OUT" "$WORK"

log() { printf '[gpu_check %s] %s\n' "$(date +%T)" "$*" | tee -a "$OUT/gpu_check.log"; }

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

# stage NAME SECONDS FUNCTION: run FUNCTION under `timeout` (capped by the time left), record rc and seconds
stage() {
  local name=$1 limit=$2 fn=$3 t rc rest
  rest=$(left)
  if [ "$rest" -lt 15 ]; then log "skip $name: ${rest}s left"; printf '%s\tskipped\t0\n' "$name" >>"$OUT/stages.tsv"; return; fi
  [ "$limit" -gt "$rest" ] && limit=$rest
  log "stage $name (timeout ${limit}s)"
  t=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "source '$REPO/benchmarks/gpu_check.sh' --lib && $fn"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" $(($(date +%s) - t)) >>"$OUT/stages.tsv"
  log "stage $name: rc $rc in $(($(date +%s) - t))s"
}

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
  # CUDA/cuDNN/cuBLAS of the pip-installed nvidia-* packages (what torch uses), for flare-run processes that never
  # import torch (python scripts below `import torch` before onnxruntime instead)
  if [ -z "${FLARE_NVIDIA_LIBS+x}" ]; then
    FLARE_NVIDIA_LIBS=$("$PY" -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for b in nvidia.__path__ for p in glob.glob(os.path.join(b, "**", "lib*.so*"), recursive=True)})))' 2>/dev/null)
    export FLARE_NVIDIA_LIBS
  fi
  export LD_LIBRARY_PATH="${FLARE_NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

setup() {
  stash
  if [ ! -d "$WORK/ort/onnxruntime" ]; then
    "$PY" "$GPU_DIR/unpack_chunks.py" "$WORK/ort-parts" "$WORK/ort" || return 1
  fi
  if [ ! -d "$WORK/site" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$GPU_DIR"/whl/*.whl \
      || return 1
  fi
  mkdir -p "$WORK/shim/flare"
  local pkg
  for pkg in runtime train export benchmarks; do ln -sfn "$REPO/$pkg" "$WORK/shim/flare/$pkg"; done
  environment
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee "$OUT/gpu.csv"
  "$PY" - <<'EOF'
import torch  # loads cuDNN/cuBLAS before onnxruntime
import onnxruntime as ort, cupy, monai, nibabel
print("torch", torch.__version__, "cuda", torch.version.cuda, "| onnxruntime", ort.__version__, ort.__file__)
print("providers", ort.get_available_providers(), "| cupy", cupy.__version__, "| monai", monai.__version__,
      "| nibabel", nibabel.__version__)
assert "CUDAExecutionProvider" in ort.get_available_providers(), "onnxruntime-gpu did not load"
EOF
}

make_bundle() {
  environment
  [ -f "$WORK/cases/flare_n300.nii.gz" ] && [ -f "$WORK/bundle/bundle.json" ] && { log "bundle and case exist"; return; }
  "$PY" - "$WORK" <<'EOF'
import json, shutil, sys, time
from pathlib import Path
import torch  # noqa: F401  (before onnxruntime)
from flare.benchmarks.cases import SYNTHETIC, build_case
from flare.export.bundle_export import export_bundle
from flare.runtime.bundle.manifest import write_bundle_json
from flare.train.checkpoints import save_checkpoint
from flare.train.networks import FLARE23_NETWORK, LOCATOR_NETWORK, build_network

work = Path(sys.argv[1])
ckpt, bundle = work / "ckpt", work / "bundle"
t0 = time.perf_counter()
if (bundle / "bundle.json").is_file():  # a bundle placed there beforehand (dry runs): only the case is missing
    build_case(next(c for c in SYNTHETIC if c.name == "flare_n300"), work / "cases" / "flare_n300.nii.gz")
    sys.exit(0)
base = {"stage": 2, "spacing_mm": [1.0, 1.0, 1.0], "hu_window": [-250.0, 250.0], "roi": [224, 224, 224],
        "labels": "flare23-merged13"}
torch.manual_seed(0)
save_checkpoint(ckpt / "fold0", build_network(FLARE23_NETWORK).eval(),
                {**base, "network": FLARE23_NETWORK, "role": "fold", "fold": 0})
torch.manual_seed(99)
loc = build_network(LOCATOR_NETWORK).eval()
with torch.no_grad():  # organ logit biased up: the random locator keeps (nearly) the whole image, the worst case
    [m for m in loc.modules() if isinstance(m, torch.nn.Conv3d)][-1].bias.fill_(0.5)
save_checkpoint(ckpt / "locator", loc, {**base, "network": LOCATOR_NETWORK, "role": "locator", "fold": None,
                                        "spacing_mm": [4.0, 4.0, 4.0], "roi": [128, 128, 128],
                                        "labels": "organ-union", "locator_margin_mm": 20.0})
export_bundle(ckpt, bundle, fp16=True, verify=False, progress=False)
# folds 1-4: copies of fold0 (5 sessions, 5 runs per tile: the timing and memory of a 5-fold bundle)
doc = json.loads((bundle / "bundle.json").read_text())
fold0 = doc["folds"][0]
for k in range(1, 5):
    shutil.copytree(ckpt / "fold0", ckpt / f"fold{k}")
    entry = json.loads(json.dumps(fold0))
    entry["name"] = f"fold{k}"
    for f in entry["files"].values():
        new = f["path"].replace("fold0", f"fold{k}")
        shutil.copy(bundle / f["path"], bundle / new)
        f["path"] = new
    doc["folds"].append(entry)
write_bundle_json(bundle, doc)
print("bundle", bundle, "in", round(time.perf_counter() - t0, 1), "s")
build_case(next(c for c in SYNTHETIC if c.name == "flare_n300"), work / "cases" / "flare_n300.nii.gz")
print("case", work / "cases" / "flare_n300.nii.gz")
EOF
}

bench() {
  environment
  "$PY" -m flare.benchmarks.cli --bundle "$WORK/bundle" --cases "$WORK/cases/flare_n300.nii.gz" -o "$WORK/bench" \
    --device "$DEVICE" --repeats "${BENCH_REPEATS:-3}" --cold "${BENCH_COLD:-3}" -q
  cp "$WORK/bench/report.json" "$OUT/bench-report.json"
  cp "$WORK/bench/report.md" "$OUT/bench-report.md"
}

budget() {
  environment
  local b
  for b in 4000 2000; do  # a fresh process per budget: ONNX Runtime's arena cap is set once per process
    "$PY" - "$WORK/bundle" "$WORK/cases/flare_n300.nii.gz" "$b" "$DEVICE" >>"$OUT/budget.jsonl" <<'EOF'
import json, sys
import torch  # noqa: F401  (before onnxruntime)
from flare.runtime import Segmenter
from flare.runtime.image.nifti import read_image

seg = Segmenter(sys.argv[1], device=sys.argv[4], gpu_mem_budget=float(sys.argv[3]))
img = read_image(sys.argv[2])
runs = [seg.segment(img)[2] for _ in range(3)]  # run 0 is cold for the tile shape (cuDNN plans)
print(json.dumps({"budget_mb": float(sys.argv[3]), "total_s": [r["total_s"] for r in runs],
                  "infer_s": [r["stages"]["infer"] for r in runs], "gpu": runs[-1].get("gpu"),
                  "peak_mb": [r["gpu_peak_mb"] for r in runs], "tiles": runs[-1]["tiles"],
                  "load": runs[0]["backend"]["load"]}), flush=True)
EOF
  done
  cat "$OUT/budget.jsonl"
}

sweep() {
  environment
  local precision side
  for precision in fp16 fp32; do
    for side in 96 128 160 192; do  # a FRESH process per size: one session's arena only ever grows
      "$PY" - "$WORK/bundle" "$precision" "$side" >>"$OUT/sweep.jsonl" <<'EOF' || log "sweep $precision $side failed"
import json, sys, time
import torch  # noqa: F401  (before onnxruntime)
import cupy
from flare.runtime.bundle.manifest import load_bundle
from flare.runtime.inference.device import device_memory_used_mb
from flare.runtime.inference.engines.ort_cuda import CudaOrtEngine

spec, precision, side = load_bundle(sys.argv[1]).folds[0], sys.argv[2], int(sys.argv[3])
before = device_memory_used_mb()
eng = CudaOrtEngine(spec, precision)
x = cupy.random.random((1, 1, side, side, side), dtype=cupy.float32)
t0 = time.perf_counter(); eng.run_cupy(x); cupy.cuda.Device().synchronize(); first = time.perf_counter() - t0
t0 = time.perf_counter()
for _ in range(3):
    eng.run_cupy(x)
cupy.cuda.Device().synchronize()
print(json.dumps({"precision": precision, "side": side, "used_before_mb": round(before, 1),
                  "used_mb": round(device_memory_used_mb(), 1), "first_ms": round(first * 1e3, 1),
                  "ms": round((time.perf_counter() - t0) / 3 * 1e3, 2)}), flush=True)
EOF
    done
  done
  cat "$OUT/sweep.jsonl"
}

run_tests() {
  environment
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/runtime/inference/test_gpu_runtime.py 2>&1 | tee "$OUT/pytest_gpu.txt"
}

monai() {
  environment
  "$PY" -m flare.benchmarks.cli --bundle "$WORK/bundle" --cases "$WORK/cases/flare_n300.nii.gz" -o "$WORK/monai" \
    --device "$DEVICE" --repeats 1 --cold 0 --reference --reference-cases 1 --reference-folds 1 \
    --checkpoints "$WORK/ckpt" -q
  cp "$WORK/monai/report.json" "$OUT/monai-report.json"
  cp "$WORK/monai/report.md" "$OUT/monai-report.md"
}

[ "${1:-}" = "--lib" ] && return 0 2>/dev/null
[ "$#" -gt 0 ] || set -- run
for name in "$@"; do
  case "$name" in
    stash) stash ;;
    run)
      stage setup 90 setup
      stage bundle 120 make_bundle
      stage bench 150 bench
      stage budget 90 budget
      stage sweep 90 sweep
      stage tests 120 run_tests
      stage monai 120 monai
      ;;
    setup) stage setup 90 setup ;;
    bundle) stage bundle 120 make_bundle ;;
    bench) stage bench 150 bench ;;
    budget) stage budget 90 budget ;;
    sweep) stage sweep 90 sweep ;;
    tests) stage tests 120 run_tests ;;
    monai) stage monai 120 monai ;;
    *) echo "gpu_check.sh: unknown stage $name (stash run setup bundle bench budget sweep tests monai)" >&2; exit 2 ;;
  esac
done
log "done: $* ($(( $(date +%s) - T0 ))s)"
