#!/usr/bin/env bash
# The one prepared check of a lent GPU (issue 12): every figure the README owes, in one call of at most
# 9 minutes. Each step has its own time limit, so that a slow step cannot eat the rest:
#   1. build the CUDA extension (ninja, 16 jobs, sm_90 only) and time it          limit  90 s
#   2. fatezero-fast info --selftest: every backend against the reference        limit  90 s
#   3. pytest -m gpu -x -q, stopped by its own budget before the limit            limit 140 s (budget 115 s)
#   4. bench_attention.py --quick: SD-1.4 shapes for sdpa/triton/cuda, FateZero's
#      materialized attention, two SDPA calls + lerp                              limit  90 s
#   5. one 8-frame 512x512 fp16 edit on the random SD-1.4-shaped model, unchunked
#      and chunked: (a) recompute store, (b) qk store                             limit  50 s each
#   6. temporal attention of tuned checkpoints (F frames at each pixel): SDPA against
#      the own op's GPU backends, SD-1.4's levels, F = 8 and 24                   limit  30 s
# The limits add up to 540 s; a step's limit is also cut to what is left of the 540 s. They are
# estimates until a GPU has run the script: the JSON records each step's time against its limit.
# Everything lands as JSON (device and versions included) in $OUT when it is set, else in
# benchmarks/results/: gpu_check.json (the summary: each step's status, time and figures),
# gpu_check.log, selftest_cuda.json, pytest_gpu.json, attention_cuda_quick.json,
# pipeline_cuda_e2e_recompute.json, pipeline_cuda_e2e_qk.json, temporal_cuda.json.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine (see benchmarks/README.md, "GPU check")
#   bash benchmarks/gpu_check.sh --rehearsal   # the same steps on the CPU, tiny shapes, *_rehearsal files
#
# Missing Python packages travel as wheels in .whl/ (benchmarks/gpu_wheels.sh prepares them); they are
# installed into /tmp/site first. PYTHON (default python3) is the interpreter; the package is used from
# this checkout. A failing step is recorded and the next one runs; the exit code is 1 when any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
REHEARSAL=0
[ "${1:-}" = "--rehearsal" ] && REHEARSAL=1
RES=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$RES"
START=$(date +%s)
TOTAL=${GPU_CHECK_TOTAL_S:-540}   # the whole script, 9 minutes
SCALE=${GPU_CHECK_LIMIT_SCALE:-1}  # every step's limit times this
if [ $REHEARSAL = 1 ]; then  # 2 shared CPU cores do in minutes what the GPU machine does in seconds
  DEV=cpu; SUFFIX=_rehearsal; TOTAL=${GPU_CHECK_TOTAL_S:-2400}; SCALE=${GPU_CHECK_LIMIT_SCALE:-4}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} FATEZERO_FAST_CPU_ONLY=1
else
  DEV=cuda; SUFFIX=
  export MAX_JOBS=${MAX_JOBS:-16} FATEZERO_FAST_CUDA_ARCHS=${FATEZERO_FAST_CUDA_ARCHS:-90}
fi
LOG=$RES/gpu_check$SUFFIX.log
STEPS=$(mktemp)
: > "$LOG"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S COMMAND...: run with its limit (cut to what is left of TOTAL), log, record
step() {
  local name=$1 limit=$(( $2 * SCALE )); shift 2
  local left=$(( START + TOTAL - $(date +%s) - 15 ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    say "== $name: not run, the check's time is spent"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "not run" 0 "$limit" "$*" >> "$STEPS"
    return
  fi
  say "== $name (limit ${limit} s): $*"
  local t0 rc secs
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  secs=$(awk "BEGIN { printf \"%.1f\", ($(date +%s%N) - $t0) / 1e9 }")
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && say "== $name: stopped at its limit of ${limit} s"
  say "== $name: exit $rc after ${secs} s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" "$*" >> "$STEPS"
}

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  say "== wheels: $(ls .whl | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site" || say "== wheels: install failed (see the log)"
fi
[ $REHEARSAL = 0 ] && { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"; nvcc --version 2>&1 | tail -2 | tee -a "$LOG"; }

# 1. the C++/CUDA extension, in place (the rehearsal builds the CPU ops; up to date, it compiles nothing)
step build 90 "$PY" setup.py build_ext --inplace

# 2. every available backend over the fixed matrix, against the reference
step selftest 90 "$PY" -m fatezero_fast info --selftest --json "$RES/selftest_$DEV$SUFFIX.json"

# 3. the GPU tests, the kernels' own files first; the budget ends the session before the step's limit
FATEZERO_FAST_TEST_BUDGET=$(( ${GPU_CHECK_TEST_BUDGET_S:-115} * SCALE )) \
  FATEZERO_FAST_TEST_REPORT="$RES/pytest_gpu$SUFFIX.json" step pytest 140 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider --durations=15 \
  tests/test_ops_cuda.py tests/test_ops_sdpa.py tests/test_ops_triton.py tests/test_blend_mask_op.py tests

# 4. the attention benchmark, quick mode: SD-1.4 shapes, every backend and baseline
if [ $REHEARSAL = 1 ]; then
  step attention 90 "$PY" benchmarks/bench_attention.py --device cpu --quick --shapes 16 --modes plain,replace,blend20 \
    --reps 1 --warmup 0 --min-time 0 --threads 1 --out "$RES/attention_cpu_quick$SUFFIX.json"
else
  step attention 90 "$PY" benchmarks/bench_attention.py --device cuda --quick --out "$RES/attention_cuda_quick.json"
fi

# 5. end to end: 8 frames at 512x512 in fp16 on the random SD-1.4-shaped model, all frames and chunks of 4
for store in recompute qk; do
  if [ $REHEARSAL = 1 ]; then
    step "e2e-$store" 50 "$PY" benchmarks/bench_pipeline.py --model tiny --device cpu --size 64 --frames 2,2 \
      --chunk-size none,1 --steps 1 --threads 1 --reps 1 --timeout $(( 22 * SCALE )) --store "$store" \
      --out "$RES/pipeline_cpu_e2e_$store$SUFFIX.json"
  else
    step "e2e-$store" 50 "$PY" benchmarks/bench_pipeline.py --model sd14 --device cuda --dtype fp16 --size 512 \
      --frames 8,8 --chunk-size none,4 --steps 5 --reps 2 --timeout $(( 22 * SCALE )) --store "$store" \
      --out "$RES/pipeline_cuda_e2e_$store.json"
  fi
done

# 6. temporal attention: SDPA (what unet/temporal.py calls) against the project's own op
if [ $REHEARSAL = 1 ]; then
  step temporal 30 "$PY" benchmarks/bench_temporal.py --only temporal_attention_op --device cpu --op-frames 8 \
    --reps 1 --out "$RES/temporal_cpu$SUFFIX.json"
else
  step temporal 30 "$PY" benchmarks/bench_temporal.py --only temporal_attention_op --device cuda --op-frames 8,24 \
    --reps 5 --out "$RES/temporal_cuda.json"
fi

"$PY" benchmarks/gpu_check_summary.py --steps "$STEPS" --results "$RES" --device "$DEV" --suffix "$SUFFIX" \
  --start "$START" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
rm -f "$STEPS"
exit "$rc"
