/*
 * engine/engine.h — the public header of engine/: what daemon/ and api/ may use.
 *
 * An engine owns a loaded model (weights memory-mapped), its tokenizer, the
 * paged KV pool (reserved at creation) and a compute backend. Generation is
 * driven by the scheduler (eng_sched_*, below; eng_run() runs it to
 * completion over a set of sequences): a continuous-batching loop —
 * every step mixes the decode tokens of running sequences with chunked
 * prefill of new ones, up to a token budget; a sequence leaves the batch the
 * moment it finishes and its pages return to the pool.
 *
 * Re-exported: the tokenizer API (engine/tok/tokenizer.h), the sampler
 * (engine/sample.h) and the model description (engine/model/model.h).
 *
 * Threading: an engine may be created on one thread (the daemon's main
 * thread) and is then driven by one thread at a time, the engine thread: the
 * scheduler's thread (eng_sched_start) or the caller of eng_run / eng_score.
 * The backend attaches itself to the thread that steps it (a CUDA context
 * belongs to a thread). eng_sched_submit/cancel/stats are thread-safe; the
 * getters read fields fixed at creation and may be called from any thread.
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
#include "engine/model/model.h"
#include "engine/sample.h"
#include "engine/tok/tokenizer.h"

typedef struct eng_engine eng_engine;

/* Where the engine computes. CPU is 0 so a zeroed config keeps meaning the
 * CPU backend. AUTO picks the GPU when the build has the CUDA backend (make
 * CUDA=1) and a device is present, else the CPU. CUDA asks for the CUDA
 * backend: eng_engine_create fails before loading anything with
 * D2_EUNSUPPORTED in a build without it, D2_ECUDA when no device is usable. */
typedef enum eng_device { ENG_DEVICE_CPU = 0, ENG_DEVICE_CUDA, ENG_DEVICE_AUTO } eng_device;

typedef struct eng_engine_config {
    const char *model_path;   /* GGUF file or HF directory */
    eng_device device;        /* ENG_DEVICE_CPU (0), _CUDA or _AUTO */
    int n_threads;            /* 0: all online CPUs */
    int page_tokens;          /* KV page size in tokens; 0: 16 */
    int64_t kv_pages;         /* pool size in pages; 0: derived from kv_mem_mb */
    int64_t kv_mem_mb;        /* 0: enough for max_seqs full contexts, capped at 4096 MB
                                 (host payload) or at the device's room (CUDA) */
    int max_seqs;             /* concurrent sequences; 0: 64 */
    int max_batch_tokens;     /* tokens per step (prefill chunking); 0: 512 */
    int ctx_len;              /* 0: the model's context */
    double gpu_memory_utilization; /* CUDA: share of the device memory to fill; 0: 0.9 */
    int cuda_graphs;          /* CUDA: decode-only steps replay CUDA graphs (eng_backend_config) */
    /* Weight preparation progress (conversion to the backend's dtype, upload):
     * bytes done and total, at most about 100 calls; may be NULL. */
    void (*progress)(void *user, size_t done, size_t total);
    void *progress_user;
} eng_engine_config;

/* Loads the model and reserves every buffer. Errors are logged naming the
 * file and reason. Returns D2_OK or a load/alloc status. */
int eng_engine_create(const eng_engine_config *cfg, eng_engine **out);
void eng_engine_destroy(eng_engine *e); /* accepts NULL */

/* Touches every page of the memory-mapped weights so the first requests do
 * not wait on page faults. progress (may be NULL) is called with the bytes
 * done and the total, at most about 100 times. */
void eng_engine_prefault(eng_engine *e, void (*progress)(void *user, size_t done, size_t total), void *user);

/* Copies the weights (every memory-mapped model file) into anonymous memory
 * at the same addresses, so that replacing or truncating the model file while
 * the engine runs cannot crash it (a file mapping raises SIGBUS on access past
 * a truncation). For long-running servers; tools keep the file mapping, which
 * costs no extra memory. Memory use is then that of the weights, not shared
 * with the page cache. progress as for eng_engine_prefault. D2_OK or D2_ENOMEM. */
int eng_engine_detach_weights(eng_engine *e, void (*progress)(void *user, size_t done, size_t total), void *user);

const eng_model *eng_engine_model(const eng_engine *e);
const eng_tokenizer *eng_engine_tokenizer(const eng_engine *e); /* NULL if none */
int eng_engine_ctx_len(const eng_engine *e);
int eng_engine_max_batch_tokens(const eng_engine *e);

typedef struct eng_pool_stats {
    int64_t pages_total, pages_free;
    int page_tokens;
} eng_pool_stats;
eng_pool_stats eng_engine_pool_stats(const eng_engine *e);
/* "cpu" or "cuda": the backend this engine computes with. */
const char *eng_engine_backend_name(const eng_engine *e);
/* Whether the backend implements KV compression at granularity head. */
bool eng_engine_kv_per_head(const eng_engine *e);

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

/* ---- KV compression (D2O and baselines) -------------------------------------
 *
 * Per request (and as a server default), the KV cache of each sequence can be
 * compressed inside the paged pool. Methods:
 *   full          keep everything (default)
 *   d2o           per-layer budgets from the prompt's attention variance
 *                 (L*rho*softmax(-v), clamped), sinks + heavy hitters by
 *                 accumulated attention + recent window; evicted tokens merged
 *                 into their most cosine-similar retained key when the
 *                 similarity reaches the per-(sequence, layer) EMA threshold
 *   h2o           sinks + heavy hitters + recent window, uniform budget, no merge
 *   streamingllm  sinks + recent window, page-granular, no scores
 *   snapkv        prefill-only: observation-window scores, pooled, top-k + window
 *   pyramidkv     snapkv with budgets falling linearly with depth
 * Compression runs at the end of prefill (pages are freed before decoding),
 * and during decoding in page-sized batches (a whole page returns to the pool
 * each time) unless `exact` asks for per-step eviction.
 */
typedef enum eng_kv_method {
    ENG_KV_FULL = 0,
    ENG_KV_D2O,
    ENG_KV_H2O,
    ENG_KV_STREAMINGLLM,
    ENG_KV_SNAPKV,
    ENG_KV_PYRAMIDKV,
} eng_kv_method;

typedef enum eng_kv_merge_rule {
    ENG_KV_MERGE_NORMALISED = 0, /* softmax-like weights summing to 1, self weight e (paper) */
    ENG_KV_MERGE_CODE = 1,       /* (k_c + sum m*k_e) / (1 + n), as the official code */
} eng_kv_merge_rule;

/* Which unit selects its own kept set (docs/D2O.md, "Granularity"). */
typedef enum eng_kv_granularity {
    ENG_KV_GRAN_LAYER = 0, /* one kept set and merge target per (sequence, layer) for all KV
                              heads: scores summed over KV heads, mean per-head cosine */
    ENG_KV_GRAN_HEAD = 1,  /* every KV head of a layer selects, matches and merges on its
                              own (same count per head); the official code's behaviour as
                              far as the paged pool allows (per KV head, not per query head) */
} eng_kv_granularity;

typedef struct eng_kv_config {
    eng_kv_method method;
    float budget_frac;     /* (0, 1]: budget as a fraction of the prompt; used when budget_tokens == 0 */
    int budget_tokens;     /* > 0: budget as a token count per layer */
    float heavy_share;     /* share of the budget for heavy hitters; 0.5 = 1:1, 0.75 = 3:1 */
    int n_sink;            /* pinned first tokens (inside the heavy budget); 4 */
    int window;            /* SnapKV/PyramidKV observation window; 32 (kept recent part: at most half the budget) */
    float ema_beta;        /* D2O threshold EMA weight of the new statistic; 0.5 */
    eng_kv_merge_rule merge_rule;
    bool exact;            /* evict every step instead of a page at a time */
    eng_kv_granularity granularity; /* layer (default) or head; head needs a backend with
                                       caps.kv_per_head (the CPU one) */
    /* Layers never compressed, a bitset over every layer a model can have
     * (word l / 64, bit l % 64; eng_kv_keep_layer_add / eng_kv_layer_kept).
     * Only read when keep_layers_set; otherwise the method's default
     * (D2O: 0, 1 and L-1; the others: none). */
    uint64_t keep_layers[ENG_MODEL_MAX_LAYERS / 64];
    bool keep_layers_set;
} eng_kv_config;

/* Named presets over c (method first, then the preset, then any explicit
 * field): "official" = D2O as the official code runs it, as closely as the
 * paged pool allows — merge_rule code, one eviction per decode step (exact,
 * so the EMA threshold is updated every step), granularity head (every KV
 * head selects and merges on its own), 1:1 split, 4 sinks, beta 0.5,
 * layers 0, 1, L-1 kept. The differences that remain are listed in
 * docs/D2O.md. D2_EINVAL (with *why) for an unknown name or a method the
 * preset does not apply to; "default" changes nothing. */
int eng_kv_preset_apply(eng_kv_config *c, const char *name, const char **why);

/* Adds layer l (0 <= l < ENG_MODEL_MAX_LAYERS) to c's kept layers and marks
 * the set as explicit; eng_kv_keep_layers_clear makes it explicit and empty. */
void eng_kv_keep_layer_add(eng_kv_config *c, int l);
void eng_kv_keep_layers_clear(eng_kv_config *c);
/* Whether layer l of an n_layers model is never compressed under c (the
 * method's default when c has no explicit set). */
bool eng_kv_layer_kept(const eng_kv_config *c, int n_layers, int l);

/* Defaults for a method (budget 0.2, 1:1, 4 sinks, window 32, beta 0.5, normalised merge). */
void eng_kv_config_default(eng_kv_config *c, eng_kv_method m);
/* A KV budget, the one meaning everywhere (config file, flags, JSON; in
 * engine/kv_budget.c): a number in (0, 1] is a share of the prompt — each
 * layer keeps that share of the prompt's length ("0.2", ".5"; "1" and "1.0":
 * as many tokens as the prompt) — and sets *frac (*tokens = 0); an integer
 * >= 2 written without a decimal point is a token count per layer ("128")
 * and sets *tokens (*frac = 0). Anything else ("1.5", "128.0",
 * "0", "-1", "1e-1", " 2") is D2_EINVAL with *why a one-line reason (why may
 * be NULL). On error *frac and *tokens are left alone. */
#define ENG_KV_BUDGET_MAX_TOKENS (1 << 30)
int eng_kv_budget_parse(const char *s, float *frac, int *tokens, const char **why);
/* The same for a number already read (a JSON value): integer tells whether it
 * was written without a decimal point (a JSON integer). */
int eng_kv_budget_number(double x, bool integer, float *frac, int *tokens, const char **why);
/* "full", "d2o", ...; -1 when unknown. */
int eng_kv_method_parse(const char *name);
/* "layer" / "head"; -1 when unknown. */
int eng_kv_granularity_parse(const char *name);
const char *eng_kv_granularity_name(eng_kv_granularity g);
const char *eng_kv_method_name(eng_kv_method m);
/* D2_OK or D2_EINVAL with *why naming the field. */
int eng_kv_config_validate(const eng_kv_config *c, const char **why);

/* Pages (all layers) a request holds under its compression: right after
 * prefill, and at its longest (prompt + max_tokens). Used for admission. */
typedef struct eng_kv_estimate { int64_t pages_after_prefill, pages_peak, pages_longest; } eng_kv_estimate;
eng_kv_estimate eng_kv_estimate_pages(const eng_engine *e, const eng_kv_config *c, int n_prompt, int max_tokens);

/* ---- scheduler: continuous batching for concurrent requests ------------------
 *
 * The scheduler owns the engine's step loop. Requests are submitted from any
 * thread; the loop admits them by KV pages, runs steps that mix decode tokens
 * with chunked prefill up to max_batch_tokens, and reports tokens through
 * the request's callback on the engine thread. When the pool runs out of pages
 * mid-decode, the newest running sequence is preempted (its pages freed) and
 * later recomputed from its prompt plus the tokens it already produced; the
 * client sees no difference. A compressed sequence is recomputed by replay:
 * its prompt is prefilled and compressed at the same point as the first time,
 * then its generated tokens are fed one per step with decode-time eviction,
 * so its cache and its next tokens are those of an unpreempted run (cost: one
 * step per token it had generated). A cancelled request (client gone, timeout) is
 * retired and its pages freed at the next step.
 *
 * Threaded mode: eng_sched_start() runs the loop on its own thread.
 * Manual mode (eng_run, tests): the caller calls eng_sched_step() itself.
 */
typedef struct eng_sched eng_sched;

typedef enum eng_event_type { ENG_EV_TOKEN = 1, ENG_EV_DONE = 2 } eng_event_type;

/* What KV compression did to one request, per layer (eng_event.kv with the
 * DONE event; borrowed for the callback). */
typedef struct eng_kv_layer_report {
    float stat;          /* D2O layer statistic v_l (0 for the other methods) */
    int heavy, recent;   /* budget = heavy + recent (heavy includes the sinks); -1: never compressed */
    int kept_prompt;     /* live tokens right after the prompt compression */
    int live;            /* live tokens when the request ended */
    int64_t evicted, merged; /* tokens evicted; of those, merged into a kept token */
    float tau;           /* D2O merge threshold at the end; NaN when never set */
} eng_kv_layer_report;

typedef struct eng_kv_report {
    eng_kv_method method;
    int n_layers;
    int prefill_len;     /* cache length the prompt compression saw (0: it never ran) */
    const eng_kv_layer_report *layers; /* [n_layers] */
    /* Live KV tokens of the sequence, averaged over its layers, sampled after
     * every step from the prompt compression on (before it, every method
     * holds the whole prompt): the mean and the peak of those samples. */
    double kv_tokens_mean, kv_tokens_peak;
    int64_t kv_samples;
    int64_t kv_bytes_per_token; /* the backend's payload (K, V, scores) of one token in every layer */
} eng_kv_report;

typedef struct eng_event {
    eng_event_type type;
    uint64_t id;                   /* request id */
    int32_t token;                 /* ENG_EV_TOKEN */
    const eng_sample_result *res;  /* ENG_EV_TOKEN: borrowed for the call */
    eng_finish finish;             /* ENG_EV_DONE */
    int status;                    /* ENG_EV_DONE: D2_OK, D2_ECANCELED, D2_EKVFULL, ... */
    int n_prompt, n_generated;
    int n_preempted;               /* times this request was preempted */
    double t_queued, t_first_token, t_done; /* seconds since submit (0 = not reached) */
    const eng_kv_report *kv;       /* ENG_EV_DONE: what KV compression did (borrowed for the call) */
} eng_event;

/* Return non-zero from ENG_EV_TOKEN to finish the request now (finish = STOP):
 * the API layer does this when a stop string matched. Runs on the engine
 * thread: must not block. */
typedef int (*eng_event_fn)(void *user, const eng_event *ev);

typedef struct eng_request {
    const int32_t *prompt;  /* copied at submit */
    int n_prompt;
    int max_tokens;
    eng_sample_params sample; /* logit_bias array copied at submit */
    bool ignore_eos;
    bool want_logprobs;       /* the caller reads eng_sample_result's logprobs; when false
                                 and sampling is plain greedy, the token may be chosen
                                 where the logits are (logprob NaN, no top list) */
    const int32_t *stop_ids;  /* extra stop token ids, copied; may be NULL */
    int n_stop_ids;
    eng_kv_config kv;       /* KV compression; zeroed = full cache */
    bool queue_exempt;      /* not counted against max_queue and never refused by it:
                               the 2nd.. choice of a request whose first was accepted */
    eng_event_fn on_event;  /* required; called for every token and once with DONE */
    void *user;
} eng_request;

typedef struct eng_sched_config {
    int max_queue;          /* requests that may wait beyond the free running slots before
                               submit returns D2_EQUEUEFULL (0: accepted only when a slot
                               is free); queue_exempt submissions do not count */
    /* Host memory admitted prefills may hold for compression scratch (D2O's
     * column sums: layers x heads x prefill floats each, freed when the
     * prompt is compressed); a request beyond it waits unless none is held.
     * 0 = 1 GiB. */
    int64_t prefill_bytes_limit;
} eng_sched_config;

typedef struct eng_sched_stats {
    int running, waiting;
    int decoding;           /* running sequences past their prompt's prefill: they hold the
                               prompt's KV (compressed or not) and decode a token each step */
    int64_t preemptions, prompt_tokens, generation_tokens, steps;
    int64_t finished_stop, finished_length, finished_error, finished_canceled;
    int64_t kv_tokens_evicted, kv_tokens_merged, kv_pages_freed; /* by compression */
    /* wall time the engine thread spent compressing: at the end of prompts, and
     * evicting during decoding (every other sequence waits meanwhile) */
    double kv_compress_prompt_s, kv_compress_decode_s;
    int64_t prefill_bytes;  /* compression scratch held now (eng_sched_config.prefill_bytes_limit) */
} eng_sched_stats;

int eng_sched_create(eng_engine *e, const eng_sched_config *cfg, eng_sched **out);
/* Stops the thread if running (in-flight requests get DONE with ECANCELED)
 * and frees everything. Accepts NULL. */
void eng_sched_destroy(eng_sched *s);
int eng_sched_start(eng_sched *s);     /* starts the engine thread */
/* Thread-safe. Validates (D2_EINVAL with *why, D2_ETOOLONG when the prompt
 * does not fit the context, D2_EKVFULL when it could never fit the pool),
 * then queues; D2_EQUEUEFULL past max_queue. *id_out set on success. */
int eng_sched_submit(eng_sched *s, const eng_request *r, uint64_t *id_out, const char **why);
/* Thread-safe; unknown or finished ids are ignored. */
void eng_sched_cancel(eng_sched *s, uint64_t id);
/* Manual mode: one iteration (admit, plan, step, sample, retire). Returns the
 * number of requests still in flight (>= 0) or an error. */
int eng_sched_step(eng_sched *s);
/* Thread-safe: changes the queue limit (SIGHUP reload). */
void eng_sched_set_max_queue(eng_sched *s, int max_queue);
/* Thread-safe snapshot. */
eng_sched_stats eng_sched_get_stats(eng_sched *s);
/* Stops admitting new requests (submit returns D2_EAGAIN); in-flight ones
 * continue. Thread-safe. */
void eng_sched_close(eng_sched *s);
/* Non-zero (the status, D2_ECUDA) once the backend reported a lost device
 * state (a sticky CUDA error): every request has then ended with that status,
 * the scheduler is closed, and nothing it could compute can be trusted — the
 * process must exit (the daemon does, non-zero, so systemd restarts it). When
 * non-zero and why is not NULL, copies the failing call into why[cap].
 * Thread-safe (the daemon's main thread polls it). */
int eng_sched_fatal(eng_sched *s, char *why, size_t cap);

/* ---- live view: what the web page's pool view shows ---------------------------
 *
 * While the view is being read (a call in the last ENG_VIEW_WATCH_MS), the
 * engine thread records each running sequence's pages and tokens per layer at
 * the end of every step (the first call after a pause sees no running rows);
 * a finishing sequence's final shape is kept in a ring of the last
 * ENG_VIEW_RECENT finished ones; every compression that changed a cache is
 * appended to a ring of the last ENG_VIEW_EVENTS events (numbered from 1).
 * eng_sched_view_get copies both (any thread; takes a short lock the engine
 * thread also takes once per step); free the copy with eng_sched_view_free.
 */
#define ENG_VIEW_EVENTS 256
#define ENG_VIEW_RECENT 8
#define ENG_VIEW_WATCH_MS 5000
enum { ENG_KV_EVENT_PREFILL = 0, ENG_KV_EVENT_DECODE = 1 };

typedef struct eng_kv_event {
    uint64_t seq;           /* event number, 1, 2, ... */
    uint64_t id;            /* request id */
    double t;               /* d2_now() when it happened */
    int phase;              /* ENG_KV_EVENT_PREFILL (prompt compression) or _DECODE */
    int64_t evicted, merged, pages_freed;
} eng_kv_event;

typedef struct eng_seq_view {
    uint64_t id;
    eng_kv_config kv;       /* method and budget (zeroed = full cache) */
    bool compressed;        /* the prompt compression has run */
    bool finished;          /* from the finished ring: its shape just before its pages were freed */
    int n_prompt, n_generated, n_fed;
    int32_t *pages, *tokens; /* [n_layers] block-table pages and live tokens per layer */
} eng_seq_view;

typedef struct eng_sched_view {
    int n_layers, n_seqs, n_events;
    eng_seq_view *seqs;      /* running sequences in admission order, then the recently
                                finished ones, newest first */
    eng_kv_event *events;    /* events numbered > since still in the ring, oldest first */
    uint64_t last_event;     /* number of the newest event (0: none yet) */
    int32_t *ints_;          /* storage of the seqs' arrays (internal) */
} eng_sched_view;

/* D2_OK or D2_ENOMEM. Events numbered <= since are left out. */
int eng_sched_view_get(eng_sched *s, uint64_t since, eng_sched_view *out);
void eng_sched_view_free(eng_sched_view *v); /* accepts a zeroed view */

/* Teacher-forced scoring: for ids[0..n), writes nll[i-1] = -log p(ids[i] |
 * ids[<i]) for i = 1..n-1 (nll has n-1 entries; may be NULL) and the sum.
 * Windows of the context length: each window starts with a fresh cache and
 * the last logits of a window score the first token of the next. */
int eng_score(eng_engine *e, const int32_t *ids, int n, double *nll, double *nll_sum);
/* The same while the cache is compressed exactly as during generation (the
 * model sees only what the method kept): the prompt is fed token by token
 * after an initial prefill of `prefill` tokens of each context window (0: 64),
 * compressing as generation would. kv NULL or full = eng_score. */
int eng_score_kv(eng_engine *e, const int32_t *ids, int n, const eng_kv_config *kv, int prefill,
                 double *nll, double *nll_sum);

#endif
