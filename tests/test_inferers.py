"""Exactness of overlap-tile inference: stitched tiles equal one pass over the padded image."""

import numpy as np
import pytest
import torch
from monai.apps.pathology.inferers import SlidingWindowHoVerNetInferer
from torch import nn

from pipeline.geometry import UNetGeometry
from pipeline.inferers import OverlapTileInferer
from pipeline.tiling import auto_tile_size, mirror_pad, plan_tiles
from pipeline.networks import UNet

from conftest import CentreCrop


def whole_pass(net, x):
    """One forward pass over the image mirror-padded to the next valid size, cropped back."""
    g, m = net.geometry, net.geometry.margin
    size = x.shape[2:]
    padded_size = g.nearest_valid_input_size([s + 2 * m for s in size])
    p = mirror_pad(x, [(m, ps - s - m) for ps, s in zip(padded_size, size)])
    return net(p)[(..., *[slice(0, s) for s in size])]


def test_mirror_pad_matches_numpy():
    a = np.arange(5 * 3, dtype=np.float32).reshape(1, 5, 3)
    for mode, np_mode in [("reflect", "reflect"), ("symmetric", "symmetric"), ("replicate", "edge"), ("constant", "constant")]:
        got = mirror_pad(torch.from_numpy(a), [(7, 2), (4, 6)], mode).numpy()
        assert np.array_equal(got, np.pad(a, [(0, 0), (7, 2), (4, 6)], mode=np_mode)), mode


def test_identity_network_returns_input_exactly():
    net = CentreCrop()
    x = torch.arange(2 * 53 * 71, dtype=torch.float32).reshape(2, 1, 53, 71)
    for tile in (20, (12, 28), "auto"):
        y = OverlapTileInferer(tile_size=tile, batch_size=3)(x, net)
        assert torch.equal(y, 2 * x), tile


def test_tta_is_inverted_exactly():
    net = CentreCrop()
    x = torch.arange(37 * 45, dtype=torch.float32).reshape(1, 1, 37, 45)  # not square
    assert torch.equal(OverlapTileInferer(tile_size=20, tta=True)(x, net), 2 * x)


def test_stack_through_2d_network_slice_by_slice():
    net = CentreCrop()
    x = torch.randn(1, 1, 5, 30, 41)
    y = OverlapTileInferer(tile_size=12, batch_size=8)(x, net)
    assert torch.equal(y, 2 * x)


def test_paper_width_network_exact():
    torch.manual_seed(0)
    net = UNet().eval()
    x = torch.rand(1, 1, 70, 90)
    with torch.inference_mode():
        tiled = OverlapTileInferer(tile_size=36, batch_size=2)(x, net)
        ref = whole_pass(net, x)
    assert tiled.shape == (1, 2, 70, 90)
    assert (tiled - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("size, tile", [((150, 237), 52), ((301, 170), "auto"), ((99, 64), (36, 20)), ((10, 13), 36)])
def test_narrow_network_exact_2d(size, tile):
    torch.manual_seed(1)
    net = UNet(features=(4, 8, 16, 32, 64)).eval()
    x = torch.randn(2, 1, *size)
    with torch.inference_mode():
        diff = (OverlapTileInferer(tile_size=tile, batch_size=3)(x, net) - whole_pass(net, x)).abs().max().item()
    assert diff <= 1e-4


def test_narrow_network_exact_3d():
    torch.manual_seed(2)
    net = UNet(spatial_dims=3, features=(4, 8, 16)).eval()  # margin 20, step 4
    x = torch.randn(1, 1, 13, 30, 41)
    with torch.inference_mode():
        tiled = OverlapTileInferer(tile_size=(8, 12, 16), batch_size=4)(x, net)
        ref = whole_pass(net, x)
    assert tiled.shape == (1, 2, 13, 30, 41)
    assert (tiled - ref).abs().max().item() <= 1e-4


def test_agrees_with_monai_hovernet_inferer_on_aligned_windows():
    """MONAI's SlidingWindowHoVerNetInferer, windows placed on the pooling grid, gives the
    same result; on unaligned windows it cannot (max-pooling is only 16-pixel shift equivariant)."""
    torch.manual_seed(3)
    net = UNet(features=(4, 8, 16, 32, 64)).eval()
    m = net.margin
    x = torch.randn(1, 1, 164, 196)  # padded: 220 + 32 * k, windows of 220 every 32 px
    # it pads its window outputs with `padding_mode`, so mirror the image ourselves
    hover = SlidingWindowHoVerNetInferer(roi_size=220, sw_batch_size=4, overlap=1 - 32.5 / 220)
    with torch.inference_mode():
        ours = OverlapTileInferer(tile_size=36)(x, net)
        theirs = hover(mirror_pad(x, [(m, m), (m, m)]), net)[..., m:-m, m:-m]
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_same_padded_network_with_context():
    net = UNet(features=(4, 8, 16), padding="same", norm="batch").eval()
    x = torch.randn(1, 1, 100, 90)
    with torch.inference_mode():
        y = OverlapTileInferer(tile_size=32, context=24)(x, net)
        # tiles see 24 px of context; far from tile borders they agree with a whole pass
        assert y.shape == (1, 2, 100, 90)
        assert (y - net(x))[..., 40:60, 40:60].abs().max() < 1e-4


def test_tile_plan_and_auto():
    assert plan_tiles((512, 4096), (516, 516), 16) == [(0,), tuple(range(0, 3585, 512))]
    paper = UNetGeometry()
    assert auto_tile_size((512, 4096), paper, 92, 700**2) == (516, 516)
    assert auto_tile_size((100,), paper, 92, 10**6) == (100,)  # 100 = 4 + 6 * 16 is valid
    # the default 1024 MB budget at paper width (64 channels on top) allows a 700 px input tile:
    # one 516 tile covers a 512 slice (computed / needed input pixels (700 / 512)^2, the minimum)
    default_cap = 1024 * 2**20 // (4 * 6 * 64)
    assert auto_tile_size((512, 512), paper, 92, default_cap) == (516, 516)


def test_bad_input():
    net = CentreCrop()
    with pytest.raises(ValueError, match="not a valid output size.*nearest larger valid tile: \\(20, 20\\)"):
        OverlapTileInferer(tile_size=17)(torch.zeros(1, 1, 30, 30), net)
    with pytest.raises(ValueError, match="empty input"):
        OverlapTileInferer()(torch.zeros(1, 1, 0, 30), net)
    with pytest.raises(ValueError, match="expects 1 input channel"):
        OverlapTileInferer()(torch.zeros(1, 3, 30, 30), net)
    nan = torch.zeros(1, 1, 30, 30)
    nan[0, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite pixel"):
        OverlapTileInferer()(nan, net)
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        OverlapTileInferer(padding_mode="wrap")


def bn_net():
    """A small valid BatchNorm U-Net whose stored statistics are far from any input's."""
    torch.manual_seed(0)
    net = UNet(features=(4, 8, 16), norm="batch", dropout=0.0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-3, 3)
            m.running_var.uniform_(0.2, 5)
    return net.eval()


def test_adapt_norm_uses_the_inputs_own_statistics_and_restores_the_network():
    net = bn_net()
    x = 5 + 3 * torch.randn(1, 1, 40, 40, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    momenta = [m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    tile = 44  # one output tile covers the image: a single estimation batch
    got = OverlapTileInferer(tile_size=tile, adapt_norm=True)(x, net)
    # the same network with each BatchNorm's statistics taken from that one tile (momentum 1)
    ref = UNet(features=(4, 8, 16), norm="batch", dropout=0.0)
    ref.load_state_dict(state)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0
    m = net.geometry.margin
    with torch.no_grad():  # the tile the inferer cuts: the image mirror-padded to 44 + 2 * margin
        ref.train()(mirror_pad(x, [(m, m + 4)] * 2))
    expected = OverlapTileInferer(tile_size=tile)(x, ref.eval())
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, OverlapTileInferer(tile_size=tile)(x, net), atol=1e-2)  # it did adapt
    # the network is exactly as before: statistics, momenta, eval mode
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items() if isinstance(v, torch.Tensor))
    assert [m.momentum for m in net.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    assert not any(m.training for m in net.modules())


def test_adapt_norm_is_seamless_and_restores_after_an_error():
    from pipeline.inferers import adapted_batchnorm

    net = bn_net().train()  # restored to training mode too
    x = torch.randn(1, 1, 70, 58, generator=torch.Generator().manual_seed(2))
    with adapted_batchnorm(net, lambda: OverlapTileInferer(tile_size=12)(x, net)):
        tiled = OverlapTileInferer(tile_size=12, batch_size=3)(x, net)  # 6 x 5 tiles
        whole = OverlapTileInferer(tile_size=76)(x, net)  # one tile
    # every tile is normalised with the same estimated statistics: no seams
    assert torch.allclose(tiled, whole, atol=1e-5)
    state = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}

    def fail():
        raise RuntimeError("estimation failed")

    with pytest.raises(RuntimeError, match="estimation failed"):
        with adapted_batchnorm(net, fail):
            pass
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items() if isinstance(v, torch.Tensor))
    assert all(m.training for m in net.modules())


def test_extra_arguments_reach_the_network():
    """As MONAI's inferers: ``inferer(x, net, *args, **kwargs)`` calls ``net(tiles, *args, **kwargs)``."""

    class Scaled(CentreCrop):
        def forward(self, x, factor=1.0, *, offset=0.0):
            return super().forward(x) * factor + offset

    x = torch.arange(30 * 34, dtype=torch.float32).reshape(1, 1, 30, 34)
    net = Scaled()
    plain = OverlapTileInferer(tile_size=12)(x, net)
    torch.testing.assert_close(OverlapTileInferer(tile_size=12)(x, net, 3.0, offset=1.0), plain * 3.0 + 1.0)
    torch.testing.assert_close(OverlapTileInferer(tile_size=12, tta=True)(x, net, 3.0, offset=1.0), plain * 3.0 + 1.0)
