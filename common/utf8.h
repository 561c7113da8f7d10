/*
 * common/utf8.h — UTF-8 helpers shared by the tokenizers, the Jinja
 * interpreter and the JSON writers. Leaf module; pure functions.
 */
#ifndef D2_COMMON_UTF8_H
#define D2_COMMON_UTF8_H

#include <stddef.h>
#include <stdint.h>

/* Length (1-4) of the well-formed UTF-8 sequence at s (no overlongs, no
 * surrogates, nothing above U+10FFFF); 0 when the bytes are invalid; -1 when
 * the sequence is valid so far but runs past avail bytes (or avail is 0). */
int d2_utf8_seq(const uint8_t *s, size_t avail);

/* Writes code point cp (<= U+10FFFF) as UTF-8 into out (room for 4 bytes);
 * returns the number of bytes written. */
int d2_utf8_put(uint32_t cp, char *out);

#endif
