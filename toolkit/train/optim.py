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


def backbone_factor(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """Multiplier of the backbone's learning rate at `step` (the classifier's is 1).

    0 during model.freeze_epochs (the classifier learns alone), then a linear ramp to optim.backbone_lr_scale
    over optim.warmup_epochs (discriminative warmup: a new classifier's large early gradients do not
    reach pretrained features at full rate); without freezing, optim.backbone_lr_scale throughout.
    """
    scale = cfg.optim.backbone_lr_scale
    if not cfg.model.freeze_epochs:
        return scale
    frozen = cfg.model.freeze_epochs * steps_per_epoch
    if step < frozen:
        return 0.0
    ramp = max(1, int(cfg.optim.warmup_epochs * steps_per_epoch))
    return scale * min(1.0, (step - frozen + 1) / ramp)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, step: int, steps_per_epoch: int, cfg: Config) -> None:
    """Every group's rate for this step: `lr`, times backbone_factor for the backbone groups."""
    factor = backbone_factor(step, steps_per_epoch, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * factor if group.get("backbone") else lr


def build_optimizer(model: nn.Module, cfg: Config, heads: list[str] = ()) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and normalisation weights (1-d tensors).

    `heads`: module names of the classifier (pretrained.classifier_prefixes); the other parameters form
    the backbone groups, whose rate set_lr scales (optim.backbone_lr_scale, model.freeze_epochs).
    """
    from toolkit.train.pretrained import is_head

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for backbone in (False, True):
        part = [(n, p) for n, p in named if (not is_head(n, list(heads))) == backbone] if heads else \
            (named if not backbone else [])
        for decay in (True, False):
            params = [p for n, p in part if (p.ndim > 1) == decay]
            if params:
                groups.append({"params": params, "weight_decay": cfg.optim.weight_decay if decay else 0.0,
                               "backbone": backbone})
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
    if cfg.optim.name == "sgd":  # fused: one kernel for all parameters instead of one per tensor
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
                               fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=fused)
