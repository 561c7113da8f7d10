#!/usr/bin/env bash
# tests/llama3_8b_smoke.sh — the generated Llama-3-8B-shaped model (bf16,
# ~16 GB, random weights, the real Llama-3 tokenizer) loads and runs through
# the same CPU code path as every other model: one prompt prefill plus a few
# decode steps with `d2od generate`. Not part of `make test` (it writes 16 GB
# and needs ~1 minute of CPU); run by hand: bash tests/llama3_8b_smoke.sh
set -euo pipefail
BUILD=${BUILD:-build}
SHARED=${D2_SHARED:-../shared}
dir=${LLAMA3_8B_DIR:-build/models/llama3-8b-bf16}
if [ ! -f "$dir/model.safetensors.index.json" ] && [ ! -f "$dir/model.safetensors" ]; then
  "$BUILD/tools/gen_model" --out "$dir" --shape llama3-8b --dtype bf16 --seed 1 --shards 4 \
    --tokenizer "$SHARED/assets/tokenizers/llama3/tokenizer.json"
fi
"$BUILD/d2od" generate --model "$dir" --prompt "The quick brown fox" --max-tokens 4 \
  --temperature 0 --ignore-eos --show-ids --ctx 256
echo
echo "llama3-8b smoke: ok"
