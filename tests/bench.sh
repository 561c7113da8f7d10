#!/usr/bin/env bash
# tests/bench.sh — `make bench`: CPU figures as ratios measured in one run.
# Generates a deterministic ~100M-parameter Llama model (HF layout, bf16 and
# f32) under build/models the first time, then runs `d2od bench` on each:
# batch-1 decode tokens/s as a fraction of the memory roofline and aggregate
# tokens/s at batch 8 and 32 as multiples of batch 1 (median and range over
# BENCH_REPS interleaved rounds), the KV-compression cost at a 2048-token prompt
# (BENCH_KV_PROMPT; median and range over BENCH_KV_REPS rounds), then the same
# model behind `d2od serve` with 1 and 32 concurrent streaming clients.
set -euo pipefail
BUILD=${1:-build}
SHARED=${D2_SHARED:-../shared}
TOK="$SHARED/assets/tokenizers/llama2-hf-phi3/tokenizer.json"
for dt in ${BENCH_DTYPES:-bf16 f32}; do
  dir=build/models/bench-100m-$dt
  if [ ! -f "$dir/model.safetensors" ]; then
    echo "bench: generating $dir"
    "$BUILD/tools/gen_model" --out "$dir" --shape 100m --dtype "$dt" --seed 1 --tokenizer "$TOK"
  fi
  echo "== CPU decode, 100M model, $dt weights"
  "$BUILD/d2od" bench --model "$dir" --batches "${BENCH_BATCHES:-1,8,32}" --prompt 32 --gen "${BENCH_GEN:-48}" \
      --reps "${BENCH_REPS:-3}" --kv-prompt "${BENCH_KV_PROMPT:-2048}" --kv-gen 32 --kv-reps "${BENCH_KV_REPS:-5}"
  echo
  # Through the HTTP daemon: aggregate output tokens/s at 32 concurrent
  # streaming clients vs 1 (the load generator shares the machine's cores).
  echo "== HTTP serving, 100M model, $dt weights, 1 vs 32 concurrent streaming clients"
  MODEL="$dir" MAX_TOKENS=${BENCH_HTTP_TOKENS:-64} bash loadtest/bench_concurrency.sh "$BUILD/d2od" | tail -n 1
  echo
done
