/*
 * engine/model/model.h — model description and weight loading (internal to engine/;
 * the public face is engine/engine.h).
 *
 * A model is a plain struct of tensor views over memory-mapped files, so
 * loading is O(metadata) and weights are paged in by the OS. Two sources:
 *   - GGUF v3 (one file; tokenizer from its metadata)
 *   - Hugging Face directory: config.json, model.safetensors or sharded
 *     model-0000i-of-0000n.safetensors + model.safetensors.index.json,
 *     tokenizer.json, tokenizer_config.json, generation_config.json.
 * Architectures: LlamaForCausalLM (Llama 2/3/3.1/3.2 incl. rope_scaling
 * "llama3", TinyLlama, SmolLM), MistralForCausalLM, Qwen2ForCausalLM (QKV
 * bias). Tied embeddings and GQA.
 *
 * Conventions every backend relies on:
 *   - A 2-D weight tensor W is row-major [rows = out_features][cols = in_features],
 *     so y = W x. Embedding tables are [vocab][dim].
 *   - rope_neox: true when Q/K use the rotate-half pairing (x[i], x[i+hd/2]),
 *     as in HF checkpoints and GGUF qwen2; false for adjacent pairs
 *     (x[2i], x[2i+1]), as in GGUF llama (llama.cpp permutes Q/K on export).
 *   - Missing optional tensors (biases) have data == NULL.
 * Errors: every failure logs (D2_ERROR) a message naming the file and, where
 * relevant, the tensor, then returns a status; nothing aborts.
 */
#ifndef D2_ENGINE_MODEL_H
#define D2_ENGINE_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/util.h"

typedef enum eng_dtype {
    ENG_F32 = 0,
    ENG_F16 = 1,
    ENG_BF16 = 2,
    ENG_Q8_0 = 3, /* blocks of 32: f16 scale + 32 int8; rows are whole blocks */
} eng_dtype;

const char *eng_dtype_name(eng_dtype t);

typedef struct eng_tensor {
    const void *data;  /* borrowed from the model's mappings; NULL if absent */
    eng_dtype dtype;
    int64_t rows;      /* 1 for vectors */
    int64_t cols;
    const char *name;  /* the name in the file (borrowed) */
} eng_tensor;

typedef struct eng_layer_weights {
    eng_tensor attn_norm;      /* [dim] */
    eng_tensor wq, wk, wv, wo; /* [n_heads*hd][dim], [n_kv*hd][dim] x2, [dim][n_heads*hd] */
    eng_tensor bq, bk, bv;     /* Qwen2 only: [n_heads*hd], [n_kv*hd] x2 */
    eng_tensor ffn_norm;       /* [dim] */
    eng_tensor w_gate, w_up;   /* [ffn][dim] */
    eng_tensor w_down;         /* [dim][ffn] */
} eng_layer_weights;

/* Most layers a model may have (the loaders refuse more); per-layer sets such
 * as eng_kv_config.keep_layers are sized by it. */
#define ENG_MODEL_MAX_LAYERS 4096

typedef enum eng_arch { ENG_ARCH_LLAMA = 0, ENG_ARCH_MISTRAL = 1, ENG_ARCH_QWEN2 = 2 } eng_arch;

typedef struct eng_rope_scaling {
    int type;                /* 0 none, 1 llama3, 2 linear */
    float factor;
    float low_freq_factor;   /* llama3 */
    float high_freq_factor;  /* llama3 */
    int original_max_pos;    /* llama3 */
} eng_rope_scaling;

typedef struct eng_model_config {
    eng_arch arch;
    int n_layers, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab_size;
    int max_ctx;          /* max_position_embeddings / context_length */
    float rope_theta;
    float rms_eps;
    eng_rope_scaling rope_scaling;
    bool rope_neox;
    bool tied_embeddings; /* output == tok_embd */
    bool qkv_bias;
    int sliding_window;   /* 0 = none; > 0: a query at pos sees keys at pos-sliding_window+1..pos (Mistral) */
    int bos_id;           /* -1 when none */
    int eos_ids[8];       /* generation stop ids; n_eos of them */
    int n_eos;
} eng_model_config;

struct eng_tokenizer;

typedef struct eng_model {
    eng_model_config cfg;
    eng_tensor tok_embd;     /* [vocab][dim] */
    eng_tensor out_norm;     /* [dim] */
    eng_tensor output;       /* [vocab][dim]; == tok_embd when tied */
    eng_tensor rope_freqs;   /* GGUF only: rope_freqs.weight [head_dim/2] F32, the
                              * per-pair frequency divisors llama.cpp stores for
                              * Llama 3.1 scaling (data NULL when absent). When
                              * they match llama3 scaling with low 1 / high 4 /
                              * original 8192, cfg.rope_scaling is set to it, so
                              * backends may ignore this tensor. (additive) */
    eng_layer_weights *layers; /* [n_layers], owned */
    struct eng_tokenizer *tok; /* owned; NULL if the source has none */
    char *path;              /* owned copy of the path loaded */
    char *chat_template;     /* owned; NULL when none */
    /* private to model.c: the mappings and owned buffers behind the tensors */
    d2_mmap *maps;
    int n_maps;
    void *priv;
} eng_model;

/* Loads a model from a GGUF file or an HF directory (detected from path).
 * *out is owned by the caller; free with eng_model_free. Returns D2_OK,
 * D2_ENOENT, D2_EFORMAT (corrupt/truncated), D2_EUNSUPPORTED (architecture,
 * dtype), D2_ESHAPE, D2_ENOMEM. want_tokenizer=false skips the tokenizer. */
int eng_model_load(const char *path, bool want_tokenizer, eng_model **out);
void eng_model_free(eng_model *m); /* accepts NULL */

/* Loads only the tokenizer (additive): from a GGUF file (its metadata; a
 * vocab-only GGUF with no tensors is fine), an HF directory (tokenizer.json +
 * optional tokenizer_config.json) or a tokenizer.json path (its sibling
 * tokenizer_config.json is used when present). *out owned by the caller. */
int eng_model_load_tokenizer(const char *path, struct eng_tokenizer **out);

/* Loads a model from a GGUF image in memory (additive; used by tests and the
 * fuzz target). The buffer is borrowed and must outlive the model; name is
 * used in messages and as m->path. Same statuses as eng_model_load. */
int eng_model_load_gguf_buffer(const uint8_t *data, size_t size, const char *name,
                               bool want_tokenizer, eng_model **out);

/* Number of parameters and bytes of weights (each tensor counted once; a
 * tied output is not counted twice). */
int64_t eng_model_n_params(const eng_model *m);
int64_t eng_model_weight_bytes(const eng_model *m);

/* Dequantises row r of t into out[t->cols] (f32). Reference path, any dtype. */
void eng_tensor_row_f32(const eng_tensor *t, int64_t r, float *out);

/* Checks that every tensor a forward pass reads exists with the shape the config
 * implies (Q8_0 rows a multiple of 32). D2_ESHAPE, logged naming the tensor and
 * `who` (the caller, e.g. "cpu_backend"). Any thread. */
int eng_model_check_tensors(const eng_model *m, const char *who);

#endif
