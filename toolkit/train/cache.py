"""Decode a list of image files once, in parallel, into one uint8 array, cached on disk.

The cache key is a fingerprint of everything that decides the pixels: the file list with
each file's size and modification time, and every decode setting (core.meta.Preprocess: the image
size, the resize policy and filter, the pixel cap). A changed, added or removed file changes the key,
so a stale cache is never served.
Location: data.cache_dir, else $TOOLKIT_CACHE_DIR, else ~/.cache/toolkit (XDG_CACHE_HOME
respected). Entries are written to a temporary folder and renamed, so a crash never
leaves a half-written entry that looks complete. The marker records the shape and byte size
of each array; an entry that does not match its marker, or does not load, is decoded again.
Arrays are loaded with allow_pickle=False: a cache entry is data, never code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from toolkit.config import DataConfig
from toolkit.core import folders, images
from toolkit.core.lock import remove_stale_temps
from toolkit.core.progress import progress_bar

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # bump when decoding in core/images.py changes (3: any transparency over white, float TIFFs)
CHUNK = 256  # files per batch sent to a decode worker


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    if os.environ.get("TOOLKIT_CACHE_DIR"):
        return Path(os.environ["TOOLKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "toolkit"


def fingerprint(files: list[str], cfg: DataConfig) -> str:
    h = hashlib.sha256()
    # every decode setting, in Preprocess's field order: the same key as before it was one object
    h.update(json.dumps([CACHE_VERSION, *dataclasses.astuple(cfg.decoding())]).encode())
    for f, full in zip(files, folders.abspaths(files)):
        name = os.fsencode(full)  # file names need not be UTF-8: hash their bytes
        try:
            st = os.stat(f)
            h.update(name + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(name + b"\0missing\n")
    return h.hexdigest()[:24]


def decode(files: list[str], cfg: DataConfig, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Decode `files` with the shared preprocessing -> ((N, 3, H, W) uint8, (N,) bool ok)."""
    prep = cfg.decoding()
    size = prep.size
    out = np.zeros((len(files), 3, size, size), dtype=np.uint8)
    ok = np.zeros(len(files), dtype=bool)
    pos = 0
    bar = progress_bar(len(files), f"decoding {len(files)} images")
    for batch in images.decode_batches("", files, prep, CHUNK, workers):
        n = len(batch.paths)
        ok[pos : pos + n] = batch.ok
        out[pos : pos + n][batch.ok] = batch.pixels.transpose(0, 3, 1, 2)
        pos += n
        bar.update(n)
    bar.close()
    return out, ok


def _load_entry(entry: Path, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """A cache entry's arrays, checked against its marker and the expected shape; ValueError if they differ."""
    marker = json.loads((entry / "done").read_text())
    arrays = marker.get("arrays") if isinstance(marker, dict) else None
    if not isinstance(arrays, dict):
        raise ValueError("its marker records no array sizes")
    expected = {"images.npy": (list(shape), "uint8"), "ok.npy": ([shape[0]], "bool")}
    loaded = []
    for name, (want_shape, want_dtype) in expected.items():
        info = arrays.get(name) or {}
        size = (entry / name).stat().st_size
        if info.get("bytes") != size or info.get("shape") != want_shape or info.get("dtype") != want_dtype:
            raise ValueError(f"{name} is {size} bytes, its marker says {info.get('bytes')}")
        a = np.load(entry / name, mmap_mode="r" if name == "images.npy" else None, allow_pickle=False)
        if list(a.shape) != want_shape or str(a.dtype) != want_dtype:
            raise ValueError(f"{name} holds {a.dtype} {a.shape}, expected {want_dtype} {tuple(want_shape)}")
        loaded.append(a)
    return loaded[0], loaded[1]


def decode_cached(files: list[str], cfg: DataConfig, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`decode`, served from the on-disk cache when the fingerprint matches."""
    key = fingerprint(files, cfg)
    entry = cache_root(cfg) / key
    if (entry / "done").exists():
        try:
            x, ok = _load_entry(entry, (len(files), 3, cfg.image_size, cfg.image_size))
            log.info("decoded images from cache %s (%d files)", entry, len(files))
            return x, ok
        except (OSError, ValueError, EOFError) as e:  # EOFError: a truncated .npy header
            log.warning("decode cache entry %s is damaged (%s); decoding again", entry, str(e)[:120])
            shutil.rmtree(entry, ignore_errors=True)
    start = time.perf_counter()
    x, ok = decode(files, cfg, workers)
    log.info("decoded %d images in %.1f s; caching in %s", len(files), time.perf_counter() - start, entry)
    remove_stale_temps(entry.parent)
    tmp = entry.with_name(f".{key}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "images.npy", x)
        np.save(tmp / "ok.npy", ok)
        marker = {"files": len(files), "created": time.time(),
                  "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype),
                                    "bytes": (tmp / name).stat().st_size}
                             for name, a in (("images.npy", x), ("ok.npy", ok))}}
        (tmp / "done").write_text(json.dumps(marker))
        if not (entry / "done").exists():  # else another process finished the same entry first
            shutil.rmtree(entry, ignore_errors=True)  # a leftover without its marker is not trusted
            os.replace(tmp, entry)
        shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a read-only or full cache location must not stop training
        log.warning("could not write the decode cache at %s (%s); continuing without it", entry, e)
        shutil.rmtree(tmp, ignore_errors=True)
    return x, ok
