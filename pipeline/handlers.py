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


def latest_checkpoint(ckpt_dir: str) -> str:
    """The resume checkpoint ``checkpoint_epoch=<N>.pt`` (or ``_iteration=<N>``) with the largest N.

    Raises:
        FileNotFoundError: there is none, saying what to do.
    """
    import re
    from pathlib import Path

    found = []
    for path in Path(ckpt_dir).glob("checkpoint_*=*.pt"):
        match = re.fullmatch(r"checkpoint_(epoch|iteration)=(\d+)\.pt", path.name)
        if match:
            found.append((int(match.group(2)), str(path)))
    if not found:
        raise FileNotFoundError(
            f"resume=true but {ckpt_dir} holds no checkpoint_epoch=<N>.pt; train once without resume "
            "(checkpoints are written every ckpt_interval epochs) or point ckpt_dir at that run's models folder"
        )
    return max(found)[1]


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


class TensorBoardImages:
    """Log input | label | prediction [| weight map] panels for the first samples of each run.

    Attach to an evaluator: at each of its first ``n_samples`` iterations (batch size 1
    expected) it writes one grey-scale panel under ``{tag}/sample_{i}`` at the evaluator's
    epoch (the trainer's epoch when run by ``ValidationHandler``). Each part is scaled to
    [0, 1] on its own; the prediction is the foreground channel of the post-processed
    ``pred``. A 3D sample shows its middle section.

    Args:
        summary_writer: the writer shared with the other TensorBoard handlers.
        n_samples: samples to show per run.
        tag: tag prefix.
    """

    def __init__(self, summary_writer: SummaryWriter, n_samples: int = 3, tag: str = "validation") -> None:
        self.writer, self.n_samples, self.tag = summary_writer, n_samples, tag

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @staticmethod
    def _plane(x) -> "torch.Tensor":
        import torch

        x = torch.as_tensor(x).detach().float().cpu()
        while x.ndim > 2:  # drop channel / batch axes, take the middle section of a volume
            x = x[x.shape[0] // 2] if x.ndim > 3 or x.shape[0] > 1 else x[0]
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)

    def __call__(self, engine) -> None:
        import torch

        index = (engine.state.iteration - 1) % engine.state.epoch_length
        if index >= self.n_samples:
            return
        # MONAI engines decollate: state.output / state.batch are lists of per-sample dicts;
        # the output holds image, label and pred, the batch every loaded key (weight too)
        item, sample = engine.state.output[0], engine.state.batch[0]
        parts = [item["image"], item["label"], item["pred"][-1:]]
        if "weight" in sample:
            parts.append(sample["weight"])
        planes = [self._plane(p) for p in parts]
        height = max(p.shape[0] for p in planes)
        planes = [torch.nn.functional.pad(p, (0, 2, 0, height - p.shape[0]), value=1.0) for p in planes]
        panel = torch.cat(planes, dim=1)[None]
        self.writer.add_image(f"{self.tag}/sample_{index}", panel, engine.state.epoch, dataformats="CHW")
        self.writer.flush()
