"""How the toolkit writes its bookkeeping: atomically, or as an append-only log read tolerantly.

Every file is either replaced atomically (a temporary `.<name>.tmp-<pid>` beside it, fsync,
rename) or is a JSON Lines log that only grows by whole lines; a crash (or a full disk) can
then only cut the log's last line short, and every reader drops such a torn line (and the
next append cuts it away first). A failing write becomes one sentence naming the file.

Also the checks on a path that messages share: `inside` (an output inside the folder a command reads
is refused) and `absent` (why a path is not the file or folder expected), and `printable` names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator

from toolkit import UserError

log = logging.getLogger(__name__)


def printable(text: str) -> str:
    """`text` as valid Unicode for people (reports, pictures, the terminal): bytes of a file or class name that
    are not UTF-8 (kept as surrogates by os.fsdecode) are shown as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def absent(path: str | Path, folder: bool = True) -> str:
    """Why `path` is no folder (`folder`) or no file: 'does not exist', or the other kind it is, for messages."""
    path = Path(path)
    if folder and path.is_file():
        return "is a file, not a folder"
    return "is a folder, not a file" if not folder and path.is_dir() else "does not exist"


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or lies under it, '..' and symlinks resolved (neither needs to exist):
    an output there would replace or join the files the command (or the next run) reads as input."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or path.is_relative_to(folder)


def temp_path(path: Path, tag: str = "tmp") -> Path:
    """The temporary name of `path` while it is written by this process (see core.lock.remove_stale_temps)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}")


def _reason(e: BaseException) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
    return text[:160]


@contextlib.contextmanager
def writing(path: str | Path, what: str = "") -> Iterator[None]:
    """Turn any failure while writing `path` into a UserError naming it (and a full disk as such).

    Writers raise many types for the same cause: OSError, torch's RuntimeError, SafetensorError.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        path = Path(path)
        try:
            free = shutil.disk_usage(next(p for p in [path, *path.parents] if p.exists())).free
        except (OSError, StopIteration):
            free = None
        hint = "; the disk is full" if free is not None and free < 1 << 20 else ""
        raise UserError(f"cannot write {what + ' ' if what else ''}'{path}' ({_reason(e)}{hint})") from e


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` (str: UTF-8, undecodable file-name bytes kept) so a reader sees old or new."""
    path = Path(path)
    tmp = temp_path(path)
    with writing(path):
        try:
            with open(tmp, "wb") as f:
                f.write(data if isinstance(data, bytes) else data.encode("utf-8", "surrogateescape"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line with a single write, after cutting away a torn last line."""
    path = Path(path)
    line = (json.dumps(record) + "\n").encode()
    with writing(path):
        with open(path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # a torn line from a crash: keep only complete lines
                    f.truncate(_complete_length(f, end))
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _complete_length(f, end: int, block: int = 1 << 16) -> int:
    """Bytes up to and including the last newline of the open file `f` of length `end`."""
    pos = end
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON Lines log; a torn last line (no newline, or not JSON) is dropped.

    A damaged line elsewhere is an error naming the file and line. A missing file has no records.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"cannot read '{path}' ({e.strerror or e})") from None
    lines = raw.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    if torn:
        log.warning("'%s' ends with a torn line (an interrupted write); it is ignored", path)
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) and not torn:  # the last line, cut inside by a crash before its newline was lost
                log.warning("'%s' ends with a damaged line; it is ignored", path)
                break
            raise UserError(f"'{path}' is damaged at line {i}; remove or repair that line") from None
        if not isinstance(rec, dict):
            raise UserError(f"'{path}' line {i} is not a JSON object")
        records.append(rec)
    return records


def rewrite_jsonl(path: str | Path, records: list[dict]) -> None:
    """Replace a JSON Lines log with `records`, atomically."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
