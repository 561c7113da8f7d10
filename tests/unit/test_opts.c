/*
 * tests/unit/test_opts.c — the option table of the one-shot subcommands
 * (daemon/opts.c, #included): defaults through the parser, both value
 * spellings, every type's checks and the message that names the option and
 * the reason, required options, lists, KV budgets through the engine's one
 * reader, and the generated --help.
 */
#include "daemon/opts.c"
#include "daemon/value.c"

#include "tests/test.h"

typedef struct t_opts {
    const char *model, *name;
    int n, mode, seed;
    double x;
    bool flag, has_seed;
    dmn_int_list ints, modes;
    dmn_float_list xs;
    dmn_kv_budget budget;
    dmn_kv_budget_list shares;
} t_opts;

static const char *const MODES[] = {"alpha", "beta", "gamma", NULL};

#define OFF(f) offsetof(t_opts, f)
static const dmn_opt T_OPTS[] = {
    {.name = "model", .type = DMN_OPT_STR, .offset = OFF(model), .flags = DMN_OPT_REQUIRED, .metavar = "M",
     .help = "the model"},
    {.name = "name", .type = DMN_OPT_STR, .offset = OFF(name), .def = "anon", .help = "a name"},
    {.name = "n", .type = DMN_OPT_INT, .offset = OFF(n), .def = "7", .min = -5, .max = 100, .help = "a count"},
    {.name = "x", .type = DMN_OPT_FLOAT, .offset = OFF(x), .def = "0.5", .min = 0, .max = 2, .help = "a number"},
    {.name = "flag", .type = DMN_OPT_FLAG, .offset = OFF(flag), .help = "a switch"},
    {.name = "mode", .type = DMN_OPT_ENUM, .offset = OFF(mode), .def = "beta", .names = MODES, .help = "a mode"},
    {.name = "seed", .type = DMN_OPT_INT, .offset = OFF(seed), .min = 0, .max = 1000, .flags = DMN_OPT_SEEN,
     .seen_offset = OFF(has_seed), .help = "a seed"},
    {.name = "ints", .type = DMN_OPT_INT_LIST, .offset = OFF(ints), .def = "1,8,32", .min = 1, .max = 64,
     .help = "sizes"},
    {.name = "modes", .type = DMN_OPT_ENUM_LIST, .offset = OFF(modes), .names = MODES, .help = "modes"},
    {.name = "xs", .type = DMN_OPT_FLOAT_LIST, .offset = OFF(xs), .def = "0,0.5", .min = 0, .max = 1, .max_count = 3,
     .flags = DMN_OPT_SEEN, .seen_offset = OFF(has_seed), .help = "shares (also marks has_seed: a shared seen bool)"},
    {.name = "budget", .type = DMN_OPT_KV_BUDGET, .offset = OFF(budget), .def = "0.2", .help = "a budget"},
    {.name = "shares", .type = DMN_OPT_KV_BUDGET_LIST, .offset = OFF(shares), .def = "0.1,0.4",
     .flags = DMN_OPT_SHARES, .help = "shares"},
};
#undef OFF

static const dmn_cmd_spec T_CMD = {.name = "t", .usage = "--model M [options]", .about = "A test command.",
                                   .opts = T_OPTS, .n_opts = (int)(sizeof T_OPTS / sizeof T_OPTS[0]),
                                   .size = sizeof(t_opts)};

static char g_err[512];

#define PARSE(o, ...)                                                                           \
    ({                                                                                          \
        char *argv_[] = {"t", __VA_ARGS__};                                                     \
        g_err[0] = '\0';                                                                        \
        dmn_opts_parse(&T_CMD, (o), (int)(sizeof argv_ / sizeof *argv_), argv_, g_err, sizeof g_err); \
    })

/* The parse fails with D2_EINVAL and exactly this message. */
#define EXPECT_ERR(msg, ...)                                                                    \
    do {                                                                                        \
        t_opts o_;                                                                              \
        int rc_ = PARSE(&o_, __VA_ARGS__);                                                      \
        if (rc_ != D2_EINVAL) FAIL_("rc %d, want D2_EINVAL (err '%s')", rc_, g_err);            \
        if (strcmp(g_err, (msg))) FAIL_("error\n    got:  %s\n    want: %s", g_err, (msg));     \
    } while (0)

TEST(defaults_go_through_the_parser_and_the_rest_is_zero) {
    t_opts o;
    memset(&o, 0xa5, sizeof o); /* must be zeroed by the parser */
    ASSERT_EQ(PARSE(&o, "--model", "m"), D2_OK);
    ASSERT_STREQ(o.model, "m");
    ASSERT_STREQ(o.name, "anon");
    ASSERT_EQ(o.n, 7);
    ASSERT_NEAR(o.x, 0.5, 0);
    ASSERT_EQ(o.flag, false);
    ASSERT_EQ(o.mode, 1);
    ASSERT_EQ(o.seed, 0);
    ASSERT_EQ(o.has_seed, false);
    ASSERT_EQ(o.ints.n, 3);
    ASSERT(o.ints.v[0] == 1 && o.ints.v[1] == 8 && o.ints.v[2] == 32);
    ASSERT_EQ(o.modes.n, 0);
    ASSERT_NEAR(o.budget.frac, 0.2, 1e-7);
    ASSERT_EQ(o.budget.tokens, 0);
    ASSERT_EQ(o.shares.n, 2);
}

TEST(both_spellings_flags_seen_and_last_wins) {
    t_opts o;
    ASSERT_EQ(PARSE(&o, "--model=a=b", "--n", "-5", "--x=2", "--flag", "--mode", "gamma", "--seed", "0", "--n=100"),
              D2_OK);
    ASSERT_STREQ(o.model, "a=b");
    ASSERT_EQ(o.n, 100);
    ASSERT_NEAR(o.x, 2, 0);
    ASSERT_EQ(o.flag, true);
    ASSERT_EQ(o.mode, 2);
    ASSERT_EQ(o.has_seed, true);
    ASSERT_EQ(o.seed, 0);
    /* a value may start with a dash when it is given separately */
    ASSERT_EQ(PARSE(&o, "--model", "m", "--name", "--odd"), D2_OK);
    ASSERT_STREQ(o.name, "--odd");
}

TEST(help_wins_over_everything_else) {
    t_opts o;
    ASSERT_EQ(PARSE(&o, "--frob", "-h"), DMN_OPTS_HELP);
    ASSERT_EQ(PARSE(&o, "--help"), DMN_OPTS_HELP);
}

TEST(errors_name_the_option_and_the_reason) {
    EXPECT_ERR("--model is required", "--n", "3");
    EXPECT_ERR("--n needs a value", "--model", "m", "--n");
    EXPECT_ERR("unknown option '--frob'", "--model", "m", "--frob", "1");
    EXPECT_ERR("unknown option '-x'", "--model", "m", "-x");
    EXPECT_ERR("unexpected argument 'stray'", "--model", "m", "stray");
    EXPECT_ERR("--flag takes no value", "--model", "m", "--flag=yes");
    EXPECT_ERR("--n: 'abc' is not an integer", "--model", "m", "--n", "abc");
    EXPECT_ERR("--n: '3.5' is not an integer", "--model", "m", "--n", "3.5");
    EXPECT_ERR("--n: ' 3' is not an integer", "--model", "m", "--n", " 3");
    EXPECT_ERR("--n: '' is not an integer", "--model", "m", "--n=");
    EXPECT_ERR("--n: 101 out of range [-5, 100]", "--model", "m", "--n", "101");
    /* an integer too big for any type is out of range, as in the config file */
    EXPECT_ERR("--n: 99999999999999999999 out of range [-5, 100]", "--model", "m", "--n", "99999999999999999999");
    EXPECT_ERR("--x: 'nan' is not a number", "--model", "m", "--x", "nan");
    EXPECT_ERR("--x: 'inf' is not a number", "--model", "m", "--x", "inf");
    EXPECT_ERR("--x: '1x' is not a number", "--model", "m", "--x", "1x");
    EXPECT_ERR("--x: 2.5 out of range [0, 2]", "--model", "m", "--x", "2.5");
    EXPECT_ERR("--mode: 'delta' is not one of alpha, beta, gamma", "--model", "m", "--mode", "delta");
    EXPECT_ERR("--seed: -1 out of range [0, 1000]", "--model", "m", "--seed", "-1");
    /* control bytes are shown as '?' so the message stays one line */
    EXPECT_ERR("--n: 'a?b' is not an integer", "--model", "m", "--n", "a\nb");
}

TEST(values_follow_the_config_files_rules) {
    /* the readers are serve's (daemon/value.h): a sign, names in any case, plain decimals only */
    t_opts o;
    ASSERT_EQ(PARSE(&o, "--model", "m", "--n", "+5", "--mode", "GAMMA", "--modes", "Alpha,ALPHA", "--x", "+.5"), D2_OK);
    ASSERT_EQ(o.n, 5);
    ASSERT_EQ(o.mode, 2);
    ASSERT_EQ(o.modes.n, 1);
    ASSERT_NEAR(o.x, 0.5, 0);
    EXPECT_ERR("--x: '0x1p0' is not a number", "--model", "m", "--x", "0x1p0");
    EXPECT_ERR("--x: ' 1' is not a number", "--model", "m", "--x", " 1");
}

TEST(lists) {
    t_opts o;
    ASSERT_EQ(PARSE(&o, "--model", "m", "--ints", "64", "--modes", "gamma,alpha,gamma"), D2_OK);
    ASSERT_EQ(o.ints.n, 1);
    ASSERT_EQ(o.ints.v[0], 64);
    ASSERT_EQ(o.modes.n, 2); /* repeats dropped */
    ASSERT(o.modes.v[0] == 2 && o.modes.v[1] == 0);
    EXPECT_ERR("--ints: empty element in '1,,2'", "--model", "m", "--ints", "1,,2");
    EXPECT_ERR("--ints: empty element in '1,'", "--model", "m", "--ints", "1,");
    EXPECT_ERR("--ints: 65 out of range [1, 64]", "--model", "m", "--ints", "1,65");
    EXPECT_ERR("--ints: 'x' is not an integer", "--model", "m", "--ints", "x");
    EXPECT_ERR("--ints: at most 16 values", "--model", "m", "--ints", "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17");
    EXPECT_ERR("--modes: 'zeta' is not one of alpha, beta, gamma", "--model", "m", "--modes", "alpha,zeta");
}

TEST(float_lists_and_a_list_cap_below_the_table_maximum) {
    t_opts o;
    ASSERT_EQ(PARSE(&o, "--model", "m"), D2_OK);
    ASSERT_EQ(o.xs.n, 2);
    ASSERT(o.xs.v[0] == 0.0 && o.xs.v[1] == 0.5);
    ASSERT_EQ(o.has_seed, false); /* a default does not count as given */
    ASSERT_EQ(PARSE(&o, "--model", "m", "--xs", "1,0.25,0.125"), D2_OK);
    ASSERT_EQ(o.xs.n, 3);
    ASSERT(o.xs.v[0] == 1.0 && o.xs.v[1] == 0.25 && o.xs.v[2] == 0.125);
    ASSERT_EQ(o.has_seed, true); /* the seen bool of another option's row */
    ASSERT_EQ(o.seed, 0);
    EXPECT_ERR("--xs: at most 3 values", "--model", "m", "--xs", "0,0,0,0");
    EXPECT_ERR("--xs: 2 out of range [0, 1]", "--model", "m", "--xs", "0.5,2");
    EXPECT_ERR("--xs: 'x' is not a number", "--model", "m", "--xs", "0.5,x");
    EXPECT_ERR("--xs: empty element in ',0.5'", "--model", "m", "--xs", ",0.5");
}

TEST(kv_budgets_have_the_engine_meaning) {
    t_opts o;
    ASSERT_EQ(PARSE(&o, "--model", "m", "--budget", "128"), D2_OK);
    ASSERT_EQ(o.budget.tokens, 128);
    ASSERT_NEAR(o.budget.frac, 0, 0);
    ASSERT_EQ(PARSE(&o, "--model", "m", "--budget", "1"), D2_OK); /* the share 1, not one token */
    ASSERT_NEAR(o.budget.frac, 1.0, 0);
    ASSERT_EQ(o.budget.tokens, 0);
    ASSERT_EQ(PARSE(&o, "--model", "m", "--shares", "0.05,1"), D2_OK);
    ASSERT_EQ(o.shares.n, 2);
    ASSERT(o.shares.v[0].frac == 0.05); /* the share as written, not the nearest float */
    ASSERT_NEAR(o.shares.v[1].frac, 1.0, 0);
    EXPECT_ERR("--budget: '1.5': a share of the prompt must be in (0, 1]; a token count is written as an integer",
               "--model", "m", "--budget", "1.5");
    EXPECT_ERR("--budget: '0': a budget must be above 0: a share of the prompt in (0, 1] or a token count >= 2",
               "--model", "m", "--budget", "0");
    EXPECT_ERR("--shares: '64': this command takes budgets as shares of the prompt in (0, 1], not token counts",
               "--model", "m", "--shares", "0.2,64");
}

static const dmn_opt BAD_DEFAULT[] = {
    {.name = "n", .type = DMN_OPT_INT, .offset = offsetof(t_opts, n), .def = "200", .min = 0, .max = 100,
     .help = "a count"},
};

TEST(a_default_the_parser_refuses_is_an_internal_error) {
    /* a whole options struct, as a command passes (the parser may write any row type's field) */
    dmn_cmd_spec c = {.name = "bad", .usage = "", .opts = BAD_DEFAULT, .n_opts = 1, .size = sizeof(t_opts)};
    t_opts v;
    char *argv[] = {"bad"};
    char err[256];
    ASSERT_EQ(dmn_opts_parse(&c, &v, 1, argv, err, sizeof err), D2_EINTERNAL);
    ASSERT(strstr(err, "--n: 200 out of range [0, 100]") != NULL);
}

TEST(help_lists_every_option_with_default_range_and_choices) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    ASSERT(f != NULL);
    dmn_opts_help(&T_CMD, f);
    fclose(f);
    ASSERT(strstr(buf, "usage: d2od t --model M [options]\n") == buf);
    ASSERT(strstr(buf, "A test command.") != NULL);
    for (int i = 0; i < T_CMD.n_opts; i++) {
        char want[64];
        snprintf(want, sizeof want, "  --%s", T_OPTS[i].name);
        if (!strstr(buf, want)) FAIL_("help lacks %s:\n%s", want, buf);
    }
    ASSERT(strstr(buf, "--model M") && strstr(buf, "the model (required)"));
    ASSERT(strstr(buf, "a count (default 7; -5..100)") != NULL);
    ASSERT(strstr(buf, "a mode (alpha|beta|gamma; default beta)") != NULL);
    ASSERT(strstr(buf, "a switch\n") != NULL);
    ASSERT(strstr(buf, "--xs X,X,...") && strstr(buf, "(default 0,0.5; 0..1; at most 3 values)"));
    ASSERT(strstr(buf, "-h, --help") != NULL);
    free(buf);
}

TEST(shared_names_follow_the_engine_numbering) {
    for (int i = 0; dmn_opt_kv_methods[i]; i++) {
        ASSERT_EQ(eng_kv_method_parse(dmn_opt_kv_methods[i]), i);
        ASSERT_STREQ(eng_kv_method_name((eng_kv_method)i), dmn_opt_kv_methods[i]);
    }
    ASSERT_STREQ(dmn_opt_devices[ENG_DEVICE_CPU], "cpu");
    ASSERT_STREQ(dmn_opt_devices[ENG_DEVICE_CUDA], "cuda");
    ASSERT_STREQ(dmn_opt_devices[ENG_DEVICE_AUTO], "auto");
}
