/*
 * daemon/commands.c — the offline subcommands: generate, tokenize, perplexity.
 *
 * They drive the same engine the daemon serves with (model loader,
 * tokenizer, paged KV pool, backend, sampler); nothing here has a private
 * inference path. Output contracts:
 *   generate    stdout: only the generated continuation; stderr: timing.
 *   tokenize    stdout: one JSON array of ids.
 *   perplexity  stdout: one JSON line {"tokens", "predictions", "nll_sum", "ppl"}.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "common/util.h"
#include "daemon/cli.h"
#include "engine/engine.h"

const char *d2_cli_value(int argc, char **argv, int *i) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "d2od: option %s needs a value\n", argv[*i]);
        return NULL;
    }
    *i += 1;
    return argv[*i];
}

int d2_cli_int(const char *opt, const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end) {
        fprintf(stderr, "d2od: %s: '%s' is not an integer\n", opt, s);
        return -1;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "d2od: %s: %ld is out of range [%ld, %ld]\n", opt, v, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

int d2_cli_float(const char *opt, const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || isnan(v)) {
        fprintf(stderr, "d2od: %s: '%s' is not a number\n", opt, s);
        return -1;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "d2od: %s: %g is out of range [%g, %g]\n", opt, v, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

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

static void generate_help(FILE *f) {
    fprintf(f,
            "usage: d2od generate --model M --prompt P [options]\n"
            "\n"
            "Prints only the generated continuation on stdout (streamed); timing on stderr.\n"
            "\n"
            "  --model M               GGUF file or Hugging Face model directory (required)\n"
            "  --prompt P              prompt text (or --prompt-file F; '-' reads stdin)\n"
            "  --max-tokens N          tokens to generate (default 128)\n"
            "  --temperature T         0 = greedy (default 0.8)\n"
            "  --top-k K               keep the K most likely tokens (default 0 = off)\n"
            "  --top-p P               nucleus sampling mass (default 1 = off)\n"
            "  --min-p P               drop tokens below P x the top probability (default 0)\n"
            "  --repetition-penalty R  (default 1 = off)\n"
            "  --presence-penalty X    (default 0)\n"
            "  --frequency-penalty X   (default 0)\n"
            "  --seed S                sampling seed; same seed, same output\n"
            "  --ignore-eos            keep generating past end-of-sequence tokens\n"
            "  --no-bos                do not add the tokenizer's BOS token\n"
            "  --threads N             CPU threads (default: all cores)\n"
            "  --ctx N                 context length (default: the model's)\n"
            "  --show-ids              print the generated token ids to stderr\n");
}

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

int d2_cmd_generate(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL, *prompt_file = NULL;
    long max_tokens = 128, threads = 0, ctx = 0, top_k = 0, seed = 0;
    double temp = 0.8, top_p = 1.0, min_p = 0.0, rep = 1.0, pres = 0.0, freq = 0.0;
    int has_seed = 0, ignore_eos = 0, no_bos = 0, show_ids = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v;
#define VAL() do { if (!(v = d2_cli_value(argc, argv, &i))) return 2; } while (0)
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { generate_help(stdout); return 0; }
        else if (!strcmp(a, "--model")) { VAL(); model = v; }
        else if (!strcmp(a, "--prompt")) { VAL(); prompt = v; }
        else if (!strcmp(a, "--prompt-file")) { VAL(); prompt_file = v; }
        else if (!strcmp(a, "--max-tokens")) { VAL(); if (d2_cli_int(a, v, 0, 1 << 24, &max_tokens)) return 2; }
        else if (!strcmp(a, "--threads")) { VAL(); if (d2_cli_int(a, v, 0, 1024, &threads)) return 2; }
        else if (!strcmp(a, "--ctx")) { VAL(); if (d2_cli_int(a, v, 1, 1 << 24, &ctx)) return 2; }
        else if (!strcmp(a, "--top-k")) { VAL(); if (d2_cli_int(a, v, 0, 1 << 24, &top_k)) return 2; }
        else if (!strcmp(a, "--seed")) { VAL(); if (d2_cli_int(a, v, 0, 0x7fffffffL, &seed)) return 2; has_seed = 1; }
        else if (!strcmp(a, "--temperature")) { VAL(); if (d2_cli_float(a, v, 0, 2, &temp)) return 2; }
        else if (!strcmp(a, "--top-p")) { VAL(); if (d2_cli_float(a, v, 1e-9, 1, &top_p)) return 2; }
        else if (!strcmp(a, "--min-p")) { VAL(); if (d2_cli_float(a, v, 0, 1, &min_p)) return 2; }
        else if (!strcmp(a, "--repetition-penalty")) { VAL(); if (d2_cli_float(a, v, 1e-3, 10, &rep)) return 2; }
        else if (!strcmp(a, "--presence-penalty")) { VAL(); if (d2_cli_float(a, v, -2, 2, &pres)) return 2; }
        else if (!strcmp(a, "--frequency-penalty")) { VAL(); if (d2_cli_float(a, v, -2, 2, &freq)) return 2; }
        else if (!strcmp(a, "--ignore-eos")) ignore_eos = 1;
        else if (!strcmp(a, "--no-bos")) no_bos = 1;
        else if (!strcmp(a, "--show-ids")) show_ids = 1;
        else { fprintf(stderr, "d2od generate: unknown option '%s'\n", a); generate_help(stderr); return 2; }
#undef VAL
    }
    if (!model || (!prompt && !prompt_file)) {
        fprintf(stderr, "d2od generate: --model and --prompt are required\n");
        generate_help(stderr);
        return 2;
    }
    char *prompt_buf = NULL;
    size_t prompt_len = 0;
    if (prompt_file) {
        int rc = !strcmp(prompt_file, "-") ? read_stream(stdin, &prompt_buf, &prompt_len)
                                           : d2_read_file(prompt_file, &prompt_buf, &prompt_len);
        if (rc != D2_OK) {
            fprintf(stderr, "d2od generate: %s: %s\n", prompt_file, d2_strerror(rc));
            return 1;
        }
        prompt = prompt_buf;
    } else {
        prompt_len = strlen(prompt);
    }

    double t_load = d2_now();
    eng_engine_config ec = {.model_path = model, .n_threads = (int)threads, .max_seqs = 1,
                            .ctx_len = (int)ctx};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od generate: cannot load %s: %s\n", model, d2_strerror(rc));
        free(prompt_buf);
        return 1;
    }
    t_load = d2_now() - t_load;
    const eng_tokenizer *tok = eng_engine_tokenizer(e);
    if (!tok) {
        fprintf(stderr, "d2od generate: %s has no tokenizer\n", model);
        eng_engine_destroy(e);
        free(prompt_buf);
        return 1;
    }
    int32_t *ids = NULL;
    size_t n_ids = 0;
    rc = eng_tok_encode(tok, prompt, prompt_len, !no_bos, true, &ids, &n_ids);
    free(prompt_buf);
    if (rc != D2_OK || n_ids == 0) {
        fprintf(stderr, "d2od generate: cannot tokenize the prompt: %s\n",
                rc != D2_OK ? d2_strerror(rc) : "empty prompt");
        free(ids);
        eng_engine_destroy(e);
        return 1;
    }
    int32_t *out = calloc((size_t)(max_tokens > 0 ? max_tokens : 1), sizeof(int32_t));
    gen_print gp = {.tok = tok};
    eng_tok_stream_init(&gp.stream, true);
    {
        char sink[1024]; /* run the prompt through the detokeniser so spacing rules see it */
        for (size_t k = 0; k < n_ids; k++) eng_tok_stream_feed(tok, &gp.stream, ids[k], sink, sizeof sink);
        gp.stream.n_pending = 0;
    }
    eng_gen_seq s = {.prompt = ids, .n_prompt = (int)n_ids, .max_tokens = (int)max_tokens,
                     .ignore_eos = ignore_eos, .on_token = gen_on_token, .user = &gp,
                     .out_tokens = out};
    eng_sample_params_default(&s.sample);
    s.sample.temperature = (float)temp;
    s.sample.top_k = (int)top_k;
    s.sample.top_p = (float)top_p;
    s.sample.min_p = (float)min_p;
    s.sample.repetition_penalty = (float)rep;
    s.sample.presence_penalty = (float)pres;
    s.sample.frequency_penalty = (float)freq;
    s.sample.seed = (uint64_t)seed;
    s.sample.has_seed = has_seed;
    rc = eng_run(e, &s, 1);
    char tail[64];
    int w = eng_tok_stream_finish(tok, &gp.stream, tail, sizeof tail);
    if (w > 0) fwrite(tail, 1, (size_t)w, stdout);
    fflush(stdout);
    int exit_code = 0;
    if (rc != D2_OK || s.status != D2_OK) {
        fprintf(stderr, "\nd2od generate: failed: %s\n", d2_strerror(rc != D2_OK ? rc : s.status));
        exit_code = 1;
    } else {
        double dec = s.t_done - s.t_first_token;
        fprintf(stderr,
                "\n[d2od] load %.3f s | prompt %zu tokens in %.3f s (%.1f tok/s) | generated %d "
                "tokens, %.1f tok/s decode | finish: %s\n",
                t_load, n_ids, s.t_first_token, (double)n_ids / (s.t_first_token > 0 ? s.t_first_token : 1e-9),
                s.n_out, s.n_out > 1 && dec > 0 ? (double)(s.n_out - 1) / dec : 0.0,
                s.finish == ENG_FINISH_STOP ? "stop" : "length");
        if (show_ids) {
            fprintf(stderr, "[d2od] ids:");
            for (int k = 0; k < s.n_out; k++) fprintf(stderr, " %d", out[k]);
            fprintf(stderr, "\n");
        }
    }
    free(out);
    free(ids);
    eng_engine_destroy(e);
    return exit_code;
}

/* ---- tokenize ------------------------------------------------------------------ */

int d2_cmd_tokenize(int argc, char **argv) {
    const char *model = NULL;
    int add_special = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: d2od tokenize --model M [--add-special] < text\n"
                   "\n"
                   "Reads UTF-8 text on stdin and prints its token ids as one JSON array.\n"
                   "  --model M        GGUF file, HF model directory, a directory holding only\n"
                   "                   tokenizer files, or a tokenizer.json path\n"
                   "  --add-special    add BOS/EOS as the tokenizer is configured to (default: none)\n");
            return 0;
        } else if (!strcmp(a, "--model")) {
            if (!(model = d2_cli_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--add-special")) {
            add_special = 1;
        } else {
            fprintf(stderr, "d2od tokenize: unknown option '%s'\n", a);
            return 2;
        }
    }
    if (!model) {
        fprintf(stderr, "d2od tokenize: --model is required\n");
        return 2;
    }
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

int d2_cmd_perplexity(int argc, char **argv) {
    const char *model = NULL, *file = NULL, *kv_method = NULL, *kv_budget = NULL;
    long threads = 0, ctx = 0, kv_prefill = 0;
    bool kv_exact = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: d2od perplexity --model M --file F [--ctx N] [--threads N]\n"
                   "         [--kv-method full|d2o|h2o|streamingllm|snapkv|pyramidkv]\n"
                   "         [--kv-budget B] [--kv-prefill N] [--kv-exact]\n"
                   "\n"
                   "Tokenises F as the model does (with its BOS), scores every token after the\n"
                   "first teacher-forced in windows of the context, and prints one JSON line:\n"
                   "{\"tokens\": N, \"predictions\": N-1, \"nll_sum\": X, \"ppl\": exp(X/(N-1))}\n"
                   "\n"
                   "With --kv-method the KV cache is compressed as during generation: the first\n"
                   "--kv-prefill tokens of each window (default 64) are prefilled and compressed,\n"
                   "then every later token is fed one at a time with decode-time eviction.\n"
                   "--kv-budget: a fraction of the prefill (\"0.2\", default) or a token count\n"
                   "per layer (\"128\"). --kv-exact evicts every step instead of a page at a time.\n");
            return 0;
        } else if (!strcmp(a, "--model")) {
            if (!(model = d2_cli_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--file")) {
            if (!(file = d2_cli_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--threads")) {
            if (!(v = d2_cli_value(argc, argv, &i)) || d2_cli_int(a, v, 0, 1024, &threads)) return 2;
        } else if (!strcmp(a, "--ctx")) {
            if (!(v = d2_cli_value(argc, argv, &i)) || d2_cli_int(a, v, 2, 1 << 24, &ctx)) return 2;
        } else if (!strcmp(a, "--kv-method")) {
            if (!(kv_method = d2_cli_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--kv-budget")) {
            if (!(kv_budget = d2_cli_value(argc, argv, &i))) return 2;
        } else if (!strcmp(a, "--kv-prefill")) {
            if (!(v = d2_cli_value(argc, argv, &i)) || d2_cli_int(a, v, 1, 1 << 24, &kv_prefill))
                return 2;
        } else if (!strcmp(a, "--kv-exact")) {
            kv_exact = true;
        } else {
            fprintf(stderr, "d2od perplexity: unknown option '%s'\n", a);
            return 2;
        }
    }
    if (!model || !file) {
        fprintf(stderr, "d2od perplexity: --model and --file are required\n");
        return 2;
    }
    eng_kv_config kv;
    eng_kv_config_default(&kv, ENG_KV_FULL);
    if (kv_method) {
        int m = eng_kv_method_parse(kv_method);
        if (m < 0) {
            fprintf(stderr, "d2od perplexity: unknown --kv-method '%s' (full, d2o, h2o, "
                            "streamingllm, snapkv, pyramidkv)\n", kv_method);
            return 2;
        }
        eng_kv_config_default(&kv, (eng_kv_method)m);
    }
    if (kv_budget) {
        if (strpbrk(kv_budget, ".eE")) {
            double f;
            if (d2_cli_float("--kv-budget", kv_budget, 1e-6, 1.0, &f)) return 2;
            kv.budget_frac = (float)f;
        } else {
            long b;
            if (d2_cli_int("--kv-budget", kv_budget, 1, 1 << 24, &b)) return 2;
            kv.budget_tokens = (int)b;
        }
    }
    kv.exact = kv_exact;
    const char *why = NULL;
    if (eng_kv_config_validate(&kv, &why) != D2_OK) {
        fprintf(stderr, "d2od perplexity: %s\n", why ? why : "invalid KV compression options");
        return 2;
    }
    char *text = NULL;
    size_t len = 0;
    int rc = d2_read_file(file, &text, &len);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od perplexity: %s: %s\n", file, d2_strerror(rc));
        return 1;
    }
    eng_engine_config ec = {.model_path = model, .n_threads = (int)threads, .max_seqs = 1,
                            .ctx_len = (int)ctx};
    eng_engine *e = NULL;
    rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) {
        fprintf(stderr, "d2od perplexity: cannot load %s: %s\n", model, d2_strerror(rc));
        free(text);
        return 1;
    }
    const eng_tokenizer *tok = eng_engine_tokenizer(e);
    int32_t *ids = NULL;
    size_t n = 0;
    rc = tok ? eng_tok_encode(tok, text, len, true, false, &ids, &n) : D2_EUNSUPPORTED;
    free(text);
    if (rc != D2_OK || n < 2) {
        fprintf(stderr, "d2od perplexity: %s\n", rc != D2_OK ? d2_strerror(rc) : "text has fewer than 2 tokens");
        free(ids);
        eng_engine_destroy(e);
        return 1;
    }
    double sum = 0;
    double t0 = d2_now();
    rc = kv.method == ENG_KV_FULL ? eng_score(e, ids, (int)n, NULL, &sum)
                                  : eng_score_kv(e, ids, (int)n, &kv, (int)kv_prefill, NULL, &sum);
    double dt = d2_now() - t0;
    if (rc != D2_OK) {
        fprintf(stderr, "d2od perplexity: scoring failed: %s\n", d2_strerror(rc));
        free(ids);
        eng_engine_destroy(e);
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
    free(ids);
    eng_engine_destroy(e);
    return 0;
}
