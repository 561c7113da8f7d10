/*
 * tests/fuzz/fuzz_gguf.c — libFuzzer target for the GGUF reader and the
 * model binder on top of it (engine/model/gguf.c, engine/model/model.c).
 *
 * Each input is parsed as a GGUF image; when the header parses, every
 * metadata value is read through the typed getters and the model is bound
 * from the same buffer (with its tokenizer), touching one row of each bound
 * matrix so out-of-bounds views show up under ASan.
 * Build: see tests/fuzz/README. With -DD2_FUZZ_STANDALONE a main() replays
 * the files given as arguments (a corpus) instead of fuzzing.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "common/util.h"
#include "engine/model/gguf.h"
#include "engine/model/model.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void touch_kvs(const gguf_file *g) {
    for (uint64_t i = 0; i < g->n_kv; i++) {
        const gguf_kv *kv = &g->kvs[i];
        int64_t iv;
        double dv;
        bool bv;
        gguf_str sv;
        (void)gguf_kv_int(kv, &iv);
        (void)gguf_kv_float(kv, &dv);
        (void)gguf_kv_bool(kv, &bv);
        (void)gguf_kv_str(kv, &sv);
        if (kv->type != GGUF_T_ARRAY || kv->arr_n == 0) continue;
        if (kv->arr_type == GGUF_T_STRING) {
            gguf_str *s = malloc((size_t)kv->arr_n * sizeof *s);
            if (s) gguf_arr_strings(kv, s);
            free(s);
        } else {
            (void)gguf_arr_float(kv, kv->arr_n - 1);
            (void)gguf_arr_int(kv, 0);
        }
    }
}

static void touch_model(const eng_model *m) {
    const eng_model_config *c = &m->cfg;
    int64_t w = c->ffn_dim > c->dim ? c->ffn_dim : c->dim;
    if (c->n_heads * c->head_dim > w) w = (int64_t)c->n_heads * c->head_dim;
    float *row = malloc((size_t)w * sizeof *row);
    if (!row) return;
    eng_tensor_row_f32(&m->tok_embd, m->tok_embd.rows - 1, row);
    eng_tensor_row_f32(&m->output, m->output.rows - 1, row);
    for (int l = 0; l < c->n_layers; l++) {
        const eng_layer_weights *L = &m->layers[l];
        eng_tensor_row_f32(&L->wq, L->wq.rows - 1, row);
        eng_tensor_row_f32(&L->wo, L->wo.rows - 1, row);
        eng_tensor_row_f32(&L->w_down, L->w_down.rows - 1, row);
        eng_tensor_row_f32(&L->w_up, L->w_up.rows - 1, row);
    }
    free(row);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    d2_log_set_level(D2_LOG_OFF);
    gguf_file g;
    if (gguf_parse(data, size, "fuzz", &g) == D2_OK) {
        touch_kvs(&g);
        gguf_free(&g);
        eng_model *m = NULL;
        if (eng_model_load_gguf_buffer(data, size, "fuzz", true, &m) == D2_OK) {
            touch_model(m);
            eng_model_free(m);
        }
    }
    return 0;
}

#include "tests/fuzz/replay.h"
