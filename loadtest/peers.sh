#!/usr/bin/env bash
# loadtest/peers.sh — d2od against llama.cpp's llama-server, by hand: the same GGUF file,
# the same thread count, the same client (loadtest/load.py), runs interleaved, at each
# concurrency; writes the ratio table (d2od / llama-server) as Markdown and the raw JSON.
#
#   loadtest/peers.sh --llama-server PATH/llama-server --model FILE.gguf [options]
#
# Options (defaults in brackets):
#   --d2od PATH         the d2od binary [build/d2od]
#   --threads N         compute threads of both servers [2]
#   --conc "LIST"       concurrencies [1 8 32 64]
#   --per-client N      timed requests per client at each concurrency [4] (at least 8 in all)
#   --max-tokens N      generated tokens per request, ignore_eos [64]
#   --rounds N          interleaved rounds per concurrency (A B, B A, ...) [3]
#   --ctx N             context per slot for both servers [256]
#   --out DIR           where the table (peers.md) and JSON go [build/peers-<date>]
#   --load-args "ARGS"  extra load.py arguments (e.g. "--no-stream", "--input-len 128")
#
# For each concurrency c both servers start fresh with c slots on 127.0.0.1 (free ports):
#   llama-server -m FILE --host 127.0.0.1 --port P -np c -c $((ctx*c)) -cb -t T -tb T
#   d2od serve --model FILE --host 127.0.0.1 --port P --threads T --max-seqs c --ctx-len ctx
# then `load.py --port <llama> --port-b <d2od> --rounds R --warmup c` runs both, and both
# are stopped by PID. A ratio above 1 is better for d2od in throughput, below 1 in latency.
# Run it on an otherwise idle machine (the client shares the cores; its CPU share is in the
# table). llama.cpp is not a dependency of d2od: building it is described in loadtest/README.md.
set -u
cd "$(dirname "$0")/.."
LLAMA="" MODEL="" D2OD=build/d2od THREADS=2 CONC="1 8 32 64" PER=4 MAXTOK=64 ROUNDS=3 CTX=256
OUT="build/peers-$(date -u +%Y%m%d-%H%M%S)" LOADARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --llama-server) LLAMA=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --d2od) D2OD=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --conc) CONC=$2; shift 2 ;;
    --per-client) PER=$2; shift 2 ;;
    --max-tokens) MAXTOK=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --ctx) CTX=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --load-args) LOADARGS=$2; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "peers: unknown option $1" >&2; exit 2 ;;
  esac
done
[ -x "$LLAMA" ] || { echo "peers: --llama-server must name an executable llama-server" >&2; exit 2; }
[ -f "$MODEL" ] || { echo "peers: --model must name a GGUF file" >&2; exit 2; }
[ -x "$D2OD" ] || { echo "peers: $D2OD not built (make build/d2od)" >&2; exit 2; }
mkdir -p "$OUT"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done; PIDS=(); }
trap stop_all EXIT
# wait_up PORT PID NAME: /health answers 200 within 300 s (llama-server answers 503 while loading)
wait_up() {
  for _ in $(seq 1 3000); do
    python3 -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$1/health', timeout=2).status == 200 else 1)" \
        2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "peers: $3 exited; log: $OUT/$3.log" >&2; tail -n 20 "$OUT/$3.log" >&2; return 1; }
    sleep 0.1
  done
  echo "peers: $3 did not come up" >&2; return 1
}
{
  echo "# d2od / llama-server, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) CPUs; load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "model \`$MODEL\`, $THREADS threads each, $MAXTOK tokens per request (ignore_eos), $ROUNDS interleaved rounds per c,"
  echo "d2od $(git rev-parse --short HEAD 2>/dev/null), llama-server \`$("$LLAMA" --version 2>&1 | grep -m1 -i version)\`, load.py args: \`${LOADARGS:-none}\`"
} > "$OUT/header.txt"
for c in $CONC; do
  n=$((PER * c)); [ "$n" -lt 8 ] && n=8
  PA=$(free_port); PB=$(free_port)
  "$LLAMA" -m "$MODEL" --host 127.0.0.1 --port "$PA" -np "$c" -c $((CTX * c)) -cb -t "$THREADS" -tb "$THREADS" \
      >"$OUT/llama-server.log" 2>&1 &
  PIDS+=($!); LPID=$!
  "$D2OD" serve --model "$MODEL" --host 127.0.0.1 --port "$PB" --threads "$THREADS" --max-seqs "$c" \
      --ctx-len "$CTX" --log-requests false >"$OUT/d2od.log" 2>&1 &
  PIDS+=($!); DPID=$!
  wait_up "$PA" "$LPID" llama-server && wait_up "$PB" "$DPID" d2od || exit 1
  echo "== c=$c: $n requests x $ROUNDS rounds"
  cut -d' ' -f1 /proc/loadavg > "$OUT/load-c$c.txt"
  # shellcheck disable=SC2086
  python3 loadtest/load.py --port "$PA" --port-b "$PB" --label-a llama-server --label-b d2od --rounds "$ROUNDS" \
      -c "$c" -n "$n" --max-tokens "$MAXTOK" --warmup "$c" --time-limit 1800 $LOADARGS \
      --result-file "$OUT/c$c.json" || echo "peers: c=$c had failed requests (see $OUT/c$c.json)"
  cut -d' ' -f1 /proc/loadavg >> "$OUT/load-c$c.txt"
  stop_all
done
python3 - "$OUT" $CONC <<'EOF'
import json, os, sys
out, concs = sys.argv[1], sys.argv[2:]
def f(v, nd=1):
    return "-" if v is None else f"{v:,.{nd}f}"
rows = []
for c in concs:
    p = os.path.join(out, f"c{c}.json")
    if not os.path.exists(p):
        rows.append(f"| {c} | (no result) |||||||||")
        continue
    r = json.load(open(p))
    a, b, q = r["a"], r["b"], r["ratio_b_over_a"]
    fa = sum(x["failed"] for x in r["rounds_a"]); fb = sum(x["failed"] for x in r["rounds_b"])
    cell = lambda k, nd=1: f"{f(a[k], nd)} / {f(b[k], nd)} (**{f(q[k], 2)}**)" if a.get(k) is not None else "-"
    # the spread of the throughput ratio: round i of d2od over round i of llama-server
    per = [y["output_throughput"] / x["output_throughput"] for x, y in zip(r["rounds_a"], r["rounds_b"])
           if x.get("output_throughput") and y.get("output_throughput") is not None]
    spread = f" [{min(per):.2f}-{max(per):.2f}]" if per else ""
    lp = os.path.join(out, f"load-c{c}.txt")
    load = " → ".join(open(lp).read().split()) if os.path.exists(lp) else "-"
    rows.append(f"| {c} | {cell('output_throughput')}{spread} | {cell('median_ttft_ms')} | {cell('p99_ttft_ms')} | "
                f"{cell('median_itl_ms', 2)} | {cell('median_tpot_ms', 2)} | {cell('p99_e2el_ms', 0)} | {fa} / {fb} | "
                f"{f(100 * a['client_cpu_frac'])} / {f(100 * b['client_cpu_frac'])} % | {load} |")
with open(os.path.join(out, "peers.md"), "w") as fo:
    fo.write(open(os.path.join(out, "header.txt")).read() + "\n")
    fo.write("Each cell: llama-server / d2od (d2od / llama-server), medians over the rounds; [lo-hi]: the\n"
             "per-round throughput ratios (round i of d2od over round i of llama-server); load: the 1-minute\n"
             "load average before and after the concurrency's runs.\n\n")
    fo.write("| c | output tok/s | TTFT median ms | TTFT p99 ms | ITL median ms | TPOT median ms | E2EL p99 ms | failed | client CPU | load |\n")
    fo.write("|---:|---|---|---|---|---|---|---|---|---|\n")
    fo.write("\n".join(rows) + "\n")
print(open(os.path.join(out, "peers.md")).read())
EOF
