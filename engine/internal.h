/*
 * engine/internal.h — definitions shared by the runtime files of engine/
 * (engine.c, step.c, sched.c, run.c, kvcomp.c) and white-box tests; not part of
 * the public API (nothing outside engine/ and tests/ includes this).
 *
 * The runtime's files and what each owns:
 *   engine.c   the engine object: model + pool + backend, created in the order
 *              the backend's capabilities require (backend, then a pool sized
 *              from its payload bytes, then kv_attach);
 *   step.c     the mechanism of one step over a plan: reservation and append
 *              in the pool, positions, the backend call, logits, compression
 *              after the step — no policy;
 *   sched.c    the continuous-batching policy: admission, the watermark,
 *              preemption victims, plan building; calls step.c, never engine.c;
 *   run.c      drivers on top: eng_run (the scheduler in manual mode),
 *              eng_score, eng_score_kv;
 *   kvcomp.c   the KV-compression policy (budgets, thresholds, when).
 * Threading: everything here runs on the engine thread, except what engine.h
 * marks thread-safe.
 */
#ifndef D2_ENGINE_INTERNAL_H
#define D2_ENGINE_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>

#include "engine/backend.h"
#include "engine/engine.h"
#include "kvpool/kvpool.h"

#define ENG_SCORE_CHUNK 64 /* rows of logits per step when scoring every token */

struct eng_engine {
    eng_engine_config cfg;
    eng_model *model;
    bool own_model;       /* false: borrowed (tests building a model in memory) */
    kvp_pool *pool;
    eng_backend *be;
    eng_backend_caps caps;
    int ctx_len;
    int max_batch_tokens;
    int max_seqs;
    int max_logit_rows;
    /* the thread the backend is attached to (step.c attaches on first use) */
    bool attached;
    pthread_t attached_thread;
    /* a step ran and no result call (logits, argmax, sample) or sync has
     * followed: its column sums may be incomplete (engine/backend.h,
     * "Results and host synchronisation"); eng__step_sync clears it */
    bool step_unsettled;
    eng_sample_scratch sample_scratch; /* shared by every request's sampler: the
                                          engine thread samples one at a time */
};

/* eng_engine_create over an already-loaded model: the backend, the pool and
 * its payload, exactly as the public constructor builds them. own_model:
 * the engine frees the model (also on failure). Tests use it with synthetic
 * in-memory models. */
int eng__engine_create_for(eng_model *model, bool own_model, const eng_engine_config *cfg,
                           eng_engine **out);

/* Pages of one layer that n tokens occupy. */
static inline int64_t eng__pages_for(int64_t n_tokens, int page_tokens) {
    return (n_tokens + page_tokens - 1) / page_tokens;
}

/* ---- step.c: one step over a plan ------------------------------------------------- */

/* A step under construction, owned by its planner (the scheduler, a driver,
 * a test); its arrays are sized once (eng__plan_init). */
struct eng_kv_state;

typedef struct eng_plan {
    int32_t *tokens, *pos;  /* [cap_tokens] */
    eng_batch_seq *seqs;    /* [cap_seqs] */
    int n_tokens, n_seqs;
    int cap_tokens, cap_seqs;
} eng_plan;

/* Sized for e's max_batch_tokens and max_seqs (at least 1 sequence). */
int eng__plan_init(eng_plan *p, const eng_engine *e);
void eng__plan_free(eng_plan *p); /* accepts a zeroed plan */
void eng__plan_reset(eng_plan *p);
/* Appends n tokens of pool sequence seq at positions pos0.. as the plan's next
 * sequence; returns its entry (score fields zeroed; the caller may set them;
 * host_logits = all_logits: every caller reads all-logits rows on the host,
 * and one that will read a want_logits row with eng__step_logits sets it),
 * or NULL when the plan's arrays are full. */
eng_batch_seq *eng__plan_add(eng_plan *p, int seq, const int32_t *tokens, int n, int pos0,
                             bool want_logits, bool all_logits);
/* Pages (all layers, all sequences) the plan takes from the free list. */
int64_t eng__plan_pages_needed(const eng_engine *e, const eng_plan *p);
/* The mechanism: reserves every (seq, layer) of the plan — all or nothing:
 * D2_EKVFULL / D2_ETOOLONG with no effect on the pool — appends the new
 * slots and records their positions, attaches the backend to the calling
 * thread if needed, and runs the backend. On a backend error the plan's
 * sequences hold unspecified payload (the caller drops them); the backend's
 * last_error is logged. */
int eng__step_execute(eng_engine *e, const eng_plan *p);
/* Logit row `row` of the last step in host memory (borrowed until the next
 * step); without a wait of its own when the plan flagged the row host_logits.
 * After a step, the runtime asks for its device draws (eng__step_sample)
 * before argmax and logits: then the step waits for the device once. */
int eng__step_logits(eng_engine *e, int row, const float **out);
/* Greedy token of logit row `row`, chosen where the logits are. */
int eng__step_argmax(eng_engine *e, int row, int32_t *out);
/* Whether the backend draws samples where the logits are (caps.sample_on_device). */
bool eng__step_can_sample(const eng_engine *e);
/* Sampled tokens of logit rows rows[0..n) with draws[0..n) (backend.h, sample). */
int eng__step_sample(eng_engine *e, const int *rows, const eng_sample_draw *draws, int n, int32_t *out);
/* Completes the last step (the backend's sync) unless a result call
 * (logits, argmax, sample) or an earlier eng__step_sync already did: the
 * runtime calls it before it reads or frees a plan's column sums (D2O's
 * colsum; engine/backend.h, "Results and host synchronisation"). Attaches the
 * backend to the calling thread if needed. */
int eng__step_sync(eng_engine *e);
/* Whether status rc from a step, sample or compression means the backend's
 * device state is lost (engine/backend.h: such a backend answers D2_ECUDA
 * from then on): nothing it computes can be trusted any more. */
bool eng__step_backend_lost(int rc);
/* The backend's last error (the failing call), "" when none. Borrowed. */
const char *eng__step_backend_error(const eng_engine *e);
/* After a step that fed a compressed sequence up to `fed` tokens: the prompt
 * compression once fed reaches prefill_end (after eng__step_sync when it
 * reads column sums), decode-time eviction after that.
 * D2_EKVFULL (no page for a copy on write) leaves the cache as it is. */
int eng__step_compress(eng_engine *e, int seq, struct eng_kv_state *ks, int fed, int prefill_end);

#endif
