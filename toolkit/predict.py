"""Batch prediction of a folder of images with onnxruntime: numpy + PIL only, never torch.

Files are found in a deterministic order, decoded in parallel threads (PIL releases the
GIL while decoding and resizing) with a bounded number of batches in flight, run through
the model and written one row per file as soon as their batch is done. A file that
cannot be decoded gets a row with its error; it never stops the run.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit import UserError, images
from toolkit.meta import META_KEY, Meta


@dataclass
class Batch:
    paths: list[str]  # relative to the input folder, in output order
    pixels: np.ndarray  # (k, H, W, 3) uint8 for the files that decoded
    ok: np.ndarray  # (len(paths),) bool
    errors: dict[int, str]  # position in paths -> reason


def _decode_batch(root: Path, paths: list[str], size: int, policy: str, max_pixels: int) -> Batch:
    arrays, ok, errors = [], np.zeros(len(paths), dtype=bool), {}
    for i, rel in enumerate(paths):
        try:
            arrays.append(images.load(root / rel, size, policy, max_pixels))
            ok[i] = True
        except images.DecodeError as e:
            errors[i] = str(e)
    pixels = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return Batch(paths, pixels, ok, errors)


def iter_batches(root: str | Path, paths: list[str], size: int, policy: str, batch_size: int = 64,
                 workers: int | None = None, max_pixels: int = 89_478_485) -> Iterator[Batch]:
    """Decoded batches in order, at most 2 x workers batches decoded ahead (bounded memory)."""
    root = Path(root)
    workers = workers or os.cpu_count() or 1
    chunks = (paths[i : i + batch_size] for i in range(0, len(paths), batch_size))
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.submit(_decode_batch, root, chunk, size, policy, max_pixels))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def check_external_data(path: Path) -> None:
    """Refuse a model whose external weight files lie outside its own folder (path traversal)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    base = path.parent.resolve()

    def tensors(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                yield from ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(sub)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in t.external_data}.get("location", "")
            if not (base / location).resolve().is_relative_to(base):
                raise UserError(f"'{path}' keeps weights in '{location}', outside its folder; refusing to load it")


def foreign_meta(session, classes: list[str] | None, size: int | None, mean, std, resize: str) -> Meta:
    """A Meta for an ONNX classifier exported elsewhere, from what the user states and the graph shows."""
    if not classes:
        raise UserError("this model has no toolkit metadata; pass --classes (and --size, --mean, --std if "
                        "normalisation is not inside the graph)")
    shape = session.get_inputs()[0].shape  # e.g. ['batch', 3, 224, 224]
    fixed = shape[-1] if isinstance(shape[-1], int) else None
    size = size or fixed
    if not size:
        raise UserError("this model's input size is not fixed; pass --size")
    outputs = session.get_outputs()[0].shape[-1]
    if isinstance(outputs, int) and outputs != len(classes):
        raise UserError(f"--classes names {len(classes)} classes but the model has {outputs} outputs")
    in_graph = mean is None and std is None
    dtype = "uint8" if session.get_inputs()[0].type == "tensor(uint8)" else "float32"
    return Meta(arch="external", class_names=list(classes), image_size=int(size), resize=resize,
                mean=list(mean or [0.0] * 3), std=list(std or [1.0] * 3), input_dtype=dtype,
                normalize_in_graph=in_graph, input_name=session.get_inputs()[0].name,
                output_name=session.get_outputs()[0].name)


class OnnxClassifier:
    """An ONNX classifier and its Meta: uint8 pixels in, probabilities out.

    `fallback` (classes, size, mean, std, resize) describes a model exported elsewhere; it is
    used only when the file carries no toolkit metadata.
    """

    def __init__(self, path: str | Path, threads: int = 0, fallback: dict | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UserError(f"model file '{path}' does not exist")
        try:
            check_external_data(path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except UserError:
            raise
        except Exception as e:  # onnx and onnxruntime raise their own exception types
            raise UserError(f"'{path}' is not a loadable ONNX model ({str(e).splitlines()[0][:200]})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY in props:
            self.meta = Meta.from_json(props[META_KEY], f"'{path}'")
        else:
            self.meta = foreign_meta(self.session, **(fallback or {"classes": None, "size": None, "mean": None,
                                                                  "std": None, "resize": "center_crop"}))
        self.input_name = self.session.get_inputs()[0].name
        self.path = path
        self.gain = (1 / (255 * np.asarray(self.meta.std, np.float32))).reshape(1, 3, 1, 1)
        self.shift = (-np.asarray(self.meta.mean, np.float32) / np.asarray(self.meta.std, np.float32)).reshape(1, 3, 1, 1)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, classes) float32 logits."""
        x = pixels.transpose(0, 3, 1, 2)
        if self.meta.input_dtype == "uint8":
            x = np.ascontiguousarray(x)
        elif self.meta.normalize_in_graph:
            x = x.astype(np.float32) * np.float32(1 / 255)
        else:  # normalisation outside the graph: a model exported elsewhere
            x = x.astype(np.float32) * self.gain + self.shift
        return self.session.run(None, {self.input_name: x})[0]

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        z = self.logits(pixels).astype(np.float64)
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)


class RowWriter:
    """CSV or JSON Lines by the output's extension; every batch is flushed as it is written."""

    def __init__(self, path: Path, topk: int):
        self.path, self.topk = path, topk
        self.jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
        if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
            raise UserError(f"output '{path}' must end in .csv or .jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="")
        self.columns = ["path", "label", "score", "error"]
        for k in range(1, topk + 1) if topk > 1 else ():
            self.columns += [f"top{k}_label", f"top{k}_score"]
        if not self.jsonl:
            self.csv = csv.DictWriter(self.file, fieldnames=self.columns)
            self.csv.writeheader()

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            if self.jsonl:
                self.file.write(json.dumps(row) + "\n")
            else:
                self.csv.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def rows_for(batch: Batch, probs: np.ndarray, classes: list[str], topk: int) -> list[dict]:
    rows, j = [], 0
    for i, rel in enumerate(batch.paths):
        if not batch.ok[i]:
            row = {"path": rel, "label": "", "score": "", "error": batch.errors[i]}
            row.update({f"top{k}_{f}": "" for k in range(1, topk + 1) for f in ("label", "score")} if topk > 1 else {})
        else:
            p = probs[j]
            j += 1
            best = np.argsort(-p, kind="stable")[: max(1, topk)]
            row = {"path": rel, "label": classes[best[0]], "score": round(float(p[best[0]]), 6), "error": ""}
            if topk > 1:
                for k, c in enumerate(best, 1):
                    row[f"top{k}_label"], row[f"top{k}_score"] = classes[c], round(float(p[c]), 6)
        rows.append(row)
    return rows


def predict(model: str | Path, input_dir: str | Path, output: str | Path = "predictions.csv",
            batch_size: int = 64, topk: int = 1, workers: int | None = None, fallback: dict | None = None) -> dict:
    """Predict every image file under `input_dir` into `output`; returns a summary dict."""
    clf = OnnxClassifier(model, fallback=fallback)
    root = Path(input_dir)
    if not root.is_dir():
        raise UserError(f"input folder '{root}' does not exist")
    if batch_size < 1 or topk < 1:
        raise UserError("--batch-size and --topk must be at least 1")
    topk = min(topk, clf.meta.num_classes)
    paths = images.find_images(root)
    writer = RowWriter(Path(output), topk)
    labels, errors = Counter(), Counter()
    try:
        for batch in iter_batches(root, paths, clf.meta.image_size, clf.meta.resize, batch_size, workers):
            probs = clf.probabilities(batch.pixels) if len(batch.pixels) else np.zeros((0, clf.meta.num_classes))
            rows = rows_for(batch, probs, clf.meta.class_names, topk)
            writer.write(rows)
            labels.update(r["label"] for r in rows if not r["error"])
            errors.update(r["error"].split(" (")[0] for r in rows if r["error"])
    finally:
        writer.close()
    return {"ok": sum(labels.values()), "failed": sum(errors.values()), "output": str(output),
            "per_class": dict(labels), "errors": dict(errors)}
