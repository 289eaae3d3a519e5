"""The process's resident memory from /proc (Linux): the current size, the peak, and a reset of the peak
so a phase (generation after the model's load) can be measured on its own. None where /proc is absent."""
from __future__ import annotations

from pathlib import Path


def _status(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024          # kB -> MiB
    except OSError:
        pass
    return None


def current_mib() -> float | None:
    return _status("VmRSS")


def peak_mib() -> float | None:
    """The peak RSS since the process started or since the last reset_peak()."""
    return _status("VmHWM")


def reset_peak() -> bool:
    """Set the peak to the current RSS (writing 5 to /proc/self/clear_refs); False where that fails."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
