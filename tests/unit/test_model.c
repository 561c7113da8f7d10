/*
 * tests/unit/test_model.c — model loading: GGUF and HF sources, the
 * GGUF<->HF equivalence of stories260K (Q/K permutation), dequantisation,
 * corrupted inputs (every one must fail with a status, never crash), a
 * deterministic mutation storm over both parsers, and tools/gen_model output.
 */
#include <dirent.h>
#include <stdint.h>
#include <sys/stat.h>

#include "common/log.h"
#include "common/status.h"
#include "common/util.h"
#include "engine/model/gguf.h"
#include "engine/model/model.h"
#include "engine/model/safetensors.h"
#include "engine/tok/tokenizer.h"
#include "tests/test.h"

/* The fuzz entry points, compiled in under other names so the corpus replay
 * below keeps them building and exercised in every test run. */
#define LLVMFuzzerTestOneInput fuzz_gguf_one
#include "tests/fuzz/fuzz_gguf.c"
#undef LLVMFuzzerTestOneInput
#define LLVMFuzzerTestOneInput fuzz_safetensors_one
#include "tests/fuzz/fuzz_safetensors.c"
#undef LLVMFuzzerTestOneInput

#define STORIES_GGUF "assets/models/stories260K/stories260K.gguf"
#define STORIES_HF "assets/models/stories260K/hf"
#define TINY_GGUF "assets/models/llama-2-tiny-random/llama-2-tiny-random.gguf"

/* ---- helpers ------------------------------------------------------------ */

static void quiet(void) { d2_log_set_level(D2_LOG_OFF); }

static void read_all(const char *path, uint8_t **buf, size_t *len) {
    char *b = NULL;
    if (d2_read_file(path, &b, len) != D2_OK) FAIL_("cannot read %s", path);
    *buf = (uint8_t *)b;
}

static void write_file(const char *path, const void *buf, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) FAIL_("cannot create %s", path);
    if (len && fwrite(buf, 1, len, f) != len) FAIL_("short write %s", path);
    fclose(f);
}

/* Writes buf[0..len) to a fresh mkstemp file and loads it as a model. */
static int load_gguf_bytes(const uint8_t *buf, size_t len) {
    char path[] = "/tmp/d2_test_model_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) FAIL_("mkstemp");
    if (len && write(fd, buf, len) != (ssize_t)len) FAIL_("write");
    close(fd);
    eng_model *m = NULL;
    int rc = eng_model_load(path, false, &m);
    if (rc == D2_OK && !m) FAIL_("D2_OK without a model");
    if (rc != D2_OK && m) FAIL_("error but a model returned");
    eng_model_free(m);
    unlink(path);
    return rc;
}

static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* Offset in buf of the n_dims field of tensor `name`'s info record. */
static size_t tensor_info_off(const uint8_t *buf, size_t len, const char *name) {
    gguf_file g;
    if (gguf_parse(buf, len, "t", &g) != D2_OK) FAIL_("parse");
    const gguf_tensor *t = gguf_find_tensor(&g, name);
    if (!t) FAIL_("no tensor %s", name);
    size_t off = (size_t)((const uint8_t *)t->name.p - buf) + t->name.len;
    gguf_free(&g);
    return off;
}

static size_t kv_val_off(const uint8_t *buf, size_t len, const char *key) {
    gguf_file g;
    if (gguf_parse(buf, len, "t", &g) != D2_OK) FAIL_("parse");
    const gguf_kv *kv = gguf_find(&g, key);
    if (!kv) FAIL_("no key %s", key);
    size_t off = (size_t)(kv->val - buf);
    gguf_free(&g);
    return off;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rm_rf(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    char p[1024];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

static void row(const eng_tensor *t, int64_t r, float *out) {
    ASSERT(t->data != NULL);
    ASSERT(r < t->rows);
    eng_tensor_row_f32(t, r, out);
}

/* ---- GGUF --------------------------------------------------------------- */

TEST(gguf_stories_config) {
    const char *p = test_shared_path(STORIES_GGUF);
    REQUIRE_FILE(p);
    eng_model *m = NULL;
    ASSERT_EQ(eng_model_load(p, false, &m), D2_OK);
    const eng_model_config *c = &m->cfg;
    ASSERT_EQ(c->arch, ENG_ARCH_LLAMA);
    ASSERT_EQ(c->n_layers, 5);
    ASSERT_EQ(c->dim, 64);
    ASSERT_EQ(c->n_heads, 8);
    ASSERT_EQ(c->n_kv_heads, 4);
    ASSERT_EQ(c->head_dim, 8);
    ASSERT_EQ(c->ffn_dim, 172);
    ASSERT_EQ(c->vocab_size, 512);
    ASSERT_EQ(c->max_ctx, 2048);
    ASSERT_NEAR(c->rope_theta, 10000.0, 1e-3);
    ASSERT_NEAR(c->rms_eps, 1e-5, 1e-9);
    ASSERT(!c->rope_neox);
    ASSERT(!c->qkv_bias);
    ASSERT(!c->tied_embeddings); /* output.weight is stored explicitly */
    ASSERT_EQ(c->rope_scaling.type, 0);
    ASSERT_EQ(c->bos_id, 1);
    ASSERT_EQ(c->n_eos, 1);
    ASSERT_EQ(c->eos_ids[0], 2);
    ASSERT(m->tok == NULL);
    ASSERT(m->rope_freqs.data == NULL);
    ASSERT_EQ(m->tok_embd.rows, 512);
    ASSERT_EQ(m->tok_embd.cols, 64);
    ASSERT_EQ(m->tok_embd.dtype, ENG_F32);
    ASSERT_EQ(m->layers[4].wk.rows, 32);
    ASSERT_EQ(m->layers[4].wk.cols, 64);
    ASSERT_EQ(m->layers[0].w_down.rows, 64);
    ASSERT_EQ(m->layers[0].w_down.cols, 172);
    ASSERT_EQ(m->layers[0].w_gate.rows, 172);
    ASSERT_EQ(m->layers[2].attn_norm.rows, 1);
    ASSERT_STREQ(m->layers[3].wq.name, "blk.3.attn_q.weight");
    ASSERT(m->layers[0].bq.data == NULL);
    /* 260,032 weights + the separately stored output (512 x 64). */
    ASSERT_EQ(eng_model_n_params(m), 260032 + 32768);
    ASSERT_EQ(eng_model_weight_bytes(m), (260032 + 32768) * 4);
    /* output equals token_embd in this file. */
    float a[64], b[64];
    row(&m->tok_embd, 100, a);
    row(&m->output, 100, b);
    ASSERT(memcmp(a, b, sizeof a) == 0);
    ASSERT(m->output.data != m->tok_embd.data);
    eng_model_free(m);
}

TEST(gguf_tiny_random_f16) {
    const char *p = test_shared_path(TINY_GGUF);
    REQUIRE_FILE(p);
    eng_model *m = NULL;
    ASSERT_EQ(eng_model_load(p, false, &m), D2_OK);
    const eng_model_config *c = &m->cfg;
    ASSERT_EQ(c->n_layers, 1);
    ASSERT_EQ(c->dim, 8);
    ASSERT_EQ(c->n_heads, 2);
    ASSERT_EQ(c->n_kv_heads, 2);
    ASSERT_EQ(c->head_dim, 4);
    ASSERT_EQ(c->ffn_dim, 32);
    ASSERT_EQ(c->vocab_size, 32000);
    ASSERT_EQ(c->max_ctx, 4096);
    ASSERT_EQ(m->tok_embd.dtype, ENG_F16);
    ASSERT_EQ(m->layers[0].wq.dtype, ENG_F16);
    ASSERT_EQ(m->layers[0].attn_norm.dtype, ENG_F32);
    ASSERT_EQ(m->tok_embd.rows, 32000);
    /* F16 dequantisation matches a by-hand conversion. */
    float r[8];
    row(&m->tok_embd, 31999, r);
    const uint16_t *h = (const uint16_t *)m->tok_embd.data + (size_t)31999 * 8;
    bool nonzero = false;
    for (int i = 0; i < 8; i++) {
        uint16_t v;
        memcpy(&v, h + i, 2);
        ASSERT(r[i] == d2_f16_to_f32(v));
        ASSERT(isfinite(r[i]));
        if (r[i] != 0.0f) nonzero = true;
    }
    ASSERT(nonzero);
    eng_model_free(m);
}

TEST(row_f32_all_dtypes) {
    /* BF16 */
    uint16_t bf[2 * 4];
    float want[8] = {1.0f, -2.5f, 0.15625f, 3e10f, -0.0f, 7.0f, 1e-3f, -65504.0f};
    for (int i = 0; i < 8; i++) bf[i] = d2_f32_to_bf16(want[i]);
    eng_tensor t = {bf, ENG_BF16, 2, 4, "bf"};
    float out[32];
    eng_tensor_row_f32(&t, 1, out);
    for (int i = 0; i < 4; i++) ASSERT(out[i] == d2_bf16_to_f32(bf[4 + i]));
    ASSERT_NEAR(out[0], -0.0, 0);
    ASSERT_NEAR(out[3], -65504.0, 300);
    /* F16 */
    uint16_t hf[8];
    for (int i = 0; i < 8; i++) hf[i] = d2_f32_to_f16(want[i] / 1e6f);
    t = (eng_tensor){hf, ENG_F16, 2, 4, "h"};
    eng_tensor_row_f32(&t, 0, out);
    ASSERT_NEAR(out[1], -2.5e-6, 1e-8);
    /* F32 */
    t = (eng_tensor){want, ENG_F32, 2, 4, "f"};
    eng_tensor_row_f32(&t, 1, out);
    ASSERT(out[2] == 1e-3f);
    /* Q8_0: two rows of one block each: f16 scale + 32 int8. */
    uint8_t q[2 * 34];
    for (int r = 0; r < 2; r++) {
        uint16_t d = d2_f32_to_f16(r ? 0.5f : 0.25f);
        memcpy(q + r * 34, &d, 2);
        for (int i = 0; i < 32; i++) q[r * 34 + 2 + i] = (uint8_t)(int8_t)(i - 16);
    }
    t = (eng_tensor){q, ENG_Q8_0, 2, 32, "q"};
    eng_tensor_row_f32(&t, 1, out);
    for (int i = 0; i < 32; i++) ASSERT(out[i] == 0.5f * (float)(i - 16));
    eng_tensor_row_f32(&t, 0, out);
    ASSERT(out[0] == -4.0f);
    ASSERT_STREQ(eng_dtype_name(ENG_Q8_0), "Q8_0");
    ASSERT_STREQ(eng_dtype_name(ENG_BF16), "BF16");
}

/* ---- HF and the GGUF<->HF equivalence -------------------------------------- */

TEST(hf_stories_matches_gguf) {
    const char *pg = test_shared_path(STORIES_GGUF), *ph = test_shared_path(STORIES_HF);
    REQUIRE_FILE(pg);
    REQUIRE_FILE(ph);
    eng_model *g = NULL, *h = NULL;
    ASSERT_EQ(eng_model_load(pg, false, &g), D2_OK);
    ASSERT_EQ(eng_model_load(ph, false, &h), D2_OK);
    const eng_model_config *a = &g->cfg, *b = &h->cfg;
    ASSERT_EQ(b->arch, ENG_ARCH_LLAMA);
    ASSERT_EQ(a->n_layers, b->n_layers);
    ASSERT_EQ(a->dim, b->dim);
    ASSERT_EQ(a->n_heads, b->n_heads);
    ASSERT_EQ(a->n_kv_heads, b->n_kv_heads);
    ASSERT_EQ(a->head_dim, b->head_dim);
    ASSERT_EQ(a->ffn_dim, b->ffn_dim);
    ASSERT_EQ(a->vocab_size, b->vocab_size);
    ASSERT_NEAR(a->rope_theta, b->rope_theta, 1e-3);
    ASSERT_NEAR(a->rms_eps, b->rms_eps, 1e-12);
    ASSERT_EQ(a->bos_id, b->bos_id);
    ASSERT_EQ(b->n_eos, 1);
    ASSERT_EQ(a->eos_ids[0], b->eos_ids[0]);
    /* Differences that are real: context (converter default 2048 vs the
     * trained 512), tying, and the RoPE pairing. */
    ASSERT_EQ(b->max_ctx, 512);
    ASSERT(b->tied_embeddings);
    ASSERT(h->output.data == h->tok_embd.data);
    ASSERT(b->rope_neox);
    ASSERT(!a->rope_neox);
    ASSERT_EQ(eng_model_n_params(h), 260032);
    ASSERT(h->chat_template == NULL);

    float x[256], y[256];
    const int hd = a->head_dim;
    /* Q/K: HF row h*hd + t*hd/2 + j  <->  GGUF row h*hd + 2j + t. */
    for (int l = 0; l < a->n_layers; l++) {
        const eng_tensor *pairs[2][2] = {{&g->layers[l].wq, &h->layers[l].wq},
                                         {&g->layers[l].wk, &h->layers[l].wk}};
        for (int k = 0; k < 2; k++) {
            const eng_tensor *tg = pairs[k][0], *th = pairs[k][1];
            ASSERT_EQ(tg->rows, th->rows);
            int nh = (int)(tg->rows / hd);
            int same_unpermuted = 0;
            for (int hh = 0; hh < nh; hh++)
                for (int t = 0; t < 2; t++)
                    for (int j = 0; j < hd / 2; j++) {
                        row(th, hh * hd + t * hd / 2 + j, x);
                        row(tg, hh * hd + 2 * j + t, y);
                        ASSERT(memcmp(x, y, (size_t)tg->cols * 4) == 0);
                        row(tg, hh * hd + t * hd / 2 + j, y);
                        same_unpermuted += memcmp(x, y, (size_t)tg->cols * 4) == 0;
                    }
            /* the permutation is not the identity on these rows */
            ASSERT_LT(same_unpermuted, (int)tg->rows);
        }
        const eng_tensor *eq[][2] = {
            {&g->layers[l].wv, &h->layers[l].wv},       {&g->layers[l].wo, &h->layers[l].wo},
            {&g->layers[l].w_gate, &h->layers[l].w_gate}, {&g->layers[l].w_up, &h->layers[l].w_up},
            {&g->layers[l].w_down, &h->layers[l].w_down},
            {&g->layers[l].attn_norm, &h->layers[l].attn_norm},
            {&g->layers[l].ffn_norm, &h->layers[l].ffn_norm}};
        for (size_t k = 0; k < sizeof eq / sizeof eq[0]; k++) {
            ASSERT_EQ(eq[k][0]->rows, eq[k][1]->rows);
            ASSERT_EQ(eq[k][0]->cols, eq[k][1]->cols);
            for (int64_t r = 0; r < eq[k][0]->rows; r++) {
                row(eq[k][0], r, x);
                row(eq[k][1], r, y);
                ASSERT(memcmp(x, y, (size_t)eq[k][0]->cols * 4) == 0);
            }
        }
    }
    for (int64_t r = 0; r < 512; r++) {
        row(&g->tok_embd, r, x);
        row(&h->tok_embd, r, y);
        ASSERT(memcmp(x, y, 64 * 4) == 0);
        row(&g->output, r, x);
        row(&h->output, r, y);
        ASSERT(memcmp(x, y, 64 * 4) == 0);
    }
    row(&g->out_norm, 0, x);
    row(&h->out_norm, 0, y);
    ASSERT(memcmp(x, y, 64 * 4) == 0);
    eng_model_free(g);
    eng_model_free(h);
}

TEST(load_missing_path) {
    quiet();
    eng_model *m = (eng_model *)1;
    ASSERT_EQ(eng_model_load("/nonexistent/d2/model.gguf", false, &m), D2_ENOENT);
    ASSERT(m == NULL);
    ASSERT_EQ(eng_model_load("/tmp", false, &m), D2_ENOENT); /* no config.json */
    eng_model_free(NULL);
}

/* ---- corrupted GGUF ------------------------------------------------------ */

TEST(gguf_truncations_fail) {
    quiet();
    const char *p = test_shared_path(STORIES_GGUF);
    REQUIRE_FILE(p);
    uint8_t *buf;
    size_t len;
    read_all(p, &buf, &len);
    ASSERT_EQ(load_gguf_bytes(buf, len), D2_OK);
    /* 14176 = start of the data section. */
    const size_t cuts[] = {0, 1, 3, 4, 7, 12, 20, 23, 24, 30, 100, 1000, 5000, 9000,
                           14000, 14175, 14176, 14200, 50000, 600000, len - 4, len - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        int rc = load_gguf_bytes(buf, cuts[i]);
        if (rc >= 0) FAIL_("truncation at %zu loaded", cuts[i]);
        /* The in-memory path agrees. */
        eng_model *m = NULL;
        ASSERT_LT(eng_model_load_gguf_buffer(buf, cuts[i], "mem", false, &m), 0);
        ASSERT(m == NULL);
    }
    free(buf);
}

TEST(gguf_header_corruptions_fail) {
    quiet();
    const char *p = test_shared_path(STORIES_GGUF);
    REQUIRE_FILE(p);
    uint8_t *orig, *b;
    size_t len;
    read_all(p, &orig, &len);
    b = malloc(len);
    ASSERT(b);
    size_t k_info = tensor_info_off(orig, len, "blk.0.attn_k.weight");
    size_t up_info = tensor_info_off(orig, len, "blk.2.ffn_up.weight");
    size_t arch_val = kv_val_off(orig, len, "general.architecture");
    size_t tok_val = kv_val_off(orig, len, "tokenizer.ggml.tokens");
    size_t heads_val = kv_val_off(orig, len, "llama.attention.head_count");

#define CASE(expect, desc, stmt)                                                 \
    do {                                                                         \
        memcpy(b, orig, len);                                                    \
        stmt;                                                                    \
        int rc_ = load_gguf_bytes(b, len);                                       \
        if ((expect) ? rc_ != (expect) : rc_ >= 0)                               \
            FAIL_("%s: got %s", desc, d2_status_name(rc_));                      \
    } while (0)

    CASE(D2_EFORMAT, "bad magic", b[0] = 'X');
    CASE(D2_EUNSUPPORTED, "version 99", put_u32(b + 4, 99));
    CASE(D2_EUNSUPPORTED, "version 1", put_u32(b + 4, 1));
    CASE(D2_EFORMAT, "absurd tensor count", put_u64(b + 8, 1ull << 40));
    CASE(D2_EFORMAT, "absurd kv count", put_u64(b + 16, 1ull << 50));
    CASE(0, "tensor count too big", put_u64(b + 8, 49));
    CASE(0, "tensor count too small", put_u64(b + 8, 47));
    CASE(0, "kv count off by one", put_u64(b + 16, 20));
    CASE(D2_EFORMAT, "absurd key length", put_u64(b + 24, 1ull << 62));
    CASE(D2_EFORMAT, "key length past EOF", put_u64(b + 24, len));
    CASE(D2_EFORMAT, "absurd token array count", put_u64(b + tok_val - 8, 1ull << 60));
    CASE(0, "unknown value type", put_u32(b + heads_val - 4, 77));
    CASE(D2_EUNSUPPORTED, "nested array", put_u32(b + tok_val - 12, GGUF_T_ARRAY));
    CASE(D2_EUNSUPPORTED, "unknown architecture", b[arch_val + 8 + 4] = 'X');
    /* attn_k: n_dims(4) ne0(8) ne1(8) type(4) offset(8) */
    CASE(D2_ESHAPE, "attn_k rows 32 -> 16", put_u64(b + k_info + 4 + 8, 16));
    CASE(0, "attn_k cols 64 -> 65", put_u64(b + k_info + 4, 65));
    CASE(D2_EFORMAT, "attn_k zero dim", put_u64(b + k_info + 4, 0));
    CASE(D2_EFORMAT, "attn_k huge dims", put_u64(b + k_info + 4, 1ull << 40);
         put_u64(b + k_info + 12, 1ull << 40));
    CASE(D2_EFORMAT, "attn_k 5 dims", put_u32(b + k_info, 5));
    CASE(D2_EUNSUPPORTED, "attn_k unknown dtype 77", put_u32(b + k_info + 20, 77));
    CASE(D2_EUNSUPPORTED, "attn_k dtype Q4_0", put_u32(b + k_info + 20, 2));
    CASE(0, "ffn_up ne1 doubled (overlaps)", put_u64(b + up_info + 12, 344));
    uint64_t off;
    memcpy(&off, orig + k_info + 24, 8);
    CASE(D2_EFORMAT, "attn_k misaligned", put_u64(b + k_info + 24, off + 4));
    CASE(D2_EFORMAT, "attn_k overlaps its neighbour", put_u64(b + k_info + 24, off + 32));
    CASE(D2_EFORMAT, "attn_k beyond EOF", put_u64(b + k_info + 24, (uint64_t)len));
    CASE(D2_EFORMAT, "attn_k offset huge", put_u64(b + k_info + 24, ~0ull - 31));
    CASE(D2_EFORMAT, "missing tensor (renamed)", b[k_info - 8] = 'X');
    CASE(D2_EFORMAT, "duplicate tensor name", memcpy(b + k_info - 19, "blk.0.attn_q", 12));
#undef CASE
    free(b);
    free(orig);
}

/* Random byte mutations of the header region and random truncations: every
 * outcome is a status (OK is allowed when the mutation hit something
 * harmless); the sanitizer build catches memory errors. */
TEST(gguf_mutation_storm) {
    quiet();
    const char *p = test_shared_path(STORIES_GGUF);
    REQUIRE_FILE(p);
    uint8_t *orig, *b;
    size_t len;
    read_all(p, &orig, &len);
    b = malloc(len);
    ASSERT(b);
    rng_state = 12345;
    int failed = 0;
    for (int it = 0; it < 1500; it++) {
        memcpy(b, orig, len);
        int nmut = 1 + (int)(rng() % 6);
        for (int k = 0; k < nmut; k++) {
            size_t pos = (size_t)(rng() % 14176);
            uint64_t r = rng();
            if (r % 4 == 0) b[pos] = (uint8_t)(r >> 8);
            else if (r % 4 == 1) b[pos] ^= (uint8_t)(1u << ((r >> 8) % 8));
            else if (r % 4 == 2 && pos + 8 <= len) put_u64(b + pos, r >> 3);
            else b[pos] = 0xff;
        }
        size_t n = (rng() % 8 == 0) ? (size_t)(rng() % len) : len;
        /* An exact-size copy, so the sanitizer sees reads past the end. */
        uint8_t *c = malloc(n ? n : 1);
        ASSERT(c);
        memcpy(c, b, n);
        eng_model *m = NULL;
        int rc = eng_model_load_gguf_buffer(c, n, "mut", false, &m);
        if (rc == D2_OK) {
            /* A loaded model must be self-consistent: touch every row. */
            float *tmp = malloc((size_t)m->cfg.ffn_dim * 4 + (size_t)m->cfg.dim * 4 + 4096);
            ASSERT(tmp);
            row(&m->tok_embd, m->tok_embd.rows - 1, tmp);
            row(&m->layers[m->cfg.n_layers - 1].w_down, 0, tmp);
            free(tmp);
            eng_model_free(m);
        } else {
            ASSERT(m == NULL);
            failed++;
        }
        free(c);
    }
    ASSERT_GT(failed, 500);
    free(b);
    free(orig);
}

/* ---- corrupted HF directories ------------------------------------------- */

typedef struct hfdir {
    char dir[64];
    uint8_t *cfg, *st;
    size_t cfg_len, st_len;
} hfdir;

static void hf_read(hfdir *h) {
    char p[1024];
    snprintf(p, sizeof p, "%s/config.json", test_shared_path(STORIES_HF));
    read_all(p, &h->cfg, &h->cfg_len);
    snprintf(p, sizeof p, "%s/model.safetensors", test_shared_path(STORIES_HF));
    read_all(p, &h->st, &h->st_len);
}

/* Writes config + safetensors (given bytes) into a fresh temp dir, loads. */
static int hf_load_bytes(const char *cfg, size_t cfg_len, const uint8_t *st, size_t st_len) {
    char dir[] = "/tmp/d2_test_hf_XXXXXX", p[256];
    if (!mkdtemp(dir)) FAIL_("mkdtemp");
    snprintf(p, sizeof p, "%s/config.json", dir);
    write_file(p, cfg, cfg_len);
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    write_file(p, st, st_len);
    eng_model *m = NULL;
    int rc = eng_model_load(dir, false, &m);
    if ((rc == D2_OK) != (m != NULL)) FAIL_("status and model disagree");
    eng_model_free(m);
    rm_rf(dir);
    return rc;
}

static char *replace1(const char *s, size_t len, const char *from, const char *to, size_t *out_len) {
    const char *at = strstr(s, from);
    if (!at) FAIL_("'%s' not found", from);
    size_t a = (size_t)(at - s), fl = strlen(from), tl = strlen(to);
    char *r = malloc(len - fl + tl + 1);
    memcpy(r, s, a);
    memcpy(r + a, to, tl);
    memcpy(r + a + tl, at + fl, len - a - fl);
    r[len - fl + tl] = 0;
    *out_len = len - fl + tl;
    return r;
}

TEST(hf_corruptions_fail) {
    quiet();
    REQUIRE_FILE(test_shared_path(STORIES_HF "/model.safetensors"));
    hfdir h;
    hf_read(&h);
    const char *cfg = (const char *)h.cfg;
    ASSERT_EQ(hf_load_bytes(cfg, h.cfg_len, h.st, h.st_len), D2_OK);
    uint8_t *b = malloc(h.st_len);
    ASSERT(b);
    uint64_t hl;
    memcpy(&hl, h.st, 8);
    ASSERT_LT(hl, h.st_len);

#define STCASE(expect, desc, stmt)                                               \
    do {                                                                         \
        memcpy(b, h.st, h.st_len);                                               \
        size_t n_ = h.st_len;                                                    \
        stmt;                                                                    \
        int rc_ = hf_load_bytes(cfg, h.cfg_len, b, n_);                          \
        if ((expect) ? rc_ != (expect) : rc_ >= 0)                               \
            FAIL_("%s: got %s", desc, d2_status_name(rc_));                      \
    } while (0)

    STCASE(0, "header length huge", put_u64(b, 1ull << 60));
    STCASE(0, "header length = file size", put_u64(b, h.st_len));
    STCASE(0, "header length cuts the JSON", put_u64(b, hl / 2));
    STCASE(0, "header length 0", put_u64(b, 0));
    STCASE(D2_EJSON, "JSON garbage", b[8] = 'x');
    STCASE(D2_EJSON, "JSON cut by a NUL", b[8 + hl / 3] = 0);
    STCASE(0, "truncated mid-data", n_ = h.st_len / 2);
    STCASE(0, "truncated mid-header", n_ = 8 + hl / 2);
    STCASE(0, "truncated to 5 bytes", n_ = 5);
    STCASE(0, "truncated by 4 bytes", n_ = h.st_len - 4);
    STCASE(D2_EUNSUPPORTED, "dtype I32 on a needed tensor", {
        char *at = strstr((char *)b + 8, "\"F32\"");
        ASSERT(at);
        memcpy(at, "\"I32\"", 5);
    });
    STCASE(D2_EUNSUPPORTED, "unknown dtype", {
        char *at = strstr((char *)b + 8, "\"F32\"");
        memcpy(at, "\"Q99\"", 5);
    });
    STCASE(0, "shape digit changed", {
        char *at = strstr((char *)b + 8, "[64,");
        if (!at) at = strstr((char *)b + 8, "[64, ");
        ASSERT(at);
        at[1] = '9';
    });
    STCASE(D2_EFORMAT, "tensor renamed (missing)", {
        char *at = strstr((char *)b + 8, "mlp.up_proj");
        ASSERT(at);
        at[4] = 'X';
    });
#undef STCASE

    /* config.json corruptions. */
    size_t nl;
    char *c2;
    c2 = replace1(cfg, h.cfg_len, "LlamaForCausalLM", "GPTNeoForCausalLM", &nl);
    ASSERT_EQ(hf_load_bytes(c2, nl, h.st, h.st_len), D2_EUNSUPPORTED);
    free(c2);
    c2 = replace1(cfg, h.cfg_len, "\"hidden_size\": 64", "\"hidden_size\": 32", &nl);
    ASSERT_EQ(hf_load_bytes(c2, nl, h.st, h.st_len), D2_ESHAPE);
    free(c2);
    c2 = replace1(cfg, h.cfg_len, "\"num_key_value_heads\": 4", "\"num_key_value_heads\": 3", &nl);
    ASSERT_LT(hf_load_bytes(c2, nl, h.st, h.st_len), 0);
    free(c2);
    c2 = replace1(cfg, h.cfg_len, "\"num_hidden_layers\": 5", "\"num_hidden_layers\": 6", &nl);
    ASSERT_EQ(hf_load_bytes(c2, nl, h.st, h.st_len), D2_EFORMAT);
    free(c2);
    c2 = replace1(cfg, h.cfg_len, "\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false",
                  &nl);
    ASSERT_EQ(hf_load_bytes(c2, nl, h.st, h.st_len), D2_EFORMAT); /* lm_head missing */
    free(c2);
    c2 = replace1(cfg, h.cfg_len, "\"rope_scaling\": null",
                  "\"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4}", &nl);
    ASSERT_EQ(hf_load_bytes(c2, nl, h.st, h.st_len), D2_EUNSUPPORTED);
    free(c2);
    c2 = replace1(cfg, h.cfg_len, "\"vocab_size\": 512", "\"vocab_size\": -5", &nl);
    ASSERT_LT(hf_load_bytes(c2, nl, h.st, h.st_len), 0);
    free(c2);
    ASSERT_LT(hf_load_bytes("{\"architectures\": [", 19, h.st, h.st_len), 0);
    ASSERT_LT(hf_load_bytes("[]", 2, h.st, h.st_len), 0);
    /* rope_scaling llama3 parses. */
    c2 = replace1(cfg, h.cfg_len, "\"rope_scaling\": null",
                  "\"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, "
                  "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, "
                  "\"original_max_position_embeddings\": 8192}", &nl);
    ASSERT_EQ(hf_load_bytes(c2, nl, h.st, h.st_len), D2_OK);
    free(c2);
    free(b);
    free(h.cfg);
    free(h.st);
}

TEST(safetensors_mutation_storm) {
    quiet();
    REQUIRE_FILE(test_shared_path(STORIES_HF "/model.safetensors"));
    hfdir h;
    hf_read(&h);
    uint64_t hl;
    memcpy(&hl, h.st, 8);
    size_t span = (size_t)hl + 8;
    uint8_t *b = malloc(h.st_len);
    ASSERT(b);
    rng_state = 777;
    int failed = 0;
    for (int it = 0; it < 1500; it++) {
        memcpy(b, h.st, h.st_len);
        int nmut = 1 + (int)(rng() % 4);
        for (int k = 0; k < nmut; k++) {
            size_t pos = (size_t)(rng() % span);
            uint64_t r = rng();
            if (r % 3 == 0) b[pos] = (uint8_t)(r >> 8);
            else if (r % 3 == 1) b[pos] = "0123456789[]{}\",:-e."[(r >> 8) % 20];
            else b[pos] ^= 0x20;
        }
        size_t n = (rng() % 8 == 0) ? (size_t)(rng() % h.st_len) : h.st_len;
        uint8_t *c = malloc(n ? n : 1);
        ASSERT(c);
        memcpy(c, b, n);
        st_file f;
        int rc = st_parse(c, n, "mut", &f);
        if (rc == D2_OK) {
            for (size_t i = 0; i < f.n_tensors; i++) {
                const st_tensor *t = &f.tensors[i];
                ASSERT(t->data + (t->end - t->begin) <= c + n);
            }
            st_free(&f);
        } else {
            failed++;
        }
        free(c);
    }
    ASSERT_GT(failed, 300);
    free(b);
    free(h.cfg);
    free(h.st);
}

/* ---- tokenizers ------------------------------------------------------------ */

TEST(tokenizers_from_model_sources) {
    const char *pg = test_shared_path(STORIES_GGUF), *ph = test_shared_path(STORIES_HF);
    REQUIRE_FILE(pg);
    REQUIRE_FILE(ph);
    eng_model *g = NULL, *h = NULL;
    ASSERT_EQ(eng_model_load(pg, true, &g), D2_OK);
    ASSERT_EQ(eng_model_load(ph, true, &h), D2_OK);
    ASSERT(g->tok && h->tok);
    ASSERT_EQ(eng_tok_n_vocab(g->tok), 512);
    ASSERT_EQ(eng_tok_n_vocab(h->tok), 512);
    ASSERT_EQ(eng_tok_bos(g->tok), 1);
    ASSERT_EQ(eng_tok_eos(h->tok), 2);
    const char *text = "Once upon a time, there was a little dog.";
    int32_t *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    ASSERT_EQ(eng_tok_encode(g->tok, text, strlen(text), true, false, &a, &na), D2_OK);
    ASSERT_EQ(eng_tok_encode(h->tok, text, strlen(text), true, false, &b, &nb), D2_OK);
    ASSERT_EQ(na, nb);
    ASSERT_GT(na, 3);
    ASSERT_EQ(a[0], 1);
    for (size_t i = 0; i < na; i++) ASSERT_EQ(a[i], b[i]);
    free(a);
    free(b);
    eng_model_free(g);
    eng_model_free(h);

    const char *pt = test_shared_path(TINY_GGUF);
    REQUIRE_FILE(pt);
    eng_model *t = NULL;
    ASSERT_EQ(eng_model_load(pt, true, &t), D2_OK);
    ASSERT_EQ(eng_tok_n_vocab(t->tok), 32000);
    eng_model_free(t);
}

TEST(load_tokenizer_only) {
    eng_tokenizer *t = NULL;
    const char *v = test_shared_path("assets/vocab-tests/ggml-vocab-llama-spm.gguf");
    REQUIRE_FILE(v);
    ASSERT_EQ(eng_model_load_tokenizer(v, &t), D2_OK);
    ASSERT_EQ(eng_tok_n_vocab(t), 32000);
    eng_tok_free(t);
    /* A vocab-only GGUF is not a model. */
    eng_model *m = NULL;
    quiet();
    ASSERT_LT(eng_model_load(v, false, &m), 0);
    ASSERT(m == NULL);
    d2_log_set_level(D2_LOG_WARN);
    const char *g2 = test_shared_path("assets/vocab-tests/ggml-vocab-gpt-2.gguf");
    REQUIRE_FILE(g2);
    ASSERT_EQ(eng_model_load_tokenizer(g2, &t), D2_OK);
    ASSERT_EQ(eng_tok_n_vocab(t), 50257);
    eng_tok_free(t);
    ASSERT_EQ(eng_model_load_tokenizer(test_shared_path(STORIES_HF), &t), D2_OK);
    ASSERT_EQ(eng_tok_n_vocab(t), 512);
    eng_tok_free(t);
    ASSERT_EQ(eng_model_load_tokenizer(test_shared_path("assets/tokenizers/llama2-hf-phi3/tokenizer.json"), &t),
              D2_OK);
    ASSERT_GE(eng_tok_n_vocab(t), 32011);
    eng_tok_free(t);
    quiet();
    ASSERT_EQ(eng_model_load_tokenizer("/nonexistent/tokenizer.json", &t), D2_ENOENT);
    ASSERT_LT(eng_model_load_tokenizer("/tmp", &t), 0); /* no tokenizer.json */
}

/* ---- tools/gen_model ------------------------------------------------------- */

static const char *gen_bin(void) {
    const char *b = getenv("D2_GEN_MODEL");
    b = b && *b ? b : "build/tools/gen_model";
    if (access(b, X_OK) != 0) SKIP("%s not built", b);
    return b;
}

/* Runs gen_model with args into dir; fails the test if it fails. */
static void gen(const char *dir, const char *args) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s --out %s %s >/dev/null", gen_bin(), dir, args);
    if (system(cmd) != 0) FAIL_("failed: %s", cmd);
}

static char *mk_tmpdir(void) {
    static char d[64];
    snprintf(d, sizeof d, "/tmp/d2_test_gen_XXXXXX");
    if (!mkdtemp(d)) FAIL_("mkdtemp");
    return d;
}

static void rm_tree2(const char *root) {
    /* root/<sub>/<files>, one level of subdirectories */
    DIR *d = opendir(root);
    if (!d) return;
    struct dirent *e;
    char p[1024];
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", root, e->d_name);
        if (d2_is_dir(p)) rm_rf(p);
        else unlink(p);
    }
    closedir(d);
    rmdir(root);
}

TEST(gen_model_tiny_qwen2_sharded) {
    const char *tok = test_shared_path(STORIES_HF "/tokenizer.json");
    REQUIRE_FILE(tok);
    char root[64], a[128], a2[128], q[128], s[128], l3[128], args[1024];
    snprintf(root, sizeof root, "%s", mk_tmpdir());
    snprintf(a, sizeof a, "%s/tiny", root);
    snprintf(a2, sizeof a2, "%s/tiny2", root);
    snprintf(q, sizeof q, "%s/qwen", root);
    snprintf(s, sizeof s, "%s/shard", root);
    snprintf(l3, sizeof l3, "%s/l3", root);
    snprintf(args, sizeof args, "--shape tiny --seed 7 --tokenizer %s", tok);
    gen(a, args);
    gen(a2, args);
    snprintf(args, sizeof args, "--shape tiny --seed 7 --arch qwen2 --dtype bf16 --tokenizer %s", tok);
    gen(q, args);
    snprintf(args, sizeof args, "--shape tiny --seed 7 --dtype f16 --shards 3 --tokenizer %s", tok);
    gen(s, args);
    gen(l3, "--shape llama3-8b --layers 1 --dim 64 --heads 4 --kv-heads 2 --ffn 96 --vocab 1000 "
            "--tokenizer none --dtype bf16");

    /* Deterministic: the same seed writes the same bytes. */
    char p1[256], p2[256];
    snprintf(p1, sizeof p1, "%s/model.safetensors", a);
    snprintf(p2, sizeof p2, "%s/model.safetensors", a2);
    uint8_t *b1, *b2;
    size_t n1, n2;
    read_all(p1, &b1, &n1);
    read_all(p2, &b2, &n2);
    ASSERT_EQ(n1, n2);
    ASSERT(memcmp(b1, b2, n1) == 0);
    free(b1);
    free(b2);

    eng_model *m = NULL, *mq = NULL, *ms = NULL, *m3 = NULL;
    ASSERT_EQ(eng_model_load(a, true, &m), D2_OK);
    const eng_model_config *c = &m->cfg;
    ASSERT_EQ(c->arch, ENG_ARCH_LLAMA);
    ASSERT_EQ(c->n_layers, 2);
    ASSERT_EQ(c->dim, 64);
    ASSERT_EQ(c->n_heads, 4);
    ASSERT_EQ(c->n_kv_heads, 2);
    ASSERT_EQ(c->head_dim, 16);
    ASSERT_EQ(c->ffn_dim, 128);
    ASSERT_EQ(c->vocab_size, 512);
    ASSERT_EQ(c->max_ctx, 512);
    ASSERT(c->rope_neox);
    ASSERT(!c->tied_embeddings);
    ASSERT(!c->qkv_bias);
    ASSERT_EQ(c->bos_id, 1);
    ASSERT_EQ(c->eos_ids[0], 2);
    ASSERT(m->output.data && m->output.data != m->tok_embd.data);
    ASSERT(m->tok != NULL);
    ASSERT_EQ(eng_tok_n_vocab(m->tok), 512);
    ASSERT_EQ(m->tok_embd.dtype, ENG_F32);
    /* 512*64*2 + 2*(64*64*2 + 32*64*2 + 3*128*64 + 128) + 64 */
    ASSERT_EQ(eng_model_n_params(m), 65536 + 2 * (8192 + 4096 + 24576 + 128) + 64);
    float x[128], y[128];
    row(&m->layers[1].ffn_norm, 0, x);
    for (int i = 0; i < 64; i++) ASSERT(x[i] == 1.0f);
    double sum = 0, sq = 0;
    for (int r = 0; r < 512; r++) {
        row(&m->tok_embd, r, x);
        for (int i = 0; i < 64; i++) sum += x[i], sq += (double)x[i] * x[i];
    }
    double mean = sum / (512 * 64), sd = sqrt(sq / (512 * 64) - mean * mean);
    ASSERT_NEAR(mean, 0.0, 1e-3);
    ASSERT_NEAR(sd, 0.02, 1e-3);

    ASSERT_EQ(eng_model_load(q, false, &mq), D2_OK);
    ASSERT_EQ(mq->cfg.arch, ENG_ARCH_QWEN2);
    ASSERT(mq->cfg.qkv_bias);
    ASSERT(mq->cfg.tied_embeddings);
    ASSERT(mq->output.data == mq->tok_embd.data);
    ASSERT_NEAR(mq->cfg.rms_eps, 1e-6, 1e-12);
    ASSERT_EQ(mq->cfg.sliding_window, 0);
    ASSERT_EQ(mq->layers[1].wq.dtype, ENG_BF16);
    ASSERT(mq->layers[1].bq.data && mq->layers[1].bk.data && mq->layers[1].bv.data);
    ASSERT_EQ(mq->layers[1].bk.cols, 32);
    /* Same seed, same tensor index (0 = embeddings): bf16 of the f32 values. */
    row(&m->tok_embd, 3, x);
    row(&mq->tok_embd, 3, y);
    for (int i = 0; i < 64; i++) ASSERT(y[i] == d2_bf16_to_f32(d2_f32_to_bf16(x[i])));

    ASSERT_EQ(eng_model_load(s, false, &ms), D2_OK);
    ASSERT_EQ(ms->n_maps, 3);
    ASSERT_EQ(ms->layers[1].w_down.dtype, ENG_F16);
    for (int64_t r = 0; r < 64; r += 9) {
        row(&m->layers[1].w_down, r, x);
        row(&ms->layers[1].w_down, r, y);
        for (int i = 0; i < 128; i++) ASSERT(y[i] == d2_f16_to_f32(d2_f32_to_f16(x[i])));
    }
    row(&m->output, 511, x);
    row(&ms->output, 511, y);
    for (int i = 0; i < 64; i++) ASSERT(y[i] == d2_f16_to_f32(d2_f32_to_f16(x[i])));

    ASSERT_EQ(eng_model_load(l3, false, &m3), D2_OK);
    ASSERT_EQ(m3->cfg.rope_scaling.type, 1);
    ASSERT_NEAR(m3->cfg.rope_scaling.factor, 8.0, 0);
    ASSERT_NEAR(m3->cfg.rope_scaling.high_freq_factor, 4.0, 0);
    ASSERT_EQ(m3->cfg.rope_scaling.original_max_pos, 8192);
    ASSERT_NEAR(m3->cfg.rope_theta, 500000.0, 0.1);
    ASSERT_EQ(m3->cfg.vocab_size, 1000);
    ASSERT(m3->tok == NULL);
    eng_model_free(m);
    eng_model_free(mq);
    eng_model_free(ms);
    eng_model_free(m3);

    /* Sharded-index corruptions. */
    quiet();
    char ip[256], sp[256];
    snprintf(ip, sizeof ip, "%s/model.safetensors.index.json", s);
    uint8_t *idx;
    size_t il;
    read_all(ip, &idx, &il);
    size_t nl;
    char *bad = replace1((const char *)idx, il, "model-00002-of-00003", "model-00002-of-0000X", &nl);
    write_file(ip, bad, nl);
    ASSERT_EQ(eng_model_load(s, false, &ms), D2_ENOENT);
    free(bad);
    bad = replace1((const char *)idx, il, "\"model-00002-of-00003", "\"../el-00002-of-00003", &nl);
    write_file(ip, bad, nl);
    ASSERT_EQ(eng_model_load(s, false, &ms), D2_EFORMAT);
    free(bad);
    write_file(ip, "{\"weight_map\": 3}", 17);
    ASSERT_EQ(eng_model_load(s, false, &ms), D2_EFORMAT);
    write_file(ip, idx, il);
    snprintf(sp, sizeof sp, "%s/model-00003-of-00003.safetensors", s);
    ASSERT_EQ(truncate(sp, 1000), 0);
    ASSERT_EQ(eng_model_load(s, false, &ms), D2_EFORMAT);
    ASSERT(ms == NULL);
    free(idx);
    rm_tree2(root);
}

/* Replays the fuzz targets over the real files and deterministic
 * truncations/mutations of them (a small built-in corpus). */
TEST(fuzz_targets_replay) {
    const char *files[] = {STORIES_GGUF, TINY_GGUF, "assets/vocab-tests/ggml-vocab-phi-3.gguf",
                           STORIES_HF "/model.safetensors"};
    rng_state = 4242;
    for (size_t f = 0; f < sizeof files / sizeof files[0]; f++) {
        const char *p = test_shared_path(files[f]);
        REQUIRE_FILE(p);
        uint8_t *buf;
        size_t len;
        read_all(p, &buf, &len);
        bool st = f == 3;
        for (int it = 0; it < 60; it++) {
            size_t n = it == 0 ? len : (size_t)(rng() % len);
            uint8_t *c = malloc(n ? n : 1);
            ASSERT(c);
            memcpy(c, buf, n);
            if (it >= 30 && n > 64)
                for (int k = 0; k < 4; k++) c[rng() % (n < 16384 ? n : 16384)] ^= (uint8_t)rng();
            if (st) fuzz_safetensors_one(c, n);
            else fuzz_gguf_one(c, n);
            free(c);
        }
        free(buf);
    }
}
