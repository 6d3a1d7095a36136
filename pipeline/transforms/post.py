"""Post-processing of network outputs: logits to one-hot, to foreground probability, to the
written probabilities and masks (MONAI ``transforms/post``)."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor

from pipeline.config import check_hyperparameters


class LogitsToOneHot(Transform):
    """Logits ``(C, *spatial)`` to a one-hot hard prediction with at least two channels.

    ``C == 1`` (a sigmoid network): foreground where the logit is > 0, returned as
    ``[background, foreground]``. ``C > 1`` (a soft-max network): one-hot of the arg-max.
    """

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        x = convert_to_tensor(logits, track_meta=True)
        if x.shape[0] == 1:
            fg = (x > 0).to(torch.float32)
            return torch.cat([1.0 - fg, fg], dim=0)
        idx = x.argmax(dim=0, keepdim=True)
        return torch.zeros_like(x, dtype=torch.float32).scatter_(0, idx, 1.0)


class LogitsToOneHotd(MapTransform):
    """Dictionary wrapper of :class:`LogitsToOneHot`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.convert = LogitsToOneHot()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key])
        return d


#: what the prediction writers (:class:`WritePredictiond`, :func:`pipeline.streaming.predict_zarr`) write
OUTPUTS = ("probabilities", "mask")


def foreground_probability(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Foreground probability of logits whose channel axis is ``dim`` (removed): soft-max channel 1,
    or the sigmoid of a single channel. ``(C, *spatial) -> (*spatial)`` with ``dim=0``."""
    logits = logits.detach().float()
    if logits.shape[dim] > 1:
        return torch.softmax(logits, dim).select(dim, 1)
    return torch.sigmoid(logits.select(dim, 0))


def check_output_settings(write: Sequence[str], threshold: float) -> tuple[str, ...]:
    """The writers' one rule: ``write`` lists some of :data:`OUTPUTS`; ``threshold`` in [0, 1].

    Raises:
        ValueError: naming the bad value and the valid ones.
    """
    if not write or set(write) - set(OUTPUTS):
        raise ValueError(f"write must list some of {OUTPUTS}, got {list(write)}")
    check_hyperparameters(threshold=threshold)
    return tuple(write)


def encode_prediction(
    probability: torch.Tensor, threshold: float, write: Sequence[str] = OUTPUTS, nodata: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The files' contents from a foreground probability: ``probabilities`` as float32, ``mask`` as
    uint8 0/255 (foreground where ``probability > threshold``), for each name in ``write``. Pixels marked
    ``nodata`` (bool, the probability's shape) get a NaN probability and mask 0."""
    prob = probability.detach().float().cpu().numpy()
    if nodata is not None:
        prob = np.where(np.asarray(nodata, dtype=bool), np.float32(np.nan), prob)
    encode = {"probabilities": lambda: prob.astype(np.float32, copy=False), "mask": lambda: (prob > threshold).astype(np.uint8) * 255}
    return {name: encode[name]() for name in write}


class ForegroundProbabilityd(MapTransform):
    """Replace logits ``(C, *spatial)`` under ``keys`` by the foreground probability ``(1, *spatial)``."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = foreground_probability(convert_to_tensor(d[key]))[None]
        return d
