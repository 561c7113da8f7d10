/*
 * api/gen.h — state of a generation request shared by api/server.c (HTTP
 * side and the engine callback) and api/sse.c (JSON/SSE formatting). Private
 * to api/.
 *
 * The engine thread and the HTTP side meet in each choice's preallocated
 * buffers (single producer, single consumer, no lock):
 *   - the engine thread (on_event) detokenises, matches stop strings, writes
 *     text bytes, one api_tok per token and, when asked, one api_lp of
 *     logprob numbers, then publishes the counts with release stores
 *     (n_tok, safe_len, done). It never allocates, formats JSON or takes a
 *     lock other than the request's own mutex for the resume handshake.
 *   - the HTTP side reads below the published counts (acquire loads) and
 *     formats JSON/SSE (api/sse.c) on libmicrohttpd's thread.
 * Every buffer is sized at submission from max_tokens, so a request's memory
 * is bounded whatever its client does; a streaming client that falls more
 * than API_STREAM_MAX_LAG tokens behind has its choice ended (logged).
 */
#ifndef D2_API_GEN_H
#define D2_API_GEN_H

#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "api/internal.h"

/* Tokens a streaming client may be behind (generated but not yet handed to
 * its socket) before its choice is ended with finish_reason "abort". The
 * socket buffers hold a few MB before the server sees any lag at all. */
#define API_STREAM_MAX_LAG 256
/* Events (one per token) formatted per stream round, which bounds the staging buffer. */
#define API_STREAM_ROUND_TOKENS 64

/* ---- growable byte buffer (HTTP side only) ----------------------------------- */

typedef struct api_buf { char *p; size_t len, cap; bool oom; } api_buf;

int api_buf_reserve(api_buf *b, size_t extra);
void api_buf_add(api_buf *b, const char *s, size_t n); /* sets oom instead of dropping silently */
void api_buf_str(api_buf *b, const char *s);
void api_buf_fmt(api_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* s as a JSON string literal; bytes that are not valid UTF-8 become U+FFFD. */
void api_buf_json_str(api_buf *b, const char *s, size_t n);

/* ---- request state ------------------------------------------------------------- */

enum api_route { R_NONE, R_COMPLETIONS, R_CHAT, R_MODELS, R_MODEL, R_HEALTH, R_METRICS, R_TOKENIZE, R_DETOKENIZE, R_UI, R_STATUS };

typedef struct api_tok {
    int32_t token;
    float dt;                /* s since the previous token, or since the request began */
    uint32_t text_end;       /* bytes of text once this token was added (its text ends there) */
} api_tok;
typedef struct api_lp { float logprob; int n_top; eng_token_logprob top[20]; } api_lp;

struct api_req;

typedef struct api_choice {
    struct api_req *req;
    int index, prompt_index;
    uint64_t eng_id;
    bool submitted;
    /* preallocated at submission; written by the engine thread */
    char *text;              /* [text_cap] echoed prompt, then generated text */
    size_t text_cap;
    api_tok *toks;           /* [max_tokens] */
    api_lp *lps;             /* [max_tokens] when logprobs were asked for, else NULL */
    int max_tokens;
    size_t gen_start;        /* bytes of echoed prompt before the generated text */
    /* published by the engine thread (release), read by the HTTP side (acquire) */
    atomic_int n_tok;        /* tokens recorded */
    atomic_size_t safe_len;  /* text bytes that may be shown (a stop-string prefix is held back) */
    atomic_bool done;        /* final: the fields below are valid */
    int finish;              /* eng_finish */
    int status;              /* D2_OK, D2_ECANCELED, ... */
    int n_preempted;
    bool overrun;            /* ended because the client was not reading */
    /* engine thread only */
    size_t text_len;
    eng_tok_stream detok;
    double t_last;
    /* HTTP side only */
    atomic_int tok_sent;     /* tokens handed to the socket (the engine reads it for the lag bound) */
    size_t sent;             /* text bytes handed to the socket */
    size_t lp_off;           /* text_offset of token tok_sent (streamed logprobs) */
    bool role_sent, finish_sent;
} api_choice;

typedef struct api_server api_server;

typedef struct api_req {
    api_server *srv;
    struct MHD_Connection *conn;
    enum api_route route;
    api_buf body;
    bool too_large;
    api_gen_params params;
    bool has_params;
    pthread_mutex_t mu;      /* suspend/resume handshake, n_done, gone */
    atomic_int refs;
    int n_choices, n_done;
    api_choice *choices;
    int prompt_tokens;
    bool suspended;
    bool gone;               /* the connection is closed: never resume it */
    bool responded;
    /* preparation (template, tokenisation, submission) on a worker thread */
    bool prep_queued, prep_done;
    int prep_rc;             /* 0 or -1 with prep_err */
    api_error prep_err;
    char *prep_body;         /* /tokenize, /detokenize: the answer (JSON) */
    int prep_status;
    struct api_req *prep_next;
    /* stream output staging (HTTP side) */
    api_buf out;
    size_t out_off;
    bool stream_closed;      /* [DONE] formatted */
    bool eof_probe;          /* a half-closed client: the early 200 was sent (see server.c) */
    bool failed;
    int fail_status;
    double t_start, deadline;
    atomic_bool timed_out;   /* cancelled by its deadline */
    atomic_bool drained;     /* cancelled by a drain or a second signal */
    atomic_bool client_gone; /* cancelled because the client left */
    char id[48];
    long created;
    struct api_req *next, *prev; /* active list */
    bool in_active;
    bool stalled;            /* closed because the client read nothing for the idle deadline */
} api_req;

/* ---- formatting (api/sse.c, HTTP side) ------------------------------------------- */

/* finish_reason of a finished choice. */
const char *api_finish_name(const api_req *r, const api_choice *ch);
/* Formats what choice ch has published beyond what was sent as SSE events,
 * one per token (at most API_STREAM_ROUND_TOKENS), then, once it is done and
 * everything was sent, its finishing event (no text, as OpenAI's last chunk).
 * Advances the choice's sent counters. Returns true when something was
 * formatted. */
bool api_sse_choice(api_buf *b, api_req *r, api_choice *ch, const char *model, const eng_tokenizer *tok);
/* The usage event (when asked for) and "data: [DONE]". */
void api_sse_close(api_buf *b, const api_req *r, const char *model);
/* The whole non-streamed response body. */
void api_json_final(api_buf *b, const api_req *r, const char *model, const eng_tokenizer *tok);

#endif
