"""Spatial augmentation: the paper's elastic deformation on a coarse grid (MONAI ``transforms/spatial``)."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import convert_to_tensor


class RandElasticGridd(RandomizableTransform, MapTransform):
    """Elastic deformation of the paper (section 3.1): random displacement vectors on a coarse
    grid, drawn from ``N(0, sigma)`` pixels, interpolated bicubically to every pixel.

    The same field warps every key; each key has its own interpolation (``"bicubic"`` or
    ``"bilinear"`` for images and weight maps, ``"nearest"`` for labels). Samples that fall
    outside the image are mirrored. Works on ``(C, H, W)`` and ``(C, D, H, W)``: with ``in_plane``
    (serial sections) a volume is warped in-plane only, by one 2D field for all its sections, so
    sections keep their order and spacing; otherwise by a 3D field interpolated trilinearly (``grid_sample``
    has no tricubic mode). Reproducible under ``set_random_state`` / ``monai.utils.set_determinism``.

    Args:
        keys: keys to warp.
        sigma: standard deviation of the control-point displacements, in pixels (paper: 10).
        grid_size: control points per axis, corners included (paper: 3).
        mode: interpolation per key (a string or one per key).
        prob: probability of warping a sample.
        in_plane: a volume gets the 2D deformation of its last two axes, the same for every section.
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float = 10.0,
        grid_size: int = 3,
        mode: str | Sequence[str] = "bilinear",
        prob: float = 1.0,
        allow_missing_keys: bool = False,
        in_plane: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if sigma < 0 or grid_size < 2:
            raise ValueError(f"sigma must be >= 0 and grid_size >= 2, got sigma={sigma}, grid_size={grid_size}")
        modes = (mode,) * len(self.keys) if isinstance(mode, str) else tuple(mode)
        if len(modes) != len(self.keys) or not set(modes) <= {"bicubic", "bilinear", "nearest"}:
            raise ValueError(f"mode must be one of bicubic/bilinear/nearest, one per key; got {mode!r} for keys {self.keys}")
        self.sigma, self.grid_size, self.modes, self.in_plane = float(sigma), int(grid_size), modes, bool(in_plane)
        self._coarse: np.ndarray | None = None

    def randomize(self, spatial_dims: int) -> None:
        super().randomize(None)
        self._coarse = self.R.normal(0.0, self.sigma, (spatial_dims,) + (self.grid_size,) * spatial_dims)

    def displacement(self, spatial_shape: Sequence[int]) -> torch.Tensor:
        """The dense field ``(ndim, *spatial)`` in pixels from the last drawn control points."""
        coarse = torch.as_tensor(self._coarse, dtype=torch.float32)[None]
        mode = "bicubic" if len(spatial_shape) == 2 else "trilinear"
        return torch.nn.functional.interpolate(coarse, size=tuple(spatial_shape), mode=mode, align_corners=True)[0]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = d[self.first_key(d)]
        spatial = tuple(first.shape[1:])
        planar = self.in_plane and len(spatial) == 3
        self.randomize(2 if planar else len(spatial))
        if not self._do_transform:
            return d
        if planar:  # one in-plane field for every section, no displacement along z
            disp = self.displacement(spatial[1:])
            disp = torch.cat([torch.zeros(1, *spatial), disp[:, None].expand(2, *spatial)])
        else:
            disp = self.displacement(spatial)
        # sampling positions in pixels, then normalised to [-1, 1] (align_corners=True)
        axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in spatial], indexing="ij")
        coords = [(a + u) * 2.0 / max(s - 1, 1) - 1.0 for a, u, s in zip(axes, disp, spatial)]
        grid = torch.stack(coords[::-1], dim=-1)[None]  # grid_sample wants (x, y[, z]) order
        for key, mode in zip(self.key_iterator(d), self.modes):
            img = convert_to_tensor(d[key], track_meta=True)
            if mode == "bicubic" and len(spatial) == 3:
                mode = "bilinear"
            warped = torch.nn.functional.grid_sample(
                img[None].float(), grid.to(img.device), mode=mode, padding_mode="reflection", align_corners=True
            )[0]
            out = warped.to(img.dtype) if not img.dtype.is_floating_point else warped
            d[key] = MetaTensor(out, meta=getattr(img, "meta", {})) if isinstance(img, MetaTensor) else out
        return d


class MirrorPadd(MapTransform):
    """Mirror-pad every key by ``spatial_border`` pixels per side, then further (split as evenly as MONAI's
    ``SpatialPadd``, the extra pixel at the end) up to ``spatial_size``: the padding of overlap-tile inference
    (:func:`pipeline.tiling.mirror_pad`), so training tiles reach the image edge as predicted ones do.

    Unlike ``BorderPadd(mode="reflect")`` (``torch.nn.functional.pad``), any amount works: the image is mirrored
    repeatedly, so a stack of 5 sections pads by a z margin of 8, and a 64 px image by the paper's 92.

    Args:
        keys: keys to pad, arrays ``(C, *spatial)``.
        spatial_border: pixels per side, an int or one per spatial axis.
        spatial_size: minimum size per axis after padding (None: no minimum).
        mode: ``"reflect"`` (edge pixel not repeated, the paper's mirroring) or ``"symmetric"``.
    """

    def __init__(
        self, keys: KeysCollection, spatial_border: int | Sequence[int] = 0, spatial_size: Sequence[int] | None = None,
        mode: str = "reflect", allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.border, self.size, self.mode = spatial_border, spatial_size, mode

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        from pipeline.tiling import mirror_pad

        d = dict(data)
        for key in self.key_iterator(d):
            img = convert_to_tensor(d[key], track_meta=True)
            spatial = img.shape[1:]
            border = [int(self.border)] * len(spatial) if isinstance(self.border, int) else [int(b) for b in self.border]
            if len(border) != len(spatial):
                raise ValueError(f"spatial_border {self.border} needs one value per spatial axis of shape {tuple(img.shape)}")
            pads = [(b, b) for b in border]
            if self.size is not None:
                for axis, (s, target) in enumerate(zip(spatial, self.size)):
                    extra = max(int(target) - (s + 2 * border[axis]), 0)
                    pads[axis] = (border[axis] + extra // 2, border[axis] + extra - extra // 2)
            out = mirror_pad(img.as_tensor() if isinstance(img, MetaTensor) else img, pads, self.mode)
            d[key] = MetaTensor(out, meta=dict(img.meta)) if isinstance(img, MetaTensor) else out
        return d
