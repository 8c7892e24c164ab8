"""The base install (`pip install toolkit`, no extras) predicts and evaluates with an ONNX file, without torch.

A fresh venv gets the package from a copy of this source tree and its base dependencies from the
package index (numpy, pillow, onnxruntime, pyyaml, tqdm); the model is exported by the full install.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from toolkit.evaluate import evaluate_folder
from toolkit.export import export
from toolkit.predict import predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_venv(tmp_path_factory):
    """-> the bin/ folder of a venv holding the base install only."""
    tmp = tmp_path_factory.mktemp("base")
    src = tmp / "src"  # a copy: pip builds in the source folder, which must stay clean
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "exported", "build",
                                                             "*.egg-info", "__pycache__", ".pytest_cache", "shared"))
    # This process's pip builds the wheel (with its setuptools, no isolated build environment) and installs it
    # with its dependencies, resolved from the package index, into a venv without pip, not compiling .pyc files:
    # the same packages in the venv for 5.5 CPU-s instead of 13.7 (the venv's own pip, building in isolation).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=300)
    bin_dir = tmp / "venv" / "bin"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel"), str(src)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    installed = subprocess.run([*pip, "--python", str(bin_dir / "python"), "install", "--no-compile",
                                *map(str, (tmp / "wheel").glob("toolkit-*.whl"))], capture_output=True, text=True,
                               timeout=1200)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return bin_dir


def _run(bin_dir, *args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # only the venv's packages
    return subprocess.run([str(bin_dir / "toolkit"), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_predict_and_evaluate_without_torch(base_venv, tiny_run, shapes_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([str(base_venv / "python"), "-c", "import importlib.util as u; print([m for m in "
                            "('torch', 'torchvision', 'accelerate', 'onnx', 'safetensors') if u.find_spec(m)])"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr  # not on disk, not only not imported

    model = export(tiny_run, tmp_path / "m.onnx")  # by the full install
    predict(model, shapes_dir / "val", tmp_path / "full.csv", topk=3)
    base = _run(base_venv, "predict", model, shapes_dir / "val", "-o", tmp_path / "base.csv", "--topk", "3",
                cwd=tmp_path)
    assert base.returncode == 0, base.stderr[-3000:]
    assert (tmp_path / "base.csv").read_text() == (tmp_path / "full.csv").read_text()  # the same rows

    evaluated = _run(base_venv, "evaluate", model, shapes_dir / "val", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["accuracy"] == evaluate_folder(model, shapes_dir / "val")["accuracy"]

    train = _run(base_venv, "train", shapes_dir, cwd=tmp_path)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert train.stderr.strip().splitlines()[-1].endswith("pip install 'toolkit[train]'")
