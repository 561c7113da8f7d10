/*
 * kernels/common.cuh — internal helpers shared by the .cu files of kernels/:
 * the error capture behind KERN_LAUNCH_CHECK / KERN_CUDA_TRY, bf16
 * conversions, warp and block reductions. Not part of the C interface;
 * include only from .cu files.
 *
 * Errors: an entry never logs (style-anchors (b)4, (b)7). When a CUDA call or
 * a launch fails, the macros store the statement text, function, file, line
 * and error in a thread-local record and make the entry return D2_ECUDA; the
 * engine reads the record with kern_last_error() and logs it once.
 */
#ifndef D2_KERNELS_COMMON_CUH
#define D2_KERNELS_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels/kernels.h"

/* ---- error capture ---- */

struct kern_err_rec {
    const char *stmt = "";
    const char *func = "";
    const char *file = "";
    int line = 0;
    int code = 0;
};

/* One record per thread shared by every translation unit (an inline
 * function's static local has a single definition program-wide). */
inline kern_err_rec &kern__err_rec() {
    static thread_local kern_err_rec r;
    return r;
}

inline void kern__err_set(cudaError_t e, const char *stmt, const char *func, const char *file,
                          int line) {
    kern_err_rec &r = kern__err_rec();
    r.stmt = stmt;
    r.func = func;
    r.file = file;
    r.line = line;
    r.code = (int)e;
}

/* Runs a CUDA runtime call; on failure records it and returns D2_ECUDA from
 * the enclosing entry. */
#define KERN_CUDA_TRY(stmt)                                                    \
    do {                                                                       \
        cudaError_t kern_e_ = (stmt);                                          \
        if (kern_e_ != cudaSuccess) {                                          \
            kern__err_set(kern_e_, #stmt, __func__, __FILE__, __LINE__);       \
            return D2_ECUDA;                                                   \
        }                                                                      \
    } while (0)

/* After a <<<...>>> launch: a bad configuration shows up here at once.
 * `name` is a string literal naming the kernel. */
#define KERN_LAUNCH_CHECK(name)                                                \
    do {                                                                       \
        cudaError_t kern_e_ = cudaGetLastError();                              \
        if (kern_e_ != cudaSuccess) {                                          \
            kern__err_set(kern_e_, "launch " name, __func__, __FILE__, __LINE__); \
            return D2_ECUDA;                                                   \
        }                                                                      \
    } while (0)

/* Shape checks of entries: D2_EINVAL, nothing launched. */
#define KERN_REQUIRE(cond)                                                     \
    do {                                                                       \
        if (!(cond)) return D2_EINVAL;                                         \
    } while (0)

/* ---- bf16 ---- */

__device__ __forceinline__ float kern_bf2f(kern_bf16 b) {
    return __uint_as_float(((uint32_t)b) << 16);
}

/* Round to nearest even; NaN stays a (quiet) NaN. Same rounding as the
 * host's kern_host_f2bf, so CPU references can predict results exactly. */
__device__ __forceinline__ kern_bf16 kern_f2bf(float f) {
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (kern_bf16)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (kern_bf16)(u >> 16);
}

static inline float kern_host_bf2f(kern_bf16 b) {
    uint32_t u = ((uint32_t)b) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline kern_bf16 kern_host_f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (kern_bf16)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (kern_bf16)(u >> 16);
}

/* Stores v to element i of an fp32 or bf16 output. */
__device__ __forceinline__ void kern_store(void *out, kern_dtype dt, int64_t i, float v) {
    if (dt == KERN_BF16)
        ((kern_bf16 *)out)[i] = kern_f2bf(v);
    else
        ((float *)out)[i] = v;
}

/* ---- reductions ---- */

#define KERN_WARP 32

__device__ __forceinline__ float kern_warp_sum(float v) {
#pragma unroll
    for (int o = KERN_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float kern_warp_max(float v) {
#pragma unroll
    for (int o = KERN_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Block-wide sum / max; every thread gets the result. blockDim.x must be a
 * multiple of 32 and <= 1024; scratch holds 32 floats. Contains
 * __syncthreads(), so every thread of the block must call it. */
__device__ __forceinline__ float kern_block_sum(float v, float *scratch) {
    int lane = threadIdx.x % KERN_WARP, warp = threadIdx.x / KERN_WARP;
    int n_warps = blockDim.x / KERN_WARP;
    v = kern_warp_sum(v);
    __syncthreads(); /* scratch may still be read by a previous call */
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    return kern_warp_sum(v);
}

__device__ __forceinline__ float kern_block_max(float v, float *scratch) {
    int lane = threadIdx.x % KERN_WARP, warp = threadIdx.x / KERN_WARP;
    int n_warps = blockDim.x / KERN_WARP;
    v = kern_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : -INFINITY;
    return kern_warp_max(v);
}

/* exp(x - m) that is 0 when x is -inf (also when m is -inf: no NaN). */
__device__ __forceinline__ float kern_exp_sub(float x, float m) {
    return x == -INFINITY ? 0.0f : expf(x - m);
}

#endif
