/*
 * engine/model/gguf.h — GGUF v2/v3 reader over a memory buffer (internal to
 * engine/; used by engine/model/model.c and tests/fuzz/fuzz_gguf.c).
 *
 * gguf_parse() validates the whole header in one pass: every metadata value
 * (arrays and strings included) lies inside the buffer, nested arrays are
 * rejected, tensor dims and byte sizes do not overflow, tensor data is
 * aligned, inside the buffer and non-overlapping. Counts read from the file
 * are checked against the bytes that remain before anything is allocated,
 * so a lying header costs at most O(file size) memory.
 *
 * Strings (keys, values, tensor names) are views into the buffer and are NOT
 * NUL-terminated. The buffer must outlive the gguf_file. Only the tensor
 * types F32, F16, BF16 and Q8_0 are accepted (others: D2_EUNSUPPORTED).
 * A file with zero tensors (vocab-only) may end right after the metadata.
 *
 * Thread-safety: a parsed gguf_file is immutable; readers may share it.
 */
#ifndef D2_ENGINE_GGUF_H
#define D2_ENGINE_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Metadata value types, as numbered by the GGUF spec. */
enum {
    GGUF_T_UINT8 = 0, GGUF_T_INT8 = 1, GGUF_T_UINT16 = 2, GGUF_T_INT16 = 3,
    GGUF_T_UINT32 = 4, GGUF_T_INT32 = 5, GGUF_T_FLOAT32 = 6, GGUF_T_BOOL = 7,
    GGUF_T_STRING = 8, GGUF_T_ARRAY = 9, GGUF_T_UINT64 = 10, GGUF_T_INT64 = 11,
    GGUF_T_FLOAT64 = 12,
};

/* ggml tensor type ids that this reader accepts. */
enum { GGML_T_F32 = 0, GGML_T_F16 = 1, GGML_T_Q8_0 = 8, GGML_T_BF16 = 30 };

typedef struct gguf_str {
    const char *p; /* into the buffer, not NUL-terminated */
    size_t len;
} gguf_str;

typedef struct gguf_kv {
    gguf_str key;
    uint32_t type;       /* GGUF_T_* */
    uint32_t arr_type;   /* element type when type == GGUF_T_ARRAY */
    uint64_t arr_n;      /* element count when type == GGUF_T_ARRAY */
    const uint8_t *val;  /* first byte of the value (arrays: of the first element) */
} gguf_kv;

typedef struct gguf_tensor {
    gguf_str name;
    uint32_t n_dims;     /* 1..4 */
    uint64_t ne[4];      /* fastest-varying first; unused dims are 1 */
    uint32_t type;       /* GGML_T_* */
    uint64_t offset;     /* relative to the data section */
    uint64_t nbytes;
    const uint8_t *data; /* base + data_offset + offset */
} gguf_tensor;

typedef struct gguf_file {
    const uint8_t *base;
    size_t size;
    uint32_t version;
    uint64_t n_kv, n_tensors;
    gguf_kv *kvs;           /* [n_kv], owned */
    gguf_tensor *tensors;   /* [n_tensors], owned */
    uint64_t alignment;
    uint64_t data_offset;   /* start of the data section in the buffer */
} gguf_file;

/* Parses data[0..size). name is used only in error messages. On failure
 * *f is left zeroed (nothing to free). Returns D2_OK, D2_EFORMAT,
 * D2_EUNSUPPORTED (version, tensor type, nested array) or D2_ENOMEM. */
int gguf_parse(const uint8_t *data, size_t size, const char *name, gguf_file *f);
void gguf_free(gguf_file *f); /* accepts a zeroed file */

/* True when s equals the NUL-terminated string c. */
bool gguf_str_eq(gguf_str s, const char *c);

const gguf_kv *gguf_find(const gguf_file *f, const char *key);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);

/* Typed getters. Integers accept any integer type (D2_ERANGE if the value
 * does not fit int64); floats accept float and integer types. Return D2_OK
 * or D2_EFORMAT on a type mismatch. */
int gguf_kv_int(const gguf_kv *kv, int64_t *out);
int gguf_kv_float(const gguf_kv *kv, double *out);
int gguf_kv_bool(const gguf_kv *kv, bool *out);
int gguf_kv_str(const gguf_kv *kv, gguf_str *out);

/* Size in bytes of one element of a fixed-size type; 0 for string/array. */
size_t gguf_type_size(uint32_t type);

/* Reads element i of a fixed-size numeric array (already bounds-checked by
 * the parse) as double / int64. i must be < kv->arr_n. */
double gguf_arr_float(const gguf_kv *kv, uint64_t i);
int64_t gguf_arr_int(const gguf_kv *kv, uint64_t i);

/* Fills out[0..kv->arr_n) with the strings of a string array (the caller
 * allocates kv->arr_n entries; the parse proved arr_n*8 <= file size).
 * Returns D2_OK or D2_EFORMAT when kv is not a string array. */
int gguf_arr_strings(const gguf_kv *kv, gguf_str *out);

const char *gguf_type_name(uint32_t ggml_type);

#endif
