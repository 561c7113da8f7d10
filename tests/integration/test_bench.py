#!/usr/bin/env python3
"""tests/integration/test_bench.py — `d2od bench` on stories260K, short and
bounded: the decode section runs the batch sizes over --reps interleaved rounds
and reports each size's median and range and the per-round ratio to batch 1;
the KV-compression section runs --kv-reps rounds and reports the median and
range of the per-round shares beside the best-times share, and the prompt
compression's own time from the scheduler's counter. Checks the JSON
lines' keys and their consistency (min <= median <= max), not speeds.

Usage: test_bench.py path/to/d2od   (run from the repo root; D2_SHARED locates ../shared)
Prints one line per check and a closing "N passed, N failed" line.
"""
import json
import os
import subprocess
import sys

D2OD = sys.argv[1] if len(sys.argv) > 1 else "build/d2od"
SHARED = os.environ.get("D2_SHARED", "../shared")
GGUF = os.path.join(SHARED, "assets/models/stories260K/stories260K.gguf")
results = {"passed": 0, "failed": 0, "skipped": 0}


def check(name, cond, detail=""):
    if cond:
        results["passed"] += 1
        print(f"ok   {name}")
    else:
        results["failed"] += 1
        print(f"FAIL {name} {detail}")


def main():
    if not os.path.exists(GGUF):
        print(f"skip: {GGUF} missing")
        results["skipped"] += 1
        return 0
    r = subprocess.run([D2OD, "bench", "--model", GGUF, "--threads", "1", "--batches", "2,1", "--prompt", "4",
                        "--gen", "8", "--reps", "3", "--kv-prompt", "48", "--kv-gen", "4", "--kv-reps", "2", "--stall-prompt", "0"],
                       capture_output=True, timeout=300)
    out = r.stdout.decode()
    check("bench exits 0", r.returncode == 0, out[-400:] + r.stderr.decode()[-400:])
    js = {}
    for line in out.splitlines():
        if line.startswith("{"):
            j = json.loads(line)
            js[j.get("bench")] = j
    d, kv = js.get("cpu_decode"), js.get("kv_compression")
    check("decode and KV JSON lines", d is not None and kv is not None, out[-400:])
    if not d or not kv:
        return 1
    check("decode: --reps recorded", d.get("reps") == 3)
    b = {x["batch"]: x for x in d["batches"]}
    check("decode: both sizes, listed order kept", [x["batch"] for x in d["batches"]] == [2, 1])
    check("decode: min <= median <= max", all(x["tps_min"] <= x["tps"] <= x["tps_max"] and x["tps_min"] > 0
                                               and x["x_min"] <= x["x_batch1"] <= x["x_max"] for x in d["batches"]),
          d["batches"])
    check("decode: the reference is batch 1 even when listed second",
          b[1]["x_batch1"] == 1.0 and b[1]["x_min"] == 1.0 and b[2]["x_batch1"] > 0, b)
    check("decode: roofline fraction from the batch-1 median",
          abs(d["batch1_roofline_frac"] - b[1]["tps"] / d["roofline_tps"]) < 1e-3, d)
    check("decode: the table says rounds and ranges", "interleaved rounds" in out and "[" in out)
    check("kv: --kv-reps recorded", kv.get("reps") == 2)
    check("kv: share medians within their ranges",
          kv["prefill_overhead_min"] <= kv["prefill_overhead_median"] <= kv["prefill_overhead_max"]
          and kv["step_overhead_min"] <= kv["step_overhead_median"] <= kv["step_overhead_max"], kv)
    check("kv: best-times share = (best kv - best full) / best full",
          abs(kv["prefill_overhead_frac"] - (kv["prefill_kv_s"] - kv["prefill_full_s"]) / kv["prefill_full_s"])
          < 1e-3 + 2e-6 / kv["prefill_full_s"] * (1 + abs(kv["prefill_overhead_frac"])),  # times printed to 1 us
          kv)
    check("kv: the prompt compression timed by the scheduler, > 0, min <= median <= max",
          "compress_s" in kv and 0 < kv["compress_min_s"] <= kv["compress_s"] <= kv["compress_max_s"]
          and kv["compress_frac_min"] <= kv["compress_frac_median"] <= kv["compress_frac_max"], kv)
    check("kv: the timed compression is part of the compressed prefill", kv.get("compress_min_s", 1) < kv["prefill_kv_s"]
          or kv.get("compress_min_s", 1) <= 0, kv)
    r = subprocess.run([D2OD, "bench", "--model", GGUF, "--reps", "0"], capture_output=True, timeout=60)
    check("bench --reps 0 is refused (exit 2)", r.returncode == 2, r.stderr.decode()[-200:])
    return 0


if __name__ == "__main__":
    rc = main()
    print(f"bench: {results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped")
    sys.exit(1 if results["failed"] else rc)
