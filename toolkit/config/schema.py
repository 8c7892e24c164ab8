"""The config schema: every key, its type, its default and its help text, as nested dataclasses.

These dataclasses are the single source of truth for every key and default; a YAML file holds only
what differs from them. The trailing comment of each field is its help text: `toolkit train --help`
and `toolkit config` read it from this file's source (config_docs.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field

from toolkit.core.meta import DEFAULT_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD, MAX_PIXELS, Preprocess


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

    def decoding(self) -> Preprocess:
        """The decode settings of this data: what every training-side decode and the decode cache key take."""
        return Preprocess(self.image_size, self.resize, self.max_image_pixels, self.interpolation)


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

    def trained(self) -> dict:
        """The settings that decide what is trained (not where it is written or how data is read), as JSON
        values: what hash() hashes and a resume state records."""
        d = self.to_dict()
        for key in ("out_dir", "resume", "progress", "log_with", "checkpoint_every", "keep_states",
                    "collective_timeout"):
            d["train"].pop(key)
        for key in ("cache", "cache_dir", "memory_limit_gb", "num_workers", "download"):
            d["data"].pop(key)  # where and how data is read, not what is trained
        return json.loads(json.dumps(d))

    def hash(self) -> str:
        """Hash of everything that decides what is trained (not where it is written)."""
        blob = json.dumps(self.trained(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def valid_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key, e.g. ['name', 'seed', 'data.kind', ...]."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += valid_keys(t, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys
