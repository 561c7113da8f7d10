/*
 * engine/cpu/backend.c — the CPU compute backend: one batched forward step
 * over an eng_batch plan, with the KV payload (f32 K/V and scores, host
 * memory) addressed through the pool's block tables (see engine/backend.h).
 * KV compression lives in engine/cpu/kvcomp.c; shared state in
 * engine/cpu/internal.h.
 *
 * Callers: the engine thread (every op). Internally a persistent thread
 * pool (threadpool.h) runs the parallel parts; step() itself never
 * allocates and never logs — every buffer is sized at create from
 * max_batch_tokens, max_logit_rows and max_seq_tokens, the payload at
 * kv_attach from the pool's pages.
 *
 * Per layer, for all T tokens of the step at once:
 *   RMSNorm -> Q/K/V GEMM (weights streamed once per step, reused across
 *   tokens; see cpu_matmul.c) -> bias -> RoPE (cos/sin per token computed once
 *   per step) -> K/V into the slots the runtime appended to each (seq, layer)
 *   table -> attention per (token, kv head) over the table's live slots with
 *   pos <= the token's pos -> O GEMM + residual -> RMSNorm -> gate/up GEMM ->
 *   SwiGLU -> down GEMM + residual.
 * Final RMSNorm and the output GEMM run only for the requested logit rows.
 *
 * Parallelism: GEMMs over chunks of output rows; attention over (token, kv
 * head) tasks, each handling all query heads of the GQA group so a K/V row
 * is loaded once per group. A sequence that accumulates scores (slot scores,
 * and D2O's column sums) with more than ATT_SPLIT_ROWS rows in the step is
 * split into (row chunk, kv head) tasks: the number of chunks depends only on
 * its row count (never on the thread count), each chunk adds into partials
 * of its own, and reduction tasks (column ranges, each column owned by one
 * task) add the partials to the real scores in chunk order — so the scores
 * are bit-identical whatever the number of threads. With few rows (decode) a
 * scoring sequence is one task per kv head that adds straight into the
 * scores. The partials' scratch holds one sequence of the longest table at
 * ATT_SPLIT_MAX chunks; when the split sequences of a step need more, they
 * run in rounds. Sequences sharing pages (kvp_seq_fork) must not both
 * accumulate scores in one step.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/status.h"
#include "common/util.h"
#include "engine/backend.h"
#include "engine/cpu/internal.h"
#include "engine/cpu/matmul.h"
#include "engine/cpu/threadpool.h"
#include "engine/model/rope.h"

/* Weight bytes a GEMM task should keep hot while it walks its token blocks. */
#define CHUNK_BYTES (192 * 1024)
/* Tokens per pass over a task's weight rows (x block stays in L2). */
#define TOKEN_BLOCK ENG_MM_MAX_TOK
/* Score-accumulating attention: rows per chunk at least, chunks at most, and
 * columns per reduction task. */
#define ATT_SPLIT_ROWS 32
#define ATT_SPLIT_MAX 8
#define ATT_RED_COLS 256

/* ---- GEMM dispatch ---------------------------------------------------------- */

static void mm_task(void *ctx, int task, int thread) {
    cpu_be *be = ctx;
    int j = 0;
    while (task >= be->jobs[j].n_chunks) task -= be->jobs[j++].n_chunks;
    const mm_job *mj = &be->jobs[j];
    int64_t r0 = (int64_t)task * mj->chunk;
    int64_t r1 = r0 + mj->chunk;
    if (r1 > mj->w->rows) r1 = mj->w->rows;
    float *scr = be->mm_scratch + (size_t)thread * be->mm_stride;
    for (int t0 = 0; t0 < mj->n_tok; t0 += TOKEN_BLOCK) {
        int nt = mj->n_tok - t0 < TOKEN_BLOCK ? mj->n_tok - t0 : TOKEN_BLOCK;
        eng_mm_rows(mj->w, mj->x + (int64_t)t0 * mj->ldx, mj->ldx, nt, mj->y + (int64_t)t0 * mj->ldy,
                    mj->ldy, r0, r1, scr);
    }
}

static void mm_add(cpu_be *be, const eng_tensor *w, const float *x, int64_t ldx, int n_tok,
                   float *y, int64_t ldy) {
    mm_job *j = &be->jobs[be->n_jobs++];
    j->w = w;
    j->x = x;
    j->ldx = ldx;
    j->y = y;
    j->ldy = ldy;
    j->n_tok = n_tok;
    /* Enough tasks to balance the threads, few enough rows per task that its
     * weights stay in cache across token blocks; multiples of 4 rows. */
    int64_t by_threads = (w->rows + (int64_t)be->n_threads * 4 - 1) / ((int64_t)be->n_threads * 4);
    int64_t by_cache = CHUNK_BYTES / (w->cols * 4);
    int64_t c = by_threads;
    if (n_tok > 4 && by_cache < c) c = by_cache;
    c = (c + 3) & ~(int64_t)3;
    if (c < 4) c = 4;
    j->chunk = c;
    j->n_chunks = (int)((w->rows + c - 1) / c);
}

static void mm_run(cpu_be *be) {
    int total = 0;
    for (int i = 0; i < be->n_jobs; i++) total += be->jobs[i].n_chunks;
    eng_tp_run(be->tp, mm_task, be, total);
    be->n_jobs = 0;
}

/* ---- element-wise helpers ------------------------------------------------------- */

static void rmsnorm_row(const float *x, const float *w, float *out, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

static void swiglu_task(void *ctx, int task, int thread) {
    cpu_be *be = ctx;
    float *g = be->hb + (size_t)task * (size_t)be->ffn;
    const float *u = be->hb2 + (size_t)task * (size_t)be->ffn;
    for (int i = 0; i < be->ffn; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* ---- attention ------------------------------------------------------------------ */

/* Where a split task's partials go: [gs][width] column sums, then [width]
 * slot scores, both by table index; zeroed over the table's n columns. */
static float *att_partials(cpu_be *be, const att_task *tk, int n) {
    const att_split *sp = &be->splits[tk->split];
    size_t w = (size_t)sp->width, rows = (size_t)be->gs + 1;
    float *part = be->att_part + sp->off + ((size_t)tk->chunk * (size_t)be->n_kv + (size_t)tk->g) * rows * w;
    for (size_t r = 0; r < rows; r++) memset(part + r * w, 0, (size_t)n * sizeof(float));
    return part;
}

static void att_task_run(void *ctx, int ti, int thread) {
    cpu_be *be = ctx;
    const att_task *tk = &be->tasks[be->round->t0 + ti];
    const eng_batch *b = be->b;
    const eng_batch_seq *sq = &b->seqs[tk->si];
    const kvp_table *tab = &be->tables[tk->si];
    const float *kb = be->kv_k, *vb = be->kv_v;
    const int32_t *hp = be->kv_hpos; /* [slot][n_kv]: the position each head holds */
    float *sc = sq->want_scores ? be->kv_score : NULL;
    size_t stride = be->page_stride;
    int pt = be->pt, hd = be->hd, gs = be->gs, g = tk->g, n = tab->n_tokens;
    int n_kv = be->n_kv;
    float scale = 1.0f / sqrtf((float)hd);
    float *cs = sq->want_scores ? sq->colsum : NULL; /* this group's heads of this layer */
    int cs_len = sq->colsum_len;
    if (cs)
        cs += ((size_t)be->layer * (size_t)be->n_heads + (size_t)g * (size_t)gs) * (size_t)cs_len;
    float *att = be->att_scratch + (size_t)thread * be->att_stride; /* [gs][n] */
    float *part = NULL; /* a split task adds into its partials instead */
    size_t pw = 0;
    if (tk->split >= 0) {
        part = att_partials(be, tk, n);
        pw = (size_t)be->splits[tk->split].width;
        sc = NULL;
        cs = NULL;
    }

    for (int t = tk->t0; t < tk->t1; t++) {
        int32_t p = b->pos[t];
        /* oldest visible position: everything under the sliding window */
        int32_t lo = be->sliding_window > 0 ? p - be->sliding_window + 1 : INT32_MIN;
        const float *q = be->q + (size_t)t * (size_t)be->q_dim + (size_t)g * (size_t)gs * (size_t)hd;
        float *o = be->ao + (size_t)t * (size_t)be->q_dim + (size_t)g * (size_t)gs * (size_t)hd;
        float mx[64];
        for (int h = 0; h < gs; h++) mx[h] = -INFINITY;
        /* pass 1: scores, page by page */
        for (int pi = 0; pi < tab->n_pages; pi++) {
            int32_t page = tab->pages[pi];
            int s_end = n - pi * pt < pt ? n - pi * pt : pt;
            const int32_t *pp = hp + (size_t)page * (size_t)pt * (size_t)n_kv + (size_t)g;
            const float *kp = kb + (size_t)page * stride + (size_t)g * (size_t)hd;
            for (int s = 0; s < s_end; s++) {
                int i = pi * pt + s;
                int32_t sp = pp[(size_t)s * (size_t)n_kv];
                if (sp < 0 || sp > p || sp < lo) {
                    for (int h = 0; h < gs; h++) att[(size_t)h * (size_t)n + (size_t)i] = -INFINITY;
                    continue;
                }
                const float *kr = kp + (size_t)s * (size_t)n_kv * (size_t)hd;
                for (int h = 0; h < gs; h++) {
                    float d = eng_dot_f32(q + (size_t)h * (size_t)hd, kr, hd) * scale;
                    att[(size_t)h * (size_t)n + (size_t)i] = d;
                    if (d > mx[h]) mx[h] = d;
                }
            }
        }
        /* pass 2: softmax per head */
        for (int h = 0; h < gs; h++) {
            float *a = att + (size_t)h * (size_t)n;
            float sum = 0.0f, m = mx[h];
            for (int i = 0; i < n; i++) {
                float e = a[i] == -INFINITY ? 0.0f : expf(a[i] - m);
                a[i] = e;
                sum += e;
            }
            float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
            for (int i = 0; i < n; i++) a[i] *= inv;
            memset(o + (size_t)h * (size_t)hd, 0, (size_t)hd * sizeof(float));
        }
        /* pass 3: weighted V sum (+ score accumulation) */
        bool scoring = p >= sq->score_from;
        for (int pi = 0; pi < tab->n_pages; pi++) {
            int32_t page = tab->pages[pi];
            int s_end = n - pi * pt < pt ? n - pi * pt : pt;
            const float *vp = vb + (size_t)page * stride + (size_t)g * (size_t)hd;
            float *scp = sc && scoring ? sc + (size_t)page * (size_t)pt * (size_t)n_kv + (size_t)g
                                       : NULL;
            const int32_t *pp = hp + (size_t)page * (size_t)pt * (size_t)n_kv + (size_t)g;
            for (int s = 0; s < s_end; s++) {
                int i = pi * pt + s;
                int32_t sp = pp[(size_t)s * (size_t)n_kv];
                const float *vr = vp + (size_t)s * (size_t)n_kv * (size_t)hd;
                float tot = 0.0f;
                for (int h = 0; h < gs; h++) {
                    float a = att[(size_t)h * (size_t)n + (size_t)i];
                    if (a != 0.0f) eng_axpy_f32(o + (size_t)h * (size_t)hd, a, vr, hd);
                    tot += a;
                }
                if (part && scoring) {
                    for (int h = 0; h < gs; h++)
                        part[(size_t)h * pw + (size_t)i] += att[(size_t)h * (size_t)n + (size_t)i];
                    part[(size_t)gs * pw + (size_t)i] += tot;
                }
                if (scp) scp[(size_t)s * (size_t)n_kv] += tot;
                if (cs && scoring && sp >= 0 && sp < cs_len)
                    for (int h = 0; h < gs; h++)
                        cs[(size_t)h * (size_t)cs_len + (size_t)sp] +=
                            att[(size_t)h * (size_t)n + (size_t)i];
            }
        }
    }
}

/* Reduction task: for the round's split sequences, columns [i0, i1) of the
 * table: slot scores and column sums += each chunk's partial, in chunk order. */
static void att_reduce_run(void *ctx, int ri, int thread) {
    cpu_be *be = ctx;
    const att_round *rd = be->round;
    int si = rd->s0;
    while (ri >= be->splits[si].n_red) ri -= be->splits[si++].n_red;
    const att_split *sp = &be->splits[si];
    const eng_batch_seq *sq = &be->b->seqs[sp->si];
    const kvp_table *tab = &be->tables[sp->si];
    const int32_t *hp = be->kv_hpos; /* [slot][n_kv]: the position each head holds */
    int pt = be->pt, gs = be->gs, n_kv = be->n_kv, n = tab->n_tokens;
    size_t w = (size_t)sp->width, blk = (size_t)n_kv * (size_t)(gs + 1) * w; /* one chunk */
    int i0 = ri * ATT_RED_COLS, i1 = i0 + ATT_RED_COLS < n ? i0 + ATT_RED_COLS : n;
    int cs_len = sq->colsum_len;
    float *cs = sq->colsum ? sq->colsum + (size_t)be->layer * (size_t)be->n_heads * (size_t)cs_len : NULL;
    const float *part = be->att_part + sp->off;
    for (int i = i0; i < i1; i++) {
        size_t slot = (size_t)tab->pages[i / pt] * (size_t)pt + (size_t)(i % pt);
        for (int g = 0; g < n_kv; g++) {
            const float *pg = part + (size_t)g * (size_t)(gs + 1) * w + (size_t)i;
            float *d = &be->kv_score[slot * (size_t)n_kv + (size_t)g];
            for (int c = 0; c < sp->n_chunks; c++) *d += pg[(size_t)c * blk + (size_t)gs * w];
            int32_t pos = hp[slot * (size_t)n_kv + (size_t)g];
            if (!cs || pos < 0 || pos >= cs_len) continue;
            for (int h = 0; h < gs; h++) {
                float *dc = &cs[(size_t)(g * gs + h) * (size_t)cs_len + (size_t)pos];
                for (int c = 0; c < sp->n_chunks; c++) *dc += pg[(size_t)c * blk + (size_t)h * w];
            }
        }
    }
}

/* Row chunks of a scoring sequence with `rows` rows this step: a function of
 * the row count only, so the sums do not depend on the thread count. */
static int att_n_chunks(int rows) {
    int c = (rows + ATT_SPLIT_ROWS - 1) / ATT_SPLIT_ROWS;
    return c > ATT_SPLIT_MAX ? ATT_SPLIT_MAX : c;
}

/* Appends sequence si's tasks: a split one's (chunk, kv head) tasks, the
 * longest chunks (the last rows see the most keys) first; an unsplit scoring
 * one's task per kv head; any other one's task per (token, kv head). */
static void att_add_tasks(cpu_be *be, int *n_tasks, int si, int split) {
    const eng_batch_seq *s = &be->b->seqs[si];
    if (split >= 0) {
        int nc = be->splits[split].n_chunks;
        for (int c = nc - 1; c >= 0; c--) {
            int t0 = s->start + (int)((int64_t)s->n * c / nc);
            int t1 = s->start + (int)((int64_t)s->n * (c + 1) / nc);
            for (int g = 0; g < be->n_kv; g++) be->tasks[(*n_tasks)++] = (att_task){si, t0, t1, g, split, c};
        }
        return;
    }
    for (int g = 0; g < be->n_kv; g++) {
        if (s->want_scores) {
            be->tasks[(*n_tasks)++] = (att_task){si, s->start, s->start + s->n, g, -1, 0};
        } else {
            for (int t = s->start; t < s->start + s->n; t++)
                be->tasks[(*n_tasks)++] = (att_task){si, t, t + 1, g, -1, 0};
        }
    }
}

/* The step's attention tasks, splits and rounds (the same for every layer):
 * split sequences packed into rounds while their partials fit the scratch;
 * round 0 also runs every unsplit sequence. */
static void att_plan(cpu_be *be, const eng_batch *b) {
    size_t per_col = (size_t)be->n_heads + (size_t)be->n_kv; /* partial floats per column and chunk */
    int n_splits = 0, n_rounds = 1;
    size_t used = 0;
    be->rounds[0] = (att_round){0, 0, 0, 0, 0};
    for (int si = 0; si < b->n_seqs; si++) {
        const eng_batch_seq *s = &b->seqs[si];
        int nc = s->want_scores ? att_n_chunks(s->n) : 1;
        if (nc <= 1) continue;
        int width = 0;
        for (int l = 0; l < be->n_layers; l++) {
            int n = kvp_get_table(be->base.pool, s->seq, l).n_tokens;
            if (n > width) width = n;
        }
        size_t need = (size_t)nc * per_col * (size_t)width;
        att_round *rd = &be->rounds[n_rounds - 1];
        if (used + need > be->att_part_cap && rd->s1 > rd->s0) {
            rd = &be->rounds[n_rounds++];
            *rd = (att_round){0, 0, n_splits, n_splits, 0};
            used = 0;
        }
        be->splits[n_splits] = (att_split){si, nc, width, (width + ATT_RED_COLS - 1) / ATT_RED_COLS, used};
        used += need;
        rd->n_red += be->splits[n_splits].n_red;
        rd->s1 = ++n_splits;
    }
    int n_tasks = 0;
    for (int r = 0; r < n_rounds; r++) {
        att_round *rd = &be->rounds[r];
        rd->t0 = n_tasks;
        for (int k = rd->s0; k < rd->s1; k++) att_add_tasks(be, &n_tasks, be->splits[k].si, k);
        if (r == 0)
            for (int si = 0; si < b->n_seqs; si++) {
                const eng_batch_seq *s = &b->seqs[si];
                if (!s->want_scores || att_n_chunks(s->n) <= 1) att_add_tasks(be, &n_tasks, si, -1);
            }
        rd->t1 = n_tasks;
    }
    be->n_rounds = n_rounds;
}

/* The attention of one layer: each round's tasks, then its reductions. */
static void att_run(cpu_be *be) {
    for (int r = 0; r < be->n_rounds; r++) {
        be->round = &be->rounds[r];
        eng_tp_run(be->tp, att_task_run, be, be->round->t1 - be->round->t0);
        eng_tp_run(be->tp, att_reduce_run, be, be->round->n_red);
    }
    be->round = NULL;
}

/* ---- create / destroy ------------------------------------------------------------- */

static void cpu_destroy(eng_backend *base) {
    cpu_be *be = (cpu_be *)base;
    if (!be) return;
    eng_tp_destroy(be->tp);
    free(be->x); free(be->xb); free(be->q); free(be->k); free(be->v); free(be->ao);
    free(be->tmp); free(be->hb); free(be->hb2); free(be->xf); free(be->logits); free(be->out_rows);
    free(be->cosv); free(be->sinv); free(be->inv_freq); free(be->norm_f32);
    free(be->bias_f32); free(be->mm_scratch); free(be->att_scratch); free(be->tasks);
    free(be->splits); free(be->rounds); free(be->att_part);
    free(be->tables);
    free(be->kv_k); free(be->kv_v); free(be->kv_score); free(be->kv_hpos);
    cpu_kv_ws_free(be);
    free(be);
}

static int cpu_step(eng_backend *base, const eng_batch *b);
static int cpu_attach_thread(eng_backend *base);
static void cpu_caps(const eng_backend *base, eng_backend_caps *out);
static int cpu_kv_attach(eng_backend *base, kvp_pool *pool);
static int cpu_logits(eng_backend *base, int row0, int n, const float **out);
static int cpu_argmax(eng_backend *base, const int *rows, int n, int32_t *out);
static int cpu_sync(eng_backend *base);
static const char *cpu_last_error(const eng_backend *base);

static const eng_backend_ops cpu_ops = {
    .attach_thread = cpu_attach_thread,
    .caps = cpu_caps,
    .kv_attach = cpu_kv_attach,
    .step = cpu_step,
    .logits = cpu_logits,
    .argmax = cpu_argmax,
    .kv_compress = cpu_kv_compress,
    .read_slot = cpu_read_slot,
    .write_slot = cpu_write_slot,
    .read_head_pos = cpu_read_head_pos,
    .sync = cpu_sync,
    .last_error = cpu_last_error,
    .destroy = cpu_destroy,
};

static float *falloc(size_t n) {
    return aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64 + 64);
}

int eng_cpu_backend_create(const eng_model *m, const eng_backend_config *cfg,
                           eng_backend **out) {
    *out = NULL;
    const eng_model_config *c = &m->cfg;
    if (!cfg || cfg->max_batch_tokens <= 0 || cfg->max_logit_rows <= 0 ||
        cfg->max_seq_tokens <= 0 || c->n_kv_heads <= 0 || c->n_heads % c->n_kv_heads != 0 ||
        c->head_dim % 2 != 0 || c->n_heads / c->n_kv_heads > 64) {
        D2_ERROR("cpu_backend: bad config or model shape");
        return D2_EINVAL;
    }
    int hd = c->head_dim, qd = c->n_heads * hd, kvd = c->n_kv_heads * hd;
    int rc = eng_model_check_tensors(m, "cpu_backend");
    if (rc) return rc;

    cpu_be *be = calloc(1, sizeof *be);
    if (!be) return D2_ENOMEM;
    be->base.ops = &cpu_ops;
    be->base.model = m;
    be->err[0] = '\0';
    int nt = cfg->n_threads;
    if (nt <= 0) nt = d2_usable_cpus(); /* affinity mask and cgroup quota, not every online CPU */
    be->n_threads = nt;
    D2_INFO("cpu backend: %d worker thread%s%s", nt, nt == 1 ? "" : "s",
            cfg->n_threads <= 0 ? " (the CPUs this process may use)" : "");
    be->max_t = cfg->max_batch_tokens;
    be->max_rows = cfg->max_logit_rows;
    be->max_seq = cfg->max_seq_tokens;
    be->dim = c->dim;
    be->q_dim = qd;
    be->kv_dim = kvd;
    be->hd = hd;
    be->n_heads = c->n_heads;
    be->n_kv = c->n_kv_heads;
    be->gs = c->n_heads / c->n_kv_heads;
    be->ffn = c->ffn_dim;
    be->vocab = c->vocab_size;
    be->n_layers = c->n_layers;
    be->pt = cfg->page_tokens > 0 ? cfg->page_tokens : 16;
    be->slot_floats = (size_t)c->n_kv_heads * (size_t)hd;
    be->page_stride = (size_t)be->pt * be->slot_floats;
    be->eps = c->rms_eps;
    be->sliding_window = c->sliding_window;

    size_t T = (size_t)be->max_t, L = (size_t)c->n_layers;
    int64_t max_cols = c->dim;
    if (c->ffn_dim > max_cols) max_cols = c->ffn_dim;
    if (qd > max_cols) max_cols = qd;
    be->x = falloc(T * (size_t)c->dim);
    be->xb = falloc(T * (size_t)c->dim);
    be->tmp = falloc(T * (size_t)c->dim);
    be->q = falloc(T * (size_t)qd);
    be->ao = falloc(T * (size_t)qd);
    be->k = falloc(T * (size_t)kvd);
    be->v = falloc(T * (size_t)kvd);
    be->hb = falloc(T * (size_t)c->ffn_dim);
    be->hb2 = falloc(T * (size_t)c->ffn_dim);
    be->xf = falloc((size_t)be->max_rows * (size_t)c->dim);
    be->logits = falloc((size_t)be->max_rows * (size_t)c->vocab_size);
    be->out_rows = calloc((size_t)be->max_rows, sizeof(int32_t));
    be->cosv = falloc(T * (size_t)(hd / 2));
    be->sinv = falloc(T * (size_t)(hd / 2));
    be->inv_freq = falloc((size_t)(hd / 2));
    be->norm_f32 = falloc((L * 2 + 1) * (size_t)c->dim);
    be->bias_f32 = falloc(L * (size_t)(qd + 2 * kvd));
    be->mm_stride = (eng_mm_scratch_floats(max_cols) + 15) & ~(size_t)15;
    be->mm_scratch = falloc((size_t)nt * be->mm_stride);
    be->att_stride = ((size_t)be->gs * (size_t)be->max_seq + 15) & ~(size_t)15;
    be->att_scratch = falloc((size_t)nt * be->att_stride);
    be->tasks = calloc(T * (size_t)c->n_kv_heads, sizeof(att_task));
    be->splits = calloc(T, sizeof(att_split));
    be->rounds = calloc(T + 1, sizeof(att_round));
    be->att_part_cap = (size_t)ATT_SPLIT_MAX * (size_t)(c->n_heads + c->n_kv_heads) * (size_t)be->max_seq;
    be->att_part = falloc(be->att_part_cap);
    be->tables = calloc(T, sizeof(kvp_table));
    if (!be->x || !be->xb || !be->tmp || !be->q || !be->ao || !be->k || !be->v || !be->hb ||
        !be->hb2 || !be->xf || !be->logits || !be->out_rows || !be->cosv || !be->sinv || !be->inv_freq ||
        !be->norm_f32 || !be->bias_f32 || !be->mm_scratch || !be->att_scratch || !be->tasks ||
        !be->splits || !be->rounds || !be->att_part || !be->tables) {
        D2_ERROR("cpu_backend: out of memory sizing scratch for %d tokens", be->max_t);
        cpu_destroy(&be->base);
        return D2_ENOMEM;
    }
    eng_rope_inv_freq(c, be->inv_freq);
    /* "Conversion" on the CPU: norms and biases to f32 here, GEMM weights used
     * where they are (any eng_dtype); progress counts layers. */
    for (int l = 0; l < c->n_layers; l++) {
        if (cfg->progress) cfg->progress(cfg->progress_user, (size_t)l, (size_t)c->n_layers);
        const eng_layer_weights *w = &m->layers[l];
        eng_mm_row_f32(&w->attn_norm, 0, be->norm_f32 + (size_t)(2 * l) * (size_t)c->dim);
        eng_mm_row_f32(&w->ffn_norm, 0, be->norm_f32 + (size_t)(2 * l + 1) * (size_t)c->dim);
        float *bias = be->bias_f32 + (size_t)l * (size_t)(qd + 2 * kvd);
        memset(bias, 0, (size_t)(qd + 2 * kvd) * sizeof(float));
        if (w->bq.data) eng_mm_row_f32(&w->bq, 0, bias);
        if (w->bk.data) eng_mm_row_f32(&w->bk, 0, bias + qd);
        if (w->bv.data) eng_mm_row_f32(&w->bv, 0, bias + qd + kvd);
    }
    eng_mm_row_f32(&m->out_norm, 0, be->norm_f32 + L * 2 * (size_t)c->dim);
    if (cfg->progress) cfg->progress(cfg->progress_user, (size_t)c->n_layers, (size_t)c->n_layers);
    rc = eng_tp_create(nt, &be->tp);
    if (rc) {
        D2_ERROR("cpu_backend: cannot start %d threads", nt);
        cpu_destroy(&be->base);
        return rc;
    }
    *out = &be->base;
    return D2_OK;
}

/* ---- the step ------------------------------------------------------------------- */

static int validate(const cpu_be *be, const eng_batch *b) {
    if (b->n_tokens <= 0 || b->n_tokens > be->max_t || b->n_seqs <= 0 ||
        b->n_seqs > b->n_tokens)
        return D2_EINVAL;
    int next = 0;
    for (int i = 0; i < b->n_seqs; i++) {
        const eng_batch_seq *s = &b->seqs[i];
        if (s->start != next || s->n <= 0 || s->start + s->n > b->n_tokens) return D2_EINVAL;
        next += s->n;
    }
    if (next != b->n_tokens) return D2_EINVAL;
    for (int t = 0; t < b->n_tokens; t++)
        if (b->tokens[t] < 0 || b->tokens[t] >= be->vocab || b->pos[t] < 0) return D2_EINVAL;
    int rows = eng_batch_out_rows(b);
    if (rows > be->max_rows) return D2_EINVAL;
    for (int i = 0; i < b->n_seqs; i++) /* the runtime appended the step's slots */
        for (int l = 0; l < be->n_layers; l++)
            if (kvp_get_table(be->base.pool, b->seqs[i].seq, l).n_tokens < b->seqs[i].n)
                return D2_EINVAL;
    return D2_OK;
}

static int cpu_step(eng_backend *base, const eng_batch *b) {
    cpu_be *be = (cpu_be *)base;
    const eng_model *m = base->model;
    kvp_pool *pool = base->pool;
    if (!pool || !be->kv_k) return cpu_fail(be, D2_EINVAL, "step", "no KV payload (kv_attach)");
    int rc = validate(be, b);
    if (rc) return cpu_fail(be, rc, "step", "malformed plan");
    int T = b->n_tokens, dim = be->dim, qd = be->q_dim, kvd = be->kv_dim, hd = be->hd;
    int half = hd / 2, pt = be->pt;
    be->b = b;

    for (int t = 0; t < T; t++) {
        eng_mm_row_f32(&m->tok_embd, b->tokens[t], be->x + (size_t)t * (size_t)dim);
        float *cs = be->cosv + (size_t)t * (size_t)half, *sn = be->sinv + (size_t)t * (size_t)half;
        for (int i = 0; i < half; i++) {
            float a = (float)b->pos[t] * be->inv_freq[i];
            cs[i] = cosf(a);
            sn[i] = sinf(a);
        }
    }
    att_plan(be, b); /* attention tasks are the same for every layer */
    float *kbase = be->kv_k, *vbase = be->kv_v, *sbase = be->kv_score;
    const int32_t *pos_base = kvp_pos_base(pool);
    size_t stride = be->page_stride;
    int n_kv = be->n_kv;

    for (int l = 0; l < be->n_layers; l++) {
        const eng_layer_weights *w = &m->layers[l];
        be->layer = l;
        const float *an = be->norm_f32 + (size_t)(2 * l) * (size_t)dim;
        const float *fn = an + dim;
        for (int t = 0; t < T; t++)
            rmsnorm_row(be->x + (size_t)t * (size_t)dim, an, be->xb + (size_t)t * (size_t)dim, dim,
                        be->eps);
        mm_add(be, &w->wq, be->xb, dim, T, be->q, qd);
        mm_add(be, &w->wk, be->xb, dim, T, be->k, kvd);
        mm_add(be, &w->wv, be->xb, dim, T, be->v, kvd);
        mm_run(be);
        const float *bias = be->bias_f32 + (size_t)l * (size_t)(qd + 2 * kvd);
        bool has_bias = w->bq.data || w->bk.data || w->bv.data;
        for (int t = 0; t < T; t++) {
            float *q = be->q + (size_t)t * (size_t)qd, *k = be->k + (size_t)t * (size_t)kvd;
            float *v = be->v + (size_t)t * (size_t)kvd;
            if (has_bias) {
                for (int i = 0; i < qd; i++) q[i] += bias[i];
                for (int i = 0; i < kvd; i++) k[i] += bias[qd + i];
                for (int i = 0; i < kvd; i++) v[i] += bias[qd + kvd + i];
            }
            const float *cs = be->cosv + (size_t)t * (size_t)half;
            const float *sn = be->sinv + (size_t)t * (size_t)half;
            for (int h = 0; h < be->n_heads; h++) eng_rope_apply(q + h * hd, hd, m->cfg.rope_neox, cs, sn);
            for (int h = 0; h < be->n_kv; h++) eng_rope_apply(k + h * hd, hd, m->cfg.rope_neox, cs, sn);
        }
        /* K/V into the slots the runtime appended (the last s->n of the table) */
        for (int si = 0; si < b->n_seqs; si++) {
            const eng_batch_seq *s = &b->seqs[si];
            kvp_table tab = kvp_get_table(pool, s->seq, l);
            int first = tab.n_tokens - s->n;
            for (int j = 0; j < s->n; j++) {
                int32_t page;
                int slot;
                kvp_locate(&tab, pt, first + j, &page, &slot);
                size_t off = (size_t)page * stride + (size_t)slot * (size_t)kvd;
                int t = s->start + j;
                memcpy(kbase + off, be->k + (size_t)t * (size_t)kvd, (size_t)kvd * sizeof(float));
                memcpy(vbase + off, be->v + (size_t)t * (size_t)kvd, (size_t)kvd * sizeof(float));
                size_t si_ = (size_t)page * (size_t)pt + (size_t)slot;
                memset(sbase + si_ * (size_t)n_kv, 0, (size_t)n_kv * sizeof(float));
                for (int g = 0; g < n_kv; g++) be->kv_hpos[si_ * (size_t)n_kv + (size_t)g] = pos_base[si_];
            }
            be->tables[si] = tab;
        }
        att_run(be);

        mm_add(be, &w->wo, be->ao, qd, T, be->tmp, dim);
        mm_run(be);
        for (size_t i = 0; i < (size_t)T * (size_t)dim; i++) be->x[i] += be->tmp[i];

        for (int t = 0; t < T; t++)
            rmsnorm_row(be->x + (size_t)t * (size_t)dim, fn, be->xb + (size_t)t * (size_t)dim, dim,
                        be->eps);
        mm_add(be, &w->w_gate, be->xb, dim, T, be->hb, be->ffn);
        mm_add(be, &w->w_up, be->xb, dim, T, be->hb2, be->ffn);
        mm_run(be);
        eng_tp_run(be->tp, swiglu_task, be, T);
        mm_add(be, &w->w_down, be->hb, be->ffn, T, be->tmp, dim);
        mm_run(be);
        for (size_t i = 0; i < (size_t)T * (size_t)dim; i++) be->x[i] += be->tmp[i];
    }

    int rows = 0;
    for (int si = 0; si < b->n_seqs; si++) {
        const eng_batch_seq *s = &b->seqs[si];
        if (s->all_logits)
            for (int j = 0; j < s->n; j++) be->out_rows[rows++] = s->start + j;
        else if (s->want_logits)
            be->out_rows[rows++] = s->start + s->n - 1;
    }
    if (rows > 0) {
        const float *on = be->norm_f32 + (size_t)be->n_layers * 2 * (size_t)dim;
        for (int r = 0; r < rows; r++)
            rmsnorm_row(be->x + (size_t)be->out_rows[r] * (size_t)dim, on,
                        be->xf + (size_t)r * (size_t)dim, dim, be->eps);
        const eng_tensor *outw = m->output.data ? &m->output : &m->tok_embd;
        mm_add(be, outw, be->xf, dim, rows, be->logits, be->vocab);
        mm_run(be);
    }
    be->n_logit_rows = rows;
    be->b = NULL;
    return D2_OK;
}

/* ---- the rest of the interface ---------------------------------------------------- */

int cpu_fail(cpu_be *be, int rc, const char *call, const char *why) {
    snprintf(be->err, sizeof be->err, "cpu backend: %s: %s (%s)", call, why, d2_strerror(rc));
    return rc;
}

static int cpu_attach_thread(eng_backend *base) {
    (void)base; /* host memory and a thread pool: nothing is bound to a thread */
    return D2_OK;
}

static void cpu_caps(const eng_backend *base, eng_backend_caps *out) {
    const cpu_be *be = (const cpu_be *)base;
    *out = (eng_backend_caps){
        .name = "cpu",
        .kv_dtype = ENG_KV_DT_F32,
        .kv_on_device = false,
        /* k + v floats, one fp32 score and one int32 position per KV head */
        .kv_bytes_per_slot = (2 * be->slot_floats + (size_t)be->n_kv) * sizeof(float) +
                             (size_t)be->n_kv * sizeof(int32_t),
        .kv_bytes_avail = 0,
        .argmax_on_device = false,
        .kv_per_head = true,
    };
}

/* Payload hook: slot runs of k, v, score and head positions, in order. */
static void cpu_payload_copy(void *ctx, const kvp_slot_run *runs, int n_runs) {
    cpu_be *be = ctx;
    size_t sf = be->slot_floats, h = (size_t)be->n_kv, pt = (size_t)be->pt;
    for (int r = 0; r < n_runs; r++) {
        const kvp_slot_run *u = &runs[r];
        size_t d = (size_t)u->dst_page * pt + (size_t)u->dst_slot;
        size_t s = (size_t)u->src_page * pt + (size_t)u->src_slot;
        size_t n = (size_t)u->n;
        memcpy(be->kv_k + d * sf, be->kv_k + s * sf, n * sf * sizeof(float));
        memcpy(be->kv_v + d * sf, be->kv_v + s * sf, n * sf * sizeof(float));
        memcpy(be->kv_score + d * h, be->kv_score + s * h, n * h * sizeof(float));
        memcpy(be->kv_hpos + d * h, be->kv_hpos + s * h, n * h * sizeof(int32_t));
    }
}

#ifdef D2_DEBUG_BUILD
/* Debug builds: a freed page's K/V become NaN, so reads through stale page ids show up. */
static void cpu_payload_freed(void *ctx, int32_t page) {
    cpu_be *be = ctx;
    for (size_t i = 0; i < be->page_stride; i++) {
        be->kv_k[(size_t)page * be->page_stride + i] = NAN;
        be->kv_v[(size_t)page * be->page_stride + i] = NAN;
    }
}
#endif

static int cpu_kv_attach(eng_backend *base, kvp_pool *pool) {
    cpu_be *be = (cpu_be *)base;
    const kvp_config *pc = kvp_get_config(pool);
    if (be->kv_k) return cpu_fail(be, D2_EINVAL, "kv_attach", "already attached");
    if (pc->n_layers != be->n_layers || pc->n_kv_heads != be->n_kv || pc->head_dim != be->hd ||
        pc->page_tokens != be->pt || pc->max_seq_tokens > be->max_seq) {
        D2_ERROR("cpu_backend: kv pool shape (%d layers, %d kv heads, head_dim %d, page %d) "
                 "does not match the model and backend (%d, %d, %d, %d)",
                 pc->n_layers, pc->n_kv_heads, pc->head_dim, pc->page_tokens, be->n_layers,
                 be->n_kv, be->hd, be->pt);
        return cpu_fail(be, D2_ESHAPE, "kv_attach", "pool shape differs from the model");
    }
    size_t n_slots = (size_t)pc->n_pages * (size_t)be->pt;
    be->kv_k = falloc(n_slots * be->slot_floats);
    be->kv_v = falloc(n_slots * be->slot_floats);
    be->kv_score = calloc(n_slots * (size_t)be->n_kv, sizeof(float));
    be->kv_hpos = malloc(n_slots * (size_t)be->n_kv * sizeof(int32_t));
    int rc = be->kv_k && be->kv_v && be->kv_score && be->kv_hpos ? cpu_kv_ws_init(be) : D2_ENOMEM;
    if (rc != D2_OK) {
        free(be->kv_k); free(be->kv_v); free(be->kv_score); free(be->kv_hpos);
        be->kv_k = be->kv_v = be->kv_score = NULL;
        be->kv_hpos = NULL;
        D2_ERROR("cpu_backend: cannot allocate the KV payload of %lld pages",
                 (long long)pc->n_pages);
        return cpu_fail(be, D2_ENOMEM, "kv_attach", "KV payload allocation");
    }
    be->base.pool = pool;
    kvp_payload pl = {.copy = cpu_payload_copy, .ctx = be};
#ifdef D2_DEBUG_BUILD
    pl.freed = cpu_payload_freed;
    for (size_t i = 0; i < n_slots * be->slot_floats; i++) be->kv_k[i] = be->kv_v[i] = NAN;
#endif
    kvp_set_payload(pool, &pl);
    return D2_OK;
}

static int cpu_logits(eng_backend *base, int row0, int n, const float **out) {
    cpu_be *be = (cpu_be *)base;
    if (row0 < 0 || n < 0 || row0 + n > be->n_logit_rows)
        return cpu_fail(be, D2_EINVAL, "logits", "rows outside the last step's logits");
    *out = be->logits + (size_t)row0 * (size_t)be->vocab;
    return D2_OK;
}

static int cpu_argmax(eng_backend *base, const int *rows, int n, int32_t *out) {
    cpu_be *be = (cpu_be *)base;
    for (int i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= be->n_logit_rows)
            return cpu_fail(be, D2_EINVAL, "argmax", "row outside the last step's logits");
        const float *lg = be->logits + (size_t)rows[i] * (size_t)be->vocab;
        int best = 0;
        for (int v = 1; v < be->vocab; v++)
            if (lg[v] > lg[best]) best = v;
        out[i] = best;
    }
    return D2_OK;
}

static int cpu_sync(eng_backend *base) {
    (void)base; /* every op has finished when it returns */
    return D2_OK;
}

static const char *cpu_last_error(const eng_backend *base) {
    return ((const cpu_be *)base)->err;
}
