/*
 * api/sse.c — JSON and server-sent-event formatting of generation responses
 * (OpenAI's completion and chat shapes, logprobs included), from the numbers
 * the engine thread published into each choice (api/gen.h).
 *
 * Called only on the HTTP side (libmicrohttpd's thread), never on the engine
 * thread: the hot path hands over token ids, text bytes and logprob numbers,
 * and everything that escapes, prints numbers or grows a buffer lives here.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/gen.h"
#include "common/status.h"
#include "common/utf8.h"

/* ---- buffer ------------------------------------------------------------------------ */

int api_buf_reserve(api_buf *b, size_t extra) {
    if (b->len + extra + 1 <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) cap *= 2;
    char *np = realloc(b->p, cap);
    if (!np) { b->oom = true; return -1; }
    b->p = np;
    b->cap = cap;
    return 0;
}

void api_buf_add(api_buf *b, const char *s, size_t n) {
    if (api_buf_reserve(b, n)) return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void api_buf_str(api_buf *b, const char *s) { api_buf_add(b, s, strlen(s)); }

void api_buf_fmt(api_buf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) api_buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

void api_buf_json_str(api_buf *b, const char *s, size_t n) {
    api_buf_reserve(b, n + 2);
    api_buf_add(b, "\"", 1);
    size_t run = 0; /* start of the current run of bytes copied as they are */
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') { i++; continue; }
        int len = c >= 0x80 ? d2_utf8_seq((const uint8_t *)s + i, n - i) : 0;
        if (len > 0) { i += (size_t)len; continue; }
        api_buf_add(b, s + run, i - run);
        if (c == '"' || c == '\\') { char e[2] = {'\\', (char)c}; api_buf_add(b, e, 2); }
        else if (c == '\n') api_buf_add(b, "\\n", 2);
        else if (c == '\r') api_buf_add(b, "\\r", 2);
        else if (c == '\t') api_buf_add(b, "\\t", 2);
        else if (c < 0x20) api_buf_fmt(b, "\\u%04x", c);
        else api_buf_add(b, "\xef\xbf\xbd", 3); /* not UTF-8 */
        i++;
        run = i;
    }
    api_buf_add(b, s + run, n - run);
    api_buf_add(b, "\"", 1);
}

/* ---- pieces ------------------------------------------------------------------------ */

const char *api_finish_name(const api_req *r, const api_choice *ch) {
    if (ch->overrun) return "abort";
    if (ch->status == D2_ECANCELED) return atomic_load(&((api_req *)r)->timed_out) ? "length" : "abort";
    switch (ch->finish) {
    case ENG_FINISH_STOP: return "stop";
    case ENG_FINISH_LENGTH: return "length";
    default: return "error";
    }
}

/* JSON has no -inf: a token the model gives probability 0 reports -9999, as OpenAI does. */
static double json_lp(float lp) { return lp < -9999.0f || lp != lp ? -9999.0 : (double)lp; }

static void token_str(api_buf *b, const eng_tokenizer *tok, int32_t id) {
    size_t n = 0;
    const char *p = eng_tok_piece(tok, id, &n);
    api_buf_json_str(b, p ? p : "", p ? n : 0);
}

static void token_bytes(api_buf *b, const eng_tokenizer *tok, int32_t id) {
    size_t n = 0;
    const char *p = eng_tok_piece(tok, id, &n);
    api_buf_add(b, "[", 1);
    for (size_t i = 0; p && i < n; i++) api_buf_fmt(b, i ? ",%u" : "%u", (unsigned char)p[i]);
    api_buf_add(b, "]", 1);
}

/* Logprobs of tokens [from, to) of a choice in the route's shape; text_offset
 * is where token `from`'s text starts in the choice's text. */
static void logprobs_json(api_buf *b, const api_req *r, const api_choice *ch, int from, int to, size_t text_offset,
                          const eng_tokenizer *tok) {
    if (r->params.logprobs < 0 || !ch->lps) { api_buf_str(b, "null"); return; }
    int keep = r->params.logprobs;
    if (r->route == R_CHAT) {
        api_buf_str(b, "{\"content\":[");
        for (int i = from; i < to; i++) {
            const api_lp *l = &ch->lps[i];
            api_buf_str(b, i > from ? ",{\"token\":" : "{\"token\":");
            token_str(b, tok, ch->toks[i].token);
            api_buf_fmt(b, ",\"logprob\":%.6g,\"bytes\":", json_lp(l->logprob));
            token_bytes(b, tok, ch->toks[i].token);
            api_buf_str(b, ",\"top_logprobs\":[");
            int nt = l->n_top < keep ? l->n_top : keep;
            for (int k = 0; k < nt; k++) {
                api_buf_str(b, k ? ",{\"token\":" : "{\"token\":");
                token_str(b, tok, l->top[k].token);
                api_buf_fmt(b, ",\"logprob\":%.6g,\"bytes\":", json_lp(l->top[k].logprob));
                token_bytes(b, tok, l->top[k].token);
                api_buf_str(b, "}");
            }
            api_buf_str(b, "]}");
        }
        api_buf_str(b, "]}");
        return;
    }
    api_buf_str(b, "{\"tokens\":[");
    for (int i = from; i < to; i++) {
        if (i > from) api_buf_str(b, ",");
        token_str(b, tok, ch->toks[i].token);
    }
    api_buf_str(b, "],\"token_logprobs\":[");
    for (int i = from; i < to; i++) api_buf_fmt(b, i > from ? ",%.6g" : "%.6g", json_lp(ch->lps[i].logprob));
    api_buf_str(b, "],\"top_logprobs\":[");
    for (int i = from; i < to; i++) {
        const api_lp *l = &ch->lps[i];
        api_buf_str(b, i > from ? ",{" : "{");
        int nt = l->n_top < keep ? l->n_top : keep;
        for (int k = 0; k < nt; k++) {
            if (k) api_buf_str(b, ",");
            token_str(b, tok, l->top[k].token);
            api_buf_fmt(b, ":%.6g", json_lp(l->top[k].logprob));
        }
        api_buf_str(b, "}");
    }
    api_buf_str(b, "],\"text_offset\":[");
    size_t off = text_offset;
    for (int i = from; i < to; i++) {
        size_t n = 0;
        eng_tok_piece(tok, ch->toks[i].token, &n);
        api_buf_fmt(b, i > from ? ",%zu" : "%zu", off);
        off += n;
    }
    api_buf_str(b, "]}");
}

static void chunk_begin(api_buf *b, const api_req *r, const char *model) {
    api_buf_str(b, "data: {\"id\":\"");
    api_buf_str(b, r->id);
    api_buf_fmt(b, "\",\"object\":\"%s\",\"created\":%ld,\"model\":",
                r->route == R_CHAT ? "chat.completion.chunk" : "text_completion", r->created);
    api_buf_json_str(b, model, strlen(model));
    api_buf_str(b, ",\"choices\":[");
}

static void chunk_end(api_buf *b, const api_req *r) {
    api_buf_str(b, "]");
    if (r->params.include_usage) api_buf_str(b, ",\"usage\":null");
    api_buf_str(b, "}\n\n");
}

/* One event with text[from, to) and logprobs of tokens [t0, t1) of ch. */
static void delta(api_buf *b, api_req *r, api_choice *ch, size_t from, size_t to, int t0, int t1, const char *finish,
                  const char *model, const eng_tokenizer *tok) {
    bool first = r->route == R_CHAT && !ch->role_sent;
    chunk_begin(b, r, model);
    api_buf_fmt(b, "{\"index\":%d,", ch->index);
    if (r->route == R_CHAT) {
        if (finish && from == to && !first) {
            api_buf_str(b, "\"delta\":{}");
        } else {
            api_buf_str(b, "\"delta\":{");
            if (first) api_buf_str(b, "\"role\":\"assistant\",");
            api_buf_str(b, "\"content\":");
            api_buf_json_str(b, ch->text + from, to - from);
            api_buf_str(b, "}");
        }
        ch->role_sent = true;
    } else {
        api_buf_str(b, "\"text\":");
        api_buf_json_str(b, ch->text + from, to - from);
    }
    api_buf_str(b, ",\"logprobs\":");
    if (r->params.logprobs >= 0 && ch->lps && t1 > t0) {
        /* token t0's text starts after the echo and the earlier tokens' pieces */
        if (t0 == 0) ch->lp_off = ch->gen_start;
        logprobs_json(b, r, ch, t0, t1, ch->lp_off, tok);
        for (int i = t0; i < t1; i++) {
            size_t n = 0;
            eng_tok_piece(tok, ch->toks[i].token, &n);
            ch->lp_off += n;
        }
    } else {
        api_buf_str(b, "null");
    }
    api_buf_str(b, ",\"finish_reason\":");
    if (finish) api_buf_fmt(b, "\"%s\"}", finish);
    else api_buf_str(b, "null}");
    chunk_end(b, r);
}

bool api_sse_choice(api_buf *b, api_req *r, api_choice *ch, const char *model, const eng_tokenizer *tok) {
    if (ch->finish_sent) return false;
    bool done = atomic_load_explicit(&ch->done, memory_order_acquire); /* first: then the counts are final */
    int n_tok = atomic_load_explicit(&ch->n_tok, memory_order_acquire);
    size_t safe = atomic_load_explicit(&ch->safe_len, memory_order_acquire);
    bool with_lps = r->params.logprobs >= 0 && ch->lps;
    bool chat = r->route == R_CHAT;
    bool formatted = false;
    int t = atomic_load_explicit(&ch->tok_sent, memory_order_relaxed);
    for (int budget = API_STREAM_ROUND_TOKENS; t < n_tok && budget > 0; t++, budget--) {
        /* this token's text, less what a possible stop string still holds back */
        size_t end = ch->toks[t].text_end;
        if (end > safe) end = safe;
        if (end < ch->sent) end = ch->sent;
        if (end > ch->sent || with_lps || (chat && !ch->role_sent)) {
            delta(b, r, ch, ch->sent, end, with_lps ? t : 0, with_lps ? t + 1 : 0, NULL, model, tok);
            ch->sent = end;
            formatted = true;
        }
    }
    atomic_store_explicit(&ch->tok_sent, t, memory_order_relaxed);
    if (done && t == n_tok) {
        if (safe > ch->sent) { /* the detokeniser's tail, or text held back for a stop string that never came */
            delta(b, r, ch, ch->sent, safe, 0, 0, NULL, model, tok);
            ch->sent = safe;
        }
        delta(b, r, ch, ch->sent, ch->sent, 0, 0, api_finish_name(r, ch), model, tok);
        ch->finish_sent = true;
        formatted = true;
    }
    return formatted;
}

void api_sse_close(api_buf *b, const api_req *r, const char *model) {
    if (r->params.include_usage) {
        int completion = 0;
        for (int i = 0; i < r->n_choices; i++) completion += atomic_load(&r->choices[i].n_tok);
        api_buf_str(b, "data: {\"id\":\"");
        api_buf_str(b, r->id);
        api_buf_fmt(b, "\",\"object\":\"%s\",\"created\":%ld,\"model\":",
                    r->route == R_CHAT ? "chat.completion.chunk" : "text_completion", r->created);
        api_buf_json_str(b, model, strlen(model));
        api_buf_fmt(b, ",\"choices\":[],\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}}\n\n",
                    r->prompt_tokens, completion, r->prompt_tokens + completion);
    }
    api_buf_str(b, "data: [DONE]\n\n");
}

void api_json_final(api_buf *b, const api_req *r, const char *model, const eng_tokenizer *tok) {
    api_buf_str(b, "{\"id\":\"");
    api_buf_str(b, r->id);
    api_buf_fmt(b, "\",\"object\":\"%s\",\"created\":%ld,\"model\":", r->route == R_CHAT ? "chat.completion" : "text_completion",
                r->created);
    api_buf_json_str(b, model, strlen(model));
    api_buf_str(b, ",\"choices\":[");
    int completion = 0;
    for (int i = 0; i < r->n_choices; i++) {
        const api_choice *ch = &r->choices[i];
        int n_tok = atomic_load_explicit(&ch->n_tok, memory_order_acquire);
        size_t len = atomic_load_explicit(&ch->safe_len, memory_order_acquire);
        completion += n_tok;
        api_buf_fmt(b, "%s{\"index\":%d,", i ? "," : "", i);
        if (r->route == R_CHAT) {
            api_buf_str(b, "\"message\":{\"role\":\"assistant\",\"content\":");
            api_buf_json_str(b, ch->text, len);
            api_buf_str(b, "}");
        } else {
            api_buf_str(b, "\"text\":");
            api_buf_json_str(b, ch->text, len);
        }
        api_buf_str(b, ",\"logprobs\":");
        logprobs_json(b, r, ch, 0, n_tok, ch->gen_start, tok);
        api_buf_fmt(b, ",\"finish_reason\":\"%s\"}", api_finish_name(r, ch));
    }
    api_buf_fmt(b, "],\"usage\":{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}}", r->prompt_tokens,
                completion, r->prompt_tokens + completion);
}
