"""The import path `toolkit.images` of scripts written before the package layout: image files and
the one preprocessing definition are in toolkit/core/images.py."""

from toolkit.core.images import *  # noqa: F401,F403
from toolkit.core.images import DecodeError, find_images, find_labelled, iter_images, load, open_rgb, resize  # noqa: F401
