/*
 * engine/kvcomp.c — the policy of KV-cache compression (D2O, H2O,
 * StreamingLLM, SnapKV, PyramidKV) over the paged pool: per-layer budgets,
 * D2O's layer statistic and EMA threshold, kept layers, and when to compress;
 * contract in engine/kvcomp.h, method spec in shared/design/d2o-spec.md. The
 * mechanism runs in the backend, where the KV payload lives
 * (eng_backend_ops.kv_compress; the CPU one is engine/cpu/kvcomp.c). Also the
 * public eng_kv_config helpers and eng_kv_estimate_pages of engine/engine.h.
 *
 * Callers: the engine thread (step.c, run.c) and tests.
 *
 * One compression of a (sequence, layer), as the backend runs it, in this
 * order so that a failure leaves the table untouched:
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
 * Granularity head runs steps 1-6 per KV head (engine/backend.h, per_head).
 */
#include "engine/kvcomp.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "engine/internal.h"

#define KV_MIN_RATIO 0.01f
#define PYRAMID_BETA 20.0f

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

int eng_kv_granularity_parse(const char *name) {
    if (!name) return -1;
    if (!strcmp(name, "layer")) return ENG_KV_GRAN_LAYER;
    if (!strcmp(name, "head")) return ENG_KV_GRAN_HEAD;
    return -1;
}

const char *eng_kv_granularity_name(eng_kv_granularity g) {
    return g == ENG_KV_GRAN_HEAD ? "head" : g == ENG_KV_GRAN_LAYER ? "layer" : "unknown";
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
    if (c->granularity != ENG_KV_GRAN_LAYER && c->granularity != ENG_KV_GRAN_HEAD) {
        *why = "kv: granularity must be layer or head";
        return D2_EINVAL;
    }
    return D2_OK;
}

int eng_kv_preset_apply(eng_kv_config *c, const char *name, const char **why) {
    const char *dummy;
    if (!why) why = &dummy;
    *why = NULL;
    if (!name || !strcmp(name, "default")) return D2_OK;
    if (!strcmp(name, "official")) {
        if (c->method != ENG_KV_D2O) {
            *why = "kv: preset 'official' applies to method d2o";
            return D2_EINVAL;
        }
        c->merge_rule = ENG_KV_MERGE_CODE;
        c->exact = true;
        c->granularity = ENG_KV_GRAN_HEAD;
        c->heavy_share = 0.5f;
        c->n_sink = 4;
        c->ema_beta = 0.5f;
        c->keep_layers_set = false; /* the method default: 0, 1, L-1 */
        return D2_OK;
    }
    *why = "kv: unknown preset (known: default, official)";
    return D2_EINVAL;
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
    /* SnapKV/PyramidKV: the kept recent part is the observation window, but
     * at most half the budget (rounded up), so that budgets at or below the
     * window still keep heavy hitters chosen by the window's attention (the
     * window queries that score are `window` in every case, eng_kv_plan_seq). */
    int pw = c->window < (C + 1) / 2 ? c->window : (C + 1) / 2;
    /* PyramidKV (its original allocation): the non-window budget B per layer
     * falls linearly from max = 2B - B/beta to min = B/beta; when max exceeds
     * what a layer can hold (n - window) it is clipped and min is raised to
     * 2B - max, so that the layers still spend L x B between them. */
    float pb = (float)(C - pw), pmin = pb / PYRAMID_BETA, pmax = 2.0f * pb - pmin;
    float pcap = (float)(n - pw > 0 ? n - pw : 0);
    if (pmax > pcap) {
        pmax = pcap;
        pmin = 2.0f * pb - pmax;
        if (pmin > pmax) pmin = pmax;
    }
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

/* ---- workspace and state ---------------------------------------------------------------- */

/* The threshold callback's context: one (sequence state, layer) compression. */
typedef struct eng_kv_tau_ctx { eng_kv_state *s; int layer; bool first; } tau_ctx;

int eng_kv_state_create(const eng_kv_config *c, const eng_model_config *mc, eng_kv_state **out) {
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
    s->rep = calloc(L, sizeof *s->rep);
    s->rq = calloc(L, sizeof *s->rq);
    s->rs = calloc(L, sizeof *s->rs);
    s->tc = calloc(L, sizeof *s->tc);
    s->layer_list = calloc(L, sizeof(int));
    if (!s->heavy || !s->recent || !s->v_layer || !s->tau || !s->tau_set || !s->rep || !s->rq ||
        !s->rs || !s->tc || !s->layer_list) {
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
    free(s->colsum); free(s->rep);
    free(s->rq); free(s->rs); free(s->tc); free(s->layer_list);
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
    memset(s->rep, 0, L * sizeof *s->rep);
    s->live_sum = s->live_peak = 0;
    s->live_samples = 0;
    eng_kv_colsum_release(s);
}

void eng_kv_track(eng_kv_state *s, const kvp_pool *pool, int seq) {
    double live = 0;
    for (int l = 0; l < s->n_layers; l++) live += kvp_get_table(pool, seq, l).n_tokens;
    s->live_sum += live;
    if (live > s->live_peak) s->live_peak = live;
    s->live_samples++;
}

void eng_kv_report_fill(eng_kv_state *s, const kvp_pool *pool, int seq, size_t bytes_per_slot,
                        eng_kv_report *out) {
    int L = s->n_layers;
    for (int l = 0; l < L; l++) {
        eng_kv_layer_report *r = &s->rep[l];
        r->stat = s->v_layer[l];
        r->heavy = s->heavy[l];
        r->recent = s->recent[l];
        r->live = seq >= 0 ? kvp_get_table(pool, seq, l).n_tokens : 0;
        r->tau = s->tau_set[l] ? s->tau[l] : NAN;
    }
    *out = (eng_kv_report){
        .method = s->cfg.method,
        .n_layers = L,
        .prefill_len = s->compressed ? s->prefill_len : 0,
        .layers = s->rep,
        .kv_tokens_mean = s->live_samples ? s->live_sum / (double)s->live_samples / L : 0,
        .kv_tokens_peak = s->live_peak / L,
        .kv_samples = s->live_samples,
        .kv_bytes_per_token = (int64_t)bytes_per_slot * L,
    };
}

size_t eng_kv_prefill_bytes(const eng_kv_config *c, const eng_model_config *mc, int prefill_len) {
    if (!c || c->method != ENG_KV_D2O || prefill_len <= 0) return 0;
    return (size_t)mc->n_layers * (size_t)mc->n_heads * (size_t)prefill_len * sizeof(float);
}

int eng_kv_prefill_begin(eng_kv_state *s, int prefill_len) {
    eng_kv_state_reset(s);
    if (s->cfg.method != ENG_KV_D2O) return D2_OK;
    s->colsum_len = prefill_len > 0 ? prefill_len : 1;
    s->colsum = calloc((size_t)s->n_layers * (size_t)s->n_heads * (size_t)s->colsum_len,
                       sizeof(float));
    if (!s->colsum) {
        s->colsum_len = 0;
        return D2_ENOMEM;
    }
    return D2_OK;
}

void eng_kv_colsum_release(eng_kv_state *s) {
    free(s->colsum);
    s->colsum = NULL;
    s->colsum_len = 0;
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
    if (s->cfg.method == ENG_KV_D2O && !s->compressed && s->colsum) {
        bs->colsum = s->colsum;
        bs->colsum_len = s->colsum_len;
    }
    if ((s->cfg.method == ENG_KV_SNAPKV || s->cfg.method == ENG_KV_PYRAMIDKV) && !s->compressed) {
        int from = prefill_end - s->cfg.window;
        bs->score_from = from > 0 ? from : 0;
    }
}

/* ---- selection ------------------------------------------------------------------------ */

/* ---- one layer ----------------------------------------------------------------------------- */

/* D2O's threshold: the mean similarity of the first compression, then an EMA
 * with weight ema_beta on each new mean (per sequence and layer). The same
 * formula travels as data in the request (tau_ema) for backends that compute
 * it on the device. */
static float d2o_threshold(void *user, float mean_sim) {
    tau_ctx *t = user;
    eng_kv_state *s = t->s;
    float tau;
    if (t->first || !s->tau_set[t->layer]) tau = mean_sim;
    else tau = (1.0f - s->cfg.ema_beta) * s->tau[t->layer] + s->cfg.ema_beta * mean_sim;
    s->tau[t->layer] = tau;
    s->tau_set[t->layer] = 1;
    return tau;
}

static void req_fill(eng_kv_state *s, int seq, int layer, int heavy, int recent, bool first,
                     tau_ctx *tc, eng_kv_compress_req *rq) {
    eng_kv_method m = s->cfg.method;
    bool snap = m == ENG_KV_SNAPKV || m == ENG_KV_PYRAMIDKV;
    *tc = (tau_ctx){s, layer, first};
    *rq = (eng_kv_compress_req){
        .seq = seq, .layer = layer, .heavy = heavy, .recent = recent,
        .n_sink = snap ? 0 : s->cfg.n_sink,
        .pooled = snap,
        .merge = m == ENG_KV_D2O,
        .merge_code_rule = s->cfg.merge_rule == ENG_KV_MERGE_CODE,
        .per_head = s->cfg.granularity == ENG_KV_GRAN_HEAD,
        .threshold = d2o_threshold, .user = tc,
        .tau_ema = true, .tau_first = first || !s->tau_set[layer],
        .ema_beta = s->cfg.ema_beta, .tau_prev = s->tau[layer],
    };
}

/* Counts a compression's result (the threshold is kept here as well: a
 * backend computing it from tau_ema does not call d2o_threshold). */
static void res_apply(eng_kv_state *s, const eng_kv_compress_req *rq, const eng_kv_compress_res *res) {
    s->n_evicted += res->n_evicted;
    s->n_merged += res->n_merged;
    s->n_pages_freed += res->pages_freed;
    if (rq->merge && res->n_evicted > 0) {
        s->tau[rq->layer] = res->tau;
        s->tau_set[rq->layer] = 1;
    }
}

int eng_kv_compress_layer(eng_backend *be, int seq, int layer, eng_kv_state *s, int heavy,
                          int recent, bool first) {
    if (heavy < 0 || recent < 0) return 0;
    tau_ctx tc;
    eng_kv_compress_req rq;
    req_fill(s, seq, layer, heavy, recent, first, &tc, &rq);
    eng_kv_compress_res res;
    int rc = be->ops->kv_compress(be, &rq, &res);
    if (rc < 0) return rc;
    res_apply(s, &rq, &res);
    return res.n_evicted;
}

/* Compresses layers[0..n) of seq to their budgets, in order: one
 * kv_compress_layers call when the backend has it (a device backend then
 * synchronises once for all of them), else kv_compress per layer. */
static int compress_layers(eng_backend *be, int seq, eng_kv_state *s, const int *layers, int n,
                           bool first) {
    if (n <= 0) return D2_OK; /* n > 0 below: also tells gcc the memset bound is positive */
    if (!be->ops->kv_compress_layers) {
        for (int i = 0; i < n; i++) {
            int l = layers[i];
            int64_t m0 = s->n_merged;
            int rc = eng_kv_compress_layer(be, seq, l, s, s->heavy[l], s->recent[l], first);
            if (rc < 0) return rc;
            s->rep[l].evicted += rc;
            s->rep[l].merged += s->n_merged - m0;
        }
        return D2_OK;
    }
    for (int i = 0; i < n; i++) {
        int l = layers[i];
        req_fill(s, seq, l, s->heavy[l], s->recent[l], first, &s->tc[i], &s->rq[i]);
    }
    memset(s->rs, 0, (size_t)n * sizeof *s->rs);
    int rc = be->ops->kv_compress_layers(be, s->rq, n, s->rs);
    for (int i = 0; i < n; i++) {
        res_apply(s, &s->rq[i], &s->rs[i]);
        s->rep[layers[i]].evicted += s->rs[i].n_evicted;
        s->rep[layers[i]].merged += s->rs[i].n_merged;
    }
    return rc < 0 ? rc : D2_OK;
}

/* ---- whole sequence ------------------------------------------------------------------------- */

int eng_kv_compress_prompt(eng_backend *be, int seq, eng_kv_state *s) {
    kvp_pool *pool = be->pool;
    int n = kvp_get_table(pool, seq, 0).n_tokens;
    if (s->cfg.method == ENG_KV_FULL) {
        s->compressed = true;
        s->prefill_len = n;
        for (int l = 0; l < s->n_layers; l++) s->rep[l].kept_prompt = n;
        return D2_OK;
    }
    /* D2O: the layer statistics come from the prefill's column sums, which
     * are dead afterwards and go at once. A compression retried after
     * D2_EKVFULL keeps the statistics of the first attempt. */
    if (s->cfg.method == ENG_KV_D2O && s->colsum) {
        for (int l = 0; l < s->n_layers; l++)
            s->v_layer[l] = eng_kv_d2o_layer_stat(
                s->colsum + (size_t)l * (size_t)s->n_heads * (size_t)s->colsum_len, s->n_heads,
                s->colsum_len, n);
        eng_kv_colsum_release(s);
    }
    eng_kv_budgets(&s->cfg, s->n_layers, s->v_layer, n, s->heavy, s->recent);
    int *layers = s->layer_list, nl = 0;
    for (int l = 0; l < s->n_layers; l++)
        if (s->heavy[l] >= 0) layers[nl++] = l;
    int rc = compress_layers(be, seq, s, layers, nl, true);
    if (rc < 0) return rc;
    for (int l = 0; l < s->n_layers; l++) s->rep[l].kept_prompt = kvp_get_table(pool, seq, l).n_tokens;
    s->compressed = true;
    s->prefill_len = n;
    return D2_OK;
}

int eng_kv_after_decode(eng_backend *be, int seq, eng_kv_state *s) {
    kvp_pool *pool = be->pool;
    int pt = kvp_get_config(pool)->page_tokens;
    if (!s->compressed) return D2_OK;
    eng_kv_method m = s->cfg.method;
    if (m != ENG_KV_D2O && m != ENG_KV_H2O && m != ENG_KV_STREAMINGLLM) return D2_OK;
    int *layers = s->layer_list, nl = 0;
    for (int l = 0; l < s->n_layers; l++) {
        if (s->heavy[l] < 0) continue;
        int C = s->heavy[l] + s->recent[l];
        int n = kvp_get_table(pool, seq, l).n_tokens;
        bool go = s->cfg.exact ? n > C : n >= C + pt;
        if (go) layers[nl++] = l;
    }
    return compress_layers(be, seq, s, layers, nl, false);
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
