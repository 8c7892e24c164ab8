import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from toolkit import UserError, export, images
from toolkit.checkpoint import build_model
from toolkit.data import Normalize
from toolkit.meta import META_KEY, Meta


@pytest.fixture(scope="module")
def onnx_file(tiny_run, tmp_path_factory):
    return export.export(tiny_run, tmp_path_factory.mktemp("exp") / "tiny.onnx")


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
    px = np.stack([images.load(shapes_dir / "val" / f, 32) for f in files])  # (13, 32, 32, 3)
    with torch.no_grad():
        ref = net(Normalize(meta.mean, meta.std)(torch.from_numpy(px).permute(0, 3, 1, 2))).numpy()
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for b in (1, 13):
        got = sess.run(None, {"input": px[:b].transpose(0, 3, 1, 2).astype(np.float32) / 255})[0]
        np.testing.assert_allclose(got, ref[:b], atol=1e-4, rtol=1e-4)


def test_a_mismatching_graph_is_never_written(tiny_run, tmp_path, monkeypatch):
    real = export.to_onnx

    def broken(module, meta, path, input_dtype="float32"):
        with torch.no_grad():
            module[1].fc3.bias.add_(0.5)  # the written graph now differs from the checked model
        real(module, meta, path, input_dtype)
        with torch.no_grad():
            module[1].fc3.bias.sub_(0.5)

    monkeypatch.setattr(export, "to_onnx", broken)
    out = tmp_path / "bad.onnx"
    with pytest.raises(export.ExportMismatch, match="disagrees with torch.*nothing was written"):
        export.export(tiny_run, out)
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no temporary file left behind either


def test_default_output_and_uint8_input(tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = export.export(tiny_run / "last.safetensors", input_dtype="uint8")
    assert str(out) == f"exported/{tiny_run.name}.onnx"  # named after the run, not the weights file
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    assert sess.run(None, {"input": np.zeros((3, 3, 32, 32), np.uint8)})[0].shape == (3, 10)


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(UserError, match="no weights at"):
        export.export(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="junk.safetensors' is not a readable safetensors file"):
        export.export(tmp_path / "junk.safetensors")
