"""Evaluation: every validation image once across the processes, the weights and their EMA side by side,
the record logged, and the better weights released as last (and best when improved).
"""

from __future__ import annotations

import torch
from torch import nn

import toolkit.train.rundir as rundir
import toolkit.train.weights as weights
from toolkit.core.metrics import metrics_record


@torch.no_grad()
def evaluate(model, source, shards, normalize, num_classes: int, tta: bool = False, channels_last: bool = False,
             criterion: nn.Module | None = None):
    """This process's confusion matrices (rows true, columns predicted) over its shards: (1, C, C) int64,
    or with `tta` (2, C, C): [0] the image alone, which is what the exported model computes and what
    is stored and selects the best epoch, [1] the average of the image and its horizontal flip. And the
    sum of `criterion` (default: cross-entropy) over its images, for the image alone, as a 0-d float
    tensor: the validation loss is that sum over every process divided by the images counted in [0]."""
    model.eval()
    device = normalize.gain.device
    confusion = torch.zeros(1 + tta, num_classes, num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)
    criterion = criterion or nn.CrossEntropyLoss()
    for x, y in source(shards):
        x = normalize(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).float()
        keep = y >= 0  # -100 marks an unreadable file (streaming source)
        if keep.any():
            loss_sum += criterion(logits[keep], y[keep]).float() * int(keep.sum())
        views = [logits, logits + model(x.flip(3)).float()] if tta else [logits]
        for v, z in enumerate(views):
            confusion[v] += torch.bincount(y[keep] * num_classes + z.argmax(1)[keep],
                                           minlength=num_classes**2).view(num_classes, num_classes)
    return confusion, loss_sum


def evaluate_and_save(run, loss_mean: float, images: int, elapsed: float) -> None:
    """Evaluate every validation image once (all processes), log the record, save last/best weights."""
    accelerator, st, cfg = run.accelerator, run.state, run.cfg
    candidates = [("trained", run.raw_model)] + ([("ema", run.ema.module)] if run.ema else [])
    results = []
    for name, model in candidates:
        sync_buffers(model, accelerator.num_processes)
        confusions, val_loss = evaluate(model, run.val_src, run.val_shards, run.normalize, len(run.ds.classes),
                                        cfg.train.eval_tta, cfg.model.channels_last, run.criterion)
        confusions, val_loss = accelerator.reduce(confusions, "sum").cpu(), accelerator.reduce(val_loss, "sum").item()
        results.append((float(confusions[0].trace()) / max(1, int(confusions[0].sum())), name, model, confusions,
                        val_loss))
    chosen = max(results, key=lambda r: r[0])  # the EMA is released when it is better (ties: the trained weights)
    _, weights_name, released, confusions, val_loss = chosen
    confusion = confusions[0]  # the plain figure: what the exported model delivers
    record = metrics_record(confusion, run.ds.classes, st.epoch, st.step, loss_mean,
                            run.optimizer.param_groups[0]["lr"], elapsed, images,
                            val_loss=val_loss / max(1, int(confusion.sum())))
    if run.ema:  # both figures; val_accuracy is the released weights'
        record.update(weights=weights_name, val_accuracy_trained=results[0][0], val_accuracy_ema=results[1][0])
    if len(confusions) > 1:  # flip TTA, reported beside it, never stored as val_accuracy
        record["val_accuracy_tta"] = float(confusions[1].trace() / max(1, int(confusions[1].sum())))
    improved = record["val_accuracy"] > st.best_accuracy
    weights.check_finite(released)  # every process: they hold the same weights, so all stop together
    if accelerator.is_main_process:
        rundir.log_epoch(record, run.run_dir, cfg, accelerator)
        run.meta.metrics = {k: record[k] for k in ("epoch", "val_accuracy", "val_count", "per_class",
                                                   "val_accuracy_tta") if k in record}
        weights.save_weights(released, run.meta, run.run_dir / "last.safetensors")
        if improved:
            weights.save_weights(released, run.meta, run.run_dir / "best.safetensors")
    if improved:
        st.best_accuracy, st.best_epoch, st.best_confusion = record["val_accuracy"], st.epoch, confusion.tolist()




def sync_buffers(model: nn.Module, world: int) -> None:
    """Give every process rank 0's BatchNorm statistics, so evaluation matches the saved weights."""
    if world > 1:
        for buf in model.buffers():
            torch.distributed.broadcast(buf.data, 0)
