/*
 * tests/unit/test_jinja.c — api/jinja/jinja.h against @huggingface/jinja.
 *
 * Replays tests/fixtures/jinja/expected.json (written by
 * tests/js/jinja_oracle.mjs): every chat template and language snippet is
 * rendered with the same context and compared byte for byte; cases where the
 * oracle raised must fail here too, with the same message for runtime errors
 * (raise_exception, type errors; syntax errors need only be rejected). Templates of the shared assets are read in place.
 * Also: limits (output cap, recursion, step budget) and error paths.
 */
#include "tests/test.h"

#include <jansson.h>

#include "api/jinja/jinja.h"
#include "common/status.h"
#include "common/util.h"

#define FIXDIR "tests/fixtures/jinja/"

static const struct tm *fixed_now(void) {
    static struct tm t;
    memset(&t, 0, sizeof t);
    t.tm_year = 124;
    t.tm_mon = 6;
    t.tm_mday = 26;
    t.tm_hour = 9;
    t.tm_min = 5;
    return &t;
}

/* Prints where a and b first differ. */
static void show_diff(const char *name, const char *got, size_t glen, const char *want, size_t wlen) {
    size_t i = 0;
    while (i < glen && i < wlen && got[i] == want[i]) i++;
    size_t from = i > 40 ? i - 40 : 0;
    fprintf(stderr, "  %s: first difference at byte %zu (got %zu bytes, want %zu)\n", name, i, glen, wlen);
    fprintf(stderr, "    got:  \"%.*s\"\n", (int)((glen - from) < 100 ? glen - from : 100), got + from);
    fprintf(stderr, "    want: \"%.*s\"\n", (int)((wlen - from) < 100 ? wlen - from : 100), want + from);
}

static char *template_source(json_t *c, int *skip) {
    const char *file = json_string_value(json_object_get(c, "template_file"));
    const char *sh = json_string_value(json_object_get(c, "template_shared"));
    const char *src = json_string_value(json_object_get(c, "source"));
    *skip = 0;
    if (src) return strdup(src);
    char *buf = NULL;
    size_t len;
    if (file) {
        char path[512];
        snprintf(path, sizeof path, FIXDIR "%s", file);
        if (d2_read_file(path, &buf, &len) != D2_OK) return NULL;
        return buf;
    }
    if (sh) {
        const char *path = test_shared_path(sh);
        if (access(path, R_OK) != 0) {
            *skip = 1;
            return NULL;
        }
        json_error_t je;
        json_t *cfg = json_load_file(path, JSON_DECODE_INT_AS_REAL, &je);
        if (!cfg) return NULL;
        const char *t = json_string_value(json_object_get(cfg, "chat_template"));
        char *out = t ? strdup(t) : NULL;
        json_decref(cfg);
        return out;
    }
    return NULL;
}

/* Runs every case whose name starts with prefix; returns failures. */
static int replay(const char *prefix, int *ran) {
    json_error_t je;
    /* Big integers (beyond int64) appear in the cases: read numbers as doubles,
     * which is what JavaScript sees too. */
    json_t *root = json_load_file(FIXDIR "expected.json", JSON_DECODE_INT_AS_REAL, &je);
    if (!root) FAIL_("cannot load " FIXDIR "expected.json: %s", je.text);
    json_t *cases = json_object_get(root, "cases");
    int failures = 0;
    *ran = 0;
    for (size_t i = 0; i < json_array_size(cases); i++) {
        json_t *c = json_array_get(cases, i);
        const char *name = json_string_value(json_object_get(c, "name"));
        if (strncmp(name, prefix, strlen(prefix)) != 0) continue;
        int skip;
        char *src = template_source(c, &skip);
        if (skip) continue;
        (*ran)++;
        if (!src) {
            fprintf(stderr, "  %s: cannot read template\n", name);
            failures++;
            continue;
        }
        json_t *want_out = json_object_get(c, "output");
        const char *want_err = json_string_value(json_object_get(c, "error"));
        char err[512];
        api_jinja_tmpl *t = NULL;
        int rc = api_jinja_compile(src, &t, err, sizeof err);
        int compiled = rc == D2_OK;
        char *out = NULL;
        size_t olen = 0;
        if (rc == D2_OK) rc = api_jinja_render_at(t, json_object_get(c, "context"), fixed_now(), &out, &olen, err, sizeof err);
        if (want_err) {
            if (rc == D2_OK) {
                fprintf(stderr, "  %s: expected error \"%s\", got output \"%.200s\"\n", name, want_err, out);
                failures++;
            } else if (rc != D2_EINVAL) {
                fprintf(stderr, "  %s: expected D2_EINVAL, got %s\n", name, d2_status_name(rc));
                failures++;
            } else if (compiled && strcmp(err, want_err) != 0) {
                /* Runtime errors (raise_exception, type errors) carry the same
                 * message; syntax errors only need to be rejected. */
                fprintf(stderr, "  %s: message \"%s\", want \"%s\"\n", name, err, want_err);
                failures++;
            }
        } else if (rc != D2_OK) {
            fprintf(stderr, "  %s: render failed (%s): %s\n", name, d2_status_name(rc), err);
            failures++;
        } else {
            const char *w = json_string_value(want_out);
            size_t wl = json_string_length(want_out);
            if (!w || wl != olen || memcmp(w, out, olen) != 0) {
                show_diff(name, out, olen, w ? w : "", w ? wl : 0);
                failures++;
            }
        }
        free(out);
        api_jinja_free(t);
        free(src);
    }
    json_decref(root);
    return failures;
}

#define REPLAY_TEST(tname, prefix, min_cases)                                  \
    TEST(tname) {                                                              \
        int ran;                                                               \
        int f = replay(prefix, &ran);                                          \
        if (ran == 0) SKIP("no cases for %s (missing shared assets?)", prefix); \
        ASSERT_GE(ran, min_cases);                                             \
        ASSERT_EQ(f, 0);                                                       \
    }

REPLAY_TEST(llama2, "llama2/", 20)
REPLAY_TEST(mistral_v1, "mistral_v1/", 20)
REPLAY_TEST(mistral_v3, "mistral_v3/", 20)
REPLAY_TEST(gemma, "gemma/", 20)
REPLAY_TEST(llama3, "llama3/", 20)
REPLAY_TEST(llama3_1, "llama3_1/", 20)
REPLAY_TEST(llama3_2, "llama3_2/", 20)
REPLAY_TEST(qwen2_5, "qwen2_5/", 20)
REPLAY_TEST(qwen3, "qwen3/", 20)
REPLAY_TEST(phi3, "phi3/", 20)
REPLAY_TEST(snippets, "snippet/", 50)

static int render_str(const char *src, const char *ctx_json, char **out, char *err, size_t errlen) {
    api_jinja_tmpl *t;
    int rc = api_jinja_compile(src, &t, err, errlen);
    if (rc) return rc;
    json_t *ctx = ctx_json ? json_loads(ctx_json, 0, NULL) : NULL;
    rc = api_jinja_render(t, ctx, out, NULL, err, errlen);
    json_decref(ctx);
    api_jinja_free(t);
    return rc;
}

TEST(raise_exception_message) {
    char *out = NULL, err[256];
    ASSERT_EQ(render_str("a{{ raise_exception('boom: ' ~ x) }}b", "{\"x\": 3}", &out, err, sizeof err), D2_EINVAL);
    ASSERT(out == NULL);
    ASSERT_STREQ(err, "boom: 3");
}

TEST(syntax_errors) {
    const char *bad[] = {"{% if x %}", "{{ 'a' ", "{% for %}", "{{ ) }}", "{% endfor %}", "{{ a | }}",
                         "{# unterminated", "{{ x[1:2:3:4] }}", "{% macro m(a, a) %}{% endmacro %}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        api_jinja_tmpl *t = NULL;
        char err[256] = "";
        int rc = api_jinja_compile(bad[i], &t, err, sizeof err);
        if (rc == D2_OK) FAIL_("compiled: %s", bad[i]);
        ASSERT_EQ(rc, D2_EINVAL);
        ASSERT(err[0] != 0);
        ASSERT(t == NULL);
    }
}

TEST(limits) {
    char *out = NULL, err[256];
    /* Output cap: 2^25 bytes of doubling. */
    ASSERT_EQ(render_str("{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(30) %}"
                         "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", NULL, &out, err, sizeof err),
              D2_EINVAL);
    ASSERT(out == NULL);
    /* Unbounded macro recursion. */
    ASSERT_EQ(render_str("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", NULL, &out, err, sizeof err),
              D2_EINVAL);
    /* Step budget: a huge nested loop. */
    ASSERT_EQ(render_str("{% for i in range(1000000) %}{% for j in range(1000000) %}{% endfor %}{% endfor %}",
                         NULL, &out, err, sizeof err),
              D2_EINVAL);
    /* Deep parser nesting. */
    char deep[5000];
    size_t k = 0;
    k += (size_t)sprintf(deep, "{{ ");
    for (int i = 0; i < 2000; i++) deep[k++] = '(';
    deep[k++] = '1';
    for (int i = 0; i < 2000; i++) deep[k++] = ')';
    strcpy(deep + k, " }}");
    ASSERT_EQ(render_str(deep, NULL, &out, err, sizeof err), D2_EINVAL);
    /* A context key that clashes with a builtin is rejected like the JS Environment does. */
    ASSERT_EQ(render_str("{{ 1 }}", "{\"range\": 1}", &out, err, sizeof err), D2_EINVAL);
}

TEST(basic_render_and_reuse) {
    api_jinja_tmpl *t;
    char err[256];
    ASSERT_EQ(api_jinja_compile("{% for m in messages %}[{{ m.role }}:{{ m.content }}]{% endfor %}", &t, err, sizeof err), D2_OK);
    for (int i = 0; i < 3; i++) {
        json_t *ctx = json_pack("{s:[{s:s,s:s}]}", "messages", "role", "user", "content", "hi");
        char *out;
        size_t len;
        ASSERT_EQ(api_jinja_render(t, ctx, &out, &len, err, sizeof err), D2_OK);
        ASSERT_STREQ(out, "[user:hi]");
        ASSERT_EQ(len, 9);
        free(out);
        json_decref(ctx);
    }
    api_jinja_free(t);
    api_jinja_free(NULL);
}
