"""The Ray Data engine of `toolkit predict`: the same decode, ONNX session and rows, on a Ray cluster.

    toolkit predict MODEL INPUT -o OUTPUT --engine ray [--address ADDR]

The driver walks INPUT (a folder or a URL), cuts the walk into chunks of `chunk_size` files and hands
the chunks not written yet to Ray Data: `from_items(chunks)` -> `map_batches(actor pool)`. On the CPU
each actor decodes its chunk (core/images), runs the model (predict/runtime) and writes the chunk's
part file (predict/dataset); with a GPU, CPU tasks decode and GPU actors infer and write. Ray retries
a chunk whose worker died; a part is written whole under a name fixed by its chunk, so a retry, or a
`--resume` after the driver died, can only write the same part again: one row per file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import toolkit.predict.dataset as dataset
import toolkit.predict.table as table
from toolkit import UserError
from toolkit.core import formats, images
from toolkit.core.files import absent
from toolkit.core.lock import Lock, lock_path
from toolkit.core.progress import progress_bar
from toolkit.predict.ray_workers import ChunkPredictor, decode_chunks
from toolkit.predict.parts import check_same_run, resume_or_overwrite
from toolkit.predict.runtime import OnnxClassifier, external_data_files, resolve_outputs, validate_model
from toolkit.predict.storage import Location, sha256_file

log = logging.getLogger(__name__)
STORAGE_VARIABLES = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "FSSPEC_")  # passed on to the workers for URLs


@dataclass(frozen=True)
class Plan:
    """How the Ray stages are sized on a cluster."""

    actors: int  # inference actors
    actor_cpus: float  # CPUs each actor reserves
    actor_gpus: float  # GPUs each actor reserves
    decode_cpus: float  # CPUs of each decode task; 0: no decode tasks, the actors decode their chunks
    threads: int  # onnxruntime threads per actor


def plan(cpus: float, gpus: float, device: str, workers: int = 0) -> Plan:
    """Size the stages from the cluster's resources so that every stage can always be scheduled.

    The chunks are in the driver's memory (no read tasks), so on the CPU the actors may take every
    core and decode their own chunks (no pixels cross processes). With GPUs, CPU tasks decode and at
    least half a CPU always stays free for them, or the GPU actors would wait forever for decoded
    chunks: two 1-CPU actors and 1-CPU read tasks on a 2-CPU machine deadlock.
    """
    if device == "auto":
        device = "cuda" if gpus >= 1 else "cpu"
    if device == "cpu":
        n = workers or max(1, int(cpus))
        share = min(1.0, cpus / n)  # more actors than cores (--workers): they share the cores
        return Plan(n, share, 0.0, 0.0, max(1, int(share)))
    if gpus <= 0:
        raise UserError("--device cuda: the Ray cluster has no GPU; add GPU nodes or use --device cpu")
    n = workers or max(1, int(gpus))
    decode = min(1.0, cpus / 2)
    return Plan(n, min(1.0, (cpus - decode) / n), min(1.0, gpus / n), decode, 1)


@contextlib.contextmanager
def ray_session(address: str | None):
    """Ray, connected: to ADDR (or $RAY_ADDRESS, as under `ray job submit`), else a local Ray on this
    machine's cores, stopped afterwards. A caller that already connected (a notebook, a test) is reused."""
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray Data: pip install 'toolkit[ray]'") from None
    if ray.is_initialized():
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, logging_level=logging.WARNING)
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray cluster at '{address}' ({str(e).splitlines()[0]})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def predict_ray(model: str | Path, input_dir: str | Path, output: str | Path = "predictions.csv",
                batch_size: int = 128, chunk_size: int = 1024, topk: int = 1, workers: int = 0, threads: int = 0,
                device: str = "cpu", resume: bool = False, overwrite: bool = False, max_pixels: int = images.MAX_PIXELS,
                fallback: dict | None = None, outputs: str | None = None, address: str | None = None) -> dict:
    """Predict every image file under `input_dir` (a folder or a URL) on Ray; returns the summary.

    `output` ending in .csv/.jsonl/.parquet: one file, merged in walk order from the part files (kept
    in OUTPUT.parts/ until then; the record is OUTPUT.run.json). Any other name: a Parquet dataset
    folder, one `part-NNNNNNNN.parquet` per chunk of `chunk_size` files, its record in `_run.json`.
    `workers`: inference actors (default: sized from the cluster, see `plan`). `outputs`: as for
    predict/run.py. Raises UserError.
    """
    source, lay, model = Location(input_dir), dataset.layout(output), Path(model)
    if min(batch_size, chunk_size, topk, max_pixels) < 1:
        raise UserError("--batch-size, --chunk-size, --topk and --max-pixels must be at least 1")
    if not source.is_dir():
        raise UserError(f"input folder '{source}' {absent(str(source))}")
    graph = validate_model(model, "cpu")  # the file; CUDA is checked by the GPU actors, on their nodes
    outputs = resolve_outputs(outputs, graph.output_kind)
    batch_size = graph.fixed_batch or batch_size  # a graph with a fixed batch size runs at that size
    if fallback and not fallback.get("classes"):
        fallback = None
    meta = OnnxClassifier(model, 1, fallback, checked=True, outputs=outputs).meta  # and the model loads at all
    run = {"engine": "ray", "model": str(model), "model_sha256": sha256_file(model),
           "input_dir": source.canonical(), "topk": topk, "max_pixels": max_pixels, "fallback": fallback,
           "format": lay.merged or "dataset", "outputs": outputs, "chunk_size": chunk_size}
    run["run_id"] = hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]
    lock = None if lay.output.url else Lock(lock_path(Path(str(lay.output))), f"output '{lay.output}'")
    try:
        if lock:  # one writer per local output (object stores have no locks: one job per URL is on the user)
            Path(str(lay.output)).parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        record = lay.record.read_json()
        if resume and record and record.get("complete"):
            check_same_run(record, run)
            if _delivered(lay, record):
                return record["summary"]
            log.warning("%s was completed but is gone, whole or in part; predicting what is missing", lay.output)
            record = {**record, "complete": False}
        _prepare(lay, record, run, resume, overwrite)
        skipped: Counter = Counter()
        files = list(source.iter_images(skipped))  # the driver holds the listing: ~170 MB per million files
        if not files:
            raise UserError(f"no image files under '{source}'" + (
                f" (skipped {formats.describe_skipped(skipped)})"
                if skipped else ""))
        chunks = list(images.chunked(files, chunk_size))
        digest = dataset.listing_digest(files)
        if record and resume and record.get("listing_sha256") != digest:
            raise UserError(f"the input changed since the interrupted run ({record.get('files')} files then, "
                            f"{len(files)} now, or other names); use --overwrite or a new output")
        record = {**run, "files": len(files), "chunks": len(chunks), "listing_sha256": digest, "complete": False}
        lay.record.write_json(record)  # before any part: parts are only ever next to their run's record
        lay.parts.make_dir()
        done = dataset.done_chunks(lay.parts) if resume else set()
        todo = [(i, c) for i, c in enumerate(chunks) if i not in done]
        k = table.clip_topk(topk, meta.num_classes)
        if done:
            log.info("resuming %s: %d of %d chunks are written", lay.output, len(chunks) - len(todo), len(chunks))
        if todo:
            n = sum(len(c) for _, c in todo)
            bar = progress_bar(n, f"predicting {n} files on Ray")
            try:
                run_chunks(todo, model, run["model_sha256"], meta, fallback, outputs, source, lay.parts, k,
                           batch_size, max_pixels, device, workers, threads, address, bar)
            finally:
                bar.close()
        tally = dataset.finish(lay, chunks, k)
        summary = {**tally.summary(lay.output), "skipped": dict(skipped.most_common())}
        lay.record.write_json({**record, "complete": True, "summary": summary})
        if lay.merged:
            lay.parts.remove()
    except OSError as e:  # the output side: a folder that cannot be written, a full disk
        raise UserError(f"cannot write '{e.filename or lay.output}' ({e.strerror or e})") from None
    finally:
        if lock:
            lock.release()
    return summary


def _delivered(lay: dataset.Layout, record: dict) -> bool:
    """Whether the output a complete run record describes is still there: the merged file, or every part."""
    if lay.merged:
        return lay.output.exists()
    return len(dataset.done_chunks(lay.parts)) == record.get("chunks")


def _prepare(lay: dataset.Layout, record: dict | None, run: dict, resume: bool, overwrite: bool) -> None:
    """Check what an earlier run left behind: resume it, replace it (--overwrite), or refuse. Never lose rows."""
    earlier = [x for x in (lay.record if record else None, lay.output if lay.merged and lay.output.exists() else None,
                           lay.parts if dataset.done_chunks(lay.parts) else None) if x is not None]
    if resume_or_overwrite(earlier, record, run, resume, overwrite, str(lay.record)) == "overwrite":
        for x in earlier:
            if x is lay.parts and not lay.merged:  # the user's dataset folder: only our part files go
                for chunk in dataset.done_chunks(lay.parts):
                    lay.parts.child(dataset.part_name(chunk)).remove()
            else:
                x.remove()


def run_chunks(todo: list[tuple[int, list[str]]], model: Path, sha256: str, meta, fallback: dict | None,
               outputs: str, source: Location, parts: Location, topk: int, batch_size: int, max_pixels: int, device: str,
               workers: int, threads: int, address: str | None, progress) -> None:
    """Answer the chunks `todo` [(chunk id, paths)] on Ray, each into its part file under `parts`."""
    model_files = {model.name: model.read_bytes()}
    model_files |= {loc: (model.parent / loc).read_bytes() for loc in external_data_files(model)}
    with ray_session(address) as ray:
        import ray.data

        resources = ray.cluster_resources()
        p = plan(resources.get("CPU", 0.0), resources.get("GPU", 0.0), device, workers)
        p = dataclasses.replace(p, actors=min(p.actors, len(todo)))  # an actor without a chunk would only wait
        log.info("Ray: %d inference actors (%.2g CPU, %.2g GPU each)%s", p.actors, p.actor_cpus, p.actor_gpus,
                 f", decode tasks of {p.decode_cpus:.2g} CPU" if p.decode_cpus else "")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts rows
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        env = {k: v for k, v in os.environ.items() if k.startswith(STORAGE_VARIABLES)}
        extra = {"runtime_env": {"env_vars": env}} if env and (source.url or parts.url) else {}
        items = [{"chunk": i, "paths": [os.fsencode(f) for f in paths]} for i, paths in todo]  # bytes: any name
        ds = ray.data.from_items(items, override_num_blocks=len(items))  # one chunk per block: retried alone
        if p.decode_cpus:
            ds = ds.map_batches(decode_chunks, batch_size=1, batch_format="numpy", num_cpus=p.decode_cpus,
                                fn_kwargs={"source": source, "prep": images.Preprocess.of(meta, max_pixels)},
                                **extra)
        device_here = "cuda" if p.actor_gpus else "cpu"
        ds = ds.map_batches(ChunkPredictor, batch_size=1, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=p.actors), num_cpus=p.actor_cpus,
                            num_gpus=p.actor_gpus or None,  # Ray Data restarts dead actors, retries their chunks
                            fn_constructor_kwargs={"model_files": model_files, "model_name": model.name,
                                                   "sha256": sha256, "fallback": fallback, "outputs": outputs,
                                                   "device": device_here,
                                                   "threads": threads or p.threads, "source": source,
                                                   "parts": parts, "topk": topk, "batch_size": batch_size,
                                                   "max_pixels": max_pixels}, **extra)
        try:
            for row in ds.iter_rows():
                progress.update(int(row["rows"]))
        except Exception as e:
            message = _user_error(e)
            if message:
                raise UserError(message) from None
            raise


def _user_error(e: BaseException) -> str | None:
    """The message of a UserError raised inside a Ray worker (e.g. no CUDA on a node), however Ray wrapped it:
    as the exception's cause, or only as text (an actor that failed to start is an ActorDiedError)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return str(e)
        found = re.findall(r"^toolkit\.UserError: (.+)$", str(e), re.MULTILINE)
        if found:
            return found[-1]
        e = getattr(e, "cause", None) or e.__cause__
    return None
