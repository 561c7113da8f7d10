/*
 * daemon/eval_niah.c — `d2od eval --niah`: retrieval over a grid of context
 * length x needle depth, for the full cache and every compression
 * configuration; contract in daemon/eval_niah.h. Called only from
 * daemon/eval.c.
 *
 * Two tasks, both on a filler of plain story sentences (any model's
 * tokenizer; lengths are in that tokenizer's tokens):
 *   passkey  one needle, "The pass key is NNNN. Remember it. NNNN is the pass
 *            key.", then "What is the pass key? The pass key is";
 *   needles  `needles` needles "The secret number of NAME is NNNN." with
 *            different names and numbers: the asked one at the cell's depth,
 *            the others (distractors) at seeded random depths; then "What is
 *            the secret number of NAME? The secret number of NAME is".
 * A trial passes when the 8-token greedy continuation contains the digits.
 * Every prompt of one configuration goes through the scheduler at once, as
 * the daemon would run them. Prompts, keys and depths depend only on the
 * options and the seed, so every configuration sees the same prompts.
 */
#include "daemon/eval_niah.h"

#include <cairo.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/status.h"

#define NIAH_GEN 8

static const char *const HAY[] = {
    "The grass was green and the sky was bright.", "A small dog ran to the big tree.",
    "Mom put the red cup on the table.", "The boy and the girl sang a song together.",
    "A yellow duck swam in the little pond.", "They ate bread and jam for lunch.",
    "The wind moved the leaves of the old tree.", "A cat slept on the warm window.",
    "Dad read a book about a brave king.", "The children built a house of blocks.",
    "A bee flew from flower to flower.", "The rain stopped and the sun came out.",
    "Grandma baked cookies for the whole family.", "The train went over the long bridge.",
};
#define N_HAY ((int)(sizeof HAY / sizeof HAY[0]))
static const char *const NAMES[] = {"Lily", "Tom", "Ben", "Mia", "Sam", "Max", "Anna", "Leo"};
#define N_NAMES ((int)(sizeof NAMES / sizeof NAMES[0]))

static uint64_t rng_next(uint64_t *s) { /* splitmix64 */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static int rng_below(uint64_t *s, int n) { return n > 0 ? (int)(rng_next(s) % (uint64_t)n) : 0; }

/* A growable string. */
typedef struct sbuf { char *p; size_t n, cap; } sbuf;
static int sb_add(sbuf *b, const char *s) {
    size_t l = strlen(s);
    if (b->n + l + 1 > b->cap) {
        size_t c = (b->cap ? b->cap * 2 : 1024) + l;
        char *q = realloc(b->p, c);
        if (!q) return D2_ENOMEM;
        b->p = q;
        b->cap = c;
    }
    memcpy(b->p + b->n, s, l + 1);
    b->n += l;
    return D2_OK;
}

/* One prompt: `n_hay` filler sentences with the needles inserted before
 * sentence index at[k] (k = 0 is the asked one), then the question. */
static int assemble(const char *const *needle, const int *at, int n_needles, int n_hay, int first_hay,
                    const char *question, sbuf *out) {
    out->n = 0;
    if (out->p) out->p[0] = 0;
    int rc = D2_OK;
    for (int i = 0; i <= n_hay && rc == D2_OK; i++) {
        for (int k = 0; k < n_needles && rc == D2_OK; k++)
            if (at[k] == i) {
                if (out->n) rc = sb_add(out, " ");
                if (rc == D2_OK) rc = sb_add(out, needle[k]);
            }
        if (i < n_hay && rc == D2_OK) {
            if (out->n) rc = sb_add(out, " ");
            if (rc == D2_OK) rc = sb_add(out, HAY[(first_hay + i) % N_HAY]);
        }
    }
    if (rc == D2_OK) rc = sb_add(out, question);
    return rc;
}

typedef struct niah_case {
    int32_t *ids;
    int n;
    char key[8];
    int task, li, di;
} niah_case;

/* Builds the prompt of one trial within `target` tokens. */
static int build_case(const eng_tokenizer *tok, int task, int target, double depth, int needles,
                      uint64_t *rng, niah_case *c) {
    char nbuf[N_NAMES][96];
    const char *needle[N_NAMES];
    int at[N_NAMES];
    char question[160];
    int nn = task == NIAH_TASK_PASSKEY ? 1 : (needles < 1 ? 1 : needles > N_NAMES ? N_NAMES : needles);
    int first_name = rng_below(rng, N_NAMES);
    for (int k = 0; k < nn; k++) {
        int key = 1000 + rng_below(rng, 9000);
        if (k == 0) snprintf(c->key, sizeof c->key, "%04d", key % 10000);
        if (task == NIAH_TASK_PASSKEY)
            snprintf(nbuf[k], sizeof nbuf[k], "The pass key is %04d. Remember it. %04d is the pass key.", key, key);
        else
            snprintf(nbuf[k], sizeof nbuf[k], "The secret number of %s is %04d.", NAMES[(first_name + k) % N_NAMES],
                     key);
        needle[k] = nbuf[k];
    }
    if (task == NIAH_TASK_PASSKEY)
        snprintf(question, sizeof question, " What is the pass key? The pass key is");
    else
        snprintf(question, sizeof question, " What is the secret number of %s? The secret number of %s is",
                 NAMES[first_name], NAMES[first_name]);
    int first_hay = rng_below(rng, N_HAY);
    double dpos[N_NAMES];
    dpos[0] = depth;
    for (int k = 1; k < nn; k++) dpos[k] = (double)rng_below(rng, 1001) / 1000.0;
    /* estimate the filler: tokens per sentence, then trim until it fits */
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = eng_tok_encode(tok, HAY[0], strlen(HAY[0]), false, false, &ids, &n);
    free(ids);
    if (rc != D2_OK) return rc;
    int n_hay = (int)(target / (n > 0 ? (double)n + 1 : 12.0)) + 2;
    sbuf b = {0};
    c->ids = NULL;
    for (;;) {
        for (int k = 0; k < nn; k++) at[k] = (int)lround(dpos[k] * n_hay);
        rc = assemble(needle, at, nn, n_hay, first_hay, question, &b);
        if (rc != D2_OK) break;
        free(c->ids);
        c->ids = NULL;
        size_t m = 0;
        rc = eng_tok_encode(tok, b.p, b.n, true, false, &c->ids, &m);
        if (rc != D2_OK) break;
        c->n = (int)m;
        if (c->n <= target || n_hay == 0) break;
        /* over: drop sentences in proportion to the excess (at least one) */
        int drop = (int)((double)(c->n - target) * n_hay / c->n) + 1;
        n_hay = n_hay > drop ? n_hay - drop : 0;
    }
    free(b.p);
    return rc;
}

typedef struct gen_out { int32_t out[NIAH_GEN]; int n_out, done, status; } gen_out;

static int on_event(void *user, const eng_event *ev) {
    gen_out *g = user;
    if (ev->type == ENG_EV_TOKEN) {
        if (g->n_out < NIAH_GEN) g->out[g->n_out++] = ev->token;
    } else {
        g->done = 1;
        g->status = ev->status;
    }
    return 0;
}

int niah_run(eng_engine *e, eng_sched *s, const niah_opts *o, const eng_kv_config *kv, niah_grid *g) {
    const eng_tokenizer *tok = eng_engine_tokenizer(e);
    int total = NIAH_N_TASKS * o->n_lengths * o->n_depths * o->trials;
    niah_case *cs = calloc((size_t)total + 1, sizeof *cs);
    gen_out *go = calloc((size_t)total + 1, sizeof *go);
    if (!cs || !go) { free(cs); free(go); return D2_ENOMEM; }
    memset(g->pass, 0, sizeof g->pass);
    memset(g->n, 0, sizeof g->n);
    uint64_t rng = o->seed * 0x9E3779B97F4A7C15ULL + 0x5eed;
    int nc = 0, rc = D2_OK;
    for (int t = 0; t < NIAH_N_TASKS && rc == D2_OK; t++)
        for (int li = 0; li < o->n_lengths && rc == D2_OK; li++)
            for (int di = 0; di < o->n_depths && rc == D2_OK; di++)
                for (int k = 0; k < o->trials && rc == D2_OK; k++) {
                    niah_case *c = &cs[nc];
                    rc = build_case(tok, t, o->lengths[li], o->depths[di], o->needles, &rng, c);
                    c->task = t;
                    c->li = li;
                    c->di = di;
                    nc++;
                }
    for (int i = 0; i < nc && rc == D2_OK; i++) {
        eng_request q = {.prompt = cs[i].ids, .n_prompt = cs[i].n, .max_tokens = NIAH_GEN, .ignore_eos = true,
                         .on_event = on_event, .user = &go[i]};
        eng_sample_params_default(&q.sample);
        q.sample.temperature = 0;
        q.kv = *kv;
        const char *why = NULL;
        rc = eng_sched_submit(s, &q, NULL, &why);
        if (rc != D2_OK) fprintf(stderr, "d2od eval: niah submit: %s (%s)\n", d2_strerror(rc), why ? why : "");
    }
    for (;;) { /* drain even after a failed submit: earlier requests are in flight */
        int r = eng_sched_step(s);
        if (r < 0) { rc = r; break; }
        if (r == 0) break;
    }
    for (int i = 0; i < nc && rc == D2_OK; i++) {
        if (!go[i].done || go[i].status != D2_OK) { rc = go[i].done ? go[i].status : D2_EINTERNAL; break; }
        char *txt = NULL;
        int pass = 0;
        if (eng_tok_decode(tok, go[i].out, (size_t)go[i].n_out, true, &txt) == D2_OK && txt)
            pass = strstr(txt, cs[i].key) != NULL;
        free(txt);
        g->pass[cs[i].task][cs[i].li][cs[i].di] += pass;
        g->n[cs[i].task][cs[i].li][cs[i].di]++;
    }
    for (int i = 0; i <= nc && i < total + 1; i++) free(cs[i].ids);
    free(cs);
    free(go);
    return rc;
}

static const char *const TASK_NAMES[NIAH_N_TASKS] = {"passkey", "needles"};

json_t *niah_json(const niah_opts *o, const niah_grid *g) {
    json_t *root = json_object();
    for (int t = 0; t < NIAH_N_TASKS; t++) {
        json_t *rows = json_array();
        int p = 0, n = 0;
        for (int li = 0; li < o->n_lengths; li++) {
            json_t *row = json_array();
            for (int di = 0; di < o->n_depths; di++) {
                int cn = g->n[t][li][di];
                json_array_append_new(row, cn ? json_real((double)g->pass[t][li][di] / cn) : json_null());
                p += g->pass[t][li][di];
                n += cn;
            }
            json_array_append_new(rows, row);
        }
        json_object_set_new(root, TASK_NAMES[t],
                            json_pack("{s:o, s:o, s:i}", "accuracy_by_length_depth", rows, "accuracy",
                                      n ? json_real((double)p / n) : json_null(), "trials", n));
    }
    return root;
}

/* ---- heat maps ------------------------------------------------------------------------ */

/* red (0) -> amber (0.5) -> green (1) */
static void heat_colour(cairo_t *cr, double a) {
    if (!isfinite(a)) { cairo_set_source_rgb(cr, 0.85, 0.85, 0.85); return; }
    double r = a < 0.5 ? 0.84 : 0.84 - (a - 0.5) * 2 * (0.84 - 0.17);
    double gg = a < 0.5 ? 0.19 + a * 2 * (0.70 - 0.19) : 0.70 - (a - 0.5) * 2 * (0.70 - 0.63);
    double b = a < 0.5 ? 0.15 : 0.15 + (a - 0.5) * 2 * (0.29 - 0.15);
    cairo_set_source_rgb(cr, r, gg, b);
}

static void text_at(cairo_t *cr, double x, double y, double ax, double ay, const char *s) {
    cairo_text_extents_t te;
    cairo_text_extents(cr, s, &te);
    cairo_move_to(cr, x - te.x_bearing - te.width * ax, y - te.y_bearing - te.height * ay);
    cairo_show_text(cr, s);
}

int niah_plot(const char *path, const niah_opts *o, const niah_grid *grids, int n, const char *title) {
    const double cw = 56, ch = 26, pad_l = 64, pad_t = 46, pad_b = 40, gap = 24, head = 40;
    double pw = pad_l + cw * o->n_lengths, ph = pad_t + ch * o->n_depths + pad_b;
    int W = (int)(gap + n * (pw + gap)), H = (int)(head + NIAH_N_TASKS * ph + 10);
    cairo_surface_t *sf = cairo_image_surface_create(CAIRO_FORMAT_RGB24, W, H);
    cairo_t *cr = cairo_create(sf);
    cairo_set_source_rgb(cr, 1, 1, 1);
    cairo_paint(cr);
    cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_BOLD);
    cairo_set_font_size(cr, 15);
    cairo_set_source_rgb(cr, 0, 0, 0);
    text_at(cr, W / 2.0, 12, 0.5, 0, title);
    for (int t = 0; t < NIAH_N_TASKS; t++) {
        double y0 = head + t * ph;
        for (int k = 0; k < n; k++) {
            const niah_grid *g = &grids[k];
            double x0 = gap + k * (pw + gap);
            int p = 0, m = 0;
            for (int li = 0; li < o->n_lengths; li++)
                for (int di = 0; di < o->n_depths; di++) { p += g->pass[t][li][di]; m += g->n[t][li][di]; }
            char buf[96];
            snprintf(buf, sizeof buf, "%s: %s %.0f%%", g->label, TASK_NAMES[t], m ? 100.0 * p / m : 0.0);
            cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_BOLD);
            cairo_set_font_size(cr, 12);
            cairo_set_source_rgb(cr, 0, 0, 0);
            text_at(cr, x0 + pad_l + cw * o->n_lengths / 2, y0 + 8, 0.5, 0, buf);
            cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
            cairo_set_font_size(cr, 10);
            for (int di = 0; di < o->n_depths; di++) {
                double cy = y0 + pad_t + di * ch;
                snprintf(buf, sizeof buf, "%.0f%%", 100 * o->depths[di]);
                cairo_set_source_rgb(cr, 0, 0, 0);
                text_at(cr, x0 + pad_l - 6, cy + ch / 2, 1, 0.5, buf);
                for (int li = 0; li < o->n_lengths; li++) {
                    double cx = x0 + pad_l + li * cw;
                    int cn = g->n[t][li][di];
                    double a = cn ? (double)g->pass[t][li][di] / cn : NAN;
                    heat_colour(cr, a);
                    cairo_rectangle(cr, cx + 1, cy + 1, cw - 2, ch - 2);
                    cairo_fill(cr);
                    snprintf(buf, sizeof buf, "%d/%d", g->pass[t][li][di], cn);
                    cairo_set_source_rgb(cr, 1, 1, 1);
                    text_at(cr, cx + cw / 2, cy + ch / 2, 0.5, 0.5, buf);
                }
            }
            cairo_set_source_rgb(cr, 0, 0, 0);
            for (int li = 0; li < o->n_lengths; li++) {
                snprintf(buf, sizeof buf, "%d", o->lengths[li]);
                text_at(cr, x0 + pad_l + li * cw + cw / 2, y0 + pad_t + o->n_depths * ch + 4, 0.5, 0, buf);
            }
            text_at(cr, x0 + pad_l + cw * o->n_lengths / 2, y0 + pad_t + o->n_depths * ch + 18, 0.5, 0,
                    "prompt tokens");
            text_at(cr, x0 + 4, y0 + pad_t - 14, 0, 0, "depth");
        }
    }
    cairo_destroy(cr);
    cairo_surface_flush(sf);
    cairo_status_t st = cairo_surface_write_to_png(sf, path);
    cairo_surface_destroy(sf);
    return st == CAIRO_STATUS_SUCCESS ? D2_OK : D2_EIO;
}
