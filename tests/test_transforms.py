import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from pipeline.losses import make_loss, output_channels
from pipeline.transforms import BinarizeMask, BinarizeMaskd, LogitsToOneHot


@pytest.mark.parametrize(
    "mask, kwargs, expected",
    [
        ([[0, 255], [255, 0]], {}, [[0, 1], [1, 0]]),
        ([[0, 1], [1, 1]], {}, [[0, 1], [1, 1]]),
        ([[False, True], [False, False]], {}, [[0, 1], [0, 0]]),
        ([[0, 128], [128, 0]], {}, [[0, 1], [1, 0]]),
        ([[0, 0], [0, 0]], {}, [[0, 0], [0, 0]]),
        ([[0, 255], [255, 0]], {"invert": True}, [[1, 0], [0, 1]]),
        ([[0, 3], [7, 12]], {"threshold": 5}, [[0, 0], [1, 1]]),
        ([[0, 3], [7, 12]], {"foreground_values": [3, 12]}, [[0, 1], [0, 1]]),
    ],
)
def test_binarize(mask, kwargs, expected):
    out = BinarizeMask(**kwargs)(np.array(mask)[None])
    assert out.dtype == torch.float32
    assert out.tolist() == [expected]


def test_binarize_colour_masks():
    grey_as_rgb = np.stack([np.array([[0, 255], [255, 0]])] * 3)
    assert BinarizeMask()(grey_as_rgb).tolist() == [[[0, 1], [1, 0]]]
    rgb = np.zeros((3, 2, 2), dtype=np.uint8)
    rgb[0, 0, 0] = 255  # red pixel
    rgb[1, 1, 1] = 255  # green pixel
    with pytest.raises(ValueError, match="3 channels that differ"):
        BinarizeMask()(rgb)
    assert BinarizeMask(foreground_values=[[255, 0, 0]])(rgb).tolist() == [[[1, 0], [0, 0]]]


def test_binarize_errors_name_the_file():
    labels = MetaTensor(torch.tensor([[[0, 1], [2, 3]]]), meta={"filename_or_obj": "/data/lab_007.tif"})
    with pytest.raises(ValueError, match="/data/lab_007.tif: cannot binarize a mask with 4 distinct values \\(0, 1, 2, 3\\)"):
        BinarizeMaskd("label")({"label": labels})
    with pytest.raises(ValueError, match="either threshold or foreground_values"):
        BinarizeMask(threshold=1, foreground_values=[2])


def test_logits_to_one_hot():
    softmax_logits = torch.tensor([[[2.0, -1.0]], [[1.0, 3.0]]])  # (2, 1, 2)
    assert LogitsToOneHot()(softmax_logits).tolist() == [[[1.0, 0.0]], [[0.0, 1.0]]]
    sigmoid_logits = torch.tensor([[[-0.5, 0.5]]])
    assert LogitsToOneHot()(sigmoid_logits).tolist() == [[[1.0, 0.0]], [[0.0, 1.0]]]


def test_losses_on_hand_computable_cases():
    label = torch.tensor([[[[0.0, 1.0]]]])  # (B=1, 1, 1, 2)
    bce = make_loss("bce", out_channels=1)
    logits = torch.tensor([[[[0.0, 2.0]]]])
    expected = (np.log(2) + np.log(1 + np.exp(-2.0))) / 2
    assert bce(logits, label).item() == pytest.approx(expected, rel=1e-6)
    # dice_ce with perfect, confident logits: CE ~ 0 and Dice loss ~ 0
    dice_ce = make_loss("dice_ce", out_channels=2)
    confident = torch.tensor([[[[20.0, -20.0]], [[-20.0, 20.0]]]])
    assert dice_ce(confident, label).item() == pytest.approx(0.0, abs=1e-4)
    # uniform logits: CE = log 2; soft Dice = 1 - (2*0.5*1 + 1e-5)/(0.5*2 + 1 + 1e-5) per class = 0.5
    uniform = torch.zeros(1, 2, 1, 2)
    assert dice_ce(uniform, label).item() == pytest.approx(np.log(2) + 0.5, abs=1e-4)


def test_loss_names_and_channels():
    assert output_channels("bce") == 1 and output_channels("dice_ce") == 2
    with pytest.raises(ValueError, match="unknown loss 'dice'; valid choices: dice_ce, bce, weighted_ce"):
        make_loss("dice")
    with pytest.raises(ValueError, match="needs 1 output channel, but the network has 2"):
        make_loss("bce", out_channels=2)


def test_normalize_sections_one_by_one():
    from monai.transforms import NormalizeIntensity

    from pipeline.transforms import NormalizeSectionsd

    stack = torch.rand(1, 3, 5, 6) * torch.tensor([1.0, 10.0, 100.0])[:, None, None] + torch.tensor([0.0, 5.0, -7.0])[:, None, None]
    stack[0, 2] = 4.0  # a constant section
    out = NormalizeSectionsd("image")({"image": stack})["image"]
    for z in range(2):
        assert torch.allclose(out[0, z], NormalizeIntensity()(stack[0, z]), atol=1e-5)
    assert torch.equal(out[0, 2], torch.zeros(5, 6))
    image = torch.rand(2, 4, 4) * 3
    assert torch.allclose(NormalizeSectionsd("image")({"image": image})["image"], NormalizeIntensity(channel_wise=True)(image), atol=1e-5)
