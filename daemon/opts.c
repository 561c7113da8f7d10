/*
 * daemon/opts.c — the table-driven command-line reader of the one-shot
 * subcommands. Contract and syntax: daemon/opts.h.
 *
 * Design: one reader per value type (set_int, set_float, ...) is used for the
 * defaults and for argv alike; each is the shared reader of daemon/value.h
 * (the one serve's directive table uses) with the option's name put in front
 * of its reason. The help walks the same rows. Nothing here knows a
 * particular command.
 *
 * Callers: daemon/ (the subcommands), tests/unit/test_opts.c (#includes this
 * file and daemon/value.c). No global state; not thread-affine.
 */
#include "daemon/opts.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"

const char *const dmn_opt_kv_methods[] = {"full", "d2o", "h2o", "streamingllm", "snapkv", "pyramidkv", NULL};
const char *const dmn_opt_kv_granularities[] = {"layer", "head", NULL};
const char *const dmn_opt_devices[] = {"cpu", "cuda", "auto", NULL};

/* ---- small helpers ------------------------------------------------------------ */

static void set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void *field(void *out, size_t off) { return (char *)out + off; }

/* ---- one reader per type: the shared readers (daemon/value.h), the option named ---- */

/* "--name: reason" from a shared reader's failure. */
static int named(const dmn_opt *o, int rc, const char *why, char *err, size_t errlen) {
    if (rc != D2_OK) set_err(err, errlen, "--%s: %s", o->name, why);
    return rc;
}

static int set_int(const dmn_opt *o, const char *v, int *dst, char *err, size_t errlen) {
    char why[288];
    return named(o, dmn_value_int(v, o->min, o->max, dst, why, sizeof why), why, err, errlen);
}

static int set_float(const dmn_opt *o, const char *v, double *dst, char *err, size_t errlen) {
    char why[288];
    return named(o, dmn_value_float(v, o->min, o->max, dst, why, sizeof why), why, err, errlen);
}

static int set_enum(const dmn_opt *o, const char *v, int *dst, char *err, size_t errlen) {
    char why[400];
    return named(o, dmn_value_enum(v, o->names, dst, why, sizeof why), why, err, errlen);
}

static int set_budget(const dmn_opt *o, const char *v, dmn_kv_budget *dst, char *err, size_t errlen) {
    char why[288], sv[80];
    dmn_kv_budget b;
    int rc = named(o, dmn_value_kv_budget(v, &b, why, sizeof why), why, err, errlen);
    if (rc != D2_OK) return rc;
    if ((o->flags & DMN_OPT_SHARES) && b.tokens > 0) {
        set_err(err, errlen, "--%s: '%s': this command takes budgets as shares of the prompt in (0, 1], "
                "not token counts", o->name, dmn_value_shown(v, sv, sizeof sv));
        return D2_EINVAL;
    }
    *dst = b;
    return D2_OK;
}

/* Comma-separated lists: each element through the type's own reader. */
static int set_list(const dmn_opt *o, const char *v, void *dst, char *err, size_t errlen) {
    int n = 0, max = o->max_count > 0 && o->max_count < DMN_OPT_LIST_MAX ? o->max_count : DMN_OPT_LIST_MAX;
    const char *p = v;
    dmn_int_list il = {0};
    dmn_float_list fl = {0};
    dmn_kv_budget_list bl = {0};
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        if (len == 0 || len >= 64) {
            set_err(err, errlen, "--%s: %s in '%.64s'", o->name, len ? "element too long" : "empty element", v);
            return D2_EINVAL;
        }
        if (n >= max) {
            set_err(err, errlen, "--%s: at most %d values", o->name, max);
            return D2_EINVAL;
        }
        char one[64];
        memcpy(one, p, len);
        one[len] = '\0';
        int rc, x = 0;
        if (o->type == DMN_OPT_INT_LIST) rc = set_int(o, one, &il.v[n], err, errlen);
        else if (o->type == DMN_OPT_FLOAT_LIST) rc = set_float(o, one, &fl.v[n], err, errlen);
        else if (o->type == DMN_OPT_KV_BUDGET_LIST) rc = set_budget(o, one, &bl.v[n], err, errlen);
        else rc = set_enum(o, one, &x, err, errlen);
        if (rc != D2_OK) return rc;
        if (o->type == DMN_OPT_ENUM_LIST) {
            int dup = 0;
            for (int k = 0; k < n; k++) dup |= il.v[k] == x;
            if (!dup) il.v[n++] = x;
        } else {
            n++;
        }
        if (!comma) break;
        p = comma + 1;
    }
    il.n = fl.n = bl.n = n;
    if (o->type == DMN_OPT_KV_BUDGET_LIST) *(dmn_kv_budget_list *)dst = bl;
    else if (o->type == DMN_OPT_FLOAT_LIST) *(dmn_float_list *)dst = fl;
    else *(dmn_int_list *)dst = il;
    return D2_OK;
}

/* One option's value (NULL for a flag) into out. */
static int set_value(const dmn_opt *o, void *out, const char *v, char *err, size_t errlen) {
    void *dst = field(out, o->offset);
    switch (o->type) {
    case DMN_OPT_STR: *(const char **)dst = v; return D2_OK;
    case DMN_OPT_INT: return set_int(o, v, dst, err, errlen);
    case DMN_OPT_FLOAT: return set_float(o, v, dst, err, errlen);
    case DMN_OPT_FLAG: *(bool *)dst = true; return D2_OK;
    case DMN_OPT_ENUM: return set_enum(o, v, dst, err, errlen);
    case DMN_OPT_KV_BUDGET: return set_budget(o, v, dst, err, errlen);
    case DMN_OPT_INT_LIST:
    case DMN_OPT_FLOAT_LIST:
    case DMN_OPT_ENUM_LIST:
    case DMN_OPT_KV_BUDGET_LIST: return set_list(o, v, dst, err, errlen);
    }
    set_err(err, errlen, "--%s: unknown option type", o->name);
    return D2_EINTERNAL;
}

/* ---- argv --------------------------------------------------------------------------- */

static const dmn_opt *find_opt(const dmn_cmd_spec *cmd, const char *name, size_t len) {
    for (int i = 0; i < cmd->n_opts; i++)
        if (strlen(cmd->opts[i].name) == len && !memcmp(cmd->opts[i].name, name, len)) return &cmd->opts[i];
    return NULL;
}

/* Reads argv[*i] (and its value) into out; advances *i past a separate value. */
static int apply_arg(const dmn_cmd_spec *cmd, void *out, int argc, char **argv, int *i, bool *given,
                     char *err, size_t errlen) {
    const char *a = argv[*i];
    char sv[80];
    if (a[0] != '-' || a[1] != '-' || !a[2]) {
        set_err(err, errlen, a[0] == '-' ? "unknown option '%s'" : "unexpected argument '%s'",
                dmn_value_shown(a, sv, sizeof sv));
        return D2_EINVAL;
    }
    const char *name = a + 2, *eq = strchr(name, '=');
    size_t len = eq ? (size_t)(eq - name) : strlen(name);
    const dmn_opt *o = find_opt(cmd, name, len);
    if (!o) {
        set_err(err, errlen, "unknown option '%s'", dmn_value_shown(a, sv, sizeof sv));
        return D2_EINVAL;
    }
    const char *v = eq ? eq + 1 : NULL;
    if (o->type == DMN_OPT_FLAG && v) {
        set_err(err, errlen, "--%s takes no value", o->name);
        return D2_EINVAL;
    }
    if (o->type != DMN_OPT_FLAG && !v) {
        if (*i + 1 >= argc) {
            set_err(err, errlen, "--%s needs a value", o->name);
            return D2_EINVAL;
        }
        v = argv[++*i];
    }
    int rc = set_value(o, out, v, err, errlen);
    if (rc != D2_OK) return rc;
    given[o - cmd->opts] = true;
    if (o->flags & DMN_OPT_SEEN) *(bool *)field(out, o->seen_offset) = true;
    return D2_OK;
}

int dmn_opts_parse(const dmn_cmd_spec *cmd, void *out, int argc, char **argv, char *err, size_t errlen) {
    bool given[64] = {false};
    if (cmd->n_opts > (int)(sizeof given / sizeof *given)) {
        set_err(err, errlen, "too many options in the table of '%s'", cmd->name);
        return D2_EINTERNAL;
    }
    memset(out, 0, cmd->size);
    for (int k = 0; k < cmd->n_opts; k++) { /* defaults, through the same readers */
        const dmn_opt *o = &cmd->opts[k];
        if (o->def && set_value(o, out, o->def, err, errlen) != D2_OK) return D2_EINTERNAL;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) return DMN_OPTS_HELP;
    }
    for (int i = 1; i < argc; i++) {
        int rc = apply_arg(cmd, out, argc, argv, &i, given, err, errlen);
        if (rc != D2_OK) return rc;
    }
    for (int k = 0; k < cmd->n_opts; k++) {
        if ((cmd->opts[k].flags & DMN_OPT_REQUIRED) && !given[k]) {
            set_err(err, errlen, "--%s is required", cmd->opts[k].name);
            return D2_EINVAL;
        }
    }
    return D2_OK;
}

int dmn_opts_main(const dmn_cmd_spec *cmd, void *out, int argc, char **argv) {
    char err[512] = "";
    int rc = dmn_opts_parse(cmd, out, argc, argv, err, sizeof err);
    if (rc == D2_OK) return -1;
    if (rc == DMN_OPTS_HELP) {
        dmn_opts_help(cmd, stdout);
        return 0;
    }
    fprintf(stderr, "d2od %s: %s%s\n(see 'd2od %s --help')\n", cmd->name, rc == D2_EINTERNAL ? "bad option table: " : "",
            err, cmd->name);
    return 2;
}

int dmn_opts_usage_error(const dmn_cmd_spec *cmd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "d2od %s: ", cmd->name);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n(see 'd2od %s --help')\n", cmd->name);
    va_end(ap);
    return 2;
}

/* ---- --help ------------------------------------------------------------------------- */

static const char *metavar_of(const dmn_opt *o) {
    if (o->metavar) return o->metavar;
    switch (o->type) {
    case DMN_OPT_INT: return "N";
    case DMN_OPT_FLOAT: return "X";
    case DMN_OPT_FLAG: return "";
    case DMN_OPT_ENUM: return "NAME";
    case DMN_OPT_INT_LIST: return "N,N,...";
    case DMN_OPT_FLOAT_LIST: return "X,X,...";
    case DMN_OPT_ENUM_LIST: return "NAME,...";
    case DMN_OPT_KV_BUDGET: return "B";
    case DMN_OPT_KV_BUDGET_LIST: return "B,B,...";
    case DMN_OPT_STR: break;
    }
    return "S";
}

/* Appends "; part" (or " (part" first) to buf, never past n. */
static void add_part(char *buf, size_t n, size_t *j, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void add_part(char *buf, size_t n, size_t *j, const char *fmt, ...) {
    if (*j + 1 >= n) return;
    *j += (size_t)snprintf(buf + *j, n - *j, "%s", *j ? "; " : " (");
    if (*j + 1 >= n) { *j = n - 1; return; }
    va_list ap;
    va_start(ap, fmt);
    *j += (size_t)vsnprintf(buf + *j, n - *j, fmt, ap);
    va_end(ap);
    if (*j >= n) *j = n - 1;
}

/* " (required; a|b; default x; lo..hi)" — the parts that apply; "" for none. */
static void help_suffix(const dmn_opt *o, char *buf, size_t n) {
    size_t j = 0;
    char all[256], lo[32], hi[32];
    buf[0] = '\0';
    if (o->flags & DMN_OPT_REQUIRED) add_part(buf, n, &j, "required");
    if (o->type == DMN_OPT_ENUM || o->type == DMN_OPT_ENUM_LIST)
        add_part(buf, n, &j, "%s", dmn_value_names(o->names, "|", all, sizeof all));
    if (o->def && o->type != DMN_OPT_FLAG) add_part(buf, n, &j, "default %s", o->def);
    if ((o->type == DMN_OPT_INT || o->type == DMN_OPT_FLOAT || o->type == DMN_OPT_INT_LIST ||
         o->type == DMN_OPT_FLOAT_LIST) && o->max > o->min)
        add_part(buf, n, &j, "%s..%s", dmn_value_num(o->min, lo, sizeof lo), dmn_value_num(o->max, hi, sizeof hi));
    if (o->max_count > 0 && o->max_count < DMN_OPT_LIST_MAX) add_part(buf, n, &j, "at most %d values", o->max_count);
    if (j && j + 1 < n) {
        buf[j++] = ')';
        buf[j] = '\0';
    }
}

void dmn_opts_help(const dmn_cmd_spec *cmd, FILE *f) {
    fprintf(f, "usage: d2od %s %s\n", cmd->name, cmd->usage);
    if (cmd->about && *cmd->about) fprintf(f, "\n%s\n", cmd->about);
    fprintf(f, "\noptions:\n");
    int w = 0;
    for (int i = 0; i < cmd->n_opts; i++) {
        const char *mv = metavar_of(&cmd->opts[i]);
        int l = (int)(strlen(cmd->opts[i].name) + strlen(mv)) + 3;
        if (l > w) w = l;
    }
    if (w > 30) w = 30;
    for (int i = 0; i < cmd->n_opts; i++) {
        const dmn_opt *o = &cmd->opts[i];
        char left[128], suffix[512];
        const char *mv = metavar_of(o);
        snprintf(left, sizeof left, "--%s%s%s", o->name, *mv ? " " : "", mv);
        help_suffix(o, suffix, sizeof suffix);
        if ((int)strlen(left) > w) fprintf(f, "  %s\n  %-*s  %s%s\n", left, w, "", o->help, suffix);
        else fprintf(f, "  %-*s  %s%s\n", w, left, o->help, suffix);
    }
    fprintf(f, "  %-*s  %s\n", w, "-h, --help", "print this help and exit");
}
