/*
 * tests/integration/hotpath_shim.c — an LD_PRELOAD shim for test_hotpath.py:
 * counts heap allocations (malloc, calloc, realloc, aligned forms) and
 * printf-style formatting (vsnprintf, the path of every JSON number and log
 * line) made on the thread named "d2od-engine" (engine/sched.c names it), and
 * prints the counts at exit. Only for tests; built by the test with cc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

static atomic_long allocs, formats;

/* D2_HOTPATH_THREAD names another thread to watch (to check the shim itself). */
static int on_engine(void) {
    char name[16] = {0};
    if (prctl(PR_GET_NAME, name, 0, 0, 0) != 0) return 0;
    const char *want = getenv("D2_HOTPATH_THREAD");
    return strcmp(name, want && want[0] ? want : "d2od-engine") == 0;
}

void *malloc(size_t n) {
    if (on_engine()) atomic_fetch_add(&allocs, 1);
    return __libc_malloc(n);
}
void *calloc(size_t a, size_t b) {
    if (on_engine()) atomic_fetch_add(&allocs, 1);
    return __libc_calloc(a, b);
}
void *realloc(void *p, size_t n) {
    if (on_engine()) atomic_fetch_add(&allocs, 1);
    return __libc_realloc(p, n);
}
int posix_memalign(void **out, size_t al, size_t n) {
    if (on_engine()) atomic_fetch_add(&allocs, 1);
    void *p = __libc_memalign(al, n);
    if (!p) return 12;
    *out = p;
    return 0;
}
void *aligned_alloc(size_t al, size_t n) {
    if (on_engine()) atomic_fetch_add(&allocs, 1);
    return __libc_memalign(al, n);
}

typedef int (*vsnprintf_fn)(char *, size_t, const char *, va_list);
int vsnprintf(char *s, size_t n, const char *fmt, va_list ap) {
    static vsnprintf_fn real;
    if (!real) real = (vsnprintf_fn)dlsym(RTLD_NEXT, "vsnprintf");
    if (on_engine()) atomic_fetch_add(&formats, 1);
    return real(s, n, fmt, ap);
}

__attribute__((destructor)) static void report(void) {
    char line[128];
    int k = snprintf(line, sizeof line, "hotpath: engine-thread allocations %ld formats %ld\n", atomic_load(&allocs),
                     atomic_load(&formats));
    if (k > 0) write(2, line, (size_t)k);
}
