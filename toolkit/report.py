"""What a run tells its user: metrics records, progress, per-class table and confusion matrix picture."""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path

import numpy as np


def metrics_record(confusion, classes: list[str], epoch: int, step: int, loss: float, lr: float,
                   elapsed: float, images: int) -> dict:
    """One line of metrics.jsonl from a (C, C) confusion matrix (rows true, columns predicted)."""
    c = np.asarray(confusion, dtype=np.int64)
    per_class_total = c.sum(1)
    n = int(c.sum())
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": round(loss, 6),
        "val_accuracy": float(np.trace(c) / n) if n else 0.0,
        "val_count": n,
        "per_class": {name: float(c[i, i] / per_class_total[i]) if per_class_total[i] else None
                      for i, name in enumerate(classes)},
        "lr": lr,
        "epoch_time_s": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 1) if elapsed > 0 else 0.0,
    }


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
            print(f"{self.desc}: {self.n}/{self.total} ({now - self.start:.0f} s)", file=sys.stderr, flush=True)

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


def per_class_rows(confusion, classes: list[str]) -> list[dict]:
    c = np.asarray(confusion, dtype=np.int64)
    rows = []
    for i, name in enumerate(classes):
        total = int(c[i].sum())
        rows.append({"class": name, "correct": int(c[i, i]), "total": total,
                     "accuracy": round(c[i, i] / total, 4) if total else None})
    return rows


def format_table(rows: list[dict]) -> str:
    width = max([len(r["class"]) for r in rows] + [5])
    lines = [f"{'class':<{width}}  correct  total  accuracy"]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(f"{r['class']:<{width}}  {r['correct']:>7}  {r['total']:>5}  {acc:>8}")
    return "\n".join(lines)


def plot_confusion(confusion, classes: list[str], path: Path, title: str = "") -> None:
    """Confusion matrix picture: counts in each cell, colour by row-normalised rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(confusion, dtype=np.int64)
    rate = c / np.maximum(c.sum(1, keepdims=True), 1)
    k = len(classes)
    side = min(2.0 + 0.55 * k, 30)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if c[i, j]:
                    ax.text(j, i, str(c[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if rate[i, j] > 0.5 else "black")
    ax.set_title(title or f"confusion matrix ({c.sum()} images)")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, classes: list[str], confusion, epoch: int) -> None:
    """<run>/report/: per_class.csv, per_class.txt and confusion.png for the best epoch."""
    out = Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = per_class_rows(confusion, classes)
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["class", "correct", "total", "accuracy"])
        w.writeheader()
        w.writerows(rows)
    table = format_table(rows)
    (out / "per_class.txt").write_text(table + "\n")
    plot_confusion(confusion, classes, out / "confusion.png", f"best epoch {epoch}: validation confusion matrix")
    print(table, file=sys.stderr)
