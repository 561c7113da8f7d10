/*
 * tools/d2o_probe.c — what d2od's KV compression decides on one token
 * sequence, as JSON, for the independent PyTorch reference
 * (tools/d2o_reference.py, tests/integration/test_d2o_reference.py).
 * A test harness: it reaches into the engine's internals as the unit tests do.
 *
 *   d2o_probe --model DIR|GGUF --ids FILE --prefill P [--budget F] [--method M]
 *             [--merge-rule code|normalised] [--exact] [--keep-layers LIST|none]
 *             [--ema-beta B] [--heavy-share S] [--granularity layer|head] [--out FILE]
 *
 * FILE holds a JSON array of token ids. The first P ids are prefilled (chunked,
 * as the scheduler does), the prompt is compressed, then every later id is one
 * decode step followed by decode-time eviction — eng_score_kv's protocol,
 * through the same step mechanism (engine/step.c). The
 * output has, per layer: the D2O statistic, the budget split, tau after the
 * prompt compression and at the end, the positions kept right after the prompt
 * compression and at the end (granularity head: one list per KV head, from
 * the backend's per-head positions), tokens evicted and merged; and the
 * negative log likelihood of every prediction from the last prefill row on
 * (ids P..n-1).
 */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/engine.h"
#include "engine/internal.h"
#include "engine/kvcomp.h"
#include "kvpool/kvpool.h"

static double nll_at(const float *lg, int n_vocab, int idx) {
    float mx = lg[0];
    for (int v = 1; v < n_vocab; v++)
        if (lg[v] > mx) mx = lg[v];
    double sum = 0;
    for (int v = 0; v < n_vocab; v++) sum += exp((double)lg[v] - mx);
    return -((double)lg[idx] - mx - log(sum));
}

/* Positions held by (seq, layer), in slot order; per_head: a list per KV head. */
static json_t *kept_positions(eng_engine *e, int seq, int layer, bool per_head) {
    kvp_table t = kvp_get_table(e->pool, seq, layer);
    const int pt = kvp_get_config(e->pool)->page_tokens;
    const int32_t *pos = kvp_pos_base(e->pool);
    json_t *a = json_array();
    if (!per_head) {
        for (int i = 0; i < t.n_tokens; i++)
            json_array_append_new(a, json_integer(pos[(size_t)t.pages[i / pt] * (size_t)pt + (size_t)(i % pt)]));
        return a;
    }
    int nkv = e->model->cfg.n_kv_heads;
    int32_t hp[256];
    for (int g = 0; g < nkv && g < 256; g++) json_array_append_new(a, json_array());
    for (int i = 0; i < t.n_tokens; i++) {
        if (!e->be->ops->read_head_pos || nkv > 256 ||
            e->be->ops->read_head_pos(e->be, seq, layer, i, hp) != D2_OK)
            break;
        for (int g = 0; g < nkv; g++) json_array_append_new(json_array_get(a, (size_t)g), json_integer(hp[g]));
    }
    return a;
}

static int usage(void) {
    fprintf(stderr, "usage: d2o_probe --model M --ids FILE --prefill P [--budget F] [--method M]\n"
                    "                 [--merge-rule code|normalised] [--exact] [--keep-layers LIST|none]\n"
                    "                 [--ema-beta B] [--heavy-share S] [--granularity layer|head] [--out FILE]\n");
    return 2;
}

int main(int argc, char **argv) {
    const char *model = NULL, *ids_file = NULL, *out = NULL, *keep = NULL;
    int prefill = 0;
    eng_kv_config kv;
    eng_kv_config_default(&kv, ENG_KV_D2O);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--exact")) { kv.exact = true; continue; }
        if (!v) return usage();
        i++;
        if (!strcmp(a, "--model")) model = v;
        else if (!strcmp(a, "--ids")) ids_file = v;
        else if (!strcmp(a, "--out")) out = v;
        else if (!strcmp(a, "--prefill")) prefill = atoi(v);
        else if (!strcmp(a, "--budget")) kv.budget_frac = (float)atof(v);
        else if (!strcmp(a, "--ema-beta")) kv.ema_beta = (float)atof(v);
        else if (!strcmp(a, "--heavy-share")) kv.heavy_share = (float)atof(v);
        else if (!strcmp(a, "--keep-layers")) keep = v;
        else if (!strcmp(a, "--granularity")) {
            int g = eng_kv_granularity_parse(v);
            if (g < 0) return usage();
            kv.granularity = (eng_kv_granularity)g;
        }
        else if (!strcmp(a, "--method")) {
            int m = eng_kv_method_parse(v);
            if (m < 0) return usage();
            eng_kv_config k2;
            eng_kv_config_default(&k2, (eng_kv_method)m);
            k2.budget_frac = kv.budget_frac;
            kv = k2;
        } else if (!strcmp(a, "--merge-rule")) {
            if (!strcmp(v, "code")) kv.merge_rule = ENG_KV_MERGE_CODE;
            else if (!strcmp(v, "normalised")) kv.merge_rule = ENG_KV_MERGE_NORMALISED;
            else return usage();
        } else return usage();
    }
    if (!model || !ids_file || prefill < 2) return usage();
    if (keep) {
        eng_kv_keep_layers_clear(&kv);
        if (strcmp(keep, "none") != 0) {
            char buf[1024];
            snprintf(buf, sizeof buf, "%s", keep);
            for (char *t = strtok(buf, ","); t; t = strtok(NULL, ",")) eng_kv_keep_layer_add(&kv, atoi(t));
        }
    }
    json_error_t jerr;
    json_t *ids_j = json_load_file(ids_file, 0, &jerr);
    if (!json_is_array(ids_j)) { fprintf(stderr, "d2o_probe: %s: %s\n", ids_file, jerr.text); return 1; }
    int n = (int)json_array_size(ids_j);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(n + 1));
    for (int i = 0; i < n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(ids_j, (size_t)i));
    json_decref(ids_j);
    if (prefill > n) prefill = n;

    eng_engine_config ec = {.model_path = model, .n_threads = 1, .max_seqs = 1};
    eng_engine *e = NULL;
    int rc = eng_engine_create(&ec, &e);
    if (rc != D2_OK) { fprintf(stderr, "d2o_probe: %s: %s\n", model, d2_strerror(rc)); return 1; }
    if (n > e->ctx_len) { fprintf(stderr, "d2o_probe: %d ids exceed the context %d\n", n, e->ctx_len); return 1; }
    const eng_model_config *mc = &e->model->cfg;
    const int L = mc->n_layers;
    const bool per_head = kv.granularity == ENG_KV_GRAN_HEAD;
    eng_kv_state *ks = NULL;
    if ((rc = eng_kv_state_create(&kv, mc, &ks)) != D2_OK) { fprintf(stderr, "d2o_probe: bad config\n"); return 1; }
    int seq;
    if ((rc = kvp_seq_new(e->pool, &seq)) != D2_OK || (rc = eng_kv_prefill_begin(ks, prefill)) != D2_OK) return 1;

    json_t *root = json_object(), *layers = json_array(), *nll = json_array();
    int chunk = e->max_logit_rows < e->max_batch_tokens ? e->max_logit_rows : e->max_batch_tokens;
    float *tau_prompt = calloc((size_t)L, sizeof(float));
    json_t **kept_prompt = calloc((size_t)L, sizeof(json_t *));
    eng_plan pl;
    if ((rc = eng__plan_init(&pl, e)) != D2_OK) return 1;
    for (int c0 = 0; c0 < n && rc == D2_OK;) {
        bool in_prefill = c0 < prefill;
        int cn = in_prefill ? (prefill - c0 < chunk ? prefill - c0 : chunk) : 1;
        eng__plan_reset(&pl);
        eng_batch_seq *bs = eng__plan_add(&pl, seq, ids + c0, cn, c0, true, true);
        if (!bs) { rc = D2_EINTERNAL; break; }
        eng_kv_plan_seq(ks, prefill, bs);
        if ((rc = eng__step_execute(e, &pl)) != D2_OK) break;
        for (int j = 0; j < cn && rc == D2_OK; j++) {
            int t = c0 + j;
            if (t + 1 >= n || t + 1 < prefill) continue;
            const float *lg;
            rc = eng__step_logits(e, j, &lg);
            if (rc == D2_OK) json_array_append_new(nll, json_real(nll_at(lg, mc->vocab_size, ids[t + 1])));
        }
        c0 += cn;
        if (rc != D2_OK) break;
        bool was = ks->compressed;
        rc = eng__step_compress(e, seq, ks, c0, prefill);
        if (!was && ks->compressed) {
            for (int l = 0; l < L; l++) {
                tau_prompt[l] = ks->tau[l];
                kept_prompt[l] = kept_positions(e, seq, l, per_head);
            }
        }
    }
    eng__plan_free(&pl);
    if (rc != D2_OK) { fprintf(stderr, "d2o_probe: failed: %s\n", d2_strerror(rc)); return 1; }
    for (int l = 0; l < L; l++) {
        json_t *o = json_object();
        json_object_set_new(o, "stat", json_real(ks->v_layer[l]));
        json_object_set_new(o, "heavy", json_integer(ks->heavy[l]));
        json_object_set_new(o, "recent", json_integer(ks->recent[l]));
        json_object_set_new(o, "tau_prompt", json_real(tau_prompt[l]));
        json_object_set_new(o, "tau_end", json_real(ks->tau[l]));
        json_object_set_new(o, "kept_prompt", kept_prompt[l] ? kept_prompt[l] : json_array());
        json_object_set_new(o, "kept_end", kept_positions(e, seq, l, per_head));
        json_array_append_new(layers, o);
    }
    json_object_set_new(root, "n_layers", json_integer(L));
    json_object_set_new(root, "prefill", json_integer(prefill));
    json_object_set_new(root, "n", json_integer(n));
    json_object_set_new(root, "evicted", json_integer(ks->n_evicted));
    json_object_set_new(root, "merged", json_integer(ks->n_merged));
    json_object_set_new(root, "layers", layers);
    json_object_set_new(root, "nll", nll);
    int ok = out ? json_dump_file(root, out, JSON_INDENT(1)) == 0 : json_dumpf(root, stdout, JSON_INDENT(1)) == 0;
    json_decref(root);
    free(tau_prompt);
    free(kept_prompt);
    free(ids);
    kvp_seq_free(e->pool, seq);
    eng_kv_state_free(ks);
    eng_engine_destroy(e);
    return ok ? 0 : 1;
}
