"""Geometry of a U-Net: how input sizes map to output sizes, per spatial axis.

This is the one home of the numbers the whole pipeline hangs on. A U-Net with
``padding="valid"`` (Ronneberger et al. 2015) shrinks its input: every unpadded
``k x k`` convolution removes ``k - 1`` pixels along each axis, and each 2x2
max-pooling needs an even size. For the paper's network (depth 4, two 3x3
convolutions per level) the valid inputs along one axis are ``s = 16 * n + 124``
for ``n >= 4`` (188, 572, 700, ...), the output is ``s - 184`` (4, 388, 516, ...)
and the margin lost on each side is 92 pixels.

With ``padding="same"`` every size is accepted and the output equals the input;
sizes divisible by ``2 ** depth`` avoid the skip-size mismatch the network then
has to resolve (see :class:`pipeline.networks.UNet`).

Everything here is a pure function of plain integers, so data transforms,
inferers and configs can ask the same questions without building a network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

PADDING_MODES = ("valid", "same")


def _as_tuple(size: int | Sequence[int], spatial_dims: int | None = None) -> tuple[int, ...]:
    """Normalise a size given as an int or a sequence to a tuple of ints."""
    if isinstance(size, int):
        return (size,) * (spatial_dims or 1)
    size = tuple(int(s) for s in size)
    if spatial_dims is not None and len(size) != spatial_dims:
        raise ValueError(f"expected {spatial_dims} spatial sizes, got {len(size)}: {size}")
    return size


@dataclass(frozen=True)
class UNetGeometry:
    """Size arithmetic of a U-Net along each spatial axis.

    Args:
        depth: number of 2x2 poolings (the paper: 4).
        convs_per_level: convolutions in each double-conv block (the paper: 2).
        kernel_size: odd convolution kernel size (the paper: 3).
        padding: ``"valid"`` (unpadded, the paper) or ``"same"``.
    """

    depth: int = 4
    convs_per_level: int = 2
    kernel_size: int = 3
    padding: str = "valid"

    def __post_init__(self) -> None:
        if self.padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {self.padding!r}")
        if self.depth < 0 or self.convs_per_level < 1:
            raise ValueError(
                f"depth must be >= 0 and convs_per_level >= 1, got depth={self.depth}, "
                f"convs_per_level={self.convs_per_level}"
            )
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {self.kernel_size}")

    # ------------------------------------------------------------------ one axis
    @property
    def _shrink(self) -> int:
        """Pixels lost by one double-conv block along one axis."""
        return self.convs_per_level * (self.kernel_size - 1) if self.padding == "valid" else 0

    def _output_1d(self, size: int) -> int | None:
        """Output size for one axis, or None when ``size`` is not valid."""
        if self.padding == "same":
            return size if size >= 1 else None
        s = size
        for _ in range(self.depth):
            s -= self._shrink
            if s < 2 or s % 2:
                return None
            s //= 2
        s -= self._shrink
        if s < 1:
            return None
        for _ in range(self.depth):
            s = 2 * s - self._shrink
            if s < 1:
                return None
        return s

    @property
    def margin(self) -> int:
        """Context lost on each side of each axis: ``(input - output) / 2`` (92 for the paper)."""
        if self.padding == "same":
            return 0
        s = self.min_input_size
        return (s - self._output_1d(s)) // 2

    @property
    def step(self) -> int:
        """Distance between consecutive valid input sizes (``2 ** depth``)."""
        return 2**self.depth

    @property
    def min_input_size(self) -> int:
        """The smallest valid input size along one axis (188 for the paper)."""
        if self.padding == "same":
            return 1
        s = 1
        while self._output_1d(s) is None:
            s += 1
        return s

    def valid_neighbours(self, size: int) -> tuple[int | None, int]:
        """The nearest valid input sizes ``(below_or_equal, above_or_equal)`` of ``size``.

        ``below`` is None when no valid size is at or below ``size``.
        """
        if self.padding == "same":
            return (max(size, 1) if size >= 1 else None, max(size, 1))
        lo = self.min_input_size
        if size <= lo:
            return (lo if size == lo else None, lo)
        k = (size - lo) // self.step
        below = lo + k * self.step
        above = below if below == size else below + self.step
        return below, above

    # ------------------------------------------------------------------ n-d
    def is_valid(self, size: int | Sequence[int]) -> bool:
        """Whether every axis of ``size`` is a valid input size."""
        return all(self._output_1d(s) is not None for s in _as_tuple(size))

    def check_input_size(self, size: int | Sequence[int]) -> tuple[int, ...]:
        """Return ``size`` as a tuple, or raise ``ValueError`` naming the nearest valid sizes."""
        size = _as_tuple(size)
        bad = []
        for axis, s in enumerate(size):
            if self._output_1d(s) is None:
                below, above = self.valid_neighbours(s)
                near = f"{below} or {above}" if below is not None else f"{above} (the smallest)"
                bad.append(f"axis {axis}: {s} (nearest valid: {near})")
        if bad:
            raise ValueError(
                f"input size {size} is not valid for a U-Net with depth={self.depth}, "
                f"padding={self.padding!r}: " + "; ".join(bad)
                + f". Valid sizes are {self.min_input_size} + {self.step} * n, n >= 0."
            )
        return size

    def output_size(self, input_size: int | Sequence[int]) -> tuple[int, ...]:
        """Output size of a valid input size (572 -> 388 for the paper)."""
        size = self.check_input_size(input_size)
        return tuple(self._output_1d(s) for s in size)

    def input_size(self, output_size: int | Sequence[int]) -> tuple[int, ...]:
        """The input size whose output is ``output_size`` (388 -> 572 for the paper).

        Raises:
            ValueError: if no input gives exactly that output; the message names the
                nearest output sizes that are reachable.
        """
        out = _as_tuple(output_size)
        result = []
        for axis, o in enumerate(out):
            s = o + 2 * self.margin
            if self._output_1d(s) != o:
                below, above = self.valid_neighbours(s)
                near = [self._output_1d(v) for v in (below, above) if v is not None]
                raise ValueError(
                    f"output size {o} (axis {axis}) cannot be produced by a U-Net with "
                    f"depth={self.depth}, padding={self.padding!r}; nearest reachable "
                    f"output sizes: {near}"
                )
            result.append(s)
        return tuple(result)

    def nearest_valid_input_size(self, size: int | Sequence[int], round_up: bool = True) -> tuple[int, ...]:
        """Round each axis of ``size`` to a valid input size (up by default)."""
        result = []
        for s in _as_tuple(size):
            below, above = self.valid_neighbours(s)
            result.append(above if round_up or below is None else below)
        return tuple(result)


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
