"""Exact resume after a kill or a stop signal (SIGTERM, SLURM's time limit), with real processes (1 and 2 gloo
processes): a resumed run must end with weights equal tensor for tensor to a run that was never interrupted.

Faults are injected by tests/faults.py (a test-only entry point around toolkit's command line); the jobs are
started by tests/jobs.py. Faults that end a job and what several processes agree on: tests/test_processes.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from jobs import assert_same_weights, launch, newest_state, ok, train_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory):
    """Uninterrupted runs with 1 and 2 processes: {1: run dir, 2: run dir}."""
    out = tmp_path_factory.mktemp("ref")
    return {n: Path(ok(launch(train_args(shapes_dir, out, f"ref{n}"), n)).stdout.strip().splitlines()[-1])
            for n in (1, 2)}


@pytest.mark.parametrize("procs, kill_step", [(1, 17), (2, 10)])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(procs, kill_step, reference, shapes_dir, tmp_path):
    args = train_args(shapes_dir, tmp_path, "run")
    killed = launch(args, procs, fault={"FAULT": "kill", "FAULT_STEP": kill_step})
    assert killed.returncode != 0
    run = tmp_path / "run"
    assert not (run / "report").exists()  # it really died before the end
    state = newest_state(run)
    steps_per_epoch = {1: 12, 2: 6}[procs]
    assert state["epoch"] >= 1 and 0 < state["batch"], state  # in the middle of an epoch after the first
    assert state["step"] < kill_step and state["step"] // steps_per_epoch == kill_step // steps_per_epoch

    resumed = ok(launch(args + ["train.resume=auto"], procs))
    assert f"resumed from {run}/state/step-{state['step']:09d}" in resumed.stderr
    assert_same_weights(reference[procs], run)


@pytest.mark.parametrize("procs", [1, 2])
def test_sigterm_saves_exits_75_and_resumes(procs, reference, shapes_dir, tmp_path):
    args = train_args(shapes_dir, tmp_path, "run")
    stopped = launch(args, procs, fault={"FAULT": "term", "FAULT_STEP": 4})
    run = tmp_path / "run"
    step = json.loads((run / "preempted.json").read_text())["step"]
    if procs == 1:  # the signal lands while step 4 is applied; the next step agrees on it and saves after it
        assert stopped.returncode == 75, stopped.stderr[-2000:]
        assert step == 6
    else:  # the launcher passes SIGTERM on a little later; it exits 1 whatever its workers did
        assert stopped.returncode != 0
        assert stopped.stderr.count(f"state saved at step {step}; exiting with 75") == 2, stopped.stderr[-2000:]
        assert 4 < step < 18  # a step in the middle of the run, the same on both processes
    assert newest_state(run)["step"] == step and not (run / "report").exists()
    ok(launch(args + ["train.resume=auto"], procs))
    assert not (run / "preempted.json").exists()
    assert_same_weights(reference[procs], run)


def test_a_two_process_run_exports(reference, tmp_path):
    from toolkit.export import export

    out = export(reference[2], tmp_path / "ddp.onnx")
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["parity_vs_torch"]["top1_agreement"] == 1.0
    assert report["validation"]["torch_accuracy"] == report["validation"]["onnx_accuracy"]


def _slurm_stubs(folder: Path, log: Path) -> Path:
    """Stand-ins for srun and scontrol: run the task here, record requeues."""
    folder.mkdir()
    (folder / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    (folder / "scontrol").write_text(
        f'#!/bin/bash\ncase "$1 $2" in\n  "show hostnames") echo 127.0.0.1 ;;\n  requeue*) echo "requeue $2" >> {log} ;;\nesac\n')
    for f in folder.iterdir():
        f.chmod(0o755)
    return folder


def test_slurm_script_requeues_on_the_time_limit_signal_and_resumes(shapes_dir, tmp_path):
    log = tmp_path / "scontrol.log"
    stubs = _slurm_stubs(tmp_path / "bin", log)
    env = {**os.environ, "PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "42", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "2",
           "SLURM_JOB_NODELIST": "node1", "ACCELERATE_USE_CPU": "true", "MAIN_PORT": "0"}  # 0: a free port
    args = [str(ROOT / "configs/quickstart.yaml"), "name=slurm", f"data.root={shapes_dir}",
            f"train.out_dir={tmp_path}", "data.batch_size=8", "train.epochs=30", "train.checkpoint_every=5",
            "train.progress=false"]
    script = ["bash", str(ROOT / "launch/slurm.sbatch"), *args]
    job = subprocess.Popen(script, cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "slurm"
    deadline = time.monotonic() + 120
    while not list(run.glob("state/step-*/done.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 delivers before the time limit
    _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err[-2000:]
    assert log.read_text().split() == ["requeue", "42"]
    assert (run / "preempted.json").is_file() and not (run / "report").exists()
    saved = newest_state(run)

    rerun = subprocess.run(script, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed from {run}/state/step-{saved['step']:09d}" in rerun.stderr
    assert log.read_text().split() == ["requeue", "42"]  # finished: not requeued again
    assert (run / "report" / "confusion.png").is_file()
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 30
