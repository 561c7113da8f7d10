#!/usr/bin/env python3
"""tests/integration/test_systemd_unit.py — checks systemd/d2od.service.

Usage: test_systemd_unit.py [path/to/d2od]   (run from the repo root)

1. `systemd-analyze verify` accepts the unit, with ExecStart pointed at an
   existing binary (the built d2od given as argv[1], else /bin/true): verify
   refuses a unit whose ExecStart binary is missing, and /usr/local/bin/d2od
   is not installed here. Warnings about the unit count as failures, because
   verify exits 0 on unknown keys and bad values.
2. A deliberately broken copy is reported (so check 1 can fail at all).
3. The settings the daemon relies on are present with the intended values,
   and TimeoutStopSec leaves room for drain_timeout_s of configs/d2od.conf.

Without systemd-analyze the verify checks are skipped. Prints one line per
check and a closing "N passed, N failed, N skipped" line.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

UNIT = "systemd/d2od.service"
CONF = "configs/d2od.conf"
results = {"passed": 0, "failed": 0, "skipped": 0}


def check(name, cond, detail=""):
    if cond:
        results["passed"] += 1
        print(f"ok   {name}")
    else:
        results["failed"] += 1
        print(f"FAIL {name} {detail}".rstrip())


def skip(name, why):
    results["skipped"] += 1
    print(f"skip {name}: {why}")


def parse_unit(text):
    """Returns {(section, key): [values...]} (keys may repeat)."""
    out, section = {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        m = re.match(r"^\[(.+)\]$", line)
        if m:
            section = m.group(1)
            continue
        key, _, val = line.partition("=")
        out.setdefault((section, key.strip()), []).append(val.strip())
    return out


def verify(path):
    """Runs systemd-analyze verify; returns (rc, lines about this unit, all output)."""
    p = subprocess.run(["systemd-analyze", "verify", path], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(path))
    out = (p.stdout + p.stderr).strip()
    name = os.path.basename(path)
    mine = [l for l in out.splitlines() if name in l]
    return p.returncode, mine, out


def with_exec(text, binary):
    return re.sub(r"^ExecStart=\S+", "ExecStart=" + binary, text, count=1, flags=re.M)


def main():
    text = open(UNIT).read()
    binary = sys.argv[1] if len(sys.argv) > 1 else ""
    binary = os.path.abspath(binary) if binary and os.access(binary, os.X_OK) else "/bin/true"

    # ---- 3. settings (no systemd needed) ---------------------------------
    u = parse_unit(text)

    def val(key, section="Service"):
        v = u.get((section, key))
        return v[-1] if v else None

    want = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/local/bin/d2od serve --config /etc/d2od/d2od.conf",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "2",
        "User": "d2od",
        "Group": "d2od",
        "DynamicUser": "no",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "no",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "no",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "LimitNOFILE": "65536",
    }
    for k, v in want.items():
        check(f"unit {k}={v}", val(k) == v, f"(found {val(k)!r})")
    check("unit WantedBy=multi-user.target", val("WantedBy", "Install") == "multi-user.target")

    drain = None
    for line in open(CONF):
        m = re.match(r"^#?\s*drain_timeout_s\s+(\S+)", line)
        if m:
            drain = float(m.group(1))
    stop = val("TimeoutStopSec")
    check("TimeoutStopSec exceeds drain_timeout_s",
          drain is not None and stop is not None and stop.isdigit() and int(stop) > drain,
          f"(TimeoutStopSec={stop}, drain_timeout_s={drain})")

    # ---- 1 and 2. systemd-analyze verify ---------------------------------
    if not shutil.which("systemd-analyze"):
        skip("systemd-analyze verify", "systemd-analyze not installed (apt-get install systemd)")
    else:
        with tempfile.TemporaryDirectory(prefix="d2od_unit_") as tmp:
            good = os.path.join(tmp, "d2od.service")
            with open(good, "w") as f:
                f.write(with_exec(text, binary))
            rc, mine, out = verify(good)
            check(f"systemd-analyze verify (ExecStart={binary})", rc == 0 and not mine,
                  f"(rc {rc}):\n{out}")

            bad = os.path.join(tmp, "d2od-broken.service")
            with open(bad, "w") as f:
                f.write(with_exec(text, binary).replace("Type=notify", "Type=notfy\nBogusKey=1", 1))
            rc, mine, out = verify(bad)
            check("systemd-analyze verify reports a broken copy",
                  any("notfy" in l for l in mine) and any("BogusKey" in l for l in mine),
                  f"(rc {rc}):\n{out}")

    print(f"{results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
