"""Toolkit jobs for the multi-process tests: `toolkit ...` in 1 process, or N gloo processes under accelerate
launch, with a fault injected (tests/faults.py) or the model trained in float64 (tests/float64.py); what the
tests read from the runs (the newest resume state, two runs' weights compared tensor for tensor)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import ROOT

FAULTS = str(ROOT / "tests" / "faults.py")
FLOAT64 = str(ROOT / "tests" / "float64.py")
# `accelerate launch` without the accelerate command's other subcommands: its `estimate-memory` imports timm (and
# with it torchvision and torch._dynamo) when installed, 2.5 CPU-s and seconds of wall per job on 2 cores; the
# launch itself is the same code. Port 0: a free port, so jobs that run at once (pytest -n) never meet on 29500.
LAUNCHER = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch/cpu_ddp.yaml"),
            "--main_process_port", "0"]


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
