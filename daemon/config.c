/*
 * daemon/config.c — the daemon's directive table and its three readers
 * (file, environment, command line), the SIGHUP reload diff, --help and the
 * startup dump. Contract and formats: daemon/config.h.
 *
 * Design: the table below is the only list of settings. Defaults are written
 * as text and go through the same parser as user input, so a default can never
 * be a value the parser would refuse. Environment names (D2OD_PORT) and flags
 * (--max-batch-tokens) are derived from the directive name by one rule each,
 * so they cannot drift from it either. Values are read by the readers the
 * subcommands' option table uses too (daemon/value.h), so a number, a name
 * or a KV budget is accepted and understood the same way everywhere.
 *
 * Callers: daemon/ (serve command, reload), tests/unit/test_config.c and
 * tests/fuzz/fuzz_config.c (both #include this file and daemon/value.c).
 * No global state.
 */
#include "daemon/config.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <unistd.h>

#include "common/status.h"
#include "common/util.h"
#include "daemon/value.h"
#include "hub/hub.h"

/* ---- the table ---------------------------------------------------------- */

typedef enum cfg_type { CT_INT, CT_FLOAT, CT_BOOL, CT_STRING, CT_ENUM, CT_SIZE } cfg_type;

/* Extra check for a string directive: 0 ok, else -1 with why filled. */
typedef int (*cfg_check_fn)(const char *v, char *why, size_t n);

typedef struct cfg_directive {
    const char *name;        /* file name; env D2OD_<UPPER>, flag --<kebab> */
    cfg_type type;
    size_t offset;           /* into dmn_config */
    size_t cap;              /* CT_STRING: capacity of the char array */
    const char *def;         /* default, as text the parser accepts */
    double min, max;         /* CT_INT / CT_FLOAT / CT_SIZE (bytes), inclusive */
    const char *const *enums;/* CT_ENUM: NULL-terminated names, index = value */
    int live;                /* a SIGHUP reload may apply a change to it */
    cfg_check_fn check;      /* CT_STRING only; may be NULL */
    const char *metavar;     /* for --help */
    const char *help;        /* one line */
} cfg_directive;

static const char *const log_level_names[] = {"debug", "info", "warn", "error", NULL};
static const char *const kv_method_names[] = {"full",   "d2o",    "h2o",      "streamingllm",
                                              "snapkv", "pyramidkv", NULL};
static const char *const device_names[] = {"cpu", "cuda", "auto", NULL};
static const char *const kv_preset_names[] = {"default", "official", NULL};
static const char *const kv_granularity_names[] = {"auto", "layer", "head", NULL};

static int check_host(const char *v, char *why, size_t n);
static int check_api_key(const char *v, char *why, size_t n);
static int check_kv_budget(const char *v, char *why, size_t n);

#define OFF(f) offsetof(dmn_config, f)
#define STR(f) OFF(f), sizeof(((dmn_config *)0)->f)
#define NUM(f) OFF(f), 0

static const cfg_directive g_dirs[] = {
    {"model", CT_STRING, STR(model), "", 0, 0, NULL, 0, NULL, "PATH",
     "GGUF file, Hugging Face model directory, or hub id org/name[@rev] to serve (required)"},
    {"gguf_file", CT_STRING, STR(gguf_file), "", 0, 0, NULL, 0, NULL, "NAME",
     "hub id with several GGUF files: the file name or quant name to take (e.g. Q8_0)"},
    {"served_model_name", CT_STRING, STR(served_model_name), "", 0, 0, NULL, 0, NULL, "NAME",
     "model id shown by /v1/models and accepted in requests (default: model's base name)"},
    {"host", CT_STRING, STR(host), "127.0.0.1", 0, 0, NULL, 0, check_host, "ADDR",
     "address to listen on (0.0.0.0 or :: for every interface)"},
    {"port", CT_INT, NUM(port), "8000", 1, 65535, NULL, 0, NULL, "N", "TCP port to listen on"},
    {"api_key", CT_STRING, STR(api_key), "", 0, 0, NULL, 1, check_api_key, "KEY",
     "bearer token clients must send (empty: no authentication)"},
    {"api_key_for_health_metrics", CT_BOOL, NUM(api_key_for_health_metrics), "false", 0, 0, NULL,
     0, NULL, "BOOL", "require the API key on /health and /metrics as well"},
    {"threads", CT_INT, NUM(threads), "0", 0, 1024, NULL, 0, NULL, "N",
     "CPU worker threads (0: the CPUs this process may use: affinity mask and cgroup quota)"},
    {"ctx_len", CT_INT, NUM(ctx_len), "0", 0, 1048576, NULL, 0, NULL, "N",
     "context length per sequence in tokens (0: the model's own)"},
    {"max_seqs", CT_INT, NUM(max_seqs), "64", 1, 4096, NULL, 0, NULL, "N",
     "sequences decoded together (continuous batching slots)"},
    {"max_batch_tokens", CT_INT, NUM(max_batch_tokens), "512", 16, 65536, NULL, 0, NULL, "N",
     "tokens per engine step: prefill chunks plus one per decoding sequence"},
    {"page_tokens", CT_INT, NUM(page_tokens), "16", 1, 256, NULL, 0, NULL, "N",
     "tokens per KV-cache page"},
    {"kv_mem_mb", CT_INT, NUM(kv_mem_mb), "0", 0, 16777216, NULL, 0, NULL, "MIB",
     "KV-cache pool size in MiB (0: automatic)"},
    {"kv_method", CT_ENUM, NUM(kv_method), "full", 0, 0, kv_method_names, 0, NULL, NULL,
     "KV-cache eviction/compression policy"},
    {"kv_budget", CT_STRING, STR(kv_budget), "1.0", 0, 0, NULL, 0, check_kv_budget, "B",
     "KV-cache budget per layer: a share of the prompt's length in (0,1] or a token count >= 2"},
    {"kv_preset", CT_ENUM, NUM(kv_preset), "default", 0, 0, kv_preset_names, 0, NULL, NULL,
     "KV-compression preset: official = D2O as its official code runs it (kv_method d2o)"},
    {"kv_granularity", CT_ENUM, NUM(kv_granularity), "auto", 0, 0, kv_granularity_names, 0, NULL,
     NULL, "KV compression per layer or per KV head (auto: the preset's; official: head)"},
    {"device", CT_ENUM, NUM(device), "cpu", 0, 0, device_names, 0, NULL, NULL,
     "compute backend: cpu, cuda (builds made with CUDA=1) or auto (the GPU when there is one)"},
    {"gpu_memory_utilization", CT_FLOAT, NUM(gpu_memory_utilization), "0.9", 0.05, 1.0, NULL, 0,
     NULL, "FRAC", "share of the GPU's memory d2od may fill (weights, activations, KV cache)"},
    {"cuda_graphs", CT_BOOL, NUM(cuda_graphs), "false", 0, 0, NULL, 0, NULL, "BOOL",
     "CUDA: replay decode steps from CUDA graphs captured per padded batch size"},
    {"max_queue", CT_INT, NUM(max_queue), "256", 0, 100000, NULL, 1, NULL, "N",
     "requests that may wait when every slot is busy (0: none), more get 429; a request counts once whatever its n"},
    {"max_tokens_limit", CT_INT, NUM(max_tokens_limit), "4096", 1, 1048576, NULL, 1, NULL, "N",
     "largest max_tokens a request may ask for"},
    {"default_max_tokens", CT_INT, NUM(default_max_tokens), "256", 1, 1048576, NULL, 1, NULL, "N",
     "max_tokens of a request that gives none"},
    {"max_n", CT_INT, NUM(max_n), "8", 1, 128, NULL, 0, NULL, "N",
     "largest n (choices per request)"},
    {"body_limit", CT_SIZE, NUM(body_limit), "1m", 1024, 1073741824.0, NULL, 0, NULL, "SIZE",
     "largest request body in bytes (k, m, g suffixes)"},
    {"request_timeout_s", CT_FLOAT, NUM(request_timeout_s), "600", 0, 86400, NULL, 1, NULL, "SEC",
     "seconds before a request is aborted (0: no limit)"},
    {"drain_timeout_s", CT_FLOAT, NUM(drain_timeout_s), "30", 0, 3600, NULL, 0, NULL, "SEC",
     "seconds in-flight requests get to finish on shutdown"},
    {"log_level", CT_ENUM, NUM(log_level), "info", 0, 0, log_level_names, 1, NULL, NULL,
     "least severe level logged"},
    {"log_requests", CT_BOOL, NUM(log_requests), "true", 0, 0, NULL, 1, NULL, "BOOL",
     "log one line per finished request"},
    {"watchdog", CT_BOOL, NUM(watchdog), "true", 0, 0, NULL, 0, NULL, "BOOL",
     "ping systemd's watchdog when the unit sets WatchdogSec="},
};

#undef OFF
#undef STR
#undef NUM

#define N_DIRS ((int)(sizeof g_dirs / sizeof g_dirs[0]))
_Static_assert(sizeof g_dirs / sizeof g_dirs[0] <= DMN_CONFIG_MAX_DIRECTIVES,
               "raise DMN_CONFIG_MAX_DIRECTIVES");

static const char *const source_names[] = {"default", "file", "env", "cli", "derived"};

/* ---- small helpers ------------------------------------------------------ */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static int find_by_name(const char *name, size_t len) {
    for (int i = 0; i < N_DIRS; i++)
        if (strlen(g_dirs[i].name) == len && !memcmp(g_dirs[i].name, name, len)) return i;
    return -1;
}

/* Matches a flag spelled kebab-case ("max-batch-tokens") against the table. */
static int find_by_flag(const char *flag, size_t len) {
    for (int i = 0; i < N_DIRS; i++) {
        const char *nm = g_dirs[i].name;
        if (strlen(nm) != len) continue;
        size_t k = 0;
        while (k < len && (flag[k] == (nm[k] == '_' ? '-' : nm[k]))) k++;
        if (k == len) return i;
    }
    return -1;
}

static void env_name(const cfg_directive *d, char *buf, size_t n) {
    size_t j = (size_t)snprintf(buf, n, "D2OD_");
    for (const char *p = d->name; *p && j + 1 < n; p++) buf[j++] = (char)toupper((unsigned char)*p);
    buf[j] = '\0';
}

static void flag_name(const cfg_directive *d, char *buf, size_t n) {
    size_t j = (size_t)snprintf(buf, n, "--");
    for (const char *p = d->name; *p && j + 1 < n; p++) buf[j++] = *p == '_' ? '-' : *p;
    buf[j] = '\0';
}

/* ---- value parsing ------------------------------------------------------ */

/* Sets directive d of cfg from text v through the shared readers
 * (daemon/value.h). 0 ok; -1 with why filled ("value ..." and the reason:
 * callers prefix where the value came from). cfg is untouched on error. */
static int set_value(dmn_config *cfg, const cfg_directive *d, const char *v, char *why, size_t n) {
    char *base = (char *)cfg + d->offset;
    char reason[240];
    int rc = D2_EINVAL;
    switch (d->type) {
    case CT_INT: rc = dmn_value_int(v, d->min, d->max, (int *)base, reason, sizeof reason); break;
    case CT_FLOAT: rc = dmn_value_float(v, d->min, d->max, (double *)base, reason, sizeof reason); break;
    case CT_SIZE: rc = dmn_value_size(v, d->min, d->max, (uint64_t *)base, reason, sizeof reason); break;
    case CT_BOOL: rc = dmn_value_bool(v, (int *)base, reason, sizeof reason); break;
    case CT_ENUM: rc = dmn_value_enum(v, d->enums, (int *)base, reason, sizeof reason); break;
    case CT_STRING: {
        size_t len = strlen(v);
        if (len >= d->cap) {
            snprintf(why, n, "value too long (%zu bytes, at most %zu)", len, d->cap - 1);
            return -1;
        }
        if (d->check && d->check(v, why, n) < 0) return -1;
        memcpy(base, v, len + 1);
        return 0;
    }
    default: snprintf(reason, sizeof reason, "internal: bad directive type"); break;
    }
    if (rc == D2_OK) return 0;
    snprintf(why, n, "value %s", reason);
    return -1;
}

static int check_host(const char *v, char *why, size_t n) {
    if (!*v) {
        snprintf(why, n, "value must not be empty");
        return -1;
    }
    for (const char *p = v; *p; p++) {
        if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f) {
            snprintf(why, n, "value contains a space or control character");
            return -1;
        }
    }
    return 0;
}

/* The key travels in an Authorization header: printable ASCII, no spaces. */
static int check_api_key(const char *v, char *why, size_t n) {
    for (const char *p = v; *p; p++) {
        if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f) {
            snprintf(why, n, "value must be printable ASCII without spaces");
            return -1;
        }
    }
    return 0;
}

/* kv_budget: the shared budget reader (eng_kv_budget_parse underneath);
 * finalize derives kv_budget_frac / kv_budget_tokens from the same text. */
static int check_kv_budget(const char *v, char *why, size_t n) {
    dmn_kv_budget b;
    char reason[240];
    if (dmn_value_kv_budget(v, &b, reason, sizeof reason) != D2_OK) {
        snprintf(why, n, "value %s", reason);
        return -1;
    }
    return 0;
}

const char *dmn_kv_method_name(int m) {
    return m >= 0 && m < (int)(sizeof kv_method_names / sizeof *kv_method_names) - 1 ? kv_method_names[m] : "?";
}
const char *dmn_device_name(int d) {
    return d >= 0 && d < (int)(sizeof device_names / sizeof *device_names) - 1 ? device_names[d] : "?";
}
const char *dmn_log_level_name(int l) {
    return l >= 0 && l < (int)(sizeof log_level_names / sizeof *log_level_names) - 1 ? log_level_names[l] : "?";
}

/* ---- defaults ----------------------------------------------------------- */

void dmn_config_defaults(dmn_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    char why[256];
    for (int i = 0; i < N_DIRS; i++) {
        int rc = set_value(cfg, &g_dirs[i], g_dirs[i].def, why, sizeof why);
        D2_ASSERT(rc == 0); /* a default the parser refuses is a table bug */
        cfg->source[i] = DMN_SRC_DEFAULT;
    }
}

/* ---- file --------------------------------------------------------------- */

#define QBUF_MAX 4096 /* longest value a file line may carry (quoted or not) */

int dmn_config_parse_buffer(dmn_config *cfg, const char *buf, size_t len, const char *name,
                            char *err, size_t errlen) {
    int first_line[DMN_CONFIG_MAX_DIRECTIVES] = {0};
    char val[QBUF_MAX];
    char why[320];
    if (!name) name = "(config)";
    size_t pos = 0;
    int line = 0;
    while (pos < len) {
        line++;
        const char *s = buf + pos;
        const char *nl = memchr(s, '\n', len - pos);
        size_t ll = nl ? (size_t)(nl - s) : len - pos;
        pos += ll + (nl ? 1 : 0);
        if (ll && s[ll - 1] == '\r') ll--;
        const char *e = s + ll;
        if (memchr(s, '\0', ll)) {
            set_err(err, errlen, "%s:%d: NUL byte in line", name, line);
            return D2_ECONFIG;
        }
        const char *p = s;
        while (p < e && (*p == ' ' || *p == '\t')) p++;
        if (p == e || *p == '#') continue;
        const char *ns = p;
        while (p < e && *p != ' ' && *p != '\t') p++;
        size_t nlen = (size_t)(p - ns);
        int idx = find_by_name(ns, nlen);
        char dname[80];
        {
            char tmp[80];
            size_t k = nlen < sizeof tmp - 1 ? nlen : sizeof tmp - 1;
            memcpy(tmp, ns, k);
            tmp[k] = '\0';
            dmn_value_shown(tmp, dname, sizeof dname);
        }
        if (idx < 0) {
            set_err(err, errlen, "%s:%d: directive '%s': unknown directive", name, line, dname);
            return D2_ECONFIG;
        }
        while (p < e && (*p == ' ' || *p == '\t')) p++;
        if (p == e || *p == '#') {
            set_err(err, errlen, "%s:%d: directive '%s': missing value", name, line, dname);
            return D2_ECONFIG;
        }
        size_t vl = 0;
        if (*p == '"') {
            p++;
            int closed = 0;
            while (p < e) {
                char c = *p++;
                if (c == '"') {
                    closed = 1;
                    break;
                }
                if (c == '\\') {
                    if (p == e) break;
                    c = *p++;
                    if (c != '"' && c != '\\') {
                        set_err(err, errlen, "%s:%d: directive '%s': bad escape '\\%c' in quoted value (only \\\" and \\\\)",
                                name, line, dname, isprint((unsigned char)c) ? c : '?');
                        return D2_ECONFIG;
                    }
                }
                if (vl + 1 >= sizeof val) {
                    set_err(err, errlen, "%s:%d: directive '%s': value too long", name, line, dname);
                    return D2_ECONFIG;
                }
                val[vl++] = c;
            }
            if (!closed) {
                set_err(err, errlen, "%s:%d: directive '%s': unterminated quoted value", name, line, dname);
                return D2_ECONFIG;
            }
        } else {
            while (p < e && *p != ' ' && *p != '\t') {
                if (*p == '"') {
                    set_err(err, errlen, "%s:%d: directive '%s': stray '\"' in unquoted value", name, line, dname);
                    return D2_ECONFIG;
                }
                if (vl + 1 >= sizeof val) {
                    set_err(err, errlen, "%s:%d: directive '%s': value too long", name, line, dname);
                    return D2_ECONFIG;
                }
                val[vl++] = *p++;
            }
        }
        val[vl] = '\0';
        while (p < e && (*p == ' ' || *p == '\t')) p++;
        if (p < e && *p != '#') {
            set_err(err, errlen, "%s:%d: directive '%s': trailing garbage after value", name, line, dname);
            return D2_ECONFIG;
        }
        if (first_line[idx]) {
            set_err(err, errlen, "%s:%d: directive '%s': duplicate (first set on line %d)", name, line,
                    dname, first_line[idx]);
            return D2_ECONFIG;
        }
        first_line[idx] = line;
        if (set_value(cfg, &g_dirs[idx], val, why, sizeof why) < 0) {
            set_err(err, errlen, "%s:%d: directive '%s': %s", name, line, dname, why);
            return D2_ECONFIG;
        }
        cfg->source[idx] = DMN_SRC_FILE;
    }
    return D2_OK;
}

int dmn_config_parse_file(dmn_config *cfg, const char *path, char *err, size_t errlen) {
    char *buf = NULL;
    size_t len = 0;
    int rc = d2_read_file(path, &buf, &len);
    if (rc != D2_OK) {
        set_err(err, errlen, "%s: cannot read config file: %s", path, d2_strerror(rc));
        return rc;
    }
    rc = dmn_config_parse_buffer(cfg, buf, len, path, err, errlen);
    free(buf);
    return rc;
}

/* ---- environment -------------------------------------------------------- */

/* A variable that is set but empty counts as unset (systemd's Environment=
 * and shell "VAR= cmd" make empty values easy to produce by accident). */
int dmn_config_apply_env(dmn_config *cfg, char *err, size_t errlen) {
    char en[80], why[320];
    for (int i = 0; i < N_DIRS; i++) {
        env_name(&g_dirs[i], en, sizeof en);
        const char *v = getenv(en);
        if (!v || !*v) continue;
        if (set_value(cfg, &g_dirs[i], v, why, sizeof why) < 0) {
            set_err(err, errlen, "environment %s: %s", en, why);
            return D2_ECONFIG;
        }
        cfg->source[i] = DMN_SRC_ENV;
    }
    return D2_OK;
}

/* ---- command line ------------------------------------------------------- */

/* Splits "--name=value": returns the name length and sets *val (NULL when
 * there is no '='). arg points past the leading "--". */
static size_t split_flag(const char *arg, const char **val) {
    const char *eq = strchr(arg, '=');
    *val = eq ? eq + 1 : NULL;
    return eq ? (size_t)(eq - arg) : strlen(arg);
}

int dmn_config_apply_argv(dmn_config *cfg, int argc, char **argv, char *err, size_t errlen) {
    char why[320], sa[80];
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!a) continue;
        if (a[0] != '-' || a[1] != '-' || a[2] == '\0') {
            set_err(err, errlen, "unexpected argument '%s'", dmn_value_shown(a, sa, sizeof sa));
            return D2_ECONFIG;
        }
        const char *val;
        size_t nlen = split_flag(a + 2, &val);
        char flag[96];
        snprintf(flag, sizeof flag, "--%.*s", (int)(nlen < 64 ? nlen : 64), a + 2);
        dmn_value_shown(flag, sa, sizeof sa);
        if (nlen == 6 && !memcmp(a + 2, "config", 6)) { /* handled by dmn_config_load */
            if (!val) i++;
            continue;
        }
        int idx = find_by_flag(a + 2, nlen);
        int negated = 0;
        if (idx < 0 && nlen > 3 && !memcmp(a + 2, "no-", 3)) {
            idx = find_by_flag(a + 5, nlen - 3);
            if (idx >= 0 && g_dirs[idx].type == CT_BOOL) negated = 1;
            else idx = -1;
        }
        if (idx < 0) {
            set_err(err, errlen, "%s: unknown option (see --help)", sa);
            return D2_ECONFIG;
        }
        const cfg_directive *d = &g_dirs[idx];
        const char *v;
        if (negated) {
            if (val) {
                set_err(err, errlen, "%s: takes no value", sa);
                return D2_ECONFIG;
            }
            v = "false";
        } else if (val) {
            v = val;
        } else if (d->type == CT_BOOL) {
            /* "--watchdog" alone is true; "--watchdog off" takes the word. */
            if (i + 1 < argc && argv[i + 1] && dmn_value_bool_word(argv[i + 1]) >= 0) v = argv[++i];
            else v = "true";
        } else {
            /* A following "--flag" means the value was forgotten, not that it
             * is the value: no directive accepts a value starting with "--". */
            if (i + 1 >= argc || !argv[i + 1] || !strncmp(argv[i + 1], "--", 2)) {
                set_err(err, errlen, "%s: missing value", sa);
                return D2_ECONFIG;
            }
            v = argv[++i];
        }
        if (set_value(cfg, d, v, why, sizeof why) < 0) {
            set_err(err, errlen, "%s: %s", sa, why);
            return D2_ECONFIG;
        }
        cfg->source[idx] = DMN_SRC_CLI;
    }
    return D2_OK;
}

/* ---- finalize, load, reload --------------------------------------------- */

static int dir_index(const char *name) { return find_by_name(name, strlen(name)); }

int dmn_config_finalize(dmn_config *cfg, char *err, size_t errlen) {
    if (!cfg->model[0]) {
        set_err(err, errlen, "model: required; set 'model' in the config file, D2OD_MODEL or --model");
        return D2_ECONFIG;
    }
    if (!cfg->served_model_name[0] && hub_is_repo_id(cfg->model) && access(cfg->model, F_OK) != 0) {
        /* A hub id (not a local path): served as "org/name", as vLLM does. */
        size_t n = strcspn(cfg->model, "@");
        if (n >= sizeof cfg->served_model_name) n = sizeof cfg->served_model_name - 1;
        memcpy(cfg->served_model_name, cfg->model, n);
        cfg->served_model_name[n] = '\0';
        cfg->source[dir_index("served_model_name")] = DMN_SRC_DERIVED;
    }
    if (!cfg->served_model_name[0]) {
        /* Base name of the model path, without trailing slashes or ".gguf". */
        const char *m = cfg->model;
        size_t end = strlen(m);
        while (end > 1 && m[end - 1] == '/') end--;
        size_t start = end;
        while (start > 0 && m[start - 1] != '/') start--;
        size_t n = end - start;
        if (n > 5 && !memcmp(m + end - 5, ".gguf", 5)) n -= 5;
        if (n >= sizeof cfg->served_model_name) n = sizeof cfg->served_model_name - 1;
        memcpy(cfg->served_model_name, m + start, n);
        cfg->served_model_name[n] = '\0';
        if (!n) snprintf(cfg->served_model_name, sizeof cfg->served_model_name, "model");
        cfg->source[dir_index("served_model_name")] = DMN_SRC_DERIVED;
    }
    dmn_kv_budget b;
    char why[288];
    if (dmn_value_kv_budget(cfg->kv_budget, &b, why, sizeof why) != D2_OK) {
        set_err(err, errlen, "kv_budget: invalid value %s", why);
        return D2_ECONFIG;
    }
    cfg->kv_budget_frac = b.frac;
    cfg->kv_budget_tokens = b.tokens;
    if (cfg->default_max_tokens > cfg->max_tokens_limit) {
        set_err(err, errlen, "default_max_tokens (%d) exceeds max_tokens_limit (%d)",
                cfg->default_max_tokens, cfg->max_tokens_limit);
        return D2_ECONFIG;
    }
    return D2_OK;
}

/* Reads the file, env and argv on top of defaults into cfg; file may be
 * NULL or "". Records the file in cfg->config_file. */
static int load_from(dmn_config *cfg, const char *file, int argc, char **argv, char *err,
                     size_t errlen) {
    dmn_config_defaults(cfg);
    if (file && *file) {
        size_t fl = strlen(file);
        if (fl >= sizeof cfg->config_file) {
            set_err(err, errlen, "config file path too long (%zu bytes)", fl);
            return D2_ECONFIG;
        }
        memcpy(cfg->config_file, file, fl + 1);
        int rc = dmn_config_parse_file(cfg, file, err, errlen);
        if (rc != D2_OK) return rc;
    }
    int rc = dmn_config_apply_env(cfg, err, errlen);
    if (rc != D2_OK) return rc;
    rc = dmn_config_apply_argv(cfg, argc, argv, err, errlen);
    if (rc != D2_OK) return rc;
    return dmn_config_finalize(cfg, err, errlen);
}

int dmn_config_load(dmn_config *cfg, const char *file_or_null, int argc, char **argv,
                    char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    const char *file = NULL;
    int help = 0, missing_config = 0;
    /* First pass: --help wins over everything (even a broken --config);
     * --config picks the file. A non-bool flag's separate value is skipped
     * so that a value is never mistaken for a flag. */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!a) continue;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            help = 1;
        } else if (!strcmp(a, "--config")) {
            if (i + 1 >= argc || !argv[i + 1] || !strncmp(argv[i + 1], "--", 2)) missing_config = 1;
            else file = argv[++i];
        } else if (!strncmp(a, "--config=", 9)) {
            file = a + 9;
        } else if (a[0] == '-' && a[1] == '-') {
            const char *val;
            size_t nlen = split_flag(a + 2, &val);
            int idx = find_by_flag(a + 2, nlen);
            if (!val && idx >= 0 && g_dirs[idx].type != CT_BOOL && i + 1 < argc && argv[i + 1] &&
                strncmp(argv[i + 1], "--", 2))
                i++;
        }
    }
    if (help) return DMN_CONFIG_HELP;
    if (missing_config) {
        dmn_config_defaults(cfg);
        set_err(err, errlen, "--config: missing value");
        return D2_ECONFIG;
    }
    if (!file) {
        const char *e = getenv("D2OD_CONFIG");
        if (e && *e) file = e;
    }
    if (!file) file = file_or_null;
    return load_from(cfg, file, argc, argv, err, errlen);
}

static int values_equal(const cfg_directive *d, const dmn_config *a, const dmn_config *b) {
    const char *pa = (const char *)a + d->offset, *pb = (const char *)b + d->offset;
    switch (d->type) {
    case CT_INT:
    case CT_BOOL:
    case CT_ENUM: return *(const int *)pa == *(const int *)pb;
    case CT_FLOAT: return *(const double *)pa == *(const double *)pb;
    case CT_SIZE: return *(const uint64_t *)pa == *(const uint64_t *)pb;
    case CT_STRING: return strcmp(pa, pb) == 0;
    }
    return 0;
}

static void copy_value(const cfg_directive *d, dmn_config *dst, const dmn_config *src) {
    size_t n = d->type == CT_STRING  ? d->cap
               : d->type == CT_FLOAT ? sizeof(double)
               : d->type == CT_SIZE  ? sizeof(uint64_t)
                                     : sizeof(int);
    memcpy((char *)dst + d->offset, (const char *)src + d->offset, n);
}

int dmn_config_reload(const dmn_config *current, dmn_config *next, int argc, char **argv,
                      dmn_config_diff *diff, char *err, size_t errlen) {
    if (err && errlen) err[0] = '\0';
    *next = *current;
    memset(diff, 0, sizeof *diff);
    dmn_config *fresh = malloc(sizeof *fresh);
    if (!fresh) {
        set_err(err, errlen, "out of memory");
        return D2_ENOMEM;
    }
    int rc = load_from(fresh, current->config_file, argc, argv, err, errlen);
    if (rc != D2_OK) {
        free(fresh);
        return rc;
    }
    for (int i = 0; i < N_DIRS; i++) {
        const cfg_directive *d = &g_dirs[i];
        if (values_equal(d, current, fresh)) continue;
        if (d->live) {
            copy_value(d, next, fresh);
            next->source[i] = fresh->source[i];
            diff->live[diff->n_live++] = d->name;
        } else {
            diff->restart[diff->n_restart++] = d->name;
        }
    }
    free(fresh);
    return D2_OK;
}

/* ---- help and dump ------------------------------------------------------ */

static void format_value(const cfg_directive *d, const dmn_config *cfg, char *buf, size_t n) {
    const char *p = (const char *)cfg + d->offset;
    switch (d->type) {
    case CT_INT: snprintf(buf, n, "%d", *(const int *)p); return;
    case CT_FLOAT: dmn_value_num(*(const double *)p, buf, n); return;
    case CT_BOOL: snprintf(buf, n, "%s", *(const int *)p ? "true" : "false"); return;
    case CT_ENUM: {
        int v = *(const int *)p, k = 0;
        while (d->enums[k]) k++;
        snprintf(buf, n, "%s", v >= 0 && v < k ? d->enums[v] : "?");
        return;
    }
    case CT_SIZE: {
        uint64_t v = *(const uint64_t *)p;
        if (v && !(v & ((1ull << 30) - 1))) snprintf(buf, n, "%llug", (unsigned long long)(v >> 30));
        else if (v && !(v & ((1ull << 20) - 1))) snprintf(buf, n, "%llum", (unsigned long long)(v >> 20));
        else if (v && !(v & ((1ull << 10) - 1))) snprintf(buf, n, "%lluk", (unsigned long long)(v >> 10));
        else snprintf(buf, n, "%llu", (unsigned long long)v);
        return;
    }
    case CT_STRING: snprintf(buf, n, "%s", p); return;
    }
    snprintf(buf, n, "?");
}

void dmn_config_print_help(FILE *f) {
    fprintf(f,
            "usage: d2od serve [--config FILE] [options]\n"
            "\n"
            "Every option is also a directive of the config file (\"name value\") and an\n"
            "environment variable; command line > environment > config file > default.\n"
            "Bool options: --name, --no-name or --name=true|false.\n"
            "\n"
            "  --config FILE                  read directives from FILE (env D2OD_CONFIG)\n"
            "  --help, -h                     print this help\n");
    for (int i = 0; i < N_DIRS; i++) {
        const cfg_directive *d = &g_dirs[i];
        char fl[64], en[64], left[256], range[96] = "";
        flag_name(d, fl, sizeof fl);
        env_name(d, en, sizeof en);
        if (d->type == CT_ENUM) {
            char alts[96];
            snprintf(left, sizeof left, "%s %s", fl, dmn_value_names(d->enums, "|", alts, sizeof alts));
        } else {
            snprintf(left, sizeof left, "%s %s", fl, d->metavar ? d->metavar : "VALUE");
        }
        if (d->type == CT_INT || d->type == CT_FLOAT || d->type == CT_SIZE) {
            char lo[32], hi[32];
            snprintf(range, sizeof range, ", range %s..%s", dmn_value_num(d->min, lo, sizeof lo),
                     dmn_value_num(d->max, hi, sizeof hi));
        }
        if (strlen(left) > 30) fprintf(f, "  %s\n  %-30s %s\n", left, "", d->help);
        else fprintf(f, "  %-30s %s\n", left, d->help);
        fprintf(f, "  %-30s (%s, default %s%s%s)\n", "", en, *d->def ? d->def : "\"\"", range,
                d->live ? ", reloadable" : "");
    }
}

void dmn_config_dump(const dmn_config *cfg, FILE *f) {
    fprintf(f, "config: file %s\n", cfg->config_file[0] ? cfg->config_file : "(none)");
    for (int i = 0; i < N_DIRS; i++) {
        const cfg_directive *d = &g_dirs[i];
        char v[DMN_CONFIG_PATH_MAX + 8];
        if (!strcmp(d->name, "api_key")) snprintf(v, sizeof v, "%s", cfg->api_key[0] ? "(set)" : "(none)");
        else format_value(d, cfg, v, sizeof v);
        int s = cfg->source[i];
        fprintf(f, "config: %-26s = %s (%s)\n", d->name, v,
                s >= 0 && s <= DMN_SRC_DERIVED ? source_names[s] : "?");
    }
}
