/*
 * engine/model/rope.c — RoPE frequency tables and the per-head rotation shared by
 * every host forward path (the reference and the CPU backend) and used to build
 * the CUDA kernels' tables. See engine/model/rope.h.
 */
#include <math.h>

#include "engine/model/rope.h"

void eng_rope_inv_freq(const eng_model_config *c, float *inv_freq) {
    int hd = c->head_dim;
    const eng_rope_scaling *sc = &c->rope_scaling;
    for (int i = 0; i < hd / 2; i++) {
        double f = 1.0 / pow((double)c->rope_theta, (double)(2 * i) / (double)hd);
        if (sc->type == 1 && sc->factor > 0.0f) {
            /* llama3: long wavelengths are divided by factor, short ones
             * kept, and the band between interpolated smoothly. */
            double old = (double)sc->original_max_pos;
            double low_wl = old / (double)sc->low_freq_factor;
            double high_wl = old / (double)sc->high_freq_factor;
            double wl = 2.0 * M_PI / f;
            if (wl < high_wl) {
                /* keep */
            } else if (wl > low_wl) {
                f = f / (double)sc->factor;
            } else {
                double smooth = (old / wl - (double)sc->low_freq_factor) /
                                ((double)sc->high_freq_factor - (double)sc->low_freq_factor);
                f = (1.0 - smooth) * f / (double)sc->factor + smooth * f;
            }
        } else if (sc->type == 2 && sc->factor > 0.0f) {
            f = f / (double)sc->factor;
        }
        inv_freq[i] = (float)f;
    }
}

void eng_rope_apply(float *x, int head_dim, bool neox, const float *cosv, const float *sinv) {
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        int a = neox ? i : 2 * i;
        int b = neox ? i + half : 2 * i + 1;
        float x0 = x[a], x1 = x[b];
        x[a] = x0 * cosv[i] - x1 * sinv[i];
        x[b] = x0 * sinv[i] + x1 * cosv[i];
    }
}

