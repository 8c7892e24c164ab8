"""Stage 1, training: torch + accelerate. `toolkit.train.train(cfg)` runs one experiment.

The entry point is imported on first use, so `toolkit.train.datasets.shapes` and friends load
without torch.
"""


def __getattr__(name: str):
    if name in ("train", "resolve_run_dir", "evaluate", "NonFiniteLoss"):
        from toolkit.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'toolkit.train' has no attribute '{name}'")
