/*
 * tests/emu/test_emu.cu — tests of the CUDA emulator itself (tests/emu/):
 * warp operations, shared-memory poisoning, atomics, bf16/half rounding,
 * wmma, the launch limits, and every check that aborts (a barrier reached
 * from two places, a warp operation naming an exited lane, deadlock, strict
 * mode), each of those in a forked child whose report is read back; stream
 * capture and graph replay (order, captured arguments, the errors CUDA
 * gives for unsafe calls during a capture).
 * Built only against the emulator (make test-gpu-emu). Prints one line per
 * check and "emu: N passed, N failed".
 */
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

static int g_pass, g_fail;

static void check(const char *name, bool ok) {
    printf("%s %s\n", ok ? "ok" : "FAIL", name);
    fflush(stdout);
    (ok ? g_pass : g_fail)++;
}

/* ---- warp operations ---- */

static __global__ void shfl_kernel(int *out) {
    int l = threadIdx.x % 32, w = threadIdx.x / 32;
    int *o = out + w * 32 * 8;
    o[0 * 32 + l] = __shfl_xor_sync(0xffffffffu, l * 10, 5);
    o[1 * 32 + l] = __shfl_up_sync(0xffffffffu, l, 3);
    o[2 * 32 + l] = __shfl_down_sync(0xffffffffu, l, 2, 8);
    o[3 * 32 + l] = __shfl_sync(0xffffffffu, l + 100, 7);
    o[4 * 32 + l] = (int)__ballot_sync(0xffffffffu, l % 3 == 0);
    o[5 * 32 + l] = __any_sync(0xffffffffu, l == 31);
    o[6 * 32 + l] = __all_sync(0xffffffffu, l < 31);
    float f = __shfl_xor_sync(0xffffffffu, 0.5f * l, 1);
    o[7 * 32 + l] = (int)(f * 2);
}

static void test_warp_ops(void) {
    int *d;
    cudaMalloc(&d, 2 * 32 * 8 * sizeof(int));
    shfl_kernel<<<1, 64>>>(d);
    std::vector<int> h(2 * 32 * 8);
    cudaMemcpy(h.data(), d, h.size() * sizeof(int), cudaMemcpyDeviceToHost);
    bool ok = cudaGetLastError() == cudaSuccess;
    unsigned ballot = 0;
    for (int l = 0; l < 32; l++)
        if (l % 3 == 0) ballot |= 1u << l;
    for (int w = 0; w < 2; w++)
        for (int l = 0; l < 32; l++) {
            const int *o = &h[w * 32 * 8];
            ok = ok && o[l] == (l ^ 5) * 10;
            ok = ok && o[32 + l] == (l >= 3 ? l - 3 : l);
            ok = ok && o[64 + l] == (l % 8 + 2 < 8 ? l + 2 : l);
            ok = ok && o[96 + l] == 107;
            ok = ok && (unsigned)o[128 + l] == ballot;
            ok = ok && o[160 + l] == 1 && o[192 + l] == 0;
            ok = ok && o[224 + l] == (l ^ 1);
        }
    check("warp_ops", ok);
    cudaFree(d);
}

/* ---- shared memory poisoning, block barrier, atomics ---- */

static __global__ void smem_kernel(unsigned *out, int *counter) {
    __shared__ unsigned s[64];
    extern __shared__ unsigned dyn[];
    if (threadIdx.x == 0) {
        /* first read of this block: both kinds are garbage (0xff bytes) */
        out[blockIdx.x * 2] = s[blockIdx.x] & dyn[5];
    }
    __syncthreads();
    s[threadIdx.x] = threadIdx.x;
    dyn[threadIdx.x] = 2 * threadIdx.x;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned sum = 0;
        for (int i = 0; i < 64; i++) sum += s[i] + dyn[i];
        out[blockIdx.x * 2 + 1] = sum;
    }
    atomicAdd(counter, 1);
}

static void test_smem(void) {
    unsigned *d;
    int *c;
    cudaMalloc(&d, 3 * 2 * sizeof(unsigned));
    cudaMalloc(&c, sizeof(int));
    cudaMemset(c, 0, sizeof(int));
    smem_kernel<<<3, 64, 64 * sizeof(unsigned)>>>(d, c);
    unsigned h[6];
    int hc;
    cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
    cudaMemcpy(&hc, c, sizeof hc, cudaMemcpyDeviceToHost);
    bool ok = hc == 3 * 64;
    for (int b = 0; b < 3; b++) ok = ok && h[2 * b] == 0xffffffffu && h[2 * b + 1] == 3 * 2016;
    check("smem_poison_barrier_atomics", ok);
    cudaFree(d);
    cudaFree(c);
}

/* ---- numerics ---- */

static void test_rounding(void) {
    bool ok = __bfloat16_as_ushort(__float2bfloat16(1.0f)) == 0x3f80;
    ok = ok && __bfloat16_as_ushort(__float2bfloat16(__uint_as_float(0x3f808000u))) == 0x3f80; /* tie: even */
    ok = ok && __bfloat16_as_ushort(__float2bfloat16(__uint_as_float(0x3f818000u))) == 0x3f82; /* tie: up to even */
    ok = ok && __bfloat16_as_ushort(__float2bfloat16(__uint_as_float(0x3f808001u))) == 0x3f81;
    ok = ok && __bfloat162float(__float2bfloat16(-2.5f)) == -2.5f;
    ok = ok && __half2float(__float2half(1.0f)) == 1.0f;
    ok = ok && __float2half(65504.0f).__x == 0x7bff;
    ok = ok && __float2half(65520.0f).__x == 0x7c00; /* rounds to infinity */
    ok = ok && __float2half(1.0f + 1.0f / 2048).__x == 0x3c00; /* tie: even */
    ok = ok && __float2half(1.0f + 3.0f / 2048).__x == 0x3c02;
    ok = ok && __float2half(5.960464477539063e-08f).__x == 0x0001; /* smallest subnormal */
    ok = ok && __half2float(__float2half(-3.0e-5f)) == -503.0f / 16777216.0f; /* subnormal, RNE */
    check("bf16_half_rounding", ok);
}

static __global__ void wmma_kernel(float *c, const __nv_bfloat16 *a, const __nv_bfloat16 *b) {
    using namespace nvcuda;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 1.0f);
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b, 16);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
}

static void test_wmma(void) {
    std::vector<__nv_bfloat16> a(256), b(256);
    for (int i = 0; i < 256; i++) {
        a[i] = __float2bfloat16((float)(i % 7) - 3.0f);
        b[i] = __float2bfloat16((float)(i % 5) * 0.5f);
    }
    __nv_bfloat16 *da, *db;
    float *dc;
    cudaMalloc(&da, 512);
    cudaMalloc(&db, 512);
    cudaMalloc(&dc, 1024);
    cudaMemcpy(da, a.data(), 512, cudaMemcpyHostToDevice);
    cudaMemcpy(db, b.data(), 512, cudaMemcpyHostToDevice);
    wmma_kernel<<<1, 32>>>(dc, da, db);
    float c[256];
    cudaMemcpy(c, dc, sizeof c, cudaMemcpyDeviceToHost);
    bool ok = true;
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++) {
            float s = 1.0f;
            /* b is col-major: element (k, j) at j * 16 + k */
            for (int k = 0; k < 16; k++) s += (float)a[i * 16 + k] * (float)b[j * 16 + k];
            ok = ok && c[i * 16 + j] == s;
        }
    check("wmma_bf16", ok);
    cudaFree(da);
    cudaFree(db);
    cudaFree(dc);
}

/* ---- launch limits ---- */

static __global__ void empty_kernel(int *p) {
    if (p) p[0] = 1;
}
static __global__ void big_smem_kernel(int *p) {
    extern __shared__ int big[];
    big[0] = 7;
    p[0] = big[0];
}

/* Events time the emulated work: a launch between two records makes the
 * elapsed time positive; events created without timing are refused. */
static __global__ void busy_kernel(float *x) {
    float a = x[threadIdx.x];
    for (int i = 0; i < 20000; i++) a = a * 0.999f + 0.5f;
    x[threadIdx.x] = a;
}

static void test_event_timing(void) {
    cudaEvent_t a, b, c;
    cudaStream_t st;
    float *x;
    bool ok = cudaStreamCreate(&st) == cudaSuccess && cudaEventCreate(&a) == cudaSuccess &&
              cudaEventCreate(&b) == cudaSuccess &&
              cudaEventCreateWithFlags(&c, cudaEventDisableTiming) == cudaSuccess &&
              cudaMalloc((void **)&x, 128 * sizeof(float)) == cudaSuccess;
    float ms = -1.0f;
    ok = ok && cudaEventElapsedTime(&ms, a, b) != cudaSuccess; /* not recorded yet */
    ok = ok && cudaMemset(x, 0, 128 * sizeof(float)) == cudaSuccess;
    ok = ok && cudaEventRecord(a, st) == cudaSuccess;
    busy_kernel<<<4, 128, 0, st>>>(x);
    ok = ok && cudaEventRecord(b, st) == cudaSuccess && cudaEventRecord(c, st) == cudaSuccess;
    ok = ok && cudaEventSynchronize(b) == cudaSuccess && cudaEventElapsedTime(&ms, a, b) == cudaSuccess;
    ok = ok && ms > 0.0f && ms < 60000.0f;
    float bad = 0;
    ok = ok && cudaEventElapsedTime(&bad, a, c) != cudaSuccess;
    cudaFree(x);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    cudaEventDestroy(c);
    cudaStreamDestroy(st);
    check("event_timing", ok);
}

static void test_launch_limits(void) {
    int *d;
    cudaMalloc(&d, 256);
    bool ok = ((uintptr_t)d & 255) == 0;
    empty_kernel<<<1, 1025>>>(d);
    ok = ok && cudaGetLastError() == cudaErrorInvalidConfiguration;
    empty_kernel<<<dim3(1, 65536), 32>>>(d);
    ok = ok && cudaGetLastError() == cudaErrorInvalidConfiguration;
    empty_kernel<<<dim3(1, 1, 65536), 32>>>(d);
    ok = ok && cudaGetLastError() == cudaErrorInvalidConfiguration;
    empty_kernel<<<0, 32>>>(d);
    ok = ok && cudaGetLastError() == cudaErrorInvalidConfiguration;
    empty_kernel<<<dim3(1, 65535), dim3(32, 32)>>>(nullptr);
    ok = ok && cudaGetLastError() == cudaSuccess;
    big_smem_kernel<<<1, 32, 48 * 1024 + 4>>>(d);
    ok = ok && cudaGetLastError() == cudaErrorInvalidValue; /* no opt-in yet */
    ok = ok && cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    227 * 1024 + 1) != cudaSuccess;
    cudaGetLastError();
    ok = ok && cudaFuncSetAttribute(big_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    100 * 1024) == cudaSuccess;
    big_smem_kernel<<<1, 32, 100 * 1024>>>(d);
    ok = ok && cudaGetLastError() == cudaSuccess;
    big_smem_kernel<<<1, 32, 100 * 1024 + 4>>>(d);
    ok = ok && cudaGetLastError() == cudaErrorInvalidValue;
    int h = 0;
    cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost);
    ok = ok && h == 7;
    check("launch_limits", ok);
    cudaFree(d);
}


/* ---- stream capture and graphs ---- */

/* x[i] = x[i] * 10 + v: the order of two launches shows in the result */
static __global__ void shift_add_kernel(int *x, int v) { x[threadIdx.x] = x[threadIdx.x] * 10 + v; }

/* Recorded, not run; replayed in capture order, as often as launched; the
 * arguments of a kernel are the values at capture, a copy's source is read
 * at replay; the counters see replays, not launches. */
static void test_graph_record_replay(void) {
    cudaStream_t st;
    int *d = nullptr, *src = nullptr, h[32];
    bool ok = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) == cudaSuccess &&
              cudaMalloc(&d, sizeof h) == cudaSuccess && cudaMallocHost((void **)&src, sizeof h) == cudaSuccess;
    for (int i = 0; i < 32; i++) src[i] = 5;
    ok = ok && cudaMemset(d, 0, sizeof h) == cudaSuccess;
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusInvalidated;
    ok = ok && cudaStreamIsCapturing(st, &cs) == cudaSuccess && cs == cudaStreamCaptureStatusNone;
    ok = ok && cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal) == cudaSuccess;
    ok = ok && cudaStreamIsCapturing(st, &cs) == cudaSuccess && cs == cudaStreamCaptureStatusActive;
    int v = 1;
    ok = ok && cudaMemcpyAsync(d, src, sizeof h, cudaMemcpyHostToDevice, st) == cudaSuccess;
    shift_add_kernel<<<1, 32, 0, st>>>(d, v);
    v = 7; /* the launch above keeps 1 */
    shift_add_kernel<<<1, 32, 0, st>>>(d, 2);
    ok = ok && cudaGetLastError() == cudaSuccess;
    emu::run_stats r0 = emu::stats();
    cudaGraph_t g = nullptr;
    cudaGraphExec_t e = nullptr;
    ok = ok && cudaStreamEndCapture(st, &g) == cudaSuccess && g;
    ok = ok && cudaStreamIsCapturing(st, &cs) == cudaSuccess && cs == cudaStreamCaptureStatusNone;
    ok = ok && cudaGraphInstantiate(&e, g, 0) == cudaSuccess && cudaGraphDestroy(g) == cudaSuccess;
    ok = ok && cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost) == cudaSuccess && h[0] == 0;
    check("capture_records_without_running", ok);
    for (int i = 0; i < 32; i++) src[i] = 3; /* read by the copy at replay */
    ok = ok && cudaGraphLaunch(e, st) == cudaSuccess;
    ok = ok && cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost) == cudaSuccess;
    check("graph_replays_in_order_with_captured_args", ok && h[0] == 312 && h[31] == 312 && v == 7);
    for (int i = 0; i < 32; i++) src[i] = 4;
    ok = ok && cudaGraphLaunch(e, st) == cudaSuccess;
    ok = ok && cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost) == cudaSuccess;
    emu::run_stats r1 = emu::stats();
    check("graph_replays_again", ok && h[5] == 412);
    check("graph_counters", r1.graph_launches - r0.graph_launches == 2 &&
                                r1.graph_ops - r0.graph_ops == 6 && r1.kernels == r0.kernels &&
                                r1.h2d_copies - r0.h2d_copies == 2);
    cudaGraphExecDestroy(e);
    cudaFreeHost(src);
    cudaFree(d);
    cudaStreamDestroy(st);
}

/* What real CUDA refuses during a capture: synchronising the capturing
 * stream (any mode), allocating or a synchronous copy in global mode (not
 * in relaxed mode); each invalidates the capture, which then gives no
 * graph. Capturing the legacy stream, capturing twice, ending a capture
 * that did not begin, and a bad launch inside a capture. */
static void test_graph_capture_errors(void) {
    cudaStream_t st;
    int *d = nullptr, h = 0;
    cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    cudaMalloc(&d, 128);
    cudaGraph_t g = nullptr;
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    bool ok = cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal) == cudaSuccess;
    shift_add_kernel<<<1, 32, 0, st>>>(d, 1);
    ok = ok && cudaStreamSynchronize(st) == cudaErrorStreamCaptureUnsupported;
    ok = ok && cudaStreamIsCapturing(st, &cs) == cudaSuccess && cs == cudaStreamCaptureStatusInvalidated;
    ok = ok && cudaMemsetAsync(d, 0, 4, st) == cudaErrorStreamCaptureInvalidated;
    g = (cudaGraph_t)&h;
    ok = ok && cudaStreamEndCapture(st, &g) == cudaErrorStreamCaptureInvalidated && g == nullptr;
    check("capture_sync_invalidates", ok);

    void *p = &h;
    ok = cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal) == cudaSuccess;
    ok = ok && cudaMalloc(&p, 64) == cudaErrorStreamCaptureUnsupported && p == nullptr;
    ok = ok && cudaStreamEndCapture(st, &g) == cudaErrorStreamCaptureInvalidated && !g;
    ok = ok && cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal) == cudaSuccess;
    ok = ok && cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost) == cudaErrorStreamCaptureUnsupported;
    ok = ok && cudaStreamEndCapture(st, &g) == cudaErrorStreamCaptureInvalidated && !g;
    ok = ok && cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal) == cudaSuccess;
    ok = ok && cudaDeviceSynchronize() == cudaErrorStreamCaptureUnsupported;
    ok = ok && cudaStreamEndCapture(st, &g) == cudaErrorStreamCaptureInvalidated && !g;
    check("capture_global_mode_refuses_unsafe_calls", ok);

    ok = cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed) == cudaSuccess;
    ok = ok && cudaMalloc(&p, 64) == cudaSuccess && cudaFree(p) == cudaSuccess;
    ok = ok && cudaStreamSynchronize(st) == cudaErrorStreamCaptureUnsupported;
    ok = ok && cudaStreamEndCapture(st, &g) == cudaErrorStreamCaptureInvalidated && !g;
    ok = ok && cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed) == cudaSuccess;
    ok = ok && cudaMalloc(&p, 64) == cudaSuccess && cudaFree(p) == cudaSuccess;
    ok = ok && cudaStreamEndCapture(st, &g) == cudaSuccess && g;
    cudaGraphDestroy(g);
    check("capture_relaxed_mode_allows_allocation", ok);

    ok = cudaStreamBeginCapture(0, cudaStreamCaptureModeGlobal) == cudaErrorStreamCaptureUnsupported;
    ok = ok && cudaStreamEndCapture(st, &g) == cudaErrorIllegalState;
    ok = ok && cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal) == cudaSuccess;
    ok = ok && cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal) == cudaErrorIllegalState;
    shift_add_kernel<<<1, 1025, 0, st>>>(d, 1);
    ok = ok && cudaGetLastError() == cudaErrorInvalidConfiguration;
    ok = ok && cudaStreamEndCapture(st, &g) == cudaErrorStreamCaptureInvalidated && !g;
    /* after all that the stream works as before */
    ok = ok && cudaMemsetAsync(d, 0, 128, st) == cudaSuccess;
    shift_add_kernel<<<1, 32, 0, st>>>(d, 9);
    ok = ok && cudaMemcpy(&h, d, 4, cudaMemcpyDeviceToHost) == cudaSuccess && h == 9;
    check("capture_misuse_errors", ok);
    cudaFree(d);
    cudaStreamDestroy(st);
}

/* ---- fatal checks, each in a child process ---- */

static __global__ void two_barriers_kernel(int *p) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    p[threadIdx.x] = 0;
}
static __global__ void exited_lane_kernel(float *p) {
    if (threadIdx.x == 3) return;
    float v = __shfl_xor_sync(0xffffffffu, p[threadIdx.x], 1);
    p[threadIdx.x] = v;
}
/* Lanes 16-31 wait in a full-warp shuffle for lanes 0-15, which wait at the
 * barrier for lanes 16-31. */
static __global__ void deadlock_kernel(float *p) {
    if (threadIdx.x >= 16 && threadIdx.x < 32)
        p[threadIdx.x] = __shfl_xor_sync(0xffffffffu, p[threadIdx.x], 1);
    __syncthreads();
}
static __global__ void partial_warp_kernel(float *p) {
    p[threadIdx.x] = __shfl_xor_sync(0xffffffffu, p[threadIdx.x], 1);
}
static __global__ void early_exit_kernel(float *p) {
    if (threadIdx.x >= 40) return;
    __syncthreads();
    p[threadIdx.x] = 1;
}

/* Runs fn in a child; passes when the child aborts and its stderr holds
 * every string of want. */
static void expect_abort(const char *name, void (*fn)(void), std::vector<const char *> want,
                         bool strict) {
    int pfd[2];
    if (pipe(pfd)) {
        check(name, false);
        return;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(pfd[1], 2);
        close(pfd[0]);
        setenv("CUDAEMU_STRICT", strict ? "1" : "0", 1);
        setenv("ASAN_OPTIONS", "abort_on_error=1", 1);
        fn();
        _exit(0);
    }
    close(pfd[1]);
    std::string err;
    char buf[4096];
    ssize_t r;
    while ((r = read(pfd[0], buf, sizeof buf)) > 0) err.append(buf, (size_t)r);
    close(pfd[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    bool ok = WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT;
    for (const char *w : want) ok = ok && err.find(w) != std::string::npos;
    if (!ok) printf("  child status %d, stderr:\n%s\n", st, err.c_str());
    check(name, ok);
}

static float *g_buf;
static void run_two_barriers(void) { two_barriers_kernel<<<1, 64>>>((int *)g_buf); }
static void run_exited_lane(void) { exited_lane_kernel<<<1, 32>>>(g_buf); }
static void run_deadlock(void) { deadlock_kernel<<<1, 64>>>(g_buf); }
static void run_partial_warp(void) { partial_warp_kernel<<<1, 48>>>(g_buf); }
static void run_early_exit(void) { early_exit_kernel<<<1, 64>>>(g_buf); }

/* ---- injected sticky errors (CUDAEMU_FAIL_LAUNCH / _MEMCPY, CUDAEMU_DEVICES) ---- */

static __global__ void fill_kernel(int *out, int v) { out[threadIdx.x] = v; }

static void test_fault_injection(void) {
    emu::fault_reset(); /* the launches above count */
    int *d = nullptr, h[32] = {0};
    cudaMalloc(&d, sizeof h);
    setenv("CUDAEMU_FAIL_LAUNCH", "2", 1);
    fill_kernel<<<1, 32>>>(d, 1);
    bool first_ok = cudaGetLastError() == cudaSuccess;
    fill_kernel<<<1, 32>>>(d, 2); /* the injected one: runs nothing */
    cudaError_t e1 = cudaGetLastError(), e2 = cudaGetLastError();
    cudaError_t ec = cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost);
    cudaError_t es = cudaStreamSynchronize(0);
    fill_kernel<<<1, 32>>>(d, 3);
    cudaError_t e3 = cudaGetLastError();
    check("fault_launch_sticky", first_ok && e1 == cudaErrorIllegalAddress && e2 == e1 && ec == e1 &&
                                     es == e1 && e3 == e1 && h[0] == 0 &&
                                     strcmp(cudaGetErrorName(e1), "cudaErrorIllegalAddress") == 0);
    unsetenv("CUDAEMU_FAIL_LAUNCH");
    cudaDeviceReset(); /* ends the sticky error and restarts the counts */
    fill_kernel<<<1, 32>>>(d, 4);
    bool ok = cudaGetLastError() == cudaSuccess &&
              cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost) == cudaSuccess && h[31] == 4;
    check("fault_reset_clears", ok);
    setenv("CUDAEMU_FAIL_MEMCPY", "2", 1);
    int src[32];
    for (int i = 0; i < 32; i++) src[i] = 100 + i;
    cudaError_t m1 = cudaMemcpyAsync(d, src, sizeof src, cudaMemcpyHostToDevice, 0);
    cudaError_t m2 = cudaMemcpyAsync(h, d, sizeof h, cudaMemcpyDeviceToHost, 0);
    cudaError_t m3 = cudaMemsetAsync(d, 0, sizeof h, 0);
    check("fault_memcpy_async_sticky", m1 == cudaSuccess && m2 == cudaErrorIllegalAddress &&
                                           m3 == m2 && cudaGetLastError() == m2 && h[0] == 4);
    unsetenv("CUDAEMU_FAIL_MEMCPY");
    cudaDeviceReset();
    int n = -1;
    setenv("CUDAEMU_DEVICES", "0", 1);
    cudaError_t g0 = cudaGetDeviceCount(&n);
    int n0 = n;
    unsetenv("CUDAEMU_DEVICES");
    cudaError_t g1 = cudaGetDeviceCount(&n);
    check("devices_env_no_device", g0 == cudaErrorNoDevice && n0 == 0 && g1 == cudaSuccess && n == 1);
    cudaFree(d);
}

int main(void) {
    test_warp_ops();
    test_smem();
    test_rounding();
    test_wmma();
    test_event_timing();
    test_launch_limits();
    test_fault_injection();
    test_graph_record_replay();
    test_graph_capture_errors();

    cudaMalloc(&g_buf, 1024 * sizeof(float));
    cudaMemset(g_buf, 0, 1024 * sizeof(float));
    expect_abort("barrier_from_two_places", run_two_barriers,
                 {"__syncthreads reached from different places", "tests/emu/test_emu.cu:"}, false);
    expect_abort("warp_op_names_exited_lane", run_exited_lane,
                 {"names exited lane 3", "tests/emu/test_emu.cu:", "exited_lane_kernel"}, false);
    expect_abort("deadlock_lists_every_thread", run_deadlock,
                 {"deadlock", "threads 0-15: waits at __syncthreads tests/emu/test_emu.cu:",
                  "threads 16-31: waits at __shfl_xor_sync tests/emu/test_emu.cu:",
                  "threads 32-63: waits at __syncthreads tests/emu/test_emu.cu:"},
                 false);
    expect_abort("full_mask_partial_warp", run_partial_warp, {"do not exist"}, false);
    expect_abort("strict_syncthreads_after_exit", run_early_exit, {"(strict)"}, true);
    /* Not strict: the live threads synchronise without the exited ones. */
    const char *strict = getenv("CUDAEMU_STRICT");
    std::string saved = strict ? strict : "";
    setenv("CUDAEMU_STRICT", "0", 1);
    early_exit_kernel<<<1, 64>>>(g_buf);
    if (strict)
        setenv("CUDAEMU_STRICT", saved.c_str(), 1);
    else
        unsetenv("CUDAEMU_STRICT");
    float h[40];
    cudaMemcpy(h, g_buf, sizeof h, cudaMemcpyDeviceToHost);
    check("nonstrict_syncthreads_after_exit", h[0] == 1.0f && h[39] == 1.0f);
    cudaFree(g_buf);

    printf("emu: %d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
