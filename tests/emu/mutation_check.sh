#!/usr/bin/env bash
# tests/emu/mutation_check.sh — shows that the emulated GPU tests catch
# barrier bugs: each mutant is a copy of the kernel sources with one
# synchronisation bug put in by a text substitution that keeps line numbers
# (a __syncthreads deleted, an early return moved above a barrier). Every
# mutant is built in a scratch copy of the tree and run under the emulator
# (make test-gpu-emu's flags, CUDAEMU_STRICT=1); it is "killed" when the test
# program fails (a FAIL line or an emulator error). Exit 0 when every mutant
# is killed. The real tree is not touched.
#
# Usage: bash tests/emu/mutation_check.sh        (from the repository root;
# about 20 s of compiling per mutant on one core)
set -u
cd "$(dirname "$0")/../.."
root=$(pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
killed=0; survived=0

# name | file | test program | perl substitution (must match exactly once)
mutants=(
  "prefill: the barrier before a K/V tile is loaded, deleted|kernels/attention.cu|test_kernels|s{__syncthreads\(\); /\* the previous tile is no longer read \*/}{/* mutant */}"
  "prefill: the early return of rows past n_q, moved above the key loop|kernels/attention.cu|test_kernels|s#^[ \t]*if \(qi >= n_q\) return;[ \t]*\n#\n#m && s#^(\s*)for \(int kt = 0; kt < n_kv; kt \+= PF_BK\) \{#\$1if (qi >= n_q) return; for (int kt = 0; kt < n_kv; kt += PF_BK) {#m"
  "decode: the barrier after the logits of a split, deleted|kernels/attention.cu|test_kernels|s{(if \(lane == 0\) s_row\[t\] = row;\n\s*\}\n\s*)__syncthreads\(\);}{\$1/* mutant */}"
  "d2o match: the barrier between the wmma stores and the sum over heads, deleted|kernels/d2o.cu|test_d2o|s{(wmma::mem_row_major\);\n\s*\}\n\s*)__syncthreads\(\);}{\$1/* mutant */}"
  "d2o select: the barrier after the histogram is cleared, deleted|kernels/d2o.cu|test_d2o|s{(for \(int b = tid; b < 256; b \+= bd\) hist\[b\] = 0;\n\s*)__syncthreads\(\);}{\$1/* mutant */}"
)

for m in "${mutants[@]}"; do
  IFS='|' read -r name file prog subst <<<"$m"
  rm -rf "$tmp/tree"; mkdir -p "$tmp/tree"
  cp -r Makefile kernels common tests "$tmp/tree/" 2>/dev/null
  mkdir -p "$tmp/tree/build"
  # Reuse the real tree's emulator objects where present (only the mutant rebuilds).
  [ -d build/emu ] && cp -r build/emu "$tmp/tree/build/"
  before=$(md5sum "$tmp/tree/$file" | cut -d' ' -f1)
  lines=$(wc -l <"$tmp/tree/$file")
  perl -0pi -e "($subst) or die 'no match'" "$tmp/tree/$file" || { echo "?? $name: substitution did not apply"; survived=$((survived+1)); continue; }
  if [ "$(md5sum "$tmp/tree/$file" | cut -d' ' -f1)" = "$before" ] || [ "$(wc -l <"$tmp/tree/$file")" != "$lines" ]; then
    echo "?? $name: substitution changed nothing or moved lines"; survived=$((survived+1)); continue
  fi
  touch "$tmp/tree/$file"
  if ! make -s -C "$tmp/tree" "build/emu/bin/$prog" >"$tmp/build.log" 2>&1; then
    echo "?? $name: mutant does not build"; tail -5 "$tmp/build.log"; survived=$((survived+1)); continue
  fi
  out=$(cd "$tmp/tree" && CUDAEMU_STRICT=1 timeout 600 "build/emu/bin/$prog" 2>&1); rc=$?
  if [ $rc -ne 0 ]; then
    killed=$((killed+1))
    why=$(grep -m1 -E '^FAIL|cudaemu: ERROR' <<<"$out")
    echo "killed   $name"
    echo "         ($prog exit $rc: ${why:-no message})"
  else
    survived=$((survived+1))
    echo "SURVIVED $name"
  fi
done
echo "mutation check: $killed killed, $survived survived"
[ "$survived" -eq 0 ]
