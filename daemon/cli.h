/*
 * daemon/cli.h — the subcommands of the d2od binary (internal to daemon/).
 * Each returns a process exit code: 0 ok, 1 runtime failure, 2 usage error.
 */
#ifndef D2_DAEMON_CLI_H
#define D2_DAEMON_CLI_H

int d2_cmd_generate(int argc, char **argv);
int d2_cmd_tokenize(int argc, char **argv);
int d2_cmd_perplexity(int argc, char **argv);
int d2_cmd_bench(int argc, char **argv);
int d2_cmd_serve(int argc, char **argv);
int d2_cmd_eval(int argc, char **argv);

/* Shared option parsing: returns the value of --name (advancing *i), or NULL
 * and prints an error when the value is missing. */
const char *d2_cli_value(int argc, char **argv, int *i);
/* Parses an int/float option value with range checks; 0 ok, -1 after
 * printing "option: reason" to stderr. */
int d2_cli_int(const char *opt, const char *s, long lo, long hi, long *out);
int d2_cli_float(const char *opt, const char *s, double lo, double hi, double *out);

#endif
