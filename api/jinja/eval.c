/*
 * api/jinja/eval.c — values, evaluator and public entry points of the
 * chat-template interpreter (api/jinja/jinja.h). Callers use api/jinja/jinja.h only.
 *
 * Semantics mirror @huggingface/jinja's runtime, including its JavaScript
 * flavour: numbers are doubles (integers are doubles with an "integer" tag),
 * == is JavaScript loose equality on the underlying values, string length and
 * indexing count UTF-16 code units, undefined and none print as nothing, and a
 * loop iteration ended by break/continue loses the text it had produced.
 *
 * Control flow inside the evaluator: functions return 0, a negative error
 * (message stored in the render state), or JJ_BREAK / JJ_CONTINUE, which
 * propagate (also out of macro calls) to the nearest enclosing loop.
 */
#include "api/jinja/jinja.h"
#include "api/jinja/jinja_int.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"

#define JJ_ERR (-1)
#define JJ_BREAK 1
#define JJ_CONTINUE 2
#define JJ_MAX_STEPS 20000000L
#define JJ_MAX_RANGE 1000000

/* ---------------- values ---------------- */

typedef enum vt {
    V_UNDEF, V_NULL, V_BOOL, V_INT, V_FLOAT, V_STR, V_ARRAY, V_TUPLE, V_OBJECT, V_KWARGS, V_NS, V_FUNC
} vt;

typedef struct jarr jarr;
typedef struct jobj jobj;
typedef struct jfunc jfunc;
typedef struct env env;

typedef struct jv {
    vt t;
    int b;
    double n;
    const char *s;
    size_t len;
    jarr *arr;
    jobj *obj;
    jfunc *fn;
} jv;

struct jarr {
    jv *v;
    size_t n, cap;
};

struct jobj {
    const char **k;
    size_t *kl;
    jv *v;
    size_t n, cap;
};

typedef enum fkind {
    F_NAMESPACE, F_RAISE, F_RANGE, F_STRFTIME, F_MACRO, F_CALLER,
    S_UPPER, S_LOWER, S_STRIP, S_TITLE, S_CAPITALIZE, S_RSTRIP, S_LSTRIP,
    S_STARTSWITH, S_ENDSWITH, S_SPLIT, S_REPLACE,
    O_GET, O_ITEMS, O_KEYS, O_VALUES, O_DICTSORT
} fkind;

struct jfunc {
    fkind kind;
    jv self;              /* receiver of string/object methods */
    const jj_node *node;  /* MACRO: the macro; CALLER: the call statement */
    env *env;             /* CALLER: environment of the call statement */
    int special;          /* bit 1: body reads kwargs, bit 2: varargs */
};

struct env {
    env *parent;
    const char **k;
    size_t *kl;
    jv *v;
    size_t n, cap;
};

typedef struct R {
    jj_arena a;
    char *err;
    size_t errlen;
    int has_err;
    long steps;
    int depth;
    struct tm now;
    int have_now;
    jfunc *ns_fn; /* the shared namespace() builtin */
} R;

static jv V(vt t) {
    jv v;
    memset(&v, 0, sizeof v);
    v.t = t;
    return v;
}
static jv vbool(int b) { jv v = V(V_BOOL); v.b = b ? 1 : 0; return v; }
static jv vint(double n) { jv v = V(V_INT); v.n = n; return v; }
static jv vfloat(double n) { jv v = V(V_FLOAT); v.n = n; return v; }
static jv vstr(const char *s, size_t len) { jv v = V(V_STR); v.s = s; v.len = len; return v; }

static int fail(R *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail(R *r, const char *fmt, ...) {
    if (!r->has_err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err, r->errlen, fmt, ap);
        va_end(ap);
        r->has_err = 1;
    }
    return JJ_ERR;
}

static int oom(R *r) { return fail(r, "out of memory (template working memory limit reached)"); }

static const char *type_name(const jv *v) {
    switch (v->t) {
    case V_UNDEF: return "UndefinedValue";
    case V_NULL: return "NullValue";
    case V_BOOL: return "BooleanValue";
    case V_INT: return "IntegerValue";
    case V_FLOAT: return "FloatValue";
    case V_STR: return "StringValue";
    case V_ARRAY: return "ArrayValue";
    case V_TUPLE: return "TupleValue";
    case V_OBJECT: return "ObjectValue";
    case V_KWARGS: return "KeywordArgumentsValue";
    case V_NS: return "NamespaceValue";
    case V_FUNC: return "FunctionValue";
    }
    return "?";
}

static int is_arr(const jv *v) { return v->t == V_ARRAY || v->t == V_TUPLE; }
static int is_objv(const jv *v) { return v->t == V_OBJECT || v->t == V_KWARGS; }
static int is_container(const jv *v) { return is_objv(v) || v->t == V_NS; }
static int is_num(const jv *v) { return v->t == V_INT || v->t == V_FLOAT; }
static int is_numlike(const jv *v) { return is_num(v) || v->t == V_BOOL; }
static double numval(const jv *v) { return v->t == V_BOOL ? (double)v->b : v->n; }

static jarr *arr_new(R *r, size_t cap) {
    jarr *a = jj_alloc(&r->a, sizeof *a);
    if (!a) return NULL;
    if (cap) {
        a->v = jj_alloc(&r->a, cap * sizeof(jv));
        if (!a->v) return NULL;
        a->cap = cap;
    }
    return a;
}

static int arr_push(R *r, jarr *a, jv x) {
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 4;
        jv *nv = jj_alloc(&r->a, cap * sizeof(jv));
        if (!nv) return oom(r);
        if (a->n) memcpy(nv, a->v, a->n * sizeof(jv));
        a->v = nv;
        a->cap = cap;
    }
    a->v[a->n++] = x;
    return 0;
}

static jv varr(vt t, jarr *a) { jv v = V(t); v.arr = a; return v; }
static jv vobj(vt t, jobj *o) { jv v = V(t); v.obj = o; return v; }

static jobj *obj_new(R *r) { return jj_alloc(&r->a, sizeof(jobj)); }

static long obj_find(const jobj *o, const char *k, size_t kl) {
    for (size_t i = 0; i < o->n; i++)
        if (o->kl[i] == kl && memcmp(o->k[i], k, kl) == 0) return (long)i;
    return -1;
}

/* Map.set: replaces in place or appends. */
static int obj_set(R *r, jobj *o, const char *k, size_t kl, jv x) {
    long i = obj_find(o, k, kl);
    if (i >= 0) {
        o->v[i] = x;
        return 0;
    }
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 4;
        const char **nk = jj_alloc(&r->a, cap * sizeof *nk);
        size_t *nl = jj_alloc(&r->a, cap * sizeof *nl);
        jv *nv = jj_alloc(&r->a, cap * sizeof *nv);
        if (!nk || !nl || !nv) return oom(r);
        if (o->n) {
            memcpy(nk, o->k, o->n * sizeof *nk);
            memcpy(nl, o->kl, o->n * sizeof *nl);
            memcpy(nv, o->v, o->n * sizeof *nv);
        }
        o->k = nk;
        o->kl = nl;
        o->v = nv;
        o->cap = cap;
    }
    o->k[o->n] = k;
    o->kl[o->n] = kl;
    o->v[o->n] = x;
    o->n++;
    return 0;
}

static void obj_del(jobj *o, size_t i) {
    for (size_t j = i + 1; j < o->n; j++) {
        o->k[j - 1] = o->k[j];
        o->kl[j - 1] = o->kl[j];
        o->v[j - 1] = o->v[j];
    }
    o->n--;
}

static jv vfunc(R *r, fkind k, const jv *self) {
    jfunc *f = jj_alloc(&r->a, sizeof *f);
    jv v = V(V_FUNC);
    if (!f) {
        v.t = V_UNDEF;
        return v;
    }
    f->kind = k;
    if (self) f->self = *self;
    v.fn = f;
    return v;
}

/* ---------------- environments ---------------- */

static env *env_new(R *r, env *parent) {
    env *e = jj_alloc(&r->a, sizeof *e);
    if (e) e->parent = parent;
    return e;
}

static int env_set(R *r, env *e, const char *k, size_t kl, jv x) {
    for (size_t i = 0; i < e->n; i++)
        if (e->kl[i] == kl && memcmp(e->k[i], k, kl) == 0) {
            e->v[i] = x;
            return 0;
        }
    if (e->n == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 8;
        const char **nk = jj_alloc(&r->a, cap * sizeof *nk);
        size_t *nl = jj_alloc(&r->a, cap * sizeof *nl);
        jv *nv = jj_alloc(&r->a, cap * sizeof *nv);
        if (!nk || !nl || !nv) return oom(r);
        if (e->n) {
            memcpy(nk, e->k, e->n * sizeof *nk);
            memcpy(nl, e->kl, e->n * sizeof *nl);
            memcpy(nv, e->v, e->n * sizeof *nv);
        }
        e->k = nk;
        e->kl = nl;
        e->v = nv;
        e->cap = cap;
    }
    e->k[e->n] = k;
    e->kl[e->n] = kl;
    e->v[e->n] = x;
    e->n++;
    return 0;
}

/* Every JS Environment starts with its own "namespace" entry, so the
 * innermost scope that has not overwritten it answers with the builtin. */
static jv env_lookup(R *r, const env *e, const char *k, size_t kl) {
    int is_ns = kl == 9 && memcmp(k, "namespace", 9) == 0;
    for (; e; e = e->parent) {
        for (size_t i = 0; i < e->n; i++)
            if (e->kl[i] == kl && memcmp(e->k[i], k, kl) == 0) return e->v[i];
        if (is_ns) {
            jv v = V(V_FUNC);
            v.fn = r->ns_fn;
            return v;
        }
    }
    return V(V_UNDEF);
}

/* ---------------- strings ---------------- */

static int put(R *r, jj_buf *b, const char *s, size_t n) {
    if (jj_buf_put(b, s, n)) {
        if (b->max && b->len + n > b->max) return fail(r, "template output exceeds %u bytes", (unsigned)b->max);
        return oom(r);
    }
    return 0;
}
static int puts_(R *r, jj_buf *b, const char *s) { return put(r, b, s, strlen(s)); }

static jj_buf newbuf(R *r) {
    jj_buf b = {&r->a, NULL, 0, 0, API_JINJA_MAX_OUTPUT};
    return b;
}
static jv buf_val(jj_buf *b) { return vstr(b->p ? b->p : "", b->len); }

/* Number.prototype.toString (radix 10). */
static void js_num(double x, char *out) {
    if (isnan(x)) { strcpy(out, "NaN"); return; }
    if (isinf(x)) { strcpy(out, x < 0 ? "-Infinity" : "Infinity"); return; }
    if (x == 0) { strcpy(out, "0"); return; }
    char tmp[40];
    int p;
    for (p = 1; p <= 17; p++) {
        snprintf(tmp, sizeof tmp, "%.*e", p - 1, x);
        if (strtod(tmp, NULL) == x) break;
    }
    /* tmp = [-]d.ddde[+-]xx */
    char digits[24];
    int nd = 0, neg = 0;
    const char *q = tmp;
    if (*q == '-') { neg = 1; q++; }
    for (; *q && *q != 'e'; q++)
        if (*q != '.') digits[nd++] = *q;
    int e10 = atoi(q + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = 0;
    int n = e10 + 1;
    char *o = out;
    if (neg) *o++ = '-';
    if (nd <= n && n <= 21) {
        memcpy(o, digits, (size_t)nd);
        o += nd;
        for (int i = nd; i < n; i++) *o++ = '0';
    } else if (0 < n && n <= 21) {
        memcpy(o, digits, (size_t)n);
        o += n;
        *o++ = '.';
        memcpy(o, digits + n, (size_t)(nd - n));
        o += nd - n;
    } else if (-6 < n && n <= 0) {
        *o++ = '0';
        *o++ = '.';
        for (int i = 0; i < -n; i++) *o++ = '0';
        memcpy(o, digits, (size_t)nd);
        o += nd;
    } else {
        *o++ = digits[0];
        if (nd > 1) {
            *o++ = '.';
            memcpy(o, digits + 1, (size_t)(nd - 1));
            o += nd - 1;
        }
        o += sprintf(o, "e%c%d", n - 1 >= 0 ? '+' : '-', abs(n - 1));
    }
    *o = 0;
}

/* FloatValue.toString */
static void js_float(double x, char *out) {
    if (x == 0 && signbit(x)) { strcpy(out, "-0.0"); return; }
    if (isfinite(x) && fmod(x, 1.0) == 0) {
        if (fabs(x) < 1e21) { snprintf(out, 40, "%.1f", x); return; }
    }
    js_num(x, out);
}

static size_t utf16_len(const char *s, size_t n) {
    size_t u = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        i += (size_t)jj_utf8_dec(s, n, i, &cp);
        u += cp >= 0x10000 ? 2 : 1;
    }
    return u;
}

static uint32_t cp_upper1(uint32_t c) {
    if (c >= 'a' && c <= 'z') return c - 32;
    if (c < 0x80) return c;
    if (c == 0xB5) return 0x39C;
    if ((c >= 0xE0 && c <= 0xFE && c != 0xF7)) return c - 32;
    if (c == 0xFF) return 0x178;
    if (c == 0x131) return 'I';
    if (c == 0x17F) return 'S';
    if ((c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) return (c & 1) ? c - 1 : c;
    if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c & 1) ? c : c - 1;
    if (c == 0x3C2) return 0x3A3;
    if (c >= 0x3B1 && c <= 0x3C9) return c - 32;
    if (c == 0x3AC) return 0x386;
    if (c >= 0x3AD && c <= 0x3AF) return c - 37;
    if (c == 0x3CC) return 0x38C;
    if (c == 0x3CD || c == 0x3CE) return c - 63;
    if (c >= 0x430 && c <= 0x44F) return c - 32;
    if (c >= 0x450 && c <= 0x45F) return c - 80;
    if (c >= 0xFF41 && c <= 0xFF5A) return c - 32;
    return c;
}

static uint32_t cp_lower1(uint32_t c) {
    if (c >= 'A' && c <= 'Z') return c + 32;
    if (c < 0x80) return c;
    if ((c >= 0xC0 && c <= 0xDE && c != 0xD7)) return c + 32;
    if (c == 0x178) return 0xFF;
    if (c == 0x130) return 'i'; /* JS gives i + U+0307; close enough */
    if ((c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) return (c & 1) ? c : c + 1;
    if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c & 1) ? c + 1 : c;
    if (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) return c + 32;
    if (c == 0x386) return 0x3AC;
    if (c >= 0x388 && c <= 0x38A) return c + 37;
    if (c == 0x38C) return 0x3CC;
    if (c == 0x38E || c == 0x38F) return c + 63;
    if (c >= 0x410 && c <= 0x42F) return c + 32;
    if (c >= 0x400 && c <= 0x40F) return c + 80;
    if (c >= 0xFF21 && c <= 0xFF3A) return c + 32;
    return c;
}

/* toUpperCase / toLowerCase of s[0..n) into b. */
static int case_map(R *r, jj_buf *b, const char *s, size_t n, int upper) {
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int k = jj_utf8_dec(s, n, i, &cp);
        if (upper && cp == 0xDF) {
            if (put(r, b, "SS", 2)) return JJ_ERR;
        } else {
            uint32_t m = upper ? cp_upper1(cp) : cp_lower1(cp);
            if (m == cp) {
                if (put(r, b, s + i, (size_t)k)) return JJ_ERR;
            } else {
                char u8[4];
                if (put(r, b, u8, (size_t)d2_utf8_put(m, u8))) return JJ_ERR;
            }
        }
        i += (size_t)k;
    }
    return 0;
}

static int str_case(R *r, const jv *s, int upper, jv *out) {
    jj_buf b = newbuf(r);
    if (case_map(r, &b, s->s, s->len, upper)) return JJ_ERR;
    *out = buf_val(&b);
    return 0;
}

static void trim_bounds(const char *s, size_t n, int left, int right, size_t *st, size_t *en) {
    size_t a = 0, z = n;
    if (left) {
        while (a < n) {
            uint32_t cp;
            int k = jj_utf8_dec(s, n, a, &cp);
            if (!jj_js_space(cp)) break;
            a += (size_t)k;
        }
    }
    if (right) {
        size_t i = a, last = a;
        while (i < n) {
            uint32_t cp;
            int k = jj_utf8_dec(s, n, i, &cp);
            i += (size_t)k;
            if (!jj_js_space(cp)) last = i;
        }
        z = last;
    }
    *st = a;
    *en = z < a ? a : z;
}

static jv str_trim(const jv *s, int left, int right) {
    size_t a, z;
    trim_bounds(s->s, s->len, left, right, &a, &z);
    return vstr(s->s + a, z - a);
}

static int starts_with(const jv *s, const jv *p) {
    return p->len <= s->len && memcmp(s->s, p->s, p->len) == 0;
}
static int ends_with(const jv *s, const jv *p) {
    return p->len <= s->len && memcmp(s->s + s->len - p->len, p->s, p->len) == 0;
}

static const char *memfind(const char *h, size_t hn, const char *nd, size_t nn) {
    if (nn == 0) return h;
    if (nn > hn) return NULL;
    for (size_t i = 0; i + nn <= hn; i++)
        if (h[i] == nd[0] && memcmp(h + i, nd, nn) == 0) return h + i;
    return NULL;
}

/* Code-point boundaries of s as offsets; *cnt gets the number of code points. */
static size_t *cp_offsets(R *r, const char *s, size_t n, size_t *cnt) {
    size_t *off = jj_alloc(&r->a, (n + 1) * sizeof *off);
    if (!off) return NULL;
    size_t c = 0;
    for (size_t i = 0; i < n;) {
        off[c++] = i;
        uint32_t cp;
        i += (size_t)jj_utf8_dec(s, n, i, &cp);
    }
    off[c] = n;
    *cnt = c;
    return off;
}

/* ---------------- conversion to text ---------------- */

typedef struct json_opts {
    int indent; /* 0 = none */
    int ensure_ascii;
    int sort_keys;
    const char *item_sep, *key_sep;
    size_t item_sep_len, key_sep_len;
} json_opts;

static int json_str(R *r, jj_buf *b, const char *s, size_t n, int ascii) {
    if (put(r, b, "\"", 1)) return JJ_ERR;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        char esc[16];
        if (c == '"') { if (put(r, b, "\\\"", 2)) return JJ_ERR; i++; continue; }
        if (c == '\\') { if (put(r, b, "\\\\", 2)) return JJ_ERR; i++; continue; }
        if (c < 0x20) {
            const char *e = c == '\b' ? "\\b" : c == '\f' ? "\\f" : c == '\n' ? "\\n"
                          : c == '\r' ? "\\r" : c == '\t' ? "\\t" : NULL;
            if (e) {
                if (puts_(r, b, e)) return JJ_ERR;
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", c);
                if (puts_(r, b, esc)) return JJ_ERR;
            }
            i++;
            continue;
        }
        if (ascii && c >= 0x7F) {
            uint32_t cp;
            int k = jj_utf8_dec(s, n, i, &cp);
            if (cp >= 0x10000) {
                uint32_t v = cp - 0x10000;
                snprintf(esc, sizeof esc, "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
            } else {
                snprintf(esc, sizeof esc, "\\u%04x", cp);
            }
            if (puts_(r, b, esc)) return JJ_ERR;
            i += (size_t)k;
            continue;
        }
        size_t j = i + 1;
        while (j < n && (unsigned char)s[j] >= 0x20 && s[j] != '"' && s[j] != '\\' &&
               !(ascii && (unsigned char)s[j] >= 0x7F))
            j++;
        if (put(r, b, s + i, j - i)) return JJ_ERR;
        i = j;
    }
    return put(r, b, "\"", 1);
}

static int cmp_keys(const void *pa, const void *pb);

static int to_json(R *r, jj_buf *b, const jv *v, const json_opts *o, int depth, int undef_null) {
    char num[48];
    if (++r->depth > JJ_MAX_DEPTH) return fail(r, "value nesting too deep");
    int rc = 0;
    switch (v->t) {
    case V_NULL: rc = puts_(r, b, "null"); break;
    case V_UNDEF: rc = puts_(r, b, undef_null ? "null" : "undefined"); break;
    case V_INT:
    case V_FLOAT:
        if (!isfinite(v->n)) {
            rc = puts_(r, b, "null");
        } else {
            js_num(v->n, num);
            rc = puts_(r, b, num);
        }
        break;
    case V_BOOL: rc = puts_(r, b, v->b ? "true" : "false"); break;
    case V_STR: rc = json_str(r, b, v->s, v->len, o->ensure_ascii); break;
    case V_ARRAY:
    case V_OBJECT:
    case V_KWARGS:
    case V_NS: {
        size_t n = v->t == V_ARRAY ? v->arr->n : v->obj->n;
        int open = v->t == V_ARRAY ? '[' : '{';
        char oc = (char)open, cc = v->t == V_ARRAY ? ']' : '}';
        if (put(r, b, &oc, 1)) return JJ_ERR;
        size_t *order = NULL;
        if (v->t != V_ARRAY && o->sort_keys && n > 1) {
            order = jj_alloc(&r->a, n * sizeof *order);
            if (!order) return oom(r);
            for (size_t i = 0; i < n; i++) order[i] = i;
            /* Insertion sort keeps it stable and needs no global state. */
            for (size_t i = 1; i < n; i++) {
                size_t x = order[i], j = i;
                while (j > 0) {
                    const char *ka[2] = {v->obj->k[order[j - 1]], v->obj->k[x]};
                    if (cmp_keys(&ka[0], &ka[1]) <= 0) break;
                    order[j] = order[j - 1];
                    j--;
                }
                order[j] = x;
            }
        }
        for (size_t i = 0; i < n; i++) {
            if (i > 0 && put(r, b, o->item_sep, o->item_sep_len)) return JJ_ERR;
            if (o->indent) {
                if (put(r, b, "\n", 1)) return JJ_ERR;
                for (int d = 0; d < (depth + 1) * o->indent; d++)
                    if (put(r, b, " ", 1)) return JJ_ERR;
            }
            if (v->t == V_ARRAY) {
                if (to_json(r, b, &v->arr->v[i], o, depth + 1, undef_null)) return JJ_ERR;
            } else {
                size_t k = order ? order[i] : i;
                if (json_str(r, b, v->obj->k[k], v->obj->kl[k], o->ensure_ascii)) return JJ_ERR;
                if (put(r, b, o->key_sep, o->key_sep_len)) return JJ_ERR;
                if (to_json(r, b, &v->obj->v[k], o, depth + 1, undef_null)) return JJ_ERR;
            }
        }
        if (o->indent && n > 0) {
            if (put(r, b, "\n", 1)) return JJ_ERR;
            for (int d = 0; d < depth * o->indent; d++)
                if (put(r, b, " ", 1)) return JJ_ERR;
        }
        rc = put(r, b, &cc, 1);
        break;
    }
    default: rc = fail(r, "Cannot convert to JSON: %s", type_name(v));
    }
    r->depth--;
    return rc;
}

static int cmp_keys(const void *pa, const void *pb) {
    return strcmp(*(const char *const *)pa, *(const char *const *)pb);
}

static const json_opts DEFAULT_JSON = {0, 0, 0, ", ", ": ", 2, 2};

/* RuntimeValue.toString() */
static int to_str(R *r, jj_buf *b, const jv *v) {
    char num[48];
    switch (v->t) {
    case V_STR: return put(r, b, v->s, v->len);
    case V_INT: js_num(v->n, num); return puts_(r, b, num);
    case V_FLOAT: js_float(v->n, num); return puts_(r, b, num);
    case V_BOOL: return puts_(r, b, v->b ? "true" : "false");
    case V_UNDEF:
    case V_NULL: return puts_(r, b, "undefined");
    case V_ARRAY:
    case V_OBJECT:
    case V_KWARGS:
    case V_NS: return to_json(r, b, v, &DEFAULT_JSON, 0, 0);
    case V_TUPLE: return fail(r, "Cannot convert to JSON: TupleValue");
    case V_FUNC: return fail(r, "cannot convert a function to a string");
    }
    return 0;
}

/* String(v.value) as JavaScript sees the wrapped value: numbers without the
 * float ".0", arrays joined with "," (elements via toString), maps as
 * "[object Map]", null/undefined as "" (Array.prototype.join rules). */
static int raw_str(R *r, jj_buf *b, const jv *v) {
    char num[48];
    switch (v->t) {
    case V_INT:
    case V_FLOAT: js_num(v->n, num); return puts_(r, b, num);
    case V_UNDEF:
    case V_NULL: return 0;
    case V_ARRAY:
    case V_TUPLE:
        if (++r->depth > JJ_MAX_DEPTH) return fail(r, "value nesting too deep");
        for (size_t i = 0; i < v->arr->n; i++) {
            if (i && put(r, b, ",", 1)) return JJ_ERR;
            const jv *e = &v->arr->v[i];
            if (e->t == V_UNDEF || e->t == V_NULL) {
                if (puts_(r, b, "undefined")) return JJ_ERR;
            } else if (to_str(r, b, e)) {
                return JJ_ERR;
            }
        }
        r->depth--;
        return 0;
    case V_OBJECT:
    case V_KWARGS:
    case V_NS: return puts_(r, b, "[object Map]");
    default: return to_str(r, b, v);
    }
}

static int concat_raw(R *r, const jv *a, const jv *b, jv *out) {
    jj_buf o = newbuf(r);
    if (raw_str(r, &o, a) || raw_str(r, &o, b)) return JJ_ERR;
    *out = buf_val(&o);
    return 0;
}

/* ---------------- equality / truthiness / comparison ---------------- */

static int truthy(const jv *v) {
    switch (v->t) {
    case V_UNDEF:
    case V_NULL: return 0;
    case V_BOOL: return v->b;
    case V_INT:
    case V_FLOAT: return v->n != 0 && !isnan(v->n);
    case V_STR: return v->len > 0;
    case V_ARRAY:
    case V_TUPLE: return v->arr->n > 0;
    case V_OBJECT:
    case V_KWARGS: return v->obj->n > 0;
    default: return 1;
    }
}

/* JavaScript StringToNumber. */
static double str_to_number(const char *s, size_t n) {
    size_t a, z;
    trim_bounds(s, n, 1, 1, &a, &z);
    if (a == z) return 0;
    char tmp[128];
    size_t len = z - a;
    if (len >= sizeof tmp) return NAN;
    memcpy(tmp, s + a, len);
    tmp[len] = 0;
    const char *p = tmp;
    if (strcmp(p, "Infinity") == 0 || strcmp(p, "+Infinity") == 0) return INFINITY;
    if (strcmp(p, "-Infinity") == 0) return -INFINITY;
    if (len > 2 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X' || p[1] == 'o' || p[1] == 'O' || p[1] == 'b' || p[1] == 'B')) {
        int base = (p[1] == 'x' || p[1] == 'X') ? 16 : (p[1] == 'o' || p[1] == 'O') ? 8 : 2;
        double v = 0;
        for (size_t i = 2; i < len; i++) {
            int c = p[i], d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                            : c >= 'A' && c <= 'F' ? c - 'A' + 10 : 99;
            if (d >= base) return NAN;
            v = v * base + d;
        }
        return v;
    }
    for (size_t i = 0; i < len; i++) {
        char c = p[i];
        if (!((c >= '0' && c <= '9') || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-')) return NAN;
    }
    char *end;
    double v = strtod(p, &end);
    if (*end) return NAN;
    return v;
}

/* Kinds of the wrapped JS value: 0 undefined, 1 number, 2 string, 3 boolean, 4 object */
static int raw_kind(const jv *v) {
    switch (v->t) {
    case V_UNDEF:
    case V_NULL: return 0;
    case V_INT:
    case V_FLOAT: return 1;
    case V_STR: return 2;
    case V_BOOL: return 3;
    default: return 4;
    }
}

static const void *raw_ptr(const jv *v) {
    if (is_arr(v)) return v->arr;
    if (v->t == V_FUNC) return v->fn;
    return v->obj;
}

static int strict_eq(const jv *a, const jv *b) {
    int ka = raw_kind(a), kb = raw_kind(b);
    if (ka != kb) return 0;
    switch (ka) {
    case 0: return 1;
    case 1: return a->n == b->n;
    case 2: return a->len == b->len && memcmp(a->s, b->s, a->len) == 0;
    case 3: return a->b == b->b;
    default: return raw_ptr(a) == raw_ptr(b);
    }
}

static int loose_eq(R *r, const jv *a, const jv *b, int *res) {
    int ka = raw_kind(a), kb = raw_kind(b);
    if (ka == kb) { *res = strict_eq(a, b); return 0; }
    if (ka == 0 || kb == 0) { *res = 0; return 0; }
    if (ka == 3) { jv x = vint(a->b); return loose_eq(r, &x, b, res); }
    if (kb == 3) { jv x = vint(b->b); return loose_eq(r, a, &x, res); }
    if (ka == 1 && kb == 2) { *res = a->n == str_to_number(b->s, b->len); return 0; }
    if (ka == 2 && kb == 1) { *res = b->n == str_to_number(a->s, a->len); return 0; }
    if (ka == 4 || kb == 4) {
        const jv *o = ka == 4 ? a : b, *p = ka == 4 ? b : a;
        jj_buf t = newbuf(r);
        if (o->t == V_FUNC) { *res = 0; return 0; }
        if (raw_str(r, &t, o)) return JJ_ERR;
        jv s = buf_val(&t);
        return loose_eq(r, &s, p, res);
    }
    *res = 0;
    return 0;
}

/* Compares UTF-8 strings in UTF-16 code-unit order (JavaScript < on strings). */
static int cmp_utf16(const char *a, size_t an, const char *b, size_t bn) {
    size_t i = 0, j = 0;
    while (i < an && j < bn) {
        uint32_t x, y;
        int ki = jj_utf8_dec(a, an, i, &x), kj = jj_utf8_dec(b, bn, j, &y);
        if (x != y) {
            /* Map astral code points to their lead surrogate range. */
            uint32_t ux = x >= 0x10000 ? 0xD800 + ((x - 0x10000) >> 10) : x;
            uint32_t uy = y >= 0x10000 ? 0xD800 + ((y - 0x10000) >> 10) : y;
            if (ux != uy) return ux < uy ? -1 : 1;
            return x < y ? -1 : 1;
        }
        i += (size_t)ki;
        j += (size_t)kj;
    }
    if (i < an) return 1;
    if (j < bn) return -1;
    return 0;
}

/* compareRuntimeValues */
static int compare_values(R *r, const jv *a, const jv *b, int case_sensitive, int *res) {
    if (a->t == V_NULL && b->t == V_NULL) { *res = 0; return 0; }
    if (a->t == V_NULL || b->t == V_NULL) return fail(r, "Cannot compare %s with %s", type_name(a), type_name(b));
    if (a->t == V_UNDEF && b->t == V_UNDEF) { *res = 0; return 0; }
    if (a->t == V_UNDEF || b->t == V_UNDEF) return fail(r, "Cannot compare %s with %s", type_name(a), type_name(b));
    if (is_numlike(a) && is_numlike(b)) {
        double x = numval(a), y = numval(b);
        *res = x < y ? -1 : x > y ? 1 : 0;
        return 0;
    }
    if (a->t != b->t) return fail(r, "Cannot compare different types: %s and %s", type_name(a), type_name(b));
    if (a->t == V_STR) {
        if (case_sensitive) {
            *res = cmp_utf16(a->s, a->len, b->s, b->len);
        } else {
            jv la, lb;
            if (str_case(r, a, 0, &la) || str_case(r, b, 0, &lb)) return JJ_ERR;
            *res = cmp_utf16(la.s, la.len, lb.s, lb.len);
        }
        return 0;
    }
    return fail(r, "Cannot compare type: %s", type_name(a));
}

typedef struct sort_ctx {
    R *r;
    int case_sensitive, reverse, failed;
    const char *attr; /* NULL: compare items themselves */
    size_t attr_len;
    int by_index;     /* dictsort: 0 key, 1 value (pairs) */
} sort_ctx;

static jv get_attr_path(const jv *item, const char *path, size_t plen);

static int sort_cmp(sort_ctx *c, const jv *a, const jv *b) {
    jv x = *a, y = *b;
    if (c->by_index >= 0) {
        x = a->arr->v[c->by_index];
        y = b->arr->v[c->by_index];
    } else if (c->attr) {
        x = get_attr_path(a, c->attr, c->attr_len);
        y = get_attr_path(b, c->attr, c->attr_len);
    }
    int res = 0;
    if (compare_values(c->r, &x, &y, c->case_sensitive, &res)) {
        c->failed = 1;
        return 0;
    }
    return c->reverse ? -res : res;
}

/* Stable merge sort (Array.prototype.sort is stable). */
static int merge_sort(sort_ctx *c, jv *v, size_t n) {
    if (n < 2) return 0;
    jv *tmp = jj_alloc(&c->r->a, n * sizeof *tmp);
    if (!tmp) return oom(c->r);
    for (size_t w = 1; w < n; w *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * w) {
            size_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            size_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) {
                if (sort_cmp(c, &v[j], &v[i]) < 0) tmp[k++] = v[j++];
                else tmp[k++] = v[i++];
                if (c->failed) return JJ_ERR;
            }
            while (i < mid) tmp[k++] = v[i++];
            while (j < hi) tmp[k++] = v[j++];
        }
        memcpy(v, tmp, n * sizeof *v);
    }
    return 0;
}

/* getAttributeValue: dotted path through objects/namespaces and array indices. */
static jv get_attr_path(const jv *item, const char *path, size_t plen) {
    jv cur = *item;
    size_t i = 0;
    while (1) {
        size_t j = i;
        while (j < plen && path[j] != '.') j++;
        const char *part = path + i;
        size_t pl = j - i;
        if (is_container(&cur)) {
            long k = obj_find(cur.obj, part, pl);
            cur = k >= 0 ? cur.obj->v[k] : V(V_UNDEF);
        } else if (is_arr(&cur)) {
            /* parseInt: leading digits */
            size_t d = 0;
            while (d < pl && part[d] >= '0' && part[d] <= '9') d++;
            if (d == 0 || d > 15) return V(V_UNDEF);
            long idx = strtol(part, NULL, 10);
            if (idx < 0 || (size_t)idx >= cur.arr->n) return V(V_UNDEF);
            cur = cur.arr->v[idx];
        } else {
            return V(V_UNDEF);
        }
        if (j >= plen) break;
        i = j + 1;
    }
    return cur;
}

/* ---------------- evaluator ---------------- */

static int eval(R *r, const jj_node *n, env *e, jv *out);
static int exec_block(R *r, const jj_list *l, env *e, jj_buf *out);
static int call_fn(R *r, const jv *fnv, jarr *args, env *site, jv *out);

static int step(R *r) {
    if (++r->steps > JJ_MAX_STEPS) return fail(r, "template evaluation exceeded %ld steps", (long)JJ_MAX_STEPS);
    return 0;
}

/* evaluateArguments: positional (with * spread) then keyword (with ** spread). */
static int eval_args(R *r, const jj_list *args, env *e, jarr **pos, jobj **kw) {
    *pos = arr_new(r, args->n);
    *kw = obj_new(r);
    if (!*pos || !*kw) return oom(r);
    for (size_t i = 0; i < args->n; i++) {
        const jj_node *a = args->v[i];
        if (a->type == JN_SPREAD) {
            jv v;
            int rc = eval(r, a->a, e, &v);
            if (rc) return rc;
            if (!is_arr(&v)) return fail(r, "Cannot unpack non-iterable type: %s", type_name(&v));
            for (size_t j = 0; j < v.arr->n; j++)
                if (arr_push(r, *pos, v.arr->v[j])) return JJ_ERR;
        } else if (a->type != JN_KWARG && a->type != JN_KWSPREAD) {
            jv v;
            int rc = eval(r, a, e, &v);
            if (rc) return rc;
            if (arr_push(r, *pos, v)) return JJ_ERR;
        }
    }
    for (size_t i = 0; i < args->n; i++) {
        const jj_node *a = args->v[i];
        if (a->type == JN_KWARG) {
            if (obj_find(*kw, a->s, a->len) >= 0) return fail(r, "Got multiple values for keyword argument '%s'", a->s);
            jv v;
            int rc = eval(r, a->a, e, &v);
            if (rc) return rc;
            if (obj_set(r, *kw, a->s, a->len, v)) return JJ_ERR;
        } else if (a->type == JN_KWSPREAD) {
            jv v;
            int rc = eval(r, a->a, e, &v);
            if (rc) return rc;
            if (!is_objv(&v)) return fail(r, "Argument after ** must be a mapping, not %s", type_name(&v));
            for (size_t j = 0; j < v.obj->n; j++) {
                if (obj_find(*kw, v.obj->k[j], v.obj->kl[j]) >= 0)
                    return fail(r, "Got multiple values for keyword argument '%s'", v.obj->k[j]);
                if (obj_set(r, *kw, v.obj->k[j], v.obj->kl[j], v.obj->v[j])) return JJ_ERR;
            }
        }
    }
    return 0;
}

static jv kwget(const jobj *kw, const char *k) {
    long i = obj_find(kw, k, strlen(k));
    return i >= 0 ? kw->v[i] : V(V_UNDEF);
}
/* args.at(i) ?? kwargs.get(name): JS undefined only when absent. Positional
 * Undefined values are real (UndefinedValue objects) and count as present. */
static jv arg_or_kw(const jarr *pos, size_t i, const jobj *kw, const char *name, int *found) {
    if (pos && i < pos->n) { *found = 1; return pos->v[i]; }
    long k = kw ? obj_find(kw, name, strlen(name)) : -1;
    if (k >= 0) { *found = 1; return kw->v[k]; }
    *found = 0;
    return V(V_UNDEF);
}

static int slice_indices(long len, int has_start, long start, int has_stop, long stop, long stepv,
                         long *out_start, long *out_stop) {
    int dir = stepv > 0 ? 1 : stepv < 0 ? -1 : 0;
    if (dir >= 0) {
        start = has_start ? start : 0;
        start = start < 0 ? (len + start > 0 ? len + start : 0) : (start < len ? start : len);
        stop = has_stop ? stop : len;
        stop = stop < 0 ? (len + stop > 0 ? len + stop : 0) : (stop < len ? stop : len);
    } else {
        start = has_start ? start : len - 1;
        start = start < 0 ? (len + start > -1 ? len + start : -1) : (start < len - 1 ? start : len - 1);
        stop = has_stop ? stop : -1;
        stop = stop < -1 ? (len + stop > -1 ? len + stop : -1) : (stop < len - 1 ? stop : len - 1);
    }
    *out_start = start;
    *out_stop = stop;
    return dir;
}

static int eval_slice(R *r, const jv *obj, const jj_node *sl, env *e, jv *out) {
    if (!is_arr(obj) && obj->t != V_STR) return fail(r, "Slice object must be an array or string");
    jv st = V(V_UNDEF), sp = V(V_UNDEF), stv = V(V_UNDEF);
    int rc;
    if (sl->a && (rc = eval(r, sl->a, e, &st))) return rc;
    if (sl->b && (rc = eval(r, sl->b, e, &sp))) return rc;
    if (sl->c && (rc = eval(r, sl->c, e, &stv))) return rc;
    if (st.t != V_INT && st.t != V_UNDEF) return fail(r, "Slice start must be numeric or undefined");
    if (sp.t != V_INT && sp.t != V_UNDEF) return fail(r, "Slice stop must be numeric or undefined");
    if (stv.t != V_INT && stv.t != V_UNDEF) return fail(r, "Slice step must be numeric or undefined");
    long stepv = stv.t == V_INT ? (long)stv.n : 1;
    size_t cnt = 0, *off = NULL;
    long len;
    if (is_arr(obj)) {
        len = (long)obj->arr->n;
    } else {
        off = cp_offsets(r, obj->s, obj->len, &cnt);
        if (!off) return oom(r);
        len = (long)cnt;
    }
    long a, z;
    int dir = slice_indices(len, st.t == V_INT, st.t == V_INT ? (long)st.n : 0, sp.t == V_INT,
                            sp.t == V_INT ? (long)sp.n : 0, stepv, &a, &z);
    if (is_arr(obj)) {
        jarr *res = arr_new(r, 0);
        if (!res) return oom(r);
        if (dir != 0)
            for (long i = a; (long)dir * i < (long)dir * z; i += stepv)
                if (arr_push(r, res, obj->arr->v[i])) return JJ_ERR;
        *out = varr(V_ARRAY, res);
    } else {
        jj_buf b = newbuf(r);
        if (dir != 0)
            for (long i = a; (long)dir * i < (long)dir * z; i += stepv)
                if (put(r, &b, obj->s + off[i], off[i + 1] - off[i])) return JJ_ERR;
        *out = buf_val(&b);
    }
    return 0;
}

static int string_member(R *r, const jv *s, const char *name, size_t nl, jv *out) {
    static const struct { const char *n; fkind k; } M[] = {
        {"upper", S_UPPER}, {"lower", S_LOWER}, {"strip", S_STRIP}, {"title", S_TITLE},
        {"capitalize", S_CAPITALIZE}, {"rstrip", S_RSTRIP}, {"lstrip", S_LSTRIP},
        {"startswith", S_STARTSWITH}, {"endswith", S_ENDSWITH}, {"split", S_SPLIT},
        {"replace", S_REPLACE},
    };
    if (nl == 6 && memcmp(name, "length", 6) == 0) {
        *out = vint((double)utf16_len(s->s, s->len));
        return 0;
    }
    for (size_t i = 0; i < sizeof M / sizeof M[0]; i++)
        if (strlen(M[i].n) == nl && memcmp(M[i].n, name, nl) == 0) {
            *out = vfunc(r, M[i].k, s);
            return out->t == V_FUNC ? 0 : oom(r);
        }
    *out = V(V_UNDEF);
    return 0;
}

static int object_builtin(R *r, const jv *o, const char *name, size_t nl, jv *out) {
    static const struct { const char *n; fkind k; } M[] = {
        {"get", O_GET}, {"items", O_ITEMS}, {"keys", O_KEYS}, {"values", O_VALUES}, {"dictsort", O_DICTSORT},
    };
    for (size_t i = 0; i < sizeof M / sizeof M[0]; i++)
        if (strlen(M[i].n) == nl && memcmp(M[i].n, name, nl) == 0) {
            *out = vfunc(r, M[i].k, o);
            return out->t == V_FUNC ? 0 : oom(r);
        }
    *out = V(V_UNDEF);
    return 0;
}

static int eval_member(R *r, const jj_node *n, env *e, jv *out) {
    jv obj;
    int rc = eval(r, n->a, e, &obj);
    if (rc) return rc;
    jv prop;
    if (n->flag) {
        if (n->b->type == JN_SLICE) return eval_slice(r, &obj, n->b, e, out);
        if ((rc = eval(r, n->b, e, &prop))) return rc;
    } else if (n->b->type == JN_INT) {
        prop = vint(n->b->num);
    } else {
        prop = vstr(n->b->s, n->b->len);
    }
    if (is_container(&obj)) {
        if (prop.t != V_STR) return fail(r, "Cannot access property with non-string: got %s", type_name(&prop));
        long k = obj_find(obj.obj, prop.s, prop.len);
        if (k >= 0) { *out = obj.obj->v[k]; return 0; }
        if (is_objv(&obj)) return object_builtin(r, &obj, prop.s, prop.len, out);
        *out = V(V_UNDEF);
        return 0;
    }
    if (is_arr(&obj) || obj.t == V_STR) {
        if (prop.t == V_INT) {
            double idx = prop.n;
            if (is_arr(&obj)) {
                double len = (double)obj.arr->n;
                double k = idx < 0 ? len + idx : idx;
                *out = (k >= 0 && k < len && k == floor(k)) ? obj.arr->v[(size_t)k] : V(V_UNDEF);
            } else {
                /* String.prototype.at counts UTF-16 units; astral characters
                 * are returned whole here (JS would give a lone surrogate). */
                double len = (double)utf16_len(obj.s, obj.len);
                double k = idx < 0 ? len + idx : idx;
                *out = V(V_UNDEF);
                if (k >= 0 && k < len) {
                    size_t u = 0;
                    for (size_t i = 0; i < obj.len;) {
                        uint32_t cp;
                        int w = jj_utf8_dec(obj.s, obj.len, i, &cp);
                        size_t units = cp >= 0x10000 ? 2 : 1;
                        if ((double)u <= k && k < (double)(u + units)) {
                            *out = vstr(obj.s + i, (size_t)w);
                            break;
                        }
                        u += units;
                        i += (size_t)w;
                    }
                }
            }
            return 0;
        }
        if (prop.t == V_STR) {
            if (obj.t == V_STR) return string_member(r, &obj, prop.s, prop.len, out);
            *out = (prop.len == 6 && memcmp(prop.s, "length", 6) == 0) ? vint((double)obj.arr->n) : V(V_UNDEF);
            return 0;
        }
        return fail(r, "Cannot access property with non-string/non-number: got %s", type_name(&prop));
    }
    if (prop.t != V_STR) return fail(r, "Cannot access property with non-string: got %s", type_name(&prop));
    *out = V(V_UNDEF);
    return 0;
}

/* ---------------- tests ---------------- */

static int run_test(R *r, const char *name, const jv *a, const jv *b, int has_b, int *res) {
#define IS(s) (strcmp(name, s) == 0)
    if (IS("boolean")) *res = a->t == V_BOOL;
    else if (IS("callable")) *res = a->t == V_FUNC;
    else if (IS("odd") || IS("even")) {
        if (a->t != V_INT) return fail(r, "cannot %s on %s", name, type_name(a));
        double m = fmod(a->n, 2);
        *res = IS("odd") ? m != 0 : m == 0;
    } else if (IS("false")) *res = a->t == V_BOOL && !a->b;
    else if (IS("true")) *res = a->t == V_BOOL && a->b;
    else if (IS("none")) *res = a->t == V_NULL;
    else if (IS("string")) *res = a->t == V_STR;
    else if (IS("number")) *res = is_num(a);
    else if (IS("integer")) *res = a->t == V_INT;
    else if (IS("iterable")) *res = a->t == V_ARRAY || a->t == V_STR;
    else if (IS("mapping")) *res = is_objv(a);
    else if (IS("sequence")) *res = is_arr(a) || is_objv(a) || a->t == V_STR;
    else if (IS("lower") || IS("upper")) {
        if (a->t != V_STR) {
            *res = 0;
        } else {
            jv m;
            if (str_case(r, a, IS("upper"), &m)) return JJ_ERR;
            *res = m.len == a->len && memcmp(m.s, a->s, a->len) == 0;
        }
    } else if (IS("defined")) *res = a->t != V_UNDEF;
    else if (IS("undefined")) *res = a->t == V_UNDEF;
    else if (IS("equalto") || IS("eq")) {
        if (!has_b) return fail(r, "Cannot read properties of undefined (reading 'value')");
        *res = strict_eq(a, b);
    } else return fail(r, "Unknown test: %s", name);
#undef IS
    return 0;
}

/* ---------------- filters ---------------- */

static int indent_lines(R *r, const jv *s, long width, int first, int blank, jv *out) {
    jj_buf b = newbuf(r);
    size_t i = 0, line = 0;
    while (1) {
        const char *nl = memchr(s->s + i, '\n', s->len - i);
        size_t end = nl ? (size_t)(nl - s->s) : s->len;
        size_t ll = end - i;
        if (line > 0 && put(r, &b, "\n", 1)) return JJ_ERR;
        if (!((!first && line == 0) || (!blank && ll == 0)))
            for (long k = 0; k < width; k++)
                if (put(r, &b, " ", 1)) return JJ_ERR;
        if (put(r, &b, s->s + i, ll)) return JJ_ERR;
        line++;
        if (!nl) break;
        i = end + 1;
    }
    *out = buf_val(&b);
    return 0;
}

/* JS parseInt(s, 10) / parseFloat(s); returns 0 when NaN. */
static int js_parse_num(const jv *s, int is_float, double *v) {
    size_t a, z;
    trim_bounds(s->s, s->len, 1, 0, &a, &z);
    const char *p = s->s + a;
    size_t n = z - a, i = 0;
    int neg = 0;
    if (i < n && (p[i] == '+' || p[i] == '-')) { neg = p[i] == '-'; i++; }
    if (is_float && n - i >= 8 && memcmp(p + i, "Infinity", 8) == 0) {
        *v = neg ? -INFINITY : INFINITY;
        return 1;
    }
    char tmp[400];
    size_t t = 0;
    size_t ds = i;
    while (i < n && p[i] >= '0' && p[i] <= '9' && t < 350) tmp[t++] = p[i++];
    size_t intd = i - ds;
    if (!is_float) {
        if (intd == 0) return 0;
        tmp[t] = 0;
        *v = strtod(tmp, NULL) * (neg ? -1 : 1);
        return 1;
    }
    size_t fd = 0;
    if (i < n && p[i] == '.') {
        tmp[t++] = '.';
        i++;
        while (i < n && p[i] >= '0' && p[i] <= '9' && t < 380) { tmp[t++] = p[i++]; fd++; }
    }
    if (intd == 0 && fd == 0) return 0;
    if (i < n && (p[i] == 'e' || p[i] == 'E')) {
        size_t j = i + 1, t0 = t;
        tmp[t++] = 'e';
        if (j < n && (p[j] == '+' || p[j] == '-')) tmp[t++] = p[j++];
        size_t ed = 0;
        while (j < n && p[j] >= '0' && p[j] <= '9' && t < 395) { tmp[t++] = p[j++]; ed++; }
        if (!ed) t = t0;
    }
    tmp[t] = 0;
    *v = strtod(tmp, NULL) * (neg ? -1 : 1);
    return 1;
}

static int apply_filter(R *r, const jv *x, const jj_node *f, env *e, jv *out);

static int filter_ident(R *r, const jv *x, const char *name, env *e, jv *out) {
#define IS(s) (strcmp(name, s) == 0)
    if (IS("safe")) { *out = *x; return 0; }
    if (IS("tojson")) {
        jj_buf b = newbuf(r);
        if (to_json(r, &b, x, &DEFAULT_JSON, 0, 1)) return JJ_ERR;
        *out = buf_val(&b);
        return 0;
    }
    if (is_arr(x)) {
        jarr *a = x->arr;
        if (IS("list")) { *out = *x; return 0; }
        if (IS("first")) { *out = a->n ? a->v[0] : V(V_UNDEF); return 0; }
        if (IS("last")) { *out = a->n ? a->v[a->n - 1] : V(V_UNDEF); return 0; }
        if (IS("length")) { *out = vint((double)a->n); return 0; }
        if (IS("reverse") || IS("sort") || IS("unique")) {
            jarr *res = arr_new(r, a->n);
            if (!res) return oom(r);
            if (IS("reverse")) {
                for (size_t i = 0; i < a->n; i++) res->v[i] = a->v[a->n - 1 - i];
                res->n = a->n;
            } else if (IS("sort")) {
                if (a->n) memcpy(res->v, a->v, a->n * sizeof(jv));
                res->n = a->n;
                sort_ctx c = {r, 0, 0, 0, NULL, 0, -1};
                if (merge_sort(&c, res->v, res->n)) return JJ_ERR;
            } else {
                for (size_t i = 0; i < a->n; i++) {
                    int seen = 0;
                    for (size_t j = 0; j < res->n && !seen; j++) {
                        /* Set semantics (SameValueZero): NaN equals NaN. */
                        if (is_num(&a->v[i]) && is_num(&res->v[j]) && isnan(a->v[i].n) && isnan(res->v[j].n)) seen = 1;
                        else seen = strict_eq(&a->v[i], &res->v[j]);
                    }
                    if (!seen) res->v[res->n++] = a->v[i];
                }
            }
            *out = varr(V_ARRAY, res);
            return 0;
        }
        if (IS("join")) {
            jj_buf b = newbuf(r);
            for (size_t i = 0; i < a->n; i++)
                if (raw_str(r, &b, &a->v[i])) return JJ_ERR;
            *out = buf_val(&b);
            return 0;
        }
        if (IS("string")) {
            jj_buf b = newbuf(r);
            if (x->t == V_TUPLE) return fail(r, "Cannot convert to JSON: TupleValue");
            if (to_json(r, &b, x, &DEFAULT_JSON, 0, 0)) return JJ_ERR;
            *out = buf_val(&b);
            return 0;
        }
        return fail(r, "Unknown ArrayValue filter: %s", name);
    }
    if (x->t == V_STR) {
        if (IS("length")) { *out = vint((double)utf16_len(x->s, x->len)); return 0; }
        if (IS("upper") || IS("lower")) return str_case(r, x, IS("upper"), out);
        if (IS("title") || IS("capitalize")) {
            jv fn = vfunc(r, IS("title") ? S_TITLE : S_CAPITALIZE, x);
            if (fn.t != V_FUNC) return oom(r);
            jarr *noargs = arr_new(r, 0);
            if (!noargs) return oom(r);
            return call_fn(r, &fn, noargs, e, out);
        }
        if (IS("trim")) { *out = str_trim(x, 1, 1); return 0; }
        if (IS("indent")) return indent_lines(r, x, 4, 0, 0, out);
        if (IS("join") || IS("string")) { *out = *x; return 0; }
        if (IS("int") || IS("float")) {
            double v;
            int ok = js_parse_num(x, IS("float"), &v);
            *out = IS("int") ? vint(ok ? v : 0) : vfloat(ok ? v : 0);
            return 0;
        }
        return fail(r, "Unknown StringValue filter: %s", name);
    }
    if (is_num(x)) {
        if (IS("abs")) { *out = *x; out->n = fabs(x->n); return 0; }
        if (IS("int")) { *out = vint(floor(x->n)); return 0; }
        if (IS("float")) { *out = vfloat(x->n); return 0; }
        if (IS("string")) {
            jj_buf b = newbuf(r);
            if (to_str(r, &b, x)) return JJ_ERR;
            *out = buf_val(&b);
            return 0;
        }
        return fail(r, "Unknown NumericValue filter: %s", name);
    }
    if (is_objv(x)) {
        if (IS("items") || IS("length")) {
            if (IS("length")) { *out = vint((double)x->obj->n); return 0; }
        }
        jv fn;
        if (object_builtin(r, x, name, strlen(name), &fn)) return JJ_ERR;
        if (fn.t == V_FUNC) {
            jarr *noargs = arr_new(r, 0);
            if (!noargs) return oom(r);
            return call_fn(r, &fn, noargs, e, out);
        }
        return fail(r, "Unknown ObjectValue filter: %s", name);
    }
    if (x->t == V_BOOL) {
        if (IS("bool")) { *out = *x; return 0; }
        if (IS("int")) { *out = vint(x->b); return 0; }
        if (IS("float")) { *out = vfloat(x->b); return 0; }
        if (IS("string")) { *out = x->b ? vstr("true", 4) : vstr("false", 5); return 0; }
        return fail(r, "Unknown BooleanValue filter: %s", name);
    }
    return fail(r, "Cannot apply filter \"%s\" to type: %s", name, type_name(x));
#undef IS
}

static int filter_call(R *r, const jv *x, const jj_node *call, env *e, jv *out) {
    const char *name = call->a->s;
#define IS(s) (strcmp(name, s) == 0)
    jarr *pos;
    jobj *kw;
    int found, rc;
    if (IS("tojson")) {
        if ((rc = eval_args(r, &call->l1, e, &pos, &kw))) return rc;
        jv indent = kwget(kw, "indent"), ea = kwget(kw, "ensure_ascii"), sk = kwget(kw, "sort_keys"),
           sep = kwget(kw, "separators");
        if (indent.t != V_INT && indent.t != V_NULL && indent.t != V_UNDEF) return fail(r, "If set, indent must be a number");
        if (ea.t != V_BOOL && ea.t != V_UNDEF) return fail(r, "If set, ensure_ascii must be a boolean");
        if (sk.t != V_BOOL && sk.t != V_UNDEF) return fail(r, "If set, sort_keys must be a boolean");
        json_opts o = DEFAULT_JSON;
        if (indent.t == V_INT && indent.n != 0) {
            if (indent.n < 0 || indent.n > 64) return fail(r, "tojson indent out of range");
            o.indent = (int)indent.n;
            o.item_sep = ",";
            o.item_sep_len = 1;
        }
        o.ensure_ascii = ea.t == V_BOOL && ea.b;
        o.sort_keys = sk.t == V_BOOL && sk.b;
        if (is_arr(&sep)) {
            if (sep.arr->n != 2 || sep.arr->v[0].t != V_STR || sep.arr->v[1].t != V_STR)
                return fail(r, "separators must be a tuple of two strings");
            o.item_sep = sep.arr->v[0].s;
            o.item_sep_len = sep.arr->v[0].len;
            o.key_sep = sep.arr->v[1].s;
            o.key_sep_len = sep.arr->v[1].len;
        } else if (sep.t != V_NULL && sep.t != V_UNDEF) {
            return fail(r, "If set, separators must be a tuple of two strings");
        }
        jj_buf b = newbuf(r);
        if (to_json(r, &b, x, &o, 0, 1)) return JJ_ERR;
        *out = buf_val(&b);
        return 0;
    }
    if (IS("join")) {
        if (x->t != V_STR && !is_arr(x)) return fail(r, "Cannot apply filter \"join\" to type: %s", type_name(x));
        if ((rc = eval_args(r, &call->l1, e, &pos, &kw))) return rc;
        jv sep = arg_or_kw(pos, 0, kw, "separator", &found);
        if (!found) sep = vstr("", 0);
        if (sep.t != V_STR) return fail(r, "separator must be a string");
        jj_buf b = newbuf(r);
        if (x->t == V_STR) {
            for (size_t i = 0; i < x->len;) {
                uint32_t cp;
                int k = jj_utf8_dec(x->s, x->len, i, &cp);
                if (i && put(r, &b, sep.s, sep.len)) return JJ_ERR;
                if (put(r, &b, x->s + i, (size_t)k)) return JJ_ERR;
                i += (size_t)k;
            }
        } else {
            for (size_t i = 0; i < x->arr->n; i++) {
                if (i && put(r, &b, sep.s, sep.len)) return JJ_ERR;
                if (raw_str(r, &b, &x->arr->v[i])) return JJ_ERR;
            }
        }
        *out = buf_val(&b);
        return 0;
    }
    if (IS("int") || IS("float")) {
        if ((rc = eval_args(r, &call->l1, e, &pos, &kw))) return rc;
        jv def = arg_or_kw(pos, 0, kw, "default", &found);
        if (!found) def = IS("int") ? vint(0) : vfloat(0);
        if (x->t == V_STR) {
            double v;
            if (!js_parse_num(x, IS("float"), &v)) { *out = def; return 0; }
            *out = IS("int") ? vint(v) : vfloat(v);
            return 0;
        }
        if (is_num(x)) { *out = *x; return 0; }
        if (x->t == V_BOOL) { *out = IS("int") ? vint(x->b) : vfloat(x->b); return 0; }
        return fail(r, "Cannot apply filter \"%s\" to type: %s", name, type_name(x));
    }
    if (IS("default")) {
        if ((rc = eval_args(r, &call->l1, e, &pos, &kw))) return rc;
        jv def = pos->n > 0 ? pos->v[0] : vstr("", 0);
        jv bl = arg_or_kw(pos, 1, kw, "boolean", &found);
        if (!found) bl = vbool(0);
        if (bl.t != V_BOOL) return fail(r, "`default` filter flag must be a boolean");
        if (x->t == V_UNDEF || (bl.b && !truthy(x))) { *out = def; return 0; }
        *out = *x;
        return 0;
    }
    if (is_arr(x)) {
        if (IS("sort")) {
            if ((rc = eval_args(r, &call->l1, e, &pos, &kw))) return rc;
            jv rev = arg_or_kw(pos, 0, kw, "reverse", &found);
            if (!found) rev = vbool(0);
            if (rev.t != V_BOOL) return fail(r, "reverse must be a boolean");
            jv cs = arg_or_kw(pos, 1, kw, "case_sensitive", &found);
            if (!found) cs = vbool(0);
            if (cs.t != V_BOOL) return fail(r, "case_sensitive must be a boolean");
            jv at = arg_or_kw(pos, 2, kw, "attribute", &found);
            if (!found) at = V(V_NULL);
            if (at.t != V_STR && at.t != V_INT && at.t != V_NULL) return fail(r, "attribute must be a string, integer, or null");
            char numbuf[48];
            sort_ctx c = {r, cs.b, rev.b, 0, NULL, 0, -1};
            if (at.t == V_STR) { c.attr = at.s; c.attr_len = at.len; }
            else if (at.t == V_INT) { js_num(at.n, numbuf); c.attr = numbuf; c.attr_len = strlen(numbuf); }
            jarr *res = arr_new(r, x->arr->n);
            if (!res) return oom(r);
            if (x->arr->n) memcpy(res->v, x->arr->v, x->arr->n * sizeof(jv));
            res->n = x->arr->n;
            if (merge_sort(&c, res->v, res->n)) return JJ_ERR;
            *out = varr(V_ARRAY, res);
            return 0;
        }
        if (IS("selectattr") || IS("rejectattr")) {
            int sel = IS("selectattr");
            for (size_t i = 0; i < x->arr->n; i++)
                if (!is_container(&x->arr->v[i])) return fail(r, "`%s` can only be applied to array of objects", name);
            for (size_t i = 0; i < call->l1.n; i++)
                if (call->l1.v[i]->type != JN_STR) return fail(r, "arguments of `%s` must be strings", name);
            jv av[3];
            size_t na = call->l1.n;
            for (size_t i = 0; i < na && i < 3; i++)
                if ((rc = eval(r, call->l1.v[i], e, &av[i]))) return rc;
            if (na == 0) return fail(r, "Cannot read properties of undefined (reading 'value')");
            jarr *res = arr_new(r, 0);
            if (!res) return oom(r);
            for (size_t i = 0; i < x->arr->n; i++) {
                const jv *it = &x->arr->v[i];
                long k = obj_find(it->obj, av[0].s, av[0].len);
                int result = 0;
                if (k >= 0) {
                    if (na >= 2) {
                        if (run_test(r, av[1].s, &it->obj->v[k], na >= 3 ? &av[2] : NULL, na >= 3, &result)) return JJ_ERR;
                    } else {
                        result = truthy(&it->obj->v[k]);
                    }
                }
                if (sel ? result : !result)
                    if (arr_push(r, res, *it)) return JJ_ERR;
            }
            *out = varr(V_ARRAY, res);
            return 0;
        }
        if (IS("map")) {
            if ((rc = eval_args(r, &call->l1, e, &pos, &kw))) return rc;
            long k = obj_find(kw, "attribute", 9);
            if (k < 0) return fail(r, "`map` expressions without `attribute` set are not currently supported.");
            jv at = kw->v[k];
            if (at.t != V_STR) return fail(r, "attribute must be a string");
            long dk = obj_find(kw, "default", 7);
            jarr *res = arr_new(r, x->arr->n);
            if (!res) return oom(r);
            for (size_t i = 0; i < x->arr->n; i++) {
                if (!is_container(&x->arr->v[i])) return fail(r, "items in map must be an object");
                jv v = get_attr_path(&x->arr->v[i], at.s, at.len);
                if (v.t == V_UNDEF && dk >= 0) v = kw->v[dk];
                res->v[res->n++] = v;
            }
            *out = varr(V_ARRAY, res);
            return 0;
        }
        return fail(r, "Unknown ArrayValue filter: %s", name);
    }
    if (x->t == V_STR) {
        if (IS("indent")) {
            if ((rc = eval_args(r, &call->l1, e, &pos, &kw))) return rc;
            jv w = arg_or_kw(pos, 0, kw, "width", &found);
            if (!found) w = vint(4);
            if (w.t != V_INT) return fail(r, "width must be a number");
            jv fi = arg_or_kw(pos, 1, kw, "first", &found);
            jv bl = arg_or_kw(pos, 2, kw, "blank", &found);
            if (w.n > 1024) return fail(r, "indent width too large");
            return indent_lines(r, x, (long)w.n, truthy(&fi), truthy(&bl), out);
        }
        if (IS("replace")) {
            if ((rc = eval_args(r, &call->l1, e, &pos, &kw))) return rc;
            jv fn = vfunc(r, S_REPLACE, x);
            if (fn.t != V_FUNC) return oom(r);
            if (arr_push(r, pos, vobj(V_KWARGS, kw))) return JJ_ERR;
            return call_fn(r, &fn, pos, e, out);
        }
        return fail(r, "Unknown StringValue filter: %s", name);
    }
    if (is_objv(x)) {
        jv fn;
        if (object_builtin(r, x, name, strlen(name), &fn)) return JJ_ERR;
        if (fn.t == V_FUNC) {
            if ((rc = eval_args(r, &call->l1, e, &pos, &kw))) return rc;
            if (kw->n > 0 && arr_push(r, pos, vobj(V_KWARGS, kw))) return JJ_ERR;
            return call_fn(r, &fn, pos, e, out);
        }
        return fail(r, "Unknown ObjectValue filter: %s", name);
    }
    return fail(r, "Cannot apply filter \"%s\" to type: %s", name, type_name(x));
#undef IS
}

static int apply_filter(R *r, const jv *x, const jj_node *f, env *e, jv *out) {
    if (f->type == JN_IDENT) return filter_ident(r, x, f->s, e, out);
    if (f->type == JN_CALL) {
        if (f->a->type != JN_IDENT) return fail(r, "Unknown filter");
        return filter_call(r, x, f, e, out);
    }
    return fail(r, "Unknown filter");
}

/* ---------------- functions ---------------- */

static const char *const MONTHS[12] = {"January", "February", "March", "April", "May", "June",
                                       "July", "August", "September", "October", "November", "December"};

static int fn_strftime(R *r, const jv *fmt, jv *out) {
    if (fmt->t != V_STR) return fail(r, "strftime_now expects a format string");
    struct tm tmv;
    if (r->have_now) {
        tmv = r->now;
    } else {
        time_t t = time(NULL);
        localtime_r(&t, &tmv);
    }
    jj_buf b = newbuf(r);
    char tmp[32];
    for (size_t i = 0; i < fmt->len; i++) {
        char c = fmt->s[i];
        if (c == '%' && i + 1 < fmt->len && strchr("YmdbBHM%", fmt->s[i + 1]) && fmt->s[i + 1]) {
            char d = fmt->s[++i];
            switch (d) {
            case 'Y': snprintf(tmp, sizeof tmp, "%d", tmv.tm_year + 1900); break;
            case 'm': snprintf(tmp, sizeof tmp, "%02d", tmv.tm_mon + 1); break;
            case 'd': snprintf(tmp, sizeof tmp, "%02d", tmv.tm_mday); break;
            case 'H': snprintf(tmp, sizeof tmp, "%02d", tmv.tm_hour); break;
            case 'M': snprintf(tmp, sizeof tmp, "%02d", tmv.tm_min); break;
            case 'b': snprintf(tmp, sizeof tmp, "%.3s", MONTHS[tmv.tm_mon % 12]); break;
            case 'B': snprintf(tmp, sizeof tmp, "%s", MONTHS[tmv.tm_mon % 12]); break;
            default: strcpy(tmp, "%"); break;
            }
            if (puts_(r, &b, tmp)) return JJ_ERR;
        } else if (put(r, &b, &c, 1)) {
            return JJ_ERR;
        }
    }
    *out = buf_val(&b);
    return 0;
}

static int bind_macro_args(R *r, const jj_list *params, int special, jarr *args, env *scope,
                           const char *display) {
    size_t npos = args->n;
    jobj *kw = obj_new(r);
    if (!kw) return oom(r);
    if (npos && args->v[npos - 1].t == V_KWARGS) {
        jobj *src = args->v[npos - 1].obj;
        for (size_t i = 0; i < src->n; i++)
            if (obj_set(r, kw, src->k[i], src->kl[i], src->v[i])) return JJ_ERR;
        npos--;
    }
    unsigned char *pending = jj_alloc(&r->a, params->n / 8 + 1);
    if (!pending) return oom(r);
    for (size_t i = 0; i < params->n; i++) {
        const jj_node *p = params->v[i];
        jv v;
        int have = 0;
        if (i < npos) { v = args->v[i]; have = 1; }
        if (!have) {
            long k = obj_find(kw, p->s, p->len);
            if (k >= 0) { v = kw->v[k]; have = 1; obj_del(kw, (size_t)k); }
        }
        if (!have && p->type == JN_KWARG) pending[i / 8] |= (unsigned char)(1u << (i % 8));
        if (env_set(r, scope, p->s, p->len, have ? v : V(V_UNDEF))) return JJ_ERR;
    }
    if (special & 1) {
        if (env_set(r, scope, "kwargs", 6, vobj(V_OBJECT, kw))) return JJ_ERR;
    } else if (kw->n > 0) {
        return fail(r, "macro %s takes no keyword argument '%s'", display, kw->k[0]);
    }
    if (special & 2) {
        jarr *va = arr_new(r, 0);
        if (!va) return oom(r);
        for (size_t i = params->n; i < npos; i++)
            if (arr_push(r, va, args->v[i])) return JJ_ERR;
        if (env_set(r, scope, "varargs", 7, varr(V_ARRAY, va))) return JJ_ERR;
    } else if (npos > params->n) {
        return fail(r, "macro %s takes not more than %zu argument(s)", display, params->n);
    }
    /* Defaults are evaluated last, in the macro scope, for the parameters
     * that got no value. */
    for (size_t i = 0; i < params->n; i++) {
        if (!(pending[i / 8] & (1u << (i % 8)))) continue;
        const jj_node *p = params->v[i];
        jv dv;
        int rc = eval(r, p->a, scope, &dv);
        if (rc) return rc;
        if (env_set(r, scope, p->s, p->len, dv)) return JJ_ERR;
    }
    return 0;
}

static int split_str(R *r, const jv *s, jarr *args, jv *out) {
    jv sep = args->n > 0 ? args->v[0] : V(V_NULL);
    if (sep.t != V_STR && sep.t != V_NULL) return fail(r, "sep argument must be a string or null");
    jv ms = args->n > 1 ? args->v[1] : vint(-1);
    if (ms.t != V_INT) return fail(r, "maxsplit argument must be a number");
    double maxsplit = ms.n;
    jarr *res = arr_new(r, 0);
    if (!res) return oom(r);
    if (sep.t == V_NULL) {
        jv text = str_trim(s, 1, 0);
        size_t i = 0;
        while (i < text.len) {
            size_t a, z;
            /* next \S+ run */
            size_t j = i;
            while (j < text.len) {
                uint32_t cp;
                int k = jj_utf8_dec(text.s, text.len, j, &cp);
                if (!jj_js_space(cp)) break;
                j += (size_t)k;
            }
            if (j >= text.len) break;
            a = j;
            while (j < text.len) {
                uint32_t cp;
                int k = jj_utf8_dec(text.s, text.len, j, &cp);
                if (jj_js_space(cp)) break;
                j += (size_t)k;
            }
            z = j;
            if (maxsplit != -1 && (double)res->n >= maxsplit) {
                if (arr_push(r, res, vstr(text.s + a, text.len - a))) return JJ_ERR;
                break;
            }
            if (arr_push(r, res, vstr(text.s + a, z - a))) return JJ_ERR;
            i = z;
        }
    } else {
        if (sep.len == 0) return fail(r, "empty separator");
        size_t i = 0;
        while (1) {
            const char *p = memfind(s->s + i, s->len - i, sep.s, sep.len);
            size_t end = p ? (size_t)(p - s->s) : s->len;
            if (arr_push(r, res, vstr(s->s + i, end - i))) return JJ_ERR;
            if (!p) break;
            i = end + sep.len;
        }
        if (maxsplit != -1 && (double)res->n > maxsplit) {
            long len = (long)res->n;
            long st = (long)maxsplit;
            if (st < 0) st = len + st > 0 ? len + st : 0;
            if (st > len) st = len;
            jj_buf b = newbuf(r);
            for (long k = st; k < len; k++) {
                if (k > st && put(r, &b, sep.s, sep.len)) return JJ_ERR;
                if (put(r, &b, res->v[k].s, res->v[k].len)) return JJ_ERR;
            }
            res->n = (size_t)st;
            if (arr_push(r, res, buf_val(&b))) return JJ_ERR;
        }
    }
    *out = varr(V_ARRAY, res);
    return 0;
}

static int replace_str(R *r, const jv *s, jarr *args, jv *out) {
    if (args->n < 2) return fail(r, "replace() requires at least two arguments");
    jv o = args->v[0], nw = args->v[1];
    if (o.t != V_STR || nw.t != V_STR) return fail(r, "replace() arguments must be strings");
    jv count = V(V_NULL);
    if (args->n > 2) {
        if (args->v[2].t == V_KWARGS) {
            long k = obj_find(args->v[2].obj, "count", 5);
            count = k >= 0 ? args->v[2].obj->v[k] : V(V_NULL);
        } else {
            count = args->v[2];
        }
    }
    if (count.t != V_INT && count.t != V_NULL) return fail(r, "replace() count argument must be a number or null");
    if (count.t == V_INT && count.n == 0) { *out = *s; return 0; }
    double remaining = (count.t == V_NULL || count.n < 0) ? INFINITY : count.n;
    jj_buf b = newbuf(r);
    if (o.len == 0) {
        /* /(?=)/gu: every code-point boundary, including both ends. */
        size_t i = 0;
        while (1) {
            if (remaining > 0) {
                if (put(r, &b, nw.s, nw.len)) return JJ_ERR;
                remaining--;
            }
            if (i >= s->len) break;
            uint32_t cp;
            int k = jj_utf8_dec(s->s, s->len, i, &cp);
            if (put(r, &b, s->s + i, (size_t)k)) return JJ_ERR;
            i += (size_t)k;
        }
    } else {
        size_t i = 0;
        while (i <= s->len) {
            const char *p = memfind(s->s + i, s->len - i, o.s, o.len);
            if (!p) {
                if (put(r, &b, s->s + i, s->len - i)) return JJ_ERR;
                break;
            }
            size_t at = (size_t)(p - s->s);
            if (put(r, &b, s->s + i, at - i)) return JJ_ERR;
            if (remaining > 0) {
                if (put(r, &b, nw.s, nw.len)) return JJ_ERR;
                remaining--;
            } else if (put(r, &b, o.s, o.len)) {
                return JJ_ERR;
            }
            i = at + o.len;
        }
    }
    *out = buf_val(&b);
    return 0;
}

static int string_method(R *r, const jfunc *f, jarr *args, jv *out) {
    const jv *s = &f->self;
    switch (f->kind) {
    case S_UPPER: return str_case(r, s, 1, out);
    case S_LOWER: return str_case(r, s, 0, out);
    case S_STRIP: *out = str_trim(s, 1, 1); return 0;
    case S_LSTRIP: *out = str_trim(s, 1, 0); return 0;
    case S_RSTRIP: *out = str_trim(s, 0, 1); return 0;
    case S_TITLE: {
        jj_buf b = newbuf(r);
        if (put(r, &b, s->s, s->len)) return JJ_ERR;
        for (size_t i = 0; i < b.len; i++) {
            char c = b.p[i];
            if (jj_is_word((unsigned char)c) && (i == 0 || !jj_is_word((unsigned char)b.p[i - 1])) && c >= 'a' && c <= 'z')
                b.p[i] = (char)(c - 32);
        }
        *out = buf_val(&b);
        return 0;
    }
    case S_CAPITALIZE: {
        jj_buf b = newbuf(r);
        if (s->len) {
            uint32_t cp;
            int k = jj_utf8_dec(s->s, s->len, 0, &cp);
            if (cp >= 0x10000) {
                if (put(r, &b, s->s, (size_t)k)) return JJ_ERR;
            } else if (case_map(r, &b, s->s, (size_t)k, 1)) {
                return JJ_ERR;
            }
            if (put(r, &b, s->s + k, s->len - (size_t)k)) return JJ_ERR;
        }
        *out = buf_val(&b);
        return 0;
    }
    case S_STARTSWITH:
    case S_ENDSWITH: {
        const char *nm = f->kind == S_STARTSWITH ? "startswith" : "endswith";
        if (args->n == 0) return fail(r, "%s() requires at least one argument", nm);
        const jv *p = &args->v[0];
        int (*fnp)(const jv *, const jv *) = f->kind == S_STARTSWITH ? starts_with : ends_with;
        if (p->t == V_STR) { *out = vbool(fnp(s, p)); return 0; }
        if (is_arr(p)) {
            for (size_t i = 0; i < p->arr->n; i++) {
                if (p->arr->v[i].t != V_STR) return fail(r, "%s() tuple elements must be strings", nm);
                if (fnp(s, &p->arr->v[i])) { *out = vbool(1); return 0; }
            }
            *out = vbool(0);
            return 0;
        }
        return fail(r, "%s() argument must be a string or tuple of strings", nm);
    }
    case S_SPLIT: return split_str(r, s, args, out);
    case S_REPLACE: return replace_str(r, s, args, out);
    default: return fail(r, "internal: bad string method");
    }
}

static int object_method(R *r, const jfunc *f, jarr *args, jv *out) {
    jobj *o = f->self.obj;
    switch (f->kind) {
    case O_GET: {
        if (args->n == 0 || args->v[0].t != V_STR)
            return fail(r, "Object key must be a string: got %s", args->n ? type_name(&args->v[0]) : "undefined");
        long k = obj_find(o, args->v[0].s, args->v[0].len);
        if (k >= 0) *out = o->v[k];
        else if (args->n > 1) *out = args->v[1];
        else *out = V(V_NULL);
        return 0;
    }
    case O_ITEMS:
    case O_KEYS:
    case O_VALUES: {
        jarr *res = arr_new(r, o->n);
        if (!res) return oom(r);
        for (size_t i = 0; i < o->n; i++) {
            if (f->kind == O_KEYS) {
                res->v[i] = vstr(o->k[i], o->kl[i]);
            } else if (f->kind == O_VALUES) {
                res->v[i] = o->v[i];
            } else {
                jarr *pair = arr_new(r, 2);
                if (!pair) return oom(r);
                pair->v[0] = vstr(o->k[i], o->kl[i]);
                pair->v[1] = o->v[i];
                pair->n = 2;
                res->v[i] = varr(V_ARRAY, pair);
            }
        }
        res->n = o->n;
        *out = varr(V_ARRAY, res);
        return 0;
    }
    case O_DICTSORT: {
        jobj *kw = NULL;
        size_t np = 0;
        jv pos[3];
        for (size_t i = 0; i < args->n; i++) {
            if (args->v[i].t == V_KWARGS) kw = args->v[i].obj;
            else if (np < 3) pos[np++] = args->v[i];
        }
        jarr pa = {pos, np, 3};
        int found;
        jv cs = arg_or_kw(&pa, 0, kw, "case_sensitive", &found);
        if (!found) cs = vbool(0);
        if (cs.t != V_BOOL) return fail(r, "case_sensitive must be a boolean");
        jv by = arg_or_kw(&pa, 1, kw, "by", &found);
        if (!found) by = vstr("key", 3);
        if (by.t != V_STR) return fail(r, "by must be a string");
        int byv;
        if (by.len == 3 && memcmp(by.s, "key", 3) == 0) byv = 0;
        else if (by.len == 5 && memcmp(by.s, "value", 5) == 0) byv = 1;
        else return fail(r, "by must be either 'key' or 'value'");
        jv rev = arg_or_kw(&pa, 2, kw, "reverse", &found);
        if (!found) rev = vbool(0);
        if (rev.t != V_BOOL) return fail(r, "reverse must be a boolean");
        jfunc items = *f;
        items.kind = O_ITEMS;
        jv all;
        if (object_method(r, &items, args, &all)) return JJ_ERR;
        sort_ctx c = {r, cs.b, rev.b, 0, NULL, 0, byv};
        if (merge_sort(&c, all.arr->v, all.arr->n)) return JJ_ERR;
        *out = all;
        return 0;
    }
    default: return fail(r, "internal: bad object method");
    }
}

static int call_fn(R *r, const jv *fnv, jarr *args, env *site, jv *out) {
    if (fnv->t != V_FUNC) return fail(r, "Cannot call something that is not a function: got %s", type_name(fnv));
    if (++r->depth > JJ_MAX_DEPTH) return fail(r, "template recursion too deep");
    const jfunc *f = fnv->fn;
    int rc = 0;
    switch (f->kind) {
    case F_NAMESPACE: {
        size_t np = args->n;
        jobj *kw = NULL;
        if (np && args->v[np - 1].t == V_KWARGS) kw = args->v[--np].obj;
        if (np > 1) { rc = fail(r, "namespace expected at most 1 argument, got %zu", np); break; }
        jobj *ent = obj_new(r);
        if (!ent) { rc = oom(r); break; }
        if (np == 1) {
            const jv *src = &args->v[0];
            if (is_objv(src)) {
                for (size_t i = 0; i < src->obj->n && !rc; i++)
                    rc = obj_set(r, ent, src->obj->k[i], src->obj->kl[i], src->obj->v[i]);
            } else if (is_arr(src)) {
                for (size_t i = 0; i < src->arr->n && !rc; i++) {
                    const jv *p = &src->arr->v[i];
                    if (!is_arr(p) || p->arr->n != 2) {
                        rc = fail(r, "namespace expected an object or an iterable of [key, value] pairs");
                        break;
                    }
                    if (p->arr->v[0].t != V_STR) { rc = fail(r, "namespace keys must be strings"); break; }
                    rc = obj_set(r, ent, p->arr->v[0].s, p->arr->v[0].len, p->arr->v[1]);
                }
            } else {
                rc = fail(r, "'%s' object is not iterable", type_name(src));
            }
        }
        if (kw)
            for (size_t i = 0; i < kw->n && !rc; i++) rc = obj_set(r, ent, kw->k[i], kw->kl[i], kw->v[i]);
        if (!rc) *out = vobj(V_NS, ent);
        break;
    }
    case F_RAISE: {
        jj_buf b = newbuf(r);
        if (args->n > 0 && args->v[0].t != V_UNDEF && args->v[0].t != V_NULL) {
            if (args->v[0].t == V_STR || is_num(&args->v[0])) raw_str(r, &b, &args->v[0]);
            else to_str(r, &b, &args->v[0]);
        }
        rc = fail(r, "%.*s", (int)b.len, b.p ? b.p : "");
        break;
    }
    case F_RANGE: {
        double a = 0, z = 0, st = 1;
        for (size_t i = 0; i < args->n && i < 3; i++)
            if (!is_num(&args->v[i])) { rc = fail(r, "range() arguments must be numbers"); break; }
        if (rc) break;
        if (args->n == 0) { a = 0; z = 0; }
        else if (args->n == 1) { z = args->v[0].n; }
        else { a = args->v[0].n; z = args->v[1].n; if (args->n > 2) st = args->v[2].n; }
        if (st == 0) { rc = fail(r, "range() step must not be zero"); break; }
        double cnt = st > 0 ? ceil((z - a) / st) : ceil((a - z) / -st);
        if (cnt > JJ_MAX_RANGE) { rc = fail(r, "range() too large"); break; }
        jarr *res = arr_new(r, cnt > 0 ? (size_t)cnt : 0);
        if (!res) { rc = oom(r); break; }
        for (double i = a; st > 0 ? i < z : i > z; i += st) {
            jv v = i == floor(i) ? vint(i) : vfloat(i);
            if ((rc = arr_push(r, res, v))) break;
        }
        if (!rc) *out = varr(V_ARRAY, res);
        break;
    }
    case F_STRFTIME:
        if (args->n == 0) rc = fail(r, "strftime_now expects a format string");
        else rc = fn_strftime(r, &args->v[0], out);
        break;
    case F_MACRO: {
        env *scope = env_new(r, site);
        if (!scope) { rc = oom(r); break; }
        char disp[80];
        snprintf(disp, sizeof disp, "'%.60s'", f->node->s);
        if ((rc = bind_macro_args(r, &f->node->l1, f->special, args, scope, disp))) break;
        jj_buf b = newbuf(r);
        if ((rc = exec_block(r, &f->node->l2, scope, &b))) break;
        *out = buf_val(&b);
        break;
    }
    case F_CALLER: {
        env *scope = env_new(r, f->env);
        if (!scope) { rc = oom(r); break; }
        if ((rc = bind_macro_args(r, &f->node->l1, f->special, args, scope, "None"))) break;
        jj_buf b = newbuf(r);
        if ((rc = exec_block(r, &f->node->l2, scope, &b))) break;
        *out = buf_val(&b);
        break;
    }
    case O_GET: case O_ITEMS: case O_KEYS: case O_VALUES: case O_DICTSORT:
        rc = object_method(r, f, args, out);
        break;
    default:
        rc = string_method(r, f, args, out);
        break;
    }
    r->depth--;
    return rc;
}

/* Which of kwargs/varargs does a macro body read? (Approximates
 * findAccessedSpecialMacroArguments: names used but not declared.) */
static void scan_special(const jj_node *n, int *used, int *declared, int depth) {
    if (!n || depth > JJ_MAX_DEPTH) return;
    if (n->type == JN_IDENT) {
        if (n->len == 6 && memcmp(n->s, "kwargs", 6) == 0) *used |= 1;
        if (n->len == 7 && memcmp(n->s, "varargs", 7) == 0) *used |= 2;
        return;
    }
    if ((n->type == JN_SET || n->type == JN_FOR) && n->a) {
        const jj_node *t = n->a;
        if (t->type == JN_IDENT) {
            if (t->len == 6 && memcmp(t->s, "kwargs", 6) == 0) *declared |= 1;
            if (t->len == 7 && memcmp(t->s, "varargs", 7) == 0) *declared |= 2;
        }
    }
    if (n->type == JN_MEMBER) {
        scan_special(n->a, used, declared, depth + 1);
        if (n->flag) scan_special(n->b, used, declared, depth + 1);
        return;
    }
    if (n->type == JN_KWARG) {
        scan_special(n->a, used, declared, depth + 1);
        return;
    }
    if (n->type != JN_SET && n->type != JN_FOR) scan_special(n->a, used, declared, depth + 1);
    else if (n->a && n->a->type != JN_IDENT) scan_special(n->a, used, declared, depth + 1);
    scan_special(n->b, used, declared, depth + 1);
    scan_special(n->c, used, declared, depth + 1);
    for (size_t i = 0; i < n->l1.n; i++) scan_special(n->l1.v[i], used, declared, depth + 1);
    for (size_t i = 0; i < n->l2.n; i++) scan_special(n->l2.v[i], used, declared, depth + 1);
}

static int special_args(const jj_list *params, const jj_list *body) {
    int used = 0, declared = 0;
    for (size_t i = 0; i < params->n; i++) {
        const jj_node *p = params->v[i];
        if (p->len == 6 && memcmp(p->s, "kwargs", 6) == 0) declared |= 1;
        if (p->len == 7 && memcmp(p->s, "varargs", 7) == 0) declared |= 2;
        if (p->type == JN_KWARG) scan_special(p->a, &used, &declared, 0);
    }
    for (size_t i = 0; i < body->n; i++) scan_special(body->v[i], &used, &declared, 0);
    return used & ~declared;
}

static int eval_binary(R *r, const jj_node *n, env *e, jv *out) {
    jv L, Rv;
    int rc = eval(r, n->a, e, &L);
    if (rc) return rc;
    if (n->op == JO_AND) return truthy(&L) ? eval(r, n->b, e, out) : (*out = L, 0);
    if (n->op == JO_OR) return truthy(&L) ? (*out = L, 0) : eval(r, n->b, e, out);
    if ((rc = eval(r, n->b, e, &Rv))) return rc;
    jj_op op = n->op;
    if (op == JO_EQ || op == JO_NE) {
        int eq;
        if (loose_eq(r, &L, &Rv, &eq)) return JJ_ERR;
        *out = vbool(op == JO_EQ ? eq : !eq);
        return 0;
    }
    static const char *const OPN[] = {
        [JO_AND] = "and", [JO_OR] = "or", [JO_LT] = "<", [JO_GT] = ">", [JO_LE] = "<=", [JO_GE] = ">=",
        [JO_IN] = "in", [JO_NOTIN] = "not in", [JO_ADD] = "+", [JO_SUB] = "-", [JO_CONCAT] = "~",
        [JO_MUL] = "*", [JO_DIV] = "/", [JO_FLOORDIV] = "//", [JO_MOD] = "%", [JO_POW] = "**"};
    const char *opn = OPN[op] ? OPN[op] : "?";
    if (L.t == V_UNDEF || Rv.t == V_UNDEF) {
        if (Rv.t == V_UNDEF && (op == JO_IN || op == JO_NOTIN)) { *out = vbool(op == JO_NOTIN); return 0; }
        return fail(r, "Cannot perform operation %s on undefined values", opn);
    }
    if (L.t == V_NULL || Rv.t == V_NULL) return fail(r, "Cannot perform operation on null values");
    if (op == JO_CONCAT) return concat_raw(r, &L, &Rv, out);
    if (op == JO_POW && is_numlike(&L) && is_numlike(&Rv)) {
        double a = numval(&L), b = numval(&Rv);
        if (a == 0 && b < 0) return fail(r, "0.0 cannot be raised to a negative power");
        double res = pow(a, b);
        if (!isfinite(res)) return fail(r, "Exponentiation result is not a finite real number");
        *out = (L.t == V_FLOAT || Rv.t == V_FLOAT || b < 0) ? vfloat(res) : vint(res);
        return 0;
    }
    if (is_num(&L) && is_num(&Rv)) {
        double a = L.n, b = Rv.n;
        int fl = L.t == V_FLOAT || Rv.t == V_FLOAT;
        switch (op) {
        case JO_ADD: *out = fl ? vfloat(a + b) : vint(a + b); return 0;
        case JO_SUB: *out = fl ? vfloat(a - b) : vint(a - b); return 0;
        case JO_MUL: *out = fl ? vfloat(a * b) : vint(a * b); return 0;
        case JO_DIV: *out = vfloat(a / b); return 0;
        case JO_FLOORDIV: *out = fl ? vfloat(floor(a / b)) : vint(floor(a / b)); return 0;
        case JO_MOD: *out = fl ? vfloat(fmod(a, b)) : vint(fmod(a, b)); return 0;
        case JO_LT: *out = vbool(a < b); return 0;
        case JO_GT: *out = vbool(a > b); return 0;
        case JO_GE: *out = vbool(a >= b); return 0;
        case JO_LE: *out = vbool(a <= b); return 0;
        default: break;
        }
    } else if (is_arr(&L) && is_arr(&Rv)) {
        if (op == JO_ADD) {
            jarr *res = arr_new(r, L.arr->n + Rv.arr->n);
            if (!res) return oom(r);
            if (L.arr->n) memcpy(res->v, L.arr->v, L.arr->n * sizeof(jv));
            if (Rv.arr->n) memcpy(res->v + L.arr->n, Rv.arr->v, Rv.arr->n * sizeof(jv));
            res->n = L.arr->n + Rv.arr->n;
            *out = varr(V_ARRAY, res);
            return 0;
        }
    } else if (is_arr(&Rv)) {
        if (op == JO_IN || op == JO_NOTIN) {
            int found = 0;
            for (size_t i = 0; i < Rv.arr->n && !found; i++) found = strict_eq(&Rv.arr->v[i], &L);
            *out = vbool(op == JO_IN ? found : !found);
            return 0;
        }
    }
    if ((L.t == V_STR || Rv.t == V_STR) && op == JO_ADD) return concat_raw(r, &L, &Rv, out);
    if (L.t == V_STR && Rv.t == V_STR && (op == JO_IN || op == JO_NOTIN)) {
        int found = memfind(Rv.s, Rv.len, L.s, L.len) != NULL;
        *out = vbool(op == JO_IN ? found : !found);
        return 0;
    }
    if (L.t == V_STR && is_objv(&Rv) && (op == JO_IN || op == JO_NOTIN)) {
        int found = obj_find(Rv.obj, L.s, L.len) >= 0;
        *out = vbool(op == JO_IN ? found : !found);
        return 0;
    }
    return fail(r, "Unknown operator \"%s\" between %s and %s", opn, type_name(&L), type_name(&Rv));
}

static int eval(R *r, const jj_node *n, env *e, jv *out) {
    if (!n) { *out = V(V_UNDEF); return 0; }
    if (step(r)) return JJ_ERR;
    if (++r->depth > JJ_MAX_DEPTH) return fail(r, "template recursion too deep");
    int rc = 0;
    switch (n->type) {
    case JN_STR: *out = vstr(n->s, n->len); break;
    case JN_INT: *out = vint(n->num); break;
    case JN_FLOAT: *out = vfloat(n->num); break;
    case JN_IDENT: *out = env_lookup(r, e, n->s, n->len); break;
    case JN_ARRAY:
    case JN_TUPLE: {
        jarr *a = arr_new(r, n->l1.n);
        if (!a) { rc = oom(r); break; }
        for (size_t i = 0; i < n->l1.n && !rc; i++) {
            rc = eval(r, n->l1.v[i], e, &a->v[i]);
            a->n = i + 1;
        }
        if (!rc) *out = varr(n->type == JN_ARRAY ? V_ARRAY : V_TUPLE, a);
        break;
    }
    case JN_OBJECT: {
        jobj *o = obj_new(r);
        if (!o) { rc = oom(r); break; }
        for (size_t i = 0; i < n->l1.n && !rc; i++) {
            jv k, v;
            if ((rc = eval(r, n->l1.v[i], e, &k))) break;
            if (k.t != V_STR) { rc = fail(r, "Object keys must be strings: got %s", type_name(&k)); break; }
            if ((rc = eval(r, n->l2.v[i], e, &v))) break;
            rc = obj_set(r, o, k.s, k.len, v);
        }
        if (!rc) *out = vobj(V_OBJECT, o);
        break;
    }
    case JN_MEMBER: rc = eval_member(r, n, e, out); break;
    case JN_CALL: {
        jarr *pos;
        jobj *kw;
        if ((rc = eval_args(r, &n->l1, e, &pos, &kw))) break;
        if (kw->n > 0 && (rc = arr_push(r, pos, vobj(V_KWARGS, kw)))) break;
        jv fn;
        if ((rc = eval(r, n->a, e, &fn))) break;
        rc = call_fn(r, &fn, pos, e, out);
        break;
    }
    case JN_UNARY: {
        jv a;
        if ((rc = eval(r, n->a, e, &a))) break;
        if (n->op == JO_NOT) { *out = vbool(!truthy(&a)); break; }
        if (!is_numlike(&a)) { rc = fail(r, "Unknown operator \"%s\" for %s", n->op == JO_NEG ? "-" : "+", type_name(&a)); break; }
        double v = numval(&a) * (n->op == JO_NEG ? -1 : 1);
        *out = a.t == V_FLOAT ? vfloat(v) : vint(v);
        break;
    }
    case JN_BINARY: rc = eval_binary(r, n, e, out); break;
    case JN_FILTER: {
        jv a;
        if ((rc = eval(r, n->a, e, &a))) break;
        rc = apply_filter(r, &a, n->b, e, out);
        break;
    }
    case JN_TEST: {
        jv a;
        if ((rc = eval(r, n->a, e, &a))) break;
        int res;
        if ((rc = run_test(r, n->s, &a, NULL, 0, &res))) break;
        *out = vbool(n->flag ? !res : res);
        break;
    }
    case JN_SELECT: {
        jv t;
        if ((rc = eval(r, n->b, e, &t))) break;
        if (!truthy(&t)) *out = V(V_UNDEF);
        else rc = eval(r, n->a, e, out);
        break;
    }
    case JN_TERNARY: {
        jv c;
        if ((rc = eval(r, n->a, e, &c))) break;
        rc = eval(r, truthy(&c) ? n->b : n->c, e, out);
        break;
    }
    case JN_SLICE: rc = fail(r, "Unknown node type: SliceExpression"); break;
    case JN_KWARG: rc = fail(r, "Unknown node type: KeywordArgumentExpression"); break;
    case JN_SPREAD:
    case JN_KWSPREAD: rc = fail(r, "Unknown node type: SpreadExpression"); break;
    case JN_COMMENT: *out = V(V_NULL); break;
    default: {
        /* Statements used as values: render them into a string. */
        jj_buf b = newbuf(r);
        jj_list one = {(jj_node **)&n, 1, 1};
        rc = exec_block(r, &one, e, &b);
        if (!rc) *out = buf_val(&b);
        break;
    }
    }
    r->depth--;
    return rc;
}

static int assign_target(R *r, const jj_node *t, const jv *v, env *e) {
    if (t->type == JN_IDENT) return env_set(r, e, t->s, t->len, *v);
    if (t->type == JN_TUPLE) {
        if (!is_arr(v)) return fail(r, "Cannot unpack non-iterable type in set: %s", type_name(v));
        if (v->arr->n != t->l1.n)
            return fail(r, "Too %s items to unpack in set", t->l1.n > v->arr->n ? "few" : "many");
        for (size_t i = 0; i < t->l1.n; i++) {
            if (t->l1.v[i]->type != JN_IDENT) return fail(r, "Cannot unpack to non-identifier in set");
            if (env_set(r, e, t->l1.v[i]->s, t->l1.v[i]->len, v->arr->v[i])) return JJ_ERR;
        }
        return 0;
    }
    if (t->type == JN_MEMBER) {
        jv obj;
        int rc = eval(r, t->a, e, &obj);
        if (rc) return rc;
        if (obj.t != V_NS) return fail(r, "cannot assign attribute on non-namespace object");
        if (t->b->type != JN_IDENT) return fail(r, "Cannot assign to member with non-identifier property");
        return obj_set(r, obj.obj, t->b->s, t->b->len, *v);
    }
    return fail(r, "Invalid LHS inside assignment expression");
}

static int bind_loopvar(R *r, const jj_node *lv, const jv *cur, env *e) {
    if (lv->type == JN_IDENT) return env_set(r, e, lv->s, lv->len, *cur);
    if (cur->t != V_ARRAY) return fail(r, "Cannot unpack non-iterable type: %s", type_name(cur));
    if (lv->l1.n != cur->arr->n) return fail(r, "Too %s items to unpack", lv->l1.n > cur->arr->n ? "few" : "many");
    for (size_t j = 0; j < lv->l1.n; j++) {
        if (lv->l1.v[j]->type != JN_IDENT) return fail(r, "Cannot unpack non-identifier type");
        if (env_set(r, e, lv->l1.v[j]->s, lv->l1.v[j]->len, cur->arr->v[j])) return JJ_ERR;
    }
    return 0;
}

static int exec_for(R *r, const jj_node *n, env *e, jj_buf *out) {
    env *scope = env_new(r, e);
    if (!scope) return oom(r);
    const jj_node *test = NULL;
    jv it;
    int rc;
    if (n->b->type == JN_SELECT) {
        if ((rc = eval(r, n->b->a, scope, &it))) return rc;
        test = n->b->b;
    } else if ((rc = eval(r, n->b, scope, &it))) {
        return rc;
    }
    if (!is_arr(&it) && !is_objv(&it))
        return fail(r, "Expected iterable or object type in for loop: got %s", type_name(&it));
    jarr *src;
    if (is_objv(&it)) {
        src = arr_new(r, it.obj->n);
        if (!src) return oom(r);
        for (size_t i = 0; i < it.obj->n; i++) src->v[i] = vstr(it.obj->k[i], it.obj->kl[i]);
        src->n = it.obj->n;
    } else {
        src = it.arr;
    }
    if (n->a->type == JN_TUPLE)
        for (size_t i = 0; i < src->n; i++) {
            const jv *c = &src->v[i];
            if (c->t != V_ARRAY) return fail(r, "Cannot unpack non-iterable type: %s", type_name(c));
            if (n->a->l1.n != c->arr->n) return fail(r, "Too %s items to unpack", n->a->l1.n > c->arr->n ? "few" : "many");
        }
    jarr *items = arr_new(r, src->n);
    if (!items) return oom(r);
    for (size_t i = 0; i < src->n; i++) {
        if (test) {
            env *ls = env_new(r, scope);
            if (!ls) return oom(r);
            if ((rc = bind_loopvar(r, n->a, &src->v[i], ls))) return rc;
            jv tv;
            if ((rc = eval(r, test, ls, &tv))) return rc;
            if (!truthy(&tv)) continue;
        }
        items->v[items->n++] = src->v[i];
    }
    int no_iter = 1;
    size_t len = items->n;
    for (size_t i = 0; i < len; i++) {
        if (step(r)) return JJ_ERR;
        jobj *loop = obj_new(r);
        if (!loop) return oom(r);
        if (obj_set(r, loop, "index", 5, vint((double)i + 1)) || obj_set(r, loop, "index0", 6, vint((double)i)) ||
            obj_set(r, loop, "revindex", 8, vint((double)(len - i))) ||
            obj_set(r, loop, "revindex0", 9, vint((double)(len - i - 1))) ||
            obj_set(r, loop, "first", 5, vbool(i == 0)) || obj_set(r, loop, "last", 4, vbool(i == len - 1)) ||
            obj_set(r, loop, "length", 6, vint((double)len)) ||
            obj_set(r, loop, "previtem", 8, i > 0 ? items->v[i - 1] : V(V_UNDEF)) ||
            obj_set(r, loop, "nextitem", 8, i + 1 < len ? items->v[i + 1] : V(V_UNDEF)))
            return JJ_ERR;
        if (env_set(r, scope, "loop", 4, vobj(V_OBJECT, loop))) return JJ_ERR;
        if ((rc = bind_loopvar(r, n->a, &items->v[i], scope))) return rc;
        size_t mark = out->len;
        rc = exec_block(r, &n->l1, scope, out);
        if (rc == JJ_CONTINUE || rc == JJ_BREAK) {
            /* JS drops the whole iteration's text when it throws. */
            out->len = mark;
            if (out->p) out->p[mark] = 0;
            if (rc == JJ_BREAK) break;
            continue;
        }
        if (rc) return rc;
        no_iter = 0;
    }
    if (no_iter) return exec_block(r, &n->l2, scope, out);
    return 0;
}

static int exec_stmt(R *r, const jj_node *n, env *e, jj_buf *out) {
    int rc;
    switch (n->type) {
    case JN_COMMENT: return 0;
    case JN_IF: {
        jv t;
        if ((rc = eval(r, n->a, e, &t))) return rc;
        return exec_block(r, truthy(&t) ? &n->l1 : &n->l2, e, out);
    }
    case JN_FOR: return exec_for(r, n, e, out);
    case JN_SET: {
        jv v;
        if (n->b) {
            if ((rc = eval(r, n->b, e, &v))) return rc;
        } else {
            jj_buf b = newbuf(r);
            if ((rc = exec_block(r, &n->l1, e, &b))) return rc;
            v = buf_val(&b);
        }
        return assign_target(r, n->a, &v, e);
    }
    case JN_MACRO: {
        jv fn = vfunc(r, F_MACRO, NULL);
        if (fn.t != V_FUNC) return oom(r);
        fn.fn->node = n;
        fn.fn->special = special_args(&n->l1, &n->l2);
        return env_set(r, e, n->s, n->len, fn);
    }
    case JN_CALLSTMT: {
        jv caller = vfunc(r, F_CALLER, NULL);
        if (caller.t != V_FUNC) return oom(r);
        caller.fn->node = n;
        caller.fn->env = e;
        caller.fn->special = special_args(&n->l1, &n->l2);
        jarr *pos;
        jobj *kw;
        if ((rc = eval_args(r, &n->a->l1, e, &pos, &kw))) return rc;
        if (arr_push(r, pos, vobj(V_KWARGS, kw))) return JJ_ERR;
        jv fn;
        if ((rc = eval(r, n->a->a, e, &fn))) return rc;
        if (fn.t != V_FUNC) return fail(r, "Cannot call something that is not a function: got %s", type_name(&fn));
        env *ne = env_new(r, e);
        if (!ne || env_set(r, ne, "caller", 6, caller)) return oom(r);
        jv res;
        if ((rc = call_fn(r, &fn, pos, ne, &res))) return rc;
        if (res.t == V_NULL || res.t == V_UNDEF) return 0;
        return to_str(r, out, &res);
    }
    case JN_FILTERSTMT: {
        jj_buf b = newbuf(r);
        if ((rc = exec_block(r, &n->l1, e, &b))) return rc;
        jv s = buf_val(&b), res;
        if ((rc = apply_filter(r, &s, n->b, e, &res))) return rc;
        if (res.t == V_NULL || res.t == V_UNDEF) return 0;
        return to_str(r, out, &res);
    }
    case JN_BREAK: return JJ_BREAK;
    case JN_CONTINUE: return JJ_CONTINUE;
    default: {
        jv v;
        if ((rc = eval(r, n, e, &v))) return rc;
        if (v.t == V_NULL || v.t == V_UNDEF) return 0;
        return to_str(r, out, &v);
    }
    }
}

static int exec_block(R *r, const jj_list *l, env *e, jj_buf *out) {
    if (++r->depth > JJ_MAX_DEPTH) return fail(r, "template recursion too deep");
    for (size_t i = 0; i < l->n; i++) {
        if (step(r)) return JJ_ERR;
        int rc = exec_stmt(r, l->v[i], e, out);
        if (rc) {
            r->depth--;
            return rc;
        }
    }
    r->depth--;
    return 0;
}

/* ---------------- JSON input ---------------- */

/* Canonical array-index keys come first in JS object key order. */
static int index_key(const char *k, size_t n, double *v) {
    if (n == 0 || n > 10) return 0;
    if (n > 1 && k[0] == '0') return 0;
    double x = 0;
    for (size_t i = 0; i < n; i++) {
        if (k[i] < '0' || k[i] > '9') return 0;
        x = x * 10 + (k[i] - '0');
    }
    if (x >= 4294967295.0) return 0;
    *v = x;
    return 1;
}

static int from_json(R *r, json_t *j, jv *out, int depth) {
    if (depth > JJ_MAX_DEPTH) return fail(r, "context JSON nested too deep");
    switch (json_typeof(j)) {
    case JSON_NULL: *out = V(V_NULL); return 0;
    case JSON_TRUE: *out = vbool(1); return 0;
    case JSON_FALSE: *out = vbool(0); return 0;
    case JSON_INTEGER: *out = vint((double)json_integer_value(j)); return 0;
    case JSON_REAL: {
        double d = json_real_value(j);
        *out = (isfinite(d) && d == floor(d)) ? vint(d) : vfloat(d);
        return 0;
    }
    case JSON_STRING: {
        size_t n = json_string_length(j);
        char *s = jj_strdup(&r->a, json_string_value(j), n);
        if (!s) return oom(r);
        *out = vstr(s, n);
        return 0;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(j);
        jarr *a = arr_new(r, n);
        if (!a) return oom(r);
        for (size_t i = 0; i < n; i++) {
            if (from_json(r, json_array_get(j, i), &a->v[i], depth + 1)) return JJ_ERR;
            a->n = i + 1;
        }
        *out = varr(V_ARRAY, a);
        return 0;
    }
    case JSON_OBJECT: {
        jobj *o = obj_new(r);
        if (!o) return oom(r);
        const char *key;
        json_t *val;
        /* pass 1: index-like keys in ascending order; pass 2: the rest */
        size_t nidx = 0;
        json_object_foreach(j, key, val) {
            double d;
            if (index_key(key, strlen(key), &d)) nidx++;
        }
        if (nidx) {
            double *ks = jj_alloc(&r->a, nidx * sizeof *ks);
            const char **kp = jj_alloc(&r->a, nidx * sizeof *kp);
            if (!ks || !kp) return oom(r);
            size_t c = 0;
            json_object_foreach(j, key, val) {
                double d;
                if (index_key(key, strlen(key), &d)) {
                    size_t p = c++;
                    while (p > 0 && ks[p - 1] > d) { ks[p] = ks[p - 1]; kp[p] = kp[p - 1]; p--; }
                    ks[p] = d;
                    kp[p] = key;
                }
            }
            for (size_t i = 0; i < nidx; i++) {
                jv v;
                if (from_json(r, json_object_get(j, kp[i]), &v, depth + 1)) return JJ_ERR;
                size_t kl = strlen(kp[i]);
                char *kc = jj_strdup(&r->a, kp[i], kl);
                if (!kc || obj_set(r, o, kc, kl, v)) return oom(r);
            }
        }
        json_object_foreach(j, key, val) {
            double d;
            size_t kl = strlen(key);
            if (index_key(key, kl, &d)) continue;
            jv v;
            if (from_json(r, val, &v, depth + 1)) return JJ_ERR;
            char *kc = jj_strdup(&r->a, key, kl);
            if (!kc || obj_set(r, o, kc, kl, v)) return oom(r);
        }
        *out = vobj(V_OBJECT, o);
        return 0;
    }
    }
    *out = V(V_UNDEF);
    return 0;
}

/* ---------------- public API ---------------- */

struct api_jinja_tmpl {
    jj_arena a;
    jj_program prog;
};

int api_jinja_compile(const char *src, api_jinja_tmpl **out, char *err, size_t errlen) {
    char dummy[8];
    if (!err || errlen == 0) { err = dummy; errlen = sizeof dummy; }
    err[0] = 0;
    *out = NULL;
    if (!src) {
        snprintf(err, errlen, "no template");
        return D2_EINVAL;
    }
    api_jinja_tmpl *t = calloc(1, sizeof *t);
    if (!t) return D2_ENOMEM;
    t->a.limit = API_JINJA_MAX_MEMORY;
    jj_tok *toks;
    size_t ntok;
    if (jj_lex(&t->a, src, strlen(src), &toks, &ntok, err, errlen) ||
        jj_parse(&t->a, toks, ntok, &t->prog, err, errlen)) {
        api_jinja_free(t);
        return D2_EINVAL;
    }
    *out = t;
    return D2_OK;
}

void api_jinja_free(api_jinja_tmpl *t) {
    if (!t) return;
    jj_arena_free(&t->a);
    free(t);
}

static const char *const GLOBALS[] = {"false", "true", "none", "raise_exception", "range",
                                      "strftime_now", "True", "False", "None", "namespace"};

int api_jinja_render_at(const api_jinja_tmpl *t, json_t *context, const struct tm *now, char **out,
                        size_t *out_len, char *err, size_t errlen) {
    char dummy[8];
    if (!err || errlen == 0) { err = dummy; errlen = sizeof dummy; }
    err[0] = 0;
    *out = NULL;
    if (out_len) *out_len = 0;
    if (!t || (context && !json_is_object(context))) {
        snprintf(err, errlen, "render needs a template and a JSON object context");
        return D2_EINVAL;
    }
    R r;
    memset(&r, 0, sizeof r);
    r.a.limit = API_JINJA_MAX_MEMORY;
    r.err = err;
    r.errlen = errlen;
    if (now) {
        r.now = *now;
        r.have_now = 1;
    }
    int status = D2_OK;
    env *g = env_new(&r, NULL);
    jv nsf = vfunc(&r, F_NAMESPACE, NULL);
    if (!g || nsf.t != V_FUNC) {
        status = D2_ENOMEM;
        goto done;
    }
    r.ns_fn = nsf.fn;
    {
        jv f;
        int bad = env_set(&r, g, "false", 5, vbool(0)) || env_set(&r, g, "true", 4, vbool(1)) ||
                  env_set(&r, g, "none", 4, V(V_NULL));
        f = vfunc(&r, F_RAISE, NULL);
        bad = bad || f.t != V_FUNC || env_set(&r, g, "raise_exception", 15, f);
        f = vfunc(&r, F_RANGE, NULL);
        bad = bad || f.t != V_FUNC || env_set(&r, g, "range", 5, f);
        f = vfunc(&r, F_STRFTIME, NULL);
        bad = bad || f.t != V_FUNC || env_set(&r, g, "strftime_now", 12, f);
        bad = bad || env_set(&r, g, "True", 4, vbool(1)) || env_set(&r, g, "False", 5, vbool(0)) ||
              env_set(&r, g, "None", 4, V(V_NULL));
        if (bad) {
            status = D2_ENOMEM;
            goto done;
        }
    }
    if (context) {
        const char *key;
        json_t *val;
        json_object_foreach(context, key, val) {
            size_t kl = strlen(key);
            for (size_t i = 0; i < sizeof GLOBALS / sizeof GLOBALS[0]; i++)
                if (strcmp(key, GLOBALS[i]) == 0) {
                    fail(&r, "Variable already declared: %s", key);
                    status = D2_EINVAL;
                    goto done;
                }
            jv v;
            char *kc = jj_strdup(&r.a, key, kl);
            if (!kc || from_json(&r, val, &v, 0) || env_set(&r, g, kc, kl, v)) {
                status = r.has_err ? D2_EINVAL : D2_ENOMEM;
                goto done;
            }
        }
    }
    {
        jj_buf b = newbuf(&r);
        int rc = exec_block(&r, &t->prog.body, g, &b);
        if (rc == JJ_BREAK || rc == JJ_CONTINUE) {
            fail(&r, "break or continue outside of a loop");
            rc = JJ_ERR;
        }
        if (rc) {
            status = D2_EINVAL;
            goto done;
        }
        char *s = malloc(b.len + 1);
        if (!s) {
            status = D2_ENOMEM;
            goto done;
        }
        if (b.len) memcpy(s, b.p, b.len);
        s[b.len] = 0;
        *out = s;
        if (out_len) *out_len = b.len;
    }
done:
    if (status == D2_ENOMEM && !r.has_err) snprintf(err, errlen, "out of memory");
    jj_arena_free(&r.a);
    return status;
}

int api_jinja_render(const api_jinja_tmpl *t, json_t *context, char **out, size_t *out_len,
                     char *err, size_t errlen) {
    return api_jinja_render_at(t, context, NULL, out, out_len, err, errlen);
}
