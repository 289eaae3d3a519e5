"""Importance matrices for the GGUF export: lowbit's own (mean x^2 per input column of each linear
over calibration windows) and llama.cpp's GGUF imatrix file format read back."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from gguf_support import read_tensors, with_merges

from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.export.gguf.imatrix import compute_imatrix, read_imatrix
from lowbit.models.load import load


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory):
    return with_merges(tiny_llama_dir, tmp_path_factory.mktemp("gguf_imatrix_llama"))


def test_imatrix_is_the_mean_square_of_each_linears_input(llama_dir):
    loaded = load(str(llama_dir))
    samples = torch.randint(0, 259, (3, 20), generator=torch.Generator().manual_seed(0))
    imatrix = compute_imatrix(loaded, samples)
    assert len(imatrix) == 7 * loaded.dims.n_layers
    # the input of layer 1's q/k/v is its input_layernorm output: recompute it without hooks
    layer = loaded.model.model.layers[1]
    seen = []
    with torch.no_grad():
        for row in samples:
            hidden = loaded.model(row[None, :], output_hidden_states=True, use_cache=False).hidden_states[1]
            seen.append(layer.input_layernorm(hidden).reshape(-1, hidden.shape[-1]))
    expected = torch.cat(seen).double().pow(2).mean(0).float().numpy()
    for role in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(imatrix[f"blk.1.{role}.weight"], expected, rtol=1e-5)
    assert imatrix["blk.0.ffn_down.weight"].shape == (loaded.model.config.intermediate_size,)


def _imatrix_file(path, entries: dict[str, tuple[np.ndarray, float]]):
    writer = GGUFWriter(path, "imatrix")
    for name, (sums, count) in entries.items():
        writer.add_tensor(f"{name}.in_sum2", sums.reshape(1, -1).astype(np.float32))
        writer.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_llama_cpp_imatrix_file_is_read_as_sums_over_counts(tmp_path):
    sums = np.arange(1, 97, dtype=np.float32)
    path = _imatrix_file(tmp_path / "imatrix.gguf", {"blk.0.attn_q.weight": (sums, 8.0)})
    out = read_imatrix(path)
    assert list(out) == ["blk.0.attn_q.weight"]
    np.testing.assert_array_equal(out["blk.0.attn_q.weight"], sums / 8)
    bad = _imatrix_file(tmp_path / "zero.gguf", {"blk.0.attn_q.weight": (sums, 0.0)})
    with pytest.raises(LowbitError, match="positive count"):
        read_imatrix(bad)


def test_export_with_imatrix_file_and_with_calib(llama_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    entries = {f"blk.{i}.{r}.weight": (rng.uniform(0.1, 5.0, 96), 4.0) for i in range(2)
               for r in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")}
    path = _imatrix_file(tmp_path / "im.gguf", entries)
    plain, weighted, calib = tmp_path / "p.gguf", tmp_path / "w.gguf", tmp_path / "c.gguf"
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat and then it went home. " * 80)
    assert main(["export", str(llama_dir), "--format", "gguf", "--type", "Q4_K_M", "--out", str(plain)]) == 0
    assert main(["export", str(llama_dir), "--format", "gguf", "--type", "Q4_K_M", "--imatrix", str(path),
                 "--out", str(weighted)]) == 0
    assert main(["export", str(llama_dir), "--format", "gguf", "--type", "Q4_K_M", "--calib", str(text),
                 "--out", str(calib)]) == 0
    p, w, c = read_tensors(plain), read_tensors(weighted), read_tensors(calib)
    assert not np.array_equal(p["blk.0.attn_q.weight"][2], w["blk.0.attn_q.weight"][2])
    assert not np.array_equal(p["blk.0.attn_q.weight"][2], c["blk.0.attn_q.weight"][2])
    assert np.array_equal(p["blk.0.attn_output.weight"][2], w["blk.0.attn_output.weight"][2])  # no entry: as plain
    capsys.readouterr()
    code = main(["export", str(llama_dir), "--format", "gguf", "--calib", str(text), "--imatrix", str(path),
                 "--out", str(tmp_path / "both.gguf")])
    assert code == 2 and "not both" in capsys.readouterr().err and not (tmp_path / "both.gguf").exists()


def _calib_text(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat and then it went home. a dog ran by the river at noon. " * 60)
    return text


def test_gptq_export_lowers_the_output_error_and_saves_a_llama_cpp_imatrix(llama_dir, tmp_path):
    from lowbit.data.text import read_text
    from lowbit.export.gguf.imatrix import calibrate_on_text

    text = _calib_text(tmp_path)
    imat, gptq, saved = tmp_path / "i.gguf", tmp_path / "g.gguf", tmp_path / "imatrix.gguf"
    assert main(["export", str(llama_dir), "--format", "gguf", "--type", "Q4_K_M", "--calib", str(text),
                 "--out", str(imat)]) == 0
    assert main(["export", str(llama_dir), "--format", "gguf", "--type", "Q4_K_M", "--calib", str(text),
                 "--method", "gptq", "--save-imatrix", str(saved), "--out", str(gptq)]) == 0
    loaded = load(str(llama_dir))
    calibration = calibrate_on_text(loaded, read_text(str(text)), hessians=True)
    # the saved file is llama.cpp's format and holds lowbit's imatrix: sums over counts read back
    back = read_imatrix(saved)
    assert set(back) == set(calibration.imatrix) and len(back) == 7 * loaded.dims.n_layers
    for name, values in calibration.imatrix.items():
        np.testing.assert_allclose(back[name], values, rtol=1e-5)
    from lowbit.models.gguf_check import open_gguf

    fields = open_gguf(saved).fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "imatrix"
    assert int(fields["imatrix.chunk_count"].parts[-1][0]) > 0
    # GPTQ: the same types and scale search, a lower output error tr(E H E^T) summed over the linears
    t_imat, t_gptq = read_tensors(imat), read_tensors(gptq)
    assert {k: v[0] for k, v in t_imat.items()} == {k: v[0] for k, v in t_gptq.items()}  # same types
    from lowbit.formats.gguf import dequantize_gguf

    f32 = tmp_path / "f32.gguf"
    assert main(["export", str(llama_dir), "--format", "gguf", "--type", "F32", "--out", str(f32)]) == 0
    t_f32 = read_tensors(f32)
    totals = {"imatrix": 0.0, "gptq": 0.0}
    for name, H in calibration.hessians.items():
        W = torch.from_numpy(np.asarray(t_f32[name][2], dtype=np.float32).reshape(t_f32[name][1]))
        for label, tensors in (("imatrix", t_imat), ("gptq", t_gptq)):
            type_name, shape, data = tensors[name]
            E = W - dequantize_gguf(data, type_name, shape)
            totals[label] += float((E @ H.float() * E).sum())
    assert totals["gptq"] < 0.9 * totals["imatrix"], totals


@pytest.mark.parametrize("flags, message", [
    (["--method", "gptq"], "needs --calib"),
    (["--save-imatrix", "IM"], "needs --calib"),
])
def test_gptq_and_save_imatrix_bad_flags_are_one_line(llama_dir, tmp_path, capsys, flags, message):
    out = tmp_path / "out.gguf"
    flags = [str(tmp_path / "im.gguf") if f == "IM" else f for f in flags]
    capsys.readouterr()
    code = main(["export", str(llama_dir), "--format", "gguf", "--type", "Q4_K_M", *flags, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "im.gguf").exists()


def test_hessians_count_each_windows_first_token_sink_weight_times(llama_dir):
    from lowbit.export.gguf.imatrix import calibrate

    loaded = load(str(llama_dir))
    samples = torch.randint(0, 259, (3, 12), generator=torch.Generator().manual_seed(1))
    plain = calibrate(loaded, samples, hessians=True, sink_weight=1)
    weighted = calibrate(loaded, samples, hessians=True, sink_weight=5)
    first = calibrate(loaded, samples[:, :1], hessians=True, sink_weight=1)
    assert plain.imatrix.keys() == weighted.imatrix.keys()
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight"):
        np.testing.assert_allclose(weighted.imatrix[name], plain.imatrix[name])  # the imatrix stays a plain mean
        expected = plain.hessians[name] + 4 * first.hessians[name]
        # float32 forwards of a batch vs one window at a time differ in the last bits
        scale = float(expected.abs().max())
        torch.testing.assert_close(weighted.hessians[name], expected, rtol=1e-4, atol=1e-5 * scale)
        assert not torch.allclose(weighted.hessians[name], plain.hessians[name], rtol=1e-3, atol=1e-3 * scale)
    assert weighted.hessians["blk.0.attn_q.weight"] is weighted.hessians["blk.0.attn_v.weight"]  # one shared input
