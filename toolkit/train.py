"""The training loop: plain PyTorch with Accelerate doing the device, the processes and the precision.

Launch decides hardware and precision (launch/*.yaml); this file never names a device, a
process count or a dtype. Per optimizer step: forward on each micro-batch, backward,
then one check across all processes (non-finite loss, preemption), clip, step.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from toolkit import UserError, data, report
from toolkit.checkpoint import list_states, load_state, save_state, save_weights
from toolkit.config import Config, save_config
from toolkit.meta import Meta
from toolkit.models import create_model

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: state saved after SIGTERM/SIGUSR1; launch/slurm.sbatch requeues on it


class NonFiniteLoss(RuntimeError):
    pass


def resolve_run_dir(cfg: Config) -> Path:
    """out_dir/name; a new run never reuses a folder with contents (name-2, name-3, ... instead)."""
    base = Path(cfg.train.out_dir) / cfg.name
    if cfg.train.resume == "auto":
        return base
    candidate, i = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        i += 1
        candidate = base.with_name(f"{cfg.name}-{i}")
    return candidate


def lr_at(step: int, total: int, steps_per_epoch: int, cfg) -> float:
    """Learning rate after `step` optimizer steps (a pure function: resume needs no scheduler state)."""
    o = cfg.optim
    if o.schedule == "onecycle":  # linear up to lr over 30%, cosine down to lr/1e4
        up = max(1, int(0.3 * total))
        if step < up:
            return o.lr / 25 + (o.lr - o.lr / 25) * step / up
        t = (step - up) / max(1, total - up)
        return o.lr / 1e4 + (o.lr - o.lr / 1e4) * 0.5 * (1 + math.cos(math.pi * t))
    warmup = int(o.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return o.lr * (0.1 + 0.9 * step / warmup)
    if o.schedule == "constant":
        return o.lr
    t = (step - warmup) / max(1, total - warmup)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on biases and normalisation weights (1-d tensors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))


@torch.no_grad()
def evaluate(model, source, shards, normalize, num_classes: int, tta: bool = False, channels_last=False):
    """This process's (C, C) confusion matrix (rows true, columns predicted) over its shards."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=normalize.mean.device)
    for x, y in source(shards):
        x = normalize(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x).float()
        if tta:
            logits = logits + model(x.flip(3)).float()
        keep = y >= 0  # -100 marks an unreadable file (streaming source)
        confusion += torch.bincount(y[keep] * num_classes + logits.argmax(1)[keep],
                                    minlength=num_classes**2).view(num_classes, num_classes)
    return confusion


class _Stop:
    """SIGTERM/SIGUSR1 -> save state at the next optimizer step and exit with PREEMPTED_EXIT."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


def train(cfg: Config) -> Path:
    """Train per `cfg`; returns the run directory."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    run_dir = [resolve_run_dir(cfg) if state.is_main_process else None]
    run_dir = Path(broadcast_object_list(run_dir)[0])
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum,
                              log_with=cfg.train.log_with or None, project_dir=str(run_dir))
    main = accelerator.is_main_process
    logging.getLogger("toolkit").setLevel(logging.INFO if main else logging.WARNING)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    stop = _Stop()

    with accelerator.main_process_first():
        ds = data.load_dataset(cfg.data, cfg.seed)
    num_classes = len(ds.classes)
    torch.manual_seed(cfg.seed)  # same initial weights on every process
    model = create_model(cfg.model.arch, num_classes, cfg.data.image_size)
    if cfg.model.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)

    plan = data.TrainPlan(len(ds.train), cfg.data.batch_size, world, rank, cfg.seed, cfg.train.grad_accum)
    steps_per_epoch = plan.num_batches // cfg.train.grad_accum
    total_steps = steps_per_epoch * cfg.train.epochs
    progress = {"epoch": 0, "batch": 0, "step": 0, "best_accuracy": -1.0, "best_epoch": -1,
                "nonfinite_skipped": 0, "best_confusion": None}
    resume_files = _find_resume(cfg, run_dir)
    if resume_files:
        progress, files = load_state(resume_files)
        model.load_state_dict(files["model.safetensors"])
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.compile:
        model = torch.compile(model)
    if resume_files:
        _restore(accelerator, optimizer, files, progress, world, rank)
        log.info("resumed from %s at epoch %d, batch %d (step %d)", resume_files, progress["epoch"],
                 progress["batch"], progress["step"])

    normalize = data.Normalize(cfg.data.mean, cfg.data.std).to(device)
    workers = _loader_workers(cfg) if ds.train.files is not None else 0
    train_src = data.BatchSource(ds.train, cfg.data, device, workers)
    val_src = data.BatchSource(ds.val, cfg.data, device, workers)
    val_shards = data.eval_shards(len(ds.val), world, rank, max(256, cfg.data.batch_size))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    meta = Meta(arch=cfg.model.arch, class_names=ds.classes, image_size=cfg.data.image_size,
                resize=cfg.data.resize, mean=cfg.data.mean, std=cfg.data.std, config_hash=cfg.hash())

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        log.info("run %s: %d train / %d val images, %d classes, model %s on %s", run_dir, len(ds.train),
                 len(ds.val), num_classes, cfg.model.arch, device)
        log.info("global batch = %d per process x %d processes x %d accumulation = %d; %d steps per epoch; "
                 "precision %s", cfg.data.batch_size, world, cfg.train.grad_accum,
                 cfg.data.batch_size * world * cfg.train.grad_accum, steps_per_epoch, accelerator.mixed_precision)
    if cfg.train.log_with:
        accelerator.init_trackers(cfg.name, config={k: str(v) for k, v in _flat(cfg.to_dict()).items()})

    pad = cfg.data.crop_padding if cfg.data.augment else 0
    flip = cfg.data.hflip and cfg.data.augment
    raw_model = accelerator.unwrap_model(model)
    for epoch in range(progress["epoch"], cfg.train.epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        loss_sum = torch.zeros((), device=device)
        bad = torch.zeros((), device=device)
        aug = plan.augment_params(epoch, cfg.data.crop_padding)
        batches = plan.batches(epoch, progress["batch"])
        bar = report.progress_bar(len(batches), f"epoch {epoch + 1}/{cfg.train.epochs}",
                                  enabled=main and cfg.train.progress)
        for k, ((x, y), idx) in enumerate(zip(train_src(batches), batches), start=progress["batch"]):
            if pad or flip:
                x = data.augment(x, aug[idx], pad, flip)
            x = normalize(x)
            if cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                loss = criterion(model(x), y)
                accelerator.backward(loss)
                bad += ~torch.isfinite(loss.detach())
                loss_sum += torch.nan_to_num(loss.detach(), 0.0, 0.0, 0.0)
                seen += len(y)
                if not accelerator.sync_gradients:
                    continue
                flags = accelerator.reduce(torch.stack([bad, torch.tensor(float(stop.requested), device=device)]),
                                           "sum")
                if flags[0] > 0:  # every process saw the same verdict: skip this step together
                    optimizer.zero_grad(set_to_none=True)
                    progress["nonfinite_skipped"] += 1
                    progress["nonfinite_run"] = progress.get("nonfinite_run", 0) + 1
                    if progress["nonfinite_run"] >= cfg.train.max_nonfinite:
                        raise NonFiniteLoss(f"the loss was NaN or Inf for {progress['nonfinite_run']} steps in a row "
                                            f"(epoch {epoch + 1}, step {progress['step']}); lower optim.lr or set "
                                            f"train.clip_grad_norm")
                else:
                    progress["nonfinite_run"] = 0
                    if cfg.train.clip_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                    lr = lr_at(progress["step"], total_steps, steps_per_epoch, cfg)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                bad.zero_()
                progress["step"] += 1
                progress["batch"] = k + 1
                bar.update(cfg.train.grad_accum)
                every = cfg.train.checkpoint_every
                if flags[1] > 0 or (every and progress["step"] % every == 0):
                    _save(accelerator, raw_model, optimizer, progress, run_dir, cfg)
                if flags[1] > 0:
                    bar.close()
                    log.warning("stop requested: state saved at step %d; exiting with %d to be requeued",
                                progress["step"], PREEMPTED_EXIT)
                    accelerator.end_training()
                    sys.exit(PREEMPTED_EXIT)
        bar.close()
        elapsed = time.perf_counter() - start
        loss_mean = (accelerator.reduce(loss_sum, "sum") / max(1, accelerator.reduce(
            torch.tensor(float(len(batches)), device=device), "sum"))).item()
        progress["epoch"], progress["batch"] = epoch + 1, 0
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            _sync_buffers(raw_model, world)
            confusion = accelerator.reduce(evaluate(raw_model, val_src, val_shards, normalize, num_classes,
                                                    cfg.train.eval_tta, cfg.model.channels_last), "sum").cpu()
            record = report.metrics_record(confusion, ds.classes, epoch + 1, progress["step"], loss_mean,
                                           optimizer.param_groups[0]["lr"], elapsed, seen * world)
            if main:
                _log_epoch(record, run_dir, cfg, accelerator)
                meta.metrics = {k: record[k] for k in ("epoch", "val_accuracy", "val_count", "per_class")}
                save_weights(raw_model, meta, run_dir / "last.safetensors")
                if record["val_accuracy"] > progress["best_accuracy"]:
                    save_weights(raw_model, meta, run_dir / "best.safetensors")
            if record["val_accuracy"] > progress["best_accuracy"]:
                progress.update(best_accuracy=record["val_accuracy"], best_epoch=epoch + 1,
                                best_confusion=confusion.tolist())
        _save(accelerator, raw_model, optimizer, progress, run_dir, cfg)

    if main:
        report.write_report(run_dir, ds.classes, torch.tensor(progress["best_confusion"]), progress["best_epoch"])
        log.info("best val accuracy %.2f%% at epoch %d; %d non-finite steps skipped",
                 100 * progress["best_accuracy"], progress["best_epoch"], progress["nonfinite_skipped"])
    accelerator.end_training()
    return run_dir


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _loader_workers(cfg: Config) -> int:
    """Decode workers per process for the streaming source: the cores shared by this machine's processes."""
    import os

    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _sync_buffers(model: nn.Module, world: int) -> None:
    """Give every process rank 0's BatchNorm statistics, so evaluation matches the saved weights."""
    if world > 1:
        for buf in model.buffers():
            torch.distributed.broadcast(buf.data, 0)


def _log_epoch(record: dict, run_dir: Path, cfg: Config, accelerator) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log.info("epoch %d/%d  loss %.4f  val acc %.2f%% (%d images)  lr %.4g  %.1f s  %.0f img/s",
             record["epoch"], cfg.train.epochs, record["train_loss"], 100 * record["val_accuracy"],
             record["val_count"], record["lr"], record["epoch_time_s"], record["images_per_s"])
    if cfg.train.log_with:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])


def _find_resume(cfg: Config, run_dir: Path) -> Path | None:
    if not cfg.train.resume:
        return None
    if cfg.train.resume == "auto":
        states = list_states(run_dir / "state")
        return states[-1] if states else None
    path = Path(cfg.train.resume)
    if not path.exists():
        raise UserError(f"train.resume '{path}' does not exist; give a state folder or 'auto'")
    if path.is_dir() and path.name == "state" or (path / "state").is_dir():  # a run dir or its state/
        states = list_states(path if path.name == "state" else path / "state")
        if not states:
            raise UserError(f"train.resume '{path}' holds no complete resume state")
        return states[-1]
    return path


def _save(accelerator, raw_model, optimizer, progress: dict, run_dir: Path, cfg: Config) -> None:
    """Resume state: weights, optimizer, loss scaler, every process's RNG, position (main writes)."""
    from accelerate.utils import gather_object

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = gather_object([rng])  # one entry per process, in rank order
    if not accelerator.is_main_process:
        return
    from toolkit.checkpoint import assert_finite, clean_state_dict

    weights = clean_state_dict(raw_model.state_dict())
    assert_finite(weights, "the resume state")
    files = {"model.safetensors": weights, "optimizer.pt": optimizer.state_dict(),
             "rng.pt": {str(r): v for r, v in enumerate(rngs)}}
    if accelerator.scaler is not None:
        files["scaler.pt"] = accelerator.scaler.state_dict()
    trainer = {**progress, "world_size": accelerator.num_processes, "batch_size": cfg.data.batch_size,
               "config_hash": cfg.hash()}
    save_state(run_dir / "state", progress["step"], files, trainer, cfg.train.keep_states)


def _restore(accelerator, optimizer, files: dict, progress: dict, world: int, rank: int) -> None:
    optimizer.load_state_dict(files["optimizer.pt"])
    if accelerator.scaler is not None and "scaler.pt" in files:
        accelerator.scaler.load_state_dict(files["scaler.pt"])
    rng = files["rng.pt"].get(str(rank))
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    saved_world = progress.get("world_size", world)
    if saved_world != world and progress["batch"]:  # same samples seen, counted in this world's batches
        samples = progress["batch"] * saved_world * progress["batch_size"]
        progress["batch"] = samples // (world * progress["batch_size"])
        log.warning("resuming %d processes from a %d-process state: the position is approximate",
                    world, saved_world)
