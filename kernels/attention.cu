/*
 * kernels/attention.cu — attention over the paged bf16 KV pool: decode
 * (flash-decoding, split-K, with the D2O per-slot probability scores),
 * prefill (FlashAttention-style online softmax for a chunk of queries of one
 * sequence) and the prefill's D2O scores and column sums (d2o-spec §10.1).
 *
 * Version 1 is plain CUDA-core code written for correctness first: fp32
 * accumulation everywhere, bf16 only as the storage of K and V, no tensor
 * cores. TODO(kernels): an MMA (mma.sync / wgmma) prefill and colsum once the
 * GPU test passes, developed in kernels/dev/ against these as references.
 *
 * Visibility everywhere: key slot j is visible to a query at position p iff
 * 0 <= pos[j] <= p and, with a sliding window w > 0, pos[j] > p - w
 * (att_visible). Slots past a table's length are never read. Logits are
 * scale * q.k with q pre-multiplied by scale in fp32, then dotted with the
 * bf16 key in fp32, summing d = 0..head_dim-1 in order in prefill and colsum
 * (so the two compute the same logits for the same pair).
 *
 * Decode work list (kern_attn_decode_plan, host): W = n_work splits of
 * KERN_DECODE_SPLIT slots, sequence by sequence, so grids cover what each
 * sequence needs (one long sequence among short ones adds only its own
 * splits). With a live count on the device (n_work_live, for a replayed
 * CUDA graph whose grids are fixed) W is the capacity the workspace is
 * laid out for; pass 1 and 3 then run a grid of at most DEC_LIVE_CTAS CTAs
 * that stride over the live items (never reading an item past the count). Workspace (floats, each region rounded up to 4 floats):
 *   logits [W][n_heads][SPLIT]     raw logits (-inf when masked); only when
 *                                  score != NULL, and written only for the
 *                                  sequences that score this step
 *   part_o [W][n_heads][head_dim]  unnormalised sum p v of a split
 *   part_m [W][n_heads]            the split's max logit
 *   part_l [W][n_heads]            the split's sum of exp(logit - max)
 *   lse    [n_seq][n_heads]        final log-sum-exp of the row
 * Pass 3 turns logits into probabilities with the final lse, so the D2O
 * score adds exactly the softmax the output used (to fp32 rounding).
 *
 * Engine thread only; entries never allocate, synchronise or log.
 */
#include "kernels/common.cuh"

/* Key position kp visible to a query at position qp (window <= 0: none). */
__device__ __forceinline__ bool att_visible(int kp, int qp, int window) {
    return kp >= 0 && kp <= qp && (window <= 0 || kp > qp - window);
}

/* ---- decode ---- */

#define DEC_THREADS 128                /* 4 warps per (split, kv head) CTA */
#define DEC_COMBINE_THREADS 128        /* one CTA per (seq, query head) */
#define DEC_SCORE_THREADS KERN_DECODE_SPLIT /* one thread per slot of a split */
/* CTAs of pass 1 and 3 (work items x kv heads) when the work list's length
 * is on the device: enough for every SM of a large GPU several times over,
 * few enough that those without an item cost microseconds */
#define DEC_LIVE_CTAS 4096
#define DEC_KREG (KERN_MAX_HEAD_DIM / KERN_WARP)     /* key floats per lane */
#define DEC_VREG (KERN_MAX_HEAD_DIM / DEC_THREADS)   /* value dims per thread */

struct dec_ws {
    float *logits, *part_o, *part_m, *part_l, *lse; /* logits NULL: no scores */
};

static size_t round4(size_t n) { return (n + 3) & ~(size_t)3; }

static size_t dec_ws_floats(int n_seq, int n_work, int n_heads, int head_dim, int with_scores,
                            dec_ws *w, float *base) {
    size_t rows = (size_t)n_work * (size_t)n_heads;
    size_t n_logits = with_scores ? round4(rows * KERN_DECODE_SPLIT) : 0;
    size_t n_o = round4(rows * (size_t)head_dim);
    size_t n_m = round4(rows);
    size_t n_lse = round4((size_t)n_seq * (size_t)n_heads);
    if (w) {
        w->logits = with_scores ? base : NULL;
        w->part_o = base + n_logits;
        w->part_m = w->part_o + n_o;
        w->part_l = w->part_m + n_m;
        w->lse = w->part_l + n_m;
    }
    return n_logits + n_o + 2 * n_m + n_lse;
}

extern "C" size_t kern_attn_decode_workspace_bytes(int n_seq, int n_work, int n_heads,
                                                   int head_dim, int with_scores) {
    if (n_seq <= 0 || n_work < 0 || n_heads <= 0 || head_dim <= 0) return 0;
    return dec_ws_floats(n_seq, n_work, n_heads, head_dim, with_scores, NULL, NULL) *
           sizeof(float);
}

extern "C" int kern_attn_decode_plan(const int32_t *len, int n_seq, int32_t *split_base,
                                     int32_t *work, int work_cap, int *n_work) {
    if (!len || !split_base || !n_work || n_seq < 0 || work_cap < 0) return D2_EINVAL;
    int64_t tot = 0;
    for (int b = 0; b < n_seq; b++) {
        if (len[b] < 0) return D2_EINVAL;
        split_base[b] = (int32_t)tot;
        int ns = (len[b] + KERN_DECODE_SPLIT - 1) / KERN_DECODE_SPLIT;
        if (tot + ns > work_cap || (ns && !work)) return D2_EINVAL;
        for (int i = 0; i < ns; i++) work[tot + i] = b;
        tot += ns;
    }
    split_base[n_seq] = (int32_t)tot;
    *n_work = (int)tot;
    return D2_OK;
}

/* Live slots of sequence b: len[b], clamped to what the plan gave it splits for. */
__device__ __forceinline__ int dec_len(const int32_t *len, const int32_t *split_base, int b) {
    return min(len[b], (split_base[b + 1] - split_base[b]) * KERN_DECODE_SPLIT);
}

/* The sequence work item wi belongs to: work[wi], or without a work list
 * the last b < n_seq with split_base[b] <= wi (a binary search; sequences
 * without splits share their successor's base, so the last is the owner). */
__device__ __forceinline__ int dec_item_seq(const int32_t *work, const int32_t *split_base,
                                            int n_seq, int wi) {
    if (work) return work[wi];
    int lo = 0, hi = n_seq;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (split_base[mid] <= wi) lo = mid;
        else hi = mid;
    }
    return lo;
}

/* Sequence b adds D2O scores this step. */
__device__ __forceinline__ bool dec_scoring(const float *score, const int32_t *score_from,
                                            const int32_t *q_pos, int b) {
    return score && (!score_from || q_pos[b] >= score_from[b]);
}

/* Pass 1 for work item wi (one split of one sequence) and kv head blockIdx.y. */
static __device__ void dec_split_item(dec_ws w, const float *q, int q_stride, kern_kv_view kv,
                                      const int32_t *block_tab, int tab_stride,
                                      const int32_t *tab_row, const int32_t *len,
                                      const int32_t *q_pos, const int32_t *split_base,
                                      const int32_t *work, int n_seq, const float *score,
                                      const int32_t *score_from, int n_heads, float scale,
                                      int window, int wi) {
    __shared__ float s_q[KERN_MAX_GROUP][KERN_MAX_HEAD_DIM];
    __shared__ float s_p[KERN_MAX_GROUP][KERN_DECODE_SPLIT]; /* logits, then exp */
    __shared__ int64_t s_row[KERN_DECODE_SPLIT];             /* element offset of slot / hd */

    const int kvh = blockIdx.y;
    const int b = dec_item_seq(work, split_base, n_seq, wi), sp = wi - split_base[b];
    const int hd = kv.head_dim, nkv = kv.n_kv_heads, pt = kv.page_tokens;
    const int G = n_heads / nkv;
    int L = dec_len(len, split_base, b);
    int t0 = sp * KERN_DECODE_SPLIT;
    int n = min(KERN_DECODE_SPLIT, L - t0);
    if (n <= 0) return; /* the whole CTA skips it: pass 2 never reads this split */
    const int qp = q_pos[b];
    const int32_t *tab = block_tab + (int64_t)(tab_row ? tab_row[b] : b) * tab_stride;
    const int lane = threadIdx.x % KERN_WARP, warp = threadIdx.x / KERN_WARP;
    const int n_warps = DEC_THREADS / KERN_WARP;
    const int64_t row0 = (int64_t)wi * n_heads + (int64_t)kvh * G; /* first head's partial row */
    float *logits = w.logits && dec_scoring(score, score_from, q_pos, b) ? w.logits : NULL;

    for (int i = threadIdx.x; i < G * hd; i += DEC_THREADS) {
        int g = i / hd, d = i % hd;
        s_q[g][d] = q[(int64_t)b * q_stride + (int64_t)(kvh * G + g) * hd + d] * scale;
    }
    __syncthreads();

    /* Logits: a warp per slot; lanes split head_dim; the key is read once
     * into registers and dotted with every query head of the group. */
    for (int t = warp; t < n; t += n_warps) {
        int slot = t0 + t;
        int64_t page = tab[slot / pt];
        int64_t ps = page * pt + slot % pt;
        int p = kv.pos[ps];
        bool vis = att_visible(p, qp, window);
        int64_t row = ps * nkv + kvh;
        const kern_bf16 *kr = kv.k + row * hd;
        float kreg[DEC_KREG];
#pragma unroll
        for (int r = 0; r < DEC_KREG; r++) {
            int d = lane + r * KERN_WARP;
            kreg[r] = (vis && d < hd) ? kern_bf2f(kr[d]) : 0.0f;
        }
        for (int g = 0; g < G; g++) {
            float acc = 0.0f;
#pragma unroll
            for (int r = 0; r < DEC_KREG; r++) {
                int d = lane + r * KERN_WARP;
                if (d < hd) acc += s_q[g][d] * kreg[r];
            }
            acc = kern_warp_sum(acc);
            if (lane == 0) {
                float lg = vis ? acc : -INFINITY;
                s_p[g][t] = lg;
                if (logits) logits[(row0 + g) * KERN_DECODE_SPLIT + t] = lg;
            }
        }
        if (lane == 0) s_row[t] = row;
    }
    __syncthreads();

    /* Local softmax statistics: a warp per query head. */
    __shared__ float s_m[KERN_MAX_GROUP], s_l[KERN_MAX_GROUP];
    for (int g = warp; g < G; g += n_warps) {
        float m = -INFINITY;
        for (int t = lane; t < n; t += KERN_WARP) m = fmaxf(m, s_p[g][t]);
        m = kern_warp_max(m);
        float l = 0.0f;
        for (int t = lane; t < n; t += KERN_WARP) {
            float e = kern_exp_sub(s_p[g][t], m);
            s_p[g][t] = e;
            l += e;
        }
        l = kern_warp_sum(l);
        if (lane == 0) {
            s_m[g] = m;
            s_l[g] = l;
        }
    }
    __syncthreads();

    /* Unnormalised P.V: a thread per value dimension, all heads at once. */
    float acc[DEC_VREG][KERN_MAX_GROUP];
#pragma unroll
    for (int r = 0; r < DEC_VREG; r++)
#pragma unroll
        for (int g = 0; g < KERN_MAX_GROUP; g++) acc[r][g] = 0.0f;
    for (int t = 0; t < n; t++) {
        const kern_bf16 *vr = kv.v + s_row[t] * hd;
#pragma unroll
        for (int r = 0; r < DEC_VREG; r++) {
            int d = threadIdx.x + r * DEC_THREADS;
            if (d >= hd) continue;
            float vv = kern_bf2f(vr[d]);
#pragma unroll
            for (int g = 0; g < KERN_MAX_GROUP; g++) {
                /* p == 0 (masked) skips the slot: its value may be stale. */
                float p = g < G ? s_p[g][t] : 0.0f;
                if (p != 0.0f) acc[r][g] += p * vv;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < DEC_VREG; r++) {
        int d = threadIdx.x + r * DEC_THREADS;
        if (d >= hd) continue;
#pragma unroll
        for (int g = 0; g < KERN_MAX_GROUP; g++)
            if (g < G) w.part_o[(row0 + g) * hd + d] = acc[r][g];
    }
    if (threadIdx.x < G) {
        w.part_m[row0 + threadIdx.x] = s_m[threadIdx.x];
        w.part_l[row0 + threadIdx.x] = s_l[threadIdx.x];
    }
}

/* Pass 1. grid (work items, kv head): a CTA per work item, or with the live
 * count on the device (n_work_live) a capped grid whose CTAs stride over
 * the live items (the same arithmetic per item either way). */
static __global__ void __launch_bounds__(DEC_THREADS)
dec_split_kernel(dec_ws w, const float *q, int q_stride, kern_kv_view kv,
                 const int32_t *block_tab, int tab_stride, const int32_t *tab_row,
                 const int32_t *len,
                 const int32_t *q_pos, const int32_t *split_base, const int32_t *work, int n_seq,
                 const int32_t *n_work_live, const float *score, const int32_t *score_from,
                 int n_heads, float scale, int window) {
    const int n_items = n_work_live ? *n_work_live : (int)gridDim.x;
    for (int wi = blockIdx.x; wi < n_items; wi += gridDim.x) {
        dec_split_item(w, q, q_stride, kv, block_tab, tab_stride, tab_row, len, q_pos, split_base,
                       work, n_seq, score, score_from, n_heads, scale, window, wi);
        __syncthreads(); /* the next item rewrites the shared arrays */
    }
}

/* Pass 2. grid (seq, query head): merge the sequence's splits. */
static __global__ void __launch_bounds__(DEC_COMBINE_THREADS)
dec_combine_kernel(dec_ws w, void *out, kern_dtype out_dtype, const int32_t *len,
                   const int32_t *split_base, int n_heads, int hd) {
    const int b = blockIdx.x, h = blockIdx.y;
    const int64_t row = (int64_t)b * n_heads + h;
    int L = dec_len(len, split_base, b);
    int nsv = L <= 0 ? 0 : (L + KERN_DECODE_SPLIT - 1) / KERN_DECODE_SPLIT;
    const int64_t p0 = (int64_t)split_base[b] * n_heads + h; /* partial row of split 0 */
    float M = -INFINITY;
    for (int s = 0; s < nsv; s++) M = fmaxf(M, w.part_m[p0 + (int64_t)s * n_heads]);
    float Z = 0.0f;
    for (int s = 0; s < nsv; s++) {
        int64_t pr = p0 + (int64_t)s * n_heads;
        Z += w.part_l[pr] * kern_exp_sub(w.part_m[pr], M);
    }
    float invZ = Z > 0.0f ? 1.0f / Z : 0.0f;
    for (int d = threadIdx.x; d < hd; d += DEC_COMBINE_THREADS) {
        float o = 0.0f;
        for (int s = 0; s < nsv; s++) {
            int64_t pr = p0 + (int64_t)s * n_heads;
            float f = kern_exp_sub(w.part_m[pr], M);
            if (f != 0.0f) o += w.part_o[pr * hd + d] * f;
        }
        kern_store(out, out_dtype, row * hd + d, o * invZ);
    }
    if (threadIdx.x == 0) w.lse[row] = Z > 0.0f ? M + logf(Z) : -INFINITY;
}

/* Pass 3 for work item wi and kv head blockIdx.y, a thread per slot. */
static __device__ void dec_score_item(dec_ws w, float *score, const int32_t *score_from,
                                      const int32_t *block_tab, int tab_stride,
                                      const int32_t *tab_row, const int32_t *len,
                                      const int32_t *q_pos, const int32_t *split_base,
                                      const int32_t *work, int n_seq, int n_heads, int nkv, int pt,
                                      int wi) {
    const int kvh = blockIdx.y;
    const int b = dec_item_seq(work, split_base, n_seq, wi), sp = wi - split_base[b];
    if (!dec_scoring(score, score_from, q_pos, b)) return;
    int t = threadIdx.x, slot = sp * KERN_DECODE_SPLIT + t;
    if (slot >= dec_len(len, split_base, b)) return;
    const int G = n_heads / nkv;
    const int64_t row0 = (int64_t)wi * n_heads + (int64_t)kvh * G;
    const int64_t lrow0 = (int64_t)b * n_heads + (int64_t)kvh * G;
    float sum = 0.0f;
    for (int g = 0; g < G; g++)
        sum += kern_exp_sub(w.logits[(row0 + g) * KERN_DECODE_SPLIT + t], w.lse[lrow0 + g]);
    if (sum == 0.0f) return;
    int64_t page = block_tab[(int64_t)(tab_row ? tab_row[b] : b) * tab_stride + slot / pt];
    atomicAdd(&score[(page * pt + slot % pt) * nkv + kvh], sum);
}

/* Pass 3. grid (work items, kv head) as pass 1: D2O decode scores. */
static __global__ void __launch_bounds__(DEC_SCORE_THREADS)
dec_score_kernel(dec_ws w, float *score, const int32_t *score_from, const int32_t *block_tab,
                 int tab_stride, const int32_t *tab_row, const int32_t *len, const int32_t *q_pos,
                 const int32_t *split_base, const int32_t *work, int n_seq,
                 const int32_t *n_work_live, int n_heads, int nkv, int pt) {
    const int n_items = n_work_live ? *n_work_live : (int)gridDim.x;
    for (int wi = blockIdx.x; wi < n_items; wi += gridDim.x)
        dec_score_item(w, score, score_from, block_tab, tab_stride, tab_row, len, q_pos,
                       split_base, work, n_seq, n_heads, nkv, pt, wi);
}

extern "C" int kern_attn_decode(void *out, kern_dtype out_dtype, const float *q, int q_stride,
                                kern_kv_view kv, float *score, const int32_t *score_from,
                                const int32_t *block_tab, int tab_stride,
                                const int32_t *tab_row, const int32_t *len,
                                const int32_t *q_pos, const int32_t *split_base,
                                const int32_t *work, int n_work, const int32_t *n_work_live,
                                int n_seq, int n_heads, float scale, int window, void *workspace,
                                kern_stream s) {
    KERN_REQUIRE(out && q && kv.k && kv.v && kv.pos && len && q_pos && n_seq >= 0);
    KERN_REQUIRE(kv.n_kv_heads > 0 && kv.page_tokens > 0 && n_heads % kv.n_kv_heads == 0);
    KERN_REQUIRE(n_heads / kv.n_kv_heads <= KERN_MAX_GROUP);
    KERN_REQUIRE(kv.head_dim > 0 && kv.head_dim % 2 == 0 && kv.head_dim <= KERN_MAX_HEAD_DIM);
    KERN_REQUIRE(q_stride >= n_heads * kv.head_dim && n_work >= 0);
    KERN_REQUIRE(!n_work_live || n_work > 0);
    KERN_REQUIRE(n_heads <= 65535 && kv.n_kv_heads <= 65535);
    if (n_seq == 0) return D2_OK;
    if (n_work == 0) {
        /* No keys anywhere: outputs are zero. A memset is an enqueued
         * operation like a launch; it neither allocates nor synchronises. */
        size_t bytes = (size_t)n_seq * n_heads * kv.head_dim *
                       (out_dtype == KERN_BF16 ? sizeof(kern_bf16) : sizeof(float));
        KERN_CUDA_TRY(cudaMemsetAsync(out, 0, bytes, s));
        return D2_OK;
    }
    KERN_REQUIRE(workspace && block_tab && tab_stride > 0 && split_base);
    KERN_REQUIRE(((uintptr_t)workspace & 15u) == 0);
    dec_ws w;
    dec_ws_floats(n_seq, n_work, n_heads, kv.head_dim, score != NULL, &w, (float *)workspace);

    /* with the live count on the device: a grid capped to fill the GPU (CTAs
     * loop over the live items), not one CTA per item of the capacity */
    int gx = n_work;
    if (n_work_live) {
        int cap = DEC_LIVE_CTAS / kv.n_kv_heads;
        if (cap < 1) cap = 1;
        if (gx > cap) gx = cap;
    }
    dim3 g1((unsigned)gx, kv.n_kv_heads);
    dec_split_kernel<<<g1, DEC_THREADS, 0, s>>>(w, q, q_stride, kv, block_tab, tab_stride,
                                                tab_row, len,
                                                q_pos, split_base, work, n_seq, n_work_live,
                                                score, score_from, n_heads, scale, window);
    KERN_LAUNCH_CHECK("dec_split_kernel");
    dim3 g2((unsigned)n_seq, n_heads);
    dec_combine_kernel<<<g2, DEC_COMBINE_THREADS, 0, s>>>(w, out, out_dtype, len, split_base,
                                                          n_heads, kv.head_dim);
    KERN_LAUNCH_CHECK("dec_combine_kernel");
    if (score) {
        dim3 g3((unsigned)gx, kv.n_kv_heads);
        dec_score_kernel<<<g3, DEC_SCORE_THREADS, 0, s>>>(w, score, score_from, block_tab,
                                                          tab_stride, tab_row, len, q_pos, split_base,
                                                          work, n_seq, n_work_live, n_heads,
                                                          kv.n_kv_heads, kv.page_tokens);
        KERN_LAUNCH_CHECK("dec_score_kernel");
    }
    return D2_OK;
}

/* ---- prefill ---- */

/* A CTA owns PF_BQ queries of one query head and walks all keys in tiles of
 * PF_BK. Thread (r, c), r = tid / PF_TPR, c = tid % PF_TPR, owns query row r:
 * it computes the logits of keys c, c + PF_TPR, ... of the tile, and the
 * output dimensions c, c + PF_TPR, ... of the row. The PF_TPR threads of a
 * row are adjacent lanes of one warp, so row max / sum are 3 shuffles and
 * the row's probabilities in shared memory need only __syncwarp(). */
#define PF_BQ 16
#define PF_BK 16
#define PF_TPR 8
#define PF_THREADS (PF_BQ * PF_TPR)                    /* 128 */
#define PF_KPT (PF_BK / PF_TPR)                        /* keys per thread: 2 */
#define PF_DPT (KERN_MAX_HEAD_DIM / PF_TPR)            /* output dims per thread: 32 */
#define PF_KSTRIDE(hd) ((hd) + 2) /* bf16 row stride of the K tile: breaks bank conflicts */

static size_t pf_smem_bytes(int hd) {
    return (size_t)PF_BQ * hd * sizeof(float) +             /* s_q */
           (size_t)PF_BQ * PF_BK * sizeof(float) +          /* s_p */
           (size_t)PF_BK * PF_KSTRIDE(hd) * sizeof(kern_bf16) + /* s_k */
           (size_t)PF_BK * hd * sizeof(kern_bf16) +         /* s_v */
           (size_t)(PF_BK + PF_BQ) * sizeof(int32_t);       /* s_pos, s_qpos */
}

/* Shuffle reductions over the PF_TPR adjacent lanes of a row. */
__device__ __forceinline__ float pf_row_max(float v) {
#pragma unroll
    for (int o = PF_TPR / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float pf_row_sum(float v) {
#pragma unroll
    for (int o = PF_TPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Loads key/value tile [kt, kt + PF_BK) of kv head kvh (zeros, pos -1 past n_kv). */
__device__ __forceinline__ void pf_load_kv(kern_bf16 *s_k, kern_bf16 *s_v, int32_t *s_pos,
                                           const kern_kv_view &kv, const int32_t *block_tab,
                                           int n_kv, int kt, int kvh) {
    const int hd = kv.head_dim, pt = kv.page_tokens;
    for (int i = threadIdx.x; i < PF_BK * hd; i += blockDim.x) {
        int j = i / hd, d = i % hd;
        int slot = kt + j;
        kern_bf16 kk = 0, vv = 0;
        if (slot < n_kv) {
            int64_t ps = (int64_t)block_tab[slot / pt] * pt + slot % pt;
            int64_t e = (ps * kv.n_kv_heads + kvh) * hd + d;
            kk = kv.k[e];
            vv = kv.v[e];
        }
        s_k[j * PF_KSTRIDE(hd) + d] = kk;
        s_v[j * hd + d] = vv;
    }
    for (int j = threadIdx.x; j < PF_BK; j += blockDim.x) {
        int slot = kt + j;
        s_pos[j] = slot < n_kv ? kv.pos[(int64_t)block_tab[slot / pt] * pt + slot % pt] : -1;
    }
}

/* grid (query tile, query head). */
static __global__ void __launch_bounds__(PF_THREADS)
prefill_kernel(void *out, kern_dtype out_dtype, float *lse, const float *q, int q_stride,
               kern_kv_view kv, const int32_t *block_tab, int n_kv, const int32_t *q_pos,
               int n_q, int n_heads, float scale, int window) {
    extern __shared__ float4 pf_smem[];
    const int hd = kv.head_dim;
    float *s_q = (float *)pf_smem;
    float *s_p = s_q + PF_BQ * hd;
    kern_bf16 *s_k = (kern_bf16 *)(s_p + PF_BQ * PF_BK);
    kern_bf16 *s_v = s_k + PF_BK * PF_KSTRIDE(hd);
    int32_t *s_pos = (int32_t *)(s_v + PF_BK * hd);
    int32_t *s_qpos = s_pos + PF_BK;

    const int h = blockIdx.y, q0 = blockIdx.x * PF_BQ;
    const int kvh = h / (n_heads / kv.n_kv_heads);
    const int r = threadIdx.x / PF_TPR, c = threadIdx.x % PF_TPR;
    const int qi = q0 + r;

    for (int i = threadIdx.x; i < PF_BQ * hd; i += PF_THREADS) {
        int rr = i / hd, d = i % hd;
        int qq = q0 + rr;
        s_q[i] = qq < n_q ? q[(int64_t)qq * q_stride + (int64_t)h * hd + d] * scale : 0.0f;
    }
    for (int i = threadIdx.x; i < PF_BQ; i += PF_THREADS)
        s_qpos[i] = q0 + i < n_q ? q_pos[q0 + i] : -1;

    float acc[PF_DPT];
#pragma unroll
    for (int k = 0; k < PF_DPT; k++) acc[k] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    for (int kt = 0; kt < n_kv; kt += PF_BK) {
        __syncthreads(); /* the previous tile is no longer read */
        pf_load_kv(s_k, s_v, s_pos, kv, block_tab, n_kv, kt, kvh);
        __syncthreads();

        const int my_qpos = s_qpos[r];
        float sv[PF_KPT];
        float tmax = -INFINITY;
#pragma unroll
        for (int u = 0; u < PF_KPT; u++) {
            int j = c + u * PF_TPR;
            int p = s_pos[j];
            float lg = -INFINITY;
            if (qi < n_q && att_visible(p, my_qpos, window)) {
                const float *qr = s_q + r * hd;
                const kern_bf16 *kr = s_k + j * PF_KSTRIDE(hd);
                float dot = 0.0f;
                for (int d = 0; d < hd; d++) dot += qr[d] * kern_bf2f(kr[d]);
                lg = dot;
            }
            sv[u] = lg;
            tmax = fmaxf(tmax, lg);
        }
        tmax = pf_row_max(tmax);
        float m_new = fmaxf(m, tmax);
        /* m_new == -inf: nothing visible yet, p = 0 and alpha unused. */
        float alpha = kern_exp_sub(m, m_new);
        float psum = 0.0f;
#pragma unroll
        for (int u = 0; u < PF_KPT; u++) {
            float p = m_new == -INFINITY ? 0.0f : kern_exp_sub(sv[u], m_new);
            s_p[r * PF_BK + c + u * PF_TPR] = p;
            psum += p;
        }
        psum = pf_row_sum(psum);
        if (m_new != -INFINITY) {
            l = l * alpha + psum;
            m = m_new;
        }
        __syncwarp();
        if (m != -INFINITY) {
#pragma unroll
            for (int k = 0; k < PF_DPT; k++) {
                int d = c + k * PF_TPR;
                if (d >= hd) break;
                float o = acc[k] * alpha;
                for (int j = 0; j < PF_BK; j++) {
                    /* p == 0 (masked, empty or past n_kv) skips the slot: its
                     * value may be stale or NaN, and 0 * NaN is NaN. */
                    float p = s_p[r * PF_BK + j];
                    if (p != 0.0f) o += p * kern_bf2f(s_v[j * hd + d]);
                }
                acc[k] = o;
            }
        }
    }

    if (qi >= n_q) return;
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    int64_t ob = ((int64_t)qi * n_heads + h) * hd;
#pragma unroll
    for (int k = 0; k < PF_DPT; k++) {
        int d = c + k * PF_TPR;
        if (d >= hd) break;
        kern_store(out, out_dtype, ob + d, acc[k] * inv);
    }
    if (lse && c == 0) lse[(int64_t)h * n_q + qi] = l > 0.0f ? m + logf(l) : -INFINITY;
}

static int attn_common_checks(const kern_kv_view &kv, int n_heads, int q_stride) {
    KERN_REQUIRE(kv.k && kv.v && kv.pos && kv.n_kv_heads > 0 && kv.page_tokens > 0);
    KERN_REQUIRE(n_heads > 0 && n_heads % kv.n_kv_heads == 0 && n_heads <= 65535);
    KERN_REQUIRE(n_heads / kv.n_kv_heads <= KERN_MAX_GROUP);
    KERN_REQUIRE(kv.head_dim > 0 && kv.head_dim % 2 == 0 && kv.head_dim <= KERN_MAX_HEAD_DIM);
    KERN_REQUIRE(q_stride >= n_heads * kv.head_dim);
    return D2_OK;
}

extern "C" int kern_attn_prefill(void *out, kern_dtype out_dtype, float *lse, const float *q,
                                 int q_stride, kern_kv_view kv, const int32_t *block_tab,
                                 int n_kv, const int32_t *q_pos, int n_q, int n_heads,
                                 float scale, int window, kern_stream s) {
    int rc = attn_common_checks(kv, n_heads, q_stride);
    if (rc) return rc;
    KERN_REQUIRE(out && q && q_pos && n_q >= 0 && n_kv >= 0 && (n_kv == 0 || block_tab));
    if (n_q == 0) return D2_OK;
    dim3 grid((n_q + PF_BQ - 1) / PF_BQ, n_heads);
    size_t smem = pf_smem_bytes(kv.head_dim); /* <= 33 KiB at head_dim 256: no opt-in */
    prefill_kernel<<<grid, PF_THREADS, smem, s>>>(out, out_dtype, lse, q, q_stride, kv,
                                                  block_tab, n_kv, q_pos, n_q, n_heads, scale,
                                                  window);
    KERN_LAUNCH_CHECK("prefill_kernel");
    return D2_OK;
}

/* ---- D2O prefill scores and column sums ---- */

/* A CTA owns CS_BK keys of one kv head and, one after another, the G query
 * heads of its group: the keys are loaded once for the whole group. For a
 * head it walks the chunk's queries in tiles of CS_BQ; thread (j, c),
 * j = tid / CS_TPR, owns key j of the tile and sums exp(logit - lse_i) over
 * queries c, c + CS_TPR, ... of each tile; the CS_TPR partial sums of a key
 * are reduced by shuffles after the head's last tile. Keys are kept as fp32
 * in shared memory, rows padded by one float. */
#define CS_BK 16
#define CS_BQ 16
#define CS_TPR 8
#define CS_THREADS (CS_BK * CS_TPR) /* 128 */
#define CS_QPT (CS_BQ / CS_TPR)     /* queries per thread per tile: 2 */

static size_t cs_smem_bytes(int hd) {
    return (size_t)CS_BK * (hd + 1) * sizeof(float) + /* s_k */
           (size_t)CS_BQ * (hd + 1) * sizeof(float) + /* s_q */
           (size_t)CS_BQ * sizeof(float) +            /* s_lse */
           (size_t)(CS_BQ + CS_BK) * sizeof(int32_t); /* s_qpos, s_kpos */
}

/* grid (key tile, kv head). */
static __global__ void __launch_bounds__(CS_THREADS)
prefill_scores_kernel(float *score, float *colsum, int colsum_len, int score_from,
                      const float *q, int q_stride, const float *lse, kern_kv_view kv,
                      const int32_t *block_tab, int n_kv, const int32_t *q_pos, int n_q,
                      int n_heads, float scale, int window) {
    extern __shared__ float4 cs_smem[];
    const int hd = kv.head_dim, pt = kv.page_tokens, hs = hd + 1;
    float *s_k = (float *)cs_smem;
    float *s_q = s_k + CS_BK * hs;
    float *s_lse = s_q + CS_BQ * hs;
    int32_t *s_qpos = (int32_t *)(s_lse + CS_BQ);
    int32_t *s_kpos = s_qpos + CS_BQ;

    const int kvh = blockIdx.y, k0 = blockIdx.x * CS_BK;
    const int G = n_heads / kv.n_kv_heads;
    const int j = threadIdx.x / CS_TPR, c = threadIdx.x % CS_TPR;

    for (int i = threadIdx.x; i < CS_BK * hd; i += CS_THREADS) {
        int jj = i / hd, d = i % hd;
        int slot = k0 + jj;
        float kk = 0.0f;
        if (slot < n_kv) {
            int64_t ps = (int64_t)block_tab[slot / pt] * pt + slot % pt;
            kk = kern_bf2f(kv.k[(ps * kv.n_kv_heads + kvh) * hd + d]);
        }
        s_k[jj * hs + d] = kk;
    }
    for (int jj = threadIdx.x; jj < CS_BK; jj += CS_THREADS) {
        int slot = k0 + jj;
        s_kpos[jj] = slot < n_kv ? kv.pos[(int64_t)block_tab[slot / pt] * pt + slot % pt] : -1;
    }

    float group_acc = 0.0f; /* the key's sum over the group's heads (thread c == 0) */
    for (int g = 0; g < G; g++) {
        const int h = kvh * G + g;
        float acc = 0.0f;
        for (int qt = 0; qt < n_q; qt += CS_BQ) {
            __syncthreads(); /* keys loaded / previous query tile no longer read */
            for (int i = threadIdx.x; i < CS_BQ * hd; i += CS_THREADS) {
                int rr = i / hd, d = i % hd;
                int qq = qt + rr;
                s_q[rr * hs + d] =
                    qq < n_q ? q[(int64_t)qq * q_stride + (int64_t)h * hd + d] * scale : 0.0f;
            }
            for (int rr = threadIdx.x; rr < CS_BQ; rr += CS_THREADS) {
                int qq = qt + rr;
                s_qpos[rr] = qq < n_q ? q_pos[qq] : -1;
                s_lse[rr] = qq < n_q ? lse[(int64_t)h * n_q + qq] : -INFINITY;
            }
            __syncthreads();
            const int kp = s_kpos[j];
            if (kp < 0) continue; /* empty or past n_kv: nothing to add (no barrier skipped:
                                     the loop's barriers are at its top) */
#pragma unroll
            for (int u = 0; u < CS_QPT; u++) {
                int i = c + u * CS_TPR;
                int qp = s_qpos[i];
                if (qt + i >= n_q || qp < score_from || !att_visible(kp, qp, window)) continue;
                const float *qr = s_q + i * hs;
                const float *kr = s_k + j * hs;
                float dot = 0.0f;
                for (int d = 0; d < hd; d++) dot += qr[d] * kr[d];
                acc += kern_exp_sub(dot, s_lse[i]);
            }
        }
        acc = pf_row_sum(acc); /* CS_TPR == PF_TPR adjacent lanes */
        const int kp = s_kpos[j];
        if (c == 0 && kp >= 0) {
            if (colsum && kp < colsum_len) colsum[(int64_t)h * colsum_len + kp] += acc;
            group_acc += acc;
        }
    }
    if (score && c == 0 && k0 + j < n_kv && group_acc != 0.0f) {
        int slot = k0 + j;
        int64_t ps = (int64_t)block_tab[slot / pt] * pt + slot % pt;
        score[ps * kv.n_kv_heads + kvh] += group_acc;
    }
}

extern "C" int kern_attn_prefill_scores(float *score, float *colsum, int colsum_len,
                                        int score_from, const float *q, int q_stride,
                                        const float *lse, kern_kv_view kv,
                                        const int32_t *block_tab, int n_kv,
                                        const int32_t *q_pos, int n_q, int n_heads, float scale,
                                        int window, kern_stream s) {
    int rc = attn_common_checks(kv, n_heads, q_stride);
    if (rc) return rc;
    KERN_REQUIRE(q && lse && q_pos && n_q >= 0 && n_kv >= 0 && (n_kv == 0 || block_tab));
    KERN_REQUIRE(!colsum || colsum_len >= 0);
    if (n_q == 0 || n_kv == 0 || (!score && !colsum)) return D2_OK;
    dim3 grid((n_kv + CS_BK - 1) / CS_BK, kv.n_kv_heads);
    size_t smem = cs_smem_bytes(kv.head_dim); /* <= 33 KiB at head_dim 256 */
    prefill_scores_kernel<<<grid, CS_THREADS, smem, s>>>(score, colsum, colsum_len, score_from, q,
                                                         q_stride, lse, kv, block_tab, n_kv,
                                                         q_pos, n_q, n_heads, scale, window);
    KERN_LAUNCH_CHECK("prefill_scores_kernel");
    return D2_OK;
}
