/*
 * tests/unit/test_engine_config.c — what eng_engine_config asks of the engine
 * before any step runs: the device choice (cpu and auto build the CPU engine;
 * cuda is refused with D2_EUNSUPPORTED by a build without the CUDA backend,
 * with D2_ECUDA by a CUDA build on a machine without a device), and the one
 * reader of a KV budget (eng_kv_budget_parse / _number).
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

/* ---- eng_kv_budget_parse: the one meaning of a KV budget ---------------------- */

static void expect_budget(const char *s, double frac, int tokens) {
    float f = -1;
    int t = -1;
    const char *why = "unset";
    int rc = eng_kv_budget_parse(s, &f, &t, &why);
    if (rc != D2_OK) FAIL_("'%s' refused: %s", s, why ? why : "(no reason)");
    if (why != NULL) FAIL_("'%s': why set on success", s);
    if (fabs(f - frac) > 1e-7 || t != tokens) FAIL_("'%s' -> frac %g tokens %d, want %g %d", s, f, t, frac, tokens);
}

static void expect_budget_refused(const char *s) {
    float f = 0.5f;
    int t = 7;
    const char *why = NULL;
    if (eng_kv_budget_parse(s, &f, &t, &why) != D2_EINVAL) FAIL_("'%s' accepted", s);
    if (!why || !*why) FAIL_("'%s' refused without a reason", s);
    if (f != 0.5f || t != 7) FAIL_("'%s' changed the outputs on error", s);
}

TEST(kv_budget_fractions) {
    expect_budget("0.2", 0.2, 0);
    expect_budget(".5", 0.5, 0);
    expect_budget("0.05", 0.05, 0);
    expect_budget("1.0", 1.0, 0);
    expect_budget("1.", 1.0, 0);
    expect_budget("001", 1.0, 0);
    /* "1" is a share (as many tokens as the prompt), never one token (perplexity used to read it so) */
    expect_budget("1", 1.0, 0);
}

TEST(kv_budget_token_counts) {
    expect_budget("2", 0, 2);
    expect_budget("128", 0, 128);
    expect_budget("1073741824", 0, 1 << 30);
}

TEST(kv_budget_refusals_name_a_reason) {
    const char *bad[] = {"",    "0",    "0.0",  "-0.2", "+0.2",  "1.5",        "2.0",  "128.0", "1e-1",
                         "0x10", "inf", "nan",  " 0.2", "0.2 ",  "0.2x",       ".",    "1..2",  "12t",
                         "1073741825", "99999999999999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) expect_budget_refused(bad[i]);
    float f;
    int t;
    ASSERT_EQ(eng_kv_budget_parse(NULL, &f, &t, NULL), D2_EINVAL);
}

TEST(kv_budget_numbers_follow_the_same_rule) {
    float f = -1;
    int t = -1;
    const char *why = NULL;
    ASSERT_EQ(eng_kv_budget_number(0.25, false, &f, &t, &why), D2_OK);
    ASSERT(fabs(f - 0.25) < 1e-7 && t == 0);
    ASSERT_EQ(eng_kv_budget_number(1, true, &f, &t, &why), D2_OK); /* JSON integer 1: the share 1 */
    ASSERT(f == 1.0f && t == 0);
    ASSERT_EQ(eng_kv_budget_number(64, true, &f, &t, &why), D2_OK);
    ASSERT(f == 0.0f && t == 64);
    ASSERT_EQ(eng_kv_budget_number(64, false, &f, &t, &why), D2_EINVAL); /* JSON 64.0 */
    ASSERT(why != NULL);
    ASSERT_EQ(eng_kv_budget_number(0, true, &f, &t, &why), D2_EINVAL);
    ASSERT_EQ(eng_kv_budget_number(-3, true, &f, &t, &why), D2_EINVAL);
    ASSERT_EQ(eng_kv_budget_number(NAN, false, &f, &t, &why), D2_EINVAL);
    ASSERT_EQ(eng_kv_budget_number(2.0 * (1 << 30), true, &f, &t, &why), D2_EINVAL);
}
