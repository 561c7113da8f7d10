/*
 * tests/gpu/test_d2o.cu — GPU test of kernels/d2o.cu (D2O compression of one
 * (sequence, layer) table): every kernel against a CPU reference that
 * mirrors engine/kvcomp.c (eng_kv_select, the matching / tau / merge /
 * compaction steps of eng_kv_compress_layer) on the same bf16 data.
 *
 * A standalone nvcc program (make test-gpu). Prints one "ok NAME" or
 * "FAIL NAME: why" line per check and closes with
 * "gpu-d2o: N passed, N failed, N skipped"; exit 1 when a check failed.
 * Without a CUDA device it prints "skip: no CUDA device" and exits 0.
 *
 * Each stage is checked from the GPU's own inputs of that stage (the merge
 * reference uses the GPU's targets, similarities and tau), so a near-tie in
 * the cosine matching cannot cascade into false failures. Tolerances:
 *   scores, selection, index lists, compaction: exact (same fp32 order);
 *   similarity: |gpu - cpu| <= 1e-4 (tensor-core sums in another order), and
 *     the GPU's target must be within 1e-4 of the CPU's best;
 *   tau: 1e-6 relative; merged bf16 values: 1 bf16 ulp (expf may differ by
 *     an ulp); slots that are no merge target: bit-identical.
 */
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "kernels/kernels.h"

static int g_passed, g_failed;

static void result(const char *name, bool ok, const char *why) {
    if (ok) {
        printf("ok %s\n", name);
        g_passed++;
    } else {
        printf("FAIL %s: %s\n", name, why);
        g_failed++;
    }
}

#define CU(x)                                                                  \
    do {                                                                       \
        cudaError_t e_ = (x);                                                  \
        if (e_ != cudaSuccess) {                                               \
            char b_[256];                                                      \
            snprintf(b_, sizeof b_, "%s: %s", #x, cudaGetErrorString(e_));     \
            result(name, false, b_);                                           \
            return;                                                            \
        }                                                                      \
    } while (0)

#define KOK(x)                                                                 \
    do {                                                                       \
        int r_ = (x);                                                          \
        if (r_ != 0) {                                                         \
            char b_[256];                                                      \
            snprintf(b_, sizeof b_, "%s returned %d", #x, r_);                 \
            result(name, false, b_);                                           \
            return;                                                            \
        }                                                                      \
    } while (0)

/* ---- host bf16 (round to nearest even, as kernels/common.cuh) ---- */

static float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* ---- deterministic data ---- */

struct Rng {
    uint64_t s;
    uint32_t next() {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return (uint32_t)(s >> 33);
    }
    float uni() { return (float)(next() >> 8) * (1.0f / 16777216.0f); } /* [0, 1) */
    float sym() { return 2.0f * uni() - 1.0f; }
};

/* Host mirror of one layer's pages and one table. */
struct Pool {
    int n_pages, pt, n_kv, hd, kvd, n;
    std::vector<uint16_t> k, v;
    std::vector<int32_t> pos, tab;
    std::vector<float> score;
    size_t slot(int i) const { return (size_t)tab[i / pt] * pt + (size_t)(i % pt); }
};

/* score_quant > 0 rounds scores to multiples of 1/score_quant (ties). */
static Pool make_pool(int n, int pt, int n_kv, int hd, uint64_t seed, int score_quant) {
    Pool p;
    Rng r{seed};
    p.pt = pt;
    p.n_kv = n_kv;
    p.hd = hd;
    p.kvd = n_kv * hd;
    p.n = n;
    int used = (n + pt - 1) / pt;
    p.n_pages = used + 3;
    p.k.resize((size_t)p.n_pages * pt * p.kvd);
    p.v.resize(p.k.size());
    p.pos.resize((size_t)p.n_pages * pt);
    p.score.resize((size_t)p.n_pages * pt * n_kv);
    for (auto &x : p.k) x = f2bf(r.sym() * 2.0f);
    for (auto &x : p.v) x = f2bf(r.sym());
    for (size_t i = 0; i < p.pos.size(); i++) p.pos[i] = (int32_t)(r.next() % 100000);
    for (auto &x : p.score) {
        float s = r.uni();
        if (score_quant > 0) s = floorf(s * (float)score_quant) / (float)score_quant;
        x = s;
    }
    /* a table over a shuffled subset of the pages */
    std::vector<int32_t> ids(p.n_pages);
    for (int i = 0; i < p.n_pages; i++) ids[i] = i;
    for (int i = p.n_pages - 1; i > 0; i--) std::swap(ids[i], ids[r.next() % (uint32_t)(i + 1)]);
    p.tab.assign(ids.begin(), ids.begin() + used);
    for (int i = 0; i < n; i++) p.pos[p.slot(i)] = 1000 + i;
    /* some -0 / +0 scores (equal in the C comparison) */
    for (int i = 0; i < n; i += 37) p.score[p.slot(i) * n_kv] = (i / 37) % 2 ? -0.0f : 0.0f;
    return p;
}

/* ---- CPU references (engine/kvcomp.c) ---- */

static void ref_scores(const Pool &p, std::vector<float> &sc) {
    sc.assign(p.n, 0.0f);
    for (int i = 0; i < p.n; i++) {
        float acc = 0.0f;
        for (int g = 0; g < p.n_kv; g++) acc += p.score[p.slot(i) * p.n_kv + g];
        sc[i] = acc;
    }
}

/* eng_kv_pool_scores: the 5-wide mean SnapKV and PyramidKV select by */
static void ref_pool_scores(std::vector<float> &sc) {
    const int n = (int)sc.size(), half = 2;
    std::vector<float> out(n);
    for (int i = 0; i < n; i++) {
        int a = i - half < 0 ? 0 : i - half, b = i + half >= n ? n - 1 : i + half;
        float s = 0.0f;
        for (int j = a; j <= b; j++) s += sc[j];
        out[i] = s / (float)(b - a + 1);
    }
    sc = out;
}

/* eng_kv_select */
static int ref_select(const std::vector<float> &score, int n, int n_sink, int heavy, int recent,
                      std::vector<uint8_t> &keep) {
    if (recent > n) recent = n;
    if (recent < 0) recent = 0;
    if (heavy < 0) heavy = 0;
    int lim = n - recent;
    keep.assign(n, 0);
    for (int i = lim; i < n; i++) keep[i] = 1;
    int ns = n_sink < heavy ? n_sink : heavy;
    if (ns > lim) ns = lim;
    if (ns < 0) ns = 0;
    for (int i = 0; i < ns; i++) keep[i] = 1;
    int nh = heavy - ns, nc = lim - ns;
    if (nh >= nc) {
        for (int i = ns; i < lim; i++) keep[i] = 1;
    } else if (nh > 0) {
        std::vector<int> c(nc);
        for (int i = 0; i < nc; i++) c[i] = ns + i;
        std::sort(c.begin(), c.end(), [&](int a, int b) {
            if (score[a] > score[b]) return true;
            if (score[a] < score[b]) return false;
            return a < b;
        });
        for (int i = 0; i < nh; i++) keep[c[i]] = 1;
    }
    int m = 0;
    for (int i = 0; i < n; i++) m += keep[i];
    return m;
}

/* per-head-normalised float keys of every live slot */
static void ref_norm_keys(const Pool &p, std::vector<float> &kn) {
    kn.assign((size_t)p.n * p.kvd, 0.0f);
    for (int i = 0; i < p.n; i++)
        for (int g = 0; g < p.n_kv; g++) {
            const uint16_t *kh = &p.k[p.slot(i) * p.kvd + (size_t)g * p.hd];
            float ss = 0.0f;
            for (int d = 0; d < p.hd; d++) ss += bf2f(kh[d]) * bf2f(kh[d]);
            float nn = sqrtf(ss), inv = nn > 1e-30f ? 1.0f / nn : 0.0f;
            for (int d = 0; d < p.hd; d++)
                kn[(size_t)i * p.kvd + (size_t)g * p.hd + d] = bf2f(kh[d]) * inv;
        }
}

static float ref_sim(const Pool &p, const std::vector<float> &kn, int e, int c) {
    float acc = 0.0f;
    for (int d = 0; d < p.kvd; d++) acc += kn[(size_t)e * p.kvd + d] * kn[(size_t)c * p.kvd + d];
    return acc * (1.0f / (float)p.n_kv);
}

/* ---- device state of one case ---- */

struct Dev {
    uint16_t *k = nullptr, *v = nullptr;
    int32_t *pos = nullptr, *tab = nullptr;
    float *score = nullptr, *tau = nullptr;
    void *scratch = nullptr;
    ~Dev() {
        cudaFree(k); cudaFree(v); cudaFree(pos); cudaFree(tab); cudaFree(score); cudaFree(tau);
        cudaFree(scratch);
    }
};

template <class T> static bool down(std::vector<T> &h, const T *d, size_t n) {
    h.resize(n);
    return n == 0 || cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess;
}

struct Case {
    const char *name;
    int n, pt, n_kv, hd, n_sink, heavy, recent, rule, move_slots, score_quant;
    float beta;
    bool select_only;
    bool pool; /* SnapKV / PyramidKV: kern_d2o_pool_scores after the scores */
};

static void run_case(const Case &cs) {
    char name[160], why[512];
    Pool p = make_pool(cs.n, cs.pt, cs.n_kv, cs.hd, 0x5eed0000ull + (uint64_t)cs.n * 7 + cs.hd,
                       cs.score_quant);
    Dev d;
    snprintf(name, sizeof name, "%s/setup", cs.name);
    size_t kvb = p.k.size() * 2;
    CU(cudaMalloc(&d.k, kvb));
    CU(cudaMalloc(&d.v, kvb));
    CU(cudaMalloc(&d.pos, p.pos.size() * 4));
    CU(cudaMalloc(&d.score, p.score.size() * 4));
    CU(cudaMalloc(&d.tab, p.tab.size() * 4));
    CU(cudaMalloc(&d.tau, 4));
    CU(cudaMemcpy(d.k, p.k.data(), kvb, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(d.v, p.v.data(), kvb, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(d.pos, p.pos.data(), p.pos.size() * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(d.score, p.score.data(), p.score.size() * 4, cudaMemcpyHostToDevice));
    CU(cudaMemcpy(d.tab, p.tab.data(), p.tab.size() * 4, cudaMemcpyHostToDevice));
    size_t sb = kern_d2o_scratch_bytes(p.n, p.n_kv, p.hd, cs.move_slots);
    if (sb == 0) { result(name, false, "scratch_bytes = 0"); return; }
    CU(cudaMalloc(&d.scratch, sb));
    kern_d2o_ws ws;
    KOK(kern_d2o_ws_init(&ws, d.scratch, sb, p.n, p.n_kv, p.hd, cs.move_slots));
    if (kern_d2o_ws_init(&ws, d.scratch, sb - 1, p.n, p.n_kv, p.hd, cs.move_slots) != D2_EINVAL) {
        result(name, false, "ws_init accepted a short buffer");
        return;
    }
    KOK(kern_d2o_ws_init(&ws, d.scratch, sb, p.n, p.n_kv, p.hd, cs.move_slots));
    kern_d2o_pages kv = {(kern_bf16 *)d.k, (kern_bf16 *)d.v, d.pos, d.score, p.pt, p.n_kv, p.hd};
    kern_d2o_plan plan;
    KOK(kern_d2o_plan_make(&plan, p.n, cs.n_sink, cs.heavy, cs.recent));
    result(name, true, "");

    /* 1-2. scores and selection */
    snprintf(name, sizeof name, "%s/scores+select", cs.name);
    KOK(kern_d2o_scores(&ws, kv, d.tab, &plan, nullptr));
    if (cs.pool) KOK(kern_d2o_pool_scores(&ws, &plan, nullptr));
    KOK(kern_d2o_select(&ws, &plan, nullptr));
    CU(cudaDeviceSynchronize());
    std::vector<float> g_score, r_score;
    std::vector<uint8_t> g_keep, r_keep;
    std::vector<int32_t> g_rank, g_kept, g_ev, g_counts;
    if (!down(g_score, ws.score, p.n) || !down(g_keep, ws.keep, p.n) ||
        !down(g_rank, ws.rank, p.n) || !down(g_kept, ws.kept, plan.n_kept) ||
        !down(g_ev, ws.ev, plan.n_evicted) || !down(g_counts, ws.counts, 4)) {
        result(name, false, "copy back failed");
        return;
    }
    ref_scores(p, r_score);
    if (cs.pool) ref_pool_scores(r_score);
    int r_m = ref_select(r_score, p.n, cs.n_sink, cs.heavy, cs.recent, r_keep);
    bool ok = r_m == plan.n_kept && g_counts[0] == r_m && g_counts[3] == p.n - r_m;
    snprintf(why, sizeof why, "kept: plan %d, cpu %d, gpu %d", plan.n_kept, r_m, g_counts[0]);
    int first_gap = p.n, kk = 0, ee = 0;
    for (int i = 0; ok && i < p.n; i++) {
        if (memcmp(&g_score[i], &r_score[i], 4) != 0) {
            snprintf(why, sizeof why, "score[%d]: gpu %g cpu %g", i, g_score[i], r_score[i]);
            ok = false;
        } else if ((g_keep[i] != 0) != (r_keep[i] != 0)) {
            snprintf(why, sizeof why, "keep[%d]: gpu %d cpu %d (score %g)", i, g_keep[i],
                     r_keep[i], r_score[i]);
            ok = false;
        } else if (g_rank[i] != kk) {
            snprintf(why, sizeof why, "rank[%d] = %d, want %d", i, g_rank[i], kk);
            ok = false;
        } else if (r_keep[i] ? g_kept[kk] != i : g_ev[ee] != i) {
            snprintf(why, sizeof why, "list entry of slot %d wrong", i);
            ok = false;
        }
        if (r_keep[i]) kk++;
        else {
            ee++;
            if (first_gap == p.n) first_gap = i;
        }
    }
    if (ok && g_counts[1] != first_gap) {
        snprintf(why, sizeof why, "first_gap gpu %d cpu %d", g_counts[1], first_gap);
        ok = false;
    }
    result(name, ok, why);
    if (!ok || cs.select_only || plan.n_evicted == 0) return;
    const int ne = plan.n_evicted, nk = plan.n_kept;

    /* 3. matching */
    snprintf(name, sizeof name, "%s/match", cs.name);
    KOK(kern_d2o_match(&ws, kv, d.tab, &plan, nullptr));
    CU(cudaDeviceSynchronize());
    std::vector<int32_t> g_tgt;
    std::vector<float> g_sim, kn;
    if (!down(g_tgt, ws.tgt, ne) || !down(g_sim, ws.sim, ne)) {
        result(name, false, "copy back failed");
        return;
    }
    ref_norm_keys(p, kn);
    ok = true;
    int same = 0;
    double r_ssum = 0.0;
    for (int j = 0; j < ne && ok; j++) {
        int e = g_ev[j];
        float best = -INFINITY;
        int bt = -1;
        for (int c = 0; c < nk; c++) {
            float u = ref_sim(p, kn, e, g_kept[c]);
            if (u > best) { best = u; bt = g_kept[c]; }
        }
        r_ssum += best;
        int t = g_tgt[j];
        if (t < 0 || t >= p.n || !r_keep[t]) {
            snprintf(why, sizeof why, "evicted %d: target %d is no kept slot", e, t);
            ok = false;
            break;
        }
        float ut = ref_sim(p, kn, e, t);
        if (fabsf(g_sim[j] - best) > 1e-4f || ut < best - 1e-4f || fabsf(ut - g_sim[j]) > 1e-4f) {
            snprintf(why, sizeof why, "evicted %d: gpu (%d, %.7f) cpu (%d, %.7f), cpu sim of gpu "
                     "target %.7f", e, t, g_sim[j], bt, best, ut);
            ok = false;
        }
        same += t == bt;
    }
    if (ok) snprintf(why, sizeof why, "%d of %d targets identical", same, ne);
    result(name, ok, why);
    if (ok) printf("  (%s)\n", why);
    if (!ok) return;

    /* 4. tau: the EMA from a known previous value, then the first call */
    snprintf(name, sizeof name, "%s/tau", cs.name);
    double g_ssum = 0.0;
    for (int j = 0; j < ne; j++) g_ssum += g_sim[j];
    float st = (float)(g_ssum / ne), prev = 0.25f;
    volatile float b = cs.beta; /* keep the host expression unfused */
    float want_ema = (1.0f - b) * prev + b * st;
    CU(cudaMemcpy(d.tau, &prev, 4, cudaMemcpyHostToDevice));
    KOK(kern_d2o_tau(&ws, &plan, d.tau, 0, cs.beta, nullptr));
    float got_ema, got_first;
    std::vector<float> stat;
    CU(cudaMemcpy(&got_ema, d.tau, 4, cudaMemcpyDeviceToHost));
    KOK(kern_d2o_tau(&ws, &plan, d.tau, 1, cs.beta, nullptr));
    CU(cudaMemcpy(&got_first, d.tau, 4, cudaMemcpyDeviceToHost));
    if (!down(stat, ws.stat, 2)) { result(name, false, "copy back failed"); return; }
    ok = fabsf(got_ema - want_ema) <= 1e-6f * fabsf(want_ema) + 1e-7f &&
         fabsf(got_first - st) <= 1e-6f * fabsf(st) + 1e-7f && stat[1] == got_first &&
         fabsf(stat[0] - (float)(r_ssum / ne)) <= 1e-4f;
    snprintf(why, sizeof why, "ema gpu %.8f want %.8f; first gpu %.8f want %.8f; stat %.8f %.8f",
             got_ema, want_ema, got_first, st, stat[0], stat[1]);
    result(name, ok, why);
    if (!ok) return;
    const float tau = got_first;

    /* 5. merge, reference from the GPU's targets / similarities / tau */
    snprintf(name, sizeof name, "%s/merge", cs.name);
    KOK(kern_d2o_merge(&ws, kv, d.tab, &plan, d.tau, cs.rule, nullptr));
    CU(cudaDeviceSynchronize());
    std::vector<uint16_t> gk, gv;
    if (!down(gk, d.k, p.k.size()) || !down(gv, d.v, p.v.size()) || !down(g_counts, ws.counts, 4)) {
        result(name, false, "copy back failed");
        return;
    }
    std::vector<uint16_t> rk = p.k, rv = p.v;
    std::vector<std::vector<int>> groups(p.n);
    int n_pass = 0;
    for (int j = 0; j < ne; j++)
        if (g_tgt[j] >= 0 && g_sim[j] >= tau) {
            groups[g_tgt[j]].push_back(j); /* ascending j = ascending slot */
            n_pass++;
        }
    const float self_e = expf(1.0f);
    std::vector<float> ak(p.kvd), av(p.kvd);
    for (int c = 0; c < p.n; c++) {
        const std::vector<int> &gr = groups[c];
        if (gr.empty()) continue;
        float wc, denom;
        if (cs.rule == KERN_D2O_MERGE_NORMALISED) {
            denom = self_e;
            for (int j : gr) denom += expf(g_sim[j]);
            wc = self_e / denom;
        } else {
            denom = 1.0f + (float)gr.size();
            wc = 1.0f / denom;
        }
        size_t cs0 = p.slot(c) * p.kvd;
        for (int x = 0; x < p.kvd; x++) {
            ak[x] = wc * bf2f(p.k[cs0 + x]);
            av[x] = wc * bf2f(p.v[cs0 + x]);
        }
        for (int j : gr) {
            float we = cs.rule == KERN_D2O_MERGE_NORMALISED ? expf(g_sim[j]) / denom
                                                            : g_sim[j] / denom;
            size_t es = p.slot(g_ev[j]) * p.kvd;
            for (int x = 0; x < p.kvd; x++) {
                ak[x] += we * bf2f(p.k[es + x]);
                av[x] += we * bf2f(p.v[es + x]);
            }
        }
        for (int x = 0; x < p.kvd; x++) {
            rk[cs0 + x] = f2bf(ak[x]);
            rv[cs0 + x] = f2bf(av[x]);
        }
    }
    ok = g_counts[2] == n_pass;
    snprintf(why, sizeof why, "passed: gpu %d cpu %d", g_counts[2], n_pass);
    std::vector<uint8_t> is_target(p.k.size() / p.kvd, 0);
    for (int c = 0; c < p.n; c++)
        if (!groups[c].empty()) is_target[p.slot(c)] = 1;
    int ulp1 = 0;
    for (size_t x = 0; ok && x < p.k.size(); x++) {
        const std::vector<uint16_t> *G[2] = {&gk, &gv}, *R[2] = {&rk, &rv};
        for (int w = 0; w < 2 && ok; w++) {
            uint16_t a = (*G[w])[x], r = (*R[w])[x];
            if (a == r) continue;
            /* bf16 bit patterns of finite same-sign values are ordered: 1 ulp = 1 step */
            bool near = is_target[x / p.kvd] && ((a ^ r) & 0x8000u) == 0 && (a > r ? a - r : r - a) <= 1;
            if (near) {
                ulp1++;
                continue;
            }
            snprintf(why, sizeof why, "%s at slot %zu dim %zu: gpu %g cpu %g (target %d)",
                     w ? "v" : "k", x / p.kvd, x % p.kvd, bf2f(a), bf2f(r), is_target[x / p.kvd]);
            ok = false;
        }
    }
    if (ok) snprintf(why, sizeof why, "%d passed, %d values 1 ulp off", n_pass, ulp1);
    result(name, ok, why);
    if (ok) printf("  (%s)\n", why);
    if (!ok) return;

    /* 6. compaction of the GPU's merged pages */
    snprintf(name, sizeof name, "%s/compact", cs.name);
    KOK(kern_d2o_compact(&ws, kv, d.tab, &plan, nullptr));
    CU(cudaDeviceSynchronize());
    std::vector<uint16_t> ck, cv;
    std::vector<int32_t> cpos;
    std::vector<float> cscore;
    if (!down(ck, d.k, p.k.size()) || !down(cv, d.v, p.v.size()) ||
        !down(cpos, d.pos, p.pos.size()) || !down(cscore, d.score, p.score.size())) {
        result(name, false, "copy back failed");
        return;
    }
    ok = true;
    snprintf(why, sizeof why, "-");
    for (int r = 0; r < nk && ok; r++) {
        size_t ds = p.slot(r), ss = p.slot(g_kept[r]);
        if (memcmp(&ck[ds * p.kvd], &gk[ss * p.kvd], (size_t)p.kvd * 2) ||
            memcmp(&cv[ds * p.kvd], &gv[ss * p.kvd], (size_t)p.kvd * 2) ||
            cpos[ds] != p.pos[ss] ||
            memcmp(&cscore[ds * p.n_kv], &p.score[ss * p.n_kv], (size_t)p.n_kv * 4)) {
            snprintf(why, sizeof why, "slot %d does not hold kept slot %d", r, g_kept[r]);
            ok = false;
        }
    }
    for (int i = nk; ok && i % p.pt != 0; i++)
        if (cpos[p.slot(i)] != -1) {
            snprintf(why, sizeof why, "tail slot %d pos %d, want -1", i, cpos[p.slot(i)]);
            ok = false;
        }
    /* pages outside the table are never touched */
    std::vector<uint8_t> in_tab(p.n_pages, 0);
    for (int32_t pg : p.tab) in_tab[pg] = 1;
    for (int pg = 0; ok && pg < p.n_pages; pg++) {
        if (in_tab[pg]) continue;
        size_t o = (size_t)pg * p.pt * p.kvd, len = (size_t)p.pt * p.kvd * 2;
        if (memcmp(&ck[o], &p.k[o], len) || memcmp(&cv[o], &p.v[o], len)) {
            snprintf(why, sizeof why, "page %d outside the table was written", pg);
            ok = false;
        }
    }
    result(name, ok, why);
}

int main(void) {
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
        printf("skip: no CUDA device\n");
        printf("gpu-d2o: 0 passed, 0 failed, 1 skipped\n");
        return 0;
    }
    /* plan edge cases (host only) */
    {
        kern_d2o_plan pl;
        bool ok = kern_d2o_plan_make(&pl, 100, 4, 20, 30) == 0 && pl.n_sink == 4 &&
                  pl.n_heavy == 16 && pl.lim == 70 && pl.n_kept == 50 && pl.n_evicted == 50;
        ok = ok && kern_d2o_plan_make(&pl, 10, 4, 2, 50) == 0 && pl.lim == 0 && pl.n_kept == 10;
        ok = ok && kern_d2o_plan_make(&pl, 10, 4, 100, 2) == 0 && pl.n_kept == 10 &&
             pl.n_evicted == 0;
        ok = ok && kern_d2o_plan_make(&pl, -1, 4, 1, 1) == D2_EINVAL;
        result("plan", ok, "plan counts differ from eng_kv_select's");
    }
    const Case cases[] = {
        /* name         n    pt n_kv hd sink heavy recent rule move quant beta sel */
        {"stories", 300, 16, 4, 8, 4, 40, 30, KERN_D2O_MERGE_NORMALISED, 7, 16, 0.5f, false},
        {"llama", 2000, 16, 8, 128, 4, 200, 200, KERN_D2O_MERGE_CODE, 4096, 0, 0.7f, false},
        {"llama-norm", 1203, 16, 8, 128, 4, 241, 120, KERN_D2O_MERGE_NORMALISED, 100, 64, 0.5f,
         false},
        {"hd64", 517, 16, 2, 64, 4, 5, 3, KERN_D2O_MERGE_CODE, 3, 8, 0.5f, false},
        {"biggroups", 3000, 16, 1, 16, 1, 2, 1, KERN_D2O_MERGE_NORMALISED, 64, 0, 0.5f, false},
        {"hd256", 700, 32, 2, 256, 4, 100, 40, KERN_D2O_MERGE_NORMALISED, 50, 0, 0.5f, false},
        {"keepall", 200, 16, 2, 8, 4, 500, 10, KERN_D2O_MERGE_NORMALISED, 8, 0, 0.5f, false},
        {"noheavy", 200, 16, 2, 8, 0, 0, 50, KERN_D2O_MERGE_CODE, 8, 4, 0.5f, false},
        {"snapkv", 700, 16, 2, 64, 0, 100, 40, KERN_D2O_MERGE_CODE, 16, 0, 0.5f, false, true},
        {"select128k", 131072, 16, 1, 2, 4, 26000, 1000, 0, 1, 256, 0.5f, true},
        {"select128k-noquant", 131071, 16, 2, 2, 4, 13000, 999, 0, 1, 0, 0.5f, true},
    };
    for (const Case &c : cases) run_case(c);
    printf("gpu-d2o: %d passed, %d failed, 0 skipped\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
