/*
 * api/api.h — the public header of api/: the OpenAI-compatible HTTP API.
 *
 * Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
 * GET /v1/models/{id},
 * GET /health (503 until api_server_set_ready), GET /metrics (Prometheus
 * text, `d2od:` prefix), POST /tokenize, POST /detokenize, GET / (the
 * built-in web page, open like /health) and GET /status (the KV pool view as
 * JSON, behind the API key; api/ui.c).
 *
 * HTTP runs on libmicrohttpd's own polling thread; a request waiting for the
 * engine is suspended (no thread ever blocks on a client or on the engine).
 * Chat templates and prompt tokenisation run on a small worker pool. Engine
 * events arrive on the engine thread, which only records token ids, text
 * bytes and logprob numbers into the request's preallocated buffers and
 * resumes the connection; JSON/SSE is formatted on the HTTP thread
 * (api/gen.h, api/sse.c).
 *
 * Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
 *
 * Ownership: api_server_create's *out belongs to the caller
 * (api_server_destroy). The engine and scheduler are borrowed and must
 * outlive the server. Threading: create/start/stop/destroy from the main
 * thread; api_server_tick from the main loop; the rest is internal.
 */
#ifndef D2_API_API_H
#define D2_API_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"

typedef struct api_config {
    const char *host;              /* "127.0.0.1" */
    int port;                      /* 0: any free port (see api_server_port) */
    const char *api_key;           /* NULL or "": no authentication */
    bool auth_health_metrics;      /* /health and /metrics need the key too */
    const char *served_model_name; /* id reported by /v1/models and accepted in "model" */
    size_t body_limit;             /* bytes; larger bodies get 413 */
    int max_n;                     /* limit on "n" */
    int max_tokens_limit;          /* limit on max_tokens */
    int default_max_tokens;        /* when the request gives none */
    double request_timeout_s;      /* 0: none */
    bool log_requests;             /* one INFO line per request */
    const char *chat_template;     /* overrides the model's; NULL: the model's, else ChatML */
    eng_kv_config kv_default;      /* KV compression of requests without "kv_compression";
                                      zeroed = full cache; fixed at creation */
} api_config;

typedef struct api_server api_server;

int api_server_create(const api_config *cfg, eng_engine *e, eng_sched *s, api_server **out);
/* Binds and starts serving; D2_EIO when the address cannot be bound. */
int api_server_start(api_server *srv);
int api_server_port(const api_server *srv);
/* /health turns 200. */
void api_server_set_ready(api_server *srv, bool ready);
/* Stop accepting new generation requests (they get 503); in-flight ones
 * continue. */
void api_server_drain(api_server *srv);
/* Requests still in flight. */
int api_server_in_flight(const api_server *srv);
/* Cancels requests past their deadline; call periodically (e.g. every 100 ms). */
void api_server_tick(api_server *srv);
/* Cancels every in-flight generation (end of a drain that timed out); the
 * clients get what was generated so far with finish_reason "abort". */
void api_server_cancel_all(api_server *srv);
/* Live-reloadable settings (log_requests, limits, timeout, api key). */
void api_server_update_config(api_server *srv, const api_config *cfg);
/* Stops the HTTP thread (connections closed) and frees. Accepts NULL. */
void api_server_destroy(api_server *srv);

/* ---- batch files (api/batch.c) --------------------------------------------------
 *
 * Runs an OpenAI batch input file (JSONL of {custom_id, method, url, body})
 * through the scheduler and appends one result line per request to output
 * ({id, custom_id, response: {status_code, request_id, body}, error}).
 * custom_ids already in output are skipped (resume). The scheduler must be
 * started (eng_sched_start). Blocks until every request is written. */
typedef struct api_batch_config {
    const char *model_name;     /* "model" in the result bodies */
    int max_n, max_tokens_limit, default_max_tokens;
    eng_kv_config kv_default;   /* for requests without "kv_compression" */
    const char *chat_template;  /* NULL: the model's, else ChatML */
    int max_in_flight;          /* requests submitted at once; 0: 256 */
    bool progress;              /* progress bar on stderr (a terminal) */
} api_batch_config;

typedef struct api_batch_report {
    int64_t total, ok, failed, skipped; /* requests: results 200 / errors / already in the output */
    int64_t prompt_tokens, completion_tokens;
    double seconds;
} api_batch_report;

/* D2_OK when the files could be read and written (requests may still have
 * failed: see the report); else an error with err (size errlen) filled. */
int api_batch_run(const api_batch_config *cfg, eng_engine *e, eng_sched *s, const char *input, const char *output,
                  api_batch_report *rep, char *err, size_t errlen);

#endif
