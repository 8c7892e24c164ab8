"""Several processes as one job (2 gloo processes on the CPU, started by accelerate launch): 2 processes with
batch B/2 reach 1 process's weights with batch B; a fault on one rank (an exception, a non-finite loss, a
stuck process) is handled by all; workers die with their launcher; processes that did not join are refused.

Faults are injected by tests/faults.py; the jobs are started by tests/jobs.py.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from jobs import LAUNCHER, launch, newest_state, ok, train_args

pytestmark = pytest.mark.slow


def test_exception_on_one_rank_ends_the_job_quickly_naming_the_rank(shapes_dir, tmp_path):
    proc = launch(train_args(shapes_dir, tmp_path, "run"), 2, fault={"FAULT": "raise", "FAULT_STEP": 2,
                                                                    "FAULT_RANK": 1})
    assert proc.returncode != 0
    assert proc.seconds < 60  # the launcher tears the job down; no 30-minute collective timeout
    assert "[rank1]" in proc.stderr and "injected failure at step 2" in proc.stderr
    assert "rank      : 1" in proc.stderr  # the launcher's summary names the failing rank as root cause


def test_a_non_finite_loss_on_one_rank_is_skipped_by_all(shapes_dir, tmp_path):
    proc = ok(launch(train_args(shapes_dir, tmp_path, "run"), 2, fault={"FAULT": "nan", "FAULT_STEP": 5,
                                                                        "FAULT_RANK": 1}))
    assert "non-finite loss at step 2: step skipped" in proc.stderr
    assert newest_state(tmp_path / "run")["nonfinite_skipped"] == 1
    weights = load_file(tmp_path / "run" / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_two_processes_equal_one_process_with_the_whole_batch(shapes_dir, tmp_path):
    """DDP correctness: 2 x batch B/2 reaches 1 x batch B's weights (no BatchNorm); each val image counted once.

    Trained in float64 (tests/float64.py): in float32 the two runs' logits differ by rounding (~3e-8), and
    a ReLU input inside that band of zero sends one sample's gradient differently in one run only (seen
    at seed 0: 1.2e-3 in the step's gradient, 1.5e-4 in the weights two epochs later), which says
    nothing about DDP. In float64 the runs agree to ~1e-16, so the saved fp32 weights agree to an ulp.
    """
    val = tmp_path / "data"
    (val / "val").mkdir(parents=True)
    os.symlink(shapes_dir / "train", val / "train")
    for cls in (shapes_dir / "val").iterdir():  # an odd-sized validation set: 99 images
        (val / "val" / cls.name).mkdir()
        for f in sorted(cls.iterdir())[: 9 if cls.name == "star" else 10]:
            os.symlink(f, val / "val" / cls.name / f.name)
    common = [f"data.root={val}", f"train.out_dir={tmp_path}", "model.arch=tutorial_net", "train.epochs=2",
              "train.progress=false", "optim.lr=0.05", "data.kind=imagefolder"]
    cfg = str(ROOT / "configs/quickstart.yaml")
    one = ok(launch(["train", cfg, *common, "name=one", "data.batch_size=16"], 1, float64=True))
    two = ok(launch(["train", cfg, *common, "name=two", "data.batch_size=8"], 2, float64=True))
    a, b = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "two" / "last.safetensors")
    assert a.keys() == b.keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-7, rtol=1e-6)  # fp32 rounding of float64 weights
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # one line per evaluation: only the main process writes
    assert [json.loads(line)["val_count"] for line in lines] == [99, 99]
    assert "2 process(es)" in two.stderr and "1 process(es)" in one.stderr
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def test_processes_that_did_not_join_are_refused(shapes_dir, tmp_path):
    env_backup = os.environ.pop("ACCELERATE_USE_CPU", None)
    try:
        cmd = [*LAUNCHER, "-m", "toolkit", *train_args(shapes_dir, tmp_path, "run")]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, start_new_session=True,
                              env={k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"})
    finally:
        if env_backup is not None:
            os.environ["ACCELERATE_USE_CPU"] = env_backup
    assert proc.returncode != 0
    assert "did not join one job" in proc.stderr and "ACCELERATE_USE_CPU=true" in proc.stderr
    assert not (tmp_path / "run").exists()


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_workers_die_with_their_launcher_and_a_restart_resumes(shapes_dir, tmp_path):
    args = train_args(shapes_dir, tmp_path, "run", "train.epochs=40")
    cmd = [*LAUNCHER, "--num_processes", "2", "-m", "toolkit", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    launcher = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    run, deadline = tmp_path / "run", time.monotonic() + 180
    while not list(run.glob("state/step-*/done.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = _children(launcher.pid)
    assert len(workers) == 2, "the two training processes did not start"
    launcher.kill()  # the launcher alone, as an OOM killer or `kill -9` would
    launcher.wait()
    deadline = time.monotonic() + 15
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "workers kept training without their launcher"
    resumed = ok(launch(train_args(shapes_dir, tmp_path, "run", "train.epochs=3", "train.resume=auto"), 2))
    assert "resumed from" in resumed.stderr
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(set(epochs)) and epochs[-1] == 3


def test_a_stuck_process_ends_the_job_within_the_collective_timeout(shapes_dir, tmp_path):
    proc = launch(train_args(shapes_dir, tmp_path, "run", "train.collective_timeout=5"), 2,
                  fault={"FAULT": "stop", "FAULT_STEP": 3, "FAULT_RANK": 1}, timeout=200)
    assert proc.returncode != 0
    assert proc.seconds < 120  # 5 s of silence, then the launcher tears the job down; not 30 minutes
    assert "[rank 0] error: no answer from the other processes within train.collective_timeout=5 s" in proc.stderr, \
        proc.stderr[-3000:]
