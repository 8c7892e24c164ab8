"""Release weights: the fp32 state dict and the Meta record in one safetensors file.

Written by training (<run>/best.safetensors, last.safetensors), read by export, evaluate and
the run report. The state dict is unwrapped (never `module.` or `_orig_mod.` prefixes) and
never pickled: safetensors for tensors, JSON for the Meta in the header.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from toolkit import UserError
from toolkit.core.files import temp_path, writing
from toolkit.core.meta import META_KEY, Meta
from toolkit.core.checkpoint import weights_file

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".")] = v.detach().to("cpu").contiguous()
    return out


class NonFiniteWeights(UserError):
    pass


def assert_finite(state: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteWeights(f"refusing to save {what}: {', '.join(bad[:3])} hold NaN or Inf; lower optim.lr or "
                               "set train.clip_grad_norm")


def check_finite(model: nn.Module) -> None:
    """Raise NonFiniteWeights if any weight or buffer is NaN or Inf (call it on every process)."""
    assert_finite({k: v.detach() for k, v in model.state_dict().items()}, "the weights")


def _atomic_save_file(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = temp_path(path)
    try:
        with writing(path):  # a full disk or a lost folder: one sentence, whatever safetensors raises
            save_file(state, str(tmp), metadata=metadata)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(model: nn.Module, meta: Meta, path: str | Path) -> None:
    """Write the model's fp32 weights and `meta` to `path` (atomically; never NaN/Inf)."""
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in clean_state_dict(model.state_dict()).items()}
    assert_finite(state, str(path))
    _atomic_save_file(state, Path(path), {META_KEY: meta.to_json(), "format": "pt"})  # "pt": what HF loaders expect


def weights_path(path: str | Path) -> Path:
    """A .safetensors file, or a run directory (-> its best.safetensors, or an error saying why it has none)."""
    return weights_file(path)


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Meta]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = weights_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"'{path}' is not a readable safetensors file ({e})") from None
    if META_KEY not in header:
        raise UserError(f"'{path}' has no toolkit metadata; was it written by `toolkit train`?")
    return clean_state_dict(state), Meta.from_json(header[META_KEY], f"'{path}'")


def build_model(path: str | Path) -> tuple[nn.Module, Meta]:
    """A clean fp32 eval-mode model rebuilt from the weights file and its Meta."""
    from toolkit.train.models import create_model

    state, meta = load_weights(path)
    model = create_model(meta.arch, meta.num_classes, meta.image_size)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"'{weights_path(path)}' does not match model {meta.arch}: {str(e).splitlines()[0]}") from None
    return model.float().eval(), meta
