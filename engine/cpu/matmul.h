/*
 * engine/cpu/matmul.h — CPU dot/GEMM kernels over model weight tensors
 * (internal to engine/; used by the CPU backend).
 *
 * All kernels read weights in their stored dtype (F32, F16, BF16, Q8_0) and
 * accumulate in f32. AVX2+FMA (and AVX-512 when compiled for it) paths with a
 * portable scalar fallback, chosen at compile time by the target's macros.
 * Where the target has them, two kernels round the activations first:
 *   BF16 weights + AVX512_BF16: activations rounded to bf16 (nearest even;
 *     relative error <= 2^-8 per element), products summed in f32 (vdpbf16ps);
 *   Q8_0 weights + AVX512_VNNI: activations quantised per 32-block to int8
 *     with an f32 scale d = max|x|/127 (error <= d/2 per element), integer
 *     block dots (vpdpbusd) scaled in f32 — llama.cpp's q8_0 x q8_0 scheme.
 * Both apply to every token count, so a token's result does not depend on
 * what it is batched with beyond summation order. F32 and F16 weights use
 * exact f32 activations. Thread-safe: pure functions over caller memory.
 */
#ifndef D2_ENGINE_CPU_MATMUL_H
#define D2_ENGINE_CPU_MATMUL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/model/model.h"

/* Most tokens one eng_mm_rows call takes (callers block larger batches). */
#define ENG_MM_MAX_TOK 64

/* Floats of per-thread scratch eng_mm_rows needs for tensors of up to
 * max_cols columns and up to ENG_MM_MAX_TOK tokens. */
size_t eng_mm_scratch_floats(int64_t max_cols);

/* For rows r in [r0, r1) of W and tokens t in [0, n_tok <= ENG_MM_MAX_TOK):
 *   y[t*ldy + r] = sum_i W[r][i] * x[t*ldx + i]
 * Weight rows are read once per call and reused across all tokens. */
void eng_mm_rows(const eng_tensor *w, const float *x, int64_t ldx, int n_tok, float *y,
                 int64_t ldy, int64_t r0, int64_t r1, float *scratch);

/* Which kernel eng_mm_rows runs for weights of dtype dt in this build, e.g.
 * "avx512-bf16dp" or "avx2" or "scalar" (static string). Kernels whose name
 * ends in "bf16dp" round the activations to bf16, "vnni" to int8 per 32-block
 * (see above); the others use them as f32. A "bf16dp" build uses it only for
 * calls of at most eng_mm_bf16dp_max_tokens() tokens (decode), and the f32
 * tile (activations unrounded) above that, where the step is compute-bound. */
const char *eng_mm_kernel_name(eng_dtype dt);
int eng_mm_bf16dp_max_tokens(void);

/* Row r of t converted to f32 (vectorised). */
void eng_mm_row_f32(const eng_tensor *t, int64_t r, float *out);

/* f32 helpers for attention. */
float eng_dot_f32(const float *a, const float *b, int n);
/* y += a * x */
void eng_axpy_f32(float *y, float a, const float *x, int n);

#endif
