/*
 * daemon/value.h — the one set of value readers behind the daemon's two
 * option tables: the directive table of `serve` (daemon/config.c: config
 * file, environment, command line) and the option table of the other
 * subcommands (daemon/opts.c). A setting typed as an integer, a number, a
 * size, a boolean, a name from a list or a KV budget is read by the same
 * function in both, so it accepts the same text and means the same thing.
 *
 * Every reader takes the whole text (no leading or trailing bytes are
 * skipped), stores *out only on success, and returns D2_OK or D2_EINVAL with
 * why holding the reason, one line that quotes the value but names no
 * option (callers prefix where it came from: "--port: ", "value "):
 *   "'8o' is not an integer"        "70000 out of range [1, 65535]"
 *   "'1x' is not a number"          "'1t' is not a size (digits with an optional k, m or g)"
 *   "'maybe' is not a boolean (true/false, yes/no, on/off, 1/0)"
 *   "'loud' is not one of debug, info, warn, error"
 *   "'1.5': a share of the prompt must be in (0, 1]; a token count is written as an integer"
 * A value out of range is quoted as it was written ("1025m", not its bytes).
 *
 * The rules, per type:
 *   integer  optional sign, then decimal digits only; a value beyond long
 *            long is out of range, not malformed.
 *   number   plain decimal: digits, '.', sign, exponent (no hex, inf, nan,
 *            spaces); finite.
 *   size     digits with an optional k, m or g (KiB, MiB, GiB); no sign.
 *   boolean  true/false, yes/no, on/off, 1/0, any case.
 *   name     one of a NULL-terminated list, any case; the index is the value.
 *   budget   eng_kv_budget_parse (engine/kv_budget.c), the one meaning of a
 *            KV budget: a share of the prompt in (0, 1] or a token count >= 2.
 *
 * Callers: daemon/ only (config.c, opts.c; tests #include value.c). Pure
 * functions over caller data; any thread.
 */
#ifndef D2_DAEMON_VALUE_H
#define D2_DAEMON_VALUE_H

#include <stddef.h>
#include <stdint.h>

/* One KV budget as eng_kv_config holds it: frac > 0 (share of the prompt) or
 * tokens > 0. frac is the share as written ("0.3" is the double 0.3, not the
 * float nearest it), so reports print what was asked. */
typedef struct dmn_kv_budget { double frac; int tokens; } dmn_kv_budget;

/* An int in [min, max] (the range must lie within int). */
int dmn_value_int(const char *v, double min, double max, int *out, char *why, size_t n);
/* A finite double in [min, max]. */
int dmn_value_float(const char *v, double min, double max, double *out, char *why, size_t n);
/* Bytes in [min, max], from digits and an optional k/m/g suffix (powers of 1024). */
int dmn_value_size(const char *v, double min, double max, uint64_t *out, char *why, size_t n);
/* 1 or 0. */
int dmn_value_bool(const char *v, int *out, char *why, size_t n);
/* 1 or 0 for a boolean word, -1 for anything else (no message): lets a
 * command line tell "--watchdog off" from "--watchdog --port 1". */
int dmn_value_bool_word(const char *v);
/* The index of v in names (NULL-terminated). */
int dmn_value_enum(const char *v, const char *const *names, int *out, char *why, size_t n);
/* A KV budget through eng_kv_budget_parse. */
int dmn_value_kv_budget(const char *v, dmn_kv_budget *out, char *why, size_t n);

/* Helpers for messages and help texts. */
/* s made printable for a message: control and non-ASCII bytes become '?',
 * anything past 60 bytes becomes "..."; buf should hold 72 bytes. */
const char *dmn_value_shown(const char *s, char *buf, size_t n);
/* A number without a fraction when it is integral ("16777216", not "1.67772e+07"). */
const char *dmn_value_num(double v, char *buf, size_t n);
/* names joined with sep ("a|b|c"), cut to fit buf. */
const char *dmn_value_names(const char *const *names, const char *sep, char *buf, size_t n);

#endif
