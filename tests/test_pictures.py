"""Pictures and reports: each is a valid PNG of the expected size, and shows what it should."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_toolkit
from toolkit.core import images, pictures


def _png(path):
    img = Image.open(path)
    assert img.format == "PNG"
    img.load()  # the whole file decodes
    return img


def _cell(cols, rows, title=True, margin=0):
    w = margin + cols * (pictures.TILE + 6) + 4
    h = (26 if title else 4) + rows * (pictures.TILE + pictures.CAPTION + 6)
    return w, h


def test_preview_grid_and_counts(shapes_dir, tmp_path):
    counts = pictures.preview(shapes_dir, tmp_path / "grid.png", per_class=5)
    assert counts["star (train)"] == 20 and counts["star (val)"] == 10 and len(counts) == 20
    img = _png(tmp_path / "grid.png")
    w, h = _cell(5, 10)
    assert img.size[1] == h and img.size[0] > w  # 10 class rows of 5, plus a margin for the class names
    a = np.asarray(img.convert("RGB"))
    assert a.std() > 30  # pictures, not a blank canvas
    proc = run_toolkit("preview", shapes_dir / "train", "-o", tmp_path / "p.png", "--per-class", "3")
    assert proc.stdout.strip() == str(tmp_path / "p.png") and "star" in proc.stderr
    assert _png(tmp_path / "p.png").size[1] == _cell(3, 10)[1]


def test_inspect_shows_the_numbers(shapes_dir):
    path = next((shapes_dir / "train" / "ring").iterdir())
    text = pictures.inspect(path, size=16, mean=[0.5] * 3, std=[0.25] * 3)
    x = (images.load(path, 16).astype(np.float32) / 255 - 0.5) / 0.25
    assert "PNG, mode RGB, 32 x 32 pixels" in text
    assert "shape (3, 16, 16), dtype float32" in text
    red = [line for line in text.splitlines() if line.strip().startswith("R ")][0].split()
    assert float(red[3]) == pytest.approx(x[..., 0].min(), abs=1e-3)
    assert float(red[4]) == pytest.approx(x[..., 0].max(), abs=1e-3)
    proc = run_toolkit("inspect", path, check=False)
    assert proc.returncode == 0 and "tensor" in proc.stdout
    bad = run_toolkit("inspect", ROOT / "README.md", check=False)
    assert bad.returncode == 2 and "cannot be read as an image" in bad.stderr


def test_training_report(tiny_run):
    out = tiny_run / "report"
    sizes = {name: _png(out / name).size for name in ("curves.png", "per_class.png", "confusion.png",
                                                      "validation.png")}
    assert all(w >= 400 and h >= 250 for w, h in sizes.values()), sizes
    assert sizes["validation.png"] == _cell(8, 6)  # 48 validation images, 8 per row
    text = (out / "report.md").read_text()
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    best = max(r["val_accuracy"] for r in records)
    assert f"**{100 * best:.2f}%**" in text
    for name in sizes:
        assert f"]({name})" in text
    assert "| star |" in text and "```yaml" in text


def test_validation_grid_puts_mistakes_first(tmp_path):
    px = np.zeros((6, 8, 8, 3), np.uint8)
    truth, pred = np.array([0, 1, 0, 1, 0, 1]), np.array([0, 1, 1, 1, 0, 0])
    scores = np.array([0.9, 0.8, 0.6, 0.7, 0.5, 0.95])
    pictures.validation_grid(px, truth, pred, scores, ["cat", "dog"], tmp_path / "v.png", n=6, columns=6)
    img = np.asarray(_png(tmp_path / "v.png").convert("RGB")).astype(int)
    caption = img[26 + pictures.TILE + 2 : 26 + pictures.TILE + 14]  # the first caption line of each tile

    def red(col):
        x = 4 + col * (pictures.TILE + 6)
        tile = caption[:, x : x + pictures.TILE]
        return ((tile[..., 0] > 150) & (tile[..., 1] < 100)).sum()

    assert red(0) > 0 and red(1) > 0  # the two mistakes (index 5 then 2, most confident first)
    assert red(2) == red(3) == 0  # then the correct ones, in green


def test_predict_grid(tiny_run, shapes_dir, tmp_path):
    from toolkit.export import export

    model = export(tiny_run, tmp_path / "m.onnx")
    run_toolkit("predict", model, shapes_dir / "val", "-o", tmp_path / "p.csv", "--grid", tmp_path / "g.png",
                "--grid-count", "12")
    assert _png(tmp_path / "g.png").size == _cell(8, 2)


def test_tensorboard_tracker(shapes_dir, tmp_path):
    pytest.importorskip("tensorboardX")  # installed by the dev extra
    run_toolkit("train", ROOT / "configs/quickstart.yaml", f"data.root={shapes_dir}", f"train.out_dir={tmp_path}",
                "name=tb", "train.epochs=2", "train.log_with=tensorboard")
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and any(b"val_accuracy" in e.read_bytes() for e in events)


def test_progress_is_plain_lines_when_not_a_terminal(shapes_dir, tmp_path):
    proc = run_toolkit("train", ROOT / "configs/quickstart.yaml", f"data.root={shapes_dir}",
                       f"train.out_dir={tmp_path}", "train.epochs=1")
    assert "\r" not in proc.stderr and "epoch 1/1" in proc.stderr


def test_debug_shows_the_traceback():
    plain = run_toolkit("train", "configs/nope.yaml", check=False, cwd=ROOT)
    debug = run_toolkit("--debug", "train", "configs/nope.yaml", check=False, cwd=ROOT)
    assert "Traceback" not in plain.stderr and plain.returncode == 2
    assert "Traceback" in debug.stderr and "UserError" in debug.stderr
