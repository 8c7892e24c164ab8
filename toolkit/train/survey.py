"""The survey of a folder of class subfolders that the recipe (recipe.py) is chosen from: class counts, image
sizes from PIL headers, and whether class-average images are mirror-symmetric. Imports no torch."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

from toolkit import UserError
from toolkit.core import folders, images

HEADER_SAMPLE = 2000  # files whose headers are read for the size statistics
FLIP_SAMPLE_PER_CLASS = 32  # images per class decoded (16 px) for the mirror-symmetry test


@dataclass
class FolderSummary:
    """What the recipe knows about a folder of class subfolders."""

    root: Path
    layout: folders.Layout  # where training, validation and test images are
    classes: list[str]
    counts: list[int]  # training images per class
    short_side: int  # median short side of the sampled images, px
    short_side_p10: int  # 10th percentile, px
    flip_asymmetry: float | None = None  # mean-image mirror distance / between-class distance
    notes: list[str] = field(default_factory=list)

    @property
    def train_dir(self) -> Path:
        return self.layout.train

    @property
    def num_train(self) -> int:
        return sum(self.counts)


def _sample(files: list[str], labels: list[int], per_class: int, limit: int) -> list[int]:
    """Indices of up to `per_class` files of each class (evenly spaced), at most `limit` in all."""
    by_class: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        by_class.setdefault(c, []).append(i)
    per_class = max(1, min(per_class, limit // max(1, len(by_class))))
    picked = []
    for idx in by_class.values():
        step = max(1, len(idx) // per_class)
        picked += idx[::step][:per_class]
    return picked


def _flip_asymmetry(files: list[str], labels: list[int], num_classes: int) -> float | None:
    """How far mirroring moves the class-average images, relative to the distance between classes.

    Near 0: the classes look alike mirrored (photos: flips are a safe augmentation). Near or above 1:
    a mirrored image of one class sits as far away as another class (digits, letters: no flips).
    """
    import numpy as np

    probe = images.Preprocess(16, "squash")  # a coarse 16 px squash probe, not the model's input
    sums, counts = np.zeros((num_classes, 16, 16)), np.zeros(num_classes)
    for f, c in zip(files, labels):
        try:
            sums[c] += images.load(f, probe).mean(2) / 255.0
            counts[c] += 1
        except images.DecodeError:
            continue
    keep = counts > 0
    if keep.sum() < 2:
        return None
    means = sums[keep] / counts[keep, None, None]
    means -= means.mean(0)  # what distinguishes the classes, not what they share
    mirror = np.sqrt(((means - means[:, :, ::-1]) ** 2).sum((1, 2)))
    between = np.sqrt(((means[:, None] - means[None]) ** 2).sum((2, 3)))
    np.fill_diagonal(between, np.inf)
    return float(np.median(mirror / np.maximum(between.min(1), 1e-9)))


def scan_folder(folder: str | Path) -> FolderSummary:
    """Class counts, image sizes (headers only) and mirror symmetry of a folder of class subfolders."""
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"'{root}' is not a folder; give a folder of class subfolders or a config file")
    layout = folders.find_layout(root)
    train_dir = layout.train
    found = folders.find_labelled(train_dir, exclude=folders.SPLIT_NAMES)
    classes, rel, labels = found.classes, found.paths, found.labels
    if len(classes) < 2 or not rel:
        raise UserError(f"'{train_dir}' needs at least two class subfolders of images; found "
                        f"{len(classes)} class{'' if len(classes) == 1 else 'es'} and {len(rel)} "
                        f"image{'' if len(rel) == 1 else 's'}")
    files = [str(train_dir / p) for p in rel]
    counts = [0] * len(classes)
    for c in labels:
        counts[c] += 1
    sides = []
    for i in _sample(files, labels, HEADER_SAMPLE, HEADER_SAMPLE):
        try:
            with Image.open(files[i]) as img:  # reads the header only
                sides.append(min(img.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    if not sides:
        raise UserError(f"none of the sampled images under '{train_dir}' could be opened")
    sides.sort()
    picked = _sample(files, labels, FLIP_SAMPLE_PER_CLASS, 40 * FLIP_SAMPLE_PER_CLASS)
    asym = _flip_asymmetry([files[i] for i in picked], [labels[i] for i in picked], len(classes))
    return FolderSummary(root, layout, classes, counts, int(statistics.median(sides)),
                         sides[len(sides) // 10], asym)
