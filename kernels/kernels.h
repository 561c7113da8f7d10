/*
 * kernels/kernels.h — the plain C interface of the CUDA kernels (public
 * header of kernels/). Included from C11 (engine/) and from the .cu files.
 *
 * Every entry here is an extern "C" function defined in kernels/<op>.cu. The
 * .cu file holds the static __global__ kernel(s), a static launcher that picks
 * grid and block, and this entry. Entries:
 *   - check their integer arguments on the host and return D2_EINVAL (nothing
 *     launched) when a shape is out of the supported range;
 *   - enqueue work on the given stream and return at once: they never
 *     allocate, never synchronise and never log;
 *   - check cudaGetLastError() after each launch and return D2_ECUDA when a
 *     launch failed; kern_last_error() then names the failed statement. A
 *     fault inside a kernel (illegal address) shows up later, at the caller's
 *     next synchronising call, and poisons the context (see style-anchors
 *     (b)4: log, abort, let systemd restart).
 * Which thread: the engine thread, which owns the CUDA context and streams.
 *
 * Dtypes: weights and KV pages are bf16 (kern_bf16 = the raw 16 bits of a
 * bfloat16, i.e. the top half of an IEEE float). Activations are fp32 unless
 * a parameter says otherwise; every reduction accumulates in fp32.
 * Shapes are written row-major, outermost first, as in kvpool/kvpool.h.
 * All pointers are device pointers unless marked "host".
 *
 * Paged KV layout (the CUDA twin of the CPU pool, kvpool/kvpool.h):
 *   k, v   : bf16  [n_pages][page_tokens][n_kv_heads][head_dim]
 *   pos    : int32 [n_pages][page_tokens]            (-1 = empty slot)
 *   score  : fp32  [n_pages][page_tokens][n_kv_heads] (D2O accumulated attention)
 * A (seq, layer) block table lists page ids; logical slot i lives in page
 * table[i / page_tokens], slot i % page_tokens; slots 0..len-1 are live.
 * Keys are stored after RoPE, and a slot's pos is the position RoPE used.
 */
#ifndef D2_KERNELS_H
#define D2_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* common/status.h is C11 and spells d2_assert_fail's attribute _Noreturn,
 * which C++ lacks: .cu files (nvcc, C++17) get the C++ spelling. */
#if defined(__cplusplus) && !defined(_Noreturn)
#define _Noreturn [[noreturn]]
#endif
#include "common/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A CUDA stream without including CUDA headers: cudaStream_t is
 * `struct CUstream_st *`, so a cudaStream_t converts implicitly. NULL is the
 * legacy default stream. */
typedef struct CUstream_st *kern_stream;

/* Raw bf16 bits. */
typedef uint16_t kern_bf16;

/* Output dtype of entries that can feed either fp32 code or a bf16 GEMM. */
typedef enum kern_dtype { KERN_F32 = 0, KERN_BF16 = 1 } kern_dtype;

/* Limits every entry checks (D2_EINVAL beyond them). */
#define KERN_MAX_HEAD_DIM 256 /* head_dim must be even and <= this */
#define KERN_MAX_GROUP 8      /* n_heads / n_kv_heads (GQA group) <= this */

/* The last CUDA failure seen by an entry on this thread: the statement text,
 * function, file, line and cudaGetErrorString() text. Borrowed, valid until
 * the next failure on this thread; "" fields when there was none. The engine
 * logs it after an entry returned D2_ECUDA. */
typedef struct kern_error {
    const char *stmt;
    const char *func;
    const char *file;
    int line;
    int code;          /* cudaError_t value */
    const char *msg;
} kern_error;
kern_error kern_last_error(void);

/* ---- elementwise ---- */

/* Embedding lookup: row t of out = table[tokens[t]] converted to out_dtype.
 *   out    : [n_tok][dim] fp32 or bf16 (out_dtype)
 *   table  : bf16 [vocab][dim]
 *   tokens : int32 [n_tok]
 * An id outside [0, vocab) gives a row of zeros (the caller validates ids;
 * the kernel only refuses to read out of bounds). */
int kern_embed(void *out, kern_dtype out_dtype, const kern_bf16 *table,
               const int32_t *tokens, int n_tok, int dim, int vocab, kern_stream s);

/* RMSNorm per row: out[r][i] = x[r][i] / sqrt(mean_i(x[r]^2) + eps) * w[i],
 * fp32 sum of squares (the same formula as engine/ref/ref_cpu.c).
 *   out : [n_rows][dim] fp32 or bf16 (out_dtype); may alias x when fp32
 *   x   : fp32 [n_rows][dim]
 *   w   : bf16 [dim] */
int kern_rmsnorm(void *out, kern_dtype out_dtype, const float *x, const kern_bf16 *w,
                 int n_rows, int dim, float eps, kern_stream s);

/* RoPE in place on n_heads heads of every token. The angle of pair i of a
 * token at position p is (float)p * inv_freq[i]; pairs are (x[i], x[i+hd/2])
 * when neox (rotate-half, Hugging Face Llama) and (x[2i], x[2i+1]) otherwise
 * (GGUF / Meta layout), rotated as
 *   x_a' = x_a cos - x_b sin,  x_b' = x_a sin + x_b cos   (eng_rope_apply).
 * inv_freq is built on the host once per model by eng_rope_inv_freq()
 * (engine/model/rope.h): base theta, and for rope_scaling "llama3" the per-pair
 * rescaling (low-frequency pairs / factor, smooth blend in between) is folded
 * into the table, so the kernel knows nothing about scaling schemes.
 *   x        : fp32 [n_tok][tok_stride floats]; head h of token t starts at
 *              x + t*tok_stride + h*head_dim (tok_stride >= n_heads*head_dim,
 *              so Q and K inside a fused QKV row can be rotated in place)
 *   pos      : int32 [n_tok] absolute positions
 *   inv_freq : fp32 [head_dim/2] */
int kern_rope(float *x, const int32_t *pos, const float *inv_freq, int n_tok, int n_heads,
              int head_dim, int tok_stride, int neox, kern_stream s);

/* SwiGLU: out[r][i] = silu(gate[r][i]) * up[r][i], silu(g) = g / (1 + e^-g).
 *   out  : [n_rows][ff] fp32 or bf16 (out_dtype); may alias gate when fp32
 *   gate : fp32 [n_rows][row_stride], columns 0..ff-1 used
 *   up   : fp32 [n_rows][row_stride], columns 0..ff-1 used
 * row_stride >= ff lets gate and up be the two halves of one fused GEMM
 * output (up = gate + ff, row_stride = 2*ff). out rows are dense (ff). */
int kern_swiglu(void *out, kern_dtype out_dtype, const float *gate, const float *up,
                int n_rows, int ff, int row_stride, kern_stream s);

/* Residual add: x[i] += y[i] for i < n.
 *   x : fp32 [n]   y : fp32 [n] (x and y do not overlap unless equal) */
int kern_add(float *x, const float *y, int64_t n, kern_stream s);

/* KV write: scatter the new K/V rows of n_tok tokens into their pages.
 * Token t goes to page page_of[t], slot slot_of[t] (from kvp_append on the
 * host, copied to the device with the step plan): its n_kv_heads*head_dim
 * key and value floats are rounded to bf16, pos[page][slot] = tok_pos[t],
 * and, when score is not NULL, score[page][slot][*] = 0 (a new slot starts
 * with no accumulated attention, as kvp_append does on the CPU).
 *   k_pages, v_pages : bf16 [n_pages][page_tokens][n_kv_heads][head_dim]
 *   pos_pages        : int32 [n_pages][page_tokens]
 *   score            : fp32 [n_pages][page_tokens][n_kv_heads] or NULL
 *   k_new, v_new     : fp32 [n_tok][tok_stride floats], the n_kv_heads*head_dim
 *                      floats of token t start at k_new + t*tok_stride
 *                      (K after RoPE)
 *   tok_pos, page_of, slot_of : int32 [n_tok]
 * Two tokens must not name the same (page, slot) in one call. */
int kern_kv_write(kern_bf16 *k_pages, kern_bf16 *v_pages, int32_t *pos_pages, float *score,
                  const float *k_new, const float *v_new, int tok_stride,
                  const int32_t *tok_pos, const int32_t *page_of, const int32_t *slot_of,
                  int n_tok, int n_kv_heads, int head_dim, int page_tokens, kern_stream s);

/* Slot moves of the KV pool's payload hook (kvpool/kvpool.h, kvp_payload.copy)
 * for copy on write and compaction: run r (int32 runs[5r..5r+4] = dst_page,
 * src_page, dst_slot, src_slot, n, as kvp_slot_run) copies n whole slots --
 * K, V, score and pos -- from (src_page, src_slot + j) to (dst_page,
 * dst_slot + j). start[r] = slots of runs 0..r-1 (int32, n_runs entries),
 * n_slots = all of them. Every source is read (into staging) before any
 * destination is written, so the result equals running the runs in order
 * only when no run reads a slot an earlier run of the call writes and no two
 * runs write one slot: the caller splits a hook call into such segments.
 *   k_pages, v_pages, score, pos_pages : the pool's payload (layout above)
 *   staging : kern_kv_copy_staging_bytes(n_slots, ...) bytes, 4-byte aligned
 * kern_kv_copy_staging_bytes: 0 for bad arguments. */
size_t kern_kv_copy_staging_bytes(int n_slots, int n_kv_heads, int head_dim);
int kern_kv_copy_runs(kern_bf16 *k_pages, kern_bf16 *v_pages, float *score, int32_t *pos_pages,
                      const int32_t *runs, const int32_t *start, int n_runs, int n_slots,
                      void *staging, int n_kv_heads, int head_dim, int page_tokens,
                      kern_stream s);

/* Patches of int32 arrays (a backend's resident block tables): for each of
 * the n patches p, hdr[3p..3p+2] = {dst_off, src_off, count}, copies
 * src[src_off .. src_off+count) to dst[dst_off .. dst_off+count). Patches
 * must not overlap in dst; hdr and src are device memory (typically one
 * uploaded plan). n == 0 launches nothing. */
int kern_patch_i32(int32_t *dst, const int32_t *src, const int32_t *hdr, int n, kern_stream s);

/* ---- attention ---- */

/* One layer's view of the paged pool, passed by value. */
typedef struct kern_kv_view {
    const kern_bf16 *k;    /* bf16 [n_pages][page_tokens][n_kv_heads][head_dim] */
    const kern_bf16 *v;    /* bf16 [n_pages][page_tokens][n_kv_heads][head_dim] */
    const int32_t *pos;    /* int32 [n_pages][page_tokens] */
    int page_tokens;
    int n_kv_heads;
    int head_dim;
} kern_kv_view;

/* Tokens of keys one decode split covers (flash-decoding): a CTA handles one
 * (split of KERN_DECODE_SPLIT slots of one sequence, kv head). */
#define KERN_DECODE_SPLIT 256

/* Host only: the decode work list of a batch, from the host copy of the
 * sequences' live lengths len[n_seq] (the step plan). split_base[b] = splits
 * of sequences 0..b-1 (split_base: n_seq + 1 entries, split_base[n_seq] =
 * *n_work); work[i] = the sequence of split i, sequences in order, a
 * sequence's splits contiguous (work: work_cap entries; ceil(len[b] /
 * KERN_DECODE_SPLIT) per sequence). The caller copies both to the device
 * with the plan. D2_EINVAL for a negative length or work_cap too small. */
int kern_attn_decode_plan(const int32_t *len, int n_seq, int32_t *split_base, int32_t *work,
                          int work_cap, int *n_work);

/* Bytes of device scratch kern_attn_decode needs for n_seq sequences and a
 * work list of n_work splits; with_scores: whether score will be non-NULL
 * (then the logits of every split are kept: 4 * n_heads * KERN_DECODE_SPLIT
 * bytes per split, bounded by the batch's live tokens, not by n_seq times
 * the longest sequence). */
size_t kern_attn_decode_workspace_bytes(int n_seq, int n_work, int n_heads, int head_dim,
                                        int with_scores);

/* Sliding-window attention (Mistral): with window > 0 a query at position p
 * sees only keys at positions > p - window, as the CPU backend
 * (engine/cpu/backend.c); window <= 0 = no window. Every attention entry
 * takes it. */

/* Paged decode attention: one query token per sequence, GQA.
 * For sequence b, query head h (kv head h / G, G = n_heads / n_kv_heads):
 *   logit_j = scale * q[b][h] . k_j       for live slots j < len[b]
 *   visible iff 0 <= pos_j <= q_pos[b], and pos_j > q_pos[b] - window when
 *   window > 0                            (others get probability 0)
 *   out[b][h] = sum_j softmax(logit)_j v_j  (zeros when nothing is visible)
 * Scores (the engine's contract, engine/backend.h step 4, for decode
 * tokens): sequence b "scores" when score != NULL and (score_from == NULL
 * or q_pos[b] >= score_from[b]) -- score_from is the eng_batch_seq field,
 * INT32_MAX for a sequence without want_scores. A scoring sequence adds,
 * for every live slot j, sum over the query heads h of its GQA group of
 * softmax_h(j) into score[page(j)][slot(j)][kv head] (D2O's accumulated
 * attention, d2o-spec §10.1/§10.2). Decode adds no column sums: a sequence
 * whose plan entry carries colsum (D2O before its prompt is compressed,
 * eng_kv_plan_seq) goes through kern_attn_prefill + kern_attn_prefill_scores
 * even for a single token.
 * Method: pass 1, a CTA per (work item, kv head) computes the G heads'
 * logits of its KERN_DECODE_SPLIT slots (kept in the workspace only for
 * scoring sequences), their local max, sum and unnormalised P.V; pass 2, a
 * CTA per (b, h) merges the sequence's splits into out and the row's lse;
 * pass 3 (only when score != NULL), a thread per (work item, kv head, slot)
 * of the scoring sequences adds the probabilities with atomicAdd (atomic
 * although engine/backend.h forbids two scoring sequences sharing a page in
 * one step). Each pass reads only what the previous wrote.
 *   out        : [n_seq][n_heads][head_dim] fp32 or bf16 (out_dtype)
 *   q          : fp32 [n_seq][q_stride floats]; head h of sequence b starts
 *                at q + b*q_stride + h*head_dim (already RoPE'd)
 *   kv         : the layer's pages (the new token's K/V already written)
 *   score      : fp32 [n_pages][page_tokens][n_kv_heads] or NULL
 *   score_from : int32 [n_seq] or NULL (every sequence scores)
 *   block_tab  : int32 [rows][tab_stride] page ids of the tables
 *   tab_row    : int32 [n_seq] the row of block_tab holding sequence b's
 *                table, or NULL (row b): lets a caller keep the tables
 *                resident, one row per sequence id, across steps
 *   len        : int32 [n_seq] live slots of each (sequence, layer), as given
 *                to kern_attn_decode_plan (a larger value is clamped to the
 *                splits the plan gave the sequence)
 *   q_pos      : int32 [n_seq] position of each query token
 *   split_base, work, n_work : kern_attn_decode_plan's output, on the device
 *                (n_work 0: no keys anywhere, zero outputs); work may be NULL:
 *                the kernels then find an item's sequence in split_base (a
 *                binary search), so a caller need not upload the list
 *   n_work_live: NULL, or a device int32 holding the work list's length,
 *                read by the kernels: then n_work (> 0) is only its
 *                capacity (the workspace is laid out for it, the grids are
 *                capped and stride over the live items; entries of work
 *                past the live length are never read), so a captured
 *                CUDA graph replays with a work list whose length changes
 *                between launches. Rows whose len is 0 get zero outputs.
 *   workspace  : kern_attn_decode_workspace_bytes(n_seq, n_work, n_heads,
 *                head_dim, score != NULL) bytes, 16-byte aligned */
int kern_attn_decode(void *out, kern_dtype out_dtype, const float *q, int q_stride,
                     kern_kv_view kv, float *score, const int32_t *score_from,
                     const int32_t *block_tab, int tab_stride, const int32_t *tab_row,
                     const int32_t *len, const int32_t *q_pos, const int32_t *split_base,
                     const int32_t *work, int n_work, const int32_t *n_work_live, int n_seq,
                     int n_heads, float scale, int window, void *workspace, kern_stream s);

/* Prefill attention for a chunk of n_q queries of one sequence against the
 * first n_kv live slots of its (layer) block table (which already holds the
 * chunk's own keys). FlashAttention-style: tiles of queries and keys, online
 * softmax, nothing of size n_q x n_kv in memory.
 *   visible(i, j) iff 0 <= pos_j <= q_pos[i]   (causal by positions), and
 *                 pos_j > q_pos[i] - window when window > 0
 *   out[i][h] = sum_j softmax_j(scale q_i.k_j) v_j  (zeros when none visible)
 *   lse[h][i] = log sum_j exp(scale q_i.k_j) over visible j (-inf when none)
 *   out       : [n_q][n_heads][head_dim] fp32 or bf16 (out_dtype)
 *   lse       : fp32 [n_heads][n_q] or NULL (needed by kern_attn_prefill_scores)
 *   q         : fp32 [n_q][q_stride floats], head h at q + i*q_stride + h*head_dim
 *   block_tab : int32 [ceil(n_kv / page_tokens)] page ids
 *   q_pos     : int32 [n_q] */
int kern_attn_prefill(void *out, kern_dtype out_dtype, float *lse, const float *q,
                      int q_stride, kern_kv_view kv, const int32_t *block_tab, int n_kv,
                      const int32_t *q_pos, int n_q, int n_heads, float scale, int window,
                      kern_stream s);

/* Prefill scores, the engine's contract (engine/backend.h step 4) for a
 * prefill chunk with want_scores: for every query i of the chunk with
 * q_pos[i] >= score_from (eng_batch_seq.score_from; 0 = every query) and
 * every live slot j < n_kv visible to it (as in kern_attn_prefill), with
 * p_h(i, j) = exp(scale q_i,h . k_j - lse[h][i]) the softmax probability:
 *   score[page(j)][slot(j)][kv head g] += sum over the query heads h of
 *       group g of sum_i p_h(i, j)                     (score != NULL)
 *   colsum[h][pos_j] += sum_i p_h(i, j) for 0 <= pos_j < colsum_len
 *                                                      (colsum != NULL)
 * Column sums are indexed by the key's position, as eng_batch_seq.colsum
 * [n_layers][n_heads][colsum_len]: pass colsum + layer * n_heads *
 * colsum_len. lse is what kern_attn_prefill wrote for the same chunk; each
 * chunk's lse is final, so chunked prefill calls this once per chunk and the
 * sums add up exactly. A CTA owns a tile of keys of one kv head and every
 * query head of its group, so the += need no atomics: the live slots of a
 * table must hold distinct positions (they do: kvp_append / kvp_compact),
 * and two sequences sharing pages must not score in one step
 * (engine/backend.h). No n_q x n_kv matrix is stored.
 *   score     : fp32 [n_pages][page_tokens][n_kv_heads] or NULL
 *   colsum    : fp32 [n_heads][colsum_len] or NULL
 *   q, q_stride, kv, block_tab, n_kv, q_pos, n_q, n_heads, scale, window:
 *               as in kern_attn_prefill
 *   lse       : fp32 [n_heads][n_q] */
int kern_attn_prefill_scores(float *score, float *colsum, int colsum_len, int score_from,
                             const float *q, int q_stride, const float *lse, kern_kv_view kv,
                             const int32_t *block_tab, int n_kv, const int32_t *q_pos, int n_q,
                             int n_heads, float scale, int window, kern_stream s);

/* ---- sampling ---- */

/* Greedy pick per row: out[r] = argmax_i logits[r][i], the lowest id among
 * equal maxima; NaN entries never win (a row of only NaN gives 0).
 *   out    : int32 [n_rows]
 *   logits : fp32 [n_rows][row_stride], columns 0..vocab-1 used */
int kern_argmax(int32_t *out, const float *logits, int n_rows, int vocab, int row_stride,
                kern_stream s);

/* A sampled pick per row: the token engine/sample.c's sampler draws from the
 * same logits with the same uniform number u (bit for bit: every value that
 * decides the token is computed in the host's order with the host's
 * roundings; engine/sample.h, "Device draws"). Rows holding NaN or +inf, or
 * only -inf, give -1 (the host sampler refuses them). Two cases, as the host:
 *   top_k == 0: p_i = exp_nonpos((x_i - max) * inv_temp), zeroed below min_p;
 *     the 64-token block sums (a fixed tree), their total in double, the
 *     target u * total, and the walk over blocks then tokens in id order;
 *   2 <= top_k <= KERN_SAMPLE_MAX_K (< vocab): the top_k best tokens (logit
 *     descending, id ascending), their weights; the shortest prefix holding
 *     top_p of their mass (top_p < 1), the min_p cut, and the walk best first.
 * Everything else (top_k 1 = greedy, larger top_k, top_p with top_k 0,
 * penalties, logprobs) is the host's; another top_k gives -1.
 *   out    : int32 [n]
 *   logits : fp32 [..][row_stride]; params[j].row names the row of draw j
 *   params : kern_sample_param [n] (device memory)
 *   ws     : fp32 [kern_sample_ws_floats(n, vocab)]
 * Cost: one CTA per draw; a full-vocabulary draw sums its block totals on one
 * thread (vocab / 64 double additions, in order, as the host does). */
#define KERN_SAMPLE_MAX_K 1024
typedef struct kern_sample_param {
    double u;          /* uniform in [0, 1), drawn by the host from the request's RNG */
    float inv_temp;    /* 1.0f / temperature, computed on the host as the sampler does */
    float top_p;       /* (0, 1]; 1 = off */
    float min_p;       /* [0, 1]; 0 = off */
    int32_t top_k;     /* 0 or 2..KERN_SAMPLE_MAX_K */
    int32_t row;       /* logits row */
    int32_t pad_;
} kern_sample_param;
size_t kern_sample_ws_floats(int n, int vocab);
int kern_sample(int32_t *out, const float *logits, int row_stride, int vocab,
                const kern_sample_param *params, int n, float *ws, kern_stream s);

/* Softmax per row with inverse temperature: out[r][i] = exp(t*x_i - M) / Z,
 * M = max_i t*x_i. lse (may be NULL) gets M + log Z, the log normaliser of t*x.
 *   out    : fp32 [n_rows][vocab] (may equal logits when row_stride == vocab)
 *   logits : fp32 [n_rows][row_stride]
 *   lse    : fp32 [n_rows] or NULL */
int kern_softmax(float *out, float *lse, const float *logits, int n_rows, int vocab,
                 int row_stride, float inv_temp, kern_stream s);

/* Log-softmax per row (for logprobs): out[r][i] = x_i - lse_r.
 *   out, lse, logits : as in kern_softmax (inverse temperature 1) */
int kern_log_softmax(float *out, float *lse, const float *logits, int n_rows, int vocab,
                     int row_stride, kern_stream s);

/* ---- d2o ---- */

/* D2O compression of one (sequence, layer) table on the device, step by step
 * as engine/kvcomp.c does it on the CPU (eng_kv_compress_layer; method in
 * shared/design/d2o-spec.md §3-§4, §9.3). Layer-uniform: one kept set per
 * table. Slot indices below are logical slots 0..n-1 of the table.
 * Order of calls (all on one stream; none synchronises):
 *   kern_d2o_plan_make   host only: the counts of eng_kv_select
 *   kern_d2o_scores      score[i] = sum over kv heads (g = 0..n_kv-1 in order)
 *                        of the pool's accumulated score; keep[i] = 1 for the
 *                        pinned slots (sinks, recent window), else 0
 *   kern_d2o_pool_scores SnapKV / PyramidKV only: score[i] = mean of the
 *                        scores i-2..i+2 (clamped to the table), as
 *                        eng_kv_pool_scores; those methods plan with n_sink 0
 *   kern_d2o_select      heavy hitters into keep, then rank / kept / ev lists
 *   kern_d2o_match       nearest kept slot of every evicted slot (cosine)
 *   kern_d2o_tau         mean similarity and the EMA threshold (device float)
 *   kern_d2o_merge       merges of the evicted slots with sim >= tau
 *   kern_d2o_compact     kept slots (k, v, pos, score) to the front, in order
 * What stays on the host (kvpool's job, as kvp_compact / kvp_unshare do):
 *   - before kern_d2o_merge / kern_d2o_compact: every page these write must
 *     be private (refcount 1): the pages holding slots first_gap..n_kept-1
 *     (first_gap = first evicted slot, counts[1]) and every merge target's
 *     page. Without reading counts/tgt back, unshare every shared page among
 *     the first ceil(n_kept / page_tokens) of the table.
 *   - after kern_d2o_compact: n_tokens = n_kept, pages from
 *     ceil(n_kept / page_tokens) on return to the free list (and the table).
 * Scores are assumed finite (NaN scores order arbitrarily, as in qsort). */

/* Mutable view of one layer's pages (layout at the top of this file). */
typedef struct kern_d2o_pages {
    kern_bf16 *k, *v;   /* bf16 [n_pages][page_tokens][n_kv_heads][head_dim] */
    int32_t *pos;       /* int32 [n_pages][page_tokens]; NULL: not moved */
    float *score;       /* fp32 [n_pages][page_tokens][n_kv_heads]; NULL only
                           when kern_d2o_scores is not called (then not moved) */
    int page_tokens;
    int n_kv_heads;
    int head_dim;       /* even, <= KERN_MAX_HEAD_DIM */
} kern_d2o_pages;

/* Counts of one selection (host), exactly as eng_kv_select computes them:
 * recent window [lim, n), sinks [0, n_sink), heavy hitters: the best
 * n_heavy of the n_cand candidates [n_sink, lim) by score (ties: lower slot). */
typedef struct kern_d2o_plan {
    int n;        /* live slots */
    int lim;      /* n - recent (clamped) */
    int n_sink;   /* min(n_sink, heavy, lim) */
    int n_heavy;  /* heavy - n_sink, clamped to [0, n_cand] */
    int n_cand;   /* lim - n_sink */
    int n_kept;   /* (n - lim) + n_sink + n_heavy */
    int n_evicted;
} kern_d2o_plan;
/* D2_EINVAL for n < 0. heavy includes the sinks (eng_kv_state's split). */
int kern_d2o_plan_make(kern_d2o_plan *p, int n, int n_sink, int heavy, int recent);

/* Device scratch of one compression, carved from one caller buffer. Arrays
 * of cap entries unless noted; all written by the calls above and readable
 * by the caller afterwards (e.g. for tests or inspection). */
typedef struct kern_d2o_ws {
    float *score;      /* token scores */
    uint8_t *keep;     /* 1 = kept */
    int32_t *rank;     /* rank[i] = kept slots before i (new index of a kept i) */
    int32_t *kept;     /* [n_kept] kept slots in order */
    int32_t *ev;       /* [n_evicted] evicted slots in order */
    int32_t *tgt;      /* [n_evicted] target slot of ev[j] (-1: none kept) */
    float *sim;        /* [n_evicted] mean over kv heads of the cosine to tgt */
    int32_t *gcnt;     /* [cap] merge group sizes (zero after kern_d2o_merge) */
    int32_t *gstart;   /* [cap + 1] merge group starts by kept rank */
    int32_t *glist;    /* [cap] evicted list indices grouped by target */
    int32_t *counts;   /* [4]: n_kept, first_gap, n_pass, n_evicted */
    float *stat;       /* [2]: mean similarity s_t, tau used */
    uint32_t *move;    /* [move_slots][slot words] compaction staging */
    float *pooled;     /* SnapKV / PyramidKV pooling scratch */
    int cap, n_kv_heads, head_dim, move_slots;
} kern_d2o_ws;

/* Bytes of scratch for tables of up to cap slots; move_slots (>= 1) bounds
 * the staging of one compaction batch (more = fewer launches; a slot takes
 * 4*n_kv_heads*head_dim + 4 + 4*n_kv_heads bytes). 0 for bad arguments. */
size_t kern_d2o_scratch_bytes(int cap, int n_kv_heads, int head_dim, int move_slots);
/* Carves ws out of scratch (device memory, 256-byte aligned, bytes >=
 * kern_d2o_scratch_bytes). Host only, nothing launched. D2_EINVAL. */
int kern_d2o_ws_init(kern_d2o_ws *ws, void *scratch, size_t bytes, int cap, int n_kv_heads,
                     int head_dim, int move_slots);

/* Step 1. block_tab: int32 page ids of the table (ceil(n / page_tokens)). */
int kern_d2o_scores(const kern_d2o_ws *ws, kern_d2o_pages kv, const int32_t *block_tab,
                    const kern_d2o_plan *p, kern_stream s);
/* Step 1b (SnapKV / PyramidKV): smooths ws->score in place with the 5-wide
 * mean of engine/kvcomp.c (eng_kv_pool_scores), bit-identical to it. */
int kern_d2o_pool_scores(const kern_d2o_ws *ws, const kern_d2o_plan *p, kern_stream s);
/* Step 2. Heavy hitters by a single-CTA 4-pass 8-bit radix select over the
 * candidates' scores (key order = descending score, -0 == +0), then the
 * first k of the threshold-equal ones by slot order; then rank, kept, ev and
 * counts[0..3] (n_pass = 0). */
int kern_d2o_select(const kern_d2o_ws *ws, const kern_d2o_plan *p, kern_stream s);
/* Step 3. For every evicted slot e, tgt = argmax over kept c of
 * u(e, c) = (1/n_kv) sum_g cos(k_e[g], k_c[g]) (first maximum in kept order
 * wins; a zero key head has cosine 0), on bf16 keys with fp32 math. Tiled on
 * tensor cores (bf16 wmma, fp32 accumulate): a CTA holds 32 evicted rows and
 * walks the kept slots 64 at a time; no n_evicted x n_kept matrix exists. */
int kern_d2o_match(const kern_d2o_ws *ws, kern_d2o_pages kv, const int32_t *block_tab,
                   const kern_d2o_plan *p, kern_stream s);
/* Step 4. s_t = mean of sim (fp64 sum); *tau = first ? s_t :
 * (1 - beta) * *tau + beta * s_t (no fused multiply-add, as the C code);
 * stat = {s_t, tau}. tau: device float of this (seq, layer). */
int kern_d2o_tau(const kern_d2o_ws *ws, const kern_d2o_plan *p, float *tau, int first,
                 float beta, kern_stream s);

#define KERN_D2O_MERGE_NORMALISED 0 /* w_c = e/D, w_e = exp(u_e)/D, D = e + sum exp(u_e) */
#define KERN_D2O_MERGE_CODE 1       /* (k_c + sum u_e k_e) / (1 + n) */

/* Step 5. Evicted ev[j] passes when tgt >= 0 and sim >= *tau; passed slots
 * are grouped by target (counting sort; a group of up to 1024 is sorted by
 * slot, so its sums run in the CPU's order and the result is deterministic;
 * larger groups sum in arrival order) and each target's k and v become the
 * rule's fp32 weighted sum, rounded to bf16. Slots that are no target are
 * never written. counts[2] = passed slots. */
int kern_d2o_merge(const kern_d2o_ws *ws, kern_d2o_pages kv, const int32_t *block_tab,
                   const kern_d2o_plan *p, const float *tau, int rule, kern_stream s);
/* Step 6. Kept slot kept[r] moves to slot r (k, v, and pos / score when not
 * NULL) for r < n_kept, in batches of move_slots ranks: a batch is gathered
 * into the staging buffer, then scattered (sources of later batches lie at
 * or beyond their rank, so no copy overlaps). Slots already in place are not
 * written. Then pos = -1 for slots n_kept.. of the last page. */
int kern_d2o_compact(const kern_d2o_ws *ws, kern_d2o_pages kv, const int32_t *block_tab,
                     const kern_d2o_plan *p, kern_stream s);

#ifdef __cplusplus
}
#endif

#endif
