#!/usr/bin/env python3
"""tests/integration/test_fuzz_replay.py — replays every fuzz target (built as a
plain program with -DD2_FUZZ_STANDALONE into BUILD/fuzz-replay/, and under
ASan/UBSan into build/san/fuzz-replay/ when present) over its seed corpus:
the files in tests/fuzz/corpus/<target>/, the real inputs in ../shared and
the repository (models, tokenizer files, chat templates, the config file),
and deterministic truncations and byte flips of each. Every run must exit 0.

Usage: test_fuzz_replay.py path/to/d2od   (the build dir is taken from it)
"""
import glob
import os
import random
import subprocess
import sys
import tempfile

D2OD = sys.argv[1] if len(sys.argv) > 1 else "build/d2od"
BUILD = os.path.dirname(D2OD) or "build"
SHARED = os.environ.get("D2_SHARED", "../shared")
res = {"passed": 0, "failed": 0, "skipped": 0}


def seeds(target):
    files = sorted(glob.glob(f"tests/fuzz/corpus/{target}/*"))
    extra = {
        "gguf": [f"{SHARED}/assets/models/stories260K/stories260K.gguf",
                 f"{SHARED}/assets/vocab-tests/ggml-vocab-gpt-2.gguf"],
        "safetensors": [f"{SHARED}/assets/models/stories260K/hf/model.safetensors"],
        "config": ["configs/d2od.conf"],
        "jinja": sorted(glob.glob("tests/fixtures/jinja/*.jinja")),
        "tokenize": [f"{SHARED}/assets/vocab-tests/ggml-vocab-llama-bpe.gguf.inp"],
    }
    return files + [f for f in extra.get(target, []) if os.path.exists(f)]


def mutants(path, tmp, rng, n):
    data = open(path, "rb").read()[: 1 << 21]
    out = []
    for k in range(n):
        b = bytearray(data)
        if b and k % 2 == 0:
            b = b[: rng.randrange(len(b))]
        else:
            for _ in range(1 + rng.randrange(8)):
                if b:
                    b[rng.randrange(len(b))] = rng.randrange(256)
        p = os.path.join(tmp, f"{os.path.basename(path)}.{k}")
        open(p, "wb").write(bytes(b))
        out.append(p)
    return out


def main():
    rng = random.Random(1234)
    bins = sorted(glob.glob(f"{BUILD}/fuzz-replay/fuzz_*"))
    bins = [b for b in bins if not b.endswith(".d")]
    san = [b for b in sorted(glob.glob("build/san/fuzz-replay/fuzz_*")) if not b.endswith(".d")]
    if not bins:
        print(f"skip no replay binaries under {BUILD}/fuzz-replay")
        res["skipped"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        for b in bins + (san if BUILD != "build/san" else []):
            target = os.path.basename(b)[len("fuzz_"):]
            files = seeds(target)
            if not files:
                print(f"skip {b}: no seeds")
                res["skipped"] += 1
                continue
            inputs = list(files)
            for f in files:
                inputs += mutants(f, tmp, rng, 6 if os.path.getsize(f) > 200000 else 20)
            env = dict(os.environ, D2_SHARED=SHARED, ASAN_OPTIONS="detect_leaks=1", UBSAN_OPTIONS="halt_on_error=1")
            r = subprocess.run([b] + inputs, capture_output=True, timeout=600, env=env)
            ok = r.returncode == 0
            res["passed" if ok else "failed"] += 1
            print(f"{'ok  ' if ok else 'FAIL'} {b} over {len(inputs)} inputs"
                  + ("" if ok else "\n" + r.stderr.decode(errors="replace")[-2000:]))
    print(f"fuzz-replay: {res['passed']} passed, {res['failed']} failed, {res['skipped']} skipped")
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
