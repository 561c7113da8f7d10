/*
 * tests/gpu/test_sample_cuda.c — kern_sample (kernels/sample.cu) against the
 * host sampler (engine/sample.c): for many random logit rows and sampling
 * settings, the device draw with the uniform number eng_sampler_device_draw
 * takes must give exactly the token eng_sampler_sample gives from a sampler
 * with the same seed (engine/sample.h, "Device draws"). Rows include ties
 * (quantised logits), -inf entries, signed zeros and vocabularies that are
 * not a multiple of the 64-token blocks. Also: which samplers qualify for a
 * device draw, and that a row with NaN gives -1.
 *
 * Engine level (stories260K, manual scheduler): seeded sampled requests
 * through the CUDA backend give the same tokens whether they are drawn on the
 * device (no logprobs) or by the host sampler over the copied logits
 * (logprobs asked), and the device-drawn run copies no logits row to the
 * host (the emulator's copy counters). Against the CPU backend the tokens
 * are equal only until the bf16 logits move a draw across a boundary (the
 * test reports how far they agree; it cannot require more, see
 * engine/sample.h, "Device draws").
 *
 * Built against the CUDA emulator (`make test-gpu-emu`, part of `make test`)
 * and, on a GPU machine, against the real toolkit (make CUDA=1 test-gpu),
 * where it also checks that nvcc's arithmetic matches the host's bit for bit.
 */
#include "tests/test.h"

#include "engine/engine.h"
#include "engine/sample.h"
#include "kernels/kernels.h"

#ifdef D2_HAVE_CUDA
#include <cuda_runtime_api.h>

static int n_devices(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

/* A deterministic generator for the test data (not the sampler's). */
static uint64_t g_state = 0x243f6a8885a308d3ull;
static uint32_t rnd(void) {
    g_state = g_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(g_state >> 33);
}
static double rnd01(void) { return (rnd() + 0.5) / 2147483648.0; }
static float gauss(void) {
    double u1 = rnd01(), u2 = rnd01();
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* One row of logits of a random kind. */
static void make_row(float *x, int vocab, int kind) {
    float scale = 0.5f + (float)(rnd() % 80) / 8.0f;
    for (int i = 0; i < vocab; i++) x[i] = gauss() * scale;
    if (kind == 1) /* ties: values on a coarse grid */
        for (int i = 0; i < vocab; i++) x[i] = roundf(x[i] * 2.0f) / 2.0f;
    if (kind == 2) /* masked tokens and signed zeros */
        for (int i = 0; i < vocab; i++) {
            uint32_t r = rnd() % 16;
            if (r == 0) x[i] = -INFINITY;
            else if (r == 1) x[i] = 0.0f;
            else if (r == 2) x[i] = -0.0f;
        }
    if (kind == 3) /* one dominant token, the rest far below (peaked, as LLMs) */
        x[rnd() % (unsigned)vocab] += 30.0f;
}

typedef struct setting { float temp; int top_k; float top_p, min_p; } setting;

static setting random_setting(int vocab) {
    static const float temps[] = {0.3f, 0.7f, 1.0f, 1.5f, 2.0f};
    static const int ks[] = {0, 0, 2, 5, 40, 1024};
    static const float tps[] = {1.0f, 1.0f, 0.95f, 0.5f, 0.1f};
    static const float mps[] = {0.0f, 0.0f, 0.05f, 0.3f};
    setting s = {temps[rnd() % 5], ks[rnd() % 6], tps[rnd() % 5], mps[rnd() % 4]};
    if (s.top_k >= vocab) s.top_k = 0;
    if (s.top_k == 0) s.top_p = 1.0f; /* top_p with top-k off stays on the host */
    return s;
}

static void params_of(const setting *st, uint64_t seed, eng_sample_params *p) {
    eng_sample_params_default(p);
    p->temperature = st->temp;
    p->top_k = st->top_k;
    p->top_p = st->top_p;
    p->min_p = st->min_p;
    p->has_seed = true;
    p->seed = seed;
}

/* n draws over a vocabulary: returns how many differ from the host. */
static int run_vocab(int vocab, int n, int *n_topk) {
    float *x = malloc((size_t)n * (size_t)vocab * sizeof(float));
    kern_sample_param *kp = calloc((size_t)n, sizeof *kp);
    int32_t *want = malloc((size_t)n * sizeof(int32_t)), *got = malloc((size_t)n * sizeof(int32_t));
    ASSERT(x && kp && want && got);
    for (int j = 0; j < n; j++) {
        float *row = x + (size_t)j * (size_t)vocab;
        make_row(row, vocab, j % 4);
        setting st = random_setting(vocab);
        *n_topk += st.top_k > 0;
        eng_sample_params p;
        params_of(&st, 1000u + (uint64_t)j, &p);
        eng_sampler a, b;
        ASSERT_EQ(eng_sampler_init(&a, &p, vocab), D2_OK);
        ASSERT_EQ(eng_sampler_init(&b, &p, vocab), D2_OK);
        /* a few samples first, so the uniform is not the stream's first */
        int skip = j % 3;
        for (int s = 0; s < skip; s++) {
            eng_sample_draw d0;
            eng_sample_result r0;
            ASSERT(eng_sampler_device_draw(&a, &d0));
            ASSERT_EQ(eng_sampler_sample(&b, row, &r0), D2_OK);
        }
        eng_sample_draw d;
        eng_sample_result r;
        ASSERT(eng_sampler_device_draw(&a, &d));
        ASSERT_EQ(eng_sampler_sample(&b, row, &r), D2_OK);
        want[j] = r.token;
        kp[j] = (kern_sample_param){.u = d.u, .inv_temp = d.inv_temp, .top_p = d.top_p,
                                    .min_p = d.min_p, .top_k = d.top_k, .row = j};
        eng_sampler_free(&a);
        eng_sampler_free(&b);
    }
    float *x_d = NULL, *ws_d = NULL;
    kern_sample_param *kp_d = NULL;
    int32_t *out_d = NULL;
    size_t ws = kern_sample_ws_floats(n, vocab);
    ASSERT_EQ(cudaMalloc((void **)&x_d, (size_t)n * (size_t)vocab * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&ws_d, ws * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&kp_d, (size_t)n * sizeof *kp), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&out_d, (size_t)n * 4), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(x_d, x, (size_t)n * (size_t)vocab * 4, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(kp_d, kp, (size_t)n * sizeof *kp, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(kern_sample(out_d, x_d, vocab, vocab, kp_d, n, ws_d, NULL), D2_OK);
    ASSERT_EQ(cudaMemcpy(got, out_d, (size_t)n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    int bad = 0;
    for (int j = 0; j < n; j++) {
        if (got[j] == want[j]) continue;
        if (bad++ < 5)
            fprintf(stderr, "  vocab %d draw %d (kind %d, top_k %d top_p %g min_p %g inv_t %g u %.17g): "
                    "device %d host %d\n", vocab, j, j % 4, kp[j].top_k, kp[j].top_p, kp[j].min_p,
                    kp[j].inv_temp, kp[j].u, got[j], want[j]);
    }
    cudaFree(x_d);
    cudaFree(ws_d);
    cudaFree(kp_d);
    cudaFree(out_d);
    free(x);
    free(kp);
    free(want);
    free(got);
    return bad;
}

TEST(device_draw_matches_host_sampler) {
    if (n_devices() <= 0) SKIP("no CUDA device");
    static const int vocabs[] = {64, 512, 1000, 4099, 32000};
    static const int draws[] = {60, 120, 120, 60, 24};
    int total = 0, bad = 0, topk = 0;
    for (int v = 0; v < 5; v++) {
        bad += run_vocab(vocabs[v], draws[v], &topk);
        total += draws[v];
    }
    printf("  %d draws (%d with top-k), %d differ from the host sampler\n", total, topk, bad);
    ASSERT_EQ(bad, 0);
    ASSERT(topk > total / 4 && topk < total);
}

TEST(nan_row_gives_minus_one) {
    if (n_devices() <= 0) SKIP("no CUDA device");
    enum { V = 300 };
    float x[2 * V];
    for (int i = 0; i < 2 * V; i++) x[i] = (float)(i % 7);
    x[17] = NAN;
    x[V + 5] = INFINITY;
    kern_sample_param kp[3] = {{.u = 0.5, .inv_temp = 1.0f, .top_p = 1.0f, .row = 0},
                               {.u = 0.5, .inv_temp = 1.0f, .top_p = 1.0f, .top_k = 5, .row = 1},
                               {.u = 0.5, .inv_temp = 1.0f, .top_p = 1.0f, .top_k = 1, .row = 0}};
    float *x_d, *ws_d;
    kern_sample_param *kp_d;
    int32_t *out_d, got[3];
    ASSERT_EQ(cudaMalloc((void **)&x_d, sizeof x), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&ws_d, kern_sample_ws_floats(3, V) * 4), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&kp_d, sizeof kp), cudaSuccess);
    ASSERT_EQ(cudaMalloc((void **)&out_d, sizeof got), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(x_d, x, sizeof x, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(kp_d, kp, sizeof kp, cudaMemcpyHostToDevice), cudaSuccess);
    ASSERT_EQ(kern_sample(out_d, x_d, V, V, kp_d, 3, ws_d, NULL), D2_OK);
    ASSERT_EQ(cudaMemcpy(got, out_d, sizeof got, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(got[0], -1); /* NaN */
    ASSERT_EQ(got[1], -1); /* +inf */
    ASSERT_EQ(got[2], -1); /* top_k 1 is a greedy pick, not a draw */
    ASSERT_EQ(kern_sample(out_d, x_d, V - 1, V, kp_d, 3, ws_d, NULL), D2_EINVAL);
    cudaFree(x_d);
    cudaFree(ws_d);
    cudaFree(kp_d);
    cudaFree(out_d);
}

/* ---- engine level -------------------------------------------------------------- */

#define STORIES "models/stories260K/stories260K.gguf"
#define N_REQ 4
#define N_GEN 12

typedef struct gen { int32_t tok[N_GEN]; int n, status, done; } gen;

static int on_event(void *user, const eng_event *ev) {
    gen *g = user;
    if (ev->type == ENG_EV_TOKEN && g->n < N_GEN) g->tok[g->n++] = ev->token;
    if (ev->type == ENG_EV_DONE) {
        g->status = ev->status;
        g->done = 1;
    }
    return 0;
}

/* N_REQ seeded sampled requests, together, to the end; d2h: device-to-host
 * bytes the run copied (emulator builds; 0 elsewhere). */
static void run_engine(eng_device dev, bool logprobs, gen *out, unsigned long long *d2h) {
    static const setting st[N_REQ] = {{0.8f, 0, 1.0f, 0.0f}, {1.0f, 40, 0.9f, 0.0f},
                                      {0.7f, 0, 1.0f, 0.05f}, {1.3f, 5, 1.0f, 0.0f}};
    static const int32_t prompt[5] = {1, 403, 261, 305, 290};
    eng_engine_config ec = {.model_path = STORIES, .device = dev, .n_threads = 1, .max_seqs = N_REQ,
                            .ctx_len = 128};
    eng_engine *e = NULL;
    ASSERT_EQ(eng_engine_create(&ec, &e), D2_OK);
    eng_sched *s = NULL;
    eng_sched_config sc = {.max_queue = N_REQ};
    ASSERT_EQ(eng_sched_create(e, &sc, &s), D2_OK);
    memset(out, 0, N_REQ * sizeof *out);
    for (int i = 0; i < N_REQ; i++) {
        eng_request q = {.prompt = prompt, .n_prompt = 5, .max_tokens = N_GEN, .ignore_eos = true,
                         .want_logprobs = logprobs, .on_event = on_event, .user = &out[i]};
        params_of(&st[i], 42u + (uint64_t)i, &q.sample);
        ASSERT_EQ(eng_sched_submit(s, &q, NULL, NULL), D2_OK);
    }
    unsigned long long c0[16] = {0}, c1[16] = {0};
#ifdef CUDAEMU_C
    emu_c_counters(c0);
#endif
    int rc;
    while ((rc = eng_sched_step(s)) > 0) {
    }
#ifdef CUDAEMU_C
    emu_c_counters(c1);
    *d2h = c1[EMU_C_D2H_BYTES] - c0[EMU_C_D2H_BYTES];
#else
    *d2h = 0;
#endif
    ASSERT_EQ(rc, 0);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
    for (int i = 0; i < N_REQ; i++) {
        ASSERT(out[i].done && out[i].status == D2_OK);
        ASSERT_EQ(out[i].n, N_GEN);
    }
}

TEST(engine_device_draws_match_host_sampler) {
    if (n_devices() <= 0) SKIP("no CUDA device");
    if (access(STORIES, R_OK) != 0) SKIP("%s missing", STORIES);
    gen dev[N_REQ], host[N_REQ], cpu[N_REQ];
    unsigned long long d2h_dev, d2h_host, d2h_cpu;
    run_engine(ENG_DEVICE_CUDA, false, dev, &d2h_dev);
    run_engine(ENG_DEVICE_CUDA, true, host, &d2h_host);
    run_engine(ENG_DEVICE_CPU, false, cpu, &d2h_cpu);
    for (int i = 0; i < N_REQ; i++) {
        for (int t = 0; t < N_GEN; t++)
            if (dev[i].tok[t] != host[i].tok[t])
                FAIL_("request %d token %d: device draw %d, host sampler %d", i, t, dev[i].tok[t],
                      host[i].tok[t]);
        int same = 0;
        while (same < N_GEN && dev[i].tok[same] == cpu[i].tok[same]) same++;
        printf("  request %d: cuda (device draws) == cuda (host sampler) for all %d tokens; "
               "== cpu backend for the first %d\n", i, N_GEN, same);
    }
    printf("  device-to-host bytes: device draws %llu, host sampler %llu\n", d2h_dev, d2h_host);
#ifdef CUDAEMU_C
    /* every host-sampled token copies a vocabulary row; device draws copy 4 bytes */
    const unsigned long long row = 512 * 4;
    ASSERT(d2h_host >= (unsigned long long)N_REQ * N_GEN * row);
    ASSERT(d2h_dev < (unsigned long long)N_REQ * N_GEN * row / 8);
#endif
}
#endif

/* At most one host synchronisation per engine step (engine/backend.h,
 * "Results and host synchronisation"): four requests whose rows take every
 * path after a step — plain greedy (argmax), a device draw (sample),
 * logprobs and a repetition penalty (host logits rows, which the scheduler
 * flags host_logits when it plans) — run together to the end through the
 * CUDA backend; no eng_sched_step synchronises more than once. */
TEST(engine_one_sync_per_step) {
#ifndef CUDAEMU_C
    SKIP("counts the emulator's calls");
#else
    if (n_devices() <= 0) SKIP("no CUDA device");
    if (access(STORIES, R_OK) != 0) SKIP("%s missing", STORIES);
    static const int32_t prompt[5] = {1, 403, 261, 305, 290};
    eng_engine_config ec = {.model_path = STORIES, .device = ENG_DEVICE_CUDA, .n_threads = 1,
                            .max_seqs = N_REQ, .ctx_len = 128};
    eng_engine *e = NULL;
    ASSERT_EQ(eng_engine_create(&ec, &e), D2_OK);
    eng_sched *s = NULL;
    eng_sched_config sc = {.max_queue = N_REQ};
    ASSERT_EQ(eng_sched_create(e, &sc, &s), D2_OK);
    gen out[N_REQ];
    memset(out, 0, sizeof out);
    for (int i = 0; i < N_REQ; i++) {
        eng_request q = {.prompt = prompt, .n_prompt = 5, .max_tokens = N_GEN, .ignore_eos = true,
                         .want_logprobs = i == 2, .on_event = on_event, .user = &out[i]};
        eng_sample_params_default(&q.sample);
        q.sample.temperature = i == 0 ? 0.0f : 0.8f;
        if (i == 3) q.sample.repetition_penalty = 1.2f;
        q.sample.has_seed = true;
        q.sample.seed = 7u + (uint64_t)i;
        ASSERT_EQ(eng_sched_submit(s, &q, NULL, NULL), D2_OK);
    }
    unsigned long long c0[EMU_C_N_COUNTERS], c1[EMU_C_N_COUNTERS], most = 0, total = 0;
    int rc, steps = 0;
    do {
        emu_c_counters(c0);
        rc = eng_sched_step(s);
        emu_c_counters(c1);
        unsigned long long n = c1[EMU_C_SYNCS] - c0[EMU_C_SYNCS];
        if (n > 1) FAIL_("engine step %d made %llu host synchronisations", steps, n);
        if (n > most) most = n;
        total += n;
        steps++;
    } while (rc > 0);
    ASSERT_EQ(rc, 0);
    printf("  %d engine steps (greedy, device draw, logprobs, penalty rows together): %llu host "
           "synchronisations, at most %llu in a step\n", steps, total, most);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
    for (int i = 0; i < N_REQ; i++) {
        ASSERT(out[i].done && out[i].status == D2_OK);
        ASSERT_EQ(out[i].n, N_GEN);
    }
#endif
}

/* Which samplers the host hands to a device (no device needed). */
TEST(device_draw_eligibility) {
    enum { V = 500 };
    struct { float temp; int k; float top_p, min_p, rep; int bias, lp; int ok; } c[] = {
        {1.0f, 0, 1.0f, 0.0f, 1.0f, 0, 0, 1},   /* plain temperature */
        {0.7f, 0, 1.0f, 0.1f, 1.0f, 0, 0, 1},   /* + min_p */
        {0.7f, 40, 0.9f, 0.1f, 1.0f, 0, 0, 1},  /* top-k + top-p + min-p */
        {0.7f, 1024, 1.0f, 0.0f, 1.0f, 0, 0, 1}, /* k at the limit... */
        {0.7f, 600, 1.0f, 0.0f, 1.0f, 0, 0, 1},  /* k >= vocab: off */
        {0.7f, 0, 0.9f, 0.0f, 1.0f, 0, 0, 0},   /* top-p with top-k off: host */
        {0.0f, 0, 1.0f, 0.0f, 1.0f, 0, 0, 0},   /* greedy */
        {0.7f, 1, 1.0f, 0.0f, 1.0f, 0, 0, 0},   /* k = 1 is greedy */
        {0.7f, 0, 1.0f, 0.0f, 1.2f, 0, 0, 0},   /* penalty */
        {0.7f, 0, 1.0f, 0.0f, 1.0f, 1, 0, 0},   /* logit bias */
        {0.7f, 0, 1.0f, 0.0f, 1.0f, 0, 2, 0},   /* top logprobs */
    };
    eng_logit_bias lb = {3, 1.0f};
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        eng_sample_params p;
        eng_sample_params_default(&p);
        p.temperature = c[i].temp;
        p.top_k = c[i].k;
        p.top_p = c[i].top_p;
        p.min_p = c[i].min_p;
        p.repetition_penalty = c[i].rep;
        p.n_top_logprobs = c[i].lp;
        if (c[i].bias) {
            p.logit_bias = &lb;
            p.n_logit_bias = 1;
        }
        p.has_seed = true;
        p.seed = 7;
        int vocab = i == 3 ? 2000 : V;
        eng_sampler s, ref;
        ASSERT_EQ(eng_sampler_init(&s, &p, vocab), D2_OK);
        ASSERT_EQ(eng_sampler_init(&ref, &p, vocab), D2_OK);
        eng_sample_draw d;
        bool ok = eng_sampler_device_draw(&s, &d);
        if (ok != (c[i].ok != 0)) FAIL_("case %zu: device draw %d, expected %d", i, ok, c[i].ok);
        /* a refused draw takes nothing from the RNG; a taken one exactly one number */
        uint64_t r0 = ref.rng[0];
        ASSERT(ok ? s.rng[0] != r0 : s.rng[0] == r0);
        if (ok) {
            ASSERT(d.u >= 0.0 && d.u < 1.0);
            ASSERT_EQ(d.top_k, c[i].k < vocab ? c[i].k : 0);
            ASSERT(d.inv_temp == 1.0f / c[i].temp);
        }
        eng_sampler_free(&s);
        eng_sampler_free(&ref);
    }
}
