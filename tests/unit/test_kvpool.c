/*
 * tests/unit/test_kvpool.c — unit tests of the paged KV block pool
 * (kvpool/kvpool.h): creation and stats, reserve/append across pages, data
 * round trips through the block tables, D2_EKVFULL atomicity, fork with copy
 * on write, truncation, compaction (random keep masks, shared tables), id
 * validation, the payload hook (one batched call per operation, runs that
 * never overlap, freed pages reported), and a long randomised run against a
 * shadow model with kvp_check after every operation.
 *
 * The pool keeps bookkeeping only; these tests attach a host payload of their
 * own (k, v, score per slot) through kvp_set_payload, as a backend does, so
 * every round trip below also checks that the pool hands over each move.
 */

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "kvpool/kvpool.h"
#include "tests/test.h"

/* ---- helpers ---------------------------------------------------------------- */

enum { N_LAYERS = 3, N_KVH = 2, HEAD_DIM = 4, PT = 4, MAX_SEQS = 8, MAX_TOK = 64 };

static kvp_config small_cfg(int64_t n_pages) {
    kvp_config c = {.n_layers = N_LAYERS,
                    .n_kv_heads = N_KVH,
                    .head_dim = HEAD_DIM,
                    .page_tokens = PT,
                    .n_pages = n_pages,
                    .max_seqs = MAX_SEQS,
                    .max_seq_tokens = MAX_TOK};
    return c;
}

/* ---- the test payload: what a host backend keeps per slot ----------------------- */

enum { SLOT_F = N_KVH * HEAD_DIM };

typedef struct test_payload {
    const kvp_pool *pool;
    float *k, *v, *score;  /* [n_pages * PT][SLOT_F], [..][N_KVH] */
    int calls, runs, overlapping, freed;
} test_payload;

static test_payload *payloads[32];

static void payload_copy(void *ctx, const kvp_slot_run *runs, int n_runs) {
    test_payload *tp = ctx;
    tp->calls++;
    for (int r = 0; r < n_runs; r++) {
        const kvp_slot_run *u = &runs[r];
        size_t d = (size_t)u->dst_page * PT + (size_t)u->dst_slot;
        size_t s = (size_t)u->src_page * PT + (size_t)u->src_slot;
        if (d < s + (size_t)u->n && s < d + (size_t)u->n) tp->overlapping++;
        memmove(tp->k + d * SLOT_F, tp->k + s * SLOT_F, (size_t)u->n * SLOT_F * sizeof(float));
        memmove(tp->v + d * SLOT_F, tp->v + s * SLOT_F, (size_t)u->n * SLOT_F * sizeof(float));
        memmove(tp->score + d * N_KVH, tp->score + s * N_KVH, (size_t)u->n * N_KVH * sizeof(float));
        tp->runs++;
    }
}

static void payload_freed(void *ctx, int32_t page) {
    test_payload *tp = ctx;
    tp->freed++;
    for (size_t i = 0; i < (size_t)PT * SLOT_F; i++)
        tp->k[(size_t)page * PT * SLOT_F + i] = tp->v[(size_t)page * PT * SLOT_F + i] = NAN;
}

/* The payload of p, attached on first use (before that nothing was written). */
static test_payload *payload_of(kvp_pool *p) {
    int free_i = -1;
    for (int i = 0; i < 32; i++) {
        if (payloads[i] && payloads[i]->pool == p) return payloads[i];
        if (!payloads[i] && free_i < 0) free_i = i;
    }
    ASSERT(free_i >= 0);
    size_t n_slots = (size_t)kvp_get_config(p)->n_pages * PT;
    test_payload *tp = calloc(1, sizeof *tp);
    ASSERT(tp != NULL);
    tp->pool = p;
    tp->k = calloc(n_slots * SLOT_F, sizeof(float));
    tp->v = calloc(n_slots * SLOT_F, sizeof(float));
    tp->score = calloc(n_slots * N_KVH, sizeof(float));
    ASSERT(tp->k && tp->v && tp->score);
    payloads[free_i] = tp;
    kvp_payload pl = {.copy = payload_copy, .freed = payload_freed, .ctx = tp};
    kvp_set_payload(p, &pl);
    return tp;
}

static void test_pool_destroy(kvp_pool *p) {
    for (int i = 0; i < 32; i++)
        if (payloads[i] && payloads[i]->pool == p) {
            free(payloads[i]->k); free(payloads[i]->v); free(payloads[i]->score);
            free(payloads[i]);
            payloads[i] = NULL;
        }
    (kvp_destroy)(p);
}
/* every pool the tests destroy drops its payload too */
#define kvp_destroy(p) test_pool_destroy(p)

static kvp_pool *make_pool(int64_t n_pages) {
    kvp_config c = small_cfg(n_pages);
    kvp_pool *p = NULL;
    if (kvp_create(&c, &p) != D2_OK || !p) FAIL_("kvp_create failed");
    payload_of(p);
    return p;
}

/* The value a slot holding token `id` carries: exact small integers, distinct
 * per (id, head, dim) and between k and v. */
static float kval(uint32_t id, int h, int d) { return (float)(id * 64u + (uint32_t)(h * 8 + d)); }
static float vval(uint32_t id, int h, int d) { return -kval(id, h, d) - 1.0f; }
static float sval(uint32_t id, int h) { return (float)id + 0.5f * (float)h; }

static size_t slot_index(kvp_pool *p, int seq, int layer, int i) {
    kvp_table t = kvp_get_table(p, seq, layer);
    int32_t pg;
    int slot;
    kvp_locate(&t, PT, i, &pg, &slot);
    return (size_t)pg * PT + (size_t)slot;
}

/* Writes token `id` into logical slot i of (seq, layer): k, v, pos, score. */
static void write_slot(kvp_pool *p, int seq, int layer, int i, uint32_t id) {
    kvp_table t = kvp_get_table(p, seq, layer);
    ASSERT(i < t.n_tokens);
    int32_t pg;
    int slot;
    kvp_locate(&t, PT, i, &pg, &slot);
    test_payload *tp = payload_of(p);
    size_t s = (size_t)pg * PT + (size_t)slot;
    float *k = tp->k + s * SLOT_F;
    float *v = tp->v + s * SLOT_F;
    for (int h = 0; h < N_KVH; h++)
        for (int d = 0; d < HEAD_DIM; d++) {
            k[h * HEAD_DIM + d] = kval(id, h, d);
            v[h * HEAD_DIM + d] = vval(id, h, d);
        }
    kvp_pos_base(p)[s] = (int32_t)id;
    for (int h = 0; h < N_KVH; h++) tp->score[s * N_KVH + (size_t)h] = sval(id, h);
}

/* Returns 1 when logical slot i of (seq, layer) holds token id exactly. */
static int slot_holds(kvp_pool *p, int seq, int layer, int i, uint32_t id) {
    kvp_table t = kvp_get_table(p, seq, layer);
    if (i >= t.n_tokens) return 0;
    int32_t pg;
    int slot;
    kvp_locate(&t, PT, i, &pg, &slot);
    test_payload *tp = payload_of(p);
    size_t s = (size_t)pg * PT + (size_t)slot;
    const float *k = tp->k + s * SLOT_F;
    const float *v = tp->v + s * SLOT_F;
    for (int h = 0; h < N_KVH; h++)
        for (int d = 0; d < HEAD_DIM; d++)
            if (k[h * HEAD_DIM + d] != kval(id, h, d) || v[h * HEAD_DIM + d] != vval(id, h, d))
                return 0;
    if (kvp_pos_base(p)[s] != (int32_t)id) return 0;
    for (int h = 0; h < N_KVH; h++)
        if (tp->score[s * N_KVH + (size_t)h] != sval(id, h)) return 0;
    return 1;
}

/* Reserves, appends and writes n tokens with ids first_id.. into (seq, layer). */
static void append_ids(kvp_pool *p, int seq, int layer, int n, uint32_t first_id) {
    ASSERT_EQ(kvp_reserve(p, seq, layer, n), D2_OK);
    int first = kvp_append(p, seq, layer, n);
    ASSERT_GE(first, 0);
    for (int i = 0; i < n; i++) write_slot(p, seq, layer, first + i, first_id + (uint32_t)i);
}

static int64_t pages_free(const kvp_pool *p) { return kvp_get_stats(p).pages_free; }

static uint64_t rng_state;
static uint64_t rng_next(void) { /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}
static int rng_below(int n) { return (int)(rng_next() % (uint64_t)n); }

/* ---- basics --------------------------------------------------------------------- */

TEST(create_destroy_stats) {
    kvp_config c = small_cfg(10);
    kvp_pool *p = NULL;
    ASSERT_EQ(kvp_create(&c, &p), D2_OK);
    kvp_stats s = kvp_get_stats(p);
    ASSERT_EQ(s.pages_total, 10);
    ASSERT_EQ(s.pages_free, 10);
    ASSERT_EQ(s.seqs_active, 0);
    ASSERT_EQ(kvp_get_config(p)->n_layers, N_LAYERS);
    ASSERT_EQ(kvp_pages_for_tokens(p, 0), 0);
    ASSERT_EQ(kvp_pages_for_tokens(p, 1), 1);
    ASSERT_EQ(kvp_pages_for_tokens(p, PT), 1);
    ASSERT_EQ(kvp_pages_for_tokens(p, PT + 1), 2);
    ASSERT_EQ(kvp_pages_for_tokens(p, -1), D2_EINVAL);
    for (int64_t i = 0; i < 10 * PT; i++) ASSERT_EQ(kvp_pos_base(p)[i], -1);
    ASSERT_EQ(kvp_check(p), D2_OK);
    int a, b;
    ASSERT_EQ(kvp_seq_new(p, &a), D2_OK);
    ASSERT_EQ(kvp_seq_new(p, &b), D2_OK);
    ASSERT_NE(a, b);
    ASSERT_EQ(kvp_get_stats(p).seqs_active, 2);
    ASSERT_EQ(kvp_seq_free(p, a), D2_OK);
    ASSERT_EQ(kvp_get_stats(p).seqs_active, 1);
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
    kvp_destroy(NULL);

    /* default page size */
    c.page_tokens = 0;
    ASSERT_EQ(kvp_create(&c, &p), D2_OK);
    ASSERT_EQ(kvp_get_config(p)->page_tokens, 16);
    kvp_destroy(p);
}

TEST(bad_configs) {
    d2_log_set_level(D2_LOG_OFF); /* the errors below are expected */
    kvp_pool *p = (kvp_pool *)&p;
    ASSERT_EQ(kvp_create(NULL, &p), D2_EINVAL);
    ASSERT(p == NULL);
    kvp_config good = small_cfg(4);
    ASSERT_EQ(kvp_create(&good, NULL), D2_EINVAL);
    kvp_config c;
    c = good; c.n_layers = 0;      ASSERT_EQ(kvp_create(&c, &p), D2_EINVAL);
    c = good; c.n_kv_heads = -1;   ASSERT_EQ(kvp_create(&c, &p), D2_EINVAL);
    c = good; c.head_dim = 0;      ASSERT_EQ(kvp_create(&c, &p), D2_EINVAL);
    c = good; c.page_tokens = -4;  ASSERT_EQ(kvp_create(&c, &p), D2_EINVAL);
    c = good; c.n_pages = 0;       ASSERT_EQ(kvp_create(&c, &p), D2_EINVAL);
    c = good; c.max_seqs = 0;      ASSERT_EQ(kvp_create(&c, &p), D2_EINVAL);
    c = good; c.max_seq_tokens = 0; ASSERT_EQ(kvp_create(&c, &p), D2_EINVAL);
    c = good; c.n_pages = (int64_t)1 << 40; ASSERT_EQ(kvp_create(&c, &p), D2_EINVAL);
}

TEST(append_across_pages_round_trip) {
    kvp_pool *p = make_pool(32);
    int s;
    ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
    ASSERT_EQ(kvp_pages_needed(p, s, 0, 10), 3);
    ASSERT_EQ(kvp_reserve(p, s, 0, 10), D2_OK);
    ASSERT_EQ(pages_free(p), 29);
    /* reserving room that is already there takes nothing */
    ASSERT_EQ(kvp_pages_needed(p, s, 0, 10), 0);
    ASSERT_EQ(kvp_reserve(p, s, 0, 12), D2_OK);
    ASSERT_EQ(pages_free(p), 29);
    kvp_table t = kvp_get_table(p, s, 0);
    ASSERT_EQ(t.n_tokens, 0);
    ASSERT_EQ(t.n_pages, 0); /* reserved pages are not live */
    ASSERT_EQ(kvp_check(p), D2_OK);

    ASSERT_EQ(kvp_append(p, s, 0, 3), 0);
    ASSERT_EQ(kvp_append(p, s, 0, 7), 3);
    t = kvp_get_table(p, s, 0);
    ASSERT_EQ(t.n_tokens, 10);
    ASSERT_EQ(t.n_pages, 3);
    /* new slots: pos -1 (their payload is the backend's to write) */
    for (int i = 0; i < 10; i++) ASSERT_EQ(kvp_pos_base(p)[slot_index(p, s, 0, i)], -1);
    for (int i = 0; i < 10; i++) write_slot(p, s, 0, i, 100u + (uint32_t)i);
    /* 12 reserved: two more fit, a third does not */
    ASSERT_EQ(kvp_append(p, s, 0, 3), D2_EINVAL);
    ASSERT_EQ(kvp_append(p, s, 0, 2), 10);
    write_slot(p, s, 0, 10, 110);
    write_slot(p, s, 0, 11, 111);
    ASSERT_EQ(kvp_append(p, s, 0, 1), D2_EINVAL);
    /* next reservation crosses into a 4th page */
    ASSERT_EQ(kvp_pages_needed(p, s, 0, 5), 2);
    append_ids(p, s, 0, 5, 112);
    t = kvp_get_table(p, s, 0);
    ASSERT_EQ(t.n_tokens, 17);
    ASSERT_EQ(t.n_pages, 5);
    ASSERT_EQ(pages_free(p), 27);
    /* pages of a table are distinct; every slot reads back through the table */
    for (int a = 0; a < t.n_pages; a++)
        for (int b = a + 1; b < t.n_pages; b++) ASSERT_NE(t.pages[a], t.pages[b]);
    for (int i = 0; i < 17; i++) ASSERT(slot_holds(p, s, 0, i, 100u + (uint32_t)i));
    /* other layers are independent tables */
    ASSERT_EQ(kvp_get_table(p, s, 1).n_tokens, 0);
    append_ids(p, s, 2, 4, 500);
    ASSERT_EQ(kvp_get_table(p, s, 2).n_pages, 1);
    for (int i = 0; i < 17; i++) ASSERT(slot_holds(p, s, 0, i, 100u + (uint32_t)i));
    ASSERT_EQ(kvp_check(p), D2_OK);
    ASSERT_EQ(kvp_seq_free(p, s), D2_OK);
    ASSERT_EQ(pages_free(p), 32);
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
}

TEST(max_seq_tokens_bound) {
    kvp_pool *p = make_pool(64);
    int s;
    ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
    ASSERT_EQ(kvp_pages_needed(p, s, 0, MAX_TOK + 1), D2_ETOOLONG);
    ASSERT_EQ(kvp_reserve(p, s, 0, MAX_TOK + 1), D2_ETOOLONG);
    ASSERT_EQ(pages_free(p), 64);
    append_ids(p, s, 0, MAX_TOK, 0);
    ASSERT_EQ(kvp_get_table(p, s, 0).n_pages, MAX_TOK / PT);
    ASSERT_EQ(kvp_reserve(p, s, 0, 1), D2_ETOOLONG);
    ASSERT_EQ(kvp_reserve(p, s, 0, 0), D2_OK);
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
}

TEST(truncate_returns_pages) {
    kvp_pool *p = make_pool(16);
    int s;
    ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
    append_ids(p, s, 1, 13, 0); /* 4 pages */
    ASSERT_EQ(kvp_reserve(p, s, 1, 8), D2_OK); /* +1 reserved page (21 -> 6 pages) */
    ASSERT_EQ(pages_free(p), 10);
    ASSERT_EQ(kvp_truncate(p, s, 1, 14), D2_EINVAL);
    ASSERT_EQ(kvp_truncate(p, s, 1, -1), D2_EINVAL);
    ASSERT_EQ(kvp_truncate(p, s, 1, 9), D2_OK); /* 3 pages live, reservation dropped */
    ASSERT_EQ(pages_free(p), 13);
    kvp_table t = kvp_get_table(p, s, 1);
    ASSERT_EQ(t.n_tokens, 9);
    ASSERT_EQ(t.n_pages, 3);
    for (int i = 0; i < 9; i++) ASSERT(slot_holds(p, s, 1, i, (uint32_t)i));
    /* the reserved page was given back; only the live last page's slack is left */
    ASSERT_EQ(kvp_append(p, s, 1, 4), D2_EINVAL);
    ASSERT_EQ(kvp_get_table(p, s, 1).n_tokens, 9);
    ASSERT_EQ(kvp_truncate(p, s, 1, 8), D2_OK);
    ASSERT_EQ(pages_free(p), 14);
    ASSERT_EQ(kvp_truncate(p, s, 1, 0), D2_OK);
    ASSERT_EQ(pages_free(p), 16);
    ASSERT_EQ(kvp_get_table(p, s, 1).n_pages, 0);
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
}

/* ---- exhaustion --------------------------------------------------------------------- */

TEST(ekvfull_is_atomic) {
    kvp_pool *p = make_pool(6);
    int s;
    ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
    append_ids(p, s, 0, 10, 0); /* 3 pages */
    append_ids(p, s, 1, 5, 50); /* 2 pages */
    ASSERT_EQ(pages_free(p), 1);
    kvp_table before = kvp_get_table(p, s, 0);
    int32_t pages_before[3];
    memcpy(pages_before, before.pages, sizeof pages_before);
    /* 10 + 7 = 17 tokens -> 5 pages: needs 2, one is free */
    ASSERT_EQ(kvp_pages_needed(p, s, 0, 7), 2);
    ASSERT_EQ(kvp_reserve(p, s, 0, 7), D2_EKVFULL);
    kvp_table after = kvp_get_table(p, s, 0);
    ASSERT_EQ(after.n_tokens, 10);
    ASSERT_EQ(after.n_pages, 3);
    ASSERT_EQ(memcmp(pages_before, after.pages, sizeof pages_before), 0);
    ASSERT_EQ(pages_free(p), 1);
    ASSERT_EQ(kvp_append(p, s, 0, 3), D2_EINVAL); /* nothing was reserved */
    ASSERT_EQ(kvp_check(p), D2_OK);
    for (int i = 0; i < 10; i++) ASSERT(slot_holds(p, s, 0, i, (uint32_t)i));
    /* a smaller request still fits */
    ASSERT_EQ(kvp_reserve(p, s, 0, 6), D2_OK);
    ASSERT_EQ(pages_free(p), 0);
    ASSERT_EQ(kvp_reserve(p, s, 2, 1), D2_EKVFULL);
    ASSERT_EQ(kvp_get_table(p, s, 2).n_tokens, 0);
    ASSERT_EQ(kvp_check(p), D2_OK);

    /* copy on write also needs a page: fork, then the fork's partial last page
     * of layer 1 cannot be unshared */
    int f;
    ASSERT_EQ(kvp_seq_fork(p, s, &f), D2_OK);
    ASSERT_EQ(kvp_pages_needed(p, f, 1, 1), 1);
    ASSERT_EQ(kvp_reserve(p, f, 1, 1), D2_EKVFULL);
    ASSERT_EQ(kvp_get_table(p, f, 1).pages[1], kvp_get_table(p, s, 1).pages[1]);
    ASSERT_EQ(kvp_check(p), D2_OK);
    /* sequence ids run out too */
    int ids[MAX_SEQS];
    int n = 0;
    while (kvp_seq_new(p, &ids[n]) == D2_OK) n++;
    ASSERT_EQ(n, MAX_SEQS - 2);
    ASSERT_EQ(kvp_seq_new(p, &ids[0]), D2_EKVFULL);
    ASSERT_EQ(kvp_seq_fork(p, s, &ids[0]), D2_EKVFULL);
    ASSERT_EQ(kvp_get_stats(p).seqs_active, MAX_SEQS);
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
}

/* ---- fork and copy on write ------------------------------------------------------- */

TEST(fork_copy_on_write) {
    kvp_pool *p = make_pool(32);
    int par;
    ASSERT_EQ(kvp_seq_new(p, &par), D2_OK);
    for (int l = 0; l < N_LAYERS; l++) append_ids(p, par, l, 6, 1000u * (uint32_t)l);
    /* layer 2 ends on a page boundary */
    append_ids(p, par, 2, 2, 2006);
    int64_t free0 = pages_free(p);
    int ch;
    ASSERT_EQ(kvp_seq_fork(p, par, &ch), D2_OK);
    ASSERT_EQ(pages_free(p), free0); /* fork takes no pages */
    ASSERT_EQ(kvp_get_stats(p).seqs_active, 2);
    ASSERT_EQ(kvp_check(p), D2_OK);
    for (int l = 0; l < N_LAYERS; l++) {
        kvp_table a = kvp_get_table(p, par, l), b = kvp_get_table(p, ch, l);
        ASSERT_EQ(a.n_tokens, b.n_tokens);
        ASSERT_EQ(a.n_pages, b.n_pages);
        for (int j = 0; j < a.n_pages; j++) ASSERT_EQ(a.pages[j], b.pages[j]);
    }
    /* layer 0: 6 tokens, page 1 is partial and shared -> reserve copies it */
    ASSERT_EQ(kvp_pages_needed(p, ch, 0, 1), 1);
    ASSERT_EQ(kvp_pages_needed(p, ch, 0, 3), 2);
    ASSERT_EQ(kvp_reserve(p, ch, 0, 1), D2_OK);
    ASSERT_EQ(pages_free(p), free0 - 1);
    kvp_table a = kvp_get_table(p, par, 0), b = kvp_get_table(p, ch, 0);
    ASSERT_EQ(a.pages[0], b.pages[0]); /* full page stays shared */
    ASSERT_NE(a.pages[1], b.pages[1]);
    for (int i = 0; i < 6; i++) ASSERT(slot_holds(p, ch, 0, i, (uint32_t)i));
    ASSERT_EQ(kvp_append(p, ch, 0, 1), 6);
    write_slot(p, ch, 0, 6, 777);
    /* the child's copy is private: overwrite one of its copied slots too */
    write_slot(p, ch, 0, 5, 778);
    for (int i = 0; i < 6; i++) ASSERT(slot_holds(p, par, 0, i, (uint32_t)i));
    ASSERT_EQ(kvp_get_table(p, par, 0).n_tokens, 6);
    ASSERT(slot_holds(p, ch, 0, 5, 778));
    ASSERT(slot_holds(p, ch, 0, 6, 777));
    /* the parent's page 1 is now its own again: no copy needed */
    ASSERT_EQ(kvp_pages_needed(p, par, 0, 1), 0);
    append_ids(p, par, 0, 1, 6);
    ASSERT(slot_holds(p, ch, 0, 6, 777));
    ASSERT(slot_holds(p, par, 0, 6, 6));

    /* layer 2: 8 tokens, both pages full -> appending takes one new page and
     * the full pages stay shared */
    ASSERT_EQ(kvp_pages_needed(p, ch, 2, 1), 1);
    append_ids(p, ch, 2, 1, 9999);
    a = kvp_get_table(p, par, 2);
    b = kvp_get_table(p, ch, 2);
    ASSERT_EQ(a.pages[0], b.pages[0]);
    ASSERT_EQ(a.pages[1], b.pages[1]);
    ASSERT_EQ(b.n_pages, 3);
    for (int i = 0; i < 8; i++) ASSERT(slot_holds(p, par, 2, i, 2000u + (uint32_t)i));

    /* a reservation made before a fork does not let append write a shared page */
    ASSERT_EQ(kvp_reserve(p, par, 1, 2), D2_OK);
    int ch2;
    ASSERT_EQ(kvp_seq_fork(p, par, &ch2), D2_OK);
    ASSERT_EQ(kvp_append(p, par, 1, 1), D2_EINVAL);
    ASSERT_EQ(kvp_reserve(p, par, 1, 2), D2_OK); /* copies the shared page */
    ASSERT_EQ(kvp_append(p, par, 1, 1), 6);
    write_slot(p, par, 1, 6, 4242);
    ASSERT_EQ(kvp_get_table(p, ch2, 1).n_tokens, 6);
    for (int i = 0; i < 6; i++) ASSERT(slot_holds(p, ch2, 1, i, 1000u + (uint32_t)i));
    ASSERT_EQ(kvp_check(p), D2_OK);

    /* truncating a fork leaves the parent whole */
    ASSERT_EQ(kvp_truncate(p, ch2, 1, 1), D2_OK);
    ASSERT_EQ(kvp_seq_free(p, ch), D2_OK);
    for (int i = 0; i < 6; i++) ASSERT(slot_holds(p, par, 1, i, 1000u + (uint32_t)i));
    ASSERT(slot_holds(p, ch2, 1, 0, 1000));
    ASSERT_EQ(kvp_check(p), D2_OK);
    ASSERT_EQ(kvp_seq_free(p, par), D2_OK);
    for (int i = 0; i < 8; i++) ASSERT(slot_holds(p, ch2, 2, i, 2000u + (uint32_t)i));
    ASSERT_EQ(kvp_seq_free(p, ch2), D2_OK);
    ASSERT_EQ(pages_free(p), 32);
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
}

/* ---- compaction ---------------------------------------------------------------- */

/* Compacts (seq, layer) holding ids[0..n) with mask keep and checks the result
 * against the expected kept ids; updates ids/n. */
static void compact_and_verify(kvp_pool *p, int seq, int layer, uint32_t *ids, int *n,
                               const uint8_t *keep) {
    uint32_t want[MAX_TOK];
    int m = 0;
    for (int i = 0; i < *n; i++)
        if (keep[i]) want[m++] = ids[i];
    ASSERT_EQ(kvp_compact(p, seq, layer, keep), m);
    kvp_table t = kvp_get_table(p, seq, layer);
    ASSERT_EQ(t.n_tokens, m);
    ASSERT_EQ(t.n_pages, kvp_pages_for_tokens(p, m));
    for (int i = 0; i < m; i++) ASSERT(slot_holds(p, seq, layer, i, want[i]));
    memcpy(ids, want, (size_t)m * sizeof *ids);
    *n = m;
}

TEST(compact_random_masks) {
    kvp_pool *p = make_pool(64);
    rng_state = 0x1234567u;
    int s;
    ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
    uint32_t ids[MAX_TOK];
    uint32_t next = 1;
    for (int trial = 0; trial < 300; trial++) {
        int n = 1 + rng_below(MAX_TOK);
        ASSERT_EQ(kvp_truncate(p, s, 0, 0), D2_OK);
        append_ids(p, s, 0, n, next);
        for (int i = 0; i < n; i++) ids[i] = next + (uint32_t)i;
        next += (uint32_t)n;
        uint8_t keep[MAX_TOK];
        int density = rng_below(5); /* 0: keep none ... 4: keep all */
        for (int i = 0; i < n; i++) keep[i] = rng_below(4) < density;
        int64_t free0 = pages_free(p);
        int old_pages = kvp_pages_for_tokens(p, n);
        compact_and_verify(p, s, 0, ids, &n, keep);
        /* exactly the pages no longer needed came back */
        ASSERT_EQ(pages_free(p) - free0, old_pages - kvp_pages_for_tokens(p, n));
        ASSERT_EQ(kvp_check(p), D2_OK);
        /* the compacted table keeps growing normally */
        int more = rng_below(MAX_TOK - n + 1);
        append_ids(p, s, 0, more, next);
        for (int i = 0; i < more; i++) ids[n + i] = next + (uint32_t)i;
        next += (uint32_t)more;
        n += more;
        for (int i = 0; i < n; i++) ASSERT(slot_holds(p, s, 0, i, ids[i]));
    }
    /* NULL mask is fine only for an empty table */
    ASSERT_EQ(kvp_compact(p, s, 0, NULL), D2_EINVAL);
    ASSERT_EQ(kvp_truncate(p, s, 0, 0), D2_OK);
    ASSERT_EQ(kvp_compact(p, s, 0, NULL), 0);
    ASSERT_EQ(kvp_seq_free(p, s), D2_OK);
    ASSERT_EQ(pages_free(p), 64);
    kvp_destroy(p);
}

TEST(compact_drops_reservation) {
    kvp_pool *p = make_pool(16);
    int s;
    ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
    append_ids(p, s, 0, 5, 0);
    ASSERT_EQ(kvp_reserve(p, s, 0, 10), D2_OK); /* 15 -> 4 pages */
    ASSERT_EQ(pages_free(p), 12);
    uint8_t keep[5] = {1, 0, 1, 1, 1};
    ASSERT_EQ(kvp_compact(p, s, 0, keep), 4);
    ASSERT_EQ(pages_free(p), 15);
    ASSERT(slot_holds(p, s, 0, 0, 0));
    ASSERT(slot_holds(p, s, 0, 1, 2));
    ASSERT(slot_holds(p, s, 0, 3, 4));
    ASSERT_EQ(kvp_append(p, s, 0, 1), D2_EINVAL);
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
}

TEST(compact_forked_table_leaves_parent) {
    kvp_pool *p = make_pool(128);
    rng_state = 0xfeedu;
    for (int trial = 0; trial < 100; trial++) {
        int par, ch;
        ASSERT_EQ(kvp_seq_new(p, &par), D2_OK);
        int n = 1 + rng_below(MAX_TOK);
        uint32_t pids[MAX_TOK], cids[MAX_TOK];
        append_ids(p, par, 1, n, 10000u * (uint32_t)trial);
        for (int i = 0; i < n; i++) pids[i] = cids[i] = 10000u * (uint32_t)trial + (uint32_t)i;
        ASSERT_EQ(kvp_seq_fork(p, par, &ch), D2_OK);
        kvp_table pt0 = kvp_get_table(p, par, 1);
        int32_t ppages[MAX_TOK / PT];
        memcpy(ppages, pt0.pages, (size_t)pt0.n_pages * sizeof(int32_t));
        uint8_t keep[MAX_TOK];
        int density = 1 + rng_below(3);
        for (int i = 0; i < n; i++) keep[i] = rng_below(4) < density;
        int cn = n;
        /* the pages written are exactly the shared ones from the first gap on */
        int first_gap = n, m = 0;
        for (int i = 0; i < n; i++) {
            if (keep[i]) m++;
            else if (first_gap == n) first_gap = i;
        }
        int cow = m > first_gap ? (m - 1) / PT - first_gap / PT + 1 : 0;
        int64_t free0 = pages_free(p);
        compact_and_verify(p, ch, 1, cids, &cn, keep);
        ASSERT_EQ(free0 - pages_free(p), cow);
        /* the parent's table and data are untouched */
        kvp_table pt1 = kvp_get_table(p, par, 1);
        ASSERT_EQ(pt1.n_tokens, n);
        ASSERT_EQ(memcmp(ppages, pt1.pages, (size_t)pt1.n_pages * sizeof(int32_t)), 0);
        for (int i = 0; i < n; i++) ASSERT(slot_holds(p, par, 1, i, pids[i]));
        /* unwritten leading pages stay shared */
        kvp_table ct = kvp_get_table(p, ch, 1);
        for (int q = 0; q < ct.n_pages && q < first_gap / PT; q++)
            ASSERT_EQ(ct.pages[q], pt1.pages[q]);
        ASSERT_EQ(kvp_check(p), D2_OK);
        if (trial & 1) {
            ASSERT_EQ(kvp_seq_free(p, par), D2_OK);
            for (int i = 0; i < cn; i++) ASSERT(slot_holds(p, ch, 1, i, cids[i]));
            ASSERT_EQ(kvp_seq_free(p, ch), D2_OK);
        } else {
            ASSERT_EQ(kvp_seq_free(p, ch), D2_OK);
            for (int i = 0; i < n; i++) ASSERT(slot_holds(p, par, 1, i, pids[i]));
            ASSERT_EQ(kvp_seq_free(p, par), D2_OK);
        }
        ASSERT_EQ(pages_free(p), 128);
    }
    kvp_destroy(p);
}

TEST(compact_ekvfull_is_atomic) {
    kvp_pool *p = make_pool(3);
    int par, ch;
    ASSERT_EQ(kvp_seq_new(p, &par), D2_OK);
    append_ids(p, par, 0, 10, 0); /* 3 pages, pool now empty */
    ASSERT_EQ(pages_free(p), 0);
    ASSERT_EQ(kvp_seq_fork(p, par, &ch), D2_OK);
    uint8_t keep[10];
    memset(keep, 1, sizeof keep);
    keep[0] = 0; /* every page would be written -> copies needed */
    ASSERT_EQ(kvp_compact(p, ch, 0, keep), D2_EKVFULL);
    ASSERT_EQ(kvp_get_table(p, ch, 0).n_tokens, 10);
    for (int i = 0; i < 10; i++) {
        ASSERT(slot_holds(p, ch, 0, i, (uint32_t)i));
        ASSERT(slot_holds(p, par, 0, i, (uint32_t)i));
    }
    ASSERT_EQ(kvp_check(p), D2_OK);
    /* dropping only the tail writes nothing: fine with an empty pool */
    memset(keep, 1, sizeof keep);
    keep[9] = keep[8] = 0;
    ASSERT_EQ(kvp_compact(p, ch, 0, keep), 8);
    memset(keep, 1, sizeof keep);
    ASSERT_EQ(kvp_compact(p, ch, 0, keep), 8); /* keep all: no change */
    ASSERT_EQ(pages_free(p), 0);
    /* free the parent: the child's pages are private now, compaction works */
    ASSERT_EQ(kvp_seq_free(p, par), D2_OK);
    ASSERT_EQ(pages_free(p), 1);
    keep[0] = 0;
    ASSERT_EQ(kvp_compact(p, ch, 0, keep), 7);
    for (int i = 0; i < 7; i++) ASSERT(slot_holds(p, ch, 0, i, (uint32_t)i + 1));
    ASSERT_EQ(pages_free(p), 1);
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
}

/* ---- validation ----------------------------------------------------------------- */

TEST(bad_ids_are_einval) {
    d2_log_set_level(D2_LOG_OFF); /* the errors below are expected */
    kvp_pool *p = make_pool(8);
    int s, out;
    uint8_t keep[1] = {1};
    ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
    const int bad_seqs[] = {-1, MAX_SEQS, s + 1 /* not in use */, 1 << 30};
    for (size_t k = 0; k < sizeof bad_seqs / sizeof bad_seqs[0]; k++) {
        int b = bad_seqs[k];
        ASSERT_EQ(kvp_seq_free(p, b), D2_EINVAL);
        ASSERT_EQ(kvp_seq_fork(p, b, &out), D2_EINVAL);
        ASSERT_EQ(kvp_truncate(p, b, 0, 0), D2_EINVAL);
        ASSERT_EQ(kvp_reserve(p, b, 0, 1), D2_EINVAL);
        ASSERT_EQ(kvp_pages_needed(p, b, 0, 1), D2_EINVAL);
        ASSERT_EQ(kvp_append(p, b, 0, 1), D2_EINVAL);
        ASSERT_EQ(kvp_compact(p, b, 0, keep), D2_EINVAL);
    }
    const int bad_layers[] = {-1, N_LAYERS, 1 << 30};
    for (size_t k = 0; k < sizeof bad_layers / sizeof bad_layers[0]; k++) {
        int l = bad_layers[k];
        ASSERT_EQ(kvp_truncate(p, s, l, 0), D2_EINVAL);
        ASSERT_EQ(kvp_reserve(p, s, l, 1), D2_EINVAL);
        ASSERT_EQ(kvp_pages_needed(p, s, l, 1), D2_EINVAL);
        ASSERT_EQ(kvp_append(p, s, l, 1), D2_EINVAL);
        ASSERT_EQ(kvp_compact(p, s, l, keep), D2_EINVAL);
        kvp_table t = kvp_get_table(p, s, l);
        ASSERT(t.pages == NULL && t.n_pages == 0 && t.n_tokens == 0);
    }
    ASSERT_EQ(kvp_reserve(p, s, 0, -1), D2_EINVAL);
    ASSERT_EQ(kvp_append(p, s, 0, -1), D2_EINVAL);
    ASSERT_EQ(kvp_seq_new(p, NULL), D2_EINVAL);
    ASSERT_EQ(kvp_seq_fork(p, s, NULL), D2_EINVAL);
    ASSERT_EQ(kvp_seq_free(p, s), D2_OK);
    ASSERT_EQ(kvp_seq_free(p, s), D2_EINVAL); /* double free */
    ASSERT_EQ(kvp_get_stats(p).seqs_active, 0);
    ASSERT_EQ(kvp_get_stats(NULL).pages_total, 0);
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
}

/* ---- the payload hook ------------------------------------------------------------- */

TEST(payload_hook_batched_and_never_overlapping) {
    kvp_pool *p = make_pool(8);
    test_payload *tp = payload_of(p);
    int s, f;
    ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
    append_ids(p, s, 0, 6, 0);
    ASSERT_EQ(tp->calls, 0);
    ASSERT_EQ(kvp_seq_fork(p, s, &f), D2_OK);
    ASSERT_EQ(kvp_reserve(p, f, 0, 1), D2_OK); /* copy on write of the partial page: one call */
    ASSERT_EQ(tp->calls, 1);
    ASSERT_EQ(tp->runs, 1);
    for (int i = 0; i < 6; i++) ASSERT(slot_holds(p, f, 0, i, (uint32_t)i));
    ASSERT_EQ(kvp_seq_free(p, f), D2_OK);
    ASSERT_EQ(kvp_truncate(p, s, 0, 0), D2_OK);
    append_ids(p, s, 0, 16, 100);
    /* a shared table: the compaction copies its shared pages and moves the kept
     * slots, all in ONE hook call, no run overlapping itself */
    ASSERT_EQ(kvp_seq_fork(p, s, &f), D2_OK);
    uint8_t keep[16];
    for (int i = 0; i < 16; i++) keep[i] = i != 1 && i != 9 && i != 10;
    tp->calls = tp->runs = 0;
    ASSERT_EQ(kvp_compact(p, s, 0, keep), 13);
    ASSERT_EQ(tp->calls, 1);
    ASSERT_GT(tp->runs, 3);
    ASSERT_EQ(tp->overlapping, 0);
    for (int i = 0, j = 0; i < 16; i++)
        if (keep[i]) ASSERT(slot_holds(p, s, 0, j++, 100u + (uint32_t)i));
    for (int i = 0; i < 16; i++) ASSERT(slot_holds(p, f, 0, i, 100u + (uint32_t)i)); /* untouched */
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
}

TEST(payload_hook_reports_freed_pages) {
    kvp_pool *p = make_pool(4);
    test_payload *tp = payload_of(p);
    int s;
    ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
    append_ids(p, s, 0, 4, 7);
    append_ids(p, s, 1, 5, 7);
    int32_t pg = kvp_get_table(p, s, 0).pages[0];
    ASSERT_EQ(tp->freed, 0);
    ASSERT_EQ(kvp_seq_free(p, s), D2_OK);
    ASSERT_EQ(tp->freed, 3);
    ASSERT(isnan(tp->k[(size_t)pg * PT * SLOT_F]));
    kvp_destroy(p);
}

TEST(reserve_all_layers_is_all_or_nothing) {
    kvp_pool *p = make_pool(5); /* 3 layers: 10 tokens need 3 x 3 pages */
    int s;
    ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
    ASSERT_EQ(kvp_pages_needed_all_layers(p, s, 10), 9);
    ASSERT_EQ(kvp_reserve_all_layers(p, s, 10), D2_EKVFULL);
    ASSERT_EQ(pages_free(p), 5); /* nothing taken */
    ASSERT_EQ(kvp_reserve_all_layers(p, s, 4), D2_OK);
    ASSERT_EQ(pages_free(p), 2);
    ASSERT_EQ(kvp_reserve_all_layers(p, s, MAX_TOK + 1), D2_ETOOLONG);
    ASSERT_EQ(kvp_check(p), D2_OK);
    kvp_destroy(p);
}

/* ---- threads ---------------------------------------------------------------------- */

typedef struct stats_reader {
    const kvp_pool *p;
    atomic_int stop;
    int bad;
    long reads;
} stats_reader;

static void *read_stats(void *arg) {
    stats_reader *r = arg;
    while (!atomic_load(&r->stop)) {
        kvp_stats s = kvp_get_stats(r->p);
        if (s.pages_free < 0 || s.pages_free > s.pages_total || s.seqs_active < 0 ||
            s.seqs_active > MAX_SEQS)
            r->bad++;
        r->reads++;
    }
    return NULL;
}

TEST(stats_from_another_thread) {
    kvp_pool *p = make_pool(40);
    stats_reader r = {.p = p, .bad = 0, .reads = 0};
    atomic_init(&r.stop, 0);
    pthread_t th;
    ASSERT_EQ(pthread_create(&th, NULL, read_stats, &r), 0);
    for (int it = 0; it < 2000; it++) {
        int s;
        ASSERT_EQ(kvp_seq_new(p, &s), D2_OK);
        append_ids(p, s, it % N_LAYERS, 1 + it % 30, 0);
        ASSERT_EQ(kvp_seq_free(p, s), D2_OK);
    }
    atomic_store(&r.stop, 1);
    pthread_join(th, NULL);
    ASSERT_EQ(r.bad, 0);
    ASSERT_EQ(pages_free(p), 40);
    kvp_destroy(p);
}

/* ---- randomised run against a shadow model ----------------------------------------- */

typedef struct shadow_tab {
    int n;
    uint32_t ids[MAX_TOK];
} shadow_tab;

typedef struct shadow {
    int used[MAX_SEQS];
    shadow_tab t[MAX_SEQS][N_LAYERS];
} shadow;

static void verify_all(kvp_pool *p, const shadow *sh, int full_data) {
    for (int s = 0; s < MAX_SEQS; s++) {
        if (!sh->used[s]) continue;
        for (int l = 0; l < N_LAYERS; l++) {
            kvp_table t = kvp_get_table(p, s, l);
            if (t.n_tokens != sh->t[s][l].n)
                FAIL_("seq %d layer %d: %d tokens, shadow %d", s, l, t.n_tokens, sh->t[s][l].n);
            if (!full_data) continue;
            for (int i = 0; i < t.n_tokens; i++)
                if (!slot_holds(p, s, l, i, sh->t[s][l].ids[i]))
                    FAIL_("seq %d layer %d slot %d does not hold token %u", s, l, i,
                          sh->t[s][l].ids[i]);
        }
    }
}

static int pick_used(const shadow *sh) {
    int cand[MAX_SEQS], n = 0;
    for (int s = 0; s < MAX_SEQS; s++)
        if (sh->used[s]) cand[n++] = s;
    return n ? cand[rng_below(n)] : -1;
}

TEST(randomized_invariants) {
    const int64_t n_pages = 100; /* far fewer than 8 seqs * 3 layers * 16 pages */
    kvp_pool *p = make_pool(n_pages);
    static shadow sh;
    memset(&sh, 0, sizeof sh);
    rng_state = 0x9e3779b97f4a7c15ull;
    uint32_t next_id = 1;
    int n_ops = 0, n_full = 0, n_cow_compact_full = 0, n_forks = 0, n_compacts = 0;
    for (int op = 0; op < 25000; op++) {
        int r = rng_below(100);
        int s = pick_used(&sh);
        if (s < 0 || r < 6) { /* new sequence */
            int ns;
            int rc = kvp_seq_new(p, &ns);
            if (rc == D2_OK) {
                ASSERT(!sh.used[ns]);
                sh.used[ns] = 1;
                for (int l = 0; l < N_LAYERS; l++) sh.t[ns][l].n = 0;
            } else {
                ASSERT_EQ(rc, D2_EKVFULL);
                for (int k = 0; k < MAX_SEQS; k++) ASSERT(sh.used[k]);
            }
        } else if (r < 12) { /* free */
            ASSERT_EQ(kvp_seq_free(p, s), D2_OK);
            sh.used[s] = 0;
        } else if (r < 18) { /* fork */
            int ns;
            int64_t f0 = pages_free(p);
            int rc = kvp_seq_fork(p, s, &ns);
            if (rc == D2_OK) {
                ASSERT(!sh.used[ns]);
                sh.used[ns] = 1;
                memcpy(sh.t[ns], sh.t[s], sizeof sh.t[s]);
                ASSERT_EQ(pages_free(p), f0);
                n_forks++;
            } else {
                ASSERT_EQ(rc, D2_EKVFULL);
            }
        } else if (r < 60) { /* reserve + append a random amount */
            int l = rng_below(N_LAYERS);
            shadow_tab *st = &sh.t[s][l];
            int room = MAX_TOK - st->n;
            int n = room ? 1 + rng_below(room < 20 ? room : 20) : 0;
            int need = kvp_pages_needed(p, s, l, n);
            ASSERT_GE(need, 0);
            int64_t f0 = pages_free(p);
            kvp_table t0 = kvp_get_table(p, s, l);
            int rc = kvp_reserve(p, s, l, n);
            if (rc == D2_EKVFULL) {
                ASSERT_GT(need, f0);
                ASSERT_EQ(pages_free(p), f0);
                kvp_table t1 = kvp_get_table(p, s, l);
                ASSERT_EQ(t1.n_tokens, t0.n_tokens);
                ASSERT_EQ(t1.n_pages, t0.n_pages);
                n_full++;
            } else {
                ASSERT_EQ(rc, D2_OK);
                ASSERT_EQ(f0 - pages_free(p), need); /* pages_needed was exact */
                int k = rng_below(4) == 0 ? rng_below(n + 1) : n; /* sometimes fewer */
                int first = kvp_append(p, s, l, k);
                ASSERT_EQ(first, st->n);
                for (int i = 0; i < k; i++) {
                    write_slot(p, s, l, first + i, next_id);
                    st->ids[st->n++] = next_id++;
                }
            }
        } else if (r < 72) { /* truncate */
            int l = rng_below(N_LAYERS);
            shadow_tab *st = &sh.t[s][l];
            int n = rng_below(st->n + 1);
            ASSERT_EQ(kvp_truncate(p, s, l, n), D2_OK);
            st->n = n;
        } else if (r < 90) { /* compact with a random mask */
            int l = rng_below(N_LAYERS);
            shadow_tab *st = &sh.t[s][l];
            uint8_t keep[MAX_TOK];
            int density = rng_below(9);
            for (int i = 0; i < st->n; i++) keep[i] = rng_below(8) < density;
            int rc = kvp_compact(p, s, l, keep);
            if (rc == D2_EKVFULL) {
                n_cow_compact_full++;
            } else {
                ASSERT_GE(rc, 0);
                int m = 0;
                for (int i = 0; i < st->n; i++)
                    if (keep[i]) st->ids[m++] = st->ids[i];
                ASSERT_EQ(rc, m);
                st->n = m;
                n_compacts++;
            }
        } else { /* reserve only: leave room held for later */
            int l = rng_below(N_LAYERS);
            int room = MAX_TOK - sh.t[s][l].n;
            int n = rng_below(room + 1);
            int need = kvp_pages_needed(p, s, l, n);
            int64_t f0 = pages_free(p);
            int rc = kvp_reserve(p, s, l, n);
            if (rc == D2_OK)
                ASSERT_EQ(f0 - pages_free(p), need);
            else
                ASSERT_EQ(rc, D2_EKVFULL);
        }
        n_ops++;
        ASSERT_EQ(kvp_check(p), D2_OK);
        verify_all(p, &sh, op % 16 == 0);
    }
    verify_all(p, &sh, 1);
    /* the run must have exercised the interesting paths */
    ASSERT_GT(n_full, 100);
    ASSERT_GT(n_forks, 100);
    ASSERT_GT(n_compacts, 1000);
    for (int s = 0; s < MAX_SEQS; s++)
        if (sh.used[s]) ASSERT_EQ(kvp_seq_free(p, s), D2_OK);
    kvp_stats st = kvp_get_stats(p);
    ASSERT_EQ(st.pages_free, st.pages_total);
    ASSERT_EQ(st.seqs_active, 0);
    ASSERT_EQ(kvp_check(p), D2_OK);
    printf("  %d ops: %d reserve EKVFULL, %d compact EKVFULL, %d forks, %d compactions\n", n_ops,
           n_full, n_cow_compact_full, n_forks, n_compacts);
    kvp_destroy(p);
}
