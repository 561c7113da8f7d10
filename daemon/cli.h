/*
 * daemon/cli.h — the subcommands of the d2od binary (internal to daemon/).
 * Each returns a process exit code: 0 ok, 1 runtime failure, 2 usage error.
 */
#ifndef D2_DAEMON_CLI_H
#define D2_DAEMON_CLI_H

#include <stddef.h>

int d2_cmd_generate(int argc, char **argv);
int d2_cmd_tokenize(int argc, char **argv);
int d2_cmd_perplexity(int argc, char **argv);
int d2_cmd_bench(int argc, char **argv);
int d2_cmd_serve(int argc, char **argv);
int d2_cmd_eval(int argc, char **argv);
int d2_cmd_batch(int argc, char **argv);

/* Options: every subcommand but serve declares a table read by daemon/opts.h
 * (serve's settings are the directive table of daemon/config.h). */

/* A --model argument to a loadable local path (daemon/model_ref.c): an
 * existing path as is; a hub id org/name[@rev] through the Hugging Face cache
 * (downloading what is missing; gguf_file picks among several GGUFs, may be
 * NULL). Prints the error to stderr; returns a status. */
int d2_model_resolve(const char *arg, const char *gguf_file, char *out, size_t n);
/* Rewrites a hub id given as --model in argv to its local path and drops
 * --gguf-file NAME (every command but serve, which resolves its configured
 * model itself). 0 ok, else the exit code. */
int d2_cli_resolve_model(int *argc, char **argv);

#endif
