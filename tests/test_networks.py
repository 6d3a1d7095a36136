import math

import pytest
import torch

from pipeline.networks import UNet


def test_paper_network():
    net = UNet()
    assert sum(p.numel() for p in net.parameters()) == 31_030_658
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs) == 23
    assert net.margin == 92
    # He init: std sqrt(2 / (k^2 * in_channels)); the 128->128 3x3 conv has N = 1152
    w = net.encoder[1][2].weight
    assert w.shape == (128, 128, 3, 3)
    assert abs(w.std().item() - math.sqrt(2 / 1152)) < 0.002
    assert net.encoder[1][2].bias.abs().max() == 0


@pytest.mark.slow
def test_paper_572_to_388():
    net = UNet().eval()
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, 572, 572)).shape == (1, 2, 388, 388)


@pytest.mark.parametrize(
    "dims, padding, norm, size, out",
    [
        (2, "valid", None, (60, 76), (20, 36)),
        (2, "same", "batch", (37, 50), (37, 50)),
        (3, "valid", "instance", (44, 52, 60), (4, 12, 20)),
        (3, "same", None, (9, 17, 20), (9, 17, 20)),
    ],
)
def test_shapes(dims, padding, norm, size, out):
    net = UNet(spatial_dims=dims, in_channels=2, out_channels=3, features=(4, 8, 16), padding=padding, norm=norm)
    assert net(torch.randn(2, 2, *size)).shape == (2, 3, *out)
    has_bias = [m.bias is not None for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert all(has_bias[:-1]) == (norm is None) and has_bias[-1]  # head keeps its bias


def test_skip_crop_is_centred():
    """With depth 1, zero up-conv weights and identity-like first block, the decoder sees
    only the cropped skip; an arange input tells exactly which window was kept."""
    net = UNet(out_channels=1, features=(2, 2), convs_per_level=1, kernel_size=3, dropout=0.0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.zero_()
                m.bias.zero_()
        net.encoder[0][0].weight[0, 0, 1, 1] = 1.0  # centre tap: x[1:-1, 1:-1]
        net.decoder[0][0].weight[0, 0, 1, 1] = 1.0  # reads the skip channel (first in the concat)
        net.head.weight.fill_(1.0)
    x = torch.arange(14 * 18, dtype=torch.float32).reshape(1, 1, 14, 18)
    # 14 -> 12 (conv) -> 6 (pool) -> 4 (conv) -> 8 (up) ; skip 12 cropped to 8 (2 each side) ; conv -> 6
    y = net(x)
    skip = x[0, 0, 1:-1, 1:-1]
    expected = skip[2:-2, 2:-2][1:-1, 1:-1]
    assert y.shape == (1, 1, 6, 10)
    assert torch.equal(y[0, 0], expected)


def test_dropout_only_in_training():
    net = UNet(features=(2, 4), dropout=0.5)
    x = torch.randn(1, 1, 64, 64)
    net.eval()
    assert torch.equal(net(x), net(x))
    net.train()
    torch.manual_seed(0)
    a = net(x)
    torch.manual_seed(1)
    assert not torch.equal(a, net(x))


def test_bad_input():
    with pytest.raises(ValueError, match="norm must be one of \\(None, 'batch', 'instance'\\)"):
        UNet(norm="group")
    with pytest.raises(ValueError, match="padding must be one of"):
        UNet(padding="full")
    net = UNet(features=(2, 4, 8))
    with pytest.raises(ValueError, match="expected 1 input channel\\(s\\), got 3"):
        net(torch.zeros(1, 3, 60, 60))
    with pytest.raises(ValueError, match="nearest valid: 60 or 64"):
        net(torch.zeros(1, 1, 60, 61))
    with pytest.raises(ValueError, match="2 spatial dims"):
        net(torch.zeros(1, 1, 60, 60, 60))
