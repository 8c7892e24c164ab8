"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on whole uint8 batches, with soft targets, and the
loss that takes them (with label smoothing).

Pairing: sample i is mixed with the sample before it in its batch (position i - 1, the first with the
last), whose pixels it takes a share of; a batch is a random draw of the epoch's shuffle, so the partner
is random too, and never the sample itself in a batch of two or more.

What is drawn per sample: each sample i has its own row in the epoch's table, as every op of the
`Augment` seam: lambda ~ Beta(alpha, alpha), whether it takes mixup or CutMix (1/2 each when both are
on), and the CutMix box's centre. So what sample i gets is a function of (seed, epoch, i) and does not
depend on the batch size or the number of processes; only its partner does, and that is fixed by the
epoch's batches, so a resumed run mixes the same pairs. timm's Mixup draws one lambda per batch by
default (mode="batch") and offers this per-sample form as mode="elem"; one draw per batch would tie
every draw to the batch size and the process count.

CutMix: the box has sides sqrt(1 - lambda) x H and x W, a uniform centre, and is clipped at the image
border; lambda is then the share of the sample's own pixels that remain (timm's correct_lam), so the
target weights are exactly the pixel shares. Mixup rounds the blend to uint8 (at most half a level).

Targets (B, classes) float32: lambda * one_hot(y_i) + (1 - lambda) * one_hot(y_partner); rows sum to 1.
A label of -100 (an unreadable file of the streaming source) is never mixed in: its own row is all
zero (left out of the loss, as cross-entropy's ignore_index) and a partner with it keeps its own image.

Accuracy: the training loop counts no training accuracy (only the loss); validation images are never
mixed and are counted against their labels. Were a training accuracy added, it should count the
argmax of the soft target, which is the larger share.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SWITCH = 0.5  # with both on: the share of samples that take CutMix (timm's switch_prob)


def draw(n: int, g: torch.Generator, mixup: float, cutmix: float) -> torch.Tensor:
    """(N, 4) float32 per sample: lambda, CutMix flag (0/1), box centre y and x as fractions of the side.

    mixup, cutmix: the Beta(alpha, alpha) parameters, 0 = off (not both). Each column has its own child
    generator, so the mixup lambdas of a seed stay the same when CutMix is turned on and the other way
    round (the switch then decides which of the two each sample uses)."""
    seeds = torch.randint(0, 2**62, (4,), generator=g).tolist()
    rng = [np.random.default_rng(s) for s in seeds]
    lam_mix = rng[0].beta(mixup, mixup, n) if mixup > 0 else np.ones(n)
    lam_cut = rng[1].beta(cutmix, cutmix, n) if cutmix > 0 else np.ones(n)
    use_cut = rng[2].random(n) < SWITCH if mixup > 0 and cutmix > 0 else np.full(n, cutmix > 0)
    centre = rng[3].random((n, 2))
    table = np.column_stack([np.where(use_cut, lam_cut, lam_mix), use_cut, centre])
    return torch.from_numpy(table).float()


def partners(b: int, device=None) -> torch.Tensor:
    """(B,) int64: the position in the batch whose pixels position i takes a share of: i - 1 (0 takes B - 1)."""
    return torch.arange(b, device=device).roll(1)


def mix(x: torch.Tensor, y: torch.Tensor, params: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix x (B, C, H, W) uint8, labels y (B,) int64, with draw()'s rows params (B, 4) on x's device.

    -> (x mixed, uint8 (B, C, H, W); targets (B, num_classes) float32: each row the pixel shares)."""
    B, _, H, W = x.shape
    p = partners(B, x.device)
    valid = y >= 0
    lam = torch.where(valid & valid[p], params[:, 0], torch.ones_like(params[:, 0]))  # (B,)
    cut = params[:, 1] > 0.5
    side = torch.sqrt(1 - lam)  # the box's sides as fractions of the image's
    h, w = (side * H).long(), (side * W).long()
    cy, cx = (params[:, 2] * H).long(), (params[:, 3] * W).long()
    top, bottom = (cy - h // 2).clamp(0, H), (cy + (h + 1) // 2).clamp(0, H)
    left, right = (cx - w // 2).clamp(0, W), (cx + (w + 1) // 2).clamp(0, W)
    rows = torch.arange(H, device=x.device)
    cols = torch.arange(W, device=x.device)
    rows = (rows >= top[:, None]) & (rows < bottom[:, None])  # (B, H)
    cols = (cols >= left[:, None]) & (cols < right[:, None])  # (B, W)
    box = cut[:, None, None, None] & rows[:, None, :, None] & cols[:, None, None, :]  # (B, 1, H, W)
    lam = torch.where(cut, 1 - (bottom - top) * (right - left) / (H * W), lam)  # the pixels' true shares
    other = x[p]
    blend = lam.view(-1, 1, 1, 1)
    mixed = (x.float() * blend + other.float() * (1 - blend)).round_().to(torch.uint8)
    out = torch.where(box, other, torch.where(cut[:, None, None, None], x, mixed))
    own = F.one_hot(y.clamp(min=0), num_classes).float() * valid[:, None]
    targets = lam[:, None] * own + (1 - lam)[:, None] * own[p]
    return out, targets


class CrossEntropy(nn.Module):
    """Cross-entropy with label smoothing for class labels (B,) int64 or soft targets (B, classes) float.

    Labels: torch's cross_entropy (label -100 ignored). Soft targets t (rows summing to 1, or all zero for
    a sample to leave out): loss_i = -sum_c t'_ic log softmax(logits_i)_c with t' = (1 - s) t + s / classes,
    the smoothing torch applies to class labels, averaged over the rows that are not all zero."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not target.is_floating_point():
            return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        s, weight = self.label_smoothing, target.sum(1, keepdim=True)  # weight: 1, or 0 for a row left out
        smoothed = (1 - s) * target + s / target.shape[1] * weight
        per_row = -(smoothed * F.log_softmax(logits.float(), 1)).sum(1)
        return per_row.sum() / (weight > 0).sum()
