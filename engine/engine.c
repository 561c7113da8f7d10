/*
 * engine/engine.c — the engine object (model + KV pool + backend + step
 * buffers), eng_run() (the scheduler of sched.c driven in manual mode, used
 * by `d2od generate`, the benchmarks and tests) and eng_score() (teacher-
 * forced NLL for `d2od perplexity`).
 *
 * Only the engine thread calls into this file. Every buffer a step needs is
 * allocated in eng_engine_create.
 */
#include "engine/engine.h"
#include "engine/internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "engine/backend.h"
#include "engine/kvcomp.h"
#include "kvpool/kvpool.h"

/* The backend a config asks for, checked before anything is loaded. Only the
 * CPU backend exists so far: AUTO resolves to it and CUDA is refused. */
static int check_device(const eng_engine_config *cfg) {
    if (cfg->device == ENG_DEVICE_CPU || cfg->device == ENG_DEVICE_AUTO) return D2_OK;
    if (cfg->device != ENG_DEVICE_CUDA) return D2_EINVAL;
    D2_ERROR("engine: device cuda: this build has no CUDA backend yet (use --device cpu or auto)");
    return D2_EUNSUPPORTED;
}

int eng_engine_create(const eng_engine_config *cfg_in, eng_engine **out) {
    *out = NULL;
    int rc = check_device(cfg_in);
    if (rc != D2_OK) return rc;
    eng_model *m = NULL;
    rc = eng_model_load(cfg_in->model_path, true, &m);
    if (rc != D2_OK) return rc;
    return eng__engine_create_for(m, true, cfg_in, out);
}

int eng__engine_create_for(eng_model *model, bool own_model, const eng_engine_config *cfg_in,
                           eng_engine **out) {
    *out = NULL;
    int rc = check_device(cfg_in);
    eng_engine *e = rc == D2_OK ? calloc(1, sizeof *e) : NULL;
    if (!e) {
        if (own_model) eng_model_free(model);
        return rc != D2_OK ? rc : D2_ENOMEM;
    }
    e->cfg = *cfg_in;
    e->model = model;
    e->own_model = own_model;
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
                           eng__pages_for(e->ctx_len, page_tokens) * (int64_t)page_bytes;
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
    rc = eng_kv_ws_create(e->pool, &e->kvws);
    if (rc == D2_OK) rc = eng_sample_scratch_init(&e->sample_scratch, mc->vocab_size);
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
    eng_kv_ws_free(e->kvws);
    eng_sample_scratch_free(&e->sample_scratch);
    kvp_destroy(e->pool);
    if (e->own_model) eng_model_free(e->model);
    free(e->tokens);
    free(e->pos);
    free(e->bseqs);
    free(e->logits);
    free(e);
}

void eng_engine_prefault(eng_engine *e, void (*progress)(void *user, size_t done, size_t total), void *user) {
    const eng_model *m = e->model;
    size_t total = 0, done = 0, next_report = 0;
    for (int i = 0; i < m->n_maps; i++) total += m->maps[i].size;
    volatile uint8_t sink = 0;
    for (int i = 0; i < m->n_maps; i++) {
        const uint8_t *p = m->maps[i].data;
        for (size_t off = 0; off < m->maps[i].size; off += 4096) {
            sink ^= p[off];
            done += m->maps[i].size - off < 4096 ? m->maps[i].size - off : 4096;
            if (progress && done >= next_report) {
                progress(user, done, total);
                next_report = done + total / 100 + 1;
            }
        }
    }
    (void)sink;
    if (progress) progress(user, total, total);
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

int eng__reserve_all_layers(eng_engine *e, int seq, int n) {
    int n_layers = e->model->cfg.n_layers;
    for (int l = 0; l < n_layers; l++) {
        int rc = kvp_reserve(e->pool, seq, l, n);
        if (rc != D2_OK) return rc;
    }
    return D2_OK;
}

int64_t eng__pages_needed_all_layers(const eng_engine *e, int seq, int n) {
    int64_t need = 0;
    for (int l = 0; l < e->model->cfg.n_layers; l++) {
        int p = kvp_pages_needed(e->pool, seq, l, n);
        if (p < 0) return INT64_MAX / 4; /* longer than a table can be: never fits */
        need += p;
    }
    return need;
}

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
            rc = eng__reserve_all_layers(e, seq, cn);
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

/* ---- eng_score_kv ----------------------------------------------------------------
 *
 * One window of the context length at a time, each on a fresh sequence and a
 * fresh compression state: the first `prefill` tokens of the window run as a
 * chunked prefill (scores and D2O column sums accumulated as the scheduler
 * would), the prompt compression runs, then every later token is one decode
 * step followed by decode-time eviction — the model sees exactly what the
 * method kept, as during generation. */

#define ENG_SCORE_KV_PREFILL 64 /* default prefill when the caller passes 0 */

static int score_kv_window(eng_engine *e, const int32_t *ids, int n, int w0, int wn,
                           eng_kv_state *ks, int prefill, double *nll, double *nll_sum) {
    const eng_model_config *mc = &e->model->cfg;
    int chunk = e->max_logit_rows < e->max_batch_tokens ? e->max_logit_rows : e->max_batch_tokens;
    int seq;
    int rc = kvp_seq_new(e->pool, &seq);
    if (rc != D2_OK) return rc;
    eng_kv_state_reset(ks);
    int p = prefill < wn ? prefill : wn;
    for (int c0 = 0; c0 < wn; ) {
        bool in_prefill = c0 < p;
        int cn = in_prefill ? (p - c0 < chunk ? p - c0 : chunk) : 1;
        rc = eng__reserve_all_layers(e, seq, cn);
        if (rc != D2_OK) break;
        for (int j = 0; j < cn; j++) {
            e->tokens[j] = ids[w0 + c0 + j];
            e->pos[j] = c0 + j;
        }
        e->bseqs[0] = (eng_batch_seq){.seq = seq, .start = 0, .n = cn, .want_logits = true,
                                      .all_logits = true};
        eng_kv_plan_seq(ks, p, &e->bseqs[0]);
        eng_batch b = {.n_tokens = cn, .tokens = e->tokens, .pos = e->pos, .n_seqs = 1,
                       .seqs = e->bseqs, .logits = e->logits};
        rc = e->be->ops->step(e->be, &b);
        if (rc != D2_OK) break;
        for (int j = 0; j < cn; j++) {
            int t = w0 + c0 + j; /* this row predicts ids[t+1] */
            if (t + 1 >= n) break;
            double lp = log_softmax_at(e->logits + (size_t)j * (size_t)mc->vocab_size,
                                       mc->vocab_size, ids[t + 1]);
            if (nll) nll[t] = -lp;
            *nll_sum += -lp;
        }
        c0 += cn;
        if (!ks->compressed && c0 >= p)
            rc = eng_kv_compress_prompt(e->kvws, e->pool, seq, ks);
        else if (ks->compressed)
            rc = eng_kv_after_decode(e->kvws, e->pool, seq, ks);
        if (rc == D2_EKVFULL) rc = D2_OK; /* cannot happen for an unshared sequence */
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
    if (prefill < 0) return D2_EINVAL;
    if (prefill == 0) prefill = ENG_SCORE_KV_PREFILL;
    if (n < 2) return D2_OK;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= mc->vocab_size) return D2_EINVAL;
    eng_kv_state *ks = NULL;
    int rc = eng_kv_state_create(kv, mc, e->ctx_len, &ks);
    if (rc != D2_OK) return rc;
    for (int w0 = 0; w0 < n - 1 && rc == D2_OK; w0 += e->ctx_len) {
        int wn = n - w0 < e->ctx_len ? n - w0 : e->ctx_len;
        rc = score_kv_window(e, ids, n, w0, wn, ks, prefill, nll, nll_sum);
    }
    eng_kv_state_free(ks);
    return rc;
}
