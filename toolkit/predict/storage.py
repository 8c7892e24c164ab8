"""Where prediction reads and writes: local paths, or URLs of object storage (s3://, gs://, abfs://, ...).

URLs are opened with fsspec (s3fs, gcsfs or adlfs, whichever is installed: `pip install 'toolkit[storage]'`
brings s3fs); credentials and the endpoint come from the standard variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS, ...). A folder in a bucket is
walked in the same order as a local one (core/images.iter_images over sorted keys), so chunks, resume
and the row order stay exact. Writes are whole or absent: a local file is written beside its name and
renamed; an object store publishes an object only when its upload has finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

from toolkit import UserError
from toolkit.core import images

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")  # two letters at least: C:\ is a local path


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and bool(_SCHEME.match(location))


def _open(url: str):
    """(fsspec filesystem, path inside it) for `url`; a missing driver is a one-line error."""
    try:
        import fsspec
    except ImportError:
        raise UserError(f"'{url}' is a URL: object storage needs fsspec and its driver "
                        "(pip install 'toolkit[storage]' for s3://)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot open '{url}' ({e})") from None


class Location:
    """A local path or a URL, with the few operations prediction needs. Picklable: the filesystem is
    opened again in each process (fsspec's async filesystems do not survive a fork)."""

    def __init__(self, location: str | Path):
        self.url = is_url(location)
        self.text = str(location).rstrip("/") if self.url else os.fspath(location)
        self._fs = None  # (pid, filesystem, path)

    def __getstate__(self):
        return {"url": self.url, "text": self.text, "_fs": None}

    def __str__(self) -> str:
        return self.text

    @property
    def fs(self):
        if self._fs is None or self._fs[0] != os.getpid():
            self._fs = (os.getpid(), *_open(self.text))
        return self._fs[1]

    @property
    def path(self) -> str:
        """The path inside the filesystem (a bucket key prefix for a URL)."""
        if not self.url:
            return self.text
        self.fs  # opens it in this process
        return self._fs[2]

    def child(self, name: str) -> "Location":
        return Location(f"{self.text}/{name}" if self.url else os.path.join(self.text, name))

    def sibling(self, suffix: str) -> "Location":
        """The location named like this one plus `suffix` (e.g. '.run.json')."""
        return Location(self.text + suffix)

    def canonical(self) -> str:
        """What the run record keeps to recognise the same input again."""
        return self.text if self.url else str(Path(self.text).resolve())

    # --- reading ---------------------------------------------------------------------------

    def is_dir(self) -> bool:
        if not self.url:
            return Path(self.text).is_dir()
        self.fs.invalidate_cache(self.path)
        return self.fs.isdir(self.path)

    def exists(self) -> bool:
        return self.fs.exists(self.path) if self.url else os.path.lexists(self.text)

    def read_bytes(self) -> bytes:
        if self.url:
            return self.fs.cat_file(self.path)
        return Path(self.text).read_bytes()

    def read_json(self) -> dict | None:
        """The JSON object stored here, None when there is none; damaged = a UserError."""
        try:
            text = self.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None
        try:
            return json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"'{self}' is damaged; remove it (and the output it describes) or use --overwrite") from None

    def names(self) -> list[str]:
        """Names of the files directly inside this folder (none when it does not exist)."""
        if not self.url:
            try:
                return sorted(e.name for e in os.scandir(self.text) if e.is_file())
            except FileNotFoundError:
                return []
        self.fs.invalidate_cache(self.path)
        if not self.fs.isdir(self.path):
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.path, detail=True)
                      if e["type"] == "file")

    def iter_images(self, skipped: Counter | None = None) -> Iterator[str]:
        """Image-looking files under this folder, relative to it, in the local walk's order; other files are
        counted by extension into `skipped` (see core/folders.iter_images)."""
        if not self.url:
            return images.iter_images(self.text, skipped)
        self.fs.invalidate_cache(self.path)  # a resumed run must see the bucket as it is now

        def list_dir(rel: str) -> list[tuple[str, bool]]:
            found: dict[str, bool] = {}  # a key and a "folder" prefix of the same name are one entry
            for e in self.fs.ls(f"{self.path}/{rel}".rstrip("/"), detail=True):
                name = e["name"].rstrip("/").rsplit("/", 1)[-1]
                found[name] = found.get(name, False) or e["type"] == "directory"
            return list(found.items())

        return images.iter_images(self.text, skipped, list_dir)

    def read_files(self, rels: list[str]) -> list:
        """The bytes of each file under this folder, or a DecodeError saying why it could not be read."""
        full = [f"{self.path}/{r}" for r in rels]
        got = self.fs.cat(full, on_error="return")  # concurrent requests (s3fs, gcsfs are asynchronous)
        out = []
        for p in full:
            v = got.get(p, FileNotFoundError(p))
            if isinstance(v, bytes):
                out.append(v)
            elif isinstance(v, FileNotFoundError):
                out.append(images.DecodeError("missing or dangling link"))
            elif isinstance(v, IsADirectoryError):
                out.append(images.DecodeError("is a folder"))
            elif isinstance(v, PermissionError):
                out.append(images.DecodeError("permission denied"))
            else:
                out.append(images.DecodeError(f"unreadable ({str(v).splitlines()[0][:120] if str(v) else type(v).__name__})"))
        return out

    def decode(self, rels: list[str], prep: images.Preprocess) -> images.Batch:
        """The shared preprocessing of files under this folder; never raises for a bad file."""
        if not self.url:
            return images.decode_chunk(rels, self.text, prep)
        return images.decode_chunk(rels, "", prep, self.read_files(rels))

    # --- writing ---------------------------------------------------------------------------

    def write_bytes(self, data: bytes) -> None:
        """Whole or absent, never torn: a local file is renamed into place, an object is one upload."""
        if self.url:
            self.fs.pipe_file(self.path, data)
            return
        path = Path(self.text)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # dot: readers of the folder skip it
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write_json(self, data: dict) -> None:
        self.write_bytes(json.dumps(data).encode())

    def make_dir(self) -> None:
        """Create this folder (locally; object stores have no folders, only names)."""
        if not self.url:
            Path(self.text).mkdir(parents=True, exist_ok=True)

    def upload(self, local: Path) -> None:
        """Copy the finished local file `local` here (a URL), in one upload."""
        self.fs.put_file(str(local), self.path)

    def remove(self) -> None:
        """Remove this file or folder (with what is inside) if it exists."""
        if self.url:
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)
        elif os.path.isdir(self.text) and not os.path.islink(self.text):
            import shutil

            shutil.rmtree(self.text)
        elif os.path.lexists(self.text):
            os.unlink(self.text)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def staging_dir(url: str) -> Path:
    """A local folder for the local engine's copy of a URL output while it is written (resumable here)."""
    base = Path(os.environ.get("TOOLKIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                / "toolkit")
    return base / "predict-staging" / hashlib.sha256(url.encode()).hexdigest()[:16]
