/*
 * engine/sample.c — token sampling: logit bias, penalties, greedy /
 * temperature / top-k / top-p / min-p, per-request RNG, log-probabilities.
 * The contract (pipeline order, logprob definition) is in engine/sample.h.
 * Callers: the engine's decode loop and tests; one sampler per sequence,
 * used by one thread at a time.
 *
 * How one sample avoids sorting the vocabulary (n_vocab up to ~152k):
 *   - vectorisable passes (bits-as-integer maximum, a branch-free exp with
 *     16-lane sums) give the maximum logit and the softmax normalisers;
 *   - top-k with k <= 1024, and top-p alone as a first guess, take the k (or
 *     128) best tokens with a min-heap fed by a scan that skips 64-token
 *     blocks holding nothing above the heap's root; top-p, min-p and the draw
 *     then run on that short, sorted list. The guess is kept only when the
 *     128 tokens hold at least top_p of the mass (typical for LLM outputs);
 *   - otherwise (large k, wide nucleus) a histogram path: each token gets a
 *     bin floor(32 * (max - logit) / T) (1/32-nat bins, everything below
 *     exp(-48) in one overflow bin), one scatter pass counts tokens and mass
 *     per bin, prefix sums find the bin holding the top-k / top-p boundary,
 *     only that bin's tokens are gathered and resolved exactly by quickselect
 *     (by count for top-k, by mass for top-p). The kept set is then "ranks at
 *     or before the boundary token" (rank = logit descending, id ascending)
 *     plus the min-p test, applied as a mask, and the draw walks 64-token
 *     block sums.
 * Everything is O(n_vocab) with small constants; nothing allocates.
 */
#include "engine/sample.h"

#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "common/status.h"

#define GREEDY_EPS 1e-5f      /* temperatures below this sample greedily (as vLLM) */
#define OVF (ENG_SAMPLE_NBINS - 1) /* overflow bin: (max - logit)/T >= 48 */
#define BIN_SCALE 32.0f       /* bins per nat */
#define LANES 16              /* independent accumulators, so loops vectorise */
#define EXP_FLOOR (-86.0f)    /* exp below this is taken as exactly 0 */
#define MAX_TOP 20
#define BLK 64                /* tokens tested at once by vectorised pre-checks */
#define SMALL_K 1024          /* top-k up to this uses the heap path */
#define SPEC_N 128            /* top-p alone first tries the best SPEC_N tokens */

/* ---------------------------------------------------------------- params */

void eng_sample_params_default(eng_sample_params *p) {
    memset(p, 0, sizeof *p);
    p->temperature = 1.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->repetition_penalty = 1.0f;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
    p->has_seed = false;
    p->logit_bias = NULL;
    p->n_logit_bias = 0;
    p->n_top_logprobs = 0;
}

/* The comparisons are written so that NaN fails them. */
static const char *params_error(const eng_sample_params *p, int n_vocab) {
    if (n_vocab <= 0) return "n_vocab must be positive";
    if (!(p->temperature >= 0.0f && p->temperature <= 2.0f))
        return "temperature must be between 0 and 2";
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) return "top_p must be greater than 0 and at most 1";
    if (p->top_k < 0) return "top_k must be 0 (off) or positive";
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) return "min_p must be between 0 and 1";
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        return "presence_penalty must be between -2 and 2";
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        return "frequency_penalty must be between -2 and 2";
    if (!(p->repetition_penalty > 0.0f && p->repetition_penalty <= 10.0f))
        return "repetition_penalty must be greater than 0 and at most 10";
    if (p->n_logit_bias < 0 || (p->n_logit_bias > 0 && !p->logit_bias))
        return "logit_bias is malformed";
    for (int i = 0; i < p->n_logit_bias; i++) {
        if (p->logit_bias[i].token < 0 || p->logit_bias[i].token >= n_vocab)
            return "logit_bias token id is out of range";
        if (!(p->logit_bias[i].bias >= -100.0f && p->logit_bias[i].bias <= 100.0f))
            return "logit_bias value must be between -100 and 100";
    }
    if (p->n_top_logprobs < 0 || p->n_top_logprobs > MAX_TOP)
        return "top_logprobs must be between 0 and 20";
    return NULL;
}

int eng_sample_params_validate(const eng_sample_params *p, int n_vocab, const char **why) {
    const char *e = params_error(p, n_vocab);
    if (!e) return D2_OK;
    if (why) *why = e;
    return D2_EINVAL;
}

/* ------------------------------------------------------------------- RNG */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t st[4]) {
    uint64_t out = rotl64(st[1] * 5u, 7) * 9u;
    uint64_t t = st[1] << 17;
    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = rotl64(st[3], 45);
    return out;
}

/* Uniform in [0, 1) with 53 random bits. */
static double rng_uniform(uint64_t st[4]) {
    return (double)(xoshiro_next(st) >> 11) * 0x1.0p-53;
}

static void rng_seed(uint64_t st[4], uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) st[i] = splitmix64(&x);
}

/* Seed for requests without one: wall clock, a process-wide counter (so two
 * requests in the same nanosecond differ) and an address (ASLR). */
static _Atomic uint64_t seed_counter;
static uint64_t entropy_seed(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t c = atomic_fetch_add(&seed_counter, 1);
    uint64_t x = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    x ^= c * 0xd1b54a32d192ed03ull;
    x ^= (uint64_t)(uintptr_t)&seed_counter;
    return splitmix64(&x);
}

/* -------------------------------------------------------- init / state */

int eng_sample_scratch_init(eng_sample_scratch *sc, int n_vocab) {
    memset(sc, 0, sizeof *sc);
    if (n_vocab <= 0) return D2_EINVAL;
    size_t n = (size_t)n_vocab;
    sc->n_vocab = n_vocab;
    sc->work = malloc(n * sizeof *sc->work);
    sc->prob = malloc(n * sizeof *sc->prob);
    sc->idx = malloc(n * sizeof *sc->idx);
    sc->bins = malloc(n * sizeof *sc->bins);
    sc->hist_cnt = malloc(ENG_SAMPLE_NBINS * sizeof *sc->hist_cnt);
    sc->hist_mass = malloc(ENG_SAMPLE_NBINS * sizeof *sc->hist_mass);
    if (!sc->work || !sc->prob || !sc->idx || !sc->bins || !sc->hist_cnt || !sc->hist_mass) {
        D2_ERROR("sample: out of memory for scratch (n_vocab %d)", n_vocab);
        eng_sample_scratch_free(sc);
        return D2_ENOMEM;
    }
    return D2_OK;
}

void eng_sample_scratch_free(eng_sample_scratch *sc) {
    if (!sc) return;
    free(sc->work);
    free(sc->prob);
    free(sc->idx);
    free(sc->bins);
    free(sc->hist_cnt);
    free(sc->hist_mass);
    memset(sc, 0, sizeof *sc);
}

/* Common part of the two initialisers: parameters, penalty state, RNG.
 * The scratch pointers are set by the caller. */
static int sampler_init_state(eng_sampler *s, const eng_sample_params *p, int n_vocab) {
    memset(s, 0, sizeof *s);
    const char *why = params_error(p, n_vocab);
    if (why) {
        D2_ERROR("sample: invalid parameters: %s", why);
        return D2_EINVAL;
    }
    size_t n = (size_t)n_vocab;
    s->params = *p;
    s->n_vocab = n_vocab;
    s->counts = calloc(n, sizeof *s->counts);
    s->seen_prompt = calloc(n, sizeof *s->seen_prompt);
    s->seen_ids = malloc(n * sizeof *s->seen_ids);
    if (!s->counts || !s->seen_prompt || !s->seen_ids) {
        D2_ERROR("sample: out of memory for penalty state (n_vocab %d)", n_vocab);
        eng_sampler_free(s);
        return D2_ENOMEM;
    }
    rng_seed(s->rng, p->has_seed ? p->seed : entropy_seed());
    return D2_OK;
}

static void sampler_borrow(eng_sampler *s, const eng_sample_scratch *sc) {
    s->work = sc->work;
    s->prob = sc->prob;
    s->idx = sc->idx;
    s->bins = sc->bins;
    s->hist_cnt = sc->hist_cnt;
    s->hist_mass = sc->hist_mass;
}

int eng_sampler_init(eng_sampler *s, const eng_sample_params *p, int n_vocab) {
    int rc = sampler_init_state(s, p, n_vocab);
    if (rc != D2_OK) return rc;
    eng_sample_scratch sc;
    rc = eng_sample_scratch_init(&sc, n_vocab);
    if (rc != D2_OK) {
        eng_sampler_free(s);
        return rc;
    }
    sampler_borrow(s, &sc);
    s->own_scratch = true;
    return D2_OK;
}

int eng_sampler_init_shared(eng_sampler *s, const eng_sample_params *p, int n_vocab,
                            eng_sample_scratch *sc) {
    if (!sc || sc->n_vocab != n_vocab) return D2_EINVAL;
    int rc = sampler_init_state(s, p, n_vocab);
    if (rc != D2_OK) return rc;
    sampler_borrow(s, sc);
    s->own_scratch = false;
    return D2_OK;
}

void eng_sampler_free(eng_sampler *s) {
    if (!s) return;
    if (s->own_scratch) {
        free(s->work);
        free(s->prob);
        free(s->idx);
        free(s->bins);
        free(s->hist_cnt);
        free(s->hist_mass);
    }
    free(s->counts);
    free(s->seen_prompt);
    free(s->seen_ids);
    memset(s, 0, sizeof *s);
}

/* Adds id to the distinct-seen list the first time it is seen at all. */
static void note_seen(eng_sampler *s, int32_t id) {
    if (!s->seen_prompt[id] && s->counts[id] == 0) s->seen_ids[s->n_seen++] = id;
}

void eng_sampler_add_prompt(eng_sampler *s, const int32_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= s->n_vocab) continue;
        note_seen(s, id);
        s->seen_prompt[id] = 1;
    }
}

void eng_sampler_accept(eng_sampler *s, int32_t token) {
    if (token < 0 || token >= s->n_vocab) return;
    note_seen(s, token);
    if (s->counts[token] < INT32_MAX) s->counts[token]++;
}

void eng_sampler_process_logits(eng_sampler *s, const float *in, float *out) {
    const eng_sample_params *p = &s->params;
    if (out != in) memcpy(out, in, (size_t)s->n_vocab * sizeof *out);
    for (int i = 0; i < p->n_logit_bias; i++) {
        int32_t t = p->logit_bias[i].token;
        if (t >= 0 && t < s->n_vocab) out[t] += p->logit_bias[i].bias;
    }
    const float rp = p->repetition_penalty, pres = p->presence_penalty,
                freq = p->frequency_penalty;
    const bool rep = rp != 1.0f, of = pres != 0.0f || freq != 0.0f;
    if (!rep && !of) return;
    for (int k = 0; k < s->n_seen; k++) {
        int32_t id = s->seen_ids[k];
        float l = out[id];
        if (rep) l = l > 0.0f ? l / rp : l * rp;
        int32_t c = s->counts[id];
        if (of && c > 0) {
            l -= freq * (float)c;
            l -= pres;
        }
        out[id] = l;
    }
}

/* ------------------------------------------------------- vector passes */

static inline float bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }

/* exp(x) for x <= 0 without branches or libm, so loops over it vectorise.
 * x = n ln2 + r with |r| <= ln2/2 (n from the 1.5*2^23 rounding trick, ln2
 * split in two for an exact n*ln2_hi), degree-6 Taylor for exp(r) (error
 * < 2e-7 relative), 2^n added to the exponent field. exp(0) is exactly 1;
 * x < -86 (including -inf) gives exactly 0, which also keeps 2^n normal. */
static inline float exp_nonpos(float x) {
    const float shifter = 12582912.0f;
    /* Selects by bit masks rather than ?: so that plain SSE2 vectorises too. */
    uint32_t keep = 0u - (uint32_t)(x >= EXP_FLOOR);
    float xc = bits_to_f32((f32_to_bits(x) & keep) | (f32_to_bits(EXP_FLOOR) & ~keep));
    float t = xc * 1.44269504f + shifter;
    float n = t - shifter;
    uint32_t nbits = (f32_to_bits(t) - f32_to_bits(shifter)) << 23;
    float r = xc - n * 0.693145751953125f;
    r = r - n * 1.428606765330187e-6f;
    float q = 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    return bits_to_f32((f32_to_bits(q) + nbits) & keep);
}

/* Maximum of w[0..n); D2_EINVAL when any value is NaN or +inf, or all are
 * -inf. Works on the bits mapped to an integer order (so the reduction
 * vectorises; a float max reduction does not without -ffast-math). */
static int max_pass(const float *w, int n, float *out) {
    int32_t mk = INT32_MIN;
    uint32_t bad = 0;
    for (int i = 0; i < n; i++) {
        uint32_t b = f32_to_bits(w[i]);
        int32_t k = (int32_t)(b ^ ((uint32_t)((int32_t)b >> 31) & 0x7fffffffu));
        mk = k > mk ? k : mk;
        bad |= ((b & 0x7fffffffu) > 0x7f800000u) | (b == 0x7f800000u);
    }
    uint32_t mb = (uint32_t)mk;
    mb ^= (uint32_t)((int32_t)mb >> 31) & 0x7fffffffu;
    float m = bits_to_f32(mb);
    *out = m;
    return bad || m == -INFINITY ? D2_EINVAL : D2_OK;
}

/* Sum of p[0..n) in double, LANES independent accumulators. */
static double lane_sum(const float *p, int n) {
    double acc[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += p[i + j];
    double s = 0;
    for (; i < n; i++) s += p[i];
    for (int j = 0; j < LANES; j++) s += acc[j];
    return s;
}

/* Sum of exp((w[i] - m) * invT), through a small stack buffer (no scratch
 * needed). */
static double sum_exp(const float *w, int n, float m, float invT) {
    float buf[256];
    double total = 0;
    for (int i0 = 0; i0 < n; i0 += 256) {
        int len = n - i0 < 256 ? n - i0 : 256;
        for (int i = 0; i < len; i++) buf[i] = exp_nonpos((w[i0 + i] - m) * invT);
        total += lane_sum(buf, len);
    }
    return total;
}

/* prob[i] = exp((w[i] - m) * invT); returns their sum. */
static double exp_pass(const float *w, int n, float m, float invT, float *prob) {
    for (int i = 0; i < n; i++) prob[i] = exp_nonpos((w[i] - m) * invT);
    return lane_sum(prob, n);
}

/* bins[i] = floor(32 * (m - w[i]) * invT), or OVF past the last bin. */
static void bins_pass(const float *w, int n, float m, float invT, uint16_t *bins) {
    for (int i = 0; i < n; i++) {
        float t = (m - w[i]) * invT * BIN_SCALE;
        bins[i] = (uint16_t)(t < (float)OVF ? (int)t : OVF);
    }
}

/* ------------------------------------------------- selection on ranks */

/* Token a ranks before token b: higher logit, or equal logit and lower id. */
static inline bool ranks_before(const float *w, int32_t a, int32_t b) {
    return w[a] > w[b] || (w[a] == w[b] && a < b);
}

static inline void swap_i32(int32_t *a, int i, int j) {
    int32_t t = a[i];
    a[i] = a[j];
    a[j] = t;
}

/* Partitions a[lo..hi) (hi - lo >= 2) around a median-of-three pivot and
 * returns its final position p: a[lo..p) rank before a[p], a(p..hi) after. */
static int partition(const float *w, int32_t *a, int lo, int hi) {
    int mid = lo + (hi - lo) / 2, last = hi - 1;
    if (ranks_before(w, a[mid], a[lo])) swap_i32(a, mid, lo);
    if (ranks_before(w, a[last], a[lo])) swap_i32(a, last, lo);
    if (ranks_before(w, a[mid], a[last])) swap_i32(a, mid, last);
    int32_t piv = a[last];
    int p = lo;
    for (int i = lo; i < last; i++)
        if (ranks_before(w, a[i], piv)) swap_i32(a, i, p++);
    swap_i32(a, p, last);
    return p;
}

/* Rearranges a[0..n) so that a[0..r) hold its r best-ranked tokens (1 <= r <= n). */
static void select_top(const float *w, int32_t *a, int n, int r) {
    int lo = 0, hi = n;
    while (hi - lo > 1) {
        int p = partition(w, a, lo, hi);
        if (p == r || p + 1 == r) return;
        if (r < p) hi = p;
        else lo = p + 1;
    }
}

/* Rearranges a[0..n) so that a[0..c) hold its c best-ranked tokens for the
 * smallest c >= 1 whose mass (sum of prob) reaches target; returns c (n when
 * the whole set falls short, which only rounding can cause). */
static int select_mass(const float *w, const float *prob, int32_t *a, int n, double target) {
    int lo = 0, hi = n;
    double acc = 0; /* mass of a[0..lo), all inside the answer */
    while (hi - lo > 1) {
        int p = partition(w, a, lo, hi);
        double left = 0;
        for (int i = lo; i < p; i++) left += prob[a[i]];
        if (acc + left >= target && p > lo) {
            hi = p;
            continue;
        }
        acc += left + prob[a[p]];
        if (acc >= target) return p + 1;
        lo = p + 1;
    }
    if (hi - lo == 1 && lo < n) return lo + 1;
    return hi > 0 ? hi : 1;
}

/* Collects the ids of tokens in bin b into a; returns how many. */
static int gather_bin(const uint16_t *bins, int n, int b, int32_t *a) {
    int k = 0, i = 0;
    const uint16_t bb = (uint16_t)b;
    for (; i + BLK <= n; i += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) any |= bins[i + j] == bb;
        if (!any) continue;
        for (int j = 0; j < BLK; j++) {
            a[k] = i + j;
            k += bins[i + j] == bb;
        }
    }
    for (; i < n; i++) {
        a[k] = i;
        k += bins[i] == bb;
    }
    return k;
}

/* The worst-ranked token of a[0..n), n >= 1. */
static int32_t last_ranked(const float *w, const int32_t *a, int n) {
    int32_t worst = a[0];
    for (int i = 1; i < n; i++)
        if (ranks_before(w, worst, a[i])) worst = a[i];
    return worst;
}

/* First token holding the maximum m. */
static int32_t argmax_of(const float *w, int n, float m) {
    int i0 = 0;
    for (; i0 + BLK <= n; i0 += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) any |= w[i0 + j] == m;
        if (any) break;
    }
    for (int i = i0; i < n; i++)
        if (w[i] == m) return i;
    return 0;
}

/* The n best-ranked tokens, best first, into h[0..n) (1 <= n <= V): a
 * min-heap of size n whose root is the worst kept token, fed by a scan that
 * skips whole blocks with no logit above the root's. Expected cost is one
 * vectorised compare pass plus O(n log n log V) heap work. */
static void heap_down(const float *w, int32_t *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, worst = i;
        if (l < n && ranks_before(w, h[worst], h[l])) worst = l;
        if (r < n && ranks_before(w, h[worst], h[r])) worst = r;
        if (worst == i) return;
        swap_i32(h, i, worst);
        i = worst;
    }
}

static void top_n(const float *w, int V, int n, int32_t *h) {
    int i = 0;
    for (; i < n; i++) { /* fill: sift each new token up */
        h[i] = i;
        for (int c = i; c > 0;) {
            int par = (c - 1) / 2;
            if (!ranks_before(w, h[par], h[c])) break;
            swap_i32(h, par, c);
            c = par;
        }
    }
    /* Tokens are visited in increasing id, so one ties with the root only
     * by logit and ranks after it: strictly greater logits replace it. */
    float thr = w[h[0]];
    for (; i < V && (i % BLK) != 0; i++)
        if (w[i] > thr) { h[0] = i; heap_down(w, h, n, 0); thr = w[h[0]]; }
    for (; i + BLK <= V; i += BLK) {
        int any = 0;
        for (int j = 0; j < BLK; j++) any |= w[i + j] > thr;
        if (!any) continue;
        for (int j = 0; j < BLK; j++)
            if (w[i + j] > thr) { h[0] = i + j; heap_down(w, h, n, 0); thr = w[h[0]]; }
    }
    for (; i < V; i++)
        if (w[i] > thr) { h[0] = i; heap_down(w, h, n, 0); thr = w[h[0]]; }
    /* heapsort: the worst goes to the back each time, leaving best first */
    for (int end = n - 1; end > 0; end--) {
        swap_i32(h, 0, end);
        heap_down(w, h, end, 0);
    }
}

/* ------------------------------------------------------------ the draw */

/* Top-k / top-p boundary: returns the worst-ranked token they keep, or -1
 * when neither is active. Needs prob and bins filled. */
static int32_t truncation_key(eng_sampler *s, int k, double z_t) {
    const eng_sample_params *p = &s->params;
    const float *w = s->work, *prob = s->prob;
    const int V = s->n_vocab;
    int32_t *cnt = s->hist_cnt, *a = s->idx;
    double *mass = s->hist_mass;
    memset(cnt, 0, ENG_SAMPLE_NBINS * sizeof *cnt);
    memset(mass, 0, ENG_SAMPLE_NBINS * sizeof *mass);
    /* The overflow bin is skipped: for peaked distributions almost every
     * token lands there and counting them would serialise on one counter. */
    int in_bins = 0;
    for (int i = 0; i < V; i++) {
        int b = s->bins[i];
        if (b != OVF) {
            cnt[b]++;
            mass[b] += prob[i];
            in_bins++;
        }
    }
    cnt[OVF] = V - in_bins;

    int32_t key = -1;
    int bk = OVF + 1, nsel = 0;
    double set_mass = z_t; /* mass of what top-k keeps */
    if (k > 0) {
        int cum = 0, b = 0;
        for (; b < OVF; b++) {
            if (cum + cnt[b] >= k) break;
            cum += cnt[b];
        }
        bk = b;
        nsel = k - cum;
        int na = gather_bin(s->bins, V, b, a);
        select_top(w, a, na, nsel);
        double before = 0, sel = 0;
        for (int bb = 0; bb < b; bb++) before += mass[bb];
        for (int i = 0; i < nsel; i++) sel += prob[a[i]];
        set_mass = before + sel;
        key = last_ranked(w, a, nsel);
    }
    if (p->top_p < 1.0f) {
        double target = (double)p->top_p * set_mass, cum = 0;
        int lim = k > 0 ? bk : OVF, b = 0;
        for (; b < lim; b++) {
            if (cum + mass[b] >= target) break;
            cum += mass[b];
        }
        int c;
        if (k > 0 && b == bk) {
            c = select_mass(w, prob, a, nsel, target - cum);
        } else {
            int na = gather_bin(s->bins, V, b, a);
            c = select_mass(w, prob, a, na, target - cum);
        }
        key = last_ranked(w, a, c);
    }
    return key;
}

/* Sum of 64 floats in a fixed tree order (vectorisable, reproducible). */
static inline float block_sum(const float *p) {
    float t[16];
    for (int j = 0; j < 16; j++) t[j] = (p[j] + p[j + 16]) + (p[j + 32] + p[j + 48]);
    for (int j = 0; j < 8; j++) t[j] += t[j + 8];
    for (int j = 0; j < 4; j++) t[j] += t[j + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
}

/* Draws a token with probability proportional to prob[i], after zeroing
 * prob for tokens ranking after key (when key >= 0) and below min_p. The
 * total and the walk use the same block sums, so they agree exactly. */
static int32_t draw(eng_sampler *s, int32_t key, float m) {
    const float *w = s->work;
    float *prob = s->prob;
    const int V = s->n_vocab;
    const float min_p = s->params.min_p;
    if (key >= 0 || min_p > 0.0f) {
        const float kl = key >= 0 ? w[key] : -INFINITY;
        const int32_t kid = key >= 0 ? key : INT32_MAX;
        for (int i = 0; i < V; i++) {
            float v = w[i], e = prob[i];
            int keep = (v > kl) | ((v == kl) & (i <= kid));
            prob[i] = (keep && e >= min_p) ? e : 0.0f;
        }
    }
    const int nblk = V / BLK;
    double total = 0;
    for (int b = 0; b < nblk; b++) total += block_sum(prob + b * BLK);
    for (int i = nblk * BLK; i < V; i++) total += prob[i];
    const double target = rng_uniform(s->rng) * total;
    double run = 0;
    for (int b = 0; b < nblk; b++) {
        const float *pb = prob + b * BLK;
        float bs = block_sum(pb);
        if (run + bs <= target) {
            run += bs;
            continue;
        }
        double r2 = run;
        int32_t lastpos = -1;
        for (int j = 0; j < BLK; j++) {
            if (pb[j] <= 0.0f) continue;
            r2 += pb[j];
            lastpos = b * BLK + j;
            if (r2 > target) return lastpos;
        }
        if (lastpos >= 0) return lastpos; /* element sums fell short of bs by rounding */
        run += bs;
    }
    for (int i = nblk * BLK; i < V; i++) {
        if (prob[i] <= 0.0f) continue;
        run += prob[i];
        if (run > target) return i;
    }
    /* Rounding left target at the very top: take the last token with mass. */
    for (int i = V - 1; i >= 0; i--)
        if (prob[i] > 0.0f) return i;
    return argmax_of(w, V, m); /* unreachable: the most likely token is kept */
}

/* The n best-ranked tokens' logprobs into out->top. */
static void top_logprobs(const float *w, int V, int n, float m, double log_z,
                         eng_sample_result *out) {
    if (n > V) n = V;
    if (n > MAX_TOP) n = MAX_TOP;
    int32_t ids[MAX_TOP];
    top_n(w, V, n, ids);
    for (int j = 0; j < n; j++) {
        out->top[j].token = ids[j];
        out->top[j].logprob = (float)(((double)w[ids[j]] - (double)m) - log_z);
    }
    out->n_top = n;
}

/* Draws from an explicit candidate list c[0..n), best first, with pc[j] =
 * exp((logit - max)/T) (so pc[0] = 1): keeps the shortest prefix whose mass
 * reaches top_p_mass (when > 0), then drops pc < min_p, then draws. */
static int32_t draw_small(eng_sampler *s, const int32_t *c, const float *pc, int n,
                          double top_p_mass) {
    int cut = n;
    if (top_p_mass > 0) {
        double run = 0;
        for (int j = 0; j < n; j++) {
            run += pc[j];
            if (run >= top_p_mass) { cut = j + 1; break; }
        }
    }
    const float min_p = s->params.min_p;
    double total = 0;
    for (int j = 0; j < cut; j++)
        if (pc[j] >= min_p) total += pc[j];
    const double target = rng_uniform(s->rng) * total;
    double run = 0;
    int32_t last = c[0];
    for (int j = 0; j < cut; j++) {
        if (!(pc[j] >= min_p) || pc[j] <= 0.0f) continue;
        run += pc[j];
        last = c[j];
        if (run > target) return c[j];
    }
    return last; /* rounding at the very top */
}

bool eng_sampler_is_plain_greedy(const eng_sampler *s) {
    const eng_sample_params *p = &s->params;
    return (p->temperature < GREEDY_EPS || p->top_k == 1) && p->repetition_penalty == 1.0f &&
           p->presence_penalty == 0.0f && p->frequency_penalty == 0.0f && p->n_logit_bias == 0 &&
           p->n_top_logprobs == 0;
}

_Static_assert(ENG_SAMPLE_DEVICE_MAX_K <= SMALL_K, "device top-k draws must be the small-list path");

bool eng_sampler_device_eligible(const eng_sampler *s) {
    const eng_sample_params *p = &s->params;
    if (p->temperature < GREEDY_EPS || p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f ||
        p->frequency_penalty != 0.0f || p->n_logit_bias != 0 || p->n_top_logprobs != 0)
        return false;
    const int k = p->top_k > 0 && p->top_k < s->n_vocab ? p->top_k : 0; /* as eng_sampler_sample */
    return !(k == 1 || k > ENG_SAMPLE_DEVICE_MAX_K || (k == 0 && p->top_p < 1.0f));
}

bool eng_sampler_device_draw(eng_sampler *s, eng_sample_draw *d) {
    if (!eng_sampler_device_eligible(s)) return false;
    const eng_sample_params *p = &s->params;
    const int k = p->top_k > 0 && p->top_k < s->n_vocab ? p->top_k : 0;
    d->inv_temp = 1.0f / p->temperature;
    d->top_k = k;
    d->top_p = p->top_p;
    d->min_p = p->min_p;
    d->u = rng_uniform(s->rng);
    return true;
}

int eng_sampler_sample(eng_sampler *s, const float *logits, eng_sample_result *out) {
    const eng_sample_params *p = &s->params;
    const int V = s->n_vocab;
    float *w = s->work;
    out->token = -1;
    out->logprob = -INFINITY;
    out->n_top = 0;
    eng_sampler_process_logits(s, logits, w);
    float m;
    if (max_pass(w, V, &m) != D2_OK) {
        D2_ERROR("sample: logits hold NaN or +inf, or no finite value (n_vocab %d)", V);
        return D2_EINVAL;
    }
    const int k = p->top_k > 0 && p->top_k < V ? p->top_k : 0;
    int32_t tok;
    double z1; /* sum of exp(logit - max) at temperature 1, for the logprobs */
    if (p->temperature < GREEDY_EPS || k == 1) {
        tok = argmax_of(w, V, m);
        z1 = sum_exp(w, V, m, 1.0f);
    } else {
        const float inv_t = 1.0f / p->temperature;
        const bool top_p = p->top_p < 1.0f;
        tok = -1;
        z1 = -1;
        /* Small candidate list: top-k with a small k, or a guess that the
         * top-p nucleus lies within the SPEC_N best tokens (checked). */
        int nc = k > 0 && k <= SMALL_K ? k : (k == 0 && top_p ? (V < SPEC_N ? V : SPEC_N) : 0);
        if (nc > 0) {
            int32_t *c = s->idx;
            float *pc = s->prob;
            top_n(w, V, nc, c);
            double mass = 0;
            for (int j = 0; j < nc; j++) mass += pc[j] = exp_nonpos((w[c[j]] - m) * inv_t);
            double top_p_mass = 0;
            bool ok = true;
            if (top_p) {
                if (k > 0) {
                    top_p_mass = (double)p->top_p * mass;
                } else {
                    double z_t = sum_exp(w, V, m, inv_t);
                    if (inv_t == 1.0f) z1 = z_t;
                    top_p_mass = (double)p->top_p * z_t;
                    ok = mass >= top_p_mass;
                }
            }
            if (ok) tok = draw_small(s, c, pc, nc, top_p_mass);
        }
        if (tok < 0) { /* the general path over the whole vocabulary */
            const bool trunc = k > 0 || top_p;
            double z_t = exp_pass(w, V, m, inv_t, s->prob);
            if (inv_t == 1.0f) z1 = z_t;
            int32_t key = -1;
            if (trunc) {
                bins_pass(w, V, m, inv_t, s->bins);
                key = truncation_key(s, k, z_t);
            }
            tok = draw(s, key, m);
        }
        if (z1 < 0) z1 = sum_exp(w, V, m, 1.0f);
    }
    const double log_z = log(z1);
    out->token = tok;
    out->logprob = (float)(((double)w[tok] - (double)m) - log_z);
    if (p->n_top_logprobs > 0) top_logprobs(w, V, p->n_top_logprobs, m, log_z, out);
    return D2_OK;
}
