/*
 * api/jinja/jinja_int.h — internals shared by api/jinja/lex.c, api/jinja/parse.c and
 * api/jinja/eval.c (the chat-template interpreter of api/jinja/jinja.h). Nothing
 * outside those three files may include it.
 *
 * Memory: everything of a compiled template (source copy, tokens, AST) lives
 * in one arena freed by api_jinja_free; everything of one render lives in a
 * second arena freed when the render returns.
 */
#ifndef D2_API_JINJA_INT_H
#define D2_API_JINJA_INT_H

#include <stddef.h>
#include <stdint.h>

#include "common/utf8.h"

/* ---- arena ---- */
typedef struct jj_chunk jj_chunk;
typedef struct jj_arena {
    jj_chunk *head;
    size_t used;  /* bytes handed out plus chunk overhead */
    size_t limit; /* allocation fails beyond this */
} jj_arena;

void *jj_alloc(jj_arena *a, size_t n);              /* zeroed; NULL when over limit */
char *jj_strdup(jj_arena *a, const char *s, size_t n); /* NUL-terminated copy */
void jj_arena_free(jj_arena *a);

/* ---- growable byte buffer (arena backed) ---- */
typedef struct jj_buf {
    jj_arena *a;
    char *p;
    size_t len, cap;
    size_t max; /* append fails beyond this length */
} jj_buf;
int jj_buf_put(jj_buf *b, const char *s, size_t n); /* 0 or -1 (memory/limit) */

/* ---- JavaScript string helpers on UTF-8 ---- */
/* Decodes one code point at s[i] (len n); returns bytes used (>= 1). Invalid
 * bytes decode as themselves (one byte, code point = byte). */
int jj_utf8_dec(const char *s, size_t n, size_t i, uint32_t *cp);
int jj_js_space(uint32_t cp);            /* JavaScript /\s/ */
int jj_is_word(int c);                   /* JavaScript /\w/ (ASCII) */

/* ---- tokens ---- */
typedef enum jj_tok_type {
    JT_TEXT, JT_NUM, JT_STR, JT_IDENT, JT_EQUALS, JT_LPAREN, JT_RPAREN,
    JT_OPEN_STMT, JT_CLOSE_STMT, JT_OPEN_EXPR, JT_CLOSE_EXPR,
    JT_LBRACKET, JT_RBRACKET, JT_LBRACE, JT_RBRACE, JT_COMMA, JT_DOT,
    JT_COLON, JT_PIPE, JT_ADD, JT_MUL, JT_POW, JT_CMP, JT_UNARY, JT_COMMENT
} jj_tok_type;

typedef struct jj_tok {
    jj_tok_type type;
    const char *s; /* value (arena), NUL-terminated */
    size_t len;
} jj_tok;

/* Lexes src as @huggingface/jinja does with lstrip_blocks and trim_blocks.
 * Returns 0 and the token array, or -1 with a message in err. */
int jj_lex(jj_arena *a, const char *src, size_t n, jj_tok **toks, size_t *ntok, char *err,
           size_t errlen);

/* ---- AST ---- */
typedef enum jj_node_type {
    JN_STR, JN_INT, JN_FLOAT, JN_IDENT, JN_ARRAY, JN_TUPLE, JN_OBJECT,
    JN_MEMBER, JN_SLICE, JN_CALL, JN_UNARY, JN_BINARY, JN_FILTER, JN_TEST,
    JN_SELECT, JN_TERNARY, JN_KWARG, JN_SPREAD, JN_KWSPREAD,
    JN_COMMENT, JN_IF, JN_FOR, JN_SET, JN_MACRO, JN_CALLSTMT, JN_FILTERSTMT,
    JN_BREAK, JN_CONTINUE
} jj_node_type;

typedef enum jj_op {
    JO_NONE, JO_AND, JO_OR, JO_NOT, JO_EQ, JO_NE, JO_LT, JO_GT, JO_LE, JO_GE,
    JO_IN, JO_NOTIN, JO_ADD, JO_SUB, JO_CONCAT, JO_MUL, JO_DIV, JO_FLOORDIV,
    JO_MOD, JO_POW, JO_NEG, JO_POS
} jj_op;

typedef struct jj_node jj_node;
typedef struct jj_list {
    jj_node **v;
    size_t n, cap;
} jj_list;

/* Field use by type:
 *   STR/IDENT/COMMENT: s,len        INT/FLOAT: num
 *   ARRAY/TUPLE: l1                 OBJECT: l1 keys, l2 values
 *   MEMBER: a object, b property, flag computed
 *   SLICE: a start, b stop, c step (each may be NULL)
 *   CALL: a callee, l1 args         UNARY: op, a     BINARY: op, a, b
 *   FILTER: a operand, b filter (IDENT or CALL)
 *   TEST: a operand, s test name, flag negate
 *   SELECT: a value, b test         TERNARY: a cond, b true, c false
 *   KWARG: s key, a value           SPREAD/KWSPREAD: a
 *   IF: a test, l1 body, l2 alternate
 *   FOR: a loop var (IDENT/TUPLE), b iterable, l1 body, l2 else
 *   SET: a assignee, b value (NULL: l1 body)
 *   MACRO: s name, l1 params, l2 body
 *   CALLSTMT: a CALL expression, l1 caller params, l2 body, flag has params
 *   FILTERSTMT: b filter, l1 body */
struct jj_node {
    jj_node_type type;
    jj_op op;
    int flag;
    const char *s;
    size_t len;
    double num;
    jj_node *a, *b, *c;
    jj_list l1, l2;
};

typedef struct jj_program {
    jj_list body;
} jj_program;

/* Parses tokens into prog (nodes in arena a). Returns 0 or -1 with err. */
int jj_parse(jj_arena *a, const jj_tok *toks, size_t ntok, jj_program *prog, char *err,
             size_t errlen);

#define JJ_MAX_DEPTH 200 /* nesting of parser and evaluator recursion */

#endif
