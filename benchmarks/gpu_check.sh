#!/usr/bin/env bash
# The one script a GPU session runs on the device machine (benchmarks/GPU-RUN.md has the whole procedure,
# docs/benchmarks.md what each stage writes).
#
# usage: bash benchmarks/gpu_check.sh stash                 (one call per onnxruntime-gpu part, back to back)
#        bash benchmarks/gpu_check.sh run                   (one call, < 10 min: every stage below, in order)
#        bash benchmarks/gpu_check.sh STAGE ...             (single stages, for reruns on a warm machine)
#        bash benchmarks/gpu_check.sh --dry-run [run|STAGE ...]   (the same on a CPU: see GPU-RUN.md)
#
# Stages of `run`, in order, each under its own `timeout`, all within GPU_CHECK_SECONDS (default 520 s). setup,
# smoke and bundle are gates: when one fails, every later stage is skipped (recorded as such), not run blind.
#   setup   unpack onnxruntime-gpu, install the carried wheels, import every flare.runtime module and every package
#           the runtime needs, CUDA provider present
#   smoke   (~30 s) one CUDA session of a small fp16 graph (Conv, BatchNormalization, Relu, Conv), one 96^3 tile,
#           NVML before/after creating the session, finite output
#   bundle  flare23-size random-weight folds with a rule locator that crops like a trained one (bundle) and the
#           keep-everything locator (bundle-worst), the synthetic 512x512x300 case; the bundles loaded once
#   bench   flare-bench --cold 2 --repeats 2 on the realistic case, then on the worst case
#   budget  --gpu-mem-budget 2000, then 4000: a fresh process each, 2 runs, one JSON line per run
#   tests   every test file with gpu-marked tests (pytest -m gpu)
#   sweep   one fold's session per (precision, tile side, prefer_nhwc, cuDNN search): fresh process per point
#   monai   the MONAI reference on one case, one fold (flare-bench --reference)
#
# $OUT gets at most 7 files, each written or appended as its stage goes (tests/benchmarks/test_gpu_check.py counts
# them): gpu_check.log (all output), stages.tsv (stage, rc, seconds), results.jsonl (one JSON line per result:
# setup, smoke, bundle, every bench run, every budget run, every sweep point), bench-report.json,
# bench-worst-report.json, pytest_gpu.txt, monai-report.json.
# Carried into .gpu/ (ignored by git): ort/onnxruntime_gpu.part.NN (stash calls), whl/*.whl and data/*.nii.gz
# (`python -m flare.benchmarks.device_image fetch .gpu`; `cp ../shared/data/*.nii.gz .gpu/data/`),
# unpack_chunks.py (copy of ../shared/tools/unpack_chunks.py).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
export GPU_CHECK_DRY_RUN=$DRY  # the stage subshells source this file again
GPU_DIR=${FLARE_GPU_DIR:-$REPO/.gpu}
WORK=${FLARE_GPU_WORK:-/tmp/flare-gpu}
OUT=${OUT:-$REPO/gpu-out}
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then  # a CPU: the scripts, imports and files are what is checked, not the speed
  DEVICE=cpu; SIZE=${GPU_CHECK_SIZE:-tiny}; SIDES=${GPU_CHECK_SIDES:-"32 64"}; SCALE=${GPU_CHECK_TIMEOUT_SCALE:-8}
  CASE=${GPU_CHECK_CASE:-$GPU_DIR/data/ts_abdomen_ct_3mm.nii.gz}; RUNS=1
else
  DEVICE=cuda; SIZE=${GPU_CHECK_SIZE:-flare23}; SIDES=${GPU_CHECK_SIDES:-"96 128 160 192"}; SCALE=1
  CASE=${GPU_CHECK_CASE:-$WORK/cases/flare_n300.nii.gz}; RUNS=2
fi
BUDGET_S=${GPU_CHECK_SECONDS:-$((520 * SCALE))}
COLD=${BENCH_COLD:-$RUNS}
REPEATS=${BENCH_REPEATS:-$RUNS}
T0=$(date +%s)
ABORT=""
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu_check.log
RESULTS=$OUT/results.jsonl

log() { printf '[gpu_check %s] %s\n' "$(date +%T)" "$*" >>"$LOG"; printf '[gpu_check %s] %s\n' "$(date +%T)" "$*"; }

left() { echo $((BUDGET_S - ($(date +%s) - T0))); }

# stage NAME SECONDS FUNCTION [gate]: run FUNCTION under `timeout` (capped by the time left); its real exit code
# goes to stages.tsv; a failed gate stage skips everything after it
stage() {
  local name=$1 limit=$2 fn=$3 gate=${4:-} t rc rest
  if [ -n "$ABORT" ]; then
    log "skip $name: $ABORT"; printf '%s\tskipped (%s)\t0\n' "$name" "$ABORT" >>"$OUT/stages.tsv"; return 0
  fi
  rest=$(left)
  if [ "$rest" -lt 15 ]; then
    log "skip $name: ${rest}s left"; printf '%s\tskipped (time)\t0\n' "$name" >>"$OUT/stages.tsv"; return 0
  fi
  limit=$((limit * SCALE))
  [ "$limit" -gt "$rest" ] && limit=$rest
  log "stage $name (timeout ${limit}s)"
  t=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "source '$REPO/benchmarks/gpu_check.sh' --lib && $fn" >>"$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" $(($(date +%s) - t)) >>"$OUT/stages.tsv"
  log "stage $name: rc $rc in $(($(date +%s) - t))s"
  if [ "$rc" -ne 0 ] && [ -n "$gate" ]; then ABORT="$name failed (rc $rc)"; fi
  return 0
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
  # import torch (the python steps `import torch` before onnxruntime instead)
  if [ -z "${FLARE_NVIDIA_LIBS+x}" ]; then
    FLARE_NVIDIA_LIBS=$("$PY" -c 'import glob, os, nvidia
print(":".join(sorted({os.path.dirname(p) for b in nvidia.__path__ for p in glob.glob(os.path.join(b, "**", "lib*.so*"), recursive=True)})))' 2>/dev/null)
    export FLARE_NVIDIA_LIBS
  fi
  export LD_LIBRARY_PATH="${FLARE_NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# a python step of flare.benchmarks.gpu_check: JSON lines to results.jsonl, its exit code returned
step() { "$PY" -m flare.benchmarks.gpu_check "$@" --device "$DEVICE" >>"$RESULTS"; }

setup() {
  if [ "$DRY" != 1 ]; then
    stash
    if [ ! -d "$WORK/ort/onnxruntime" ]; then
      "$PY" "$GPU_DIR/unpack_chunks.py" "$WORK/ort-parts" "$WORK/ort" || return 1
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv || return 1
  fi
  if [ ! -d "$WORK/site" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$GPU_DIR"/whl/*.whl \
      || { rm -rf "$WORK/site"; return 1; }
  fi
  mkdir -p "$WORK/shim/flare"
  local pkg
  for pkg in runtime train export benchmarks; do ln -sfn "$REPO/$pkg" "$WORK/shim/flare/$pkg"; done
  environment
  step setup
}

smoke() { environment; step smoke --side "${SMOKE_SIDE:-96}"; }

make_bundle() {
  environment
  local case=flare_n300
  [ "$DRY" = 1 ] && case=none
  "$PY" -m flare.benchmarks.gpu_bundle "$WORK" --size "$SIZE" --case "$case" >>"$RESULTS" || return 1
  [ -f "$CASE" ] || { echo "gpu_check: case $CASE is missing" >&2; return 1; }
  step bundle --bundle "$WORK/bundle" && step bundle --bundle "$WORK/bundle-worst"
}

bench_one() {  # bench_one BUNDLE REPORT_NAME
  local out="$WORK/bench-$(basename "$1")"
  "$PY" -m flare.benchmarks.cli --bundle "$1" --cases "$CASE" -o "$out" --device "$DEVICE" \
    --repeats "$REPEATS" --cold "$COLD" --runs-log "$RESULTS" -q
  local rc=$?
  [ -f "$out/report.json" ] && cp "$out/report.json" "$OUT/$2"
  return $rc
}

bench() {
  environment
  local rc=0
  bench_one "$WORK/bundle" bench-report.json || rc=1
  bench_one "$WORK/bundle-worst" bench-worst-report.json || rc=1
  return $rc
}

budget() {
  environment
  local b rc=0
  for b in 2000 4000; do  # a fresh process per budget: ONNX Runtime's arena cap is set once per process
    step budget --bundle "$WORK/bundle" --case "$CASE" --budget "$b" --runs "$RUNS" || rc=1
  done
  return $rc
}

run_tests() {
  environment
  local files
  files=$(grep -rl --include='test_*.py' 'mark.gpu' tests | sort)
  if ! "$PY" -c "import torch, monai" 2>/dev/null; then  # dry run without torch: files that need it at import
    echo "without torch/monai here, not collected: $(grep -lE '^(import|from) (torch|monai)' $files | tr '\n' ' ')"
    files=$(grep -LE '^(import|from) (torch|monai)' $files)
  fi
  [ -n "$files" ] || { echo "no gpu-marked tests found" >"$OUT/pytest_gpu.txt"; return 1; }
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu $files >"$OUT/pytest_gpu.txt" 2>&1
}

sweep() {
  environment
  local precision side rc=0
  for precision in fp16 fp32; do
    for side in $SIDES; do  # a FRESH process per point: one session's arena only ever grows
      step sweep --bundle "$WORK/bundle" --precision "$precision" --side "$side" || rc=1
    done
  done
  [ "$DEVICE" = cuda ] || return $rc  # prefer_nhwc and the cuDNN search exist on the CUDA provider only
  for side in 128 192; do  # prefer_nhwc=1 for fp16 (NaN on the H100 with a plain fp16 cast; now BN is fp16 too)
    step sweep --bundle "$WORK/bundle" --precision fp16 --side "$side" --nhwc 1 || rc=1
  done
  step sweep --bundle "$WORK/bundle" --precision fp16 --side 128 --algo EXHAUSTIVE || rc=1
  step sweep --bundle "$WORK/bundle" --precision fp16 --side 128 --nhwc 1 --algo EXHAUSTIVE || rc=1
  return $rc
}

monai() {
  environment
  if ! "$PY" -c "import torch, monai" 2>/dev/null; then
    echo "gpu_check: monai stage needs torch and monai (not in this environment)" >&2
    [ "$DRY" = 1 ] && return 0
    return 1
  fi
  local out="$WORK/monai"
  "$PY" -m flare.benchmarks.cli --bundle "$WORK/bundle" --cases "$CASE" -o "$out" --device "$DEVICE" \
    --repeats 1 --cold 0 --reference --reference-cases 1 --reference-folds 1 --checkpoints "$WORK/ckpt" \
    --runs-log "$RESULTS" -q
  local rc=$?
  [ -f "$out/report.json" ] && cp "$out/report.json" "$OUT/monai-report.json"
  return $rc
}

[ "${1:-}" = "--lib" ] && return 0 2>/dev/null
[ "$#" -gt 0 ] || set -- run
log "gpu_check $* (device $DEVICE, size $SIZE, dry run $DRY, case $CASE, budget ${BUDGET_S}s)"
for name in "$@"; do
  case "$name" in
    stash) stash ;;
    run)
      stage setup 90 setup gate
      stage smoke 45 smoke gate
      stage bundle 150 make_bundle gate
      stage bench 150 bench
      stage budget 90 budget
      stage tests 100 run_tests
      stage sweep 80 sweep
      stage monai 90 monai
      ;;
    setup) stage setup 90 setup gate ;;
    smoke) stage smoke 45 smoke gate ;;
    bundle) stage bundle 150 make_bundle gate ;;
    bench) stage bench 150 bench ;;
    budget) stage budget 90 budget ;;
    tests) stage tests 100 run_tests ;;
    sweep) stage sweep 80 sweep ;;
    monai) stage monai 90 monai ;;
    *) echo "gpu_check.sh: unknown stage $name (stash run setup smoke bundle bench budget tests sweep monai)" >&2
       exit 2 ;;
  esac
done
log "done: $* ($(( $(date +%s) - T0 ))s)"
# the exit code of the whole run: 0 only when every stage that ran returned 0 and none was skipped
if [ -f "$OUT/stages.tsv" ] && awk -F'\t' '$2 != "0" { bad = 1 } END { exit !bad }' "$OUT/stages.tsv"; then exit 1; fi
exit 0
