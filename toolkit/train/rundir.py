"""The run folder and the process group around the loop: which folder a run writes, the Accelerator,
metrics.jsonl records, stop signals, the preemption marker, and leaving together."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch

import toolkit.train.state as state
from toolkit import UserError
from toolkit.config import Config, save_config

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: state saved after SIGTERM/SIGUSR1, run again with train.resume=auto
PREEMPTED_MARKER = "preempted.json"  # in the run dir; launchers that swallow exit codes still leave this


def resolve_run_dir(cfg: Config) -> Path:
    """out_dir/name; a new run never reuses a folder with contents (name-2, name-3, ... instead)."""
    base = Path(cfg.train.out_dir) / cfg.name
    if cfg.train.resume == "auto":
        return base
    if cfg.train.resume:  # continue the run the given state belongs to
        path = Path(cfg.train.resume)
        if (path / state.DONE).is_file():
            return path.parent.parent  # <run>/state/step-N
        return path.parent if path.name == "state" else path
    candidate, i = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        i += 1
        candidate = base.with_name(f"{cfg.name}-{i}")
    return candidate


class StopSignals:
    """While active, SIGTERM/SIGUSR1 only set `requested`; the loop saves state and exits at the next step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __enter__(self):
        self.requested = False
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self.previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)
        return False


def start(cfg: Config):
    """The Accelerator and the run directory (chosen by the main process, shared with all)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    partial = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() would read it
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and partial.num_processes == 1:
        raise UserError(f"{launched} processes were launched but did not join one job; on a machine without "
                        "GPUs launch with ACCELERATE_USE_CPU=true (see launch/cpu_ddp.yaml)")
    run_dir = broadcast_object_list([resolve_run_dir(cfg) if partial.is_main_process else None])[0]
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum,
                              log_with=_trackers(cfg.train.log_with, Path(run_dir)), project_dir=str(run_dir))
    if cfg.train.log_with and not accelerator.log_with:  # accelerate drops trackers whose package is missing
        raise UserError(f"train.log_with={cfg.train.log_with}: its package is not installed "
                        f"(tensorboard: pip install tensorboardX; wandb: pip install wandb; ...)")
    logging.getLogger("toolkit").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    return accelerator, Path(run_dir)


def _trackers(log_with: str, run_dir: Path) -> list | None:
    """accelerate's log_with. TensorBoard writes to <run>/tensorboard/, where a user looks (accelerate's own
    tracker would write to <run>/<name>/); the others keep accelerate's defaults."""
    if log_with != "tensorboard":
        return [log_with] if log_with else None
    from accelerate.tracking import TensorBoardTracker
    from accelerate.utils import is_tensorboard_available

    return [TensorBoardTracker("tensorboard", run_dir)] if is_tensorboard_available() else []


def command_line() -> str:
    """The `toolkit ...` command that started this process, as typed; "" when train() was called from Python."""
    import shlex
    import sys

    argv = list(sys.argv)
    script = Path(argv[0]) if argv else Path()
    if not (script.name == "toolkit" or script.parts[-2:] == ("toolkit", "__main__.py")):
        return ""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return shlex.join(["toolkit", *argv[1:]]) + (f"  # in each of {world} launched processes" if world > 1 else "")


def finish(accelerator) -> None:
    """Every process waits for the others, then closes the trackers and the process group: a process
    that leaves with a live gloo group can abort at exit ("terminate called without an active exception")."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def keep_records(path: Path, epochs: int) -> None:
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["epoch"] <= epochs))


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": str(v)})
    return out


def log_epoch(record: dict, run_dir: Path, cfg: Config, accelerator) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    tta = f" (flip TTA {100 * record['val_accuracy_tta']:.2f}%, not stored)" if "val_accuracy_tta" in record else ""
    log.info("epoch %d/%d  loss %.4f  val acc %.2f%%%s (%d images)  lr %.4g  %.1f s  %.0f img/s",
             record["epoch"], cfg.train.epochs, record["train_loss"], 100 * record["val_accuracy"], tta,
             record["val_count"], record["lr"], record["epoch_time_s"], record["images_per_s"])
    if cfg.train.log_with:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])


def mark_preempted(run_dir: Path, step: int) -> None:
    """Main process: leave PREEMPTED_MARKER for launchers that swallow the exit code."""
    (run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": step, "time": time.time()}))


def loader_workers(cfg: Config) -> int:
    """Decode workers per process for the streaming source: this machine's cores shared by its processes."""
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def open_run_dir(run_dir: Path, cfg: Config, resumed_epoch: int | None) -> None:
    """Main process: create the run folder and write its config; a resumed run drops the metrics
    records of epochs after `resumed_epoch` (logged after the state was saved: they are run again)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    if resumed_epoch is not None:
        keep_records(run_dir / "metrics.jsonl", resumed_epoch)
    save_config(cfg, run_dir / "config.yaml")
