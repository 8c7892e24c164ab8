import json
import math

import pytest
import torch
from PIL import Image

from toolkit.config import load_config
from toolkit.evaluate import evaluate_folder
from toolkit.train import resolve_run_dir, train
from toolkit.train.optim import lr_at
from toolkit.train.weights import load_weights


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents(tiny_run):
    recs = _records(tiny_run)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert all(r["val_count"] == 100 for r in recs)  # 10 classes x 10 val images, each counted once
    from toolkit.train.datasets.shapes import CLASSES

    for r in recs:  # per-class accuracy of each class's 10 images, consistent with the overall figure
        assert list(r["per_class"]) == sorted(CLASSES) and all(0.0 <= a <= 1.0 for a in r["per_class"].values())
        assert sum(10 * a for a in r["per_class"].values()) == pytest.approx(100 * r["val_accuracy"])
    assert any(0 < a < 1 for r in recs for a in r["per_class"].values())  # not all trivially 0 or 1
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


def _two_colours(root):
    from conftest import two_colours

    return two_colours(root)


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


def _cfg(shapes_dir, tmp_path, *extra):
    return load_config(None, [f"data.root={shapes_dir}", f"train.out_dir={tmp_path}", "train.progress=false",
                              "model.arch=tutorial_net", "train.epochs=1", *extra])


def test_gradient_accumulation_equals_the_whole_batch(shapes_dir, tmp_path):
    whole = train(_cfg(shapes_dir, tmp_path, "name=whole", "data.batch_size=20"))  # 200 images: 10 full steps
    accum = train(_cfg(shapes_dir, tmp_path, "name=accum", "data.batch_size=10", "train.grad_accum=2"))
    a, _ = load_weights(whole / "last.safetensors")
    b, _ = load_weights(accum / "last.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


def test_gradient_clipping_limits_each_update(shapes_dir, tmp_path):
    free = train(_cfg(shapes_dir, tmp_path, "name=free", "optim.lr=0.5", "optim.momentum=0",
                      "optim.weight_decay=0", "optim.schedule=constant", "optim.warmup_epochs=0"))
    clipped = train(_cfg(shapes_dir, tmp_path, "name=clip", "optim.lr=0.5", "optim.momentum=0",
                         "optim.weight_decay=0", "optim.schedule=constant", "optim.warmup_epochs=0",
                         "train.clip_grad_norm=1e-4"))
    torch.manual_seed(0)
    from toolkit.train.models import create_model

    init = create_model("tutorial_net", 10).state_dict()
    moved = {}
    for name, run in (("free", free), ("clip", clipped)):
        w, _ = load_weights(run / "last.safetensors")
        moved[name] = sum((w[k] - init[k]).pow(2).sum() for k in init).sqrt().item()
    steps = 200 // 64 + 1  # optimizer steps in the epoch
    assert moved["clip"] <= 0.5 * 1e-4 * steps * 1.001  # each step moves at most lr * max_norm
    assert moved["free"] > 100 * moved["clip"]


def test_a_diverging_run_stops_with_a_clear_error_and_saves_no_nan(shapes_dir, tmp_path):
    from toolkit.train import NonFiniteLoss

    cfg = _cfg(shapes_dir, tmp_path, "name=nan", "optim.lr=1e30", "optim.warmup_epochs=0", "train.max_nonfinite=2")
    with pytest.raises(NonFiniteLoss, match="NaN or Inf for 2 steps in a row.*lower optim.lr"):
        train(cfg)
    for f in (tmp_path / "nan").rglob("*.safetensors"):
        w = load_weights(f)[0] if f.parent.name == "nan" else {}
        assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_bf16_mixed_precision_on_cpu(shapes_dir, tmp_path):
    import os

    from conftest import run_toolkit

    args = ["train", "configs/quickstart.yaml", f"data.root={shapes_dir}", f"train.out_dir={tmp_path}",
            "train.epochs=1", "train.progress=false"]
    from conftest import ROOT

    bf16 = run_toolkit(*args, "name=bf16", env={"ACCELERATE_MIXED_PRECISION": "bf16"}, cwd=ROOT)
    fp32 = run_toolkit(*args, "name=fp32", env={"ACCELERATE_MIXED_PRECISION": "no"}, cwd=ROOT)
    assert "precision bf16" in bf16.stderr and "precision no" in fp32.stderr
    a, _ = load_weights(tmp_path / "bf16" / "last.safetensors")
    b, _ = load_weights(tmp_path / "fp32" / "last.safetensors")
    assert all(v.dtype != torch.bfloat16 for v in a.values())  # released weights are fp32
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
    assert 0 < diff < 1.0  # bf16 arithmetic really ran (different rounding), and still trained sanely
    del os
    from toolkit.export import export

    out = export(tmp_path / "bf16", tmp_path / "bf16.onnx")  # a bf16-trained run exports as clean fp32
    assert json.loads(out.with_suffix(".json").read_text())["parity_vs_torch"]["top1_agreement"] == 1.0


@pytest.mark.slow
def test_compiled_training_saves_clean_keys(shapes_dir, tmp_path):
    run = train(_cfg(shapes_dir, tmp_path, "name=compiled", "train.compile=true"))
    state, _ = load_weights(run / "last.safetensors")
    assert state and not any("_orig_mod" in k or k.startswith("module.") for k in state)
    from safetensors.torch import load_file

    raw = load_file(run / "last.safetensors")  # the file itself, not only after cleaning on load
    assert raw.keys() == state.keys()
    from toolkit.export import export

    out = export(run, tmp_path / "compiled.onnx")
    assert json.loads(out.with_suffix(".json").read_text())["parity_vs_torch"]["top1_agreement"] == 1.0


def test_stream_and_memory_paths_train_identically(shapes_dir, tmp_path):
    """Both sources give the same uint8 batches and share the device augmentation: same weights."""
    args = ["data.batch_size=16", "train.epochs=2", "model.arch=tutorial_net_bn"]
    mem = train(_cfg(shapes_dir, tmp_path, "name=mem", "data.cache=memory", *args))
    stream = train(_cfg(shapes_dir, tmp_path, "name=stream", "data.cache=stream", "data.num_workers=1", *args))
    a, _ = load_weights(mem / "last.safetensors")
    b, _ = load_weights(stream / "last.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _records(mem)[-1]["val_accuracy"] == _records(stream)[-1]["val_accuracy"]


def test_flip_tta_averages_the_image_and_its_mirror():
    from toolkit.train import evaluate
    from toolkit.train.batches import Normalize

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8)
    y = torch.randint(0, 3, (20,))
    norm = Normalize([0.5] * 3, [0.5] * 3)
    source = lambda shards: ((x[i], y[i]) for i in shards)  # noqa: E731
    shards = [torch.arange(0, 10), torch.arange(10, 20)]
    with torch.no_grad():
        plain_pred = model(norm(x)).argmax(1)
        tta_pred = (model(norm(x)) + model(norm(x).flip(3))).argmax(1)
    assert not torch.equal(plain_pred, tta_pred)  # the check below can tell the two apart
    want = torch.zeros(2, 3, 3, dtype=torch.int64)
    for view, pred in enumerate((plain_pred, tta_pred)):
        for t, p in zip(y, pred):
            want[view, t, p] += 1
    assert torch.equal(evaluate(model, source, shards, norm, 3, tta=False)[0], want[:1])
    assert torch.equal(evaluate(model, source, shards, norm, 3, tta=True)[0], want)  # [0] stays the plain figure


def test_sync_bn_converts_batchnorm_only_for_several_gpu_processes():
    from types import SimpleNamespace

    import toolkit.train.setup as setup

    cfg = load_config(None, ["model.arch=tutorial_net_bn", "model.sync_bn=true"])
    ds = SimpleNamespace(classes=list("abcdefghij"))

    def kinds(device: str, world: int) -> tuple[int, int]:
        model, _, _ = setup._build_model(cfg, ds, torch.device(device), world, None)
        return (sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()),
                sum(type(m) is torch.nn.BatchNorm2d for m in model.modules()))

    synced, plain = kinds("cuda", 2)  # only converted, never run: no GPU needed
    assert synced > 0 and plain == 0
    assert kinds("cuda", 1) == kinds("cpu", 2) == (0, synced)  # one process, or gloo on CPUs: plain BatchNorm


def test_stop_at_accuracy_ends_the_run_early(tmp_path):
    _two_colours(tmp_path / "d")
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={tmp_path / 'd'}", "data.image_size=16",
                             "data.batch_size=8", "model.arch=tutorial_net_bn", "train.epochs=30",
                             "train.stop_at_accuracy=0.9", f"train.out_dir={tmp_path / 'runs'}",
                             "train.progress=false"])
    recs = _records(train(cfg))
    assert recs[-1]["val_accuracy"] >= 0.9 and len(recs) < 30
    assert all(r["val_accuracy"] < 0.9 for r in recs[:-1])


def test_training_from_python_says_when_openmp_threads_would_spin(tmp_path, monkeypatch, caplog):
    # the toolkit command sets OMP_WAIT_POLICY=PASSIVE before torch is imported; train() called from Python
    # cannot, so it says how (a shared CPU trains small models several times slower otherwise)
    import torch

    _two_colours(tmp_path / "d")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for policy in (None, "PASSIVE"):
            if policy is None:
                monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
            else:
                monkeypatch.setenv("OMP_WAIT_POLICY", policy)
            caplog.clear()
            with caplog.at_level("INFO", logger="toolkit"):
                train(load_config(None, ["data.kind=imagefolder", f"data.root={tmp_path / 'd'}", "data.image_size=16",
                                         "data.batch_size=8", "model.arch=tutorial_net_bn", "train.epochs=1",
                                         f"train.out_dir={tmp_path / 'runs'}", "train.progress=false"]))
            assert ("OMP_WAIT_POLICY is not set" in caplog.text) == (policy is None)
    finally:
        torch.set_num_threads(threads)


def test_a_last_batch_of_one_never_reaches_batchnorm(tmp_path, monkeypatch):
    """17 images at batch 16: the 17th joins the last batch (a net whose BatchNorm sees one value per
    channel, as a ResNet's last stage does at 32 px, would raise on a batch of one)."""
    import toolkit.train.pretrained as pretrained

    def bn_net(arch, num_classes, image_size, **kw):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * image_size**2, 8), torch.nn.BatchNorm1d(8),
                                   torch.nn.ReLU(), torch.nn.Linear(8, num_classes))

    import toolkit.train.models as models

    monkeypatch.setattr(pretrained, "create_model", bn_net)  # the loop builds its model through pretrained.build
    monkeypatch.setattr(models, "create_model", bn_net)  # the run report rebuilds the model from the registry
    root = tmp_path / "d"
    for split, n in (("train", 9), ("val", 2)):
        for cls, value in (("dark", 40), ("light", 200)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n - (cls == "light" and split == "train")):  # 17 training images
                Image.new("RGB", (16, 16), (value + i,) * 3).save(root / split / cls / f"{i}.png")
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={root}", "data.image_size=16", "data.batch_size=16",
                             "train.epochs=1", f"train.out_dir={tmp_path / 'runs'}", "train.progress=false"])
    assert _records(train(cfg))[-1]["epoch"] == 1


def _mirror_letters(root, n: int):
    """Classes that are mirror images of each other ('b': bowl right of the stem, 'd': left)."""
    from PIL import ImageDraw

    for split, count in (("train", n), ("val", n // 2)):
        for cls in ("b", "d"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                im = Image.new("RGB", (24, 24), (20, 20, 20))
                x, y = 9 + i % 3, 3 + i % 2
                draw = ImageDraw.Draw(im)
                draw.rectangle([x, y, x + 1, y + 16], fill=(230, 230, 230))
                cx = x + 6 if cls == "b" else x - 5
                draw.ellipse([cx - 5, y + 7, cx + 5, y + 16], outline=(230, 230, 230), width=2)
                im.save(root / split / cls / f"{i}.png")


def test_the_stored_accuracy_is_what_the_exported_model_delivers(tmp_path):
    """Flip TTA is reported beside the plain figure (val_accuracy_tta) and never stored or used to pick the best."""
    from toolkit.core.meta import read_meta
    from toolkit.export import export

    _mirror_letters(tmp_path / "d", 24)
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={tmp_path / 'd'}", "data.image_size=24",
                             "data.batch_size=8", "data.augment=false", "model.arch=tutorial_net_bn",
                             "train.epochs=3", "train.eval_tta=true", f"train.out_dir={tmp_path / 'runs'}",
                             "train.progress=false"])
    run = train(cfg)
    recs = _records(run)
    assert all("val_accuracy_tta" in r for r in recs)
    assert any(r["val_accuracy_tta"] != r["val_accuracy"] for r in recs)  # the mirror average tells them apart
    meta = read_meta(run)
    best = max(recs, key=lambda r: r["val_accuracy"])
    assert meta.metrics["val_accuracy"] == best["val_accuracy"] and meta.metrics["epoch"] == best["epoch"]
    onnx_file = export(run, tmp_path / "m.onnx")
    delivered = evaluate_folder(onnx_file, tmp_path / "d" / "val")["accuracy"]
    assert read_meta(onnx_file).metrics["val_accuracy"] == delivered


def test_flip_tta_is_refused_when_a_flip_changes_the_class(caplog):
    with caplog.at_level("WARNING", logger="toolkit"):
        cfg = load_config(None, ["train.eval_tta=true", "data.hflip=false"])
    assert cfg.train.eval_tta is False and "train.eval_tta is turned off" in caplog.text
    assert load_config(None, ["train.eval_tta=true"]).train.eval_tta is True


@pytest.mark.parametrize("cache", ["memory", "stream"])
def test_class_and_file_names_that_are_not_utf8_train_report_evaluate_and_export(tmp_path, cache):
    import os
    import shutil

    from conftest import run_toolkit, two_colours

    data = two_colours(tmp_path / "d", n=8, size=16)
    odd = os.fsdecode(b"caf\xe9")  # a Latin-1 folder name: not UTF-8
    for split in ("train", "val"):
        shutil.move(data / split / "red", data / split / odd)
        first = sorted((data / split / odd).iterdir())[0]
        first.rename(first.with_name(os.fsdecode(b"\xff\xfe.png")))
    run = train(load_config(None, ["data.kind=imagefolder", f"data.root={data}", "data.image_size=16",
                                   "data.batch_size=8", "model.arch=tutorial_net", f"train.out_dir={tmp_path}",
                                   "train.epochs=1", "train.progress=false", f"data.cache={cache}"]))
    _, meta = load_weights(run / "best.safetensors")
    assert meta.class_names == ["blue", odd]
    report = (run / "report" / "report.md").read_text()
    assert "caf\\xe9" in report and (run / "report" / "confusion.png").is_file()
    proc = run_toolkit("evaluate", run, data / "val", env={"PYTHONIOENCODING": "utf-8"})
    assert "caf\\xe9" in proc.stdout
    onnx_file = tmp_path / "m.onnx"
    run_toolkit("export", run, "-o", onnx_file)
    assert "caf\\xe9" in onnx_file.with_suffix(".README.md").read_text()


@pytest.mark.parametrize("message, expected", [
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation",
     "no answer from the other processes within train.collective_timeout=5 s"),
    ("Application timeout caused pair closure", "no answer from the other processes"),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234",
     "lost contact with another process"),
    ("CUDA out of memory", None),  # not a collective's failure: left as it is
])
def test_a_failed_collective_is_one_line(message, expected):
    from toolkit.train.rundir import lost_contact

    cfg = load_config(None, ["train.collective_timeout=5"])
    found = lost_contact(RuntimeError(message), cfg, world=2)
    assert (found is None) if expected is None else expected in str(found)
    assert lost_contact(RuntimeError(message), cfg, world=1) is None  # one process has no peers to lose
