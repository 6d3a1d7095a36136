"""Tests of pipeline.optim: the polynomial learning-rate decay."""

import pytest
import torch

from pipeline.optim import PolynomialDecay


def test_polynomial_decay_matches_torch_and_resumes_to_a_longer_run():
    param = [torch.nn.Parameter(torch.zeros(1))]
    ours, torchs = torch.optim.SGD(param, lr=0.1), torch.optim.SGD(param, lr=0.1)
    a, b = PolynomialDecay(ours, 4, 0.9), torch.optim.lr_scheduler.PolynomialLR(torchs, total_iters=4, power=0.9)
    for _ in range(4):
        assert ours.param_groups[0]["lr"] == pytest.approx(torchs.param_groups[0]["lr"], rel=1e-12)
        ours.step(), torchs.step(), a.step(), b.step()
    assert ours.param_groups[0]["lr"] == 0.0
    longer = torch.optim.SGD(param, lr=0.1)
    c = PolynomialDecay(longer, 8, 0.9)
    longer.load_state_dict(ours.state_dict())  # lr 0, as the finished run left it
    c.load_state_dict(a.state_dict())
    assert c.last_epoch == 4 and longer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**0.9, rel=1e-12)
