/*
 * api/request.c — parsing and validation of OpenAI completion and chat
 * request bodies into api_gen_params, and stop-string matching.
 *
 * Pure functions over a buffer (no server state), so they are unit-tested
 * (tests/unit/test_api_request.c) and fuzzed directly. Unknown fields are
 * ignored, as OpenAI does; a known field of the wrong type or out of range
 * is a 400 naming the field. Callable from any thread.
 *
 * Extension "kv_compression": {"method": "d2o", "budget": 0.2, "heavy_share":
 * 0.75, "exact": false, "merge_rule": "normalised"|"code", "granularity":
 * "layer"|"head"} selects the
 * request's KV compression (eng_request.kv). "method" is required; "budget"
 * has the engine's one meaning (eng_kv_budget_number, as the kv_budget
 * directive and --kv-budget): a number in (0, 1] is the share of the prompt
 * (1 and 1.0: as many tokens as the prompt), a JSON integer >= 2 is a token
 * count.
 * Unlike the top level, unknown keys inside the object
 * are rejected: a misspelt option must not silently fall back to a default.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/internal.h"
#include "common/status.h"

void api_error_set(api_error *e, int http, const char *type, const char *param, const char *fmt, ...) {
    e->http = http;
    e->type = type;
    e->code = NULL;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

char *api_error_json(const api_error *e) {
    json_t *inner = json_pack("{s:s, s:s, s:o, s:o}", "message", e->message, "type",
                              e->type ? e->type : "invalid_request_error", "param",
                              e->param[0] ? json_string(e->param) : json_null(), "code",
                              e->code ? json_string(e->code) : json_null());
    json_t *root = json_pack("{s:o}", "error", inner);
    char *s = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return s;
}

void api_gen_params_free(api_gen_params *p) {
    free(p->model);
    for (int i = 0; i < p->n_prompts; i++) {
        free(p->prompt_text[i]);
        free(p->prompt_ids[i]);
    }
    json_decref(p->messages);
    json_decref(p->tools);
    for (int i = 0; i < p->n_stop; i++) free(p->stop[i]);
    free(p->logit_bias);
    free(p->user);
    memset(p, 0, sizeof *p);
}

#define BAD(param, ...)                                                                  \
    do {                                                                                 \
        api_error_set(err, 400, "invalid_request_error", param, __VA_ARGS__);             \
        goto fail;                                                                       \
    } while (0)

/* Reads an optional number field into *out with a range check. */
static int get_num(json_t *root, const char *key, double lo, double hi, double *out, api_error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v)) {
        api_error_set(err, 400, "invalid_request_error", key, "'%s' must be a number", key);
        return -1;
    }
    double d = json_number_value(v);
    if (!(d >= lo && d <= hi)) {
        api_error_set(err, 400, "invalid_request_error", key, "'%s' must be between %g and %g, got %g",
                      key, lo, hi, d);
        return -1;
    }
    *out = d;
    return 1;
}

static int get_int(json_t *root, const char *key, long long lo, long long hi, long long *out,
                   api_error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v)) {
        api_error_set(err, 400, "invalid_request_error", key, "'%s' must be an integer", key);
        return -1;
    }
    long long x = json_integer_value(v);
    if (x < lo || x > hi) {
        api_error_set(err, 400, "invalid_request_error", key, "'%s' must be between %lld and %lld, got %lld",
                      key, lo, hi, x);
        return -1;
    }
    *out = x;
    return 1;
}

static int get_bool(json_t *root, const char *key, bool *out, api_error *err) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v)) {
        api_error_set(err, 400, "invalid_request_error", key, "'%s' must be a boolean", key);
        return -1;
    }
    *out = json_is_true(v);
    return 1;
}

#define KV_P "kv_compression"

/* Unknown keys inside "kv_compression" are refused: a misspelt option must not
 * silently fall back to its default. 0 or -1 with *err. */
static int kv_check_keys(json_t *o, api_error *err) {
    static const char *const known[] = {"method", "preset", "budget", "heavy_share", "exact", "merge_rule",
                                        "n_sink", "window", "ema_beta", "keep_layers", "granularity"};
    const char *key;
    json_t *v;
    json_object_foreach(o, key, v) {
        size_t k = 0;
        while (k < sizeof known / sizeof *known && strcmp(key, known[k])) k++;
        if (k == sizeof known / sizeof *known) {
            api_error_set(err, 400, "invalid_request_error", KV_P,
                          "kv_compression: unknown key '%.64s' (known: method, preset, budget, heavy_share, "
                          "exact, merge_rule, granularity, n_sink, window, ema_beta, keep_layers)",
                          key);
            return -1;
        }
    }
    return 0;
}

/* "budget": the engine's one meaning of a budget (eng_kv_budget_number): a
 * number in (0, 1] is the share of the prompt, an integer >= 2 a token count. */
static int kv_parse_budget(json_t *o, eng_kv_config *kv, api_error *err) {
    json_t *b = json_object_get(o, "budget");
    if (!b || json_is_null(b)) return 0;
    if (!json_is_number(b)) {
        api_error_set(err, 400, "invalid_request_error", KV_P,
                      "kv_compression.budget must be a share of the prompt in (0, 1] or a token count >= 2");
        return -1;
    }
    const char *why = NULL;
    if (eng_kv_budget_number(json_number_value(b), json_is_integer(b), &kv->budget_frac, &kv->budget_tokens,
                             &why) != D2_OK) {
        api_error_set(err, 400, "invalid_request_error", KV_P, "kv_compression.budget %.17g: %s",
                      json_number_value(b), why ? why : "invalid");
        return -1;
    }
    return 0;
}

/* A number in [lo, hi] under "kv_compression"; 0 when absent, 1 when set, -1 with *err. */
static int kv_get_num(json_t *o, const char *key, double lo, double hi, double *out, api_error *err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v) || !(json_number_value(v) >= lo && json_number_value(v) <= hi)) {
        api_error_set(err, 400, "invalid_request_error", KV_P, "kv_compression.%s must be a number in [%g, %g]",
                      key, lo, hi);
        return -1;
    }
    *out = json_number_value(v);
    return 1;
}

/* The same for an integer. */
static int kv_get_int(json_t *o, const char *key, int lo, int hi, int *out, api_error *err) {
    json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        api_error_set(err, 400, "invalid_request_error", KV_P, "kv_compression.%s must be an integer in [%d, %d]",
                      key, lo, hi);
        return -1;
    }
    *out = (int)json_integer_value(v);
    return 1;
}

/* heavy_share, exact, merge_rule, granularity, n_sink, window, ema_beta. 0 or -1 with *err. */
static int kv_parse_tuning(json_t *o, eng_kv_config *kv, api_error *err) {
    double d;
    int r;
    if ((r = kv_get_num(o, "heavy_share", 0.0, 1.0, &d, err)) < 0) return -1;
    if (r) kv->heavy_share = (float)d;
    if ((r = kv_get_num(o, "ema_beta", 0.0, 1.0, &d, err)) < 0) return -1;
    if (r) kv->ema_beta = (float)d;
    if (kv_get_int(o, "n_sink", 0, 1024, &kv->n_sink, err) < 0) return -1;
    if (kv_get_int(o, "window", 1, 65536, &kv->window, err) < 0) return -1;
    json_t *x = json_object_get(o, "exact");
    if (x && !json_is_null(x)) {
        if (!json_is_boolean(x)) {
            api_error_set(err, 400, "invalid_request_error", KV_P, "kv_compression.exact must be a boolean");
            return -1;
        }
        kv->exact = json_is_true(x);
    }
    json_t *mr = json_object_get(o, "merge_rule");
    if (mr && !json_is_null(mr)) {
        const char *rule = json_is_string(mr) ? json_string_value(mr) : "";
        if (!strcmp(rule, "normalised") || !strcmp(rule, "normalized")) kv->merge_rule = ENG_KV_MERGE_NORMALISED;
        else if (!strcmp(rule, "code")) kv->merge_rule = ENG_KV_MERGE_CODE;
        else {
            api_error_set(err, 400, "invalid_request_error", KV_P,
                          "kv_compression.merge_rule must be \"normalised\" or \"code\"");
            return -1;
        }
    }
    json_t *gr = json_object_get(o, "granularity");
    if (gr && !json_is_null(gr)) {
        int g = eng_kv_granularity_parse(json_is_string(gr) ? json_string_value(gr) : NULL);
        if (g < 0) {
            api_error_set(err, 400, "invalid_request_error", KV_P,
                          "kv_compression.granularity must be \"layer\" or \"head\"");
            return -1;
        }
        kv->granularity = (eng_kv_granularity)g;
    }
    return 0;
}

/* "kv_compression" -> p->kv. 0 (absent or valid) or -1 with *err. */
static int parse_kv(json_t *root, const api_limits *lim, api_gen_params *p, api_error *err) {
    const char *P = KV_P;
    json_t *o = json_object_get(root, P);
    if (!o || json_is_null(o)) return 0;
    if (!json_is_object(o)) {
        api_error_set(err, 400, "invalid_request_error", P,
                      "'kv_compression' must be an object like {\"method\": \"d2o\", \"budget\": 0.2}");
        return -1;
    }
    if (kv_check_keys(o, err) < 0) return -1;
    json_t *m = json_object_get(o, "method");
    if (!json_is_string(m)) {
        api_error_set(err, 400, "invalid_request_error", P,
                      "kv_compression.method is required: one of full, d2o, h2o, streamingllm, snapkv, pyramidkv");
        return -1;
    }
    int method = eng_kv_method_parse(json_string_value(m));
    if (method < 0) {
        api_error_set(err, 400, "invalid_request_error", P,
                      "kv_compression.method '%.64s' is not one of full, d2o, h2o, streamingllm, snapkv, pyramidkv",
                      json_string_value(m));
        return -1;
    }
    eng_kv_config_default(&p->kv, (eng_kv_method)method);
    /* a preset first: explicit fields below override it */
    json_t *pr = json_object_get(o, "preset");
    if (pr && !json_is_null(pr)) {
        const char *pwhy = NULL;
        if (!json_is_string(pr) || eng_kv_preset_apply(&p->kv, json_string_value(pr), &pwhy) != D2_OK) {
            api_error_set(err, 400, "invalid_request_error", P, "kv_compression.preset: %s",
                          pwhy ? pwhy : "must be a string (default or official)");
            return -1;
        }
    }
    if (kv_parse_budget(o, &p->kv, err) < 0 || kv_parse_tuning(o, &p->kv, err) < 0) return -1;
    /* keep_layers: layers never compressed; negative indices count from the
     * end (-1 = the last layer), as the official D2O code keeps 0, 1 and L-1. */
    json_t *kl = json_object_get(o, "keep_layers");
    if (kl && !json_is_null(kl)) {
        int L = lim->n_layers > 0 && lim->n_layers <= ENG_MODEL_MAX_LAYERS ? lim->n_layers
                                                                           : ENG_MODEL_MAX_LAYERS;
        if (!json_is_array(kl)) {
            api_error_set(err, 400, "invalid_request_error", P, "kv_compression.keep_layers must be a list of layer indices");
            return -1;
        }
        eng_kv_keep_layers_clear(&p->kv); /* [] = compress every layer */
        size_t i;
        json_t *e;
        json_array_foreach(kl, i, e) {
            json_int_t li = json_is_integer(e) ? json_integer_value(e) : (json_int_t)1 << 40;
            if (li < 0) li += L;
            if (li < 0 || li >= L) {
                api_error_set(err, 400, "invalid_request_error", P,
                              "kv_compression.keep_layers entries must be integers in [-%d, %d)", L, L);
                return -1;
            }
            eng_kv_keep_layer_add(&p->kv, (int)li);
        }
    }
    const char *why = NULL;
    if (eng_kv_config_validate(&p->kv, &why) != D2_OK) {
        api_error_set(err, 400, "invalid_request_error", P, "kv_compression: %s", why ? why : "invalid configuration");
        return -1;
    }
    p->has_kv = true;
    return 0;
}

static int32_t *ids_from_array(json_t *arr, int n_vocab, int *n_out) {
    size_t n = json_array_size(arr);
    int32_t *ids = malloc(sizeof(int32_t) * (n ? n : 1));
    if (!ids) return NULL;
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= n_vocab) {
            free(ids);
            return NULL;
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    *n_out = (int)n;
    return ids;
}

static int parse_prompt(json_t *root, const api_limits *lim, api_gen_params *p, api_error *err) {
    json_t *pr = json_object_get(root, "prompt");
    if (!pr || json_is_null(pr)) {
        api_error_set(err, 400, "invalid_request_error", "prompt", "'prompt' is required");
        return -1;
    }
    if (json_is_string(pr)) {
        p->prompt_text[0] = strdup(json_string_value(pr));
        p->n_prompts = 1;
        return p->prompt_text[0] ? 0 : -1;
    }
    if (!json_is_array(pr) || json_array_size(pr) == 0) {
        api_error_set(err, 400, "invalid_request_error", "prompt",
                      "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids");
        return -1;
    }
    json_t *first = json_array_get(pr, 0);
    if (json_is_integer(first)) { /* one prompt as token ids */
        int n = 0;
        p->prompt_ids[0] = ids_from_array(pr, lim->n_vocab, &n);
        if (!p->prompt_ids[0]) {
            api_error_set(err, 400, "invalid_request_error", "prompt",
                          "token ids in 'prompt' must be integers in [0, %d)", lim->n_vocab);
            return -1;
        }
        p->prompt_n_ids[0] = n;
        p->n_prompts = 1;
        return 0;
    }
    size_t n = json_array_size(pr);
    if (n > API_MAX_PROMPTS) {
        api_error_set(err, 400, "invalid_request_error", "prompt", "at most %d prompts per request",
                      API_MAX_PROMPTS);
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(pr, i);
        if (json_is_string(v)) {
            p->prompt_text[i] = strdup(json_string_value(v));
        } else if (json_is_array(v) && json_array_size(v) > 0) {
            int k = 0;
            p->prompt_ids[i] = ids_from_array(v, lim->n_vocab, &k);
            if (!p->prompt_ids[i]) {
                p->n_prompts = (int)i + 1;
                api_error_set(err, 400, "invalid_request_error", "prompt",
                              "token ids in 'prompt' must be integers in [0, %d)", lim->n_vocab);
                return -1;
            }
            p->prompt_n_ids[i] = k;
        } else {
            p->n_prompts = (int)i;
            api_error_set(err, 400, "invalid_request_error", "prompt",
                          "each element of 'prompt' must be a string or a non-empty list of token ids");
            return -1;
        }
        p->n_prompts = (int)i + 1;
    }
    return 0;
}

static int parse_messages(json_t *root, api_gen_params *p, api_error *err) {
    json_t *m = json_object_get(root, "messages");
    if (!json_is_array(m) || json_array_size(m) == 0) {
        api_error_set(err, 400, "invalid_request_error", "messages",
                      "'messages' must be a non-empty list of messages");
        return -1;
    }
    size_t i;
    json_t *msg;
    json_array_foreach(m, i, msg) {
        json_t *role = json_object_get(msg, "role");
        if (!json_is_object(msg) || !json_is_string(role)) {
            api_error_set(err, 400, "invalid_request_error", "messages",
                          "messages[%zu] must be an object with a string 'role'", i);
            return -1;
        }
        const char *r = json_string_value(role);
        if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant") && strcmp(r, "tool") &&
            strcmp(r, "developer")) {
            api_error_set(err, 400, "invalid_request_error", "messages",
                          "messages[%zu].role '%s' is not one of system, developer, user, assistant, tool", i, r);
            return -1;
        }
        json_t *c = json_object_get(msg, "content");
        if (c && !json_is_null(c) && !json_is_string(c) && !json_is_array(c)) {
            api_error_set(err, 400, "invalid_request_error", "messages",
                          "messages[%zu].content must be a string or a list of content parts", i);
            return -1;
        }
        if (json_is_array(c)) {
            size_t k;
            json_t *part;
            json_array_foreach(c, k, part) {
                json_t *type = json_object_get(part, "type");
                if (!json_is_object(part) || !json_is_string(type)) {
                    api_error_set(err, 400, "invalid_request_error", "messages",
                                  "messages[%zu].content[%zu] must be an object with a string 'type'", i, k);
                    return -1;
                }
                if (strcmp(json_string_value(type), "text") != 0) {
                    api_error_set(err, 400, "invalid_request_error", "messages",
                                  "messages[%zu].content[%zu]: content parts of type '%.64s' are not supported "
                                  "(only 'text')", i, k, json_string_value(type));
                    return -1;
                }
                if (!json_is_string(json_object_get(part, "text"))) {
                    api_error_set(err, 400, "invalid_request_error", "messages",
                                  "messages[%zu].content[%zu].text must be a string", i, k);
                    return -1;
                }
            }
        }
        if ((!c || json_is_null(c)) && strcmp(r, "assistant") != 0) {
            api_error_set(err, 400, "invalid_request_error", "messages",
                          "messages[%zu].content is required for role '%s'", i, r);
            return -1;
        }
    }
    /* What templates see: text parts joined into one string (as OpenAI and
     * vLLM treat the two forms alike), and an assistant turn without content
     * (allowed by OpenAI, e.g. next to tool_calls) as "" unless it carries
     * tool_calls, so a template that concatenates content does not fail on
     * null. Messages are copied (shallowly) only when one changes. */
    json_t *norm = json_array();
    if (!norm) { api_error_set(err, 500, "internal_error", NULL, "out of memory"); return -1; }
    json_array_foreach(m, i, msg) {
        json_t *c = json_object_get(msg, "content");
        json_t *joined = NULL;
        if (json_is_array(c)) {
            size_t total = 0, k;
            json_t *part;
            json_array_foreach(c, k, part) total += json_string_length(json_object_get(part, "text"));
            char *s = malloc(total + 1);
            size_t at = 0;
            if (s) {
                json_array_foreach(c, k, part) {
                    json_t *t = json_object_get(part, "text");
                    memcpy(s + at, json_string_value(t), json_string_length(t));
                    at += json_string_length(t);
                }
                joined = json_stringn_nocheck(s, at);
                free(s);
            }
            if (!joined) { json_decref(norm); api_error_set(err, 500, "internal_error", NULL, "out of memory"); return -1; }
        } else if ((!c || json_is_null(c)) && !json_object_get(msg, "tool_calls")) {
            joined = json_string("");
        }
        if (joined) {
            json_t *copy = json_copy(msg);
            if (!copy || json_object_set_new(copy, "content", joined) != 0 || json_array_append_new(norm, copy) != 0) {
                json_decref(norm);
                api_error_set(err, 500, "internal_error", NULL, "out of memory");
                return -1;
            }
        } else {
            json_array_append(norm, msg);
        }
    }
    p->messages = norm;
    json_t *tools = json_object_get(root, "tools");
    if (tools && !json_is_null(tools)) {
        if (!json_is_array(tools)) {
            api_error_set(err, 400, "invalid_request_error", "tools", "'tools' must be a list");
            return -1;
        }
        p->tools = json_incref(tools);
    }
    return 0;
}

int api_parse_gen(const char *body, size_t len, api_kind kind, const api_limits *lim,
                  api_gen_params *p, api_error *err) {
    memset(p, 0, sizeof *p);
    p->kind = kind;
    p->max_tokens = -1;
    p->temperature = 1.0f;
    p->top_p = 1.0f;
    p->repetition_penalty = 1.0f;
    p->n = 1;
    p->logprobs = -1;
    p->add_generation_prompt = true;
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        api_error_set(err, 400, "invalid_request_error", NULL, "malformed JSON body: %s (line %d, column %d)",
                      jerr.text, jerr.line, jerr.column);
        return D2_EJSON;
    }
    if (!json_is_object(root)) BAD(NULL, "the request body must be a JSON object");
    json_t *model = json_object_get(root, "model");
    if (model && !json_is_null(model)) {
        if (!json_is_string(model)) BAD("model", "'model' must be a string");
        p->model = strdup(json_string_value(model));
    }
    if (kind == API_COMPLETIONS) {
        if (parse_prompt(root, lim, p, err)) goto fail;
    } else {
        if (parse_messages(root, p, err)) goto fail;
        bool agp = true;
        if (get_bool(root, "add_generation_prompt", &agp, err) < 0) goto fail;
        p->add_generation_prompt = agp;
    }
    long long ll;
    double d;
    int r;
    if ((r = get_int(root, "max_tokens", 1, lim->max_tokens_limit, &ll, err)) < 0) goto fail;
    if (r) p->max_tokens = (int)ll;
    if ((r = get_int(root, "max_completion_tokens", 1, lim->max_tokens_limit, &ll, err)) < 0) goto fail;
    if (r) p->max_tokens = (int)ll;
    if ((r = get_num(root, "temperature", 0, 2, &d, err)) < 0) goto fail;
    if (r) p->temperature = (float)d;
    if ((r = get_num(root, "top_p", 0, 1, &d, err)) < 0) goto fail;
    if (r) {
        /* checked as the float the sampler gets: 1e-300 is 0 there */
        if (!((float)d > 0)) BAD("top_p", "'top_p' must be greater than 0");
        p->top_p = (float)d;
    }
    if ((r = get_int(root, "top_k", -1, 1 << 30, &ll, err)) < 0) goto fail;
    if (r) p->top_k = ll < 0 ? 0 : (int)ll;
    if ((r = get_num(root, "min_p", 0, 1, &d, err)) < 0) goto fail;
    if (r) p->min_p = (float)d;
    if ((r = get_num(root, "presence_penalty", -2, 2, &d, err)) < 0) goto fail;
    if (r) p->presence_penalty = (float)d;
    if ((r = get_num(root, "frequency_penalty", -2, 2, &d, err)) < 0) goto fail;
    if (r) p->frequency_penalty = (float)d;
    if ((r = get_num(root, "repetition_penalty", 0, 10, &d, err)) < 0) goto fail;
    if (r) {
        if (d <= 0) BAD("repetition_penalty", "'repetition_penalty' must be greater than 0");
        p->repetition_penalty = (float)d;
    }
    if ((r = get_int(root, "seed", INT64_MIN, INT64_MAX, &ll, err)) < 0) goto fail;
    if (r) { p->has_seed = true; p->seed = (uint64_t)ll; }
    if ((r = get_int(root, "n", 1, lim->max_n, &ll, err)) < 0) goto fail;
    if (r) p->n = (int)ll;
    json_t *stop = json_object_get(root, "stop");
    if (stop && !json_is_null(stop)) {
        if (json_is_string(stop)) {
            if (json_string_length(stop) == 0) BAD("stop", "stop strings must not be empty");
            p->stop[p->n_stop++] = strdup(json_string_value(stop));
        } else if (json_is_array(stop)) {
            if (json_array_size(stop) > API_MAX_STOP) BAD("stop", "at most %d stop strings", API_MAX_STOP);
            size_t i;
            json_t *v;
            json_array_foreach(stop, i, v) {
                if (!json_is_string(v) || json_string_length(v) == 0)
                    BAD("stop", "'stop' must be a non-empty string or a list of them");
                p->stop[p->n_stop++] = strdup(json_string_value(v));
            }
        } else {
            BAD("stop", "'stop' must be a string or a list of strings");
        }
    }
    if (kind == API_COMPLETIONS) {
        if ((r = get_int(root, "logprobs", 0, 20, &ll, err)) < 0) goto fail;
        if (r) p->logprobs = (int)ll;
        bool echo = false;
        if (get_bool(root, "echo", &echo, err) < 0) goto fail;
        p->echo = echo;
    } else {
        bool lp = false;
        if (get_bool(root, "logprobs", &lp, err) < 0) goto fail;
        if ((r = get_int(root, "top_logprobs", 0, 20, &ll, err)) < 0) goto fail;
        if (r && !lp) BAD("top_logprobs", "'top_logprobs' requires 'logprobs': true");
        if (lp) p->logprobs = r ? (int)ll : 0;
    }
    json_t *bias = json_object_get(root, "logit_bias");
    if (bias && !json_is_null(bias)) {
        if (!json_is_object(bias)) BAD("logit_bias", "'logit_bias' must be an object of token id to bias");
        size_t nb = json_object_size(bias);
        if (nb > 1024) BAD("logit_bias", "at most 1024 logit_bias entries");
        p->logit_bias = calloc(nb ? nb : 1, sizeof *p->logit_bias);
        if (!p->logit_bias) BAD(NULL, "out of memory");
        const char *key;
        json_t *v;
        json_object_foreach(bias, key, v) {
            char *end = NULL;
            /* decimal digits only: strtol alone takes " 5" and "+5" */
            long tok = key[0] >= '0' && key[0] <= '9' ? strtol(key, &end, 10) : -1;
            if (tok < 0 || end == key || *end || tok < 0 || tok >= lim->n_vocab)
                BAD("logit_bias", "logit_bias key '%s' is not a token id in [0, %d)", key, lim->n_vocab);
            if (!json_is_number(v) || json_number_value(v) < -100 || json_number_value(v) > 100)
                BAD("logit_bias", "logit_bias values must be numbers between -100 and 100");
            p->logit_bias[p->n_logit_bias++] = (eng_logit_bias){(int32_t)tok, (float)json_number_value(v)};
        }
    }
    bool b = false;
    if (get_bool(root, "stream", &b, err) < 0) goto fail;
    p->stream = b;
    json_t *so = json_object_get(root, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so)) BAD("stream_options", "'stream_options' must be an object");
        b = false;
        if (get_bool(so, "include_usage", &b, err) < 0) goto fail;
        p->include_usage = b;
    }
    b = false;
    if (get_bool(root, "ignore_eos", &b, err) < 0) goto fail;
    p->ignore_eos = b;
    if (parse_kv(root, lim, p, err)) goto fail;
    json_t *user = json_object_get(root, "user");
    if (user && !json_is_null(user)) {
        if (!json_is_string(user)) BAD("user", "'user' must be a string");
        p->user = strdup(json_string_value(user));
    }
    json_decref(root);
    return D2_OK;
fail:
    json_decref(root);
    api_gen_params_free(p);
    return D2_EINVAL;
}

long api_find_stop(const char *text, size_t len, char *const *stop, int n_stop, size_t *partial) {
    long best = -1;
    *partial = 0;
    for (int s = 0; s < n_stop; s++) {
        size_t sl = strlen(stop[s]);
        if (sl == 0) continue;
        for (size_t i = 0; i + sl <= len; i++) {
            if (memcmp(text + i, stop[s], sl) == 0) {
                if (best < 0 || (long)i < best) best = (long)i;
                break;
            }
        }
        /* longest suffix of text that is a proper prefix of stop[s] */
        size_t maxk = sl - 1 < len ? sl - 1 : len;
        for (size_t k = maxk; k > 0; k--) {
            if (memcmp(text + len - k, stop[s], k) == 0) {
                if (k > *partial) *partial = k;
                break;
            }
        }
    }
    return best;
}
