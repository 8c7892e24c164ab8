"""TrivialAugment on whole uint8 batches on the device: per sample one op and one strength, no per-sample Python.

Müller & Hutter 2021, "TrivialAugment: Tuning-free yet state-of-the-art data augmentation": for each
image draw one op uniformly from a set and one magnitude uniformly from its range, and apply it. The
op set and the ranges are torchvision's TrivialAugmentWide (31 magnitude bins; a signed op gets a
random sign), and the colour ops compute what torchvision's tensor kernels compute (blend, then
truncate to uint8; equalize is PIL's rule). Differences, each for a reason:
- translation is relative, up to 150/331 of the side (torchvision's RandAugment form): the wide set's
  absolute 32 px were tuned at 32 px, where they are the whole side, and mean another thing at 8 or 224 px;
- geometric ops resample bilinearly about the image centre (torchvision: nearest neighbour, shears
  about the top-left corner), black outside: one grid_sample for all geometric samples of the batch.

Speed: the batch is grouped by op (one index and one index_copy per op present), so each sample is
computed once; computing every op for every sample and selecting with `where` costs about the op
count in passes. `python benchmarks/augment_speed.py --threads 1`, batch 256 on the shared 2-core
machine: grouped 14 / 35 / 73 ms at 32 / 64 / 128 px, `where` 97 / 356 / 2,614 ms (a training step
of speedrun_net_s at 32 px: 742 ms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import toolkit.train.warp as warp

BINS = 31  # magnitude bins (torchvision's num_magnitude_bins)
TRANSLATE = 150 / 331  # largest translation, a fraction of the side
# name: (largest magnitude, signed); the magnitude of bin b is largest * b / (BINS - 1)
OPS = {
    "identity": (0.0, False),
    "shear_x": (0.99, True),  # shear factor (tan of the angle)
    "shear_y": (0.99, True),
    "translate_x": (TRANSLATE, True),  # fraction of the width
    "translate_y": (TRANSLATE, True),
    "rotate": (135.0, True),  # degrees
    "brightness": (0.99, True),  # the factor is 1 + magnitude
    "color": (0.99, True),  # saturation
    "contrast": (0.99, True),
    "sharpness": (0.99, True),
    "posterize": (6.0, False),  # bits dropped: 8 - round(magnitude) bits kept (8..2)
    "solarize": (255.0, False),  # the threshold is 255 - magnitude: pixels at or above it are inverted
    "autocontrast": (0.0, False),
    "equalize": (0.0, False),
}
NAMES = tuple(OPS)  # an op's index is its position here: never reorder (it fixes the draws' meaning)
GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def draw(n: int, g: torch.Generator) -> torch.Tensor:
    """(N, 3) int64 per sample: op index into NAMES, magnitude bin in [0, BINS), sign bit."""
    return torch.stack([torch.randint(0, len(NAMES), (n,), generator=g), torch.randint(0, BINS, (n,), generator=g),
                        torch.randint(0, 2, (n,), generator=g)], 1)


def magnitudes(params: torch.Tensor) -> torch.Tensor:
    """(B,) float32 signed magnitude of each sample's op, in the op's unit (see OPS), from draw()'s rows."""
    top = torch.tensor([m for m, _ in OPS.values()], device=params.device)
    signed = torch.tensor([s for _, s in OPS.values()], device=params.device)
    op, b, sign = params.unbind(1)
    m = top[op] * b.float() / (BINS - 1)
    return torch.where(signed[op] & (sign > 0), -m, m)


def apply(x: torch.Tensor, params: torch.Tensor, grouped: bool = True) -> torch.Tensor:
    """x (B, 3, H, W) uint8 with each sample's op and magnitude from params (B, 3) (draw()'s rows); uint8.

    grouped: each op runs on its own samples only (the default); False: every op runs on the whole
    batch and `where` selects (the same result; for benchmarks/augment_speed.py)."""
    op, m = params[:, 0], magnitudes(params)
    out = x.clone()
    groups = [(GEOMETRIC, _geometric)] + [((name,), fn) for name, fn in KERNELS.items()]
    for names, fn in groups:
        mask = torch.zeros_like(op, dtype=torch.bool)
        for name in names:
            mask |= op == NAMES.index(name)
        if grouped:
            sel = mask.nonzero()[:, 0]
            if len(sel):
                out.index_copy_(0, sel, fn(x[sel], m[sel], op[sel]))
        else:
            out = torch.where(mask[:, None, None, None], fn(x, m, op), out)
    return out


def _geometric(x, m, op):  # shear, translate and rotate about the centre: one grid_sample
    H, W = x.shape[2:]
    zero = torch.zeros_like(m)
    is_ = {name: op == NAMES.index(name) for name in GEOMETRIC}
    angle = torch.where(is_["rotate"], m, zero) * math.pi / 180
    cos, sin = torch.cos(angle), torch.sin(angle)
    shx, shy = torch.where(is_["shear_x"], m, zero) * H / W, torch.where(is_["shear_y"], m, zero) * W / H
    tx, ty = torch.where(is_["translate_x"], -2 * m, zero), torch.where(is_["translate_y"], -2 * m, zero)
    theta = torch.stack([torch.stack([cos, -sin + shx, tx], 1), torch.stack([sin + shy, cos, ty], 1)], 1)
    return warp.warp(x, theta)


def _blend(x, degenerate, factor, towards=False):  # torchvision's blend on uint8: mix, clamp, truncate
    xf, f = x.float(), factor.view(-1, 1, 1, 1)
    g = 1 - f
    # its sharpness kernel computes x + (1 - f)(degenerate - x), the others f x + (1 - f) degenerate: each op
    # follows its own, as the two truncate differently now and then (a pixel may still differ by one level:
    # torchvision's factors are float64 Python numbers)
    out = xf + g * (degenerate - xf) if towards else xf * f + degenerate * g
    return out.clamp_(0, 255).to(torch.uint8)


def _grey(x):  # (B, 1, H, W) float32 luma, floored as torchvision's uint8 kernels do
    r, g, b = x.float().unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).floor_()[:, None]


def _sharpness_degenerate(x):  # torchvision's: a 3x3 smoothing ([1 1 1; 1 5 1; 1 1 1] / 13), borders kept
    C = x.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13
    blurred = F.conv2d(x.float(), kernel.expand(C, 1, 3, 3), groups=C).round_()
    out = x.float()
    out[:, :, 1:-1, 1:-1] = blurred
    return out


def _posterize(x, m, op):
    keep = 8 - m.round().long()  # bits kept, 8..2
    mask = ((255 << (8 - keep)) & 255).to(torch.uint8)
    return x & mask.view(-1, 1, 1, 1)


def _solarize(x, m, op):
    threshold = (255 - m).view(-1, 1, 1, 1)
    return torch.where(x.float() >= threshold, 255 - x, x)


def _autocontrast(x, m, op):  # per image and channel: stretch [min, max] to [0, 255]; a flat channel stays
    xf = x.float()
    lo, hi = xf.amin((2, 3), keepdim=True), xf.amax((2, 3), keepdim=True)
    flat = hi == lo
    inv_scale = torch.where(flat, 1.0, (hi - lo) * (1 / 255))
    return ((xf - torch.where(flat, 0.0, lo)) / inv_scale).clamp_(0, 255).to(torch.uint8)


def _equalize(x, m, op):  # PIL's histogram equalisation per image and channel, all histograms in one scatter
    B, C, H, W = x.shape
    flat = x.reshape(B * C, H * W).long()
    hist = torch.zeros(B * C, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    cum = hist.cumsum(1)
    top_count = hist.gather(1, cum.argmax(1, keepdim=True))  # pixels at the channel's largest value
    step = (H * W - top_count) // 255  # (B*C, 1)
    lut = ((cum[:, :-1] + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1).to(torch.uint8)  # (B*C, 256)
    out = torch.where(step > 0, lut.gather(1, flat), flat.to(torch.uint8))
    return out.view(B, C, H, W)


KERNELS = {  # op name -> fn(x (k, 3, H, W) uint8, magnitude (k,), op (k,)) -> uint8; geometric ops: _geometric
    "brightness": lambda x, m, op: _blend(x, torch.zeros((), device=x.device), 1 + m),
    "color": lambda x, m, op: _blend(x, _grey(x), 1 + m),
    "contrast": lambda x, m, op: _blend(x, _grey(x).mean((1, 2, 3), keepdim=True), 1 + m),
    "sharpness": lambda x, m, op: _blend(x, _sharpness_degenerate(x), 1 + m, towards=True),
    "posterize": _posterize,
    "solarize": _solarize,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
}
