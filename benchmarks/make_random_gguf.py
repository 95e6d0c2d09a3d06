"""Write a random-weight llama GGUF in a preset's shape (for speed/memory tests of models we don't ship).

    python benchmarks/make_random_gguf.py tinyllama-1.1b /tmp/tinyllama-random-q4_0.gguf --type q4_0
    python benchmarks/make_random_gguf.py llama-2-7b /tmp/llama2-7b-random-q4_0.gguf --type q4_0

Quantized blocks are random bytes with small float16 scales (every byte pattern is a valid block), written one
tensor at a time, so a 7B file is produced in about a minute with little memory. The vocabulary is synthetic
(SentencePiece-style: <unk>, <s>, </s>, 256 byte tokens, then filler pieces) so llama.cpp can load the file too.
"""

from __future__ import annotations

import argparse
import math

import gguf
import numpy as np

from llamaworks.config import get_preset

QTYPES = {"q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1,
          "q8_0": gguf.GGMLQuantizationType.Q8_0}


def random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = (rng.random((rows, cols // block, 1)) * 0.002 + 0.001).astype(np.float16)
    raw[..., 0:2] = scale.view(np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_1:  # minimum: centre the values around zero
        raw[..., 2:4] = (-7.5 * scale).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("preset")
    p.add_argument("out")
    p.add_argument("--type", default="q4_0", choices=sorted(QTYPES))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = get_preset(a.preset)
    qtype = QTYPES[a.type]
    rng = np.random.default_rng(a.seed)
    hd = cfg.head_size
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name(f"random {a.preset}")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_0 if a.type == "q4_0" else gguf.LlamaFileType.MOSTLY_Q8_0))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(cfg.vocab_size - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (cfg.vocab_size - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(cfg.vocab_size)])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    tensors: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (cfg.vocab_size, cfg.dim), "q")]
    for i in range(cfg.n_layers):
        b = f"blk.{i}."
        tensors += [(b + "attn_norm.weight", (cfg.dim,), "f"), (b + "attn_q.weight", (cfg.n_heads * hd, cfg.dim), "q"),
                    (b + "attn_k.weight", (cfg.kv_heads * hd, cfg.dim), "q"),
                    (b + "attn_v.weight", (cfg.kv_heads * hd, cfg.dim), "q"),
                    (b + "attn_output.weight", (cfg.dim, cfg.n_heads * hd), "q"),
                    (b + "ffn_norm.weight", (cfg.dim,), "f"), (b + "ffn_gate.weight", (cfg.hidden_dim, cfg.dim), "q"),
                    (b + "ffn_up.weight", (cfg.hidden_dim, cfg.dim), "q"),
                    (b + "ffn_down.weight", (cfg.dim, cfg.hidden_dim), "q")]
    tensors.append(("output_norm.weight", (cfg.dim,), "f"))
    if not cfg.tie_embeddings:
        tensors.append(("output.weight", (cfg.vocab_size, cfg.dim), "q"))
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    for name, shape, kind in tensors:
        if kind == "f":
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * math.prod(shape))
        else:
            nbytes = shape[0] * shape[1] // block * size
            w.add_tensor_info(name, (shape[0], shape[1] // block * size), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _name, shape, kind in tensors:
        if kind == "f":
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
        else:
            w.write_tensor_data(random_blocks(rng, shape[0], shape[1], qtype))
    w.close()
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
