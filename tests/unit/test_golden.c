/*
 * tests/unit/test_golden.c — stories260K against the original llama2.c
 * program's outputs (../shared/assets/models/stories260K/reference):
 *   - every greedy continuation in greedy_prompts.json, token for token, from
 *     the GGUF file and from the HF directory, through the engine loop
 *     (tokenizer, paged pool, batched backend, sampler);
 *   - the prompt ids from our tokenizer equal run.c's;
 *   - teacher-forced NLL of teacher_forced_nll.json within 1e-4 per token;
 *   - all six prompts batched together give the same tokens as one at a time.
 */
#include <jansson.h>

#include "engine/engine.h"
#include "tests/test.h"

#define REF_DIR "assets/models/stories260K/reference/"

static json_t *load_json(const char *rel) {
    const char *path = test_shared_path(rel);
    REQUIRE_FILE(path);
    json_error_t err;
    json_t *j = json_load_file(path, 0, &err);
    if (!j) FAIL_("cannot parse %s: %s", path, err.text);
    return j;
}

static eng_engine *open_engine(const char *rel, int max_seqs) {
    const char *path = test_shared_path(rel);
    REQUIRE_FILE(path);
    eng_engine_config ec = {.model_path = path, .n_threads = 2, .max_seqs = max_seqs};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) FAIL_("eng_engine_create(%s) = %s", path, d2_status_name(rc));
    return e;
}

static int32_t *json_ids(json_t *arr, int *n) {
    *n = (int)json_array_size(arr);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(*n + 1));
    for (int i = 0; i < *n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(arr, (size_t)i));
    return ids;
}

/* Runs every case of greedy_prompts.json, batched (all at once) or one by one. */
static void check_greedy(const char *model_rel, int batched) {
    json_t *ref = load_json(REF_DIR "greedy_prompts.json");
    json_t *cases = json_object_get(ref, "cases");
    int n = (int)json_array_size(cases);
    ASSERT_GT(n, 0);
    eng_engine *e = open_engine(model_rel, batched ? n : 1);
    const eng_tokenizer *tok = eng_engine_tokenizer(e);
    ASSERT(tok != NULL);
    eng_gen_seq *seqs = calloc((size_t)n, sizeof *seqs);
    int32_t **want = calloc((size_t)n, sizeof *want);
    int *n_want = calloc((size_t)n, sizeof *n_want);
    int32_t **prompts = calloc((size_t)n, sizeof *prompts);
    for (int c = 0; c < n; c++) {
        json_t *jc = json_array_get(cases, (size_t)c);
        int np;
        prompts[c] = json_ids(json_object_get(jc, "prompt_ids"), &np);
        want[c] = json_ids(json_object_get(jc, "generated_ids"), &n_want[c]);
        const char *stop = json_string_value(json_object_get(jc, "stop"));
        int bos_stop = stop && !strcmp(stop, "bos");
        if (bos_stop) want[c][n_want[c]++] = 1; /* run.c stopped because the argmax was BOS */
        /* our tokenizer must give run.c's prompt ids */
        const char *prompt = json_string_value(json_object_get(jc, "prompt"));
        int32_t *ids = NULL;
        size_t nids = 0;
        ASSERT_OK(eng_tok_encode(tok, prompt, strlen(prompt), true, true, &ids, &nids));
        ASSERT_EQ(nids, np);
        for (int k = 0; k < np; k++) ASSERT_EQ(ids[k], prompts[c][k]);
        free(ids);
        seqs[c] = (eng_gen_seq){.prompt = prompts[c], .n_prompt = np, .max_tokens = n_want[c],
                                .ignore_eos = true};
        eng_sample_params_default(&seqs[c].sample);
        seqs[c].sample.temperature = 0;
        seqs[c].out_tokens = calloc((size_t)n_want[c], sizeof(int32_t));
    }
    if (batched) {
        ASSERT_OK(eng_run(e, seqs, n));
    } else {
        for (int c = 0; c < n; c++) ASSERT_OK(eng_run(e, &seqs[c], 1));
    }
    for (int c = 0; c < n; c++) {
        ASSERT_EQ(seqs[c].status, D2_OK);
        ASSERT_EQ(seqs[c].n_out, n_want[c]);
        for (int k = 0; k < n_want[c]; k++) {
            if (seqs[c].out_tokens[k] != want[c][k])
                FAIL_("case %d token %d: got %d, want %d", c, k, seqs[c].out_tokens[k], want[c][k]);
        }
        free(seqs[c].out_tokens);
        free(want[c]);
        free(prompts[c]);
    }
    eng_pool_stats ps = eng_engine_pool_stats(e);
    ASSERT_EQ(ps.pages_free, ps.pages_total); /* every page came back */
    free(seqs);
    free(want);
    free(n_want);
    free(prompts);
    eng_engine_destroy(e);
    json_decref(ref);
}

TEST(greedy_gguf) { check_greedy("assets/models/stories260K/stories260K.gguf", 0); }
TEST(greedy_hf) { check_greedy("assets/models/stories260K/hf", 0); }
TEST(greedy_gguf_batched) { check_greedy("assets/models/stories260K/stories260K.gguf", 1); }
TEST(greedy_hf_batched) { check_greedy("assets/models/stories260K/hf", 1); }

static void check_nll(const char *model_rel) {
    json_t *ref = load_json(REF_DIR "teacher_forced_nll.json");
    int n;
    int32_t *ids = json_ids(json_object_get(ref, "ids"), &n);
    json_t *jnll = json_object_get(ref, "nll");
    ASSERT_EQ((int)json_array_size(jnll), n - 1);
    eng_engine *e = open_engine(model_rel, 1);
    /* the tokenizer reproduces the reference ids from the text */
    const char *text = json_string_value(json_object_get(ref, "text"));
    int32_t *tids = NULL;
    size_t nt = 0;
    ASSERT_OK(eng_tok_encode(eng_engine_tokenizer(e), text, strlen(text), true, true, &tids, &nt));
    ASSERT_EQ(nt, n);
    for (int i = 0; i < n; i++) ASSERT_EQ(tids[i], ids[i]);
    free(tids);
    double *nll = calloc((size_t)n, sizeof(double));
    double sum = 0;
    ASSERT_OK(eng_score(e, ids, n, nll, &sum));
    double worst = 0;
    for (int i = 0; i < n - 1; i++) {
        double want = json_number_value(json_array_get(jnll, (size_t)i));
        double d = fabs(nll[i] - want);
        if (d > worst) worst = d;
        if (d > 1e-4) FAIL_("position %d: nll %.9f, want %.9f", i, nll[i], want);
    }
    ASSERT_NEAR(sum, json_number_value(json_object_get(ref, "sum_nll")), 1e-3);
    printf("  %s: max |dnll| = %.2e, sum %.6f\n", model_rel, worst, sum);
    free(nll);
    free(ids);
    eng_engine_destroy(e);
    json_decref(ref);
}

TEST(nll_gguf) { check_nll("assets/models/stories260K/stories260K.gguf"); }
TEST(nll_hf) { check_nll("assets/models/stories260K/hf"); }
