/*
 * engine/model/gguf.c — GGUF reader; see gguf.h for the contract.
 *
 * All multi-byte fields are little-endian and may be unaligned in the
 * buffer, so every read goes through memcpy. The reader cursor never moves
 * past the end: each read checks the remaining length first.
 */
#include "engine/model/gguf.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"

#define GGUF_MAGIC 0x46554747u /* "GGUF" read little-endian */
#define GGUF_MAX_KEY 65535u
#define GGUF_MAX_NAME 4096u
#define GGUF_MAX_ALIGN (1u << 20)

typedef struct rd {
    const uint8_t *p;
    size_t size, pos;
    const char *name;
} rd;

static size_t rd_left(const rd *r) { return r->size - r->pos; }

static int rd_bytes(rd *r, void *dst, size_t n, const char *what) {
    if (rd_left(r) < n) {
        D2_ERROR("%s: truncated GGUF while reading %s at offset %zu", r->name, what, r->pos);
        return D2_EFORMAT;
    }
    memcpy(dst, r->p + r->pos, n);
    r->pos += n;
    return D2_OK;
}

static int rd_u32(rd *r, uint32_t *v, const char *what) { return rd_bytes(r, v, 4, what); }
static int rd_u64(rd *r, uint64_t *v, const char *what) { return rd_bytes(r, v, 8, what); }

static int rd_skip(rd *r, uint64_t n, const char *what) {
    if ((uint64_t)rd_left(r) < n) {
        D2_ERROR("%s: truncated GGUF: %s of %" PRIu64 " bytes at offset %zu runs past the end (%zu)",
                 r->name, what, n, r->pos, r->size);
        return D2_EFORMAT;
    }
    r->pos += (size_t)n;
    return D2_OK;
}

static int rd_str(rd *r, gguf_str *s, uint64_t max_len, const char *what) {
    uint64_t len;
    int rc = rd_u64(r, &len, what);
    if (rc) return rc;
    if (len > max_len) {
        D2_ERROR("%s: GGUF %s length %" PRIu64 " at offset %zu exceeds the limit %" PRIu64,
                 r->name, what, len, r->pos - 8, max_len);
        return D2_EFORMAT;
    }
    s->p = (const char *)r->p + r->pos;
    s->len = (size_t)len;
    return rd_skip(r, len, what);
}

size_t gguf_type_size(uint32_t type) {
    switch (type) {
    case GGUF_T_UINT8: case GGUF_T_INT8: case GGUF_T_BOOL: return 1;
    case GGUF_T_UINT16: case GGUF_T_INT16: return 2;
    case GGUF_T_UINT32: case GGUF_T_INT32: case GGUF_T_FLOAT32: return 4;
    case GGUF_T_UINT64: case GGUF_T_INT64: case GGUF_T_FLOAT64: return 8;
    default: return 0;
    }
}

bool gguf_str_eq(gguf_str s, const char *c) {
    size_t n = strlen(c);
    return s.len == n && memcmp(s.p, c, n) == 0;
}

/* Skips one metadata value of the given type (arrays walk their elements). */
static int skip_value(rd *r, gguf_kv *kv, gguf_str key) {
    uint32_t type = kv->type;
    if (type == GGUF_T_STRING) {
        gguf_str s;
        return rd_str(r, &s, UINT64_MAX, "string value");
    }
    if (type == GGUF_T_ARRAY) {
        uint32_t et;
        uint64_t n;
        int rc = rd_u32(r, &et, "array type");
        if (!rc) rc = rd_u64(r, &n, "array length");
        if (rc) return rc;
        kv->arr_type = et;
        kv->arr_n = n;
        kv->val = r->p + r->pos;
        if (et == GGUF_T_ARRAY) {
            D2_ERROR("%s: GGUF key '%.*s' holds a nested array (unsupported)", r->name,
                     (int)key.len, key.p);
            return D2_EUNSUPPORTED;
        }
        if (et == GGUF_T_STRING) {
            /* Each string takes at least its 8-byte length: bound the count
             * before walking so an absurd count fails fast. */
            if (n > rd_left(r) / 8) {
                D2_ERROR("%s: GGUF key '%.*s': string array of %" PRIu64
                         " elements cannot fit in the %zu bytes left", r->name, (int)key.len,
                         key.p, n, rd_left(r));
                return D2_EFORMAT;
            }
            for (uint64_t i = 0; i < n; i++) {
                gguf_str s;
                rc = rd_str(r, &s, UINT64_MAX, "array string");
                if (rc) return rc;
            }
            return D2_OK;
        }
        size_t es = gguf_type_size(et);
        if (es == 0) {
            D2_ERROR("%s: GGUF key '%.*s': unknown array element type %u", r->name,
                     (int)key.len, key.p, et);
            return D2_EFORMAT;
        }
        if (n > rd_left(r) / es) {
            D2_ERROR("%s: GGUF key '%.*s': array of %" PRIu64 " elements runs past the end",
                     r->name, (int)key.len, key.p, n);
            return D2_EFORMAT;
        }
        return rd_skip(r, n * es, "array data");
    }
    size_t es = gguf_type_size(type);
    if (es == 0) {
        D2_ERROR("%s: GGUF key '%.*s': unknown value type %u", r->name, (int)key.len, key.p,
                 type);
        return D2_EFORMAT;
    }
    return rd_skip(r, es, "scalar value");
}

static int tensor_nbytes(const rd *r, gguf_tensor *t) {
    uint64_t nel = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        uint64_t ne = t->ne[d];
        if (ne == 0 || ne > (UINT64_C(1) << 60) / nel) {
            D2_ERROR("%s: tensor '%.*s': dimension %u = %" PRIu64 " is zero or overflows",
                     r->name, (int)t->name.len, t->name.p, d, ne);
            return D2_EFORMAT;
        }
        nel *= ne;
    }
    switch (t->type) {
    case GGML_T_F32: t->nbytes = nel * 4; break;
    case GGML_T_F16: case GGML_T_BF16: t->nbytes = nel * 2; break;
    case GGML_T_Q8_0:
        if (t->ne[0] % 32 != 0) {
            D2_ERROR("%s: tensor '%.*s': Q8_0 row length %" PRIu64 " is not a multiple of 32",
                     r->name, (int)t->name.len, t->name.p, t->ne[0]);
            return D2_EFORMAT;
        }
        t->nbytes = nel / 32 * 34;
        break;
    default:
        D2_ERROR("%s: tensor '%.*s': ggml type %u (%s) is not supported (F32, F16, BF16, Q8_0 are)",
                 r->name, (int)t->name.len, t->name.p, t->type, gguf_type_name(t->type));
        return D2_EUNSUPPORTED;
    }
    return D2_OK;
}

static int cmp_tensor_off(const void *a, const void *b) {
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

static int cmp_tensor_name(const void *a, const void *b) {
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    size_t n = x->name.len < y->name.len ? x->name.len : y->name.len;
    int c = memcmp(x->name.p, y->name.p, n);
    if (c) return c;
    return x->name.len < y->name.len ? -1 : x->name.len > y->name.len;
}

/* Checks data placement: alignment, bounds, no overlap, unique names. */
static int check_layout(const rd *r, gguf_file *f) {
    uint64_t n = f->n_tensors;
    if (n == 0) return D2_OK;
    if (f->data_offset > f->size) {
        D2_ERROR("%s: GGUF data section starts at %" PRIu64 ", past the end of the file (%zu)",
                 r->name, f->data_offset, f->size);
        return D2_EFORMAT;
    }
    uint64_t avail = f->size - f->data_offset;
    for (uint64_t i = 0; i < n; i++) {
        gguf_tensor *t = &f->tensors[i];
        if (t->offset % f->alignment != 0) {
            D2_ERROR("%s: tensor '%.*s': data offset %" PRIu64 " is not aligned to %" PRIu64,
                     r->name, (int)t->name.len, t->name.p, t->offset, f->alignment);
            return D2_EFORMAT;
        }
        if (t->offset > avail || t->nbytes > avail - t->offset) {
            D2_ERROR("%s: tensor '%.*s': data [%" PRIu64 ", +%" PRIu64
                     ") lies beyond the end of the file (data section holds %" PRIu64 " bytes)",
                     r->name, (int)t->name.len, t->name.p, t->offset, t->nbytes, avail);
            return D2_EFORMAT;
        }
        t->data = f->base + f->data_offset + t->offset;
    }
    const gguf_tensor **order = malloc((size_t)n * sizeof *order);
    if (!order) return D2_ENOMEM;
    for (uint64_t i = 0; i < n; i++) order[i] = &f->tensors[i];
    int rc = D2_OK;
    qsort(order, (size_t)n, sizeof *order, cmp_tensor_off);
    for (uint64_t i = 1; i < n && !rc; i++) {
        const gguf_tensor *a = order[i - 1], *b = order[i];
        if (a->offset + a->nbytes > b->offset) {
            D2_ERROR("%s: tensors '%.*s' and '%.*s' overlap in the data section", r->name,
                     (int)a->name.len, a->name.p, (int)b->name.len, b->name.p);
            rc = D2_EFORMAT;
        }
    }
    if (!rc) {
        qsort(order, (size_t)n, sizeof *order, cmp_tensor_name);
        for (uint64_t i = 1; i < n && !rc; i++) {
            if (cmp_tensor_name(&order[i - 1], &order[i]) == 0) {
                D2_ERROR("%s: tensor name '%.*s' appears twice", r->name,
                         (int)order[i]->name.len, order[i]->name.p);
                rc = D2_EFORMAT;
            }
        }
    }
    free(order);
    return rc;
}

int gguf_parse(const uint8_t *data, size_t size, const char *name, gguf_file *f) {
    memset(f, 0, sizeof *f);
    if (!name) name = "(buffer)";
    rd r = {data, data ? size : 0, 0, name};
    uint32_t magic, version;
    uint64_t n_tensors, n_kv;
    int rc = rd_u32(&r, &magic, "magic");
    if (rc) return rc;
    if (magic != GGUF_MAGIC) {
        D2_ERROR("%s: not a GGUF file (bad magic 0x%08x)", name, magic);
        return D2_EFORMAT;
    }
    if ((rc = rd_u32(&r, &version, "version"))) return rc;
    if (version != 2 && version != 3) {
        D2_ERROR("%s: GGUF version %u is not supported (2 and 3 are)", name, version);
        return D2_EUNSUPPORTED;
    }
    if ((rc = rd_u64(&r, &n_tensors, "tensor count")) || (rc = rd_u64(&r, &n_kv, "kv count")))
        return rc;
    /* Smallest encodings: a kv is key(8+1) + type(4) + 1 byte value; a tensor
     * info is name(8) + n_dims(4) + ne(8) + type(4) + offset(8). */
    if (n_kv > rd_left(&r) / 14 || n_tensors > rd_left(&r) / 32) {
        D2_ERROR("%s: GGUF header claims %" PRIu64 " metadata entries and %" PRIu64
                 " tensors, more than the file can hold", name, n_kv, n_tensors);
        return D2_EFORMAT;
    }
    gguf_file g = {.base = data, .size = size, .version = version, .n_kv = n_kv,
                   .n_tensors = n_tensors, .alignment = 32};
    g.kvs = calloc(n_kv ? (size_t)n_kv : 1, sizeof *g.kvs);
    g.tensors = calloc(n_tensors ? (size_t)n_tensors : 1, sizeof *g.tensors);
    if (!g.kvs || !g.tensors) { rc = D2_ENOMEM; goto fail; }

    for (uint64_t i = 0; i < n_kv; i++) {
        gguf_kv *kv = &g.kvs[i];
        if ((rc = rd_str(&r, &kv->key, GGUF_MAX_KEY, "metadata key"))) goto fail;
        if ((rc = rd_u32(&r, &kv->type, "metadata type"))) goto fail;
        kv->val = r.p + r.pos;
        if ((rc = skip_value(&r, kv, kv->key))) goto fail;
    }
    const gguf_kv *al = gguf_find(&g, "general.alignment");
    if (al) {
        int64_t a = 0;
        if (al->type != GGUF_T_UINT32 || gguf_kv_int(al, &a) || a <= 0 ||
            a > (int64_t)GGUF_MAX_ALIGN || (a & (a - 1)) != 0) {
            D2_ERROR("%s: general.alignment must be a u32 power of two <= %u", name,
                     GGUF_MAX_ALIGN);
            rc = D2_EFORMAT;
            goto fail;
        }
        g.alignment = (uint64_t)a;
    }
    for (uint64_t i = 0; i < n_tensors; i++) {
        gguf_tensor *t = &g.tensors[i];
        if ((rc = rd_str(&r, &t->name, GGUF_MAX_NAME, "tensor name"))) goto fail;
        if ((rc = rd_u32(&r, &t->n_dims, "tensor n_dims"))) goto fail;
        if (t->n_dims < 1 || t->n_dims > 4) {
            D2_ERROR("%s: tensor '%.*s' has %u dimensions (1..4 allowed)", name,
                     (int)t->name.len, t->name.p, t->n_dims);
            rc = D2_EFORMAT;
            goto fail;
        }
        for (uint32_t d = 0; d < 4; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++)
            if ((rc = rd_u64(&r, &t->ne[d], "tensor dim"))) goto fail;
        if ((rc = rd_u32(&r, &t->type, "tensor type"))) goto fail;
        if ((rc = rd_u64(&r, &t->offset, "tensor offset"))) goto fail;
        if ((rc = tensor_nbytes(&r, t))) goto fail;
    }
    uint64_t end = r.pos;
    g.data_offset = (end + g.alignment - 1) / g.alignment * g.alignment;
    if ((rc = check_layout(&r, &g))) goto fail;
    *f = g;
    return D2_OK;
fail:
    free(g.kvs);
    free(g.tensors);
    return rc;
}

void gguf_free(gguf_file *f) {
    if (!f) return;
    free(f->kvs);
    free(f->tensors);
    memset(f, 0, sizeof *f);
}

const gguf_kv *gguf_find(const gguf_file *f, const char *key) {
    for (uint64_t i = 0; i < f->n_kv; i++)
        if (gguf_str_eq(f->kvs[i].key, key)) return &f->kvs[i];
    return NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name) {
    for (uint64_t i = 0; i < f->n_tensors; i++)
        if (gguf_str_eq(f->tensors[i].name, name)) return &f->tensors[i];
    return NULL;
}

static int64_t load_int(uint32_t type, const uint8_t *p, bool *ok) {
    *ok = true;
    switch (type) {
    case GGUF_T_UINT8: return p[0];
    case GGUF_T_INT8: return (int8_t)p[0];
    case GGUF_T_BOOL: return p[0] != 0;
    case GGUF_T_UINT16: { uint16_t v; memcpy(&v, p, 2); return v; }
    case GGUF_T_INT16: { int16_t v; memcpy(&v, p, 2); return v; }
    case GGUF_T_UINT32: { uint32_t v; memcpy(&v, p, 4); return v; }
    case GGUF_T_INT32: { int32_t v; memcpy(&v, p, 4); return v; }
    case GGUF_T_INT64: { int64_t v; memcpy(&v, p, 8); return v; }
    case GGUF_T_UINT64: {
        uint64_t v;
        memcpy(&v, p, 8);
        if (v > (uint64_t)INT64_MAX) { *ok = false; return 0; }
        return (int64_t)v;
    }
    default: *ok = false; return 0;
    }
}

int gguf_kv_int(const gguf_kv *kv, int64_t *out) {
    if (kv->type == GGUF_T_FLOAT32 || kv->type == GGUF_T_FLOAT64 || kv->type == GGUF_T_BOOL ||
        gguf_type_size(kv->type) == 0)
        return D2_EFORMAT;
    bool ok;
    int64_t v = load_int(kv->type, kv->val, &ok);
    if (!ok) return D2_ERANGE;
    *out = v;
    return D2_OK;
}

int gguf_kv_float(const gguf_kv *kv, double *out) {
    if (kv->type == GGUF_T_FLOAT32) {
        float v;
        memcpy(&v, kv->val, 4);
        *out = v;
        return D2_OK;
    }
    if (kv->type == GGUF_T_FLOAT64) {
        memcpy(out, kv->val, 8);
        return D2_OK;
    }
    int64_t i;
    int rc = gguf_kv_int(kv, &i);
    if (rc) return rc;
    *out = (double)i;
    return D2_OK;
}

int gguf_kv_bool(const gguf_kv *kv, bool *out) {
    if (kv->type != GGUF_T_BOOL) return D2_EFORMAT;
    *out = kv->val[0] != 0;
    return D2_OK;
}

int gguf_kv_str(const gguf_kv *kv, gguf_str *out) {
    if (kv->type != GGUF_T_STRING) return D2_EFORMAT;
    uint64_t len;
    memcpy(&len, kv->val, 8);
    out->p = (const char *)kv->val + 8;
    out->len = (size_t)len;
    return D2_OK;
}

double gguf_arr_float(const gguf_kv *kv, uint64_t i) {
    size_t es = gguf_type_size(kv->arr_type);
    const uint8_t *p = kv->val + i * es;
    if (kv->arr_type == GGUF_T_FLOAT32) { float v; memcpy(&v, p, 4); return v; }
    if (kv->arr_type == GGUF_T_FLOAT64) { double v; memcpy(&v, p, 8); return v; }
    bool ok;
    return (double)load_int(kv->arr_type, p, &ok);
}

int64_t gguf_arr_int(const gguf_kv *kv, uint64_t i) {
    size_t es = gguf_type_size(kv->arr_type);
    const uint8_t *p = kv->val + i * es;
    if (kv->arr_type == GGUF_T_FLOAT32) { float v; memcpy(&v, p, 4); return (int64_t)v; }
    if (kv->arr_type == GGUF_T_FLOAT64) { double v; memcpy(&v, p, 8); return (int64_t)v; }
    bool ok;
    return load_int(kv->arr_type, p, &ok);
}

int gguf_arr_strings(const gguf_kv *kv, gguf_str *out) {
    if (kv->type != GGUF_T_ARRAY || kv->arr_type != GGUF_T_STRING) return D2_EFORMAT;
    const uint8_t *p = kv->val;
    for (uint64_t i = 0; i < kv->arr_n; i++) {
        uint64_t len;
        memcpy(&len, p, 8); /* bounds proven by gguf_parse */
        out[i].p = (const char *)p + 8;
        out[i].len = (size_t)len;
        p += 8 + len;
    }
    return D2_OK;
}

const char *gguf_type_name(uint32_t t) {
    static const char *const names[] = {
        "F32", "F16", "Q4_0", "Q4_1", "?", "?", "Q5_0", "Q5_1", "Q8_0", "Q8_1",
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS",
        "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64",
        "IQ1_M", "BF16"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}
