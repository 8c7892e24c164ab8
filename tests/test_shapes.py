import hashlib

import numpy as np
from PIL import Image

from toolkit.train.datasets import shapes


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(str(p.relative_to(folder)).encode())
        h.update(np.asarray(Image.open(p)).tobytes())
    return h.hexdigest()


def test_layout_counts_and_size(tmp_path):
    out = shapes.generate(tmp_path / "s", train_per_class=3, val_per_class=2, seed=1, workers=1)
    assert sorted(d.name for d in (out / "train").iterdir()) == sorted(shapes.CLASSES)
    assert len(shapes.CLASSES) == 10
    for c in shapes.CLASSES:
        assert len(list((out / "train" / c).glob("*.png"))) == 3
        assert len(list((out / "val" / c).glob("*.png"))) == 2
    img = Image.open(next((out / "val" / "star").glob("*.png")))
    assert img.size == (32, 32) and img.mode == "RGB"
    assert not list(tmp_path.glob("*partial*"))  # the temporary folder was renamed


def test_deterministic_for_a_seed_whatever_the_worker_count(tmp_path):
    a = shapes.generate(tmp_path / "a", 4, 2, seed=3, workers=1)
    b = shapes.generate(tmp_path / "b", 4, 2, seed=3, workers=2)
    c = shapes.generate(tmp_path / "c", 4, 2, seed=4, workers=1)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_images_vary_and_classes_differ():
    rng = np.random.default_rng(0)
    imgs = [shapes.draw(name, rng) for name in shapes.CLASSES for _ in range(3)]
    assert all(i.shape == (32, 32, 3) and i.dtype == np.uint8 for i in imgs)
    flat = np.stack(imgs).reshape(len(imgs), -1).astype(np.int32)
    distinct = {hashlib.md5(x.tobytes()).hexdigest() for x in flat}
    assert len(distinct) == len(imgs)
    assert flat.std(0).mean() > 30  # colours, positions and backgrounds really vary


def test_other_sizes(tmp_path):
    out = shapes.generate(tmp_path / "s", 1, 1, seed=0, size=48, workers=1)
    assert Image.open(next((out / "train" / "ring").glob("*.png"))).size == (48, 48)
