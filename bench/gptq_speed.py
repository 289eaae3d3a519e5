"""GPTQ quantization speed: lowbit against llm-compressor (and GPTQModel) on the same CPU, same
model, same calibration windows, same thread count, measured in one run (issue 4's speed bar).

Rows: wall and CPU seconds of each tool's whole quantize process (load, calibration, solve,
save), its peak RSS, and the ratio to lowbit's wall time (its first --walks row). lowbit runs
once per walk (calibration/walker.py: sequential, one forward per layer; two-pass, capture then
re-run). Each lowbit run is also split into its parts (from the walker's per-layer timings) and
set against the bound "2 × (one calibration forward pass + the solves)", where the forward pass
is timed separately, plain, in its own process.

    python bench/gptq_speed.py --model smollm2-135m --samples 8 --threads 2

Quality is not compared here (bench/weight_only.py does that at 32 windows); fewer windows keep
a run of the slowest peer within a session on the 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import CALIB_TEXT, lowbit_quantize, machine, run_measured, table, write_json

PEERS = ("llmcompressor-gptq", "gptqmodel-gptq")


def forward_seconds(model: str, samples_file: Path, threads: int) -> tuple[float, int]:
    """(seconds of one plain forward pass of the float model over the samples, peak RSS MiB)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    _, rss, _ = run_measured([sys.executable, __file__, "--forward-worker", model, str(samples_file), str(out)], threads)
    seconds = json.loads(out.read_text())["seconds"]
    out.unlink()
    return seconds, rss


def forward_worker(model: str, samples_file: str, out: str) -> None:
    import torch
    from safetensors.torch import load_file

    from lowbit.models.load import load

    ids = load_file(samples_file)["input_ids"]  # [N, L]
    m = load(model).model
    with torch.no_grad():
        start = time.perf_counter()
        for row in ids:
            m(input_ids=row[None], use_cache=False, logits_to_keep=1)
        seconds = time.perf_counter() - start
    Path(out).write_text(json.dumps({"seconds": seconds}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--forward-worker":
        return forward_worker(*sys.argv[2:5])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="OMP threads of every process (the same for all tools)")
    p.add_argument("--walks", nargs="+", default=["sequential", "two-pass"], choices=("sequential", "two-pass"))
    p.add_argument("--peers", nargs="*", default=["llmcompressor-gptq"], choices=PEERS)
    p.add_argument("--work", default=str(Path.home() / ".cache/lowbit/bench/gptq_speed"))
    p.add_argument("--json", default="bench/results/gptq_speed.json")
    args = p.parse_args()
    from peers.common import failure_reason, run_peer, write_samples

    work = Path(args.work) / args.model
    samples = work / f"calib-{args.samples}x{args.seq_len}-seed{args.seed}.safetensors"
    if not samples.exists():
        write_samples(args.model, args.samples, args.seq_len, args.seed, samples)

    flags = ["--method", "gptq", "--bits", str(args.bits), "--group", str(args.group), "--sym",
             "--scale-rule", "absmax", "--no-act-order",   # as measured (the CLI's defaults changed since)
             "--calib", str(CALIB_TEXT), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
             "--seed", str(args.seed)]
    fwd, fwd_rss = forward_seconds(args.model, samples, args.threads)
    rows, parts_of = [], {}
    for walk in args.walks:
        q = lowbit_quantize(args.model, [*flags, "--walk", walk], work / f"lowbit-gptq-{walk}", args.threads)
        parts = {k: sum(t[k] for t in q["timings"]) for k in ("capture_seconds", "solve_seconds", "forward_seconds")}
        bound = 2 * (fwd + parts["solve_seconds"])
        parts_of[walk] = parts
        rows.append({"tool": "lowbit", "method": f"gptq ({walk})", "wall_seconds": q["wall_seconds"],
                     "peak_rss_mib": q["peak_rss_mib"], "quantize_seconds": q["seconds"], **parts,
                     "calibration_forward_seconds": fwd, "bound_seconds": bound, "within_bound": q["seconds"] <= bound})
    for peer in args.peers:
        setting = {"bits": args.bits, "group": args.group, "sym": True}
        try:
            r = run_peer(peer, args.model, setting, samples, work / peer, threads=args.threads)
            rows.append({"tool": f"{r.get('tool', peer)} {r.get('tool_version', '')}".strip(), "method": peer,
                         "wall_seconds": r["quantize_seconds"], "cpu_seconds": r["quantize_cpu_seconds"],
                         "peak_rss_mib": r["peak_rss_mib"]})
        except Exception as e:  # a peer that cannot run is a row saying why
            rows.append({"tool": peer, "method": peer, "error": failure_reason(e, 200)})
    base = rows[0]["wall_seconds"]
    for r in rows:
        if r.get("wall_seconds"):
            r["lowbit_over_this"] = base / r["wall_seconds"]
    print(table(["tool", "method", "wall s", "peak RSS MiB", "lowbit / this"],
                [[r["tool"], r["method"], r.get("wall_seconds") or r.get("error"), r.get("peak_rss_mib"),
                  r.get("lowbit_over_this")] for r in rows]))
    for walk, lb in zip(args.walks, rows):
        parts = parts_of[walk]
        after = "re-run" if walk == "two-pass" else "after the last group"
        print(f"lowbit {walk}: {lb['quantize_seconds']:.1f} s in the process = capture {parts['capture_seconds']:.1f} + "
              f"solve {parts['solve_seconds']:.1f} + {after} {parts['forward_seconds']:.1f} (+ write-back); "
              f"bound 2 x (forward {fwd:.1f} + solves) = {lb['bound_seconds']:.1f} s: "
              f"{'within' if lb['within_bound'] else 'OVER'}")
    print(f"{args.model}, W{args.bits} g{args.group} sym, {args.samples} x {args.seq_len} calibration tokens of "
          f"{CALIB_TEXT} (seed {args.seed}), {args.threads} threads per process")
    write_json(Path(args.json), {"bench": "gptq_speed", "model": args.model, "bits": args.bits, "group": args.group,
                                 "calib_text": str(CALIB_TEXT), "samples": args.samples, "seq_len": args.seq_len,
                                 "seed": args.seed, "tokens": args.samples * args.seq_len, "threads": args.threads,
                                 "forward_peak_rss_mib": fwd_rss, "machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
