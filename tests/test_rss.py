"""lowbit.eval.rss: the process's resident memory, and pinning glibc's mmap threshold so freed large
tensors go back to the system (each case in a fresh process: the setting is process-wide)."""
import platform
import subprocess
import sys

import pytest

from lowbit.eval import rss

# a 32 MiB block freed (glibc raises its mmap threshold to 32 MiB), then 16 MiB temporaries, each with a
# small tensor kept after it: what the heap holds afterwards is what the process does not give back
PATTERN = """
import sys, torch
from lowbit.eval import rss
if sys.argv[1] == "pin":
    assert rss.pin_mmap_threshold()
big = torch.ones(8 << 20); del big
base = rss.current_mib()
kept = []
for _ in range(8):
    t = torch.ones(4 << 20); kept.append(torch.ones(1000)); del t
print(rss.current_mib() - base)
"""


def _held_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_pinned_threshold_gives_freed_temporaries_back():
    # 8 × 16 MiB temporaries were freed: pinned, under 4 MiB stays; by default glibc keeps most of them
    assert _held_mib("pin") < 4
    assert _held_mib("default") > 32


def test_current_and_peak_are_read_from_proc():
    if rss.current_mib() is None:
        pytest.skip("no /proc here")
    assert rss.reset_peak()
    assert 0 < rss.current_mib() <= rss.peak_mib() + 1
