"""The run report: curves, per-class chart and table, confusion matrix, validation grid, report.md."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from toolkit.core.files import printable, writing
from toolkit.core.metrics import format_table, per_class_rows, read_records, run_figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(confusion, classes: list[str], path: Path, title: str = "") -> None:
    """Confusion matrix, counts (left) and normalised per true class (right)."""
    fig = confusion_figure(confusion, classes, title)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    _pyplot().close(fig)


def confusion_figure(confusion, classes: list[str], title: str = ""):
    """The matplotlib Figure of plot_confusion."""
    plt = _pyplot()
    c = np.asarray(confusion, dtype=np.int64)
    rate = c / np.maximum(c.sum(1, keepdims=True), 1)
    k = len(classes)
    side = min(2.5 + 0.5 * k, 16)
    # constrained layout places the axis labels outside the tick labels, however long the class names
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side), layout="constrained")
    for ax, values, fmt, label in ((axes[0], c, "d", "images"), (axes[1], rate, ".2f", "fraction of the true class")):
        im = ax.imshow(rate, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(label)
        if k <= 25:
            for i in range(k):
                for j in range(k):
                    if c[i, j]:
                        ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=7,
                                color="white" if rate[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=axes, fraction=0.025, label="fraction of the true class")
    fig.suptitle(title or f"confusion matrix ({c.sum()} images)")
    return fig


def accuracies(rows: list[dict]) -> tuple[float, float]:
    """(micro, macro) accuracy of per-class rows: correct / images, and the mean of the classes' accuracies
    (classes without images left out). They differ when classes have different sizes."""
    micro = sum(r["correct"] for r in rows) / max(1, sum(r["total"] for r in rows))
    scored = [r["correct"] / r["total"] for r in rows if r["total"]]
    return micro, float(np.mean(scored)) if scored else 0.0


def plot_per_class(rows: list[dict], path: Path, title: str) -> None:
    plt = _pyplot()
    names = [r["class"] for r in rows]
    acc = [100 * (r["accuracy"] or 0) for r in rows]
    micro, macro = accuracies(rows)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(rows) + 2), 4))
    bars = ax.bar(range(len(rows)), acc, color=["#2a7" if a >= 100 * macro else "#d84" for a in acc])
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.axhline(100 * macro, color="grey", lw=1, ls="--", label=f"macro (mean of classes) {100 * macro:.2f}%")
    ax.axhline(100 * micro, color="#26a", lw=1, ls=":", label=f"micro (all images) {100 * micro:.2f}%")
    if len(rows) <= 30:
        ax.bar_label(bars, [f"{a:.0f}" for a in acc], fontsize=7)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)  # beside the bars, never over them
    ax.set_title(title)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    """Training and validation loss, validation accuracy and learning rate per evaluated epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
    axes[0].plot(epochs, [r["train_loss"] for r in records], "o-", ms=3, color="#26a", label="training (epoch mean)")
    if any("val_loss" in r for r in records):  # records from before val_loss was logged have none
        axes[0].plot([r["epoch"] for r in records if "val_loss" in r], [r["val_loss"] for r in records
                     if "val_loss" in r], "s-", ms=3, color="#d84", label="validation")
    losses = [r[k] for r in records for k in ("train_loss", "val_loss") if k in r]
    if min(losses) > 0 and max(losses) / min(losses) > 20:
        axes[0].set_yscale("log")  # late epochs differ by factors, not by amounts
    axes[0].legend(fontsize=8)
    axes[0].set_title("loss: validation rising while training falls = overfitting", fontsize=10, loc="left")
    axes[1].plot(epochs, [100 * r["val_accuracy"] for r in records], "o-", ms=3, color="#2a7")
    best = max(records, key=lambda r: r["val_accuracy"])
    axes[1].plot([best["epoch"]], [100 * best["val_accuracy"]], "*", ms=12, color="#d84")
    axes[1].set_title(f"validation accuracy (micro, %)\nbest {100 * best['val_accuracy']:.2f} at epoch "
                      f"{best['epoch']}", fontsize=10)
    axes[2].plot(epochs, [r["lr"] for r in records], "o-", ms=3, color="#888")
    axes[2].set_title("learning rate (end of epoch)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def validation_predictions(run_dir: Path, split, data_cfg, device, n: int = 1000):
    """The best checkpoint on up to n validation images: (pixels (n, H, W, 3), truth, predicted, score)."""
    import torch

    from toolkit.train.batches import Normalize
    from toolkit.train.data import sample_images
    from toolkit.train.weights import build_model

    model, meta = build_model(run_dir / "best.safetensors")
    model.to(device)
    norm = Normalize(meta.mean, meta.std).to(device)
    idx = np.linspace(0, len(split) - 1, min(n, len(split))).astype(int)
    px, truth = sample_images(split, data_cfg, idx)  # unreadable files drop out with their labels
    truth = truth.numpy()
    probs = []
    with torch.no_grad():
        for chunk in px.split(256):
            probs.append(model(norm(chunk.to(device))).float().softmax(1).cpu())
    probs = torch.cat(probs)
    score, predicted = probs.max(1)
    return px.permute(0, 2, 3, 1).numpy(), truth, predicted.numpy(), score.numpy()


def write_report(run_dir: Path, classes: list[str], confusion, epoch: int, validation=None) -> Path:
    """<run>/report/: curves, per-class chart and table, confusion matrix, validation grid, report.md."""
    from toolkit.core.pictures import validation_grid

    run_dir = Path(run_dir)
    out = run_dir / "report"
    classes = [printable(c) for c in classes]  # class folder names need not be UTF-8; pictures and text need it
    records = read_records(run_dir)  # a line torn by a crash is left out
    rows = per_class_rows(confusion, classes)
    table = format_table(rows)
    name = printable(run_dir.name)
    with writing(out, "the run report"):  # a full disk or a read-only folder: one sentence
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "per_class.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["class", "correct", "total", "accuracy"])
            w.writeheader()
            w.writerows(rows)
        (out / "per_class.txt").write_text(table + "\n")
        pictures = ["per_class.png", "confusion.png"]
        if records:
            plot_curves(records, out / "curves.png", f"{name}: training")
            pictures.insert(0, "curves.png")
        plot_per_class(rows, out / "per_class.png", f"{name}: validation accuracy per class (best epoch {epoch})")
        plot_confusion(confusion, classes, out / "confusion.png",
                       f"{name}: validation confusion matrix (best epoch {epoch})")
        if validation is not None:
            validation_grid(*validation, classes, out / "validation.png")
            pictures.append("validation.png")
        (out / "report.md").write_text(_markdown(run_dir, records, rows, epoch, pictures))
    print(table, file=sys.stderr)
    return out


def _markdown(run_dir: Path, records: list[dict], rows: list[dict], epoch: int, pictures: list[str]) -> str:
    records = records or [{"epoch": epoch, "val_accuracy": 0.0, "val_count": 0, "epoch_time_s": 0.0,
                           "images_per_s": 0.0}]  # metrics.jsonl lost: the report still says what it can
    best = max(records, key=lambda r: r["val_accuracy"])
    fig = run_figures(run_dir) or {"last_epoch": epoch, "last_val_accuracy": best["val_accuracy"]}
    speed = sorted(r["images_per_s"] for r in records)[len(records) // 2]
    _, macro = accuracies(rows)
    worst = sorted((r for r in rows if r["accuracy"] is not None), key=lambda r: r["accuracy"])[:3]
    config = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    lines = [
        f"# {printable(run_dir.name)}", "",
        f"- best validation accuracy (micro: correct / images): **{100 * best['val_accuracy']:.2f}%** at epoch "
        f"{epoch} ({best['val_count']} validation images); macro (mean of the per-class accuracies): "
        f"{100 * macro:.2f}%. The released weights are this epoch's, chosen on validation, so the figure is "
        "optimistic for new images",
        f"- last epoch ({fig['last_epoch']}): validation accuracy {100 * fig['last_val_accuracy']:.2f}%",
        f"- test accuracy: **{100 * fig['test_accuracy']:.2f}%** on {fig['test_count']} untouched images of "
        f"{fig['test_source']} (best weights; never trained or selected on; `{fig['command']}`)"
        if fig.get("test_accuracy") is not None else "- test accuracy: no test set (a `test/` folder beside the "
        "validation folder, or `data.test_fraction`, gives an untouched figure)",
        f"- epochs run: {records[-1]['epoch']}; training time {sum(r['epoch_time_s'] for r in records):.1f} s; "
        f"median {speed:,.0f} training images/s",
        "- weakest classes: " + ", ".join(f"{r['class']} {100 * r['accuracy']:.1f}%" for r in worst), "",
    ]
    captions = {"curves.png": "Training and validation loss, validation accuracy and learning rate per epoch.",
                "per_class.png": "Validation accuracy per class at the best epoch; dashed: their mean (macro), "
                                 "dotted: all images together (micro).",
                "confusion.png": "Where the model confuses classes: counts, and fractions of each true class.",
                "validation.png": "Validation images with the predicted class and score; mistakes first, "
                                  "with their true class in red."}
    for p in pictures:
        lines += [f"## {p.removesuffix('.png').replace('_', ' ')}", "", captions[p], "", f"![{p}]({p})", ""]
    lines += ["## per-class accuracy", "", "| class | correct | total | accuracy |", "|---|---|---|---|"]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
        lines.append(f"| {r['class']} | {r['correct']} | {r['total']} | {acc} |")
    lines += ["", "## config", "", "```yaml", config.rstrip(), "```", ""]
    return "\n".join(lines)
