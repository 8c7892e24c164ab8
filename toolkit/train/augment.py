"""Batch augmentation on the device: ops that draw per-sample parameters for an epoch and apply
them to whole batches, with no per-sample Python.

Randomness: each op draws from its own stream, a generator seeded with SeedSequence([seed,
epoch, op.stream]); stream 0 is the epoch's shuffle (batches.TrainPlan). An op draws a table of
parameters for every sample of the training set at once (row i: sample i), so what sample i
gets in epoch e depends on (seed, e, op) only: not on the batch size, the number of processes,
where a resumed run started, or which other ops are on (a mixing op's partner image is the one
before it in its batch: mixing.py). Adding an op never changes the draws of the existing ones.

Fast path: the leading random crop and flip are done as one gather straight from the
device-resident dataset (`crop_flip`); further ops run on the gathered batch.

Adding an op takes a class and a line in `Augment.from_config`, behind a new `data.*` key in config/schema.py
(documented by its trailing comment). `Cutout` below is the whole pattern: fields for its settings, a
`name`, a `stream` id never used before (the other ops keep their draws; never renumber one), `draw(n,
g)` making the epoch's (N, k) table from its own generator (row i: sample i), and `__call__(x, y,
params)` applying a batch's rows (on x's device) to x (B, 3, H, W) uint8 with no per-sample Python,
returning uint8. Larger kernels live in their own module (autoaugment.py, mixing.py, warp.py), the op
here. An op that mixes labels (MixUpCutMix) returns soft targets as y, (B, classes) float32, which the
loss (mixing.CrossEntropy) takes as they are; it must come last. tests/test_augment_ops.py pins each
op's draws.

Ops and their streams: 1 crop, 2 flip, 3 affine, 4 cutout, 5 trivial (TrivialAugment), 6 rrc
(random-resized-crop), 7 mix (mixup/CutMix). Order of application: crop, flip, rrc, affine, trivial,
cutout, mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

import toolkit.train.autoaugment as autoaugment
import toolkit.train.mixing as mixing
import toolkit.train.warp as warp


def stream(seed: int, epoch: int, stream_id: int) -> torch.Generator:
    """A CPU generator for (seed, epoch, stream): well mixed by SeedSequence, stable across Python versions."""
    state = np.random.SeedSequence([seed, epoch, stream_id]).generate_state(1, dtype=np.uint64)[0]
    g = torch.Generator()
    g.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


class Op:
    """One augmentation. `draw` makes an epoch's (N, k) parameters from the op's own generator;
    `__call__` applies a batch's rows of them to a uint8 batch on the device."""

    name: ClassVar[str] = ""
    stream: ClassVar[int] = 0  # the random stream id: unique per op, never renumbered (it fixes the draws)

    def draw(self, n: int, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, y: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


@dataclass
class RandomCrop(Op):
    """Random crop of the image zero-padded by `pad` pixels on each side (same output size)."""

    pad: int = 4  # pixels
    name: ClassVar[str] = "crop"
    stream: ClassVar[int] = 1

    def draw(self, n, g):  # (N, 2) int64 offsets dy, dx in [0, 2*pad] into the padded image
        return torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)

    def __call__(self, x, y, params):
        return crop_flip(x, torch.arange(len(x), device=x.device), shift=params, pad=self.pad), y


@dataclass
class HorizontalFlip(Op):
    """Mirror left-right with probability 1/2."""

    name: ClassVar[str] = "flip"
    stream: ClassVar[int] = 2

    def draw(self, n, g):  # (N, 1) int64 flip bits
        return torch.randint(0, 2, (n, 1), generator=g)

    def __call__(self, x, y, params):
        return torch.where(params.view(-1, 1, 1, 1).bool(), x.flip(3), x), y


@dataclass
class RandomAffine(Op):
    """Rotate by up to +-`degrees` and scale by up to 1 +- `scale` about the centre, bilinear, zeros outside.

    Small rotations and size changes are what handwriting and photographed objects vary by (the
    elastic/affine distortions of the MNIST literature; torchvision's RandomAffine). One grid_sample
    for the whole batch.
    """

    degrees: float = 10.0
    scale: float = 0.1  # fraction
    name: ClassVar[str] = "affine"
    stream: ClassVar[int] = 3

    def draw(self, n, g):  # (N, 2) float32 in [-1, 1): angle and scale, as fractions of the maxima
        return torch.rand(n, 2, generator=g) * 2 - 1

    def __call__(self, x, y, params):
        import math

        angle = params[:, 0].float() * self.degrees * math.pi / 180
        zoom = 1 + params[:, 1].float() * self.scale
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (B, 2, 3)
        return warp.warp(x, theta), y


@dataclass
class Cutout(Op):
    """Zero a `size` x `size` square at a random centre (DeVries & Taylor 2017); it may overlap the border."""

    size: int = 8  # pixels
    name: ClassVar[str] = "cutout"
    stream: ClassVar[int] = 4

    def draw(self, n, g):  # (N, 2) int64: the square's centre (y, x) as a fraction of 2**16
        return torch.randint(0, 1 << 16, (n, 2), generator=g)

    def __call__(self, x, y, params):  # x (B, 3, H, W) uint8, params (B, 2) on x's device
        H, W = x.shape[2:]
        cy, cx = params[:, 0] * H >> 16, params[:, 1] * W >> 16
        lo = self.size // 2
        rows = torch.arange(H, device=x.device) - cy[:, None]  # (B, H)
        cols = torch.arange(W, device=x.device) - cx[:, None]  # (B, W)
        rows, cols = (rows >= -lo) & (rows < self.size - lo), (cols >= -lo) & (cols < self.size - lo)
        return x * ~(rows[:, None, :, None] & cols[:, None, None, :]), y


@dataclass
class RandomResizedCrop(Op):
    """torchvision's RandomResizedCrop on the batch: a box of `scale` x the area and aspect w/h in `ratio`
    (log-uniform), resized back to the image's size, bilinear, by one grid_sample (warp.resized_crop_boxes).

    It crops what the dataset holds (images already at data.image_size), so a box is enlarged to the full
    size: sub-pixel detail the decoded image did not keep is not recovered."""

    scale: tuple[float, float] = (0.08, 1.0)  # fractions of the area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height
    name: ClassVar[str] = "rrc"
    stream: ClassVar[int] = 6

    def draw(self, n, g):  # (N, 22) float32 uniforms, turned into boxes once the image size is known
        return warp.draw_resized_crops(n, g)

    def __call__(self, x, y, params):
        H, W = x.shape[2:]  # boxes on the CPU: float64 rounding, which not every device has
        boxes = warp.resized_crop_boxes(params.cpu(), H, W, self.scale, self.ratio)
        return warp.warp(x, warp.box_theta(boxes, H, W).to(x.device), padding="border"), y


@dataclass
class TrivialAugment(Op):
    """Per sample one op of TrivialAugmentWide's 14 at a random strength (Müller & Hutter 2021); autoaugment.py."""

    name: ClassVar[str] = "trivial"
    stream: ClassVar[int] = 5

    def draw(self, n, g):  # (N, 3) int64: op index, magnitude bin, sign bit
        return autoaugment.draw(n, g)

    def __call__(self, x, y, params):
        return autoaugment.apply(x, params), y


@dataclass
class MixUpCutMix(Op):
    """Mixup and/or CutMix with the previous sample of the batch; y becomes soft targets (B, classes) float32.

    Beta(alpha, alpha) lambdas per sample, one of the two per sample when both are on; mixing.py."""

    mixup: float = 0.0  # Beta alpha; 0 = off
    cutmix: float = 0.0  # Beta alpha; 0 = off
    num_classes: int = 2
    name: ClassVar[str] = "mix"
    stream: ClassVar[int] = 7

    def draw(self, n, g):  # (N, 4) float32: lambda, CutMix flag, box centre y, x
        return mixing.draw(n, g, self.mixup, self.cutmix)

    def __call__(self, x, y, params):
        return mixing.mix(x, y, params, self.num_classes)


class Augment:
    """The ops, in order, under one seed; `for_epoch` draws an epoch's parameters of every op."""

    def __init__(self, ops: list[Op], seed: int):
        streams = [op.stream for op in ops]
        if 0 in streams or len(set(streams)) != len(streams):
            raise ValueError(f"augmentation ops need distinct stream ids above 0 (0 is the shuffle); got {streams}")
        self.ops, self.seed = list(ops), seed

    @classmethod
    def from_config(cls, cfg, seed: int, num_classes: int = 0) -> Augment | None:
        """The ops `cfg` (a DataConfig) asks for; None when it asks for none. num_classes: for mixup/CutMix."""
        if not cfg.augment:
            return None
        ops: list[Op] = []
        if cfg.crop_padding > 0:
            ops.append(RandomCrop(cfg.crop_padding))
        if cfg.hflip:
            ops.append(HorizontalFlip())
        if cfg.random_resized_crop:
            ops.append(RandomResizedCrop(tuple(cfg.rrc_scale), tuple(cfg.rrc_ratio)))
        if cfg.rotate_degrees > 0 or cfg.scale_jitter > 0:
            ops.append(RandomAffine(cfg.rotate_degrees, cfg.scale_jitter))
        if cfg.trivial_augment:
            ops.append(TrivialAugment())
        if cfg.cutout > 0:
            ops.append(Cutout(cfg.cutout))
        if cfg.mixup > 0 or cfg.cutmix > 0:
            if num_classes < 2:
                raise ValueError("mixup/CutMix need the class count (num_classes)")
            ops.append(MixUpCutMix(cfg.mixup, cfg.cutmix, num_classes))
        return cls(ops, seed) if ops else None

    def for_epoch(self, epoch: int, n: int) -> EpochAugment:
        """The parameters of every op for the `n` training samples in `epoch`."""
        return EpochAugment(self.ops, [op.draw(n, stream(self.seed, epoch, op.stream)) for op in self.ops])


class EpochAugment:
    """One epoch's augmentation: ops with their (N, k) parameter tables (CPU, row i: sample i)."""

    def __init__(self, ops: list[Op], params: list[torch.Tensor]):
        self.ops, self.params = ops, params
        # the fast path: a leading crop and/or flip run as one gather
        fused = 0
        if fused < len(ops) and isinstance(ops[fused], RandomCrop):
            fused += 1
        if fused < len(ops) and isinstance(ops[fused], HorizontalFlip):
            fused += 1
        self.fused = fused

    def take(self, images: torch.Tensor, dev_idx: torch.Tensor, idx: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `idx` of the dataset `images` (N, 3, H, W) uint8 on the device, augmented, with labels y.

        dev_idx: idx on the images' device; idx: (B,) int64 on the CPU (indexes the parameter tables).
        """
        shift = flip = None
        pad = 0
        for op, table in zip(self.ops[: self.fused], self.params):
            if isinstance(op, RandomCrop):
                shift, pad = table[idx], op.pad
            else:
                flip = table[idx, 0]
        x = crop_flip(images, dev_idx, shift, flip, pad) if self.fused else images[dev_idx]
        for op, table in zip(self.ops[self.fused:], self.params[self.fused:]):
            x, y = op(x, y, table[idx].to(x.device, non_blocking=True))
        return x, y

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a whole batch x (B, 3, H, W) uint8 (e.g. one a DataLoader just decoded) of samples `idx`."""
        return self.take(x, torch.arange(len(x), device=x.device), idx, y)


def crop_flip(images: torch.Tensor, idx: torch.Tensor, shift: torch.Tensor | None = None,
              flip: torch.Tensor | None = None, pad: int = 0) -> torch.Tensor:
    """Samples `idx` of `images`, each cropped from the image zero-padded by `pad` and flipped: one gather.

    images: (N, C, H, W) uint8, on the device; idx: (B,) int64; shift: (B, 2) int64 offsets dy, dx in
    [0, 2*pad] or None (no crop); flip: (B,) int64/bool flip bits or None. Output pixel (i, j) of
    sample b is padded[idx[b], :, dy + i, dx + j], with j mirrored (W-1-j) when the flip bit is set.
    Reading the dataset tensor directly with the shifted coordinates fuses indexing, padding and
    cropping into one pass.
    """
    C, H, W = images.shape[1:]
    dev = images.device
    B = len(idx)
    if shift is None:
        shift, pad = torch.full((B, 2), pad, dtype=torch.int64), pad
    shift = shift.to(dev, non_blocking=True)
    dy, dx = shift[:, 0:1] - pad, shift[:, 1:2] - pad  # (B, 1) each
    cols = torch.arange(W, device=dev).expand(B, W)
    if flip is not None:
        cols = torch.where(flip.to(dev, non_blocking=True).view(B, 1).bool(), W - 1 - cols, cols)
    rows = torch.arange(H, device=dev) + dy  # (B, H), may step outside the image
    cols = cols + dx  # (B, W)
    inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]  # (B, H, W)
    offset = (idx.to(dev)[:, None, None] * (C * H * W) + rows.clamp(0, H - 1)[:, :, None] * W
              + cols.clamp(0, W - 1)[:, None, :])
    offset = offset[:, None] + torch.arange(0, C * H * W, H * W, device=dev)[None, :, None, None]  # (B, C, H, W)
    return images.reshape(-1).take(offset) * inside[:, None]
