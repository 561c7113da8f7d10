/*
 * tests/unit/test_sample.c — unit tests for engine/sample.c: greedy,
 * seeding, the sampled distribution against softmax (chi-square with a
 * fixed seed, so deterministic), temperature, top-k, top-p, min-p, each
 * penalty and the logit bias against hand-computed logits, logprobs,
 * parameter validation, and a timing print (not asserted) on a 128256 vocab.
 */
#include "tests/test.h"

#include "common/status.h"
#include "engine/sample.h"

/* ------------------------------------------------------------- helpers */

/* Test-side RNG for building logits (independent of the sampler's). */
static uint64_t trng_state = 0x1234567887654321ull;
static uint64_t trng(void) {
    uint64_t x = trng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return trng_state = x;
}
static double trng_unit(void) { return (double)(trng() >> 11) * 0x1.0p-53; }
static float trng_gauss(void) {
    double u1 = trng_unit(), u2 = trng_unit();
    if (u1 < 1e-300) u1 = 1e-300;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static eng_sample_params params_t(float temperature, uint64_t seed) {
    eng_sample_params p;
    eng_sample_params_default(&p);
    p.temperature = temperature;
    p.seed = seed;
    p.has_seed = true;
    return p;
}

static int32_t sample_one(eng_sampler *s, const float *logits) {
    eng_sample_result r;
    int rc = eng_sampler_sample(s, logits, &r);
    if (rc != D2_OK) FAIL_("eng_sampler_sample failed: %d", rc);
    return r.token;
}

/* Draws n tokens into counts[V] (zeroed here). */
static void histogram(eng_sampler *s, const float *logits, int V, int n, long *counts) {
    memset(counts, 0, (size_t)V * sizeof *counts);
    for (int i = 0; i < n; i++) {
        int32_t t = sample_one(s, logits);
        if (t < 0 || t >= V) FAIL_("token %d out of range", t);
        counts[t]++;
    }
}

/* Chi-square statistic of counts against expected probabilities (zero
 * expected cells must have zero counts, checked by the caller). */
static double chi_square(const long *counts, const double *expect, int V, int n) {
    double chi = 0;
    for (int i = 0; i < V; i++) {
        if (expect[i] <= 0) continue;
        double e = expect[i] * n, d = (double)counts[i] - e;
        chi += d * d / e;
    }
    return chi;
}

static void softmax_d(const float *l, int V, double temp, double *out) {
    double m = -INFINITY, z = 0;
    for (int i = 0; i < V; i++) m = l[i] > m ? l[i] : m;
    for (int i = 0; i < V; i++) z += out[i] = exp(((double)l[i] - m) / temp);
    for (int i = 0; i < V; i++) out[i] /= z;
}

static double logsumexp_d(const float *l, int V) {
    double m = -INFINITY, z = 0;
    for (int i = 0; i < V; i++) m = l[i] > m ? l[i] : m;
    for (int i = 0; i < V; i++) z += exp((double)l[i] - m);
    return m + log(z);
}

/* ---------------------------------------------------------------- tests */

TEST(greedy_picks_argmax_and_lowest_id_on_ties) {
    enum { V = 1000 };
    static float l[V];
    for (int i = 0; i < V; i++) l[i] = trng_gauss();
    l[617] = 9.0f;
    eng_sample_params p = params_t(0.0f, 1);
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    for (int k = 0; k < 5; k++) ASSERT_EQ(sample_one(&s, l), 617);
    l[333] = 9.0f;
    l[900] = 9.0f;
    ASSERT_EQ(sample_one(&s, l), 333);
    /* all equal: id 0 */
    for (int i = 0; i < V; i++) l[i] = 0.25f;
    ASSERT_EQ(sample_one(&s, l), 0);
    eng_sampler_free(&s);
}

TEST(tiny_temperature_is_greedy) {
    float l[5] = {1.0f, 1.5f, 1.49f, -3.0f, 0.0f};
    eng_sample_params p = params_t(1e-6f, 9);
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, 5));
    for (int k = 0; k < 100; k++) ASSERT_EQ(sample_one(&s, l), 1);
    eng_sampler_free(&s);
}

TEST(same_seed_same_sequence_different_seed_differs) {
    enum { V = 5000, N = 1000 };
    static float l[V];
    for (int i = 0; i < V; i++) l[i] = 2.0f * trng_gauss();
    static int32_t a[N], b[N], c[N];
    const float tps[3] = {1.0f, 0.9f, 1.0f};
    const int tks[3] = {0, 0, 50};
    for (int mode = 0; mode < 3; mode++) {
        eng_sample_params p = params_t(0.8f, 42);
        p.top_p = tps[mode];
        p.top_k = tks[mode];
        eng_sampler s1, s2, s3;
        ASSERT_OK(eng_sampler_init(&s1, &p, V));
        ASSERT_OK(eng_sampler_init(&s2, &p, V));
        p.seed = 43;
        ASSERT_OK(eng_sampler_init(&s3, &p, V));
        for (int i = 0; i < N; i++) {
            a[i] = sample_one(&s1, l);
            b[i] = sample_one(&s2, l);
            c[i] = sample_one(&s3, l);
        }
        int diff = 0;
        for (int i = 0; i < N; i++) {
            ASSERT_EQ(a[i], b[i]);
            diff += a[i] != c[i];
        }
        ASSERT_GT(diff, N / 10);
        eng_sampler_free(&s1);
        eng_sampler_free(&s2);
        eng_sampler_free(&s3);
    }
}

TEST(unseeded_samplers_differ) {
    enum { V = 1000, N = 200 };
    static float l[V];
    eng_sample_params p;
    eng_sample_params_default(&p);
    eng_sampler s1, s2;
    ASSERT_OK(eng_sampler_init(&s1, &p, V));
    ASSERT_OK(eng_sampler_init(&s2, &p, V));
    int diff = 0;
    for (int i = 0; i < N; i++) diff += sample_one(&s1, l) != sample_one(&s2, l);
    ASSERT_GT(diff, N / 2);
    eng_sampler_free(&s1);
    eng_sampler_free(&s2);
}

/* 200k draws over 8 tokens; chi-square with 7 degrees of freedom: the 99.99%
 * quantile is about 29.9. The seed is fixed, so the outcome is too. */
TEST(temperature_one_matches_softmax) {
    enum { V = 8, N = 200000 };
    float l[V] = {0.1f, 1.3f, -0.7f, 2.0f, 0.0f, 1.9f, -2.5f, 0.8f};
    double ex[V];
    long cnt[V];
    softmax_d(l, V, 1.0, ex);
    eng_sample_params p = params_t(1.0f, 7);
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    histogram(&s, l, V, N, cnt);
    double chi = chi_square(cnt, ex, V, N);
    printf("  chi2(T=1) = %.2f\n", chi);
    ASSERT(chi < 29.9);
    /* and it is a real test: against a wrong distribution (T=1.2) it fails */
    double wrong[V];
    softmax_d(l, V, 1.2, wrong);
    ASSERT(chi_square(cnt, wrong, V, N) > 100.0);
    eng_sampler_free(&s);
}

TEST(temperature_scaling) {
    enum { V = 8, N = 200000 };
    float l[V] = {0.1f, 1.3f, -0.7f, 2.0f, 0.0f, 1.9f, -2.5f, 0.8f};
    const float temps[3] = {0.5f, 1.5f, 2.0f};
    for (int k = 0; k < 3; k++) {
        double ex[V];
        long cnt[V];
        softmax_d(l, V, temps[k], ex);
        eng_sample_params p = params_t(temps[k], 100 + (uint64_t)k);
        eng_sampler s;
        ASSERT_OK(eng_sampler_init(&s, &p, V));
        histogram(&s, l, V, N, cnt);
        double chi = chi_square(cnt, ex, V, N);
        printf("  chi2(T=%.1f) = %.2f\n", temps[k], chi);
        ASSERT(chi < 29.9);
        eng_sampler_free(&s);
    }
}

TEST(top_k_1_equals_greedy) {
    enum { V = 30000 };
    static float l[V];
    eng_sample_params p = params_t(1.7f, 5);
    p.top_k = 1;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    for (int round = 0; round < 50; round++) {
        for (int i = 0; i < V; i++) l[i] = trng_gauss();
        if (round % 10 == 0) l[round * 7] = l[round * 7 + 1] = 8.0f; /* a tie */
        int32_t best = 0;
        for (int i = 1; i < V; i++)
            if (l[i] > l[best]) best = i;
        ASSERT_EQ(sample_one(&s, l), best);
    }
    eng_sampler_free(&s);
}

TEST(top_k_restricts_support_and_renormalises) {
    enum { V = 10, N = 100000 };
    float l[V] = {0.5f, 2.0f, -1.0f, 1.5f, 0.0f, 1.0f, 3.0f, -2.0f, 0.2f, 0.9f};
    /* top 3: ids 6 (3.0), 1 (2.0), 3 (1.5) */
    eng_sample_params p = params_t(1.0f, 11);
    p.top_k = 3;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    long cnt[V];
    histogram(&s, l, V, N, cnt);
    float sub[V];
    for (int i = 0; i < V; i++) sub[i] = (i == 6 || i == 1 || i == 3) ? l[i] : -INFINITY;
    double ex[V];
    softmax_d(sub, V, 1.0, ex);
    for (int i = 0; i < V; i++) {
        if (ex[i] == 0) ASSERT_EQ(cnt[i], 0);
        else ASSERT_GT(cnt[i], 0);
    }
    ASSERT(chi_square(cnt, ex, V, N) < 20.0); /* 2 dof: 99.99% ~ 18.4 */
    eng_sampler_free(&s);
}

/* Big vocabulary: the sampled ids are exactly the top-k set. */
TEST(top_k_large_vocab_exact_support) {
    enum { V = 50000, K = 40, N = 4000 };
    static float l[V];
    static long cnt[V];
    for (int i = 0; i < V; i++) l[i] = trng_gauss();
    /* the K-th largest, found by brute force */
    static float sorted[V];
    memcpy(sorted, l, sizeof l);
    for (int k = 0; k < K; k++) { /* partial selection sort, fine for K=40 */
        int b = k;
        for (int i = k + 1; i < V; i++)
            if (sorted[i] > sorted[b]) b = i;
        float t = sorted[k];
        sorted[k] = sorted[b];
        sorted[b] = t;
    }
    float kth = sorted[K - 1];
    eng_sample_params p = params_t(2.0f, 77); /* flat, so all K get drawn */
    p.top_k = K;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    histogram(&s, l, V, N, cnt);
    int support = 0;
    for (int i = 0; i < V; i++) {
        if (cnt[i]) {
            support++;
            ASSERT(l[i] >= kth);
        }
    }
    ASSERT_EQ(support, K);
    eng_sampler_free(&s);
}

TEST(top_k_ties_go_to_lower_ids) {
    enum { V = 1000, N = 20000 };
    static float l[V];
    static long cnt[V];
    for (int i = 0; i < V; i++) l[i] = 1.0f;
    eng_sample_params p = params_t(1.0f, 3);
    p.top_k = 5;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    histogram(&s, l, V, N, cnt);
    for (int i = 0; i < V; i++) {
        if (i < 5) ASSERT_GT(cnt[i], N / 5 - N / 20);
        else ASSERT_EQ(cnt[i], 0);
    }
    eng_sampler_free(&s);
}

TEST(top_p_restricts_to_nucleus) {
    enum { V = 6, N = 100000 };
    /* probabilities 0.5, 0.3, 0.15, 0.05, 0, 0 shuffled over ids */
    const double pr[V] = {0.15, 0.0, 0.5, 0.05, 0.3, 0.0};
    float l[V];
    for (int i = 0; i < V; i++) l[i] = pr[i] > 0 ? (float)log(pr[i]) : -INFINITY;
    struct { float top_p; int allowed[4]; int n; } cases[] = {
        {0.4f, {2}, 1},        /* 0.5 alone reaches 0.4 */
        {0.5f, {2}, 1},        /* exactly 0.5 (allow 1 ulp either way: see below) */
        {0.75f, {2, 4}, 2},
        {0.9f, {2, 4, 0}, 3},
        {0.99f, {2, 4, 0, 3}, 4},
        {1.0f, {2, 4, 0, 3}, 4},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        if (cases[c].top_p == 0.5f) continue; /* boundary case, too close to call in float */
        eng_sample_params p = params_t(1.0f, 1000 + c);
        p.top_p = cases[c].top_p;
        eng_sampler s;
        ASSERT_OK(eng_sampler_init(&s, &p, V));
        long cnt[V];
        histogram(&s, l, V, N, cnt);
        double ex[V] = {0}, mass = 0;
        for (int j = 0; j < cases[c].n; j++) mass += pr[cases[c].allowed[j]];
        for (int j = 0; j < cases[c].n; j++) ex[cases[c].allowed[j]] = pr[cases[c].allowed[j]] / mass;
        for (int i = 0; i < V; i++) {
            if (ex[i] == 0) ASSERT_EQ(cnt[i], 0);
            else ASSERT_GT(cnt[i], 0);
        }
        double chi = chi_square(cnt, ex, V, N);
        ASSERT(chi < 25.0); /* at most 3 dof: 99.99% ~ 21.1 */
        eng_sampler_free(&s);
    }
}

/* Large vocabulary with a known nucleus, computed by sorting in the test. */
static int cmp_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

TEST(top_p_large_vocab_exact_nucleus) {
    enum { V = 32000, N = 4000 };
    static float l[V];
    static long cnt[V];
    static double pr[V], sorted[V];
    const float temps[2] = {1.0f, 0.7f};
    const float tps[2] = {0.9f, 0.85f};
    for (int round = 0; round < 2; round++) {
        /* 60 plausible tokens on a sea of unlikely ones */
        for (int i = 0; i < V; i++) l[i] = trng_gauss() - 12.0f;
        for (int k = 0; k < 60; k++) l[(int)(trng() % V)] = 2.0f * trng_gauss();
        softmax_d(l, V, temps[round], pr);
        memcpy(sorted, pr, sizeof pr);
        qsort(sorted, V, sizeof sorted[0], cmp_desc);
        double cum = 0;
        int nn = 0;
        while (cum < tps[round]) cum += sorted[nn++];
        double pmin = sorted[nn - 1];
        /* the boundary must not be a float near-tie, or the test is moot */
        ASSERT(cum - sorted[nn - 1] < tps[round] - 1e-4 && cum > tps[round] + 1e-4);
        ASSERT(sorted[nn] < pmin * 0.999);
        eng_sample_params p = params_t(temps[round], 55 + (uint64_t)round);
        p.top_p = tps[round];
        eng_sampler s;
        ASSERT_OK(eng_sampler_init(&s, &p, V));
        histogram(&s, l, V, N, cnt);
        int support = 0;
        for (int i = 0; i < V; i++) {
            if (!cnt[i]) continue;
            support++;
            ASSERT(pr[i] >= pmin);
        }
        printf("  nucleus %d tokens, %d drawn (least likely p=%.4f)\n", nn, support, pmin);
        ASSERT_LE(support, nn);
        if (pmin / cum * N > 40) ASSERT_EQ(support, nn); /* each expected > 40 times */
        eng_sampler_free(&s);
    }
}

TEST(top_p_with_ties_keeps_lowest_ids) {
    enum { V = 1000, N = 40000 };
    static float l[V];
    static long cnt[V];
    for (int i = 0; i < V; i++) l[i] = -0.5f;
    eng_sample_params p = params_t(1.0f, 8);
    p.top_p = 0.5005f; /* 501 of 1000 equal tokens */
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    histogram(&s, l, V, N, cnt);
    for (int i = 0; i < V; i++) {
        if (i <= 500) ASSERT_GT(cnt[i], 0);
        else ASSERT_EQ(cnt[i], 0);
    }
    eng_sampler_free(&s);
}

/* top-k above the heap limit (1024) goes through the histogram path. */
TEST(top_k_large_k_histogram_path) {
    enum { V = 6000, K = 2000, N = 15000 };
    static float l[V];
    static long cnt[V];
    /* strictly decreasing by id, so the top K are ids 0..K-1 */
    for (int i = 0; i < V; i++) l[i] = -0.0002f * (float)i;
    eng_sample_params p = params_t(1.0f, 61);
    p.top_k = K;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    histogram(&s, l, V, N, cnt);
    int maxid = 0;
    for (int i = 0; i < V; i++)
        if (cnt[i]) maxid = i;
    ASSERT(maxid <= K - 1 && maxid >= K - 10); /* ~6 draws expected per token near the edge */
    eng_sampler_free(&s);
    /* ties: all equal, the K lowest ids */
    for (int i = 0; i < V; i++) l[i] = 0.0f;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    histogram(&s, l, V, N, cnt);
    maxid = 0;
    for (int i = 0; i < V; i++)
        if (cnt[i]) maxid = i;
    ASSERT(maxid < K && maxid > K - 20);
    eng_sampler_free(&s);
}

/* top-p with a nucleus far larger than the first guess (128 tokens): the
 * histogram path, checked against a sorted brute force. */
TEST(top_p_large_nucleus_histogram_path) {
    enum { V = 128256, N = 1000 };
    static float l[V];
    static double pr[V], sorted[V];
    for (int i = 0; i < V; i++) l[i] = trng_gauss();
    softmax_d(l, V, 1.0, pr);
    memcpy(sorted, pr, sizeof pr);
    qsort(sorted, V, sizeof sorted[0], cmp_desc);
    double cum = 0;
    int nn = 0;
    while (cum < 0.5) cum += sorted[nn++];
    double pmin = sorted[nn - 1];
    eng_sample_params p = params_t(1.0f, 71);
    p.top_p = 0.5f;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    int near = 0;
    for (int i = 0; i < N; i++) {
        int32_t t = sample_one(&s, l);
        /* a one-ulp slack for float rounding at the boundary */
        ASSERT(pr[t] >= pmin * (1 - 1e-6));
        near += pr[t] < pmin * 1.05;
    }
    printf("  nucleus %d tokens; %d of %d draws within 5%% of the boundary\n", nn, near, N);
    ASSERT_GT(near, 0);
    eng_sampler_free(&s);
}

/* top-k (histogram path) then top-p, the nucleus boundary both inside the
 * top-k boundary bin (ties) and before it. */
TEST(top_k_then_top_p_histogram_path) {
    enum { V = 3000, N = 15000 };
    static float l[V];
    static long cnt[V];
    for (int i = 0; i < V; i++) l[i] = 0.0f;
    eng_sample_params p = params_t(1.0f, 81);
    p.top_k = 2000;
    p.top_p = 0.50025f; /* 1001 of the 2000 equal tokens (mass 1000.5) */
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    histogram(&s, l, V, N, cnt);
    for (int i = 0; i < V; i++) {
        if (i <= 1000) ASSERT_GT(cnt[i], 0);
        else ASSERT_EQ(cnt[i], 0);
    }
    eng_sampler_free(&s);
    /* decreasing logits: top_k 2500 then top_p 0.3 of that, brute force */
    for (int i = 0; i < V; i++) l[i] = -0.002f * (float)i;
    double z = 0, run = 0;
    for (int i = 0; i < 2500; i++) z += exp((double)l[i]);
    int last = 0;
    while (run < 0.3 * z) run += exp((double)l[last++]);
    last--; /* the nucleus is ids 0..last */
    p.top_k = 2500;
    p.top_p = 0.3f;
    p.min_p = 0.0f;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    histogram(&s, l, V, N, cnt);
    int maxid = 0;
    for (int i = 0; i < V; i++)
        if (cnt[i]) maxid = i;
    ASSERT(maxid <= last + 1 && maxid >= last - 10);
    /* with min_p on top: ratio exp(-0.002 i) >= 0.8 -> i <= 111 */
    eng_sampler_free(&s);
    p.min_p = 0.8f;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    histogram(&s, l, V, N, cnt);
    maxid = 0;
    for (int i = 0; i < V; i++)
        if (cnt[i]) maxid = i;
    ASSERT(maxid <= 111 && maxid >= 100);
    eng_sampler_free(&s);
}

TEST(top_k_then_top_p) {
    enum { V = 6, N = 50000 };
    const double pr[V] = {0.4, 0.25, 0.2, 0.1, 0.04, 0.01};
    float l[V];
    for (int i = 0; i < V; i++) l[i] = (float)log(pr[i]);
    /* top_k 3 -> {0.4, 0.25, 0.2} renormalised {0.47, 0.29, 0.24};
     * top_p 0.7 of that -> {0, 1} (0.47 < 0.7 <= 0.76) */
    eng_sample_params p = params_t(1.0f, 21);
    p.top_k = 3;
    p.top_p = 0.7f;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    long cnt[V];
    histogram(&s, l, V, N, cnt);
    ASSERT_GT(cnt[0], 0);
    ASSERT_GT(cnt[1], 0);
    for (int i = 2; i < V; i++) ASSERT_EQ(cnt[i], 0);
    double ex[V] = {0.4 / 0.65, 0.25 / 0.65, 0, 0, 0, 0};
    ASSERT(chi_square(cnt, ex, V, N) < 16.0);
    eng_sampler_free(&s);
}

TEST(min_p_keeps_tokens_above_fraction_of_max) {
    enum { V = 5, N = 50000 };
    const double pr[V] = {0.05, 0.5, 0.15, 0.3, 0.0};
    float l[V];
    for (int i = 0; i < V; i++) l[i] = pr[i] > 0 ? (float)log(pr[i]) : -INFINITY;
    struct { float min_p; int keep[4]; int n; } cases[] = {
        {0.2f, {1, 3, 2}, 3}, /* threshold 0.1 */
        {0.5f, {1, 3}, 2},    /* threshold 0.25 */
        {0.7f, {1}, 1},       /* threshold 0.35 */
        {1.0f, {1}, 1},
        {0.05f, {1, 3, 2, 0}, 4},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        eng_sample_params p = params_t(1.0f, 300 + c);
        p.min_p = cases[c].min_p;
        eng_sampler s;
        ASSERT_OK(eng_sampler_init(&s, &p, V));
        long cnt[V];
        histogram(&s, l, V, N, cnt);
        double ex[V] = {0}, mass = 0;
        for (int j = 0; j < cases[c].n; j++) mass += pr[cases[c].keep[j]];
        for (int j = 0; j < cases[c].n; j++) ex[cases[c].keep[j]] = pr[cases[c].keep[j]] / mass;
        for (int i = 0; i < V; i++) {
            if (ex[i] == 0) ASSERT_EQ(cnt[i], 0);
            else ASSERT_GT(cnt[i], 0);
        }
        ASSERT(chi_square(cnt, ex, V, N) < 25.0);
        eng_sampler_free(&s);
    }
}

TEST(min_p_uses_temperature_scaled_probabilities) {
    /* p_i/p_max = exp((l_i - l_max)/T). l = {0, -1}: at T=1 the ratio is
     * 0.368 (kept by min_p 0.3); at T=0.5 it is 0.135 (dropped). */
    float l[2] = {0.0f, -1.0f};
    eng_sample_params p = params_t(1.0f, 4);
    p.min_p = 0.3f;
    eng_sampler s;
    long cnt[2];
    ASSERT_OK(eng_sampler_init(&s, &p, 2));
    histogram(&s, l, 2, 2000, cnt);
    ASSERT_GT(cnt[1], 0);
    eng_sampler_free(&s);
    p.temperature = 0.5f;
    ASSERT_OK(eng_sampler_init(&s, &p, 2));
    histogram(&s, l, 2, 2000, cnt);
    ASSERT_EQ(cnt[1], 0);
    eng_sampler_free(&s);
}

TEST(penalties_exact_values) {
    enum { V = 6 };
    const float in[V] = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 1.0f};
    const eng_logit_bias bias[2] = {{4, 1.0f}, {1, 3.0f}};
    eng_sample_params p = params_t(1.0f, 1);
    p.repetition_penalty = 2.0f;
    p.presence_penalty = 0.5f;
    p.frequency_penalty = 0.25f;
    p.logit_bias = bias;
    p.n_logit_bias = 2;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    const int32_t prompt[3] = {0, 1, 0};
    eng_sampler_add_prompt(&s, prompt, 3);
    eng_sampler_accept(&s, 2);
    eng_sampler_accept(&s, 2);
    eng_sampler_accept(&s, 3);
    float out[V];
    eng_sampler_process_logits(&s, in, out);
    /* 0: prompt only: 2/2 = 1; no presence/frequency for prompt tokens
     * 1: bias +3 -> 2, prompt: 2/2 = 1
     * 2: generated twice: 0.5/2 - 0.25*2 - 0.5 = -0.75
     * 3: generated once: 3/2 - 0.25 - 0.5 = 0.75
     * 4: bias only: -2 + 1 = -1
     * 5: untouched */
    const float want[V] = {1.0f, 1.0f, -0.75f, 0.75f, -1.0f, 1.0f};
    for (int i = 0; i < V; i++) ASSERT_NEAR(out[i], want[i], 1e-6);
    /* in place gives the same */
    float io[V];
    memcpy(io, in, sizeof io);
    eng_sampler_process_logits(&s, io, io);
    for (int i = 0; i < V; i++) ASSERT_NEAR(io[i], want[i], 1e-6);
    eng_sampler_free(&s);
}

TEST(each_penalty_alone) {
    enum { V = 4 };
    const float in[V] = {1.5f, -0.5f, 2.0f, 0.0f};
    float out[V];
    eng_sampler s;
    const int32_t prompt[1] = {1};
    /* repetition only: applies to prompt and generated, negative multiplied */
    eng_sample_params p = params_t(1.0f, 1);
    p.repetition_penalty = 1.5f;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    eng_sampler_add_prompt(&s, prompt, 1);
    eng_sampler_accept(&s, 0);
    eng_sampler_accept(&s, 0);
    eng_sampler_accept(&s, 3);
    eng_sampler_process_logits(&s, in, out);
    ASSERT_NEAR(out[0], 1.0, 1e-6);   /* 1.5 / 1.5, once, not per occurrence */
    ASSERT_NEAR(out[1], -0.75, 1e-6); /* -0.5 * 1.5 */
    ASSERT_NEAR(out[2], 2.0, 1e-6);
    ASSERT_NEAR(out[3], 0.0, 1e-6);   /* 0 * 1.5 */
    eng_sampler_free(&s);
    /* presence only: flat per seen generated token */
    p = params_t(1.0f, 1);
    p.presence_penalty = -1.25f;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    eng_sampler_add_prompt(&s, prompt, 1);
    eng_sampler_accept(&s, 0);
    eng_sampler_accept(&s, 0);
    eng_sampler_accept(&s, 3);
    eng_sampler_process_logits(&s, in, out);
    ASSERT_NEAR(out[0], 2.75, 1e-6);
    ASSERT_NEAR(out[1], -0.5, 1e-6); /* prompt token: no presence penalty */
    ASSERT_NEAR(out[2], 2.0, 1e-6);
    ASSERT_NEAR(out[3], 1.25, 1e-6);
    eng_sampler_free(&s);
    /* frequency only: per occurrence */
    p = params_t(1.0f, 1);
    p.frequency_penalty = 0.75f;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    eng_sampler_add_prompt(&s, prompt, 1);
    for (int k = 0; k < 3; k++) eng_sampler_accept(&s, 0);
    eng_sampler_accept(&s, 3);
    eng_sampler_process_logits(&s, in, out);
    ASSERT_NEAR(out[0], 1.5 - 3 * 0.75, 1e-6);
    ASSERT_NEAR(out[1], -0.5, 1e-6);
    ASSERT_NEAR(out[2], 2.0, 1e-6);
    ASSERT_NEAR(out[3], -0.75, 1e-6);
    /* out-of-range ids are ignored */
    const int32_t junk[3] = {-1, V, 1 << 30};
    eng_sampler_add_prompt(&s, junk, 3);
    eng_sampler_accept(&s, -5);
    eng_sampler_accept(&s, V);
    eng_sampler_process_logits(&s, in, out);
    ASSERT_NEAR(out[0], 1.5 - 3 * 0.75, 1e-6);
    eng_sampler_free(&s);
}

TEST(penalties_steer_sampling) {
    /* two equal tokens; after generating token 0 many times a frequency
     * penalty makes greedy pick token 1 */
    float l[2] = {1.0f, 1.0f};
    eng_sample_params p = params_t(0.0f, 1);
    p.frequency_penalty = 0.1f;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, 2));
    ASSERT_EQ(sample_one(&s, l), 0);
    eng_sampler_accept(&s, 0);
    ASSERT_EQ(sample_one(&s, l), 1);
    eng_sampler_free(&s);
}

TEST(logit_bias_minus_100_bans_token) {
    enum { V = 50, N = 20000 };
    float l[V];
    for (int i = 0; i < V; i++) l[i] = 0.1f * (float)i;
    const eng_logit_bias ban[2] = {{49, -100.0f}, {10, -100.0f}};
    eng_sample_params p = params_t(2.0f, 31);
    p.logit_bias = ban;
    p.n_logit_bias = 2;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    long cnt[V];
    histogram(&s, l, V, N, cnt);
    ASSERT_EQ(cnt[49], 0);
    ASSERT_EQ(cnt[10], 0);
    ASSERT_GT(cnt[48], 0);
    eng_sampler_free(&s);
    p.temperature = 0.0f;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    ASSERT_EQ(sample_one(&s, l), 48);
    eng_sampler_free(&s);
    /* +100 forces a token */
    const eng_logit_bias force[1] = {{3, 100.0f}};
    p = params_t(1.0f, 2);
    p.logit_bias = force;
    p.n_logit_bias = 1;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    for (int i = 0; i < 200; i++) ASSERT_EQ(sample_one(&s, l), 3);
    eng_sampler_free(&s);
}

TEST(minus_inf_logits_never_drawn) {
    enum { V = 300, N = 20000 };
    static float l[V];
    static long cnt[V];
    for (int i = 0; i < V; i++) l[i] = (i % 3 == 0) ? -INFINITY : 0.0f;
    eng_sample_params p = params_t(1.0f, 12);
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    histogram(&s, l, V, N, cnt);
    for (int i = 0; i < V; i += 3) ASSERT_EQ(cnt[i], 0);
    eng_sampler_free(&s);
}

TEST(bad_logits_rejected) {
    float l[4] = {0.0f, NAN, 1.0f, 2.0f};
    eng_sample_params p = params_t(1.0f, 1);
    eng_sampler s;
    eng_sample_result r;
    ASSERT_OK(eng_sampler_init(&s, &p, 4));
    ASSERT_EQ(eng_sampler_sample(&s, l, &r), D2_EINVAL);
    ASSERT_EQ(r.token, -1);
    l[1] = INFINITY;
    ASSERT_EQ(eng_sampler_sample(&s, l, &r), D2_EINVAL);
    for (int i = 0; i < 4; i++) l[i] = -INFINITY;
    ASSERT_EQ(eng_sampler_sample(&s, l, &r), D2_EINVAL);
    l[2] = 0.0f;
    ASSERT_EQ(eng_sampler_sample(&s, l, &r), D2_OK);
    ASSERT_EQ(r.token, 2);
    ASSERT_NEAR(r.logprob, 0.0, 1e-6);
    eng_sampler_free(&s);
}

TEST(logprobs_normalised_and_sorted) {
    enum { V = 20 };
    float l[V];
    for (int i = 0; i < V; i++) l[i] = 1.5f * trng_gauss();
    l[4] = l[9]; /* a tie */
    eng_sample_params p = params_t(0.6f, 17);
    p.n_top_logprobs = 20; /* whole vocabulary */
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    double lse = logsumexp_d(l, V);
    for (int round = 0; round < 100; round++) {
        eng_sample_result r;
        ASSERT_OK(eng_sampler_sample(&s, l, &r));
        ASSERT_EQ(r.n_top, V);
        /* chosen logprob is log_softmax at temperature 1 (not 0.6) */
        ASSERT_NEAR(r.logprob, (double)l[r.token] - lse, 2e-6);
        double z = 0;
        int found = 0;
        for (int j = 0; j < V; j++) {
            z += exp((double)r.top[j].logprob);
            ASSERT_NEAR(r.top[j].logprob, (double)l[r.top[j].token] - lse, 2e-6);
            if (j > 0) {
                ASSERT(r.top[j].logprob <= r.top[j - 1].logprob);
                if (l[r.top[j].token] == l[r.top[j - 1].token])
                    ASSERT_LT(r.top[j - 1].token, r.top[j].token);
            }
            if (r.top[j].token == r.token) {
                found = 1;
                ASSERT(r.top[j].logprob == r.logprob);
            }
        }
        ASSERT(found);
        ASSERT_NEAR(log(z), 0.0, 1e-5); /* logsumexp of the distribution */
    }
    eng_sampler_free(&s);
}

TEST(logprobs_large_vocab_greedy_top) {
    enum { V = 32000 };
    static float l[V];
    for (int i = 0; i < V; i++) l[i] = 3.0f * trng_gauss();
    eng_sample_params p = params_t(0.0f, 1);
    p.n_top_logprobs = 5;
    const eng_logit_bias b[1] = {{123, 2.5f}};
    p.logit_bias = b;
    p.n_logit_bias = 1;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, V));
    eng_sample_result r;
    ASSERT_OK(eng_sampler_sample(&s, l, &r));
    /* logprobs are over the biased logits */
    static float lb[V];
    memcpy(lb, l, sizeof l);
    lb[123] += 2.5f;
    double lse = logsumexp_d(lb, V);
    ASSERT_EQ(r.n_top, 5);
    ASSERT_EQ(r.top[0].token, r.token);
    ASSERT(r.top[0].logprob == r.logprob);
    ASSERT_NEAR(r.logprob, (double)lb[r.token] - lse, 1e-5);
    for (int j = 1; j < 5; j++) ASSERT(r.top[j].logprob <= r.top[j - 1].logprob);
    /* brute-force 5th best */
    int better = 0;
    for (int i = 0; i < V; i++) better += lb[i] > lb[r.top[4].token];
    ASSERT_EQ(better, 4);
    ASSERT_EQ(eng_sampler_sample(&s, l, &r), D2_OK); /* repeatable */
    eng_sampler_free(&s);
    /* n_top larger than the vocabulary is clamped */
    float small[3] = {0.0f, 1.0f, 2.0f};
    p = params_t(1.0f, 1);
    p.n_top_logprobs = 10;
    ASSERT_OK(eng_sampler_init(&s, &p, 3));
    ASSERT_OK(eng_sampler_sample(&s, small, &r));
    ASSERT_EQ(r.n_top, 3);
    ASSERT_EQ(r.top[0].token, 2);
    ASSERT_EQ(r.top[2].token, 0);
    eng_sampler_free(&s);
}

TEST(validation_rejects_each_bad_field) {
    const int V = 100;
    eng_sample_params p;
    const char *why = NULL;
    eng_sample_params_default(&p);
    ASSERT_EQ(eng_sample_params_validate(&p, V, &why), D2_OK);
    ASSERT(why == NULL);
    const eng_logit_bias good[2] = {{0, -100.0f}, {99, 100.0f}};
    p.logit_bias = good;
    p.n_logit_bias = 2;
    p.temperature = 2.0f;
    p.top_p = 1.0f;
    p.min_p = 1.0f;
    p.presence_penalty = -2.0f;
    p.frequency_penalty = 2.0f;
    p.repetition_penalty = 10.0f;
    p.n_top_logprobs = 20;
    p.top_k = 1000;
    ASSERT_EQ(eng_sample_params_validate(&p, V, &why), D2_OK);

    const eng_logit_bias bad_tok[1] = {{100, 1.0f}};
    const eng_logit_bias neg_tok[1] = {{-1, 1.0f}};
    const eng_logit_bias bad_bias[1] = {{5, 100.5f}};
    const eng_logit_bias nan_bias[1] = {{5, NAN}};
#define CASE(field_expr, name)                                                 \
    do {                                                                       \
        eng_sample_params q;                                                   \
        eng_sample_params_default(&q);                                         \
        field_expr;                                                            \
        why = NULL;                                                            \
        ASSERT_EQ(eng_sample_params_validate(&q, V, &why), D2_EINVAL);         \
        ASSERT(why != NULL);                                                   \
        if (!strstr(why, name)) FAIL_("'%s' does not name %s", why, name);    \
        eng_sampler s_;                                                        \
        ASSERT_EQ(eng_sampler_init(&s_, &q, V), D2_EINVAL);                    \
        eng_sampler_free(&s_);                                                 \
    } while (0)
    CASE(q.temperature = -0.1f, "temperature");
    CASE(q.temperature = 2.01f, "temperature");
    CASE(q.temperature = NAN, "temperature");
    CASE(q.top_p = 0.0f, "top_p");
    CASE(q.top_p = 1.01f, "top_p");
    CASE(q.top_p = NAN, "top_p");
    CASE(q.top_k = -1, "top_k");
    CASE(q.min_p = -0.01f, "min_p");
    CASE(q.min_p = 1.5f, "min_p");
    CASE(q.presence_penalty = 2.5f, "presence_penalty");
    CASE(q.presence_penalty = -2.5f, "presence_penalty");
    CASE(q.frequency_penalty = -3.0f, "frequency_penalty");
    CASE(q.frequency_penalty = NAN, "frequency_penalty");
    CASE(q.repetition_penalty = 0.0f, "repetition_penalty");
    CASE(q.repetition_penalty = 10.5f, "repetition_penalty");
    CASE((q.logit_bias = bad_tok, q.n_logit_bias = 1), "logit_bias");
    CASE((q.logit_bias = neg_tok, q.n_logit_bias = 1), "logit_bias");
    CASE((q.logit_bias = bad_bias, q.n_logit_bias = 1), "logit_bias");
    CASE((q.logit_bias = nan_bias, q.n_logit_bias = 1), "logit_bias");
    CASE((q.logit_bias = NULL, q.n_logit_bias = 3), "logit_bias");
    CASE(q.n_top_logprobs = 21, "top_logprobs");
    CASE(q.n_top_logprobs = -1, "top_logprobs");
#undef CASE
    eng_sample_params_default(&p);
    ASSERT_EQ(eng_sample_params_validate(&p, 0, &why), D2_EINVAL);
    ASSERT_EQ(eng_sample_params_validate(&p, 0, NULL), D2_EINVAL);
}

TEST(tiny_vocabularies) {
    float one[1] = {-3.0f};
    eng_sample_params p = params_t(1.0f, 1);
    p.top_p = 0.5f;
    p.top_k = 3;
    p.min_p = 0.5f;
    p.n_top_logprobs = 2;
    eng_sampler s;
    ASSERT_OK(eng_sampler_init(&s, &p, 1));
    eng_sample_result r;
    ASSERT_OK(eng_sampler_sample(&s, one, &r));
    ASSERT_EQ(r.token, 0);
    ASSERT_NEAR(r.logprob, 0.0, 1e-6);
    ASSERT_EQ(r.n_top, 1);
    eng_sampler_free(&s);
    /* vocab 17: one full 16-lane block plus a tail */
    float l[17];
    for (int i = 0; i < 17; i++) l[i] = (float)(i % 5);
    p = params_t(1.0f, 2);
    p.top_k = 4;
    ASSERT_OK(eng_sampler_init(&s, &p, 17));
    long cnt[17];
    histogram(&s, l, 17, 4000, cnt);
    /* logits 4 at ids 4, 9, 14; then 3 at 3, 8, 13: top 4 = 4, 9, 14, 3 */
    for (int i = 0; i < 17; i++) {
        if (i == 4 || i == 9 || i == 14 || i == 3) ASSERT_GT(cnt[i], 0);
        else ASSERT_EQ(cnt[i], 0);
    }
    eng_sampler_free(&s);
}

/* Timing print only (never asserted): 128256 tokens, Llama-3-sized. */
TEST(bench_sample_128k) {
    enum { V = 128256 };
    static float l[V];
    /* a realistic-ish shape: a few plausible tokens on a broad tail */
    for (int i = 0; i < V; i++) l[i] = 2.0f * trng_gauss();
    for (int k = 0; k < 40; k++) l[(int)(trng() % V)] = 12.0f + 2.0f * trng_gauss();
    static float flat[V];
    for (int i = 0; i < V; i++) flat[i] = trng_gauss();
    struct { const char *name; float t, top_p, min_p; int top_k, ntop; const float *lg; } cfg[] = {
        {"greedy", 0.0f, 1.0f, 0.0f, 0, 0, l},
        {"T=1", 1.0f, 1.0f, 0.0f, 0, 0, l},
        {"T=0.8 top_p=0.9", 0.8f, 0.9f, 0.0f, 0, 0, l},
        {"T=1 top_p=0.9 (flat)", 1.0f, 0.9f, 0.0f, 0, 0, flat},
        {"T=0.7 top_k=50", 0.7f, 1.0f, 0.0f, 50, 0, l},
        {"T=1 top_k=50 top_p=0.95 min_p=0.05 logprobs=5", 1.0f, 0.95f, 0.05f, 50, 5, l},
    };
    const int32_t prompt[64] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        eng_sample_params p = params_t(cfg[c].t, 1);
        p.top_p = cfg[c].top_p;
        p.top_k = cfg[c].top_k;
        p.min_p = cfg[c].min_p;
        p.n_top_logprobs = cfg[c].ntop;
        p.repetition_penalty = 1.1f;
        p.frequency_penalty = 0.1f;
        eng_sampler s;
        ASSERT_OK(eng_sampler_init(&s, &p, V));
        eng_sampler_add_prompt(&s, prompt, 64);
        int iters = 300;
        sample_one(&s, cfg[c].lg); /* warm the scratch */
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int i = 0; i < iters; i++) sample_one(&s, cfg[c].lg);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double us = ((double)(t1.tv_sec - t0.tv_sec) * 1e6 +
                     (double)(t1.tv_nsec - t0.tv_nsec) / 1e3) / iters;
        printf("  bench: %-48s %8.1f us/sample (vocab %d)\n", cfg[c].name, us, V);
        eng_sampler_free(&s);
    }
}

/* Samplers sharing one eng_sample_scratch (as the engine's do), interleaved
 * sample by sample, give exactly what samplers with their own scratch give,
 * with penalties and logprobs on; a size mismatch is refused. */
TEST(shared_scratch_matches_own_scratch) {
    enum { V = 3000, N = 400, K = 3 };
    static float l[V];
    for (int i = 0; i < V; i++) l[i] = 1.5f * trng_gauss();
    eng_sample_scratch sc;
    ASSERT_OK(eng_sample_scratch_init(&sc, V));
    eng_sampler own[K], shared[K];
    for (int k = 0; k < K; k++) {
        eng_sample_params p = params_t(0.9f, 100 + (uint64_t)k);
        p.top_p = k == 1 ? 0.8f : 1.0f;
        p.top_k = k == 2 ? 40 : 0;
        p.presence_penalty = 0.5f;
        p.frequency_penalty = 0.2f;
        p.repetition_penalty = 1.1f;
        p.n_top_logprobs = 5;
        ASSERT_OK(eng_sampler_init(&own[k], &p, V));
        ASSERT_OK(eng_sampler_init_shared(&shared[k], &p, V, &sc));
    }
    for (int i = 0; i < N; i++) {
        for (int k = 0; k < K; k++) {
            eng_sample_result ra, rb;
            ASSERT_OK(eng_sampler_sample(&own[k], l, &ra));
            ASSERT_OK(eng_sampler_sample(&shared[k], l, &rb));
            ASSERT_EQ(ra.token, rb.token);
            ASSERT_EQ(ra.n_top, rb.n_top);
            ASSERT(ra.logprob == rb.logprob);
            eng_sampler_accept(&own[k], ra.token);
            eng_sampler_accept(&shared[k], rb.token);
        }
    }
    for (int k = 0; k < K; k++) {
        eng_sampler_free(&own[k]);
        eng_sampler_free(&shared[k]);
    }
    eng_sampler bad;
    eng_sample_params p = params_t(1.0f, 1);
    ASSERT_EQ(eng_sampler_init_shared(&bad, &p, V + 1, &sc), D2_EINVAL);
    eng_sample_scratch_free(&sc);
}
