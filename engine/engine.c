/*
 * engine/engine.c — the engine object and its generation loops.
 *
 * eng_run() is the continuous-batching loop used by `d2od generate`, the
 * benchmarks and (through the scheduler) the daemon: each step puts one
 * decode token for every running sequence first, then fills the rest of the
 * token budget with prefill chunks of admitted sequences, runs the backend
 * once, samples for every sequence that produced logits, and retires
 * finished sequences at once so their pages go back to the pool.
 *
 * Admission is by KV pages: a sequence is admitted only when the pool can
 * hold its longest possible length (prompt + max_tokens, capped by the
 * context) next to everything already admitted, so a step never runs out of
 * pages. (Preemption under pressure belongs to the daemon's scheduler.)
 *
 * Only the engine thread calls into this file. Step buffers are allocated
 * once in eng_engine_create; the loop allocates only per-run bookkeeping.
 */
#include "engine/engine.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "engine/backend.h"
#include "kvpool/kvpool.h"

#define ENG_SCORE_CHUNK 64 /* rows of logits per step when scoring every token */

struct eng_engine {
    eng_engine_config cfg;
    eng_model *model;
    kvp_pool *pool;
    eng_backend *be;
    int ctx_len;
    int max_batch_tokens;
    int max_seqs;
    int max_logit_rows;
    /* step buffers, sized at create */
    int32_t *tokens;      /* [max_batch_tokens] */
    int32_t *pos;         /* [max_batch_tokens] */
    eng_batch_seq *bseqs; /* [max_seqs] */
    float *logits;        /* [max_logit_rows][vocab] */
};

static int64_t pages_for(int n_tokens, int page_tokens) {
    return (n_tokens + page_tokens - 1) / page_tokens;
}

int eng_engine_create(const eng_engine_config *cfg_in, eng_engine **out) {
    *out = NULL;
    eng_engine *e = calloc(1, sizeof *e);
    if (!e) return D2_ENOMEM;
    e->cfg = *cfg_in;
    int rc = eng_model_load(cfg_in->model_path, true, &e->model);
    if (rc != D2_OK) {
        free(e);
        return rc;
    }
    const eng_model_config *mc = &e->model->cfg;
    e->ctx_len = cfg_in->ctx_len > 0 ? cfg_in->ctx_len : mc->max_ctx;
    if (e->ctx_len <= 0) e->ctx_len = 2048;
    e->max_seqs = cfg_in->max_seqs > 0 ? cfg_in->max_seqs : 64;
    e->max_batch_tokens = cfg_in->max_batch_tokens > 0 ? cfg_in->max_batch_tokens : 512;
    if (e->max_batch_tokens < e->max_seqs) e->max_batch_tokens = e->max_seqs;
    e->max_logit_rows = e->max_seqs > ENG_SCORE_CHUNK ? e->max_seqs : ENG_SCORE_CHUNK;

    int page_tokens = cfg_in->page_tokens > 0 ? cfg_in->page_tokens : 16;
    size_t page_bytes = 2u * (size_t)page_tokens * (size_t)mc->n_kv_heads * (size_t)mc->head_dim *
                        sizeof(float);
    int64_t n_pages = cfg_in->kv_pages;
    if (n_pages <= 0) {
        int64_t mb = cfg_in->kv_mem_mb;
        if (mb <= 0) {
            int64_t need = (int64_t)e->max_seqs * mc->n_layers *
                           pages_for(e->ctx_len, page_tokens) * (int64_t)page_bytes;
            mb = need / (1024 * 1024) + 1;
            if (mb > 4096) mb = 4096;
        }
        n_pages = mb * 1024 * 1024 / (int64_t)page_bytes;
    }
    kvp_config pc = {
        .n_layers = mc->n_layers,
        .n_kv_heads = mc->n_kv_heads,
        .head_dim = mc->head_dim,
        .page_tokens = page_tokens,
        .n_pages = n_pages,
        .max_seqs = e->max_seqs,
        .max_seq_tokens = e->ctx_len,
        .storage = NULL,
    };
    rc = kvp_create(&pc, &e->pool);
    if (rc != D2_OK) {
        D2_ERROR("engine: cannot reserve a KV pool of %lld pages: %s", (long long)n_pages,
                 d2_strerror(rc));
        eng_engine_destroy(e);
        return rc;
    }
    eng_cpu_config cc = {
        .n_threads = cfg_in->n_threads,
        .max_batch_tokens = e->max_batch_tokens,
        .max_logit_rows = e->max_logit_rows,
    };
    rc = eng_cpu_backend_create(e->model, e->pool, &cc, &e->be);
    if (rc != D2_OK) {
        eng_engine_destroy(e);
        return rc;
    }
    e->tokens = malloc(sizeof(int32_t) * (size_t)e->max_batch_tokens);
    e->pos = malloc(sizeof(int32_t) * (size_t)e->max_batch_tokens);
    e->bseqs = malloc(sizeof(eng_batch_seq) * (size_t)e->max_seqs);
    e->logits = malloc(sizeof(float) * (size_t)e->max_logit_rows * (size_t)mc->vocab_size);
    if (!e->tokens || !e->pos || !e->bseqs || !e->logits) {
        eng_engine_destroy(e);
        return D2_ENOMEM;
    }
    *out = e;
    return D2_OK;
}

void eng_engine_destroy(eng_engine *e) {
    if (!e) return;
    if (e->be) e->be->ops->destroy(e->be);
    kvp_destroy(e->pool);
    eng_model_free(e->model);
    free(e->tokens);
    free(e->pos);
    free(e->bseqs);
    free(e->logits);
    free(e);
}

const eng_model *eng_engine_model(const eng_engine *e) { return e->model; }
const eng_tokenizer *eng_engine_tokenizer(const eng_engine *e) { return e->model->tok; }
int eng_engine_ctx_len(const eng_engine *e) { return e->ctx_len; }
int eng_engine_max_batch_tokens(const eng_engine *e) { return e->max_batch_tokens; }

eng_pool_stats eng_engine_pool_stats(const eng_engine *e) {
    kvp_stats s = kvp_get_stats(e->pool);
    eng_pool_stats r = {s.pages_total, s.pages_free, kvp_get_config(e->pool)->page_tokens};
    return r;
}

int eng_engine_step(eng_engine *e, const eng_batch *b) { return e->be->ops->step(e->be, b); }

/* Reserves room for n tokens of seq in every layer; D2_EKVFULL leaves the
 * layers already reserved as they are (reservation only grows capacity). */
static int reserve_all_layers(eng_engine *e, int seq, int n) {
    int n_layers = e->model->cfg.n_layers;
    for (int l = 0; l < n_layers; l++) {
        int rc = kvp_reserve(e->pool, seq, l, n);
        if (rc != D2_OK) return rc;
    }
    return D2_OK;
}

/* ---- eng_run ------------------------------------------------------------------ */

typedef struct run_state {
    int kv;          /* pool sequence id, -1 before admission / after retirement */
    int n_fed;       /* tokens of the prompt fed so far */
    int n_gen;       /* tokens generated */
    int32_t last;    /* last generated token */
    int64_t pages_claim; /* worst-case pages claimed at admission */
    bool started, done;
    eng_sampler sampler;
} run_state;

static bool is_eos(const eng_model_config *mc, int32_t t) {
    for (int i = 0; i < mc->n_eos; i++)
        if (mc->eos_ids[i] == t) return true;
    return false;
}

static void retire(eng_engine *e, eng_gen_seq *s, run_state *st, eng_finish why, int status,
                   double t0, int64_t *claimed) {
    if (st->kv >= 0) kvp_seq_free(e->pool, st->kv);
    st->kv = -1;
    if (st->started) eng_sampler_free(&st->sampler);
    st->done = true;
    *claimed -= st->pages_claim;
    st->pages_claim = 0;
    s->finish = why;
    s->status = status;
    s->t_done = d2_now() - t0;
}

int eng_run(eng_engine *e, eng_gen_seq *seqs, int n) {
    const eng_model_config *mc = &e->model->cfg;
    const int page_tokens = kvp_get_config(e->pool)->page_tokens;
    const int64_t pool_pages = kvp_get_stats(e->pool).pages_total;
    run_state *st = calloc((size_t)(n > 0 ? n : 1), sizeof *st);
    if (!st) return D2_ENOMEM;
    double t0 = d2_now();
    int64_t claimed = 0;
    int n_done = 0, next_admit = 0, n_active = 0;
    for (int i = 0; i < n; i++) {
        st[i].kv = -1;
        seqs[i].n_out = 0;
        seqs[i].finish = ENG_FINISH_NONE;
        seqs[i].status = D2_OK;
        seqs[i].t_first_token = seqs[i].t_done = 0;
    }
    int rc_run = D2_OK;
    while (n_done < n) {
        /* admit in order while the pool and the sequence slots allow */
        while (next_admit < n && n_active < e->max_seqs) {
            eng_gen_seq *s = &seqs[next_admit];
            run_state *r = &st[next_admit];
            const char *why = NULL;
            if (s->n_prompt <= 0 || s->n_prompt > e->ctx_len) {
                retire(e, s, r, ENG_FINISH_ERROR, s->n_prompt <= 0 ? D2_EINVAL : D2_ETOOLONG, t0,
                       &claimed);
                n_done++;
                next_admit++;
                continue;
            }
            if (eng_sample_params_validate(&s->sample, mc->vocab_size, &why) != D2_OK) {
                D2_WARN("engine: sequence %d rejected: %s", next_admit, why);
                retire(e, s, r, ENG_FINISH_ERROR, D2_EINVAL, t0, &claimed);
                n_done++;
                next_admit++;
                continue;
            }
            int longest = s->n_prompt + (s->max_tokens > 0 ? s->max_tokens : 0);
            if (longest > e->ctx_len) longest = e->ctx_len;
            int64_t claim = (int64_t)mc->n_layers * pages_for(longest, page_tokens);
            if (claim > pool_pages) {
                retire(e, s, r, ENG_FINISH_ERROR, D2_EKVFULL, t0, &claimed);
                n_done++;
                next_admit++;
                continue;
            }
            if (claimed + claim > pool_pages) break; /* wait for pages */
            int rc = kvp_seq_new(e->pool, &r->kv);
            if (rc != D2_OK) break;
            rc = eng_sampler_init(&r->sampler, &s->sample, mc->vocab_size);
            if (rc != D2_OK) {
                kvp_seq_free(e->pool, r->kv);
                r->kv = -1;
                rc_run = rc;
                goto out;
            }
            eng_sampler_add_prompt(&r->sampler, s->prompt, (size_t)s->n_prompt);
            r->started = true;
            r->pages_claim = claim;
            claimed += claim;
            n_active++;
            next_admit++;
            if (s->max_tokens <= 0) { /* nothing to generate */
                retire(e, s, r, ENG_FINISH_LENGTH, D2_OK, t0, &claimed);
                n_done++;
                n_active--;
            }
        }
        if (n_active == 0) {
            if (n_done < n) { rc_run = D2_EINTERNAL; goto out; }
            break;
        }

        /* plan: decode tokens first, then prefill chunks */
        int nt = 0, ns = 0;
        for (int i = 0; i < n; i++) {
            run_state *r = &st[i];
            if (!r->started || r->done || r->n_fed < seqs[i].n_prompt) continue;
            e->tokens[nt] = r->last;
            e->pos[nt] = seqs[i].n_prompt + r->n_gen - 1;
            e->bseqs[ns] = (eng_batch_seq){.seq = r->kv, .start = nt, .n = 1, .want_logits = true};
            nt++;
            ns++;
        }
        for (int i = 0; i < n && nt < e->max_batch_tokens; i++) {
            run_state *r = &st[i];
            if (!r->started || r->done || r->n_fed >= seqs[i].n_prompt) continue;
            int take = seqs[i].n_prompt - r->n_fed;
            if (take > e->max_batch_tokens - nt) take = e->max_batch_tokens - nt;
            bool last_chunk = r->n_fed + take == seqs[i].n_prompt;
            e->bseqs[ns] =
                (eng_batch_seq){.seq = r->kv, .start = nt, .n = take, .want_logits = last_chunk};
            for (int j = 0; j < take; j++) {
                e->tokens[nt + j] = seqs[i].prompt[r->n_fed + j];
                e->pos[nt + j] = r->n_fed + j;
            }
            nt += take;
            ns++;
        }
        /* reserve pages (admission guarantees they exist) */
        for (int k = 0; k < ns; k++) {
            int rc = reserve_all_layers(e, e->bseqs[k].seq, e->bseqs[k].n);
            if (rc != D2_OK) { rc_run = rc; goto out; }
        }
        eng_batch b = {.n_tokens = nt, .tokens = e->tokens, .pos = e->pos, .n_seqs = ns,
                       .seqs = e->bseqs, .logits = e->logits};
        int rc = e->be->ops->step(e->be, &b);
        if (rc != D2_OK) { rc_run = rc; goto out; }

        /* sample, in plan order (the logits rows follow it) */
        int row = 0;
        for (int k = 0; k < ns; k++) {
            const eng_batch_seq *bs = &e->bseqs[k];
            int i;
            for (i = 0; i < n; i++)
                if (st[i].kv == bs->seq && !st[i].done) break;
            D2_ASSERT(i < n);
            run_state *r = &st[i];
            eng_gen_seq *s = &seqs[i];
            if (r->n_fed < s->n_prompt) r->n_fed += bs->n;
            if (!bs->want_logits) continue;
            const float *lg = e->logits + (size_t)row * (size_t)mc->vocab_size;
            row++;
            eng_sample_result res;
            rc = eng_sampler_sample(&r->sampler, lg, &res);
            if (rc != D2_OK) {
                retire(e, s, r, ENG_FINISH_ERROR, rc, t0, &claimed);
                n_done++;
                n_active--;
                continue;
            }
            eng_sampler_accept(&r->sampler, res.token);
            if (r->n_gen == 0) s->t_first_token = d2_now() - t0;
            r->last = res.token;
            if (s->out_tokens) s->out_tokens[r->n_gen] = res.token;
            r->n_gen++;
            s->n_out = r->n_gen;
            int stop_cb = s->on_token ? s->on_token(s->user, res.token, &res) : 0;
            eng_finish fin = ENG_FINISH_NONE;
            if (stop_cb || (!s->ignore_eos && is_eos(mc, res.token))) fin = ENG_FINISH_STOP;
            else if (r->n_gen >= s->max_tokens || s->n_prompt + r->n_gen >= e->ctx_len)
                fin = ENG_FINISH_LENGTH;
            if (fin != ENG_FINISH_NONE) {
                retire(e, s, r, fin, D2_OK, t0, &claimed);
                n_done++;
                n_active--;
            }
        }
    }
out:
    for (int i = 0; i < n; i++) {
        if (st[i].started && !st[i].done)
            retire(e, &seqs[i], &st[i], ENG_FINISH_ERROR, rc_run, t0, &claimed);
    }
    free(st);
    return rc_run;
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

int eng_score(eng_engine *e, const int32_t *ids, int n, double *nll, double *nll_sum) {
    const eng_model_config *mc = &e->model->cfg;
    *nll_sum = 0;
    if (n < 2) return D2_OK;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= mc->vocab_size) return D2_EINVAL;
    int chunk = e->max_logit_rows < e->max_batch_tokens ? e->max_logit_rows : e->max_batch_tokens;
    for (int w0 = 0; w0 < n - 1; w0 += e->ctx_len) {
        int wn = n - w0 < e->ctx_len ? n - w0 : e->ctx_len;
        int seq;
        int rc = kvp_seq_new(e->pool, &seq);
        if (rc != D2_OK) return rc;
        for (int c0 = 0; c0 < wn; c0 += chunk) {
            int cn = wn - c0 < chunk ? wn - c0 : chunk;
            /* rows whose next token exists */
            rc = reserve_all_layers(e, seq, cn);
            if (rc != D2_OK) { kvp_seq_free(e->pool, seq); return rc; }
            for (int j = 0; j < cn; j++) {
                e->tokens[j] = ids[w0 + c0 + j];
                e->pos[j] = c0 + j;
            }
            e->bseqs[0] = (eng_batch_seq){.seq = seq, .start = 0, .n = cn, .want_logits = true,
                                          .all_logits = true};
            eng_batch b = {.n_tokens = cn, .tokens = e->tokens, .pos = e->pos, .n_seqs = 1,
                           .seqs = e->bseqs, .logits = e->logits};
            rc = e->be->ops->step(e->be, &b);
            if (rc != D2_OK) { kvp_seq_free(e->pool, seq); return rc; }
            for (int j = 0; j < cn; j++) {
                int t = w0 + c0 + j; /* this row predicts ids[t+1] */
                if (t + 1 >= n) break;
                double lp = log_softmax_at(e->logits + (size_t)j * (size_t)mc->vocab_size,
                                           mc->vocab_size, ids[t + 1]);
                if (nll) nll[t] = -lp;
                *nll_sum += -lp;
            }
        }
        kvp_seq_free(e->pool, seq);
    }
    return D2_OK;
}
