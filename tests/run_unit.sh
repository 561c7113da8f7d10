#!/usr/bin/env bash
# tests/run_unit.sh — runs every unit-test executable under build/tests (or
# the directory given), then prints the closing "N passed, N failed" line.
set -u
dir=${1:-build/tests}
total_p=0; total_f=0; total_s=0; bad_bins=()
for t in "$dir"/test_*; do
  [ -x "$t" ] || continue
  out=$("$t" 2>&1); rc=$?
  printf '%s\n' "$out"
  line=$(printf '%s\n' "$out" | grep -E ': [0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$' | tail -n1)
  if [ -z "$line" ]; then
    echo "FAIL $(basename "$t") exited $rc without a summary"; total_f=$((total_f+1)); bad_bins+=("$t"); continue
  fi
  p=$(sed -E 's/.*: ([0-9]+) passed.*/\1/' <<<"$line")
  f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
  s=$(sed -E 's/.* ([0-9]+) skipped$/\1/' <<<"$line")
  total_p=$((total_p+p)); total_f=$((total_f+f)); total_s=$((total_s+s))
  [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && { total_f=$((total_f+1)); bad_bins+=("$t"); }
done
[ ${#bad_bins[@]} -gt 0 ] && echo "failing binaries: ${bad_bins[*]}"
echo "unit: $total_p passed, $total_f failed, $total_s skipped"
[ "$total_f" -eq 0 ]
