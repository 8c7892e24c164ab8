"""The recipe chosen from a data folder: sizes never upsampled, flips only for mirror-symmetric classes,
epochs and width from the budget, the user's overrides winning, and no torch needed to choose it."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from toolkit import UserError
from toolkit.cli import resolve_config
from toolkit.config import Config, apply_overrides, load_config
from toolkit.train import recipe, survey


def _glyph(kind: str, side: int, rng) -> np.ndarray:
    """A grey glyph: 'L' and its mirror 'J' (asymmetric classes), or a box / bar (mirror-symmetric)."""
    a = np.zeros((side, side), np.uint8)
    q, dy, dx = side // 4, rng.integers(-1, 2), rng.integers(-1, 2)
    r0, r1, c0, c1 = q + dy, side - q + dy, q + dx, side - q + dx
    if kind == "L":
        a[r0:r1, c0:c0 + 2] = 255
        a[r1 - 2:r1, c0:c1] = 255
    elif kind == "J":
        a[r0:r1, c1 - 2:c1] = 255
        a[r1 - 2:r1, c0:c1] = 255
    elif kind == "box":
        a[r0:r1, c0:c1] = 255
    else:  # bar
        a[r0:r1, side // 2 - 1:side // 2 + 1] = 255
    return a


def _folder(root, kinds, side: int, per_class: int = 12, layout: str = "train", height: int | None = None):
    rng = np.random.default_rng(0)
    base = root / layout if layout else root
    for k in kinds:
        (base / k).mkdir(parents=True)
        for i in range(per_class):
            img = Image.fromarray(_glyph(k, side, rng), "L")
            if height:
                img = img.resize((side, height))
            img.save(base / k / f"{i}.png")
    return root


def test_small_images_train_at_their_own_size_without_flips_when_mirrors_are_other_classes(tmp_path):
    root = _folder(tmp_path / "glyphs", ["L", "J"], side=12)
    cfg = recipe.recipe_for(root)
    assert cfg.data.kind == "imagefolder" and cfg.data.root == str(root)
    assert cfg.data.image_size == 12  # native: never upsampled
    assert cfg.data.hflip is False  # a mirrored L is a J
    assert cfg.model.arch in recipe.SPEEDRUN_WIDTHS
    assert cfg.data.crop_padding == 1
    assert cfg.train.label_smoothing == 0.2 and cfg.optim.schedule == "onecycle"
    assert cfg.name == "glyphs"


def test_flips_stay_on_for_mirror_symmetric_classes(tmp_path):
    summary = survey.scan_folder(_folder(tmp_path / "sym", ["box", "bar"], side=16))
    assert summary.flip_asymmetry < recipe.FLIP_ASYMMETRY
    cfg, why = recipe.choose(summary, Config(), gpu=False)
    assert cfg.data.hflip is True and any("flips on" in line for line in why)
    asym = survey.scan_folder(_folder(tmp_path / "asym", ["L", "J"], side=16))
    assert asym.flip_asymmetry > recipe.FLIP_ASYMMETRY  # the same test would have caught it


def test_large_images_are_resized_down_to_a_modest_size(tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "cached_backbone", lambda: None)  # whatever this machine's cache holds
    root = _folder(tmp_path / "photos", ["box", "bar"], side=300, per_class=4, layout="", height=200)
    summary = survey.scan_folder(root)
    assert summary.short_side == 200 and summary.train_dir == root and summary.layout.val is None
    cpu = recipe.choose(summary, Config(), gpu=False)[0]
    assert cpu.data.image_size == recipe.PHOTO_SIZE_CPU
    # translation + affine, not random-resized-crop, and no mixup: neither measured better on photos
    assert cpu.data.crop_padding > 0 and cpu.data.rotate_degrees > 0 and not cpu.data.random_resized_crop
    assert cpu.train.epochs >= recipe.MIXUP_FROM_EPOCHS and cpu.data.mixup == 0
    assert recipe.choose(summary, Config(), gpu=True)[0].data.image_size == recipe.PHOTO_SIZE_GPU


def test_budget_sets_epochs_and_width(tmp_path):
    summary = survey.scan_folder(_folder(tmp_path / "g", ["L", "J"], side=32, per_class=10))
    summary.counts = [25_000, 25_000]  # CIFAR-sized: the budget decides, not the data size
    plenty, _ = recipe.choose(summary, apply_overrides(Config(), {"train": {"budget_minutes": 600}}), gpu=False)
    short, _ = recipe.choose(summary, apply_overrides(Config(), {"train": {"budget_minutes": 2}}), gpu=False)
    assert plenty.model.arch == "speedrun_net" and plenty.train.epochs == recipe._useful_epochs(45_000)
    assert recipe.SPEEDRUN_WIDTHS.index(short.model.arch) > 0  # narrower under a tight budget
    expected = 2 * 60 * recipe.images_per_second(short.model.arch, 32, False) / 45_000
    assert short.train.epochs == max(1, int(expected))
    summary.counts = [400, 400]  # a small dataset takes many passes but never more than it can use
    small, _ = recipe.choose(summary, apply_overrides(Config(), {"train": {"budget_minutes": 600}}), gpu=False)
    assert small.train.epochs == recipe._useful_epochs(720) > 20
    # mixup only where runs are long enough for it to pay (measured on digits at 84 epochs)
    assert small.train.epochs >= recipe.MIXUP_FROM_EPOCHS and small.data.mixup == recipe.MIXUP_ALPHA > 0
    assert plenty.train.epochs < recipe.MIXUP_FROM_EPOCHS and plenty.data.mixup == 0 == short.data.mixup
    assert small.data.cutmix == 0 and not small.data.trivial_augment


def test_overrides_win_and_the_cli_accepts_a_folder(tmp_path):
    root = _folder(tmp_path / "glyphs", ["L", "J"], side=12)
    cfg = resolve_config(str(root), ["train.epochs=3", "data.hflip=true", "name=mine", "train.budget_minutes=1"])
    assert (cfg.train.epochs, cfg.data.hflip, cfg.name, cfg.data.image_size) == (3, True, "mine", 12)
    saved = tmp_path / "resolved.yaml"  # what the recipe resolves to is a config `toolkit train` accepts back
    saved.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert load_config(saved).to_dict() == cfg.to_dict()
    with pytest.raises(UserError, match="did you mean 'train.epochs'"):
        resolve_config(str(root), ["train.epoch=3"])
    with pytest.raises(UserError, match="at least two class subfolders of images; found 0 classes and 0 images"):
        recipe.recipe_for(tmp_path / "glyphs" / "train" / "L")
    one = tmp_path / "one" / "L"
    one.mkdir(parents=True)
    shutil.copy(next((root / "train" / "L").iterdir()), one / "a.png")
    with pytest.raises(UserError, match="at least two class subfolders of images; found 1 class and 1 image$"):
        recipe.recipe_for(tmp_path / "one")


def test_choosing_a_recipe_imports_no_torch(tmp_path):
    root = _folder(tmp_path / "glyphs", ["L", "J"], side=12)
    code = (f"import sys; from toolkit.train.recipe import recipe_for; recipe_for({str(root)!r}); "
            "from toolkit.train.catalog import check_arch; check_arch('resnet18'); "  # a bare timm name, no torch
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_drop_last_leaves_out_a_small_tail_and_the_recipe_uses_it(tmp_path):
    from toolkit.train.batches import TrainPlan

    plan = TrainPlan(898, 64, world=1, rank=0, seed=0, drop_last=True)
    assert plan.num_batches == 14 and all(len(b) == 64 for b in plan.batches(0))
    assert len(TrainPlan(898, 64, 1, 0, 0).batches(0)[-1]) == 2  # without it: a batch of 2 for BatchNorm
    assert recipe.recipe_for(_folder(tmp_path / "g", ["L", "J"], side=12)).data.drop_last is True


def test_photos_use_a_pretrained_backbone_found_in_the_local_cache(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    repo = cache / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert recipe.cached_backbone() is None  # nothing cached yet
    (repo / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(b"weights")
    assert recipe.cached_backbone() == ("resnet18.a1_in1k", 224)
    photos = _folder(tmp_path / "photos", ["box", "bar"], side=300, per_class=4, layout="", height=200)
    cfg, why = recipe.choose(survey.scan_folder(photos), Config(), gpu=False)
    assert (cfg.model.arch, cfg.model.pretrained, cfg.data.image_size) == ("timm/resnet18.a1_in1k", True, 224)
    assert cfg.model.freeze_epochs == 1 and cfg.optim.backbone_lr_scale == 0.1 and cfg.train.epochs >= 2
    assert any("pretrained backbone found in the local Hugging Face cache" in line for line in why)
    small = _folder(tmp_path / "small", ["L", "J"], side=12)
    assert recipe.choose(survey.scan_folder(small), Config(), gpu=False)[0].model.pretrained is False
