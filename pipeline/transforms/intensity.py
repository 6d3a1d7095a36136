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

    Args:
        fill_nan: no-data pixels (NaN or Inf, e.g. outside the tissue of an aligned stack) are left
            out of the statistics and set to the section's mean (0 after normalisation), and marked in
            ``meta["nodata"]`` (bool, spatial shape) for the writers (NaN probability, mask 0). Without
            it they stay non-finite (the bundle's pre-flight refuses such files).
    """

    def __init__(self, keys, fill_nan: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fill_nan = fill_nan

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = convert_to_tensor(d[key], track_meta=True).float()
            flat = x.reshape(*x.shape[: 2 if x.ndim == 4 else 1], -1)
            finite = torch.isfinite(flat) if self.fill_nan else None
            if finite is not None and not bool(finite.all()):
                count = finite.sum(-1, keepdim=True).clamp(min=1)
                mean = torch.where(finite, flat, 0).sum(-1, keepdim=True) / count
                std = (torch.where(finite, flat - mean, 0) ** 2).sum(-1, keepdim=True).div(count).sqrt()
                out = torch.where(finite, (flat - mean) / torch.where(std > 0, std, torch.ones_like(std)), 0).reshape(x.shape)
                out.meta["nodata"] = (~finite).reshape(x.shape).any(0).numpy()
                d[key] = out
                continue
            mean = flat.mean(-1, keepdim=True)
            std = flat.std(-1, unbiased=False, keepdim=True)
            d[key] = ((flat - mean) / torch.where(std > 0, std, torch.ones_like(std))).reshape(x.shape)
        return d
