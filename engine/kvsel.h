/*
 * engine/kvsel.h — the pure pieces of KV-compression selection that every
 * backend runs the same way: which slots a compression keeps given their
 * token scores, and SnapKV's pooled scores. Layer: the seam
 * (tools/check_layers.py) — host functions over plain arrays, no pool, no
 * allocation; called by the CPU backend's compression, by tests and, as the
 * reference, by the emulated CUDA selection tests. Any thread.
 */
#ifndef D2_ENGINE_KVSEL_H
#define D2_ENGINE_KVSEL_H

#include <stdint.h>

/* Scratch entry of eng_kv_select (one per slot). */
typedef struct eng_kv_cand { float s; int32_t i; } eng_kv_cand;

/* Token selection over n slots in position order: the last `recent` slots,
 * the first min(n_sink, heavy) of the others (sinks, inside the heavy
 * budget), and the best heavy - sinks of the rest by score (ties: earlier
 * slot first). keep[n] receives 1/0; scratch has n entries. Returns the
 * number kept. */
int eng_kv_select(eng_kv_cand *scratch, const float *score, int n, int n_sink, int heavy,
                  int recent, uint8_t *keep);

/* Pooled SnapKV scores: average over a window of 5 (clipped at the ends). */
void eng_kv_pool_scores(const float *in, int n, float *out);

#endif
