/*
 * daemon/value.c — the value readers shared by the serve directive table
 * (config.c) and the subcommands' option table (opts.c). Contract, rules and
 * messages: daemon/value.h.
 *
 * Callers: daemon/config.c, daemon/opts.c; tests/unit/test_value.c,
 * test_config.c, test_opts.c and tests/fuzz/fuzz_config.c #include this file.
 * No global state.
 */
#include "daemon/value.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "engine/engine.h"

/* ---- message helpers ---------------------------------------------------------- */

const char *dmn_value_shown(const char *s, char *buf, size_t n) {
    size_t j = 0;
    for (size_t i = 0; s[i] && j + 4 < n; i++) {
        if (j >= 60) {
            memcpy(buf + j, "...", 3);
            j += 3;
            break;
        }
        unsigned char c = (unsigned char)s[i];
        buf[j++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    buf[j] = '\0';
    return buf;
}

const char *dmn_value_num(double v, char *buf, size_t n) {
    if (v == floor(v) && fabs(v) < 1e15) snprintf(buf, n, "%.0f", v);
    else snprintf(buf, n, "%g", v);
    return buf;
}

const char *dmn_value_names(const char *const *names, const char *sep, char *buf, size_t n) {
    size_t j = 0;
    buf[0] = '\0';
    for (int i = 0; names && names[i] && j + 1 < n; i++) {
        int w = snprintf(buf + j, n - j, "%s%s", i ? sep : "", names[i]);
        if (w < 0) break;
        j += (size_t)w;
    }
    return buf;
}

static int range_error(const char *v, double min, double max, char *why, size_t n) {
    char sv[80], lo[32], hi[32];
    snprintf(why, n, "%s out of range [%s, %s]", dmn_value_shown(v, sv, sizeof sv), dmn_value_num(min, lo, sizeof lo),
             dmn_value_num(max, hi, sizeof hi));
    return D2_EINVAL;
}

static int kind_error(const char *v, const char *what, char *why, size_t n) {
    char sv[80];
    snprintf(why, n, "'%s' is not %s", dmn_value_shown(v, sv, sizeof sv), what);
    return D2_EINVAL;
}

static int ieq(const char *a, const char *b) {
    for (; *a && *b; a++, b++)
        if (tolower((unsigned char)*a) != tolower((unsigned char)*b)) return 0;
    return *a == *b;
}

/* ---- the readers ---------------------------------------------------------------- */

int dmn_value_int(const char *v, double min, double max, int *out, char *why, size_t n) {
    if (!(isdigit((unsigned char)v[0]) || ((v[0] == '-' || v[0] == '+') && isdigit((unsigned char)v[1]))))
        return kind_error(v, "an integer", why, n);
    errno = 0;
    char *end;
    long long x = strtoll(v, &end, 10);
    if (*end) return kind_error(v, "an integer", why, n);
    if (errno == ERANGE || (double)x < min || (double)x > max) return range_error(v, min, max, why, n);
    *out = (int)x;
    return D2_OK;
}

int dmn_value_float(const char *v, double min, double max, double *out, char *why, size_t n) {
    int ok = v[0] != '\0'; /* plain decimal only: no hex floats, inf, nan or spaces */
    for (const char *p = v; *p && ok; p++)
        ok = isdigit((unsigned char)*p) || *p == '.' || *p == '-' || *p == '+' || *p == 'e' || *p == 'E';
    char *end = NULL;
    double x = ok ? strtod(v, &end) : 0.0;
    if (!ok || *end || !isfinite(x)) return kind_error(v, "a number", why, n);
    if (x < min || x > max) return range_error(v, min, max, why, n);
    *out = x;
    return D2_OK;
}

int dmn_value_size(const char *v, double min, double max, uint64_t *out, char *why, size_t n) {
    static const char *const what = "a size (digits with an optional k, m or g)";
    if (!isdigit((unsigned char)v[0])) return kind_error(v, what, why, n);
    errno = 0;
    char *end;
    unsigned long long x = strtoull(v, &end, 10);
    unsigned shift = 0;
    if (*end == 'k' || *end == 'K') shift = 10, end++;
    else if (*end == 'm' || *end == 'M') shift = 20, end++;
    else if (*end == 'g' || *end == 'G') shift = 30, end++;
    if (*end) return kind_error(v, what, why, n);
    if (errno == ERANGE || x > (~0ull >> shift)) return range_error(v, min, max, why, n);
    x <<= shift;
    if ((double)x < min || (double)x > max) return range_error(v, min, max, why, n);
    *out = (uint64_t)x;
    return D2_OK;
}

int dmn_value_bool_word(const char *v) {
    static const char *const t[] = {"true", "yes", "on", "1"};
    static const char *const f[] = {"false", "no", "off", "0"};
    for (int i = 0; i < 4; i++) {
        if (ieq(v, t[i])) return 1;
        if (ieq(v, f[i])) return 0;
    }
    return -1;
}

int dmn_value_bool(const char *v, int *out, char *why, size_t n) {
    int b = dmn_value_bool_word(v);
    if (b < 0) return kind_error(v, "a boolean (true/false, yes/no, on/off, 1/0)", why, n);
    *out = b;
    return D2_OK;
}

int dmn_value_enum(const char *v, const char *const *names, int *out, char *why, size_t n) {
    for (int i = 0; names && names[i]; i++) {
        if (ieq(v, names[i])) {
            *out = i;
            return D2_OK;
        }
    }
    char sv[80], all[256];
    snprintf(why, n, "'%s' is not one of %s", dmn_value_shown(v, sv, sizeof sv),
             dmn_value_names(names, ", ", all, sizeof all));
    return D2_EINVAL;
}

int dmn_value_kv_budget(const char *v, dmn_kv_budget *out, char *why, size_t n) {
    char sv[80];
    const char *reason = NULL;
    float frac = 0.0f;
    int tokens = 0;
    if (eng_kv_budget_parse(v, &frac, &tokens, &reason) != D2_OK) {
        snprintf(why, n, "'%s': %s", dmn_value_shown(v, sv, sizeof sv), reason ? reason : "invalid budget");
        return D2_EINVAL;
    }
    /* A share as written: the reader checked it is digits and one '.'. */
    *out = (dmn_kv_budget){.frac = tokens > 0 ? 0.0 : strtod(v, NULL), .tokens = tokens};
    return D2_OK;
}
