"""GPTQ on GGUF grids: codes written into blocks, the grid read off ggml's dequantizer, and the solver."""
import numpy as np
import pytest
import torch

from lowbit.formats.gguf import GGUF_TYPES, dequantize_gguf, quantize_gguf
from lowbit.formats.gguf.layout import rows_to_blocks
from lowbit.formats.gguf.registry import code_grid
from lowbit.methods.gptq_gguf import gptq_gguf

UNIFORM = [name for name, t in GGUF_TYPES.items() if t.set_codes is not None]


def _correlated_hessian(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, 48, generator=g) @ torch.randn(48, n, generator=g) + 0.3 * torch.randn(2048, n, generator=g)
    X[:, 3] *= 15  # one outlier channel
    return X.T @ X


def _weights(out: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_every_uniform_type_is_covered():
    assert set(UNIFORM) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    assert GGUF_TYPES["IQ4_NL"].set_codes is None


@pytest.mark.parametrize("name", UNIFORM)
def test_codes_read_off_the_grid_rewrite_the_same_bytes(name):
    t = GGUF_TYPES[name]
    W = _weights(16, 512)
    data = quantize_gguf(W, name)
    blocks = data.reshape(-1, t.bytes_per_block)
    step, offset = code_grid(blocks, name)
    values = t.dequantize_blocks(blocks)
    codes = np.where(step != 0, np.rint((values - offset) / np.where(step != 0, step, 1)), 0)
    assert codes.min() >= 0 and codes.max() <= t.code_max
    # the grid reproduces ggml's values (up to the rounding of step * c + offset) ...
    np.testing.assert_allclose(step * codes + offset, values, rtol=0, atol=1e-6 * np.abs(values).max())
    # ... and writing the codes back gives the very same bytes
    assert np.array_equal(t.set_codes(blocks, codes.astype(np.uint8)), blocks)


@pytest.mark.parametrize("name", UNIFORM)
def test_identity_hessian_gives_the_round_to_nearest_bytes(name):
    # no correlation: no error feedback, so GPTQ is the weighted quantizer itself, byte for byte
    W = _weights(32, 512)
    data, stats = gptq_gguf(W, torch.eye(512), name)
    assert np.array_equal(data, quantize_gguf(W, name, np.ones(512, np.float32)))
    assert stats.proxy_loss == pytest.approx(stats.rtn_proxy_loss)


@pytest.mark.parametrize("name", UNIFORM)
def test_error_feedback_lowers_the_output_error(name):
    W, H = _weights(64, 512), _correlated_hessian(512)
    data, stats = gptq_gguf(W, H, name)
    assert data.shape == quantize_gguf(W, name).shape
    assert stats.proxy_loss < 0.5 * stats.rtn_proxy_loss  # correlated inputs: a large reduction
    W_dq = dequantize_gguf(data, name, W.shape)
    E = W - W_dq
    assert float((E @ H * E).sum()) == pytest.approx(stats.proxy_loss, rel=1e-3)


def test_dead_columns_encode_zero_and_inputs_are_not_modified():
    W, H = _weights(32, 256), _correlated_hessian(256)
    H[:, 7] = 0
    H[7, :] = 0
    W_before, H_before = W.clone(), H.clone()
    data, _ = gptq_gguf(W, H, "Q4_K")
    assert dequantize_gguf(data, "Q4_K", W.shape)[:, 7].abs().max() < 0.05 * W.abs().max()
    assert torch.equal(W, W_before) and torch.equal(H, H_before)


def test_bad_inputs_are_refused():
    W, H = _weights(8, 256), torch.eye(256)
    with pytest.raises(ValueError, match="uniform grid"):
        gptq_gguf(W, H, "IQ4_NL")
    with pytest.raises(ValueError, match="multiple of 256"):
        gptq_gguf(_weights(8, 96), torch.eye(96), "Q4_K")
    with pytest.raises(ValueError, match="H must be"):
        gptq_gguf(W, torch.eye(128), "Q4_K")
    W_nan = W.clone()
    W_nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        gptq_gguf(W_nan, H, "Q8_0")


def test_blocks_follow_the_gguf_row_layout():
    # rows_to_blocks order: row after row of blocks; gptq_gguf's bytes decode in that order
    W = _weights(4, 512)
    data, _ = gptq_gguf(W, torch.eye(512), "Q5_0")
    assert rows_to_blocks(W.numpy(), GGUF_TYPES["Q5_0"].layout).shape[0] == data.size // 22
    assert torch.allclose(dequantize_gguf(data, "Q5_0", W.shape), W, atol=0.01)
