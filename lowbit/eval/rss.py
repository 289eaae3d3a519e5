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


# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# `lowbit generate`'s thresholds: a prefill's one-off temporaries by mmap; decode steps' repeated ones (a
# cache de-quantized every step: 8 MiB per layer at 8k tokens) from the heap, glibc's largest dynamic value
PREFILL_MMAP_THRESHOLD = 1 << 20
DECODE_MMAP_THRESHOLD = 32 << 20


def pin_mmap_threshold(nbytes: int = PREFILL_MMAP_THRESHOLD) -> bool:
    """Serve every allocation of `nbytes` or more by mmap from now on, so a freed large tensor goes back
    to the system at once, and trim the heap's top past 64 MiB free (glibc's own rule at its largest
    threshold); False where the C library is not glibc.

    glibc raises its threshold to the largest block freed so far (up to 32 MiB). After a prefill has
    freed its large activations, the next large temporaries (a layer's codec work, attention of the
    next layer) come from the heap, and a small tensor kept above them (a packed chunk) holds their
    pages (`lowbit generate` with a packed KV cache peaked above the float cache it is a quarter of).
    Setting the thresholds stops glibc from moving them; they can be set again. Trimming the heap's top
    at glibc's small default instead slowed decoding in development (every step regrew it)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return (bool(libc.mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
                and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 * DECODE_MMAP_THRESHOLD)))
    except (OSError, AttributeError):
        return False
