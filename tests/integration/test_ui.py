#!/usr/bin/env python3
"""tests/integration/test_ui.py — the built-in web page end to end in headless
Chromium: starts `d2od serve` (with an API key) on a free loopback port and
runs tests/js/ui_playwright.mjs against it (Debian's /usr/bin/chromium driven
by npm playwright-core; both installed by `tools/install-deps.sh --test`).
Also checks the routes without a browser: GET / is HTML with no external
reference, GET /status needs the key and answers the documented JSON.
The screenshot lands in build/test-output/ui.png.

Usage: test_ui.py path/to/d2od   (repo root)
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

D2OD = sys.argv[1] if len(sys.argv) > 1 else "build/d2od"
MODEL = "models/stories260K/stories260K.gguf"
KEY = "ui-test-key"
OUT = os.path.abspath("build/test-output")
results = {"passed": 0, "failed": 0, "skipped": 0}


def check(name, cond, detail=""):
    if cond:
        results["passed"] += 1
        print(f"ok   {name}")
    else:
        results["failed"] += 1
        print(f"FAIL {name} {detail}")


def get(url, key=None):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def main():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    base = f"http://127.0.0.1:{port}"
    os.makedirs(OUT, exist_ok=True)
    log = open(os.path.join(OUT, "ui-server.log"), "wb")
    p = subprocess.Popen([D2OD, "serve", "--model", MODEL, "--served-model-name", "stories260K", "--ctx-len", "512",
                          "--port", str(port), "--api-key", KEY, "--threads", "1", "--log-requests", "false"],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                if get(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        st, ctype, body = get(base + "/")
        html = body.decode("utf-8", "replace")
        check("GET / is HTML without the key", st == 200 and ctype.startswith("text/html") and "<title>d2od</title>" in html)
        ext = re.findall(r'(?:src|href)\s*=\s*"(?:https?:)?//[^"]*"', html) + re.findall(r"@import|https?://", html)
        check("the page loads nothing from outside", not ext, str(ext[:5]))
        st, _, body = get(base + "/status")
        check("GET /status without the key: 401", st == 401, str(st))
        st, _, body = get(base + "/status", KEY)
        j = json.loads(body) if st == 200 else {}
        check("GET /status with the key: pool, sched, seqs, events",
              st == 200 and j.get("pool", {}).get("pages_total", 0) > 0 and j.get("n_layers") == 5
              and isinstance(j.get("seqs"), list) and isinstance(j.get("events"), list), body[:300])

        node = shutil.which("node")
        chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
        if not node or not os.path.exists(chromium) or not os.path.isdir("tests/js/node_modules/playwright-core"):
            results["skipped"] += 1
            print(f"skip browser test: needs node, {chromium} and tests/js/node_modules/playwright-core "
                  "(tools/install-deps.sh --test installs them)")
        else:
            r = subprocess.run([node, "tests/js/ui_playwright.mjs", base, KEY, OUT], capture_output=True, timeout=300)
            out = r.stdout.decode("utf-8", "replace")
            print(out, end="")
            if r.stderr:
                print(r.stderr.decode("utf-8", "replace")[-2000:])
            m = re.search(r"ui: (\d+) passed, (\d+) failed", out)
            if m:
                results["passed"] += int(m.group(1))
                results["failed"] += int(m.group(2))
            else:
                check("the browser test printed its summary", False, f"rc={r.returncode}")
            if r.returncode != 0 and (not m or int(m.group(2)) == 0):
                check("the browser test exited 0", False, f"rc={r.returncode}")
            check("screenshot written", os.path.getsize(os.path.join(OUT, "ui.png")) > 10000
                  if os.path.exists(os.path.join(OUT, "ui.png")) else False, OUT)
    finally:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
        log.close()
    print(f"ui: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped")
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
