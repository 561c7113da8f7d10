/*
 * daemon/bench_stall.c — `d2od bench` section 5: how much a long prompt's
 * prefill and KV compression stall the sequences that are decoding beside it.
 * Called only from daemon/bench.c.
 *
 * D decoders run through the scheduler in manual mode (short prompts, greedy,
 * EOS ignored). Their inter-token latencies (ITL: time between two tokens of
 * one decoder) are recorded (a) alone for a number of steps, then (b) while
 * one request with a P-token prompt and max_tokens 1 is admitted, prefilled in
 * chunks and retired, with the full cache and with the compression method,
 * alternately, STALL_REPS times each (the samples of all repetitions pooled). Reported: p50, p99 and max ITL of the decoders in each phase; the
 * compressed run's excess over the full-cache run is the compression's stall
 * (it runs on the engine thread between two steps of everyone else).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "common/util.h"
#include "daemon/bench_stall.h"

#define STALL_MAX_SAMPLES 65536
#define STALL_REPS 5

typedef struct stall_dec {
    double t_last;
    double *itl;   /* shared sample buffer */
    int *n_itl;
    int recording;
} stall_dec;

static int dec_event(void *user, const eng_event *ev) {
    stall_dec *d = user;
    if (ev->type != ENG_EV_TOKEN) return 0;
    double now = d2_now();
    if (d->recording && d->t_last > 0 && *d->n_itl < STALL_MAX_SAMPLES) d->itl[(*d->n_itl)++] = now - d->t_last;
    d->t_last = now;
    return 0;
}

typedef struct long_req { int done, status; } long_req;

static int long_event(void *user, const eng_event *ev) {
    long_req *l = user;
    if (ev->type == ENG_EV_DONE) {
        l->done = 1;
        l->status = ev->status;
    }
    return 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double *v, int n, double q) {
    if (n <= 0) return NAN;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    int i = (int)ceil(q * n) - 1;
    return v[i < 0 ? 0 : i >= n ? n - 1 : i];
}

typedef struct stall_fig { double p50, p99, max; int n; } stall_fig;

static stall_fig figures(double *v, int n) {
    stall_fig f = {pct(v, n, 0.5), pct(v, n, 0.99), n ? v[n - 1] : NAN, n};
    if (n > 0) f.max = pct(v, n, 1.0);
    return f;
}

int d2_bench_kv_stall(const char *model, int threads, const eng_kv_config *kv, int n_prompt, int n_decoders,
                      char *json, size_t json_cap) {
    const int steps_alone = 48;
    eng_engine_config ec = {.model_path = model, .n_threads = threads, .max_seqs = n_decoders + 1,
                            .ctx_len = n_prompt + 2 > 4096 ? n_prompt + 2 : 4096};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) return rc;
    eng_sched *s = NULL;
    eng_sched_config sc = {.max_queue = 64};
    rc = eng_sched_create(e, &sc, &s);
    if (rc != D2_OK) { eng_engine_destroy(e); return rc; }
    int vocab = eng_engine_model(e)->cfg.vocab_size;
    int ctx = eng_engine_ctx_len(e);
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)(n_prompt + 16));
    double *itl = malloc(sizeof(double) * STALL_MAX_SAMPLES * 3); /* alone, full, method */
    stall_dec *dec = calloc((size_t)n_decoders, sizeof *dec);
    if (!prompt || !itl || !dec) rc = D2_ENOMEM;
    uint64_t rng = 4242;
    for (int t = 0; rc == D2_OK && t < n_prompt + 16; t++) {
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        prompt[t] = (int32_t)((rng >> 33) % (uint64_t)vocab);
    }
    int n_itl = 0;
    /* the decoders: long enough to outlive both long prompts */
    for (int d = 0; rc == D2_OK && d < n_decoders; d++) {
        dec[d] = (stall_dec){.itl = itl, .n_itl = &n_itl};
        eng_request q = {.prompt = prompt + d, .n_prompt = 8, .max_tokens = ctx - 16, .ignore_eos = true,
                         .on_event = dec_event, .user = &dec[d]};
        eng_sample_params_default(&q.sample);
        q.sample.temperature = 0;
        const char *why = NULL;
        rc = eng_sched_submit(s, &q, NULL, &why);
    }
    for (int k = 0; rc == D2_OK && k < 4; k++) rc = eng_sched_step(s) < 0 ? D2_EINTERNAL : D2_OK; /* warm */
    stall_fig alone, with[2];
    memset(&alone, 0, sizeof alone);
    memset(with, 0, sizeof with);
    /* (a) alone */
    for (int d = 0; d < n_decoders; d++) dec[d].recording = 1;
    for (int k = 0; rc == D2_OK && k < steps_alone; k++) rc = eng_sched_step(s) < 0 ? D2_EINTERNAL : D2_OK;
    if (rc == D2_OK) alone = figures(itl, n_itl);
    /* (b) beside a long prompt: full cache and the method, alternately */
    int n_pass[2] = {0, 0};
    double comp_s = 0; /* the compressed prompts' compression, timed by the scheduler */
    for (int it = 0; rc == D2_OK && it < 2 * STALL_REPS; it++) {
        int pass = it % 2;
        for (int d = 0; d < n_decoders; d++) dec[d].itl = itl + (size_t)(1 + pass) * STALL_MAX_SAMPLES;
        n_itl = n_pass[pass];
        long_req lr = {0};
        eng_request q = {.prompt = prompt, .n_prompt = n_prompt, .max_tokens = 1, .ignore_eos = true,
                         .on_event = long_event, .user = &lr};
        eng_sample_params_default(&q.sample);
        q.sample.temperature = 0;
        if (pass == 1) q.kv = *kv;
        const char *why = NULL;
        rc = eng_sched_submit(s, &q, NULL, &why);
        if (rc != D2_OK) {
            fprintf(stderr, "d2od bench: stall: submit: %s (%s)\n", d2_strerror(rc), why ? why : "");
            break;
        }
        double c0 = eng_sched_get_stats(s).kv_compress_prompt_s;
        for (int guard = 0; rc == D2_OK && !lr.done && guard < 100000; guard++)
            rc = eng_sched_step(s) < 0 ? D2_EINTERNAL : D2_OK;
        comp_s += eng_sched_get_stats(s).kv_compress_prompt_s - c0;
        for (int k = 0; rc == D2_OK && k < 2; k++) rc = eng_sched_step(s) < 0 ? D2_EINTERNAL : D2_OK;
        if (rc == D2_OK && lr.status != D2_OK) rc = lr.status;
        n_pass[pass] = n_itl;
    }
    for (int pass = 0; rc == D2_OK && pass < 2; pass++)
        with[pass] = figures(itl + (size_t)(1 + pass) * STALL_MAX_SAMPLES, n_pass[pass]);
    if (rc == D2_OK) {
        const char *mn = eng_kv_method_name(kv->method);
        printf("\nStall of %d decoders beside one %d-token prompt (inter-token latency, ms):\n", n_decoders, n_prompt);
        printf("  alone                      p50 %8.2f  p99 %8.2f  max %8.2f  (%d ITLs)\n", alone.p50 * 1e3,
               alone.p99 * 1e3, alone.max * 1e3, alone.n);
        printf("  beside it, full cache      p50 %8.2f  p99 %8.2f  max %8.2f  (%d ITLs)\n", with[0].p50 * 1e3,
               with[0].p99 * 1e3, with[0].max * 1e3, with[0].n);
        printf("  beside it, %-14s  p50 %8.2f  p99 %8.2f  max %8.2f  (%d ITLs); compression stall = max - full max"
               " = %.2f ms\n",
               mn, with[1].p50 * 1e3, with[1].p99 * 1e3, with[1].max * 1e3, with[1].n,
               (with[1].max - with[0].max) * 1e3);
        printf("  the prompt's compression itself: %.2f ms (mean of %d, timed by the scheduler)\n",
               comp_s * 1e3 / STALL_REPS, STALL_REPS);
        snprintf(json, json_cap,
                 "{\"bench\":\"kv_stall\",\"method\":\"%s\",\"prompt\":%d,\"decoders\":%d,"
                 "\"itl_alone_p50_s\":%.6f,\"itl_alone_p99_s\":%.6f,\"itl_alone_max_s\":%.6f,"
                 "\"itl_full_p50_s\":%.6f,\"itl_full_p99_s\":%.6f,\"itl_full_max_s\":%.6f,"
                 "\"itl_kv_p50_s\":%.6f,\"itl_kv_p99_s\":%.6f,\"itl_kv_max_s\":%.6f,\"kv_compress_s\":%.6f}",
                 mn, n_prompt, n_decoders, alone.p50, alone.p99, alone.max, with[0].p50, with[0].p99, with[0].max,
                 with[1].p50, with[1].p99, with[1].max, comp_s / STALL_REPS);
    }
    free(prompt);
    free(itl);
    eng_sched_destroy(s); /* cancels the decoders */
    free(dec);
    eng_engine_destroy(e);
    return rc;
}
