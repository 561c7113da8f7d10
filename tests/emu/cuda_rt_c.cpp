/*
 * tests/emu/cuda_rt_c.cpp — C linkage for the emulator's runtime subset that
 * host C code calls (declared in tests/emu/include_c/cuda_runtime_api.h):
 * each emu_c_* forwards to the emulator's C++ function of the same CUDA name
 * (tests/emu/cuda_emu.cpp). Linked only into emulator builds.
 *
 * It also counts what a test of the host code's traffic needs
 * (emu_c_counters): host synchronisations (cudaStreamSynchronize,
 * cudaEventSynchronize, cudaDeviceSynchronize and the synchronous cudaMemcpy),
 * and the bytes and calls of host-to-device and device-to-host copies.
 */
#include "cuda_emu.h"

static_assert(cudaSuccess == 0 && cudaErrorInvalidValue == 1 && cudaErrorMemoryAllocation == 2 &&
                  cudaErrorInitializationError == 3 && cudaErrorInvalidConfiguration == 9 &&
                  cudaErrorInvalidDevicePointer == 17 && cudaErrorInvalidMemcpyDirection == 21 &&
                  cudaErrorInvalidDeviceFunction == 98 && cudaErrorNoDevice == 100 &&
                  cudaErrorInvalidDevice == 101 && cudaErrorIllegalAddress == 700 &&
                  cudaErrorLaunchOutOfResources == 701 &&
                  cudaErrorLaunchFailure == 719,
              "include_c/cuda_runtime_api.h copies these values");
static_assert(cudaMemcpyHostToHost == 0 && cudaMemcpyHostToDevice == 1 &&
                  cudaMemcpyDeviceToHost == 2 && cudaMemcpyDeviceToDevice == 3 &&
                  cudaMemcpyDefault == 4,
              "include_c/cuda_runtime_api.h copies these values");

/* indices as include_c/cuda_runtime_api.h's EMU_C_* */
enum { C_SYNCS, C_H2D_BYTES, C_H2D_COPIES, C_D2H_BYTES, C_D2H_COPIES, C_N };
static unsigned long long g_count[C_N];

static void count_copy(size_t n, cudaMemcpyKind k) {
    if (k == cudaMemcpyHostToDevice) {
        g_count[C_H2D_BYTES] += n;
        g_count[C_H2D_COPIES]++;
    } else if (k == cudaMemcpyDeviceToHost) {
        g_count[C_D2H_BYTES] += n;
        g_count[C_D2H_COPIES]++;
    }
}

extern "C" {
void emu_c_counters(unsigned long long *out) {
    for (int i = 0; i < C_N; i++) out[i] = g_count[i];
}
cudaError_t emu_c_cudaMalloc(void **p, size_t n) { return cudaMalloc(p, n); }
cudaError_t emu_c_cudaFree(void *p) { return cudaFree(p); }
cudaError_t emu_c_cudaMallocHost(void **p, size_t n) { return cudaMallocHost(p, n); }
cudaError_t emu_c_cudaFreeHost(void *p) { return cudaFreeHost(p); }
cudaError_t emu_c_cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k) {
    g_count[C_SYNCS]++;
    count_copy(n, k);
    return cudaMemcpy(dst, src, n, k);
}
cudaError_t emu_c_cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k,
                                  cudaStream_t s) {
    count_copy(n, k);
    return cudaMemcpyAsync(dst, src, n, k, s);
}
cudaError_t emu_c_cudaMemset(void *p, int v, size_t n) { return cudaMemset(p, v, n); }
cudaError_t emu_c_cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s) {
    return cudaMemsetAsync(p, v, n, s);
}
cudaError_t emu_c_cudaMemGetInfo(size_t *f, size_t *t) { return cudaMemGetInfo(f, t); }
cudaError_t emu_c_cudaDeviceSynchronize(void) {
    g_count[C_SYNCS]++;
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
    g_count[C_SYNCS]++;
    return cudaStreamSynchronize(s);
}
cudaError_t emu_c_cudaEventCreateWithFlags(cudaEvent_t *e, unsigned f) {
    return cudaEventCreateWithFlags(e, f);
}
cudaError_t emu_c_cudaEventDestroy(cudaEvent_t e) { return cudaEventDestroy(e); }
cudaError_t emu_c_cudaEventRecord(cudaEvent_t e, cudaStream_t s) { return cudaEventRecord(e, s); }
cudaError_t emu_c_cudaEventSynchronize(cudaEvent_t e) {
    g_count[C_SYNCS]++;
    return cudaEventSynchronize(e);
}
cudaError_t emu_c_cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    return cudaEventElapsedTime(ms, a, b);
}
}
