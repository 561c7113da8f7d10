/*
 * engine/model/model.c — model loading from GGUF files and Hugging Face
 * directories (see model.h for the contract; engine/ is the only caller).
 *
 * Both sources go through the same binder: a "source" answers "where is the
 * tensor called X, what dtype and shape" and bind() checks the shape the
 * config predicts, then records a view into the memory map. Nothing reads
 * the weight bytes at load time except the tiny rope_freqs vector, so a
 * load costs O(metadata) and the OS pages weights in on first use.
 *
 * Sources:
 *   GGUF  — engine/model/gguf.c parses the header; dims are fastest-first, so a
 *           [ne0, ne1] tensor is rows = ne1, cols = ne0. rope_neox is false
 *           for arch "llama" (llama.cpp permutes Q/K rows on export) and true
 *           for "qwen2".
 *   HF    — config.json (+ generation_config.json), model.safetensors or the
 *           shards named by model.safetensors.index.json, parsed by
 *           engine/model/safetensors.c. rope_neox is true.
 */
#include "engine/model/model.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/status.h"
#include "engine/model/gguf.h"
#include "engine/model/safetensors.h"
#include "engine/tok/tokenizer.h"

/* Sanity limits on config values: they bound every allocation and keep all
 * products of dimensions far inside int64. */
#define LIM_LAYERS ENG_MODEL_MAX_LAYERS
#define LIM_DIM (1 << 17)
#define LIM_HEADS 4096
#define LIM_HEAD_DIM 4096
#define LIM_FFN (1 << 20)
#define LIM_VOCAB (1 << 23)
#define LIM_CTX (1 << 24)

typedef struct shard {
    char *path;   /* owned */
    st_file st;
} shard;

typedef struct model_priv {
    gguf_file gg;       /* GGUF source (zeroed for HF) */
    shard *shards;      /* HF shards, parallel to eng_model.maps */
    int n_shards;
    const st_tensor **st_sorted; /* all shard tensors sorted by name */
    int *st_shard;               /* shard index of st_sorted[i] */
    size_t n_st;
    char **strs;        /* owned strings behind eng_tensor.name */
    size_t n_strs, cap_strs;
} model_priv;

const char *eng_dtype_name(eng_dtype t) {
    switch (t) {
    case ENG_F32: return "F32";
    case ENG_F16: return "F16";
    case ENG_BF16: return "BF16";
    case ENG_Q8_0: return "Q8_0";
    }
    return "unknown";
}

static int64_t tensor_bytes(const eng_tensor *t) {
    int64_t n = t->rows * t->cols;
    switch (t->dtype) {
    case ENG_F32: return n * 4;
    case ENG_F16: case ENG_BF16: return n * 2;
    case ENG_Q8_0: return n / 32 * 34;
    }
    return 0;
}

void eng_tensor_row_f32(const eng_tensor *t, int64_t r, float *out) {
    const int64_t nc = t->cols;
    const uint8_t *base = (const uint8_t *)t->data;
    switch (t->dtype) {
    case ENG_F32:
        memcpy(out, base + (size_t)(r * nc) * 4, (size_t)nc * 4);
        break;
    case ENG_F16:
    case ENG_BF16: {
        const uint8_t *p = base + (size_t)(r * nc) * 2;
        for (int64_t i = 0; i < nc; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            out[i] = t->dtype == ENG_F16 ? d2_f16_to_f32(h) : d2_bf16_to_f32(h);
        }
        break;
    }
    case ENG_Q8_0: {
        const uint8_t *p = base + (size_t)(r * (nc / 32)) * 34;
        for (int64_t b = 0; b < nc / 32; b++, p += 34) {
            uint16_t h;
            memcpy(&h, p, 2);
            float d = d2_f16_to_f32(h);
            for (int i = 0; i < 32; i++) out[b * 32 + i] = d * (float)(int8_t)p[2 + i];
        }
        break;
    }
    }
}

/* Calls fn on every distinct tensor of m that has data. */
static void each_tensor(const eng_model *m, void (*fn)(const eng_tensor *, int64_t *),
                        int64_t *acc) {
    fn(&m->tok_embd, acc);
    fn(&m->out_norm, acc);
    if (m->output.data && m->output.data != m->tok_embd.data) fn(&m->output, acc);
    fn(&m->rope_freqs, acc);
    for (int l = 0; m->layers && l < m->cfg.n_layers; l++) {
        const eng_layer_weights *w = &m->layers[l];
        const eng_tensor *ts[] = {&w->attn_norm, &w->wq, &w->wk, &w->wv, &w->wo, &w->bq,
                                  &w->bk, &w->bv, &w->ffn_norm, &w->w_gate, &w->w_up,
                                  &w->w_down};
        for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) fn(ts[i], acc);
    }
}

static void acc_params(const eng_tensor *t, int64_t *acc) {
    if (t->data) *acc += t->rows * t->cols;
}
static void acc_bytes(const eng_tensor *t, int64_t *acc) {
    if (t->data) *acc += tensor_bytes(t);
}

int64_t eng_model_n_params(const eng_model *m) {
    int64_t n = 0;
    if (m) each_tensor(m, acc_params, &n);
    return n;
}

int64_t eng_model_weight_bytes(const eng_model *m) {
    int64_t n = 0;
    if (m) each_tensor(m, acc_bytes, &n);
    return n;
}

void eng_model_free(eng_model *m) {
    if (!m) return;
    model_priv *p = m->priv;
    if (p) {
        gguf_free(&p->gg);
        for (int i = 0; i < p->n_shards; i++) {
            st_free(&p->shards[i].st);
            free(p->shards[i].path);
        }
        free(p->shards);
        free(p->st_sorted);
        free(p->st_shard);
        for (size_t i = 0; i < p->n_strs; i++) free(p->strs[i]);
        free(p->strs);
        free(p);
    }
    for (int i = 0; i < m->n_maps; i++) d2_mmap_close(&m->maps[i]);
    free(m->maps);
    eng_tok_free(m->tok);
    free(m->layers);
    free(m->path);
    free(m->chat_template);
    free(m);
}

static const char *intern(model_priv *p, const char *s) {
    if (p->n_strs == p->cap_strs) {
        size_t nc = p->cap_strs ? p->cap_strs * 2 : 64;
        char **ns = realloc(p->strs, nc * sizeof *ns);
        if (!ns) return NULL;
        p->strs = ns;
        p->cap_strs = nc;
    }
    char *c = strdup(s);
    if (!c) return NULL;
    p->strs[p->n_strs++] = c;
    return c;
}

/* ------------------------------------------------------------------------ */
/* Tensor binding, shared by both sources.                                    */

typedef struct src_tensor {
    const void *data;
    int dtype;               /* eng_dtype or -1 */
    const char *dtype_name;
    int ndim;
    int64_t shape[8];        /* slowest-varying first */
    const char *file;        /* file holding it (for messages) */
} src_tensor;

typedef struct binder {
    eng_model *m;
    model_priv *p;
    const char *file; /* default file name for messages */
    bool gguf;
} binder;

/* Returns 1 when found (and fills *t), 0 when absent. */
static int src_find(const binder *b, const char *name, src_tensor *t) {
    memset(t, 0, sizeof *t);
    if (b->gguf) {
        const gguf_tensor *g = gguf_find_tensor(&b->p->gg, name);
        if (!g) return 0;
        t->data = g->data;
        t->dtype = g->type == GGML_T_F32 ? ENG_F32 : g->type == GGML_T_F16 ? ENG_F16
                 : g->type == GGML_T_BF16 ? ENG_BF16 : g->type == GGML_T_Q8_0 ? ENG_Q8_0 : -1;
        t->dtype_name = gguf_type_name(g->type);
        t->ndim = (int)g->n_dims;
        for (int d = 0; d < t->ndim; d++) t->shape[d] = (int64_t)g->ne[t->ndim - 1 - d];
        t->file = b->file;
        return 1;
    }
    size_t lo = 0, hi = b->p->n_st;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(b->p->st_sorted[mid]->name, name);
        if (c == 0) {
            const st_tensor *s = b->p->st_sorted[mid];
            t->data = s->data;
            t->dtype = s->dtype;
            t->dtype_name = s->dtype_name;
            t->ndim = s->ndim;
            for (int d = 0; d < s->ndim; d++) t->shape[d] = s->shape[d];
            t->file = b->p->shards[b->p->st_shard[mid]].path;
            return 1;
        }
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return 0;
}

static void fmt_shape(const src_tensor *t, char *buf, size_t n) {
    size_t k = 0;
    k += (size_t)snprintf(buf + k, n - k, "[");
    for (int d = 0; d < t->ndim && k < n; d++)
        k += (size_t)snprintf(buf + k, n - k, "%s%" PRId64, d ? ", " : "", t->shape[d]);
    if (k < n) snprintf(buf + k, n - k, "]");
}

/* Binds tensor `name` expecting [rows][cols] (rows == 0: a vector of cols).
 * A missing tensor is an error only when required. */
static int bind(binder *b, const char *name, int64_t rows, int64_t cols, bool required,
                eng_tensor *out) {
    src_tensor t;
    memset(out, 0, sizeof *out);
    if (!src_find(b, name, &t)) {
        if (!required) return D2_OK;
        D2_ERROR("%s: missing tensor '%s'", b->file, name);
        return D2_EFORMAT;
    }
    bool ok = rows == 0 ? (t.ndim == 1 && t.shape[0] == cols)
                        : (t.ndim == 2 && t.shape[0] == rows && t.shape[1] == cols);
    /* A vector may be stored as [1, n]. */
    if (rows == 0 && !ok && t.ndim == 2 && t.shape[0] == 1 && t.shape[1] == cols) ok = true;
    if (!ok) {
        char got[128];
        fmt_shape(&t, got, sizeof got);
        if (rows == 0)
            D2_ERROR("%s: tensor '%s' has shape %s, expected [%" PRId64 "]", t.file, name, got,
                     cols);
        else
            D2_ERROR("%s: tensor '%s' has shape %s, expected [%" PRId64 ", %" PRId64 "]", t.file,
                     name, got, rows, cols);
        return D2_ESHAPE;
    }
    if (t.dtype < 0) {
        D2_ERROR("%s: tensor '%s' has unsupported dtype %s", t.file, name, t.dtype_name);
        return D2_EUNSUPPORTED;
    }
    if (t.dtype == ENG_Q8_0 && cols % 32 != 0) {
        D2_ERROR("%s: tensor '%s': Q8_0 needs a multiple of 32 columns", t.file, name);
        return D2_ESHAPE;
    }
    out->data = t.data;
    out->dtype = (eng_dtype)t.dtype;
    out->rows = rows == 0 ? 1 : rows;
    out->cols = cols;
    out->name = intern(b->p, name);
    return out->name ? D2_OK : D2_ENOMEM;
}

/* Names per tensor role; layer tensors are "<layer_prefix><l>.<suffix>". */
typedef struct tensor_names {
    const char *tok_embd, *out_norm, *output, *layer_prefix;
    const char *attn_norm, *wq, *wk, *wv, *wo, *bq, *bk, *bv, *ffn_norm, *w_gate, *w_up,
        *w_down;
} tensor_names;

static const tensor_names GGUF_NAMES = {
    "token_embd.weight", "output_norm.weight", "output.weight", "blk.",
    "attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
    "attn_output.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias", "ffn_norm.weight",
    "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
};

static const tensor_names HF_NAMES = {
    "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.",
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_proj.bias",
    "self_attn.k_proj.bias", "self_attn.v_proj.bias", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
};

static int bind_l(binder *b, const tensor_names *nm, const char *suffix, int l, int64_t rows,
                  int64_t cols, bool req, eng_tensor *out) {
    char name[256];
    snprintf(name, sizeof name, "%s%d.%s", nm->layer_prefix, l, suffix);
    return bind(b, name, rows, cols, req, out);
}

/* Binds every tensor the config predicts. cfg must already be validated.
 * Sets tied_embeddings when the output tensor is absent (and allowed to be). */
static int bind_all(binder *b, const tensor_names *nm, bool output_optional) {
    eng_model *m = b->m;
    eng_model_config *c = &m->cfg;
    const int64_t dim = c->dim, hd = c->head_dim, qd = (int64_t)c->n_heads * hd,
                  kvd = (int64_t)c->n_kv_heads * hd, ffn = c->ffn_dim, V = c->vocab_size;
    int rc;
    if ((rc = bind(b, nm->tok_embd, V, dim, true, &m->tok_embd))) return rc;
    if ((rc = bind(b, nm->out_norm, 0, dim, true, &m->out_norm))) return rc;
    if (c->tied_embeddings) {
        m->output = m->tok_embd;
    } else {
        if ((rc = bind(b, nm->output, V, dim, !output_optional, &m->output))) return rc;
        if (!m->output.data) {
            c->tied_embeddings = true;
            m->output = m->tok_embd;
        }
    }
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->layers) return D2_ENOMEM;
    for (int l = 0; l < c->n_layers; l++) {
        eng_layer_weights *w = &m->layers[l];
        if ((rc = bind_l(b, nm, nm->attn_norm, l, 0, dim, true, &w->attn_norm)) ||
            (rc = bind_l(b, nm, nm->wq, l, qd, dim, true, &w->wq)) ||
            (rc = bind_l(b, nm, nm->wk, l, kvd, dim, true, &w->wk)) ||
            (rc = bind_l(b, nm, nm->wv, l, kvd, dim, true, &w->wv)) ||
            (rc = bind_l(b, nm, nm->wo, l, dim, qd, true, &w->wo)) ||
            (rc = bind_l(b, nm, nm->bq, l, 0, qd, c->qkv_bias, &w->bq)) ||
            (rc = bind_l(b, nm, nm->bk, l, 0, kvd, c->qkv_bias, &w->bk)) ||
            (rc = bind_l(b, nm, nm->bv, l, 0, kvd, c->qkv_bias, &w->bv)) ||
            (rc = bind_l(b, nm, nm->ffn_norm, l, 0, dim, true, &w->ffn_norm)) ||
            (rc = bind_l(b, nm, nm->w_gate, l, ffn, dim, true, &w->w_gate)) ||
            (rc = bind_l(b, nm, nm->w_up, l, ffn, dim, true, &w->w_up)) ||
            (rc = bind_l(b, nm, nm->w_down, l, dim, ffn, true, &w->w_down)))
            return rc;
        if (!c->qkv_bias && (w->bq.data || w->bk.data || w->bv.data)) {
            D2_ERROR("%s: layer %d has Q/K/V bias tensors but the config has no qkv bias",
                     b->file, l);
            return D2_EFORMAT;
        }
    }
    return D2_OK;
}

/* ------------------------------------------------------------------------ */
/* Config validation and small helpers.                                       */

static int check_range(const char *file, const char *what, int64_t v, int64_t lo, int64_t hi) {
    if (v < lo || v > hi) {
        D2_ERROR("%s: %s = %" PRId64 " is out of range [%" PRId64 ", %" PRId64 "]", file, what,
                 v, lo, hi);
        return D2_EFORMAT;
    }
    return D2_OK;
}

static int validate_cfg(const char *file, eng_model_config *c) {
    int rc;
    if ((rc = check_range(file, "n_layers", c->n_layers, 1, LIM_LAYERS)) ||
        (rc = check_range(file, "dim", c->dim, 1, LIM_DIM)) ||
        (rc = check_range(file, "n_heads", c->n_heads, 1, LIM_HEADS)) ||
        (rc = check_range(file, "n_kv_heads", c->n_kv_heads, 1, c->n_heads)) ||
        (rc = check_range(file, "head_dim", c->head_dim, 2, LIM_HEAD_DIM)) ||
        (rc = check_range(file, "ffn_dim", c->ffn_dim, 1, LIM_FFN)) ||
        (rc = check_range(file, "vocab_size", c->vocab_size, 1, LIM_VOCAB)) ||
        (rc = check_range(file, "max_ctx", c->max_ctx, 1, LIM_CTX)))
        return rc;
    if (c->n_heads % c->n_kv_heads != 0) {
        D2_ERROR("%s: n_heads %d is not a multiple of n_kv_heads %d", file, c->n_heads,
                 c->n_kv_heads);
        return D2_EFORMAT;
    }
    if (c->head_dim % 2 != 0) {
        D2_ERROR("%s: head_dim %d is odd", file, c->head_dim);
        return D2_EFORMAT;
    }
    if (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta)) {
        D2_ERROR("%s: rope_theta %g is not a positive number", file, (double)c->rope_theta);
        return D2_EFORMAT;
    }
    if (!(c->rms_eps > 0.0f) || !(c->rms_eps < 1.0f)) {
        D2_ERROR("%s: rms_norm_eps %g is out of range (0, 1)", file, (double)c->rms_eps);
        return D2_EFORMAT;
    }
    const eng_rope_scaling *s = &c->rope_scaling;
    if (s->type != 0 && (!(s->factor >= 1.0f) || !isfinite(s->factor))) {
        D2_ERROR("%s: rope scaling factor %g must be >= 1", file, (double)s->factor);
        return D2_EFORMAT;
    }
    if (s->type == 1 && (!(s->high_freq_factor > s->low_freq_factor) ||
                         !(s->low_freq_factor > 0.0f) || s->original_max_pos <= 0)) {
        D2_ERROR("%s: llama3 rope scaling needs high_freq_factor > low_freq_factor > 0 and "
                 "original_max_position_embeddings > 0", file);
        return D2_EFORMAT;
    }
    if (c->bos_id < -1 || c->bos_id >= c->vocab_size) c->bos_id = -1;
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] < 0 || c->eos_ids[i] >= c->vocab_size) {
            D2_ERROR("%s: eos id %d is outside the vocabulary (%d)", file, c->eos_ids[i],
                     c->vocab_size);
            return D2_EFORMAT;
        }
    return D2_OK;
}

static void add_eos(eng_model_config *c, int64_t id) {
    if (id < 0 || id > INT_MAX) return;
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] == (int)id) return;
    if (c->n_eos < (int)(sizeof c->eos_ids / sizeof c->eos_ids[0])) c->eos_ids[c->n_eos++] = (int)id;
}

static char *dup_n(const char *s, size_t n) {
    char *c = malloc(n + 1);
    if (!c) return NULL;
    memcpy(c, s, n);
    c[n] = '\0';
    return c;
}

static bool ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

/* ------------------------------------------------------------------------ */
/* GGUF.                                                                      */

/* Reads "<arch>.<suffix>" as an integer into *out; absent: keeps *out unless
 * required. */
static int gg_int(const gguf_file *g, const char *file, const char *arch, const char *suffix,
                  bool required, int64_t *out) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) {
        if (!required) return D2_OK;
        D2_ERROR("%s: missing metadata key '%s'", file, key);
        return D2_EFORMAT;
    }
    if (gguf_kv_int(kv, out) != D2_OK) {
        D2_ERROR("%s: metadata key '%s' is not an integer in range", file, key);
        return D2_EFORMAT;
    }
    return D2_OK;
}

static int gg_float(const gguf_file *g, const char *file, const char *arch, const char *suffix,
                    double *out) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    const gguf_kv *kv = gguf_find(g, key);
    if (!kv) return D2_OK;
    if (gguf_kv_float(kv, out) != D2_OK) {
        D2_ERROR("%s: metadata key '%s' is not a number", file, key);
        return D2_EFORMAT;
    }
    return D2_OK;
}

static int gg_id(const gguf_file *g, const char *key) {
    const gguf_kv *kv = gguf_find(g, key);
    int64_t v;
    if (!kv || gguf_kv_int(kv, &v) || v < 0 || v > INT_MAX) return -1;
    return (int)v;
}

static int gg_flag(const gguf_file *g, const char *key) {
    const gguf_kv *kv = gguf_find(g, key);
    bool v;
    if (!kv || gguf_kv_bool(kv, &v)) return -1;
    return v ? 1 : 0;
}

/* Builds the tokenizer from tokenizer.ggml.* metadata. */
static int gguf_tokenizer(const gguf_file *g, const char *file, eng_tokenizer **out) {
    eng_tok_gguf_desc d;
    memset(&d, 0, sizeof d);
    const gguf_kv *km = gguf_find(g, "tokenizer.ggml.model");
    const gguf_kv *kt = gguf_find(g, "tokenizer.ggml.tokens");
    gguf_str s;
    if (!km || gguf_kv_str(km, &s) || !kt || kt->type != GGUF_T_ARRAY ||
        kt->arr_type != GGUF_T_STRING) {
        D2_ERROR("%s: no tokenizer in metadata (tokenizer.ggml.model / .tokens missing or "
                 "mistyped)", file);
        return D2_EFORMAT;
    }
    if (kt->arr_n == 0 || kt->arr_n > LIM_VOCAB) {
        D2_ERROR("%s: tokenizer.ggml.tokens has %" PRIu64 " entries", file, kt->arr_n);
        return D2_EFORMAT;
    }
    size_t n = (size_t)kt->arr_n;
    int rc = D2_ENOMEM;
    char *model = dup_n(s.p, s.len), *pre = NULL;
    gguf_str *toks = calloc(n, sizeof *toks);
    char **tokp = calloc(n, sizeof *tokp);
    size_t *lens = calloc(n, sizeof *lens);
    char *blob = NULL, *mblob = NULL;
    char **mergp = NULL;
    gguf_str *merges = NULL;
    float *scores = NULL;
    int32_t *types = NULL;
    if (!model || !toks || !tokp || !lens) goto out;
    gguf_arr_strings(kt, toks);
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += toks[i].len + 1; /* <= file size + n */
    if (!(blob = malloc(total))) goto out;
    for (size_t i = 0, k = 0; i < n; i++) {
        memcpy(blob + k, toks[i].p, toks[i].len);
        blob[k + toks[i].len] = '\0';
        tokp[i] = blob + k;
        lens[i] = toks[i].len;
        k += toks[i].len + 1;
    }
    const gguf_kv *kp = gguf_find(g, "tokenizer.ggml.pre");
    if (kp && gguf_kv_str(kp, &s) == D2_OK && !(pre = dup_n(s.p, s.len))) goto out;
    const gguf_kv *ks = gguf_find(g, "tokenizer.ggml.scores");
    if (ks) {
        if (ks->type != GGUF_T_ARRAY || ks->arr_n != n || gguf_type_size(ks->arr_type) == 0) {
            D2_ERROR("%s: tokenizer.ggml.scores is not a numeric array of %zu entries", file, n);
            rc = D2_EFORMAT;
            goto out;
        }
        if (!(scores = malloc(n * sizeof *scores))) goto out;
        for (size_t i = 0; i < n; i++) scores[i] = (float)gguf_arr_float(ks, i);
    }
    const gguf_kv *ky = gguf_find(g, "tokenizer.ggml.token_type");
    if (ky) {
        if (ky->type != GGUF_T_ARRAY || ky->arr_n != n || gguf_type_size(ky->arr_type) == 0) {
            D2_ERROR("%s: tokenizer.ggml.token_type is not a numeric array of %zu entries", file,
                     n);
            rc = D2_EFORMAT;
            goto out;
        }
        if (!(types = malloc(n * sizeof *types))) goto out;
        for (size_t i = 0; i < n; i++) types[i] = (int32_t)gguf_arr_int(ky, i);
    }
    const gguf_kv *kg = gguf_find(g, "tokenizer.ggml.merges");
    size_t nm = 0;
    if (kg) {
        if (kg->type != GGUF_T_ARRAY || kg->arr_type != GGUF_T_STRING || kg->arr_n > INT_MAX) {
            D2_ERROR("%s: tokenizer.ggml.merges is not a string array", file);
            rc = D2_EFORMAT;
            goto out;
        }
        nm = (size_t)kg->arr_n;
        merges = calloc(nm ? nm : 1, sizeof *merges);
        mergp = calloc(nm ? nm : 1, sizeof *mergp);
        if (!merges || !mergp) goto out;
        gguf_arr_strings(kg, merges);
        size_t mt = 1;
        for (size_t i = 0; i < nm; i++) mt += merges[i].len + 1;
        if (!(mblob = malloc(mt))) goto out;
        for (size_t i = 0, k = 0; i < nm; i++) {
            memcpy(mblob + k, merges[i].p, merges[i].len);
            mblob[k + merges[i].len] = '\0';
            mergp[i] = mblob + k;
            k += merges[i].len + 1;
        }
    }
    d.model = model;
    d.pre = pre;
    d.n_vocab = (int)n;
    d.tokens = (const char *const *)tokp;
    d.token_lens = lens;
    d.scores = scores;
    d.token_types = types;
    d.n_merges = (int)nm;
    d.merges = nm ? (const char *const *)mergp : NULL;
    d.bos_id = gg_id(g, "tokenizer.ggml.bos_token_id");
    d.eos_id = gg_id(g, "tokenizer.ggml.eos_token_id");
    d.unk_id = gg_id(g, "tokenizer.ggml.unknown_token_id");
    d.pad_id = gg_id(g, "tokenizer.ggml.padding_token_id");
    d.add_bos = gg_flag(g, "tokenizer.ggml.add_bos_token");
    d.add_eos = gg_flag(g, "tokenizer.ggml.add_eos_token");
    d.add_space_prefix = gg_flag(g, "tokenizer.ggml.add_space_prefix");
    rc = eng_tok_load_gguf(&d, out);
    if (rc) D2_ERROR("%s: tokenizer from GGUF metadata failed: %s", file, d2_strerror(rc));
out:
    if (rc == D2_ENOMEM) D2_ERROR("%s: out of memory reading the tokenizer", file);
    free(model);
    free(pre);
    free(toks);
    free(tokp);
    free(lens);
    free(blob);
    free(mblob);
    free(mergp);
    free(merges);
    free(scores);
    free(types);
    return rc;
}

/* llama3 frequency factors as convert_hf_to_gguf computes them (per pair
 * i of head_dim/2, base frequency theta^(-2i/hd)). */
static float llama3_factor(const eng_model_config *c, const eng_rope_scaling *s, int i) {
    double freq = pow((double)c->rope_theta, -2.0 * i / c->head_dim);
    double wavelen = 2.0 * M_PI / freq;
    double low_wl = s->original_max_pos / s->low_freq_factor;
    double high_wl = s->original_max_pos / s->high_freq_factor;
    if (wavelen < high_wl) return 1.0f;
    if (wavelen > low_wl) return s->factor;
    double smooth = (s->original_max_pos / wavelen - s->low_freq_factor) /
                    (s->high_freq_factor - s->low_freq_factor);
    return (float)(1.0 / ((1.0 - smooth) / s->factor + smooth));
}

/* rope_freqs.weight present: recognise Llama 3.1-style parameters. */
static void gguf_rope_freqs(eng_model *m, const char *file) {
    eng_model_config *c = &m->cfg;
    int n = c->head_dim / 2;
    float *f = malloc((size_t)n * sizeof *f);
    if (!f) return;
    eng_tensor_row_f32(&m->rope_freqs, 0, f);
    float mx = 0.0f;
    for (int i = 0; i < n; i++) mx = f[i] > mx ? f[i] : mx;
    eng_rope_scaling s = {1, mx, 1.0f, 4.0f, 8192};
    bool match = mx >= 1.0f;
    for (int i = 0; i < n && match; i++) {
        float want = llama3_factor(c, &s, i);
        if (fabsf(f[i] - want) > 1e-3f * want) match = false;
    }
    free(f);
    if (c->rope_scaling.type == 0 && match) {
        c->rope_scaling = s;
    } else if (!match) {
        D2_WARN("%s: rope_freqs.weight does not match llama3 scaling with (low 1, high 4, "
                "original 8192); exposed as model->rope_freqs only", file);
    }
}

static int gguf_build(eng_model *m, const char *file, bool want_tok) {
    model_priv *p = m->priv;
    const gguf_file *g = &p->gg;
    eng_model_config *c = &m->cfg;
    const gguf_kv *ka = gguf_find(g, "general.architecture");
    gguf_str as;
    if (!ka || gguf_kv_str(ka, &as)) {
        D2_ERROR("%s: missing general.architecture", file);
        return D2_EFORMAT;
    }
    char arch[32];
    if (gguf_str_eq(as, "llama")) {
        c->arch = ENG_ARCH_LLAMA;
        c->rope_neox = false;
    } else if (gguf_str_eq(as, "qwen2")) {
        c->arch = ENG_ARCH_QWEN2;
        c->rope_neox = true;
    } else {
        D2_ERROR("%s: architecture '%.*s' is not supported (llama, qwen2 are)", file,
                 (int)(as.len > 64 ? 64 : as.len), as.p);
        return D2_EUNSUPPORTED;
    }
    snprintf(arch, sizeof arch, "%.*s", (int)as.len, as.p);
    int64_t nl = 0, dim = 0, ffn = 0, nh = 0, nkv = -1, ctx = 0, rdim = -1, hd = -1, vocab = -1,
            kl = -1, sw = 0;
    int rc;
    if ((rc = gg_int(g, file, arch, "block_count", true, &nl)) ||
        (rc = gg_int(g, file, arch, "embedding_length", true, &dim)) ||
        (rc = gg_int(g, file, arch, "feed_forward_length", true, &ffn)) ||
        (rc = gg_int(g, file, arch, "attention.head_count", true, &nh)) ||
        (rc = gg_int(g, file, arch, "attention.head_count_kv", false, &nkv)) ||
        (rc = gg_int(g, file, arch, "context_length", false, &ctx)) ||
        (rc = gg_int(g, file, arch, "rope.dimension_count", false, &rdim)) ||
        (rc = gg_int(g, file, arch, "attention.key_length", false, &hd)) ||
        (rc = gg_int(g, file, arch, "attention.value_length", false, &kl)) ||
        (rc = gg_int(g, file, arch, "vocab_size", false, &vocab)) ||
        (rc = gg_int(g, file, arch, "attention.sliding_window", false, &sw)))
        return rc;
    if ((rc = check_range(file, "block_count", nl, 1, LIM_LAYERS)) ||
        (rc = check_range(file, "embedding_length", dim, 1, LIM_DIM)) ||
        (rc = check_range(file, "attention.head_count", nh, 1, LIM_HEADS)))
        return rc;
    if (nkv < 0) nkv = nh;
    if (hd < 0) {
        if (dim % nh != 0) {
            D2_ERROR("%s: embedding_length %" PRId64 " not divisible by head_count %" PRId64,
                     file, dim, nh);
            return D2_EFORMAT;
        }
        hd = dim / nh;
    }
    if (kl >= 0 && kl != hd) {
        D2_ERROR("%s: attention.value_length %" PRId64 " != key_length %" PRId64
                 " is not supported", file, kl, hd);
        return D2_EUNSUPPORTED;
    }
    if (rdim >= 0 && rdim != hd) {
        D2_ERROR("%s: partial rotary embedding (rope.dimension_count %" PRId64
                 " != head dim %" PRId64 ") is not supported", file, rdim, hd);
        return D2_EUNSUPPORTED;
    }
    if (ctx <= 0) {
        D2_WARN("%s: no %s.context_length; assuming 2048", file, arch);
        ctx = 2048;
    }
    double theta = 10000.0, eps = 1e-5, sfac = 0.0, sorig = 0.0;
    if (c->arch == ENG_ARCH_QWEN2) eps = 1e-6;
    if ((rc = gg_float(g, file, arch, "rope.freq_base", &theta)) ||
        (rc = gg_float(g, file, arch, "attention.layer_norm_rms_epsilon", &eps)) ||
        (rc = gg_float(g, file, arch, "rope.scaling.factor", &sfac)) ||
        (rc = gg_float(g, file, arch, "rope.scaling.original_context_length", &sorig)))
        return rc;
    char key[128];
    snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
    const gguf_kv *kst = gguf_find(g, key);
    gguf_str st;
    if (kst && gguf_kv_str(kst, &st) == D2_OK && !gguf_str_eq(st, "none")) {
        if (gguf_str_eq(st, "linear")) {
            c->rope_scaling.type = 2;
            c->rope_scaling.factor = (float)sfac;
        } else {
            D2_ERROR("%s: rope scaling type '%.*s' is not supported (linear is; llama3 comes "
                     "from rope_freqs.weight)", file, (int)(st.len > 32 ? 32 : st.len), st.p);
            return D2_EUNSUPPORTED;
        }
    } else {
        double lin = 0.0;
        if ((rc = gg_float(g, file, arch, "rope.scale_linear", &lin))) return rc;
        if (lin > 1.0) {
            c->rope_scaling.type = 2;
            c->rope_scaling.factor = (float)lin;
        }
    }
    (void)sorig;
    if (vocab < 0) {
        const gguf_tensor *te = gguf_find_tensor(g, "token_embd.weight");
        const gguf_kv *kt = gguf_find(g, "tokenizer.ggml.tokens");
        if (te && te->n_dims == 2) vocab = (int64_t)te->ne[1];
        else if (kt && kt->type == GGUF_T_ARRAY) vocab = (int64_t)kt->arr_n;
    }
    if ((rc = check_range(file, "feed_forward_length", ffn, 1, LIM_FFN)) ||
        (rc = check_range(file, "head_count_kv", nkv, 1, LIM_HEADS)) ||
        (rc = check_range(file, "head dim", hd, 1, LIM_HEAD_DIM)) ||
        (rc = check_range(file, "vocab size", vocab, 1, LIM_VOCAB)) ||
        (rc = check_range(file, "context_length", ctx, 1, LIM_CTX)) ||
        (rc = check_range(file, "sliding_window", sw, 0, INT_MAX)))
        return rc;
    c->n_layers = (int)nl;
    c->dim = (int)dim;
    c->n_heads = (int)nh;
    c->n_kv_heads = (int)nkv;
    c->head_dim = (int)hd;
    c->ffn_dim = (int)ffn;
    c->vocab_size = (int)vocab;
    c->max_ctx = (int)ctx;
    c->rope_theta = (float)theta;
    c->rms_eps = (float)eps;
    c->sliding_window = (int)sw;
    c->bos_id = gg_id(g, "tokenizer.ggml.bos_token_id");
    add_eos(c, gg_id(g, "tokenizer.ggml.eos_token_id"));
    add_eos(c, gg_id(g, "tokenizer.ggml.eot_token_id"));
    add_eos(c, gg_id(g, "tokenizer.ggml.eom_token_id"));
    c->qkv_bias = gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
    if ((rc = validate_cfg(file, c))) return rc;

    binder b = {m, p, file, true};
    if ((rc = bind_all(&b, &GGUF_NAMES, true))) return rc;
    if ((rc = bind(&b, "rope_freqs.weight", 0, c->head_dim / 2, false, &m->rope_freqs)))
        return rc;
    if (m->rope_freqs.data) gguf_rope_freqs(m, file);

    const gguf_kv *kc = gguf_find(g, "tokenizer.chat_template");
    gguf_str ct;
    if (kc && gguf_kv_str(kc, &ct) == D2_OK && !(m->chat_template = dup_n(ct.p, ct.len)))
        return D2_ENOMEM;
    if (want_tok && (rc = gguf_tokenizer(g, file, &m->tok))) return rc;
    return D2_OK;
}

static eng_model *model_new(const char *path) {
    eng_model *m = calloc(1, sizeof *m);
    model_priv *p = calloc(1, sizeof *p);
    char *pc = strdup(path ? path : "(buffer)");
    if (!m || !p || !pc) {
        free(m);
        free(p);
        free(pc);
        return NULL;
    }
    m->priv = p;
    m->path = pc;
    m->cfg.bos_id = -1;
    return m;
}

int eng_model_load_gguf_buffer(const uint8_t *data, size_t size, const char *name,
                               bool want_tokenizer, eng_model **out) {
    *out = NULL;
    eng_model *m = model_new(name);
    if (!m) return D2_ENOMEM;
    model_priv *p = m->priv;
    int rc = gguf_parse(data, size, m->path, &p->gg);
    if (!rc && p->gg.n_tensors == 0) {
        D2_ERROR("%s: GGUF file has no tensors (vocab-only?); use eng_model_load_tokenizer",
                 m->path);
        rc = D2_EFORMAT;
    }
    if (!rc) rc = gguf_build(m, m->path, want_tokenizer);
    if (rc) {
        eng_model_free(m);
        return rc;
    }
    *out = m;
    return D2_OK;
}

static int load_gguf(const char *path, bool want_tok, eng_model **out) {
    d2_mmap map;
    int rc = d2_mmap_open(path, &map);
    if (rc) {
        D2_ERROR("%s: cannot map the file: %s", path, d2_strerror(rc));
        return rc;
    }
    eng_model *m = NULL;
    rc = eng_model_load_gguf_buffer(map.data, map.size, path, want_tok, &m);
    if (rc) {
        d2_mmap_close(&map);
        return rc;
    }
    m->maps = malloc(sizeof *m->maps);
    if (!m->maps) {
        eng_model_free(m);
        d2_mmap_close(&map);
        return D2_ENOMEM;
    }
    m->maps[0] = map;
    m->n_maps = 1;
    *out = m;
    return D2_OK;
}

/* ------------------------------------------------------------------------ */
/* Hugging Face directory.                                                    */

/* flags: jansson decoding flags (tokenizer_config.json needs
 * JSON_DECODE_INT_AS_REAL: real files hold integers beyond 64 bits, e.g.
 * Llama 3's model_max_length 1e30). */
static int read_json_flags(const char *path, bool required, size_t flags, json_t **out) {
    *out = NULL;
    char *buf = NULL;
    size_t len = 0;
    int rc = d2_read_file(path, &buf, &len);
    if (rc) {
        if (rc == D2_ENOENT && !required) return D2_OK;
        D2_ERROR("%s: cannot read: %s", path, d2_strerror(rc));
        return rc;
    }
    json_error_t e;
    json_t *j = json_loadb(buf, len, flags, &e);
    free(buf);
    if (!j) {
        D2_ERROR("%s: invalid JSON: %s (line %d)", path, e.text, e.line);
        return D2_EJSON;
    }
    if (!json_is_object(j)) {
        D2_ERROR("%s: top level is not a JSON object", path);
        json_decref(j);
        return D2_EJSON;
    }
    *out = j;
    return D2_OK;
}

static int read_json(const char *path, bool required, json_t **out) {
    return read_json_flags(path, required, 0, out);
}

/* Integer member; null or absent gives def. */
static int js_int(const char *file, json_t *o, const char *key, int64_t def, int64_t *out) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return D2_OK;
    }
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return D2_OK;
    }
    if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
        fabs(json_real_value(v)) < 9e15) {
        *out = (int64_t)json_real_value(v);
        return D2_OK;
    }
    D2_ERROR("%s: '%s' is not an integer", file, key);
    return D2_EFORMAT;
}

static int js_num(const char *file, json_t *o, const char *key, double def, double *out) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return D2_OK;
    }
    if (!json_is_number(v)) {
        D2_ERROR("%s: '%s' is not a number", file, key);
        return D2_EFORMAT;
    }
    *out = json_number_value(v);
    return D2_OK;
}

static int js_bool(const char *file, json_t *o, const char *key, bool def, bool *out) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return D2_OK;
    }
    if (!json_is_boolean(v)) {
        D2_ERROR("%s: '%s' is not a boolean", file, key);
        return D2_EFORMAT;
    }
    *out = json_is_true(v);
    return D2_OK;
}

/* eos_token_id: an integer or a list of integers. */
static void js_eos(json_t *o, eng_model_config *c) {
    json_t *v = json_object_get(o, "eos_token_id");
    if (json_is_integer(v)) add_eos(c, json_integer_value(v));
    else if (json_is_array(v)) {
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) if (json_is_integer(x)) add_eos(c, json_integer_value(x));
    }
}

static int hf_rope_scaling(const char *file, json_t *cfg, eng_model_config *c) {
    json_t *rs = json_object_get(cfg, "rope_scaling");
    if (!rs || json_is_null(rs)) return D2_OK;
    if (!json_is_object(rs)) {
        D2_ERROR("%s: rope_scaling is not an object", file);
        return D2_EFORMAT;
    }
    json_t *t = json_object_get(rs, "rope_type");
    if (!json_is_string(t)) t = json_object_get(rs, "type");
    const char *type = json_is_string(t) ? json_string_value(t) : "default";
    double factor, lo, hi;
    int64_t orig;
    int rc;
    if ((rc = js_num(file, rs, "factor", 1.0, &factor))) return rc;
    if (strcmp(type, "default") == 0) return D2_OK;
    if (strcmp(type, "linear") == 0) {
        c->rope_scaling.type = 2;
        c->rope_scaling.factor = (float)factor;
        return D2_OK;
    }
    if (strcmp(type, "llama3") == 0) {
        if ((rc = js_num(file, rs, "low_freq_factor", 1.0, &lo)) ||
            (rc = js_num(file, rs, "high_freq_factor", 4.0, &hi)) ||
            (rc = js_int(file, rs, "original_max_position_embeddings", 8192, &orig)))
            return rc;
        if (orig <= 0 || orig > LIM_CTX) {
            D2_ERROR("%s: rope_scaling.original_max_position_embeddings out of range", file);
            return D2_EFORMAT;
        }
        c->rope_scaling = (eng_rope_scaling){1, (float)factor, (float)lo, (float)hi, (int)orig};
        return D2_OK;
    }
    D2_ERROR("%s: rope_scaling type '%.32s' is not supported (llama3, linear are)", file, type);
    return D2_EUNSUPPORTED;
}

static int hf_config(const char *dir, eng_model_config *c) {
    char file[4096], gfile[4096];
    if (d2_path_join(file, sizeof file, dir, "config.json") ||
        d2_path_join(gfile, sizeof gfile, dir, "generation_config.json"))
        return D2_ERANGE;
    json_t *j = NULL, *gj = NULL;
    int rc = read_json(file, true, &j);
    if (rc) return rc == D2_EJSON ? D2_EFORMAT : rc;
    json_t *archs = json_object_get(j, "architectures");
    const char *a = json_is_array(archs) && json_is_string(json_array_get(archs, 0))
                        ? json_string_value(json_array_get(archs, 0))
                        : NULL;
    if (!a) {
        D2_ERROR("%s: missing architectures[0]", file);
        rc = D2_EFORMAT;
        goto out;
    }
    if (strcmp(a, "LlamaForCausalLM") == 0) c->arch = ENG_ARCH_LLAMA;
    else if (strcmp(a, "MistralForCausalLM") == 0) c->arch = ENG_ARCH_MISTRAL;
    else if (strcmp(a, "Qwen2ForCausalLM") == 0) c->arch = ENG_ARCH_QWEN2;
    else {
        D2_ERROR("%s: architecture '%.64s' is not supported (LlamaForCausalLM, "
                 "MistralForCausalLM, Qwen2ForCausalLM are)", file, a);
        rc = D2_EUNSUPPORTED;
        goto out;
    }
    int64_t dim, ffn, nl, nh, nkv, hd, vocab, ctx, sw, bos;
    double eps, theta;
    bool tie, abias, mbias, use_sw;
    if ((rc = js_int(file, j, "hidden_size", -1, &dim)) ||
        (rc = js_int(file, j, "intermediate_size", -1, &ffn)) ||
        (rc = js_int(file, j, "num_hidden_layers", -1, &nl)) ||
        (rc = js_int(file, j, "num_attention_heads", -1, &nh)) ||
        (rc = js_int(file, j, "num_key_value_heads", nh, &nkv)) ||
        (rc = js_int(file, j, "vocab_size", -1, &vocab)) ||
        (rc = js_int(file, j, "max_position_embeddings", 2048, &ctx)) ||
        (rc = js_int(file, j, "sliding_window", 0, &sw)) ||
        (rc = js_int(file, j, "bos_token_id", -1, &bos)) ||
        (rc = js_num(file, j, "rms_norm_eps", 1e-6, &eps)) ||
        (rc = js_num(file, j, "rope_theta", 10000.0, &theta)) ||
        (rc = js_bool(file, j, "tie_word_embeddings", false, &tie)) ||
        (rc = js_bool(file, j, "attention_bias", c->arch == ENG_ARCH_QWEN2, &abias)) ||
        (rc = js_bool(file, j, "mlp_bias", false, &mbias)) ||
        (rc = js_bool(file, j, "use_sliding_window", c->arch == ENG_ARCH_MISTRAL, &use_sw)))
        goto out;
    if ((rc = check_range(file, "hidden_size", dim, 1, LIM_DIM)) ||
        (rc = check_range(file, "num_attention_heads", nh, 1, LIM_HEADS)))
        goto out;
    if ((rc = js_int(file, j, "head_dim", dim % nh == 0 ? dim / nh : -1, &hd))) goto out;
    if (mbias) {
        D2_ERROR("%s: mlp_bias is not supported", file);
        rc = D2_EUNSUPPORTED;
        goto out;
    }
    if ((rc = check_range(file, "intermediate_size", ffn, 1, LIM_FFN)) ||
        (rc = check_range(file, "num_hidden_layers", nl, 1, LIM_LAYERS)) ||
        (rc = check_range(file, "num_key_value_heads", nkv, 1, LIM_HEADS)) ||
        (rc = check_range(file, "head_dim", hd, 1, LIM_HEAD_DIM)) ||
        (rc = check_range(file, "vocab_size", vocab, 1, LIM_VOCAB)) ||
        (rc = check_range(file, "max_position_embeddings", ctx, 1, LIM_CTX)) ||
        (rc = check_range(file, "sliding_window", sw, 0, INT_MAX)))
        goto out;
    c->n_layers = (int)nl;
    c->dim = (int)dim;
    c->n_heads = (int)nh;
    c->n_kv_heads = (int)nkv;
    c->head_dim = (int)hd;
    c->ffn_dim = (int)ffn;
    c->vocab_size = (int)vocab;
    c->max_ctx = (int)ctx;
    c->rms_eps = (float)eps;
    c->rope_theta = (float)theta;
    c->rope_neox = true;
    c->tied_embeddings = tie;
    c->qkv_bias = c->arch == ENG_ARCH_QWEN2 || abias;
    c->sliding_window = use_sw ? (int)sw : 0;
    c->bos_id = bos >= 0 && bos <= INT_MAX ? (int)bos : -1;
    js_eos(j, c);
    if ((rc = hf_rope_scaling(file, j, c))) goto out;
    if ((rc = read_json(gfile, false, &gj))) goto out;
    if (gj) {
        int64_t gb;
        if (js_int(gfile, gj, "bos_token_id", -1, &gb) == D2_OK && gb >= 0 && gb <= INT_MAX)
            c->bos_id = (int)gb;
        js_eos(gj, c);
    }
    rc = validate_cfg(file, c);
out:
    json_decref(j);
    json_decref(gj);
    return rc;
}

static int cmp_st_name(const void *a, const void *b) {
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

/* Maps and parses one shard into slot i of m->maps / p->shards. */
static int open_shard(eng_model *m, const char *path) {
    model_priv *p = m->priv;
    int i = p->n_shards;
    char *pc = strdup(path);
    if (!pc) return D2_ENOMEM;
    int rc = d2_mmap_open(path, &m->maps[i]);
    if (rc) {
        D2_ERROR("%s: cannot map the file: %s", path, d2_strerror(rc));
        free(pc);
        return rc;
    }
    m->n_maps = i + 1;
    p->shards[i].path = pc;
    p->n_shards = i + 1;
    return st_parse(m->maps[i].data, m->maps[i].size, pc, &p->shards[i].st);
}

static int hf_open_weights(eng_model *m, const char *dir) {
    model_priv *p = m->priv;
    char idx[4096], single[4096], path[4096];
    if (d2_path_join(idx, sizeof idx, dir, "model.safetensors.index.json") ||
        d2_path_join(single, sizeof single, dir, "model.safetensors"))
        return D2_ERANGE;
    json_t *j = NULL;
    int rc = D2_OK;
    const char **files = NULL;
    size_t nf = 0;
    if (access(idx, F_OK) == 0) {
        if ((rc = read_json(idx, true, &j))) return rc == D2_EJSON ? D2_EFORMAT : rc;
        json_t *wm = json_object_get(j, "weight_map");
        if (!json_is_object(wm) || json_object_size(wm) == 0) {
            D2_ERROR("%s: missing or empty weight_map", idx);
            rc = D2_EFORMAT;
            goto out;
        }
        files = calloc(json_object_size(wm), sizeof *files);
        if (!files) { rc = D2_ENOMEM; goto out; }
        const char *k;
        json_t *v;
        json_object_foreach(wm, k, v) {
            const char *f = json_string_value(v);
            if (!f || !*f || strchr(f, '/') || f[0] == '.') {
                D2_ERROR("%s: weight_map entry for '%s' is not a plain file name", idx, k);
                rc = D2_EFORMAT;
                goto out;
            }
            size_t q = 0;
            while (q < nf && strcmp(files[q], f) != 0) q++;
            if (q == nf) files[nf++] = f;
        }
    } else {
        files = calloc(1, sizeof *files);
        if (!files) return D2_ENOMEM;
        files[nf++] = "model.safetensors";
    }
    m->maps = calloc(nf, sizeof *m->maps);
    p->shards = calloc(nf, sizeof *p->shards);
    if (!m->maps || !p->shards) { rc = D2_ENOMEM; goto out; }
    size_t total = 0;
    for (size_t i = 0; i < nf; i++) {
        if (d2_path_join(path, sizeof path, dir, files[i])) { rc = D2_ERANGE; goto out; }
        if ((rc = open_shard(m, path))) goto out;
        total += p->shards[i].st.n_tensors;
    }
    p->st_sorted = malloc((total ? total : 1) * sizeof *p->st_sorted);
    p->st_shard = malloc((total ? total : 1) * sizeof *p->st_shard);
    if (!p->st_sorted || !p->st_shard) { rc = D2_ENOMEM; goto out; }
    for (int i = 0; i < p->n_shards; i++)
        for (size_t k = 0; k < p->shards[i].st.n_tensors; k++)
            p->st_sorted[p->n_st++] = &p->shards[i].st.tensors[k];
    qsort(p->st_sorted, p->n_st, sizeof *p->st_sorted, cmp_st_name);
    /* Recover the shard of each entry (tensor arrays are contiguous per shard). */
    for (size_t k = 0; k < p->n_st; k++) {
        for (int i = 0; i < p->n_shards; i++) {
            const st_file *s = &p->shards[i].st;
            if (p->st_sorted[k] >= s->tensors && p->st_sorted[k] < s->tensors + s->n_tensors) {
                p->st_shard[k] = i;
                break;
            }
        }
        if (k > 0 && strcmp(p->st_sorted[k - 1]->name, p->st_sorted[k]->name) == 0) {
            D2_ERROR("%s: tensor '%s' appears in more than one shard", dir, p->st_sorted[k]->name);
            rc = D2_EFORMAT;
            goto out;
        }
    }
out:
    free(files);
    json_decref(j);
    return rc;
}

/* chat_template from tokenizer_config.json (string, or list of {name,
 * template} taking "default"), else chat_template.jinja beside it. */
static int hf_chat_template(const char *dir, char **out) {
    char path[4096];
    json_t *j = NULL;
    *out = NULL;
    if (d2_path_join(path, sizeof path, dir, "tokenizer_config.json")) return D2_ERANGE;
    int rc = read_json_flags(path, false, JSON_DECODE_INT_AS_REAL, &j);
    if (rc) return rc;
    json_t *ct = j ? json_object_get(j, "chat_template") : NULL;
    const char *s = NULL;
    if (json_is_string(ct)) {
        s = json_string_value(ct);
    } else if (json_is_array(ct)) {
        size_t i;
        json_t *e;
        json_array_foreach(ct, i, e) {
            json_t *n = json_object_get(e, "name"), *t = json_object_get(e, "template");
            if (json_is_string(n) && json_is_string(t) &&
                strcmp(json_string_value(n), "default") == 0)
                s = json_string_value(t);
        }
    }
    if (s && !(*out = strdup(s))) rc = D2_ENOMEM;
    json_decref(j);
    if (rc || *out) return rc;
    if (d2_path_join(path, sizeof path, dir, "chat_template.jinja")) return D2_OK;
    char *buf = NULL;
    if (d2_read_file(path, &buf, NULL) == D2_OK) *out = buf;
    return D2_OK;
}

/* Loads tokenizer.json (+ optional tokenizer_config.json) from dir. */
static int hf_tokenizer(const char *dir, eng_tokenizer **out) {
    char tj[4096], tc[4096];
    if (d2_path_join(tj, sizeof tj, dir, "tokenizer.json") ||
        d2_path_join(tc, sizeof tc, dir, "tokenizer_config.json"))
        return D2_ERANGE;
    if (access(tj, R_OK) != 0) {
        D2_ERROR("%s: missing tokenizer.json", dir);
        return D2_ENOENT;
    }
    int rc = eng_tok_load_hf(tj, access(tc, R_OK) == 0 ? tc : NULL, out);
    if (rc) D2_ERROR("%s: loading the tokenizer failed: %s", tj, d2_strerror(rc));
    return rc;
}

static int load_hf(const char *dir, bool want_tok, eng_model **out) {
    eng_model *m = model_new(dir);
    if (!m) return D2_ENOMEM;
    int rc = hf_config(dir, &m->cfg);
    if (!rc) rc = hf_open_weights(m, dir);
    if (!rc) {
        model_priv *p = m->priv;
        binder b = {m, p, p->shards[0].path, false};
        if (p->n_shards > 1) b.file = dir;
        rc = bind_all(&b, &HF_NAMES, false);
        /* Llama attention_bias also adds an o_proj bias, which the engine lacks. */
        src_tensor t;
        if (!rc && src_find(&b, "model.layers.0.self_attn.o_proj.bias", &t)) {
            D2_ERROR("%s: o_proj bias is not supported", dir);
            rc = D2_EUNSUPPORTED;
        }
    }
    if (!rc) rc = hf_chat_template(dir, &m->chat_template);
    if (!rc && want_tok) rc = hf_tokenizer(dir, &m->tok);
    if (rc) {
        eng_model_free(m);
        return rc;
    }
    *out = m;
    return D2_OK;
}

int eng_model_load(const char *path, bool want_tokenizer, eng_model **out) {
    if (!out) return D2_EINVAL;
    *out = NULL;
    if (!path || !*path) return D2_EINVAL;
    if (access(path, F_OK) != 0) {
        D2_ERROR("%s: no such file or directory", path);
        return D2_ENOENT;
    }
    int rc = d2_is_dir(path) ? load_hf(path, want_tokenizer, out)
                             : load_gguf(path, want_tokenizer, out);
    if (rc == D2_OK) {
        const eng_model_config *c = &(*out)->cfg;
        D2_INFO("%s: loaded %d layers, dim %d, %d/%d heads, vocab %d, %.1fM params", path,
                c->n_layers, c->dim, c->n_heads, c->n_kv_heads, c->vocab_size,
                (double)eng_model_n_params(*out) / 1e6);
    }
    return rc;
}

int eng_model_load_tokenizer(const char *path, struct eng_tokenizer **out) {
    if (!out || !path) return D2_EINVAL;
    *out = NULL;
    if (access(path, F_OK) != 0) {
        D2_ERROR("%s: no such file or directory", path);
        return D2_ENOENT;
    }
    if (d2_is_dir(path)) return hf_tokenizer(path, out);
    if (ends_with(path, ".json")) {
        /* tokenizer.json; tokenizer_config.json beside it is optional. */
        char dir[4096], tc[4096];
        snprintf(dir, sizeof dir, "%s", path);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0';
        else snprintf(dir, sizeof dir, ".");
        if (d2_path_join(tc, sizeof tc, dir, "tokenizer_config.json")) return D2_ERANGE;
        int rc = eng_tok_load_hf(path, access(tc, R_OK) == 0 ? tc : NULL, out);
        if (rc) D2_ERROR("%s: loading the tokenizer failed: %s", path, d2_strerror(rc));
        return rc;
    }
    d2_mmap map;
    int rc = d2_mmap_open(path, &map);
    if (rc) {
        D2_ERROR("%s: cannot map the file: %s", path, d2_strerror(rc));
        return rc;
    }
    gguf_file g;
    rc = gguf_parse(map.data, map.size, path, &g);
    if (!rc) {
        rc = gguf_tokenizer(&g, path, out);
        gguf_free(&g);
    }
    d2_mmap_close(&map);
    return rc;
}

/* ---- shapes every forward pass relies on ------------------------------------- */

static int shape_ok(const eng_tensor *t, int64_t rows, int64_t cols, const char *what, int layer,
                    const char *who) {
    if (!t->data || t->rows != rows || t->cols != cols ||
        (t->dtype == ENG_Q8_0 && cols % 32 != 0)) {
        D2_ERROR("%s: tensor %s (layer %d, name %s) missing or shaped %lldx%lld, want %lldx%lld", who,
                 what, layer, t->name ? t->name : "?", (long long)t->rows, (long long)t->cols,
                 (long long)rows, (long long)cols);
        return D2_ESHAPE;
    }
    return D2_OK;
}

int eng_model_check_tensors(const eng_model *m, const char *who) {
    const eng_model_config *c = &m->cfg;
    int hd = c->head_dim, qd = c->n_heads * hd, kvd = c->n_kv_heads * hd;
    int rc = shape_ok(&m->tok_embd, c->vocab_size, c->dim, "tok_embd", -1, who);
    const eng_tensor *outw = m->output.data ? &m->output : &m->tok_embd;
    if (!rc) rc = shape_ok(outw, c->vocab_size, c->dim, "output", -1, who);
    if (!rc) rc = shape_ok(&m->out_norm, 1, c->dim, "out_norm", -1, who);
    for (int l = 0; l < c->n_layers && !rc; l++) {
        const eng_layer_weights *w = &m->layers[l];
        rc = shape_ok(&w->attn_norm, 1, c->dim, "attn_norm", l, who);
        if (!rc) rc = shape_ok(&w->wq, qd, c->dim, "wq", l, who);
        if (!rc) rc = shape_ok(&w->wk, kvd, c->dim, "wk", l, who);
        if (!rc) rc = shape_ok(&w->wv, kvd, c->dim, "wv", l, who);
        if (!rc) rc = shape_ok(&w->wo, c->dim, qd, "wo", l, who);
        if (!rc) rc = shape_ok(&w->ffn_norm, 1, c->dim, "ffn_norm", l, who);
        if (!rc) rc = shape_ok(&w->w_gate, c->ffn_dim, c->dim, "w_gate", l, who);
        if (!rc) rc = shape_ok(&w->w_up, c->ffn_dim, c->dim, "w_up", l, who);
        if (!rc) rc = shape_ok(&w->w_down, c->dim, c->ffn_dim, "w_down", l, who);
        if (!rc && w->bq.data) rc = shape_ok(&w->bq, 1, qd, "bq", l, who);
        if (!rc && w->bk.data) rc = shape_ok(&w->bk, 1, kvd, "bk", l, who);
        if (!rc && w->bv.data) rc = shape_ok(&w->bv, 1, kvd, "bv", l, who);
    }
    return rc;
}
