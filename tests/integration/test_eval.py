#!/usr/bin/env python3
"""tests/integration/test_eval.py — drives `d2od eval` on stories260K with a
small configuration (short context, few prompts) and checks that the table,
the JSON and the plot (PNG and SVG, drawn with cairo) are produced and sane: the full cache agrees with itself
(1.0), perplexities are finite and plausible, compressed runs really evict,
the same seed gives the same figures, --text works, bad options are usage
errors. The PNG is decoded here with zlib (chunk CRCs, Adler-32, the five
row filters, size) and checked for every method's colour; the SVG is parsed. Then `d2od serve` with a
kv_method/kv_budget default: the "kv_compression" request field (200 and
evictions counted in /metrics; every invalid form a 400 naming the field).

Usage: test_eval.py path/to/d2od   (run from the repo root; D2_SHARED locates ../shared)
Prints one line per check and a closing "eval: N passed, N failed" line.
"""
import json
import math
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib

D2OD = sys.argv[1] if len(sys.argv) > 1 else "build/d2od"
SHARED = os.environ.get("D2_SHARED", "../shared")
S260 = os.path.join(SHARED, "assets/models/stories260K")
HF = os.path.join(S260, "hf")
results = {"passed": 0, "failed": 0}

METHODS = ["h2o", "streamingllm", "d2o", "d2o_nokeep"]
BUDGETS = [0.2, 0.5]
SMALL = ["--methods", "full," + ",".join(METHODS), "--budgets", ",".join(map(str, BUDGETS)),
         "--texts", "2", "--max-ctx", "192", "--agree-prompts", "2", "--agree-tokens", "16",
         "--passkey-trials", "1", "--passkey-lengths", "64,128", "--threads", "1", "--seed", "3"]


def check(name, cond, detail=""):
    if cond:
        results["passed"] += 1
        print(f"ok   {name}")
    else:
        results["failed"] += 1
        print(f"FAIL {name} {detail}")


def run(args, timeout=300):
    return subprocess.run([D2OD, "eval"] + args, capture_output=True, timeout=timeout)


def read_png(path):
    """Returns (width, height, rgb bytes) after checking every chunk's CRC; undoes
    the five PNG row filters (cairo writes through libpng, which picks them)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "signature"
    pos, idat, ihdr, names = 8, b"", None, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        typ = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(typ + body) & 0xffffffff == crc, f"CRC of {typ}"
        names.append(typ)
        if typ == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif typ == b"IDAT":
            idat += body
        pos += 12 + n
    assert names[0] == b"IHDR" and names[-1] == b"IEND", names
    w, h, depth, ctype, _, _, interlace = ihdr
    assert depth == 8 and ctype in (2, 6) and interlace == 0, ihdr
    bpp = 3 if ctype == 2 else 4
    stride = bpp * w
    raw = zlib.decompress(idat)  # checks the Adler-32 too
    assert len(raw) == h * (1 + stride), "size"
    prev, out = bytearray(stride), bytearray()
    for y in range(h):
        ft = raw[y * (1 + stride)]
        cur = bytearray(raw[y * (1 + stride) + 1:(y + 1) * (1 + stride)])
        assert ft <= 4, f"filter type {ft}"
        for i in range(stride):
            a = cur[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ft == 1:
                cur[i] = (cur[i] + a) & 255
            elif ft == 2:
                cur[i] = (cur[i] + b) & 255
            elif ft == 3:
                cur[i] = (cur[i] + (a + b) // 2) & 255
            elif ft == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        if bpp == 4:
            out += b"".join(bytes(cur[i:i + 3]) for i in range(0, stride, 4))
        else:
            out += cur
        prev = cur
    return w, h, bytes(out)


def free_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def http(port, method, path, body=None, timeout=60):
    data = json.dumps(body).encode() if body is not None else None
    rq = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(rq, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(port, name):
    _, text = http(port, "GET", "/metrics")
    m = re.search(r"^" + re.escape(name) + r"\{[^}]*\} (\d+)", text, re.M)
    return int(m.group(1)) if m else None


def test_http(tmp):
    """The per-request "kv_compression" field and the server default."""
    log = open(os.path.join(tmp, "serve.log"), "wb")
    port = None
    proc = None
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen([D2OD, "serve", "--model", HF, "--host", "127.0.0.1", "--port", str(port),
                                 "--threads", "1", "--kv-method", "h2o", "--kv-budget", "0.3"],
                                stdout=log, stderr=subprocess.STDOUT)
        end = time.time() + 30
        up = False
        while time.time() < end and proc.poll() is None:
            try:
                if http(port, "GET", "/health", timeout=2)[0] == 200:
                    up = True
                    break
            except OSError:
                time.sleep(0.05)
        if up:
            break
        proc.kill()
        proc.wait()
        proc = None
    check("serve starts with kv_method h2o, kv_budget 0.3", proc is not None,
          open(os.path.join(tmp, "serve.log"), "rb").read()[-800:])
    if proc is None:
        return
    try:
        prompt = ("Once upon a time, there was a little girl named Lily. She loved to play in the park "
                  "with her red ball. One day, she saw a big dog near the tree. ") * 3
        base = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
        ev0 = metric(port, "d2od:kv_tokens_evicted_total")
        check("metrics expose kv_tokens_evicted_total", ev0 is not None)
        st, b = http(port, "POST", "/v1/completions", dict(base, kv_compression={"method": "full"}))
        check("kv_compression full: 200", st == 200, b[:300])
        ev1 = metric(port, "d2od:kv_tokens_evicted_total")
        check("the full cache evicts nothing", ev1 == ev0, (ev0, ev1))
        st, b = http(port, "POST", "/v1/completions", base)
        ev2 = metric(port, "d2od:kv_tokens_evicted_total")
        check("no field: the server default (h2o) evicts", st == 200 and ev2 > ev1, (st, ev1, ev2, b[:200]))
        st, b = http(port, "POST", "/v1/completions",
                     dict(base, kv_compression={"method": "d2o", "budget": 0.25, "merge_rule": "code"}))
        ev3 = metric(port, "d2od:kv_tokens_evicted_total")
        check("kv_compression d2o 0.25: 200 and evicts", st == 200 and ev3 > ev2, (st, ev2, ev3, b[:200]))
        st, b = http(port, "POST", "/v1/chat/completions",
                     {"messages": [{"role": "user", "content": prompt}], "max_tokens": 4,
                      "kv_compression": {"method": "snapkv", "budget": 32}})
        check("chat with kv_compression snapkv 32 tokens: 200", st == 200, b[:300])
        check("pages freed by compression counted",
              (metric(port, "d2od:kv_pages_freed_by_compression_total") or 0) > 0)
        for bad in ({"method": "bogus"}, {"method": "d2o", "budget": 2.5}, {"method": "d2o", "budget": 0},
                    {"budget": 0.2}, "d2o", {"method": "d2o", "budgit": 0.2}, {"method": "h2o", "exact": "yes"}):
            for path, body in (("/v1/completions", dict(base, kv_compression=bad)),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                         "kv_compression": bad})):
                st, b = http(port, "POST", path, body)
                try:
                    param = json.loads(b)["error"]["param"]
                except (ValueError, KeyError, TypeError):
                    param = None
                check(f"400 naming kv_compression: {path} {json.dumps(bad)}",
                      st == 400 and param == "kv_compression", (st, b[:200]))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    if not os.path.isdir(HF):
        print(f"skip: {HF} not found")
        print("eval: 0 passed, 0 failed, 1 skipped")
        return 0
    tmp = tempfile.mkdtemp(prefix="d2od_eval_")
    js, png, svg = os.path.join(tmp, "e.json"), os.path.join(tmp, "e.png"), os.path.join(tmp, "e.svg")
    r = run(["--model", HF, "--json", js, "--out-png", png, "--out-svg", svg] + SMALL)
    out = r.stdout.decode("utf-8", "replace")
    check("eval exits 0", r.returncode == 0, r.stderr.decode()[-800:])
    if r.returncode != 0:
        print(f"eval: {results['passed']} passed, {results['failed']} failed")
        return 1
    check("table header", "method" in out and "agree_prefix" in out and "passkey" in out, out[:400])
    main_table = out.split("at equal memory")[0]
    rows = [ln.split() for ln in main_table.splitlines() if ln.split() and ln.split()[0] in ["full"] + METHODS]
    check("table has full + every method x budget", len(rows) == 1 + len(METHODS) * len(BUDGETS), out)

    doc = json.load(open(js))
    res = doc["results"]
    check("json has every configuration", len(res) == 1 + len(METHODS) * len(BUDGETS), len(res))
    full = [x for x in res if x["method"] == "full"]
    check("one full-cache row", len(full) == 1)
    f = full[0]
    check("full cache agrees with itself", f["agree_prefix"] == 1.0 and f["agree_all"] == 1.0, f)
    check("full cache evicts nothing", f["kv_tokens_evicted"] == 0 and f["kv_tokens_merged"] == 0, f)
    ok = all(x["ppl"] is not None and math.isfinite(x["ppl"]) and 1.0 < x["ppl"] < 512 for x in res)
    check("every perplexity finite and within (1, vocab)", ok, [x["ppl"] for x in res])
    check("every configuration scored the same predictions",
          len({x["predictions"] for x in res}) == 1 and f["predictions"] > 0, [x["predictions"] for x in res])
    ok = all(0.0 <= x["agree_prefix"] <= x["agree_all"] + 1e-9 <= 1.0 + 1e-9 for x in res)
    check("agreement in [0, 1], prefix <= overall", ok, [(x["agree_prefix"], x["agree_all"]) for x in res])
    ok = all(x["passkey"] is None or 0.0 <= x["passkey"] <= 1.0 for x in res)
    check("passkey in [0, 1]", ok)
    check("passkey cases recorded", len(doc["passkey_cases"]) == 2 and
          all(c["prompt_tokens"] <= c["length"] for c in doc["passkey_cases"]), doc["passkey_cases"])
    comp = [x for x in res if x["method"] != "full"]
    check("compressed runs evict tokens", all(x["kv_tokens_evicted"] > 0 for x in comp),
          [(x["method"], x["budget"], x["kv_tokens_evicted"]) for x in comp])
    low = [x for x in comp if x["budget"] == min(BUDGETS)]
    check("some method departs from the full cache at the lowest budget",
          any(x["ppl"] != f["ppl"] or x["agree_all"] < 1.0 for x in low),
          [(x["method"], x["ppl"], x["agree_all"]) for x in low])

    # memory: every row says how much KV it held; D2O's default keeps layers 0, 1
    # and L-1 whole, so at an equal nominal budget it holds far more than H2O
    ok = all(isinstance(x.get(k), (int, float)) and x[k] > 0 for x in res
             for k in ("kv_tokens_mean", "kv_tokens_peak", "kv_bytes_mean"))
    check("every row has kv_tokens_mean/peak and kv_bytes_mean", ok,
          [(x["method"], x.get("kv_tokens_mean"), x.get("kv_tokens_peak")) for x in res])
    check("peak >= mean", all(x["kv_tokens_peak"] >= x["kv_tokens_mean"] - 1e-9 for x in res))
    check("the full cache is the memory reference", abs(f["kv_mem_frac"] - 1.0) < 1e-9, f.get("kv_mem_frac"))
    by = {(x["method"], x["budget"]): x for x in res}
    b = min(BUDGETS)
    d, h, dn = by[("d2o", b)], by[("h2o", b)], by[("d2o_nokeep", b)]
    check("d2o with its kept layers holds > 1.5x h2o's KV at the same budget",
          d["kv_tokens_mean"] > 1.5 * h["kv_tokens_mean"], (d["kv_tokens_mean"], h["kv_tokens_mean"]))
    check("d2o_nokeep holds about h2o's KV", 0.6 < dn["kv_tokens_mean"] / h["kv_tokens_mean"] < 1.6,
          (dn["kv_tokens_mean"], h["kv_tokens_mean"]))
    L = len(d["layers"])
    check("per-layer decisions in every row", L == 5 and all(len(x["layers"]) == L for x in res), L)
    dl = d["layers"]
    check("d2o keeps 0, 1, L-1 and compresses the others with a statistic in [0, 1]",
          all(dl[l]["budget"] == -1 for l in (0, 1, L - 1)) and
          all(dl[l]["budget"] > 0 and 0.0 <= dl[l]["stat"] <= 1.0 and dl[l]["merged"] > 0 and
              dl[l]["tau"] is not None for l in range(2, L - 1)), dl)
    check("d2o_nokeep compresses every layer", all(y["budget"] > 0 for y in dn["layers"]), dn["layers"])
    check("equal-memory table", "at equal memory" in out and len(doc.get("equal_memory", [])) >= 1,
          doc.get("equal_memory"))

    try:
        w, h, pix = read_png(png)
        colours = {pix[i:i + 3] for i in range(0, len(pix), 3 * 7)}
        check("png decodes (CRC, Adler-32, filters, size)", w >= 600 and h >= 200, (w, h))
        check("png has axes and coloured lines", len(colours) >= 5, len(colours))
        # each method's colour is drawn (lines and legend): h2o, streamingllm, d2o
        want = [(31, 119, 180), (44, 160, 44), (255, 127, 13)]
        seen = {pix[i:i + 3] for i in range(0, len(pix), 3)}
        check("png has every method's colour", all(any(max(abs(a - b) for a, b in zip(c, bytes(t))) <= 3 for c in seen)
                                                   for t in want), [t for t in want])
    except Exception as ex:  # noqa: BLE001 - any decoding failure is a test failure
        check("png decodes (CRC, Adler-32, filters, size)", False, repr(ex))
    try:
        import xml.etree.ElementTree as ET
        root = ET.parse(svg).getroot()
        check("svg parses, 1440x480 view box, with glyphs and paths",
              root.tag.endswith("svg") and root.get("viewBox") == "0 0 1440 480"
              and len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 50, root.attrib)
    except Exception as ex:  # noqa: BLE001 - any parse failure is a test failure
        check("svg parses, 1440x480 view box, with glyphs and paths", False, repr(ex))

    js2 = os.path.join(tmp, "e2.json")
    r2 = run(["--model", HF, "--json", js2] + SMALL)
    if r2.returncode == 0:
        a = [{k: v for k, v in x.items() if k != "seconds"} for x in doc["results"]]
        b = [{k: v for k, v in x.items() if k != "seconds"} for x in json.load(open(js2))["results"]]
        check("same seed, same figures", a == b)
    else:
        check("same seed, same figures", False, r2.stderr.decode()[-400:])

    ref = json.load(open(os.path.join(S260, "reference/teacher_forced_nll.json")))
    txt = os.path.join(tmp, "t.txt")
    open(txt, "w").write(ref["text"] * 4)
    js3 = os.path.join(tmp, "e3.json")
    # "streaming" is the engine's alias of streamingllm: one row family, measured once
    r3 = run(["--model", HF, "--text", txt, "--methods", "full,streaming,streamingllm", "--budgets", "0.3",
              "--texts", "1", "--max-ctx", "128", "--agree-prompts", "1", "--agree-tokens", "8",
              "--passkey-trials", "0", "--threads", "1", "--json", js3])
    ok = r3.returncode == 0
    if ok:
        d3 = json.load(open(js3))
        ok = (d3["text"] == txt and all(x["ppl"] and math.isfinite(x["ppl"]) for x in d3["results"]) and
              [(x["method"], x["budget"]) for x in d3["results"]] == [("full", 1), ("streamingllm", 0.3)])
    check("--text FILE is scored; --methods streaming = streamingllm, once", ok, r3.stderr.decode()[-400:])

    for bad in (["--methods", "full,nosuch"], ["--budgets", "0"], ["--budgets", "1.5"], ["--texts", "x"], []):
        args = ["--model", HF] + bad if bad else bad
        rb = run(args, timeout=60)
        check(f"usage error for {bad or 'no --model'}", rb.returncode == 2, rb.returncode)
    rh = run(["--help"], timeout=30)
    check("--help", rh.returncode == 0 and b"--budgets" in rh.stdout)

    # retrieval grids: shape, JSON and the heat-map PNG
    jn, pn = os.path.join(tmp, "n.json"), os.path.join(tmp, "n.png")
    rn = run(["--model", HF, "--methods", "full,d2o,h2o", "--budgets", "0.5", "--texts", "1",
              "--max-ctx", "192", "--agree-prompts", "1", "--agree-tokens", "8", "--passkey-trials", "0",
              "--threads", "1", "--niah-lengths", "64,128", "--niah-depths", "0,0.5,1", "--niah-trials", "1",
              "--niah-needles", "3", "--niah-budget", "0.3", "--niah-png", pn, "--json", jn])
    ok = rn.returncode == 0
    detail = rn.stderr.decode()[-400:]
    if ok:
        nh = json.load(open(jn)).get("niah", {})
        ms = nh.get("methods", [])
        ok = (nh.get("lengths") == [64, 128] and nh.get("depths") == [0.0, 0.5, 1.0] and
              [m["method"] for m in ms] == ["full", "d2o", "h2o"] and
              all(len(m[t]["accuracy_by_length_depth"]) == 2 and
                  all(len(row) == 3 for row in m[t]["accuracy_by_length_depth"]) and m[t]["trials"] == 6
                  for m in ms for t in ("passkey", "needles")))
        detail = json.dumps(nh)[:400]
    check("--niah grids per method in the JSON", ok, detail)
    ok = os.path.exists(pn) and open(pn, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    if ok:
        w, h = struct.unpack(">II", open(pn, "rb").read()[16:24])
        ok = w > 400 and h > 200
    check("--niah-png heat map written", ok)
    check("--niah table", b"retrieval grids" in rn.stdout, rn.stdout.decode()[-300:])

    test_http(tmp)

    print(f"eval: {results['passed']} passed, {results['failed']} failed")
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
