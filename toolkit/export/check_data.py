"""Real images for the export checks: from --data, or from the run's own data when it is already on disk
(never generated or downloaded here), else random pixels with a warning."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit import UserError
from toolkit.core import images
from toolkit.core.files import absent
from toolkit.core.meta import Meta
from toolkit.train.weights import weights_path

log = logging.getLogger(__name__)


MAX_EVAL_IMAGES = 2000  # validation images for accuracy and variant agreement


CALIBRATION_IMAGES = 256  # training images for int8 calibration


@dataclass
class CheckData:
    val: np.ndarray  # (N, H, W, 3) uint8 validation images
    labels: np.ndarray | None  # (N,) class indices of the model, when known
    calibration: np.ndarray  # (M, H, W, 3) uint8 training images
    source: str


def _spread(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).astype(int)) if n else np.zeros(0, int)


def check_data(checkpoint: str | Path, data_dir: str | None, meta: Meta) -> CheckData:
    """Real images for the checks: from `data_dir` (class subfolders or plain images), else the run's data."""
    if data_dir is not None:
        root = Path(data_dir)
        try:
            found = images.find_labelled(root)
        except FileNotFoundError:
            raise UserError(f"--data folder '{root}' {absent(root)}") from None
        classes, rel, labels = found.classes, found.paths, found.labels
        if not rel or any(c not in meta.class_names for c in classes):  # not a labelled folder of this model
            rel, labels = images.find_images(root), None
        else:
            labels = np.array([meta.class_names.index(classes[i]) for i in labels])
        picked = _spread(len(rel), MAX_EVAL_IMAGES)
        batch = images.decode_chunk([rel[i] for i in picked], str(root), images.Preprocess.of(meta))
        px = batch.pixels
        if len(px):
            return CheckData(px, labels[picked][batch.ok] if labels is not None else None,
                             px[_spread(len(px), CALIBRATION_IMAGES)], str(root))
    config = weights_path(checkpoint).parent / "config.yaml"
    if config.is_file():
        from toolkit.config import load_config
        from toolkit.train import data

        cfg = load_config(config)
        try:  # what is on disk only: never generate (shapes) or download (cifar10) data here; streamed, so
            # only the sampled images are decoded and no decode cache is written
            ds = data.load_dataset(dataclasses.replace(cfg.data, cache="stream"), cfg.seed, make=False)
        except UserError as e:
            log.warning("the run's data is not on disk for the export check (%s)", e)
        else:
            val, val_y = data.sample_images(ds.val, cfg.data, _spread(len(ds.val), MAX_EVAL_IMAGES))
            train, _ = data.sample_images(ds.train, cfg.data, _spread(len(ds.train), CALIBRATION_IMAGES))
            return CheckData(val.permute(0, 2, 3, 1).numpy(), val_y.numpy(), train.permute(0, 2, 3, 1).numpy(),
                             f"{cfg.data.kind} data at {cfg.data.root}")
    log.warning("no validation images found for the export check; using random pixels (pass --data DIR)")
    px = np.random.default_rng(0).integers(0, 256, (64, meta.image_size, meta.image_size, 3), dtype=np.uint8)
    return CheckData(px, None, px, "random pixels")
