/*
 * engine/engine.h — the public header of engine/: what daemon/ and api/ may use.
 *
 * An engine owns a loaded model (weights memory-mapped), its tokenizer, the
 * paged KV pool (reserved at creation) and a compute backend. Generation is
 * driven by eng_run(): a continuous-batching loop over a set of sequences —
 * every step mixes the decode tokens of running sequences with chunked
 * prefill of new ones, up to a token budget; a sequence leaves the batch the
 * moment it finishes and its pages return to the pool.
 *
 * Re-exported: the tokenizer API (engine/tokenizer.h), the sampler
 * (engine/sample.h) and the model description (engine/model.h).
 *
 * Threading: an engine is driven by one thread at a time (the engine thread).
 * The tokenizer is immutable and may be used from any thread.
 * Ownership: eng_engine_create's *out belongs to the caller
 * (eng_engine_destroy); every pointer returned by a getter is borrowed and
 * lives as long as the engine.
 */
#ifndef D2_ENGINE_ENGINE_H
#define D2_ENGINE_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/status.h"
#include "engine/model.h"
#include "engine/sample.h"
#include "engine/tokenizer.h"

typedef struct eng_engine eng_engine;

typedef struct eng_engine_config {
    const char *model_path;   /* GGUF file or HF directory */
    int n_threads;            /* 0: all online CPUs */
    int page_tokens;          /* KV page size in tokens; 0: 16 */
    int64_t kv_pages;         /* pool size in pages; 0: derived from kv_mem_mb */
    int64_t kv_mem_mb;        /* 0: enough for max_seqs full contexts, capped at 4096 MB */
    int max_seqs;             /* concurrent sequences; 0: 64 */
    int max_batch_tokens;     /* tokens per step (prefill chunking); 0: 512 */
    int ctx_len;              /* 0: the model's context */
} eng_engine_config;

/* Loads the model and reserves every buffer. Errors are logged naming the
 * file and reason. Returns D2_OK or a load/alloc status. */
int eng_engine_create(const eng_engine_config *cfg, eng_engine **out);
void eng_engine_destroy(eng_engine *e); /* accepts NULL */

const eng_model *eng_engine_model(const eng_engine *e);
const eng_tokenizer *eng_engine_tokenizer(const eng_engine *e); /* NULL if none */
int eng_engine_ctx_len(const eng_engine *e);
int eng_engine_max_batch_tokens(const eng_engine *e);

typedef struct eng_pool_stats {
    int64_t pages_total, pages_free;
    int page_tokens;
} eng_pool_stats;
eng_pool_stats eng_engine_pool_stats(const eng_engine *e);

/* ---- generation ---------------------------------------------------------- */

typedef enum eng_finish {
    ENG_FINISH_NONE = 0,  /* still running */
    ENG_FINISH_LENGTH,    /* max_tokens or context reached */
    ENG_FINISH_STOP,      /* an EOS/stop token */
    ENG_FINISH_ERROR,
} eng_finish;

/* One sequence to generate. The caller owns every pointer in it; the engine
 * writes only the output fields. */
typedef struct eng_gen_seq {
    const int32_t *prompt;  /* [n_prompt] ids, BOS included if wanted */
    int n_prompt;
    int max_tokens;         /* generated tokens at most */
    eng_sample_params sample;
    bool ignore_eos;        /* do not stop at the model's EOS ids */
    /* Called for each generated token (may be NULL). Return non-zero to stop
     * the sequence (finish = STOP). Runs on the engine thread. */
    int (*on_token)(void *user, int32_t token, const eng_sample_result *r);
    void *user;
    /* outputs */
    int32_t *out_tokens;    /* [max_tokens] caller-allocated, may be NULL */
    int n_out;
    eng_finish finish;
    int status;             /* D2_OK or the error that ended it */
    double t_first_token;   /* seconds from eng_run start to first token */
    double t_done;
} eng_gen_seq;

/* Runs all sequences to completion with continuous batching: at most
 * max_seqs at a time; prefills are chunked to the step token budget.
 * Returns D2_OK when every sequence ran (each has its own status), or an
 * error that stopped the whole run. */
int eng_run(eng_engine *e, eng_gen_seq *seqs, int n);

/* Teacher-forced scoring: for ids[0..n), writes nll[i-1] = -log p(ids[i] |
 * ids[<i]) for i = 1..n-1 (nll has n-1 entries; may be NULL) and the sum.
 * Windows of the context length: each window starts with a fresh cache and
 * the last logits of a window score the first token of the next. */
int eng_score(eng_engine *e, const int32_t *ids, int n, double *nll, double *nll_sum);

/* One raw step over a caller-built plan (tests, benchmarks). */
struct eng_batch;
int eng_engine_step(eng_engine *e, const struct eng_batch *b);

#endif
