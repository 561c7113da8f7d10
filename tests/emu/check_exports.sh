#!/usr/bin/env bash
# tests/emu/check_exports.sh — kernels/kernels.h's rule, checked on the
# emulator's objects of kernels/*.cu: the only external symbols a kernel
# object defines are the extern "C" kern_* entries (every __global__ kernel
# and __device__ helper is static). Prints "exports: N passed, N failed".
# Usage: check_exports.sh DIR_OF_KERNEL_OBJECTS
set -u
dir=${1:-build/emu/obj/kernels}
pass=0; fail=0
for o in "$dir"/*.o; do
  [ -f "$o" ] || continue
  # T/D/B/R: strong definitions of text, data, bss, read-only data
  bad=$(nm -g --defined-only "$o" | awk '$2 ~ /^[TDBR]$/ && $3 !~ /^kern_/ {print $3}')
  if [ -n "$bad" ]; then
    echo "FAIL $(basename "$o") exports: $(tr '\n' ' ' <<<"$bad")"
    fail=$((fail+1))
  else
    echo "ok $(basename "$o")"
    pass=$((pass+1))
  fi
done
[ $((pass+fail)) -gt 0 ] || { echo "no objects in $dir"; fail=1; }
echo "exports: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
