#!/usr/bin/env python3
"""loadtest/soak.py — a bounded soak and fault run against d2od (issue 14).

C clients (32-64) loop for D seconds, each request drawn at random: completions
or chat, streamed or not, a prompt of 3-300 words or token ids, max_tokens from
{1, 2, 8, 32, 64, 128, 256}, n 2-3 (20 %), logprobs (15 %), stop strings (15 %),
greedy (30 %), ignore_eos (20 %), include_usage, and every KV method (full, d2o,
h2o, streamingllm, snapkv, pyramidkv, the server default) with a fractional or
token-count budget. About 20 % are cancelled after 0-1.5 s (half with FIN, half
with RST) and about 10 % read their answer slowly. /health is polled every
second throughout, and the daemon gets a SIGHUP (a rewritten config file) in the
middle.

Afterwards it asserts: no 5xx (client-side and the server's http_5xx_total),
/health 200 at every poll, every KV page back in the pool once idle, RSS growth
from the end of the warm-up (a quarter of the run) to the end within
--rss-bound-mb; and prints those figures.

    python3 loadtest/soak.py --binary build/d2od --duration 60        # own daemon
    python3 loadtest/soak.py --binary build/d2od --duration 600 -c 64 # by hand
    python3 loadtest/soak.py --port 8000 --pid 1234 --duration 120    # a running one

With --binary it starts `d2od serve` on 127.0.0.1 (a free port, the model from
--model or ../shared) with a config file, and with --tsan it also fails on any
ThreadSanitizer report in the daemon's log. Loopback only; standard library
only (asyncio, raw HTTP/1.1). Exit status 0 when every assertion held.
"""
import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

HOST = "127.0.0.1"
WORDS = ("once upon a time there was a little girl named lily she liked to play with her ball in the park "
         "one day a big dog came and they were happy the sun was hot tom said mom the bird flew away").split()
METHODS = ["full", "d2o", "h2o", "streamingllm", "snapkv", "pyramidkv", None]


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def dechunk(body):
    out = b""
    while body:
        line, sep, body = body.partition(b"\r\n")
        if not sep:
            break
        try:
            n = int(line.split(b";")[0] or b"0", 16)
        except ValueError:
            return None
        if n == 0:
            return out
        out += body[:n]
        body = body[n + 2:]
    return out


class Stats:
    def __init__(self):
        self.sent = 0
        self.status = {}
        self.cancelled = 0
        self.slow = 0
        self.bad = []          # malformed answers
        self.lat = []
        self.health = {}
        self.health_fail = []
        self.tokens = 0

    def add_status(self, st):
        self.status[st] = self.status.get(st, 0) + 1


LIGHT = False  # --light: short prompts and outputs (sanitizer builds run 10-50x slower)


def make_body(rng):
    chat = rng.random() < 0.35
    body = {"max_tokens": rng.choice([1, 2, 4, 8, 16] if LIGHT else [1, 2, 8, 32, 64, 128, 256])}
    words = 20 if LIGHT else 300
    if chat:
        body["messages"] = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, min(60, words))))}]
        if rng.random() < 0.2:
            body["messages"].insert(0, {"role": "system", "content": "be brief"})
    elif rng.random() < 0.15:
        body["prompt"] = [rng.randint(3, 500) for _ in range(rng.randint(2, min(100, words)))]
    else:
        body["prompt"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, words)))
    stream = rng.random() < 0.5
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body["n"] = rng.randint(2, 3)
    if rng.random() < 0.15:
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = rng.randint(0, 5)
        else:
            body["logprobs"] = rng.randint(0, 5)
    if rng.random() < 0.15:
        body["stop"] = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        body["temperature"] = 0
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    m = rng.choice(METHODS)
    if m:
        kv = {"method": m}
        if m != "full":
            kv["budget"] = rng.choice([0.2, 0.5, 0.9, 16, 64])
            if rng.random() < 0.2:
                kv["exact"] = True
            if m in ("snapkv", "pyramidkv") and rng.random() < 0.5:
                kv["window"] = rng.choice([4, 8, 32])
        body["kv_compression"] = kv
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, stream


async def one_request(port, rng, st, deadline):
    path, body, stream = make_body(rng)
    data = json.dumps(body).encode()
    fate = rng.random()
    cancel = fate < 0.2
    slow = not cancel and fate < 0.3
    t0 = time.time()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    except (OSError, asyncio.TimeoutError) as ex:
        st.bad.append(f"connect: {ex}")
        return
    st.sent += 1
    try:
        writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % (path.encode(), len(data)) + data)
        await writer.drain()
        if cancel:
            await asyncio.sleep(rng.random() * 1.5)
            sock = writer.get_extra_info("socket")
            if rng.random() < 0.5 and sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # RST
            else:
                writer.close()
            st.cancelled += 1
            return
        buf = b""
        limit = max(5.0, deadline - time.time() + 120)
        while True:
            chunk = await asyncio.wait_for(reader.read(256 if slow else 65536), limit)
            if not chunk:
                break
            buf += chunk
            if slow:
                await asyncio.sleep(0.02)
        if slow:
            st.slow += 1
        head, _, rest = buf.partition(b"\r\n\r\n")
        try:
            code = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            st.bad.append(f"no status line: {buf[:80]!r}")
            return
        st.add_status(code)
        st.lat.append(time.time() - t0)
        if b"chunked" in head.lower():
            rest = dechunk(rest)
            if rest is None:
                st.bad.append("bad chunking")
                return
        if code != 200:
            return
        if stream:
            if not rest.rstrip().endswith(b"data: [DONE]"):
                st.bad.append(f"stream without [DONE]: {rest[-120:]!r}")
                return
            for ev in rest.split(b"\n\n"):
                if ev.startswith(b"data: {") and b'"usage":{' in ev:
                    st.tokens += json.loads(ev[6:])["usage"]["completion_tokens"]
        else:
            j = json.loads(rest)
            st.tokens += j["usage"]["completion_tokens"]
            if len(j["choices"]) != body.get("n", 1):
                st.bad.append(f"choices {len(j['choices'])} for n={body.get('n', 1)}")
    except (OSError, asyncio.TimeoutError, ValueError, KeyError) as ex:
        st.bad.append(f"{type(ex).__name__}: {ex}"[:200])
    finally:
        try:
            writer.close()
        except Exception:  # noqa: BLE001
            pass


async def client(port, seed, st, deadline):
    rng = random.Random(seed)
    while time.time() < deadline:
        await one_request(port, rng, st, deadline)


async def get(port, path, timeout=5):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path.encode())
        await writer.drain()
        buf = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, rest = buf.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        rest = dechunk(rest) or b""
    return int(head.split(b" ", 2)[1]), rest


async def metrics(port):
    _, body = await get(port, "/metrics")
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, val = line.rpartition(" ")
            out[name.split("{")[0]] = float(val)
    return out


async def health_poller(port, st, stop):
    while not stop.is_set():
        t = time.time()
        try:
            code, _ = await get(port, "/health", timeout=5)
        except (OSError, asyncio.TimeoutError, ValueError, IndexError) as ex:
            code = f"{type(ex).__name__}"
        st.health[code] = st.health.get(code, 0) + 1
        if code != 200:
            st.health_fail.append((round(t, 1), code))
        try:
            await asyncio.wait_for(stop.wait(), max(0.0, 1.0 - (time.time() - t)))
        except asyncio.TimeoutError:
            pass


async def run(args, port, pid, conf):
    st = Stats()
    m0 = await metrics(port)  # counters from here on (a /health 503 while it warmed up is not the soak's)
    t0 = time.time()
    deadline = t0 + args.duration
    stop = asyncio.Event()
    poller = asyncio.create_task(health_poller(port, st, stop))
    clients = [asyncio.create_task(client(port, args.seed * 1000 + i, st, deadline)) for i in range(args.clients)]
    rss = {"start": rss_mb(pid) if pid else None}
    await asyncio.sleep(args.duration * 0.25)
    rss["warm"] = rss_mb(pid) if pid else None
    await asyncio.sleep(max(0.0, t0 + args.duration * 0.5 - time.time()))
    hup = None
    if pid and not args.no_sighup:
        if conf:
            with open(conf, "w") as f:
                f.write("max_queue 300\nlog_level info\nrequest_timeout_s 600\n")
        os.kill(pid, signal.SIGHUP)
        hup = round(time.time() - t0, 1)
    await asyncio.gather(*clients)
    t_load = time.time() - t0
    # idle: nothing running or waiting, then every page must be free
    m = {}
    idle_deadline = time.time() + 60
    while time.time() < idle_deadline:
        m = await metrics(port)
        if m.get("d2od:num_requests_running") == 0 and m.get("d2od:num_requests_waiting") == 0:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    m = await metrics(port)
    stop.set()
    await poller
    rss["end"] = rss_mb(pid) if pid else None
    for k in ("d2od:http_5xx_total", "d2od:request_errors_total"):
        m[k] = m.get(k, 0) - m0.get(k, 0)
    return st, m, rss, t_load, hup


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", help="start this d2od (else --port/--pid name a running one)")
    ap.add_argument("--model", default=os.path.join(os.environ.get("D2_SHARED", "../shared"),
                                                    "assets/models/stories260K/stories260K.gguf"))
    ap.add_argument("--port", type=int)
    ap.add_argument("--pid", type=int, help="the daemon's pid (RSS and SIGHUP); with --binary, its own")
    ap.add_argument("-c", "--clients", type=int, default=48)
    ap.add_argument("--duration", type=float, default=60, help="seconds of load (then the drain)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rss-bound-mb", type=float, default=64, help="allowed RSS growth after the warm-up")
    ap.add_argument("--no-sighup", action="store_true")
    ap.add_argument("--tsan", action="store_true", help="fail on ThreadSanitizer reports in the daemon log")
    ap.add_argument("--log-requests", action="store_true", help="the daemon logs every request (--binary)")
    ap.add_argument("--light", action="store_true", help="prompts of at most 20 words, max_tokens at most 16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = ap.parse_args()
    global LIGHT
    LIGHT = args.light
    proc, tmp, conf, log_path = None, None, None, None
    port, pid = args.port, args.pid
    if args.binary:
        tmp = tempfile.mkdtemp(prefix="d2od-soak-")
        conf = os.path.join(tmp, "d2od.conf")
        with open(conf, "w") as f:
            f.write("max_queue 256\nlog_level info\n")
        log_path = os.path.join(tmp, "daemon.log")
        port = free_port()
        env = dict(os.environ)
        env.setdefault("TSAN_OPTIONS", f"halt_on_error=0 exitcode=66 log_path={os.path.join(tmp, 'tsan')}")
        log = open(log_path, "wb")
        proc = subprocess.Popen([args.binary, "serve", "--model", args.model, "--host", HOST, "--port", str(port),
                                 "--threads", str(args.threads), "--config", conf,
                                 "--log-requests", "true" if args.log_requests else "false",
                                 "--max-tokens-limit", "4096"], stdout=log, stderr=subprocess.STDOUT, env=env)
        pid = proc.pid
        t = time.time()
        up = False
        while time.time() - t < 120 and proc.poll() is None:
            try:
                with socket.create_connection((HOST, port), timeout=1) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if b" 200 " in s.recv(100):
                        up = True
                        break
            except OSError:
                pass
            time.sleep(0.1)
        if not up:
            print(f"soak: the daemon did not start: {open(log_path, 'rb').read()[-1500:]!r}")
            proc.kill()
            return 1
    if not port:
        ap.error("--binary or --port is required")
    try:
        st, m, rss, t_load, hup = asyncio.run(run(args, port, pid, conf))
    finally:
        rc = None
        if proc:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    five = sum(v for k, v in st.status.items() if k >= 500)
    server5 = m.get("d2od:http_5xx_total", 0)
    pages_ok = m.get("d2od:kv_pages_free") == m.get("d2od:kv_pages_total")
    health_ok = not st.health_fail and st.health.get(200, 0) > 0
    growth = (rss["end"] - rss["warm"]) if rss.get("end") and rss.get("warm") else None
    rss_ok = growth is None or growth <= args.rss_bound_mb
    tsan = []
    if args.tsan and tmp:
        for name in os.listdir(tmp):
            if name.startswith("tsan"):
                tsan.append(open(os.path.join(tmp, name), errors="replace").read())
        txt = open(log_path, errors="replace").read()
        if "WARNING: ThreadSanitizer" in txt:
            tsan.append(txt[txt.index("WARNING: ThreadSanitizer"):][:3000])
    hup_ok = True
    if proc and hup is not None:
        hup_ok = "reloaded max_queue" in open(log_path, errors="replace").read()
    figures = {
        "clients": args.clients, "duration_s": round(t_load, 1), "sent": st.sent, "status": st.status,
        "cancelled": st.cancelled, "slow_readers": st.slow, "completion_tokens": st.tokens,
        "client_5xx": five, "server_http_5xx_total": server5, "malformed": len(st.bad),
        "latency_p50_s": round(pct(st.lat, 50) or 0, 3), "latency_p99_s": round(pct(st.lat, 99) or 0, 3),
        "health_polls": st.health, "sighup_at_s": hup,
        "kv_pages_free": m.get("d2od:kv_pages_free"), "kv_pages_total": m.get("d2od:kv_pages_total"),
        "rss_mb": {k: (round(v, 1) if v else v) for k, v in rss.items()}, "rss_growth_after_warmup_mb":
            round(growth, 1) if growth is not None else None, "rss_bound_mb": args.rss_bound_mb,
        "server_request_errors_total": m.get("d2od:request_errors_total"),
        "preemptions": m.get("d2od:num_preemptions_total"), "kv_tokens_evicted": m.get("d2od:kv_tokens_evicted_total"),
        "daemon_exit": rc, "tsan_reports": len(tsan),
    }
    ok = (five == 0 and server5 == 0 and pages_ok and health_ok and rss_ok and not st.bad and st.sent > 0
          and not tsan and hup_ok and (rc in (None, 0)))
    if args.json:
        print(json.dumps(dict(figures, ok=ok)))
    else:
        for k, v in figures.items():
            print(f"  {k}: {v}")
    if st.bad:
        print("malformed answers (first 5):", st.bad[:5])
    if st.health_fail:
        print("/health failures:", st.health_fail[:10])
    if not hup_ok:
        print("the SIGHUP reload was not logged")
    for t in tsan[:2]:
        print(t[:3000])
    if tmp and ok:
        shutil.rmtree(tmp, ignore_errors=True)  # kept (and named) only when something failed
    elif log_path:
        print(f"daemon log: {log_path}")
    print(f"soak: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
