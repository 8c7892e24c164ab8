"""Setting up a training run: the data, the model (fresh or from the resume state), the optimizer, the batch
sources and the run folder's first files, held together in one Run that the loop (loop.py) takes."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import toolkit.train.data as data
import toolkit.train.pretrained as pretrained
import toolkit.train.rundir as rundir
import toolkit.train.state as state
from toolkit import UserError
from toolkit.config import Config
from toolkit.core.meta import Meta
from toolkit.core.process import OPENMP_DEFAULTS
from toolkit.train.augment import Augment
from toolkit.train.batches import BatchSource, Normalize, TrainPlan, eval_shards
from toolkit.train.ema import WeightEma
from toolkit.train.mixing import CrossEntropy
from toolkit.train.optim import build_optimizer
from toolkit.train.state import TrainState

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a training run holds once set up; the loop's pieces take it and update `state`."""

    cfg: Config
    accelerator: object  # accelerate.Accelerator
    run_dir: Path
    ds: data.Dataset
    model: nn.Module  # prepared: maybe DDP- and compile-wrapped
    raw_model: nn.Module  # the same parameters, unwrapped: evaluate and save this one
    optimizer: torch.optim.Optimizer
    plan: TrainPlan
    state: TrainState
    normalize: Normalize
    train_src: BatchSource
    val_src: BatchSource
    val_shards: list[torch.Tensor]
    meta: Meta
    criterion: nn.Module
    augment: Augment | None
    total_steps: int
    ema: WeightEma | None = None  # the moving average of the weights, evaluated beside them
    timed_steps: int = 0  # optimizer steps this process has trained, and their seconds (the estimate)
    timed_s: float = 0.0


def set_up(cfg: Config, accelerator, run_dir: Path) -> Run:
    """Data, model (fresh or from the resume state), optimizer, batch sources, the run folder's first files.

    Raises UserError, before any training step, when the resume state does not fit this run (another model or
    class list; changed files only warn) or the training set is too small for the batch size and processes."""
    for change in pretrained.apply_pretrained_defaults(cfg):
        log.info("model.pretrained: %s (the pretrained model's own)", change)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    with accelerator.main_process_first():  # one process generates and caches, the others read
        ds = data.load_dataset(cfg.data, cfg.seed)
    state_path = state.find_state(cfg.train.resume, run_dir)
    model, st, files = _build_model(cfg, ds, device, world, state_path)
    model.to(device)  # before the optimizer is built, so it sees the device (fused kernels)
    optimizer = build_optimizer(model, cfg, pretrained.classifier_prefixes(model, len(ds.classes)))
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.train.compile:
        model = torch.compile(model)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # no DDP or compile wrapper
    ema = WeightEma(raw_model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if ema and "ema.safetensors" in files:
        ema.load_state_dict(files["ema.safetensors"])
    if state_path:
        state.restore_resume(accelerator, optimizer, files, st, cfg)
        log.info("resumed from %s: epoch %d, batch %d, step %d", state_path, st.epoch + 1, st.batch, st.step)
        state.check_same_data(st, state_path, ds.classes, ds.fingerprint)  # before any step or write
    st.class_names, st.data_fingerprint = list(ds.classes), ds.fingerprint  # saved with every state
    st.branch, st.parent = uuid.uuid4().hex[:12], state_path.name if state_path else None
    plan = TrainPlan(len(ds.train), cfg.data.batch_size, world, rank, cfg.seed, cfg.train.grad_accum,
                     cfg.data.drop_last)
    workers = rundir.loader_workers(cfg) if ds.train.files is not None else 0
    run = Run(cfg, accelerator, run_dir, ds, model, raw_model, optimizer, plan, st,
              normalize=Normalize(cfg.data.mean, cfg.data.std).to(device),
              train_src=BatchSource(ds.train, cfg.data, device, workers, keep_host=False),
              val_src=BatchSource(ds.val, cfg.data, device, workers),
              val_shards=eval_shards(len(ds.val), world, rank, max(256, cfg.data.batch_size)),
              meta=Meta(arch=cfg.model.arch, class_names=ds.classes, image_size=cfg.data.image_size,
                        resize=cfg.data.resize, mean=cfg.data.mean, std=cfg.data.std,
                        interpolation=cfg.data.interpolation, config_hash=cfg.hash(),
                        extra={"train_command": rundir.command_line()} if rundir.command_line() else {}),
              criterion=CrossEntropy(cfg.train.label_smoothing),  # labels or mixed soft targets; ignores label -100
              augment=Augment.from_config(cfg.data, cfg.seed, len(ds.classes)),
              total_steps=plan.steps_per_epoch * cfg.train.epochs, ema=ema)
    if accelerator.is_main_process:
        rundir.open_run_dir(run_dir, cfg, st.epoch if state_path else None, st.branch, state_path)
        _log_start(run)
    if cfg.train.log_with:
        accelerator.init_trackers(cfg.name, config=rundir.flat(cfg.to_dict()))
    return run


def _build_model(cfg: Config, ds, device, world: int, state_path: Path | None):
    """-> (model with fresh or resumed weights, TrainState, the state's other files)."""
    num_classes = len(ds.classes)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    model = pretrained.build(cfg.model, num_classes, cfg.data.image_size)  # random or starting weights
    if cfg.model.sync_bn and world > 1:
        if device.type == "cuda":  # batch statistics over all processes' batches
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            log.info("model.sync_bn: %d BatchNorm layers share batch statistics across the %d processes",
                     sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()), world)
        else:
            log.warning("model.sync_bn needs GPUs (torch's SyncBatchNorm is CUDA only); ignored on %s", device.type)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    st, files = TrainState(), {}
    if not state_path:
        if hasattr(model, "init_from_data") and not (cfg.model.weights or cfg.model.pretrained):  # e.g. whitening
            sample, _ = data.sample_images(ds.train, cfg.data, range(min(5000, len(ds.train))))
            model.init_from_data(Normalize(cfg.data.mean, cfg.data.std)(sample))
    else:
        st, files = state.load_state(state_path)
        if st.class_names is not None and len(st.class_names) != num_classes:  # classes added or removed
            state.check_same_data(st, state_path, ds.classes, ds.fingerprint)
        saved = (st.arch or cfg.model.arch, st.num_classes or num_classes)
        if saved != (cfg.model.arch, num_classes):
            raise UserError(f"resume state '{state_path}' is for model {saved[0]} with {saved[1]} classes; this run "
                            f"has {cfg.model.arch} with {num_classes}: start a new run instead")
        try:
            model.load_state_dict(files["model.safetensors"])
        except RuntimeError as e:
            raise UserError(f"resume state '{state_path}' does not fit the model: {str(e).splitlines()[0]}") from None
        if st.config_hash != cfg.hash():
            _warn_changed_settings(state_path, st.config, cfg)
    st.arch, st.num_classes = cfg.model.arch, num_classes  # saved with every state
    return model, st, files


def _warn_changed_settings(state_path: Path, saved: dict | None, cfg: Config) -> None:
    """Name the settings that differ from those the resume state was saved with. A key the state does not know
    (added to the toolkit after it was saved) counts as unchanged while it holds its default."""
    if saved is None:
        log.warning("resuming %s with a config that differs from the one it was saved with", state_path)
        return
    old, new, default = (rundir.flat(d) for d in (saved, cfg.trained(), Config().trained()))
    changed = [f"{k} {old.get(k, '(not set)')} -> {new.get(k, '(removed)')}" for k in sorted(old.keys() | new.keys())
               if old.get(k, default.get(k)) != new.get(k)]
    if changed:
        log.warning("resuming %s with changed settings: %s", state_path, "; ".join(changed))


def _log_start(run: Run) -> None:
    cfg, ds, accelerator = run.cfg, run.ds, run.accelerator
    log.info("run %s: %d train / %d val%s images, %d classes, model %s, %d process(es) on %s, precision %s",
             run.run_dir, len(ds.train), len(ds.val), f" / {len(ds.test)} test" if ds.test else "", len(ds.classes),
             cfg.model.arch, accelerator.num_processes, accelerator.device.type, accelerator.mixed_precision)
    global_batch = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum
    log.info("global batch = %d per process x %d processes x %d accumulation = %d images; %d steps per epoch",
             cfg.data.batch_size, accelerator.num_processes, cfg.train.grad_accum, global_batch,
             run.plan.steps_per_epoch)
    unset = {k: v for k, v in OPENMP_DEFAULTS.items() if k not in os.environ}
    if accelerator.device.type == "cpu" and torch.get_num_threads() > 1 and unset:
        # the `toolkit` command sets them before torch is imported; code calling train() has to do it itself
        log.info("%s is not set, so torch's OpenMP threads spin while they wait: with other processes on these "
                 "cores, small steps can be several times slower; set %s before importing torch (the toolkit "
                 "command does)", ", ".join(unset), " ".join(f"{k}={v}" for k, v in unset.items()))
