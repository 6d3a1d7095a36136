"""The performance paths: channels-last, inference mode, mixed precision; CUDA where there is one.

On a CPU-only machine the CUDA tests skip, and the same code paths run on CPU instead
(autocast with bfloat16, channels-last tiles), checked for dtype, shape and closeness to float32.
"""

import pytest
import torch

from pipeline.inferers import OverlapTileInferer
from pipeline.losses import make_loss
from pipeline.networks import UNet

CUDA = torch.cuda.is_available()
FEATURES = [8, 16, 32, 64, 128]


def nets():
    torch.manual_seed(0)
    net = UNet(features=FEATURES).eval()
    cl = UNet(features=FEATURES).eval()
    cl.load_state_dict(net.state_dict())
    return net, cl.to(memory_format=torch.channels_last)


def test_channels_last_network_gets_channels_last_tiles_and_same_output():
    net, cl = nets()
    seen = []
    cl.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.rand(2, 1, 150, 170)
    ref = OverlapTileInferer(tile_size=68)(x, net)
    out = OverlapTileInferer(tile_size=68)(x, cl)
    assert seen and all(seen)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert out.dtype == torch.float32 and not out.is_inference()  # callers may change it in place
    out += 1


def test_autocast_bfloat16_on_cpu_is_float32_and_close():
    net, _ = nets()
    x = torch.rand(1, 1, 100, 120)
    ref = OverlapTileInferer(tile_size=52)(x, net)
    out = OverlapTileInferer(tile_size=52, amp=True)(x, net)
    assert out.shape == ref.shape == (1, 2, 100, 120) and out.dtype == torch.float32
    assert not torch.equal(out, ref)  # bf16 really ran
    assert torch.allclose(out.softmax(1), ref.softmax(1), atol=0.05)
    agree = (out.argmax(1) == ref.argmax(1)).float().mean()
    assert agree > 0.97


def test_training_step_with_autocast_and_channels_last_on_cpu():
    """The trainer's AMP step (autocast forward, float32 loss, backward) on CPU in bfloat16."""
    _, net = nets()
    net.train()
    loss_fn = make_loss("dice_ce", 2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.rand(2, 1, 188, 188).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(2, 1, 4, 4) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 2, 4, 4)
    loss = loss_fn(logits.float(), y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    opt.step()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_inference_matches_cpu():
    net, _ = nets()
    x = torch.rand(1, 1, 300, 260)
    ref = OverlapTileInferer(tile_size=132)(x, net)
    gpu = net.cuda().to(memory_format=torch.channels_last)
    fp32 = OverlapTileInferer(tile_size=132, amp=False)(x.cuda(), gpu)
    torch.testing.assert_close(fp32.cpu(), ref, rtol=0, atol=1e-3)  # TF32 may be on
    mixed = OverlapTileInferer(tile_size=132)(x.cuda(), gpu)  # bf16 autocast by default on CUDA
    assert mixed.dtype == torch.float32 and (mixed.argmax(1).cpu() == ref.argmax(1)).float().mean() > 0.97


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_amp_training_step():
    torch.manual_seed(0)
    net = UNet(features=FEATURES).cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), 0.01, momentum=0.99)
    loss_fn = make_loss("weighted_ce", 2)
    x = torch.rand(2, 1, 188, 188, device="cuda")
    target = torch.stack([(torch.rand(2, 4, 4, device="cuda") > 0.5).float(), torch.ones(2, 4, 4, device="cuda")], 1)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(net(x).float(), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
