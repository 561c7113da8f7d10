/*
 * daemon/config.h — the d2od daemon's configuration: one table of typed
 * directives, read from a file, the environment and the command line.
 *
 * Every setting has exactly one entry in the table in daemon/config.c: its
 * name, type, default, range, environment variable (D2OD_<UPPER_NAME>),
 * command-line flag (--kebab-name), whether a SIGHUP reload may apply it live,
 * and a one-line help. --help, the startup dump, the reload diff and
 * configs/d2od.conf (checked by tests/unit/test_config.c) all derive from it.
 *
 * Precedence, lowest first: built-in default < file < environment < command
 * line. The file is the one named by --config FILE, else $D2OD_CONFIG, else the
 * file_or_null argument of dmn_config_load().
 *
 * File format (nginx/redis-like): one "name value" per line; '#' starts a
 * comment (at the start of a line, or after whitespace following the value);
 * blank lines are ignored; a value may be double-quoted, with \" and \\ as the
 * only escapes. Each directive may appear once per file.
 *
 * Errors fill err with one line naming where the bad value came from:
 *   "FILE:LINE: directive 'port': value 70000 out of range [1, 65535]"
 *   "environment D2OD_PORT: value 'x' is not an integer"
 *   "--port: missing value"
 * and return D2_ECONFIG (D2_ENOENT / D2_EIO when the file cannot be read).
 *
 * Callers: daemon/ only (the serve command, the SIGHUP handler's reload path,
 * tests and the fuzz target). Not thread-safe in the sense that a dmn_config
 * is plain data owned by its caller: load into a private struct, then publish.
 * dmn_config_load/reload read the environment (getenv), so do not call them
 * while another thread calls setenv.
 */
#ifndef D2_DAEMON_CONFIG_H
#define D2_DAEMON_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Capacity of the table; the table itself may hold fewer directives. */
#define DMN_CONFIG_MAX_DIRECTIVES 64

/* Fixed-size strings keep dmn_config a plain value: copy with '=', no frees. */
#define DMN_CONFIG_PATH_MAX 1024
#define DMN_CONFIG_STR_MAX 256

/* Returned by dmn_config_load() when --help or -h was given: print
 * dmn_config_print_help() and exit 0. Positive so callers testing "< 0" for
 * errors do not treat it as one. */
#define DMN_CONFIG_HELP 1

/* Values of the enum directives; stored in plain int fields. */
enum dmn_log_level { DMN_LOG_DEBUG = 0, DMN_LOG_INFO, DMN_LOG_WARN, DMN_LOG_ERROR };
/* Same numbering as d2_log_level in common/log.h, so a cast converts. */

enum dmn_kv_method {
    DMN_KV_FULL = 0,
    DMN_KV_D2O,
    DMN_KV_H2O,
    DMN_KV_STREAMINGLLM,
    DMN_KV_SNAPKV,
    DMN_KV_PYRAMIDKV,
};

/* Same numbering as eng_device in engine/engine.h (serve.c checks it). */
enum dmn_device { DMN_DEVICE_CPU = 0, DMN_DEVICE_CUDA, DMN_DEVICE_AUTO };

/* Where a directive's current value came from (for the startup dump). */
enum dmn_config_source { DMN_SRC_DEFAULT = 0, DMN_SRC_FILE, DMN_SRC_ENV, DMN_SRC_CLI, DMN_SRC_DERIVED };

typedef struct dmn_config {
    /* model and API */
    char model[DMN_CONFIG_PATH_MAX];                /* GGUF file, HF directory or hub id; required */
    char gguf_file[DMN_CONFIG_STR_MAX];             /* hub id: which GGUF ("" = the only one) */
    char served_model_name[DMN_CONFIG_STR_MAX];     /* "" in the table: derived from model */
    char host[DMN_CONFIG_STR_MAX];
    int port;
    char api_key[DMN_CONFIG_STR_MAX];               /* "" = no authentication */
    int api_key_for_health_metrics;                 /* bool: /health and /metrics need the key */
    /* engine */
    int threads;                                    /* 0 = all online cores */
    int ctx_len;                                    /* 0 = the model's */
    int max_seqs;
    int max_batch_tokens;
    int page_tokens;
    int kv_mem_mb;                                  /* 0 = automatic */
    int kv_method;                                  /* enum dmn_kv_method */
    char kv_budget[32];                             /* "0.2" (share) or "128" (tokens): eng_kv_budget_parse */
    int kv_preset;                                  /* 0 default, 1 official (eng_kv_preset_apply) */
    int kv_granularity;                             /* 0 auto (the preset's), 1 layer, 2 head */
    double kv_budget_frac;                          /* derived: share of the prompt in (0,1], or 0 */
    long kv_budget_tokens;                          /* derived: token count >= 2, or 0 */
    int device;                                     /* enum dmn_device */
    double gpu_memory_utilization;                  /* CUDA: share of device memory, (0, 1] */
    int cuda_graphs;                                /* CUDA: decode steps replay graphs (bool) */
    /* admission and limits */
    int max_queue;                                  /* queued requests beyond this get 429 */
    int max_tokens_limit;
    int default_max_tokens;
    int max_n;
    uint64_t body_limit;                            /* bytes */
    double request_timeout_s;                       /* 0 = no limit */
    double drain_timeout_s;
    /* operations */
    int log_level;                                  /* enum dmn_log_level */
    int log_requests;                               /* bool */
    int watchdog;                                   /* bool: ping systemd's watchdog */

    /* Bookkeeping, not directives. */
    char config_file[DMN_CONFIG_PATH_MAX];          /* file read by load ("" = none); reload rereads it */
    unsigned char source[DMN_CONFIG_MAX_DIRECTIVES]; /* enum dmn_config_source, by table index */
} dmn_config;

/* The directives a reload changed, by name (pointers into the static table). */
typedef struct dmn_config_diff {
    int n_live;                                     /* changed and applied in *next */
    const char *live[DMN_CONFIG_MAX_DIRECTIVES];
    int n_restart;                                  /* changed in the sources, need a restart */
    const char *restart[DMN_CONFIG_MAX_DIRECTIVES];
} dmn_config_diff;

/* Fills cfg with the table's defaults (no derived values, config_file ""). */
void dmn_config_defaults(dmn_config *cfg);

/* The whole load: defaults, then the file, then D2OD_* environment variables,
 * then argv, then dmn_config_finalize(). argv follows the getopt convention:
 * argv[0] is the program or subcommand name and is skipped. Flags are
 * "--kebab-name VALUE" or "--kebab-name=VALUE"; a bool flag alone means true,
 * "--no-kebab-name" means false, and a following true/false/yes/no/on/off/1/0
 * word is taken as its value. "--config FILE" names the file; "--help"/"-h"
 * makes it return DMN_CONFIG_HELP (nothing else is read or checked).
 * Returns D2_OK, DMN_CONFIG_HELP, or an error with err filled. */
int dmn_config_load(dmn_config *cfg, const char *file_or_null, int argc, char **argv,
                    char *err, size_t errlen);

/* One step each, for tests and the fuzz target. Each applies what it reads on
 * top of cfg. parse_buffer's name is used in messages ("name:LINE: ...");
 * buf need not be NUL-terminated and may hold any bytes. */
int dmn_config_parse_buffer(dmn_config *cfg, const char *buf, size_t len, const char *name,
                            char *err, size_t errlen);
int dmn_config_parse_file(dmn_config *cfg, const char *path, char *err, size_t errlen);
int dmn_config_apply_env(dmn_config *cfg, char *err, size_t errlen);
int dmn_config_apply_argv(dmn_config *cfg, int argc, char **argv, char *err, size_t errlen);
/* Derives served_model_name and the kv_budget fields, then checks what one
 * directive cannot check alone: model is set; default_max_tokens <=
 * max_tokens_limit. */
int dmn_config_finalize(dmn_config *cfg, char *err, size_t errlen);

/* SIGHUP: loads the file current->config_file, the environment and argv (the
 * daemon's original argv) afresh. On success *next is current with every
 * changed live-reloadable directive updated (log_level, log_requests,
 * max_queue, request_timeout_s, default_max_tokens, max_tokens_limit,
 * api_key), and diff lists those (live) and the changed directives that need a
 * restart (restart; their old values stay in *next). On error *next is a copy
 * of current and err says why: the daemon keeps running on the old values. */
int dmn_config_reload(const dmn_config *current, dmn_config *next, int argc, char **argv,
                      dmn_config_diff *diff, char *err, size_t errlen);

/* The --help text for every directive plus --config and --help. */
void dmn_config_print_help(FILE *f);
/* "name = value (source)" per directive, for the startup log; api_key masked. */
void dmn_config_dump(const dmn_config *cfg, FILE *f);

const char *dmn_kv_method_name(int m);
const char *dmn_device_name(int d);
const char *dmn_log_level_name(int l);

#endif
