#!/usr/bin/env bash
# loadtest/capacity.sh — the D2O capacity headline through `d2od serve`: with a fixed KV
# pool (--kv-mem-mb), requests with long prompts (2048 tokens) and 128 generated tokens at
# rising concurrency, full cache against D2O at budget 0.2 (the request's kv_compression
# field): how many sequences run at once (d2od:num_requests_decoding — sequences past their
# prompt's prefill, holding its KV and decoding — and d2od:num_requests_running, which also
# counts admitted ones still prefilling, both sampled from /metrics during the run) and the
# output throughput, all measured with loadtest/load.py.
#
#   loadtest/capacity.sh --model MODEL [options]
#
# Options (defaults in brackets):
#   --d2od PATH        the d2od binary [build/d2od]
#   --kv-mem-mb N      KV pool size, the fixed memory [256]
#   --prompt N         prompt tokens per request (random ids from load.py) [2048]
#   --gen N            generated tokens per request, ignore_eos [128]
#   --conc "LIST"      concurrencies [1 2 4 8 16 32]
#   --per-client N     timed requests per client [2] (at least 4 in all)
#   --method M         compression method [d2o]
#   --budget F         its budget as a fraction of the prompt [0.2]
#   --threads N        engine threads [2]
#   --max-seqs N       the daemon's running-batch limit, above the largest c [64]
#   --max-batch-tokens N  the daemon's prefill chunk [512]
#   --out DIR          table (capacity.md) and JSON [build/capacity-<date>]
#
# One daemon serves both arms (same process, same pool); at each concurrency the two arms
# run back to back, alternating which goes first. The model needs a context of at least
# prompt + gen tokens: stories260K has 512, so for a smoke run generate one, e.g.
#   build/tools/gen_model --out build/models/stories-4k --shape stories --ctx 4096
# D2O as its official code runs never compresses layers 0, 1 and L-1, so the model needs
# many layers for the budget to show (4 layers: one compressed; 32: 29); the headline uses
# a 32-layer, dim-256 generated model (see loadtest/README.md). Bounded: each load run has
# a 3600 s limit. Run it on an otherwise idle machine.
set -u
cd "$(dirname "$0")/.."
MODEL="" D2OD=build/d2od KVMB=256 PROMPT=2048 GEN=128 CONC="1 2 4 8 16 32" PER=2 METHOD=d2o BUDGET=0.2
THREADS=2 MAXSEQS=64 MBT=512 OUT="build/capacity-$(date -u +%Y%m%d-%H%M%S)"
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift 2 ;;
    --d2od) D2OD=$2; shift 2 ;;
    --kv-mem-mb) KVMB=$2; shift 2 ;;
    --prompt) PROMPT=$2; shift 2 ;;
    --gen) GEN=$2; shift 2 ;;
    --conc) CONC=$2; shift 2 ;;
    --per-client) PER=$2; shift 2 ;;
    --method) METHOD=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --max-seqs) MAXSEQS=$2; shift 2 ;;
    --max-batch-tokens) MBT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "capacity: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -e "$MODEL" ] || { echo "capacity: --model must name a model file or directory" >&2; exit 2; }
[ -x "$D2OD" ] || { echo "capacity: $D2OD not built (make build/d2od)" >&2; exit 2; }
mkdir -p "$OUT"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$D2OD" serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" --threads "$THREADS" --max-seqs "$MAXSEQS" \
    --kv-mem-mb "$KVMB" --ctx-len $((PROMPT + GEN + 16)) --max-batch-tokens "$MBT" --max-queue 4096 \
    --log-requests false >"$OUT/d2od.log" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null' EXIT
for _ in $(seq 1 3000); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null && break
  kill -0 "$PID" 2>/dev/null || { echo "capacity: d2od exited:" >&2; tail -n 20 "$OUT/d2od.log" >&2; exit 1; }
  sleep 0.1
done
KV="{\"kv_compression\": {\"method\": \"$METHOD\", \"budget\": $BUDGET}}"
run() { # arm c n
  local extra=()
  [ "$1" = kv ] && extra=(--extra-body "$KV")
  echo "== c=$2 $1"
  python3 loadtest/load.py --port "$PORT" -c "$2" -n "$3" --input-len "$PROMPT" --output-len "$GEN" --seed "$2" \
      --warmup 1 --time-limit 3600 --metrics-interval 0.05 \
      --metrics-gauge d2od:num_requests_running --metrics-gauge d2od:num_requests_decoding \
      --metrics-gauge d2od:num_requests_waiting \
      --metrics-gauge d2od:kv_cache_usage_perc --metrics-gauge d2od:num_preemptions_total \
      "${extra[@]}" --result-file "$OUT/$1-c$2.json" | grep -E "throughput|TTFT|TPOT|running|decoding|Failed" \
      || echo "capacity: c=$2 $1 had failed requests"
}
i=0
for c in $CONC; do
  n=$((PER * c)); [ "$n" -lt 4 ] && n=4
  if [ $((i % 2)) -eq 0 ]; then run full "$c" "$n"; run kv "$c" "$n"; else run kv "$c" "$n"; run full "$c" "$n"; fi
  i=$((i + 1))
done
python3 - "$OUT" "$MODEL" "$KVMB" "$PROMPT" "$GEN" "$METHOD" "$BUDGET" "$THREADS" "$(git rev-parse --short HEAD 2>/dev/null)" $CONC <<'EOF'
import json, os, sys
out, model, kvmb, prompt, gen, method, budget, threads, commit, *concs = sys.argv[1:]
def load(arm, c):
    p = os.path.join(out, f"{arm}-c{c}.json")
    return json.load(open(p)) if os.path.exists(p) else None
def g(r, name, k):
    return ((r or {}).get("server_gauges") or {}).get(name, {}).get(k)
def f(v, nd=1):
    return "-" if v is None else f"{v:,.{nd}f}"
def ratio(a, b):
    return f"**{b / a:.2f}**" if a and b is not None else "-"
R, D = "d2od:num_requests_running", "d2od:num_requests_decoding"
lines = [f"# D2O capacity through `d2od serve`, {commit}", "",
         f"model `{model}`, --kv-mem-mb {kvmb}, prompts {prompt} tokens, {gen} generated (ignore_eos), "
         f"{threads} threads; {method} at budget {budget} vs full cache.", "",
         "decoding = d2od:num_requests_decoding (sequences past their prompt's prefill, holding its KV), "
         "running = d2od:num_requests_running (also those admitted and still prefilling), both sampled "
         "every 50 ms (max / time mean); preempt = preemptions in the run.", "",
         "| c | full: decoding max / mean | full: running max / mean | full: out tok/s | full: preempt | "
         f"{method}: decoding max / mean | {method}: running max / mean | {method}: out tok/s | {method}: preempt | "
         f"decoding mean {method}/full | out tok/s {method}/full |",
         "|---:|---|---|---:|---:|---|---|---:|---:|---:|---:|"]
best = {"full": (0, 0, 0), "kv": (0, 0, 0)}
for c in concs:
    a, b = load("full", c), load("kv", c)
    cells = []
    for arm, r in (("full", a), ("kv", b)):
        pre = (g(r, "d2od:num_preemptions_total", "max") or 0) - (g(r, "d2od:num_preemptions_total", "min") or 0)
        fails = f" ({r['failed']} failed)" if r and r.get("failed") else ""
        cells += [f"{f(g(r, D, 'max'), 0)} / {f(g(r, D, 'mean'))}", f"{f(g(r, R, 'max'), 0)} / {f(g(r, R, 'mean'))}",
                  f"{f((r or {}).get('output_throughput'))}{fails}", f"{pre:.0f}" if r else "-"]
        if r:
            best[arm] = (max(best[arm][0], g(r, D, "mean") or 0), max(best[arm][1], g(r, D, "max") or 0),
                         max(best[arm][2], r.get("output_throughput") or 0))
    lines.append(f"| {c} | " + " | ".join(cells) + f" | {ratio(g(a, D, 'mean'), g(b, D, 'mean'))}"
                 f" | {ratio((a or {}).get('output_throughput'), (b or {}).get('output_throughput'))} |")
lines += ["", f"Headline: at most {best['full'][0]:.1f} sequences decoding on average (max {best['full'][1]:.0f}) "
          f"with the full cache, {best['kv'][0]:.1f} (max {best['kv'][1]:.0f}) with {method}@{budget}; "
          f"best output throughput {best['full'][2]:,.1f} vs {best['kv'][2]:,.1f} tok/s.", "",
          "The running count includes sequences admitted while their prompt is still being prefilled and "
          "sequences preempted later when the pool runs out, so it overstates what fits; the decoding "
          "count is what the pool holds."]
open(os.path.join(out, "capacity.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
