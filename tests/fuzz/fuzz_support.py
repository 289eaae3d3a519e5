"""Shared pieces of the reader fuzz tests: hypothesis settings (deterministic, bounded), a wall-clock
guard against hangs, and the check that a reader either succeeds or raises one LowbitError line."""
from __future__ import annotations

import signal
from contextlib import contextmanager

from hypothesis import HealthCheck, settings

from lowbit.errors import LowbitError

# derandomized: CI sees the same cases every run; a failure prints the case to add as a regression
FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(FAST, max_examples=400)
LIMIT_S = 20


@contextmanager
def bounded(seconds: int = LIMIT_S):
    """Fail (not hang) when the block runs longer than `seconds`."""
    def alarm(signum, frame):
        raise TimeoutError(f"a reader ran longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def reads_or_refuses(read, *args):
    """read(*args) returns, or raises LowbitError with a one-line message; anything else fails the test."""
    with bounded():
        try:
            return read(*args)
        except LowbitError as e:
            assert "\n" not in str(e).strip(), f"a multi-line error: {e}"
            return None
