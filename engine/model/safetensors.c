/*
 * engine/model/safetensors.c — safetensors reader; see safetensors.h.
 *
 * The JSON header is parsed with jansson (duplicate keys rejected). Tensor
 * entries are copied into a flat array, then sorted by offset to detect
 * overlaps; st_find is a linear scan (models have at most a few thousand
 * tensors and lookups happen once per load).
 */
#include "engine/model/safetensors.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "engine/model/model.h"

#define ST_MAX_HEADER (100u * 1024u * 1024u)

static int dtype_info(const char *s, int *dtype, unsigned *size) {
    static const struct { const char *n; int dt; unsigned sz; } tab[] = {
        {"F32", ENG_F32, 4}, {"F16", ENG_F16, 2}, {"BF16", ENG_BF16, 2},
        {"F64", -1, 8}, {"I64", -1, 8}, {"U64", -1, 8}, {"I32", -1, 4}, {"U32", -1, 4},
        {"I16", -1, 2}, {"U16", -1, 2}, {"I8", -1, 1}, {"U8", -1, 1}, {"BOOL", -1, 1},
        {"F8_E4M3", -1, 1}, {"F8_E5M2", -1, 1},
    };
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++)
        if (strcmp(s, tab[i].n) == 0) {
            *dtype = tab[i].dt;
            *size = tab[i].sz;
            return 0;
        }
    return -1;
}

static int cmp_begin(const void *a, const void *b) {
    const st_tensor *x = *(const st_tensor *const *)a, *y = *(const st_tensor *const *)b;
    return x->begin < y->begin ? -1 : x->begin > y->begin;
}

/* Fills t from one header entry; returns a status. */
static int parse_entry(const char *fname, const char *key, json_t *v, uint64_t data_size,
                       uint64_t data_start, st_tensor *t) {
    if (!json_is_object(v)) {
        D2_ERROR("%s: safetensors entry '%s' is not an object", fname, key);
        return D2_EFORMAT;
    }
    json_t *jd = json_object_get(v, "dtype"), *js = json_object_get(v, "shape"),
           *jo = json_object_get(v, "data_offsets");
    if (!json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
        json_array_size(jo) != 2) {
        D2_ERROR("%s: tensor '%s': missing or malformed dtype/shape/data_offsets", fname, key);
        return D2_EFORMAT;
    }
    unsigned esize = 0;
    const char *ds = json_string_value(jd);
    if (dtype_info(ds, &t->dtype, &esize) != 0) {
        D2_ERROR("%s: tensor '%s': unknown dtype '%.16s'", fname, key, ds);
        return D2_EUNSUPPORTED;
    }
    snprintf(t->dtype_name, sizeof t->dtype_name, "%s", ds);
    size_t nd = json_array_size(js);
    if (nd > ST_MAX_DIMS) {
        D2_ERROR("%s: tensor '%s': %zu dimensions (at most %d)", fname, key, nd, ST_MAX_DIMS);
        return D2_EFORMAT;
    }
    t->ndim = (int)nd;
    uint64_t nel = 1;
    for (size_t d = 0; d < nd; d++) {
        json_t *x = json_array_get(js, d);
        json_int_t n = json_is_integer(x) ? json_integer_value(x) : -1;
        if (n < 0 || (nel && (uint64_t)n > (UINT64_C(1) << 59) / nel)) {
            D2_ERROR("%s: tensor '%s': bad dimension %zu", fname, key, d);
            return D2_EFORMAT;
        }
        t->shape[d] = (int64_t)n;
        nel *= (uint64_t)n;
    }
    json_t *b = json_array_get(jo, 0), *e = json_array_get(jo, 1);
    if (!json_is_integer(b) || !json_is_integer(e) || json_integer_value(b) < 0 ||
        json_integer_value(e) < json_integer_value(b)) {
        D2_ERROR("%s: tensor '%s': malformed data_offsets", fname, key);
        return D2_EFORMAT;
    }
    t->begin = (uint64_t)json_integer_value(b);
    t->end = (uint64_t)json_integer_value(e);
    if (t->end > data_size) {
        D2_ERROR("%s: tensor '%s': data [%" PRIu64 ", %" PRIu64 ") lies beyond the end of the "
                 "file (data section holds %" PRIu64 " bytes)", fname, key, t->begin, t->end,
                 data_size);
        return D2_EFORMAT;
    }
    if (t->end - t->begin != nel * esize) {
        D2_ERROR("%s: tensor '%s': %" PRIu64 " bytes of data but dtype %s x shape needs %" PRIu64,
                 fname, key, t->end - t->begin, ds, nel * esize);
        return D2_ESHAPE;
    }
    if ((data_start + t->begin) % esize != 0) {
        D2_ERROR("%s: tensor '%s': data at file offset %" PRIu64 " is not aligned to %u bytes",
                 fname, key, data_start + t->begin, esize);
        return D2_EFORMAT;
    }
    t->name = strdup(key);
    return t->name ? D2_OK : D2_ENOMEM;
}

int st_parse(const uint8_t *data, size_t size, const char *name, st_file *f) {
    memset(f, 0, sizeof *f);
    if (!name) name = "(buffer)";
    uint64_t hl;
    if (!data || size < 8) {
        D2_ERROR("%s: truncated safetensors file (%zu bytes)", name, data ? size : 0);
        return D2_EFORMAT;
    }
    memcpy(&hl, data, 8);
    if (hl < 2 || hl > ST_MAX_HEADER || hl > size - 8) {
        D2_ERROR("%s: safetensors header length %" PRIu64 " is invalid for a %zu-byte file", name,
                 hl, size);
        return D2_EFORMAT;
    }
    json_error_t jerr;
    json_t *root = json_loadb((const char *)data + 8, (size_t)hl, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        D2_ERROR("%s: safetensors header is not valid JSON: %s (line %d)", name, jerr.text,
                 jerr.line);
        return D2_EJSON;
    }
    int rc = D2_OK;
    st_tensor **order = NULL;
    if (!json_is_object(root)) {
        D2_ERROR("%s: safetensors header is not a JSON object", name);
        rc = D2_EFORMAT;
        goto out;
    }
    size_t cap = json_object_size(root);
    f->tensors = calloc(cap ? cap : 1, sizeof *f->tensors);
    if (!f->tensors) { rc = D2_ENOMEM; goto out; }
    f->base = data;
    f->size = size;
    f->header_len = hl;
    uint64_t data_start = 8 + hl, data_size = size - data_start;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) continue;
        st_tensor *t = &f->tensors[f->n_tensors];
        if ((rc = parse_entry(name, key, val, data_size, data_start, t))) goto out;
        t->data = data + data_start + t->begin;
        f->n_tensors++;
    }
    if (f->n_tensors > 1) {
        order = malloc(f->n_tensors * sizeof *order);
        if (!order) { rc = D2_ENOMEM; goto out; }
        for (size_t i = 0; i < f->n_tensors; i++) order[i] = &f->tensors[i];
        qsort(order, f->n_tensors, sizeof *order, cmp_begin);
        for (size_t i = 1; i < f->n_tensors; i++)
            if (order[i]->begin < order[i - 1]->end) {
                D2_ERROR("%s: tensors '%s' and '%s' overlap", name, order[i - 1]->name,
                         order[i]->name);
                rc = D2_EFORMAT;
                goto out;
            }
    }
out:
    free(order);
    json_decref(root);
    if (rc) st_free(f);
    return rc;
}

void st_free(st_file *f) {
    if (!f) return;
    for (size_t i = 0; i < f->n_tensors; i++) free(f->tensors[i].name);
    free(f->tensors);
    memset(f, 0, sizeof *f);
}

const st_tensor *st_find(const st_file *f, const char *name) {
    for (size_t i = 0; i < f->n_tensors; i++)
        if (strcmp(f->tensors[i].name, name) == 0) return &f->tensors[i];
    return NULL;
}
