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

import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import toolkit.train.data as data
import toolkit.train.heldout as heldout
import toolkit.train.pretrained as pretrained
import toolkit.train.report as report
import toolkit.train.rundir as rundir
import toolkit.train.state as state
import toolkit.train.validate as validate
from toolkit import UserError
from toolkit.config import Config
from toolkit.core.meta import Meta
from toolkit.core.metrics import figures_text, run_figures
from toolkit.train.batches import BatchSource, Normalize, TrainPlan, eval_shards
from toolkit.core.progress import progress_bar
from toolkit.train.augment import Augment
from toolkit.train.ema import WeightEma
from toolkit.train.mixing import CrossEntropy
from toolkit.train.catalog import check_arch
from toolkit.train.models import list_models
from toolkit.train.optim import build_optimizer, lr_at, set_lr
from toolkit.train.state import TrainState

log = logging.getLogger(__name__)
ESTIMATE_AFTER_STEPS = 20  # optimizer steps timed before the run's duration is estimated


class NonFiniteLoss(UserError):
    pass


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


def train(cfg: Config) -> Path:
    """Train per `cfg`; returns the run directory. The main process holds the run folder's lock throughout."""
    check_arch(cfg.model.arch, list_models())  # a misspelt model fails before any data is generated or read
    accelerator, run_dir, lock = rundir.start(cfg)
    with lock:
        try:
            run = _set_up(cfg, accelerator, run_dir)
            _epochs(run)
            _finish_run(run)
        except Exception as e:  # a collective that timed out or lost a process: one line naming this rank
            lost = rundir.lost_contact(e, cfg, accelerator.num_processes)
            if lost is None:
                raise
            raise lost from e
    return run_dir


def _epochs(run: Run) -> None:
    """Train, evaluate and save epoch by epoch until train.epochs, the target accuracy or a stop signal."""
    cfg = run.cfg
    with rundir.StopSignals() as stop:
        for epoch in range(run.state.epoch, cfg.train.epochs):
            loss_mean, images, elapsed = _train_epoch(run, epoch, stop)
            run.state.epoch, run.state.batch, run.state.epoch_loss = epoch + 1, 0, 0.0
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                validate.evaluate_and_save(run, loss_mean, images, elapsed)
            state.save_resume(run.accelerator, run.raw_model, run.optimizer, run.state, run.run_dir, cfg, run.ema)
            target = cfg.train.stop_at_accuracy
            if target and run.state.best_accuracy >= target:  # the same verdict on every process
                log.info("validation accuracy reached train.stop_at_accuracy=%g at epoch %d", target, epoch + 1)
                break
            if _reduce_flags(run.accelerator, stop=stop.requested)["stop"] > 0:
                _preempted(run)  # signalled during evaluation: resume at the epoch end


def _set_up(cfg: Config, accelerator, run_dir: Path) -> Run:
    """Data, model (fresh or from the resume state), optimizer, batch sources, the run folder's first files."""
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
              total_steps=plan.num_batches // cfg.train.grad_accum * cfg.train.epochs, ema=ema)
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
            log.warning("resuming %s with a config that differs from the one it was saved with", state_path)
    st.arch, st.num_classes = cfg.model.arch, num_classes  # saved with every state
    return model, st, files


def _train_epoch(run: Run, epoch: int, stop: rundir.StopSignals) -> tuple[float, int, float]:
    """Train one epoch from run.state.batch on. -> (mean loss, images seen by all processes, seconds).

    Per optimizer step: accumulate -> backward on each micro-batch -> one all-reduce of the named
    flags (a non-finite loss anywhere skips the step everywhere; a stop signal anywhere saves and
    exits everywhere) -> step.
    """
    cfg, accelerator, model, st = run.cfg, run.accelerator, run.model, run.state
    main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    model.train()
    start, seen = time.perf_counter(), 0
    loss_sum = torch.tensor(st.epoch_loss if main else 0.0, device=device)
    nonfinite = torch.zeros((), device=device)  # non-finite losses since the last step, this process
    aug = run.augment.for_epoch(epoch, run.plan.n) if run.augment else None
    batches = run.plan.batches(epoch, st.batch)
    bar = progress_bar(len(batches), f"epoch {epoch + 1}/{cfg.train.epochs}", main and cfg.train.progress)
    for k, (x, y) in enumerate(run.train_src(batches, aug), start=st.batch):
        x = run.normalize(x)
        if cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.accumulate(model):
            loss = run.criterion(model(x), y)
            accelerator.backward(loss)
            nonfinite += ~torch.isfinite(loss.detach())
            loss_sum += torch.nan_to_num(loss.detach(), 0.0, 0.0, 0.0)
            seen += len(y)
            bar.update()
            if not accelerator.sync_gradients:
                continue
            flags = _reduce_flags(accelerator, nonfinite=nonfinite, stop=stop.requested)  # one sync per step
            lr = lr_at(st.step, run.total_steps, run.plan.num_batches // cfg.train.grad_accum, cfg)
            stepped = _optimizer_step(run, lr, skip=flags["nonfinite"] > 0)
            if run.ema and stepped:
                run.ema.update(run.raw_model, st.step)
            nonfinite.zero_()
            st.step += 1
            st.batch = k + 1
            run.timed_steps += 1
            if main and run.timed_steps == ESTIMATE_AFTER_STEPS:
                _log_estimate(run, epoch, (run.timed_s + time.perf_counter() - start) / run.timed_steps)
            every = cfg.train.checkpoint_every
            if flags["stop"] > 0 or (every and st.step % every == 0 and k + 1 < run.plan.num_batches):
                st.epoch_loss = accelerator.reduce(loss_sum.clone(), "sum").item()
                state.save_resume(accelerator, run.raw_model, run.optimizer, st, run.run_dir, cfg, run.ema)
            if flags["stop"] > 0:
                _preempted(run)
    bar.close()
    elapsed = time.perf_counter() - start
    run.timed_s += elapsed
    loss_mean = accelerator.reduce(loss_sum, "sum").item() / (run.plan.num_batches * world)
    return loss_mean, seen * world, elapsed


def _log_estimate(run: Run, epoch: int, per_step_s: float) -> None:
    """'about N s per epoch, about M min for the run', from the first steps of this process (training only)."""
    epoch_s = per_step_s * (run.plan.num_batches // run.cfg.train.grad_accum)
    left = epoch_s * (run.cfg.train.epochs - epoch)
    log.info("about %.0f s per epoch, about %.1f min for the run (%d epochs; from the first %d steps, evaluation "
             "not counted)", epoch_s, left / 60, run.cfg.train.epochs - epoch, ESTIMATE_AFTER_STEPS)


def _finish_run(run: Run) -> None:
    """The untouched test figure and the run report (main process), then every process leaves together."""
    st, run_dir = run.state, run.run_dir
    if run.accelerator.is_main_process and (run_dir / "best.safetensors").is_file():
        heldout.test_accuracy(run_dir, run.cfg, run.ds, run.accelerator.device)  # before the report, which shows it
        validation = report.validation_predictions(run_dir, run.ds.val, run.cfg.data, run.accelerator.device)
        report.write_report(run_dir, run.ds.classes, st.best_confusion, st.best_epoch, validation)
        log.info("%s; %d non-finite steps skipped", figures_text(run_figures(run_dir)), st.nonfinite_skipped)
    rundir.finish(run.accelerator)


def _log_start(run: Run) -> None:
    cfg, ds, accelerator = run.cfg, run.ds, run.accelerator
    log.info("run %s: %d train / %d val%s images, %d classes, model %s, %d process(es) on %s, precision %s",
             run.run_dir, len(ds.train), len(ds.val), f" / {len(ds.test)} test" if ds.test else "", len(ds.classes),
             cfg.model.arch, accelerator.num_processes, accelerator.device.type, accelerator.mixed_precision)
    global_batch = cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum
    log.info("global batch = %d per process x %d processes x %d accumulation = %d images; %d steps per epoch",
             cfg.data.batch_size, accelerator.num_processes, cfg.train.grad_accum, global_batch,
             run.plan.num_batches // cfg.train.grad_accum)


def _reduce_flags(accelerator, **flags) -> dict[str, float]:
    """Sum named per-process flags (0-d tensors or numbers) over every process with one all-reduce."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=accelerator.device).reshape(())
                          for v in flags.values()])
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, "sum")
    return dict(zip(flags, values.tolist()))


def _optimizer_step(run: Run, lr: float, skip: bool) -> bool:
    """Step with `lr`, or skip together with every process when any of them saw a non-finite loss."""
    optimizer, st, cfg = run.optimizer, run.state, run.cfg
    if skip:
        optimizer.zero_grad(set_to_none=True)
        st.nonfinite_skipped += 1
        st.nonfinite_run += 1
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", st.step, st.nonfinite_run)
        if st.nonfinite_run >= cfg.train.max_nonfinite:
            raise NonFiniteLoss(f"the loss was NaN or Inf for {st.nonfinite_run} steps in a row (step "
                                f"{st.step}); lower optim.lr or set train.clip_grad_norm")
        return False
    st.nonfinite_run = 0
    if cfg.train.clip_grad_norm > 0:
        run.accelerator.clip_grad_norm_(run.model.parameters(), cfg.train.clip_grad_norm)
    set_lr(optimizer, lr, st.step, run.plan.num_batches // cfg.train.grad_accum, cfg)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def _preempted(run: Run) -> None:
    if run.accelerator.is_main_process:
        rundir.mark_preempted(run.run_dir, run.state.step)
    log.warning("stop requested: state saved at step %d; exiting with %d (resume with train.resume=auto)",
                run.state.step, rundir.PREEMPTED_EXIT)
    rundir.finish(run.accelerator)
    sys.exit(rundir.PREEMPTED_EXIT)
