/*
 * tests/fuzz/fuzz_safetensors.c — libFuzzer target for the safetensors
 * reader (engine/model/safetensors.c): parse, then read the first and last byte of
 * every tensor's data so a bad range shows up under ASan.
 * Build: see tests/fuzz/README. With -DD2_FUZZ_STANDALONE a main() replays
 * the files given as arguments (a corpus) instead of fuzzing.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "common/util.h"
#include "engine/model/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    d2_log_set_level(D2_LOG_OFF);
    st_file f;
    if (st_parse(data, size, "fuzz", &f) != D2_OK) return 0;
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < f.n_tensors; i++) {
        const st_tensor *t = &f.tensors[i];
        if (t->end > t->begin) sink ^= t->data[0] ^ t->data[t->end - t->begin - 1];
        if (st_find(&f, t->name) == NULL) abort();
    }
    (void)sink;
    st_free(&f);
    return 0;
}

#include "tests/fuzz/replay.h"
