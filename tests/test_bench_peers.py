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
