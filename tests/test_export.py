import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import toolkit.export.release as release
from toolkit import UserError
from toolkit.core import images
from toolkit.core.meta import META_KEY, Meta, read_meta
from toolkit.train.batches import Normalize
from toolkit.train.weights import build_model


def test_file_is_self_describing_with_a_dynamic_batch(onnx_file, tiny_run):
    model = onnx.load(str(onnx_file))
    props = {p.key: p.value for p in model.metadata_props}
    meta = Meta.from_json(props[META_KEY])
    _, trained = build_model(tiny_run)
    assert meta.class_names == trained.class_names and meta.arch == "tutorial_net_bn"
    assert meta.normalize_in_graph is True and meta.input_dtype == "float32"
    assert meta.mean == trained.mean and meta.std == trained.std and meta.image_size == 32
    assert meta.extra["parity"]["top1_agreement"] == 1.0 and meta.extra["opset"] >= 17
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # symbolic, not a fixed batch
    json.loads(props[META_KEY])  # plain JSON


def test_onnx_matches_torch_on_real_images(onnx_file, tiny_run, shapes_dir):
    net, meta = build_model(tiny_run)
    files = images.find_images(shapes_dir / "val")[::7][:13]
    px = np.stack([images.load(shapes_dir / "val" / f, images.Preprocess(32)) for f in files])  # (13, 32, 32, 3)
    with torch.no_grad():
        ref = net(Normalize(meta.mean, meta.std)(torch.from_numpy(px).permute(0, 3, 1, 2))).numpy()
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for b in (1, 13):
        got = sess.run(None, {"input": px[:b].transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]
        np.testing.assert_allclose(got, ref[:b], atol=1e-4, rtol=1e-4)


def test_a_mismatching_graph_is_never_written(tiny_run, tmp_path, monkeypatch):
    real = release.to_onnx

    def broken(module, meta, path, *args):
        with torch.no_grad():
            module[1].fc3.bias.add_(0.5)  # the written graph now differs from the checked model
        real(module, meta, path, *args)
        with torch.no_grad():
            module[1].fc3.bias.sub_(0.5)

    monkeypatch.setattr(release, "to_onnx", broken)
    out = tmp_path / "bad.onnx"
    with pytest.raises(release.ExportMismatch, match="disagrees with torch.*nothing was written"):
        release.export(tiny_run, out)
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no temporary file left behind either


def test_default_output_and_uint8_input(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = release.export(tiny_run / "last.safetensors", input_dtype="uint8")
    assert str(out) == f"exported/{tiny_run.name}.onnx"  # named after the run, not the weights file
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    assert sess.run(None, {"input": np.zeros((3, 3, 32, 32), np.uint8)})[0].shape == (3, 10)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(UserError, match="no weights at"):
        release.export(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="junk.safetensors' is not a readable safetensors file"):
        release.export(tmp_path / "junk.safetensors")


# --- every registered model x (fp32, fp16, int8) ----------------------------------------------

from toolkit.train.models import list_models  # noqa: E402

VARIANTS = ("fp32", "fp16", "int8")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each registered model trained to confidence on an easy two-class folder: {arch: run dir}."""
    from conftest import two_colours
    from toolkit.config import load_config
    from toolkit.train import train

    root = tmp_path_factory.mktemp("models")
    data = two_colours(root / "data", n=24, size=32)
    runs = {}
    for arch in list_models():
        # speedrun_net (every width) scales its logits by 1/9 and its recipe runs at a large rate: at 0.02 it ends with margins
        # of 0.01-0.2 logits, which int8 rounding flips (whether it does then depends on the seed's draws)
        lr = 0.2 if arch.startswith("speedrun_net") else 0.02
        cfg = load_config(None, ["data.kind=imagefolder", f"data.root={data}", "data.batch_size=8", f"name={arch}",
                                 f"model.arch={arch}", "train.epochs=3", f"train.out_dir={root}", f"optim.lr={lr}",
                                 "train.progress=false"])
        runs[arch] = train(cfg)
    return runs, data


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", sorted(list_models()))
def test_every_model_and_variant_exports_with_parity(arch, variant, trained, tmp_path):
    runs, data = trained
    out = release.export(runs[arch], tmp_path / f"{arch}.onnx", variant=variant)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["variant"] == variant and report["opset"] >= 17
    assert report["parity_vs_torch"]["max_logit_diff"] <= report["parity_vs_torch"]["tolerance"]
    if variant != "fp32":
        assert set(report["variant_vs_fp32"]["per_batch"]) == {"1", "7", "64"}
        assert min(report["variant_vs_fp32"]["per_batch"].values()) >= 0.99
    assert report["file"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert report["latency_ms_per_image"]["batch_1"] > 0 and report["validation"]["images"] == 24

    # independently: the file answers at batch 1, 7 and 64 like torch does on real images
    net, meta = build_model(runs[arch])
    prep = images.Preprocess.of(meta)
    px = np.stack([images.load(data / "val" / f, prep) for f in images.find_images(data / "val")])
    px = np.concatenate([px] * 3)[:64]
    with torch.no_grad():
        ref = net(Normalize(meta.mean, meta.std)(torch.from_numpy(px).permute(0, 3, 1, 2))).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for b in (1, 7, 64):
        got = sess.run(None, {"input": px[:b].transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]
        assert got.shape == (b, 2)
        assert (got.argmax(1) == ref[:b].argmax(1)).mean() >= 0.99
        if variant == "fp32":
            np.testing.assert_allclose(got, ref[:b], atol=1e-4, rtol=1e-4)


def test_variants_are_smaller_and_keep_accuracy(trained, tmp_path):
    from toolkit.evaluate import evaluate_folder

    runs, data = trained
    files = {v: release.export(runs["tutorial_net_bn"], tmp_path / f"m.{v}.onnx", variant=v) for v in VARIANTS}
    sizes = {v: f.stat().st_size for v, f in files.items()}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]
    reference = evaluate_folder(runs["tutorial_net_bn"], data / "val")["accuracy"]
    for v, f in files.items():
        assert abs(evaluate_folder(f, data / "val")["accuracy"] - reference) <= 0.01, v


def test_a_variant_below_the_agreement_bar_is_refused(trained, tmp_path):
    runs, _ = trained
    with pytest.raises(release.ExportMismatch, match="agrees with fp32 on only .*nothing was written"):
        release.export(runs["tutorial_net"], tmp_path / "m.onnx", variant="int8", min_agreement=1.01)
    assert not list(tmp_path.iterdir())


def test_independent_runtime_opencv_gives_the_same_top1(onnx_file, shapes_dir):
    cv2 = pytest.importorskip("cv2")  # opencv-python-headless, installed by the dev extra
    files = images.find_images(shapes_dir / "val")
    x = np.stack([images.load(shapes_dir / "val" / f, images.Preprocess(32)) for f in files]).transpose(0, 3, 1, 2)
    x = x.astype(np.float32) / 255
    net = cv2.dnn.readNetFromONNX(str(onnx_file))
    net.setInput(x)
    theirs = net.forward()
    ours = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert theirs.shape == ours.shape == (100, 10)
    assert (theirs.argmax(1) == ours.argmax(1)).all()
    np.testing.assert_allclose(theirs, ours, atol=1e-3)


# --- robustness of the files predict loads --------------------------------------------------

def test_external_data_outside_the_model_folder_is_refused(onnx_file, tmp_path):
    from toolkit.predict.runtime import OnnxClassifier

    model = onnx.load(str(onnx_file))
    init = model.graph.initializer[0]
    (tmp_path / "outside.bin").write_bytes(init.raw_data or b"\x00" * 64)
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    del init.external_data[:]
    init.external_data.add(key="location", value="../outside.bin")
    (tmp_path / "models").mkdir()
    onnx.save(model, str(tmp_path / "models" / "evil.onnx"))
    with pytest.raises(UserError, match="outside its folder; refusing to load it"):
        OnnxClassifier(tmp_path / "models" / "evil.onnx")


def test_unknown_meta_schema_in_an_onnx_file(onnx_file, tmp_path):
    from toolkit.predict.runtime import OnnxClassifier

    model = onnx.load(str(onnx_file))
    meta = json.loads(model.metadata_props[0].value)
    meta["schema"] = 7
    model.metadata_props[0].value = json.dumps(meta)
    onnx.save(model, str(tmp_path / "future.onnx"))
    with pytest.raises(UserError, match="metadata schema version 7"):
        OnnxClassifier(tmp_path / "future.onnx")


def test_a_model_exported_elsewhere_works_with_stated_classes_and_preprocessing(onnx_file, tiny_run, shapes_dir,
                                                                               tmp_path):
    """No toolkit metadata, normalisation outside the graph: predict applies what the user passes."""
    from toolkit.evaluate import evaluate_folder
    from toolkit.predict.runtime import OnnxClassifier

    net, meta = build_model(tiny_run)
    bare = tmp_path / "bare.onnx"
    release.to_onnx(net.eval(), meta, bare)  # the network alone: no Normalize, no Meta
    with pytest.raises(UserError, match="no toolkit metadata; pass --classes"):
        OnnxClassifier(bare)
    fallback = {"classes": meta.class_names, "size": None, "mean": meta.mean, "std": meta.std, "resize": "center_crop"}
    clf = OnnxClassifier(bare, fallback=fallback)
    assert clf.meta.image_size == 32 and not clf.meta.normalize_in_graph
    ours = evaluate_folder(onnx_file, shapes_dir / "val")
    theirs = evaluate_folder(bare, shapes_dir / "val", fallback=fallback)
    assert theirs["confusion"] == ours["confusion"]
    with pytest.raises(UserError, match="names 3 classes but the model has 10 outputs"):
        OnnxClassifier(bare, fallback={**fallback, "classes": ["a", "b", "c"]})


def test_a_foreign_model_with_another_layout_is_refused(tmp_path):
    from onnx import TensorProto, helper

    from toolkit.predict.runtime import OnnxClassifier

    weight = helper.make_tensor("w", TensorProto.FLOAT, [32 * 32 * 3, 3], np.zeros(32 * 32 * 3 * 3, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])], "nhwc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32, 32, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "nhwc.onnx"))
    fallback = {"classes": ["a", "b", "c"], "size": None, "mean": None, "std": None, "resize": "center_crop"}
    with pytest.raises(UserError, match=r"input has shape \['n', 32, 32, 3\]; predict feeds \(batch, 3, height"):
        OnnxClassifier(tmp_path / "nhwc.onnx", fallback=fallback)


@pytest.mark.parametrize("kind", ["shapes", "cifar10", "imagefolder"])
def test_export_never_generates_or_downloads_the_runs_data(tiny_run, tmp_path, monkeypatch, kind):
    """A run whose data is not on disk (exported from another folder, say) exports with random check pixels."""
    import shutil

    import torchvision
    import yaml

    from toolkit.train.datasets import shapes

    calls = []

    def refuse(*args, **kwargs):  # recorded: the loaders turn exceptions into warnings
        calls.append(args)
        raise AssertionError("export generated or downloaded data")

    monkeypatch.setattr(shapes, "generate", refuse)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", refuse)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("state"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    missing = tmp_path / "elsewhere" / "data"
    cfg["data"].update(kind=kind, root=str(missing), download=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = release.export(run, tmp_path / "m.onnx")
    assert json.loads(out.with_suffix(".json").read_text())["validation"]["source"] == "random pixels"
    assert not calls and not (tmp_path / "elsewhere").exists()  # nothing generated, downloaded or cached there


def test_export_checks_on_the_runs_data_when_it_is_on_disk(tiny_run, shapes_dir, tmp_path):
    out = release.export(tiny_run, tmp_path / "m.onnx")
    validation = json.loads(out.with_suffix(".json").read_text())["validation"]
    assert validation["source"] == f"shapes data at {shapes_dir}" and validation["images"] == 100
    assert validation["torch_accuracy"] == validation["onnx_accuracy"]


def _outlier_checkpoint(path, data_dir, factor: float):
    """tutorial_net weights whose conv1 outputs are `factor` times larger and conv2 inputs `factor` times
    smaller: the same fp32 function (ReLU and max-pool commute with a positive scale), activations ~factor."""
    from toolkit.core.meta import Meta
    from toolkit.train.models import create_model
    from toolkit.train.weights import save_weights

    torch.manual_seed(0)
    net = create_model("tutorial_net", 2, 32)
    with torch.no_grad():
        net.conv1.weight *= factor
        net.conv1.bias *= factor
        net.conv2.weight /= factor
    meta = Meta(arch="tutorial_net", class_names=["blue", "red"], image_size=32, resize="center_crop",
                mean=[0.5] * 3, std=[0.25] * 3)
    save_weights(net, meta, path)
    return path


@pytest.mark.parametrize("factor", [1.0, 1e5])
def test_fp16_is_verified_with_fp16_semantics(tmp_path, factor):
    """Activations beyond 65504 pass onnxruntime's CPU check (it computes fp16 ops in fp32) but are
    inf in real fp16: the nodes that touch them stay fp32, so the file is finite in fp16 arithmetic."""
    import warnings

    import onnx
    from onnx.reference import ReferenceEvaluator

    from conftest import two_colours

    data = two_colours(tmp_path / "data", n=8, size=32)
    ckpt = _outlier_checkpoint(tmp_path / "w.safetensors", data, factor)
    out = release.export(ckpt, tmp_path / "m.onnx", data_dir=str(data / "val"), variant="fp16", min_agreement=0.0)
    verified = json.loads(out.with_suffix(".json").read_text())["variant_vs_fp32"]["verified_by"]
    assert verified["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert ("range check" in verified["method"]) == (verified["provider"] == "CPUExecutionProvider")
    assert (verified["max_abs_value"] > 65504) == (factor > 1) and bool(verified["nodes_kept_fp32"]) == (factor > 1)
    assert read_meta(out).extra["verified_by"]["provider"] == verified["provider"]
    px = np.stack([images.load(data / "val" / f, images.Preprocess(32)) for f in images.find_images(data / "val")])
    x = px.transpose(0, 3, 1, 2).astype(np.float32) / 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy reports an overflow itself
        fp16 = ReferenceEvaluator(onnx.load(str(out))).run(None, {"input": x})[0]  # every op in its declared dtype
    assert np.isfinite(fp16).all()
    net, meta = build_model(ckpt)
    with torch.no_grad():
        ref = net(Normalize(meta.mean, meta.std)(torch.from_numpy(px).permute(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(fp16, ref, atol=0.02 * max(1.0, float(np.abs(ref).max())))
