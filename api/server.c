/*
 * api/server.c — the HTTP server: routing, authentication, framing checks,
 * body limits, connection deadlines, OpenAI completions/chat (streamed and
 * not), models, health, tokenize, detokenize, and the bridge between
 * libmicrohttpd and the scheduler.
 *
 * Threads:
 *   - libmicrohttpd's polling thread runs the access handler, content readers
 *     and the formatting of responses (api/sse.c). A request waiting for a
 *     worker or the engine is suspended; nothing blocks.
 *   - A small pool of preparation workers renders chat templates, tokenises
 *     prompts and submits to the scheduler (a long prompt takes seconds to
 *     tokenise; on the HTTP thread it stalled every other client, /health too).
 *   - The engine thread calls on_event() for each token: it detokenises,
 *     matches stop strings and writes ids, text bytes and logprob numbers into
 *     the choice's preallocated buffers, publishes the counts, and resumes
 *     the connection (api/gen.h). No allocation, JSON or metrics lock there.
 *   - The main loop calls api_server_tick(): deadlines, clients that left,
 *     connections past their header/body deadline.
 * Lifetime of a request (api_req): one reference for the HTTP connection
 * (dropped in the request-completed callback), one per engine submission
 * (dropped at its DONE event) and one while a worker holds it; freed, logged
 * and counted when the count reaches zero.
 * Suspend/resume protocol: both happen under req->mu, and resume is only
 * called when the flag says the connection is suspended, so a resume can
 * never precede its suspend; whoever suspends re-checks for work under the
 * lock first, so no wake-up is lost.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "api/gen.h"
#include "api/internal.h"
#include "api/jinja/jinja.h"
#include "api/metrics.h"
#include "common/log.h"
#include "common/status.h"
#include "common/util.h"

/* ChatML, used when neither the model nor the configuration gives a template
 * (as llama.cpp's server does). */
static const char *const DEFAULT_CHAT_TEMPLATE =
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/* Connection policy (README "Connections"). A connection without a request
 * in progress (new, or keep-alive between requests) is closed after
 * IDLE_DEADLINE_S whether or not bytes trickle in (slowloris); a request's
 * body must arrive within BODY_DEADLINE_S of its headers; one client address
 * holds at most PER_IP_LIMIT connections; requests waiting for the engine
 * are never timed out by these (their own deadline is request_timeout_s). */
#define IDLE_DEADLINE_S 10.0
#define BODY_DEADLINE_S 60.0
#define PER_IP_LIMIT 256
#define MAX_CONNECTIONS 4096
#define MAX_URL_BYTES 8192
#define MAX_HEADER_BYTES 32768
#define PREP_WORKERS 2

/* ---- server ------------------------------------------------------------------- */

typedef struct conn_track {
    struct MHD_Connection *c;
    int fd;
    double t_idle_since;     /* when it last had no request in progress */
    double t_request;        /* headers of the current request received */
    bool in_request, body_done, killed;
    struct conn_track *next, *prev;
} conn_track;

struct api_server {
    api_config cfg;
    char *api_key, *model_name, *host;
    pthread_mutex_t cfg_mu;
    atomic_bool log_requests;
    eng_engine *e;
    eng_sched *sched;
    const eng_tokenizer *tok;
    size_t max_piece;        /* longest token piece in bytes */
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
    long created;            /* /v1/models "created": when the server was created */
    /* preparation workers */
    pthread_mutex_t prep_mu;
    pthread_cond_t prep_cv;
    api_req *prep_head, *prep_tail;
    bool prep_stop;
    pthread_t prep_th[PREP_WORKERS];
    int n_prep;
    /* connections (header/body deadlines) */
    pthread_mutex_t conn_mu;
    conn_track *conns;
};

static void req_unref(api_req *r);
static void cancel_all(api_req *r);

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

static enum MHD_Result send_error_ex(api_server *srv, struct MHD_Connection *c, const api_error *e, bool close_conn) {
    char *s = api_error_json(e);
    if (!s) return MHD_NO;
    struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(s), s, MHD_RESPMEM_MUST_FREE);
    if (!resp) { free(s); return MHD_NO; }
    MHD_add_response_header(resp, "Content-Type", "application/json");
    if (e->http == 401) MHD_add_response_header(resp, "WWW-Authenticate", "Bearer");
    if (close_conn) MHD_add_response_header(resp, "Connection", "close");
    enum MHD_Result r = MHD_queue_response(c, (unsigned)e->http, resp);
    MHD_destroy_response(resp);
    api_metrics_http_error(srv->metrics, e->http);
    return r;
}

static enum MHD_Result send_error(api_server *srv, struct MHD_Connection *c, const api_error *e) {
    return send_error_ex(srv, c, e, false);
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

/* ---- engine events (engine thread) ----------------------------------------------- */

static void resume_locked(api_req *r) {
    if (r->suspended && !r->gone) {
        r->suspended = false;
        MHD_resume_connection(r->conn);
    }
}

/* Runs on the engine thread: records, publishes, wakes. Allocates nothing,
 * formats nothing; the only lock is the request's own, held for the resume. */
static int on_event(void *user, const eng_event *ev) {
    api_choice *ch = user;
    api_req *r = ch->req;
    api_server *srv = r->srv;
    int stop = 0;
    if (ev->type == ENG_EV_TOKEN) {
        int n = atomic_load_explicit(&ch->n_tok, memory_order_relaxed);
        if (n >= ch->max_tokens) return 1; /* cannot happen: the engine stops at max_tokens */
        double t = now_s();
        ch->toks[n].token = ev->token;
        ch->toks[n].dt = (float)(t - (n == 0 ? r->t_start : ch->t_last));
        ch->t_last = t;
        if (ch->lps) {
            api_lp *l = &ch->lps[n];
            l->logprob = ev->res->logprob;
            l->n_top = ev->res->n_top;
            memcpy(l->top, ev->res->top, sizeof(eng_token_logprob) * (size_t)ev->res->n_top);
        }
        size_t room = ch->text_cap - ch->text_len;
        size_t before = ch->text_len;
        int w = room > 1 ? eng_tok_stream_feed(srv->tok, &ch->detok, ev->token, ch->text + ch->text_len, room) : D2_ERANGE;
        if (w > 0) ch->text_len += (size_t)w;
        else if (w == D2_ERANGE) stop = 1; /* the text buffer is sized for the worst case: never */
        size_t partial = 0;
        if (r->params.n_stop && w > 0) {
            /* Only the generated text, never the echoed prompt; and only the
             * window a match must overlap: it ends in the new bytes. */
            size_t maxstop = 0;
            for (int i = 0; i < r->params.n_stop; i++) {
                size_t l = strlen(r->params.stop[i]);
                if (l > maxstop) maxstop = l;
            }
            size_t from = before + 1 > maxstop ? before + 1 - maxstop : 0;
            if (from < ch->gen_start) from = ch->gen_start;
            long at = api_find_stop(ch->text + from, ch->text_len - from, r->params.stop, r->params.n_stop, &partial);
            if (at >= 0) {
                ch->text_len = from + (size_t)at;
                stop = 1;
                partial = 0;
            }
        }
        if (r->params.stream && !stop &&
            n + 1 - atomic_load_explicit(&ch->tok_sent, memory_order_relaxed) > API_STREAM_MAX_LAG) {
            ch->overrun = true; /* the client is not reading: end it (logged when the request ends) */
            stop = 1;
        }
        ch->toks[n].text_end = (uint32_t)ch->text_len;
        atomic_store_explicit(&ch->safe_len, ch->text_len - partial, memory_order_release);
        atomic_store_explicit(&ch->n_tok, n + 1, memory_order_release);
        if (r->params.stream) {
            pthread_mutex_lock(&r->mu);
            resume_locked(r);
            pthread_mutex_unlock(&r->mu);
        }
        return stop;
    }
    /* DONE */
    if (ev->finish != ENG_FINISH_STOP && ch->text_cap - ch->text_len > 1) {
        int w = eng_tok_stream_finish(srv->tok, &ch->detok, ch->text + ch->text_len, ch->text_cap - ch->text_len);
        if (w > 0) ch->text_len += (size_t)w;
    }
    ch->finish = ev->finish;
    ch->status = ev->status;
    ch->n_preempted = ev->n_preempted;
    atomic_store_explicit(&ch->safe_len, ch->text_len, memory_order_release);
    atomic_store_explicit(&ch->done, true, memory_order_release);
    pthread_mutex_lock(&r->mu);
    if (ev->status != D2_OK && ev->status != D2_ECANCELED) {
        r->failed = true;
        r->fail_status = ev->status;
    }
    r->n_done++;
    if (r->params.stream || r->n_done == r->n_choices) resume_locked(r);
    pthread_mutex_unlock(&r->mu);
    req_unref(r);
    return 0;
}

/* ---- request lifetime -------------------------------------------------------------- */

static const char *outcome_of(const api_req *r) {
    if (!r->has_params || r->prep_rc != 0 || !r->choices) return "rejected";
    if (r->failed) return "error";
    if (atomic_load(&((api_req *)r)->timed_out)) return "timeout";
    bool overrun = false, cancelled = false;
    for (int i = 0; i < r->n_choices; i++) {
        overrun |= r->choices[i].overrun;
        cancelled |= r->choices[i].status == D2_ECANCELED;
    }
    if (overrun || r->stalled) return "client_not_reading";
    if (atomic_load(&((api_req *)r)->client_gone) || (r->gone && !r->responded)) return "disconnected";
    if (atomic_load(&((api_req *)r)->drained) || cancelled) return "aborted";
    return "ok";
}

/* One line per generation request, when it is over on both sides (so every
 * request is logged exactly once, with its true outcome), and its metrics. */
static void finish_request(api_server *srv, api_req *r) {
    if (r->route != R_COMPLETIONS && r->route != R_CHAT) return;
    if (!r->has_params) return;
    double total = now_s() - r->t_start;
    int completion = 0;
    double ttft = 0;
    for (int i = 0; i < r->n_choices; i++) {
        api_choice *ch = &r->choices[i];
        int n = atomic_load(&ch->n_tok);
        completion += n;
        if (n > 0 && (ttft == 0 || ch->toks[0].dt < ttft)) ttft = ch->toks[0].dt;
        if (n > 0) api_metrics_token_times(srv->metrics, &ch->toks[0].dt, sizeof(api_tok), n);
        if (ch->submitted && atomic_load(&ch->done))
            api_metrics_request_done(srv->metrics, api_finish_name(r, ch), total, ch->n_preempted);
    }
    if (!atomic_load(&srv->log_requests)) return;
    D2_INFO("request %s %s n=%d prompt_tokens=%d completion_tokens=%d ttft=%.3fs total=%.3fs outcome=%s", r->id,
            r->route == R_CHAT ? "chat" : "completions", r->n_choices, r->prompt_tokens, completion, ttft, total,
            outcome_of(r));
}

static void req_unref(api_req *r) {
    if (atomic_fetch_sub(&r->refs, 1) != 1) return;
    api_server *srv = r->srv;
    finish_request(srv, r);
    if (r->in_active) {
        pthread_mutex_lock(&srv->active_mu);
        if (r->prev) r->prev->next = r->next; else srv->active = r->next;
        if (r->next) r->next->prev = r->prev;
        pthread_mutex_unlock(&srv->active_mu);
        atomic_fetch_sub(&srv->in_flight, 1);
    }
    for (int i = 0; i < r->n_choices; i++) {
        free(r->choices[i].text);
        free(r->choices[i].toks);
        free(r->choices[i].lps);
    }
    free(r->choices);
    free(r->body.p);
    free(r->out.p);
    free(r->prep_body);
    if (r->has_params) api_gen_params_free(&r->params);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

static void cancel_all(api_req *r) {
    for (int i = 0; i < r->n_choices; i++)
        if (r->choices[i].submitted && !atomic_load(&r->choices[i].done))
            eng_sched_cancel(r->srv->sched, r->choices[i].eng_id);
}

static conn_track *track_of(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    api_server *srv = cls;
    conn_track *t = track_of(c);
    if (t) {
        pthread_mutex_lock(&srv->conn_mu);
        t->in_request = false;
        t->body_done = false;
        t->t_idle_since = now_s();
        pthread_mutex_unlock(&srv->conn_mu);
    }
    api_req *r = *con_cls;
    if (!r) return;
    *con_cls = NULL;
    pthread_mutex_lock(&r->mu);
    r->gone = true;
    r->suspended = false;
    /* while a worker still submits, the choices are its own: it cancels them itself when it sees gone */
    bool preparing = r->prep_queued && !r->prep_done;
    pthread_mutex_unlock(&r->mu);
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && !preparing) { /* client gone: free its pages */
        /* a response nobody read for IDLE_DEADLINE_S is closed by libmicrohttpd */
        if (toe == MHD_REQUEST_TERMINATED_TIMEOUT_REACHED && r->responded) r->stalled = true;
        atomic_store(&r->client_gone, true);
        cancel_all(r);
    }
    req_unref(r);
}

/* ---- preparation (worker threads) ---------------------------------------------------- */

static int ctx_error(api_error *err, bool chat, int ctx, int n_prompt, int max_tokens) {
    api_error_set(err, 400, "invalid_request_error", chat ? "messages" : "prompt",
                  "This model's maximum context length is %d tokens. However, you requested %d tokens "
                  "(%d in the prompt, %d for the completion). Please reduce the prompt or max_tokens.",
                  ctx, n_prompt + max_tokens, n_prompt, max_tokens);
    err->code = "context_length_exceeded"; /* as OpenAI */
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

/* Sets up a choice's buffers: the worst case is every token emitting its
 * longest piece with each byte replaced by a 3-byte U+FFFD, plus the
 * detokeniser's held bytes. Large blocks are mapped lazily, so only what is
 * written costs memory. */
static int choice_alloc(api_server *srv, api_choice *ch, int max_tokens, bool logprobs, size_t echo_len) {
    ch->max_tokens = max_tokens;
    ch->text_cap = echo_len + (size_t)max_tokens * (3 * srv->max_piece + 4) + 64;
    ch->text = malloc(ch->text_cap);
    ch->toks = calloc((size_t)max_tokens, sizeof *ch->toks);
    ch->lps = logprobs ? calloc((size_t)max_tokens, sizeof *ch->lps) : NULL;
    if (!ch->text || !ch->toks || (logprobs && !ch->lps)) return -1;
    ch->text[0] = '\0';
    return 0;
}

/* Tokenises, checks limits, submits every choice. 0 or -1 with *err. Runs on
 * a preparation worker. */
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
        if (n_ids[i] + (p->max_tokens > 0 ? mt : 1) > ctx) { rc = ctx_error(err, r->route == R_CHAT, ctx, n_ids[i], mt); break; }
    }
    /* echoed prompts, as text (a token-id prompt is decoded without its special tokens) */
    char *echo[API_MAX_PROMPTS] = {0};
    if (rc == 0 && p->echo && r->route == R_COMPLETIONS) {
        for (int i = 0; i < n_prompts && rc == 0; i++) {
            if (p->prompt_text[i]) echo[i] = strdup(p->prompt_text[i]);
            else if (eng_tok_decode(srv->tok, ids[i], (size_t)n_ids[i], true, &echo[i]) != D2_OK) echo[i] = NULL;
            if (!echo[i]) { api_error_set(err, 500, "internal_error", NULL, "out of memory"); rc = -1; }
        }
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
        r->choices = calloc((size_t)nc, sizeof *r->choices);
        if (!r->choices) { api_error_set(err, 500, "internal_error", NULL, "out of memory"); rc = -1; }
        else r->n_choices = nc;
    }
    if (rc == 0) {
        for (int i = 0; i < n_prompts; i++) r->prompt_tokens += n_ids[i];
        for (int c = 0; c < r->n_choices; c++) {
            api_choice *ch = &r->choices[c];
            ch->req = r;
            ch->index = c;
            ch->prompt_index = c / (p->n > 0 ? p->n : 1);
            const char *et = echo[ch->prompt_index];
            size_t elen = et ? strlen(et) : 0;
            if (choice_alloc(srv, ch, p->max_tokens, p->logprobs >= 0, elen)) { rc = -1; break; }
            eng_tok_stream_init(&ch->detok, true);
            /* The detokeniser sees the prompt first so the first generated
             * token's spacing is decoded as in the full text. */
            char sink[512];
            const int32_t *pid = ids[ch->prompt_index];
            int npid = n_ids[ch->prompt_index];
            for (int k = npid > 8 ? npid - 8 : 0; k < npid; k++)
                eng_tok_stream_feed(srv->tok, &ch->detok, pid[k], sink, sizeof sink);
            ch->detok.n_pending = 0;
            if (et) memcpy(ch->text, et, elen + 1);
            ch->text_len = ch->gen_start = elen;
            atomic_store(&ch->safe_len, elen);
        }
        if (rc != 0) api_error_set(err, 500, "internal_error", NULL, "out of memory");
    }
    for (int i = 0; i < n_prompts; i++) free(echo[i]);
    /* submit */
    for (int c = 0; rc == 0 && c < r->n_choices; c++) {
        api_choice *ch = &r->choices[c];
        eng_request q = {.prompt = ids[ch->prompt_index], .n_prompt = n_ids[ch->prompt_index],
                         .max_tokens = p->max_tokens, .ignore_eos = p->ignore_eos,
                         .queue_exempt = c > 0, /* the queue counts requests, not choices */
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
                free(r->choices[k].text);
                free(r->choices[k].toks);
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

static void prep_tokenize(api_server *srv, api_req *r, bool detok);

static void *prep_main(void *arg) {
    api_server *srv = arg;
    for (;;) {
        pthread_mutex_lock(&srv->prep_mu);
        while (!srv->prep_head && !srv->prep_stop) pthread_cond_wait(&srv->prep_cv, &srv->prep_mu);
        api_req *r = srv->prep_head;
        if (!r) { pthread_mutex_unlock(&srv->prep_mu); break; }
        srv->prep_head = r->prep_next;
        if (!srv->prep_head) srv->prep_tail = NULL;
        pthread_mutex_unlock(&srv->prep_mu);
        if (r->route == R_TOKENIZE || r->route == R_DETOKENIZE) prep_tokenize(srv, r, r->route == R_DETOKENIZE);
        else r->prep_rc = start_generation(srv, r, &r->prep_err);
        pthread_mutex_lock(&r->mu);
        r->prep_done = true;
        bool gone = r->gone;
        resume_locked(r);
        pthread_mutex_unlock(&r->mu);
        if (gone && r->prep_rc == 0 && r->n_choices) { /* the client left while we prepared */
            atomic_store(&r->client_gone, true);
            cancel_all(r);
        }
        req_unref(r);
    }
    return NULL;
}

/* Suspends the connection unless the worker has finished its prompt (also on a
 * resume before the worker finished, none expected: wait again). */
static bool prep_pending(api_req *r) {
    pthread_mutex_lock(&r->mu);
    bool wait = !r->prep_done;
    if (wait) {
        r->suspended = true;
        MHD_suspend_connection(r->conn);
    }
    pthread_mutex_unlock(&r->mu);
    return wait;
}

/* Hands r to a worker and suspends its connection. Returns false when the
 * work is already done (the caller goes on at once). */
static bool prep_start(api_server *srv, api_req *r) {
    r->prep_queued = true;
    atomic_fetch_add(&r->refs, 1);
    pthread_mutex_lock(&srv->prep_mu);
    r->prep_next = NULL;
    if (srv->prep_tail) srv->prep_tail->prep_next = r; else srv->prep_head = r;
    srv->prep_tail = r;
    pthread_cond_signal(&srv->prep_cv);
    pthread_mutex_unlock(&srv->prep_mu);
    return prep_pending(r);
}


/* ---- generation responses (HTTP side) ------------------------------------------------ */

/* Streams (and the early 200 of a half-closed client's non-streamed request):
 * formats what the choices published, at most a round at a time. */
static ssize_t gen_reader(void *cls, uint64_t pos, char *out, size_t max) {
    (void)pos;
    api_req *r = cls;
    api_server *srv = r->srv;
    for (;;) {
        size_t avail = r->out.len - r->out_off;
        if (avail > 0) {
            size_t n = avail < max ? avail : max;
            memcpy(out, r->out.p + r->out_off, n);
            r->out_off += n;
            if (r->out_off == r->out.len) r->out.len = r->out_off = 0;
            return (ssize_t)n;
        }
        if (r->stream_closed) return MHD_CONTENT_READER_END_OF_STREAM;
        if (r->out.oom) return MHD_CONTENT_READER_END_WITH_ERROR;
        bool all_done = true, any = false;
        if (r->params.stream) {
            for (int i = 0; i < r->n_choices; i++) {
                any |= api_sse_choice(&r->out, r, &r->choices[i], srv->model_name, srv->tok);
                all_done &= r->choices[i].finish_sent;
            }
            if (all_done) {
                api_sse_close(&r->out, r, srv->model_name);
                r->stream_closed = true;
                any = true;
            }
        } else { /* the early 200: the whole body once every choice is done */
            for (int i = 0; i < r->n_choices; i++) all_done &= atomic_load(&r->choices[i].done);
            if (all_done) {
                if (r->failed) {
                    api_error e;
                    api_error_set(&e, 500, "internal_error", NULL, "%s", d2_strerror(r->fail_status));
                    char *s = api_error_json(&e);
                    if (s) api_buf_str(&r->out, s);
                    free(s);
                } else {
                    api_json_final(&r->out, r, srv->model_name, srv->tok);
                }
                r->stream_closed = true;
                any = true;
            }
        }
        if (any) continue;
        /* nothing to send: sleep until the engine publishes more (re-checked
         * under the lock, which the engine takes to resume) */
        pthread_mutex_lock(&r->mu);
        bool more = !r->params.stream && r->n_done == r->n_choices;
        for (int i = 0; i < r->n_choices && r->params.stream && !more; i++) {
            api_choice *ch = &r->choices[i];
            more = !ch->finish_sent && (atomic_load(&ch->done) || atomic_load(&ch->n_tok) > atomic_load(&ch->tok_sent) ||
                                        atomic_load(&ch->safe_len) > ch->sent);
        }
        if (!more) {
            r->suspended = true;
            MHD_suspend_connection(r->conn);
        }
        pthread_mutex_unlock(&r->mu);
        if (!more) return 0;
    }
}

static enum MHD_Result queue_stream(api_req *r) {
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, gen_reader, r, NULL);
    if (!resp) return MHD_NO;
    if (r->params.stream) {
        MHD_add_response_header(resp, "Content-Type", "text/event-stream");
        MHD_add_response_header(resp, "Cache-Control", "no-cache");
    } else {
        MHD_add_response_header(resp, "Content-Type", "application/json");
        api_buf_str(&r->out, " "); /* JSON allows leading whitespace: the probe */
    }
    enum MHD_Result res = MHD_queue_response(r->conn, 200, resp);
    MHD_destroy_response(resp);
    r->responded = true;
    return res;
}

static enum MHD_Result send_final(api_server *srv, api_req *r) {
    if (r->failed) return send_err(srv, r->conn, 500, "internal_error", NULL, NULL, d2_strerror(r->fail_status));
    api_buf b = {0};
    api_json_final(&b, r, srv->model_name, srv->tok);
    enum MHD_Result res = b.oom ? MHD_NO : send_text(r->conn, 200, "application/json", b.p, b.len);
    free(b.p);
    return res;
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
    }
    if (!r->prep_queued && prep_start(srv, r)) return MHD_YES;
    if (prep_pending(r)) return MHD_YES;
    if (r->prep_rc != 0) {
        if (r->responded) return MHD_YES;
        r->responded = true;
        return send_error(srv, r->conn, &r->prep_err);
    }
    if (r->responded) return MHD_YES;
    if (r->params.stream || r->eof_probe) return queue_stream(r);
    pthread_mutex_lock(&r->mu);
    bool done = r->n_done == r->n_choices;
    if (!done) {
        r->suspended = true;
        MHD_suspend_connection(r->conn);
    }
    pthread_mutex_unlock(&r->mu);
    if (!done) return MHD_YES;
    r->responded = true;
    return send_final(srv, r);
}

/* ---- other routes ---------------------------------------------------------------- */

static json_t *model_object(api_server *srv) {
    return json_pack("{s:s, s:s, s:I, s:s, s:i}", "id", srv->model_name, "object", "model", "created",
                     (json_int_t)srv->created, "owned_by", "d2od", "max_model_len", eng_engine_ctx_len(srv->e));
}

static enum MHD_Result handle_models(api_server *srv, struct MHD_Connection *c) {
    return send_json(c, 200, json_pack("{s:s, s:[o]}", "object", "list", "data", model_object(srv)));
}

/* GET /v1/models/{id} (OpenAI's models.retrieve). The id is the rest of the
 * path, which may itself contain '/' (e.g. "org/name"). */
static enum MHD_Result handle_model(api_server *srv, struct MHD_Connection *c, const char *url) {
    const char *id = url + strlen("/v1/models/");
    if (strcmp(id, srv->model_name) == 0) return send_json(c, 200, model_object(srv));
    api_error e;
    api_error_set(&e, 404, "invalid_request_error", "model", "The model '%.200s' does not exist; this server serves '%.200s'",
                  id, srv->model_name);
    e.code = "model_not_found";
    return send_error(srv, c, &e);
}

/* /tokenize and /detokenize on a worker: the answer into r->prep_body. */
static void prep_tokenize(api_server *srv, api_req *r, bool detok) {
    json_error_t jerr;
    json_t *root = json_loadb(r->body.p ? r->body.p : "", r->body.len, 0, &jerr);
    api_error err;
    r->prep_rc = -1;
    if (!root || !json_is_object(root)) {
        json_decref(root);
        api_error_set(&r->prep_err, 400, "invalid_request_error", NULL, "the request body must be a JSON object");
        return;
    }
    json_t *answer = NULL;
    if (!detok) {
        json_t *pr = json_object_get(root, "prompt");
        if (!pr) pr = json_object_get(root, "text");
        json_t *as = json_object_get(root, "add_special_tokens");
        if (!json_is_string(pr) || (as && !json_is_boolean(as))) {
            bool bad_as = json_is_string(pr);
            api_error_set(&r->prep_err, 400, "invalid_request_error", bad_as ? "add_special_tokens" : "prompt",
                          bad_as ? "'add_special_tokens' must be a boolean" : "'prompt' must be a string");
            json_decref(root);
            return;
        }
        int32_t *ids = NULL;
        size_t n = 0;
        int rc = eng_tok_encode(srv->tok, json_string_value(pr), json_string_length(pr), as ? json_is_true(as) : true, true, &ids, &n);
        if (rc != D2_OK) {
            api_error_set(&r->prep_err, 400, "invalid_request_error", "prompt", "cannot tokenize: %s", d2_strerror(rc));
            json_decref(root);
            return;
        }
        json_t *arr = json_array();
        for (size_t i = 0; i < n; i++) json_array_append_new(arr, json_integer(ids[i]));
        free(ids);
        answer = json_pack("{s:o, s:i, s:i}", "tokens", arr, "count", (int)n, "max_model_len", eng_engine_ctx_len(srv->e));
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
            api_error_set(&r->prep_err, 400, "invalid_request_error", "tokens", "'tokens' must be a list of token ids in [0, %d)", nv);
            return;
        }
        free(ids);
        answer = json_pack("{s:s}", "prompt", text);
        free(text);
    }
    (void)err;
    json_decref(root);
    r->prep_body = answer ? json_dumps(answer, JSON_COMPACT) : NULL;
    json_decref(answer);
    if (!r->prep_body) {
        api_error_set(&r->prep_err, 500, "internal_error", NULL, "out of memory");
        return;
    }
    r->prep_rc = 0;
}

static enum MHD_Result handle_tokenize(api_server *srv, api_req *r) {
    if (!r->prep_queued && prep_start(srv, r)) return MHD_YES;
    if (r->responded || prep_pending(r)) return MHD_YES;
    r->responded = true;
    if (r->prep_rc != 0) return send_error(srv, r->conn, &r->prep_err);
    return send_text(r->conn, 200, "application/json", r->prep_body, strlen(r->prep_body));
}

static enum MHD_Result handle_metrics(api_server *srv, struct MHD_Connection *c) {
    eng_sched_stats ss = eng_sched_get_stats(srv->sched);
    eng_pool_stats ps = eng_engine_pool_stats(srv->e);
    char *text = api_metrics_render(srv->metrics, &ss, &ps, srv->model_name);
    enum MHD_Result r = send_text(c, 200, "text/plain; version=0.0.4", text ? text : "", text ? strlen(text) : 0);
    free(text);
    return r;
}

/* ---- dispatch ---------------------------------------------------------------------- */

static enum api_route route_of(const char *url, const char *method, bool *method_ok) {
    struct { const char *url; const char *method; enum api_route r; } table[] = {
        {"/v1/completions", "POST", R_COMPLETIONS}, {"/v1/chat/completions", "POST", R_CHAT},
        {"/v1/models", "GET", R_MODELS},           {"/health", "GET", R_HEALTH},
        {"/metrics", "GET", R_METRICS},            {"/tokenize", "POST", R_TOKENIZE},
        {"/detokenize", "POST", R_DETOKENIZE},
        {"/", "GET", R_UI},                         {"/status", "GET", R_STATUS}, /* api/ui.c */
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        if (strcmp(url, table[i].url) == 0) {
            /* HEAD is answered on every GET route (libmicrohttpd drops the body) */
            *method_ok = strcmp(method, table[i].method) == 0 ||
                         (strcmp(table[i].method, "GET") == 0 && strcmp(method, "HEAD") == 0);
            return table[i].r;
        }
    }
    if (strncmp(url, "/v1/models/", 11) == 0 && url[11]) {
        *method_ok = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
        return R_MODEL;
    }
    *method_ok = false;
    return R_NONE;
}

typedef struct header_scan { int n_cl; bool cl_differ; const char *cl; size_t bytes; int n; } header_scan;

static enum MHD_Result scan_header(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
    (void)kind;
    header_scan *h = cls;
    h->n++;
    h->bytes += strlen(key) + (value ? strlen(value) : 0) + 4;
    if (strcasecmp(key, "Content-Length") == 0) {
        if (h->n_cl++ && (!h->cl || !value || strcmp(h->cl, value) != 0)) h->cl_differ = true;
        h->cl = value;
    }
    return MHD_YES;
}

/* Framing and size checks libmicrohttpd leaves to the application, answered
 * in OpenAI's error shape (and counted). NULL when the request is fine. */
static const char *framing_error(struct MHD_Connection *c, const char *url, const char *version, int *http) {
    header_scan h = {0};
    MHD_get_connection_values(c, MHD_HEADER_KIND, scan_header, &h);
    *http = 400;
    if (h.cl_differ) return "conflicting Content-Length headers"; /* RFC 9112 6.3: a smuggling vector */
    if (strcmp(version, "HTTP/1.1") == 0 && !MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Host"))
        return "an HTTP/1.1 request must have a Host header";
    *http = 414;
    if (strlen(url) > MAX_URL_BYTES) return "the request URL is too long";
    *http = 431;
    if (h.bytes > MAX_HEADER_BYTES || h.n > 200) return "the request headers are too large";
    return NULL;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_size, void **con_cls) {
    api_server *srv = cls;
    api_req *r = *con_cls;
    if (!r) {
        conn_track *t = track_of(c);
        if (t) {
            pthread_mutex_lock(&srv->conn_mu);
            t->in_request = true;
            t->body_done = false;
            t->t_request = now_s();
            pthread_mutex_unlock(&srv->conn_mu);
        }
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
        int http = 0;
        const char *bad = framing_error(c, url, version, &http);
        if (bad) {
            api_error e;
            api_error_set(&e, http, "invalid_request_error", NULL, "%s", bad);
            r->responded = true;
            return send_error_ex(srv, c, &e, true);
        }
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
    if (*upload_size) {
        if (r->responded) { *upload_size = 0; return MHD_YES; } /* an error was queued: discard */
        pthread_mutex_lock(&srv->cfg_mu);
        size_t limit = srv->cfg.body_limit;
        pthread_mutex_unlock(&srv->cfg_mu);
        if (r->body.len + *upload_size > limit) r->too_large = true;
        else api_buf_add(&r->body, upload_data, *upload_size);
        *upload_size = 0;
        return MHD_YES;
    }
    if (!r->prep_queued && !r->responded) {
        conn_track *t = track_of(c);
        if (t) {
            pthread_mutex_lock(&srv->conn_mu);
            t->body_done = true;
            pthread_mutex_unlock(&srv->conn_mu);
        }
    }
    if (r->too_large) {
        r->too_large = false;
        r->responded = true;
        char msg[128];
        snprintf(msg, sizeof msg, "the request body is larger than the limit of %zu bytes", srv->cfg.body_limit);
        return send_err(srv, c, 413, "invalid_request_error", "request_too_large", NULL, msg);
    }
    if (r->body.oom) return MHD_NO;
    switch (r->route) {
    case R_COMPLETIONS:
    case R_CHAT: return handle_generation(srv, r);
    case R_MODELS: return handle_models(srv, c);
    case R_MODEL: return handle_model(srv, c, url);
    case R_HEALTH:
        if (!atomic_load(&srv->ready) || atomic_load(&srv->draining))
            return send_err(srv, c, 503, "service_unavailable", NULL, NULL, "not ready");
        return send_text(c, 200, "application/json", "{\"status\":\"ok\"}", 15);
    case R_METRICS: return handle_metrics(srv, c);
    case R_TOKENIZE:
    case R_DETOKENIZE: return handle_tokenize(srv, r);
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

/* ---- connections --------------------------------------------------------------------- */

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode code) {
    api_server *srv = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        conn_track *t = calloc(1, sizeof *t);
        if (!t) return;
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        t->c = c;
        t->fd = ci ? ci->connect_fd : -1;
        t->t_idle_since = now_s();
        pthread_mutex_lock(&srv->conn_mu);
        t->next = srv->conns;
        if (srv->conns) srv->conns->prev = t;
        srv->conns = t;
        pthread_mutex_unlock(&srv->conn_mu);
        *socket_context = t;
    } else if (code == MHD_CONNECTION_NOTIFY_CLOSED) {
        conn_track *t = *socket_context;
        if (!t) return;
        pthread_mutex_lock(&srv->conn_mu); /* the fd is closed after this returns */
        if (t->prev) t->prev->next = t->next; else srv->conns = t->next;
        if (t->next) t->next->prev = t->prev;
        pthread_mutex_unlock(&srv->conn_mu);
        free(t);
        *socket_context = NULL;
    }
}

/* libmicrohttpd's own messages, with our timestamp and level; the error
 * answers it sends by itself (malformed request line, bad chunking, 505) are
 * counted like ours. */
static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
    api_server *srv = cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = '\0';
    const char *k = strstr(msg, "HTTP response code is ");
    if (k && srv->metrics) api_metrics_http_error(srv->metrics, atoi(k + 22));
    D2_WARN("http: %s", msg);
}

/* How a suspended request's client stands: 0 there, 1 gone, 2 sent FIN
 * (it may have only half-closed: shutdown(SHUT_WR) after the request is
 * allowed and must not cancel it). The caller holds r->mu, so the
 * connection cannot be freed meanwhile (on_completed sets r->gone under it). */
static int client_state_locked(api_req *r) {
    if (!r->suspended || r->gone) return 0;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (!ci) return 0;
    struct tcp_info ti;
    socklen_t tl = sizeof ti;
    /* a peer that answered our bytes with RST: the state drops to CLOSE */
    if (getsockopt(ci->connect_fd, IPPROTO_TCP, TCP_INFO, &ti, &tl) == 0 && ti.tcpi_state == TCP_CLOSE) return 1;
    char c;
    ssize_t n = recv(ci->connect_fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return 2;
    return n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR ? 1 : 0;
}

void api_server_tick(api_server *srv) {
    double t = now_s();
    pthread_mutex_lock(&srv->active_mu);
    for (api_req *r = srv->active; r; r = r->next) {
        /* the choices belong to the worker until prep_done (set under r->mu) */
        pthread_mutex_lock(&r->mu);
        bool ready = r->prep_done && r->prep_rc == 0;
        pthread_mutex_unlock(&r->mu);
        if (!ready) continue;
        if (r->deadline > 0 && t > r->deadline) {
            r->deadline = 0;
            atomic_store(&r->timed_out, true);
            cancel_all(r);
            continue;
        }
        pthread_mutex_lock(&r->mu);
        int st = client_state_locked(r);
        if (st == 2 && !r->responded && !r->params.stream && r->prep_done && !r->eof_probe && r->prep_rc == 0) {
            /* FIN before the answer: answer 200 now with a whitespace byte, so
             * that a client that really closed resets the connection (seen
             * as CLOSE above) while a half-closed one reads on. */
            r->eof_probe = true;
            resume_locked(r);
        }
        pthread_mutex_unlock(&r->mu);
        if (st == 1) {
            atomic_store(&r->client_gone, true);
            cancel_all(r);
        }
    }
    pthread_mutex_unlock(&srv->active_mu);
    /* connections past their deadline: no request (new or keep-alive) for
     * IDLE_DEADLINE_S, or a body still arriving BODY_DEADLINE_S after its
     * headers. shutdown() makes libmicrohttpd see the end and close it. */
    pthread_mutex_lock(&srv->conn_mu);
    for (conn_track *c = srv->conns; c; c = c->next) {
        if (c->killed || c->fd < 0) continue;
        bool late = c->in_request ? !c->body_done && t - c->t_request > BODY_DEADLINE_S
                                  : t - c->t_idle_since > IDLE_DEADLINE_S;
        if (late) {
            shutdown(c->fd, SHUT_RDWR);
            c->killed = true;
        }
    }
    pthread_mutex_unlock(&srv->conn_mu);
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
    atomic_init(&srv->log_requests, cfg->log_requests);
    srv->created = (long)time(NULL);
    pthread_mutex_init(&srv->cfg_mu, NULL);
    pthread_mutex_init(&srv->active_mu, NULL);
    pthread_mutex_init(&srv->prep_mu, NULL);
    pthread_cond_init(&srv->prep_cv, NULL);
    pthread_mutex_init(&srv->conn_mu, NULL);
    srv->e = e;
    srv->sched = s;
    srv->tok = eng_engine_tokenizer(e);
    if (!srv->tok) {
        D2_ERROR("api: the model has no tokenizer; cannot serve text");
        api_server_destroy(srv);
        return D2_EUNSUPPORTED;
    }
    srv->max_piece = eng_tok_max_piece_len(srv->tok);
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
    for (int i = 0; i < PREP_WORKERS; i++) {
        if (pthread_create(&srv->prep_th[i], NULL, prep_main, srv) != 0) {
            api_server_destroy(srv);
            return D2_ENOMEM;
        }
        srv->n_prep++;
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
    /* The listening socket is ours: bound without SO_REUSEPORT, so a second
     * daemon on the same port fails here instead of splitting the traffic
     * with the first, and the error names the address and the reason.
     * SO_REUSEADDR only lets a restart bind over connections in TIME_WAIT. */
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        D2_ERROR("api: cannot create a socket: %s", strerror(errno));
        return D2_EIO;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 1024) != 0) {
        int e = errno;
        if (e == EADDRINUSE)
            D2_ERROR("api: cannot listen on %s:%d: address in use (another process listens on port %d)", srv->host,
                     srv->cfg.port, srv->cfg.port);
        else
            D2_ERROR("api: cannot listen on %s:%d: %s", srv->host, srv->cfg.port, strerror(e));
        close(fd);
        return e == EADDRINUSE ? D2_EADDRINUSE : D2_EIO;
    }
    struct sockaddr_in bound;
    socklen_t blen = sizeof bound;
    srv->port = getsockname(fd, (struct sockaddr *)&bound, &blen) == 0 ? ntohs(bound.sin_port) : srv->cfg.port;
    /* Below the descriptor limit, so accept() never fails for want of one
     * (it then stalled every new client, /health included). */
    struct rlimit rl;
    unsigned limit = MAX_CONNECTIONS;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)limit + 128)
        limit = rl.rlim_cur > 256 ? (unsigned)(rl.rlim_cur - 128) : 128;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ITC |
                     MHD_USE_ERROR_LOG;
    srv->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_request, srv,
                                MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, srv, /* first, to catch every message */
                                MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd,
                                MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
                                MHD_OPTION_NOTIFY_CONNECTION, on_connection, srv,
                                MHD_OPTION_CONNECTION_LIMIT, limit,
                                MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)PER_IP_LIMIT,
                                MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)IDLE_DEADLINE_S,
                                MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(MAX_HEADER_BYTES + MAX_URL_BYTES + 24576),
                                MHD_OPTION_END);
    if (!srv->mhd) {
        D2_ERROR("api: cannot start the HTTP server on %s:%d", srv->host, srv->port);
        close(fd);
        return D2_EIO;
    }
    return D2_OK;
}

int api_server_port(const api_server *srv) { return srv->port; }
void api_server_set_ready(api_server *srv, bool ready) { atomic_store(&srv->ready, ready); }
void api_server_drain(api_server *srv) { atomic_store(&srv->draining, true); }
int api_server_in_flight(const api_server *srv) { return atomic_load(&((api_server *)srv)->in_flight); }

void api_server_cancel_all(api_server *srv) {
    pthread_mutex_lock(&srv->active_mu);
    for (api_req *r = srv->active; r; r = r->next) {
        pthread_mutex_lock(&r->mu);
        bool ready = r->prep_done && r->prep_rc == 0;
        pthread_mutex_unlock(&r->mu);
        if (!ready) continue; /* still preparing: its submission will meet the closed scheduler */
        atomic_store(&r->drained, true);
        cancel_all(r);
    }
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
    atomic_store(&srv->log_requests, cfg->log_requests);
}

void api_server_destroy(api_server *srv) {
    if (!srv) return;
    if (srv->mhd) MHD_stop_daemon(srv->mhd);
    pthread_mutex_lock(&srv->prep_mu);
    srv->prep_stop = true;
    pthread_cond_broadcast(&srv->prep_cv);
    pthread_mutex_unlock(&srv->prep_mu);
    for (int i = 0; i < srv->n_prep; i++) pthread_join(srv->prep_th[i], NULL);
    api_jinja_free(srv->chat_tmpl);
    api_metrics_destroy(srv->metrics);
    pthread_mutex_destroy(&srv->cfg_mu);
    pthread_mutex_destroy(&srv->active_mu);
    pthread_mutex_destroy(&srv->prep_mu);
    pthread_cond_destroy(&srv->prep_cv);
    pthread_mutex_destroy(&srv->conn_mu);
    free(srv->api_key);
    free(srv->host);
    free(srv->model_name);
    free(srv);
}
