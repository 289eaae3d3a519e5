"""`lowbit quantize --format gguf`: llama.cpp's mixes as format plans, every method on GGUF types,
the lowbit directory it writes exported to GGUF byte for byte, integer directories exported
without re-rounding (or refused, or re-rounded on request), and bad input as one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from export.gguf_support import read_tensors, with_merges
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import load_file
from support import assert_one_line_error, run_cli

from lowbit.data.calibration import CalibConfig
from lowbit.data.text import read_text
from lowbit.formats import GGUFFormat
from lowbit.formats.gguf import quantize_gguf
from lowbit.methods.awq import AwqConfig
from lowbit.models.gguf_names import family_for, gguf_name, permute_rotary_rows
from lowbit.models.load import load
from lowbit.models.specs import spec_for
from lowbit.nn.qlinear import QuantLinear
from lowbit.nn.qweight import quantized_weights
from lowbit.plans.gguf_mixes import mix_plan, tensor_type
from lowbit.quantize import QuantizeConfig, calibration_samples, quantize

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
SMALL = ["--samples", "4", "--seq-len", "64"]
CALIB = CalibConfig(samples=4, seq_len=64)


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama (hidden 96: every GGUF type falls back to a 32-weight block) with a tokenizer GGUF can store."""
    return with_merges(tiny_llama_dir, tmp_path_factory.mktemp("gguf_quantize_llama"))


@pytest.fixture(scope="module")
def eval_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf_quantize_eval") / "eval.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return path


def file_rows(codes: torch.Tensor, hf_module: str, config) -> np.ndarray:
    """A quantized weight's bytes (or values) [rows, ...] in the file's row order: Llama's q/k rotary permutation."""
    heads = config.num_attention_heads if hf_module.endswith("q_proj") else \
        config.num_key_value_heads if hf_module.endswith("k_proj") else 0
    if heads and family_for(config.model_type).permute_qk:
        codes = permute_rotary_rows(codes, heads)
    return codes.numpy()


def held_qtensors(model) -> dict[str, object]:
    """HF module name -> QTensor of every quantized weight (the linears and a mix's embedding)."""
    held = {name: m.qtensor for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    held.update({name: h.qtensor for name, h in quantized_weights(model).items()})
    return held


# --- 1. a llama.cpp mix as a plan ---------------------------------------------------------------------

def _configs():
    from transformers import Gemma3TextConfig, LlamaConfig

    tiny = dict(vocab_size=259, max_position_embeddings=256)
    return {
        "tiny-llama": LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=True, **tiny),
        "tiny-gemma3": Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                                        **tiny),
        # SmolLM2-135M's shapes: 576-long rows fall back, 30 layers exercise use_more_bits
        "smollm2-shaped": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
        # an untied model with 256-multiple rows: K types everywhere, output and token_embd separate
        "untied-llama": LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1024, num_hidden_layers=16,
                                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    }


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "smollm2-shaped", "untied-llama"])
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K", "Q5_K_M", "Q8_0"])
def test_mix_plan_gives_each_tensor_llama_cpps_type(name, mix):
    """Every decoder linear, and the tied embedding (or the untied head and embedding), gets exactly
    tensor_type() of its GGUF name and shape; nothing else is planned."""
    from transformers import AutoModelForCausalLM

    config = _configs()[name]
    with torch.device("meta"):                 # shapes only
        model = AutoModelForCausalLM.from_config(config)
    spec = spec_for(config.model_type)
    plan = mix_plan(config, spec, mix)
    assert plan.origin == f"gguf mix {mix}"
    tied = bool(config.tie_word_embeddings)
    linears = [f"{spec.layers}.{i}.{lin}" for i in range(config.num_hidden_layers) for lin in spec.linears]
    assert len(linears) == 7 * config.num_hidden_layers
    planned = plan.resolve(linears, optional=(spec.head, spec.embed))
    expected_names = linears + ([spec.embed] if tied else [spec.head, spec.embed])
    assert sorted(planned) == sorted(expected_names)
    family = family_for(config.model_type)
    n_gqa = config.num_attention_heads // config.num_key_value_heads
    seen = set()
    for module in expected_names:
        tensor, layer = gguf_name(f"{module}.weight", family)
        shape = tuple(model.get_submodule(module).weight.shape)
        want = tensor_type(mix, tensor, shape, layer, config.num_hidden_layers, n_gqa=n_gqa, has_output=not tied)
        got = planned[module]
        assert (None if want in ("F32", "F16") else want) == (None if got is None else got.name), module
        seen.add(want)
    assert len(seen) >= 2 or mix == "Q8_0"


# --- 2. the CLI: quantize, info, eval, export ---------------------------------------------------------

def test_quantize_info_eval_and_export_byte_for_byte(capsys, llama_dir, eval_text, tmp_path, monkeypatch):
    out = tmp_path / "q"
    code, stdout, err = run_cli(capsys, "quantize", llama_dir, "--format", "gguf", "--type", "Q4_K_M",
                                "--method", "rtn", "--out", out)
    assert code == 0, err
    assert "gguf mix Q4_K_M" in stdout and "saved to" in stdout
    manifest = json.loads((out / "lowbit.json").read_text())
    assert manifest["method"]["plan"]["origin"] == "gguf mix Q4_K_M"
    assert len(manifest["tensors"]) == 2 * 7 + 1
    embed = manifest["tensors"]["model.embed_tokens"]
    assert embed["kind"] == "weight" and embed["format"] == {"family": "gguf", "type_name": "Q8_0"}

    code, stdout, err = run_cli(capsys, "info", out)
    assert code == 0, err
    assert "Q5_0" in stdout and "Q8_0" in stdout and "model.embed_tokens" in stdout

    code, stdout, err = run_cli(capsys, "eval", out, "--text", eval_text, "--ctx", 64, "--json", tmp_path / "e.json")
    assert code == 0, err
    record = json.loads((tmp_path / "e.json").read_text())
    assert np.isfinite(record["ppl"]) and record["kld"]["mean"] > 0   # against the float source

    gguf = tmp_path / "q.gguf"
    code, stdout, err = run_cli(capsys, "export", out, "--format", "gguf", "--out", gguf)
    assert code == 0, err
    assert "Q4_K_M" in stdout and "yes" not in stdout.split("re-rounded")[1].splitlines()[0]
    tensors = read_tensors(gguf)
    loaded = load(str(out))
    config = loaded.model.config
    family = family_for(config.model_type)
    held = held_qtensors(loaded.model)
    assert len(held) == 15
    for module, q in held.items():
        name, layer = gguf_name(f"{module}.weight", family)
        type_name, shape, data = tensors[name]
        assert type_name == q.fmt.name == tensor_type("Q4_K_M", name, shape, layer, 2, n_gqa=2), name
        assert np.array_equal(np.array(data).reshape(q.codes.shape), file_rows(q.codes, module, config)), name
    assert {t for n, (t, _, _) in tensors.items() if "norm" in n} == {"F32"}
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields["general.file_type"]
    assert int(field.parts[field.data[0]][0]) == 15   # llama.cpp's id of the mix (LLAMA_FTYPE_MOSTLY_Q4_K_M)

    # the file holds exactly lowbit's W_dq: evaluating it gives the same perplexity
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "eval", gguf, "--text", eval_text, "--ctx", 64, "--json", tmp_path / "g.json")
    assert code == 0, err
    assert json.loads((tmp_path / "g.json").read_text())["ppl"] == pytest.approx(record["ppl"], rel=1e-6)


# --- 3. calibrated methods on GGUF types --------------------------------------------------------------

@pytest.fixture(scope="module")
def method_runs(llama_dir, calib):
    """{method: (QuantizeResult, {module: QTensor}, samples, layer 0's input mean x², float q_proj of layer 0)}."""
    runs = {}
    for method in ("imatrix", "gptq", "awq", "awq+gptq"):
        loaded = load(str(llama_dir))
        samples = calibration_samples(loaded, read_text(str(calib)), CALIB)
        layer0 = loaded.model.model.layers[0]
        with torch.no_grad():   # layer 0's q/k/v input: its input_layernorm of the float embedding
            x = layer0.input_layernorm(loaded.model.model.embed_tokens(samples)).reshape(-1, loaded.dims.hidden)
        sq_mean = x.double().pow(2).mean(0).float()
        W_q = layer0.self_attn.q_proj.weight.detach().clone()
        # the CLI's AWQ for GGUF types (no clip, no duo), with a short α grid to keep this quick
        config = QuantizeConfig(plan=mix_plan(loaded.model.config, loaded.spec, "Q4_K_M"), method=method,
                                calib=CALIB, awq=AwqConfig(grid=6, duo=False, clip=False))
        result = quantize(loaded, config, samples, progress=False)
        runs[method] = (result, held_qtensors(loaded.model), sq_mean, W_q)
    return runs


def _losses(result):
    reports = [r for r in result.linears if r.proxy_loss is not None]
    assert len(reports) == 14   # every decoder linear; the embedding is rounded after the walk, without a loss
    return {r.name: (r.proxy_loss, r.rtn_proxy_loss) for r in reports}


def test_every_method_keeps_the_mix_types(method_runs, llama_dir):
    loaded = load(str(llama_dir))
    plan = mix_plan(loaded.model.config, loaded.spec, "Q4_K_M")
    for method, (result, held, _, _) in method_runs.items():
        assert {r.name: r.fmt for r in result.linears} == {n: plan.format_for(n).name for n in held}, method
        assert {n: q.fmt.name for n, q in held.items()} == {r.name: r.fmt for r in result.linears}, method
        assert result.walk == ("two-pass" if "awq" in method else "sequential")


def test_gptq_beats_imatrix_rounding_on_the_proxy_loss(method_runs):
    imatrix, gptq = _losses(method_runs["imatrix"][0]), _losses(method_runs["gptq"][0])
    # the imatrix weights the search by the inputs' mean square: it beats unweighted rounding in sum
    assert sum(a for a, _ in imatrix.values()) < sum(b for _, b in imatrix.values())
    total = {m: sum(a for a, _ in losses.values()) for m, losses in (("imatrix", imatrix), ("gptq", gptq))}
    assert total["gptq"] < 0.5 * total["imatrix"], total
    assert sum(a for a, _ in gptq.values()) < 0.5 * sum(b for _, b in gptq.values())
    both = _losses(method_runs["awq+gptq"][0])
    assert sum(a for a, _ in both.values()) < 0.5 * sum(b for _, b in both.values())


def test_awq_scales_never_lose_to_rounding_per_group(method_runs, llama_dir):
    """AWQ's search judges each scaling on the real block type (imatrix / s²), and s = 1 is a candidate:
    summed over each group's linears, the loss is at most that of imatrix rounding of the unscaled weights."""
    result = method_runs["awq"][0]
    losses = _losses(result)
    spec = load(str(llama_dir)).spec
    for layer in range(2):
        for group in spec.groups:
            names = [f"{spec.layers}.{layer}.{n}" for n in group.linears]
            ours, rtn = sum(losses[n][0] for n in names), sum(losses[n][1] for n in names)
            assert ours <= rtn * (1 + 1e-4), (names, ours, rtn)
    assert sum(a for a, _ in losses.values()) < sum(b for _, b in losses.values())
    assert result.plan is not None and sorted(result.plan.scales) == [0, 1]
    assert any(not torch.allclose(s, torch.ones_like(s)) for e in result.plan.scales.values() for s in e.values())


def test_imatrix_bytes_are_the_types_search_weighted_by_the_inputs_mean_square(method_runs):
    _, held, sq_mean, W_q = method_runs["imatrix"]
    q = held["model.layers.0.self_attn.q_proj"]
    fmt = GGUFFormat(q.fmt.name)
    assert torch.equal(q.codes, fmt.quantize(W_q, importance=sq_mean).codes)
    assert not torch.equal(q.codes, fmt.quantize(W_q).codes)   # the imatrix changed the search


# --- 4. --inputs float --------------------------------------------------------------------------------

def test_float_inputs_change_later_layers_only(capsys, llama_dir, calib, tmp_path):
    codes = {}
    for inputs in ("quantized", "float"):
        out = tmp_path / inputs
        code, _, err = run_cli(capsys, "quantize", llama_dir, "--format", "gguf", "--type", "Q4_K_M", "--method",
                               "gptq", "--calib", calib, *SMALL, "--inputs", inputs, "--out", out)
        assert code == 0, err
        manifest = json.loads((out / "lowbit.json").read_text())
        assert manifest["method"]["inputs"] == inputs
        codes[inputs] = {k: v for k, v in load_file(str(out / "model.safetensors")).items() if k.endswith(".codes")}
    a, b = codes["quantized"], codes["float"]
    assert a.keys() == b.keys() and len(a) == 15
    # layer 0's q/k/v see the float embedding either way (its o_proj and MLP already see quantized q/k/v
    # under the default)
    for lin in ("q_proj", "k_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{lin}.codes"
        assert torch.equal(a[key], b[key]), key
    for lin in LINEARS:
        key = f"model.layers.1.{lin}.codes"
        assert not torch.equal(a[key], b[key]), key


# --- 5. integer directories to GGUF -------------------------------------------------------------------

@pytest.mark.parametrize("flags,type_name", [
    (["--bits", "4", "--group", "32", "--sym", "--scale-rule", "absmax"], "Q4_0"),
    (["--bits", "4", "--group", "32", "--sym", "--scale-rule", "signed"], "Q4_0"),
    (["--bits", "8", "--group", "0"], "Q8_0"),
])
def test_integer_directory_exports_as_a_legacy_type_exactly(capsys, llama_dir, tmp_path, flags, type_name):
    out, gguf = tmp_path / "q", tmp_path / "q.gguf"
    assert run_cli(capsys, "quantize", llama_dir, *flags, "--out", out)[0] == 0
    code, stdout, err = run_cli(capsys, "export", out, "--format", "gguf", "--out", gguf)
    assert code == 0, err
    assert "no" in stdout.split("re-rounded")[1].splitlines()[0]
    tensors = read_tensors(gguf)
    loaded = load(str(out))
    config = loaded.model.config
    family = family_for(config.model_type)
    linears = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 14
    for module, m in linears.items():
        name, _ = gguf_name(f"{module}.weight", family)
        t, shape, data = tensors[name]
        assert t == type_name, name
        back = gguf_dequantize(np.array(data), GGMLQuantizationType[type_name]).reshape(shape)
        want = file_rows(m.W_dq.float(), module, config)
        assert np.array_equal(back.view(np.int32), want.view(np.int32)), name   # bit for bit
    src = load(str(llama_dir)).model.state_dict()
    t, shape, data = tensors["token_embd.weight"]
    assert t == "F32" and np.array_equal(np.array(data).reshape(shape), src["model.embed_tokens.weight"].numpy())


def test_nf4_directory_is_refused_unless_requantized(capsys, llama_dir, tmp_path):
    out = tmp_path / "nf4"
    assert run_cli(capsys, "quantize", llama_dir, "--format", "nf4", "--group", "32", "--out", out)[0] == 0
    target = tmp_path / "files" / "nf4.gguf"
    target.parent.mkdir()
    code, _, err = run_cli(capsys, "export", out, "--format", "gguf", "--out", target)
    assert_one_line_error(code, err, "nf4", "NormalFloat", "--requantize")
    assert list(target.parent.iterdir()) == []           # nothing at --out, no temporary left
    code, stdout, err = run_cli(capsys, "export", out, "--format", "gguf", "--requantize", "Q4_K_M", "--out", target)
    assert code == 0, err
    assert "yes" in stdout.split("re-rounded")[1].splitlines()[0]
    assert [p.name for p in target.parent.iterdir()] == ["nf4.gguf"]
    tensors = read_tensors(target)
    loaded = load(str(out))
    config = loaded.model.config
    for name, (t, shape, _) in tensors.items():
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        assert t == tensor_type("Q4_K_M", name, shape, layer, 2, n_gqa=2), name
    # re-rounded from nf4's W_dq (in the file's row order) by lowbit's quantizer for the mix's type
    for module, name in (("model.layers.0.self_attn.q_proj", "blk.0.attn_q.weight"),
                         ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight")):
        t, shape, data = tensors[name]
        W = torch.from_numpy(file_rows(loaded.model.get_submodule(module).W_dq.float(), module, config))
        assert np.array_equal(np.array(data).reshape(-1), quantize_gguf(W, t).reshape(-1)), name


def test_plan_file_mixes_integer_gguf_and_float_and_exports(capsys, llama_dir, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"default": "int4-g32-sym", "tensors": {
        "model.layers.*.mlp.down_proj": "Q8_0", "model.layers.0.self_attn.*": "float"}}))
    out, gguf = tmp_path / "q", tmp_path / "q.gguf"
    code, stdout, err = run_cli(capsys, "quantize", llama_dir, "--plan", plan, "--out", out)
    assert code == 0, err
    manifest = json.loads((out / "lowbit.json").read_text())
    formats = {n: e["format"] for n, e in manifest["tensors"].items()}
    assert len(formats) == 14 - 4
    assert formats["model.layers.1.mlp.down_proj"] == {"family": "gguf", "type_name": "Q8_0"}
    assert formats["model.layers.1.self_attn.q_proj"]["family"] == "int"
    assert run_cli(capsys, "export", out, "--format", "gguf", "--out", gguf)[0] == 0
    types = {n: t for n, (t, _, _) in read_tensors(gguf).items()}
    assert types["blk.0.attn_q.weight"] == "F32" and types["blk.1.attn_q.weight"] == "Q4_0"
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"


# --- 6. bad input -------------------------------------------------------------------------------------

BAD = {
    "plan names a missing tensor": (["--plan", {"default": "Q8_0", "tensors": {"model.layers.7.mlp.down_proj": "Q4_0"}}],
                                    ["model.layers.7.mlp.down_proj", "matches no tensor"]),
    "--type unknown to gguf": (["--format", "gguf", "--type", "Q9_K"], ["Q9_K", "unknown to the installed gguf"]),
    "plan type unknown to gguf": (["--plan", {"default": "Q9_K"}], ["Q9_K", "unknown to the installed gguf"]),
    "--type lowbit cannot write": (["--format", "gguf", "--type", "IQ2_XS"], ["IQ2_XS", "no lowbit quantizer"]),
    "plan type lowbit cannot write": (["--plan", {"default": "float", "tensors": {"model.layers.0.*": "IQ2_XS"}}],
                                      ["IQ2_XS", "no lowbit quantizer"]),
    "--type without --format gguf": (["--type", "Q4_0"], ["--type", "--format gguf"]),
    "--plan with --type": (["--plan", {"default": "Q8_0"}, "--format", "gguf", "--type", "Q4_0"], ["--plan"]),
    "plan not JSON": (["--plan", "{not json"], ["plan.json", "not valid json"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_quantize_input_is_one_line_and_writes_nothing(capsys, llama_dir, tmp_path, case):
    flags, needles = BAD[case]
    argv = []
    for f in flags:
        if isinstance(f, dict) or f == "{not json":
            path = tmp_path / "plan.json"
            path.write_text(f if isinstance(f, str) else json.dumps(f))
            f = path
        argv.append(f)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "quantize", llama_dir, *argv, "--out", out)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


@pytest.mark.parametrize("type_name,needle", [("Q9_K", "unknown to the installed gguf"),
                                              ("IQ2_XS", "no lowbit quantizer")])
def test_bad_export_shortcut_type_is_one_line_and_writes_nothing(capsys, llama_dir, tmp_path, type_name, needle):
    out = tmp_path / "files" / "x.gguf"
    out.parent.mkdir()
    code, _, err = run_cli(capsys, "export", llama_dir, "--format", "gguf", "--type", type_name, "--out", out)
    assert_one_line_error(code, err, type_name, needle)
    assert list(out.parent.iterdir()) == []


def test_f16_and_f32_are_storage_types_written_by_export_not_quantize(capsys, llama_dir, tmp_path):
    code, _, err = run_cli(capsys, "quantize", llama_dir, "--format", "gguf", "--type", "F16", "--out", tmp_path / "q")
    assert_one_line_error(code, err, "--type F16", "lowbit export")
    assert not (tmp_path / "q").exists()
    code, _, err = run_cli(capsys, "export", llama_dir, "--format", "gguf", "--type", "F16", "--out", tmp_path / "f.gguf")
    assert code == 0, err
    assert {t for t, _, _ in read_tensors(tmp_path / "f.gguf").values()} == {"F16", "F32"}
