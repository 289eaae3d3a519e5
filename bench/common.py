"""Shared pieces of the benchmark scripts: paths, timed CLI runs, tables, JSON."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
EVAL_TEXT = DATA / "wikitext-2-raw" / "test.txt"
CALIB_TEXT = DATA / "wikitext-2" / "valid.txt"
sys.path.insert(0, str(REPO))

from lowbit.cli.table import table  # noqa: E402


def run_measured(argv: list[str], threads: int | None = None) -> tuple[float, int, subprocess.CompletedProcess]:
    """Run a command; returns (wall seconds, peak RSS of the child in MiB, result).

    `threads` caps the child's OpenMP threads (torch reads OMP_NUM_THREADS at start): on a
    shared 2-core machine one thread per process avoids oversubscription stalls.
    """
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{err[-2000:]}")
    return wall, usage.ru_maxrss // 1024, done


def lowbit_quantize(model: str, flags: list[str], out: Path, threads: int | None = None) -> dict:
    """`lowbit quantize` in a subprocess: its JSON summary plus wall time and peak RSS."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        summary = Path(f.name)
    wall, rss, _ = run_measured([sys.executable, "-m", "lowbit", "-q", "quantize", model, *flags,
                                 "--out", str(out), "--overwrite", "--json", str(summary)], threads)
    record = json.loads(summary.read_text())
    summary.unlink()
    record.update(wall_seconds=wall, peak_rss_mib=rss, threads=threads, load_average=os.getloadavg()[0])
    return record


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0]}


# a row is "the same measurement" when these agree (the measured values included: a re-measured row
# does not inherit the conditions of the old one)
ROW_IDENTITY = ("model", "setting", "method", "mix", "row", "tool", "bits", "group", "group_size", "ppl", "kld",
                "wall_seconds", "seconds")


def _identity(row: dict) -> tuple:
    return tuple((k, json.dumps(row.get(k))) for k in ROW_IDENTITY if k in row)


def write_json(path: Path, payload: dict) -> None:
    """Write a bench's JSON. The conditions a number was measured under ("conditions", "notes": what
    ran beside it, threads, ...) are facts about that measurement, added by hand where a script did not
    record them: a rewrite keeps them at the top level and on every row that is the same measurement
    (same identity and measured values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        for key in ("conditions", "notes"):
            if key in old and key not in payload:
                payload[key] = old[key]
        kept = {_identity(r): r for r in old.get("rows", []) if isinstance(r, dict)}
        for row in payload.get("rows", []):
            before = kept.get(_identity(row)) if isinstance(row, dict) else None
            for key in ("conditions", "notes"):
                if before and key in before and key not in row:
                    row[key] = before[key]
    path.write_text(json.dumps(payload, indent=1))


__all__ = ["REPO", "DATA", "EVAL_TEXT", "CALIB_TEXT", "table", "run_measured", "lowbit_quantize", "machine",
           "write_json"]
