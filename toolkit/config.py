"""Typed experiment configuration: YAML file + ``key=value`` overrides -> nested dataclasses.

The dataclasses below are the single source of truth for every key and default. A YAML file
holds only what differs from them. Unknown keys and ill-typed values are rejected with one
sentence naming the key (and the closest valid key for typos). The trailing comment of each
field is its help text: `toolkit train --help` and `toolkit config` read it from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from toolkit import UserError
from toolkit.core.meta import (DEFAULT_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, MAX_IMAGE_SIZE,
                               MAX_PIXELS, short)


@dataclass
class DataConfig:
    kind: str = "shapes"  # shapes | imagefolder | cifar10
    root: str = "data/shapes"  # shapes: generated here on first use when missing
    image_size: int = 32  # pixels; images are square after preprocessing
    resize: str = "center_crop"  # center_crop (shorter side, then crop) | squash (ignore aspect)
    interpolation: str = DEFAULT_INTERPOLATION  # resize filter: bilinear | bicubic; model.pretrained: the model's own
    batch_size: int = 64  # per process; global batch = batch_size * processes * train.grad_accum
    drop_last: bool = False  # leave out each epoch's incomplete last batch (few images = noisy BatchNorm statistics)
    val_fraction: float = 0.1  # imagefolder without val/: seeded split of train/
    test_fraction: float = 0.0  # no test/ folder: this part of train/ (seeded, per class) is tested once at the end
    augment: bool = True  # random crop with padding + horizontal flip, on whole batches
    crop_padding: int = 4  # pixels of zero padding around the random crop
    hflip: bool = True  # random horizontal flip with p=0.5
    rotate_degrees: float = 0.0  # random rotation by up to +- this many degrees; 0 = off
    scale_jitter: float = 0.0  # random zoom by up to 1 +- this fraction (with the rotation, one resampling); 0 = off
    cutout: int = 0  # side in pixels of a random square set to zero in each training image; 0 = off
    random_resized_crop: bool = False  # a random box (data.rrc_scale, data.rrc_ratio) resized to image_size
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # box area range, fractions of the image's
    rrc_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # box width/height range, log-uniform
    trivial_augment: bool = False  # TrivialAugmentWide: per image one of 14 ops (colour, rotate, ...) at a random strength
    mixup: float = 0.0  # mixup Beta(alpha, alpha): blend each image and label with another's; 0 = off
    cutmix: float = 0.0  # CutMix Beta alpha: paste a box of another image; 0 = off; with mixup: one of them per image
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # per channel, [0, 1] scale
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # per channel, [0, 1] scale; > 0
    cache: str = "auto"  # auto | memory | stream: decoded uint8 tensors in memory, or decode every epoch
    cache_dir: str = ""  # decoded-dataset cache; "" = $TOOLKIT_CACHE_DIR or ~/.cache/toolkit
    memory_limit_gb: float = 8.0  # cache=auto keeps a dataset in memory below this decoded size
    num_workers: int = -1  # decode processes; -1 = one per core
    max_image_pixels: int = MAX_PIXELS  # refuse larger images (decompression bombs); PIL's default
    download: bool = True  # cifar10: download when root has no copy
    train_per_class: int = 500  # shapes: images generated per class
    val_per_class: int = 100  # shapes: validation images generated per class


@dataclass
class ModelConfig:
    arch: str = "tutorial_net"  # see `toolkit models`; timm/<name> with the timm extra
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm when running several processes
    channels_last: bool = False  # NHWC memory format (faster convolutions on recent GPUs)
    pretrained: bool = False  # timm models: timm's pretrained weights (its cache/hub, or model.weights); input size, mean, std follow them
    weights: str = ""  # starting weights, .safetensors only: a toolkit run's or a timm/torchvision state dict; matching tensors load
    freeze_epochs: int = 0  # epochs that train the classifier only (backbone learning rate 0), then discriminative warmup


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.05  # peak learning rate, reached after warmup
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    weight_decay: float = 5e-4  # not applied to biases and norm weights
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup_epochs: float = 0.5  # linear warmup from lr/10 (cosine, constant)
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio (cosine)
    backbone_lr_scale: float = 1.0  # lr of every parameter outside the classifier = lr * this (fine-tuning: 0.1)


@dataclass
class TrainConfig:
    epochs: int = 10  # passes over the training images
    out_dir: str = "runs"  # run directory: out_dir/<name> (a suffix -2, -3... when it exists)
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad_norm: float = 0.0  # max global L2 norm of gradients; 0 = off
    label_smoothing: float = 0.0  # cross-entropy target smoothing, in [0, 1)
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    eval_tta: bool = False  # average logits of the image and its horizontal flip
    checkpoint_every: int = 0  # optimizer steps between resume states; 0 = epoch ends only
    keep_states: int = 2  # newest resume states kept in <run>/state/
    resume: str = ""  # "" = new run, auto = newest complete state of out_dir/<name>, or a state path
    compile: bool = False  # torch.compile the model
    max_nonfinite: int = 5  # consecutive non-finite losses before the run stops
    stop_at_accuracy: float = 0.0  # end the run once validation accuracy reaches this (time-to-accuracy); 0 = off
    log_with: str = ""  # accelerate tracker: tensorboard | wandb | mlflow | ... ; "" = none
    progress: bool = True  # progress bar on the main process (plain lines when not a terminal)
    ema_decay: float = 0.0  # EMA of the weights, per optimizer step (e.g. 0.99); evaluated each epoch, released when better; 0 = off
    budget_minutes: float = 5.0  # `toolkit train DIR`: the recipe sizes model and epochs to about this (CPU or GPU)
    collective_timeout: float = 600.0  # seconds a process waits for the others in a collective before the job ends


@dataclass
class Config:
    name: str = "run"  # run directory name under train.out_dir
    seed: int = 0  # seeds weights, shuffling and augmentation
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of everything that decides what is trained (not where it is written)."""
        d = self.to_dict()
        for key in ("out_dir", "resume", "progress", "log_with", "checkpoint_every", "keep_states",
                    "collective_timeout"):
            d["train"].pop(key)
        for key in ("cache", "cache_dir", "memory_limit_gb", "num_workers", "download"):
            d["data"].pop(key)  # where and how data is read, not what is trained
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key, e.g. ['name', 'seed', 'data.kind', ...]."""
    keys = []
    hints = _hints(cls)
    for name in _fields(cls):
        t = hints[name]
        if dataclasses.is_dataclass(t):
            keys += valid_keys(t, prefix + name + ".")
        else:
            keys.append(prefix + name)
    return keys


class SafeNoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load's loader without aliases (*name): a few hundred bytes of nested aliases expand to
    gigabytes (a "billion laughs"), and no config needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not supported", mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str):
    """YAML text -> Python values, as yaml.safe_load but refusing aliases."""
    try:
        return yaml.load(text, Loader=SafeNoAliasLoader)
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise yaml.YAMLError(str(e).splitlines()[0][:100]) from None


def _unknown_key(key: str) -> UserError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    if not close:  # a typo in the section part still deserves a suggestion
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean '{close[0]}'?" if close else "; run `toolkit train --help` for the keys"
    return UserError(f"unknown config key {short(key)}{hint}")


def _coerce(key: str, value, t):
    """Check `value` against the annotated type `t`; convert only where lossless and obvious."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(t)
        if value is None and type(None) in args:
            return None
        t = next(a for a in args if a is not type(None))
        origin = typing.get_origin(t)
    if origin is list:
        (item_t,) = typing.get_args(t)
        if isinstance(value, str):  # `data.mean=0.5,0.5,0.5` on the command line
            value = [parse_yaml(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' must be a list, got {short(value)}")
        if len(value) > 16:
            raise UserError(f"config key '{key}' must be a short list, got {len(value)} values")
        return [_coerce(f"{key}[{i}]", v, item_t) for i, v in enumerate(value)]
    if t is bool:
        if isinstance(value, bool):
            return value
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif t is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e300 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise UserError(f"config key '{key}' must be a finite number, got {short(value)}")
            return number
    elif t is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            if "\0" in str(value) or len(str(value)) > 4096:
                raise UserError(f"config key '{key}' must be a text of at most 4096 characters without NUL, "
                                f"got {short(value)}")
            return str(value)
    raise UserError(f"config key '{key}' must be {t.__name__}, got {short(value)}")


def _apply(obj, updates: dict, prefix: str = "") -> None:
    hints = _hints(type(obj))
    names = _fields(type(obj))
    for name, value in updates.items():
        key = prefix + str(name)
        if name not in names:
            while isinstance(value, dict) and value:  # report the full key of a misspelt section
                sub, value = next(iter(value.items()))
                key += f".{sub}"
            raise _unknown_key(key)
        t = hints[name]
        if dataclasses.is_dataclass(t):
            if not isinstance(value, dict):
                raise UserError(f"config section '{key}' must be a mapping of keys, got {short(value)}")
            _apply(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, t))


def _validate(cfg: Config) -> None:
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


def parse_overrides(pairs: list[str]) -> dict:
    """['optim.lr=0.1', 'train.epochs=3'] -> {'optim': {'lr': 0.1}, 'train': {'epochs': 3}}."""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"override '{pair}' must look like key=value, e.g. train.epochs=5")
        key, raw = pair.split("=", 1)
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise UserError(f"override {short(pair)} is not valid YAML: {str(e).splitlines()[0][:100]}") from None
        *sections, leaf = key.strip().split(".")
        node = nested
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise _unknown_key(key)
        node[leaf] = value
    return nested


def apply_overrides(cfg: Config, nested: dict) -> Config:
    """Apply nested updates (as from parse_overrides) to `cfg` and validate the result."""
    _apply(cfg, nested)
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file <- key=value overrides, checked and validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' does not exist")
        try:
            data = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file '{path}' is not valid YAML: {_yaml_reason(e)}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"config file '{path}' cannot be read ({getattr(e, 'strerror', None) or e})") from None
        if not isinstance(data, dict):
            raise UserError(f"config file '{path}' must hold a mapping of keys")
        _apply(cfg, data)
    _apply(cfg, parse_overrides(list(overrides)))
    _validate(cfg)
    return cfg


def _yaml_reason(e: Exception) -> str:
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return (problem or str(e).splitlines()[0])[:100] + where


def save_config(cfg: Config, path: str | Path) -> None:
    from toolkit.core.files import write_atomic

    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
