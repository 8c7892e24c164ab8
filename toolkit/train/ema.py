"""An exponential moving average (EMA) of the model's weights, evaluated beside the trained weights.

After each optimizer step, every floating-point tensor of the state (parameters and BatchNorm running
statistics) moves towards the trained model's: ema += (1 - d) * (w - ema), with d = min(decay,
(1 + step) / (10 + step)), the warm-up of timm's ModelEmaV2/V3 and TensorFlow's
ExponentialMovingAverage(num_updates=...): early averages do not drag in the random initial weights.
Integer buffers (BatchNorm's batch counter) are copied. The update depends only on the step, so a
resumed run continues the same average (the state saves it as ema.safetensors).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def decay_for(total_steps: int, fraction: float = 0.05) -> float:
    """A decay whose averaging horizon (1 / (1 - d)) is `fraction` of the run's optimizer steps, in [0.9, 0.9999]."""
    return float(min(0.9999, max(0.9, 1.0 - 1.0 / max(1.0, fraction * total_steps))))


class WeightEma:
    """The EMA copy of `model` (eval mode, no gradients); `module` is a model like any other."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs = None

    def _tensors(self, model: nn.Module):
        if self._pairs is None:  # state_dict tensors share storage with the modules: build the lists once
            own, live = self.module.state_dict(), model.state_dict()
            floats = [k for k, v in own.items() if v.is_floating_point()]
            self._pairs = ([own[k] for k in floats], [live[k] for k in floats],
                           [(own[k], live[k]) for k in own if not own[k].is_floating_point()])
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move towards `model` (the unwrapped trained model) after optimizer step `step` (0-based)."""
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        ema, live, ints = self._tensors(model)
        torch._foreach_lerp_(ema, [t.detach() for t in live], 1.0 - d)
        for e, t in ints:
            e.copy_(t)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
