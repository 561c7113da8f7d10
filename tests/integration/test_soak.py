#!/usr/bin/env python3
"""tests/integration/test_soak.py — loadtest/soak.py for about a minute as part
of `make test`: 32 clients, 45 s of mixed load (streaming and not, every KV
method, random max_tokens, ~20 % cancels and disconnects, slow readers, a
SIGHUP in the middle), then the drain. Passes when the soak's assertions hold:
no 5xx, /health 200 at every poll, every KV page back, RSS growth after the
warm-up within 64 MB. Longer runs: python3 loadtest/soak.py --binary build/d2od
--duration 600 -c 64.

Usage: test_soak.py path/to/d2od.  Prints a closing "soak: N passed, N failed" line.
"""
import subprocess
import sys
import time

T0 = time.time()
binary = sys.argv[1] if len(sys.argv) > 1 else "build/d2od"
r = subprocess.run([sys.executable, "loadtest/soak.py", "--binary", binary, "--duration", "45", "-c", "32"],
                   capture_output=True, timeout=400)
out = r.stdout.decode("utf-8", "replace")
print(out.rstrip())
ok = r.returncode == 0
print(f"{'ok  ' if ok else 'FAIL'} soak: 32 clients, 45 s" + ("" if ok else " " + r.stderr.decode()[-2000:]))
print(f"soak: {int(ok)} passed, {int(not ok)} failed, 0 skipped ({time.time() - T0:.1f} s)")
sys.exit(0 if ok else 1)
