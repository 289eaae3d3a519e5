"""`lowbit compare` on a tiny model: every cell scored, the table sorted by bits, the Pareto front right,
the page self-contained; a re-run resumes from the cache and a wider grid runs only the new cells;
bad input is one line and overwrites nothing."""
from __future__ import annotations

import json
import random

import pytest

from support import assert_one_line_error, run_cli

from lowbit.compare.report import pareto


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    words = "a b c d e f g h i j k l m n o p".split()
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(800)))
    return path


def _compare(capsys, model, calib, text, out, *extra):
    return run_cli(capsys, "-q", "compare", model, "--calib", calib, "--text", text, "--out", out, "--ctx", "64",
                   "--windows", "2", "--samples", "2", "--seq-len", "32", *extra)


def test_compare_runs_the_grid_resumes_and_widens(tiny_llama_dir, calib, text, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, err = _compare(capsys, tiny_llama_dir, calib, text, out, "--methods", "rtn,gptq",
                                 "--formats", "int4-g32-sym,int2-g32-sym")
    assert code == 0, err
    assert "4 cells run, 0 from the cache" in stdout
    res = json.loads((out / "results.json").read_text())
    assert len(res["cells"]) == 4 and all("error" not in c for c in res["cells"])
    by = {c["label"]: c for c in res["cells"]}
    assert by["rtn int2-g32-sym"]["bits_per_weight"] < by["rtn int4-g32-sym"]["bits_per_weight"]
    assert by["rtn int2-g32-sym"]["kld"] > by["rtn int4-g32-sym"]["kld"] > 0
    md = (out / "results.md").read_text()
    assert md.index("int2-g32-sym") < md.index("int4-g32-sym")             # sorted by bits per weight
    page = (out / "compare.html").read_text()
    assert "<script" not in page and "http" not in page.replace("http://www.w3.org/2000/svg", "")
    assert page.count("<svg") == 2 and "lowbit quantize" in page and 'class="front"' in page
    code, stdout, _ = _compare(capsys, tiny_llama_dir, calib, text, out, "--methods", "rtn,gptq,awq",
                               "--formats", "int4-g32-sym,int2-g32-sym")
    assert code == 0 and "2 cells run, 4 from the cache" in stdout


def test_pareto_front():
    rows = [{"bits_per_weight": 2, "kld": 1.0}, {"bits_per_weight": 3, "kld": 0.5}, {"bits_per_weight": 3, "kld": 0.7},
            {"bits_per_weight": 4, "kld": 0.5}, {"bits_per_weight": 4.5, "kld": 0.1}]
    assert pareto(rows, "kld") == {0, 1, 4}


@pytest.mark.parametrize("extra,needles", [
    (("--methods", "rtn,bogus"), ("unknown method 'bogus'",)),
    (("--formats", "int4-g32-sym,nope"), ("--formats", "nope")),
])
def test_bad_grid_is_one_line(tiny_llama_dir, calib, text, tmp_path, capsys, extra, needles):
    code, _, err = _compare(capsys, tiny_llama_dir, calib, text, tmp_path / "o", *extra)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


def test_a_cache_of_another_model_is_refused_and_kept(tiny_llama_dir, tiny_qwen2_dir, calib, text, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(capsys, tiny_llama_dir, calib, text, out, "--methods", "rtn", "--formats", "int4-g32-sym")[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, err = _compare(capsys, tiny_qwen2_dir, calib, text, out, "--methods", "rtn", "--formats", "int4-g32-sym")
    assert_one_line_error(code, err, "holds a compare of another model")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
