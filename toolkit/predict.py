"""Batch prediction of a folder of images with onnxruntime: numpy + PIL only, never torch.

Files are walked lazily in a deterministic order, decoded by worker processes a bounded
number of batches ahead, run through the model, and written one row per file as soon as
their batch is done. A file that cannot be decoded gets a row with its reason, never a
crash. `resume` continues an interrupted output; under `accelerate launch` (or any launcher
that sets RANK and WORLD_SIZE) each process answers every n-th file into its own part and
the main process merges the parts into the single-process order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from toolkit import UserError, images, outputs
from toolkit.runtime import OnnxClassifier

log = logging.getLogger(__name__)


def rows_for(batch: images.Batch, probs: np.ndarray, classes: list[str], topk: int) -> list[dict]:
    """One row per file of the batch, in order; decoded files take their probabilities in order."""
    blank = {f"top{k}_{f}": "" for k in range(1, topk + 1) for f in ("label", "score")} if topk > 1 else {}
    best = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
    rows, j = [], 0
    for i, rel in enumerate(batch.paths):
        if not batch.ok[i]:
            rows.append({"path": rel, "label": "", "score": "", "error": batch.errors[i], **blank})
            continue
        p, order = probs[j], best[j]
        j += 1
        row = {"path": rel, "label": classes[order[0]], "score": round(float(p[order[0]]), 6), "error": ""}
        if topk > 1:
            for k, c in enumerate(order, 1):
                row[f"top{k}_label"], row[f"top{k}_score"] = classes[c], round(float(p[c]), 6)
        rows.append(row)
    return rows


_SESSIONS: dict[str, OnnxClassifier] = {}  # per process: each decode worker loads the model once


def _rows(clf: OnnxClassifier, batch: images.Batch, topk: int) -> list[dict]:
    probs = clf.probabilities(batch.pixels) if len(batch.pixels) else np.zeros((0, clf.meta.num_classes))
    return rows_for(batch, probs, clf.meta.class_names, topk)


def _load_session(model: str, fallback: dict | None) -> None:
    """Worker start-up: load the model once, single-threaded (the workers share the cores).

    A model that does not load is reported by the main process, which loads it too; a worker
    start-up must not fail (that would break the pool), so it leaves the error to _answer.
    """
    try:
        _SESSIONS[model] = OnnxClassifier(model, threads=1, fallback=fallback, checked=True)
    except Exception:
        pass


def _answer(paths: list[str], root: str, model: str, fallback: dict | None, topk: int, max_pixels: int) -> list[dict]:
    """In a worker: decode `paths` and predict them; -> their rows."""
    if model not in _SESSIONS:
        _load_session(model, fallback)
    clf = _SESSIONS[model]
    batch = images.decode_chunk(paths, root, clf.meta.image_size, clf.meta.resize, max_pixels)
    return _rows(clf, batch, topk)


class Tally:
    """Counts per predicted class and per error reason (the summary), from rows."""

    def __init__(self):
        self.labels, self.errors = Counter(), Counter()

    def add(self, row: dict) -> None:
        if row["error"]:
            self.errors[row["error"].split(" (")[0]] += 1
        else:
            self.labels[row["label"]] += 1

    def summary(self, output: Path) -> dict:
        return {"ok": sum(self.labels.values()), "failed": sum(self.errors.values()), "output": str(output),
                "per_class": dict(sorted(self.labels.items())), "errors": dict(self.errors.most_common())}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _process() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, processes on this machine) from the launcher's environment."""
    env = os.environ
    return (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))))


def predict(model: str | Path, input_dir: str | Path, output: str | Path = "predictions.csv", batch_size: int = 128,
            topk: int = 1, workers: int | None = None, threads: int = 0, device: str = "cpu", resume: bool = False,
            overwrite: bool = False, max_pixels: int = 89_478_485, fallback: dict | None = None,
            grid: str | Path | None = None, grid_count: int = 32) -> dict:
    """Predict every image file under `input_dir` into `output`; returns the summary (main process).

    `grid`: also draw the first `grid_count` rows (image, label, score or error) into this PNG.
    """
    root, out = Path(input_dir), Path(output)
    if not root.is_dir():
        raise UserError(f"input folder '{root}' does not exist")
    if batch_size < 1 or topk < 1:
        raise UserError("--batch-size and --topk must be at least 1")
    fmt = outputs.format_of(out)
    rank, world, local_rank, local_world = _process()
    sidecar = out.with_name(out.name + ".run.json")
    final_rows = outputs.staging_path(out)  # the merged rows (Parquet: staged JSON Lines)
    target = final_rows if world == 1 else out.with_name(
        f"{out.name}.part-{rank}-of-{world}" + (".jsonl" if fmt != "csv" else ".csv"))
    if resume and sidecar.is_file() and json.loads(sidecar.read_text()).get("complete"):
        _check_same_model(sidecar, model, world)
        log.info("%s is already complete", out)
        return json.loads(sidecar.read_text())["summary"]
    _prepare(out, sidecar, target, rank, world, resume, overwrite, model)

    cores = max(1, (os.cpu_count() or 1) // local_world)
    load = (_load_session, (str(model), fallback)) if device == "cpu" else (None, ())
    with images.Decoder(workers or cores, *load) as decoder:  # fork the workers before onnxruntime starts threads
        clf = OnnxClassifier(model, threads, fallback, device, local_rank)
        topk = min(topk, clf.meta.num_classes)
        if rank == 0 and not (resume and sidecar.is_file()):
            sidecar.write_text(json.dumps({"model": str(model), "model_sha256": _sha256(Path(model)),
                                           "input_dir": str(root.resolve()), "topk": topk, "world_size": world,
                                           "complete": False}))
        files = itertools.islice(images.iter_images(root), rank, None, world)  # this process's share, lazily
        writer = outputs.RowWriter(target, topk, resume)
        tally, done = Tally(), 0
        for row in writer.existing_rows():  # resume: the rows must be the first files of the same walk
            expected = next(files, None)
            if row["path"] != expected:
                raise UserError(f"'{target}' row {done + 1} answers '{row['path']}' but the folder now lists "
                                f"'{expected}' there: the input changed since the interrupted run; use a new output")
            tally.add(row)
            done += 1
        if done:
            log.info("resuming %s after %d rows", target, done)
        writer.open()
        from toolkit.report import progress_bar

        todo = sum(1 for _ in itertools.islice(images.iter_images(root), rank, None, world)) - done  # a quick walk
        bar = progress_bar(todo, f"predicting {todo} files" + (f" (process 1 of {world})" if world > 1 else ""),
                           enabled=rank == 0)
        try:
            if clf.device == "cpu":  # every worker decodes and infers its batch: no pixels cross processes
                _SESSIONS[str(model)] = clf  # used when there are no worker processes
                answers = decoder.map(_answer, images.chunked(files, batch_size), str(root), str(model), fallback,
                                      topk, max_pixels)
            else:  # one GPU session here; the workers only decode
                answers = (_rows(clf, b, topk) for b in decoder.batches(root, files, clf.meta.image_size,
                                                                       clf.meta.resize, batch_size, max_pixels))
            for rows in answers:
                writer.write(rows)
                for row in rows:
                    tally.add(row)
                bar.update(len(rows))
        finally:
            bar.close()
            writer.close()
            _SESSIONS.clear()
    if world > 1:
        target.with_name(target.name + ".done").write_text(json.dumps(tally.summary(target)))
        if rank != 0:
            return tally.summary(target)
        tally = _merge(out, final_rows, target, world, topk)
    if grid:
        from toolkit.pictures import predictions_grid

        predictions_grid(root, list(itertools.islice(outputs.read_rows(final_rows), grid_count)), grid)
    if fmt == "parquet":
        outputs.to_parquet(final_rows, out)
    summary = tally.summary(out)
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "complete": True, "summary": summary}))
    return summary


def _check_same_model(sidecar: Path, model, world: int) -> None:
    previous = json.loads(sidecar.read_text())
    if previous.get("model_sha256") != _sha256(Path(model)):
        raise UserError(f"the output was written with another model ({previous.get('model')}); refusing to resume "
                        f"with '{model}': predictions of two models would be mixed")
    if previous.get("world_size") != world:
        raise UserError(f"the output was written by {previous.get('world_size')} processes; resume it with the "
                        f"same number (now {world})")


def _prepare(out: Path, sidecar: Path, target: Path, rank: int, world: int, resume: bool, overwrite: bool,
             model) -> None:
    """Check what an earlier run left behind: resume it, replace it (--overwrite), or refuse. Never lose rows."""
    mine = dict.fromkeys([target] + ([out, sidecar, outputs.staging_path(out)] if rank == 0 else []))  # its own files
    earlier = [p for p in mine if p.exists()]
    if overwrite:
        for p in earlier:
            p.unlink()
    elif resume and sidecar.is_file():
        _check_same_model(sidecar, model, world)
    elif resume and earlier:
        raise UserError(f"'{earlier[0]}' has no run record ({sidecar.name}), so it cannot be checked against this "
                        "model; use --overwrite or a new output")
    elif earlier:
        raise UserError(f"'{earlier[0]}' already exists; pass --resume to continue it or --overwrite to replace it")
    target.with_name(target.name + ".done").unlink(missing_ok=True)


def _merge(out: Path, final_rows: Path, target: Path, world: int, topk: int) -> Tally:
    """Main process: wait for every part, interleave them into `final_rows`, remove the parts."""
    parts = [target.with_name(target.name.replace("part-0-of", f"part-{r}-of")) for r in range(world)]
    markers = [p.with_name(p.name + ".done") for p in parts]
    waited = 0.0
    while not all(m.exists() for m in markers):  # the launcher stops the job if another process fails
        time.sleep(0.2)
        waited += 0.2
        if waited > 60 and waited % 60 < 0.2:
            log.info("waiting for %d of %d processes to finish their parts", sum(not m.exists() for m in markers),
                     world)
    tally = Tally()
    for row in outputs.merge_parts(parts, final_rows, topk):
        tally.add(row)
    for p in parts + markers:
        p.unlink()
    return tally
