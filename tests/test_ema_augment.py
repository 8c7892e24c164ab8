"""The weight EMA (its rule, its release when better, its resume) and the affine and cutout ops."""

import json
import math

import pytest
import torch

from toolkit.config import load_config
from toolkit.train.augment import Augment, Cutout, RandomAffine, RandomCrop
from toolkit.train.ema import WeightEma


def test_ema_follows_the_warmed_up_rule():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = WeightEma(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model, step=0)  # d = min(0.9, 1/10) = 0.1: mostly the new weights
    assert torch.allclose(ema.module[0].weight, start + 0.9)
    assert int(ema.module[1].num_batches_tracked) == 7  # integer buffers copied
    ema.update(model, step=1000)  # d = 0.9
    assert torch.allclose(ema.module[0].weight, start + 0.9 + 0.1 * 0.1)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_affine_and_cutout_ops():
    x = torch.zeros(2, 3, 9, 9, dtype=torch.uint8)
    x[:, :, 4, :] = 200  # a horizontal bar
    rot = RandomAffine(degrees=90, scale=0.0)
    out, _ = rot(x, torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # +90 degrees, and no change
    assert out.dtype == torch.uint8
    assert torch.equal(out[1], x[1])  # identity parameters leave the image as it was
    assert out[0, 0, :, 4].float().mean() > 150 and out[0, 0, 4, 0] == 0  # the bar is vertical now
    cut, _ = Cutout(3)(torch.full((1, 3, 8, 8), 9, dtype=torch.uint8), torch.zeros(1),
                       torch.tensor([[4 << 13, 4 << 13]]))  # centre (4, 4)
    zero = (cut[0, 0] == 0).nonzero()
    assert len(zero) == 9 and zero.min(0).values.tolist() == [3, 3] and zero.max(0).values.tolist() == [5, 5]


def test_new_ops_keep_the_draws_of_the_existing_ones():
    cfg = load_config(None, ["data.rotate_degrees=10", "data.scale_jitter=0.1", "data.cutout=4"]).data
    aug = Augment.from_config(cfg, seed=3)
    assert [op.name for op in aug.ops] == ["crop", "flip", "affine", "cutout"]
    plain = Augment.from_config(load_config(None, []).data, seed=3).for_epoch(2, 40).params
    more = aug.for_epoch(2, 40).params
    assert torch.equal(plain[0], more[0]) and torch.equal(plain[1], more[1])
    assert Augment([RandomCrop(2)], 3).for_epoch(2, 40).params[0].max() <= 4
    from toolkit import UserError

    with pytest.raises(UserError, match="data.scale_jitter' must be at least 0 and below 1"):
        load_config(None, ["data.scale_jitter=1.5"])  # a zoom of 1 - 1.5 would mirror the image


def test_ema_is_evaluated_and_released_when_better(tmp_path, shapes_dir):
    from toolkit.train import train
    from toolkit.train.state import list_states, load_state
    from toolkit.train.weights import load_weights

    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={shapes_dir}", "model.arch=tutorial_net_bn",
                             "train.epochs=3", "data.batch_size=32", "train.ema_decay=0.9", "train.progress=false",
                             f"train.out_dir={tmp_path}", "data.rotate_degrees=5", "data.cutout=4"])
    run = train(cfg)
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        chosen = r["val_accuracy_ema"] if r["weights"] == "ema" else r["val_accuracy_trained"]
        assert r["val_accuracy"] == chosen == max(r["val_accuracy_ema"], r["val_accuracy_trained"])
    _, last_meta = load_weights(run / "last.safetensors")
    assert last_meta.metrics["val_accuracy"] == recs[-1]["val_accuracy"]
    _, files = load_state(list_states(run / "state")[-1])
    assert set(files["ema.safetensors"]) == set(files["model.safetensors"])
    assert any(not torch.equal(files["ema.safetensors"][k], files["model.safetensors"][k])
               for k in files["model.safetensors"] if files["model.safetensors"][k].is_floating_point())
    assert not math.isnan(recs[-1]["val_accuracy_ema"])
