/*
 * engine/backend.h — the seam between the engine runtime and a compute backend:
 * the step's batch plan, the backend interface (vtable), its creation config,
 * and the KV-compression operations. Internal to engine/: the runtime (engine.c,
 * step.c, sched.c, run.c, kvcomp.c) calls it; engine/cpu/ (and engine/cuda/)
 * implement it. Layer: the seam (tools/check_layers.py) — it may include only
 * engine/model/ and below.
 *
 * Division of labour
 *   - The runtime owns policy and bookkeeping: it plans each step, reserves and
 *     appends every (seq, layer) of the plan in the pool (kvp_reserve_all_layers,
 *     kvp_append) and writes the new slots' positions BEFORE calling step, so
 *     a backend never reserves anything; it decides when and how much to
 *     compress (engine/kvcomp.c) and samples.
 *   - The backend owns the weights it computes with (converted or uploaded once
 *     at creation), every activation buffer, and the KV payload: K/V in its own
 *     dtype and placement plus the fp32 score per (slot, KV head). It sizes the
 *     payload for the pool's pages at kv_attach and installs the pool's payload
 *     hook, so copy on write and compaction move its bytes in one call each.
 *
 * One step runs prefill chunks and decode tokens of many sequences together.
 * The plan lists the step's tokens grouped by sequence (each sequence's tokens
 * contiguous and in increasing position); the last n slots of every (seq,
 * layer) table are the step's new slots (appended by the runtime, positions
 * set, payload undefined). For every layer the backend
 *   1. computes Q/K/V for all tokens, applies RoPE, writes K/V into the new
 *      slots and zeroes their scores,
 *   2. attends each query over the table's live slots whose pos <= its own
 *      pos (and > pos - sliding_window for Mistral), reading K/V through the
 *      block table (after a per-head compression a backend masks by each
 *      (slot, KV head)'s own position, see per_head below),
 *   3. when want_scores is set for the sequence, adds each slot's attention
 *      probability (summed over the query heads of its GQA group) into the
 *      slot's score for that KV head — D2O's accumulated attention — and, when
 *      colsum is set, each query head's probability into
 *      colsum[layer][head][key pos] (no N x N matrix is ever held).
 * Logits are produced only for the rows the plan asks for; they stay where the
 * backend computed them until the runtime asks for host rows (logits) or for
 * greedy tokens chosen where the logits are (argmax).
 *
 * Results and host synchronisation. A device backend returns from step with
 * the step queued, and waits for the device at most ONCE per step: at the
 * step's first result call (logits, argmax, sample) or sync — or, when none
 * comes, in the next step, before it reuses its buffers. To that end step
 * queues, behind the forward pass, the argmax of every logit row and the
 * host copies of the host_logits rows and of the column sums; the result
 * calls after the first one wait no more. sample launches its draws and
 * waits for them itself, so the runtime makes the step's sample call (one
 * for all its draws) before argmax and logits, and flags host_logits on
 * every chunk whose rows it will read with logits (logits of an unflagged
 * row works, with a wait of its own). colsum (eng_batch_seq) is complete —
 * this step's sums added — only after the step's first result call or
 * sync: until then the caller neither reads nor frees it. A host backend
 * completes everything within step and ignores host_logits.
 *
 * Sequences that share pages (kvp_seq_fork) must not both accumulate scores in
 * the same step. A sequence may appear at most once per plan.
 *
 * Plan checks: step returns D2_EINVAL without effect when the plan is
 * malformed (sequences not contiguous from row 0 in order and covering all
 * rows, a token outside the vocabulary, a negative position, more rows than
 * max_batch_tokens, more logit rows than max_logit_rows, a table with fewer
 * live slots than the sequence's tokens in the plan).
 *
 * Errors: every operation returns a status; after a failure last_error names
 * the failing call and why (a device backend: the CUDA/cuBLAS call, file and
 * line). A backend whose device state is lost returns D2_ECUDA from then on,
 * and only then: the runtime takes D2_ECUDA from any operation as fatal (every
 * request fails with it, eng_sched_fatal reports it, the daemon exits 1).
 *
 * Threading: a backend belongs to one thread, the engine thread. The creating
 * thread may differ (the daemon loads on the main thread): the engine thread
 * calls attach_thread once before anything else (a CUDA backend makes its
 * device and context current there). No operation blocks on other threads.
 * Ownership: the backend borrows the model and the pool; both outlive it.
 */
#ifndef D2_ENGINE_BACKEND_H
#define D2_ENGINE_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model/model.h"
#include "engine/sample.h"
#include "kvpool/kvpool.h"

/* ---- the plan ----------------------------------------------------------------- */

typedef struct eng_batch_seq {
    int seq;            /* kvpool sequence id */
    int start;          /* first row of this sequence's tokens in the batch */
    int n;              /* number of tokens (prefill chunk length, or 1 for decode) */
    bool want_scores;   /* accumulate attention scores into the payload */
    bool want_logits;   /* produce logits for the last token of the chunk */
    bool all_logits;    /* produce logits for every token of the chunk (perplexity) */
    bool host_logits;   /* the runtime will read this chunk's logit rows on the host
                           after the step (logits: logprobs, penalties, a sampler the
                           device cannot draw, perplexity): a device backend copies
                           them out with the step's results, in its one host
                           synchronisation; rows without it cost a synchronisation
                           of their own when logits asks for them. A host backend
                           ignores it */
    /* Score options (KV compression, engine/kvcomp.c); zero = off / all. */
    int score_from;     /* with want_scores: only queries at positions >= score_from
                           accumulate (SnapKV's observation window); 0 = every query */
    float *colsum;      /* optional, with want_scores: per-query-head column sums
                           [n_layers][n_heads][colsum_len] in host memory, indexed by
                           the key's position (keys at positions >= colsum_len are
                           skipped); D2O's layer statistic. Owned by the caller;
                           complete only after the step's first result call or sync
                           (see "Results and host synchronisation" above). */
    int colsum_len;
} eng_batch_seq;

typedef struct eng_batch {
    int n_tokens;               /* rows */
    const int32_t *tokens;      /* [n_tokens] */
    const int32_t *pos;         /* [n_tokens] positions */
    int n_seqs;
    const eng_batch_seq *seqs;  /* [n_seqs] */
} eng_batch;

/* Rows of logits a plan produces, in plan order: per sequence n when
 * all_logits, else 1 when want_logits, else 0. */
int eng_batch_out_rows(const eng_batch *b);

/* ---- KV compression operations ------------------------------------------------------ */

/* One compression of a (seq, layer) table down to heavy + recent slots. The
 * runtime (kvcomp.c) decides the numbers; the backend runs the mechanism where
 * the payload lives, in this order so a failure leaves the table untouched:
 *   1. score reduction: a token's score is the sum over KV heads of its
 *      accumulated attention; `pooled` smooths it with a 5-wide average
 *      (SnapKV/PyramidKV, eng_kv_pool_scores);
 *   2. selection (eng_kv_select over those scores): the last `recent`, the
 *      first min(n_sink, heavy) of the rest, the best of the remainder;
 *   3. with `merge`, matching (read-only): every evicted token's most similar
 *      kept token by the mean over KV heads of the per-head cosine of the
 *      post-RoPE keys; threshold(user, mean similarity) returns the merge
 *      threshold tau (D2O's EMA, policy kept by the caller);
 *   4. every page steps 5-6 write is made private (kvp_unshare) — the only
 *      step that can fail (D2_EKVFULL), before anything is modified;
 *   5. merging in fp32 of the evicted tokens whose similarity reaches tau into
 *      their targets (merge_code_rule: (k_c + sum s_e k_e) / (1 + n), as the
 *      official code; else the normalised rule with self weight e);
 *   6. compaction (kvp_compact): kept slots move to the front, emptied pages
 *      return to the pool at once (the payload moves in one hook call).
 * A merge never adds the evicted token's score to its target (as the code).
 *
 * per_head (granularity head; only when caps.kv_per_head): steps 1-6 run for
 * every KV head g on its own — its score is the slot's score of head g alone,
 * it keeps its own set (the same count in every head), matches each of its
 * evicted tokens to its own kept token by head g's cosine, and merges and
 * compacts head g's K/V into the table's first `kept` slots. The threshold
 * gets the mean over (heads x evicted tokens); evicted token column j (the
 * j-th evicted token of every head, in slot order) passes when the mean over
 * heads of its similarities reaches tau, and then merges in every head (the
 * official code's test). Slot j then holds different tokens in different
 * heads: the payload keeps each (slot, head)'s position (the attention masks
 * by it, so sliding windows stay exact), and the pool's position of a slot
 * becomes the largest of its heads' positions. Slot order stays position
 * order within every head, so sinks (the first slots) and the recent window
 * (the last ones) keep their meaning. n_evicted / n_merged count columns. */
typedef struct eng_kv_compress_req {
    int seq, layer;
    int heavy, recent, n_sink;
    bool pooled;
    bool merge;
    bool merge_code_rule;
    bool per_head;
    float (*threshold)(void *user, float mean_sim); /* required with merge */
    void *user;
    /* The same threshold policy as data, for a backend that computes tau
     * where the similarities are (kv_compress_layers) instead of calling
     * threshold: with tau_ema, tau = tau_first ? mean_sim
     * : (1 - ema_beta) * tau_prev + ema_beta * mean_sim (D2O's EMA, the
     * formula threshold implements). A backend that uses it does not call
     * threshold; the caller keeps res.tau either way. */
    bool tau_ema, tau_first;
    float ema_beta, tau_prev;
} eng_kv_compress_req;

typedef struct eng_kv_compress_res {
    int n_evicted, n_merged, pages_freed;
    float tau;              /* with merge: the threshold used */
} eng_kv_compress_res;

/* ---- the backend ------------------------------------------------------------------- */

typedef enum eng_kv_dtype { ENG_KV_DT_F32 = 0, ENG_KV_DT_BF16, ENG_KV_DT_F16 } eng_kv_dtype;

typedef struct eng_backend_caps {
    const char *name;          /* "cpu", "cuda" */
    eng_kv_dtype kv_dtype;     /* dtype of stored K/V */
    bool kv_on_device;         /* false: the payload is host memory */
    size_t kv_bytes_per_slot;  /* payload bytes of one slot (K + V + scores, all KV heads) */
    int64_t kv_bytes_avail;    /* bytes left for the payload after weights and activations;
                                  0 = no limit of the backend's own (host memory) */
    bool argmax_on_device;     /* argmax runs where the logits are (no vocabulary copy) */
    bool kv_per_head;          /* kv_compress implements per_head (granularity head) */
    bool sample_on_device;     /* the sample op exists: device draws (engine/sample.h) */
} eng_backend_caps;

typedef struct eng_backend eng_backend;

typedef struct eng_backend_ops {
    /* Once, on the thread that will call everything else, before it does. */
    int (*attach_thread)(eng_backend *be);
    void (*caps)(const eng_backend *be, eng_backend_caps *out);
    /* Reserves the payload for the pool's n_pages and installs the pool's
     * payload hook. Once, before the first step. */
    int (*kv_attach)(eng_backend *be, kvp_pool *pool);
    /* Runs one step (see the top of this file). On an error the payload of the
     * plan's new slots is unspecified (the runtime drops those sequences). */
    int (*step)(eng_backend *be, const eng_batch *b);
    /* Host copies of logit rows [row0, row0 + n) of the last step
     * ([n][vocab] f32, borrowed until the next step). Rows of host_logits
     * chunks cost no wait beyond the step's one; others a wait each call. */
    int (*logits)(eng_backend *be, int row0, int n, const float **out);
    /* Greedy tokens (lowest id on ties) of the listed logit rows of the last
     * step, chosen where the logits are: out[i] for rows[i]. */
    int (*argmax)(eng_backend *be, const int *rows, int n, int32_t *out);
    /* Optional (NULL unless caps.sample_on_device): sampled tokens of the
     * listed logit rows of the last step, drawn where the logits are with
     * draws[i] (engine/sample.h, "Device draws": the token is the host
     * sampler's for the same uniform number): out[i] for rows[i], -1 for a
     * row the host sampler would refuse (NaN or +inf, or no finite logit). */
    int (*sample)(eng_backend *be, const int *rows, const eng_sample_draw *draws, int n,
                  int32_t *out);
    int (*kv_compress)(eng_backend *be, const eng_kv_compress_req *req, eng_kv_compress_res *res);
    /* Optional (NULL: the runtime calls kv_compress for each): the n
     * compressions req[0..n) (distinct tables, e.g. the layers of one
     * sequence) with the results kv_compress would give in order, for a
     * device backend to run with a bounded number of host synchronisations
     * instead of several per table. A request with merge carries tau_ema.
     * Shared pages of a merging table may all be made private first (copy on
     * write of pages the merge may not write). On an error, res[i] holds what
     * the completed compressions did (zeros for the others) and the failing
     * table is untouched, as kv_compress's contract. */
    int (*kv_compress_layers)(eng_backend *be, const eng_kv_compress_req *req, int n,
                              eng_kv_compress_res *res);
    /* Inspection and tests (slow, copies): the per-KV-head scores [n_kv] and
     * the K and V [n_kv * head_dim] of live slot i of (seq, layer), as f32;
     * any pointer may be NULL. write_slot is the inverse (tests build caches);
     * it also gives every KV head the slot's pool position (write pos first). */
    int (*read_slot)(eng_backend *be, int seq, int layer, int i, float *k, float *v, float *score);
    int (*write_slot)(eng_backend *be, int seq, int layer, int i, const float *k, const float *v,
                      const float *score);
    /* Inspection (optional, NULL when the backend keeps no per-head positions):
     * the token position each KV head holds in live slot i, pos[n_kv]. */
    int (*read_head_pos)(eng_backend *be, int seq, int layer, int i, int32_t *pos);
    /* Waits for queued work and completes the last step's results (its
     * column sums); a no-op for a synchronous backend. */
    int (*sync)(eng_backend *be);
    /* The failing call and reason of the last error; "" when none. Borrowed. */
    const char *(*last_error)(const eng_backend *be);
    void (*destroy)(eng_backend *be);
} eng_backend_ops;

struct eng_backend {
    const eng_backend_ops *ops;
    const eng_model *model; /* borrowed */
    kvp_pool *pool;         /* borrowed; set by kv_attach */
};

/* What every backend is created with. */
typedef struct eng_backend_config {
    int n_threads;        /* CPU worker threads (cpu backend); 0 = the CPUs this process may use */
    int max_batch_tokens; /* largest n_tokens a step may have (buffers sized at create) */
    int max_logit_rows;   /* largest number of logits rows per step */
    int max_seq_tokens;   /* longest table (attention scratch) */
    int page_tokens;      /* the pool's page size */
    /* Weight preparation progress (conversion, upload): called with bytes done
     * and total, at most about 100 times; may be NULL. */
    void (*progress)(void *user, size_t done, size_t total);
    void *progress_user;
    /* Device backends (additive): the CUDA device ordinal, and the share of its
     * memory this process may fill (weights, activations, KV payload); 0 = 0.9. */
    int device_id;
    double gpu_memory_utilization;
    /* CUDA: decode-only steps replay a CUDA graph captured per padded batch
     * size (engine/cuda/backend.c, "CUDA graphs"); 0 = every step launches
     * its kernels. */
    int cuda_graphs;
} eng_backend_config;

/* The CPU backend (engine/cpu/backend.c): weights of any eng_dtype used in
 * place, f32 K/V payload in host memory, step() never allocates or logs. */
int eng_cpu_backend_create(const eng_model *m, const eng_backend_config *cfg, eng_backend **out);

/* The CUDA backend (engine/cuda/backend.c): bf16 weights and KV payload in
 * device memory, kernels/kernels.h and cuBLASLt. D2_EUNSUPPORTED (logged) in
 * a build without CUDA; D2_ECUDA when no device can be used. */
int eng_cuda_backend_create(const eng_model *m, const eng_backend_config *cfg, eng_backend **out);
/* CUDA devices this process can use: D2_EUNSUPPORTED in a build without the
 * CUDA backend, 0 without a driver or a device. */
int eng_cuda_device_count(void);
/* The stream (a cudaStream_t) all of a CUDA backend's work goes to, for
 * benchmarks that time it with CUDA events (tests/gpu/bench_cuda.c); NULL in
 * a build without CUDA. Borrowed; the backend owns it. */
void *eng_cuda_backend_stream(eng_backend *be);
/* CUDA graphs of a CUDA backend (tests/gpu/bench_cuda.c measures steps with
 * and without): eng_cuda_backend_set_graphs turns the replay of decode-only
 * steps on or off from the next step (graphs already captured are kept) and
 * returns the previous setting, or D2_EUNSUPPORTED in a build without CUDA;
 * the stats say how often graphs were captured and replayed and how long
 * the captures took (host wall clock: capture and instantiation). */
typedef struct eng_cuda_graph_stats {
    int64_t captures, replays, warmup_steps; /* warm-up: a bucket's first step, run directly */
    double capture_s;
} eng_cuda_graph_stats;
int eng_cuda_backend_set_graphs(eng_backend *be, int on);
eng_cuda_graph_stats eng_cuda_backend_graph_stats(eng_backend *be);

#endif
