"""llm-compressor's rotation modifiers (SpinQuantModifier, QuIPModifier) followed by its GPTQ, as
run inside the llmcompressor environment by rotation_peers.py.

A peer is one recipe: a rotation modifier with its arguments, then GPTQModifier with a weight
(and, for W4A4, activation) scheme. `Rotation` has the calls of w8a8_tools' tools, plus
`rotation_identity`: the rotation modifier alone on a fresh float copy, which must leave the
model's function unchanged (fused R1/R2 and the online R4 or QuIP input Hadamards cancel out).
It does not for an architecture whose norms its mappings get wrong, and the row then says so
instead of carrying a number. Caveats of the tool that the row records, not hides:
  * SpinQuant also centers the embedding rows (QuaRot's LayerNorm step); under RMSNorm that is not
    an identity, so rotation_identity measures its effect too;
  * SpinQuant's mappings and norm mappings fall back to Llama's for any other architecture;
  * transform_type "hadamard" is Sylvester only (power-of-two orders, or transform_block_size
    blocks); "random-hadamard" adds its stored Hadamard orders times a power of two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from w8a8_tools import _kl, compressed_stored_bits

# the llm-compressor examples/transform recipes these follow
SPIN_EXAMPLE = dict(rotations=["R1", "R2", "R4"], transform_block_size=64, transform_type="hadamard")
SPIN_FULL = dict(rotations=["R1", "R2", "R4"], transform_type="random-hadamard")    # full-size, as QuaRot
QUIP_DEFAULT = dict()                       # its defaults: rotations ["v"], random-hadamard, full size
W4_CHANNEL = dict(num_bits=4, type="int", strategy="channel", symmetric=True, dynamic=False)
A4_TOKEN = dict(num_bits=4, type="int", strategy="token", symmetric=True, dynamic=True)


def w_group(bits: int, group: int) -> dict:
    return dict(num_bits=bits, type="int", strategy="group", group_size=group, symmetric=True, dynamic=False)


# peer -> (rotation modifier, its arguments, weight args, activation args or None, default group)
PEERS = {
    "llmcompressor-spinquant-w4a4": ("SpinQuantModifier", SPIN_EXAMPLE, W4_CHANNEL, A4_TOKEN, None),
    "llmcompressor-spinquant-w4a4-full": ("SpinQuantModifier", SPIN_FULL, W4_CHANNEL, A4_TOKEN, None),
    "llmcompressor-spinquant-w4a16": ("SpinQuantModifier", SPIN_EXAMPLE, 4, None, 128),
    "llmcompressor-quip-w4a16": ("QuIPModifier", QUIP_DEFAULT, 4, None, 128),
    "llmcompressor-quip-w3": ("QuIPModifier", QUIP_DEFAULT, 3, None, 64),
    "llmcompressor-quip-w2": ("QuIPModifier", QUIP_DEFAULT, 2, None, 64),
}
SOURCES = {"SpinQuantModifier": "llm-compressor examples/transform/spinquant_example.py (SpinQuantModifier(rotations="
                                "['R1','R2','R4'], transform_block_size=64, transform_type='hadamard'))",
           "QuIPModifier": "llm-compressor examples/transform/README.md (QuIPModifier, input rotations ['v'] only: "
                           "'output rotations are not performant and do not increase accuracy'); its own defaults"}
EXACT_LIMIT = 1e-4          # nats: the rotations themselves (centering aside) must be an identity up to rounding


def per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' symmetric dynamic TOKEN quantizer: scale = absmax / ((2^b - 1) / 2)."""
    top = 2 ** (bits - 1)
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / ((2 * top - 1) / 2)
    return (x / scale).round().clamp(-top, top - 1) * scale


class Rotation:
    venv, tool = "llmcompressor", "llm-compressor"

    def __init__(self, peer: str, group: int | None = None):
        self.peer = peer
        self.rotator, self.rotation_args, weights, self.acts, default_group = PEERS[peer]
        self.group = (group or default_group) if default_group else None      # W4A4: per-channel, no groups
        self.weights = weights if isinstance(weights, dict) else w_group(weights, self.group)
        self.act_bits = self.acts["num_bits"] if self.acts else 16
        self.act_granularity = ("per-token dynamic, symmetric, absmax/7.5, clamp [-8, 7] (compressed-tensors TOKEN)"
                                if self.acts else "float (weight-only)")
        self.weight_granularity = (f"int{self.weights['num_bits']} "
                                   + (f"g{self.group}" if self.weights["strategy"] == "group" else "per-channel")
                                   + ", symmetric, static; GPTQ-rounded, after the rotation")

    def rotation_modifier(self):
        from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

        return {"SpinQuantModifier": SpinQuantModifier, "QuIPModifier": QuIPModifier}[self.rotator](
            **self.rotation_args)

    def quantize(self, model, samples, reference, tokenizer=None):
        import compressed_tensors
        import llmcompressor
        import transformers
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier

        group = {"targets": ["Linear"], "weights": self.weights}
        if self.acts:
            group["input_activations"] = self.acts
        recipe = [self.rotation_modifier(), GPTQModifier(config_groups={"group_0": group}, ignore=["lm_head"])]
        data = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
        oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=samples.shape[0],
                max_seq_length=samples.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
        shown = ("rotations", "transform_type", "transform_block_size", "precision", "randomize", "targets", "ignore",
                 "config_groups", "dampening_frac", "block_size", "actorder")
        dumped = [{"name": type(m).__name__, **{k: v for k, v in m.model_dump().items() if k in shown}} for m in recipe]
        schemes = {str(getattr(m, "quantization_scheme", None)) for n, m in model.named_modules()
                   if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}
        online = sorted({c for n, m in model.named_modules() if n.startswith("model.layers.1.")
                         for c, _ in self.transforms(m)})
        return {"tool_version": llmcompressor.__version__, "versions": {
                    "compressed-tensors": compressed_tensors.__version__, "transformers": transformers.__version__},
                "method": f"{self.rotator}+gptq", "recipe": dumped,
                "recipe_source": self.source(), "online_transforms_in_layer_1": online,
                "scheme_on_decoder_linears": sorted(schemes)}

    def source(self) -> str:
        rotation = SOURCES[self.rotator]
        if self.rotation_args == SPIN_FULL:
            rotation += ", but transform_type='random-hadamard' and no transform_block_size (full size, as QuaRot)"
        return (rotation + "; then GPTQModifier(config_groups=..., ignore=['lm_head']) as in examples/transform/"
                "nvfp4_quip_gptq_example.py (the examples' W4A16 use QuantizationModifier, RTN: GPTQ here, as "
                "lowbit's rotated GPTQ rows)")

    def rotation_identity(self, load, samples, reference) -> dict:
        """The rotation modifier alone (datafree) on a fresh float copy: mean KL(float || rotated); for
        SpinQuant also with its embedding centering switched off, the part that must be exact."""
        from llmcompressor import oneshot
        from llmcompressor.modifiers.transform import SpinQuantModifier

        window, out = samples[:1, :256], {}
        with torch.no_grad():
            ref = reference(input_ids=window).logits[0]
        for centering in ([True, False] if self.rotator == "SpinQuantModifier" else [None]):
            model, key = load(), {True: "", False: "_without_centering", None: ""}[centering]
            original = SpinQuantModifier._center_embeddings
            if centering is False:
                SpinQuantModifier._center_embeddings = lambda modifier, model: None
            try:
                oneshot(model=model, recipe=[self.rotation_modifier()], pipeline="datafree")
            finally:
                SpinQuantModifier._center_embeddings = original
            with torch.no_grad():
                rotated = model(input_ids=window).logits[0]
            out.update({f"kl_float_vs_rotated{key}": _kl(ref, rotated),
                        f"max_abs_logit_diff{key}": (ref - rotated).abs().max().item()})
        exact = out.get("kl_float_vs_rotated_without_centering", out["kl_float_vs_rotated"])
        return {"what": f"{self.rotator}({self.rotation_args}) alone, no quantization: mean KL(float || rotated) on "
                        "calibration window 0, first 256 tokens (0 up to rounding for an exact rotation)"
                        + ("; SpinQuant's embedding centering is not an identity under RMSNorm, so also without it"
                           if self.rotator == "SpinQuantModifier" else ""),
                "architecture": type(model).__name__, **out, "rotation_exact": exact < EXACT_LIMIT,
                "exact_limit": EXACT_LIMIT}

    def model_checks(self, model, samples, reference) -> dict:
        from compressed_tensors.quantization import disable_quantization, enable_quantization

        window = samples[:1, :256]
        with torch.no_grad():
            model.apply(disable_quantization)
            off = model(input_ids=window).logits[0]
            model.apply(enable_quantization)
            on = model(input_ids=window).logits[0]
            ref = reference(input_ids=window).logits[0]
        return {"qdq_switch": {"what": "calibration window 0, first 256 tokens: mean KL(float || model) with every QDQ "
                                       "of the library off (rotated, GPTQ-rounded weights, float activations) and on",
                               "kl_qdq_off": _kl(ref, off), "kl_qdq_on": _kl(ref, on)}}

    @staticmethod
    def transforms(module):
        from compressed_tensors.transform.factory.base import TransformBase

        return [(n, c) for n, c in module.named_children() if isinstance(c, TransformBase)]

    def online(self, module, x):
        """Our re-statement of the module's online input transforms: x @ blockdiag(H) / sqrt(n), with H
        the tool's stored matrix, checked to be a Hadamard matrix (entries +-1, H H^T = n I)."""
        info = []
        for name, t in self.transforms(module):
            if t.args.location != "input" or t.perm is not None or t.args.inverse:
                raise NotImplementedError(f"{name}: {t.args} not re-stated")
            H = t.weight.detach().double()
            n = H.shape[0]
            hadamard = bool((H.abs() == 1).all()) and torch.allclose(H @ H.T, n * torch.eye(n, dtype=H.dtype))
            info.append({"name": name, "order": n, "is_hadamard": hadamard})
            x = (x.double().unflatten(-1, (-1, n)) @ H / n ** 0.5).flatten(-2).to(x.dtype)
        return x, info

    def weight(self, module):
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        return fake_quantize(module.weight, module.weight_scale, getattr(module, "weight_zero_point", None),
                             module.quantization_scheme.weights)

    def simulate(self, module, x, W):
        return F.linear(per_token(x, self.act_bits) if self.acts else x, W, module.bias)

    def stored_bits(self, model, names):
        return compressed_stored_bits(model, names)
