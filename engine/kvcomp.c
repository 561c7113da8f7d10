/*
 * engine/kvcomp.c — KV-cache compression (D2O, H2O, StreamingLLM, SnapKV,
 * PyramidKV) over the paged pool; contract in engine/kvcomp.h, method spec in
 * shared/design/d2o-spec.md. Also the public eng_kv_config helpers and
 * eng_kv_estimate_pages of engine/engine.h.
 *
 * Callers: the engine thread (sched.c, engine.c) and tests.
 *
 * One compression of a (sequence, layer), in this order so that a failure
 * leaves the table untouched:
 *   1. token scores (sum over KV heads of the pool's accumulated attention;
 *      SnapKV/PyramidKV smooth them with a 5-wide average);
 *   2. selection (eng_kv_select): sinks + heavy hitters + recent window;
 *   3. D2O only, read-only: every evicted token's nearest retained key by
 *      the mean over KV heads of the per-head cosine (= the dot product of the
 *      per-head-normalised concatenated keys divided by n_kv_heads), the EMA
 *      threshold tau, and which evicted tokens pass it;
 *   4. every page that steps 5-6 write is made private (kvp_unshare) — the
 *      only step that can fail (D2_EKVFULL), before anything is modified;
 *   5. D2O: merges of the passed tokens into their targets, in fp32, in place;
 *   6. kvp_compact(keep): kept slots move to the front, emptied pages return
 *      to the pool at once.
 * Merging never adds the evicted token's score to its target (as the code).
 */
#include "engine/kvcomp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "engine/cpu/matmul.h"
#include "engine/internal.h"

#define KV_MIN_RATIO 0.01f
#define PYRAMID_BETA 20.0f
#define SNAP_POOL_K 5

typedef struct cand { float s; int32_t i; } cand;

struct eng_kv_ws {
    int cap, n_kv, hd, kvd, pt;
    float *score, *pooled, *sim, *kn; /* kn: [cap][kvd] per-head-normalised keys */
    uint8_t *keep;
    cand *cand;
    int32_t *kept, *tgt, *order, *start;
    uint8_t *pass;
    float *acc_k, *acc_v;
};

/* ---- public configuration helpers ---------------------------------------------- */

static const char *const METHOD_NAMES[] = {"full", "d2o", "h2o", "streamingllm", "snapkv",
                                           "pyramidkv"};
#define N_METHODS ((int)(sizeof METHOD_NAMES / sizeof METHOD_NAMES[0]))

void eng_kv_config_default(eng_kv_config *c, eng_kv_method m) {
    memset(c, 0, sizeof *c);
    c->method = m;
    c->budget_frac = 0.2f;
    c->budget_tokens = 0;
    c->heavy_share = 0.5f;
    c->n_sink = 4;
    c->window = 32;
    c->ema_beta = 0.5f;
    c->merge_rule = ENG_KV_MERGE_NORMALISED;
    c->exact = false;
    /* keep_layers: none explicit (memset): the method's default */
}

int eng_kv_method_parse(const char *name) {
    if (!name) return -1;
    for (int i = 0; i < N_METHODS; i++)
        if (strcmp(name, METHOD_NAMES[i]) == 0) return i;
    if (strcmp(name, "streaming") == 0) return ENG_KV_STREAMINGLLM;
    return -1;
}

const char *eng_kv_method_name(eng_kv_method m) {
    return (int)m >= 0 && (int)m < N_METHODS ? METHOD_NAMES[m] : "unknown";
}

int eng_kv_config_validate(const eng_kv_config *c, const char **why) {
    const char *dummy;
    if (!why) why = &dummy;
    *why = NULL;
    if (!c) { *why = "kv: no configuration"; return D2_EINVAL; }
    if ((int)c->method < 0 || (int)c->method >= N_METHODS) {
        *why = "kv: unknown method";
        return D2_EINVAL;
    }
    if (c->method == ENG_KV_FULL) return D2_OK; /* a zeroed config is the full cache */
    if (c->budget_tokens < 0) { *why = "kv: budget_tokens must be >= 0"; return D2_EINVAL; }
    if (c->budget_tokens == 0 && !(c->budget_frac > 0.0f && c->budget_frac <= 1.0f)) {
        *why = "kv: budget fraction must be in (0, 1]";
        return D2_EINVAL;
    }
    if (!(c->heavy_share >= 0.0f && c->heavy_share <= 1.0f)) {
        *why = "kv: heavy_share must be in [0, 1]";
        return D2_EINVAL;
    }
    if (c->n_sink < 0 || c->n_sink > 1024) { *why = "kv: n_sink must be in [0, 1024]"; return D2_EINVAL; }
    if ((c->method == ENG_KV_SNAPKV || c->method == ENG_KV_PYRAMIDKV) &&
        (c->window < 1 || c->window > 65536)) {
        *why = "kv: window must be in [1, 65536]";
        return D2_EINVAL;
    }
    if (!(c->ema_beta >= 0.0f && c->ema_beta <= 1.0f)) {
        *why = "kv: ema_beta must be in [0, 1]";
        return D2_EINVAL;
    }
    if (c->merge_rule != ENG_KV_MERGE_NORMALISED && c->merge_rule != ENG_KV_MERGE_CODE) {
        *why = "kv: unknown merge rule";
        return D2_EINVAL;
    }
    return D2_OK;
}

void eng_kv_keep_layers_clear(eng_kv_config *c) {
    memset(c->keep_layers, 0, sizeof c->keep_layers);
    c->keep_layers_set = true;
}

void eng_kv_keep_layer_add(eng_kv_config *c, int l) {
    if (!c->keep_layers_set) eng_kv_keep_layers_clear(c);
    if (l < 0 || l >= ENG_MODEL_MAX_LAYERS) return;
    c->keep_layers[l / 64] |= 1ull << (l % 64);
}

bool eng_kv_layer_kept(const eng_kv_config *c, int n_layers, int l) {
    if (l < 0 || l >= n_layers || l >= ENG_MODEL_MAX_LAYERS) return false;
    if (c->keep_layers_set) return (c->keep_layers[l / 64] >> (l % 64)) & 1ull;
    /* method defaults: the official D2O code never compresses 0, 1 and L-1 */
    return c->method == ENG_KV_D2O && (l == 0 || l == 1 || l == n_layers - 1);
}

void eng_kv_keep_layers_resolve(eng_kv_config *c, int n_layers) {
    eng_kv_config r = *c;
    eng_kv_keep_layers_clear(&r);
    for (int l = 0; l < n_layers && l < ENG_MODEL_MAX_LAYERS; l++)
        if (eng_kv_layer_kept(c, n_layers, l)) eng_kv_keep_layer_add(&r, l);
    *c = r;
}

/* ---- budgets ------------------------------------------------------------------- */

static float rho_of(const eng_kv_config *c, int n) {
    float rho = c->budget_tokens > 0 ? (float)c->budget_tokens / (float)(n > 0 ? n : 1)
                                     : c->budget_frac;
    if (rho > 1.0f) rho = 1.0f;
    if (rho < 0.0f) rho = 0.0f;
    return rho;
}

static int uniform_budget(const eng_kv_config *c, int n) {
    int b = c->budget_tokens > 0 ? c->budget_tokens : (int)(c->budget_frac * (float)n);
    return b < 1 ? 1 : b;
}

void eng_kv_budgets(const eng_kv_config *c, int n_layers, const float *v, int n, int *heavy,
                    int *recent) {
    int C = uniform_budget(c, n);
    float rho = rho_of(c, n);
    /* D2O softmax(-v) over all layers (kept ones included: their share is not renormalised) */
    float vmin = 0.0f, zsum = 0.0f;
    if (c->method == ENG_KV_D2O) {
        vmin = v[0];
        for (int l = 1; l < n_layers; l++) if (v[l] < vmin) vmin = v[l];
        for (int l = 0; l < n_layers; l++) zsum += expf(-(v[l] - vmin));
    }
    int pw = c->window < C ? c->window : C;        /* PyramidKV window part */
    float pb = (float)(C - pw), pmin = pb / PYRAMID_BETA, pmax = 2.0f * pb - pmin;
    for (int l = 0; l < n_layers; l++) {
        int hh = -1, rec = -1;
        if (c->method == ENG_KV_FULL || eng_kv_layer_kept(c, n_layers, l)) {
            heavy[l] = recent[l] = -1;
            continue;
        }
        switch (c->method) {
        case ENG_KV_D2O: {
            float w = expf(-(v[l] - vmin)) / zsum;
            float r = (float)n_layers * rho * w;
            if (r < KV_MIN_RATIO) r = KV_MIN_RATIO;
            if (r > 1.0f) r = 1.0f;
            hh = (int)((float)n * r * c->heavy_share);
            rec = (int)((float)n * r * (1.0f - c->heavy_share));
            break;
        }
        case ENG_KV_H2O:
            hh = (int)((float)C * c->heavy_share);
            rec = C - hh;
            break;
        case ENG_KV_STREAMINGLLM:
            hh = c->n_sink < C ? c->n_sink : C;
            rec = C - hh;
            break;
        case ENG_KV_SNAPKV:
            rec = pw;
            hh = C - pw;
            break;
        case ENG_KV_PYRAMIDKV: {
            float b = n_layers > 1 ? pmax - (float)l * (pmax - pmin) / (float)(n_layers - 1) : pb;
            hh = (int)b;
            if (hh > n - pw) hh = n - pw;
            if (hh < 0) hh = 0;
            rec = pw;
            break;
        }
        default:
            break;
        }
        if (hh < 0) hh = 0;
        if (rec < 0) rec = 0;
        if (hh + rec < 1) rec = 1;
        heavy[l] = hh;
        recent[l] = rec;
    }
}

float eng_kv_d2o_layer_stat(const float *colsum, int n_heads, int len, int n) {
    if (n > len) n = len;
    if (n < 2 || n_heads <= 0) return 0.0f;
    double vmin = INFINITY, vmax = -INFINITY;
    double var[256];
    int nh = n_heads < 256 ? n_heads : 256;
    for (int h = 0; h < nh; h++) {
        const float *cs = colsum + (size_t)h * (size_t)len;
        double mean = 0.0;
        for (int j = 0; j < n; j++) mean += cs[j];
        mean /= n;
        double ss = 0.0;
        for (int j = 0; j < n; j++) ss += ((double)cs[j] - mean) * ((double)cs[j] - mean);
        var[h] = ss / (n - 1);
        if (var[h] < vmin) vmin = var[h];
        if (var[h] > vmax) vmax = var[h];
    }
    double acc = 0.0;
    for (int h = 0; h < nh; h++) acc += (var[h] - vmin) / (vmax - vmin + 1e-6);
    return (float)(acc / nh);
}

void eng_kv_pool_scores(const float *in, int n, float *out) {
    const int half = SNAP_POOL_K / 2;
    for (int i = 0; i < n; i++) {
        int a = i - half < 0 ? 0 : i - half, b = i + half >= n ? n - 1 : i + half;
        float s = 0.0f;
        for (int j = a; j <= b; j++) s += in[j];
        out[i] = s / (float)(b - a + 1);
    }
}

/* ---- workspace and state ---------------------------------------------------------------- */

int eng_kv_ws_create(const kvp_pool *pool, eng_kv_ws **out) {
    *out = NULL;
    const kvp_config *pc = kvp_get_config(pool);
    eng_kv_ws *ws = calloc(1, sizeof *ws);
    if (!ws) return D2_ENOMEM;
    ws->cap = pc->max_seq_tokens;
    ws->n_kv = pc->n_kv_heads;
    ws->hd = pc->head_dim;
    ws->kvd = pc->n_kv_heads * pc->head_dim;
    ws->pt = pc->page_tokens;
    size_t cap = (size_t)ws->cap;
    ws->score = malloc(cap * sizeof(float));
    ws->pooled = malloc(cap * sizeof(float));
    ws->sim = malloc(cap * sizeof(float));
    ws->kn = malloc(cap * (size_t)ws->kvd * sizeof(float));
    ws->keep = malloc(cap);
    ws->pass = malloc(cap);
    ws->cand = malloc(cap * sizeof(cand));
    ws->kept = malloc(cap * sizeof(int32_t));
    ws->tgt = malloc(cap * sizeof(int32_t));
    ws->order = malloc(cap * sizeof(int32_t));
    ws->start = malloc((cap + 1) * sizeof(int32_t));
    ws->acc_k = malloc((size_t)ws->kvd * sizeof(float));
    ws->acc_v = malloc((size_t)ws->kvd * sizeof(float));
    if (!ws->score || !ws->pooled || !ws->sim || !ws->kn || !ws->keep || !ws->pass || !ws->cand ||
        !ws->kept || !ws->tgt || !ws->order || !ws->start || !ws->acc_k || !ws->acc_v) {
        D2_ERROR("kvcomp: out of memory for a %d-token workspace", ws->cap);
        eng_kv_ws_free(ws);
        return D2_ENOMEM;
    }
    *out = ws;
    return D2_OK;
}

void eng_kv_ws_free(eng_kv_ws *ws) {
    if (!ws) return;
    free(ws->score); free(ws->pooled); free(ws->sim); free(ws->kn); free(ws->keep);
    free(ws->pass); free(ws->cand); free(ws->kept); free(ws->tgt); free(ws->order);
    free(ws->start); free(ws->acc_k); free(ws->acc_v);
    free(ws);
}

int eng_kv_state_create(const eng_kv_config *c, const eng_model_config *mc, int colsum_len,
                        eng_kv_state **out) {
    *out = NULL;
    const char *why;
    if (eng_kv_config_validate(c, &why) != D2_OK) return D2_EINVAL;
    eng_kv_state *s = calloc(1, sizeof *s);
    if (!s) return D2_ENOMEM;
    s->cfg = *c;
    eng_kv_keep_layers_resolve(&s->cfg, mc->n_layers);
    s->n_layers = mc->n_layers;
    s->n_heads = mc->n_heads;
    s->n_kv_heads = mc->n_kv_heads;
    size_t L = (size_t)mc->n_layers;
    s->heavy = malloc(L * sizeof(int));
    s->recent = malloc(L * sizeof(int));
    s->v_layer = calloc(L, sizeof(float));
    s->tau = calloc(L, sizeof(float));
    s->tau_set = calloc(L, 1);
    if (c->method == ENG_KV_D2O) {
        s->colsum_len = colsum_len > 0 ? colsum_len : 1;
        s->colsum = calloc(L * (size_t)mc->n_heads * (size_t)s->colsum_len, sizeof(float));
    }
    if (!s->heavy || !s->recent || !s->v_layer || !s->tau || !s->tau_set ||
        (c->method == ENG_KV_D2O && !s->colsum)) {
        eng_kv_state_free(s);
        return D2_ENOMEM;
    }
    eng_kv_state_reset(s);
    *out = s;
    return D2_OK;
}

void eng_kv_state_free(eng_kv_state *s) {
    if (!s) return;
    free(s->heavy); free(s->recent); free(s->v_layer); free(s->tau); free(s->tau_set);
    free(s->colsum);
    free(s);
}

void eng_kv_state_reset(eng_kv_state *s) {
    size_t L = (size_t)s->n_layers;
    s->compressed = false;
    s->prefill_len = 0;
    for (size_t l = 0; l < L; l++) s->heavy[l] = s->recent[l] = -1;
    memset(s->v_layer, 0, L * sizeof(float));
    memset(s->tau, 0, L * sizeof(float));
    memset(s->tau_set, 0, L);
    if (s->colsum)
        memset(s->colsum, 0, L * (size_t)s->n_heads * (size_t)s->colsum_len * sizeof(float));
}

bool eng_kv_wants_scores(const eng_kv_state *s) {
    switch (s->cfg.method) {
    case ENG_KV_D2O:
    case ENG_KV_H2O: return true;
    case ENG_KV_SNAPKV:
    case ENG_KV_PYRAMIDKV: return !s->compressed;
    default: return false;
    }
}

void eng_kv_plan_seq(const eng_kv_state *s, int prefill_end, eng_batch_seq *bs) {
    bs->want_scores = false;
    bs->score_from = 0;
    bs->colsum = NULL;
    bs->colsum_len = 0;
    if (!s) return;
    bs->want_scores = eng_kv_wants_scores(s);
    if (s->cfg.method == ENG_KV_D2O && !s->compressed) {
        bs->colsum = s->colsum;
        bs->colsum_len = s->colsum_len;
    }
    if ((s->cfg.method == ENG_KV_SNAPKV || s->cfg.method == ENG_KV_PYRAMIDKV) && !s->compressed) {
        int from = prefill_end - s->cfg.window;
        bs->score_from = from > 0 ? from : 0;
    }
}

/* ---- selection ------------------------------------------------------------------------ */

static int cand_cmp(const void *a, const void *b) {
    const cand *x = a, *y = b;
    if (x->s > y->s) return -1;
    if (x->s < y->s) return 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

int eng_kv_select(eng_kv_ws *ws, const float *score, int n, int n_sink, int heavy, int recent,
                  uint8_t *keep) {
    if (recent > n) recent = n;
    if (recent < 0) recent = 0;
    if (heavy < 0) heavy = 0;
    int lim = n - recent; /* candidates for sinks and heavy hitters: [0, lim) */
    memset(keep, 0, (size_t)n);
    for (int i = lim; i < n; i++) keep[i] = 1;
    int ns = n_sink < heavy ? n_sink : heavy;
    if (ns > lim) ns = lim;
    if (ns < 0) ns = 0;
    for (int i = 0; i < ns; i++) keep[i] = 1;
    int nh = heavy - ns, nc = lim - ns;
    if (nh >= nc) {
        for (int i = ns; i < lim; i++) keep[i] = 1;
    } else if (nh > 0) {
        for (int i = 0; i < nc; i++) ws->cand[i] = (cand){score[ns + i], ns + i};
        qsort(ws->cand, (size_t)nc, sizeof(cand), cand_cmp);
        for (int i = 0; i < nh; i++) keep[ws->cand[i].i] = 1;
    }
    int m = 0;
    for (int i = 0; i < n; i++) m += keep[i];
    return m;
}

/* ---- one layer ----------------------------------------------------------------------------- */

static float *slot_ptr(float *base, size_t stride, const kvp_table *t, int pt, int kvd, int i) {
    return base + (size_t)t->pages[i / pt] * stride + (size_t)(i % pt) * (size_t)kvd;
}

int eng_kv_compress_layer(eng_kv_ws *ws, kvp_pool *pool, int seq, int layer, eng_kv_state *s,
                          int heavy, int recent, bool first) {
    if (heavy < 0 || recent < 0) return 0;
    kvp_table tab = kvp_get_table(pool, seq, layer);
    int n = tab.n_tokens, pt = ws->pt, kvd = ws->kvd, n_kv = ws->n_kv, hd = ws->hd;
    if (n <= heavy + recent) return 0;
    if (n > ws->cap) return D2_EINVAL;
    eng_kv_method m = s->cfg.method;
    size_t stride = kvp_page_stride(pool);

    /* 1. scores */
    const float *sb = kvp_score_base(pool);
    for (int i = 0; i < n; i++) {
        size_t slot = (size_t)tab.pages[i / pt] * (size_t)pt + (size_t)(i % pt);
        float acc = 0.0f;
        for (int g = 0; g < n_kv; g++) acc += sb[slot * (size_t)n_kv + (size_t)g];
        ws->score[i] = acc;
    }
    const float *score = ws->score;
    int n_sink = s->cfg.n_sink;
    if (m == ENG_KV_SNAPKV || m == ENG_KV_PYRAMIDKV) {
        eng_kv_pool_scores(ws->score, n, ws->pooled);
        score = ws->pooled;
        n_sink = 0;
    }

    /* 2. selection */
    int kept = eng_kv_select(ws, score, n, n_sink, heavy, recent, ws->keep);
    int n_ev = n - kept;
    if (n_ev == 0) return 0;

    /* 3. D2O matching (read-only) */
    int n_pass = 0;
    float *kb = kvp_k_base(pool), *vb = kvp_v_base(pool);
    if (m == ENG_KV_D2O) {
        int nk = 0;
        for (int i = 0; i < n; i++) {
            const float *k = slot_ptr(kb, stride, &tab, pt, kvd, i);
            float *kn = ws->kn + (size_t)i * (size_t)kvd;
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
            const float *ke = ws->kn + (size_t)e * (size_t)kvd;
            float best = -INFINITY;
            int bt = -1;
            for (int j = 0; j < nk; j++) {
                float u = eng_dot_f32(ke, ws->kn + (size_t)ws->kept[j] * (size_t)kvd, kvd) * inv_h;
                if (u > best) { best = u; bt = ws->kept[j]; }
            }
            ws->tgt[e] = bt;
            ws->sim[e] = best;
            ssum += best;
        }
        float st = (float)(ssum / n_ev);
        float tau;
        if (first || !s->tau_set[layer]) tau = st;
        else tau = (1.0f - s->cfg.ema_beta) * s->tau[layer] + s->cfg.ema_beta * st;
        s->tau[layer] = tau;
        s->tau_set[layer] = 1;
        for (int e = 0; e < n; e++) {
            ws->pass[e] = !ws->keep[e] && ws->tgt[e] >= 0 && ws->sim[e] >= tau;
            n_pass += ws->pass[e];
        }
    }

    /* 4. make private every page that will be written */
    int first_gap = 0;
    while (first_gap < n && ws->keep[first_gap]) first_gap++;
    for (int q = first_gap / pt; q <= (kept - 1) / pt && kept > first_gap; q++) {
        int rc = kvp_unshare(pool, seq, layer, q * pt);
        if (rc) return rc;
    }
    if (n_pass > 0) {
        for (int e = 0; e < n; e++) {
            if (!ws->pass[e]) continue;
            int rc = kvp_unshare(pool, seq, layer, ws->tgt[e]);
            if (rc) return rc;
        }
        tab = kvp_get_table(pool, seq, layer); /* page ids may have changed */
    }

    /* 5. merges, grouped by target (counting sort) */
    if (n_pass > 0) {
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
                float *kc = slot_ptr(kb, stride, &tab, pt, kvd, c);
                float *vc = slot_ptr(vb, stride, &tab, pt, kvd, c);
                float wc, denom = 1.0f;
                if (s->cfg.merge_rule == ENG_KV_MERGE_NORMALISED) {
                    denom = self_e;
                    for (int j = g0; j < g1; j++) denom += expf(ws->sim[ws->order[j]]);
                    wc = self_e / denom;
                } else {
                    denom = 1.0f + (float)cnt;
                    wc = 1.0f / denom;
                }
                for (int d = 0; d < kvd; d++) {
                    ws->acc_k[d] = wc * kc[d];
                    ws->acc_v[d] = wc * vc[d];
                }
                for (int j = g0; j < g1; j++) {
                    int e = ws->order[j];
                    float we = s->cfg.merge_rule == ENG_KV_MERGE_NORMALISED
                                   ? expf(ws->sim[e]) / denom
                                   : ws->sim[e] / denom;
                    const float *ke = slot_ptr(kb, stride, &tab, pt, kvd, e);
                    const float *ve = slot_ptr(vb, stride, &tab, pt, kvd, e);
                    for (int d = 0; d < kvd; d++) {
                        ws->acc_k[d] += we * ke[d];
                        ws->acc_v[d] += we * ve[d];
                    }
                }
                memcpy(kc, ws->acc_k, (size_t)kvd * sizeof(float));
                memcpy(vc, ws->acc_v, (size_t)kvd * sizeof(float));
            }
            g0 = g1;
        }
    }

    /* 6. compaction */
    int before = tab.n_pages;
    int rc = kvp_compact(pool, seq, layer, ws->keep);
    if (rc < 0) {
        D2_ERROR("kvcomp: compaction of seq %d layer %d failed after its pages were made "
                 "private: %s", seq, layer, d2_strerror(rc));
        return rc;
    }
    int after = kvp_pages_for_tokens(pool, rc);
    s->n_evicted += n_ev;
    s->n_merged += n_pass;
    if (before > after) s->n_pages_freed += before - after;
    return n_ev;
}

/* ---- whole sequence ------------------------------------------------------------------------- */

int eng_kv_compress_prompt(eng_kv_ws *ws, kvp_pool *pool, int seq, eng_kv_state *s) {
    if (s->cfg.method == ENG_KV_FULL) {
        s->compressed = true;
        return D2_OK;
    }
    int n = kvp_get_table(pool, seq, 0).n_tokens;
    if (s->cfg.method == ENG_KV_D2O) {
        for (int l = 0; l < s->n_layers; l++)
            s->v_layer[l] = eng_kv_d2o_layer_stat(
                s->colsum + (size_t)l * (size_t)s->n_heads * (size_t)s->colsum_len, s->n_heads,
                s->colsum_len, n);
    }
    eng_kv_budgets(&s->cfg, s->n_layers, s->v_layer, n, s->heavy, s->recent);
    for (int l = 0; l < s->n_layers; l++) {
        if (s->heavy[l] < 0) continue;
        int rc = eng_kv_compress_layer(ws, pool, seq, l, s, s->heavy[l], s->recent[l], true);
        if (rc < 0) return rc;
    }
    s->compressed = true;
    s->prefill_len = n;
    return D2_OK;
}

int eng_kv_after_decode(eng_kv_ws *ws, kvp_pool *pool, int seq, eng_kv_state *s) {
    if (!s->compressed) return D2_OK;
    eng_kv_method m = s->cfg.method;
    if (m != ENG_KV_D2O && m != ENG_KV_H2O && m != ENG_KV_STREAMINGLLM) return D2_OK;
    for (int l = 0; l < s->n_layers; l++) {
        if (s->heavy[l] < 0) continue;
        int C = s->heavy[l] + s->recent[l];
        int n = kvp_get_table(pool, seq, l).n_tokens;
        bool go = s->cfg.exact ? n > C : n >= C + ws->pt;
        if (!go) continue;
        int rc = eng_kv_compress_layer(ws, pool, seq, l, s, s->heavy[l], s->recent[l], false);
        if (rc < 0) return rc;
    }
    return D2_OK;
}

/* ---- page estimates ------------------------------------------------------------------------ */

eng_kv_estimate eng_kv_estimate_pages(const eng_engine *e, const eng_kv_config *c, int n_prompt,
                                      int max_tokens) {
    eng_kv_estimate est = {0, 0, 0};
    int L = e->model->cfg.n_layers;
    int pt = kvp_get_config(e->pool)->page_tokens;
    int64_t N = n_prompt > 0 ? n_prompt : 0;
    int64_t longest = N + (max_tokens > 0 ? max_tokens : 0);
    if (longest > e->ctx_len) longest = e->ctx_len;
    int64_t full_prompt = (int64_t)L * eng__pages_for(N, pt);
    int64_t full_longest = (int64_t)L * eng__pages_for(longest, pt);
    if (!c || c->method == ENG_KV_FULL || eng_kv_config_validate(c, NULL) != D2_OK) {
        est.pages_after_prefill = full_prompt;
        est.pages_peak = full_prompt;
        est.pages_longest = full_longest;
        return est;
    }
    int nk = 0;
    for (int l = 0; l < L; l++) nk += eng_kv_layer_kept(c, L, l);
    int nc = L - nk;
    /* tokens all compressed layers keep together right after the prompt compression */
    int64_t tok_c;
    if (c->method == ENG_KV_D2O) {
        /* sum over compressed layers of n*r_l <= n*L*rho (softmax shares sum to 1) */
        tok_c = (int64_t)((double)N * (double)L * (double)rho_of(c, (int)N) + 0.5);
    } else if (c->method == ENG_KV_PYRAMIDKV) {
        tok_c = (int64_t)nc * uniform_budget(c, (int)N) + nc; /* mean budget, rounding */
    } else {
        tok_c = (int64_t)nc * uniform_budget(c, (int)N);
    }
    if (tok_c > (int64_t)nc * N) tok_c = (int64_t)nc * N;
    int64_t pages_c = (tok_c + pt - 1) / pt + nc; /* + rounding of each layer */
    if (pages_c > (int64_t)nc * eng__pages_for(N, pt)) pages_c = (int64_t)nc * eng__pages_for(N, pt);
    int64_t kept_prompt = (int64_t)nk * eng__pages_for(N, pt);
    est.pages_after_prefill = kept_prompt + pages_c;
    int64_t grow_c;
    if (c->method == ENG_KV_SNAPKV || c->method == ENG_KV_PYRAMIDKV)
        grow_c = (tok_c + (int64_t)nc * (longest - N) + pt - 1) / pt + nc;
    else
        grow_c = pages_c + nc; /* page-batched eviction overshoots by < one page per layer */
    if (grow_c > (int64_t)nc * eng__pages_for(longest, pt)) grow_c = (int64_t)nc * eng__pages_for(longest, pt);
    est.pages_longest = (int64_t)nk * eng__pages_for(longest, pt) + grow_c;
    est.pages_peak = full_prompt > est.pages_longest ? full_prompt : est.pages_longest;
    return est;
}
