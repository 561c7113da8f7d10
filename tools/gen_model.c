/*
 * tools/gen_model.c — writes a deterministic random-weight model as a
 * Hugging Face directory (config.json, generation_config.json,
 * model.safetensors or N shards + model.safetensors.index.json, and a copy
 * of a tokenizer). Used to test loading and to benchmark shapes for which no
 * real weights are at hand.
 *
 *   build/tools/gen_model --out DIR --shape tiny|stories|100m|llama3-8b|custom
 *       [--layers N --dim D --heads H --kv-heads K --ffn F --vocab V --ctx C]
 *       [--dtype f32|bf16|f16] [--seed S] [--tokenizer PATH|none]
 *       [--arch llama|qwen2|mistral] [--shards N] [--tied 0|1]
 *
 * Weights are N(0, 0.02^2) from a per-tensor splitmix64 stream (so a tensor's
 * values do not depend on sharding), norms are 1, biases N(0, 0.02^2).
 * Tensors are generated and written in chunks: an 8B model never sits in
 * memory. The default tokenizer of each shape is read from the shared assets
 * (D2_SHARED, default ../shared). Command-line tool: exits on error.
 */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "common/util.h"

typedef struct shape {
    const char *name;
    int layers, dim, heads, kv, ffn, vocab, ctx;
    double theta;
    bool llama3_rope;
    int tied; /* -1: the arch default */
    const char *tok_rel; /* default tokenizer under D2_SHARED */
    const char *dtype;
} shape;

static const shape SHAPES[] = {
    {"tiny", 2, 64, 4, 2, 128, 512, 512, 10000.0, false, -1,
     "assets/models/stories260K/hf/tokenizer.json", "f32"},
    {"stories", 5, 64, 8, 4, 172, 512, 512, 10000.0, false, 1,
     "assets/models/stories260K/hf/tokenizer.json", "f32"},
    /* 12 x 6.29M + 32064 x 768 (tied) = 100.1M parameters */
    {"100m", 12, 768, 12, 4, 2048, 32064, 2048, 10000.0, false, 1,
     "assets/tokenizers/llama2-hf-phi3/tokenizer.json", "bf16"},
    {"llama3-8b", 32, 4096, 32, 8, 14336, 128256, 8192, 500000.0, true, 0,
     "assets/tokenizers/llama3/tokenizer.json", "bf16"},
    {"custom", 2, 64, 4, 2, 128, 512, 512, 10000.0, false, -1, NULL, "f32"},
};

typedef struct wt {
    char name[96];
    int ndim;
    int64_t rows, cols; /* ndim 1: cols only */
    int kind;           /* 0 weight, 1 norm (ones), 2 bias */
    int shard;
} wt;

/* Prints "gen_model: what arg" and exits (a tool, not library code). */
static void die(const char *what, const char *arg) {
    fprintf(stderr, "gen_model: %s %s\n", what, arg ? arg : "");
    exit(1);
}

/* mkdir -p. */
static void make_dirs(const char *path) {
    char p[4096];
    snprintf(p, sizeof p, "%s", path);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST) die("cannot create", p);
        *s = '/';
    }
    if (mkdir(p, 0755) != 0 && errno != EEXIST) die("cannot create", p);
}

static void usage(void) {
    fprintf(stderr,
            "usage: gen_model --out DIR --shape tiny|stories|100m|llama3-8b|custom\n"
            "  [--layers N --dim D --heads H --kv-heads K --ffn F --vocab V --ctx C]\n"
            "  [--dtype f32|bf16|f16] [--seed S] [--tokenizer PATH|none]\n"
            "  [--arch llama|qwen2|mistral] [--shards N] [--tied 0|1]\n");
    exit(2);
}

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Standard normal pairs by Box-Muller from 53-bit uniforms. */
static void normals(uint64_t *s, float *out, size_t n) {
    for (size_t i = 0; i < n; i += 2) {
        double u1 = ((double)(splitmix(s) >> 11) + 1.0) * 0x1.0p-53;
        double u2 = (double)(splitmix(s) >> 11) * 0x1.0p-53;
        double r = sqrt(-2.0 * log(u1)), a = 2.0 * M_PI * u2;
        out[i] = (float)(r * cos(a));
        if (i + 1 < n) out[i + 1] = (float)(r * sin(a));
    }
}

static size_t dtype_size(const char *dt) { return strcmp(dt, "f32") == 0 ? 4 : 2; }
static const char *dtype_st(const char *dt) {
    return strcmp(dt, "f32") == 0 ? "F32" : strcmp(dt, "f16") == 0 ? "F16" : "BF16";
}

static int64_t nelem(const wt *w) { return w->ndim == 1 ? w->cols : w->rows * w->cols; }

static void write_tensor(FILE *f, const wt *w, int idx, uint64_t seed, const char *dt,
                         const char *path) {
    enum { CH = 1 << 16 };
    static float buf[CH];
    static uint16_t hb[CH];
    uint64_t s = seed * 0x2545f4914f6cdd1dull + (uint64_t)idx * 0x9e3779b97f4a7c15ull + 1;
    int64_t n = nelem(w);
    size_t es = dtype_size(dt);
    for (int64_t off = 0; off < n; off += CH) {
        size_t k = (size_t)(n - off < CH ? n - off : CH);
        if (w->kind == 1) {
            for (size_t i = 0; i < k; i++) buf[i] = 1.0f;
        } else {
            normals(&s, buf, k);
            for (size_t i = 0; i < k; i++) buf[i] *= 0.02f;
        }
        const void *src = buf;
        if (es == 2) {
            bool bf = strcmp(dt, "bf16") == 0;
            for (size_t i = 0; i < k; i++) hb[i] = bf ? d2_f32_to_bf16(buf[i]) : d2_f32_to_f16(buf[i]);
            src = hb;
        }
        if (fwrite(src, es, k, f) != k) die("write failed", path);
    }
}

static void write_json(const char *dir, const char *name, json_t *j) {
    char p[4096];
    if (d2_path_join(p, sizeof p, dir, name)) die("path too long", dir);
    if (json_dump_file(j, p, JSON_INDENT(2) | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9)) != 0)
        die("cannot write", p);
}

static void copy_file(const char *src, const char *dir, const char *name) {
    char *buf = NULL;
    size_t len = 0;
    if (d2_read_file(src, &buf, &len) != 0) die("cannot read", src);
    char p[4096];
    if (d2_path_join(p, sizeof p, dir, name)) die("path too long", dir);
    FILE *f = fopen(p, "wb");
    if (!f || fwrite(buf, 1, len, f) != len) die("cannot write", p);
    fclose(f);
    free(buf);
}

/* Id of a token's text in tokenizer.json (added tokens or model.vocab), or -1. */
static int tok_id(json_t *tj, const char *text) {
    json_t *added = json_object_get(tj, "added_tokens"), *e;
    size_t i;
    json_array_foreach(added, i, e) {
        json_t *c = json_object_get(e, "content"), *id = json_object_get(e, "id");
        if (json_is_string(c) && json_is_integer(id) && strcmp(json_string_value(c), text) == 0)
            return (int)json_integer_value(id);
    }
    json_t *v = json_object_get(json_object_get(json_object_get(tj, "model"), "vocab"), text);
    return json_is_integer(v) ? (int)json_integer_value(v) : -1;
}

/* Largest id used by the tokenizer + 1. */
static int tok_size(json_t *tj) {
    int mx = -1;
    json_t *added = json_object_get(tj, "added_tokens"), *e;
    size_t i;
    json_array_foreach(added, i, e) {
        json_t *id = json_object_get(e, "id");
        if (json_is_integer(id) && json_integer_value(id) > mx) mx = (int)json_integer_value(id);
    }
    const char *k;
    json_t *v;
    json_object_foreach(json_object_get(json_object_get(tj, "model"), "vocab"), k, v)
        if (json_is_integer(v) && json_integer_value(v) > mx) mx = (int)json_integer_value(v);
    return mx + 1;
}

static int arg_int(const char *s) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || v <= 0 || v > (1L << 30)) die("bad number", s);
    return (int)v;
}

/* Everything the command line decides, with the shape's defaults filled in. */
typedef struct gm_spec {
    const char *out, *shape_name, *dtype, *arch;
    const shape *sh;
    bool qwen, mistral;
    int layers, dim, heads, kv, ffn, vocab, ctx, shards, tied, hd;
    uint64_t seed;
    char tokpath[4096]; /* tokenizer to copy; "" = none */
} gm_spec;

static void parse_args(int argc, char **argv, gm_spec *g, const char **tok) {
    *g = (gm_spec){.arch = "llama", .shards = 1, .tied = -2, .seed = 1};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--out")) g->out = v;
        else if (!strcmp(a, "--shape")) g->shape_name = v;
        else if (!strcmp(a, "--dtype")) g->dtype = v;
        else if (!strcmp(a, "--tokenizer")) *tok = v;
        else if (!strcmp(a, "--arch")) g->arch = v;
        else if (!strcmp(a, "--seed")) g->seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--layers")) g->layers = arg_int(v);
        else if (!strcmp(a, "--dim")) g->dim = arg_int(v);
        else if (!strcmp(a, "--heads")) g->heads = arg_int(v);
        else if (!strcmp(a, "--kv-heads")) g->kv = arg_int(v);
        else if (!strcmp(a, "--ffn")) g->ffn = arg_int(v);
        else if (!strcmp(a, "--vocab")) g->vocab = arg_int(v);
        else if (!strcmp(a, "--ctx")) g->ctx = arg_int(v);
        else if (!strcmp(a, "--shards")) g->shards = arg_int(v);
        else if (!strcmp(a, "--tied")) g->tied = atoi(v) ? 1 : 0;
        else usage();
    }
    if (!g->out || !g->shape_name) usage();
}

/* The shape's defaults for what the command line left unset, and the checks. */
static void resolve_shape(gm_spec *g) {
    for (size_t i = 0; i < sizeof SHAPES / sizeof SHAPES[0]; i++)
        if (!strcmp(SHAPES[i].name, g->shape_name)) g->sh = &SHAPES[i];
    const shape *sh = g->sh;
    if (!sh) die("unknown shape", g->shape_name);
    g->qwen = !strcmp(g->arch, "qwen2");
    g->mistral = !strcmp(g->arch, "mistral");
    if (!g->qwen && !g->mistral && strcmp(g->arch, "llama")) die("unknown arch", g->arch);
    g->layers = g->layers ? g->layers : sh->layers;
    g->dim = g->dim ? g->dim : sh->dim;
    g->heads = g->heads ? g->heads : sh->heads;
    g->kv = g->kv ? g->kv : (g->heads == sh->heads ? sh->kv : g->heads);
    g->ffn = g->ffn ? g->ffn : sh->ffn;
    g->vocab = g->vocab ? g->vocab : sh->vocab;
    g->ctx = g->ctx ? g->ctx : sh->ctx;
    g->dtype = g->dtype ? g->dtype : sh->dtype;
    if (strcmp(g->dtype, "f32") && strcmp(g->dtype, "f16") && strcmp(g->dtype, "bf16"))
        die("unknown dtype", g->dtype);
    if (g->dim % g->heads || g->heads % g->kv || (g->dim / g->heads) % 2)
        die("dim/heads/kv-heads do not divide", NULL);
    if (g->tied == -2) g->tied = sh->tied >= 0 ? sh->tied : g->qwen;
    g->hd = g->dim / g->heads;
}

/* Tokenizer: explicit path, "none", or the shape's default if present. */
static void resolve_tokenizer(gm_spec *g, const char *tok) {
    g->tokpath[0] = '\0';
    if (tok && strcmp(tok, "none")) {
        snprintf(g->tokpath, sizeof g->tokpath, "%s", tok);
    } else if (!tok && g->sh->tok_rel) {
        const char *shared = getenv("D2_SHARED");
        snprintf(g->tokpath, sizeof g->tokpath, "%s/%s", shared && *shared ? shared : "../shared", g->sh->tok_rel);
        FILE *t = fopen(g->tokpath, "rb");
        if (!t) {
            fprintf(stderr, "gen_model: warning: default tokenizer %s not found; none copied\n", g->tokpath);
            g->tokpath[0] = '\0';
        } else {
            fclose(t);
        }
    }
}

/* BOS and the EOS ids (first: the main one) from the tokenizer, or 1 and 2. */
static json_t *special_ids(const gm_spec *g, int *bos) {
    int eos = 2;
    json_t *eos_ids = json_array();
    *bos = 1;
    if (!g->tokpath[0]) {
        json_array_append_new(eos_ids, json_integer(eos));
        return eos_ids;
    }
    json_error_t e;
    json_t *tj = json_load_file(g->tokpath, 0, &e);
    if (!tj) die("cannot parse tokenizer", g->tokpath);
    int n = tok_size(tj);
    if (n > g->vocab) {
        char msg[64];
        snprintf(msg, sizeof msg, "%d > vocab %d", n, g->vocab);
        die("tokenizer ids exceed the vocabulary (use --vocab):", msg);
    }
    const char *bos_c[] = {"<s>", "<|begin_of_text|>"};
    const char *eos_c[] = {"</s>", "<|end_of_text|>", "<|endoftext|>"};
    const char *more[] = {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>"};
    *bos = eos = -1;
    for (size_t i = 0; i < 2 && *bos < 0; i++) *bos = tok_id(tj, bos_c[i]);
    for (size_t i = 0; i < 3 && eos < 0; i++) eos = tok_id(tj, eos_c[i]);
    if (eos >= 0) json_array_append_new(eos_ids, json_integer(eos));
    for (size_t i = 0; i < 4; i++) {
        int id = tok_id(tj, more[i]);
        if (id >= 0 && id != eos) json_array_append_new(eos_ids, json_integer(id));
    }
    json_decref(tj);
    return eos_ids;
}

/* The tensor list in file order; *nt its length. */
static wt *tensor_list(const gm_spec *g, int *nt_out) {
    wt *ws = calloc((size_t)(3 + g->layers * 12), sizeof *ws);
    if (!ws) die("out of memory", NULL);
    int nt = 0;
    int64_t qd = (int64_t)g->heads * g->hd, kvd = (int64_t)g->kv * g->hd;
#define ADD(nd, r, c, k, ...)                                                    \
    do {                                                                         \
        wt *w_ = &ws[nt++];                                                      \
        snprintf(w_->name, sizeof w_->name, __VA_ARGS__);                        \
        w_->ndim = (nd);                                                         \
        w_->rows = (r);                                                          \
        w_->cols = (c);                                                          \
        w_->kind = (k);                                                          \
    } while (0)
    ADD(2, g->vocab, g->dim, 0, "model.embed_tokens.weight");
    for (int l = 0; l < g->layers; l++) {
        ADD(1, 1, g->dim, 1, "model.layers.%d.input_layernorm.weight", l);
        ADD(2, qd, g->dim, 0, "model.layers.%d.self_attn.q_proj.weight", l);
        ADD(2, kvd, g->dim, 0, "model.layers.%d.self_attn.k_proj.weight", l);
        ADD(2, kvd, g->dim, 0, "model.layers.%d.self_attn.v_proj.weight", l);
        if (g->qwen) {
            ADD(1, 1, qd, 2, "model.layers.%d.self_attn.q_proj.bias", l);
            ADD(1, 1, kvd, 2, "model.layers.%d.self_attn.k_proj.bias", l);
            ADD(1, 1, kvd, 2, "model.layers.%d.self_attn.v_proj.bias", l);
        }
        ADD(2, g->dim, qd, 0, "model.layers.%d.self_attn.o_proj.weight", l);
        ADD(1, 1, g->dim, 1, "model.layers.%d.post_attention_layernorm.weight", l);
        ADD(2, g->ffn, g->dim, 0, "model.layers.%d.mlp.gate_proj.weight", l);
        ADD(2, g->ffn, g->dim, 0, "model.layers.%d.mlp.up_proj.weight", l);
        ADD(2, g->dim, g->ffn, 0, "model.layers.%d.mlp.down_proj.weight", l);
    }
    ADD(1, 1, g->dim, 1, "model.norm.weight");
    if (!g->tied) ADD(2, g->vocab, g->dim, 0, "lm_head.weight");
#undef ADD
    *nt_out = nt;
    return ws;
}

/* Balanced split by bytes: sets ws[i].shard; returns the total bytes. */
static uint64_t assign_shards(wt *ws, int nt, int shards, size_t es) {
    uint64_t total = 0, cum = 0;
    for (int i = 0; i < nt; i++) total += (uint64_t)nelem(&ws[i]) * es;
    int cur = 0;
    for (int i = 0; i < nt; i++) {
        /* Shard by cumulative bytes, but never leave a shard empty: the
         * remaining tensors must cover the remaining shards, one step at a time. */
        int want = total ? (int)(cum * (uint64_t)shards / total) : 0;
        if (want > shards - 1) want = shards - 1;
        if (want < shards - (nt - i)) want = shards - (nt - i);
        if (want > cur + 1) want = cur + 1;
        if (want > cur) cur = want;
        ws[i].shard = cur;
        cum += (uint64_t)nelem(&ws[i]) * es;
    }
    return total;
}

/* One safetensors file: the header (entries added to wmap) then the tensors. */
static void write_shard(const gm_spec *g, const wt *ws, int nt, int s, json_t *wmap) {
    size_t es = dtype_size(g->dtype);
    char fname[128], path[4096];
    if (g->shards == 1) snprintf(fname, sizeof fname, "model.safetensors");
    else snprintf(fname, sizeof fname, "model-%05d-of-%05d.safetensors", s + 1, g->shards);
    if (d2_path_join(path, sizeof path, g->out, fname)) die("path too long", g->out);
    json_t *hdr = json_object();
    json_t *meta = json_object();
    json_object_set_new(meta, "format", json_string("pt"));
    json_object_set_new(hdr, "__metadata__", meta);
    uint64_t off = 0;
    for (int i = 0; i < nt; i++) {
        if (ws[i].shard != s) continue;
        uint64_t nb = (uint64_t)nelem(&ws[i]) * es;
        json_t *e = json_object(), *shp = json_array(), *offs = json_array();
        if (ws[i].ndim == 2) json_array_append_new(shp, json_integer(ws[i].rows));
        json_array_append_new(shp, json_integer(ws[i].cols));
        json_array_append_new(offs, json_integer((json_int_t)off));
        json_array_append_new(offs, json_integer((json_int_t)(off + nb)));
        json_object_set_new(e, "dtype", json_string(dtype_st(g->dtype)));
        json_object_set_new(e, "shape", shp);
        json_object_set_new(e, "data_offsets", offs);
        json_object_set_new(hdr, ws[i].name, e);
        json_object_set_new(wmap, ws[i].name, json_string(fname));
        off += nb;
    }
    char *js = json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(hdr);
    if (!js) die("out of memory", NULL);
    size_t jl = strlen(js), padded = (jl + 7) / 8 * 8;
    FILE *f = fopen(path, "wb");
    if (!f) die("cannot create", path);
    uint64_t hl = padded;
    if (fwrite(&hl, 8, 1, f) != 1 || fwrite(js, 1, jl, f) != jl) die("write failed", path);
    for (size_t k = jl; k < padded; k++) fputc(' ', f);
    free(js);
    for (int i = 0; i < nt; i++)
        if (ws[i].shard == s) write_tensor(f, &ws[i], i, g->seed, g->dtype, path);
    if (fclose(f) != 0) die("write failed", path);
}

/* Every shard, and the index when there are several. */
static void write_weights(const gm_spec *g, const wt *ws, int nt, uint64_t total) {
    json_t *wmap = json_object();
    for (int s = 0; s < g->shards; s++) write_shard(g, ws, nt, s, wmap);
    if (g->shards > 1) {
        json_t *idx = json_object(), *meta = json_object();
        json_object_set_new(meta, "total_size", json_integer((json_int_t)total));
        json_object_set_new(idx, "metadata", meta);
        json_object_set_new(idx, "weight_map", wmap);
        write_json(g->out, "model.safetensors.index.json", idx);
        json_decref(idx);
    } else {
        json_decref(wmap);
    }
}

/* config.json as transformers writes it for the arch. */
static void write_config(const gm_spec *g, int bos, json_t *eos_ids) {
    json_t *c = json_object(), *archs = json_array();
    json_array_append_new(archs, json_string(g->qwen ? "Qwen2ForCausalLM"
                                             : g->mistral ? "MistralForCausalLM"
                                                          : "LlamaForCausalLM"));
    json_object_set_new(c, "architectures", archs);
    json_object_set_new(c, "model_type", json_string(g->qwen ? "qwen2" : g->mistral ? "mistral" : "llama"));
    json_object_set_new(c, "hidden_size", json_integer(g->dim));
    json_object_set_new(c, "intermediate_size", json_integer(g->ffn));
    json_object_set_new(c, "num_hidden_layers", json_integer(g->layers));
    json_object_set_new(c, "num_attention_heads", json_integer(g->heads));
    json_object_set_new(c, "num_key_value_heads", json_integer(g->kv));
    json_object_set_new(c, "head_dim", json_integer(g->hd));
    json_object_set_new(c, "vocab_size", json_integer(g->vocab));
    json_object_set_new(c, "max_position_embeddings", json_integer(g->ctx));
    json_object_set_new(c, "rms_norm_eps", json_real(g->qwen ? 1e-6 : 1e-5));
    json_object_set_new(c, "rope_theta", json_real(g->sh->theta));
    if (g->sh->llama3_rope && !g->qwen) {
        json_t *rs = json_object();
        json_object_set_new(rs, "rope_type", json_string("llama3"));
        json_object_set_new(rs, "factor", json_real(8.0));
        json_object_set_new(rs, "low_freq_factor", json_real(1.0));
        json_object_set_new(rs, "high_freq_factor", json_real(4.0));
        json_object_set_new(rs, "original_max_position_embeddings", json_integer(8192));
        json_object_set_new(c, "rope_scaling", rs);
    } else {
        json_object_set_new(c, "rope_scaling", json_null());
    }
    json_object_set_new(c, "hidden_act", json_string("silu"));
    json_object_set_new(c, "tie_word_embeddings", json_boolean(g->tied));
    if (!g->qwen) json_object_set_new(c, "attention_bias", json_false());
    if (g->qwen) {
        json_object_set_new(c, "use_sliding_window", json_false());
        json_object_set_new(c, "sliding_window", json_integer(g->ctx));
    }
    if (g->mistral) json_object_set_new(c, "sliding_window", json_null());
    json_object_set_new(c, "bos_token_id", bos >= 0 ? json_integer(bos) : json_null());
    json_object_set_new(c, "eos_token_id", json_integer(json_integer_value(json_array_get(eos_ids, 0))));
    json_object_set_new(c, "torch_dtype",
                        json_string(!strcmp(g->dtype, "f32") ? "float32"
                                    : !strcmp(g->dtype, "f16") ? "float16" : "bfloat16"));
    write_json(g->out, "config.json", c);
    json_decref(c);
}

static void write_generation_config(const gm_spec *g, int bos, json_t *eos_ids) {
    json_t *gc = json_object();
    json_object_set_new(gc, "bos_token_id", bos >= 0 ? json_integer(bos) : json_null());
    json_object_set_new(gc, "eos_token_id",
                        json_array_size(eos_ids) == 1 ? json_incref(json_array_get(eos_ids, 0))
                                                      : json_incref(eos_ids));
    write_json(g->out, "generation_config.json", gc);
    json_decref(gc);
}

/* tokenizer.json, and tokenizer_config.json when it sits beside it. */
static void copy_tokenizer(const gm_spec *g) {
    if (!g->tokpath[0]) return;
    copy_file(g->tokpath, g->out, "tokenizer.json");
    char cfgp[4096];
    snprintf(cfgp, sizeof cfgp, "%s", g->tokpath);
    char *slash = strrchr(cfgp, '/');
    size_t room = slash ? sizeof cfgp - (size_t)(slash + 1 - cfgp) : 0;
    if (slash && room > 22) {
        snprintf(slash + 1, room, "tokenizer_config.json");
        FILE *t = fopen(cfgp, "rb");
        if (t) {
            fclose(t);
            copy_file(cfgp, g->out, "tokenizer_config.json");
        }
    }
}

int main(int argc, char **argv) {
    static gm_spec g; /* 4 KiB of path: not on the stack */
    const char *tok = NULL;
    parse_args(argc, argv, &g, &tok);
    resolve_shape(&g);
    resolve_tokenizer(&g, tok);
    int bos;
    json_t *eos_ids = special_ids(&g, &bos);
    int nt;
    wt *ws = tensor_list(&g, &nt);
    if (g.shards > nt) g.shards = nt;
    uint64_t total = assign_shards(ws, nt, g.shards, dtype_size(g.dtype));
    int64_t nparams = 0;
    for (int i = 0; i < nt; i++) nparams += nelem(&ws[i]);
    make_dirs(g.out);
    write_weights(&g, ws, nt, total);
    write_config(&g, bos, eos_ids);
    write_generation_config(&g, bos, eos_ids);
    json_decref(eos_ids);
    copy_tokenizer(&g);
    printf("gen_model: wrote %s: %s %s, %d layers, dim %d, %d/%d heads, ffn %d, vocab %d, "
           "%.2fM params, %d shard(s), %s\n",
           g.out, g.shape_name, g.arch, g.layers, g.dim, g.heads, g.kv, g.ffn, g.vocab, (double)nparams / 1e6,
           g.shards, g.dtype);
    free(ws);
    return 0;
}
