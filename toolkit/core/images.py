"""Image files: finding them, decoding them, and the one preprocessing definition.

decode -> RGB uint8 -> resize (policy, filter) is defined here once and used by training's
validation, the export check and prediction, so that `predict` sees exactly the pixels
that validation saw. Its settings (size, policy, filter, pixel cap) travel as one
meta.Preprocess. Normalisation (mean/std) happens later, on the device or inside
the exported graph. numpy and PIL only: predict imports this without torch.
"""

from __future__ import annotations

import io
import logging
import os
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

from toolkit.core import formats
from toolkit.core.folders import Labelled, find_images, find_labelled, iter_images  # noqa: F401  (this module's API)
from toolkit.core.formats import image_extensions, is_image_name  # noqa: F401  (this module's API)
from toolkit.core.meta import (DEFAULT_INTERPOLATION, INTERPOLATIONS, MAX_PIXELS, RESIZE_POLICIES,  # noqa: F401 (API)
                                Preprocess)

log = logging.getLogger(__name__)
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}  # Meta.interpolation -> PIL
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey
Image.MAX_IMAGE_PIXELS = None  # PIL's own bomb check is replaced by open_rgb's max_pixels, checked first


class DecodeError(Exception):
    """A file that cannot be turned into an RGB image; the message is a short reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: every kind of transparency over white, deep samples to 8 bits, CMYK converted.

    Transparency of any kind takes the one alpha path: an alpha band (RGBA, LA, PA, ...), palette
    alpha, or a PNG tRNS colour key in a palette, RGB, grey, 1-bit or 16-bit grey image (PIL keeps
    a key in info["transparency"] and leaves the key colour in the pixels).
    """
    key = img.info.get("transparency")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):  # deep grey: formats.to_uint8's rule
        a = np.asarray(img)
        grey = Image.fromarray(formats.to_uint8(a), "L")
        if not isinstance(key, (int, float)):
            return grey.convert("RGB")
        alpha = Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8), "L")  # the key, at full depth
        img = Image.merge("LA", (grey, alpha))
    elif img.mode == "RGB" and isinstance(key, tuple) and max(key) > 255:
        img.info["transparency"] = tuple(v >> 8 for v in key)  # a 16-bit RGB key; PIL kept each sample's high byte
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _needs_exif_transpose(img: Image.Image) -> bool:
    """Only files that carry EXIF data can have an orientation tag (parsing it costs ~60 us)."""
    return img.format in ("TIFF", "MPO") or "exif" in img.info or "Raw profile type exif" in img.info


def open_rgb(path: str | Path | bytes, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode `path` (or the bytes of a file, e.g. read from object storage) as an RGB image, first
    frame, EXIF orientation applied.

    Raises DecodeError with a short reason. The pixel cap is checked from the header,
    before any pixel data is decoded. `draft_size` lets JPEG decode at a reduced scale
    (never below that size on the shorter side), which is much faster for big photos.
    """
    if isinstance(path, bytes):
        if not path:
            raise DecodeError("empty file")
        path = io.BytesIO(path)
    else:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DecodeError("missing or dangling link") from None
        except OSError as e:
            raise DecodeError(f"unreadable ({e.strerror or e})") from None
        if stat.S_ISDIR(st.st_mode):
            raise DecodeError("is a folder")
        if st.st_size == 0:
            raise DecodeError("empty file")
    try:
        try:
            img = Image.open(path)
        except Image.UnidentifiedImageError:
            img = _open_unidentified(path, max_pixels)
        if formats.pil_misreads(img):
            img = _open_unidentified(path, max_pixels)
        w, h = img.size
        if w * h > max_pixels:
            raise DecodeError(f"too many pixels ({w}x{h} > {max_pixels})")
        if draft_size and img.format == "JPEG":
            scale = draft_size / min(w, h)
            img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()
        if _needs_exif_transpose(img):
            img = ImageOps.exif_transpose(img) or img
        return _to_rgb(img)
    except DecodeError:
        raise
    except PermissionError:
        raise DecodeError("permission denied") from None
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "not available" in reason or "Ghostscript" in reason:  # PIL knows the format, this install cannot decode it
            raise DecodeError(f"unsupported image format ({reason})") from None
        if "truncated" in reason.lower() or isinstance(e, EOFError):
            reason = "truncated image"
        raise DecodeError(f"corrupt image ({reason})") from None


def _open_unidentified(path, max_pixels: int) -> Image.Image:
    """A file PIL does not identify: a TIFF variant read with tifffile, a named unsupported format, or not an image."""
    fmt = formats.unsupported_format(path)
    if fmt is None:
        raise DecodeError("not an image")
    if fmt != "TIFF":
        raise DecodeError(f"unsupported image format ({fmt}: this install has no decoder for it)")
    try:
        return formats.read_tiff(path, max_pixels)
    except ImportError:
        raise DecodeError("unsupported image format (a TIFF variant PIL cannot read: pip install tifffile)") from None
    except formats.Unsupported as e:
        raise DecodeError(f"unsupported image format ({e})") from None
    except formats.TooLarge as e:
        raise DecodeError(str(e)) from None
    except Exception as e:  # tifffile's own errors: a damaged TIFF
        raise DecodeError(f"corrupt image ({str(e).splitlines()[0][:100] if str(e) else type(e).__name__})") from None


def normalization(mean, std, scale: float = 1 / 255) -> tuple[np.ndarray, np.ndarray]:
    """(gain, shift), (3,) float32 each, so that x * gain + shift == (x * scale - mean) / std: the one
    normalisation of training and the ONNX graph (batches.Normalize), predict and `toolkit inspect`."""
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)  # constants folded in float64
    return (scale / std).astype(np.float32), (-mean / std).astype(np.float32)


def resize(img: Image.Image, prep: Preprocess) -> np.ndarray:
    """RGB PIL image -> (prep.size, prep.size, 3) uint8, by prep.resize with the filter prep.interpolation.

    center_crop: scale the shorter side to `size` and cut the centre square.
    squash: scale both sides to `size`, ignoring the aspect ratio.
    interpolation: PIL's bilinear or bicubic filter (FILTERS); downscaling is antialiased (PIL's filters
    widen with the scale). Raises ValueError for an unknown policy or filter.
    """
    w, h = img.size
    size, policy, interpolation = prep.size, prep.resize, prep.interpolation
    if interpolation not in FILTERS:
        raise ValueError(f"unknown interpolation '{interpolation}'; use one of {', '.join(FILTERS)}")
    if (w, h) != (size, size):
        if policy == "squash":
            img = img.resize((size, size), FILTERS[interpolation])
        elif policy == "center_crop":  # resample only the centre square: no huge intermediate for thin images
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            img = img.resize((size, size), FILTERS[interpolation], box=(left, top, left + side, top + side))
        else:
            raise ValueError(f"unknown resize policy '{policy}'; use one of {', '.join(RESIZE_POLICIES)}")
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def load(path: str | Path | bytes, prep: Preprocess) -> np.ndarray:
    """The preprocessing definition: file (a path or its bytes) -> (prep.size, prep.size, 3) uint8 RGB.
    Raises DecodeError."""
    img = open_rgb(path, max_pixels=prep.max_pixels, draft_size=prep.size)
    return resize(img, prep)


# --- decoding many files in parallel ---------------------------------------------------------


@dataclass
class Batch:
    paths: list[str]  # as given (relative to the root), in order
    pixels: np.ndarray  # (k, size, size, 3) uint8 of the files that decoded, in order
    ok: np.ndarray  # (len(paths),) bool
    errors: dict[int, str]  # position in paths -> short reason

    def reasons(self) -> list[str]:
        """Per path, in order: "" when it decoded, else the short reason it could not be used."""
        return ["" if ok else self.errors.get(i) or "unreadable" for i, ok in enumerate(self.ok)]


def decode_chunk(paths: list[str], root: str, prep: Preprocess, blobs: list | None = None) -> Batch:
    """Decode `paths` (relative to `root`) into one Batch; never raises for a bad file.

    `blobs`: the files' contents already read (object storage), one per path: bytes, or a
    DecodeError when the file could not be read; then nothing is opened under `root`.
    """
    arrays, ok, errors = [], np.zeros(len(paths), dtype=bool), {}
    for i, rel in enumerate(paths):
        try:
            source = os.path.join(root, rel) if blobs is None else blobs[i]
            if isinstance(source, DecodeError):
                raise source
            arrays.append(load(source, prep))
            ok[i] = True
        except DecodeError as e:
            errors[i] = str(e)
        except MemoryError:
            errors[i] = "out of memory while decoding"
    pixels = np.stack(arrays) if arrays else np.zeros((0, prep.size, prep.size, 3), np.uint8)
    return Batch(paths, pixels, ok, errors)


def _worker_start(parent: int, initializer, initargs: tuple) -> None:
    """In each worker: exit when the parent (pid `parent`) dies, even by SIGKILL; leave Ctrl-C to the parent."""
    import signal

    from toolkit.core.process import die_with_parent

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(signal.SIGTERM, parent)
    if initializer is not None:
        initializer(*initargs)


class Decoder:
    """Worker processes that decode image files with the shared preprocessing, batch by batch, in order.

    Processes, not threads: the GIL makes threads 3x slower on small PNGs. The workers are
    forked when the decoder starts, so start it before creating thread pools (an onnxruntime
    session) in this process. At most 2 batches per worker are in flight, so memory stays
    bounded however many files there are.
    """

    def __init__(self, workers: int | None = None, initializer=None, initargs: tuple = ()):
        self.workers = workers if workers and workers > 0 else (os.cpu_count() or 1)
        self.initializer, self.initargs = initializer, initargs  # run once in each worker as it starts
        self.pool = None

    def __enter__(self) -> "Decoder":
        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            start = (os.getpid(), self.initializer, self.initargs)
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_worker_start, initargs=start)
            self.pool.submit(int).result()  # with fork, every worker starts on the first task: now
        return self

    def __exit__(self, *exc) -> bool:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return False

    def map(self, fn, chunks: Iterable, *args) -> Iterator:
        """fn(chunk, *args) for each chunk, in the workers (fn must be a module-level function), in order."""
        if self.pool is None:
            for chunk in chunks:
                yield fn(chunk, *args)
            return
        pending: deque = deque()
        for chunk in chunks:
            pending.append(self.pool.submit(fn, chunk, *args))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def batches(self, root: str | Path, paths: Iterable[str], prep: Preprocess,
                batch_size: int = 64) -> Iterator[Batch]:
        """Decode `paths` (relative to `root`) in batches of `batch_size`, in order."""
        return self.map(decode_chunk, chunked(paths, batch_size), str(root), prep)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter), lazily."""
    import itertools

    items = iter(items)
    return iter(lambda: list(itertools.islice(items, size)), [])


def decode_batches(root: str | Path, paths: Iterable[str], prep: Preprocess, batch_size: int = 64,
                   workers: int | None = None) -> Iterator[Batch]:
    """Decoder(workers).batches(...) for one pass over `paths`."""
    with Decoder(workers) as decoder:
        yield from decoder.batches(root, paths, prep, batch_size)
