/*
 * engine/run.c — drivers on top of the scheduler and the step mechanism:
 * eng_run (the scheduler of sched.c in manual mode, used by `d2od generate`,
 * the benchmarks and tests), eng_score (teacher-forced NLL for `d2od
 * perplexity`) and eng_score_kv (the same with the cache compressed as during
 * generation). Contracts in engine/engine.h.
 *
 * Callers: whichever thread drives the engine at the time (it becomes the
 * engine thread: the backend attaches to it on the first step).
 */
#include <math.h>
#include <stdlib.h>

#include "common/log.h"
#include "engine/engine.h"
#include "engine/internal.h"
#include "engine/kvcomp.h"

/* ---- eng_run: the scheduler in manual mode ---------------------------------- */

static int run_on_event(void *user, const eng_event *ev) {
    eng_gen_seq *s = user;
    if (ev->type == ENG_EV_TOKEN) {
        if (s->out_tokens && s->n_out < s->max_tokens) s->out_tokens[s->n_out] = ev->token;
        s->n_out++;
        if (s->n_out == 1) s->t_first_token = ev->t_first_token;
        return s->on_token ? s->on_token(s->user, ev->token, ev->res) : 0;
    }
    s->finish = ev->finish;
    s->status = ev->status;
    s->t_done = ev->t_done;
    return 0;
}

int eng_run(eng_engine *e, eng_gen_seq *seqs, int n) {
    eng_sched *s = NULL;
    eng_sched_config sc = {.max_queue = n > 0 ? n : 1};
    int rc = eng_sched_create(e, &sc, &s);
    if (rc != D2_OK) return rc;
    for (int i = 0; i < n; i++) {
        eng_gen_seq *g = &seqs[i];
        g->n_out = 0;
        g->finish = ENG_FINISH_NONE;
        g->status = D2_OK;
        g->t_first_token = g->t_done = 0;
        if (g->max_tokens <= 0) {
            g->finish = ENG_FINISH_LENGTH;
            continue;
        }
        eng_request r = {.prompt = g->prompt, .n_prompt = g->n_prompt, .max_tokens = g->max_tokens,
                         .want_logprobs = true, /* on_token callers may read them */
                         .sample = g->sample, .ignore_eos = g->ignore_eos,
                         .on_event = run_on_event, .user = g};
        uint64_t id;
        const char *why = NULL;
        int src = eng_sched_submit(s, &r, &id, &why);
        if (src != D2_OK) {
            g->finish = ENG_FINISH_ERROR;
            g->status = src;
            if (why) D2_WARN("engine: sequence %d rejected: %s", i, why);
        }
    }
    for (;;) {
        rc = eng_sched_step(s);
        if (rc <= 0) break;
    }
    eng_sched_destroy(s);
    return rc < 0 ? rc : D2_OK;
}

/* ---- eng_score ---------------------------------------------------------------- */

static double log_softmax_at(const float *lg, int n_vocab, int idx) {
    float mx = lg[0];
    for (int v = 1; v < n_vocab; v++)
        if (lg[v] > mx) mx = lg[v];
    double sum = 0;
    for (int v = 0; v < n_vocab; v++) sum += exp((double)lg[v] - mx);
    return (double)lg[idx] - mx - log(sum);
}

/* Scores the logit rows of the last step: row j predicts ids[t0 + j + 1]. */
static int score_rows(eng_engine *e, const int32_t *ids, int n, int t0, int rows, double *nll,
                      double *nll_sum) {
    int vocab = e->model->cfg.vocab_size;
    for (int j = 0; j < rows; j++) {
        int t = t0 + j; /* this row predicts ids[t+1] */
        if (t + 1 >= n) break;
        const float *lg;
        int rc = eng__step_logits(e, j, &lg);
        if (rc != D2_OK) return rc;
        double lp = log_softmax_at(lg, vocab, ids[t + 1]);
        if (nll) nll[t] = -lp;
        *nll_sum += -lp;
    }
    return D2_OK;
}

static int check_ids(const eng_engine *e, const int32_t *ids, int n) {
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= e->model->cfg.vocab_size) return D2_EINVAL;
    return D2_OK;
}

int eng_score(eng_engine *e, const int32_t *ids, int n, double *nll, double *nll_sum) {
    *nll_sum = 0;
    if (n < 2) return D2_OK;
    if (check_ids(e, ids, n) != D2_OK) return D2_EINVAL;
    eng_plan p;
    int rc = eng__plan_init(&p, e);
    if (rc != D2_OK) return rc;
    int chunk = e->max_logit_rows < e->max_batch_tokens ? e->max_logit_rows : e->max_batch_tokens;
    for (int w0 = 0; w0 < n - 1 && rc == D2_OK; w0 += e->ctx_len) {
        int wn = n - w0 < e->ctx_len ? n - w0 : e->ctx_len;
        int seq;
        rc = kvp_seq_new(e->pool, &seq);
        if (rc != D2_OK) break;
        for (int c0 = 0; c0 < wn && rc == D2_OK; c0 += chunk) {
            int cn = wn - c0 < chunk ? wn - c0 : chunk;
            eng__plan_reset(&p);
            eng__plan_add(&p, seq, ids + w0 + c0, cn, c0, true, true);
            rc = eng__step_execute(e, &p);
            if (rc == D2_OK) rc = score_rows(e, ids, n, w0 + c0, cn, nll, nll_sum);
        }
        kvp_seq_free(e->pool, seq);
    }
    eng__plan_free(&p);
    return rc;
}

/* ---- eng_score_kv ----------------------------------------------------------------
 *
 * One window of the context length at a time, each on a fresh sequence and a
 * fresh compression state: the first `prefill` tokens of the window run as a
 * chunked prefill (scores and D2O column sums accumulated as the scheduler
 * would), the prompt compression runs, then every later token is one decode
 * step followed by decode-time eviction — the model sees exactly what the
 * method kept, as during generation. */

#define ENG_SCORE_KV_PREFILL 64 /* default prefill when the caller passes 0 */

static int score_kv_window(eng_engine *e, eng_plan *pl, const int32_t *ids, int n, int w0,
                           int wn, eng_kv_state *ks, int prefill, double *nll, double *nll_sum) {
    int chunk = e->max_logit_rows < e->max_batch_tokens ? e->max_logit_rows : e->max_batch_tokens;
    int seq;
    int rc = kvp_seq_new(e->pool, &seq);
    if (rc != D2_OK) return rc;
    int p = prefill < wn ? prefill : wn;
    rc = eng_kv_prefill_begin(ks, p);
    if (rc != D2_OK) {
        kvp_seq_free(e->pool, seq);
        return rc;
    }
    for (int c0 = 0; c0 < wn; ) {
        bool in_prefill = c0 < p;
        int cn = in_prefill ? (p - c0 < chunk ? p - c0 : chunk) : 1;
        eng__plan_reset(pl);
        eng_batch_seq *bs = eng__plan_add(pl, seq, ids + w0 + c0, cn, c0, true, true);
        eng_kv_plan_seq(ks, p, bs);
        rc = eng__step_execute(e, pl);
        if (rc == D2_OK) rc = score_rows(e, ids, n, w0 + c0, cn, nll, nll_sum);
        if (rc != D2_OK) break;
        c0 += cn;
        rc = eng__step_compress(e, seq, ks, c0, p);
        if (rc != D2_OK) break;
    }
    kvp_seq_free(e->pool, seq);
    return rc;
}

int eng_score_kv(eng_engine *e, const int32_t *ids, int n, const eng_kv_config *kv, int prefill,
                 double *nll, double *nll_sum) {
    if (!kv || kv->method == ENG_KV_FULL) return eng_score(e, ids, n, nll, nll_sum);
    const eng_model_config *mc = &e->model->cfg;
    const char *why = NULL;
    *nll_sum = 0;
    if (eng_kv_config_validate(kv, &why) != D2_OK) {
        D2_ERROR("engine: eng_score_kv: %s", why ? why : "bad KV configuration");
        return D2_EINVAL;
    }
    if (kv->granularity == ENG_KV_GRAN_HEAD && !e->caps.kv_per_head) {
        D2_ERROR("engine: eng_score_kv: granularity head is not implemented by the %s backend",
                 e->caps.name);
        return D2_EINVAL;
    }
    if (prefill < 0) return D2_EINVAL;
    if (prefill == 0) prefill = ENG_SCORE_KV_PREFILL;
    if (n < 2) return D2_OK;
    if (check_ids(e, ids, n) != D2_OK) return D2_EINVAL;
    eng_kv_state *ks = NULL;
    int rc = eng_kv_state_create(kv, mc, &ks);
    if (rc != D2_OK) return rc;
    eng_plan pl;
    rc = eng__plan_init(&pl, e);
    for (int w0 = 0; w0 < n - 1 && rc == D2_OK; w0 += e->ctx_len) {
        int wn = n - w0 < e->ctx_len ? n - w0 : e->ctx_len;
        rc = score_kv_window(e, &pl, ids, n, w0, wn, ks, prefill, nll, nll_sum);
    }
    eng__plan_free(&pl);
    /* a window that stopped early may leave its column sums pending */
    if (ks->colsum) (void)eng__step_sync(e);
    eng_kv_state_free(ks);
    return rc;
}
