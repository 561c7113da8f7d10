#!/usr/bin/env bash
# tests/gpu/device_run.sh — the one prepared GPU run of the CUDA backend: every
# stage that needs a real GPU, within about 10 minutes, writing a summary JSON
# and one log per stage to $OUT (default build/device_run).
#
#   bash tests/gpu/device_run.sh            on a GPU machine (nvcc + a device)
#   bash tests/gpu/device_run.sh --dry-run  anywhere: the same stages against
#                                           the CUDA emulator (tests/emu/);
#                                           device-only stages print "skip:"
#
# Stages: env (nvidia-smi, nvcc), build (make CUDA=1: d2od, the kernel tests,
# the backend test, the benchmark), test-gpu (make CUDA=1 test-gpu: kernel
# tests and tests/gpu/test_backend_cuda, the CPU-vs-GPU logits test),
# sanitizer (compute-sanitizer memcheck on the kernel tests, best effort),
# logits (test_backend_cuda alone, its figures in the log), graphs
# (tests/gpu/test_graphs_cuda: decode replayed from CUDA graphs bit-identical
# to launched), bench
# (tests/gpu/bench_cuda: decode step time and KV read rate at batch 1/32/256 x
# context 1k/4k/16k, prefill TFLOP/s at 2k/8k, D2O compression share of
# prefill at 8k/32k, 8k-sequence capacity full vs D2O 0.2; --layers 8 and
# extrapolated when BENCH_LAYERS is not 32; decode steps at batch 1/32/256
# with CUDA graphs off and on, whose ratio decides --cuda-graphs' default).
# The summary JSON: {"mode", "commit", "stages": {name: {"status", "seconds",
# "log"}}, "bench": <bench_cuda's JSON or null>, "cuda_graphs": [{"batch",
# "step_ms_off", "step_ms_on", "speedup"}, ...] or null}. Exit status: 1 when a stage
# that ran failed. Models: only the shipped models/stories260K (../shared
# does not travel to the device machine); the benchmark model is generated.
set -u
cd "$(dirname "$0")/../.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-build/device_run}
mkdir -p "$OUT"
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
BENCH_LAYERS=${BENCH_LAYERS:-32}
declare -A ST SEC
ORDER=()
fail=0

stage() { # stage NAME CMD... : runs CMD with its output in $OUT/NAME.log
  local name=$1; shift
  ORDER+=("$name")
  local t0=$(date +%s.%N)
  echo "== $name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then ST[$name]=ok; else ST[$name]=failed; fail=1; fi
  SEC[$name]=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  echo "   ${ST[$name]} (${SEC[$name]} s), log $OUT/$name.log"
  tail -3 "$OUT/$name.log" | sed 's/^/   | /'
}
skip() { # skip NAME WHY
  ORDER+=("$1"); ST[$1]="skipped: $2"; SEC[$1]=0
  echo "== $1: skip: $2"
}

if [ $DRY = 1 ]; then
  skip env "dry run (no GPU): nvidia-smi and nvcc not consulted"
  stage build make -j"$JOBS" build/libd2od.a build/emu/bin/test_backend_cuda build/emu/bin/test_graphs_cuda build/emu/bin/bench_cuda
  skip test-gpu "dry run: the kernel tests run on the emulator in make test-gpu-emu"
  skip sanitizer "dry run: compute-sanitizer needs a device"
  stage logits env CUDAEMU_STRICT=1 build/emu/bin/test_backend_cuda
  stage graphs env CUDAEMU_STRICT=1 build/emu/bin/test_graphs_cuda
  stage bench build/emu/bin/bench_cuda --tiny
  BENCH_LOG=$OUT/bench.log
else
  stage env sh -c 'nvidia-smi && nvcc --version'
  stage build make -j"$JOBS" CUDA=1 build/cuda/d2od gpu-test-build build/cuda/tests-gpu/bench_cuda
  stage test-gpu make CUDA=1 test-gpu
  if command -v compute-sanitizer >/dev/null 2>&1; then
    stage sanitizer sh -c 'rc=0; for t in build/cuda/tests-gpu/test_kernels build/cuda/tests-gpu/test_d2o; do
        [ -x "$t" ] || continue; timeout 240 compute-sanitizer --tool memcheck --error-exitcode 3 "$t" || rc=1; done; exit $rc'
  else
    skip sanitizer "compute-sanitizer not found"
  fi
  stage logits build/cuda/tests-gpu/test_backend_cuda
  stage graphs build/cuda/tests-gpu/test_graphs_cuda
  if [ "$BENCH_LAYERS" = 32 ]; then stage bench timeout 300 build/cuda/tests-gpu/bench_cuda
  else stage bench timeout 300 build/cuda/tests-gpu/bench_cuda --layers "$BENCH_LAYERS"; fi
  BENCH_LOG=$OUT/bench.log
fi

# summary JSON (the bench's JSON is its last line starting with '{')
python3 - "$OUT" "$DRY" "$BENCH_LOG" "${ORDER[@]}" <<EOF
import json, subprocess, sys
out, dry, bench_log, names = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4:]
st = {$(for n in "${ORDER[@]}"; do printf '"%s": ("%s", %s), ' "$n" "${ST[$n]}" "${SEC[$n]}"; done)}
bench = None
try:
    lines = [l for l in open(bench_log) if l.startswith("{")]
    bench = json.loads(lines[-1]) if lines else None
except (OSError, ValueError):
    pass
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
graphs = None
if isinstance(bench, dict) and isinstance(bench.get("decode_graphs"), list):
    keys = ("batch", "ctx", "step_ms_off", "step_ms_on", "speedup", "capture_s", "skipped", "error")
    graphs = [{k: g[k] for k in keys if k in g} for g in bench["decode_graphs"]]
summary = {"mode": "dry-run (emulator)" if dry else "device", "commit": commit,
           "stages": {n: {"status": st[n][0], "seconds": st[n][1], "log": f"{out}/{n}.log"} for n in names},
           "bench": bench, "cuda_graphs": graphs}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
print(f"summary: {out}/summary.json")
EOF
n_ok=0; n_bad=0
for n in "${ORDER[@]}"; do
  case "${ST[$n]}" in ok) n_ok=$((n_ok+1));; failed) n_bad=$((n_bad+1));; esac
done
echo "device_run: $n_ok passed, $n_bad failed"
exit $fail
