/*
 * tests/emu/cuda_rt_c.cpp — C linkage for the emulator's runtime subset that
 * host C code calls (declared in tests/emu/include_c/cuda_runtime_api.h):
 * each emu_c_* forwards to the emulator's C++ function of the same CUDA name
 * (tests/emu/cuda_emu.cpp). Linked only into emulator builds.
 */
#include "cuda_emu.h"

static_assert(cudaSuccess == 0 && cudaErrorInvalidValue == 1 && cudaErrorMemoryAllocation == 2 &&
                  cudaErrorInitializationError == 3 && cudaErrorInvalidConfiguration == 9 &&
                  cudaErrorInvalidDevicePointer == 17 && cudaErrorInvalidMemcpyDirection == 21 &&
                  cudaErrorInvalidDeviceFunction == 98 && cudaErrorNoDevice == 100 &&
                  cudaErrorInvalidDevice == 101 && cudaErrorLaunchOutOfResources == 701 &&
                  cudaErrorLaunchFailure == 719,
              "include_c/cuda_runtime_api.h copies these values");
static_assert(cudaMemcpyHostToHost == 0 && cudaMemcpyHostToDevice == 1 &&
                  cudaMemcpyDeviceToHost == 2 && cudaMemcpyDeviceToDevice == 3 &&
                  cudaMemcpyDefault == 4,
              "include_c/cuda_runtime_api.h copies these values");

extern "C" {
cudaError_t emu_c_cudaMalloc(void **p, size_t n) { return cudaMalloc(p, n); }
cudaError_t emu_c_cudaFree(void *p) { return cudaFree(p); }
cudaError_t emu_c_cudaMallocHost(void **p, size_t n) { return cudaMallocHost(p, n); }
cudaError_t emu_c_cudaFreeHost(void *p) { return cudaFreeHost(p); }
cudaError_t emu_c_cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k) {
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
cudaError_t emu_c_cudaDeviceSynchronize(void) { return cudaDeviceSynchronize(); }
cudaError_t emu_c_cudaGetDeviceCount(int *n) { return cudaGetDeviceCount(n); }
cudaError_t emu_c_cudaSetDevice(int d) { return cudaSetDevice(d); }
cudaError_t emu_c_cudaGetLastError(void) { return cudaGetLastError(); }
const char *emu_c_cudaGetErrorString(cudaError_t e) { return cudaGetErrorString(e); }
const char *emu_c_cudaGetErrorName(cudaError_t e) { return cudaGetErrorName(e); }
cudaError_t emu_c_cudaStreamCreateWithFlags(cudaStream_t *s, unsigned f) {
    return cudaStreamCreateWithFlags(s, f);
}
cudaError_t emu_c_cudaStreamDestroy(cudaStream_t s) { return cudaStreamDestroy(s); }
cudaError_t emu_c_cudaStreamSynchronize(cudaStream_t s) { return cudaStreamSynchronize(s); }
cudaError_t emu_c_cudaEventCreateWithFlags(cudaEvent_t *e, unsigned f) {
    return cudaEventCreateWithFlags(e, f);
}
cudaError_t emu_c_cudaEventDestroy(cudaEvent_t e) { return cudaEventDestroy(e); }
cudaError_t emu_c_cudaEventRecord(cudaEvent_t e, cudaStream_t s) { return cudaEventRecord(e, s); }
cudaError_t emu_c_cudaEventSynchronize(cudaEvent_t e) { return cudaEventSynchronize(e); }
cudaError_t emu_c_cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b) {
    return cudaEventElapsedTime(ms, a, b);
}
}
