/*
 * tests/gpu/test_kernels.cu — checks every kernel of kernels/kernels.h
 * against a plain CPU reference written here (fp64 where it helps), on
 * deterministic random inputs. Built and run by `make test-gpu`.
 *
 * Output: one "ok NAME" / "FAIL NAME" line per check (a FAIL is followed by
 * its first mismatches), then "gpu: P passed, F failed, S skipped". Exit 1
 * when anything failed. Without a usable device (cudaGetDeviceCount fails or
 * finds none) it prints "skip: no CUDA device" and exits 0, so CPU-only
 * machines and CI pass.
 *
 * Tolerances: |got - ref| <= atol + rtol * |ref|. bf16 outputs use rtol 1e-2;
 * fp32 outputs of fp32-accumulating kernels use ~1e-4 (attention: the CPU
 * reference sums in fp64 over the same bf16 K/V values, so the difference is
 * fp32 rounding of the GPU alone).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

/* ---- harness ---- */

static int g_pass, g_fail;

#define CK(stmt)                                                               \
    do {                                                                       \
        cudaError_t e_ = (stmt);                                               \
        if (e_ != cudaSuccess) {                                               \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #stmt,       \
                    cudaGetErrorString(e_));                                   \
            exit(2);                                                           \
        }                                                                      \
    } while (0)

/* An entry must return D2_OK; then the stream is drained so faults surface here. */
#define KCALL(call)                                                            \
    do {                                                                       \
        int rc_ = (call);                                                      \
        if (rc_ != D2_OK) {                                                    \
            kern_error ke_ = kern_last_error();                                \
            fprintf(stderr, "%s:%d: %s returned %d (%s at %s:%d: %s)\n",        \
                    __FILE__, __LINE__, #call, rc_, ke_.stmt, ke_.file,        \
                    ke_.line, ke_.msg);                                        \
            exit(2);                                                           \
        }                                                                      \
        CK(cudaDeviceSynchronize());                                           \
    } while (0)

static void report(const char *name, bool ok) {
    printf("%s %s\n", ok ? "ok" : "FAIL", name);
    if (ok)
        g_pass++;
    else
        g_fail++;
    fflush(stdout);
}

/* Element-wise closeness; prints the first few mismatches. Infinities must
 * match exactly (lse of an empty row is -inf). */
static bool close_enough(const char *name, const float *got, const double *ref, size_t n,
                         double atol, double rtol) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        double g = got[i], r = ref[i];
        bool ok;
        if (isinf(r) || isinf(g))
            ok = g == r;
        else
            ok = !isnan(g) && !isnan(r) && fabs(g - r) <= atol + rtol * fabs(r);
        if (!ok && bad++ < 5)
            printf("  %s[%zu]: got %.8g want %.8g\n", name, i, g, r);
    }
    if (bad) printf("  %s: %zu of %zu differ\n", name, bad, n);
    return bad == 0;
}

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint32_t rnd_u32(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 32);
}
static float rnd_f(float lo, float hi) {
    return lo + (hi - lo) * (float)(rnd_u32() >> 8) * (1.0f / 16777216.0f);
}
static int rnd_i(int n) { return (int)(rnd_u32() % (uint32_t)n); }

template <class T> static T *dev_copy(const std::vector<T> &h) {
    T *d = NULL;
    CK(cudaMalloc((void **)&d, h.size() * sizeof(T))); /* exact: overruns must show */
    if (!h.empty()) CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
    return d;
}
template <class T> static std::vector<T> host_copy(const T *d, size_t n) {
    std::vector<T> h(n);
    if (n) CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}
static std::vector<float> bf_to_f(const std::vector<kern_bf16> &b) {
    std::vector<float> f(b.size());
    for (size_t i = 0; i < b.size(); i++) f[i] = kern_host_bf2f(b[i]);
    return f;
}
static std::vector<kern_bf16> rnd_bf(size_t n, float lo, float hi) {
    std::vector<kern_bf16> b(n);
    for (auto &x : b) x = kern_host_f2bf(rnd_f(lo, hi));
    return b;
}
static std::vector<float> rnd_vec(size_t n, float lo, float hi) {
    std::vector<float> v(n);
    for (auto &x : v) x = rnd_f(lo, hi);
    return v;
}

/* ---- elementwise ---- */

static void test_embed(void) {
    const int vocab = 50, dim = 300, n_tok = 7;
    auto table = rnd_bf((size_t)vocab * dim, -1, 1);
    std::vector<int32_t> tok = {3, 0, 49, -1, 50, 17, 3};
    std::vector<double> ref((size_t)n_tok * dim);
    for (int t = 0; t < n_tok; t++)
        for (int i = 0; i < dim; i++)
            ref[(size_t)t * dim + i] =
                tok[t] >= 0 && tok[t] < vocab ? kern_host_bf2f(table[(size_t)tok[t] * dim + i]) : 0.0;
    kern_bf16 *d_tab = dev_copy(table);
    int32_t *d_tok = dev_copy(tok);
    std::vector<float> zero((size_t)n_tok * dim, 7.0f);
    float *d_out = dev_copy(zero);
    KCALL(kern_embed(d_out, KERN_F32, d_tab, d_tok, n_tok, dim, vocab, 0));
    auto got = host_copy(d_out, ref.size());
    report("embed_f32", close_enough("embed", got.data(), ref.data(), ref.size(), 0, 0));
    KCALL(kern_embed(d_out, KERN_BF16, d_tab, d_tok, n_tok, dim, vocab, 0));
    auto gb = bf_to_f(host_copy((kern_bf16 *)d_out, ref.size()));
    report("embed_bf16", close_enough("embed_bf16", gb.data(), ref.data(), ref.size(), 0, 0));
    cudaFree(d_tab);
    cudaFree(d_tok);
    cudaFree(d_out);
}

static void test_rmsnorm(void) {
    const int rows = 5, dim = 1000;
    const float eps = 1e-5f;
    auto x = rnd_vec((size_t)rows * dim, -3, 3);
    auto w = rnd_bf(dim, 0.5f, 1.5f);
    std::vector<double> ref(x.size());
    for (int r = 0; r < rows; r++) {
        double ss = 0;
        for (int i = 0; i < dim; i++) ss += (double)x[(size_t)r * dim + i] * x[(size_t)r * dim + i];
        double inv = 1.0 / sqrt(ss / dim + eps);
        for (int i = 0; i < dim; i++)
            ref[(size_t)r * dim + i] = x[(size_t)r * dim + i] * inv * kern_host_bf2f(w[i]);
    }
    float *d_x = dev_copy(x);
    kern_bf16 *d_w = dev_copy(w);
    std::vector<float> o(x.size());
    float *d_o = dev_copy(o);
    KCALL(kern_rmsnorm(d_o, KERN_F32, d_x, d_w, rows, dim, eps, 0));
    auto got = host_copy(d_o, x.size());
    report("rmsnorm_f32", close_enough("rmsnorm", got.data(), ref.data(), ref.size(), 1e-6, 1e-5));
    KCALL(kern_rmsnorm(d_o, KERN_BF16, d_x, d_w, rows, dim, eps, 0));
    auto gb = bf_to_f(host_copy((kern_bf16 *)d_o, x.size()));
    report("rmsnorm_bf16", close_enough("rmsnorm_bf16", gb.data(), ref.data(), ref.size(), 1e-6, 1e-2));
    KCALL(kern_rmsnorm(d_x, KERN_F32, d_x, d_w, rows, dim, eps, 0)); /* in place */
    got = host_copy(d_x, x.size());
    report("rmsnorm_inplace", close_enough("rmsnorm_ip", got.data(), ref.data(), ref.size(), 1e-6, 1e-5));
    report("rmsnorm_bf16_alias_refused",
           kern_rmsnorm(d_x, KERN_BF16, d_x, d_w, rows, dim, eps, 0) == D2_EINVAL);
    cudaFree(d_x);
    cudaFree(d_w);
    cudaFree(d_o);
}

static void test_rope_one(int neox) {
    const int n_tok = 6, n_heads = 4, hd = 64, stride = n_heads * hd + 32;
    auto x = rnd_vec((size_t)n_tok * stride, -2, 2);
    std::vector<int32_t> pos = {0, 1, 7, 100, 4095, 131000};
    std::vector<float> inv(hd / 2);
    for (int i = 0; i < hd / 2; i++) inv[i] = (float)pow(500000.0, -2.0 * i / hd);
    std::vector<double> ref(x.begin(), x.end());
    for (int t = 0; t < n_tok; t++)
        for (int h = 0; h < n_heads; h++)
            for (int i = 0; i < hd / 2; i++) {
                size_t base = (size_t)t * stride + (size_t)h * hd;
                int a = neox ? i : 2 * i, b = neox ? i + hd / 2 : 2 * i + 1;
                float ang = (float)pos[t] * inv[i]; /* the angle in fp32, as the contract says */
                double x0 = x[base + a], x1 = x[base + b];
                ref[base + a] = x0 * cos((double)ang) - x1 * sin((double)ang);
                ref[base + b] = x0 * sin((double)ang) + x1 * cos((double)ang);
            }
    float *d_x = dev_copy(x);
    int32_t *d_pos = dev_copy(pos);
    float *d_inv = dev_copy(inv);
    KCALL(kern_rope(d_x, d_pos, d_inv, n_tok, n_heads, hd, stride, neox, 0));
    auto got = host_copy(d_x, x.size());
    /* The padding after the heads of each token must be untouched (ref keeps x there). */
    report(neox ? "rope_neox" : "rope_adjacent",
           close_enough("rope", got.data(), ref.data(), ref.size(), 2e-6, 1e-5));
    cudaFree(d_x);
    cudaFree(d_pos);
    cudaFree(d_inv);
}

static void test_swiglu(void) {
    const int rows = 3, ff = 700;
    auto gu = rnd_vec((size_t)rows * 2 * ff, -6, 6); /* fused [gate | up] rows */
    std::vector<double> ref((size_t)rows * ff);
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < ff; i++) {
            double g = gu[(size_t)r * 2 * ff + i], u = gu[(size_t)r * 2 * ff + ff + i];
            ref[(size_t)r * ff + i] = g / (1.0 + exp(-g)) * u;
        }
    float *d_gu = dev_copy(gu);
    std::vector<float> o(ref.size());
    float *d_o = dev_copy(o);
    KCALL(kern_swiglu(d_o, KERN_F32, d_gu, d_gu + ff, rows, ff, 2 * ff, 0));
    auto got = host_copy(d_o, ref.size());
    report("swiglu_f32", close_enough("swiglu", got.data(), ref.data(), ref.size(), 1e-6, 1e-5));
    KCALL(kern_swiglu(d_o, KERN_BF16, d_gu, d_gu + ff, rows, ff, 2 * ff, 0));
    auto gb = bf_to_f(host_copy((kern_bf16 *)d_o, ref.size()));
    report("swiglu_bf16", close_enough("swiglu_bf16", gb.data(), ref.data(), ref.size(), 1e-6, 1e-2));
    cudaFree(d_gu);
    cudaFree(d_o);
}

/* More rows than a grid's y dimension holds (65535): SwiGLU of 70000 short
 * rows, and the KV write of 70000 tokens. */
static void test_many_rows(void) {
    const int rows = 70000, ff = 4;
    auto g = rnd_vec((size_t)rows * ff, -4, 4), u = rnd_vec((size_t)rows * ff, -4, 4);
    std::vector<double> ref((size_t)rows * ff);
    for (size_t i = 0; i < ref.size(); i++) ref[i] = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    float *d_g = dev_copy(g), *d_u = dev_copy(u);
    std::vector<float> o(ref.size());
    float *d_o = dev_copy(o);
    int rc = kern_swiglu(d_o, KERN_F32, d_g, d_u, rows, ff, ff, 0);
    CK(cudaDeviceSynchronize());
    bool ok = rc == D2_OK;
    if (!ok) printf("  kern_swiglu(%d rows) returned %d\n", rows, rc);
    if (ok) {
        auto got = host_copy(d_o, ref.size());
        ok = close_enough("swiglu_70000", got.data(), ref.data(), ref.size(), 1e-6, 1e-5);
    }
    report("swiglu_70000_rows", ok);
    cudaFree(d_g);
    cudaFree(d_u);
    cudaFree(d_o);

    const int n_tok = 70000, pt = 16, nkv = 1, hd = 2, n_pages = (n_tok + pt - 1) / pt;
    auto kv = rnd_vec((size_t)n_tok * 2 * hd, -2, 2); /* [k | v] rows */
    std::vector<int32_t> tpos(n_tok), page(n_tok), slot(n_tok);
    for (int t = 0; t < n_tok; t++) {
        tpos[t] = t;
        page[t] = n_pages - 1 - t / pt;
        slot[t] = t % pt;
    }
    std::vector<kern_bf16> kp((size_t)n_pages * pt * hd, 0);
    std::vector<int32_t> pp((size_t)n_pages * pt, -1);
    kern_bf16 *d_k = dev_copy(kp), *d_v = dev_copy(kp);
    int32_t *d_p = dev_copy(pp), *d_tp = dev_copy(tpos), *d_pg = dev_copy(page), *d_sl = dev_copy(slot);
    float *d_kv = dev_copy(kv);
    rc = kern_kv_write(d_k, d_v, d_p, NULL, d_kv, d_kv + hd, 2 * hd, d_tp, d_pg, d_sl, n_tok, nkv, hd,
                       pt, 0);
    CK(cudaDeviceSynchronize());
    ok = rc == D2_OK;
    if (!ok) printf("  kern_kv_write(%d tokens) returned %d\n", n_tok, rc);
    if (ok) {
        auto gk = host_copy(d_k, kp.size()), gv = host_copy(d_v, kp.size());
        auto gp = host_copy(d_p, pp.size());
        for (int t = 0; t < n_tok && ok; t++) {
            size_t s = (size_t)page[t] * pt + slot[t];
            for (int e = 0; e < hd; e++)
                ok = ok && gk[s * hd + e] == kern_host_f2bf(kv[(size_t)t * 2 * hd + e]) &&
                     gv[s * hd + e] == kern_host_f2bf(kv[(size_t)t * 2 * hd + hd + e]);
            ok = ok && gp[s] == t;
        }
    }
    report("kv_write_70000_tokens", ok);
    cudaFree(d_k);
    cudaFree(d_v);
    cudaFree(d_p);
    cudaFree(d_tp);
    cudaFree(d_pg);
    cudaFree(d_sl);
    cudaFree(d_kv);
}

static void test_add(void) {
    const int n = 10007;
    auto x = rnd_vec(n, -1, 1), y = rnd_vec(n, -1, 1);
    std::vector<double> ref(n);
    for (int i = 0; i < n; i++) ref[i] = (double)(x[i] + y[i]);
    float *d_x = dev_copy(x), *d_y = dev_copy(y);
    KCALL(kern_add(d_x, d_y, n, 0));
    auto got = host_copy(d_x, n);
    report("add", close_enough("add", got.data(), ref.data(), n, 0, 0));
    cudaFree(d_x);
    cudaFree(d_y);
}

static void test_kv_write(void) {
    const int n_pages = 6, pt = 4, nkv = 2, hd = 64, n_tok = 5, kvd = nkv * hd;
    const int stride = 3 * kvd; /* K and V inside a fused QKV-like row */
    const kern_bf16 sentinel = 0x7fc1;
    std::vector<kern_bf16> kp((size_t)n_pages * pt * kvd, sentinel), vp = kp;
    std::vector<int32_t> pp((size_t)n_pages * pt, -7);
    std::vector<float> sc((size_t)n_pages * pt * nkv, 9.0f);
    auto rows = rnd_vec((size_t)n_tok * stride, -4, 4);
    std::vector<int32_t> tpos = {10, 11, 12, 13, 14}, page = {5, 0, 0, 3, 5}, slot = {3, 0, 1, 2, 0};
    auto rk = kp, rv = vp;
    auto rp = pp;
    auto rs = sc;
    for (int t = 0; t < n_tok; t++) {
        size_t s = (size_t)page[t] * pt + slot[t];
        for (int e = 0; e < kvd; e++) {
            rk[s * kvd + e] = kern_host_f2bf(rows[(size_t)t * stride + e]);
            rv[s * kvd + e] = kern_host_f2bf(rows[(size_t)t * stride + kvd + e]);
        }
        rp[s] = tpos[t];
        for (int h = 0; h < nkv; h++) rs[s * nkv + h] = 0.0f;
    }
    kern_bf16 *d_k = dev_copy(kp), *d_v = dev_copy(vp);
    int32_t *d_p = dev_copy(pp), *d_tp = dev_copy(tpos), *d_pg = dev_copy(page), *d_sl = dev_copy(slot);
    float *d_s = dev_copy(sc), *d_rows = dev_copy(rows);
    KCALL(kern_kv_write(d_k, d_v, d_p, d_s, d_rows, d_rows + kvd, stride, d_tp, d_pg, d_sl, n_tok,
                        nkv, hd, pt, 0));
    bool ok = host_copy(d_k, kp.size()) == rk && host_copy(d_v, vp.size()) == rv &&
              host_copy(d_p, pp.size()) == rp && host_copy(d_s, sc.size()) == rs;
    report("kv_write", ok);
    cudaFree(d_k);
    cudaFree(d_v);
    cudaFree(d_p);
    cudaFree(d_tp);
    cudaFree(d_pg);
    cudaFree(d_sl);
    cudaFree(d_s);
    cudaFree(d_rows);
}

/* ---- attention ---- */

/* A host pool with random bf16 K/V; pos set by the caller. */
struct pool {
    int n_pages, pt, nkv, hd;
    std::vector<kern_bf16> k, v;
    std::vector<int32_t> pos;
    std::vector<float> score;
    float kf(int64_t page, int s, int h, int d) const {
        return kern_host_bf2f(k[(((size_t)page * pt + s) * nkv + h) * hd + d]);
    }
    float vf(int64_t page, int s, int h, int d) const {
        return kern_host_bf2f(v[(((size_t)page * pt + s) * nkv + h) * hd + d]);
    }
};
static pool make_pool(int n_pages, int pt, int nkv, int hd) {
    pool p{n_pages, pt, nkv, hd, {}, {}, {}, {}};
    p.k = rnd_bf((size_t)n_pages * pt * nkv * hd, -1, 1);
    p.v = rnd_bf(p.k.size(), -1, 1);
    p.pos.assign((size_t)n_pages * pt, -1);
    p.score = rnd_vec((size_t)n_pages * pt * nkv, 0, 1);
    return p;
}
/* Empty slots (pos -1: appended but not written, or a recycled page) may
 * hold anything: NaN keys and values there must not reach any output. */
static void poison_empty_slots(pool &p) {
    const kern_bf16 nan_bf = 0x7fc0;
    size_t row = (size_t)p.nkv * p.hd;
    for (size_t s = 0; s < p.pos.size(); s++)
        if (p.pos[s] < 0)
            for (size_t e = 0; e < row; e++) p.k[s * row + e] = p.v[s * row + e] = nan_bf;
}
struct dev_pool {
    kern_bf16 *k, *v;
    int32_t *pos;
    float *score;
    kern_kv_view view(const pool &p) const { return kern_kv_view{k, v, pos, p.pt, p.nkv, p.hd}; }
};
static dev_pool upload(const pool &p) {
    return dev_pool{dev_copy(p.k), dev_copy(p.v), dev_copy(p.pos), dev_copy(p.score)};
}
static void free_pool(dev_pool &d) {
    cudaFree(d.k);
    cudaFree(d.v);
    cudaFree(d.pos);
    cudaFree(d.score);
}

/* Reference attention of one query row against a table: fills out[hd],
 * returns lse (-inf when nothing visible) and the probabilities in prob[n].
 * window > 0: only keys at positions > qpos - window are visible (Mistral,
 * as engine/cpu/backend.c). */
static double ref_attn_row(const pool &P, const float *q, int kvh, float scale, const int32_t *tab,
                           int n, int qpos, int window, double *out, std::vector<double> &prob) {
    prob.assign(n, 0.0);
    std::vector<double> lg(n, -INFINITY);
    double m = -INFINITY;
    for (int j = 0; j < n; j++) {
        int64_t page = tab[j / P.pt];
        int s = j % P.pt;
        int p = P.pos[(size_t)page * P.pt + s];
        if (p < 0 || p > qpos || (window > 0 && p <= qpos - window)) continue;
        double dot = 0;
        for (int d = 0; d < P.hd; d++) dot += (double)(q[d] * scale) * P.kf(page, s, kvh, d);
        lg[j] = dot;
        m = fmax(m, dot);
    }
    for (int d = 0; d < P.hd; d++) out[d] = 0;
    if (m == -INFINITY) return -INFINITY;
    double z = 0;
    for (int j = 0; j < n; j++) z += lg[j] == -INFINITY ? 0 : exp(lg[j] - m);
    for (int j = 0; j < n; j++) {
        prob[j] = lg[j] == -INFINITY ? 0 : exp(lg[j] - m) / z;
        if (prob[j] == 0) continue;
        int64_t page = tab[j / P.pt];
        for (int d = 0; d < P.hd; d++) out[d] += prob[j] * P.vf(page, j % P.pt, kvh, d);
    }
    return m + log(z);
}

/* with_score: pass the pool score; use_score_from: per-sequence score_from
 * (sequence 3 does not score, sequence 4 starts scoring after this token),
 * else NULL (every sequence scores). use_live: the work list's length on the
 * device (n_work_live) and n_work its capacity, the entries past the live
 * length garbage sequence ids that must not be read (as a replayed CUDA
 * graph runs it). */
static void test_decode(const char *name, int n_heads, int nkv, int hd, kern_dtype odt, bool with_score,
                        int window, bool use_score_from = false, bool use_tab_row = false,
                        bool use_live = false, bool no_work = false) {
    const int pt = 16, n_pages = 160, n_seq = 6;
    const float scale = 1.0f / sqrtf((float)hd);
    pool P = make_pool(n_pages, pt, nkv, hd);
    std::vector<int> lens = {300, 1, 0, 600, 17, 256};
    const int tab_stride = 40;
    std::vector<int32_t> tab((size_t)n_seq * tab_stride, 0), qpos(n_seq);
    /* Random distinct pages per sequence, except that sequence 1 shares
     * sequence 0's first page (a fork): its score gets both additions. */
    std::vector<int> perm(n_pages);
    for (int i = 0; i < n_pages; i++) perm[i] = i;
    for (int i = n_pages - 1; i > 0; i--) std::swap(perm[i], perm[rnd_i(i + 1)]);
    int next = 0;
    for (int b = 0; b < n_seq; b++) {
        int np = (lens[b] + pt - 1) / pt;
        for (int i = 0; i < np; i++) tab[(size_t)b * tab_stride + i] = perm[next++];
    }
    tab[(size_t)1 * tab_stride] = tab[0];
    for (int b = 0; b < n_seq; b++) {
        int base = 1000 * b;
        for (int j = 0; j < lens[b]; j++) {
            int64_t page = tab[(size_t)b * tab_stride + j / pt];
            int p = base + 2 * j; /* gaps, like a compressed (D2O) table */
            if (j % 37 == 5) p = -1; /* an empty slot is never visible */
            if (b != 1) P.pos[(size_t)page * pt + j % pt] = p;
        }
        qpos[b] = lens[b] ? base + 2 * (lens[b] - 1) : 0;
        if (b == 3) qpos[b] -= 20; /* the last 10 slots lie in the future: masked */
    }
    qpos[1] = P.pos[(size_t)tab[0] * pt]; /* seq 1 (len 1) sees seq 0's slot 0 */
    poison_empty_slots(P);
    std::vector<int32_t> sfrom(n_seq, 0);
    if (use_score_from) {
        sfrom[3] = INT32_MAX;      /* want_scores off */
        sfrom[4] = qpos[4] + 1;    /* SnapKV window not reached yet */
        sfrom[5] = qpos[5];        /* reached exactly */
    }
    auto q = rnd_vec((size_t)n_seq * (n_heads * hd + 8), -1, 1);
    const int q_stride = n_heads * hd + 8;

    std::vector<double> ref_out((size_t)n_seq * n_heads * hd);
    std::vector<double> ref_score(P.score.begin(), P.score.end());
    std::vector<double> prob;
    const int G = n_heads / nkv;
    for (int b = 0; b < n_seq; b++)
        for (int h = 0; h < n_heads; h++) {
            const int32_t *tb = &tab[(size_t)b * tab_stride];
            ref_attn_row(P, &q[(size_t)b * q_stride + (size_t)h * hd], h / G, scale, tb, lens[b],
                         qpos[b], window, &ref_out[((size_t)b * n_heads + h) * hd], prob);
            if (qpos[b] >= sfrom[b])
                for (int j = 0; j < lens[b]; j++)
                    ref_score[((size_t)tb[j / pt] * pt + j % pt) * nkv + h / G] += prob[j];
        }

    dev_pool D = upload(P);
    /* use_tab_row: the tables as resident rows (tab_row), reversed and after
     * two rows of garbage page ids that no sequence may read */
    std::vector<int32_t> trow(n_seq), rows_tab((size_t)(n_seq + 2) * tab_stride, 999999);
    for (int b = 0; b < n_seq; b++) {
        trow[b] = 2 + (n_seq - 1 - b);
        std::copy(tab.begin() + (size_t)b * tab_stride, tab.begin() + (size_t)(b + 1) * tab_stride,
                  rows_tab.begin() + (size_t)trow[b] * tab_stride);
    }
    int32_t *d_tab = dev_copy(use_tab_row ? rows_tab : tab), *d_qpos = dev_copy(qpos);
    int32_t *d_trow = dev_copy(trow);
    std::vector<int32_t> len32(lens.begin(), lens.end());
    int32_t *d_len = dev_copy(len32), *d_sf = dev_copy(sfrom);
    float *d_q = dev_copy(q);
    std::vector<int32_t> sb(n_seq + 1), wk(64);
    int n_work = -1;
    if (kern_attn_decode_plan(len32.data(), n_seq, sb.data(), wk.data(), (int)wk.size(), &n_work) != D2_OK) {
        report(name, false);
        return;
    }
    int n_cap = n_work;
    std::vector<int32_t> live(1, n_work);
    if (use_live) {
        n_cap = (int)wk.size();
        for (int i = n_work; i < n_cap; i++) wk[i] = 1 << 28; /* never read */
    }
    int32_t *d_sb = dev_copy(sb), *d_wk = dev_copy(wk), *d_live = dev_copy(live);
    size_t wsb = kern_attn_decode_workspace_bytes(n_seq, n_cap, n_heads, hd, with_score);
    void *d_ws = NULL;
    CK(cudaMalloc(&d_ws, wsb));
    CK(cudaMemset(d_ws, 0xff, wsb)); /* NaN garbage: every read must be of written data */
    std::vector<float> o0(ref_out.size(), 0.0f);
    float *d_out = dev_copy(o0);
    KCALL(kern_attn_decode(d_out, odt, d_q, q_stride, D.view(P), with_score ? D.score : NULL,
                           use_score_from ? d_sf : NULL, d_tab, tab_stride,
                           use_tab_row ? d_trow : NULL, d_len, d_qpos, d_sb, no_work ? NULL : d_wk,
                           n_cap, use_live ? d_live : NULL, n_seq, n_heads, scale, window, d_ws, 0));
    std::vector<float> got = odt == KERN_F32 ? host_copy(d_out, ref_out.size())
                                             : bf_to_f(host_copy((kern_bf16 *)d_out, ref_out.size()));
    bool ok = close_enough(name, got.data(), ref_out.data(), ref_out.size(), 2e-5,
                           odt == KERN_F32 ? 2e-4 : 1e-2);
    if (with_score) {
        auto gs = host_copy(D.score, P.score.size());
        ok = close_enough("score", gs.data(), ref_score.data(), ref_score.size(), 1e-6, 1e-4) && ok;
    }
    report(name, ok);
    free_pool(D);
    cudaFree(d_tab);
    cudaFree(d_qpos);
    cudaFree(d_len);
    cudaFree(d_q);
    cudaFree(d_ws);
    cudaFree(d_out);
    cudaFree(d_sf);
    cudaFree(d_sb);
    cudaFree(d_wk);
    cudaFree(d_trow);
    cudaFree(d_live);
}

/* More live work items than the capped grid of the live-count mode has CTAs
 * (5000 one-slot sequences, one kv head: DEC_LIVE_CTAS = 4096 CTAs), so
 * CTAs stride over several items: the outputs and scores must equal the
 * one-CTA-per-item launch bit for bit (the same arithmetic per item), and
 * the reference. Capacity 6000, the entries past the live count garbage. */
static void test_decode_live_stride(void) {
    const int pt = 16, n_seq = 5000, n_pages = (n_seq + pt - 1) / pt, nh = 2, hd = 16, cap = 6000;
    pool P = make_pool(n_pages, pt, 1, hd);
    std::vector<int32_t> tab(n_seq), trow(n_seq), len(n_seq, 1), qpos(n_seq), sb(n_seq + 1), wk(cap);
    /* sequence b's one slot is slot 0 of page b / pt (16 sequences share a
     * page, as forks do); its key at position 5 is visible except to the
     * sequences with b % pt == 3, whose query sits at position 4 */
    for (int b = 0; b < n_seq; b++) {
        tab[b] = b / pt;
        trow[b] = b;
        qpos[b] = 7;
    }
    for (int pg = 0; pg < n_pages; pg++) P.pos[(size_t)pg * pt] = 5;
    for (int b = 0; b < n_seq; b++)
        if (b % pt == 3) qpos[b] = 4;
    int n_work = 0;
    bool ok = kern_attn_decode_plan(len.data(), n_seq, sb.data(), wk.data(), cap, &n_work) == D2_OK &&
              n_work == n_seq;
    for (int i = n_work; i < cap; i++) wk[i] = 1 << 28;
    std::vector<int32_t> live(1, n_work);
    const int q_stride = nh * hd;
    auto q = rnd_vec((size_t)n_seq * q_stride, -1, 1);
    dev_pool D = upload(P);
    int32_t *d_tab = dev_copy(tab), *d_trow = dev_copy(trow), *d_len = dev_copy(len);
    int32_t *d_qpos = dev_copy(qpos), *d_sb = dev_copy(sb), *d_wk = dev_copy(wk), *d_live = dev_copy(live);
    float *d_q = dev_copy(q);
    size_t wsb = kern_attn_decode_workspace_bytes(n_seq, cap, nh, hd, 1);
    void *d_ws = NULL;
    CK(cudaMalloc(&d_ws, wsb));
    std::vector<float> z((size_t)n_seq * nh * hd, 0.0f);
    float *d_o1 = dev_copy(z), *d_o2 = dev_copy(z);
    std::vector<float> s0(P.score.size(), 0.0f);
    float *d_s1 = dev_copy(s0), *d_s2 = dev_copy(s0), *d_s3 = dev_copy(s0), *d_o3 = dev_copy(z);
    KCALL(kern_attn_decode(d_o1, KERN_F32, d_q, q_stride, D.view(P), d_s1, NULL, d_tab, 1, d_trow,
                           d_len, d_qpos, d_sb, d_wk, n_work, NULL, n_seq, nh, 0.25f, 0, d_ws, 0));
    KCALL(kern_attn_decode(d_o2, KERN_F32, d_q, q_stride, D.view(P), d_s2, NULL, d_tab, 1, d_trow,
                           d_len, d_qpos, d_sb, d_wk, cap, d_live, n_seq, nh, 0.25f, 0, d_ws, 0));
    /* and without a work list: each item's sequence from split_base */
    KCALL(kern_attn_decode(d_o3, KERN_F32, d_q, q_stride, D.view(P), d_s3, NULL, d_tab, 1, d_trow,
                           d_len, d_qpos, d_sb, NULL, cap, d_live, n_seq, nh, 0.25f, 0, d_ws, 0));
    auto o1 = host_copy(d_o1, z.size()), o2 = host_copy(d_o2, z.size()), o3 = host_copy(d_o3, z.size());
    auto sc1 = host_copy(d_s1, s0.size()), sc2 = host_copy(d_s2, s0.size()), sc3 = host_copy(d_s3, s0.size());
    ok = ok && memcmp(o1.data(), o2.data(), o1.size() * 4) == 0 &&
         memcmp(sc1.data(), sc2.data(), sc1.size() * 4) == 0 &&
         memcmp(o1.data(), o3.data(), o1.size() * 4) == 0 &&
         memcmp(sc1.data(), sc3.data(), sc1.size() * 4) == 0;
    /* reference: a visible sequence's output is its one value row */
    for (int b = 0; b < n_seq && ok; b++)
        for (int h = 0; h < nh; h++)
            for (int d = 0; d < hd; d++) {
                float want = b % pt == 3 ? 0.0f : P.vf(tab[b], 0, 0, d);
                if (fabsf(o2[((size_t)b * nh + h) * hd + d] - want) > 1e-6f) ok = false;
            }
    report("decode_live_count_strided_grid", ok);
    free_pool(D);
    cudaFree(d_tab); cudaFree(d_trow); cudaFree(d_len); cudaFree(d_qpos); cudaFree(d_sb);
    cudaFree(d_wk); cudaFree(d_live); cudaFree(d_q); cudaFree(d_ws); cudaFree(d_o1);
    cudaFree(d_o2); cudaFree(d_s1); cudaFree(d_s2); cudaFree(d_o3); cudaFree(d_s3);
}

/* kern_patch_i32: patches of different lengths (0, 1, more than a CTA's
 * threads) land where their headers say, nothing else changes. */
static void test_patch_i32(void) {
    std::vector<int32_t> dst(1000), src(400);
    for (int i = 0; i < 1000; i++) dst[i] = -i;
    for (int i = 0; i < 400; i++) src[i] = 10000 + i;
    std::vector<int32_t> hdr = {500, 0, 150, 3, 200, 1, 900, 300, 0, 10, 310, 7};
    std::vector<int32_t> want = dst;
    for (size_t p = 0; p < hdr.size() / 3; p++)
        for (int i = 0; i < hdr[3 * p + 2]; i++) want[hdr[3 * p] + i] = src[hdr[3 * p + 1] + i];
    int32_t *d_dst = dev_copy(dst), *d_src = dev_copy(src), *d_hdr = dev_copy(hdr);
    bool ok = kern_patch_i32(d_dst, d_src, d_hdr, (int)hdr.size() / 3, 0) == D2_OK;
    ok = ok && kern_patch_i32(d_dst, d_src, d_hdr, 0, 0) == D2_OK;
    ok = ok && host_copy(d_dst, dst.size()) == want;
    report("patch_i32", ok);
    cudaFree(d_dst);
    cudaFree(d_src);
    cudaFree(d_hdr);
}

/* The decode workspace and grids follow what each sequence needs: one
 * sequence of 32k keys among 255 of 100 keys (32 heads, head_dim 128) needs
 * 128 + 255 splits, not 256 x 128; logits are kept only with scores. (The
 * earlier layout, sized n_seq x n_heads x the longest sequence, took 1.6 GB
 * here, and launched 256 x 128 split CTAs per kv head.) */
static void test_decode_bounds(void) {
    std::vector<int32_t> lens(256, 100), sb(257), wk(1000);
    lens[17] = 32768;
    int n_work = 0;
    bool ok = kern_attn_decode_plan(lens.data(), 256, sb.data(), wk.data(), (int)wk.size(), &n_work) == D2_OK;
    ok = ok && n_work == 128 + 255 && sb[17] == 17 && sb[18] == 17 + 128 && sb[256] == n_work;
    ok = ok && wk[17] == 17 && wk[17 + 127] == 17 && wk[17 + 128] == 18;
    size_t no_sc = kern_attn_decode_workspace_bytes(256, n_work, 32, 128, 0);
    size_t with_sc = kern_attn_decode_workspace_bytes(256, n_work, 32, 128, 1);
    printf("  decode workspace: %.1f MB without scores, %.1f MB with\n", no_sc / 1e6, with_sc / 1e6);
    ok = ok && no_sc > 0 && no_sc < (size_t)8 << 20 && with_sc < (size_t)24 << 20;
    /* a work list that does not fit is refused */
    ok = ok && kern_attn_decode_plan(lens.data(), 256, sb.data(), wk.data(), 300, &n_work) == D2_EINVAL;
    report("decode_workspace_bounds", ok);
}

/* Prefill of a chunk of n_q queries over n_kv keys (the chunk's own keys are
 * the last n_q of them), then the scores of the same chunk: pool score per
 * (slot, kv head) and column sums per (query head, key position), from the
 * queries at positions >= score_from, positions >= cs_len cut; both must add
 * to the initial contents. */
static void test_prefill(const char *name, int n_heads, int nkv, int hd, int n_kv, int n_q, int window,
                         int score_from = 0, int cs_len = 1000) {
    const int pt = 16;
    const float scale = 1.0f / sqrtf((float)hd);
    const int n_pages_tab = (n_kv + pt - 1) / pt;
    pool P = make_pool(n_pages_tab + 5, pt, nkv, hd);
    std::vector<int32_t> tab(n_pages_tab);
    for (int i = 0; i < n_pages_tab; i++) tab[i] = n_pages_tab + 4 - i; /* reversed order */
    std::vector<int32_t> slot_pos(n_kv);
    for (int j = 0; j < n_kv; j++) {
        slot_pos[j] = 10 + (j < n_kv / 2 ? 3 * j : 3 * (n_kv / 2) + (j - n_kv / 2));
        if (j % 29 == 7 && j < n_kv - n_q) slot_pos[j] = -1;
        P.pos[(size_t)tab[j / pt] * pt + j % pt] = slot_pos[j];
    }
    std::vector<int32_t> qpos(n_q);
    for (int i = 0; i < n_q; i++) qpos[i] = slot_pos[n_kv - n_q + i];
    qpos[0] = 5; /* sees nothing: zero output, lse -inf, no colsum */
    poison_empty_slots(P);
    const int q_stride = n_heads * hd + 4;
    auto q = rnd_vec((size_t)n_q * q_stride, -2, 2);
    const int G = n_heads / nkv;

    std::vector<double> ref_out((size_t)n_q * n_heads * hd), ref_lse((size_t)n_heads * n_q);
    std::vector<float> cs0((size_t)n_heads * cs_len, 0.5f);
    std::vector<double> ref_cs(cs0.begin(), cs0.end());
    std::vector<double> ref_score(P.score.begin(), P.score.end());
    std::vector<double> prob;
    for (int i = 0; i < n_q; i++)
        for (int h = 0; h < n_heads; h++) {
            ref_lse[(size_t)h * n_q + i] =
                ref_attn_row(P, &q[(size_t)i * q_stride + (size_t)h * hd], h / G, scale,
                             tab.data(), n_kv, qpos[i], window, &ref_out[((size_t)i * n_heads + h) * hd],
                             prob);
            if (qpos[i] < score_from) continue;
            for (int j = 0; j < n_kv; j++) {
                size_t slot = (size_t)tab[j / pt] * pt + j % pt;
                ref_score[slot * nkv + h / G] += prob[j];
                if (slot_pos[j] >= 0 && slot_pos[j] < cs_len)
                    ref_cs[(size_t)h * cs_len + slot_pos[j]] += prob[j];
            }
        }

    dev_pool D = upload(P);
    int32_t *d_tab = dev_copy(tab), *d_qpos = dev_copy(qpos);
    float *d_q = dev_copy(q);
    std::vector<float> o0(ref_out.size(), 0.0f), l0(ref_lse.size(), 0.0f);
    float *d_out = dev_copy(o0), *d_lse = dev_copy(l0), *d_cs = dev_copy(cs0);
    KCALL(kern_attn_prefill(d_out, KERN_F32, d_lse, d_q, q_stride, D.view(P), d_tab, n_kv, d_qpos,
                            n_q, n_heads, scale, window, 0));
    auto go = host_copy(d_out, ref_out.size());
    auto gl = host_copy(d_lse, ref_lse.size());
    bool ok = close_enough(name, go.data(), ref_out.data(), ref_out.size(), 2e-5, 2e-4);
    ok = close_enough("lse", gl.data(), ref_lse.data(), ref_lse.size(), 1e-5, 1e-5) && ok;
    report(name, ok);

    KCALL(kern_attn_prefill_scores(D.score, d_cs, cs_len, score_from, d_q, q_stride, d_lse, D.view(P),
                                   d_tab, n_kv, d_qpos, n_q, n_heads, scale, window, 0));
    auto gc = host_copy(d_cs, cs0.size());
    auto gs = host_copy(D.score, P.score.size());
    char cname[96];
    snprintf(cname, sizeof cname, "scores_%s", name);
    bool cok = close_enough("colsum", gc.data(), ref_cs.data(), ref_cs.size(), 1e-5, 1e-4);
    cok = close_enough("score", gs.data(), ref_score.data(), ref_score.size(), 1e-5, 1e-4) && cok;
    report(cname, cok);

    /* bf16 output path of the same chunk. */
    KCALL(kern_attn_prefill(d_out, KERN_BF16, NULL, d_q, q_stride, D.view(P), d_tab, n_kv, d_qpos,
                            n_q, n_heads, scale, window, 0));
    auto gb = bf_to_f(host_copy((kern_bf16 *)d_out, ref_out.size()));
    char bname[96];
    snprintf(bname, sizeof bname, "%s_bf16", name);
    report(bname, close_enough(bname, gb.data(), ref_out.data(), ref_out.size(), 2e-5, 1e-2));
    free_pool(D);
    cudaFree(d_tab);
    cudaFree(d_qpos);
    cudaFree(d_q);
    cudaFree(d_out);
    cudaFree(d_lse);
    cudaFree(d_cs);
}

static void test_attn_shape_checks(void) {
    kern_kv_view kv{(const kern_bf16 *)16, (const kern_bf16 *)16, (const int32_t *)16, 16, 1, 128};
    float dummy_q = 0;
    int32_t dummy_i = 0;
    bool ok = kern_attn_prefill(&dummy_q, KERN_F32, NULL, &dummy_q, 16 * 128, kv, &dummy_i, 1,
                                &dummy_i, 1, 16, 1.0f, 0, 0) == D2_EINVAL; /* group 16 > 8 */
    kv.n_kv_heads = 2;
    kv.head_dim = 512;
    ok = ok && kern_attn_prefill(&dummy_q, KERN_F32, NULL, &dummy_q, 4 * 512, kv, &dummy_i, 1,
                                 &dummy_i, 1, 4, 1.0f, 0, 0) == D2_EINVAL; /* head_dim > 256 */
    report("attn_shape_checks", ok);
}

/* ---- sampling ---- */

static void test_sampling(void) {
    const int rows = 5, vocab = 32003, stride = 32010;
    auto x = rnd_vec((size_t)rows * stride, -10, 10);
    /* row 0: a tie between 31000 and 7 -> 7; row 1: NaN next to the max;
     * row 2: all -inf -> 0; row 3: max at the last id; row 4: plain. */
    x[31000] = 50;
    x[7] = 50;
    x[(size_t)stride + 100] = NAN;
    x[(size_t)stride + 101] = 40;
    for (int i = 0; i < vocab; i++) x[(size_t)2 * stride + i] = -INFINITY;
    x[(size_t)3 * stride + vocab - 1] = 30;
    x[(size_t)3 * stride + vocab] = 99; /* padding past vocab: must be ignored */
    std::vector<int32_t> want(rows);
    for (int r = 0; r < rows; r++) {
        int bi = 0;
        float bv = -INFINITY;
        bool any = false;
        for (int i = 0; i < vocab; i++) {
            float v = x[(size_t)r * stride + i];
            if (isnan(v)) continue;
            if (!any || v > bv) {
                bv = v;
                bi = i;
                any = true;
            }
        }
        want[r] = bi;
    }
    float *d_x = dev_copy(x);
    std::vector<int32_t> z(rows, -5);
    int32_t *d_am = dev_copy(z);
    KCALL(kern_argmax(d_am, d_x, rows, vocab, stride, 0));
    auto got = host_copy(d_am, rows);
    bool ok = got == want && want[0] == 7 && want[1] == 101 && want[2] == 0 && want[3] == vocab - 1;
    if (!ok)
        for (int r = 0; r < rows; r++) printf("  argmax row %d: got %d want %d\n", r, got[r], want[r]);
    report("argmax", ok);

    /* Softmax / log-softmax on rows 3 and 4 (finite rows) and row 2 (all -inf). */
    const float t = 1.0f / 0.7f;
    const int r0 = 2, nr = 3;
    std::vector<double> ref_p((size_t)nr * vocab), ref_lp((size_t)nr * vocab), ref_lse(nr), ref_lse1(nr);
    for (int r = 0; r < nr; r++) {
        const float *xr = &x[(size_t)(r0 + r) * stride];
        double m = -INFINITY, m1 = -INFINITY;
        for (int i = 0; i < vocab; i++) {
            m = fmax(m, (double)(t * xr[i]));
            m1 = fmax(m1, (double)xr[i]);
        }
        double z1 = 0, zt = 0;
        for (int i = 0; i < vocab; i++) {
            zt += xr[i] == -INFINITY ? 0 : exp((double)(t * xr[i]) - m);
            z1 += xr[i] == -INFINITY ? 0 : exp((double)xr[i] - m1);
        }
        ref_lse[r] = zt > 0 ? m + log(zt) : -INFINITY;
        ref_lse1[r] = z1 > 0 ? m1 + log(z1) : -INFINITY;
        for (int i = 0; i < vocab; i++) {
            ref_p[(size_t)r * vocab + i] = zt > 0 && xr[i] != -INFINITY ? exp((double)(t * xr[i]) - m) / zt : 0;
            /* log of probability 0 is -inf, also in a row of only -inf */
            ref_lp[(size_t)r * vocab + i] = z1 > 0 ? (double)xr[i] - ref_lse1[r] : -INFINITY;
        }
    }
    std::vector<float> o((size_t)nr * vocab), l(nr);
    float *d_o = dev_copy(o), *d_l = dev_copy(l);
    const float *d_rows = d_x + (size_t)r0 * stride;
    KCALL(kern_softmax(d_o, d_l, d_rows, nr, vocab, stride, t, 0));
    auto gp = host_copy(d_o, o.size());
    auto gl = host_copy(d_l, nr);
    ok = close_enough("softmax", gp.data(), ref_p.data(), gp.size(), 1e-9, 1e-4);
    ok = close_enough("softmax_lse", gl.data(), ref_lse.data(), nr, 1e-5, 1e-5) && ok;
    report("softmax", ok);
    /* Row 2 is all -inf: its log-probabilities are -inf and its lse -inf,
     * not NaN (kernels.h). */
    KCALL(kern_log_softmax(d_o, d_l, d_rows, nr, vocab, stride, 0));
    gp = host_copy(d_o, o.size());
    gl = host_copy(d_l, nr);
    ok = close_enough("log_softmax", gp.data(), ref_lp.data(), gp.size(), 1e-4, 1e-5);
    ok = close_enough("log_softmax_lse", gl.data(), ref_lse1.data(), nr, 1e-5, 1e-5) && ok;
    report("log_softmax", ok);
    /* In place on a dense copy of rows 3..4. */
    std::vector<float> dense((size_t)2 * vocab);
    for (int r = 0; r < 2; r++)
        memcpy(&dense[(size_t)r * vocab], &x[(size_t)(3 + r) * stride], vocab * sizeof(float));
    float *d_dense = dev_copy(dense);
    KCALL(kern_softmax(d_dense, NULL, d_dense, 2, vocab, vocab, t, 0));
    gp = host_copy(d_dense, dense.size());
    report("softmax_inplace", close_enough("softmax_ip", gp.data(), ref_p.data() + vocab, dense.size(), 1e-9, 1e-4));
    cudaFree(d_x);
    cudaFree(d_am);
    cudaFree(d_o);
    cudaFree(d_l);
    cudaFree(d_dense);
}

int main(void) {
    int n_dev = 0;
    cudaError_t e = cudaGetDeviceCount(&n_dev);
    if (e != cudaSuccess || n_dev == 0) {
        printf("skip: no CUDA device (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "count 0");
        printf("gpu: 0 passed, 0 failed, 1 skipped\n");
        return 0;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);

    test_embed();
    test_rmsnorm();
    test_rope_one(1);
    test_rope_one(0);
    test_swiglu();
    test_add();
    test_kv_write();
    test_many_rows();

    test_decode("decode_gqa4_hd128", 8, 2, 128, KERN_F32, true, 0, true);
    test_decode("decode_mha_hd64", 4, 4, 64, KERN_F32, true, 0);
    test_decode("decode_gqa8_hd256", 8, 1, 256, KERN_F32, true, 0);
    test_decode("decode_gqa4_bf16_noscore", 8, 2, 128, KERN_BF16, false, 0);
    test_decode("decode_gqa4_window101", 8, 2, 128, KERN_F32, true, 101); /* Mistral-style */
    test_decode("decode_gqa8_hd256_score_from", 8, 1, 256, KERN_BF16, true, 0, true);
    test_decode("decode_gqa4_tab_row", 8, 2, 128, KERN_F32, true, 0, true, true);
    test_decode("decode_gqa4_live_count", 8, 2, 128, KERN_F32, true, 0, true, true, true);
    test_decode("decode_gqa4_bf16_live_count_noscore", 8, 2, 128, KERN_BF16, false, 0, false, false, true);
    test_decode("decode_gqa4_live_count_no_work_list", 8, 2, 128, KERN_F32, true, 0, true, true, true, true);
    test_decode("decode_gqa4_no_work_list", 8, 2, 128, KERN_F32, true, 0, true, false, false, true);
    test_decode_live_stride();
    test_patch_i32();
    test_decode_bounds();
    test_prefill("prefill_gqa4_hd128", 8, 2, 128, 137, 37, 0);
    test_prefill("prefill_mha_hd64", 2, 2, 64, 50, 50, 0);
    test_prefill("prefill_gqa8_hd256", 8, 1, 256, 70, 33, 0);
    test_prefill("prefill_gqa4_window40", 8, 2, 128, 137, 37, 40);
    /* SnapKV's observation window (only the last queries score) and a
     * colsum cut below the highest key position */
    test_prefill("prefill_gqa4_score_from_cut", 8, 2, 128, 137, 37, 0, 270, 250);
    test_attn_shape_checks();

    test_sampling();

    printf("gpu: %d passed, %d failed, 0 skipped\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
