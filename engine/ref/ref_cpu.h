/*
 * engine/ref/ref_cpu.h — the slow, obviously-correct reference forward pass
 * (internal to engine/; used by tests; RoPE comes from engine/model/rope.h,
 * whose tables the llama2.c golden transcripts check independently).
 *
 * One sequence, one token at a time, in the style of llama2.c: every weight
 * row is dequantised to f32 and dotted in plain sequential f32 order, and the
 * state keeps its own contiguous f32 KV cache [layer][pos][n_kv*head_dim].
 * No kvpool, no threads, no SIMD. It exists so the batched backends can be
 * checked against something simple enough to read.
 *
 * Thread-safety: a state is used by one thread at a time.
 */
#ifndef D2_ENGINE_REF_CPU_H
#define D2_ENGINE_REF_CPU_H

#include <stdbool.h>

#include "engine/model/model.h"

typedef struct eng_ref_state eng_ref_state;

/* max_ctx bounds the positions (0..max_ctx-1). Returns D2_OK, D2_EINVAL,
 * D2_ENOMEM. Free with eng_ref_free. */
int eng_ref_create(const eng_model *m, int max_ctx, eng_ref_state **out);
void eng_ref_free(eng_ref_state *s); /* accepts NULL */

/* Runs token at position pos (positions must be fed 0,1,2,... in order;
 * feeding pos again overwrites that cache entry and forgets later ones).
 * logits[vocab] receives the output (may be NULL to skip the head). */
int eng_ref_forward(eng_ref_state *s, int token, int pos, float *logits);

/* Removes position pos of one layer from the cache as an eviction would:
 * later forwards no longer attend to it. */
void eng_ref_evict(eng_ref_state *s, int layer, int pos);

/* Attention probabilities of the last forward: probs[head] over positions
 * 0..last_pos (evicted positions read 0). Borrowed; row stride max_ctx. */
const float *eng_ref_att(const eng_ref_state *s, int layer, int head);

#endif
