"""Instances from a prediction: connected components of a foreground (objects: mitochondria, nuclei) and a
seeded watershed of a boundary map (cells and neurons that touch), in 2D per section or in 3D.

The rules, as :class:`InstanceRule` holds them:

- ``components``: the connected components (face connectivity: 4 in 2D, 6 in 3D) of ``p > threshold``,
  ``p`` the probability of ``channel``; components smaller than ``min_size`` pixels are dropped.
- ``watershed``: ``b`` the probability of the boundary class ``channel``. The *interior* is ``b < threshold``;
  the *seeds* are the connected components of the interior pixels farther than ``seed_distance`` (px, or
  physical units with a ``spacing``) from any non-interior pixel (background pixels, below, are not interior) (scipy's Euclidean distance transform),
  which cuts the thin necks where two cells' interiors meet through a gap in the boundary; seeds smaller
  than ``min_size`` are dropped. Every pixel is then flooded from the seeds over the relief ``b``
  (``skimage.segmentation.watershed``, face connectivity), except pixels whose ``background_channel``
  probability is > 0.5 (they stay 0). torch-em's and elf's boundary watersheds use seeds from distance
  maps in the same way (Beier et al. 2017; Wolny et al. 2020, PlantSeg).

Ids are uint32, 0 = no object, unique over the whole image or stack (``mode: 2d`` labels each section
on its own, with ids that continue from section to section). :mod:`pipeline.streaming` labels blocks of
volumes larger than memory by the same rules and merges ids across block faces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

METHODS = ("watershed", "components")
MODES = ("2d", "3d")


@dataclass(frozen=True)
class InstanceRule:
    """How one kind of instance is made from the class probabilities (see the module docstring).

    Args:
        method: ``watershed`` (cells, from a boundary class) or ``components`` (objects, from a foreground class).
        channel: the class used: the boundary class for ``watershed`` (default 0: the membrane of a
            two-class network), the object class for ``components`` (default 1: the foreground).
        threshold: ``components``: object where ``p > threshold``; ``watershed``: interior where ``b < threshold``.
        seed_distance: ``watershed``: seeds lie farther than this from the boundary (px, or the units of
            ``spacing``).
        min_size: objects (``components``) or seeds (``watershed``) of fewer pixels are dropped.
        background_channel: ``watershed``: pixels of this class (probability > 0.5) stay 0 (the background
            class of a three-class instance target); None floods every pixel (cells fill the image).
        mode: ``2d`` (each section of a stack on its own) or ``3d``.
    """

    method: str = "watershed"
    channel: int | None = None
    threshold: float = 0.5
    seed_distance: float = 2.0
    min_size: int = 0
    background_channel: int | None = None
    mode: str = "2d"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"instance method {self.method!r} is unknown; valid: {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise ValueError(f"instance mode {self.mode!r} is unknown; valid: {', '.join(MODES)}")
        if not 0 <= float(self.threshold) <= 1:
            raise ValueError(f"instance threshold must be in [0, 1], got {self.threshold}")
        if float(self.seed_distance) < 0 or int(self.min_size) < 0:
            raise ValueError(f"seed_distance and min_size must be >= 0, got {self.seed_distance}, {self.min_size}")
        if self.channel is None:
            object.__setattr__(self, "channel", 0 if self.method == "watershed" else 1)

    @property
    def channels(self) -> list[int]:
        """The classes this rule reads."""
        return [self.channel] + ([] if self.background_channel is None else [self.background_channel])


def parse_rules(rules: Mapping[str, Any] | None) -> dict[str, InstanceRule]:
    """``{name: InstanceRule}`` from the bundle key ``instances`` (``{name: {method: ..., ...}}``).

    Raises:
        ValueError: not a mapping of names to settings, an unknown setting (naming the valid ones) or value.
    """
    if rules is None:
        return {}
    if not isinstance(rules, Mapping) or not rules:
        raise ValueError(f"--instances must map names to rules, e.g. {{cells: {{method: watershed}}}}, got {rules!r}")
    known = [f.name for f in fields(InstanceRule)]
    out = {}
    for name, spec in rules.items():
        spec = {"method": spec} if isinstance(spec, str) else dict(spec or {})
        unknown = sorted(set(spec) - set(known))
        if unknown or not str(name).isidentifier():
            raise ValueError(f"--instances {name!r}: {'unknown settings ' + str(unknown) if unknown else 'a name of letters, digits and _'}; "
                             f"valid settings: {', '.join(known)}")
        try:
            out[str(name)] = InstanceRule(**spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"--instances {name!r}: {err}") from None
    return out


def default_rules(label_mode: str = "binary", num_classes: int = 2) -> dict[str, dict]:
    """The instances a target implies: cells by a watershed of the boundary class (binary and instance targets:
    class 0 of two, or class 1 of three with class 0 as background); none for classes (name them)."""
    if label_mode == "classes":
        return {}
    if num_classes == 3:
        return {"cells": {"method": "watershed", "channel": 1, "background_channel": 0}}
    return {"cells": {"method": "watershed", "channel": 0}}


def rule_settings(rule: InstanceRule) -> dict:
    """The rule as plain values (recorded with streaming outputs)."""
    return asdict(rule)


# ---------------------------------------------------------------- the rules on arrays in memory
def _sizes_at_least(labels: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1 or labels.max(initial=0) == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """Ids 1..n in order of first appearance in raster order (0 kept), uint32."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids != 0
    order = np.argsort(first[keep], kind="stable")
    lut = np.zeros(int(ids.max(initial=0)) + 1, np.uint32) if ids.size else np.zeros(1, np.uint32)
    lut[ids[keep][order]] = np.arange(1, keep.sum() + 1, dtype=np.uint32)
    return lut[labels]


def components(foreground: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Connected components (face connectivity) of a boolean array, 2D or 3D, components of fewer than
    ``min_size`` pixels dropped; int64 ids (not yet consecutive)."""
    labels, _ = ndi.label(np.asarray(foreground, bool), structure=ndi.generate_binary_structure(np.ndim(foreground), 1))
    return _sizes_at_least(labels.astype(np.int64), int(min_size))


def seeds(boundary: np.ndarray, threshold: float = 0.5, seed_distance: float = 2.0, min_size: int = 0,
          spacing: Sequence[float] | None = None, background: np.ndarray | None = None) -> np.ndarray:
    """The watershed's seeds (see the module docstring): components of the interior (``boundary < threshold``,
    not ``background``) farther than ``seed_distance`` from its outside; int64 ids."""
    interior = np.asarray(boundary) < threshold
    if background is not None:
        interior &= ~np.asarray(background, bool)
    if seed_distance > 0:
        interior &= ndi.distance_transform_edt(interior, sampling=spacing) > seed_distance
    return components(interior, min_size)


def watershed(boundary: np.ndarray, markers: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Flood ``boundary`` from ``markers`` (face connectivity); ``background`` pixels stay 0."""
    from skimage.segmentation import watershed as flood

    mask = None if background is None else ~np.asarray(background, bool)
    return flood(np.asarray(boundary, np.float32), markers=markers, mask=mask, connectivity=1).astype(np.int64)


def _apply(rule: InstanceRule, probs: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
    """One rule on ``probs (C, *spatial)`` of one section or volume (int64 ids)."""
    p = probs[rule.channel]
    if rule.method == "components":
        return components(p > rule.threshold, rule.min_size)
    background = None if rule.background_channel is None else probs[rule.background_channel] > 0.5
    return watershed(p, seeds(p, rule.threshold, rule.seed_distance, rule.min_size, spacing, background), background)


def make_instances(probabilities: np.ndarray, rule: InstanceRule, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Instance ids of one image or stack by ``rule``.

    Args:
        probabilities: class probabilities ``(C, Y, X)`` or ``(C, Z, Y, X)``
            (:func:`pipeline.transforms.class_probabilities`).
        rule: the :class:`InstanceRule`.
        spacing: pixel spacing per spatial axis (``seed_distance`` is in its units); None: 1.

    Returns:
        uint32 ids ``(*spatial)``, 0 = none, consecutive in raster order, unique over the stack.

    Raises:
        ValueError: a channel the probabilities do not have.
    """
    probs = np.asarray(probabilities, dtype=np.float32)
    if max(rule.channels) >= probs.shape[0]:
        raise ValueError(f"the instance rule reads class {max(rule.channels)}, but the network predicts {probs.shape[0]} "
                         "classes (set the rule's channel)")
    spatial = probs.shape[1:]
    if rule.mode == "3d" or len(spatial) == 2:
        return _consecutive(_apply(rule, probs, spacing))
    out, offset = np.zeros(spatial, np.int64), 0
    for z in range(spatial[0]):  # 2d: each section, ids continued
        section = _apply(rule, probs[:, z], None if spacing is None else spacing[1:])
        out[z] = np.where(section > 0, section + offset, 0)
        offset = max(offset, int(out[z].max(initial=0)))
    return _consecutive(out)
