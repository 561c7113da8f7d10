/*
 * engine/kv_budget.c — the one reader of a KV-compression budget, for every
 * place a person writes one: the kv_budget directive, the --kv-budget and
 * --budgets flags, and the "budget" of a request's "kv_compression" object.
 * Contract in engine/engine.h (eng_kv_budget_parse). Pure functions; any
 * thread.
 *
 * The rule is by value, so a budget never means two things: a number in
 * (0, 1] is a share of the prompt (1: as many tokens as the prompt, never one
 * token), an integer of at least 2 written without a decimal point is a count
 * of tokens per layer.
 * Everything else is refused with a reason: "1.5" (a share above the whole),
 * "128.0" (a count is an integer), "0", signs, exponents, trailing bytes.
 */
#include "engine/engine.h"

#include <ctype.h>
#include <stdlib.h>

int eng_kv_budget_number(double x, bool integer, float *frac, int *tokens, const char **why) {
    const char *dummy;
    if (!why) why = &dummy;
    *why = NULL;
    if (!(x > 0.0)) { /* also NaN */
        *why = "a budget must be above 0: a share of the prompt in (0, 1] or a token count >= 2";
        return D2_EINVAL;
    }
    if (x <= 1.0) {
        *frac = (float)x;
        *tokens = 0;
        return D2_OK;
    }
    if (!integer) {
        *why = "a share of the prompt must be in (0, 1]; a token count is written as an integer";
        return D2_EINVAL;
    }
    if (x > (double)ENG_KV_BUDGET_MAX_TOKENS) {
        *why = "a token count must be at most 1073741824";
        return D2_EINVAL;
    }
    *frac = 0.0f;
    *tokens = (int)x;
    return D2_OK;
}

int eng_kv_budget_parse(const char *s, float *frac, int *tokens, const char **why) {
    const char *dummy;
    if (!why) why = &dummy;
    *why = NULL;
    if (!s || !*s) {
        *why = "empty budget: write a share of the prompt in (0, 1] or a token count >= 2";
        return D2_EINVAL;
    }
    /* Digits with at most one '.', and at least one digit: nothing strtod
     * would also take (signs, exponents, hex, inf, spaces). */
    int dots = 0, digits = 0;
    for (const char *p = s; *p; p++) {
        if (*p == '.') dots++;
        else if (isdigit((unsigned char)*p)) digits++;
        else {
            *why = "a budget is written with digits and at most one '.' (0.2, 1, 128)";
            return D2_EINVAL;
        }
    }
    if (dots > 1 || digits == 0) {
        *why = "a budget is written with digits and at most one '.' (0.2, 1, 128)";
        return D2_EINVAL;
    }
    return eng_kv_budget_number(strtod(s, NULL), dots == 0, frac, tokens, why);
}
