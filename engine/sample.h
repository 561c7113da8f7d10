/*
 * engine/sample.h — token sampling (internal to engine/; re-exported by
 * engine/engine.h).
 *
 * Pipeline, in vLLM's order: logit_bias -> repetition/presence/frequency
 * penalties over the sequence's tokens -> (temperature == 0: greedy argmax,
 * ties to the lowest id) -> temperature -> top-k -> top-p -> min-p -> draw
 * with the request's own RNG. Log-probabilities are reported from the
 * model's distribution after penalties and bias, before temperature and
 * truncation (as vLLM's default "raw" logprobs do not; we document ours:
 * log_softmax of the processed logits at temperature 1).
 *
 * The sampler keeps no global state: the RNG state lives in eng_sampler,
 * seeded per request, so the same seed gives the same output.
 * eng_sampler_sample does not allocate: scratch is supplied at init.
 */
#ifndef D2_ENGINE_SAMPLE_H
#define D2_ENGINE_SAMPLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct eng_logit_bias { int32_t token; float bias; } eng_logit_bias;

typedef struct eng_sample_params {
    float temperature;        /* 0 = greedy */
    int top_k;                /* 0 = off */
    float top_p;              /* 1 = off */
    float min_p;              /* 0 = off */
    float repetition_penalty; /* 1 = off (HF/vLLM rule: divide positive logits, multiply negative) */
    float presence_penalty;   /* 0 = off (OpenAI rule) */
    float frequency_penalty;  /* 0 = off */
    uint64_t seed;
    bool has_seed;            /* false: seeded from a time/entropy source */
    const eng_logit_bias *logit_bias; int n_logit_bias; /* borrowed for the sampler's life */
    int n_top_logprobs;       /* 0..20 */
} eng_sample_params;

void eng_sample_params_default(eng_sample_params *p);
/* D2_OK or D2_EINVAL with *why set to a static message naming the field. */
int eng_sample_params_validate(const eng_sample_params *p, int n_vocab, const char **why);

typedef struct eng_token_logprob { int32_t token; float logprob; } eng_token_logprob;

typedef struct eng_sample_result {
    int32_t token;
    float logprob;                    /* of the chosen token */
    int n_top;
    eng_token_logprob top[20];        /* most likely first */
} eng_sample_result;

typedef struct eng_sampler {
    eng_sample_params params;
    uint64_t rng[4];                  /* xoshiro256** state */
    int n_vocab;
    /* scratch, owned: allocated in init, freed in free */
    float *work;                      /* [n_vocab] */
    int32_t *idx;                     /* [n_vocab] */
    int32_t *counts;                  /* [n_vocab] occurrences in prompt+output (penalties) */
    uint8_t *seen_prompt;             /* [n_vocab] token occurred in the prompt (repetition penalty) */
} eng_sampler;

int eng_sampler_init(eng_sampler *s, const eng_sample_params *p, int n_vocab);
void eng_sampler_free(eng_sampler *s);
/* Records tokens for penalties: prompt tokens count for repetition penalty
 * only (as in vLLM); generated tokens count for all three. */
void eng_sampler_add_prompt(eng_sampler *s, const int32_t *ids, size_t n);
void eng_sampler_accept(eng_sampler *s, int32_t token);
/* Samples from logits[n_vocab] (not modified). */
int eng_sampler_sample(eng_sampler *s, const float *logits, eng_sample_result *out);

#endif
