/*
 * api/metrics.c — see metrics.h. Histogram buckets follow vLLM's.
 */
#include "api/metrics.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"

#define MAXB 24

typedef struct hist {
    const double *bounds;
    int n;
    long long counts[MAXB]; /* per bucket, not cumulative */
    long long total;
    double sum;
} hist;

static const double TTFT_B[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0};
static const double ITL_B[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0};
static const double E2E_B[] = {0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

struct api_metrics {
    pthread_mutex_t mu;
    hist ttft, itl, e2e;
    long long fin_stop, fin_length, fin_abort, fin_error;
    long long http_4xx, http_5xx, http_429;
};

static void hist_init(hist *h, const double *b, int n) { memset(h, 0, sizeof *h); h->bounds = b; h->n = n; }

static void hist_add(hist *h, double v) {
    int i = 0;
    while (i < h->n && v > h->bounds[i]) i++;
    h->counts[i]++;
    h->total++;
    h->sum += v;
}

int api_metrics_create(api_metrics **out) {
    api_metrics *m = calloc(1, sizeof *m);
    if (!m) return D2_ENOMEM;
    pthread_mutex_init(&m->mu, NULL);
    hist_init(&m->ttft, TTFT_B, (int)(sizeof TTFT_B / sizeof TTFT_B[0]));
    hist_init(&m->itl, ITL_B, (int)(sizeof ITL_B / sizeof ITL_B[0]));
    hist_init(&m->e2e, E2E_B, (int)(sizeof E2E_B / sizeof E2E_B[0]));
    *out = m;
    return D2_OK;
}

void api_metrics_destroy(api_metrics *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void api_metrics_ttft(api_metrics *m, double s) { pthread_mutex_lock(&m->mu); hist_add(&m->ttft, s); pthread_mutex_unlock(&m->mu); }
void api_metrics_itl(api_metrics *m, double s) { pthread_mutex_lock(&m->mu); hist_add(&m->itl, s); pthread_mutex_unlock(&m->mu); }
void api_metrics_token_times(api_metrics *m, const float *dt, size_t stride, int n) {
    if (n <= 0) return;
    pthread_mutex_lock(&m->mu);
    hist_add(&m->ttft, dt[0]);
    for (int i = 1; i < n; i++) hist_add(&m->itl, *(const float *)((const char *)dt + stride * (size_t)i));
    pthread_mutex_unlock(&m->mu);
}
void api_metrics_prompt_tokens(api_metrics *m, int n) { (void)m; (void)n; /* counted by the scheduler */ }

void api_metrics_request_done(api_metrics *m, const char *fin, double e2e, int n_preempted) {
    (void)n_preempted;
    pthread_mutex_lock(&m->mu);
    hist_add(&m->e2e, e2e);
    if (!strcmp(fin, "stop")) m->fin_stop++;
    else if (!strcmp(fin, "length")) m->fin_length++;
    else if (!strcmp(fin, "abort")) m->fin_abort++;
    else m->fin_error++;
    pthread_mutex_unlock(&m->mu);
}

void api_metrics_http_error(api_metrics *m, int status) {
    pthread_mutex_lock(&m->mu);
    if (status == 429) m->http_429++;
    if (status >= 500) m->http_5xx++;
    else if (status >= 400) m->http_4xx++;
    pthread_mutex_unlock(&m->mu);
}

typedef struct sbuf { char *p; size_t len, cap; } sbuf;

static void sb_fmt(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_fmt(sbuf *b, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) return;
        if (b->p && b->len + (size_t)n < b->cap) { b->len += (size_t)n; return; }
        size_t cap = b->cap ? b->cap * 2 : 4096;
        while (cap < b->len + (size_t)n + 1) cap *= 2;
        char *np = realloc(b->p, cap);
        if (!np) return;
        b->p = np;
        b->cap = cap;
    }
}

static void render_hist(sbuf *b, const char *name, const char *help, const hist *h, const char *model) {
    sb_fmt(b, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    long long cum = 0;
    for (int i = 0; i < h->n; i++) {
        cum += h->counts[i];
        sb_fmt(b, "%s_bucket{model_name=\"%s\",le=\"%g\"} %lld\n", name, model, h->bounds[i], cum);
    }
    sb_fmt(b, "%s_bucket{model_name=\"%s\",le=\"+Inf\"} %lld\n", name, model, h->total);
    sb_fmt(b, "%s_sum{model_name=\"%s\"} %.6f\n%s_count{model_name=\"%s\"} %lld\n", name, model, h->sum, name, model, h->total);
}

char *api_metrics_render(api_metrics *m, const eng_sched_stats *ss, const eng_pool_stats *ps, const char *model) {
    sbuf b = {0};
    pthread_mutex_lock(&m->mu);
#define GAUGE(n, h, fmtv, v) sb_fmt(&b, "# HELP " n " " h "\n# TYPE " n " gauge\n" n "{model_name=\"%s\"} " fmtv "\n", model, v)
#define COUNTER(n, h, v) sb_fmt(&b, "# HELP " n " " h "\n# TYPE " n " counter\n" n "{model_name=\"%s\"} %lld\n", model, (long long)(v))
    GAUGE("d2od:num_requests_running", "Sequences in the running batch.", "%d", ss->running);
    GAUGE("d2od:num_requests_decoding", "Running sequences past their prompt's prefill (holding its KV cache, decoding).",
          "%d", ss->decoding);
    GAUGE("d2od:num_requests_waiting", "Sequences waiting for admission.", "%d", ss->waiting);
    GAUGE("d2od:kv_cache_usage_perc", "Fraction of KV pages in use (1 = full).", "%.6f",
          ps->pages_total ? (double)(ps->pages_total - ps->pages_free) / (double)ps->pages_total : 0.0);
    GAUGE("d2od:kv_pages_total", "KV pages in the pool.", "%lld", (long long)ps->pages_total);
    GAUGE("d2od:kv_pages_free", "KV pages free.", "%lld", (long long)ps->pages_free);
    COUNTER("d2od:num_preemptions_total", "Sequences preempted for lack of KV pages.", ss->preemptions);
    COUNTER("d2od:prompt_tokens_total", "Prompt tokens prefilled (recomputation after preemption included).", ss->prompt_tokens);
    COUNTER("d2od:generation_tokens_total", "Tokens generated.", ss->generation_tokens);
    COUNTER("d2od:kv_tokens_evicted_total", "Tokens evicted by KV compression.", ss->kv_tokens_evicted);
    COUNTER("d2od:kv_tokens_merged_total", "Evicted tokens merged into retained ones by KV compression.", ss->kv_tokens_merged);
    COUNTER("d2od:kv_pages_freed_by_compression_total", "KV pages returned to the pool by compression.", ss->kv_pages_freed);
    sb_fmt(&b, "# HELP d2od:request_success_total Finished requests by reason.\n# TYPE d2od:request_success_total counter\n");
    sb_fmt(&b, "d2od:request_success_total{model_name=\"%s\",finished_reason=\"stop\"} %lld\n", model, m->fin_stop);
    sb_fmt(&b, "d2od:request_success_total{model_name=\"%s\",finished_reason=\"length\"} %lld\n", model, m->fin_length);
    sb_fmt(&b, "d2od:request_success_total{model_name=\"%s\",finished_reason=\"abort\"} %lld\n", model, m->fin_abort);
    COUNTER("d2od:request_errors_total", "Requests that ended in an engine error.", m->fin_error);
    COUNTER("d2od:http_4xx_total", "Requests answered with a 4xx status.", m->http_4xx);
    COUNTER("d2od:http_5xx_total", "Requests answered with a 5xx status.", m->http_5xx);
    render_hist(&b, "d2od:time_to_first_token_seconds", "Time to first token.", &m->ttft, model);
    render_hist(&b, "d2od:inter_token_latency_seconds", "Time between consecutive tokens.", &m->itl, model);
    render_hist(&b, "d2od:e2e_request_latency_seconds", "End-to-end request latency.", &m->e2e, model);
#undef GAUGE
#undef COUNTER
    pthread_mutex_unlock(&m->mu);
    return b.p;
}
