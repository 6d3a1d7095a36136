"""Small ignite/MONAI glue used by the bundle configs."""

from __future__ import annotations

from typing import Callable, Sequence

from monai.handlers import from_engine
from torch.utils.tensorboard import SummaryWriter


def select_channel(keys: Sequence[str], channel: int) -> Callable:
    """An ``output_transform`` that keeps one channel of each decollated item.

    ``MeanDice(output_transform=select_channel(["pred", "label"], 0))`` scores class 0
    alone (with ``include_background=True``), which is how the bundle logs per-class Dice.
    """
    get = from_engine(list(keys))

    def transform(output):
        return tuple([item[channel : channel + 1] for item in items] for items in get(output))

    return transform


class LearningRateLogger:
    """Write each optimizer group's learning rate to TensorBoard at every epoch's start.

    Args:
        summary_writer: the writer shared with ``TensorBoardStatsHandler``.
        optimizer: the trainer's optimizer.
        tag: scalar tag (``/{group}`` is appended when there are several groups).
    """

    def __init__(self, summary_writer: SummaryWriter, optimizer, tag: str = "learning_rate") -> None:
        self.writer = summary_writer
        self.optimizer = optimizer
        self.tag = tag

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        groups = self.optimizer.param_groups
        for i, group in enumerate(groups):
            tag = self.tag if len(groups) == 1 else f"{self.tag}/{i}"
            self.writer.add_scalar(tag, group["lr"], engine.state.epoch)
        self.writer.flush()
