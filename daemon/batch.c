/*
 * daemon/batch.c — `d2od batch`: runs an OpenAI batch file (JSONL) through the
 * same engine and continuous-batching scheduler as `serve`, without HTTP.
 * Parsing, scheduling and result lines are api/batch.c's (api_batch_run);
 * this file is the command line, the engine's life cycle and the summary.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api/api.h"
#include "common/log.h"
#include "common/status.h"
#include "daemon/cli.h"
#include "daemon/opts.h"
#include "engine/engine.h"

typedef struct batch_opts {
    const char *model, *input, *output, *name;
    int threads, device, max_seqs, mbt, kv_mem, ctx, def_max, in_flight, kv_method;
    dmn_kv_budget kv_budget;
    bool no_progress;
} batch_opts;

#define OFF(f) offsetof(batch_opts, f)
static const dmn_opt BATCH_OPTS[] = {
    {.name = "model", .type = DMN_OPT_STR, .offset = OFF(model), .flags = DMN_OPT_REQUIRED, .metavar = "M",
     .help = "GGUF file, HF directory or hub id org/name[@rev]"},
    {.name = "input", .type = DMN_OPT_STR, .offset = OFF(input), .flags = DMN_OPT_REQUIRED, .metavar = "F",
     .help = "the batch input file (JSONL)"},
    {.name = "output", .type = DMN_OPT_STR, .offset = OFF(output), .flags = DMN_OPT_REQUIRED, .metavar = "F",
     .help = "the batch output file (appended to; resumes)"},
    {.name = "served-model-name", .type = DMN_OPT_STR, .offset = OFF(name), .metavar = "N",
     .help = "\"model\" in the result bodies; default: the model's base name"},
    DMN_OPT_ROW_THREADS(batch_opts),
    DMN_OPT_ROW_DEVICE(batch_opts),
    {.name = "max-seqs", .type = DMN_OPT_INT, .offset = OFF(max_seqs), .def = "64", .min = 1, .max = 4096,
     .help = "sequences decoded together"},
    {.name = "max-batch-tokens", .type = DMN_OPT_INT, .offset = OFF(mbt), .def = "512", .min = 16, .max = 65536,
     .help = "tokens per engine step"},
    {.name = "kv-mem-mb", .type = DMN_OPT_INT, .offset = OFF(kv_mem), .def = "0", .min = 0, .max = 16777216,
     .metavar = "MIB", .help = "KV pool size in MiB, 0 = automatic"},
    {.name = "ctx-len", .type = DMN_OPT_INT, .offset = OFF(ctx), .def = "0", .min = 0, .max = 1048576,
     .help = "context length, 0 = the model's"},
    {.name = "kv-method", .type = DMN_OPT_ENUM, .offset = OFF(kv_method), .def = "full",
     .names = dmn_opt_kv_methods, .help = "default KV compression of the requests"},
    {.name = "kv-budget", .type = DMN_OPT_KV_BUDGET, .offset = OFF(kv_budget), .def = "0.2",
     .help = "its budget: share of the prompt's length in (0,1], or a token count >= 2, per layer"},
    {.name = "default-max-tokens", .type = DMN_OPT_INT, .offset = OFF(def_max), .def = "256", .min = 1,
     .max = 1048576, .help = "max_tokens of a request that gives none"},
    {.name = "max-in-flight", .type = DMN_OPT_INT, .offset = OFF(in_flight), .def = "256", .min = 1, .max = 100000,
     .help = "requests submitted at once"},
    {.name = "no-progress", .type = DMN_OPT_FLAG, .offset = OFF(no_progress),
     .help = "no progress bar even on a terminal"},
};
#undef OFF

static const dmn_cmd_spec BATCH_CMD = {
    .name = "batch",
    .usage = "--model M --input requests.jsonl --output results.jsonl [options]",
    .about = "Runs every request of an OpenAI batch input file through the engine with\n"
             "continuous batching and appends one result line per request to the output.\n"
             "Request lines: {\"custom_id\": \"r1\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\"\n"
             "(or \"/v1/completions\"), \"body\": {...}}; bodies take the HTTP API's fields, including\n"
             "kv_compression. Result lines: {\"id\", \"custom_id\", \"response\": {\"status_code\",\n"
             "\"request_id\", \"body\"}, \"error\"}. Rerunning with the same output skips the custom_ids\n"
             "already there (resume after an interruption).",
    .opts = BATCH_OPTS,
    .n_opts = (int)(sizeof BATCH_OPTS / sizeof BATCH_OPTS[0]),
    .size = sizeof(batch_opts),
};

int d2_cmd_batch(int argc, char **argv) {
    batch_opts o;
    int code = dmn_opts_main(&BATCH_CMD, &o, argc, argv);
    if (code >= 0) return code;
    const char *model = o.model, *input = o.input, *output = o.output, *name = o.name;
    int in_flight = o.in_flight;
    api_batch_config bc = {.max_n = 8, .max_tokens_limit = 1048576, .default_max_tokens = o.def_max,
                           .max_in_flight = in_flight, .progress = isatty(STDERR_FILENO) && !o.no_progress};
    eng_kv_config_default(&bc.kv_default, (eng_kv_method)o.kv_method);
    bc.kv_default.budget_frac = o.kv_budget.frac;
    bc.kv_default.budget_tokens = o.kv_budget.tokens;
    const char *why = NULL;
    if (eng_kv_config_validate(&bc.kv_default, &why) != D2_OK)
        return dmn_opts_usage_error(&BATCH_CMD, "--kv-method/--kv-budget: invalid %s", why ? why : "value");
    /* served name: as serve derives it, the base name without ".gguf" */
    char base[256];
    if (!name) {
        const char *sl = strrchr(model, '/');
        const char *b = sl && sl[1] ? sl + 1 : model;
        snprintf(base, sizeof base, "%s", b);
        size_t bl = strlen(base);
        while (bl > 1 && base[bl - 1] == '/') base[--bl] = '\0';
        if (bl > 5 && !strcmp(base + bl - 5, ".gguf")) base[bl - 5] = '\0';
        name = base;
    }
    bc.model_name = name;
    eng_engine_config ec = {.model_path = model, .device = (eng_device)o.device, .n_threads = o.threads,
                            .max_seqs = o.max_seqs, .max_batch_tokens = o.mbt, .kv_mem_mb = o.kv_mem,
                            .ctx_len = o.ctx};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od batch: cannot load %s: %s\n", model, d2_strerror(rc));
        return 1;
    }
    eng_sched_config sc = {.max_queue = in_flight * 8 + 64};
    eng_sched *s = NULL;
    rc = eng_sched_create(e, &sc, &s);
    if (rc == D2_OK) rc = eng_sched_start(s);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od batch: cannot start the scheduler: %s\n", d2_strerror(rc));
        eng_sched_destroy(s);
        eng_engine_destroy(e);
        return 1;
    }
    api_batch_report rep;
    char err[1024] = "";
    rc = api_batch_run(&bc, e, s, input, output, &rep, err, sizeof err);
    eng_sched_destroy(s);
    eng_engine_destroy(e);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od batch: %s\n", err[0] ? err : d2_strerror(rc));
        return 1;
    }
    fprintf(stderr,
            "d2od batch: %lld request(s): %lld ok, %lld failed, %lld skipped (already in %s); "
            "%.2f s, %.1f req/s, %lld prompt + %lld completion tokens (%.0f completion tok/s)\n",
            (long long)rep.total, (long long)rep.ok, (long long)rep.failed, (long long)rep.skipped, output, rep.seconds,
            rep.seconds > 0 ? (double)(rep.ok + rep.failed) / rep.seconds : 0.0, (long long)rep.prompt_tokens,
            (long long)rep.completion_tokens, rep.seconds > 0 ? (double)rep.completion_tokens / rep.seconds : 0.0);
    return rep.failed ? 3 : 0;
}
