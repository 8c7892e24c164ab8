"""The training loop: plain PyTorch with Accelerate doing the devices, the processes and the precision.

The launch decides hardware and precision (launch/*.yaml); this file never names a device,
a process count or a dtype. Per optimizer step: forward and backward on each micro-batch,
then one small all-reduce that every process acts on together (a non-finite loss anywhere
skips the step everywhere; a stop signal anywhere saves and exits everywhere), clip, step.

Resume is exact: the data order and augmentation are functions of (seed, epoch), the
learning rate a function of the step, and the state holds the weights, optimizer, loss
scaler, every process's RNG and the position inside the epoch. The Run it trains is built by setup.py.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

import toolkit.train.heldout as heldout
import toolkit.train.report as report
import toolkit.train.rundir as rundir
import toolkit.train.state as state
import toolkit.train.validate as validate
from toolkit import UserError
from toolkit.config import Config
from toolkit.core.metrics import figures_text, run_figures
from toolkit.core.progress import progress_bar
from toolkit.train.catalog import check_arch
from toolkit.train.models import list_models
from toolkit.train.optim import lr_at, set_lr
from toolkit.train.setup import Run, set_up

log = logging.getLogger(__name__)
ESTIMATE_AFTER_STEPS = 20  # optimizer steps timed before the run's duration is estimated


class NonFiniteLoss(UserError):
    """The loss was NaN or Inf for train.max_nonfinite optimizer steps in a row."""


def train(cfg: Config) -> Path:
    """Train per `cfg`; returns the run directory. The main process holds the run folder's lock throughout."""
    check_arch(cfg.model.arch, list_models())  # a misspelt model fails before any data is generated or read
    accelerator, run_dir, lock = rundir.start(cfg)
    with lock:
        try:
            run = set_up(cfg, accelerator, run_dir)
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
            lr = lr_at(st.step, run.total_steps, run.plan.steps_per_epoch, cfg)
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
    epoch_s = per_step_s * (run.plan.steps_per_epoch)
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
    set_lr(optimizer, lr, st.step, run.plan.steps_per_epoch, cfg)
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
