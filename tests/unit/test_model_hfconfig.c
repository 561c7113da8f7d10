/*
 * tests/unit/test_model_hfconfig.c — HF directories as real checkpoints ship
 * them: tokenizer_config.json with integers beyond 64 bits (Llama 3's
 * model_max_length is 1e30) and a chat template must still load.
 */
#include <sys/stat.h>

#include "engine/engine.h"
#include "tests/test.h"

static void copy_file(const char *src, const char *dst) {
    FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
    ASSERT(in && out);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) ASSERT_EQ(fwrite(buf, 1, n, out), n);
    fclose(in);
    fclose(out);
}

TEST(tokenizer_config_with_huge_integer) {
    const char *hf = test_shared_path("assets/models/stories260K/hf");
    REQUIRE_FILE(hf);
    char dir[] = "/tmp/d2od-hfcfg-XXXXXX";
    ASSERT(mkdtemp(dir) != NULL);
    const char *files[] = {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"};
    char src[1024], dst[1024];
    for (int i = 0; i < 4; i++) {
        snprintf(src, sizeof src, "%s/%s", hf, files[i]);
        snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
        copy_file(src, dst);
    }
    snprintf(dst, sizeof dst, "%s/tokenizer_config.json", dir);
    FILE *f = fopen(dst, "w");
    ASSERT(f);
    fputs("{\"add_bos_token\": true, \"bos_token\": \"<s>\", \"eos_token\": \"</s>\",\n"
          " \"model_max_length\": 1000000000000000019884624838656,\n"
          " \"chat_template\": \"{% for m in messages %}{{ m['content'] }}{% endfor %}\"}\n", f);
    fclose(f);
    eng_model *m = NULL;
    ASSERT_OK(eng_model_load(dir, true, &m));
    ASSERT(m->chat_template != NULL);
    ASSERT(strstr(m->chat_template, "messages") != NULL);
    ASSERT(m->tok != NULL);
    ASSERT(eng_tok_adds_bos(m->tok));
    eng_model_free(m);
    for (int i = 0; i < 4; i++) {
        snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
        unlink(dst);
    }
    snprintf(dst, sizeof dst, "%s/tokenizer_config.json", dir);
    unlink(dst);
    rmdir(dir);
}
