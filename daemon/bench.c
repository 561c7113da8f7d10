/*
 * daemon/bench.c — `d2od bench`: CPU throughput figures as ratios measured in
 * one run.
 *
 *  1. The machine's copy bandwidth: best of several multi-threaded memcpy
 *     passes over buffers far larger than the caches, counted as STREAM does
 *     (bytes read + bytes written).
 *  2. The decode roofline: a decode step must stream every weight byte once
 *     (all layers plus the output matrix; the embedding table only when it is
 *     also the tied output), so tokens/s <= bandwidth / bytes-per-token at
 *     batch 1.
 *  3. Decode tokens/s at each batch size through the real engine loop
 *     (eng_run: paged pool, batched backend, sampler), timed from the step
 *     where every sequence has its first token to the end. After one untimed
 *     warm-up run the batch sizes are run --reps times, interleaved (1, 8, 32,
 *     then 32, 8, 1, ...), so a change in the machine's load hits every size
 *     alike; each size reports the median and the range of its runs, and the
 *     ratio to batch 1 is the median of the per-round ratios (both measured
 *     within one round).
 *     Bandwidth is also measured read-only (a multi-threaded sum); the
 *     roofline uses the larger of the two, so the fraction is conservative.
 * Reported: batch-1 tokens/s as a fraction of the roofline, and aggregate
 * tokens/s at batch B as a multiple of batch 1.
 *  4. KV-compression cost (--kv-method, default d2o; "none" skips; --kv-budget
 *     a share of the prompt or a token count, eng_kv_budget_parse): one
 *     sequence with a --kv-prompt token prompt through the scheduler (the
 *     daemon's path), full cache against the method, --kv-reps rounds
 *     (default 5) after an untimed full-cache run, in the order full, method /
 *     method, full / ...; reported: the median and range of the per-round
 *     shares, and the share of the best times (the figure before the rounds
 *     were interleaved). The
 *     engine has no timer inside the compression, so its cost is measured as
 *     the difference: (prefill with compression - prefill) / prefill (the
 *     end-of-prefill compression as a share of the prefill), and (decode
 *     step with compression - decode step) / decode step (eviction amortised
 *     per step, net of the faster attention over a smaller cache).
 *  5. The stall (daemon/bench_stall.c, --stall-prompt N, 0 skips): the p50/p99/
 *     max inter-token latency of --stall-decoders decoders alone, beside one
 *     N-token prompt with the full cache, and beside it compressed.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/status.h"
#include "common/util.h"
#include "daemon/bench_stall.h"
#include "daemon/cli.h"
#include "daemon/opts.h"
#include "engine/engine.h"

typedef struct copy_job { char *dst; const char *src; size_t n; } copy_job;

static void *copy_worker(void *arg) {
    copy_job *j = arg;
    memcpy(j->dst, j->src, j->n);
    return NULL;
}

/* Returns bytes/s (read + write) of the best of `reps` passes with n_threads threads. */
static double measure_copy_bandwidth(int n_threads, size_t bytes, int reps) {
    char *a = malloc(bytes), *b = malloc(bytes);
    if (!a || !b) { free(a); free(b); return 0; }
    memset(a, 1, bytes);
    memset(b, 2, bytes);
    if (n_threads < 1) n_threads = 1;
    if (n_threads > 64) n_threads = 64;
    pthread_t th[64];
    copy_job jobs[64];
    double best = 0;
    for (int r = 0; r < reps; r++) {
        size_t per = bytes / (size_t)n_threads;
        double t0 = d2_now();
        for (int t = 0; t < n_threads; t++) {
            jobs[t] = (copy_job){b + per * (size_t)t, a + per * (size_t)t,
                                 t == n_threads - 1 ? bytes - per * (size_t)t : per};
            pthread_create(&th[t], NULL, copy_worker, &jobs[t]);
        }
        for (int t = 0; t < n_threads; t++) pthread_join(th[t], NULL);
        double dt = d2_now() - t0;
        double bw = 2.0 * (double)bytes / dt;
        if (bw > best) best = bw;
    }
    free(a);
    free(b);
    return best;
}

typedef struct read_job { const uint64_t *p; size_t n; uint64_t sum; } read_job;

static void *read_worker(void *arg) {
    read_job *j = arg;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    size_t i = 0;
    for (; i + 4 <= j->n; i += 4) { a += j->p[i]; b += j->p[i + 1]; c += j->p[i + 2]; d += j->p[i + 3]; }
    for (; i < j->n; i++) a += j->p[i];
    j->sum = a + b + c + d;
    return NULL;
}

/* Returns bytes/s of the best of `reps` multi-threaded read-only passes (a sum,
 * so nothing is written): what streaming weights needs. */
static double measure_read_bandwidth(int n_threads, size_t bytes, int reps) {
    size_t n = bytes / sizeof(uint64_t);
    uint64_t *a = malloc(n * sizeof(uint64_t));
    if (!a) return 0;
    for (size_t i = 0; i < n; i++) a[i] = i;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > 64) n_threads = 64;
    pthread_t th[64];
    read_job jobs[64];
    double best = 0;
    volatile uint64_t sink = 0;
    for (int r = 0; r < reps; r++) {
        size_t per = n / (size_t)n_threads;
        double t0 = d2_now();
        for (int t = 0; t < n_threads; t++) {
            jobs[t] = (read_job){a + per * (size_t)t, t == n_threads - 1 ? n - per * (size_t)t : per, 0};
            pthread_create(&th[t], NULL, read_worker, &jobs[t]);
        }
        for (int t = 0; t < n_threads; t++) { pthread_join(th[t], NULL); sink += jobs[t].sum; }
        double bw = (double)(n * sizeof(uint64_t)) / (d2_now() - t0);
        if (bw > best) best = bw;
    }
    (void)sink;
    free(a);
    return best;
}

static int64_t tensor_bytes(const eng_tensor *t) {
    int64_t n = t->rows * t->cols;
    switch (t->dtype) {
    case ENG_F32: return n * 4;
    case ENG_F16:
    case ENG_BF16: return n * 2;
    case ENG_Q8_0: return n / 32 * 34;
    }
    return n * 4;
}

/* ---- repeated measurements ---------------------------------------------------------- */

#define BENCH_MAX_REPS 64

typedef struct spread { double med, lo, hi; } spread;

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Median, minimum and maximum of v[0..n) (n >= 1, n <= BENCH_MAX_REPS). */
static spread spread_of(const double *v, int n) {
    double s[BENCH_MAX_REPS];
    memcpy(s, v, sizeof(double) * (size_t)n);
    qsort(s, (size_t)n, sizeof(double), cmp_double);
    spread r = {n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]), s[0], s[n - 1]};
    return r;
}

static double min_of(const double *v, int n) {
    double m = v[0];
    for (int i = 1; i < n; i++) if (v[i] < m) m = v[i];
    return m;
}

/* ---- KV-compression cost ---------------------------------------------------------- */

typedef struct kv_probe { double t_first, t_done; int n, done, status; } kv_probe;

static int kv_probe_event(void *user, const eng_event *ev) {
    kv_probe *p = user;
    if (ev->type == ENG_EV_TOKEN) {
        p->n++;
    } else {
        p->t_first = ev->t_first_token;
        p->t_done = ev->t_done;
        p->status = ev->status;
        p->done = 1;
    }
    return 0;
}

/* One sequence through the scheduler in manual mode; *prefill_s = time to the
 * first token, *step_s = mean time of the later decode steps, *comp_s = time
 * the scheduler spent in the prompt's compression (eng_sched_stats). */
static int kv_run_once(eng_sched *s, const int32_t *prompt, int n_prompt, int gen, const eng_kv_config *kv,
                       double *prefill_s, double *step_s, double *comp_s) {
    double c0 = eng_sched_get_stats(s).kv_compress_prompt_s;
    kv_probe p = {0};
    eng_request q = {.prompt = prompt, .n_prompt = n_prompt, .max_tokens = gen, .ignore_eos = true,
                     .on_event = kv_probe_event, .user = &p};
    eng_sample_params_default(&q.sample);
    q.sample.temperature = 0;
    q.kv = *kv;
    uint64_t id;
    const char *why = NULL;
    int rc = eng_sched_submit(s, &q, &id, &why);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od bench: kv submit: %s (%s)\n", d2_strerror(rc), why ? why : "");
        return rc;
    }
    for (;;) {
        int r = eng_sched_step(s);
        if (r < 0) return r;
        if (r == 0) break;
    }
    if (!p.done || p.status != D2_OK) return p.done ? p.status : D2_EINTERNAL;
    *prefill_s = p.t_first;
    *step_s = p.n > 1 ? (p.t_done - p.t_first) / (p.n - 1) : 0;
    *comp_s = eng_sched_get_stats(s).kv_compress_prompt_s - c0;
    return D2_OK;
}

/* The rounds of section 4: per round r, prefill and step times of the full
 * cache (*_full[r]) and of the method (*_kv[r]), in alternating order. */
typedef struct kv_rounds {
    double pf_full[BENCH_MAX_REPS], st_full[BENCH_MAX_REPS], pf_kv[BENCH_MAX_REPS], st_kv[BENCH_MAX_REPS];
    double cp_kv[BENCH_MAX_REPS]; /* the method's prompt compression, timed by the scheduler */
} kv_rounds;

static int kv_run_rounds(eng_sched *s, const int32_t *prompt, int n_prompt, int gen, const eng_kv_config *full,
                         const eng_kv_config *kv, int reps, kv_rounds *out) {
    double w1, w2, w3;
    int rc = kv_run_once(s, prompt, n_prompt, gen, full, &w1, &w2, &w3); /* untimed warm-up */
    for (int r = 0; rc == D2_OK && r < reps; r++) {
        for (int j = 0; rc == D2_OK && j < 2; j++) {
            bool use_kv = (j == 0) == (r % 2 == 1); /* full, kv | kv, full | ... */
            rc = kv_run_once(s, prompt, n_prompt, gen, use_kv ? kv : full, use_kv ? &out->pf_kv[r] : &out->pf_full[r],
                             use_kv ? &out->st_kv[r] : &out->st_full[r], use_kv ? &out->cp_kv[r] : &w3);
        }
    }
    return rc;
}

/* Prints section 4's table and writes its JSON object. */
static void kv_report(const eng_kv_config *kv, dmn_kv_budget bud, int n_prompt, int gen, int reps, const kv_rounds *k,
                      const eng_sched_stats *st0, const eng_sched_stats *st1, char *json, size_t json_cap) {
    double pf_share[BENCH_MAX_REPS], st_share[BENCH_MAX_REPS], cp_share[BENCH_MAX_REPS];
    for (int r = 0; r < reps; r++) {
        pf_share[r] = (k->pf_kv[r] - k->pf_full[r]) / k->pf_full[r];
        st_share[r] = (k->st_kv[r] - k->st_full[r]) / k->st_full[r];
        cp_share[r] = k->cp_kv[r] / k->pf_full[r];
    }
    spread pf = spread_of(pf_share, reps), st = spread_of(st_share, reps);
    spread cp = spread_of(k->cp_kv, reps), cps = spread_of(cp_share, reps);
    spread pff = spread_of(k->pf_full, reps), pfk = spread_of(k->pf_kv, reps);
    spread stf = spread_of(k->st_full, reps), stk = spread_of(k->st_kv, reps);
    double pf_full = min_of(k->pf_full, reps), pf_kv = min_of(k->pf_kv, reps);
    double st_full = min_of(k->st_full, reps), st_kv = min_of(k->st_kv, reps);
    double pf_best = (pf_kv - pf_full) / pf_full, st_best = (st_kv - st_full) / st_full;
    const char *mn = eng_kv_method_name(kv->method);
    double budget = bud.tokens > 0 ? (double)bud.tokens : (double)bud.frac;
    printf("\nKV compression cost: %s at budget %g%s, prompt %d tokens, %d generated, batch 1, %d interleaved rounds\n",
           mn, budget, bud.tokens > 0 ? " tokens" : "", n_prompt, gen, reps);
    printf("  prefill      full %8.2f ms [%.2f-%.2f]   %s %8.2f ms [%.2f-%.2f]   (medians [range])\n", pff.med * 1e3,
           pff.lo * 1e3, pff.hi * 1e3, mn, pfk.med * 1e3, pfk.lo * 1e3, pfk.hi * 1e3);
    printf("    compression = %+6.1f%% of the prefill [%+.1f%% .. %+.1f%% over rounds]; best times: %+.1f%% "
           "(%.3f ms per prompt token)\n",
           100 * pf.med, 100 * pf.lo, 100 * pf.hi, 100 * pf_best, (pf_kv - pf_full) * 1e3 / n_prompt);
    printf("    compression timed alone = %.2f ms [%.2f-%.2f] = %.1f%% of the full prefill [%.1f%% .. %.1f%%] "
           "(%.4f ms per prompt token)\n",
           cp.med * 1e3, cp.lo * 1e3, cp.hi * 1e3, 100 * cps.med, 100 * cps.lo, 100 * cps.hi, cp.med * 1e3 / n_prompt);
    printf("  decode step  full %8.3f ms [%.3f-%.3f]   %s %8.3f ms [%.3f-%.3f]\n", stf.med * 1e3, stf.lo * 1e3,
           stf.hi * 1e3, mn, stk.med * 1e3, stk.lo * 1e3, stk.hi * 1e3);
    printf("    eviction (amortised, net) = %+6.1f%% of a step [%+.1f%% .. %+.1f%%]; best times: %+.1f%%\n",
           100 * st.med, 100 * st.lo, 100 * st.hi, 100 * st_best);
    printf("  per run: %lld tokens evicted, %lld merged, %lld pages freed\n",
           (long long)(st1->kv_tokens_evicted - st0->kv_tokens_evicted) / reps,
           (long long)(st1->kv_tokens_merged - st0->kv_tokens_merged) / reps,
           (long long)(st1->kv_pages_freed - st0->kv_pages_freed) / reps);
    snprintf(json, json_cap,
             "{\"bench\":\"kv_compression\",\"method\":\"%s\",\"budget\":%g,\"prompt\":%d,\"gen\":%d,\"reps\":%d,"
             "\"prefill_full_s\":%.6f,\"prefill_kv_s\":%.6f,\"prefill_overhead_frac\":%.4f,"
             "\"prefill_overhead_median\":%.4f,\"prefill_overhead_min\":%.4f,\"prefill_overhead_max\":%.4f,"
             "\"step_full_s\":%.6f,\"step_kv_s\":%.6f,\"step_overhead_frac\":%.4f,"
             "\"step_overhead_median\":%.4f,\"step_overhead_min\":%.4f,\"step_overhead_max\":%.4f,"
             "\"compress_s\":%.6f,\"compress_min_s\":%.6f,\"compress_max_s\":%.6f,"
             "\"compress_frac_median\":%.4f,\"compress_frac_min\":%.4f,\"compress_frac_max\":%.4f}",
             mn, budget, n_prompt, gen, reps, pf_full, pf_kv, pf_best, pf.med, pf.lo, pf.hi, st_full, st_kv, st_best,
             st.med, st.lo, st.hi, cp.med, cp.lo, cp.hi, cps.med, cps.lo, cps.hi);
}

/* Section 4; writes its JSON object to json. */
static int bench_kv(const char *model, int threads, int device, int method, dmn_kv_budget budget, int n_prompt,
                    int gen, int reps, char *json, size_t json_cap) {
    eng_engine_config ec = {.model_path = model, .device = (eng_device)device, .n_threads = threads,
                            .max_seqs = 1, .ctx_len = n_prompt + gen + 1};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) return rc;
    eng_sched *s = NULL;
    eng_sched_config sc = {.max_queue = 16};
    rc = eng_sched_create(e, &sc, &s);
    if (rc != D2_OK) { eng_engine_destroy(e); return rc; }
    const eng_model *m = eng_engine_model(e);
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)n_prompt);
    kv_rounds *k = calloc(1, sizeof *k);
    uint64_t rng = 777;
    for (int t = 0; prompt && t < n_prompt; t++) {
        rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
        prompt[t] = (int32_t)((rng >> 33) % (uint64_t)m->cfg.vocab_size);
    }
    eng_kv_config full, kv;
    eng_kv_config_default(&full, ENG_KV_FULL);
    eng_kv_config_default(&kv, (eng_kv_method)method);
    kv.budget_frac = budget.frac;
    kv.budget_tokens = budget.tokens;
    const char *why = NULL;
    if (!prompt || !k) rc = D2_ENOMEM;
    else if (eng_kv_config_validate(&kv, &why) != D2_OK) {
        fprintf(stderr, "d2od bench: --kv-method/--kv-budget: invalid %s\n", why ? why : "config");
        rc = D2_EINVAL;
    }
    eng_sched_stats st0 = eng_sched_get_stats(s);
    if (rc == D2_OK) rc = kv_run_rounds(s, prompt, n_prompt, gen, &full, &kv, reps, k);
    eng_sched_stats st1 = eng_sched_get_stats(s);
    if (rc == D2_OK) kv_report(&kv, budget, n_prompt, gen, reps, k, &st0, &st1, json, json_cap);
    free(k);
    free(prompt);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
    return rc;
}

/* ---- options and entry -------------------------------------------------------------- */

/* --kv-method: "none" skips section 4; the others keep the engine's numbering
 * (index 1 = ENG_KV_D2O, ...), "full" is not a compression method here. */
static const char *const BENCH_KV_METHODS[] = {"none", "d2o", "h2o", "streamingllm", "snapkv", "pyramidkv", NULL};
_Static_assert(ENG_KV_D2O == 1 && ENG_KV_H2O == 2 && ENG_KV_STREAMINGLLM == 3 && ENG_KV_SNAPKV == 4 &&
                   ENG_KV_PYRAMIDKV == 5,
               "BENCH_KV_METHODS follows eng_kv_method");

typedef struct bench_opts {
    const char *model;
    dmn_int_list batches;
    int threads, device, prompt, gen, reps, kv_method, kv_prompt, kv_gen, kv_reps, stall_prompt, stall_decoders;
    dmn_kv_budget kv_budget;
} bench_opts;

#define OFF(f) offsetof(bench_opts, f)
static const dmn_opt BENCH_OPTS[] = {
    DMN_OPT_ROW_MODEL(bench_opts),
    {.name = "batches", .type = DMN_OPT_INT_LIST, .offset = OFF(batches), .def = "1,8,32", .min = 1, .max = 4096,
     .help = "batch sizes to time"},
    {.name = "prompt", .type = DMN_OPT_INT, .offset = OFF(prompt), .def = "32", .min = 1, .max = 1 << 20,
     .help = "prompt tokens per sequence"},
    {.name = "gen", .type = DMN_OPT_INT, .offset = OFF(gen), .def = "64", .min = 2, .max = 1 << 20,
     .help = "tokens generated per sequence"},
    {.name = "reps", .type = DMN_OPT_INT, .offset = OFF(reps), .def = "3", .min = 1, .max = BENCH_MAX_REPS,
     .help = "interleaved rounds over the batch sizes (median and range printed)"},
    DMN_OPT_ROW_THREADS(bench_opts),
    DMN_OPT_ROW_DEVICE(bench_opts),
    {.name = "kv-method", .type = DMN_OPT_ENUM, .offset = OFF(kv_method), .def = "d2o", .names = BENCH_KV_METHODS,
     .help = "KV-compression method to cost (none: skip)"},
    {.name = "kv-budget", .type = DMN_OPT_KV_BUDGET, .offset = OFF(kv_budget), .def = "0.2",
     .help = "share of the prompt's length kept in (0,1], or a token count >= 2, per layer"},
    {.name = "kv-prompt", .type = DMN_OPT_INT, .offset = OFF(kv_prompt), .def = "256", .min = 8, .max = 1 << 20,
     .help = "prompt tokens of the KV-compression run"},
    {.name = "kv-gen", .type = DMN_OPT_INT, .offset = OFF(kv_gen), .def = "64", .min = 2, .max = 1 << 20,
     .help = "tokens generated in the KV-compression run"},
    {.name = "kv-reps", .type = DMN_OPT_INT, .offset = OFF(kv_reps), .def = "5", .min = 1, .max = BENCH_MAX_REPS,
     .help = "interleaved rounds of the KV-compression run (full and compressed alternate)"},
    {.name = "stall-prompt", .type = DMN_OPT_INT, .offset = OFF(stall_prompt), .def = "1024", .min = 0,
     .max = 1 << 20, .help = "prompt of the stall run (section 5), 0 = skip it"},
    {.name = "stall-decoders", .type = DMN_OPT_INT, .offset = OFF(stall_decoders), .def = "4", .min = 1, .max = 256,
     .help = "concurrent decoders the stall run times"},
};
#undef OFF

static const dmn_cmd_spec BENCH_CMD = {
    .name = "bench",
    .usage = "--model M [options]",
    .about = "Measures copy bandwidth, the batch-1 decode roofline (weight bytes per token /\n"
             "bandwidth) and decode tokens/s at each batch size through the engine loop, over\n"
             "--reps interleaved rounds; then the cost of KV compression as a share of the\n"
             "prefill and of a decode step over --kv-reps rounds. Medians and ranges.\n"
             "Prints tables and JSON lines.",
    .opts = BENCH_OPTS,
    .n_opts = (int)(sizeof BENCH_OPTS / sizeof BENCH_OPTS[0]),
    .size = sizeof(bench_opts),
};

/* Sections 1 and 2: bandwidth and the roofline; prints the header. Returns
 * the roofline in tokens/s and writes the opening of the JSON line. */
static double bench_roofline(const bench_opts *o, const eng_model *m, char *json, size_t cap, int *jl) {
    int64_t wbytes = eng_model_weight_bytes(m);
    int64_t stream_bytes = wbytes;
    if (!m->cfg.tied_embeddings) {
        /* a decode step reads one embedding row, not the table */
        stream_bytes -= tensor_bytes(&m->tok_embd);
    }
    int bw_threads = o->threads > 0 ? o->threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    double bw_copy = measure_copy_bandwidth(bw_threads, (size_t)512 << 20, 5);
    double bw_read = measure_read_bandwidth(bw_threads, (size_t)512 << 20, 5);
    /* The roofline uses the larger of the two measurements, so the fraction
     * reported is the conservative one. */
    double bw = bw_copy > bw_read ? bw_copy : bw_read;
    double roofline = bw / (double)stream_bytes;
    printf("model: %s (%.1fM params, %.1f MB weights, %.1f MB streamed per decode step)\n", o->model,
           (double)eng_model_n_params(m) / 1e6, (double)wbytes / 1e6, (double)stream_bytes / 1e6);
    printf("memory bandwidth: copy %.2f GB/s (read+write counted, as STREAM), read-only %.2f GB/s; %d threads\n",
           bw_copy / 1e9, bw_read / 1e9, bw_threads);
    printf("batch-1 decode roofline: %.1f tokens/s\n\n", roofline);
    *jl = snprintf(json, cap,
                   "{\"bench\":\"cpu_decode\",\"params\":%lld,\"stream_bytes\":%lld,"
                   "\"copy_bw_Bps\":%.0f,\"read_bw_Bps\":%.0f,\"roofline_tps\":%.2f,\"reps\":%d,\"batches\":[",
                   (long long)eng_model_n_params(m), (long long)stream_bytes, bw_copy, bw_read, roofline, o->reps);
    return roofline;
}

/* Section 3 for one batch size: B random prompts through eng_run; *tps =
 * aggregate decode tokens/s from the step where every sequence has its first
 * token to the end. */
static int bench_batch(eng_engine *e, int B, int prompt_len, int gen, uint64_t *rng, double *tps) {
    const eng_model *m = eng_engine_model(e);
    eng_gen_seq *seqs = calloc((size_t)B, sizeof *seqs);
    int32_t *prompts = malloc(sizeof(int32_t) * (size_t)B * (size_t)prompt_len);
    if (!seqs || !prompts) {
        free(seqs);
        free(prompts);
        return D2_ENOMEM;
    }
    for (int s = 0; s < B; s++) {
        for (int t = 0; t < prompt_len; t++) {
            *rng = *rng * 6364136223846793005ULL + 1442695040888963407ULL;
            prompts[(size_t)s * (size_t)prompt_len + (size_t)t] = (int32_t)((*rng >> 33) % (uint64_t)m->cfg.vocab_size);
        }
        seqs[s].prompt = prompts + (size_t)s * (size_t)prompt_len;
        seqs[s].n_prompt = prompt_len;
        seqs[s].max_tokens = gen;
        seqs[s].ignore_eos = true;
        eng_sample_params_default(&seqs[s].sample);
        seqs[s].sample.temperature = 0;
    }
    int rc = eng_run(e, seqs, B);
    double first = 0, done = 0;
    long toks = 0;
    for (int s = 0; s < B; s++) {
        if (seqs[s].status != D2_OK) rc = seqs[s].status;
        if (seqs[s].t_first_token > first) first = seqs[s].t_first_token;
        if (seqs[s].t_done > done) done = seqs[s].t_done;
        toks += seqs[s].n_out - 1;
    }
    free(seqs);
    free(prompts);
    *tps = done > first ? (double)toks / (done - first) : 0;
    return rc;
}

/* Sections 1-3 on one engine: the batch sizes interleaved over o->reps
 * rounds (forward, then backward, ...); prints the table and the JSON line.
 * The reference size is batch 1 when listed, else the first listed. */
static int bench_decode(const bench_opts *o, eng_engine *e) {
    char json[4096];
    int jl = 0;
    double roofline = bench_roofline(o, eng_engine_model(e), json, sizeof json, &jl);
    double tps[16][BENCH_MAX_REPS];
    double ratio[BENCH_MAX_REPS];
    int ref = 0;
    for (int k = 0; k < o->batches.n; k++) if (o->batches.v[k] == 1) { ref = k; break; }
    uint64_t rng = 12345;
    /* One untimed run at the largest size first: page faults in the pool and
     * the first touch of the weights would otherwise land in round 0. */
    int max_k = 0;
    for (int k = 0; k < o->batches.n; k++) if (o->batches.v[k] > o->batches.v[max_k]) max_k = k;
    int wrc = bench_batch(e, o->batches.v[max_k], o->prompt, o->gen, &rng, &tps[max_k][0]);
    if (wrc != D2_OK) {
        fprintf(stderr, "d2od bench: warm-up at batch %d failed: %s\n", o->batches.v[max_k], d2_strerror(wrc));
        return wrc;
    }
    for (int r = 0; r < o->reps; r++) {
        for (int j = 0; j < o->batches.n; j++) {
            int k = r % 2 ? o->batches.n - 1 - j : j;
            int rc = bench_batch(e, o->batches.v[k], o->prompt, o->gen, &rng, &tps[k][r]);
            if (rc != D2_OK) {
                fprintf(stderr, "d2od bench: batch %d failed: %s\n", o->batches.v[k], d2_strerror(rc));
                return rc;
            }
        }
    }
    printf("%d interleaved rounds; median [min-max] over rounds; the ratio is taken within each round\n", o->reps);
    printf("%6s %28s %26s %14s\n", "batch", "tokens/s", "vs batch 1", "of roofline");
    spread t1 = spread_of(tps[ref], o->reps);
    for (int k = 0; k < o->batches.n; k++) {
        for (int r = 0; r < o->reps; r++) ratio[r] = tps[ref][r] > 0 ? tps[k][r] / tps[ref][r] : 0;
        spread t = spread_of(tps[k], o->reps), x = spread_of(ratio, o->reps);
        char a[64], b[64];
        snprintf(a, sizeof a, "%.1f [%.1f-%.1f]", t.med, t.lo, t.hi);
        snprintf(b, sizeof b, "%.2fx [%.2f-%.2f]", x.med, x.lo, x.hi);
        if (k == ref) printf("%6d %28s %26s %13.1f%%\n", o->batches.v[k], a, b, 100.0 * t.med / roofline);
        else printf("%6d %28s %26s %14s\n", o->batches.v[k], a, b, "-");
        jl += snprintf(json + jl, sizeof json - (size_t)jl,
                       "%s{\"batch\":%d,\"tps\":%.2f,\"tps_min\":%.2f,\"tps_max\":%.2f,\"x_batch1\":%.3f,"
                       "\"x_min\":%.3f,\"x_max\":%.3f}",
                       k ? "," : "", o->batches.v[k], t.med, t.lo, t.hi, x.med, x.lo, x.hi);
    }
    snprintf(json + jl, sizeof json - (size_t)jl, "],\"batch1_roofline_frac\":%.4f}", t1.med / roofline);
    printf("\nbatch-1 decode = %.1f%% of the memory roofline (median; %.1f-%.1f%%)\n", 100.0 * t1.med / roofline,
           100.0 * t1.lo / roofline, 100.0 * t1.hi / roofline);
    printf("%s\n", json);
    return D2_OK;
}

int d2_cmd_bench(int argc, char **argv) {
    bench_opts o;
    int ec_ = dmn_opts_main(&BENCH_CMD, &o, argc, argv);
    if (ec_ >= 0) return ec_;
    int max_b = 1;
    for (int k = 0; k < o.batches.n; k++) if (o.batches.v[k] > max_b) max_b = o.batches.v[k];
    eng_engine_config ec = {.model_path = o.model, .device = (eng_device)o.device, .n_threads = o.threads,
                            .max_seqs = max_b, .ctx_len = o.prompt + o.gen + 1};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od bench: cannot load %s: %s\n", o.model, d2_strerror(rc));
        return 1;
    }
    rc = bench_decode(&o, e);
    eng_engine_destroy(e);
    if (rc != D2_OK) return 1;
    if (o.kv_method > 0) {
        char json[2048];
        rc = bench_kv(o.model, o.threads, o.device, o.kv_method, o.kv_budget, o.kv_prompt, o.kv_gen, o.kv_reps,
                      json, sizeof json);
        if (rc != D2_OK) {
            fprintf(stderr, "d2od bench: KV-compression run failed: %s\n", d2_strerror(rc));
            return 1;
        }
        printf("%s\n", json);
        if (o.stall_prompt > 0) {
            eng_kv_config kv;
            eng_kv_config_default(&kv, (eng_kv_method)o.kv_method);
            kv.budget_frac = o.kv_budget.frac;
            kv.budget_tokens = o.kv_budget.tokens;
            rc = d2_bench_kv_stall(o.model, o.threads, &kv, o.stall_prompt, o.stall_decoders, json, sizeof json);
            if (rc != D2_OK) {
                fprintf(stderr, "d2od bench: stall run failed: %s\n", d2_strerror(rc));
                return 1;
            }
            printf("%s\n", json);
        }
    }
    return 0;
}
