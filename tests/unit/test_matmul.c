/*
 * tests/unit/test_matmul.c — the CPU GEMM kernels (engine/cpu/matmul.c)
 * against a straightforward double-precision reference, per weight dtype,
 * over odd shapes: 1..40 tokens, row counts that are not a multiple of the
 * 4-row block, column counts with tails (multiples of 32 for Q8_0), a row
 * sub-range and padded strides.
 *
 * Tolerances, with S = sum_i |w_i x_i| for one output and n its columns:
 *   f32 activations (f32/f16 weights, and bf16/q8_0 without the rounding
 *     kernels): |y - ref| <= (n + 4) * 2^-24 * S, the f32 summation bound;
 *   bf16-rounded activations ("bf16dp"): + 2^-8 * S (round to nearest even
 *     changes each x_i by at most 2^-8 |x_i|);
 *   int8 activations per 32-block ("vnni"): + sum_b (max_b|x| / 254) *
 *     sum_{i in b} |w_i| (round to nearest of x / d, d = max_b|x| / 127).
 * The same source is also built against matmul.c compiled for AVX2
 * (test_matmul_avx2) and AVX-512 without BF16/VNNI (test_matmul_avx512); the
 * sanitizer build compiles it for the baseline ISA (the scalar path). Each
 * skips where the CPU lacks what it was compiled for.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/util.h"
#include "engine/cpu/matmul.h"
#include "tests/test.h"

static uint64_t rng_state = 88172645463325252ULL;
static float urand(void) { /* [-1, 1) */
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((double)(rng_state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* The ISA this binary's matmul.c was built for must be present. */
static void need_isa(void) {
#if defined(D2_MM_VARIANT_AVX512)
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq"))
        SKIP("no AVX-512 F/BW/VL/DQ on this CPU");
#elif defined(D2_MM_VARIANT_AVX2)
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
        SKIP("no AVX2/FMA on this CPU");
#endif
}

/* A weights tensor of dtype dt with values in [-1, 1) (scaled per row so the
 * rows differ in magnitude), and its exact f32 values. */
static void make_w(eng_tensor *t, eng_dtype dt, int64_t rows, int64_t cols, float *wf) {
    size_t n = (size_t)rows * (size_t)cols;
    t->rows = rows;
    t->cols = cols;
    t->dtype = dt;
    t->name = "w";
    if (dt == ENG_Q8_0) {
        uint8_t *p = malloc(n / 32 * 34);
        for (size_t b = 0; b < n / 32; b++) {
            float d = (0.5f + (float)(b % 7)) / 127.0f * 0.01f;
            uint16_t dh = d2_f32_to_f16(d);
            memcpy(p + b * 34, &dh, 2);
            for (int j = 0; j < 32; j++) {
                int q = (int)(urand() * 127.0f);
                p[b * 34 + 2 + (size_t)j] = (uint8_t)(int8_t)q;
                wf[b * 32 + (size_t)j] = d2_f16_to_f32(dh) * (float)q;
            }
        }
        t->data = p;
        return;
    }
    void *p = malloc(n * (dt == ENG_F32 ? 4 : 2));
    for (size_t i = 0; i < n; i++) {
        float v = urand() * (1.0f + (float)(i / (size_t)cols % 3));
        if (dt == ENG_F32) {
            ((float *)p)[i] = wf[i] = v;
        } else if (dt == ENG_F16) {
            ((uint16_t *)p)[i] = d2_f32_to_f16(v);
            wf[i] = d2_f16_to_f32(((uint16_t *)p)[i]);
        } else {
            ((uint16_t *)p)[i] = d2_f32_to_bf16(v);
            wf[i] = d2_bf16_to_f32(((uint16_t *)p)[i]);
        }
    }
    t->data = p;
}

/* Runs eng_mm_rows for rows [r0, r1) and every token count 1..max_tok and
 * checks each output against the reference with the dtype's bound; outputs
 * outside [r0, r1) must stay untouched. Returns the worst error / bound. */
static double check_shape(eng_dtype dt, int64_t rows, int64_t cols, int64_t r0, int64_t r1, int max_tok) {
    const char *kn = eng_mm_kernel_name(dt);
    size_t kl = strlen(kn);
    int bf16dp = kl >= 6 && !strcmp(kn + kl - 6, "bf16dp");
    int vnni = kl >= 4 && !strcmp(kn + kl - 4, "vnni");
    int64_t ldx = cols + 3, ldy = rows + 5;
    float *wf = malloc(sizeof(float) * (size_t)(rows * cols));
    eng_tensor w;
    make_w(&w, dt, rows, cols, wf);
    float *x = malloc(sizeof(float) * (size_t)(max_tok * ldx));
    for (int64_t i = 0; i < max_tok * ldx; i++) x[i] = urand() * (1.0f + (float)(i % 5)) * 3.0f;
    float *y = malloc(sizeof(float) * (size_t)(max_tok * ldy));
    float *scratch = malloc(sizeof(float) * eng_mm_scratch_floats(cols));
    double worst = 0.0;
    for (int nt = 1; nt <= max_tok; nt++) {
        for (int64_t i = 0; i < max_tok * ldy; i++) y[i] = -12345.0f;
        eng_mm_rows(&w, x, ldx, nt, y, ldy, r0, r1, scratch);
        for (int t = 0; t < max_tok; t++)
            for (int64_t r = 0; r < ldy; r++) {
                float got = y[t * ldy + r];
                if (t >= nt || r < r0 || r >= r1) {
                    if (got != -12345.0f) FAIL_("%s %s: wrote y[t=%d][r=%lld] outside the call", eng_dtype_name(dt), kn, t, (long long)r);
                    continue;
                }
                const float *xt = x + t * ldx, *wr = wf + r * cols;
                double ref = 0.0, s = 0.0, qerr = 0.0;
                for (int64_t i = 0; i < cols; i++) {
                    ref += (double)wr[i] * xt[i];
                    s += fabs((double)wr[i] * xt[i]);
                }
                if (vnni)
                    for (int64_t b = 0; b < cols / 32; b++) {
                        double amax = 0.0, sw = 0.0;
                        for (int j = 0; j < 32; j++) {
                            if (fabs(xt[b * 32 + j]) > amax) amax = fabs(xt[b * 32 + j]);
                            sw += fabs(wr[b * 32 + j]);
                        }
                        qerr += amax / 254.0 * sw * 1.0001;
                    }
                double bound = (double)(cols + 4) * ldexp(1.0, -24) * s + (bf16dp && nt <= eng_mm_bf16dp_max_tokens() ? ldexp(1.0, -8) * s : 0.0) + qerr + 1e-30;
                double e = fabs((double)got - ref);
                if (!(e <= bound))
                    FAIL_("%s %s rows %lld cols %lld tokens %d: y[%d][%lld] = %.9g, ref %.9g, |err| %.3g > bound %.3g",
                          eng_dtype_name(dt), kn, (long long)rows, (long long)cols, nt, t, (long long)r, got, ref, e, bound);
                if (e / bound > worst) worst = e / bound;
            }
    }
    free(wf);
    free((void *)w.data);
    free(x);
    free(y);
    free(scratch);
    return worst;
}

static void check_dtype(eng_dtype dt) {
    need_isa();
    static const int64_t cols_any[] = {7, 33, 200, 800};
    static const int64_t cols_q8[] = {32, 96, 160, 800};
    static const int64_t rows[] = {1, 5, 37};
    double worst = 0.0;
    for (int ci = 0; ci < 4; ci++)
        for (int ri = 0; ri < 3; ri++) {
            int64_t c = dt == ENG_Q8_0 ? cols_q8[ci] : cols_any[ci], r = rows[ri];
            double e = check_shape(dt, r, c, 0, r, 40);
            if (e > worst) worst = e;
            if (r > 4) { /* a sub-range starting off the 4-row grid */
                e = check_shape(dt, r, c, 1, r - 1, 40);
                if (e > worst) worst = e;
            }
        }
    printf("  %s (%s): worst error %.3f of the bound\n", eng_dtype_name(dt), eng_mm_kernel_name(dt), worst);
}

TEST(matmul_f32) { check_dtype(ENG_F32); }
TEST(matmul_f16) { check_dtype(ENG_F16); }
TEST(matmul_bf16) { check_dtype(ENG_BF16); }
TEST(matmul_q8_0) { check_dtype(ENG_Q8_0); }

/* ---- D2_MATMUL_BENCH=1: GFLOP/s of one thread against the core's peak ------
 * Timed in thread CPU time (CLOCK_THREAD_CPUTIME_ID), best of 5, so other
 * processes on a shared machine distort it less than wall time (a busy
 * hyperthread sibling still does). The peak is a loop of 12 independent
 * 512-bit FMAs (and vdpbf16ps / vpdpbusd where compiled), timed the same way.
 * Shape: 2048 x 768 (the 100M model's gate/up), rows in chunks of 64 as the
 * backend's tasks walk them. */
static double thread_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

#if defined(__AVX512F__)
#include <immintrin.h>
#define PEAK_LOOP(NAME, T, INIT, OP, FLOPS)                                                  \
    do {                                                                                     \
        T a[12];                                                                             \
        for (int k = 0; k < 12; k++) a[k] = INIT;                                            \
        long n = 100000000L;                                                                 \
        double t0 = thread_s();                                                              \
        for (long i = 0; i < n / 12; i++)                                                    \
            for (int k = 0; k < 12; k++) {                                                   \
                a[k] = OP;                                                                   \
                __asm__ volatile("" : "+v"(a[k]));                                           \
            }                                                                                \
        double dt = thread_s() - t0;                                                         \
        printf("  peak %-10s %6.1f GFLOP/s per core (%.2f G instructions/s)\n", NAME,       \
               (double)(n / 12 * 12) * (FLOPS) / dt / 1e9, (double)(n / 12 * 12) / dt / 1e9); \
    } while (0)
static void peaks(void) {
    __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-9f);
    PEAK_LOOP("fp32 FMA", __m512, _mm512_set1_ps(1.0f), _mm512_fmadd_ps(a[k], b, c), 32.0);
#if defined(__AVX512BF16__)
    __m512bh wb = (__m512bh)_mm512_set1_epi16(0x3f80);
    PEAK_LOOP("vdpbf16ps", __m512, _mm512_setzero_ps(), _mm512_dpbf16_ps(a[k], wb, wb), 64.0);
#endif
#if defined(__AVX512VNNI__)
    __m512i u = _mm512_set1_epi8(1);
    PEAK_LOOP("vpdpbusd", __m512i, _mm512_setzero_si512(), _mm512_dpbusd_epi32(a[k], u, u), 128.0);
#endif
}
#else
static void peaks(void) { printf("  (peak loops only in AVX-512 builds)\n"); }
#endif

TEST(bench_gflops) {
    if (!getenv("D2_MATMUL_BENCH")) SKIP("set D2_MATMUL_BENCH=1 to run the benchmark");
    need_isa();
    peaks();
    const int64_t R = 2048, C = 768;
    static const int toks[] = {1, 2, 8, 32, 64};
    float *x = malloc(sizeof(float) * 64 * (size_t)C), *y = malloc(sizeof(float) * 64 * (size_t)R);
    float *wf = malloc(sizeof(float) * (size_t)(R * C));
    float *scratch = malloc(sizeof(float) * eng_mm_scratch_floats(C));
    for (int64_t i = 0; i < 64 * C; i++) x[i] = urand();
    static const eng_dtype dts[] = {ENG_F32, ENG_F16, ENG_BF16, ENG_Q8_0};
    for (int d = 0; d < 4; d++) {
        eng_tensor w;
        make_w(&w, dts[d], R, C, wf);
        printf("  %-5s %-14s", eng_dtype_name(dts[d]), eng_mm_kernel_name(dts[d]));
        for (int k = 0; k < 5; k++) {
            double best = 1e30;
            for (int rep = 0; rep < 5; rep++) {
                double t0 = thread_s();
                for (int64_t r = 0; r < R; r += 64) eng_mm_rows(&w, x, C, toks[k], y, R, r, r + 64, scratch);
                double dt = thread_s() - t0;
                if (dt < best) best = dt;
            }
            printf(" n=%-2d %6.1f", toks[k], 2.0 * (double)(R * C) * toks[k] / best / 1e9);
        }
        printf(" GFLOP/s\n");
        free((void *)w.data);
    }
    free(x);
    free(y);
    free(wf);
    free(scratch);
}
