/*
 * kernels/sample.cu — row ops on the logits for sampling and logprobs:
 * argmax (greedy, lowest id among ties), softmax with inverse temperature and
 * log-softmax, each one CTA per row. The host sampler (engine/) still does
 * top-k / top-p on the probabilities; these produce them without copying a
 * whole vocabulary of logits when only a token id or a few logprobs are needed.
 *
 * NaN: argmax never picks a NaN (comparisons with NaN are false). Softmax of a
 * row holding NaN yields NaN, as the CPU code would. A row whose values are
 * all -inf gives probabilities 0 and lse -inf (not NaN).
 *
 * Engine thread only; entries never allocate, synchronise or log.
 */
#include <limits.h>

#include "kernels/common.cuh"

#define SAMPLE_THREADS 256

/* Better candidate: larger value, or equal value and smaller id. */
__device__ __forceinline__ bool am_better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

static __global__ void __launch_bounds__(SAMPLE_THREADS)
argmax_kernel(int32_t *out, const float *logits, int vocab, int row_stride) {
    __shared__ float s_v[SAMPLE_THREADS / KERN_WARP];
    __shared__ int s_i[SAMPLE_THREADS / KERN_WARP];
    const float *x = logits + (int64_t)blockIdx.x * row_stride;
    float bv = -INFINITY;
    int bi = INT_MAX;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
        float v = x[i];
        if (am_better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
#pragma unroll
    for (int o = KERN_WARP / 2; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (am_better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    const int lane = threadIdx.x % KERN_WARP, warp = threadIdx.x / KERN_WARP;
    if (lane == 0) {
        s_v[warp] = bv;
        s_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < SAMPLE_THREADS / KERN_WARP; w++)
            if (am_better(s_v[w], s_i[w], bv, bi)) {
                bv = s_v[w];
                bi = s_i[w];
            }
        out[blockIdx.x] = bi == INT_MAX ? 0 : bi; /* INT_MAX: only NaN seen */
    }
}

extern "C" int kern_argmax(int32_t *out, const float *logits, int n_rows, int vocab,
                           int row_stride, kern_stream s) {
    KERN_REQUIRE(out && logits && n_rows >= 0 && vocab > 0 && row_stride >= vocab);
    if (n_rows == 0) return D2_OK;
    argmax_kernel<<<n_rows, SAMPLE_THREADS, 0, s>>>(out, logits, vocab, row_stride);
    KERN_LAUNCH_CHECK("argmax_kernel");
    return D2_OK;
}

/* mode 0: softmax of t*x; mode 1: log-softmax (t = 1). Three passes over the
 * row (max, sum, write); the row is re-read from L2 rather than held. */
static __global__ void __launch_bounds__(SAMPLE_THREADS)
softmax_kernel(float *out, float *lse, const float *logits, int vocab, int row_stride,
               float t, int log_mode) {
    __shared__ float scratch[KERN_WARP];
    const float *x = logits + (int64_t)blockIdx.x * row_stride;
    float *y = out + (int64_t)blockIdx.x * vocab;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) m = fmaxf(m, t * x[i]);
    m = kern_block_max(m, scratch);
    float z = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) z += kern_exp_sub(t * x[i], m);
    z = kern_block_sum(z, scratch);
    float ls = z > 0.0f ? m + logf(z) : -INFINITY;
    if (lse && threadIdx.x == 0) lse[blockIdx.x] = ls;
    /* In place (out == logits, row_stride == vocab): each element is read and
     * written by the same thread, after both reductions. */
    if (log_mode) {
        /* A row of only -inf: every log-probability is -inf (x - lse would be
         * -inf - -inf = NaN). */
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS)
            y[i] = ls == -INFINITY ? -INFINITY : x[i] - ls;
    } else {
        float inv = z > 0.0f ? 1.0f / z : 0.0f;
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS)
            y[i] = kern_exp_sub(t * x[i], m) * inv;
    }
}

static int softmax_entry(float *out, float *lse, const float *logits, int n_rows, int vocab,
                         int row_stride, float t, int log_mode, cudaStream_t s) {
    KERN_REQUIRE(out && logits && n_rows >= 0 && vocab > 0 && row_stride >= vocab);
    KERN_REQUIRE((const void *)out != (const void *)logits || row_stride == vocab);
    if (n_rows == 0) return D2_OK;
    softmax_kernel<<<n_rows, SAMPLE_THREADS, 0, s>>>(out, lse, logits, vocab, row_stride, t,
                                                     log_mode);
    KERN_LAUNCH_CHECK("softmax_kernel");
    return D2_OK;
}

extern "C" int kern_softmax(float *out, float *lse, const float *logits, int n_rows, int vocab,
                            int row_stride, float inv_temp, kern_stream s) {
    return softmax_entry(out, lse, logits, n_rows, vocab, row_stride, inv_temp, 0, s);
}

extern "C" int kern_log_softmax(float *out, float *lse, const float *logits, int n_rows,
                                int vocab, int row_stride, kern_stream s) {
    return softmax_entry(out, lse, logits, n_rows, vocab, row_stride, 1.0f, 1, s);
}

/* ---- kern_sample: temperature / top-k / top-p / min-p draws -------------------------
 *
 * The same numbers as the host sampler (engine/sample.c) for the same uniform
 * u: every value that decides the token is computed in the same order with
 * the same roundings, so the token is bit-for-bit the host's (contract in
 * kernels.h). The floating-point operations that matter are written with
 * __f*_rn intrinsics where nvcc could otherwise fuse a multiply and an add
 * into an fma (the host build does not contract: -std=c11 / -std=c++17). */

#define SAMPLE_BLK 64        /* engine/sample.c BLK: the draw walks 64-token block sums */
#define SAMPLE_EXP_FLOOR (-86.0f)

/* engine/sample.c exp_nonpos, operation for operation. */
__device__ __forceinline__ float samp_exp_nonpos(float x) {
    const float shifter = 12582912.0f;
    uint32_t keep = 0u - (uint32_t)(x >= SAMPLE_EXP_FLOOR);
    float xc = __uint_as_float((__float_as_uint(x) & keep) |
                               (__float_as_uint(SAMPLE_EXP_FLOOR) & ~keep));
    float t = __fadd_rn(__fmul_rn(xc, 1.44269504f), shifter);
    float n = __fsub_rn(t, shifter);
    uint32_t nbits = (__float_as_uint(t) - __float_as_uint(shifter)) << 23;
    float r = __fsub_rn(xc, __fmul_rn(n, 0.693145751953125f));
    r = __fsub_rn(r, __fmul_rn(n, 1.428606765330187e-6f));
    float q = 1.0f / 720.0f;
    q = __fadd_rn(__fmul_rn(q, r), 1.0f / 120.0f);
    q = __fadd_rn(__fmul_rn(q, r), 1.0f / 24.0f);
    q = __fadd_rn(__fmul_rn(q, r), 1.0f / 6.0f);
    q = __fadd_rn(__fmul_rn(q, r), 0.5f);
    q = __fadd_rn(__fmul_rn(q, r), 1.0f);
    q = __fadd_rn(__fmul_rn(q, r), 1.0f);
    return __uint_as_float((__float_as_uint(q) + nbits) & keep);
}

/* The probability weight of a token in the full-vocabulary draw. */
__device__ __forceinline__ float samp_p(float v, float m, float inv_t, float min_p) {
    float e = samp_exp_nonpos(__fmul_rn(__fsub_rn(v, m), inv_t));
    return e >= min_p ? e : 0.0f;
}

/* engine/sample.c block_sum over the 64 weights of block b. */
static __device__ float samp_block_sum(const float *x, int b, float m, float inv_t, float min_p) {
    const float *p = x + (int64_t)b * SAMPLE_BLK;
    float t[16];
    for (int j = 0; j < 16; j++)
        t[j] = __fadd_rn(__fadd_rn(samp_p(p[j], m, inv_t, min_p), samp_p(p[j + 16], m, inv_t, min_p)),
                         __fadd_rn(samp_p(p[j + 32], m, inv_t, min_p), samp_p(p[j + 48], m, inv_t, min_p)));
    for (int j = 0; j < 8; j++) t[j] = __fadd_rn(t[j], t[j + 8]);
    for (int j = 0; j < 4; j++) t[j] = __fadd_rn(t[j], t[j + 4]);
    return __fadd_rn(__fadd_rn(t[0], t[2]), __fadd_rn(t[1], t[3]));
}

/* Order-preserving key of a logit: a larger float has a larger key; -0 and +0
 * share one (the host compares floats, for which they are equal). */
__device__ __forceinline__ uint32_t samp_key(float v) {
    uint32_t b = __float_as_uint(v == 0.0f ? 0.0f : v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

/* Token (va, ia) ranks before (vb, ib): higher logit, or equal and lower id. */
__device__ __forceinline__ bool samp_before(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

struct samp_shared {
    float v[KERN_SAMPLE_MAX_K];
    int id[KERN_SAMPLE_MAX_K];
    float pc[KERN_SAMPLE_MAX_K];
    uint32_t hist[256];
    uint32_t warp_cnt[SAMPLE_THREADS / KERN_WARP];
    float red[KERN_WARP];
    uint32_t prefix, mask, want, n_gt, taken;
    int bad;
};

/* The key of the k-th best token (radix select, 8 bits at a time from the top). */
static __device__ uint32_t samp_kth_key(samp_shared &sh, const float *x, int vocab, int k) {
    if (threadIdx.x == 0) {
        sh.prefix = 0;
        sh.mask = 0;
        sh.want = (uint32_t)k;
    }
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += SAMPLE_THREADS) sh.hist[i] = 0;
        __syncthreads();
        const uint32_t prefix = sh.prefix, mask = sh.mask;
        for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
            uint32_t key = samp_key(x[i]);
            if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t want = sh.want, d = 255;
            for (;; d--) { /* from the largest digit down */
                if (sh.hist[d] >= want || d == 0) break;
                want -= sh.hist[d];
            }
            sh.want = want;
            sh.prefix = prefix | (d << shift);
            sh.mask = mask | (255u << shift);
        }
        __syncthreads();
    }
    return sh.prefix;
}

/* The k best tokens into sh.v/sh.id[0..k), best first. */
static __device__ void samp_top_k(samp_shared &sh, const float *x, int vocab, int k) {
    const uint32_t kk = samp_kth_key(sh, x, vocab, k);
    if (threadIdx.x == 0) {
        sh.n_gt = 0;
        sh.taken = 0;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
        if (samp_key(x[i]) > kk) {
            uint32_t at = atomicAdd(&sh.n_gt, 1u);
            sh.v[at] = x[i];
            sh.id[at] = i;
        }
    }
    __syncthreads();
    /* Ties at the k-th key: the lowest ids, gathered in id order. */
    const uint32_t need = (uint32_t)k - sh.n_gt;
    const int lane = threadIdx.x % KERN_WARP, warp = threadIdx.x / KERN_WARP;
    for (int base = 0; base < vocab; base += SAMPLE_THREADS) {
        const uint32_t taken = sh.taken;
        if (taken >= need) break; /* uniform: read after the barrier below */
        int i = base + threadIdx.x;
        bool eq = i < vocab && samp_key(x[i]) == kk;
        unsigned bal = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) sh.warp_cnt[warp] = (uint32_t)__popc(bal);
        __syncthreads();
        uint32_t before = taken + (uint32_t)__popc(bal & ((1u << lane) - 1u));
        for (int w = 0; w < warp; w++) before += sh.warp_cnt[w];
        if (eq && before < need) {
            sh.v[sh.n_gt + before] = x[i];
            sh.id[sh.n_gt + before] = i;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint32_t t = sh.taken;
            for (int w = 0; w < SAMPLE_THREADS / KERN_WARP; w++) t += sh.warp_cnt[w];
            sh.taken = t;
        }
        __syncthreads();
    }
    /* Bitonic sort of the k candidates (padded to a power of two) by rank. */
    int n2 = 1;
    while (n2 < k) n2 <<= 1;
    for (int i = k + threadIdx.x; i < n2; i += SAMPLE_THREADS) {
        sh.v[i] = -INFINITY;
        sh.id[i] = INT_MAX;
    }
    __syncthreads();
    for (int size = 2; size <= n2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = threadIdx.x; i < n2; i += SAMPLE_THREADS) {
                int j = i ^ stride;
                if (j <= i) continue;
                bool up = (i & size) == 0; /* this run: best first */
                bool swap = up ? samp_before(sh.v[j], sh.id[j], sh.v[i], sh.id[i])
                               : samp_before(sh.v[i], sh.id[i], sh.v[j], sh.id[j]);
                if (swap) {
                    float tv = sh.v[i];
                    sh.v[i] = sh.v[j];
                    sh.v[j] = tv;
                    int ti = sh.id[i];
                    sh.id[i] = sh.id[j];
                    sh.id[j] = ti;
                }
            }
            __syncthreads();
        }
    }
}

/* engine/sample.c draw_small over sh.v/sh.id/sh.pc[0..n), thread 0 only. */
static __device__ int32_t samp_draw_small(const samp_shared &sh, int n, float top_p, float min_p,
                                   double u) {
    double mass = 0;
    for (int j = 0; j < n; j++) mass += (double)sh.pc[j];
    double top_p_mass = top_p < 1.0f ? (double)top_p * mass : 0.0;
    int cut = n;
    if (top_p_mass > 0) {
        double run = 0;
        for (int j = 0; j < n; j++) {
            run += (double)sh.pc[j];
            if (run >= top_p_mass) {
                cut = j + 1;
                break;
            }
        }
    }
    double total = 0;
    for (int j = 0; j < cut; j++)
        if (sh.pc[j] >= min_p) total += (double)sh.pc[j];
    const double target = u * total;
    double run = 0;
    int32_t last = sh.id[0];
    for (int j = 0; j < cut; j++) {
        if (!(sh.pc[j] >= min_p) || sh.pc[j] <= 0.0f) continue;
        run += (double)sh.pc[j];
        last = sh.id[j];
        if (run > target) return sh.id[j];
    }
    return last;
}

/* engine/sample.c draw without a truncation key, thread 0 only; bsum[b] holds
 * block b's samp_block_sum. */
static __device__ int32_t samp_draw_full(const float *x, int vocab, const float *bsum, float m,
                                  float inv_t, float min_p, double u) {
    const int nblk = vocab / SAMPLE_BLK;
    double total = 0;
    for (int b = 0; b < nblk; b++) total += (double)bsum[b];
    for (int i = nblk * SAMPLE_BLK; i < vocab; i++) total += (double)samp_p(x[i], m, inv_t, min_p);
    const double target = u * total;
    double run = 0;
    for (int b = 0; b < nblk; b++) {
        float bs = bsum[b];
        if (run + (double)bs <= target) {
            run += (double)bs;
            continue;
        }
        double r2 = run;
        int32_t lastpos = -1;
        for (int j = 0; j < SAMPLE_BLK; j++) {
            float p = samp_p(x[b * SAMPLE_BLK + j], m, inv_t, min_p);
            if (p <= 0.0f) continue;
            r2 += (double)p;
            lastpos = b * SAMPLE_BLK + j;
            if (r2 > target) return lastpos;
        }
        if (lastpos >= 0) return lastpos;
        run += (double)bs;
    }
    for (int i = nblk * SAMPLE_BLK; i < vocab; i++) {
        float p = samp_p(x[i], m, inv_t, min_p);
        if (p <= 0.0f) continue;
        run += (double)p;
        if (run > target) return i;
    }
    for (int i = vocab - 1; i >= 0; i--)
        if (samp_p(x[i], m, inv_t, min_p) > 0.0f) return i;
    for (int i = 0; i < vocab; i++) /* the first maximum (unreachable, as on the host) */
        if (x[i] == m) return i;
    return 0;
}

static __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_kernel(int32_t *out, const float *logits, int row_stride, int vocab,
              const kern_sample_param *prm, float *ws, int ws_stride) {
    __shared__ samp_shared sh;
    const kern_sample_param P = prm[blockIdx.x];
    const float *x = logits + (int64_t)P.row * row_stride;
    /* the maximum, and whether the row holds NaN or +inf (the host refuses it) */
    float m = -INFINITY;
    int bad = 0;
    for (int i = threadIdx.x; i < vocab; i += SAMPLE_THREADS) {
        float v = x[i];
        bad |= !(v == v) || v == INFINITY;
        m = fmaxf(m, v);
    }
    if (threadIdx.x == 0) sh.bad = 0;
    m = kern_block_max(m, sh.red);
    if (bad) atomicAdd(&sh.bad, 1);
    __syncthreads();
    if (sh.bad || m == -INFINITY) {
        if (threadIdx.x == 0) out[blockIdx.x] = -1;
        return;
    }
    const float inv_t = P.inv_temp, min_p = P.min_p;
    if (P.top_k == 0) {
        float *bsum = ws + (int64_t)blockIdx.x * ws_stride;
        for (int b = threadIdx.x; b < vocab / SAMPLE_BLK; b += SAMPLE_THREADS)
            bsum[b] = samp_block_sum(x, b, m, inv_t, min_p);
        __syncthreads(); /* global writes of this block are visible to it after the barrier */
        if (threadIdx.x == 0) out[blockIdx.x] = samp_draw_full(x, vocab, bsum, m, inv_t, min_p, P.u);
        return;
    }
    const int k = P.top_k;
    if (k < 2 || k > KERN_SAMPLE_MAX_K || k >= vocab) { /* not a draw the host makes this way */
        if (threadIdx.x == 0) out[blockIdx.x] = -1;
        return;
    }
    samp_top_k(sh, x, vocab, k);
    for (int j = threadIdx.x; j < k; j += SAMPLE_THREADS)
        sh.pc[j] = samp_exp_nonpos(__fmul_rn(__fsub_rn(sh.v[j], m), inv_t));
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = samp_draw_small(sh, k, P.top_p, min_p, P.u);
}

extern "C" size_t kern_sample_ws_floats(int n, int vocab) {
    return n > 0 && vocab > 0 ? (size_t)n * (size_t)(vocab / SAMPLE_BLK + 1) : 0;
}

extern "C" int kern_sample(int32_t *out, const float *logits, int row_stride, int vocab,
                           const kern_sample_param *params, int n, float *ws, kern_stream s) {
    KERN_REQUIRE(out && logits && params && ws && n >= 0 && vocab > 0 && row_stride >= vocab);
    if (n == 0) return D2_OK;
    sample_kernel<<<n, SAMPLE_THREADS, 0, s>>>(out, logits, row_stride, vocab, params, ws,
                                               vocab / SAMPLE_BLK + 1);
    KERN_LAUNCH_CHECK("sample_kernel");
    return D2_OK;
}
