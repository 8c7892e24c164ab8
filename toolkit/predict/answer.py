"""This process's share of the files, answered: walked lazily in a deterministic order, decoded by worker
processes a bounded number of batches ahead, run through the model, and appended one row per file as soon as
their batch is done (a resumed output continues after the rows it holds). Numpy + PIL only, never torch.

predict() in run.py calls `answer_files` once per process, after its checks and with the output locked; it
merges the processes' parts afterwards. The rows come from table.py, the model session from runtime.py.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np

import toolkit.predict.parts as parts
import toolkit.predict.table as table
from toolkit import UserError
from toolkit.core import images
from toolkit.predict.runtime import OnnxClassifier
from toolkit.predict.storage import Location

log = logging.getLogger(__name__)


_SESSIONS: dict[str, OnnxClassifier] = {}  # per process: each decode worker loads the model once


def _rows(clf: OnnxClassifier, batch: images.Batch, topk: int) -> list[dict]:
    probs = clf.probabilities(batch.pixels) if len(batch.pixels) else np.zeros((0, clf.meta.num_classes))
    return table.rows_for(batch.paths, batch.reasons(), probs, clf.meta.class_names, topk)


def _load_session(model: str, fallback: dict | None, outputs: str) -> None:
    """Worker start-up: load the model once, single-threaded (the workers share the cores).

    A model that does not load is reported by the main process, which loads it too; a worker
    start-up must not fail (that would break the pool), so it leaves the error to _answer.
    """
    try:
        _SESSIONS[model] = OnnxClassifier(model, threads=1, fallback=fallback, checked=True, outputs=outputs)
    except Exception:
        pass


def _answer(paths: list[str], source: Location, model: str, fallback: dict | None, outputs: str, topk: int,
            prep: images.Preprocess) -> list[dict]:
    """In a worker: decode `paths` and predict them; -> their rows."""
    if model not in _SESSIONS:
        _load_session(model, fallback, outputs)
    clf = _SESSIONS[model]
    return _rows(clf, source.decode(paths, prep), topk)


def _decode(paths: list[str], source: Location, prep: images.Preprocess) -> images.Batch:
    """In a worker (GPU runs): decode only."""
    return source.decode(paths, prep)


def answer_files(source: Location, target: Path, run: dict, rank: int, world: int, local_rank: int, local_world: int,
                 resume: bool, workers, threads: int, device: str, batch_size: int, max_pixels: int, fallback,
                 new_record: Path | None, skipped: Counter) -> tuple[table.Tally, int]:
    """This process's share of the files, answered into `target` (continuing it when resuming); counts
    the files that are not images into `skipped`.
    -> (tally, the top-k the rows have: --topk, at most the number of classes)."""
    from toolkit.core.progress import progress_bar

    model, outputs = run["model"], run["outputs"]
    cores = max(1, (os.cpu_count() or 1) // local_world)
    load = (_load_session, (model, fallback, outputs)) if device == "cpu" else (None, ())
    with images.Decoder(workers or cores, *load) as decoder:  # fork the workers before onnxruntime starts threads
        clf = OnnxClassifier(model, threads, fallback, device, local_rank, checked=True, outputs=outputs)
        topk = table.clip_topk(run["topk"], clf.meta.num_classes, say=rank == 0)
        if new_record:
            parts.write_json(new_record, {**run, "complete": False})
        files = itertools.islice(source.iter_images(), rank, None, world)  # this process's share, lazily
        writer = table.RowWriter(target, topk, resume)
        tally = table.Tally()
        for row in writer.existing_rows():  # resume: the rows must be the first files of the same walk
            expected = next(files, None)
            if row["path"] != expected:
                raise UserError(f"'{target}' row {tally.rows + 1} answers '{row['path']}' but the folder now lists "
                                f"'{expected}' there: the input changed since the interrupted run; use a new output")
            tally.add(row)
        if tally.rows:
            log.info("resuming %s after %d rows", target, tally.rows)
        writer.open()
        skipped.clear()  # counted afresh by this full walk
        todo = sum(1 for _ in itertools.islice(source.iter_images(skipped), rank, None, world)) - tally.rows
        bar = progress_bar(todo, f"predicting {todo} files" + (f" (process 1 of {world})" if world > 1 else ""),
                           enabled=rank == 0)
        prep = images.Preprocess.of(clf.meta, max_pixels)  # the model's decoding, this run's pixel cap
        try:
            if clf.device == "cpu":  # every worker decodes and infers its batch: no pixels cross processes
                _SESSIONS[model] = clf  # used when there are no worker processes
                answers = decoder.map(_answer, images.chunked(files, batch_size), source, model, fallback,
                                      outputs, topk, prep)
            else:  # one GPU session here; the workers only decode
                answers = (_rows(clf, b, topk) for b in decoder.map(_decode, images.chunked(files, batch_size), source,
                                                                    prep))
            for rows in answers:
                writer.write(rows)
                for row in rows:
                    tally.add(row)
                bar.update(len(rows))
        finally:
            bar.close()
            writer.close()
            _SESSIONS.clear()
    return tally, topk
