"""Does bitsandbytes 0.50.2 decode on its CPU path what it encodes? (behind the NF4 W4 g128 row)

For random weights of SmolLM2's shapes and a few blocksizes, bitsandbytes' quantize_4bit(NF4)
codes are compared with a plain flat-block NF4 reference (blocks of G consecutive values of the
flattened weight, nearest of its 16 levels after dividing by the block's absmax), and the weight
its dequantize_4bit hands back is compared with those same codes decoded block by block. Columns:
share of codes equal to the reference, relative weight error ||W_dq - W|| / ||W|| of its
dequantize_4bit and of its own codes decoded with their blocks. The two errors agree when G
divides the columns; when blocks straddle rows (576 columns, G = 128) its dequantize does not
decode its own codes. Runs in the bitsandbytes peer environment (bench/peers/venv.py).

    python bench/peers/bitsandbytes_blocks.py [--json bench/results/peers/bitsandbytes_blocks.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

SHAPES = [(1536, 576), (576, 1536), (1536, 512)]       # SmolLM2's MLP up / down, and a 512-column control
BLOCKS = [64, 128, 256]


def worker() -> None:
    import bitsandbytes.functional as F
    import torch

    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        W = torch.randn(*shape) * 0.02
        for G in BLOCKS:
            W_q, state = F.quantize_4bit(W, blocksize=G, quant_type="nf4", compress_statistics=False)
            levels = state.code                                     # the 16 NF4 levels
            W_b = W.flatten().view(-1, G)                           # flat blocks of G values, [n_blocks, G]
            absmax = W_b.abs().amax(1, keepdim=True)
            ref = (W_b / absmax).unsqueeze(-1).sub(levels).abs().argmin(-1).flatten()
            packed = W_q.flatten()
            codes = torch.stack([packed >> 4, packed & 15], 1).flatten().long()   # high nibble first
            decoded = (levels[codes].view(-1, G) * state.absmax[:, None]).view(shape)
            W_dq = F.dequantize_4bit(W_q, state)
            rows.append({"shape": list(shape), "blocksize": G, "codes_equal_reference": (codes == ref).float().mean().item(),
                         "rel_error_dequantize_4bit": ((W_dq - W).norm() / W.norm()).item(),
                         "rel_error_own_codes_decoded": ((decoded - W).norm() / W.norm()).item()})
    print(json.dumps(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=str(Path(__file__).resolve().parents[1] / "results/peers/bitsandbytes_blocks.json"))
    a = p.parse_args()
    from common import BITSANDBYTES, _venv_module

    python = _venv_module().ensure_venv("bitsandbytes", list(BITSANDBYTES))
    out = subprocess.run([str(python), __file__, "--worker"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'shape':>12} {'G':>4} {'codes = ref':>12} {'err dequantize_4bit':>20} {'err own codes':>14}")
    for r in rows:
        print(f"{str(tuple(r['shape'])):>12} {r['blocksize']:>4} {r['codes_equal_reference']:>12.6f} "
              f"{r['rel_error_dequantize_4bit']:>20.4f} {r['rel_error_own_codes_decoded']:>14.4f}")
    Path(a.json).write_text(json.dumps({"bench": "bitsandbytes_blocks", "tool": "bitsandbytes 0.50.2",
                                        "weights": "randn * 0.02, seed 0", "rows": rows}, indent=1))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker()
    else:
        main()
