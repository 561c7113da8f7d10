/*
 * kvpool/kvpool.c — the paged KV block pool (implements kvpool/kvpool.h).
 *
 * Callers: the engine thread only (every mutating function); kvp_get_stats
 * may be called from any thread. Includes only common/.
 *
 * Memory: kvp_create reserves everything — pos per slot, a refcount per page, the free
 * list (a stack of page ids), one block table per (sequence, layer) sized for
 * ceil(max_seq_tokens / page_tokens) pages, the in-use flag per sequence,
 * a scratch array for kvp_check and the run list handed to the payload hook.
 * Nothing allocates after that. The K/V payload is the backend's (kvpool.h).
 *
 * Tables: a table holds n_alloc pages: the first ceil(n_tokens/page_tokens)
 * are live, the rest are pages kvp_reserve took ahead of kvp_append. Reserved
 * pages are never shared (fork shares live pages only), so an append into
 * them never needs a copy. Truncate, compact and free give reserved pages back.
 *
 * Sharing: a page's refcount is the number of tables holding it. A page with
 * refcount > 1 is never written: kvp_reserve and kvp_compact copy it first
 * (copy on write) and kvp_append refuses to write into one.
 */

#include "kvpool/kvpool.h"

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"

#define KVP_DEFAULT_PAGE_TOKENS 16

typedef struct kvp_tab {
    int32_t *pages; /* [max_table_pages], into kvp_pool.table_store */
    int n_tokens;   /* live slots */
    int n_alloc;    /* pages held: live + reserved */
} kvp_tab;

struct kvp_pool {
    kvp_config cfg;          /* copy of the caller's config, page_tokens defaulted */
    int pt;                  /* page_tokens */
    int32_t *pos;            /* [n_pages][pt] */
    int32_t *refcount;       /* [n_pages] */
    int32_t *free_stack;     /* [n_pages]; entries [0, n_free) are free pages */
    int64_t n_free;
    _Atomic int64_t pages_free;  /* mirror of n_free for other threads */
    _Atomic int seqs_active;
    int n_seqs_used;         /* engine-thread copy of seqs_active */
    int max_table_pages;     /* ceil(max_seq_tokens / pt) */
    kvp_tab *tabs;           /* [max_seqs][n_layers] */
    int32_t *table_store;    /* [max_seqs][n_layers][max_table_pages] */
    uint8_t *seq_used;       /* [max_seqs] */
    int32_t *scratch;        /* [n_pages], kvp_check's work array */
    kvp_payload payload;     /* the backend's hook; zeroed = no payload */
    kvp_slot_run *runs;      /* [max_table_pages * pt] runs of the operation in progress */
    int n_runs;
};

/* ---- configuration ------------------------------------------------------- */

/* Validates cfg; *pt_out gets page_tokens with its default applied. */
static int cfg_check(const kvp_config *cfg, int *pt_out) {
    if (!cfg) return D2_EINVAL;
    int pt = cfg->page_tokens == 0 ? KVP_DEFAULT_PAGE_TOKENS : cfg->page_tokens;
    if (cfg->n_layers <= 0 || cfg->n_kv_heads <= 0 || cfg->head_dim <= 0 || pt <= 0 ||
        cfg->n_pages <= 0 || cfg->n_pages > INT32_MAX || cfg->max_seqs <= 0 ||
        cfg->max_seq_tokens <= 0)
        return D2_EINVAL;
    /* pos is indexed with int arithmetic on slot counts */
    if ((int64_t)pt * cfg->n_pages > INT32_MAX) return D2_EINVAL;
    *pt_out = pt;
    return D2_OK;
}

int kvp_create(const kvp_config *cfg, kvp_pool **out) {
    if (!out) return D2_EINVAL;
    *out = NULL;
    int pt;
    if (cfg_check(cfg, &pt) != D2_OK) {
        D2_ERROR("kvpool: kvp_create: invalid configuration");
        return D2_EINVAL;
    }
    int64_t max_table_pages = ((int64_t)cfg->max_seq_tokens + pt - 1) / pt;
    int64_t n_tables = (int64_t)cfg->max_seqs * cfg->n_layers;
    /* table sizes and slot counts of one table (pages * page_tokens) stay in int */
    if (n_tables > INT32_MAX || n_tables * max_table_pages > INT32_MAX ||
        max_table_pages * pt > INT32_MAX) {
        D2_ERROR("kvpool: kvp_create: block tables too large (%lld tables of %lld pages)",
                 (long long)n_tables, (long long)max_table_pages);
        return D2_EINVAL;
    }
    size_t n_pages = (size_t)cfg->n_pages;
    size_t n_slots = n_pages * (size_t)pt;

    kvp_pool *p = calloc(1, sizeof *p);
    if (!p) return D2_ENOMEM;
    p->cfg = *cfg;
    p->cfg.page_tokens = pt;
    p->pt = pt;
    p->max_table_pages = (int)max_table_pages;

    p->pos = malloc(n_slots * sizeof *p->pos);
    p->runs = malloc((size_t)(max_table_pages * pt) * sizeof *p->runs);
    p->refcount = calloc(n_pages, sizeof *p->refcount);
    p->free_stack = malloc(n_pages * sizeof *p->free_stack);
    p->scratch = malloc(n_pages * sizeof *p->scratch);
    p->tabs = calloc((size_t)n_tables, sizeof *p->tabs);
    p->table_store = malloc((size_t)(n_tables * max_table_pages) * sizeof *p->table_store);
    p->seq_used = calloc((size_t)cfg->max_seqs, 1);
    if (!p->pos || !p->runs || !p->refcount || !p->free_stack || !p->scratch || !p->tabs ||
        !p->table_store || !p->seq_used) {
        D2_ERROR("kvpool: kvp_create: out of memory (%lld pages)", (long long)cfg->n_pages);
        kvp_destroy(p);
        return D2_ENOMEM;
    }

    for (size_t i = 0; i < n_slots; i++) p->pos[i] = -1;
    /* Page 0 is taken first: the stack's top holds the lowest id. */
    for (size_t i = 0; i < n_pages; i++) p->free_stack[i] = (int32_t)(n_pages - 1 - i);
    p->n_free = (int64_t)n_pages;
    atomic_store(&p->pages_free, p->n_free);
    atomic_store(&p->seqs_active, 0);
    for (int64_t t = 0; t < n_tables; t++) {
        p->tabs[t].pages = p->table_store + t * max_table_pages;
        for (int64_t j = 0; j < max_table_pages; j++) p->tabs[t].pages[j] = -1;
    }
    *out = p;
    return D2_OK;
}

void kvp_destroy(kvp_pool *p) {
    if (!p) return;
    free(p->pos);
    free(p->runs);
    free(p->refcount);
    free(p->free_stack);
    free(p->scratch);
    free(p->tabs);
    free(p->table_store);
    free(p->seq_used);
    free(p);
}

const kvp_config *kvp_get_config(const kvp_pool *p) { return p ? &p->cfg : NULL; }

kvp_stats kvp_get_stats(const kvp_pool *p) {
    kvp_stats s = {0, 0, 0};
    if (!p) return s;
    s.pages_total = p->cfg.n_pages;
    s.pages_free = atomic_load_explicit(&p->pages_free, memory_order_relaxed);
    s.seqs_active = atomic_load_explicit(&p->seqs_active, memory_order_relaxed);
    return s;
}

void kvp_set_payload(kvp_pool *p, const kvp_payload *pl) {
    if (!p) return;
    if (pl) p->payload = *pl;
    else memset(&p->payload, 0, sizeof p->payload);
}

int kvp_pages_for_tokens(const kvp_pool *p, int n_tokens) {
    if (!p || n_tokens < 0) return D2_EINVAL;
    return (int)(((int64_t)n_tokens + p->pt - 1) / p->pt);
}

/* ---- pages ---------------------------------------------------------------- */

static int pages_for(const kvp_pool *p, int n_tokens) { return (n_tokens + p->pt - 1) / p->pt; }

static void publish_free(kvp_pool *p) {
    atomic_store_explicit(&p->pages_free, p->n_free, memory_order_relaxed);
}

/* Pops a free page (the caller checked n_free > 0); refcount 1, empty slots. */
static int32_t page_take(kvp_pool *p) {
    D2_ASSERT(p->n_free > 0);
    int32_t pg = p->free_stack[--p->n_free];
    publish_free(p);
    D2_ASSERT(p->refcount[pg] == 0);
    p->refcount[pg] = 1;
    size_t s0 = (size_t)pg * (size_t)p->pt;
    for (int i = 0; i < p->pt; i++) p->pos[s0 + (size_t)i] = -1;
    return pg;
}

/* Drops one reference; a page reaching zero goes back to the free list now. */
static void page_unref(kvp_pool *p, int32_t pg) {
    D2_ASSERT(pg >= 0 && pg < p->cfg.n_pages && p->refcount[pg] > 0);
    if (--p->refcount[pg] > 0) return;
    if (p->payload.freed) p->payload.freed(p->payload.ctx, pg);
    size_t s0 = (size_t)pg * (size_t)p->pt;
    for (int i = 0; i < p->pt; i++) p->pos[s0 + (size_t)i] = -1;
    p->free_stack[p->n_free++] = pg;
    publish_free(p);
}

/* Copies n consecutive slots between two distinct pages, or between
 * non-overlapping slot ranges of one page: pos now, the payload as one run of
 * the operation's list (flush_runs hands the list to the backend). */
static void copy_slots(kvp_pool *p, int32_t dpg, int dslot, int32_t spg, int sslot, int n) {
    if (n <= 0) return;
    size_t d = (size_t)dpg * (size_t)p->pt + (size_t)dslot;
    size_t s = (size_t)spg * (size_t)p->pt + (size_t)sslot;
    memcpy(p->pos + d, p->pos + s, (size_t)n * sizeof(int32_t));
    if (!p->payload.copy) return;
    D2_ASSERT(p->n_runs < p->max_table_pages * p->pt);
    p->runs[p->n_runs++] = (kvp_slot_run){.dst_page = dpg, .src_page = spg, .dst_slot = dslot,
                                          .src_slot = sslot, .n = n};
}

/* Hands the runs collected by one operation to the payload hook, in order. */
static void flush_runs(kvp_pool *p) {
    if (p->n_runs > 0 && p->payload.copy) p->payload.copy(p->payload.ctx, p->runs, p->n_runs);
    p->n_runs = 0;
}

/* Replaces page idx of t by a private copy holding its first n_live slots
 * (copy on write). The caller checked that a free page exists. */
static void page_cow(kvp_pool *p, kvp_tab *t, int idx, int n_live) {
    int32_t old = t->pages[idx];
    int32_t fresh = page_take(p);
    copy_slots(p, fresh, 0, old, 0, n_live);
    t->pages[idx] = fresh;
    page_unref(p, old);
}

/* Gives back pages [keep, n_alloc) of t. */
static void tab_release_from(kvp_pool *p, kvp_tab *t, int keep) {
    for (int j = t->n_alloc - 1; j >= keep; j--) {
        page_unref(p, t->pages[j]);
        t->pages[j] = -1;
    }
    if (t->n_alloc > keep) t->n_alloc = keep;
}

/* Marks the slots past n_tokens in an unshared last page as empty (pos -1),
 * so a reader that ignores n_tokens still sees no stale position. */
static void tab_clear_tail(kvp_pool *p, kvp_tab *t) {
    int r = t->n_tokens % p->pt;
    if (r == 0) return;
    int32_t pg = t->pages[t->n_tokens / p->pt];
    if (p->refcount[pg] != 1) return;
    size_t s0 = (size_t)pg * (size_t)p->pt;
    for (int i = r; i < p->pt; i++) p->pos[s0 + (size_t)i] = -1;
}

/* ---- argument checks -------------------------------------------------------- */

static int check_seq(const kvp_pool *p, int seq, const char *fn) {
    if (!p) return D2_EINVAL;
    if (seq < 0 || seq >= p->cfg.max_seqs || !p->seq_used[seq]) {
        D2_ERROR("kvpool: %s: sequence %d is not in use", fn, seq);
        return D2_EINVAL;
    }
    return D2_OK;
}

static int check_ids(const kvp_pool *p, int seq, int layer, const char *fn) {
    int rc = check_seq(p, seq, fn);
    if (rc) return rc;
    if (layer < 0 || layer >= p->cfg.n_layers) {
        D2_ERROR("kvpool: %s: layer %d out of range [0, %d)", fn, layer, p->cfg.n_layers);
        return D2_EINVAL;
    }
    return D2_OK;
}

static kvp_tab *tab_at(const kvp_pool *p, int seq, int layer) {
    return &p->tabs[(size_t)seq * (size_t)p->cfg.n_layers + (size_t)layer];
}

/* ---- sequences ------------------------------------------------------------- */

static void seqs_changed(kvp_pool *p, int delta) {
    p->n_seqs_used += delta;
    atomic_store_explicit(&p->seqs_active, p->n_seqs_used, memory_order_relaxed);
}

static int seq_take(kvp_pool *p) {
    for (int s = 0; s < p->cfg.max_seqs; s++) {
        if (!p->seq_used[s]) {
            p->seq_used[s] = 1;
            seqs_changed(p, +1);
            return s;
        }
    }
    return D2_EKVFULL;
}

int kvp_seq_new(kvp_pool *p, int *seq_out) {
    if (!p || !seq_out) return D2_EINVAL;
    int s = seq_take(p);
    if (s < 0) return s;
    *seq_out = s;
    return D2_OK;
}

int kvp_seq_free(kvp_pool *p, int seq) {
    int rc = check_seq(p, seq, "kvp_seq_free");
    if (rc) return rc;
    for (int l = 0; l < p->cfg.n_layers; l++) {
        kvp_tab *t = tab_at(p, seq, l);
        tab_release_from(p, t, 0);
        t->n_tokens = 0;
    }
    p->seq_used[seq] = 0;
    seqs_changed(p, -1);
    return D2_OK;
}

int kvp_seq_fork(kvp_pool *p, int src, int *dst_out) {
    int rc = check_seq(p, src, "kvp_seq_fork");
    if (rc) return rc;
    if (!dst_out) return D2_EINVAL;
    int dst = seq_take(p);
    if (dst < 0) return dst;
    for (int l = 0; l < p->cfg.n_layers; l++) {
        const kvp_tab *s = tab_at(p, src, l);
        kvp_tab *d = tab_at(p, dst, l);
        int live = pages_for(p, s->n_tokens);
        for (int j = 0; j < live; j++) {
            d->pages[j] = s->pages[j];
            p->refcount[s->pages[j]]++;
        }
        d->n_alloc = live;
        d->n_tokens = s->n_tokens;
    }
    *dst_out = dst;
    return D2_OK;
}

int kvp_truncate(kvp_pool *p, int seq, int layer, int n) {
    int rc = check_ids(p, seq, layer, "kvp_truncate");
    if (rc) return rc;
    kvp_tab *t = tab_at(p, seq, layer);
    if (n < 0 || n > t->n_tokens) {
        D2_ERROR("kvpool: kvp_truncate: length %d outside [0, %d] (seq %d layer %d)", n,
                 t->n_tokens, seq, layer);
        return D2_EINVAL;
    }
    tab_release_from(p, t, pages_for(p, n));
    t->n_tokens = n;
    tab_clear_tail(p, t);
    return D2_OK;
}

/* ---- block tables ------------------------------------------------------------- */

kvp_table kvp_get_table(const kvp_pool *p, int seq, int layer) {
    kvp_table v = {NULL, 0, 0};
    if (!p || seq < 0 || seq >= p->cfg.max_seqs || layer < 0 || layer >= p->cfg.n_layers)
        return v;
    const kvp_tab *t = tab_at(p, seq, layer);
    v.pages = t->pages;
    v.n_tokens = t->n_tokens;
    v.n_pages = pages_for(p, t->n_tokens);
    return v;
}

/* Pages reserve would take; the caller validated ids and n >= 0. */
static int reserve_need(const kvp_pool *p, const kvp_tab *t, int n) {
    if (n == 0) return 0;
    int need = pages_for(p, t->n_tokens + n) - t->n_alloc;
    if (need < 0) need = 0;
    if (t->n_tokens % p->pt != 0 && p->refcount[t->pages[t->n_tokens / p->pt]] > 1) need++;
    return need;
}

static int check_grow(const kvp_pool *p, const kvp_tab *t, int n, const char *fn, int seq,
                      int layer) {
    if (n < 0) {
        D2_ERROR("kvpool: %s: negative count %d", fn, n);
        return D2_EINVAL;
    }
    if (n > p->cfg.max_seq_tokens - t->n_tokens) {
        D2_ERROR("kvpool: %s: %d + %d tokens exceed max_seq_tokens %d (seq %d layer %d)", fn,
                 t->n_tokens, n, p->cfg.max_seq_tokens, seq, layer);
        return D2_ETOOLONG;
    }
    return D2_OK;
}

int kvp_pages_needed(const kvp_pool *p, int seq, int layer, int n) {
    int rc = check_ids(p, seq, layer, "kvp_pages_needed");
    if (rc) return rc;
    const kvp_tab *t = tab_at(p, seq, layer);
    rc = check_grow(p, t, n, "kvp_pages_needed", seq, layer);
    if (rc) return rc;
    return reserve_need(p, t, n);
}

int kvp_reserve(kvp_pool *p, int seq, int layer, int n) {
    int rc = check_ids(p, seq, layer, "kvp_reserve");
    if (rc) return rc;
    kvp_tab *t = tab_at(p, seq, layer);
    rc = check_grow(p, t, n, "kvp_reserve", seq, layer);
    if (rc) return rc;
    int need = reserve_need(p, t, n);
    if (need > p->n_free) return D2_EKVFULL; /* nothing changed */
    if (n == 0) return D2_OK;
    int r = t->n_tokens % p->pt;
    int last = t->n_tokens / p->pt;
    if (r != 0 && p->refcount[t->pages[last]] > 1) {
        page_cow(p, t, last, r);
        flush_runs(p);
    }
    int want = pages_for(p, t->n_tokens + n);
    while (t->n_alloc < want) t->pages[t->n_alloc++] = page_take(p);
    return D2_OK;
}

int kvp_append(kvp_pool *p, int seq, int layer, int n) {
    int rc = check_ids(p, seq, layer, "kvp_append");
    if (rc) return rc;
    kvp_tab *t = tab_at(p, seq, layer);
    if (n < 0 || n > t->n_alloc * p->pt - t->n_tokens) {
        D2_ERROR("kvpool: kvp_append: %d slots not reserved (seq %d layer %d: %d tokens, %d "
                 "pages held)",
                 n, seq, layer, t->n_tokens, t->n_alloc);
        return D2_EINVAL;
    }
    int first = t->n_tokens;
    if (n == 0) return first;
    if (first % p->pt != 0 && p->refcount[t->pages[first / p->pt]] > 1) {
        D2_ERROR("kvpool: kvp_append: last page of seq %d layer %d is shared; call "
                 "kvp_reserve first",
                 seq, layer);
        return D2_EINVAL;
    }
    for (int i = first; i < first + n; i++) {
        size_t s = (size_t)t->pages[i / p->pt] * (size_t)p->pt + (size_t)(i % p->pt);
        p->pos[s] = -1;
    }
    t->n_tokens = first + n;
    return first;
}

int kvp_compact(kvp_pool *p, int seq, int layer, const uint8_t *keep) {
    int rc = check_ids(p, seq, layer, "kvp_compact");
    if (rc) return rc;
    kvp_tab *t = tab_at(p, seq, layer);
    int n = t->n_tokens;
    if (n > 0 && !keep) return D2_EINVAL;
    int first_gap = n, m = 0;
    for (int i = 0; i < n; i++) {
        if (keep[i])
            m++;
        else if (first_gap == n)
            first_gap = i;
    }
    /* Slots [first_gap, m) are written; their pages must be private. */
    int pt = p->pt;
    int need = 0;
    if (m > first_gap)
        for (int q = first_gap / pt; q <= (m - 1) / pt; q++)
            if (p->refcount[t->pages[q]] > 1) need++;
    if (need > p->n_free) return D2_EKVFULL; /* nothing changed */
    if (m > first_gap)
        for (int q = first_gap / pt; q <= (m - 1) / pt; q++)
            if (p->refcount[t->pages[q]] > 1) {
                int live = n - q * pt < pt ? n - q * pt : pt;
                page_cow(p, t, q, live);
            }
    /* Move kept slots down in order, a run of consecutive kept slots at a time.
     * A run stops where either side crosses a page boundary, and is never
     * longer than the distance moved (i - j), so source and destination never
     * overlap (copies are memcpy or the installed copy function). */
    int j = first_gap, i = first_gap;
    while (i < n) {
        if (!keep[i]) {
            i++;
            continue;
        }
        int run = 1;
        while (run < i - j && i + run < n && keep[i + run] && (i + run) % pt != 0 &&
               (j + run) % pt != 0)
            run++;
        copy_slots(p, t->pages[j / pt], j % pt, t->pages[i / pt], i % pt, run);
        i += run;
        j += run;
    }
    flush_runs(p); /* one payload call for the whole compaction (copies on write first) */
    tab_release_from(p, t, pages_for(p, m));
    t->n_tokens = m;
    tab_clear_tail(p, t);
    return m;
}

int kvp_unshare(kvp_pool *p, int seq, int layer, int i) {
    int rc = check_ids(p, seq, layer, "kvp_unshare");
    if (rc) return rc;
    kvp_tab *t = tab_at(p, seq, layer);
    if (i < 0 || i >= t->n_tokens) return D2_EINVAL;
    int q = i / p->pt;
    if (p->refcount[t->pages[q]] == 1) return D2_OK;
    if (p->n_free < 1) return D2_EKVFULL;
    int live = t->n_tokens - q * p->pt < p->pt ? t->n_tokens - q * p->pt : p->pt;
    page_cow(p, t, q, live);
    flush_runs(p);
    return D2_OK;
}

int kvp_shared_pages(const kvp_pool *p, int seq, int layer) {
    int rc = check_ids(p, seq, layer, "kvp_shared_pages");
    if (rc) return rc;
    const kvp_tab *t = tab_at((kvp_pool *)p, seq, layer);
    int n = 0, live = (t->n_tokens + p->pt - 1) / p->pt;
    for (int q = 0; q < live; q++) n += p->refcount[t->pages[q]] > 1;
    return n;
}

int kvp_unshare_all(kvp_pool *p, int seq, int layer) {
    int need = kvp_shared_pages(p, seq, layer);
    if (need <= 0) return need;
    if (p->n_free < need) return D2_EKVFULL;
    kvp_tab *t = tab_at(p, seq, layer);
    int live = (t->n_tokens + p->pt - 1) / p->pt;
    for (int q = 0; q < live; q++) {
        if (p->refcount[t->pages[q]] <= 1) continue;
        int n_live = t->n_tokens - q * p->pt < p->pt ? t->n_tokens - q * p->pt : p->pt;
        page_cow(p, t, q, n_live);
    }
    flush_runs(p);
    return D2_OK;
}

/* ---- slot access ------------------------------------------------------------------ */

int32_t *kvp_pos_base(kvp_pool *p) { return p->pos; }

int64_t kvp_slot_index(const kvp_pool *p, int seq, int layer, int i) {
    if (!p || seq < 0 || seq >= p->cfg.max_seqs || layer < 0 || layer >= p->cfg.n_layers) return -1;
    const kvp_tab *t = tab_at(p, seq, layer);
    if (i < 0 || i >= t->n_tokens) return -1;
    return (int64_t)t->pages[i / p->pt] * p->pt + i % p->pt;
}

/* ---- all layers at once (the step's reservation) ------------------------------------ */

int64_t kvp_pages_needed_all_layers(const kvp_pool *p, int seq, int n) {
    int64_t need = 0;
    for (int l = 0; l < p->cfg.n_layers; l++) {
        int pn = kvp_pages_needed(p, seq, l, n);
        if (pn < 0) return pn;
        need += pn;
    }
    return need;
}

int kvp_reserve_all_layers(kvp_pool *p, int seq, int n) {
    int64_t need = kvp_pages_needed_all_layers(p, seq, n);
    if (need < 0) return (int)need;
    if (need > p->n_free) return D2_EKVFULL;
    for (int l = 0; l < p->cfg.n_layers; l++) {
        int rc = kvp_reserve(p, seq, l, n);
        if (rc != D2_OK) return rc; /* cannot happen after the check above */
    }
    return D2_OK;
}


/* ---- checking ----------------------------------------------------------------------- */

int kvp_check(const kvp_pool *p) {
    if (!p) return D2_EINVAL;
    const int64_t np = p->cfg.n_pages;
    int32_t *cnt = p->scratch; /* references per page; -1 = on the free list */
    memset(cnt, 0, (size_t)np * sizeof *cnt);
    int used = 0;
    for (int s = 0; s < p->cfg.max_seqs; s++) {
        if (p->seq_used[s]) used++;
        for (int l = 0; l < p->cfg.n_layers; l++) {
            const kvp_tab *t = tab_at(p, s, l);
            int live = pages_for(p, t->n_tokens);
            if (t->n_tokens < 0 || t->n_tokens > p->cfg.max_seq_tokens || t->n_alloc < live ||
                t->n_alloc > p->max_table_pages) {
                D2_ERROR("kvpool: check: seq %d layer %d has %d tokens in %d pages (%d live "
                         "expected, at most %d)",
                         s, l, t->n_tokens, t->n_alloc, live, p->max_table_pages);
                return D2_EINTERNAL;
            }
            if (!p->seq_used[s] && t->n_alloc != 0) {
                D2_ERROR("kvpool: check: unused seq %d layer %d holds %d pages", s, l,
                         t->n_alloc);
                return D2_EINTERNAL;
            }
            for (int j = 0; j < t->n_alloc; j++) {
                int32_t pg = t->pages[j];
                if (pg < 0 || pg >= np) {
                    D2_ERROR("kvpool: check: seq %d layer %d page %d has bad id %d", s, l, j,
                             (int)pg);
                    return D2_EINTERNAL;
                }
                if (j >= live && p->refcount[pg] != 1) {
                    D2_ERROR("kvpool: check: reserved page %d of seq %d layer %d is shared "
                             "(refcount %d)",
                             (int)pg, s, l, (int)p->refcount[pg]);
                    return D2_EINTERNAL;
                }
                cnt[pg]++;
            }
        }
    }
    if (used != p->n_seqs_used || used != atomic_load(&p->seqs_active)) {
        D2_ERROR("kvpool: check: %d sequences in use, counter says %d", used, p->n_seqs_used);
        return D2_EINTERNAL;
    }
    if (p->n_free < 0 || p->n_free > np ||
        p->n_free != atomic_load(&p->pages_free)) {
        D2_ERROR("kvpool: check: free count %lld out of range or not published",
                 (long long)p->n_free);
        return D2_EINTERNAL;
    }
    for (int64_t f = 0; f < p->n_free; f++) {
        int32_t pg = p->free_stack[f];
        if (pg < 0 || pg >= np) {
            D2_ERROR("kvpool: check: free list entry %lld has bad id %d", (long long)f, (int)pg);
            return D2_EINTERNAL;
        }
        if (cnt[pg] == -1) {
            D2_ERROR("kvpool: check: page %d is on the free list twice", (int)pg);
            return D2_EINTERNAL;
        }
        if (cnt[pg] > 0) {
            D2_ERROR("kvpool: check: page %d is free but held by %d tables", (int)pg,
                     (int)cnt[pg]);
            return D2_EINTERNAL;
        }
        cnt[pg] = -1;
    }
    int64_t referenced = 0;
    for (int64_t pg = 0; pg < np; pg++) {
        int32_t want = cnt[pg] == -1 ? 0 : cnt[pg];
        if (p->refcount[pg] != want) {
            D2_ERROR("kvpool: check: page %lld has refcount %d but %d references", (long long)pg,
                     (int)p->refcount[pg], (int)want);
            return D2_EINTERNAL;
        }
        if (cnt[pg] == 0) {
            D2_ERROR("kvpool: check: page %lld is neither free nor referenced (leaked)",
                     (long long)pg);
            return D2_EINTERNAL;
        }
        if (cnt[pg] > 0) referenced++;
    }
    if (referenced + p->n_free != np) {
        D2_ERROR("kvpool: check: %lld referenced + %lld free != %lld pages", (long long)referenced,
                 (long long)p->n_free, (long long)np);
        return D2_EINTERNAL;
    }
    return D2_OK;
}
