/*
 * engine/model/rope.h — rotary position embedding: the inverse-frequency table of
 * a model (rope scaling applied) and the rotation of one head vector.
 *
 * Callers: engine/ref (the reference forward), engine/cpu (the batched backend),
 * the CUDA backend (uploads the table; kernels/kernels.h's rope kernel rotates
 * the same pairs). Both functions are pure; any thread.
 */
#ifndef D2_ENGINE_MODEL_ROPE_H
#define D2_ENGINE_MODEL_ROPE_H

#include <stdbool.h>

#include "engine/model/model.h"

/* Fills inv_freq[head_dim/2] with the RoPE inverse frequencies of the model,
 * rope scaling applied as Hugging Face computes it: llama3 rescales each
 * frequency by its wavelength; linear divides positions by factor, which is
 * folded in here as inv_freq / factor. The angle of pair i at position p is
 * (float)p * inv_freq[i]. */
void eng_rope_inv_freq(const eng_model_config *c, float *inv_freq);

/* Rotates one head vector x[head_dim] for the given cos/sin[head_dim/2]:
 * pairs (x[i], x[i+hd/2]) when neox, else (x[2i], x[2i+1]). */
void eng_rope_apply(float *x, int head_dim, bool neox, const float *cosv, const float *sinv);

#endif
