"""Image files: finding them, decoding them, and the one preprocessing definition.

decode -> RGB uint8 -> resize (policy) is defined here once and used by training's
validation, the export check and prediction, so that `predict` sees exactly the pixels
that validation saw. Normalisation (mean/std) happens later, on the device or inside
the exported graph. numpy and PIL only: predict imports this without torch.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RESIZE_POLICIES = ("center_crop", "squash")
MAX_PIXELS = 89_478_485  # default decompression-bomb cap (PIL's own default)
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited over white

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently grey
Image.MAX_IMAGE_PIXELS = None  # PIL's own bomb check is replaced by open_rgb's max_pixels, checked first


class DecodeError(Exception):
    """A file that cannot be turned into an RGB image; the message is a short reason."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def iter_images(root: str | Path) -> Iterator[str]:
    """Image-looking paths under `root`, relative to it, lazily, in a deterministic order.

    Depth first: a folder's image files in name order, then its subfolders in name order, so
    memory does not grow with the number of files (an explicit stack: any depth works). Names
    starting with '.' are skipped. Symlinks to files are listed (a dangling one fails at
    decode); symlinked folders are not followed. A folder named like an image is listed too (it
    fails at decode: "is a folder"), and its contents are walked like any folder's.
    """
    stack = [""]  # relative folders still to walk, the next one last
    while stack:
        rel = stack.pop()
        try:
            entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in os.scandir(Path(root) / rel))
        except OSError as e:
            log.warning("cannot list folder '%s' (%s): images inside it get no rows", Path(root) / rel,
                        e.strerror or e)
            continue
        subdirs = []
        for name, is_dir in entries:
            if name.startswith("."):
                continue
            if is_image_name(name):
                yield f"{rel}/{name}" if rel else name
            if is_dir:
                subdirs.append(f"{rel}/{name}" if rel else name)
        stack.extend(reversed(subdirs))


def find_images(root: str | Path) -> list[str]:
    """iter_images as a list."""
    return list(iter_images(root))


def find_labelled(root: str | Path) -> tuple[list[str], list[str], list[int]]:
    """A folder of class subfolders -> (class names sorted, paths relative to root, labels)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"folder '{root}' does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        for rel in find_images(root / name):
            paths.append(f"{name}/{rel}")
            labels.append(label)
    return classes, paths, labels


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha over white, 16-bit grey scaled down, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        # 16-bit grey is scaled by its bit depth, never by its content (a dark image stays dark);
        # 32-bit integer and float images carry no depth, so only their range can tell
        if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def _needs_exif_transpose(img: Image.Image) -> bool:
    """Only files that carry EXIF data can have an orientation tag (parsing it costs ~60 us)."""
    return img.format in ("TIFF", "MPO") or "exif" in img.info or "Raw profile type exif" in img.info


def open_rgb(path: str | Path, max_pixels: int = 89_478_485, draft_size: int | None = None) -> Image.Image:
    """Decode `path` as an RGB image, first frame, EXIF orientation applied.

    Raises DecodeError with a short reason. The pixel cap is checked from the header,
    before any pixel data is decoded. `draft_size` lets JPEG decode at a reduced scale
    (never below that size on the shorter side), which is much faster for big photos.
    """
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
        img = Image.open(path)
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
        if "truncated" in reason.lower() or isinstance(e, EOFError):
            reason = "truncated image"
        raise DecodeError(f"corrupt image ({reason})") from None


def resize(img: Image.Image, size: int, policy: str = "center_crop") -> np.ndarray:
    """RGB PIL image -> (size, size, 3) uint8.

    center_crop: scale the shorter side to `size` and cut the centre square.
    squash: scale both sides to `size`, ignoring the aspect ratio.
    Downscaling is antialiased (PIL's bilinear filter widens with the scale).
    """
    w, h = img.size
    if (w, h) != (size, size):
        if policy == "squash":
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        elif policy == "center_crop":  # resample only the centre square: no huge intermediate for thin images
            side = min(w, h)
            left, top = (w - side) / 2, (h - side) / 2
            img = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
        else:
            raise ValueError(f"unknown resize policy '{policy}'; use one of {', '.join(RESIZE_POLICIES)}")
    return np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def load(path: str | Path, size: int, policy: str = "center_crop", max_pixels: int = 89_478_485) -> np.ndarray:
    """The preprocessing definition: file -> (size, size, 3) uint8 RGB. Raises DecodeError."""
    img = open_rgb(path, max_pixels=max_pixels, draft_size=size)
    return resize(img, size, policy)


# --- decoding many files in parallel ---------------------------------------------------------


@dataclass
class Batch:
    paths: list[str]  # as given (relative to the root), in order
    pixels: np.ndarray  # (k, size, size, 3) uint8 of the files that decoded, in order
    ok: np.ndarray  # (len(paths),) bool
    errors: dict[int, str]  # position in paths -> short reason


def decode_chunk(paths: list[str], root: str, size: int, policy: str, max_pixels: int) -> Batch:
    """Decode `paths` (relative to `root`) into one Batch; never raises for a bad file."""
    arrays, ok, errors = [], np.zeros(len(paths), dtype=bool), {}
    for i, rel in enumerate(paths):
        try:
            arrays.append(load(os.path.join(root, rel), size, policy, max_pixels))
            ok[i] = True
        except DecodeError as e:
            errors[i] = str(e)
        except MemoryError:
            errors[i] = "out of memory while decoding"
    pixels = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return Batch(paths, pixels, ok, errors)


def _worker_start(initializer, initargs: tuple) -> None:
    """In each worker: exit when the parent dies (even by SIGKILL), leave Ctrl-C to the parent."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
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

            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                            initializer=_worker_start, initargs=(self.initializer, self.initargs))
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

    def batches(self, root: str | Path, paths: Iterable[str], size: int, policy: str = "center_crop",
                batch_size: int = 64, max_pixels: int = 89_478_485) -> Iterator[Batch]:
        """Decode `paths` (relative to `root`) in batches of `batch_size`, in order."""
        return self.map(decode_chunk, chunked(paths, batch_size), str(root), size, policy, max_pixels)


def chunked(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter), lazily."""
    import itertools

    items = iter(items)
    return iter(lambda: list(itertools.islice(items, size)), [])


def decode_batches(root: str | Path, paths: Iterable[str], size: int, policy: str = "center_crop",
                   batch_size: int = 64, workers: int | None = None, max_pixels: int = 89_478_485) -> Iterator[Batch]:
    """Decoder(workers).batches(...) for one pass over `paths`."""
    with Decoder(workers) as decoder:
        yield from decoder.batches(root, paths, size, policy, batch_size, max_pixels)
