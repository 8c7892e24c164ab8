"""Accuracy from a confusion matrix: the metrics.jsonl record, per-class rows and their text table.

Shared by training, evaluate and the run report, so the figures they print agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.core.files import append_jsonl, read_jsonl, rewrite_jsonl

METRICS = "metrics.jsonl"  # in the run folder: one record per evaluation, appended
TEST_RECORD = "test.json"  # in the run folder: the released weights on the untouched test set (train/heldout.py)
TEST_FILES = "test_files.txt"  # in the run folder: the held-out training images of data.test_fraction


def read_records(run_dir: str | Path) -> list[dict]:
    """The metrics records of a run, in order; a line torn by a crash or a full disk is left out."""
    return read_jsonl(Path(run_dir) / METRICS)


def run_figures(run_dir: str | Path) -> dict:
    """The figures a run reports, from its files; every report (log, report.md, model card, export report)
    takes them from here. {} for a run without an evaluation.

    best_*: the epoch with the highest validation accuracy, the one released as best.safetensors
    (selected_on: "validation", so optimistic for new images); last_*: the last evaluated epoch;
    test_*: the best weights on the untouched test set (test.json), when there is one for that epoch.
    """
    import json

    records = read_records(run_dir)
    if not records:
        return {}
    best = max(records, key=lambda r: r["val_accuracy"])  # the first of equals, as training keeps it
    out = {"selected_on": "validation", "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
           "val_count": best["val_count"], "last_epoch": records[-1]["epoch"],
           "last_val_accuracy": records[-1]["val_accuracy"]}
    try:
        test = json.loads((Path(run_dir) / TEST_RECORD).read_text())
    except (OSError, ValueError):  # none, or damaged: no test figure rather than a wrong one
        test = None
    if isinstance(test, dict) and test.get("epoch") == best["epoch"]:  # of these best weights, not older ones
        out.update({k: test.get(k) for k in ("test_accuracy", "test_count", "test_source", "command")})
    return out


def figures_text(fig: dict) -> str:
    """One sentence of run_figures: best (chosen on validation), last and, when there is one, test accuracy."""
    if not fig:
        return "no evaluation yet"
    text = (f"best val accuracy {100 * fig['best_val_accuracy']:.2f}% at epoch {fig['best_epoch']} (the epoch chosen "
            f"on validation, so optimistic for new images); last epoch ({fig['last_epoch']}) "
            f"{100 * fig['last_val_accuracy']:.2f}%")
    if fig.get("test_accuracy") is not None:
        text += (f"; test accuracy {100 * fig['test_accuracy']:.2f}% on {fig['test_count']} untouched images of "
                 f"{fig['test_source']} (best weights; never trained or selected on)")
    return text


def append_record(run_dir: str | Path, record: dict) -> None:
    append_jsonl(Path(run_dir) / METRICS, record)


def keep_records(run_dir: str | Path, epochs: int) -> None:
    """Drop the records of epochs after `epochs` (run again after a resume), atomically."""
    path = Path(run_dir) / METRICS
    if path.exists():
        rewrite_jsonl(path, [r for r in read_records(run_dir) if r.get("epoch", 0) <= epochs])


def per_class_accuracy(confusion, classes: list[str]) -> dict[str, float | None]:
    """Class name -> correct / total of that true class, from a (C, C) confusion matrix (rows true,
    columns predicted); None for a class without images."""
    c = np.asarray(confusion, dtype=np.int64)
    totals = c.sum(1)
    return {name: float(c[i, i] / totals[i]) if totals[i] else None for i, name in enumerate(classes)}


def metrics_record(confusion, classes: list[str], epoch: int, step: int, loss: float, lr: float,
                   elapsed: float, images: int, val_loss: float | None = None) -> dict:
    """One line of metrics.jsonl from a (C, C) confusion matrix (rows true, columns predicted).

    `val_accuracy` is micro accuracy (correct / images); the mean of `per_class` is the macro accuracy.
    `loss` is the mean training loss of the epoch, `val_loss` the mean loss over the validation images.
    """
    c = np.asarray(confusion, dtype=np.int64)
    n = int(c.sum())
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": round(loss, 6),
        **({"val_loss": round(val_loss, 6)} if val_loss is not None else {}),
        "val_accuracy": float(np.trace(c) / n) if n else 0.0,
        "val_count": n,
        "per_class": per_class_accuracy(c, classes),
        "lr": lr,
        "epoch_time_s": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 1) if elapsed > 0 else 0.0,
    }


def per_class_rows(confusion, classes: list[str]) -> list[dict]:
    c = np.asarray(confusion, dtype=np.int64)
    accuracy = per_class_accuracy(c, classes)
    return [{"class": name, "correct": int(c[i, i]), "total": int(c[i].sum()),
             "accuracy": None if accuracy[name] is None else round(accuracy[name], 4)} for i, name in enumerate(classes)]


def format_table(rows: list[dict]) -> str:
    width = max([len(r["class"]) for r in rows] + [5])
    lines = [f"{'class':<{width}}  correct  total  accuracy"]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(f"{r['class']:<{width}}  {r['correct']:>7}  {r['total']:>5}  {acc:>8}")
    return "\n".join(lines)


