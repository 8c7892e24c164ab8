import pytest
import torch

from toolkit import UserError
from toolkit.train.models import create_model, list_models

ALL = sorted(list_models())


def test_registry_has_the_promised_models():
    assert {"tutorial_net", "tutorial_net_bn", "resnet_small"} <= set(ALL)


@pytest.mark.parametrize("arch", ALL)
@pytest.mark.parametrize("size", [32, 48])
def test_forward_shape_and_every_parameter_learns(arch, size):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7, image_size=size)
    x = torch.randn(4, 3, size, size)
    out = model(x)
    assert out.shape == (4, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:  # frozen by design (e.g. BatchNorm scales fixed at 1)
            continue
        assert p.grad is not None, f"{arch}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{arch}: {name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{arch}: {name} has an all-zero gradient"


def test_tutorial_net_is_the_classic_network():
    m = create_model("tutorial_net", 10)
    assert (m.conv1.in_channels, m.conv1.out_channels, m.conv1.kernel_size) == (3, 6, (5, 5))
    assert (m.conv2.in_channels, m.conv2.out_channels, m.conv2.kernel_size) == (6, 16, (5, 5))
    assert [(l.in_features, l.out_features) for l in (m.fc1, m.fc2, m.fc3)] == [(400, 120), (120, 84), (84, 10)]
    assert sum(p.numel() for p in m.parameters()) == 62006
    bn = create_model("tutorial_net_bn", 10)
    assert isinstance(bn.bn1, torch.nn.BatchNorm2d) and isinstance(bn.bn2, torch.nn.BatchNorm2d)


def test_unknown_arch_suggests_a_name():
    with pytest.raises(UserError, match="did you mean 'resnet_small'"):
        create_model("resnet_smal", 10)
    with pytest.raises(UserError, match="image_size >= 16"):
        create_model("tutorial_net", 10, image_size=12)


def test_timm_models_by_name():
    pytest.importorskip("timm")
    model = create_model("timm/resnet10t", num_classes=5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(UserError, match="timm/no_such_model"):
        create_model("timm/no_such_model", 5)


def test_speedrun_stem_whitens_patches():
    torch.manual_seed(0)
    model = create_model("speedrun_net", 10)
    mix = torch.tensor([[1.0, 0.9, 0.8], [0.0, 0.3, 0.1], [0.0, 0.0, 0.2]])  # strongly correlated channels
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16))
    model.init_from_data(x)
    assert not model.stem.weight.requires_grad
    out = torch.nn.functional.conv2d(x, model.stem.weight[:12])  # the + half, no bias
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = flat @ flat.T / flat.shape[1]
    torch.testing.assert_close(cov, torch.eye(12), atol=0.05, rtol=0)
    assert model(x[:2]).shape == (2, 10)


def test_a_model_without_docstring_is_listed():
    from toolkit.train import models

    @models.register_model
    def bare_model(num_classes, image_size=32):
        return torch.nn.Linear(3, num_classes)

    try:
        assert list_models()["bare_model"] == ""
        with pytest.raises(ValueError, match="'bare_model' is already registered"):
            models.register_model(bare_model)
        with pytest.raises(ValueError, match="'tutorial_net' is already registered"):

            @models.register_model
            def tutorial_net(num_classes, image_size=32):
                return torch.nn.Linear(3, num_classes)
        assert models._REGISTRY["tutorial_net"].__module__ == "toolkit.train.models"  # the original stays
    finally:
        del models._REGISTRY["bare_model"]


def test_the_torch_free_catalog_lists_exactly_the_registry():
    from toolkit.train.catalog import builtin_models

    assert builtin_models() == list_models()
