"""Sources: what the engine reads a block from, with the halo mirrored about the image border.

A source owns reading (in memory, or lazily from a file or container through
:class:`pipeline.io.lazy.LazySource` and the one axis rule), normalisation and the non-finite rule:

- :class:`TensorSource`: a tensor ``(C, *spatial)`` already normalised (the MONAI inferer's input), on its device;
- :class:`ImageSource`: any :class:`~pipeline.io.lazy.LazySource` (a file, a container dataset, an array),
  normalised per section (:func:`pipeline.transforms.intensity.section_stats`) with statistics over the
  *whole* image, whatever block is read: a block equals the same pixels of the whole image.

Both answer :meth:`read` with a block ``(C, *box)`` gathered by per-axis index maps (:func:`axis_map`), and a
no-data mask (non-finite input pixels under ``fill_nan``) or None.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from pipeline.io.lazy import LazySource
from pipeline.tiling import mirror_index
from pipeline.transforms.intensity import apply_stats, check_finite, section_stats

#: per spatial axis: the source indices of a block's positions, and which of them lie inside (``"constant"``
#: padding: the rest become zeros) or None
AxisMap = tuple[np.ndarray, "np.ndarray | None"]


def axis_map(start: int, stop: int, n: int, mode: str) -> AxisMap:
    """Source indices of positions ``start..stop-1`` on an axis of length ``n``, past the border mirrored as
    :func:`pipeline.tiling.mirror_pad` does; for ``"constant"`` also which positions are inside."""
    index = mirror_index(n, -start, stop - n, mode).numpy()
    inside = (np.arange(start, stop) >= 0) & (np.arange(start, stop) < n) if mode == "constant" else None
    return index, inside


class TensorSource:
    """An in-memory tensor ``(C, *spatial)``, already normalised, read on its own device.

    Raises:
        TypeError: a complex tensor.
        ValueError: an empty tensor, or non-finite pixels (:func:`check_finite`).
    """

    def __init__(self, tensor: torch.Tensor, name: str = "input") -> None:
        if tensor.is_complex():
            raise TypeError(f"input dtype {tensor.dtype} is not supported; give a real image (bool, integer or floating point)")
        if 0 in tensor.shape:
            raise ValueError(f"cannot predict an empty input of shape {tuple(tensor.shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            check_finite(torch.isfinite(tensor).all(0).cpu().numpy(), name, fill_nan=False)
        self.tensor, self.name = tensor, name
        self.channels, self.spatial = int(tensor.shape[0]), tuple(int(s) for s in tensor.shape[1:])
        self.path = None

    def read(self, maps: Sequence[AxisMap]) -> tuple[torch.Tensor, None]:
        x = self.tensor
        for axis, (index, inside) in enumerate(maps, start=1):
            x = x.index_select(axis, torch.as_tensor(index, device=x.device))
            if inside is not None and not inside.all():
                x = x * torch.as_tensor(inside, device=x.device, dtype=x.dtype).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        return x, None


class ImageSource:
    """A :class:`~pipeline.io.lazy.LazySource` read block by block, normalised per channel and 2D section.

    Args:
        lazy: the opened source (a file, a container dataset or an array).
        normalize: zero mean, unit std per channel and section over the whole image (population std; a
            constant section becomes zeros), as :class:`pipeline.transforms.NormalizeSectionsd`.
        fill_nan: non-finite pixels are no-data: left out of the statistics, set to 0 after normalising,
            reported by :meth:`read` for the sinks (probability NaN, mask 0); else they are refused.
        statistics: ``(mean, std)`` of :func:`~pipeline.transforms.intensity.section_stats` when already known.
        name: how messages name the source (default its path).

    Raises:
        ValueError: from :meth:`statistics` (non-finite pixels without ``fill_nan``; colour pixels for a
            1-channel network) and :meth:`read` (non-finite pixels of a block that is not normalised).
    """

    def __init__(self, lazy: LazySource, normalize: bool = True, fill_nan: bool = False, statistics: Any = None,
                 name: str | None = None) -> None:
        self.lazy, self.normalize, self.fill_nan = lazy, bool(normalize), bool(fill_nan)
        self.channels, self.spatial, self.path = lazy.channels, tuple(lazy.spatial), lazy.path
        self._stats = statistics if normalize else None
        self.name = name or lazy.path or "the input"

    def statistics(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The normalisation statistics ``(C, sections)`` (read once); without normalisation ``(None, None)``,
        after a colour check of every pixel when a colour source is read as grey."""
        if self.normalize:
            if self._stats is None:
                self._stats = section_stats(self.lazy.read, self.spatial, self.channels, self.fill_nan, self.name)
            return self._stats
        if self.lazy.grey and not self.lazy.rgb_to_grey:
            section_stats(self.lazy.read, self.spatial, self.channels, True, self.name)
        return None, None

    def read(self, maps: Sequence[AxisMap]) -> tuple[np.ndarray, np.ndarray | None]:
        box = [slice(int(i.min()), int(i.max()) + 1) for i, _ in maps]
        raw = self.lazy.read(box)
        x = raw[np.ix_(np.arange(raw.shape[0]), *[i - b.start for (i, _), b in zip(maps, box)])].astype(np.float32)
        if self.normalize:
            mean, std = self.statistics()
            x = apply_stats(x, mean, std, maps[0][0] if len(self.spatial) == 3 else None)
        for axis, (_, inside) in enumerate(maps, start=1):
            if inside is not None and not inside.all():  # constant padding: zeros after normalisation
                x = x * inside.reshape([-1 if a == axis else 1 for a in range(x.ndim)])
        finite = np.isfinite(x).all(0)
        if finite.all():
            return x, None
        if not self.fill_nan:  # (normalised sources were refused by the statistics pass already)
            check_finite(finite, f"{self.name} (the block of pixels {[(int(i.min()), int(i.max()) + 1) for i, _ in maps]})", False)
        return np.where(np.isfinite(x), x, np.float32(0)), ~finite

    def close(self) -> None:
        self.lazy.close()
