#!/usr/bin/env python3
"""tests/integration/test_hotpath.py — the engine thread neither allocates nor
formats per token (issue 10/14: JSON escaping, logprob JSON, the metrics lock
and SSE buffer growth used to run there for every token).

The daemon runs with an LD_PRELOAD shim (hotpath_shim.c, built here with cc)
that counts heap allocations and vsnprintf calls on the thread named
"d2od-engine". The same mix of requests (streamed and not, chat, n=2,
logprobs, a stop string) is served twice, with 2 and with 400 tokens each;
the counts may differ by a small constant (per-request work such as a log
line when a client leaves first), never by anything that grows with tokens.

Usage: test_hotpath.py path/to/d2od.  Prints a closing "hotpath: N passed, N failed, N skipped" line.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_api as T  # noqa: E402

T0 = time.time()


def run(shim, tmp, n_tok):
    env_keep = os.environ.get("LD_PRELOAD")
    os.environ["LD_PRELOAD"] = shim
    try:
        d = T.Daemon(f"hot{n_tok}", [], tmp)
    finally:
        if env_keep is None:
            os.environ.pop("LD_PRELOAD")
        else:
            os.environ["LD_PRELOAD"] = env_keep
    names = []
    for t in os.listdir(f"/proc/{d.proc.pid}/task"):
        try:
            with open(f"/proc/{d.proc.pid}/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass
    T.check("the engine thread is named d2od-engine (what the shim watches)", "d2od-engine" in names, names)
    base = {"max_tokens": n_tok, "ignore_eos": True, "temperature": 0}
    toks = 0
    for body, path in (
            (dict(base, prompt="Once upon a time", stream=True), "/v1/completions"),
            (dict(base, prompt="Once upon a time", logprobs=5, stop=["zzzz"]), "/v1/completions"),
            (dict(base, prompt="Lily and Tom", n=2, stream=True, logprobs=2), "/v1/completions"),
            (dict(base, messages=[{"role": "user", "content": "Hi"}], stream=True, logprobs=True, top_logprobs=3),
             "/v1/chat/completions"),
            (dict(base, messages=[{"role": "user", "content": "Hi"}]), "/v1/chat/completions")):
        if body.get("stream"):
            s = T.Stream(d, path, body).read_all()
            T.check(f"{n_tok} tokens: {path} stream ok", s.ok(), s.error)
        else:
            st, j = T.post(d, path, body)
            T.check(f"{n_tok} tokens: {path} ok", st == 200, (st, j))
            toks += j["usage"]["completion_tokens"] if st == 200 else 0
    time.sleep(0.5)
    d.stop()
    m = re.search(r"hotpath: engine-thread allocations (\d+) formats (\d+)", d.log_text())
    return (int(m.group(1)), int(m.group(2))) if m else None


def main():
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        T.skip("hotpath", "no C compiler")
    else:
        with tempfile.TemporaryDirectory(prefix="d2od-hot-") as tmp:
            shim = os.path.join(tmp, "shim.so")
            src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hotpath_shim.c")
            r = subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", shim, src, "-ldl"], capture_output=True)
            if not T.check("the shim builds", r.returncode == 0, r.stderr.decode()[-500:]):
                return 1
            short = run(shim, tmp, 2)
            long_ = run(shim, tmp, 400)
            T.check("the shim reports", short is not None and long_ is not None, (short, long_))
            if short and long_:
                da, df = long_[0] - short[0], long_[1] - short[1]
                print(f"     (engine thread, 2 tokens: {short[0]} allocations, {short[1]} formats; "
                      f"400 tokens (2400 in all): {long_[0]} allocations, {long_[1]} formats)")
                T.check("no allocation per token on the engine thread", da <= 8, (short, long_))
                T.check("no printf formatting per token on the engine thread", df <= 4, (short, long_))
    r = T.results
    print(f"hotpath: {r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped ({time.time() - T0:.1f} s)")
    return 1 if r["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
