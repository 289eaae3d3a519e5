"""Fusing orthogonal rotations into a model (QuaRot's and SpinQuant's R1, R2, R4), as data per family.

Row-vector convention: the residual stream h [T, hidden] becomes h R1 everywhere, which leaves
the model's function unchanged because
  * an RMSNorm without weight commutes with R1: rms(h R1) = rms(h) (R1 is orthogonal), so the
    norms' weights are first folded into the linears they feed (fuse_norms);
  * a linear reading the normalized stream, y = x Wᵀ, becomes W R1 (x R1 R1ᵀ Wᵀ = x Wᵀ);
  * a linear writing to the stream (o_proj, down_proj) becomes R1ᵀ W (its bias b R1);
  * the embedding rows become E R1 and the LM head W_h R1 (a tied head is untied first: after the
    final norm is folded in, the head is no longer the embedding).
R2 (head_dim × head_dim) goes per head between v_proj (rows: v R2) and o_proj (columns: R2ᵀ).
R4 is online: down_proj's input is transformed at run time by the normalized Hadamard M
(x -> x Mᵀ) and its weight becomes W Mᵀ. All arithmetic is float64; parameters keep their dtype.
Families whose norms sit between a sub-layer and the residual (Gemma 3's post-norms) cannot
take a fused R1: ArchSpec.rotation_refusal says why and check_rotatable raises it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .hadamard import hadamard, hadamard_transform

ONLINE = ("hadamard",)       # the online input transforms a linear may carry


def check_rotatable(spec) -> None:
    """ValueError with the family's reason when R1 cannot be fused into it."""
    if spec.rotation_refusal:
        raise ValueError(f"{spec.family}: rotations refused: {spec.rotation_refusal}")
    if not spec.residual_writers or len(spec.value_out) != 2:
        raise ValueError(f"{spec.family}: its spec names no residual writers / (v, o) pair; rotations need them")


def _check_orthogonal(R: Tensor, n: int, what: str) -> Tensor:
    R = R.detach().double()
    if R.shape != (n, n):
        raise ValueError(f"{what} must be [{n}, {n}], got {list(R.shape)}")
    err = (R.T @ R - torch.eye(n, dtype=R.dtype)).abs().max().item()
    if err > 1e-6:
        raise ValueError(f"{what} is not orthogonal (max |RᵀR − I| = {err:.2e})")
    return R


def _layers(model: nn.Module, spec) -> list[nn.Module]:
    return list(model.get_submodule(spec.layers))


def _set(p: Tensor, value: Tensor) -> None:
    p.copy_(value.to(p.dtype))


# The rotations as pure functions of a weight (also differentiable: SpinQuant trains through them).
def rotate_reader(W: Tensor, R1: Tensor) -> Tensor:
    """A linear reading the rotated stream, or the embedding/head rows: W [out, hidden] -> W R1."""
    return W @ R1


def rotate_writer(W: Tensor, R1: Tensor) -> Tensor:
    """A linear writing to the stream: W [hidden, in] -> R1ᵀ W (its bias b -> b R1 = rotate_reader)."""
    return R1.T @ W


def rotate_value_rows(W: Tensor, R2: Tensor) -> Tensor:
    """v_proj's rows (or bias) per head: W [kv*hd, ...] -> per head R2ᵀ W_h."""
    hd = R2.shape[0]
    Wh = W.reshape(-1, hd, *W.shape[1:])                  # [kv*hd, ...] -> [kv, hd, ...]
    return torch.einsum("ji,kj...->ki...", R2, Wh).reshape(W.shape)


def rotate_out_columns(W: Tensor, R2: Tensor) -> Tensor:
    """o_proj's input columns per head: W [hidden, h*hd] -> per head W_h R2."""
    hd = R2.shape[0]
    return (W.reshape(W.shape[0], -1, hd) @ R2).reshape(W.shape)   # [hidden, h*hd] -> [hidden, h, hd]


def untie_head(model: nn.Module, spec) -> None:
    """Give the LM head its own weight (a copy of the embedding's) and mark the config untied."""
    head, embed = model.get_submodule(spec.head), model.get_submodule(spec.embed)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


@torch.no_grad()
def fuse_norms(model: nn.Module, spec) -> None:
    """Fold each RMSNorm weight that feeds linears (and the final norm) into those linears:
    W diag(offset + w); the norm then computes x / rms(x) (its weight set to 1 − offset)."""
    untie_head(model, spec)
    offset = spec.norm_offset
    pairs = [(layer.get_submodule(g.source), [layer.get_submodule(n) for n in g.linears])
             for layer in _layers(model, spec) for g in spec.groups if g.source_kind == "norm"]
    pairs.append((model.get_submodule(spec.final_norm), [model.get_submodule(spec.head)]))
    for norm, linears in pairs:
        if getattr(norm, "bias", None) is not None:
            raise ValueError("a norm with a bias cannot be folded into the linears it feeds")
        g = offset + norm.weight.double()                      # [hidden]: the norm's per-channel scale
        for linear in linears:
            _set(linear.weight, linear.weight.double() * g[None, :])   # input columns [out, in] * g[1, in]
        norm.weight.fill_(1.0 - offset)


def _plain_norms(model: nn.Module, spec) -> bool:
    norms = [layer.get_submodule(g.source) for layer in _layers(model, spec) for g in spec.groups
             if g.source_kind == "norm"] + [model.get_submodule(spec.final_norm)]
    return all(bool((n.weight == 1.0 - spec.norm_offset).all()) for n in norms)


@torch.no_grad()
def rotate_residual(model: nn.Module, spec, R1: Tensor) -> None:
    """The residual stream h -> h R1 (R1 [hidden, hidden] orthogonal); norms must be fused first."""
    check_rotatable(spec)
    embed, head = model.get_submodule(spec.embed), model.get_submodule(spec.head)
    R1 = _check_orthogonal(R1, embed.weight.shape[1], "R1")
    if not _plain_norms(model, spec):
        raise ValueError("fuse the norms first (fuse_norms): a weighted RMSNorm does not commute with R1")
    if head.weight.data_ptr() == embed.weight.data_ptr():
        raise ValueError("the LM head is tied to the embedding: untie it first (fuse_norms does)")
    _set(embed.weight, rotate_reader(embed.weight.double(), R1))    # rows [vocab, hidden] @ R1
    _set(head.weight, rotate_reader(head.weight.double(), R1))
    for layer in _layers(model, spec):
        for name in spec.residual_readers:
            w = layer.get_submodule(name).weight
            _set(w, rotate_reader(w.double(), R1))
        for name in spec.residual_writers:
            linear = layer.get_submodule(name)
            _set(linear.weight, rotate_writer(linear.weight.double(), R1))
            if linear.bias is not None:
                _set(linear.bias, rotate_reader(linear.bias.double(), R1))


@torch.no_grad()
def rotate_heads(model: nn.Module, spec, head_dim: int, R2: Tensor) -> None:
    """Per head, v -> v R2 (v_proj's output rows) and o_proj's input columns of that head -> R2ᵀ."""
    check_rotatable(spec)
    R2 = _check_orthogonal(R2, head_dim, "R2")
    v_name, o_name = spec.value_out
    for layer in _layers(model, spec):
        v, o = layer.get_submodule(v_name), layer.get_submodule(o_name)
        _set(v.weight, rotate_value_rows(v.weight.double(), R2))
        if v.bias is not None:
            _set(v.bias, rotate_value_rows(v.bias.double(), R2))
        _set(o.weight, rotate_out_columns(o.weight.double(), R2))


def _online_hadamard(module: nn.Module, args: tuple):
    return (hadamard_transform(args[0]),) + tuple(args[1:])


def set_input_transform(linear: nn.Module, kind: str | None) -> None:
    """Mark `linear` (an nn.Linear) as transforming its input online, and do it in its forward
    (a pre-hook, so calibration hooks registered later see the transformed input)."""
    if kind is None:
        return
    if kind not in ONLINE:
        raise ValueError(f"unknown online transform {kind!r} (known: {', '.join(ONLINE)})")
    linear.input_transform = kind
    linear.register_forward_pre_hook(_online_hadamard)


def input_transform_of(linear: nn.Module) -> str | None:
    """The online input transform set_input_transform gave `linear` (or a QuantLinear holds)."""
    return getattr(linear, "input_transform", None)


@torch.no_grad()
def rotate_down_input(model: nn.Module, spec) -> None:
    """R4: down_proj's input x -> x Mᵀ online (M = H / sqrt(n), the normalized Hadamard), W -> W Mᵀ."""
    check_rotatable(spec)
    for layer in _layers(model, spec):
        linear = layer.get_submodule(spec.down)
        if input_transform_of(linear) is not None:
            raise ValueError(f"{spec.down} already transforms its input")
        n = linear.weight.shape[1]
        M = hadamard(n) / math.sqrt(n)                                 # [n, n] orthogonal
        _set(linear.weight, linear.weight.double() @ M.T)
        set_input_transform(linear, "hadamard")
