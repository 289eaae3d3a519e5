"""Does a W8A8 checkpoint lowbit exports as compressed-tensors "int-quantized" run as lowbit's model
in an environment without lowbit? (issue 24, item 7)

The driver (lowbit's environment) exports a lowbit W8A8 directory, tokenizes the evaluation text
with lowbit's tokenizer and hands the ids over as a safetensors file; the worker runs in the
llm-compressor environment (transformers + compressed-tensors, never lowbit), loads the export with
AutoModelForCausalLM.from_pretrained, checks whether the loaded linears quantize their inputs in
the forward (one linear's output against its weight applied to the raw and to a fake-quantized
input), and computes perplexity with its own few lines (same windows, GPTQ convention: mean NLL of
each window's ctx−1 predictions, ppl = exp of the mean over windows). The driver evaluates the
lowbit directory on the same windows and writes both, with their ratio.

    python bench/peers/ct_w8a8_check.py --src DIR [--src DIR2 ...] --model smollm2-135m --windows 20
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EVAL_TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "test.txt"
RESULT = REPO / "bench" / "results" / "ct_w8a8_check.json"


def worker(a) -> None:
    import math

    import torch
    import torch.nn.functional as F
    import compressed_tensors
    import transformers
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(a.export, dtype=torch.float32).eval()
    # compressed-tensors decompresses the int8 weights on the model's first forward: windows first
    ids = load_file(a.ids)["input_ids"]
    n = ids.numel() // a.ctx
    windows = ids[: n * a.ctx].view(n, a.ctx)[: a.windows]
    losses = []
    with torch.no_grad():
        for row in windows:
            logits = model(row[None]).logits[0, :-1].float()
            losses.append(float(F.cross_entropy(logits, row[1:])))
    name, lin = next((n, m) for n, m in model.named_modules() if n.endswith("layers.0.mlp.down_proj"))
    scheme = getattr(lin, "quantization_scheme", None)
    # [batch, tokens, in]: compressed-tensors' "token" strategy reduces over the last dim of a 3-D input
    x = torch.randn(1, 64, lin.in_features, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        y = lin(x)
        w = lin.weight
        if w.dtype == torch.int8:                  # still compressed: its own scale
            w = w.float() * lin.weight_scale.float()
        w = w.float()
        s = x.abs().amax(-1, keepdim=True) / 127.5
        xq = (x / s).round().clamp(-128, 127) * s
        static = getattr(lin, "input_scale", None)
        if static is not None and static.numel() == 1 and not (scheme and scheme.input_activations.dynamic):
            xq = (x / static).round().clamp(-128, 127) * static
        err_raw = float((y - F.linear(x, w, lin.bias)).norm() / y.norm())
        err_q = float((y - F.linear(xq, w, lin.bias)).norm() / y.norm())
    Path(a.out).write_text(json.dumps({
        "ppl": math.exp(sum(losses) / len(losses)), "windows": len(losses), "ctx": a.ctx,
        "versions": {"transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "torch": torch.__version__},
        "probe_linear": name, "probe_module": type(lin).__name__,
        "input_activations": None if scheme is None or scheme.input_activations is None
        else scheme.input_activations.model_dump(mode="json"),
        "rel_error_vs_raw_input": err_raw, "rel_error_vs_quantized_input": err_q,
        "quantizes_inputs": err_q < err_raw}))


def driver(a) -> None:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    import tempfile

    from safetensors.torch import save_file

    from lowbit.data.text import read_text
    from lowbit.eval.perplexity import evaluate, tokenize
    from lowbit.models.load import load
    from venv import ensure_venv

    from common import LLMC

    python = ensure_venv("llmcompressor", list(LLMC))
    rows = []
    for src in a.src:
        with tempfile.TemporaryDirectory() as tmp:
            export = Path(tmp) / "ct"
            subprocess.run([sys.executable, "-m", "lowbit", "-q", "export", src, "--format", "compressed-tensors",
                            "--out", str(export)], check=True, cwd=REPO)
            loaded = load(src)
            ids = tokenize(loaded.tokenizer, read_text(EVAL_TEXT).text)
            save_file({"input_ids": ids.contiguous()}, str(Path(tmp) / "ids.safetensors"))
            mine = evaluate(loaded.model, ids, a.ctx, a.windows)
            out = Path(tmp) / "w.json"
            subprocess.run([str(python), str(Path(__file__)), "--worker", "--export", str(export), "--ids",
                            str(Path(tmp) / "ids.safetensors"), "--ctx", str(a.ctx), "--windows", str(a.windows),
                            "--out", str(out)], check=True, cwd=tmp)
            theirs = json.loads(out.read_text())
        row = {"src": str(src), "model": a.model, "lowbit_ppl": mine.ppl, "plain_env": theirs,
               "ppl_ratio": theirs["ppl"] / mine.ppl, "within_0.5%": abs(theirs["ppl"] / mine.ppl - 1) <= 0.005}
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    old = json.loads(RESULT.read_text()) if RESULT.exists() else {"rows": []}
    keep = [r for r in old["rows"] if (r["src"], r["model"]) not in {(x["src"], x["model"]) for x in rows}]
    RESULT.write_text(json.dumps({"bench": "ct_w8a8_check", "rows": keep + rows}, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--src", nargs="*", default=[])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--export")
    p.add_argument("--ids")
    p.add_argument("--out")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--windows", type=int, default=20)
    args = p.parse_args()
    worker(args) if args.worker else driver(args)
