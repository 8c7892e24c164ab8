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
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import toolkit.predict.parts as parts
import toolkit.predict.table as table
from toolkit import UserError
from toolkit.core import formats, images
from toolkit.core.files import absent, inside
from toolkit.core.lock import Lock, lock_path, remove_stale_temps
from toolkit.predict.answer import answer_files
from toolkit.predict.runtime import OnnxClassifier, resolve_outputs, validate_model
from toolkit.predict.storage import Location, is_url, sha256_file, staging_dir

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")


def _process() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, processes on this machine) from the launcher's environment."""
    env = os.environ
    try:
        rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
        local_rank = int(env.get("LOCAL_RANK", 0))
        local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1)))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not below WORLD_SIZE={world}; launch with accelerate launch or torchrun")
    return rank, world, local_rank, max(1, local_world)


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
    if grid and (Path(grid).suffix.lower() != ".png" or grid_count < 1 or source.url):
        raise UserError(f"--grid needs a .png file, --grid-count at least 1 and a local input; got '{grid}', "
                        f"{grid_count}, '{source}'")
    if grid and inside(grid, str(source)):  # even with --overwrite: a photo being predicted is never replaced
        raise UserError(f"--grid '{grid}' is inside the input folder '{source}', where it would replace or join the "
                        "images predicted; write it elsewhere")
    if grid and Path(grid).exists() and not overwrite:  # never replace a user's file (a photo, an earlier grid)
        raise UserError(f"--grid '{grid}' already exists; choose a new file or pass --overwrite")
    if out.is_dir():
        raise UserError(f"output '{out}' is a folder; give a file name such as '{out / 'predictions.csv'}'")
    fmt = table.format_of(out)
    rank, world, local_rank, local_world = _process()
    if url_out and world > 1:
        raise UserError(f"'{url_out}': several processes write their parts to a shared folder, not a URL; "
                        "use --engine ray for object storage across machines")
    graph = validate_model(model, device)  # before anything already written is touched
    outputs = resolve_outputs(outputs, graph.output_kind)
    if outputs != "logits":
        log.info("the model outputs %s%s: scores are taken from them, not softmaxed again", outputs,
                 " (its graph ends in " + {"probabilities": "Softmax or Sigmoid", "log-probabilities": "LogSoftmax"}[
                     outputs] + ")" if outputs == graph.output_kind else " (--outputs)")
    if graph.fixed_batch and graph.fixed_batch != batch_size:
        log.info("the model's batch size is fixed to %d: predicting %d image(s) per run", graph.fixed_batch,
                 graph.fixed_batch)
        batch_size = graph.fixed_batch
    skipped: Counter = Counter()
    if next(source.iter_images(skipped), None) is None:
        raise UserError(f"no image files under '{source}'" + (f" (skipped {formats.describe_skipped(skipped)})" if skipped else ""))
    if fallback and not fallback.get("classes"):
        fallback = None  # nothing stated: the same run as no fallback at all
    run = {"model": str(model), "model_sha256": sha256_file(model), "input_dir": source.canonical(),
           "topk": topk, "world_size": world, "max_pixels": max_pixels, "fallback": fallback, "format": fmt,
           "outputs": outputs}
    run["run_id"] = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
    if url_out:  # written here, then uploaded whole with its record
        remote = url_out.sibling(".run.json").read_json()
        if resume and remote and remote.get("complete") and url_out.exists():
            parts.check_same_run(remote, run)
            return remote["summary"]
        if (remote or url_out.exists()) and not (resume or overwrite):
            raise UserError(f"'{url_out}' already exists; pass --resume to continue it or --overwrite to replace it")
    sidecar = out.with_name(out.name + ".run.json")
    final_rows = table.staging_path(out)  # the merged rows (Parquet: staged JSON Lines)
    target = final_rows if world == 1 else parts.part_path(out, fmt, rank, world)
    with contextlib.ExitStack() as held:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if rank == 0:  # one writer per output: a second run to the same output stops here
                held.enter_context(Lock(lock_path(out), f"output '{url_out or out}'"))
                remove_stale_temps(out.parent, prefix=f".{out.name}.")
            if world > 1:
                held.enter_context(Lock(lock_path(target), f"output part '{target}'"))
            return _write(source, out, url_out, fmt, run, sidecar, final_rows, target, skipped, resume, overwrite,
                          grid, grid_count, model, fallback, (rank, world, local_rank, local_world),
                          (workers, threads, device, batch_size, max_pixels))
        except OSError as e:  # the output side: a folder that cannot be written, a full disk
            raise UserError(f"cannot write '{e.filename or out}' ({e.strerror or e})") from None


def _write(source: Location, out: Path, url_out, fmt: str, run: dict, sidecar: Path, final_rows: Path, target: Path,
           skipped: Counter, resume: bool, overwrite: bool, grid, grid_count: int, model, fallback,
           process: tuple, how: tuple) -> dict:
    """predict() once this process holds its output: resume, replace or refuse what is there, answer, merge."""
    rank, world, local_rank, local_world = process
    workers, threads, device, batch_size, max_pixels = how
    record = parts.read_record(sidecar)
    if resume and record and record.get("complete"):
        parts.check_same_run(record, run)
        if _intact(out, record):
            log.info("%s is already complete", out)
            return record["summary"]
        log.warning("%s was completed but is gone; predicting again", out)
        if rank == 0:
            sidecar.unlink(missing_ok=True)
        record = None
    parts.prepare(out, sidecar, target, rank, resume, overwrite, record, run)
    try:
        tally, topk = answer_files(source, target, run, rank, world, local_rank, local_world, resume, workers,
                                   threads, device, batch_size, max_pixels, fallback,
                                   sidecar if rank == 0 and not record else None, skipped)
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
        tally = parts.merge(out, final_rows, fmt, world, run, sum(1 for _ in source.iter_images()), topk)
    if grid:
        _draw_grid(Path(str(source)), final_rows, topk, grid, grid_count, tally.rows, model, fallback, overwrite)
    if fmt == "parquet":
        table.to_parquet(final_rows, out, topk)
    summary = {**tally.summary(url_out or out), "skipped": dict(skipped.most_common())}
    parts.write_json(sidecar, {**run, "complete": True, "summary": summary, "output_bytes": out.stat().st_size})
    if url_out:
        url_out.upload(out)
        url_out.sibling(".run.json").upload(sidecar)
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


def _draw_grid(root: Path, rows_path: Path, topk: int, grid, grid_count: int, total: int, model, fallback,
               overwrite: bool) -> None:
    """--grid: grid_count rows spread across the whole output (two streaming passes over the table)."""
    from toolkit.core.pictures import predictions_grid, spread_sample

    def paths():
        return (row["path"] for row in table.read_rows(rows_path, topk))

    chosen = set(spread_sample(paths(), grid_count)(paths()))
    rows = [dict(zip(("label", "score"), table.top_class(row)), path=row["path"], error=row["error"])
            for i, row in enumerate(table.read_rows(rows_path, topk)) if i in chosen]
    classes = OnnxClassifier(model, threads=1, fallback=fallback).meta.class_names  # as predicting read them
    predictions_grid(root, rows, grid, classes, total=total, overwrite=overwrite)


def _has_rows(path: Path) -> bool:
    try:
        return next(table.read_rows(path), None) is not None
    except (OSError, UserError):
        return path.exists() and path.stat().st_size > 0
