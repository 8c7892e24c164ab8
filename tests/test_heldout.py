"""Honest figures at the end of a run: best epoch (chosen on validation), last epoch, untouched test/."""

import json
import logging
import os
import shutil

import numpy as np
import pytest

from conftest import run_toolkit
from toolkit import UserError
from toolkit.config import load_config
from toolkit.train import train
from toolkit.train.imagefolder import find_files, held_out


def test_test_folder_is_evaluated_once_with_the_released_weights(tmp_path, shapes_dir, caplog):
    data = tmp_path / "d"
    shutil.copytree(shapes_dir / "train", data / "train")
    shutil.copytree(shapes_dir / "val", data / "val")
    shutil.copytree(shapes_dir / "val", data / "test")  # the same images: the test figure must equal the best val
    caplog.set_level(logging.INFO, logger="toolkit")
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={data}", "model.arch=tutorial_net_bn",
                             "train.epochs=2", "data.batch_size=8", "train.progress=false", f"train.out_dir={tmp_path}"])
    run = train(cfg)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(recs, key=lambda r: r["val_accuracy"])
    test = json.loads((run / "test.json").read_text())
    assert test["test_count"] == best["val_count"] and test["test_accuracy"] == best["val_accuracy"]
    text = caplog.text
    assert "the epoch chosen on validation" in text
    assert f"last epoch ({recs[-1]['epoch']}) {100 * recs[-1]['val_accuracy']:.2f}%" in text
    assert f"test accuracy {100 * best['val_accuracy']:.2f}% on {best['val_count']} untouched images" in text
    assert "s per epoch, about" in text  # the estimate after the first steps (25 steps per epoch here)


# --- data.test_fraction: the split ------------------------------------------------------------


def _paths(counts: dict[str, int]) -> tuple[list[str], np.ndarray]:
    paths = [f"{c}/img_{i:03d}.png" for c, n in counts.items() for i in range(n)]
    labels = np.asarray([k for k, n in enumerate(counts.values()) for _ in range(n)])
    return paths, labels


def test_the_held_out_split_is_stratified_and_seeded():
    paths, labels = _paths({"a": 40, "b": 7, "c": 2})
    mask = held_out(paths, labels, 0.2, seed=0)
    assert [int(mask[labels == c].sum()) for c in range(3)] == [8, 1, 1]  # round(n * 0.2), halves up, at least 1
    assert np.array_equal(held_out(paths, labels, 0.2, seed=0), mask)  # the same seed: the same split
    assert not np.array_equal(held_out(paths, labels, 0.2, seed=1), mask)  # another seed: another split
    order = np.random.default_rng(0).permutation(len(paths))  # a function of the paths, not of their order
    shuffled = held_out([paths[i] for i in order], labels[order], 0.2, seed=0)
    assert {paths[i] for i, m in zip(order, shuffled) if m} == {p for p, m in zip(paths, mask) if m}


def test_adding_a_file_moves_at_most_one_other_file_of_its_class_and_none_elsewhere():
    paths, labels = _paths({"a": 40, "b": 30})
    before = {p for p, m in zip(paths, held_out(paths, labels, 0.25, seed=3)) if m}
    for new in ("a/new.png", "a/zzz.png", "b/another.png", "b/0.png"):
        more_paths, more_labels = paths + [new], np.append(labels, 0 if new.startswith("a/") else 1)
        after = {p for p, m in zip(more_paths, held_out(more_paths, more_labels, 0.25, seed=3)) if m}
        other = "b/" if new.startswith("a/") else "a/"
        assert {p for p in after if p.startswith(other)} == {p for p in before if p.startswith(other)}
        changed = (before ^ after) - {new}
        assert len(changed) <= 1, (new, changed)


def _folder(root, counts: dict[str, int]):
    from PIL import Image

    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 7 % 256, 0, 0)).save(root / c / f"{i}.png")
    return root


def test_test_train_and_validation_images_are_disjoint_and_cover_the_folder(tmp_path):
    root = _folder(tmp_path / "d", {"a": 20, "b": 11})
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={root}", "data.test_fraction=0.3"])
    files = find_files(cfg.data, cfg.seed)
    test, train, val = set(files.test), set(files.train), set(files.val)
    assert not (test & train) and not (test & val) and not (train & val)
    assert test | train | val == {str(p) for p in root.rglob("*.png")}
    assert [int((files.test_labels == c).sum()) for c in range(2)] == [6, 3]
    assert files.test_dir == str(root) and "data.test_fraction=0.3" in files.test_source
    again = find_files(cfg.data, cfg.seed)  # another run, a resume, another process: the same split
    assert (again.test, again.train, again.val) == (files.test, files.train, files.val)


@pytest.mark.parametrize("value", ["0.6", "-0.1", "nan"])
def test_a_test_fraction_outside_0_to_half_is_refused_naming_the_key(value):
    with pytest.raises(UserError, match="'data.test_fraction'"):
        load_config(None, [f"data.test_fraction={value}"])
    with pytest.raises(UserError, match="'data.test_fraction' must be from 0 to 0.5"):
        load_config(None, ["data.kind=cifar10", "data.test_fraction=0.2"])  # its test batch is the test set


def test_a_split_that_leaves_a_class_no_training_image_or_beside_a_test_folder_is_refused(tmp_path):
    root = _folder(tmp_path / "d", {"a": 10, "b": 1})
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={root}", "data.test_fraction=0.1"])
    with pytest.raises(UserError, match=r"data.test_fraction=0.1 leaves class 'b' \(1 image\) no training image"):
        find_files(cfg.data, cfg.seed)
    both = _folder(tmp_path / "e", {"train/a": 4, "train/b": 4, "val/a": 2, "val/b": 2, "test/a": 2, "test/b": 2})
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={both}", "data.test_fraction=0.2"])
    with pytest.raises(UserError, match="has a test/ folder already; set data.test_fraction=0"):
        find_files(cfg.data, cfg.seed)


def test_the_recipe_sizes_epochs_from_the_images_left_to_train_on(tmp_path):
    from toolkit.train import recipe, survey

    root = _folder(tmp_path / "d", {"a": 100, "b": 100})
    summary = survey.scan_folder(root)
    _, why = recipe.choose(summary, load_config(None, ["data.test_fraction=0.2"]), gpu=False)
    assert "20% of them held out as the test set (data.test_fraction), 144 to train on" in why[0]  # 200 x .8 x .9
    assert any("a dataset of 144 uses" in line for line in why)


# --- data.test_fraction: a run -----------------------------------------------------------------


def test_a_run_with_test_fraction_reports_what_evaluate_finds_for_the_exported_model(tmp_path, shapes_dir, caplog):
    from toolkit.core.folders import read_file_list
    from toolkit.export import export
    from toolkit.train.rebuild import rebuild_report

    data = tmp_path / "d"
    shutil.copytree(shapes_dir / "train", data)  # no val/ or test/ folder: both are split off the training images
    caplog.set_level(logging.INFO, logger="toolkit")
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={data}", "data.test_fraction=0.25",
                             "model.arch=tutorial_net_bn", "train.epochs=2", "data.batch_size=16",
                             "train.progress=false", f"train.out_dir={tmp_path}"])
    run = train(cfg)
    test = json.loads((run / "test.json").read_text())
    listed = read_file_list(run / "test_files.txt")
    assert test["test_count"] == len(listed) == 50 and test["test_dir"] == str(data)  # 5 of 20 in each of 10 classes
    assert set(listed) == {os.path.relpath(f, data) for f in find_files(cfg.data, cfg.seed).test}
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max(recs, key=lambda r: r["val_accuracy"])
    assert best["val_count"] == 20 and test["epoch"] == best["epoch"]  # validation: 2 of the 15 left per class
    line = (f"best val accuracy {100 * best['val_accuracy']:.2f}% at epoch {best['epoch']} (the epoch chosen on "
            f"validation, so optimistic for new images); last epoch ({recs[-1]['epoch']}) "
            f"{100 * recs[-1]['val_accuracy']:.2f}%; test accuracy {100 * test['test_accuracy']:.2f}% on 50 untouched")
    assert line in caplog.text

    model = export(run, tmp_path / "m.onnx")
    proc = run_toolkit("evaluate", model, data, "--files", run / "test_files.txt", "--json")
    evaluated = json.loads(proc.stdout)
    assert (evaluated["accuracy"], evaluated["n"]) == (test["test_accuracy"], test["test_count"])
    figure = f"{100 * test['test_accuracy']:.2f}% on 50 untouched images"
    in_report = f"- test accuracy: **{100 * test['test_accuracy']:.2f}%** on 50 untouched images"
    assert in_report in (run / "report" / "report.md").read_text()
    card = model.with_suffix(".README.md").read_text()
    assert f"- test accuracy: {figure}" in card and "the epoch chosen on validation" in card
    assert f"last epoch ({recs[-1]['epoch']}): {100 * recs[-1]['val_accuracy']:.2f}%" in card
    assert json.loads(model.with_suffix(".json").read_text())["run_figures"]["test_accuracy"] == test["test_accuracy"]

    (run / "test.json").unlink()  # a run stopped before its test figure: `toolkit report` measures it
    (run / "report" / "report.md").unlink()
    rebuild_report(run)
    assert json.loads((run / "test.json").read_text()) == test
    assert in_report in (run / "report" / "report.md").read_text()
