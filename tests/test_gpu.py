"""Checks that need a CUDA GPU (skipped elsewhere): mixed precision, loss scaling, SyncBatchNorm."""

import json

import pytest
import torch

from conftest import ROOT, run_toolkit
from toolkit.train.state import list_states, load_state
from toolkit.train.weights import load_weights

pytestmark = pytest.mark.gpu


def _train(tmp_path, shapes_dir, name, env, *extra):
    args = ["train", ROOT / "configs/quickstart.yaml", f"data.root={shapes_dir}", f"train.out_dir={tmp_path}",
            f"name={name}", "train.epochs=2", "train.progress=false", *extra]
    return run_toolkit(*args, env=env, cwd=ROOT)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_gpu(precision, shapes_dir, tmp_path):
    proc = _train(tmp_path, shapes_dir, precision, {"ACCELERATE_MIXED_PRECISION": precision})
    assert f"on cuda, precision {precision}" in proc.stderr
    weights, _ = load_weights(tmp_path / precision / "last.safetensors")
    assert all(v.dtype in (torch.float32, torch.int64) for v in weights.values())
    _, files = load_state(list_states(tmp_path / precision / "state")[-1])
    assert ("scaler.pt" in files) == (precision == "fp16")  # the loss scaler is part of the resume state
    from toolkit.export import export

    out = export(tmp_path / precision, tmp_path / f"{precision}.onnx")  # mixed-precision runs export as fp32
    assert json.loads(out.with_suffix(".json").read_text())["parity_vs_torch"]["top1_agreement"] == 1.0


def test_fp16_resume_restores_the_loss_scaler(shapes_dir, tmp_path):
    env = {"ACCELERATE_MIXED_PRECISION": "fp16"}
    _train(tmp_path, shapes_dir, "run", env, "train.checkpoint_every=3")
    state = list_states(tmp_path / "run" / "state")[-1]
    assert "scaler.pt" in load_state(state)[1]
    proc = _train(tmp_path, shapes_dir, "run", env, "train.epochs=3", f"train.resume={state}")
    assert f"resumed from {state}" in proc.stderr
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_sync_batchnorm_with_two_gpus(shapes_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(ROOT / "launch/multi_gpu.yaml"),
           "--num_processes", "2", "-m", "toolkit", "train", str(ROOT / "configs/quickstart.yaml"),
           f"data.root={shapes_dir}", f"train.out_dir={tmp_path}", "name=sync", "train.epochs=1", "model.sync_bn=true",
           "data.batch_size=16", "train.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "needs GPUs" not in proc.stderr and "BatchNorm layers share batch statistics across the 2" in proc.stderr
    # SyncBatchNorm over 2 x 16 images normalises like BatchNorm over one batch of 32: the same weights
    _train(tmp_path, shapes_dir, "whole", {}, "train.epochs=1", "data.batch_size=32")
    a, _ = load_weights(tmp_path / "sync" / "last.safetensors")
    b, _ = load_weights(tmp_path / "whole" / "last.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-3, rtol=2e-3)
