"""`toolkit report RUN`: the run report rebuilt from a run directory's files.

A run writes its report when it finishes; one that was stopped (preempted, interrupted, killed)
has weights and metrics but no report. This rebuilds it from best.safetensors, metrics.jsonl,
config.yaml and the run's data as it is on disk (never generated or downloaded here), and measures
the untouched test figure when the run has a test set but no test.json for its best weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

import toolkit.train.data as data
import toolkit.train.heldout as heldout
import toolkit.train.report as report
from toolkit import UserError
from toolkit.config import load_config
from toolkit.core.checkpoint import newest_state, weights_file
from toolkit.core.lock import Lock
from toolkit.core.metrics import figures_text, read_records, run_figures
from toolkit.train.batches import BatchSource, Normalize, eval_shards
from toolkit.train.rundir import LOCK
from toolkit.train.validate import evaluate
from toolkit.train.weights import build_model

log = logging.getLogger(__name__)


def rebuild_report(run_dir: str | Path) -> Path:
    """Write <run>/report/ again from the run's files; returns the report folder.

    The confusion matrix is the one the run recorded for its best epoch (in its newest resume
    state) when that is the epoch of best.safetensors; otherwise the best weights are evaluated
    on every validation image. Raises UserError for a folder that is not a run, a run without
    weights (saying why) or data that is no longer on disk.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml); give runs/<name>")
    best = weights_file(run_dir)  # a run without weights says why and how to resume it
    cfg = load_config(run_dir / "config.yaml")
    model, meta = build_model(best)
    ds = data.load_dataset(cfg.data, cfg.seed, make=False)
    if ds.classes != meta.class_names:
        raise UserError(f"the classes under data.root '{cfg.data.root}' are no longer those of the run "
                        f"({', '.join(meta.class_names[:5])}...): the report would be wrong")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    epoch = int(meta.metrics.get("epoch", 0))
    state = newest_state(run_dir) or {}
    if state.get("best_confusion") and state.get("best_epoch") == epoch:
        confusion = state["best_confusion"]
    else:  # the state is older than the best weights: measure them
        log.info("evaluating %s on %d validation images for the confusion matrix", best, len(ds.val))
        source = BatchSource(ds.val, cfg.data, device, 0)
        norm = Normalize(meta.mean, meta.std).to(device)
        confusions, _ = evaluate(model.to(device), source, eval_shards(len(ds.val), 1, 0, 256), norm,
                                 meta.num_classes)
        confusion = confusions[0].cpu().tolist()  # the plain figure, as the run stores it
    records = read_records(run_dir)  # a line torn by a crash is left out
    if not records:
        raise UserError(f"'{run_dir / 'metrics.jsonl'}' holds no evaluation; nothing to report")
    validation = report.validation_predictions(run_dir, ds.val, cfg.data, device)
    with Lock(run_dir / LOCK, f"run folder '{run_dir}'"):  # never beside a training that writes this folder
        if ds.test is not None and "test_accuracy" not in run_figures(run_dir):  # stopped before its test figure
            heldout.test_accuracy(run_dir, cfg, ds, device)
        out = report.write_report(run_dir, ds.classes, confusion, epoch, validation)
    log.info("%s", figures_text(run_figures(run_dir)))
    return out
