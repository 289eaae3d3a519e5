"""The integer kernel against float32 on this CPU (issue 24): every linear shape of SmolLM2-135M and
Gemma 3 270M and 4096 × 4096, at 1, 16 and 2048 tokens, and the prefill of one 2048-token window
of each whole model (W8A8 per-channel weights, per-token dynamic activations).

Per shape, in one process and one run: float32 F.linear; lowbit's QuantLinear with the int8
kernel (activation quantization, torch._int_mm, scales: everything a forward does); the same
module on the simulated path; and torch._int_mm alone. Times are medians of --repeats after a
warm-up; ratios are float32 time / int8 time (> 1: the int8 kernel is faster). The load average
is recorded: on a shared machine, compare ratios, not seconds.

    python bench/int8_speed.py --repeats 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from common import REPO, machine, table, write_json

SHAPES = {  # name -> (in, out)
    "smollm2 q/o": (576, 576), "smollm2 k/v": (576, 192), "smollm2 gate/up": (576, 1536),
    "smollm2 down": (1536, 576),
    "gemma3 q": (640, 1024), "gemma3 k/v": (640, 256), "gemma3 o": (1024, 640), "gemma3 gate/up": (640, 2048),
    "gemma3 down": (2048, 640), "4096 x 4096": (4096, 4096),
}
TOKENS = (1, 16, 2048)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def linear_rows(repeats: int) -> list[dict]:
    from lowbit.formats import format_from_name
    from lowbit.formats.activation import act_format_from_name
    from lowbit.nn.qlinear import QuantLinear

    fmt, act = format_from_name("int8-ch-sym"), act_format_from_name("a8-token-sym")
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, (n_in, n_out) in SHAPES.items():
        W = torch.randn(n_out, n_in, generator=g) * 0.02
        module = QuantLinear(fmt.quantize(W), None, act)
        for tokens in TOKENS:
            x = torch.randn(tokens, n_in, generator=g)
            a8 = torch.randint(-127, 128, (tokens, n_in), dtype=torch.int8, generator=g)
            with torch.no_grad():
                t_float = timed(lambda: F.linear(x, W), repeats)
                module.kernel = "auto"
                t_int8 = timed(lambda: module(x), repeats)
                module.kernel = "simulated"
                t_sim = timed(lambda: module(x), repeats)
                t_mm = timed(lambda: torch._int_mm(a8, module.W_c), repeats)
            rows.append({"shape": name, "in": n_in, "out": n_out, "tokens": tokens, "float32_s": t_float,
                         "int8_s": t_int8, "simulated_s": t_sim, "int_mm_only_s": t_mm,
                         "speedup_int8": t_float / t_int8, "speedup_int_mm_only": t_float / t_mm})
            print(f"{name:16s} {tokens:5d} tokens: float {t_float * 1e3:8.3f} ms, int8 {t_int8 * 1e3:8.3f} ms "
                  f"({t_float / t_int8:.2f}x), _int_mm alone {t_float / t_mm:.2f}x", flush=True)
    return rows


ONLINE = {  # name -> (transform size, linear it precedes (in, out) or None, rows per token)
    "smollm2 R4 before down": (1536, (1536, 576), 1), "smollm2 R3 on q/k heads": (64, None, 9 + 3),
    "gemma3 R4 before down": (2048, (2048, 640), 1), "gemma3 R3 on q/k heads": (256, None, 4 + 1),
}


def online_rows(repeats: int, tokens: int = 2048) -> list[dict]:
    """The online Hadamards' cost at `tokens` tokens (rotations issue): the fast transform against the
    float32 linear it precedes (R4), or for R3 the transform of every q and k head of one layer."""
    from lowbit.rotations.hadamard import hadamard_transform

    rows, g = [], torch.Generator().manual_seed(0)
    for name, (n, linear, heads) in ONLINE.items():
        x = torch.randn(tokens * heads, n, generator=g)
        with torch.no_grad():
            t_had = timed(lambda: hadamard_transform(x), repeats)
            t_lin = None
            if linear is not None:
                W = torch.randn(linear[1], linear[0], generator=g) * 0.02
                t_lin = timed(lambda: F.linear(x, W), repeats)
        rows.append({"transform": name, "size": n, "tokens": tokens, "rows": tokens * heads, "hadamard_s": t_had,
                     "linear_float32_s": t_lin, "cost_vs_linear": None if t_lin is None else t_had / t_lin})
        print(f"{name:26s} {n:5d}: hadamard {t_had * 1e3:8.3f} ms" +
              ("" if t_lin is None else f", the linear {t_lin * 1e3:8.3f} ms ({t_had / t_lin:.2f}x)"), flush=True)
    return rows


def prefill_rows(models: list[str], repeats: int) -> list[dict]:
    """One 2048-token window through each whole model: float32, W8A8 on the int8 kernel, simulated."""
    from lowbit.models.load import load
    from lowbit.nn.qlinear import QuantLinear
    from lowbit.quantize import QuantizeConfig, quantize
    from lowbit.recipes import load_recipe

    rows = []
    recipe = load_recipe("w8a8-naive")
    for name in models:
        loaded = load(name)
        ids = torch.randint(100, 20000, (1, 2048), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            t_float = timed(lambda: loaded.model(ids, logits_to_keep=1), repeats)
            quantize(loaded, QuantizeConfig(plan=recipe.weights, act_plan=recipe.activations), progress=False)
            linears = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
            t_int8 = timed(lambda: loaded.model(ids, logits_to_keep=1), repeats)
            for m in linears:
                m.kernel = "simulated"
            t_sim = timed(lambda: loaded.model(ids, logits_to_keep=1), repeats)
        rotated = None
        if loaded.spec.rotation_refusal == "":                # QuaRot's W8A8: the same kernel plus online R4
            from lowbit.rotations.plan import RotationConfig

            again = load(name)
            with torch.no_grad():
                quantize(again, QuantizeConfig(plan=recipe.weights, act_plan=recipe.activations,
                                               rotation=RotationConfig()), progress=False)
                rotated = timed(lambda: again.model(ids, logits_to_keep=1), repeats)
            del again
        rows.append({"model": name, "tokens": 2048, "float32_s": t_float, "int8_s": t_int8, "simulated_s": t_sim,
                     "speedup_int8": t_float / t_int8, "quantized_linears": len(linears),
                     "int8_rotated_s": rotated, "speedup_int8_rotated": None if rotated is None else t_float / rotated})
        print(f"{name} prefill 2048: float {t_float:.3f} s, int8 {t_int8:.3f} s ({t_float / t_int8:.2f}x), "
              f"simulated {t_sim:.3f} s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "int8_speed.json"))
    a = p.parse_args()
    load_before = os.getloadavg()[0]
    linears = linear_rows(a.repeats)
    online = online_rows(a.repeats)
    prefill = prefill_rows(a.models, max(3, a.repeats // 2))
    write_json(__import__("pathlib").Path(a.json), {
        "bench": "int8_speed", "machine": machine(), "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0], "repeats": a.repeats, "activations": "a8-token-sym",
        "weights": "int8-ch-sym", "rows": linears, "online_rotations": online, "prefill": prefill})
    print(table(["shape", "tokens", "float32 ms", "int8 ms", "speedup"],
                [[r["shape"], r["tokens"], r["float32_s"] * 1e3, r["int8_s"] * 1e3, f"{r['speedup_int8']:.2f}x"]
                 for r in linears]))


if __name__ == "__main__":
    main()
