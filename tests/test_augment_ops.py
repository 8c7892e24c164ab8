"""TrivialAugment, random-resized-crop, mixup/CutMix and the soft-target loss: pinned draws, kernels checked
against torchvision or by hand, the pairing's targets, and short trainings with each option."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from toolkit.config import load_config
from toolkit.train import autoaugment, mixing, warp
from toolkit.train.augment import Augment, HorizontalFlip, MixUpCutMix, RandomCrop, RandomResizedCrop, TrivialAugment

NEW_OPS = {"trivial": TrivialAugment(), "rrc": RandomResizedCrop(), "mix": MixUpCutMix(0.2, 1.0, 10)}


def test_new_ops_draws_are_pinned_and_independent_of_the_other_ops():
    """The draws of a fixed seed: a change here changes how every config with the op trains."""
    tables = {name: Augment([op], 7).for_epoch(3, 6).params[0] for name, op in NEW_OPS.items()}
    assert tables["trivial"].tolist() == [[12, 25, 0], [7, 5, 0], [2, 23, 1], [7, 20, 1], [6, 0, 1], [4, 3, 1]]
    assert [round(v, 4) for v in tables["rrc"][:, 0].tolist()] == [0.9378, 0.284, 0.8101, 0.1478, 0.0218, 0.7062]
    assert [round(v, 4) for v in tables["mix"][:, 0].tolist()] == [0.866, 0.7386, 0.2776, 0.3255, 0.4038, 0.1322]
    assert tables["mix"][:, 1].tolist() == [1, 1, 1, 1, 0, 1]
    # every op on at once: each table is what the op draws alone, and crop and flip keep theirs
    everything = Augment([RandomCrop(4), HorizontalFlip(), *NEW_OPS.values()], 7).for_epoch(3, 6).params
    for name, table in zip(["crop", "flip", *NEW_OPS], everything):
        alone = Augment([RandomCrop(4)] if name == "crop" else [HorizontalFlip()] if name == "flip"
                        else [NEW_OPS[name]], 7).for_epoch(3, 6).params[0]
        assert torch.equal(table, alone), name
    # mixup's lambdas stay when CutMix is turned on (for the samples the switch leaves to mixup)
    mixup_only = MixUpCutMix(0.2, 0.0, 10).draw(6, _g())
    both = MixUpCutMix(0.2, 1.0, 10).draw(6, _g())
    keep = both[:, 1] == 0
    assert keep.any() and torch.equal(both[keep, 0], mixup_only[keep, 0])
    assert (mixup_only[:, 1] == 0).all() and (MixUpCutMix(0.0, 1.0, 10).draw(6, _g())[:, 1] == 1).all()


def _g():
    return torch.Generator().manual_seed(5)


def test_config_keys_turn_the_ops_on_in_order():
    cfg = load_config(None, ["data.trivial_augment=true", "data.random_resized_crop=true", "data.mixup=0.2",
                             "data.cutmix=1", "data.cutout=4", "data.rotate_degrees=5"]).data
    aug = Augment.from_config(cfg, seed=0, num_classes=3)
    assert [op.name for op in aug.ops] == ["crop", "flip", "rrc", "affine", "trivial", "cutout", "mix"]
    with pytest.raises(ValueError, match="class count"):
        Augment.from_config(cfg, seed=0)
    from toolkit import UserError

    for bad, match in (("data.rrc_scale=0.5,0.2", "rrc_scale"), ("data.rrc_ratio=0,1", "rrc_ratio"),
                       ("data.mixup=-1", "data.mixup' must be 0 or more")):
        with pytest.raises(UserError, match=match):
            load_config(None, [bad])


def test_trivial_augment_draws_every_op_and_bin_uniformly():
    p = autoaugment.draw(28_000, _g())
    counts = torch.bincount(p[:, 0], minlength=len(autoaugment.NAMES))
    assert len(counts) == 14 and counts.min() > 1700 and counts.max() < 2300  # 2,000 each expected
    assert p[:, 1].min() == 0 and p[:, 1].max() == autoaugment.BINS - 1
    m = autoaugment.magnitudes(p)
    rot = p[:, 0] == autoaugment.NAMES.index("rotate")
    assert m[rot].min() == -135 and m[rot].max() == 135  # signed
    assert (m[p[:, 0] == autoaugment.NAMES.index("solarize")] >= 0).all()  # unsigned


def _images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=g)  # enough pixels to equalize
    x[1] = x[1] // 3 + 40  # low contrast
    x[2, 0] = 7  # a flat channel
    return x


@pytest.mark.parametrize("name", ["brightness", "color", "contrast", "sharpness", "posterize", "solarize",
                                  "autocontrast", "equalize"])
def test_trivial_augment_colour_ops_compute_what_torchvision_computes(name):
    tvf = pytest.importorskip("torchvision.transforms.v2.functional")
    ref = {"brightness": lambda i, m: tvf.adjust_brightness(i, 1 + m), "color": lambda i, m: tvf.adjust_saturation(
        i, 1 + m), "contrast": lambda i, m: tvf.adjust_contrast(i, 1 + m), "sharpness": lambda i, m:
        tvf.adjust_sharpness(i, 1 + m), "posterize": lambda i, m: tvf.posterize(i, int(8 - round(m))),
        "solarize": lambda i, m: tvf.solarize(i, 255 - m), "autocontrast": lambda i, m: tvf.autocontrast(i),
        "equalize": lambda i, m: tvf.equalize(i)}[name]
    x = _images()
    for b, sign in ((7, 0), (18, 1), (30, 0)):
        params = torch.tensor([[autoaugment.NAMES.index(name), b, sign]] * len(x))
        ours = autoaugment.apply(x, params)
        assert ours.dtype == torch.uint8 and ours.shape == x.shape
        m = float(autoaugment.magnitudes(params[:1])[0])
        want = torch.stack([ref(img, m) for img in x])
        diff = (ours.int() - want.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, (name, b)  # torchvision's factors are float64
        if name != "posterize" or b > 2:
            assert not torch.equal(ours, x)  # it did something


def test_trivial_augment_geometry_and_grouping():
    x = torch.zeros(5, 3, 9, 9, dtype=torch.uint8)
    x[:, :, 4, :] = 200  # a horizontal bar
    x[3] = x[3].transpose(1, 2).clone()  # a vertical one
    ops = autoaugment.NAMES.index
    params = torch.tensor([[ops("identity"), 30, 1], [ops("rotate"), 20, 0], [ops("translate_y"), 30, 0],
                           [ops("shear_x"), 30, 0], [ops("rotate"), 0, 1]])  # bin 20: 90 degrees
    out = autoaugment.apply(x, params)
    assert torch.equal(out[0], x[0]) and torch.equal(out[4], x[4])  # identity; a rotation by 0
    assert out[1, 0, :, 4].float().mean() > 150 and out[1, 0, 4, 0] == 0  # the bar turned vertical
    shift = round(autoaugment.TRANSLATE * 9)  # 4 px down
    assert out[2, 0, 4 + shift].float().mean() > 150 and out[2, 0, 4].max() == 0
    assert torch.equal(out[3, :, 4], x[3, :, 4]) and out[3, 0, 0, 4] == 0  # about the centre row: it tilts the bar
    assert out[3, 0, 0].argmax() in (0, 8)  # 0.99 x 4 rows: 4 px off at the top row
    # grouped by op and computed for all then selected: the same pixels, for every op at once
    p = autoaugment.draw(64, _g())
    imgs = torch.randint(0, 256, (64, 3, 10, 10), dtype=torch.uint8, generator=_g())
    assert torch.equal(autoaugment.apply(imgs, p), autoaugment.apply(imgs, p, grouped=False))


def test_resized_crop_boxes_stay_inside_and_follow_scale_and_ratio():
    H, W, scale, ratio = 40, 30, (0.2, 0.6), (0.5, 2.0)
    boxes = warp.resized_crop_boxes(warp.draw_resized_crops(4000, _g()), H, W, scale, ratio)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    area, aspect = h * w / (H * W), w / h
    assert area.min() >= scale[0] * 0.85 and area.max() <= scale[1] * 1.15  # sides are whole pixels
    assert aspect.min() >= ratio[0] * 0.85 and aspect.max() <= ratio[1] * 1.15
    assert (area < 0.3).any() and (area > 0.5).any() and (aspect < 0.7).any() and (aspect > 1.4).any()
    assert len(set(top.tolist())) > 15 and len(set(left.tolist())) > 10  # positions spread
    # ratios out of reach for every attempt: torchvision's fallback, the centred crop clamped to the ratio
    fallback = warp.resized_crop_boxes(warp.draw_resized_crops(5, _g()), 20, 10, (1.0, 1.0), (3.0, 4.0))
    assert fallback.tolist() == [[8, 0, 3, 10]] * 5  # 10 wide, 10 / 3 = 3 high, centred


def test_resized_crop_resizes_the_box_as_interpolate_does():
    x = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8, generator=_g())
    whole = warp.warp(x, warp.box_theta(torch.tensor([[0, 0, 8, 8]]), 8, 8), padding="border")
    assert torch.equal(whole, x)
    half = warp.warp(x, warp.box_theta(torch.tensor([[0, 0, 8, 4]]), 8, 8), padding="border")
    want = F.interpolate(x[..., :4].float(), size=(8, 8), mode="bilinear", align_corners=False).round().to(torch.uint8)
    assert (half[..., :7].int() - want[..., :7].int()).abs().max() <= 1  # the last column reads past the box
    out, y = RandomResizedCrop()(x.expand(4, -1, -1, -1), torch.zeros(4), warp.draw_resized_crops(4, _g()))
    assert out.shape == (4, 3, 8, 8) and out.dtype == torch.uint8


def _constant_batch(B=4, H=8, W=10):
    return torch.arange(1, B + 1, dtype=torch.uint8).view(B, 1, 1, 1).expand(B, 3, H, W).clone() * 50


def test_mixup_blends_with_the_previous_sample_and_targets_are_the_shares():
    x, y = _constant_batch(), torch.tensor([0, 1, 2, 2])
    params = torch.tensor([[0.7, 0, 0, 0], [0.25, 0, 0, 0], [1.0, 0, 0, 0], [0.5, 0, 0, 0]])
    out, t = mixing.mix(x, y, params, num_classes=3)
    assert out.dtype == torch.uint8 and t.shape == (4, 3) and t.dtype == torch.float32
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert torch.allclose(t, torch.tensor([[0.7, 0, 0.3], [0.75, 0.25, 0], [0, 0, 1], [0, 0, 1]]))
    assert out[:, 0, 0, 0].tolist() == [round(0.7 * 50 + 0.3 * 200), round(0.25 * 100 + 0.75 * 50), 150,
                                        round(0.5 * 200 + 0.5 * 150)]


def test_cutmix_box_area_matches_lambda():
    B, H, W = 64, 12, 10
    x, y = _constant_batch(B, H, W), torch.arange(B) % 5
    params = MixUpCutMix(0.0, 1.0, 5).draw(B, _g())
    out, t = mixing.mix(x, y, params, num_classes=5)
    prev = mixing.partners(B)
    for i in range(B):
        own = (out[i, 0] == x[i, 0, 0, 0]).float().mean()
        taken = (out[i, 0] == x[prev[i], 0, 0, 0]).float().mean()
        assert own + taken == 1 and math.isclose(t[i, y[i]] if y[i] != y[prev[i]] else 1.0, float(own), rel_tol=1e-5)
        assert math.isclose(t[i].sum(), 1.0, rel_tol=1e-6)
    assert 0.2 < float(t.max(1).values.mean()) < 0.95  # boxes of many sizes, some clipped at the border


def test_an_unreadable_sample_is_never_mixed_in():
    x, y = _constant_batch(), torch.tensor([0, -100, 1, 2])  # -100: an unreadable file of the streaming source
    out, t = mixing.mix(x, y, torch.tensor([[0.5, 0, 0, 0]] * 4), num_classes=3)
    assert t[1].sum() == 0 and torch.equal(out[2], x[2]) and t[2].tolist() == [0, 1, 0]  # 2's partner is 1
    logits = torch.randn(4, 3)
    keep = torch.tensor([0, 2, 3])
    assert torch.allclose(mixing.CrossEntropy(0.1)(logits, t), mixing.CrossEntropy(0.1)(logits[keep], t[keep]))


def test_soft_target_loss_equals_the_hand_computed_value():
    logits, target = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.7, 0.3, 0.0]])
    s = 0.1
    z = math.log(math.exp(2) + 1 + math.exp(-1))  # log-sum-exp
    smoothed = [0.9 * 0.7 + s / 3, 0.9 * 0.3 + s / 3, s / 3]
    want = -sum(w * (v - z) for w, v in zip(smoothed, [2.0, 0.0, -1.0]))
    assert math.isclose(float(mixing.CrossEntropy(s)(logits, target)), want, rel_tol=1e-6)
    labels = torch.tensor([0, 2, -100])  # class labels: torch's cross-entropy, -100 ignored
    batch = torch.randn(3, 3)
    assert torch.equal(mixing.CrossEntropy(s)(batch, labels), F.cross_entropy(batch, labels, label_smoothing=s))
    assert torch.allclose(mixing.CrossEntropy(s)(batch[:2], F.one_hot(labels[:2], 3).float()),
                          F.cross_entropy(batch[:2], labels[:2], label_smoothing=s))


@pytest.mark.parametrize("opts", [["data.trivial_augment=true"], ["data.random_resized_crop=true"],
                                  ["data.mixup=0.4"], ["data.cutmix=1.0", "data.mixup=0.4", "train.grad_accum=2"]])
def test_a_short_training_runs_with_each_option(opts, shapes_dir, tmp_path):
    from toolkit.train import train

    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={shapes_dir}", "model.arch=tutorial_net_bn",
                             "train.epochs=1", "data.batch_size=16", "train.progress=false", "data.image_size=16",
                             "train.label_smoothing=0.1", f"train.out_dir={tmp_path}", *opts])
    run = train(cfg)
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(rec["train_loss"]) and rec["train_loss"] > 0 and 0 <= rec["val_accuracy"] <= 1


@pytest.mark.slow
def test_two_processes_train_with_every_new_op_and_resume_exactly(shapes_dir, tmp_path):
    """2 gloo processes with TrivialAugment, random-resized-crop, mixup and CutMix: killed mid-epoch and
    resumed, the weights equal an uninterrupted run's (the mixing pairs and draws are functions of the epoch)."""
    from jobs import assert_same_weights, launch, ok, train_args

    extra = ["data.trivial_augment=true", "data.random_resized_crop=true", "data.mixup=0.4", "data.cutmix=1.0",
             "train.label_smoothing=0.1"]
    ok(launch(train_args(shapes_dir, tmp_path, "ref", *extra), 2))
    args = train_args(shapes_dir, tmp_path, "run", *extra)
    assert launch(args, 2, fault={"FAULT": "kill", "FAULT_STEP": 10}).returncode != 0
    assert not (tmp_path / "run" / "report").exists()  # it died before the end
    ok(launch(args + ["train.resume=auto"], 2))
    assert_same_weights(tmp_path / "ref", tmp_path / "run")
