"""Starting weights: matching tensors from a toolkit run or a foreign state dict, timm's pretrained path
offline from a local file and from a Hugging Face cache layout, pretrained defaults, never pickle."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from toolkit import UserError
from toolkit.config import Config, ModelConfig, apply_overrides
from toolkit.train import pretrained
from toolkit.train.models import create_model
from toolkit.train.optim import backbone_factor, build_optimizer, set_lr


def test_weights_from_another_run_load_everything_but_the_classifier(tmp_path, caplog):
    torch.manual_seed(0)
    source = create_model("speedrun_net_xs", 10)
    path = tmp_path / "source.safetensors"
    save_file({f"module.{k}": v for k, v in source.state_dict().items()}, str(path))  # a wrapper prefix too
    caplog.set_level("INFO", logger="toolkit")
    torch.manual_seed(1)
    model = pretrained.build(ModelConfig(arch="speedrun_net_xs", weights=str(path)), num_classes=3, image_size=32)
    head = pretrained.classifier_prefixes(model, 3)
    assert head == ["head"]
    for k, v in model.state_dict().items():
        if k == "head.weight":
            assert v.shape == (3, 64)  # re-made for 3 classes, not loaded
        else:
            assert torch.equal(v, source.state_dict()[k]), k
    line = next(r.getMessage() for r in caplog.records if "tensors loaded" in r.getMessage())
    n = len(source.state_dict())
    assert f"{n - 1} tensors loaded, 1 skipped (head.weight), 1 new (head.weight)" in line


def test_weights_that_fit_nothing_and_pickles_are_refused(tmp_path):
    other = tmp_path / "other.safetensors"
    save_file({"encoder.layer.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(UserError, match="no tensor that fits"):
        pretrained.build(ModelConfig(arch="speedrun_net_xs", weights=str(other)), 3, 32)
    for name in ("w.pth", "w.pt", "w.bin", "w.ckpt"):
        torch.save({"x": torch.zeros(1)}, tmp_path / name)
        with pytest.raises(UserError, match="pickle"):
            pretrained.build(ModelConfig(arch="speedrun_net_xs", weights=str(tmp_path / name)), 3, 32)
    with pytest.raises(UserError, match="does not exist"):
        pretrained.build(ModelConfig(arch="speedrun_net_xs", weights=str(tmp_path / "none.safetensors")), 3, 32)
    with pytest.raises(UserError, match="needs a timm model"):
        pretrained.build(ModelConfig(arch="speedrun_net_xs", pretrained=True), 3, 32)


def _timm_file(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = timm.create_model("resnet10t", num_classes=1000)
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    return source, path


def test_timm_pretrained_from_a_local_file(tmp_path):
    source, path = _timm_file(tmp_path)
    model = pretrained.build(ModelConfig(arch="resnet10t", pretrained=True, weights=str(path)), 4, 224)
    assert model.get_classifier().out_features == 4  # timm re-made the classifier for the new classes
    own = model.state_dict()
    assert torch.equal(own["conv1.0.weight"], source.state_dict()["conv1.0.weight"])
    assert torch.equal(own["layer4.0.conv2.weight"], source.state_dict()["layer4.0.conv2.weight"])
    assert pretrained.classifier_prefixes(model, 4) == ["fc"]
    with pytest.raises(UserError, match="must be an existing .safetensors"):
        pretrained.build(ModelConfig(arch="timm/resnet10t", pretrained=True, weights=str(tmp_path / "x.pth")), 4, 224)


@pytest.mark.slow
def test_timm_pretrained_offline_from_the_hugging_face_cache(tmp_path):
    """timm's own path (hf_hub_download) with HF_HUB_OFFLINE=1 and a cache laid out as the hub client writes it."""
    timm = pytest.importorskip("timm")
    source, path = _timm_file(tmp_path)
    hub_id = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id
    repo = tmp_path / "hf" / "hub" / f"models--{hub_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    os.replace(path, snap / "model.safetensors")
    (snap / "config.json").write_text(json.dumps({"architecture": "resnet10t", "num_classes": 1000}))
    code = ("import torch; from toolkit.config import ModelConfig; from toolkit.train.pretrained import build; "
            "m = build(ModelConfig(arch='timm/resnet10t', pretrained=True), 6, 224); "
            "print(m.get_classifier().out_features, float(m.state_dict()['conv1.0.weight'].sum()))")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    classes, total = out.stdout.split()
    assert int(classes) == 6
    assert float(total) == pytest.approx(float(source.state_dict()["conv1.0.weight"].sum()), rel=1e-5)
    env["HF_HOME"] = str(tmp_path / "empty")  # offline with nothing cached: one clear sentence
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 9, 0, 0)).save(tmp_path / "data" / c / f"{i}.png")
    out = subprocess.run([sys.executable, "-m", "toolkit", "train", "configs/quickstart.yaml", "model.arch=resnet10t",
                          "model.pretrained=true", "data.kind=imagefolder", f"data.root={tmp_path / 'data'}",
                          "data.val_fraction=0.5", f"train.out_dir={tmp_path}"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 2 and "model.pretrained: no weights for timm model 'resnet10t'" in out.stderr


def test_pretrained_defaults_replace_only_default_data_keys():
    pytest.importorskip("timm")
    cfg = apply_overrides(Config(), {"model": {"arch": "timm/vit_tiny_patch16_224", "pretrained": True}})
    changed = pretrained.apply_pretrained_defaults(cfg)
    assert cfg.data.image_size == 224 and cfg.data.mean == [0.5, 0.5, 0.5] and cfg.data.std == [0.5, 0.5, 0.5]
    assert cfg.data.interpolation == "bicubic"  # timm's pretrained_cfg of this model
    assert changed == ["data.image_size=224", "data.mean=0.5,0.5,0.5", "data.std=0.5,0.5,0.5",
                       "data.interpolation=bicubic"]
    mine = apply_overrides(Config(), {"model": {"arch": "resnet10t", "pretrained": True},
                                      "data": {"image_size": 96, "mean": [0.1, 0.2, 0.3]}})
    pretrained.apply_pretrained_defaults(mine)
    assert mine.data.image_size == 96 and mine.data.mean == [0.1, 0.2, 0.3]  # the user's values stay
    bilinear = apply_overrides(Config(), {"model": {"arch": "timm/dla34.in1k", "pretrained": True}})
    assert "data.interpolation=bicubic" not in pretrained.apply_pretrained_defaults(bilinear)
    assert bilinear.data.interpolation == "bilinear"
    stated = apply_overrides(Config(), {"model": {"arch": "timm/dla34.in1k", "pretrained": True},
                                        "data": {"interpolation": "bicubic"}})
    pretrained.apply_pretrained_defaults(stated)
    assert stated.data.interpolation == "bicubic"  # the user's filter stays
    assert pretrained.apply_pretrained_defaults(Config()) == []


def test_freeze_then_discriminative_warmup():
    cfg = apply_overrides(Config(), {"model": {"freeze_epochs": 2}, "optim": {"backbone_lr_scale": 0.1,
                                                                             "warmup_epochs": 1}})
    factors = [backbone_factor(s, 10, cfg) for s in range(40)]
    assert factors[:20] == [0.0] * 20  # two epochs of 10 steps: the classifier alone
    assert factors[20] == pytest.approx(0.01) and factors[29] == pytest.approx(0.1) and factors[35] == pytest.approx(0.1)
    model = create_model("speedrun_net_xs", 5)
    opt = build_optimizer(model, cfg, pretrained.classifier_prefixes(model, 5))
    set_lr(opt, 0.5, 3, 10, cfg)
    head = [g for g in opt.param_groups if not g["backbone"]]
    backbone = [g for g in opt.param_groups if g["backbone"]]
    assert [p for g in head for p in g["params"]] == [model.head.weight]
    assert all(g["lr"] == 0.5 for g in head) and all(g["lr"] == 0.0 for g in backbone)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_fine_tuning_a_runs_weights_beats_training_from_scratch(tmp_path):
    """Weights of a run on 10 shape classes, fine-tuned on 3 classes with 5 pictures each, against the same
    network, data and epochs from random weights."""
    import shutil

    from toolkit.config import load_config
    from toolkit.train import train
    from toolkit.train.datasets import shapes

    source_data, target = tmp_path / "source", tmp_path / "target"
    shapes.generate(source_data, train_per_class=60, val_per_class=10, seed=0, workers=1)
    shapes.generate(target, train_per_class=5, val_per_class=30, seed=5, workers=1)
    for name in shapes.CLASSES[3:]:  # another dataset: 3 classes, other pictures
        shutil.rmtree(target / "train" / name)
        shutil.rmtree(target / "val" / name)
    common = ["data.kind=imagefolder", "model.arch=speedrun_net_xs", "train.progress=false", "optim.lr=0.1",
              f"train.out_dir={tmp_path / 'runs'}", "data.batch_size=16"]
    source = train(load_config(None, common + [f"data.root={source_data}", "train.epochs=6", "name=source"]))

    def accuracy(*extra):
        run = train(load_config(None, common + [f"data.root={target}", "train.epochs=4", *extra]))
        return max(json.loads(line)["val_accuracy"] for line in (run / "metrics.jsonl").read_text().splitlines())

    scratch = accuracy("name=scratch")
    tuned = accuracy("name=tuned", f"model.weights={source / 'best.safetensors'}")
    assert tuned > scratch + 0.1, (tuned, scratch)
