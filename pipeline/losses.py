"""The losses of the bundle configs (the optimiser and batch preparation are in :mod:`pipeline.optim`).

Every loss takes logits ``(B, C, *out_spatial)`` and a label of the same spatial size
(the data transforms crop the label to the network's output size once, so a valid
network's smaller output and its label always match here).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.losses import DiceCELoss
from torch import nn

from pipeline.labels import check_label_mode

LOSSES = ("dice_ce", "bce", "weighted_ce")


def output_channels(name: str, num_classes: int = 2) -> int:
    """Logit channels a loss expects: 1 for ``bce`` (sigmoid, two classes), ``num_classes`` for the
    soft-max losses (``dice_ce``, ``weighted_ce``)."""
    check_loss_name(name)
    return 1 if name == "bce" else int(num_classes)


def check_loss_name(name: str) -> None:
    """Raise ``ValueError`` naming the valid choices unless ``name`` is one of :data:`LOSSES`."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid choices: {', '.join(LOSSES)} (loss_name)")


class BCEWithLogits(nn.BCEWithLogitsLoss):
    """``BCEWithLogitsLoss`` that accepts a 0/1 label of any dtype, shape ``(B, 1, *spatial)``."""

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if logits.shape != label.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and label {tuple(label.shape)} differ in shape")
        return super().forward(logits, label.to(logits.dtype))


class WeightedCrossEntropy(nn.Module):
    """Soft-max cross-entropy weighted per pixel (paper eq. 1): ``mean(w(x) * -log p_l(x)(x))``.

    MONAI has no loss with a per-pixel weight map, and a MONAI trainer passes the loss only
    ``(prediction, target)``; so the target carries the weight map as a second channel:
    ``target = cat([label, weight], dim=1)``, which :func:`pipeline.optim.prepare_batch` builds.

    Args (forward):
        logits: ``(B, C, *spatial)``.
        target: ``(B, 2, *spatial)``: class indices and weights.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape[1] != 2 or target.shape[2:] != logits.shape[2:] or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"weighted_ce needs a target (B, 2, *spatial) = [label, weight] matching logits "
                f"{tuple(logits.shape)}; got {tuple(target.shape)} (is the batch prepared with "
                "pipeline.optim.prepare_batch('weighted_ce')?)"
            )
        label, weight = target[:, 0].long(), target[:, 1].to(logits.dtype)
        ce = nn.functional.cross_entropy(logits, label, reduction="none")
        return (weight * ce).mean()


def make_loss(name: str, out_channels: int | None = None) -> nn.Module:
    """Build a loss by name.

    Args:
        name: ``"dice_ce"`` (MONAI ``DiceCELoss``, soft-max, label of class indices
            ``(B, 1, *spatial)``), ``"bce"`` (``BCEWithLogitsLoss``, one logit channel) or
            ``"weighted_ce"`` (:class:`WeightedCrossEntropy`, the paper's loss).
        out_channels: the network's output channels, checked against the loss.
    """
    check_loss_name(name)
    expected = output_channels(name)
    if out_channels is not None and (out_channels == 1) != (expected == 1):
        raise ValueError(
            f"loss {name!r} needs {'1 output channel' if expected == 1 else '2 or more output channels'}, "
            f"but the network has {out_channels}"
        )
    if name == "dice_ce":
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "weighted_ce":
        return WeightedCrossEntropy()
    return BCEWithLogits()


def check_loss(loss_name: str, out_channels: int, label_mode: str = "binary", num_classes: int = 2, class_values: Any = None) -> None:
    """The training loss fits the labels (:func:`pipeline.labels.check_label_mode`) and the network's output
    channels (``num_classes`` for the soft-max losses, 1 for ``bce``).

    Raises:
        ValueError: an unknown ``loss_name`` or ``label_mode``, label settings that do not fit together, or
            ``out_channels`` that do not fit, naming the value that does.
    """
    check_loss_name(loss_name)
    check_label_mode(label_mode, num_classes, loss_name, class_values)
    expected = output_channels(loss_name, num_classes)
    if out_channels != expected:
        raise ValueError(f"loss_name={loss_name} with num_classes={num_classes} needs {expected} output channel(s), but got "
                         f"out_channels={out_channels}; set out_channels={expected} (or leave it to its default)")
    make_loss(loss_name, out_channels)
