"""Pictures and reports: each is a valid PNG of the expected size, and shows what it should."""

import csv
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
    x = (images.load(path, images.Preprocess(16)).astype(np.float32) / 255 - 0.5) / 0.25
    assert "PNG, mode RGB, 32 x 32 pixels" in text
    assert "shape (3, 16, 16), dtype float32" in text
    red = [line for line in text.splitlines() if line.strip().startswith("R ")][0].split()
    assert float(red[3]) == pytest.approx(x[..., 0].min(), abs=1e-3)
    assert float(red[4]) == pytest.approx(x[..., 0].max(), abs=1e-3)
    proc = run_toolkit("inspect", path, check=False)
    assert proc.returncode == 0 and "tensor" in proc.stdout
    assert "[0.485, 0.456, 0.406], std [0.229, 0.224, 0.225] (ImageNet statistics: no --model given" in proc.stdout
    assert "(the model's)" in text and "ImageNet" not in text
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


def _caption_colours(img, tiles: int, columns: int, top: int) -> list[str]:
    """'red', 'green' or 'ink' for the caption under each tile (its second line, where the two differ most)."""
    a = np.asarray(img.convert("RGB")).astype(int)
    found = []
    for i in range(tiles):
        x = 4 + (i % columns) * (pictures.TILE + 6)
        y = top + (i // columns) * (pictures.TILE + pictures.CAPTION + 6) + pictures.TILE + 2
        cap = a[y : y + pictures.CAPTION - 2, x : x + pictures.TILE]
        red = ((cap[..., 0] > 150) & (cap[..., 1] < 100)).sum()
        green = ((cap[..., 1] > 100) & (cap[..., 0] < 80) & (cap[..., 2] < 100)).sum()
        found.append("red" if red > 5 else "green" if green > 5 else "ink")
    return found


def test_predict_grid_samples_every_class_and_colours_by_agreement(tiny_run, shapes_dir, tmp_path):
    from toolkit.export import export

    model = export(tiny_run, tmp_path / "m.onnx")
    run_toolkit("predict", model, shapes_dir / "val", "-o", tmp_path / "p.csv", "--grid", tmp_path / "g.png",
                "--grid-count", "10")
    img = _png(tmp_path / "g.png")
    assert img.size == (_cell(8, 2)[0], _cell(8, 2)[1] + 18)  # two title lines: what the colours mean
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    firsts = [next(r for r in rows if r["path"].startswith(c + "/")) for c in sorted({r["path"].split("/")[0]
                                                                                      for r in rows})]
    assert len(firsts) == 10  # 10 tiles over 10 class folders: one of each, the first of each folder
    expected = ["green" if r["label"] == r["path"].split("/")[0] else "red" for r in firsts]
    assert 0 < expected.count("green") < 10, "tiny_run should be right on some and wrong on others"
    assert _caption_colours(img, 10, 8, 26 + 18) == expected
    a = np.asarray(img.convert("RGB")).astype(int)
    for k, row in enumerate(firsts):  # each tile shows its own row's image, enlarged 3x with nearest
        x, y = 4 + (k % 8) * (pictures.TILE + 6), 26 + 18 + (k // 8) * (pictures.TILE + pictures.CAPTION + 6)
        src = np.asarray(Image.open(shapes_dir / "val" / row["path"]).convert("RGB")).astype(int)
        assert np.array_equal(a[y : y + pictures.TILE, x : x + pictures.TILE], src.repeat(3, 0).repeat(3, 1)), row


def test_spread_sample_shares_places_among_folders_and_spreads_inside_them():
    paths = [f"{c}/{i:03d}.png" for c in ("a", "b", "c") for i in range(100)] + ["d/0.png"]
    chosen = list(pictures.spread_sample(iter(paths), 10)(iter(paths)))
    picked = [paths[i] for i in chosen]
    assert chosen == sorted(chosen) and len(chosen) == 10
    assert [p.split("/")[0] for p in picked].count("d") == 1  # a small folder is shown too
    assert {p.split("/")[0] for p in picked} == {"a", "b", "c", "d"}
    a = [int(p[2:5]) for p in picked if p.startswith("a/")]
    assert a == [0, 50, 99]  # spread from the first to the last file, not the first three
    assert list(pictures.spread_sample(iter(paths[:5]), 32)(iter(paths[:5]))) == [0, 1, 2, 3, 4]


def test_prediction_captions_say_why(tmp_path):
    Image.new("RGB", (8, 8), "white").save(tmp_path / "x.png")
    classes = {"cat", "dog"}
    row = {"path": "cat/x.png", "label": "dog", "score": 0.9, "error": ""}
    assert pictures.prediction_tile(tmp_path, row, classes)[1:] == ("0.90 dog", "in cat/", pictures.RED)
    row = {"path": "dog/x.png", "label": "dog", "score": 0.9, "error": ""}
    assert pictures.prediction_tile(tmp_path, row, classes)[1:] == ("0.90 dog", "x.png", pictures.GREEN)
    row = {"path": "holiday/x.png", "label": "dog", "score": 0.9, "error": ""}  # not a class folder: no verdict
    assert pictures.prediction_tile(tmp_path, row, classes)[3] == pictures.INK


def test_long_file_names_keep_their_end_and_titles_name_the_folder(tmp_path):
    name = "IMG_2024_holiday_camera_roll_export_portrait_00042.jpg"
    cut = pictures.fit_end(name)
    assert cut.startswith("…") and cut.endswith("_00042.jpg") and len(cut) < len(name)
    assert pictures.fit_end("a.png") == "a.png"
    assert pictures.folder_title(tmp_path / "cifar10" / "train") == "cifar10/train"
    assert pictures.folder_title(tmp_path / "photos") == "photos"


def test_tensorboard_tracker(shapes_dir, tmp_path):
    pytest.importorskip("tensorboardX")  # installed by the dev extra
    run_toolkit("train", ROOT / "configs/quickstart.yaml", f"data.root={shapes_dir}", f"train.out_dir={tmp_path}",
                "name=tb", "train.epochs=2", "train.log_with=tensorboard")
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events and any(b"val_accuracy" in e.read_bytes() for e in events)
    assert all(e.relative_to(tmp_path / "tb").parts[0] == "tensorboard" for e in events)  # runs/NAME/tensorboard/
    assert any(b"val_loss" in e.read_bytes() for e in (tmp_path / "tb" / "tensorboard").glob("events.*"))


def test_progress_is_plain_lines_when_not_a_terminal(shapes_dir, tmp_path):
    proc = run_toolkit("train", ROOT / "configs/quickstart.yaml", f"data.root={shapes_dir}",
                       f"train.out_dir={tmp_path}", "train.epochs=1")
    assert "\r" not in proc.stderr and "epoch 1/1" in proc.stderr


def test_debug_shows_the_traceback():
    plain = run_toolkit("train", "configs/nope.yaml", check=False, cwd=ROOT)
    debug = run_toolkit("--debug", "train", "configs/nope.yaml", check=False, cwd=ROOT)
    assert "Traceback" not in plain.stderr and plain.returncode == 2
    assert "Traceback" in debug.stderr and "UserError" in debug.stderr


# --- the run report answers its questions ------------------------------------------------------


def test_validation_loss_is_the_mean_loss_of_the_best_weights_on_the_validation_images(tiny_run):
    import torch

    from toolkit.config import load_config
    from toolkit.train import data
    from toolkit.train.batches import Normalize
    from toolkit.train.weights import build_model

    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: r["val_accuracy"])
    cfg = load_config(tiny_run / "config.yaml")
    ds = data.load_dataset(cfg.data, cfg.seed, make=False)
    x, y = data.sample_images(ds.val, cfg.data, range(len(ds.val)))
    net, meta = build_model(tiny_run / "best.safetensors")
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(net(Normalize(meta.mean, meta.std)(x)), y).item()
    assert all("val_loss" in r for r in records)
    assert best["val_loss"] == pytest.approx(loss, abs=1e-4)


def test_curves_draw_the_validation_loss_beside_the_training_loss(tmp_path):
    from toolkit.train import report

    records = [{"epoch": e, "train_loss": 1 / e, "val_loss": 0.5 + 0.1 * e, "val_accuracy": 0.5, "lr": 0.1}
               for e in range(1, 6)]
    orange = []
    for name, recs in (("with.png", records), ("without.png", [{k: v for k, v in r.items() if k != "val_loss"}
                                                               for r in records])):
        report.plot_curves(recs, tmp_path / name, "t")
        a = np.asarray(_png(tmp_path / name).convert("RGB")).astype(int)
        loss_panel = a[:, : a.shape[1] // 3]
        orange.append(((abs(loss_panel[..., 0] - 0xDD) < 30) & (abs(loss_panel[..., 1] - 0x88) < 30)
                       & (abs(loss_panel[..., 2] - 0x44) < 30)).sum())
    assert orange[0] > 200 and orange[1] < 20  # the validation line (and its legend entry) only when logged


def test_micro_and_macro_accuracy_are_named_where_both_appear(tiny_run):
    rows = [{"class": "a", "correct": 9, "total": 10}, {"class": "b", "correct": 0, "total": 2}]
    from toolkit.train.report import accuracies

    assert accuracies(rows) == (pytest.approx(9 / 12), pytest.approx(0.45))
    text = (tiny_run / "report" / "report.md").read_text()
    per_class = list(csv.DictReader(open(tiny_run / "report" / "per_class.csv")))
    macro = np.mean([int(r["correct"]) / int(r["total"]) for r in per_class])
    assert f"macro (mean of the per-class accuracies): {100 * macro:.2f}%" in text
    assert "best validation accuracy (micro: correct / images): **" in text


def test_confusion_axis_labels_clear_the_class_names():
    from toolkit.train import report

    classes = ["portrait_of_grace_hopper", "shaded_relief_terrain_map", "ocean_floor_bathymetry", "x"]
    fig = report.confusion_figure(np.eye(4, dtype=int) * 3 + 1, classes, "t")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    left, right = fig.axes[:2]
    for ax in (left, right):
        label = ax.yaxis.label.get_window_extent(renderer)
        assert ax.yaxis.label.get_text() == "true class"
        for tick in ax.get_yticklabels():
            assert not label.overlaps(tick.get_window_extent(renderer)), tick.get_text()
    # the right matrix's "true class" stays clear of the left matrix and its colour scale
    assert not right.yaxis.label.get_window_extent(renderer).overlaps(left.get_tightbbox(renderer))


def test_report_rebuilds_the_report_of_a_stopped_run(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "stopped"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "report")  # a run stopped before its end has weights and metrics, no report
    proc = run_toolkit("report", run)
    assert proc.stdout.strip() == str(run / "report" / "report.md")
    original = (tiny_run / "report" / "per_class.csv").read_text()
    assert (run / "report" / "per_class.csv").read_text() == original  # the confusion the run recorded
    for name in ("curves.png", "per_class.png", "confusion.png", "validation.png"):
        _png(run / "report" / name)
    shutil.rmtree(run / "state")  # no state to take the confusion from: the best weights are evaluated
    shutil.rmtree(run / "report")
    run_toolkit("report", run)
    assert (run / "report" / "per_class.csv").read_text() == original
    bad = run_toolkit("report", tmp_path, check=False)
    assert bad.returncode == 2 and "is not a run directory (no config.yaml)" in bad.stderr
