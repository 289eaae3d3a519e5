"""`lowbit plan` on a tiny model: the plan stays within the target, `lowbit quantize --plan` applies it
and stores exactly the size the plan counted; bad input is one line and writes nothing."""
from __future__ import annotations

import json

import pytest

from support import assert_one_line_error, run_cli

FORMATS = "int2-g32-sym,int4-g32-sym,int8-g32-sym"
PROBE = ("--samples", "2", "--seq-len", "32")


@pytest.mark.parametrize("loss", ["kld", "kld-gptq", "fisher", "proxy"])
def test_plan_hits_the_target_and_quantize_applies_it(tiny_llama_dir, tmp_path, capsys, loss):
    plan, summary, out = tmp_path / "plan.yaml", tmp_path / "plan.json", tmp_path / "q"
    code, stdout, err = run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "3.5", "--formats", FORMATS,
                                "--loss", loss, *PROBE, "--out", plan, "--json", summary)
    assert code == 0, err
    s = json.loads(summary.read_text())
    assert s["bits_per_weight"] <= 3.5
    # the gradient pass's default rows: as long as the tiny model's 256 positions allow, 8192 tokens in all
    assert s["probe"]["fisher_rows"] == ([32, 256] if loss == "fisher" else None)
    assert len({c["format"] for c in s["choices"]}) > 1                  # a mixed plan, not a uniform one
    # every tensor's loss is non-negative and falls (weakly) with more bits, up to float32's noise (a tiny random
    # model's q/k projections barely move its outputs: their KLDs sit near 3e-8 at any width)
    for by_format in s["losses"].values():
        two, four, eight = (by_format[f] for f in ("int2-g32-sym", "int4-g32-sym", "int8-g32-sym"))
        assert 0 <= eight <= four + 1e-7 and four <= two + 1e-7
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--plan", plan, "--method", "rtn", "--out", out,
                           "--json", tmp_path / "q.json")
    assert code == 0, err
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["bits_per_weight"] == pytest.approx(s["bits_per_weight"], abs=1e-12)


def test_the_knapsack_beats_every_uniform_choice_of_the_same_size(tiny_llama_dir, tmp_path, capsys):
    summary = tmp_path / "plan.json"
    run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "4.6", "--formats", FORMATS, *PROBE,
            "--out", tmp_path / "p.json", "--json", summary)
    s = json.loads(summary.read_text())
    uniform4 = sum(v["int4-g32-sym"] for v in s["losses"].values())
    assert s["predicted_loss"] <= uniform4 + 1e-12                      # int4 everywhere (4.5 bpw) also fits


@pytest.mark.parametrize("argv,needles", [
    (("--target-bpw", "1.0"), ("below the smallest size", "bits per weight")),
    (("--target-bpw", "-2"), ("--target-bpw must be a positive number",)),
    (("--target-bpw", "4", "--formats", "int4-g32-sym,bogus"), ("unknown format name 'bogus'",)),
    (("--target-bpw", "4", "--fisher-rows", "0", "32"), ("--fisher-rows must be two positive numbers",)),
    (("--target-bpw", "4", "--fisher-rows", "2", "300"), ("--fisher-rows", "longer than the model's context (256",)),
    (("--target-bpw", "4", "--refine", "4", "--loss", "proxy"), ("--refine judges", "not proxy")),
    (("--target-bpw", "4", "--refine", "-1"), ("--refine takes a number of evaluations",)),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_llama_dir, tmp_path, capsys, argv, needles):
    plan = tmp_path / "plan.yaml"
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--formats", FORMATS, *PROBE, "--out", plan, *argv)
    assert_one_line_error(code, err, *needles)
    assert not plan.exists()


def test_an_existing_plan_is_not_overwritten(tiny_llama_dir, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text("keep me")
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "4", "--out", plan)
    assert_one_line_error(code, err, "exists")
    assert plan.read_text() == "keep me"


@pytest.mark.parametrize("loss", ["proxy", "fisher"])
def test_like_a_mix_writes_a_gguf_no_larger_than_the_mix(tiny_llama_dir, tmp_path, capsys, loss):
    """--like Q3_K_M: the decoder linears within the bits llama.cpp's Q3_K_M gives them, the embedding
    typed as the mix types it; the exported planned file is no larger than the mix's own export."""
    from gguf import GGUFReader

    from export.gguf_support import with_merges

    src = with_merges(tiny_llama_dir, tmp_path / "src")
    plan, summary = tmp_path / "plan.yaml", tmp_path / "plan.json"
    code, stdout, err = run_cli(capsys, "plan", src, "--like", "Q3_K_M", "--loss", loss, *PROBE,
                                "--out", plan, "--json", summary)
    assert code == 0, err
    assert "Q3_K_M's" in stdout and "lowbit export" in stdout
    s = json.loads(summary.read_text())
    assert len({c["format"] for c in s["choices"]}) > 1
    files = {}
    for label, flags in (("planned", ["--plan", plan]), ("mix", ["--format", "gguf", "--type", "Q3_K_M"])):
        q, gguf = tmp_path / label, tmp_path / f"{label}.gguf"
        assert run_cli(capsys, "quantize", src, *flags, "--method", "rtn", "--out", q)[0] == 0
        assert run_cli(capsys, "export", q, "--format", "gguf", "--out", gguf)[0] == 0
        files[label] = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(gguf).tensors}
    assert files["planned"]["token_embd.weight"] == files["mix"]["token_embd.weight"]
    assert set(files["planned"]) == set(files["mix"])
    linears = [n for n in files["mix"] if n.startswith("blk.") and "norm" not in n]
    planned_bytes = sum(files["planned"][n][1] for n in linears)
    assert planned_bytes <= sum(files["mix"][n][1] for n in linears)
    assert 8 * planned_bytes / sum(c["params"] for c in s["choices"]) == pytest.approx(s["bits_per_weight"])
    assert sum(b for _, b in files["planned"].values()) <= sum(b for _, b in files["mix"].values())


def test_like_an_unknown_mix_is_one_line(tiny_llama_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--like", "Q9_X", *PROBE, "--out", tmp_path / "p.yaml")
    assert_one_line_error(code, err, "Q9_X", "Q3_K_M")
    assert not (tmp_path / "p.yaml").exists()


@pytest.mark.parametrize("loss", ["kld", "proxy"])
def test_outlier_options_are_planned_counted_and_applied_by_gptq(tiny_llama_dir, tmp_path, capsys, calib, loss):
    """int2 alone is 2.5 bits per weight here, int2 with 1% kept 2.98: at 2.8 some tensors keep outliers;
    the quantized model stores exactly the bits the plan counted (the kept weights' 48 bits each included)."""
    plan, summary, out = tmp_path / "plan.yaml", tmp_path / "plan.json", tmp_path / "q"
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "2.8", "--formats", "int2-g32-sym",
                           "--outlier-shares", "1%", "--loss", loss, *PROBE, "--out", plan, "--json", summary)
    assert code == 0, err
    s = json.loads(summary.read_text())
    kept = [c for c in s["choices"] if c["outliers"]]
    assert kept and len(kept) < len(s["choices"]) and s["bits_per_weight"] <= 2.8
    for by_option in s["losses"].values():                         # keeping the salient 1% lowers the loss
        assert by_option["int2-g32-sym+1%"] < by_option["int2-g32-sym"]
    assert "int2-g32-sym+1%" in s["by_format"]
    code, printed, err = run_cli(capsys, "quantize", tiny_llama_dir, "--plan", plan, "--method", "gptq", "--calib",
                                 calib, "--samples", "4", "--seq-len", "64", "--out", out, "--json", tmp_path / "q.json")
    assert code == 0, err
    q = json.loads((tmp_path / "q.json").read_text())
    assert q["bits_per_weight"] == pytest.approx(s["bits_per_weight"], abs=1e-12)
    # the printed format column counts the tensors that keep outliers apart from the plain ones
    plain = len(s["choices"]) - len(kept)
    assert f"int2-g32-sym+1%×{len(kept)}" in printed and f"int2-g32-sym×{plain}" in printed


def test_outlier_shares_with_rtn_or_llama_types_are_refused(tiny_llama_dir, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "2.8", "--formats", "int2-g32-sym",
                           "--outlier-shares", "1%", "--loss", "proxy", *PROBE, "--out", plan,
                           "--llama-types", tmp_path / "t.txt")
    assert_one_line_error(code, err, "outliers in float16", "llama.cpp")
    assert not plan.exists()
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "2.8", "--outlier-shares", "ten",
                           *PROBE, "--out", plan)
    assert_one_line_error(code, err, "--outlier-shares 'ten'")
    run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "2.8", "--formats", "int2-g32-sym",
            "--outlier-shares", "1%", "--loss", "proxy", *PROBE, "--out", plan)
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--plan", plan, "--method", "rtn",
                           "--out", tmp_path / "q")
    assert_one_line_error(code, err, "outliers", "--method gptq")


def test_outlier_formats_limit_where_outlier_options_are_offered(tiny_llama_dir, tmp_path, capsys):
    summary = tmp_path / "plan.json"
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "3.5", "--formats", FORMATS,
                           "--outlier-shares", "0.5%,1%", "--outlier-formats", "int2-g32-sym", "--loss", "proxy",
                           *PROBE, "--out", tmp_path / "p.yaml", "--json", summary)
    assert code == 0, err
    for by_option in json.loads(summary.read_text())["losses"].values():
        assert sorted(by_option) == sorted([*FORMATS.split(","), "int2-g32-sym+0.5%", "int2-g32-sym+1%"])
    code, _, err = run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "3.5", "--formats", FORMATS,
                           "--outlier-shares", "1%", "--outlier-formats", "int3-g32-sym", *PROBE,
                           "--out", tmp_path / "q.yaml")
    assert_one_line_error(code, err, "int3-g32-sym", "not a candidate format")


def test_refine_searches_from_the_knapsack_plan_and_stays_within_the_target(tiny_llama_dir, tmp_path, capsys):
    plan, summary = tmp_path / "plan.yaml", tmp_path / "plan.json"
    code, stdout, err = run_cli(capsys, "plan", tiny_llama_dir, "--target-bpw", "3.5", "--formats", FORMATS, *PROBE,
                                "--refine", "12", "--refine-rows", "2", "64", "--out", plan, "--json", summary)
    assert code == 0, err
    s = json.loads(summary.read_text())
    assert s["bits_per_weight"] <= 3.5 and "measured search: KLD" in stdout
    assert s["search"]["kld"] <= s["search"]["start_kld"] and 0 < s["search"]["evals"] <= 12
    assert s["search"]["rows"] == [2, 64]
    # the held-out check: the search's plan kept only if better on other rows, and the printout says which
    held = s["search"]["holdout"]
    assert held["kept"] == ("search" if held["kld"] < held["start_kld"] else "start")
    assert ("kept the search's plan" if held["kept"] == "search" else "kept the knapsack's plan") in stdout
