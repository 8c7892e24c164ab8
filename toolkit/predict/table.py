"""The prediction table: its columns and their types (defined once, here), the one function that
builds its rows, and the writers: CSV or JSON Lines row by row, resumable after a crash, and Parquet.

Columns: path, label, score, error; with --topk K > 1 the ranked classes are one set of columns,
path, top1_label, top1_score, error, top2_label, top2_score, ... topK_score (the top class keeps its
place, and its name says it is the first of K). String columns hold "" when empty
(label of an error row, error of an ok row) and float columns hold null (CSV: an empty field).
Every writer and reader takes the columns and types from `columns()`, so a new column is one edit.

Every batch of rows is written with one write() and flushed, so a crash (even SIGKILL) can
only cut the last record short. `resume` reads the existing rows back, cuts a torn last
record away, and hands the rows to the caller to check against the files they answer.
Parquet output is staged as JSON Lines (resumable) and converted when the run completes.
torch-free.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from toolkit import UserError

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
SCORE_DECIMALS = 6  # probabilities are rounded to this many decimals in every format


@dataclass(frozen=True)
class Column:
    name: str
    type: type  # str: never null, "" when empty; float: null when absent

    @property
    def empty(self):
        return "" if self.type is str else None

    def parse(self, value):
        """A value read back from CSV (text) or JSON Lines (typed) -> this column's type."""
        if self.type is float:
            return None if value in ("", None) else float(value)
        return "" if value is None else str(value)


def columns(topk: int) -> list[Column]:
    """The columns, in order, of a table with `topk` classes per row."""
    first = "top1_" if topk > 1 else ""
    cols = [Column("path", str), Column(first + "label", str), Column(first + "score", float), Column("error", str)]
    for k in range(2, topk + 1):
        cols += [Column(f"top{k}_label", str), Column(f"top{k}_score", float)]
    return cols


def clip_topk(topk: int, num_classes: int, say: bool = True) -> int:
    """The top-k the rows have: --topk clipped to the model's number of classes; with `say`, a clipped value is
    logged once with the columns the rows will have (the caller passes say=True in one process only)."""
    if topk > num_classes and say:
        log.info("--topk %d: the model has %d classes, so the rows rank all %d (%s)", topk, num_classes, num_classes,
                 ", ".join(c.name for c in columns(num_classes)))
    return min(topk, num_classes)


def rows_for(paths: list[str], errors: list[str], probs: np.ndarray, classes: list[str], topk: int) -> list[dict]:
    """One row per file, in order: errors[i] is "" for a decoded file, which takes the next row of
    `probs` ((decoded, C) float probabilities), else the reason the file could not be used."""
    cols = columns(topk)
    best = np.argsort(-probs, axis=1, kind="stable")[:, :topk]
    rows, j = [], 0
    for path, error in zip(paths, errors):
        row = {c.name: c.empty for c in cols}
        row["path"], row["error"] = path, error
        if not error:
            for k, c in enumerate(best[j], 1):
                prefix = f"top{k}_" if topk > 1 else ""
                row[prefix + "label"], row[prefix + "score"] = classes[c], round(float(probs[j, c]), SCORE_DECIMALS)
            j += 1
        rows.append(row)
    return rows


def top_class(row: dict) -> tuple[str, float | None]:
    """(label, score) of a row's top class, whichever the table's top-k: label/score or top1_label/top1_score."""
    return (row["label"], row["score"]) if "label" in row else (row["top1_label"], row["top1_score"])


def arrow_schema(topk: int):
    """The table's Parquet (Arrow) schema, from `columns(topk)`: str -> string, float -> float64 (nullable)."""
    import pyarrow as pa

    return pa.schema([(c.name, pa.float64() if c.type is float else pa.string()) for c in columns(topk)])


def arrow_text(v):
    """Arrow strings must be valid UTF-8: undecodable file-name bytes become \\xNN."""
    return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if isinstance(v, str) else v


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
    """(raw row, byte offset just after it) for each complete record; a torn last record is not yielded.
    CSV yields its header first as {"__header__": names}."""
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
        self.names = [c.name for c in self.columns]
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
            names = row.get("__header__", list(row))
            if names != self.names:
                raise UserError(f"'{self.path}' has columns {','.join(names)}; this run writes "
                                f"{','.join(self.names)} (same --topk as before?)")
            if "__header__" not in row:
                yield _typed(row, self.columns)

    def open(self) -> None:
        if self.resume:
            with open(self.path, "r+b") as f:
                f.truncate(self.end)  # drop a torn last record
        # surrogateescape: a file name that is not UTF-8 is written back as its own bytes
        self.file = open(self.path, "a" if self.resume else "w", newline="", encoding="utf-8", errors="surrogateescape")
        if not self.jsonl and (not self.resume or self.end == 0):
            csv.writer(self.file).writerow(self.names)
        self.file.flush()

    def write(self, rows: list[dict]) -> None:
        """Write rows holding exactly this table's columns (as rows_for makes them)."""
        buf = io.StringIO(newline="")
        for row in rows:
            if list(row) != self.names:
                raise ValueError(f"row columns {list(row)} are not the table's {self.names}")
        if self.jsonl:
            buf.write("".join(json.dumps(r) + "\n" for r in rows))
        else:  # None (an absent score) is an empty field
            csv.writer(buf).writerows([["" if v is None else v for v in r.values()] for r in rows])
        self.file.write(buf.getvalue())  # one write per batch: a crash can tear at most the last record
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _typed(row: dict, cols: list[Column]) -> dict:
    return {c.name: c.parse(row.get(c.name)) for c in cols}


def read_rows(path: Path, topk: int | None = None) -> Iterator[dict]:
    """The rows of a CSV or JSON Lines table, typed per `columns(topk)` (topk None: from the columns found)."""
    fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    cols = columns(topk) if topk else None
    for row, _ in _records(path, fmt):
        names = row.get("__header__", list(row))
        cols = cols or columns(max(1, sum(1 for n in names if n.endswith("_label"))))
        if "__header__" not in row:
            yield _typed(row, cols)


def to_parquet(staged: Path, out: Path, topk: int, chunk: int = 50_000) -> None:
    """Convert the staged JSON Lines to Parquet in chunks (bounded memory), then remove the staging file.
    Column types come from `columns(topk)`: str -> string, float -> float64 (nullable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(topk)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = pq.ParquetWriter(str(tmp), schema)
    try:
        rows = []
        for row in read_rows(staged, topk):
            rows.append({k: arrow_text(v) for k, v in row.items()})
            if len(rows) >= chunk:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
        writer.close()
        tmp.replace(out)
    finally:
        writer.close()
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
            self.labels[top_class(row)[0]] += 1

    def summary(self, output: Path) -> dict:
        return {"ok": sum(self.labels.values()), "failed": sum(self.errors.values()), "output": str(output),
                "per_class": dict(sorted(self.labels.items())), "errors": dict(self.errors.most_common())}
