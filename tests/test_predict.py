import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from toolkit import UserError
from toolkit.evaluate import evaluate_folder
from toolkit.export import export
from toolkit.predict import OnnxClassifier, predict

from conftest import run_toolkit


@pytest.fixture(scope="module")
def onnx_file(tiny_run, tmp_path_factory):
    return export(tiny_run, tmp_path_factory.mktemp("exp") / "tiny.onnx")


@pytest.fixture
def mixed_dir(shapes_dir, tmp_path):
    """Good images in nested folders plus a corrupt PNG, a text file named .jpg and a non-image file."""
    root = tmp_path / "in"
    shutil.copytree(shapes_dir / "val" / "star", root / "stars")
    shutil.copytree(shapes_dir / "val" / "ring", root / "more" / "rings")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (root / "notes.jpg").write_text("not really a picture")
    (root / "readme.txt").write_text("ignored: not image-looking")
    return root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_one_row_per_file_and_errors_are_rows(onnx_file, mixed_dir, tmp_path):
    out = tmp_path / "p.csv"
    summary = predict(onnx_file, mixed_dir, out, batch_size=4, topk=3)
    rows = _rows(out)
    assert list(rows[0])[:4] == ["path", "label", "score", "error"]
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert len(rows) == 22 and len({r["path"] for r in rows}) == 22  # 20 images + 2 bad, txt ignored
    bad = {r["path"]: r for r in rows if r["error"]}
    assert set(bad) == {"broken.png", "notes.jpg"}
    assert bad["notes.jpg"]["error"] == "not an image" and bad["notes.jpg"]["label"] == ""
    assert "corrupt" in bad["broken.png"]["error"] or "not an image" in bad["broken.png"]["error"]
    assert summary["ok"] == 20 and summary["failed"] == 2
    for r in rows:
        if not r["error"]:
            scores = [float(r[f"top{k}_score"]) for k in (1, 2, 3)]
            assert r["label"] == r["top1_label"] and float(r["score"]) == scores[0]
            assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0 + 1e-6


def test_labels_agree_with_the_model(onnx_file, shapes_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    predict(onnx_file, shapes_dir / "val", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    clf = OnnxClassifier(onnx_file)
    correct = sum(r["label"] == r["path"].split("/")[0] for r in rows)
    result = evaluate_folder(onnx_file, shapes_dir / "val")
    assert len(rows) == result["n"] == 100
    assert correct == result["correct"]
    assert all(r["label"] in clf.meta.class_names for r in rows)


def test_cli_exits_zero_with_failed_files_and_counts_them(onnx_file, mixed_dir, tmp_path):
    proc = run_toolkit("predict", onnx_file, mixed_dir, "-o", tmp_path / "p.csv")
    assert proc.stdout.strip().splitlines()[-1].startswith("20 ok, 2 failed")


def test_predict_never_imports_torch(onnx_file, mixed_dir, shapes_dir, tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from toolkit.cli import main\n"
        f"main(['predict', {str(onnx_file)!r}, {str(mixed_dir)!r}, '-o', {str(tmp_path / 'p.csv')!r}])\n"
        f"main(['evaluate', {str(onnx_file)!r}, {str(shapes_dir / 'val')!r}])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(_rows(tmp_path / "p.csv")) == 22


def test_bad_model_and_folder_are_one_line_errors(onnx_file, tmp_path):
    (tmp_path / "fake.onnx").write_bytes(b"definitely not onnx")
    with pytest.raises(UserError, match="fake.onnx' is not a loadable ONNX model"):
        predict(tmp_path / "fake.onnx", tmp_path)
    with pytest.raises(UserError, match="input folder '.*nowhere' does not exist"):
        predict(onnx_file, tmp_path / "nowhere")
    proc = run_toolkit("predict", tmp_path / "fake.onnx", tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "Traceback" not in proc.stderr
