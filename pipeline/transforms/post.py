"""Post-processing of network outputs: logits to one-hot, to class and foreground probabilities, to the
written probabilities, masks and instances (MONAI ``transforms/post``)."""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor

from pipeline.checks import check_hyperparameters
from pipeline.instances import parse_rules


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


#: the per-pixel outputs of the prediction sinks (:class:`pipeline.engine.FilesSink`, :class:`pipeline.engine.ZarrSink`)
OUTPUTS = ("probabilities", "mask")
#: what ``write`` may list: the per-pixel outputs and ``instances`` (:mod:`pipeline.instances`)
WRITABLE = OUTPUTS + ("instances",)


def foreground_probability(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Foreground probability of logits whose channel axis is ``dim`` (removed): soft-max channel 1,
    or the sigmoid of a single channel. ``(C, *spatial) -> (*spatial)`` with ``dim=0``."""
    logits = logits.detach().float()
    if logits.shape[dim] > 1:
        return torch.softmax(logits, dim).select(dim, 1)
    return torch.sigmoid(logits.select(dim, 0))


def class_probabilities(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Probabilities of every class, at least two: the soft-max of ``C > 1`` logits, or ``[1 - p, p]`` for the
    sigmoid ``p`` of one channel. ``(C, *spatial) -> (max(C, 2), *spatial)`` with ``dim=0``."""
    logits = logits.detach().float()
    if logits.shape[dim] > 1:
        return torch.softmax(logits, dim)
    p = torch.sigmoid(logits)
    return torch.cat([1.0 - p, p], dim)


def check_output_settings(write: Sequence[str], threshold: float, instances: Any = None) -> tuple[str, ...]:
    """The writers' one rule: ``write`` lists some of :data:`WRITABLE`; ``threshold`` in [0, 1]; ``instances``
    (rules, :func:`pipeline.instances.parse_rules`) given when ``write`` lists them.

    Raises:
        ValueError: naming the bad value and the valid ones (``write``, ``instances``).
    """
    if not write or set(write) - set(WRITABLE):
        raise ValueError(f"write must list some of {WRITABLE}, got {list(write)}")
    check_hyperparameters(threshold=threshold)
    if "instances" in write and not parse_rules(instances):
        raise ValueError("write lists 'instances' but instances names no rule; e.g. instances={'cells': {'method': 'watershed'}}")
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


def encode_classes(probabilities: torch.Tensor, write: Sequence[str] = OUTPUTS, nodata: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The files' contents from the probabilities ``(C, *spatial)`` of a network of more than two classes:
    ``probabilities`` as float32 ``(C, *spatial)``, ``mask`` as the uint8 class index of the arg-max. Pixels
    marked ``nodata`` get NaN probabilities and class 0."""
    probs = probabilities.detach().float().cpu().numpy()
    if nodata is not None:
        probs = np.where(np.asarray(nodata, dtype=bool)[None], np.float32(np.nan), probs)
    encode = {"probabilities": lambda: probs.astype(np.float32, copy=False),
              "mask": lambda: np.where(np.isnan(probs[0]), 0, np.nan_to_num(probs, nan=-1.0).argmax(0)).astype(np.uint8)}
    return {name: encode[name]() for name in write}


def encode_logits(
    logits: torch.Tensor, threshold: float, write: Sequence[str] = OUTPUTS, nodata: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The per-pixel results of logits ``(C, *spatial)``, the one rule of every sink: a network of two classes
    (the sigmoid of 1 channel, or the soft-max of 2) gives its foreground probability and the mask at
    ``threshold`` (:func:`encode_prediction`); one of more classes gives all class probabilities and the
    arg-max class (:func:`encode_classes`). ``nodata`` (bool ``(*spatial)``) marks pixels without data."""
    probs = class_probabilities(logits)
    if probs.shape[0] == 2:
        return encode_prediction(probs[1], threshold, write, nodata)
    return encode_classes(probs, write, nodata)


class ForegroundProbabilityd(MapTransform):
    """Replace logits ``(C, *spatial)`` under ``keys`` by the foreground probability ``(1, *spatial)``, or with
    ``all_classes`` by the probabilities of every class (:func:`class_probabilities`)."""

    def __init__(self, keys: KeysCollection, all_classes: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.all_classes = bool(all_classes)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            logits = convert_to_tensor(d[key])
            d[key] = class_probabilities(logits) if self.all_classes else foreground_probability(logits)[None]
        return d
