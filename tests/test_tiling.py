"""Property tests (hypothesis): for any valid geometry and image size, the tile plan writes every
output pixel exactly once and overlap-tile inference returns the input's shape (and, for an
identity-like valid network, the input itself)."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.geometry import UNetGeometry
from pipeline.inferers import OverlapTileInferer
from pipeline.tiling import plan_tiles, tile_regions

from conftest import CentreCrop

geometries = st.builds(
    UNetGeometry,
    depth=st.integers(0, 4),
    convs_per_level=st.integers(1, 3),
    kernel_size=st.sampled_from([1, 3, 5]),
    padding=st.just("valid"),
)


@st.composite
def plans(draw):
    g = draw(geometries)
    size = draw(st.integers(1, 700))
    first = g.min_input_size - 2 * g.margin
    first += max(0, -(-(g.step - first) // g.step)) * g.step  # tiles of at least one step
    tile = first + g.step * draw(st.integers(0, 20))
    return g, size, tile


@settings(max_examples=300, deadline=None)
@given(plans())
def test_every_output_pixel_written_exactly_once(plan):
    g, size, tile = plan
    assert g.is_valid(tile + 2 * g.margin)
    starts = plan_tiles([size], [tile], g.step)[0]
    assert all(p % g.step == 0 for p in starts)  # on the pooling grid
    count = np.zeros(size, int)
    for p, keep in tile_regions(size, starts, tile):
        assert 0 < keep <= tile
        count[p : p + keep] += 1
    assert (count == 1).all()


@settings(max_examples=60, deadline=None)
@given(geometries.filter(lambda g: g.margin <= 60 and g.depth <= 3), st.integers(1, 90), st.integers(1, 90),
       st.integers(0, 3), st.sampled_from(["reflect", "symmetric", "replicate", "constant"]))
def test_inference_keeps_shape_and_identity(g, h, w, extra, mode):
    net = CentreCrop(g, scale=1.0)
    first = g.min_input_size - 2 * g.margin
    first += max(0, -(-(g.step - first) // g.step)) * g.step
    x = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    y = OverlapTileInferer(tile_size=first + extra * g.step, batch_size=3, padding_mode=mode)(x, net)
    assert y.shape == x.shape
    assert torch.equal(y, x)
