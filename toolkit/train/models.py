"""Model registry: `create_model(arch, num_classes, image_size)`.

Every model takes a normalised float batch (B, 3, H, W) and returns logits (B, num_classes).
Register a new one with @register_model; tests, `toolkit models` and the docs enumerate
the registry, so a registered model is tested for free.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from toolkit import UserError
from toolkit.train.catalog import check_arch

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register `fn(num_classes, image_size=32) -> nn.Module` under its function name.
    Raises ValueError when the name is taken (a silent replacement would change what a config trains)."""
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"a model named '{fn.__name__}' is already registered ({_REGISTRY[fn.__name__].__module__})")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> dict[str, str]:
    """Registered names -> first line of their docstring."""
    return {name: (fn.__doc__ or "").strip().partition("\n")[0] for name, fn in sorted(_REGISTRY.items())}


def timm_name(arch: str) -> str | None:
    """`timm/<name>` -> name; a bare name timm knows (and the registry does not) -> name; else None."""
    if arch.startswith("timm/"):
        return arch[len("timm/"):]
    if arch in _REGISTRY:
        return None
    try:
        import timm
    except ImportError:
        return None
    return arch if timm.is_model(arch) else None


def create_model(arch: str, num_classes: int, image_size: int = 32) -> nn.Module:
    """Build a fresh model. `timm/<name>` (or a bare timm name) builds a timm model (needs the timm extra)."""
    check_arch(arch, list_models())  # the same message as the torch-free check of `toolkit train`
    name = timm_name(arch)
    if name is not None:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    return _REGISTRY[arch](num_classes=num_classes, image_size=image_size)


# --- the classic PyTorch CIFAR-10 tutorial network -------------------------------------------


class TutorialNet(nn.Module):
    """conv 5x5 -> pool -> conv 5x5 -> pool -> fc 120 -> fc 84 -> fc classes, ReLU."""

    def __init__(self, num_classes: int, image_size: int = 32, batch_norm: bool = False):
        super().__init__()
        side = ((image_size - 4) // 2 - 4) // 2  # spatial size after both conv+pool: 5 at 32 px
        if side < 1:
            raise UserError(f"tutorial_net needs data.image_size >= 16; got {image_size}")
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.bn1 = nn.BatchNorm2d(6) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.bn2 = nn.BatchNorm2d(16) if batch_norm else nn.Identity()
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(16 * side * side, 120)  # 400 -> 120 at 32 px, as in the tutorial
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


@register_model
def tutorial_net(num_classes: int, image_size: int = 32) -> nn.Module:
    """The classic PyTorch CIFAR-10 tutorial CNN (62k parameters at 10 classes)."""
    return TutorialNet(num_classes, image_size, batch_norm=False)


@register_model
def tutorial_net_bn(num_classes: int, image_size: int = 32) -> nn.Module:
    """The tutorial CNN with BatchNorm after each convolution: trains faster and steadier."""
    return TutorialNet(num_classes, image_size, batch_norm=True)


# --- residual networks for small images ------------------------------------------------------


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, stride)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A ResNet for small images: 3x3 stem, one BasicBlock per stage, global average pool."""

    def __init__(self, num_classes: int, widths=(32, 64, 128)):
        super().__init__()
        self.stem = conv_bn(3, widths[0])
        stages, c = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(BasicBlock(c, w, stride=1 if i == 0 else 2))
            c = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register_model
def resnet_small(num_classes: int, image_size: int = 32) -> nn.Module:
    """Small residual CNN (32-64-128 channels, 0.7M parameters); any image size."""
    return ResNetSmall(num_classes, widths=(32, 64, 128))


# --- the CIFAR-10 speed-run network ----------------------------------------------------------
# After the airbench94 design (Keller Jordan, building on hlb-CIFAR10 and Page's ResNet-9 work):
# a 2x2 patch-whitening stem, three conv groups of widths 64-256-256, each conv initialised as
# the identity on its first input channels (an implicit residual: the deep stack starts out as
# a shallow one), BatchNorm with a fixed scale, GELU, global max pool and a 1/9-scaled linear
# head. Published: 94% CIFAR-10 test accuracy in about 10 epochs with the rest of that recipe.


def _dirac_conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(c_in, c_out)])  # identity on the first c_in output channels
    return conv


def _norm(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)  # fast-moving statistics for short runs
    bn.weight.requires_grad_(False)  # scale fixed at 1; the following layer rescales anyway
    return bn


class SpeedrunGroup(nn.Module):
    """conv 3x3 -> max-pool 2 (when `pool`) -> BN -> GELU -> conv 3x3 -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int, pool: bool = True):
        super().__init__()
        self.conv1, self.norm1 = _dirac_conv(c_in, c_out), _norm(c_out)
        self.conv2, self.norm2 = _dirac_conv(c_out, c_out), _norm(c_out)
        self.pool, self.act = nn.MaxPool2d(2) if pool else nn.Identity(), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class SpeedrunNet(nn.Module):
    """The speed-run CNN; `init_from_data` turns the stem into a fixed patch-whitening layer."""

    def __init__(self, num_classes: int, widths=(64, 256, 256), patch: int = 2, image_size: int = 32):
        super().__init__()
        self.patch = patch
        self.stem = nn.Conv2d(3, 2 * 3 * patch * patch, patch, bias=True)  # 24 channels: +/- 12 directions
        self.stem.weight.requires_grad_(False)  # a fixed filter bank (set by init_from_data); its bias learns
        groups, c, side = [], self.stem.out_channels, image_size - patch + 1
        for w in widths:
            pool = side >= 4  # small images (8 px digits) keep their last pixels: fewer pools, same widths
            groups.append(SpeedrunGroup(c, w, pool))
            c, side = w, side // 2 if pool else side
        self.groups = nn.Sequential(*groups)
        self.head = nn.Linear(c, num_classes, bias=False)
        self.scale = 1 / 9  # small logits at the start: a steadier first epoch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(nn.functional.gelu(self.stem(x)))
        x = torch.amax(x, dim=(2, 3))  # global max pool
        return self.head(x) * self.scale

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten 2x2 patches of `x` (normalised (N, 3, H, W)) and freeze its weight."""
        p = self.patch
        patches = x.float().unfold(2, p, 1).unfold(3, p, 1)  # (N, 3, H', W', p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * p * p)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
        w = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, 3, p, p)
        self.stem.weight.copy_(torch.cat([w, -w]).to(self.stem.weight.dtype))
        self.stem.weight.requires_grad_(False)


def _speedrun(num_classes: int, image_size: int, widths) -> nn.Module:
    if image_size < 8:  # a 2x2 stem and 3x3 convolutions need a few pixels
        raise UserError(f"speedrun_net needs data.image_size >= 8; got {image_size}")
    return SpeedrunNet(num_classes, widths, image_size=image_size)


@register_model
def speedrun_net(num_classes: int, image_size: int = 32) -> nn.Module:
    """CIFAR-10 speed-run CNN (airbench94 design, 2.0M parameters): the fast GPU recipe; any size >= 8."""
    return _speedrun(num_classes, image_size, (64, 256, 256))


@register_model
def speedrun_net_s(num_classes: int, image_size: int = 32) -> nn.Module:
    """speedrun_net at half width (32-128-128, 0.5M parameters): a quarter of the compute, for CPUs."""
    return _speedrun(num_classes, image_size, (32, 128, 128))


@register_model
def speedrun_net_xs(num_classes: int, image_size: int = 32) -> nn.Module:
    """speedrun_net at quarter width (16-64-64, 0.13M parameters): a sixteenth of the compute."""
    return _speedrun(num_classes, image_size, (16, 64, 64))
