/*
 * kernels/elementwise.cu — the memory-bound per-token ops of the forward
 * pass: embedding lookup, RMSNorm, RoPE, SwiGLU, residual add, and the KV
 * write that scatters new K/V rows into their pages. Also defines
 * kern_last_error() (the error record lives in kernels/common.cuh).
 *
 * Each op: a static __global__ kernel, a static launcher (grid/block), and the
 * extern "C" entry declared in kernels/kernels.h. Entries check shapes on the
 * host, never allocate, never synchronise, never log. Engine thread only.
 *
 * Numerics follow engine/ref/ref_cpu.c and engine/cpu/backend.c: fp32 math, the
 * RMSNorm sum of squares in fp32 (here a tree sum, so it differs from the
 * CPU's serial sum in the last bits), silu as g / (1 + expf(-g)), RoPE angles
 * (float)pos * inv_freq[i] with accurate sincosf (no fast math).
 */
#include "kernels/common.cuh"

/* ---- error record ---- */

extern "C" kern_error kern_last_error(void) {
    const kern_err_rec &r = kern__err_rec();
    kern_error e;
    e.stmt = r.stmt;
    e.func = r.func;
    e.file = r.file;
    e.line = r.line;
    e.code = r.code;
    e.msg = r.code ? cudaGetErrorString((cudaError_t)r.code) : "";
    return e;
}

/* ---- embedding ---- */

#define EMBED_THREADS 256

static __global__ void embed_kernel(void *out, kern_dtype out_dtype, const kern_bf16 *table,
                                    const int32_t *tokens, int dim, int vocab) {
    int t = blockIdx.x;
    int id = tokens[t];
    bool ok = id >= 0 && id < vocab;
    const kern_bf16 *row = table + (int64_t)(ok ? id : 0) * dim;
    int64_t base = (int64_t)t * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        kern_store(out, out_dtype, base + i, ok ? kern_bf2f(row[i]) : 0.0f);
}

static void embed_launch(void *out, kern_dtype out_dtype, const kern_bf16 *table,
                         const int32_t *tokens, int n_tok, int dim, int vocab, cudaStream_t s) {
    embed_kernel<<<n_tok, EMBED_THREADS, 0, s>>>(out, out_dtype, table, tokens, dim, vocab);
}

extern "C" int kern_embed(void *out, kern_dtype out_dtype, const kern_bf16 *table,
                          const int32_t *tokens, int n_tok, int dim, int vocab, kern_stream s) {
    KERN_REQUIRE(out && table && tokens && n_tok >= 0 && dim > 0 && vocab > 0);
    if (n_tok == 0) return D2_OK;
    embed_launch(out, out_dtype, table, tokens, n_tok, dim, vocab, s);
    KERN_LAUNCH_CHECK("embed_kernel");
    return D2_OK;
}

/* ---- RMSNorm ---- */

#define RMSNORM_THREADS 256

static __global__ void rmsnorm_kernel(void *out, kern_dtype out_dtype, const float *x,
                                      const kern_bf16 *w, int dim, float eps) {
    __shared__ float scratch[KERN_WARP];
    int64_t base = (int64_t)blockIdx.x * dim;
    const float *xr = x + base;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = kern_block_sum(ss, scratch);
    /* Every read of xr above happened before the barrier inside
     * kern_block_sum, so writing out in place (out == x) is safe. */
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        kern_store(out, out_dtype, base + i, xr[i] * inv * kern_bf2f(w[i]));
}

extern "C" int kern_rmsnorm(void *out, kern_dtype out_dtype, const float *x, const kern_bf16 *w,
                            int n_rows, int dim, float eps, kern_stream s) {
    KERN_REQUIRE(out && x && w && n_rows >= 0 && dim > 0);
    KERN_REQUIRE(out_dtype == KERN_F32 || (const void *)out != (const void *)x);
    if (n_rows == 0) return D2_OK;
    rmsnorm_kernel<<<n_rows, RMSNORM_THREADS, 0, s>>>(out, out_dtype, x, w, dim, eps);
    KERN_LAUNCH_CHECK("rmsnorm_kernel");
    return D2_OK;
}

/* ---- RoPE ---- */

#define ROPE_THREADS 256

/* One thread per (token, head, pair). */
static __global__ void rope_kernel(float *x, const int32_t *pos, const float *inv_freq,
                                   int n_tok, int n_heads, int head_dim, int tok_stride,
                                   int neox) {
    int half = head_dim / 2;
    int64_t n = (int64_t)n_tok * n_heads * half;
    int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    int i = (int)(idx % half);
    int64_t th = idx / half;
    int h = (int)(th % n_heads);
    int t = (int)(th / n_heads);
    float *xh = x + (int64_t)t * tok_stride + (int64_t)h * head_dim;
    int a = neox ? i : 2 * i;
    int b = neox ? i + half : 2 * i + 1;
    float ang = (float)pos[t] * inv_freq[i];
    float sn, cs;
    sincosf(ang, &sn, &cs);
    float x0 = xh[a], x1 = xh[b];
    xh[a] = x0 * cs - x1 * sn;
    xh[b] = x0 * sn + x1 * cs;
}

extern "C" int kern_rope(float *x, const int32_t *pos, const float *inv_freq, int n_tok,
                         int n_heads, int head_dim, int tok_stride, int neox, kern_stream s) {
    KERN_REQUIRE(x && pos && inv_freq && n_tok >= 0 && n_heads > 0);
    KERN_REQUIRE(head_dim > 0 && head_dim % 2 == 0 && tok_stride >= n_heads * head_dim);
    int64_t n = (int64_t)n_tok * n_heads * (head_dim / 2);
    if (n == 0) return D2_OK;
    int64_t blocks = (n + ROPE_THREADS - 1) / ROPE_THREADS;
    KERN_REQUIRE(blocks <= 0x7fffffff);
    rope_kernel<<<(unsigned)blocks, ROPE_THREADS, 0, s>>>(x, pos, inv_freq, n_tok, n_heads,
                                                          head_dim, tok_stride, neox);
    KERN_LAUNCH_CHECK("rope_kernel");
    return D2_OK;
}

/* ---- SwiGLU ---- */

#define SWIGLU_THREADS 256

/* Threads per block of a row op over n columns: n rounded up to a warp,
 * at most max (short rows do not launch mostly idle blocks). */
static unsigned row_threads(int n, int max) {
    int t = (n + KERN_WARP - 1) / KERN_WARP * KERN_WARP;
    return (unsigned)(t < max ? t : max);
}

/* grid (row, column block): rows on x, which holds 2^31 - 1 of them. */
static __global__ void swiglu_kernel(void *out, kern_dtype out_dtype, const float *gate,
                                     const float *up, int ff, int row_stride) {
    int r = blockIdx.x;
    int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= ff) return;
    int64_t in = (int64_t)r * row_stride + i;
    float g = gate[in];
    float v = g / (1.0f + expf(-g)) * up[in];
    kern_store(out, out_dtype, (int64_t)r * ff + i, v);
}

extern "C" int kern_swiglu(void *out, kern_dtype out_dtype, const float *gate, const float *up,
                           int n_rows, int ff, int row_stride, kern_stream s) {
    KERN_REQUIRE(out && gate && up && n_rows >= 0 && ff > 0 && row_stride >= ff);
    /* In place only when the output rows coincide with gate's rows. */
    KERN_REQUIRE((const void *)out != (const void *)gate ||
                 (out_dtype == KERN_F32 && row_stride == ff));
    if (n_rows == 0) return D2_OK;
    unsigned nt = row_threads(ff, SWIGLU_THREADS);
    KERN_REQUIRE((ff + nt - 1) / nt <= 65535);
    dim3 grid((unsigned)n_rows, (ff + nt - 1) / nt);
    swiglu_kernel<<<grid, nt, 0, s>>>(out, out_dtype, gate, up, ff, row_stride);
    KERN_LAUNCH_CHECK("swiglu_kernel");
    return D2_OK;
}

/* ---- residual add ---- */

#define ADD_THREADS 256
#define ADD_MAX_BLOCKS 4096

static __global__ void add_kernel(float *x, const float *y, int64_t n) {
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] += y[i];
}

extern "C" int kern_add(float *x, const float *y, int64_t n, kern_stream s) {
    KERN_REQUIRE(x && y && n >= 0);
    if (n == 0) return D2_OK;
    int64_t blocks = (n + ADD_THREADS - 1) / ADD_THREADS;
    if (blocks > ADD_MAX_BLOCKS) blocks = ADD_MAX_BLOCKS;
    add_kernel<<<(unsigned)blocks, ADD_THREADS, 0, s>>>(x, y, n);
    KERN_LAUNCH_CHECK("add_kernel");
    return D2_OK;
}

/* ---- KV write ---- */

#define KVW_THREADS 256

/* grid (token, element block): threads cover the token's n_kv_heads*head_dim
 * elements; tokens on x, which holds 2^31 - 1 of them. */
static __global__ void kv_write_kernel(kern_bf16 *k_pages, kern_bf16 *v_pages,
                                       int32_t *pos_pages, float *score, const float *k_new,
                                       const float *v_new, int tok_stride,
                                       const int32_t *tok_pos, const int32_t *page_of,
                                       const int32_t *slot_of, int n_kv_heads, int head_dim,
                                       int page_tokens) {
    int t = blockIdx.x;
    int e = blockIdx.y * blockDim.x + threadIdx.x;
    int kvd = n_kv_heads * head_dim;
    if (e >= kvd) return;
    int64_t slot = (int64_t)page_of[t] * page_tokens + slot_of[t];
    int64_t src = (int64_t)t * tok_stride + e;
    k_pages[slot * kvd + e] = kern_f2bf(k_new[src]);
    v_pages[slot * kvd + e] = kern_f2bf(v_new[src]);
    if (e == 0) pos_pages[slot] = tok_pos[t];
    if (score && e < n_kv_heads) score[slot * n_kv_heads + e] = 0.0f;
}

extern "C" int kern_kv_write(kern_bf16 *k_pages, kern_bf16 *v_pages, int32_t *pos_pages,
                             float *score, const float *k_new, const float *v_new,
                             int tok_stride, const int32_t *tok_pos, const int32_t *page_of,
                             const int32_t *slot_of, int n_tok, int n_kv_heads, int head_dim,
                             int page_tokens, kern_stream s) {
    KERN_REQUIRE(k_pages && v_pages && pos_pages && k_new && v_new && tok_pos && page_of &&
                 slot_of);
    KERN_REQUIRE(n_tok >= 0 && n_kv_heads > 0 && head_dim > 0 &&
                 page_tokens > 0 && tok_stride >= n_kv_heads * head_dim);
    if (n_tok == 0) return D2_OK;
    int kvd = n_kv_heads * head_dim;
    unsigned nt = row_threads(kvd, KVW_THREADS);
    KERN_REQUIRE((kvd + nt - 1) / nt <= 65535);
    dim3 grid((unsigned)n_tok, (kvd + nt - 1) / nt);
    kv_write_kernel<<<grid, nt, 0, s>>>(k_pages, v_pages, pos_pages, score, k_new,
                                                 v_new, tok_stride, tok_pos, page_of, slot_of,
                                                 n_kv_heads, head_dim, page_tokens);
    KERN_LAUNCH_CHECK("kv_write_kernel");
    return D2_OK;
}
