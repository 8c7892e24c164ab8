"""Accuracy of a model (ONNX file, safetensors file or run directory) on a labelled folder.

Uses the same decoding as validation and predict, so an exported model evaluated on the
validation folder reproduces the accuracy training reported for its checkpoint.
An ONNX model is run with onnxruntime alone; weights are run with torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from toolkit import UserError
from toolkit.core import formats, images
from toolkit.core.files import absent
from toolkit.core.metrics import per_class_accuracy

log = logging.getLogger(__name__)


def _scorer(model: str | Path, fallback: dict | None = None, outputs: str | None = None):
    """-> (Meta, fn: (B, H, W, 3) uint8 -> (B,) predicted index)."""
    if str(model).lower().endswith(".onnx"):
        from toolkit.predict.runtime import OnnxClassifier

        clf = OnnxClassifier(model, fallback=fallback, outputs=outputs)  # argmax: the same for every output kind
        return clf.meta, lambda px: clf.logits(px).argmax(1)

    import torch

    from toolkit.train.batches import Normalize
    from toolkit.train.weights import build_model

    net, meta = build_model(model)
    norm = Normalize(meta.mean, meta.std)

    def predict(px: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(norm(torch.from_numpy(px).permute(0, 3, 1, 2))).argmax(1).numpy()

    return meta, predict


def evaluate_folder(model: str | Path, data_dir: str | Path, batch_size: int = 64, workers: int | None = None,
                    fallback: dict | None = None, outputs: str | None = None, files: str | Path | None = None) -> dict:
    """{'accuracy', 'n', 'correct', 'per_class', 'confusion', 'classes', 'failed'} for `model` on `data_dir`.

    `outputs` (ONNX only): what the model outputs, as for predict; None: read from the graph.
    `files`: a file list (core.folders.read_file_list, e.g. a run's test_files.txt): only these images of
    `data_dir`, each named as <class>/<file> relative to it; UserError when one is not an image there."""
    with images.Decoder(workers) as decoder:  # fork the decoders before a runtime starts its threads
        meta, predict = _scorer(model, fallback, outputs)
        return _evaluate(decoder, meta, predict, model, data_dir, batch_size, files)


def _evaluate(decoder, meta, predict, model, data_dir, batch_size: int, files=None) -> dict:
    try:
        found = images.find_labelled(data_dir)  # folders without an image file (e.g. __MACOSX) are no classes
    except FileNotFoundError:
        raise UserError(f"data folder '{data_dir}' {absent(data_dir)}") from None
    folder_classes, paths, labels = found.classes, found.paths, found.labels
    if files is not None:
        paths, labels = _listed(files, data_dir, paths, labels)
        used = set(labels)  # a class folder the list does not touch need not be one the model knows
        folder_classes = [c if i in used else None for i, c in enumerate(folder_classes)]
    unknown = sorted(set(folder_classes) - set(meta.class_names) - {None})
    if unknown:
        raise UserError(f"'{data_dir}' has class folders the model does not know: {', '.join(unknown[:5])}")
    if not paths:
        raise UserError(f"'{data_dir}' has no image files in class subfolders"
                        + (f" (skipped {formats.describe_skipped(found.skipped)})" if found.skipped else ""))
    if found.skipped:
        log.info("skipped %s", formats.describe_skipped(found.skipped))
    to_model = np.array([meta.class_names.index(c) if c is not None else -1 for c in folder_classes])
    truth = to_model[np.asarray(labels)]
    k = meta.num_classes
    confusion = np.zeros((k, k), dtype=np.int64)
    failed, pos = 0, 0
    for batch in decoder.batches(data_dir, paths, images.Preprocess.of(meta), batch_size):
        y = truth[pos : pos + len(batch.paths)][batch.ok]
        pos += len(batch.paths)
        failed += int((~batch.ok).sum())
        if len(batch.pixels):
            np.add.at(confusion, (y, predict(batch.pixels)), 1)
    n = int(confusion.sum())
    per_class = per_class_accuracy(confusion, meta.class_names)
    return {"model": str(model), "data": str(data_dir), "accuracy": float(np.trace(confusion) / n) if n else 0.0,
            "n": n, "correct": int(np.trace(confusion)), "failed": failed, "per_class": per_class,
            "classes": meta.class_names, "confusion": confusion.tolist()}


def _listed(files, data_dir, paths: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """The paths (and labels) of `data_dir` that the file list `files` names, in walk order."""
    from toolkit.core.folders import read_file_list

    wanted = set(read_file_list(files))
    if not wanted:
        raise UserError(f"file list '{files}' names no file")
    missing = sorted(wanted - set(paths))
    if missing:
        raise UserError(f"file list '{files}' names {len(missing)} file(s) that are not images in class folders of "
                        f"'{data_dir}', e.g. '{missing[0]}'")
    keep = [i for i, p in enumerate(paths) if p in wanted]
    return [paths[i] for i in keep], [labels[i] for i in keep]


def format_result(r: dict) -> str:
    """Accuracy line, per-class table and (up to 30 classes) the confusion matrix, as text."""
    from toolkit.core.files import printable
    from toolkit.core.metrics import format_table, per_class_rows

    r = {**r, "classes": [printable(c) for c in r["classes"]]}  # class folder names need not be UTF-8
    lines = [f"accuracy {100 * r['accuracy']:.2f}% ({r['correct']}/{r['n']} images"
             + (f", {r['failed']} unreadable)" if r["failed"] else ")"),
             format_table(per_class_rows(r["confusion"], r["classes"]))]
    if len(r["classes"]) <= 30:
        width = max(5, max(len(c) for c in r["classes"]), len(str(max(max(row) for row in r["confusion"]))))
        lines += ["", "confusion matrix (rows: true class, columns: predicted)",
                  " " * (width + 2) + " ".join(f"{c[:width]:>{width}}" for c in r["classes"])]
        for name, row in zip(r["classes"], r["confusion"]):
            lines.append(f"{name:<{width}}  " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
