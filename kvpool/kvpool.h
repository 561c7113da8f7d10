/*
 * kvpool/kvpool.h — the paged KV block pool (public header of kvpool/).
 *
 * One pool of fixed-size pages reserved at startup. A page holds
 * `page_tokens` consecutive slots of ONE layer of ONE sequence (all KV
 * heads). Every (sequence, layer) pair has its own block table, because D2O
 * gives layers different lengths. Pages are taken on demand and returned to
 * the free list at once.
 *
 * The pool keeps the bookkeeping only: page ids, block tables, refcounts, the
 * free list and each slot's token position (keys are stored after RoPE, so a
 * slot's position is what RoPE used):
 *   pos    : int32 [n_pages][page_tokens]        (-1 = empty slot), host memory
 * The payload of a slot — its keys and values, in the backend's dtype (f32,
 * bf16, f16), in host or device memory, and its accumulated-attention score
 * per KV head (D2O) — belongs to the compute backend, which sizes it from
 * n_pages and addresses it by (page id, slot). Whenever the pool moves slots
 * (copy on write, compaction) it moves pos itself and hands the payload moves
 * to the backend through the payload hook (kvp_set_payload), one call per
 * operation with every slot run of it, so a device backend issues one batched
 * copy instead of one per run.
 * A (seq, layer) table's logical slot i lives in page pages[i / page_tokens],
 * slot i % page_tokens. Slots 0..n_tokens-1 are live; a table never has
 * holes (compaction keeps it dense).
 *
 * Sharing: kvp_seq_fork() shares pages (refcount). A shared page is never
 * written in place: appending into a shared partial last page first copies
 * it (copy on write) — kvp_reserve does that; kvp_compact does the same for
 * the pages it rewrites.
 *
 * Reservation: kvp_reserve may take pages beyond the live ones; the table
 * holds them (they count as used in kvp_get_stats) until kvp_append fills
 * them, or kvp_truncate / kvp_compact / kvp_seq_free give them back.
 * Slots at or past n_tokens have no meaningful contents.
 *
 * The payload hook's `freed` is called for every page returning to the free
 * list (debug builds of the CPU backend fill its k/v with NaN there, so reads
 * through stale page ids show up).
 *
 * Threading: only the engine thread calls the pool; no locks. Readers of
 * kvp_get_stats() from other threads get each field atomically (relaxed).
 * Ownership: the pool owns all storage; pointers returned by accessors are
 * borrowed and valid until the next call that changes the same table.
 */
#ifndef D2_KVPOOL_H
#define D2_KVPOOL_H

#include <stddef.h>
#include <stdint.h>

#include "common/status.h"

typedef struct kvp_config {
    int n_layers;
    int n_kv_heads;
    int head_dim;
    int page_tokens;     /* tokens per page; default 16 */
    int64_t n_pages;     /* pages in the pool */
    int max_seqs;        /* sequence ids are 0..max_seqs-1 */
    int max_seq_tokens;  /* longest sequence (bounds each block table) */
} kvp_config;

typedef struct kvp_pool kvp_pool;

/* Creates a pool; all memory is reserved here. Returns D2_OK, D2_EINVAL (bad
 * config), D2_ENOMEM. *out is owned by the caller: free with kvp_destroy. */
int kvp_create(const kvp_config *cfg, kvp_pool **out);
void kvp_destroy(kvp_pool *p); /* accepts NULL */

const kvp_config *kvp_get_config(const kvp_pool *p);

typedef struct kvp_stats {
    int64_t pages_total;
    int64_t pages_free;
    int seqs_active;
} kvp_stats;
kvp_stats kvp_get_stats(const kvp_pool *p);

/* ---- sequences ---------------------------------------------------------- */

/* Takes a free sequence id (all its tables empty). D2_EKVFULL when all
 * max_seqs ids are in use. */
int kvp_seq_new(kvp_pool *p, int *seq_out);
/* Releases every page of every layer of seq and frees the id. */
int kvp_seq_free(kvp_pool *p, int seq);
/* New sequence sharing all of src's pages (refcount +1 each). */
int kvp_seq_fork(kvp_pool *p, int src, int *dst_out);
/* Drops the live tokens of one layer from index n onward (n <= n_tokens);
 * pages left empty return to the pool. */
int kvp_truncate(kvp_pool *p, int seq, int layer, int n);

/* ---- block tables --------------------------------------------------------- */

/* A read-only view of one (seq, layer) table. Borrowed. */
typedef struct kvp_table {
    const int32_t *pages; /* [n_pages] page ids */
    int n_pages;
    int n_tokens;         /* live slots; n_pages == ceil(n_tokens / page_tokens) */
} kvp_table;
kvp_table kvp_get_table(const kvp_pool *p, int seq, int layer);

/* Makes room for n more tokens at the end of (seq, layer): takes pages as
 * needed and un-shares a shared partial last page. Does not change n_tokens.
 * On D2_EKVFULL nothing changed. D2_ETOOLONG when n_tokens + n would exceed
 * max_seq_tokens. Reserved pages beyond the live ones are held by the table
 * (never shared, counted as used) but are not part of kvp_table's n_pages.
 * kvp_truncate, kvp_compact and kvp_seq_free give reserved pages back, and
 * kvp_seq_fork shares a partial last page again: reserve after any of them.
 * Reserving room that is already reserved takes nothing. */
int kvp_reserve(kvp_pool *p, int seq, int layer, int n);
/* Pages kvp_reserve(seq, layer, n) would take from the free list now (>= 0),
 * or D2_EINVAL / D2_ETOOLONG as kvp_reserve would return. */
int kvp_pages_needed(const kvp_pool *p, int seq, int layer, int n);
/* Appends n slots (after a successful kvp_reserve) and returns the logical
 * index of the first; the caller then writes pos (kvp_pos_base) and the
 * backend the payload of those slots (new slots' scores start at 0: the
 * backend zeroes them when it writes K/V). pos starts at -1. D2_EINVAL when the room was not
 * reserved (or the last page became shared since). */
int kvp_append(kvp_pool *p, int seq, int layer, int n);
/* Keeps the live slots i of (seq, layer) with keep[i] != 0 (keep has
 * n_tokens entries; may be NULL when n_tokens is 0): moves them (k, v, pos,
 * score) to the front in their order so the table stays dense, then returns
 * the pages no longer needed (and any reserved ones); the payload moves go to
 * the payload hook in one call. A shared page that
 * would be written is first copied (copy on write); shared pages are never
 * modified. Returns the new n_tokens, or D2_EKVFULL (nothing changed) when
 * those copies need more free pages than there are. Used by D2O eviction. */
int kvp_compact(kvp_pool *p, int seq, int layer, const uint8_t *keep);
/* Makes the page holding live slot i of (seq, layer) private to this table
 * (copy on write when it is shared), so its slots may be written in place
 * (D2O merges into retained slots). D2_EKVFULL (nothing changed) when a copy
 * is needed and no page is free; D2_EINVAL for a bad slot. */
int kvp_unshare(kvp_pool *p, int seq, int layer, int i);
/* Live pages of (seq, layer) that another table also holds (>= 0). */
int kvp_shared_pages(const kvp_pool *p, int seq, int layer);
/* Makes every live page of (seq, layer) private (copy on write of each
 * shared one, payload moved through the copy hook): for a writer of every
 * slot, such as a backend accumulating attention scores. D2_EKVFULL (nothing
 * changed) when the copies need more pages than are free. */
int kvp_unshare_all(kvp_pool *p, int seq, int layer);
/* ceil(n_tokens / page_tokens): pages a table of n_tokens live slots holds.
 * D2_EINVAL for n_tokens < 0. */
int kvp_pages_for_tokens(const kvp_pool *p, int n_tokens);

/* ---- reservation of a whole step ------------------------------------------- */

/* Pages (all layers) that kvp_reserve(seq, layer, n) would take from the free
 * list now, summed over layers (>= 0), or the error kvp_pages_needed returns. */
int64_t kvp_pages_needed_all_layers(const kvp_pool *p, int seq, int n);
/* kvp_reserve(seq, layer, n) for every layer, all or nothing: D2_EKVFULL (or
 * the pool's D2_ETOOLONG / D2_EINVAL) with no change when it does not fit. */
int kvp_reserve_all_layers(kvp_pool *p, int seq, int n);

/* ---- the payload hook ---------------------------------------------------------- */

/* n consecutive slots of page src_page from src_slot, to dst_page from
 * dst_slot. The source and destination ranges of one run never overlap. */
typedef struct kvp_slot_run {
    int32_t dst_page, src_page;
    int32_t dst_slot, src_slot;
    int32_t n;
} kvp_slot_run;

typedef struct kvp_payload {
    /* Copies the payload of every run, in order (a later run may read slots an
     * earlier one wrote: compaction copies shared pages first). One call per
     * copy on write or compaction. Required when a payload is installed. */
    void (*copy)(void *ctx, const kvp_slot_run *runs, int n_runs);
    /* Optional: page returned to the free list (debug poisoning). */
    void (*freed)(void *ctx, int32_t page);
    void *ctx;
} kvp_payload;

/* Installs the backend's payload hook (copied; NULL removes it). A pool with
 * no hook keeps only the bookkeeping (tests of the pool itself). */
void kvp_set_payload(kvp_pool *p, const kvp_payload *pl);

/* ---- slot access (hot path: plain pointer arithmetic, no checks in release) */

/* Positions of every slot: int32 [n_pages][page_tokens], -1 = empty. */
int32_t *kvp_pos_base(kvp_pool *p);

/* Index of live slot i of (seq, layer) in the pool's slot arrays (page id *
 * page_tokens + slot in page: what pos and a backend's payload are indexed by),
 * or -1 for a bad id or a slot that is not live. */
int64_t kvp_slot_index(const kvp_pool *p, int seq, int layer, int i);

/* Page id and slot-in-page of logical slot i of a table. */
static inline void kvp_locate(const kvp_table *t, int page_tokens, int i, int32_t *page,
                              int *slot) {
    *page = t->pages[i / page_tokens];
    *slot = i % page_tokens;
}

/* ---- checking --------------------------------------------------------------- */

/* Verifies every invariant: free list + referenced pages == total, each page's
 * refcount equals the number of tables holding it, no page both free and used,
 * table lengths consistent. Returns D2_OK or D2_EINTERNAL (and logs why). O(pages). */
int kvp_check(const kvp_pool *p);

#endif
