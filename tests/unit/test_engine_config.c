/*
 * tests/unit/test_engine_config.c — what eng_engine_config asks of the engine
 * before any step runs: the device choice (cpu and auto build the CPU engine;
 * cuda is refused with D2_EUNSUPPORTED by a build without the CUDA backend,
 * with D2_ECUDA by a CUDA build on a machine without a device).
 *
 * Uses the shipped model models/stories260K (runs from the repo root).
 */
#include "engine/backend.h"
#include "engine/engine.h"
#include "tests/test.h"

#define MODEL "models/stories260K/stories260K.gguf"

static int create_on(eng_device dev, eng_engine **e) {
    REQUIRE_FILE(MODEL);
    eng_engine_config ec = {.model_path = MODEL, .device = dev, .n_threads = 1, .max_seqs = 2,
                            .kv_pages = 64, .max_batch_tokens = 32};
    return eng_engine_create(&ec, e);
}

TEST(device_cpu_and_auto_build_an_engine) {
    eng_engine *e = NULL;
    ASSERT_EQ(create_on(ENG_DEVICE_CPU, &e), D2_OK);
    ASSERT(e != NULL);
    eng_engine_destroy(e);
    e = NULL;
    ASSERT_EQ(create_on(ENG_DEVICE_AUTO, &e), D2_OK);
    ASSERT(e != NULL);
    eng_pool_stats ps = eng_engine_pool_stats(e);
    ASSERT_EQ(ps.pages_total, 64);
    eng_engine_destroy(e);
}

TEST(device_cuda_is_refused_without_backend_or_device) {
    int n = eng_cuda_device_count();
    if (n > 0) SKIP("a CUDA device is present (tests/gpu/test_backend_cuda covers it)");
    eng_engine *e = (eng_engine *)&e; /* must be reset to NULL */
    ASSERT_EQ(create_on(ENG_DEVICE_CUDA, &e), n == D2_EUNSUPPORTED ? D2_EUNSUPPORTED : D2_ECUDA);
    ASSERT(e == NULL);
}

TEST(device_out_of_range_is_invalid) {
    eng_engine *e = NULL;
    ASSERT_EQ(create_on((eng_device)7, &e), D2_EINVAL);
    ASSERT(e == NULL);
}
