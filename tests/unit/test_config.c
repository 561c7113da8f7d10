/*
 * tests/unit/test_config.c — daemon configuration (daemon/config.c): defaults,
 * precedence file < environment < command line, every error path with its
 * exact location, quoting, size suffixes, reload classification, --help, the
 * dump, and configs/d2od.conf staying in step with the directive table.
 *
 * daemon/ is not part of libd2od.a, so the module is compiled into this test
 * by including its source (which also gives access to the static table).
 * Runs from the repo root (configs/d2od.conf is read in place).
 */
#include "daemon/config.c"
#include "daemon/value.c"

#include <stdio.h>

#include "tests/test.h"

/* Every test starts from an environment with no D2OD_* variables, so a
 * developer's shell cannot change results. Tests run in forked children, so
 * setenv in one test never leaks into another. */
static void clear_env(void) {
    char en[80];
    for (int i = 0; i < N_DIRS; i++) {
        env_name(&g_dirs[i], en, sizeof en);
        unsetenv(en);
    }
    unsetenv("D2OD_CONFIG");
}

/* Writes content to a new temp file; returns its path (static, rotating). */
static const char *write_tmp_len(const char *content, size_t len) {
    static char paths[4][64];
    static int k;
    char *p = paths[k++ & 3];
    snprintf(p, 64, "/tmp/d2od_cfg_XXXXXX");
    int fd = mkstemp(p);
    ASSERT(fd >= 0);
    ASSERT_EQ(write(fd, content, len), (long long)len);
    close(fd);
    return p;
}
static const char *write_tmp(const char *content) { return write_tmp_len(content, strlen(content)); }

/* Loads with argv = {"serve", args...}. */
#define LOAD(cfg, file, err, ...)                                                          \
    ({                                                                                     \
        char *argv_[] = {"serve", __VA_ARGS__};                                            \
        dmn_config_load((cfg), (file), (int)(sizeof argv_ / sizeof *argv_), argv_, (err),  \
                        sizeof(err));                                                      \
    })

/* True when a dmn_config_dump() text holds "config: NAME = VALUE (SOURCE)". */
static int has_dump_line(const char *dump, const char *name, const char *value, const char *src) {
    char want[512];
    snprintf(want, sizeof want, "config: %-26s = %s (%s)\n", name, value, src);
    return strstr(dump, want) != NULL;
}

static int src_of(const dmn_config *c, const char *name) { return c->source[dir_index(name)]; }

TEST(defaults) {
    clear_env();
    dmn_config c;
    dmn_config_defaults(&c);
    ASSERT_STREQ(c.model, "");
    ASSERT_STREQ(c.host, "127.0.0.1");
    ASSERT_EQ(c.port, 8000);
    ASSERT_STREQ(c.api_key, "");
    ASSERT_EQ(c.api_key_for_health_metrics, 0);
    ASSERT_STREQ(c.served_model_name, "");
    ASSERT_EQ(c.threads, 0);
    ASSERT_EQ(c.ctx_len, 0);
    ASSERT_EQ(c.max_seqs, 64);
    ASSERT_EQ(c.max_batch_tokens, 512);
    ASSERT_EQ(c.page_tokens, 16);
    ASSERT_EQ(c.kv_mem_mb, 0);
    ASSERT_EQ(c.max_queue, 256);
    ASSERT_EQ(c.max_tokens_limit, 4096);
    ASSERT_EQ(c.default_max_tokens, 256);
    ASSERT_EQ(c.max_n, 8);
    ASSERT_EQ(c.body_limit, 1u << 20);
    ASSERT_NEAR(c.request_timeout_s, 600, 0);
    ASSERT_NEAR(c.drain_timeout_s, 30, 0);
    ASSERT_EQ(c.log_level, DMN_LOG_INFO);
    ASSERT_EQ(c.log_requests, 1);
    ASSERT_EQ(c.watchdog, 1);
    ASSERT_EQ(c.kv_method, DMN_KV_FULL);
    ASSERT_STREQ(c.kv_budget, "1.0");
    ASSERT_EQ(c.device, DMN_DEVICE_CPU);
    ASSERT_NEAR(c.gpu_memory_utilization, 0.9, 0);
    ASSERT_EQ(c.cuda_graphs, 0);
    for (int i = 0; i < N_DIRS; i++) ASSERT_EQ(c.source[i], DMN_SRC_DEFAULT);
    /* Names used by other modules keep their meaning. */
    ASSERT_STREQ(dmn_kv_method_name(DMN_KV_D2O), "d2o");
    ASSERT_STREQ(dmn_kv_method_name(DMN_KV_PYRAMIDKV), "pyramidkv");
    ASSERT_STREQ(dmn_kv_method_name(99), "?");
    ASSERT_STREQ(dmn_device_name(DMN_DEVICE_CUDA), "cuda");
    ASSERT_STREQ(dmn_device_name(DMN_DEVICE_AUTO), "auto");
    ASSERT_STREQ(dmn_log_level_name(DMN_LOG_WARN), "warn");
}

TEST(table_is_consistent) {
    for (int i = 0; i < N_DIRS; i++) {
        const cfg_directive *d = &g_dirs[i];
        ASSERT(d->help && *d->help);
        for (const char *p = d->name; *p; p++) ASSERT((*p >= 'a' && *p <= 'z') || *p == '_');
        for (int j = 0; j < i; j++) ASSERT(strcmp(g_dirs[j].name, d->name) != 0);
        if (d->type == CT_ENUM) ASSERT(d->enums != NULL);
        if (d->type == CT_STRING) ASSERT(d->cap > 0);
        if (d->type == CT_INT || d->type == CT_FLOAT || d->type == CT_SIZE) ASSERT(d->min <= d->max);
    }
    /* The live set is exactly the one the daemon's reload path documents. */
    const char *live[] = {"log_level", "log_requests", "max_queue", "request_timeout_s",
                          "default_max_tokens", "max_tokens_limit", "api_key"};
    int n_live = 0;
    for (int i = 0; i < N_DIRS; i++) n_live += g_dirs[i].live;
    ASSERT_EQ(n_live, 7);
    for (int i = 0; i < 7; i++) ASSERT(g_dirs[dir_index(live[i])].live);
}

TEST(load_minimal_derives_name_and_budget) {
    clear_env();
    dmn_config c;
    char err[512];
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "/srv/models/Llama-3.2-1B/"), D2_OK);
    ASSERT_STREQ(c.model, "/srv/models/Llama-3.2-1B/");
    ASSERT_STREQ(c.served_model_name, "Llama-3.2-1B");
    ASSERT_EQ(src_of(&c, "served_model_name"), DMN_SRC_DERIVED);
    ASSERT_NEAR(c.kv_budget_frac, 1.0, 0);
    ASSERT_EQ(c.kv_budget_tokens, 0);
    ASSERT_STREQ(c.config_file, "");

    ASSERT_EQ(LOAD(&c, NULL, err, "--model=stories.gguf", "--kv-budget", "128"), D2_OK);
    ASSERT_STREQ(c.served_model_name, "stories");
    ASSERT_EQ(c.kv_budget_tokens, 128);
    ASSERT_NEAR(c.kv_budget_frac, 0, 0);

    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m.gguf", "--served-model-name", "gpt"), D2_OK);
    ASSERT_STREQ(c.served_model_name, "gpt");
    ASSERT_EQ(src_of(&c, "served_model_name"), DMN_SRC_CLI);
}

TEST(precedence_file_env_cli) {
    clear_env();
    const char *f = write_tmp("model /m/file.gguf\n"
                              "port 1000\n"
                              "threads 2\n"
                              "max_queue 5\n"
                              "log_level warn\n");
    setenv("D2OD_PORT", "2000", 1);
    setenv("D2OD_THREADS", "3", 1);
    setenv("D2OD_LOG_LEVEL", "", 1); /* empty: treated as unset */
    dmn_config c;
    char err[512];
    int rc = LOAD(&c, f, err, "--port", "3000");
    if (rc) FAIL_("%s", err);
    ASSERT_EQ(c.port, 3000);
    ASSERT_EQ(src_of(&c, "port"), DMN_SRC_CLI);
    ASSERT_EQ(c.threads, 3);
    ASSERT_EQ(src_of(&c, "threads"), DMN_SRC_ENV);
    ASSERT_EQ(c.max_queue, 5);
    ASSERT_EQ(src_of(&c, "max_queue"), DMN_SRC_FILE);
    ASSERT_EQ(c.log_level, DMN_LOG_WARN);
    ASSERT_EQ(c.max_seqs, 64);
    ASSERT_EQ(src_of(&c, "max_seqs"), DMN_SRC_DEFAULT);
    ASSERT_STREQ(c.config_file, f);

    /* Without the flag the environment wins over the file. */
    ASSERT_EQ(LOAD(&c, f, err, "--threads", "4"), D2_OK);
    ASSERT_EQ(c.port, 2000);
    ASSERT_EQ(c.threads, 4);
    unlink(f);
}

TEST(config_file_selection) {
    clear_env();
    const char *a = write_tmp("model a\nport 1111\n");
    const char *b = write_tmp("model b\nport 2222\n");
    const char *e = write_tmp("model e\nport 3333\n");
    dmn_config c;
    char err[512];
    ASSERT_EQ(LOAD(&c, a, err, "--port=5"), D2_OK);
    ASSERT_EQ(c.port, 5);
    ASSERT_STREQ(c.model, "a");
    setenv("D2OD_CONFIG", e, 1);
    ASSERT_EQ(LOAD(&c, a, err, "--threads", "1"), D2_OK); /* D2OD_CONFIG over the argument */
    ASSERT_EQ(c.port, 3333);
    ASSERT_EQ(LOAD(&c, a, err, "--config", (char *)b), D2_OK); /* --config over both */
    ASSERT_EQ(c.port, 2222);
    ASSERT_STREQ(c.config_file, b);
    char eq[96];
    snprintf(eq, sizeof eq, "--config=%s", b);
    ASSERT_EQ(LOAD(&c, NULL, err, eq), D2_OK);
    ASSERT_STREQ(c.model, "b");
    /* A flag's value is never taken for --help or -h. */
    ASSERT_EQ(LOAD(&c, a, err, "--served-model-name", "-h"), D2_OK);
    ASSERT_STREQ(c.served_model_name, "-h");
    unsetenv("D2OD_CONFIG");
    ASSERT_EQ(LOAD(&c, NULL, err, "--config"), D2_ECONFIG);
    ASSERT_STREQ(err, "--config: missing value");
    ASSERT_EQ(LOAD(&c, "/nonexistent/d2od.conf", err, "--model", "m"), D2_ENOENT);
    ASSERT(strstr(err, "/nonexistent/d2od.conf: cannot read config file") == err);
    unlink(a);
    unlink(b);
    unlink(e);
}

TEST(help_flag) {
    clear_env();
    dmn_config c;
    char err[128];
    ASSERT_EQ(LOAD(&c, NULL, err, "--help"), DMN_CONFIG_HELP);
    ASSERT_EQ(LOAD(&c, NULL, err, "--port", "nope", "-h"), DMN_CONFIG_HELP);
    ASSERT_EQ(LOAD(&c, NULL, err, "--bogus", "--config", "--help"), DMN_CONFIG_HELP);

    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    dmn_config_print_help(f);
    fclose(f);
    char fl[64], en[64];
    for (int i = 0; i < N_DIRS; i++) {
        flag_name(&g_dirs[i], fl, sizeof fl);
        env_name(&g_dirs[i], en, sizeof en);
        strcat(fl, " ");
        if (!strstr(buf, fl)) FAIL_("help lacks %s", fl);
        if (!strstr(buf, en)) FAIL_("help lacks %s", en);
    }
    ASSERT(strstr(buf, "--max-batch-tokens N"));
    ASSERT(strstr(buf, "D2OD_MAX_BATCH_TOKENS, default 512, range 16..65536"));
    ASSERT(strstr(buf, "--kv-method full|d2o|h2o|streamingllm|snapkv|pyramidkv"));
    ASSERT(strstr(buf, "--config FILE"));
    free(buf);
}

/* Parses content as file "t.conf" over defaults; returns the status. */
static int parse_str(dmn_config *c, const char *content, char *err, size_t errlen) {
    dmn_config_defaults(c);
    return dmn_config_parse_buffer(c, content, strlen(content), "t.conf", err, errlen);
}

#define EXPECT_FILE_ERR(content, msg)                                                      \
    do {                                                                                   \
        dmn_config c_;                                                                     \
        char e_[512] = "";                                                                 \
        int r_ = parse_str(&c_, (content), e_, sizeof e_);                                 \
        if (r_ != D2_ECONFIG) FAIL_("parse of %s: rc %d, want D2_ECONFIG", #content, r_);  \
        ASSERT_STREQ(e_, (msg));                                                           \
    } while (0)

TEST(file_errors_name_the_line) {
    EXPECT_FILE_ERR("# c\n\nprot 80\n", "t.conf:3: directive 'prot': unknown directive");
    EXPECT_FILE_ERR("port\n", "t.conf:1: directive 'port': missing value");
    EXPECT_FILE_ERR("\n\n\n  port   # later\n", "t.conf:4: directive 'port': missing value");
    EXPECT_FILE_ERR("port 80 90\n", "t.conf:1: directive 'port': trailing garbage after value");
    EXPECT_FILE_ERR("host \"a\" b\n", "t.conf:1: directive 'host': trailing garbage after value");
    EXPECT_FILE_ERR("threads 1\nport 70000\n",
                    "t.conf:2: directive 'port': value 70000 out of range [1, 65535]");
    EXPECT_FILE_ERR("port 0", "t.conf:1: directive 'port': value 0 out of range [1, 65535]");
    EXPECT_FILE_ERR("port 99999999999999999999999",
                    "t.conf:1: directive 'port': value 99999999999999999999999 out of range [1, 65535]");
    EXPECT_FILE_ERR("\nport 8o\n", "t.conf:2: directive 'port': value '8o' is not an integer");
    EXPECT_FILE_ERR("port \"\"\n", "t.conf:1: directive 'port': value '' is not an integer");
    EXPECT_FILE_ERR("port 1.5\n", "t.conf:1: directive 'port': value '1.5' is not an integer");
    EXPECT_FILE_ERR("request_timeout_s 1x\n",
                    "t.conf:1: directive 'request_timeout_s': value '1x' is not a number");
    EXPECT_FILE_ERR("request_timeout_s nan\n",
                    "t.conf:1: directive 'request_timeout_s': value 'nan' is not a number");
    EXPECT_FILE_ERR("drain_timeout_s -1\n",
                    "t.conf:1: directive 'drain_timeout_s': value -1 out of range [0, 3600]");
    EXPECT_FILE_ERR("watchdog maybe\n",
                    "t.conf:1: directive 'watchdog': value 'maybe' is not a boolean (true/false, yes/no, on/off, 1/0)");
    EXPECT_FILE_ERR("log_level loud\n",
                    "t.conf:1: directive 'log_level': value 'loud' is not one of debug, info, warn, error");
    EXPECT_FILE_ERR("kv_method d3o\n",
                    "t.conf:1: directive 'kv_method': value 'd3o' is not one of full, d2o, h2o, streamingllm, snapkv, pyramidkv");
    EXPECT_FILE_ERR("api_key \"abc\n", "t.conf:1: directive 'api_key': unterminated quoted value");
    EXPECT_FILE_ERR("api_key \"abc\\\"\n", "t.conf:1: directive 'api_key': unterminated quoted value");
    EXPECT_FILE_ERR("api_key \"a\\nb\"\n",
                    "t.conf:1: directive 'api_key': bad escape '\\n' in quoted value (only \\\" and \\\\)");
    EXPECT_FILE_ERR("api_key ab\"c\n", "t.conf:1: directive 'api_key': stray '\"' in unquoted value");
    EXPECT_FILE_ERR("api_key \"a b\"\n",
                    "t.conf:1: directive 'api_key': value must be printable ASCII without spaces");
    EXPECT_FILE_ERR("host \"\"\n", "t.conf:1: directive 'host': value must not be empty");
    EXPECT_FILE_ERR("max_seqs 4\n\n# x\nmax_seqs 8\n",
                    "t.conf:4: directive 'max_seqs': duplicate (first set on line 1)");
    EXPECT_FILE_ERR("kv_budget 0\n",
                    "t.conf:1: directive 'kv_budget': value '0': a budget must be above 0: a share of the prompt in (0, 1] or a token count >= 2");
    EXPECT_FILE_ERR("kv_budget 1.5\n",
                    "t.conf:1: directive 'kv_budget': value '1.5': a share of the prompt must be in (0, 1]; a token count is written as an integer");
    EXPECT_FILE_ERR("body_limit 1t\n",
                    "t.conf:1: directive 'body_limit': value '1t' is not a size (digits with an optional k, m or g)");
    EXPECT_FILE_ERR("Port 80\n", "t.conf:1: directive 'Port': unknown directive");
    /* Control bytes are shown as '?' so the message stays one clean line. */
    EXPECT_FILE_ERR("po\x01rt 80\n", "t.conf:1: directive 'po?rt': unknown directive");

    /* A NUL byte, and a value longer than its field. */
    dmn_config c;
    char err[512];
    dmn_config_defaults(&c);
    ASSERT_EQ(dmn_config_parse_buffer(&c, "port 80\nhost a\0b\n", 17, "t.conf", err, sizeof err), D2_ECONFIG);
    ASSERT_STREQ(err, "t.conf:2: NUL byte in line");
    char big[600];
    memset(big, 'x', sizeof big);
    memcpy(big, "api_key ", 8);
    big[sizeof big - 1] = '\0';
    ASSERT_EQ(parse_str(&c, big, err, sizeof err), D2_ECONFIG);
    ASSERT_STREQ(err, "t.conf:1: directive 'api_key': value too long (591 bytes, at most 255)");
    char huge[QBUF_MAX + 32];
    memset(huge, 'y', sizeof huge);
    memcpy(huge, "model ", 6);
    huge[sizeof huge - 1] = '\0';
    ASSERT_EQ(parse_str(&c, huge, err, sizeof err), D2_ECONFIG);
    ASSERT_STREQ(err, "t.conf:1: directive 'model': value too long");
    /* A failed directive leaves the struct's value untouched. */
    ASSERT_EQ(parse_str(&c, "port 9000\nmax_seqs 0\n", err, sizeof err), D2_ECONFIG);
    ASSERT_EQ(c.port, 9000);
    ASSERT_EQ(c.max_seqs, 64);
}

TEST(file_error_through_load_uses_path) {
    clear_env();
    const char *f = write_tmp("model m\n\n# comment\n   max_batch_tokens 15\n");
    dmn_config c;
    char err[512], want[512];
    ASSERT_EQ(LOAD(&c, f, err, "--port", "1"), D2_ECONFIG);
    snprintf(want, sizeof want, "%s:4: directive 'max_batch_tokens': value 15 out of range [16, 65536]", f);
    ASSERT_STREQ(err, want);
    unlink(f);
}

TEST(file_syntax_accepted) {
    dmn_config c;
    char err[512];
    const char *txt = "# full-line comment\r\n"
                      "\r\n"
                      "\t port\t8080   # trailing comment\r\n"
                      "api_key \"k\\\"e\\\\y\"# comment right after the quote\n"
                      "served_model_name \"my model # one\"\n"
                      "host ::1\n"
                      "model \"/path with spaces/m.gguf\"\n"
                      "log_level DEBUG\n"
                      "log_requests off\n"
                      "watchdog No\n"
                      "api_key_for_health_metrics yes\n"
                      "kv_method streamingllm\n"
                      "kv_budget 0.25\n"
                      "device cuda\n"
                      "gpu_memory_utilization 0.5\n"
                      "cuda_graphs on\n"
                      "request_timeout_s 0.5\n"
                      "threads +3\n"
                      "max_queue 0"; /* no final newline */
    int rc = parse_str(&c, txt, err, sizeof err);
    if (rc) FAIL_("%s", err);
    ASSERT_EQ(c.port, 8080);
    ASSERT_STREQ(c.api_key, "k\"e\\y");
    ASSERT_STREQ(c.served_model_name, "my model # one");
    ASSERT_STREQ(c.host, "::1");
    ASSERT_STREQ(c.model, "/path with spaces/m.gguf");
    ASSERT_EQ(c.log_level, DMN_LOG_DEBUG);
    ASSERT_EQ(c.log_requests, 0);
    ASSERT_EQ(c.watchdog, 0);
    ASSERT_EQ(c.api_key_for_health_metrics, 1);
    ASSERT_EQ(c.kv_method, DMN_KV_STREAMINGLLM);
    ASSERT_STREQ(c.kv_budget, "0.25");
    ASSERT_EQ(c.device, DMN_DEVICE_CUDA);
    ASSERT_NEAR(c.gpu_memory_utilization, 0.5, 0);
    ASSERT_EQ(c.cuda_graphs, 1);
    ASSERT_NEAR(c.request_timeout_s, 0.5, 0);
    ASSERT_EQ(c.threads, 3);
    ASSERT_EQ(c.max_queue, 0);
    ASSERT_EQ(src_of(&c, "port"), DMN_SRC_FILE);
    /* An empty quoted value clears a string; '#' inside an unquoted value is kept. */
    ASSERT_EQ(parse_str(&c, "api_key \"\"\nserved_model_name a#b\n", err, sizeof err), D2_OK);
    ASSERT_STREQ(c.api_key, "");
    ASSERT_STREQ(c.served_model_name, "a#b");
    /* An empty buffer and a comments-only buffer are fine. */
    ASSERT_EQ(parse_str(&c, "", err, sizeof err), D2_OK);
    ASSERT_EQ(parse_str(&c, "#\n#\n   \n", err, sizeof err), D2_OK);
}

TEST(size_suffixes) {
    dmn_config c;
    char err[512];
    struct { const char *v; uint64_t want; } ok[] = {
        {"1024", 1024}, {"1k", 1024}, {"64K", 65536}, {"2m", 2u << 20}, {"3M", 3u << 20},
        {"1g", 1u << 30}, {"1G", 1u << 30}, {"1048576", 1u << 20}};
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        char line[64];
        snprintf(line, sizeof line, "body_limit %s\n", ok[i].v);
        int rc = parse_str(&c, line, err, sizeof err);
        if (rc) FAIL_("%s: %s", ok[i].v, err);
        ASSERT_EQ(c.body_limit, ok[i].want);
    }
    const char *bad[][2] = {
        {"1023", "value 1023 out of range [1024, 1073741824]"},
        {"2g", "value 2g out of range [1024, 1073741824]"},
        {"1025m", "value 1025m out of range [1024, 1073741824]"},
        {"18446744073709551615k", "value 18446744073709551615k out of range [1024, 1073741824]"},
        {"99999999999999999999999", "value 99999999999999999999999 out of range [1024, 1073741824]"},
        {"-1k", "value '-1k' is not a size (digits with an optional k, m or g)"},
        {"1kb", "value '1kb' is not a size (digits with an optional k, m or g)"},
        {"k", "value 'k' is not a size (digits with an optional k, m or g)"},
        {"1.5m", "value '1.5m' is not a size (digits with an optional k, m or g)"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        char line[64], want[256];
        snprintf(line, sizeof line, "body_limit %s\n", bad[i][0]);
        snprintf(want, sizeof want, "t.conf:1: directive 'body_limit': %s", bad[i][1]);
        ASSERT_EQ(parse_str(&c, line, err, sizeof err), D2_ECONFIG);
        ASSERT_STREQ(err, want);
    }
    /* The dump writes sizes back with their suffix. */
    ASSERT_EQ(parse_str(&c, "body_limit 3m\nmodel m\n", err, sizeof err), D2_OK);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    dmn_config_dump(&c, f);
    fclose(f);
    ASSERT(has_dump_line(buf, "body_limit", "3m", "file"));
    free(buf);
}

TEST(env_errors_and_values) {
    clear_env();
    dmn_config c;
    char err[512];
    setenv("D2OD_PORT", "abc", 1);
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m"), D2_ECONFIG);
    ASSERT_STREQ(err, "environment D2OD_PORT: value 'abc' is not an integer");
    setenv("D2OD_PORT", "65536", 1);
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m"), D2_ECONFIG);
    ASSERT_STREQ(err, "environment D2OD_PORT: value 65536 out of range [1, 65535]");
    /* The command line does not rescue a bad environment value: errors are
     * reported even when a later source would override them. */
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m", "--port", "80"), D2_ECONFIG);
    unsetenv("D2OD_PORT");
    setenv("D2OD_KV_METHOD", "bogus", 1);
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m"), D2_ECONFIG);
    ASSERT(strstr(err, "environment D2OD_KV_METHOD: value 'bogus' is not one of full, d2o") == err);
    unsetenv("D2OD_KV_METHOD");
    setenv("D2OD_WATCHDOG", "maybe", 1);
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m"), D2_ECONFIG);
    ASSERT(strstr(err, "environment D2OD_WATCHDOG: value 'maybe' is not a boolean") == err);
    unsetenv("D2OD_WATCHDOG");
    setenv("D2OD_BODY_LIMIT", "4m", 1);
    setenv("D2OD_MODEL", "/x/y.gguf", 1);
    setenv("D2OD_API_KEY", "sk-123", 1);
    setenv("D2OD_KV_BUDGET", "0.2", 1);
    ASSERT_EQ(LOAD(&c, NULL, err, "--port", "81"), D2_OK);
    ASSERT_EQ(c.body_limit, 4u << 20);
    ASSERT_STREQ(c.model, "/x/y.gguf");
    ASSERT_STREQ(c.served_model_name, "y");
    ASSERT_STREQ(c.api_key, "sk-123");
    ASSERT_NEAR(c.kv_budget_frac, 0.2, 1e-7);
    ASSERT_EQ(src_of(&c, "model"), DMN_SRC_ENV);
}

#define EXPECT_CLI_ERR(msg, ...)                                                           \
    do {                                                                                   \
        dmn_config c_;                                                                     \
        char e_[512] = "";                                                                 \
        int r_ = LOAD(&c_, NULL, e_, __VA_ARGS__);                                         \
        if (r_ != D2_ECONFIG) FAIL_("load of %s: rc %d, want D2_ECONFIG", #__VA_ARGS__, r_); \
        ASSERT_STREQ(e_, (msg));                                                           \
    } while (0)

TEST(cli_errors) {
    clear_env();
    EXPECT_CLI_ERR("--port: missing value", "--model", "m", "--port");
    EXPECT_CLI_ERR("--port: missing value", "--port", "--model", "m");
    EXPECT_CLI_ERR("--port: value 0 out of range [1, 65535]", "--model", "m", "--port", "0");
    EXPECT_CLI_ERR("--port: value 'x' is not an integer", "--model", "m", "--port=x");
    EXPECT_CLI_ERR("--port: value '' is not an integer", "--model", "m", "--port=");
    EXPECT_CLI_ERR("--prot: unknown option (see --help)", "--model", "m", "--prot", "1");
    EXPECT_CLI_ERR("--no-port: unknown option (see --help)", "--model", "m", "--no-port");
    EXPECT_CLI_ERR("--max_seqs: unknown option (see --help)", "--model", "m", "--max_seqs", "2");
    EXPECT_CLI_ERR("--no-watchdog: takes no value", "--model", "m", "--no-watchdog=1");
    EXPECT_CLI_ERR("unexpected argument 'extra'", "--model", "m", "extra");
    EXPECT_CLI_ERR("unexpected argument '-p'", "--model", "m", "-p", "1");
    EXPECT_CLI_ERR("unexpected argument '--'", "--model", "m", "--");
    EXPECT_CLI_ERR("--log-level: value 'verbose' is not one of debug, info, warn, error", "--model", "m",
                   "--log-level", "verbose");
    EXPECT_CLI_ERR("--max-seqs: value 4097 out of range [1, 4096]", "--model", "m", "--max-seqs", "4097");
    EXPECT_CLI_ERR("--watchdog: value 'maybe' is not a boolean (true/false, yes/no, on/off, 1/0)",
                   "--model", "m", "--watchdog=maybe");
    EXPECT_CLI_ERR("model: required; set 'model' in the config file, D2OD_MODEL or --model", "--port", "1");
    EXPECT_CLI_ERR("default_max_tokens (300) exceeds max_tokens_limit (200)", "--model", "m",
                   "--max-tokens-limit", "200", "--default-max-tokens", "300");
}

TEST(cli_bool_forms) {
    clear_env();
    dmn_config c;
    char err[512];
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m", "--watchdog", "off", "--no-log-requests",
                   "--api-key-for-health-metrics", "--port", "9"),
              D2_OK);
    ASSERT_EQ(c.watchdog, 0);
    ASSERT_EQ(c.log_requests, 0);
    ASSERT_EQ(c.api_key_for_health_metrics, 1);
    ASSERT_EQ(c.port, 9);
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m", "--cuda-graphs", "on"), D2_OK);
    ASSERT_EQ(c.cuda_graphs, 1);
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m", "--cuda-graphs", "off"), D2_OK);
    ASSERT_EQ(c.cuda_graphs, 0);
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m", "--no-watchdog", "--watchdog", "--log-requests=no"),
              D2_OK);
    ASSERT_EQ(c.watchdog, 1); /* later flags win */
    ASSERT_EQ(c.log_requests, 0);
    ASSERT_EQ(src_of(&c, "watchdog"), DMN_SRC_CLI);
    /* A bool flag followed by a non-bool word does not swallow it. */
    EXPECT_CLI_ERR("unexpected argument 'later'", "--model", "m", "--watchdog", "later");
}

/* kv_budget goes through the engine's one budget reader (eng_kv_budget_parse,
 * tested in test_engine_config): the derived fields and the refusal reasons. */
TEST(kv_budget_derived_fields) {
    const char *ok[][3] = {{"0.2", "0.2", "0"}, {"1", "1", "0"}, {"1.0", "1", "0"}, {".5", "0.5", "0"},
                           {"128", "0", "128"}};
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        dmn_config c;
        char err[256] = "";
        ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m", "--kv-budget", (char *)ok[i][0]), D2_OK);
        ASSERT_NEAR(c.kv_budget_frac, atof(ok[i][1]), 1e-7);
        ASSERT_EQ(c.kv_budget_tokens, atol(ok[i][2]));
    }
    const char *bad[] = {"", "0", "0.0", "1.01", "2.5", "128.0", "-1", "+3", "1e-1", ".", "0.2.", "abc",
                         " 0.2", "0.2 ", "99999999999999999999", "inf", "nan"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        dmn_config c;
        char err[256] = "";
        if (LOAD(&c, NULL, err, "--model", "m", "--kv-budget", (char *)bad[i]) != D2_ECONFIG) FAIL_("accepted '%s'", bad[i]);
        if (!strstr(err, "--kv-budget")) FAIL_("'%s': error does not name the flag: %s", bad[i], err);
    }
}

TEST(reload_classifies_live_and_restart) {
    clear_env();
    const char *path = write_tmp("model /m/a.gguf\nport 8001\nlog_level info\nmax_queue 10\n");
    dmn_config cur, next;
    char err[512];
    char *argv[] = {"serve", "--threads", "2"};
    ASSERT_EQ(dmn_config_load(&cur, path, 3, argv, err, sizeof err), D2_OK);
    dmn_config_diff diff;

    /* Nothing changed: empty diff, next == current. */
    ASSERT_EQ(dmn_config_reload(&cur, &next, 3, argv, &diff, err, sizeof err), D2_OK);
    ASSERT_EQ(diff.n_live, 0);
    ASSERT_EQ(diff.n_restart, 0);
    ASSERT(memcmp(&cur, &next, sizeof cur) == 0);

    FILE *f = fopen(path, "w");
    ASSERT(f);
    fprintf(f, "model /m/b.gguf\nport 9000\nlog_level debug\nmax_queue 7\napi_key k2\n"
               "default_max_tokens 100\nmax_tokens_limit 1000\nrequest_timeout_s 5\n"
               "log_requests false\nkv_method d2o\n");
    fclose(f);
    setenv("D2OD_MAX_SEQS", "8", 1); /* environment is reread too */
    ASSERT_EQ(dmn_config_reload(&cur, &next, 3, argv, &diff, err, sizeof err), D2_OK);
    ASSERT_EQ(diff.n_live, 7);
    ASSERT_EQ(diff.n_restart, 5);
    const char *want_restart[] = {"model", "served_model_name", "port", "max_seqs", "kv_method"};
    for (int i = 0; i < 5; i++) ASSERT_STREQ(diff.restart[i], want_restart[i]);
    const char *want_live[] = {"api_key", "max_queue", "max_tokens_limit", "default_max_tokens",
                               "request_timeout_s", "log_level", "log_requests"};
    for (int i = 0; i < 7; i++) ASSERT_STREQ(diff.live[i], want_live[i]);
    /* Live values applied, restart-only values kept. */
    ASSERT_EQ(next.log_level, DMN_LOG_DEBUG);
    ASSERT_EQ(next.max_queue, 7);
    ASSERT_STREQ(next.api_key, "k2");
    ASSERT_EQ(next.default_max_tokens, 100);
    ASSERT_EQ(next.max_tokens_limit, 1000);
    ASSERT_NEAR(next.request_timeout_s, 5, 0);
    ASSERT_EQ(next.log_requests, 0);
    ASSERT_EQ(next.port, 8001);
    ASSERT_STREQ(next.model, "/m/a.gguf");
    ASSERT_STREQ(next.served_model_name, "a");
    ASSERT_EQ(next.max_seqs, 64);
    ASSERT_EQ(next.kv_method, DMN_KV_FULL);
    ASSERT_EQ(next.threads, 2);
    ASSERT_STREQ(next.config_file, path);

    /* A broken file: error with location, next is an unchanged copy. */
    f = fopen(path, "w");
    ASSERT(f);
    fprintf(f, "model /m/a.gguf\nlog_level debug\nport x\n");
    fclose(f);
    memset(&next, 0x5a, sizeof next);
    ASSERT_EQ(dmn_config_reload(&cur, &next, 3, argv, &diff, err, sizeof err), D2_ECONFIG);
    char want[512];
    snprintf(want, sizeof want, "%s:3: directive 'port': value 'x' is not an integer", path);
    ASSERT_STREQ(err, want);
    ASSERT(memcmp(&cur, &next, sizeof cur) == 0);
    ASSERT_EQ(diff.n_live + diff.n_restart, 0);

    /* A deleted file is an error too (the daemon keeps the old config). */
    unlink(path);
    ASSERT_EQ(dmn_config_reload(&cur, &next, 3, argv, &diff, err, sizeof err), D2_ENOENT);
}

TEST(dump_masks_api_key) {
    clear_env();
    dmn_config c;
    char err[512];
    ASSERT_EQ(LOAD(&c, NULL, err, "--model", "m", "--api-key", "sekrit-123"), D2_OK);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    dmn_config_dump(&c, f);
    fclose(f);
    ASSERT(!strstr(buf, "sekrit"));
    ASSERT(has_dump_line(buf, "api_key", "(set)", "cli"));
    ASSERT(has_dump_line(buf, "port", "8000", "default"));
    ASSERT(has_dump_line(buf, "served_model_name", "m", "derived"));
    ASSERT(has_dump_line(buf, "request_timeout_s", "600", "default"));
    ASSERT(has_dump_line(buf, "kv_method", "full", "default"));
    ASSERT(strstr(buf, "config: file (none)\n"));
    int lines = 0;
    for (const char *p = buf; *p; p++) lines += *p == '\n';
    ASSERT_EQ(lines, N_DIRS + 1);
    free(buf);
}

/* configs/d2od.conf lists every directive, commented out with its default.
 * Uncomment each line whose first word after '#' is a directive name and
 * parse the result: every directive must appear exactly once and equal the
 * table's default. Prose lines start with a capital or punctuation, so they
 * never look like directives. */
TEST(example_conf_matches_table) {
    const char *path = "configs/d2od.conf";
    REQUIRE_FILE(path);
    char *text = NULL;
    size_t len = 0;
    ASSERT_EQ(d2_read_file(path, &text, &len), D2_OK);
    char *out = malloc(len + 1);
    ASSERT(out);
    size_t o = 0;
    int seen[DMN_CONFIG_MAX_DIRECTIVES] = {0};
    for (char *line = text; line < text + len;) {
        char *nl = memchr(line, '\n', (size_t)(text + len - line));
        size_t ll = nl ? (size_t)(nl - line) : (size_t)(text + len - line);
        const char *keep = line;
        size_t keep_len = ll;
        if (ll > 1 && line[0] == '#') {
            const char *p = line + 1;
            while (p < line + ll && (*p == ' ' || *p == '\t')) p++;
            const char *w = p;
            while (p < line + ll && ((*p >= 'a' && *p <= 'z') || *p == '_')) p++;
            if (p > w && p < line + ll && (*p == ' ' || *p == '\t')) {
                int idx = find_by_name(w, (size_t)(p - w));
                if (idx >= 0) {
                    seen[idx]++;
                    keep = w;
                    keep_len = ll - (size_t)(w - line);
                }
            }
        }
        memcpy(out + o, keep, keep_len);
        o += keep_len;
        out[o++] = '\n';
        line += ll + 1;
    }
    for (int i = 0; i < N_DIRS; i++)
        if (seen[i] != 1) FAIL_("%s lists directive '%s' %d times (want 1)", path, g_dirs[i].name, seen[i]);
    dmn_config parsed, defaults;
    char err[512];
    dmn_config_defaults(&defaults);
    dmn_config_defaults(&parsed);
    int rc = dmn_config_parse_buffer(&parsed, out, o, path, err, sizeof err);
    if (rc) FAIL_("uncommented %s: %s", path, err);
    for (int i = 0; i < N_DIRS; i++) {
        ASSERT_EQ(parsed.source[i], DMN_SRC_FILE);
        if (!values_equal(&g_dirs[i], &parsed, &defaults))
            FAIL_("%s: '%s' differs from the table default '%s'", path, g_dirs[i].name, g_dirs[i].def);
    }
    free(out);
    free(text);
}
