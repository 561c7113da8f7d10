/*
 * engine/cpu/matmul.c — weight GEMM / dot kernels for the CPU backend (see
 * cpu_matmul.h).
 *
 * Strategy: output rows are processed in blocks of 4. For few tokens (decode)
 * a fused kernel dequantises weights in registers and dots them against each
 * token; it is bound by memory bandwidth. For more tokens a register-blocked
 * micro-kernel computes a 4-row x NT-token tile (NT = 3 with AVX2, 4 with
 * AVX-512), widening F16/BF16 weights in registers; Q8_0 rows (and short tail
 * blocks) are first converted to f32 scratch. Every weight vector loaded
 * feeds NT FMAs and the weights stream from memory once per call however
 * many tokens there are (the caller blocks tokens so x stays in L2).
 */
#include "engine/cpu/matmul.h"

#include <string.h>

#include "common/util.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MM_AVX2 1
#else
#define MM_AVX2 0
#endif

#define Q8_BLOCK 32
#define Q8_BYTES 34
#define MM_RB 4 /* rows per block */

#if defined(__GNUC__)
#define MM_INLINE static inline __attribute__((always_inline))
#else
#define MM_INLINE static inline
#endif

size_t eng_mm_scratch_floats(int64_t max_cols) {
    return (size_t)MM_RB * (size_t)(max_cols + 16);
}

static size_t dtype_row_bytes(const eng_tensor *t) {
    switch (t->dtype) {
    case ENG_F32: return (size_t)t->cols * 4;
    case ENG_F16:
    case ENG_BF16: return (size_t)t->cols * 2;
    case ENG_Q8_0: return (size_t)(t->cols / Q8_BLOCK) * Q8_BYTES;
    }
    return 0;
}

static inline const uint8_t *row_ptr(const eng_tensor *t, int64_t r) {
    return (const uint8_t *)t->data + (size_t)r * dtype_row_bytes(t);
}

/* ---- AVX2 primitives ------------------------------------------------------ */
#if MM_AVX2
MM_INLINE float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
MM_INLINE __m256 load_bf16x8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#if defined(__F16C__)
MM_INLINE __m256 load_f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
#endif
MM_INLINE __m256 load_i8x8(const int8_t *p) {
    __m128i b = _mm_loadl_epi64((const __m128i *)p);
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}
#endif

/* ---- row conversion ---------------------------------------------------------- */
void eng_mm_row_f32(const eng_tensor *t, int64_t r, float *out) {
    int64_t n = t->cols, i = 0;
    const uint8_t *p = row_ptr(t, r);
    switch (t->dtype) {
    case ENG_F32:
        memcpy(out, p, (size_t)n * sizeof(float));
        break;
    case ENG_F16: {
        const uint16_t *h = (const uint16_t *)p;
#if MM_AVX2 && defined(__F16C__)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load_f16x8(h + i));
#endif
        for (; i < n; i++) out[i] = d2_f16_to_f32(h[i]);
        break;
    }
    case ENG_BF16: {
        const uint16_t *h = (const uint16_t *)p;
#if MM_AVX2
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load_bf16x8(h + i));
#endif
        for (; i < n; i++) out[i] = d2_bf16_to_f32(h[i]);
        break;
    }
    case ENG_Q8_0:
        for (int64_t b = 0; b < n / Q8_BLOCK; b++) {
            const uint8_t *blk = p + b * Q8_BYTES;
            uint16_t dh;
            memcpy(&dh, blk, 2);
            float d = d2_f16_to_f32(dh);
            const int8_t *q = (const int8_t *)(blk + 2);
            float *o = out + b * Q8_BLOCK;
#if MM_AVX2
            __m256 dv = _mm256_set1_ps(d);
            for (int j = 0; j < Q8_BLOCK; j += 8) _mm256_storeu_ps(o + j, _mm256_mul_ps(dv, load_i8x8(q + j)));
#else
            for (int j = 0; j < Q8_BLOCK; j++) o[j] = d * (float)q[j];
#endif
        }
        break;
    }
}

/* ---- f32 helpers -------------------------------------------------------------- */
float eng_dot_f32(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.0f;
#if MM_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), a0);
    s = hsum256(_mm256_add_ps(a0, a1));
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

void eng_axpy_f32(float *y, float a, const float *x, int n) {
    int i = 0;
#if MM_AVX2
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* ---- fused dequantising dots (decode path) ------------------------------------- */
static float dot_row(const eng_tensor *t, const uint8_t *p, const float *x) {
    int64_t n = t->cols, i = 0;
    float s = 0.0f;
    switch (t->dtype) {
    case ENG_F32: {
        const float *w = (const float *)p;
        return eng_dot_f32(w, x, (int)n);
    }
    case ENG_F16: {
        const uint16_t *w = (const uint16_t *)p;
#if MM_AVX2 && defined(__F16C__)
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            a0 = _mm256_fmadd_ps(load_f16x8(w + i), _mm256_loadu_ps(x + i), a0);
            a1 = _mm256_fmadd_ps(load_f16x8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        }
        s = hsum256(_mm256_add_ps(a0, a1));
#endif
        for (; i < n; i++) s += d2_f16_to_f32(w[i]) * x[i];
        return s;
    }
    case ENG_BF16: {
        const uint16_t *w = (const uint16_t *)p;
#if MM_AVX2
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            a0 = _mm256_fmadd_ps(load_bf16x8(w + i), _mm256_loadu_ps(x + i), a0);
            a1 = _mm256_fmadd_ps(load_bf16x8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        }
        s = hsum256(_mm256_add_ps(a0, a1));
#endif
        for (; i < n; i++) s += d2_bf16_to_f32(w[i]) * x[i];
        return s;
    }
    case ENG_Q8_0: {
#if MM_AVX2
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < n / Q8_BLOCK; b++) {
            const uint8_t *blk = p + b * Q8_BYTES;
            uint16_t dh;
            memcpy(&dh, blk, 2);
            const int8_t *q = (const int8_t *)(blk + 2);
            const float *xb = x + b * Q8_BLOCK;
            __m256 bs = _mm256_mul_ps(load_i8x8(q), _mm256_loadu_ps(xb));
            bs = _mm256_fmadd_ps(load_i8x8(q + 8), _mm256_loadu_ps(xb + 8), bs);
            bs = _mm256_fmadd_ps(load_i8x8(q + 16), _mm256_loadu_ps(xb + 16), bs);
            bs = _mm256_fmadd_ps(load_i8x8(q + 24), _mm256_loadu_ps(xb + 24), bs);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d2_f16_to_f32(dh)), bs, acc);
        }
        return hsum256(acc);
#else
        for (int64_t b = 0; b < n / Q8_BLOCK; b++) {
            const uint8_t *blk = p + b * Q8_BYTES;
            uint16_t dh;
            memcpy(&dh, blk, 2);
            const int8_t *q = (const int8_t *)(blk + 2);
            float bs = 0.0f;
            for (int j = 0; j < Q8_BLOCK; j++) bs += (float)q[j] * x[b * Q8_BLOCK + j];
            s += d2_f16_to_f32(dh) * bs;
        }
        return s;
#endif
    }
    }
    return 0.0f;
}

/* ---- register-blocked micro-kernels ------------------------------------------
 * tile_<type>(w, ldw, nr, x, ldx, NT, n, y, ldy): MM_RB weight rows (stride ldw
 * elements of the stored type) x NT tokens -> y[t*ldy + r] for r < nr. Half
 * types are widened in registers, once per loaded vector, reused NT times. */
static inline float sc_f32(const float *p, int64_t j) { return p[j]; }
static inline float sc_bf16(const uint16_t *p, int64_t j) { return d2_bf16_to_f32(p[j]); }
static inline float sc_f16(const uint16_t *p, int64_t j) { return d2_f16_to_f32(p[j]); }

#if MM_AVX2 && defined(__AVX512F__)
#define MM_NT 4
#define MM_VL 16
typedef __m512 vec_t;
#define V_ZERO() _mm512_setzero_ps()
#define V_LOADX(p) _mm512_loadu_ps(p)
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_HSUM(v) _mm512_reduce_add_ps(v)
#define LD_f32(p) _mm512_loadu_ps(p)
#define LD_bf16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define LD_f16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#elif MM_AVX2
#define MM_NT 3
#define MM_VL 8
typedef __m256 vec_t;
#define V_ZERO() _mm256_setzero_ps()
#define V_LOADX(p) _mm256_loadu_ps(p)
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_HSUM(v) hsum256(v)
#define LD_f32(p) _mm256_loadu_ps(p)
#define LD_bf16(p) load_bf16x8(p)
#define LD_f16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#endif

#ifdef MM_NT
#define DEFINE_TILE(TY, WT)                                                                   \
    MM_INLINE void tile_##TY(const WT *w, int64_t ldw, int nr, const float *x, int64_t ldx,  \
                             int NT, int64_t n, float *y, int64_t ldy) {                      \
        vec_t acc[MM_RB][MM_NT];                                                              \
        for (int r = 0; r < MM_RB; r++)                                                       \
            for (int t = 0; t < NT; t++) acc[r][t] = V_ZERO();                                \
        int64_t i = 0;                                                                        \
        for (; i + MM_VL <= n; i += MM_VL) {                                                  \
            vec_t xv[MM_NT];                                                                  \
            for (int t = 0; t < NT; t++) xv[t] = V_LOADX(x + t * ldx + i);                    \
            for (int r = 0; r < MM_RB; r++) {                                                 \
                vec_t wv = LD_##TY(w + r * ldw + i);                                          \
                for (int t = 0; t < NT; t++) acc[r][t] = V_FMA(wv, xv[t], acc[r][t]);         \
            }                                                                                 \
        }                                                                                     \
        for (int r = 0; r < nr; r++)                                                          \
            for (int t = 0; t < NT; t++) {                                                    \
                float s = V_HSUM(acc[r][t]);                                                  \
                for (int64_t j = i; j < n; j++) s += sc_##TY(w + r * ldw, j) * x[t * ldx + j]; \
                y[t * ldy + r] = s;                                                           \
            }                                                                                 \
    }
#else
#define MM_NT 1
#define DEFINE_TILE(TY, WT)                                                                   \
    MM_INLINE void tile_##TY(const WT *w, int64_t ldw, int nr, const float *x, int64_t ldx,  \
                             int NT, int64_t n, float *y, int64_t ldy) {                      \
        for (int r = 0; r < nr; r++)                                                          \
            for (int t = 0; t < NT; t++) {                                                    \
                float s = 0.0f;                                                               \
                for (int64_t j = 0; j < n; j++) s += sc_##TY(w + r * ldw, j) * x[t * ldx + j]; \
                y[t * ldy + r] = s;                                                           \
            }                                                                                 \
    }
#endif

/* Runs the tile over n_tok tokens: full MM_NT tiles, then the remainder. */
#define DEFINE_BLOCK(TY, WT)                                                                  \
    DEFINE_TILE(TY, WT)                                                                       \
    static void block_##TY(const WT *w, int64_t ldw, int nr, const float *x, int64_t ldx,    \
                           int n_tok, int64_t n, float *y, int64_t ldy) {                     \
        int t = 0;                                                                            \
        for (; t + MM_NT <= n_tok; t += MM_NT)                                                \
            tile_##TY(w, ldw, nr, x + t * ldx, ldx, MM_NT, n, y + t * ldy, ldy);              \
        switch (n_tok - t) {                                                                  \
        case 3: if (MM_NT > 3) tile_##TY(w, ldw, nr, x + t * ldx, ldx, 3, n, y + t * ldy, ldy); break; \
        case 2: if (MM_NT > 2) tile_##TY(w, ldw, nr, x + t * ldx, ldx, 2, n, y + t * ldy, ldy); break; \
        case 1: if (MM_NT > 1) tile_##TY(w, ldw, nr, x + t * ldx, ldx, 1, n, y + t * ldy, ldy); break; \
        default: break;                                                                       \
        }                                                                                     \
    }

DEFINE_BLOCK(f32, float)
DEFINE_BLOCK(bf16, uint16_t)
#if !MM_AVX2 || defined(__F16C__)
DEFINE_BLOCK(f16, uint16_t)
#define MM_HAVE_F16_TILE 1
#endif

void eng_mm_rows(const eng_tensor *w, const float *x, int64_t ldx, int n_tok, float *y,
                 int64_t ldy, int64_t r0, int64_t r1, float *scratch) {
    int64_t n = w->cols;
    if (w->dtype != ENG_F32 && n_tok <= 2) {
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *p = row_ptr(w, r);
            for (int t = 0; t < n_tok; t++) y[t * ldy + r] = dot_row(w, p, x + t * ldx);
        }
        return;
    }
    int64_t ldw = n;
    for (int64_t r = r0; r < r1; r += MM_RB) {
        int nr = (int)(r1 - r < MM_RB ? r1 - r : MM_RB);
        if (nr == MM_RB && w->dtype == ENG_F32) {
            block_f32((const float *)row_ptr(w, r), ldw, nr, x, ldx, n_tok, n, y + r, ldy);
        } else if (nr == MM_RB && w->dtype == ENG_BF16) {
            block_bf16((const uint16_t *)row_ptr(w, r), ldw, nr, x, ldx, n_tok, n, y + r, ldy);
#ifdef MM_HAVE_F16_TILE
        } else if (nr == MM_RB && w->dtype == ENG_F16) {
            block_f16((const uint16_t *)row_ptr(w, r), ldw, nr, x, ldx, n_tok, n, y + r, ldy);
#endif
        } else {
            /* Q8_0, and short tail blocks of any type: convert the rows to
             * f32 scratch, padding missing rows with the last one so the tile
             * reads valid memory. */
            for (int k = 0; k < MM_RB; k++)
                eng_mm_row_f32(w, r + (k < nr ? k : nr - 1), scratch + (size_t)k * (size_t)ldw);
            block_f32(scratch, ldw, nr, x, ldx, n_tok, n, y + r, ldy);
        }
    }
}
