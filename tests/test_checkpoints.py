"""Tests of pipeline.checkpoints: checkpoints record the network's architecture; loading compares it,
older checkpoints without the record still load, and inference builds the network a checkpoint records."""

import numpy as np
import pytest
import tifffile
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.io import read_image
from pipeline.networks import UNet
from pipeline.synthetic import make_stack, to_uint8

from conftest import FEATURES, infer, tiny_net


# ------------------------------------------------------------------ checkpoints record the architecture
def test_checkpoints_record_the_architecture_and_older_ones_still_load(tmp_path):
    state = tiny_net(padding="same", norm="batch").state_dict()
    assert state["_extra_state"] == {"architecture": {
        "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": FEATURES, "padding": "same",
        "norm": "batch", "convs_per_level": 2, "kernel_size": 3}}
    torch.save(state, tmp_path / "same.pt")
    with pytest.raises(ValueError, match=r"padding: checkpoint 'same', network 'valid'; norm: checkpoint 'batch', network 'instance'"):
        load_checkpoint(UNet(features=FEATURES, norm="instance"), tmp_path / "same.pt")  # instance norm: no buffers
    legacy = {k: v for k, v in tiny_net().state_dict().items() if k != "_extra_state"}  # saved before the record
    torch.save(legacy, tmp_path / "legacy.pt")
    loaded = load_checkpoint(UNet(features=FEATURES), tmp_path / "legacy.pt")
    assert torch.equal(loaded.head.weight, legacy["head.weight"])


@pytest.mark.slow
def test_inference_builds_the_network_the_checkpoint_records(tmp_path):
    """No network keys at inference: a same-padded, batch-normalised, 1-channel checkpoint is predicted
    as that network (equal to OverlapTileInferer on it); a legacy checkpoint with --architecture."""
    from pipeline.checkpoints import network_from_checkpoint
    from pipeline.inferers import OverlapTileInferer
    from pipeline.transforms import NormalizeSectionsd, foreground_probability

    net = tiny_net(padding="same", norm="batch", out_channels=1)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    stack = to_uint8(make_stack((2, 40, 44), seed=7)[0])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    proc = infer(tmp_path, "--input_path", str(tmp_path / "stack.tif"), "--write", "['probabilities']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, _ = read_image(tmp_path / "out/probabilities/stack.tif")
    x = NormalizeSectionsd(keys="x")({"x": torch.from_numpy(stack[None].astype(np.float32))})["x"]
    want = foreground_probability(OverlapTileInferer()(x[None], net)[0]).numpy()
    assert got.shape == (2, 40, 44) and np.abs(got - want).max() <= 1e-5

    legacy = {k: v for k, v in tiny_net().state_dict().items() if k != "_extra_state"}
    torch.save(legacy, tmp_path / "legacy.pt")
    with pytest.raises(ValueError, match=r"legacy.pt' records no architecture"):
        network_from_checkpoint(tmp_path / "legacy.pt")
    rebuilt = network_from_checkpoint(tmp_path / "legacy.pt", {"features": FEATURES})
    assert not rebuilt.training and torch.equal(rebuilt.head.weight, legacy["head.weight"])
