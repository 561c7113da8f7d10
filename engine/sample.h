/*
 * engine/sample.h — token sampling (internal to engine/; re-exported by
 * engine/engine.h). Callers: the engine's decode loop (one eng_sampler per
 * sequence) and tests. A sampler is not thread-safe; distinct samplers are
 * independent (no global state besides the entropy counter used when a
 * request has no seed).
 *
 * Pipeline, in this order (vLLM v0's order):
 *   1. logit_bias: logits[token] += bias (entries are applied one by one, so a
 *      token listed twice gets both biases).
 *   2. penalties over the tokens seen so far (only those tokens are touched):
 *      repetition (HF/vLLM rule, prompt and generated tokens):
 *          logit > 0 ? logit / repetition_penalty : logit * repetition_penalty
 *      presence and frequency (OpenAI rule, generated tokens only, count = how
 *      many times the token was generated):
 *          logit -= presence_penalty * (count > 0) + frequency_penalty * count
 *      Steps 1-2 are eng_sampler_process_logits.
 *   3. temperature < 1e-5 (as vLLM): greedy argmax, ties to the lowest id.
 *      Otherwise p ~ exp(logit / temperature), then
 *   4. top-k: keep the k most likely tokens (0 or >= n_vocab: off),
 *   5. top-p: of those, keep the smallest most-likely-first set whose mass is
 *      >= top_p of their (renormalised) mass; always at least one token,
 *   6. min-p: of those, keep tokens with p >= min_p * p_max,
 *   7. draw one token from what is left with the request's own RNG.
 *   "Most likely first" is the order (logit descending, token id ascending),
 *   so ties are broken deterministically towards the lower id. vLLM v1 applies
 *   min-p before top-k/top-p; the two orders differ only when top-p and min-p
 *   are both set.
 *
 * Log-probabilities (eng_sample_result.logprob and .top) are taken from the
 * distribution after steps 1-2 and before steps 3-7: log_softmax of the
 * processed logits at temperature 1 over the whole vocabulary. This is what
 * vLLM reports by default (its "raw" logprobs of the processed logits);
 * temperature, top-k/top-p/min-p and the greedy choice do not change them, so
 * a chosen token's logprob can be below the top entries' and the top list can
 * hold tokens the sampler could not pick.
 *
 * Input logits must be finite or -inf (a -inf token is never picked); at least
 * one must be finite. NaN or +inf makes eng_sampler_sample return D2_EINVAL.
 * Tokens whose probability relative to the most likely one is below about
 * exp(-86) are treated as probability 0.
 *
 * Device draws (eng_sampler_device_draw; kernels/sample.cu kern_sample): a
 * sample that needs no logprobs, penalties or logit bias, with temperature >=
 * 1e-5 and either top_k off (0 or >= n_vocab) with top_p 1, or 2 <= top_k <=
 * ENG_SAMPLE_DEVICE_MAX_K (top_p and min_p allowed), takes exactly one uniform
 * number u from the RNG and is a pure function of (logits, u, parameters).
 * A backend can then draw where the logits are and get the token this file
 * would: the host hands it u and 1.0f / temperature, and the kernel repeats,
 * in the same order and with the same roundings, what decides the token here:
 *   top_k off: p_i = exp_nonpos((x_i - max) * inv_t) (the branch-free exp
 *     below; zeroed when p_i < min_p), the sums of 64-token blocks in
 *     block_sum's fixed tree, their total in double in block order (then the
 *     tail tokens), target = u * total, and the walk: skip whole blocks while
 *     run + block <= target, then add tokens of the block in id order until
 *     run > target (draw());
 *   top_k = k: the k best tokens by rank (logit descending, id ascending),
 *     their weights in that order, the double mass, the shortest prefix
 *     whose running sum reaches top_p * mass, the min_p test, target = u *
 *     sum of what is left, and the walk in rank order (draw_small()).
 * Ties therefore resolve as here (rank order for top-k membership, id order
 * for the walk), and a boundary (run exactly at target) goes the same way.
 * Other samples (top_p with top_k off, top_k > ENG_SAMPLE_DEVICE_MAX_K) take a
 * histogram and quickselect path whose summation order depends on the
 * partitioning, which a device would not reproduce: they stay on the host.
 *
 * The RNG (xoshiro256**, seeded through splitmix64) lives in eng_sampler and
 * is seeded per request, so the same seed and the same logits give the same
 * tokens. eng_sampler_sample does not allocate: all scratch is made at init
 * (about 23 bytes per vocabulary entry per sampler).
 */
#ifndef D2_ENGINE_SAMPLE_H
#define D2_ENGINE_SAMPLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct eng_logit_bias { int32_t token; float bias; } eng_logit_bias;

typedef struct eng_sample_params {
    float temperature;        /* [0, 2]; below 1e-5 = greedy */
    int top_k;                /* >= 0; 0 = off (as is >= n_vocab) */
    float top_p;              /* (0, 1]; 1 = off */
    float min_p;              /* [0, 1]; 0 = off */
    float repetition_penalty; /* (0, 10]; 1 = off (HF/vLLM rule: divide positive logits, multiply negative) */
    float presence_penalty;   /* [-2, 2]; 0 = off (OpenAI rule) */
    float frequency_penalty;  /* [-2, 2]; 0 = off */
    uint64_t seed;
    bool has_seed;            /* false: seeded from the clock and a process counter */
    const eng_logit_bias *logit_bias; int n_logit_bias; /* borrowed for the sampler's life; bias in [-100, 100] */
    int n_top_logprobs;       /* 0..20 */
} eng_sample_params;

/* temperature 1, top_k 0, top_p 1, min_p 0, repetition 1, presence and
 * frequency 0, no seed, no bias, no top logprobs (OpenAI's defaults). */
void eng_sample_params_default(eng_sample_params *p);
/* D2_OK or D2_EINVAL with *why set to a static message naming the field
 * (e.g. "temperature must be between 0 and 2"); *why is untouched on success.
 * why may be NULL. */
int eng_sample_params_validate(const eng_sample_params *p, int n_vocab, const char **why);

typedef struct eng_token_logprob { int32_t token; float logprob; } eng_token_logprob;

typedef struct eng_sample_result {
    int32_t token;
    float logprob;                    /* of the chosen token (see top of file) */
    int n_top;                        /* min(n_top_logprobs, n_vocab) */
    eng_token_logprob top[20];        /* most likely first, ties to the lower id */
} eng_sample_result;

typedef struct eng_sampler {
    eng_sample_params params;
    uint64_t rng[4];                  /* xoshiro256** state */
    int n_vocab;
    /* scratch, owned: allocated in init, freed in free */
    float *work;                      /* [n_vocab] processed logits of the current sample */
    float *prob;                      /* [n_vocab] exp((logit - max) / temperature) */
    int32_t *idx;                     /* [n_vocab] candidate token ids */
    uint16_t *bins;                   /* [n_vocab] histogram bin of each token */
    int32_t *hist_cnt;                /* [ENG_SAMPLE_NBINS] tokens per bin */
    double *hist_mass;                /* [ENG_SAMPLE_NBINS] probability mass per bin */
    /* penalty state, kept across samples of one sequence */
    int32_t *counts;                  /* [n_vocab] occurrences among generated tokens */
    uint8_t *seen_prompt;             /* [n_vocab] token occurred in the prompt */
    int32_t *seen_ids;                /* [n_vocab] distinct ids seen in prompt or output */
    int n_seen;                       /* entries used in seen_ids */
    bool own_scratch;                 /* false: work..hist_mass borrowed from an eng_sample_scratch */
} eng_sampler;

/* Per-sample scratch (work, prob, idx, bins, histogram: about 14 bytes per
 * vocabulary entry) that many samplers can share when they sample on one
 * thread, one at a time — as the engine thread does for every running
 * sequence. A sampler built with eng_sampler_init_shared then keeps only its
 * penalty state (about 9 bytes per vocabulary entry). */
typedef struct eng_sample_scratch {
    int n_vocab;
    float *work, *prob;
    int32_t *idx;
    uint16_t *bins;
    int32_t *hist_cnt;
    double *hist_mass;
} eng_sample_scratch;
int eng_sample_scratch_init(eng_sample_scratch *sc, int n_vocab);
void eng_sample_scratch_free(eng_sample_scratch *sc); /* accepts a zeroed struct */

/* Histogram size used by top-k/top-p selection (internal; for the scratch). */
#define ENG_SAMPLE_NBINS 1537

/* Validates p (D2_EINVAL, logged), seeds the RNG, allocates the scratch
 * (D2_ENOMEM). On failure *s is left zeroed, safe to eng_sampler_free. */
int eng_sampler_init(eng_sampler *s, const eng_sample_params *p, int n_vocab);
/* The same, borrowing the per-sample scratch from sc (n_vocab must match; sc
 * outlives the sampler; samplers sharing sc must not sample concurrently). */
int eng_sampler_init_shared(eng_sampler *s, const eng_sample_params *p, int n_vocab,
                            eng_sample_scratch *sc);
/* Frees the scratch; accepts a zeroed sampler. */
void eng_sampler_free(eng_sampler *s);
/* Records tokens for penalties: prompt tokens count for repetition penalty
 * only (as in vLLM); generated tokens count for all three. Ids outside
 * [0, n_vocab) are ignored. */
void eng_sampler_add_prompt(eng_sampler *s, const int32_t *ids, size_t n);
void eng_sampler_accept(eng_sampler *s, int32_t token);
/* Steps 1-2 of the pipeline: out[n_vocab] = in[n_vocab] with the logit bias
 * and the penalties applied. out may equal in. Exposed for tests. */
void eng_sampler_process_logits(eng_sampler *s, const float *in, float *out);
/* Samples from logits[n_vocab] (not modified). D2_OK, or D2_EINVAL for
 * NaN/+inf logits or no finite logit (out->token is then -1). */
/* True when sampling is the argmax of the raw logits (lowest id on ties):
 * greedy, no penalties, no logit bias, no top logprobs. The engine then may
 * take the backend's argmax instead of copying the logits out. */
bool eng_sampler_is_plain_greedy(const eng_sampler *s);
int eng_sampler_sample(eng_sampler *s, const float *logits, eng_sample_result *out);

/* One device draw (see "Device draws" at the top). */
#define ENG_SAMPLE_DEVICE_MAX_K 1024
typedef struct eng_sample_draw {
    double u;         /* the uniform number the host draw would have used */
    float inv_temp;   /* 1.0f / temperature, as the host computes it */
    float top_p, min_p;
    int top_k;        /* 0 (off) or 2..ENG_SAMPLE_DEVICE_MAX_K, below n_vocab */
} eng_sample_draw;
/* Whether the samples of s are device draws (the test eng_sampler_device_draw
 * makes): a pure function of s's settings, which never change; it takes
 * nothing from the RNG, so a planner may ask it before the step (the
 * scheduler decides with it which logit rows it will read on the host). */
bool eng_sampler_device_eligible(const eng_sampler *s);
/* When the next sample of s is a device draw (no penalties, no bias, no top
 * logprobs, not greedy, and a top-k/top-p combination listed above), fills
 * *d, takes its uniform number from s's RNG (so the request's random stream
 * is the same whichever side draws) and returns true; else false and s is
 * untouched. The caller then must use the draw's token (and accept it). */
bool eng_sampler_device_draw(eng_sampler *s, eng_sample_draw *d);

#endif
