"""The Meta record is data from a file: every field is checked where it enters (ONNX metadata, safetensors
header, what a user states about a foreign model), through every reader: predict, evaluate, inspect, export."""

import json
import struct

import numpy as np
import onnx
import pytest

from conftest import run_toolkit
from toolkit import UserError
from toolkit.core.meta import META_KEY, Meta, read_meta
from toolkit.export import export


GOOD = Meta("tutorial_net", ["a", "b"], 32, "center_crop", [0.5] * 3, [0.25] * 3)


@pytest.mark.parametrize("field, value, message", [
    ("image_size", 100_000, "'image_size' = 100000; it must be a whole number of pixels from 1 to 4096"),
    ("image_size", 0, "'image_size'"),
    ("image_size", 32.5, "'image_size'"),
    ("image_size", True, "'image_size'"),
    ("std", [0, 0, 0], "'std' = [0, 0, 0]; it must be three finite positive numbers"),
    ("std", [1, 1], "'std'"),
    ("mean", [0.5, "x", 0.5], "'mean'"),
    ("class_names", [], "'class_names'"),
    ("class_names", ["a", "a"], "distinct"),
    ("class_names", ["a", 3], "'class_names'"),
    ("class_names", "ab", "'class_names'"),
    ("resize", "stretch", "'resize'"),
    ("interpolation", "lanczos", "'interpolation' = 'lanczos'; it must be bilinear or bicubic"),
    ("interpolation", None, "'interpolation'"),
    ("input_dtype", "float64", "'input_dtype'"),
    ("channels", 4, "'channels'"),
    ("metrics", [], "'metrics'"),
    ("arch", "x" * 100_000, "'arch' = 'xxxx"),
])
def test_every_field_is_checked(field, value, message):
    data = json.loads(GOOD.to_json())
    data[field] = value
    with pytest.raises(UserError, match=message.replace("[", r"\[")) as e:
        Meta.from_json(json.dumps(data), "'m.onnx'")
    assert str(e.value).startswith("'m.onnx' has metadata field") and len(str(e.value)) < 250


def _with_meta(src, dst, drop=(), **changes):
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    meta = json.loads(props[META_KEY])
    meta.update(changes)
    for key in drop:
        del meta[key]
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {META_KEY: json.dumps(meta)})
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"image_size": 100_000}, "'image_size' = 100000"),
    ({"class_names": ["a", "b"]}, "names 2 classes in its metadata but its graph has 10 outputs"),
    ({"std": [0, 0, 0]}, "'std' = [0, 0, 0]"),
])
def test_a_hostile_onnx_file_is_refused_by_every_reader(onnx_file, shapes_dir, tmp_path, changes, message):
    bad = _with_meta(onnx_file, tmp_path / "bad.onnx", **changes)
    image = next((shapes_dir / "val" / "star").iterdir())
    for args in (["predict", bad, shapes_dir / "val", "-o", tmp_path / "p.csv"],
                 ["evaluate", bad, shapes_dir / "val"],
                 ["inspect", image, "--model", bad]):
        proc = run_toolkit(*args, check=False, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args[0], proc.stderr[-1000:])
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "p.csv").exists()


def test_model_files_written_before_the_interpolation_field_read_as_bilinear(onnx_file, tiny_run, shapes_dir,
                                                                               tmp_path):
    """The filter every older file was decoded with; its predictions stay what they were."""
    old = _with_meta(onnx_file, tmp_path / "old.onnx", drop=["interpolation"])
    assert "interpolation" not in onnx.load(str(old)).metadata_props[0].value
    assert read_meta(old).interpolation == "bilinear" == read_meta(onnx_file).interpolation
    old_weights = _with_header_meta(tiny_run / "best.safetensors", tmp_path / "old.safetensors", drop=["interpolation"])
    assert read_meta(old_weights).interpolation == "bilinear"
    from toolkit.evaluate import evaluate_folder

    assert evaluate_folder(old, shapes_dir / "val", workers=1) == {
        **evaluate_folder(onnx_file, shapes_dir / "val", workers=1), "model": str(old)}


def _with_header_meta(src, dst, drop=(), **changes):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"][META_KEY])
    meta.update(changes)
    for key in drop:
        del meta[key]
    header["__metadata__"][META_KEY] = json.dumps(meta)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    return dst


def test_a_hostile_safetensors_header_is_refused_by_export_and_evaluate(tiny_run, shapes_dir, tmp_path):
    bad = _with_header_meta(tiny_run / "best.safetensors", tmp_path / "bad.safetensors", std=[0, 0, 0])
    with pytest.raises(UserError, match=r"'std' = \[0, 0, 0\]"):
        export(bad, tmp_path / "m.onnx")
    with pytest.raises(UserError, match=r"'std' = \[0, 0, 0\]"):
        read_meta(bad)
    proc = run_toolkit("evaluate", bad, shapes_dir / "val", check=False)
    assert proc.returncode == 2 and "'std' = [0, 0, 0]" in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_stated_preprocessing_of_a_foreign_model_is_checked(onnx_file, shapes_dir, tmp_path):
    model = onnx.load(str(onnx_file))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    classes = ",".join(f"c{i}" for i in range(10))
    proc = run_toolkit("predict", tmp_path / "foreign.onnx", shapes_dir / "val", "-o", tmp_path / "p.csv",
                       "--classes", classes, "--mean", "0,0,0", "--std", "0,1,1", "--size", "32", check=False)
    assert proc.returncode == 2 and "'std' = [0.0, 1.0, 1.0]" in proc.stderr, proc.stderr[-800:]
    proc = run_toolkit("predict", tmp_path / "foreign.onnx", shapes_dir / "val", "-o", tmp_path / "p.csv",
                       "--classes", classes, "--size", "100000", check=False)
    assert proc.returncode == 2 and "'image_size' = 100000" in proc.stderr


class _NaNSession:
    """An onnxruntime session whose outputs carry one NaN."""

    def __init__(self, sess):
        self.sess = sess

    def get_inputs(self):
        return self.sess.get_inputs()

    def run(self, names, feeds):
        out = self.sess.run(names, feeds)
        out[0] = out[0].copy()
        out[0].flat[-1] = np.nan
        return out


def test_nan_anywhere_in_the_parity_check_is_a_failure(tiny_run, tmp_path, monkeypatch):
    import toolkit.export.onnx as onnx_export

    real = onnx_export.variants.session
    monkeypatch.setattr(onnx_export.variants, "session", lambda path, threads=0: _NaNSession(real(path, threads)))
    with pytest.raises(onnx_export.ExportMismatch, match="the ONNX model gives NaN or Inf logits"):
        export(tiny_run, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
