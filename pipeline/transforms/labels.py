"""Labels: mask binarisation, targets of instance ids and classes (:mod:`pipeline.labels`), and the paper's
border weight map (eq. 2)."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor

from pipeline.labels import check_label_mode, class_indices, instance_ids, instance_targets, weight_map
from pipeline.metrics.common import binary_foreground


class BinarizeMask(Transform):
    """Turn a mask stored in any common way into a float foreground mask ``(1, *spatial)`` of 0/1.

    Understood without options: booleans; two values ``{0, v}`` (``v`` is foreground:
    0/1, 0/255, ...); a single value (all background if 0, else all foreground). Masks
    with more values need ``threshold`` (foreground = value > threshold) or
    ``foreground_values``. A multi-channel mask whose channels are equal (grey saved as
    RGB) is reduced to one channel; one whose channels differ (a colour-coded mask)
    needs ``foreground_values`` given as colours, one value per channel.

    Args:
        threshold: foreground where ``value > threshold``.
        foreground_values: values (or colours) that count as foreground.
        invert: swap foreground and background after the rule above (ISBI 2012 stores
            cell interiors as 255; set ``invert=True`` to make membranes the foreground).
    """

    def __init__(
        self,
        threshold: float | None = None,
        foreground_values: Sequence[float] | Sequence[Sequence[float]] | None = None,
        invert: bool = False,
    ) -> None:
        if threshold is not None and foreground_values is not None:
            raise ValueError("give either threshold or foreground_values, not both")
        if foreground_values is not None and len(foreground_values) == 0:
            raise ValueError("foreground_values is empty; list at least one value that counts as foreground")
        self.threshold = threshold
        self.foreground_values = foreground_values
        self.invert = invert

    def __call__(self, mask: torch.Tensor | np.ndarray) -> torch.Tensor:
        m = convert_to_tensor(mask, track_meta=True)
        if m.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch compares these on no device: as int64
            m = m.to(torch.int64)
        if m.ndim < 2:
            raise ValueError(f"expected a channel-first mask (C, *spatial), got shape {tuple(m.shape)}")
        channels = m.shape[0]
        if self.foreground_values is not None and isinstance(self.foreground_values[0], (list, tuple)):
            colours = torch.as_tensor(self.foreground_values, dtype=m.dtype, device=m.device)
            if colours.shape[1] != channels:
                raise ValueError(
                    f"foreground colours have {colours.shape[1]} components but the mask has {channels} channel(s)"
                )
            view = (slice(None), slice(None)) + (None,) * (m.ndim - 1)
            fg = (m.unsqueeze(0) == colours[view]).all(dim=1).any(dim=0, keepdim=True)
        else:
            if channels > 1:
                if not bool((m == m[:1]).all()):
                    raise ValueError(
                        f"mask has {channels} channels that differ (a colour-coded mask?); convert it to one "
                        "channel of labels, or pass foreground_values as colours, e.g. [[255, 0, 0]]"
                    )
                m = m[:1]
            fg = self._rule(m)
        if self.invert:
            fg = ~fg
        out = fg.to(torch.float32)
        return out

    def _rule(self, m: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:
            return m > self.threshold
        if self.foreground_values is not None:
            return torch.isin(m, torch.as_tensor(self.foreground_values, dtype=m.dtype, device=m.device))
        try:
            return torch.from_numpy(binary_foreground(m.cpu().numpy(), "mask")).to(m.device)
        except ValueError as err:
            raise ValueError(f"{err}; pass threshold= (foreground = value > threshold) or foreground_values=[...]") from None


class BinarizeMaskd(MapTransform):
    """Dictionary wrapper of :class:`BinarizeMask`."""

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float | None = None,
        foreground_values: Sequence[float] | Sequence[Sequence[float]] | None = None,
        invert: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.binarize = BinarizeMask(threshold, foreground_values, invert)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.binarize(d[key])
            except ValueError as e:
                name = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{name}: {e}") from None  # the named error is the one a run ends with
        return d


# ---------------------------------------------------------------- targets of instance ids and classes
class LabelsToTargetd(MapTransform):
    """Read the label under ``keys`` by ``label_mode`` (:mod:`pipeline.labels`) and replace it with the training
    target: class indices ``(1, *spatial)`` as float32 (the form :class:`BinarizeMaskd` gives and MONAI's
    ``DiceCELoss(to_onehot_y=True)`` takes).

    - ``binary``: :class:`BinarizeMask` (``threshold``, ``invert``).
    - ``instances``: :func:`pipeline.labels.instance_targets` (2 or 3 classes); the interior ids go to
      ``cells_key`` for :class:`BorderWeightMapd` (the cells of eq. 2).
    - ``classes``: :func:`pipeline.labels.class_indices` (``num_classes``, ``class_values``).

    With ``instance_ids`` (evaluation), instance labels are kept as their ids (int64, :func:`pipeline.labels.instance_ids`)
    instead of targets. A one-channel label ``(1, *spatial)`` is expected (a grey label saved as RGB is reduced to one).

    Raises:
        ValueError: naming the file, the values found and the parameter to set (``label_mode``,
            ``num_classes``, ``class_values``, ``threshold``).
    """

    def __init__(
        self, keys: KeysCollection, label_mode: str = "binary", num_classes: int = 2, class_values=None,
        threshold: float | None = None, invert: bool = False, cells_key: str = "cells", instance_ids: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        check_label_mode(label_mode, num_classes, class_values=class_values)
        self.mode, self.num_classes, self.class_values, self.cells_key = label_mode, int(num_classes), class_values, cells_key
        self.binarize, self.ids = BinarizeMask(threshold, None, invert), bool(instance_ids)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            name = getattr(label, "meta", {}).get("filename_or_obj", key)
            try:
                if self.mode == "binary":
                    d[key] = self.binarize(label)
                    continue
                values = _one_channel(label)
                if self.mode == "instances" and self.ids:
                    classes = instance_ids(values)
                elif self.mode == "instances":
                    classes, cells = instance_targets(values, self.num_classes)
                    d[self.cells_key] = cells[None]
                else:
                    classes = class_indices(values, self.num_classes, self.class_values)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            target = torch.from_numpy(classes if self.ids and self.mode == "instances" else classes.astype(np.float32))[None]
            d[key] = MetaTensor(target, meta=dict(label.meta)) if isinstance(label, MetaTensor) else target
        return d


def _one_channel(label) -> np.ndarray:
    """The label's values ``(*spatial)`` from ``(1, *spatial)`` (or equal channels: grey saved as RGB)."""
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim < 2:
        raise ValueError(f"expected a channel-first label (C, *spatial), got shape {arr.shape}")
    if arr.shape[0] > 1 and not (arr == arr[:1]).all():
        raise ValueError(f"the label has {arr.shape[0]} channels that differ; save it as one channel of values")
    return arr[0]


# ---------------------------------------------------------------- border weight map
def border_weight_map(foreground: np.ndarray, w0: float = 10.0, sigma: float = 5.0, class_balance: bool = True,
                      spacing: Sequence[float] | None = None) -> np.ndarray:
    """The paper's weight map (eq. 2) of a binary label, its cells being the connected components of the
    foreground (face connectivity): :func:`pipeline.labels.weight_map` with classes = foreground.

    Args:
        foreground: boolean array ``(*spatial)``, True for cell interiors.

    Returns:
        float32 array of the input's shape.
    """
    from scipy import ndimage as ndi

    fg = np.asarray(foreground).astype(bool)
    return weight_map(fg.astype(np.int64), ndi.label(fg)[0], w0, sigma, class_balance, spacing)


class BorderWeightMapd(MapTransform):
    """Write the paper's weight map (eq. 2) of a target of class indices ``(1, *spatial)`` to ``weight_key``.

    The cells of its border term are the ids under ``cells_key`` when the item has them
    (:class:`LabelsToTargetd` with instances; the key is removed), else the connected components of a
    binary target's foreground; a target of more classes without cells gets the class balance alone.
    Compute it before augmentation (it is deterministic, so a ``CacheDataset`` keeps it), then warp and
    crop it with the label: the bundle's configs crop ``label`` and ``weight`` to the network's output
    size in the same transform. A volume's map is 3D, its distances scaled by ``spacing`` (voxel size per
    axis; None: voxels), so the cells of neighbouring sections count by their physical distance.
    """

    def __init__(
        self, keys: KeysCollection, weight_key: str = "weight", w0: float = 10.0, sigma: float = 5.0,
        class_balance: bool = True, cells_key: str = "cells", allow_missing_keys: bool = False,
        spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if w0 < 0 or sigma <= 0:
            raise ValueError(f"w0 must be >= 0 and sigma > 0, got w0={w0}, sigma={sigma}")
        self.weight_key, self.w0, self.sigma, self.class_balance, self.cells_key = weight_key, w0, sigma, class_balance, cells_key
        self.spacing = None if spacing is None else [float(v) for v in spacing]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        cells = d.pop(self.cells_key, None)
        for key in self.key_iterator(d):
            label = convert_to_tensor(d[key], track_meta=True)
            if label.shape[0] != 1:
                raise ValueError(f"the weight map needs a one-channel target of class indices, got shape {tuple(label.shape)}")
            classes = label[0].cpu().numpy()
            spacing = self.spacing
            if spacing is not None and len(spacing) == classes.ndim + 1:  # a 2D section of a stack's [z, y, x]
                spacing = spacing[1:]
            if spacing is not None and len(spacing) != classes.ndim:
                raise ValueError(f"spacing={self.spacing} has {len(self.spacing)} values; the labels have {classes.ndim} axes")
            if cells is not None:
                w = weight_map(classes.astype(np.int64), np.asarray(cells)[0], self.w0, self.sigma, self.class_balance, spacing)
            elif classes.max(initial=0) <= 1:
                w = border_weight_map(classes > 0.5, self.w0, self.sigma, self.class_balance, spacing)
            else:
                w = weight_map(classes.astype(np.int64), None, self.w0, self.sigma, self.class_balance, spacing)
            weight = torch.from_numpy(w)[None]
            d[self.weight_key] = MetaTensor(weight, meta=dict(label.meta)) if isinstance(label, MetaTensor) else weight
        return d
