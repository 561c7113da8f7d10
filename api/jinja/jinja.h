/*
 * api/jinja/jinja.h — a small Jinja interpreter for Hugging Face chat templates.
 *
 * Renders chat templates (the "chat_template" string of tokenizer_config.json)
 * byte-identically to the npm package @huggingface/jinja (0.5.x), which is what
 * transformers.js uses: the template is always lexed with trim_blocks and
 * lstrip_blocks on, undefined values print as nothing, numbers follow
 * JavaScript formatting, and the same subset of filters/tests/methods exists
 * (anything that package rejects is an error here too). Known divergences are
 * listed in tests/fixtures/jinja/README.md.
 *
 * Templates come from model files, so they are untrusted: every failure is a
 * status (never a crash), recursion is bounded, the evaluation has a step
 * budget, and output and working memory are capped (API_JINJA_MAX_OUTPUT,
 * API_JINJA_MAX_MEMORY).
 *
 * Module-internal header of api/ (prefix api_jinja_). A compiled template is
 * immutable: one api_jinja_tmpl may be rendered from many threads at once.
 */
#ifndef D2_API_JINJA_H
#define D2_API_JINJA_H

#include <stddef.h>
#include <time.h>

#include <jansson.h>

#define API_JINJA_MAX_OUTPUT (16u << 20)  /* bytes of rendered text */
#define API_JINJA_MAX_MEMORY (256u << 20) /* working memory of one render */

typedef struct api_jinja_tmpl api_jinja_tmpl;

/* Compiles template source src (NUL-terminated, UTF-8).
 * On success *out owns the template (free with api_jinja_free).
 * Errors: D2_EINVAL (syntax; message in err), D2_ENOMEM. */
int api_jinja_compile(const char *src, api_jinja_tmpl **out, char *err, size_t errlen);

/* Renders t with the variables of the JSON object context (borrowed; e.g.
 * messages, tools, add_generation_prompt, bos_token, eos_token, and any extra
 * caller variables). On success *out is a malloc'd NUL-terminated string the
 * caller frees (*out_len, when not NULL, gets its length).
 * Errors: D2_EINVAL with the message in err — raise_exception(msg) gives
 * exactly msg; type errors, unknown filters, exhausted limits describe the
 * problem. D2_ENOMEM when memory runs out. */
int api_jinja_render(const api_jinja_tmpl *t, json_t *context, char **out, size_t *out_len,
                     char *err, size_t errlen);

/* Same, with strftime_now() reading the broken-down time *now instead of the
 * local clock (for reproducible tests; NULL means the clock). */
int api_jinja_render_at(const api_jinja_tmpl *t, json_t *context, const struct tm *now,
                        char **out, size_t *out_len, char *err, size_t errlen);

void api_jinja_free(api_jinja_tmpl *t); /* accepts NULL */

#endif
