/*
 * api/jinja/lex.c — arena, UTF-8 helpers and the lexer of the chat-template
 * interpreter (api/jinja/jinja.h). Called only by api/jinja/parse.c and
 * api/jinja/eval.c through api/jinja/jinja_int.h.
 *
 * The lexer reproduces @huggingface/jinja's tokenizer, including its
 * preprocessing: one trailing newline dropped, lstrip_blocks and trim_blocks
 * applied as regular-expression rewrites of the source, and
 * {% generation %} / {% endgeneration %} tags removed.
 */
#include "api/jinja/jinja_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------- arena ---------------- */

struct jj_chunk {
    jj_chunk *next;
    size_t cap, used;
    max_align_t data[];
};

#define JJ_CHUNK_MIN (64u << 10)

void *jj_alloc(jj_arena *a, size_t n) {
    n = (n + 15u) & ~(size_t)15u;
    if (n == 0) n = 16;
    jj_chunk *c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > JJ_CHUNK_MIN ? n : JJ_CHUNK_MIN;
        if (a->limit && a->used + cap + sizeof(jj_chunk) > a->limit) return NULL;
        c = malloc(sizeof(jj_chunk) + cap);
        if (!c) return NULL;
        c->cap = cap;
        c->used = 0;
        /* A big one-off block goes behind the head so the head keeps its room. */
        if (a->head && cap > JJ_CHUNK_MIN) {
            c->next = a->head->next;
            a->head->next = c;
        } else {
            c->next = a->head;
            a->head = c;
        }
        a->used += cap + sizeof(jj_chunk);
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    memset(p, 0, n);
    return p;
}

char *jj_strdup(jj_arena *a, const char *s, size_t n) {
    char *p = jj_alloc(a, n + 1);
    if (!p) return NULL;
    if (n) memcpy(p, s, n);
    p[n] = 0;
    return p;
}

void jj_arena_free(jj_arena *a) {
    jj_chunk *c = a->head;
    while (c) {
        jj_chunk *nx = c->next;
        free(c);
        c = nx;
    }
    a->head = NULL;
    a->used = 0;
}

int jj_buf_put(jj_buf *b, const char *s, size_t n) {
    if (n == 0) return 0;
    if (b->max && b->len + n > b->max) return -1;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = jj_alloc(b->a, cap);
        if (!p) return -1;
        if (b->len) memcpy(p, b->p, b->len);
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
    return 0;
}

/* ---------------- UTF-8 / JS character classes ---------------- */

int jj_utf8_dec(const char *s, size_t n, size_t i, uint32_t *cp) {
    const unsigned char *u = (const unsigned char *)s;
    unsigned c = u[i];
    if (c < 0x80) { *cp = c; return 1; }
    int k = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
    if (k == 1 || i + (size_t)k > n) { *cp = c; return 1; }
    uint32_t v = c & (0xFFu >> (k + 1));
    for (int j = 1; j < k; j++) {
        if ((u[i + j] & 0xC0) != 0x80) { *cp = c; return 1; }
        v = (v << 6) | (u[i + j] & 0x3F);
    }
    *cp = v;
    return k;
}


int jj_js_space(uint32_t c) {
    return c == 9 || c == 10 || c == 11 || c == 12 || c == 13 || c == 32 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000 || c == 0xFEFF;
}

int jj_is_word(int c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static int is_digit(int c) { return c >= '0' && c <= '9'; }

/* Length of the JS whitespace character at s[i], or 0. */
static int space_at(const char *s, size_t n, size_t i) {
    if (i >= n) return 0;
    uint32_t cp;
    int k = jj_utf8_dec(s, n, i, &cp);
    return jj_js_space(cp) ? k : 0;
}

/* ---------------- preprocessing ---------------- */

/* JS multiline '^' matches after \n, \r, U+2028 and U+2029. */
static int line_start(const char *s, size_t i) {
    if (i == 0) return 1;
    unsigned char p = (unsigned char)s[i - 1];
    if (p == '\n' || p == '\r') return 1;
    if (i >= 3 && (unsigned char)s[i - 3] == 0xE2 && (unsigned char)s[i - 2] == 0x80 &&
        (p == 0xA8 || p == 0xA9))
        return 1;
    return 0;
}

static int preprocess(jj_arena *a, const char *src, size_t n, char **out, size_t *outn) {
    if (n && src[n - 1] == '\n') n--;
    /* lstrip_blocks: /^[ \t]*({[#%-])/gm -> "$1" */
    char *t1 = jj_alloc(a, n + 1);
    if (!t1) return -1;
    size_t m = 0;
    for (size_t i = 0; i < n;) {
        if (line_start(src, i) && (src[i] == ' ' || src[i] == '\t')) {
            size_t j = i;
            while (j < n && (src[j] == ' ' || src[j] == '\t')) j++;
            if (j + 1 < n && src[j] == '{' && (src[j + 1] == '#' || src[j + 1] == '%' || src[j + 1] == '-')) {
                i = j;
                continue;
            }
            memcpy(t1 + m, src + i, j - i);
            m += j - i;
            i = j;
            continue;
        }
        t1[m++] = src[i++];
    }
    /* trim_blocks: /([#%-]})\n/g -> "$1" */
    char *t2 = jj_alloc(a, m + 1);
    if (!t2) return -1;
    size_t k = 0;
    for (size_t i = 0; i < m;) {
        if (i + 2 < m && (t1[i] == '#' || t1[i] == '%' || t1[i] == '-') && t1[i + 1] == '}' &&
            t1[i + 2] == '\n') {
            t2[k++] = t1[i];
            t2[k++] = '}';
            i += 3;
            continue;
        }
        t2[k++] = t1[i++];
    }
    /* /(\s*){%(-?)\s*(?:end)?generation\s*(-?)%}(\s*)/gs */
    char *t3 = jj_alloc(a, k + 1);
    if (!t3) return -1;
    size_t o = 0;
    size_t i = 0;
    while (i < k) {
        /* Try a match starting at i: whitespace run, then the tag. */
        size_t j = i;
        int w;
        while ((w = space_at(t2, k, j)) > 0) j += (size_t)w;
        int matched = 0;
        if (j + 1 < k && t2[j] == '{' && t2[j + 1] == '%') {
            size_t p = j + 2;
            int lstrip = 0, rstrip = 0;
            if (p < k && t2[p] == '-') { lstrip = 1; p++; }
            while ((w = space_at(t2, k, p)) > 0) p += (size_t)w;
            if (p + 3 <= k && memcmp(t2 + p, "end", 3) == 0 && p + 13 <= k &&
                memcmp(t2 + p + 3, "generation", 10) == 0)
                p += 3;
            if (p + 10 <= k && memcmp(t2 + p, "generation", 10) == 0) {
                p += 10;
                while ((w = space_at(t2, k, p)) > 0) p += (size_t)w;
                if (p < k && t2[p] == '-') { rstrip = 1; p++; }
                if (p + 2 <= k && t2[p] == '%' && t2[p + 1] == '}') {
                    p += 2;
                    size_t q = p;
                    while ((w = space_at(t2, k, q)) > 0) q += (size_t)w;
                    if (!lstrip) { memcpy(t3 + o, t2 + i, j - i); o += j - i; }
                    if (!rstrip) { memcpy(t3 + o, t2 + p, q - p); o += q - p; }
                    i = q;
                    matched = 1;
                }
            }
        }
        if (!matched) {
            /* Every start inside the run [i, j] fails the same way (the tag
             * test is always at j), so emit it all and move past j. */
            memcpy(t3 + o, t2 + i, j - i);
            o += j - i;
            i = j;
            if (i < k) t3[o++] = t2[i++];
        }
    }
    t3[o] = 0;
    *out = t3;
    *outn = o;
    return 0;
}

/* ---------------- tokenizer ---------------- */

typedef struct lexer {
    jj_arena *a;
    const char *src;
    size_t n, pos;
    jj_tok *toks;
    size_t ntok, cap;
    char *err;
    size_t errlen;
} lexer;

static int lex_fail(lexer *L, const char *msg) {
    snprintf(L->err, L->errlen, "%s", msg);
    return -1;
}

static int push_tok(lexer *L, jj_tok_type t, const char *s, size_t len) {
    if (L->ntok == L->cap) {
        size_t cap = L->cap ? L->cap * 2 : 256;
        jj_tok *nt = jj_alloc(L->a, cap * sizeof(jj_tok));
        if (!nt) return lex_fail(L, "out of memory");
        if (L->ntok) memcpy(nt, L->toks, L->ntok * sizeof(jj_tok));
        L->toks = nt;
        L->cap = cap;
    }
    char *v = jj_strdup(L->a, s, len);
    if (!v) return lex_fail(L, "out of memory");
    L->toks[L->ntok++] = (jj_tok){t, v, len};
    return 0;
}

static jj_tok_type last_type(const lexer *L) {
    return L->ntok ? L->toks[L->ntok - 1].type : (jj_tok_type)-1;
}

/* String.prototype.trimEnd on the last text token; drop it when empty. */
static void strip_trailing(lexer *L) {
    if (!L->ntok || L->toks[L->ntok - 1].type != JT_TEXT) return;
    jj_tok *t = &L->toks[L->ntok - 1];
    size_t end = t->len;
    /* Walk from the start so multi-byte spaces are recognised. */
    size_t i = 0, last_non = 0;
    while (i < t->len) {
        uint32_t cp;
        int k = jj_utf8_dec(t->s, t->len, i, &cp);
        i += (size_t)k;
        if (!jj_js_space(cp)) last_non = i;
    }
    end = last_non;
    ((char *)t->s)[end] = 0;
    t->len = end;
    if (end == 0) L->ntok--;
}

static void skip_ws(lexer *L) {
    int w;
    while ((w = space_at(L->src, L->n, L->pos)) > 0) L->pos += (size_t)w;
}

/* consumeWhile(isWhitespace): like skip_ws but JS throws when it runs to the end. */
static int consume_ws(lexer *L) {
    int w;
    while ((w = space_at(L->src, L->n, L->pos)) > 0) {
        L->pos += (size_t)w;
        if (L->pos >= L->n) return lex_fail(L, "Unexpected end of input");
    }
    return 0;
}

static int consume_digits(lexer *L, size_t *start, size_t *len) {
    *start = L->pos;
    while (L->pos < L->n && is_digit((unsigned char)L->src[L->pos])) {
        L->pos++;
        if (L->pos >= L->n) return lex_fail(L, "Unexpected end of input");
    }
    *len = L->pos - *start;
    return 0;
}

static int lex_string(lexer *L, char q) {
    jj_buf b = {L->a, NULL, 0, 0, 0};
    L->pos++;
    while (L->pos < L->n && L->src[L->pos] != q) {
        char c = L->src[L->pos];
        if (c == '\\') {
            L->pos++;
            if (L->pos >= L->n) return lex_fail(L, "Unexpected end of input");
            char e = L->src[L->pos++];
            if (e == 'x' || e == 'u') {
                size_t k = e == 'x' ? 2 : 4;
                if (L->pos + k > L->n) return lex_fail(L, "Invalid hexadecimal escape sequence");
                uint32_t v = 0;
                for (size_t j = 0; j < k; j++) {
                    char h = L->src[L->pos + j];
                    int d = is_digit((unsigned char)h) ? h - '0'
                            : (h >= 'a' && h <= 'f') ? h - 'a' + 10
                            : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
                    if (d < 0) return lex_fail(L, "Invalid hexadecimal escape sequence");
                    v = v * 16 + (uint32_t)d;
                }
                L->pos += k;
                char u8[4];
                int m = d2_utf8_put(v, u8);
                if (jj_buf_put(&b, u8, (size_t)m)) return lex_fail(L, "out of memory");
                continue;
            }
            const char *r;
            switch (e) {
            case 'n': r = "\n"; break;
            case 't': r = "\t"; break;
            case 'r': r = "\r"; break;
            case 'b': r = "\b"; break;
            case 'f': r = "\f"; break;
            case 'v': r = "\v"; break;
            case '\'': r = "'"; break;
            case '"': r = "\""; break;
            case '\\': r = "\\"; break;
            default:
                snprintf(L->err, L->errlen, "Unexpected escaped character: %c", e);
                return -1;
            }
            if (jj_buf_put(&b, r, 1)) return lex_fail(L, "out of memory");
            continue;
        }
        if (jj_buf_put(&b, &c, 1)) return lex_fail(L, "out of memory");
        L->pos++;
        if (L->pos >= L->n) return lex_fail(L, "Unexpected end of input");
    }
    L->pos++; /* closing quote (JS steps past the end silently) */
    return push_tok(L, JT_STR, b.p ? b.p : "", b.len);
}

static const struct { const char *seq; jj_tok_type type; } MAPPING[] = {
    {"{%", JT_OPEN_STMT}, {"%}", JT_CLOSE_STMT}, {"{{", JT_OPEN_EXPR}, {"}}", JT_CLOSE_EXPR},
    {"(", JT_LPAREN}, {")", JT_RPAREN}, {"{", JT_LBRACE}, {"}", JT_RBRACE},
    {"[", JT_LBRACKET}, {"]", JT_RBRACKET}, {",", JT_COMMA}, {".", JT_DOT}, {":", JT_COLON},
    {"|", JT_PIPE}, {"<=", JT_CMP}, {">=", JT_CMP}, {"==", JT_CMP}, {"!=", JT_CMP},
    {"<", JT_CMP}, {">", JT_CMP}, {"+", JT_ADD}, {"-", JT_ADD}, {"~", JT_ADD},
    {"**", JT_POW}, {"*", JT_MUL}, {"//", JT_MUL}, {"/", JT_MUL}, {"%", JT_MUL},
    {"=", JT_EQUALS},
};

static int starts(const lexer *L, const char *s) {
    size_t k = strlen(s);
    return L->pos + k <= L->n && memcmp(L->src + L->pos, s, k) == 0;
}

int jj_lex(jj_arena *a, const char *source, size_t srcn, jj_tok **toks, size_t *ntok,
           char *err, size_t errlen) {
    lexer L = {0};
    L.a = a;
    L.err = err;
    L.errlen = errlen;
    char *src;
    size_t n;
    if (preprocess(a, source, srcn, &src, &n)) return lex_fail(&L, "out of memory");
    L.src = src;
    L.n = n;
    int curly = 0;
    while (L.pos < L.n) {
        jj_tok_type lt = last_type(&L);
        if (L.ntok == 0 || lt == JT_CLOSE_STMT || lt == JT_CLOSE_EXPR || lt == JT_COMMENT) {
            size_t st = L.pos;
            while (L.pos < L.n && !(src[L.pos] == '{' && L.pos + 1 < L.n &&
                                    (src[L.pos + 1] == '%' || src[L.pos + 1] == '{' ||
                                     src[L.pos + 1] == '#')))
                L.pos++;
            if (L.pos > st) {
                if (push_tok(&L, JT_TEXT, src + st, L.pos - st)) return -1;
                continue;
            }
        }
        if (starts(&L, "{#")) {
            L.pos += 2;
            int strip_before = 0;
            if (L.pos < L.n && src[L.pos] == '-') { strip_before = 1; L.pos++; }
            size_t st = L.pos;
            while (!(L.pos + 1 < L.n && src[L.pos] == '#' && src[L.pos + 1] == '}')) {
                if (L.pos + 2 >= L.n) return lex_fail(&L, "Missing end of comment tag");
                L.pos++;
            }
            size_t clen = L.pos - st;
            int strip_after = clen > 0 && src[st + clen - 1] == '-';
            if (strip_after) clen--;
            if (strip_before) strip_trailing(&L);
            if (push_tok(&L, JT_COMMENT, src + st, clen)) return -1;
            L.pos += 2;
            if (strip_after) skip_ws(&L);
            continue;
        }
        if (starts(&L, "{%-")) {
            strip_trailing(&L);
            if (push_tok(&L, JT_OPEN_STMT, "{%", 2)) return -1;
            L.pos += 3;
            continue;
        }
        if (starts(&L, "{{-")) {
            strip_trailing(&L);
            if (push_tok(&L, JT_OPEN_EXPR, "{{", 2)) return -1;
            curly = 0;
            L.pos += 3;
            continue;
        }
        if (consume_ws(&L)) return -1;
        if (starts(&L, "-%}")) {
            if (push_tok(&L, JT_CLOSE_STMT, "%}", 2)) return -1;
            L.pos += 3;
            skip_ws(&L);
            continue;
        }
        if (starts(&L, "-}}")) {
            if (push_tok(&L, JT_CLOSE_EXPR, "}}", 2)) return -1;
            L.pos += 3;
            skip_ws(&L);
            continue;
        }
        if (L.pos >= L.n) break; /* JS: src[pos] undefined falls to "Unexpected character" */
        char ch = src[L.pos];
        if (ch == '-' || ch == '+') {
            jj_tok_type t2 = last_type(&L);
            if (L.ntok == 0 || t2 == JT_TEXT) {
                snprintf(err, errlen, "Unexpected character: %c", ch);
                return -1;
            }
            if (!(t2 == JT_IDENT || t2 == JT_NUM || t2 == JT_STR || t2 == JT_RPAREN ||
                  t2 == JT_RBRACKET)) {
                L.pos++;
                size_t ds, dl;
                if (consume_digits(&L, &ds, &dl)) return -1;
                char num[512];
                size_t nl = 0;
                num[nl++] = ch;
                if (dl > 400) return lex_fail(&L, "numeric literal too long");
                memcpy(num + nl, src + ds, dl);
                nl += dl;
                if (dl > 0 && L.pos + 1 < L.n && src[L.pos] == '.' &&
                    is_digit((unsigned char)src[L.pos + 1])) {
                    L.pos++;
                    size_t fs, fl;
                    if (consume_digits(&L, &fs, &fl)) return -1;
                    if (fl > 100) return lex_fail(&L, "numeric literal too long");
                    num[nl++] = '.';
                    memcpy(num + nl, src + fs, fl);
                    nl += fl;
                }
                if (push_tok(&L, dl > 0 ? JT_NUM : JT_UNARY, num, nl)) return -1;
                continue;
            }
        }
        int hit = 0;
        for (size_t m = 0; m < sizeof MAPPING / sizeof MAPPING[0]; m++) {
            if (MAPPING[m].type == JT_CLOSE_EXPR && curly > 0) continue;
            if (starts(&L, MAPPING[m].seq)) {
                size_t k = strlen(MAPPING[m].seq);
                if (push_tok(&L, MAPPING[m].type, MAPPING[m].seq, k)) return -1;
                if (MAPPING[m].type == JT_OPEN_EXPR) curly = 0;
                else if (MAPPING[m].type == JT_LBRACE) curly++;
                else if (MAPPING[m].type == JT_RBRACE) curly--;
                L.pos += k;
                hit = 1;
                break;
            }
        }
        if (hit) continue;
        if (ch == '\'' || ch == '"') {
            if (lex_string(&L, ch)) return -1;
            continue;
        }
        if (is_digit((unsigned char)ch)) {
            size_t ds, dl;
            if (consume_digits(&L, &ds, &dl)) return -1;
            size_t fs = 0, fl = 0;
            int frac = 0;
            if (last_type(&L) != JT_DOT && L.pos + 1 < L.n && src[L.pos] == '.' &&
                is_digit((unsigned char)src[L.pos + 1])) {
                L.pos++;
                if (consume_digits(&L, &fs, &fl)) return -1;
                frac = 1;
            }
            if (dl + fl > 400) return lex_fail(&L, "numeric literal too long");
            char num[512];
            memcpy(num, src + ds, dl);
            size_t nl = dl;
            if (frac) {
                num[nl++] = '.';
                memcpy(num + nl, src + fs, fl);
                nl += fl;
            }
            if (push_tok(&L, JT_NUM, num, nl)) return -1;
            continue;
        }
        if (jj_is_word((unsigned char)ch)) {
            size_t st = L.pos;
            while (L.pos < L.n && jj_is_word((unsigned char)src[L.pos])) {
                L.pos++;
                if (L.pos >= L.n) return lex_fail(&L, "Unexpected end of input");
            }
            if (push_tok(&L, JT_IDENT, src + st, L.pos - st)) return -1;
            continue;
        }
        uint32_t cp;
        int k = jj_utf8_dec(src, n, L.pos, &cp);
        snprintf(err, errlen, "Unexpected character: %.*s", k, src + L.pos);
        return -1;
    }
    *toks = L.toks;
    *ntok = L.ntok;
    return 0;
}
