import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from toolkit.config import DataConfig, load_config
from toolkit.core.meta import MAX_PIXELS, Preprocess
from toolkit.train import cache


@pytest.fixture
def files(tmp_path):
    paths = []
    for i in range(5):
        p = tmp_path / "imgs" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (10, 10), (i * 40, 0, 0)).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = cache.decode

    def decode(files, cfg, workers=None):
        calls.append(len(files))
        return real(files, cfg, workers)

    monkeypatch.setattr(cache, "decode", decode)
    return calls


def _cfg(tmp_path, *extra):
    return load_config(None, [f"data.cache_dir={tmp_path / 'c'}", "data.image_size=8", *extra]).data


def test_second_run_decodes_nothing(tmp_path, files, counted):
    x1, ok1 = cache.decode_cached(files, _cfg(tmp_path))
    x2, ok2 = cache.decode_cached(files, _cfg(tmp_path))
    assert counted == [5]
    assert np.array_equal(x1, x2) and ok1.all() and ok2.all()
    assert x1.shape == (5, 3, 8, 8) and x1[3, 0].mean() == 120


def test_a_changed_file_is_never_served_stale(tmp_path, files, counted):
    cache.decode_cached(files, _cfg(tmp_path))
    Image.new("RGB", (10, 10), (0, 0, 250)).save(files[2])  # same name, new pixels
    os.utime(files[2], ns=(1, 1))  # even with an old modification time: the size differs
    x, _ = cache.decode_cached(files, _cfg(tmp_path))
    assert counted == [5, 5]
    assert x[2, 2].mean() == 250


def test_key_covers_list_size_and_policy(tmp_path, files):
    base = cache.fingerprint(files, _cfg(tmp_path))
    assert cache.fingerprint(files[:-1], _cfg(tmp_path)) != base
    assert cache.fingerprint(files, _cfg(tmp_path, "data.resize=squash")) != base
    assert cache.fingerprint(files, _cfg(tmp_path, "data.image_size=9")) != base
    assert cache.fingerprint(files, _cfg(tmp_path, "data.max_image_pixels=5000")) != base
    os.utime(files[0], ns=(5, 5))
    assert cache.fingerprint(files, _cfg(tmp_path)) != base


def test_key_covers_every_decode_setting(tmp_path, files, monkeypatch):
    """Each field of Preprocess, changed alone, changes the key: a new decode setting enters it by itself."""
    cfg = _cfg(tmp_path)
    prep = cfg.decoding()
    base = cache.fingerprint(files, cfg)
    for f in dataclasses.fields(Preprocess):
        value = getattr(prep, f.name)
        changed = dataclasses.replace(prep, **{f.name: value + 1 if isinstance(value, int) else value + "_other"})
        monkeypatch.setattr(DataConfig, "decoding", lambda self, changed=changed: changed)
        assert cache.fingerprint(files, cfg) != base, f"Preprocess.{f.name} is not part of the cache key"


def test_key_of_existing_settings_is_unchanged(tmp_path):
    """Entries cached before the settings became one object are still found: same key for the same settings.
    (A new Preprocess field changes every key, as it must: add its value to `old`.)"""
    cfg = _cfg(tmp_path, "data.resize=squash", "data.interpolation=bicubic")
    old = [cache.CACHE_VERSION, 8, "squash", MAX_PIXELS, "bicubic"]  # the key's settings, in their written order
    assert cache.fingerprint([], cfg) == hashlib.sha256(json.dumps(old).encode()).hexdigest()[:24]


def test_an_entry_decoded_with_another_filter_is_never_reused(tmp_path, counted):
    """bilinear and bicubic give other pixels on a downscaled noise image: each filter gets its own entry."""
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
    bilinear, bicubic = _cfg(tmp_path), _cfg(tmp_path, "data.interpolation=bicubic")
    assert cache.fingerprint([str(path)], bilinear) != cache.fingerprint([str(path)], bicubic)
    x_lin, _ = cache.decode_cached([str(path)], bilinear)
    x_cub, _ = cache.decode_cached([str(path)], bicubic)
    assert counted == [1, 1]  # the second filter decoded again, not served the first one's entry
    with Image.open(path) as img:
        want = [np.asarray(img.resize((8, 8), f, box=(5, 0, 35, 30))).transpose(2, 0, 1)
                for f in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)]
    assert not np.array_equal(want[0], want[1])
    assert np.array_equal(x_lin[0], want[0]) and np.array_equal(x_cub[0], want[1])


def test_unreadable_cache_location_is_not_fatal(tmp_path, files):
    blocker = tmp_path / "c"
    blocker.write_text("a file where the cache folder should be")
    x, ok = cache.decode_cached(files, _cfg(tmp_path))
    assert ok.all() and len(x) == 5


def test_location_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "env"))
    assert cache.cache_root(load_config(None).data) == tmp_path / "env"
    assert cache.cache_root(_cfg(tmp_path)) == tmp_path / "c"
    monkeypatch.delenv("TOOLKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root(load_config(None).data) == tmp_path / "xdg" / "toolkit"


@pytest.mark.parametrize("damage", ["truncate", "marker", "pickle", "shape"])
def test_a_damaged_entry_is_decoded_again_not_an_error_forever(tmp_path, files, counted, damage):
    x1, _ = cache.decode_cached(files, _cfg(tmp_path))
    (entry,) = [p for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")]
    npy = entry / "images.npy"
    if damage == "truncate":  # a crash or a full disk cut the file: EOFError / mmap errors before
        npy.write_bytes(npy.read_bytes()[:60])
    elif damage == "marker":
        (entry / "done").write_text("{torn")
    elif damage == "pickle":  # an object array: loading it would unpickle
        np.save(npy, np.array([{"a": 1}] * 5, dtype=object), allow_pickle=True)
    else:  # same size, other shape
        np.save(npy, np.zeros((5, 3, 4, 16), np.uint8))
    for _ in range(2):
        x, ok = cache.decode_cached(files, _cfg(tmp_path))
        assert np.array_equal(x, x1) and ok.all()
    assert counted == [5, 5]  # decoded again once, then served from the rebuilt entry


def test_undecodable_file_names_are_cached(tmp_path, counted):
    folder = tmp_path / os.fsdecode(b"imgs-\xff")
    folder.mkdir()
    paths = []
    for i in range(3):
        p = folder / os.fsdecode(b"caf\xe9-%d.png" % i)  # Latin-1 bytes: not UTF-8
        Image.new("RGB", (10, 10), (i * 40, 0, 0)).save(p)
        paths.append(str(p))
    x1, _ = cache.decode_cached(paths, _cfg(tmp_path))
    x2, _ = cache.decode_cached(paths, _cfg(tmp_path))
    assert counted == [3] and np.array_equal(x1, x2)


def test_temporary_entries_of_dead_processes_are_removed(tmp_path, files):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    root = tmp_path / "c"
    (root / f".abc.tmp-{dead.stdout.strip()}").mkdir(parents=True)
    (root / f".abd.tmp-{os.getppid()}").mkdir()  # a live process: its entry is still being written
    cache.decode_cached(files, _cfg(tmp_path))
    names = sorted(p.name for p in root.iterdir())
    assert f".abc.tmp-{dead.stdout.strip()}" not in names and f".abd.tmp-{os.getppid()}" in names
