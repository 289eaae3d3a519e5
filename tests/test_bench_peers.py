"""bench/peers/common.py: the hand-over between a peer and lowbit's evaluation.

A peer writes its de-quantized weights into a float HF directory; lowbit then evaluates that
directory. These tests play the peer with lowbit's own RTN (no peer environment needed) and
check that the directory reproduces the quantized model exactly, and that the driver's
measurement of a child process is real.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

PEERS_DIR = Path(__file__).resolve().parents[1] / "bench" / "peers"


def _peers_common():
    spec = importlib.util.spec_from_file_location("bench_peers_common", PEERS_DIR / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module             # dataclasses look their module up while decorating
    spec.loader.exec_module(module)
    return module



def _peer_environment_or_skip(common, name: str) -> None:
    """Create peer `name`'s environment, or skip the test saying why (no wheel, a failed build)."""
    peer = common.PEERS[name]
    try:
        common._venv_module().ensure_venv(peer.venv, list(peer.requirements))
    except Exception as e:
        pytest.skip(f"{name} environment could not be created: {type(e).__name__}: {e}")


def _assert_each_linear_within_2x_rtn(float_dir: Path, peer_dir: Path, group: int = 32) -> None:
    """Every linear the peer handed over differs from the float weight, by less than twice lowbit's
    4-bit RTN relative error at the same group size."""
    from safetensors.torch import load_file

    from lowbit.formats import make_format

    W_peer = load_file(str(peer_dir / "model.safetensors"))
    W_float = load_file(str(float_dir / "model.safetensors"))
    rtn = make_format("int", bits=4, group_size=group)
    linears = [k for k in W_float if k.endswith("proj.weight")]
    assert len(linears) == 2 * 7
    for key in linears:
        W_f, W_dq = W_float[key].float(), W_peer[key]
        peer_error = ((W_dq - W_f).norm() / W_f.norm()).item()
        rtn_error = ((rtn.fake_quantize(W_f) - W_f).norm() / W_f.norm()).item()
        assert 0 < peer_error < 2 * rtn_error, (key, peer_error, rtn_error)

def test_dequantized_directory_reproduces_the_quantized_model(tiny_llama_dir, tmp_path):
    from lowbit.formats import make_format
    from lowbit.models.load import load
    from lowbit.quantize import QuantizeConfig, quantize

    common = _peers_common()
    loaded = load(str(tiny_llama_dir))
    quantize(loaded, QuantizeConfig(fmt=make_format("int", bits=3, group_size=32)), progress=False)
    # what a peer hands over: the weights its quantized linears multiply by, by checkpoint name
    tensors = {name + ".weight": m.weight for name, m in loaded.model.named_modules() if hasattr(m, "qtensor")}
    out = tmp_path / "peer"
    out.mkdir()
    common.write_dequantized(str(tiny_llama_dir), tensors, str(out), {"tool": "test"})
    for file in common.COPIED_FILES:
        if (tiny_llama_dir / file).is_file():
            shutil.copy2(tiny_llama_dir / file, out / file)

    report = json.loads((out / "peer.json").read_text())
    assert report["tensors_changed"] == len(tensors) == 2 * 7
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(1))
    peer_model = load(str(out)).model
    with torch.no_grad():
        assert torch.equal(peer_model(ids).logits, loaded.model(ids).logits)


def test_write_dequantized_refuses_a_wrong_shape(tiny_llama_dir, tmp_path):
    common = _peers_common()
    bad = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="q_proj"):
        common.write_dequantized(str(tiny_llama_dir), bad, str(tmp_path), {})


def test_write_dequantized_keeps_the_float_original_of_a_tensor_only_cast(tiny_llama_dir, tmp_path):
    # GPTQModel's AWQ runs in bfloat16: the embedding it hands back is the float one, cast; a norm
    # AWQ scaled is new. The first must come back in float32 exactly, the second as the peer's.
    from safetensors.torch import load_file

    common = _peers_common()
    ref = load_file(str(tiny_llama_dir / "model.safetensors"))
    emb, norm = "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"
    assert ref[emb].dtype == torch.float32
    scaled = (ref[norm] * 1.5).to(torch.bfloat16)
    common.write_dequantized(str(tiny_llama_dir), {emb: ref[emb].to(torch.bfloat16), norm: scaled},
                             str(tmp_path), {})
    out = load_file(str(tmp_path / "model.safetensors"))
    assert not torch.equal(ref[emb].to(torch.bfloat16).float(), ref[emb])     # the cast does lose bits
    assert torch.equal(out[emb], ref[emb])
    assert torch.equal(out[norm], scaled.float())
    assert json.loads((tmp_path / "peer.json").read_text())["tensors_changed_kinds"] == ["input_layernorm"]


def test_run_measured_sees_the_childs_memory_and_cpu(tmp_path):
    common = _peers_common()
    # the child touches 300 MiB and spins a little: both must show in what wait4 reports
    code = "b = bytearray(300 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nsum(range(3_000_000))"
    wall, cpu, rss, exit_code = common.run_measured([sys.executable, "-c", code], {}, tmp_path / "log")
    assert exit_code == 0
    assert rss >= 300
    assert 0 < cpu and 0 < wall


def test_every_peer_names_its_pinned_version():
    common = _peers_common()
    for name, peer in common.PEERS.items():
        doc = (PEERS_DIR / peer.script).read_text()
        pinned = peer.requirements[0].split("==")[1]
        assert pinned in doc.split('"""')[1], f"{peer.script} docstring does not state version {pinned}"


def test_failure_reason_finds_the_exception_behind_a_listing():
    # llm-compressor prints the offending layers after its ValueError: the row must name the error
    common = _peers_common()
    log = ["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: columns not divisible by 128",
           *[f"  - model.layers.{i}.mlp.up_proj (columns=576, group_size=128)" for i in range(30)]]
    reason = common.failure_reason(RuntimeError("peer exited 1:\n" + "\n".join(log)))
    assert reason == "RuntimeError: ValueError: columns not divisible by 128"
    assert common.failure_reason(RuntimeError("exited 1:\nsomething broke")) == "RuntimeError: something broke"


@pytest.mark.slow
def test_gptqmodel_peer_hands_over_the_weights_it_quantized(tiny_llama_dir, tmp_path):
    """GPTQModel quantizes the tiny Llama; the weights it hands over must be close to the float
    weights: within 2x lowbit RTN's relative error on each linear (GPTQ trades weight error for
    output error, but not by that much). Read in memory right after quantize(), GPTQModel 7.6's
    weights had every code one step off (zero-points in its save layout): ~3.5x RTN's error."""
    common = _peers_common()
    _peer_environment_or_skip(common, "gptqmodel-gptq")
    samples = common.write_samples(str(tiny_llama_dir), 4, 64, 0, tmp_path / "calib.safetensors")
    common.run_peer("gptqmodel-gptq", str(tiny_llama_dir), {"bits": 4, "group": 32, "sym": True}, samples,
                    tmp_path / "peer", threads=2)
    _assert_each_linear_within_2x_rtn(tiny_llama_dir, tmp_path / "peer")


@pytest.mark.slow
@pytest.mark.parametrize("name, bits_per_weight", [("hqq", 4 + 2 * 16 / 32), ("torchao-intx", 8 + (32 + 8) / 32),
                                                   ("bitsandbytes-nf4", 4 + 32 / 32)])
def test_data_free_peer_hands_over_its_weights_and_storage(name, bits_per_weight, tiny_llama_dir, tmp_path):
    """Each calibration-free peer quantizes the tiny Llama at 4 bits, group 32: every linear comes
    back changed and within 2x lowbit RTN's relative error (all three are RTN-like grids), the
    rest untouched, and the storage it reports is what its layout holds (hqq: float16 scale and
    zero; torchao: int8 codes unpacked, float32 scale, int8 zero-point; bitsandbytes: packed NF4
    codes, float32 absmax)."""
    from safetensors.torch import load_file

    common = _peers_common()
    _peer_environment_or_skip(common, name)
    samples = common.write_samples(str(tiny_llama_dir), 2, 32, 0, tmp_path / "calib.safetensors")
    record = common.run_peer(name, str(tiny_llama_dir), {"bits": 4, "group": 32, "sym": True}, samples,
                             tmp_path / "peer", threads=2)
    assert record["quantized_linears"] == 2 * 7
    assert record["bits_per_weight"] == pytest.approx(bits_per_weight)
    _assert_each_linear_within_2x_rtn(tiny_llama_dir, tmp_path / "peer")
    W_peer = load_file(str(tmp_path / "peer" / "model.safetensors"))
    W_float = load_file(str(tiny_llama_dir / "model.safetensors"))
    for key in [k for k in W_float if not k.endswith("proj.weight")]:
        assert torch.equal(W_peer[key], W_float[key].float()), key      # norms and embeddings untouched


@pytest.mark.slow
def test_bitsandbytes_peer_refuses_a_width_it_does_not_have(tiny_llama_dir, tmp_path):
    common = _peers_common()
    _peer_environment_or_skip(common, "bitsandbytes-nf4")
    samples = common.write_samples(str(tiny_llama_dir), 2, 32, 0, tmp_path / "calib.safetensors")
    with pytest.raises(RuntimeError, match="no 3-bit weight format") as info:
        common.run_peer("bitsandbytes-nf4", str(tiny_llama_dir), {"bits": 3, "group": 64, "sym": True}, samples,
                        tmp_path / "peer")
    assert common.failure_reason(info.value).startswith("RuntimeError: ValueError: bitsandbytes has no 3-bit")


@pytest.mark.slow
def test_autoround_peer_hands_over_decoded_weights_and_refuses_skipped_layers(tiny_gemma3_dir, tiny_llama_dir,
                                                                               tmp_path):
    """auto-round's SignRound on the tiny Gemma 3 (every shape a multiple of 32, as its packing
    wants): each linear comes back as scale x integer code, within 2x lowbit RTN's relative error
    (its rounding moves by at most half a step and its clips stay near min/max). On the tiny Llama
    (k/v with 48 rows) it skips k and v: the row must fail, not compare a partly float model."""
    common = _peers_common()
    _peer_environment_or_skip(common, "autoround")
    samples = common.write_samples(str(tiny_gemma3_dir), 4, 64, 0, tmp_path / "calib.safetensors")
    record = common.run_peer("autoround", str(tiny_gemma3_dir), {"bits": 4, "group": 32, "sym": True}, samples,
                             tmp_path / "peer", threads=2)
    assert record["quantized_linears"] == 2 * 7 and record["hyperparameters"]["iters"] == 200
    _assert_each_linear_within_2x_rtn(tiny_gemma3_dir, tmp_path / "peer")
    samples = common.write_samples(str(tiny_llama_dir), 4, 64, 0, tmp_path / "calib_llama.safetensors")
    with pytest.raises(RuntimeError, match="left 4 decoder linears unquantized"):
        common.run_peer("autoround", str(tiny_llama_dir), {"bits": 4, "group": 32, "sym": True}, samples,
                        tmp_path / "peer_llama", threads=2)


@pytest.mark.slow
def test_quanto_peer_records_the_groups_it_chose_and_refuses_others(tiny_llama_dir, tmp_path):
    """optimum-quanto picks its own group: 96 columns are not over 128, so one group per row; 160
    columns take 32 (128, 96 and 64 do not divide 160). The weights stay within 2x lowbit RTN's
    error at group 128, the storage is 4-bit codes plus float32 scale and shift per group, and a
    group it cannot be asked for fails the row."""
    common = _peers_common()
    _peer_environment_or_skip(common, "quanto")
    samples = common.write_samples(str(tiny_llama_dir), 2, 32, 0, tmp_path / "calib.safetensors")
    record = common.run_peer("quanto", str(tiny_llama_dir), {"bits": 4, "group": 128, "sym": True}, samples,
                             tmp_path / "peer", threads=2)
    assert record["groups_used"] == {"96": 12, "32": 2}            # 6 linears of 96 columns and down_proj per layer
    weights = {"96": 96 * (96 * 2 + 48 * 2 + 160 * 2), "32": 160 * 96}   # per layer: q, o, k, v, gate, up | down
    expected = sum(n * (4 + 64 / int(g)) for g, n in weights.items()) / sum(weights.values())
    assert record["bits_per_weight"] == pytest.approx(expected)
    _assert_each_linear_within_2x_rtn(tiny_llama_dir, tmp_path / "peer", group=128)
    with pytest.raises(RuntimeError, match="group 64 cannot be asked for"):
        common.run_peer("quanto", str(tiny_llama_dir), {"bits": 4, "group": 64, "sym": True}, samples,
                        tmp_path / "peer64")
