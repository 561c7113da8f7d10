/*
 * tests/unit/test_value.c — the value readers shared by serve's directive
 * table and the subcommands' option table (daemon/value.c, #included: daemon/
 * is not in libd2od.a). Edge cases per type: empty, trailing garbage,
 * overflow, range ends, signs, case; the exact reason each failure gives; and
 * that a failure leaves the destination untouched.
 */
#include "daemon/value.c"

#include "tests/test.h"

static char g_why[512];

/* The int reader fails with exactly this reason and leaves out alone. */
#define INT_ERR(v, lo, hi, want)                                                               \
    do {                                                                                       \
        int out_ = 12345;                                                                      \
        g_why[0] = '\0';                                                                       \
        int rc_ = dmn_value_int((v), (lo), (hi), &out_, g_why, sizeof g_why);                 \
        if (rc_ != D2_EINVAL) FAIL_("int '%s': rc %d, want D2_EINVAL", (v), rc_);              \
        if (strcmp(g_why, (want))) FAIL_("int '%s':\n    got:  %s\n    want: %s", (v), g_why, (want)); \
        ASSERT_EQ(out_, 12345);                                                                \
    } while (0)

#define INT_OK(v, lo, hi, want)                                                                \
    do {                                                                                       \
        int out_ = 12345;                                                                      \
        int rc_ = dmn_value_int((v), (lo), (hi), &out_, g_why, sizeof g_why);                 \
        if (rc_ != D2_OK) FAIL_("int '%s': rc %d (%s)", (v), rc_, g_why);                      \
        ASSERT_EQ(out_, (want));                                                               \
    } while (0)

TEST(integers) {
    INT_OK("0", 0, 10, 0);
    INT_OK("10", 0, 10, 10);             /* both ends are inside */
    INT_OK("-5", -5, 5, -5);
    INT_OK("+7", 0, 10, 7);              /* an explicit sign */
    INT_OK("007", 0, 10, 7);             /* decimal, not octal */
    INT_OK("2147483647", 0, 2147483647.0, 2147483647);
    INT_ERR("", 0, 10, "'' is not an integer");
    INT_ERR("12x", 0, 100, "'12x' is not an integer");
    INT_ERR("1.0", 0, 10, "'1.0' is not an integer");
    INT_ERR("1e3", 0, 10000, "'1e3' is not an integer");
    INT_ERR(" 5", 0, 10, "' 5' is not an integer");
    INT_ERR("5 ", 0, 10, "'5 ' is not an integer");
    INT_ERR("0x10", 0, 100, "'0x10' is not an integer");
    INT_ERR("-", 0, 10, "'-' is not an integer");
    INT_ERR("+-5", -10, 10, "'+-5' is not an integer");
    INT_ERR("11", 0, 10, "11 out of range [0, 10]");
    INT_ERR("-6", -5, 5, "-6 out of range [-5, 5]");
    /* beyond int but within long long: out of range, never wrapped */
    INT_ERR("4294967297", 0, 2147483647.0, "4294967297 out of range [0, 2147483647]");
    /* beyond long long: out of range too (it is an integer, just too big) */
    INT_ERR("99999999999999999999", 0, 10, "99999999999999999999 out of range [0, 10]");
    INT_ERR("-99999999999999999999", 0, 10, "-99999999999999999999 out of range [0, 10]");
}

#define FLOAT_ERR(v, lo, hi, want)                                                             \
    do {                                                                                       \
        double out_ = 42.0;                                                                    \
        g_why[0] = '\0';                                                                       \
        int rc_ = dmn_value_float((v), (lo), (hi), &out_, g_why, sizeof g_why);               \
        if (rc_ != D2_EINVAL) FAIL_("float '%s': rc %d, want D2_EINVAL", (v), rc_);            \
        if (strcmp(g_why, (want))) FAIL_("float '%s':\n    got:  %s\n    want: %s", (v), g_why, (want)); \
        ASSERT(out_ == 42.0);                                                                  \
    } while (0)

TEST(numbers) {
    double x = 0;
    ASSERT_EQ(dmn_value_float("0.5", 0, 1, &x, g_why, sizeof g_why), D2_OK);
    ASSERT(x == 0.5);
    ASSERT_EQ(dmn_value_float("1", 0, 1, &x, g_why, sizeof g_why), D2_OK); /* the upper end */
    ASSERT(x == 1.0);
    ASSERT_EQ(dmn_value_float(".25", 0, 1, &x, g_why, sizeof g_why), D2_OK);
    ASSERT(x == 0.25);
    ASSERT_EQ(dmn_value_float("+2e-1", 0, 1, &x, g_why, sizeof g_why), D2_OK);
    ASSERT(x == 0.2);
    ASSERT_EQ(dmn_value_float("-0", 0, 1, &x, g_why, sizeof g_why), D2_OK);
    ASSERT(x == 0.0);
    FLOAT_ERR("", 0, 1, "'' is not a number");
    FLOAT_ERR("0.5x", 0, 1, "'0.5x' is not a number");
    FLOAT_ERR("0.5 ", 0, 1, "'0.5 ' is not a number");
    FLOAT_ERR(" 0.5", 0, 1, "' 0.5' is not a number");
    FLOAT_ERR("1e", 0, 1, "'1e' is not a number");
    FLOAT_ERR("1..2", 0, 5, "'1..2' is not a number");
    FLOAT_ERR("nan", 0, 1, "'nan' is not a number");
    FLOAT_ERR("inf", 0, 1e308, "'inf' is not a number");
    FLOAT_ERR("0x1p-1", 0, 1, "'0x1p-1' is not a number"); /* strtod would take a hex float */
    FLOAT_ERR("1e999", 0, 1e308, "'1e999' is not a number"); /* overflows to infinity */
    FLOAT_ERR("1.0001", 0, 1, "1.0001 out of range [0, 1]");
    FLOAT_ERR("-0.001", 0, 1, "-0.001 out of range [0, 1]");
    FLOAT_ERR("0.01", 0.05, 0.95, "0.01 out of range [0.05, 0.95]");
}

#define SIZE_ERR(v, want)                                                                      \
    do {                                                                                       \
        uint64_t out_ = 7;                                                                     \
        g_why[0] = '\0';                                                                       \
        int rc_ = dmn_value_size((v), 1024, 1073741824.0, &out_, g_why, sizeof g_why);        \
        if (rc_ != D2_EINVAL) FAIL_("size '%s': rc %d, want D2_EINVAL", (v), rc_);             \
        if (strcmp(g_why, (want))) FAIL_("size '%s':\n    got:  %s\n    want: %s", (v), g_why, (want)); \
        ASSERT(out_ == 7);                                                                     \
    } while (0)

TEST(sizes) {
    uint64_t b = 0;
    ASSERT_EQ(dmn_value_size("1k", 1024, 1073741824.0, &b, g_why, sizeof g_why), D2_OK);
    ASSERT(b == 1024);
    ASSERT_EQ(dmn_value_size("3M", 1024, 1073741824.0, &b, g_why, sizeof g_why), D2_OK);
    ASSERT(b == 3u << 20);
    ASSERT_EQ(dmn_value_size("1g", 1024, 1073741824.0, &b, g_why, sizeof g_why), D2_OK); /* the upper end */
    ASSERT(b == 1u << 30);
    ASSERT_EQ(dmn_value_size("4096", 1024, 1073741824.0, &b, g_why, sizeof g_why), D2_OK);
    ASSERT(b == 4096);
    SIZE_ERR("", "'' is not a size (digits with an optional k, m or g)");
    SIZE_ERR("1kb", "'1kb' is not a size (digits with an optional k, m or g)");
    SIZE_ERR("+1k", "'+1k' is not a size (digits with an optional k, m or g)");
    SIZE_ERR("1.5m", "'1.5m' is not a size (digits with an optional k, m or g)");
    SIZE_ERR("1023", "1023 out of range [1024, 1073741824]");
    SIZE_ERR("1025m", "1025m out of range [1024, 1073741824]");
    /* the shift would overflow 64 bits: out of range, not wrapped to a small size */
    SIZE_ERR("18446744073709551615k", "18446744073709551615k out of range [1024, 1073741824]");
    SIZE_ERR("99999999999999999999999", "99999999999999999999999 out of range [1024, 1073741824]");
}

TEST(booleans_in_any_case) {
    const char *yes[] = {"true", "YES", "On", "1"}, *no[] = {"false", "No", "OFF", "0"};
    for (int i = 0; i < 4; i++) {
        int b = -1;
        ASSERT_EQ(dmn_value_bool(yes[i], &b, g_why, sizeof g_why), D2_OK);
        ASSERT_EQ(b, 1);
        ASSERT_EQ(dmn_value_bool(no[i], &b, g_why, sizeof g_why), D2_OK);
        ASSERT_EQ(b, 0);
    }
    int b = 5;
    ASSERT_EQ(dmn_value_bool("", &b, g_why, sizeof g_why), D2_EINVAL);
    ASSERT_STREQ(g_why, "'' is not a boolean (true/false, yes/no, on/off, 1/0)");
    ASSERT_EQ(dmn_value_bool("truex", &b, g_why, sizeof g_why), D2_EINVAL);
    ASSERT_EQ(dmn_value_bool("2", &b, g_why, sizeof g_why), D2_EINVAL);
    ASSERT_EQ(b, 5);
    ASSERT_EQ(dmn_value_bool_word("off"), 0);
    ASSERT_EQ(dmn_value_bool_word("--port"), -1);
}

TEST(names_in_any_case) {
    static const char *const names[] = {"cpu", "cuda", "auto", NULL};
    int k = -1;
    ASSERT_EQ(dmn_value_enum("cuda", names, &k, g_why, sizeof g_why), D2_OK);
    ASSERT_EQ(k, 1);
    ASSERT_EQ(dmn_value_enum("AUTO", names, &k, g_why, sizeof g_why), D2_OK);
    ASSERT_EQ(k, 2);
    k = 9;
    ASSERT_EQ(dmn_value_enum("tpu", names, &k, g_why, sizeof g_why), D2_EINVAL);
    ASSERT_STREQ(g_why, "'tpu' is not one of cpu, cuda, auto");
    ASSERT_EQ(dmn_value_enum("", names, &k, g_why, sizeof g_why), D2_EINVAL);
    ASSERT_EQ(dmn_value_enum("cpu ", names, &k, g_why, sizeof g_why), D2_EINVAL); /* no trimming */
    ASSERT_EQ(dmn_value_enum("cp", names, &k, g_why, sizeof g_why), D2_EINVAL);   /* no prefixes */
    ASSERT_EQ(k, 9);
}

TEST(kv_budgets_have_the_engine_meaning) {
    dmn_kv_budget b = {0};
    ASSERT_EQ(dmn_value_kv_budget("0.3", &b, g_why, sizeof g_why), D2_OK);
    ASSERT(b.frac == 0.3); /* the double written, not (double)0.3f */
    ASSERT_EQ(b.tokens, 0);
    ASSERT_EQ(dmn_value_kv_budget("1", &b, g_why, sizeof g_why), D2_OK); /* the share 1, not one token */
    ASSERT(b.frac == 1.0 && b.tokens == 0);
    ASSERT_EQ(dmn_value_kv_budget("128", &b, g_why, sizeof g_why), D2_OK);
    ASSERT(b.frac == 0.0 && b.tokens == 128);
    ASSERT_EQ(dmn_value_kv_budget("1073741824", &b, g_why, sizeof g_why), D2_OK);
    ASSERT_EQ(b.tokens, 1073741824);
    dmn_kv_budget keep = {0.5, 0};
    b = keep;
    ASSERT_EQ(dmn_value_kv_budget("", &b, g_why, sizeof g_why), D2_EINVAL);
    ASSERT_STREQ(g_why, "'': empty budget: write a share of the prompt in (0, 1] or a token count >= 2");
    ASSERT_EQ(dmn_value_kv_budget("1.5", &b, g_why, sizeof g_why), D2_EINVAL);
    ASSERT_STREQ(g_why, "'1.5': a share of the prompt must be in (0, 1]; a token count is written as an integer");
    ASSERT_EQ(dmn_value_kv_budget("0.2x", &b, g_why, sizeof g_why), D2_EINVAL);
    ASSERT_STREQ(g_why, "'0.2x': a budget is written with digits and at most one '.' (0.2, 1, 128)");
    ASSERT_EQ(dmn_value_kv_budget("1e-1", &b, g_why, sizeof g_why), D2_EINVAL);
    ASSERT_EQ(dmn_value_kv_budget("99999999999999999999", &b, g_why, sizeof g_why), D2_EINVAL);
    ASSERT_STREQ(g_why, "'99999999999999999999': a token count must be at most 1073741824");
    ASSERT_EQ(dmn_value_kv_budget("0", &b, g_why, sizeof g_why), D2_EINVAL);
    ASSERT(b.frac == keep.frac && b.tokens == keep.tokens);
}

TEST(messages_quote_values_printably_and_briefly) {
    char buf[80];
    ASSERT_STREQ(dmn_value_shown("a\nb\x80", buf, sizeof buf), "a?b?");
    char longv[200];
    memset(longv, '7', sizeof longv - 1);
    longv[sizeof longv - 1] = '\0';
    const char *s = dmn_value_shown(longv, buf, sizeof buf);
    ASSERT_EQ(strlen(s), 63u);
    ASSERT(strcmp(s + 60, "...") == 0);
    INT_ERR("1\t2", 0, 10, "'1?2' is not an integer");
    ASSERT_STREQ(dmn_value_num(16777216, buf, sizeof buf), "16777216");
    ASSERT_STREQ(dmn_value_num(0.05, buf, sizeof buf), "0.05");
    static const char *const names[] = {"a", "bb", "c", NULL};
    ASSERT_STREQ(dmn_value_names(names, "|", buf, sizeof buf), "a|bb|c");
    char small[5];
    ASSERT_STREQ(dmn_value_names(names, "|", small, sizeof small), "a|bb"); /* cut to fit, terminated */
}
