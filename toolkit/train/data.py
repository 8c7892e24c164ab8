"""Datasets (shapes | imagefolder | cifar10) as uint8 images + labels, and how batches are drawn.

Two sources give the same (B, 3, H, W) uint8 batches:
  memory  the split decoded once into one uint8 tensor (cached on disk, see cache.py),
          moved to the device once, indexed per batch: no per-sample Python.
  stream  files decoded every epoch by DataLoader workers, for data larger than memory.
Augmentation (random crop with padding, flip) and normalisation happen afterwards on the
device, on whole batches, identically for both sources.

Randomness is counter-based: the shuffle of epoch e comes from a generator seeded with
(seed, e, 0), and each augmentation op draws sample i's parameters for epoch e from its own
stream (seed, e, op), see augment.py. Nothing depends on the rank, the world
size or how far a previous process got, which is what makes resume exact and makes 2
processes with batch B/2 see the same samples as 1 process with batch B.
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
from toolkit.train.augment import EpochAugment, stream

log = logging.getLogger(__name__)


@dataclass
class Split:
    labels: torch.Tensor  # (N,) int64
    images: torch.Tensor | None = None  # (N, 3, H, W) uint8, when in memory
    files: list[str] | None = None  # absolute paths, when streamed

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
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
            return np.stack([images.resize(Image.fromarray(a), cfg.image_size, cfg.resize, cfg.interpolation)
                             for a in x])

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
            out.append(torch.from_numpy(images.load(split.files[i], cfg.image_size, cfg.resize, cfg.max_image_pixels,
                                                    cfg.interpolation)))
            kept.append(i)
        except images.DecodeError:
            continue
    if not out:
        raise UserError("none of the sampled images could be read")
    return torch.stack(out).permute(0, 3, 1, 2), split.labels[torch.tensor(kept)]


# --- batches ---------------------------------------------------------------------------------


class TrainPlan:
    """Which sample indices each process trains on, batch by batch, in each epoch.

    The epoch's permutation is cut to a multiple of the world size and dealt round-robin,
    like DistributedSampler: process r gets perm[r::world]. Batch k of every process
    together is perm[k*B*world : (k+1)*B*world], the same samples a single process with
    batch B*world takes at step k. The batch count is a multiple of grad_accum, so an
    optimizer step never straddles two epochs. The two are equal in exact arithmetic; in
    float32 they round differently (another batch size and thread count), and a ReLU input
    within that rounding of zero passes a gradient in one run only, so the weights can part
    by more than rounding. tests/test_processes.py compares them in float64.

    With drop_last, an epoch's incomplete last batch is left out (a random few samples each epoch,
    as DataLoader(drop_last=True)): a batch of a few images gives BatchNorm noisy statistics.

    No process ever gets a batch of one image (BatchNorm in train mode cannot normalise a
    single value per channel): a last batch of one image per process joins the batch before
    it (B + 1 images). That is the one place where N processes with batch B and one process
    with batch B*N group samples differently: the last step of N processes holds (B+1)*N
    images, where one process takes B*N and then N. Both are functions of (n, B, world), so
    resume stays exact.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, grad_accum: int = 1,
                 drop_last: bool = False):
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.per_rank = n // world
        full, tail = divmod(self.per_rank, batch_size)
        if drop_last and full > 0:  # an incomplete last batch is left out (other samples each epoch)
            tail = 0
        merged = tail == 1 and full > 0  # a tail of one image joins the batch before it
        batches = full + (tail > 0) - merged
        self.num_batches = batches - batches % grad_accum
        self.last_end = self.per_rank if merged and self.num_batches == batches else self.num_batches * batch_size
        if self.num_batches == 0 or self.per_rank < 2:
            raise UserError(
                f"the training set ({n} images) is too small for data.batch_size={batch_size} x "
                f"{world} processes x train.grad_accum={grad_accum} (every process needs a batch of at least "
                "two images); lower one of them"
            )

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=stream(self.seed, epoch, 0))

    def batches(self, epoch: int, start: int = 0) -> list[torch.Tensor]:
        """Index batches of this process for `epoch`, from batch `start` on; none holds a single image."""
        mine = self.permutation(epoch)[: self.per_rank * self.world][self.rank :: self.world]
        b, last = self.batch_size, self.num_batches - 1
        return [mine[k * b : (self.last_end if k == last else (k + 1) * b)] for k in range(start, self.num_batches)]


def eval_shards(n: int, world: int, rank: int, batch_size: int) -> list[torch.Tensor]:
    """This process's validation indices (r::world, disjoint: each image counted once), batched."""
    mine = torch.arange(rank, n, world)
    return list(mine.split(batch_size)) if len(mine) else []


class Normalize(torch.nn.Module):
    """uint8 or [0, 1] float (B, 3, H, W) -> (x - mean) / std. Used in training and in the ONNX graph."""

    def __init__(self, mean, std, scale: float = 1.0 / 255):
        super().__init__()
        gain, shift = images.normalization(mean, std, scale)  # (x * scale - mean) / std as one multiply-add
        self.register_buffer("gain", torch.from_numpy(gain).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.from_numpy(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.gain + self.shift


# --- the streaming source --------------------------------------------------------------------


class FileImages(torch.utils.data.Dataset):
    """Decode files in DataLoader workers; an unreadable file gives label -100 (ignored by the loss)."""

    def __init__(self, files: list[str], labels: torch.Tensor, cfg: DataConfig):
        self.files, self.labels, self.cfg = files, labels, cfg

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            c = self.cfg
            a = images.load(self.files[i], c.image_size, c.resize, c.max_image_pixels, c.interpolation)
            return torch.from_numpy(a).permute(2, 0, 1), self.labels[i]
        except images.DecodeError as e:
            log.warning("skipping %s: %s", self.files[i], e)
            return torch.zeros(3, self.cfg.image_size, self.cfg.image_size, dtype=torch.uint8), torch.tensor(-100)


class _IndexBatches(torch.utils.data.Sampler):
    """A batch sampler whose batches are set before each pass (so workers can persist)."""

    def __init__(self):
        self.current: list[torch.Tensor] = []

    def __iter__(self):
        return iter([b.tolist() for b in self.current])

    def __len__(self) -> int:
        return len(self.current)


def _ignore_stop_signals(worker_id: int) -> None:
    """Decode workers outlive a SIGTERM sent to the whole process group, so the trainer can save first."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class BatchSource:
    """Index batches -> (x uint8 (B, 3, H, W), y int64 (B,)) on `device`, from memory or files."""

    def __init__(self, split: Split, cfg: DataConfig, device: torch.device, workers: int, keep_host: bool = True):
        self.device = device
        self.labels = split.labels.to(device)
        if split.images is not None:
            self.images = split.images.to(device)  # once: the whole split lives on the device
            if not keep_host and self.images.device != split.images.device:
                split.images = None  # release the host copy (this process would otherwise hold both)
            self.loader = None
        else:
            self.sampler = _IndexBatches()
            self.loader = torch.utils.data.DataLoader(
                FileImages(split.files, split.labels, cfg), batch_sampler=self.sampler,
                num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=_ignore_stop_signals,
                persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                generator=torch.Generator(),  # its own: never draw from the global RNG (exact resume)
            )

    def __call__(self, batches: list[torch.Tensor], aug: EpochAugment | None = None):
        """Yield (x, y) per index batch, augmented by `aug` (this epoch's, from Augment.for_epoch)."""
        if self.loader is None:
            for idx in batches:
                dev_idx = idx.to(self.device, non_blocking=True)
                if aug:  # the fast path: crop and flip fused into the gather from the dataset tensor
                    yield aug.take(self.images, dev_idx, idx, self.labels[dev_idx])
                else:
                    yield self.images[dev_idx], self.labels[dev_idx]
            return
        self.sampler.current = batches
        for idx, (x, y) in zip(batches, self.loader):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield aug(x, idx, y) if aug else (x, y)
