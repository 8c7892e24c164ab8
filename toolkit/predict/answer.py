"""This process's share of the files, answered: walked lazily in a deterministic order, decoded by worker
processes a bounded number of batches ahead, run through the model, and appended one row per file as soon as
their batch is done (a resumed output continues after the rows it holds). Numpy + PIL only, never torch.

predict() in run.py calls `answer_files` once per process, after its checks and with the output locked; it
merges the processes' parts afterwards. The rows come from table.py, the model session from runtime.py.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import toolkit.predict.parts as parts
import toolkit.predict.table as table
from toolkit import UserError
from toolkit.core import images
from toolkit.predict.runtime import OnnxClassifier
from toolkit.predict.storage import Location

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Process:
    """This process's place in the run, from the launcher's environment (RANK, WORLD_SIZE, ...)."""

    rank: int = 0  # answers files rank, rank + world, ...; process 0 merges and reports
    world: int = 1  # processes in the run
    local_rank: int = 0  # the GPU this process uses
    local_world: int = 1  # processes on this machine: they share its cores


@dataclass(frozen=True)
class Job:
    """One local predict run, checked by predict(): the model, its reading, and how this process answers.

    `record()` is the run record written beside the output, which a resume compares with its own; its
    keys, their order and the run id are a file format (outputs written earlier must still resume).
    """

    source: Location  # the input folder (or URL)
    model: str  # the .onnx file
    model_sha256: str
    outputs: str  # logits | probabilities | log-probabilities, from the graph or --outputs
    fallback: dict | None  # --classes/--size/...: read when the model has no metadata; None: not given
    fmt: str  # output format: csv | jsonl | parquet
    topk: int  # asked for; the rows hold at most the number of classes
    batch_size: int  # images per session run (the graph's fixed batch size, when it has one)
    max_pixels: int  # larger images are refused undecoded
    device: str  # cpu | cuda | auto (CUDA when present)
    threads: int  # onnxruntime threads of the session here; 0: its default
    workers: int | None  # decode processes; None: this process's share of the cores
    resume: bool
    overwrite: bool
    process: Process

    def record(self) -> dict:
        """The run record (without "complete" and what a complete run adds), with its run id."""
        run = {"model": self.model, "model_sha256": self.model_sha256, "input_dir": self.source.canonical(),
               "topk": self.topk, "world_size": self.process.world, "max_pixels": self.max_pixels,
               "fallback": self.fallback, "format": self.fmt, "outputs": self.outputs}
        run["run_id"] = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
        return run


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


def answer_files(job: Job, target: Path, new_record: Path | None, skipped: Counter) -> tuple[table.Tally, int]:
    """This process's share of the files of `job.source`, answered into `target` (continuing it when
    resuming); writes the run record, not yet complete, to `new_record` once the model is loaded; counts
    the files that are not images into `skipped`.
    -> (tally, the top-k the rows have: --topk, at most the number of classes)."""
    from toolkit.core.progress import progress_bar

    source, model, fallback, outputs, proc = job.source, job.model, job.fallback, job.outputs, job.process
    rank, world = proc.rank, proc.world
    cores = max(1, (os.cpu_count() or 1) // proc.local_world)
    load = (_load_session, (model, fallback, outputs)) if job.device == "cpu" else (None, ())
    with images.Decoder(job.workers or cores, *load) as decoder:  # fork the workers before onnxruntime starts threads
        clf = OnnxClassifier(model, job.threads, fallback, job.device, proc.local_rank, checked=True, outputs=outputs)
        topk = table.clip_topk(job.topk, clf.meta.num_classes, say=rank == 0)
        if new_record:
            parts.write_json(new_record, {**job.record(), "complete": False})
        files = itertools.islice(source.iter_images(), rank, None, world)  # this process's share, lazily
        writer = table.RowWriter(target, topk, job.resume)
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
        prep = images.Preprocess.of(clf.meta, job.max_pixels)  # the model's decoding, this run's pixel cap
        batches = images.chunked(files, job.batch_size)
        try:
            if clf.device == "cpu":  # every worker decodes and infers its batch: no pixels cross processes
                _SESSIONS[model] = clf  # used when there are no worker processes
                answers = decoder.map(_answer, batches, source, model, fallback, outputs, topk, prep)
            else:  # one GPU session here; the workers only decode
                answers = (_rows(clf, b, topk) for b in decoder.map(_decode, batches, source, prep))
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
