#!/usr/bin/env python3
"""loadtest/load.py — the serving benchmark of d2od: every performance claim
about `d2od serve` is made with it, against d2od or any OpenAI-compatible
server (llama-server, vLLM) on this machine.

    python3 loadtest/load.py --port 8000 -c 32 -n 128 --max-tokens 256
    python3 loadtest/load.py --port 8000 -c 1 -n 8 --json          # one JSON line
    python3 loadtest/load.py --port 8000 --request-rate 4 -n 200 \\
        --input-len uniform:256:1024 --output-len 128 --seed 1 --warmup 8 \\
        --goodput ttft:500 tpot:50 --result-file out.json
    python3 loadtest/load.py --port 8000 --port-b 8001 --rounds 3 -c 8 -n 64   # A/B

Load: a fixed concurrency (-c, with the default --request-rate inf every
request is sent as soon as a slot is free), or a Poisson arrival process
(--request-rate R requests/s; --burstiness B makes the gaps gamma(B) as in
vLLM) capped at -c requests in flight.
Requests (deterministic for a given --seed):
  default        the 8 short text prompts below, rotating;
  --input-len    random token-id prompts of that length (FIXED, or uniform:LO:HI),
                 ids drawn from --token-range (default 10:500, valid for every
                 vocabulary the project ships); the server must accept token ids
                 in "prompt" (d2od, llama-server and vLLM do);
  --dataset-path a ShareGPT-format JSON file: the first human turn of each
                 conversation is the prompt, the first reply's length (counted
                 with the server's /tokenize, else bytes/4) is the output length
                 unless --output-len is given; conversations are shuffled with the
                 seed and filtered as vLLM does (prompt or reply < 4 tokens, prompt
                 > 1024 or both > --max-model-len tokens are skipped).
  --output-len   FIXED or uniform:LO:HI generated tokens (default --max-tokens);
                 ignore_eos is sent so each request produces exactly that many.
Reported (vLLM `bench serve` names, see loadtest/benchstats.py): request,
output and total token throughput, TTFT/TPOT/ITL/E2EL mean/median/std/p99,
goodput under --goodput SLOs; plus the client's own CPU time, since client and
server share this machine, and optionally server gauges polled from /metrics
(--metrics-gauge). Output: a table, or with --json one JSON object on stdout;
--result-file also writes the JSON. The JSON keeps this tool's older keys
(requests, failed, output_tok_s, req_s, ttft_p50_ms, itl_p50_ms, e2e_p50_ms, ...)
for the scripts that read them.
Comparison (--port-b): the same requests against server A (--port) and B,
in --rounds rounds ordered A B, B A, A B, ... (so drift over time hits both
alike), each server warmed up first; prints the median of each figure per
server with its range over rounds and the ratio B/A.

HTTP/1.1 over asyncio streams (keep-alive per connection slot unless
--no-keepalive; chunked or Content-Length bodies), standard library only.
A request sent on a reused keep-alive connection that the server had closed
(nothing of the response read) is sent once more on a new connection, as
openai-python/httpx do; `retries` in the JSON and the table counts these.
Loopback only: the host must be 127.0.0.0/8 or ::1. Token counts come from the
server's usage (stream_options.include_usage); only the usage event and the
final non-streamed body are JSON-decoded, so the client stays light.
Exit status: 0 when every request succeeded, 1 otherwise, 2 on bad arguments.
"""
import argparse
import asyncio
import ipaddress
import json
import math
import os
import random
import re
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchstats  # noqa: E402

PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The little dog", "One day, a big bird",
           "Sam had a red ball", "Mom said", "The sun was hot and", "There was a tree"]

CHOICE_RE = re.compile(rb'"choices"\s*:\s*\[\s*\{')
USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')


# ---- HTTP/1.1 client ------------------------------------------------------------------

class HttpError(Exception):
    pass


class NoResponse(HttpError):
    """The connection was closed or reset before the client read any byte of
    the response: the request may be retried, if the connection was a reused
    one (see one_request)."""


class Conn:
    """One HTTP/1.1 connection; reusable while the server keeps it open."""

    def __init__(self, reader, writer):
        self.reader, self.writer, self.reusable = reader, writer, True
        self.reused = False  # set by Pool.put: it completed a request and waits for the next

    @staticmethod
    async def open(host, port):
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Conn(reader, writer)

    def close(self):
        self.reusable = False
        try:
            self.writer.close()
        except (OSError, RuntimeError):
            pass

    async def request(self, method, host, port, path, body, keepalive, headers=()):
        """Sends one request, reads the status line and headers; returns
        (status, header dict with lower-case names). Raises NoResponse when the
        connection is closed or reset while sending or before the first byte
        of the status line was read, HttpError on a malformed response."""
        hdr = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}",
               "Connection: " + ("keep-alive" if keepalive else "close")]
        if body is not None:
            hdr += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        hdr += list(headers)
        try:
            self.writer.write(("\r\n".join(hdr) + "\r\n\r\n").encode() + (body or b""))
            await self.writer.drain()
            first = await self.reader.read(1)  # apart, so a close before any byte is told from a cut-off line
        except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError) as ex:
            raise NoResponse(f"connection {type(ex).__name__} before the status line") from None
        if not first:
            raise NoResponse("connection closed before the status line")
        line = first + await self.reader.readline()
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise HttpError(f"bad status line {line[:80]!r}")
        status = int(parts[1])
        h = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise HttpError("connection closed in the headers")
            k, _, v = line.decode("latin-1").partition(":")
            h[k.strip().lower()] = v.strip()
        if not keepalive or h.get("connection", "").lower() == "close" or parts[0] == b"HTTP/1.0":
            self.reusable = False
        return status, h

    async def body_blocks(self, h):
        """Yields the body as it arrives (chunked, Content-Length or to EOF):
        one block per read from the socket, so events that arrived together
        are timed together (a chunked body is decoded here, not chunk by
        chunk from the stream reader, which would time buffered chunks apart)."""
        rd = self.reader
        if "chunked" in h.get("transfer-encoding", "").lower():
            buf, need, state = b"", 0, "size"
            while True:
                out = []
                while True:
                    if state == "size" or state == "trailer":
                        i = buf.find(b"\r\n")
                        if i < 0:
                            break
                        line, buf = buf[:i], buf[i + 2:]
                        if state == "trailer":
                            if not line:
                                if out:
                                    yield b"".join(out)
                                if buf:
                                    self.reusable = False
                                return
                            continue
                        need = int(line.split(b";")[0].strip() or b"0", 16)
                        state = "data" if need else "trailer"
                    elif state == "data":
                        if not buf:
                            break
                        take = buf[:need]
                        out.append(take)
                        buf, need = buf[len(take):], need - len(take)
                        if need == 0:
                            state = "crlf"
                    else:  # crlf after the chunk's data
                        if len(buf) < 2:
                            break
                        buf, state = buf[2:], "size"
                if out:
                    yield b"".join(out)
                data = await rd.read(1 << 16)
                if not data:
                    raise HttpError("connection closed inside a chunked body")
                buf += data
        elif "content-length" in h:
            left = int(h["content-length"])
            while left > 0:
                data = await rd.read(min(left, 1 << 16))
                if not data:
                    raise HttpError("connection closed inside the body")
                left -= len(data)
                yield data
        else:
            self.reusable = False
            while True:
                data = await rd.read(1 << 16)
                if not data:
                    return
                yield data


class Pool:
    """Idle keep-alive connections to one server."""

    def __init__(self, host, port, keepalive):
        self.host, self.port, self.keepalive, self.idle = host, port, keepalive, []

    async def get(self):
        if self.keepalive and self.idle:
            return self.idle.pop()
        return await Conn.open(self.host, self.port)

    def put(self, c):
        if self.keepalive and c.reusable:
            c.reused = True
            self.idle.append(c)
        else:
            c.close()

    def close_all(self):
        for c in self.idle:
            c.close()
        self.idle = []


async def http_json(host, port, method, path, obj=None, timeout=10.0):
    """One request with Connection: close; returns (status, decoded JSON or text)."""
    async def go():
        c = await Conn.open(host, port)
        try:
            st, h = await c.request(method, host, port, path, json.dumps(obj).encode() if obj is not None else None,
                                    False)
            data = b"".join([b async for b in c.body_blocks(h)])
        finally:
            c.close()
        try:
            return st, json.loads(data)
        except ValueError:
            return st, data.decode("utf-8", "replace")
    return await asyncio.wait_for(go(), timeout)


# ---- one benchmark request ----------------------------------------------------------

async def one_request(pool, cfg, rq, timeout):
    """Sends rq ({'body': bytes, 'prompt_len': int or None}); returns a record
    dict (see benchstats.summarize) with ok/error/retries added.
    Retry rule (what openai-python's httpx does): a server may close an idle
    kept-alive connection at any time (llama-server does), and a request sent
    on it then meets the close before any byte of the response. Only in that
    case (a REUSED connection, NoResponse) the request is sent once more on a
    new connection; never after a response started, never when a fresh
    connection failed, never twice. TTFT and E2EL keep t0 from the first
    attempt, so the retry's cost stays in the latencies."""
    rec = {"ok": False, "error": None, "prompt_tokens": rq.get("prompt_len") or 0, "output_tokens": 0,
           "ttft": None, "itl": [], "e2el": None, "chunks": 0, "retries": 0}
    conn = None
    t0 = time.perf_counter()

    async def go():
        nonlocal conn
        conn = await pool.get()
        try:
            st, h = await conn.request("POST", pool.host, pool.port, cfg.path, rq["body"], pool.keepalive,
                                       cfg.headers)
        except NoResponse:
            if not conn.reused:
                raise
            conn.close()
            rec["retries"] += 1
            conn = await Conn.open(pool.host, pool.port)
            st, h = await conn.request("POST", pool.host, pool.port, cfg.path, rq["body"], pool.keepalive,
                                       cfg.headers)
        if st != 200:
            data = b"".join([b async for b in conn.body_blocks(h)])
            raise HttpError(f"HTTP {st}: {data[:300].decode('utf-8', 'replace')}")
        if not cfg.stream:
            data = b"".join([b async for b in conn.body_blocks(h)])
            rec["e2el"] = time.perf_counter() - t0
            usage = json.loads(data).get("usage") or {}
            rec["output_tokens"] = usage.get("completion_tokens", 0)
            rec["prompt_tokens"] = usage.get("prompt_tokens", rec["prompt_tokens"])
            return True
        buf = b""
        last = None
        done = False
        async for block in conn.body_blocks(h):
            now = time.perf_counter()
            buf += block
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    continue
                if CHOICE_RE.search(payload):  # a chunk (vLLM: an event with non-empty choices)
                    if last is None:
                        rec["ttft"] = now - t0
                    else:
                        rec["itl"].append(now - last)
                    last = now
                    rec["chunks"] += 1
                elif USAGE_RE.search(payload):
                    usage = json.loads(payload).get("usage") or {}
                    rec["output_tokens"] = usage.get("completion_tokens", 0)
                    rec["prompt_tokens"] = usage.get("prompt_tokens", rec["prompt_tokens"])
        rec["e2el"] = time.perf_counter() - t0
        if not done:
            raise HttpError("stream ended without [DONE]")
        if not rec["output_tokens"]:
            rec["output_tokens"] = rec["chunks"]  # a server without usage: one token per chunk
        return True

    try:
        rec["ok"] = await asyncio.wait_for(go(), max(0.01, timeout))
        if rec["ok"] and rec["output_tokens"] <= 0:
            rec["ok"], rec["error"] = False, "no output tokens"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, HttpError, ValueError) as ex:
        rec["error"] = f"{type(ex).__name__}: {ex}"
        if conn is not None:
            conn.close()
    finally:
        if conn is not None:
            if rec["ok"]:
                pool.put(conn)
            else:
                conn.close()
    return rec


# ---- /metrics gauges ----------------------------------------------------------------

async def poll_gauges(host, port, names, interval, stop, out):
    """Samples the named gauges (summed over label sets) until stop is set;
    out[name] = list of values."""
    for n in names:
        out.setdefault(n, [])
    while not stop.is_set():
        try:
            st, text = await http_json(host, port, "GET", "/metrics", None, 5.0)
            if st == 200 and isinstance(text, str):
                vals = {}
                for line in text.splitlines():
                    for n in names:
                        if line.startswith(n) and line[len(n):len(n) + 1] in (" ", "{"):
                            try:
                                vals[n] = vals.get(n, 0.0) + float(line.rsplit(None, 1)[1])
                            except (ValueError, IndexError):
                                pass
                for n, v in vals.items():
                    out[n].append(v)
        except (OSError, asyncio.TimeoutError, HttpError, ValueError):
            pass
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


# ---- requests ----------------------------------------------------------------------

def parse_dist(spec, what):
    """'128' | 'fixed:128' | 'uniform:64:256' -> (lo, hi)."""
    p = str(spec).split(":")
    try:
        if len(p) == 1:
            lo = hi = int(p[0])
        elif p[0] == "fixed" and len(p) == 2:
            lo = hi = int(p[1])
        elif p[0] == "uniform" and len(p) == 3:
            lo, hi = int(p[1]), int(p[2])
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"{what}: expected N, fixed:N or uniform:LO:HI, got '{spec}'") from None
    if not (1 <= lo <= hi <= 1 << 20):
        raise ValueError(f"{what}: need 1 <= LO <= HI")
    return lo, hi


def draw(rng, d):
    return d[0] if d[0] == d[1] else rng.randint(d[0], d[1])


async def count_tokens(host, port, text):
    """Token count of text from the server's /tokenize (d2od reads 'prompt',
    llama-server 'content'); bytes/4 when the server has none."""
    try:
        st, j = await http_json(host, port, "POST", "/tokenize",
                                {"prompt": text, "content": text, "add_special_tokens": False}, 10.0)
        if st == 200 and isinstance(j, dict):
            if isinstance(j.get("count"), int):
                return j["count"]
            if isinstance(j.get("tokens"), list):
                return len(j["tokens"])
    except (OSError, asyncio.TimeoutError, HttpError, ValueError):
        pass
    return max(1, len(text.encode()) // 4)


async def sharegpt_items(args, n, rng):
    """[(prompt text, prompt tokens, output tokens)] for n requests from the file."""
    with open(args.dataset_path, encoding="utf-8") as f:
        data = json.load(f)
    convs = [d.get("conversations") or d.get("conversation") or [] for d in data if isinstance(d, dict)]
    convs = [c for c in convs if len(c) >= 2 and isinstance(c[0], dict) and isinstance(c[1], dict)]
    rng.shuffle(convs)
    fixed_out = parse_dist(args.output_len, "--output-len") if args.output_len else None
    items = []
    for c in convs:
        if len(items) >= n:
            break
        prompt, reply = str(c[0].get("value", "")), str(c[1].get("value", ""))
        if not prompt:
            continue
        p_len = await count_tokens(args.host, args.port, prompt)
        o_len = draw(rng, fixed_out) if fixed_out else await count_tokens(args.host, args.port, reply)
        if p_len < 4 or (o_len < 4 and not fixed_out) or p_len > 1024 or p_len + o_len > args.max_model_len:
            continue
        items.append((prompt, p_len, o_len))
    if not items:
        raise ValueError(f"{args.dataset_path}: no usable ShareGPT conversations")
    while len(items) < n:  # a short file: cycle (vLLM samples with replacement too)
        items.append(items[len(items) % max(1, len(items))])
    return items


async def build_requests(args, n, seed):
    """n request dicts {'body': bytes, 'prompt_len': int or None}; deterministic in seed."""
    rng = random.Random(seed)
    out_d = parse_dist(args.output_len or args.max_tokens, "--output-len")
    base = {"temperature": args.temperature, "stream": args.stream}
    if args.model:
        base["model"] = args.model
    if args.stream:
        base["stream_options"] = {"include_usage": True}
    if args.ignore_eos:
        base["ignore_eos"] = True
    base.update(args.extra)
    items = []
    if args.dataset_path:
        for text, p_len, o_len in await sharegpt_items(args, n, rng):
            items.append((text, p_len, o_len))
    elif args.input_len:
        in_d = parse_dist(args.input_len, "--input-len")
        lo, hi = args.token_lo, args.token_hi
        for _ in range(n):
            k = draw(rng, in_d)
            items.append(([rng.randrange(lo, hi) for _ in range(k)], k, draw(rng, out_d)))
    else:
        for i in range(n):
            items.append((PROMPTS[i % len(PROMPTS)], None, draw(rng, out_d)))
    reqs = []
    for i, (prompt, p_len, o_len) in enumerate(items):
        b = dict(base, max_tokens=o_len, seed=seed * 1000003 + i)
        if args.chat:
            b["messages"] = [{"role": "user", "content": prompt}]
        else:
            b["prompt"] = prompt
        reqs.append({"body": json.dumps(b).encode(), "prompt_len": p_len})
    return reqs


# ---- one run -----------------------------------------------------------------------

async def run_once(args, port, reqs, slos):
    """Runs reqs against port with the configured arrival process; returns the
    summary dict (vLLM keys + compatibility keys + client CPU + gauges)."""
    pool = Pool(args.host, port, args.keepalive)
    sem = asyncio.Semaphore(args.concurrency)
    arrivals = random.Random(args.seed + 7)
    t_start = time.perf_counter()
    cpu0 = time.process_time()
    deadline = t_start + args.time_limit
    gauges, stop = {}, asyncio.Event()
    poller = None
    if args.metrics_gauge:
        poller = asyncio.ensure_future(poll_gauges(args.host, port, args.metrics_gauge, args.metrics_interval,
                                                   stop, gauges))

    async def limited(rq):
        async with sem:
            left = deadline - time.perf_counter()
            if left <= 0:
                return {"ok": False, "error": "time limit reached before sending"}
            return await one_request(pool, args, rq, left)

    tasks = []
    t_next = t_start
    for rq in reqs:
        if math.isfinite(args.request_rate):
            t_next += arrivals.gammavariate(args.burstiness, 1.0 / (args.request_rate * args.burstiness))
            wait = t_next - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        if time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.ensure_future(limited(rq)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t_start
    cpu = time.process_time() - cpu0
    stop.set()
    if poller:
        await poller
    pool.close_all()
    ok = [r for r in results if r["ok"]]
    failed = len(reqs) - len(ok)
    res = {"num_prompts": len(reqs), "failed": failed, "retries": sum(r.get("retries", 0) for r in results),
           "max_concurrency": args.concurrency, "request_rate": args.request_rate if math.isfinite(
               args.request_rate) else "inf", "burstiness": args.burstiness, "stream": args.stream}
    res.update(benchstats.summarize(ok, duration, slos))
    res["goodput"] = res["request_goodput"]
    res["client_cpu_s"] = cpu
    res["client_cpu_frac"] = cpu / duration if duration > 0 else 0.0
    # the keys of this tool before it followed vLLM (tests/bench.sh, bench_concurrency.sh read them)
    res.update({"concurrency": args.concurrency, "requests": len(ok), "max_tokens": args.max_tokens,
                "wall_s": round(duration, 4), "output_tokens": res["total_output_tokens"],
                "output_tok_s": round(res["output_throughput"], 1), "req_s": round(res["request_throughput"], 3)})
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    e2e = [r["e2el"] for r in ok]
    for name, xs in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for p in (50, 90, 99):
            v = benchstats.percentile(xs, p)
            res[f"{name}_p{p}_ms"] = round(v * 1000, 3) if v is not None else None
    if gauges:
        res["server_gauges"] = {n: {"max": max(v) if v else None, "min": min(v) if v else None,
                                    "mean": benchstats.mean(v), "last": v[-1] if v else None, "samples": len(v)}
                                for n, v in gauges.items()}
    res["errors"] = [r["error"] for r in results if not r["ok"]][:5]
    return res


async def warm(args, port):
    if args.warmup > 0:
        wreqs = await build_requests(args, args.warmup, args.seed + 99991)
        await run_once(args, port, wreqs, None)


# ---- output ------------------------------------------------------------------------

def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


ROWS = [("Successful requests", "completed"), ("Failed requests", "failed"),
        ("Benchmark duration (s)", "duration"), ("Total input tokens", "total_input_tokens"),
        ("Total generated tokens", "total_output_tokens"), ("Request throughput (req/s)", "request_throughput"),
        ("Request goodput (req/s)", "request_goodput"), ("Output token throughput (tok/s)", "output_throughput"),
        ("Total token throughput (tok/s)", "total_token_throughput")]
SECTIONS = [("Time to First Token", "ttft", "TTFT"), ("Time per Output Token (excl. 1st token)", "tpot", "TPOT"),
            ("Inter-token Latency", "itl", "ITL"), ("End-to-end Latency", "e2el", "E2EL")]


def print_table(r, title="Serving Benchmark Result"):
    print(f"{' ' + title + ' ':=^50}")
    for label, k in ROWS:
        if k == "request_goodput" and r.get(k) is None:
            continue
        print(f"{label + ':':<40}{fmt(r.get(k)):<10}")
    for title_s, m, short in SECTIONS:
        print(f"{title_s:-^50}")
        for stat, lab in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            print(f"{lab + ' ' + short + ' (ms):':<40}{fmt(r.get(f'{stat}_{m}_ms')):<10}")
    print(f"{'Client':-^50}")
    print(f"{'Client CPU time (s):':<40}{fmt(r.get('client_cpu_s'))} ({100 * r.get('client_cpu_frac', 0):.1f}% of a core)")
    print(f"{'Retries (server-closed keep-alive):':<40}{fmt(r.get('retries'))}")
    for n, g in (r.get("server_gauges") or {}).items():
        print(f"{n + ' max/mean:':<40}{fmt(g['max'])} / {fmt(g['mean'])}")
    print("=" * 50)


COMPARE_KEYS = ["request_throughput", "output_throughput", "total_token_throughput", "request_goodput",
                "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
                "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
                "failed", "retries", "client_cpu_frac"]


def median_summary(rounds):
    """Per key: the median over rounds of numeric values (None when none)."""
    out = {}
    for k in COMPARE_KEYS:
        xs = [r[k] for r in rounds if isinstance(r.get(k), (int, float))]
        out[k] = statistics.median(xs) if xs else None
        out[k + "_range"] = [min(xs), max(xs)] if xs else None
    return out


def print_compare(rep):
    a, b = rep["a"], rep["b"]
    print(f"A = {rep['label_a']} (port {rep['port_a']}), B = {rep['label_b']} (port {rep['port_b']}); "
          f"{rep['rounds']} rounds, order {' '.join(rep['order'])}; medians [range]")
    print(f"{'metric':<24}{'A':>26}{'B':>26}{'B/A':>8}")
    for k in COMPARE_KEYS:
        if a.get(k) is None and b.get(k) is None:
            continue
        ra, rb = a.get(k + "_range"), b.get(k + "_range")
        sa = f"{fmt(a[k])} [{fmt(ra[0], 1)}-{fmt(ra[1], 1)}]" if ra else "-"
        sb = f"{fmt(b[k])} [{fmt(rb[0], 1)}-{fmt(rb[1], 1)}]" if rb else "-"
        print(f"{k:<24}{sa:>26}{sb:>26}{fmt(rep['ratio_b_over_a'].get(k)):>8}")


# ---- main --------------------------------------------------------------------------

async def main_async(args, slos):
    if args.port_b is None:
        reqs = await build_requests(args, args.requests, args.seed)
        await warm(args, args.port)
        return await run_once(args, args.port, reqs, slos)
    reqs = await build_requests(args, args.requests, args.seed)
    await warm(args, args.port)
    await warm(args, args.port_b)
    rounds = {"a": [], "b": []}
    order = []
    for i in range(args.rounds):
        for side in (("a", "b") if i % 2 == 0 else ("b", "a")):
            order.append(side.upper())
            rounds[side].append(await run_once(args, args.port if side == "a" else args.port_b, reqs, slos))
    a, b = median_summary(rounds["a"]), median_summary(rounds["b"])
    ratio = {k: (b[k] / a[k] if isinstance(a[k], (int, float)) and isinstance(b[k], (int, float)) and a[k]
                 else None) for k in COMPARE_KEYS}
    fails = sum(r["failed"] for s in rounds.values() for r in s)
    return {"mode": "compare", "label_a": args.label_a, "label_b": args.label_b, "port_a": args.port,
            "port_b": args.port_b, "rounds": args.rounds, "order": order, "a": a, "b": b,
            "ratio_b_over_a": ratio, "rounds_a": rounds["a"], "rounds_b": rounds["b"], "failed": fails,
            "errors": [e for s in rounds.values() for r in s for e in r["errors"]][:5]}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="server (A in a comparison)")
    ap.add_argument("--port-b", type=int, default=None, help="second server: run A/B interleaved and print ratios")
    ap.add_argument("--rounds", type=int, default=3, help="comparison rounds (each runs A and B once)")
    ap.add_argument("--label-a", default="A")
    ap.add_argument("--label-b", default="B")
    ap.add_argument("-c", "--concurrency", type=int, default=8, help="maximum requests in flight")
    ap.add_argument("-n", "--requests", type=int, default=None, help="timed requests (default 4 per client)")
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="Poisson arrivals per second (default inf: all at once, capped by -c)")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    ap.add_argument("--max-tokens", type=int, default=128, help="output length when --output-len is not given")
    ap.add_argument("--output-len", default=None, help="N, fixed:N or uniform:LO:HI generated tokens")
    ap.add_argument("--input-len", default=None, help="N, fixed:N or uniform:LO:HI prompt tokens (random ids)")
    ap.add_argument("--token-range", default="10:500", help="LO:HI token ids for --input-len prompts")
    ap.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file")
    ap.add_argument("--max-model-len", type=int, default=2048, help="ShareGPT filter: prompt + output tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=0, help="untimed requests before the run (per server)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--model", default=None, help="the request's model field")
    ap.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    ap.add_argument("--no-stream", dest="stream", action="store_false", help="non-streamed responses (no TTFT/ITL)")
    ap.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    ap.add_argument("--no-keepalive", dest="keepalive", action="store_false",
                    help="a new connection per request")
    ap.add_argument("--extra-body", default=None, help='JSON object merged into every request, e.g. '
                    '\'{"kv_compression": {"method": "d2o", "budget": 0.2}}\'')
    ap.add_argument("--api-key", default=os.environ.get("D2OD_API_KEY"), help="Bearer token (env D2OD_API_KEY)")
    ap.add_argument("--goodput", nargs="*", default=None, help="SLOs in ms: ttft:200 tpot:50 e2el:2000")
    ap.add_argument("--metrics-gauge", action="append", default=[],
                    help="poll this /metrics gauge during the run (repeatable), e.g. d2od:num_requests_running")
    ap.add_argument("--metrics-interval", type=float, default=0.1)
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per run; unfinished requests fail")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--result-file", default=None, help="also write the JSON object to this file")
    args = ap.parse_args(argv)
    if args.requests is None:
        args.requests = 4 * args.concurrency
    if not (1 <= args.concurrency <= 4096 and 1 <= args.requests <= 100000 and 0 < args.time_limit <= 86400):
        ap.error("concurrency 1..4096, requests 1..100000, time limit (0, 86400]")
    if not (args.request_rate > 0 and args.burstiness > 0 and 1 <= args.rounds <= 100 and 0 <= args.warmup <= 10000):
        ap.error("--request-rate and --burstiness must be > 0, --rounds 1..100, --warmup 0..10000")
    if args.max_tokens < 1:
        ap.error("--max-tokens must be >= 1")
    try:
        for spec, what in ((args.output_len, "--output-len"), (args.input_len, "--input-len")):
            if spec:
                parse_dist(spec, what)
        lo, _, hi = args.token_range.partition(":")
        args.token_lo, args.token_hi = int(lo), int(hi)
        if not 0 <= args.token_lo < args.token_hi:
            raise ValueError("--token-range: need 0 <= LO < HI")
        args.extra = json.loads(args.extra_body) if args.extra_body else {}
        if not isinstance(args.extra, dict):
            raise ValueError("--extra-body must be a JSON object")
        args.slos = benchstats.parse_slos(" ".join(args.goodput or []))
    except ValueError as ex:
        ap.error(str(ex))
    if args.dataset_path and args.input_len:
        ap.error("--dataset-path and --input-len are exclusive")
    if args.chat and args.input_len:
        ap.error("--input-len sends token ids, which only /v1/completions takes: not with --chat")
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(args.host))
    except (OSError, ValueError):
        ap.error(f"cannot resolve {args.host}")
    if not addr.is_loopback:
        ap.error("loopback only: --host must be 127.0.0.0/8 or ::1")
    args.path = "/v1/chat/completions" if args.chat else "/v1/completions"
    args.headers = [f"Authorization: Bearer {args.api_key}"] if args.api_key else []
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        rep = asyncio.run(main_async(args, args.slos))
    except (OSError, ValueError) as ex:
        print(f"load.py: {ex}", file=sys.stderr)
        return 1
    text = json.dumps(rep)
    if args.result_file:
        with open(args.result_file, "w") as f:
            f.write(text + "\n")
    if args.json:
        print(text)
    elif rep.get("mode") == "compare":
        print_compare(rep)
    else:
        print_table(rep)
    if rep.get("errors"):
        print("errors (first 5): " + " | ".join(str(e)[:200] for e in rep["errors"]), file=sys.stderr)
    return 0 if rep["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
