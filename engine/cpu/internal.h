/*
 * engine/cpu/internal.h — state of the CPU backend shared by its files
 * (backend.c: forward step, payload, logits; kvcomp.c: KV compression).
 * Nothing outside engine/cpu/ includes this. Engine thread only.
 */
#ifndef D2_ENGINE_CPU_INTERNAL_H
#define D2_ENGINE_CPU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/backend.h"
#include "engine/cpu/threadpool.h"
#include "engine/kvsel.h"

typedef struct att_task {
    int si;       /* index into b->seqs */
    int t0, t1;   /* batch rows */
    int g;        /* kv head */
    int split;    /* >= 0: a row chunk of be->splits[split], whose scores go to partials */
    int chunk;    /* with split: the chunk's index (its partials) */
} att_task;

/* A score-accumulating sequence whose rows are split into chunks (see
 * backend.c, "Parallelism"): chunk c's column sums and slot scores go to
 * partials [n_chunks][n_kv][gs + 1][width] at att_part + off, which the
 * round's reduction tasks add to the real ones in chunk order. */
typedef struct att_split {
    int si;        /* index into b->seqs */
    int n_chunks;
    int width;     /* the sequence's longest table this step */
    int n_red;     /* reduction tasks (column ranges) */
    size_t off;    /* floats into att_part */
} att_split;

/* The attention of a step runs in rounds: each round's tasks, then its
 * splits' reductions. Round 0 also holds every unsplit task. */
typedef struct att_round {
    int t0, t1;    /* tasks */
    int s0, s1;    /* splits */
    int n_red;     /* reduction tasks of its splits together */
} att_round;

typedef struct mm_job {
    const eng_tensor *w;
    const float *x;
    int64_t ldx;
    float *y;
    int64_t ldy;
    int n_tok;
    int64_t chunk;  /* rows per task */
    int n_chunks;
} mm_job;

/* KV-compression scratch, sized once at kv_attach from max_seq_tokens (and
 * the thread count). */
typedef struct cpu_kv_ws {
    int cap;
    float *score, *pooled, *sim, *kn; /* kn: [cap][kvd] per-head-normalised keys */
    uint8_t *keep, *pass;
    eng_kv_cand *cand;
    int32_t *kept, *ev, *tgt, *order, *start; /* kept / evicted token indices, in order */
    int n_kept;
    float *acc_k, *acc_v; /* [n_threads][kvd] merge accumulators */
    /* per-head mode, [n_kv][cap] each: keep mask, similarity and target of
     * every evicted slot, and which slots pass */
    uint8_t *hkeep, *hpass;
    float *hsim;
    int32_t *htgt, *hkept, *horder; /* hkept: each head's kept slots, in order */
    int32_t *hstart;                /* [n_kv][cap + 1]: each head's merge groups */
    int *hn_kept;                   /* [n_kv] */
} cpu_kv_ws;

typedef struct cpu_be {
    eng_backend base;
    eng_tp *tp;
    int n_threads, max_t, max_rows, max_seq;
    int dim, q_dim, kv_dim, hd, n_heads, n_kv, gs, ffn, vocab, n_layers, pt;
    int sliding_window; /* > 0: a query sees keys with pos > its pos - sliding_window (Mistral) */
    float eps;
    /* the KV payload (kv_attach): k, v [n_pages][pt][n_kv][hd], score [n_pages][pt][n_kv],
     * hpos [n_pages][pt][n_kv]: the position each KV head holds in a slot — the pool's
     * position of the slot until a per-head compression gives heads different tokens;
     * the attention masks by it */
    float *kv_k, *kv_v, *kv_score;
    int32_t *kv_hpos;
    size_t slot_floats;  /* n_kv * hd */
    size_t page_stride;  /* floats per page in kv_k (and kv_v) */
    cpu_kv_ws kvws;
    /* activations, [max_t][width] */
    float *x, *xb, *q, *k, *v, *ao, *tmp, *hb, *hb2;
    float *xf;           /* [max_rows][dim] normed rows for the logits */
    float *logits;       /* [max_rows][vocab] the last step's logits */
    int n_logit_rows;    /* rows the last step produced */
    int32_t *out_rows;   /* [max_rows] batch rows that produce logits */
    float *cosv, *sinv;  /* [max_t][hd/2] */
    float *inv_freq;     /* [hd/2] */
    float *norm_f32;     /* per layer: attn_norm[dim], ffn_norm[dim]; then out_norm[dim] */
    float *bias_f32;     /* per layer: bq[q_dim], bk[kv_dim], bv[kv_dim] (0 when absent) */
    float *mm_scratch;   /* [n_threads][mm_stride] */
    size_t mm_stride;
    float *att_scratch;  /* [n_threads][att_stride] */
    size_t att_stride;
    att_task *tasks;     /* [max_t * n_kv] */
    att_split *splits;   /* [max_t] */
    att_round *rounds;   /* [max_t + 1] */
    int n_rounds;
    float *att_part;     /* [ATT_SPLIT_MAX * (n_heads + n_kv) * max_seq] score partials */
    size_t att_part_cap; /* floats */
    const att_round *round; /* the round running (task indices are relative to it) */
    kvp_table *tables;   /* [max_t] per batch sequence, current layer */
    /* per-step context for the parallel tasks */
    const eng_batch *b;
    int layer;
    mm_job jobs[3];
    int n_jobs;
    char err[160];       /* last_error */
} cpu_be;

/* Records the failing call for last_error and returns rc. */
int cpu_fail(cpu_be *be, int rc, const char *call, const char *why);

/* engine/cpu/kvcomp.c */
int cpu_kv_ws_init(cpu_be *be);
void cpu_kv_ws_free(cpu_be *be);
int cpu_kv_compress(eng_backend *base, const eng_kv_compress_req *req, eng_kv_compress_res *res);
int cpu_read_slot(eng_backend *base, int seq, int layer, int i, float *k, float *v, float *score);
int cpu_write_slot(eng_backend *base, int seq, int layer, int i, const float *k, const float *v,
                   const float *score);
int cpu_read_head_pos(eng_backend *base, int seq, int layer, int i, int32_t *pos);

#endif
