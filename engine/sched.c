/*
 * engine/sched.c — the continuous-batching scheduler (contract in engine.h).
 *
 * Each iteration (eng_sched_step):
 *   1. take newly submitted requests into the waiting queue (FIFO);
 *   2. retire cancelled requests (their pages return to the pool at once);
 *   3. admit waiting requests while a sequence slot is free and the pool
 *      holds the request's known tokens (prompt plus anything generated
 *      before a preemption) with a watermark left for running sequences to
 *      decode one more page each;
 *   4. plan the step: one decode token for every running sequence first,
 *      then prefill chunks in admission order up to max_batch_tokens;
 *   5. if the plan needs more pages than are free, preempt the newest
 *      running sequence (free its pages, put it back at the head of the
 *      queue; it will recompute its prompt plus the tokens it already
 *      produced — a compressed one by replay: prompt, compression at the
 *      same point, then its tokens one per step with decode eviction, so
 *      nothing the client sees changes) and plan again;
 *   6. execute: the step mechanism (step.c) reserves and appends the plan's
 *      pages and runs the backend;
 *   7. commit: the step's device draws (sampled requests whose sampler
 *      allows one take the backend's sample op, one call for the step: their
 *      logits need not leave the device), compress the KV cache of
 *      compressed sequences, sample for every other sequence whose chunk
 *      reached its last known token (greedy requests that want no logprobs
 *      take the backend's argmax, the rest the sampler over a host row,
 *      which the plan flagged host_logits), emit events, retire finished
 *      ones. The draws come first so that a device backend waits once per
 *      step (engine/backend.h, "Results and host synchronisation").
 * A lost backend (a sticky device error: eng__step_backend_lost) is fatal:
 * the first step, sample or compression that reports it ends every request
 * with that status, closes the scheduler (submit: D2_EAGAIN) and records the
 * failing call for eng_sched_fatal, which the daemon polls to exit non-zero.
 * Steps 1-5 are policy (sched_intake, sched_admit, sched_plan); 6-7 are
 * mechanism (eng__step_execute, sched_commit). This file calls step.c and
 * kvcomp.c, never engine.c.
 *
 * A request's memory (its token buffer and sampler scratch) is allocated on
 * the submitting thread, so the engine thread allocates nothing per step.
 *
 * Locking: `mu` guards the incoming list, the list of live requests (for
 * cancel by id) and the closed/stop flags. Everything else belongs to the
 * engine thread. Counters are atomics so stats can be read from any thread.
 * `view_mu` guards the live view (eng_sched_view_get): while someone reads the
 * view (a reader in the last ENG_VIEW_WATCH_MS), the engine thread copies each
 * running sequence's pages per layer into preallocated arrays at the end of
 * every step; otherwise a step pays one atomic load and a clock read. A
 * finishing sequence's shape and every compression event are recorded always
 * (once per request or per compression, into fixed rings), never allocating.
 */
#include <math.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/util.h"
#include "engine/engine.h"
#include "engine/internal.h"
#include "engine/kvcomp.h"

typedef struct sreq {
    struct sreq *next, *prev;   /* incoming / waiting / running list links */
    struct sreq *live_next, *live_prev; /* all live requests, for cancel */
    uint64_t id;
    int32_t *tokens;            /* [n_prompt + max_tokens]: prompt, then generated */
    int n_prompt, max_tokens, n_gen;
    int n_fed;                  /* tokens of `tokens` in the KV cache */
    int kv;                     /* pool sequence, -1 when not admitted */
    uint64_t admit_seq;         /* admission order (newest = largest) */
    int n_preempt;
    bool ignore_eos;
    bool want_logprobs;         /* false + plain greedy sampling: the backend's argmax */
    bool queue_exempt;          /* a further choice of an admitted request (eng_request) */
    int32_t stop_ids[16];
    int n_stop_ids;
    eng_logit_bias *bias;       /* owned copy */
    eng_sampler sampler;
    eng_event_fn fn;
    void *user;
    atomic_int cancel;
    double t_submit, t_first;
    eng_kv_state *kvs;          /* KV compression state (method full: only measures) */
    int64_t prefill_bytes;      /* prefill scratch of kvs counted in eng_sched.prefill_bytes */
    int prefill_end;            /* cache length at which the prompt compression runs */
} sreq;

typedef struct rlist { sreq *head, *tail; int n, nx; /* nx: how many are queue_exempt */ } rlist;

static void rl_push_back(rlist *l, sreq *r) {
    r->next = NULL;
    r->prev = l->tail;
    if (l->tail) l->tail->next = r; else l->head = r;
    l->tail = r;
    l->n++;
    l->nx += r->queue_exempt;
}
static void rl_push_front(rlist *l, sreq *r) {
    r->prev = NULL;
    r->next = l->head;
    if (l->head) l->head->prev = r; else l->tail = r;
    l->head = r;
    l->n++;
    l->nx += r->queue_exempt;
}
static void rl_remove(rlist *l, sreq *r) {
    if (r->prev) r->prev->next = r->next; else l->head = r->next;
    if (r->next) r->next->prev = r->prev; else l->tail = r->prev;
    r->next = r->prev = NULL;
    l->n--;
    l->nx -= r->queue_exempt;
}

struct eng_sched {
    eng_engine *e;
    eng_sched_config cfg;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t thread;
    bool thread_started;
    bool stop, closed;          /* under mu */
    rlist incoming;             /* under mu */
    sreq *live;                 /* under mu: every submitted, unretired request */
    uint64_t next_id;           /* under mu */
    /* engine thread only */
    rlist waiting, running;
    uint64_t admit_counter;
    eng_plan plan;              /* the step being built */
    sreq **plan_req;            /* [max_seqs] request of each plan entry */
    /* device draws of the step being committed: per plan entry the index of
     * its draw or -1; the draws' logit rows, parameters and tokens */
    int *draw_of, *draw_row;    /* [max_seqs] */
    eng_sample_draw *draws;     /* [max_seqs] */
    int32_t *draw_tok;          /* [max_seqs] */
    int draw_rc;                /* the sample op's status for this step */
    /* stats */
    atomic_int n_running, n_waiting, n_waiting_exempt, n_decoding;
    atomic_llong preemptions, prompt_tokens, generation_tokens, steps;
    atomic_llong fin_stop, fin_length, fin_error, fin_canceled;
    atomic_llong kv_evicted, kv_merged, kv_freed;
    atomic_llong kv_prompt_ns, kv_decode_ns; /* time in compression (eng_sched_stats) */
    /* live view (under view_mu) */
    pthread_mutex_t view_mu;
    int view_layers, view_n;
    eng_seq_view *view_seqs;     /* [max_seqs + ENG_VIEW_RECENT]: running, then the
                                    recently finished ring; pages/tokens point into view_ints */
    int32_t *view_ints;          /* [max_seqs + ENG_VIEW_RECENT][2][n_layers] */
    uint64_t n_recent;           /* sequences ever put in the finished ring */
    atomic_llong view_watch_until_ms; /* publish the running view until then (d2_now() ms) */
    eng_kv_event events[ENG_VIEW_EVENTS]; /* ring: event k at events[(k - 1) % N] */
    uint64_t n_events;
    /* Prefill scratch (D2O column sums) held by admitted requests: allocated
     * at admission, freed by the prompt compression or a preemption. */
    int64_t prefill_bytes, prefill_bytes_limit;
    atomic_llong prefill_bytes_pub;
    /* A lost backend: its status (0 while healthy), and the failing call,
     * written once by the engine thread before `fatal` is stored. */
    atomic_int fatal;
    char fatal_why[512];
};

#define SCHED_PREFILL_BYTES_DEFAULT ((int64_t)1 << 30)

int eng_sched_create(eng_engine *e, const eng_sched_config *cfg, eng_sched **out) {
    *out = NULL;
    eng_sched *s = calloc(1, sizeof *s);
    if (!s) return D2_ENOMEM;
    s->e = e;
    s->cfg = *cfg;
    s->next_id = 1;
    s->prefill_bytes_limit = cfg->prefill_bytes_limit > 0 ? cfg->prefill_bytes_limit
                                                          : SCHED_PREFILL_BYTES_DEFAULT;
    s->plan_req = calloc((size_t)e->max_seqs, sizeof *s->plan_req);
    s->draw_of = calloc((size_t)e->max_seqs, sizeof *s->draw_of);
    s->draw_row = calloc((size_t)e->max_seqs, sizeof *s->draw_row);
    s->draws = calloc((size_t)e->max_seqs, sizeof *s->draws);
    s->draw_tok = calloc((size_t)e->max_seqs, sizeof *s->draw_tok);
    s->view_layers = e->model->cfg.n_layers;
    size_t nv = (size_t)e->max_seqs + ENG_VIEW_RECENT;
    s->view_seqs = calloc(nv, sizeof *s->view_seqs);
    s->view_ints = calloc(nv * 2 * (size_t)s->view_layers, sizeof *s->view_ints);
    if (!s->plan_req || !s->view_seqs || !s->view_ints || !s->draw_of || !s->draw_row ||
        !s->draws || !s->draw_tok || eng__plan_init(&s->plan, e) != D2_OK) {
        free(s->plan_req);
        free(s->draw_of);
        free(s->draw_row);
        free(s->draws);
        free(s->draw_tok);
        free(s->view_seqs);
        free(s->view_ints);
        eng__plan_free(&s->plan);
        free(s);
        return D2_ENOMEM;
    }
    for (size_t i = 0; i < nv; i++) {
        s->view_seqs[i].pages = s->view_ints + (size_t)i * 2 * (size_t)s->view_layers;
        s->view_seqs[i].tokens = s->view_seqs[i].pages + s->view_layers;
    }
    pthread_mutex_init(&s->view_mu, NULL);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    *out = s;
    return D2_OK;
}

static void sreq_free(sreq *r) {
    if (!r) return;
    eng_sampler_free(&r->sampler);
    eng_kv_state_free(r->kvs);
    free(r->bias);
    free(r->tokens);
    free(r);
}

static double since(const sreq *r, double t) { return t > 0 ? t - r->t_submit : 0; }

static void view_retire(eng_sched *s, const sreq *r);

/* Takes r's prefill scratch out of the admission count once its state no
 * longer holds it (compressed), or drops it now (preemption, retirement). */
static void prefill_bytes_settle(eng_sched *s, sreq *r, bool drop) {
    if (!r->prefill_bytes) return;
    if (drop) {
        /* the last step may still be adding into the column sums (a device
         * backend completes them at its first result call or sync): complete
         * it before they go; a lost backend writes nothing any more */
        if (r->kvs->colsum) (void)eng__step_sync(s->e);
        eng_kv_colsum_release(r->kvs);
    } else if (r->kvs->colsum) {
        return;
    }
    s->prefill_bytes -= r->prefill_bytes;
    r->prefill_bytes = 0;
    atomic_store(&s->prefill_bytes_pub, s->prefill_bytes);
}

/* Ends a request: frees its pages, sends DONE, unlinks and frees it. The
 * caller has already removed it from waiting/running. */
/* "stat/budget/kept/live/evicted/merged/tau" per layer, for the debug log. */
static const char *kv_report_str(const eng_kv_report *k, char *buf, size_t cap) {
    size_t o = (size_t)snprintf(buf, cap, "%s prefill %d kv_tokens mean %.1f peak %.1f; layers",
                                eng_kv_method_name(k->method), k->prefill_len, k->kv_tokens_mean,
                                k->kv_tokens_peak);
    for (int l = 0; l < k->n_layers && o < cap; l++) {
        const eng_kv_layer_report *y = &k->layers[l];
        o += (size_t)snprintf(buf + o, cap - o, " [%d v=%.4f C=%d kept=%d live=%d ev=%lld mg=%lld tau=%.4f]",
                              l, y->stat, y->heavy < 0 ? -1 : y->heavy + y->recent, y->kept_prompt,
                              y->live, (long long)y->evicted, (long long)y->merged, y->tau);
    }
    return buf;
}

static void retire(eng_sched *s, sreq *r, eng_finish fin, int status) {
    if (r->kv >= 0) view_retire(s, r);
    prefill_bytes_settle(s, r, true);
    eng_kv_report kr;
    if (r->kvs) eng_kv_report_fill(r->kvs, s->e->pool, r->kv, s->e->caps.kv_bytes_per_slot, &kr);
    if (r->kv >= 0) kvp_seq_free(s->e->pool, r->kv);
    r->kv = -1;
    double now = d2_now();
    eng_event ev = {.type = ENG_EV_DONE, .id = r->id, .finish = fin, .status = status,
                    .n_prompt = r->n_prompt, .n_generated = r->n_gen, .n_preempted = r->n_preempt,
                    .t_first_token = since(r, r->t_first), .t_done = now - r->t_submit,
                    .kv = r->kvs ? &kr : NULL};
    if (r->kvs && r->kvs->cfg.method != ENG_KV_FULL) {
        char buf[2048];
        D2_DEBUG("sched: request %llu kv_compression: %s", (unsigned long long)r->id,
                 kv_report_str(&kr, buf, sizeof buf));
    }
    if (status == D2_ECANCELED) atomic_fetch_add(&s->fin_canceled, 1);
    else if (fin == ENG_FINISH_STOP) atomic_fetch_add(&s->fin_stop, 1);
    else if (fin == ENG_FINISH_LENGTH) atomic_fetch_add(&s->fin_length, 1);
    else atomic_fetch_add(&s->fin_error, 1);
    r->fn(r->user, &ev);
    pthread_mutex_lock(&s->mu);
    if (r->live_prev) r->live_prev->live_next = r->live_next; else s->live = r->live_next;
    if (r->live_next) r->live_next->live_prev = r->live_prev;
    pthread_mutex_unlock(&s->mu);
    sreq_free(r);
}

int eng_sched_submit(eng_sched *s, const eng_request *q, uint64_t *id_out, const char **why) {
    eng_engine *e = s->e;
    const eng_model_config *mc = &e->model->cfg;
    const char *dummy;
    if (!why) why = &dummy;
    *why = NULL;
    if (!q->on_event) { *why = "no event callback"; return D2_EINVAL; }
    if (q->n_prompt <= 0 || !q->prompt) { *why = "the prompt is empty"; return D2_EINVAL; }
    if (q->max_tokens <= 0) { *why = "max_tokens must be at least 1"; return D2_EINVAL; }
    if (q->n_prompt >= e->ctx_len) { *why = "the prompt does not fit the context"; return D2_ETOOLONG; }
    for (int i = 0; i < q->n_prompt; i++) {
        if (q->prompt[i] < 0 || q->prompt[i] >= mc->vocab_size) {
            *why = "a prompt token id is out of the vocabulary";
            return D2_EINVAL;
        }
    }
    if (q->n_stop_ids < 0 || q->n_stop_ids > 16) { *why = "too many stop token ids"; return D2_EINVAL; }
    if (eng_sample_params_validate(&q->sample, mc->vocab_size, why) != D2_OK) return D2_EINVAL;
    if (eng_kv_config_validate(&q->kv, why) != D2_OK) return D2_EINVAL;
    if (q->kv.method != ENG_KV_FULL && q->kv.granularity == ENG_KV_GRAN_HEAD && !e->caps.kv_per_head) {
        *why = "kv: granularity head is not implemented by this backend (use granularity layer)";
        return D2_EINVAL;
    }
    /* The prompt is resident in full until it is compressed (peak); after
     * that the sequence needs its compressed size at its longest. */
    eng_kv_estimate est = eng_kv_estimate_pages(e, &q->kv, q->n_prompt, q->max_tokens);
    int64_t need_max = est.pages_peak > est.pages_longest ? est.pages_peak : est.pages_longest;
    if (need_max > kvp_get_stats(e->pool).pages_total) {
        *why = "the request can never fit the KV pool";
        return D2_EKVFULL;
    }

    sreq *r = calloc(1, sizeof *r);
    if (!r) return D2_ENOMEM;
    r->tokens = malloc(sizeof(int32_t) * (size_t)(q->n_prompt + q->max_tokens));
    if (!r->tokens) { free(r); return D2_ENOMEM; }
    memcpy(r->tokens, q->prompt, sizeof(int32_t) * (size_t)q->n_prompt);
    r->n_prompt = q->n_prompt;
    r->max_tokens = q->max_tokens;
    r->kv = -1;
    r->ignore_eos = q->ignore_eos;
    r->want_logprobs = q->want_logprobs;
    r->queue_exempt = q->queue_exempt;
    r->n_stop_ids = q->n_stop_ids;
    if (q->n_stop_ids) memcpy(r->stop_ids, q->stop_ids, sizeof(int32_t) * (size_t)q->n_stop_ids);
    eng_sample_params sp = q->sample;
    if (sp.n_logit_bias > 0) {
        r->bias = malloc(sizeof(eng_logit_bias) * (size_t)sp.n_logit_bias);
        if (!r->bias) { sreq_free(r); return D2_ENOMEM; }
        memcpy(r->bias, sp.logit_bias, sizeof(eng_logit_bias) * (size_t)sp.n_logit_bias);
        sp.logit_bias = r->bias;
    }
    /* The sampler borrows the engine's per-sample scratch: sampling happens
     * only on the engine thread, one request at a time. */
    int rc = eng_sampler_init_shared(&r->sampler, &sp, mc->vocab_size, &e->sample_scratch);
    if (rc != D2_OK) { free(r->bias); free(r->tokens); free(r); return rc; }
    eng_sampler_add_prompt(&r->sampler, q->prompt, (size_t)q->n_prompt);
    /* every request has a compression state (the full cache's is trivial): it
     * also measures the live KV tokens for the DONE event's report */
    rc = eng_kv_state_create(&q->kv, mc, &r->kvs);
    if (rc != D2_OK) { sreq_free(r); return rc; }
    r->fn = q->on_event;
    r->user = q->user;
    r->t_submit = d2_now();

    pthread_mutex_lock(&s->mu);
    if (s->closed || s->stop) {
        pthread_mutex_unlock(&s->mu);
        sreq_free(r);
        *why = "the server is shutting down";
        return D2_EAGAIN;
    }
    /* max_queue counts requests that wait beyond the free running slots:
     * queued submissions (incoming + waiting) that are not queue_exempt,
     * less the slots no queued submission has claimed yet. 0 therefore means
     * "only when a slot is free". Further choices of a request are exempt,
     * so a request counts once whatever its n. */
    int queued_x = s->incoming.nx + atomic_load(&s->n_waiting_exempt);
    int counted = s->incoming.n + atomic_load(&s->n_waiting) - queued_x;
    int free_slots = e->max_seqs - atomic_load(&s->n_running) - queued_x;
    if (free_slots < 0) free_slots = 0;
    if (!q->queue_exempt && counted - free_slots >= s->cfg.max_queue) {
        pthread_mutex_unlock(&s->mu);
        sreq_free(r);
        *why = "the request queue is full";
        return D2_EQUEUEFULL;
    }
    r->id = s->next_id++;
    rl_push_back(&s->incoming, r);
    r->live_next = s->live;
    if (s->live) s->live->live_prev = r;
    s->live = r;
    if (id_out) *id_out = r->id;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return D2_OK;
}

void eng_sched_cancel(eng_sched *s, uint64_t id) {
    pthread_mutex_lock(&s->mu);
    for (sreq *r = s->live; r; r = r->live_next) {
        if (r->id == id) {
            atomic_store(&r->cancel, 1);
            break;
        }
    }
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void eng_sched_set_max_queue(eng_sched *s, int max_queue) {
    pthread_mutex_lock(&s->mu);
    s->cfg.max_queue = max_queue;
    pthread_mutex_unlock(&s->mu);
}

void eng_sched_close(eng_sched *s) {
    pthread_mutex_lock(&s->mu);
    s->closed = true;
    pthread_mutex_unlock(&s->mu);
}

eng_sched_stats eng_sched_get_stats(eng_sched *s) {
    eng_sched_stats st = {
        .running = atomic_load(&s->n_running),
        .waiting = atomic_load(&s->n_waiting),
        .decoding = atomic_load(&s->n_decoding),
        .preemptions = atomic_load(&s->preemptions),
        .prompt_tokens = atomic_load(&s->prompt_tokens),
        .generation_tokens = atomic_load(&s->generation_tokens),
        .steps = atomic_load(&s->steps),
        .finished_stop = atomic_load(&s->fin_stop),
        .finished_length = atomic_load(&s->fin_length),
        .finished_error = atomic_load(&s->fin_error),
        .finished_canceled = atomic_load(&s->fin_canceled),
        .kv_tokens_evicted = atomic_load(&s->kv_evicted),
        .kv_tokens_merged = atomic_load(&s->kv_merged),
        .kv_pages_freed = atomic_load(&s->kv_freed),
        .kv_compress_prompt_s = (double)atomic_load(&s->kv_prompt_ns) * 1e-9,
        .kv_compress_decode_s = (double)atomic_load(&s->kv_decode_ns) * 1e-9,
        .prefill_bytes = atomic_load(&s->prefill_bytes_pub),
    };
    return st;
}

static void publish_counts(eng_sched *s) {
    int decoding = 0;
    for (const sreq *r = s->running.head; r; r = r->next) decoding += r->n_fed >= r->n_prompt;
    atomic_store(&s->n_decoding, decoding);
    atomic_store(&s->n_running, s->running.n);
    atomic_store(&s->n_waiting, s->waiting.n);
    atomic_store(&s->n_waiting_exempt, s->waiting.nx);
}

/* Known tokens of r: what the cache must hold before the next sample. */
static int known(const sreq *r) { return r->n_prompt + r->n_gen; }

/* Whether r, re-admitted, replays its generated tokens (compressed methods). */
static bool replays(const sreq *r) {
    return r->n_gen > 0 && r->kvs && r->kvs->cfg.method != ENG_KV_FULL;
}

static void preempt(eng_sched *s, sreq *r) {
    prefill_bytes_settle(s, r, true);
    kvp_seq_free(s->e->pool, r->kv);
    r->kv = -1;
    r->n_fed = 0;
    r->n_preempt++;
    rl_remove(&s->running, r);
    rl_push_front(&s->waiting, r);
    atomic_fetch_add(&s->preemptions, 1);
    D2_DEBUG("sched: preempted request %llu after %d tokens", (unsigned long long)r->id, r->n_gen);
}

static bool is_stop_token(const eng_model_config *mc, const sreq *r, int32_t t) {
    if (!r->ignore_eos)
        for (int i = 0; i < mc->n_eos; i++)
            if (mc->eos_ids[i] == t) return true;
    for (int i = 0; i < r->n_stop_ids; i++)
        if (r->stop_ids[i] == t) return true;
    return false;
}

/* Engine thread, under view_mu: one sequence's block-table sizes into v. */
static void view_fill(eng_sched *s, const sreq *r, eng_seq_view *v, bool finished) {
    const kvp_pool *pool = s->e->pool;
    v->id = r->id;
    v->finished = finished;
    v->n_prompt = r->n_prompt;
    v->n_generated = r->n_gen;
    v->n_fed = r->n_fed;
    if (r->kvs) {
        v->kv = r->kvs->cfg;
        v->compressed = r->kvs->compressed && r->kvs->cfg.method != ENG_KV_FULL;
    } else {
        memset(&v->kv, 0, sizeof v->kv);
        v->compressed = false;
    }
    for (int l = 0; l < s->view_layers; l++) {
        kvp_table t = kvp_get_table(pool, r->kv, l);
        v->pages[l] = t.n_pages;
        v->tokens[l] = t.n_tokens;
    }
}

/* Engine thread: copies the running sequences' block-table sizes into the view. */
static void publish_view(eng_sched *s) {
    if ((long long)(d2_now() * 1000.0) > atomic_load(&s->view_watch_until_ms)) {
        /* nobody is looking: drop the stale rows once, copy nothing */
        if (s->view_n) {
            pthread_mutex_lock(&s->view_mu);
            s->view_n = 0;
            pthread_mutex_unlock(&s->view_mu);
        }
        return;
    }
    pthread_mutex_lock(&s->view_mu);
    int n = 0;
    for (sreq *r = s->running.head; r && n < s->e->max_seqs; r = r->next)
        if (r->kv >= 0) view_fill(s, r, &s->view_seqs[n++], false);
    s->view_n = n;
    pthread_mutex_unlock(&s->view_mu);
}

/* Engine thread, before a retiring sequence's pages are freed: keeps its final
 * shape in the ring of recently finished sequences (a short request can start
 * and end between two looks at the view). */
static void view_retire(eng_sched *s, const sreq *r) {
    pthread_mutex_lock(&s->view_mu);
    uint64_t k = s->n_recent++;
    view_fill(s, r, &s->view_seqs[s->e->max_seqs + (int)(k % ENG_VIEW_RECENT)], true);
    pthread_mutex_unlock(&s->view_mu);
}

static void record_event(eng_sched *s, uint64_t id, int phase, int64_t ev, int64_t mg, int64_t fr) {
    if (ev == 0 && mg == 0 && fr == 0) return;
    pthread_mutex_lock(&s->view_mu);
    uint64_t k = ++s->n_events;
    s->events[(k - 1) % ENG_VIEW_EVENTS] = (eng_kv_event){.seq = k, .id = id, .t = d2_now(), .phase = phase,
                                                         .evicted = ev, .merged = mg, .pages_freed = fr};
    pthread_mutex_unlock(&s->view_mu);
}

int eng_sched_view_get(eng_sched *s, uint64_t since, eng_sched_view *out) {
    memset(out, 0, sizeof *out);
    atomic_store(&s->view_watch_until_ms, (long long)(d2_now() * 1000.0) + ENG_VIEW_WATCH_MS);
    pthread_mutex_lock(&s->view_mu);
    int L = s->view_layers, n_run = s->view_n;
    int n_fin = s->n_recent < ENG_VIEW_RECENT ? (int)s->n_recent : ENG_VIEW_RECENT;
    int n = n_run + n_fin;
    uint64_t first = s->n_events > ENG_VIEW_EVENTS ? s->n_events - ENG_VIEW_EVENTS + 1 : 1;
    if (since + 1 > first) first = since + 1;
    int ne = s->n_events >= first ? (int)(s->n_events - first + 1) : 0;
    out->seqs = calloc((size_t)(n ? n : 1), sizeof *out->seqs);
    out->ints_ = calloc((size_t)(n ? n : 1) * 2 * (size_t)L, sizeof *out->ints_);
    out->events = calloc((size_t)(ne ? ne : 1), sizeof *out->events);
    if (!out->seqs || !out->ints_ || !out->events) {
        pthread_mutex_unlock(&s->view_mu);
        eng_sched_view_free(out);
        return D2_ENOMEM;
    }
    out->n_layers = L;
    out->n_seqs = n;
    for (int i = 0; i < n; i++) {
        /* running ones first, then the finished ring newest first */
        int src = i < n_run ? i : s->e->max_seqs + (int)((s->n_recent - 1 - (uint64_t)(i - n_run)) % ENG_VIEW_RECENT);
        out->seqs[i] = s->view_seqs[src];
        out->seqs[i].pages = out->ints_ + (size_t)i * 2 * (size_t)L;
        out->seqs[i].tokens = out->seqs[i].pages + L;
        memcpy(out->seqs[i].pages, s->view_seqs[src].pages, sizeof(int32_t) * 2 * (size_t)L);
    }
    for (int i = 0; i < ne; i++) out->events[i] = s->events[(first + (uint64_t)i - 1) % ENG_VIEW_EVENTS];
    out->n_events = ne;
    out->last_event = s->n_events;
    pthread_mutex_unlock(&s->view_mu);
    return D2_OK;
}

void eng_sched_view_free(eng_sched_view *v) {
    if (!v) return;
    free(v->seqs);
    free(v->ints_);
    free(v->events);
    memset(v, 0, sizeof *v);
}

/* 1-2: newly submitted requests join the waiting queue; cancelled ones retire. */
static void sched_intake(eng_sched *s) {
    pthread_mutex_lock(&s->mu);
    while (s->incoming.head) {
        sreq *r = s->incoming.head;
        rl_remove(&s->incoming, r);
        rl_push_back(&s->waiting, r);
    }
    pthread_mutex_unlock(&s->mu);
    for (rlist *l = &s->waiting; l; l = l == &s->waiting ? &s->running : NULL) {
        for (sreq *r = l->head, *nx; r; r = nx) {
            nx = r->next;
            if (atomic_load(&r->cancel)) {
                rl_remove(l, r);
                retire(s, r, ENG_FINISH_ERROR, D2_ECANCELED);
            }
        }
    }
}

/* Pages that running sequences still owe their prefill: up to prefill_end
 * (where a compressed prompt is compressed) the cache holds n_fed tokens and
 * grows, chunk by chunk, to prefill_end. */
static int64_t prefill_pages_owed(const eng_sched *s, int n_layers, int page_tokens) {
    int64_t owed = 0;
    for (const sreq *r = s->running.head; r; r = r->next)
        if (r->n_fed < r->prefill_end)
            owed += eng__pages_for(r->prefill_end, page_tokens) - eng__pages_for(r->n_fed, page_tokens);
    return owed * n_layers;
}

/* 3: admission by pages — the request's known tokens, with a watermark of one
 * page per layer for every running sequence's next decode, against the pages
 * free less those that admitted prefills will still take (without that, every
 * prompt of a burst was admitted against the same free pages and the pool ran
 * out mid-prefill: preemptions, each one a prompt prefilled again) — and by
 * prefill scratch (D2O's column sums, allocated here, freed by the prompt
 * compression) within prefill_bytes_limit. */
static void sched_admit(eng_sched *s) {
    eng_engine *e = s->e;
    int n_layers = e->model->cfg.n_layers;
    int page_tokens = kvp_get_config(e->pool)->page_tokens;
    while (s->waiting.head && s->running.n < e->max_seqs) {
        sreq *r = s->waiting.head;
        int64_t free_pages = kvp_get_stats(e->pool).pages_free - prefill_pages_owed(s, n_layers, page_tokens);
        int64_t need = (int64_t)n_layers * eng__pages_for(known(r) + 1, page_tokens);
        int64_t watermark = (int64_t)n_layers * s->running.n;
        if (need + watermark > free_pages && s->running.n > 0) break;
        if (need > free_pages) break; /* nothing running: pages will not come back; wait */
        /* A compressed request re-admitted after a preemption replays: its
         * prompt is prefilled and compressed at the same point as the first
         * time, then the tokens it generated are fed one per step with
         * decode-time eviction (build_plan), so its cache and its output are
         * those of an unpreempted run. The cost: one step per generated token. */
        int pend = replays(r) ? r->n_prompt : known(r);
        /* prefill scratch: within the limit, or alone (a prefill always runs) */
        int64_t pb = r->kvs ? (int64_t)eng_kv_prefill_bytes(&r->kvs->cfg, &e->model->cfg, pend) : 0;
        if (pb > 0 && s->prefill_bytes > 0 && s->prefill_bytes + pb > s->prefill_bytes_limit) break;
        int rc = kvp_seq_new(e->pool, &r->kv);
        if (rc != D2_OK) break;
        if (r->kvs && (rc = eng_kv_prefill_begin(r->kvs, pend)) != D2_OK) {
            kvp_seq_free(e->pool, r->kv);
            r->kv = -1;
            break; /* no memory for the column sums now: wait */
        }
        rl_remove(&s->waiting, r);
        rl_push_back(&s->running, r);
        r->admit_seq = ++s->admit_counter;
        r->n_fed = 0;
        r->prefill_end = pend;
        r->prefill_bytes = pb;
        s->prefill_bytes += pb;
        atomic_store(&s->prefill_bytes_pub, s->prefill_bytes);
    }
    if (s->running.n == 0 && s->waiting.head) {
        /* Cannot happen with the submit-time check unless the pool leaked;
         * fail the head request rather than spin. */
        sreq *r = s->waiting.head;
        rl_remove(&s->waiting, r);
        D2_ERROR("sched: request %llu cannot be admitted into an idle pool", (unsigned long long)r->id);
        retire(s, r, ENG_FINISH_ERROR, D2_EKVFULL);
    }
}

/* How the token of a request's logit row is chosen after a step: the
 * backend's argmax (plain greedy, no logprobs: no vocabulary leaves the
 * backend), a device draw (the sampler allows one, no logprobs), else the
 * sampler over the host row. A function of the request's settings alone (no
 * RNG), so the plan (host_logits) and the commit cannot disagree. */
typedef enum { PICK_ARGMAX, PICK_DRAW, PICK_HOST } pick_path;

static pick_path pick_of(const eng_sched *s, const sreq *r) {
    if (r->want_logprobs) return PICK_HOST;
    if (eng_sampler_is_plain_greedy(&r->sampler)) return PICK_ARGMAX;
    if (eng__step_can_sample(s->e) && eng_sampler_device_eligible(&r->sampler)) return PICK_DRAW;
    return PICK_HOST;
}

/* One plan over the running sequences: decode tokens first (and the replayed
 * tokens of a compressed request after a preemption, one per step), then
 * prefill chunks in admission order, up to max_batch_tokens; a prefill chunk
 * never crosses prefill_end, where the prompt compression runs. */
static void build_plan(eng_sched *s) {
    eng_plan *p = &s->plan;
    eng__plan_reset(p);
    for (int pass = 0; pass < 2; pass++) {
        for (sreq *r = s->running.head; r; r = r->next) {
            int todo = known(r) - r->n_fed;
            bool replay = todo > 1 && r->n_fed >= r->prefill_end;
            bool decode = todo == 1 || replay;
            if ((pass == 0) != decode || todo <= 0) continue;
            int take = replay ? 1 : todo;
            if (!decode && r->n_fed < r->prefill_end && take > r->prefill_end - r->n_fed)
                take = r->prefill_end - r->n_fed;
            if (take > p->cap_tokens - p->n_tokens) take = p->cap_tokens - p->n_tokens;
            if (take <= 0) continue;
            eng_batch_seq *bs = eng__plan_add(p, r->kv, r->tokens + r->n_fed, take, r->n_fed,
                                              r->n_fed + take == known(r), false);
            if (!bs) continue;
            bs->host_logits = bs->want_logits && pick_of(s, r) == PICK_HOST;
            if (r->kvs) eng_kv_plan_seq(r->kvs, r->prefill_end, bs);
            s->plan_req[p->n_seqs - 1] = r;
        }
    }
}

/* 4-5: plan, preempting the newest running sequence while the pool cannot hold it. */
static void sched_plan(eng_sched *s) {
    for (;;) {
        build_plan(s);
        if (eng__plan_pages_needed(s->e, &s->plan) <= kvp_get_stats(s->e->pool).pages_free ||
            s->running.n <= 1)
            break;
        sreq *victim = s->running.head;
        for (sreq *r = s->running.head; r; r = r->next)
            if (r->admit_seq > victim->admit_seq) victim = r;
        preempt(s, victim);
    }
}

/* KV compression of one planned request after the step; counters updated. */
static int commit_compress(eng_sched *s, sreq *r, int fed) {
    eng_kv_state *ks = r->kvs;
    int64_t ev0 = ks->n_evicted, mg0 = ks->n_merged, fr0 = ks->n_pages_freed;
    int phase = ks->compressed ? ENG_KV_EVENT_DECODE : ENG_KV_EVENT_PREFILL;
    double t0 = d2_now();
    int crc = eng__step_compress(s->e, r->kv, ks, fed, r->prefill_end);
    long long ns = (long long)((d2_now() - t0) * 1e9);
    atomic_fetch_add(phase == ENG_KV_EVENT_PREFILL ? &s->kv_prompt_ns : &s->kv_decode_ns, ns);
    if (crc != D2_OK)
        D2_ERROR("sched: KV compression of request %llu failed: %s", (unsigned long long)r->id,
                 d2_strerror(crc));
    prefill_bytes_settle(s, r, false);
    if (ks->compressed) eng_kv_track(ks, s->e->pool, r->kv);
    atomic_fetch_add(&s->kv_evicted, ks->n_evicted - ev0);
    atomic_fetch_add(&s->kv_merged, ks->n_merged - mg0);
    atomic_fetch_add(&s->kv_freed, ks->n_pages_freed - fr0);
    record_event(s, r->id, phase, ks->n_evicted - ev0, ks->n_merged - mg0, ks->n_pages_freed - fr0);
    return crc;
}

/* The step's device draws: every request whose row pick_of sends to a draw
 * (eng_sampler_device_draw takes the draw's uniform number from the
 * request's RNG) is drawn by the backend, all in one call; commit_sample
 * then reads its token. It runs first after the step: a device backend's
 * sample waits for its own draws, and that wait completes the step's other
 * results too (engine/backend.h), so argmax, host rows and the column sums
 * cost no further wait. A step without such requests costs nothing here. */
static void commit_draws(eng_sched *s) {
    const eng_plan *p = &s->plan;
    int n = 0, row = 0;
    for (int k = 0; k < p->n_seqs; k++) {
        s->draw_of[k] = -1;
        if (!p->seqs[k].want_logits) continue;
        sreq *r = s->plan_req[k];
        if (pick_of(s, r) == PICK_DRAW && eng_sampler_device_draw(&r->sampler, &s->draws[n])) {
            s->draw_of[k] = n;
            s->draw_row[n++] = row;
        }
        row++;
    }
    s->draw_rc = n > 0 ? eng__step_sample(s->e, s->draw_row, s->draws, n, s->draw_tok) : D2_OK;
}

/* Samples r's (plan entry k's) next token from logit row `row` by its
 * pick_of path: its device draw (commit_draws), the backend's argmax, else
 * the full sampler over the host row (flagged host_logits in the plan). */
static int commit_sample(eng_sched *s, sreq *r, int k, int row, eng_sample_result *res) {
    if (s->draw_of[k] >= 0) {
        memset(res, 0, sizeof *res);
        res->logprob = NAN;
        res->token = s->draw_tok[s->draw_of[k]];
        if (s->draw_rc != D2_OK) return s->draw_rc;
        return res->token >= 0 ? D2_OK : D2_EINVAL; /* logits the host sampler refuses too */
    }
    if (pick_of(s, r) == PICK_ARGMAX) {
        memset(res, 0, sizeof *res);
        res->logprob = NAN;
        return eng__step_argmax(s->e, row, &res->token);
    }
    const float *lg;
    int rc = eng__step_logits(s->e, row, &lg);
    return rc == D2_OK ? eng_sampler_sample(&r->sampler, lg, res) : rc;
}

/* A sampled token: recorded, reported, and the request retired when it ends. */
static void commit_token(eng_sched *s, sreq *r, const eng_sample_result *res) {
    const eng_model_config *mc = &s->e->model->cfg;
    eng_sampler_accept(&r->sampler, res->token);
    double now = d2_now();
    if (r->n_gen == 0) r->t_first = now;
    r->tokens[known(r)] = res->token;
    r->n_gen++;
    atomic_fetch_add(&s->generation_tokens, 1);
    eng_event ev = {.type = ENG_EV_TOKEN, .id = r->id, .token = res->token, .res = res,
                    .n_prompt = r->n_prompt, .n_generated = r->n_gen,
                    .n_preempted = r->n_preempt, .t_first_token = since(r, r->t_first),
                    .t_done = 0};
    int stop_cb = r->fn(r->user, &ev);
    eng_finish fin = ENG_FINISH_NONE;
    if (stop_cb || is_stop_token(mc, r, res->token)) fin = ENG_FINISH_STOP;
    else if (r->n_gen >= r->max_tokens || known(r) >= s->e->ctx_len) fin = ENG_FINISH_LENGTH;
    if (fin != ENG_FINISH_NONE) {
        rl_remove(&s->running, r);
        retire(s, r, fin, D2_OK);
    }
}

/* 7: after a successful step — device draws, compression, sampling, events,
 * retirement. Returns D2_OK, or the status of a lost backend (the caller
 * fails all). The draws come first: see commit_draws. */
static int sched_commit(eng_sched *s) {
    const eng_plan *p = &s->plan;
    commit_draws(s);
    for (int k = 0; k < p->n_seqs; k++) {
        if (!s->plan_req[k]->kvs) continue;
        int crc = commit_compress(s, s->plan_req[k], s->plan_req[k]->n_fed + p->seqs[k].n);
        if (eng__step_backend_lost(crc)) return crc;
    }
    int row = 0;
    for (int k = 0; k < p->n_seqs; k++) {
        const eng_batch_seq *bs = &p->seqs[k];
        sreq *r = s->plan_req[k];
        if (r->n_fed < r->n_prompt)
            atomic_fetch_add(&s->prompt_tokens,
                             (r->n_fed + bs->n < r->n_prompt ? bs->n : r->n_prompt - r->n_fed));
        r->n_fed += bs->n;
        if (!bs->want_logits) continue;
        eng_sample_result res;
        int rc = commit_sample(s, r, k, row++, &res);
        if (rc != D2_OK) {
            rl_remove(&s->running, r);
            retire(s, r, ENG_FINISH_ERROR, rc);
            if (eng__step_backend_lost(rc)) return rc; /* the rest: sched_fail_all */
            continue;
        }
        commit_token(s, r, &res);
    }
    return D2_OK;
}

/* The backend is lost (status rc): record why once, refuse new work, and end
 * every request — running, waiting and just submitted — with rc. */
static void sched_fail_all(eng_sched *s, int rc) {
    if (!atomic_load(&s->fatal)) {
        snprintf(s->fatal_why, sizeof s->fatal_why, "%s", eng__step_backend_error(s->e));
        D2_ERROR("engine: the %s backend cannot continue (%s): %s; failing every request",
                 s->e->caps.name, d2_strerror(rc), s->fatal_why);
        pthread_mutex_lock(&s->mu);
        s->closed = true;
        pthread_mutex_unlock(&s->mu);
        atomic_store(&s->fatal, rc);
    }
    sched_intake(s);
    for (rlist *l = &s->running; l; l = l == &s->running ? &s->waiting : NULL) {
        while (l->head) {
            sreq *r = l->head;
            rl_remove(l, r);
            retire(s, r, ENG_FINISH_ERROR, rc);
        }
    }
}

int eng_sched_fatal(eng_sched *s, char *why, size_t cap) {
    int rc = atomic_load(&s->fatal);
    if (rc && why && cap) snprintf(why, cap, "%s", s->fatal_why);
    return rc;
}

/* Every planned request ends with status rc (the step could not run). */
static void fail_plan(eng_sched *s, int rc) {
    for (int k = 0; k < s->plan.n_seqs; k++) {
        sreq *r = s->plan_req[k];
        rl_remove(&s->running, r);
        retire(s, r, ENG_FINISH_ERROR, rc);
    }
}

int eng_sched_step(eng_sched *s) {
    int fatal = atomic_load(&s->fatal);
    if (fatal) { /* a submission that raced the closing */
        sched_fail_all(s, fatal);
        publish_counts(s);
        return fatal;
    }
    sched_intake(s);
    sched_admit(s);
    publish_counts(s);
    if (s->running.n == 0) {
        publish_view(s);
        return s->waiting.n;
    }
    sched_plan(s);
    publish_counts(s);
    int rc = eng__step_execute(s->e, &s->plan);
    atomic_fetch_add(&s->steps, 1);
    if (rc == D2_EKVFULL || rc == D2_ETOOLONG) {
        /* a lone sequence longer than the pool or its table: it cannot continue */
        fail_plan(s, rc);
        publish_counts(s);
        return s->running.n + s->waiting.n;
    }
    if (rc != D2_OK) {
        fail_plan(s, rc);
        if (eng__step_backend_lost(rc)) sched_fail_all(s, rc);
        publish_counts(s);
        return rc;
    }
    rc = sched_commit(s);
    if (rc != D2_OK) {
        sched_fail_all(s, rc);
        publish_counts(s);
        return rc;
    }
    publish_counts(s);
    publish_view(s);
    return s->running.n + s->waiting.n;
}

static void *sched_thread(void *arg) {
    prctl(PR_SET_NAME, "d2od-engine", 0, 0, 0); /* for ps/top/gdb, and tests that watch this thread */
    eng_sched *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->stop && !s->incoming.head && s->running.n == 0 && s->waiting.n == 0)
            pthread_cond_wait(&s->cv, &s->mu);
        bool stop = s->stop;
        pthread_mutex_unlock(&s->mu);
        if (stop) break;
        int rc = eng_sched_step(s);
        if (rc < 0) D2_ERROR("sched: step failed: %s", d2_strerror(rc));
    }
    return NULL;
}

int eng_sched_start(eng_sched *s) {
    if (s->thread_started) return D2_EINVAL;
    if (pthread_create(&s->thread, NULL, sched_thread, s) != 0) return D2_ENOMEM;
    s->thread_started = true;
    return D2_OK;
}

void eng_sched_destroy(eng_sched *s) {
    if (!s) return;
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (s->thread_started) pthread_join(s->thread, NULL);
    /* everything still in flight ends as cancelled */
    pthread_mutex_lock(&s->mu);
    while (s->incoming.head) {
        sreq *r = s->incoming.head;
        rl_remove(&s->incoming, r);
        rl_push_back(&s->waiting, r);
    }
    pthread_mutex_unlock(&s->mu);
    while (s->running.head) {
        sreq *r = s->running.head;
        rl_remove(&s->running, r);
        retire(s, r, ENG_FINISH_ERROR, D2_ECANCELED);
    }
    while (s->waiting.head) {
        sreq *r = s->waiting.head;
        rl_remove(&s->waiting, r);
        retire(s, r, ENG_FINISH_ERROR, D2_ECANCELED);
    }
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->view_mu);
    pthread_cond_destroy(&s->cv);
    free(s->plan_req);
    free(s->draw_of);
    free(s->draw_row);
    free(s->draws);
    free(s->draw_tok);
    eng__plan_free(&s->plan);
    free(s->view_seqs);
    free(s->view_ints);
    free(s);
}
