/*
 * engine/cpu/kvcomp.c — the CPU backend's KV-compression operation
 * (eng_backend_ops.kv_compress; contract and step order in engine/backend.h)
 * and its slot accessors for inspection and tests. The policy — budgets,
 * thresholds, when to compress — is the runtime's (engine/kvcomp.c).
 *
 * Callers: the engine thread, through the backend vtable. The scratch
 * (cpu_kv_ws) is sized once at kv_attach from max_seq_tokens; nothing here
 * allocates.
 *
 * Threads: the heavy parts run on the backend's pool (threadpool.h) — key
 * normalisation over token ranges, the matching (every evicted token against
 * every kept one: O(evicted x kept x kv_dim)) over ranges of the evicted
 * list, the merges over ranges of the kept list. Each output (a normalised
 * key, an evicted token's target and similarity, a merged slot) is written
 * by exactly one task and computed exactly as a single thread computes it;
 * the one reduction (the mean similarity) is summed afterwards in token
 * order. So the result is bit-identical whatever the thread count. Scores,
 * selection, unsharing and compaction are O(n) or O(n log n) and stay on the
 * calling thread. Granularity head (eng_kv_compress_req.per_head) runs the
 * matching and the merges one task per KV head, with the same guarantee.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "engine/cpu/internal.h"
#include "engine/cpu/matmul.h"
#include "engine/kvsel.h"

int cpu_kv_ws_init(cpu_be *be) {
    cpu_kv_ws *ws = &be->kvws;
    ws->cap = be->max_seq;
    size_t cap = (size_t)ws->cap, kvd = be->slot_floats;
    ws->score = malloc(cap * sizeof(float));
    ws->pooled = malloc(cap * sizeof(float));
    ws->sim = malloc(cap * sizeof(float));
    ws->kn = malloc(cap * kvd * sizeof(float));
    ws->keep = malloc(cap);
    ws->pass = malloc(cap);
    ws->cand = malloc(cap * sizeof(eng_kv_cand));
    ws->kept = malloc(cap * sizeof(int32_t));
    ws->tgt = malloc(cap * sizeof(int32_t));
    ws->order = malloc(cap * sizeof(int32_t));
    ws->ev = malloc(cap * sizeof(int32_t));
    ws->start = malloc((cap + 1) * sizeof(int32_t));
    size_t nt = (size_t)be->n_threads; /* one merge accumulator per thread */
    ws->acc_k = malloc(nt * kvd * sizeof(float));
    ws->acc_v = malloc(nt * kvd * sizeof(float));
    size_t hc = cap * (size_t)be->n_kv;
    ws->hkeep = malloc(hc);
    ws->hpass = malloc(hc);
    ws->hsim = malloc(hc * sizeof(float));
    ws->htgt = malloc(hc * sizeof(int32_t));
    ws->hkept = malloc(hc * sizeof(int32_t));
    ws->horder = malloc(hc * sizeof(int32_t));
    ws->hstart = malloc((cap + 1) * (size_t)be->n_kv * sizeof(int32_t));
    ws->hn_kept = malloc((size_t)be->n_kv * sizeof(int));
    if (!ws->hkeep || !ws->hpass || !ws->hsim || !ws->htgt || !ws->hkept || !ws->horder ||
        !ws->hstart || !ws->hn_kept || !ws->score || !ws->pooled || !ws->sim || !ws->kn || !ws->keep || !ws->pass || !ws->cand ||
        !ws->kept || !ws->tgt || !ws->order || !ws->ev || !ws->start || !ws->acc_k || !ws->acc_v) {
        cpu_kv_ws_free(be);
        return D2_ENOMEM;
    }
    return D2_OK;
}

void cpu_kv_ws_free(cpu_be *be) {
    cpu_kv_ws *ws = &be->kvws;
    free(ws->score); free(ws->pooled); free(ws->sim); free(ws->kn); free(ws->keep);
    free(ws->pass); free(ws->cand); free(ws->kept); free(ws->tgt); free(ws->order);
    free(ws->ev); free(ws->start); free(ws->acc_k); free(ws->acc_v);
    free(ws->hkeep); free(ws->hpass); free(ws->hsim); free(ws->htgt); free(ws->hkept);
    free(ws->horder); free(ws->hstart); free(ws->hn_kept);
    memset(ws, 0, sizeof *ws);
}

static float *slot_ptr(float *base, size_t stride, const kvp_table *t, int pt, size_t kvd, int i) {
    return base + (size_t)t->pages[i / pt] * stride + (size_t)(i % pt) * kvd;
}

/* 1-2: token scores (sum over KV heads, optionally pooled) and the kept set. */
static int score_and_select(cpu_be *be, const kvp_table *tab, const eng_kv_compress_req *rq) {
    cpu_kv_ws *ws = &be->kvws;
    int n = tab->n_tokens, pt = be->pt, n_kv = be->n_kv;
    for (int i = 0; i < n; i++) {
        size_t slot = (size_t)tab->pages[i / pt] * (size_t)pt + (size_t)(i % pt);
        float acc = 0.0f;
        for (int g = 0; g < n_kv; g++) acc += be->kv_score[slot * (size_t)n_kv + (size_t)g];
        ws->score[i] = acc;
    }
    const float *score = ws->score;
    if (rq->pooled) {
        eng_kv_pool_scores(ws->score, n, ws->pooled);
        score = ws->pooled;
    }
    return eng_kv_select(ws->cand, score, n, rq->n_sink, rq->heavy, rq->recent, ws->keep);
}

/* One parallel phase of a compression: items [0, n_items) in n_tasks ranges;
 * lives on the caller's stack for the phase. */
typedef struct kv_job {
    cpu_be *be;
    const kvp_table *tab;
    const eng_kv_compress_req *rq;
    int n_items, n_tasks;
} kv_job;

/* Tasks for n items: a few per thread (ranges differ in cost), at least
 * min_items items each; 1 when the pool has one thread. */
static int kv_tasks(const cpu_be *be, int n_items, int min_items) {
    int t = be->n_threads > 1 ? be->n_threads * 4 : 1;
    int by_size = n_items / (min_items > 0 ? min_items : 1);
    if (t > by_size) t = by_size;
    return t < 1 ? 1 : t;
}

static void kv_range(const kv_job *j, int task, int *i0, int *i1) {
    *i0 = (int)((int64_t)j->n_items * task / j->n_tasks);
    *i1 = (int)((int64_t)j->n_items * (task + 1) / j->n_tasks);
}

static void kv_run(cpu_be *be, eng_tp_fn fn, kv_job *j, int min_items) {
    j->n_tasks = kv_tasks(be, j->n_items, min_items);
    eng_tp_run(be->tp, fn, j, j->n_tasks);
}

/* Task: per-head unit keys of tokens [i0, i1). */
static void normalise_task(void *ctx, int task, int thread) {
    const kv_job *j = ctx;
    cpu_be *be = j->be;
    int i0, i1, hd = be->hd, n_kv = be->n_kv;
    size_t kvd = be->slot_floats;
    kv_range(j, task, &i0, &i1);
    for (int i = i0; i < i1; i++) {
        const float *k = slot_ptr(be->kv_k, be->page_stride, j->tab, be->pt, kvd, i);
        float *kn = be->kvws.kn + (size_t)i * kvd;
        for (int g = 0; g < n_kv; g++) {
            const float *kh = k + (size_t)g * (size_t)hd;
            float nn = sqrtf(eng_dot_f32(kh, kh, hd));
            float inv = nn > 1e-30f ? 1.0f / nn : 0.0f;
            for (int d = 0; d < hd; d++) kn[g * hd + d] = kh[d] * inv;
        }
    }
}

/* Task: for evicted tokens ev[i0..i1), the most similar kept token (the
 * first of equals, in kept order) and the similarity. */
static void match_task(void *ctx, int task, int thread) {
    const kv_job *j = ctx;
    cpu_be *be = j->be;
    cpu_kv_ws *ws = &be->kvws;
    size_t kvd = be->slot_floats;
    int i0, i1;
    kv_range(j, task, &i0, &i1);
    float inv_h = 1.0f / (float)be->n_kv;
    int n_kept = ws->n_kept;
    for (int x = i0; x < i1; x++) {
        int e = ws->ev[x];
        const float *ke = ws->kn + (size_t)e * kvd;
        float best = -INFINITY;
        int bt = -1;
        for (int q = 0; q < n_kept; q++) {
            float u = eng_dot_f32(ke, ws->kn + (size_t)ws->kept[q] * kvd, (int)kvd) * inv_h;
            if (u > best) { best = u; bt = ws->kept[q]; }
        }
        ws->tgt[e] = bt;
        ws->sim[e] = best;
    }
}

/* 3: every evicted token's most similar kept token (mean per-head cosine of the
 * post-RoPE keys), tau from the caller's policy, and which tokens pass it. */
static int match(cpu_be *be, const kvp_table *tab, int n_ev, const eng_kv_compress_req *rq,
                 float *tau_out) {
    cpu_kv_ws *ws = &be->kvws;
    int n = tab->n_tokens;
    int nk = 0, ne = 0;
    for (int i = 0; i < n; i++) {
        ws->tgt[i] = -1;
        if (ws->keep[i]) ws->kept[nk++] = i;
        else ws->ev[ne++] = i;
    }
    ws->n_kept = nk;
    kv_job j = {.be = be, .tab = tab, .rq = rq, .n_items = n};
    kv_run(be, normalise_task, &j, 64);
    j.n_items = ne;
    kv_run(be, match_task, &j, 8);
    double ssum = 0.0; /* in token order, whatever the tasks were */
    for (int x = 0; x < ne; x++) ssum += ws->sim[ws->ev[x]];
    float tau = rq->threshold(rq->user, (float)(ssum / n_ev));
    *tau_out = tau;
    int n_pass = 0;
    for (int e = 0; e < n; e++) {
        ws->pass[e] = !ws->keep[e] && ws->tgt[e] >= 0 && ws->sim[e] >= tau;
        n_pass += ws->pass[e];
    }
    return n_pass;
}

/* The pages compaction rewrites: slots first_gap..kept-1 (every slot before the
 * first evicted one stays where it is). */
static int unshare_compacted(cpu_be *be, const eng_kv_compress_req *rq, int first_gap, int kept) {
    int pt = be->pt;
    for (int q = first_gap / pt; q <= (kept - 1) / pt && kept > first_gap; q++) {
        int rc = kvp_unshare(be->base.pool, rq->seq, rq->layer, q * pt);
        if (rc) return rc;
    }
    return D2_OK;
}

/* 4: makes private every page that the merges and the compaction write. */
static int unshare_written(cpu_be *be, const eng_kv_compress_req *rq, int n, int kept, int n_pass) {
    cpu_kv_ws *ws = &be->kvws;
    kvp_pool *pool = be->base.pool;
    int first_gap = 0;
    while (first_gap < n && ws->keep[first_gap]) first_gap++;
    int urc = unshare_compacted(be, rq, first_gap, kept);
    if (urc) return urc;
    if (n_pass > 0)
        for (int e = 0; e < n; e++) {
            if (!ws->pass[e]) continue;
            int rc = kvp_unshare(pool, rq->seq, rq->layer, ws->tgt[e]);
            if (rc) return rc;
        }
    return D2_OK;
}

/* Task: the merges into kept tokens kept[i0..i1) (each target's group of
 * passed tokens in token order, accumulated in fp32 in this thread's
 * accumulator, then written back). */
static void merge_task(void *ctx, int task, int thread) {
    const kv_job *j = ctx;
    cpu_be *be = j->be;
    cpu_kv_ws *ws = &be->kvws;
    const eng_kv_compress_req *rq = j->rq;
    const kvp_table *tab = j->tab;
    int pt = be->pt, i0, i1;
    size_t kvd = be->slot_floats, stride = be->page_stride;
    float *acc_k = ws->acc_k + (size_t)thread * kvd, *acc_v = ws->acc_v + (size_t)thread * kvd;
    const float self_e = expf(1.0f);
    kv_range(j, task, &i0, &i1);
    for (int q = i0; q < i1; q++) {
        int c = ws->kept[q];
        int g0 = c == 0 ? 0 : ws->start[c - 1], g1 = ws->start[c];
        int cnt = g1 - g0;
        if (cnt <= 0) continue;
        float *kc = slot_ptr(be->kv_k, stride, tab, pt, kvd, c);
        float *vc = slot_ptr(be->kv_v, stride, tab, pt, kvd, c);
        float wc, denom;
        if (!rq->merge_code_rule) {
            denom = self_e;
            for (int x = g0; x < g1; x++) denom += expf(ws->sim[ws->order[x]]);
            wc = self_e / denom;
        } else {
            denom = 1.0f + (float)cnt;
            wc = 1.0f / denom;
        }
        for (size_t d = 0; d < kvd; d++) {
            acc_k[d] = wc * kc[d];
            acc_v[d] = wc * vc[d];
        }
        for (int x = g0; x < g1; x++) {
            int e = ws->order[x];
            float we = !rq->merge_code_rule ? expf(ws->sim[e]) / denom : ws->sim[e] / denom;
            const float *ke = slot_ptr(be->kv_k, stride, tab, pt, kvd, e);
            const float *ve = slot_ptr(be->kv_v, stride, tab, pt, kvd, e);
            for (size_t d = 0; d < kvd; d++) {
                acc_k[d] += we * ke[d];
                acc_v[d] += we * ve[d];
            }
        }
        memcpy(kc, acc_k, kvd * sizeof(float));
        memcpy(vc, acc_v, kvd * sizeof(float));
    }
}

/* 5: merges of the passed tokens into their targets, grouped by target
 * (counting sort), in fp32, in place; the targets split over the pool. */
static void merge(cpu_be *be, const kvp_table *tab, const eng_kv_compress_req *rq) {
    cpu_kv_ws *ws = &be->kvws;
    int n = tab->n_tokens;
    memset(ws->start, 0, (size_t)(n + 1) * sizeof(int32_t));
    for (int e = 0; e < n; e++)
        if (ws->pass[e]) ws->start[ws->tgt[e] + 1]++;
    for (int i = 0; i < n; i++) ws->start[i + 1] += ws->start[i];
    for (int e = 0; e < n; e++)
        if (ws->pass[e]) ws->order[ws->start[ws->tgt[e]]++] = e;
    /* start[c] now ends c's group; groups begin at start[c-1] (0 for c = 0) */
    kv_job j = {.be = be, .tab = tab, .rq = rq, .n_items = ws->n_kept};
    kv_run(be, merge_task, &j, 16);
}

/* ---- per-head mode (eng_kv_compress_req.per_head) ------------------------------ */

/* 1-2 per KV head: head g's own score (no sum over heads) and kept set
 * (ws->hkeep row g). Returns the kept count, the same in every head. */
static int head_select(cpu_be *be, const kvp_table *tab, const eng_kv_compress_req *rq) {
    cpu_kv_ws *ws = &be->kvws;
    int n = tab->n_tokens, pt = be->pt, n_kv = be->n_kv, kept = 0;
    for (int g = 0; g < n_kv; g++) {
        for (int i = 0; i < n; i++) {
            size_t slot = (size_t)tab->pages[i / pt] * (size_t)pt + (size_t)(i % pt);
            ws->score[i] = be->kv_score[slot * (size_t)n_kv + (size_t)g];
        }
        const float *score = ws->score;
        if (rq->pooled) {
            eng_kv_pool_scores(ws->score, n, ws->pooled);
            score = ws->pooled;
        }
        kept = eng_kv_select(ws->cand, score, n, rq->n_sink, rq->heavy, rq->recent,
                             ws->hkeep + (size_t)g * (size_t)ws->cap);
    }
    return kept;
}

/* Task g: head g's kept list, and for each of its evicted tokens the most
 * similar of its kept tokens by head g's cosine (the first of equals). */
static void head_match_task(void *ctx, int g, int thread) {
    const kv_job *j = ctx;
    cpu_be *be = j->be;
    cpu_kv_ws *ws = &be->kvws;
    int n = j->tab->n_tokens, hd = be->hd;
    size_t kvd = be->slot_floats, cap = (size_t)ws->cap, ho = (size_t)g * (size_t)hd;
    const uint8_t *keep = ws->hkeep + (size_t)g * cap;
    int32_t *kept = ws->hkept + (size_t)g * cap, *tgt = ws->htgt + (size_t)g * cap;
    float *sim = ws->hsim + (size_t)g * cap;
    int nk = 0;
    for (int i = 0; i < n; i++)
        if (keep[i]) kept[nk++] = i;
    ws->hn_kept[g] = nk;
    for (int e = 0; e < n; e++) {
        tgt[e] = -1;
        if (keep[e]) continue;
        const float *ke = ws->kn + (size_t)e * kvd + ho;
        float best = -INFINITY;
        int bt = -1;
        for (int c = 0; c < nk; c++) {
            float u = eng_dot_f32(ke, ws->kn + (size_t)kept[c] * kvd + ho, hd);
            if (u > best) { best = u; bt = kept[c]; }
        }
        tgt[e] = bt;
        sim[e] = best;
    }
}

/* 3 per KV head: the matches (a task per head); tau from the mean over heads x
 * evicted tokens; column j (every head's j-th evicted token) passes when the
 * mean over heads of its similarities reaches tau, as the official code
 * tests. Sums in head and token order. Returns the passed columns. */
static int head_match(cpu_be *be, const kvp_table *tab, int n_ev, const eng_kv_compress_req *rq,
                      float *tau_out) {
    cpu_kv_ws *ws = &be->kvws;
    int n = tab->n_tokens, n_kv = be->n_kv;
    size_t cap = (size_t)ws->cap;
    kv_job j = {.be = be, .tab = tab, .rq = rq, .n_items = n};
    kv_run(be, normalise_task, &j, 64);
    eng_tp_run(be->tp, head_match_task, &j, n_kv);
    memset(ws->sim, 0, (size_t)n_ev * sizeof(float)); /* column sums over heads */
    double ssum = 0.0;
    for (int g = 0; g < n_kv; g++) {
        const uint8_t *keep = ws->hkeep + (size_t)g * cap;
        const float *sim = ws->hsim + (size_t)g * cap;
        for (int e = 0, c = 0; e < n; e++) {
            if (keep[e]) continue;
            ssum += sim[e];
            ws->sim[c++] += sim[e];
        }
    }
    float tau = rq->threshold(rq->user, (float)(ssum / ((double)n_ev * n_kv)));
    *tau_out = tau;
    int n_pass = 0;
    for (int c = 0; c < n_ev; c++) {
        ws->pass[c] = ws->sim[c] / (float)n_kv >= tau;
        n_pass += ws->pass[c];
    }
    for (int g = 0; g < n_kv; g++) {
        const uint8_t *keep = ws->hkeep + (size_t)g * cap;
        uint8_t *pass = ws->hpass + (size_t)g * cap;
        const int32_t *tgt = ws->htgt + (size_t)g * cap;
        for (int e = 0, c = 0; e < n; e++) {
            pass[e] = 0;
            if (keep[e]) continue;
            pass[e] = ws->pass[c++] && tgt[e] >= 0;
        }
    }
    return n_pass;
}

/* 4 per head: the pages the merges and the per-head compaction write. */
static int head_unshare(cpu_be *be, const eng_kv_compress_req *rq, int n, int kept, int n_pass) {
    cpu_kv_ws *ws = &be->kvws;
    kvp_pool *pool = be->base.pool;
    int first_gap = n;
    size_t cap = (size_t)ws->cap;
    for (int g = 0; g < be->n_kv; g++) {
        const uint8_t *keep = ws->hkeep + (size_t)g * cap;
        int f = 0;
        while (f < n && keep[f]) f++;
        if (f < first_gap) first_gap = f;
    }
    int urc = unshare_compacted(be, rq, first_gap, kept);
    if (urc) return urc;
    for (int g = 0; g < be->n_kv && n_pass > 0; g++)
        for (int e = 0; e < n; e++) {
            if (!ws->hpass[(size_t)g * cap + (size_t)e]) continue;
            int rc = kvp_unshare(pool, rq->seq, rq->layer, ws->htgt[(size_t)g * cap + (size_t)e]);
            if (rc) return rc;
        }
    return D2_OK;
}

/* Task g, 5 per head: head g's passed tokens merge into its own targets
 * (grouped by target in token order, fp32, this thread's accumulator), on
 * head g's head_dim floats of each slot only. */
static void head_merge_task(void *ctx, int g, int thread) {
    const kv_job *j = ctx;
    cpu_be *be = j->be;
    cpu_kv_ws *ws = &be->kvws;
    const kvp_table *tab = j->tab;
    int n = tab->n_tokens, pt = be->pt;
    size_t cap = (size_t)ws->cap, kvd = be->slot_floats, stride = be->page_stride;
    size_t hd = (size_t)be->hd, ho = (size_t)g * hd;
    const uint8_t *pass = ws->hpass + (size_t)g * cap;
    const int32_t *tgt = ws->htgt + (size_t)g * cap;
    const float *sim = ws->hsim + (size_t)g * cap;
    int32_t *start = ws->hstart + (size_t)g * (cap + 1), *order = ws->horder + (size_t)g * cap;
    float *acc_k = ws->acc_k + (size_t)thread * kvd, *acc_v = ws->acc_v + (size_t)thread * kvd;
    const float self_e = expf(1.0f);
    memset(start, 0, (size_t)(n + 1) * sizeof(int32_t));
    for (int e = 0; e < n; e++)
        if (pass[e]) start[tgt[e] + 1]++;
    for (int i = 0; i < n; i++) start[i + 1] += start[i];
    for (int e = 0; e < n; e++)
        if (pass[e]) order[start[tgt[e]]++] = e;
    for (int c = 0, g0 = 0; c < n; g0 = start[c], c++) { /* start[c] ends c's group */
        int g1 = start[c], cnt = g1 - g0;
        if (cnt <= 0) continue;
        float *kc = slot_ptr(be->kv_k, stride, tab, pt, kvd, c) + ho;
        float *vc = slot_ptr(be->kv_v, stride, tab, pt, kvd, c) + ho;
        float wc, denom;
        if (!j->rq->merge_code_rule) {
            denom = self_e;
            for (int x = g0; x < g1; x++) denom += expf(sim[order[x]]);
            wc = self_e / denom;
        } else {
            denom = 1.0f + (float)cnt;
            wc = 1.0f / denom;
        }
        for (size_t d = 0; d < hd; d++) {
            acc_k[d] = wc * kc[d];
            acc_v[d] = wc * vc[d];
        }
        for (int x = g0; x < g1; x++) {
            int e = order[x];
            float we = !j->rq->merge_code_rule ? expf(sim[e]) / denom : sim[e] / denom;
            const float *ke = slot_ptr(be->kv_k, stride, tab, pt, kvd, e) + ho;
            const float *ve = slot_ptr(be->kv_v, stride, tab, pt, kvd, e) + ho;
            for (size_t d = 0; d < hd; d++) {
                acc_k[d] += we * ke[d];
                acc_v[d] += we * ve[d];
            }
        }
        memcpy(kc, acc_k, hd * sizeof(float));
        memcpy(vc, acc_v, hd * sizeof(float));
    }
}

/* 6 per head, before the pool's compaction: head g's kept slots (K, V, score,
 * position) move to the table's first `kept` slots in slot order; then every
 * front slot's pool position becomes the largest of its heads' positions. */
static void head_compact(cpu_be *be, const kvp_table *tab, int kept) {
    cpu_kv_ws *ws = &be->kvws;
    int n = tab->n_tokens, pt = be->pt, n_kv = be->n_kv, hd = be->hd;
    size_t cap = (size_t)ws->cap, kvd = be->slot_floats;
    for (int g = 0; g < n_kv; g++) {
        const uint8_t *keep = ws->hkeep + (size_t)g * cap;
        size_t ko = (size_t)g * (size_t)hd;
        for (int i = 0, j = 0; i < n; i++) {
            if (!keep[i]) continue;
            if (i != j) { /* j < i: forward copies never overwrite an unread kept slot */
                size_t si = (size_t)tab->pages[i / pt] * (size_t)pt + (size_t)(i % pt);
                size_t sj = (size_t)tab->pages[j / pt] * (size_t)pt + (size_t)(j % pt);
                memcpy(be->kv_k + sj * kvd + ko, be->kv_k + si * kvd + ko, (size_t)hd * sizeof(float));
                memcpy(be->kv_v + sj * kvd + ko, be->kv_v + si * kvd + ko, (size_t)hd * sizeof(float));
                be->kv_score[sj * (size_t)n_kv + (size_t)g] = be->kv_score[si * (size_t)n_kv + (size_t)g];
                be->kv_hpos[sj * (size_t)n_kv + (size_t)g] = be->kv_hpos[si * (size_t)n_kv + (size_t)g];
            }
            j++;
        }
    }
    int32_t *pos = kvp_pos_base(be->base.pool);
    for (int j = 0; j < kept; j++) {
        size_t sj = (size_t)tab->pages[j / pt] * (size_t)pt + (size_t)(j % pt);
        int32_t mx = be->kv_hpos[sj * (size_t)n_kv];
        for (int g = 1; g < n_kv; g++)
            if (be->kv_hpos[sj * (size_t)n_kv + (size_t)g] > mx) mx = be->kv_hpos[sj * (size_t)n_kv + (size_t)g];
        if (pos[sj] != mx) pos[sj] = mx; /* unchanged slots may sit in shared pages */
    }
}

static int compress_per_head(cpu_be *be, const kvp_table *tab0, const eng_kv_compress_req *rq,
                             eng_kv_compress_res *res) {
    cpu_kv_ws *ws = &be->kvws;
    kvp_pool *pool = be->base.pool;
    int n = tab0->n_tokens;
    int kept = head_select(be, tab0, rq);
    int n_ev = n - kept;
    if (n_ev == 0) return D2_OK;
    int n_pass = 0;
    float tau = 0.0f;
    if (rq->merge) n_pass = head_match(be, tab0, n_ev, rq, &tau);
    else memset(ws->hpass, 0, (size_t)ws->cap * (size_t)be->n_kv);
    int rc = head_unshare(be, rq, n, kept, n_pass);
    if (rc) return rc; /* D2_EKVFULL: nothing changed; the runtime retries later */
    kvp_table tab = kvp_get_table(pool, rq->seq, rq->layer); /* page ids may have changed */
    if (n_pass > 0) {
        kv_job j = {.be = be, .tab = &tab, .rq = rq, .n_items = be->n_kv};
        eng_tp_run(be->tp, head_merge_task, &j, be->n_kv);
    }
    head_compact(be, &tab, kept);
    /* the pool keeps the first `kept` slots: no payload moves, the tail pages return */
    memset(ws->keep, 1, (size_t)kept);
    memset(ws->keep + kept, 0, (size_t)n_ev);
    int before = tab.n_pages;
    rc = kvp_compact(pool, rq->seq, rq->layer, ws->keep);
    if (rc < 0) {
        D2_ERROR("cpu_backend: per-head compaction of seq %d layer %d failed after its pages "
                 "were made private: %s", rq->seq, rq->layer, d2_strerror(rc));
        return cpu_fail(be, rc, "kv_compress", "kvp_compact");
    }
    int after = kvp_pages_for_tokens(pool, rc);
    res->n_evicted = n_ev;
    res->n_merged = n_pass;
    res->pages_freed = before > after ? before - after : 0;
    res->tau = tau;
    return D2_OK;
}

int cpu_kv_compress(eng_backend *base, const eng_kv_compress_req *rq, eng_kv_compress_res *res) {
    cpu_be *be = (cpu_be *)base;
    kvp_pool *pool = base->pool;
    memset(res, 0, sizeof *res);
    if (!pool) return cpu_fail(be, D2_EINVAL, "kv_compress", "no KV payload (kv_attach)");
    if (rq->heavy < 0 || rq->recent < 0) return D2_OK;
    if (rq->merge && !rq->threshold)
        return cpu_fail(be, D2_EINVAL, "kv_compress", "merge without a threshold policy");
    kvp_table tab = kvp_get_table(pool, rq->seq, rq->layer);
    int n = tab.n_tokens;
    if (n <= rq->heavy + rq->recent) return D2_OK;
    if (n > be->kvws.cap) return cpu_fail(be, D2_EINVAL, "kv_compress", "table longer than max_seq_tokens");
    if (rq->per_head) return compress_per_head(be, &tab, rq, res);

    int kept = score_and_select(be, &tab, rq);
    int n_ev = n - kept;
    if (n_ev == 0) return D2_OK;
    int n_pass = 0;
    float tau = 0.0f;
    if (rq->merge) n_pass = match(be, &tab, n_ev, rq, &tau);
    int rc = unshare_written(be, rq, n, kept, n_pass);
    if (rc) return rc; /* D2_EKVFULL: nothing changed; the runtime retries later */
    tab = kvp_get_table(pool, rq->seq, rq->layer); /* page ids may have changed */
    if (n_pass > 0) merge(be, &tab, rq);
    int before = tab.n_pages;
    rc = kvp_compact(pool, rq->seq, rq->layer, be->kvws.keep);
    if (rc < 0) {
        D2_ERROR("cpu_backend: compaction of seq %d layer %d failed after its pages were made "
                 "private: %s", rq->seq, rq->layer, d2_strerror(rc));
        return cpu_fail(be, rc, "kv_compress", "kvp_compact");
    }
    int after = kvp_pages_for_tokens(pool, rc);
    res->n_evicted = n_ev;
    res->n_merged = n_pass;
    res->pages_freed = before > after ? before - after : 0;
    res->tau = tau;
    return D2_OK;
}

int cpu_read_slot(eng_backend *base, int seq, int layer, int i, float *k, float *v, float *score) {
    cpu_be *be = (cpu_be *)base;
    int64_t s = kvp_slot_index(be->base.pool, seq, layer, i);
    if (s < 0) return cpu_fail(be, D2_EINVAL, "read_slot", "no such live slot");
    size_t sf = be->slot_floats, h = (size_t)be->n_kv;
    if (k) memcpy(k, be->kv_k + (size_t)s * sf, sf * sizeof(float));
    if (v) memcpy(v, be->kv_v + (size_t)s * sf, sf * sizeof(float));
    if (score) memcpy(score, be->kv_score + (size_t)s * h, h * sizeof(float));
    return D2_OK;
}

int cpu_write_slot(eng_backend *base, int seq, int layer, int i, const float *k, const float *v,
                   const float *score) {
    cpu_be *be = (cpu_be *)base;
    int64_t s = kvp_slot_index(be->base.pool, seq, layer, i);
    if (s < 0) return cpu_fail(be, D2_EINVAL, "write_slot", "no such live slot");
    size_t sf = be->slot_floats, h = (size_t)be->n_kv;
    if (k) memcpy(be->kv_k + (size_t)s * sf, k, sf * sizeof(float));
    if (v) memcpy(be->kv_v + (size_t)s * sf, v, sf * sizeof(float));
    if (score) memcpy(be->kv_score + (size_t)s * h, score, h * sizeof(float));
    int32_t p = kvp_pos_base(be->base.pool)[s]; /* every head holds the slot's token */
    for (size_t g = 0; g < h; g++) be->kv_hpos[(size_t)s * h + g] = p;
    return D2_OK;
}

int cpu_read_head_pos(eng_backend *base, int seq, int layer, int i, int32_t *pos) {
    cpu_be *be = (cpu_be *)base;
    int64_t s = kvp_slot_index(be->base.pool, seq, layer, i);
    if (s < 0) return cpu_fail(be, D2_EINVAL, "read_head_pos", "no such live slot");
    size_t h = (size_t)be->n_kv;
    memcpy(pos, be->kv_hpos + (size_t)s * h, h * sizeof(int32_t));
    return D2_OK;
}
