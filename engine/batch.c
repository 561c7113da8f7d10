/*
 * engine/batch.c — helpers over the step plan of engine/backend.h that every
 * backend and the runtime share. Layer: the seam. Pure; any thread.
 */
#include "engine/backend.h"

int eng_batch_out_rows(const eng_batch *b) {
    int n = 0;
    for (int i = 0; i < b->n_seqs; i++) {
        const eng_batch_seq *s = &b->seqs[i];
        if (s->all_logits) n += s->n;
        else if (s->want_logits) n += 1;
    }
    return n;
}
