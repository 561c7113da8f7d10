#!/usr/bin/env python3
"""loadtest/load.py — a bounded load generator for a running d2od daemon.

Runs C concurrent streaming clients against POST /v1/completions (or
/v1/chat/completions with --chat) until R requests are done or the time limit
passes, then reports aggregate output tokens/s and the TTFT, inter-token
latency (ITL) and end-to-end latency percentiles.

    python3 loadtest/load.py --port 8000 -c 32 -n 128 --max-tokens 256
    python3 loadtest/load.py --port 8000 -c 1 -n 8 --json   # one JSON line

Loopback only: the host must be 127.0.0.0/8 or ::1. Every request asks for
stream_options.include_usage, so token counts are the server's; ITL is measured
between SSE events that carry text (an event may hold more than one token when
a UTF-8 sequence or a possible stop string was held back; events that arrive in
one read are timed together). Only the usage event is JSON-decoded. Requests use
ignore_eos so each produces exactly --max-tokens tokens.

Standard library only (asyncio); HTTP/1.0 so the event stream is the raw body.
Exit status: 0 when every request succeeded, 1 otherwise.
"""
import argparse
import asyncio
import ipaddress
import json
import socket
import sys
import time

PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The little dog", "One day, a big bird",
           "Sam had a red ball", "Mom said", "The sun was hot and", "There was a tree"]


def pct(xs, p):
    """p-th percentile (nearest rank) of xs, or None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


class Result:
    __slots__ = ("ok", "status", "error", "tokens", "ttft", "itl", "e2e")

    def __init__(self):
        self.ok, self.status, self.error = False, None, None
        self.tokens, self.ttft, self.itl, self.e2e = 0, None, [], None


async def one_request(host, port, path, body, timeout):
    r = Result()
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as ex:
        r.error = f"connect: {ex}"
        return r
    try:
        data = json.dumps(body).encode()
        writer.write(b"POST %s HTTP/1.0\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (path.encode(), host.encode(), len(data), data))
        await writer.drain()
        deadline = t0 + timeout
        status_line = await asyncio.wait_for(reader.readline(), timeout)
        parts = status_line.split()
        r.status = int(parts[1]) if len(parts) > 1 else None
        while True:  # headers
            line = await asyncio.wait_for(reader.readline(), max(0.01, deadline - time.perf_counter()))
            if line in (b"\r\n", b"\n", b""):
                break
        if r.status != 200:
            r.error = (await reader.read(400)).decode("utf-8", "replace")
            return r
        last = None
        done = False
        while True:
            line = await asyncio.wait_for(reader.readline(), max(0.01, deadline - time.perf_counter()))
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                done = True
                continue
            now = time.perf_counter()
            # Only the usage event is parsed: JSON-decoding every event would
            # make this client, not the server, the bottleneck on a small box.
            if b'"usage":{' in payload:
                r.tokens = json.loads(payload)["usage"]["completion_tokens"]
                continue
            if b'"text":""' in payload or b'"delta":{}' in payload or not payload.startswith(b"{"):
                continue  # a finish event without text
            if last is None:
                r.ttft = now - t0
            else:
                r.itl.append(now - last)
            last = now
        r.e2e = time.perf_counter() - t0
        r.ok = done and r.tokens > 0
        if not r.ok:
            r.error = "stream ended without [DONE] or usage"
    except (OSError, asyncio.TimeoutError, ValueError) as ex:
        r.error = f"{type(ex).__name__}: {ex}"
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    return r


async def run(args):
    path = "/v1/chat/completions" if args.chat else "/v1/completions"
    results = []
    next_i = 0
    t_end = time.perf_counter() + args.time_limit

    def make_body(i):
        p = PROMPTS[i % len(PROMPTS)]
        b = {"max_tokens": args.max_tokens, "temperature": args.temperature, "stream": True,
             "stream_options": {"include_usage": True}, "ignore_eos": True, "seed": i}
        if args.chat:
            b["messages"] = [{"role": "user", "content": p}]
        else:
            b["prompt"] = p
        return b

    async def worker():
        nonlocal next_i
        while next_i < args.requests and time.perf_counter() < t_end:
            i = next_i
            next_i += 1
            left = t_end - time.perf_counter()
            results.append(await one_request(args.host, args.port, path, make_body(i), max(0.1, left)))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    return results, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("-n", "--requests", type=int, default=None, help="total requests (default 4 per client)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds; unfinished requests count as failed")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    if args.requests is None:
        args.requests = 4 * args.concurrency
    if not (1 <= args.concurrency <= 1024 and 1 <= args.requests <= 100000 and 0 < args.time_limit <= 3600):
        ap.error("concurrency 1..1024, requests 1..100000, time limit (0, 3600]")
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(args.host))
    except (OSError, ValueError):
        ap.error(f"cannot resolve {args.host}")
    if not addr.is_loopback:
        ap.error("loopback only: --host must be 127.0.0.0/8 or ::1")
    results, wall = asyncio.run(run(args))
    ok = [r for r in results if r.ok]
    failed = len(results) - len(ok) + (args.requests - len(results))
    toks = sum(r.tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok]
    rep = {
        "concurrency": args.concurrency, "requests": len(ok), "failed": failed, "max_tokens": args.max_tokens,
        "wall_s": round(wall, 4), "output_tokens": toks, "output_tok_s": round(toks / wall, 1) if wall > 0 else 0,
        "req_s": round(len(ok) / wall, 3) if wall > 0 else 0,
    }
    for name, xs in (("ttft", ttft), ("itl", itl), ("e2e", e2e)):
        for p in (50, 90, 99):
            v = pct(xs, p)
            rep[f"{name}_p{p}_ms"] = round(v * 1000, 3) if v is not None else None
    if args.json:
        print(json.dumps(rep))
    else:
        print(f"concurrency {args.concurrency}: {len(ok)} ok, {failed} failed in {wall:.2f} s")
        print(f"  output {toks} tokens, {rep['output_tok_s']} tok/s aggregate, {rep['req_s']} req/s")
        for name in ("ttft", "itl", "e2e"):
            print(f"  {name:5s} p50 {rep[f'{name}_p50_ms']} ms  p90 {rep[f'{name}_p90_ms']} ms  "
                  f"p99 {rep[f'{name}_p99_ms']} ms")
    errs = [r.error for r in results if not r.ok][:3]
    if errs:
        print("errors (first 3): " + " | ".join(str(e)[:200] for e in errs), file=sys.stderr)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
