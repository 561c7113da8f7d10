/*
 * engine/cpu/threadpool.c — persistent fork-join pool (see threadpool.h).
 *
 * A job is published by bumping `gen` (under the mutex, so sleepers cannot
 * miss it); workers notice either while spinning or when woken. Tasks are
 * claimed with an atomic counter. The caller waits for `done` to reach the
 * number of workers (jobs last microseconds to milliseconds).
 *
 * Oversubscription (more threads than CPUs the process may use, e.g. under a
 * cgroup quota or taskset): a pure spin-wait then burns the time slice the
 * awaited thread needs, which made a step 30-85x slower. Every wait therefore
 * spins briefly, then yields the CPU (sched_yield, cheap when nothing else
 * is runnable), and a worker with no job finally sleeps on the condvar.
 */
#include "engine/cpu/threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "common/status.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TP_PAUSE() _mm_pause()
#else
#define TP_PAUSE() ((void)0)
#endif

/* Pause iterations before a waiter starts yielding, and yields before an idle
 * worker sleeps. */
#define TP_SPIN 2000
#define TP_YIELDS 2000

struct eng_tp;

typedef struct tp_worker {
    struct eng_tp *tp;
    int id;
    pthread_t th;
} tp_worker;

struct eng_tp {
    int n_threads;
    tp_worker *workers; /* [n_threads-1] */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_uint gen;    /* job generation */
    atomic_int next;    /* next task to claim */
    atomic_int done;    /* workers finished with the current job */
    atomic_int quit;
    eng_tp_fn fn;
    void *ctx;
    int n_tasks;
    int started;        /* workers successfully created */
};

static void tp_work(eng_tp *tp, int thread) {
    for (;;) {
        int t = atomic_fetch_add_explicit(&tp->next, 1, memory_order_relaxed);
        if (t >= tp->n_tasks) break;
        tp->fn(tp->ctx, t, thread);
    }
}

static void *tp_main(void *arg) {
    tp_worker *w = arg;
    eng_tp *tp = w->tp;
    unsigned seen = 0;
    for (;;) {
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&tp->gen, memory_order_acquire)) == seen &&
               !atomic_load_explicit(&tp->quit, memory_order_acquire)) {
            if (++spins < TP_SPIN) {
                TP_PAUSE();
                continue;
            }
            if (spins < TP_SPIN + TP_YIELDS) {
                sched_yield();
                continue;
            }
            pthread_mutex_lock(&tp->mu);
            while (atomic_load_explicit(&tp->gen, memory_order_acquire) == seen &&
                   !atomic_load_explicit(&tp->quit, memory_order_acquire))
                pthread_cond_wait(&tp->cv, &tp->mu);
            pthread_mutex_unlock(&tp->mu);
        }
        if (atomic_load_explicit(&tp->quit, memory_order_acquire)) break;
        seen = g;
        tp_work(tp, w->id);
        atomic_fetch_add_explicit(&tp->done, 1, memory_order_acq_rel);
    }
    return NULL;
}

int eng_tp_create(int n_threads, eng_tp **out) {
    if (n_threads < 1) return D2_EINVAL;
    eng_tp *tp = calloc(1, sizeof *tp);
    if (!tp) return D2_ENOMEM;
    tp->n_threads = n_threads;
    pthread_mutex_init(&tp->mu, NULL);
    pthread_cond_init(&tp->cv, NULL);
    atomic_init(&tp->gen, 0u);
    atomic_init(&tp->next, 0);
    atomic_init(&tp->done, 0);
    atomic_init(&tp->quit, 0);
    if (n_threads > 1) {
        tp->workers = calloc((size_t)n_threads - 1, sizeof *tp->workers);
        if (!tp->workers) {
            eng_tp_destroy(tp);
            return D2_ENOMEM;
        }
        for (int i = 0; i < n_threads - 1; i++) {
            tp->workers[i].tp = tp;
            tp->workers[i].id = i + 1;
            if (pthread_create(&tp->workers[i].th, NULL, tp_main, &tp->workers[i]) != 0) {
                eng_tp_destroy(tp);
                return D2_ENOMEM;
            }
            tp->started++;
        }
    }
    *out = tp;
    return D2_OK;
}

void eng_tp_destroy(eng_tp *tp) {
    if (!tp) return;
    pthread_mutex_lock(&tp->mu);
    atomic_store_explicit(&tp->quit, 1, memory_order_release);
    pthread_cond_broadcast(&tp->cv);
    pthread_mutex_unlock(&tp->mu);
    for (int i = 0; i < tp->started; i++) pthread_join(tp->workers[i].th, NULL);
    pthread_mutex_destroy(&tp->mu);
    pthread_cond_destroy(&tp->cv);
    free(tp->workers);
    free(tp);
}

int eng_tp_n_threads(const eng_tp *tp) { return tp->n_threads; }

void eng_tp_run(eng_tp *tp, eng_tp_fn fn, void *ctx, int n_tasks) {
    if (n_tasks <= 0) return;
    if (tp->started == 0 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++) fn(ctx, t, 0);
        return;
    }
    tp->fn = fn;
    tp->ctx = ctx;
    tp->n_tasks = n_tasks;
    atomic_store_explicit(&tp->next, 0, memory_order_relaxed);
    atomic_store_explicit(&tp->done, 0, memory_order_relaxed);
    pthread_mutex_lock(&tp->mu);
    atomic_fetch_add_explicit(&tp->gen, 1u, memory_order_release);
    pthread_cond_broadcast(&tp->cv);
    pthread_mutex_unlock(&tp->mu);
    tp_work(tp, 0);
    for (int spins = 0; atomic_load_explicit(&tp->done, memory_order_acquire) < tp->started; spins++) {
        if (spins < TP_SPIN) TP_PAUSE();
        else sched_yield();
    }
}
