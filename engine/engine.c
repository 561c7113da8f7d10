/*
 * engine/engine.c — the engine object: model + compute backend + KV pool (and
 * the backend's payload for it) + the shared sampler scratch, created in the
 * order the backend needs (engine/internal.h), and its getters. The drivers
 * (eng_run, eng_score) are in run.c, the step mechanism in step.c.
 *
 * Callers: create/destroy on any one thread (the daemon's main thread); the
 * getters from any thread (they read fields fixed at creation).
 */
#include "engine/engine.h"
#include "engine/internal.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "common/util.h"
#include "engine/backend.h"
#include "kvpool/kvpool.h"

/* The backend a config asks for, checked before anything is loaded: CUDA
 * needs a build with the CUDA backend (make CUDA=1: D2_EUNSUPPORTED without)
 * and a usable device (D2_ECUDA without); AUTO takes the GPU when there is
 * one, else the CPU. */
static int check_device(const eng_engine_config *cfg) {
    if (cfg->device == ENG_DEVICE_CPU || cfg->device == ENG_DEVICE_AUTO) return D2_OK;
    if (cfg->device != ENG_DEVICE_CUDA) return D2_EINVAL;
    int n = eng_cuda_device_count();
    if (n == D2_EUNSUPPORTED) {
        D2_ERROR("engine: device cuda: this build has no CUDA backend (build with make CUDA=1 "
                 "where nvcc is installed; or use --device cpu or auto)");
        return D2_EUNSUPPORTED;
    }
    if (n <= 0) {
        D2_ERROR("engine: device cuda: no CUDA device can be used (no GPU or no driver)");
        return D2_ECUDA;
    }
    return D2_OK;
}

int eng_engine_create(const eng_engine_config *cfg_in, eng_engine **out) {
    *out = NULL;
    int rc = check_device(cfg_in);
    if (rc != D2_OK) return rc;
    eng_model *m = NULL;
    rc = eng_model_load(cfg_in->model_path, true, &m);
    if (rc != D2_OK) return rc;
    return eng__engine_create_for(m, true, cfg_in, out);
}

/* Pool size in pages: kv_pages when given, else kv_mem_mb of payload (default:
 * enough for max_seqs full contexts, capped at 4096 MB for a host payload, and
 * at what the backend says it can hold: a GPU's memory left after weights and
 * activations, times --gpu-memory-utilization). */
static int64_t pool_pages(const eng_engine *e, const eng_engine_config *cfg, int page_tokens) {
    const eng_model_config *mc = &e->model->cfg;
    int64_t page_bytes = (int64_t)page_tokens * (int64_t)e->caps.kv_bytes_per_slot;
    if (cfg->kv_pages > 0) return cfg->kv_pages;
    int64_t mb = cfg->kv_mem_mb;
    if (mb <= 0) {
        int64_t need = (int64_t)e->max_seqs * mc->n_layers *
                       eng__pages_for(e->ctx_len, page_tokens) * page_bytes;
        mb = need / (1024 * 1024) + 1;
        /* host memory is shared with everything else; a device backend's
         * room (kv_bytes_avail, after weights and activations) is the cap */
        if (mb > 4096 && !e->caps.kv_on_device) mb = 4096;
    }
    int64_t bytes = mb * 1024 * 1024;
    if (e->caps.kv_bytes_avail > 0 && bytes > e->caps.kv_bytes_avail) {
        if (cfg->kv_mem_mb > 0)
            D2_WARN("engine: %lld MB of KV cache asked, the %s backend has room for %lld MB",
                    (long long)mb, e->caps.name, (long long)(e->caps.kv_bytes_avail >> 20));
        bytes = e->caps.kv_bytes_avail;
    }
    return bytes / page_bytes;
}

/* The backend the configuration names (see eng_engine_config.device). */
static int create_backend(eng_engine *e, const eng_engine_config *cfg, int page_tokens) {
    eng_backend_config bc = {
        .n_threads = cfg->n_threads,
        .max_batch_tokens = e->max_batch_tokens,
        .max_logit_rows = e->max_logit_rows,
        .max_seq_tokens = e->ctx_len,
        .page_tokens = page_tokens,
        .progress = cfg->progress,
        .progress_user = cfg->progress_user,
    };
    bool cuda = cfg->device == ENG_DEVICE_CUDA ||
                (cfg->device == ENG_DEVICE_AUTO && eng_cuda_device_count() > 0);
    if (cuda) {
        bc.device_id = 0;
        bc.gpu_memory_utilization = cfg->gpu_memory_utilization;
        bc.cuda_graphs = cfg->cuda_graphs;
        return eng_cuda_backend_create(e->model, &bc, &e->be);
    }
    return eng_cpu_backend_create(e->model, &bc, &e->be);
}

int eng__engine_create_for(eng_model *model, bool own_model, const eng_engine_config *cfg_in,
                           eng_engine **out) {
    *out = NULL;
    int rc = check_device(cfg_in);
    eng_engine *e = rc == D2_OK ? calloc(1, sizeof *e) : NULL;
    if (!e) {
        if (own_model) eng_model_free(model);
        return rc != D2_OK ? rc : D2_ENOMEM;
    }
    e->cfg = *cfg_in;
    e->model = model;
    e->own_model = own_model;
    const eng_model_config *mc = &e->model->cfg;
    e->ctx_len = cfg_in->ctx_len > 0 ? cfg_in->ctx_len : mc->max_ctx;
    if (e->ctx_len <= 0) e->ctx_len = 2048;
    e->max_seqs = cfg_in->max_seqs > 0 ? cfg_in->max_seqs : 64;
    e->max_batch_tokens = cfg_in->max_batch_tokens > 0 ? cfg_in->max_batch_tokens : 512;
    if (e->max_batch_tokens < e->max_seqs) e->max_batch_tokens = e->max_seqs;
    e->max_logit_rows = e->max_seqs > ENG_SCORE_CHUNK ? e->max_seqs : ENG_SCORE_CHUNK;
    int page_tokens = cfg_in->page_tokens > 0 ? cfg_in->page_tokens : 16;

    /* backend first: the pool is sized from its payload bytes per slot */
    rc = create_backend(e, cfg_in, page_tokens);
    if (rc != D2_OK) {
        eng_engine_destroy(e);
        return rc;
    }
    e->be->ops->caps(e->be, &e->caps);
    int64_t n_pages = pool_pages(e, cfg_in, page_tokens);
    kvp_config pc = {
        .n_layers = mc->n_layers,
        .n_kv_heads = mc->n_kv_heads,
        .head_dim = mc->head_dim,
        .page_tokens = page_tokens,
        .n_pages = n_pages,
        .max_seqs = e->max_seqs,
        .max_seq_tokens = e->ctx_len,
    };
    rc = kvp_create(&pc, &e->pool);
    if (rc != D2_OK) {
        D2_ERROR("engine: cannot reserve a KV pool of %lld pages: %s", (long long)n_pages,
                 d2_strerror(rc));
        eng_engine_destroy(e);
        return rc;
    }
    rc = e->be->ops->kv_attach(e->be, e->pool);
    if (rc != D2_OK) {
        D2_ERROR("engine: %s", e->be->ops->last_error(e->be));
        eng_engine_destroy(e);
        return rc;
    }
    rc = eng_sample_scratch_init(&e->sample_scratch, mc->vocab_size);
    if (rc != D2_OK) {
        eng_engine_destroy(e);
        return rc;
    }
    *out = e;
    return D2_OK;
}

void eng_engine_destroy(eng_engine *e) {
    if (!e) return;
    if (e->be) e->be->ops->destroy(e->be); /* before the pool its payload hook points into */
    eng_sample_scratch_free(&e->sample_scratch);
    kvp_destroy(e->pool);
    if (e->own_model) eng_model_free(e->model);
    free(e);
}

void eng_engine_prefault(eng_engine *e, void (*progress)(void *user, size_t done, size_t total), void *user) {
    const eng_model *m = e->model;
    size_t total = 0, done = 0, next_report = 0;
    for (int i = 0; i < m->n_maps; i++) total += m->maps[i].size;
    volatile uint8_t sink = 0;
    for (int i = 0; i < m->n_maps; i++) {
        const uint8_t *p = m->maps[i].data;
        for (size_t off = 0; off < m->maps[i].size; off += 4096) {
            sink ^= p[off];
            done += m->maps[i].size - off < 4096 ? m->maps[i].size - off : 4096;
            if (progress && done >= next_report) {
                progress(user, done, total);
                next_report = done + total / 100 + 1;
            }
        }
    }
    (void)sink;
    if (progress) progress(user, total, total);
}

int eng_engine_detach_weights(eng_engine *e, void (*progress)(void *user, size_t done, size_t total), void *user) {
    const eng_model *m = e->model;
    size_t total = 0, done = 0;
    for (int i = 0; i < m->n_maps; i++) total += m->maps[i].size;
    const size_t chunk = (size_t)64 << 20; /* a multiple of the page size: progress, and half the peak */
    for (int i = 0; i < m->n_maps; i++) {
        for (size_t off = 0; off < m->maps[i].size; off += chunk) {
            int rc = d2_mmap_detach(&m->maps[i], off, chunk);
            if (rc != D2_OK) return rc;
            done += m->maps[i].size - off < chunk ? m->maps[i].size - off : chunk;
            if (progress) progress(user, done, total);
        }
    }
    if (progress && total == 0) progress(user, 0, 0);
    return D2_OK;
}

const eng_model *eng_engine_model(const eng_engine *e) { return e->model; }
const eng_tokenizer *eng_engine_tokenizer(const eng_engine *e) { return e->model->tok; }
int eng_engine_ctx_len(const eng_engine *e) { return e->ctx_len; }
int eng_engine_max_batch_tokens(const eng_engine *e) { return e->max_batch_tokens; }

eng_pool_stats eng_engine_pool_stats(const eng_engine *e) {
    kvp_stats s = kvp_get_stats(e->pool);
    eng_pool_stats r = {s.pages_total, s.pages_free, kvp_get_config(e->pool)->page_tokens};
    return r;
}

const char *eng_engine_backend_name(const eng_engine *e) { return e->caps.name; }

bool eng_engine_kv_per_head(const eng_engine *e) { return e->caps.kv_per_head; }
