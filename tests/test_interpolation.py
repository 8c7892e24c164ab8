"""The resize filter (data.interpolation -> Meta.interpolation) travels train -> weights -> ONNX -> predict and
evaluate: a bicubic model is decoded bicubic everywhere, checked against PIL itself."""

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from toolkit.config import load_config
from toolkit.core import images
from toolkit.core.meta import INTERPOLATIONS, read_meta
from toolkit.evaluate import evaluate_folder
from toolkit.export import export
from toolkit.predict import predict, table
from toolkit.predict.runtime import OnnxClassifier
from toolkit.train import train


def test_every_filter_a_model_file_may_name_is_one_pil_applies():
    assert set(images.FILTERS) == set(INTERPOLATIONS)


@pytest.fixture(scope="module")
def bicubic_model(shapes_dir, tmp_path_factory):
    """A run trained with data.interpolation=bicubic at 24 px (the 32 px shapes are resized), exported."""
    out = tmp_path_factory.mktemp("bicubic")
    cfg = load_config(None, ["data.kind=imagefolder", f"data.root={shapes_dir}", "data.image_size=24",
                             "data.interpolation=bicubic", "model.arch=tutorial_net_bn", "train.epochs=1",
                             "data.batch_size=16", "train.progress=false", f"train.out_dir={out}"])
    run = train(cfg)
    return run, export(run, out / "bicubic.onnx")


def _noise_images(folder, n: int = 6):
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):  # not square, not 24 px: both the crop and the filter matter
        Image.fromarray(rng.integers(0, 256, (30 + i, 41, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return sorted(p.name for p in folder.iterdir())


def _pil(path, filt) -> np.ndarray:
    with Image.open(path) as img:
        w, h = img.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return np.asarray(img.convert("RGB").resize((24, 24), filt, box=box))


def test_a_bicubic_model_is_decoded_bicubic_by_export_and_predict(bicubic_model, tmp_path):
    run, model = bicubic_model
    assert read_meta(run / "best.safetensors").interpolation == "bicubic"
    assert read_meta(model).interpolation == "bicubic"
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert props["interpolation"] == "bicubic"  # the flat key other tools read
    sidecar = json.loads(model.with_suffix(".config.json").read_text())
    assert sidecar["pretrained_cfg"]["interpolation"] == "bicubic"  # timm's vocabulary
    assert "bicubic filter" in model.with_suffix(".README.md").read_text()

    names = _noise_images(tmp_path / "photos")
    predict(model, tmp_path / "photos", tmp_path / "p.jsonl", topk=4, workers=1)
    rows = {r["path"]: r for r in table.read_rows(tmp_path / "p.jsonl")}
    clf = OnnxClassifier(model)
    expected = {}
    for name, filt in (("bicubic", Image.Resampling.BICUBIC), ("bilinear", Image.Resampling.BILINEAR)):
        px = np.stack([_pil(tmp_path / "photos" / n, filt) for n in names])
        expected[name] = [round(float(p), 6) for p in np.sort(clf.probabilities(px), 1)[:, ::-1][:, :4].ravel()]
    got = [rows[n][f"top{k}_score"] for n in names for k in range(1, 5)]
    assert expected["bicubic"] != expected["bilinear"]  # the filter shows in the scores: the check can fail
    assert got == expected["bicubic"]


def test_training_and_evaluate_decode_with_the_same_filter(bicubic_model, shapes_dir):
    """The accuracy training stored (its validation decoded bicubic) is what evaluate finds for the file."""
    run, model = bicubic_model
    stored = read_meta(run / "best.safetensors").metrics
    result = evaluate_folder(model, shapes_dir / "val", workers=1)
    assert (result["accuracy"], result["n"]) == (stored["val_accuracy"], stored["val_count"])
