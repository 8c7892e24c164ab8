"""Pictures people look at: grids of images with captions (PIL only, no torch, no matplotlib).

`toolkit preview` shows a labelled folder class by class; `toolkit predict --grid` shows
predictions sampled across the whole output, coloured by agreement with their class folder when
the folder is labelled; the training report shows validation images with predicted vs true labels.
Small images are enlarged with nearest-neighbour so their pixels stay visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from toolkit import UserError
from toolkit.core import folders, images
from toolkit.core.files import absent, inside
from toolkit.core.meta import IMAGENET_MEAN, IMAGENET_STD

TILE = 96  # pixels per image in a grid
CAPTION = 30  # pixels of caption under each image (two lines)
GREEN, RED, GREY, INK = (20, 130, 40), (200, 30, 30), (120, 120, 120), (20, 20, 20)


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def _fit(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> str:
    """`text` cut at its end to fit `width` pixels (labels: their start tells them apart)."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def fit_end(text: str, width: int = TILE, font=None) -> str:
    """`text` cut at its start to fit `width` pixels: file names such as data_batch_1_00042.png differ at
    their end, so the end is what a caption must keep ("…tch_1_00042.png")."""
    font = font or _font(11)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def folder_title(path: Path) -> str:
    """A folder as a title names it, not its absolute path: 'cifar10/train', 'val', 'photos'."""
    path = Path(path).resolve()
    return f"{path.parent.name}/{path.name}" if path.name in ("train", "val") and path.parent.name else path.name


def grid(tiles: list[tuple[np.ndarray | None, str, str, tuple]], columns: int, title: str = "",
         row_labels: list[str] | None = None) -> Image.Image:
    """tiles: (image (H, W, 3) uint8 or None for a blank, caption line 1, line 2, caption colour).

    Laid out left to right, `columns` per row; `row_labels` (one per row) go in a left margin.
    """
    font, title_font = _font(11), _font(14)
    rows = max(1, -(-len(tiles) // columns))
    margin = 0
    if row_labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        margin = int(max(probe.textlength(label, font=font) for label in row_labels)) + 12
    top = 26 + 18 * title.count("\n") if title else 4  # a title may have several lines
    canvas = Image.new("RGB", (margin + columns * (TILE + 6) + 4, top + rows * (TILE + CAPTION + 6)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        for k, line in enumerate(title.split("\n")):
            draw.text((6, 5 + 18 * k), line, fill=INK, font=title_font)
    for r, label in enumerate(row_labels or []):
        draw.text((6, top + r * (TILE + CAPTION + 6) + TILE // 2 - 6), label, fill=INK, font=font)
    for i, (img, line1, line2, colour) in enumerate(tiles):
        x = margin + 4 + (i % columns) * (TILE + 6)
        y = top + (i // columns) * (TILE + CAPTION + 6)
        if img is None:
            draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], fill=(235, 235, 235), outline=GREY)
        else:
            pic = Image.fromarray(img)
            scale = TILE / max(pic.size)  # small images are enlarged with crisp pixels, large ones shrunk
            size = (max(1, round(pic.size[0] * scale)), max(1, round(pic.size[1] * scale)))
            pic = pic.resize(size, Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR)
            canvas.paste(pic, (x + (TILE - pic.size[0]) // 2, y + (TILE - pic.size[1]) // 2))
        draw.text((x, y + TILE + 2), _fit(line1, font, TILE, draw), fill=colour, font=font)
        draw.text((x, y + TILE + 15), _fit(line2, font, TILE, draw), fill=colour, font=font)
    return canvas


def save_png(image: Image.Image, out: str | Path, overwrite: bool = False) -> None:
    """Write `image` as a PNG at `out` atomically; an existing file is replaced only with `overwrite`
    (a user's photo is never clobbered, even by a file that appears while this one is drawn)."""
    import os

    out = Path(out)
    if out.is_dir():
        raise UserError(f"'{out}' is a folder; give a .png file name")
    from toolkit.core.lock import remove_stale_temps

    remove_stale_temps(out.parent, prefix=f".{out.name}.")  # left by a writer killed while saving this file
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format="PNG")
        if overwrite:
            os.replace(tmp, out)
        else:
            _link_new(tmp, out)
    except FileExistsError:
        raise UserError(f"'{out}' already exists; choose a new file name or pass --overwrite") from None
    except OSError as e:
        raise UserError(f"cannot write '{out}' ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(tmp: Path, out: Path) -> None:
    """Give `tmp`'s contents the name `out` unless `out` exists (FileExistsError): no check-then-write race."""
    import errno
    import os

    try:
        os.link(tmp, out)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        with open(out, "xb") as f:  # a file system without hard links: exclusive create, then copy
            f.write(tmp.read_bytes())


def show(path: Path, max_side: int = 160) -> np.ndarray | None:
    """An image file for display: EXIF-upright RGB, at most max_side pixels; None if unreadable."""
    try:
        img = images.open_rgb(path, draft_size=max_side)
    except images.DecodeError:
        return None
    img.thumbnail((max_side, max_side))
    return np.asarray(img)


def preview(data_dir: str | Path, out: str | Path, per_class: int = 8, overwrite: bool = False) -> dict[str, int]:
    """A grid of `per_class` images of each class of a labelled folder; returns the class counts.

    A folder with train/ (and val/) shows train/ and counts both. An existing `out` is replaced
    only with `overwrite`.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"folder '{root}' {absent(root)}")
    if inside(out, root):  # even with --overwrite: a photo of the data is never replaced
        raise UserError(f"'{out}' is inside the data folder '{root}', where it would replace or join the images; "
                        "write it elsewhere")
    if Path(out).exists() and not overwrite:  # checked before the work; save_png checks again when writing
        raise UserError(f"'{out}' already exists; choose a new file name or pass --overwrite")
    layout = folders.find_layout(root)
    shown = layout.train
    found = images.find_labelled(shown, folders.SPLIT_NAMES if shown == root else ())
    classes, paths, labels = found.classes, found.paths, found.labels
    if not classes:
        raise UserError(f"'{shown}' has no class subfolders with images (one folder of images per class)")
    counts = {c: labels.count(i) for i, c in enumerate(classes)}
    if layout.val is not None:
        val = images.find_labelled(layout.val)
        counts = {f"{c} (train)": n for c, n in counts.items()}
        counts.update({f"{c} ({layout.val.name})": val.labels.count(i) for i, c in enumerate(val.classes)})
    tiles, row_labels = [], []
    labels = np.asarray(labels)
    for i, c in enumerate(classes):
        idx = np.flatnonzero(labels == i)
        picked = idx[np.linspace(0, len(idx) - 1, min(per_class, len(idx))).astype(int)] if len(idx) else []
        row = [(show(shown / paths[j]), fit_end(Path(paths[j]).name), "", GREY) for j in picked]
        tiles += row + [(None, "", "", GREY)] * (per_class - len(row))
        row_labels.append(f"{c} ({labels.tolist().count(i)})")
    title = f"{folder_title(shown)}: {len(paths)} images, {len(classes)} classes (caption: file name)"
    save_png(grid(tiles, per_class, title, row_labels), out, overwrite)
    return counts


def spread_sample(paths: Iterable[str], k: int) -> Callable[[Iterable[str]], Iterator[int]]:
    """Choose k of the rows of a prediction table spread across the whole output, in two streaming passes.

    Pass 1 (this call) counts the rows of each folder (the parent of each relative path); the k places
    are shared out among the folders in turn (every class folder is shown when k allows) and spread
    evenly inside each folder. Pass 2 (the returned function, given the same paths again) yields the
    chosen row indices in output order. Memory: one counter per folder, whatever the number of rows.
    """
    counts: dict[str, int] = {}
    for path in paths:
        parent = str(Path(path).parent)
        counts[parent] = counts.get(parent, 0) + 1
    quota = dict.fromkeys(counts, 0)
    left = min(k, sum(counts.values()))
    while left:
        for folder in counts:
            if left and quota[folder] < counts[folder]:
                quota[folder] += 1
                left -= 1
    picks = {f: set(np.linspace(0, counts[f] - 1, q).round().astype(int).tolist()) for f, q in quota.items() if q}

    def chosen(paths_again: Iterable[str]) -> Iterator[int]:
        seen = dict.fromkeys(counts, 0)
        for i, path in enumerate(paths_again):
            parent = str(Path(path).parent)
            if seen.get(parent, 0) in picks.get(parent, ()):
                yield i
            seen[parent] = seen.get(parent, 0) + 1

    return chosen


def prediction_tile(root: Path, row: dict, classes: set[str]) -> tuple:
    """One tile of the predictions grid. The caption is green when the prediction names the image's
    folder, red when the folder is another class (with "in <folder>/"), ink when the folder is no class."""
    name = fit_end(Path(row["path"]).name)
    if row["error"]:
        return None, name, row["error"], RED
    folder = Path(row["path"]).parent.name
    line1 = f"{float(row['score']):.2f} {row['label']}"  # the score first: a long class name is cut, not it
    if folder not in classes:
        return show(root / row["path"]), line1, name, INK
    if row["label"] == folder:
        return show(root / row["path"]), line1, name, GREEN
    return show(root / row["path"]), line1, f"in {folder}/", RED  # a class name is cut at its end, like labels


def predictions_grid(root: Path, rows: list[dict], out: str | Path, classes: list[str] = (), total: int = 0,
                     columns: int = 8, overwrite: bool = False) -> None:
    """The given prediction rows as a grid: each image with its label and score, or its error (see save_png).

    `classes`: the model's class names; images in a folder named after a class get a caption coloured by
    agreement with it (the title says so). `total`: the rows of the whole output, for the title.
    """
    known = set(classes)
    tiles = [prediction_tile(Path(root), row, known) for row in rows]
    title = f"{len(rows)} of {total or len(rows)} predictions in {folder_title(root)}, spread over the folder"
    if any(Path(row["path"]).parent.name in known for row in rows):
        title += "\ncaption: green = its folder's class, red = another class (folder below)"
    save_png(grid(tiles, min(columns, max(1, len(tiles))), title), out, overwrite)


def validation_grid(pixels: np.ndarray, truth: np.ndarray, predicted: np.ndarray, scores: np.ndarray,
                    classes: list[str], out: str | Path, n: int = 48, columns: int = 8) -> None:
    """Validation images with predicted vs true labels, mistakes first (the most confident ones first)."""
    wrong = np.flatnonzero(predicted != truth)
    right = np.flatnonzero(predicted == truth)
    order = list(wrong[np.argsort(-scores[wrong])]) + list(right)
    tiles = []
    for i in order[:n]:
        ok = predicted[i] == truth[i]
        tiles.append((pixels[i], f"{scores[i]:.2f} {classes[predicted[i]]}", "" if ok else f"true: {classes[truth[i]]}",
                      GREEN if ok else RED))
    title = f"validation: {len(wrong)} mistakes of {len(truth)} shown first (score and predicted class; true class)"
    grid(tiles, columns, title).save(out)


def inspect(path: str | Path, size: int = 32, resize: str = "center_crop", mean=None, std=None,
            interpolation: str = images.DEFAULT_INTERPOLATION) -> str:
    """The tutorial's "an image is numbers" step: the file, its pixels, and the tensor a model sees."""
    path = Path(path)
    model_stats = mean is not None
    mean = IMAGENET_MEAN if mean is None else mean
    std = IMAGENET_STD if std is None else std
    gain, shift = images.normalization(mean, std)
    try:
        with Image.open(path) as raw:
            fmt, mode, (w, h), frames = raw.format, raw.mode, raw.size, getattr(raw, "n_frames", 1)
        rgb = np.asarray(images.open_rgb(path))
        x = images.load(path, images.Preprocess(size, resize, interpolation=interpolation))
    except images.DecodeError as e:
        raise UserError(f"'{path}' cannot be read as an image: {e}") from None
    except (OSError, Image.UnidentifiedImageError):
        raise UserError(f"'{path}' cannot be read as an image") from None
    tensor = x.astype(np.float32) * gain + shift  # (H, W, 3)
    tensor = tensor.transpose(2, 0, 1)  # (3, H, W), as the model takes it
    np.set_printoptions(linewidth=100)
    lines = [
        f"file      {path} ({path.stat().st_size:,} bytes)",
        f"stored    {fmt}, mode {mode}, {w} x {h} pixels" + (f", {frames} frames (the first is used)" if frames > 1 else ""),
        f"as RGB    array of shape {rgb.shape} (height, width, channels), dtype {rgb.dtype}, values "
        f"{rgb.min()}..{rgb.max()}",
        "top-left 4 x 4 pixels of the red channel:",
        "  " + str(rgb[:4, :4, 0]).replace("\n", "\n  "),
        f"resized   {resize} ({interpolation}) to {size} x {size}: shape {x.shape}",
        f"tensor    (pixels / 255 - mean) / std, channels first: shape {tensor.shape}, dtype {tensor.dtype}",
        f"          mean {[round(float(v), 3) for v in mean]}, std {[round(float(v), 3) for v in std]}"
        + (" (the model's)" if model_stats else " (ImageNet statistics: no --model given; pass --model to use "
           "the model's own)") + f"; a batch of N is (N, 3, {size}, {size})",
        "          channel     mean      std      min      max",
    ]
    for name, c in zip("RGB", tensor):
        lines.append(f"          {name}       {c.mean():8.3f} {c.std():8.3f} {c.min():8.3f} {c.max():8.3f}")
    return "\n".join(lines)
