/*
 * engine/cpu/matmul.h — CPU dot/GEMM kernels over model weight tensors
 * (internal to engine/; used by the CPU backend).
 *
 * All kernels read weights in their stored dtype (F32, F16, BF16, Q8_0) and
 * accumulate in f32. AVX2+FMA (and AVX-512 when compiled for it) paths with a
 * portable scalar fallback. Thread-safe: pure functions over caller memory.
 */
#ifndef D2_ENGINE_CPU_MATMUL_H
#define D2_ENGINE_CPU_MATMUL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/model/model.h"

/* Floats of per-thread scratch eng_mm_rows needs for tensors of up to
 * max_cols columns. */
size_t eng_mm_scratch_floats(int64_t max_cols);

/* For rows r in [r0, r1) of W and tokens t in [0, n_tok):
 *   y[t*ldy + r] = sum_i W[r][i] * x[t*ldx + i]
 * Weight rows are read once per call and reused across all tokens. */
void eng_mm_rows(const eng_tensor *w, const float *x, int64_t ldx, int n_tok, float *y,
                 int64_t ldy, int64_t r0, int64_t r1, float *scratch);

/* Row r of t converted to f32 (vectorised). */
void eng_mm_row_f32(const eng_tensor *t, int64_t r, float *out);

/* f32 helpers for attention. */
float eng_dot_f32(const float *a, const float *b, int n);
/* y += a * x */
void eng_axpy_f32(float *y, float a, const float *x, int n);

#endif
