"""The run record beside an output, and runs split over processes: per-process parts merged in walk order.

Each process writes its own part (rows of files i % world == rank) and a marker with the run id
and its row count; the main process waits for every marker of this run, checks the counts,
interleaves the parts back into the single-process order and removes them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator

from toolkit import UserError
from toolkit.predict.table import RowWriter, Tally, read_rows, staging_path

log = logging.getLogger(__name__)


def merge_parts(parts: list[Path], out: Path, topk: int) -> Iterator[dict]:
    """Interleave per-process parts back into the single-process order (file i came from part i % n).

    Yields each merged row (for the summary) while writing `out`; reads every part sequentially.
    """
    readers = [read_rows(p, topk) for p in parts]
    writer = RowWriter(out, topk, resume=False)
    writer.open()
    batch: list[dict] = []
    i = 0
    try:
        while True:
            row = next(readers[i % len(readers)], None)
            if row is None:  # parts differ in length by at most one row, earlier parts first
                break
            i += 1
            batch.append(row)
            yield row
            if len(batch) >= 1024:
                writer.write(batch)
                batch = []
        if batch:
            writer.write(batch)
    finally:
        writer.close()


def part_path(out: Path, fmt: str, rank: int, world: int) -> Path:
    return out.with_name(f"{out.name}.part-{rank}-of-{world}" + (".csv" if fmt == "csv" else ".jsonl"))


def marker_path(part: Path) -> Path:
    return part.with_name(part.name + ".done")


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # never a half-written record


def read_record(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"'{path}' is damaged; remove it (and the output it describes) or use --overwrite") from None


def check_same_run(record: dict, run: dict) -> None:
    """Resume only what the same model wrote from the same folder with the same settings."""
    if record.get("engine", "local") != run.get("engine", "local"):
        raise UserError(f"the output was written by the {record.get('engine', 'local')} engine; resume it with "
                        f"--engine {record.get('engine', 'local')}, or use --overwrite or a new output")
    if record.get("model_sha256") != run["model_sha256"]:
        raise UserError(f"the output was written with another model ({record.get('model')}); refusing to resume "
                        f"with '{run['model']}': predictions of two models would be mixed")
    for key, what in (("input_dir", "input folder"), ("world_size", "number of processes"), ("topk", "--topk"),
                      ("max_pixels", "--max-pixels"),
                      ("fallback", "--classes/--size/--mean/--std/--resize/--interpolation"),
                      ("format", "output format"), ("outputs", "--outputs"), ("chunk_size", "--chunk-size")):
        if record.get(key) != run.get(key):
            raise UserError(f"the output was written with another {what} ({record.get(key)!r}, now {run.get(key)!r}); "
                            "resume with the same settings, or use --overwrite or a new output")


def resume_or_overwrite(earlier: list, record: dict | None, run: dict, resume: bool, overwrite: bool,
                        record_name: str) -> str:
    """What to do with what an earlier run left behind, for both engines; never loses rows.

    `earlier`: the earlier run's outputs that exist (the first is named in errors); `record`: its run
    record, or None; `record_name`: where that record would be, for the message. Returns "overwrite"
    (--overwrite, which wins over --resume: the caller removes `earlier`), "resume" (--resume with a
    record of the same run; UserError from check_same_run when it is another model, input or setting) or
    "new" (nothing there, or --resume of nothing). Raises UserError for --resume of outputs without a
    record, and for existing outputs without --resume or --overwrite.
    """
    if overwrite:
        return "overwrite"
    if resume and record:
        check_same_run(record, run)
        return "resume"
    if resume and earlier:
        raise UserError(f"'{earlier[0]}' has no run record ({record_name}), so it cannot be checked against this "
                        "model; use --overwrite or a new output")
    if earlier:
        raise UserError(f"'{earlier[0]}' already exists; pass --resume to continue it or --overwrite to replace it")
    return "new"


def prepare(out: Path, sidecar: Path, target: Path, rank: int, resume: bool, overwrite: bool,
            record: dict | None, run: dict) -> None:
    """Check what an earlier run left behind: resume it, replace it (--overwrite), or refuse. Never lose rows."""
    mine = dict.fromkeys([target] + ([out, sidecar, staging_path(out)] if rank == 0 else []))  # its own files
    earlier = [p for p in mine if p.exists()]
    if resume_or_overwrite(earlier, record, run, resume, overwrite, sidecar.name) == "overwrite":
        for p in earlier:
            p.unlink()
    marker_path(target).unlink(missing_ok=True)


def merge(out: Path, final_rows: Path, fmt: str, world: int, run: dict, total: int, topk: int) -> Tally:
    """Main process: wait for every part of this run (`total` files), check it is whole, interleave them,
    remove the parts."""
    parts = [part_path(out, fmt, r, world) for r in range(world)]
    expected = [len(range(r, total, world)) for r in range(world)]
    waited = 0.0
    while True:  # the launcher stops the job if another process fails
        markers = [read_record(marker_path(p)) for p in parts]
        mine = [m is not None and m.get("run_id") == run["run_id"] for m in markers]
        if all(mine):
            break
        time.sleep(0.2)
        waited += 0.2
        if waited % 60 < 0.2 and waited > 1:
            log.info("waiting for %d of %d processes to finish their parts", world - sum(mine), world)
    for r, (m, n) in enumerate(zip(markers, expected)):
        if m["rows"] != n:
            raise UserError(f"process {r} answered {m['rows']} files, expected {n}: did the folder change during the run?")
    tally = Tally()
    for row in merge_parts(parts, final_rows, topk):
        tally.add(row)
    if tally.rows != total:
        raise UserError(f"the merged output has {tally.rows} rows for {total} files; the parts are kept for a look")
    for p in parts:
        p.unlink()
        marker_path(p).unlink()
    return tally
