"""Resampling of whole uint8 batches on the device: one affine grid_sample per batch, and the boxes of
random-resized-crop (torchvision's RandomResizedCrop rules, drawn for every sample at once).

Coordinates follow torch's affine_grid: theta (B, 2, 3) maps an output pixel's normalised position
(x, y in [-1, 1], half-pixel centres: align_corners=False) to the input position it reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ATTEMPTS = 10  # random-resized-crop: boxes tried per sample before the central fallback (torchvision's 10)


def warp(x: torch.Tensor, theta: torch.Tensor, padding: str = "zeros") -> torch.Tensor:
    """x (B, C, H, W) uint8 resampled bilinearly through theta (B, 2, 3) float; same shape, uint8.

    padding: "zeros" (black outside the image) or "border" (the edge pixel repeated)."""
    grid = F.affine_grid(theta.float(), list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def draw_resized_crops(n: int, g: torch.Generator) -> torch.Tensor:
    """(N, 2 * ATTEMPTS + 2) float32 uniforms in [0, 1): per attempt an area and a log-ratio draw, then the
    box's position (y, x). Turned into boxes by `resized_crop_boxes` once the image size is known."""
    return torch.rand(n, 2 * ATTEMPTS + 2, generator=g)


def resized_crop_boxes(u: torch.Tensor, H: int, W: int, scale: tuple[float, float],
                       ratio: tuple[float, float]) -> torch.Tensor:
    """Random-resized-crop boxes (B, 4) int64 (top, left, height, width) in pixels, from u = draws (B, 22).

    torchvision's RandomResizedCrop.get_params, vectorised: an attempt takes area ~ U(scale) x H*W and
    aspect w/h ~ exp(U(log ratio)), w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)); the
    first attempt with 0 < w <= W and 0 < h <= H wins, at a uniform position inside the image. When all
    ten fail, the central crop of the whole image clamped to the ratio range (torchvision's fallback).
    """
    u = u.double()  # box sides are rounded: float32 would move a few of them by one pixel at 224 px
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, 0:2 * ATTEMPTS:2])  # (B, 10)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1:2 * ATTEMPTS:2])
    w, h = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)  # (B, 10)
    first = torch.where(fits.any(1), fits.long().argmax(1), -1)  # the first attempt that fits, -1 none
    pick = first.clamp(min=0)[:, None]
    h, w = h.gather(1, pick)[:, 0], w.gather(1, pick)[:, 0]
    top = (u[:, -2] * (H - h + 1)).long().clamp(max=H - h)  # uniform over the H - h + 1 positions
    left = (u[:, -1] * (W - w + 1)).long().clamp(max=W - w)
    in_ratio = W / H  # the fallback: as much of the image as the ratio range allows, centred
    if in_ratio < ratio[0]:
        fw, fh = W, int(round(W / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(H * ratio[1])), H
    else:
        fw, fh = W, H
    fallback = torch.tensor([(H - fh) // 2, (W - fw) // 2, fh, fw], device=u.device)
    boxes = torch.stack([top, left, h, w], 1)
    return torch.where((first < 0)[:, None], fallback, boxes)


def box_theta(boxes: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """theta (B, 2, 3) that resizes each box (top, left, height, width) pixels to the whole output:
    the output pixel centres land where torch's interpolate (align_corners=False) would put them."""
    top, left, h, w = boxes.double().unbind(1)
    zero = torch.zeros_like(h)
    cx, cy = (2 * left + w) / W - 1, (2 * top + h) / H - 1  # box centre, normalised
    return torch.stack([torch.stack([w / W, zero, cx], 1), torch.stack([zero, h / H, cy], 1)], 1).float()
