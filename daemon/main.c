/*
 * daemon/main.c — entry point of the d2od binary: dispatches subcommands.
 *
 *   d2od serve       the HTTP daemon (OpenAI-compatible API)
 *   d2od generate    generate a continuation of a prompt
 *   d2od tokenize    text on stdin -> JSON array of ids
 *   d2od perplexity  teacher-forced NLL of a file
 *   d2od bench       CPU throughput and roofline figures
 *   d2od eval        KV-compression methods against the full cache
 *   d2od batch       an OpenAI batch file through the engine (no HTTP)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "daemon/cli.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: d2od <command> [options]\n"
            "\n"
            "commands:\n"
            "  serve       serve a model over an OpenAI-compatible HTTP API\n"
            "  generate    print a model's continuation of a prompt\n"
            "  tokenize    read text on stdin, print token ids as a JSON array\n"
            "  perplexity  score a text file teacher-forced; print tokens, nll_sum, ppl\n"
            "  bench       measure CPU decode throughput against the memory roofline\n"
            "  eval        compare KV-compression methods with the full cache (ppl, agreement, passkey)\n"
            "  batch       run an OpenAI batch file (JSONL) through the engine, resumable\n"
            "\n"
            "Run 'd2od <command> --help' for a command's options.\n");
}

int main(int argc, char **argv) {
    const char *lvl = getenv("D2OD_LOG_LEVEL");
    d2_log_level l;
    if (lvl && d2_log_parse_level(lvl, &l) == D2_OK) d2_log_set_level(l);
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help")) {
        usage(stdout);
        return 0;
    }
    if (strcmp(cmd, "serve") && d2_cli_resolve_model(&argc, argv)) return 1;
    if (!strcmp(cmd, "generate")) return d2_cmd_generate(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return d2_cmd_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "perplexity")) return d2_cmd_perplexity(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) return d2_cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "serve")) return d2_cmd_serve(argc - 1, argv + 1);
    if (!strcmp(cmd, "eval")) return d2_cmd_eval(argc - 1, argv + 1);
    if (!strcmp(cmd, "batch")) return d2_cmd_batch(argc - 1, argv + 1);
    fprintf(stderr, "d2od: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return 2;
}
