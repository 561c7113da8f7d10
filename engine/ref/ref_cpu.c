/*
 * engine/ref/ref_cpu.c — reference single-sequence forward (see ref_cpu.h).
 *
 * Deliberately plain: weights are dequantised one row at a time, every dot
 * product accumulates sequentially in f32, attention is two-pass softmax over
 * a contiguous cache. Speed is irrelevant; readability and obvious agreement
 * with the Llama / Qwen2 reference implementations is the point.
 */
#include "engine/model/rope.h"
#include "engine/ref/ref_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/status.h"
#include "common/util.h"

struct eng_ref_state {
    const eng_model *m;
    int max_ctx;
    int kv_dim, q_dim, max_in;
    float *x, *xb, *xb2, *q, *k, *v, *att_out, *hb, *hb2, *row, *inv_freq, *cosv, *sinv;
    float *kc, *vc;        /* [n_layers][max_ctx][kv_dim] */
    unsigned char *alive;  /* [n_layers][max_ctx] */
    float *att;            /* [n_layers][n_heads][max_ctx] */
    int last_pos;
};

/* Row r of t as f32. Kept local so the reference does not depend on the
 * loader's implementation (it also cross-checks it). */
static void ref_row_f32(const eng_tensor *t, int64_t r, float *out) {
    int64_t n = t->cols;
    switch (t->dtype) {
    case ENG_F32: {
        const float *p = (const float *)t->data + r * n;
        for (int64_t i = 0; i < n; i++) out[i] = p[i];
        break;
    }
    case ENG_F16: {
        const uint16_t *p = (const uint16_t *)t->data + r * n;
        for (int64_t i = 0; i < n; i++) out[i] = d2_f16_to_f32(p[i]);
        break;
    }
    case ENG_BF16: {
        const uint16_t *p = (const uint16_t *)t->data + r * n;
        for (int64_t i = 0; i < n; i++) out[i] = d2_bf16_to_f32(p[i]);
        break;
    }
    case ENG_Q8_0: {
        const uint8_t *p = (const uint8_t *)t->data + r * (n / 32) * 34;
        for (int64_t b = 0; b < n / 32; b++) {
            uint16_t dh;
            memcpy(&dh, p + b * 34, 2);
            float d = d2_f16_to_f32(dh);
            const int8_t *q = (const int8_t *)(p + b * 34 + 2);
            for (int j = 0; j < 32; j++) out[b * 32 + j] = d * (float)q[j];
        }
        break;
    }
    }
}

/* y[rows] = W x, sequential f32 accumulation. */
static void ref_matvec(eng_ref_state *s, const eng_tensor *w, const float *x, float *y) {
    for (int64_t r = 0; r < w->rows; r++) {
        ref_row_f32(w, r, s->row);
        float acc = 0.0f;
        for (int64_t i = 0; i < w->cols; i++) acc += s->row[i] * x[i];
        y[r] = acc;
    }
}

static void ref_rmsnorm(eng_ref_state *s, const eng_tensor *w, const float *x, float *out, int n) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + s->m->cfg.rms_eps);
    ref_row_f32(w, 0, s->row);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * s->row[i];
}

int eng_ref_create(const eng_model *m, int max_ctx, eng_ref_state **out) {
    const eng_model_config *c = &m->cfg;
    if (max_ctx <= 0 || c->n_kv_heads <= 0 || c->n_heads % c->n_kv_heads != 0 ||
        c->head_dim % 2 != 0) {
        D2_ERROR("ref_cpu: bad model shape or max_ctx %d", max_ctx);
        return D2_EINVAL;
    }
    eng_ref_state *s = calloc(1, sizeof *s);
    if (!s) return D2_ENOMEM;
    s->m = m;
    s->max_ctx = max_ctx;
    s->kv_dim = c->n_kv_heads * c->head_dim;
    s->q_dim = c->n_heads * c->head_dim;
    int mx = c->dim;
    if (c->ffn_dim > mx) mx = c->ffn_dim;
    if (s->q_dim > mx) mx = s->q_dim;
    s->max_in = mx;
    size_t L = (size_t)c->n_layers;
    s->x = calloc((size_t)c->dim, sizeof(float));
    s->xb = calloc((size_t)c->dim, sizeof(float));
    s->xb2 = calloc((size_t)c->dim, sizeof(float));
    s->q = calloc((size_t)s->q_dim, sizeof(float));
    s->k = calloc((size_t)s->kv_dim, sizeof(float));
    s->v = calloc((size_t)s->kv_dim, sizeof(float));
    s->att_out = calloc((size_t)s->q_dim, sizeof(float));
    s->hb = calloc((size_t)c->ffn_dim, sizeof(float));
    s->hb2 = calloc((size_t)c->ffn_dim, sizeof(float));
    s->row = calloc((size_t)mx, sizeof(float));
    s->inv_freq = calloc((size_t)c->head_dim / 2, sizeof(float));
    s->cosv = calloc((size_t)c->head_dim / 2, sizeof(float));
    s->sinv = calloc((size_t)c->head_dim / 2, sizeof(float));
    s->kc = calloc(L * (size_t)max_ctx * (size_t)s->kv_dim, sizeof(float));
    s->vc = calloc(L * (size_t)max_ctx * (size_t)s->kv_dim, sizeof(float));
    s->alive = calloc(L * (size_t)max_ctx, 1);
    s->att = calloc(L * (size_t)c->n_heads * (size_t)max_ctx, sizeof(float));
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->att_out || !s->hb ||
        !s->hb2 || !s->row || !s->inv_freq || !s->cosv || !s->sinv || !s->kc || !s->vc ||
        !s->alive || !s->att) {
        eng_ref_free(s);
        return D2_ENOMEM;
    }
    eng_rope_inv_freq(c, s->inv_freq);
    s->last_pos = -1;
    *out = s;
    return D2_OK;
}

void eng_ref_free(eng_ref_state *s) {
    if (!s) return;
    free(s->x); free(s->xb); free(s->xb2); free(s->q); free(s->k); free(s->v);
    free(s->att_out); free(s->hb); free(s->hb2); free(s->row); free(s->inv_freq);
    free(s->cosv); free(s->sinv); free(s->kc); free(s->vc); free(s->alive); free(s->att);
    free(s);
}

void eng_ref_evict(eng_ref_state *s, int layer, int pos) {
    if (layer >= 0 && layer < s->m->cfg.n_layers && pos >= 0 && pos < s->max_ctx)
        s->alive[(size_t)layer * (size_t)s->max_ctx + (size_t)pos] = 0;
}

const float *eng_ref_att(const eng_ref_state *s, int layer, int head) {
    const eng_model_config *c = &s->m->cfg;
    return s->att + ((size_t)layer * (size_t)c->n_heads + (size_t)head) * (size_t)s->max_ctx;
}

int eng_ref_forward(eng_ref_state *s, int token, int pos, float *logits) {
    const eng_model *m = s->m;
    const eng_model_config *c = &m->cfg;
    if (pos < 0 || pos >= s->max_ctx || token < 0 || token >= c->vocab_size) return D2_ERANGE;
    int dim = c->dim, hd = c->head_dim, kvd = s->kv_dim, gs = c->n_heads / c->n_kv_heads;
    size_t mc = (size_t)s->max_ctx;

    ref_row_f32(&m->tok_embd, token, s->x);
    for (int i = 0; i < hd / 2; i++) {
        float a = (float)pos * s->inv_freq[i];
        s->cosv[i] = cosf(a);
        s->sinv[i] = sinf(a);
    }
    for (int l = 0; l < c->n_layers; l++) {
        const eng_layer_weights *w = &m->layers[l];
        ref_rmsnorm(s, &w->attn_norm, s->x, s->xb, dim);
        ref_matvec(s, &w->wq, s->xb, s->q);
        ref_matvec(s, &w->wk, s->xb, s->k);
        ref_matvec(s, &w->wv, s->xb, s->v);
        if (w->bq.data) {
            ref_row_f32(&w->bq, 0, s->row);
            for (int i = 0; i < s->q_dim; i++) s->q[i] += s->row[i];
        }
        if (w->bk.data) {
            ref_row_f32(&w->bk, 0, s->row);
            for (int i = 0; i < kvd; i++) s->k[i] += s->row[i];
        }
        if (w->bv.data) {
            ref_row_f32(&w->bv, 0, s->row);
            for (int i = 0; i < kvd; i++) s->v[i] += s->row[i];
        }
        for (int h = 0; h < c->n_heads; h++)
            eng_rope_apply(s->q + h * hd, hd, c->rope_neox, s->cosv, s->sinv);
        for (int h = 0; h < c->n_kv_heads; h++)
            eng_rope_apply(s->k + h * hd, hd, c->rope_neox, s->cosv, s->sinv);

        float *kl = s->kc + (size_t)l * mc * (size_t)kvd;
        float *vl = s->vc + (size_t)l * mc * (size_t)kvd;
        unsigned char *al = s->alive + (size_t)l * mc;
        memcpy(kl + (size_t)pos * (size_t)kvd, s->k, (size_t)kvd * sizeof(float));
        memcpy(vl + (size_t)pos * (size_t)kvd, s->v, (size_t)kvd * sizeof(float));
        al[pos] = 1;
        for (int p = pos + 1; p < s->max_ctx; p++) al[p] = 0;

        float scale = 1.0f / sqrtf((float)hd);
        /* Mistral's sliding window: keys older than sliding_window positions are not seen */
        int lo = c->sliding_window > 0 ? pos - c->sliding_window + 1 : 0;
        for (int h = 0; h < c->n_heads; h++) {
            int g = h / gs;
            const float *qh = s->q + h * hd;
            float *att = s->att + ((size_t)l * (size_t)c->n_heads + (size_t)h) * mc;
            float mx = -INFINITY;
            for (int p = 0; p <= pos; p++) {
                if (!al[p] || p < lo) { att[p] = -INFINITY; continue; }
                const float *kp = kl + (size_t)p * (size_t)kvd + (size_t)g * (size_t)hd;
                float d = 0.0f;
                for (int i = 0; i < hd; i++) d += qh[i] * kp[i];
                att[p] = d * scale;
                if (att[p] > mx) mx = att[p];
            }
            float sum = 0.0f;
            for (int p = 0; p <= pos; p++) {
                att[p] = al[p] && p >= lo ? expf(att[p] - mx) : 0.0f;
                sum += att[p];
            }
            for (int p = 0; p <= pos; p++) att[p] /= sum;
            float *o = s->att_out + h * hd;
            for (int i = 0; i < hd; i++) o[i] = 0.0f;
            for (int p = 0; p <= pos; p++) {
                if (!al[p] || p < lo) continue;
                const float *vp = vl + (size_t)p * (size_t)kvd + (size_t)g * (size_t)hd;
                for (int i = 0; i < hd; i++) o[i] += att[p] * vp[i];
            }
        }
        ref_matvec(s, &w->wo, s->att_out, s->xb2);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb2[i];

        ref_rmsnorm(s, &w->ffn_norm, s->x, s->xb, dim);
        ref_matvec(s, &w->w_gate, s->xb, s->hb);
        ref_matvec(s, &w->w_up, s->xb, s->hb2);
        for (int i = 0; i < c->ffn_dim; i++) {
            float g = s->hb[i];
            s->hb[i] = g / (1.0f + expf(-g)) * s->hb2[i];
        }
        ref_matvec(s, &w->w_down, s->hb, s->xb2);
        for (int i = 0; i < dim; i++) s->x[i] += s->xb2[i];
    }
    s->last_pos = pos;
    if (logits) {
        ref_rmsnorm(s, &m->out_norm, s->x, s->xb, dim);
        const eng_tensor *out = m->output.data ? &m->output : &m->tok_embd;
        ref_matvec(s, out, s->xb, logits);
    }
    return D2_OK;
}
