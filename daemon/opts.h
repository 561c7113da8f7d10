/*
 * daemon/opts.h — the option table of the one-shot subcommands (generate,
 * tokenize, perplexity, bench, eval, and any later one), as the directive
 * table of daemon/config.h is for `serve`.
 *
 * A command describes each option once — flag name, type, where it is stored,
 * default, range, help — and dmn_opts_parse reads argv from it, checks every
 * value, and fills the command's own options struct; --help is generated from
 * the same rows, so the help, the defaults and the checks cannot drift apart.
 * Defaults are written as text and go through the same parser as the command
 * line, so a default can never be a value the parser would refuse.
 *
 * Command line: "--name VALUE" or "--name=VALUE"; a DMN_OPT_FLAG takes no
 * value; "-h"/"--help" asks for the help; the last occurrence of an option
 * wins. Anything else is a usage error naming the option and the reason:
 *   "--temperature: 'abc' is not a number"
 *   "--top-k: 99999999999 out of range [0, 16777216]"
 *   "--device: 'tpu' is not one of cpu, cuda, auto"
 *   "--kv-budget: '1.5': a share of the prompt must be in (0, 1]; ..."
 *   "--model is required", "unknown option '--frob'", "--prompt needs a value"
 * Values are read by the readers serve's directive table uses
 * (daemon/value.h: the same rules for integers, numbers and names, which are
 * matched in any case), and KV budgets by the engine's one budget reader
 * underneath, so they mean the same here as in the config file and in
 * requests.
 *
 * Callers: daemon/ only (the subcommands; tests/unit/test_opts.c #includes
 * opts.c). Plain functions over caller data; no global state.
 */
#ifndef D2_DAEMON_OPTS_H
#define D2_DAEMON_OPTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "daemon/value.h" /* dmn_kv_budget */

typedef enum dmn_opt_type {
    DMN_OPT_STR,            /* const char *: borrowed from argv (or the default text) */
    DMN_OPT_INT,            /* int in [min, max] */
    DMN_OPT_FLOAT,          /* double in [min, max] (finite) */
    DMN_OPT_FLAG,           /* bool, true when present; takes no value */
    DMN_OPT_ENUM,           /* int: index of the value in names (matched in any case) */
    DMN_OPT_INT_LIST,       /* dmn_int_list: "1,8,32", each in [min, max] */
    DMN_OPT_FLOAT_LIST,     /* dmn_float_list: "0,0.5,1", each in [min, max] */
    DMN_OPT_ENUM_LIST,      /* dmn_int_list: "full,d2o", indices into names, repeats dropped */
    DMN_OPT_KV_BUDGET,      /* dmn_kv_budget via eng_kv_budget_parse */
    DMN_OPT_KV_BUDGET_LIST, /* dmn_kv_budget_list: "0.1,0.2", each via eng_kv_budget_parse */
} dmn_opt_type;

#define DMN_OPT_LIST_MAX 16

typedef struct dmn_int_list { int n; int v[DMN_OPT_LIST_MAX]; } dmn_int_list;
typedef struct dmn_float_list { int n; double v[DMN_OPT_LIST_MAX]; } dmn_float_list;
typedef struct dmn_kv_budget_list { int n; dmn_kv_budget v[DMN_OPT_LIST_MAX]; } dmn_kv_budget_list;

/* dmn_opt.flags */
#define DMN_OPT_REQUIRED 1u  /* absent: usage error "--name is required" */
#define DMN_OPT_SHARES 2u    /* KV budgets: shares of the prompt only (no token counts) */
#define DMN_OPT_SEEN 4u      /* set the bool at seen_offset when the option is given */

typedef struct dmn_opt {
    const char *name;         /* flag without the dashes: "max-tokens" */
    dmn_opt_type type;
    size_t offset;            /* of the field in the command's options struct */
    const char *def;          /* default as command-line text; NULL: none (field stays zero) */
    double min, max;          /* INT, FLOAT and the elements of INT_LIST, FLOAT_LIST: inclusive range */
    int max_count;            /* lists: most values (0: DMN_OPT_LIST_MAX) */
    const char *const *names; /* ENUM, ENUM_LIST: NULL-terminated; index = value */
    unsigned flags;           /* DMN_OPT_* above */
    size_t seen_offset;       /* with DMN_OPT_SEEN: a bool in the options struct */
    const char *metavar;      /* for --help ("N"); NULL: from the type */
    const char *help;         /* one line */
} dmn_opt;

typedef struct dmn_cmd_spec {
    const char *name;         /* "generate": messages read "d2od generate: ..." */
    const char *usage;        /* after "usage: d2od NAME " */
    const char *about;        /* paragraph(s) between the usage line and the options */
    const dmn_opt *opts;
    int n_opts;
    size_t size;              /* sizeof the command's options struct (zeroed before parsing) */
} dmn_cmd_spec;

/* Returned by dmn_opts_parse when -h/--help was given (positive: not an error). */
#define DMN_OPTS_HELP 1

/* Zeroes *out (the command's options struct), applies every default, then
 * argv[1..argc) (argv[0], the command name, is skipped), then checks the
 * required options. D2_OK, DMN_OPTS_HELP, or D2_EINVAL with err holding one
 * line naming the option and the reason (no command prefix). */
int dmn_opts_parse(const dmn_cmd_spec *cmd, void *out, int argc, char **argv, char *err, size_t errlen);

/* dmn_opts_parse for a subcommand's entry point: returns -1 to go on, or the
 * exit code — 0 after printing the help on stdout, 2 after printing
 * "d2od NAME: <error>" and a pointer to --help on stderr. */
int dmn_opts_main(const dmn_cmd_spec *cmd, void *out, int argc, char **argv);

/* The generated help: usage, about, one line per option with its default,
 * range or choices, and -h/--help. */
void dmn_opts_help(const dmn_cmd_spec *cmd, FILE *f);

/* For checks a single option cannot make (e.g. "--prompt or --prompt-file"):
 * prints "d2od NAME: <message>" on stderr and returns 2, the usage exit code. */
int dmn_opts_usage_error(const dmn_cmd_spec *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Rows shared by several commands (T: the command's options struct, with
 * const char *model, int threads, int device). */
#define DMN_OPT_ROW_MODEL(T)                                                                  \
    {.name = "model", .type = DMN_OPT_STR, .offset = offsetof(T, model), .flags = DMN_OPT_REQUIRED, \
     .metavar = "M", .help = "GGUF file or Hugging Face model directory"}
#define DMN_OPT_ROW_THREADS(T)                                                                \
    {.name = "threads", .type = DMN_OPT_INT, .offset = offsetof(T, threads), .def = "0", .min = 0, \
     .max = 1024, .help = "CPU threads, 0 = every online core"}
#define DMN_OPT_ROW_DEVICE(T)                                                                 \
    {.name = "device", .type = DMN_OPT_ENUM, .offset = offsetof(T, device), .def = "cpu",       \
     .names = dmn_opt_devices, .help = "compute backend (cuda: a build with make CUDA=1 and a GPU)"}

/* Names shared by several commands; index = the engine's enum value. */
extern const char *const dmn_opt_kv_methods[];   /* full, d2o, ... = eng_kv_method */
extern const char *const dmn_opt_kv_granularities[]; /* layer, head = eng_kv_granularity */
extern const char *const dmn_opt_devices[];      /* cpu, cuda, auto = eng_device */

#endif
