/*
 * engine/step.c — the mechanism of one engine step (contract in
 * engine/internal.h): a plan's pool reservation and appends, the backend
 * call, logits and greedy tokens, compression after the step. It makes no
 * policy decision; the scheduler (sched.c) and the drivers (run.c) decide
 * what goes into a plan.
 *
 * Callers: the engine thread. Nothing here allocates except eng__plan_init.
 */
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "engine/internal.h"
#include "engine/kvcomp.h"

int eng__plan_init(eng_plan *p, const eng_engine *e) {
    memset(p, 0, sizeof *p);
    p->cap_tokens = e->max_batch_tokens;
    p->cap_seqs = e->max_seqs > 0 ? e->max_seqs : 1;
    p->tokens = malloc(sizeof(int32_t) * (size_t)p->cap_tokens);
    p->pos = malloc(sizeof(int32_t) * (size_t)p->cap_tokens);
    p->seqs = malloc(sizeof(eng_batch_seq) * (size_t)p->cap_seqs);
    if (!p->tokens || !p->pos || !p->seqs) {
        eng__plan_free(p);
        return D2_ENOMEM;
    }
    return D2_OK;
}

void eng__plan_free(eng_plan *p) {
    free(p->tokens);
    free(p->pos);
    free(p->seqs);
    memset(p, 0, sizeof *p);
}

void eng__plan_reset(eng_plan *p) { p->n_tokens = p->n_seqs = 0; }

eng_batch_seq *eng__plan_add(eng_plan *p, int seq, const int32_t *tokens, int n, int pos0,
                             bool want_logits, bool all_logits) {
    if (n <= 0 || p->n_seqs >= p->cap_seqs || n > p->cap_tokens - p->n_tokens) return NULL;
    eng_batch_seq *bs = &p->seqs[p->n_seqs++];
    *bs = (eng_batch_seq){.seq = seq, .start = p->n_tokens, .n = n, .want_logits = want_logits,
                          .all_logits = all_logits, .host_logits = all_logits};
    memcpy(p->tokens + p->n_tokens, tokens, sizeof(int32_t) * (size_t)n);
    for (int j = 0; j < n; j++) p->pos[p->n_tokens + j] = pos0 + j;
    p->n_tokens += n;
    return bs;
}

int64_t eng__plan_pages_needed(const eng_engine *e, const eng_plan *p) {
    int64_t need = 0;
    for (int k = 0; k < p->n_seqs; k++) {
        int64_t n = kvp_pages_needed_all_layers(e->pool, p->seqs[k].seq, p->seqs[k].n);
        if (n < 0) return INT64_MAX / 4; /* longer than a table can be: never fits */
        need += n;
        /* a scoring sequence's shared pages are copied first (eng__step_execute) */
        for (int l = 0; p->seqs[k].want_scores && l < e->model->cfg.n_layers; l++) {
            int sh = kvp_shared_pages(e->pool, p->seqs[k].seq, l);
            if (sh > 0) need += sh;
        }
    }
    return need;
}

static int attach(eng_engine *e) {
    pthread_t self = pthread_self();
    if (e->attached && pthread_equal(e->attached_thread, self)) return D2_OK;
    int rc = e->be->ops->attach_thread(e->be);
    if (rc != D2_OK) {
        D2_ERROR("engine: cannot attach the %s backend to this thread: %s", e->caps.name,
                 e->be->ops->last_error(e->be));
        return rc;
    }
    e->attached = true;
    e->attached_thread = self;
    return D2_OK;
}

int eng__step_execute(eng_engine *e, const eng_plan *p) {
    int rc = attach(e);
    if (rc != D2_OK) return rc;
    int64_t need = eng__plan_pages_needed(e, p);
    if (need > kvp_get_stats(e->pool).pages_free) return D2_EKVFULL;
    for (int k = 0; k < p->n_seqs; k++) {
        rc = kvp_reserve_all_layers(e->pool, p->seqs[k].seq, p->seqs[k].n);
        if (rc != D2_OK) return rc; /* a lone table longer than max_seq_tokens */
    }
    /* The backend adds this step's attention into the score of every live slot
     * of a sequence that wants scores: a page it shares with a forked sequence
     * is made private first, so that copy on write covers scores too (the
     * pages were counted in `need`, so this cannot run out). */
    for (int k = 0; k < p->n_seqs; k++) {
        for (int l = 0; p->seqs[k].want_scores && l < e->model->cfg.n_layers; l++) {
            rc = kvp_unshare_all(e->pool, p->seqs[k].seq, l);
            if (rc != D2_OK) return rc;
        }
    }
    int pt = kvp_get_config(e->pool)->page_tokens;
    int32_t *pos_base = kvp_pos_base(e->pool);
    for (int k = 0; k < p->n_seqs; k++) {
        const eng_batch_seq *bs = &p->seqs[k];
        for (int l = 0; l < e->model->cfg.n_layers; l++) {
            int first = kvp_append(e->pool, bs->seq, l, bs->n);
            if (first < 0) return first;
            kvp_table tab = kvp_get_table(e->pool, bs->seq, l);
            for (int j = 0; j < bs->n; j++) {
                int32_t page;
                int slot;
                kvp_locate(&tab, pt, first + j, &page, &slot);
                pos_base[(size_t)page * (size_t)pt + (size_t)slot] = p->pos[bs->start + j];
            }
        }
    }
    eng_batch b = {.n_tokens = p->n_tokens, .tokens = p->tokens, .pos = p->pos,
                   .n_seqs = p->n_seqs, .seqs = p->seqs};
    rc = e->be->ops->step(e->be, &b);
    e->step_unsettled = true; /* also after a failure: an earlier step may be pending */
    if (rc != D2_OK)
        D2_ERROR("engine: %s backend step failed: %s", e->caps.name, e->be->ops->last_error(e->be));
    return rc;
}

/* A result call that succeeded completed the step (engine/backend.h). */
static int settled(eng_engine *e, int rc) {
    if (rc == D2_OK) e->step_unsettled = false;
    return rc;
}

int eng__step_logits(eng_engine *e, int row, const float **out) {
    return settled(e, e->be->ops->logits(e->be, row, 1, out));
}

int eng__step_argmax(eng_engine *e, int row, int32_t *out) {
    return settled(e, e->be->ops->argmax(e->be, &row, 1, out));
}

int eng__step_sync(eng_engine *e) {
    if (!e->step_unsettled) return D2_OK;
    int rc = attach(e);
    if (rc == D2_OK) rc = e->be->ops->sync(e->be);
    if (rc != D2_OK)
        D2_ERROR("engine: %s backend sync failed: %s", e->caps.name, e->be->ops->last_error(e->be));
    return settled(e, rc);
}

bool eng__step_can_sample(const eng_engine *e) {
    return e->caps.sample_on_device && e->be->ops->sample;
}

int eng__step_sample(eng_engine *e, const int *rows, const eng_sample_draw *draws, int n, int32_t *out) {
    return settled(e, e->be->ops->sample(e->be, rows, draws, n, out));
}

bool eng__step_backend_lost(int rc) { return rc == D2_ECUDA; }

const char *eng__step_backend_error(const eng_engine *e) { return e->be->ops->last_error(e->be); }

int eng__step_compress(eng_engine *e, int seq, eng_kv_state *ks, int fed, int prefill_end) {
    int rc = D2_OK;
    if (!ks->compressed && fed >= prefill_end) {
        /* D2O's layer statistic reads the prefill's column sums */
        if (ks->colsum) rc = eng__step_sync(e);
        if (rc == D2_OK) rc = eng_kv_compress_prompt(e->be, seq, ks);
    }
    else if (ks->compressed) rc = eng_kv_after_decode(e->be, seq, ks);
    return rc == D2_EKVFULL ? D2_OK : rc;
}
