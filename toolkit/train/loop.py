"""The training loop: plain PyTorch with Accelerate doing the devices, the processes and the precision.

The launch decides hardware and precision (launch/*.yaml); this file never names a device,
a process count or a dtype. Per optimizer step: forward and backward on each micro-batch,
then one small all-reduce that every process acts on together (a non-finite loss anywhere
skips the step everywhere; a stop signal anywhere saves and exits everywhere), clip, step.

Resume is exact: the data order and augmentation are functions of (seed, epoch), the
learning rate a function of the step, and the state holds the weights, optimizer, loss
scaler, every process's RNG and the position inside the epoch.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

import toolkit.train.data as data
import toolkit.train.report as report
import toolkit.train.state as state
import toolkit.train.weights as weights
from toolkit import UserError
from toolkit.config import Config, save_config
from toolkit.core.meta import Meta
from toolkit.core.metrics import metrics_record
from toolkit.core.progress import progress_bar
from toolkit.train.models import create_model
from toolkit.train.optim import build_optimizer, lr_at

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: state saved after SIGTERM/SIGUSR1, run again with train.resume=auto
PREEMPTED_MARKER = "preempted.json"  # in the run dir; launchers that swallow exit codes still leave this


class NonFiniteLoss(UserError):
    pass


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


@torch.no_grad()
def evaluate(model, source, shards, normalize, num_classes: int, tta: bool = False, channels_last: bool = False):
    """This process's (C, C) confusion matrix (rows true, columns predicted) over its shards."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=normalize.gain.device)
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


def _start(cfg: Config):
    """The Accelerator and the run directory (chosen by the main process, shared with all)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as Accelerator() would read it
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes == 1:
        raise UserError(f"{launched} processes were launched but did not join one job; on a machine without "
                        "GPUs launch with ACCELERATE_USE_CPU=true (see launch/cpu_ddp.yaml)")
    run_dir = broadcast_object_list([resolve_run_dir(cfg) if state.is_main_process else None])[0]
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum,
                              log_with=cfg.train.log_with or None, project_dir=str(run_dir))
    if cfg.train.log_with and not accelerator.log_with:  # accelerate drops trackers whose package is missing
        raise UserError(f"train.log_with={cfg.train.log_with}: its package is not installed "
                        f"(tensorboard: pip install tensorboardX; wandb: pip install wandb; ...)")
    logging.getLogger("toolkit").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    return accelerator, Path(run_dir)


def train(cfg: Config) -> Path:
    """Train per `cfg`; returns the run directory."""
    accelerator, run_dir = _start(cfg)
    main, device = accelerator.is_main_process, accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index

    with accelerator.main_process_first():  # one process generates and caches, the others read
        ds = data.load_dataset(cfg.data, cfg.seed)
    num_classes = len(ds.classes)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = create_model(cfg.model.arch, num_classes, cfg.data.image_size)
    if cfg.model.sync_bn and world > 1:
        if device.type == "cuda":  # batch statistics over all processes' batches
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("model.sync_bn needs GPUs (torch's SyncBatchNorm is CUDA only); ignored on %s", device.type)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)

    plan = data.TrainPlan(len(ds.train), cfg.data.batch_size, world, rank, cfg.seed, cfg.train.grad_accum)
    steps_per_epoch = plan.num_batches // cfg.train.grad_accum
    total_steps = steps_per_epoch * cfg.train.epochs
    progress = {"epoch": 0, "batch": 0, "step": 0, "best_accuracy": -1.0, "best_epoch": 0,
                "best_confusion": None, "nonfinite_skipped": 0, "nonfinite_run": 0, "epoch_loss": 0.0}
    state_path = state.find_state(cfg.train.resume, run_dir)
    if hasattr(model, "init_from_data") and not state_path:  # data-dependent init, e.g. a whitening stem
        sample, _ = data.sample_images(ds.train, cfg.data, range(min(5000, len(ds.train))))
        model.init_from_data(data.Normalize(cfg.data.mean, cfg.data.std)(sample))
    if state_path:
        progress, files = state.load_state(state_path)
        saved = (progress.get("arch", cfg.model.arch), progress.get("num_classes", num_classes))
        if saved != (cfg.model.arch, num_classes):
            raise UserError(f"resume state '{state_path}' is for model {saved[0]} with {saved[1]} classes; this run "
                            f"has {cfg.model.arch} with {num_classes}: start a new run instead")
        try:
            model.load_state_dict(files["model.safetensors"])
        except RuntimeError as e:
            raise UserError(f"resume state '{state_path}' does not fit the model: {str(e).splitlines()[0]}") from None
        if progress.get("config_hash") != cfg.hash():
            log.warning("resuming %s with a config that differs from the one it was saved with", state_path)
    progress.update(arch=cfg.model.arch, num_classes=num_classes)  # saved with every state
    model.to(device)  # before the optimizer is built, so it sees the device (fused kernels)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.compile:
        model = torch.compile(model)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # no DDP or compile wrapper
    if state_path:
        state.restore_resume(accelerator, optimizer, files, progress, cfg)
        log.info("resumed from %s: epoch %d, batch %d, step %d", state_path, progress["epoch"] + 1,
                 progress["batch"], progress["step"])

    normalize = data.Normalize(cfg.data.mean, cfg.data.std).to(device)
    workers = _loader_workers(cfg) if ds.train.files is not None else 0
    train_src = data.BatchSource(ds.train, cfg.data, device, workers, keep_host=False)
    val_src = data.BatchSource(ds.val, cfg.data, device, workers)
    val_shards = data.eval_shards(len(ds.val), world, rank, max(256, cfg.data.batch_size))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)  # ignores label -100
    meta = Meta(arch=cfg.model.arch, class_names=ds.classes, image_size=cfg.data.image_size,
                resize=cfg.data.resize, mean=cfg.data.mean, std=cfg.data.std, config_hash=cfg.hash())
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        if state_path:  # epochs logged after the state was saved are run again: drop their records
            _keep_records(run_dir / "metrics.jsonl", progress["epoch"])
        save_config(cfg, run_dir / "config.yaml")
        log.info("run %s: %d train / %d val images, %d classes, model %s, %d process(es) on %s, precision %s",
                 run_dir, len(ds.train), len(ds.val), num_classes, cfg.model.arch, world, device.type,
                 accelerator.mixed_precision)
        log.info("global batch = %d per process x %d processes x %d accumulation = %d images; %d steps per epoch",
                 cfg.data.batch_size, world, cfg.train.grad_accum,
                 cfg.data.batch_size * world * cfg.train.grad_accum, steps_per_epoch)
    if cfg.train.log_with:
        accelerator.init_trackers(cfg.name, config=_flat(cfg.to_dict()))

    pad = cfg.data.crop_padding if cfg.data.augment else 0
    flip = cfg.data.hflip and cfg.data.augment
    with StopSignals() as stop:
        for epoch in range(progress["epoch"], cfg.train.epochs):
            model.train()
            start, seen = time.perf_counter(), 0
            loss_sum = torch.tensor(progress["epoch_loss"] if main else 0.0, device=device)
            bad = torch.zeros((), device=device)
            aug = (plan.augment_params(epoch, max(pad, 1)), pad, flip) if pad or flip else None
            batches = plan.batches(epoch, progress["batch"])
            bar = progress_bar(len(batches), f"epoch {epoch + 1}/{cfg.train.epochs}", main and cfg.train.progress)
            for k, (x, y) in enumerate(train_src(batches, aug), start=progress["batch"]):
                x = normalize(x)
                if cfg.model.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with accelerator.accumulate(model):
                    loss = criterion(model(x), y)
                    accelerator.backward(loss)
                    bad += ~torch.isfinite(loss.detach())
                    loss_sum += torch.nan_to_num(loss.detach(), 0.0, 0.0, 0.0)
                    seen += len(y)
                    bar.update()
                    if not accelerator.sync_gradients:
                        continue
                    flags = torch.stack([bad, torch.tensor(float(stop.requested), device=device)])
                    flags = (accelerator.reduce(flags, "sum") if world > 1 else flags).tolist()  # one sync per step
                    lr = lr_at(progress["step"], total_steps, steps_per_epoch, cfg)
                    _optimizer_step(accelerator, model, optimizer, cfg, progress, lr, skip=flags[0] > 0)
                    bad.zero_()
                    progress["step"] += 1
                    progress["batch"] = k + 1
                    every = cfg.train.checkpoint_every
                    if flags[1] > 0 or (every and progress["step"] % every == 0 and k + 1 < plan.num_batches):
                        progress["epoch_loss"] = accelerator.reduce(loss_sum.clone(), "sum").item()
                        state.save_resume(accelerator, raw_model, optimizer, progress, run_dir, cfg)
                    if flags[1] > 0:
                        _preempted(accelerator, run_dir, progress)
            bar.close()
            elapsed = time.perf_counter() - start
            loss_mean = accelerator.reduce(loss_sum, "sum").item() / (plan.num_batches * world)
            progress.update(epoch=epoch + 1, batch=0, epoch_loss=0.0)
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                _sync_buffers(raw_model, world)
                confusion = accelerator.reduce(evaluate(raw_model, val_src, val_shards, normalize, num_classes,
                                                        cfg.train.eval_tta, cfg.model.channels_last), "sum").cpu()
                record = metrics_record(confusion, ds.classes, epoch + 1, progress["step"], loss_mean,
                                               optimizer.param_groups[0]["lr"], elapsed, seen * world)
                improved = record["val_accuracy"] > progress["best_accuracy"]
                weights.check_finite(raw_model)  # every process: they hold the same weights, so all stop together
                if main:
                    _log_epoch(record, run_dir, cfg, accelerator)
                    meta.metrics = {k: record[k] for k in ("epoch", "val_accuracy", "val_count", "per_class")}
                    weights.save_weights(raw_model, meta, run_dir / "last.safetensors")
                    if improved:
                        weights.save_weights(raw_model, meta, run_dir / "best.safetensors")
                if improved:
                    progress.update(best_accuracy=record["val_accuracy"], best_epoch=epoch + 1,
                                    best_confusion=confusion.tolist())
            state.save_resume(accelerator, raw_model, optimizer, progress, run_dir, cfg)
            target = cfg.train.stop_at_accuracy
            if target and progress["best_accuracy"] >= target:  # the same verdict on every process
                log.info("validation accuracy reached train.stop_at_accuracy=%g at epoch %d", target, epoch + 1)
                break
            if accelerator.reduce(torch.tensor(float(stop.requested), device=device), "sum") > 0:
                _preempted(accelerator, run_dir, progress)  # signalled during evaluation: resume at the epoch end

    if main and (run_dir / "best.safetensors").is_file():
        validation = report.validation_predictions(run_dir, ds.val, cfg.data, device)
        report.write_report(run_dir, ds.classes, progress["best_confusion"], progress["best_epoch"], validation)
        log.info("best val accuracy %.2f%% at epoch %d; %d non-finite steps skipped",
                 100 * progress["best_accuracy"], progress["best_epoch"], progress["nonfinite_skipped"])
    _finish(accelerator)
    return run_dir


def _optimizer_step(accelerator, model, optimizer, cfg: Config, progress: dict, lr: float, skip: bool) -> None:
    """Step with `lr`, or skip together with every process when any of them saw a non-finite loss."""
    if skip:
        optimizer.zero_grad(set_to_none=True)
        progress["nonfinite_skipped"] += 1
        progress["nonfinite_run"] += 1
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", progress["step"],
                    progress["nonfinite_run"])
        if progress["nonfinite_run"] >= cfg.train.max_nonfinite:
            raise NonFiniteLoss(f"the loss was NaN or Inf for {progress['nonfinite_run']} steps in a row (step "
                                f"{progress['step']}); lower optim.lr or set train.clip_grad_norm")
        return
    progress["nonfinite_run"] = 0
    if cfg.train.clip_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _preempted(accelerator, run_dir: Path, progress: dict) -> None:
    if accelerator.is_main_process:
        (run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": progress["step"], "time": time.time()}))
    log.warning("stop requested: state saved at step %d; exiting with %d (resume with train.resume=auto)",
                progress["step"], PREEMPTED_EXIT)
    _finish(accelerator)
    sys.exit(PREEMPTED_EXIT)


def _finish(accelerator) -> None:
    """Every process waits for the others, then closes the trackers and the process group: a process
    that leaves with a live gloo group can abort at exit ("terminate called without an active exception")."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _keep_records(path: Path, epochs: int) -> None:
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["epoch"] <= epochs))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": str(v)})
    return out


def _loader_workers(cfg: Config) -> int:
    """Decode workers per process for the streaming source: this machine's cores shared by its processes."""
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
