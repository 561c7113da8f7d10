/*
 * api/ui.c — the built-in web page (GET /) and the KV-pool status route
 * (GET /status) that feeds its live view. Called by api/server.c's router
 * only; declarations in api/internal.h.
 *
 * The page is api/ui.html, embedded into this object at build time with the
 * assembler's .incbin (paths are relative to the repository root, where make
 * runs; the Makefile makes this object depend on the HTML file). It loads no
 * external asset: its CSS and script are inline.
 *
 * /status answers JSON:
 *   {"model", "n_layers",
 *    "pool": {"pages_total", "pages_free", "page_tokens"},
 *    "sched": {"running", "waiting", "preemptions", "steps", "kv_tokens_evicted",
 *              "kv_tokens_merged", "kv_pages_freed"},
 *    "seqs": [{"id", "state" ("running" | "finished": the last ENG_VIEW_RECENT), "kv_method", "kv_budget", "compressed", "n_prompt",
 *              "n_generated", "pages": [per layer], "tokens": [per layer]}],
 *    "events": [{"seq", "id", "age_s", "phase", "evicted", "merged", "pages_freed"}],
 *    "last_event"}
 * with `?since=N` leaving out events numbered N or lower (the page passes the
 * newest it has seen).
 */
#include <jansson.h>
#include <math.h>
#include <stdlib.h>

#include "api/internal.h"
#include "common/util.h"

__asm__(".section .rodata\n"
        ".balign 16\n"
        ".global d2_api_ui_html\n"
        "d2_api_ui_html:\n"
        ".incbin \"api/ui.html\"\n"
        ".global d2_api_ui_html_end\n"
        "d2_api_ui_html_end:\n"
        ".byte 0\n"
        ".previous\n");
extern const char d2_api_ui_html[];
extern const char d2_api_ui_html_end[];

const char *api_ui_page(size_t *len) {
    *len = (size_t)(d2_api_ui_html_end - d2_api_ui_html);
    return d2_api_ui_html;
}

char *api_status_json(eng_engine *e, eng_sched *s, const char *model_name, uint64_t since) {
    eng_sched_view v;
    if (eng_sched_view_get(s, since, &v) != D2_OK) return NULL;
    eng_pool_stats ps = eng_engine_pool_stats(e);
    eng_sched_stats ss = eng_sched_get_stats(s);
    double now = d2_now();
    json_t *seqs = json_array();
    for (int i = 0; i < v.n_seqs; i++) {
        const eng_seq_view *q = &v.seqs[i];
        json_t *pages = json_array(), *toks = json_array();
        for (int l = 0; l < v.n_layers; l++) {
            json_array_append_new(pages, json_integer(q->pages[l]));
            json_array_append_new(toks, json_integer(q->tokens[l]));
        }
        json_t *budget = q->kv.method == ENG_KV_FULL ? json_null()
                         : q->kv.budget_tokens > 0   ? json_integer(q->kv.budget_tokens)
                                                     : json_real(round((double)q->kv.budget_frac * 1e6) / 1e6);
        json_array_append_new(seqs, json_pack("{s:I, s:s, s:s, s:o, s:b, s:i, s:i, s:o, s:o}", "id", (json_int_t)q->id,
                                              "state", q->finished ? "finished" : "running",
                                              "kv_method", eng_kv_method_name(q->kv.method), "kv_budget", budget,
                                              "compressed", q->compressed, "n_prompt", q->n_prompt, "n_generated",
                                              q->n_generated, "pages", pages, "tokens", toks));
    }
    json_t *evs = json_array();
    for (int i = 0; i < v.n_events; i++) {
        const eng_kv_event *ev = &v.events[i];
        json_array_append_new(evs, json_pack("{s:I, s:I, s:f, s:s, s:I, s:I, s:I}", "seq", (json_int_t)ev->seq, "id",
                                             (json_int_t)ev->id, "age_s", now - ev->t, "phase",
                                             ev->phase == ENG_KV_EVENT_PREFILL ? "prefill" : "decode", "evicted",
                                             (json_int_t)ev->evicted, "merged", (json_int_t)ev->merged, "pages_freed",
                                             (json_int_t)ev->pages_freed));
    }
    json_t *root = json_pack(
        "{s:s, s:i, s:{s:I, s:I, s:i}, s:{s:i, s:i, s:I, s:I, s:I, s:I, s:I}, s:o, s:o, s:I}", "model", model_name,
        "n_layers", v.n_layers, "pool", "pages_total", (json_int_t)ps.pages_total, "pages_free",
        (json_int_t)ps.pages_free, "page_tokens", ps.page_tokens, "sched", "running", ss.running, "waiting",
        ss.waiting, "preemptions", (json_int_t)ss.preemptions, "steps", (json_int_t)ss.steps, "kv_tokens_evicted",
        (json_int_t)ss.kv_tokens_evicted, "kv_tokens_merged", (json_int_t)ss.kv_tokens_merged, "kv_pages_freed",
        (json_int_t)ss.kv_pages_freed, "seqs", seqs, "events", evs, "last_event", (json_int_t)v.last_event);
    eng_sched_view_free(&v);
    if (!root) return NULL;
    char *out = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return out;
}
