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
HISTORY = "history.jsonl"  # in the run dir: one line per start of training (branch id, the state it continues)


def state_info(state: Path) -> dict:
    """The bookkeeping (done.json) of one resume state; {} when unreadable."""
    try:
        data = json.loads((Path(state) / STATE_DONE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def current_state(run: Path) -> Path | None:
    """The state a resume continues: the newest state of the training start recorded last in HISTORY, or
    the state that start continued from when it saved none; the newest state of the folder when there is
    no history (runs from before it was kept). Other branches' states (abandoned) are not continued."""
    from toolkit.core.files import read_jsonl

    state_dir = Path(run) / "state"
    states = sorted(p for p in state_dir.glob("step-*") if (p / STATE_DONE).is_file()) if state_dir.is_dir() else []
    if not states:
        return None
    branches = {p: state_info(p).get("branch") for p in states}
    for start in reversed(read_jsonl(Path(run) / HISTORY)):
        mine = [p for p in states if branches[p] == start.get("branch")]
        if mine:
            return mine[-1]
        parent = start.get("parent")
        if isinstance(parent, str) and "/" not in parent and (state_dir / parent / STATE_DONE).is_file():
            return state_dir / parent
    return states[-1]


def newest_state(run: Path) -> dict | None:
    """The bookkeeping (epoch, batch, step, ...) of the state a resume of `run` would continue, if any."""
    state = current_state(run)
    return state_info(state) if state else None


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
