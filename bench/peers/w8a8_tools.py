"""The W8A8 / LLM.int8() peers (four tools, plus llm-compressor without SmoothQuant as a control
row), as run inside their own environments by w8a8_peers.py.

Each peer is a small class with the same four calls, so the worker treats them alike:
  quantize(model, samples, reference) -> dict   quantize `model` in place with the tool's own
        modules (its quantized linears do the activation quantization at run time) and describe
        the recipe; `samples` are lowbit's calibration windows, `reference` the float model.
  weight(module) -> [out, in] float             the weight the tool multiplies by, from its own codes
  simulate(module, x, W) -> y                   what the tool documents it computes for input x:
        our own re-statement of its activation quantizer followed by a float matmul with W.
  stored_bits(model, names) -> (bits, dtypes)   bits per weight of its stored tensors (called
        last: llm-compressor's save compresses the model in place).
Why `simulate`: "does it really quantize activations?" is answered by numbers, not by reading
its code — the worker compares one real linear's output with (a) the same weights and float
activations and (b) this re-statement; (a) far larger than (b) means the activations are quantized
the way the tool says. Only the decoder layers' linears are quantized, lm_head stays float,
as in lowbit's rows. Imports of the tools happen inside the methods: each environment has one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def per_token(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """Symmetric int8 fake quantization with one scale per token (last dim): absmax / divisor."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / divisor
    return (x / scale).round().clamp(-128, 127) * scale


def _kl(ref_logits, logits) -> float:
    """Mean over positions of KL(P_ref || P) in nats."""
    lp_ref, lp = ref_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item()


def decoder_linears(model) -> list[str]:
    return [f"model.layers.{n}" for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]


def _bits_per_weight(model, names, stored) -> tuple[float, dict]:
    """Bits of the (key, tensor) pairs `stored(module)` lists, over the weights of the linears `names`."""
    bits, dtypes, weights = 0, {}, 0
    for n in names:
        module = model.get_submodule(n)
        for key, t in stored(module):
            bits += t.numel() * t.element_size() * 8
            dtypes[key] = str(t.dtype)
        weights += module.in_features * module.out_features
    return bits / weights, dtypes


class LlmCompressor:
    """llm-compressor's W8A8 int8 example recipe: SmoothQuant (0.8) then GPTQ, scheme "W8A8"."""

    venv, tool = "llmcompressor", "llm-compressor"
    smooth = True
    act_granularity = "per-token dynamic, symmetric, absmax/127.5 (compressed-tensors TOKEN strategy)"
    weight_granularity = "per-channel (one scale per output row), symmetric, static; GPTQ-rounded"

    def quantize(self, model, samples, reference):
        import compressed_tensors
        import llmcompressor
        import transformers
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        recipe = [SmoothQuantModifier(smoothing_strength=0.8)] if self.smooth else []
        recipe.append(GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]))
        data = Dataset.from_dict({"input_ids": samples.tolist(), "attention_mask": torch.ones_like(samples).tolist()})
        tokenizer = transformers.AutoTokenizer.from_pretrained(model.config._name_or_path)
        oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, num_calibration_samples=samples.shape[0],
                max_seq_length=samples.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
        shown = ("smoothing_strength", "mappings", "targets", "scheme", "ignore", "dampening_frac", "block_size",
                 "actorder")
        dumped = [{"name": type(m).__name__, **{k: v for k, v in m.model_dump().items() if k in shown}} for m in recipe]
        schemes = {str(getattr(m, "quantization_scheme", None)) for n, m in model.named_modules()
                   if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}
        return {"tool_version": llmcompressor.__version__, "versions": {
                    "compressed-tensors": compressed_tensors.__version__, "transformers": transformers.__version__},
                "method": "smoothquant+gptq-w8a8" if self.smooth else "gptq-w8a8", "recipe": dumped,
                "recipe_source": "llm-compressor examples/quantization_w8a8_int8 (SmoothQuantModifier(smoothing_strength"
                                 "=0.8), GPTQModifier(targets='Linear', scheme='W8A8', ignore=['lm_head']))"
                                 + ("" if self.smooth else ", without its SmoothQuantModifier"),
                "scheme_on_decoder_linears": sorted(schemes)}

    def model_checks(self, model, load, samples, reference) -> dict:
        """After quantization, outside its timing: the library's own QDQ switch, and SmoothQuant alone."""
        from compressed_tensors.quantization import disable_quantization, enable_quantization

        window = samples[:1, :256]
        with torch.no_grad():
            model.apply(disable_quantization)
            off = model(input_ids=window).logits[0]
            model.apply(enable_quantization)
            on = model(input_ids=window).logits[0]
            ref = reference(input_ids=window).logits[0]
        return {"qdq_switch": {
                    "what": "calibration window 0, first 256 tokens: mean KL(float || model) with every QDQ of the "
                            "library switched off (the recipe's weights: smoothed if it smooths, GPTQ-rounded; float "
                            "activations) and on (W8A8)",
                    "kl_qdq_off": _kl(ref, off), "kl_qdq_on": _kl(ref, on)},
                **({"smoothing_identity": self.smoothing_check(load, samples, reference)} if self.smooth else {})}

    def smoothing_check(self, load, samples, reference):
        """Is SmoothQuant alone an identity in float, as it must be? Its recipe alone on a fresh float
        copy (8 windows), compared with the float model. For Gemma 3 it is not: its registry gives
        Gemma3ForCausalLM the default mappings, which pair post_attention_layernorm with gate/up,
        but in Gemma that norm scales the attention output and gate/up read pre_feedforward_layernorm.
        (Measured once by hand: that mapping alone gives KL 21 nats; the q/k/v mapping alone, and
        gate/up paired with pre_feedforward_layernorm, are identities — its offset-norm handling of
        Gemma's x * (1 + w) is right.)"""
        from llmcompressor import oneshot
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
        from datasets import Dataset

        model, few = load(), samples[:8]
        data = Dataset.from_dict({"input_ids": few.tolist(), "attention_mask": torch.ones_like(few).tolist()})
        oneshot(model=model, dataset=data, recipe=[SmoothQuantModifier(smoothing_strength=0.8)],
                num_calibration_samples=few.shape[0], max_seq_length=few.shape[1], shuffle_calibration_samples=False,
                pipeline="sequential")
        window = samples[:1, :256]
        with torch.no_grad():
            ref, smoothed = reference(input_ids=window).logits[0], model(input_ids=window).logits[0]
        return {"what": "SmoothQuantModifier(0.8) alone, calibrated on 8 windows, no quantization: mean KL(float || "
                        "smoothed) on calibration window 0, first 256 tokens (0 up to rounding if an identity)",
                "kl_float_vs_smoothed": _kl(ref, smoothed),
                "max_abs_logit_diff": (ref - smoothed).abs().max().item()}

    def weight(self, module):
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        return fake_quantize(module.weight, module.weight_scale, getattr(module, "weight_zero_point", None),
                             module.quantization_scheme.weights)

    def simulate(self, module, x, W):
        return F.linear(per_token(x, 127.5), W, module.bias)

    def extra_check(self, module, x):
        """The same linear with its QDQ switched off (the library's own switch), for comparison."""
        from compressed_tensors.quantization import disable_quantization, enable_quantization

        on = module(x)
        module.apply(disable_quantization)
        off = module(x)
        module.apply(enable_quantization)
        return {"rel_diff_quantization_enabled_vs_disabled": ((on - off).norm() / off.norm()).item(),
                "input_activations_args": str(module.quantization_scheme.input_activations)}

    def stored_bits(self, model, names):
        return compressed_stored_bits(model, names)


def compressed_stored_bits(model, names) -> float:
    """Bits per weight of the linears `names` as llm-compressor stores them (its own compressed checkpoint)."""
    import tempfile
    from pathlib import Path

    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, save_compressed=True)
        tensors = {}
        for file in Path(tmp).glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys() if k.rpartition(".")[0] in names})
    return _bits_per_weight(model, names, lambda m: [(k.rpartition(".")[2], t) for k, t in tensors.items()
                                                     if model.get_submodule(k.rpartition(".")[0]) is m])


class LlmCompressorNoSmooth(LlmCompressor):
    """The same recipe without SmoothQuant: GPTQ W8A8 alone (a control row; see smoothing_check)."""

    smooth = False


class TorchAO:
    """torchao quantize_(..., Int8DynamicActivationInt8WeightConfig()) with its defaults."""

    venv, tool = "torchao", "torchao"
    act_granularity = "per-token dynamic, symmetric, absmax/127.5 (PerRow activation scales)"
    weight_granularity = "per-channel (PerRow), symmetric, absmax/127.5"

    def quantize(self, model, samples, reference):
        import torchao
        import transformers
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        config = Int8DynamicActivationInt8WeightConfig()
        with torch.no_grad():
            quantize_(model.model.layers, config)
        first = model.get_submodule(decoder_linears(model)[0]).weight
        return {"tool_version": torchao.__version__, "versions": {"transformers": transformers.__version__},
                "method": "int8-dynamic-activation-int8-weight", "recipe": {"config": repr(config)},
                "weight_tensor": f"{type(first).__name__}(act_quant_kwargs={first.act_quant_kwargs})"}

    def weight(self, module):
        return module.weight.dequantize().float()

    def simulate(self, module, x, W):
        return F.linear(per_token(x, 127.5), W, module.bias)

    def stored_bits(self, model, names):
        return _bits_per_weight(model, names, lambda m: [(k, getattr(m.weight, k)) for k in m.weight.tensor_data_names])


class BitsAndBytes:
    """LLM.int8(): bitsandbytes Linear8bitLt(threshold=6.0, has_fp16_weights=False), what
    transformers' load_in_8bit builds, put in place of each decoder linear (lm_head float)."""

    venv, tool = "bitsandbytes", "bitsandbytes"
    threshold = 6.0
    act_granularity = ("per-token dynamic, symmetric, absmax/127 (vector-wise), after a cast to float16; input "
                       "columns with any |x| >= 6.0 taken out and multiplied in float (LLM.int8() decomposition)")
    weight_granularity = "per-channel (vector-wise, one absmax per output row), symmetric, /127"

    def quantize(self, model, samples, reference):
        import bitsandbytes as bnb
        import transformers

        for name in decoder_linears(model):
            parent, _, leaf = name.rpartition(".")
            old = model.get_submodule(name)
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                      has_fp16_weights=False, threshold=self.threshold)
            new.weight = bnb.nn.Int8Params(old.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
            if old.bias is not None:
                new.bias = torch.nn.Parameter(old.bias.data.clone(), requires_grad=False)
            new = new.to("cpu")                                  # Int8Params quantizes on the move
            if new.weight.dtype != torch.int8:
                raise TypeError(f"{name}: Linear8bitLt kept a {new.weight.dtype} weight, expected int8 codes")
            setattr(model.get_submodule(parent), leaf, new)
        # a new module is in training mode, and on a CPU bitsandbytes' training path (MatMul8bitFp)
        # multiplies float activations by de-quantized weights: evaluation must be in eval mode
        model.eval()
        return {"tool_version": bnb.__version__, "versions": {"transformers": transformers.__version__},
                "method": "llm.int8", "recipe": {"module": "bitsandbytes.nn.Linear8bitLt", "threshold": self.threshold,
                                                 "has_fp16_weights": False},
                "note": "modules built and swapped in here, the way transformers' replace_with_bnb_linear does for "
                        "load_in_8bit; Int8Params quantizes the weight when moved to the device (cpu)"}

    @staticmethod
    def scb(module):
        """The per-row absmax; the first forward moves it from the weight to the module's state."""
        return module.weight.SCB if module.weight.SCB is not None else module.state.SCB

    def weight(self, module):
        return module.weight.data.float() * self.scb(module).float()[:, None] / 127

    def simulate(self, module, x, W):
        a = x.reshape(-1, x.shape[-1]).to(torch.float16).float()
        big = a.abs() >= self.threshold                         # the outlier values ...
        outlier = big.any(0)                                    # ... and their columns
        stats = a.masked_fill(big, 0).abs().amax(-1, keepdim=True)      # row absmax without the outlier values
        codes = (a * (127 / stats)).round().masked_fill(outlier, 0)     # outlier columns: out of the int8 part
        y = F.linear(codes * stats / 127, W) + F.linear(x.reshape(a.shape)[:, outlier], W[:, outlier])
        if module.bias is not None:
            y = y + module.bias
        return y.reshape(*x.shape[:-1], -1)

    def extra_check(self, module, x):
        a = x.reshape(-1, x.shape[-1]).to(torch.float16)
        return {"outlier_columns_in_this_input": int((a.abs() >= self.threshold).any(0).sum()),
                "module_training_flag_at_eval": module.training}

    def stored_bits(self, model, names):
        return _bits_per_weight(model, names, lambda m: [("CB", m.weight.data), ("SCB", self.scb(m))])


class Quanto:
    """optimum-quanto quantize(weights=qint8, activations=qint8), Calibration() over the windows, freeze."""

    venv, tool = "quanto", "optimum-quanto"
    batch = 8                       # calibration windows per forward (each forward updates the scales)
    act_granularity = ("per-tensor static, symmetric, absmax/127, scales calibrated with momentum 0.9 over the "
                       "calibration batches; module outputs re-quantized per-tensor where its streamline keeps it")
    weight_granularity = "per-channel (axis 0), symmetric (AbsmaxOptimizer), /127"

    def quantize(self, model, samples, reference):
        import transformers
        from importlib.metadata import version
        from optimum.quanto import Calibration, freeze, qint8, quantize

        quantize(model.model.layers, weights=qint8, activations=qint8)
        with torch.no_grad(), Calibration(momentum=0.9):
            for start in range(0, samples.shape[0], self.batch):
                model.model(input_ids=samples[start:start + self.batch])    # no lm_head: it stays float
        freeze(model.model.layers)
        linears = [model.get_submodule(n) for n in decoder_linears(model)]
        outputs = sum(self.output_quantized(m) for m in linears)
        return {"tool_version": version("optimum-quanto"), "versions": {"transformers": transformers.__version__},
                "method": "qint8-weights-qint8-activations",
                "recipe": {"quantize": "quantize(model.model.layers, weights=qint8, activations=qint8)",
                           "calibration": f"with Calibration(momentum=0.9): model.model(batch) for batches of "
                                          f"{self.batch} windows", "freeze": True},
                "linears_with_output_quantization": outputs, "linears": len(linears)}

    @staticmethod
    def output_quantized(module) -> bool:
        """Its streamline removes the output hook of a linear whose output feeds only float ops,
        but keeps the handle in _quantize_hooks: look at the live hooks."""
        handle = module._quantize_hooks.get("output")
        return handle is not None and handle.id in module._forward_hooks

    def weight(self, module):
        return module.weight.dequantize().float()

    def simulate(self, module, x, W):
        s = module.input_scale
        y = F.linear((x / s).round().clamp(-128, 127) * s, W, module.bias)
        if self.output_quantized(module):
            y = (y / module.output_scale).round().clamp(-128, 127) * module.output_scale
        return y

    def extra_check(self, module, x):
        return {"input_scale": module.input_scale.item(), "input_absmax_this_window": x.abs().max().item(),
                "output_quantized": self.output_quantized(module)}

    def stored_bits(self, model, names):
        return _bits_per_weight(model, names, lambda m: [("_data", m.weight._data), ("_scale", m.weight._scale)])


TOOLS = {"llmcompressor-w8a8": LlmCompressor, "llmcompressor-w8a8-nosmooth": LlmCompressorNoSmooth, "torchao-w8a8": TorchAO, "bitsandbytes-int8": BitsAndBytes,
         "quanto-w8a8": Quanto}
