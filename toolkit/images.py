"""The import path `toolkit.images` of scripts written before the package layout: image files and
the one preprocessing definition are in toolkit/core/images.py. `load` and `resize` keep their old
signatures here (a size and loose settings); toolkit/core/images.py takes them as one Preprocess."""

from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.core import images as _images
from toolkit.core.images import *  # noqa: F401,F403
from toolkit.core.images import DecodeError, find_images, find_labelled, iter_images, open_rgb  # noqa: F401
from toolkit.core.meta import DEFAULT_INTERPOLATION, Preprocess


def load(path: str | Path | bytes, size: int, policy: str = "center_crop", max_pixels: int = _images.MAX_PIXELS,
         interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """core.images.load with the settings given one by one: (size, size, 3) uint8 RGB. Raises DecodeError."""
    return _images.load(path, Preprocess(size, policy, max_pixels, interpolation))


def resize(img: Image.Image, size: int, policy: str = "center_crop",
           interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """core.images.resize with the settings given one by one: (size, size, 3) uint8."""
    return _images.resize(img, Preprocess(size, policy, interpolation=interpolation))
