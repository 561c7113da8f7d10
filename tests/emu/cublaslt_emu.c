/*
 * tests/emu/cublaslt_emu.c — the cuBLASLt shim of the emulator
 * (include_c/cublasLt.h): D = alpha * op(A) op(B) + beta * C (+ bias), on
 * the CPU, written from cuBLASLt's documented semantics and sharing nothing
 * with the callers' code, so a layout the caller gets wrong is not wrong the
 * same way here.
 *
 * Semantics implemented (cuBLASLt documentation, cublasLtMatmul):
 *   - every matrix is column-major: element (r, c) of a layout lives at
 *     base[r + c * ld], with ld >= rows;
 *   - op(A) is m x k and op(B) is k x n, where A's layout is m x k for
 *     TRANSA = N and k x m for T (the same for B); C and D are m x n;
 *   - a multiply-add in fp32 of bf16 inputs, accumulated in k order; beta = 0
 *     does not read C;
 *   - CUBLASLT_EPILOGUE_BIAS adds bias[r] (fp32, m entries) to row r of every
 *     column after the alpha/beta combination.
 * Only the combinations of include_c/cublasLt.h are accepted; the rest is
 * CUBLAS_STATUS_NOT_SUPPORTED / INVALID_VALUE, as a caller must handle.
 * An algorithm from cublasLtMatmulAlgoGetHeuristic records the operation it
 * was found for (transposes, epilogue, m, k); cublasLtMatmul refuses it for
 * another one with CUBLAS_STATUS_INVALID_VALUE -- stricter than the library,
 * which may run it or fail, so that a cache handing out the wrong GEMM's
 * algorithm is caught here. Heuristic queries are counted
 * (emu_cublaslt_counters). A matmul on a capturing stream is recorded with
 * its descriptors and layouts copied (emu_c_submit) and runs at each graph
 * replay.
 * Callers: emulator builds of host code (tests), one thread at a time.
 */
#include <stdlib.h>
#include <string.h>

#include <cublasLt.h>

struct cublasLtContext {
    int magic;
};
struct cublasLtMatmulDescOpaque {
    int compute, scale, transa, transb, epilogue, bias_type;
    const void *bias;
};
struct cublasLtMatmulPreferenceOpaque {
    uint64_t max_ws;
};
struct cublasLtMatrixLayoutOpaque {
    int type, order;
    uint64_t rows, cols;
    int64_t ld;
};

cublasStatus_t cublasLtCreate(cublasLtHandle_t *h) {
    if (!h) return CUBLAS_STATUS_INVALID_VALUE;
    *h = calloc(1, sizeof **h);
    if (!*h) return CUBLAS_STATUS_ALLOC_FAILED;
    (*h)->magic = 0x1234;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t h) {
    free(h);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *d, cublasComputeType_t compute,
                                        cudaDataType_t scale) {
    if (!d) return CUBLAS_STATUS_INVALID_VALUE;
    *d = calloc(1, sizeof **d);
    if (!*d) return CUBLAS_STATUS_ALLOC_FAILED;
    (*d)->compute = compute;
    (*d)->scale = scale;
    (*d)->transa = CUBLAS_OP_N;
    (*d)->transb = CUBLAS_OP_N;
    (*d)->epilogue = CUBLASLT_EPILOGUE_DEFAULT;
    (*d)->bias_type = -1;
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t d) {
    free(d);
    return CUBLAS_STATUS_SUCCESS;
}

static int get_i32(const void *buf, size_t size, int *out) {
    if (!buf || size != sizeof(int32_t)) return 0;
    int32_t v;
    memcpy(&v, buf, sizeof v);
    *out = v;
    return 1;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t d,
                                              cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t size) {
    if (!d) return CUBLAS_STATUS_NOT_INITIALIZED;
    switch (attr) {
    case CUBLASLT_MATMUL_DESC_TRANSA:
        return get_i32(buf, size, &d->transa) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
    case CUBLASLT_MATMUL_DESC_TRANSB:
        return get_i32(buf, size, &d->transb) ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_INVALID_VALUE;
    case CUBLASLT_MATMUL_DESC_EPILOGUE: {
        /* cublasLtEpilogue_t is a uint32_t attribute */
        if (!buf || size != sizeof(uint32_t)) return CUBLAS_STATUS_INVALID_VALUE;
        uint32_t v;
        memcpy(&v, buf, sizeof v);
        d->epilogue = (int)v;
        return CUBLAS_STATUS_SUCCESS;
    }
    case CUBLASLT_MATMUL_DESC_BIAS_POINTER:
        if (!buf || size != sizeof(void *)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&d->bias, buf, sizeof(void *));
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE:
        return get_i32(buf, size, &d->bias_type) ? CUBLAS_STATUS_SUCCESS
                                                 : CUBLAS_STATUS_INVALID_VALUE;
    default:
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
}

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *l, cudaDataType_t type,
                                          uint64_t rows, uint64_t cols, int64_t ld) {
    if (!l) return CUBLAS_STATUS_INVALID_VALUE;
    *l = calloc(1, sizeof **l);
    if (!*l) return CUBLAS_STATUS_ALLOC_FAILED;
    **l = (struct cublasLtMatrixLayoutOpaque){.type = type, .order = 0, .rows = rows,
                                              .cols = cols, .ld = ld};
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t l) {
    free(l);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t l,
                                                cublasLtMatrixLayoutAttribute_t attr,
                                                const void *buf, size_t size) {
    if (!l || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    switch (attr) {
    case CUBLASLT_MATRIX_LAYOUT_ROWS:
    case CUBLASLT_MATRIX_LAYOUT_COLS:
        if (size != sizeof(uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(attr == CUBLASLT_MATRIX_LAYOUT_ROWS ? &l->rows : &l->cols, buf, sizeof(uint64_t));
        return CUBLAS_STATUS_SUCCESS;
    case CUBLASLT_MATRIX_LAYOUT_LD:
        if (size != sizeof(int64_t)) return CUBLAS_STATUS_INVALID_VALUE;
        memcpy(&l->ld, buf, sizeof(int64_t));
        return CUBLAS_STATUS_SUCCESS;
    default:
        return CUBLAS_STATUS_NOT_SUPPORTED;
    }
}

#define ALGO_MAGIC 0x6c74616c676f3031ull

static unsigned long long g_explicit, g_implicit;

void emu_cublaslt_counters(unsigned long long *explicit_queries,
                           unsigned long long *implicit_queries) {
    if (explicit_queries) *explicit_queries = g_explicit;
    if (implicit_queries) *implicit_queries = g_implicit;
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref) {
    if (!pref) return CUBLAS_STATUS_INVALID_VALUE;
    *pref = calloc(1, sizeof **pref);
    return *pref ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
    free(pref);
    return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr,
                                                    const void *buf, size_t size) {
    if (!pref || !buf) return CUBLAS_STATUS_INVALID_VALUE;
    if (attr == CUBLASLT_MATMUL_PREF_SEARCH_MODE) return CUBLAS_STATUS_SUCCESS;
    if (attr != CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (size != sizeof(uint64_t)) return CUBLAS_STATUS_INVALID_VALUE;
    memcpy(&pref->max_ws, buf, sizeof(uint64_t));
    return CUBLAS_STATUS_SUCCESS;
}

/* The checks cublasLtMatmul makes of an operation, without the pointers;
 * m and k out. */
static cublasStatus_t check_op(cublasLtMatmulDesc_t d, cublasLtMatrixLayout_t Adesc,
                               cublasLtMatrixLayout_t Bdesc, cublasLtMatrixLayout_t Cdesc,
                               cublasLtMatrixLayout_t Ddesc, int64_t *m_out, int64_t *k_out) {
    if (!d) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!Adesc || !Bdesc || !Cdesc || !Ddesc) return CUBLAS_STATUS_INVALID_VALUE;
    if (d->compute != CUBLAS_COMPUTE_32F || d->scale != CUDA_R_32F ||
        Adesc->type != CUDA_R_16BF || Bdesc->type != CUDA_R_16BF || Cdesc->type != CUDA_R_32F ||
        Ddesc->type != CUDA_R_32F)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if ((d->transa != CUBLAS_OP_N && d->transa != CUBLAS_OP_T) ||
        (d->transb != CUBLAS_OP_N && d->transb != CUBLAS_OP_T))
        return CUBLAS_STATUS_NOT_SUPPORTED;
    if (d->epilogue != CUBLASLT_EPILOGUE_DEFAULT && d->epilogue != CUBLASLT_EPILOGUE_BIAS)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    int64_t m = (int64_t)Ddesc->rows, n = (int64_t)Ddesc->cols;
    int64_t am = d->transa == CUBLAS_OP_N ? (int64_t)Adesc->rows : (int64_t)Adesc->cols;
    int64_t k = d->transa == CUBLAS_OP_N ? (int64_t)Adesc->cols : (int64_t)Adesc->rows;
    int64_t bk = d->transb == CUBLAS_OP_N ? (int64_t)Bdesc->rows : (int64_t)Bdesc->cols;
    int64_t bn = d->transb == CUBLAS_OP_N ? (int64_t)Bdesc->cols : (int64_t)Bdesc->rows;
    if (am != m || bk != k || bn != n || (int64_t)Cdesc->rows != m || (int64_t)Cdesc->cols != n)
        return CUBLAS_STATUS_INVALID_VALUE;
    if (Adesc->ld < (int64_t)Adesc->rows || Bdesc->ld < (int64_t)Bdesc->rows ||
        Cdesc->ld < m || Ddesc->ld < m)
        return CUBLAS_STATUS_INVALID_VALUE;
    *m_out = m;
    *k_out = k;
    return CUBLAS_STATUS_SUCCESS;
}

static void algo_fill(cublasLtMatmulAlgo_t *a, cublasLtMatmulDesc_t d, int64_t m, int64_t k) {
    memset(a, 0, sizeof *a);
    a->data[0] = ALGO_MAGIC;
    a->data[1] = (uint64_t)d->transa | (uint64_t)d->transb << 8 | (uint64_t)d->epilogue << 16;
    a->data[2] = (uint64_t)m;
    a->data[3] = (uint64_t)k;
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t h, cublasLtMatmulDesc_t d,
                                              cublasLtMatrixLayout_t Adesc,
                                              cublasLtMatrixLayout_t Bdesc,
                                              cublasLtMatrixLayout_t Cdesc,
                                              cublasLtMatrixLayout_t Ddesc,
                                              cublasLtMatmulPreference_t pref, int requested,
                                              cublasLtMatmulHeuristicResult_t *results,
                                              int *returned) {
    g_explicit++;
    if (!h || h->magic != 0x1234) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!pref || requested < 1 || !results || !returned) return CUBLAS_STATUS_INVALID_VALUE;
    int64_t m, k;
    cublasStatus_t st = check_op(d, Adesc, Bdesc, Cdesc, Ddesc, &m, &k);
    *returned = 0;
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    memset(&results[0], 0, sizeof results[0]);
    algo_fill(&results[0].algo, d, m, k);
    results[0].workspaceSize = 0;
    results[0].state = CUBLAS_STATUS_SUCCESS;
    results[0].wavesCount = 1.0f;
    *returned = 1;
    return CUBLAS_STATUS_SUCCESS;
}

static float bf16_value(const uint16_t *p, int64_t i) {
    uint32_t u = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Element (r, c) of op(X) for a column-major X with leading dimension ld. */
static float op_elem(const uint16_t *x, int64_t ld, int trans, int64_t r, int64_t c) {
    return trans == CUBLAS_OP_N ? bf16_value(x, r + c * ld) : bf16_value(x, c + r * ld);
}

/* One matmul with everything it reads from the descriptors copied (a
 * capture records it by value, as the library's kernels get their
 * parameters when they are enqueued). */
typedef struct mm_call {
    struct cublasLtMatmulDescOpaque d;
    struct cublasLtMatrixLayoutOpaque la, lb, lc, ld;
    float alpha, beta;
    const uint16_t *a, *b;
    const float *c;
    float *out;
} mm_call;

static void mm_run(void *arg) {
    const mm_call *q = arg;
    int64_t m = (int64_t)q->ld.rows, n = (int64_t)q->ld.cols;
    int64_t k = q->d.transa == CUBLAS_OP_N ? (int64_t)q->la.cols : (int64_t)q->la.rows;
    const float *bias = q->d.bias;
    for (int64_t col = 0; col < n; col++)
        for (int64_t r = 0; r < m; r++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < k; i++)
                acc += op_elem(q->a, q->la.ld, q->d.transa, r, i) * op_elem(q->b, q->lb.ld, q->d.transb, i, col);
            float v = q->alpha * acc;
            if (q->beta != 0.0f) v += q->beta * q->c[r + col * q->lc.ld];
            if (q->d.epilogue == CUBLASLT_EPILOGUE_BIAS) v += bias[r];
            q->out[r + col * q->ld.ld] = v;
        }
}

/* The checks run at the call; the arithmetic runs now, or at each replay
 * of a graph when the stream captures (emu_c_submit). */
cublasStatus_t cublasLtMatmul(cublasLtHandle_t h, cublasLtMatmulDesc_t d, const void *alpha,
                              const void *A, cublasLtMatrixLayout_t Adesc, const void *B,
                              cublasLtMatrixLayout_t Bdesc, const void *beta, const void *C,
                              cublasLtMatrixLayout_t Cdesc, void *D, cublasLtMatrixLayout_t Ddesc,
                              const cublasLtMatmulAlgo_t *algo, void *workspace,
                              size_t workspace_bytes, cudaStream_t stream) {
    (void)workspace; (void)workspace_bytes;
    if (!h || h->magic != 0x1234 || !d) return CUBLAS_STATUS_NOT_INITIALIZED;
    if (!alpha || !beta || !A || !B || !D) return CUBLAS_STATUS_INVALID_VALUE;
    int64_t m, k;
    cublasStatus_t st = check_op(d, Adesc, Bdesc, Cdesc, Ddesc, &m, &k);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    if (d->epilogue == CUBLASLT_EPILOGUE_BIAS &&
        (!d->bias || (d->bias_type != -1 && d->bias_type != CUDA_R_32F)))
        return CUBLAS_STATUS_INVALID_VALUE;
    if (algo) {
        cublasLtMatmulAlgo_t want;
        algo_fill(&want, d, m, k);
        if (memcmp(algo, &want, sizeof want) != 0) return CUBLAS_STATUS_INVALID_VALUE;
    } else {
        g_implicit++;
    }
    mm_call q = {.d = *d, .la = *Adesc, .lb = *Bdesc, .lc = *Cdesc, .ld = *Ddesc,
                 .a = A, .b = B, .c = C, .out = D};
    memcpy(&q.alpha, alpha, sizeof q.alpha);
    memcpy(&q.beta, beta, sizeof q.beta);
    if (emu_c_submit(stream, mm_run, &q, sizeof q) != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
    return CUBLAS_STATUS_SUCCESS;
}

const char *cublasLtGetStatusString(cublasStatus_t s) {
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    }
    return "CUBLAS_STATUS_UNKNOWN";
}
