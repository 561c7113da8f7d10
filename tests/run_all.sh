#!/usr/bin/env bash
# tests/run_all.sh — the whole CPU test suite, as `make test` runs it:
#   1. unit tests (optimised build)        build/tests/test_*
#   2. unit tests under ASan/UBSan          build/san/tests/test_*
#   3. GPU kernel tests                     build/tests-gpu/test_* (skip without a GPU)
#   4. the same GPU tests on the CUDA emulator, ASan/UBSan, strict mode
#                                           build/emu/bin/test_* (tests/emu/README)
#   5. integration tests (the real binary)  tests/integration/*.py, among them
#      test_tsan.py (build/tsan/d2od, ThreadSanitizer) and test_soak.py (a 45 s soak)
# Prints each part's summary, then one closing "N passed, N failed" line.
set -u
cd "$(dirname "$0")/.."
export D2_SHARED=${D2_SHARED:-../shared}
P=0; F=0; S=0
tally() { # parses "...: N passed, N failed[, N skipped]" from the last summary line of $1
  local line; line=$(grep -E '[0-9]+ passed, [0-9]+ failed' <<<"$1" | tail -n1)
  if [ -z "$line" ]; then F=$((F+1)); return; fi
  local p f s
  p=$(sed -E 's/.*[^0-9]([0-9]+) passed.*/\1/;s/^([0-9]+) passed.*/\1/' <<<"$line")
  f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
  s=$(grep -oE '[0-9]+ skipped' <<<"$line" | grep -oE '[0-9]+' || echo 0)
  P=$((P+p)); F=$((F+f)); S=$((S+${s:-0}))
}
run_part() { # name, command...
  local name=$1; shift
  echo "== $name"
  local out rc
  out=$("$@" 2>&1); rc=$?
  printf '%s\n' "$out"
  tally "$out"
  if [ $rc -ne 0 ] && ! grep -qE ' [1-9][0-9]* failed' <<<"$(grep -E 'passed, [0-9]+ failed' <<<"$out" | tail -n1)"; then
    echo "$name exited $rc"; F=$((F+1))
  fi
}
run_part "unit" bash tests/run_unit.sh build/tests
if [ -d build/san/tests ]; then
  # Sanitized code runs ~3x slower: the per-test hang timeout (tests/test.h, 60 s) scales
  # with it, so a slow runner does not turn a long test (the 32-layer D2O one) into a failure.
  D2_TEST_TIMEOUT_MULT=${D2_TEST_TIMEOUT_MULT:-3} \
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    run_part "unit (ASan/UBSan)" bash tests/run_unit.sh build/san/tests
fi
# GPU kernel tests (built when nvcc exists): without a device each prints a skip line.
for t in build/tests-gpu/test_*; do
  [ -x "$t" ] || continue
  run_part "gpu $(basename "$t")" "$t"
done
# The CUDA build embeds compute_90 PTX, so GPUs newer than Hopper can run it.
if [ -f build/ptx/sample.fatbin ]; then
  run_part "ptx" sh -c 'if grep -aq "^\.target sm_90\$" build/ptx/sample.fatbin; then
      echo "ok compute_90 PTX embedded"; echo "ptx: 1 passed, 0 failed"
    else echo "FAIL no compute_90 PTX in the fatbinary"; echo "ptx: 0 passed, 1 failed"; exit 1; fi'
fi
# GPU kernel tests on the CUDA emulator (make gpu-emu-build): run everywhere.
for t in build/emu/bin/test_*; do
  [ -x "$t" ] || continue
  CUDAEMU_STRICT=1 ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    run_part "gpu-emu $(basename "$t")" "$t"
done
[ -d build/emu/obj/kernels ] && run_part "kernel exports" bash tests/emu/check_exports.sh build/emu/obj/kernels
# The prepared GPU run's dry run on the emulator (device-only stages skip).
[ -x build/emu/bin/bench_cuda ] && OUT=build/device_run_dry run_part "device_run dry run" bash tests/gpu/device_run.sh --dry-run
for t in tests/integration/*.py; do
  [ -f "$t" ] || continue
  run_part "integration $(basename "$t")" python3 "$t" build/d2od
done
echo
echo "total: $P passed, $F failed, $S skipped"
[ "$F" -eq 0 ]
