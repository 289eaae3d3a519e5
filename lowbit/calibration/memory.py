"""Peak memory of `lowbit quantize`, predicted from the model's sizes before any slow work.

The terms (bytes, summed: each is alive at the walk's worst moment):
  runtime       the interpreter with torch and transformers imported (measured once: RUNTIME)
  weights       the float model, float32 (the whole model is loaded before the walk; transformers maps its
                safetensors, so the pages a walk touches stay resident even after a linear is replaced)
  codes         each quantized linear's unpacked codes (uint8, one per weight) and its float W_dq
  activations   calibration hidden states [N, L, d] float32: the layer's inputs and outputs (two-pass),
                or (sequential) every sample's intermediates where it waits for down_proj's solve (its
                input [L, I], the residual, norm output, inputs and outputs); one sample at a time with
                --offload
  layer work    one sample's forward through a layer (the MLP's three [L, I] products, a few [L, d]),
                plus SDPA's [heads, L, L] scores where the mask is not plainly causal (sliding window)
  statistics    the Hessians of one layer's groups, float64 [in, in] each
  solver        GPTQ on the widest linear: two float32 copies of W and its codes, H in processing order
                and its Cholesky factor (float32, inverted in place)
A lazy sequential walk counts the larger of two moments: the widest group's solve (the layer's other
linears are codes by then) and a group's capture (the layer's float weights, a forward's work).
  save          the packed file, built in memory by safetensors before it is written
The walk's terms (activations to solver) and the save are not alive together: the larger counts.
`bench/scale.py` compares the sum with the measured peak RSS; the constants below come from it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..models.specs.base import ModelDims

RUNTIME = 420 * 2**20      # RSS of `python -c "import torch, transformers, lowbit"`, measured
GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak bytes, by term (module docstring)."""

    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)

    def describe(self) -> str:
        """One line: the total and its largest terms."""
        top = sorted(self.parts, key=lambda p: -p[1])[:4]
        return f"{self.total / GIB:.2f} GiB (" + ", ".join(f"{k} {b / GIB:.2f}" for k, b in top) + ")"


def linear_shapes(dims: ModelDims) -> list[tuple[int, int]]:
    """[out, in] of one decoder layer's linears (attention q, k, v, o; gated MLP gate, up, down)."""
    q, kv, d, i = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim, dims.hidden, dims.intermediate
    return [(q, d), (kv, d), (kv, d), (d, q), (i, d), (i, d), (d, i)]


def model_params(dims: ModelDims) -> int:
    """Parameters of the float model (norms included; the head counted once when tied)."""
    per_layer = sum(o * i for o, i in linear_shapes(dims)) + 4 * dims.hidden
    head = 0 if dims.tied_embeddings else dims.vocab * dims.hidden
    return dims.n_layers * per_layer + dims.vocab * dims.hidden + head + dims.hidden


def estimate_quantize_memory(dims: ModelDims, samples: int = 0, seq_len: int = 0, walk: str | None = None,
                             offload: bool = False, hessians: bool = True, sliding_window: bool = False,
                             quantize_head: bool = False, lazy: bool = False) -> MemoryEstimate:
    """Predicted peak of one quantize run (module docstring). walk: "sequential", "two-pass" or
    None (RTN: no calibration); hessians: whether the method accumulates H (GPTQ, AWQ, imatrix);
    lazy: one decoder layer in memory at a time (its float weights and its codes), the embedding and
    head beside it, each layer written as it finishes."""
    shapes = linear_shapes(dims)
    layer_weights = sum(o * i for o, i in shapes)
    head = dims.vocab * dims.hidden if quantize_head else 0
    if lazy and walk is None:   # RTN: one linear's float weight and W_dq at a time, beside the embedding
        weights = 4 * (dims.vocab * dims.hidden + 2 * max(o * i for o, i in shapes))
        linear_weights = layer_weights + head
    elif lazy:    # one layer's float weights (the embedding is dropped once the walk has its inputs)
        weights, linear_weights = 4 * (layer_weights + 4 * dims.hidden), layer_weights + head
    else:
        weights, linear_weights = 4 * model_params(dims), dims.n_layers * layer_weights + head
    # uint8 codes, and (in memory) each quantized linear's float32 W_dq beside the mapped weights
    parts = [("runtime", RUNTIME), ("weights", weights), ("codes", (1 if lazy else 5) * linear_weights)]
    save = linear_weights // 2 + 4 * dims.vocab * dims.hidden     # the packed file (or the last shard, lazy)
    walk_terms = []
    if walk is not None:
        tokens, d, i = samples * seq_len, dims.hidden, dims.intermediate
        if walk == "sequential":
            acts = 4 * tokens * (i + 4 * d)          # every sample waits at down_proj: its input [L, I], a few [L, d]
        else:
            acts = 4 * (1 if offload else samples) * seq_len * d * 2
        layer = 4 * seq_len * (3 * i + 6 * d)
        if sliding_window:
            layer += 4 * 2 * dims.heads * seq_len * seq_len
        widths = (d, dims.heads * dims.head_dim, d, i)     # the groups' inputs: q/k/v, o, gate/up, down
        # two-pass: every group's H at once; sequential: the group being solved (each freed after its solve)
        held = (max(widths),) if walk == "sequential" else widths
        stats = 8 * sum(n * n for n in held) if hessians else 0
        o, n = max(shapes, key=lambda s: s[0] * s[1])
        # GPTQ on the widest linear: two float32 copies of W (W with dead columns zeroed, its transpose)
        # and its codes; two float32 [in, in] (H in processing order, then its Cholesky factor)
        solver = (4 * 2 * o * n + o * n + 4 * 2 * max(widths) ** 2) if hessians else 0
        walk_terms = [("activations", acts), ("layer work", layer), ("statistics", stats), ("solver", solver)]
        if lazy and walk == "sequential":
            # when the widest group is solved every other linear of the layer is codes only (its W_dq dropped:
            # quantize._forgetting_finished) and no forward runs: the larger of that moment and a capture
            widest = 4 * max(o_ * n_ for o_, n_ in shapes)
            solving = [("weights", widest), ("activations", acts), ("statistics", stats), ("solver", solver)]
            capture = [("weights", weights), ("activations", acts), ("layer work", layer), ("statistics", 8 * d * d)]
            walk_terms = max(solving, capture, key=lambda terms: sum(b for _, b in terms))
            parts = [p for p in parts if p[0] != "weights"]
            saving = [("weights", weights), ("save", save)]
            parts += walk_terms if sum(b for _, b in walk_terms) > sum(b for _, b in saving) else saving
            return MemoryEstimate(tuple(parts))
    # the file is written after the walk has let go of its statistics and activations: the larger phase counts
    parts += walk_terms if sum(b for _, b in walk_terms) > save else [("save", save)]
    return MemoryEstimate(tuple(parts))


def fitting_flags(estimate_for, budget: int, samples: int, walk: str | None, offload: bool) -> list[str]:
    """Flags under which estimate_for(samples, walk, offload) fits `budget` bytes: fewer --samples (the
    most that fit), the two-pass walk, --offload."""
    if walk is None:
        return []
    flags = []
    fit = max((n for n in range(1, samples) if estimate_for(n, walk, offload).total <= budget), default=None)
    if fit:
        flags.append(f"--samples {fit}")
    if walk == "sequential" and estimate_for(samples, "two-pass", offload).total <= budget:
        flags.append("--walk two-pass")
    if not offload and estimate_for(samples, "two-pass", True).total <= budget:
        flags.append("--offload DIR")
    return flags
