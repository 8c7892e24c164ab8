"""An image-folder dataset as file lists: which folders are classes and which files validate.

The split folders come from core/folders.py (train/, val/ | valid/ | validation/, test/). A class
is a folder with at least one usable training image: a folder with no image file (`__MACOSX`, a
class whose pictures were moved away) or whose images all fail to decode is no class. Such
folders are named in one warning, with the validation images they take along. Whether an image
is usable is known once it is decoded: the in-memory path decodes everything anyway
(`usable_from_decoded`); the streaming path decodes each class's files until one works
(`usable_by_probe`, usually one file per class).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit import UserError
from toolkit.config import DataConfig
from toolkit.core import folders, formats, images

log = logging.getLogger(__name__)


@dataclass
class Files:
    classes: list[str]
    train: list[str]  # paths of the training images
    train_labels: np.ndarray  # (N,) int64 index into classes
    val: list[str]
    val_labels: np.ndarray  # (M,) int64
    val_dir: str | None  # folder of class subfolders holding the validation images, if any
    no_images: list[str] = field(default_factory=list)  # training subfolders without an image file


def find_files(cfg: DataConfig, seed: int) -> Files:
    """The image files of `cfg.root`, by split and class; raises UserError for a folder that cannot train."""
    root = Path(cfg.root)
    layout = folders.find_layout(root)
    exclude = folders.SPLIT_NAMES if layout.train == root else ()  # root/<class>/ next to root/val/: never classes
    found = images.find_labelled(layout.train, exclude)
    skipped = Counter(found.skipped)
    if not found.paths:
        raise UserError(f"'{layout.train}' holds no image files in class subfolders"
                        + (f" (skipped {formats.describe_skipped(skipped)})" if skipped else ""))
    files = [str(layout.train / p) for p in found.paths]
    labels = np.asarray(found.labels, dtype=np.int64)
    if layout.val is not None:
        val = images.find_labelled(layout.val)
        skipped.update(val.skipped)
        extra = sorted(set(val.classes) - set(found.classes) - set(found.empty))
        if extra:
            raise UserError(f"'{layout.val}' has classes missing from '{layout.train}': {', '.join(extra)}")
        index = {c: i for i, c in enumerate(found.classes)}  # a class emptied in train/ maps to -1: dropped below
        vlabels = np.asarray([index.get(val.classes[v], -1) for v in val.labels], dtype=np.int64)
        vfiles = [str(layout.val / p) for p in val.paths]
        out = Files(found.classes, files, labels, vfiles, vlabels, str(layout.val), found.empty)
    else:  # a seeded, stratified split of train (the same split on every run with this seed)
        rng = np.random.default_rng(seed)
        val_mask = np.zeros(len(files), dtype=bool)
        for c in range(len(found.classes)):
            idx = np.flatnonzero(labels == c)
            n_val = max(1, round(len(idx) * cfg.val_fraction)) if len(idx) > 1 else 0
            val_mask[rng.permutation(idx)[:n_val]] = True
        arr = np.asarray(files, dtype=object)
        out = Files(found.classes, list(arr[~val_mask]), labels[~val_mask], list(arr[val_mask]), labels[val_mask],
                    None, found.empty)
    log.info("%s", layout.note)
    if skipped:
        log.info("skipped %s under %s: not an image format this decoder reads", formats.describe_skipped(skipped), root)
    return out


def usable_from_decoded(files: Files, ok: np.ndarray) -> np.ndarray:
    """(C,) bool: classes with at least one training image that decoded (`ok` per training file)."""
    return np.bincount(files.train_labels[ok], minlength=len(files.classes)) > 0


def usable_by_probe(files: Files, cfg: DataConfig) -> np.ndarray:
    """(C,) bool: decode each class's training files in order until one works (streaming: no full decode)."""
    usable = np.zeros(len(files.classes), dtype=bool)
    for i, path in enumerate(files.train):
        c = files.train_labels[i]
        if usable[c]:
            continue
        try:
            images.load(path, cfg.image_size, cfg.resize, cfg.max_image_pixels, cfg.interpolation)
            usable[c] = True
        except images.DecodeError:
            pass
    return usable


def keep_classes(files: Files, usable: np.ndarray) -> tuple[Files, np.ndarray, np.ndarray]:
    """Drop the classes without a usable training image, naming them (and any folder without images)
    in one warning. -> (files with the kept classes, relabelled; train mask; val mask) over the old lists."""
    new_index = np.full(len(files.classes) + 1, -1, dtype=np.int64)  # the last slot maps label -1
    kept = [c for c in range(len(files.classes)) if usable[c]]
    new_index[kept] = np.arange(len(kept))
    tlab, vlab = new_index[files.train_labels], new_index[files.val_labels]
    tmask, vmask = tlab >= 0, vlab >= 0
    gone = [f"{name} (no image files)" for name in files.no_images]
    gone += [f"{files.classes[c]} (none of its {int((files.train_labels == c).sum())} training images decodes)"
             for c in range(len(files.classes)) if not usable[c]]
    if gone:
        lost = int((~vmask).sum())
        log.warning("%d folder(s) are not classes, having no usable training image: %s%s", len(gone),
                    ", ".join(gone), f"; their {lost} validation image(s) are left out" if lost else "")
    if len(kept) < 2:
        raise UserError(f"the training folder needs at least two class subfolders with usable images; found {len(kept)}")
    out = Files([files.classes[c] for c in kept], [f for f, m in zip(files.train, tmask) if m], tlab[tmask],
                [f for f, m in zip(files.val, vmask) if m], vlab[vmask], files.val_dir)
    return out, tmask, vmask
