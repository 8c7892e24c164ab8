"""The run folder and the process group around the loop: which folder a run writes, the Accelerator,
metrics.jsonl records, stop signals, the preemption marker, and leaving together."""

from __future__ import annotations

import contextlib
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
from toolkit.core.files import inside, write_atomic, writing
from toolkit.core.lock import Busy, Lock, remove_stale_temps
from toolkit.core.metrics import append_record, keep_records

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: state saved after SIGTERM/SIGUSR1, run again with train.resume=auto
PREEMPTED_MARKER = "preempted.json"  # in the run dir; launchers that swallow exit codes still leave this
LOCK = ".lock"  # in the run dir while a run writes it (owner pid and host inside); removed at the end


def claim_run_dir(cfg: Config) -> tuple[Path, Lock]:
    """Main process: the run folder, created if needed and locked for the whole run (one writer per folder).

    A new run takes out_dir/name, or name-2, name-3, ... when a folder has contents or another run holds
    it; creating the folder with mkdir and taking its lock is what claims it, so two runs started together
    never share one. A resumed run must get its own folder's lock: another live writer is refused in one
    line. Temporary files of writers that are gone are removed.
    """
    resuming = bool(cfg.train.resume)
    base = resolve_run_dir(cfg) if resuming else Path(cfg.train.out_dir) / cfg.name
    if cfg.data.kind != "cifar10" and inside(base, cfg.data.root):  # a folder walked for images
        elsewhere = os.path.relpath(Path(cfg.data.root).resolve().parent / "runs")
        raise UserError(f"the run folder '{base}' would be inside data.root '{cfg.data.root}', where its pictures "
                        f"would become training data; set train.out_dir outside it, e.g. train.out_dir={elsewhere}")
    candidate, i = base, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
        except OSError as e:
            raise UserError(f"cannot create the run folder '{candidate}' ({e.strerror or e})") from None
        if not candidate.is_dir():
            raise UserError(f"cannot create the run folder '{candidate}': a file of that name is in the way")
        lock = Lock(candidate / LOCK, f"run folder '{candidate}'")
        try:
            lock.acquire()
        except Busy:
            if resuming:
                raise
        else:
            if resuming or created or not any(p.name != LOCK for p in candidate.iterdir()):
                break
            lock.release()
        i += 1
        candidate = base.with_name(f"{cfg.name}-{i}")
    for folder in (candidate, candidate / "state"):  # what writers killed here left behind
        remove_stale_temps(folder)
    return candidate, lock


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
    """-> (Accelerator, run directory, its lock). The main process claims the folder and holds the lock (a
    context manager; the other processes get a no-op one) until the run ends; every process learns the folder.
    Collectives wait at most train.collective_timeout seconds for a stuck or lost process."""
    from datetime import timedelta

    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, parse_flag_from_env

    timeout = timedelta(seconds=cfg.train.collective_timeout)
    partial = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), timeout=timeout)  # as Accelerator() reads it
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and partial.num_processes == 1:
        raise UserError(f"{launched} processes were launched but did not join one job; on a machine without "
                        "GPUs launch with ACCELERATE_USE_CPU=true (see launch/cpu_ddp.yaml)")
    run_dir, lock = claim_run_dir(cfg) if partial.is_main_process else (None, contextlib.nullcontext())
    try:
        run_dir = broadcast_object_list([run_dir])[0]
        accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum,
                                  log_with=_trackers(cfg.train.log_with, Path(run_dir)), project_dir=str(run_dir),
                                  kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
        if cfg.train.log_with and not accelerator.log_with:  # accelerate drops trackers whose package is missing
            raise UserError(f"train.log_with={cfg.train.log_with}: its package is not installed "
                            f"(tensorboard: pip install tensorboardX; wandb: pip install wandb; ...)")
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    logging.getLogger("toolkit").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    return accelerator, Path(run_dir), lock


def lost_contact(e: BaseException, cfg: Config, world: int) -> UserError | None:
    """A collective that timed out or lost its peers, as one line (the command line prefixes the rank).
    gloo words it in many ways ("Timed out waiting ...", "Application timeout caused pair closure",
    "Connection closed by peer"), as a RuntimeError or torch's DistBackendError."""
    import torch.distributed as dist

    low = str(e).lower()
    timed_out = "timed out" in low or "timeout" in low
    lost = any(k in low for k in ("connection closed", "connection reset", "pair closure", "broken pipe", "gloo"))
    if world < 2 or not (isinstance(e, getattr(dist, "DistBackendError", ())) or
                         isinstance(e, RuntimeError) and (timed_out or lost)):
        return None
    if timed_out:
        return UserError(f"no answer from the other processes within train.collective_timeout="
                         f"{cfg.train.collective_timeout:g} s: a process is stuck or gone; the job stops (resume it "
                         "with train.resume=auto)")
    return UserError(f"lost contact with another process ({str(e).splitlines()[0][-120:]}); the job stops (resume it "
                     "with train.resume=auto)")


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


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": str(v)})
    return out


def log_epoch(record: dict, run_dir: Path, cfg: Config, accelerator) -> None:
    append_record(run_dir, record)  # one whole line or none; a torn one is cut away first
    tta = f" (flip TTA {100 * record['val_accuracy_tta']:.2f}%, not stored)" if "val_accuracy_tta" in record else ""
    log.info("epoch %d/%d  loss %.4f  val acc %.2f%%%s (%d images)  lr %.4g  %.1f s  %.0f img/s",
             record["epoch"], cfg.train.epochs, record["train_loss"], 100 * record["val_accuracy"], tta,
             record["val_count"], record["lr"], record["epoch_time_s"], record["images_per_s"])
    if cfg.train.log_with:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])


def mark_preempted(run_dir: Path, step: int) -> None:
    """Main process: leave PREEMPTED_MARKER for launchers that swallow the exit code."""
    write_atomic(run_dir / PREEMPTED_MARKER, json.dumps({"step": step, "time": time.time()}))


def loader_workers(cfg: Config) -> int:
    """Decode workers per process for the streaming source: this machine's cores shared by its processes."""
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def open_run_dir(run_dir: Path, cfg: Config, resumed_epoch: int | None, branch: str, parent: Path | None) -> None:
    """Main process: write the run's config and record that training starts here (state.HISTORY: the
    branch id and the state it continues); a resumed run drops the metrics records of epochs after
    `resumed_epoch` (logged after the state was saved: they are run again)."""
    with writing(run_dir):
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    if resumed_epoch is not None:
        keep_records(run_dir, resumed_epoch)
    save_config(cfg, run_dir / "config.yaml")
    state.start_branch(run_dir, branch, parent)
