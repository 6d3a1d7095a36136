"""Labels: mask binarisation and the paper's border weight map (eq. 2)."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor

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


# ---------------------------------------------------------------- border weight map
def border_weight_map(foreground: np.ndarray, w0: float = 10.0, sigma: float = 5.0, class_balance: bool = True) -> np.ndarray:
    """The paper's weight map (eq. 2): ``w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``.

    ``d1``, ``d2`` are the distances to the nearest and the second nearest cell, the cells
    being the connected components of the foreground; ``w_c`` balances the class
    frequencies (``n_pixels / (2 * n_class)``, so its mean is 1; 1 everywhere when
    ``class_balance`` is False or only one class is present). Distances to a cell are
    computed with scipy's Euclidean distance transform inside the cell's bounding box
    grown by ``6 * sigma``; farther away the border term is below ``w0 * exp(-18)``.

    Args:
        foreground: boolean array ``(*spatial)``, True for cell interiors.

    Returns:
        float32 array of the input's shape.
    """
    from scipy import ndimage as ndi

    fg = np.asarray(foreground).astype(bool)
    instances, n = ndi.label(fg)
    d1 = np.full(fg.shape, np.inf)
    d2 = np.full(fg.shape, np.inf)
    reach = int(np.ceil(6 * sigma))
    for i, box in enumerate(ndi.find_objects(instances), start=1):
        window = tuple(slice(max(b.start - reach, 0), min(b.stop + reach, s)) for b, s in zip(box, fg.shape))
        d = ndi.distance_transform_edt(instances[window] != i)
        w1, w2 = d1[window], d2[window]
        d2[window] = np.minimum(w2, np.maximum(w1, d))
        d1[window] = np.minimum(w1, d)
    border = np.zeros(fg.shape) if n < 2 else w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    wc = np.ones(fg.shape)
    n_fg = int(fg.sum())
    if class_balance and 0 < n_fg < fg.size:
        wc = np.where(fg, fg.size / (2.0 * n_fg), fg.size / (2.0 * (fg.size - n_fg)))
    return (wc + border).astype(np.float32)


class BorderWeightMapd(MapTransform):
    """Write the paper's weight map of a binary label ``(1, *spatial)`` to ``weight_key``.

    Compute it before augmentation (it is deterministic, so a ``CacheDataset`` keeps it),
    then warp and crop it with the label: the bundle's configs crop ``label`` and
    ``weight`` to the network's output size in the same transform.
    """

    def __init__(
        self, keys: KeysCollection, weight_key: str = "weight", w0: float = 10.0, sigma: float = 5.0,
        class_balance: bool = True, allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if w0 < 0 or sigma <= 0:
            raise ValueError(f"w0 must be >= 0 and sigma > 0, got w0={w0}, sigma={sigma}")
        self.weight_key, self.w0, self.sigma, self.class_balance = weight_key, w0, sigma, class_balance

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = convert_to_tensor(d[key], track_meta=True)
            if label.shape[0] != 1:
                raise ValueError(f"the weight map needs a one-channel binary label, got shape {tuple(label.shape)}")
            w = border_weight_map(label[0].cpu().numpy() > 0.5, self.w0, self.sigma, self.class_balance)
            weight = torch.from_numpy(w)[None]
            d[self.weight_key] = MetaTensor(weight, meta=dict(label.meta)) if isinstance(label, MetaTensor) else weight
        return d
