/*
 * engine/tok/tokenizer.c — loading (tokenizer.json + tokenizer_config.json, or
 * GGUF metadata), encoding, decoding and streaming detokenisation; the
 * contract is engine/tok/tokenizer.h. Helpers live in engine/tok/tok_bpe.c (maps,
 * merge loop), engine/tok/tok_pretok.c (regex pre-tokenizers) and
 * engine/tok/tok_unicode.c (categories, UTF-8, NFC).
 *
 * Reference behaviour: @huggingface/tokenizers (tokenizers.js) 0.2.0 on the
 * same files, which itself follows the Rust `tokenizers` crate. Where the two
 * differ we follow tokenizers.js, and say so:
 *   - the GPT-2 ByteLevel(use_regex) pattern uses JavaScript's \s (includes
 *     U+FEFF, excludes U+0085); Split patterns use Unicode White_Space;
 *   - added tokens' lstrip/rstrip trim JavaScript whitespace (same set);
 *   - (?i:'s|...) folds ASCII letters only.
 * Decoding follows the Rust decoders (tokenizers.js 0.2.0 drops U+FEFF in
 * ByteFallback runs), with no transformers "clean_up_tokenization_spaces".
 *
 * Invalid UTF-8 input: every byte that does not start a valid sequence is
 * replaced by U+FFFD before anything else (a JS string cannot hold such
 * bytes, so this defines the behaviour); encode then succeeds.
 *
 * The loaded tokenizer is immutable: encode/decode are thread-safe.
 */
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "engine/tok/tok_internal.h"
#include "engine/tok/tokenizer.h"

enum { KIND_BYTELEVEL = 0, KIND_BPE = 1, KIND_SPM_SCORE = 2 };
enum { NORM_NFC = 0, NORM_PREPEND = 1, NORM_REPLACE = 2 };
enum { F_SPECIAL = 1, F_ADDED = 2 };

typedef struct norm_op {
    int op;
    char *a, *b; /* PREPEND: a; REPLACE: a -> b */
    size_t alen, blen;
} norm_op;

typedef struct added_tok {
    char *content, *norm; /* norm: normalized content (normalized tokens only) */
    size_t len, norm_len;
    int32_t id;
    bool special, lstrip, rstrip, normalized;
} added_tok;

struct eng_tokenizer {
    int kind;
    int n_vocab;
    char **piece;          /* [n_vocab] model string (tokenizer.json form), NULL if unused */
    uint32_t *piece_len;
    char **raw;            /* [n_vocab] decoded bytes (eng_tok_piece) */
    uint32_t *raw_len;
    uint8_t *flags;        /* [n_vocab] F_* */
    size_t max_raw;
    eng__tok_map vocab;    /* model string -> id (model vocabulary) */
    eng__tok_merges merges;
    float *scores;         /* KIND_SPM_SCORE */
    int32_t byte_tok[256]; /* <0xNN> ids, -1 when absent */
    bool byte_fallback, ignore_merges, fuse_unk;
    int32_t unk_id;
    /* normalizer */
    norm_op *norm;
    int n_norm;
    /* pre-tokenizer */
    eng__tok_pat pat;
    bool js_ws;            /* the GPT-2 pattern comes from ByteLevel(use_regex): JS \s */
    bool bl_prefix_space;  /* ByteLevel add_prefix_space */
    bool metaspace;        /* Metaspace pre-tokenizer */
    int ms_prepend;        /* 0 never, 1 always, 2 first */
    bool ms_split;
    /* added tokens, bucketed by first byte, longest first */
    added_tok *added;
    int n_added;
    int32_t *bucket[256];
    int n_bucket[256];
    /* post-processing */
    int32_t *prefix, *suffix;
    int n_prefix, n_suffix;
    int bos, eos;
    bool adds_bos, adds_eos;
    /* decoding */
    bool strip_space;      /* strip one leading ' ' of the decoded text */
    bool dec_bytes;        /* <0xNN> pieces decode to their byte (ByteFallback decoder) */
};

/* GPT-2 bytes <-> unicode map. */
static uint32_t byte_to_cp[256];
static int16_t cp_to_byte[324];
static void bytemap_init(void) {
    int n = 0;
    for (int i = 0; i < 324; i++) cp_to_byte[i] = -1;
    for (int b = 0; b < 256; b++) {
        bool direct = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        byte_to_cp[b] = direct ? (uint32_t)b : (uint32_t)(256 + n++);
    }
    for (int b = 0; b < 256; b++) cp_to_byte[byte_to_cp[b]] = (int16_t)b;
}

static void bytemap_init_once(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, bytemap_init);
}

/* ------------------------------------------------------------------ utils */

typedef struct buf {
    char *p;
    size_t n, cap;
} buf;

static int buf_add(buf *b, const void *d, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 64;
        while (nc < b->n + n + 1) nc *= 2;
        char *np = realloc(b->p, nc);
        if (!np) return D2_ENOMEM;
        b->p = np;
        b->cap = nc;
    }
    if (n) memcpy(b->p + b->n, d, n);
    b->n += n;
    b->p[b->n] = 0;
    return D2_OK;
}

typedef struct ivec {
    int32_t *p;
    size_t n, cap;
} ivec;

static int ivec_push(ivec *v, int32_t x) {
    if (v->n == v->cap) {
        size_t nc = v->cap ? v->cap * 2 : 64;
        int32_t *np = realloc(v->p, nc * sizeof(int32_t));
        if (!np) return D2_ENOMEM;
        v->p = np;
        v->cap = nc;
    }
    v->p[v->n++] = x;
    return D2_OK;
}

static char *dupn(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (!d) return NULL;
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

static size_t utf8_char_len(const char *s, size_t avail) {
    int l = d2_utf8_seq((const uint8_t *)s, avail);
    return l > 0 ? (size_t)l : 1;
}

/* Decodes one code point at s (U+FFFD and length 1 for an invalid byte). */
static uint32_t utf8_cp(const char *s, size_t avail, size_t *l) {
    const uint8_t *u = (const uint8_t *)s;
    int n = d2_utf8_seq(u, avail);
    if (n <= 0) {
        *l = 1;
        return 0xFFFD;
    }
    *l = (size_t)n;
    switch (n) {
    case 1: return u[0];
    case 2: return ((uint32_t)(u[0] & 0x1F) << 6) | (u[1] & 0x3F);
    case 3: return ((uint32_t)(u[0] & 0x0F) << 12) | ((uint32_t)(u[1] & 0x3F) << 6) | (u[2] & 0x3F);
    default:
        return ((uint32_t)(u[0] & 0x07) << 18) | ((uint32_t)(u[1] & 0x3F) << 12) |
               ((uint32_t)(u[2] & 0x3F) << 6) | (u[3] & 0x3F);
    }
}

/* Appends s[0..n) to b replacing invalid UTF-8 by U+FFFD, one per maximal
 * subpart (as WHATWG TextDecoder and Rust from_utf8_lossy do). */
static int add_lossy(buf *b, const char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        int l = d2_utf8_seq((const uint8_t *)s + i, n - i);
        if (l > 0) {
            int rc = buf_add(b, s + i, (size_t)l);
            if (rc) return rc;
            i += (size_t)l;
            continue;
        }
        /* maximal subpart: the longest valid prefix (at least one byte) */
        size_t k = 1;
        while (i + k < n && k < 4 && d2_utf8_seq((const uint8_t *)s + i, k + 1) == -1) k++;
        if (l == -1) k = n - i;
        int rc = buf_add(b, "\xEF\xBF\xBD", 3);
        if (rc) return rc;
        i += k;
    }
    return D2_OK;
}

/* --------------------------------------------------------- construction */

static eng_tokenizer *tok_new(void) {
    bytemap_init_once();
    eng_tokenizer *t = calloc(1, sizeof(*t));
    if (!t) return NULL;
    t->unk_id = -1;
    t->bos = t->eos = -1;
    for (int i = 0; i < 256; i++) t->byte_tok[i] = -1;
    return t;
}

void eng_tok_free(eng_tokenizer *t) {
    if (!t) return;
    for (int i = 0; i < t->n_vocab; i++) {
        free(t->piece ? t->piece[i] : NULL);
        free(t->raw ? t->raw[i] : NULL);
    }
    free(t->piece);
    free(t->piece_len);
    free(t->raw);
    free(t->raw_len);
    free(t->flags);
    eng__tok_map_free(&t->vocab);
    eng__tok_merges_free(&t->merges);
    free(t->scores);
    for (int i = 0; i < t->n_norm; i++) {
        free(t->norm[i].a);
        free(t->norm[i].b);
    }
    free(t->norm);
    for (int i = 0; i < t->n_added; i++) {
        free(t->added[i].content);
        free(t->added[i].norm);
    }
    free(t->added);
    for (int i = 0; i < 256; i++) free(t->bucket[i]);
    free(t->prefix);
    free(t->suffix);
    free(t);
}

static int alloc_ids(eng_tokenizer *t, int n) {
    t->n_vocab = n;
    t->piece = calloc((size_t)n, sizeof(char *));
    t->piece_len = calloc((size_t)n, sizeof(uint32_t));
    t->raw = calloc((size_t)n, sizeof(char *));
    t->raw_len = calloc((size_t)n, sizeof(uint32_t));
    t->flags = calloc((size_t)n, 1);
    if (!t->piece || !t->piece_len || !t->raw || !t->raw_len || !t->flags) return D2_ENOMEM;
    return D2_OK;
}

static int set_piece(eng_tokenizer *t, int id, const char *s, size_t n) {
    free(t->piece[id]);
    t->piece[id] = dupn(s, n);
    if (!t->piece[id]) return D2_ENOMEM;
    t->piece_len[id] = (uint32_t)n;
    return D2_OK;
}

/* Parses "<0xNN>" into NN, or -1. */
static int parse_byte_token(const char *s, size_t n) {
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int k = 3; k < 5; k++) {
        char c = s[k];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0) return -1;
        v = v * 16 + d;
    }
    return v;
}

/* Computes raw[id] (decoded bytes) for every id, once pieces and flags are
 * set. Byte-level: map chars back to bytes (added tokens verbatim). Others:
 * U+2581 -> ' ', <0xNN> -> the byte when byte_fallback decoding applies. */
static int build_raw(eng_tokenizer *t) {
    for (int id = 0; id < t->n_vocab; id++) {
        const char *p = t->piece[id];
        if (!p) continue;
        size_t n = t->piece_len[id];
        buf b = {0};
        int rc = D2_OK;
        bool added = t->flags[id] & F_ADDED;
        int bv;
        if (t->kind == KIND_BYTELEVEL && !added) {
            size_t i = 0;
            bool ok = true;
            while (i < n && ok) {
                size_t l;
                uint32_t cp = utf8_cp(p + i, n - i, &l);
                if (cp < 324 && cp_to_byte[cp] >= 0) {
                    char c = (char)cp_to_byte[cp];
                    rc = buf_add(&b, &c, 1);
                } else {
                    ok = false;
                }
                i += l;
            }
            if (!ok) {
                b.n = 0;
                rc = buf_add(&b, p, n);
            }
        } else if (t->kind != KIND_BYTELEVEL && !added && t->dec_bytes && (bv = parse_byte_token(p, n)) >= 0 &&
                   t->byte_tok[bv] == id) {
            char c = (char)bv;
            rc = buf_add(&b, &c, 1);
        } else if (t->kind != KIND_BYTELEVEL) {
            for (size_t i = 0; i < n && rc == D2_OK;) {
                if (i + 3 <= n && memcmp(p + i, "\xE2\x96\x81", 3) == 0) {
                    rc = buf_add(&b, " ", 1);
                    i += 3;
                } else {
                    rc = buf_add(&b, p + i, 1);
                    i++;
                }
            }
        } else {
            rc = buf_add(&b, p, n);
        }
        if (rc == D2_OK && !b.p) rc = buf_add(&b, "", 0);
        if (rc) {
            free(b.p);
            return rc;
        }
        t->raw[id] = b.p;
        t->raw_len[id] = (uint32_t)b.n;
        if (b.n > t->max_raw) t->max_raw = b.n;
    }
    return D2_OK;
}

static int added_cmp_len_desc(const added_tok *x, const added_tok *y);

/* Sorts added tokens into first-byte buckets, longest content first. */
static int build_buckets(eng_tokenizer *t) {
    for (int pass = 0; pass < 2; pass++) {
        for (int k = 0; k < t->n_added; k++) {
            const added_tok *a = &t->added[k];
            const char *c = a->norm ? a->norm : a->content;
            size_t len = a->norm ? a->norm_len : a->len;
            if (len == 0) continue;
            int fb = (uint8_t)c[0];
            if (pass == 1) t->bucket[fb][t->n_bucket[fb]++] = k;
            else t->n_bucket[fb]++;
        }
        if (pass == 0) {
            for (int fb = 0; fb < 256; fb++) {
                if (!t->n_bucket[fb]) continue;
                t->bucket[fb] = malloc((size_t)t->n_bucket[fb] * sizeof(int32_t));
                if (!t->bucket[fb]) return D2_ENOMEM;
                t->n_bucket[fb] = 0;
            }
        }
    }
    /* insertion sort by length, descending (buckets are small) */
    for (int fb = 0; fb < 256; fb++) {
        int32_t *bk = t->bucket[fb];
        for (int i = 1; i < t->n_bucket[fb]; i++) {
            int32_t v = bk[i];
            int j = i;
            while (j > 0 && added_cmp_len_desc(&t->added[bk[j - 1]], &t->added[v]) > 0) {
                bk[j] = bk[j - 1];
                j--;
            }
            bk[j] = v;
        }
    }
    return D2_OK;
}

static int added_cmp_len_desc(const added_tok *x, const added_tok *y) {
    size_t lx = x->norm ? x->norm_len : x->len, ly = y->norm ? y->norm_len : y->len;
    return lx < ly ? 1 : lx > ly ? -1 : 0;
}

/* ------------------------------------------------------------ normalizer */

/* Applies the normalizer ops to s[0..n) into a new buffer. */
static int normalize(const eng_tokenizer *t, const char *s, size_t n, buf *out) {
    buf cur = {0};
    int rc = buf_add(&cur, s, n);
    for (int k = 0; k < t->n_norm && rc == D2_OK; k++) {
        const norm_op *op = &t->norm[k];
        buf nx = {0};
        if (op->op == NORM_NFC) {
            uint32_t *cps = NULL, *nf = NULL;
            size_t nc = 0, nn = 0;
            rc = eng__tok_utf8_decode(cur.p, cur.n, &cps, &nc);
            if (rc == D2_OK) rc = eng__tok_nfc(cps, nc, &nf, &nn);
            rc = rc ? rc : buf_add(&nx, "", 0);
            for (size_t i = 0; i < nn && rc == D2_OK; i++) {
                char u[4];
                int l = d2_utf8_put(nf[i], u);
                rc = buf_add(&nx, u, (size_t)l);
            }
            free(cps);
            free(nf);
        } else if (op->op == NORM_PREPEND) {
            if (cur.n == 0) rc = buf_add(&nx, "", 0); /* HF: nothing to prepend to */
            else if ((rc = buf_add(&nx, op->a, op->alen)) == D2_OK) rc = buf_add(&nx, cur.p, cur.n);
        } else {
            rc = buf_add(&nx, "", 0);
            for (size_t i = 0; i < cur.n && rc == D2_OK;) {
                if (op->alen && i + op->alen <= cur.n && memcmp(cur.p + i, op->a, op->alen) == 0) {
                    rc = buf_add(&nx, op->b, op->blen);
                    i += op->alen;
                } else {
                    rc = buf_add(&nx, cur.p + i, 1);
                    i++;
                }
            }
        }
        free(cur.p);
        cur = nx;
    }
    if (rc) {
        free(cur.p);
        return rc;
    }
    *out = cur;
    return D2_OK;
}

/* --------------------------------------------------------------- encoding */

typedef struct seg {
    size_t a, b;     /* byte span of text (when id < 0) */
    int32_t id;      /* added token id, or -1 for text */
    int added_idx;
} seg;

typedef struct segvec {
    seg *p;
    size_t n, cap;
} segvec;

static int seg_push(segvec *v, seg s) {
    if (v->n == v->cap) {
        size_t nc = v->cap ? v->cap * 2 : 16;
        seg *np = realloc(v->p, nc * sizeof(seg));
        if (!np) return D2_ENOMEM;
        v->p = np;
        v->cap = nc;
    }
    v->p[v->n++] = s;
    return D2_OK;
}

/* Splits s[0..n) on added tokens (leftmost-longest) of the given pass
 * (normalized_pass: tokens matched after normalization), then applies
 * lstrip/rstrip to the neighbouring text as tokenizers.js does. */
static int split_added(const eng_tokenizer *t, const char *s, size_t n, bool normalized_pass,
                       bool parse_special, segvec *out) {
    size_t start = 0, i = 0;
    while (i < n) {
        int fb = (uint8_t)s[i];
        int best = -1;
        size_t best_len = 0;
        for (int k = 0; k < t->n_bucket[fb]; k++) {
            const added_tok *a = &t->added[t->bucket[fb][k]];
            bool in_pass = normalized_pass ? (a->norm != NULL) : (a->norm == NULL);
            if (!in_pass || (a->special && !parse_special)) continue;
            const char *c = normalized_pass ? a->norm : a->content;
            size_t len = normalized_pass ? a->norm_len : a->len;
            if (len <= n - i && memcmp(s + i, c, len) == 0) {
                best = t->bucket[fb][k];
                best_len = len;
                break; /* longest first */
            }
        }
        if (best < 0) {
            i++;
            continue;
        }
        int rc;
        if (i > start && (rc = seg_push(out, (seg){start, i, -1, -1}))) return rc;
        if ((rc = seg_push(out, (seg){i, i + best_len, t->added[best].id, best}))) return rc;
        i += best_len;
        start = i;
    }
    if (start < n) {
        int rc = seg_push(out, (seg){start, n, -1, -1});
        if (rc) return rc;
    }
    for (size_t k = 0; k < out->n; k++) {
        if (out->p[k].id < 0) continue;
        const added_tok *a = &t->added[out->p[k].added_idx];
        if (a->lstrip && k > 0 && out->p[k - 1].id < 0) {
            seg *p = &out->p[k - 1];
            while (p->b > p->a) { /* trim trailing whitespace (JS trimEnd) */
                size_t q = p->b - 1;
                while (q > p->a && ((uint8_t)s[q] & 0xC0) == 0x80) q--;
                size_t l;
                uint32_t cp = utf8_cp(s + q, p->b - q, &l);
                if (!eng__tok_is_js_ws(cp)) break;
                p->b = q;
            }
        }
        if (a->rstrip && k + 1 < out->n && out->p[k + 1].id < 0) {
            seg *p = &out->p[k + 1];
            while (p->a < p->b) {
                size_t l;
                uint32_t cp = utf8_cp(s + p->a, p->b - p->a, &l);
                if (!eng__tok_is_js_ws(cp)) break;
                p->a += l;
            }
        }
    }
    return D2_OK;
}

typedef struct enc_ctx {
    const eng_tokenizer *t;
    ivec *ids;
    eng__tok_bpe_out bo;
    buf word;
    uint32_t *ustart;
    int32_t *uid;
    size_t ucap;
} enc_ctx;

static int units_reserve(enc_ctx *c, size_t n) {
    if (n + 1 <= c->ucap) return D2_OK;
    size_t nc = c->ucap ? c->ucap : 64;
    while (nc < n + 1) nc *= 2;
    uint32_t *a = realloc(c->ustart, nc * sizeof(uint32_t));
    if (!a) return D2_ENOMEM;
    c->ustart = a;
    int32_t *b = realloc(c->uid, nc * sizeof(int32_t));
    if (!b) return D2_ENOMEM;
    c->uid = b;
    c->ucap = nc;
    return D2_OK;
}

/* Runs the model on one pre-token: s[0..n) raw UTF-8 (byte-level: the
 * bytes are mapped to the GPT-2 alphabet first). */
static int model_word(enc_ctx *c, const char *s, size_t n) {
    const eng_tokenizer *t = c->t;
    if (n == 0) return D2_OK;
    int rc;
    c->word.n = 0;
    size_t nu = 0;
    if (t->kind == KIND_BYTELEVEL) {
        if ((rc = units_reserve(c, n))) return rc;
        for (size_t i = 0; i < n; i++) {
            char u[4];
            int l = d2_utf8_put(byte_to_cp[(uint8_t)s[i]], u);
            c->ustart[nu++] = (uint32_t)c->word.n;
            if ((rc = buf_add(&c->word, u, (size_t)l))) return rc;
        }
    } else {
        if ((rc = units_reserve(c, n))) return rc;
        if ((rc = buf_add(&c->word, s, n))) return rc;
        for (size_t i = 0; i < n;) {
            c->ustart[nu++] = (uint32_t)i;
            i += utf8_char_len(s + i, n - i);
        }
    }
    c->ustart[nu] = (uint32_t)c->word.n;
    const char *w = c->word.p;
    if (t->ignore_merges) {
        int32_t id = eng__tok_map_get(&t->vocab, w, c->word.n);
        if (id >= 0) return ivec_push(c->ids, id);
    }
    for (size_t k = 0; k < nu; k++)
        c->uid[k] = eng__tok_map_get(&t->vocab, w + c->ustart[k], c->ustart[k + 1] - c->ustart[k]);
    eng__tok_bpe_in in = {w, nu, c->ustart, c->uid};
    c->bo.n = 0;
    rc = eng__tok_bpe(&in, t->kind == KIND_SPM_SCORE ? NULL : &t->merges, &t->vocab, t->scores, &c->bo);
    if (rc) return rc;
    bool prev_unk = false;
    for (size_t k = 0; k < c->bo.n; k++) {
        int32_t id = c->bo.ids[k];
        if (id >= 0) {
            if ((rc = ivec_push(c->ids, id))) return rc;
            prev_unk = false;
            continue;
        }
        const char *p = w + c->bo.span[2 * k];
        size_t pl = c->bo.span[2 * k + 1] - c->bo.span[2 * k];
        bool all = t->byte_fallback;
        for (size_t q = 0; q < pl && all; q++)
            if (t->byte_tok[(uint8_t)p[q]] < 0) all = false;
        if (all) {
            for (size_t q = 0; q < pl; q++)
                if ((rc = ivec_push(c->ids, t->byte_tok[(uint8_t)p[q]]))) return rc;
            prev_unk = false;
        } else if (t->unk_id >= 0) {
            if (!(t->fuse_unk && prev_unk) && (rc = ivec_push(c->ids, t->unk_id))) return rc;
            prev_unk = true;
        }
    }
    return D2_OK;
}

/* Pre-tokenizes one normalized text section and runs the model. first: the
 * section starts the text (Metaspace prepend_scheme "first"). */
static int pretok_section(enc_ctx *c, const char *s, size_t n, bool first) {
    const eng_tokenizer *t = c->t;
    int rc = D2_OK;
    if (n == 0) return D2_OK;
    if (t->metaspace) {
        buf m = {0};
        for (size_t i = 0; i < n && rc == D2_OK; i++)
            rc = s[i] == ' ' ? buf_add(&m, "\xE2\x96\x81", 3) : buf_add(&m, s + i, 1);
        bool starts = m.n >= 3 && memcmp(m.p, "\xE2\x96\x81", 3) == 0;
        if (rc == D2_OK && !starts && (t->ms_prepend == 1 || (t->ms_prepend == 2 && first))) {
            buf m2 = {0};
            rc = buf_add(&m2, "\xE2\x96\x81", 3);
            if (rc == D2_OK) rc = buf_add(&m2, m.p, m.n);
            free(m.p);
            m = m2;
        }
        if (rc == D2_OK && m.n) {
            if (!t->ms_split) {
                rc = model_word(c, m.p, m.n);
            } else { /* split before every U+2581 (MergedWithNext) */
                size_t a = 0;
                for (size_t i = 1; i <= m.n && rc == D2_OK; i++) {
                    if (i == m.n || (i + 3 <= m.n && memcmp(m.p + i, "\xE2\x96\x81", 3) == 0)) {
                        rc = model_word(c, m.p + a, i - a);
                        a = i;
                    }
                }
            }
        }
        free(m.p);
        return rc;
    }
    if (t->pat == ENG__TOK_PAT_NONE && !t->bl_prefix_space) return model_word(c, s, n);
    buf pre = {0};
    if (t->bl_prefix_space && s[0] != ' ') rc = buf_add(&pre, " ", 1);
    if (rc == D2_OK) rc = buf_add(&pre, s, n);
    uint32_t *cps = NULL;
    size_t nc = 0;
    if (rc == D2_OK) rc = eng__tok_utf8_decode(pre.p, pre.n, &cps, &nc);
    if (rc == D2_OK && t->pat == ENG__TOK_PAT_NONE) {
        rc = model_word(c, pre.p, pre.n);
    } else if (rc == D2_OK) {
        size_t off = 0; /* byte offset of cps[i] in pre (the text is valid UTF-8) */
        for (size_t i = 0; i < nc && rc == D2_OK;) {
            size_t l = eng__tok_pat_match(t->pat, t->js_ws, cps, nc, i);
            size_t bytes = 0;
            for (size_t k = i; k < i + l; k++) {
                uint32_t cp = cps[k];
                bytes += cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
            }
            rc = model_word(c, pre.p + off, bytes);
            off += bytes;
            i += l;
        }
    }
    free(cps);
    free(pre.p);
    return rc;
}

int eng_tok_encode(const eng_tokenizer *t, const char *text, size_t len, bool add_special,
                   bool parse_special, int32_t **ids_out, size_t *n_out) {
    if (!t || (!text && len) || !ids_out || !n_out) return D2_EINVAL;
    *ids_out = NULL;
    *n_out = 0;
    ivec ids = {0};
    enc_ctx c = {.t = t, .ids = &ids};
    segvec s1 = {0}, s2 = {0};
    buf clean = {0}, nb = {0};
    uint32_t *cps = NULL;
    size_t nc = 0;
    int rc = eng__tok_utf8_decode(text ? text : "", len, &cps, &nc);
    /* Re-encode: invalid bytes are now U+FFFD. */
    if (rc == D2_OK) rc = buf_add(&clean, "", 0);
    for (size_t i = 0; i < nc && rc == D2_OK; i++) {
        char u[4];
        int l = d2_utf8_put(cps[i], u);
        rc = buf_add(&clean, u, (size_t)l);
    }
    if (add_special)
        for (int k = 0; k < t->n_prefix && rc == D2_OK; k++) rc = ivec_push(&ids, t->prefix[k]);
    if (rc == D2_OK) rc = split_added(t, clean.p, clean.n, false, parse_special, &s1);
    for (size_t k = 0; k < s1.n && rc == D2_OK; k++) {
        seg g = s1.p[k];
        if (g.id >= 0) {
            rc = ivec_push(&ids, g.id);
            continue;
        }
        if (g.b <= g.a) continue;
        free(nb.p);
        nb = (buf){0};
        rc = normalize(t, clean.p + g.a, g.b - g.a, &nb);
        if (rc || nb.n == 0) continue;
        s2.n = 0;
        rc = split_added(t, nb.p, nb.n, true, parse_special, &s2);
        for (size_t j = 0; j < s2.n && rc == D2_OK; j++) {
            seg h = s2.p[j];
            if (h.id >= 0) rc = ivec_push(&ids, h.id);
            else if (h.b > h.a) rc = pretok_section(&c, nb.p + h.a, h.b - h.a, g.a == 0 && h.a == 0);
        }
    }
    if (add_special)
        for (int k = 0; k < t->n_suffix && rc == D2_OK; k++) rc = ivec_push(&ids, t->suffix[k]);
    free(cps);
    free(clean.p);
    free(nb.p);
    free(s1.p);
    free(s2.p);
    free(c.bo.ids);
    free(c.bo.span);
    free(c.word.p);
    free(c.ustart);
    free(c.uid);
    if (rc) {
        free(ids.p);
        return rc;
    }
    if (!ids.p) {
        ids.p = malloc(sizeof(int32_t));
        if (!ids.p) return D2_ENOMEM;
    }
    *ids_out = ids.p;
    *n_out = ids.n;
    return D2_OK;
}

/* --------------------------------------------------------------- queries */

int eng_tok_n_vocab(const eng_tokenizer *t) { return t ? t->n_vocab : 0; }
int eng_tok_bos(const eng_tokenizer *t) { return t ? t->bos : -1; }
int eng_tok_eos(const eng_tokenizer *t) { return t ? t->eos : -1; }
bool eng_tok_adds_bos(const eng_tokenizer *t) { return t && t->adds_bos; }
bool eng_tok_adds_eos(const eng_tokenizer *t) { return t && t->adds_eos; }
size_t eng_tok_max_piece_len(const eng_tokenizer *t) { return t ? t->max_raw : 0; }

int eng_tok_find(const eng_tokenizer *t, const char *text) {
    if (!t || !text) return -1;
    size_t n = strlen(text);
    for (int k = 0; k < t->n_added; k++)
        if (t->added[k].len == n && memcmp(t->added[k].content, text, n) == 0) return t->added[k].id;
    return eng__tok_map_get(&t->vocab, text, n);
}

bool eng_tok_is_special(const eng_tokenizer *t, int id) {
    return t && id >= 0 && id < t->n_vocab && (t->flags[id] & F_SPECIAL);
}

const char *eng_tok_piece(const eng_tokenizer *t, int id, size_t *len) {
    if (!t || id < 0 || id >= t->n_vocab || !t->raw[id]) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = t->raw_len[id];
    return t->raw[id];
}

/* --------------------------------------------------------------- decoding */

int eng_tok_decode(const eng_tokenizer *t, const int32_t *ids, size_t n, bool skip_special,
                   char **out) {
    if (!t || (!ids && n) || !out) return D2_EINVAL;
    *out = NULL;
    buf raw = {0}, res = {0};
    int rc = buf_add(&raw, "", 0);
    for (size_t k = 0; k < n && rc == D2_OK; k++) {
        int id = ids[k];
        if (id < 0 || id >= t->n_vocab || !t->raw[id]) continue; /* HF: unknown ids decode to nothing */
        if (skip_special && (t->flags[id] & F_SPECIAL)) continue;
        rc = buf_add(&raw, t->raw[id], t->raw_len[id]);
    }
    size_t skip = (rc == D2_OK && t->strip_space && raw.n > 0 && raw.p[0] == ' ') ? 1 : 0;
    if (rc == D2_OK) rc = buf_add(&res, "", 0);
    if (rc == D2_OK) rc = add_lossy(&res, raw.p + skip, raw.n - skip);
    free(raw.p);
    if (rc) {
        free(res.p);
        return rc;
    }
    *out = res.p;
    return D2_OK;
}

void eng_tok_stream_init(eng_tok_stream *s, bool skip_special) {
    memset(s, 0, sizeof(*s));
    s->skip_special = skip_special;
}

int eng_tok_stream_feed(const eng_tokenizer *t, eng_tok_stream *s, int id, char *out, size_t cap) {
    if (!t || !s || !out || cap == 0) return D2_EINVAL;
    out[0] = 0;
    if (id < 0 || id >= t->n_vocab || !t->raw[id]) return D2_EINVAL;
    if (s->skip_special && (t->flags[id] & F_SPECIAL)) {
        s->n_tokens++;
        return 0;
    }
    const char *p = t->raw[id];
    size_t pl = t->raw_len[id];
    size_t produced_before = s->n_bytes;
    if (t->strip_space && produced_before == 0 && pl > 0 && p[0] == ' ') {
        p++;
        pl--;
    }
    /* Work on pending + piece; emit whole sequences, hold a valid prefix. */
    size_t total = (size_t)s->n_pending + pl;
    uint8_t small[256];
    uint8_t *w = total <= sizeof(small) ? small : malloc(total);
    if (!w) return D2_ENOMEM;
    memcpy(w, s->pending, (size_t)s->n_pending);
    memcpy(w + s->n_pending, p, pl);
    /* First pass: size of the output and where the held tail starts. */
    size_t need = 0, i = 0, hold = total;
    while (i < total) {
        int l = d2_utf8_seq(w + i, total - i);
        if (l > 0) { need += (size_t)l; i += (size_t)l; }
        else if (l == -1) { hold = i; break; }
        else { need += 3; i++; }
    }
    if (need + 1 > cap) {
        if (w != small) free(w);
        return D2_ERANGE;
    }
    size_t o = 0;
    for (i = 0; i < hold;) {
        int l = d2_utf8_seq(w + i, hold - i);
        if (l > 0) {
            memcpy(out + o, w + i, (size_t)l);
            o += (size_t)l;
            i += (size_t)l;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = 0;
    s->n_pending = (int)(total - hold);
    memcpy(s->pending, w + hold, (size_t)s->n_pending);
    s->n_tokens++;
    s->n_bytes += t->raw_len[id];
    if (w != small) free(w);
    return (int)o;
}

int eng_tok_stream_finish(const eng_tokenizer *t, eng_tok_stream *s, char *out, size_t cap) {
    (void)t;
    if (!s || !out || cap == 0) return D2_EINVAL;
    out[0] = 0;
    if (s->n_pending == 0) return 0;
    if (cap < 4) return D2_ERANGE;
    memcpy(out, "\xEF\xBF\xBD", 4); /* one U+FFFD for the incomplete sequence */
    s->n_pending = 0;
    return 3;
}

/* ---------------------------------------------------------------- loading */

static const char *jstr(const json_t *o, const char *key) {
    const json_t *v = json_object_get(o, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static bool jbool(const json_t *o, const char *key, bool def) {
    const json_t *v = json_object_get(o, key);
    return json_is_boolean(v) ? json_is_true(v) : def;
}

/* bos_token / eos_token in tokenizer_config: a string or {"content": ...}. */
static const char *config_token(const json_t *cfg, const char *key) {
    const json_t *v = json_object_get(cfg, key);
    if (json_is_string(v)) return json_string_value(v);
    if (json_is_object(v)) return jstr(v, "content");
    return NULL;
}

static int add_norm_op(eng_tokenizer *t, int op, const char *a, const char *b) {
    norm_op *n = realloc(t->norm, (size_t)(t->n_norm + 1) * sizeof(norm_op));
    if (!n) return D2_ENOMEM;
    t->norm = n;
    norm_op *o = &t->norm[t->n_norm++];
    memset(o, 0, sizeof(*o));
    o->op = op;
    if (a) {
        o->alen = strlen(a);
        if (!(o->a = dupn(a, o->alen))) return D2_ENOMEM;
    }
    if (b) {
        o->blen = strlen(b);
        if (!(o->b = dupn(b, o->blen))) return D2_ENOMEM;
    }
    return D2_OK;
}

static int parse_normalizer(eng_tokenizer *t, const json_t *n, const char *path) {
    if (!n || json_is_null(n)) return D2_OK;
    const char *type = jstr(n, "type");
    if (!type) goto bad;
    if (!strcmp(type, "Sequence")) {
        const json_t *arr = json_object_get(n, "normalizers");
        size_t i;
        const json_t *x;
        json_array_foreach(arr, i, x) {
            int rc = parse_normalizer(t, x, path);
            if (rc) return rc;
        }
        return D2_OK;
    }
    if (!strcmp(type, "NFC")) return add_norm_op(t, NORM_NFC, NULL, NULL);
    if (!strcmp(type, "Prepend") && jstr(n, "prepend")) return add_norm_op(t, NORM_PREPEND, jstr(n, "prepend"), NULL);
    if (!strcmp(type, "Replace")) {
        const json_t *pat = json_object_get(n, "pattern");
        const char *from = jstr(pat, "String"), *to = jstr(n, "content");
        if (from && to) return add_norm_op(t, NORM_REPLACE, from, to);
    }
bad:
    D2_ERROR("%s: unsupported normalizer %s", path, type ? type : "(no type)");
    return D2_EUNSUPPORTED;
}

static int parse_pretok(eng_tokenizer *t, const json_t *p, const char *path) {
    if (!p || json_is_null(p)) return D2_OK;
    const char *type = jstr(p, "type");
    if (!type) goto bad;
    if (!strcmp(type, "Sequence")) {
        const json_t *arr = json_object_get(p, "pretokenizers");
        size_t i;
        const json_t *x;
        json_array_foreach(arr, i, x) {
            int rc = parse_pretok(t, x, path);
            if (rc) return rc;
        }
        return D2_OK;
    }
    if (!strcmp(type, "ByteLevel")) {
        t->kind = KIND_BYTELEVEL;
        if (jbool(p, "add_prefix_space", false)) t->bl_prefix_space = true;
        if (jbool(p, "use_regex", true)) {
            if (t->pat != ENG__TOK_PAT_NONE) {
                D2_ERROR("%s: two regex pre-tokenizers are not supported", path);
                return D2_EUNSUPPORTED;
            }
            t->pat = ENG__TOK_PAT_GPT2;
            t->js_ws = true;
        }
        return D2_OK;
    }
    if (!strcmp(type, "Split")) {
        const char *re = jstr(json_object_get(p, "pattern"), "Regex");
        const char *beh = jstr(p, "behavior");
        eng__tok_pat pat = eng__tok_pat_from_regex(re);
        if (pat == ENG__TOK_PAT_NONE || !beh || strcmp(beh, "Isolated") != 0 || jbool(p, "invert", false) ||
            t->pat != ENG__TOK_PAT_NONE) {
            D2_ERROR("%s: unsupported Split pre-tokenizer (regex %s, behavior %s)", path, re ? re : "(none)",
                     beh ? beh : "(none)");
            return D2_EUNSUPPORTED;
        }
        t->pat = pat;
        t->js_ws = false;
        return D2_OK;
    }
    if (!strcmp(type, "Metaspace")) {
        const char *rep = jstr(p, "replacement");
        if (rep && strcmp(rep, "\xE2\x96\x81") != 0) goto bad;
        t->metaspace = true;
        const char *ps = jstr(p, "prepend_scheme");
        if (ps) t->ms_prepend = !strcmp(ps, "always") ? 1 : !strcmp(ps, "first") ? 2 : 0;
        else t->ms_prepend = jbool(p, "add_prefix_space", true) ? 1 : 0;
        t->ms_split = jbool(p, "split", true);
        return D2_OK;
    }
bad:
    D2_ERROR("%s: unsupported pre_tokenizer %s", path, type ? type : "(no type)");
    return D2_EUNSUPPORTED;
}

static void parse_decoder(eng_tokenizer *t, const json_t *d) {
    if (!d || json_is_null(d)) return;
    const char *type = jstr(d, "type");
    if (!type) return;
    if (!strcmp(type, "Sequence")) {
        size_t i;
        const json_t *x;
        json_array_foreach(json_object_get(d, "decoders"), i, x) parse_decoder(t, x);
    } else if (!strcmp(type, "ByteFallback")) {
        t->dec_bytes = true;
    } else if (!strcmp(type, "Strip")) {
        const char *c = jstr(d, "content");
        const json_t *st = json_object_get(d, "start");
        if (c && !strcmp(c, " ") && json_integer_value(st) >= 1) t->strip_space = true;
    } else if (!strcmp(type, "Metaspace")) {
        const char *ps = jstr(d, "prepend_scheme");
        if (ps ? strcmp(ps, "never") != 0 : jbool(d, "add_prefix_space", true)) t->strip_space = true;
    }
}

/* Resolves a TemplateProcessing special-token name to ids. */
static int template_ids(eng_tokenizer *t, const json_t *pp, const char *name, ivec *v) {
    const json_t *st = json_object_get(json_object_get(pp, "special_tokens"), name);
    const json_t *ids = json_object_get(st, "ids");
    if (json_is_array(ids)) {
        size_t i;
        const json_t *x;
        json_array_foreach(ids, i, x) {
            int rc = ivec_push(v, (int32_t)json_integer_value(x));
            if (rc) return rc;
        }
        return D2_OK;
    }
    int id = eng_tok_find(t, name);
    return id >= 0 ? ivec_push(v, id) : D2_OK;
}

static int parse_post(eng_tokenizer *t, const json_t *pp, bool *has_template) {
    if (!pp || json_is_null(pp)) return D2_OK;
    const char *type = jstr(pp, "type");
    if (!type) return D2_OK;
    if (!strcmp(type, "Sequence")) {
        size_t i;
        const json_t *x;
        json_array_foreach(json_object_get(pp, "processors"), i, x) {
            int rc = parse_post(t, x, has_template);
            if (rc) return rc;
        }
        return D2_OK;
    }
    if (strcmp(type, "TemplateProcessing") != 0) return D2_OK;
    *has_template = true;
    ivec pre = {0}, suf = {0};
    bool seen_a = false;
    int rc = D2_OK;
    size_t i;
    const json_t *x;
    json_array_foreach(json_object_get(pp, "single"), i, x) {
        const json_t *sp = json_object_get(x, "SpecialToken");
        if (json_object_get(x, "Sequence")) seen_a = true;
        else if (sp && jstr(sp, "id") && rc == D2_OK) rc = template_ids(t, pp, jstr(sp, "id"), seen_a ? &suf : &pre);
    }
    free(t->prefix);
    free(t->suffix);
    t->prefix = pre.p;
    t->n_prefix = (int)pre.n;
    t->suffix = suf.p;
    t->n_suffix = (int)suf.n;
    return rc;
}

/* Finishes a loaded tokenizer: raw pieces, added-token buckets, normalized
 * added contents. */
static int finish(eng_tokenizer *t) {
    for (int k = 0; k < t->n_added; k++) {
        added_tok *a = &t->added[k];
        if (!a->normalized || t->n_norm == 0) continue;
        buf nb = {0};
        int rc = normalize(t, a->content, a->len, &nb);
        if (rc) return rc;
        a->norm = nb.p ? nb.p : dupn("", 0);
        a->norm_len = nb.n;
        if (!a->norm) return D2_ENOMEM;
    }
    int rc = build_buckets(t);
    if (rc) return rc;
    return build_raw(t);
}

static int push_added(eng_tokenizer *t, const char *content, int32_t id, bool special, bool lstrip,
                      bool rstrip, bool normalized) {
    added_tok *na = realloc(t->added, (size_t)(t->n_added + 1) * sizeof(added_tok));
    if (!na) return D2_ENOMEM;
    t->added = na;
    added_tok *a = &t->added[t->n_added];
    memset(a, 0, sizeof(*a));
    a->len = strlen(content);
    a->content = dupn(content, a->len);
    if (!a->content) return D2_ENOMEM;
    a->id = id;
    a->special = special;
    a->lstrip = lstrip;
    a->rstrip = rstrip;
    a->normalized = normalized;
    t->n_added++;
    t->flags[id] |= F_ADDED | (special ? F_SPECIAL : 0);
    if (!t->piece[id]) return set_piece(t, id, content, a->len);
    return D2_OK;
}

/* ---- eng_tok_load_hf, step by step ------------------------------------------- */

/* tokenizer.json into *root and, when the file exists, tokenizer_config.json
 * into *cfg (NULL otherwise). */
static int hf_read_json(const char *tokenizer_json, const char *tokenizer_config_json, json_t **root,
                        json_t **cfg) {
    *root = *cfg = NULL;
    FILE *f = fopen(tokenizer_json, "rb");
    if (!f) {
        D2_ERROR("%s: cannot open", tokenizer_json);
        return D2_ENOENT;
    }
    fclose(f);
    json_error_t jerr;
    *root = json_load_file(tokenizer_json, 0, &jerr);
    if (!*root) {
        D2_ERROR("%s:%d: malformed JSON: %s", tokenizer_json, jerr.line, jerr.text);
        return D2_EJSON;
    }
    if (!tokenizer_config_json) return D2_OK;
    FILE *cf = fopen(tokenizer_config_json, "rb");
    if (!cf) return D2_OK;
    fclose(cf);
    /* model_max_length is often 1e30 written as an integer */
    *cfg = json_load_file(tokenizer_config_json, JSON_DECODE_INT_AS_REAL, &jerr);
    if (!*cfg) {
        D2_ERROR("%s:%d: malformed JSON: %s", tokenizer_config_json, jerr.line, jerr.text);
        return D2_EJSON;
    }
    return D2_OK;
}

/* Only plain BPE with a vocab and merges is supported. */
static int hf_check_model(const json_t *model, const char *path) {
    const json_t *vocab = json_object_get(model, "vocab");
    const json_t *merges = json_object_get(model, "merges");
    const char *mtype = jstr(model, "type");
    if (!json_is_object(vocab) || !json_is_array(merges) || (mtype && strcmp(mtype, "BPE") != 0)) {
        D2_ERROR("%s: unsupported model (type %s): only BPE with vocab and merges", path, mtype ? mtype : "(none)");
        return D2_EUNSUPPORTED;
    }
    const json_t *drop = json_object_get(model, "dropout");
    const char *cswp = jstr(model, "continuing_subword_prefix"), *eows = jstr(model, "end_of_word_suffix");
    if ((json_is_number(drop) && json_number_value(drop) > 0) || (cswp && *cswp) || (eows && *eows)) {
        D2_ERROR("%s: unsupported BPE options (dropout / subword prefix / suffix)", path);
        return D2_EUNSUPPORTED;
    }
    return D2_OK;
}

/* Sizes the id tables from the largest vocab or added-token id, then fills
 * the pieces and the vocab map. */
static int hf_vocab(eng_tokenizer *t, const json_t *vocab, const json_t *added, const char *path) {
    int max_id = -1;
    const char *key;
    const json_t *val;
    json_object_foreach((json_t *)vocab, key, val) {
        json_int_t id = json_integer_value(val);
        if (!json_is_integer(val) || id < 0 || id > 0x7FFFFFF) {
            D2_ERROR("%s: bad vocab id for %s", path, key);
            return D2_EFORMAT;
        }
        if (id > max_id) max_id = (int)id;
    }
    size_t ai;
    const json_t *ax;
    json_array_foreach(added, ai, ax) {
        json_int_t id = json_integer_value(json_object_get(ax, "id"));
        if (!jstr(ax, "content") || id < 0 || id > 0x7FFFFFF) {
            D2_ERROR("%s: bad added token %zu", path, ai);
            return D2_EFORMAT;
        }
        if (id > max_id) max_id = (int)id;
    }
    int rc;
    if ((rc = alloc_ids(t, max_id + 1))) return rc;
    if ((rc = eng__tok_map_init(&t->vocab, (uint32_t)json_object_size(vocab)))) return rc;
    json_object_foreach((json_t *)vocab, key, val) {
        int id = (int)json_integer_value(val);
        size_t kl = strlen(key);
        if (t->piece[id]) continue;
        if ((rc = set_piece(t, id, key, kl))) return rc;
        if ((rc = eng__tok_map_put(&t->vocab, t->piece[id], kl, id, false))) return rc;
    }
    return D2_OK;
}

/* byte_fallback, ignore_merges, fuse_unk, unk_token and the <0xNN> byte tokens. */
static void hf_model_options(eng_tokenizer *t, const json_t *model) {
    t->byte_fallback = jbool(model, "byte_fallback", false);
    t->ignore_merges = jbool(model, "ignore_merges", false);
    t->fuse_unk = jbool(model, "fuse_unk", false);
    const char *unk = jstr(model, "unk_token");
    if (unk) t->unk_id = eng__tok_map_get(&t->vocab, unk, strlen(unk));
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof(name), "<0x%02X>", b);
        t->byte_tok[b] = eng__tok_map_get(&t->vocab, name, 6);
    }
}

/* One merge entry ("a b" or ["a", "b"]) into its parts; false when malformed. */
static bool hf_merge_parts(const json_t *mx, const char **a, size_t *al, const char **b, size_t *bl) {
    if (json_is_string(mx)) {
        const char *s = json_string_value(mx);
        const char *sp = strchr(s, ' ');
        if (!sp) return false;
        *a = s;
        *al = (size_t)(sp - s);
        *b = sp + 1;
        const char *sp2 = strchr(*b, ' ');
        *bl = sp2 ? (size_t)(sp2 - *b) : strlen(*b);
        return true;
    }
    if (json_is_array(mx) && json_array_size(mx) == 2) {
        *a = json_string_value(json_array_get(mx, 0));
        *b = json_string_value(json_array_get(mx, 1));
        if (!*a || !*b) return false;
        *al = strlen(*a);
        *bl = strlen(*b);
        return true;
    }
    return false;
}

/* The merge table, ranked by position; merges whose parts or result are not
 * in the vocabulary are skipped with one warning. */
static int hf_merges(eng_tokenizer *t, const json_t *merges, const char *path) {
    int rc = eng__tok_merges_init(&t->merges, (uint32_t)json_array_size(merges));
    if (rc) return rc;
    size_t mi;
    const json_t *mx;
    buf cat = {0};
    size_t skipped = 0;
    json_array_foreach(merges, mi, mx) {
        const char *a, *b;
        size_t al, bl;
        if (!hf_merge_parts(mx, &a, &al, &b, &bl)) {
            skipped++;
            continue;
        }
        int32_t la = eng__tok_map_get(&t->vocab, a, al), lb = eng__tok_map_get(&t->vocab, b, bl);
        cat.n = 0;
        if ((rc = buf_add(&cat, a, al)) || (rc = buf_add(&cat, b, bl))) break;
        int32_t m = eng__tok_map_get(&t->vocab, cat.p, cat.n);
        if (la < 0 || lb < 0 || m < 0) {
            skipped++;
            continue;
        }
        if ((rc = eng__tok_merges_put(&t->merges, la, lb, (int32_t)mi, m))) break;
    }
    free(cat.p);
    if (rc) return rc;
    if (skipped) D2_WARN("%s: %zu merges skipped (parts or result not in the vocabulary)", path, skipped);
    return D2_OK;
}

static int hf_added_tokens(eng_tokenizer *t, const json_t *added) {
    size_t ai;
    const json_t *ax;
    json_array_foreach(added, ai, ax) {
        bool special = jbool(ax, "special", false);
        int rc = push_added(t, jstr(ax, "content"), (int32_t)json_integer_value(json_object_get(ax, "id")), special,
                            jbool(ax, "lstrip", false), jbool(ax, "rstrip", false), jbool(ax, "normalized", !special));
        if (rc) return rc;
    }
    return D2_OK;
}

/* tokenizer_config.json: extra special tokens, bos/eos. */
static void hf_config_specials(eng_tokenizer *t, const json_t *cfg) {
    size_t i;
    const json_t *x;
    json_array_foreach(json_object_get(cfg, "additional_special_tokens"), i, x) {
        const char *c = json_is_string(x) ? json_string_value(x) : jstr(x, "content");
        int id = c ? eng_tok_find(t, c) : -1;
        if (id >= 0) t->flags[id] |= F_SPECIAL;
    }
    const char *bt = config_token(cfg, "bos_token"), *et = config_token(cfg, "eos_token");
    if (bt) t->bos = eng_tok_find(t, bt);
    if (et) t->eos = eng_tok_find(t, et);
}

/* The ids added around an encoding: the post_processor's template, else the
 * config's add_bos_token/add_eos_token; then whether they add BOS/EOS. */
static int hf_affixes(eng_tokenizer *t, const json_t *root, const json_t *cfg) {
    bool has_template = false;
    int rc = parse_post(t, json_object_get(root, "post_processor"), &has_template);
    if (rc) return rc;
    if (!has_template && cfg) {
        ivec pre = {0}, suf = {0};
        if (jbool(cfg, "add_bos_token", false) && t->bos >= 0 && (rc = ivec_push(&pre, t->bos))) return rc;
        if (jbool(cfg, "add_eos_token", false) && t->eos >= 0 && (rc = ivec_push(&suf, t->eos))) {
            free(pre.p);
            return rc;
        }
        t->prefix = pre.p;
        t->n_prefix = (int)pre.n;
        t->suffix = suf.p;
        t->n_suffix = (int)suf.n;
    }
    if (t->bos < 0 && t->n_prefix > 0) t->bos = t->prefix[0];
    for (int k = 0; k < t->n_prefix; k++)
        if (t->prefix[k] == t->bos) t->adds_bos = true;
    for (int k = 0; k < t->n_suffix; k++)
        if (t->suffix[k] == t->eos) t->adds_eos = true;
    return D2_OK;
}

/* Everything after the files are read: the steps above in the order the
 * Hugging Face tokenizer applies them. */
static int hf_build(eng_tokenizer *t, const json_t *root, const json_t *cfg, const char *path) {
    t->kind = KIND_BPE;
    const json_t *model = json_object_get(root, "model");
    const json_t *added = json_object_get(root, "added_tokens");
    int rc;
    if ((rc = hf_check_model(model, path))) return rc;
    if ((rc = hf_vocab(t, json_object_get(model, "vocab"), added, path))) return rc;
    hf_model_options(t, model);
    if ((rc = parse_normalizer(t, json_object_get(root, "normalizer"), path))) return rc;
    if ((rc = parse_pretok(t, json_object_get(root, "pre_tokenizer"), path))) return rc;
    parse_decoder(t, json_object_get(root, "decoder"));
    const char *dt = jstr(json_object_get(root, "decoder"), "type");
    if (dt && !strcmp(dt, "ByteLevel")) t->kind = KIND_BYTELEVEL;
    if (t->kind == KIND_BYTELEVEL) t->byte_fallback = false;
    if ((rc = hf_merges(t, json_object_get(model, "merges"), path))) return rc;
    if ((rc = hf_added_tokens(t, added))) return rc;
    if (cfg) hf_config_specials(t, cfg);
    if ((rc = hf_affixes(t, root, cfg))) return rc;
    return finish(t);
}

int eng_tok_load_hf(const char *tokenizer_json, const char *tokenizer_config_json, eng_tokenizer **out) {
    if (!tokenizer_json || !out) return D2_EINVAL;
    *out = NULL;
    json_t *root = NULL, *cfg = NULL;
    int rc = hf_read_json(tokenizer_json, tokenizer_config_json, &root, &cfg);
    eng_tokenizer *t = NULL;
    if (rc == D2_OK) {
        t = tok_new();
        rc = t ? hf_build(t, root, cfg, tokenizer_json) : D2_ENOMEM;
    }
    json_decref(root);
    json_decref(cfg);
    if (rc) {
        eng_tok_free(t);
        return rc;
    }
    *out = t;
    return D2_OK;
}

int eng_tok_load_gguf(const eng_tok_gguf_desc *d, eng_tokenizer **out) {
    if (!d || !out || !d->model || d->n_vocab <= 0 || !d->tokens) return D2_EINVAL;
    *out = NULL;
    bool spm = !strcmp(d->model, "llama");
    if (!spm && strcmp(d->model, "gpt2") != 0) {
        D2_ERROR("gguf tokenizer: unsupported tokenizer.ggml.model \"%s\"", d->model);
        return D2_EUNSUPPORTED;
    }
    if (spm && !d->scores) {
        D2_ERROR("gguf tokenizer: \"llama\" model without tokenizer.ggml.scores");
        return D2_EFORMAT;
    }
    eng_tokenizer *t = tok_new();
    if (!t) return D2_ENOMEM;
    int rc = alloc_ids(t, d->n_vocab);
    if (!rc) rc = eng__tok_map_init(&t->vocab, (uint32_t)d->n_vocab);
    for (int id = 0; id < d->n_vocab && !rc; id++) {
        size_t l = d->token_lens ? d->token_lens[id] : strlen(d->tokens[id]);
        int type = d->token_types ? d->token_types[id] : 1;
        if ((rc = set_piece(t, id, d->tokens[id], l))) break;
        if (type == 2 || type == 3 || type == 4) {
            /* unknown / control / user-defined: matched in the text as added
             * tokens (the first two only with parse_special, as llama.cpp) */
            if ((rc = push_added(t, t->piece[id], id, type != 4, false, false, false))) break;
            continue;
        }
        rc = eng__tok_map_put(&t->vocab, t->piece[id], l, id, false);
        if (spm && type == 6) {
            int bv = parse_byte_token(t->piece[id], l);
            if (bv >= 0) t->byte_tok[bv] = id;
        }
    }
    if (rc) goto fail;
    t->bos = d->bos_id;
    t->eos = d->eos_id;
    t->unk_id = d->unk_id;
    if (spm) {
        t->kind = KIND_SPM_SCORE;
        t->byte_fallback = true;
        t->dec_bytes = true;
        t->scores = malloc((size_t)d->n_vocab * sizeof(float));
        if (!t->scores) { rc = D2_ENOMEM; goto fail; }
        memcpy(t->scores, d->scores, (size_t)d->n_vocab * sizeof(float));
        bool prefix = d->add_space_prefix != 0; /* default (-1): true */
        if (prefix && (rc = add_norm_op(t, NORM_PREPEND, "\xE2\x96\x81", NULL))) goto fail;
        if ((rc = add_norm_op(t, NORM_REPLACE, " ", "\xE2\x96\x81"))) goto fail;
        t->strip_space = prefix;
    } else {
        t->kind = KIND_BYTELEVEL;
        const char *pre = d->pre ? d->pre : "gpt-2";
        if (!strcmp(pre, "llama-bpe") || !strcmp(pre, "llama3") || !strcmp(pre, "llama-v3")) {
            t->pat = ENG__TOK_PAT_LLAMA3;
            t->ignore_merges = true; /* as llama.cpp and the HF Llama-3 tokenizer.json */
        }
        else if (!strcmp(pre, "qwen2") || !strcmp(pre, "deepseek-r1-qwen")) t->pat = ENG__TOK_PAT_QWEN2;
        else if (!strcmp(pre, "gpt-2") || !strcmp(pre, "default")) t->pat = ENG__TOK_PAT_GPT2;
        else {
            D2_ERROR("gguf tokenizer: unsupported tokenizer.ggml.pre \"%s\"", pre);
            rc = D2_EUNSUPPORTED;
            goto fail;
        }
        if (t->pat == ENG__TOK_PAT_QWEN2 && (rc = add_norm_op(t, NORM_NFC, NULL, NULL))) goto fail;
        if ((rc = eng__tok_merges_init(&t->merges, (uint32_t)(d->n_merges > 0 ? d->n_merges : 1)))) goto fail;
        for (int k = 0; k < d->n_merges && d->merges; k++) {
            const char *s = d->merges[k];
            const char *sp = s ? strchr(s, ' ') : NULL;
            if (!sp) continue;
            size_t al = (size_t)(sp - s), bl = strlen(sp + 1);
            int32_t la = eng__tok_map_get(&t->vocab, s, al), lb = eng__tok_map_get(&t->vocab, sp + 1, bl);
            buf cat = {0};
            if ((rc = buf_add(&cat, s, al)) || (rc = buf_add(&cat, sp + 1, bl))) { free(cat.p); goto fail; }
            int32_t m = eng__tok_map_get(&t->vocab, cat.p, cat.n);
            free(cat.p);
            if (la >= 0 && lb >= 0 && m >= 0 && (rc = eng__tok_merges_put(&t->merges, la, lb, k, m))) goto fail;
        }
    }
    bool add_bos = d->add_bos >= 0 ? d->add_bos != 0 : spm;
    bool add_eos = d->add_eos > 0;
    if (add_bos && t->bos >= 0) {
        if (!(t->prefix = malloc(sizeof(int32_t)))) { rc = D2_ENOMEM; goto fail; }
        t->prefix[0] = t->bos;
        t->n_prefix = 1;
        t->adds_bos = true;
    }
    if (add_eos && t->eos >= 0) {
        if (!(t->suffix = malloc(sizeof(int32_t)))) { rc = D2_ENOMEM; goto fail; }
        t->suffix[0] = t->eos;
        t->n_suffix = 1;
        t->adds_eos = true;
    }
    if ((rc = finish(t))) goto fail;
    *out = t;
    return D2_OK;
fail:
    eng_tok_free(t);
    return rc;
}
