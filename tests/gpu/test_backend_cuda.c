/*
 * tests/gpu/test_backend_cuda.c — the CUDA backend (engine/cuda/) against the
 * CPU backend (engine/cpu/): the same plans through both, each with its own
 * KV pool driven the way engine/step.c drives it, comparing logits (max
 * absolute and relative difference, greedy agreement), the D2O column sums
 * and scores, and the slots a compression keeps.
 *
 * Built twice: against the CUDA emulator (tests/emu/, `make test-gpu-emu`,
 * part of `make test`: CUDA runtime and cuBLASLt stand-ins, the kernels run
 * on the CPU) and, on a GPU machine, against the real toolkit (`make
 * test-gpu`, tests/gpu/device_run.sh). Runs from the repository root (the
 * shipped models/stories260K); further models from ../shared when present.
 *
 * Tolerances: the CUDA backend rounds weights, GEMM inputs and K/V to bf16
 * (8 significant bits), the CPU backend keeps f32; differences of a few
 * percent of the logit range are expected, larger ones are bugs (a wrong
 * layout or a missed token gives differences of the order of the range).
 */
#include "tests/test.h"
#include "tests/gpu/side.h"

#include "engine/backend.h"
#include "engine/model/model.h"
#include "kvpool/kvpool.h"

#ifdef D2_HAVE_CUDA
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#endif

#define STORIES "models/stories260K/stories260K.gguf"
#define MAX_T 64
#define MAX_SEQ 256
#define PAGE 16

typedef struct pair {
    eng_model *m;
    side cpu, cu;
    int vocab, n_layers, n_heads;
    /* worst differences seen */
    double max_abs, max_rel;
    int rows, argmax_agree;
    double range_floor;
} pair;

static void side_init(side *s, const eng_model *m, int cuda, int n_pages) {
    eng_backend_config bc = {.n_threads = 1, .max_batch_tokens = MAX_T, .max_logit_rows = MAX_T,
                             .max_seq_tokens = MAX_SEQ, .page_tokens = PAGE};
    s->name = cuda ? "cuda" : "cpu";
    if (cuda && eng_cuda_device_count() <= 0) SKIP("no CUDA device (the emulator build always has one)");
    int rc = cuda ? eng_cuda_backend_create(m, &bc, &s->be) : eng_cpu_backend_create(m, &bc, &s->be);
    if (rc != D2_OK) FAIL_("%s backend create: %s", s->name, d2_strerror(rc));
    kvp_config pc = {.n_layers = m->cfg.n_layers, .n_kv_heads = m->cfg.n_kv_heads,
                     .head_dim = m->cfg.head_dim, .page_tokens = PAGE, .n_pages = n_pages,
                     .max_seqs = 8, .max_seq_tokens = MAX_SEQ};
    ASSERT_OK(kvp_create(&pc, &s->pool));
    ASSERT_OK(s->be->ops->attach_thread(s->be));
    rc = s->be->ops->kv_attach(s->be, s->pool);
    if (rc != D2_OK) FAIL_("%s kv_attach: %s", s->name, s->be->ops->last_error(s->be));
}

/* Model options of a scenario run: a sliding window forced onto the loaded
 * model (0 = keep), heavy hitters of the compression (random-weight models
 * attend almost uniformly, so their heavy-hitter ranking is decided by
 * rounding noise: they compress to sinks + recent, which still merges). */
typedef struct model_opts {
    int window;
    int heavy;
    double range_floor; /* logit ranges below this count as this */
} model_opts;

static void pair_init(pair *p, const char *path, const model_opts *o) {
    memset(p, 0, sizeof *p);
    ASSERT_OK(eng_model_load(path, false, &p->m));
    if (o->window > 0) p->m->cfg.sliding_window = o->window;
    p->range_floor = o->range_floor;
    p->vocab = p->m->cfg.vocab_size;
    p->n_layers = p->m->cfg.n_layers;
    p->n_heads = p->m->cfg.n_heads;
    side_init(&p->cpu, p->m, 0, 96);
    side_init(&p->cu, p->m, 1, 96);
    eng_backend_caps caps;
    p->cu.be->ops->caps(p->cu.be, &caps);
    ASSERT_STREQ(caps.name, "cuda");
    ASSERT(caps.kv_dtype == ENG_KV_DT_BF16 && caps.kv_on_device && caps.argmax_on_device);
    ASSERT(caps.kv_bytes_per_slot > 0 && caps.kv_bytes_avail > 0);
}

static void pair_free(pair *p) {
    side_free(&p->cpu);
    side_free(&p->cu);
    eng_model_free(p->m);
}

static int argmax_row(const float *x, int n, float *margin) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    float second = -INFINITY;
    for (int i = 0; i < n; i++)
        if (i != best && x[i] > second) second = x[i];
    *margin = x[best] - second;
    return best;
}

/* Runs b through both sides and compares every logit row; greedy[r] gets the
 * CPU's greedy token of row r. */
static void step_both(pair *p, const eng_batch *b, int32_t *greedy, const char *what) {
    side_step(&p->cpu, b, p->n_layers);
    side_step(&p->cu, b, p->n_layers);
    int rows = eng_batch_out_rows(b);
    if (rows == 0) return;
    const float *lc, *lg;
    ASSERT_OK(p->cpu.be->ops->logits(p->cpu.be, 0, rows, &lc));
    ASSERT_OK(p->cu.be->ops->logits(p->cu.be, 0, rows, &lg));
    int rows_idx[MAX_T];
    int32_t dev_greedy[MAX_T];
    for (int r = 0; r < rows; r++) rows_idx[r] = r;
    ASSERT_OK(p->cu.be->ops->argmax(p->cu.be, rows_idx, rows, dev_greedy));
    for (int r = 0; r < rows; r++) {
        const float *a = lc + (size_t)r * p->vocab, *g = lg + (size_t)r * p->vocab;
        double mx = 0, lo = INFINITY, hi = -INFINITY;
        for (int i = 0; i < p->vocab; i++) {
            double d = fabs((double)a[i] - (double)g[i]);
            if (!(d <= mx)) mx = d; /* NaN counts as huge */
            if (a[i] < lo) lo = a[i];
            if (a[i] > hi) hi = a[i];
        }
        double range = hi - lo > p->range_floor ? hi - lo : p->range_floor;
        double rel = mx / range;
        float mc, mg;
        int ac = argmax_row(a, p->vocab, &mc), ag = argmax_row(g, p->vocab, &mg);
        if (dev_greedy[r] != ag)
            FAIL_("%s row %d: device argmax %d, the device's logits say %d", what, r, dev_greedy[r], ag);
        if (rel > p->max_rel) p->max_rel = rel;
        if (mx > p->max_abs) p->max_abs = mx;
        p->rows++;
        p->argmax_agree += ac == ag;
        /* bf16 rounding against f32: a few percent of the range at most */
        if (!(rel <= 0.05))
            FAIL_("%s row %d: max |cpu - cuda| = %.4g over a logit range of %.4g (%.2f%%)", what, r,
                  mx, range, 100 * rel);
        if (ac != ag && mc > 0.05 * range)
            FAIL_("%s row %d: greedy %d (cpu) vs %d (cuda) with a cpu margin of %.4g", what, r, ac,
                  ag, mc);
        if (greedy) greedy[r] = ac;
    }
}

static uint32_t rng_state = 12345;
static int32_t rnd_tok(int vocab) {
    rng_state = rng_state * 1103515245u + 12345u;
    return (int32_t)(1 + (rng_state >> 8) % (uint32_t)(vocab - 1));
}

static float thr_mean(void *user, float mean_sim) {
    (void)user;
    return mean_sim;
}

static void new_seq(pair *p, int *seq) {
    int a, b;
    ASSERT_OK(kvp_seq_new(p->cpu.pool, &a));
    ASSERT_OK(kvp_seq_new(p->cu.pool, &b));
    ASSERT_EQ(a, b);
    *seq = a;
}

/* Scores of every live slot of (seq, layer) on both sides. */
static void compare_scores(pair *p, int seq, const char *what) {
    int n_kv = p->m->cfg.n_kv_heads;
    float sc[64], sg[64];
    double worst = 0, total = 0, largest = 0;
    for (int l = 0; l < p->n_layers; l++) {
        int n = kvp_get_table(p->cpu.pool, seq, l).n_tokens;
        ASSERT_EQ(n, kvp_get_table(p->cu.pool, seq, l).n_tokens);
        for (int i = 0; i < n; i++) {
            ASSERT_OK(p->cpu.be->ops->read_slot(p->cpu.be, seq, l, i, NULL, NULL, sc));
            ASSERT_OK(p->cu.be->ops->read_slot(p->cu.be, seq, l, i, NULL, NULL, sg));
            for (int h = 0; h < n_kv; h++) {
                double d = fabs((double)sc[h] - (double)sg[h]);
                if (!(d <= worst)) worst = d;
                total += sc[h];
                if (sc[h] > largest) largest = sc[h];
            }
        }
    }
    if (!(total > 0)) FAIL_("%s: no scores accumulated on the cpu side", what);
    /* a score is a sum of probabilities (queries x group): compare to the largest */
    if (!(worst <= 0.03 * largest)) FAIL_("%s: max score difference %.4g (largest %.4g)", what, worst, largest);
    printf("  %s: max score difference %.3g (largest %.3g)\n", what, worst, largest);
}

static void run_scenarios(const char *path, const model_opts *o) {
    pair p;
    pair_init(&p, path, o);
    int V = p.vocab, L = p.n_layers, H = p.n_heads;
    int32_t toks[MAX_T], pos[MAX_T], greedy[MAX_T];
    eng_batch_seq seqs[4];
    eng_batch b;

    /* 1. chunked prefill of A (40 tokens: 16 + 16 + 8) with scores and colsums */
    int A, B, C;
    new_seq(&p, &A);
    enum { CS_LEN = 64 };
    float *cs_cpu = calloc((size_t)L * H * CS_LEN, sizeof(float));
    float *cs_cu = calloc((size_t)L * H * CS_LEN, sizeof(float));
    int32_t promptA[40];
    for (int i = 0; i < 40; i++) promptA[i] = rnd_tok(V);
    int chunks[3] = {16, 16, 8}, at = 0;
    for (int c = 0; c < 3; c++) {
        int n = chunks[c];
        for (int j = 0; j < n; j++) {
            toks[j] = promptA[at + j];
            pos[j] = at + j;
        }
        seqs[0] = (eng_batch_seq){.seq = A, .start = 0, .n = n, .want_scores = true,
                                  .want_logits = true, .colsum_len = CS_LEN};
        b = (eng_batch){.n_tokens = n, .tokens = toks, .pos = pos, .n_seqs = 1, .seqs = seqs};
        /* each side gets its own colsum array */
        seqs[0].colsum = cs_cpu;
        side_step(&p.cpu, &b, L);
        seqs[0].colsum = cs_cu;
        side_step(&p.cu, &b, L);
        const float *lc, *lg;
        ASSERT_OK(p.cpu.be->ops->logits(p.cpu.be, 0, 1, &lc));
        ASSERT_OK(p.cu.be->ops->logits(p.cu.be, 0, 1, &lg));
        double mx = 0, lo = INFINITY, hi = -INFINITY;
        for (int i = 0; i < V; i++) {
            double d = fabs((double)lc[i] - (double)lg[i]);
            if (!(d <= mx)) mx = d;
            if (lc[i] < lo) lo = lc[i];
            if (lc[i] > hi) hi = lc[i];
        }
        printf("  prefill chunk %d: max |diff| %.4g, logit range %.4g\n", c, mx, hi - lo);
        if (!(mx <= 0.05 * (hi - lo > p.range_floor ? hi - lo : p.range_floor)))
            FAIL_("prefill chunk %d differs", c);
        at += n;
    }
    double cs_worst = 0, cs_sum = 0, cs_max = 0;
    for (size_t i = 0; i < (size_t)L * H * CS_LEN; i++) {
        double d = fabs((double)cs_cpu[i] - (double)cs_cu[i]);
        if (!(d <= cs_worst)) cs_worst = d;
        if (cs_cpu[i] > cs_max) cs_max = cs_cpu[i];
        cs_sum += cs_cpu[i];
    }
    printf("  colsum: max difference %.3g (largest sum %.3g, total %.4g)\n", cs_worst, cs_max, cs_sum);
    /* every query's probabilities sum to 1 per head: L * H * 40 in all */
    ASSERT_NEAR(cs_sum, (double)L * H * 40, 0.01 * L * H * 40);
    /* a column sum adds up to 40 probabilities: compare to the largest */
    if (!(cs_worst <= 0.03 * cs_max)) FAIL_("column sums differ by %.4g (largest %.4g)", cs_worst, cs_max);
    compare_scores(&p, A, "scores after prefill");

    /* 2. a mixed step: B's 12-token prefill chunk and A's decode token (scoring) */
    new_seq(&p, &B);
    for (int j = 0; j < 12; j++) {
        toks[j] = rnd_tok(V);
        pos[j] = j;
    }
    toks[12] = rnd_tok(V);
    pos[12] = 40;
    seqs[0] = (eng_batch_seq){.seq = B, .start = 0, .n = 12, .want_logits = true};
    seqs[1] = (eng_batch_seq){.seq = A, .start = 12, .n = 1, .want_logits = true, .want_scores = true};
    b = (eng_batch){.n_tokens = 13, .tokens = toks, .pos = pos, .n_seqs = 2, .seqs = seqs};
    step_both(&p, &b, greedy, "mixed prefill+decode");
    compare_scores(&p, A, "scores after a decode step");
    int32_t nextB = greedy[0], nextA = greedy[1];

    /* 3. fork A -> C (shared pages, copy on write at the next append), decode all three */
    int c1, c2;
    ASSERT_OK(kvp_seq_fork(p.cpu.pool, A, &c1));
    ASSERT_OK(kvp_seq_fork(p.cu.pool, A, &c2));
    ASSERT_EQ(c1, c2);
    C = c1;
    int posA = 41, posB = 12, posC = 41;
    int32_t nextC = rnd_tok(V);
    for (int it = 0; it < 3; it++) {
        /* C first: the decode rows are not in plan order inside the backend */
        toks[0] = nextC; pos[0] = posC;
        toks[1] = nextB; pos[1] = posB;
        toks[2] = nextA; pos[2] = posA;
        seqs[0] = (eng_batch_seq){.seq = C, .start = 0, .n = 1, .want_logits = true};
        seqs[1] = (eng_batch_seq){.seq = B, .start = 1, .n = 1, .want_logits = true};
        seqs[2] = (eng_batch_seq){.seq = A, .start = 2, .n = 1, .want_logits = true};
        b = (eng_batch){.n_tokens = 3, .tokens = toks, .pos = pos, .n_seqs = 3, .seqs = seqs};
        step_both(&p, &b, greedy, "decode after fork");
        nextC = greedy[0]; nextB = greedy[1]; nextA = greedy[2];
        posA++; posB++; posC++;
    }
    ASSERT_OK(kvp_check(p.cpu.pool));
    ASSERT_OK(kvp_check(p.cu.pool));

    /* 4. D2O compression of C on every layer (merging), then decode: the
     * CPU backend one layer at a time; the CUDA backend the first half of
     * the layers one at a time (kv_compress) and the rest in one call
     * (kv_compress_layers, the threshold as data, one host synchronisation) */
    eng_kv_compress_req rqs[64];
    eng_kv_compress_res rc1[64], rc2[64];
    ASSERT(L <= 64 && p.cu.be->ops->kv_compress_layers != NULL);
    int half = L / 2;
    for (int l = 0; l < L; l++) {
        rqs[l] = (eng_kv_compress_req){.seq = C, .layer = l, .heavy = o->heavy, .recent = 8,
                                       .n_sink = 2, .merge = true, .threshold = thr_mean,
                                       .tau_ema = true, .tau_first = true, .ema_beta = 0.5f};
        int rc = p.cpu.be->ops->kv_compress(p.cpu.be, &rqs[l], &rc1[l]);
        if (rc) FAIL_("cpu kv_compress: %s", p.cpu.be->ops->last_error(p.cpu.be));
        if (l < half) {
#ifdef CUDAEMU_C
            unsigned long long k0[EMU_C_N_COUNTERS], k1[EMU_C_N_COUNTERS];
            emu_c_counters(k0);
#endif
            rc = p.cu.be->ops->kv_compress(p.cu.be, &rqs[l], &rc2[l]);
            if (rc) FAIL_("cuda kv_compress layer %d: %s", l, p.cu.be->ops->last_error(p.cu.be));
#ifdef CUDAEMU_C
            emu_c_counters(k1);
            printf("  kv_compress of layer %d alone: %llu host synchronisations\n", l,
                   k1[EMU_C_SYNCS] - k0[EMU_C_SYNCS]);
#endif
        }
    }
#ifdef CUDAEMU_C
    unsigned long long sy0[EMU_C_N_COUNTERS], sy1[EMU_C_N_COUNTERS];
    emu_c_counters(sy0);
#endif
    int rcb = p.cu.be->ops->kv_compress_layers(p.cu.be, rqs + half, L - half, rc2 + half);
    if (rcb) FAIL_("cuda kv_compress_layers: %s", p.cu.be->ops->last_error(p.cu.be));
#ifdef CUDAEMU_C
    emu_c_counters(sy1);
    printf("  kv_compress_layers of %d layers: %llu host synchronisations\n", L - half,
           sy1[EMU_C_SYNCS] - sy0[EMU_C_SYNCS]);
    if (sy1[EMU_C_SYNCS] - sy0[EMU_C_SYNCS] > 1)
        FAIL_("kv_compress_layers of %d layers: %llu host synchronisations", L - half,
              sy1[EMU_C_SYNCS] - sy0[EMU_C_SYNCS]);
#endif
    for (int l = 0; l < L; l++) {
        eng_kv_compress_res r1 = rc1[l], r2 = rc2[l];
        ASSERT_EQ(r1.n_evicted, r2.n_evicted);
        ASSERT_GT(r1.n_evicted, 0);
        ASSERT_NEAR(r1.tau, r2.tau, 0.02);
        kvp_table t1 = kvp_get_table(p.cpu.pool, C, l), t2 = kvp_get_table(p.cu.pool, C, l);
        ASSERT_EQ(t1.n_tokens, t2.n_tokens);
        const int32_t *p1 = kvp_pos_base(p.cpu.pool), *p2 = kvp_pos_base(p.cu.pool);
        for (int i = 0; i < t1.n_tokens; i++) {
            int32_t a = p1[(size_t)t1.pages[i / PAGE] * PAGE + i % PAGE];
            int32_t g = p2[(size_t)t2.pages[i / PAGE] * PAGE + i % PAGE];
            if (a != g) FAIL_("layer %d kept slot %d: position %d (cpu) vs %d (cuda)", l, i, a, g);
        }
        if (l == 0 || l == L - 1)
            printf("  compression layer %d: %d evicted, %d merged (cpu) / %d (cuda), tau %.4f / %.4f\n",
                   l, r1.n_evicted, r1.n_merged, r2.n_merged, r1.tau, r2.tau);
    }
    ASSERT_OK(kvp_check(p.cpu.pool));
    ASSERT_OK(kvp_check(p.cu.pool));
    for (int it = 0; it < 3; it++) {
        toks[0] = nextA; pos[0] = posA;
        toks[1] = nextC; pos[1] = posC;
        seqs[0] = (eng_batch_seq){.seq = A, .start = 0, .n = 1, .want_logits = true};
        seqs[1] = (eng_batch_seq){.seq = C, .start = 1, .n = 1, .want_logits = true};
        b = (eng_batch){.n_tokens = 2, .tokens = toks, .pos = pos, .n_seqs = 2, .seqs = seqs};
        step_both(&p, &b, greedy, "decode after compression");
        nextA = greedy[0]; nextC = greedy[1];
        posA++; posC++;
    }

    /* 5. all_logits (perplexity rows) of a chunk of B */
    for (int j = 0; j < 5; j++) {
        toks[j] = rnd_tok(V);
        pos[j] = posB + j;
    }
    seqs[0] = (eng_batch_seq){.seq = B, .start = 0, .n = 5, .all_logits = true};
    b = (eng_batch){.n_tokens = 5, .tokens = toks, .pos = pos, .n_seqs = 1, .seqs = seqs};
    step_both(&p, &b, NULL, "all_logits chunk");

    printf("  %s: %d logit rows, max |diff| %.4g, max diff/range %.3f%%, greedy agreement %d/%d\n",
           path, p.rows, p.max_abs, 100 * p.max_rel, p.argmax_agree, p.rows);
    free(cs_cpu);
    free(cs_cu);
    pair_free(&p);
}

TEST(stories260k_cpu_vs_cuda) {
    REQUIRE_FILE(STORIES);
    model_opts o = {.heavy = 10, .range_floor = 1.0};
    run_scenarios(STORIES, &o);
}

TEST(llama2_tiny_random_cpu_vs_cuda) {
    const char *path = test_shared_path("assets/models/llama-2-tiny-random/llama-2-tiny-random.gguf");
    REQUIRE_FILE(path);
    model_opts o = {.heavy = 2, .range_floor = 1e-3};
    run_scenarios(path, &o);
}

/* A 2-layer model from tools/gen_model (random weights) of an architecture. */
static void generated(const char *arch, const char *dir) {
    const char *tools[2] = {"build/tools/gen_model", "build/cuda/tools/gen_model"};
    const char *tool = NULL;
    for (int i = 0; i < 2 && !tool; i++)
        if (access(tools[i], X_OK) == 0) tool = tools[i];
    if (!tool) SKIP("tools/gen_model is not built (make all)");
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s --out %s --shape tiny --arch %s --tokenizer none >/dev/null", tool,
             dir, arch);
    if (system(cmd) != 0) FAIL_("%s failed", cmd);
}

TEST(qwen2_generated_qkv_bias_cpu_vs_cuda) {
    char dir[] = "/tmp/d2od-test-qwen2-XXXXXX";
    ASSERT(mkdtemp(dir) != NULL);
    generated("qwen2", dir);
    model_opts o = {.heavy = 2, .range_floor = 1e-3};
    run_scenarios(dir, &o);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ASSERT_EQ(system(cmd), 0);
}

TEST(mistral_generated_sliding_window_cpu_vs_cuda) {
    char dir[] = "/tmp/d2od-test-mistral-XXXXXX";
    ASSERT(mkdtemp(dir) != NULL);
    generated("mistral", dir);
    /* a window shorter than the 40-token prompt, so it masks keys */
    model_opts o = {.window = 16, .heavy = 2, .range_floor = 1e-3};
    run_scenarios(dir, &o);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ASSERT_EQ(system(cmd), 0);
}

TEST(plan_errors_and_last_error) {
    REQUIRE_FILE(STORIES);
    eng_model *m;
    ASSERT_OK(eng_model_load(STORIES, false, &m));
    side s;
    side_init(&s, m, 1, 32);
    int seq;
    ASSERT_OK(kvp_seq_new(s.pool, &seq));
    int32_t tok = m->cfg.vocab_size, pos = 0; /* out of the vocabulary */
    eng_batch_seq bs = {.seq = seq, .start = 0, .n = 1, .want_logits = true};
    eng_batch b = {.n_tokens = 1, .tokens = &tok, .pos = &pos, .n_seqs = 1, .seqs = &bs};
    ASSERT_OK(kvp_reserve_all_layers(s.pool, seq, 1));
    for (int l = 0; l < m->cfg.n_layers; l++) ASSERT(kvp_append(s.pool, seq, l, 1) >= 0);
    ASSERT_EQ(s.be->ops->step(s.be, &b), D2_EINVAL);
    ASSERT(strstr(s.be->ops->last_error(s.be), "step") != NULL);
    const float *lg;
    ASSERT_EQ(s.be->ops->logits(s.be, 0, 1, &lg), D2_EINVAL);
    tok = 1;
    ASSERT_OK(s.be->ops->step(s.be, &b));
    ASSERT_OK(s.be->ops->logits(s.be, 0, 1, &lg));
    ASSERT(isfinite(lg[0]));
    side_free(&s);
    eng_model_free(m);
}



#ifdef CUDAEMU_C
/* The emulator's counters of host synchronisations, host-to-device bytes and
 * cuBLASLt heuristic queries (tests/emu/include_c/). */
typedef struct traffic {
    unsigned long long syncs, h2d_bytes, h2d_copies, heuristic;
} traffic;

static traffic traffic_now(void) {
    unsigned long long c[EMU_C_N_COUNTERS], ex, im;
    emu_c_counters(c);
    emu_cublaslt_counters(&ex, &im);
    return (traffic){.syncs = c[EMU_C_SYNCS], .h2d_bytes = c[EMU_C_H2D_BYTES],
                     .h2d_copies = c[EMU_C_H2D_COPIES], .heuristic = ex + im};
}

static traffic traffic_since(traffic a) {
    traffic b = traffic_now();
    return (traffic){.syncs = b.syncs - a.syncs, .h2d_bytes = b.h2d_bytes - a.h2d_bytes,
                     .h2d_copies = b.h2d_copies - a.h2d_copies, .heuristic = b.heuristic - a.heuristic};
}
#endif

/* A steady decode batch: NSEQ sequences decode together for NDEC steps
 * (crossing page boundaries), compared with the CPU backend at every step.
 * Per step the CUDA backend makes no cuBLASLt heuristic query (the
 * algorithms are cached per shape at create), at most one host
 * synchronisation (the argmax read-back), and uploads the plan in one copy
 * whose size does not grow with the context (only changed block-table
 * entries travel). */
TEST(steady_decode_traffic) {
#ifndef CUDAEMU_C
    SKIP("counts the emulator's calls");
#else
    REQUIRE_FILE(STORIES);
    enum { NSEQ = 4, PROMPT = 20, NDEC = 14 }; /* crosses page 2 at steps 9-12 */
    model_opts o = {.heavy = 10, .range_floor = 1.0};
    pair p;
    pair_init(&p, STORIES, &o);
    int V = p.vocab, L = p.n_layers;
    int seq[NSEQ], posn[NSEQ];
    int32_t next[NSEQ], toks[MAX_T], pos[MAX_T], greedy[MAX_T];
    eng_batch_seq seqs[NSEQ];
    eng_batch b;
    for (int i = 0; i < NSEQ; i++) {
        new_seq(&p, &seq[i]);
        for (int j = 0; j < PROMPT + i; j++) {
            toks[j] = rnd_tok(V);
            pos[j] = j;
        }
        seqs[0] = (eng_batch_seq){.seq = seq[i], .start = 0, .n = PROMPT + i, .want_logits = true};
        b = (eng_batch){.n_tokens = PROMPT + i, .tokens = toks, .pos = pos, .n_seqs = 1, .seqs = seqs};
        step_both(&p, &b, greedy, "prompt");
        next[i] = greedy[0];
        posn[i] = PROMPT + i;
    }
    unsigned long long first_bytes = 0, max_bytes = 0, max_syncs = 0, max_copies = 0, heur = 0;
    unsigned long long steady = 0; /* bytes of a step in which no table gains a page */
    int n_cross_steps = 0;
    for (int it = 0; it < NDEC; it++) {
        int crossing = 0; /* sequences whose tables gain a page at this step */
        for (int i = 0; i < NSEQ; i++) crossing += posn[i] % PAGE == 0;
        for (int i = 0; i < NSEQ; i++) {
            toks[i] = next[i];
            pos[i] = posn[i];
            seqs[i] = (eng_batch_seq){.seq = seq[i], .start = i, .n = 1, .want_logits = true};
        }
        b = (eng_batch){.n_tokens = NSEQ, .tokens = toks, .pos = pos, .n_seqs = NSEQ, .seqs = seqs};
        side_step(&p.cpu, &b, L);
        traffic t0 = traffic_now();
        side_step(&p.cu, &b, L);
        int rows_idx[NSEQ];
        int32_t dev[NSEQ];
        for (int i = 0; i < NSEQ; i++) rows_idx[i] = i;
        ASSERT_OK(p.cu.be->ops->argmax(p.cu.be, rows_idx, NSEQ, dev));
        traffic t = traffic_since(t0);
        const float *lc;
        ASSERT_OK(p.cpu.be->ops->logits(p.cpu.be, 0, NSEQ, &lc));
        for (int i = 0; i < NSEQ; i++) {
            float margin;
            int ac = argmax_row(lc + (size_t)i * V, V, &margin);
            if (ac != dev[i] && margin > 0.05f)
                FAIL_("decode step %d seq %d: cpu greedy %d, cuda %d (margin %.3g)", it, i, ac,
                      dev[i], margin);
            next[i] = dev[i];
            posn[i]++;
        }
        if (it == 0) first_bytes = t.h2d_bytes;
        /* one upload; the same size whatever the context length, plus a patch
         * (one page id and its 3-word header) per table that gained a page */
        ASSERT_EQ(t.h2d_copies, 1ull);
        if (crossing == 0) {
            if (steady == 0) steady = t.h2d_bytes;
            if (t.h2d_bytes != steady)
                FAIL_("decode step %d uploads %llu bytes, %llu at an earlier step without a new page",
                      it, t.h2d_bytes, steady);
        } else {
            n_cross_steps++;
            if (steady && t.h2d_bytes > steady + (unsigned long long)crossing * L * 16)
                FAIL_("decode step %d uploads %llu bytes for %d new pages per layer (steady %llu)",
                      it, t.h2d_bytes, crossing, steady);
        }
        if (t.syncs > 1) FAIL_("decode step %d makes %llu host synchronisations", it, t.syncs);
        if (t.h2d_bytes > max_bytes) max_bytes = t.h2d_bytes;
        if (t.syncs > max_syncs) max_syncs = t.syncs;
        if (t.h2d_copies > max_copies) max_copies = t.h2d_copies;
        heur += t.heuristic;
    }
    printf("  steady decode of %d sequences, %d steps: plan upload %llu bytes at the first step, "
           "at most %llu bytes in %llu copies per step; at most %llu host syncs per step; "
           "%llu heuristic queries; %llu bytes at a step where no table gains a page\n",
           NSEQ, NDEC, first_bytes, max_bytes, max_copies, max_syncs, heur, steady);
    ASSERT_EQ(heur, 0ull);
    ASSERT(steady > 0 && n_cross_steps >= 2);
    pair_free(&p);
#endif
}

#ifdef CUDAEMU_C
/* Largest |cpu - cuda| of the column sums, over the largest cpu sum. */
static double colsum_rel_diff(const float *a, const float *g, size_t n) {
    double worst = 0, largest = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)g[i]);
        if (!(d <= worst)) worst = d;
        if (a[i] > largest) largest = a[i];
    }
    return largest > 0 ? worst / largest : INFINITY;
}

/* max |a - g| over the row's logit range (floored). */
static double row_rel_diff(const float *a, const float *g, int vocab, double floor) {
    double mx = 0, lo = INFINITY, hi = -INFINITY;
    for (int i = 0; i < vocab; i++) {
        double d = fabs((double)a[i] - (double)g[i]);
        if (!(d <= mx)) mx = d;
        if (a[i] < lo) lo = a[i];
        if (a[i] > hi) hi = a[i];
    }
    return mx / (hi - lo > floor ? hi - lo : floor);
}
#endif

/* At most one host synchronisation per step (engine/backend.h, "Results and
 * host synchronisation"): the step queues its results (argmax of every logit
 * row, the host_logits rows, the column sums) and the first call that needs
 * one of them waits once for all.
 *   (c) an intermediate prefill chunk with column sums and no logits: 0 in
 *       the step (its wait comes with the next step's staging);
 *   (a) the last chunk of a scoring prefill, logits + argmax: 1 for step and
 *       argmax together, the column sums then complete;
 *   (b) a decode step of four rows — greedy (argmax), a device draw
 *       (sample), two host_logits rows (logits, one call each) — in the
 *       scheduler's order: 1 for all five calls.
 * Results are checked against the CPU backend. */
TEST(one_sync_per_step) {
#ifndef CUDAEMU_C
    SKIP("counts the emulator's calls");
#else
    REQUIRE_FILE(STORIES);
    model_opts o = {.heavy = 10, .range_floor = 1.0};
    pair p;
    pair_init(&p, STORIES, &o);
    int V = p.vocab, L = p.n_layers, H = p.n_heads;
    int32_t toks[MAX_T], pos[MAX_T];
    eng_batch_seq seqs[4];
    eng_batch b;
    enum { CS_LEN = 48 };
    size_t ncs = (size_t)L * H * CS_LEN;
    float *cs_cpu = calloc(ncs, sizeof(float)), *cs_cu = calloc(ncs, sizeof(float));
    ASSERT(cs_cpu && cs_cu);
    eng_backend *cu = p.cu.be;

    /* A: a scoring prefill of 40 tokens in chunks 16 + 16 + 8 */
    int A;
    new_seq(&p, &A);
    int chunks[3] = {16, 16, 8}, at = 0;
    unsigned long long sy[3] = {0}, sy_sync = 0;
    int32_t greedyA = -1;
    for (int c = 0; c < 3; c++) {
        int n = chunks[c];
        bool last = c == 2;
        for (int j = 0; j < n; j++) {
            toks[j] = rnd_tok(V);
            pos[j] = at + j;
        }
        seqs[0] = (eng_batch_seq){.seq = A, .start = 0, .n = n, .want_scores = true,
                                  .want_logits = last, .colsum_len = CS_LEN};
        b = (eng_batch){.n_tokens = n, .tokens = toks, .pos = pos, .n_seqs = 1, .seqs = seqs};
        seqs[0].colsum = cs_cpu;
        side_step(&p.cpu, &b, L);
        seqs[0].colsum = cs_cu;
        traffic t0 = traffic_now();
        side_step(&p.cu, &b, L);
        if (last) {
            int r0 = 0;
            ASSERT_OK(cu->ops->argmax(cu, &r0, 1, &greedyA));
        }
        sy[c] = traffic_since(t0).syncs;
        if (c == 1) { /* the column sums are complete after sync */
            t0 = traffic_now();
            ASSERT_OK(cu->ops->sync(cu));
            sy_sync = traffic_since(t0).syncs;
            double d = colsum_rel_diff(cs_cpu, cs_cu, ncs);
            if (!(d <= 0.03)) FAIL_("column sums after two chunks and sync differ by %.4g", d);
        }
        at += n;
    }
    printf("  scoring prefill: chunk 1 (no logits) %llu syncs in step; chunk 2 %llu (+%llu in "
           "sync); last chunk step + argmax %llu\n", sy[0], sy[1], sy_sync, sy[2]);
    ASSERT_EQ(sy[0], 0ull);   /* (c) */
    ASSERT(sy[1] <= 1);       /* chunk 1's wait, at chunk 2's staging */
    ASSERT_EQ(sy[2], 1ull);   /* (a) */
    double d = colsum_rel_diff(cs_cpu, cs_cu, ncs);
    if (!(d <= 0.03)) FAIL_("column sums after the prefill differ by %.4g (relative)", d);
    {
        const float *lc;
        float margin;
        ASSERT_OK(p.cpu.be->ops->logits(p.cpu.be, 0, 1, &lc));
        int ac = argmax_row(lc, V, &margin);
        if (ac != greedyA && margin > 0.05f)
            FAIL_("prefill argmax: cpu %d, cuda %d (margin %.3g)", ac, greedyA, margin);
    }

    /* B, C, D: short prompts (results read the way the test reads them: logits) */
    int S[4] = {A, -1, -1, -1};
    for (int i = 1; i < 4; i++) {
        new_seq(&p, &S[i]);
        for (int j = 0; j < 6 + i; j++) {
            toks[j] = rnd_tok(V);
            pos[j] = j;
        }
        seqs[0] = (eng_batch_seq){.seq = S[i], .start = 0, .n = 6 + i, .want_logits = true};
        b = (eng_batch){.n_tokens = 6 + i, .tokens = toks, .pos = pos, .n_seqs = 1, .seqs = seqs};
        step_both(&p, &b, NULL, "prompt");
    }
    /* (b) one decode step: A greedy, B a device draw, C and D host rows */
    for (int i = 0; i < 4; i++) {
        toks[i] = rnd_tok(V);
        pos[i] = i == 0 ? 40 : 6 + i;
        seqs[i] = (eng_batch_seq){.seq = S[i], .start = i, .n = 1, .want_logits = true,
                                  .host_logits = i >= 2};
    }
    b = (eng_batch){.n_tokens = 4, .tokens = toks, .pos = pos, .n_seqs = 4, .seqs = seqs};
    side_step(&p.cpu, &b, L);
    traffic t0 = traffic_now();
    side_step(&p.cu, &b, L);
    int r_draw = 1, r_greedy = 0;
    eng_sample_draw dr = {.u = 0.37, .inv_temp = 1.0f, .top_p = 1.0f, .min_p = 0.0f, .top_k = 0};
    int32_t tok_draw = -1, tok_greedy = -1;
    const float *lg2, *lg3;
    ASSERT_OK(cu->ops->sample(cu, &r_draw, &dr, 1, &tok_draw));
    ASSERT_OK(cu->ops->argmax(cu, &r_greedy, 1, &tok_greedy));
    ASSERT_OK(cu->ops->logits(cu, 2, 1, &lg2));
    ASSERT_OK(cu->ops->logits(cu, 3, 1, &lg3));
    traffic t = traffic_since(t0);
    printf("  decode step (greedy, device draw, 2 host rows): %llu host syncs for step, sample, "
           "argmax and logits x2\n", t.syncs);
    ASSERT_EQ(t.syncs, 1ull);
    ASSERT(tok_draw >= 0 && tok_draw < V);
    const float *lc;
    ASSERT_OK(p.cpu.be->ops->logits(p.cpu.be, 0, 4, &lc));
    double r2 = row_rel_diff(lc + 2 * (size_t)V, lg2, V, p.range_floor);
    double r3 = row_rel_diff(lc + 3 * (size_t)V, lg3, V, p.range_floor);
    if (!(r2 <= 0.05 && r3 <= 0.05)) FAIL_("host rows differ from the cpu: %.4g, %.4g of the range", r2, r3);
    /* a row the plan did not flag still comes out (a copy and a wait of its own) */
    const float *lg0;
    t0 = traffic_now();
    ASSERT_OK(cu->ops->logits(cu, 0, 1, &lg0));
    printf("  an unflagged row read on the host: %llu host syncs\n", traffic_since(t0).syncs);
    double r0 = row_rel_diff(lc, lg0, V, p.range_floor);
    if (!(r0 <= 0.05)) FAIL_("unflagged row differs from the cpu: %.4g of the range", r0);
    float margin;
    if (argmax_row(lg0, V, &margin) != tok_greedy)
        FAIL_("device argmax %d is not the argmax of its own logits row", tok_greedy);
    free(cs_cpu);
    free(cs_cu);
    pair_free(&p);
#endif
}
