/*
 * engine/model/safetensors.h — safetensors reader over a memory buffer (internal
 * to engine/; used by engine/model/model.c and tests/fuzz/fuzz_safetensors.c).
 *
 * Layout: u64 little-endian header length N, N bytes of JSON
 * {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...,
 *  "__metadata__": {...}}, then the data section; offsets are relative to
 * the data section. st_parse() validates that every tensor's byte range is
 * inside the file, matches dtype x shape, is aligned to its element size,
 * and that no two ranges overlap. The header is limited to 100 MB (as the
 * reference implementation does).
 *
 * dtypes F32, F16 and BF16 map to eng_dtype; other known safetensors dtypes
 * are parsed and size-checked but have dtype = -1 (a loader that needs such
 * a tensor reports D2_EUNSUPPORTED). An unknown dtype string fails the parse.
 *
 * The buffer must outlive the st_file. Thread-safety: immutable after parse.
 */
#ifndef D2_ENGINE_SAFETENSORS_H
#define D2_ENGINE_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#define ST_MAX_DIMS 8

typedef struct st_tensor {
    char *name;            /* owned */
    int dtype;             /* eng_dtype, or -1 when not F32/F16/BF16 */
    char dtype_name[12];   /* as written in the file */
    int ndim;              /* 0..ST_MAX_DIMS; shape is slowest-first */
    int64_t shape[ST_MAX_DIMS];
    uint64_t begin, end;   /* relative to the data section */
    const uint8_t *data;   /* base + 8 + header_len + begin */
} st_tensor;

typedef struct st_file {
    const uint8_t *base;
    size_t size;
    uint64_t header_len;
    st_tensor *tensors;    /* owned */
    size_t n_tensors;
} st_file;

/* Parses data[0..size); name is for error messages. On failure *f is
 * zeroed. Returns D2_OK, D2_EFORMAT, D2_EJSON, D2_EUNSUPPORTED, D2_ENOMEM. */
int st_parse(const uint8_t *data, size_t size, const char *name, st_file *f);
void st_free(st_file *f); /* accepts a zeroed file */
const st_tensor *st_find(const st_file *f, const char *name);

#endif
