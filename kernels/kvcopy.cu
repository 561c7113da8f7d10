/*
 * kernels/kvcopy.cu — kern_kv_copy_runs: the device half of the pool's payload
 * hook (kvpool/kvpool.h kvp_payload.copy) for the CUDA backend: moves whole
 * slots (K, V, score, pos) between pages for copy on write and compaction.
 * Contract in kernels/kernels.h. Callers: engine/cuda/ (engine thread).
 *
 * Method: one launch gathers every source slot of the runs into a staging
 * buffer, a second scatters the staging buffer to the destinations. That is
 * the sequential result of the runs as long as no run reads a slot an earlier
 * run of the same call writes and no two runs write the same slot; the caller
 * splits a hook call into such segments (engine/cuda/backend.c).
 *
 * Also kern_patch_i32: the changed entries of the backend's resident block
 * tables, applied from the step's uploaded plan (one CTA per patch).
 */
#include "kernels/common.cuh"

/* Words of one slot: K and V (kvd bf16 each = kvd/2 words each), n_kv fp32
 * scores, one int32 pos. */
static __device__ __forceinline__ int slot_words(int kvd, int n_kv) { return kvd + n_kv + 1; }

/* The run holding staged slot i: the last r with start[r] <= i. */
static __device__ __forceinline__ int find_run(const int32_t *start, int n_runs, int i) {
    int lo = 0, hi = n_runs - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (start[mid] <= i) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

/* dir 0: pages -> staging (sources); dir 1: staging -> pages (destinations). */
static __global__ void kv_copy_kernel(int dir, uint32_t *k, uint32_t *v, float *score,
                                      int32_t *pos, uint32_t *staging, const int32_t *runs,
                                      const int32_t *start, int n_runs, int kvd, int n_kv,
                                      int page_tokens) {
    int i = blockIdx.x; /* staged slot */
    int r = find_run(start, n_runs, i);
    const int32_t *run = runs + 5 * r; /* dst_page, src_page, dst_slot, src_slot, n */
    int j = i - start[r];
    int64_t page = dir == 0 ? run[1] : run[0];
    int64_t slot = (dir == 0 ? run[3] : run[2]) + j;
    int64_t s = page * page_tokens + slot;
    int kw = kvd / 2;
    uint32_t *st = staging + (int64_t)i * slot_words(kvd, n_kv);
    uint32_t *kp = k + s * kw, *vp = v + s * kw;
    float *sp = score + s * n_kv;
    for (int w = threadIdx.x; w < kw; w += blockDim.x) {
        if (dir == 0) {
            st[w] = kp[w];
            st[kw + w] = vp[w];
        } else {
            kp[w] = st[w];
            vp[w] = st[kw + w];
        }
    }
    for (int h = threadIdx.x; h < n_kv; h += blockDim.x) {
        if (dir == 0) st[kvd + h] = __float_as_uint(sp[h]);
        else sp[h] = __uint_as_float(st[kvd + h]);
    }
    if (threadIdx.x == 0) {
        if (dir == 0) st[kvd + n_kv] = (uint32_t)pos[s];
        else pos[s] = (int32_t)st[kvd + n_kv];
    }
}

extern "C" size_t kern_kv_copy_staging_bytes(int n_slots, int n_kv_heads, int head_dim) {
    if (n_slots < 0 || n_kv_heads <= 0 || head_dim <= 0 || head_dim % 2) return 0;
    return (size_t)n_slots * (size_t)(n_kv_heads * head_dim + n_kv_heads + 1) * 4u;
}

extern "C" int kern_kv_copy_runs(kern_bf16 *k_pages, kern_bf16 *v_pages, float *score,
                                 int32_t *pos_pages, const int32_t *runs, const int32_t *start,
                                 int n_runs, int n_slots, void *staging, int n_kv_heads,
                                 int head_dim, int page_tokens, kern_stream s) {
    KERN_REQUIRE(k_pages && v_pages && score && pos_pages && runs && start && staging);
    KERN_REQUIRE(n_runs >= 0 && n_slots >= 0 && n_kv_heads > 0 && head_dim > 0 &&
                 head_dim % 2 == 0 && page_tokens > 0);
    if (n_runs == 0 || n_slots == 0) return D2_OK;
    int kvd = n_kv_heads * head_dim;
    unsigned nt = kvd / 2 >= 128 ? 128u : 32u;
    for (int dir = 0; dir < 2; dir++) {
        kv_copy_kernel<<<(unsigned)n_slots, nt, 0, s>>>(
            dir, (uint32_t *)k_pages, (uint32_t *)v_pages, score, pos_pages, (uint32_t *)staging,
            runs, start, n_runs, kvd, n_kv_heads, page_tokens);
        KERN_LAUNCH_CHECK("kv_copy_kernel");
    }
    return D2_OK;
}

static __global__ void patch_i32_kernel(int32_t *dst, const int32_t *src, const int32_t *hdr) {
    const int32_t *h = hdr + 3 * (int64_t)blockIdx.x; /* dst_off, src_off, count */
    int32_t *d = dst + h[0];
    const int32_t *x = src + h[1];
    for (int i = threadIdx.x; i < h[2]; i += blockDim.x) d[i] = x[i];
}

extern "C" int kern_patch_i32(int32_t *dst, const int32_t *src, const int32_t *hdr, int n,
                              kern_stream s) {
    KERN_REQUIRE(n >= 0 && (n == 0 || (dst && src && hdr)));
    if (n == 0) return D2_OK;
    patch_i32_kernel<<<(unsigned)n, 64, 0, s>>>(dst, src, hdr);
    KERN_LAUNCH_CHECK("patch_i32_kernel");
    return D2_OK;
}
