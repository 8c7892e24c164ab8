"""Honest figures at the end of a run: best epoch (chosen on validation), last epoch, untouched test/."""

import json
import logging
import shutil

from toolkit.config import load_config
from toolkit.train import train


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
    assert "the epoch chosen on validation" in text and f"last epoch {100 * recs[-1]['val_accuracy']:.2f}%" in text
    assert f"test accuracy {100 * best['val_accuracy']:.2f}% on {best['val_count']} untouched images" in text
    assert "s per epoch, about" in text  # the estimate after the first steps (25 steps per epoch here)
