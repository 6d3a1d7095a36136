"""One loss factory for the bundle configs.

Every loss takes logits ``(B, C, *out_spatial)`` and a label of the same spatial size
(the data transforms crop the label to the network's output size once, so a valid
network's smaller output and its label always match here).
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn

LOSSES = ("dice_ce", "bce")


def output_channels(name: str) -> int:
    """Logit channels a loss expects: 1 for ``bce`` (sigmoid), 2 for soft-max losses."""
    _check_name(name)
    return 1 if name == "bce" else 2


def _check_name(name: str) -> None:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid choices: {', '.join(LOSSES)}")


class BCEWithLogits(nn.BCEWithLogitsLoss):
    """``BCEWithLogitsLoss`` that accepts a 0/1 label of any dtype, shape ``(B, 1, *spatial)``."""

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if logits.shape != label.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and label {tuple(label.shape)} differ in shape")
        return super().forward(logits, label.to(logits.dtype))


def make_loss(name: str, out_channels: int | None = None) -> nn.Module:
    """Build a loss by name.

    Args:
        name: ``"dice_ce"`` (MONAI ``DiceCELoss``, soft-max, label of class indices
            ``(B, 1, *spatial)``) or ``"bce"`` (``BCEWithLogitsLoss``, one logit channel).
        out_channels: the network's output channels, checked against the loss.
    """
    _check_name(name)
    expected = output_channels(name)
    if out_channels is not None and (out_channels == 1) != (expected == 1):
        raise ValueError(
            f"loss {name!r} needs {'1 output channel' if expected == 1 else '2 or more output channels'}, "
            f"but the network has {out_channels}"
        )
    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    return BCEWithLogits()
