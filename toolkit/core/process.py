"""Processes that must not outlive the process that started them, and the OpenMP settings every process of
the `toolkit` command starts with."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# OpenMP threads that wait for work sleep instead of spinning (read by libgomp when torch is imported, so
# set before anything imports it). Spinning threads make a small model's steps 10-60x slower as soon as
# another process shares the cores (measured by benchmarks/cpu_threads.py); an idle machine loses little.
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Receive `sig` when the parent process dies, however it dies (SIGKILL included).

    parent: the pid of the process that started this one, recorded before it did (a pool passes
    os.getpid() to its workers); without it, the parent at the time of the call. With it, a parent
    that died between the fork and this call is noticed too (the child then has another parent).
    Linux: the kernel's parent-death signal (prctl PR_SET_PDEATHSIG). Elsewhere: a daemon thread
    that watches the parent pid once a second.
    """
    parent = os.getppid() if parent is None else parent
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            _watch(parent, sig)
    else:
        _watch(parent, sig)
    if os.getppid() != parent:  # the parent died while the signal was being armed
        os.kill(os.getpid(), sig)


def _watch(parent: int, sig: int) -> None:
    def run():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), sig)

    threading.Thread(target=run, name="die-with-parent", daemon=True).start()
