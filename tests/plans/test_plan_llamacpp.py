"""A plan in GGUF types handed to llama.cpp's own llama-quantize (`--tensor-type-file` from `lowbit plan
--llama-types`) on lowbit's F32 export: every planned tensor of the written file has the plan's type.
Needs the llama.cpp tools lowbit builds (`python bench/peers/llamacpp_tools.py`); skipped without them."""
from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest

from export.gguf_support import with_merges
from support import REPO, run_cli

spec = importlib.util.spec_from_file_location("llamacpp_tools", REPO / "bench" / "peers" / "llamacpp_tools.py")
tools = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tools)
QUANTIZE = tools.tools_root() / "bin" / "llama-quantize"
pytestmark = pytest.mark.skipif(not QUANTIZE.exists(), reason="llama.cpp tools not built "
                                "(python bench/peers/llamacpp_tools.py)")


def test_llama_quantize_reproduces_the_planned_types(tiny_llama_dir, tmp_path, capsys):
    from gguf import GGUFReader

    from lowbit.export.gguf.writer import write_gguf
    from lowbit.models.gguf_names import family_for, gguf_name

    src = with_merges(tiny_llama_dir, tmp_path / "src")
    f32 = write_gguf(str(src), tmp_path / "f32.gguf").path
    plan, types, summary = tmp_path / "plan.json", tmp_path / "types.txt", tmp_path / "s.json"
    code, _, err = run_cli(capsys, "-q", "plan", src, "--target-bpw", "5.5", "--formats", "Q4_0,Q5_0,Q8_0",
                           "--loss", "proxy", "--samples", "2", "--seq-len", "32", "--out", plan,
                           "--llama-types", types, "--json", summary)
    assert code == 0, err
    choices = json.loads(summary.read_text())["choices"]
    assert len({c["format"] for c in choices}) > 1
    out = tmp_path / "planned.gguf"
    subprocess.run([str(QUANTIZE), "--tensor-type-file", str(types), str(f32), str(out), "Q8_0", "1"],
                   check=True, capture_output=True)
    written = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    family = family_for("llama")
    for c in choices:
        assert written[gguf_name(f"{c['name']}.weight", family)[0]] == c["format"], c["name"]


def test_a_plan_with_a_non_gguf_choice_cannot_be_written_for_llama(tiny_llama_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "4.6", "--formats",
                           "int4-g32-sym,Q8_0", "--loss", "proxy", "--samples", "2", "--seq-len", "32",
                           "--out", tmp_path / "p.json", "--llama-types", tmp_path / "t.txt")
    assert code == 2 and "not a GGUF type" in err
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "t.txt").exists()
