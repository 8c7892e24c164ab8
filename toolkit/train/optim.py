"""Optimizers and learning-rate schedules.

The schedule is a pure function of the optimizer step, so a resumed run needs no scheduler
state and every process computes the same rate.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from toolkit.config import Config


def lr_at(step: int, total: int, steps_per_epoch: int, cfg: Config) -> float:
    """Learning rate for optimizer step `step` (a pure function: resume needs no scheduler state)."""
    o = cfg.optim
    if o.schedule == "onecycle":  # linear up to lr over 30%, cosine down to lr/1e4
        up = max(1, int(0.3 * total))
        if step < up:
            return o.lr / 25 + (o.lr - o.lr / 25) * step / up
        t = (step - up) / max(1, total - up)
        return o.lr / 1e4 + (o.lr - o.lr / 1e4) * 0.5 * (1 + math.cos(math.pi * t))
    warmup = int(o.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return o.lr * (0.1 + 0.9 * step / warmup)
    if o.schedule == "constant":
        return o.lr
    t = (step - warmup) / max(1, total - warmup)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and normalisation weights (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
    if cfg.optim.name == "sgd":  # fused: one kernel for all parameters instead of one per tensor
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
                               fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=fused)
