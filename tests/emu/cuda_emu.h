/*
 * tests/emu/cuda_emu.h — the CUDA emulator's view for device and host code:
 * what a .cu file of this project sees instead of the CUDA toolkit when it is
 * built with g++ for `make test-gpu-emu` (tests/emu/README). Included through
 * the wrapper headers in tests/emu/include/ (cuda_runtime.h, cuda_bf16.h,
 * cuda_fp16.h, mma.h), never by hand.
 *
 * Model: every kernel launch runs at once, on the calling thread, block
 * after block; the threads of a block are fibers (tests/emu/cuda_emu.cpp)
 * that switch only at __syncthreads, at warp-synchronous operations
 * (__shfl*_sync, __ballot_sync, votes, __syncwarp, wmma) and at exit. So
 * device memory is the host heap, atomics are plain read-modify-writes, and
 * streams and events are synchronous no-ops -- except that a stream in
 * capture (cudaStreamBeginCapture) records its work instead, and a graph
 * launch replays it on the calling thread.
 *
 * Checks (an error prints the kernel, block, thread and file:line, then
 * aborts): a __syncthreads reached from two places; a warp operation whose
 * mask names an exited or missing lane, or reached from different places;
 * deadlock (every fiber's file:line is printed); with CUDAEMU_STRICT=1 a
 * __syncthreads after some thread of the block exited. Launch limits give
 * the launch error a GPU gives, through cudaGetLastError().
 *
 * Sites of barriers come from __builtin_FILE/__builtin_LINE default
 * arguments, so they name the kernel source line (tests/emu/rewrite.pl keeps
 * line numbers and file names).
 */
#ifndef D2_CUDA_EMU_H
#define D2_CUDA_EMU_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#define CUDAEMU 1

/* ---- qualifiers ---- */
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
/* Static shared memory: one copy per variable (blocks run one after
 * another), gathered in one section so every block start can poison it. */
#define __shared__ static __attribute__((section("emu_shared")))

/* ---- vector types ---- */
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

/* ---- runtime types ---- */
enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevicePointer = 17,
    cudaErrorInvalidMemcpyDirection = 21,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorInvalidResourceHandle = 400,
    cudaErrorIllegalState = 401,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
typedef struct CUgraph_st *cudaGraph_t;
typedef struct CUgraphExec_st *cudaGraphExec_t;
enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2,
};
enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2,
};
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
    cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
#define cudaStreamNonBlocking 0x01
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault 0x00

/* The fields of cudaDeviceProp this project reads, with an H100 SXM's values. */
struct cudaDeviceProp {
    char name[256];
    size_t totalGlobalMem;
    size_t sharedMemPerBlock;
    size_t sharedMemPerBlockOptin;
    size_t sharedMemPerMultiprocessor;
    int regsPerBlock;
    int warpSize;
    int maxThreadsPerBlock;
    int maxThreadsDim[3];
    int maxGridSize[3];
    int major, minor;
    int multiProcessorCount;
    int maxThreadsPerMultiProcessor;
    int l2CacheSize;
    int memoryBusWidth;
    int clockRate;
    int memoryClockRate;
};

extern "C++" {
cudaError_t cudaMalloc(void **p, size_t n);
template <class T> static inline cudaError_t cudaMalloc(T **p, size_t n) {
    return cudaMalloc((void **)p, n);
}
cudaError_t cudaFree(void *p);
cudaError_t cudaMallocHost(void **p, size_t n);
cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags);
cudaError_t cudaFreeHost(void *p);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k,
                            cudaStream_t s = 0);
cudaError_t cudaMemset(void *p, int v, size_t n);
cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s = 0);
cudaError_t cudaMemGetInfo(size_t *free_b, size_t *total_b);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaDeviceReset(void);
cudaError_t cudaGetDeviceCount(int *n);
cudaError_t cudaGetDevice(int *d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char *cudaGetErrorString(cudaError_t e);
const char *cudaGetErrorName(cudaError_t e);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned flags = 0);
cudaError_t cudaEventCreate(cudaEvent_t *e);
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t cudaEventDestroy(cudaEvent_t e);
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0);
cudaError_t cudaEventSynchronize(cudaEvent_t e);
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b);
cudaError_t cudaFuncSetAttribute(const void *func, cudaFuncAttribute attr, int value);
/* Stream capture and graphs (tests/emu/README, "Stream capture"). */
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g);
cudaError_t cudaStreamIsCapturing(cudaStream_t s, cudaStreamCaptureStatus *status);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *e, cudaGraph_t g, unsigned long long flags = 0);
cudaError_t cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t e);
cudaError_t cudaGraphDestroy(cudaGraph_t g);
template <class F> static inline cudaError_t cudaFuncSetAttribute(F *func, cudaFuncAttribute attr,
                                                                  int value) {
    return cudaFuncSetAttribute((const void *)func, attr, value);
}
}

/* ---- emulator internals the device functions call ---- */
namespace emu {

struct fiber {
    uint3 tid;
    int lin, warp, lane;
};
extern fiber *g_cur;       /* the running fiber */
extern uint3 g_blockIdx;   /* the running block */
extern dim3 g_blockDim, g_gridDim;
extern void *g_dyn_smem;   /* this block's dynamic shared memory */

enum warp_kind {
    W_SHFL_IDX, W_SHFL_UP, W_SHFL_DOWN, W_SHFL_XOR, W_BALLOT, W_ANY, W_ALL, W_SYNC,
    W_WMMA_LOAD, W_WMMA_STORE, W_WMMA_MMA, W_KIND_COUNT
};
/* A warp-synchronous operation of the running lane: waits until every lane of
 * mask arrived at the same site, then returns this lane's result (a shuffle's
 * source value, a ballot mask; raw bits). ptr/param are compared across lanes
 * for wmma loads/stores. */
uint64_t warp_op(int kind, uint32_t mask, uint64_t val, int param, int width, const void *ptr,
                 const char *file, int line);
/* The fused multiply-add of a wmma::mma_sync: the completing lane computes
 * d = a * b + c once from lane 0's operands and copies d to every lane. */
void warp_mma(void *d, const void *a, const void *b, const void *c, int nbytes_d, int nbytes_a,
              int nbytes_b, void (*compute)(void *d, const void *a, const void *b, const void *c),
              const char *file, int line);
void syncthreads(const char *file, int line);
[[noreturn]] void fail(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Launch: checks the configuration (a failure becomes the next
 * cudaGetLastError(), nothing runs), then runs every block. */
bool launch_check(const void *kernel, const char *name, dim3 g, dim3 b, size_t smem);
void run_grid(const void *kernel, const char *name, const char *file, int line, dim3 g, dim3 b,
              size_t smem, void (*body)(void *), void *ctx);

/* Fault injection (tests/emu/README, "Injected device errors"): true when
 * this launch is the one CUDAEMU_FAIL_LAUNCH names, or the context already
 * holds a sticky error; the launch then runs nothing. */
bool launch_faulted(const char *name);
/* Makes e the next cudaGetLastError() unless an error is already pending. */
void set_last(cudaError_t e);
/* The context's sticky error (cudaSuccess when none); fault_reset() ends it
 * and restarts the launch and copy counts, as cudaDeviceReset does. */
cudaError_t sticky();
void fault_reset();

/* Stream capture: while s captures (capturing(s): active or invalidated),
 * the work enqueued on it is recorded, not run. capture_record appends op
 * to s's capture and returns cudaSuccess, or cudaErrorStreamCaptureInvalidated
 * (nothing recorded) when the capture was invalidated; call it only when
 * capturing(s). capture_invalidate marks an active capture of s invalidated
 * (an error inside it); a no-op when s does not capture. */
bool capturing(cudaStream_t s);
cudaError_t capture_record(cudaStream_t s, std::function<void()> op);
void capture_invalidate(cudaStream_t s);
/* Counters for the tests of host code's traffic (tests/emu/cuda_rt_c.cpp
 * reads them): kernels and library calls (the cuBLASLt shim's matmuls) run
 * outside graph replays, graph launches, operations (kernels, copies,
 * memsets, library calls) run by graph replays, and the copies that ran,
 * by direction (a copy in a graph counts at every replay). */
struct run_stats {
    unsigned long long kernels, lib_calls, graph_launches, graph_ops;
    unsigned long long h2d_bytes, h2d_copies, d2h_bytes, d2h_copies;
};
run_stats stats();
/* Library work (the cuBLASLt shim, C): run op now, or record it when s
 * captures; the error as capture_record's. */
cudaError_t submit_lib(cudaStream_t s, std::function<void()> op);

template <class... P> struct launcher {
    void (*k)(P...);
    const char *name, *file;
    int line;
    dim3 g, b;
    size_t smem;
    cudaStream_t s;
    typedef std::tuple<typename std::decay<P>::type...> args_t;
    static void run(void (*k)(P...), const char *name, const char *file, int line, dim3 g, dim3 b,
                    size_t smem, args_t &args) {
        if (launch_faulted(name)) return;
        auto body = [&]() { std::apply(k, args); };
        run_grid((const void *)k, name, file, line, g, b, smem,
                 [](void *c) { (*(decltype(body) *)c)(); }, &body);
    }
    template <class... A> void operator()(A &&...a) {
        static_assert(sizeof...(A) == sizeof...(P), "kernel argument count");
        args_t args(std::forward<A>(a)...);
        if (!launch_check((const void *)k, name, g, b, smem)) {
            capture_invalidate(s); /* a launch error inside a capture invalidates it */
            return;
        }
        if (capturing(s)) {
            /* recorded with its arguments copied now, as a graph's kernel node */
            auto saved = std::make_shared<args_t>(std::move(args));
            auto k_ = k;
            const char *n_ = name, *f_ = file;
            int l_ = line;
            dim3 g_ = g, b_ = b;
            size_t sm_ = smem;
            cudaError_t e = capture_record(s, [=]() { run(k_, n_, f_, l_, g_, b_, sm_, *saved); });
            if (e != cudaSuccess) set_last(e);
            return;
        }
        run(k, name, file, line, g, b, smem, args);
    }
};
template <class... P>
launcher<P...> launch(void (*k)(P...), const char *name, const char *file, int line, dim3 g,
                      dim3 b, size_t smem = 0, cudaStream_t s = 0) {
    return launcher<P...>{k, name, file, line, g, b, smem, s};
}

template <class T> static inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp op value");
    uint64_t u = 0;
    memcpy(&u, &v, sizeof v);
    return u;
}
template <class T> static inline T from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof v);
    return v;
}

} // namespace emu

#define threadIdx (emu::g_cur->tid)
#define blockIdx (emu::g_blockIdx)
#define blockDim (emu::g_blockDim)
#define gridDim (emu::g_gridDim)
static constexpr int warpSize = 32;

/* ---- synchronisation ---- */
static inline void __syncthreads(const char *f = __builtin_FILE(), int l = __builtin_LINE()) {
    emu::syncthreads(f, l);
}
static inline void __syncwarp(unsigned mask = 0xffffffffu, const char *f = __builtin_FILE(),
                              int l = __builtin_LINE()) {
    emu::warp_op(emu::W_SYNC, mask, 0, 0, 32, nullptr, f, l);
}
static inline void __threadfence(void) {}
static inline void __threadfence_block(void) {}

template <class T>
static inline T __shfl_sync(unsigned mask, T v, int src, int width = 32,
                            const char *f = __builtin_FILE(), int l = __builtin_LINE()) {
    return emu::from_bits<T>(emu::warp_op(emu::W_SHFL_IDX, mask, emu::to_bits(v), src, width,
                                          nullptr, f, l));
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32,
                               const char *f = __builtin_FILE(), int l = __builtin_LINE()) {
    return emu::from_bits<T>(emu::warp_op(emu::W_SHFL_UP, mask, emu::to_bits(v), (int)d, width,
                                          nullptr, f, l));
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32,
                                 const char *f = __builtin_FILE(), int l = __builtin_LINE()) {
    return emu::from_bits<T>(emu::warp_op(emu::W_SHFL_DOWN, mask, emu::to_bits(v), (int)d, width,
                                          nullptr, f, l));
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32,
                                const char *f = __builtin_FILE(), int l = __builtin_LINE()) {
    return emu::from_bits<T>(emu::warp_op(emu::W_SHFL_XOR, mask, emu::to_bits(v), m, width,
                                          nullptr, f, l));
}
static inline unsigned __ballot_sync(unsigned mask, int pred, const char *f = __builtin_FILE(),
                                     int l = __builtin_LINE()) {
    return (unsigned)emu::warp_op(emu::W_BALLOT, mask, pred != 0, 0, 32, nullptr, f, l);
}
static inline int __any_sync(unsigned mask, int pred, const char *f = __builtin_FILE(),
                             int l = __builtin_LINE()) {
    return (int)emu::warp_op(emu::W_ANY, mask, pred != 0, 0, 32, nullptr, f, l);
}
static inline int __all_sync(unsigned mask, int pred, const char *f = __builtin_FILE(),
                             int l = __builtin_LINE()) {
    return (int)emu::warp_op(emu::W_ALL, mask, pred != 0, 0, 32, nullptr, f, l);
}

/* ---- atomics (fibers are never preempted: plain read-modify-write) ---- */
template <class T> static inline T atomicAdd(T *p, T v) {
    T o = *p;
    *p = o + v;
    return o;
}
template <class T> static inline T atomicSub(T *p, T v) {
    T o = *p;
    *p = o - v;
    return o;
}
template <class T> static inline T atomicExch(T *p, T v) {
    T o = *p;
    *p = v;
    return o;
}
template <class T> static inline T atomicMin(T *p, T v) {
    T o = *p;
    if (v < o) *p = v;
    return o;
}
template <class T> static inline T atomicMax(T *p, T v) {
    T o = *p;
    if (v > o) *p = v;
    return o;
}
template <class T> static inline T atomicCAS(T *p, T cmp, T v) {
    T o = *p;
    if (o == cmp) *p = v;
    return o;
}
static inline unsigned atomicInc(unsigned *p, unsigned lim) {
    unsigned o = *p;
    *p = o >= lim ? 0 : o + 1;
    return o;
}

/* ---- integer and float intrinsics ---- */
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
static inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
static inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
static inline float min(float a, float b) { return fminf(a, b); }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }

static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
static inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}

static inline unsigned __float_as_uint(float f) { return emu::from_bits<unsigned>(emu::to_bits(f)); }
static inline float __uint_as_float(unsigned u) { return emu::from_bits<float>(emu::to_bits(u)); }
static inline int __float_as_int(float f) { return emu::from_bits<int>(emu::to_bits(f)); }
static inline float __int_as_float(int u) { return emu::from_bits<float>(emu::to_bits(u)); }
static inline long long __double_as_longlong(double d) {
    return emu::from_bits<long long>(emu::to_bits(d));
}
static inline double __longlong_as_double(long long u) {
    return emu::from_bits<double>(emu::to_bits(u));
}
/* Round-to-nearest single operations: the host's float arithmetic is IEEE
 * RNE already (g++ -std=c++17 does not contract a*b+c into an fma). */
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __frcp_rn(float a) { return 1.0f / a; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
/* __expf / __logf: glibc's (declared by math.h) */
static inline float __fdividef(float a, float b) { return a / b; }
static inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

/* ---- bfloat16 / half (round to nearest even, as CUDA's __float2bfloat16
 * and __float2half) ---- */
struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f);
    operator float() const {
        return __uint_as_float((unsigned)__x << 16);
    }
};
struct __nv_bfloat16_raw {
    unsigned short x;
};
static inline __nv_bfloat16 __float2bfloat16(float f) {
    unsigned u = __float_as_uint(f);
    __nv_bfloat16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.__x = (unsigned short)((u >> 16) | 0x40u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.__x = (unsigned short)(u >> 16);
    }
    return r;
}
inline __nv_bfloat16::__nv_bfloat16(float f) { __x = __float2bfloat16(f).__x; }
static inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
static inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 b;
    b.__x = u;
    return b;
}

struct __half {
    unsigned short __x;
    __half() = default;
    __half(float f);
    operator float() const;
};
static inline __half __float2half(float f) {
    unsigned u = __float_as_uint(f), sign = (u >> 16) & 0x8000u;
    unsigned a = u & 0x7fffffffu;
    __half h;
    if (a > 0x7f800000u) { /* NaN: quiet, keep the top payload bits */
        h.__x = (unsigned short)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
        return h;
    }
    if (a >= 0x477ff000u) { /* rounds to >= 65520: infinity */
        h.__x = (unsigned short)(sign | 0x7c00u);
        return h;
    }
    if (a < 0x38800000u) { /* below the smallest normal half: subnormal or 0 */
        /* value = a_float; half subnormal unit = 2^-24 */
        float v = __uint_as_float(a) * 16777216.0f; /* exact: scales by 2^24 */
        float r = nearbyintf(v);                     /* RNE in the default mode */
        h.__x = (unsigned short)(sign | (unsigned)r);
        return h;
    }
    unsigned m = a + 0xc8000000u; /* rebias exponent 127 -> 15, in the float's bit position */
    m += 0xfffu + ((m >> 13) & 1u);
    h.__x = (unsigned short)(sign | (m >> 13));
    return h;
}
static inline float __half2float(__half h) {
    unsigned sign = ((unsigned)h.__x & 0x8000u) << 16, e = (h.__x >> 10) & 0x1fu,
             m = h.__x & 0x3ffu;
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}
inline __half::__half(float f) { __x = __float2half(f).__x; }
inline __half::operator float() const { return __half2float(*this); }
static inline __half __float2half_rn(float f) { return __float2half(f); }

/* ---- nvcuda::wmma: whole-tile fragments ---- */
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K> struct frag_shape;
template <int M, int N, int K> struct frag_shape<matrix_a, M, N, K> {
    enum { rows = M, cols = K };
};
template <int M, int N, int K> struct frag_shape<matrix_b, M, N, K> {
    enum { rows = K, cols = N };
};
template <int M, int N, int K> struct frag_shape<accumulator, M, N, K> {
    enum { rows = M, cols = N };
};

/* A fragment holds the whole tile, row-major (rows x cols), in fp32 (bf16
 * and half values are exact in fp32). Only lane 0's copy is used: a load
 * fills lane 0's fragment, mma_sync computes from lane 0's operands into
 * every lane's accumulator, a store writes lane 0's tile; all three are warp
 * barriers that check every lane passes the same pointer and ldm. (Loading
 * in one lane, when lane 0 arrives, is what makes wmma cheap to emulate; a
 * kernel that reads fragment elements per lane, frag.x[i], is not
 * supported: there is no such member.) */
template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
    enum { rows = frag_shape<Use, M, N, K>::rows, cols = frag_shape<Use, M, N, K>::cols };
    float t[rows * cols];
};

template <class Use, int M, int N, int K, class T, class L>
static inline void fill_fragment(fragment<Use, M, N, K, T, L> &f, float v) {
    for (float &x : f.t) x = v;
}

template <class T> static inline float elem_to_float(const T &x) { return (float)x; }

/* Checks the rules of a wmma pointer (256-bit aligned) and ldm (a multiple
 * of 16 bytes), then loads the tile in every lane. */
template <class Use, int M, int N, int K, class T, class L, class P>
static inline void load_matrix_sync(fragment<Use, M, N, K, T, L> &f, const P *p, unsigned ldm,
                                    const char *file = __builtin_FILE(),
                                    int line = __builtin_LINE()) {
    typedef fragment<Use, M, N, K, T, L> F;
    if ((uintptr_t)p % 32) emu::fail(file, line, "wmma::load_matrix_sync: pointer %p not 32-byte aligned", (const void *)p);
    if ((ldm * sizeof(P)) % 16) emu::fail(file, line, "wmma::load_matrix_sync: ldm %u not a multiple of 16 bytes", ldm);
    const bool col = std::is_same<L, col_major>::value;
    if (emu::g_cur->lane == 0)
        for (int r = 0; r < F::rows; r++)
            for (int c = 0; c < F::cols; c++)
                f.t[r * F::cols + c] = elem_to_float(col ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]);
    emu::warp_op(emu::W_WMMA_LOAD, 0xffffffffu, 0, (int)ldm, 32, p, file, line);
}
template <int M, int N, int K, class T, class P>
static inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void> &f, const P *p,
                                    unsigned ldm, layout_t lay,
                                    const char *file = __builtin_FILE(),
                                    int line = __builtin_LINE()) {
    if ((uintptr_t)p % 32) emu::fail(file, line, "wmma::load_matrix_sync: pointer not 32-byte aligned");
    if ((ldm * sizeof(P)) % 16) emu::fail(file, line, "wmma::load_matrix_sync: ldm %u not a multiple of 16 bytes", ldm);
    if (emu::g_cur->lane == 0)
        for (int r = 0; r < M; r++)
            for (int c = 0; c < N; c++)
                f.t[r * N + c] = (float)(lay == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]);
    emu::warp_op(emu::W_WMMA_LOAD, 0xffffffffu, 0, (int)ldm, 32, p, file, line);
}
template <int M, int N, int K, class T, class P>
static inline void store_matrix_sync(P *p, const fragment<accumulator, M, N, K, T, void> &f,
                                     unsigned ldm, layout_t lay,
                                     const char *file = __builtin_FILE(),
                                     int line = __builtin_LINE()) {
    if ((uintptr_t)p % 32) emu::fail(file, line, "wmma::store_matrix_sync: pointer %p not 32-byte aligned", (void *)p);
    if ((ldm * sizeof(P)) % 16) emu::fail(file, line, "wmma::store_matrix_sync: ldm %u not a multiple of 16 bytes", ldm);
    if (emu::g_cur->lane == 0)
        for (int r = 0; r < M; r++)
            for (int c = 0; c < N; c++) {
                P v = (P)f.t[r * N + c];
                if (lay == mem_col_major)
                    p[(size_t)c * ldm + r] = v;
                else
                    p[(size_t)r * ldm + c] = v;
            }
    emu::warp_op(emu::W_WMMA_STORE, 0xffffffffu, 0, (int)ldm, 32, p, file, line);
}
template <int M, int N, int K, class TA, class LA, class LB, class TC>
static inline void mma_compute(void *dv, const void *av, const void *bv, const void *cv) {
    typedef fragment<accumulator, M, N, K, TC, void> FD;
    typedef fragment<matrix_a, M, N, K, TA, LA> FA;
    typedef fragment<matrix_b, M, N, K, TA, LB> FB;
    const FA &a = *(const FA *)av;
    const FB &b = *(const FB *)bv;
    const FD &c = *(const FD *)cv;
    FD out;
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = c.t[i * N + j];
            for (int k = 0; k < K; k++) s += a.t[i * K + k] * b.t[k * N + j];
            out.t[i * N + j] = s;
        }
    *(FD *)dv = out;
}
template <int M, int N, int K, class TA, class LA, class LB, class TC>
static inline void mma_sync(fragment<accumulator, M, N, K, TC, void> &d,
                            const fragment<matrix_a, M, N, K, TA, LA> &a,
                            const fragment<matrix_b, M, N, K, TA, LB> &b,
                            const fragment<accumulator, M, N, K, TC, void> &c,
                            const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu::warp_mma(&d, &a, &b, &c, (int)sizeof d, (int)sizeof a, (int)sizeof b,
                  mma_compute<M, N, K, TA, LA, LB, TC>, file, line);
}
} // namespace wmma
} // namespace nvcuda

#endif
