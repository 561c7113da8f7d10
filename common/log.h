/*
 * common/log.h — leveled logging to stderr.
 *
 * D2_LOG checks the level before formatting, so a disabled level costs one
 * comparison. Lines carry a timestamp and level. Never log per token at INFO.
 * Thread-safe: each line is written with a single fprintf under stdio's lock.
 */
#ifndef D2_COMMON_LOG_H
#define D2_COMMON_LOG_H

#include <stdatomic.h>

typedef enum d2_log_level {
    D2_LOG_DEBUG = 0,
    D2_LOG_INFO = 1,
    D2_LOG_WARN = 2,
    D2_LOG_ERROR = 3,
    D2_LOG_OFF = 4,
} d2_log_level;

/* Written by SIGHUP reloads (the main loop) while every thread reads it:
 * atomic, read relaxed (a level change need not order anything else). */
extern atomic_int d2_log_min_level;

void d2_log_set_level(d2_log_level lvl);
/* Parses "debug", "info", "warn", "error", "off"; returns 0 or D2_EINVAL. */
int d2_log_parse_level(const char *s, d2_log_level *out);
void d2_log_write(d2_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define D2_LOG(lvl, ...)                                                       \
    do {                                                                       \
        if ((int)(lvl) >= atomic_load_explicit(&d2_log_min_level, memory_order_relaxed)) d2_log_write((lvl), __VA_ARGS__);       \
    } while (0)
#define D2_DEBUG(...) D2_LOG(D2_LOG_DEBUG, __VA_ARGS__)
#define D2_INFO(...) D2_LOG(D2_LOG_INFO, __VA_ARGS__)
#define D2_WARN(...) D2_LOG(D2_LOG_WARN, __VA_ARGS__)
#define D2_ERROR(...) D2_LOG(D2_LOG_ERROR, __VA_ARGS__)

#endif
