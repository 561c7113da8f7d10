#!/usr/bin/python3
"""tools/d2o_reference.py — an independent PyTorch implementation of D2O (the
official code's algorithm, shared/design/d2o-spec.md §2-§5) over a Llama model
in Hugging Face format, for checking d2od's C implementation
(tests/integration/test_d2o_reference.py compares the two; tools/d2o_probe.c
reports what d2od decided). Needs Debian's python3-torch (/usr/bin/python3).

Written from the spec and from reading the official code's behaviour; it shares
no code with d2od. Everything is fp32 with eager, materialised attention.

Protocol (the one d2od's `perplexity`/`eval` use, eng_score_kv): the first P
ids are prefilled with the full cache; the prompt is compressed once, at the
end of the prefill, from the prompt's column sums; every later id is one
decode step (attention over the cache plus the new token, scores accumulated),
after which a compressed layer longer than its budget evicts down to it
(one token per step: the official cadence, d2od's `exact`). The official code
compresses at the first decode step instead, with that step's row in the
scores — a documented d2od choice, kept here so that the two can be compared
token for token.

Three granularities:
  mode "layer"   one kept set per layer: score = sum over query heads, the
                 similarity of two tokens = mean over KV heads of the per-head
                 cosine (d2od's layer-uniform design, spec §9.1 option A);
  mode "head"    the official code: every query head (KV expanded by
                 repeat_kv) selects, matches and merges on its own; the merge
                 test averages the per-head max similarity column by column;
  mode "kvhead"  the same algorithm per KV head without repeat_kv: a KV head's
                 score is the sum over the query heads of its GQA group
                 (d2od's granularity "head"; equal to "head" without GQA).

Usage as a script:
  /usr/bin/python3 tools/d2o_reference.py --model DIR --ids FILE --prefill P \
      [--budget 0.2] [--mode layer|head|kvhead] [--merge-rule code|normalised] \
      [--keep-layers 0,1,4|none] [--ema-beta 0.5] [--heavy-share 0.5] [--out FILE]
  /usr/bin/python3 tools/d2o_reference.py --model DIR --ids FILE --sample N [--seed S]
      (writes N ids sampled from the model at temperature 1 to FILE)
Budgets follow d2od: r_l = clamp(L*rho*softmax(-v)_l, 0.01, 1) and
heavy = int(n*r*share), recent = int(n*r*(1-share)) over the n prompt tokens
(the official code uses n+1, because it compresses one step later).
"""
import argparse
import json
import math
import struct
import sys

import numpy as np
import torch

N_SINK = 4
MIN_RATIO = 0.01


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] != "F32":
            raise SystemExit(f"{path}: {name}: only F32 tensors are supported, not {t['dtype']}")
        a, b = t["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).reshape(t["shape"])
    return out


class Llama:
    """A Llama decoder (HF layout: rotate-half RoPE on HF-permuted q/k)."""

    def __init__(self, hf_dir):
        with open(f"{hf_dir}/config.json") as f:
            c = json.load(f)
        self.L = c["num_hidden_layers"]
        self.dim = c["hidden_size"]
        self.nh = c["num_attention_heads"]
        self.nkv = c.get("num_key_value_heads", self.nh)
        self.hd = c.get("head_dim", self.dim // self.nh)
        self.eps = c.get("rms_norm_eps", 1e-5)
        self.theta = c.get("rope_theta", 10000.0)
        if c.get("rope_scaling"):
            raise SystemExit("rope_scaling is not supported by this reference")
        w = load_safetensors(f"{hf_dir}/model.safetensors")
        self.w = w
        self.emb = w["model.embed_tokens.weight"]
        self.out = w.get("lm_head.weight", self.emb)
        self.norm = w["model.norm.weight"]
        inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=torch.float64) / self.hd))
        self.inv_freq = inv

    def rms(self, x, g):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * g

    def rope(self, x, pos):
        """x [heads, T, hd], pos [T] -> rotated (rotate_half convention)."""
        ang = torch.outer(torch.tensor(pos, dtype=torch.float64), self.inv_freq)
        cos = torch.cat([ang.cos(), ang.cos()], -1).float()
        sin = torch.cat([ang.sin(), ang.sin()], -1).float()
        h = self.hd // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    def qkv(self, l, x, pos):
        p = f"model.layers.{l}."
        h = self.rms(x, self.w[p + "input_layernorm.weight"])
        T = x.shape[0]
        q = (h @ self.w[p + "self_attn.q_proj.weight"].T).view(T, self.nh, self.hd).transpose(0, 1)
        k = (h @ self.w[p + "self_attn.k_proj.weight"].T).view(T, self.nkv, self.hd).transpose(0, 1)
        v = (h @ self.w[p + "self_attn.v_proj.weight"].T).view(T, self.nkv, self.hd).transpose(0, 1)
        return self.rope(q, pos), self.rope(k, pos), v

    def finish(self, l, x, attn_out):
        """attn_out [nh, T, hd] -> the layer's output residual stream."""
        p = f"model.layers.{l}."
        T = x.shape[0]
        x = x + attn_out.transpose(0, 1).reshape(T, self.nh * self.hd) @ self.w[p + "self_attn.o_proj.weight"].T
        h = self.rms(x, self.w[p + "post_attention_layernorm.weight"])
        g = h @ self.w[p + "mlp.gate_proj.weight"].T
        u = h @ self.w[p + "mlp.up_proj.weight"].T
        return x + (torch.nn.functional.silu(g) * u) @ self.w[p + "mlp.down_proj.weight"].T

    def logits(self, x):
        return self.rms(x, self.norm) @ self.out.T


# ---- D2O pieces (spec §2-§4) -------------------------------------------------------------


def layer_stat(colsum):
    """colsum [nh, n] -> v: unbiased variance over keys per head, min-max across heads, mean."""
    var = colsum.double().var(dim=1, unbiased=True)
    nv = (var - var.min()) / (var.max() - var.min() + 1e-6)
    return float(nv.mean())


def budgets(v, n, rho, share, kept_layers):
    """Per-layer (heavy, recent); None for layers never compressed. fp32 as d2od computes."""
    L = len(v)
    v32 = np.array(v, dtype=np.float32)
    z = np.exp(-(v32 - v32.min())).astype(np.float32)
    w = z / np.float32(z.sum(dtype=np.float32))
    out = []
    for l in range(L):
        if l in kept_layers:
            out.append(None)
            continue
        r = np.float32(L) * np.float32(rho) * w[l]
        r = min(max(r, np.float32(MIN_RATIO)), np.float32(1.0))
        hh = int(np.float32(n) * r * np.float32(share))
        rec = int(np.float32(n) * r * (np.float32(1.0) - np.float32(share)))
        out.append((hh, rec))
    return out


def select(score, n_sink, heavy, recent):
    """Keep mask over n slots (slot order): the last `recent`, the first min(n_sink, heavy)
    of the rest (sinks, inside the heavy budget), the best heavy - sinks others by score
    (ties: the earlier slot)."""
    n = score.shape[0]
    recent = min(max(recent, 0), n)
    lim = n - recent
    keep = torch.zeros(n, dtype=torch.bool)
    keep[lim:] = True
    ns = max(0, min(n_sink, heavy, lim))
    keep[:ns] = True
    nh, nc = heavy - ns, lim - ns
    if nh >= nc:
        keep[ns:lim] = True
    elif nh > 0:
        s = score[ns:lim].double().numpy()
        order = np.lexsort((np.arange(nc), -s))  # score descending, then index ascending
        keep[torch.from_numpy(order[:nh] + ns)] = True
    return keep


def merge(K, V, keep, tgt, m, passed, rule):
    """Folds passed evicted slots into their targets in place; K/V [S, d] (one granularity unit)."""
    E = math.e
    for c in sorted(set(int(tgt[e]) for e in range(len(tgt)) if passed[e])):
        es = [e for e in range(len(tgt)) if passed[e] and int(tgt[e]) == c]
        if rule == "code":
            den = 1.0 + len(es)
            wc = 1.0 / den
            we = [float(m[e]) / den for e in es]
        else:
            den = E + sum(math.exp(float(m[e])) for e in es)
            wc = E / den
            we = [math.exp(float(m[e])) / den for e in es]
        k = wc * K[c].clone()
        v = wc * V[c].clone()
        for e, w in zip(es, we):
            k += w * K[e]
            v += w * V[e]
        K[c] = k
        V[c] = v


class LayerCache:
    """One layer's cache. mode layer: K/V [nkv, S, hd], pos [S], score [S].
    mode head: K/V [H, S, hd], pos [H, S], score [H, S] with H = nh (repeat_kv,
    the official code) or H = nkv (mode kvhead; compression is the same)."""

    def __init__(self, mode, K, V, pos, score):
        self.mode, self.K, self.V, self.pos, self.score = mode, K, V, pos, score
        self.tau = None
        self.evicted = 0
        self.merged = 0

    def length(self):
        return self.K.shape[1]

    def compress(self, heavy, recent, n_sink, beta, rule, first):
        n = self.length()
        if n <= heavy + recent:
            return
        if self.mode == "layer":
            self._compress_layer(heavy, recent, n_sink, beta, rule, first)
        else:
            self._compress_head(heavy, recent, n_sink, beta, rule, first)

    def _tau(self, s, beta, first):
        if first or self.tau is None:
            self.tau = s
        else:
            self.tau = (1.0 - beta) * self.tau + beta * s
        return self.tau

    def _compress_layer(self, heavy, recent, n_sink, beta, rule, first):
        nkv, n, hd = self.K.shape
        keep = select(self.score, n_sink, heavy, recent)
        kept = torch.nonzero(keep).flatten()
        ev = torch.nonzero(~keep).flatten()
        kn = self.K / self.K.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        # u[e, c] = mean over KV heads of the per-head cosine
        u = torch.einsum("hed,hcd->ec", kn[:, ev], kn[:, kept]) / nkv
        m, arg = u.max(dim=1)
        tgt = kept[arg]
        tau = self._tau(float(m.double().mean()), beta, first)
        passed = (m >= tau).tolist()
        Kf = self.K.transpose(0, 1).reshape(n, nkv * hd).clone()
        Vf = self.V.transpose(0, 1).reshape(n, nkv * hd).clone()
        full_t = torch.full((n,), -1, dtype=torch.long)
        full_m = torch.zeros(n)
        full_p = [False] * n
        for i, e in enumerate(ev.tolist()):
            full_t[e], full_m[e], full_p[e] = tgt[i], m[i], passed[i]
        merge(Kf, Vf, keep, full_t, full_m, full_p, rule)
        self.K = Kf.view(n, nkv, hd).transpose(0, 1)[:, keep].contiguous()
        self.V = Vf.view(n, nkv, hd).transpose(0, 1)[:, keep].contiguous()
        self.pos = self.pos[keep]
        self.score = self.score[keep]
        self.evicted += len(ev)
        self.merged += sum(passed)

    def _compress_head(self, heavy, recent, n_sink, beta, rule, first):
        nh, n, hd = self.K.shape
        keeps, ms, tgts, evs = [], [], [], []
        for h in range(nh):
            keep = select(self.score[h], n_sink, heavy, recent)
            kept = torch.nonzero(keep).flatten()
            ev = torch.nonzero(~keep).flatten()
            kn = self.K[h] / self.K[h].norm(dim=-1, keepdim=True).clamp_min(1e-30)
            u = kn[ev] @ kn[kept].T
            m, arg = u.max(dim=1)
            keeps.append(keep)
            ms.append(m)
            tgts.append(kept[arg])
            evs.append(ev)
        M = torch.stack(ms)  # [nh, n_ev]: column j = the j-th evicted token of each head
        tau = self._tau(float(M.double().mean()), beta, first)
        passed = (M.mean(dim=0) >= tau).tolist()  # the official column-wise head mean
        newK, newV, newP, newS = [], [], [], []
        for h in range(nh):
            full_t = torch.full((n,), -1, dtype=torch.long)
            full_m = torch.zeros(n)
            full_p = [False] * n
            for j, e in enumerate(evs[h].tolist()):
                full_t[e], full_m[e], full_p[e] = tgts[h][j], ms[h][j], passed[j]
            K, V = self.K[h].clone(), self.V[h].clone()
            merge(K, V, keeps[h], full_t, full_m, full_p, rule)
            newK.append(K[keeps[h]])
            newV.append(V[keeps[h]])
            newP.append(self.pos[h][keeps[h]])
            newS.append(self.score[h][keeps[h]])
        self.K, self.V = torch.stack(newK), torch.stack(newV)
        self.pos, self.score = torch.stack(newP), torch.stack(newS)
        self.evicted += M.shape[1]
        self.merged += sum(passed)

    def kept_positions(self):
        if self.mode == "layer":
            return [int(p) for p in self.pos]
        return [[int(p) for p in row] for row in self.pos]


def run(model, ids, prefill, rho=0.2, mode="layer", rule="code", kept_layers=None, beta=0.5,
        share=0.5, n_sink=N_SINK):
    """The protocol of the module docstring; returns a dict like tools/d2o_probe.c's."""
    M = model
    L, nh, nkv, hd = M.L, M.nh, M.nkv, M.hd
    gs = nh // nkv
    if kept_layers is None:
        kept_layers = {0, 1, L - 1}
    n = len(ids)
    P = min(prefill, n)
    nll = []
    # prefill: full causal attention, column sums per query head
    x = M.emb[torch.tensor(ids[:P])]
    pos = list(range(P))
    caches, stats, colsums = [], [], []
    mask = torch.full((P, P), float("-inf")).triu(1)
    for l in range(L):
        q, k, v = M.qkv(l, x, pos)
        kx = k.repeat_interleave(gs, dim=0)
        vx = v.repeat_interleave(gs, dim=0)
        a = torch.softmax(q @ kx.transpose(1, 2) / math.sqrt(hd) + mask, dim=-1)  # [nh, P, P]
        colsum = a.sum(dim=1)  # [nh, P]
        stats.append(layer_stat(colsum))
        colsums.append(colsum)
        if mode == "layer":
            caches.append(LayerCache(mode, k.clone(), v.clone(), torch.arange(P), colsum.sum(0).clone()))
        elif mode == "kvhead":
            caches.append(LayerCache("head", k.clone(), v.clone(), torch.arange(P).repeat(nkv, 1),
                                     colsum.view(nkv, gs, P).sum(1).clone()))
        else:
            caches.append(LayerCache(mode, kx.clone(), vx.clone(), torch.arange(P).repeat(nh, 1),
                                     colsum.clone()))
        x = M.finish(l, x, a @ vx)
    lg = M.logits(x[-1:])
    if P < n:
        nll.append(float(-torch.log_softmax(lg[0].double(), -1)[ids[P]]))
    bud = budgets(stats, P, rho, share, kept_layers)
    for l in range(L):
        if bud[l] is not None:
            caches[l].compress(bud[l][0], bud[l][1], n_sink, beta, rule, True)
    tau_prompt = [c.tau for c in caches]
    kept_prompt = [c.kept_positions() for c in caches]
    # decode, one id per step
    for t in range(P, n):
        x = M.emb[torch.tensor([ids[t]])]
        for l in range(L):
            c = caches[l]
            q, k, v = M.qkv(l, x, [t])
            if mode == "layer":
                c.K = torch.cat([c.K, k], 1)
                c.V = torch.cat([c.V, v], 1)
                c.pos = torch.cat([c.pos, torch.tensor([t])])
                c.score = torch.cat([c.score, torch.zeros(1)])
                kx = c.K.repeat_interleave(gs, dim=0)
                vx = c.V.repeat_interleave(gs, dim=0)
                a = torch.softmax(q @ kx.transpose(1, 2) / math.sqrt(hd), dim=-1)  # [nh, 1, S]
                c.score += a[:, 0].sum(0)
                out = a @ vx
            elif mode == "kvhead":
                c.K = torch.cat([c.K, k], 1)
                c.V = torch.cat([c.V, v], 1)
                c.pos = torch.cat([c.pos, torch.full((nkv, 1), t)], 1)
                c.score = torch.cat([c.score, torch.zeros(nkv, 1)], 1)
                a = torch.softmax(q @ c.K.repeat_interleave(gs, dim=0).transpose(1, 2) / math.sqrt(hd), dim=-1)
                c.score += a[:, 0].view(nkv, gs, -1).sum(1)
                out = a @ c.V.repeat_interleave(gs, dim=0)
            else:
                c.K = torch.cat([c.K, k.repeat_interleave(gs, dim=0)], 1)
                c.V = torch.cat([c.V, v.repeat_interleave(gs, dim=0)], 1)
                c.pos = torch.cat([c.pos, torch.full((nh, 1), t)], 1)
                c.score = torch.cat([c.score, torch.zeros(nh, 1)], 1)
                a = torch.softmax(q @ c.K.transpose(1, 2) / math.sqrt(hd), dim=-1)
                c.score += a[:, 0]
                out = a @ c.V
            x = M.finish(l, x, out)
            if bud[l] is not None and c.length() > bud[l][0] + bud[l][1]:
                c.compress(bud[l][0], bud[l][1], n_sink, beta, rule, False)
        if t + 1 < n:
            lg = M.logits(x)
            nll.append(float(-torch.log_softmax(lg[0].double(), -1)[ids[t + 1]]))
    layers = []
    for l in range(L):
        c = caches[l]
        layers.append({
            "stat": stats[l],
            "heavy": bud[l][0] if bud[l] else -1,
            "recent": bud[l][1] if bud[l] else -1,
            "tau_prompt": tau_prompt[l] if tau_prompt[l] is not None else 0.0,
            "tau_end": c.tau if c.tau is not None else 0.0,
            "kept_prompt": kept_prompt[l],
            "kept_end": c.kept_positions(),
            "evicted": c.evicted,
            "merged": c.merged,
        })
    return {"n_layers": L, "prefill": P, "n": n, "mode": mode, "layers": layers, "nll": nll,
            "evicted": sum(c.evicted for c in caches), "merged": sum(c.merged for c in caches)}


def sample_ids(model, n, seed, bos=1, temperature=1.0):
    """A text written by the model itself (seeded), so that it is in-distribution."""
    g = torch.Generator().manual_seed(seed)
    ids = [bos]
    M = model
    gs = M.nh // M.nkv
    Ks = [None] * M.L
    Vs = [None] * M.L
    while len(ids) < n:
        t = len(ids) - 1
        x = M.emb[torch.tensor([ids[-1]])]
        for l in range(M.L):
            q, k, v = M.qkv(l, x, [t])
            Ks[l] = k if Ks[l] is None else torch.cat([Ks[l], k], 1)
            Vs[l] = v if Vs[l] is None else torch.cat([Vs[l], v], 1)
            a = torch.softmax(q @ Ks[l].repeat_interleave(gs, 0).transpose(1, 2) / math.sqrt(M.hd), -1)
            x = M.finish(l, x, a @ Vs[l].repeat_interleave(gs, 0))
        p = torch.softmax(M.logits(x)[0] / temperature, -1)
        ids.append(int(torch.multinomial(p, 1, generator=g)))
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--prefill", type=int)
    ap.add_argument("--sample", type=int)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--mode", choices=["layer", "head", "kvhead"], default="layer")
    ap.add_argument("--merge-rule", choices=["code", "normalised"], default="code")
    ap.add_argument("--keep-layers", default=None)
    ap.add_argument("--ema-beta", type=float, default=0.5)
    ap.add_argument("--heavy-share", type=float, default=0.5)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    M = Llama(a.model)
    if a.sample:
        with open(a.ids, "w") as f:
            json.dump(sample_ids(M, a.sample, a.seed), f)
        return
    if a.prefill is None:
        ap.error("--prefill is required")
    with open(a.ids) as f:
        ids = json.load(f)
    kl = None
    if a.keep_layers is not None:
        kl = set() if a.keep_layers == "none" else {int(s) % M.L for s in a.keep_layers.split(",")}
    r = run(M, ids, a.prefill, a.budget, a.mode, a.merge_rule, kl, a.ema_beta, a.heavy_share)
    s = json.dumps(r, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(s)
    else:
        sys.stdout.write(s + "\n")


if __name__ == "__main__":
    main()
