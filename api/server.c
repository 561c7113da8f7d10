/*
 * api/server.c — the HTTP server: routing, authentication, body limits,
 * OpenAI completions/chat (streamed and not), models, health, tokenize,
 * detokenize, and the bridge between libmicrohttpd and the scheduler.
 *
 * Threads:
 *   - libmicrohttpd's polling thread runs the access handler and content
 *     readers. A request waiting for the engine is suspended; nothing blocks.
 *   - The engine thread calls on_event() for each token; it detokenises,
 *     matches stop strings, appends SSE bytes under the request's lock and
 *     resumes the connection.
 * Lifetime of a request (api_req): one reference for the HTTP connection
 * (dropped in the request-completed callback) and one per engine submission
 * (dropped at its DONE event); freed when the count reaches zero.
 * Suspend/resume protocol: both happen under req->mu, and resume is only
 * called when the flag says the connection is suspended, so a resume can
 * never precede its suspend.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <strings.h>
#include <sys/socket.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "api/internal.h"
#include "api/jinja/jinja.h"
#include "api/metrics.h"
#include "common/log.h"
#include "common/status.h"
#include "common/utf8.h"
#include "common/util.h"

/* ChatML, used when neither the model nor the configuration gives a template
 * (as llama.cpp's server does). */
static const char *const DEFAULT_CHAT_TEMPLATE =
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/* ---- growable byte buffer ------------------------------------------------------ */

typedef struct buf { char *p; size_t len, cap; } buf;

static int buf_reserve(buf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *np = realloc(b->p, cap);
    if (!np) return -1;
    b->p = np;
    b->cap = cap;
    return 0;
}
static void buf_add(buf *b, const char *s, size_t n) {
    if (buf_reserve(b, n)) return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}
static void buf_str(buf *b, const char *s) { buf_add(b, s, strlen(s)); }
static void buf_fmt(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_fmt(buf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}
/* Appends s as a JSON string literal; bytes that are not valid UTF-8 become U+FFFD. */
static void buf_json_str(buf *b, const char *s, size_t n) {
    buf_add(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') { char e[2] = {'\\', (char)c}; buf_add(b, e, 2); i++; }
        else if (c == '\n') { buf_add(b, "\\n", 2); i++; }
        else if (c == '\r') { buf_add(b, "\\r", 2); i++; }
        else if (c == '\t') { buf_add(b, "\\t", 2); i++; }
        else if (c < 0x20) { buf_fmt(b, "\\u%04x", c); i++; }
        else if (c < 0x80) { buf_add(b, (const char *)&s[i], 1); i++; }
        else {
            int len = d2_utf8_seq((const uint8_t *)s + i, n - i);
            if (len > 0) { buf_add(b, s + i, (size_t)len); i += (size_t)len; }
            else { buf_add(b, "\xef\xbf\xbd", 3); i++; }
        }
    }
    buf_add(b, "\"", 1);
}

/* ---- request state ------------------------------------------------------------ */

enum route { R_NONE, R_COMPLETIONS, R_CHAT, R_MODELS, R_HEALTH, R_METRICS, R_TOKENIZE, R_DETOKENIZE, R_UI, R_STATUS };

typedef struct tok_lp { int32_t token; float logprob; int n_top; eng_token_logprob top[20]; } tok_lp;

struct api_req;
typedef struct api_choice {
    struct api_req *req;
    int index;
    int prompt_index;
    uint64_t eng_id;
    bool submitted;
    buf text;              /* generated text, whole UTF-8 sequences only */
    size_t sent;           /* bytes of text already streamed */
    eng_tok_stream detok;
    int n_tokens;
    tok_lp *lps;           /* [max_tokens] when logprobs requested */
    int n_lps, n_lps_sent;
    bool done, role_sent;
    const char *finish_reason;
    int status;
    double t_first, t_last;
} api_choice;

typedef struct api_req {
    api_server *srv;
    struct MHD_Connection *conn;
    enum route route;
    buf body;
    bool too_large;
    bool headers_checked;
    api_gen_params params;
    bool has_params;
    pthread_mutex_t mu;
    atomic_int refs;
    int n_choices, n_done;
    api_choice *choices;
    int32_t *prompt_len;    /* [n_prompts] tokens per prompt */
    int prompt_tokens;
    bool suspended;
    bool gone;              /* the connection is closed: never resume it */
    bool responded;
    buf sse;                /* bytes queued for a stream */
    size_t sse_off;
    bool sse_closed;        /* [DONE] queued */
    bool failed;
    int fail_status;
    double t_start, deadline;
    atomic_bool timed_out;  /* cancelled by its deadline (not by a drain) */
    char id[48];
    long created;
    struct api_req *next, *prev; /* active list */
    bool in_active;
} api_req;

struct api_server {
    api_config cfg;
    char *api_key, *model_name, *host;
    pthread_mutex_t cfg_mu;
    eng_engine *e;
    eng_sched *sched;
    const eng_tokenizer *tok;
    api_jinja_tmpl *chat_tmpl;
    char bos_text[64], eos_text[64];
    struct MHD_Daemon *mhd;
    int port;
    atomic_bool ready, draining;
    atomic_int in_flight;
    pthread_mutex_t active_mu;
    api_req *active;
    atomic_ullong next_req;
    api_metrics *metrics;
};

static void req_unref(api_req *r);

static double now_s(void) { return d2_now(); }

/* ---- responses ---------------------------------------------------------------- */

static enum MHD_Result send_text(struct MHD_Connection *c, int status, const char *ctype, const char *body,
                                 size_t len) {
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", ctype);
    enum MHD_Result r = MHD_queue_response(c, (unsigned)status, resp);
    MHD_destroy_response(resp);
    return r;
}

static enum MHD_Result send_json(struct MHD_Connection *c, int status, json_t *j) {
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!s) return MHD_NO;
    enum MHD_Result r = send_text(c, status, "application/json", s, strlen(s));
    free(s);
    return r;
}

static enum MHD_Result send_error(api_server *srv, struct MHD_Connection *c, const api_error *e) {
    char *s = api_error_json(e);
    if (!s) return MHD_NO;
    struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(s), s, MHD_RESPMEM_MUST_FREE);
    if (!resp) { free(s); return MHD_NO; }
    MHD_add_response_header(resp, "Content-Type", "application/json");
    if (e->http == 401) MHD_add_response_header(resp, "WWW-Authenticate", "Bearer");
    enum MHD_Result r = MHD_queue_response(c, (unsigned)e->http, resp);
    MHD_destroy_response(resp);
    api_metrics_http_error(srv->metrics, e->http);
    return r;
}

static enum MHD_Result send_err(api_server *srv, struct MHD_Connection *c, int http, const char *type,
                                const char *code, const char *param, const char *msg) {
    api_error e;
    api_error_set(&e, http, type, param, "%s", msg);
    e.code = code;
    return send_error(srv, c, &e);
}

/* ---- authentication -------------------------------------------------------------- */

static bool ct_equal(const char *a, size_t alen, const char *b, size_t blen) {
    /* constant time in the length of b (the secret) */
    unsigned char diff = (unsigned char)(alen != blen);
    for (size_t i = 0; i < blen; i++) diff |= (unsigned char)((i < alen ? a[i] : 0) ^ b[i]);
    return diff == 0;
}

static bool authorized(api_server *srv, struct MHD_Connection *c) {
    pthread_mutex_lock(&srv->cfg_mu);
    bool ok = true;
    if (srv->api_key && srv->api_key[0]) {
        const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
        ok = false;
        if (h && strncasecmp(h, "Bearer ", 7) == 0) {
            const char *k = h + 7;
            ok = ct_equal(k, strlen(k), srv->api_key, strlen(srv->api_key));
        }
    }
    pthread_mutex_unlock(&srv->cfg_mu);
    return ok;
}

/* ---- engine events ------------------------------------------------------------- */

static void resume_locked(api_req *r) {
    if (r->suspended && !r->gone) {
        r->suspended = false;
        MHD_resume_connection(r->conn);
    }
}

static const char *finish_name(eng_finish f, int status) {
    if (status == D2_ECANCELED) return "abort";
    switch (f) {
    case ENG_FINISH_STOP: return "stop";
    case ENG_FINISH_LENGTH: return "length";
    default: return "error";
    }
}

/* JSON has no -inf: a token the model gives probability 0 reports -9999, as
 * OpenAI does. */
static double json_lp(float lp) { return lp < -9999.0f || lp != lp ? -9999.0 : (double)lp; }

/* Token text for logprobs entries. */
static void add_token_str(buf *b, const eng_tokenizer *tok, int32_t id) {
    size_t n = 0;
    const char *p = eng_tok_piece(tok, id, &n);
    buf_json_str(b, p ? p : "", p ? n : 0);
}

static void add_token_bytes(buf *b, const eng_tokenizer *tok, int32_t id) {
    size_t n = 0;
    const char *p = eng_tok_piece(tok, id, &n);
    buf_add(b, "[", 1);
    for (size_t i = 0; p && i < n; i++) buf_fmt(b, i ? ",%u" : "%u", (unsigned char)p[i]);
    buf_add(b, "]", 1);
}

/* Logprobs JSON for entries [from, to) of a choice, in the shape of the route. */
static void add_logprobs(buf *b, const api_req *r, const api_choice *ch, int from, int to, size_t text_offset) {
    const eng_tokenizer *tok = r->srv->tok;
    if (r->params.logprobs < 0) { buf_str(b, "null"); return; }
    if (r->route == R_CHAT) {
        buf_str(b, "{\"content\":[");
        for (int i = from; i < to; i++) {
            const tok_lp *l = &ch->lps[i];
            buf_str(b, i > from ? ",{\"token\":" : "{\"token\":");
            add_token_str(b, tok, l->token);
            buf_fmt(b, ",\"logprob\":%.6g,\"bytes\":", json_lp(l->logprob));
            add_token_bytes(b, tok, l->token);
            buf_str(b, ",\"top_logprobs\":[");
            int nt = l->n_top < r->params.logprobs ? l->n_top : r->params.logprobs;
            for (int k = 0; k < nt; k++) {
                buf_str(b, k ? ",{\"token\":" : "{\"token\":");
                add_token_str(b, tok, l->top[k].token);
                buf_fmt(b, ",\"logprob\":%.6g,\"bytes\":", json_lp(l->top[k].logprob));
                add_token_bytes(b, tok, l->top[k].token);
                buf_str(b, "}");
            }
            buf_str(b, "]}");
        }
        buf_str(b, "]}");
        return;
    }
    buf_str(b, "{\"tokens\":[");
    for (int i = from; i < to; i++) {
        if (i > from) buf_str(b, ",");
        add_token_str(b, tok, ch->lps[i].token);
    }
    buf_str(b, "],\"token_logprobs\":[");
    for (int i = from; i < to; i++) buf_fmt(b, i > from ? ",%.6g" : "%.6g", json_lp(ch->lps[i].logprob));
    buf_str(b, "],\"top_logprobs\":[");
    for (int i = from; i < to; i++) {
        const tok_lp *l = &ch->lps[i];
        buf_str(b, i > from ? ",{" : "{");
        int nt = l->n_top < r->params.logprobs ? l->n_top : r->params.logprobs;
        for (int k = 0; k < nt; k++) {
            if (k) buf_str(b, ",");
            add_token_str(b, tok, l->top[k].token);
            buf_fmt(b, ":%.6g", json_lp(l->top[k].logprob));
        }
        buf_str(b, "}");
    }
    buf_str(b, "],\"text_offset\":[");
    size_t off = text_offset;
    for (int i = from; i < to; i++) {
        size_t n = 0;
        eng_tok_piece(tok, ch->lps[i].token, &n);
        buf_fmt(b, i > from ? ",%zu" : "%zu", off);
        off += n;
    }
    buf_str(b, "]}");
}

static void log_request(api_server *srv, api_req *r, const char *outcome);

static void sse_chunk_begin(api_req *r, buf *b) {
    buf_str(b, "data: {\"id\":\"");
    buf_str(b, r->id);
    buf_fmt(b, "\",\"object\":\"%s\",\"created\":%ld,\"model\":",
            r->route == R_CHAT ? "chat.completion.chunk" : "text_completion", r->created);
    buf_json_str(b, r->srv->model_name, strlen(r->srv->model_name));
    buf_str(b, ",\"choices\":[");
}

static void sse_chunk_end(api_req *r, buf *b) {
    buf_str(b, "]");
    if (r->params.include_usage) buf_str(b, ",\"usage\":null");
    buf_str(b, "}\n\n");
}

/* Queues a stream chunk carrying text[from, to) (and new logprobs) of a choice.
 * Caller holds r->mu. */
static void stream_delta(api_req *r, api_choice *ch, size_t from, size_t to, const char *finish) {
    buf *b = &r->sse;
    bool first = r->route == R_CHAT && !ch->role_sent;
    if (from == to && !finish && !first && ch->n_lps_sent == ch->n_lps) return;
    sse_chunk_begin(r, b);
    buf_fmt(b, "{\"index\":%d,", ch->index);
    if (r->route == R_CHAT) {
        if (finish && from == to) {
            buf_str(b, "\"delta\":{}");
        } else {
            buf_str(b, "\"delta\":{");
            if (first) buf_str(b, "\"role\":\"assistant\",");
            buf_str(b, "\"content\":");
            buf_json_str(b, ch->text.p ? ch->text.p + from : "", to - from);
            buf_str(b, "}");
        }
        ch->role_sent = true;
    } else {
        buf_str(b, "\"text\":");
        buf_json_str(b, ch->text.p ? ch->text.p + from : "", to - from);
    }
    buf_str(b, ",\"logprobs\":");
    if (r->params.logprobs >= 0 && ch->n_lps > ch->n_lps_sent) {
        add_logprobs(b, r, ch, ch->n_lps_sent, ch->n_lps, from);
        ch->n_lps_sent = ch->n_lps;
    } else {
        buf_str(b, "null");
    }
    buf_str(b, ",\"finish_reason\":");
    if (finish) buf_fmt(b, "\"%s\"}", finish);
    else buf_str(b, "null}");
    sse_chunk_end(r, b);
}

static void stream_close(api_req *r) {
    if (r->params.include_usage) {
        int completion = 0;
        for (int i = 0; i < r->n_choices; i++) completion += r->choices[i].n_tokens;
        buf_str(&r->sse, "data: {\"id\":\"");
        buf_str(&r->sse, r->id);
        buf_fmt(&r->sse, "\",\"object\":\"%s\",\"created\":%ld,\"model\":",
                r->route == R_CHAT ? "chat.completion.chunk" : "text_completion", r->created);
        buf_json_str(&r->sse, r->srv->model_name, strlen(r->srv->model_name));
        buf_fmt(&r->sse,
                ",\"choices\":[],\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n",
                r->prompt_tokens, completion, r->prompt_tokens + completion);
    }
    buf_str(&r->sse, "data: [DONE]\n\n");
    r->sse_closed = true;
}

static int on_event(void *user, const eng_event *ev) {
    api_choice *ch = user;
    api_req *r = ch->req;
    api_server *srv = r->srv;
    int stop = 0;
    pthread_mutex_lock(&r->mu);
    if (ev->type == ENG_EV_TOKEN) {
        double t = now_s();
        if (ch->n_tokens == 0) {
            ch->t_first = t;
            api_metrics_ttft(srv->metrics, t - r->t_start);
        } else {
            api_metrics_itl(srv->metrics, t - ch->t_last);
        }
        ch->t_last = t;
        ch->n_tokens++;
        if (ch->lps && ch->n_lps < r->params.max_tokens) {
            tok_lp *l = &ch->lps[ch->n_lps++];
            l->token = ev->token;
            l->logprob = ev->res->logprob;
            l->n_top = ev->res->n_top;
            memcpy(l->top, ev->res->top, sizeof(eng_token_logprob) * (size_t)ev->res->n_top);
        }
        char piece[512];
        int w = eng_tok_stream_feed(srv->tok, &ch->detok, ev->token, piece, sizeof piece);
        if (w > 0) buf_add(&ch->text, piece, (size_t)w);
        size_t partial = 0;
        long at = r->params.n_stop
                      ? api_find_stop(ch->text.p ? ch->text.p + ch->sent : "", ch->text.len - ch->sent,
                                      r->params.stop, r->params.n_stop, &partial)
                      : -1;
        if (at >= 0) {
            ch->text.len = ch->sent + (size_t)at;
            ch->text.p[ch->text.len] = '\0';
            stop = 1;
            partial = 0;
        }
        if (r->params.stream && !stop) {
            size_t upto = ch->text.len - partial;
            if (upto > ch->sent || ch->n_lps > ch->n_lps_sent || (r->route == R_CHAT && !ch->role_sent)) {
                stream_delta(r, ch, ch->sent, upto, NULL);
                ch->sent = upto;
                resume_locked(r);
            }
        }
    } else { /* DONE */
        char tail[64];
        int w = eng_tok_stream_finish(srv->tok, &ch->detok, tail, sizeof tail);
        if (w > 0 && ev->finish != ENG_FINISH_STOP) buf_add(&ch->text, tail, (size_t)w);
        ch->done = true;
        ch->status = ev->status;
        ch->finish_reason = finish_name(ev->finish, ev->status);
        if (ev->status != D2_OK && ev->status != D2_ECANCELED) {
            r->failed = true;
            r->fail_status = ev->status;
        }
        r->n_done++;
        api_metrics_request_done(srv->metrics, ch->finish_reason, now_s() - r->t_start, ev->n_preempted);
        if (r->params.stream) {
            stream_delta(r, ch, ch->sent, ch->text.len, ch->finish_reason);
            ch->sent = ch->text.len;
            if (r->n_done == r->n_choices) {
                stream_close(r);
                log_request(srv, r, r->failed ? "error" : r->gone ? "disconnected" : "ok");
            }
        }
        if (r->n_done == r->n_choices) resume_locked(r);
    }
    pthread_mutex_unlock(&r->mu);
    if (ev->type == ENG_EV_DONE) req_unref(r);
    return stop;
}

/* ---- request lifetime -------------------------------------------------------------- */

static void req_unref(api_req *r) {
    if (atomic_fetch_sub(&r->refs, 1) != 1) return;
    api_server *srv = r->srv;
    if (r->in_active) {
        pthread_mutex_lock(&srv->active_mu);
        if (r->prev) r->prev->next = r->next; else srv->active = r->next;
        if (r->next) r->next->prev = r->prev;
        pthread_mutex_unlock(&srv->active_mu);
        atomic_fetch_sub(&srv->in_flight, 1);
    }
    for (int i = 0; i < r->n_choices; i++) {
        free(r->choices[i].text.p);
        free(r->choices[i].lps);
    }
    free(r->choices);
    free(r->prompt_len);
    free(r->body.p);
    free(r->sse.p);
    if (r->has_params) api_gen_params_free(&r->params);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

static void cancel_all(api_req *r) {
    for (int i = 0; i < r->n_choices; i++)
        if (r->choices[i].submitted && !r->choices[i].done) eng_sched_cancel(r->srv->sched, r->choices[i].eng_id);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)c;
    api_req *r = *con_cls;
    if (!r) return;
    *con_cls = NULL;
    pthread_mutex_lock(&r->mu);
    r->gone = true;
    r->suspended = false;
    pthread_mutex_unlock(&r->mu);
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK) cancel_all(r); /* client gone: free its pages */
    req_unref(r);
}

/* ---- building a generation --------------------------------------------------------- */

static int ctx_error(api_error *err, int ctx, int n_prompt, int max_tokens) {
    api_error_set(err, 400, "invalid_request_error", "messages",
                  "This model's maximum context length is %d tokens. However, you requested %d tokens "
                  "(%d in the prompt, %d for the completion). Please reduce the prompt or max_tokens.",
                  ctx, n_prompt + max_tokens, n_prompt, max_tokens);
    return -1;
}

static int render_chat(api_server *srv, api_req *r, char **text, api_error *err) {
    json_t *ctx = json_object();
    json_object_set(ctx, "messages", r->params.messages);
    json_object_set_new(ctx, "add_generation_prompt", json_boolean(r->params.add_generation_prompt));
    json_object_set_new(ctx, "bos_token", json_string(srv->bos_text));
    json_object_set_new(ctx, "eos_token", json_string(srv->eos_text));
    if (r->params.tools) json_object_set(ctx, "tools", r->params.tools);
    char msg[512] = "";
    int rc = api_jinja_render(srv->chat_tmpl, ctx, text, NULL, msg, sizeof msg);
    json_decref(ctx);
    if (rc != D2_OK) {
        api_error_set(err, 400, "invalid_request_error", "messages", "chat template: %s", msg);
        return -1;
    }
    return 0;
}

/* Tokenises, checks limits, submits every choice. 0 or -1 with *err. */
static int start_generation(api_server *srv, api_req *r, api_error *err) {
    api_gen_params *p = &r->params;
    int ctx = eng_engine_ctx_len(srv->e);
    if (p->model && strcmp(p->model, srv->model_name) != 0) {
        api_error_set(err, 404, "not_found_error", "model", "The model '%s' does not exist; this server serves '%s'",
                      p->model, srv->model_name);
        err->code = "model_not_found";
        return -1;
    }
    int n_prompts = r->route == R_CHAT ? 1 : p->n_prompts;
    int32_t *ids[API_MAX_PROMPTS] = {0};
    int n_ids[API_MAX_PROMPTS] = {0};
    bool owned[API_MAX_PROMPTS] = {0};
    int rc = 0;
    for (int i = 0; i < n_prompts; i++) {
        if (r->route == R_CHAT) {
            char *text = NULL;
            if (render_chat(srv, r, &text, err)) { rc = -1; break; }
            size_t n = 0;
            int trc = eng_tok_encode(srv->tok, text, strlen(text), false, true, &ids[i], &n);
            free(text);
            if (trc != D2_OK) { api_error_set(err, 400, "invalid_request_error", "messages", "cannot tokenize: %s", d2_strerror(trc)); rc = -1; break; }
            n_ids[i] = (int)n;
            owned[i] = true;
        } else if (p->prompt_text[i]) {
            size_t n = 0;
            int trc = eng_tok_encode(srv->tok, p->prompt_text[i], strlen(p->prompt_text[i]), true, true, &ids[i], &n);
            if (trc != D2_OK) { api_error_set(err, 400, "invalid_request_error", "prompt", "cannot tokenize: %s", d2_strerror(trc)); rc = -1; break; }
            n_ids[i] = (int)n;
            owned[i] = true;
        } else {
            ids[i] = p->prompt_ids[i];
            n_ids[i] = p->prompt_n_ids[i];
        }
        if (n_ids[i] == 0) {
            api_error_set(err, 400, "invalid_request_error", r->route == R_CHAT ? "messages" : "prompt", "the prompt is empty");
            rc = -1;
            break;
        }
        int mt = p->max_tokens > 0 ? p->max_tokens : 1;
        if (n_ids[i] + (p->max_tokens > 0 ? mt : 1) > ctx) { rc = ctx_error(err, ctx, n_ids[i], mt); break; }
    }
    if (rc == 0) {
        if (p->max_tokens <= 0) {
            int longest = 0;
            for (int i = 0; i < n_prompts; i++) if (n_ids[i] > longest) longest = n_ids[i];
            pthread_mutex_lock(&srv->cfg_mu);
            int def = srv->cfg.default_max_tokens;
            pthread_mutex_unlock(&srv->cfg_mu);
            p->max_tokens = ctx - longest < def ? ctx - longest : def;
        }
        int nc = n_prompts * (p->n > 0 ? p->n : 1);
        if (nc < 1) nc = 1;
        r->n_choices = nc;
        r->choices = calloc((size_t)nc, sizeof *r->choices);
        r->prompt_len = calloc((size_t)(n_prompts > 0 ? n_prompts : 1), sizeof *r->prompt_len);
        if (!r->choices || !r->prompt_len) { api_error_set(err, 500, "internal_error", NULL, "out of memory"); rc = -1; }
    }
    if (rc == 0) {
        for (int i = 0; i < n_prompts; i++) {
            r->prompt_len[i] = n_ids[i];
            r->prompt_tokens += n_ids[i];
        }
        api_metrics_prompt_tokens(srv->metrics, r->prompt_tokens);
        for (int c = 0; c < r->n_choices; c++) {
            api_choice *ch = &r->choices[c];
            ch->req = r;
            ch->index = c;
            ch->prompt_index = c / p->n;
            eng_tok_stream_init(&ch->detok, true);
            if (p->logprobs >= 0) ch->lps = calloc((size_t)p->max_tokens, sizeof *ch->lps);
            if (buf_reserve(&ch->text, (size_t)p->max_tokens * 8 + 64)) { rc = -1; break; }
            /* The detokeniser sees the prompt first so the first generated
             * token's spacing is decoded as in the full text. */
            char sink[512];
            const int32_t *pid = ids[ch->prompt_index];
            int npid = n_ids[ch->prompt_index];
            for (int k = npid > 8 ? npid - 8 : 0; k < npid; k++)
                eng_tok_stream_feed(srv->tok, &ch->detok, pid[k], sink, sizeof sink);
            ch->detok.n_pending = 0;
            if (p->echo && r->route == R_COMPLETIONS) {
                char *ptxt = NULL;
                if (p->prompt_text[ch->prompt_index]) buf_str(&ch->text, p->prompt_text[ch->prompt_index]);
                else if (eng_tok_decode(srv->tok, pid, (size_t)npid, false, &ptxt) == D2_OK) buf_str(&ch->text, ptxt);
                free(ptxt);
            }
        }
        if (rc != 0) api_error_set(err, 500, "internal_error", NULL, "out of memory");
    }
    /* submit */
    for (int c = 0; rc == 0 && c < r->n_choices; c++) {
        api_choice *ch = &r->choices[c];
        eng_request q = {.prompt = ids[ch->prompt_index], .n_prompt = n_ids[ch->prompt_index],
                         .max_tokens = p->max_tokens, .ignore_eos = p->ignore_eos,
                         .on_event = on_event, .user = ch};
        eng_sample_params_default(&q.sample);
        q.sample.temperature = p->temperature;
        q.sample.top_p = p->top_p;
        q.sample.top_k = p->top_k;
        q.sample.min_p = p->min_p;
        q.sample.presence_penalty = p->presence_penalty;
        q.sample.frequency_penalty = p->frequency_penalty;
        q.sample.repetition_penalty = p->repetition_penalty;
        q.sample.has_seed = p->has_seed;
        q.sample.seed = p->seed + (uint64_t)c;
        q.sample.logit_bias = p->logit_bias;
        q.sample.n_logit_bias = p->n_logit_bias;
        q.sample.n_top_logprobs = p->logprobs > 0 ? p->logprobs : 0;
        q.want_logprobs = p->logprobs >= 0;
        q.kv = p->has_kv ? p->kv : srv->cfg.kv_default; /* kv_default is never reloaded */
        const char *why = NULL;
        atomic_fetch_add(&r->refs, 1);
        int src = eng_sched_submit(srv->sched, &q, &ch->eng_id, &why);
        if (src != D2_OK) {
            atomic_fetch_sub(&r->refs, 1);
            if (src == D2_EQUEUEFULL) { api_error_set(err, 429, "rate_limit_error", NULL, "the server is busy: the request queue is full; retry later"); err->code = "queue_full"; }
            else if (src == D2_EAGAIN) api_error_set(err, 503, "service_unavailable", NULL, "the server is shutting down");
            else if (src == D2_EKVFULL) api_error_set(err, 400, "invalid_request_error", "max_tokens", "the request needs more KV cache than the server has: %s", why ? why : "");
            else api_error_set(err, 400, "invalid_request_error", NULL, "%s", why ? why : d2_strerror(src));
            /* choices already submitted get cancelled; their DONE events drop their refs */
            pthread_mutex_lock(&r->mu);
            for (int k = c; k < r->n_choices; k++) { /* req_unref frees only the first n_choices */
                free(r->choices[k].text.p);
                free(r->choices[k].lps);
                r->choices[k] = (api_choice){0};
            }
            r->n_choices = c; /* only these exist for the engine */
            pthread_mutex_unlock(&r->mu);
            cancel_all(r);
            rc = -1;
            break;
        }
        ch->submitted = true;
    }
    for (int i = 0; i < n_prompts; i++) if (owned[i]) free(ids[i]);
    return rc;
}

/* Whole (non-streamed) response, built once every choice is done. */
static enum MHD_Result send_final(api_server *srv, api_req *r) {
    if (r->failed) {
        return send_err(srv, r->conn, 500, "internal_error", NULL, NULL, d2_strerror(r->fail_status));
    }
    for (int i = 0; i < r->n_choices; i++) {
        /* A deadline is an error; a drain's cancel-all (api.h) answers with
         * what was generated, finish_reason "abort". */
        if (r->choices[i].status == D2_ECANCELED && atomic_load(&r->timed_out))
            return send_err(srv, r->conn, 503, "timeout_error", "timeout", NULL, "the request timed out");
    }
    buf b = {0};
    buf_str(&b, "{\"id\":\"");
    buf_str(&b, r->id);
    buf_fmt(&b, "\",\"object\":\"%s\",\"created\":%ld,\"model\":", r->route == R_CHAT ? "chat.completion" : "text_completion", r->created);
    buf_json_str(&b, srv->model_name, strlen(srv->model_name));
    buf_str(&b, ",\"choices\":[");
    int completion = 0;
    for (int i = 0; i < r->n_choices; i++) {
        api_choice *ch = &r->choices[i];
        completion += ch->n_tokens;
        buf_fmt(&b, "%s{\"index\":%d,", i ? "," : "", i);
        if (r->route == R_CHAT) {
            buf_str(&b, "\"message\":{\"role\":\"assistant\",\"content\":");
            buf_json_str(&b, ch->text.p ? ch->text.p : "", ch->text.len);
            buf_str(&b, "}");
        } else {
            buf_str(&b, "\"text\":");
            buf_json_str(&b, ch->text.p ? ch->text.p : "", ch->text.len);
        }
        buf_str(&b, ",\"logprobs\":");
        add_logprobs(&b, r, ch, 0, ch->n_lps, 0);
        buf_fmt(&b, ",\"finish_reason\":\"%s\"}", ch->finish_reason ? ch->finish_reason : "stop");
    }
    buf_fmt(&b, "],\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}}",
            r->prompt_tokens, completion, r->prompt_tokens + completion);
    enum MHD_Result res = send_text(r->conn, 200, "application/json", b.p, b.len);
    free(b.p);
    return res;
}

static ssize_t sse_reader(void *cls, uint64_t pos, char *out, size_t max) {
    (void)pos;
    api_req *r = cls;
    pthread_mutex_lock(&r->mu);
    size_t avail = r->sse.len - r->sse_off;
    if (avail == 0) {
        if (r->sse_closed) {
            pthread_mutex_unlock(&r->mu);
            return MHD_CONTENT_READER_END_OF_STREAM;
        }
        r->suspended = true;
        MHD_suspend_connection(r->conn);
        pthread_mutex_unlock(&r->mu);
        return 0;
    }
    size_t n = avail < max ? avail : max;
    memcpy(out, r->sse.p + r->sse_off, n);
    r->sse_off += n;
    if (r->sse_off == r->sse.len) { r->sse.len = 0; r->sse_off = 0; }
    pthread_mutex_unlock(&r->mu);
    return (ssize_t)n;
}

static void log_request(api_server *srv, api_req *r, const char *outcome) {
    pthread_mutex_lock(&srv->cfg_mu);
    bool on = srv->cfg.log_requests;
    pthread_mutex_unlock(&srv->cfg_mu);
    if (!on) return;
    int completion = 0;
    double ttft = 0;
    for (int i = 0; i < r->n_choices; i++) {
        completion += r->choices[i].n_tokens;
        if (r->choices[i].t_first > 0 && (ttft == 0 || r->choices[i].t_first - r->t_start < ttft))
            ttft = r->choices[i].t_first - r->t_start;
    }
    D2_INFO("request %s %s n=%d prompt_tokens=%d completion_tokens=%d ttft=%.3fs total=%.3fs outcome=%s", r->id,
            r->route == R_CHAT ? "chat" : "completions", r->n_choices, r->prompt_tokens, completion, ttft,
            now_s() - r->t_start, outcome);
}

static enum MHD_Result handle_generation(api_server *srv, api_req *r) {
    if (!r->has_params) {
        if (atomic_load(&srv->draining) || !atomic_load(&srv->ready))
            return send_err(srv, r->conn, 503, "service_unavailable", NULL, NULL, "the server is not accepting requests");
        const eng_model_config *mc = &eng_engine_model(srv->e)->cfg;
        pthread_mutex_lock(&srv->cfg_mu);
        api_limits lim = {.max_n = srv->cfg.max_n, .max_tokens_limit = srv->cfg.max_tokens_limit, .n_vocab = mc->vocab_size,
                          .n_layers = mc->n_layers};
        double timeout = srv->cfg.request_timeout_s;
        pthread_mutex_unlock(&srv->cfg_mu);
        api_error err;
        if (api_parse_gen(r->body.p ? r->body.p : "", r->body.len, r->route == R_CHAT ? API_CHAT : API_COMPLETIONS, &lim,
                          &r->params, &err) != D2_OK)
            return send_error(srv, r->conn, &err);
        r->has_params = true;
        snprintf(r->id, sizeof r->id, "%s-%016llx", r->route == R_CHAT ? "chatcmpl" : "cmpl",
                 ((unsigned long long)atomic_fetch_add(&srv->next_req, 1) + 1) * 0x9e3779b97f4a7c15ULL ^
                     (unsigned long long)time(NULL));
        r->created = (long)time(NULL);
        r->deadline = timeout > 0 ? r->t_start + timeout : 0;
        pthread_mutex_lock(&srv->active_mu);
        r->next = srv->active;
        if (srv->active) srv->active->prev = r;
        srv->active = r;
        r->in_active = true;
        pthread_mutex_unlock(&srv->active_mu);
        atomic_fetch_add(&srv->in_flight, 1);
        if (start_generation(srv, r, &err) != 0) {
            log_request(srv, r, "rejected");
            return send_error(srv, r->conn, &err);
        }
        if (r->params.stream) {
            struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, sse_reader, r, NULL);
            if (!resp) return MHD_NO;
            MHD_add_response_header(resp, "Content-Type", "text/event-stream");
            MHD_add_response_header(resp, "Cache-Control", "no-cache");
            enum MHD_Result res = MHD_queue_response(r->conn, 200, resp);
            MHD_destroy_response(resp);
            r->responded = true;
            return res;
        }
        pthread_mutex_lock(&r->mu);
        if (r->n_done < r->n_choices) {
            r->suspended = true;
            MHD_suspend_connection(r->conn);
            pthread_mutex_unlock(&r->mu);
            return MHD_YES;
        }
        pthread_mutex_unlock(&r->mu);
    }
    if (r->responded) return MHD_YES;
    pthread_mutex_lock(&r->mu);
    bool done = r->n_done == r->n_choices;
    if (!done) { /* spurious wake-up */
        r->suspended = true;
        MHD_suspend_connection(r->conn);
    }
    pthread_mutex_unlock(&r->mu);
    if (!done) return MHD_YES;
    r->responded = true;
    log_request(srv, r, r->failed ? "error" : "ok");
    return send_final(srv, r);
}

/* ---- other routes ---------------------------------------------------------------- */

static enum MHD_Result handle_models(api_server *srv, struct MHD_Connection *c) {
    json_t *m = json_pack("{s:s, s:s, s:I, s:s, s:i}", "id", srv->model_name, "object", "model", "created",
                          (json_int_t)time(NULL), "owned_by", "d2od", "max_model_len", eng_engine_ctx_len(srv->e));
    return send_json(c, 200, json_pack("{s:s, s:[o]}", "object", "list", "data", m));
}

static enum MHD_Result handle_tokenize(api_server *srv, api_req *r, bool detok) {
    json_error_t jerr;
    json_t *root = json_loadb(r->body.p ? r->body.p : "", r->body.len, 0, &jerr);
    api_error err;
    if (!root || !json_is_object(root)) {
        json_decref(root);
        api_error_set(&err, 400, "invalid_request_error", NULL, "the request body must be a JSON object");
        return send_error(srv, r->conn, &err);
    }
    enum MHD_Result res;
    if (!detok) {
        json_t *pr = json_object_get(root, "prompt");
        if (!pr) pr = json_object_get(root, "text");
        json_t *as = json_object_get(root, "add_special_tokens");
        if (!json_is_string(pr) || (as && !json_is_boolean(as))) {
            json_decref(root);
            api_error_set(&err, 400, "invalid_request_error", "prompt", "'prompt' must be a string");
            return send_error(srv, r->conn, &err);
        }
        int32_t *ids = NULL;
        size_t n = 0;
        int rc = eng_tok_encode(srv->tok, json_string_value(pr), json_string_length(pr), as ? json_is_true(as) : true, true, &ids, &n);
        if (rc != D2_OK) {
            json_decref(root);
            api_error_set(&err, 400, "invalid_request_error", "prompt", "cannot tokenize: %s", d2_strerror(rc));
            return send_error(srv, r->conn, &err);
        }
        json_t *arr = json_array();
        for (size_t i = 0; i < n; i++) json_array_append_new(arr, json_integer(ids[i]));
        free(ids);
        res = send_json(r->conn, 200, json_pack("{s:o, s:i, s:i}", "tokens", arr, "count", (int)n, "max_model_len",
                                                eng_engine_ctx_len(srv->e)));
    } else {
        json_t *toks = json_object_get(root, "tokens");
        int nv = eng_tok_n_vocab(srv->tok);
        size_t n = json_array_size(toks);
        int32_t *ids = malloc(sizeof(int32_t) * (n ? n : 1));
        bool ok = json_is_array(toks) && ids;
        for (size_t i = 0; ok && i < n; i++) {
            json_t *v = json_array_get(toks, i);
            ok = json_is_integer(v) && json_integer_value(v) >= 0 && json_integer_value(v) < nv;
            if (ok) ids[i] = (int32_t)json_integer_value(v);
        }
        char *text = NULL;
        if (!ok || eng_tok_decode(srv->tok, ids, n, false, &text) != D2_OK) {
            free(ids);
            json_decref(root);
            api_error_set(&err, 400, "invalid_request_error", "tokens", "'tokens' must be a list of token ids in [0, %d)", nv);
            return send_error(srv, r->conn, &err);
        }
        free(ids);
        res = send_json(r->conn, 200, json_pack("{s:s}", "prompt", text));
        free(text);
    }
    json_decref(root);
    return res;
}

static enum MHD_Result handle_metrics(api_server *srv, struct MHD_Connection *c) {
    buf b = {0};
    eng_sched_stats ss = eng_sched_get_stats(srv->sched);
    eng_pool_stats ps = eng_engine_pool_stats(srv->e);
    char *text = api_metrics_render(srv->metrics, &ss, &ps, srv->model_name);
    if (text) buf_str(&b, text);
    free(text);
    enum MHD_Result r = send_text(c, 200, "text/plain; version=0.0.4", b.p ? b.p : "", b.len);
    free(b.p);
    return r;
}

/* ---- dispatch ---------------------------------------------------------------------- */

static enum route route_of(const char *url, const char *method, bool *method_ok) {
    struct { const char *url; const char *method; enum route r; } table[] = {
        {"/v1/completions", "POST", R_COMPLETIONS}, {"/v1/chat/completions", "POST", R_CHAT},
        {"/v1/models", "GET", R_MODELS},           {"/health", "GET", R_HEALTH},
        {"/metrics", "GET", R_METRICS},            {"/tokenize", "POST", R_TOKENIZE},
        {"/detokenize", "POST", R_DETOKENIZE},
        {"/", "GET", R_UI},                         {"/status", "GET", R_STATUS}, /* api/ui.c */
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (strcmp(url, table[i].url) == 0) {
            *method_ok = strcmp(method, table[i].method) == 0;
            return table[i].r;
        }
    }
    *method_ok = false;
    return R_NONE;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_size, void **con_cls) {
    (void)version;
    api_server *srv = cls;
    api_req *r = *con_cls;
    if (!r) {
        r = calloc(1, sizeof *r);
        if (!r) return MHD_NO;
        r->srv = srv;
        r->conn = c;
        pthread_mutex_init(&r->mu, NULL);
        atomic_init(&r->refs, 1);
        r->t_start = now_s();
        bool method_ok;
        r->route = route_of(url, method, &method_ok);
        *con_cls = r;
        if (r->route == R_NONE)
            return send_err(srv, c, 404, "not_found_error", "not_found", NULL, "unknown route");
        if (!method_ok)
            return send_err(srv, c, 405, "invalid_request_error", "method_not_allowed", NULL, "method not allowed for this route");
        pthread_mutex_lock(&srv->cfg_mu);
        /* The page itself holds no data (a browser cannot send a bearer header
         * when it navigates); everything it shows comes from guarded routes. */
        bool open_route = ((r->route == R_HEALTH || r->route == R_METRICS) && !srv->cfg.auth_health_metrics) ||
                          r->route == R_UI;
        size_t limit = srv->cfg.body_limit;
        pthread_mutex_unlock(&srv->cfg_mu);
        if (!open_route && !authorized(srv, c)) {
            api_error e;
            api_error_set(&e, 401, "authentication_error", NULL, "missing or invalid API key (send 'Authorization: Bearer <key>')");
            e.code = "invalid_api_key";
            return send_error(srv, c, &e);
        }
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > limit) {
            char msg[128];
            snprintf(msg, sizeof msg, "the request body is larger than the limit of %zu bytes", limit);
            return send_err(srv, c, 413, "invalid_request_error", "request_too_large", NULL, msg);
        }
        return MHD_YES;
    }
    if (r->responded && r->params.stream) return MHD_YES;
    if (*upload_size) {
        pthread_mutex_lock(&srv->cfg_mu);
        size_t limit = srv->cfg.body_limit;
        pthread_mutex_unlock(&srv->cfg_mu);
        if (r->body.len + *upload_size > limit) r->too_large = true;
        else buf_add(&r->body, upload_data, *upload_size);
        *upload_size = 0;
        return MHD_YES;
    }
    if (r->too_large) {
        char msg[128];
        snprintf(msg, sizeof msg, "the request body is larger than the limit of %zu bytes", srv->cfg.body_limit);
        return send_err(srv, c, 413, "invalid_request_error", "request_too_large", NULL, msg);
    }
    switch (r->route) {
    case R_COMPLETIONS:
    case R_CHAT: return handle_generation(srv, r);
    case R_MODELS: return handle_models(srv, c);
    case R_HEALTH:
        if (!atomic_load(&srv->ready) || atomic_load(&srv->draining))
            return send_err(srv, c, 503, "service_unavailable", NULL, NULL, "not ready");
        return send_text(c, 200, "application/json", "{\"status\":\"ok\"}", 15);
    case R_METRICS: return handle_metrics(srv, c);
    case R_TOKENIZE: return handle_tokenize(srv, r, false);
    case R_DETOKENIZE: return handle_tokenize(srv, r, true);
    case R_UI: {
        size_t len = 0;
        const char *page = api_ui_page(&len);
        return send_text(c, 200, "text/html; charset=utf-8", page, len);
    }
    case R_STATUS: {
        const char *since = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "since");
        char *j = api_status_json(srv->e, srv->sched, srv->model_name, since ? strtoull(since, NULL, 10) : 0);
        if (!j) return send_err(srv, c, 500, "internal_error", NULL, NULL, "out of memory");
        enum MHD_Result res = send_text(c, 200, "application/json", j, strlen(j));
        free(j);
        return res;
    }
    default: return MHD_NO;
    }
}

/* ---- lifecycle ----------------------------------------------------------------------- */

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

int api_server_create(const api_config *cfg, eng_engine *e, eng_sched *s, api_server **out) {
    *out = NULL;
    api_server *srv = calloc(1, sizeof *srv);
    if (!srv) return D2_ENOMEM;
    srv->cfg = *cfg;
    srv->api_key = dup_or_null(cfg->api_key);
    srv->host = strdup(cfg->host ? cfg->host : "127.0.0.1");
    srv->model_name = strdup(cfg->served_model_name ? cfg->served_model_name : "d2od");
    srv->cfg.api_key = NULL;
    srv->cfg.host = NULL;
    srv->cfg.served_model_name = NULL;
    srv->cfg.chat_template = NULL;
    pthread_mutex_init(&srv->cfg_mu, NULL);
    pthread_mutex_init(&srv->active_mu, NULL);
    srv->e = e;
    srv->sched = s;
    srv->tok = eng_engine_tokenizer(e);
    if (!srv->tok) {
        D2_ERROR("api: the model has no tokenizer; cannot serve text");
        api_server_destroy(srv);
        return D2_EUNSUPPORTED;
    }
    size_t n = 0;
    int bos = eng_tok_bos(srv->tok), eos = eng_tok_eos(srv->tok);
    const char *pb = bos >= 0 ? eng_tok_piece(srv->tok, bos, &n) : NULL;
    snprintf(srv->bos_text, sizeof srv->bos_text, "%.*s", pb ? (int)n : 0, pb ? pb : "");
    const char *pe = eos >= 0 ? eng_tok_piece(srv->tok, eos, &n) : NULL;
    snprintf(srv->eos_text, sizeof srv->eos_text, "%.*s", pe ? (int)n : 0, pe ? pe : "");
    const char *tmpl = cfg->chat_template ? cfg->chat_template : eng_engine_model(e)->chat_template;
    if (!tmpl) {
        D2_WARN("api: the model has no chat template; chat requests use ChatML");
        tmpl = DEFAULT_CHAT_TEMPLATE;
    }
    char msg[256];
    if (api_jinja_compile(tmpl, &srv->chat_tmpl, msg, sizeof msg) != D2_OK) {
        D2_ERROR("api: the chat template does not compile: %s", msg);
        api_server_destroy(srv);
        return D2_ECONFIG;
    }
    if (api_metrics_create(&srv->metrics) != D2_OK) {
        api_server_destroy(srv);
        return D2_ENOMEM;
    }
    *out = srv;
    return D2_OK;
}

int api_server_start(api_server *srv) {
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)srv->cfg.port);
    if (inet_pton(AF_INET, srv->host, &addr.sin_addr) != 1) {
        D2_ERROR("api: host '%s' is not an IPv4 address", srv->host);
        return D2_ECONFIG;
    }
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ITC |
                     MHD_USE_ERROR_LOG;
    srv->mhd = MHD_start_daemon(flags, (uint16_t)srv->cfg.port, NULL, NULL, on_request, srv,
                                MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
                                MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
                                MHD_OPTION_CONNECTION_LIMIT, (unsigned)4096,
                                MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)600,
                                MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned)1,
                                MHD_OPTION_END);
    if (!srv->mhd) {
        D2_ERROR("api: cannot listen on %s:%d", srv->host, srv->cfg.port);
        return D2_EIO;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(srv->mhd, MHD_DAEMON_INFO_BIND_PORT);
    srv->port = info ? info->port : srv->cfg.port;
    return D2_OK;
}

int api_server_port(const api_server *srv) { return srv->port; }
void api_server_set_ready(api_server *srv, bool ready) { atomic_store(&srv->ready, ready); }
void api_server_drain(api_server *srv) { atomic_store(&srv->draining, true); }
int api_server_in_flight(const api_server *srv) { return atomic_load(&((api_server *)srv)->in_flight); }

/* True when the client of a suspended request has closed its connection.
 * libmicrohttpd does not poll suspended connections, so without this a
 * non-streamed request (or a stream waiting for its first token) whose client
 * left would run to max_tokens holding its pages. A peek that reads 0 bytes
 * is an orderly close; ECONNRESET and the like are gone too; data (a
 * pipelined request) or EAGAIN mean the client is still there. The caller
 * holds r->mu, so the connection cannot be freed meanwhile (on_completed sets
 * r->gone under it first). */
static bool client_left_locked(api_req *r) {
    if (!r->suspended || r->gone) return false;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return false;
    char c;
    ssize_t n = recv(ci->connect_fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

void api_server_tick(api_server *srv) {
    double t = now_s();
    pthread_mutex_lock(&srv->active_mu);
    for (api_req *r = srv->active; r; r = r->next) {
        if (r->deadline > 0 && t > r->deadline) {
            r->deadline = 0;
            atomic_store(&r->timed_out, true);
            cancel_all(r);
            continue;
        }
        pthread_mutex_lock(&r->mu);
        bool left = client_left_locked(r);
        pthread_mutex_unlock(&r->mu);
        if (left) cancel_all(r);
    }
    pthread_mutex_unlock(&srv->active_mu);
}

void api_server_cancel_all(api_server *srv) {
    pthread_mutex_lock(&srv->active_mu);
    for (api_req *r = srv->active; r; r = r->next) cancel_all(r);
    pthread_mutex_unlock(&srv->active_mu);
}

void api_server_update_config(api_server *srv, const api_config *cfg) {
    pthread_mutex_lock(&srv->cfg_mu);
    srv->cfg.log_requests = cfg->log_requests;
    srv->cfg.max_n = cfg->max_n;
    srv->cfg.max_tokens_limit = cfg->max_tokens_limit;
    srv->cfg.default_max_tokens = cfg->default_max_tokens;
    srv->cfg.request_timeout_s = cfg->request_timeout_s;
    srv->cfg.body_limit = cfg->body_limit;
    srv->cfg.auth_health_metrics = cfg->auth_health_metrics;
    free(srv->api_key);
    srv->api_key = dup_or_null(cfg->api_key);
    pthread_mutex_unlock(&srv->cfg_mu);
}

void api_server_destroy(api_server *srv) {
    if (!srv) return;
    if (srv->mhd) MHD_stop_daemon(srv->mhd);
    api_jinja_free(srv->chat_tmpl);
    api_metrics_destroy(srv->metrics);
    pthread_mutex_destroy(&srv->cfg_mu);
    pthread_mutex_destroy(&srv->active_mu);
    free(srv->api_key);
    free(srv->host);
    free(srv->model_name);
    free(srv);
}
