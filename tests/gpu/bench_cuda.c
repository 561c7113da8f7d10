/*
 * tests/gpu/bench_cuda.c — benchmarks of the CUDA backend (engine/cuda/) on a
 * generated Llama-3-8B-shaped model, for tests/gpu/device_run.sh: writes one
 * JSON object to stdout. Not a test (nothing asserted); run on a GPU.
 *
 *   bench_cuda [--layers N] [--tiny]
 *
 * The model is synthetic: every weight tensor of the 8B shape (dim 4096, 32
 * heads / 8 KV heads of 128, ffn 14336, vocab 128256, rope theta 5e5 with
 * llama3 scaling) views one buffer of small random bf16 values (the backend
 * converts and uploads each layer on its own, so device memory and traffic
 * are those of the real model); --layers runs fewer layers (figures that
 * scale with layers are then extrapolated to 32 and labelled so). --tiny is
 * a small shape for the emulator's dry run (the figures mean nothing there).
 *
 * Timing: CUDA events recorded on the backend's own stream
 * (eng_cuda_backend_stream) around the work (step_ms, prefill_s, compress_s:
 * the device's time from the first enqueued operation to the last, which
 * includes any wait for the host to enqueue); the host wall clock only where
 * the host part is what is measured (create_s: conversion and upload of the
 * weights; step_host_ms: a step's planning, launches and the wait for it).
 * On the emulator the events give the emulated work's CPU time. KV for the
 * decode measurements is appended without computing it (the values do not
 * change the work).
 *
 * CUDA graphs ("decode_graphs"): decode steps at batch 1/32/256 (context 1k)
 * timed with graphs off and on (eng_cuda_backend_set_graphs on the same
 * backend), best and mean of the measured steps, their ratio (off / on:
 * above 1 means graphs pay), and the host time of capturing the graphs the
 * measurement needed. A bucket's first step runs directly and its second
 * captures, so both are left out of the "on" figures.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime_api.h>

#include "engine/backend.h"
#include "engine/model/model.h"
#include "kvpool/kvpool.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct shape {
    int layers, dim, heads, kv, hd, ffn, vocab;
} shape;

static eng_tensor mk(const void *data, int64_t rows, int64_t cols) {
    return (eng_tensor){.data = data, .dtype = ENG_BF16, .rows = rows, .cols = cols, .name = "synthetic"};
}

static eng_model *make_model(const shape *s, void **bufs) {
    size_t big = (size_t)s->vocab * s->dim;
    size_t e2 = (size_t)s->ffn * s->dim;
    if (e2 > big) big = e2;
    uint16_t *w = malloc(big * 2), *ones = malloc((size_t)s->dim * 2);
    eng_model *m = calloc(1, sizeof *m);
    eng_layer_weights *L = calloc((size_t)s->layers, sizeof *L);
    if (!w || !ones || !m || !L) return NULL;
    uint32_t r = 1;
    for (size_t i = 0; i < big; i++) {
        r = r * 1664525u + 1013904223u;
        float f = ((float)(r >> 9) / 8388608.0f - 0.5f) * 0.04f;
        uint32_t u;
        memcpy(&u, &f, 4);
        w[i] = (uint16_t)(u >> 16);
    }
    for (int i = 0; i < s->dim; i++) ones[i] = 0x3f80;
    m->cfg = (eng_model_config){.arch = ENG_ARCH_LLAMA, .n_layers = s->layers, .dim = s->dim,
                                .n_heads = s->heads, .n_kv_heads = s->kv, .head_dim = s->hd,
                                .ffn_dim = s->ffn, .vocab_size = s->vocab, .max_ctx = 131072,
                                .rope_theta = 500000.0f, .rms_eps = 1e-5f, .rope_neox = true,
                                .rope_scaling = {.type = 1, .factor = 8, .low_freq_factor = 1,
                                                 .high_freq_factor = 4, .original_max_pos = 8192},
                                .bos_id = -1};
    m->tok_embd = mk(w, s->vocab, s->dim);
    m->output = mk(w, s->vocab, s->dim);
    m->out_norm = mk(ones, 1, s->dim);
    int qd = s->heads * s->hd, kvd = s->kv * s->hd;
    for (int l = 0; l < s->layers; l++) {
        L[l].attn_norm = mk(ones, 1, s->dim);
        L[l].ffn_norm = mk(ones, 1, s->dim);
        L[l].wq = mk(w, qd, s->dim);
        L[l].wk = mk(w, kvd, s->dim);
        L[l].wv = mk(w, kvd, s->dim);
        L[l].wo = mk(w, s->dim, qd);
        L[l].w_gate = mk(w, s->ffn, s->dim);
        L[l].w_up = mk(w, s->ffn, s->dim);
        L[l].w_down = mk(w, s->dim, s->ffn);
    }
    m->layers = L;
    bufs[0] = w;
    bufs[1] = ones;
    return m;
}

static int fill_seq(kvp_pool *pool, int layers, int n, int *seq) {
    if (kvp_seq_new(pool, seq)) return -1;
    if (kvp_reserve_all_layers(pool, *seq, n)) return -1;
    int pt = kvp_get_config(pool)->page_tokens;
    int32_t *pos = kvp_pos_base(pool);
    for (int l = 0; l < layers; l++) {
        int first = kvp_append(pool, *seq, l, n);
        if (first < 0) return -1;
        kvp_table t = kvp_get_table(pool, *seq, l);
        for (int i = 0; i < n; i++) pos[(size_t)t.pages[i / pt] * pt + i % pt] = i;
    }
    return 0;
}

/* Device time of the work enqueued between gt_start and gt_stop on the
 * backend's stream (CUDA events). */
typedef struct gtimer {
    cudaEvent_t a, b;
    cudaStream_t st;
} gtimer;
static gtimer g_t;

static int gt_init(eng_backend *be) {
    g_t.st = (cudaStream_t)eng_cuda_backend_stream(be);
    return g_t.st && cudaEventCreateWithFlags(&g_t.a, 0) == cudaSuccess &&
                       cudaEventCreateWithFlags(&g_t.b, 0) == cudaSuccess
               ? 0 : -1;
}
static int gt_start(void) { return cudaEventRecord(g_t.a, g_t.st) == cudaSuccess ? 0 : -1; }
static int gt_stop(double *sec) {
    float ms = 0;
    if (cudaEventRecord(g_t.b, g_t.st) != cudaSuccess || cudaEventSynchronize(g_t.b) != cudaSuccess ||
        cudaEventElapsedTime(&ms, g_t.a, g_t.b) != cudaSuccess)
        return -1;
    *sec = ms * 1e-3;
    return 0;
}

/* One step: *sec its device time (events), *host_sec the host's wall clock
 * from the call to the end of the work. */
static int step_timed(eng_backend *be, kvp_pool *pool, int layers, eng_batch *b, double *sec,
                      double *host_sec) {
    for (int k = 0; k < b->n_seqs; k++)
        if (kvp_reserve_all_layers(pool, b->seqs[k].seq, b->seqs[k].n)) return -1;
    int pt = kvp_get_config(pool)->page_tokens;
    int32_t *pos = kvp_pos_base(pool);
    for (int k = 0; k < b->n_seqs; k++) {
        const eng_batch_seq *bs = &b->seqs[k];
        for (int l = 0; l < layers; l++) {
            int first = kvp_append(pool, bs->seq, l, bs->n);
            if (first < 0) return -1;
            kvp_table t = kvp_get_table(pool, bs->seq, l);
            for (int j = 0; j < bs->n; j++)
                pos[(size_t)t.pages[(first + j) / pt] * pt + (first + j) % pt] = b->pos[bs->start + j];
        }
    }
    if (be->ops->sync(be)) return -1;
    double t0 = now_s();
    if (gt_start() || be->ops->step(be, b) || gt_stop(sec) || be->ops->sync(be)) return -1;
    *host_sec = now_s() - t0;
    return 0;
}

/* Decode steps of B sequences at context ctx: warm steps (not measured),
 * then reps measured; best and mean device time (events) and best host
 * time, in ms. The sequences are freed by the caller. */
typedef struct dstat {
    double best, mean, host;
} dstat;
static int decode_reps(eng_backend *be, kvp_pool *pool, int layers, const int *ids, int B, int *pos0,
                       int warm, int reps, int32_t *toks, int32_t *pos, eng_batch_seq *seqs, dstat *out) {
    out->best = out->host = 1e30;
    out->mean = 0;
    for (int rep = 0; rep < warm + reps; rep++) {
        for (int k = 0; k < B; k++) {
            toks[k] = 1 + k;
            pos[k] = *pos0;
            seqs[k] = (eng_batch_seq){.seq = ids[k], .start = k, .n = 1, .want_logits = true};
        }
        (*pos0)++;
        eng_batch b = {.n_tokens = B, .tokens = toks, .pos = pos, .n_seqs = B, .seqs = seqs};
        double sec, host;
        if (step_timed(be, pool, layers, &b, &sec, &host)) return -1;
        if (rep < warm) continue;
        if (sec < out->best) out->best = sec;
        if (host < out->host) out->host = host;
        out->mean += sec / reps;
    }
    out->best *= 1e3;
    out->mean *= 1e3;
    out->host *= 1e3;
    return 0;
}

/* The "decode_graphs" JSON member: graphs off, then on, per batch. */
static void bench_graphs(eng_backend *be, kvp_pool *pool, int layers, int tiny, int32_t *toks,
                         int32_t *pos, eng_batch_seq *seqs) {
    int batches[3] = {1, 32, 256}, ctx = tiny ? 16 : 1024, reps = tiny ? 2 : 8;
    if (tiny) { batches[1] = 2; batches[2] = 3; }
    printf(", \"decode_graphs\": [");
    for (int bi = 0; bi < 3; bi++) {
        int B = batches[bi];
        printf("%s{\"batch\": %d, \"ctx\": %d", bi ? ", " : "", B, ctx);
        int64_t need = (int64_t)B * layers * ((ctx + 64) / 16 + 2);
        if (need > kvp_get_stats(pool).pages_free) {
            printf(", \"skipped\": \"does not fit the pool\"}");
            continue;
        }
        int ids[256], ok = 1, p0 = ctx - 4 - 2 * (reps + 2);
        for (int k = 0; k < B && ok; k++) ok = fill_seq(pool, layers, p0, &ids[k]) == 0;
        dstat off = {0}, on = {0};
        eng_cuda_graph_stats g0 = eng_cuda_backend_graph_stats(be);
        eng_cuda_backend_set_graphs(be, 0);
        if (ok) ok = decode_reps(be, pool, layers, ids, B, &p0, 1, reps, toks, pos, seqs, &off) == 0;
        eng_cuda_backend_set_graphs(be, 1);
        /* warm-up (direct) and capture steps, then the replays measured */
        if (ok) ok = decode_reps(be, pool, layers, ids, B, &p0, 2, reps, toks, pos, seqs, &on) == 0;
        eng_cuda_backend_set_graphs(be, 0);
        eng_cuda_graph_stats g1 = eng_cuda_backend_graph_stats(be);
        if (!ok) printf(", \"error\": \"%s\"}", be->ops->last_error(be));
        else
            printf(", \"step_ms_off\": %.3f, \"step_ms_on\": %.3f, \"mean_ms_off\": %.3f,"
                   " \"mean_ms_on\": %.3f, \"host_ms_off\": %.3f, \"host_ms_on\": %.3f,"
                   " \"speedup\": %.3f, \"replays\": %lld, \"captures\": %lld, \"capture_s\": %.4f}",
                   off.best, on.best, off.mean, on.mean, off.host, on.host, off.best / on.best,
                   (long long)(g1.replays - g0.replays), (long long)(g1.captures - g0.captures),
                   g1.capture_s - g0.capture_s);
        for (int k = 0; k < B; k++) kvp_seq_free(pool, ids[k]);
    }
    printf("]");
}

int main(int argc, char **argv) {
    shape s = {32, 4096, 32, 8, 128, 14336, 128256};
    int tiny = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--layers") && i + 1 < argc) s.layers = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tiny")) tiny = 1;
    }
    if (tiny) s = (shape){2, 64, 4, 2, 16, 128, 256};
    int full_layers = tiny ? s.layers : 32;
    void *bufs[2];
    eng_model *m = make_model(&s, bufs);
    if (!m) return 1;
    int max_t = tiny ? 64 : 8192, max_seq = tiny ? 256 : 32768 + 64;
    eng_backend_config bc = {.max_batch_tokens = max_t, .max_logit_rows = 256,
                             .max_seq_tokens = max_seq, .page_tokens = 16};
    eng_backend *be;
    double t0 = now_s();
    if (eng_cuda_backend_create(m, &bc, &be)) return 1;
    double t_create = now_s() - t0;
    eng_backend_caps caps;
    be->ops->caps(be, &caps);
    int64_t slot_bytes = (int64_t)caps.kv_bytes_per_slot;
    int64_t n_pages = caps.kv_bytes_avail / (slot_bytes * 16);
    if (tiny && n_pages > 4096) n_pages = 4096;
    kvp_config pc = {.n_layers = s.layers, .n_kv_heads = s.kv, .head_dim = s.hd, .page_tokens = 16,
                     .n_pages = n_pages, .max_seqs = 256, .max_seq_tokens = max_seq};
    kvp_pool *pool;
    if (kvp_create(&pc, &pool) || be->ops->attach_thread(be) || be->ops->kv_attach(be, pool) ||
        gt_init(be)) {
        fprintf(stderr, "bench: pool of %lld pages: %s\n", (long long)n_pages, be->ops->last_error(be));
        return 1;
    }
    double scale_l = (double)full_layers / s.layers;
    printf("{\"model\": \"llama-3-8b-shaped synthetic bf16\", \"layers_run\": %d, \"layers_full\": %d,"
           " \"extrapolated\": %s, \"create_s\": %.3f, \"kv_pool_pages\": %lld,"
           " \"kv_bytes_per_slot\": %lld",
           s.layers, full_layers, s.layers != full_layers ? "true" : "false", t_create,
           (long long)n_pages, (long long)slot_bytes);
    int32_t *toks = calloc((size_t)max_t, 4), *pos = calloc((size_t)max_t, 4);
    eng_batch_seq *seqs = calloc(256, sizeof *seqs);
    /* decode: batch x context */
    int batches[3] = {1, 32, 256}, ctxs[3] = {1024, 4096, 16384};
    if (tiny) { ctxs[0] = 16; ctxs[1] = 24; ctxs[2] = 32; batches[1] = 2; batches[2] = 3; }
    int reps = tiny ? 2 : 4;
    printf(", \"decode\": [");
    int first = 1;
    for (int ci = 0; ci < 3; ci++)
        for (int bi = 0; bi < 3; bi++) {
            int B = batches[bi], ctx = ctxs[ci];
            int64_t need = (int64_t)B * s.layers * ((ctx + 16) / 16 + 1);
            printf("%s{\"batch\": %d, \"ctx\": %d", first ? "" : ", ", B, ctx);
            first = 0;
            if (need > kvp_get_stats(pool).pages_free) {
                printf(", \"skipped\": \"does not fit the pool\"}");
                continue;
            }
            int ids[256];
            int ok = 1;
            for (int k = 0; k < B && ok; k++) ok = fill_seq(pool, s.layers, ctx - 4, &ids[k]) == 0;
            double best = 1e30, best_host = 1e30;
            for (int rep = 0; rep < reps && ok; rep++) {
                for (int k = 0; k < B; k++) {
                    toks[k] = 1 + k;
                    pos[k] = ctx - 4 + rep;
                    seqs[k] = (eng_batch_seq){.seq = ids[k], .start = k, .n = 1, .want_logits = true};
                }
                eng_batch b = {.n_tokens = B, .tokens = toks, .pos = pos, .n_seqs = B, .seqs = seqs};
                double sec, host;
                ok = step_timed(be, pool, s.layers, &b, &sec, &host) == 0;
                if (ok && rep > 0 && sec < best) best = sec;
                if (ok && rep > 0 && host < best_host) best_host = host;
            }
            if (!ok) printf(", \"error\": \"%s\"}", be->ops->last_error(be));
            else {
                double kv_bytes = (double)B * ctx * s.layers * (double)(s.kv * s.hd * 4);
                printf(", \"step_ms\": %.3f, \"step_host_ms\": %.3f, \"step_ms_full_layers\": %.3f,"
                       " \"tokens_per_s\": %.1f, \"kv_read_GBps\": %.1f}",
                       best * 1e3, best_host * 1e3, best * 1e3 * scale_l, B / (best * scale_l),
                       kv_bytes / best / 1e9);
            }
            for (int k = 0; k < B; k++) kvp_seq_free(pool, ids[k]);
        }
    printf("]");
    bench_graphs(be, pool, s.layers, tiny, toks, pos, seqs);
    /* prefill (one sequence, chunks of max_t) and D2O compression at budget 0.2 */
    int plens[2] = {2048, 8192}, clens[2] = {8192, 32768};
    if (tiny) { plens[0] = 24; plens[1] = 48; clens[0] = 24; clens[1] = 48; }
    printf(", \"prefill\": [");
    for (int pi = 0; pi < 4; pi++) {
        int n = pi < 2 ? plens[pi] : clens[pi - 2], comp = pi >= 2;
        int id;
        printf("%s{\"tokens\": %d, \"compress\": %s", pi ? ", " : "", n, comp ? "true" : "false");
        if ((int64_t)s.layers * (n / 16 + 2) > kvp_get_stats(pool).pages_free || kvp_seq_new(pool, &id)) {
            printf(", \"skipped\": \"does not fit the pool\"}");
            continue;
        }
        double tp = 0, sec, host;
        int ok = 1;
        for (int at = 0; at < n && ok; at += max_t) {
            int c = n - at < max_t ? n - at : max_t;
            for (int j = 0; j < c; j++) {
                toks[j] = 1 + (at + j) % (s.vocab - 1);
                pos[j] = at + j;
            }
            seqs[0] = (eng_batch_seq){.seq = id, .start = 0, .n = c, .want_logits = at + c == n,
                                      .want_scores = comp};
            eng_batch b = {.n_tokens = c, .tokens = toks, .pos = pos, .n_seqs = 1, .seqs = seqs};
            ok = step_timed(be, pool, s.layers, &b, &sec, &host) == 0;
            tp += sec;
        }
        double params = (double)s.layers * ((double)s.dim * (s.heads + 2 * s.kv) * s.hd +
                                            (double)s.heads * s.hd * s.dim + 3.0 * s.dim * s.ffn);
        double flops = 2.0 * params * n + 2.0 * s.layers * (double)n * n * s.heads * s.hd; /* causal QK + PV */
        if (!ok) {
            printf(", \"error\": \"%s\"}", be->ops->last_error(be));
            kvp_seq_free(pool, id);
            continue;
        }
        printf(", \"prefill_s\": %.4f, \"prefill_s_full_layers\": %.4f, \"TFLOPs\": %.1f", tp, tp * scale_l,
               flops / tp / 1e12);
        if (comp) {
            /* D2O (merging, the threshold on the device) of every layer in one
             * kv_compress_layers call, as the runtime does it */
            int keep = n / 5;
            eng_kv_compress_req rq[128];
            eng_kv_compress_res res[128];
            int nl = s.layers < 128 ? s.layers : 128;
            for (int l = 0; l < nl; l++)
                rq[l] = (eng_kv_compress_req){.seq = id, .layer = l, .heavy = keep / 2,
                                              .recent = keep - keep / 2, .n_sink = 4,
                                              .merge = true, .tau_ema = true, .tau_first = true,
                                              .ema_beta = 0.5f};
            double tc = 0, h0 = now_s();
            ok = gt_start() == 0 && be->ops->kv_compress_layers(be, rq, nl, res) == 0 &&
                 gt_stop(&tc) == 0;
            double hc = now_s() - h0;
            if (ok) printf(", \"compress_s\": %.4f, \"compress_host_s\": %.4f,"
                           " \"compress_share_of_prefill\": %.3f", tc, hc, tc / tp);
            else printf(", \"compress_error\": \"%s\"", be->ops->last_error(be));
        }
        printf("}");
        kvp_seq_free(pool, id);
    }
    printf("]");
    /* capacity: concurrent 8k sequences, full cache vs D2O at 0.2 */
    int64_t per_full = (int64_t)full_layers * (8192 / 16), per_d2o = (int64_t)full_layers * (8192 / 5 / 16 + 1);
    int64_t pages_full_layers = n_pages * s.layers / full_layers;
    printf(", \"capacity_8k\": {\"full\": %lld, \"d2o_0.2\": %lld, \"note\": \"pool pages / pages per "
           "sequence (32 layers); decode throughput at these concurrencies: the decode table above\"}}\n",
           (long long)(pages_full_layers / per_full), (long long)(pages_full_layers / per_d2o));
    cudaEventDestroy(g_t.a);
    cudaEventDestroy(g_t.b);
    be->ops->destroy(be);
    kvp_destroy(pool);
    free(m->layers);
    free(m);
    free(bufs[0]);
    free(bufs[1]);
    free(toks);
    free(pos);
    free(seqs);
    return 0;
}
