"""llama.cpp's per-tensor type choices (llama_tensor_get_type in src/llama-quant.cpp), re-stated
in lowbit.plans.gguf_mixes: named tensors of SmolLM2-shaped models checked against the choices
read from llama.cpp's source, and every tensor of a Q4_K_M file that llama.cpp itself wrote."""
from __future__ import annotations

import re

import pytest

from lowbit.plans.gguf_mixes import MIXES, fallback, tensor_type, use_more_bits

N_LAYERS = 30  # SmolLM2-135M: hidden 576 (not a multiple of 256), intermediate 1536 (6 x 256)
SHAPES = {"attn_q": (576, 576), "attn_k": (192, 576), "attn_v": (192, 576), "attn_output": (576, 576),
          "ffn_gate": (1536, 576), "ffn_up": (1536, 576), "ffn_down": (576, 1536), "attn_norm": (576,)}


def smol(mix: str, role: str, layer: int, n_gqa: int = 3) -> str:
    return tensor_type(mix, f"blk.{layer}.{role}.weight", SHAPES[role], layer, N_LAYERS, n_gqa=n_gqa)


def test_use_more_bits_picks_first_and_last_eighth_and_every_third():
    picked = [i for i in range(N_LAYERS) if use_more_bits(i, N_LAYERS)]
    # n/8 = 3, 7n/8 = 26: layers 0-2, 26-29, and 3 + 2, 3 + 5, ... in between
    assert picked == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


@pytest.mark.parametrize("mix,role,layer,expected", [
    # Q4_K_M: attn_v / ffn_down get Q6_K in use_more_bits layers; 576-long rows fall back (Q4_K->Q5_0, Q6_K->Q8_0)
    ("Q4_K_M", "attn_v", 0, "Q8_0"), ("Q4_K_M", "attn_v", 3, "Q5_0"), ("Q4_K_M", "attn_v", 5, "Q8_0"),
    ("Q4_K_M", "attn_v", 27, "Q8_0"), ("Q4_K_M", "ffn_down", 0, "Q6_K"), ("Q4_K_M", "ffn_down", 3, "Q4_K"),
    ("Q4_K_M", "attn_q", 0, "Q5_0"), ("Q4_K_M", "ffn_up", 0, "Q5_0"), ("Q4_K_M", "attn_norm", 0, "F32"),
    # Q5_K_M: the same layers get Q6_K; Q5_K falls back to Q5_1
    ("Q5_K_M", "ffn_down", 0, "Q6_K"), ("Q5_K_M", "ffn_down", 3, "Q5_K"), ("Q5_K_M", "attn_q", 3, "Q5_1"),
    # Q4_K_S: attn_v of the first 4 layers and ffn_down of the first n/8 get Q5_K
    ("Q4_K_S", "attn_v", 3, "Q5_1"), ("Q4_K_S", "attn_v", 4, "Q5_0"), ("Q4_K_S", "ffn_down", 2, "Q5_K"),
    ("Q4_K_S", "ffn_down", 3, "Q4_K"),
    # Q3_K_M: attn_v Q5_K in layers 0-1 else Q4_K; ffn_down Q5_K below n/16 else Q4_K; attn_output Q4_K
    ("Q3_K_M", "attn_v", 1, "Q5_1"), ("Q3_K_M", "attn_v", 2, "Q5_0"), ("Q3_K_M", "ffn_down", 0, "Q5_K"),
    ("Q3_K_M", "ffn_down", 1, "Q4_K"), ("Q3_K_M", "attn_output", 7, "Q5_0"), ("Q3_K_M", "attn_q", 7, "Q4_0"),
    # Q2_K: ffn_down and attn_output Q3_K; Q2_K/Q3_K on ragged rows fall back to Q4_0
    ("Q2_K", "ffn_down", 9, "Q3_K"), ("Q2_K", "attn_output", 9, "Q4_0"), ("Q2_K", "attn_q", 9, "Q4_0"),
    ("Q2_K", "attn_v", 9, "Q4_0"),
    ("Q8_0", "attn_v", 0, "Q8_0"), ("Q8_0", "ffn_down", 0, "Q8_0"), ("Q8_0", "attn_norm", 0, "F32"),
    ("F16", "attn_q", 0, "F16"), ("F16", "attn_norm", 0, "F32"), ("F32", "ffn_down", 0, "F32"),
])
def test_named_tensors_get_llama_cpp_types(mix, role, layer, expected):
    assert smol(mix, role, layer) == expected


def test_q2_k_attn_v_depends_on_gqa():
    assert smol("Q2_K", "attn_v", 9, n_gqa=3) == "Q4_0"     # Q3_K, ragged -> Q4_0
    assert smol("Q2_K", "attn_v", 9, n_gqa=4) == "Q5_0"     # Q4_K, ragged -> Q5_0
    assert tensor_type("Q2_K", "blk.9.attn_v.weight", (256, 1024), 9, 30, n_gqa=4) == "Q4_K"


def test_tied_token_embd_is_chosen_as_the_output():
    # tied: token_embd is quantized like output.weight: Q8_0 on a ragged row, else Q6_K
    assert tensor_type("Q4_K_M", "token_embd.weight", (49152, 576), None, 30) == "Q8_0"
    assert tensor_type("Q4_K_M", "token_embd.weight", (32000, 1024), None, 30) == "Q6_K"
    # untied: the output gets Q6_K, token_embd keeps the base type
    assert tensor_type("Q4_K_M", "output.weight", (32000, 1024), None, 30, has_output=True) == "Q6_K"
    assert tensor_type("Q4_K_M", "token_embd.weight", (32000, 1024), None, 30, has_output=True) == "Q4_K"
    assert tensor_type("Q8_0", "output.weight", (32000, 1024), None, 30, has_output=True) == "Q8_0"
    assert tensor_type("F16", "token_embd.weight", (49152, 576), None, 30) == "F16"


def test_fallback_chain_ends_in_f16():
    assert [fallback(t, 576) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")] == \
        ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert fallback("Q4_K", 100) == "F16" and fallback("Q8_0", 100) == "F16"
    assert fallback("Q4_K", 1536) == "Q4_K"


def test_unknown_mix_and_missing_layer_are_refused():
    with pytest.raises(ValueError, match="known: F32"):
        tensor_type("Q4_K_X", "blk.0.attn_q.weight", (576, 576), 0, 30)
    with pytest.raises(ValueError, match="layer index"):
        tensor_type("Q4_K_M", "blk.0.ffn_down.weight", (576, 1536), None, 30)
    assert set(MIXES) == {"Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M", "Q2_K", "Q8_0", "F16", "F32"}


@pytest.mark.real_model
def test_every_tensor_of_llama_cpps_own_gemma3_q4_k_m():
    """The Gemma 3 270M package ships a Q4_K_M written by llama-quantize: the mix function must
    reproduce its type for all 236 tensors (640-long rows: fallbacks on most of them)."""
    from gguf import GGUFReader

    from lowbit.models.registry import resolve

    reader = GGUFReader(str(resolve("gemma3-270m").path))
    assert reader.fields["general.file_type"].contents() == MIXES["Q4_K_M"].file_type
    names = {t.name for t in reader.tensors}
    n_layers = reader.fields["gemma3.block_count"].contents()
    n_gqa = (reader.fields["gemma3.attention.head_count"].contents()
             // reader.fields["gemma3.attention.head_count_kv"].contents())
    wrong = []
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        shape = tuple(int(s) for s in reversed(list(t.shape)))
        ours = tensor_type("Q4_K_M", t.name, shape, int(m.group(1)) if m else None, n_layers, n_gqa=n_gqa,
                           has_output="output.weight" in names)
        if ours != t.tensor_type.name:
            wrong.append((t.name, ours, t.tensor_type.name))
    assert len(reader.tensors) == 236 and not wrong
    assert {t.tensor_type.name for t in reader.tensors} >= {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"}
