/*
 * engine/tok/tok_pretok.c — hand-written matchers for the pre-tokenizer regexes
 * that tokenizer.json files and GGUF "tokenizer.ggml.pre" use (GPT-2,
 * Llama-3, Qwen2). Each matcher returns the length of the leftmost match at a
 * position, choosing among the alternatives in order and backtracking exactly
 * as a backtracking regex engine (Oniguruma, JS) does for these patterns.
 * Every code point is covered by some alternative, so the matches tile the
 * text. Callers: engine/tok/tokenizer.c only. Pure, thread-safe.
 */
#include <string.h>

#include "engine/tok/tok_internal.h"

static const char RE_GPT2[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";
static const char RE_LLAMA3[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
static const char RE_QWEN2[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

eng__tok_pat eng__tok_pat_from_regex(const char *re) {
    if (!re) return ENG__TOK_PAT_NONE;
    if (strcmp(re, RE_GPT2) == 0) return ENG__TOK_PAT_GPT2;
    if (strcmp(re, RE_LLAMA3) == 0) return ENG__TOK_PAT_LLAMA3;
    if (strcmp(re, RE_QWEN2) == 0) return ENG__TOK_PAT_QWEN2;
    return ENG__TOK_PAT_NONE;
}

static inline uint32_t lower_ascii(uint32_t c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* Contraction 's 't 're 've 'm 'll 'd at i; ci: ASCII case-insensitive. */
static size_t contraction(const uint32_t *c, size_t n, size_t i, bool ci) {
    if (c[i] != '\'' || i + 1 >= n) return 0;
    uint32_t a = ci ? lower_ascii(c[i + 1]) : c[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 >= n) return 0;
    uint32_t b = ci ? lower_ascii(c[i + 2]) : c[i + 2];
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
}

typedef bool (*ws_fn)(uint32_t);

static inline bool is_other(uint32_t cp, ws_fn ws) {
    return !ws(cp) && !eng__tok_is_letter(cp) && !eng__tok_is_number(cp);
}

/* \s+(?!\S)|\s+ at i (c[i] is whitespace). */
static size_t ws_tail(const uint32_t *c, size_t n, size_t i, ws_fn ws) {
    size_t j = i;
    while (j < n && ws(c[j])) j++;
    if (j == n) return j - i;
    if (j - i >= 2) return j - i - 1; /* leave the last one to join the next token */
    return 1;                          /* \s+ */
}

static size_t match_gpt2(const uint32_t *c, size_t n, size_t i, ws_fn ws) {
    size_t l = contraction(c, n, i, false);
    if (l) return l;
    size_t s = (c[i] == ' ' && i + 1 < n) ? 1 : 0; /* the optional leading space */
    for (int pass = 0; pass < 2; pass++) {
        size_t st = i + (pass == 0 ? s : 0);
        if (pass == 1 && s == 0) break;
        if (st >= n) continue;
        size_t j = st;
        if (eng__tok_is_letter(c[st])) {
            while (j < n && eng__tok_is_letter(c[j])) j++;
            return j - i;
        }
        if (eng__tok_is_number(c[st])) {
            while (j < n && eng__tok_is_number(c[j])) j++;
            return j - i;
        }
        if (is_other(c[st], ws)) {
            while (j < n && is_other(c[j], ws)) j++;
            return j - i;
        }
    }
    /* Here c[i] is whitespace (a non-space, non-L/N char would be "other"). */
    return ws_tail(c, n, i, ws);
}

static size_t match_llama3(const uint32_t *c, size_t n, size_t i, bool digits3) {
    ws_fn ws = eng__tok_is_ws;
    size_t l = contraction(c, n, i, true);
    if (l) return l;
    uint32_t c0 = c[i];
    bool L0 = eng__tok_is_letter(c0), N0 = eng__tok_is_number(c0);
    /* [^\r\n\p{L}\p{N}]?\p{L}+ */
    if (!L0 && !N0 && c0 != '\r' && c0 != '\n' && i + 1 < n && eng__tok_is_letter(c[i + 1])) {
        size_t j = i + 1;
        while (j < n && eng__tok_is_letter(c[j])) j++;
        return j - i;
    }
    if (L0) {
        size_t j = i;
        while (j < n && eng__tok_is_letter(c[j])) j++;
        return j - i;
    }
    /* \p{N}{1,3} or \p{N} */
    if (N0) {
        size_t j = i, max = digits3 ? 3 : 1;
        while (j < n && j - i < max && eng__tok_is_number(c[j])) j++;
        return j - i;
    }
    /*  ?[^\s\p{L}\p{N}]+[\r\n]* */
    size_t st = (c0 == ' ' && i + 1 < n && is_other(c[i + 1], ws)) ? i + 1 : i;
    if (is_other(c[st], ws)) {
        size_t j = st;
        while (j < n && is_other(c[j], ws)) j++;
        while (j < n && (c[j] == '\r' || c[j] == '\n')) j++;
        return j - i;
    }
    /* c0 is whitespace here. \s*[\r\n]+ : up to the last \r or \n of the run. */
    size_t j = i, last_nl = (size_t)-1;
    while (j < n && ws(c[j])) {
        if (c[j] == '\r' || c[j] == '\n') last_nl = j;
        j++;
    }
    if (last_nl != (size_t)-1) return last_nl + 1 - i;
    return ws_tail(c, n, i, ws);
}

size_t eng__tok_pat_match(eng__tok_pat pat, bool js_ws, const uint32_t *cps, size_t n, size_t i) {
    switch (pat) {
    case ENG__TOK_PAT_GPT2: return match_gpt2(cps, n, i, js_ws ? eng__tok_is_js_ws : eng__tok_is_ws);
    case ENG__TOK_PAT_LLAMA3: return match_llama3(cps, n, i, true);
    case ENG__TOK_PAT_QWEN2: return match_llama3(cps, n, i, false);
    case ENG__TOK_PAT_NONE: break;
    }
    return n - i;
}
