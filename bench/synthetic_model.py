"""Write a synthetic Llama to disk, one safetensors shard per decoder layer, never holding more than one
layer: the model larger than RAM that bench/scale.py quantizes (issue 28), and its small cousin the
memory-capped test uses.

Statistics: linear weights Gaussian with std 1/sqrt(in) (the scale trained Llamas keep), norms near 1;
a few planted outlier input channels per layer (every layer's input norm scales the same channels up
by `outlier_gain`, as trained models' massive activation channels do), so activation-aware methods
have something to find. Tokenizer: byte-level (256 tokens + BOS) with the vocabulary padded to size.

    python bench/synthetic_model.py OUT --preset 7b          # hidden 4096, 32 layers, MLP 11008, vocab 32000, bf16
    python bench/synthetic_model.py OUT --preset capped      # 540 MB on disk, 1.1 GB in float32 (the capped test)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PRESETS = {
    "7b": dict(hidden=4096, layers=32, intermediate=11008, vocab=32000, heads=32, kv_heads=32),
    "small": dict(hidden=1024, layers=6, intermediate=2816, vocab=8192, heads=16, kv_heads=4),
    "capped": dict(hidden=1024, layers=20, intermediate=2816, vocab=8192, heads=16, kv_heads=4),   # 1.1 GB in float32
}


def tokenizer(vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    ids = {ch: i for i, ch in enumerate(alphabet)}
    ids["<s>"] = len(ids)
    for i in range(len(ids), vocab):                 # unused entries up to the model's vocabulary
        ids[f"<unused{i}>"] = i
    tok = Tokenizer(models.BPE(vocab=ids, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


def write_synthetic(out: Path, hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0, outliers: int = 4,
                    outlier_gain: float = 20.0) -> Path:
    """The model's files in `out` (config, shards, index, tokenizer); returns `out`."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=False, torch_dtype=str(dtype).split(".")[-1])
    config.save_pretrained(out)
    tokenizer(vocab).save_pretrained(out)
    hot = torch.randperm(hidden, generator=g)[:outliers]     # the planted outlier channels

    def gauss(o, i):
        return (torch.randn(o, i, generator=g) / i ** 0.5).to(dtype)

    def norm():
        w = 1 + 0.1 * torch.randn(hidden, generator=g)
        w[hot] *= outlier_gain
        return w.to(dtype)

    shards, weight_map = layers + 1, {}
    name = lambda n: f"model-{n:05d}-of-{shards:05d}.safetensors"
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                   p + "self_attn.q_proj.weight": gauss(heads * head_dim, hidden),
                   p + "self_attn.k_proj.weight": gauss(kv_heads * head_dim, hidden),
                   p + "self_attn.v_proj.weight": gauss(kv_heads * head_dim, hidden),
                   p + "self_attn.o_proj.weight": gauss(hidden, heads * head_dim),
                   p + "mlp.gate_proj.weight": gauss(intermediate, hidden),
                   p + "mlp.up_proj.weight": gauss(intermediate, hidden),
                   p + "mlp.down_proj.weight": gauss(hidden, intermediate)}
        save_file(tensors, str(out / name(i + 1)), metadata={"format": "pt"})
        weight_map.update({k: name(i + 1) for k in tensors})
        del tensors
    rest = {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(dtype),
            "model.norm.weight": (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype),
            "lm_head.weight": gauss(vocab, hidden)}
    save_file(rest, str(out / name(shards)), metadata={"format": "pt"})
    weight_map.update({k: name(shards) for k in rest})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write_synthetic(a.out, **PRESETS[a.preset], dtype=getattr(torch, a.dtype), seed=a.seed)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
