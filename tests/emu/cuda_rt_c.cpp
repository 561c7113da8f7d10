/*
 * tests/emu/cuda_rt_c.cpp — C linkage for the emulator's runtime subset that
 * host C code calls (declared in tests/emu/include_c/cuda_runtime_api.h):
 * each emu_c_* forwards to the emulator's C++ function of the same CUDA name
 * (tests/emu/cuda_emu.cpp). Linked only into emulator builds.
 *
 * It also counts what a test of the host code's traffic needs
 * (emu_c_counters): host synchronisations (cudaStreamSynchronize,
 * cudaEventSynchronize, cudaDeviceSynchronize and the synchronous cudaMemcpy)
 * here, and from the runtime (emu::stats) the bytes and number of the
 * host-to-device and device-to-host copies that ran (a graph's at each
 * replay), kernels and library calls run outside graphs, graph launches and
 * the operations graph replays ran. emu_c_submit lets the C cuBLASLt shim
 * enqueue its work, so that a capture records it.
 */
#include "cuda_emu.h"

#include <memory>
#include <vector>

static_assert(cudaSuccess == 0 && cudaErrorInvalidValue == 1 && cudaErrorMemoryAllocation == 2 &&
                  cudaErrorInitializationError == 3 && cudaErrorInvalidConfiguration == 9 &&
                  cudaErrorInvalidDevicePointer == 17 && cudaErrorInvalidMemcpyDirection == 21 &&
                  cudaErrorInvalidDeviceFunction == 98 && cudaErrorNoDevice == 100 &&
                  cudaErrorInvalidDevice == 101 && cudaErrorInvalidResourceHandle == 400 &&
                  cudaErrorIllegalState == 401 && cudaErrorIllegalAddress == 700 &&
                  cudaErrorStreamCaptureUnsupported == 900 &&
                  cudaErrorStreamCaptureInvalidated == 901 &&
                  cudaErrorLaunchOutOfResources == 701 &&
                  cudaErrorLaunchFailure == 719,
              "include_c/cuda_runtime_api.h copies these values");
static_assert(cudaStreamCaptureModeGlobal == 0 && cudaStreamCaptureModeThreadLocal == 1 &&
                  cudaStreamCaptureModeRelaxed == 2 && cudaStreamCaptureStatusNone == 0 &&
                  cudaStreamCaptureStatusActive == 1 && cudaStreamCaptureStatusInvalidated == 2,
              "include_c/cuda_runtime_api.h copies these values");
static_assert(cudaMemcpyHostToHost == 0 && cudaMemcpyHostToDevice == 1 &&
                  cudaMemcpyDeviceToHost == 2 && cudaMemcpyDeviceToDevice == 3 &&
                  cudaMemcpyDefault == 4,
              "include_c/cuda_runtime_api.h copies these values");

/* indices as include_c/cuda_runtime_api.h's EMU_C_* */
enum { C_SYNCS, C_H2D_BYTES, C_H2D_COPIES, C_D2H_BYTES, C_D2H_COPIES, C_KERNELS, C_LIB_CALLS,
       C_GRAPH_LAUNCHES, C_GRAPH_OPS, C_N };
static unsigned long long g_syncs;

extern "C" {
void emu_c_counters(unsigned long long *out) {
    emu::run_stats r = emu::stats();
    out[C_SYNCS] = g_syncs;
    out[C_H2D_BYTES] = r.h2d_bytes;
    out[C_H2D_COPIES] = r.h2d_copies;
    out[C_D2H_BYTES] = r.d2h_bytes;
    out[C_D2H_COPIES] = r.d2h_copies;
    out[C_KERNELS] = r.kernels;
    out[C_LIB_CALLS] = r.lib_calls;
    out[C_GRAPH_LAUNCHES] = r.graph_launches;
    out[C_GRAPH_OPS] = r.graph_ops;
}
/* fn(arg) now, or a copy of arg's bytes recorded with fn when s captures. */
cudaError_t emu_c_submit(cudaStream_t s, void (*fn)(void *), const void *arg, size_t bytes) {
    auto copy = std::make_shared<std::vector<unsigned char>>((const unsigned char *)arg,
                                                             (const unsigned char *)arg + bytes);
    return emu::submit_lib(s, [=]() { fn(copy->data()); });
}
cudaError_t emu_c_cudaMalloc(void **p, size_t n) { return cudaMalloc(p, n); }
cudaError_t emu_c_cudaFree(void *p) { return cudaFree(p); }
cudaError_t emu_c_cudaMallocHost(void **p, size_t n) { return cudaMallocHost(p, n); }
cudaError_t emu_c_cudaFreeHost(void *p) { return cudaFreeHost(p); }
cudaError_t emu_c_cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k) {
    g_syncs++;
    return cudaMemcpy(dst, src, n, k);
}
cudaError_t emu_c_cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k,
                                  cudaStream_t s) {
    return cudaMemcpyAsync(dst, src, n, k, s);
}
cudaError_t emu_c_cudaMemset(void *p, int v, size_t n) { return cudaMemset(p, v, n); }
cudaError_t emu_c_cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    return cudaMemsetAsync(p, v, n, s);
}
cudaError_t emu_c_cudaMemGetInfo(size_t *f, size_t *t) { return cudaMemGetInfo(f, t); }
cudaError_t emu_c_cudaDeviceSynchronize(void) {
    g_syncs++;
    return cudaDeviceSynchronize(); }
cudaError_t emu_c_cudaGetDeviceCount(int *n) { return cudaGetDeviceCount(n); }
cudaError_t emu_c_cudaSetDevice(int d) { return cudaSetDevice(d); }
cudaError_t emu_c_cudaGetLastError(void) { return cudaGetLastError(); }
const char *emu_c_cudaGetErrorString(cudaError_t e) { return cudaGetErrorString(e); }
const char *emu_c_cudaGetErrorName(cudaError_t e) { return cudaGetErrorName(e); }
cudaError_t emu_c_cudaStreamCreateWithFlags(cudaStream_t *s, unsigned f) {
    return cudaStreamCreateWithFlags(s, f);
}
cudaError_t emu_c_cudaStreamDestroy(cudaStream_t s) { return cudaStreamDestroy(s); }
cudaError_t emu_c_cudaStreamSynchronize(cudaStream_t s) {
    g_syncs++;
    return cudaStreamSynchronize(s);
}
cudaError_t emu_c_cudaEventCreateWithFlags(cudaEvent_t *e, unsigned f) {
    return cudaEventCreateWithFlags(e, f);
}
cudaError_t emu_c_cudaEventDestroy(cudaEvent_t e) { return cudaEventDestroy(e); }
cudaError_t emu_c_cudaEventRecord(cudaEvent_t e, cudaStream_t s) { return cudaEventRecord(e, s); }
cudaError_t emu_c_cudaEventSynchronize(cudaEvent_t e) {
    g_syncs++;
    return cudaEventSynchronize(e);
}
cudaError_t emu_c_cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    return cudaEventElapsedTime(ms, a, b);
}
cudaError_t emu_c_cudaStreamBeginCapture(cudaStream_t s, int mode) {
    return cudaStreamBeginCapture(s, (cudaStreamCaptureMode)mode);
}
cudaError_t emu_c_cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g) {
    return cudaStreamEndCapture(s, g);
}
cudaError_t emu_c_cudaStreamIsCapturing(cudaStream_t s, int *status) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    cudaError_t e = cudaStreamIsCapturing(s, status ? &st : nullptr);
    if (status) *status = (int)st;
    return e;
}
cudaError_t emu_c_cudaGraphInstantiate(cudaGraphExec_t *e, cudaGraph_t g, unsigned long long flags) {
    return cudaGraphInstantiate(e, g, flags);
}
cudaError_t emu_c_cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s) { return cudaGraphLaunch(e, s); }
cudaError_t emu_c_cudaGraphExecDestroy(cudaGraphExec_t e) { return cudaGraphExecDestroy(e); }
cudaError_t emu_c_cudaGraphDestroy(cudaGraph_t g) { return cudaGraphDestroy(g); }
}
