"""Which files are images, and reading the image files PIL opens but cannot turn into 8-bit pixels.

The list of image extensions is PIL's own registry (every format it can open and decode), so a
file the decoder reads is never skipped for its name. TIFF variants PIL does not decode (float
samples, more than one sample per pixel in a deep format) are read with tifffile. Numbers of any
depth become 8-bit by one rule (`to_uint8`), whichever library decoded them.
numpy and PIL only (tifffile when a TIFF needs it): predict imports this without torch.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image, ImageFile

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, both byte orders
# (offset, bytes, name) of formats PIL has no decoder for here: a named reason beats "not an image"
OTHER_MAGIC = ((4, b"ftypheic", "HEIC"), (4, b"ftypheix", "HEIC"), (4, b"ftypmif1", "HEIF"),
               (4, b"ftypavif", "AVIF"), (0, b"\xff\x0a", "JPEG XL"), (4, b"JXL ", "JPEG XL"))
NOT_IMAGES = ("MPEG",)  # PIL reads an MPEG header but decodes no frame: videos are not pictures


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case extensions ('.jpg', '.jfif', '.ppm', ...) of every format this PIL can open and decode.

    From PIL's registry (plugins registered before the first call count, e.g. pillow-heif), less
    the formats PIL only writes (PDF), stubs that need an external handler (HDF5, GRIB, BUFR, WMF)
    and MPEG. EPS counts only when Ghostscript is installed, since PIL renders it with Ghostscript.
    """
    Image.init()
    readable = set()
    for ext, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0] if fmt != "MPO" else Image.OPEN.get("JPEG", (None,))[0]
        if factory is None or fmt in NOT_IMAGES:
            continue
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            continue
        if fmt == "EPS":
            from PIL import EpsImagePlugin

            if not EpsImagePlugin.has_ghostscript():
                continue
        readable.add(ext.lower())
    return frozenset(readable)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_extensions()


def extension_of(name: str) -> str:
    """'.txt' for 'a.TXT'; '(none)' for a name without an extension (how skipped files are counted)."""
    return os.path.splitext(name)[1].lower() or "(none)"


LINKED_FOLDER = "(symlinked folder)"  # how a walk counts a symlink to a folder: listed, never followed


def describe_skipped(skipped: dict[str, int], limit: int = 6) -> str:
    """What a walk left out, counted by extension (and LINKED_FOLDER), largest counts first:
    {'.txt': 3, '.csv': 1, LINKED_FOLDER: 2} -> '4 file(s): .txt 3, .csv 1 (not an image format this decoder
    reads); 2 symlinked folder(s), not followed'."""
    files = {k: n for k, n in skipped.items() if k != LINKED_FOLDER}
    parts = []
    if files:
        top = sorted(files.items(), key=lambda kv: (-kv[1], kv[0]))
        text = ", ".join(f"{ext} {n}" for ext, n in top[:limit]) + (", ..." if len(top) > limit else "")
        parts.append(f"{sum(files.values())} file(s): {text} (not an image format this decoder reads)")
    if skipped.get(LINKED_FOLDER):
        parts.append(f"{skipped[LINKED_FOLDER]} symlinked folder(s), not followed")
    return "; ".join(parts)


def unsupported_format(path) -> str | None:
    """A short name of the image format of a file PIL did not identify, if its first bytes tell one.
    `path` may be an open binary file (the bytes of a file read from object storage): it is rewound."""
    if hasattr(path, "read"):
        path.seek(0)
        head = path.read(16)
        path.seek(0)
    else:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError:
            return None
    if head[:4] in TIFF_MAGIC:
        return "TIFF"
    for offset, magic, name in OTHER_MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def scale_samples(a: np.ndarray) -> np.ndarray:
    """Samples of any dtype -> float64 on the 0..255 scale, by one rule for every decoder.

    8-bit as is; 16-bit integers by their depth (/257), never by their content, so a dark image
    stays dark; wider integers carry no depth, so values above 255 are read as 16-bit; floats
    within [0, 1] are fractions (x 255, the convention of float images), other floats 0..255.
    """
    kind, size = a.dtype.kind, a.dtype.itemsize
    x = a.astype(np.float64)
    if kind == "b":
        return x * 255.0
    if kind in "iu" and size == 2:
        return x / 257.0
    if kind in "iu" and size > 2:
        return x / 257.0 if x.max(initial=0) > 255 else x
    if kind == "f":
        x = np.nan_to_num(x, nan=0.0, posinf=255.0, neginf=0.0)
        return x * 255.0 if x.size and x.min() >= 0.0 and x.max() <= 1.0 else x
    return x


def to_uint8(a: np.ndarray) -> np.ndarray:
    """`scale_samples`, rounded and clipped to uint8."""
    return a if a.dtype == np.uint8 else np.clip(np.rint(scale_samples(a)), 0, 255).astype(np.uint8)


def pil_misreads(img: Image.Image) -> bool:
    """A TIFF that PIL opens but decodes wrongly: deep samples (> 8 bits) in separate planes
    (Pillow 13 interleaves an uncompressed 16-bit planar RGB file into the wrong channels)."""
    if img.format != "TIFF" or not hasattr(img, "tag_v2"):
        return False
    bits = img.tag_v2.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return img.tag_v2.get(284) == 2 and max(bits) > 8 and img.tag_v2.get(277, 1) > 1


class Unsupported(ValueError):
    """An image whose layout has no RGB reading here (the message names the layout)."""


class TooLarge(ValueError):
    """More pixels than the caller's cap, seen in the header before any pixel data is read."""


def read_tiff(path, max_pixels: int) -> Image.Image:
    """The first page of a TIFF that PIL cannot decode (float samples, deep multi-sample pixels),
    as an L, LA, RGB or RGBA PIL image, with samples scaled by `to_uint8`.

    Raises Unsupported for a layout without an RGB reading (e.g. 5 samples per pixel), TooLarge
    above `max_pixels` (checked from the header), ImportError without tifffile, and tifffile's
    own errors for a damaged file.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if page.imagewidth * page.imagelength > max_pixels:
            raise TooLarge(f"too many pixels ({page.imagewidth}x{page.imagelength} > {max_pixels})")
        a, axes = page.asarray(), page.axes  # e.g. 'YXS', 'SYX' (planar), 'YX'
        extra = [int(e) for e in (getattr(page, "extrasamples", ()) or ())]
    if "S" in axes:
        a = np.moveaxis(a, axes.index("S"), -1)
        axes = axes.replace("S", "") + "S"
    a = a[tuple(slice(None) if ax in "YXS" else 0 for ax in axes)]  # first plane of any other axis
    if a.ndim == 2:
        a = a[..., None]
    samples = a.shape[-1]
    alpha = samples in (2, 4) and bool(extra) and extra[0] in (1, 2)  # associated or unassociated alpha
    if samples not in (1, 3) and not alpha:
        raise Unsupported(f"TIFF with {samples} samples per pixel ({a.dtype}), not grey or RGB")
    px = to_uint8(a)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[samples]
    return Image.fromarray(px[..., 0] if mode == "L" else np.ascontiguousarray(px), mode)
