"""Prediction tables: CSV or JSON Lines written row by row, resumable after a crash, merged from parts.

Every batch of rows is written with one write() and flushed, so a crash (even SIGKILL) can
only cut the last record short. `resume` reads the existing rows back, cuts a torn last
record away, and hands the rows to the caller to check against the files they answer.
Parquet output is staged as JSON Lines (resumable) and converted when the run completes.
numpy-free, torch-free.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterator

from toolkit import UserError

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


def columns(topk: int) -> list[str]:
    cols = ["path", "label", "score", "error"]
    for k in range(1, topk + 1) if topk > 1 else ():
        cols += [f"top{k}_label", f"top{k}_score"]
    return cols


def format_of(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"output '{path}' must end in .csv, .jsonl or .parquet")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("writing .parquet needs pyarrow (pip install pyarrow); or use .csv or .jsonl") from None
    return fmt


def staging_path(path: Path) -> Path:
    """Where rows are written while the run is in progress (Parquet is staged as JSON Lines)."""
    return path.with_name(path.name + ".partial.jsonl") if format_of(path) == "parquet" else path


def _records(path: Path, fmt: str) -> Iterator[tuple[dict, int]]:
    """(row, byte offset just after it) for each complete record; a torn last record is not yielded."""
    with open(path, "rb") as f:
        offset = 0
        if fmt == "jsonl":
            for line in f:
                if not line.endswith(b"\n"):
                    return  # cut short by a crash
                offset += len(line)
                if line.strip():
                    try:
                        yield json.loads(line), offset
                    except json.JSONDecodeError:
                        raise UserError(f"'{path}' is damaged near byte {offset}; cannot resume it") from None
            return
        state = {"offset": 0, "ended": True}

        def lines():
            for line in f:
                state["offset"] += len(line)
                state["ended"] = line.endswith(b"\n")
                yield line.decode("utf-8", "surrogateescape")  # file names need not be UTF-8

        reader = csv.reader(lines(), strict=True)  # strict: end of file inside quotes is an error, not a row
        try:
            header = next(reader, None)
            if header is None or not state["ended"]:  # empty, or cut inside the header: start afresh
                return
            yield {"__header__": header}, state["offset"]
            for values in reader:
                if not state["ended"]:  # the file ends inside this record: torn
                    return
                yield dict(zip(header, values)), state["offset"]
        except csv.Error:  # a record cut inside a quoted field, at the very end only
            if f.read(1):
                raise UserError(f"'{path}' is damaged near byte {state['offset']}; cannot resume it") from None
            return


class RowWriter:
    """Appends rows to a CSV or JSON Lines file; `existing_rows()` first, when resuming."""

    def __init__(self, path: Path, topk: int, resume: bool):
        self.path, self.columns = path, columns(topk)
        self.jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
        self.resume = resume and path.exists() and path.stat().st_size > 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.end = 0  # byte offset after the last complete record read back

    def existing_rows(self) -> Iterator[dict]:
        """Rows already written (resume only), streamed; the file is cut after the last complete one."""
        if not self.resume:
            return
        for row, offset in _records(self.path, "jsonl" if self.jsonl else "csv"):
            self.end = offset
            if "__header__" in row:
                if row["__header__"] != self.columns:
                    raise UserError(f"'{self.path}' has columns {','.join(row['__header__'])}; this run writes "
                                    f"{','.join(self.columns)} (same --topk as before?)")
                continue
            yield row

    def open(self) -> None:
        if self.resume:
            with open(self.path, "r+b") as f:
                f.truncate(self.end)  # drop a torn last record
        # surrogateescape: a file name that is not UTF-8 is written back as its own bytes
        self.file = open(self.path, "a" if self.resume else "w", newline="", encoding="utf-8", errors="surrogateescape")
        if not self.jsonl:
            self.csv = csv.writer(self.file)
            if not self.resume or self.end == 0:
                self.csv.writerow(self.columns)
        self.file.flush()

    def write(self, rows: list[dict]) -> None:
        buf = io.StringIO(newline="")
        if self.jsonl:
            buf.write("".join(json.dumps(r) + "\n" for r in rows))
        else:
            csv.writer(buf).writerows([[r.get(c, "") for c in self.columns] for r in rows])
        self.file.write(buf.getvalue())  # one write per batch: a crash can tear at most the last record
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_rows(path: Path) -> Iterator[dict]:
    fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    for row, _ in _records(path, fmt):
        if "__header__" not in row:
            yield row


def to_parquet(staged: Path, out: Path, chunk: int = 50_000) -> None:
    """Convert the staged JSON Lines to Parquet in chunks (bounded memory), then remove the staging file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = out.with_name(f".{out.name}.tmp")
    cols = None
    writer, rows = None, []

    def flush():
        nonlocal writer, rows
        schema = pa.schema([(c, pa.float64() if c.endswith("score") else pa.string()) for c in cols])
        if writer is None:
            writer = pq.ParquetWriter(str(tmp), schema)
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        rows = []

    def text(v):  # Arrow strings must be valid UTF-8: undecodable file-name bytes become \xNN
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if isinstance(v, str) else v

    try:
        for row in read_rows(staged):
            cols = cols or list(row)
            rows.append({k: (None if v == "" else text(v)) for k, v in row.items()})
            if len(rows) >= chunk:
                flush()
        if cols is None:
            cols = columns(1)
        if rows or writer is None:
            flush()
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    staged.unlink()





class Tally:
    """Counts per predicted class and per error reason (the summary), from rows."""

    def __init__(self):
        self.labels, self.errors = Counter(), Counter()

    @property
    def rows(self) -> int:
        return sum(self.labels.values()) + sum(self.errors.values())

    def add(self, row: dict) -> None:
        if row["error"]:
            self.errors[row["error"].split(" (")[0]] += 1
        else:
            self.labels[row["label"]] += 1

    def summary(self, output: Path) -> dict:
        return {"ok": sum(self.labels.values()), "failed": sum(self.errors.values()), "output": str(output),
                "per_class": dict(sorted(self.labels.items())), "errors": dict(self.errors.most_common())}


