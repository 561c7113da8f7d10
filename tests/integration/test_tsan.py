#!/usr/bin/env python3
"""tests/integration/test_tsan.py — the daemon built with ThreadSanitizer
(build/tsan/d2od, made by `make test`) under the API's request-level checks
(test_robust.py --quick: parameters, chat content, routes, echo/stop, byte
tokens, logprob offsets, half-close, HTTP framing) and a 25 s light soak
(short prompts and outputs) with 16 clients, cancels, slow readers and a SIGHUP (loadtest/soak.py --tsan). Any
ThreadSanitizer report fails it. Skips when the TSan build is absent.

Usage: test_tsan.py path/to/build/d2od   (the TSan binary is looked up beside it, in tsan/)
Prints a closing "tsan: N passed, N failed, N skipped" line.
"""
import os
import subprocess
import sys
import tempfile
import time

T0 = time.time()
res = {"passed": 0, "failed": 0, "skipped": 0}


def check(name, cond, detail=""):
    res["passed" if cond else "failed"] += 1
    print(f"{'ok  ' if cond else 'FAIL'} {name}" + ("" if cond else f" {str(detail)[-3000:]}"), flush=True)


def main():
    base = sys.argv[1] if len(sys.argv) > 1 else "build/d2od"
    tsan = os.path.join(os.path.dirname(base), "tsan", "d2od")
    if not os.path.exists(tsan):
        res["skipped"] += 1
        print(f"skip tsan: {tsan} not built (make test builds it)")
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        with tempfile.TemporaryDirectory(prefix="d2od-tsan-") as tmp:
            env = dict(os.environ, TSAN_OPTIONS=f"halt_on_error=0 exitcode=66 log_path={tmp}/tsan")
            r = subprocess.run([sys.executable, os.path.join(here, "test_robust.py"), tsan, "--quick"],
                               capture_output=True, env=env, timeout=400)
            out = r.stdout.decode("utf-8", "replace")
            check("request-level API checks against the TSan daemon", r.returncode == 0, out[-2000:])
            r = subprocess.run([sys.executable, "loadtest/soak.py", "--binary", tsan, "--tsan", "--light",
                                "--duration", "25", "-c", "16", "--rss-bound-mb", "256"], capture_output=True, env=env, timeout=400)
            out = r.stdout.decode("utf-8", "replace")
            print("\n".join("     " + ln for ln in out.splitlines() if ln.startswith("  ")))
            check("soak against the TSan daemon (16 clients, 25 s, SIGHUP)", r.returncode == 0, out[-3000:])
            reports = []
            for name in os.listdir(tmp):
                if name.startswith("tsan"):
                    with open(os.path.join(tmp, name), errors="replace") as f:
                        reports.append(f.read())
            check(f"no ThreadSanitizer report ({len(reports)})", not reports, "\n".join(reports)[:4000])
    print(f"tsan: {res['passed']} passed, {res['failed']} failed, {res['skipped']} skipped ({time.time() - T0:.1f} s)")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
