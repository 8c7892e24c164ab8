"""ONNX classifiers exported elsewhere: output kinds read from the graph (or stated), fixed batch
sizes, runtime errors as one line, folders without images; through predict and evaluate."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import run_toolkit
from toolkit import UserError
from toolkit.evaluate import evaluate_folder
from toolkit.predict import predict, table

COLOURS = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}
FB = {"classes": list(COLOURS), "size": None, "mean": None, "std": None, "resize": "center_crop"}  # as --classes gives


def _model(path, last: str | None = None, batch="N", reshape_to_one: bool = False):
    """logits = 10 x mean(R, G, B) of a 16 x 16 image, then `last` (Softmax, LogSoftmax, Sigmoid) if given."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    inits = [numpy_helper.from_array(np.eye(3, dtype=np.float32) * 10, "W"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([1, 3], np.int64), "one_row")]
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0)]
    if reshape_to_one:  # a graph that only runs at batch 1 although its batch axis is not fixed
        nodes.append(helper.make_node("Reshape", ["m", "one_row"], ["m1"]))
    nodes.append(helper.make_node("MatMul", ["m1" if reshape_to_one else "m", "W"], ["z" if last else "y"]))
    if last:
        nodes.append(helper.make_node(last, ["z"], ["y"], **({"axis": 1} if last != "Sigmoid" else {})))
    m = helper.make_model(helper.make_graph(nodes, "probe", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for name, c in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), tuple(v - 10 * i for v in c)).save(root / name / f"{i}.png")
    return root


def _expected(kind: str, root) -> dict:
    """The model's own output for each file, as the probability predict must report."""
    out = {}
    for p in sorted(root.rglob("*.png")):
        z = np.asarray(Image.open(p), np.float32).mean((0, 1)) / 255 * 10
        prob = np.exp(z) / np.exp(z).sum()
        out[p.relative_to(root).as_posix()] = {"Softmax": prob, "LogSoftmax": prob, "Sigmoid": 1 / (1 + np.exp(-z)),
                                               None: prob}[kind]
    return out


@pytest.mark.parametrize("last, kind", [(None, "logits"), ("Softmax", "probabilities"),
                                        ("LogSoftmax", "log-probabilities"), ("Sigmoid", "probabilities")])
def test_output_kind_is_read_from_the_graph(tmp_path, photos, last, kind):
    model = _model(tmp_path / "m.onnx", last)
    summary = predict(model, photos, tmp_path / "p.csv", topk=3, workers=1, fallback=FB)
    assert summary["ok"] == 6
    want = _expected(last, photos)
    for row in table.read_rows(tmp_path / "p.csv"):
        p = want[row["path"]]
        assert row["top1_label"] == list(COLOURS)[int(p.argmax())]
        assert float(row["top1_score"]) == pytest.approx(float(p.max()), abs=2e-6)  # never a second softmax
        assert float(row["top2_score"]) == pytest.approx(float(np.sort(p)[-2]), abs=2e-6)
    run = json.loads((tmp_path / "p.csv.run.json").read_text())
    assert run["outputs"] == kind


@pytest.mark.parametrize("stated", ["logits", "probabilities", "log-probabilities"])
def test_stated_output_kind_wins(tmp_path, photos, stated):
    model = _model(tmp_path / "m.onnx", "Softmax")  # outputs probabilities p
    predict(model, photos, tmp_path / "p.csv", workers=1, fallback=FB, outputs=stated)
    p = _expected("Softmax", photos)
    for row in table.read_rows(tmp_path / "p.csv"):
        q = p[row["path"]]
        q = {"probabilities": q, "log-probabilities": np.exp(q), "logits": np.exp(q) / np.exp(q).sum()}[stated]
        assert float(row["score"]) == pytest.approx(float(q.max()), abs=2e-6)


@pytest.mark.parametrize("batch", [1, 4])
def test_a_fixed_batch_size_is_used_by_predict_and_evaluate(tmp_path, photos, batch):
    model = _model(tmp_path / "m.onnx", batch=batch)
    summary = predict(model, photos, tmp_path / "p.csv", batch_size=128, workers=2, fallback=FB)
    assert summary["ok"] == 6 and summary["failed"] == 0  # 6 images: pieces of 4 padded, or one at a time
    want = _expected(None, photos)
    for row in table.read_rows(tmp_path / "p.csv"):
        assert float(row["score"]) == pytest.approx(float(want[row["path"]].max()), abs=2e-6)
    (photos / "__MACOSX" / "red").mkdir(parents=True)  # no image file in it: not a class the model must know
    (photos / "__MACOSX" / "red" / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    (photos / "emptied").mkdir()
    result = evaluate_folder(model, photos, batch_size=64, workers=1, fallback=FB)
    assert result["accuracy"] == 1.0 and result["n"] == 6


def test_a_runtime_shape_error_is_one_line_and_leaves_nothing_behind(tmp_path, photos):
    model = _model(tmp_path / "m.onnx", reshape_to_one=True)
    proc = run_toolkit("predict", model, photos, "-o", tmp_path / "p.csv", "--classes", "red,green,blue",
                       "--workers", "1", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: '") and "failed on an input of shape [6, 3, 16, 16]" \
        in proc.stderr
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "p.csv.run.json").exists()  # rerun needs no --overwrite
    with pytest.raises(UserError, match="failed on an input of shape"):
        evaluate_folder(model, photos, workers=1, fallback=FB)


def test_a_folder_without_images_is_an_error_and_skipped_files_are_counted(tmp_path, photos):
    model = _model(tmp_path / "m.onnx")
    empty = tmp_path / "docs"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    (empty / "b.txt").write_text("x")
    with pytest.raises(UserError, match=r"no image files under .*skipped 2 file\(s\): \.txt 2"):
        predict(model, empty, tmp_path / "q.csv", workers=1, fallback=FB)
    assert not (tmp_path / "q.csv").exists()
    (photos / "red" / "notes.md").write_text("x")
    (photos / "frame.ppm").write_bytes(b"")  # a listed format: it gets a row (an error row here)
    summary = predict(model, photos, tmp_path / "p.csv", workers=1, fallback=FB)
    assert summary["ok"] == 6 and summary["errors"] == {"empty file": 1} and summary["skipped"] == {".md": 1}
    proc = run_toolkit("evaluate", model, empty, "--classes", "red,green,blue", check=False)
    assert proc.returncode == 2 and "no image files" in proc.stderr
