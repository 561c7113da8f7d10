#!/usr/bin/env python3
"""loadtest/batch_vs_http.py — the same N requests through `d2od batch` and
through the HTTP API of `d2od serve` (C concurrent keep-alive clients), with
the same engine settings; prints one JSON object with both throughputs.

    python3 loadtest/batch_vs_http.py build/d2od [--n 1000] [--max-tokens 32] [--clients 64] [--rounds 2]

Requests are /v1/completions with seeded sampling and ignore_eos, so every
request produces exactly --max-tokens tokens in both runs. Each round runs
batch then HTTP; the figures are the medians over rounds. Wall time includes
model loading for batch (a few ms for the shipped model) and excludes the
daemon's start for HTTP. Loopback only, bounded: N requests, then it stops.
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

MODEL = "models/stories260K/stories260K.gguf"
PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The little dog", "One day, a big bird",
           "Sam had a red ball", "The sun was shining", "Mia wanted a cake", "There was a tiny frog"]


def bodies(n, max_tokens):
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8, "seed": i,
             "ignore_eos": True} for i in range(n)]


def run_batch(d2od, engine_args, reqs, tmp):
    inp, out = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
    with open(inp, "w") as f:
        for i, b in enumerate(reqs):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": b}) + "\n")
    if os.path.exists(out):
        os.unlink(out)
    t0 = time.time()
    r = subprocess.run([d2od, "batch", "--model", MODEL, *engine_args, "--input", inp, "--output", out,
                        "--no-progress"], capture_output=True, timeout=3600)
    dt = time.time() - t0
    res = [json.loads(line) for line in open(out)]
    ok = sum(1 for x in res if x["response"] and x["response"]["status_code"] == 200)
    toks = sum(x["response"]["body"]["usage"]["completion_tokens"] for x in res if x["response"]
               and x["response"]["status_code"] == 200)
    ids = {x["custom_id"] for x in res}
    assert r.returncode == 0 and ok == len(reqs) and len(ids) == len(reqs), (r.returncode, ok, r.stderr[-500:])
    return dt, toks


def run_http(d2od, engine_args, reqs, clients):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([d2od, "serve", "--model", MODEL, *engine_args, "--port", str(port), "--log-requests", "false",
                          "--max-queue", str(len(reqs) + 16)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(400):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        nxt = [0]
        lock = threading.Lock()
        toks = [0]
        errors = []

        def worker():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= len(reqs):
                    break
                c.request("POST", "/v1/completions", json.dumps(reqs[i]), {"Content-Type": "application/json"})
                resp = c.getresponse()
                body = json.loads(resp.read())
                if resp.status != 200:
                    errors.append(resp.status)
                    continue
                with lock:
                    toks[0] += body["usage"]["completion_tokens"]
            c.close()

        t0 = time.time()
        th = [threading.Thread(target=worker) for _ in range(clients)]
        for t in th:
            t.start()
        for t in th:
            t.join()
        dt = time.time() - t0
        assert not errors, errors[:5]
        return dt, toks[0]
    finally:
        p.terminate()
        p.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("d2od")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    engine_args = ["--threads", str(a.threads), "--max-seqs", "64", "--ctx-len", "512"]
    reqs = bodies(a.n, a.max_tokens)
    tmp = tempfile.mkdtemp(prefix="d2od-bvh-")
    b_runs, h_runs = [], []
    for _ in range(a.rounds):
        b_runs.append(run_batch(a.d2od, engine_args, reqs, tmp))
        h_runs.append(run_http(a.d2od, engine_args, reqs, a.clients))
    bt = statistics.median(dt for dt, _ in b_runs)
    ht = statistics.median(dt for dt, _ in h_runs)
    out = {"requests": a.n, "max_tokens": a.max_tokens, "clients": a.clients, "rounds": a.rounds,
           "batch_s": [round(dt, 2) for dt, _ in b_runs], "http_s": [round(dt, 2) for dt, _ in h_runs],
           "batch_req_per_s": round(a.n / bt, 1), "http_req_per_s": round(a.n / ht, 1),
           "batch_tok_per_s": round(b_runs[0][1] / bt), "http_tok_per_s": round(h_runs[0][1] / ht),
           "batch_over_http": round(ht / bt, 2), "load_avg": os.getloadavg()[0]}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
