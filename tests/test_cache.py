import os

import numpy as np
import pytest
from PIL import Image

from toolkit.config import load_config
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
    os.utime(files[0], ns=(5, 5))
    assert cache.fingerprint(files, _cfg(tmp_path)) != base


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
