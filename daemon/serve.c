/*
 * daemon/serve.c — `d2od serve`: the daemon's life cycle on a libuv loop.
 *
 *   load config (file < environment < command line) -> load model, reserve
 *   the KV pool -> start the scheduler thread -> start HTTP -> one warm-up
 *   generation -> /health turns 200 and systemd gets READY=1.
 *
 * The libuv loop owns the process's signals and timers:
 *   SIGTERM/SIGINT  STOPPING=1, stop accepting (new requests get 503), let
 *                   in-flight requests finish up to drain_timeout_s, cancel
 *                   the rest, then exit 0. A second signal cancels every
 *                   request at once and exits within about a second.
 *   SIGHUP          reload the live settings (log level, limits, API key,
 *                   queue size, timeout) and warn about the ones that need a
 *                   restart (RELOADING=1 ... READY=1).
 *   timers          request deadlines (100 ms), systemd watchdog (half of
 *                   WATCHDOG_USEC).
 *   a lost backend  (eng_sched_fatal, polled every 100 ms: a sticky CUDA
 *                   error) the engine has already failed every request with
 *                   a 500; the failing call is logged, the drain sends those
 *                   answers, and the process exits with status 1 rather than
 *                   serve what a broken device computes (systemd restarts it).
 * HTTP runs on libmicrohttpd's thread and generation on the engine thread;
 * this thread never blocks on either.
 */
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "api/api.h"
#include "common/log.h"
#include "common/status.h"
#include "common/util.h"
#include "daemon/cli.h"
#include "daemon/config.h"
#include "daemon/notify.h"
#include "engine/engine.h"

typedef struct daemon_state {
    dmn_config cfg;
    int argc;
    char **argv;
    eng_engine *e;
    eng_sched *sched;
    api_server *srv;
    uv_loop_t loop;
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_timer_t tick, watchdog, drain;
    bool draining;
    bool drain_cancelled;       /* the drain timed out and cancel-all was sent */
    double drain_deadline;
    int exit_code;
} daemon_state;

static d2_log_level to_log_level(int l) {
    switch (l) {
    case DMN_LOG_DEBUG: return D2_LOG_DEBUG;
    case DMN_LOG_WARN: return D2_LOG_WARN;
    case DMN_LOG_ERROR: return D2_LOG_ERROR;
    default: return D2_LOG_INFO;
    }
}

static void api_config_from(const dmn_config *c, api_config *a) {
    memset(a, 0, sizeof *a);
    a->host = c->host;
    a->port = c->port;
    a->api_key = c->api_key[0] ? c->api_key : NULL;
    a->auth_health_metrics = c->api_key_for_health_metrics;
    a->served_model_name = c->served_model_name;
    a->body_limit = (size_t)c->body_limit;
    a->max_n = c->max_n;
    a->max_tokens_limit = c->max_tokens_limit;
    a->default_max_tokens = c->default_max_tokens;
    a->request_timeout_s = c->request_timeout_s;
    a->log_requests = c->log_requests;
    /* the server's default KV compression (requests may override it) */
    _Static_assert((int)DMN_KV_PYRAMIDKV == (int)ENG_KV_PYRAMIDKV, "kv_method numbering differs");
    eng_kv_config_default(&a->kv_default, (eng_kv_method)c->kv_method);
    if (c->kv_preset == 1) /* checked at startup (serve's configuration check) */
        (void)eng_kv_preset_apply(&a->kv_default, "official", NULL);
    if (c->kv_granularity == 1) a->kv_default.granularity = ENG_KV_GRAN_LAYER;
    else if (c->kv_granularity == 2) a->kv_default.granularity = ENG_KV_GRAN_HEAD;
    if (c->kv_budget_tokens > 0) {
        a->kv_default.budget_tokens = (int)c->kv_budget_tokens;
    } else if (c->kv_budget_frac > 0) {
        a->kv_default.budget_frac = (float)c->kv_budget_frac;
        a->kv_default.budget_tokens = 0;
    }
}

/* ---- load progress ------------------------------------------------------------ */

static void load_progress(void *user, size_t done, size_t total) {
    (void)user;
    int width = 40;
    int fill = total ? (int)((double)done / (double)total * width) : width;
    fprintf(stderr, "\rloading weights [%.*s%*s] %3d%% %7.1f MB", fill, "########################################",
            width - fill, "", total ? (int)(100.0 * (double)done / (double)total) : 100, (double)done / 1e6);
    if (done >= total) fputc('\n', stderr);
    fflush(stderr);
}

/* ---- warm-up ---------------------------------------------------------------- */

typedef struct warm { pthread_mutex_t mu; pthread_cond_t cv; bool done; int status; } warm;

static int warm_event(void *user, const eng_event *ev) {
    warm *w = user;
    if (ev->type == ENG_EV_DONE) {
        pthread_mutex_lock(&w->mu);
        w->done = true;
        w->status = ev->status;
        pthread_cond_signal(&w->cv);
        pthread_mutex_unlock(&w->mu);
    }
    return 0;
}

/* One short generation through the whole path (pool, backend, sampler). */
static int warm_up(daemon_state *d) {
    const eng_tokenizer *tok = eng_engine_tokenizer(d->e);
    int32_t prompt[2] = {eng_tok_bos(tok) >= 0 ? eng_tok_bos(tok) : 0, 0};
    warm w = {.done = false};
    pthread_mutex_init(&w.mu, NULL);
    pthread_cond_init(&w.cv, NULL);
    eng_request q = {.prompt = prompt, .n_prompt = 2, .max_tokens = 2, .ignore_eos = true,
                     .on_event = warm_event, .user = &w};
    eng_sample_params_default(&q.sample);
    q.sample.temperature = 0;
    const char *why = NULL;
    int rc = eng_sched_submit(d->sched, &q, NULL, &why);
    if (rc == D2_OK) {
        pthread_mutex_lock(&w.mu);
        while (!w.done) pthread_cond_wait(&w.cv, &w.mu);
        rc = w.status;
        pthread_mutex_unlock(&w.mu);
    } else if (why) {
        D2_ERROR("serve: warm-up rejected: %s", why);
    }
    pthread_mutex_destroy(&w.mu);
    pthread_cond_destroy(&w.cv);
    return rc;
}

/* ---- loop callbacks ---------------------------------------------------------- */

static void stop_loop(daemon_state *d) {
    uv_timer_stop(&d->tick);
    uv_timer_stop(&d->watchdog);
    uv_timer_stop(&d->drain);
    uv_signal_stop(&d->sig_term);
    uv_signal_stop(&d->sig_int);
    uv_signal_stop(&d->sig_hup);
    uv_stop(&d->loop);
}

static void on_drain_tick(uv_timer_t *t) {
    daemon_state *d = t->data;
    int left = api_server_in_flight(d->srv);
    if (left == 0) {
        D2_INFO("serve: drained; exiting");
        stop_loop(d);
        return;
    }
    if (d2_now() > d->drain_deadline) {
        if (d->drain_cancelled) {
            /* Cancelled generations end within a step, so what is left are
             * responses a client is not reading; closing the listener closes
             * their connections. Waiting for them would let one stalled
             * client hold the shutdown until the HTTP connection timeout. */
            D2_WARN("serve: %d response(s) still undelivered after the drain; closing their connections", left);
            stop_loop(d);
            return;
        }
        D2_WARN("serve: drain timeout: cancelling %d in-flight request(s)", left);
        api_server_cancel_all(d->srv);
        d->drain_cancelled = true;
        d->drain_deadline = d2_now() + 2.0; /* cancellations finish within a step */
    }
}

static void begin_shutdown(daemon_state *d, const char *why) {
    if (d->draining) {
        /* Not stop_loop() here: requests waiting for the engine hold
         * suspended connections, and libmicrohttpd aborts the process when
         * stopped with any. The cancellations end them within a step; the
         * drain tick then stops as soon as they are answered, or after 1 s. */
        if (d->drain_cancelled && d->drain_deadline <= d2_now() + 1.0) return; /* already ending */
        D2_WARN("serve: second %s: cancelling %d request(s) and exiting", why, api_server_in_flight(d->srv));
        api_server_cancel_all(d->srv);
        d->drain_cancelled = true;
        d->drain_deadline = d2_now() + 1.0;
        return;
    }
    d->draining = true;
    D2_INFO("serve: %s: draining %d in-flight request(s), up to %.0f s", why, api_server_in_flight(d->srv),
            d->cfg.drain_timeout_s);
    /* refuse new work first, so nothing is accepted after STOPPING=1 */
    api_server_drain(d->srv);
    eng_sched_close(d->sched);
    dmn_notify_stopping();
    d->drain_deadline = d2_now() + d->cfg.drain_timeout_s;
    uv_timer_start(&d->drain, on_drain_tick, 0, 50);
}

static void on_signal(uv_signal_t *s, int signum) {
    daemon_state *d = s->data;
    if (signum == SIGHUP) {
        dmn_notify_reloading();
        dmn_config next;
        dmn_config_diff diff;
        char err[512];
        int rc = dmn_config_reload(&d->cfg, &next, d->argc, d->argv, &diff, err, sizeof err);
        if (rc != D2_OK) {
            D2_ERROR("serve: reload failed, keeping the current settings: %s", err);
        } else {
            d->cfg = next;
            d2_log_set_level(to_log_level(d->cfg.log_level));
            api_config ac;
            api_config_from(&d->cfg, &ac);
            api_server_update_config(d->srv, &ac);
            eng_sched_set_max_queue(d->sched, d->cfg.max_queue);
            for (int i = 0; i < diff.n_live; i++) D2_INFO("serve: reloaded %s", diff.live[i]);
            for (int i = 0; i < diff.n_restart; i++) D2_WARN("serve: %s changed but needs a restart", diff.restart[i]);
        }
        dmn_notify_ready();
        return;
    }
    begin_shutdown(d, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

static void on_tick(uv_timer_t *t) {
    daemon_state *d = t->data;
    api_server_tick(d->srv);
    char why[512];
    if (d->exit_code == 0 && eng_sched_fatal(d->sched, why, sizeof why)) {
        D2_ERROR("serve: fatal: the %s backend failed: %s; exiting with status 1",
                 eng_engine_backend_name(d->e), why);
        d->exit_code = 1;
        dmn_notify_status("fatal backend error: %s", why);
        if (!d->draining) begin_shutdown(d, "fatal backend error"); /* else: the drain ends it */
    }
}

static void on_watchdog(uv_timer_t *t) {
    (void)t;
    dmn_notify_watchdog();
}

/* ---- startup steps ------------------------------------------------------------------ */
/* Each returns -1 to go on, or the process exit code to return (what it
 * created is released by its caller's teardown, never twice). */

/* Reads the configuration (file < environment < command line) and checks the
 * KV-compression default it describes; prints --help. */
static int serve_load_config(daemon_state *d) {
    char err[1024];
    int rc = dmn_config_load(&d->cfg, NULL, d->argc, d->argv, err, sizeof err);
    if (rc == DMN_CONFIG_HELP) {
        printf("usage: d2od serve --model M [--host 127.0.0.1] [--port 8000] [--config FILE] [options]\n\n"
               "Serves M over an OpenAI-compatible HTTP API. Every option is also a config-file\n"
               "directive and a D2OD_* environment variable (command line > environment > file).\n\n");
        dmn_config_print_help(stdout);
        return 0;
    }
    if (rc != D2_OK) {
        fprintf(stderr, "d2od serve: %s\n", err);
        return 2;
    }
    api_config probe;
    api_config_from(&d->cfg, &probe);
    const char *why = NULL;
    eng_kv_config pc;
    eng_kv_config_default(&pc, (eng_kv_method)d->cfg.kv_method);
    if (d->cfg.kv_preset == 1 && eng_kv_preset_apply(&pc, "official", &why) != D2_OK) {
        fprintf(stderr, "d2od serve: kv_preset official: %s (set kv_method d2o)\n", why ? why : "invalid");
        return 2;
    }
    if (eng_kv_config_validate(&probe.kv_default, &why) != D2_OK) {
        fprintf(stderr, "d2od serve: kv_method %s with kv_budget %s: invalid %s\n",
                dmn_kv_method_name(d->cfg.kv_method), d->cfg.kv_budget, why ? why : "configuration");
        return 2;
    }
    return -1;
}

/* Process-wide settings: log level, SIGPIPE ignored (a client that hangs up
 * is an error return, not a signal), and the descriptor limit raised to the
 * hard limit (connections cost a descriptor each; the HTTP server keeps its
 * connection limit below whatever this gives). */
static void serve_setup_process(const daemon_state *d) {
    d2_log_set_level(to_log_level(d->cfg.log_level));
    signal(SIGPIPE, SIG_IGN);
    struct rlimit nofile;
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
        nofile.rlim_cur = nofile.rlim_max;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }
}

/* The engine config serve's directives describe, for the model at path. */
static eng_engine_config serve_engine_config(const dmn_config *c, const char *path) {
    _Static_assert((int)ENG_DEVICE_CUDA == DMN_DEVICE_CUDA && (int)ENG_DEVICE_AUTO == DMN_DEVICE_AUTO,
                   "dmn_device and eng_device share their numbering");
    return (eng_engine_config){.model_path = path, .device = (eng_device)c->device, .n_threads = c->threads,
                               .page_tokens = c->page_tokens, .kv_mem_mb = c->kv_mem_mb,
                               .max_seqs = c->max_seqs, .max_batch_tokens = c->max_batch_tokens,
                               .ctx_len = c->ctx_len, .gpu_memory_utilization = c->gpu_memory_utilization,
                               .cuda_graphs = c->cuda_graphs};
}

/* Resolves the model (a hub id through the Hugging Face cache, downloading
 * what is missing), creates the engine (weights, backend, KV pool) and copies
 * the weights into anonymous memory. */
static int serve_load_model(daemon_state *d) {
    static char model_path[4096];
    dmn_notify_status("resolving %s", d->cfg.model);
    if (d2_model_resolve(d->cfg.model, d->cfg.gguf_file, model_path, sizeof model_path) != D2_OK) return 1;
    dmn_notify_status("loading %s", model_path);
    D2_INFO("serve: loading %s", model_path);
    double t0 = d2_now();
    eng_engine_config ec = serve_engine_config(&d->cfg, model_path);
    int rc = eng_engine_create(&ec, &d->e);
    if (rc == D2_EUNSUPPORTED && ec.device == ENG_DEVICE_CUDA) {
        fprintf(stderr, "d2od serve: device cuda: this build has no CUDA backend (build with make CUDA=1 "
                        "where nvcc is installed; or use --device cpu or auto)\n");
        return 1;
    }
    if (rc == D2_ECUDA && ec.device == ENG_DEVICE_CUDA) {
        fprintf(stderr, "d2od serve: device cuda: no usable CUDA device, or the CUDA backend failed "
                        "(see the log)\n");
        return 1;
    }
    if (rc != D2_OK) {
        fprintf(stderr, "d2od serve: cannot load %s: %s\n", model_path, d2_strerror(rc));
        return 1;
    }
    {
        api_config kvc;
        api_config_from(&d->cfg, &kvc);
        if (kvc.kv_default.method != ENG_KV_FULL && kvc.kv_default.granularity == ENG_KV_GRAN_HEAD &&
            !eng_engine_kv_per_head(d->e)) {
            fprintf(stderr, "d2od serve: kv_granularity head (the official preset's) is not implemented "
                            "by the %s backend; set kv_granularity layer\n", eng_engine_backend_name(d->e));
            eng_engine_destroy(d->e);
            free(d);
            return 2;
        }
    }
    /* Copy the weights into anonymous memory now (with a progress bar on a
     * terminal): the first requests do not pay for page faults, and a model
     * file replaced in place during a deploy (cp over it truncates the inode)
     * cannot crash the daemon with SIGBUS — it keeps serving what it loaded. */
    rc = eng_engine_detach_weights(d->e, isatty(STDERR_FILENO) ? load_progress : NULL, NULL);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od serve: cannot copy the weights of %s into memory: %s\n", d->cfg.model, d2_strerror(rc));
        return 1;
    }
    eng_pool_stats ps = eng_engine_pool_stats(d->e);
    D2_INFO("serve: model loaded in %.2f s; backend %s; context %d; KV pool %lld pages of %d tokens",
            d2_now() - t0, eng_engine_backend_name(d->e), eng_engine_ctx_len(d->e),
            (long long)ps.pages_total, ps.page_tokens);
    return -1;
}

/* Starts the engine thread and HTTP and runs one warm-up generation
 * (serve_run_loop turns /health to 200 once the signal handlers are in). */
static int serve_start(daemon_state *d) {
    eng_sched_config sc = {.max_queue = d->cfg.max_queue};
    int rc = eng_sched_create(d->e, &sc, &d->sched);
    if (rc == D2_OK) rc = eng_sched_start(d->sched);
    api_config ac;
    api_config_from(&d->cfg, &ac);
    if (rc == D2_OK) rc = api_server_create(&ac, d->e, d->sched, &d->srv);
    if (rc == D2_OK) rc = api_server_start(d->srv);
    if (rc != D2_OK) {
        if (rc == D2_EADDRINUSE)
            fprintf(stderr, "d2od serve: cannot listen on %s:%d: address in use\n", d->cfg.host, d->cfg.port);
        else
            fprintf(stderr, "d2od serve: cannot start: %s\n", d2_strerror(rc));
        return 1;
    }
    rc = warm_up(d);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od serve: warm-up generation failed: %s\n", d2_strerror(rc));
        return 1;
    }
    return -1;
}

/* The libuv loop: signals (installed first), then /health 200 and READY=1,
 * timers until the drain (or a second signal) stops it; then its handles are
 * closed and the loop with them. */
static void serve_run_loop(daemon_state *d) {
    uv_loop_init(&d->loop);
    uv_signal_init(&d->loop, &d->sig_term);
    uv_signal_init(&d->loop, &d->sig_int);
    uv_signal_init(&d->loop, &d->sig_hup);
    d->sig_term.data = d->sig_int.data = d->sig_hup.data = d;
    uv_signal_start(&d->sig_term, on_signal, SIGTERM);
    uv_signal_start(&d->sig_int, on_signal, SIGINT);
    uv_signal_start(&d->sig_hup, on_signal, SIGHUP);
    /* Ready only now: a SIGTERM right after /health turned 200 (or after
     * READY=1) must find the handler installed, not the default action. */
    api_server_set_ready(d->srv, true);
    D2_INFO("serve: listening on http://%s:%d (model '%s')", d->cfg.host, api_server_port(d->srv),
            d->cfg.served_model_name);
    dmn_notify_status("serving %s on %s:%d", d->cfg.served_model_name, d->cfg.host, api_server_port(d->srv));
    dmn_notify_ready();
    uv_timer_init(&d->loop, &d->tick);
    uv_timer_init(&d->loop, &d->watchdog);
    uv_timer_init(&d->loop, &d->drain);
    d->tick.data = d->watchdog.data = d->drain.data = d;
    uv_timer_start(&d->tick, on_tick, 100, 100);
    uint64_t wd = dmn_notify_watchdog_usec();
    if (d->cfg.watchdog && wd > 0) uv_timer_start(&d->watchdog, on_watchdog, 0, wd / 2000 > 0 ? wd / 2000 : 1);
    uv_run(&d->loop, UV_RUN_DEFAULT);

    uv_close((uv_handle_t *)&d->sig_term, NULL);
    uv_close((uv_handle_t *)&d->sig_int, NULL);
    uv_close((uv_handle_t *)&d->sig_hup, NULL);
    uv_close((uv_handle_t *)&d->tick, NULL);
    uv_close((uv_handle_t *)&d->watchdog, NULL);
    uv_close((uv_handle_t *)&d->drain, NULL);
    uv_run(&d->loop, UV_RUN_DEFAULT);
    uv_loop_close(&d->loop);
}

/* Closing order: HTTP (nothing in flight any more), engine thread, engine.
 * Each destroy accepts NULL, so this also undoes a startup that stopped
 * half-way. */
static void serve_teardown(daemon_state *d) {
    api_server_destroy(d->srv);
    eng_sched_destroy(d->sched);
    eng_engine_destroy(d->e);
    free(d);
}

/* ---- entry ---------------------------------------------------------------------- */

int d2_cmd_serve(int argc, char **argv) {
    daemon_state *d = calloc(1, sizeof *d);
    if (!d) return 1;
    d->argc = argc;
    d->argv = argv;
    int code = serve_load_config(d);
    if (code < 0) {
        serve_setup_process(d);
        code = serve_load_model(d);
    }
    if (code < 0) code = serve_start(d);
    if (code >= 0) {
        serve_teardown(d);
        return code;
    }
    serve_run_loop(d);
    code = d->exit_code;
    serve_teardown(d);
    D2_INFO("serve: stopped");
    return code;
}
