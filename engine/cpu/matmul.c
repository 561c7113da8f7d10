/*
 * engine/cpu/matmul.c — weight GEMM / dot kernels for the CPU backend (see
 * cpu_matmul.h).
 *
 * Strategy: output rows are processed in blocks of 4. With AVX-512 (MM_X512)
 * the tiles are 4 rows x 6 tokens with a joint 4-row reduction, BF16 weights
 * use vdpbf16ps and Q8_0 weights vpdpbusd where the target has them, for
 * every token count (see "AVX-512 kernels"). Otherwise: For few tokens (decode)
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
/* AVX-512 tiles (see "AVX-512 kernels" below), selected by the target's
 * macros at compile time: MM_X512 needs F/BW/VL/DQ; MM_BF16DP adds
 * AVX512_BF16 (vdpbf16ps), MM_VNNI adds AVX512_VNNI (vpdpbusd). */
#if MM_AVX2 && defined(__F16C__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512DQ__)
#define MM_X512 1
#if defined(__AVX512BF16__)
#define MM_BF16DP 1
#endif
#if defined(__AVX512VNNI__)
#define MM_VNNI 1
#endif
#else
#define MM_X512 0
#endif
#ifndef MM_BF16DP
#define MM_BF16DP 0
#endif
#ifndef MM_VNNI
#define MM_VNNI 0
#endif
/* Largest token count that takes vdpbf16ps for bf16 weights; more tokens take
 * the f32 FMA tile on weights widened by a shift. Measured (BENCHMARKS.md,
 * "bf16: vdpbf16ps only for decode-sized batches"): on this Xeon vdpbf16ps
 * issues at ~0.7x the FMA rate, so once the step is compute-bound (8 and 32
 * tokens) the FMA tile was 1.2-1.3x faster, while at 1 token, memory-bound,
 * the halved activation traffic of bf16 pays. */
#ifndef MM_BF16DP_MAX_TOK
#define MM_BF16DP_MAX_TOK 2
#endif

#define Q8_BLOCK 32
#define Q8_BYTES 34
#define MM_RB 4 /* rows per block */

#if defined(__GNUC__)
#define MM_INLINE static inline __attribute__((always_inline))
#else
#define MM_INLINE static inline
#endif

/* Row conversion needs MM_RB f32 rows; the rounded activations of the
 * AVX-512 BF16 / VNNI kernels need at most 2 * max_cols + 64 bytes per token
 * (bf16 rows padded to 32; int8 rows padded to an even number of blocks plus
 * 32 bytes of scales per block). */
size_t eng_mm_scratch_floats(int64_t max_cols) {
    size_t rows = (size_t)MM_RB * (size_t)(max_cols + 16);
    size_t acts = (size_t)ENG_MM_MAX_TOK * (size_t)(max_cols / 2 + 32);
    return rows > acts ? rows : acts;
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

#if MM_AVX2
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

#if !MM_X512
DEFINE_BLOCK(f32, float)
DEFINE_BLOCK(bf16, uint16_t)
#if !MM_AVX2 || defined(__F16C__)
DEFINE_BLOCK(f16, uint16_t)
#define MM_HAVE_F16_TILE 1
#endif
#endif

/* ---- AVX-512 kernels ------------------------------------------------------------
 * Compiled when the target has AVX-512 F/BW/VL/DQ (and F16C, FMA). Every tile
 * is MM_RB = 4 weight rows x up to X5_NT tokens; the four rows' sums of one
 * token are reduced together (hsum4_512) and stored as 4 consecutive outputs.
 * Rows past nr point at row 0 of the block (valid memory; results dropped).
 *   f32 / f16 weights: f32 FMA on 16 columns per step (f16 widened with
 *     vcvtph2ps once per loaded vector, reused by every token).
 *   bf16 weights (AVX512_BF16): activations rounded to bf16 (nearest even)
 *     once per call, vdpbf16ps on 32 columns per step, f32 accumulation.
 *   q8_0 weights (AVX512_VNNI): activations quantised per 32-block to int8
 *     with an f32 scale (llama.cpp's q8_0 x q8_0 scheme), stored offset by
 *     128 as u8 so vpdpbusd multiplies them with the signed weights directly;
 *     the offset is cancelled by starting each block's sum at -128 * sum(w),
 *     itself one vpdpbusd. Two blocks per 512-bit step. */
#if MM_X512
#define X5_NT 6 /* tokens per tile: 4 x 6 accumulators + operands fit 32 registers */

/* lanes 0..3 = the horizontal sums of a0..a3 */
MM_INLINE __m128 hsum4_512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512d d0 = _mm512_castps_pd(t0), d1 = _mm512_castps_pd(t1);
    __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

MM_INLINE void store_rows(float *y, int nr, __m128 v) {
    if (nr == MM_RB) _mm_storeu_ps(y, v);
    else _mm_mask_storeu_ps(y, (__mmask8)((1u << nr) - 1u), v);
}

MM_INLINE __mmask16 mask16(int64_t k) { return k >= 16 ? (__mmask16)0xFFFF : k <= 0 ? 0 : (__mmask16)((1u << k) - 1u); }

#define X5_LD_f32(p, m) _mm512_maskz_loadu_ps(m, p)
#define X5_LD_f16(p, m) _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p))

/* tile512_<TY>: w[r] = row r (r < 4), x tokens at stride ldx (f32). */
#define DEFINE_TILE512(TY, WT)                                                                  \
    MM_INLINE void tile512_##TY(const WT *const *w, int nr, const float *x, int64_t ldx, int NT, \
                                int64_t n, float *y, int64_t ldy) {                             \
        __m512 acc[MM_RB][X5_NT];                                                               \
        _Pragma("GCC unroll 8")                                                                 \
        for (int r = 0; r < MM_RB; r++)                                                         \
            _Pragma("GCC unroll 8")                                                             \
            for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();                       \
        for (int64_t i = 0; i < n; i += 16) {                                                   \
            __mmask16 m = mask16(n - i);                                                        \
            __m512 wv[MM_RB];                                                                   \
            _Pragma("GCC unroll 8")                                                             \
            for (int r = 0; r < MM_RB; r++) wv[r] = X5_LD_##TY(w[r] + i, m);                    \
            if (NT <= 2) {                                                                      \
                _Pragma("GCC unroll 8")                                                         \
                for (int r = 0; r < MM_RB; r++)                                                 \
                    _mm_prefetch((const char *)(w[r] + i + MM_RB * n), _MM_HINT_T0);            \
            }                                                                                   \
            _Pragma("GCC unroll 8")                                                             \
            for (int t = 0; t < NT; t++) {                                                      \
                __m512 xv = _mm512_maskz_loadu_ps(m, x + t * ldx + i);                          \
                _Pragma("GCC unroll 8")                                                            \
                for (int r = 0; r < MM_RB; r++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv, acc[r][t]); \
            }                                                                                   \
        }                                                                                       \
        _Pragma("GCC unroll 8")                                                                 \
        for (int t = 0; t < NT; t++)                                                            \
            store_rows(y + t * ldy, nr, hsum4_512(acc[0][t], acc[1][t], acc[2][t], acc[3][t])); \
    }

/* Runs TILE over n_tok tokens: full tiles of NTMAX (<= X5_NT) tokens, then
 * one tile of the rest (NT a constant in every call, so each is specialised). */
#define X5_TOKENS(TILE, XSTEP, NTMAX, ...)                                                      \
    do {                                                                                        \
        int t_ = 0;                                                                             \
        for (; t_ + (NTMAX) <= n_tok; t_ += (NTMAX)) TILE(__VA_ARGS__, x + t_ * (XSTEP), NTMAX, y + t_ * ldy); \
        switch (n_tok - t_) {                                                                   \
        case 5: TILE(__VA_ARGS__, x + t_ * (XSTEP), 5, y + t_ * ldy); break;                    \
        case 4: TILE(__VA_ARGS__, x + t_ * (XSTEP), 4, y + t_ * ldy); break;                    \
        case 3: TILE(__VA_ARGS__, x + t_ * (XSTEP), 3, y + t_ * ldy); break;                    \
        case 2: TILE(__VA_ARGS__, x + t_ * (XSTEP), 2, y + t_ * ldy); break;                    \
        case 1: TILE(__VA_ARGS__, x + t_ * (XSTEP), 1, y + t_ * ldy); break;                    \
        default: break;                                                                         \
        }                                                                                       \
    } while (0)

#define DEFINE_BLOCK512(TY, WT)                                                                 \
    DEFINE_TILE512(TY, WT)                                                                      \
    static void block512_##TY(const WT *const *w, int nr, const float *x, int64_t ldx, int n_tok, \
                              int64_t n, float *y, int64_t ldy) {                               \
        X5_TOKENS(X5_CALL_##TY, ldx, X5_NT, w, nr);                                                    \
    }
#define X5_CALL_f32(w, nr, xp, NT, yp) tile512_f32(w, nr, xp, ldx, NT, n, yp, ldy)
#define X5_CALL_f16(w, nr, xp, NT, yp) tile512_f16(w, nr, xp, ldx, NT, n, yp, ldy)
DEFINE_BLOCK512(f32, float)
DEFINE_BLOCK512(f16, uint16_t)
#define X5_LD_bf16(p, m) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16))
#define X5_CALL_bf16(w, nr, xp, NT, yp) tile512_bf16(w, nr, xp, ldx, NT, n, yp, ldy)
DEFINE_BLOCK512(bf16, uint16_t)

#if MM_BF16DP
/* Padded row length (elements) of the bf16 copy of the activations. */
static int64_t bf_ld(int64_t n) { return (n + 31) & ~(int64_t)31; }

/* x (f32, n_tok rows at stride ldx) -> bf16 rounded to nearest even, rows at
 * stride bf_ld(n), zero-padded. */
static void x_to_bf16(const float *x, int64_t ldx, int n_tok, int64_t n, uint16_t *xb) {
    int64_t ld = bf_ld(n);
    for (int t = 0; t < n_tok; t++)
        for (int64_t i = 0; i < ld; i += 32) {
            __m512 lo = _mm512_maskz_loadu_ps(mask16(n - i), x + t * ldx + i);
            __m512 hi = _mm512_maskz_loadu_ps(mask16(n - i - 16), x + t * ldx + i + 16);
            __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);
            _mm512_storeu_si512((void *)(xb + t * ld + i), (__m512i)v);
        }
}

MM_INLINE void tile_bf16dp(const uint16_t *const *w, int nr, const uint16_t *x, int64_t ldx, int NT,
                           int64_t n, float *y, int64_t ldy) {
    __m512 acc[MM_RB][X5_NT];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MM_RB; r++)
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {
        int64_t k = n - i;
        __mmask32 m = k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << k) - 1u);
        __m512i wv[MM_RB];
        _Pragma("GCC unroll 8")
        for (int r = 0; r < MM_RB; r++) wv[r] = _mm512_maskz_loadu_epi16(m, w[r] + i);
        if (NT <= 2) {
            _Pragma("GCC unroll 8")
            for (int r = 0; r < MM_RB; r++) _mm_prefetch((const char *)(w[r] + i + MM_RB * n), _MM_HINT_T0);
        }
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x + t * ldx + i));
            _Pragma("GCC unroll 8")
            for (int r = 0; r < MM_RB; r++)
                acc[r][t] = _mm512_dpbf16_ps(acc[r][t], (__m512bh)wv[r], (__m512bh)xv);
        }
    }
    _Pragma("GCC unroll 8")
    for (int t = 0; t < NT; t++)
        store_rows(y + t * ldy, nr, hsum4_512(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
}
#define X5_CALL_bf16dp(w, nr, xp, NT, yp) tile_bf16dp(w, nr, xp, ldxb, NT, n, yp, ldy)

static void rows_bf16dp(const eng_tensor *wt, const float *x0, int64_t ldx0, int n_tok, float *y0,
                        int64_t ldy, int64_t r0, int64_t r1, float *scratch) {
    int64_t n = wt->cols, ldxb = bf_ld(n);
    uint16_t *xb = (uint16_t *)scratch;
    x_to_bf16(x0, ldx0, n_tok, n, xb);
    const uint16_t *x = xb;
    for (int64_t r = r0; r < r1; r += MM_RB) {
        int nr = (int)(r1 - r < MM_RB ? r1 - r : MM_RB);
        const uint16_t *w[MM_RB];
        for (int k = 0; k < MM_RB; k++) w[k] = (const uint16_t *)row_ptr(wt, r + (k < nr ? k : 0));
        float *y = y0 + r;
        X5_TOKENS(X5_CALL_bf16dp, ldxb, X5_NT, w, nr);
    }
}
#endif /* MM_BF16DP */

#if MM_VNNI
/* Quantised activations: per token, bytes q + 128 (q = round(x / d) in
 * [-127, 127], d = max|x| / 127 per 32-block) for an even number of blocks,
 * then the scale of each block repeated 8 times (one 512-bit vector per two
 * blocks, matching vpdpbusd's lanes). A missing odd block is zero. */
static int64_t q8_nb2(int64_t n) { return ((n / Q8_BLOCK) + 1) & ~(int64_t)1; }
static int64_t q8_ld(int64_t n) { return q8_nb2(n) * Q8_BLOCK + q8_nb2(n) * 8 * 4; }

static void x_to_q8(const float *x, int64_t ldx, int n_tok, int64_t n, uint8_t *xq) {
    int64_t nb = n / Q8_BLOCK, nb2 = q8_nb2(n), ld = q8_ld(n);
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int t = 0; t < n_tok; t++) {
        uint8_t *q = xq + t * ld;
        float *dv = (float *)(q + nb2 * Q8_BLOCK);
        const float *xt = x + t * ldx;
        for (int64_t b = 0; b < nb; b++) {
            __m512 a = _mm512_loadu_ps(xt + b * 32), c = _mm512_loadu_ps(xt + b * 32 + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, a), _mm512_andnot_ps(sign, c)));
            float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
            __m512 iv = _mm512_set1_ps(id);
            __m512i off = _mm512_set1_epi32(128);
            __m512i qa = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, iv)), off);
            __m512i qc = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(c, iv)), off);
            _mm_storeu_si128((__m128i *)(q + b * 32), _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(q + b * 32 + 16), _mm512_cvtepi32_epi8(qc));
            _mm256_storeu_ps(dv + b * 8, _mm256_set1_ps(d));
        }
        if (nb < nb2) {
            memset(q + nb * 32, 128, 32);
            _mm256_storeu_ps(dv + nb * 8, _mm256_setzero_ps());
        }
    }
}

MM_INLINE void tile_q8vnni(const uint8_t *const *w, int nr, const uint8_t *x, int64_t ldx, int NT,
                           int64_t nb, float *y, int64_t ldy) {
    __m512 acc[MM_RB][X5_NT];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < MM_RB; r++)
        _Pragma("GCC unroll 8")
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512(), c128 = _mm512_set1_epi8((char)0x80);
    const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const float *dx = (const float *)(x + q8_nb2(nb * Q8_BLOCK) * Q8_BLOCK);
    for (int64_t b = 0; b < nb; b += 2) {
        int two = b + 1 < nb;
        _Pragma("GCC unroll 8")
        for (int r = 0; r < MM_RB; r++) {
            const uint8_t *p0 = w[r] + b * Q8_BYTES, *p1 = p0 + Q8_BYTES;
            if (NT <= 2) _mm_prefetch((const char *)(p0 + MM_RB * nb * Q8_BYTES), _MM_HINT_T0);
            __m256i q0 = _mm256_loadu_si256((const __m256i *)(p0 + 2));
            __m256i q1 = two ? _mm256_loadu_si256((const __m256i *)(p1 + 2)) : _mm256_setzero_si256();
            __m512i wq = _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
            __m512i negc = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c128, wq));
            uint16_t h0, h1 = 0;
            memcpy(&h0, p0, 2);
            if (two) memcpy(&h1, p1, 2);
            __m128 d01 = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)h0 | ((uint32_t)h1 << 16))));
            __m512 dw = _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(d01));
            _Pragma("GCC unroll 8")
            for (int t = 0; t < NT; t++) {
                __m512i xv = _mm512_loadu_si512((const void *)(x + t * ldx + b * Q8_BLOCK));
                __m512i s = _mm512_dpbusd_epi32(negc, xv, wq);
                __m512 sc = _mm512_mul_ps(dw, _mm512_loadu_ps((const float *)((const uint8_t *)dx + t * ldx) + b * 8));
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[r][t]);
            }
        }
    }
    _Pragma("GCC unroll 8")
    for (int t = 0; t < NT; t++)
        store_rows(y + t * ldy, nr, hsum4_512(acc[0][t], acc[1][t], acc[2][t], acc[3][t]));
}
#define X5_CALL_q8vnni(w, nr, xp, NT, yp) tile_q8vnni(w, nr, xp, ldxq, NT, nb, yp, ldy)

static void rows_q8vnni(const eng_tensor *wt, const float *x0, int64_t ldx0, int n_tok, float *y0,
                        int64_t ldy, int64_t r0, int64_t r1, float *scratch) {
    int64_t n = wt->cols, nb = n / Q8_BLOCK, ldxq = q8_ld(n);
    uint8_t *xq = (uint8_t *)scratch;
    x_to_q8(x0, ldx0, n_tok, n, xq);
    const uint8_t *x = xq;
    for (int64_t r = r0; r < r1; r += MM_RB) {
        int nr = (int)(r1 - r < MM_RB ? r1 - r : MM_RB);
        const uint8_t *w[MM_RB];
        for (int k = 0; k < MM_RB; k++) w[k] = row_ptr(wt, r + (k < nr ? k : 0));
        float *y = y0 + r;
        X5_TOKENS(X5_CALL_q8vnni, ldxq, 4, w, nr); /* 4 x 4 accumulators: more spill */
    }
}
#endif /* MM_VNNI */
#endif /* AVX-512 */

int eng_mm_bf16dp_max_tokens(void) { return MM_BF16DP ? MM_BF16DP_MAX_TOK : 0; }

const char *eng_mm_kernel_name(eng_dtype dt) {
    if (dt == ENG_Q8_0 && MM_VNNI) return "avx512-vnni";
    if (dt == ENG_BF16 && MM_BF16DP) return "avx512-bf16dp";
    if (MM_X512) return "avx512";
    return MM_AVX2 ? "avx2" : "scalar";
}

void eng_mm_rows(const eng_tensor *w, const float *x, int64_t ldx, int n_tok, float *y,
                 int64_t ldy, int64_t r0, int64_t r1, float *scratch) {
    int64_t n = w->cols;
#if MM_VNNI
    if (w->dtype == ENG_Q8_0) {
        rows_q8vnni(w, x, ldx, n_tok, y, ldy, r0, r1, scratch);
        return;
    }
#endif
#if MM_BF16DP
    if (w->dtype == ENG_BF16 && n_tok <= MM_BF16DP_MAX_TOK) {
        rows_bf16dp(w, x, ldx, n_tok, y, ldy, r0, r1, scratch);
        return;
    }
#endif
    /* One or two tokens of a type without an AVX-512 tile here: fused
     * dequantising dots row by row (the AVX-512 tiles take f16/bf16 at every
     * token count: four rows' sums reduced together beat a dot per row). */
    if (w->dtype != ENG_F32 && n_tok <= 2 && !(MM_X512 && (w->dtype == ENG_F16 || w->dtype == ENG_BF16))) {
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *p = row_ptr(w, r);
            for (int t = 0; t < n_tok; t++) y[t * ldy + r] = dot_row(w, p, x + t * ldx);
        }
        return;
    }
#if MM_X512
    for (int64_t r = r0; r < r1; r += MM_RB) {
        int nr = (int)(r1 - r < MM_RB ? r1 - r : MM_RB);
        if (w->dtype == ENG_F32 || w->dtype == ENG_F16 || w->dtype == ENG_BF16) {
            const void *rp[MM_RB];
            for (int k = 0; k < MM_RB; k++) rp[k] = row_ptr(w, r + (k < nr ? k : 0));
            if (w->dtype == ENG_F32)
                block512_f32((const float *const *)rp, nr, x, ldx, n_tok, n, y + r, ldy);
            else if (w->dtype == ENG_F16)
                block512_f16((const uint16_t *const *)rp, nr, x, ldx, n_tok, n, y + r, ldy);
            else
                block512_bf16((const uint16_t *const *)rp, nr, x, ldx, n_tok, n, y + r, ldy);
        } else {
            /* Q8_0 without VNNI: rows to f32 scratch, then the f32 tile. */
            const float *rp[MM_RB];
            for (int k = 0; k < MM_RB; k++) {
                rp[k] = scratch + (size_t)(k < nr ? k : 0) * (size_t)n;
                if (k < nr) eng_mm_row_f32(w, r + k, scratch + (size_t)k * (size_t)n);
            }
            block512_f32(rp, nr, x, ldx, n_tok, n, y + r, ldy);
        }
    }
#else
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
#endif
}
