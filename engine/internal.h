/*
 * engine/internal.h — definitions shared by the files of engine/ (not part of
 * the public API; nothing outside engine/ includes this).
 */
#ifndef D2_ENGINE_INTERNAL_H
#define D2_ENGINE_INTERNAL_H

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
    int ctx_len;
    int max_batch_tokens;
    int max_seqs;
    int max_logit_rows;
    /* step buffers, sized at create; used by one loop at a time */
    int32_t *tokens;      /* [max_batch_tokens] */
    int32_t *pos;         /* [max_batch_tokens] */
    eng_batch_seq *bseqs; /* [max_seqs] */
    float *logits;        /* [max_logit_rows][vocab] */
    struct eng_kv_ws *kvws; /* KV-compression scratch (engine/kvcomp.c) */
    eng_sample_scratch sample_scratch; /* shared by every request's sampler: the
                                          engine thread samples one at a time */
};

/* eng_engine_create over an already-loaded model: the pool, backend and every
 * step buffer, exactly as the public constructor builds them. own_model:
 * the engine frees the model (also on failure). Tests use it with synthetic
 * in-memory models. */
int eng__engine_create_for(eng_model *model, bool own_model, const eng_engine_config *cfg,
                           eng_engine **out);

/* Pages of one layer that n tokens occupy. */
static inline int64_t eng__pages_for(int64_t n_tokens, int page_tokens) {
    return (n_tokens + page_tokens - 1) / page_tokens;
}

/* Reserves room for n more tokens of seq in every layer. */
int eng__reserve_all_layers(eng_engine *e, int seq, int n);
/* Pages (all layers) that appending n tokens to seq would take now. */
int64_t eng__pages_needed_all_layers(const eng_engine *e, int seq, int n);

#endif
