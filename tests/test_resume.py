"""Exact resume, preemption, faults and non-finite losses, with real processes (1 and 2 gloo processes).

Faults are injected by tests/faults.py (a test-only entry point around toolkit's command line).
A resumed run must end with weights equal tensor for tensor to a run that was never interrupted.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT

FAULTS = str(ROOT / "tests" / "faults.py")
FLOAT64 = str(ROOT / "tests" / "float64.py")
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# port 0: the launcher takes a free port, so jobs that run at the same time (pytest -n) never meet on 29500
LAUNCHER = [ACCELERATE, "launch", "--config_file", str(ROOT / "launch/cpu_ddp.yaml"), "--main_process_port", "0"]
pytestmark = pytest.mark.slow


def launch(args, procs: int, fault: dict | None = None, timeout: float = 240, float64: bool = False):
    """Run `toolkit ARGS` in a new session: directly (1 process) or under accelerate launch (gloo).

    fault: tests/faults.py's settings; float64: train the model in float64 (tests/float64.py).
    """
    entry = [FAULTS] if fault else [FLOAT64] if float64 else ["-m", "toolkit"]
    if procs == 1:
        cmd = [sys.executable, *entry, *args]
    else:
        cmd = [*LAUNCHER, "--num_processes", str(procs), *entry, *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", **{k: str(v) for k, v in (fault or {}).items()}}
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, start_new_session=True)
    proc.seconds = time.monotonic() - start
    return proc


def train_args(data, out, name, *extra):
    return ["train", str(ROOT / "configs/quickstart.yaml"), f"data.root={data}", f"train.out_dir={out}",
            f"name={name}", "data.batch_size=8", "train.grad_accum=2", "train.epochs=3",
            "train.checkpoint_every=3", "train.progress=false", "data.cache=memory", *extra]  # the cached path


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_same_weights(a: Path, b: Path):
    for name in ("last.safetensors", "best.safetensors"):
        wa, wb = load_file(a / name), load_file(b / name)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}: {k} differs"
    accuracies = [[json.loads(line)["val_accuracy"] for line in (r / "metrics.jsonl").read_text().splitlines()]
                  for r in (a, b)]
    assert accuracies[0] == accuracies[1]


def newest_state(run: Path) -> dict:
    states = sorted((run / "state").glob("step-*/done.json"))
    return json.loads(states[-1].read_text())


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


def test_a_two_process_run_exports(reference, tmp_path):
    from toolkit.export import export

    out = export(reference[2], tmp_path / "ddp.onnx")
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["parity_vs_torch"]["top1_agreement"] == 1.0
    assert report["validation"]["torch_accuracy"] == report["validation"]["onnx_accuracy"]


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
