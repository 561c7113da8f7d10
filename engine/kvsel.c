/*
 * engine/kvsel.c — KV-compression selection and SnapKV pooling (contract in
 * engine/kvsel.h). Pure functions over host arrays; any thread.
 */
#include "engine/kvsel.h"

#include <stdlib.h>
#include <string.h>

#define SNAP_POOL_K 5

void eng_kv_pool_scores(const float *in, int n, float *out) {
    const int half = SNAP_POOL_K / 2;
    for (int i = 0; i < n; i++) {
        int a = i - half < 0 ? 0 : i - half, b = i + half >= n ? n - 1 : i + half;
        float s = 0.0f;
        for (int j = a; j <= b; j++) s += in[j];
        out[i] = s / (float)(b - a + 1);
    }
}

static int cand_cmp(const void *a, const void *b) {
    const eng_kv_cand *x = a, *y = b;
    if (x->s > y->s) return -1;
    if (x->s < y->s) return 1;
    return x->i < y->i ? -1 : x->i > y->i;
}

int eng_kv_select(eng_kv_cand *scratch, const float *score, int n, int n_sink, int heavy, int recent,
                  uint8_t *keep) {
    if (recent > n) recent = n;
    if (recent < 0) recent = 0;
    if (heavy < 0) heavy = 0;
    int lim = n - recent; /* candidates for sinks and heavy hitters: [0, lim) */
    memset(keep, 0, (size_t)n);
    for (int i = lim; i < n; i++) keep[i] = 1;
    int ns = n_sink < heavy ? n_sink : heavy;
    if (ns > lim) ns = lim;
    if (ns < 0) ns = 0;
    for (int i = 0; i < ns; i++) keep[i] = 1;
    int nh = heavy - ns, nc = lim - ns;
    if (nh >= nc) {
        for (int i = ns; i < lim; i++) keep[i] = 1;
    } else if (nh > 0) {
        for (int i = 0; i < nc; i++) scratch[i] = (eng_kv_cand){score[ns + i], ns + i};
        qsort(scratch, (size_t)nc, sizeof(eng_kv_cand), cand_cmp);
        for (int i = 0; i < nh; i++) keep[scratch[i].i] = 1;
    }
    int m = 0;
    for (int i = 0; i < n; i++) m += keep[i];
    return m;
}

