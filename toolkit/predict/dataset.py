"""Prediction output as a Parquet dataset: one part file per chunk of the walk, named by the chunk's id.

The walk (images.iter_images) is cut into chunks of `chunk_size` files; chunk i answers files
[i * chunk_size, (i + 1) * chunk_size) and is written, whole or not at all, as `part-{i:08d}.parquet`.
A part that exists is therefore complete, so a retried or resumed chunk is simply written again or
skipped, and the dataset holds exactly one row per file. `finish` reads the parts back in chunk order,
checks that they answer exactly the listed files, and merges them into one CSV / JSON Lines / Parquet
file when the output names one. Engine-independent: the Ray engine writes the parts.
"""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from toolkit import UserError
import toolkit.predict.table as table
from toolkit.predict.storage import Location

PART = re.compile(r"^part-(\d{8})\.parquet$")
TORN = re.compile(r"^\.part-\d{8}\.parquet\.tmp-\d+$")  # a local part whose writer was killed
RECORD_NAME = "_run.json"  # inside a dataset folder; '_' makes Parquet readers skip it


def part_name(chunk: int) -> str:
    return f"part-{chunk:08d}.parquet"


@dataclass
class Layout:
    """Where a run's pieces live: the part files, the run record, and the merged file if one was asked for."""

    output: Location
    parts: Location  # folder of part files
    record: Location  # the run record (JSON)
    merged: str | None  # "csv", "jsonl" or "parquet"; None: the dataset folder is the output


def layout(output: str | Path) -> Layout:
    """OUTPUT ending in .csv/.jsonl/.parquet: parts in OUTPUT.parts/, merged into OUTPUT at the end;
    anything else is a dataset folder that keeps its parts and holds its record as _run.json."""
    out = Location(output)
    fmt = table.FORMATS.get(Path(str(out)).suffix.lower())
    if fmt:
        table.format_of(Path(str(out)))  # parquet without pyarrow: the usual one-line error
        return Layout(out, out.sibling(".parts"), out.sibling(".run.json"), fmt)
    return Layout(out, out, out.child(RECORD_NAME), None)


def listing_digest(paths: Iterable[str]) -> str:
    """sha256 over the walk, to recognise the same input on resume (names as bytes, one per line)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def done_chunks(parts: Location) -> set[int]:
    """Ids of the chunks whose part file exists (each is complete: parts are written whole)."""
    return {int(m.group(1)) for m in map(PART.match, parts.names()) if m}


def encode_part(rows: list[dict], topk: int) -> bytes:
    """Rows (the table's row builder) -> the bytes of one Parquet part, in the table's Parquet schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    values = [{k: table.arrow_text(v) for k, v in r.items()} for r in rows]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(values, schema=table.arrow_schema(topk)), buf)
    return buf.getvalue()


def _read_part(parts: Location, chunk: int):
    import pyarrow.parquet as pq

    loc = parts.child(part_name(chunk))
    try:
        return pq.read_table(io.BytesIO(loc.read_bytes()))
    except FileNotFoundError:
        raise UserError(f"'{loc}' is missing: the run is not complete; continue it with --resume") from None


def finish(lay: Layout, chunks: list[list[str]], topk: int) -> table.Tally:
    """Check the parts answer every listed file once, in order; merge them when asked; -> the tally."""
    for name in lay.parts.names():
        if TORN.match(name):
            lay.parts.child(name).remove()
    with tempfile.TemporaryDirectory(prefix="toolkit-merge-") as tmp:
        name = Path(str(lay.output)).name
        # never a half-written output: beside it and renamed (local), or whole in one upload (URL)
        hidden = f".{name}.tmp{Path(name).suffix}"  # the writers tell the format from the suffix
        staged = Path(tmp) / name if lay.output.url else Path(str(lay.output)).with_name(hidden)
        try:
            tally = _check_and_merge(lay, chunks, topk, staged)
            if lay.merged and lay.output.url:
                lay.output.upload(staged)
            elif lay.merged:
                staged.replace(Path(str(lay.output)))
        finally:
            staged.unlink(missing_ok=True)
    return tally


def _check_and_merge(lay: Layout, chunks: list[list[str]], topk: int, staged: Path) -> table.Tally:
    tally, cols = table.Tally(), [c.name for c in table.columns(topk)]
    writer = parquet = None
    if lay.merged in ("csv", "jsonl"):
        writer = table.RowWriter(staged, topk, resume=False)
        writer.open()
    elif lay.merged == "parquet":
        import pyarrow.parquet as pq

        staged.parent.mkdir(parents=True, exist_ok=True)
        parquet = pq.ParquetWriter(str(staged), table.arrow_schema(topk))
    try:
        for i, files in enumerate(chunks):
            part = _read_part(lay.parts, i)
            where = lay.parts.child(part_name(i))
            if part.column_names != cols:
                raise UserError(f"'{where}' has columns {','.join(part.column_names)}; this run writes {','.join(cols)}")
            rows = part.to_pylist()
            if [r["path"] for r in rows] != [table.arrow_text(f) for f in files]:
                raise UserError(f"'{where}' does not answer chunk {i} of the listing (written by another run?); "
                                "use --overwrite or a new output")
            # the listing's own names: a file name that is not UTF-8 comes back as its exact bytes
            for r, f in zip(rows, files):
                r["path"] = f
            for r in rows:
                tally.add(r)
            if writer:
                writer.write(rows)
            elif parquet:
                parquet.write_table(part)
    finally:
        if writer:
            writer.close()
        if parquet:
            parquet.close()
    return tally
