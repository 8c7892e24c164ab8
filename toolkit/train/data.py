"""Datasets (shapes | imagefolder | cifar10) as uint8 images + labels, found, split and fingerprinted.

A split is held one of two ways (batches.py draws the batches from either):
  memory  decoded once into one uint8 tensor (cached on disk, see cache.py)
  stream  the file list, decoded every epoch, for data larger than memory
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit import UserError
from toolkit.config import DataConfig
import toolkit.train.imagefolder as imagefolder
from toolkit.core import folders, images

log = logging.getLogger(__name__)


@dataclass
class Split:
    """One split's labels and its images: decoded in memory (`images`) or as files to stream (`files`)."""

    labels: torch.Tensor  # (N,) int64
    images: torch.Tensor | None = None  # (N, 3, H, W) uint8, when in memory
    files: list[str] | None = None  # absolute paths, when streamed

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    """A dataset as the training run takes it: class names (index order), the splits, where they come from."""

    classes: list[str]
    train: Split
    val: Split
    val_dir: str | None  # folder of class subfolders holding the validation images, if any
    fingerprint: str = ""  # of the class list, the file lists and the labels (see fingerprint())
    test: Split | None = None  # files of the untouched test set (test/ or data.test_fraction), decoded at the end
    test_dir: str | None = None  # the folder the test files are relative to
    test_source: str = ""  # where the test set comes from, in words


def _with_test(ds: Dataset, files: imagefolder.Files) -> Dataset:
    if files.test:
        ds.test = Split(torch.from_numpy(files.test_labels), files=files.test)
        ds.test_dir, ds.test_source = files.test_dir, files.test_source
    return ds


def fingerprint(classes: list[str], root: str, *splits) -> str:
    """sha256 of the class names and each split's (files relative to `root`, or None) and labels: a resume state
    records it, so a resumed run can tell that its data changed. Names are hashed as bytes (need not be UTF-8)."""
    import hashlib
    import os

    h = hashlib.sha256()
    for name in classes:
        h.update(os.fsencode(name) + b"\0")
    for files, labels in splits:
        h.update(b"\1" + np.ascontiguousarray(np.asarray(labels, dtype=np.int64)).tobytes())
        for rel in folders.relpaths(list(files or ()), root):
            h.update(os.fsencode(rel) + b"\0")
    return h.hexdigest()[:16]


# --- finding the data ------------------------------------------------------------------------


def _cifar10(cfg: DataConfig) -> Dataset:
    from toolkit.train.datasets.cifar import load_cifar10

    classes, (xtr, ytr), (xva, yva) = load_cifar10(cfg.root, download=cfg.download)
    log.info("validation: the official CIFAR-10 test batch (%d images) in %s", len(yva), cfg.root)
    if cfg.image_size != xtr.shape[1]:  # resize with the shared definition, as predict would
        from PIL import Image

        def resize_all(x):
            prep = cfg.decoding()
            return np.stack([images.resize(Image.fromarray(a), prep) for a in x])

        xtr, xva = resize_all(xtr), resize_all(xva)
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    return Dataset(classes, Split(torch.from_numpy(ytr), to_t(xtr)), Split(torch.from_numpy(yva), to_t(xva)), None,
                   fingerprint(classes, cfg.root, (None, ytr), (None, yva)))


def ensure_shapes(cfg: DataConfig, seed: int) -> None:
    """Generate the built-in dataset at data.root when it is not there yet."""
    root = Path(cfg.root)
    if root.exists():
        return
    from toolkit.core.progress import progress_bar
    from toolkit.train.datasets import shapes

    log.info("generating the shapes dataset at %s (%d + %d images per class)",
             root, cfg.train_per_class, cfg.val_per_class)
    bar = progress_bar((cfg.train_per_class + cfg.val_per_class) * len(shapes.CLASSES), "drawing images")
    shapes.generate(root, cfg.train_per_class, cfg.val_per_class, seed=seed, size=cfg.image_size, progress=bar.update)
    bar.close()


def load_dataset(cfg: DataConfig, seed: int, workers: int | None = None, make: bool = True) -> Dataset:
    """Find, split and (for cache=memory, or auto when small enough) decode the dataset.

    make: generate the built-in shapes data, or download CIFAR-10 (with data.download), when it is
    missing; with make=False only data already on disk is read, else UserError names what is missing.
    Call under `accelerator.main_process_first()` so one process generates and caches.
    """
    if cfg.kind == "cifar10":
        return _cifar10(cfg if make else dataclasses.replace(cfg, download=False))
    if cfg.kind == "shapes" and make:
        ensure_shapes(cfg, seed)
    files = imagefolder.find_files(cfg, seed)
    decoded_gb = (len(files.train) + len(files.val)) * cfg.image_size**2 * 3 / 1e9
    in_memory = cfg.cache == "memory" or (cfg.cache == "auto" and decoded_gb <= cfg.memory_limit_gb)
    if not in_memory:
        files, _, _ = imagefolder.keep_classes(files, imagefolder.usable_by_probe(files, cfg))
        _check_val(files, cfg)
        log.info("streaming %d + %d images from disk (decoded size %.1f GB)", len(files.train), len(files.val),
                 decoded_gb)
        return _with_test(Dataset(files.classes, Split(torch.from_numpy(files.train_labels), files=files.train),
                                  Split(torch.from_numpy(files.val_labels), files=files.val), files.val_dir,
                                  fingerprint(files.classes, cfg.root, (files.train, files.train_labels),
                                              (files.val, files.val_labels))), files)
    from toolkit.train.cache import decode_cached

    if workers is None and cfg.num_workers >= 0:
        workers = max(1, cfg.num_workers)  # 0: decode in this process
    decoded = [decode_cached(f, cfg, workers) for f in (files.train, files.val)]
    kept, tmask, vmask = imagefolder.keep_classes(files, imagefolder.usable_from_decoded(files, decoded[0][1]))
    _check_val(kept, cfg)
    splits = []
    for (x, ok), mask, paths in ((decoded[0], tmask, files.train), (decoded[1], vmask, files.val)):
        bad = [f for f, good, m in zip(paths, ok, mask) if m and not good]
        if bad:
            log.warning("skipping %d unreadable images, e.g. %s", len(bad), ", ".join(bad[:3]))
        use = ok & mask
        x = np.array(x) if use.all() else x[use]  # one in-memory copy (the cache is memory-mapped)
        labels = kept.train_labels if paths is files.train else kept.val_labels
        splits.append(Split(torch.from_numpy(labels[ok[mask]]), torch.from_numpy(x)))
    return _with_test(Dataset(kept.classes, splits[0], splits[1], kept.val_dir,
                              fingerprint(kept.classes, cfg.root, (kept.train, kept.train_labels),
                                          (kept.val, kept.val_labels))), kept)


def _check_val(files: imagefolder.Files, cfg: DataConfig) -> None:
    if not len(files.val):
        raise UserError(f"data.root '{cfg.root}' gives no validation images; add a val/ folder or more images")


def sample_images(split: Split, cfg: DataConfig, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `indices` of a split as (k, 3, H, W) uint8, decoding them if the split is streamed,
    and their labels; unreadable files are left out, image and label together."""
    indices = torch.as_tensor(indices, dtype=torch.int64)
    if split.images is not None:
        return split.images[indices], split.labels[indices]
    out, kept = [], []
    for i in indices.tolist():
        try:
            out.append(torch.from_numpy(images.load(split.files[i], cfg.decoding())))
            kept.append(i)
        except images.DecodeError:
            continue
    if not out:
        raise UserError("none of the sampled images could be read")
    return torch.stack(out).permute(0, 3, 1, 2), split.labels[torch.tensor(kept)]
