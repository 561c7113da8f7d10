/*
 * tests/fuzz/fuzz_jinja.c — fuzz target for api/jinja/jinja.h: arbitrary bytes as
 * template source, rendered against a fixed chat context. Must never crash,
 * hang or leak; errors are fine.
 *
 * libFuzzer:   clang -fsanitize=fuzzer,address -I. tests/fuzz/fuzz_jinja.c api/jinja_*.c \
 *                  common/log.c common/status.c -ljansson -lm -o fuzz_jinja
 * Standalone:  build with -DD2_FUZZ_STANDALONE; ./fuzz_jinja FILE... replays each file
 *              (no arguments: a few built-in seeds).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "api/jinja/jinja.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static json_t *fuzz_context(void) {
    static const char *ctx =
        "{\"messages\":[{\"role\":\"system\",\"content\":\"sys\"},{\"role\":\"user\",\"content\":\"h\\u00e9llo \\ud83d\\ude00\"},"
        "{\"role\":\"assistant\",\"content\":\"<think>\\nr\\n</think>\\n\\nok\",\"tool_calls\":[{\"id\":\"abcdefghi\","
        "\"function\":{\"name\":\"f\",\"arguments\":{\"a\":1,\"b\":[1.5,null,true]}}}]},"
        "{\"role\":\"tool\",\"content\":\"42\"}],\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\","
        "\"parameters\":{\"type\":\"object\"}}}],\"add_generation_prompt\":true,\"bos_token\":\"<s>\",\"eos_token\":\"</s>\"}";
    return json_loads(ctx, 0, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static json_t *ctx;
    if (!ctx) ctx = fuzz_context();
    char *src = malloc(size + 1);
    if (!src) return 0;
    memcpy(src, data, size);
    src[size] = 0;
    api_jinja_tmpl *t = NULL;
    char err[256];
    if (api_jinja_compile(src, &t, err, sizeof err) == 0) {
        char *out = NULL;
        if (api_jinja_render(t, ctx, &out, NULL, err, sizeof err) == 0) free(out);
        api_jinja_free(t);
    }
    free(src);
    return 0;
}

#include "tests/fuzz/replay.h"
