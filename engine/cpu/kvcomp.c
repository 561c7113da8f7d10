/*
 * engine/cpu/kvcomp.c — the CPU backend's KV-compression operation
 * (eng_backend_ops.kv_compress; contract and step order in engine/backend.h)
 * and its slot accessors for inspection and tests. The policy — budgets,
 * thresholds, when to compress — is the runtime's (engine/kvcomp.c).
 *
 * Callers: the engine thread, through the backend vtable. The scratch
 * (cpu_kv_ws) is sized once at kv_attach from max_seq_tokens; nothing here
 * allocates.
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
    ws->start = malloc((cap + 1) * sizeof(int32_t));
    ws->acc_k = malloc(kvd * sizeof(float));
    ws->acc_v = malloc(kvd * sizeof(float));
    if (!ws->score || !ws->pooled || !ws->sim || !ws->kn || !ws->keep || !ws->pass || !ws->cand ||
        !ws->kept || !ws->tgt || !ws->order || !ws->start || !ws->acc_k || !ws->acc_v) {
        cpu_kv_ws_free(be);
        return D2_ENOMEM;
    }
    return D2_OK;
}

void cpu_kv_ws_free(cpu_be *be) {
    cpu_kv_ws *ws = &be->kvws;
    free(ws->score); free(ws->pooled); free(ws->sim); free(ws->kn); free(ws->keep);
    free(ws->pass); free(ws->cand); free(ws->kept); free(ws->tgt); free(ws->order);
    free(ws->start); free(ws->acc_k); free(ws->acc_v);
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

/* 3: every evicted token's most similar kept token (mean per-head cosine of the
 * post-RoPE keys), tau from the caller's policy, and which tokens pass it. */
static int match(cpu_be *be, const kvp_table *tab, int n_ev, const eng_kv_compress_req *rq,
                 float *tau_out) {
    cpu_kv_ws *ws = &be->kvws;
    int n = tab->n_tokens, pt = be->pt, n_kv = be->n_kv, hd = be->hd;
    size_t kvd = be->slot_floats;
    int nk = 0;
    for (int i = 0; i < n; i++) {
        const float *k = slot_ptr(be->kv_k, be->page_stride, tab, pt, kvd, i);
        float *kn = ws->kn + (size_t)i * kvd;
        for (int g = 0; g < n_kv; g++) {
            const float *kh = k + (size_t)g * (size_t)hd;
            float nn = sqrtf(eng_dot_f32(kh, kh, hd));
            float inv = nn > 1e-30f ? 1.0f / nn : 0.0f;
            for (int d = 0; d < hd; d++) kn[g * hd + d] = kh[d] * inv;
        }
        if (ws->keep[i]) ws->kept[nk++] = i;
    }
    double ssum = 0.0;
    float inv_h = 1.0f / (float)n_kv;
    for (int e = 0; e < n; e++) {
        ws->tgt[e] = -1;
        if (ws->keep[e]) continue;
        const float *ke = ws->kn + (size_t)e * kvd;
        float best = -INFINITY;
        int bt = -1;
        for (int j = 0; j < nk; j++) {
            float u = eng_dot_f32(ke, ws->kn + (size_t)ws->kept[j] * kvd, (int)kvd) * inv_h;
            if (u > best) { best = u; bt = ws->kept[j]; }
        }
        ws->tgt[e] = bt;
        ws->sim[e] = best;
        ssum += best;
    }
    float tau = rq->threshold(rq->user, (float)(ssum / n_ev));
    *tau_out = tau;
    int n_pass = 0;
    for (int e = 0; e < n; e++) {
        ws->pass[e] = !ws->keep[e] && ws->tgt[e] >= 0 && ws->sim[e] >= tau;
        n_pass += ws->pass[e];
    }
    return n_pass;
}

/* 4: makes private every page that the merges and the compaction write. */
static int unshare_written(cpu_be *be, const eng_kv_compress_req *rq, int n, int kept, int n_pass) {
    cpu_kv_ws *ws = &be->kvws;
    kvp_pool *pool = be->base.pool;
    int pt = be->pt, first_gap = 0;
    while (first_gap < n && ws->keep[first_gap]) first_gap++;
    for (int q = first_gap / pt; q <= (kept - 1) / pt && kept > first_gap; q++) {
        int rc = kvp_unshare(pool, rq->seq, rq->layer, q * pt);
        if (rc) return rc;
    }
    if (n_pass > 0)
        for (int e = 0; e < n; e++) {
            if (!ws->pass[e]) continue;
            int rc = kvp_unshare(pool, rq->seq, rq->layer, ws->tgt[e]);
            if (rc) return rc;
        }
    return D2_OK;
}

/* 5: merges of the passed tokens into their targets, grouped by target
 * (counting sort), in fp32, in place. */
static void merge(cpu_be *be, const kvp_table *tab, const eng_kv_compress_req *rq) {
    cpu_kv_ws *ws = &be->kvws;
    int n = tab->n_tokens, pt = be->pt;
    size_t kvd = be->slot_floats, stride = be->page_stride;
    memset(ws->start, 0, (size_t)(n + 1) * sizeof(int32_t));
    for (int e = 0; e < n; e++)
        if (ws->pass[e]) ws->start[ws->tgt[e] + 1]++;
    for (int i = 0; i < n; i++) ws->start[i + 1] += ws->start[i];
    for (int e = 0; e < n; e++)
        if (ws->pass[e]) ws->order[ws->start[ws->tgt[e]]++] = e;
    /* start[c] now ends c's group; groups begin at start[c-1] (0 for c = 0) */
    int g0 = 0;
    const float self_e = expf(1.0f);
    for (int c = 0; c < n; c++) {
        int g1 = ws->start[c];
        int cnt = g1 - g0;
        if (cnt > 0) {
            float *kc = slot_ptr(be->kv_k, stride, tab, pt, kvd, c);
            float *vc = slot_ptr(be->kv_v, stride, tab, pt, kvd, c);
            float wc, denom;
            if (!rq->merge_code_rule) {
                denom = self_e;
                for (int j = g0; j < g1; j++) denom += expf(ws->sim[ws->order[j]]);
                wc = self_e / denom;
            } else {
                denom = 1.0f + (float)cnt;
                wc = 1.0f / denom;
            }
            for (size_t d = 0; d < kvd; d++) {
                ws->acc_k[d] = wc * kc[d];
                ws->acc_v[d] = wc * vc[d];
            }
            for (int j = g0; j < g1; j++) {
                int e = ws->order[j];
                float we = !rq->merge_code_rule ? expf(ws->sim[e]) / denom : ws->sim[e] / denom;
                const float *ke = slot_ptr(be->kv_k, stride, tab, pt, kvd, e);
                const float *ve = slot_ptr(be->kv_v, stride, tab, pt, kvd, e);
                for (size_t d = 0; d < kvd; d++) {
                    ws->acc_k[d] += we * ke[d];
                    ws->acc_v[d] += we * ve[d];
                }
            }
            memcpy(kc, ws->acc_k, kvd * sizeof(float));
            memcpy(vc, ws->acc_v, kvd * sizeof(float));
        }
        g0 = g1;
    }
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
    return D2_OK;
}
