/*
 * engine/tok/tok_bpe.c — the tokenizer's data structures and merge loop: an
 * open-addressing hash map from byte strings to ids, a (left, right) -> merge
 * table, and BPE over one word with a binary heap and a linked list of
 * symbols (O(n log n) in the word length, so one 32k-token word is fine).
 * Callers: engine/tok*.c only (see engine/tok/tok_internal.h). The tables are
 * immutable after loading, so lookups are thread-safe; eng__tok_bpe keeps its
 * scratch on the heap per call.
 */
#include <stdlib.h>
#include <string.h>

#include "common/status.h"
#include "engine/tok/tok_internal.h"

static uint32_t hash_bytes(const char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 1099511628211ull;
    }
    return (uint32_t)(h ^ (h >> 32));
}

static uint32_t pow2_at_least(uint32_t x) {
    uint32_t c = 16;
    while (c < x) c <<= 1;
    return c;
}

int eng__tok_map_init(eng__tok_map *m, uint32_t expect) {
    memset(m, 0, sizeof(*m));
    m->cap = pow2_at_least(expect * 2 + 1);
    m->slot = malloc(m->cap * sizeof(int32_t));
    uint32_t ecap = m->cap / 2 + 1; /* map_put grows before count exceeds cap/2 */
    m->key = malloc(ecap * sizeof(char *));
    m->klen = malloc(ecap * sizeof(uint32_t));
    m->val = malloc(ecap * sizeof(int32_t));
    if (!m->slot || !m->key || !m->klen || !m->val) {
        eng__tok_map_free(m);
        return D2_ENOMEM;
    }
    memset(m->slot, 0xFF, m->cap * sizeof(int32_t));
    return D2_OK;
}

void eng__tok_map_free(eng__tok_map *m) {
    free(m->slot);
    free(m->key);
    free(m->klen);
    free(m->val);
    memset(m, 0, sizeof(*m));
}

static int map_grow(eng__tok_map *m) {
    uint32_t ncap = m->cap * 2;
    int32_t *ns = malloc(ncap * sizeof(int32_t));
    const char **nk = realloc(m->key, ((size_t)ncap / 2 + 1) * sizeof(char *));
    if (nk) m->key = nk;
    uint32_t *nl = realloc(m->klen, ((size_t)ncap / 2 + 1) * sizeof(uint32_t));
    if (nl) m->klen = nl;
    int32_t *nv = realloc(m->val, ((size_t)ncap / 2 + 1) * sizeof(int32_t));
    if (nv) m->val = nv;
    if (!ns || !nk || !nl || !nv) {
        free(ns);
        return D2_ENOMEM;
    }
    memset(ns, 0xFF, ncap * sizeof(int32_t));
    for (uint32_t e = 0; e < m->count; e++) {
        uint32_t h = hash_bytes(m->key[e], m->klen[e]) & (ncap - 1);
        while (ns[h] >= 0) h = (h + 1) & (ncap - 1);
        ns[h] = (int32_t)e;
    }
    free(m->slot);
    m->slot = ns;
    m->cap = ncap;
    return D2_OK;
}

int eng__tok_map_put(eng__tok_map *m, const char *key, size_t klen, int32_t val, bool overwrite) {
    /* Entries arrays hold cap/2 entries at most: grow them with the slots. */
    if ((m->count + 1) * 2 > m->cap) {
        int rc = map_grow(m);
        if (rc) return rc;
    }
    uint32_t h = hash_bytes(key, klen) & (m->cap - 1);
    while (m->slot[h] >= 0) {
        int32_t e = m->slot[h];
        if (m->klen[e] == klen && memcmp(m->key[e], key, klen) == 0) {
            if (overwrite) m->val[e] = val;
            return D2_OK;
        }
        h = (h + 1) & (m->cap - 1);
    }
    m->slot[h] = (int32_t)m->count;
    m->key[m->count] = key;
    m->klen[m->count] = (uint32_t)klen;
    m->val[m->count] = val;
    m->count++;
    return D2_OK;
}

int32_t eng__tok_map_get(const eng__tok_map *m, const char *key, size_t klen) {
    if (!m->cap) return -1;
    uint32_t h = hash_bytes(key, klen) & (m->cap - 1);
    while (m->slot[h] >= 0) {
        int32_t e = m->slot[h];
        if (m->klen[e] == klen && memcmp(m->key[e], key, klen) == 0) return m->val[e];
        h = (h + 1) & (m->cap - 1);
    }
    return -1;
}

/* ---- merges ---- */

static uint32_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return (uint32_t)x;
}

int eng__tok_merges_init(eng__tok_merges *mm, uint32_t expect) {
    memset(mm, 0, sizeof(*mm));
    mm->cap = pow2_at_least(expect * 2 + 1);
    mm->keys = calloc(mm->cap, sizeof(uint64_t));
    mm->rank = malloc(mm->cap * sizeof(int32_t));
    mm->merged = malloc(mm->cap * sizeof(int32_t));
    if (!mm->keys || !mm->rank || !mm->merged) {
        eng__tok_merges_free(mm);
        return D2_ENOMEM;
    }
    return D2_OK;
}

void eng__tok_merges_free(eng__tok_merges *mm) {
    free(mm->keys);
    free(mm->rank);
    free(mm->merged);
    memset(mm, 0, sizeof(*mm));
}

/* The first rank given for a pair wins (HF keeps the first occurrence too). */
int eng__tok_merges_put(eng__tok_merges *mm, int32_t left, int32_t right, int32_t rank, int32_t merged) {
    uint64_t k = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    uint32_t h = hash_u64(k) & (mm->cap - 1);
    for (uint32_t probes = 0; probes < mm->cap; probes++) {
        if (mm->keys[h] == k) return D2_OK;
        if (mm->keys[h] == 0) {
            mm->keys[h] = k;
            mm->rank[h] = rank;
            mm->merged[h] = merged;
            return D2_OK;
        }
        h = (h + 1) & (mm->cap - 1);
    }
    return D2_ERANGE;
}

bool eng__tok_merges_get(const eng__tok_merges *mm, int32_t left, int32_t right, int32_t *rank,
                         int32_t *merged) {
    uint64_t k = (((uint64_t)(uint32_t)left << 32) | (uint32_t)right) + 1;
    uint32_t h = hash_u64(k) & (mm->cap - 1);
    while (mm->keys[h]) {
        if (mm->keys[h] == k) {
            *rank = mm->rank[h];
            *merged = mm->merged[h];
            return true;
        }
        h = (h + 1) & (mm->cap - 1);
    }
    return false;
}

/* ---- the merge loop ---- */

typedef struct cand {
    double key;      /* lower merges first: rank, or -score */
    uint32_t pos;    /* byte start of the left symbol: ties go leftmost */
    int32_t left, right;
    uint32_t lsz, rsz;
    int32_t merged;
} cand;

typedef struct heap {
    cand *a;
    size_t n, cap;
} heap;

static inline bool cand_less(const cand *x, const cand *y) {
    return x->key < y->key || (x->key == y->key && x->pos < y->pos);
}

static int heap_push(heap *h, cand c) {
    if (h->n == h->cap) {
        size_t nc = h->cap ? h->cap * 2 : 64;
        cand *na = realloc(h->a, nc * sizeof(cand));
        if (!na) return D2_ENOMEM;
        h->a = na;
        h->cap = nc;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_less(&c, &h->a[p])) break;
        h->a[i] = h->a[p];
        i = p;
    }
    h->a[i] = c;
    return D2_OK;
}

static cand heap_pop(heap *h) {
    cand top = h->a[0];
    cand last = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const cand *best = &last;
        if (l < h->n && cand_less(&h->a[l], best)) { m = l; best = &h->a[l]; }
        if (r < h->n && cand_less(&h->a[r], best)) { m = r; }
        if (m == i) break;
        h->a[i] = h->a[m];
        i = m;
    }
    if (h->n) h->a[i] = last;
    return top;
}

typedef struct syms {
    uint32_t *start, *end;
    int32_t *id, *prev, *next;
    uint8_t *alive;
} syms;

static int try_pair(heap *h, const syms *s, int32_t l, int32_t r, const char *word,
                    const eng__tok_merges *mm, const eng__tok_map *vocab, const float *scores) {
    if (l < 0 || r < 0) return D2_OK;
    cand c;
    if (mm) {
        int32_t rank, merged;
        if (s->id[l] < 0 || s->id[r] < 0) return D2_OK;
        if (!eng__tok_merges_get(mm, s->id[l], s->id[r], &rank, &merged)) return D2_OK;
        c.key = rank;
        c.merged = merged;
    } else {
        int32_t id = eng__tok_map_get(vocab, word + s->start[l], s->end[r] - s->start[l]);
        if (id < 0) return D2_OK;
        c.key = -(double)scores[id];
        c.merged = id;
    }
    c.pos = s->start[l];
    c.left = l;
    c.right = r;
    c.lsz = s->end[l] - s->start[l];
    c.rsz = s->end[r] - s->start[r];
    return heap_push(h, c);
}

static int out_push(eng__tok_bpe_out *out, int32_t id, uint32_t a, uint32_t b) {
    if (out->n == out->cap) {
        size_t nc = out->cap ? out->cap * 2 : 256;
        int32_t *ni = realloc(out->ids, nc * sizeof(int32_t));
        if (!ni) return D2_ENOMEM;
        out->ids = ni;
        uint32_t *ns = realloc(out->span, nc * 2 * sizeof(uint32_t));
        if (!ns) return D2_ENOMEM;
        out->span = ns;
        out->cap = nc;
    }
    out->ids[out->n] = id;
    out->span[2 * out->n] = a;
    out->span[2 * out->n + 1] = b;
    out->n++;
    return D2_OK;
}

int eng__tok_bpe(const eng__tok_bpe_in *in, const eng__tok_merges *mm, const eng__tok_map *vocab,
                 const float *scores, eng__tok_bpe_out *out) {
    size_t n = in->n_units;
    if (n == 0) return D2_OK;
    if (n == 1) return out_push(out, in->uid[0], in->ustart[0], in->ustart[1]);
    int rc = D2_ENOMEM;
    syms s = {0};
    heap h = {0};
    s.start = malloc(n * sizeof(uint32_t));
    s.end = malloc(n * sizeof(uint32_t));
    s.id = malloc(n * sizeof(int32_t));
    s.prev = malloc(n * sizeof(int32_t));
    s.next = malloc(n * sizeof(int32_t));
    s.alive = malloc(n);
    if (!s.start || !s.end || !s.id || !s.prev || !s.next || !s.alive) goto done;
    for (size_t k = 0; k < n; k++) {
        s.start[k] = in->ustart[k];
        s.end[k] = in->ustart[k + 1];
        s.id[k] = in->uid[k];
        s.prev[k] = (int32_t)k - 1;
        s.next[k] = k + 1 < n ? (int32_t)k + 1 : -1;
        s.alive[k] = 1;
    }
    for (size_t k = 0; k + 1 < n; k++)
        if ((rc = try_pair(&h, &s, (int32_t)k, (int32_t)k + 1, in->word, mm, vocab, scores))) goto done;
    while (h.n) {
        cand c = heap_pop(&h);
        int32_t l = c.left, r = c.right;
        if (!s.alive[l] || !s.alive[r] || s.next[l] != r) continue;
        if (s.end[l] - s.start[l] != c.lsz || s.end[r] - s.start[r] != c.rsz) continue;
        s.end[l] = s.end[r];
        s.id[l] = c.merged;
        s.alive[r] = 0;
        s.next[l] = s.next[r];
        if (s.next[r] >= 0) s.prev[s.next[r]] = l;
        if ((rc = try_pair(&h, &s, s.prev[l], l, in->word, mm, vocab, scores))) goto done;
        if ((rc = try_pair(&h, &s, l, s.next[l], in->word, mm, vocab, scores))) goto done;
    }
    rc = D2_OK;
    for (int32_t k = 0; k >= 0 && rc == D2_OK; k = s.next[k]) rc = out_push(out, s.id[k], s.start[k], s.end[k]);
done:
    free(s.start);
    free(s.end);
    free(s.id);
    free(s.prev);
    free(s.next);
    free(s.alive);
    free(h.a);
    return rc;
}
