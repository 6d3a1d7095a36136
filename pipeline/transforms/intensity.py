"""Grey values: per-section normalisation (MONAI ``transforms/intensity``)."""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor


class NormalizeSectionsd(MapTransform):
    """Zero mean, unit variance per channel and per 2D section.

    ``(C, H, W)`` is normalised per channel; ``(C, Z, H, W)`` per channel and section, as a
    2D network sees a stack section by section (EM sections differ in brightness and
    contrast). A constant section becomes zeros.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = convert_to_tensor(d[key], track_meta=True).float()
            flat = x.reshape(*x.shape[: 2 if x.ndim == 4 else 1], -1)
            mean = flat.mean(-1, keepdim=True)
            std = flat.std(-1, unbiased=False, keepdim=True)
            d[key] = ((flat - mean) / torch.where(std > 0, std, torch.ones_like(std))).reshape(x.shape)
        return d
