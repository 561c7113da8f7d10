/*
 * tests/test.h — the unit-test harness. One test file = one executable.
 *
 *   TEST(pool_append_free) { ASSERT_EQ(1, 1); }
 *
 * Tests register themselves (constructor attribute) and main() comes from
 * D2_TEST_MAIN, which the harness defines once per file when you include this
 * header. Each test runs in a forked child with a timeout (default 60 s,
 * scaled by D2_TEST_TIMEOUT_MULT) so a crash fails that test only.
 * A test may call SKIP("reason") (e.g. no GPU, missing asset).
 * Output: one line per test, then "N passed, N failed, N skipped".
 * D2_TEST_FILTER=substr runs only matching tests.
 *
 * Paths: D2_SHARED (default "../shared") locates the shared assets;
 * use test_shared_path("assets/...") to build a path.
 */
#ifndef D2_TESTS_TEST_H
#define D2_TESTS_TEST_H

#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef void (*test_fn)(void);
typedef struct test_case { const char *name; test_fn fn; } test_case;

#define TEST_MAX 512
static test_case test_cases_[TEST_MAX];
static int test_count_;

#define TEST(name)                                                             \
    static void test_##name(void);                                             \
    __attribute__((constructor)) static void test_reg_##name(void) {           \
        if (test_count_ < TEST_MAX)                                            \
            test_cases_[test_count_++] = (test_case){#name, test_##name};      \
    }                                                                          \
    static void test_##name(void)

#define TEST_EXIT_SKIP 77

#define FAIL_(...)                                                             \
    do {                                                                       \
        fprintf(stderr, "  %s:%d: ", __FILE__, __LINE__);                      \
        fprintf(stderr, __VA_ARGS__);                                          \
        fprintf(stderr, "\n");                                                 \
        exit(1);                                                               \
    } while (0)

#define SKIP(...)                                                              \
    do {                                                                       \
        fprintf(stderr, "  skip: ");                                           \
        fprintf(stderr, __VA_ARGS__);                                          \
        fprintf(stderr, "\n");                                                 \
        exit(TEST_EXIT_SKIP);                                                  \
    } while (0)

#define ASSERT(x)                                                              \
    do { if (!(x)) FAIL_("ASSERT(%s) failed", #x); } while (0)
#define ASSERT_OK(x)                                                           \
    do {                                                                       \
        long long r_ = (long long)(x);                                         \
        if (r_ < 0) FAIL_("ASSERT_OK(%s) = %lld", #x, r_);                     \
    } while (0)
#define ASSERT_CMP_(a, op, b)                                                  \
    do {                                                                       \
        long long a_ = (long long)(a), b_ = (long long)(b);                    \
        if (!(a_ op b_)) FAIL_("%s %s %s: %lld vs %lld", #a, #op, #b, a_, b_); \
    } while (0)
#define ASSERT_EQ(a, b) ASSERT_CMP_(a, ==, b)
#define ASSERT_NE(a, b) ASSERT_CMP_(a, !=, b)
#define ASSERT_LT(a, b) ASSERT_CMP_(a, <, b)
#define ASSERT_LE(a, b) ASSERT_CMP_(a, <=, b)
#define ASSERT_GT(a, b) ASSERT_CMP_(a, >, b)
#define ASSERT_GE(a, b) ASSERT_CMP_(a, >=, b)
#define ASSERT_STREQ(a, b)                                                     \
    do {                                                                       \
        const char *a_ = (a), *b_ = (b);                                       \
        if (!a_ || !b_ || strcmp(a_, b_) != 0)                                 \
            FAIL_("%s == %s: \"%s\" vs \"%s\"", #a, #b, a_ ? a_ : "(null)",    \
                  b_ ? b_ : "(null)");                                         \
    } while (0)
#define ASSERT_NEAR(a, b, tol)                                                 \
    do {                                                                       \
        double a_ = (double)(a), b_ = (double)(b);                             \
        if (!(fabs(a_ - b_) <= (tol)))                                         \
            FAIL_("|%s - %s| <= %g: %.9g vs %.9g", #a, #b, (double)(tol), a_, b_); \
    } while (0)

static inline const char *test_shared_dir(void) {
    const char *s = getenv("D2_SHARED");
    return s && *s ? s : "../shared";
}

/* Returns a static buffer (rotating among 8) holding D2_SHARED/rel. */
static inline const char *test_shared_path(const char *rel) {
    static char bufs[8][1024];
    static int k;
    char *b = bufs[k++ & 7];
    snprintf(b, 1024, "%s/%s", test_shared_dir(), rel);
    return b;
}

/* Skips the test when the file does not exist. */
#define REQUIRE_FILE(path)                                                     \
    do { if (access((path), R_OK) != 0) SKIP("missing %s", (path)); } while (0)

static int test_run_one_(const test_case *tc, unsigned timeout_s) {
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(timeout_s);
        tc->fn();
        exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    if (WIFEXITED(st)) return WEXITSTATUS(st);
    fprintf(stderr, "  killed by signal %d%s\n", WTERMSIG(st),
            WTERMSIG(st) == SIGALRM ? " (timeout)" : "");
    return 1;
}

int main(int argc, char **argv) {
    const char *filter = getenv("D2_TEST_FILTER");
    const char *mult = getenv("D2_TEST_TIMEOUT_MULT");
    unsigned timeout_s = 60u * (unsigned)(mult ? atoi(mult) > 0 ? atoi(mult) : 1 : 1);
    int passed = 0, failed = 0, skipped = 0;
    const char *prog = argc > 0 ? argv[0] : "test";
    const char *slash = strrchr(prog, '/');
    if (slash) prog = slash + 1;
    for (int i = 0; i < test_count_; i++) {
        const test_case *tc = &test_cases_[i];
        if (filter && !strstr(tc->name, filter)) continue;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int rc = test_run_one_(tc, timeout_s);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
        const char *res = rc == 0 ? "ok" : rc == TEST_EXIT_SKIP ? "skip" : "FAIL";
        printf("%-4s %s.%s (%.0f ms)\n", res, prog, tc->name, ms);
        fflush(stdout);
        if (rc == 0) passed++;
        else if (rc == TEST_EXIT_SKIP) skipped++;
        else failed++;
    }
    printf("%s: %d passed, %d failed, %d skipped\n", prog, passed, failed, skipped);
    return failed ? 1 : 0;
}

#endif
