"""The paper's border weight map, elastic deformation and weighted cross-entropy on constructed inputs."""

import math

import numpy as np
import pytest
import torch

from pipeline.losses import WeightedCrossEntropy, make_loss
from pipeline.optim import prepare_batch
from pipeline.transforms import BorderWeightMapd, RandElasticGridd, border_weight_map


def two_cells(gap=4):
    """Two cells of 8 columns separated by a membrane `gap` columns wide, on a 9 x (16 + gap) image."""
    fg = np.zeros((9, 16 + gap), bool)
    fg[:, :8] = True
    fg[:, 8 + gap :] = True
    return fg


def test_weight_map_against_hand_values():
    w = border_weight_map(two_cells(4), w0=10, sigma=5, class_balance=False)
    # in the gap d1 + d2 = 5 (e.g. column 8: 1 px to the left cell, 4 to the right one)
    in_gap = 1 + 10 * math.exp(-25 / 50)
    assert w[4, 8:12] == pytest.approx([in_gap] * 4, abs=1e-5)
    # inside the left cell at column 6: d1 = 0, d2 = 6
    assert w[4, 6] == pytest.approx(1 + 10 * math.exp(-36 / 50), abs=1e-5)
    assert w[0, 0] == pytest.approx(1 + 10 * math.exp(-(12**2) / 50), abs=1e-5)  # d2: 12 columns to the right cell


def test_weight_map_class_balance_and_single_cell():
    fg = two_cells(4)  # 144 foreground, 36 background pixels out of 180
    w = border_weight_map(fg, w0=0.0)
    assert w[fg] == pytest.approx(np.full(144, 180 / 288)) and w[~fg] == pytest.approx(np.full(36, 180 / 72))
    one = np.zeros((6, 6), bool)
    one[1:4, 1:4] = True
    assert np.allclose(border_weight_map(one, class_balance=False), 1.0)  # no second cell: no border term


def test_weight_map_transform_writes_weight_key():
    label = torch.from_numpy(two_cells(2)).float()[None]
    out = BorderWeightMapd("label", w0=10, sigma=5)({"label": label})
    assert out["weight"].shape == (1, 9, 18) and out["weight"].dtype == torch.float32
    assert out["weight"][0, 4, 8].item() == pytest.approx(18 * 9 / (2 * 18) + 10 * math.exp(-9 / 50), rel=1e-5)


def test_elastic_reproducible_and_consistent():
    x = torch.arange(40 * 50, dtype=torch.float32).reshape(1, 40, 50)
    label = (x % 7 == 0).float()

    def run(seed, modes=("bicubic", "nearest")):
        t = RandElasticGridd(["image", "label"], sigma=10, mode=list(modes))
        t.set_random_state(seed)
        return t({"image": x, "label": label})

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(a["image"], c["image"])
    assert set(a["label"].unique().tolist()) <= {0.0, 1.0}  # nearest keeps label values
    # one field for all keys: with nearest sampling the label is still "image value % 7 == 0"
    n = run(0, ("nearest", "nearest"))
    assert torch.equal(n["label"], (n["image"] % 7 == 0).float())
    assert not torch.equal(n["image"], x)


def test_elastic_field_statistics():
    t = RandElasticGridd(["image"], sigma=10, grid_size=3)
    t.set_random_state(0)
    draws = []
    for _ in range(200):
        t.randomize(2)
        draws.append(t._coarse)
    coarse = np.stack(draws)
    assert coarse.shape == (200, 2, 3, 3)
    assert coarse.std() == pytest.approx(10, rel=0.05)
    field = t.displacement((64, 80))
    assert torch.allclose(field[:, 0, 0], torch.as_tensor(t._coarse[:, 0, 0], dtype=torch.float32))  # corners interpolate
    assert torch.allclose(field[:, -1, -1], torch.as_tensor(t._coarse[:, -1, -1], dtype=torch.float32))


def test_zero_sigma_is_identity():
    x = torch.rand(1, 21, 17)
    t = RandElasticGridd(["image"], sigma=0.0, mode="bicubic")
    assert torch.allclose(t({"image": x})["image"], x, atol=1e-5)


def test_weighted_cross_entropy_by_hand():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2)
    label = torch.tensor([[[[0.0, 1.0]]]])
    weight = torch.tensor([[[[3.0, 1.0]]]])
    ce0 = math.log(1 + math.exp(-2.0))  # -log softmax(2, 0)[0]
    ce1 = math.log(2.0)
    expected = (3 * ce0 + 1 * ce1) / 2
    loss = make_loss("weighted_ce", out_channels=2)
    assert loss(logits, torch.cat([label, weight], 1)).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="prepare_batch"):
        loss(logits, label)


def test_prepare_batch_joins_weight():
    batch = {"image": torch.zeros(1, 1, 2, 2), "label": torch.ones(1, 1, 2, 2), "weight": torch.full((1, 1, 2, 2), 2.0)}
    image, target = prepare_batch("weighted_ce")(batch, torch.device("cpu"))
    assert target.shape == (1, 2, 2, 2) and target[:, 1].unique().item() == 2.0
    _, plain = prepare_batch("dice_ce")(batch, torch.device("cpu"))
    assert plain.shape == (1, 1, 2, 2)
    logits = torch.zeros(1, 2, 2, 2)  # equal logits: -log p = log 2 at every pixel, weighted by 2
    assert WeightedCrossEntropy()(logits, target).item() == pytest.approx(2.0 * math.log(2.0), rel=1e-6)
