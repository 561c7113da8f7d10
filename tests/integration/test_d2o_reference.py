#!/usr/bin/env python3
"""tests/integration/test_d2o_reference.py — d2od's D2O against an independent
PyTorch implementation (tools/d2o_reference.py) on stories260K's HF weights.

tools/d2o_probe (built beside d2od) reports what d2od decided on one token
sequence; the reference computes the same from the spec with eager attention.
Both follow eng_score_kv's protocol: prefill P ids, compress the prompt, then
one decode step per id with per-step eviction (`exact`).

Checks and their tolerances (fp32 on both sides, different summation orders):
  layer mode (d2od's layer-uniform design), merge rules code and normalised,
  default kept layers and none:
    per-layer statistic v_l        |d| <= 1e-4
    per-layer heavy/recent budget  equal
    tau after the prompt and at the end  |d| <= 1e-4
    kept positions after the prompt compression  equal
    kept positions at the end      Jaccard >= 0.95 per layer (equal in practice)
    perplexity over the decoded ids  relative |d| <= 1e-4
  d2od's granularity head against the reference's kvhead mode (the same
  per-head algorithm on KV heads), merge rule code with the default kept
  layers at 0.2 and normalised with none at 0.1:
    statistics, budgets, tau       as above
    kept positions of every KV head after the prompt compression  equal
    kept positions of every KV head at the end  Jaccard >= 0.95 (equal in practice)
    perplexity                     relative |d| <= 1e-4
    tokens evicted and merged      equal
  the official code's algorithm (reference mode head: per query head, KV
  expanded by repeat_kv) against d2od at both granularities: statistics and
  budgets equal; the kept sets' overlap is reported (layer: mean Jaccard of
  d2od's layer set with each query head's; head: of each KV head's set with
  the query heads of its group); perplexity relative |d| <= 3 % (the measured
  gaps on this sequence; they are printed).

Needs torch for /usr/bin/python3 (Debian's python3-torch, installed by
tools/install-deps.sh --test where allowed); skips cleanly without it.
Usage: test_d2o_reference.py path/to/d2od
"""
import json
import math
import os
import subprocess
import sys
import tempfile

D2OD = sys.argv[1] if len(sys.argv) > 1 else "build/d2od"
PROBE = os.path.join(os.path.dirname(D2OD) or ".", "tools", "d2o_probe")
SHARED = os.environ.get("D2_SHARED", "../shared")
HF = os.path.join(SHARED, "assets/models/stories260K/hf")
REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools", "d2o_reference.py")
TORCH_PY = os.environ.get("D2_TORCH_PYTHON", "/usr/bin/python3")
N_IDS, PREFILL = 320, 192
results = {"passed": 0, "failed": 0}


def check(name, cond, detail=""):
    if cond:
        results["passed"] += 1
        print(f"ok   {name} {detail}".rstrip())
    else:
        results["failed"] += 1
        print(f"FAIL {name} {detail}")


def skip(why):
    print(f"skip: {why}")
    print("d2o_reference: 0 passed, 0 failed, 1 skipped")
    return 0


def ppl(nll):
    return math.exp(sum(nll) / len(nll))


def jaccard(a, b):
    a, b = set(a), set(b)
    return len(a & b) / max(1, len(a | b))


def probe(ids, args, out):
    subprocess.run([PROBE, "--model", HF, "--ids", ids, "--prefill", str(PREFILL), "--exact",
                    "--out", out] + args, check=True, capture_output=True, timeout=120)
    return json.load(open(out))


def reference(ids, args, out):
    subprocess.run([TORCH_PY, REF, "--model", HF, "--ids", ids, "--prefill", str(PREFILL),
                    "--out", out] + args, check=True, capture_output=True, timeout=600)
    return json.load(open(out))


def compare_layer_mode(tag, d, r, per_head=False):
    L = d["n_layers"]
    check(f"{tag}: layer statistics within 1e-4",
          all(abs(d["layers"][l]["stat"] - r["layers"][l]["stat"]) <= 1e-4 for l in range(L)),
          str([(round(d["layers"][l]["stat"], 6), round(r["layers"][l]["stat"], 6)) for l in range(L)]))
    check(f"{tag}: budgets equal",
          all((d["layers"][l]["heavy"], d["layers"][l]["recent"]) ==
              (r["layers"][l]["heavy"], r["layers"][l]["recent"]) for l in range(L)),
          str([(d["layers"][l]["heavy"], d["layers"][l]["recent"]) for l in range(L)]))
    check(f"{tag}: tau within 1e-4",
          all(abs(d["layers"][l]["tau_prompt"] - r["layers"][l]["tau_prompt"]) <= 1e-4 and
              abs(d["layers"][l]["tau_end"] - r["layers"][l]["tau_end"]) <= 1e-4 for l in range(L)))
    check(f"{tag}: kept sets after the prompt compression equal",
          all(d["layers"][l]["kept_prompt"] == r["layers"][l]["kept_prompt"] for l in range(L)))
    if per_head:  # one list per KV head: the worst head of each layer
        jac = [min(jaccard(a, b) for a, b in zip(d["layers"][l]["kept_end"], r["layers"][l]["kept_end"]))
               if len(d["layers"][l]["kept_end"]) == len(r["layers"][l]["kept_end"]) else 0.0 for l in range(L)]
    else:
        jac = [jaccard(d["layers"][l]["kept_end"], r["layers"][l]["kept_end"]) for l in range(L)]
    check(f"{tag}: kept sets at the end overlap >= 0.95", min(jac) >= 0.95, str([round(j, 3) for j in jac]))
    pd, pr = ppl(d["nll"]), ppl(r["nll"])
    check(f"{tag}: perplexity within 1e-4 (relative)", len(d["nll"]) == len(r["nll"]) and abs(pd / pr - 1) <= 1e-4,
          f"d2od {pd:.6f} reference {pr:.6f}")
    check(f"{tag}: tokens were evicted and merged", d["evicted"] > 0 and d["merged"] > 0 and
          d["evicted"] == r["evicted"] and d["merged"] == r["merged"], f"{d['evicted']} / {d['merged']}")


def main():
    if not os.path.isdir(HF):
        return skip(f"{HF} not found")
    if not os.path.exists(PROBE):
        return skip(f"{PROBE} not built")
    try:
        subprocess.run([TORCH_PY, "-c", "import torch, numpy"], check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return skip(f"no torch for {TORCH_PY} (apt-get install python3-torch libopenblas0-pthread)")
    tmp = tempfile.mkdtemp(prefix="d2o_ref_")
    ids = os.path.join(tmp, "ids.json")
    subprocess.run([TORCH_PY, REF, "--model", HF, "--ids", ids, "--sample", str(N_IDS), "--seed", "1"],
                   check=True, capture_output=True, timeout=300)
    cases = [("code, keep 0,1,-1, budget 0.2", ["--budget", "0.2", "--merge-rule", "code"],
              ["--budget", "0.2", "--merge-rule", "code"]),
             ("normalised, keep none, budget 0.1", ["--budget", "0.1", "--merge-rule", "normalised",
                                                   "--keep-layers", "none"],
              ["--budget", "0.1", "--merge-rule", "normalised", "--keep-layers", "none"])]
    for i, (tag, dargs, rargs) in enumerate(cases):
        d = probe(ids, dargs, os.path.join(tmp, f"d{i}.json"))
        r = reference(ids, rargs + ["--mode", "layer"], os.path.join(tmp, f"r{i}.json"))
        compare_layer_mode(tag, d, r)
    # d2od's granularity head against the same algorithm in the reference
    dh = None
    for i, (tag, dargs, rargs) in enumerate(cases):
        d = probe(ids, dargs + ["--granularity", "head"], os.path.join(tmp, f"dh{i}.json"))
        r = reference(ids, rargs + ["--mode", "kvhead"], os.path.join(tmp, f"rh{i}.json"))
        compare_layer_mode(f"head, {tag}", d, r, per_head=True)
        dh = dh or d
    # the official per-head algorithm (per query head) against d2od at both granularities
    dl = probe(ids, ["--budget", "0.2", "--merge-rule", "code"], os.path.join(tmp, "dl.json"))
    h = reference(ids, ["--budget", "0.2", "--merge-rule", "code", "--mode", "head"], os.path.join(tmp, "h.json"))
    L = dl["n_layers"]
    gs = len(h["layers"][2]["kept_prompt"]) // len(dh["layers"][2]["kept_prompt"])
    for name, d in (("layer", dl), ("head", dh)):
        check(f"official per-head vs d2od {name}: statistics and budgets equal",
              all(abs(d["layers"][l]["stat"] - h["layers"][l]["stat"]) <= 1e-4 and
                  d["layers"][l]["heavy"] == h["layers"][l]["heavy"] for l in range(L)))
        jac = []
        for l in range(L):
            qheads = h["layers"][l]["kept_prompt"]
            if name == "layer":
                jac.append(sum(jaccard(d["layers"][l]["kept_prompt"], hs) for hs in qheads) / len(qheads))
            else:  # KV head g against the query heads g*gs .. g*gs+gs-1 of its group
                kv = d["layers"][l]["kept_prompt"]
                jac.append(sum(jaccard(kv[q // gs], qheads[q]) for q in range(len(qheads))) / len(qheads))
        print(f"info official per-head vs d2od {name}: mean Jaccard of the kept sets after the prompt "
              f"compression per layer {[round(j, 3) for j in jac]}")
        pd, ph = ppl(d["nll"]), ppl(h["nll"])
        check(f"official per-head vs d2od {name}: perplexity within 3 %", abs(pd / ph - 1) <= 0.03,
              f"d2od {pd:.4f} official {ph:.4f} ({100 * (pd / ph - 1):+.2f} %)")
    print(f"d2o_reference: {results['passed']} passed, {results['failed']} failed")
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
