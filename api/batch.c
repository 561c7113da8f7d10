/*
 * api/batch.c — OpenAI batch files through the continuous-batching scheduler
 * (`d2od batch`). Contract in api/api.h (api_batch_run). Callers: daemon/.
 *
 * Input: JSONL, one request a line, as OpenAI's Batch API takes it:
 *   {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
 * Output: JSONL, one result a line, in completion order:
 *   {"id": "batch_req_...", "custom_id": "r1",
 *    "response": {"status_code": 200, "request_id": "...", "body": {chat.completion}},
 *    "error": null}
 * A body the API would refuse gives response.status_code 400 (or 404 for an
 * unknown route) with OpenAI's error body, as the HTTP API answers; a line that
 * is not a request at all (bad JSON, no custom_id, duplicate custom_id, method
 * other than POST) gives "response": null and "error": {"code", "message"}.
 *
 * Resuming: custom_ids already in the output file are skipped, and results are
 * appended; a torn last line (the previous run was killed mid-write) is cut off
 * first. Each result line is written whole and flushed.
 *
 * Requests are parsed with the same code as the HTTP API (api_parse_gen, the
 * model's chat template, stop strings, per-request kv_compression) and
 * submitted to the same scheduler, up to max_in_flight at a time so the
 * engine always has a full batch. Tokens arrive on the engine thread, which
 * only appends text (as the HTTP path does); formatting and writing happen on
 * the calling thread. Not supported in batch jobs: logprobs (400), streaming
 * (the flag is ignored: a batch result is always whole).
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "api/internal.h"
#include "api/jinja/jinja.h"
#include "common/log.h"
#include "common/util.h"

static const char *const CHATML =
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/* ---- a set of custom_ids (open addressing) ------------------------------------- */

typedef struct idset { char **slot; size_t cap, n; } idset;

static uint64_t hash_str(const char *s) {
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static bool idset_has(const idset *st, const char *s) {
    if (!st->cap) return false;
    for (size_t i = hash_str(s) & (st->cap - 1);; i = (i + 1) & (st->cap - 1)) {
        if (!st->slot[i]) return false;
        if (!strcmp(st->slot[i], s)) return true;
    }
}

static int idset_add(idset *st, const char *s) {
    if ((st->n + 1) * 2 > st->cap) {
        size_t nc = st->cap ? st->cap * 2 : 1024;
        char **ns = calloc(nc, sizeof *ns);
        if (!ns) return D2_ENOMEM;
        for (size_t i = 0; i < st->cap; i++) {
            if (!st->slot[i]) continue;
            size_t j = hash_str(st->slot[i]) & (nc - 1);
            while (ns[j]) j = (j + 1) & (nc - 1);
            ns[j] = st->slot[i];
        }
        free(st->slot);
        st->slot = ns;
        st->cap = nc;
    }
    size_t i = hash_str(s) & (st->cap - 1);
    while (st->slot[i]) {
        if (!strcmp(st->slot[i], s)) return D2_OK;
        i = (i + 1) & (st->cap - 1);
    }
    if (!(st->slot[i] = strdup(s))) return D2_ENOMEM;
    st->n++;
    return D2_OK;
}

static void idset_free(idset *st) {
    for (size_t i = 0; i < st->cap; i++) free(st->slot[i]);
    free(st->slot);
    memset(st, 0, sizeof *st);
}

/* ---- jobs ---------------------------------------------------------------------------- */

typedef struct bjob bjob;

typedef struct bchoice {
    bjob *job;
    char *text;
    size_t len, cap, sent_checked;
    eng_tok_stream detok;
    int n_tokens;
    eng_finish finish;
    int status;
} bchoice;

struct bjob {
    bjob *next;             /* done list */
    char *custom_id;
    bool chat;
    api_gen_params params;
    int n_choices, n_done;
    bchoice *choices;
    int prompt_tokens;
    char req_id[48];
};

typedef struct batch_run {
    const api_batch_config *cfg;
    eng_engine *e;
    eng_sched *s;
    const eng_tokenizer *tok;
    api_jinja_tmpl *tmpl;
    char bos[64], eos[64];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bjob *done_head, *done_tail; /* under mu */
    int in_flight;               /* under mu: submitted, not yet written */
    FILE *out;
    uint64_t n_written_ids;
    api_batch_report *rep;
    int64_t total;               /* requests in the input (excluding skipped) */
    double t0, t_draw;
} batch_run;

static void text_add(bchoice *c, const char *s, size_t n) {
    if (c->len + n + 1 > c->cap) {
        size_t nc = c->cap ? c->cap : 256;
        while (nc < c->len + n + 1) nc *= 2;
        char *p = realloc(c->text, nc);
        if (!p) return;
        c->text = p;
        c->cap = nc;
    }
    memcpy(c->text + c->len, s, n);
    c->len += n;
    c->text[c->len] = '\0';
}

static void job_free(bjob *j) {
    if (!j) return;
    for (int i = 0; i < j->n_choices; i++) free(j->choices[i].text);
    free(j->choices);
    api_gen_params_free(&j->params);
    free(j->custom_id);
    free(j);
}

/* What the engine thread gets with each event: the run (tokenizer, done
 * list) and the choice. Freed at the choice's DONE. */
typedef struct bctx { batch_run *b; bchoice *c; } bctx;

/* Engine thread: one token (detokenise, match stop strings) or the end of a
 * choice (the job goes to the done list when it was the last). */
static int on_event_ctx(void *user, const eng_event *ev) {
    bctx *x = user;
    batch_run *b = x->b;
    bchoice *c = x->c;
    bjob *j = c->job;
    if (ev->type == ENG_EV_TOKEN) {
        c->n_tokens++;
        char piece[512];
        int w = eng_tok_stream_feed(b->tok, &c->detok, ev->token, piece, sizeof piece);
        if (w > 0) text_add(c, piece, (size_t)w);
        if (j->params.n_stop && c->text) {
            size_t partial = 0;
            long at = api_find_stop(c->text, c->len, j->params.stop, j->params.n_stop, &partial);
            if (at >= 0) {
                c->len = (size_t)at;
                c->text[c->len] = '\0';
                return 1; /* finish now (STOP) */
            }
        }
        return 0;
    }
    char tail[64];
    int w = eng_tok_stream_finish(b->tok, &c->detok, tail, sizeof tail);
    if (w > 0 && ev->finish != ENG_FINISH_STOP) text_add(c, tail, (size_t)w);
    c->finish = ev->finish;
    c->status = ev->status;
    free(x);
    pthread_mutex_lock(&b->mu);
    if (++j->n_done == j->n_choices) {
        j->next = NULL;
        if (b->done_tail) b->done_tail->next = j; else b->done_head = j;
        b->done_tail = j;
        pthread_cond_signal(&b->cv);
    }
    pthread_mutex_unlock(&b->mu);
    return 0;
}

/* ---- output lines ------------------------------------------------------------------------ */

static void write_line(batch_run *b, json_t *line) {
    char *s = json_dumps(line, JSON_COMPACT);
    json_decref(line);
    if (!s) return;
    fputs(s, b->out);
    fputc('\n', b->out);
    fflush(b->out);
    free(s);
}

static json_t *result_line(batch_run *b, const char *custom_id, json_t *response, json_t *error) {
    char id[48];
    snprintf(id, sizeof id, "batch_req_%016llx",
             (unsigned long long)(++b->n_written_ids * 0x9e3779b97f4a7c15ULL ^ (uint64_t)time(NULL)));
    return json_pack("{s:s, s:o, s:o, s:o}", "id", id, "custom_id", custom_id ? json_string(custom_id) : json_null(),
                     "response", response ? response : json_null(), "error", error ? error : json_null());
}

static void write_error(batch_run *b, const char *custom_id, const char *code, const char *msg) {
    write_line(b, result_line(b, custom_id, NULL, json_pack("{s:s, s:s}", "code", code, "message", msg)));
    b->rep->failed++;
}

static void write_http_error(batch_run *b, const char *custom_id, const api_error *err) {
    char *ej = api_error_json(err);
    json_t *body = ej ? json_loads(ej, 0, NULL) : NULL;
    free(ej);
    json_t *resp = json_pack("{s:i, s:s, s:o}", "status_code", err->http, "request_id", "", "body",
                             body ? body : json_object());
    write_line(b, result_line(b, custom_id, resp, NULL));
    b->rep->failed++;
}

static const char *finish_name(const bchoice *c) {
    if (c->status == D2_ECANCELED) return "abort";
    return c->finish == ENG_FINISH_STOP ? "stop" : c->finish == ENG_FINISH_LENGTH ? "length" : "error";
}

static void write_job(batch_run *b, bjob *j) {
    for (int i = 0; i < j->n_choices; i++) {
        if (j->choices[i].status != D2_OK) {
            api_error e;
            api_error_set(&e, 500, "internal_error", NULL, "generation failed: %s", d2_strerror(j->choices[i].status));
            write_http_error(b, j->custom_id, &e);
            return;
        }
    }
    json_t *choices = json_array();
    int completion = 0;
    for (int i = 0; i < j->n_choices; i++) {
        bchoice *c = &j->choices[i];
        completion += c->n_tokens;
        json_t *txt = json_stringn_nocheck(c->text ? c->text : "", c->len);
        json_t *ch = j->chat ? json_pack("{s:i, s:{s:s, s:o}, s:n, s:s}", "index", i, "message", "role", "assistant",
                                         "content", txt, "logprobs", "finish_reason", finish_name(c))
                             : json_pack("{s:i, s:o, s:n, s:s}", "index", i, "text", txt, "logprobs", "finish_reason",
                                         finish_name(c));
        json_array_append_new(choices, ch);
    }
    json_t *body = json_pack("{s:s, s:s, s:I, s:s, s:o, s:{s:i, s:i, s:i}}", "id", j->req_id, "object",
                             j->chat ? "chat.completion" : "text_completion", "created", (json_int_t)time(NULL),
                             "model",
                             b->cfg->model_name ? b->cfg->model_name : "d2od", "choices", choices, "usage",
                             "prompt_tokens", j->prompt_tokens, "completion_tokens", completion, "total_tokens",
                             j->prompt_tokens + completion);
    json_t *resp = json_pack("{s:i, s:s, s:o}", "status_code", 200, "request_id", j->req_id, "body", body);
    write_line(b, result_line(b, j->custom_id, resp, NULL));
    b->rep->ok++;
    b->rep->prompt_tokens += j->prompt_tokens;
    b->rep->completion_tokens += completion;
}

static void draw_progress(batch_run *b, bool final) {
    if (!b->cfg->progress) return;
    double t = d2_now();
    if (!final && t - b->t_draw < 0.1) return;
    b->t_draw = t;
    int64_t done = b->rep->ok + b->rep->failed;
    double el = t - b->t0, rate = el > 0 ? (double)done / el : 0;
    double tps = el > 0 ? (double)b->rep->completion_tokens / el : 0;
    int width = 30;
    int fill = b->total > 0 ? (int)((double)done / (double)b->total * width) : 0;
    if (fill > width) fill = width;
    double eta = rate > 0 ? (double)(b->total - done) / rate : 0;
    fprintf(stderr, "\rbatch [%.*s%*s] %lld/%lld %5.1f req/s %7.0f tok/s eta %4.0fs", fill,
            "##############################", width - fill, "", (long long)done, (long long)b->total, rate, tps, eta);
    if (final) fputc('\n', stderr);
    fflush(stderr);
}

/* Writes every finished job; with wait, first blocks until one finishes. */
static void drain(batch_run *b, bool wait) {
    pthread_mutex_lock(&b->mu);
    while (wait && !b->done_head && b->in_flight > 0) pthread_cond_wait(&b->cv, &b->mu);
    bjob *list = b->done_head;
    b->done_head = b->done_tail = NULL;
    pthread_mutex_unlock(&b->mu);
    while (list) {
        bjob *nx = list->next;
        write_job(b, list);
        job_free(list);
        pthread_mutex_lock(&b->mu);
        b->in_flight--;
        pthread_mutex_unlock(&b->mu);
        list = nx;
    }
    draw_progress(b, false);
}

/* ---- one request ------------------------------------------------------------------------ */

static int render_chat(batch_run *b, bjob *j, char **text, api_error *err) {
    json_t *ctx = json_object();
    json_object_set(ctx, "messages", j->params.messages);
    json_object_set_new(ctx, "add_generation_prompt", json_boolean(j->params.add_generation_prompt));
    json_object_set_new(ctx, "bos_token", json_string(b->bos));
    json_object_set_new(ctx, "eos_token", json_string(b->eos));
    if (j->params.tools) json_object_set(ctx, "tools", j->params.tools);
    char msg[512] = "";
    int rc = api_jinja_render(b->tmpl, ctx, text, NULL, msg, sizeof msg);
    json_decref(ctx);
    if (rc != D2_OK) api_error_set(err, 400, "invalid_request_error", "messages", "chat template: %s", msg);
    return rc;
}

/* The envelope of one line: a JSON object with a fresh custom_id, method POST,
 * a known url and an object body. Returns the new job (custom_id and chat set)
 * with the body as text in *btext, or NULL when the line was answered here (an
 * error result written) or skipped (already in the output on resume). */
static bjob *read_envelope(batch_run *b, const char *line, size_t len, long lineno, idset *seen, const idset *done,
                           char **btext) {
    json_error_t je;
    json_t *root = json_loadb(line, len, 0, &je);
    char msg[600];
    if (!json_is_object(root)) {
        snprintf(msg, sizeof msg, "line %ld: not a JSON object: %s", lineno, root ? "" : je.text);
        write_error(b, NULL, "invalid_json", msg);
        json_decref(root);
        return NULL;
    }
    const char *cid = json_string_value(json_object_get(root, "custom_id"));
    const char *method = json_string_value(json_object_get(root, "method"));
    const char *url = json_string_value(json_object_get(root, "url"));
    json_t *body = json_object_get(root, "body");
    api_error err;
    bool chat = url && !strcmp(url, "/v1/chat/completions");
    bjob *j = NULL;
    if (!cid || !cid[0]) {
        snprintf(msg, sizeof msg, "line %ld: 'custom_id' (a non-empty string) is required", lineno);
        write_error(b, NULL, "missing_custom_id", msg);
        goto out;
    }
    if (idset_has(done, cid)) { /* resumed: already in the output */
        b->rep->skipped++;
        goto out;
    }
    b->total++;
    if (idset_has(seen, cid)) {
        snprintf(msg, sizeof msg, "line %ld: duplicate custom_id '%s'", lineno, cid);
        write_error(b, cid, "duplicate_custom_id", msg);
        goto out;
    }
    idset_add(seen, cid);
    if (!method || strcmp(method, "POST")) {
        snprintf(msg, sizeof msg, "line %ld: 'method' must be \"POST\"", lineno);
        write_error(b, cid, "invalid_method", msg);
        goto out;
    }
    if (!url || (!chat && strcmp(url, "/v1/completions"))) {
        api_error_set(&err, 404, "not_found_error", "url", "'url' must be /v1/chat/completions or /v1/completions");
        write_http_error(b, cid, &err);
        goto out;
    }
    if (!json_is_object(body)) {
        api_error_set(&err, 400, "invalid_request_error", "body", "'body' must be a JSON object");
        write_http_error(b, cid, &err);
        goto out;
    }
    j = calloc(1, sizeof *j);
    *btext = json_dumps(body, JSON_COMPACT);
    if (j) j->custom_id = strdup(cid);
    if (!j || !*btext || !j->custom_id) {
        free(*btext);
        if (j) free(j->custom_id);
        free(j);
        j = NULL;
        write_error(b, cid, "internal_error", "out of memory");
        goto out;
    }
    j->chat = chat;
out:
    json_decref(root);
    return j;
}

/* The prompt's token ids (*owned: the caller frees them) after the checks a
 * batch job adds to the HTTP API's: no logprobs, one prompt, fits the context;
 * max_tokens defaulted. D2_OK or an error with *err set (nothing to free). */
static int job_prompt(batch_run *b, bjob *j, int32_t **ids_out, int *n_out, bool *owned, api_error *err) {
    api_gen_params *p = &j->params;
    bool chat = j->chat;
    if (p->logprobs >= 0) {
        api_error_set(err, 400, "invalid_request_error", "logprobs", "logprobs are not supported in batch jobs");
        return D2_EINVAL;
    }
    if ((chat ? 1 : p->n_prompts) != 1) {
        api_error_set(err, 400, "invalid_request_error", "prompt", "batch jobs take one prompt per request");
        return D2_EINVAL;
    }
    int32_t *ids = NULL;
    int n_ids = 0, rc = D2_OK;
    *owned = false;
    if (chat) {
        char *text = NULL;
        if (render_chat(b, j, &text, err) != D2_OK) return D2_EINVAL;
        size_t n = 0;
        rc = eng_tok_encode(b->tok, text, strlen(text), false, true, &ids, &n);
        free(text);
        n_ids = (int)n;
        *owned = true;
    } else if (p->prompt_text[0]) {
        size_t n = 0;
        rc = eng_tok_encode(b->tok, p->prompt_text[0], strlen(p->prompt_text[0]), true, true, &ids, &n);
        n_ids = (int)n;
        *owned = true;
    } else {
        ids = p->prompt_ids[0];
        n_ids = p->prompt_n_ids[0];
    }
    int ctx = eng_engine_ctx_len(b->e);
    if (rc != D2_OK || n_ids == 0) {
        api_error_set(err, 400, "invalid_request_error", chat ? "messages" : "prompt",
                      rc != D2_OK ? "cannot tokenize the prompt" : "the prompt is empty");
        if (*owned) free(ids);
        return D2_EINVAL;
    }
    if (p->max_tokens <= 0) p->max_tokens = ctx - n_ids < b->cfg->default_max_tokens ? ctx - n_ids : b->cfg->default_max_tokens;
    if (p->max_tokens <= 0 || n_ids + p->max_tokens > ctx) {
        api_error_set(err, 400, "invalid_request_error", "max_tokens",
                      "This model's maximum context length is %d tokens. However, you requested %d tokens "
                      "(%d in the prompt, %d for the completion).", ctx, n_ids + p->max_tokens, n_ids, p->max_tokens);
        if (*owned) free(ids);
        return D2_EINVAL;
    }
    *ids_out = ids;
    *n_out = n_ids;
    return D2_OK;
}

/* The job's choices: request id, detokenisers primed with the prompt's tail,
 * the echoed prompt. D2_OK or D2_ENOMEM. */
static int job_choices(batch_run *b, bjob *j, const int32_t *ids, int n_ids) {
    api_gen_params *p = &j->params;
    j->prompt_tokens = n_ids;
    j->n_choices = p->n > 0 ? p->n : 1;
    j->choices = calloc((size_t)j->n_choices, sizeof *j->choices);
    snprintf(j->req_id, sizeof j->req_id, "%s-%016llx", j->chat ? "chatcmpl" : "cmpl",
             (unsigned long long)(hash_str(j->custom_id) ^ (uint64_t)time(NULL)));
    if (!j->choices) return D2_ENOMEM;
    for (int c = 0; c < j->n_choices; c++) {
        bchoice *ch = &j->choices[c];
        ch->job = j;
        eng_tok_stream_init(&ch->detok, true);
        char sink[512];
        for (int k = n_ids > 8 ? n_ids - 8 : 0; k < n_ids; k++) eng_tok_stream_feed(b->tok, &ch->detok, ids[k], sink, sizeof sink);
        ch->detok.n_pending = 0;
        if (p->echo && !j->chat) {
            if (p->prompt_text[0]) text_add(ch, p->prompt_text[0], strlen(p->prompt_text[0]));
        }
    }
    return D2_OK;
}

/* The engine request of choice c (seeds differ per choice). */
static void job_request(const batch_run *b, const api_gen_params *p, const int32_t *ids, int n_ids, int c,
                        eng_request *q) {
    *q = (eng_request){.prompt = ids, .n_prompt = n_ids, .max_tokens = p->max_tokens, .ignore_eos = p->ignore_eos,
                       .on_event = on_event_ctx};
    eng_sample_params_default(&q->sample);
    q->sample.temperature = p->temperature;
    q->sample.top_p = p->top_p;
    q->sample.top_k = p->top_k;
    q->sample.min_p = p->min_p;
    q->sample.presence_penalty = p->presence_penalty;
    q->sample.frequency_penalty = p->frequency_penalty;
    q->sample.repetition_penalty = p->repetition_penalty;
    q->sample.has_seed = p->has_seed;
    q->sample.seed = p->seed + (uint64_t)c;
    q->sample.logit_bias = p->logit_bias;
    q->sample.n_logit_bias = p->n_logit_bias;
    q->kv = p->has_kv ? p->kv : b->cfg->kv_default;
}

/* Submits every choice (waiting for room when the queue is full). Returns how
 * many were queued; *rc_out is the status of the first that was not. */
static int job_submit(batch_run *b, bjob *j, const int32_t *ids, int n_ids, int *rc_out) {
    int submitted = 0, rc = D2_OK;
    for (int c = 0; c < j->n_choices; c++) {
        bctx *x = malloc(sizeof *x);
        eng_request q;
        job_request(b, &j->params, ids, n_ids, c, &q);
        q.user = x;
        const char *why = NULL;
        if (!x) { rc = D2_ENOMEM; break; }
        x->b = b;
        x->c = &j->choices[c];
        for (;;) {
            rc = eng_sched_submit(b->s, &q, NULL, &why);
            if (rc != D2_EQUEUEFULL) break;
            drain(b, true); /* the queue is full: wait for something to finish */
        }
        if (rc != D2_OK) {
            free(x);
            break;
        }
        submitted++;
    }
    *rc_out = rc;
    return submitted;
}

/* Parses, tokenises and submits one request line. Writes the error result
 * itself when the request is refused. */
static void run_line(batch_run *b, const char *line, size_t len, long lineno, idset *seen, const idset *done) {
    char *btext = NULL;
    bjob *j = read_envelope(b, line, len, lineno, seen, done, &btext);
    if (!j) return;
    const char *cid = j->custom_id;
    api_error err;
    const eng_model_config *mc = &eng_engine_model(b->e)->cfg;
    api_limits lim = {.max_n = b->cfg->max_n, .max_tokens_limit = b->cfg->max_tokens_limit,
                      .n_vocab = mc->vocab_size, .n_layers = mc->n_layers};
    int rc = api_parse_gen(btext, strlen(btext), j->chat ? API_CHAT : API_COMPLETIONS, &lim, &j->params, &err);
    free(btext);
    if (rc != D2_OK) {
        write_http_error(b, cid, &err);
        free(j->custom_id);
        free(j);
        return;
    }
    int32_t *ids = NULL;
    int n_ids = 0;
    bool owned = false;
    if (job_prompt(b, j, &ids, &n_ids, &owned, &err) != D2_OK) goto refuse;
    if (job_choices(b, j, ids, n_ids) != D2_OK) {
        if (owned) free(ids);
        api_error_set(&err, 500, "internal_error", NULL, "out of memory");
        goto refuse;
    }
    pthread_mutex_lock(&b->mu);
    b->in_flight++;
    pthread_mutex_unlock(&b->mu);
    int submitted = job_submit(b, j, ids, n_ids, &rc);
    if (owned) free(ids);
    if (submitted == 0) { /* nothing queued: answer as the HTTP API would */
        pthread_mutex_lock(&b->mu);
        b->in_flight--;
        pthread_mutex_unlock(&b->mu);
        api_error_set(&err, 400, "invalid_request_error", NULL, "the request cannot be scheduled: %s", d2_strerror(rc));
        goto refuse;
    }
    if (submitted < j->n_choices) {
        /* Choices share one validation, so this needs an allocation failure;
         * the rest count as failed so the job still completes. */
        pthread_mutex_lock(&b->mu);
        for (int c = submitted; c < j->n_choices; c++) j->choices[c].status = rc;
        j->n_done += j->n_choices - submitted;
        if (j->n_done == j->n_choices) {
            j->next = NULL;
            if (b->done_tail) b->done_tail->next = j; else b->done_head = j;
            b->done_tail = j;
        }
        pthread_mutex_unlock(&b->mu);
    }
    return;
refuse:
    write_http_error(b, cid, &err);
    job_free(j);
}

/* ---- resume ------------------------------------------------------------------------------ */

/* Collects the custom_ids already in the output and cuts a torn last line. */
static int read_done(const char *path, idset *done, char *err, size_t errlen) {
    FILE *f = fopen(path, "r+b");
    if (!f) return errno == ENOENT ? D2_OK : D2_EIO;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    long good = 0;
    int rc = D2_OK;
    while ((n = getline(&line, &cap, f)) > 0) {
        if (line[n - 1] != '\n') break; /* torn */
        json_t *j = json_loadb(line, (size_t)n, 0, NULL);
        if (!j) break;
        const char *cid = json_string_value(json_object_get(j, "custom_id"));
        if (cid && idset_add(done, cid) != D2_OK) rc = D2_ENOMEM;
        json_decref(j);
        good = ftell(f);
    }
    free(line);
    fseek(f, 0, SEEK_END);
    long end = ftell(f);
    if (end > good) {
        D2_WARN("batch: %s ends with %ld bytes of an unfinished line; cutting them off", path, end - good);
        if (ftruncate(fileno(f), good) != 0) rc = D2_EIO;
    }
    fclose(f);
    if (rc != D2_OK) snprintf(err, errlen, "cannot read %s", path);
    return rc;
}

int api_batch_run(const api_batch_config *cfg, eng_engine *e, eng_sched *s, const char *input, const char *output,
                  api_batch_report *rep, char *err, size_t errlen) {
    memset(rep, 0, sizeof *rep);
    batch_run b = {.cfg = cfg, .e = e, .s = s, .tok = eng_engine_tokenizer(e), .rep = rep};
    if (!b.tok) {
        snprintf(err, errlen, "the model has no tokenizer");
        return D2_EUNSUPPORTED;
    }
    const char *tsrc = cfg->chat_template ? cfg->chat_template : eng_engine_model(e)->chat_template;
    char msg[256];
    if (api_jinja_compile(tsrc ? tsrc : CHATML, &b.tmpl, msg, sizeof msg) != D2_OK) {
        snprintf(err, errlen, "the chat template does not compile: %s", msg);
        return D2_ECONFIG;
    }
    size_t n = 0;
    int bos = eng_tok_bos(b.tok), eos = eng_tok_eos(b.tok);
    const char *pb = bos >= 0 ? eng_tok_piece(b.tok, bos, &n) : NULL;
    snprintf(b.bos, sizeof b.bos, "%.*s", pb ? (int)n : 0, pb ? pb : "");
    const char *pe = eos >= 0 ? eng_tok_piece(b.tok, eos, &n) : NULL;
    snprintf(b.eos, sizeof b.eos, "%.*s", pe ? (int)n : 0, pe ? pe : "");
    idset done = {0}, seen = {0};
    int rc = read_done(output, &done, err, errlen);
    FILE *in = rc == D2_OK ? fopen(input, "rb") : NULL;
    if (rc == D2_OK && !in) {
        snprintf(err, errlen, "cannot open %s: %s", input, strerror(errno));
        rc = D2_ENOENT;
    }
    if (rc == D2_OK && !(b.out = fopen(output, "ab"))) {
        snprintf(err, errlen, "cannot open %s: %s", output, strerror(errno));
        rc = D2_EIO;
    }
    if (rc != D2_OK) {
        if (in) fclose(in);
        idset_free(&done);
        api_jinja_free(b.tmpl);
        return rc;
    }
    if (done.n) D2_INFO("batch: %zu result(s) already in %s; skipping those custom_ids", done.n, output);
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    b.t0 = d2_now();
    int max_in_flight = cfg->max_in_flight > 0 ? cfg->max_in_flight : 256;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    long lineno = 0;
    /* Count first so the progress bar knows the total (the file is read twice:
     * cheap next to generation). */
    if (cfg->progress) {
        int64_t lines = 0;
        while ((len = getline(&line, &cap, in)) > 0) {
            bool blank = true;
            for (ssize_t i = 0; i < len && blank; i++) blank = line[i] == ' ' || line[i] == '\t' || line[i] == '\n' || line[i] == '\r';
            lines += !blank;
        }
        b.total = 0;
        rewind(in);
        rep->total = lines;
    }
    int64_t total_lines = rep->total;
    while ((len = getline(&line, &cap, in)) > 0) {
        lineno++;
        bool blank = true;
        for (ssize_t i = 0; i < len && blank; i++) blank = line[i] == ' ' || line[i] == '\t' || line[i] == '\n' || line[i] == '\r';
        if (blank) continue;
        if (cfg->progress) b.total = total_lines - rep->skipped; /* known up front, less what resuming skips */
        run_line(&b, line, (size_t)len, lineno, &seen, &done);
        for (;;) {
            pthread_mutex_lock(&b.mu);
            bool full = b.in_flight >= max_in_flight;
            pthread_mutex_unlock(&b.mu);
            drain(&b, full);
            if (!full) break;
        }
    }
    free(line);
    fclose(in);
    for (;;) {
        pthread_mutex_lock(&b.mu);
        bool any = b.in_flight > 0;
        pthread_mutex_unlock(&b.mu);
        if (!any) break;
        drain(&b, true);
    }
    b.total = rep->ok + rep->failed;
    draw_progress(&b, true);
    rep->total = rep->ok + rep->failed + rep->skipped;
    rep->seconds = d2_now() - b.t0;
    int crc = fclose(b.out) == 0 ? D2_OK : D2_EIO;
    if (crc != D2_OK) snprintf(err, errlen, "cannot write %s", output);
    idset_free(&done);
    idset_free(&seen);
    api_jinja_free(b.tmpl);
    pthread_mutex_destroy(&b.mu);
    pthread_cond_destroy(&b.cv);
    return crc;
}
