/*
 * engine/kvcomp.h — KV-cache compression inside the paged pool: D2O and the
 * H2O / StreamingLLM / SnapKV / PyramidKV baselines (internal to engine/;
 * the public configuration is eng_kv_config in engine/engine.h; the method
 * spec is shared/design/d2o-spec.md).
 *
 * Granularity (eng_kv_config.granularity): `layer` (default) is
 * layer-uniform selection (spec §9.1 option A): one kept set per (sequence,
 * layer), a token's score is the sum over KV heads of its accumulated
 * attention, and the similarity of two tokens is the mean over KV heads of
 * the per-head cosine of their post-RoPE keys. `head` (the official preset)
 * lets every KV head select, match and merge on its own within the layer's
 * slots (eng_kv_compress_req.per_head); the budgets and the EMA threshold
 * stay per (sequence, layer), as the official code keeps them per layer.
 *
 * Policy only: the mechanism (scores, selection, matching, merging,
 * compaction) is the backend's kv_compress operation (engine/backend.h),
 * which runs where the KV payload lives; this file decides the numbers.
 *
 * Lifecycle of a compressed sequence (driven by step.c, sched.c and run.c):
 *   eng_kv_state_create      at submit (small per-layer arrays only)
 *   eng_kv_prefill_begin     at (re)admission: forgets budgets and tau, and
 *                            (D2O) allocates the prefill column sums,
 *                            eng_kv_prefill_bytes of them; the scheduler
 *                            counts these bytes in admission
 *   eng_kv_plan_seq          per step: sets want_scores / score_from / colsum
 *                            of the sequence's plan entry
 *   eng_kv_compress_prompt   once the prefill is complete: the layer
 *                            statistics (then the column sums are freed),
 *                            per-layer budgets, every compressed layer N -> C_l
 *   eng_kv_after_decode      after every later step: a layer whose live tokens
 *                            reach C_l + page_tokens is cut back to C_l (a page
 *                            returns); `exact` cuts back every step
 * Nothing here allocates per step (the backend's scratch is sized at
 * kv_attach).
 *
 * Merges never write a page shared with another sequence: the target's page
 * is made private first (kvp_unshare); kvp_compact copies shared pages it
 * rewrites. When the pool has no page for such a copy the layer is left as it
 * is (D2_EKVFULL is not an error here: the next step tries again).
 *
 * Threading: engine thread only.
 */
#ifndef D2_ENGINE_KVCOMP_H
#define D2_ENGINE_KVCOMP_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/backend.h"
#include "engine/engine.h"
#include "engine/kvsel.h"
#include "kvpool/kvpool.h"

typedef struct eng_kv_state {
    eng_kv_config cfg;      /* keep_layers resolved to the method's default if unset */
    int n_layers, n_heads, n_kv_heads;
    bool compressed;        /* prompt compression done */
    int prefill_len;        /* cache length the prompt compression saw */
    int *heavy, *recent;    /* [n_layers] budget = heavy + recent; heavy includes sinks;
                               -1 = layer never compressed */
    float *v_layer;         /* [n_layers] D2O layer statistic (inspection, tests) */
    float *tau;             /* [n_layers] D2O EMA threshold */
    uint8_t *tau_set;       /* [n_layers] */
    float *colsum;          /* D2O, between eng_kv_prefill_begin and the prompt compression
                               (NULL otherwise): [n_layers][n_heads][colsum_len] column sums */
    int colsum_len;         /* the prefill length */
    int64_t n_evicted, n_merged, n_pages_freed; /* cumulative since create */
    /* inspection (eng_kv_report), since the last eng_kv_prefill_begin */
    eng_kv_layer_report *rep;   /* [n_layers]: per-layer counters and the report */
    /* scratch of one whole-sequence compression (kv_compress_layers) */
    eng_kv_compress_req *rq;    /* [n_layers] */
    eng_kv_compress_res *rs;    /* [n_layers] */
    struct eng_kv_tau_ctx *tc;  /* [n_layers] threshold callback contexts */
    int *layer_list;            /* [n_layers] the layers of that compression */
    double live_sum, live_peak; /* eng_kv_track samples (tokens summed over layers) */
    int64_t live_samples;
} eng_kv_state;

/* State for one request; c must validate. */
int eng_kv_state_create(const eng_kv_config *c, const eng_model_config *mc, eng_kv_state **out);
void eng_kv_state_free(eng_kv_state *s); /* accepts NULL */
/* Back to "not started": budgets, tau and statistics forgotten, column sums
 * freed. */
void eng_kv_state_reset(eng_kv_state *s);
/* Bytes eng_kv_prefill_begin allocates for a prefill of prefill_len tokens
 * (D2O: n_layers x n_heads x prefill_len floats; 0 for the other methods). */
size_t eng_kv_prefill_bytes(const eng_kv_config *c, const eng_model_config *mc, int prefill_len);
/* Reset, then (D2O) the column sums of a prefill of prefill_len tokens.
 * D2_ENOMEM leaves the state reset without them. */
int eng_kv_prefill_begin(eng_kv_state *s, int prefill_len);
/* Frees the column sums now (a preempted sequence that waits holds none). */
void eng_kv_colsum_release(eng_kv_state *s);

/* Records the sequence's live tokens (after a step, once compressed). */
void eng_kv_track(eng_kv_state *s, const kvp_pool *pool, int seq);
/* Fills out (and s->rep) with what compression did to seq so far (-1: no
 * sequence held); bytes_per_slot: the backend's payload per token and layer.
 * out->layers points into s. */
void eng_kv_report_fill(eng_kv_state *s, const kvp_pool *pool, int seq, size_t bytes_per_slot,
                        eng_kv_report *out);

/* Makes c's kept layers explicit for an n_layers model (the method default
 * when c has no explicit set). */
void eng_kv_keep_layers_resolve(eng_kv_config *c, int n_layers);
/* True when the method needs accumulated scores at this stage. */
bool eng_kv_wants_scores(const eng_kv_state *s);
/* Fills the score fields of a plan entry; prefill_end is the cache length at
 * which the prompt compression runs. */
void eng_kv_plan_seq(const eng_kv_state *s, int prefill_end, eng_batch_seq *bs);

/* D2O's layer statistic from per-query-head column sums colsum[h][len] over
 * the first n keys: per head the unbiased variance over keys, min-max across
 * the heads, mean. */
float eng_kv_d2o_layer_stat(const float *colsum, int n_heads, int len, int n);
/* Per-layer budgets for a cache of n tokens (spec §2.2 for D2O, §8 for
 * PyramidKV, uniform otherwise). v: D2O statistics [n_layers] (else unused).
 * heavy/recent [n_layers] receive the split; -1 for kept layers. */
void eng_kv_budgets(const eng_kv_config *c, int n_layers, const float *v, int n, int *heavy,
                    int *recent);
/* Compresses (seq, layer) to heavy + recent tokens now (first = prompt
 * compression: tau is initialised). Returns the number of evicted tokens
 * (>= 0), D2_EKVFULL when a copy on write found no page (nothing changed),
 * or another error. */
int eng_kv_compress_layer(eng_backend *be, int seq, int layer, eng_kv_state *s, int heavy,
                          int recent, bool first);
/* Prompt compression of every compressed layer (sets s->compressed). */
int eng_kv_compress_prompt(eng_backend *be, int seq, eng_kv_state *s);
/* Decode-time eviction after a step (no-op for prefill-only methods). */
int eng_kv_after_decode(eng_backend *be, int seq, eng_kv_state *s);

#endif
