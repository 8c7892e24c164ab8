import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.checkpoint import load_weights
from toolkit.config import load_config
from toolkit.evaluate import evaluate_folder
from toolkit.train import lr_at, resolve_run_dir, train


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents(tiny_run):
    recs = _records(tiny_run)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert all(r["val_count"] == 100 for r in recs)  # 10 classes x 10 val images, each counted once
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and set(r["per_class"]) == set(r["per_class"]) for r in recs)
    best = max(recs, key=lambda r: r["val_accuracy"])
    state, meta = load_weights(tiny_run / "best.safetensors")
    assert meta.arch == "tutorial_net_bn" and meta.num_classes == 10
    assert meta.metrics["val_accuracy"] == best["val_accuracy"] and meta.metrics["epoch"] == best["epoch"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    _, last = load_weights(tiny_run / "last.safetensors")
    assert last.metrics["epoch"] == 3
    assert load_config(tiny_run / "config.yaml").train.epochs == 3
    assert (tiny_run / "report" / "per_class.csv").read_text().startswith("class,correct,total,accuracy")
    png = Image.open(tiny_run / "report" / "confusion.png")
    assert png.format == "PNG" and png.size[0] > 300
    assert list((tiny_run / "state").glob("step-*/done.json"))


def test_evaluate_reproduces_the_reported_accuracy(tiny_run, shapes_dir):
    best = max(_records(tiny_run), key=lambda r: r["val_accuracy"])
    result = evaluate_folder(tiny_run, shapes_dir / "val")
    assert result["n"] == best["val_count"]
    assert result["correct"] == round(best["val_accuracy"] * best["val_count"])


def test_a_new_run_never_overwrites_an_old_one(tmp_path):
    cfg = load_config(None, ["name=exp", f"train.out_dir={tmp_path}"])
    assert resolve_run_dir(cfg) == tmp_path / "exp"
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "config.yaml").write_text("x")
    assert resolve_run_dir(cfg) == tmp_path / "exp-2"
    (tmp_path / "exp-2").mkdir()
    assert resolve_run_dir(cfg) == tmp_path / "exp-2"  # empty: reused
    auto = load_config(None, ["name=exp", f"train.out_dir={tmp_path}", "train.resume=auto"])
    assert resolve_run_dir(auto) == tmp_path / "exp"  # resume continues the named run


def test_schedules():
    cfg = load_config(None, ["optim.lr=1.0", "optim.warmup_epochs=1", "optim.min_lr_ratio=0.1"])
    lrs = [lr_at(s, 100, 10, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0)  # linear warmup over one epoch
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then cosine decay
    assert lr_at(100, 100, 10, cfg) == pytest.approx(0.1)
    one = load_config(None, ["optim.lr=1.0", "optim.schedule=onecycle"])
    ones = [lr_at(s, 100, 10, one) for s in range(101)]
    assert ones[0] == pytest.approx(1 / 25) and max(ones) == pytest.approx(1.0) and ones.index(max(ones)) == 30
    assert ones[-1] == pytest.approx(1e-4)
    const = load_config(None, ["optim.lr=0.5", "optim.schedule=constant", "optim.warmup_epochs=0"])
    assert {lr_at(s, 50, 10, const) for s in range(50)} == {0.5}
    assert math.isclose(lr_at(5, 100, 10, cfg), 0.1 + 0.9 * 0.5)


def _two_colours(root, n=24, size=16):
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", n // 2)):
        for cls, colour in (("blue", (30, 60, 220)), ("red", (220, 40, 30))):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                noise = rng.integers(-40, 40, (size, size, 3))
                Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")


@pytest.mark.parametrize("opts", [
    ["optim.name=sgd", "optim.nesterov=true"],
    ["optim.name=adamw", "optim.lr=0.01", "optim.schedule=onecycle", "train.label_smoothing=0.1"],
])
def test_training_learns_an_easy_task(tmp_path, opts):
    _two_colours(tmp_path / "d")
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={tmp_path / 'd'}", "data.image_size=16",
                             "data.batch_size=8", "model.arch=tutorial_net_bn", "train.epochs=3",
                             f"train.out_dir={tmp_path / 'runs'}", "train.progress=false", *opts])
    run = train(cfg)
    recs = _records(run)
    assert recs[-1]["val_accuracy"] == 1.0
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
