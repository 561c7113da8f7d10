/*
 * engine/backend.h — the compute-backend interface and the step's batch plan
 * (internal to engine/).
 *
 * One step runs prefill chunks and decode tokens of many sequences together.
 * The plan lists the step's tokens grouped by sequence (each sequence's tokens
 * contiguous and in increasing position). For every layer the backend
 *   1. computes Q/K/V for all tokens, applies RoPE,
 *   2. reserves + appends the new K/V into the sequence's (seq, layer) table
 *      (kvp_reserve/kvp_append; positions recorded),
 *   3. attends each query over the table's live slots whose pos <= its own
 *      pos (so a prefill chunk is causal and earlier cache is always seen),
 *      reading K/V through the block table,
 *   4. when score accumulation is on for the sequence, adds each slot's
 *      attention probability (summed over the query heads of its GQA group)
 *      into kvp score[slot][kv_head] — D2O's accumulated attention — and,
 *      when colsum is set, each query head's probability into
 *      colsum[layer][head][key pos] (no N x N matrix is ever held).
 * Logits are produced only for the rows listed in logit_rows.
 *
 * Pool room: a backend first sums kvp_pages_needed over every (seq, layer)
 * of the plan and returns D2_EKVFULL (or D2_ETOOLONG / D2_EINVAL from the
 * pool) with no effect on the pool when the step does not fit; then it
 * reserves every (seq, layer) before computing anything. A sequence may
 * appear at most once per plan. Sequences that share pages (kvp_seq_fork)
 * must not both accumulate scores in the same step (the CPU backend adds into
 * a slot's score from one thread per sequence).
 *
 * Plan checks: step returns D2_EINVAL without effect when the plan is
 * malformed (sequences not contiguous from row 0 in order and covering all
 * rows, a token outside the vocabulary, a negative position, more rows than
 * max_batch_tokens, more logit rows than max_logit_rows, logits NULL while
 * rows are wanted). Positions are the RoPE positions; a query attends to
 * every live slot of its table whose recorded pos <= its own, so after
 * compaction (kvp_compact) only the kept slots and their positions count.
 *
 * CPU backend specifics (engine/cpu/backend.c): weights of any eng_dtype;
 * step() never allocates or logs; n_threads includes the calling thread.
 *
 * A CUDA backend (kernels/) implements the same interface over the same
 * plan and pool.
 */
#ifndef D2_ENGINE_BACKEND_H
#define D2_ENGINE_BACKEND_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/model/model.h"
#include "kvpool/kvpool.h"

typedef struct eng_batch_seq {
    int seq;            /* kvpool sequence id */
    int start;          /* first row of this sequence's tokens in the batch */
    int n;              /* number of tokens (prefill chunk length, or 1 for decode) */
    bool want_scores;   /* accumulate attention scores into the pool */
    bool want_logits;   /* produce logits for the last token of the chunk */
    bool all_logits;    /* produce logits for every token of the chunk (perplexity) */
    /* Score options (KV compression, engine/kvcomp.c); zero = off / all. */
    int score_from;     /* with want_scores: only queries at positions >= score_from
                           accumulate (SnapKV's observation window); 0 = every query */
    float *colsum;      /* optional, with want_scores: per-query-head column sums
                           [n_layers][n_heads][colsum_len], indexed by the key's
                           position (keys at positions >= colsum_len are skipped);
                           D2O's layer statistic. Owned by the caller. */
    int colsum_len;
} eng_batch_seq;

typedef struct eng_batch {
    int n_tokens;               /* rows */
    const int32_t *tokens;      /* [n_tokens] */
    const int32_t *pos;         /* [n_tokens] positions */
    int n_seqs;
    const eng_batch_seq *seqs;  /* [n_seqs] */
    /* Output: logits rows in order — for each seq with want_logits, one row
     * (or n rows if all_logits). logits has room for that many rows. */
    float *logits;              /* [n_out_rows][vocab], caller-owned */
} eng_batch;

/* Rows of logits a plan produces: per sequence n when all_logits, else 1
 * when want_logits, else 0. Defined in engine/cpu/backend.c. */
int eng_batch_out_rows(const eng_batch *b);

typedef struct eng_backend eng_backend;

typedef struct eng_backend_ops {
    const char *name;
    /* Runs one step. Returns D2_OK or an error (then the pool state of the
     * sequences in the batch is unspecified and they must be dropped). */
    int (*step)(eng_backend *be, const eng_batch *b);
    void (*destroy)(eng_backend *be);
} eng_backend_ops;

struct eng_backend {
    const eng_backend_ops *ops;
    const eng_model *model; /* borrowed */
    kvp_pool *pool;         /* borrowed */
};

typedef struct eng_cpu_config {
    int n_threads;       /* 0 = number of online CPUs */
    int max_batch_tokens;/* largest n_tokens a step may have (buffers sized at create) */
    int max_logit_rows;  /* largest number of logits rows per step */
} eng_cpu_config;

/* Creates the CPU backend. All scratch memory is allocated here; step()
 * never allocates. *out owned by caller; free with be->ops->destroy(be). */
int eng_cpu_backend_create(const eng_model *m, kvp_pool *pool, const eng_cpu_config *cfg,
                           eng_backend **out);

#endif
