/*
 * engine/tok/tokenizer.h — exact tokenizers (internal to engine/; re-exported by
 * engine/engine.h).
 *
 * Kinds:
 *  - Byte-level BPE from tokenizer.json (GPT-2, Llama-3, Qwen2 regex
 *    pre-tokenizers; ignore_merges; merges as "a b" or ["a","b"]; optional NFC).
 *  - SentencePiece-style BPE from tokenizer.json (byte_fallback; Metaspace or
 *    Prepend+Replace normalizers), ranked by merges.
 *  - From GGUF metadata: "llama" (SentencePiece with scores: merge the
 *    highest-scoring pair) and "gpt2" (byte-level BPE with merges).
 * Added/special tokens are matched in the text before pre-tokenisation (when
 * parse_special is set), honouring lstrip/rstrip as HF does.
 * Goal: ids identical to @huggingface/tokenizers on the same tokenizer.json
 * (checked by tests/unit/test_tokenizer.c against tests/fixtures/tok_oracle.json,
 * which tests/js/tok_oracle.mjs makes; see engine/tok/tokenizer.c for the few
 * places where tokenizers.js and the Rust crate differ and which one we follow).
 * Supported tokenizer.json parts: model BPE (dropout null, no subword
 * prefix/suffix); normalizer null/NFC/Prepend/Replace(String)/Sequence;
 * pre_tokenizer null, ByteLevel, Split with one of the three known regexes
 * (Isolated), Metaspace, Sequence; post_processor TemplateProcessing (BOS/EOS
 * from its "single" template) or, without one, tokenizer_config add_bos_token /
 * add_eos_token; decoder ByteLevel, Metaspace, or Sequence of Replace,
 * ByteFallback, Fuse, Strip. Anything else fails with D2_EUNSUPPORTED, logging
 * the file. GGUF: token types 2/3 (unknown/control) are special added tokens
 * (matched only with parse_special), 4 (user-defined) plain added tokens.
 * Unicode tables: engine/tok/tok_unicode_tables.h (Unicode 14, from Python's
 * unicodedata via tools/gen_unicode_tables.py).
 *
 * Thread-safety: a loaded tokenizer is immutable; encode/decode may be called
 * from any thread concurrently. Ownership as stated per function.
 */
#ifndef D2_ENGINE_TOKENIZER_H
#define D2_ENGINE_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct eng_tokenizer eng_tokenizer;

/* Loads tokenizer.json (required) and tokenizer_config.json (optional, may be
 * NULL or a missing file) from paths. *out owned by the caller. Errors name
 * the file in the log. */
int eng_tok_load_hf(const char *tokenizer_json, const char *tokenizer_config_json,
                    eng_tokenizer **out);

/* Vocabulary from GGUF metadata (tokenizer.ggml.*). All arrays borrowed for
 * the call only (the tokenizer copies what it keeps). */
typedef struct eng_tok_gguf_desc {
    const char *model;            /* "llama" or "gpt2" */
    const char *pre;              /* tokenizer.ggml.pre (e.g. "llama-bpe", "qwen2", "gpt-2"), may be NULL */
    int n_vocab;
    const char *const *tokens;    /* [n_vocab], NUL-terminated UTF-8 */
    const size_t *token_lens;     /* [n_vocab] byte lengths */
    const float *scores;          /* [n_vocab] or NULL */
    const int32_t *token_types;   /* [n_vocab] or NULL: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte */
    int n_merges;
    const char *const *merges;    /* [n_merges] "a b", or NULL */
    int bos_id, eos_id, unk_id, pad_id; /* -1 when absent */
    int add_bos, add_eos;         /* -1 when absent (then model default) */
    int add_space_prefix;         /* -1 when absent */
} eng_tok_gguf_desc;
int eng_tok_load_gguf(const eng_tok_gguf_desc *desc, eng_tokenizer **out);

void eng_tok_free(eng_tokenizer *t); /* accepts NULL */

int eng_tok_n_vocab(const eng_tokenizer *t);
int eng_tok_bos(const eng_tokenizer *t);  /* -1 when none */
int eng_tok_eos(const eng_tokenizer *t);  /* -1 when none */
/* Whether encoding with add_special adds BOS / EOS (from tokenizer_config or
 * the post-processor / GGUF flags). */
bool eng_tok_adds_bos(const eng_tokenizer *t);
bool eng_tok_adds_eos(const eng_tokenizer *t);
/* Id of a token's exact text as the vocabulary writes it (tokenizer.json /
 * GGUF form, e.g. "Ġthe" for byte-level, "▁the" for SentencePiece; added
 * tokens by content), or -1. */
int eng_tok_find(const eng_tokenizer *t, const char *text);
/* True for special/control tokens (skipped when decoding with skip_special). */
bool eng_tok_is_special(const eng_tokenizer *t, int id);

/* Encodes len bytes of UTF-8 text. add_special: add BOS/EOS as the tokenizer
 * is configured to. parse_special: recognise special tokens' text.
 * On success *ids is malloc'd (caller frees) holding *n ids.
 * Returns D2_OK, D2_EINVAL or D2_ENOMEM. Invalid UTF-8 is not an error:
 * each byte that does not start a valid sequence is replaced by U+FFFD
 * before tokenizing (a JS/HF string cannot hold such bytes; this defines it).
 * parse_special false: added tokens marked special are not recognised (plain
 * added tokens still are). */
int eng_tok_encode(const eng_tokenizer *t, const char *text, size_t len, bool add_special,
                   bool parse_special, int32_t **ids, size_t *n);

/* The raw bytes one token stands for (byte-level tokens mapped back to bytes,
 * SentencePiece '▁' to ' ', <0xNN> to the byte). Borrowed; *len set. NULL for
 * an id out of range. Does not apply the "strip leading space" rule. */
const char *eng_tok_piece(const eng_tokenizer *t, int id, size_t *len);

/* Decodes ids to a new NUL-terminated malloc'd string (caller frees), as HF
 * decode(skip_special_tokens) does (incl. SentencePiece leading-space strip). */
int eng_tok_decode(const eng_tokenizer *t, const int32_t *ids, size_t n, bool skip_special,
                   char **out);

/* Incremental detokeniser for streaming: feed ids one at a time; emitted text
 * is always whole UTF-8 sequences (bytes of an incomplete sequence are held
 * back until completed, or flushed as U+FFFD by eng_tok_stream_finish).
 * The state is a plain struct the caller owns (no allocation). */
typedef struct eng_tok_stream {
    uint8_t pending[8];
    int n_pending;
    int n_tokens;        /* tokens fed so far */
    bool skip_special;
    size_t n_bytes;      /* piece bytes produced so far (the SentencePiece
                            leading-space strip applies while this is 0) */
} eng_tok_stream;
void eng_tok_stream_init(eng_tok_stream *s, bool skip_special);
/* Appends the text that becomes complete after id to out (capacity cap,
 * NUL-terminated); returns the number of bytes written or a negative status
 * (D2_EINVAL for an id out of range; D2_ERANGE, with the state unchanged,
 * if cap is too small: 3 * eng_tok_max_piece_len(t) + 16 always suffices,
 * since each invalid byte may become a 3-byte U+FFFD; 64 bytes suffice for
 * valid text whose pieces are at most 48 bytes).
 * Bytes that can never complete a sequence are emitted as U+FFFD at once;
 * a valid but incomplete prefix (at most 3 bytes) is held in pending. */
int eng_tok_stream_feed(const eng_tokenizer *t, eng_tok_stream *s, int id, char *out, size_t cap);
int eng_tok_stream_finish(const eng_tokenizer *t, eng_tok_stream *s, char *out, size_t cap);
size_t eng_tok_max_piece_len(const eng_tokenizer *t);

#endif
