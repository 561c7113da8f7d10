/*
 * engine/cpu/threadpool.h — a persistent fork-join thread pool for the CPU
 * backend (internal to engine/).
 *
 * eng_tp_run(fn, ctx, n_tasks) runs fn(ctx, task, thread) for every task in
 * 0..n_tasks-1, tasks claimed dynamically by the calling thread (thread 0)
 * and the pool's workers (1..n_threads-1), and returns when all are done.
 * Workers spin briefly between jobs (steps issue many short jobs back to
 * back) and then sleep on a condition variable, so an idle pool costs no CPU.
 * eng_tp_run must be called from one thread at a time; it never allocates.
 */
#ifndef D2_ENGINE_THREADPOOL_H
#define D2_ENGINE_THREADPOOL_H

typedef struct eng_tp eng_tp;
typedef void (*eng_tp_fn)(void *ctx, int task, int thread);

/* n_threads >= 1 counts the caller. Returns D2_OK, D2_EINVAL, D2_ENOMEM. */
int eng_tp_create(int n_threads, eng_tp **out);
void eng_tp_destroy(eng_tp *tp); /* accepts NULL; joins the workers */
int eng_tp_n_threads(const eng_tp *tp);
void eng_tp_run(eng_tp *tp, eng_tp_fn fn, void *ctx, int n_tasks);

#endif
