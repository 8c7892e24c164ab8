"""A checkpoint argument (a .safetensors file or a run directory) -> its weights file, or why there is none.

Torch-free (export, evaluate, inspect and report all take a run directory). A run writes
best.safetensors at its first evaluation; before that the user needs to know that no epoch
completed and how to continue, not only that a file is missing.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from toolkit import UserError

BEST = "best.safetensors"
STATE_DONE = "done.json"  # the marker of a complete resume state: <run>/state/step-N/done.json


def newest_state(run: Path) -> dict | None:
    """The bookkeeping (epoch, batch, step, ...) of the newest complete resume state of `run`, if any."""
    states = sorted(p for p in (Path(run) / "state").glob("step-*") if (p / STATE_DONE).is_file())
    for state in reversed(states):
        try:
            return json.loads((state / STATE_DONE).read_text())
        except (OSError, ValueError):
            continue
    return None


def weights_file(path: str | Path) -> Path:
    """A .safetensors file, or a run directory -> its best.safetensors; UserError saying why when missing."""
    path = Path(path)
    if path.is_dir():
        if not (path / BEST).is_file() and (path / "config.yaml").is_file():
            raise UserError(unfinished(path))
        path = path / BEST
    if not path.is_file():
        raise UserError(f"no weights at '{path}'; give a .safetensors file or a run directory")
    return path


def unfinished(run: Path) -> str:
    """Why the run directory `run` has no weights yet, and the command that continues it."""
    state = newest_state(run)
    config, quoted = shlex.quote(str(run / "config.yaml")), shlex.quote(str(run))
    if state is None:
        return (f"run '{run}' has no weights: no epoch completed and no resume state was saved; "
                f"train it again with `toolkit train {config}`")
    if state.get("epoch", 0) == 0:
        why = f"no epoch completed (it stopped at optimizer step {state.get('step', 0)} of epoch 1)"
    else:
        why = f"{state['epoch']} epoch(s) completed but none was evaluated yet (see train.eval_every)"
    return f"run '{run}' has no weights yet: {why}; resume it with `toolkit train {config} train.resume={quoted}`"
