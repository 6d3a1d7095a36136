"""Grey values: per-section normalisation and the non-finite rule (MONAI ``transforms/intensity``).

The statistics (:func:`section_stats`) and their application (:func:`apply_stats`) are the one
normalisation of the package: training's :class:`NormalizeSectionsd` and every prediction
(:class:`pipeline.engine.ImageSource`, in memory or block by block) use them, so the paths cannot disagree.
"""

from __future__ import annotations

import itertools
import logging
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

logger = logging.getLogger(__name__)

STATS_BAND = 2**22  # pixels read at once by the statistics pass


def describe_nonfinite(finite: np.ndarray) -> str:
    """``"N non-finite pixel(s) (NaN or Inf) of T, the first at (y, x) (..)[ in section(s) z (n), ...]"`` for a
    boolean map of finite pixels ``(*spatial)`` (the wording of every non-finite refusal)."""
    count = finite.size - int(np.count_nonzero(finite))
    first = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), finite.shape))
    where = f"{count} non-finite pixel(s) (NaN or Inf) of {finite.size}, the first at {'(z, y, x)' if finite.ndim == 3 else '(y, x)'} {first}"
    if finite.ndim == 3:
        bad = finite[0].size - np.count_nonzero(finite.reshape(finite.shape[0], -1), axis=1)
        where += " in section(s) " + ", ".join(f"{z} ({int(n)})" for z, n in enumerate(bad) if n)
    return where


def nonfinite_error(name: str, where: str) -> ValueError:
    return ValueError(f"{name} has {where}; pass fill_nan=True to predict around them (no-data: NaN probability, mask 0), "
                      "or replace them (e.g. with 0) and save it again")


def check_finite(finite: np.ndarray, name: str, fill_nan: bool) -> bool:
    """The non-finite rule, for a boolean map of finite pixels ``(*spatial)``: all finite -> True; else with
    ``fill_nan`` a warning and False (the pixels are no-data), without it a ``ValueError`` naming ``name``."""
    if finite.all():
        return True
    where = describe_nonfinite(finite)
    if fill_nan:
        logger.warning("%s has %s; fill_nan=True: predicted as no-data (probability NaN, mask 0)", name, where)
        return False
    raise nonfinite_error(name, where)


def section_stats(
    read: Callable[[tuple[slice, ...]], np.ndarray], spatial: Sequence[int], channels: int, fill_nan: bool = False,
    name: str = "the input",
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std per channel and 2D section, float64 ``(C, sections)`` (a 2D image: one section),
    read in bands of :data:`STATS_BAND` pixels and merged pairwise (Chan et al.), so memory stays bounded.

    Args:
        read: spatial slices -> the pixels ``(C, *box)`` (:meth:`pipeline.io.lazy.LazySource.read`).
        spatial: ``(Y, X)`` or ``(Z, Y, X)``.
        fill_nan: statistics of the finite pixels only (a section of no-data only: mean 0, std 1).

    Raises:
        ValueError: non-finite pixels without ``fill_nan``, naming ``name``, their count and sections.
    """
    three = len(spatial) == 3
    z_size, y_size, x_size = spatial if three else (1, *spatial)
    plane = y_size * x_size
    zs = max(1, min(z_size, STATS_BAND // max(plane, 1)))
    rows = y_size if plane <= STATS_BAND else max(1, STATS_BAND // x_size)
    count, mean, m2, bad = (np.zeros((channels, z_size)) for _ in range(4))
    with np.errstate(invalid="ignore", over="ignore"):
        for z0, y0 in itertools.product(range(0, z_size, zs), range(0, y_size, rows)):
            index = ((slice(z0, z0 + zs),) if three else ()) + (slice(y0, y0 + rows), slice(None))
            piece = np.asarray(read(index)).astype(np.float64)
            piece = piece.reshape(channels, piece.shape[1] if three else 1, -1)
            z = slice(z0, z0 + piece.shape[1])
            finite = np.isfinite(piece)
            bad[:, z] += (~finite).sum(-1)
            n = finite.sum(-1)
            pm = np.where(finite, piece, 0).sum(-1) / np.maximum(n, 1)
            pm2 = np.where(finite, (piece - pm[..., None]) ** 2, 0).sum(-1)
            total, delta = count[:, z] + n, pm - mean[:, z]
            share = np.divide(n, total, out=np.zeros_like(delta), where=total > 0)
            m2[:, z] += pm2 + delta**2 * count[:, z] * share
            mean[:, z] += delta * share
            count[:, z] = total
    if bad.any() and not fill_nan:
        per_section = bad.sum(0)
        where = f"{int(per_section.sum())} non-finite pixel(s) (NaN or Inf) of {channels * z_size * plane}"
        if three:
            where += " in section(s) " + ", ".join(f"{z} ({int(n)})" for z, n in enumerate(per_section) if n)
        raise nonfinite_error(name, where)
    mean, m2, count = np.where(count > 0, mean, 0.0), np.where(count > 0, m2, 0.0), np.where(count > 0, count, 1)
    return mean, np.sqrt(m2 / count)


def apply_stats(x: np.ndarray, mean: np.ndarray, std: np.ndarray, sections: np.ndarray | None = None) -> np.ndarray:
    """``(x - mean) / std`` in float32 for pixels ``(C, *spatial)``; ``sections`` are the section index of each of
    ``x``'s first spatial positions (a stack), None for a 2D image. A zero std divides by 1."""
    index = np.zeros(1, dtype=int) if sections is None else np.asarray(sections)
    view = (..., None) if sections is None else (..., None, None)  # (C, 1, 1) or (C, Z', 1, 1)
    mean, std = mean[:, index].astype(np.float32), std[:, index].astype(np.float32)
    return (x.astype(np.float32, copy=False) - mean[view]) / np.where(std > 0, std, np.float32(1))[view]


class NormalizeSectionsd(MapTransform):
    """Zero mean, unit variance per channel and per 2D section (:func:`section_stats`, :func:`apply_stats`).

    ``(C, H, W)`` is normalised per channel; ``(C, Z, H, W)`` per channel and section, as a
    2D network sees a stack section by section (EM sections differ in brightness and
    contrast). A constant section becomes zeros.

    Args:
        fill_nan: no-data pixels (NaN or Inf, e.g. outside the tissue of an aligned stack) are left
            out of the statistics and set to the section's mean (0 after normalisation), and marked in
            ``meta["nodata"]`` (bool, spatial shape) for the writers (NaN probability, mask 0). Without
            it they are refused (``ValueError``).
    """

    def __init__(self, keys, fill_nan: bool = False, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fill_nan = fill_nan

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            spatial = array.shape[1:]
            mean, std = section_stats(lambda index: array[(slice(None), *index)], spatial, array.shape[0], self.fill_nan)
            out = apply_stats(array, mean, std, np.arange(spatial[0]) if len(spatial) == 3 else None)
            finite = np.isfinite(out)
            nodata = None if finite.all() else ~finite.all(0)
            if nodata is not None:
                out = np.where(finite, out, np.float32(0))
            out = convert_to_dst_type(out, dst=x if isinstance(x, torch.Tensor) else torch.as_tensor(out), dtype=torch.float32)[0]
            if nodata is not None and hasattr(out, "meta"):
                out.meta["nodata"] = nodata
            d[key] = out
        return d
