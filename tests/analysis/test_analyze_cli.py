"""`lowbit analyze` and `lowbit demo range`: bad input is one clear line and exit 2; the demo tells its numbers."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit.analysis.range_demo import absmax_grid, grid_rows
from lowbit.models.specs import LinearGroup
from support import assert_one_line_error, run_cli
from planted import planted_dir  # noqa: F401  (fixture)



def test_text_too_short(capsys, planted_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("just a few words")
    code, _, err = run_cli(capsys, "analyze", planted_dir, "--out", tmp_path / "o", "--text", text, "--seq-len", 64)
    assert_one_line_error(code, err, "short.txt", "too short", "--seq-len 64")
    assert not (tmp_path / "o").exists()


def test_out_is_a_file(capsys, planted_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    code, _, err = run_cli(capsys, "analyze", planted_dir, "--out", tmp_path / "f")
    assert_one_line_error(code, err, "is a file")


def test_spec_without_down_projection(capsys, planted_dir, tmp_path, monkeypatch):
    import lowbit.models.load as load_module

    real_load = load_module.load

    def load_with_missing_down(arg):
        loaded = real_load(arg)
        spec = loaded.spec
        groups = spec.groups[:-1] + (LinearGroup("mlp.up_proj", ("mlp.missing_proj",), source_kind="linear"),)
        loaded.spec = dataclasses.replace(spec, groups=groups, down="mlp.missing_proj",
                                          residual_writers=("self_attn.o_proj", "mlp.missing_proj"))
        return loaded

    monkeypatch.setattr(load_module, "load", load_with_missing_down)
    code, _, err = run_cli(capsys, "analyze", planted_dir, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "down projection", "mlp.missing_proj")


@pytest.mark.parametrize("args, needle", [
    (["--feature-positions", "2"], "min_positions"),
    (["--samples", "0"], "--samples"),
    (["--eval-samples", "9"], "--eval-samples"),
    (["--seq-len", "300"], "context"),
    (["--sens-bits", "1"], "bits"),
])
def test_bad_settings(capsys, planted_dir, tmp_path, args, needle):
    code, _, err = run_cli(capsys, "analyze", planted_dir, "--out", tmp_path / "o", *args)
    assert_one_line_error(code, err, needle)


def test_seed_example_vector():
    """Seed 001 §1.6: with the emergent feature -67.0 in range, int8 absmax keeps almost nothing of the rest."""
    a = torch.tensor([-0.10, -0.23, 0.08, -0.38, -0.28, -0.29, -2.11, 0.34, -0.53, -67.0])
    deq, _, _ = absmax_grid(a, 8)
    expected = [-0.00, -0.00, 0.00, -0.53, -0.53, -0.53, -2.11, 0.53, -0.53, -67.00]
    assert [round(float(v), 2) for v in deq] == pytest.approx(expected, abs=1e-9)
    deq, _, _ = absmax_grid(a[:-1], 8)                         # without it: only -0.29 moves, to -0.28
    assert [round(float(v), 2) for v in deq] == [-0.10, -0.23, 0.08, -0.38, -0.28, -0.28, -2.11, 0.33, -0.53]
    k, rows = grid_rows(a)
    assert k == 9
    in_range, aside = rows[0], rows[1]
    assert in_range.rel_error > 10 * aside.rel_error and aside.levels_used > in_range.levels_used


def test_demo_range(capsys, planted_dir, tmp_path):
    code, out, _ = run_cli(capsys, "demo", "range", "--model", planted_dir, "--plot", tmp_path / "range.png")
    assert code == 0
    assert "weight row" in out and "int4 absmax" in out and "set aside" in out
    assert (tmp_path / "range.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run_cli(capsys, "demo", "range", "--model", planted_dir, "--plot", tmp_path / "x.txt")
    assert_one_line_error(code, err, "--plot")
