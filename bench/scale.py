"""Scale and trust (issue 28): predicted against measured peak memory, resume after SIGKILL, and
calibration in several processes, on the real models; one JSON per model, bench/results/scale_<model>.json.

  memory       `lowbit quantize` rows (RTN; GPTQ with the sequential walk, the two-pass walk, and
               --offload), each in a process of its own: the peak RSS it reached against the peak
               it predicted before the run (lowbit/calibration/memory.py), as a ratio.
  resume       the GPTQ row killed with SIGKILL once --kill-after layers are finished, then
               continued with --resume: wall time of both parts against the uninterrupted run
               (the resume overhead) and whether the directory is byte-identical.
  distributed  the GPTQ row with --workers 1 and --workers 2 (gloo; one thread per process on
               this 2-core machine, against one process with 2 threads): wall times, speed-up,
               byte-identity.
  synthetic    a 7B-shaped Llama larger than this machine's memory (bench/synthetic_model.py, written
               once to ~/.cache/lowbit/bench/synthetic-7b) quantized with --lazy: RTN and GPTQ
               (4 x 512 calibration tokens), wall time, peak RSS, predicted peak: --model synthetic-7b.

    python bench/scale.py --model smollm2-135m --stage memory --stage resume --stage distributed
    python bench/scale.py --model synthetic-7b --stage synthetic
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import CALIB_TEXT, REPO, lowbit_quantize, machine, table

RESULTS = REPO / "bench" / "results"
STAGES = ("memory", "resume", "distributed", "synthetic")
SYNTHETIC = Path.home() / ".cache" / "lowbit" / "bench" / "synthetic-7b"     # 13.5 GB: kept out of the repo


def gptq_flags(samples: int, seq_len: int, walk: str = "sequential") -> list[str]:
    return ["--method", "gptq", "--bits", "4", "--group", "128", "--calib", str(CALIB_TEXT), "--samples",
            str(samples), "--seq-len", str(seq_len), "--walk", walk]


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


MEMORY_ROWS = ("rtn", "gptq-sequential", "gptq-two-pass", "gptq-offload", "gptq-lazy")


def memory(model: str, samples: int, seq_len: int, work: Path, only: list[str] | None = None) -> dict:
    rows = {"rtn": ["--bits", "4", "--group", "128"],
            "gptq-sequential": gptq_flags(samples, seq_len),
            "gptq-two-pass": gptq_flags(samples, seq_len, "two-pass"),
            "gptq-offload": gptq_flags(samples, seq_len, "two-pass") + ["--offload", str(work)],
            "gptq-lazy": gptq_flags(samples, seq_len) + ["--lazy"]}
    rows = {k: v for k, v in rows.items() if only is None or k in only}
    out = {}
    for name, flags in rows.items():
        try:
            rec = lowbit_quantize(model, flags, work / name)
        except RuntimeError as e:                  # a failure row, not a lost stage
            out[name] = {"flags": flags, "error": str(e).splitlines()[-1][:300]}
            print(f"memory {name}: FAILED {out[name]['error']}", flush=True)
            continue
        predicted = rec["predicted_peak_bytes"] / 2**20
        out[name] = {"flags": flags, "measured_peak_mib": rec["peak_rss_mib"], "predicted_peak_mib": predicted,
                     "predicted_over_measured": predicted / rec["peak_rss_mib"],
                     "predicted_parts_mib": {k: v / 2**20 for k, v in rec["predicted_peak_parts"].items()},
                     "wall_seconds": rec["wall_seconds"], "walk": rec["method"].get("walk")}
        print(f"memory {name}: measured {rec['peak_rss_mib']} MiB, predicted {predicted:.0f} MiB "
              f"({predicted / rec['peak_rss_mib']:.2f}x), {rec['wall_seconds']:.0f} s", flush=True)
        shutil.rmtree(work / name, ignore_errors=True)
    return out


def _quantize(model: str, flags: list[str], out: Path, *extra: str, threads: int | None = None) -> float:
    start = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    done = subprocess.run([sys.executable, "-m", "lowbit", "-q", "quantize", model, *flags, "--out", str(out), *extra],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return time.perf_counter() - start


def resume(model: str, samples: int, seq_len: int, kill_after: int, work: Path) -> dict:
    from lowbit.calibration.resume import STATE, checkpoint_dir

    flags = gptq_flags(samples, seq_len)
    out, state = work / "q", checkpoint_dir(work / "q") / STATE    # one --out: lowbit.json records the command
    whole = _quantize(model, flags, out)
    reference = _files(out)
    shutil.rmtree(out)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "lowbit", "-q", "quantize", model, *flags, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    finished = 0
    while proc.poll() is None:
        try:
            finished = json.loads(state.read_text())["finished"]
        except (OSError, ValueError, KeyError):
            pass
        if finished >= kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    killed_part = time.perf_counter() - start
    finished = json.loads(state.read_text())["finished"]
    resumed = _quantize(model, flags, out, "--resume")
    identical = _files(out) == reference
    row = {"flags": flags, "uninterrupted_seconds": whole, "killed_after_layers": finished,
           "killed_run_seconds": killed_part, "resumed_run_seconds": resumed,
           "overhead": (killed_part + resumed) / whole - 1, "byte_identical": identical,
           "signal": "SIGKILL", "returncode": proc.returncode}
    print(f"resume: whole {whole:.0f} s; killed after {finished} layers at {killed_part:.0f} s, resumed in "
          f"{resumed:.0f} s (overhead {100 * row['overhead']:+.0f}%); byte-identical: {identical}", flush=True)
    return row


def distributed(model: str, samples: int, seq_len: int, work: Path) -> dict:
    flags, cores = gptq_flags(samples, seq_len), os.cpu_count() or 1
    one_thread = _quantize(model, flags, work / "q", threads=1)
    reference = _files(work / "q")
    all_threads = _quantize(model, flags, work / "q", "--overwrite", threads=cores)
    same_all = _files(work / "q") == reference
    two = _quantize(model, flags, work / "q", "--overwrite", "--workers", "2")
    identical = _files(work / "q") == reference
    row = {"flags": flags, "one_process_one_thread_seconds": one_thread, "one_process_all_threads_seconds": all_threads,
           "two_processes_seconds": two, "speedup_vs_one_thread": one_thread / two,
           "speedup_vs_all_threads": all_threads / two, "byte_identical_to_one_thread": identical,
           "all_threads_identical_to_one_thread": same_all, "backend": "gloo", "cores": cores,
           "threads_per_rank": max(1, cores // 2)}
    print(f"distributed: 1 process x 1 thread {one_thread:.0f} s, x {cores} threads {all_threads:.0f} s, 2 processes "
          f"{two:.0f} s (speed-up {all_threads / two:.2f}x against all threads); 2 processes byte-identical to 1 "
          f"thread: {identical}; {cores} threads identical to 1: {same_all}", flush=True)
    return row


def synthetic(samples: int, seq_len: int, work: Path, methods: list[str]) -> dict:
    """The 7B-shaped Llama (bench/synthetic_model.py, bf16, 27 GB in float32: more than this machine's
    memory) quantized with --lazy: RTN and GPTQ, wall time, peak RSS against the predicted peak."""
    import shutil as sh

    from synthetic_model import PRESETS, write_synthetic

    if not (SYNTHETIC / "model.safetensors.index.json").is_file():
        start = time.perf_counter()
        write_synthetic(SYNTHETIC.with_name(SYNTHETIC.name + ".tmp"), **PRESETS["7b"])
        os.replace(SYNTHETIC.with_name(SYNTHETIC.name + ".tmp"), SYNTHETIC)
        print(f"wrote the synthetic model in {time.perf_counter() - start:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in SYNTHETIC.glob("*.safetensors"))
    rows = {"rtn": ["--bits", "4", "--group", "128", "--lazy"],
            "gptq": gptq_flags(samples, seq_len) + ["--lazy"]}
    rows = {k: v for k, v in rows.items() if k in methods}
    out = {}
    for name, flags in rows.items():
        rec = lowbit_quantize(str(SYNTHETIC), flags, work / name)
        predicted = rec["predicted_peak_bytes"] / 2**20
        out[name] = {"flags": flags, "measured_peak_mib": rec["peak_rss_mib"], "predicted_peak_mib": predicted,
                     "predicted_over_measured": predicted / rec["peak_rss_mib"], "wall_seconds": rec["wall_seconds"],
                     "bits_per_weight": rec["bits_per_weight"], "model_file_bytes": size,
                     "float32_bytes": size * 2, "preset": PRESETS["7b"]}
        print(f"synthetic {name}: {rec['wall_seconds']:.0f} s, peak {rec['peak_rss_mib']} MiB (predicted "
              f"{predicted:.0f}), {rec['bits_per_weight']:.3f} bits/weight", flush=True)
        sh.rmtree(work / name, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--stage", action="append", choices=STAGES)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--kill-after", type=int, default=15)
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"],
                   help="the synthetic stage's rows (default both)")
    p.add_argument("--rows", nargs="+", default=None, choices=MEMORY_ROWS,
                   help="the memory stage's rows (default all); rows measured another time are kept")
    p.add_argument("--json", type=Path, default=None, help="default bench/results/scale_<model>.json")
    a = p.parse_args()
    a.json = a.json or RESULTS / f"scale_{a.model}.json"
    if (a.model == "synthetic-7b") != (a.stage == ["synthetic"]):
        p.error("--model synthetic-7b goes with --stage synthetic alone (and that stage with that model)")
    data = json.loads(a.json.read_text()) if a.json.exists() else {"bench": "scale", "model": a.model, "stages": {}}
    entry = data["stages"]
    with tempfile.TemporaryDirectory(dir=REPO.parent) as tmp:
        work = Path(tmp)
        for stage in a.stage or ["memory"]:
            run = {"memory": lambda: memory(a.model, a.samples, a.seq_len, work, a.rows),
                   "resume": lambda: resume(a.model, a.samples, a.seq_len, a.kill_after, work),
                   "distributed": lambda: distributed(a.model, a.samples, a.seq_len, work),
                   "synthetic": lambda: synthetic(4, 512, work, a.methods)}[stage]
            shape = (4, 512) if stage == "synthetic" else (a.samples, a.seq_len)
            rows = run()
            if stage == "synthetic" or (stage == "memory" and a.rows):   # rows measured another time are kept
                rows = {**entry.get(stage, {}).get("rows", {}), **rows}
            entry[stage] = {"rows": rows, "samples": shape[0], "seq_len": shape[1], "machine": machine()}
            for sub in work.iterdir():
                shutil.rmtree(sub, ignore_errors=True)
    a.json.write_text(json.dumps(data, indent=1))
    mem = entry.get("memory", {}).get("rows", {})
    if mem:
        print(table(["row", "measured MiB", "predicted MiB", "predicted/measured"],
                    [[k, r["measured_peak_mib"], r["predicted_peak_mib"], r["predicted_over_measured"]]
                     for k, r in mem.items()]))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
