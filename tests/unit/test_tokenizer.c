/*
 * tests/unit/test_tokenizer.c — engine/tok/tokenizer.h against the committed
 * oracle fixture (tests/fixtures/tok_oracle.json, made by
 * tests/js/tok_oracle.mjs with @huggingface/tokenizers), the llama.cpp
 * vocab-test vectors (.inp/.out) through tokenizer.json and through GGUF
 * metadata (read by a minimal GGUF metadata reader local to this file), and
 * unit tests for special-token splitting, NFC, CRLF, invalid UTF-8,
 * streaming detokenisation, load time and long inputs.
 * Shared assets are read in place (D2_SHARED); a missing asset skips.
 */
#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "common/status.h"
#include "common/util.h"
#include "engine/model/model.h"
#include "engine/tok/tokenizer.h"
#include "tests/test.h"

#define FIXTURE "tests/fixtures/tok_oracle.json"

static void print_text(const char *label, const char *s, size_t n) {
    fprintf(stderr, "  %s \"", label);
    for (size_t i = 0; i < n && i < 300; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '\n') fputs("\\n", stderr);
        else if (c == '\r') fputs("\\r", stderr);
        else if (c == '\t') fputs("\\t", stderr);
        else if (c < 0x20) fprintf(stderr, "\\x%02x", c);
        else fputc(c, stderr);
    }
    fprintf(stderr, "\"%s\n", n > 300 ? "..." : "");
}

static void print_ids(const char *label, const int32_t *ids, size_t n) {
    fprintf(stderr, "  %s [", label);
    for (size_t i = 0; i < n && i < 80; i++) fprintf(stderr, "%s%d", i ? ", " : "", ids[i]);
    fprintf(stderr, "%s] (%zu)\n", n > 80 ? ", ..." : "", n);
}

static eng_tokenizer *load_hf(const char *json_rel, const char *cfg_rel) {
    const char *j = test_shared_path(json_rel);
    REQUIRE_FILE(j);
    eng_tokenizer *t = NULL;
    int rc = eng_tok_load_hf(j, cfg_rel ? test_shared_path(cfg_rel) : NULL, &t);
    if (rc != D2_OK) FAIL_("eng_tok_load_hf(%s) = %s", j, d2_status_name(rc));
    return t;
}

/* Compares encode(text) with want; prints the first mismatch. Returns ok. */
static bool check_ids(const char *name, eng_tokenizer *t, const char *text, size_t len, bool add_special,
                      const int32_t *want, size_t n_want) {
    int32_t *got = NULL;
    size_t n = 0;
    int rc = eng_tok_encode(t, text, len, add_special, true, &got, &n);
    if (rc != D2_OK) FAIL_("%s: encode failed: %s", name, d2_status_name(rc));
    bool ok = n == n_want && (n == 0 || memcmp(got, want, n * sizeof(int32_t)) == 0);
    if (!ok) {
        fprintf(stderr, "  %s: mismatch (add_special=%d)\n", name, add_special);
        print_text("text:", text, len);
        print_ids("expected:", want, n_want);
        print_ids("got:     ", got, n);
    }
    free(got);
    return ok;
}

static int32_t *json_ids(const json_t *arr, size_t *n) {
    *n = json_array_size(arr);
    int32_t *v = malloc((*n + 1) * sizeof(int32_t));
    for (size_t i = 0; i < *n; i++) v[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return v;
}

/* Writes the "metaspace" variant of a tokenizer.json (as tok_oracle.mjs
 * builds it) to a temporary file; returns its path (static buffer). */
static const char *metaspace_variant(const char *json_path) {
    static char tmp[64];
    json_error_t err;
    json_t *j = json_load_file(json_path, 0, &err);
    if (!j) FAIL_("%s: %s", json_path, err.text);
    json_t *ms = json_pack("{s:s, s:s, s:s, s:b}", "type", "Metaspace", "replacement", "\xE2\x96\x81",
                           "prepend_scheme", "first", "split", 0);
    json_object_set_new(j, "normalizer", json_null());
    json_object_set(j, "pre_tokenizer", ms);
    json_object_set(j, "decoder", ms);
    json_decref(ms);
    snprintf(tmp, sizeof(tmp), "/tmp/d2tok_ms_%d.json", (int)getpid());
    if (json_dump_file(j, tmp, 0) != 0) FAIL_("cannot write %s", tmp);
    json_decref(j);
    return tmp;
}

/* D2_TOK_FIXTURE overrides the fixture (e.g. a fuzz file from
 * `node tests/js/tok_oracle.mjs --fuzz N --out F`). */
static void run_fixture(const char *name) {
    const char *fx = getenv("D2_TOK_FIXTURE");
    bool custom = fx && *fx;
    if (!custom) fx = FIXTURE;
    REQUIRE_FILE(fx);
    json_error_t err;
    json_t *root = json_load_file(fx, JSON_ALLOW_NUL, &err);
    if (!root) FAIL_("%s:%d: %s", fx, err.line, err.text);
    const json_t *texts = json_object_get(root, "texts");
    const json_t *tk = json_object_get(json_object_get(root, "tokenizers"), name);
    ASSERT(json_is_array(texts) && tk);
    if (!custom) ASSERT_GE(json_array_size(texts), 500);
    const json_t *cfg = json_object_get(tk, "config");
    const char *variant = json_string_value(json_object_get(tk, "variant"));
    eng_tokenizer *t;
    const char *tmp = NULL;
    if (variant && !strcmp(variant, "metaspace")) {
        const char *src = test_shared_path(json_string_value(json_object_get(tk, "json")));
        REQUIRE_FILE(src);
        tmp = metaspace_variant(src);
        t = NULL;
        int rc = eng_tok_load_hf(tmp, json_is_string(cfg) ? test_shared_path(json_string_value(cfg)) : NULL, &t);
        if (rc != D2_OK) FAIL_("load %s: %s", tmp, d2_status_name(rc));
    } else {
        t = load_hf(json_string_value(json_object_get(tk, "json")), json_is_string(cfg) ? json_string_value(cfg) : NULL);
    }
    const json_t *ids = json_object_get(tk, "ids"), *ids_sp = json_object_get(tk, "ids_special"),
                 *dec = json_object_get(tk, "decoded");
    int bad = 0, bad_dec = 0;
    for (size_t i = 0; i < json_array_size(texts); i++) {
        const json_t *jt = json_array_get(texts, i);
        const char *text = json_string_value(jt);
        size_t len = json_string_length(jt);
        size_t nw;
        int32_t *want = json_ids(json_array_get(ids, i), &nw);
        if (!check_ids(name, t, text, len, false, want, nw) && ++bad >= 5) {
            free(want);
            break;
        }
        if (i < json_array_size(ids_sp)) {
            size_t ns;
            int32_t *ws = json_ids(json_array_get(ids_sp, i), &ns);
            if (!check_ids(name, t, text, len, true, ws, ns)) bad++;
            free(ws);
        }
        const json_t *jd = json_array_get(dec, i);
        /* eng_tok_decode returns a C string: texts with NUL are not compared */
        if (json_is_string(jd) && !memchr(text, 0, len)) {
            char *d = NULL;
            ASSERT_OK(eng_tok_decode(t, want, nw, true, &d));
            size_t dl = json_string_length(jd);
            if (strlen(d) != dl || memcmp(d, json_string_value(jd), dl) != 0) {
                if (bad_dec++ < 3) {
                    fprintf(stderr, "  %s: decode mismatch for text %zu\n", name, i);
                    print_text("expected:", json_string_value(jd), dl);
                    print_text("got:     ", d, strlen(d));
                }
            }
            free(d);
        }
        free(want);
    }
    eng_tok_free(t);
    json_decref(root);
    if (tmp) unlink(tmp);
    if (bad || bad_dec) FAIL_("%s: %d id mismatches, %d decode mismatches", name, bad, bad_dec);
}

TEST(fixture_gpt2) { run_fixture("gpt2"); }
TEST(fixture_llama3) { run_fixture("llama3"); }
TEST(fixture_qwen3) { run_fixture("qwen3"); }
TEST(fixture_phi3) { run_fixture("phi3"); }
TEST(fixture_stories260k) { run_fixture("stories260k"); }
TEST(fixture_stories260k_metaspace) { run_fixture("stories260k_metaspace"); }

/* ---- llama.cpp vocab tests ---- */

typedef struct vtests {
    char **texts;
    size_t *lens;
    int32_t **ids;
    size_t *n_ids;
    size_t n;
    char *base_inp, *base_out;
} vtests;

static bool read_vtests(const char *set, vtests *v) {
    char rel[256];
    snprintf(rel, sizeof(rel), "assets/vocab-tests/ggml-vocab-%s.gguf.inp", set);
    char *inp = NULL, *out = NULL;
    size_t il, ol;
    if (d2_read_file(test_shared_path(rel), &inp, &il) != D2_OK) return false;
    snprintf(rel, sizeof(rel), "assets/vocab-tests/ggml-vocab-%s.gguf.out", set);
    if (d2_read_file(test_shared_path(rel), &out, &ol) != D2_OK) {
        free(inp);
        return false;
    }
    memset(v, 0, sizeof(*v));
    v->base_inp = inp;
    v->base_out = out;
    const char *sep = "\n__ggml_vocab_test__\n";
    size_t seplen = strlen(sep);
    v->texts = calloc(256, sizeof(char *));
    v->lens = calloc(256, sizeof(size_t));
    v->ids = calloc(256, sizeof(int32_t *));
    v->n_ids = calloc(256, sizeof(size_t));
    char *p = inp;
    while (p < inp + il && v->n < 256) {
        char *q = strstr(p, sep);
        if (!q) break;
        v->texts[v->n] = p;
        v->lens[v->n] = (size_t)(q - p);
        v->n++;
        p = q + seplen;
    }
    char *line = out;
    for (size_t k = 0; k < v->n; k++) {
        char *nl = strchr(line, '\n');
        if (nl) *nl = 0;
        v->ids[k] = malloc(4096 * sizeof(int32_t));
        char *e = line;
        while (*e) {
            char *end;
            long x = strtol(e, &end, 10);
            if (end == e) break;
            v->ids[k][v->n_ids[k]++] = (int32_t)x;
            e = end;
        }
        line = nl ? nl + 1 : line + strlen(line);
    }
    return true;
}

static void free_vtests(vtests *v) {
    for (size_t k = 0; k < v->n; k++) free(v->ids[k]);
    free(v->base_inp);
    free(v->base_out);
    free(v->texts);
    free(v->lens);
    free(v->ids);
    free(v->n_ids);
}

static void run_vtests(eng_tokenizer *t, const char *set) {
    vtests v;
    if (!read_vtests(set, &v)) SKIP("missing vocab-test vectors for %s", set);
    ASSERT_GE(v.n, 40);
    int bad = 0;
    for (size_t k = 0; k < v.n; k++)
        if (!check_ids(set, t, v.texts[k], v.lens[k], false, v.ids[k], v.n_ids[k])) bad++;
    size_t nv = v.n;
    free_vtests(&v);
    if (bad) FAIL_("%s: %d of %zu vectors differ", set, bad, nv);
}

TEST(vocab_tests_hf) {
    static const char *map[][3] = {
        {"llama-spm", "assets/tokenizers/llama2-hf-phi3/tokenizer.json", "assets/tokenizers/llama2-hf-phi3/tokenizer_config.json"},
        {"phi-3", "assets/tokenizers/llama2-hf-phi3/tokenizer.json", "assets/tokenizers/llama2-hf-phi3/tokenizer_config.json"},
        {"llama-bpe", "assets/tokenizers/llama3/tokenizer.json", "assets/tokenizers/llama3/tokenizer_config.json"},
        {"qwen2", "assets/tokenizers/qwen3/tokenizer.json", "assets/tokenizers/qwen3/tokenizer_config.json"},
        {"deepseek-r1-qwen", "assets/tokenizers/qwen3/tokenizer.json", "assets/tokenizers/qwen3/tokenizer_config.json"},
        {"gpt-2", "assets/tokenizers/gpt2/tokenizer.json", NULL},
    };
    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
        eng_tokenizer *t = load_hf(map[i][1], map[i][2]);
        run_vtests(t, map[i][0]);
        eng_tok_free(t);
    }
}

/* ---- minimal GGUF metadata reader (tokenizer.ggml.* only; test-local) ---- */

typedef struct gg {
    const uint8_t *p, *end;
    bool bad;
} gg;

static uint64_t gg_u(gg *g, int bytes) {
    if (g->p + bytes > g->end) {
        g->bad = true;
        return 0;
    }
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++) v |= (uint64_t)g->p[i] << (8 * i);
    g->p += bytes;
    return v;
}

static const char *gg_str(gg *g, size_t *len) {
    uint64_t n = gg_u(g, 8);
    if (g->bad || n > (uint64_t)(g->end - g->p)) {
        g->bad = true;
        return NULL;
    }
    const char *s = (const char *)g->p;
    g->p += n;
    *len = (size_t)n;
    return s;
}

static int gg_scalar_size(uint32_t type) {
    switch (type) {
    case 0: case 1: case 7: return 1;
    case 2: case 3: return 2;
    case 4: case 5: case 6: return 4;
    case 10: case 11: case 12: return 8;
    default: return 0;
    }
}

typedef struct gguf_tok {
    char model[32], pre[64];
    char **tokens;
    size_t *lens;
    float *scores;
    int32_t *types;
    char **merges;
    int n_vocab, n_merges;
    int bos, eos, unk, pad, add_bos, add_eos, add_space;
} gguf_tok;

static void free_gguf_tok(gguf_tok *o) {
    for (int i = 0; i < o->n_vocab; i++) free(o->tokens[i]);
    for (int i = 0; i < o->n_merges; i++) free(o->merges[i]);
    free(o->tokens);
    free(o->lens);
    free(o->merges);
    free(o->scores);
    free(o->types);
}

static bool key_is(const char *k, size_t kl, const char *want) {
    return strlen(want) == kl && memcmp(k, want, kl) == 0;
}

static bool gguf_read_tok(const char *path, gguf_tok *o, d2_mmap *m) {
    memset(o, 0, sizeof(*o));
    o->bos = o->eos = o->unk = o->pad = o->add_bos = o->add_eos = o->add_space = -1;
    if (d2_mmap_open(path, m) != D2_OK) return false;
    gg g = {m->data, m->data + m->size, false};
    if (gg_u(&g, 4) != 0x46554747u) return false; /* "GGUF" */
    if (gg_u(&g, 4) != 3) return false;
    gg_u(&g, 8); /* n_tensors */
    uint64_t n_kv = gg_u(&g, 8);
    for (uint64_t k = 0; k < n_kv && !g.bad; k++) {
        size_t kl = 0;
        const char *key = gg_str(&g, &kl);
        uint32_t type = (uint32_t)gg_u(&g, 4);
        if (type == 8) {
            size_t sl = 0;
            const char *s = gg_str(&g, &sl);
            if (key_is(key, kl, "tokenizer.ggml.model")) snprintf(o->model, sizeof(o->model), "%.*s", (int)sl, s);
            if (key_is(key, kl, "tokenizer.ggml.pre")) snprintf(o->pre, sizeof(o->pre), "%.*s", (int)sl, s);
        } else if (type == 9) {
            uint32_t et = (uint32_t)gg_u(&g, 4);
            uint64_t n = gg_u(&g, 8);
            bool toks = key_is(key, kl, "tokenizer.ggml.tokens"), mer = key_is(key, kl, "tokenizer.ggml.merges");
            bool sc = key_is(key, kl, "tokenizer.ggml.scores"), ty = key_is(key, kl, "tokenizer.ggml.token_type");
            if (toks) {
                o->n_vocab = (int)n;
                o->tokens = calloc(n, sizeof(char *));
                o->lens = calloc(n, sizeof(size_t));
            }
            if (mer) {
                o->n_merges = (int)n;
                o->merges = calloc(n, sizeof(char *));
            }
            if (sc) o->scores = calloc(n, sizeof(float));
            if (ty) o->types = calloc(n, sizeof(int32_t));
            for (uint64_t i = 0; i < n && !g.bad; i++) {
                if (et == 8) {
                    size_t sl = 0;
                    const char *s = gg_str(&g, &sl);
                    if (toks || mer) {
                        char *c = malloc(sl + 1);
                        memcpy(c, s, sl);
                        c[sl] = 0;
                        if (toks) {
                            o->tokens[i] = c;
                            o->lens[i] = sl;
                        } else {
                            o->merges[i] = c;
                        }
                    }
                } else {
                    int sz = gg_scalar_size(et);
                    if (!sz) return false;
                    uint64_t v = gg_u(&g, sz);
                    if (sc) {
                        uint32_t u = (uint32_t)v;
                        memcpy(&o->scores[i], &u, 4);
                    }
                    if (ty) o->types[i] = (int32_t)v;
                }
            }
        } else {
            int sz = gg_scalar_size(type);
            if (!sz) return false;
            uint64_t v = gg_u(&g, sz);
            if (key_is(key, kl, "tokenizer.ggml.bos_token_id")) o->bos = (int)v;
            if (key_is(key, kl, "tokenizer.ggml.eos_token_id")) o->eos = (int)v;
            if (key_is(key, kl, "tokenizer.ggml.unknown_token_id")) o->unk = (int)v;
            if (key_is(key, kl, "tokenizer.ggml.padding_token_id")) o->pad = (int)v;
            if (key_is(key, kl, "tokenizer.ggml.add_bos_token")) o->add_bos = (int)v;
            if (key_is(key, kl, "tokenizer.ggml.add_eos_token")) o->add_eos = (int)v;
            if (key_is(key, kl, "tokenizer.ggml.add_space_prefix")) o->add_space = (int)v;
        }
    }
    return !g.bad && o->tokens;
}

static eng_tokenizer *load_gguf_vocab(const char *rel, gguf_tok *gt) {
    const char *path = test_shared_path(rel);
    REQUIRE_FILE(path);
    d2_mmap m = {0};
    if (!gguf_read_tok(path, gt, &m)) FAIL_("cannot read GGUF metadata of %s", path);
    eng_tok_gguf_desc d = {
        .model = gt->model, .pre = gt->pre[0] ? gt->pre : NULL, .n_vocab = gt->n_vocab,
        .tokens = (const char *const *)gt->tokens, .token_lens = gt->lens, .scores = gt->scores,
        .token_types = gt->types, .n_merges = gt->n_merges, .merges = (const char *const *)gt->merges,
        .bos_id = gt->bos, .eos_id = gt->eos, .unk_id = gt->unk, .pad_id = gt->pad,
        .add_bos = gt->add_bos, .add_eos = gt->add_eos, .add_space_prefix = gt->add_space,
    };
    eng_tokenizer *t = NULL;
    int rc = eng_tok_load_gguf(&d, &t);
    d2_mmap_close(&m);
    free_gguf_tok(gt);
    if (rc != D2_OK) FAIL_("eng_tok_load_gguf(%s) = %s", path, d2_status_name(rc));
    return t;
}

TEST(vocab_tests_gguf) {
    static const char *sets[] = {"llama-spm", "phi-3", "gpt-2"};
    for (size_t i = 0; i < 3; i++) {
        char rel[256];
        snprintf(rel, sizeof(rel), "assets/vocab-tests/ggml-vocab-%s.gguf", sets[i]);
        gguf_tok gt;
        eng_tokenizer *t = load_gguf_vocab(rel, &gt);
        run_vtests(t, sets[i]);
        eng_tok_free(t);
    }
}

TEST(gguf_stories260k_bos_and_decode) {
    gguf_tok gt;
    eng_tokenizer *t = load_gguf_vocab("assets/models/stories260K/stories260K.gguf", &gt);
    ASSERT_EQ(eng_tok_n_vocab(t), 512);
    ASSERT_EQ(eng_tok_bos(t), 1);
    ASSERT_EQ(eng_tok_eos(t), 2);
    ASSERT(eng_tok_adds_bos(t));
    ASSERT(!eng_tok_adds_eos(t));
    /* Same ids as the HF tokenizer.json derived from the same vocabulary. */
    eng_tokenizer *h = load_hf("assets/models/stories260K/hf/tokenizer.json",
                               "assets/models/stories260K/hf/tokenizer_config.json");
    const char *txt = "Once upon a time, Lily saw a big red ball.\nShe said \"hi!\" 123";
    int32_t *a, *b;
    size_t na, nb;
    ASSERT_OK(eng_tok_encode(t, txt, strlen(txt), true, true, &a, &na));
    ASSERT_OK(eng_tok_encode(h, txt, strlen(txt), true, true, &b, &nb));
    ASSERT_EQ(a[0], 1);
    if (!check_ids("gguf-vs-hf", t, txt, strlen(txt), true, b, nb)) FAIL_("GGUF and HF disagree");
    char *d;
    ASSERT_OK(eng_tok_decode(t, a, na, true, &d));
    ASSERT_STREQ(d, txt);
    free(d);
    free(a);
    free(b);
    eng_tok_free(t);
    eng_tok_free(h);
}

/* ---- unit tests ---- */

static int32_t *enc(eng_tokenizer *t, const char *s, bool parse_special, size_t *n) {
    int32_t *ids;
    if (eng_tok_encode(t, s, strlen(s), false, parse_special, &ids, n) != D2_OK) FAIL_("encode");
    return ids;
}

TEST(special_token_splitting) {
    eng_tokenizer *t = load_hf("assets/tokenizers/qwen3/tokenizer.json", "assets/tokenizers/qwen3/tokenizer_config.json");
    int ims = eng_tok_find(t, "<|im_start|>"), ime = eng_tok_find(t, "<|im_end|>");
    ASSERT_EQ(ims, 151644);
    ASSERT_EQ(ime, 151645);
    ASSERT(eng_tok_is_special(t, ims));
    ASSERT_EQ(eng_tok_eos(t), 151645);
    size_t n;
    int32_t *ids = enc(t, "<|im_start|>user\nhi<|im_end|>", true, &n);
    ASSERT_GE(n, 4);
    ASSERT_EQ(ids[0], ims);
    ASSERT_EQ(ids[n - 1], ime);
    free(ids);
    /* parse_special=false: the text is tokenized as plain characters. */
    ids = enc(t, "<|im_start|>", false, &n);
    ASSERT_GT(n, 1);
    for (size_t i = 0; i < n; i++) ASSERT_NE(ids[i], ims);
    free(ids);
    /* decode with skip_special drops them, without keeps them. */
    ids = enc(t, "<|im_start|>hi<|im_end|>", true, &n);
    char *d;
    ASSERT_OK(eng_tok_decode(t, ids, n, true, &d));
    ASSERT_STREQ(d, "hi");
    free(d);
    ASSERT_OK(eng_tok_decode(t, ids, n, false, &d));
    ASSERT_STREQ(d, "<|im_start|>hi<|im_end|>");
    free(d);
    free(ids);
    eng_tok_free(t);

    /* Phi-3: rstrip on <|user|> eats the following newline/spaces. */
    t = load_hf("assets/tokenizers/llama2-hf-phi3/tokenizer.json", "assets/tokenizers/llama2-hf-phi3/tokenizer_config.json");
    int32_t *a, *b;
    size_t na, nb;
    a = enc(t, "<|user|>\n  Hi", true, &na);
    b = enc(t, "<|user|>Hi", true, &nb);
    ASSERT_EQ(na, nb);
    ASSERT(memcmp(a, b, na * sizeof(int32_t)) == 0);
    ASSERT_EQ(a[0], 32010);
    free(a);
    free(b);
    eng_tok_free(t);
}

TEST(nfc_normalization) {
    eng_tokenizer *t = load_hf("assets/tokenizers/qwen3/tokenizer.json", "assets/tokenizers/qwen3/tokenizer_config.json");
    static const char *pairs[][2] = {
        {"cafe\xCC\x81", "caf\xC3\xA9"},                  /* e + U+0301 -> é */
        {"A\xCC\x8A", "\xC3\x85"},                        /* A + ring -> Å */
        {"\xE2\x84\xAB", "\xC3\x85"},                     /* U+212B ANGSTROM -> Å (singleton) */
        {"\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8", "\xEA\xB0\x81"}, /* jamo -> 각 */
        {"e\xCC\xA3\xCC\x82", "\xE1\xBB\x87"},            /* e + dot below + circumflex -> ệ */
        {"e\xCC\x82\xCC\xA3", "\xE1\xBB\x87"},            /* reordered marks -> ệ */
    };
    for (size_t i = 0; i < sizeof(pairs) / sizeof(pairs[0]); i++) {
        size_t na, nb;
        int32_t *a = enc(t, pairs[i][0], true, &na), *b = enc(t, pairs[i][1], true, &nb);
        if (na != nb || memcmp(a, b, na * sizeof(int32_t)) != 0) {
            print_ids("decomposed:", a, na);
            print_ids("composed:  ", b, nb);
            FAIL_("NFC pair %zu", i);
        }
        free(a);
        free(b);
    }
    eng_tok_free(t);
    /* Without an NFC normalizer (Llama 3) the decomposed form differs. */
    t = load_hf("assets/tokenizers/llama3/tokenizer.json", NULL);
    size_t na, nb;
    int32_t *a = enc(t, "cafe\xCC\x81", true, &na), *b = enc(t, "caf\xC3\xA9", true, &nb);
    ASSERT(na != nb || memcmp(a, b, na * sizeof(int32_t)) != 0);
    free(a);
    free(b);
    eng_tok_free(t);
}

TEST(crlf_and_whitespace) {
    eng_tokenizer *t = load_hf("assets/tokenizers/llama3/tokenizer.json", "assets/tokenizers/llama3/tokenizer_config.json");
    /* "\r\n" is one token in Llama 3; "a\r\nb" -> a, \r\n, b. */
    size_t n;
    int32_t *ids = enc(t, "a\r\nb", true, &n);
    ASSERT_EQ(n, 3);
    size_t pl;
    const char *p = eng_tok_piece(t, ids[1], &pl);
    ASSERT(p && pl == 2 && memcmp(p, "\r\n", 2) == 0);
    free(ids);
    /* round trip through decode */
    const char *txt = "x\r\n\r\n  y\t\tz   \n";
    ids = enc(t, txt, true, &n);
    char *d;
    ASSERT_OK(eng_tok_decode(t, ids, n, true, &d));
    ASSERT_STREQ(d, txt);
    free(d);
    free(ids);
    eng_tok_free(t);
}

TEST(invalid_utf8_is_replaced) {
    eng_tokenizer *t = load_hf("assets/tokenizers/gpt2/tokenizer.json", NULL);
    /* each invalid byte -> U+FFFD before tokenizing */
    const char bad[] = "a\xFF" "b\xC3" "c\xED\xA0\x80";
    const char good[] = "a\xEF\xBF\xBD" "b\xEF\xBF\xBD" "c\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD";
    int32_t *a, *b;
    size_t na, nb;
    ASSERT_OK(eng_tok_encode(t, bad, sizeof(bad) - 1, false, true, &a, &na));
    ASSERT_OK(eng_tok_encode(t, good, sizeof(good) - 1, false, true, &b, &nb));
    ASSERT_EQ(na, nb);
    ASSERT(memcmp(a, b, na * sizeof(int32_t)) == 0);
    free(a);
    free(b);
    /* empty input */
    ASSERT_OK(eng_tok_encode(t, "", 0, true, true, &a, &na));
    ASSERT_EQ(na, 0);
    free(a);
    eng_tok_free(t);
}

/* Feeds ids one by one; checks every chunk is valid UTF-8 and the
 * concatenation equals want (when want != NULL). */
static void stream_check(eng_tokenizer *t, const int32_t *ids, size_t n, bool skip, const char *want) {
    eng_tok_stream s;
    eng_tok_stream_init(&s, skip);
    char *all = calloc(1, 1 << 16);
    size_t al = 0;
    size_t cap = 3 * eng_tok_max_piece_len(t) + 16;
    char *chunk = malloc(cap);
    for (size_t i = 0; i <= n; i++) {
        int r = i < n ? eng_tok_stream_feed(t, &s, ids[i], chunk, cap) : eng_tok_stream_finish(t, &s, chunk, cap);
        ASSERT_GE(r, 0);
        ASSERT_EQ((size_t)r, strlen(chunk));
        /* whole sequences only */
        for (int k = 0; k < r;) {
            unsigned char c = (unsigned char)chunk[k];
            int l = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 ? 2 : 0;
            ASSERT(l > 0 && k + l <= r);
            for (int q = 1; q < l; q++) ASSERT((chunk[k + q] & 0xC0) == 0x80);
            k += l;
        }
        memcpy(all + al, chunk, (size_t)r);
        al += (size_t)r;
    }
    if (want) ASSERT_STREQ(all, want);
    free(chunk);
    free(all);
}

TEST(stream_detokenize) {
    static const char *texts[] = {"Hello, 世界! 👨‍👩‍👧 Привет ខ្មែរ \t\n ok", " leading space", "日本語😀🇯🇵", "plain"};
    static const char *tj[][2] = {
        {"assets/tokenizers/llama3/tokenizer.json", NULL},
        {"assets/tokenizers/gpt2/tokenizer.json", NULL},
        {"assets/tokenizers/llama2-hf-phi3/tokenizer.json", "assets/tokenizers/llama2-hf-phi3/tokenizer_config.json"},
        {"assets/models/stories260K/hf/tokenizer.json", "assets/models/stories260K/hf/tokenizer_config.json"},
    };
    for (size_t k = 0; k < 4; k++) {
        eng_tokenizer *t = load_hf(tj[k][0], tj[k][1]);
        for (size_t i = 0; i < 4; i++) {
            int32_t *ids;
            size_t n;
            ASSERT_OK(eng_tok_encode(t, texts[i], strlen(texts[i]), true, true, &ids, &n));
            char *full;
            ASSERT_OK(eng_tok_decode(t, ids, n, true, &full));
            stream_check(t, ids, n, true, full);
            free(full);
            free(ids);
        }
        eng_tok_free(t);
    }
}

TEST(stream_split_multibyte) {
    /* stories260K has no CJK pieces: 世 is three byte-fallback tokens. */
    eng_tokenizer *t = load_hf("assets/models/stories260K/hf/tokenizer.json",
                               "assets/models/stories260K/hf/tokenizer_config.json");
    int32_t *ids;
    size_t n;
    ASSERT_OK(eng_tok_encode(t, "\xE4\xB8\x96", 3, false, true, &ids, &n));
    ASSERT_EQ(n, 4); /* '▁' + 3 bytes */
    eng_tok_stream s;
    eng_tok_stream_init(&s, true);
    char out[64];
    ASSERT_EQ(eng_tok_stream_feed(t, &s, ids[0], out, sizeof out), 0); /* leading space stripped */
    ASSERT_EQ(eng_tok_stream_feed(t, &s, ids[1], out, sizeof out), 0);
    ASSERT_EQ(eng_tok_stream_feed(t, &s, ids[2], out, sizeof out), 0);
    ASSERT_EQ(eng_tok_stream_feed(t, &s, ids[3], out, sizeof out), 3);
    ASSERT_STREQ(out, "\xE4\xB8\x96");
    /* incomplete at the end -> one U+FFFD from finish */
    eng_tok_stream_init(&s, true);
    ASSERT_EQ(eng_tok_stream_feed(t, &s, ids[1], out, sizeof out), 0);
    ASSERT_EQ(eng_tok_stream_finish(t, &s, out, sizeof out), 3);
    ASSERT_STREQ(out, "\xEF\xBF\xBD");
    /* a byte that can never start a sequence is replaced at once */
    int b80 = eng_tok_find(t, "<0x80>");
    ASSERT_GE(b80, 0);
    eng_tok_stream_init(&s, true);
    ASSERT_EQ(eng_tok_stream_feed(t, &s, b80, out, sizeof out), 3);
    /* a too small buffer is refused without losing state */
    eng_tok_stream_init(&s, true);
    ASSERT_EQ(eng_tok_stream_feed(t, &s, ids[1], out, sizeof out), 0);
    ASSERT_EQ(eng_tok_stream_feed(t, &s, ids[2], out, sizeof out), 0);
    ASSERT_EQ(eng_tok_stream_feed(t, &s, ids[3], out, 2), D2_ERANGE);
    ASSERT_EQ(eng_tok_stream_feed(t, &s, ids[3], out, sizeof out), 3);
    free(ids);
    eng_tok_free(t);

    /* byte-level: an emoji split over several byte-level tokens (GPT-2). */
    t = load_hf("assets/tokenizers/gpt2/tokenizer.json", NULL);
    const char *e = "\xF0\x9F\xA7\x91\xF0\x9F\x8F\xBD"; /* 🧑🏽 */
    ASSERT_OK(eng_tok_encode(t, e, strlen(e), false, true, &ids, &n));
    ASSERT_GT(n, 2);
    stream_check(t, ids, n, true, e);
    free(ids);
    eng_tok_free(t);
}

TEST(adds_bos_eos_and_find) {
    eng_tokenizer *t = load_hf("assets/models/stories260K/hf/tokenizer.json",
                               "assets/models/stories260K/hf/tokenizer_config.json");
    ASSERT(eng_tok_adds_bos(t));
    ASSERT(!eng_tok_adds_eos(t));
    ASSERT_EQ(eng_tok_bos(t), 1);
    ASSERT_EQ(eng_tok_eos(t), 2);
    ASSERT_EQ(eng_tok_find(t, "<s>"), 1);
    ASSERT_EQ(eng_tok_find(t, "<0x0A>"), 13);
    ASSERT_EQ(eng_tok_find(t, "no such piece"), -1);
    size_t pl;
    const char *p = eng_tok_piece(t, 13, &pl);
    ASSERT(p && pl == 1 && p[0] == '\n');
    ASSERT(eng_tok_piece(t, 512, &pl) == NULL);
    eng_tok_free(t);
    t = load_hf("assets/tokenizers/llama3/tokenizer.json", "assets/tokenizers/llama3/tokenizer_config.json");
    ASSERT(!eng_tok_adds_bos(t)); /* this tokenizer.json's post_processor is ByteLevel only */
    ASSERT_EQ(eng_tok_bos(t), 128000);
    ASSERT_EQ(eng_tok_eos(t), 128001);
    ASSERT_EQ(eng_tok_n_vocab(t), 128256);
    ASSERT_EQ(eng_tok_find(t, "<|eot_id|>"), 128009);
    ASSERT(eng_tok_is_special(t, 128009));
    ASSERT(!eng_tok_is_special(t, 1000));
    eng_tok_free(t);
}

TEST(unknown_regex_is_unsupported) {
    char path[] = "/tmp/d2tokXXXXXX";
    int fd = mkstemp(path);
    ASSERT(fd >= 0);
    const char *j = "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"ab\":2},\"merges\":[\"a b\"]},"
                    "\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"Regex\":\"\\\\w+\"},"
                    "\"behavior\":\"Isolated\",\"invert\":false},\"added_tokens\":[],"
                    "\"normalizer\":null,\"post_processor\":null,\"decoder\":null}";
    ASSERT_EQ(write(fd, j, strlen(j)), (ssize_t)strlen(j));
    close(fd);
    eng_tokenizer *t = NULL;
    ASSERT_EQ(eng_tok_load_hf(path, NULL, &t), D2_EUNSUPPORTED);
    ASSERT(t == NULL);
    ASSERT_EQ(eng_tok_load_hf("/nonexistent/tokenizer.json", NULL, &t), D2_ENOENT);
    unlink(path);
}

/* CPU seconds this process has used. The bounds below catch quadratic
 * loading or encoding (a regression costs minutes, not seconds); they are taken
 * on CPU time, not the wall clock, so a busy machine (CI runners, parallel
 * builds at low priority) cannot fail them. */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

TEST(load_time_and_long_input) {
    const char *j = test_shared_path("assets/tokenizers/llama3/tokenizer.json");
    REQUIRE_FILE(j);
    double t0 = cpu_now();
    eng_tokenizer *t = NULL;
    ASSERT_OK(eng_tok_load_hf(j, NULL, &t));
    double load_s = cpu_now() - t0;
    fprintf(stderr, "  llama3 tokenizer.json load: %.3f s CPU\n", load_s);
    ASSERT_LT(load_s * 1000, 5000); /* well under a second on a dev machine; slack for sanitizers */
    /* ~32k+ tokens: a long word-free run and ordinary text. */
    size_t n1 = 40000;
    char *s = malloc(n1 * 4 + 1);
    size_t o = 0;
    for (size_t i = 0; i < n1; i++) {
        const char *w = (i % 7 == 0) ? " the" : (i % 7 == 3) ? "\xE4\xB8\x96" : "x";
        memcpy(s + o, w, strlen(w));
        o += strlen(w);
    }
    t0 = cpu_now();
    int32_t *ids;
    size_t n;
    ASSERT_OK(eng_tok_encode(t, s, o, false, true, &ids, &n));
    double enc_s = cpu_now() - t0;
    fprintf(stderr, "  %zu bytes -> %zu tokens in %.3f s CPU\n", o, n, enc_s);
    ASSERT_GT(n, 1000);
    ASSERT_LT(enc_s * 1000, 5000);
    char *d;
    ASSERT_OK(eng_tok_decode(t, ids, n, true, &d));
    ASSERT_EQ(strlen(d), o);
    ASSERT(memcmp(d, s, o) == 0);
    free(d);
    free(ids);
    eng_tok_free(t);
    /* SentencePiece with no pre-tokenizer: the whole text is one word. */
    t = load_hf("assets/tokenizers/llama2-hf-phi3/tokenizer.json", NULL);
    for (size_t i = 0; i < o; i++)
        if (s[i] == ' ') s[i] = 'a';
    t0 = cpu_now();
    ASSERT_OK(eng_tok_encode(t, s, o, false, true, &ids, &n));
    enc_s = cpu_now() - t0;
    fprintf(stderr, "  spm: %zu bytes -> %zu tokens in %.3f s CPU\n", o, n, enc_s);
    ASSERT_LT(enc_s * 1000, 5000);
    free(ids);
    free(s);
    eng_tok_free(t);
}

/* The same vectors through the engine's own GGUF loader (engine/model/model.h);
 * skips while that loader cannot read these vocab-only files. */
TEST(vocab_tests_model_loader) {
    static const char *sets[] = {"llama-spm", "phi-3", "gpt-2"};
    for (size_t i = 0; i < 3; i++) {
        char rel[256];
        snprintf(rel, sizeof(rel), "assets/vocab-tests/ggml-vocab-%s.gguf", sets[i]);
        const char *path = test_shared_path(rel);
        REQUIRE_FILE(path);
        eng_tokenizer *t = NULL;
        int rc = eng_model_load_tokenizer(path, &t);
        if (rc != D2_OK) SKIP("eng_model_load_tokenizer(%s) = %s", path, d2_status_name(rc));
        run_vtests(t, sets[i]);
        eng_tok_free(t);
    }
}

/* The GGUF "gpt2" path with the Llama-3 and Qwen2 pre-tokenizers: no such
 * vocab GGUF is in the assets (too large), so the descriptor is built from
 * the tokenizer.json vocabulary and merges, as convert_hf_to_gguf would. */
static void gguf_from_hf(const char *json_rel, const char *pre, const char *set) {
    const char *path = test_shared_path(json_rel);
    REQUIRE_FILE(path);
    json_error_t err;
    json_t *j = json_load_file(path, 0, &err);
    if (!j) FAIL_("%s: %s", path, err.text);
    const json_t *vocab = json_object_get(json_object_get(j, "model"), "vocab");
    const json_t *merges = json_object_get(json_object_get(j, "model"), "merges");
    const json_t *added = json_object_get(j, "added_tokens");
    int n = 0;
    const char *key;
    json_t *val;
    json_object_foreach((json_t *)vocab, key, val) if ((int)json_integer_value(val) >= n) n = (int)json_integer_value(val) + 1;
    size_t i;
    json_t *x;
    json_array_foreach(added, i, x) if ((int)json_integer_value(json_object_get(x, "id")) >= n) n = (int)json_integer_value(json_object_get(x, "id")) + 1;
    const char **toks = calloc((size_t)n, sizeof(char *));
    int32_t *types = calloc((size_t)n, sizeof(int32_t));
    json_object_foreach((json_t *)vocab, key, val) {
        toks[json_integer_value(val)] = key;
        types[json_integer_value(val)] = 1;
    }
    json_array_foreach(added, i, x) {
        toks[json_integer_value(json_object_get(x, "id"))] = json_string_value(json_object_get(x, "content"));
        types[json_integer_value(json_object_get(x, "id"))] = 3;
    }
    for (int k = 0; k < n; k++)
        if (!toks[k]) {
            toks[k] = "";
            types[k] = 5;
        }
    size_t nm = json_array_size(merges);
    char **ms = calloc(nm, sizeof(char *));
    for (i = 0; i < nm; i++) {
        const json_t *m = json_array_get(merges, i);
        if (json_is_string(m)) {
            ms[i] = strdup(json_string_value(m));
        } else {
            const char *a = json_string_value(json_array_get(m, 0)), *b = json_string_value(json_array_get(m, 1));
            ms[i] = malloc(strlen(a) + strlen(b) + 2);
            sprintf(ms[i], "%s %s", a, b);
        }
    }
    eng_tok_gguf_desc d = {.model = "gpt2", .pre = pre, .n_vocab = n, .tokens = toks, .token_types = types,
                           .n_merges = (int)nm, .merges = (const char *const *)ms, .bos_id = -1, .eos_id = -1,
                           .unk_id = -1, .pad_id = -1, .add_bos = 0, .add_eos = 0, .add_space_prefix = -1};
    eng_tokenizer *t = NULL;
    ASSERT_OK(eng_tok_load_gguf(&d, &t));
    for (i = 0; i < nm; i++) free(ms[i]);
    free(ms);
    free(toks);
    free(types);
    json_decref(j);
    run_vtests(t, set);
    eng_tok_free(t);
}

TEST(gguf_gpt2_path_llama3_qwen2) {
    gguf_from_hf("assets/tokenizers/llama3/tokenizer.json", "llama-bpe", "llama-bpe");
    gguf_from_hf("assets/tokenizers/qwen3/tokenizer.json", "qwen2", "qwen2");
    gguf_from_hf("assets/tokenizers/qwen3/tokenizer.json", "deepseek-r1-qwen", "deepseek-r1-qwen");
}
