"""Batch prediction of a folder of images with onnxruntime: numpy + PIL only, never torch.

Files are walked lazily in a deterministic order, decoded by worker processes a bounded
number of batches ahead, run through the model, and written one row per file as soon as
their batch is done (answer.py). A file that cannot be decoded gets a row with its reason, never a
crash. `resume` continues an interrupted output; under `accelerate launch` (or any launcher
that sets RANK and WORLD_SIZE) each process answers every n-th file into its own part and
the main process merges the parts into the single-process order.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import toolkit.predict.parts as parts
import toolkit.predict.table as table
from toolkit import UserError
from toolkit.core import formats, images
from toolkit.core.files import absent, inside
from toolkit.core.lock import Lock, lock_path, remove_stale_temps
from toolkit.predict.answer import Job, Process, answer_files
from toolkit.predict.runtime import OnnxClassifier, resolve_outputs, validate_model
from toolkit.predict.storage import Location, is_url, sha256_file, staging_dir

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")


def _process() -> Process:
    """This process's place in the run from the launcher's environment: 0 of 1 without a launcher."""
    env = os.environ
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local_rank = int(env.get("LOCAL_RANK", 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not below WORLD_SIZE={world}; launch with accelerate launch or torchrun")
    return Process(rank, world, local_rank, max(1, local_world))


@dataclass(frozen=True)
class _Output:
    """Where one process of a local run writes."""

    file: Path  # the output; for a URL, its local staging copy
    url: Location | None  # where the complete output is uploaded, with its run record
    target: Path  # this process's rows: the merged rows themselves, or its part of them

    @property
    def sidecar(self) -> Path:  # the run record
        return self.file.with_name(self.file.name + ".run.json")

    @property
    def final_rows(self) -> Path:  # the merged rows (Parquet: staged JSON Lines)
        return table.staging_path(self.file)


def predict(model: str | Path, input_dir: str | Path, output: str | Path = "predictions.csv", batch_size: int = 128,
            topk: int = 1, workers: int | None = None, threads: int = 0, device: str = "cpu", resume: bool = False,
            overwrite: bool = False, max_pixels: int = images.MAX_PIXELS, fallback: dict | None = None,
            grid: str | Path | None = None, grid_count: int = 32, outputs: str | None = None, engine: str = "local",
            chunk_size: int = 1024, address: str | None = None) -> dict:
    """Predict every image file under `input_dir` into `output`; returns the summary (main process).

    `grid`: also draw `grid_count` rows spread across the output (image, label, score or error) into this PNG.
    `outputs`: what the model outputs (logits | probabilities | log-probabilities); None: read
    from the graph. A graph with a fixed batch size is run at that size, whatever `batch_size` says.
    Raises UserError when the folder holds no image file (files of other formats are counted by
    extension in the summary's "skipped").
    `input_dir` and `output` may be URLs (s3://...; see predict/storage.py): a URL output is written
    to a local staging copy and uploaded, with its run record, when complete.
    `engine`: "local" (worker processes on this machine) or "ray" (Ray Data, on `address` or a local
    Ray, in chunks of `chunk_size` files; see predict/engine_ray.py).
    """
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}; got '{engine}'")
    if engine == "ray":
        if grid:
            raise UserError("--grid is drawn by --engine local only")
        from toolkit.predict.engine_ray import predict_ray

        return predict_ray(model, input_dir, output, batch_size=batch_size, chunk_size=chunk_size, topk=topk,
                           workers=workers or 0, threads=threads, device=device, resume=resume, overwrite=overwrite,
                           max_pixels=max_pixels, fallback=fallback, outputs=outputs, address=address)
    source, url_out = Location(input_dir), Location(output) if is_url(output) else None
    out = staging_dir(str(url_out)) / Path(str(url_out)).name if url_out else Path(output)
    if not source.is_dir():
        raise UserError(f"input folder '{source}' {absent(str(source))}")
    if batch_size < 1 or topk < 1 or max_pixels < 1:
        raise UserError("--batch-size, --topk and --max-pixels must be at least 1")
    if grid:
        _check_grid(Path(grid), grid_count, source, overwrite)
    if out.is_dir():
        raise UserError(f"output '{out}' is a folder; give a file name such as '{out / 'predictions.csv'}'")
    fmt = table.format_of(out)
    process = _process()
    if url_out and process.world > 1:
        raise UserError(f"'{url_out}': several processes write their parts to a shared folder, not a URL; "
                        "use --engine ray for object storage across machines")
    outputs, batch_size = _read_graph(model, device, outputs, batch_size)  # before anything written is touched
    skipped: Counter = Counter()
    if next(source.iter_images(skipped), None) is None:
        raise UserError(f"no image files under '{source}'" + (f" (skipped {formats.describe_skipped(skipped)})" if skipped else ""))
    if fallback and not fallback.get("classes"):
        fallback = None  # nothing stated: the same run as no fallback at all
    job = Job(source=source, model=str(model), model_sha256=sha256_file(model), outputs=outputs, fallback=fallback,
              fmt=fmt, topk=topk, batch_size=batch_size, max_pixels=max_pixels, device=device, threads=threads,
              workers=workers, resume=resume, overwrite=overwrite, process=process)
    target = table.staging_path(out) if process.world == 1 else parts.part_path(out, fmt, process.rank, process.world)
    return _predict_into(job, _Output(out, url_out, target), skipped, (Path(grid), grid_count) if grid else None)


def _read_graph(model: str | Path, device: str, outputs: str | None, batch_size: int) -> tuple[str, int]:
    """Check the model file for `device`; -> (what it outputs: --outputs or read from the graph, the batch
    size it runs at: `batch_size` unless the graph fixes one)."""
    graph = validate_model(model, device)
    outputs = resolve_outputs(outputs, graph.output_kind)
    if outputs != "logits":
        log.info("the model outputs %s%s: scores are taken from them, not softmaxed again", outputs,
                 " (its graph ends in " + {"probabilities": "Softmax or Sigmoid", "log-probabilities": "LogSoftmax"}[
                     outputs] + ")" if outputs == graph.output_kind else " (--outputs)")
    if graph.fixed_batch and graph.fixed_batch != batch_size:
        log.info("the model's batch size is fixed to %d: predicting %d image(s) per run", graph.fixed_batch,
                 graph.fixed_batch)
        return outputs, graph.fixed_batch
    return outputs, batch_size


def _check_grid(grid: Path, grid_count: int, source: Location, overwrite: bool) -> None:
    """--grid: a new .png (or --overwrite) outside a local input folder, and a count of at least 1."""
    if grid.suffix.lower() != ".png" or grid_count < 1 or source.url:
        raise UserError(f"--grid needs a .png file, --grid-count at least 1 and a local input; got '{grid}', "
                        f"{grid_count}, '{source}'")
    if inside(grid, str(source)):  # even with --overwrite: a photo being predicted is never replaced
        raise UserError(f"--grid '{grid}' is inside the input folder '{source}', where it would replace or join the "
                        "images predicted; write it elsewhere")
    if grid.exists() and not overwrite:  # never replace a user's file (a photo, an earlier grid)
        raise UserError(f"--grid '{grid}' already exists; choose a new file or pass --overwrite")


def _predict_into(job: Job, where: _Output, skipped: Counter, grid: tuple[Path, int] | None) -> dict:
    """predict() once checked: take the output (one writer per output), then write it; -> the summary."""
    out, url_out, rank = where.file, where.url, job.process.rank
    if url_out:  # written here, then uploaded whole with its record
        remote = url_out.sibling(".run.json").read_json()
        if job.resume and remote and remote.get("complete") and url_out.exists():
            parts.check_same_run(remote, job.record())
            return remote["summary"]
        if (remote or url_out.exists()) and not (job.resume or job.overwrite):
            raise UserError(f"'{url_out}' already exists; pass --resume to continue it or --overwrite to replace it")
    with contextlib.ExitStack() as held:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if rank == 0:  # one writer per output: a second run to the same output stops here
                held.enter_context(Lock(lock_path(out), f"output '{url_out or out}'"))
                remove_stale_temps(out.parent, prefix=f".{out.name}.")
            if job.process.world > 1:
                held.enter_context(Lock(lock_path(where.target), f"output part '{where.target}'"))
            return _write(job, where, skipped, grid)
        except OSError as e:  # the output side: a folder that cannot be written, a full disk
            raise UserError(f"cannot write '{e.filename or out}' ({e.strerror or e})") from None


def _write(job: Job, where: _Output, skipped: Counter, grid: tuple[Path, int] | None) -> dict:
    """predict() once this process holds its output: resume, replace or refuse what is there, answer, merge."""
    out, sidecar, target, run = where.file, where.sidecar, where.target, job.record()
    rank, world = job.process.rank, job.process.world
    record = parts.read_record(sidecar)
    if job.resume and record and record.get("complete"):
        parts.check_same_run(record, run)
        if _intact(out, record):
            log.info("%s is already complete", out)
            return record["summary"]
        log.warning("%s was completed but is gone; predicting again", out)
        if rank == 0:
            sidecar.unlink(missing_ok=True)
        record = None
    parts.prepare(out, sidecar, target, rank, job.resume, job.overwrite, record, run)
    try:
        tally, topk = answer_files(job, target, sidecar if rank == 0 and not record else None, skipped)
    except BaseException:
        if not record and not _has_rows(target):  # nothing answered: leave no output and no run record behind
            target.unlink(missing_ok=True)
            if rank == 0:
                sidecar.unlink(missing_ok=True)
        raise
    if world > 1:
        parts.write_json(parts.marker_path(target), {"run_id": run["run_id"], "rows": tally.rows})
        if rank != 0:
            return tally.summary(target)
        tally = parts.merge(out, where.final_rows, job.fmt, world, run, sum(1 for _ in job.source.iter_images()), topk)
    if grid:
        _draw_grid(job, where.final_rows, topk, grid, tally.rows)
    if job.fmt == "parquet":
        table.to_parquet(where.final_rows, out, topk)
    summary = {**tally.summary(where.url or out), "skipped": dict(skipped.most_common())}
    parts.write_json(sidecar, {**run, "complete": True, "summary": summary, "output_bytes": out.stat().st_size})
    if where.url:
        where.url.upload(out)
        where.url.sibling(".run.json").upload(sidecar)
        out.unlink()
        sidecar.unlink()
    return summary


def _intact(out: Path, record: dict) -> bool:
    """Whether the output a complete run record describes is still there, as written; a changed one is refused."""
    if not out.is_file():
        return False
    size = out.stat().st_size
    if size != record.get("output_bytes", size):
        raise UserError(f"'{out}' changed since its run completed ({size} bytes; the run record says "
                        f"{record['output_bytes']}); use --overwrite or a new output")
    return True


def _draw_grid(job: Job, rows_path: Path, topk: int, grid: tuple[Path, int], total: int) -> None:
    """--grid: grid_count rows spread across the whole output (two streaming passes over the table)."""
    from toolkit.core.pictures import predictions_grid, spread_sample

    path, grid_count = grid

    def paths():
        return (row["path"] for row in table.read_rows(rows_path, topk))

    chosen = set(spread_sample(paths(), grid_count)(paths()))
    rows = [dict(zip(("label", "score"), table.top_class(row)), path=row["path"], error=row["error"])
            for i, row in enumerate(table.read_rows(rows_path, topk)) if i in chosen]
    classes = OnnxClassifier(job.model, threads=1, fallback=job.fallback).meta.class_names  # as predicting read them
    predictions_grid(Path(str(job.source)), rows, path, classes, total=total, overwrite=job.overwrite)


def _has_rows(path: Path) -> bool:
    try:
        return next(table.read_rows(path), None) is not None
    except (OSError, UserError):
        return path.exists() and path.stat().st_size > 0
