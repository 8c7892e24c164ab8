"""Resume states: <run>/state/step-N/, written atomically, loaded without running code.

<run>/state/step-000000120/ holds model.safetensors, optimizer.pt, rng.pt (every process's
generator states, gathered to the main process), scaler.pt (fp16) and done.json (a TrainState:
epoch, batch position, step, best metric, counters), written last. The folder is written under a temporary
name and renamed, so a crash mid-write never leaves a state that `resume=auto` would pick.

Nothing here unpickles code: safetensors for tensors, JSON for bookkeeping, and
torch.load(weights_only=True) only for the optimizer/RNG dicts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit import UserError
from toolkit.core.checkpoint import HISTORY, STATE_DONE, current_state, state_info
from toolkit.core.files import append_jsonl, printable, writing
from toolkit.train.weights import assert_finite, check_finite, clean_state_dict

log = logging.getLogger(__name__)

DONE = STATE_DONE


@dataclass
class TrainState:
    """Where a run is and what it has seen; saved as done.json, the marker of a complete resume state.

    The position is (epoch, batch) with `batch` counted in micro-batches of the layout that saved
    it (world_size x batch_size); restore_resume converts it when the layout changes.
    """

    epoch: int = 0  # epochs finished
    batch: int = 0  # micro-batches of the current epoch already trained, per process
    step: int = 0  # optimizer steps taken (the learning rate is a function of it)
    best_accuracy: float = -1.0  # best validation accuracy so far, in [0, 1]; -1 before the first evaluation
    best_epoch: int = 0  # the epoch (1-based) that reached it
    best_confusion: list[list[int]] | None = None  # (C, C) confusion matrix of that epoch, rows true
    nonfinite_skipped: int = 0  # optimizer steps skipped for a NaN/Inf loss, in the whole run
    nonfinite_run: int = 0  # ... in a row, up to now
    epoch_loss: float = 0.0  # loss summed over every process's micro-batches of the unfinished epoch
    arch: str | None = None  # the model the weights belong to (None: a state from before it was saved)
    num_classes: int | None = None
    world_size: int | None = None  # the batch layout the position is counted in (None: this run's)
    batch_size: int | None = None
    grad_accum: int | None = None
    config_hash: str | None = None  # of the config that saved the state
    config: dict | None = None  # its Config.trained() settings (None: a state from before they were saved)
    class_names: list[str] | None = None  # index order of the weights' outputs (None: a state from before)
    data_fingerprint: str | None = None  # data.Dataset.fingerprint: file lists and labels it was trained on
    branch: str | None = None  # id of the training start that saved it (see HISTORY)
    parent: str | None = None  # the state that start continued from (a step-N folder name), if any

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        """Parse done.json; keys missing from older states take their defaults, unknown keys are ignored."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def save_state(state_dir: Path, step: int, files: dict[str, object], trainer: TrainState, keep: int) -> Path:
    """Write state_dir/step-<step>/ atomically and keep only the newest `keep` states.

    `files` maps names to tensor dicts (.safetensors) or plain containers of tensors (.pt,
    loadable with weights_only=True).
    """
    from safetensors.torch import save_file

    final = state_dir / f"step-{step:09d}"
    tmp = state_dir / f".tmp-step-{step:09d}-{os.getpid()}"
    try:
        with writing(final, "the resume state"):  # a full disk or a lost folder: one sentence
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, obj in files.items():
                if name.endswith(".safetensors"):
                    save_file(obj, str(tmp / name))
                else:
                    torch.save(obj, tmp / name)
            (tmp / DONE).write_text(trainer.to_json())
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(state_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in _superseded(list_states(state_dir), trainer.branch, keep):
        shutil.rmtree(old, ignore_errors=True)
    return final


def _superseded(states: list[Path], branch: str | None, keep: int) -> list[Path]:
    """States to delete: the current branch keeps its newest `keep`; a state of any branch older than those
    goes too. Newer states of an abandoned branch stay until this one passes them (they may be wanted)."""
    mine = [p for p in states if state_info(p).get("branch") == branch]
    if not mine:
        return []
    kept = mine[-keep:]
    floor = kept[0].name
    return [p for p in states if p not in kept and (p in mine or p.name < floor)]


def start_branch(run_dir: Path, branch: str, parent: Path | None) -> None:
    """Main process: record that training (re)starts in `run_dir` from `parent` (None: from scratch)."""
    append_jsonl(run_dir / HISTORY, {"branch": branch, "parent": parent.name if parent else None,
                                     "started": time.time(), "pid": os.getpid()})


def _fsync_dir(path: Path) -> None:
    for f in sorted(path.iterdir()) + [path]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_states(state_dir: Path) -> list[Path]:
    """Complete states, oldest first (half-written ones have no done marker and are skipped)."""
    if not state_dir.is_dir():
        return []
    return sorted(p for p in state_dir.glob("step-*") if (p / DONE).is_file())


def find_state(resume: str, run_dir: Path) -> Path | None:
    """train.resume -> the state folder to load: '' none, 'auto' the newest complete one, or a path."""
    if not resume:
        return None
    if resume == "auto":
        return current_state(run_dir)
    path = Path(resume)
    if not path.exists():
        raise UserError(f"train.resume '{path}' does not exist; give a state folder, a run directory or 'auto'")
    if (path / DONE).is_file():
        return path
    found = current_state(path.parent if path.name == "state" else path)
    if not found:
        raise UserError(f"train.resume '{path}' holds no complete resume state")
    return found


def check_same_data(st: TrainState, path: Path, classes: list[str], fingerprint: str) -> None:
    """A resumed run must train the classes its weights were trained on, in the same order; else UserError.
    Other changes to the data (files added, removed or relabelled) are allowed, with a warning."""
    if st.class_names is not None and st.class_names != classes:
        def names(c):
            return "[" + ", ".join(printable(n) for n in c[:8]) + (", ..." if len(c) > 8 else "") + "]"

        gone, new = sorted(set(st.class_names) - set(classes)), sorted(set(classes) - set(st.class_names))
        what = (f" ({', '.join(printable(n) for n in gone[:4])} gone; {', '.join(printable(n) for n in new[:4])} new)"
                if gone or new else " (the same names in another order)")
        raise UserError(f"resume state '{path}' was trained with the class list {names(st.class_names)}; the data "
                        f"now gives {names(classes)}{what}: resuming would put the wrong names on its outputs; "
                        "restore the class folders or start a new run")
    if st.data_fingerprint and fingerprint and st.data_fingerprint != fingerprint:
        log.warning("the training data changed since %s was saved (files added, removed or relabelled); resuming "
                    "anyway, so this run is not the one the interrupted run would have finished", path)


def load_state(path: Path) -> tuple[TrainState, dict[str, object]]:
    """-> (TrainState, {file name: loaded object}); errors name the broken file."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / DONE).is_file():
        raise UserError(f"'{path}' is not a complete resume state (no {DONE})")
    try:
        trainer = TrainState.from_json((path / DONE).read_text())
    except (ValueError, TypeError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"resume state file '{path / DONE}' is damaged ({e})") from None
    files = {}
    for f in sorted(path.iterdir()):
        if f.name == DONE:
            continue
        try:
            if f.suffix == ".safetensors":
                files[f.name] = load_file(str(f))
            else:
                files[f.name] = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # safetensors, zipfile and unpickler errors all mean a damaged file
            raise UserError(f"resume state file '{f}' is damaged ({str(e).splitlines()[0][:200]})") from None
    return trainer, files


def save_resume(accelerator, raw_model, optimizer, st: TrainState, run_dir: Path, cfg, ema=None) -> None:
    """Resume state: weights (and their EMA), optimizer, loss scaler, every process's RNG, position. Main writes."""
    from accelerate.utils import gather_object

    check_finite(raw_model)  # on every process, before any collective: all stop together
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = gather_object([rng])  # one entry per process, in rank order
    if not accelerator.is_main_process:
        return
    weights = clean_state_dict(raw_model.state_dict())
    assert_finite(weights, "the resume state")
    files = {"model.safetensors": weights, "optimizer.pt": optimizer.state_dict(),
             "rng.pt": {str(r): v for r, v in enumerate(rngs)}}
    if accelerator.scaler is not None:
        files["scaler.pt"] = accelerator.scaler.state_dict()
    if ema is not None:
        files["ema.safetensors"] = clean_state_dict(ema.state_dict())
    trainer = dataclasses.replace(st, world_size=accelerator.num_processes, batch_size=cfg.data.batch_size,
                                  grad_accum=cfg.train.grad_accum, config_hash=cfg.hash(), config=cfg.trained())
    save_state(run_dir / "state", st.step, files, trainer, cfg.train.keep_states)


def restore_resume(accelerator, optimizer, files: dict, st: TrainState, cfg) -> None:
    """Load a state's optimizer, loss scaler and this process's RNG; adapt the position to the batch layout."""
    try:
        optimizer.load_state_dict(files["optimizer.pt"])
    except (ValueError, KeyError) as e:
        raise UserError(f"the resume state's optimizer does not fit this run ({e}); start a new run instead") from None
    if accelerator.scaler is not None and "scaler.pt" in files:
        accelerator.scaler.load_state_dict(files["scaler.pt"])
    rng = files["rng.pt"].get(str(accelerator.process_index))
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    world, batch, accum = accelerator.num_processes, cfg.data.batch_size, cfg.train.grad_accum
    saved = (st.world_size or world, st.batch_size or batch)
    if saved != (world, batch) and st.batch:  # the samples seen, counted in this run's batches
        samples = st.batch * saved[0] * saved[1]
        st.batch = samples // (world * batch) // accum * accum  # an optimizer step never straddles
        log.warning("resuming with %d processes x batch %d from a state of %d x %d: the position in the epoch "
                    "is rounded down to batch %d", world, batch, saved[0], saved[1], st.batch)
