/*
 * tests/unit/test_sched.c — the continuous-batching scheduler on stories260K:
 * preemption under a small pool gives the same greedy tokens as an ample
 * pool; cancellation frees pages; queue limits; validation; a threaded run
 * with several submitting threads; stop from the callback; close.
 */
#include <pthread.h>
#include <stdatomic.h>

#include "engine/engine.h"
#include "tests/test.h"

#define MODEL "assets/models/stories260K/stories260K.gguf"

static eng_engine *open_engine(int max_seqs, int64_t kv_pages) {
    const char *path = test_shared_path(MODEL);
    REQUIRE_FILE(path);
    eng_engine_config ec = {.model_path = path, .n_threads = 2, .max_seqs = max_seqs,
                            .kv_pages = kv_pages, .max_batch_tokens = 64};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) FAIL_("eng_engine_create = %s", d2_status_name(rc));
    return e;
}

static void fill_prompt(int32_t *p, int n, int salt) {
    p[0] = 1;
    for (int i = 1; i < n; i++) p[i] = 3 + (i * 37 + salt * 101) % 500;
}

static void run_batch(eng_engine *e, int n, int32_t out[][64], int max_tokens) {
    int32_t prompts[16][40];
    eng_gen_seq seqs[16];
    memset(seqs, 0, sizeof seqs);
    for (int i = 0; i < n; i++) {
        fill_prompt(prompts[i], 20 + i, i);
        seqs[i] = (eng_gen_seq){.prompt = prompts[i], .n_prompt = 20 + i, .max_tokens = max_tokens,
                                .ignore_eos = true, .out_tokens = out[i]};
        eng_sample_params_default(&seqs[i].sample);
        seqs[i].sample.temperature = 0;
    }
    ASSERT_OK(eng_run(e, seqs, n));
    for (int i = 0; i < n; i++) {
        ASSERT_EQ(seqs[i].status, D2_OK);
        ASSERT_EQ(seqs[i].n_out, max_tokens);
    }
}

TEST(preemption_matches_ample_pool) {
    static int32_t a[16][64], b[16][64];
    eng_engine *big = open_engine(8, 0);
    run_batch(big, 8, a, 60);
    eng_engine_destroy(big);
    /* 8 seqs x 5 layers x up to 6 pages each would need 240 pages; give 90 */
    eng_engine *small = open_engine(8, 90);
    run_batch(small, 8, b, 60);
    eng_pool_stats ps = eng_engine_pool_stats(small);
    ASSERT_EQ(ps.pages_free, ps.pages_total);
    eng_engine_destroy(small);
    for (int i = 0; i < 8; i++)
        for (int k = 0; k < 60; k++)
            if (a[i][k] != b[i][k]) FAIL_("seq %d token %d: %d vs %d", i, k, a[i][k], b[i][k]);
}

typedef struct rec {
    atomic_int tokens, done;
    atomic_int status, finish;
    eng_sched *s;
    uint64_t id;
    int cancel_after;
    int stop_after;
} rec;

static int rec_event(void *user, const eng_event *ev) {
    rec *r = user;
    if (ev->type == ENG_EV_TOKEN) {
        int n = atomic_fetch_add(&r->tokens, 1) + 1;
        if (r->cancel_after && n == r->cancel_after) eng_sched_cancel(r->s, ev->id);
        return r->stop_after && n >= r->stop_after;
    }
    atomic_store(&r->status, ev->status);
    atomic_store(&r->finish, (int)ev->finish);
    atomic_store(&r->done, 1);
    return 0;
}

static eng_request mk_req(const int32_t *p, int n, int max_tokens, rec *r) {
    eng_request q = {.prompt = p, .n_prompt = n, .max_tokens = max_tokens, .ignore_eos = true,
                     .on_event = rec_event, .user = r};
    eng_sample_params_default(&q.sample);
    q.sample.temperature = 0;
    return q;
}

TEST(preemptions_are_counted) {
    eng_engine *e = open_engine(8, 60);
    eng_sched *s;
    eng_sched_config sc = {.max_queue = 16};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    int32_t p[8][40];
    rec r[8];
    memset(r, 0, sizeof r);
    for (int i = 0; i < 8; i++) {
        fill_prompt(p[i], 30, i);
        eng_request q = mk_req(p[i], 30, 90, &r[i]);
        ASSERT_OK(eng_sched_submit(s, &q, NULL, NULL));
    }
    int guard = 0;
    while (eng_sched_step(s) > 0) ASSERT_LT(guard++, 100000);
    eng_sched_stats st = eng_sched_get_stats(s);
    ASSERT_GT(st.preemptions, 0);
    ASSERT_EQ(st.finished_length, 8);
    for (int i = 0; i < 8; i++) ASSERT_EQ(atomic_load(&r[i].tokens), 90);
    eng_pool_stats ps = eng_engine_pool_stats(e);
    ASSERT_EQ(ps.pages_free, ps.pages_total);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
}

TEST(cancel_frees_pages) {
    eng_engine *e = open_engine(4, 0);
    eng_sched *s;
    eng_sched_config sc = {.max_queue = 4};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    int32_t p[20];
    fill_prompt(p, 20, 3);
    rec r = {0};
    r.s = s;
    r.cancel_after = 5;
    eng_request q = mk_req(p, 20, 200, &r);
    ASSERT_OK(eng_sched_submit(s, &q, &r.id, NULL));
    int guard = 0;
    while (eng_sched_step(s) > 0) ASSERT_LT(guard++, 1000);
    ASSERT_EQ(atomic_load(&r.done), 1);
    ASSERT_EQ(atomic_load(&r.status), D2_ECANCELED);
    ASSERT_LE(atomic_load(&r.tokens), 6);
    eng_pool_stats ps = eng_engine_pool_stats(e);
    ASSERT_EQ(ps.pages_free, ps.pages_total);
    ASSERT_EQ(eng_sched_get_stats(s).finished_canceled, 1);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
}

TEST(stop_from_callback) {
    eng_engine *e = open_engine(2, 0);
    eng_sched *s;
    eng_sched_config sc = {.max_queue = 4};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    int32_t p[10];
    fill_prompt(p, 10, 1);
    rec r = {0};
    r.stop_after = 7;
    eng_request q = mk_req(p, 10, 100, &r);
    ASSERT_OK(eng_sched_submit(s, &q, NULL, NULL));
    while (eng_sched_step(s) > 0) {}
    ASSERT_EQ(atomic_load(&r.tokens), 7);
    ASSERT_EQ(atomic_load(&r.finish), ENG_FINISH_STOP);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
}

TEST(queue_limit_and_validation) {
    eng_engine *e = open_engine(2, 0);
    eng_sched *s;
    eng_sched_config sc = {.max_queue = 2};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    static int32_t p[4200];
    fill_prompt(p, 4200, 0);
    rec r[8];
    memset(r, 0, sizeof r);
    const char *why = NULL;
    /* max_queue counts what waits beyond the 2 free slots: 2 + 2 accepted
     * (issue 14: the running ones were counted against the queue) */
    eng_request q = mk_req(p, 10, 5, &r[0]);
    for (int i = 0; i < 4; i++) {
        q.user = &r[4 + i];
        ASSERT_OK(eng_sched_submit(s, &q, NULL, &why));
    }
    q.user = &r[2];
    ASSERT_EQ(eng_sched_submit(s, &q, NULL, &why), D2_EQUEUEFULL);
    ASSERT(why != NULL);
    /* a further choice of an accepted request is never refused by the queue */
    q.queue_exempt = true;
    q.user = &r[0];
    ASSERT_OK(eng_sched_submit(s, &q, NULL, &why));
    q.user = &r[1];
    ASSERT_OK(eng_sched_submit(s, &q, NULL, &why));
    q.queue_exempt = false;
    eng_request bad = mk_req(p, 0, 5, &r[3]);
    ASSERT_EQ(eng_sched_submit(s, &bad, NULL, &why), D2_EINVAL);
    ASSERT_LT(eng_engine_ctx_len(e), 4200);
    bad = mk_req(p, eng_engine_ctx_len(e), 5, &r[3]);
    ASSERT_EQ(eng_sched_submit(s, &bad, NULL, &why), D2_ETOOLONG);
    bad = mk_req(p, 10, 5, &r[3]);
    bad.sample.temperature = 5;
    ASSERT_EQ(eng_sched_submit(s, &bad, NULL, &why), D2_EINVAL);
    int32_t oov[3] = {1, 100000, 5};
    bad = mk_req(oov, 3, 5, &r[3]);
    ASSERT_EQ(eng_sched_submit(s, &bad, NULL, &why), D2_EINVAL);
    while (eng_sched_step(s) > 0) {}
    ASSERT_EQ(atomic_load(&r[0].tokens), 5);
    ASSERT_EQ(atomic_load(&r[1].tokens), 5);
    ASSERT_EQ(atomic_load(&r[7].tokens), 5);
    /* max_queue 0: accepted only while a slot is free (it made every request a 429) */
    eng_sched_set_max_queue(s, 0);
    q.user = &r[4];
    ASSERT_OK(eng_sched_submit(s, &q, NULL, &why));
    q.user = &r[5];
    ASSERT_OK(eng_sched_submit(s, &q, NULL, &why));
    q.user = &r[6];
    ASSERT_EQ(eng_sched_submit(s, &q, NULL, &why), D2_EQUEUEFULL);
    while (eng_sched_step(s) > 0) {}
    eng_sched_close(s);
    q.user = &r[3];
    ASSERT_EQ(eng_sched_submit(s, &q, NULL, &why), D2_EAGAIN);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
}

/* D2O's prefill column sums (layers x heads x prefill floats) are held only
 * from admission to the prompt compression and are counted in admission:
 * with a limit of about one request's scratch, three D2O requests start
 * their prefills one at a time, and a request larger than the limit still
 * runs alone. (The buffer used to be allocated at submit and held to the
 * end: all three were admitted at once and nothing was counted.) */
TEST(prefill_scratch_counted_in_admission) {
    eng_engine *e = open_engine(4, 0);
    eng_sched *s;
    /* stories260K: 5 layers x 8 heads x 40 tokens x 4 bytes = 6400 per request */
    eng_sched_config sc = {.max_queue = 8, .prefill_bytes_limit = 7000};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    int32_t p[3][40];
    rec r[3];
    memset(r, 0, sizeof r);
    for (int i = 0; i < 3; i++) {
        fill_prompt(p[i], 40, i);
        eng_request q = mk_req(p[i], 40, 6, &r[i]);
        eng_kv_config_default(&q.kv, ENG_KV_D2O);
        ASSERT_OK(eng_sched_submit(s, &q, NULL, NULL));
    }
    eng_sched_stats st = eng_sched_get_stats(s);
    ASSERT_EQ(st.prefill_bytes, 0); /* nothing allocated for queued requests */
    ASSERT_GT(eng_sched_step(s), 0);
    st = eng_sched_get_stats(s);
    ASSERT_EQ(st.running, 1);  /* the second one would exceed the limit */
    ASSERT_EQ(st.waiting, 2);
    ASSERT_EQ(st.prefill_bytes, 0); /* the first prompt is compressed: scratch freed */
    int guard = 0;
    while (eng_sched_step(s) > 0) {
        ASSERT_LE(eng_sched_get_stats(s).prefill_bytes, 7000);
        ASSERT_LT(guard++, 1000);
    }
    for (int i = 0; i < 3; i++) {
        ASSERT_EQ(atomic_load(&r[i].status), D2_OK);
        ASSERT_EQ(atomic_load(&r[i].tokens), 6);
    }
    ASSERT_EQ(eng_sched_get_stats(s).prefill_bytes, 0);
    eng_sched_destroy(s);
    /* a limit below one request: it runs alone */
    sc.prefill_bytes_limit = 100;
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    rec one = {0};
    eng_request q = mk_req(p[0], 40, 3, &one);
    eng_kv_config_default(&q.kv, ENG_KV_D2O);
    ASSERT_OK(eng_sched_submit(s, &q, NULL, NULL));
    guard = 0;
    while (eng_sched_step(s) > 0) ASSERT_LT(guard++, 100);
    ASSERT_EQ(atomic_load(&one.tokens), 3);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
}

/* A preempted D2O request must continue exactly as if it had not been
 * preempted: the same greedy tokens and the same per-layer cache lengths at
 * the end. (Re-admission used to prefill prompt + generated tokens as one
 * prompt and compress it: the fractional budget grew with the tokens
 * generated so far and evicted tokens came back.) */
typedef struct kvrec {
    int32_t toks[64];
    int n, done, preempted;
    int live[8];
} kvrec;

static int kvrec_event(void *user, const eng_event *ev) {
    kvrec *k = user;
    if (ev->type == ENG_EV_TOKEN) {
        if (k->n < 64) k->toks[k->n++] = ev->token;
        return 0;
    }
    k->done = 1;
    k->preempted = ev->n_preempted;
    for (int l = 0; ev->kv && l < ev->kv->n_layers && l < 8; l++) k->live[l] = ev->kv->layers[l].live;
    return 0;
}

/* official: the official preset (granularity head, one eviction per step). */
static void run_d2o_beside(int64_t kv_pages, int n_others, bool official, kvrec *out) {
    eng_engine *e = open_engine(8, kv_pages);
    eng_sched *s;
    eng_sched_config sc = {.max_queue = 16};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    static int32_t p[8][80];
    rec r[8];
    memset(r, 0, sizeof r);
    for (int i = 0; i < n_others; i++) { /* full-cache requests admitted first, growing long */
        fill_prompt(p[i], 8, 10 + i);
        eng_request q = mk_req(p[i], 8, 150, &r[i]);
        ASSERT_OK(eng_sched_submit(s, &q, NULL, NULL));
    }
    fill_prompt(p[7], 64, 3);
    memset(out, 0, sizeof *out);
    eng_request q = {.prompt = p[7], .n_prompt = 64, .max_tokens = 48, .ignore_eos = true,
                     .on_event = kvrec_event, .user = out};
    eng_sample_params_default(&q.sample);
    q.sample.temperature = 0;
    eng_kv_config_default(&q.kv, ENG_KV_D2O);
    if (official) ASSERT_OK(eng_kv_preset_apply(&q.kv, "official", NULL));
    ASSERT_OK(eng_sched_submit(s, &q, NULL, NULL));
    int guard = 0;
    while (eng_sched_step(s) > 0) ASSERT_LT(guard++, 100000);
    ASSERT_EQ(out->done, 1);
    ASSERT_EQ(out->n, 48);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
}

static void replays_exactly(bool official) {
    kvrec alone, squeezed;
    run_d2o_beside(0, 0, official, &alone);
    ASSERT_EQ(alone.preempted, 0);
    /* 3 full-cache requests (8-token prompts, growing to 158 tokens) beside
     * the D2O one in a 60-page pool (5 layers): around its 35th token the
     * plan no longer fits and the newest running request, the D2O one, is
     * preempted; it is re-admitted once pages return */
    run_d2o_beside(60, 3, official, &squeezed);
    ASSERT_GT(squeezed.preempted, 0);
    for (int k = 0; k < 48; k++)
        if (alone.toks[k] != squeezed.toks[k])
            FAIL_("token %d: %d alone, %d after %d preemption(s)", k, alone.toks[k], squeezed.toks[k],
                  squeezed.preempted);
    for (int l = 0; l < 5; l++)
        if (alone.live[l] != squeezed.live[l])
            FAIL_("layer %d holds %d tokens alone, %d after %d preemption(s)", l, alone.live[l],
                  squeezed.live[l], squeezed.preempted);
}

TEST(preempted_d2o_request_replays_exactly) { replays_exactly(false); }

/* The same with the official preset: per-KV-head kept sets, one eviction per
 * step; the replay must rebuild every head's set. */
TEST(preempted_official_request_replays_exactly) { replays_exactly(true); }

typedef struct submitter { eng_sched *s; rec *recs; int base; } submitter;
static int32_t g_prompts[32][24];

static void *submit_thread(void *arg) {
    submitter *t = arg;
    for (int i = 0; i < 8; i++) {
        int k = t->base + i;
        eng_request q = mk_req(g_prompts[k], 24, 16 + k % 5, &t->recs[k]);
        int rc;
        while ((rc = eng_sched_submit(t->s, &q, NULL, NULL)) == D2_EQUEUEFULL) usleep(1000);
        if (rc != D2_OK) atomic_store(&t->recs[k].status, rc);
    }
    return NULL;
}

TEST(threaded_many_submitters) {
    eng_engine *e = open_engine(8, 0);
    eng_sched *s;
    eng_sched_config sc = {.max_queue = 6};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    ASSERT_OK(eng_sched_start(s));
    static rec recs[32];
    memset(recs, 0, sizeof recs);
    for (int k = 0; k < 32; k++) fill_prompt(g_prompts[k], 24, k);
    pthread_t th[4];
    submitter sub[4];
    for (int t = 0; t < 4; t++) {
        sub[t] = (submitter){s, recs, t * 8};
        pthread_create(&th[t], NULL, submit_thread, &sub[t]);
    }
    for (int t = 0; t < 4; t++) pthread_join(th[t], NULL);
    for (int k = 0; k < 32; k++) {
        int guard = 0;
        while (!atomic_load(&recs[k].done)) {
            usleep(2000);
            ASSERT_LT(guard++, 20000);
        }
        ASSERT_EQ(atomic_load(&recs[k].status), D2_OK);
        ASSERT_EQ(atomic_load(&recs[k].tokens), 16 + k % 5);
    }
    eng_sched_stats st = eng_sched_get_stats(s);
    ASSERT_EQ(st.generation_tokens, 32 * 16 + (0 + 1 + 2 + 3 + 4) * 6 + (0 + 1));
    eng_sched_destroy(s);
    eng_pool_stats ps = eng_engine_pool_stats(e);
    ASSERT_EQ(ps.pages_free, ps.pages_total);
    eng_engine_destroy(e);
}

/* The live view (eng_sched_view_get): nothing is copied until someone reads
 * it; then, while a compressed request runs, it lists the sequence with its
 * pages per layer; when it ends the finished ring keeps
 * its final shape (compressed middle layers below the kept first layer); the
 * compression events carry the evicted/merged/freed deltas, add up to the
 * scheduler's counters, and `since` leaves out the ones already seen. */
TEST(live_view_and_events) {
    eng_engine *e = open_engine(4, 0);
    eng_sched *s;
    eng_sched_config sc = {.max_queue = 4};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    int32_t p[120];
    fill_prompt(p, 120, 9);
    rec r = {0};
    eng_request q = mk_req(p, 120, 100, &r);
    eng_kv_config_default(&q.kv, ENG_KV_D2O);
    q.kv.budget_frac = 0.2f;
    uint64_t id;
    ASSERT_OK(eng_sched_submit(s, &q, &id, NULL));
    eng_sched_view v;
    /* nobody watched yet: the steps copied nothing, so no running row */
    for (int k = 0; k < 3; k++) ASSERT_GT(eng_sched_step(s), 0);
    ASSERT_OK(eng_sched_view_get(s, 0, &v));
    ASSERT_EQ(v.n_seqs, 0);
    eng_sched_view_free(&v);
    bool seen_running = false;
    int guard = 0;
    while (eng_sched_step(s) > 0) {
        ASSERT_LT(guard++, 10000);
        ASSERT_OK(eng_sched_view_get(s, 0, &v));
        if (v.n_seqs >= 1 && !v.seqs[0].finished) {
            ASSERT_EQ(v.seqs[0].id, id);
            ASSERT_EQ(v.seqs[0].kv.method, ENG_KV_D2O);
            ASSERT_EQ(v.n_layers, 5);
            ASSERT_GT(v.seqs[0].pages[0], 0);
            seen_running = true;
        }
        eng_sched_view_free(&v);
    }
    ASSERT(seen_running);
    ASSERT_OK(eng_sched_view_get(s, 0, &v));
    ASSERT_EQ(v.n_seqs, 1);
    ASSERT(v.seqs[0].finished);
    ASSERT(v.seqs[0].compressed);
    ASSERT_EQ(v.seqs[0].n_generated, 100);
    ASSERT_LT(v.seqs[0].pages[2], v.seqs[0].pages[0]); /* layer 2 compressed, layer 0 kept */
    ASSERT_LT(v.seqs[0].tokens[2], v.seqs[0].tokens[0]);
    ASSERT_GT(v.n_events, 1);
    ASSERT_EQ(v.events[0].phase, ENG_KV_EVENT_PREFILL);
    int64_t ev = 0, mg = 0, fr = 0;
    for (int i = 0; i < v.n_events; i++) {
        ASSERT_EQ(v.events[i].seq, (uint64_t)i + 1);
        ASSERT_EQ(v.events[i].id, id);
        ev += v.events[i].evicted;
        mg += v.events[i].merged;
        fr += v.events[i].pages_freed;
    }
    eng_sched_stats st = eng_sched_get_stats(s);
    ASSERT_EQ(ev, st.kv_tokens_evicted);
    ASSERT_EQ(mg, st.kv_tokens_merged);
    ASSERT_EQ(fr, st.kv_pages_freed);
    ASSERT_GT(ev, 0);
    uint64_t last = v.last_event;
    eng_sched_view_free(&v);
    ASSERT_OK(eng_sched_view_get(s, last - 1, &v));
    ASSERT_EQ(v.n_events, 1);
    ASSERT_EQ(v.events[0].seq, last);
    eng_sched_view_free(&v);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
}

/* ---- greedy tokens chosen by the backend -------------------------------------------
 * A plain-greedy request that wants no logprobs takes the backend's argmax (the
 * logits need not leave a device); with logprobs it goes through the sampler
 * over host logits. Both must give the same tokens, and the argmax path must
 * leave the logprob unset (NaN) since nothing computed it. */

typedef struct greedy_rec {
    int32_t toks[48];
    float lp[48];
    int n, done;
} greedy_rec;

static int greedy_event(void *user, const eng_event *ev) {
    greedy_rec *g = user;
    if (ev->type == ENG_EV_TOKEN && g->n < 48) {
        g->toks[g->n] = ev->token;
        g->lp[g->n] = ev->res->logprob;
        g->n++;
    }
    if (ev->type == ENG_EV_DONE) g->done = 1;
    return 0;
}

TEST(backend_argmax_matches_sampler) {
    eng_engine *e = open_engine(4, 0);
    eng_sched *s;
    eng_sched_config sc = {.max_queue = 8};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    int32_t prompt[24];
    fill_prompt(prompt, 24, 7);
    greedy_rec g[2];
    memset(g, 0, sizeof g);
    for (int i = 0; i < 2; i++) {
        eng_request q = {.prompt = prompt, .n_prompt = 24, .max_tokens = 40, .ignore_eos = true,
                         .want_logprobs = i == 1, .on_event = greedy_event, .user = &g[i]};
        eng_sample_params_default(&q.sample);
        q.sample.temperature = 0;
        uint64_t id;
        ASSERT_OK(eng_sched_submit(s, &q, &id, NULL));
    }
    while (eng_sched_step(s) > 0) {}
    ASSERT(g[0].done && g[1].done);
    ASSERT_EQ(g[0].n, 40);
    ASSERT_EQ(g[1].n, 40);
    for (int k = 0; k < 40; k++) {
        if (g[0].toks[k] != g[1].toks[k]) FAIL_("token %d: argmax %d vs sampler %d", k, g[0].toks[k], g[1].toks[k]);
        ASSERT(isnan(g[0].lp[k]));   /* chosen by the backend */
        ASSERT(!isnan(g[1].lp[k]));  /* computed by the sampler */
    }
    eng_sched_destroy(s);
    eng_engine_destroy(e);
}

/* The decoding count (d2od:num_requests_decoding) tells a sequence whose
 * prompt is in the cache from one still prefilling: with 64 tokens a step,
 * two 40-token prompts take two steps, the first finishing its prefill in
 * step 1 and the second in step 2. (Before the count existed, /metrics had
 * only the running count, which includes sequences admitted but not yet
 * prefilled, so a capacity measurement could not tell them apart.) */
TEST(decoding_count_excludes_prefilling) {
    eng_engine *e = open_engine(4, 0);
    eng_sched *s;
    eng_sched_config sc = {.max_queue = 8};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    int32_t p[2][40];
    rec r[2];
    memset(r, 0, sizeof r);
    for (int i = 0; i < 2; i++) {
        fill_prompt(p[i], 40, i);
        eng_request q = mk_req(p[i], 40, 6, &r[i]);
        ASSERT_OK(eng_sched_submit(s, &q, NULL, NULL));
    }
    ASSERT_EQ(eng_sched_get_stats(s).decoding, 0);
    ASSERT_GT(eng_sched_step(s), 0);
    eng_sched_stats st = eng_sched_get_stats(s);
    ASSERT_EQ(st.running, 2);
    ASSERT_EQ(st.decoding, 1);
    ASSERT_GT(eng_sched_step(s), 0);
    ASSERT_EQ(eng_sched_get_stats(s).decoding, 2);
    int guard = 0;
    while (eng_sched_step(s) > 0) ASSERT_LT(guard++, 1000);
    st = eng_sched_get_stats(s);
    ASSERT_EQ(st.decoding, 0);
    ASSERT_EQ(st.running, 0);
    for (int i = 0; i < 2; i++) ASSERT_EQ(atomic_load(&r[i].tokens), 6);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
}

/* Admission counts the pages that admitted sequences still owe their prompts:
 * four 100-token prompts (7 pages x 5 layers = 35 each, 10 tokens to generate
 * within the same pages) into a 90-page pool, prefilled 64 tokens a step. Two
 * fit. Before, admission compared each request with the pages free at that
 * moment, which a prompt still being prefilled has not taken yet, so all four
 * were admitted at once and the pool ran out mid-prefill: preemptions, each
 * one a prompt prefilled again. */
TEST(admission_counts_prompt_pages_owed) {
    eng_engine *e = open_engine(8, 90);
    eng_sched *s;
    eng_sched_config sc = {.max_queue = 8};
    ASSERT_OK(eng_sched_create(e, &sc, &s));
    int32_t p[4][100];
    rec r[4];
    memset(r, 0, sizeof r);
    for (int i = 0; i < 4; i++) {
        fill_prompt(p[i], 100, i);
        eng_request q = mk_req(p[i], 100, 10, &r[i]);
        ASSERT_OK(eng_sched_submit(s, &q, NULL, NULL));
    }
    int guard = 0;
    while (eng_sched_step(s) > 0) {
        ASSERT_LE(eng_sched_get_stats(s).running, 2);
        ASSERT_LT(guard++, 1000);
    }
    ASSERT_EQ(eng_sched_get_stats(s).preemptions, 0);
    for (int i = 0; i < 4; i++) ASSERT_EQ(atomic_load(&r[i].tokens), 10);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
}
