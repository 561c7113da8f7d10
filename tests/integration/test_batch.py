#!/usr/bin/env python3
"""tests/integration/test_batch.py — `d2od batch` (api/batch.c) on the shipped
stories260K model.

Checks: every custom_id of the input gets exactly one result line in OpenAI's
batch output shape; greedy results equal what the HTTP API answers for the same
body (same engine, same parsing); per-request kv_compression is honoured
(d2o with a small budget gives the HTTP API's d2o text and differs from the full
cache); bad lines get errors (bad JSON, duplicate custom_id, wrong method, bad
url, a body the API refuses -> status_code 400); a rerun over a partial output
(with a torn last line) skips what is there, cuts the torn line and completes
the file; a progress bar is drawn on a terminal.

Usage: test_batch.py path/to/d2od   (repo root)
"""
import json
import os
import pty
import select
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

D2OD = sys.argv[1] if len(sys.argv) > 1 else "build/d2od"
MODEL = "models/stories260K/stories260K.gguf"
ARGS = ["--model", MODEL, "--served-model-name", "stories260K", "--ctx-len", "512", "--threads", "1"]
results = {"passed": 0, "failed": 0}


def check(name, cond, detail=""):
    if cond:
        results["passed"] += 1
        print(f"ok   {name}")
    else:
        results["failed"] += 1
        print(f"FAIL {name} {detail}")


LONG = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " * 3


def requests():
    out = []
    for i in range(48):
        if i % 3 == 0:
            url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"Story {i}"}],
                                                 "max_tokens": 24, "temperature": 0}
        elif i % 3 == 1:
            url, body = "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 20 + i % 7, "temperature": 0.9,
                                            "seed": i}
        else:
            url, body = "/v1/completions", {"prompt": "The little dog", "max_tokens": 16, "temperature": 0,
                                            "stop": ["."]}
        out.append({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})
    out.append({"custom_id": "full", "method": "POST", "url": "/v1/completions",
                "body": {"prompt": LONG, "max_tokens": 200, "temperature": 0}})
    out.append({"custom_id": "d2o", "method": "POST", "url": "/v1/completions",
                "body": {"prompt": LONG, "max_tokens": 200, "temperature": 0,
                         "kv_compression": {"method": "d2o", "budget": 0.1}}})
    out.append({"custom_id": "n2", "method": "POST", "url": "/v1/completions",
                "body": {"prompt": "Once", "max_tokens": 8, "n": 2, "temperature": 1, "seed": 5}})
    out.append({"custom_id": "bad-temp", "method": "POST", "url": "/v1/completions",
                "body": {"prompt": "x", "temperature": -1}})
    out.append({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}})
    out.append({"custom_id": "bad-method", "method": "GET", "url": "/v1/completions", "body": {}})
    out.append({"custom_id": "req-0", "method": "POST", "url": "/v1/completions", "body": {"prompt": "dup"}})
    return out


def write_jsonl(path, rows, extra=""):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(extra)


def read_results(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_batch(inp, out, tty=False, extra=()):
    cmd = [D2OD, "batch", *ARGS, "--input", inp, "--output", out, *extra]
    if not tty:
        r = subprocess.run(cmd, capture_output=True, timeout=300)
        return r.returncode, r.stderr.decode("utf-8", "replace")
    master, slave = pty.openpty()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    err = b""
    deadline = time.time() + 300
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
        elif p.poll() is not None:
            break
    p.wait(timeout=30)
    os.close(master)
    return p.returncode, err.decode("utf-8", "replace")


def http_post(port, url, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{url}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def main():
    tmp = tempfile.mkdtemp(prefix="d2od-batch-")
    rows = requests()
    inp = os.path.join(tmp, "in.jsonl")
    write_jsonl(inp, rows, extra="this is not json\n\n")
    out = os.path.join(tmp, "out.jsonl")
    rc, err = run_batch(inp, out, tty=True)
    res = read_results(out)
    check("batch exits 3 when some requests failed", rc == 3, f"rc={rc} {err[-400:]}")
    check("progress bar on a terminal", "\rbatch [" in err and "req/s" in err, repr(err[-300:]))
    by = {}
    for r in res:
        by.setdefault(r["custom_id"], []).append(r)
    ids = [r["custom_id"] for r in rows[:-1]]  # the last row duplicates req-0
    check("every custom_id has a result", all(i in by for i in ids), str([i for i in ids if i not in by]))
    check("one result per custom_id, plus the duplicate and the bad line",
          len(res) == len(rows) + 1 and len(by["req-0"]) == 2 and None in by, f"{len(res)} lines")
    ok = [r for r in res if r["response"] and r["response"]["status_code"] == 200]
    shape = all(set(r) == {"id", "custom_id", "response", "error"} and r["error"] is None
                and r["response"]["body"]["object"] in ("text_completion", "chat.completion")
                and r["response"]["body"]["usage"]["completion_tokens"] > 0 for r in ok)
    check("200 results have OpenAI's batch output shape", len(ok) == 51 and shape, f"{len(ok)} ok")
    check("n=2 gives two choices", len(by["n2"][0]["response"]["body"]["choices"]) == 2)
    bt = by["bad-temp"][0]["response"]
    check("a body the API refuses: status_code 400 with the API's error",
          bt["status_code"] == 400 and bt["body"]["error"]["param"] == "temperature", json.dumps(bt))
    check("bad url: 404", by["bad-url"][0]["response"]["status_code"] == 404)
    check("bad method: error object", by["bad-method"][0]["response"] is None
          and by["bad-method"][0]["error"]["code"] == "invalid_method")
    dup = [r for r in by["req-0"] if r["error"]]
    check("duplicate custom_id: error", len(dup) == 1 and dup[0]["error"]["code"] == "duplicate_custom_id")
    check("bad JSON line: error naming the line", by[None][0]["error"]["code"] == "invalid_json"
          and f"line {len(rows) + 1}:" in by[None][0]["error"]["message"], json.dumps(by[None]))

    def text(cid):
        b = [r for r in by[cid] if r["response"]][0]["response"]["body"]["choices"][0]
        return b["message"]["content"] if "message" in b else b["text"]

    check("stop string honoured", all("." not in text(f"req-{i}") for i in range(2, 48, 3))
          and any(r["response"]["body"]["choices"][0]["finish_reason"] == "stop" for r in by["req-2"]))
    check("kv_compression honoured: d2o text differs from the full cache", text("d2o") != text("full"),
          text("d2o")[:80])

    # the same bodies through the HTTP API give the same greedy text
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.Popen([D2OD, "serve", *ARGS, "--port", str(port), "--log-requests", "false"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.05)
        same = []
        for row in rows[:-1]:
            if row["custom_id"] in ("full", "d2o", "req-0", "req-2", "req-3"):
                h = http_post(port, row["url"], row["body"])
                c = h["choices"][0]
                t = c["message"]["content"] if "message" in c else c["text"]
                same.append((row["custom_id"], t == text(row["custom_id"])))
        check("greedy results equal the HTTP API's (chat, completions, stop, full and d2o)",
              all(ok for _, ok in same), str(same))
    finally:
        p.terminate()
        p.wait(timeout=30)

    # resume: keep the first 10 results and half of the 11th line, run again
    with open(out) as f:
        lines = f.readlines()
    part = os.path.join(tmp, "part.jsonl")
    with open(part, "w") as f:
        f.writelines(lines[:10])
        f.write(lines[10][: len(lines[10]) // 2])
    done_before = {json.loads(line)["custom_id"] for line in lines[:10]}
    rc, err = run_batch(inp, part)
    res2 = read_results(part)
    cids = [r["custom_id"] for r in res2 if r["custom_id"] is not None]
    skipped = sum(1 for r in rows if r["custom_id"] in done_before)  # the duplicate line too
    counts = {c: cids.count(c) for c in set(cids)}
    check("resume: torn last line cut, every custom_id once (the duplicate's error aside)",
          set(cids) == set(ids) and all(n == 1 for c, n in counts.items() if c != "req-0") and counts["req-0"] <= 2,
          f"{len(cids)} {counts} {err[-300:]}")
    check("resume: input lines already answered were skipped", f"{skipped} skipped" in err and "cutting" in err,
          f"want {skipped}: {err[-400:]}")
    check("resume: earlier results kept as they were", [json.loads(x) for x in lines[:10]] == res2[:10])
    print(f"batch: {results['passed']} passed, {results['failed']} failed")
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
