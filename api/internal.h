/*
 * api/internal.h — types shared by the files of api/ (not public).
 */
#ifndef D2_API_INTERNAL_H
#define D2_API_INTERNAL_H

#include <jansson.h>
#include <stdbool.h>
#include <stdint.h>

#include "api/api.h"

/* An error to send: HTTP status and OpenAI's error fields. */
typedef struct api_error {
    int http;              /* 400, 401, 404, 413, 429, 500, 503 */
    const char *type;      /* "invalid_request_error", ... */
    const char *code;      /* NULL or e.g. "invalid_api_key" */
    char param[64];        /* "" when none */
    char message[512];
} api_error;

void api_error_set(api_error *e, int http, const char *type, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
/* {"error": {...}} as a new string (caller frees). */
char *api_error_json(const api_error *e);

typedef enum api_kind { API_COMPLETIONS = 0, API_CHAT = 1 } api_kind;

#define API_MAX_STOP 4
#define API_MAX_PROMPTS 64

/* A parsed /v1/completions or /v1/chat/completions body. Every pointer is
 * owned by the struct (api_gen_params_free). */
typedef struct api_gen_params {
    api_kind kind;
    char *model;                   /* NULL when absent */
    /* completions: prompts (each either text or ids) */
    int n_prompts;
    char *prompt_text[API_MAX_PROMPTS];   /* NULL when given as ids */
    int32_t *prompt_ids[API_MAX_PROMPTS]; /* NULL when given as text */
    int prompt_n_ids[API_MAX_PROMPTS];
    /* chat */
    json_t *messages;              /* new reference (array of objects) */
    json_t *tools;                 /* new reference or NULL */
    bool add_generation_prompt;
    /* sampling and limits */
    int max_tokens;                /* -1: default */
    float temperature, top_p, min_p, presence_penalty, frequency_penalty, repetition_penalty;
    int top_k;
    bool has_seed;
    uint64_t seed;
    int n;
    char *stop[API_MAX_STOP];
    int n_stop;
    int logprobs;                  /* -1: off; else number of top alternatives (0..20) */
    eng_logit_bias *logit_bias;
    int n_logit_bias;
    bool echo;
    bool stream;
    bool include_usage;
    bool ignore_eos;               /* extension (vLLM) */
    bool has_kv;                   /* extension "kv_compression" given */
    eng_kv_config kv;              /* valid when has_kv (already validated) */
    char *user;
} api_gen_params;

typedef struct api_limits {
    int max_n;
    int max_tokens_limit;
    int n_vocab;
    int n_layers;  /* for kv_compression.keep_layers; 0 = unknown (ENG_MODEL_MAX_LAYERS) */
} api_limits;

/* Parses and validates a request body. On failure fills *err (400 with the
 * offending param) and returns D2_EINVAL/D2_EJSON; *out is then freed. */
int api_parse_gen(const char *body, size_t len, api_kind kind, const api_limits *lim,
                  api_gen_params *out, api_error *err);
void api_gen_params_free(api_gen_params *p);

/* Finds the earliest occurrence of any stop string in text[0..len).
 * Returns its offset or -1; *partial is set to the length of the longest
 * suffix of text that is a proper prefix of some stop string (text that must
 * be held back while streaming). */
long api_find_stop(const char *text, size_t len, char *const *stop, int n_stop, size_t *partial);

/* Renders a chat template over messages (see api/jinja/jinja.h); result malloc'd. */
int api_render_chat(const char *tmpl, const api_gen_params *p, const char *bos, const char *eos,
                    char **out, api_error *err);

/* api/ui.c: the built-in page (GET /), static; and the /status JSON (malloc'd,
 * NULL when out of memory) with events numbered above `since`. */
const char *api_ui_page(size_t *len);
char *api_status_json(eng_engine *e, eng_sched *s, const char *model_name, uint64_t since);

#endif
