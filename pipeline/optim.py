"""Optimisation pieces of the training config: the optimiser, its learning-rate schedule, and how
a batch is handed to the loss.

``make_optimizer`` builds SGD with momentum (the paper: 0.99) or Adam; :class:`PolynomialDecay` is
the closed-form polynomial schedule that survives a longer resumed run; :func:`prepare_batch` gives
the trainer plain tensors and, for the paper's weighted cross-entropy, joins the weight map to the
label.
"""

from __future__ import annotations

import torch

from pipeline.checks import check_hyperparameters
from pipeline.losses import check_loss_name

OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, parameters, learning_rate: float, momentum: float = 0.99) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``, the paper: 0.99) or ``"adam"``, with range-checked values."""
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
        """``(1 - min(epoch, total_epochs) / total_epochs) ** power`` (:func:`polynomial_decay`)."""
        return polynomial_decay(epoch / self.total_epochs, self.power)

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k not in ("total_epochs", "power", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        own = self.total_epochs, self.power
        super().load_state_dict({**state_dict, "lr_lambdas": [None] * len(self.lr_lambdas)})
        self.total_epochs, self.power = own
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def polynomial_decay(progress: float, power: float = 0.9) -> float:
    """The "poly" learning-rate factor ``(1 - min(progress, 1)) ** power`` for ``progress`` = the part of training
    done (epochs or seconds of the budget), the one rule of :class:`PolynomialDecay` and
    :class:`pipeline.handlers.TrainingTimeBudget`."""
    return max(0.0, 1.0 - min(float(progress), 1.0)) ** power


def _plain(x):
    """A MetaTensor as a plain tensor (no copy): MONAI's per-op metadata tracking costs time in training."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def prepare_batch(name: str):
    """The trainer's ``prepare_batch`` for a loss: image and label as plain tensors on the device;
    for ``weighted_ce`` the weight map joins the label as a second channel."""
    from monai.engines.utils import default_prepare_batch

    check_loss_name(name)

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
