/*
 * tests/fuzz/fuzz_request.c — libFuzzer target for the API's request parser
 * (api_parse_gen for both routes) and stop-string matcher (api_find_stop):
 * arbitrary bytes as a request body must give D2_OK or a 400-style error,
 * never a crash, leak or hang.
 *
 * Build: make fuzz (clang, -fsanitize=fuzzer,address,undefined).
 * Replay without libFuzzer: compile with -DD2_FUZZ_STANDALONE; the binary
 * runs the target on each file argument.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/internal.h"
#include "common/status.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    api_limits lim = {.max_n = 8, .max_tokens_limit = 4096, .n_vocab = 512};
    for (int kind = 0; kind < 2; kind++) {
        api_gen_params p;
        api_error err;
        int rc = api_parse_gen((const char *)data, size, (api_kind)kind, &lim, &p, &err);
        if (rc == D2_OK) {
            if (p.n_stop > 0) {
                size_t partial = 0;
                long at = api_find_stop((const char *)data, size, p.stop, p.n_stop, &partial);
                if (at >= (long)size || partial > size) abort();
            }
            api_gen_params_free(&p);
        } else {
            if (err.http != 400) abort();
            char *j = api_error_json(&err);
            if (!j) abort();
            free(j);
        }
    }
    return 0;
}

#include "tests/fuzz/replay.h"
