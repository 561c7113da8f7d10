/*
 * api/jinja/parse.c — recursive-descent parser of the chat-template
 * interpreter (api/jinja/jinja.h). Called only by api/jinja/eval.c through
 * api/jinja/jinja_int.h.
 *
 * The grammar and its precedence follow @huggingface/jinja's parser exactly
 * (e.g. filters bind tighter than unary minus's operand chain, `is` tests sit
 * between ** and |, `a if b` without else is a "select" expression), so that
 * the same templates parse and the same ones are rejected. Nesting depth is
 * bounded by JJ_MAX_DEPTH.
 */
#include "api/jinja/jinja_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct parser {
    jj_arena *a;
    const jj_tok *t;
    size_t n, cur;
    int depth;
    char *err;
    size_t errlen;
    int failed;
} parser;

#define P_FAIL(P, ...)                                                         \
    do {                                                                       \
        if (!(P)->failed) snprintf((P)->err, (P)->errlen, __VA_ARGS__);        \
        (P)->failed = 1;                                                       \
        return NULL;                                                           \
    } while (0)

static jj_node *new_node(parser *P, jj_node_type t) {
    jj_node *x = jj_alloc(P->a, sizeof *x);
    if (!x) {
        if (!P->failed) snprintf(P->err, P->errlen, "out of memory");
        P->failed = 1;
    } else {
        x->type = t;
    }
    return x;
}

static int list_push(parser *P, jj_list *l, jj_node *x) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 4;
        jj_node **v = jj_alloc(P->a, cap * sizeof *v);
        if (!v) {
            if (!P->failed) snprintf(P->err, P->errlen, "out of memory");
            P->failed = 1;
            return -1;
        }
        if (l->n) memcpy(v, l->v, l->n * sizeof *v);
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = x;
    return 0;
}

static int is_t(const parser *P, jj_tok_type t) { return P->cur < P->n && P->t[P->cur].type == t; }
static int is_ident(const parser *P, const char *name) {
    return P->cur < P->n && P->t[P->cur].type == JT_IDENT && strcmp(P->t[P->cur].s, name) == 0;
}
static int is_ident2(const parser *P, const char *a, const char *b) {
    return P->cur + 1 < P->n && P->t[P->cur].type == JT_IDENT && strcmp(P->t[P->cur].s, a) == 0 &&
           P->t[P->cur + 1].type == JT_IDENT && strcmp(P->t[P->cur + 1].s, b) == 0;
}
/* {% name ... with name one of the given (NULL-terminated) */
static int is_stmt(const parser *P, const char *const *names) {
    if (!(P->cur + 1 < P->n && P->t[P->cur].type == JT_OPEN_STMT &&
          P->t[P->cur + 1].type == JT_IDENT))
        return 0;
    for (; *names; names++)
        if (strcmp(P->t[P->cur + 1].s, *names) == 0) return 1;
    return 0;
}

static const jj_tok *expect(parser *P, jj_tok_type t, const char *what) {
    if (P->cur >= P->n || P->t[P->cur].type != t) {
        if (!P->failed) snprintf(P->err, P->errlen, "Parser Error: %s", what);
        P->failed = 1;
        return NULL;
    }
    return &P->t[P->cur++];
}

static int expect_ident(parser *P, const char *name) {
    if (!is_ident(P, name)) {
        if (!P->failed) snprintf(P->err, P->errlen, "Expected %s", name);
        P->failed = 1;
        return -1;
    }
    P->cur++;
    return 0;
}

static jj_node *parse_any(parser *P);
static jj_node *parse_expr(parser *P);
static jj_node *parse_primary(parser *P);
static jj_node *parse_call(parser *P, jj_node *callee);
static jj_node *parse_member(parser *P, jj_node *obj);

/* Parses statements into l until is_stmt(stop). */
static int parse_until(parser *P, jj_list *l, const char *const *stop) {
    while (!is_stmt(P, stop)) {
        if (P->cur >= P->n) {
            if (!P->failed) snprintf(P->err, P->errlen, "Unexpected end of template");
            P->failed = 1;
            return -1;
        }
        jj_node *x = parse_any(P);
        if (!x || list_push(P, l, x)) return -1;
    }
    return 0;
}

static jj_node *parse_seq(parser *P, int primary) {
    jj_node *first = primary ? parse_primary(P) : parse_expr(P);
    if (!first) return NULL;
    if (!is_t(P, JT_COMMA)) return first;
    jj_node *tup = new_node(P, JN_TUPLE);
    if (!tup || list_push(P, &tup->l1, first)) return NULL;
    while (1) {
        P->cur++;
        jj_node *x = primary ? parse_primary(P) : parse_expr(P);
        if (!x || list_push(P, &tup->l1, x)) return NULL;
        if (!is_t(P, JT_COMMA)) break;
    }
    return tup;
}

/* mode 0 = call arguments, 1 = parameter declarations */
static int parse_args_list(parser *P, jj_list *out, int mode) {
    int saw_kw = 0, saw_spread = 0;
    while (!is_t(P, JT_RPAREN)) {
        if (P->cur >= P->n) {
            if (!P->failed) snprintf(P->err, P->errlen, "Unexpected end of arguments");
            P->failed = 1;
            return -1;
        }
        int kwspread = is_t(P, JT_POW);
        int spread = is_t(P, JT_MUL) && strcmp(P->t[P->cur].s, "*") == 0;
        if (mode == 1 && (kwspread || spread)) {
            snprintf(P->err, P->errlen, "Argument unpacking is not allowed in parameter declarations");
            P->failed = 1;
            return -1;
        }
        if (kwspread) {
            P->cur++;
            jj_node *x = new_node(P, JN_KWSPREAD);
            if (!x || !(x->a = parse_expr(P)) || list_push(P, out, x)) return -1;
            if (is_t(P, JT_COMMA)) P->cur++;
            if (!is_t(P, JT_RPAREN)) {
                snprintf(P->err, P->errlen, "Expected closing parenthesis: `**` must be applied to the final argument");
                P->failed = 1;
                return -1;
            }
            break;
        }
        jj_node *arg;
        if (spread) {
            if (saw_spread) {
                snprintf(P->err, P->errlen, "Only one `*` argument unpacking is allowed");
                P->failed = 1;
                return -1;
            }
            saw_spread = 1;
            P->cur++;
            arg = new_node(P, JN_SPREAD);
            if (!arg || !(arg->a = parse_expr(P))) return -1;
        } else {
            arg = parse_expr(P);
            if (!arg) return -1;
            if (is_t(P, JT_EQUALS)) {
                P->cur++;
                if (arg->type != JN_IDENT) {
                    snprintf(P->err, P->errlen, "Expected identifier for keyword argument");
                    P->failed = 1;
                    return -1;
                }
                jj_node *kw = new_node(P, JN_KWARG);
                if (!kw) return -1;
                kw->s = arg->s;
                kw->len = arg->len;
                if (!(kw->a = parse_expr(P))) return -1;
                arg = kw;
            }
            if (mode == 1) {
                if (arg->type != JN_IDENT && arg->type != JN_KWARG) {
                    snprintf(P->err, P->errlen, "Expected identifier for parameter declaration");
                    P->failed = 1;
                    return -1;
                }
                for (size_t i = 0; i < out->n; i++)
                    if (strcmp(out->v[i]->s, arg->s) == 0) {
                        snprintf(P->err, P->errlen, "Duplicate parameter name: %s", arg->s);
                        P->failed = 1;
                        return -1;
                    }
            }
            if (arg->type == JN_KWARG) {
                saw_kw = 1;
            } else if (saw_kw) {
                snprintf(P->err, P->errlen, mode == 0 ? "Positional arguments must come before keyword arguments"
                                                      : "Non-default argument follows default argument");
                P->failed = 1;
                return -1;
            } else if (saw_spread) {
                snprintf(P->err, P->errlen, "Positional arguments must not follow `*` argument unpacking");
                P->failed = 1;
                return -1;
            }
        }
        if (list_push(P, out, arg)) return -1;
        if (is_t(P, JT_COMMA)) P->cur++;
    }
    return 0;
}

static int parse_args(parser *P, jj_list *out, int mode) {
    if (!expect(P, JT_LPAREN, "Expected opening parenthesis for arguments list")) return -1;
    if (parse_args_list(P, out, mode)) return -1;
    if (!expect(P, JT_RPAREN, "Expected closing parenthesis for arguments list")) return -1;
    return 0;
}

static jj_node *parse_primary(parser *P) {
    if (P->cur >= P->n) P_FAIL(P, "Unexpected end of template");
    if (++P->depth > JJ_MAX_DEPTH) P_FAIL(P, "template nesting too deep");
    const jj_tok *tk = &P->t[P->cur++];
    jj_node *x = NULL;
    switch (tk->type) {
    case JT_NUM: {
        int isf = strchr(tk->s, '.') != NULL;
        x = new_node(P, isf ? JN_FLOAT : JN_INT);
        if (x) x->num = strtod(tk->s, NULL);
        break;
    }
    case JT_STR: {
        x = new_node(P, JN_STR);
        if (!x) break;
        if (!is_t(P, JT_STR)) {
            x->s = tk->s;
            x->len = tk->len;
            break;
        }
        jj_buf b = {P->a, NULL, 0, 0, 0};
        if (jj_buf_put(&b, tk->s, tk->len)) P_FAIL(P, "out of memory");
        while (is_t(P, JT_STR)) {
            if (jj_buf_put(&b, P->t[P->cur].s, P->t[P->cur].len)) P_FAIL(P, "out of memory");
            P->cur++;
        }
        x->s = b.p ? b.p : "";
        x->len = b.len;
        break;
    }
    case JT_IDENT:
        x = new_node(P, JN_IDENT);
        if (x) {
            x->s = tk->s;
            x->len = tk->len;
        }
        break;
    case JT_LPAREN:
        x = parse_seq(P, 0);
        if (x && !expect(P, JT_RPAREN, "Expected closing parenthesis")) x = NULL;
        break;
    case JT_LBRACKET:
        x = new_node(P, JN_ARRAY);
        if (!x) break;
        while (!is_t(P, JT_RBRACKET)) {
            jj_node *e = parse_expr(P);
            if (!e || list_push(P, &x->l1, e)) { x = NULL; break; }
            if (is_t(P, JT_COMMA)) P->cur++;
        }
        if (x) P->cur++;
        break;
    case JT_LBRACE:
        x = new_node(P, JN_OBJECT);
        if (!x) break;
        while (!is_t(P, JT_RBRACE)) {
            jj_node *k = parse_expr(P);
            if (!k || !expect(P, JT_COLON, "Expected colon between key and value in object literal")) {
                x = NULL;
                break;
            }
            jj_node *v = parse_expr(P);
            if (!v) { x = NULL; break; }
            /* A Map keyed by AST nodes: every literal key is a new entry. */
            if (list_push(P, &x->l1, k) || list_push(P, &x->l2, v)) { x = NULL; break; }
            if (is_t(P, JT_COMMA)) P->cur++;
        }
        if (x) P->cur++;
        break;
    default:
        P->depth--;
        P_FAIL(P, "Unexpected token: %s", tk->s);
    }
    P->depth--;
    return P->failed ? NULL : x;
}

static jj_node *parse_member_args(parser *P) {
    jj_node *sl[8] = {0};
    int n = 0, is_slice = 0;
    while (!is_t(P, JT_RBRACKET)) {
        if (P->cur >= P->n) P_FAIL(P, "Unexpected end of template");
        if (n >= 4) P_FAIL(P, "Expected 0-3 arguments for slice expression");
        if (is_t(P, JT_COLON)) {
            sl[n++] = NULL;
            P->cur++;
            is_slice = 1;
        } else {
            if (!(sl[n++] = parse_expr(P))) return NULL;
            if (is_t(P, JT_COLON)) {
                P->cur++;
                is_slice = 1;
            }
        }
    }
    if (n == 0) P_FAIL(P, "Expected at least one argument for member/slice expression");
    if (is_slice) {
        if (n > 3) P_FAIL(P, "Expected 0-3 arguments for slice expression");
        jj_node *s = new_node(P, JN_SLICE);
        if (!s) return NULL;
        s->a = sl[0];
        s->b = sl[1];
        s->c = sl[2];
        return s;
    }
    return sl[0];
}

static jj_node *parse_member(parser *P, jj_node *obj) {
    while (obj && (is_t(P, JT_DOT) || is_t(P, JT_LBRACKET))) {
        int computed = is_t(P, JT_LBRACKET);
        P->cur++;
        jj_node *m = new_node(P, JN_MEMBER);
        if (!m) return NULL;
        m->a = obj;
        m->flag = computed;
        if (computed) {
            if (!(m->b = parse_member_args(P))) return NULL;
            if (!expect(P, JT_RBRACKET, "Expected closing square bracket")) return NULL;
        } else {
            if (!(m->b = parse_primary(P))) return NULL;
            if (m->b->type != JN_IDENT && m->b->type != JN_INT)
                P_FAIL(P, "Expected identifier or integer following dot operator");
        }
        obj = m;
    }
    return obj;
}

static jj_node *parse_call(parser *P, jj_node *callee) {
    if (++P->depth > JJ_MAX_DEPTH) P_FAIL(P, "template nesting too deep");
    jj_node *c = new_node(P, JN_CALL);
    if (!c) return NULL;
    c->a = callee;
    if (parse_args(P, &c->l1, 0)) return NULL;
    jj_node *e = parse_member(P, c);
    if (e && is_t(P, JT_LPAREN)) e = parse_call(P, e);
    P->depth--;
    return e;
}

static jj_node *parse_call_member(parser *P) {
    jj_node *m = parse_member(P, parse_primary(P));
    if (m && is_t(P, JT_LPAREN)) return parse_call(P, m);
    return m;
}

static jj_node *parse_unary_sign(parser *P) {
    if (P->cur < P->n && (P->t[P->cur].type == JT_UNARY || P->t[P->cur].type == JT_ADD) &&
        (strcmp(P->t[P->cur].s, "-") == 0 || strcmp(P->t[P->cur].s, "+") == 0)) {
        if (++P->depth > JJ_MAX_DEPTH) P_FAIL(P, "template nesting too deep");
        jj_node *u = new_node(P, JN_UNARY);
        if (!u) return NULL;
        u->op = P->t[P->cur].s[0] == '-' ? JO_NEG : JO_POS;
        P->cur++;
        if (!(u->a = parse_unary_sign(P))) return NULL;
        P->depth--;
        return u;
    }
    return parse_call_member(P);
}

static jj_node *parse_filter(parser *P) {
    jj_node *x = parse_unary_sign(P);
    while (x && is_t(P, JT_PIPE)) {
        P->cur++;
        jj_node *f = parse_primary(P);
        if (!f) return NULL;
        if (f->type != JN_IDENT) P_FAIL(P, "Expected identifier for the filter");
        if (is_t(P, JT_LPAREN)) f = parse_call(P, f);
        if (!f) return NULL;
        jj_node *fe = new_node(P, JN_FILTER);
        if (!fe) return NULL;
        fe->a = x;
        fe->b = f;
        x = fe;
    }
    return x;
}

static jj_node *parse_test(parser *P) {
    jj_node *x = parse_filter(P);
    while (x && is_ident(P, "is")) {
        P->cur++;
        int neg = is_ident(P, "not");
        if (neg) P->cur++;
        jj_node *f = parse_primary(P);
        if (!f) return NULL;
        if (f->type != JN_IDENT) P_FAIL(P, "Expected identifier for the test");
        jj_node *t = new_node(P, JN_TEST);
        if (!t) return NULL;
        t->a = x;
        t->s = f->s;
        t->len = f->len;
        t->flag = neg;
        x = t;
    }
    return x;
}

static jj_node *binary(parser *P, jj_op op, jj_node *l, jj_node *r) {
    if (!l || !r) return NULL;
    jj_node *b = new_node(P, JN_BINARY);
    if (!b) return NULL;
    b->op = op;
    b->a = l;
    b->b = r;
    return b;
}

static jj_node *parse_pow(parser *P) {
    jj_node *x = parse_test(P);
    while (x && is_t(P, JT_POW)) {
        P->cur++;
        x = binary(P, JO_POW, x, parse_test(P));
    }
    return x;
}

static jj_node *parse_mul(parser *P) {
    jj_node *x = parse_pow(P);
    while (x && is_t(P, JT_MUL)) {
        const char *s = P->t[P->cur++].s;
        jj_op op = strcmp(s, "*") == 0 ? JO_MUL : strcmp(s, "/") == 0 ? JO_DIV
                 : strcmp(s, "//") == 0 ? JO_FLOORDIV : JO_MOD;
        x = binary(P, op, x, parse_pow(P));
    }
    return x;
}

static jj_node *parse_add(parser *P) {
    jj_node *x = parse_mul(P);
    while (x && is_t(P, JT_ADD)) {
        const char *s = P->t[P->cur++].s;
        jj_op op = s[0] == '+' ? JO_ADD : s[0] == '-' ? JO_SUB : JO_CONCAT;
        x = binary(P, op, x, parse_mul(P));
    }
    return x;
}

static jj_node *parse_cmp(parser *P) {
    jj_node *x = parse_add(P);
    while (x) {
        jj_op op;
        if (is_ident2(P, "not", "in")) {
            op = JO_NOTIN;
            P->cur += 2;
        } else if (is_ident(P, "in")) {
            op = JO_IN;
            P->cur++;
        } else if (is_t(P, JT_CMP)) {
            const char *s = P->t[P->cur++].s;
            op = strcmp(s, "==") == 0 ? JO_EQ : strcmp(s, "!=") == 0 ? JO_NE
               : strcmp(s, "<") == 0 ? JO_LT : strcmp(s, ">") == 0 ? JO_GT
               : strcmp(s, "<=") == 0 ? JO_LE : JO_GE;
        } else {
            break;
        }
        x = binary(P, op, x, parse_add(P));
    }
    return x;
}

static jj_node *parse_not(parser *P) {
    jj_node *r = NULL;
    while (is_ident(P, "not")) {
        if (++P->depth > JJ_MAX_DEPTH) P_FAIL(P, "template nesting too deep");
        P->cur++;
        jj_node *arg = parse_not(P);
        P->depth--;
        if (!arg) return NULL;
        r = new_node(P, JN_UNARY);
        if (!r) return NULL;
        r->op = JO_NOT;
        r->a = arg;
    }
    return r ? r : parse_cmp(P);
}

static jj_node *parse_and(parser *P) {
    jj_node *x = parse_not(P);
    while (x && is_ident(P, "and")) {
        P->cur++;
        x = binary(P, JO_AND, x, parse_not(P));
    }
    return x;
}

static jj_node *parse_or(parser *P) {
    jj_node *x = parse_and(P);
    while (x && is_ident(P, "or")) {
        P->cur++;
        x = binary(P, JO_OR, x, parse_and(P));
    }
    return x;
}

static jj_node *parse_if_expr(parser *P) {
    jj_node *a = parse_or(P);
    if (a && is_ident(P, "if")) {
        P->cur++;
        jj_node *test = parse_or(P);
        if (!test) return NULL;
        if (is_ident(P, "else")) {
            P->cur++;
            if (++P->depth > JJ_MAX_DEPTH) P_FAIL(P, "template nesting too deep");
            jj_node *f = parse_if_expr(P);
            P->depth--;
            if (!f) return NULL;
            jj_node *t = new_node(P, JN_TERNARY);
            if (!t) return NULL;
            t->a = test;
            t->b = a;
            t->c = f;
            return t;
        }
        jj_node *s = new_node(P, JN_SELECT);
        if (!s) return NULL;
        s->a = a;
        s->b = test;
        return s;
    }
    return a;
}

static jj_node *parse_expr(parser *P) {
    if (++P->depth > JJ_MAX_DEPTH) P_FAIL(P, "template nesting too deep");
    jj_node *x = parse_if_expr(P);
    P->depth--;
    return P->failed ? NULL : x;
}

static const char *const STOP_IF[] = {"elif", "else", "endif", NULL};
static const char *const STOP_ENDIF[] = {"endif", NULL};
static const char *const STOP_FOR[] = {"endfor", "else", NULL};
static const char *const STOP_ENDFOR[] = {"endfor", NULL};
static const char *const STOP_ENDSET[] = {"endset", NULL};
static const char *const STOP_ENDMACRO[] = {"endmacro", NULL};
static const char *const STOP_ENDCALL[] = {"endcall", NULL};
static const char *const STOP_ENDFILTER[] = {"endfilter", NULL};

static jj_node *parse_if_stmt(parser *P) {
    if (++P->depth > JJ_MAX_DEPTH) P_FAIL(P, "template nesting too deep");
    jj_node *x = new_node(P, JN_IF);
    if (!x || !(x->a = parse_expr(P))) return NULL;
    if (!expect(P, JT_CLOSE_STMT, "Expected closing statement token")) return NULL;
    if (parse_until(P, &x->l1, STOP_IF)) return NULL;
    if (is_stmt(P, (const char *const[]){"elif", NULL})) {
        P->cur += 2;
        jj_node *e = parse_if_stmt(P);
        if (!e || list_push(P, &x->l2, e)) return NULL;
    } else if (is_stmt(P, (const char *const[]){"else", NULL})) {
        P->cur += 2;
        if (!expect(P, JT_CLOSE_STMT, "Expected closing statement token")) return NULL;
        if (parse_until(P, &x->l2, STOP_ENDIF)) return NULL;
    }
    P->depth--;
    return x;
}

static int end_tag(parser *P, const char *name) {
    if (!expect(P, JT_OPEN_STMT, "Expected {% token")) return -1;
    if (expect_ident(P, name)) return -1;
    if (!expect(P, JT_CLOSE_STMT, "Expected %} token")) return -1;
    return 0;
}

static jj_node *parse_stmt(parser *P) {
    if (!expect(P, JT_OPEN_STMT, "Expected opening statement token")) return NULL;
    if (!is_t(P, JT_IDENT)) P_FAIL(P, "Unknown statement");
    const char *name = P->t[P->cur].s;
    jj_node *x = NULL;
    if (strcmp(name, "set") == 0) {
        P->cur++;
        x = new_node(P, JN_SET);
        if (!x || !(x->a = parse_seq(P, 0))) return NULL;
        if (is_t(P, JT_EQUALS)) {
            P->cur++;
            if (!(x->b = parse_seq(P, 0))) return NULL;
        } else {
            if (!expect(P, JT_CLOSE_STMT, "Expected %} token")) return NULL;
            if (parse_until(P, &x->l1, STOP_ENDSET)) return NULL;
            if (!expect(P, JT_OPEN_STMT, "Expected {% token")) return NULL;
            if (expect_ident(P, "endset")) return NULL;
        }
        if (!expect(P, JT_CLOSE_STMT, "Expected closing statement token")) return NULL;
    } else if (strcmp(name, "if") == 0) {
        P->cur++;
        if (!(x = parse_if_stmt(P)) || end_tag(P, "endif")) return NULL;
    } else if (strcmp(name, "macro") == 0) {
        P->cur++;
        jj_node *nm = parse_primary(P);
        if (!nm) return NULL;
        if (nm->type != JN_IDENT) P_FAIL(P, "Expected identifier following macro statement");
        x = new_node(P, JN_MACRO);
        if (!x) return NULL;
        x->s = nm->s;
        x->len = nm->len;
        if (parse_args(P, &x->l1, 1)) return NULL;
        if (!expect(P, JT_CLOSE_STMT, "Expected closing statement token")) return NULL;
        if (parse_until(P, &x->l2, STOP_ENDMACRO) || end_tag(P, "endmacro")) return NULL;
    } else if (strcmp(name, "for") == 0) {
        P->cur++;
        x = new_node(P, JN_FOR);
        if (!x || !(x->a = parse_seq(P, 1))) return NULL;
        if (x->a->type != JN_IDENT && x->a->type != JN_TUPLE)
            P_FAIL(P, "Expected identifier/tuple for the loop variable");
        if (!is_ident(P, "in")) P_FAIL(P, "Expected `in` keyword following loop variable");
        P->cur++;
        if (!(x->b = parse_expr(P))) return NULL;
        if (!expect(P, JT_CLOSE_STMT, "Expected closing statement token")) return NULL;
        if (parse_until(P, &x->l1, STOP_FOR)) return NULL;
        if (is_stmt(P, (const char *const[]){"else", NULL})) {
            P->cur += 2;
            if (!expect(P, JT_CLOSE_STMT, "Expected closing statement token")) return NULL;
            if (parse_until(P, &x->l2, STOP_ENDFOR)) return NULL;
        }
        if (end_tag(P, "endfor")) return NULL;
    } else if (strcmp(name, "call") == 0) {
        P->cur++;
        x = new_node(P, JN_CALLSTMT);
        if (!x) return NULL;
        if (is_t(P, JT_LPAREN)) {
            x->flag = 1;
            if (parse_args(P, &x->l1, 1)) return NULL;
        }
        jj_node *callee = parse_primary(P);
        if (!callee) return NULL;
        if (callee->type != JN_IDENT) P_FAIL(P, "Expected identifier following call statement");
        jj_node *c = new_node(P, JN_CALL);
        if (!c) return NULL;
        c->a = callee;
        if (parse_args(P, &c->l1, 0)) return NULL;
        x->a = c;
        if (!expect(P, JT_CLOSE_STMT, "Expected closing statement token")) return NULL;
        if (parse_until(P, &x->l2, STOP_ENDCALL) || end_tag(P, "endcall")) return NULL;
    } else if (strcmp(name, "break") == 0 || strcmp(name, "continue") == 0) {
        x = new_node(P, name[0] == 'b' ? JN_BREAK : JN_CONTINUE);
        P->cur++;
        if (!x || !expect(P, JT_CLOSE_STMT, "Expected closing statement token")) return NULL;
    } else if (strcmp(name, "filter") == 0) {
        P->cur++;
        x = new_node(P, JN_FILTERSTMT);
        if (!x) return NULL;
        jj_node *f = parse_primary(P);
        if (!f) return NULL;
        if (f->type == JN_IDENT && is_t(P, JT_LPAREN)) f = parse_call(P, f);
        if (!f) return NULL;
        x->b = f;
        if (!expect(P, JT_CLOSE_STMT, "Expected closing statement token")) return NULL;
        if (parse_until(P, &x->l1, STOP_ENDFILTER) || end_tag(P, "endfilter")) return NULL;
    } else {
        P_FAIL(P, "Unknown statement type: %s", name);
    }
    return x;
}

static jj_node *parse_any(parser *P) {
    if (P->cur >= P->n) P_FAIL(P, "Unexpected end of template");
    if (++P->depth > JJ_MAX_DEPTH) P_FAIL(P, "template nesting too deep");
    const jj_tok *tk = &P->t[P->cur];
    jj_node *x = NULL;
    switch (tk->type) {
    case JT_COMMENT:
        x = new_node(P, JN_COMMENT);
        P->cur++;
        break;
    case JT_TEXT:
        x = new_node(P, JN_STR);
        if (x) {
            x->s = tk->s;
            x->len = tk->len;
        }
        P->cur++;
        break;
    case JT_OPEN_STMT:
        x = parse_stmt(P);
        break;
    case JT_OPEN_EXPR:
        P->cur++;
        x = parse_expr(P);
        if (x && !expect(P, JT_CLOSE_EXPR, "Expected closing expression token")) x = NULL;
        break;
    default:
        P_FAIL(P, "Unexpected token type: %s", tk->s);
    }
    P->depth--;
    return P->failed ? NULL : x;
}

int jj_parse(jj_arena *a, const jj_tok *toks, size_t ntok, jj_program *prog, char *err,
             size_t errlen) {
    parser P = {a, toks, ntok, 0, 0, err, errlen, 0};
    memset(prog, 0, sizeof *prog);
    while (P.cur < P.n) {
        jj_node *x = parse_any(&P);
        if (!x || list_push(&P, &prog->body, x)) {
            if (!P.failed) snprintf(err, errlen, "parse error");
            return -1;
        }
    }
    return 0;
}
