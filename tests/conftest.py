"""Shared fixtures: a tiny shapes dataset and one tiny trained run, made once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# as the `toolkit` command does (core.process.OPENMP_DEFAULTS), for the trainings run inside the test process: set
# before anything imports torch, so parallel test workers do not slow each other down by spinning
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# One intra-op thread for torch, here and in every process a test starts (they inherit the variable). The tests'
# models are tiny and gain nothing from a second thread when the other cores run other test workers (make test:
# pytest -n): test_fine_tuning_a_runs_weights_beats_training_from_scratch on 2 busy cores, with PASSIVE waits,
# took 22-25 s and 21-24 CPU-s with 2 threads, 17-19 s and 16-17 CPU-s with one. A value already set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Decode caches of the tests go to a temporary folder, never the user's ~/.cache."""
    os.environ["TOOLKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True, scope="session")
def _quick_latency():
    """Exports made in the test process time 5 runs per batch size (after 3 warm-up runs) instead of running for
    half a second: no test checks a speed (benchmarks/ measure speed), and the half seconds were about half the
    CPU of each of the suite's exports. Exports by a `toolkit export` process keep the full measurement."""
    import functools

    import toolkit.export.variants as variants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(variants, "latency", functools.partial(variants.latency, budget_s=0.0))
        yield


def run_toolkit(*args, check: bool = True, env: dict | None = None, timeout: float = 300, cwd=None, preexec_fn=None):
    """Run `python -m toolkit ARGS` in a fresh process; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd, preexec_fn=preexec_fn)
    if check and proc.returncode != 0:
        raise AssertionError(f"toolkit {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """20 train + 10 val images per class of the built-in data."""
    from toolkit.train.datasets import shapes

    out = tmp_path_factory.mktemp("data") / "shapes"
    shapes.generate(out, train_per_class=20, val_per_class=10, seed=0, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_run(shapes_dir, tmp_path_factory) -> Path:
    """A run directory trained for 3 short epochs on shapes_dir (tutorial_net_bn)."""
    from toolkit.config import load_config
    from toolkit.train import train

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(ROOT / "configs/quickstart.yaml",
                      [f"data.root={shapes_dir}", f"train.out_dir={out}", "train.epochs=3", "data.batch_size=32",
                       "train.progress=false"])
    return train(cfg)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run where CUDA is available and are skipped elsewhere. Under pytest-xdist the longest
    files come first (make test hands out whole files in collection order), so no long file starts last while
    the other workers stand idle; a file's own tests keep their order."""
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects, and must order, the same way
        measured = config.cache.get(TEST_SECONDS, {}) if getattr(config, "cache", None) else {}
        seconds: dict[str, float] = {}  # per file; a test never measured: 20 s if slow, else 0.5 s
        for item in items:
            guess = 20.0 if "slow" in item.keywords else 0.5
            seconds[_file(item)] = seconds.get(_file(item), 0.0) + measured.get(item.nodeid, guess)
        items.sort(key=lambda item: -seconds[_file(item)])  # stable
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Seconds each test took (setup, call and teardown) the last time it ran: pytest's cache, .pytest_cache/.
TEST_SECONDS = "toolkit/test_seconds"
_test_seconds: dict[str, float] = {}


def _file(item) -> str:
    return item.nodeid.split("::")[0]


def pytest_runtest_logreport(report):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the process that sees every test: xdist's controller, or the one
        _test_seconds[report.nodeid] = _test_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    cache = getattr(session.config, "cache", None)
    if cache is not None and _test_seconds and not os.environ.get("PYTEST_XDIST_WORKER"):
        cache.set(TEST_SECONDS, {**cache.get(TEST_SECONDS, {}), **{k: round(v, 2) for k, v in _test_seconds.items()}})


def two_colours(root, n: int = 24, size: int = 16):
    """An easy labelled folder (red vs blue noisy squares): every model becomes confident on it fast."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", n // 2)):
        for cls, colour in (("blue", (30, 60, 220)), ("red", (220, 40, 30))):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = rng.integers(-40, 40, (size, size, 3))
                Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def onnx_file(tiny_run, tmp_path_factory):
    """tiny_run exported to ONNX (the predict tests' model)."""
    from toolkit.export import export

    return export(tiny_run, tmp_path_factory.mktemp("exp") / "tiny.onnx")


def bomb_png(path, side: int = 100_000):
    """A tiny PNG whose header claims side x side pixels (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
                     + chunk(b"IEND", b""))


@pytest.fixture
def corpus(shapes_dir, tmp_path):
    """Good images, odd-but-valid images and every kind of broken file; -> (root, expected errors)."""
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path / "in"
    shutil.copytree(shapes_dir / "val" / "star", root / "stars")
    shutil.copytree(shapes_dir / "val" / "ring", root / "more" / "rings")
    odd = root / "odd"
    odd.mkdir()
    star = Image.open(next((root / "stars").iterdir())).convert("RGB").resize((40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    star.save(odd / "rotated.jpg", exif=exif)
    star.convert("CMYK").save(odd / "cmyk.jpg")
    pal = star.convert("P")
    pal.save(odd / "palette.png", transparency=0)
    star.convert("LA").save(odd / "grey_alpha.png")
    Image.fromarray((np.asarray(star.convert("L")).astype(np.uint16) * 257)).save(odd / "grey16.png")
    star.save(odd / "anim.gif", save_all=True, append_images=[star.rotate(90)])
    star.save(odd / "UPPER.JPEG")
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    data = (root / "stars" / sorted(os.listdir(root / "stars"))[0]).read_bytes()
    (bad / "truncated.png").write_bytes(data[: len(data) // 2])
    (bad / "text.jpg").write_text("not really a picture")
    (bad / "random.webp").write_bytes(np.random.default_rng(0).bytes(3000))
    bomb_png(bad / "bomb.png")
    (bad / "dangling.png").symlink_to(bad / "gone.png")
    (bad / "folder.jpg").mkdir()
    (bad / "readme.txt").write_text("not image-looking: no row")
    expected = {"bad/empty.png": "empty file", "bad/truncated.png": "corrupt image", "bad/text.jpg": "not an image",
                "bad/random.webp": "not an image", "bad/bomb.png": "too many pixels",
                "bad/dangling.png": "missing or dangling link", "bad/folder.jpg": "is a folder"}
    return root, expected


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody may write into, root included: a read-only tmpfs when this process may mount one
    (root ignores permission bits), else a folder without write permission."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only file system")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def small_disk(limit_bytes: int):
    """preexec_fn for subprocess: files cannot grow past `limit_bytes` (RLIMIT_FSIZE), so writes fail as on a
    full disk (EFBIG instead of ENOSPC), for any user and any writer (Python, C++ or Rust)."""
    def apply():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply
