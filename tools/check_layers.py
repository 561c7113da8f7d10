#!/usr/bin/env python3
"""tools/check_layers.py — fails (exit 1) on any #include that points against the
layer order of docs/ARCHITECTURE.md; run by `make check-layers` (part of `make test`).

A file may include project headers of its own folder or of a strictly lower layer:

    0 common/          status, log, util, utf8 — below everything
    1 kernels/         CUDA kernels (kernels.h is C11)
    1 hub/             models by hub id: HF cache + downloads (leaf over common; daemon/ calls it)
    2 kvpool/          the paged pool's bookkeeping
    3 engine/tok/      tokenizers (leaf over common + jansson)
    4 engine/model/    model description, GGUF/safetensors loaders, RoPE tables
    5 the seam         engine/backend.h + batch.c (plan, backend vtable), sample.[ch], kvsel.[ch]
    6 engine/cpu/, engine/ref/, engine/cuda/   backends (siblings never include each other)
    7 engine/          the runtime: engine, scheduler, step, drivers, KV-compression policy
    8 api/jinja/       the Jinja interpreter (leaf over common)
    9 api/             HTTP, JSON, SSE, metrics
   10 daemon/          the binary: serve, subcommands, config

tests/ and tools/ sit above everything and are not checked.
"""
import os
import re
import sys

SEAM = {"engine/backend.h", "engine/sample.h", "engine/sample.c", "engine/kvsel.h", "engine/kvsel.c",
        "engine/batch.c"}
RANKS = [("common/", 0), ("kernels/", 1), ("hub/", 1), ("kvpool/", 2), ("engine/tok/", 3),
         ("engine/model/", 4), ("engine/cpu/", 6), ("engine/ref/", 6), ("engine/cuda/", 6),
         ("engine/", 7), ("api/jinja/", 8), ("api/", 9), ("daemon/", 10)]
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def layer(path):
    """(rank, folder) of a repository path, or None for unchecked paths."""
    if path in SEAM:
        return 5, "engine/<seam>"
    for prefix, rank in RANKS:
        if path.startswith(prefix):
            return rank, prefix
    return None


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "."
    bad = []
    n_edges = 0
    for top in ("common", "kernels", "hub", "kvpool", "engine", "api", "daemon"):
        for dirpath, _, names in os.walk(os.path.join(root, top)):
            for name in sorted(names):
                if not name.endswith((".c", ".h", ".cu", ".cuh")):
                    continue
                path = os.path.relpath(os.path.join(dirpath, name), root)
                src = layer(path)
                with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
                    for lineno, line in enumerate(f, 1):
                        m = INCLUDE.match(line)
                        if not m:
                            continue
                        target = m.group(1)
                        if "/" not in target:  # a header beside the file (common/, kernels/)
                            target = os.path.join(os.path.dirname(path), target)
                        dst = layer(target)
                        if dst is None or src is None:
                            continue
                        n_edges += 1
                        same_folder = os.path.dirname(target) == os.path.dirname(path) \
                            and src[0] == dst[0]
                        if not (dst[0] < src[0] or same_folder or (src == dst and src[0] == 5)):
                            bad.append(f"{path}:{lineno}: includes {target} "
                                       f"(layer {dst[0]} {dst[1]} from layer {src[0]} {src[1]})")
    for b in bad:
        print(b)
    print(f"check-layers: {n_edges} include edges, {len(bad)} against the layer order")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
