"""Checks of config values beyond their types: allowed choices, ranges, list lengths and size bounds.

Each failed check is one sentence naming the key, the rule and the value given (a UserError).
"""

from __future__ import annotations

import logging

from toolkit import UserError
from toolkit.config.schema import Config
from toolkit.core.meta import INTERPOLATIONS, MAX_IMAGE_SIZE, short


CHOICES = {
    "data.kind": ("shapes", "imagefolder", "cifar10"),
    "data.resize": ("center_crop", "squash"),
    "data.interpolation": INTERPOLATIONS,
    "data.cache": ("auto", "memory", "stream"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("cosine", "onecycle", "constant"),
    "train.log_with": ("", "tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "trackio",
                       "swanlab", "all"),  # accelerate's trackers
}



def validate(cfg: Config) -> None:
    """Raise a UserError naming the first key whose value is out of its range; turn off train.eval_tta where
    data.hflip=false (with a warning)."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise UserError(f"config key '{key}' must be one of {', '.join(a for a in allowed if a)}; "
                            f"got {short(value)}")
    positive = {
        "data.image_size": cfg.data.image_size,
        "data.batch_size": cfg.data.batch_size,
        "train.epochs": cfg.train.epochs,
        "train.grad_accum": cfg.train.grad_accum,
        "train.keep_states": cfg.train.keep_states,
        "train.eval_every": cfg.train.eval_every,
        "optim.lr": cfg.optim.lr,
        "train.budget_minutes": cfg.train.budget_minutes,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key '{key}' must be positive; got {short(value)}")
    at_least_zero = {
        "data.crop_padding": cfg.data.crop_padding, "optim.momentum": cfg.optim.momentum,
        "data.rotate_degrees": cfg.data.rotate_degrees, "data.scale_jitter": cfg.data.scale_jitter,
        "data.cutout": cfg.data.cutout, "data.mixup": cfg.data.mixup, "data.cutmix": cfg.data.cutmix,
        "optim.weight_decay": cfg.optim.weight_decay, "optim.warmup_epochs": cfg.optim.warmup_epochs,
        "train.clip_grad_norm": cfg.train.clip_grad_norm, "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.stop_at_accuracy": cfg.train.stop_at_accuracy, "model.freeze_epochs": cfg.model.freeze_epochs,
        "optim.backbone_lr_scale": cfg.optim.backbone_lr_scale,
    }
    for key, value in at_least_zero.items():
        if value < 0:
            raise UserError(f"config key '{key}' must be 0 or more; got {short(value)}")
    for key, value in (("data.memory_limit_gb", cfg.data.memory_limit_gb), ("data.max_image_pixels",
                       cfg.data.max_image_pixels), ("train.max_nonfinite", cfg.train.max_nonfinite)):
        if value <= 0:
            raise UserError(f"config key '{key}' must be positive; got {short(value)}")
    for key, value, top in (("train.label_smoothing", cfg.train.label_smoothing, 1.0),
                            ("train.ema_decay", cfg.train.ema_decay, 1.0),
                            ("data.scale_jitter", cfg.data.scale_jitter, 1.0),
                            ("optim.min_lr_ratio", cfg.optim.min_lr_ratio, 1.0001),
                            ("train.stop_at_accuracy", cfg.train.stop_at_accuracy, 1.0001)):
        if not 0.0 <= value < top:
            raise UserError(f"config key '{key}' must be at least 0 and below {min(top, 1.0):g}; got {short(value)}")
    scale, ratio = cfg.data.rrc_scale, cfg.data.rrc_ratio
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise UserError(f"config key 'data.rrc_scale' needs two area fractions 0 < low <= high <= 1, e.g. 0.08,1; "
                        f"got {short(scale)}")
    if len(ratio) != 2 or not 0.01 <= ratio[0] <= ratio[1] <= 100.0:
        raise UserError(f"config key 'data.rrc_ratio' needs two aspect ratios 0.01 <= low <= high <= 100, e.g. "
                        f"0.75,1.3333; got {short(ratio)}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise UserError("config key 'optim.betas' needs two values in [0, 1), e.g. 0.9,0.999; "
                        f"got {short(cfg.optim.betas)}")
    if cfg.data.num_workers < -1:
        raise UserError("config key 'data.num_workers' must be -1 (one per core) or more; "
                        f"got {short(cfg.data.num_workers)}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise UserError(f"config key 'data.val_fraction' must be between 0 and 1; got {short(cfg.data.val_fraction)}")
    if not 0.0 <= cfg.data.test_fraction <= 0.5 or (cfg.data.test_fraction and cfg.data.kind == "cifar10"):
        raise UserError(f"config key 'data.test_fraction' must be from 0 to 0.5 (the part of the training images held "
                        f"out as a test set; image folders only); got {short(cfg.data.test_fraction)}")
    for key in ("data.mean", "data.std"):
        value = getattr(cfg.data, key.split(".")[1])
        if len(value) != 3:
            raise UserError(f"config key '{key}' needs 3 values (R, G, B); got {short(value)}")
    if min(cfg.data.std) <= 0:
        raise UserError(f"config key 'data.std' must be positive; got {short(cfg.data.std)}")
    for key, value, top in BOUNDS:  # sizes that would otherwise allocate or loop without bound
        value = value(cfg)
        if value > top:
            raise UserError(f"config key '{key}' must be at most {top:,}; got {short(value)}")
    if not 0 <= cfg.seed < 2**32:
        raise UserError(f"config key 'seed' must be a whole number from 0 to {2**32 - 1}; got {short(cfg.seed)}")
    if cfg.train.collective_timeout <= 0:
        raise UserError(f"config key 'train.collective_timeout' must be positive; got {cfg.train.collective_timeout}")
    if cfg.name in ("", ".", "..") or any(c in cfg.name for c in "/\\\0") or len(cfg.name) > 200:
        raise UserError(f"config key 'name' must be a plain folder name (no '/', not '..'); got {short(cfg.name)}")
    if cfg.data.batch_size < 2:  # BatchNorm in train mode needs more than one value per channel
        raise UserError(f"config key 'data.batch_size' must be at least 2 (a training batch of one image breaks "
                        f"BatchNorm); got {cfg.data.batch_size}")
    if cfg.train.eval_tta and not cfg.data.hflip:
        logging.getLogger(__name__).warning(
            "train.eval_tta is turned off: it averages each validation image with its mirror, but data.hflip=false "
            "says a mirrored image can be another class")
        cfg.train.eval_tta = False  # the resolved config written to the run says what ran


BOUNDS = (  # (key, how to read it, largest value allowed)
    ("data.image_size", lambda c: c.data.image_size, MAX_IMAGE_SIZE),
    ("data.batch_size", lambda c: c.data.batch_size, 65_536),
    ("data.crop_padding", lambda c: c.data.crop_padding, MAX_IMAGE_SIZE),
    ("data.mixup", lambda c: c.data.mixup, 1000.0),
    ("data.cutmix", lambda c: c.data.cutmix, 1000.0),
    ("data.num_workers", lambda c: c.data.num_workers, 1024),
    ("data.max_image_pixels", lambda c: c.data.max_image_pixels, 2**40),
    ("data.memory_limit_gb", lambda c: c.data.memory_limit_gb, 1e6),
    ("data.train_per_class", lambda c: c.data.train_per_class, 10**7),
    ("data.val_per_class", lambda c: c.data.val_per_class, 10**7),
    ("train.epochs", lambda c: c.train.epochs, 10**6),
    ("train.grad_accum", lambda c: c.train.grad_accum, 65_536),
    ("train.eval_every", lambda c: c.train.eval_every, 10**6),
    ("train.keep_states", lambda c: c.train.keep_states, 1000),
    ("train.checkpoint_every", lambda c: c.train.checkpoint_every, 2**40),
    ("train.max_nonfinite", lambda c: c.train.max_nonfinite, 2**40),
    ("train.collective_timeout", lambda c: c.train.collective_timeout, 7 * 86_400.0),
)

