/*
 * kernels/d2o.cu — D2O KV-cache compression of one (sequence, layer) block
 * table on the device: token scores, heavy-hitter selection, cosine matching
 * of evicted to kept keys, the EMA threshold, the two merge rules and the
 * compaction. Contract and call order in kernels/kernels.h ("d2o" section);
 * the CPU original is engine/kvcomp.c (eng_kv_compress_layer), which these
 * kernels mirror step by step, and tests/gpu/test_d2o.cu checks each kernel
 * against a CPU reference of that code.
 *
 * Callers: the engine thread (a later CUDA backend). Entries never allocate,
 * never synchronise and never log; the scratch comes from the caller
 * (kern_d2o_scratch_bytes / kern_d2o_ws_init).
 *
 * Numerics: bf16 K/V in, fp32 math. Where the C code's result is a short
 * fixed-order fp32 expression (score sums, tau, merge weights and sums) the
 * kernels use the same order and no fused multiply-add (__fadd_rn /
 * __fmul_rn), because the C code is built with -std=c11 (no contraction);
 * only expf may differ by an ulp. The cosine sums run in a different order
 * (tensor cores), so near-equal similarities may pick another target.
 */
#include <mma.h>

#include <limits.h>
#include <string.h>

#include "kernels/common.cuh"

#define D2O_SEL_THREADS 1024   /* single-CTA select / scan kernels */
#define D2O_TE 32              /* evicted rows per matching CTA */
#define D2O_TC 64              /* kept columns per matching tile */
#define D2O_MATCH_THREADS 128  /* 4 warps: 2 x 4 fragments of 16 x 16 */
#define D2O_MERGE_THREADS 128
#define D2O_SORT_CAP 1024      /* merge groups up to this are sorted by slot */
#define D2O_SELF_E 2.71828182845904523536f /* rounds to expf(1.0f) */

/* ---- host helpers --------------------------------------------------------------- */

int kern_d2o_plan_make(kern_d2o_plan *p, int n, int n_sink, int heavy, int recent) {
    if (!p || n < 0) return D2_EINVAL;
    /* the same clamps, in the same order, as eng_kv_select */
    if (recent > n) recent = n;
    if (recent < 0) recent = 0;
    if (heavy < 0) heavy = 0;
    int lim = n - recent;
    int ns = n_sink < heavy ? n_sink : heavy;
    if (ns > lim) ns = lim;
    if (ns < 0) ns = 0;
    int nh = heavy - ns, nc = lim - ns;
    if (nh > nc) nh = nc;
    if (nh < 0) nh = 0;
    p->n = n;
    p->lim = lim;
    p->n_sink = ns;
    p->n_heavy = nh;
    p->n_cand = nc;
    p->n_kept = (n - lim) + ns + nh;
    p->n_evicted = n - p->n_kept;
    return D2_OK;
}

static size_t d2o_align(size_t x) { return (x + 255u) & ~(size_t)255u; }

/* 32-bit words of one slot in the compaction staging: k, v, pos, score. */
static size_t d2o_slot_words(int n_kv, int hd) {
    return (size_t)n_kv * (size_t)hd /* k + v as bf16 pairs */ + 1 + (size_t)n_kv;
}

/* Offsets of every array in the scratch, in carving order; returns the total. */
#define D2O_N_ARRAYS 14
static size_t d2o_layout(int cap, int n_kv, int hd, int move_slots, size_t off[D2O_N_ARRAYS]) {
    size_t c = (size_t)cap, o = 0;
    size_t sz[D2O_N_ARRAYS] = {c * 4, c, c * 4, c * 4, c * 4, c * 4, c * 4, c * 4, (c + 1) * 4,
                               c * 4, 4 * 4, 2 * 4,
                               (size_t)move_slots * d2o_slot_words(n_kv, hd) * 4, c * 4};
    for (int i = 0; i < D2O_N_ARRAYS; i++) {
        off[i] = o;
        o += d2o_align(sz[i]);
    }
    return o;
}

static bool d2o_shape_ok(int cap, int n_kv, int hd, int move_slots) {
    return cap > 0 && cap <= (INT_MAX - 1) / 2 && n_kv > 0 && n_kv <= 256 && hd > 0 &&
           hd % 2 == 0 && hd <= KERN_MAX_HEAD_DIM && move_slots > 0 &&
           move_slots <= (1 << 20);
}

size_t kern_d2o_scratch_bytes(int cap, int n_kv_heads, int head_dim, int move_slots) {
    if (!d2o_shape_ok(cap, n_kv_heads, head_dim, move_slots)) return 0;
    size_t off[D2O_N_ARRAYS];
    return d2o_layout(cap, n_kv_heads, head_dim, move_slots, off);
}

int kern_d2o_ws_init(kern_d2o_ws *ws, void *scratch, size_t bytes, int cap, int n_kv_heads,
                     int head_dim, int move_slots) {
    if (!ws || !scratch || ((uintptr_t)scratch & 255u)) return D2_EINVAL;
    if (!d2o_shape_ok(cap, n_kv_heads, head_dim, move_slots)) return D2_EINVAL;
    size_t off[D2O_N_ARRAYS];
    if (bytes < d2o_layout(cap, n_kv_heads, head_dim, move_slots, off)) return D2_EINVAL;
    char *b = (char *)scratch;
    ws->score = (float *)(b + off[0]);
    ws->keep = (uint8_t *)(b + off[1]);
    ws->rank = (int32_t *)(b + off[2]);
    ws->kept = (int32_t *)(b + off[3]);
    ws->ev = (int32_t *)(b + off[4]);
    ws->tgt = (int32_t *)(b + off[5]);
    ws->sim = (float *)(b + off[6]);
    ws->gcnt = (int32_t *)(b + off[7]);
    ws->gstart = (int32_t *)(b + off[8]);
    ws->glist = (int32_t *)(b + off[9]);
    ws->counts = (int32_t *)(b + off[10]);
    ws->stat = (float *)(b + off[11]);
    ws->move = (uint32_t *)(b + off[12]);
    ws->pooled = (float *)(b + off[13]);
    ws->cap = cap;
    ws->n_kv_heads = n_kv_heads;
    ws->head_dim = head_dim;
    ws->move_slots = move_slots;
    return D2_OK;
}

/* Checks shared by the entries: the plan fits the workspace and the view
 * matches the workspace's shape. */
static bool d2o_args_ok(const kern_d2o_ws *ws, const kern_d2o_plan *p) {
    return ws && p && p->n >= 0 && p->n <= ws->cap && p->n_sink >= 0 && p->lim >= p->n_sink &&
           p->lim <= p->n && p->n_cand == p->lim - p->n_sink && p->n_heavy >= 0 &&
           p->n_heavy <= p->n_cand && p->n_kept == p->n - p->lim + p->n_sink + p->n_heavy &&
           p->n_evicted == p->n - p->n_kept;
}

static bool d2o_view_ok(const kern_d2o_ws *ws, const kern_d2o_pages *kv) {
    return kv->k && kv->v && kv->page_tokens > 0 && kv->n_kv_heads == ws->n_kv_heads &&
           kv->head_dim == ws->head_dim;
}

static unsigned d2o_blocks(int64_t n, int per) {
    int64_t b = (n + per - 1) / per;
    return (unsigned)(b < 1 ? 1 : b);
}

/* ---- device helpers ------------------------------------------------------------- */

/* Byte offset-free address of logical slot i: its global slot number. */
__device__ __forceinline__ size_t d2o_slot(const int32_t *tab, int pt, int i) {
    return (size_t)tab[i / pt] * (size_t)pt + (size_t)(i % pt);
}

/* Exclusive prefix sum of v over the block in thread order; *total gets the
 * block's sum. sh: 33 ints of shared memory. All threads must call it. */
static __device__ int d2o_block_scan(int v, int *sh, int *total) {
    int lane = threadIdx.x % KERN_WARP, warp = threadIdx.x / KERN_WARP;
    int n_warps = (blockDim.x + KERN_WARP - 1) / KERN_WARP;
    int x = v;
#pragma unroll
    for (int o = 1; o < KERN_WARP; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads(); /* sh may still be read by a previous call */
    if (lane == KERN_WARP - 1) sh[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < n_warps ? sh[lane] : 0, t = w;
#pragma unroll
        for (int o = 1; o < KERN_WARP; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, t, o);
            if (lane >= o) t += y;
        }
        sh[lane] = t - w; /* exclusive warp offsets */
        if (lane == KERN_WARP - 1) sh[32] = t;
    }
    __syncthreads();
    *total = sh[32];
    return sh[warp] + x - v;
}

/* Sort key: ascending key = descending score; -0 and +0 are equal. */
__device__ __forceinline__ uint32_t d2o_desc_key(float f) {
    if (f == 0.0f) f = 0.0f;
    uint32_t u = __float_as_uint(f);
    uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ~ord;
}

/* ---- 1. scores ------------------------------------------------------------------ */

static __global__ void d2o_scores_kernel(float *out, uint8_t *keep, const float *score,
                                  const int32_t *tab, int pt, int n_kv, int n, int ns, int lim) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float *sc = score + d2o_slot(tab, pt, i) * (size_t)n_kv;
    float acc = 0.0f;
    for (int g = 0; g < n_kv; g++) acc = __fadd_rn(acc, sc[g]);
    out[i] = acc;
    keep[i] = (uint8_t)(i < ns || i >= lim);
}

int kern_d2o_scores(const kern_d2o_ws *ws, kern_d2o_pages kv, const int32_t *block_tab,
                    const kern_d2o_plan *p, kern_stream s) {
    KERN_REQUIRE(d2o_args_ok(ws, p) && d2o_view_ok(ws, &kv) && kv.score && block_tab);
    if (p->n == 0) return D2_OK;
    d2o_scores_kernel<<<d2o_blocks(p->n, 256), 256, 0, s>>>(
        ws->score, ws->keep, kv.score, block_tab, kv.page_tokens, kv.n_kv_heads, p->n,
        p->n_sink, p->lim);
    KERN_LAUNCH_CHECK("d2o_scores_kernel");
    return D2_OK;
}

/* ---- 1b. SnapKV / PyramidKV pooling ------------------------------------------------ */

#define D2O_POOL_K 5 /* SNAP_POOL_K of engine/kvcomp.c */

/* out[i] = mean of in[a..b], a = max(i - 2, 0), b = min(i + 2, n - 1), summed
 * in order without contraction: bit-identical to eng_kv_pool_scores. */
static __global__ void d2o_pool_kernel(float *out, const float *in, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int half = D2O_POOL_K / 2;
    int a = i - half < 0 ? 0 : i - half, b = i + half >= n ? n - 1 : i + half;
    float s = 0.0f;
    for (int j = a; j <= b; j++) s = __fadd_rn(s, in[j]);
    out[i] = __fdiv_rn(s, (float)(b - a + 1));
}

static __global__ void d2o_copy_kernel(float *out, const float *in, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = in[i];
}

int kern_d2o_pool_scores(const kern_d2o_ws *ws, const kern_d2o_plan *p, kern_stream s) {
    KERN_REQUIRE(d2o_args_ok(ws, p));
    if (p->n == 0) return D2_OK;
    d2o_pool_kernel<<<d2o_blocks(p->n, 256), 256, 0, s>>>(ws->pooled, ws->score, p->n);
    KERN_LAUNCH_CHECK("d2o_pool_kernel");
    d2o_copy_kernel<<<d2o_blocks(p->n, 256), 256, 0, s>>>(ws->score, ws->pooled, p->n);
    KERN_LAUNCH_CHECK("d2o_copy_kernel");
    return D2_OK;
}

/* ---- 2. selection + index lists ----------------------------------------------------- */

static __global__ void __launch_bounds__(D2O_SEL_THREADS)
d2o_select_kernel(const float *score, uint8_t *keep, int32_t *rank, int32_t *kept, int32_t *ev,
                  int32_t *counts, int n, int ns, int lim, int nh) {
    __shared__ unsigned hist[256];
    __shared__ int sh[33];
    __shared__ uint32_t s_prefix;
    __shared__ int s_k, s_first_gap;
    const int tid = threadIdx.x, bd = blockDim.x;
    const int nc = lim - ns;
    if (nh >= nc) {
        for (int i = ns + tid; i < lim; i += bd) keep[i] = 1;
    } else if (nh > 0) {
        /* radix select of the nh-th smallest key, most significant byte first */
        uint32_t prefix = 0, mask = 0;
        int k = nh;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = tid; b < 256; b += bd) hist[b] = 0;
            __syncthreads();
            for (int i = ns + tid; i < lim; i += bd) {
                uint32_t key = d2o_desc_key(score[i]);
                if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                int cum = 0;
                for (int d = 0; d < 256; d++) {
                    if (cum + (int)hist[d] >= k) {
                        s_prefix = prefix | ((uint32_t)d << shift);
                        s_k = k - cum;
                        break;
                    }
                    cum += (int)hist[d];
                }
            }
            __syncthreads();
            prefix = s_prefix;
            k = s_k;
            mask |= 255u << shift;
            __syncthreads(); /* everyone has read s_prefix / s_k */
        }
        /* keys below the threshold key, then the first k equal ones by slot */
        int run = 0;
        for (int base = ns; base < lim; base += bd) {
            int i = base + tid, better = 0, eq = 0, tot;
            if (i < lim) {
                uint32_t key = d2o_desc_key(score[i]);
                better = key < prefix;
                eq = key == prefix;
            }
            int ex = d2o_block_scan(eq, sh, &tot);
            if (better || (eq && run + ex < k)) keep[i] = 1;
            run += tot;
        }
    }
    if (tid == 0) s_first_gap = n;
    __syncthreads(); /* keep complete and visible to the whole block */
    int run = 0;
    for (int base = 0; base < n; base += bd) {
        int i = base + tid, f = 0, tot;
        if (i < n) f = keep[i] != 0;
        int ex = d2o_block_scan(f, sh, &tot);
        if (i < n) {
            int r = run + ex;
            rank[i] = r;
            if (f) {
                kept[r] = i;
            } else {
                ev[i - r] = i;
                atomicMin(&s_first_gap, i);
            }
        }
        run += tot;
    }
    __syncthreads();
    if (tid == 0) {
        counts[0] = run;
        counts[1] = s_first_gap;
        counts[2] = 0;
        counts[3] = n - run;
    }
}

int kern_d2o_select(const kern_d2o_ws *ws, const kern_d2o_plan *p, kern_stream s) {
    KERN_REQUIRE(d2o_args_ok(ws, p));
    d2o_select_kernel<<<1, D2O_SEL_THREADS, 0, s>>>(ws->score, ws->keep, ws->rank, ws->kept,
                                                     ws->ev, ws->counts, p->n, p->n_sink, p->lim,
                                                     p->n_heavy);
    KERN_LAUNCH_CHECK("d2o_select_kernel");
    return D2_OK;
}

/* ---- 3. cosine matching ------------------------------------------------------------ */

/* Dynamic shared memory of the matching kernel for a padded head_dim. */
static size_t d2o_match_smem(int hdp) {
    return (size_t)(D2O_TE + D2O_TC) * (size_t)hdp * 2   /* bf16 tiles */
           + (size_t)D2O_TE * D2O_TC * 4                 /* one head's products */
           + (size_t)D2O_TE * (D2O_TC + 1) * 4           /* sum over heads */
           + (size_t)(D2O_TE + D2O_TC) * 4;              /* inverse norms */
}

/* Grid: one CTA per 32 evicted slots. Per tile of 64 kept slots and per kv
 * head g: stage both heads' keys in shared memory (zero padded to hdp, a
 * multiple of 16), compute the inverse norms, multiply on tensor cores
 * (E[32 x hdp] . C[64 x hdp]^T), and add dot * inv_e * inv_c into the tile's
 * fp32 sum; after the last head, threads 0..31 update their row's best. */
static __global__ void __launch_bounds__(D2O_MATCH_THREADS)
d2o_match_kernel(int32_t *tgt_out, float *sim_out, const kern_bf16 *kb, const int32_t *tab,
                 const int32_t *ev, const int32_t *kept, int ne, int nk, int pt, int n_kv, int hd,
                 int hdp) {
    using namespace nvcuda;
    extern __shared__ __align__(128) unsigned char d2o_smem[];
    __nv_bfloat16 *sE = (__nv_bfloat16 *)d2o_smem;
    __nv_bfloat16 *sC = sE + (size_t)D2O_TE * hdp;
    float *sS = (float *)(sC + (size_t)D2O_TC * hdp);
    float *sAcc = sS + D2O_TE * D2O_TC;
    float *sInv = sAcc + D2O_TE * (D2O_TC + 1); /* [0, 32): evicted rows, [32, 96): kept */

    const int tid = threadIdx.x, warp = tid / KERN_WARP;
    const int e0 = blockIdx.x * D2O_TE;
    const size_t kvd = (size_t)n_kv * (size_t)hd;
    const int words = hdp / 2; /* 32-bit words per staged row */
    float best = -INFINITY;
    int best_c = -1;

    for (int c0 = 0; c0 < nk; c0 += D2O_TC) {
        for (int g = 0; g < n_kv; g++) {
            __syncthreads(); /* previous users of sE / sC / sS are done */
            for (int w = tid; w < (D2O_TE + D2O_TC) * words; w += blockDim.x) {
                int r = w / words, c = w % words;
                int idx = r < D2O_TE ? e0 + r : c0 + (r - D2O_TE);
                int lim = r < D2O_TE ? ne : nk;
                uint32_t val = 0;
                if (idx < lim && 2 * c < hd) {
                    int slot = r < D2O_TE ? ev[idx] : kept[idx];
                    const uint32_t *src = (const uint32_t *)(kb + d2o_slot(tab, pt, slot) * kvd +
                                                             (size_t)g * hd);
                    val = src[c];
                }
                ((uint32_t *)sE)[(size_t)r * words + c] = val; /* sC follows sE */
            }
            __syncthreads();
            if (tid < D2O_TE + D2O_TC) {
                const __nv_bfloat16 *row = sE + (size_t)tid * hdp;
                float ss = 0.0f;
                for (int d = 0; d < hd; d++) {
                    float x = __bfloat162float(row[d]);
                    ss = fmaf(x, x, ss);
                }
                float nn = sqrtf(ss);
                sInv[tid] = nn > 1e-30f ? 1.0f / nn : 0.0f;
            }
            {
                int fi = warp >> 1, fj = (warp & 1) * 2;
                wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc0, acc1;
                wmma::fill_fragment(acc0, 0.0f);
                wmma::fill_fragment(acc1, 0.0f);
                for (int kk = 0; kk < hdp; kk += 16) {
                    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
                    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b0, b1;
                    wmma::load_matrix_sync(a, sE + (size_t)fi * 16 * hdp + kk, hdp);
                    wmma::load_matrix_sync(b0, sC + (size_t)fj * 16 * hdp + kk, hdp);
                    wmma::load_matrix_sync(b1, sC + (size_t)(fj + 1) * 16 * hdp + kk, hdp);
                    wmma::mma_sync(acc0, a, b0, acc0);
                    wmma::mma_sync(acc1, a, b1, acc1);
                }
                wmma::store_matrix_sync(sS + fi * 16 * D2O_TC + fj * 16, acc0, D2O_TC,
                                        wmma::mem_row_major);
                wmma::store_matrix_sync(sS + fi * 16 * D2O_TC + (fj + 1) * 16, acc1, D2O_TC,
                                        wmma::mem_row_major);
            }
            __syncthreads();
            for (int x = tid; x < D2O_TE * D2O_TC; x += blockDim.x) {
                int r = x / D2O_TC, c = x % D2O_TC;
                float u = sS[x] * sInv[r] * sInv[D2O_TE + c];
                float *a = &sAcc[r * (D2O_TC + 1) + c];
                *a = g == 0 ? u : *a + u;
            }
        }
        __syncthreads();
        if (tid < D2O_TE) {
            float inv_h = 1.0f / (float)n_kv;
            int nc = nk - c0 < D2O_TC ? nk - c0 : D2O_TC;
            for (int c = 0; c < nc; c++) {
                float u = sAcc[tid * (D2O_TC + 1) + c] * inv_h;
                if (u > best) { /* strict: the first maximum in kept order stays */
                    best = u;
                    best_c = c0 + c;
                }
            }
        }
    }
    if (tid < D2O_TE && e0 + tid < ne) {
        tgt_out[e0 + tid] = best_c >= 0 ? kept[best_c] : -1;
        sim_out[e0 + tid] = best;
    }
}

int kern_d2o_match(const kern_d2o_ws *ws, kern_d2o_pages kv, const int32_t *block_tab,
                   const kern_d2o_plan *p, kern_stream s) {
    KERN_REQUIRE(d2o_args_ok(ws, p) && d2o_view_ok(ws, &kv) && block_tab);
    if (p->n_evicted == 0) return D2_OK;
    int hdp = (kv.head_dim + 15) / 16 * 16;
    size_t smem = d2o_match_smem(hdp);
    if (smem > 48 * 1024)
        KERN_CUDA_TRY(cudaFuncSetAttribute(d2o_match_kernel,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           (int)smem));
    d2o_match_kernel<<<d2o_blocks(p->n_evicted, D2O_TE), D2O_MATCH_THREADS, smem, s>>>(
        ws->tgt, ws->sim, kv.k, block_tab, ws->ev, ws->kept, p->n_evicted, p->n_kept,
        kv.page_tokens, kv.n_kv_heads, kv.head_dim, hdp);
    KERN_LAUNCH_CHECK("d2o_match_kernel");
    return D2_OK;
}

/* ---- 4. threshold -------------------------------------------------------------------- */

static __global__ void d2o_tau_kernel(float *stat, float *tau, const float *sim, int ne, int first,
                               float beta) {
    __shared__ double part[256];
    double acc = 0.0;
    for (int j = threadIdx.x; j < ne; j += blockDim.x) acc += (double)sim[j];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) part[threadIdx.x] += part[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float st = (float)(part[0] / ne);
        float t = first ? st
                        : __fadd_rn(__fmul_rn(__fsub_rn(1.0f, beta), *tau), __fmul_rn(beta, st));
        *tau = t;
        stat[0] = st;
        stat[1] = t;
    }
}

int kern_d2o_tau(const kern_d2o_ws *ws, const kern_d2o_plan *p, float *tau, int first,
                 float beta, kern_stream s) {
    KERN_REQUIRE(d2o_args_ok(ws, p) && tau);
    if (p->n_evicted == 0) return D2_OK; /* the C code returns before tau too */
    d2o_tau_kernel<<<1, 256, 0, s>>>(ws->stat, tau, ws->sim, p->n_evicted, first, beta);
    KERN_LAUNCH_CHECK("d2o_tau_kernel");
    return D2_OK;
}

/* ---- 5. merge -------------------------------------------------------------------------- */

__device__ __forceinline__ bool d2o_passes(const int32_t *tgt, const float *sim, int j,
                                           float tau) {
    return tgt[j] >= 0 && sim[j] >= tau;
}

static __global__ void d2o_group_count_kernel(int32_t *gcnt, int32_t *counts, const int32_t *tgt,
                                       const float *sim, const int32_t *rank, const float *tau,
                                       int ne) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= ne || !d2o_passes(tgt, sim, j, *tau)) return;
    atomicAdd(&gcnt[rank[tgt[j]]], 1);
    atomicAdd(&counts[2], 1);
}

static __global__ void __launch_bounds__(D2O_SEL_THREADS)
d2o_group_scan_kernel(int32_t *gstart, const int32_t *gcnt, int nk) {
    __shared__ int sh[33];
    int run = 0;
    for (int base = 0; base < nk; base += blockDim.x) {
        int i = base + threadIdx.x, tot;
        int v = i < nk ? gcnt[i] : 0;
        int ex = d2o_block_scan(v, sh, &tot);
        if (i < nk) gstart[i] = run + ex;
        run += tot;
    }
    if (threadIdx.x == 0) gstart[nk] = run;
}

/* Leaves gcnt at zero for the next call. */
static __global__ void d2o_group_fill_kernel(int32_t *glist, int32_t *gcnt, const int32_t *gstart,
                                      const int32_t *tgt, const float *sim, const int32_t *rank,
                                      const float *tau, int ne) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= ne || !d2o_passes(tgt, sim, j, *tau)) return;
    int r = rank[tgt[j]];
    int at = atomicSub(&gcnt[r], 1) - 1;
    glist[gstart[r] + at] = j;
}

/* One CTA per kept rank; a rank with an empty group returns at once. */
static __global__ void __launch_bounds__(D2O_MERGE_THREADS)
d2o_merge_kernel(kern_bf16 *kb, kern_bf16 *vb, const int32_t *tab, const int32_t *kept,
                 const int32_t *ev, const float *sim, const int32_t *gstart,
                 const int32_t *glist, int pt, int kvd, int rule) {
    __shared__ int s_list[D2O_SORT_CAP];
    __shared__ float s_w[D2O_SORT_CAP];
    __shared__ float s_denom, s_wc;
    const int r = blockIdx.x, tid = threadIdx.x;
    const int b = gstart[r], g = gstart[r + 1] - b;
    if (g == 0) return;
    const bool small = g <= D2O_SORT_CAP;
    const bool norm = rule == KERN_D2O_MERGE_NORMALISED;
    if (small) {
        /* bitonic sort of the group (evicted list order = slot order) */
        int P = 1;
        while (P < g) P <<= 1;
        for (int i = tid; i < P; i += blockDim.x) s_list[i] = i < g ? glist[b + i] : INT_MAX;
        __syncthreads();
        for (int k = 2; k <= P; k <<= 1) {
            for (int jj = k >> 1; jj > 0; jj >>= 1) {
                for (int i = tid; i < P; i += blockDim.x) {
                    int x = i ^ jj;
                    if (x > i) {
                        bool up = (i & k) == 0;
                        int a = s_list[i], c = s_list[x];
                        if ((a > c) == up) {
                            s_list[i] = c;
                            s_list[x] = a;
                        }
                    }
                }
                __syncthreads();
            }
        }
    }
    if (tid == 0) {
        float denom;
        if (norm) {
            denom = D2O_SELF_E;
            for (int j = 0; j < g; j++) {
                int e = small ? s_list[j] : glist[b + j];
                denom = __fadd_rn(denom, expf(sim[e]));
            }
            s_wc = __fdiv_rn(D2O_SELF_E, denom);
        } else {
            denom = __fadd_rn(1.0f, (float)g);
            s_wc = __fdiv_rn(1.0f, denom);
        }
        s_denom = denom;
    }
    __syncthreads();
    const float denom = s_denom, wc = s_wc;
    if (small) {
        for (int j = tid; j < g; j += blockDim.x) {
            float u = sim[s_list[j]];
            s_w[j] = __fdiv_rn(norm ? expf(u) : u, denom);
        }
        __syncthreads();
    }
    const size_t tslot = d2o_slot(tab, pt, kept[r]) * (size_t)kvd;
    for (int d = tid; d < kvd; d += blockDim.x) {
        float ak = __fmul_rn(wc, kern_bf2f(kb[tslot + d]));
        float av = __fmul_rn(wc, kern_bf2f(vb[tslot + d]));
        for (int j = 0; j < g; j++) {
            int lj = small ? s_list[j] : glist[b + j];
            float we = small ? s_w[j] : __fdiv_rn(norm ? expf(sim[lj]) : sim[lj], denom);
            size_t es = d2o_slot(tab, pt, ev[lj]) * (size_t)kvd + (size_t)d;
            ak = __fadd_rn(ak, __fmul_rn(we, kern_bf2f(kb[es])));
            av = __fadd_rn(av, __fmul_rn(we, kern_bf2f(vb[es])));
        }
        kb[tslot + d] = kern_f2bf(ak);
        vb[tslot + d] = kern_f2bf(av);
    }
}

int kern_d2o_merge(const kern_d2o_ws *ws, kern_d2o_pages kv, const int32_t *block_tab,
                   const kern_d2o_plan *p, const float *tau, int rule, kern_stream s) {
    KERN_REQUIRE(d2o_args_ok(ws, p) && d2o_view_ok(ws, &kv) && block_tab && tau);
    KERN_REQUIRE(rule == KERN_D2O_MERGE_NORMALISED || rule == KERN_D2O_MERGE_CODE);
    int ne = p->n_evicted, nk = p->n_kept;
    if (ne == 0 || nk == 0) return D2_OK;
    KERN_CUDA_TRY(cudaMemsetAsync(ws->gcnt, 0, (size_t)nk * sizeof(int32_t), s));
    d2o_group_count_kernel<<<d2o_blocks(ne, 256), 256, 0, s>>>(ws->gcnt, ws->counts, ws->tgt,
                                                               ws->sim, ws->rank, tau, ne);
    KERN_LAUNCH_CHECK("d2o_group_count_kernel");
    d2o_group_scan_kernel<<<1, D2O_SEL_THREADS, 0, s>>>(ws->gstart, ws->gcnt, nk);
    KERN_LAUNCH_CHECK("d2o_group_scan_kernel");
    d2o_group_fill_kernel<<<d2o_blocks(ne, 256), 256, 0, s>>>(
        ws->glist, ws->gcnt, ws->gstart, ws->tgt, ws->sim, ws->rank, tau, ne);
    KERN_LAUNCH_CHECK("d2o_group_fill_kernel");
    d2o_merge_kernel<<<(unsigned)nk, D2O_MERGE_THREADS, 0, s>>>(
        kv.k, kv.v, block_tab, ws->kept, ws->ev, ws->sim, ws->gstart, ws->glist,
        kv.page_tokens, kv.n_kv_heads * kv.head_dim, rule);
    KERN_LAUNCH_CHECK("d2o_merge_kernel");
    return D2_OK;
}

/* ---- 6. compaction --------------------------------------------------------------------- */

/* One CTA per rank r of [r0, r1): staging row r - r0 gets kept[r]'s k, v,
 * pos and score words (skipped when kept[r] == r: nothing moves). */
static __global__ void d2o_gather_kernel(uint32_t *stage, const kern_bf16 *kb, const kern_bf16 *vb,
                                  const int32_t *pos, const float *score, const int32_t *tab,
                                  const int32_t *kept, int r0, int pt, int n_kv, int hd) {
    const int r = r0 + blockIdx.x, src = kept[r];
    if (src == r) return;
    const int half = n_kv * hd / 2; /* words of k (and of v) */
    const size_t ss = d2o_slot(tab, pt, src);
    uint32_t *row = stage + (size_t)blockIdx.x * (size_t)(2 * half + 1 + n_kv);
    const uint32_t *k32 = (const uint32_t *)kb + ss * half, *v32 = (const uint32_t *)vb + ss * half;
    for (int w = threadIdx.x; w < half; w += blockDim.x) {
        row[w] = k32[w];
        row[half + w] = v32[w];
    }
    if (threadIdx.x == 0 && pos) row[2 * half] = (uint32_t)pos[ss];
    if (score)
        for (int g = threadIdx.x; g < n_kv; g += blockDim.x)
            row[2 * half + 1 + g] = __float_as_uint(score[ss * n_kv + g]);
}

static __global__ void d2o_scatter_kernel(const uint32_t *stage, kern_bf16 *kb, kern_bf16 *vb,
                                   int32_t *pos, float *score, const int32_t *tab,
                                   const int32_t *kept, int r0, int pt, int n_kv, int hd) {
    const int r = r0 + blockIdx.x;
    if (kept[r] == r) return;
    const int half = n_kv * hd / 2;
    const size_t ds = d2o_slot(tab, pt, r);
    const uint32_t *row = stage + (size_t)blockIdx.x * (size_t)(2 * half + 1 + n_kv);
    uint32_t *k32 = (uint32_t *)kb + ds * half, *v32 = (uint32_t *)vb + ds * half;
    for (int w = threadIdx.x; w < half; w += blockDim.x) {
        k32[w] = row[w];
        v32[w] = row[half + w];
    }
    if (threadIdx.x == 0 && pos) pos[ds] = (int32_t)row[2 * half];
    if (score)
        for (int g = threadIdx.x; g < n_kv; g += blockDim.x)
            score[ds * n_kv + g] = __uint_as_float(row[2 * half + 1 + g]);
}

static __global__ void d2o_clear_tail_kernel(int32_t *pos, const int32_t *tab, int pt, int nk) {
    int i = nk + (int)threadIdx.x;
    if (i % pt == 0 || i >= (nk / pt + 1) * pt) return;
    pos[d2o_slot(tab, pt, i)] = -1;
}

int kern_d2o_compact(const kern_d2o_ws *ws, kern_d2o_pages kv, const int32_t *block_tab,
                     const kern_d2o_plan *p, kern_stream s) {
    KERN_REQUIRE(d2o_args_ok(ws, p) && d2o_view_ok(ws, &kv) && block_tab);
    KERN_REQUIRE(kv.page_tokens <= 1024);
    int nk = p->n_kept;
    if (p->n_evicted == 0) return D2_OK;
    for (int r0 = 0; r0 < nk; r0 += ws->move_slots) {
        int cnt = nk - r0 < ws->move_slots ? nk - r0 : ws->move_slots;
        d2o_gather_kernel<<<(unsigned)cnt, 128, 0, s>>>(ws->move, kv.k, kv.v, kv.pos, kv.score,
                                                        block_tab, ws->kept, r0, kv.page_tokens,
                                                        kv.n_kv_heads, kv.head_dim);
        KERN_LAUNCH_CHECK("d2o_gather_kernel");
        d2o_scatter_kernel<<<(unsigned)cnt, 128, 0, s>>>(ws->move, kv.k, kv.v, kv.pos, kv.score,
                                                         block_tab, ws->kept, r0, kv.page_tokens,
                                                         kv.n_kv_heads, kv.head_dim);
        KERN_LAUNCH_CHECK("d2o_scatter_kernel");
    }
    if (kv.pos && nk % kv.page_tokens != 0) {
        int blk = (kv.page_tokens + 31) / 32 * 32;
        d2o_clear_tail_kernel<<<1, blk, 0, s>>>(kv.pos, block_tab, kv.page_tokens, nk);
        KERN_LAUNCH_CHECK("d2o_clear_tail_kernel");
    }
    return D2_OK;
}
