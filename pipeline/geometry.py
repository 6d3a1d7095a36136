"""Geometry of a U-Net: how input sizes map to output sizes, per spatial axis.

This is the one home of the numbers the whole pipeline hangs on, per axis. A U-Net with
``padding="valid"`` (Ronneberger et al. 2015) shrinks its input: every unpadded
``k x k`` convolution removes ``k - 1`` pixels along each axis, and each 2x2
max-pooling needs an even size. For the paper's network (depth 4, two 3x3
convolutions per level) the valid inputs along one axis are ``s = 16 * n + 124``
for ``n >= 4`` (188, 572, 700, ...), the output is ``s - 184`` (4, 388, 516, ...)
and the margin lost on each side is 92 pixels.

With ``padding="same"`` every size is accepted and the output equals the input;
sizes divisible by ``2 ** depth`` avoid the skip-size mismatch the network then
has to resolve (see :class:`pipeline.networks.UNet`).

Anisotropic schemes give each axis its own kernels and pooling factors per level (serial-section
stacks: ``kernel_size=[[1, 3, 3]] * 3 + [[3, 3, 3]] * 2``, ``pool=[[1, 2, 2]] * 3 + [[2, 2, 2]]``, which
:func:`propose_scheme` derives from the voxel spacing); then margins, steps and valid sizes differ per
axis (:meth:`UNetGeometry.margins`), and errors name the nearest valid sizes of each axis.

Everything here is a pure function of plain integers, so data transforms,
inferers and configs can ask the same questions without building a network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from pipeline.checks import optional

PADDING_MODES = ("valid", "same")
AXIS_NAMES = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}


def _as_tuple(size: int | Sequence[int], spatial_dims: int | None = None) -> tuple[int, ...]:
    """Normalise a size given as an int or a sequence to a tuple of ints."""
    if isinstance(size, int):
        return (size,) * (spatial_dims or 1)
    size = tuple(int(s) for s in size)
    if spatial_dims is not None and len(size) != spatial_dims:
        raise ValueError(f"expected {spatial_dims} spatial sizes, got {len(size)}: {size}")
    return size


def _int(v: Any) -> bool:
    return not isinstance(v, bool) and hasattr(v, "__index__")


def _per_level(value: Any, levels: int, name: str) -> tuple[int | tuple[int, ...], ...]:
    """``value`` as one entry per level, each an int (every axis) or a tuple (one per axis).

    An int applies to every level and axis; a flat list of ints is one value per axis at every level;
    a list of ``levels`` entries (ints or per-axis lists of ints) is one per level.
    """
    if _int(value):
        return (int(value),) * levels
    entries = list(value) if isinstance(value, (list, tuple)) else None
    if entries and all(_int(v) for v in entries):
        return (tuple(int(v) for v in entries),) * levels
    if not entries or len(entries) != levels or not all(
        _int(v) or (isinstance(v, (list, tuple)) and v and all(_int(i) for i in v)) for v in entries
    ):
        raise ValueError(f"{name} must be an int, one int per axis, or {levels} entries (one per level, each an int or "
                         f"one int per axis); got {_plain(value)!r}")
    return tuple(int(v) if _int(v) else tuple(int(i) for i in v) for v in entries)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (what YAML and ``torch.load(weights_only=True)`` take)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class UNetGeometry:
    """Size arithmetic of a U-Net along each spatial axis, isotropic or anisotropic.

    Per level ``l`` (0 = top, ``depth`` = bottom), each axis has a convolution kernel ``k_l`` and,
    above the bottom, a pooling factor ``p_l`` (the up-convolution of the decoder undoes it). Along
    one axis an input ``s`` shrinks by ``convs_per_level * (k_l - 1)`` per block with
    ``padding="valid"``, and each pooling needs a size divisible by ``p_l``. Anisotropic schemes
    (Cicek et al. 2016; nnU-Net's plans, Isensee et al. 2021) pool serial-section stacks in-plane only
    (``p = (1, 2, 2)``, kernels ``(1, 3, 3)``) until the voxel is roughly isotropic (:func:`propose_scheme`).

    Args:
        depth: number of poolings (the paper: 4).
        convs_per_level: convolutions in each double-conv block (the paper: 2).
        kernel_size: odd kernel size: an int (every level and axis, the paper: 3), one per axis
            (``[1, 3, 3]``, every level) or one entry per level (``depth + 1``), each an int or per axis.
        padding: ``"valid"`` (unpadded, the paper) or ``"same"``.
        pool: pooling factors: None (2 on every axis, the paper), an int, one per axis, or one entry per
            pooling (``depth``), each an int or per axis, e.g. ``[[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]``.

    Per-axis entries fix the number of spatial axes (:attr:`spatial_dims`); without any, the geometry
    holds for any number of axes. Raises ``ValueError`` for even or non-positive kernels, factors < 1,
    entries of different lengths or the wrong number of levels.
    """

    depth: int = 4
    convs_per_level: int = 2
    kernel_size: Any = 3
    padding: str = "valid"
    pool: Any = None

    def __post_init__(self) -> None:
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")
        if self.depth < 0 or self.convs_per_level < 1:
            raise ValueError(
                f"depth must be >= 0 and convs_per_level >= 1, got depth={self.depth}, "
                f"convs_per_level={self.convs_per_level}"
            )
        kernels = _per_level(self.kernel_size, self.depth + 1, "kernel_size")
        pools = _per_level(2 if self.pool is None else self.pool, self.depth, "pool")
        flat = [k for e in kernels for k in (e if isinstance(e, tuple) else (e,))]
        if any(k < 1 or k % 2 == 0 for k in flat):
            raise ValueError(f"kernel_size must be positive odd integers, got {_plain(self.kernel_size)}")
        if any(p < 1 for e in pools for p in (e if isinstance(e, tuple) else (e,))):
            raise ValueError(f"pool factors must be >= 1, got {_plain(self.pool)}")
        lengths = {len(e) for e in kernels + pools if isinstance(e, tuple)}
        if len(lengths) > 1:
            raise ValueError(f"per-axis kernel_size and pool entries must all have one length, got lengths {sorted(lengths)}: "
                             f"kernel_size={_plain(self.kernel_size)}, pool={_plain(self.pool)}")
        # kept in normal form (hashable, comparable): an int stays an int, so the isotropic geometry reads as before
        object.__setattr__(self, "kernel_size", self.kernel_size if isinstance(self.kernel_size, int) else
                           (kernels if len(set(kernels)) > 1 else kernels[0]))
        object.__setattr__(self, "pool", None if self.pool is None else
                           (self.pool if isinstance(self.pool, int) else (pools if len(set(pools)) > 1 else pools[0])))
        object.__setattr__(self, "_kernels", kernels)
        object.__setattr__(self, "_pools", pools)
        object.__setattr__(self, "_ndim", lengths.pop() if lengths else None)

    # ------------------------------------------------------------------ axes
    @property
    def spatial_dims(self) -> int | None:
        """Number of spatial axes fixed by per-axis entries (None: isotropic, any number)."""
        return self._ndim

    @property
    def isotropic(self) -> bool:
        """Whether every axis has the same kernels and poolings."""
        return self._ndim is None or all(len(set(e)) == 1 for e in self._kernels + self._pools if isinstance(e, tuple))

    def _ndims(self, spatial_dims: int | None) -> int:
        if self._ndim is not None and spatial_dims is not None and spatial_dims != self._ndim:
            raise ValueError(f"this geometry has {self._ndim} spatial axes (kernel_size {_plain(self.kernel_size)}, "
                             f"pool {_plain(self.pool)}), not {spatial_dims}")
        return spatial_dims or self._ndim or 1

    def _axis(self, axis: int) -> tuple[list[int], list[int]]:
        """Kernels (per level) and pooling factors (per pooling) along ``axis``."""
        pick = lambda e: e[axis] if isinstance(e, tuple) else e  # noqa: E731
        return [pick(e) for e in self._kernels], [pick(e) for e in self._pools]

    def _axis_name(self, axis: int, n: int) -> str:
        names = AXIS_NAMES.get(n)
        return f"axis {axis} ({names[axis]})" if names and n > 1 and not self.isotropic else f"axis {axis}"

    # ------------------------------------------------------------------ one axis
    def _output_1d(self, size: int, axis: int = 0) -> int | None:
        """Output size along ``axis``, or None when ``size`` is not valid there."""
        if self.padding == "same":
            return size if size >= 1 else None
        kernels, pools = self._axis(axis)
        shrink = [self.convs_per_level * (k - 1) for k in kernels]
        s = size
        for level, p in enumerate(pools):
            s -= shrink[level]
            if s < 1 or s % p:
                return None
            s //= p
        s -= shrink[self.depth]
        if s < 1:
            return None
        for level in reversed(range(self.depth)):
            s = pools[level] * s - shrink[level]
            if s < 1:
                return None
        return s

    def axis_step(self, axis: int = 0) -> int:
        """Distance between consecutive valid input sizes along ``axis`` (the product of its pooling factors)."""
        return math.prod(self._axis(axis)[1])

    def axis_min_input_size(self, axis: int = 0) -> int:
        """The smallest valid input size along ``axis``."""
        if self.padding == "same":
            return 1
        s = 1
        while self._output_1d(s, axis) is None:
            s += 1
        return s

    def axis_margin(self, axis: int = 0) -> int:
        """Context lost on each side of ``axis``: ``(input - output) / 2``."""
        if self.padding == "same":
            return 0
        s = self.axis_min_input_size(axis)
        return (s - self._output_1d(s, axis)) // 2

    def valid_neighbours(self, size: int, axis: int = 0) -> tuple[int | None, int]:
        """The nearest valid input sizes ``(below_or_equal, above_or_equal)`` of ``size`` along ``axis``.

        ``below`` is None when no valid size is at or below ``size``.
        """
        if self.padding == "same":
            return (max(size, 1) if size >= 1 else None, max(size, 1))
        lo, step = self.axis_min_input_size(axis), self.axis_step(axis)
        if size <= lo:
            return (lo if size == lo else None, lo)
        below = lo + (size - lo) // step * step
        return below, below if below == size else below + step

    # ------------------------------------------------------------------ per axis, all axes
    def margins(self, spatial_dims: int | None = None) -> tuple[int, ...]:
        """Margin per axis (92 per axis for the paper); ``spatial_dims`` axes for an isotropic geometry."""
        return tuple(self.axis_margin(a) for a in range(self._ndims(spatial_dims)))

    def steps(self, spatial_dims: int | None = None) -> tuple[int, ...]:
        """Step between valid input sizes per axis (16 per axis for the paper)."""
        return tuple(self.axis_step(a) for a in range(self._ndims(spatial_dims)))

    def min_input_sizes(self, spatial_dims: int | None = None) -> tuple[int, ...]:
        """Smallest valid input size per axis (188 per axis for the paper)."""
        return tuple(self.axis_min_input_size(a) for a in range(self._ndims(spatial_dims)))

    def _same_on_every_axis(self, values: tuple[int, ...], what: str) -> int:
        if len(set(values)) > 1:
            raise ValueError(f"this anisotropic geometry has a {what} per axis, {values}; use {what}s()")
        return values[0]

    @property
    def margin(self) -> int:
        """Context lost on each side of each axis (92 for the paper); :meth:`margins` when axes differ."""
        return self._same_on_every_axis(self.margins(), "margin")

    @property
    def step(self) -> int:
        """Distance between consecutive valid input sizes (``2 ** depth``); :meth:`steps` when axes differ."""
        return self._same_on_every_axis(self.steps(), "step")

    @property
    def min_input_size(self) -> int:
        """The smallest valid input size (188 for the paper); :meth:`min_input_sizes` when axes differ."""
        return self._same_on_every_axis(self.min_input_sizes(), "min_input_size")

    def _sizes(self, size: int | Sequence[int]) -> tuple[int, ...]:
        size = _as_tuple(size, None if isinstance(size, int) and self._ndim is None else self._ndim)
        self._ndims(len(size))
        return size

    # ------------------------------------------------------------------ n-d
    def is_valid(self, size: int | Sequence[int]) -> bool:
        """Whether every axis of ``size`` is a valid input size."""
        return all(self._output_1d(s, a) is not None for a, s in enumerate(self._sizes(size)))

    def describe_valid_sizes(self, spatial_dims: int | None = None) -> str:
        """``"188 + 16 * n, n >= 0"``, or one such rule per axis when the axes differ."""
        n = self._ndims(spatial_dims)
        rules = [f"{self.axis_min_input_size(a)} + {self.axis_step(a)} * n" for a in range(n)]
        if len(set(rules)) == 1:
            return f"Valid sizes are {rules[0]}, n >= 0."
        return "Valid sizes per axis: " + "; ".join(f"{self._axis_name(a, n)}: {r}" for a, r in enumerate(rules)) + " (n >= 0)."

    def check_input_size(self, size: int | Sequence[int]) -> tuple[int, ...]:
        """Return ``size`` as a tuple, or raise ``ValueError`` naming the nearest valid sizes per axis."""
        size = self._sizes(size)
        bad = []
        for axis, s in enumerate(size):
            if self._output_1d(s, axis) is None:
                below, above = self.valid_neighbours(s, axis)
                near = f"{below} or {above}" if below is not None else f"{above} (the smallest)"
                bad.append(f"{self._axis_name(axis, len(size))}: {s} (nearest valid: {near})")
        if bad:
            scheme = "" if self.isotropic else f", kernel_size={_plain(self.kernel_size)}, pool={_plain(self.pool)}"
            raise ValueError(
                f"input size {size} is not valid for a U-Net with depth={self.depth}, "
                f"padding={self.padding!r}{scheme}: " + "; ".join(bad) + ". " + self.describe_valid_sizes(len(size))
            )
        return size

    def output_size(self, input_size: int | Sequence[int]) -> tuple[int, ...]:
        """Output size of a valid input size (572 -> 388 for the paper)."""
        size = self.check_input_size(input_size)
        return tuple(self._output_1d(s, a) for a, s in enumerate(size))

    def input_size(self, output_size: int | Sequence[int]) -> tuple[int, ...]:
        """The input size whose output is ``output_size`` (388 -> 572 for the paper).

        Raises:
            ValueError: if no input gives exactly that output; the message names the
                nearest output sizes that are reachable.
        """
        out = self._sizes(output_size)
        result = []
        for axis, o in enumerate(out):
            s = o + 2 * self.axis_margin(axis)
            if self._output_1d(s, axis) != o:
                below, above = self.valid_neighbours(s, axis)
                near = [self._output_1d(v, axis) for v in (below, above) if v is not None]
                raise ValueError(
                    f"output size {o} ({self._axis_name(axis, len(out))}) cannot be produced by a U-Net with "
                    f"depth={self.depth}, padding={self.padding!r}; nearest reachable output sizes: {near}"
                )
            result.append(s)
        return tuple(result)

    def nearest_valid_input_size(self, size: int | Sequence[int], round_up: bool = True) -> tuple[int, ...]:
        """Round each axis of ``size`` to a valid input size (up by default)."""
        result = []
        for axis, s in enumerate(self._sizes(size)):
            below, above = self.valid_neighbours(s, axis)
            result.append(above if round_up or below is None else below)
        return tuple(result)


def propose_scheme(spacing: Sequence[float], depth: int = 4, kernel_size: int = 3, max_ratio: float = 2.0) -> dict[str, list]:
    """Per-level pooling and kernels for a voxel ``spacing``, after nnU-Net's plans (Isensee et al. 2021,
    ``get_pool_and_conv_props``): an axis is pooled (factor 2) only while its spacing is at most
    ``max_ratio`` times the finest spacing of that level, and convolved with ``kernel_size`` only once it
    is; a coarser axis gets factor 1 and kernel 1. Pooling doubles the spacing of the pooled axes, so a
    serial-section stack pools in-plane until its voxels are roughly isotropic, then in 3D.

    Args:
        spacing: voxel size per axis, ``(Z, Y, X)`` in any one unit (e.g. ``[40, 4, 4]`` nm).
        depth: number of poolings.

    Returns:
        ``{"pool": [[...] per pooling], "kernel_size": [[...] per level]}`` as lists, the arguments of
        :class:`UNetGeometry` / :class:`pipeline.networks.UNet`. ``[40, 4, 4]``, depth 4: pool
        ``[[1,2,2]] * 3 + [[2,2,2]]``, kernels ``[[1,3,3]] * 3 + [[3,3,3]] * 2``.

    Raises:
        ValueError: a non-positive spacing.
    """
    current = [float(s) for s in spacing]
    if not current or min(current) <= 0:
        raise ValueError(f"spacing must be positive numbers, one per axis, got {list(spacing)}")
    pools, kernels = [], []
    for level in range(depth + 1):
        finest = min(current)
        fine = [s <= max_ratio * finest for s in current]
        kernels.append([kernel_size if f else 1 for f in fine])
        if level < depth:
            pools.append([2 if f else 1 for f in fine])
            current = [s * p for s, p in zip(current, pools[-1])]
    return {"pool": pools, "kernel_size": kernels}


def crop_slices(size: Sequence[int], target: Sequence[int]) -> tuple[slice, ...]:
    """Slices that centre-crop ``size`` to ``target`` along each axis.

    When ``size - target`` is odd the extra pixel is removed from the end. (Valid
    U-Net geometry only produces even differences.)
    """
    if len(size) != len(target):
        raise ValueError(f"size {tuple(size)} and target {tuple(target)} have different lengths")
    slices = []
    for s, t in zip(size, target):
        if t > s:
            raise ValueError(f"cannot crop size {tuple(size)} to the larger {tuple(target)}")
        start = (s - t) // 2
        slices.append(slice(start, start + t))
    return tuple(slices)


def check_spacing(spacing: Any, spatial_dims: int) -> None:
    """``spacing``: None, or one positive number per axis of the network (``[z, y, x]`` for 3D), also accepted
    with one value more than a 2D network's axes (a stack's ``[z, y, x]``: its sections use ``[y, x]``).

    Raises:
        ValueError: naming what was given and what is valid.
    """
    spacing = optional(spacing)
    if spacing is None:
        return
    values = list(spacing) if isinstance(spacing, (list, tuple)) else None
    ok = values is not None and len(values) in (spatial_dims, spatial_dims + 1 if spatial_dims == 2 else spatial_dims) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        axes = "[z, y, x]" if spatial_dims == 3 else "[y, x] (or a stack's [z, y, x])"
        raise ValueError(f"spacing={spacing!r} must be {spatial_dims} positive numbers, the voxel size {axes} in one unit "
                         f"(spatial_dims is {spatial_dims}), e.g. [40, 4, 4] for 40 nm sections of 4 nm pixels")
