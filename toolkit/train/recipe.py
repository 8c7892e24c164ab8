"""A training recipe chosen from the data: `toolkit train DIR` and `toolkit config DIR`.

`recipe_for(folder, overrides)` looks at the folder (class counts, image sizes from PIL headers, and
whether class-average images are mirror-symmetric: survey.py) and returns a Config that fits a time budget
(`train.budget_minutes`) on this machine. It imports no torch, so `toolkit config DIR` is quick.

The rules, and why:
- Never upsample. Small images (short side <= 64 px: digits, icons, CIFAR-sized crops) train at their
  native size with the speed-run network (`speedrun_net*`, whose pooling adapts down to 8 px),
  random translation of 1/8 of the side, cutout. Larger images train at a modest size (64 px on a CPU,
  128 px on a GPU) with translation, a small rotation and zoom, and cutout, or at a pretrained
  backbone's size when one is available.
- No random-resized-crop for photos (`data.random_resized_crop`): the dataset holds each photo already
  at the training size, so the op can only enlarge a part of it. Ants/bees photos at 64 px (3 seeds,
  100 epochs, 153 val images): 80.2% best / 77.1% last epoch against 78.4 / 77.3% for translation +
  affine, 76.7 against 76.5% over the runs' second half: not better beyond the noise.
- Mixup (alpha 0.2) for small images in runs of MIXUP_FROM_EPOCHS+ epochs (it pays only over many): on
  digits (84 epochs, 6 seeds) +0.24 points best and last epoch (two of 899 images; 4 seeds better, 1
  equal, 1 worse). CutMix, TrivialAugment, and mixup on the photos did not help in the budget (README).
- Horizontal flips only when class-average images are close to mirror-symmetric (photos are; digits
  and letters are not: a mirrored 3 is no 3).
- Epochs and the network width come from the budget: the widest speed-run network that gets at
  least `MIN_EPOCHS` epochs in the budget, epochs filling the budget up to what the data size can
  use (`_useful_epochs`: many passes over a few hundred images, few over a hundred thousand).
- Label smoothing 0.2, an EMA of the weights, Nesterov SGD with a one-cycle schedule whose peak
  learning rate follows the batch size (airbench's recipe, scaled).
Every choice is a key of the Config; `key=value` overrides win over the recipe.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from toolkit.config import Config, apply_overrides, parse_overrides
from toolkit.train.survey import FolderSummary, scan_folder

log = logging.getLogger(__name__)

SMALL_SIDE = 64  # px: images whose median short side is at most this train at their native size
PHOTO_SIZE_CPU, PHOTO_SIZE_GPU = 64, 128  # px: training size of larger images without a pretrained backbone
MIN_EPOCHS = 8  # a narrower network is chosen before fewer epochs than this
FULL_WIDTH_FROM = 10_000  # training images from which the full-width network pays for its 4x compute
CUTOUT_FROM = 16  # px: cutout (a quarter of the side) from this size; on 8 px digits it cost accuracy
EMA_HORIZON = 0.05  # the weight average spans about this fraction of the run's steps
MIXUP_ALPHA, MIXUP_FROM_EPOCHS = 0.2, 60  # small images: mixup from this many epochs (measured at 84 on digits)
EVALUATIONS = 15  # about this many evaluations per run (each one evaluates the weights and their EMA)
FLIP_ASYMMETRY = 0.5  # flips stay off when mirroring moves class means this far (x the between-class distance)

# Training images per second on one CPU core at 32 px (forward + backward + step, batch 64..256), measured
# on this project's 2-core machine; scaled by pixels (quadratic) and cores. A GPU is taken as 40 cores.
IMAGES_PER_CORE_S = {"speedrun_net": 60.0, "speedrun_net_s": 190.0, "speedrun_net_xs": 600.0,
                     "resnet_small": 170.0, "tutorial_net_bn": 4000.0}
GPU_CORES = 40.0
# Pretrained timm backbones the recipe uses for photo-sized images when their weights are in the local
# Hugging Face cache (never downloaded by the recipe): name, input size, training images/s per core at
# 32 px-equivalent (as above; ~10 images/s at 224 px on 2 cores for resnet18). Smallest first.
PRETRAINED = (("resnet18.a1_in1k", 224, 250.0), ("efficientnet_b0.ra_in1k", 224, 180.0),
              ("resnet50.a1_in1k", 224, 90.0))
SPEEDRUN_WIDTHS = ("speedrun_net", "speedrun_net_s", "speedrun_net_xs")  # widest first


def _has_gpu() -> bool:
    """A CUDA device is present (without importing torch: the driver's files). Only sizes the recipe."""
    return Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())


def images_per_second(arch: str, size: int, gpu: bool, cores: int | None = None) -> float:
    """Estimated training images/s of `arch` at `size` px on this machine (the loop measures the truth)."""
    cores = GPU_CORES if gpu else float(cores or os.cpu_count() or 1)
    per_core = IMAGES_PER_CORE_S.get(arch) or next(r for n, _, r in PRETRAINED if arch == f"timm/{n}")
    return per_core * cores * (32.0 / size) ** 2


def cached_backbone() -> tuple[str, int] | None:
    """(timm name, input size) of the first PRETRAINED backbone whose weights are in the local Hugging Face
    cache (HF_HOME / HF_HUB_CACHE respected); None without one or without huggingface_hub. No network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name, size, _ in PRETRAINED:
        if isinstance(try_to_load_from_cache(f"timm/{name}", "model.safetensors"), str):
            return name, size
    return None


def _fine_tune(cfg: Config, backbone: tuple[str, int], n_fit: int, gpu: bool, why: list[str]) -> Config:
    """The recipe with a pretrained backbone: its own input size, a frozen first epoch, a slower backbone."""
    name, size = backbone
    cfg.model.arch, cfg.model.pretrained, cfg.data.image_size = f"timm/{name}", True, size
    cfg.data.crop_padding, cfg.data.scale_jitter, cfg.data.rotate_degrees, cfg.data.cutout = size // 16, 0.1, 0.0, 0
    batch = int(min(64, max(16, 2 ** round(math.log2(max(n_fit, 1) / 16)))))
    rate = images_per_second(cfg.model.arch, size, gpu)
    epochs = int(max(2, min(30, 60.0 * cfg.train.budget_minutes * rate / max(n_fit, 1))))
    cfg.data.batch_size, cfg.data.drop_last, cfg.train.epochs = batch, True, epochs
    cfg.model.freeze_epochs, cfg.optim.backbone_lr_scale = 1, 0.1
    cfg.optim.name, cfg.optim.nesterov, cfg.optim.schedule = "sgd", True, "cosine"
    cfg.optim.lr, cfg.optim.warmup_epochs, cfg.optim.weight_decay = round(0.05 * math.sqrt(batch / 64), 4), 1.0, 1e-4
    cfg.train.label_smoothing = 0.1
    steps = epochs * max(1, n_fit // batch)
    cfg.train.ema_decay = round(1.0 - 1.0 / max(10.0, EMA_HORIZON * steps), 5)
    why.append(f"model timm/{name}: a pretrained backbone found in the local Hugging Face cache, at its own input "
               f"size {size} px; {epochs} epochs (about {epochs * n_fit / rate / 60:.1f} min), the classifier alone "
               f"for the first, then the backbone at 0.1x the rate after a one-epoch warm-up; batch {batch}, SGD "
               f"Nesterov, cosine from lr {cfg.optim.lr:g}, label smoothing 0.1, EMA decay {cfg.train.ema_decay:g}")
    return cfg


def _useful_epochs(num_train: int) -> int:
    """Passes over the data that still pay off: ~80 for 1,000 images, ~11 for 50,000 (then the budget decides)."""
    return int(min(100, max(10, 80 * math.sqrt(1000 / max(num_train, 1)))))


def choose(summary: FolderSummary, cfg: Config, gpu: bool | None = None) -> tuple[Config, list[str]]:
    """Fill `cfg` (defaults plus the user's overrides, which stay) with the recipe; returns it and the reasons."""
    gpu = _has_gpu() if gpu is None else gpu
    why: list[str] = []
    n, k = summary.num_train, len(summary.classes)
    held = 0.0 if summary.layout.test else cfg.data.test_fraction  # data.test_fraction's test set: never trained on
    n_fit = int(n * (1 - held) * (1 if summary.layout.val else 1 - cfg.data.val_fraction))
    cfg.data.kind, cfg.data.root = "imagefolder", str(summary.root)
    why.append(f"data: {n:,} training images in {k} classes ({min(summary.counts)}-{max(summary.counts)} per "
               f"class), median short side {summary.short_side} px; {summary.layout.note}"
               + (f"; {held:.0%} of them held out as the test set (data.test_fraction), {n_fit:,} to train on"
                  if held else ""))
    small = summary.short_side <= SMALL_SIDE
    if small:
        size = max(8, summary.short_side)
        cfg.data.crop_padding = max(1, size // 8)
        cfg.data.rotate_degrees, cfg.data.scale_jitter = 10.0, 0.1
        cfg.data.cutout = size // 4 if size >= CUTOUT_FROM else 0
        why.append(f"image size {size} px: the images' own size (never upsampled); augmentation: translation by up "
                   f"to {cfg.data.crop_padding} px, rotation up to 10 degrees, zoom +-10%"
                   + (f", cutout {cfg.data.cutout} px" if cfg.data.cutout else ""))
    elif (backbone := cached_backbone()) is not None:
        cfg.data.hflip = summary.flip_asymmetry is None or summary.flip_asymmetry < FLIP_ASYMMETRY
        why.append("horizontal flips " + ("on" if cfg.data.hflip else "off"))
        return _fine_tune(cfg, backbone, n_fit, gpu, why), why
    else:
        size = PHOTO_SIZE_GPU if gpu else PHOTO_SIZE_CPU
        cfg.data.crop_padding, cfg.data.cutout = size // 8, size // 4
        cfg.data.rotate_degrees, cfg.data.scale_jitter = 10.0, 0.2
        why.append(f"image size {size} px: photo-sized images, resized down (no pretrained backbone here); "
                   f"augmentation: translation by up to {size // 8} px, rotation up to 10 degrees, zoom +-20%, "
                   f"cutout {size // 4} px")
    cfg.data.image_size = size
    asym = summary.flip_asymmetry
    cfg.data.hflip = asym is None or asym < FLIP_ASYMMETRY
    why.append("horizontal flips " + ("on" if cfg.data.hflip else "off") + (
        "" if asym is None else f": mirroring moves class-average images {asym:.2f}x the distance between classes "
        f"({'below' if cfg.data.hflip else 'at or above'} {FLIP_ASYMMETRY})"))

    budget_s = 60.0 * cfg.train.budget_minutes
    useful = _useful_epochs(n_fit)
    arch = SPEEDRUN_WIDTHS[-1]
    widths = SPEEDRUN_WIDTHS if n_fit >= FULL_WIDTH_FROM else SPEEDRUN_WIDTHS[1:]
    for candidate in widths:  # the widest network that still gets enough epochs
        if budget_s * images_per_second(candidate, size, gpu) / max(n_fit, 1) >= min(MIN_EPOCHS, useful):
            arch = candidate
            break
    rate = images_per_second(arch, size, gpu)
    epochs = int(max(1, min(useful, budget_s * rate / max(n_fit, 1))))
    cfg.model.arch, cfg.train.epochs = arch, epochs
    why.append(f"model {arch}: the widest speed-run network with {min(MIN_EPOCHS, useful)}+ epochs in the budget"
               + ("" if n_fit >= FULL_WIDTH_FROM else f", at most half width below {FULL_WIDTH_FROM:,} images") + " "
               f"({cfg.train.budget_minutes:g} min, estimated {rate:,.0f} images/s on "
               f"{'a GPU' if gpu else f'{os.cpu_count()} CPU cores'})")
    why.append(f"{epochs} epochs: about {epochs * n_fit / rate / 60:.1f} min (a dataset of {n_fit:,} uses up to "
               f"{useful} epochs)")
    if small and epochs >= MIXUP_FROM_EPOCHS:  # see the module docstring for the measurements
        cfg.data.mixup = MIXUP_ALPHA
        why.append(f"mixup (alpha {MIXUP_ALPHA:g}): {epochs} epochs are enough for it to pay (from {MIXUP_FROM_EPOCHS})")

    batch = int(min(512, max(32, 2 ** round(math.log2(max(n_fit, 1) / 16)))))  # ~16+ steps per epoch
    cfg.data.batch_size, cfg.data.drop_last = batch, True
    cfg.optim.name, cfg.optim.nesterov, cfg.optim.momentum = "sgd", True, 0.9
    cfg.optim.schedule = "onecycle"
    cfg.optim.lr = round(0.2 * math.sqrt(batch / 64), 4)  # square-root scaling from 0.2 at batch 64
    cfg.optim.weight_decay = 5e-4 * 64 / batch if batch > 64 else 5e-4
    cfg.train.label_smoothing = 0.2
    steps = epochs * max(1, n_fit // batch)
    cfg.train.ema_decay = round(1.0 - 1.0 / max(10.0, EMA_HORIZON * steps), 5)
    cfg.train.eval_every = max(1, epochs // EVALUATIONS)
    why.append(f"batch {batch}, SGD Nesterov, one-cycle to lr {cfg.optim.lr:g}, label smoothing 0.2, EMA of the "
               f"weights (decay {cfg.train.ema_decay:g}: about {EMA_HORIZON:.0%} of the {steps:,} steps), evaluated "
               f"every {cfg.train.eval_every} epoch(s)")
    return cfg, why


def recipe_for(folder: str | Path, overrides: list[str] = (), gpu: bool | None = None) -> Config:
    """The Config `toolkit train DIR` runs: the recipe for `folder`, then the user's `key=value` overrides.

    Logs each choice and its reason at INFO. Raises UserError for a folder that is not a folder of
    class subfolders, or for a bad override.
    """
    nested = parse_overrides(list(overrides))
    user = Config()
    apply_overrides(user, nested)  # the budget and anything the recipe should respect
    summary = scan_folder(folder)
    cfg, why = choose(summary, user, gpu)
    cfg.name = Path(folder).resolve().name or "run"
    apply_overrides(cfg, nested)  # the user's word wins over the recipe
    for line in why:
        log.info("recipe: %s", line)
    if overrides:
        log.info("recipe: then your overrides: %s", " ".join(overrides))
    return cfg
