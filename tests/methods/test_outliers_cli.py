"""`lowbit quantize --outliers`: the kept weights survive save and reload bit for bit, count in bits per
weight, lower the output error of GPTQ at the same dense format; exports refuse them; bad shares and
methods are one line."""
from __future__ import annotations

import json

import pytest
import torch

from support import assert_one_line_error, run_cli

from lowbit.models.load import load
from lowbit.nn.qlinear import QuantLinear


def _q(capsys, model, calib, out, *extra):
    return run_cli(capsys, "-q", "quantize", model, "--method", "gptq", "--bits", "3", "--group", "32", "--calib", calib,
                   "--samples", "4", "--seq-len", "64", "--out", out, "--json", f"{out}.json", *extra)


def test_outliers_are_stored_counted_and_help(tiny_llama_dir, calib, tmp_path, capsys):
    assert _q(capsys, tiny_llama_dir, calib, tmp_path / "plain")[0] == 0
    code, _, err = _q(capsys, tiny_llama_dir, calib, tmp_path / "sparse", "--outliers", "1%")
    assert code == 0, err
    plain, sparse = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "sparse"))
    model = load(str(tmp_path / "sparse")).model
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    kept = sum(m.outlier_index.numel() for m in linears)
    weights = sum(m.in_features * m.out_features for m in linears)
    assert kept == sum(round(0.01 * m.in_features * m.out_features) for m in linears)
    assert sparse["bits_per_weight"] == pytest.approx(plain["bits_per_weight"] + kept * 48 / weights, abs=1e-12)
    ours = sum(v[0] for v in sparse["proxy_loss"].values())
    theirs = sum(v[0] for v in plain["proxy_loss"].values())
    assert ours < theirs
    again = load(str(tmp_path / "sparse")).model                       # a reload computes the same weights
    for a, b in zip(linears, [m for m in again.modules() if isinstance(m, QuantLinear)]):
        assert torch.equal(a.W_dq, b.W_dq)
        assert torch.equal(a.W_dq.reshape(-1)[a.outlier_index.long()], a.outlier_values.float())
    code, _, err = run_cli(capsys, "export", tmp_path / "sparse", "--format", "compressed-tensors",
                           "--out", tmp_path / "ct")
    assert_one_line_error(code, err, "dense-and-sparse")


@pytest.mark.parametrize("extra,needle", [
    (("--outliers", "lots"), "a share such as 0.5%"),
    (("--outliers", "20%"), "[0, 0.1)"),
])
def test_bad_outlier_share(tiny_llama_dir, calib, tmp_path, capsys, extra, needle):
    code, _, err = _q(capsys, tiny_llama_dir, calib, tmp_path / "o", *extra)
    assert_one_line_error(code, err, needle)


def test_outliers_need_gptq(tiny_llama_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "quantize", tiny_llama_dir, "--method", "rtn", "--outliers", "1%",
                           "--out", tmp_path / "o")
    assert_one_line_error(code, err, "use --method gptq")


def test_column_outliers_round_trip(tiny_llama_dir, calib, tmp_path, capsys):
    code, _, err = _q(capsys, tiny_llama_dir, calib, tmp_path / "cols", "--outliers", "5%", "--outlier-layout", "columns")
    assert code == 0, err
    a = [m for m in load(str(tmp_path / "cols")).model.modules() if isinstance(m, QuantLinear)]
    assert all(m.outlier_values.dim() == 2 and m.outlier_index.numel() == round(0.05 * m.in_features) for m in a)
    b = [m for m in load(str(tmp_path / "cols")).model.modules() if isinstance(m, QuantLinear)]
    assert all(torch.equal(x.W_dq, y.W_dq) for x, y in zip(a, b))
