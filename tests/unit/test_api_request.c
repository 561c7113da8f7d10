/*
 * tests/unit/test_api_request.c — request-body parsing (api/request.c):
 * the "kv_compression" extension (methods, budgets as fractions and token
 * counts, optional keys, every invalid form answered 400 naming the field),
 * a few core fields, and stop-string matching.
 */
#include "api/internal.h"
#include "tests/test.h"

/* a condition that must hold (test.h has comparisons only) */
#define ASSERT_YES(cond) ASSERT_NE((int)!!(cond), 0)

static const api_limits LIM = {.max_n = 4, .max_tokens_limit = 1024, .n_vocab = 512, .n_layers = 5};

static int parse(const char *body, api_kind kind, api_gen_params *p, api_error *err) {
    memset(err, 0, sizeof *err);
    return api_parse_gen(body, strlen(body), kind, &LIM, p, err);
}

/* A completion body with the given kv_compression value (JSON text). */
static int parse_kv(const char *kv_json, api_gen_params *p, api_error *err) {
    char body[512];
    snprintf(body, sizeof body, "{\"prompt\": \"Once\", \"max_tokens\": 4, \"kv_compression\": %s}", kv_json);
    return parse(body, API_COMPLETIONS, p, err);
}

static void expect_kv_error(const char *kv_json) {
    api_gen_params p;
    api_error err;
    int rc = parse_kv(kv_json, &p, &err);
    if (rc == D2_OK) {
        api_gen_params_free(&p);
        FAIL_("kv_compression %s was accepted", kv_json);
    }
    ASSERT_EQ(err.http, 400);
    if (strcmp(err.param, "kv_compression") != 0) FAIL_("%s: param '%s', want kv_compression", kv_json, err.param);
    if (!strstr(err.message, "kv_compression")) FAIL_("%s: message '%s' does not name the field", kv_json, err.message);
}

TEST(kv_absent_means_server_default) {
    api_gen_params p;
    api_error err;
    ASSERT_OK(parse("{\"prompt\": \"Once\"}", API_COMPLETIONS, &p, &err));
    ASSERT_YES(!p.has_kv);
    api_gen_params_free(&p);
    ASSERT_OK(parse_kv("null", &p, &err));
    ASSERT_YES(!p.has_kv);
    api_gen_params_free(&p);
}

TEST(kv_method_and_fraction) {
    api_gen_params p;
    api_error err;
    ASSERT_OK(parse_kv("{\"method\": \"d2o\", \"budget\": 0.2}", &p, &err));
    ASSERT_YES(p.has_kv);
    ASSERT_EQ(p.kv.method, ENG_KV_D2O);
    ASSERT_NEAR(p.kv.budget_frac, 0.2, 1e-6);
    ASSERT_EQ(p.kv.budget_tokens, 0);
    /* the rest are the method's defaults */
    eng_kv_config def;
    eng_kv_config_default(&def, ENG_KV_D2O);
    ASSERT_NEAR(p.kv.heavy_share, def.heavy_share, 1e-6);
    ASSERT_EQ(p.kv.n_sink, def.n_sink);
    ASSERT_EQ(p.kv.merge_rule, def.merge_rule);
    ASSERT_EQ(p.kv.exact, def.exact);
    api_gen_params_free(&p);
}

TEST(kv_every_method_parses) {
    static const char *names[] = {"full", "d2o", "h2o", "streamingllm", "snapkv", "pyramidkv"};
    static const eng_kv_method want[] = {ENG_KV_FULL, ENG_KV_D2O, ENG_KV_H2O, ENG_KV_STREAMINGLLM,
                                         ENG_KV_SNAPKV, ENG_KV_PYRAMIDKV};
    for (int i = 0; i < 6; i++) {
        char kv[128];
        snprintf(kv, sizeof kv, "{\"method\": \"%s\", \"budget\": 0.5}", names[i]);
        api_gen_params p;
        api_error err;
        if (parse_kv(kv, &p, &err) != D2_OK) FAIL_("%s: %s", names[i], err.message);
        ASSERT_EQ(p.kv.method, want[i]);
        api_gen_params_free(&p);
    }
}

TEST(kv_budget_token_count_and_one) {
    api_gen_params p;
    api_error err;
    ASSERT_OK(parse_kv("{\"method\": \"h2o\", \"budget\": 128}", &p, &err));
    ASSERT_EQ(p.kv.method, ENG_KV_H2O);
    ASSERT_EQ(p.kv.budget_tokens, 128);
    api_gen_params_free(&p);
    /* the integer 1 is the share 1 (as the length of the prompt), never one token: the engine's one
     * meaning (eng_kv_budget_number), as kv_budget "1" in the config file and --kv-budget 1 */
    ASSERT_OK(parse_kv("{\"method\": \"h2o\", \"budget\": 1}", &p, &err));
    ASSERT_EQ(p.kv.budget_tokens, 0);
    ASSERT_NEAR(p.kv.budget_frac, 1.0, 1e-6);
    api_gen_params_free(&p);
    ASSERT_OK(parse_kv("{\"method\": \"snapkv\", \"budget\": 1.0}", &p, &err));
    ASSERT_EQ(p.kv.budget_tokens, 0);
    ASSERT_NEAR(p.kv.budget_frac, 1.0, 1e-6);
    api_gen_params_free(&p);
    /* a count is written as an integer: 64.0 is a share above 1, refused with the reason */
    ASSERT_EQ(parse_kv("{\"method\": \"h2o\", \"budget\": 64.0}", &p, &err), -1);
    ASSERT_EQ(err.http, 400);
    ASSERT_STREQ(err.param, "kv_compression");
    ASSERT(strstr(err.message, "kv_compression.budget 64: a share of the prompt must be in (0, 1]") != NULL);
}

TEST(kv_optional_keys) {
    api_gen_params p;
    api_error err;
    ASSERT_OK(parse_kv("{\"method\": \"d2o\", \"budget\": 0.4, \"heavy_share\": 0.75, \"exact\": true, "
                       "\"merge_rule\": \"code\"}",
                       &p, &err));
    ASSERT_NEAR(p.kv.heavy_share, 0.75, 1e-6);
    ASSERT_YES(p.kv.exact);
    ASSERT_EQ(p.kv.merge_rule, ENG_KV_MERGE_CODE);
    api_gen_params_free(&p);
    ASSERT_OK(parse_kv("{\"method\": \"d2o\", \"merge_rule\": \"normalised\", \"exact\": false}", &p, &err));
    ASSERT_EQ(p.kv.merge_rule, ENG_KV_MERGE_NORMALISED);
    ASSERT_YES(!p.kv.exact);
    api_gen_params_free(&p);
}

/* "preset": "official" = D2O as the official code runs it; explicit fields
 * override it; it applies to d2o only. */
TEST(kv_preset_official) {
    api_gen_params p;
    api_error err;
    ASSERT_OK(parse_kv("{\"method\": \"d2o\", \"preset\": \"official\"}", &p, &err));
    ASSERT_EQ(p.kv.merge_rule, ENG_KV_MERGE_CODE);
    ASSERT_YES(p.kv.exact);
    ASSERT_NEAR(p.kv.heavy_share, 0.5, 1e-9);
    ASSERT_NEAR(p.kv.ema_beta, 0.5, 1e-9);
    ASSERT_EQ(p.kv.n_sink, 4);
    ASSERT_EQ(p.kv.granularity, ENG_KV_GRAN_HEAD);
    for (int l = 0; l < 5; l++) ASSERT_EQ(eng_kv_layer_kept(&p.kv, 5, l), l == 0 || l == 1 || l == 4);
    api_gen_params_free(&p);
    ASSERT_OK(parse_kv("{\"method\": \"d2o\", \"preset\": \"official\", \"exact\": false, \"budget\": 0.3, "
                       "\"granularity\": \"layer\"}",
                       &p, &err));
    ASSERT_EQ(p.kv.granularity, ENG_KV_GRAN_LAYER);
    ASSERT_YES(!p.kv.exact);
    ASSERT_EQ(p.kv.merge_rule, ENG_KV_MERGE_CODE);
    ASSERT_NEAR(p.kv.budget_frac, 0.3, 1e-6);
    api_gen_params_free(&p);
    ASSERT_OK(parse_kv("{\"method\": \"d2o\", \"preset\": \"default\"}", &p, &err));
    ASSERT_EQ(p.kv.merge_rule, ENG_KV_MERGE_NORMALISED);
    ASSERT_EQ(p.kv.granularity, ENG_KV_GRAN_LAYER);
    api_gen_params_free(&p);
    ASSERT_OK(parse_kv("{\"method\": \"h2o\", \"granularity\": \"head\"}", &p, &err));
    ASSERT_EQ(p.kv.granularity, ENG_KV_GRAN_HEAD);
    api_gen_params_free(&p);
    expect_kv_error("{\"method\": \"d2o\", \"granularity\": \"token\"}");
    expect_kv_error("{\"method\": \"d2o\", \"granularity\": 1}");
    expect_kv_error("{\"method\": \"h2o\", \"preset\": \"official\"}");
    expect_kv_error("{\"method\": \"d2o\", \"preset\": \"nosuch\"}");
    expect_kv_error("{\"method\": \"d2o\", \"preset\": 1}");
}

/* An 80-layer model: -1 names layer 79 and 70 is accepted (a 64-bit mask
 * capped the API at 64 layers, so -1 named layer 63 and 70 was refused). */
TEST(kv_keep_layers_80) {
    static const api_limits L80 = {.max_n = 4, .max_tokens_limit = 1024, .n_vocab = 512, .n_layers = 80};
    const char *body = "{\"prompt\": \"Once\", \"max_tokens\": 4, \"kv_compression\": "
                       "{\"method\": \"d2o\", \"keep_layers\": [-1, 70]}}";
    api_gen_params p;
    api_error err;
    memset(&err, 0, sizeof err);
    ASSERT_OK(api_parse_gen(body, strlen(body), API_COMPLETIONS, &L80, &p, &err));
    for (int l = 0; l < 80; l++) ASSERT_EQ(eng_kv_layer_kept(&p.kv, 80, l), l == 70 || l == 79);
    api_gen_params_free(&p);
}

TEST(kv_layers_sinks_window_beta) {
    api_gen_params p;
    api_error err;
    ASSERT_OK(parse_kv("{\"method\": \"d2o\", \"keep_layers\": [0, 2, -1], \"n_sink\": 8, "
                       "\"window\": 16, \"ema_beta\": 0.7}",
                       &p, &err));
    ASSERT_YES(p.kv.keep_layers_set);
    for (int l = 0; l < 5; l++) /* -1 = layer 4 of 5 */
        ASSERT_EQ(eng_kv_layer_kept(&p.kv, 5, l), l == 0 || l == 2 || l == 4);
    ASSERT_EQ(p.kv.n_sink, 8);
    ASSERT_EQ(p.kv.window, 16);
    ASSERT_NEAR(p.kv.ema_beta, 0.7, 1e-6);
    api_gen_params_free(&p);
    ASSERT_OK(parse_kv("{\"method\": \"h2o\", \"keep_layers\": []}", &p, &err));
    ASSERT_YES(p.kv.keep_layers_set);
    for (int l = 0; l < 5; l++) ASSERT_YES(!eng_kv_layer_kept(&p.kv, 5, l));
    api_gen_params_free(&p);
    expect_kv_error("{\"method\": \"d2o\", \"keep_layers\": [5]}");   /* 5 layers: 0..4 */
    expect_kv_error("{\"method\": \"d2o\", \"keep_layers\": [-6]}");
    expect_kv_error("{\"method\": \"d2o\", \"keep_layers\": 1}");
    expect_kv_error("{\"method\": \"d2o\", \"keep_layers\": [\"0\"]}");
    expect_kv_error("{\"method\": \"d2o\", \"n_sink\": -1}");
    expect_kv_error("{\"method\": \"d2o\", \"window\": 0}");
    expect_kv_error("{\"method\": \"d2o\", \"ema_beta\": 1.5}");
}

TEST(kv_invalid_is_400_naming_the_field) {
    expect_kv_error("\"d2o\"");                                  /* not an object */
    expect_kv_error("[1]");
    expect_kv_error("{}");                                       /* method required */
    expect_kv_error("{\"budget\": 0.2}");
    expect_kv_error("{\"method\": \"d2O-ish\"}");                /* unknown method */
    expect_kv_error("{\"method\": 3}");
    expect_kv_error("{\"method\": \"d2o\", \"budget\": 0}");     /* budget out of range */
    expect_kv_error("{\"method\": \"d2o\", \"budget\": 0.0}");
    expect_kv_error("{\"method\": \"d2o\", \"budget\": 1.5}");
    expect_kv_error("{\"method\": \"d2o\", \"budget\": -0.2}");
    expect_kv_error("{\"method\": \"d2o\", \"budget\": -8}");
    expect_kv_error("{\"method\": \"d2o\", \"budget\": \"0.2\"}"); /* wrong type */
    expect_kv_error("{\"method\": \"d2o\", \"budget\": true}");
    expect_kv_error("{\"method\": \"d2o\", \"budgett\": 0.2}");  /* misspelt key */
    expect_kv_error("{\"method\": \"d2o\", \"heavy_share\": 2}");
    expect_kv_error("{\"method\": \"d2o\", \"heavy_share\": \"half\"}");
    expect_kv_error("{\"method\": \"d2o\", \"exact\": \"yes\"}");
    expect_kv_error("{\"method\": \"d2o\", \"merge_rule\": \"average\"}");
    expect_kv_error("{\"method\": \"d2o\", \"merge_rule\": 1}");
}

TEST(kv_in_chat_completions) {
    api_gen_params p;
    api_error err;
    const char *body = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], "
                       "\"kv_compression\": {\"method\": \"streamingllm\", \"budget\": 64}}";
    ASSERT_OK(parse(body, API_CHAT, &p, &err));
    ASSERT_YES(p.has_kv);
    ASSERT_EQ(p.kv.method, ENG_KV_STREAMINGLLM);
    ASSERT_EQ(p.kv.budget_tokens, 64);
    api_gen_params_free(&p);
    body = "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"kv_compression\": {\"method\": \"x\"}}";
    ASSERT_YES(parse(body, API_CHAT, &p, &err) != D2_OK);
    ASSERT_EQ(err.http, 400);
    ASSERT_STREQ(err.param, "kv_compression");
}

TEST(core_fields) {
    api_gen_params p;
    api_error err;
    ASSERT_OK(parse("{\"prompt\": [1, 2, 3], \"max_tokens\": 7, \"temperature\": 0, \"stop\": [\"a\", \"b\"], "
                    "\"n\": 2, \"seed\": 5}",
                    API_COMPLETIONS, &p, &err));
    ASSERT_EQ(p.n_prompts, 1);
    ASSERT_EQ(p.prompt_n_ids[0], 3);
    ASSERT_EQ(p.max_tokens, 7);
    ASSERT_NEAR(p.temperature, 0.0, 1e-9);
    ASSERT_EQ(p.n_stop, 2);
    ASSERT_EQ(p.n, 2);
    ASSERT_YES(p.has_seed);
    api_gen_params_free(&p);
    ASSERT_YES(parse("{\"prompt\": \"x\", \"max_tokens\": 5000}", API_COMPLETIONS, &p, &err) != D2_OK);
    ASSERT_STREQ(err.param, "max_tokens");
    ASSERT_YES(parse("{\"prompt\": [600]}", API_COMPLETIONS, &p, &err) != D2_OK);
    ASSERT_STREQ(err.param, "prompt");
    ASSERT_YES(parse("{\"prompt\": \"x\"", API_COMPLETIONS, &p, &err) != D2_OK);
    ASSERT_EQ(err.http, 400);
}

TEST(stop_strings) {
    char *stops[] = {"END", "xyz"};
    size_t partial = 0;
    ASSERT_EQ(api_find_stop("hello END there", 15, stops, 2, &partial), 6);
    ASSERT_EQ(api_find_stop("hello EN", 8, stops, 2, &partial), -1);
    ASSERT_EQ((long)partial, 2);
    ASSERT_EQ(api_find_stop("abc", 3, stops, 2, &partial), -1);
    ASSERT_EQ((long)partial, 0);
}
