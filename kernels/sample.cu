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
