/*
 * daemon/eval_niah.h — the retrieval grids of `d2od eval --niah`: passkey and
 * needle-in-a-haystack over context length x needle depth, per KV-compression
 * configuration, and their heat maps (cairo PNG). Called only from
 * daemon/eval.c.
 */
#ifndef D2_DAEMON_EVAL_NIAH_H
#define D2_DAEMON_EVAL_NIAH_H

#include <jansson.h>
#include <stdint.h>

#include "engine/engine.h"

#define NIAH_MAX_LENGTHS 8
#define NIAH_MAX_DEPTHS 11
#define NIAH_MAX_CONFIGS 16

enum { NIAH_TASK_PASSKEY = 0, NIAH_TASK_NEEDLES = 1, NIAH_N_TASKS = 2 };

typedef struct niah_opts {
    int lengths[NIAH_MAX_LENGTHS];  /* prompt lengths in tokens */
    int n_lengths;
    double depths[NIAH_MAX_DEPTHS]; /* where the asked needle sits, 0 = start, 1 = end */
    int n_depths;
    int trials;                     /* per cell */
    int needles;                    /* needles per needle-task prompt (one asked, the rest distractors) */
    uint64_t seed;
} niah_opts;

/* Accuracy grids of one configuration: pass[task][length][depth] of n. */
typedef struct niah_grid {
    char label[32];
    int pass[NIAH_N_TASKS][NIAH_MAX_LENGTHS][NIAH_MAX_DEPTHS];
    int n[NIAH_N_TASKS][NIAH_MAX_LENGTHS][NIAH_MAX_DEPTHS];
} niah_grid;

/* Runs both tasks with kv through the scheduler s (greedy, 8 tokens each). */
int niah_run(eng_engine *e, eng_sched *s, const niah_opts *o, const eng_kv_config *kv, niah_grid *g);

/* {"passkey": [[acc by depth] by length], "needles": ...} with the axes. */
json_t *niah_json(const niah_opts *o, const niah_grid *g);

/* One PNG: a heat map per configuration (rows: depth, columns: length) for
 * each task. title names the model and budget. */
int niah_plot(const char *path, const niah_opts *o, const niah_grid *grids, int n, const char *title);

#endif
