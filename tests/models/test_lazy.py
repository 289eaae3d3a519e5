"""Models larger than memory: `--lazy` reads one decoder layer at a time and streams the output, writing
exactly the tensors the in-memory path writes; under a memory cap the in-memory run fails and the lazy
one passes; the lazy reader refuses a lying safetensors header before reading anything."""
from __future__ import annotations

import hashlib
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import REPO, assert_one_line_error, run_cli

from lowbit.errors import LowbitError
from lowbit.export.lowbit_dir import INDEX, _read_tensors
from lowbit.models.lazy import SafetensorsFile


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = _read_tensors(a), _read_tensors(b)
    assert sorted(ta) == sorted(tb)
    assert all(torch.equal(ta[k], tb[k]) for k in ta), [k for k in ta if not torch.equal(ta[k], tb[k])][:3]


@pytest.mark.parametrize("family,method,walk", [("llama", "rtn", None), ("llama", "gptq", "sequential"),
                                               ("llama", "awq", "two-pass"), ("gemma3", "gptq", "sequential")])
def test_lazy_writes_the_tensors_the_in_memory_path_writes(request, calib, tmp_path, capsys, family, method, walk):
    tiny_llama_dir = request.getfixturevalue(f"tiny_{family}_dir")
    argv = ["quantize", tiny_llama_dir, "--method", method, "--bits", "4", "--group", "32"]
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in Path(tiny_llama_dir).iterdir()}
    if walk:
        argv += ["--calib", calib, "--samples", "4", "--seq-len", "32", "--walk", walk]
    code, _, err = run_cli(capsys, *argv, "--out", tmp_path / "memory")
    assert code == 0, err
    code, out, err = run_cli(capsys, *argv, "--out", tmp_path / "lazy", "--lazy")
    assert code == 0, err
    assert (tmp_path / "lazy" / INDEX).is_file() and len(list((tmp_path / "lazy").glob("model-*.safetensors"))) == 3
    _same_tensors(tmp_path / "memory", tmp_path / "lazy")
    m_memory = json.loads((tmp_path / "memory" / "lowbit.json").read_text())
    m_lazy = json.loads((tmp_path / "lazy" / "lowbit.json").read_text())
    assert m_lazy["tensors"] == m_memory["tensors"]
    code, out_lazy, err = run_cli(capsys, "eval", tmp_path / "lazy", "--text", calib, "--ctx", "32", "--windows", "2")
    assert code == 0, err
    code, out_memory, err = run_cli(capsys, "eval", tmp_path / "memory", "--text", calib, "--ctx", "32", "--windows", "2")
    row = lambda out: out.splitlines()[2].split()[1:-1]        # ppl … tokens, windows: not the name or seconds
    assert row(out_lazy) == row(out_memory)
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in Path(tiny_llama_dir).iterdir()} == before


def test_lazy_bad_input(tiny_llama_dir, calib, tmp_path, capsys):
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "gptq", "--calib", calib, "--out",
                           tmp_path / "b", "--lazy", "--workers", "2")
    assert_one_line_error(code, err, "--lazy", "--workers")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _file(tmp_path: Path, header: dict, data: bytes = b"\0" * 16) -> Path:
    raw = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [4], "data_offsets": [0, 17]},          # past the end of the file
    {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]},          # the shape says 20 bytes
    {"dtype": "I8", "shape": [16], "data_offsets": [0, 16]},          # not a float dtype
    {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 16]},     # claims 4 TB: refused, nothing allocated
    {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]},
])
def test_lying_headers_are_refused_before_reading(tmp_path, entry):
    with pytest.raises(LowbitError, match="bad entry"):
        SafetensorsFile(_file(tmp_path, {"t": entry}))


def test_a_truthful_header_reads_back(tmp_path):
    data = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    f = SafetensorsFile(_file(tmp_path, {"t": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, data))
    assert torch.equal(f.get("t"), torch.arange(4.0).reshape(2, 2))
    path = tmp_path / "w.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(LowbitError, match="header length"):
        SafetensorsFile(path)


CAP_MIB = 1000  # below the float model alone (1.1 GB), above the lazy run's peak (~650 MiB RSS here)


def test_lazy_fits_under_a_memory_cap_the_in_memory_path_does_not(tmp_path):
    """A synthetic Llama (20 layers, hidden 1024, bf16 shards) quantized in a process whose data segment
    is capped (RLIMIT_DATA: anonymous memory, where tensors live) at CAP_MIB."""
    sys.path.insert(0, str(REPO / "bench"))
    from synthetic_model import PRESETS, write_synthetic

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY and hard < CAP_MIB * 2**20:
            pytest.skip("the data-segment limit is already below the cap")
    except (ValueError, OSError, AttributeError) as e:
        pytest.skip(f"RLIMIT_DATA cannot be set here: {e}")
    model = write_synthetic(tmp_path / "syn", **PRESETS["capped"])

    def capped():
        resource.setrlimit(resource.RLIMIT_DATA, (CAP_MIB * 2**20, CAP_MIB * 2**20))

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "lowbit", "-q", "quantize", str(model), "--bits", "4", "--group",
                               "128", "--out", str(tmp_path / "q"), "--overwrite", *extra], preexec_fn=capped,
                              capture_output=True, text=True, timeout=600)

    lazy = run("--lazy")
    assert lazy.returncode == 0, lazy.stderr[-2000:]
    assert json.loads((tmp_path / "q" / "lowbit.json").read_text())["tensors"]
    in_memory = run()
    assert in_memory.returncode != 0                     # the cap bites: the whole float model does not fit
    assert "memory" in in_memory.stderr.splitlines()[-1]
