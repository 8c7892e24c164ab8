"""An image-folder dataset as file lists: which folders are classes, which files validate and which test.

The split folders come from core/folders.py (train/, val/ | valid/ | validation/, test/). Without a
test/ folder, `data.test_fraction` holds out part of the training images as the test set, before the
validation split (see `held_out`). A class
is a folder with at least one usable training image: a folder with no image file (`__MACOSX`, a
class whose pictures were moved away) or whose images all fail to decode is no class. Such
folders are named in one warning, with the validation images they take along. Whether an image
is usable is known once it is decoded: the in-memory path decodes everything anyway
(`usable_from_decoded`); the streaming path decodes each class's files until one works
(`usable_by_probe`, usually one file per class).
"""

from __future__ import annotations

import hashlib
import logging
import os
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
    test: list[str] = field(default_factory=list)  # the untouched test images: never trained or selected on
    test_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (T,) int64
    test_dir: str | None = None  # the folder the test paths are relative to (class/<file> below it)
    test_source: str = ""  # where the test set comes from, for the log and the reports


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
    labels = np.asarray(found.labels, dtype=np.int64)
    test = _test_set(cfg, seed, layout, found, labels, skipped)
    held = np.isin(np.arange(len(labels)), test.pop("held"))
    files = folders.under(layout.train, [p for p, h in zip(found.paths, held) if not h])
    labels = labels[~held]
    if layout.val is not None:
        val = images.find_labelled(layout.val)
        skipped.update(val.skipped)
        extra = sorted(set(val.classes) - set(found.classes) - set(found.empty))
        if extra:
            raise UserError(f"'{layout.val}' has classes missing from '{layout.train}': {', '.join(extra)}")
        index = {c: i for i, c in enumerate(found.classes)}  # a class emptied in train/ maps to -1: dropped below
        vlabels = np.asarray([index.get(val.classes[v], -1) for v in val.labels], dtype=np.int64)
        vfiles = folders.under(layout.val, val.paths)
        out = Files(found.classes, files, labels, vfiles, vlabels, str(layout.val), found.empty, **test)
    else:  # a seeded, stratified split of train (the same split on every run with this seed)
        rng = np.random.default_rng(seed)
        val_mask = np.zeros(len(files), dtype=bool)
        for c in range(len(found.classes)):
            idx = np.flatnonzero(labels == c)
            n_val = max(1, round(len(idx) * cfg.val_fraction)) if len(idx) > 1 else 0
            val_mask[rng.permutation(idx)[:n_val]] = True
        arr = np.asarray(files, dtype=object)
        out = Files(found.classes, list(arr[~val_mask]), labels[~val_mask], list(arr[val_mask]), labels[val_mask],
                    None, found.empty, **test)
    if cfg.test_fraction:
        left = np.bincount(out.train_labels, minlength=len(found.classes))
        for c in np.flatnonzero(left == 0):
            n = found.labels.count(int(c))
            raise UserError(f"data.test_fraction={cfg.test_fraction:g} leaves class '{found.classes[c]}' ({n} image"
                            f"{'s' if n > 1 else ''}) no training image once its test and validation images are "
                            "taken out; add images to it or lower data.test_fraction")
    log.info("%s", layout.note + (f"; test: {out.test_source} ({len(out.test)} images)" if cfg.test_fraction else ""))
    if skipped:
        log.info("under %s: skipped %s", root, formats.describe_skipped(skipped))
    return out


def held_out(paths: list[str], labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: the test images of `data.test_fraction`, class by class (stratified).

    Each class of n images gives max(1, round(n * fraction)) (halves up): those whose keyed hash,
    blake2b(path relative to the training folder, key=seed), is smallest. So the split is a function of
    the relative paths and the seed alone: the same on every run, resume and process, on any machine and
    wherever the folder is moved; adding or removing a file moves at most one other file of its class in
    or out of the test set, and none of another class. Another seed gives another test set. A name
    holding a line break stays in training (the run's list of test files cannot hold it).
    """
    key = seed.to_bytes(8, "little")
    digest = [hashlib.blake2b(os.fsencode(p), key=key, digest_size=8).digest() for p in paths]
    mask = np.zeros(len(paths), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(len(idx) * fraction + 0.5))
        listable = sorted((i for i in idx.tolist() if "\n" not in paths[i]), key=lambda i: (digest[i], paths[i]))
        mask[listable[:k]] = True
    return mask


def _test_set(cfg: DataConfig, seed: int, layout: folders.Layout, found: folders.Labelled, labels: np.ndarray,
              skipped: Counter) -> dict:
    """The test set's Files fields, and 'held': the indices of training images it takes (data.test_fraction)."""
    root = Path(cfg.root)
    if cfg.test_fraction and (root / folders.TEST_NAME).is_dir():
        raise UserError(f"data.test_fraction={cfg.test_fraction:g} holds out a test set, but '{root}' has a "
                        f"{folders.TEST_NAME}/ folder already; set data.test_fraction=0 (or move the folder away)")
    if cfg.test_fraction:
        held = np.flatnonzero(held_out(found.paths, labels, cfg.test_fraction, seed))
        return {"held": held, "test": [str(layout.train / found.paths[i]) for i in held], "test_labels": labels[held],
                "test_dir": str(layout.train),
                "test_source": f"data.test_fraction={cfg.test_fraction:g} of {layout.train}/ (seed {seed})"}
    if layout.test is None:
        return {"held": np.zeros(0, np.int64)}
    test = images.find_labelled(layout.test)
    skipped.update(test.skipped)
    index = {c: i for i, c in enumerate(found.classes)}
    unknown = sorted(set(test.classes) - set(index))
    if unknown:
        log.warning("test: classes without training images are left out of the test set: %s", ", ".join(unknown))
    keep = [(p, index[test.classes[i]]) for p, i in zip(test.paths, test.labels) if test.classes[i] in index]
    return {"held": np.zeros(0, np.int64), "test": [str(layout.test / p) for p, _ in keep],
            "test_labels": np.asarray([c for _, c in keep], dtype=np.int64), "test_dir": str(layout.test),
            "test_source": f"the {layout.test}/ folder"}


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
            images.load(path, cfg.decoding())
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
    elab = new_index[files.test_labels]
    out = Files([files.classes[c] for c in kept], [f for f, m in zip(files.train, tmask) if m], tlab[tmask],
                [f for f, m in zip(files.val, vmask) if m], vlab[vmask], files.val_dir,
                test=[f for f, e in zip(files.test, elab) if e >= 0], test_labels=elab[elab >= 0],
                test_dir=files.test_dir, test_source=files.test_source)
    return out, tmask, vmask
