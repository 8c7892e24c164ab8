"""The built-in dataset: small RGB pictures of 10 shape classes, drawn on demand, no download.

Each image is drawn at 4x resolution with PIL and downsampled (antialiased edges), on a
textured background, with a random colour, size, position and rotation, a few distractor
strokes and pixel noise. Every image has its own RNG seeded by (seed, split, class, index),
so the output is identical for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("arrow", "circle", "cross", "diamond", "heart", "hexagon", "ring", "square", "star", "triangle")
SUPERSAMPLE = 4  # draw at 4x the output size, then downsample for antialiased edges


def _regular(n: int, start: float = -math.pi / 2) -> np.ndarray:
    t = start + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star() -> np.ndarray:
    outer, inner = _regular(5), 0.42 * _regular(5, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], 1).reshape(-1, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1) / 17.0
    return pts


# Outlines in unit coordinates (centre 0, radius about 1), y pointing down.
OUTLINES = {
    "arrow": np.array([[-1, -0.22], [0.2, -0.22], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.22], [-1, 0.22]]),
    "circle": _regular(48),
    "cross": np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3],
                       [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]),
    "diamond": np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]]),  # a rhombus, never a turned square
    "heart": _heart(),
    "hexagon": _regular(6),
    "ring": _regular(48),
    "square": np.array([[-0.78, -0.78], [0.78, -0.78], [0.78, 0.78], [-0.78, 0.78]]),
    "star": _star(),
    "triangle": _regular(3) * 1.1 + [0, 0.15],
}
MAX_ROTATION = {"diamond": 25, "heart": 30}  # degrees; other classes turn freely


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float in [0, 255]: base colour, gradient and one of three textures."""
    base = rng.uniform(0, 255, 3)
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    img = base + rng.uniform(-35, 35, 3) * ramp
    texture = rng.integers(3)
    if texture == 0:  # stripes
        freq, phase, a = rng.uniform(3, 10), rng.uniform(0, 6.3), rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * freq * (np.cos(a) * xx + np.sin(a) * yy) + phase)[..., None]
        img = img + rng.uniform(5, 18) * wave
    elif texture == 1:  # soft blobs
        for _ in range(rng.integers(2, 6)):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.35)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            img = img + rng.uniform(-25, 25, 3) * blob
    # texture 2: plain gradient
    return np.clip(img, 0, 255)


LUMA = np.array([0.299, 0.587, 0.114])


def _shape_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """A random colour clearly different from the background (RGB distance and brightness)."""
    for _ in range(200):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - background_mean) >= 100 and abs((c - background_mean) @ LUMA) >= 50:
            return c
    return 255 - background_mean


def draw(class_name: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """One image of `class_name` as (size, size, 3) uint8."""
    big = size * SUPERSAMPLE
    bg = _background(rng, big)
    colour = _shape_colour(rng, bg.mean((0, 1)))

    radius = rng.uniform(0.25, 0.42) * big  # shape radius in pixels of the big canvas
    cx, cy = rng.uniform(radius * 0.8, big - radius * 0.8, 2)
    limit = MAX_ROTATION.get(class_name, 180)
    theta = math.radians(rng.uniform(-limit, limit))
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    aspect = np.array([1.0, rng.uniform(0.85, 1.15)])  # slight squash, still recognisable
    pts = (OUTLINES[class_name] * aspect) @ rot.T * radius + [cx, cy]

    mask = Image.new("L", (big, big), 0)
    pen = ImageDraw.Draw(mask)
    pen.polygon([tuple(p) for p in pts], fill=255)
    if class_name == "ring":
        inner = (OUTLINES["ring"] * aspect) @ rot.T * radius * rng.uniform(0.5, 0.68) + [cx, cy]
        pen.polygon([tuple(p) for p in inner], fill=0)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    img = bg * (1 - alpha) + colour * alpha

    canvas = Image.fromarray(img.astype(np.uint8))
    pen = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 3)):  # distractor strokes, thin and short
        x0, y0 = rng.uniform(0, big, 2)
        dx, dy = rng.uniform(-0.3, 0.3, 2) * big
        pen.line([(x0, y0), (x0 + dx, y0 + dy)], fill=tuple(int(v) for v in rng.integers(0, 256, 3)),
                 width=int(rng.integers(1, 2 * SUPERSAMPLE)))
    small = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    small = small + rng.normal(0, rng.uniform(0, 8), small.shape)  # sensor-like noise
    return np.clip(small, 0, 255).astype(np.uint8)


def _image_rng(seed: int, split: int, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, split, label, index])


def _write_chunk(args) -> int:
    out, split, split_id, label, indices, seed, size = args
    folder = Path(out) / split / CLASSES[label]
    for i in indices:
        img = draw(CLASSES[label], _image_rng(seed, split_id, label, i), size)
        Image.fromarray(img).save(folder / f"{CLASSES[label]}_{i:05d}.png", compress_level=1)
    return len(indices)


def generate(out: str | Path, train_per_class: int = 500, val_per_class: int = 100, seed: int = 0,
             size: int = 32, workers: int | None = None, progress=None) -> Path:
    """Write OUT/train/<class>/*.png and OUT/val/<class>/*.png; returns OUT.

    The folder is written under a temporary name and renamed when complete, so an
    interrupted run never leaves a half-written dataset that looks finished.
    """
    out = Path(out)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    jobs = []
    for split_id, (split, n) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for label, name in enumerate(CLASSES):
            (tmp / split / name).mkdir(parents=True, exist_ok=True)
            for start in range(0, n, 100):
                jobs.append((tmp, split, split_id, label, range(start, min(start + 100, n)), seed, size))
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers) if workers > 1 else _Inline() as pool:
        for done in pool.map(_write_chunk, jobs):
            if progress:
                progress(done)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


class _Inline:
    """Stand-in for a process pool when one worker is asked for (no fork, easier to debug)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return map(fn, items)
