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
#include "engine/engine.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: d2od batch --model M --input requests.jsonl --output results.jsonl [options]\n"
            "\n"
            "Runs every request of an OpenAI batch input file through the engine with\n"
            "continuous batching and appends one result line per request to the output.\n"
            "Request lines: {\"custom_id\": \"r1\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\"\n"
            "(or \"/v1/completions\"), \"body\": {...}}; bodies take the HTTP API's fields, including\n"
            "kv_compression. Result lines: {\"id\", \"custom_id\", \"response\": {\"status_code\",\n"
            "\"request_id\", \"body\"}, \"error\"}. Rerunning with the same output skips the custom_ids\n"
            "already there (resume after an interruption).\n"
            "\n"
            "  --model M                GGUF file, HF directory or hub id org/name[@rev] (required)\n"
            "  --input F, --output F    the batch input and output files (required)\n"
            "  --served-model-name N    \"model\" in the result bodies (default: the model's base name)\n"
            "  --threads N              CPU threads (0: all)\n"
            "  --max-seqs N             sequences decoded together (default 64)\n"
            "  --max-batch-tokens N     tokens per engine step (default 512)\n"
            "  --kv-mem-mb N            KV pool size in MiB (0: automatic)\n"
            "  --ctx-len N              context length (0: the model's)\n"
            "  --kv-method M            default KV compression: full|d2o|h2o|streamingllm|snapkv|pyramidkv\n"
            "  --kv-budget B            its budget: fraction in (0,1] or a token count (default 0.2)\n"
            "  --default-max-tokens N   max_tokens of a request that gives none (default 256)\n"
            "  --max-in-flight N        requests submitted at once (default 256)\n"
            "  --no-progress            no progress bar even on a terminal\n");
}

int d2_cmd_batch(int argc, char **argv) {
    const char *model = NULL, *input = NULL, *output = NULL, *name = NULL, *kv_method = "full";
    long threads = 0, max_seqs = 64, mbt = 512, kv_mem = 0, ctx = 0, def_max = 256, in_flight = 256;
    double kv_budget = 0.2;
    bool progress = isatty(STDERR_FILENO);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = NULL;
#define VAL() do { if (!(v = d2_cli_value(argc, argv, &i))) return 2; } while (0)
#define INT(opt, lo, hi, dst) do { VAL(); if (d2_cli_int(opt, v, lo, hi, &dst)) return 2; } while (0)
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { usage(stdout); return 0; }
        else if (!strcmp(a, "--model")) { VAL(); model = v; }
        else if (!strcmp(a, "--input")) { VAL(); input = v; }
        else if (!strcmp(a, "--output")) { VAL(); output = v; }
        else if (!strcmp(a, "--served-model-name")) { VAL(); name = v; }
        else if (!strcmp(a, "--threads")) INT("--threads", 0, 1024, threads);
        else if (!strcmp(a, "--max-seqs")) INT("--max-seqs", 1, 4096, max_seqs);
        else if (!strcmp(a, "--max-batch-tokens")) INT("--max-batch-tokens", 16, 65536, mbt);
        else if (!strcmp(a, "--kv-mem-mb")) INT("--kv-mem-mb", 0, 16777216, kv_mem);
        else if (!strcmp(a, "--ctx-len")) INT("--ctx-len", 0, 1048576, ctx);
        else if (!strcmp(a, "--default-max-tokens")) INT("--default-max-tokens", 1, 1048576, def_max);
        else if (!strcmp(a, "--max-in-flight")) INT("--max-in-flight", 1, 100000, in_flight);
        else if (!strcmp(a, "--kv-method")) { VAL(); kv_method = v; }
        else if (!strcmp(a, "--kv-budget")) { VAL(); if (d2_cli_float("--kv-budget", v, 1e-6, 1e9, &kv_budget)) return 2; }
        else if (!strcmp(a, "--no-progress")) progress = false;
        else { fprintf(stderr, "d2od batch: unknown option %s (see --help)\n", a); return 2; }
#undef INT
#undef VAL
    }
    if (!model || !input || !output) {
        fprintf(stderr, "d2od batch: --model, --input and --output are required (see --help)\n");
        return 2;
    }
    int m = eng_kv_method_parse(kv_method);
    if (m < 0) {
        fprintf(stderr, "d2od batch: --kv-method: unknown method '%s'\n", kv_method);
        return 2;
    }
    api_batch_config bc = {.max_n = 8, .max_tokens_limit = 1048576, .default_max_tokens = (int)def_max,
                           .max_in_flight = (int)in_flight, .progress = progress};
    eng_kv_config_default(&bc.kv_default, (eng_kv_method)m);
    if (kv_budget > 1.0) {
        bc.kv_default.budget_tokens = (int)kv_budget;
        bc.kv_default.budget_frac = 0;
    } else {
        bc.kv_default.budget_frac = (float)kv_budget;
    }
    const char *why = NULL;
    if (eng_kv_config_validate(&bc.kv_default, &why) != D2_OK) {
        fprintf(stderr, "d2od batch: --kv-method/--kv-budget: invalid %s\n", why ? why : "value");
        return 2;
    }
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
    eng_engine_config ec = {.model_path = model, .n_threads = (int)threads, .max_seqs = (int)max_seqs,
                            .max_batch_tokens = (int)mbt, .kv_mem_mb = kv_mem, .ctx_len = (int)ctx};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od batch: cannot load %s: %s\n", model, d2_strerror(rc));
        return 1;
    }
    eng_sched_config sc = {.max_queue = (int)in_flight * 8 + 64};
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
