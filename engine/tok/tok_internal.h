/*
 * engine/tok/tok_internal.h — private pieces shared by the tokenizer sources
 * (engine/tok/tokenizer.c, tok_unicode.c, tok_pretok.c, tok_bpe.c). Nothing
 * outside engine/tok*.c may include it; the public contract is
 * engine/tok/tokenizer.h. All names are prefixed eng__tok_.
 */
#ifndef D2_ENGINE_TOK_INTERNAL_H
#define D2_ENGINE_TOK_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/utf8.h"

/* ---- Unicode (tok_unicode.c) ---- */
bool eng__tok_is_letter(uint32_t cp);  /* \p{L} */
bool eng__tok_is_number(uint32_t cp);  /* \p{N} */
bool eng__tok_is_ws(uint32_t cp);      /* White_Space (Rust/Oniguruma \s) */
/* JavaScript's \s and String.prototype.trim set: White_Space without U+0085,
 * plus U+FEFF (tokenizers.js uses it for the ByteLevel GPT-2 regex and for
 * added tokens' lstrip/rstrip). */
bool eng__tok_is_js_ws(uint32_t cp);

/* Decodes text (len bytes) to code points: *cps malloc'd (caller frees),
 * *n set.
 * Each byte that does not start a valid UTF-8 sequence (incl. overlongs,
 * surrogates, > U+10FFFF, truncated) becomes one U+FFFD.
 * Returns D2_OK or D2_ENOMEM. */
int eng__tok_utf8_decode(const char *text, size_t len, uint32_t **cps, size_t *n);
/* Encodes cp as UTF-8 into out (>= 4 bytes); returns its length. */
/* Length of the valid UTF-8 sequence at s (avail bytes): 1..4; 0 when the
 * bytes are invalid there; -1 when they are a valid but incomplete prefix. */

/* NFC of cps[0..n) into a new malloc'd array (*out, *n_out). D2_OK/D2_ENOMEM. */
int eng__tok_nfc(const uint32_t *cps, size_t n, uint32_t **out, size_t *n_out);
const char *eng__tok_unicode_version(void);

/* ---- Pre-tokenizer patterns (tok_pretok.c) ---- */
typedef enum eng__tok_pat {
    ENG__TOK_PAT_NONE = 0,  /* the whole section is one pre-token */
    ENG__TOK_PAT_GPT2 = 1,  /* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
    ENG__TOK_PAT_LLAMA3 = 2,/* (?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
    ENG__TOK_PAT_QWEN2 = 3, /* as LLAMA3 with \p{N} (one digit) */
} eng__tok_pat;

/* Recognises a Split regex string of tokenizer.json; ENG__TOK_PAT_NONE when
 * it is none of the known patterns. */
eng__tok_pat eng__tok_pat_from_regex(const char *re);
/* Length (in code points, >= 1) of the pre-token that starts at cps[i] (i < n).
 * js_ws: \s means eng__tok_is_js_ws instead of eng__tok_is_ws. */
size_t eng__tok_pat_match(eng__tok_pat pat, bool js_ws, const uint32_t *cps, size_t n, size_t i);

/* ---- Hash map from byte strings to int32 (tok_bpe.c) ---- */
typedef struct eng__tok_map {
    uint32_t cap;          /* power of two */
    uint32_t count;
    int32_t *slot;         /* -1 empty, else index into keys */
    const char **key;      /* borrowed key pointers, per entry */
    uint32_t *klen;
    int32_t *val;
} eng__tok_map;
int eng__tok_map_init(eng__tok_map *m, uint32_t expect);
void eng__tok_map_free(eng__tok_map *m);
/* Inserts (key borrowed: must outlive the map) -> val; an existing key keeps
 * its first value unless overwrite. */
int eng__tok_map_put(eng__tok_map *m, const char *key, size_t klen, int32_t val, bool overwrite);
int32_t eng__tok_map_get(const eng__tok_map *m, const char *key, size_t klen); /* -1 if absent */

/* ---- BPE merge engine (tok_bpe.c) ---- */
/* Merge table keyed by (left id, right id). */
typedef struct eng__tok_merges {
    uint32_t cap;
    uint64_t *keys;        /* (left << 32 | right) + 1; 0 = empty */
    int32_t *rank;
    int32_t *merged;
} eng__tok_merges;
int eng__tok_merges_init(eng__tok_merges *mm, uint32_t expect);
void eng__tok_merges_free(eng__tok_merges *mm);
int eng__tok_merges_put(eng__tok_merges *mm, int32_t left, int32_t right, int32_t rank, int32_t merged);
bool eng__tok_merges_get(const eng__tok_merges *mm, int32_t left, int32_t right, int32_t *rank, int32_t *merged);

/* One word to merge: units are the initial symbols, given as byte spans of
 * word (unit k covers word[ustart[k] .. ustart[k+1])), with their ids (-1
 * when the unit is not in the vocabulary). */
typedef struct eng__tok_bpe_in {
    const char *word;
    size_t n_units;
    const uint32_t *ustart;   /* [n_units + 1] */
    const int32_t *uid;       /* [n_units] */
} eng__tok_bpe_in;

/* Rank mode (HF BPE): merges the lowest-ranked adjacent pair of mm, leftmost
 * first, until none applies. Score mode (SentencePiece, mm NULL): merges the
 * adjacent pair whose concatenated text is in vocab with the highest
 * scores[id], leftmost first. Output: for each final symbol its id (-1 when
 * unknown) and byte span [start, end) in word, appended to *out_ids /
 * *out_span (pairs), growing them with realloc (capacities *cap).
 * Returns D2_OK or D2_ENOMEM. */
typedef struct eng__tok_bpe_out {
    int32_t *ids;
    uint32_t *span;           /* 2 per symbol */
    size_t n, cap;
} eng__tok_bpe_out;
int eng__tok_bpe(const eng__tok_bpe_in *in, const eng__tok_merges *mm,
                 const eng__tok_map *vocab, const float *scores, eng__tok_bpe_out *out);

#endif
