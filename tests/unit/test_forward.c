/*
 * tests/unit/test_forward.c — the batched CPU backend (engine/cpu/backend.c)
 * against the reference forward (engine/ref/ref_cpu.c).
 *
 * Models are synthetic and built in memory (deterministic PRNG weights, the
 * eng_model struct filled by hand), so no loader or asset is needed. Shapes
 * cover GQA and MHA, QKV bias, tied output, both RoPE pairings, llama3 and
 * linear RoPE scaling, head_dim 8/16/32/64 and all four weight dtypes.
 * Checked: logits of a one-chunk prefill, a chunked prefill followed by
 * decode, and several sequences mixed in one batch; accumulated attention
 * scores (row sums and per-slot values vs the reference); attention over a
 * compacted table; thread-count independence; plan validation; and the real
 * stories260K checkpoint (mapped by hand from its llama2.c file, skipped when
 * the asset is missing): teacher-forced NLL within 1e-4 of llama2.c's.
 * D2_FORWARD_BENCH=1 also runs a timing benchmark (prints, never asserts).
 */
#include <stdbool.h>
#include <stdint.h>

#include "common/status.h"
#include "common/util.h"
#include "engine/backend.h"
#include "engine/cpu/matmul.h"
#include "engine/model/rope.h"
#include "engine/ref/ref_cpu.h"
#include "kvpool/kvpool.h"
#include "tests/test.h"

/* ---- synthetic models --------------------------------------------------------- */

typedef struct synth_spec {
    int n_layers, dim, n_heads, n_kv, hd, ffn, vocab;
    eng_dtype dtype;
    bool neox, bias, tied;
    int scaling; /* 0 none, 1 llama3, 2 linear */
} synth_spec;

#define MAX_BUFS 256
typedef struct synth {
    eng_model m;
    eng_layer_weights layers[16];
    void *bufs[MAX_BUFS];
    int n_bufs;
    uint64_t rng;
} synth;

static float rnd(synth *s) {
    s->rng = s->rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((s->rng >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f; /* [-1, 1) */
}

static void *keep(synth *s, size_t bytes) {
    void *p = calloc(1, bytes);
    if (!p || s->n_bufs >= MAX_BUFS) FAIL_("alloc");
    s->bufs[s->n_bufs++] = p;
    return p;
}

/* Fills t with rows x cols values offset + scale * U(-1,1), stored as dtype. */
static void mk(synth *s, eng_tensor *t, int64_t rows, int64_t cols, eng_dtype dt, float offset,
               float scale) {
    size_t n = (size_t)rows * (size_t)cols;
    t->rows = rows;
    t->cols = cols;
    t->dtype = dt;
    t->name = "synthetic";
    if (dt == ENG_F32) {
        float *p = keep(s, n * 4);
        for (size_t i = 0; i < n; i++) p[i] = offset + scale * rnd(s);
        t->data = p;
    } else if (dt == ENG_F16 || dt == ENG_BF16) {
        uint16_t *p = keep(s, n * 2);
        for (size_t i = 0; i < n; i++) {
            float v = offset + scale * rnd(s);
            p[i] = dt == ENG_F16 ? d2_f32_to_f16(v) : d2_f32_to_bf16(v);
        }
        t->data = p;
    } else {
        uint8_t *p = keep(s, n / 32 * 34);
        for (size_t b = 0; b < n / 32; b++) {
            float v[32], amax = 0.0f;
            for (int j = 0; j < 32; j++) {
                v[j] = offset + scale * rnd(s);
                if (fabsf(v[j]) > amax) amax = fabsf(v[j]);
            }
            float d = amax / 127.0f;
            uint16_t dh = d2_f32_to_f16(d);
            memcpy(p + b * 34, &dh, 2);
            float dd = d2_f16_to_f32(dh);
            for (int j = 0; j < 32; j++) {
                float q = dd > 0.0f ? roundf(v[j] / dd) : 0.0f;
                if (q > 127.0f) q = 127.0f;
                if (q < -127.0f) q = -127.0f;
                ((int8_t *)(p + b * 34 + 2))[j] = (int8_t)q;
            }
        }
        t->data = p;
    }
}

static synth *synth_build(const synth_spec *sp, uint64_t seed) {
    synth *s = calloc(1, sizeof *s);
    ASSERT(s);
    s->rng = seed;
    eng_model *m = &s->m;
    eng_model_config *c = &m->cfg;
    c->arch = sp->bias ? ENG_ARCH_QWEN2 : ENG_ARCH_LLAMA;
    c->n_layers = sp->n_layers;
    c->dim = sp->dim;
    c->n_heads = sp->n_heads;
    c->n_kv_heads = sp->n_kv;
    c->head_dim = sp->hd;
    c->ffn_dim = sp->ffn;
    c->vocab_size = sp->vocab;
    c->max_ctx = 256;
    c->rope_theta = 10000.0f;
    c->rms_eps = 1e-5f;
    c->rope_neox = sp->neox;
    c->tied_embeddings = sp->tied;
    c->qkv_bias = sp->bias;
    c->bos_id = -1;
    if (sp->scaling == 1)
        c->rope_scaling = (eng_rope_scaling){1, 8.0f, 1.0f, 4.0f, 32};
    else if (sp->scaling == 2)
        c->rope_scaling = (eng_rope_scaling){2, 4.0f, 0.0f, 0.0f, 0};
    int qd = sp->n_heads * sp->hd, kvd = sp->n_kv * sp->hd;
    float ws = 1.0f / sqrtf((float)sp->dim) * 1.7f; /* keeps activations O(1) */
    mk(s, &m->tok_embd, sp->vocab, sp->dim, sp->dtype, 0.0f, 1.0f);
    mk(s, &m->out_norm, 1, sp->dim, ENG_F32, 1.0f, 0.2f);
    if (sp->tied) m->output = m->tok_embd;
    else mk(s, &m->output, sp->vocab, sp->dim, sp->dtype, 0.0f, ws);
    m->layers = s->layers;
    for (int l = 0; l < sp->n_layers; l++) {
        eng_layer_weights *w = &s->layers[l];
        mk(s, &w->attn_norm, 1, sp->dim, ENG_F32, 1.0f, 0.2f);
        /* larger Q/K weights make attention peaked, so positions matter */
        mk(s, &w->wq, qd, sp->dim, sp->dtype, 0.0f, ws * 2.0f);
        mk(s, &w->wk, kvd, sp->dim, sp->dtype, 0.0f, ws * 2.0f);
        mk(s, &w->wv, kvd, sp->dim, sp->dtype, 0.0f, ws);
        mk(s, &w->wo, sp->dim, qd, sp->dtype, 0.0f, 1.0f / sqrtf((float)qd));
        if (sp->bias) {
            mk(s, &w->bq, 1, qd, ENG_F32, 0.0f, 0.5f);
            mk(s, &w->bk, 1, kvd, ENG_F32, 0.0f, 0.5f);
            mk(s, &w->bv, 1, kvd, ENG_F32, 0.0f, 0.5f);
        }
        mk(s, &w->ffn_norm, 1, sp->dim, ENG_F32, 1.0f, 0.2f);
        mk(s, &w->w_gate, sp->ffn, sp->dim, sp->dtype, 0.0f, ws);
        mk(s, &w->w_up, sp->ffn, sp->dim, sp->dtype, 0.0f, ws);
        mk(s, &w->w_down, sp->dim, sp->ffn, sp->dtype, 0.0f, 1.0f / sqrtf((float)sp->ffn));
    }
    return s;
}

static void synth_free(synth *s) {
    for (int i = 0; i < s->n_bufs; i++) free(s->bufs[i]);
    free(s);
}

/* ---- harness ------------------------------------------------------------------ */


/* ---- the runtime's share of a step -------------------------------------------------
 * The engine (engine/step.c) reserves and appends every (seq, layer) of a plan
 * and records the positions before the backend step; these tests drive the
 * backend directly, so they do the same here. */

static int cpu_make(const eng_model *m, kvp_pool *pool, eng_backend_config *cc, eng_backend **be) {
    cc->max_seq_tokens = kvp_get_config(pool)->max_seq_tokens;
    cc->page_tokens = kvp_get_config(pool)->page_tokens;
    int rc = eng_cpu_backend_create(m, cc, be);
    if (rc != D2_OK) return rc;
    return (*be)->ops->kv_attach(*be, pool);
}

/* Reserve (all or nothing), append, positions, backend step; then the step's
 * logit rows copied into logits (may be NULL). */
static int plan_step(eng_backend *be, const eng_batch *b, float *logits) {
    kvp_pool *pool = be->pool;
    int pt = kvp_get_config(pool)->page_tokens, n_layers = kvp_get_config(pool)->n_layers;
    int64_t need = 0;
    for (int k = 0; k < b->n_seqs; k++) {
        int64_t pn = kvp_pages_needed_all_layers(pool, b->seqs[k].seq, b->seqs[k].n);
        if (pn < 0) return (int)pn;
        need += pn;
    }
    if (need > kvp_get_stats(pool).pages_free) return D2_EKVFULL;
    for (int k = 0; k < b->n_seqs; k++) {
        const eng_batch_seq *bs = &b->seqs[k];
        if (bs->start < 0 || bs->n <= 0 || bs->start + bs->n > b->n_tokens)
            return be->ops->step(be, b); /* malformed: let the backend say so */
        int rc = kvp_reserve_all_layers(pool, bs->seq, bs->n);
        if (rc != D2_OK) return rc;
        for (int l = 0; l < n_layers; l++) {
            int first = kvp_append(pool, bs->seq, l, bs->n);
            if (first < 0) return first;
            kvp_table t = kvp_get_table(pool, bs->seq, l);
            for (int j = 0; j < bs->n; j++) {
                int32_t page;
                int slot;
                kvp_locate(&t, pt, first + j, &page, &slot);
                kvp_pos_base(pool)[(size_t)page * (size_t)pt + (size_t)slot] = b->pos[bs->start + j];
            }
        }
    }
    int rc = be->ops->step(be, b);
    int rows = eng_batch_out_rows(b);
    if (rc == D2_OK && logits && rows > 0) {
        const float *lg;
        rc = be->ops->logits(be, 0, rows, &lg);
        if (rc == D2_OK)
            memcpy(logits, lg, sizeof(float) * (size_t)rows * (size_t)be->model->cfg.vocab_size);
    }
    return rc;
}

/* Accumulated score of live slot i of (seq, layer), KV head g. */
static double slot_score(eng_backend *be, int seq, int layer, int i, int g) {
    float sc[64];
    ASSERT_EQ(be->ops->read_slot(be, seq, layer, i, NULL, NULL, sc), D2_OK);
    return sc[g];
}

enum { PT = 4, MAX_TOK = 96, MAX_SEQS = 4, MAX_BATCH = 64 };

typedef struct rig {
    synth *s;
    kvp_pool *pool;
    eng_backend *be;
    int vocab;
} rig;

static rig rig_make(const synth_spec *sp, uint64_t seed, int n_threads) {
    rig r = {0};
    r.s = synth_build(sp, seed);
    r.vocab = sp->vocab;
    kvp_config pc = {.n_layers = sp->n_layers, .n_kv_heads = sp->n_kv, .head_dim = sp->hd,
                     .page_tokens = PT, .n_pages = 512, .max_seqs = MAX_SEQS,
                     .max_seq_tokens = MAX_TOK};
    ASSERT_EQ(kvp_create(&pc, &r.pool), D2_OK);
    eng_backend_config cc = {.n_threads = n_threads, .max_batch_tokens = MAX_BATCH,
                         .max_logit_rows = MAX_BATCH};
    ASSERT_EQ(cpu_make(&r.s->m, r.pool, &cc, &r.be), D2_OK);
    return r;
}

static void rig_free(rig *r) {
    r->be->ops->destroy(r->be);
    kvp_destroy(r->pool);
    synth_free(r->s);
}

/* Reference logits for a token sequence: out[pos][vocab]. */
static float *ref_logits(const eng_model *m, const int32_t *toks, int n) {
    eng_ref_state *st;
    ASSERT_EQ(eng_ref_create(m, MAX_TOK, &st), D2_OK);
    float *out = malloc(sizeof(float) * (size_t)n * (size_t)m->cfg.vocab_size);
    for (int p = 0; p < n; p++)
        ASSERT_EQ(eng_ref_forward(st, toks[p], p, out + (size_t)p * (size_t)m->cfg.vocab_size), D2_OK);
    eng_ref_free(st);
    return out;
}

/* max |a-b| / max(1, max|b|) over one row */
static double rel_diff(const float *a, const float *b, int n) {
    double md = 0.0, mb = 1.0;
    for (int i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > md) md = d;
        if (fabs((double)b[i]) > mb) mb = fabs((double)b[i]);
    }
    return md / mb;
}

#define TOL 1e-4

static void rand_tokens(uint64_t seed, int32_t *t, int n, int vocab) {
    for (int i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        t[i] = (int32_t)((seed >> 33) % (uint64_t)vocab);
    }
}

/* One step of a single sequence: tokens toks[p0 .. p0+n) at positions p0... */
static int step_one(rig *r, int seq, const int32_t *toks, int p0, int n, bool all, bool scores,
                    float *logits) {
    int32_t pos[MAX_BATCH];
    for (int i = 0; i < n; i++) pos[i] = p0 + i;
    eng_batch_seq bs = {.seq = seq, .start = 0, .n = n, .want_scores = scores,
                        .want_logits = true, .all_logits = all};
    eng_batch b = {.n_tokens = n, .tokens = toks + p0, .pos = pos, .n_seqs = 1, .seqs = &bs};
    return plan_step(r->be, &b, logits);
}

static const synth_spec SPECS[] = {
    /* GQA 4q/2kv, f32, neox */
    {2, 64, 4, 2, 16, 96, 97, ENG_F32, true, false, false, 0},
    /* MHA, head_dim 8, qkv bias, tied output, adjacent pairs, f16 */
    {2, 32, 4, 4, 8, 64, 61, ENG_F16, false, true, true, 0},
    /* head_dim 64, 2q/1kv, llama3 scaling, bf16 */
    {2, 128, 2, 1, 64, 160, 83, ENG_BF16, true, false, false, 1},
    /* q8_0, linear scaling, 2q/2kv head_dim 32, adjacent pairs, bias */
    {1, 64, 2, 2, 32, 96, 64, ENG_Q8_0, false, true, false, 2},
    /* f32, GQA 8q/2kv, head_dim 8, tied, llama3 */
    {3, 64, 8, 2, 8, 128, 50, ENG_F32, false, false, true, 1},
};
#define N_SPECS ((int)(sizeof SPECS / sizeof SPECS[0]))

/* Tolerance against the f32 reference for spec si: TOL, or 2.5e-2 where the
 * GEMM kernel for its dtype rounds the activations (bf16, or int8 per block;
 * engine/cpu/matmul.h): one rounding of 2^-8 relative per activation and
 * GEMM, compounded over the layers, measured at <= 0.9e-2 on these specs. */
static double spec_tol(int si) {
    const char *k = eng_mm_kernel_name(SPECS[si].dtype);
    size_t n = strlen(k);
    if ((n >= 6 && !strcmp(k + n - 6, "bf16dp")) || (n >= 4 && !strcmp(k + n - 4, "vnni"))) return 2.5e-2;
    return TOL;
}

/* ---- tests ---------------------------------------------------------------------- */

TEST(rope_llama3_inv_freq) {
    /* Hand-checked bands: hd 8 -> base freqs 1, 0.1, 0.01, 0.001 (theta 10^4).
     * orig 32, low 1, high 4: wavelengths 6.28 (< 8 keep), 62.8 (between 8 and
     * 32? no: > 32 -> /factor), 628, 6283 (/factor). */
    eng_model_config c = {0};
    c.head_dim = 8;
    c.rope_theta = 10000.0f;
    c.rope_scaling = (eng_rope_scaling){1, 8.0f, 1.0f, 4.0f, 32};
    float f[4];
    eng_rope_inv_freq(&c, f);
    ASSERT_NEAR(f[0], 1.0, 1e-6);
    ASSERT_NEAR(f[1], 0.1 / 8, 1e-7);
    ASSERT_NEAR(f[2], 0.01 / 8, 1e-8);
    /* a medium band: orig 256 -> low_wl 256, high_wl 64: wl 62.8 keeps,
     * 628 > 256 divides; with orig 100: high_wl 25, low_wl 100 -> 62.8 smooth */
    c.rope_scaling.original_max_pos = 100;
    eng_rope_inv_freq(&c, f);
    double wl = 2.0 * M_PI / 0.1, sm = (100.0 / wl - 1.0) / (4.0 - 1.0);
    ASSERT_NEAR(f[1], (1.0 - sm) * 0.1 / 8 + sm * 0.1, 1e-7);
    c.rope_scaling = (eng_rope_scaling){2, 4.0f, 0, 0, 0};
    eng_rope_inv_freq(&c, f);
    ASSERT_NEAR(f[1], 0.1 / 4, 1e-7);
}

/* The backend's vectorised row conversion agrees with the loader's
 * reference dequantiser (eng_tensor_row_f32) bit for bit, for every dtype. */
TEST(row_conversion_matches_loader) {
    eng_dtype dts[4] = {ENG_F32, ENG_F16, ENG_BF16, ENG_Q8_0};
    for (int k = 0; k < 4; k++) {
        synth *s = calloc(1, sizeof *s);
        s->rng = 42 + (uint64_t)k;
        eng_tensor t;
        mk(s, &t, 5, 96, dts[k], 0.1f, 3.0f);
        float a[96], b[96];
        for (int r = 0; r < 5; r++) {
            eng_tensor_row_f32(&t, r, a);
            eng_mm_row_f32(&t, r, b);
            ASSERT_EQ(memcmp(a, b, sizeof a), 0);
        }
        synth_free(s);
    }
}

TEST(prefill_one_chunk_matches_reference) {
    for (int si = 0; si < N_SPECS; si++) {
        rig r = rig_make(&SPECS[si], 100 + (uint64_t)si, 2);
        int n = 23;
        int32_t toks[64];
        rand_tokens(7 + (uint64_t)si, toks, n, r.vocab);
        float *ref = ref_logits(&r.s->m, toks, n);
        float *got = malloc(sizeof(float) * (size_t)n * (size_t)r.vocab);
        int seq;
        ASSERT_EQ(kvp_seq_new(r.pool, &seq), D2_OK);
        ASSERT_EQ(step_one(&r, seq, toks, 0, n, true, false, got), D2_OK);
        double worst = 0.0;
        for (int p = 0; p < n; p++) {
            double d = rel_diff(got + (size_t)p * (size_t)r.vocab, ref + (size_t)p * (size_t)r.vocab, r.vocab);
            if (d > worst) worst = d;
        }
        if (!(worst < spec_tol(si))) FAIL_("spec %d: rel diff %g", si, worst);
        ASSERT_EQ(kvp_check(r.pool), D2_OK);
        free(ref);
        free(got);
        rig_free(&r);
    }
}

/* Mistral's sliding window: a window of 5 over 23 tokens, prefill in chunks
 * of 7 then decode; the backend and the reference must agree, and must
 * differ from the same model without the window (so the test can fail). */
TEST(sliding_window_matches_reference) {
    rig r = rig_make(&SPECS[0], 300, 2);
    r.s->m.cfg.sliding_window = 5;
    eng_backend *be2 = NULL;
    /* the backend reads the window at create: rebuild it */
    r.be->ops->destroy(r.be);
    eng_backend_config cc = {.n_threads = 2, .max_batch_tokens = 64, .max_logit_rows = 64};
    ASSERT_OK(cpu_make(&r.s->m, r.pool, &cc, &be2));
    r.be = be2;
    int n = 23;
    int32_t toks[64];
    rand_tokens(31, toks, n, r.vocab);
    float *ref = ref_logits(&r.s->m, toks, n);
    float *got = malloc(sizeof(float) * (size_t)n * (size_t)r.vocab);
    int seq;
    ASSERT_EQ(kvp_seq_new(r.pool, &seq), D2_OK);
    for (int p0 = 0; p0 < 14; p0 += 7)
        ASSERT_EQ(step_one(&r, seq, toks, p0, 7, true, false, got + (size_t)p0 * (size_t)r.vocab), D2_OK);
    for (int p0 = 14; p0 < n; p0++)
        ASSERT_EQ(step_one(&r, seq, toks, p0, 1, true, false, got + (size_t)p0 * (size_t)r.vocab), D2_OK);
    for (int p = 0; p < n; p++) {
        double d = rel_diff(got + (size_t)p * (size_t)r.vocab, ref + (size_t)p * (size_t)r.vocab, r.vocab);
        if (!(d < TOL)) FAIL_("pos %d: rel diff %g", p, d);
    }
    r.s->m.cfg.sliding_window = 0;
    float *full = ref_logits(&r.s->m, toks, n);
    ASSERT(rel_diff(full + (size_t)(n - 1) * (size_t)r.vocab, ref + (size_t)(n - 1) * (size_t)r.vocab, r.vocab) > 1e-3);
    free(full);
    free(ref);
    free(got);
    rig_free(&r);
}

TEST(chunked_prefill_then_decode_matches_reference) {
    for (int si = 0; si < N_SPECS; si++) {
        rig r = rig_make(&SPECS[si], 200 + (uint64_t)si, 2);
        int n = 30;
        int32_t toks[64];
        rand_tokens(11 + (uint64_t)si, toks, n, r.vocab);
        float *ref = ref_logits(&r.s->m, toks, n);
        float *got = malloc(sizeof(float) * (size_t)n * (size_t)r.vocab);
        int seq;
        ASSERT_EQ(kvp_seq_new(r.pool, &seq), D2_OK);
        int chunks[] = {7, 5, 1, 3};
        int p = 0;
        for (int c = 0; c < 4; c++) {
            ASSERT_EQ(step_one(&r, seq, toks, p, chunks[c], true, false,
                               got + (size_t)p * (size_t)r.vocab), D2_OK);
            p += chunks[c];
        }
        for (; p < n; p++)
            ASSERT_EQ(step_one(&r, seq, toks, p, 1, false, false, got + (size_t)p * (size_t)r.vocab), D2_OK);
        for (p = 0; p < n; p++) {
            double d = rel_diff(got + (size_t)p * (size_t)r.vocab, ref + (size_t)p * (size_t)r.vocab, r.vocab);
            if (!(d < spec_tol(si))) FAIL_("spec %d pos %d: rel diff %g", si, p, d);
        }
        kvp_table t = kvp_get_table(r.pool, seq, 0);
        ASSERT_EQ(t.n_tokens, n);
        free(ref);
        free(got);
        rig_free(&r);
    }
}

TEST(mixed_batch_matches_reference) {
    for (int si = 0; si < N_SPECS; si++) {
        rig r = rig_make(&SPECS[si], 300 + (uint64_t)si, 2);
        enum { NS = 3, LEN = 40 };
        int32_t toks[NS][LEN];
        float *ref[NS];
        int seq[NS], done[NS] = {0};
        for (int k = 0; k < NS; k++) {
            rand_tokens(1000 + (uint64_t)(si * 10 + k), toks[k], LEN, r.vocab);
            ref[k] = ref_logits(&r.s->m, toks[k], LEN);
            ASSERT_EQ(kvp_seq_new(r.pool, &seq[k]), D2_OK);
        }
        /* Plan per step: how many tokens each sequence contributes (0 = idle). */
        int plan[][NS] = {{9, 0, 0}, {1, 6, 0}, {1, 1, 11}, {1, 4, 1}, {1, 1, 1},
                          {5, 1, 1}, {1, 1, 1}, {1, 1, 2}};
        float *logits = malloc(sizeof(float) * MAX_BATCH * (size_t)r.vocab);
        for (size_t st = 0; st < sizeof plan / sizeof plan[0]; st++) {
            int32_t bt[MAX_BATCH], bp[MAX_BATCH];
            eng_batch_seq bs[NS];
            int nt = 0, ns = 0;
            for (int k = 0; k < NS; k++) {
                int n = plan[st][k];
                if (!n) continue;
                /* sequence 1 asks for all rows, the others for the last one */
                bs[ns++] = (eng_batch_seq){.seq = seq[k], .start = nt, .n = n,
                                           .want_logits = true, .all_logits = k == 1};
                for (int j = 0; j < n; j++) {
                    bt[nt] = toks[k][done[k] + j];
                    bp[nt] = done[k] + j;
                    nt++;
                }
            }
            eng_batch b = {.n_tokens = nt, .tokens = bt, .pos = bp, .n_seqs = ns, .seqs = bs};
            ASSERT_EQ(eng_batch_out_rows(&b), ns + (plan[st][1] ? plan[st][1] - 1 : 0));
            ASSERT_EQ(plan_step(r.be, &b, logits), D2_OK);
            int row = 0;
            for (int k = 0; k < NS; k++) {
                int n = plan[st][k];
                if (!n) continue;
                int first = k == 1 ? 0 : n - 1;
                for (int j = first; j < n; j++, row++) {
                    int p = done[k] + j;
                    double d = rel_diff(logits + (size_t)row * (size_t)r.vocab,
                                        ref[k] + (size_t)p * (size_t)r.vocab, r.vocab);
                    if (!(d < spec_tol(si))) FAIL_("spec %d step %zu seq %d pos %d: rel diff %g", si, st, k, p, d);
                }
                done[k] += n;
            }
        }
        ASSERT_EQ(kvp_check(r.pool), D2_OK);
        for (int k = 0; k < NS; k++) free(ref[k]);
        free(logits);
        rig_free(&r);
    }
}

/* Scores: prefill in one chunk + decode, all with want_scores; compare each
 * slot's accumulated score with the reference's summed probabilities, and
 * each kv head's total with (query tokens x heads per group). */
TEST(scores_match_reference) {
    for (int si = 0; si < N_SPECS; si++) {
        const synth_spec *sp = &SPECS[si];
        rig r = rig_make(sp, 400 + (uint64_t)si, 2);
        enum { NPRE = 10, N = 15 };
        int32_t toks[N];
        rand_tokens(77 + (uint64_t)si, toks, N, r.vocab);
        int L = sp->n_layers, nkv = sp->n_kv, gs = sp->n_heads / sp->n_kv;
        double *expect = calloc((size_t)L * (size_t)nkv * N, sizeof(double));
        eng_ref_state *st;
        ASSERT_EQ(eng_ref_create(&r.s->m, MAX_TOK, &st), D2_OK);
        for (int p = 0; p < N; p++) {
            ASSERT_EQ(eng_ref_forward(st, toks[p], p, NULL), D2_OK);
            for (int l = 0; l < L; l++)
                for (int h = 0; h < sp->n_heads; h++) {
                    const float *a = eng_ref_att(st, l, h);
                    for (int j = 0; j <= p; j++) expect[((size_t)l * (size_t)nkv + (size_t)(h / gs)) * N + (size_t)j] += a[j];
                }
        }
        eng_ref_free(st);
        float *lg = malloc(sizeof(float) * (size_t)r.vocab * N);
        int seq;
        ASSERT_EQ(kvp_seq_new(r.pool, &seq), D2_OK);
        ASSERT_EQ(step_one(&r, seq, toks, 0, NPRE, false, true, lg), D2_OK);
        /* after the prefill alone: each kv head's total = NPRE * gs */
        for (int l = 0; l < L; l++) {
            kvp_table t = kvp_get_table(r.pool, seq, l);
            ASSERT_EQ(t.n_tokens, NPRE);
            for (int g = 0; g < nkv; g++) {
                double tot = 0.0;
                for (int i = 0; i < t.n_tokens; i++) {
                    int32_t page;
                    int slot;
                    kvp_locate(&t, PT, i, &page, &slot);
                    tot += slot_score(r.be, seq, l, i, g);
                }
                ASSERT_NEAR(tot, (double)(NPRE * gs), 1e-4);
            }
        }
        for (int p = NPRE; p < N; p++) ASSERT_EQ(step_one(&r, seq, toks, p, 1, false, true, lg), D2_OK);
        const int32_t *pos = kvp_pos_base(r.pool);
        for (int l = 0; l < L; l++) {
            kvp_table t = kvp_get_table(r.pool, seq, l);
            ASSERT_EQ(t.n_tokens, N);
            for (int g = 0; g < nkv; g++) {
                double tot = 0.0;
                for (int i = 0; i < N; i++) {
                    int32_t page;
                    int slot;
                    kvp_locate(&t, PT, i, &page, &slot);
                    ASSERT_EQ(pos[(size_t)page * PT + (size_t)slot], i);
                    double got = slot_score(r.be, seq, l, i, g);
                    double want = expect[((size_t)l * (size_t)nkv + (size_t)g) * N + (size_t)i];
                    if (!(fabs(got - want) < spec_tol(si) * fmax(1.0, fabs(want))))
                        FAIL_("spec %d layer %d kv %d slot %d: score %g want %g", si, l, g, i, got, want);
                    tot += got;
                }
                ASSERT_NEAR(tot, (double)(N * gs), 1e-4);
            }
        }
        free(expect);
        free(lg);
        rig_free(&r);
    }
}

/* A table compacted by kvp_compact (as D2O eviction does): attention must use
 * only the live slots and their recorded positions. The reference evicts the
 * same positions per layer. */
TEST(compacted_table_matches_reference) {
    for (int si = 0; si < N_SPECS; si++) {
        const synth_spec *sp = &SPECS[si];
        rig r = rig_make(sp, 500 + (uint64_t)si, 2);
        enum { NPRE = 14, N = 22 };
        int32_t toks[N];
        rand_tokens(99 + (uint64_t)si, toks, N, r.vocab);
        float *lg = malloc(sizeof(float) * (size_t)r.vocab * N);
        float *want = malloc(sizeof(float) * (size_t)r.vocab);
        eng_ref_state *st;
        ASSERT_EQ(eng_ref_create(&r.s->m, MAX_TOK, &st), D2_OK);
        for (int p = 0; p < NPRE; p++) ASSERT_EQ(eng_ref_forward(st, toks[p], p, NULL), D2_OK);
        int seq;
        ASSERT_EQ(kvp_seq_new(r.pool, &seq), D2_OK);
        ASSERT_EQ(step_one(&r, seq, toks, 0, NPRE, false, false, lg), D2_OK);
        /* drop different positions per layer (including ones across a page) */
        for (int l = 0; l < sp->n_layers; l++) {
            uint8_t keepm[NPRE];
            int kept = 0;
            for (int i = 0; i < NPRE; i++) {
                keepm[i] = !((i + l) % 3 == 1) || i == NPRE - 1;
                if (!keepm[i]) eng_ref_evict(st, l, i);
                kept += keepm[i];
            }
            ASSERT_EQ(kvp_compact(r.pool, seq, l, keepm), kept);
        }
        for (int p = NPRE; p < N; p++) {
            ASSERT_EQ(eng_ref_forward(st, toks[p], p, want), D2_OK);
            ASSERT_EQ(step_one(&r, seq, toks, p, 1, false, false, lg), D2_OK);
            double d = rel_diff(lg, want, r.vocab);
            if (!(d < spec_tol(si))) FAIL_("spec %d pos %d: rel diff %g", si, p, d);
        }
        ASSERT_EQ(kvp_check(r.pool), D2_OK);
        eng_ref_free(st);
        free(lg);
        free(want);
        rig_free(&r);
    }
}

/* Evicting changes the result (so the test above can fail). */
TEST(compaction_changes_logits) {
    rig r = rig_make(&SPECS[0], 600, 2);
    int32_t toks[12];
    rand_tokens(5, toks, 12, r.vocab);
    float *a = malloc(sizeof(float) * (size_t)r.vocab), *b = malloc(sizeof(float) * (size_t)r.vocab);
    int s1, s2;
    ASSERT_EQ(kvp_seq_new(r.pool, &s1), D2_OK);
    ASSERT_EQ(kvp_seq_new(r.pool, &s2), D2_OK);
    ASSERT_EQ(step_one(&r, s1, toks, 0, 11, false, false, a), D2_OK);
    ASSERT_EQ(step_one(&r, s2, toks, 0, 11, false, false, b), D2_OK);
    uint8_t keepm[11] = {1, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1};
    for (int l = 0; l < SPECS[0].n_layers; l++) ASSERT_GE(kvp_compact(r.pool, s2, l, keepm), 0);
    ASSERT_EQ(step_one(&r, s1, toks, 11, 1, false, false, a), D2_OK);
    ASSERT_EQ(step_one(&r, s2, toks, 11, 1, false, false, b), D2_OK);
    ASSERT(rel_diff(a, b, r.vocab) > 1e-3);
    free(a);
    free(b);
    rig_free(&r);
}

TEST(thread_count_does_not_change_results) {
    const synth_spec *sp = &SPECS[2];
    int32_t toks[20];
    float *out[3];
    int threads[3] = {1, 2, 3};
    for (int k = 0; k < 3; k++) {
        rig r = rig_make(sp, 700, threads[k]);
        rand_tokens(3, toks, 20, r.vocab);
        out[k] = malloc(sizeof(float) * (size_t)r.vocab * 20);
        int seq;
        ASSERT_EQ(kvp_seq_new(r.pool, &seq), D2_OK);
        ASSERT_EQ(step_one(&r, seq, toks, 0, 17, true, true, out[k]), D2_OK);
        ASSERT_EQ(step_one(&r, seq, toks, 17, 1, false, true, out[k] + (size_t)17 * (size_t)r.vocab), D2_OK);
        rig_free(&r);
    }
    for (int k = 1; k < 3; k++)
        ASSERT_EQ(memcmp(out[0], out[k], sizeof(float) * (size_t)sp->vocab * 18), 0);
    for (int k = 0; k < 3; k++) free(out[k]);
}

TEST(bad_plans_rejected) {
    rig r = rig_make(&SPECS[0], 800, 2);
    int seq;
    ASSERT_EQ(kvp_seq_new(r.pool, &seq), D2_OK);
    int32_t toks[4] = {1, 2, 3, 4}, pos[4] = {0, 1, 2, 3};
    float *lg = malloc(sizeof(float) * 4 * (size_t)r.vocab);
    eng_batch_seq bs = {.seq = seq, .start = 0, .n = 4, .want_logits = true};
    eng_batch b = {.n_tokens = 4, .tokens = toks, .pos = pos, .n_seqs = 1, .seqs = &bs};
    bs.n = 3; /* does not cover the batch */
    ASSERT_EQ(plan_step(r.be, &b, lg), D2_EINVAL);
    bs.n = 4;
    toks[2] = r.vocab; /* token out of range */
    ASSERT_EQ(plan_step(r.be, &b, lg), D2_EINVAL);
    toks[2] = 3;
    b.n_tokens = MAX_BATCH + 1;
    ASSERT_EQ(plan_step(r.be, &b, lg), D2_EINVAL);
    ASSERT(strstr(r.be->ops->last_error(r.be), "step") != NULL); /* the failing call is named */
    b.n_tokens = 4;
    ASSERT_EQ(plan_step(r.be, &b, lg), D2_OK);
    free(lg);
    rig_free(&r);
}

/* The seam's other operations: caps, logits rows, argmax where the logits are,
 * and the bounds they check. */
TEST(backend_caps_logits_argmax) {
    const synth_spec *sp = &SPECS[0];
    rig r = rig_make(sp, 850, 2);
    eng_backend_caps caps;
    r.be->ops->caps(r.be, &caps);
    ASSERT(strcmp(caps.name, "cpu") == 0);
    ASSERT_EQ(caps.kv_dtype, ENG_KV_DT_F32);
    ASSERT(!caps.kv_on_device);
    ASSERT_EQ(caps.kv_bytes_per_slot,
              (size_t)(2 * sp->n_kv * sp->hd + sp->n_kv) * sizeof(float) + (size_t)sp->n_kv * sizeof(int32_t));
    int seq;
    ASSERT_EQ(kvp_seq_new(r.pool, &seq), D2_OK);
    int32_t toks[6];
    rand_tokens(9, toks, 6, r.vocab);
    float *lg = malloc(sizeof(float) * 6 * (size_t)r.vocab);
    ASSERT_EQ(step_one(&r, seq, toks, 0, 6, true, false, lg), D2_OK);
    int rows[6] = {5, 0, 3, 1, 4, 2};
    int32_t am[6];
    ASSERT_EQ(r.be->ops->argmax(r.be, rows, 6, am), D2_OK);
    for (int i = 0; i < 6; i++) {
        const float *row = lg + (size_t)rows[i] * (size_t)r.vocab;
        int best = 0;
        for (int v = 1; v < r.vocab; v++)
            if (row[v] > row[best]) best = v;
        ASSERT_EQ(am[i], best);
    }
    const float *out;
    ASSERT_EQ(r.be->ops->logits(r.be, 2, 3, &out), D2_OK);
    ASSERT_EQ(memcmp(out, lg + 2 * (size_t)r.vocab, sizeof(float) * 3 * (size_t)r.vocab), 0);
    ASSERT_EQ(r.be->ops->logits(r.be, 4, 3, &out), D2_EINVAL); /* past the step's 6 rows */
    rows[0] = 6;
    ASSERT_EQ(r.be->ops->argmax(r.be, rows, 1, am), D2_EINVAL);
    ASSERT(strstr(r.be->ops->last_error(r.be), "argmax") != NULL);
    ASSERT_EQ(r.be->ops->sync(r.be), D2_OK);
    ASSERT_EQ(r.be->ops->kv_attach(r.be, r.pool), D2_EINVAL); /* once only */
    free(lg);
    rig_free(&r);
}

TEST(pool_full_reports_ekvfull) {
    synth_spec sp = SPECS[0];
    synth *s = synth_build(&sp, 900);
    kvp_config pc = {.n_layers = sp.n_layers, .n_kv_heads = sp.n_kv, .head_dim = sp.hd,
                     .page_tokens = PT, .n_pages = 3, .max_seqs = 2, .max_seq_tokens = 64};
    kvp_pool *pool;
    ASSERT_EQ(kvp_create(&pc, &pool), D2_OK);
    eng_backend_config cc = {.n_threads = 1, .max_batch_tokens = 16, .max_logit_rows = 1};
    eng_backend *be;
    ASSERT_EQ(cpu_make(&s->m, pool, &cc, &be), D2_OK);
    int seq;
    ASSERT_EQ(kvp_seq_new(pool, &seq), D2_OK);
    int32_t toks[12] = {0}, pos[12];
    for (int i = 0; i < 12; i++) pos[i] = i;
    float *lg = malloc(sizeof(float) * (size_t)sp.vocab);
    eng_batch_seq bs = {.seq = seq, .start = 0, .n = 12, .want_logits = true};
    eng_batch b = {.n_tokens = 12, .tokens = toks, .pos = pos, .n_seqs = 1, .seqs = &bs};
    int64_t free0 = kvp_get_stats(pool).pages_free;
    ASSERT_EQ(plan_step(be, &b, lg), D2_EKVFULL);
    /* no effect: nothing appended, no page taken */
    ASSERT_EQ(kvp_get_stats(pool).pages_free, free0);
    for (int l = 0; l < sp.n_layers; l++) ASSERT_EQ(kvp_get_table(pool, seq, l).n_tokens, 0);
    ASSERT_EQ(kvp_check(pool), D2_OK);
    /* a step that fits (one page per layer) still works */
    bs.n = 4;
    b.n_tokens = 4;
    ASSERT_EQ(plan_step(be, &b, lg), D2_OK);
    ASSERT_EQ(kvp_get_table(pool, seq, 1).n_tokens, 4);
    free(lg);
    be->ops->destroy(be);
    kvp_destroy(pool);
    synth_free(s);
}

/* ---- stories260K vs llama2.c (teacher-forced NLL) ------------------------------ */

/* Parses the number array after "key": [ in json into out (at most max). */
static int json_array(const char *json, const char *key, double *out, int max) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\": [", key);
    const char *p = strstr(json, pat);
    if (!p) return -1;
    p += strlen(pat);
    int n = 0;
    while (*p && *p != ']' && n < max) {
        char *end;
        out[n++] = strtod(p, &end);
        if (end == p) return -1;
        p = end;
        while (*p == ',' || *p == ' ' || *p == '\n') p++;
    }
    return n;
}

/* Maps stories260K.bin (llama2.c legacy layout, SOURCES.md 1.1) into an
 * eng_model by hand; tensors point into the mapping. */
static void stories_model(d2_mmap *mp, eng_model *m, eng_layer_weights *lw) {
    const int32_t *h = (const int32_t *)mp->data;
    int dim = h[0], hid = h[1], L = h[2], nh = h[3], nkv = h[4], vocab = h[5];
    ASSERT(vocab > 0 && L <= 8);
    int hs = dim / nh, kvd = dim * nkv / nh;
    memset(m, 0, sizeof *m);
    memset(lw, 0, sizeof(eng_layer_weights) * (size_t)L);
    eng_model_config *c = &m->cfg;
    c->n_layers = L;
    c->dim = dim;
    c->n_heads = nh;
    c->n_kv_heads = nkv;
    c->head_dim = hs;
    c->ffn_dim = hid;
    c->vocab_size = vocab;
    c->max_ctx = h[6];
    c->rope_theta = 10000.0f;
    c->rms_eps = 1e-5f;
    c->rope_neox = false;
    c->tied_embeddings = true;
    const float *w = (const float *)(mp->data + 28);
#define T2(t, r, cc) (t) = (eng_tensor){w, ENG_F32, (r), (cc), "stories"}, w += (size_t)(r) * (size_t)(cc)
    T2(m->tok_embd, vocab, dim);
    for (int l = 0; l < L; l++) T2(lw[l].attn_norm, 1, dim);
    for (int l = 0; l < L; l++) T2(lw[l].wq, dim, dim);
    for (int l = 0; l < L; l++) T2(lw[l].wk, kvd, dim);
    for (int l = 0; l < L; l++) T2(lw[l].wv, kvd, dim);
    for (int l = 0; l < L; l++) T2(lw[l].wo, dim, dim);
    for (int l = 0; l < L; l++) T2(lw[l].ffn_norm, 1, dim);
    for (int l = 0; l < L; l++) T2(lw[l].w_gate, hid, dim);
    for (int l = 0; l < L; l++) T2(lw[l].w_down, dim, hid);
    for (int l = 0; l < L; l++) T2(lw[l].w_up, hid, dim);
    T2(m->out_norm, 1, dim);
#undef T2
    m->output = m->tok_embd;
    m->layers = lw;
}

static double nll_of(const float *logits, int vocab, int target) {
    double mx = -1e300, sum = 0.0;
    for (int i = 0; i < vocab; i++) if (logits[i] > mx) mx = logits[i];
    for (int i = 0; i < vocab; i++) sum += exp((double)logits[i] - mx);
    return -((double)logits[target] - mx - log(sum));
}

TEST(stories260k_nll_matches_llama2c) {
    const char *bin = test_shared_path("assets/models/stories260K/stories260K.bin");
    const char *ref = test_shared_path("assets/models/stories260K/reference/teacher_forced_nll.json");
    REQUIRE_FILE(bin);
    REQUIRE_FILE(ref);
    char *json;
    size_t jlen;
    ASSERT_EQ(d2_read_file(ref, &json, &jlen), D2_OK);
    static double ids_d[1024], nll[1024];
    int n_ids = json_array(json, "ids", ids_d, 1024);
    int n_nll = json_array(json, "nll", nll, 1024);
    free(json);
    ASSERT_GT(n_ids, 100);
    ASSERT_EQ(n_nll, n_ids - 1);
    int32_t ids[1024];
    for (int i = 0; i < n_ids; i++) ids[i] = (int32_t)ids_d[i];
    d2_mmap mp;
    ASSERT_EQ(d2_mmap_open(bin, &mp), D2_OK);
    eng_model m;
    eng_layer_weights lw[8];
    stories_model(&mp, &m, lw);
    const eng_model_config *c = &m.cfg;
    kvp_config pc = {.n_layers = c->n_layers, .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim,
                     .page_tokens = 16, .n_pages = 256, .max_seqs = 2, .max_seq_tokens = 512};
    kvp_pool *pool;
    ASSERT_EQ(kvp_create(&pc, &pool), D2_OK);
    eng_backend_config cc = {.n_threads = 2, .max_batch_tokens = 64, .max_logit_rows = 64};
    eng_backend *be;
    ASSERT_EQ(cpu_make(&m, pool, &cc, &be), D2_OK);
    int seq;
    ASSERT_EQ(kvp_seq_new(pool, &seq), D2_OK);
    float *lg = malloc(sizeof(float) * 64 * (size_t)c->vocab_size);
    int32_t pos[64];
    double worst = 0.0, sum = 0.0, sum_ref = 0.0;
    int n_pred = n_ids - 1;
    for (int p0 = 0; p0 < n_pred; p0 += 64) {
        int n = n_pred - p0 < 64 ? n_pred - p0 : 64;
        for (int j = 0; j < n; j++) pos[j] = p0 + j;
        eng_batch_seq bs = {.seq = seq, .start = 0, .n = n, .want_scores = true, .all_logits = true};
        eng_batch b = {.n_tokens = n, .tokens = ids + p0, .pos = pos, .n_seqs = 1, .seqs = &bs};
        ASSERT_EQ(plan_step(be, &b, lg), D2_OK);
        for (int j = 0; j < n; j++) {
            double v = nll_of(lg + (size_t)j * (size_t)c->vocab_size, c->vocab_size, ids[p0 + j + 1]);
            double d = fabs(v - nll[p0 + j]);
            if (d > worst) worst = d;
            sum += v;
            sum_ref += nll[p0 + j];
        }
    }
    printf("  stories260K: %d predictions, max |dnll| %.2g, sum_nll %.6f (llama2.c %.6f)\n", n_pred,
           worst, sum, sum_ref);
    ASSERT(worst < 1e-4);
    ASSERT_NEAR(exp(sum / n_pred), exp(sum_ref / n_pred), 1e-4);
    /* the reference forward agrees too (first 64 positions) */
    eng_ref_state *st;
    ASSERT_EQ(eng_ref_create(&m, 512, &st), D2_OK);
    for (int p = 0; p < 64; p++) {
        ASSERT_EQ(eng_ref_forward(st, ids[p], p, lg), D2_OK);
        ASSERT_NEAR(nll_of(lg, c->vocab_size, ids[p + 1]), nll[p], 1e-4);
    }
    eng_ref_free(st);
    free(lg);
    be->ops->destroy(be);
    kvp_destroy(pool);
    d2_mmap_close(&mp);
}

/* ---- optional benchmark (D2_FORWARD_BENCH=1): prints, never asserts ---------- */

static double bench_bw_gbs(void) {
    size_t n = (size_t)256 << 20;
    char *a = malloc(n), *b = malloc(n);
    memset(a, 1, n);
    memset(b, 2, n);
    double best = 1e30;
    for (int k = 0; k < 3; k++) {
        double t0 = d2_now();
        memcpy(b, a, n);
        double t = d2_now() - t0;
        if (t < best) best = t;
    }
    free(a);
    free(b);
    return 2.0 * (double)n / best / 1e9; /* read + write */
}

static void bench_one(eng_dtype dt) {
    /* ~100M parameters: 12 layers, dim 768, ffn 2048, vocab 32000 */
    synth_spec sp = {12, 768, 12, 12, 64, 2048, 32000, dt, true, false, false, 0};
    synth *s = synth_build(&sp, 1);
    kvp_config pc = {.n_layers = sp.n_layers, .n_kv_heads = sp.n_kv, .head_dim = sp.hd,
                     .page_tokens = 16, .n_pages = 4096, .max_seqs = 64, .max_seq_tokens = 256};
    kvp_pool *pool;
    ASSERT_EQ(kvp_create(&pc, &pool), D2_OK);
    eng_backend_config cc = {.n_threads = 0, .max_batch_tokens = 64, .max_logit_rows = 64};
    eng_backend *be;
    ASSERT_EQ(cpu_make(&s->m, pool, &cc, &be), D2_OK);
    double wbytes = 0.0;
    int64_t per_layer = 4LL * 768 * 768 + 3LL * 768 * 2048;
    double esz = dt == ENG_F32 ? 4.0 : 2.0;
    wbytes = esz * (double)(per_layer * 12 + 32000LL * 768);
    float *lg = malloc(sizeof(float) * 64 * 32000);
    int32_t toks[64], pos[64];
    eng_batch_seq bs[64];
    double t_b1 = 0.0;
    int sizes[] = {1, 8, 32};
    for (int si = 0; si < 3; si++) {
        int B = sizes[si];
        int seqs[64];
        for (int k = 0; k < B; k++) ASSERT_EQ(kvp_seq_new(pool, &seqs[k]), D2_OK);
        int steps = 8;
        double t0 = 0.0;
        for (int it = 0; it < steps + 2; it++) {
            if (it == 2) t0 = d2_now();
            for (int k = 0; k < B; k++) {
                toks[k] = (it * 31 + k) % 32000;
                pos[k] = it;
                bs[k] = (eng_batch_seq){.seq = seqs[k], .start = k, .n = 1, .want_logits = true};
            }
            eng_batch b = {.n_tokens = B, .tokens = toks, .pos = pos, .n_seqs = B, .seqs = bs};
            ASSERT_EQ(plan_step(be, &b, lg), D2_OK);
        }
        double per_step = (d2_now() - t0) / steps;
        if (B == 1) t_b1 = per_step;
        printf("  bench %s batch %2d: %.1f ms/step, %.1f tok/s, x%.2f vs batch 1 aggregate; "
               "weights %.0f MB -> %.1f GB/s effective\n",
               dt == ENG_F32 ? "f32" : dt == ENG_BF16 ? "bf16" : dt == ENG_F16 ? "f16" : "q8_0", B, per_step * 1e3, B / per_step, t_b1 / per_step * B,
               wbytes / 1e6, wbytes / per_step / 1e9);
        for (int k = 0; k < B; k++) kvp_seq_free(pool, seqs[k]);
    }
    free(lg);
    be->ops->destroy(be);
    kvp_destroy(pool);
    synth_free(s);
}

TEST(bench_decode) {
    const char *e = getenv("D2_FORWARD_BENCH");
    if (!e || !*e || *e == '0') SKIP("set D2_FORWARD_BENCH=1 to run the benchmark");
    printf("  memcpy bandwidth (read+write): %.1f GB/s\n", bench_bw_gbs());
    bench_one(ENG_F32);
    bench_one(ENG_BF16);
}
