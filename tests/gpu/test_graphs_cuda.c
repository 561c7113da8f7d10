/*
 * tests/gpu/test_graphs_cuda.c — CUDA graphs of the CUDA backend
 * (engine/cuda/backend.c, "CUDA graphs"): two CUDA backends, one replaying
 * decode-only steps from graphs and one launching every kernel, each with its
 * own KV pool, get the same steps; their logits, greedy tokens and D2O
 * scores must be bit-identical (the same kernels with the same arguments in
 * the same order; padding rows change no real row).
 *
 * The steps: decode batches of 3, 4, 3, 5, 1, 2 sequences (3 and 5 pad to
 * buckets of 4 and 8), contexts growing across page boundaries (block-table
 * patches between replays) and one across the 256-key decode split (the
 * decode work list changes between replays of one graph, with the batch and
 * with that split: a graph that had kept the work count of its capture
 * would leave splits out), decode steps that add D2O scores (another
 * graph), and a mixed prefill+decode step (launched directly). On the emulator the counters check the mechanism: a bucket's
 * first step runs directly, its second captures, and from then on a
 * decode-only step is one graph launch, no kernel outside it but the table
 * patch (when a table gained a page) and no cuBLASLt call outside it.
 *
 * Built against the emulator (make test-gpu-emu, part of make test) and,
 * with CUDA=1, against the real toolkit (make test-gpu,
 * tests/gpu/device_run.sh), where bit-identity is expected too (the padded
 * count is in the same cuBLASLt bucket, so the same algorithm runs; a
 * difference there is a finding to look at). Runs from the repository root.
 */
#include "tests/test.h"
#include "tests/gpu/side.h"

#include "engine/backend.h"
#include "engine/model/model.h"
#include "kvpool/kvpool.h"

#ifdef D2_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#define STORIES "models/stories260K/stories260K.gguf"
#define MAX_T 64
#define MAX_SEQ 640
#define PAGE 16
#define NSEQ 6

static void side_init(side *s, const eng_model *m, int graphs) {
    eng_backend_config bc = {.max_batch_tokens = MAX_T, .max_logit_rows = MAX_T,
                             .max_seq_tokens = MAX_SEQ, .page_tokens = PAGE, .cuda_graphs = graphs};
    s->name = graphs ? "graphs" : "direct";
    if (eng_cuda_device_count() <= 0) SKIP("no CUDA device (the emulator build always has one)");
    int rc = eng_cuda_backend_create(m, &bc, &s->be);
    if (rc != D2_OK) FAIL_("%s backend create: %s", s->name, d2_strerror(rc));
    kvp_config pc = {.n_layers = m->cfg.n_layers, .n_kv_heads = m->cfg.n_kv_heads,
                     .head_dim = m->cfg.head_dim, .page_tokens = PAGE, .n_pages = 160 * m->cfg.n_layers,
                     .max_seqs = 8, .max_seq_tokens = MAX_SEQ};
    ASSERT_OK(kvp_create(&pc, &s->pool));
    ASSERT_OK(s->be->ops->attach_thread(s->be));
    rc = s->be->ops->kv_attach(s->be, s->pool);
    if (rc != D2_OK) FAIL_("%s kv_attach: %s", s->name, s->be->ops->last_error(s->be));
}

typedef struct run {
    eng_model *m;
    side off, on;
    int V, L, n_kv;
    int seq[NSEQ], len[NSEQ];
    int32_t next[NSEQ];
    int uses[2][16]; /* decode-only steps seen per (scores, bucket) */
    int n_replayed;
} run;

static uint32_t rng = 777;
static int32_t rnd_tok(int vocab) {
    rng = rng * 1103515245u + 12345u;
    return (int32_t)(1 + (rng >> 8) % (uint32_t)(vocab - 1));
}

#ifdef CUDAEMU_C
typedef struct counts {
    unsigned long long kernels, lib, graphs, h2d;
} counts;
static counts counts_now(void) {
    unsigned long long c[EMU_C_N_COUNTERS];
    emu_c_counters(c);
    return (counts){c[EMU_C_KERNELS], c[EMU_C_LIB_CALLS], c[EMU_C_GRAPH_LAUNCHES], c[EMU_C_H2D_COPIES]};
}
#endif

/* The logits of both sides, bit for bit, and both device argmaxes. */
static void compare_logits(run *r, int rows, const char *what) {
    const float *a, *g;
    float *keep = malloc((size_t)rows * r->V * sizeof(float));
    ASSERT(keep != NULL);
    ASSERT_OK(r->off.be->ops->logits(r->off.be, 0, rows, &a));
    memcpy(keep, a, (size_t)rows * r->V * sizeof(float));
    ASSERT_OK(r->on.be->ops->logits(r->on.be, 0, rows, &g));
    int idx[NSEQ + MAX_T];
    int32_t t_off[NSEQ + MAX_T], t_on[NSEQ + MAX_T];
    for (int i = 0; i < rows; i++) idx[i] = i;
    ASSERT_OK(r->off.be->ops->argmax(r->off.be, idx, rows, t_off));
    ASSERT_OK(r->on.be->ops->argmax(r->on.be, idx, rows, t_on));
    for (int i = 0; i < rows; i++) {
        if (t_off[i] != t_on[i]) FAIL_("%s row %d: argmax %d direct, %d with graphs", what, i, t_off[i], t_on[i]);
        for (int v = 0; v < r->V; v++) {
            float x = keep[(size_t)i * r->V + v], y = g[(size_t)i * r->V + v];
            if (memcmp(&x, &y, sizeof x) != 0)
                FAIL_("%s row %d logit %d: %.9g direct, %.9g with graphs", what, i, v, x, y);
        }
    }
    free(keep);
}

/* The D2O scores of every live slot of seq on both sides, bit for bit. */
static void compare_scores(run *r, int k) {
    float a[64], g[64];
    for (int l = 0; l < r->L; l++) {
        int n = kvp_get_table(r->off.pool, r->seq[k], l).n_tokens;
        for (int i = 0; i < n; i++) {
            ASSERT_OK(r->off.be->ops->read_slot(r->off.be, r->seq[k], l, i, NULL, NULL, a));
            ASSERT_OK(r->on.be->ops->read_slot(r->on.be, r->seq[k], l, i, NULL, NULL, g));
            if (memcmp(a, g, (size_t)r->n_kv * sizeof(float)) != 0)
                FAIL_("scores of seq %d layer %d slot %d differ (%.9g vs %.9g)", k, l, i, a[0], g[0]);
        }
    }
}

static int bucket_of(int n) {
    int b = 0;
    while ((1 << b) < n) b++;
    return b;
}

/* One decode step of the sequences ks[0..n) (scores: with want_scores and
 * score_from 0), then the comparison and, on the emulator, the counters. */
static void decode(run *r, const int *ks, int n, int scores) {
    int32_t toks[NSEQ], pos[NSEQ];
    eng_batch_seq seqs[NSEQ];
    int new_page = 0;
    for (int i = 0; i < n; i++) {
        int k = ks[i];
        toks[i] = r->next[k];
        pos[i] = r->len[k];
        new_page |= r->len[k] % PAGE == 0;
        seqs[i] = (eng_batch_seq){.seq = r->seq[k], .start = i, .n = 1, .want_logits = true,
                                  .want_scores = scores != 0, .score_from = 0};
    }
    eng_batch b = {.n_tokens = n, .tokens = toks, .pos = pos, .n_seqs = n, .seqs = seqs};
    side_step(&r->off, &b, r->L);
#ifdef CUDAEMU_C
    counts c0 = counts_now();
#endif
    side_step(&r->on, &b, r->L);
    (void)new_page;
#ifdef CUDAEMU_C
    counts c1 = counts_now();
    int use = r->uses[scores != 0][bucket_of(n)]++;
    unsigned long long graphs = c1.graphs - c0.graphs, kernels = c1.kernels - c0.kernels;
    if (use == 0) { /* the bucket's warm-up step: launched directly */
        if (graphs != 0 || kernels < 10) FAIL_("batch %d: first step of its bucket: %llu graph launches, %llu kernels", n, graphs, kernels);
    } else {
        if (graphs != 1) FAIL_("batch %d (use %d of its bucket): %llu graph launches, want 1", n, use, graphs);
        if (kernels != (unsigned long long)new_page)
            FAIL_("batch %d: %llu kernels outside the graph, want %d (the table patch)", n, kernels, new_page);
        if (c1.lib != c0.lib) FAIL_("batch %d: %llu cuBLASLt calls outside the graph", n, c1.lib - c0.lib);
        if (c1.h2d - c0.h2d != 1) FAIL_("batch %d: %llu uploads, want 1", n, c1.h2d - c0.h2d);
        r->n_replayed++;
    }
#endif
    char what[64];
    snprintf(what, sizeof what, "decode of %d%s", n, scores ? " with scores" : "");
    compare_logits(r, n, what);
    int idx[NSEQ];
    int32_t t[NSEQ];
    for (int i = 0; i < n; i++) idx[i] = i;
    ASSERT_OK(r->off.be->ops->argmax(r->off.be, idx, n, t));
    for (int i = 0; i < n; i++) {
        r->next[ks[i]] = t[i];
        r->len[ks[i]]++;
    }
    if (scores)
        for (int i = 0; i < n; i++) compare_scores(r, ks[i]);
}

/* A prompt of n tokens for sequence k, in chunks of MAX_T; with dec >= 0 the
 * last chunk shares its step with a decode token of sequence dec. */
static void prefill(run *r, int k, int n, int dec) {
    int32_t toks[MAX_T + 1], pos[MAX_T + 1];
    eng_batch_seq seqs[2];
    for (int at = 0; at < n; at += MAX_T - 1) {
        int c = n - at < MAX_T - 1 ? n - at : MAX_T - 1, last = at + c == n, ns = 1;
        for (int j = 0; j < c; j++) {
            toks[j] = rnd_tok(r->V);
            pos[j] = at + j;
        }
        seqs[0] = (eng_batch_seq){.seq = r->seq[k], .start = 0, .n = c, .want_logits = last};
        if (last && dec >= 0) {
            toks[c] = r->next[dec];
            pos[c] = r->len[dec];
            seqs[1] = (eng_batch_seq){.seq = r->seq[dec], .start = c, .n = 1, .want_logits = true};
            ns = 2;
        }
        eng_batch b = {.n_tokens = c + ns - 1, .tokens = toks, .pos = pos, .n_seqs = ns, .seqs = seqs};
        side_step(&r->off, &b, r->L);
#ifdef CUDAEMU_C
        counts c0 = counts_now();
#endif
        side_step(&r->on, &b, r->L);
#ifdef CUDAEMU_C
        if (counts_now().graphs != c0.graphs) FAIL_("a prefill step was replayed from a graph");
#endif
        if (last) {
            compare_logits(r, ns, ns == 2 ? "mixed prefill+decode" : "prefill");
            int idx[2] = {0, 1};
            int32_t t[2];
            ASSERT_OK(r->off.be->ops->argmax(r->off.be, idx, ns, t));
            r->next[k] = t[0];
            if (ns == 2) {
                r->next[dec] = t[1];
                r->len[dec]++;
            }
        }
    }
    r->len[k] = n;
}

/* Sequence k gets n tokens of K/V written directly (the same pseudo-random
 * values on both sides: the emulator would spend most of the test on
 * computing prompts; the prefill path has its own test, test_backend_cuda). */
static void fill_kv(run *r, int k, int n) {
    side *sd[2] = {&r->off, &r->on};
    int kvd = r->n_kv * r->m->cfg.head_dim;
    float *kv = malloc((size_t)kvd * 2 * sizeof(float));
    ASSERT(kv != NULL);
    for (int si = 0; si < 2; si++) {
        side *s = sd[si];
        ASSERT_OK(kvp_reserve_all_layers(s->pool, r->seq[k], n));
        int32_t *pos = kvp_pos_base(s->pool);
        uint32_t x = 99u + (uint32_t)k;
        for (int l = 0; l < r->L; l++) {
            ASSERT_EQ(kvp_append(s->pool, r->seq[k], l, n), 0);
            kvp_table tab = kvp_get_table(s->pool, r->seq[k], l);
            for (int j = 0; j < n; j++) {
                int32_t page;
                int slot;
                kvp_locate(&tab, PAGE, j, &page, &slot);
                pos[(size_t)page * PAGE + (size_t)slot] = j;
                for (int e = 0; e < 2 * kvd; e++) {
                    x = x * 1664525u + 1013904223u;
                    kv[e] = (float)(x >> 8) / 8388608.0f - 1.0f;
                }
                ASSERT_OK(s->be->ops->write_slot(s->be, r->seq[k], l, j, kv, kv + kvd, NULL));
            }
        }
    }
    free(kv);
    r->next[k] = rnd_tok(r->V);
    r->len[k] = n;
}

TEST(graphs_equal_direct_decode) {
    REQUIRE_FILE(STORIES);
    run r;
    memset(&r, 0, sizeof r);
    ASSERT_OK(eng_model_load(STORIES, false, &r.m));
    r.V = r.m->cfg.vocab_size;
    r.L = r.m->cfg.n_layers;
    r.n_kv = r.m->cfg.n_kv_heads;
    side_init(&r.off, r.m, 0);
    side_init(&r.on, r.m, 1);
    for (int k = 0; k < NSEQ; k++) {
        int a, b;
        ASSERT_OK(kvp_seq_new(r.off.pool, &a));
        ASSERT_OK(kvp_seq_new(r.on.pool, &b));
        ASSERT_EQ(a, b);
        r.seq[k] = a;
    }
    /* Sequence 0 has 254 tokens: its decode steps cross 256 keys, a second
     * decode split, while bucket 4's graph replays (the decode attention is
     * what the emulator spends its time on, so it joins only those steps).
     * The work lists also change with the batch inside a bucket (3 and 4
     * sequences share the graph of 4). */
    const int plen[NSEQ] = {254, 46, 20, 33, 31, 40};
    for (int k = 0; k < NSEQ - 1; k++) fill_kv(&r, k, plen[k]);
    prefill(&r, 5, plen[5], 1); /* a mixed prefill+decode step: launched directly */
    const int s3a[3] = {1, 2, 3}, s4[4] = {1, 2, 3, 4}, s3b[3] = {2, 3, 4}, s5[5] = {1, 2, 3, 4, 5};
    const int s1[1] = {2}, s2[2] = {2, 5}, s3c[3] = {3, 4, 5}, s3x[3] = {0, 1, 2};
    for (int round = 0; round < 2; round++) {
        decode(&r, s3a, 3, 0);
        decode(&r, s4, 4, 0);
        decode(&r, s3b, 3, 0);
        decode(&r, s5, 5, 0);
        decode(&r, s1, 1, 0);
        decode(&r, s2, 2, 0);
        decode(&r, s3c, 3, 1); /* D2O decode scores: its own graph */
    }
    for (int i = 0; i < 3; i++) decode(&r, s3x, 3, 0); /* 255 .. 257 keys */
    ASSERT(r.len[0] > 256);
    decode(&r, s5, 5, 0);
    decode(&r, s3c, 3, 1);
    eng_cuda_graph_stats gs = eng_cuda_backend_graph_stats(r.on.be);
    printf("  graphs: %lld captured in %.3f s (emulated work: meaningless as a time), %lld replays, "
           "%lld warm-up steps; %d replayed steps checked by the counters\n",
           (long long)gs.captures, gs.capture_s, (long long)gs.replays, (long long)gs.warmup_steps,
           r.n_replayed);
    ASSERT(gs.captures == 5 && gs.replays >= 14);
    eng_cuda_graph_stats go = eng_cuda_backend_graph_stats(r.off.be);
    ASSERT(go.captures == 0 && go.replays == 0);
    side_free(&r.off);
    side_free(&r.on);
    eng_model_free(r.m);
}

/* Graphs switched off at run time (eng_cuda_backend_set_graphs): the next
 * decode step launches its kernels; switched on again, it replays. */
TEST(graphs_switch_at_run_time) {
    REQUIRE_FILE(STORIES);
    run r;
    memset(&r, 0, sizeof r);
    ASSERT_OK(eng_model_load(STORIES, false, &r.m));
    r.V = r.m->cfg.vocab_size;
    r.L = r.m->cfg.n_layers;
    r.n_kv = r.m->cfg.n_kv_heads;
    side_init(&r.off, r.m, 0);
    side_init(&r.on, r.m, 1);
    for (int k = 0; k < 2; k++) {
        int a, b;
        ASSERT_OK(kvp_seq_new(r.off.pool, &a));
        ASSERT_OK(kvp_seq_new(r.on.pool, &b));
        r.seq[k] = a;
        ASSERT_EQ(a, b);
        prefill(&r, k, 12 + k, -1);
    }
    const int s2[2] = {0, 1};
    decode(&r, s2, 2, 0); /* warm-up */
    decode(&r, s2, 2, 0); /* capture + replay */
    ASSERT_EQ(eng_cuda_backend_set_graphs(r.on.be, 0), 1);
    int64_t before = eng_cuda_backend_graph_stats(r.on.be).replays;
    int32_t toks[2] = {r.next[0], r.next[1]}, pos[2] = {r.len[0], r.len[1]};
    eng_batch_seq seqs[2] = {{.seq = r.seq[0], .start = 0, .n = 1, .want_logits = true},
                             {.seq = r.seq[1], .start = 1, .n = 1, .want_logits = true}};
    eng_batch b = {.n_tokens = 2, .tokens = toks, .pos = pos, .n_seqs = 2, .seqs = seqs};
    side_step(&r.off, &b, r.L);
    side_step(&r.on, &b, r.L);
    compare_logits(&r, 2, "decode with graphs switched off");
    ASSERT_EQ(eng_cuda_backend_graph_stats(r.on.be).replays, before);
    for (int k = 0; k < 2; k++) r.len[k]++;
    ASSERT_EQ(eng_cuda_backend_set_graphs(r.on.be, 1), 0);
    r.uses[0][bucket_of(2)] = 1; /* captured already: the next one replays */
    decode(&r, s2, 2, 0);
    ASSERT_EQ(eng_cuda_backend_graph_stats(r.on.be).replays, before + 1);
    side_free(&r.off);
    side_free(&r.on);
    eng_model_free(r.m);
}
