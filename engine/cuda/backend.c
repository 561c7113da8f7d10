/*
 * engine/cuda/backend.c — the CUDA compute backend (contract: engine/backend.h):
 * bf16 weights uploaded once, activations and the KV payload (bf16 K/V, fp32
 * scores, an int32 position mirror) in device memory, the forward pass of a
 * step as kernels/kernels.h launches and cuBLASLt GEMMs on one stream, KV
 * compression through kern_d2o_* with the page bookkeeping on the host
 * (kvpool), as engine/cpu/kvcomp.c does it: kv_compress_layers (what the
 * runtime calls) runs every table's selection, matching, threshold (from the
 * request's tau_ema) and merges on the device, synchronises once to read
 * the keep flags back, then compacts each table in the pool (payload moves
 * queued through the hook, whose pinned staging is a ring: no wait per
 * call); kv_compress, one table with the threshold callback, synchronises
 * a few times per table.
 *
 * Callers: engine.c creates it (eng_cuda_backend_create) on any thread; every
 * other op runs on the engine thread after attach_thread. Built for real only
 * with D2_HAVE_CUDA (the Makefile defines it when it links the CUDA runtime,
 * cuBLASLt and the kernels, or the emulator's stand-ins: tests/emu/README);
 * without it eng_cuda_backend_create says so and fails with D2_EUNSUPPORTED.
 *
 * Memory: everything is reserved at create (weights, activations for
 * max_batch_tokens, GEMM descriptors, layouts and heuristic results per
 * shape and token-count bucket) and at kv_attach (the payload, the plan
 * staging sized for the pool's max_seqs, the resident block tables,
 * compression scratch); step() never allocates and never logs. Host<->device
 * traffic per step: one plan upload from pinned memory (tokens, positions,
 * slot maps, the decode plan, and only the block-table entries that changed
 * since the device last saw them: the tables stay resident, one row per
 * (layer, sequence id), checked against a host shadow); and at most ONE
 * host synchronisation: step() queues everything, ending with its results
 * for the host (step_results: the argmax of every logit row, 4 bytes a row;
 * the rows of host_logits sequences; the column sums) and returns without
 * waiting. The first call that needs a result — argmax, logits, sample
 * (after its own launch and 4-byte-per-row copy: the runtime draws first),
 * sync, or else the next step before it reuses the pinned buffers — waits
 * once and completes the step (step_settle adds the column sums into the
 * callers' arrays); the step's later calls wait no more. logits of a row
 * the plan did not flag host_logits is the one exception: a copy and a wait
 * of its own. Compression (kv_compress_layers) adds one more wait.
 *
 * CUDA graphs (opt-in, eng_backend_config.cuda_graphs; "CUDA graphs" below):
 * a decode-only step is padded to a batch bucket and replays a graph
 * captured once per bucket, with the same plan upload before it.
 *
 * Row order: inside a step the backend keeps the decode tokens (one-token
 * sequences without colsum) first, in plan order, then the other sequences'
 * chunks, so the batched decode attention reads its queries as one block;
 * logits come out in plan order.
 *
 * Errors: every CUDA runtime, cuBLASLt and kernel call is checked; last_error
 * names the call, file and line. A CUDA or cuBLASLt failure is sticky: the
 * backend then answers D2_ECUDA to everything (the daemon exits).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "common/util.h"
#include "engine/backend.h"

#ifndef D2_HAVE_CUDA

int eng_cuda_backend_create(const eng_model *m, const eng_backend_config *cfg, eng_backend **out) {
    (void)m; (void)cfg;
    *out = NULL;
    D2_ERROR("engine: this build has no CUDA backend (built without nvcc; use --device cpu)");
    return D2_EUNSUPPORTED;
}

int eng_cuda_device_count(void) { return D2_EUNSUPPORTED; }

void *eng_cuda_backend_stream(eng_backend *be) {
    (void)be;
    return NULL;
}

int eng_cuda_backend_set_graphs(eng_backend *be, int on) {
    (void)be; (void)on;
    return D2_EUNSUPPORTED;
}

eng_cuda_graph_stats eng_cuda_backend_graph_stats(eng_backend *be) {
    (void)be;
    return (eng_cuda_graph_stats){0};
}

#else

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include "engine/kvsel.h"
#include "engine/model/rope.h"
#include "kernels/kernels.h"

#define CU_DEFAULT_UTIL 0.9
#define CU_LT_WS_BYTES ((size_t)32 << 20) /* cuBLASLt workspace */
#define CU_D2O_MOVE_SLOTS 256
#define CU_GEMM_BUCKETS 24 /* token-count buckets 1, 2, 4, ... 2^23 */
#define CU_GRAPH_BUCKETS 16 /* decode batch buckets 1, 2, 4, ... and the largest */

/* The GEMMs of the model, each with its own cuBLASLt layouts and, per
 * power-of-two bucket of the token count, the algorithm the heuristic chose
 * for the bucket's largest count (queried once at create: step() makes no
 * heuristic query and allocates nothing). */
enum { G_QKV, G_QKV_BIAS, G_O, G_GU, G_DOWN, G_LM, G_KINDS };

typedef struct cu_gemm_shape {
    int out, in, max_n;             /* Y[n][out] = X[n][in] . W[out][in]^T, n <= max_n */
    cublasLtMatrixLayout_t la, lb, lc; /* lb and lc get COLS = n per call */
    int n_buckets;
    uint8_t have[CU_GEMM_BUCKETS];  /* 0: no algorithm cached, cuBLASLt's implicit query */
    cublasLtMatmulAlgo_t algo[CU_GEMM_BUCKETS];
} cu_gemm_shape;

typedef struct cu_layer {
    kern_bf16 *attn_norm, *ffn_norm; /* [dim] */
    kern_bf16 *wqkv;                 /* [q_dim + 2 kv_dim][dim]: Wq | Wk | Wv */
    float *bqkv;                     /* [q_dim + 2 kv_dim] or NULL (no bias) */
    kern_bf16 *wo;                   /* [dim][q_dim] */
    kern_bf16 *wgu;                  /* [2 ffn][dim]: Wgate | Wup */
    kern_bf16 *wdown;                /* [dim][ffn] */
} cu_layer;

/* Where a step's plan lives in the staging buffer (int32 offsets). */
typedef struct cu_layer_plan {
    size_t page_of, slot_of;   /* [T] internal rows */
    size_t dlen, dsplit, dwork; /* decode: [n_dec], [n_dec+1], [n_work] (SIZE_MAX: no list) */
    int n_work;                /* the work list's length, or its capacity when dlive is set */
    size_t dlive;              /* [1] the work list's length on the device; SIZE_MAX: none */
} cu_layer_plan;

typedef struct cu_seq_plan {
    int row0;            /* internal first row */
    int n_kv;            /* live slots of the table (this layer) */
    size_t tab;          /* offset of its resident table row in rtab_d */
} cu_seq_plan;

typedef struct cuda_be {
    eng_backend base;
    int device;
    double util;
    cudaStream_t st;
    cudaEvent_t ev_plan, ev_hook;
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t mm_plain, mm_bias;
    cu_gemm_shape gemm[G_KINDS];
    void *lt_ws;
    /* shapes */
    int max_t, max_rows, max_seq, dim, qd, kvd, qkvd, hd, n_heads, n_kv, ffn, vocab, n_layers;
    int pt, window, neox;
    float eps;
    /* weights (device) */
    kern_bf16 *embd, *outw, *out_norm;
    cu_layer *L;
    float *inv_freq;
    size_t weight_bytes;
    /* activations (device) */
    float *x, *qkv, *gu, *lse, *xsel, *logits;
    kern_bf16 *xb, *ao, *hb, *xfb;
    int32_t *amax_d;
    /* sized at kv_attach */
    int max_seqs;                 /* sequences one step may hold: min(max_t, pool max_seqs) */
    int max_pages;                /* pages of the longest table */
    int work_cap;                 /* decode splits per layer */
    void *dec_ws;
    float *colsum_d, *colsum_h;   /* [colsum_cap] */
    size_t colsum_cap;
    int32_t *plan_h, *plan_d;     /* staging (pinned) and its device twin */
    size_t plan_cap;
    int *irow;                    /* [max_t] plan row -> internal row */
    int *seq_row0;                /* [max_t] per plan sequence: internal first row */
    cu_layer_plan *lp;            /* [n_layers] */
    cu_seq_plan *sp;              /* [n_layers][max_t] */
    int32_t *dlen_h;              /* [max_t] host decode lengths */
    /* Resident block tables: one row of max_pages per (layer, sequence id),
     * kept on the device across steps; rtab_h is the host's copy of what the
     * device rows hold (rtab_n valid entries each). A step uploads only the
     * entries that differ (patches in its plan, kern_patch_i32). */
    int n_ids;                    /* the pool's max_seqs */
    int32_t *rtab_d, *rtab_h;     /* [n_layers][n_ids][max_pages] */
    int32_t *rtab_n;              /* [n_layers][n_ids] */
    int32_t *patch_hdr;           /* [patch_cap][3] headers of the patches being built */
    int n_patch, patch_cap;
    int plan_pending;             /* plan_h may still feed an upload (ev_plan not yet passed) */
    /* the payload */
    kern_bf16 *kv_k, *kv_v;
    float *kv_score;
    int32_t *kv_pos;
    int64_t n_pages;
    /* payload hook */
    /* hook_h is a ring of segments (runs [cap][5] then start [cap] while a
     * segment is open, runs [n][5] start [n] once sent): a segment's pinned
     * words are not rewritten until the ring wraps, which waits for ev_hook
     * only when no stream sync came since -- no sync per hook call */
    int32_t *hook_h, *hook_d;     /* hook_h [hook_ring]; hook_d one segment */
    int hook_cap;
    size_t hook_ring, hook_at;    /* ring words, first free word */
    int hook_pending;             /* segments since the last stream sync */
    void *hook_stage;
    uint8_t *hook_mark;           /* [n_pages * pt] slot written in the open segment */
    int32_t *hook_touched;        /* [hook_cap] marked slots */
    int n_touched;
    /* compression */
    void *d2o_mem;
    kern_d2o_ws d2o;
    int32_t *tab_h, *tab_d;       /* [max_pages] one table */
    uint8_t *keep_h;              /* [max_seq] */
    int32_t *ev_h, *tgt_h;        /* [max_seq] */
    float *sim_h, *stat_h, *tau_h; /* [max_seq], [2], [1] pinned */
    float *tau_d;
    /* compression of several tables (kv_compress_layers), per request i < n_layers */
    int32_t *cst_h, *cst_d;       /* staging: row patches, headers, tau_prev floats */
    size_t cst_cap;
    int cst_pending;              /* cst_h may still feed an upload */
    cudaEvent_t ev_cst;
    kern_d2o_plan *cplan;         /* [n_layers] */
    uint8_t *ckeep_h;             /* pinned [n_layers][max_seq] keep flags read back */
    int32_t *ccount_h;            /* pinned [n_layers][4] counts read back */
    float *cstat_h;               /* pinned [n_layers][2] stat read back */
    /* The last step's results, queued by the step for the host (step_results)
     * and valid once out_pending is 0 (any stream sync clears it: step_settle) */
    float *logits_h;              /* pinned [max_rows][vocab]: the rows row_host marks */
    int32_t *amax_h;              /* pinned [max_rows]: the argmax of every logit row */
    uint8_t *row_host;            /* [max_rows] row copied (or being copied) to logits_h */
    int out_pending;              /* results queued, not yet waited for */
    /* the step's column sums, added into the callers' arrays at step_settle:
     * cs_cnt[i] floats of colsum_h from cs_src[i] into cs_dst[i], i < n_cs */
    float **cs_dst;               /* [max_t] */
    size_t *cs_src, *cs_cnt;      /* [max_t] */
    int n_cs;
    /* device draws (cu_sample): parameters and tokens, pinned and device [max_rows] */
    kern_sample_param *samp_h, *samp_d;
    int32_t *stok_h, *stok_d;
    float *samp_ws;               /* [kern_sample_ws_floats(max_rows, vocab)] */
    int n_logit_rows;
    /* colsum of the current step: per plan sequence, offset into colsum_d or -1 */
    size_t *cs_off;
    int gemm_fallbacks;           /* cached algorithms the library refused (dropped) */
    /* CUDA graphs (see "CUDA graphs" below): decode-only steps padded to a bucket */
    int graphs;                   /* replay them (config; eng_cuda_backend_set_graphs) */
    int n_gb;                     /* buckets (kv_attach) */
    int gb[CU_GRAPH_BUCKETS];     /* rows of each, ascending */
    cudaGraphExec_t gexec[CU_GRAPH_BUCKETS][2]; /* [bucket][decode scores], captured lazily */
    uint8_t gwarm[CU_GRAPH_BUCKETS][2];          /* a direct step of the kind ran before */
    cu_layer_plan *glp;           /* [n_layers] a bucket's plan layout */
    int32_t scratch_page;         /* payload page no table names: the padding rows' K/V */
    eng_cuda_graph_stats gstats;
    int dead;
    char err[512];
} cuda_be;

/* ---- errors ------------------------------------------------------------------------ */

static int cu_fail(cuda_be *be, int rc, const char *call, const char *why) {
    snprintf(be->err, sizeof be->err, "cuda backend: %s: %s (%s)", call, why, d2_strerror(rc));
    return rc;
}

static int cu_fail_rt(cuda_be *be, cudaError_t e, const char *call, int line) {
    be->dead = 1;
    /* the error and the place first: a long call text is what gets cut */
    snprintf(be->err, sizeof be->err, "cuda backend: %s (%s) at engine/cuda/backend.c:%d in %s",
             cudaGetErrorString(e), cudaGetErrorName(e), line, call);
    return D2_ECUDA;
}

static int cu_fail_lt(cuda_be *be, cublasStatus_t s, const char *call, int line) {
    be->dead = 1;
    snprintf(be->err, sizeof be->err, "cuda backend: %s failed at engine/cuda/backend.c:%d: %s",
             call, line, cublasLtGetStatusString(s));
    return D2_ECUDA;
}

static int cu_fail_kern(cuda_be *be, int rc, const char *call, int line) {
    if (rc == D2_ECUDA) {
        kern_error ke = kern_last_error();
        be->dead = 1;
        snprintf(be->err, sizeof be->err,
                 "cuda backend: %s (%s): %s in %s (%s:%d), called at engine/cuda/backend.c:%d by %s",
                 ke.msg ? ke.msg : "?", cudaGetErrorName((cudaError_t)ke.code),
                 ke.stmt ? ke.stmt : "?", ke.func ? ke.func : "?", ke.file ? ke.file : "?",
                 ke.line, line, call);
        return D2_ECUDA;
    }
    snprintf(be->err, sizeof be->err,
             "cuda backend: %s refused its arguments at engine/cuda/backend.c:%d (%s)", call, line,
             d2_strerror(rc));
    return rc;
}

#define CU(call)                                                                       \
    do {                                                                               \
        cudaError_t cu_e_ = (call);                                                    \
        if (cu_e_ != cudaSuccess) return cu_fail_rt(be, cu_e_, #call, __LINE__);       \
    } while (0)
#define LT(call)                                                                       \
    do {                                                                               \
        cublasStatus_t cu_s_ = (call);                                                 \
        if (cu_s_ != CUBLAS_STATUS_SUCCESS) return cu_fail_lt(be, cu_s_, #call, __LINE__); \
    } while (0)
#define KC(call)                                                                       \
    do {                                                                               \
        int cu_r_ = (call);                                                            \
        if (cu_r_ != D2_OK) return cu_fail_kern(be, cu_r_, #call, __LINE__);           \
    } while (0)
static void step_settle(cuda_be *be);
/* A host synchronisation with the stream: everything queued has run, so no
 * pinned staging is in flight any more, and the last step's results are
 * valid (step_settle). */
#define STREAM_SYNC()                                                                  \
    do {                                                                               \
        CU(cudaStreamSynchronize(be->st));                                             \
        be->plan_pending = be->hook_pending = be->cst_pending = 0;                     \
        be->hook_at = 0;                                                               \
        step_settle(be);                                                               \
    } while (0)
#define DEAD_CHECK()                                                                   \
    do {                                                                               \
        if (be->dead) return D2_ECUDA;                                                 \
    } while (0)

/* ---- helpers ----------------------------------------------------------------------- */

/* After a stream sync: the last step's results have arrived; its column sums
 * are added into the callers' arrays (the deferred half of the step). */
static void step_settle(cuda_be *be) {
    for (int i = 0; i < be->n_cs; i++) {
        float *dst = be->cs_dst[i];
        const float *src = be->colsum_h + be->cs_src[i];
        for (size_t k = 0; k < be->cs_cnt[i]; k++) dst[k] += src[k];
    }
    be->n_cs = 0;
    be->out_pending = 0;
}

/* f32 -> bf16, round to nearest even; NaN stays NaN. */
static uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static float bf2f(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static int dev_alloc(cuda_be *be, void **p, size_t bytes) {
    CU(cudaMalloc(p, bytes ? bytes : 16));
    return D2_OK;
}

static int gemm_bucket(int n) {
    int b = 0;
    while (b < CU_GEMM_BUCKETS - 1 && (1 << b) < n) b++;
    return b;
}

/* Layouts and the heuristic's algorithms of one GEMM shape (create time).
 * Row-major Y[n][out] = X[n][in] . W[out][in]^T in cuBLASLt's column-major
 * terms: W is an in x out matrix (ld in) used transposed (TRANSA = T), X an
 * in x n matrix (ld in), Y an out x n matrix (ld out): D(out x n) = op(A)
 * (out x in) * B (in x n). Every operand is a whole cudaMalloc buffer, so
 * the 256-byte alignment the heuristic assumes by default holds. */
static int gemm_shape_init(cuda_be *be, cu_gemm_shape *g, cublasLtMatmulDesc_t d,
                           cublasLtMatmulPreference_t pref, int out, int in, int max_n) {
    g->out = out;
    g->in = in;
    g->max_n = max_n;
    LT(cublasLtMatrixLayoutCreate(&g->la, CUDA_R_16BF, (uint64_t)in, (uint64_t)out, in));
    LT(cublasLtMatrixLayoutCreate(&g->lb, CUDA_R_16BF, (uint64_t)in, (uint64_t)max_n, in));
    LT(cublasLtMatrixLayoutCreate(&g->lc, CUDA_R_32F, (uint64_t)out, (uint64_t)max_n, out));
    g->n_buckets = gemm_bucket(max_n) + 1;
    for (int b = 0; b < g->n_buckets; b++) {
        uint64_t n = (uint64_t)(1 << b) < (uint64_t)max_n ? (uint64_t)(1 << b) : (uint64_t)max_n;
        LT(cublasLtMatrixLayoutSetAttribute(g->lb, CUBLASLT_MATRIX_LAYOUT_COLS, &n, sizeof n));
        LT(cublasLtMatrixLayoutSetAttribute(g->lc, CUBLASLT_MATRIX_LAYOUT_COLS, &n, sizeof n));
        cublasLtMatmulHeuristicResult_t r;
        int got = 0;
        cublasStatus_t s = cublasLtMatmulAlgoGetHeuristic(be->lt, d, g->la, g->lb, g->lc, g->lc,
                                                          pref, 1, &r, &got);
        /* none found: cublasLtMatmul's own query decides (and fails if nothing runs it) */
        g->have[b] = s == CUBLAS_STATUS_SUCCESS && got > 0 && r.state == CUBLAS_STATUS_SUCCESS;
        if (g->have[b]) g->algo[b] = r.algo;
    }
    return D2_OK;
}

static void gemm_shape_free(cu_gemm_shape *g) {
    if (g->la) cublasLtMatrixLayoutDestroy(g->la);
    if (g->lb) cublasLtMatrixLayoutDestroy(g->lb);
    if (g->lc) cublasLtMatrixLayoutDestroy(g->lc);
}

static int create_gemms(cuda_be *be) {
    cublasLtMatmulPreference_t pref = NULL;
    uint64_t ws = CU_LT_WS_BYTES;
    LT(cublasLtMatmulPreferenceCreate(&pref));
    cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    if (s != CUBLAS_STATUS_SUCCESS) {
        cublasLtMatmulPreferenceDestroy(pref);
        return cu_fail_lt(be, s, "cublasLtMatmulPreferenceSetAttribute", __LINE__);
    }
    int T = be->max_t, R = be->max_rows, rc = D2_OK;
    const struct { int kind, out, in, max_n; } sh[G_KINDS] = {
        {G_QKV, be->qkvd, be->dim, T},    {G_QKV_BIAS, be->qkvd, be->dim, T},
        {G_O, be->dim, be->qd, T},        {G_GU, 2 * be->ffn, be->dim, T},
        {G_DOWN, be->dim, be->ffn, T},    {G_LM, be->vocab, be->dim, R},
    };
    for (int i = 0; i < G_KINDS && !rc; i++)
        rc = gemm_shape_init(be, &be->gemm[sh[i].kind],
                             sh[i].kind == G_QKV_BIAS ? be->mm_bias : be->mm_plain, pref,
                             sh[i].out, sh[i].in, sh[i].max_n);
    cublasLtMatmulPreferenceDestroy(pref);
    return rc;
}

/* Y[n][out] (+)= X[n][in] . W[out][in]^T (+ bias) with the shape's cached
 * layouts and algorithm (gemm_shape_init); X and Y are dense (ld = in, out).
 * An algorithm the library refuses for this n (it was chosen for the
 * bucket's largest) is dropped for the bucket and the call repeated with the
 * implicit query. */
static int cu_gemm(cuda_be *be, int kind, const kern_bf16 *W, const kern_bf16 *X, int n, float *Y,
                   int accumulate, const float *bias) {
    cu_gemm_shape *g = &be->gemm[kind];
    uint64_t cols = (uint64_t)n;
    LT(cublasLtMatrixLayoutSetAttribute(g->lb, CUBLASLT_MATRIX_LAYOUT_COLS, &cols, sizeof cols));
    LT(cublasLtMatrixLayoutSetAttribute(g->lc, CUBLASLT_MATRIX_LAYOUT_COLS, &cols, sizeof cols));
    cublasLtMatmulDesc_t d = be->mm_plain;
    if (kind == G_QKV_BIAS) {
        d = be->mm_bias;
        LT(cublasLtMatmulDescSetAttribute(d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    }
    int b = gemm_bucket(n);
    float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    cublasStatus_t s = cublasLtMatmul(be->lt, d, &alpha, W, g->la, X, g->lb, &beta, Y, g->lc, Y,
                                      g->lc, g->have[b] ? &g->algo[b] : NULL, be->lt_ws,
                                      CU_LT_WS_BYTES, be->st);
    if (s != CUBLAS_STATUS_SUCCESS && g->have[b] &&
        (s == CUBLAS_STATUS_NOT_SUPPORTED || s == CUBLAS_STATUS_INVALID_VALUE)) {
        g->have[b] = 0;
        be->gemm_fallbacks++;
        s = cublasLtMatmul(be->lt, d, &alpha, W, g->la, X, g->lb, &beta, Y, g->lc, Y, g->lc, NULL,
                           be->lt_ws, CU_LT_WS_BYTES, be->st);
    }
    if (s != CUBLAS_STATUS_SUCCESS) return cu_fail_lt(be, s, "cublasLtMatmul", __LINE__);
    return D2_OK;
}

/* ---- create / destroy -------------------------------------------------------------- */

static void cu_destroy(eng_backend *base);
static int cu_attach_thread(eng_backend *base);
static void cu_caps(const eng_backend *base, eng_backend_caps *out);
static int cu_kv_attach(eng_backend *base, kvp_pool *pool);
static int cu_step(eng_backend *base, const eng_batch *b);
static int cu_logits(eng_backend *base, int row0, int n, const float **out);
static int cu_argmax(eng_backend *base, const int *rows, int n, int32_t *out);
static int cu_sample(eng_backend *base, const int *rows, const eng_sample_draw *d, int n, int32_t *out);
static int cu_kv_compress(eng_backend *base, const eng_kv_compress_req *rq, eng_kv_compress_res *res);
static int cu_kv_compress_layers(eng_backend *base, const eng_kv_compress_req *rq, int n,
                                 eng_kv_compress_res *res);
static int cu_read_slot(eng_backend *base, int seq, int layer, int i, float *k, float *v, float *score);
static int cu_write_slot(eng_backend *base, int seq, int layer, int i, const float *k,
                         const float *v, const float *score);
static int cu_sync(eng_backend *base);
static const char *cu_last_error(const eng_backend *base);
static void graph_buckets(cuda_be *be);

static const eng_backend_ops cu_ops = {
    .attach_thread = cu_attach_thread,
    .caps = cu_caps,
    .kv_attach = cu_kv_attach,
    .step = cu_step,
    .logits = cu_logits,
    .argmax = cu_argmax,
    .sample = cu_sample,
    .kv_compress = cu_kv_compress,
    .kv_compress_layers = cu_kv_compress_layers,
    .read_slot = cu_read_slot,
    .write_slot = cu_write_slot,
    .sync = cu_sync,
    .last_error = cu_last_error,
    .destroy = cu_destroy,
};

void *eng_cuda_backend_stream(eng_backend *base) { return base ? (void *)((cuda_be *)base)->st : NULL; }

int eng_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError(); /* no driver / no device: not sticky */
        return 0;
    }
    return n;
}

#define DFREE(p) do { if (p) cudaFree(p); } while (0)
#define HFREE(p) do { if (p) cudaFreeHost(p); } while (0)

static void cu_destroy(eng_backend *base) {
    cuda_be *be = (cuda_be *)base;
    if (!be) return;
    if (be->st) cudaStreamSynchronize(be->st);
    for (int i = 0; i < CU_GRAPH_BUCKETS; i++)
        for (int k = 0; k < 2; k++)
            if (be->gexec[i][k]) cudaGraphExecDestroy(be->gexec[i][k]);
    free(be->glp);
    if (be->L) {
        for (int l = 0; l < be->n_layers; l++) {
            cu_layer *w = &be->L[l];
            DFREE(w->attn_norm); DFREE(w->ffn_norm); DFREE(w->wqkv); DFREE(w->bqkv);
            DFREE(w->wo); DFREE(w->wgu); DFREE(w->wdown);
        }
        free(be->L);
    }
    if (be->outw != be->embd) DFREE(be->outw);
    DFREE(be->embd); DFREE(be->out_norm); DFREE(be->inv_freq);
    DFREE(be->x); DFREE(be->qkv); DFREE(be->gu); DFREE(be->lse); DFREE(be->xsel);
    DFREE(be->logits); DFREE(be->xb); DFREE(be->ao); DFREE(be->hb); DFREE(be->xfb);
    DFREE(be->amax_d); DFREE(be->dec_ws); DFREE(be->colsum_d); DFREE(be->plan_d);
    DFREE(be->rtab_d); free(be->rtab_h); free(be->rtab_n); free(be->patch_hdr);
    DFREE(be->kv_k); DFREE(be->kv_v); DFREE(be->kv_score); DFREE(be->kv_pos);
    DFREE(be->hook_d); DFREE(be->hook_stage); DFREE(be->d2o_mem); DFREE(be->tab_d);
    DFREE(be->tau_d); DFREE(be->lt_ws); DFREE(be->cst_d); HFREE(be->cst_h);
    HFREE(be->ckeep_h); HFREE(be->ccount_h); HFREE(be->cstat_h); free(be->cplan);
    if (be->ev_cst) cudaEventDestroy(be->ev_cst);
    HFREE(be->colsum_h); HFREE(be->plan_h); HFREE(be->hook_h); HFREE(be->tab_h);
    HFREE(be->keep_h); HFREE(be->ev_h); HFREE(be->tgt_h); HFREE(be->sim_h); HFREE(be->stat_h);
    HFREE(be->tau_h); HFREE(be->logits_h); HFREE(be->amax_h); free(be->row_host);
    free(be->cs_dst); free(be->cs_src); free(be->cs_cnt);
    HFREE(be->samp_h); HFREE(be->stok_h); DFREE(be->samp_d); DFREE(be->stok_d); DFREE(be->samp_ws);
    free(be->irow); free(be->seq_row0); free(be->lp); free(be->sp); free(be->dlen_h);
    free(be->hook_mark); free(be->hook_touched); free(be->cs_off);
    for (int i = 0; i < G_KINDS; i++) gemm_shape_free(&be->gemm[i]);
    if (be->mm_plain) cublasLtMatmulDescDestroy(be->mm_plain);
    if (be->mm_bias) cublasLtMatmulDescDestroy(be->mm_bias);
    if (be->lt) cublasLtDestroy(be->lt);
    if (be->ev_plan) cudaEventDestroy(be->ev_plan);
    if (be->ev_hook) cudaEventDestroy(be->ev_hook);
    if (be->st) cudaStreamDestroy(be->st);
    free(be);
}

/* Weight upload: a host bf16 staging buffer, progress in bytes of bf16. */
typedef struct up_ctx {
    uint16_t *host;
    float *row;
    size_t done, total;
    int last_pct;
    const eng_backend_config *cfg;
} up_ctx;

static void up_progress(up_ctx *u, size_t add) {
    u->done += add;
    int pct = u->total ? (int)(u->done * 100 / u->total) : 100;
    if (u->cfg->progress && pct != u->last_pct) {
        u->last_pct = pct;
        u->cfg->progress(u->cfg->progress_user, u->done, u->total);
    }
}

/* Converts tensors ts[0..n) (each rows x cols, same cols) into one stacked bf16
 * matrix on the device. */
static int upload_stacked(cuda_be *be, up_ctx *u, const eng_tensor *const *ts, int n,
                          kern_bf16 **out) {
    int64_t rows = 0, cols = ts[0]->cols;
    for (int i = 0; i < n; i++) rows += ts[i]->rows;
    size_t bytes = (size_t)rows * (size_t)cols * 2;
    int rc = dev_alloc(be, (void **)out, bytes);
    if (rc) return rc;
    int64_t r0 = 0;
    for (int i = 0; i < n; i++) {
        for (int64_t r = 0; r < ts[i]->rows; r++) {
            eng_tensor_row_f32(ts[i], r, u->row);
            uint16_t *dst = u->host + (size_t)(r0 + r) * (size_t)cols;
            for (int64_t c = 0; c < cols; c++) dst[c] = f2bf(u->row[c]);
        }
        r0 += ts[i]->rows;
    }
    CU(cudaMemcpy(*out, u->host, bytes, cudaMemcpyHostToDevice));
    be->weight_bytes += bytes;
    up_progress(u, bytes);
    return D2_OK;
}

static int upload_f32(cuda_be *be, const float *h, size_t n, float **out) {
    int rc = dev_alloc(be, (void **)out, n * sizeof(float));
    if (rc) return rc;
    CU(cudaMemcpy(*out, h, n * sizeof(float), cudaMemcpyHostToDevice));
    return D2_OK;
}

static int create_weights(cuda_be *be, const eng_model *m, const eng_backend_config *cfg) {
    const eng_model_config *c = &m->cfg;
    int dim = c->dim;
    up_ctx u = {.cfg = cfg, .last_pct = -1};
    size_t max_elems = (size_t)c->vocab_size * (size_t)dim;
    size_t e2 = (size_t)(be->qkvd > 2 * be->ffn ? be->qkvd : 2 * be->ffn) * (size_t)dim;
    size_t e3 = (size_t)dim * (size_t)(be->ffn > be->qd ? be->ffn : be->qd);
    if (e2 > max_elems) max_elems = e2;
    if (e3 > max_elems) max_elems = e3;
    int64_t max_cols = dim > be->ffn ? dim : be->ffn;
    if (be->qd > max_cols) max_cols = be->qd;
    if (be->qkvd > max_cols) max_cols = be->qkvd;
    u.host = malloc(max_elems * sizeof(uint16_t));
    u.row = malloc((size_t)max_cols * sizeof(float));
    /* total for progress: every bf16 matrix */
    u.total = (size_t)c->vocab_size * (size_t)dim * 2 * (m->output.data && m->output.data != m->tok_embd.data ? 2 : 1);
    u.total += (size_t)c->n_layers *
               ((size_t)be->qkvd * dim + (size_t)dim * be->qd + 3 * (size_t)be->ffn * dim) * 2;
    int rc = u.host && u.row ? D2_OK : D2_ENOMEM;
    if (rc) {
        free(u.host); free(u.row);
        return cu_fail(be, rc, "create", "host staging for the weight conversion");
    }
    const eng_tensor *te[1] = {&m->tok_embd};
    rc = upload_stacked(be, &u, te, 1, &be->embd);
    if (!rc) {
        if (m->output.data && m->output.data != m->tok_embd.data) {
            const eng_tensor *to[1] = {&m->output};
            rc = upload_stacked(be, &u, to, 1, &be->outw);
        } else {
            be->outw = be->embd;
        }
    }
    /* norms and biases: small, through f32 */
    float *vec = malloc((size_t)(be->qkvd > dim ? be->qkvd : dim) * sizeof(float));
    uint16_t *vb = malloc((size_t)dim * sizeof(uint16_t));
    if (!vec || !vb) rc = D2_ENOMEM;
#define NORM_UP(t, dst)                                                                   \
    do {                                                                                  \
        eng_tensor_row_f32((t), 0, vec);                                                  \
        for (int i_ = 0; i_ < dim; i_++) vb[i_] = f2bf(vec[i_]);                          \
        if (!rc) rc = dev_alloc(be, (void **)(dst), (size_t)dim * 2);                    \
        if (!rc && cudaMemcpy(*(dst), vb, (size_t)dim * 2, cudaMemcpyHostToDevice) != cudaSuccess) \
            rc = cu_fail(be, D2_ECUDA, "cudaMemcpy", "norm weights");                     \
    } while (0)
    if (!rc) NORM_UP(&m->out_norm, &be->out_norm);
    for (int l = 0; l < c->n_layers && !rc; l++) {
        const eng_layer_weights *w = &m->layers[l];
        cu_layer *d = &be->L[l];
        NORM_UP(&w->attn_norm, &d->attn_norm);
        NORM_UP(&w->ffn_norm, &d->ffn_norm);
        const eng_tensor *qkv[3] = {&w->wq, &w->wk, &w->wv};
        if (!rc) rc = upload_stacked(be, &u, qkv, 3, &d->wqkv);
        const eng_tensor *o[1] = {&w->wo};
        if (!rc) rc = upload_stacked(be, &u, o, 1, &d->wo);
        const eng_tensor *gu[2] = {&w->w_gate, &w->w_up};
        if (!rc) rc = upload_stacked(be, &u, gu, 2, &d->wgu);
        const eng_tensor *dn[1] = {&w->w_down};
        if (!rc) rc = upload_stacked(be, &u, dn, 1, &d->wdown);
        if (!rc && (w->bq.data || w->bk.data || w->bv.data)) {
            memset(vec, 0, (size_t)be->qkvd * sizeof(float));
            if (w->bq.data) eng_tensor_row_f32(&w->bq, 0, vec);
            if (w->bk.data) eng_tensor_row_f32(&w->bk, 0, vec + be->qd);
            if (w->bv.data) eng_tensor_row_f32(&w->bv, 0, vec + be->qd + be->kvd);
            rc = upload_f32(be, vec, (size_t)be->qkvd, &d->bqkv);
        }
    }
#undef NORM_UP
    free(vec); free(vb); free(u.host); free(u.row);
    return rc;
}

int eng_cuda_backend_create(const eng_model *m, const eng_backend_config *cfg, eng_backend **out) {
    *out = NULL;
    const eng_model_config *c = &m->cfg;
    if (!cfg || cfg->max_batch_tokens <= 0 || cfg->max_logit_rows <= 0 ||
        cfg->max_seq_tokens <= 0 || c->n_kv_heads <= 0 || c->n_heads % c->n_kv_heads != 0 ||
        c->head_dim % 2 != 0 || c->head_dim > KERN_MAX_HEAD_DIM ||
        c->n_heads / c->n_kv_heads > KERN_MAX_GROUP) {
        D2_ERROR("cuda_backend: bad config or a model shape the kernels do not support "
                 "(head_dim %d <= %d and even, GQA group %d <= %d)",
                 c->head_dim, KERN_MAX_HEAD_DIM, c->n_kv_heads > 0 ? c->n_heads / c->n_kv_heads : 0,
                 KERN_MAX_GROUP);
        return D2_EINVAL;
    }
    int hd = c->head_dim, qd = c->n_heads * hd, kvd = c->n_kv_heads * hd;
    int rc = eng_model_check_tensors(m, "cuda_backend");
    if (rc) return rc;
    int n_dev = eng_cuda_device_count();
    if (n_dev <= 0) {
        D2_ERROR("cuda_backend: no CUDA device (cudaGetDeviceCount found none)");
        return D2_ECUDA;
    }

    cuda_be *be = calloc(1, sizeof *be);
    if (!be) return D2_ENOMEM;
    be->base.ops = &cu_ops;
    be->base.model = m;
    be->device = cfg->device_id;
    be->util = cfg->gpu_memory_utilization > 0 ? cfg->gpu_memory_utilization : CU_DEFAULT_UTIL;
    be->max_t = cfg->max_batch_tokens;
    be->max_rows = cfg->max_logit_rows;
    be->max_seq = cfg->max_seq_tokens;
    be->dim = c->dim;
    be->qd = qd;
    be->kvd = kvd;
    be->qkvd = qd + 2 * kvd;
    be->hd = hd;
    be->n_heads = c->n_heads;
    be->n_kv = c->n_kv_heads;
    be->ffn = c->ffn_dim;
    be->vocab = c->vocab_size;
    be->n_layers = c->n_layers;
    be->pt = cfg->page_tokens > 0 ? cfg->page_tokens : 16;
    be->window = c->sliding_window;
    be->neox = c->rope_neox ? 1 : 0;
    be->eps = c->rms_eps;
    be->graphs = cfg->cuda_graphs != 0;
    be->L = calloc((size_t)c->n_layers, sizeof(cu_layer));
    be->glp = calloc((size_t)c->n_layers, sizeof(cu_layer_plan));
    if (!be->L || !be->glp) {
        free(be->L);
        free(be->glp);
        free(be);
        return D2_ENOMEM;
    }
#define CREATE_TRY(x)                                                                     \
    do {                                                                                  \
        rc = (x);                                                                         \
        if (rc != D2_OK) goto fail;                                                       \
    } while (0)
    CREATE_TRY(cu_attach_thread(&be->base));
    if ((rc = cudaStreamCreateWithFlags(&be->st, cudaStreamNonBlocking)) != cudaSuccess) {
        rc = cu_fail_rt(be, (cudaError_t)rc, "cudaStreamCreateWithFlags", __LINE__);
        goto fail;
    }
    if ((rc = cudaEventCreateWithFlags(&be->ev_plan, cudaEventDisableTiming)) != cudaSuccess ||
        (rc = cudaEventCreateWithFlags(&be->ev_hook, cudaEventDisableTiming)) != cudaSuccess ||
        (rc = cudaEventCreateWithFlags(&be->ev_cst, cudaEventDisableTiming)) != cudaSuccess) {
        rc = cu_fail_rt(be, (cudaError_t)rc, "cudaEventCreateWithFlags", __LINE__);
        goto fail;
    }
    {
        cublasStatus_t s = cublasLtCreate(&be->lt);
        int32_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        uint32_t epi = CUBLASLT_EPILOGUE_BIAS;
        int32_t bias_t = CUDA_R_32F;
        if (!s) s = cublasLtMatmulDescCreate(&be->mm_plain, CUBLAS_COMPUTE_32F, CUDA_R_32F);
        if (!s) s = cublasLtMatmulDescSetAttribute(be->mm_plain, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
        if (!s) s = cublasLtMatmulDescSetAttribute(be->mm_plain, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
        if (!s) s = cublasLtMatmulDescCreate(&be->mm_bias, CUBLAS_COMPUTE_32F, CUDA_R_32F);
        if (!s) s = cublasLtMatmulDescSetAttribute(be->mm_bias, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
        if (!s) s = cublasLtMatmulDescSetAttribute(be->mm_bias, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
        if (!s) s = cublasLtMatmulDescSetAttribute(be->mm_bias, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi);
        if (!s) s = cublasLtMatmulDescSetAttribute(be->mm_bias, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_t, sizeof bias_t);
        if (s) {
            rc = cu_fail_lt(be, s, "cuBLASLt handle and descriptors", __LINE__);
            goto fail;
        }
    }
    CREATE_TRY(dev_alloc(be, &be->lt_ws, CU_LT_WS_BYTES));
    CREATE_TRY(create_gemms(be));
    CREATE_TRY(create_weights(be, m, cfg));
    {
        float *inv = malloc((size_t)(hd / 2) * sizeof(float));
        if (!inv) { rc = D2_ENOMEM; goto fail; }
        eng_rope_inv_freq(c, inv);
        rc = upload_f32(be, inv, (size_t)(hd / 2), &be->inv_freq);
        free(inv);
        if (rc) goto fail;
    }
    size_t T = (size_t)be->max_t, R = (size_t)be->max_rows;
    CREATE_TRY(dev_alloc(be, (void **)&be->x, T * (size_t)be->dim * 4));
    CREATE_TRY(dev_alloc(be, (void **)&be->xb, T * (size_t)be->dim * 2));
    CREATE_TRY(dev_alloc(be, (void **)&be->qkv, T * (size_t)be->qkvd * 4));
    CREATE_TRY(dev_alloc(be, (void **)&be->ao, T * (size_t)be->qd * 2));
    CREATE_TRY(dev_alloc(be, (void **)&be->gu, T * (size_t)be->ffn * 2 * 4));
    CREATE_TRY(dev_alloc(be, (void **)&be->hb, T * (size_t)be->ffn * 2));
    CREATE_TRY(dev_alloc(be, (void **)&be->lse, T * (size_t)be->n_heads * 4));
    CREATE_TRY(dev_alloc(be, (void **)&be->xsel, R * (size_t)be->dim * 4));
    CREATE_TRY(dev_alloc(be, (void **)&be->xfb, R * (size_t)be->dim * 2));
    CREATE_TRY(dev_alloc(be, (void **)&be->logits, R * (size_t)be->vocab * 4));
    CREATE_TRY(dev_alloc(be, (void **)&be->amax_d, R * 4));
    CREATE_TRY(dev_alloc(be, (void **)&be->samp_d, R * sizeof(kern_sample_param)));
    CREATE_TRY(dev_alloc(be, (void **)&be->stok_d, R * 4));
    CREATE_TRY(dev_alloc(be, (void **)&be->samp_ws, kern_sample_ws_floats((int)R, be->vocab) * 4));
    if (cudaMallocHost((void **)&be->samp_h, R * sizeof(kern_sample_param)) != cudaSuccess ||
        cudaMallocHost((void **)&be->stok_h, R * 4) != cudaSuccess) {
        rc = cu_fail_rt(be, cudaErrorMemoryAllocation, "cudaMallocHost", __LINE__);
        goto fail;
    }
    if (cudaMallocHost((void **)&be->logits_h, R * (size_t)be->vocab * 4) != cudaSuccess ||
        cudaMallocHost((void **)&be->amax_h, R * 4) != cudaSuccess) {
        rc = cu_fail_rt(be, cudaErrorMemoryAllocation, "cudaMallocHost", __LINE__);
        goto fail;
    }
    be->irow = malloc(T * sizeof(int));
    be->seq_row0 = malloc(T * sizeof(int));
    be->lp = calloc((size_t)be->n_layers, sizeof(cu_layer_plan));
    be->sp = calloc((size_t)be->n_layers * T, sizeof(cu_seq_plan));
    be->dlen_h = malloc(T * sizeof(int32_t));
    be->cs_off = malloc(T * sizeof(size_t));
    be->row_host = calloc(R, 1);
    be->cs_dst = malloc(T * sizeof(float *));
    be->cs_src = malloc(T * sizeof(size_t));
    be->cs_cnt = malloc(T * sizeof(size_t));
    if (!be->irow || !be->seq_row0 || !be->lp || !be->sp || !be->dlen_h || !be->cs_off ||
        !be->row_host || !be->cs_dst || !be->cs_src || !be->cs_cnt) {
        rc = D2_ENOMEM;
        goto fail;
    }
#undef CREATE_TRY
    *out = &be->base;
    return D2_OK;
fail:
    D2_ERROR("cuda_backend: create failed: %s", be->err[0] ? be->err : d2_strerror(rc));
    cu_destroy(&be->base);
    return rc ? rc : D2_ECUDA;
}

/* ---- small ops --------------------------------------------------------------------- */

static int cu_attach_thread(eng_backend *base) {
    cuda_be *be = (cuda_be *)base;
    DEAD_CHECK();
    CU(cudaSetDevice(be->device));
    return D2_OK;
}

static void cu_caps(const eng_backend *base, eng_backend_caps *out) {
    const cuda_be *be = (const cuda_be *)base;
    size_t per_slot = (size_t)be->kvd * 2 * 2 + (size_t)be->n_kv * 4 + 4;
    int64_t avail = 0;
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
        /* the share of the device this process may use, less what is in use
         * (weights, activations: this process or others), less room for the
         * per-pool buffers kv_attach adds (plan staging, compression scratch) */
        int64_t allowed = (int64_t)((double)total_b * be->util);
        int64_t used = (int64_t)total_b - (int64_t)free_b;
        int64_t extra = (int64_t)256 << 20;
        avail = allowed - used - extra;
        if (avail < (int64_t)per_slot * be->pt) avail = (int64_t)per_slot * be->pt;
    } else {
        (void)cudaGetLastError();
    }
    *out = (eng_backend_caps){
        .name = "cuda",
        .kv_dtype = ENG_KV_DT_BF16,
        .kv_on_device = true,
        .kv_bytes_per_slot = per_slot,
        .kv_bytes_avail = avail,
        .argmax_on_device = true,
        .sample_on_device = true,
    };
}

static int cu_sync(eng_backend *base) {
    cuda_be *be = (cuda_be *)base;
    DEAD_CHECK();
    STREAM_SYNC();
    return D2_OK;
}

static const char *cu_last_error(const eng_backend *base) { return ((const cuda_be *)base)->err; }

/* ---- the payload hook ---------------------------------------------------------------- */

/* The open segment's words in the ring: room for a full segment at hook_at,
 * wrapping to the start (after the last segment sent has run, when no stream
 * sync came since) when the end is too close. */
static int hook_segment(cuda_be *be, int32_t **seg) {
    size_t need = (size_t)be->hook_cap * 6;
    if (be->hook_at + need > be->hook_ring) {
        if (be->hook_pending) CU(cudaEventSynchronize(be->ev_hook));
        be->hook_pending = 0;
        be->hook_at = 0;
    }
    *seg = be->hook_h + be->hook_at;
    return D2_OK;
}

static int hook_flush(cuda_be *be, int32_t *seg, int n_runs, int n_slots) {
    for (int i = 0; i < be->n_touched; i++) be->hook_mark[be->hook_touched[i]] = 0;
    be->n_touched = 0;
    if (n_runs == 0) return D2_OK;
    /* the start table moves right after the runs actually used */
    memmove(seg + (size_t)n_runs * 5, seg + (size_t)be->hook_cap * 5, (size_t)n_runs * sizeof(int32_t));
    CU(cudaMemcpyAsync(be->hook_d, seg, (size_t)n_runs * 6 * sizeof(int32_t),
                       cudaMemcpyHostToDevice, be->st));
    KC(kern_kv_copy_runs(be->kv_k, be->kv_v, be->kv_score, be->kv_pos, be->hook_d,
                         be->hook_d + (size_t)n_runs * 5, n_runs, n_slots, be->hook_stage, be->n_kv,
                         be->hd, be->pt, be->st));
    CU(cudaEventRecord(be->ev_hook, be->st));
    be->hook_pending = 1;
    be->hook_at += (size_t)n_runs * 6;
    return D2_OK;
}

/* Runs in segments that a gather-then-scatter executes as the sequential copy
 * (kernels.h, kern_kv_copy_runs): a run joins the open segment unless it reads
 * or writes a slot the segment already writes, or the staging is full. */
static int hook_copy(cuda_be *be, const kvp_slot_run *runs, int n_runs) {
    int32_t *seg;
    int rc = hook_segment(be, &seg);
    if (rc) return rc;
    int32_t *start = seg + (size_t)be->hook_cap * 5;
    int nr = 0, ns = 0;
    for (int r = 0; r < n_runs; r++) {
        kvp_slot_run u = runs[r];
        while (u.n > 0) {
            int n = u.n;
            if (n > be->hook_cap) n = be->hook_cap;
            size_t src = (size_t)u.src_page * be->pt + (size_t)u.src_slot;
            size_t dst = (size_t)u.dst_page * be->pt + (size_t)u.dst_slot;
            int conflict = ns + n > be->hook_cap || nr >= be->hook_cap;
            for (int j = 0; j < n && !conflict; j++)
                conflict = be->hook_mark[src + j] || be->hook_mark[dst + j];
            if (conflict) {
                rc = hook_flush(be, seg, nr, ns);
                if (!rc) rc = hook_segment(be, &seg);
                if (rc) return rc;
                start = seg + (size_t)be->hook_cap * 5;
                nr = ns = 0;
            }
            int32_t *w = seg + (size_t)nr * 5;
            w[0] = u.dst_page; w[1] = u.src_page; w[2] = u.dst_slot; w[3] = u.src_slot; w[4] = n;
            start[nr] = ns;
            nr++;
            ns += n;
            for (int j = 0; j < n; j++) {
                be->hook_mark[dst + j] = 1;
                be->hook_touched[be->n_touched++] = (int32_t)(dst + j);
            }
            u.n -= n; u.src_slot += n; u.dst_slot += n;
        }
    }
    return hook_flush(be, seg, nr, ns);
}

static void cu_payload_copy(void *ctx, const kvp_slot_run *runs, int n_runs) {
    cuda_be *be = ctx;
    if (be->dead) return;
    int rc = hook_copy(be, runs, n_runs);
    if (rc != D2_OK) {
        be->dead = 1; /* the payload no longer matches the pool: nothing may be trusted */
        D2_ERROR("%s", be->err);
    }
}

static int cu_kv_attach(eng_backend *base, kvp_pool *pool) {
    cuda_be *be = (cuda_be *)base;
    DEAD_CHECK();
    const kvp_config *pc = kvp_get_config(pool);
    if (be->kv_k) return cu_fail(be, D2_EINVAL, "kv_attach", "already attached");
    if (pc->n_layers != be->n_layers || pc->n_kv_heads != be->n_kv || pc->head_dim != be->hd ||
        pc->page_tokens != be->pt || pc->max_seq_tokens > be->max_seq)
        return cu_fail(be, D2_ESHAPE, "kv_attach", "pool shape differs from the model");
    be->n_pages = pc->n_pages;
    size_t n_slots = (size_t)pc->n_pages * (size_t)be->pt;
    /* one page more than the pool's: the scratch page of graph padding rows */
    size_t pay_slots = n_slots + (size_t)be->pt;
    be->scratch_page = (int32_t)pc->n_pages;
    int rc;
#define ATT_TRY(x)                                                                        \
    do {                                                                                  \
        rc = (x);                                                                         \
        if (rc != D2_OK) return rc;                                                       \
    } while (0)
#define PIN(p, bytes)                                                                     \
    do {                                                                                  \
        size_t b_ = (bytes);                                                              \
        cudaError_t e_ = cudaMallocHost((void **)&(p), b_ ? b_ : 16);                     \
        if (e_ != cudaSuccess) return cu_fail_rt(be, e_, "cudaMallocHost " #p, __LINE__); \
    } while (0)
    if (pc->n_pages >= INT32_MAX) return cu_fail(be, D2_EINVAL, "kv_attach", "page ids beyond int32");
    ATT_TRY(dev_alloc(be, (void **)&be->kv_k, pay_slots * (size_t)be->kvd * 2));
    ATT_TRY(dev_alloc(be, (void **)&be->kv_v, pay_slots * (size_t)be->kvd * 2));
    ATT_TRY(dev_alloc(be, (void **)&be->kv_score, pay_slots * (size_t)be->n_kv * 4));
    ATT_TRY(dev_alloc(be, (void **)&be->kv_pos, pay_slots * 4));
    CU(cudaMemset(be->kv_score, 0, pay_slots * (size_t)be->n_kv * 4));
    CU(cudaMemset(be->kv_pos, 0xff, pay_slots * 4));
    /* plan staging: sized for the most sequences a step can hold */
    be->max_seqs = pc->max_seqs < be->max_t ? pc->max_seqs : be->max_t;
    be->max_pages = (be->max_seq + be->pt - 1) / be->pt;
    be->work_cap = be->max_seqs * ((be->max_seq + KERN_DECODE_SPLIT - 1) / KERN_DECODE_SPLIT);
    size_t S = (size_t)be->max_seqs, T = (size_t)be->max_t, Lc = (size_t)be->n_layers;
    size_t MP = (size_t)be->max_pages;
    /* per step: tokens, positions, score_from, decode rows' sequence ids;
     * per layer the slot maps and the decode plan; the changed table
     * entries (at most every table of the step in full) and their headers */
    be->patch_cap = (int)(Lc * S);
    be->plan_cap = 4 * T + Lc * (2 * T + 2 * S + 2 + (size_t)be->work_cap) + Lc * S * MP +
                   3 * (size_t)be->patch_cap;
    graph_buckets(be);
    be->n_ids = pc->max_seqs;
    size_t rt = Lc * (size_t)be->n_ids * MP;
    if (rt > INT32_MAX || be->plan_cap > INT32_MAX)
        return cu_fail(be, D2_EINVAL, "kv_attach", "block tables beyond int32 offsets");
    ATT_TRY(dev_alloc(be, (void **)&be->rtab_d, rt * 4));
    be->rtab_h = malloc(rt * 4 + 4);
    be->rtab_n = calloc(Lc * (size_t)be->n_ids, sizeof(int32_t));
    be->patch_hdr = malloc((size_t)be->patch_cap * 3 * sizeof(int32_t));
    if (!be->rtab_h || !be->rtab_n || !be->patch_hdr)
        return cu_fail(be, D2_ENOMEM, "kv_attach", "resident block tables");
    PIN(be->plan_h, be->plan_cap * 4);
    ATT_TRY(dev_alloc(be, (void **)&be->plan_d, be->plan_cap * 4));
    size_t ws = kern_attn_decode_workspace_bytes(be->max_seqs, be->work_cap, be->n_heads, be->hd, 1);
    ATT_TRY(dev_alloc(be, &be->dec_ws, ws));
    be->colsum_cap = Lc * (size_t)be->n_heads * (size_t)be->max_seq;
    ATT_TRY(dev_alloc(be, (void **)&be->colsum_d, be->colsum_cap * 4));
    PIN(be->colsum_h, be->colsum_cap * 4);
    /* payload hook */
    be->hook_cap = be->max_seq > 4 * be->pt ? be->max_seq : 4 * be->pt;
    {
        /* four full segments, or more (up to 16 MB) so that compacting every
         * layer of a sequence seldom wraps */
        size_t seg = (size_t)be->hook_cap * 6, want = seg * Lc;
        size_t most = ((size_t)16 << 20) / 4;
        be->hook_ring = 4 * seg;
        if (want > be->hook_ring) be->hook_ring = want < most ? want : most;
        if (be->hook_ring < 4 * seg) be->hook_ring = 4 * seg;
    }
    PIN(be->hook_h, be->hook_ring * 4);
    ATT_TRY(dev_alloc(be, (void **)&be->hook_d, (size_t)be->hook_cap * 6 * 4));
    ATT_TRY(dev_alloc(be, &be->hook_stage, kern_kv_copy_staging_bytes(be->hook_cap, be->n_kv, be->hd)));
    be->hook_mark = calloc(n_slots, 1);
    be->hook_touched = malloc((size_t)be->hook_cap * sizeof(int32_t));
    if (!be->hook_mark || !be->hook_touched)
        return cu_fail(be, D2_ENOMEM, "kv_attach", "hook bookkeeping");
    /* compression */
    size_t d2o_bytes = kern_d2o_scratch_bytes(be->max_seq, be->n_kv, be->hd, CU_D2O_MOVE_SLOTS);
    if (!d2o_bytes) return cu_fail(be, D2_EINVAL, "kv_attach", "kern_d2o_scratch_bytes");
    ATT_TRY(dev_alloc(be, &be->d2o_mem, d2o_bytes));
    KC(kern_d2o_ws_init(&be->d2o, be->d2o_mem, d2o_bytes, be->max_seq, be->n_kv, be->hd,
                        CU_D2O_MOVE_SLOTS));
    PIN(be->tab_h, (size_t)be->max_pages * 4);
    ATT_TRY(dev_alloc(be, (void **)&be->tab_d, (size_t)be->max_pages * 4));
    PIN(be->keep_h, (size_t)be->max_seq);
    PIN(be->ev_h, (size_t)be->max_seq * 4);
    PIN(be->tgt_h, (size_t)be->max_seq * 4);
    PIN(be->sim_h, (size_t)be->max_seq * 4);
    PIN(be->stat_h, 2 * 4);
    PIN(be->tau_h, 4);
    ATT_TRY(dev_alloc(be, (void **)&be->tau_d, 4));
    be->cst_cap = Lc * (MP + 4);
    PIN(be->cst_h, be->cst_cap * 4);
    ATT_TRY(dev_alloc(be, (void **)&be->cst_d, be->cst_cap * 4));
    PIN(be->ckeep_h, Lc * (size_t)be->max_seq);
    PIN(be->ccount_h, Lc * 4 * 4);
    PIN(be->cstat_h, Lc * 2 * 4);
    be->cplan = calloc(Lc, sizeof *be->cplan);
    if (!be->cplan) return cu_fail(be, D2_ENOMEM, "kv_attach", "compression plans");
#undef ATT_TRY
#undef PIN
    be->base.pool = pool;
    kvp_payload pl = {.copy = cu_payload_copy, .ctx = be};
    kvp_set_payload(pool, &pl);
    return D2_OK;
}

/* ---- the step ------------------------------------------------------------------------ */

static int validate(const cuda_be *be, const eng_batch *b) {
    if (b->n_tokens <= 0 || b->n_tokens > be->max_t || b->n_seqs <= 0 || b->n_seqs > b->n_tokens)
        return D2_EINVAL;
    int next = 0;
    for (int i = 0; i < b->n_seqs; i++) {
        const eng_batch_seq *s = &b->seqs[i];
        if (s->start != next || s->n <= 0 || s->start + s->n > b->n_tokens) return D2_EINVAL;
        if (s->seq < 0 || s->seq >= be->n_ids) return D2_EINVAL;
        next += s->n;
    }
    if (next != b->n_tokens) return D2_EINVAL;
    for (int t = 0; t < b->n_tokens; t++)
        if (b->tokens[t] < 0 || b->tokens[t] >= be->vocab || b->pos[t] < 0) return D2_EINVAL;
    if (eng_batch_out_rows(b) > be->max_rows) return D2_EINVAL;
    for (int i = 0; i < b->n_seqs; i++)
        for (int l = 0; l < be->n_layers; l++)
            if (kvp_get_table(be->base.pool, b->seqs[i].seq, l).n_tokens < b->seqs[i].n)
                return D2_EINVAL;
    return D2_OK;
}

static int is_decode(const eng_batch_seq *s) { return s->n == 1 && !(s->want_scores && s->colsum); }

/* Offset of the resident table row of (seq, layer) in rtab_d / rtab_h. */
static size_t rtab_row(const cuda_be *be, int seq, int l) {
    return ((size_t)l * (size_t)be->n_ids + (size_t)seq) * (size_t)be->max_pages;
}

/* Brings the resident row of (seq, l) up to the pool's table: the entries
 * from the first one that differs from the shadow to the end of the table go
 * into the staging at *off (a patch and its header); nothing when the row is
 * current (a steady decode step changes a row only when it gains a page). */
static int rtab_patch(cuda_be *be, int seq, int l, const kvp_table *tab, int32_t *P, size_t cap,
                      size_t *off) {
    size_t row = rtab_row(be, seq, l);
    int32_t *sh = be->rtab_h + row;
    int32_t *valid = &be->rtab_n[(size_t)l * (size_t)be->n_ids + (size_t)seq];
    int n = tab->n_pages, m = *valid < n ? *valid : n, i0 = m;
    if (m > 0 && memcmp(sh, tab->pages, (size_t)m * sizeof(int32_t)) != 0)
        for (i0 = 0; sh[i0] == tab->pages[i0]; i0++) {}
    if (i0 == n) {
        *valid = n;
        return D2_OK;
    }
    size_t cnt = (size_t)(n - i0);
    if (*off + cnt > cap || be->n_patch >= be->patch_cap)
        return cu_fail(be, D2_EINVAL, "step", "table patches larger than their staging");
    memcpy(P + *off, tab->pages + i0, cnt * sizeof(int32_t));
    memcpy(sh + i0, tab->pages + i0, cnt * sizeof(int32_t));
    int32_t *h = be->patch_hdr + (size_t)be->n_patch * 3;
    h[0] = (int32_t)(row + (size_t)i0);
    h[1] = (int32_t)*off;
    h[2] = (int32_t)cnt;
    be->n_patch++;
    *off += cnt;
    *valid = n;
    return D2_OK;
}

/* The shadow rows of the plan's sequences no longer say what the device
 * holds (a plan that failed after patching them): resend them in full. */
static void rtab_forget(cuda_be *be, const eng_batch *b) {
    for (int si = 0; si < b->n_seqs; si++)
        for (int l = 0; l < be->n_layers; l++)
            be->rtab_n[(size_t)l * (size_t)be->n_ids + (size_t)b->seqs[si].seq] = 0;
}

/* Before a step (launched or replayed) builds its plan: the previous step's
 * results must have arrived (its column sums added into the callers' arrays)
 * before this step's copies reuse their pinned buffers, and its plan staging
 * must have been consumed. One wait, and only when no result call or sync came
 * between (a step without logit rows, such as an intermediate prefill chunk). */
static int plan_wait(cuda_be *be) {
    if (be->out_pending) STREAM_SYNC();
    else if (be->plan_pending) CU(cudaEventSynchronize(be->ev_plan));
    be->plan_pending = 0;
    return D2_OK;
}

/* The step's one upload from pinned staging (tokens, positions, maps and the
 * table patches: `used` int32s, the patches from o_hdr), then the patch of
 * the resident block tables. */
static int plan_send(cuda_be *be, size_t used, size_t o_hdr) {
    CU(cudaMemcpyAsync(be->plan_d, be->plan_h, used * sizeof(int32_t), cudaMemcpyHostToDevice, be->st));
    CU(cudaEventRecord(be->ev_plan, be->st));
    be->plan_pending = 1;
    KC(kern_patch_i32(be->rtab_d, be->plan_d, be->plan_d + o_hdr, be->n_patch, be->st));
    return D2_OK;
}

/* Fills the staging buffer (internal row order), the per-layer plan and the
 * patches of the resident tables (headers at *o_hdr, be->n_patch of them). */
static int build_plan(cuda_be *be, const eng_batch *b, int n_dec, size_t *used, size_t *o_hdr,
                      size_t *o_trow) {
    kvp_pool *pool = be->base.pool;
    int T = b->n_tokens, pt = be->pt;
    int32_t *P = be->plan_h;
    size_t off = 0;
#define TAKE(var, n)                                                                      \
    do {                                                                                  \
        (var) = off;                                                                      \
        off += (size_t)(n);                                                               \
        if (off > be->plan_cap)                                                           \
            return cu_fail(be, D2_EINVAL, "step", "plan larger than its staging");        \
    } while (0)
    size_t o_tok, o_pos, o_sf;
    TAKE(o_tok, T);
    TAKE(o_pos, T);
    TAKE(o_sf, n_dec > 0 ? n_dec : 1);
    TAKE(*o_trow, n_dec > 0 ? n_dec : 1);
    for (int si = 0; si < b->n_seqs; si++) {
        const eng_batch_seq *s = &b->seqs[si];
        int r0 = be->seq_row0[si];
        for (int j = 0; j < s->n; j++) {
            P[o_tok + (size_t)r0 + j] = b->tokens[s->start + j];
            P[o_pos + (size_t)r0 + j] = b->pos[s->start + j];
        }
        if (is_decode(s)) {
            P[o_sf + (size_t)r0] = s->want_scores ? s->score_from : INT32_MAX;
            P[*o_trow + (size_t)r0] = s->seq;
        }
    }
    be->n_patch = 0;
    for (int l = 0; l < be->n_layers; l++) {
        cu_layer_plan *lp = &be->lp[l];
        TAKE(lp->page_of, T);
        TAKE(lp->slot_of, T);
        for (int si = 0; si < b->n_seqs; si++) {
            const eng_batch_seq *s = &b->seqs[si];
            kvp_table tab = kvp_get_table(pool, s->seq, l);
            int first = tab.n_tokens - s->n, r0 = be->seq_row0[si];
            for (int j = 0; j < s->n; j++) {
                int32_t page;
                int slot;
                kvp_locate(&tab, pt, first + j, &page, &slot);
                P[lp->page_of + (size_t)r0 + j] = page;
                P[lp->slot_of + (size_t)r0 + j] = slot;
            }
            int rc = rtab_patch(be, s->seq, l, &tab, P, be->plan_cap, &off);
            if (rc) return rc;
            if (!is_decode(s)) {
                cu_seq_plan *sp = &be->sp[(size_t)l * (size_t)be->max_t + (size_t)si];
                sp->row0 = r0;
                sp->n_kv = tab.n_tokens;
                sp->tab = rtab_row(be, s->seq, l);
            }
        }
        lp->n_work = 0;
        lp->dlive = SIZE_MAX;
        if (n_dec > 0) {
            TAKE(lp->dlen, n_dec);
            TAKE(lp->dsplit, n_dec + 1);
            for (int si = 0; si < b->n_seqs; si++) {
                const eng_batch_seq *s = &b->seqs[si];
                if (!is_decode(s)) continue;
                int r0 = be->seq_row0[si];
                int n_tok = kvp_get_table(pool, s->seq, l).n_tokens;
                be->dlen_h[r0] = n_tok;
                P[lp->dlen + (size_t)r0] = n_tok;
            }
            size_t room = be->plan_cap - off;
            int cap = room > (size_t)be->work_cap ? be->work_cap : (int)room;
            int rc = kern_attn_decode_plan(be->dlen_h, n_dec, P + lp->dsplit, P + off, cap, &lp->n_work);
            if (rc) return cu_fail(be, rc, "kern_attn_decode_plan", "decode work list");
            TAKE(lp->dwork, lp->n_work);
        }
    }
    TAKE(*o_hdr, (size_t)be->n_patch * 3);
    memcpy(P + *o_hdr, be->patch_hdr, (size_t)be->n_patch * 3 * sizeof(int32_t));
#undef TAKE
    *used = off;
    return D2_OK;
}

/* The end of a step: its results queued for the host without a wait — the
 * argmax of every logit row (4 bytes a row back), the rows of host_logits
 * sequences (adjacent ones in one copy), the column sums (added into the
 * callers' arrays at step_settle). The first call that needs one of them
 * waits once for all (engine/backend.h, "Results and host synchronisation"). */
static int step_results(cuda_be *be, const eng_batch *b, int rows, size_t cs_used, int amax_queued) {
    size_t V = (size_t)be->vocab;
    memset(be->row_host, 0, (size_t)be->max_rows);
    if (rows > 0 && !amax_queued) { /* (a replayed graph queued it already) */
        KC(kern_argmax(be->amax_d, be->logits, rows, be->vocab, be->vocab, be->st));
        CU(cudaMemcpyAsync(be->amax_h, be->amax_d, (size_t)rows * 4, cudaMemcpyDeviceToHost, be->st));
    }
    int r = 0, run0 = 0, run_n = 0;
    for (int si = 0; si <= b->n_seqs; si++) {
        const eng_batch_seq *s = si < b->n_seqs ? &b->seqs[si] : NULL;
        int n = !s ? 0 : s->all_logits ? s->n : s->want_logits ? 1 : 0;
        bool host = s && n > 0 && s->host_logits;
        if (run_n > 0 && (!s || (n > 0 && !host))) { /* the run of host rows ends */
            size_t off = (size_t)run0 * V;
            CU(cudaMemcpyAsync(be->logits_h + off, be->logits + off, (size_t)run_n * V * 4,
                               cudaMemcpyDeviceToHost, be->st));
            run_n = 0;
        }
        if (host) {
            if (run_n == 0) run0 = r;
            run_n += n;
            memset(be->row_host + r, 1, (size_t)n);
        }
        r += n;
    }
    be->n_cs = 0;
    if (cs_used) {
        CU(cudaMemcpyAsync(be->colsum_h, be->colsum_d, cs_used * 4, cudaMemcpyDeviceToHost, be->st));
        for (int si = 0; si < b->n_seqs; si++) {
            const eng_batch_seq *s = &b->seqs[si];
            if (be->cs_off[si] == SIZE_MAX) continue;
            be->cs_dst[be->n_cs] = s->colsum;
            be->cs_src[be->n_cs] = be->cs_off[si];
            be->cs_cnt[be->n_cs] = (size_t)be->n_layers * (size_t)be->n_heads * (size_t)s->colsum_len;
            be->n_cs++;
        }
    }
    be->out_pending = rows > 0 || cs_used > 0;
    return D2_OK;
}

/* What the forward of a step reads: its T internal rows (n_dec decode rows
 * first), the device plan's token, position, score_from and table-row
 * arrays, each layer's maps and decode plan (lp[l], offsets into plan_d),
 * and the plan's other sequences (b; NULL: decode rows only). */
typedef struct cu_fwd {
    const eng_batch *b;
    const cu_layer_plan *lp;
    int T, n_dec, dec_scores;
    const int32_t *tok, *pos, *sf, *trow;
} cu_fwd;

/* The embedding and every layer of a step, enqueued on the stream: the same
 * launches whether they run at once (cu_step) or are captured into a CUDA
 * graph (graph_capture). Leaves the residual stream in be->x. */
static int fwd_layers(cuda_be *be, const cu_fwd *f) {
    const int32_t *D = be->plan_d;
    const int32_t *tok_d = f->tok, *pos_d = f->pos, *sf_d = f->sf;
    const eng_batch *b = f->b;
    int T = f->T, n_dec = f->n_dec, dec_scores = f->dec_scores, rc;
    int dim = be->dim, qd = be->qd, kvd = be->kvd, qkvd = be->qkvd;
    float scale = 1.0f / sqrtf((float)be->hd);
    kern_kv_view view = {.k = be->kv_k, .v = be->kv_v, .pos = be->kv_pos, .page_tokens = be->pt,
                         .n_kv_heads = be->n_kv, .head_dim = be->hd};

    KC(kern_embed(be->x, KERN_F32, be->embd, tok_d, T, dim, be->vocab, be->st));
    for (int l = 0; l < be->n_layers; l++) {
        const cu_layer *w = &be->L[l];
        const cu_layer_plan *lp = &f->lp[l];
        KC(kern_rmsnorm(be->xb, KERN_BF16, be->x, w->attn_norm, T, dim, be->eps, be->st));
        rc = cu_gemm(be, w->bqkv ? G_QKV_BIAS : G_QKV, w->wqkv, be->xb, T, be->qkv, 0, w->bqkv);
        if (rc) return rc;
        KC(kern_rope(be->qkv, pos_d, be->inv_freq, T, be->n_heads, be->hd, qkvd, be->neox, be->st));
        KC(kern_rope(be->qkv + qd, pos_d, be->inv_freq, T, be->n_kv, be->hd, qkvd, be->neox, be->st));
        KC(kern_kv_write(be->kv_k, be->kv_v, be->kv_pos, be->kv_score, be->qkv + qd,
                         be->qkv + qd + kvd, qkvd, pos_d, D + lp->page_of, D + lp->slot_of, T,
                         be->n_kv, be->hd, be->pt, be->st));
        if (n_dec > 0)
            KC(kern_attn_decode(be->ao, KERN_BF16, be->qkv, qkvd, view,
                                dec_scores ? be->kv_score : NULL, dec_scores ? sf_d : NULL,
                                be->rtab_d + rtab_row(be, 0, l), be->max_pages, f->trow,
                                D + lp->dlen, pos_d, D + lp->dsplit,
                                lp->dwork != SIZE_MAX ? D + lp->dwork : NULL, lp->n_work,
                                lp->dlive != SIZE_MAX ? D + lp->dlive : NULL, n_dec, be->n_heads,
                                scale, be->window,
                                be->dec_ws, be->st));
        for (int si = 0; b && si < b->n_seqs; si++) {
            const eng_batch_seq *s = &b->seqs[si];
            if (is_decode(s)) continue;
            const cu_seq_plan *sp = &be->sp[(size_t)l * (size_t)be->max_t + (size_t)si];
            const float *q = be->qkv + (size_t)sp->row0 * (size_t)qkvd;
            KC(kern_attn_prefill(be->ao + (size_t)sp->row0 * (size_t)qd, KERN_BF16,
                                 s->want_scores ? be->lse : NULL, q, qkvd, view, be->rtab_d + sp->tab,
                                 sp->n_kv, pos_d + sp->row0, s->n, be->n_heads, scale, be->window,
                                 be->st));
            if (s->want_scores) {
                float *cs = NULL;
                if (be->cs_off[si] != SIZE_MAX)
                    cs = be->colsum_d + be->cs_off[si] +
                         (size_t)l * (size_t)be->n_heads * (size_t)s->colsum_len;
                KC(kern_attn_prefill_scores(be->kv_score, cs, s->colsum_len, s->score_from, q,
                                            qkvd, be->lse, view, be->rtab_d + sp->tab, sp->n_kv,
                                            pos_d + sp->row0, s->n, be->n_heads, scale,
                                            be->window, be->st));
            }
        }
        rc = cu_gemm(be, G_O, w->wo, be->ao, T, be->x, 1, NULL);
        if (rc) return rc;
        KC(kern_rmsnorm(be->xb, KERN_BF16, be->x, w->ffn_norm, T, dim, be->eps, be->st));
        rc = cu_gemm(be, G_GU, w->wgu, be->xb, T, be->gu, 0, NULL);
        if (rc) return rc;
        KC(kern_swiglu(be->hb, KERN_BF16, be->gu, be->gu + be->ffn, T, be->ffn, 2 * be->ffn, be->st));
        rc = cu_gemm(be, G_DOWN, w->wdown, be->hb, T, be->x, 1, NULL);
        if (rc) return rc;
    }
    return D2_OK;
}

/* ---- CUDA graphs ----------------------------------------------------------------------
 *
 * With graphs on (eng_backend_config.cuda_graphs, eng_cuda_backend_set_graphs)
 * a decode-only step -- every plan sequence a decode token (is_decode) that
 * wants its logits -- of n_dec rows is padded to the smallest bucket B >=
 * n_dec (1, 2, 4, ... and min(max_seqs, max_logit_rows) as the last) and
 * runs as the replay of a graph captured once per (bucket, whether the
 * decode adds D2O scores): fwd_layers for B rows, then the final norm and
 * the LM head of all B rows (decode row i is logit row i, no gather). A
 * graph's launches keep the arguments of the capture, so all that changes
 * between steps lives in the device plan at offsets fixed per bucket
 * (graph_layout): tokens, positions, score_from, table rows, and per layer
 * the slot maps, decode lengths and split bases, whose last entry is the
 * work count the decode kernels read on the device (kern_attn_decode's
 * n_work_live, without a work list: each item's sequence comes from the
 * split bases; the workspace is laid out for the bucket's capacity). Padding
 * rows take token 0 at position 0, write their K/V into the scratch page (a
 * payload page past the pool's that no table names) and have decode length
 * 0: they read nothing, and their logits are never handed out. The graph
 * ends with the argmax of every row copied to the host (step_results' first
 * result); the plan upload, the table patches and the copies of host_logits
 * rows stay outside it (their sizes vary), so a replayed step is one
 * upload, a patch launch when a table gained a page, one graph launch (and
 * those copies), then the step's one wait as in cu_step. A bucket's first
 * step runs directly (kernels loaded lazily and cuBLASLt's first calls
 * happen outside a capture), its second captures the graph (host time in
 * gstats.capture_s), every later one replays it. A capture that CUDA
 * invalidates without an error of ours turns graphs off for the backend;
 * any other failure is an error as a launch's would be.
 */

static void graph_buckets(cuda_be *be) {
    int cap = be->max_seqs < be->max_rows ? be->max_seqs : be->max_rows;
    be->n_gb = 0;
    for (int r = 1; r < cap && be->n_gb < CU_GRAPH_BUCKETS - 1; r *= 2) be->gb[be->n_gb++] = r;
    be->gb[be->n_gb++] = cap;
}

/* The plan layout of bucket B (int32 offsets into plan_d/plan_h): tokens,
 * positions, score_from, table rows at o[0..3], then per layer lp[l];
 * returns the words of this fixed part (the patches follow it). */
static size_t graph_layout(const cuda_be *be, int B, cu_layer_plan *lp, size_t o[4]) {
    size_t off = 0, nb = (size_t)B;
    for (int k = 0; k < 4; k++, off += nb) o[k] = off;
    /* the work list's capacity: B tables of max_seq tokens (<= work_cap); no
     * list is uploaded (the kernels search split_base), its length is
     * split_base[B] */
    int wcap = B * ((be->max_seq + KERN_DECODE_SPLIT - 1) / KERN_DECODE_SPLIT);
    for (int l = 0; l < be->n_layers; l++) {
        lp[l].page_of = off;
        lp[l].slot_of = off + nb;
        lp[l].dlen = off + 2 * nb;
        lp[l].dsplit = off + 3 * nb;
        lp[l].dlive = off + 4 * nb;
        lp[l].dwork = SIZE_MAX;
        lp[l].n_work = wcap;
        off += 4 * nb + 1;
    }
    return off;
}

/* The staging of a decode-only step of n_dec rows in bucket B's layout, and
 * the patches of the resident tables (headers at *o_hdr). */
static int build_plan_graph(cuda_be *be, const eng_batch *b, int n_dec, int B, size_t *used,
                            size_t *o_hdr) {
    kvp_pool *pool = be->base.pool;
    int32_t *P = be->plan_h;
    size_t o[4], off = graph_layout(be, B, be->glp, o);
    if (off > be->plan_cap) return cu_fail(be, D2_EINVAL, "step", "graph plan larger than its staging");
    for (int i = 0; i < B; i++) {
        const eng_batch_seq *s = i < n_dec ? &b->seqs[i] : NULL;
        P[o[0] + (size_t)i] = s ? b->tokens[s->start] : 0;
        P[o[1] + (size_t)i] = s ? b->pos[s->start] : 0;
        P[o[2] + (size_t)i] = s && s->want_scores ? s->score_from : INT32_MAX;
        P[o[3] + (size_t)i] = s ? s->seq : 0;
    }
    be->n_patch = 0;
    for (int l = 0; l < be->n_layers; l++) {
        const cu_layer_plan *lp = &be->glp[l];
        int32_t n_work = 0; /* <= lp->n_work: every table holds at most max_seq tokens */
        for (int i = 0; i < B; i++) {
            int32_t page = be->scratch_page;
            int slot = i % be->pt, n_tok = 0;
            if (i < n_dec) {
                kvp_table tab = kvp_get_table(pool, b->seqs[i].seq, l);
                kvp_locate(&tab, be->pt, tab.n_tokens - 1, &page, &slot);
                n_tok = tab.n_tokens;
                int rc = rtab_patch(be, b->seqs[i].seq, l, &tab, P, be->plan_cap, &off);
                if (rc) return rc;
            }
            P[lp->page_of + (size_t)i] = page;
            P[lp->slot_of + (size_t)i] = slot;
            P[lp->dlen + (size_t)i] = n_tok;
            /* split bases as kern_attn_decode_plan's; split_base[B] = the count */
            P[lp->dsplit + (size_t)i] = n_work;
            n_work += (n_tok + KERN_DECODE_SPLIT - 1) / KERN_DECODE_SPLIT;
        }
        P[lp->dlive] = n_work; /* = split_base[B] */
    }
    if (off + (size_t)be->n_patch * 3 > be->plan_cap)
        return cu_fail(be, D2_EINVAL, "step", "plan larger than its staging");
    *o_hdr = off;
    memcpy(P + off, be->patch_hdr, (size_t)be->n_patch * 3 * sizeof(int32_t));
    *used = off + (size_t)be->n_patch * 3;
    return D2_OK;
}

/* The final norm and LM head of rows 0..B-1 of the residual stream, and
 * their argmax back to the host (step_results' first result, queued here so
 * that the replay holds it). */
static int graph_head(cuda_be *be, int B) {
    KC(kern_rmsnorm(be->xfb, KERN_BF16, be->x, be->out_norm, B, be->dim, be->eps, be->st));
    int rc = cu_gemm(be, G_LM, be->outw, be->xfb, B, be->logits, 0, NULL);
    if (rc) return rc;
    KC(kern_argmax(be->amax_d, be->logits, B, be->vocab, be->vocab, be->st));
    CU(cudaMemcpyAsync(be->amax_h, be->amax_d, (size_t)B * 4, cudaMemcpyDeviceToHost, be->st));
    return D2_OK;
}

/* Captures the graph of bucket gi (sc: the decode adds scores). */
static int graph_capture(cuda_be *be, int gi, int sc) {
    int B = be->gb[gi];
    size_t o[4];
    graph_layout(be, B, be->glp, o);
    const int32_t *D = be->plan_d;
    cu_fwd f = {.b = NULL, .lp = be->glp, .T = B, .n_dec = B, .dec_scores = sc,
                .tok = D + o[0], .pos = D + o[1], .sf = D + o[2], .trow = D + o[3]};
    double t0 = d2_now();
    CU(cudaStreamBeginCapture(be->st, cudaStreamCaptureModeThreadLocal));
    int rc = fwd_layers(be, &f);
    if (!rc) rc = graph_head(be, B);
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamEndCapture(be->st, &g);
    if (rc) {
        if (g) cudaGraphDestroy(g);
        return rc;
    }
    if (e == cudaErrorStreamCaptureInvalidated) {
        /* refused by CUDA, not by a call of ours: launch the kernels instead */
        (void)cudaGetLastError();
        be->graphs = 0;
        return D2_OK;
    }
    if (e != cudaSuccess) return cu_fail_rt(be, e, "cudaStreamEndCapture", __LINE__);
    e = cudaGraphInstantiate(&be->gexec[gi][sc], g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
        be->gexec[gi][sc] = NULL;
        return cu_fail_rt(be, e, "cudaGraphInstantiate", __LINE__);
    }
    be->gstats.captures++;
    be->gstats.capture_s += d2_now() - t0;
    return D2_OK;
}

/* A decode-only step by graph replay when it qualifies (*done = 1), else
 * nothing (*done = 0: cu_step launches it). */
static int step_graph(cuda_be *be, const eng_batch *b, int n_dec, int dec_scores, int *done) {
    *done = 0;
    if (n_dec != b->n_seqs || n_dec > be->gb[be->n_gb - 1]) return D2_OK;
    for (int i = 0; i < n_dec; i++)
        if (!b->seqs[i].want_logits && !b->seqs[i].all_logits) return D2_OK;
    int gi = 0, sc = dec_scores ? 1 : 0;
    while (be->gb[gi] < n_dec) gi++;
    int B = be->gb[gi];
    if (!be->gexec[gi][sc]) {
        if (!be->gwarm[gi][sc]) {
            be->gwarm[gi][sc] = 1;
            be->gstats.warmup_steps++;
            return D2_OK;
        }
        int rc = graph_capture(be, gi, sc);
        if (rc || !be->gexec[gi][sc]) return rc;
    }
    int rc = plan_wait(be);
    if (rc) return rc;
    size_t used = 0, o_hdr = 0;
    rc = build_plan_graph(be, b, n_dec, B, &used, &o_hdr);
    if (rc) {
        rtab_forget(be, b);
        return rc;
    }
    rc = plan_send(be, used, o_hdr);
    if (rc) return rc;
    CU(cudaGraphLaunch(be->gexec[gi][sc], be->st));
    be->gstats.replays++;
    be->n_logit_rows = n_dec;
    *done = 1;
    return step_results(be, b, n_dec, 0, 1);
}

int eng_cuda_backend_set_graphs(eng_backend *base, int on) {
    cuda_be *be = (cuda_be *)base;
    int was = be->graphs;
    be->graphs = on != 0;
    return was;
}

eng_cuda_graph_stats eng_cuda_backend_graph_stats(eng_backend *base) {
    return ((cuda_be *)base)->gstats;
}

static int cu_step(eng_backend *base, const eng_batch *b) {
    cuda_be *be = (cuda_be *)base;
    DEAD_CHECK();
    if (!base->pool || !be->kv_k) return cu_fail(be, D2_EINVAL, "step", "no KV payload (kv_attach)");
    int rc = validate(be, b);
    if (rc) return cu_fail(be, rc, "step", "malformed plan");
    int T = b->n_tokens, dim = be->dim;
    /* internal order: decode tokens first */
    int n_dec = 0;
    for (int si = 0; si < b->n_seqs; si++)
        if (is_decode(&b->seqs[si])) be->seq_row0[si] = n_dec++;
    if (n_dec > be->max_seqs) return cu_fail(be, D2_EINVAL, "step", "more sequences than the pool holds");
    int r = n_dec, dec_scores = 0;
    for (int si = 0; si < b->n_seqs; si++) {
        const eng_batch_seq *s = &b->seqs[si];
        if (is_decode(s)) {
            dec_scores |= s->want_scores;
            continue;
        }
        be->seq_row0[si] = r;
        r += s->n;
    }
    if (be->graphs) {
        int done = 0;
        rc = step_graph(be, b, n_dec, dec_scores, &done);
        if (rc || done) return rc;
    }
    /* colsum regions */
    size_t cs_used = 0;
    for (int si = 0; si < b->n_seqs; si++) {
        const eng_batch_seq *s = &b->seqs[si];
        be->cs_off[si] = SIZE_MAX;
        if (!s->want_scores || !s->colsum || s->colsum_len <= 0) continue;
        size_t need = (size_t)be->n_layers * (size_t)be->n_heads * (size_t)s->colsum_len;
        if (cs_used + need > be->colsum_cap)
            return cu_fail(be, D2_EINVAL, "step", "column sums of this plan exceed the reserve");
        be->cs_off[si] = cs_used;
        cs_used += need;
    }
    rc = plan_wait(be);
    if (rc) return rc;
    size_t used = 0, o_hdr = 0, o_trow = 0;
    rc = build_plan(be, b, n_dec, &used, &o_hdr, &o_trow);
    if (rc) {
        rtab_forget(be, b);
        return rc;
    }
    rc = plan_send(be, used, o_hdr);
    if (rc) return rc;
    if (cs_used) CU(cudaMemsetAsync(be->colsum_d, 0, cs_used * 4, be->st));
    const int32_t *D = be->plan_d;
    cu_fwd f = {.b = b, .lp = be->lp, .T = T, .n_dec = n_dec, .dec_scores = dec_scores,
                .tok = D, .pos = D + T, .sf = D + 2 * T, .trow = D + o_trow};
    rc = fwd_layers(be, &f);
    if (rc) return rc;
    /* logit rows, in plan order */
    int rows = 0;
    for (int si = 0; si < b->n_seqs; si++) {
        const eng_batch_seq *s = &b->seqs[si];
        int src = -1, n = 0;
        if (s->all_logits) {
            src = be->seq_row0[si];
            n = s->n;
        } else if (s->want_logits) {
            src = be->seq_row0[si] + s->n - 1;
            n = 1;
        }
        if (n == 0) continue;
        CU(cudaMemcpyAsync(be->xsel + (size_t)rows * (size_t)dim, be->x + (size_t)src * (size_t)dim,
                           (size_t)n * (size_t)dim * 4, cudaMemcpyDeviceToDevice, be->st));
        rows += n;
    }
    if (rows > 0) {
        KC(kern_rmsnorm(be->xfb, KERN_BF16, be->xsel, be->out_norm, rows, dim, be->eps, be->st));
        rc = cu_gemm(be, G_LM, be->outw, be->xfb, rows, be->logits, 0, NULL);
        if (rc) return rc;
    }
    be->n_logit_rows = rows;
    return step_results(be, b, rows, cs_used, 0);
}

/* ---- logits ------------------------------------------------------------------------ */

static int cu_logits(eng_backend *base, int row0, int n, const float **out) {
    cuda_be *be = (cuda_be *)base;
    DEAD_CHECK();
    if (row0 < 0 || n < 0 || row0 + n > be->n_logit_rows)
        return cu_fail(be, D2_EINVAL, "logits", "rows outside the last step's logits");
    size_t off = (size_t)row0 * (size_t)be->vocab;
    int copied = 1;
    for (int r = row0; r < row0 + n; r++) copied &= be->row_host[r];
    if (!copied) {
        /* rows the plan did not flag host_logits: a copy and a wait of their own */
        CU(cudaMemcpyAsync(be->logits_h + off, be->logits + off, (size_t)n * (size_t)be->vocab * 4,
                           cudaMemcpyDeviceToHost, be->st));
        STREAM_SYNC();
        memset(be->row_host + row0, 1, (size_t)n);
    } else if (n > 0 && be->out_pending) {
        STREAM_SYNC(); /* the step's one wait */
    }
    *out = be->logits_h + off;
    return D2_OK;
}

static int cu_argmax(eng_backend *base, const int *rows, int n, int32_t *out) {
    cuda_be *be = (cuda_be *)base;
    DEAD_CHECK();
    for (int i = 0; i < n; i++)
        if (rows[i] < 0 || rows[i] >= be->n_logit_rows)
            return cu_fail(be, D2_EINVAL, "argmax", "row outside the last step's logits");
    /* the step queued every row's argmax: the step's one wait, if none came yet */
    if (n > 0 && be->out_pending) STREAM_SYNC();
    for (int i = 0; i < n; i++) out[i] = be->amax_h[rows[i]];
    return D2_OK;
}

_Static_assert(ENG_SAMPLE_DEVICE_MAX_K <= KERN_SAMPLE_MAX_K, "kern_sample draws every device top-k");

/* Device draws (kern_sample): one parameter upload, one launch, one 4-byte
 * copy per row back and one synchronisation for all the step's draws — the
 * step's one wait when the runtime calls it first: it also completes the
 * results the step queued (argmax, host rows, column sums). */
static int cu_sample(eng_backend *base, const int *rows, const eng_sample_draw *d, int n, int32_t *out) {
    cuda_be *be = (cuda_be *)base;
    DEAD_CHECK();
    if (n < 0 || n > be->max_rows) return cu_fail(be, D2_EINVAL, "sample", "more draws than logit rows");
    for (int i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= be->n_logit_rows)
            return cu_fail(be, D2_EINVAL, "sample", "row outside the last step's logits");
        be->samp_h[i] = (kern_sample_param){.u = d[i].u, .inv_temp = d[i].inv_temp,
                                            .top_p = d[i].top_p, .min_p = d[i].min_p,
                                            .top_k = d[i].top_k, .row = rows[i]};
    }
    if (n == 0) return D2_OK;
    CU(cudaMemcpyAsync(be->samp_d, be->samp_h, (size_t)n * sizeof(kern_sample_param),
                       cudaMemcpyHostToDevice, be->st));
    KC(kern_sample(be->stok_d, be->logits, be->vocab, be->vocab, be->samp_d, n, be->samp_ws, be->st));
    CU(cudaMemcpyAsync(be->stok_h, be->stok_d, (size_t)n * 4, cudaMemcpyDeviceToHost, be->st));
    STREAM_SYNC(); /* also: samp_h may be reused by the next call */
    memcpy(out, be->stok_h, (size_t)n * 4);
    return D2_OK;
}

/* ---- KV compression (engine/backend.h steps 1-6) -------------------------------------- */

static int upload_table(cuda_be *be, const kvp_table *tab) {
    STREAM_SYNC(); /* tab_h may still feed an earlier copy */
    memcpy(be->tab_h, tab->pages, (size_t)tab->n_pages * sizeof(int32_t));
    CU(cudaMemcpyAsync(be->tab_d, be->tab_h, (size_t)tab->n_pages * 4, cudaMemcpyHostToDevice, be->st));
    return D2_OK;
}

static int cu_kv_compress(eng_backend *base, const eng_kv_compress_req *rq, eng_kv_compress_res *res) {
    cuda_be *be = (cuda_be *)base;
    kvp_pool *pool = base->pool;
    memset(res, 0, sizeof *res);
    DEAD_CHECK();
    if (!pool) return cu_fail(be, D2_EINVAL, "kv_compress", "no KV payload (kv_attach)");
    if (rq->heavy < 0 || rq->recent < 0) return D2_OK;
    if (rq->merge && !rq->threshold)
        return cu_fail(be, D2_EINVAL, "kv_compress", "merge without a threshold policy");
    if (rq->per_head) /* caps.kv_per_head is false: the runtime refuses such requests first */
        return cu_fail(be, D2_EUNSUPPORTED, "kv_compress", "per-head granularity is not implemented");
    kvp_table tab = kvp_get_table(pool, rq->seq, rq->layer);
    int n = tab.n_tokens;
    if (n <= rq->heavy + rq->recent) return D2_OK;
    if (n > be->max_seq) return cu_fail(be, D2_EINVAL, "kv_compress", "table longer than max_seq_tokens");
    kern_d2o_plan p;
    KC(kern_d2o_plan_make(&p, n, rq->n_sink, rq->heavy, rq->recent));
    int n_ev = p.n_evicted;
    if (n_ev == 0) return D2_OK;
    kern_d2o_pages pages = {.k = be->kv_k, .v = be->kv_v, .pos = be->kv_pos, .score = be->kv_score,
                            .page_tokens = be->pt, .n_kv_heads = be->n_kv, .head_dim = be->hd};
    int rc = upload_table(be, &tab);
    if (rc) return rc;
    KC(kern_d2o_scores(&be->d2o, pages, be->tab_d, &p, be->st));
    if (rq->pooled) KC(kern_d2o_pool_scores(&be->d2o, &p, be->st));
    KC(kern_d2o_select(&be->d2o, &p, be->st));
    if (rq->merge) {
        KC(kern_d2o_match(&be->d2o, pages, be->tab_d, &p, be->st));
        KC(kern_d2o_tau(&be->d2o, &p, be->tau_d, 1, 0.0f, be->st));
        CU(cudaMemcpyAsync(be->ev_h, be->d2o.ev, (size_t)n_ev * 4, cudaMemcpyDeviceToHost, be->st));
        CU(cudaMemcpyAsync(be->tgt_h, be->d2o.tgt, (size_t)n_ev * 4, cudaMemcpyDeviceToHost, be->st));
        CU(cudaMemcpyAsync(be->sim_h, be->d2o.sim, (size_t)n_ev * 4, cudaMemcpyDeviceToHost, be->st));
        CU(cudaMemcpyAsync(be->stat_h, be->d2o.stat, 2 * 4, cudaMemcpyDeviceToHost, be->st));
    }
    CU(cudaMemcpyAsync(be->keep_h, be->d2o.keep, (size_t)n, cudaMemcpyDeviceToHost, be->st));
    STREAM_SYNC();
    float tau = 0.0f;
    int n_pass = 0;
    if (rq->merge) {
        tau = rq->threshold(rq->user, be->stat_h[0]);
        for (int j = 0; j < n_ev; j++) n_pass += be->tgt_h[j] >= 0 && be->sim_h[j] >= tau;
    }
    /* 4: pages the merges and the compaction write become private */
    int kept = n - n_ev, first_gap = 0, pt = be->pt;
    while (first_gap < n && be->keep_h[first_gap]) first_gap++;
    for (int q = first_gap / pt; kept > first_gap && q <= (kept - 1) / pt; q++) {
        rc = kvp_unshare(pool, rq->seq, rq->layer, q * pt);
        if (rc) return rc;
    }
    for (int j = 0; j < n_ev && n_pass > 0; j++) {
        if (!(be->tgt_h[j] >= 0 && be->sim_h[j] >= tau)) continue;
        rc = kvp_unshare(pool, rq->seq, rq->layer, be->tgt_h[j]);
        if (rc) return rc;
    }
    DEAD_CHECK(); /* the hook may have failed */
    tab = kvp_get_table(pool, rq->seq, rq->layer);
    if (n_pass > 0) {
        rc = upload_table(be, &tab);
        if (rc) return rc;
        *be->tau_h = tau;
        CU(cudaMemcpyAsync(be->tau_d, be->tau_h, 4, cudaMemcpyHostToDevice, be->st));
        KC(kern_d2o_merge(&be->d2o, pages, be->tab_d, &p, be->tau_d,
                          rq->merge_code_rule ? KERN_D2O_MERGE_CODE : KERN_D2O_MERGE_NORMALISED,
                          be->st));
    }
    int before = tab.n_pages;
    rc = kvp_compact(pool, rq->seq, rq->layer, be->keep_h);
    if (rc < 0) {
        D2_ERROR("cuda_backend: compaction of seq %d layer %d failed after its pages were made "
                 "private: %s", rq->seq, rq->layer, d2_strerror(rc));
        return cu_fail(be, rc, "kv_compress", "kvp_compact");
    }
    DEAD_CHECK();
    int after = kvp_pages_for_tokens(pool, rc);
    res->n_evicted = n_ev;
    res->n_merged = n_pass;
    res->pages_freed = before > after ? before - after : 0;
    res->tau = tau;
    return D2_OK;
}

/* ---- KV compression of several tables, one host synchronisation -------------------- */

/* Phase 0 of cu_kv_compress_layers: the plans, and every page a merge may
 * write made private. Returns the number of active requests (act[i] = 1). */
static int batch_prepare(cuda_be *be, const eng_kv_compress_req *rq, int n, uint8_t *act) {
    kvp_pool *pool = be->base.pool;
    int n_act = 0;
    for (int i = 0; i < n; i++) {
        act[i] = 0;
        if (rq[i].heavy < 0 || rq[i].recent < 0) continue;
        if (rq[i].per_head) /* caps.kv_per_head is false: the runtime refuses it first */
            return cu_fail(be, D2_EUNSUPPORTED, "kv_compress_layers", "per-head granularity is not implemented");
        kvp_table tab = kvp_get_table(pool, rq[i].seq, rq[i].layer);
        int nt = tab.n_tokens;
        if (nt <= rq[i].heavy + rq[i].recent) continue;
        if (nt > be->max_seq)
            return cu_fail(be, D2_EINVAL, "kv_compress_layers", "table longer than max_seq_tokens");
        KC(kern_d2o_plan_make(&be->cplan[i], nt, rq[i].n_sink, rq[i].heavy, rq[i].recent));
        if (be->cplan[i].n_evicted == 0) continue;
        /* the merge writes targets in place: no target may be on a shared page */
        if (rq[i].merge && kvp_shared_pages(pool, rq[i].seq, rq[i].layer) > 0) {
            int rc = kvp_unshare_all(pool, rq[i].seq, rq[i].layer);
            if (rc) return rc;
            DEAD_CHECK();
        }
        act[i] = 1;
        n_act++;
    }
    return n_act;
}

/* The staging of a batch: patches bringing the active tables' resident rows
 * up to date, and each merging request's tau_prev (float, at *o_tau + i). */
static int batch_upload(cuda_be *be, const eng_kv_compress_req *rq, int n, const uint8_t *act,
                        size_t *o_tau) {
    if (be->cst_pending) CU(cudaEventSynchronize(be->ev_cst));
    be->cst_pending = 0;
    size_t off = 0;
    be->n_patch = 0;
    for (int i = 0; i < n; i++) {
        if (!act[i]) continue;
        kvp_table tab = kvp_get_table(be->base.pool, rq[i].seq, rq[i].layer);
        int rc = rtab_patch(be, rq[i].seq, rq[i].layer, &tab, be->cst_h, be->cst_cap, &off);
        if (rc) return rc;
    }
    if (off + (size_t)n + (size_t)be->n_patch * 3 > be->cst_cap)
        return cu_fail(be, D2_EINVAL, "kv_compress_layers", "staging too small");
    *o_tau = off;
    for (int i = 0; i < n; i++) memcpy(be->cst_h + off + i, &rq[i].tau_prev, sizeof(float));
    off += (size_t)n;
    size_t o_hdr = off;
    memcpy(be->cst_h + o_hdr, be->patch_hdr, (size_t)be->n_patch * 3 * sizeof(int32_t));
    off += (size_t)be->n_patch * 3;
    CU(cudaMemcpyAsync(be->cst_d, be->cst_h, off * sizeof(int32_t), cudaMemcpyHostToDevice, be->st));
    CU(cudaEventRecord(be->ev_cst, be->st));
    be->cst_pending = 1;
    KC(kern_patch_i32(be->rtab_d, be->cst_d, be->cst_d + o_hdr, be->n_patch, be->st));
    return D2_OK;
}

/* Phase 1, on the stream for request i: scores, selection, and with merge
 * matching, the threshold (tau_ema on the device) and the merges; then its
 * keep flags, counts and statistics to pinned memory. */
static int batch_device(cuda_be *be, const eng_kv_compress_req *r, int i, float *tau_d) {
    const kern_d2o_plan *p = &be->cplan[i];
    kern_d2o_pages pages = {.k = be->kv_k, .v = be->kv_v, .pos = be->kv_pos, .score = be->kv_score,
                            .page_tokens = be->pt, .n_kv_heads = be->n_kv, .head_dim = be->hd};
    const int32_t *tab = be->rtab_d + rtab_row(be, r->seq, r->layer);
    KC(kern_d2o_scores(&be->d2o, pages, tab, p, be->st));
    if (r->pooled) KC(kern_d2o_pool_scores(&be->d2o, p, be->st));
    KC(kern_d2o_select(&be->d2o, p, be->st));
    if (r->merge) {
        KC(kern_d2o_match(&be->d2o, pages, tab, p, be->st));
        KC(kern_d2o_tau(&be->d2o, p, tau_d, r->tau_first ? 1 : 0, r->ema_beta, be->st));
        KC(kern_d2o_merge(&be->d2o, pages, tab, p, tau_d,
                          r->merge_code_rule ? KERN_D2O_MERGE_CODE : KERN_D2O_MERGE_NORMALISED,
                          be->st));
        CU(cudaMemcpyAsync(be->cstat_h + 2 * i, be->d2o.stat, 2 * 4, cudaMemcpyDeviceToHost, be->st));
    }
    CU(cudaMemcpyAsync(be->ccount_h + 4 * i, be->d2o.counts, 4 * 4, cudaMemcpyDeviceToHost, be->st));
    CU(cudaMemcpyAsync(be->ckeep_h + (size_t)i * (size_t)be->max_seq, be->d2o.keep, (size_t)p->n,
                       cudaMemcpyDeviceToHost, be->st));
    return D2_OK;
}

/* Up to n_layers requests: prepare (host), one upload, the device work of
 * every table, ONE host synchronisation, then the page bookkeeping
 * (kvp_compact; its payload moves are queued, not waited for). */
static int batch_run(cuda_be *be, const eng_kv_compress_req *rq, int n, eng_kv_compress_res *res) {
    uint8_t act[1024]; /* n <= 1024: cu_kv_compress_layers' chunks */
    int n_act = batch_prepare(be, rq, n, act);
    if (n_act <= 0) return n_act;
    size_t o_tau = 0;
    int rc = batch_upload(be, rq, n, act, &o_tau);
    if (rc) return rc;
    for (int i = 0; i < n; i++) {
        if (!act[i]) continue;
        rc = batch_device(be, &rq[i], i, (float *)(be->cst_d + o_tau + i));
        if (rc) return rc;
    }
    STREAM_SYNC();
    kvp_pool *pool = be->base.pool;
    for (int i = 0; i < n; i++) {
        if (!act[i]) continue;
        const uint8_t *keep = be->ckeep_h + (size_t)i * (size_t)be->max_seq;
        int before = kvp_get_table(pool, rq[i].seq, rq[i].layer).n_pages;
        int left = kvp_compact(pool, rq[i].seq, rq[i].layer, keep);
        if (left < 0) {
            if (rq[i].merge) /* its pages were private: only a broken pool gets here */
                return cu_fail(be, left, "kv_compress_layers", "kvp_compact after a merge");
            return left; /* D2_EKVFULL: this table untouched (nothing was written) */
        }
        DEAD_CHECK();
        int after = kvp_pages_for_tokens(pool, left);
        res[i].n_evicted = be->cplan[i].n_evicted;
        res[i].n_merged = rq[i].merge ? be->ccount_h[4 * i + 2] : 0;
        res[i].pages_freed = before > after ? before - after : 0;
        res[i].tau = rq[i].merge ? be->cstat_h[2 * i + 1] : 0.0f;
    }
    return D2_OK;
}

static int cu_kv_compress_layers(eng_backend *base, const eng_kv_compress_req *rq, int n,
                                 eng_kv_compress_res *res) {
    cuda_be *be = (cuda_be *)base;
    memset(res, 0, (size_t)(n > 0 ? n : 0) * sizeof *res);
    DEAD_CHECK();
    if (!base->pool) return cu_fail(be, D2_EINVAL, "kv_compress_layers", "no KV payload (kv_attach)");
    int ema = 1;
    for (int i = 0; i < n; i++) ema &= !rq[i].merge || rq[i].tau_ema;
    if (!ema) { /* the threshold only as a callback: one table at a time */
        for (int i = 0; i < n; i++) {
            int rc = cu_kv_compress(base, &rq[i], &res[i]);
            if (rc) return rc;
        }
        return D2_OK;
    }
    int chunk = be->n_layers < 1024 ? be->n_layers : 1024;
    for (int i0 = 0; i0 < n; i0 += chunk) {
        int m = n - i0 < chunk ? n - i0 : chunk;
        int rc = batch_run(be, rq + i0, m, res + i0);
        if (rc < 0) return rc;
    }
    return D2_OK;
}

/* ---- slot access (tests, inspection) ------------------------------------------------ */

static int cu_read_slot(eng_backend *base, int seq, int layer, int i, float *k, float *v, float *score) {
    cuda_be *be = (cuda_be *)base;
    DEAD_CHECK();
    int64_t s = kvp_slot_index(be->base.pool, seq, layer, i);
    if (s < 0) return cu_fail(be, D2_EINVAL, "read_slot", "no such live slot");
    size_t kvd = (size_t)be->kvd;
    uint16_t *tmp = malloc(kvd * 2 * 2);
    if (!tmp) return cu_fail(be, D2_ENOMEM, "read_slot", "scratch");
    STREAM_SYNC();
    cudaError_t e = cudaMemcpy(tmp, be->kv_k + (size_t)s * kvd, kvd * 2, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess)
        e = cudaMemcpy(tmp + kvd, be->kv_v + (size_t)s * kvd, kvd * 2, cudaMemcpyDeviceToHost);
    if (e == cudaSuccess && score)
        e = cudaMemcpy(score, be->kv_score + (size_t)s * (size_t)be->n_kv, (size_t)be->n_kv * 4,
                       cudaMemcpyDeviceToHost);
    if (e == cudaSuccess)
        for (size_t j = 0; j < kvd; j++) {
            if (k) k[j] = bf2f(tmp[j]);
            if (v) v[j] = bf2f(tmp[kvd + j]);
        }
    free(tmp);
    if (e != cudaSuccess) return cu_fail_rt(be, e, "cudaMemcpy (read_slot)", __LINE__);
    return D2_OK;
}

static int cu_write_slot(eng_backend *base, int seq, int layer, int i, const float *k,
                         const float *v, const float *score) {
    cuda_be *be = (cuda_be *)base;
    DEAD_CHECK();
    int64_t s = kvp_slot_index(be->base.pool, seq, layer, i);
    if (s < 0) return cu_fail(be, D2_EINVAL, "write_slot", "no such live slot");
    size_t kvd = (size_t)be->kvd;
    uint16_t *tmp = malloc(kvd * 2 * 2);
    if (!tmp) return cu_fail(be, D2_ENOMEM, "write_slot", "scratch");
    for (size_t j = 0; j < kvd; j++) {
        tmp[j] = k ? f2bf(k[j]) : 0;
        tmp[kvd + j] = v ? f2bf(v[j]) : 0;
    }
    int32_t pos = kvp_pos_base(be->base.pool)[s];
    STREAM_SYNC();
    cudaError_t e = cudaSuccess;
    if (k) e = cudaMemcpy(be->kv_k + (size_t)s * kvd, tmp, kvd * 2, cudaMemcpyHostToDevice);
    if (e == cudaSuccess && v)
        e = cudaMemcpy(be->kv_v + (size_t)s * kvd, tmp + kvd, kvd * 2, cudaMemcpyHostToDevice);
    if (e == cudaSuccess && score)
        e = cudaMemcpy(be->kv_score + (size_t)s * (size_t)be->n_kv, score, (size_t)be->n_kv * 4,
                       cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMemcpy(be->kv_pos + s, &pos, 4, cudaMemcpyHostToDevice);
    free(tmp);
    if (e != cudaSuccess) return cu_fail_rt(be, e, "cudaMemcpy (write_slot)", __LINE__);
    return D2_OK;
}

#endif /* D2_HAVE_CUDA */
