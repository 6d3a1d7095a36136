"""The loss and optimiser factories of the bundle configs.

Every loss takes logits ``(B, C, *out_spatial)`` and a label of the same spatial size
(the data transforms crop the label to the network's output size once, so a valid
network's smaller output and its label always match here).
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn

LOSSES = ("dice_ce", "bce", "weighted_ce")


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


class WeightedCrossEntropy(nn.Module):
    """Soft-max cross-entropy weighted per pixel (paper eq. 1): ``mean(w(x) * -log p_l(x)(x))``.

    MONAI has no loss with a per-pixel weight map, and a MONAI trainer passes the loss only
    ``(prediction, target)``; so the target carries the weight map as a second channel:
    ``target = cat([label, weight], dim=1)``, which :func:`prepare_batch` builds.

    Args (forward):
        logits: ``(B, C, *spatial)``.
        target: ``(B, 2, *spatial)``: class indices and weights.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.shape[1] != 2 or target.shape[2:] != logits.shape[2:] or target.shape[0] != logits.shape[0]:
            raise ValueError(
                f"weighted_ce needs a target (B, 2, *spatial) = [label, weight] matching logits "
                f"{tuple(logits.shape)}; got {tuple(target.shape)} (is the batch prepared with "
                "pipeline.losses.prepare_batch('weighted_ce')?)"
            )
        label, weight = target[:, 0].long(), target[:, 1].to(logits.dtype)
        ce = nn.functional.cross_entropy(logits, label, reduction="none")
        return (weight * ce).mean()


def _plain(x):
    """A MetaTensor as a plain tensor (no copy): MONAI's per-op metadata tracking costs time in training."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def prepare_batch(name: str):
    """The trainer's ``prepare_batch`` for a loss: image and label as plain tensors on the device;
    for ``weighted_ce`` the weight map joins the label as a second channel."""
    from monai.engines.utils import default_prepare_batch

    _check_name(name)

    def prepare(batchdata, device=None, non_blocking=False, **kwargs):
        image, label = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        image, label = _plain(image), _plain(label)
        if name != "weighted_ce":
            return image, label
        if "weight" not in batchdata:
            raise ValueError("weighted_ce needs a 'weight' key in the batch (add pipeline.transforms.BorderWeightMapd)")
        weight = _plain(batchdata["weight"]).to(device=device, non_blocking=non_blocking)
        return image, torch.cat([label.to(weight.dtype), weight], dim=1)

    return prepare


def make_loss(name: str, out_channels: int | None = None) -> nn.Module:
    """Build a loss by name.

    Args:
        name: ``"dice_ce"`` (MONAI ``DiceCELoss``, soft-max, label of class indices
            ``(B, 1, *spatial)``), ``"bce"`` (``BCEWithLogitsLoss``, one logit channel) or
            ``"weighted_ce"`` (:class:`WeightedCrossEntropy`, the paper's loss).
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
    if name == "weighted_ce":
        return WeightedCrossEntropy()
    return BCEWithLogits()


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, parameters, learning_rate: float, momentum: float = 0.99) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``, the paper: 0.99) or ``"adam"``, with range-checked values."""
    from pipeline.config import check_hyperparameters

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")
    check_hyperparameters(learning_rate=learning_rate, momentum=momentum if name == "sgd" else None)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=momentum)
    return torch.optim.Adam(parameters, lr=learning_rate)


class PolynomialDecay(torch.optim.lr_scheduler.LambdaLR):
    """Polynomial learning-rate decay per epoch, in closed form, that survives a longer resumed run.

    The learning rate of epoch ``e`` (0-based) is ``base_lr * (1 - min(e, total_epochs) / total_epochs)
    ** power``, the values of ``torch.optim.lr_scheduler.PolynomialLR`` (nnU-Net's "poly" schedule);
    ``power=0`` keeps it constant (the paper). ``PolynomialLR`` computes each value from the
    previous one and stores ``total_iters`` in its state, so resuming a finished 4-epoch run with
    ``--num_epochs 8`` trained epochs 5-8 at learning rate 0. Here the state holds only the epoch
    (and base rates): after :meth:`load_state_dict` the schedule is the one of *this* run's
    ``total_epochs``, as if it had been planned from the start, and the optimizer's learning rate is
    set to that schedule's value at once (epoch 5 of 8 trains at ``base_lr * 0.5 ** power``).

    Args:
        optimizer: the optimizer whose groups' learning rates are set.
        total_epochs: the run's epochs (the bundle's ``num_epochs``).
        power: the exponent (the bundle's ``lr_power``), >= 0.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_epochs: int, power: float = 0.9) -> None:
        self.total_epochs, self.power = int(total_epochs), float(power)
        super().__init__(optimizer, self.factor)

    def factor(self, epoch: int) -> float:
        """``(1 - min(epoch, total_epochs) / total_epochs) ** power``."""
        return (1.0 - min(epoch, self.total_epochs) / self.total_epochs) ** self.power

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k not in ("total_epochs", "power", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        own = self.total_epochs, self.power
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})
        self.total_epochs, self.power = own
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
