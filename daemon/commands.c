/*
 * daemon/commands.c — the offline subcommands: generate, tokenize, perplexity.
 *
 * They drive the same engine the daemon serves with (model loader,
 * tokenizer, paged KV pool, backend, sampler); nothing here has a private
 * inference path. Output contracts:
 *   generate    stdout: only the generated continuation; stderr: timing.
 *   tokenize    stdout: one JSON array of ids.
 *   perplexity  stdout: one JSON line {"tokens", "predictions", "nll_sum", "ppl"}.
 * Each command's options are one table (daemon/opts.h): the parser, the
 * checks and --help come from it.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/status.h"
#include "common/util.h"
#include "daemon/cli.h"
#include "daemon/opts.h"
#include "engine/engine.h"

static int read_stream(FILE *f, char **out, size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    if (!buf) return D2_ENOMEM;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            cap *= 2;
            char *nb = realloc(buf, cap);
            if (!nb) { free(buf); return D2_ENOMEM; }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0) break;
    }
    if (ferror(f)) { free(buf); return D2_EIO; }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return D2_OK;
}

/* ---- generate ------------------------------------------------------------------ */

typedef struct gen_opts {
    const char *model, *prompt, *prompt_file;
    int max_tokens, top_k, seed, threads, ctx, device;
    double temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
    bool has_seed, ignore_eos, no_bos, show_ids;
} gen_opts;

#define OFF(f) offsetof(gen_opts, f)
static const dmn_opt GEN_OPTS[] = {
    DMN_OPT_ROW_MODEL(gen_opts),
    {.name = "prompt", .type = DMN_OPT_STR, .offset = OFF(prompt), .metavar = "P",
     .help = "prompt text (or --prompt-file)"},
    {.name = "prompt-file", .type = DMN_OPT_STR, .offset = OFF(prompt_file), .metavar = "F",
     .help = "read the prompt from F ('-': stdin)"},
    {.name = "max-tokens", .type = DMN_OPT_INT, .offset = OFF(max_tokens), .def = "128", .min = 0, .max = 1 << 24,
     .help = "tokens to generate"},
    {.name = "temperature", .type = DMN_OPT_FLOAT, .offset = OFF(temperature), .def = "0.8", .min = 0, .max = 2,
     .metavar = "T", .help = "sampling temperature, 0 = greedy"},
    {.name = "top-k", .type = DMN_OPT_INT, .offset = OFF(top_k), .def = "0", .min = 0, .max = 1 << 24,
     .metavar = "K", .help = "keep the K most likely tokens, 0 = off"},
    {.name = "top-p", .type = DMN_OPT_FLOAT, .offset = OFF(top_p), .def = "1", .min = 1e-9, .max = 1,
     .metavar = "P", .help = "nucleus sampling mass, 1 = off"},
    {.name = "min-p", .type = DMN_OPT_FLOAT, .offset = OFF(min_p), .def = "0", .min = 0, .max = 1, .metavar = "P",
     .help = "drop tokens below P x the top probability"},
    {.name = "repetition-penalty", .type = DMN_OPT_FLOAT, .offset = OFF(repetition_penalty), .def = "1",
     .min = 1e-3, .max = 10, .metavar = "R", .help = "penalty on tokens already seen, 1 = off"},
    {.name = "presence-penalty", .type = DMN_OPT_FLOAT, .offset = OFF(presence_penalty), .def = "0", .min = -2,
     .max = 2, .help = "subtracted from the logit of every token already seen"},
    {.name = "frequency-penalty", .type = DMN_OPT_FLOAT, .offset = OFF(frequency_penalty), .def = "0", .min = -2,
     .max = 2, .help = "subtracted once per earlier occurrence"},
    {.name = "seed", .type = DMN_OPT_INT, .offset = OFF(seed), .min = 0, .max = 0x7fffffff, .metavar = "S",
     .flags = DMN_OPT_SEEN, .seen_offset = OFF(has_seed), .help = "sampling seed; same seed, same output"},
    {.name = "ignore-eos", .type = DMN_OPT_FLAG, .offset = OFF(ignore_eos),
     .help = "keep generating past end-of-sequence tokens"},
    {.name = "no-bos", .type = DMN_OPT_FLAG, .offset = OFF(no_bos), .help = "do not add the tokenizer's BOS token"},
    {.name = "show-ids", .type = DMN_OPT_FLAG, .offset = OFF(show_ids),
     .help = "print the generated token ids to stderr"},
    DMN_OPT_ROW_THREADS(gen_opts),
    {.name = "ctx", .type = DMN_OPT_INT, .offset = OFF(ctx), .min = 1, .max = 1 << 24,
     .help = "context length; default: the model's"},
    DMN_OPT_ROW_DEVICE(gen_opts),
};
#undef OFF

static const dmn_cmd_spec GEN_CMD = {
    .name = "generate",
    .usage = "--model M --prompt P [options]",
    .about = "Prints only the generated continuation on stdout (streamed); timing on stderr.",
    .opts = GEN_OPTS,
    .n_opts = (int)(sizeof GEN_OPTS / sizeof GEN_OPTS[0]),
    .size = sizeof(gen_opts),
};

typedef struct gen_print {
    const eng_tokenizer *tok;
    eng_tok_stream stream;
    int32_t *ids;
    int n;
} gen_print;

static int gen_on_token(void *user, int32_t token, const eng_sample_result *r) {
    (void)r;
    gen_print *gp = user;
    char buf[1024];
    int w = eng_tok_stream_feed(gp->tok, &gp->stream, token, buf, sizeof buf);
    if (w > 0) {
        fwrite(buf, 1, (size_t)w, stdout);
        fflush(stdout);
    }
    return 0;
}

/* The prompt text: --prompt, or --prompt-file ('-' = stdin) into *buf. */
static int gen_read_prompt(const gen_opts *o, const char **text, size_t *len, char **buf) {
    *buf = NULL;
    if (!o->prompt_file) {
        *text = o->prompt;
        *len = strlen(o->prompt);
        return D2_OK;
    }
    int rc = !strcmp(o->prompt_file, "-") ? read_stream(stdin, buf, len) : d2_read_file(o->prompt_file, buf, len);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od generate: %s: %s\n", o->prompt_file, d2_strerror(rc));
        return rc;
    }
    *text = *buf;
    return D2_OK;
}

static void gen_sample_params(const gen_opts *o, eng_sample_params *sp) {
    eng_sample_params_default(sp);
    sp->temperature = (float)o->temperature;
    sp->top_k = o->top_k;
    sp->top_p = (float)o->top_p;
    sp->min_p = (float)o->min_p;
    sp->repetition_penalty = (float)o->repetition_penalty;
    sp->presence_penalty = (float)o->presence_penalty;
    sp->frequency_penalty = (float)o->frequency_penalty;
    sp->seed = (uint64_t)o->seed;
    sp->has_seed = o->has_seed;
}

/* Timing line (and --show-ids) on stderr after a successful run. */
static void gen_report(const gen_opts *o, const eng_gen_seq *s, size_t n_ids, double t_load) {
    double dec = s->t_done - s->t_first_token;
    fprintf(stderr,
            "\n[d2od] load %.3f s | prompt %zu tokens in %.3f s (%.1f tok/s) | generated %d "
            "tokens, %.1f tok/s decode | finish: %s\n",
            t_load, n_ids, s->t_first_token, (double)n_ids / (s->t_first_token > 0 ? s->t_first_token : 1e-9),
            s->n_out, s->n_out > 1 && dec > 0 ? (double)(s->n_out - 1) / dec : 0.0,
            s->finish == ENG_FINISH_STOP ? "stop" : "length");
    if (o->show_ids) {
        fprintf(stderr, "[d2od] ids:");
        for (int k = 0; k < s->n_out; k++) fprintf(stderr, " %d", s->out_tokens[k]);
        fprintf(stderr, "\n");
    }
}

/* Generates from ids on e, streaming text to stdout. Returns the exit code. */
static int gen_run(const gen_opts *o, eng_engine *e, const int32_t *ids, size_t n_ids, double t_load) {
    const eng_tokenizer *tok = eng_engine_tokenizer(e);
    int32_t *out = calloc((size_t)(o->max_tokens > 0 ? o->max_tokens : 1), sizeof(int32_t));
    if (!out) return 1;
    gen_print gp = {.tok = tok};
    eng_tok_stream_init(&gp.stream, true);
    char sink[1024]; /* run the prompt through the detokeniser so spacing rules see it */
    for (size_t k = 0; k < n_ids; k++) eng_tok_stream_feed(tok, &gp.stream, ids[k], sink, sizeof sink);
    gp.stream.n_pending = 0;
    eng_gen_seq s = {.prompt = ids, .n_prompt = (int)n_ids, .max_tokens = o->max_tokens,
                     .ignore_eos = o->ignore_eos, .on_token = gen_on_token, .user = &gp, .out_tokens = out};
    gen_sample_params(o, &s.sample);
    int rc = eng_run(e, &s, 1);
    char tail[64];
    int w = eng_tok_stream_finish(tok, &gp.stream, tail, sizeof tail);
    if (w > 0) fwrite(tail, 1, (size_t)w, stdout);
    fflush(stdout);
    int exit_code = 0;
    if (rc != D2_OK || s.status != D2_OK) {
        fprintf(stderr, "\nd2od generate: failed: %s\n", d2_strerror(rc != D2_OK ? rc : s.status));
        exit_code = 1;
    } else {
        gen_report(o, &s, n_ids, t_load);
    }
    free(out);
    return exit_code;
}

int d2_cmd_generate(int argc, char **argv) {
    gen_opts o;
    int ec_ = dmn_opts_main(&GEN_CMD, &o, argc, argv);
    if (ec_ >= 0) return ec_;
    if (!o.prompt && !o.prompt_file) return dmn_opts_usage_error(&GEN_CMD, "--prompt or --prompt-file is required");
    const char *prompt;
    size_t prompt_len = 0;
    char *prompt_buf = NULL;
    if (gen_read_prompt(&o, &prompt, &prompt_len, &prompt_buf) != D2_OK) return 1;

    double t_load = d2_now();
    eng_engine_config ec = {.model_path = o.model, .device = (eng_device)o.device, .n_threads = o.threads,
                            .max_seqs = 1, .ctx_len = o.ctx};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od generate: cannot load %s: %s\n", o.model, d2_strerror(rc));
        free(prompt_buf);
        return 1;
    }
    t_load = d2_now() - t_load;
    const eng_tokenizer *tok = eng_engine_tokenizer(e);
    if (!tok) {
        fprintf(stderr, "d2od generate: %s has no tokenizer\n", o.model);
        eng_engine_destroy(e);
        free(prompt_buf);
        return 1;
    }
    int32_t *ids = NULL;
    size_t n_ids = 0;
    rc = eng_tok_encode(tok, prompt, prompt_len, !o.no_bos, true, &ids, &n_ids);
    free(prompt_buf);
    int exit_code = 1;
    if (rc != D2_OK || n_ids == 0)
        fprintf(stderr, "d2od generate: cannot tokenize the prompt: %s\n",
                rc != D2_OK ? d2_strerror(rc) : "empty prompt");
    else
        exit_code = gen_run(&o, e, ids, n_ids, t_load);
    free(ids);
    eng_engine_destroy(e);
    return exit_code;
}

/* ---- tokenize ------------------------------------------------------------------ */

typedef struct tok_opts {
    const char *model;
    bool add_special;
} tok_opts;

static const dmn_opt TOK_OPTS[] = {
    {.name = "model", .type = DMN_OPT_STR, .offset = offsetof(tok_opts, model), .flags = DMN_OPT_REQUIRED,
     .metavar = "M", .help = "GGUF file, HF model directory, a directory holding only tokenizer files, or a "
                             "tokenizer.json path"},
    {.name = "add-special", .type = DMN_OPT_FLAG, .offset = offsetof(tok_opts, add_special),
     .help = "add BOS/EOS as the tokenizer is configured to (default: none)"},
};

static const dmn_cmd_spec TOK_CMD = {
    .name = "tokenize",
    .usage = "--model M [--add-special] < text",
    .about = "Reads UTF-8 text on stdin and prints its token ids as one JSON array.",
    .opts = TOK_OPTS,
    .n_opts = (int)(sizeof TOK_OPTS / sizeof TOK_OPTS[0]),
    .size = sizeof(tok_opts),
};

int d2_cmd_tokenize(int argc, char **argv) {
    tok_opts o;
    int ec_ = dmn_opts_main(&TOK_CMD, &o, argc, argv);
    if (ec_ >= 0) return ec_;
    const char *model = o.model;
    int add_special = o.add_special;
    eng_tokenizer *tok = NULL;
    int rc = eng_model_load_tokenizer(model, &tok);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od tokenize: cannot load a tokenizer from %s: %s\n", model, d2_strerror(rc));
        return 1;
    }
    char *text = NULL;
    size_t len = 0;
    rc = read_stream(stdin, &text, &len);
    if (rc != D2_OK) {
        eng_tok_free(tok);
        fprintf(stderr, "d2od tokenize: reading stdin: %s\n", d2_strerror(rc));
        return 1;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    rc = eng_tok_encode(tok, text, len, add_special, true, &ids, &n);
    free(text);
    if (rc != D2_OK) {
        eng_tok_free(tok);
        fprintf(stderr, "d2od tokenize: %s\n", d2_strerror(rc));
        return 1;
    }
    putchar('[');
    for (size_t k = 0; k < n; k++) printf(k ? ", %d" : "%d", ids[k]);
    printf("]\n");
    free(ids);
    eng_tok_free(tok);
    return 0;
}

/* ---- perplexity ----------------------------------------------------------------- */

typedef struct ppl_opts {
    const char *model, *file;
    int threads, ctx, device, kv_method, kv_prefill;
    dmn_kv_budget kv_budget;
    bool kv_exact;
    int kv_granularity;
} ppl_opts;

#define OFF(f) offsetof(ppl_opts, f)
static const dmn_opt PPL_OPTS[] = {
    DMN_OPT_ROW_MODEL(ppl_opts),
    {.name = "file", .type = DMN_OPT_STR, .offset = OFF(file), .flags = DMN_OPT_REQUIRED, .metavar = "F",
     .help = "text file to score"},
    {.name = "ctx", .type = DMN_OPT_INT, .offset = OFF(ctx), .min = 2, .max = 1 << 24,
     .help = "context (window) length; default: the model's"},
    DMN_OPT_ROW_THREADS(ppl_opts),
    DMN_OPT_ROW_DEVICE(ppl_opts),
    {.name = "kv-method", .type = DMN_OPT_ENUM, .offset = OFF(kv_method), .def = "full",
     .names = dmn_opt_kv_methods, .help = "compress the KV cache as during generation"},
    {.name = "kv-budget", .type = DMN_OPT_KV_BUDGET, .offset = OFF(kv_budget), .def = "0.2",
     .help = "share of the prefill's length kept in (0,1], or a token count >= 2, per layer"},
    {.name = "kv-prefill", .type = DMN_OPT_INT, .offset = OFF(kv_prefill), .def = "64", .min = 1, .max = 1 << 24,
     .help = "tokens of each window prefilled (and compressed) before token-by-token scoring"},
    {.name = "kv-exact", .type = DMN_OPT_FLAG, .offset = OFF(kv_exact),
     .help = "evict every step instead of a page at a time"},
    {.name = "kv-granularity", .type = DMN_OPT_ENUM, .offset = OFF(kv_granularity), .def = "layer",
     .names = dmn_opt_kv_granularities,
     .help = "one kept set per layer, or per KV head (as the official D2O code; CPU only)"},
};
#undef OFF

static const dmn_cmd_spec PPL_CMD = {
    .name = "perplexity",
    .usage = "--model M --file F [options]",
    .about = "Tokenises F as the model does (with its BOS), scores every token after the\n"
             "first teacher-forced in windows of the context, and prints one JSON line:\n"
             "{\"tokens\": N, \"predictions\": N-1, \"nll_sum\": X, \"ppl\": exp(X/(N-1))}\n"
             "\n"
             "With --kv-method the KV cache is compressed as during generation: the first\n"
             "--kv-prefill tokens of each window are prefilled and compressed, then every\n"
             "later token is fed one at a time with decode-time eviction.",
    .opts = PPL_OPTS,
    .n_opts = (int)(sizeof PPL_OPTS / sizeof PPL_OPTS[0]),
    .size = sizeof(ppl_opts),
};

/* Tokenises the file with the model's tokenizer (BOS first). */
static int ppl_tokenize(eng_engine *e, const char *file, int32_t **ids, size_t *n) {
    char *text = NULL;
    size_t len = 0;
    int rc = d2_read_file(file, &text, &len);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od perplexity: %s: %s\n", file, d2_strerror(rc));
        return rc;
    }
    const eng_tokenizer *tok = eng_engine_tokenizer(e);
    rc = tok ? eng_tok_encode(tok, text, len, true, false, ids, n) : D2_EUNSUPPORTED;
    free(text);
    if (rc == D2_OK && *n < 2) rc = D2_EINVAL;
    if (rc != D2_OK)
        fprintf(stderr, "d2od perplexity: %s\n", rc == D2_EINVAL ? "text has fewer than 2 tokens" : d2_strerror(rc));
    return rc;
}

int d2_cmd_perplexity(int argc, char **argv) {
    ppl_opts o;
    int ec_ = dmn_opts_main(&PPL_CMD, &o, argc, argv);
    if (ec_ >= 0) return ec_;
    eng_kv_config kv;
    eng_kv_config_default(&kv, (eng_kv_method)o.kv_method);
    kv.budget_frac = o.kv_budget.frac;
    kv.budget_tokens = o.kv_budget.tokens;
    kv.exact = o.kv_exact;
    kv.granularity = (eng_kv_granularity)o.kv_granularity;
    const char *why = NULL;
    if (eng_kv_config_validate(&kv, &why) != D2_OK)
        return dmn_opts_usage_error(&PPL_CMD, "%s", why ? why : "invalid KV compression options");
    if (access(o.file, R_OK) != 0) { /* before loading the model */
        fprintf(stderr, "d2od perplexity: %s: %s\n", o.file, strerror(errno));
        return 1;
    }
    eng_engine_config ec = {.model_path = o.model, .device = (eng_device)o.device, .n_threads = o.threads,
                            .max_seqs = 1, .ctx_len = o.ctx};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od perplexity: cannot load %s: %s\n", o.model, d2_strerror(rc));
        return 1;
    }
    int32_t *ids = NULL;
    size_t n = 0;
    if (ppl_tokenize(e, o.file, &ids, &n) != D2_OK) {
        free(ids);
        eng_engine_destroy(e);
        return 1;
    }
    double sum = 0;
    double t0 = d2_now();
    rc = kv.method == ENG_KV_FULL ? eng_score(e, ids, (int)n, NULL, &sum)
                                  : eng_score_kv(e, ids, (int)n, &kv, o.kv_prefill, NULL, &sum);
    double dt = d2_now() - t0;
    free(ids);
    eng_engine_destroy(e);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od perplexity: scoring failed: %s\n", d2_strerror(rc));
        return 1;
    }
    if (kv.method == ENG_KV_FULL)
        printf("{\"tokens\": %zu, \"predictions\": %zu, \"nll_sum\": %.9f, \"ppl\": %.9f}\n", n,
               n - 1, sum, exp(sum / (double)(n - 1)));
    else
        printf("{\"tokens\": %zu, \"predictions\": %zu, \"nll_sum\": %.9f, \"ppl\": %.9f, "
               "\"kv_method\": \"%s\", \"kv_budget\": %g}\n",
               n, n - 1, sum, exp(sum / (double)(n - 1)), eng_kv_method_name(kv.method),
               kv.budget_tokens > 0 ? (double)kv.budget_tokens : (double)kv.budget_frac);
    fprintf(stderr, "[d2od] scored %zu tokens in %.3f s (%.1f tok/s)\n", n, dt, (double)n / dt);
    return 0;
}
