#!/usr/bin/env bash
# loadtest/bench_concurrency.sh — aggregate output tokens/s of d2od serving
# stories260K at 32 concurrent streaming clients vs 1, printed as a ratio.
#
#   loadtest/bench_concurrency.sh [path/to/d2od]      (from the repo root)
#
# Starts `d2od serve` on 127.0.0.1 (a free port), runs loadtest/load.py at
# concurrency 1 and then 32 (every request: 256 tokens, ignore_eos), prints
# both reports and a closing line
#   bench concurrency: 1 client X tok/s, 32 clients Y tok/s, ratio R
# then stops the daemon. Environment: D2_SHARED (default ../shared),
# THREADS (engine threads, default 0 = every core), MAX_TOKENS (default 256),
# MODEL (default stories260K; `make bench` passes the generated 100M model).
# The client runs on the same machine, so on a small box it competes with the
# engine for CPU; the ratio is what batching buys end to end, not the engine
# alone. Bounded: each load run has a 120 s limit.
set -u
cd "$(dirname "$0")/.."
D2OD=${1:-build/d2od}
SHARED=${D2_SHARED:-../shared}
MODEL=${MODEL:-$SHARED/assets/models/stories260K/stories260K.gguf}
THREADS=${THREADS:-0}
MAX_TOKENS=${MAX_TOKENS:-256}
[ -x "$D2OD" ] || { echo "bench concurrency: $D2OD not built (make build/d2od)"; exit 1; }
[ -e "$MODEL" ] || { echo "bench concurrency: $MODEL missing"; exit 1; }
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LOG=$(mktemp)
"$D2OD" serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" --threads "$THREADS" --log-requests false \
    --max-seqs 64 >"$LOG" 2>&1 &
PID=$!
cleanup() { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null; rm -f "$LOG"; }
trap cleanup EXIT
for _ in $(seq 1 200); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" \
      >/dev/null 2>&1 && break
  kill -0 "$PID" 2>/dev/null || { echo "bench concurrency: daemon exited"; cat "$LOG"; exit 1; }
  sleep 0.05
done
run() { python3 loadtest/load.py --port "$PORT" -c "$1" -n "$2" --max-tokens "$MAX_TOKENS" --time-limit 120 --json; }
# warm-up (page faults, thread pool)
run 4 8 >/dev/null || true
J1=$(run 1 8) || { echo "bench concurrency: c=1 run failed: $J1"; exit 1; }
J32=$(run 32 96) || { echo "bench concurrency: c=32 run failed: $J32"; exit 1; }
echo "c=1:  $J1"
echo "c=32: $J32"
python3 - "$J1" "$J32" <<'EOF'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
r = b["output_tok_s"] / a["output_tok_s"] if a["output_tok_s"] else float("nan")
print(f"bench concurrency: 1 client {a['output_tok_s']:.0f} tok/s, 32 clients {b['output_tok_s']:.0f} tok/s, "
      f"ratio {r:.2f} (TTFT p50 {a['ttft_p50_ms']} -> {b['ttft_p50_ms']} ms, "
      f"ITL p50 {a['itl_p50_ms']} -> {b['itl_p50_ms']} ms)")
EOF
