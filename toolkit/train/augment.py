"""Batch augmentation on the device: random crops and flips as one gather, no per-sample Python."""

from __future__ import annotations

import torch


def crop_flip(images: torch.Tensor, idx: torch.Tensor, params: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """Samples `idx` of `images`, each randomly cropped (zero padding `pad`) and flipped: one gather.

    images: (N, 3, H, W) uint8, on the device; idx: (B,) int64; params: (B, 3) int64 from
    TrainPlan.augment_params. Output pixel (i, j) of sample b is padded[idx[b], :, dy + i, dx + j],
    with j mirrored (W-1-j) when the flip bit is set. Reading the dataset tensor directly with the
    shifted coordinates fuses indexing, padding and cropping into one pass; no per-sample Python.
    """
    C, H, W = images.shape[1:]
    dev = images.device
    params = params.to(dev, non_blocking=True)
    dy = params[:, 0:1] - pad if pad else torch.zeros_like(params[:, 0:1])
    dx = params[:, 1:2] - pad if pad else torch.zeros_like(params[:, 1:2])
    cols = torch.arange(W, device=dev)
    if flip:
        cols = torch.where(params[:, 2:3].bool(), W - 1 - cols, cols)
    rows = torch.arange(H, device=dev) + dy  # (B, H), may step outside the image
    cols = cols + dx  # (B, W)
    inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]  # (B, H, W)
    offset = idx.to(dev)[:, None, None] * (C * H * W) + rows.clamp(0, H - 1)[:, :, None] * W + cols.clamp(0, W - 1)[:, None, :]
    offset = offset[:, None] + torch.arange(0, C * H * W, H * W, device=dev)[None, :, None, None]  # (B, C, H, W)
    return images.reshape(-1).take(offset) * inside[:, None]


def augment(x: torch.Tensor, params: torch.Tensor, pad: int, flip: bool) -> torch.Tensor:
    """crop_flip of a whole batch x (B, 3, H, W) uint8, e.g. one a DataLoader just decoded."""
    return crop_flip(x, torch.arange(len(x), device=x.device), params, pad, flip)
