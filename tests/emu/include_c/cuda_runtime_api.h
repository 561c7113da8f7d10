/*
 * tests/emu/include_c/cuda_runtime_api.h — the C-callable subset of the CUDA
 * runtime API that host C11 code (engine/cuda/) uses, for builds against the
 * emulator (tests/emu/README, "C host code"). On a real toolkit the same
 * #include finds CUDA's own cuda_runtime_api.h, which is C as well.
 *
 * The names are macros onto emu_c_* functions (tests/emu/cuda_rt_c.cpp), which
 * forward to the emulator's C++ runtime (cuda_emu.cpp): the emulator's own
 * declarations have C++ linkage and default arguments, which C cannot call.
 * Enum values and handle types are the emulator's (cuda_rt_c.cpp checks
 * them at compile time). Work runs at once unless its stream captures
 * (then a graph launch replays it), pinned host memory is plain heap
 * memory, device memory is the host heap.
 */
#ifndef D2_EMU_CUDA_RUNTIME_API_H
#define D2_EMU_CUDA_RUNTIME_API_H

#include <stddef.h>

#ifdef __cplusplus
#error "C only: .cu files see tests/emu/cuda_emu.h through tests/emu/include/"
#endif

#define CUDAEMU_C 1

typedef enum cudaError {
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
} cudaError_t;
typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
typedef struct CUgraph_st *cudaGraph_t;
typedef struct CUgraphExec_st *cudaGraphExec_t;
typedef enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2,
} cudaStreamCaptureMode;
typedef enum cudaStreamCaptureStatus {
    cudaStreamCaptureStatusNone = 0,
    cudaStreamCaptureStatusActive = 1,
    cudaStreamCaptureStatusInvalidated = 2,
} cudaStreamCaptureStatus;
typedef enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
} cudaMemcpyKind;
#define cudaStreamNonBlocking 0x01
#define cudaEventDisableTiming 0x02
#define cudaHostAllocDefault 0x00

#define cudaMalloc emu_c_cudaMalloc
#define cudaFree emu_c_cudaFree
#define cudaMallocHost emu_c_cudaMallocHost
#define cudaFreeHost emu_c_cudaFreeHost
#define cudaMemcpy emu_c_cudaMemcpy
#define cudaMemcpyAsync emu_c_cudaMemcpyAsync
#define cudaMemset emu_c_cudaMemset
#define cudaMemsetAsync emu_c_cudaMemsetAsync
#define cudaMemGetInfo emu_c_cudaMemGetInfo
#define cudaDeviceSynchronize emu_c_cudaDeviceSynchronize
#define cudaGetDeviceCount emu_c_cudaGetDeviceCount
#define cudaSetDevice emu_c_cudaSetDevice
#define cudaGetLastError emu_c_cudaGetLastError
#define cudaGetErrorString emu_c_cudaGetErrorString
#define cudaGetErrorName emu_c_cudaGetErrorName
#define cudaStreamCreateWithFlags emu_c_cudaStreamCreateWithFlags
#define cudaStreamDestroy emu_c_cudaStreamDestroy
#define cudaStreamSynchronize emu_c_cudaStreamSynchronize
#define cudaEventCreateWithFlags emu_c_cudaEventCreateWithFlags
#define cudaEventDestroy emu_c_cudaEventDestroy
#define cudaEventRecord emu_c_cudaEventRecord
#define cudaEventSynchronize emu_c_cudaEventSynchronize
#define cudaEventElapsedTime emu_c_cudaEventElapsedTime
#define cudaStreamBeginCapture(s, mode) emu_c_cudaStreamBeginCapture((s), (int)(mode))
#define cudaStreamEndCapture emu_c_cudaStreamEndCapture
#define cudaStreamIsCapturing(s, st) emu_c_cudaStreamIsCapturing((s), (int *)(st))
#define cudaGraphInstantiate emu_c_cudaGraphInstantiate
#define cudaGraphLaunch emu_c_cudaGraphLaunch
#define cudaGraphExecDestroy emu_c_cudaGraphExecDestroy
#define cudaGraphDestroy emu_c_cudaGraphDestroy

cudaError_t emu_c_cudaMalloc(void **p, size_t n);
cudaError_t emu_c_cudaFree(void *p);
cudaError_t emu_c_cudaMallocHost(void **p, size_t n);
cudaError_t emu_c_cudaFreeHost(void *p);
cudaError_t emu_c_cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind k);
cudaError_t emu_c_cudaMemcpyAsync(void *dst, const void *src, size_t n, cudaMemcpyKind k,
                                  cudaStream_t s);
cudaError_t emu_c_cudaMemset(void *p, int v, size_t n);
cudaError_t emu_c_cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s);
cudaError_t emu_c_cudaMemGetInfo(size_t *free_b, size_t *total_b);
cudaError_t emu_c_cudaDeviceSynchronize(void);
cudaError_t emu_c_cudaGetDeviceCount(int *n);
cudaError_t emu_c_cudaSetDevice(int d);
cudaError_t emu_c_cudaGetLastError(void);
const char *emu_c_cudaGetErrorString(cudaError_t e);
const char *emu_c_cudaGetErrorName(cudaError_t e);
cudaError_t emu_c_cudaStreamCreateWithFlags(cudaStream_t *s, unsigned flags);
cudaError_t emu_c_cudaStreamDestroy(cudaStream_t s);
cudaError_t emu_c_cudaStreamSynchronize(cudaStream_t s);
cudaError_t emu_c_cudaEventCreateWithFlags(cudaEvent_t *e, unsigned flags);
cudaError_t emu_c_cudaEventDestroy(cudaEvent_t e);
cudaError_t emu_c_cudaEventRecord(cudaEvent_t e, cudaStream_t s);
cudaError_t emu_c_cudaEventSynchronize(cudaEvent_t e);
cudaError_t emu_c_cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b);
/* Stream capture and graphs (CUDA 12 signatures; tests/emu/README, "Stream
 * capture"). The enum arguments travel as int (their values are checked in
 * cuda_rt_c.cpp). */
cudaError_t emu_c_cudaStreamBeginCapture(cudaStream_t s, int mode);
cudaError_t emu_c_cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *g);
cudaError_t emu_c_cudaStreamIsCapturing(cudaStream_t s, int *status);
cudaError_t emu_c_cudaGraphInstantiate(cudaGraphExec_t *e, cudaGraph_t g, unsigned long long flags);
cudaError_t emu_c_cudaGraphLaunch(cudaGraphExec_t e, cudaStream_t s);
cudaError_t emu_c_cudaGraphExecDestroy(cudaGraphExec_t e);
cudaError_t emu_c_cudaGraphDestroy(cudaGraph_t g);

/* Emulator only (no CUDA name; tests guard it with #ifdef CUDAEMU_C): running
 * totals since the process started, out[EMU_C_N_COUNTERS]. A host
 * synchronisation is a call of cudaStreamSynchronize, cudaEventSynchronize,
 * cudaDeviceSynchronize or the synchronous cudaMemcpy; copies count the
 * cudaMemcpy and cudaMemcpyAsync that ran, by direction (one inside a graph
 * at every replay); kernels and library calls (the cuBLASLt shim's matmuls)
 * count those run outside graph replays; graph ops count every operation a
 * graph replay ran. */
enum {
    EMU_C_SYNCS,
    EMU_C_H2D_BYTES,
    EMU_C_H2D_COPIES,
    EMU_C_D2H_BYTES,
    EMU_C_D2H_COPIES,
    EMU_C_KERNELS,
    EMU_C_LIB_CALLS,
    EMU_C_GRAPH_LAUNCHES,
    EMU_C_GRAPH_OPS,
    EMU_C_N_COUNTERS
};
void emu_c_counters(unsigned long long *out);
/* For the cuBLASLt shim: fn(a copy of arg's bytes) now, or recorded when s
 * captures (then run at each replay). Returns cudaSuccess or
 * cudaErrorStreamCaptureInvalidated. */
cudaError_t emu_c_submit(cudaStream_t s, void (*fn)(void *), const void *arg, size_t bytes);

#endif
