#!/usr/bin/env python3
"""loadtest/peer_gguf.py — writes the random-weight Llama GGUF that the peer table
(loadtest/peers.sh) is measured on, so that d2od and llama-server load the same file.

    python3 loadtest/peer_gguf.py --gguf-py ~/llama.cpp/gguf-py --out rand125m-f16.gguf [--ctx 2048]

Shape (the review's 124.7M model): 12 layers, dim 768, 12 query / 4 KV heads (head dim
64), FFN 2048, vocabulary 32,000, untied output; weights N(0, 0.02^2) in F16 from numpy's
PCG64 with --seed (default 1), norms 1.0 in F32; llama.cpp's tensor names; the Llama-2
tokenizer metadata copied from the shared asset llama-2-tiny-random.gguf. A Q8_0 copy is
made with llama.cpp's own quantizer (`llama-quantize IN.gguf OUT.gguf Q8_0`).

By hand only (not part of any test): it needs llama.cpp's `gguf-py` package (from a
llama.cpp checkout the user built llama-server from, see loadtest/README.md) and numpy
(Debian: python3-numpy, run it with /usr/bin/python3 if another python3 comes first).
"""
import argparse
import os
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf-py", required=True, help="llama.cpp's gguf-py folder")
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--ctx", type=int, default=2048, help="llama.context_length")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tokenizer-gguf", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                    "../../shared/assets/models/llama-2-tiny-random/llama-2-tiny-random.gguf"),
                    help="GGUF whose tokenizer.ggml.* metadata is copied (32,000 tokens)")
    a = ap.parse_args()
    sys.path.insert(0, a.gguf_py)
    import numpy as np
    import gguf

    layers, dim, heads, kv_heads, ffn, vocab = 12, 768, 12, 4, 2048, 32000
    head_dim = dim // heads
    src = gguf.GGUFReader(a.tokenizer_gguf)
    tokens = src.fields["tokenizer.ggml.tokens"].contents()
    if len(tokens) != vocab:
        sys.exit(f"peer_gguf: {a.tokenizer_gguf} has {len(tokens)} tokens, want {vocab}")

    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("rand125m")
    w.add_context_length(a.ctx)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(1)  # mostly F16
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(src.fields["tokenizer.ggml.scores"].contents())
    w.add_token_types(src.fields["tokenizer.ggml.token_type"].contents())
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    rng = np.random.default_rng(a.seed)

    def weight(rows, cols):  # numpy (rows, cols) is GGUF ne = [cols, rows]
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    ones = lambda n: np.ones(n, dtype=np.float32)
    w.add_tensor("token_embd.weight", weight(vocab, dim))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(dim))
        w.add_tensor(p + "attn_q.weight", weight(dim, dim))
        w.add_tensor(p + "attn_k.weight", weight(kv_heads * head_dim, dim))
        w.add_tensor(p + "attn_v.weight", weight(kv_heads * head_dim, dim))
        w.add_tensor(p + "attn_output.weight", weight(dim, dim))
        w.add_tensor(p + "ffn_norm.weight", ones(dim))
        w.add_tensor(p + "ffn_gate.weight", weight(ffn, dim))
        w.add_tensor(p + "ffn_up.weight", weight(ffn, dim))
        w.add_tensor(p + "ffn_down.weight", weight(dim, ffn))
    w.add_tensor("output_norm.weight", ones(dim))
    w.add_tensor("output.weight", weight(vocab, dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"peer_gguf: wrote {a.out}")


if __name__ == "__main__":
    main()
