"""Starting weights: timm's pretrained models, and `model.weights: PATH` for any architecture.

- `model.pretrained: true` with a timm model (`timm/<name>`, or a bare timm name like `resnet18`): timm
  loads its own weights: from its Hugging Face cache (offline with HF_HUB_OFFLINE=1), downloading when
  allowed, or from `model.weights` when set (timm's `pretrained_cfg_overlay=dict(file=PATH)`, so timm's own
  key remapping applies). timm drops the classifier when the class count differs.
- `model.weights: PATH` otherwise: a .safetensors file (a toolkit run's weights, or a timm / torchvision
  state dict). Tensors whose name and shape match are loaded; the classifier is left as built for this
  run's classes; the log says how many tensors were loaded, skipped and new.
Never pickle: only .safetensors files are read (timm's own hub files are safetensors when the hub has
them, and it reads any other with torch's weights_only loader).

The pretrained model's input size, mean, std and resize filter (interpolation) become the data defaults
(`apply_pretrained_defaults`), so they travel in the Meta to export and predict.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from toolkit import UserError
from toolkit.config import Config, DataConfig, ModelConfig
from toolkit.core.meta import INTERPOLATIONS
from toolkit.train.models import create_model, timm_name

log = logging.getLogger(__name__)
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, Lightning-style wrappers


def pretrained_cfg(arch: str) -> dict | None:
    """timm's pretrained config of `arch` (input_size, mean, std, interpolation, ...), without weights."""
    name = timm_name(arch)
    if name is None:
        return None
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else None


def apply_pretrained_defaults(cfg: Config) -> list[str]:
    """With model.pretrained, the pretrained model's input size, mean, std and interpolation replace the data
    defaults.

    Only keys still at their defaults change (an explicit data.image_size=32 equal to the default is
    taken as a default too: a documented limit). Returns what changed, for the log.
    """
    if not cfg.model.pretrained:
        return []
    pcfg = pretrained_cfg(cfg.model.arch)
    if pcfg is None:
        raise UserError(f"model.pretrained needs a timm model with pretrained weights; '{cfg.model.arch}' is not one "
                        "(use model.weights=PATH for the toolkit's own models)")
    default, changed = DataConfig(), []
    size = int((pcfg.get("test_input_size") or pcfg.get("input_size") or (3, cfg.data.image_size))[-1])
    if cfg.data.image_size == default.image_size and size != cfg.data.image_size:
        cfg.data.image_size = size
        changed.append(f"data.image_size={size}")
    for key in ("mean", "std"):
        value = [round(float(v), 6) for v in pcfg.get(key) or ()]
        if len(value) == 3 and getattr(cfg.data, key) == getattr(default, key) and value != getattr(cfg.data, key):
            setattr(cfg.data, key, value)
            changed.append(f"data.{key}={','.join(f'{v:g}' for v in value)}")
    filt = pcfg.get("interpolation") or default.interpolation
    if cfg.data.interpolation == default.interpolation and filt != cfg.data.interpolation:
        if filt in INTERPOLATIONS:
            cfg.data.interpolation = filt
            changed.append(f"data.interpolation={filt}")
        else:  # e.g. 'nearest' or 'random': not a filter predict reproduces
            log.warning("model.pretrained: the model's interpolation '%s' is not one of %s; keeping %s", filt,
                        ", ".join(INTERPOLATIONS), cfg.data.interpolation)
    return changed


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file, wrapper prefixes removed. Other formats are refused (pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    if not path.is_file():
        raise UserError(f"model.weights '{path}' does not exist")
    if path.suffix != ".safetensors":
        raise UserError(f"model.weights '{path}' is not a .safetensors file; other formats can run code when "
                        "loaded (pickle) and are refused: convert it with safetensors.torch.save_file")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"model.weights '{path}' is not a readable safetensors file ({e})") from None
    out = {}
    for k, v in state.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, int]:
    """Copy the tensors of `state` whose name and shape match `model`'s; returns the counts and logs them.

    loaded: copied; skipped: in the file but absent or of another shape here (e.g. a classifier for
    another class count); new: in the model, not in the file (kept as initialised).
    """
    own = model.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = [k for k in state if k not in loaded]
    new = [k for k in own if k not in loaded]
    if not loaded:
        raise UserError(f"model.weights '{source}' has no tensor that fits this model (file: "
                        f"{', '.join(list(state)[:3])}...; model: {', '.join(list(own)[:3])}...): another architecture?")
    with torch.no_grad():
        for k, v in loaded.items():
            own[k].copy_(v.to(own[k].dtype))
    log.info("model.weights %s: %d tensors loaded, %d skipped (%s), %d new (%s)", source, len(loaded), len(skipped),
             _names(skipped), len(new), _names(new))
    return {"loaded": len(loaded), "skipped": len(skipped), "new": len(new)}


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "") if keys else "none"


def create_timm(name: str, num_classes: int, pretrained: bool, weights: str) -> nn.Module:
    """A timm model; with `pretrained`, timm's weights from `weights` (a local file) or its cache/hub."""
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    overlay = {}
    if weights:
        path = Path(weights)
        if path.suffix != ".safetensors" or not path.is_file():
            raise UserError(f"model.weights '{weights}' must be an existing .safetensors file (other formats are "
                            "refused: loading them can run code)")
        overlay = {"file": str(path)}
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, pretrained_cfg_overlay=overlay)
    except (OSError, RuntimeError, ValueError) as e:  # offline without a cached copy, no weights for this model
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"model.pretrained: no weights for timm model '{name}' ({first}); offline, put them in the "
                        "Hugging Face cache first, or set model.weights=PATH.safetensors") from None


def build(mcfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """The model of `mcfg` with its starting weights (random, timm's pretrained, or model.weights)."""
    name = timm_name(mcfg.arch)
    if mcfg.pretrained and name is None:
        raise UserError(f"model.pretrained needs a timm model (timm/<name>); '{mcfg.arch}' has no pretrained weights "
                        "here: use model.weights=PATH for a toolkit run's weights")
    if name is not None and mcfg.pretrained:
        model = create_timm(name, num_classes, True, mcfg.weights)
        log.info("model %s: timm's pretrained weights%s; classifier made for %d classes", mcfg.arch,
                 f" from {mcfg.weights}" if mcfg.weights else "", num_classes)
        return model
    model = create_model(mcfg.arch, num_classes, image_size)
    if mcfg.weights:
        load_matching(model, read_safetensors(mcfg.weights), mcfg.weights)
    return model


def classifier_prefixes(model: nn.Module, num_classes: int) -> list[str]:
    """Module names of the classifier: timm's pretrained_cfg['classifier'], else the last Linear to the classes."""
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    names = pcfg.get("classifier")
    if names:
        return [names] if isinstance(names, str) else list(names)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return last[-1:]


def is_head(param_name: str, heads: list[str]) -> bool:
    return any(param_name == h or param_name.startswith(h + ".") for h in heads)
