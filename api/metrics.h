/*
 * api/metrics.h — Prometheus metrics in vLLM's vocabulary under the `d2od:`
 * prefix (module-internal header of api/). Counters and histograms are
 * updated under one mutex when a request ends (never per token on the engine
 * thread: token times are recorded in the request and added here at its
 * end); rendering takes a consistent snapshot.
 */
#ifndef D2_API_METRICS_H
#define D2_API_METRICS_H

#include "engine/engine.h"

typedef struct api_metrics api_metrics;

int api_metrics_create(api_metrics **out);
void api_metrics_destroy(api_metrics *m);
void api_metrics_ttft(api_metrics *m, double s);
void api_metrics_itl(api_metrics *m, double s);
/* A finished choice's token times in one go: dt[0] is its time to first token,
 * the rest inter-token latencies; dt is read with the given stride in bytes. */
void api_metrics_token_times(api_metrics *m, const float *dt, size_t stride, int n);
void api_metrics_request_done(api_metrics *m, const char *finish_reason, double e2e_s, int n_preempted);
void api_metrics_prompt_tokens(api_metrics *m, int n);
void api_metrics_http_error(api_metrics *m, int status);
/* Prometheus text exposition; malloc'd (caller frees). */
char *api_metrics_render(api_metrics *m, const eng_sched_stats *ss, const eng_pool_stats *ps, const char *model);

#endif
