/*
 * tests/gpu/side.h — one backend with its own KV pool, as the GPU host tests
 * (test_backend_cuda.c, test_graphs_cuda.c) drive two of them side by side
 * through the same plans. Header-only (static functions), included after
 * tests/test.h by those tests only.
 */
#ifndef D2_TESTS_GPU_SIDE_H
#define D2_TESTS_GPU_SIDE_H

#include "engine/backend.h"
#include "kvpool/kvpool.h"

typedef struct side {
    kvp_pool *pool;
    eng_backend *be;
    const char *name;
} side;

static void side_free(side *s) {
    if (s->be) s->be->ops->destroy(s->be);
    kvp_destroy(s->pool);
}

/* What engine/step.c does before the backend call (reserve, append, the new
 * slots' positions), then the step. */
static void side_step(side *s, const eng_batch *b, int n_layers) {
    int pt = kvp_get_config(s->pool)->page_tokens;
    for (int k = 0; k < b->n_seqs; k++)
        ASSERT_OK(kvp_reserve_all_layers(s->pool, b->seqs[k].seq, b->seqs[k].n));
    int32_t *pos = kvp_pos_base(s->pool);
    for (int k = 0; k < b->n_seqs; k++) {
        const eng_batch_seq *bs = &b->seqs[k];
        for (int l = 0; l < n_layers; l++) {
            int first = kvp_append(s->pool, bs->seq, l, bs->n);
            ASSERT(first >= 0);
            kvp_table tab = kvp_get_table(s->pool, bs->seq, l);
            for (int j = 0; j < bs->n; j++) {
                int32_t page;
                int slot;
                kvp_locate(&tab, pt, first + j, &page, &slot);
                pos[(size_t)page * (size_t)pt + (size_t)slot] = b->pos[bs->start + j];
            }
        }
    }
    int rc = s->be->ops->step(s->be, b);
    if (rc != D2_OK) FAIL_("%s step: %s", s->name, s->be->ops->last_error(s->be));
}

#endif
