"""Stage 1, training: torch + accelerate. `toolkit.train.train(cfg)` runs one experiment.

The entry point is imported on first use, so `toolkit.train.datasets.shapes` and friends load
without torch.
"""


def __getattr__(name: str):
    if name == "evaluate":
        import toolkit.train.validate as validate

        return validate.evaluate
    if name in ("train", "NonFiniteLoss"):
        import toolkit.train.loop as loop

        return getattr(loop, name)
    if name == "resolve_run_dir":
        import toolkit.train.rundir as rundir

        return rundir.resolve_run_dir
    raise AttributeError(f"module 'toolkit.train' has no attribute '{name}'")
