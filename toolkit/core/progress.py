"""Progress for long loops: tqdm on a terminal, plain timed lines in logs and pipes."""

from __future__ import annotations

import sys
import time


class _Lines:
    """A progress 'bar' for logs and pipes: a plain line at most every 15 s, no carriage returns."""

    EVERY_S = 15.0

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0
        self.start = self.last = time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if now - self.last >= self.EVERY_S and self.n < self.total:
            self.last = now
            rate = self.n / max(now - self.start, 1e-9)
            eta = (self.total - self.n) / max(rate, 1e-9)
            print(f"{self.desc}: {self.n}/{self.total} ({now - self.start:.0f} s, {rate:.3g}/s, ETA {eta:.0f} s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Off:
    def update(self, k: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool = True):
    """tqdm on a terminal, plain lines when stderr is a file or a pipe, nothing when disabled."""
    if not enabled:
        return _Off()
    if not sys.stderr.isatty():
        return _Lines(total, desc)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
