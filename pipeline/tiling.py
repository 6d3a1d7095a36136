"""The tile engine: mirror padding, tile plans and the one loop that runs a network over tiles.

Overlap-tile (Ronneberger et al. 2015, Fig. 2). A valid-convolution U-Net sees ``margin`` pixels of
context on each side of every output pixel (per axis: anisotropic 3D networks have less along z). An
image is mirror-padded by the margins and cut into input tiles whose *output* tiles abut; tile origins
lie on the pooling grid (multiples of the axis's ``geometry.steps()`` from the padded origin), so the
stitched output equals one pass over the whole padded image up to float rounding. A ``"same"``-padded network gets ``context`` pixels of extra
input per tile side, and only the centre of each output tile is kept.

The prediction engine (:mod:`pipeline.engine`) calls this module for every block it predicts, a whole
image in memory or one block of a volume read with its halo (in process or on Dask workers), so
autocast, channels-last, the memory rule and the batch cap are the same everywhere.

The network contract (:class:`TiledNetwork`): ``geometry`` (:class:`pipeline.geometry.UNetGeometry`),
``spatial_dims``, ``in_channels`` and ``features`` (``features[0]``, the top level's width, sizes
the memory estimate). :class:`pipeline.networks.UNet` has them; wrappers (DDP, DataParallel,
``torch.compile``) are looked through (:func:`unwrap`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from pipeline.geometry import UNetGeometry

PAD_MODES = ("reflect", "symmetric", "replicate", "constant")


@runtime_checkable
class TiledNetwork(Protocol):
    """What the tile engine reads off a network (besides calling it on ``(N, C, *tile)``)."""

    geometry: UNetGeometry
    spatial_dims: int
    in_channels: int
    features: Sequence[int]


def unwrap(network: nn.Module) -> nn.Module:
    """The module that carries ``geometry`` behind DDP/DataParallel/compile wrappers.

    Raises:
        ValueError: nothing inside has the :class:`TiledNetwork` attributes.
    """
    net = network
    for attr in ("module", "_orig_mod"):
        while hasattr(net, attr) and not hasattr(net, "geometry"):
            net = getattr(net, attr)
    if not isinstance(net, TiledNetwork):
        raise ValueError(
            f"network {type(net).__name__} lacks the tile engine's contract (geometry, spatial_dims, in_channels, "
            "features: pipeline.tiling.TiledNetwork); use pipeline.networks.UNet"
        )
    return net


# ---------------------------------------------------------------- padding
def mirror_index(n: int, lo: int, hi: int, mode: str) -> torch.Tensor:
    """Indices into an axis of length ``n`` that pad it by ``lo``/``hi`` (any amount, either sign)."""
    i = torch.arange(-lo, n + hi)
    if mode in ("replicate", "constant") or n == 1:  # constant: callers zero what lies outside
        return i.clamp(0, n - 1)
    if mode == "reflect":  # edge pixel not repeated: ... 2 1 | 0 1 2 ... n-1 | n-2 ...
        period = 2 * (n - 1)
        i = i.remainder(period)
        return torch.where(i > n - 1, period - i, i)
    # symmetric: edge pixel repeated: ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...
    i = i.remainder(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def mirror_pad(x: torch.Tensor, pads: Sequence[tuple[int, int]], mode: str = "reflect") -> torch.Tensor:
    """Pad the trailing ``len(pads)`` axes of ``x`` by ``(low, high)`` pixels each.

    Unlike ``torch.nn.functional.pad``, pads may exceed the axis length: the image is
    mirrored repeatedly, as ``numpy.pad`` does.

    Args:
        x: tensor ``(..., *spatial)``.
        pads: one ``(low, high)`` pair per trailing spatial axis.
        mode: ``"reflect"`` (edge not repeated, the default), ``"symmetric"`` (edge
            repeated), ``"replicate"`` or ``"constant"`` (zeros).

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"padding mode must be one of {PAD_MODES}, got {mode!r}")
    first = x.ndim - len(pads)
    for axis, (lo, hi) in enumerate(pads, start=first):
        if lo == 0 and hi == 0:
            continue
        if mode == "constant":
            shape = list(x.shape)
            shape[axis] = x.shape[axis] + lo + hi
            out = x.new_zeros(shape)
            out.narrow(axis, lo, x.shape[axis]).copy_(x)
            x = out
        else:
            x = x.index_select(axis, mirror_index(x.shape[axis], lo, hi, mode).to(x.device))
    return x


# ---------------------------------------------------------------- tile plans
def _axis_plan(size: int, tile: int, stride: int) -> tuple[int, ...]:
    """Output-tile starts along one axis: ``0, stride, 2*stride, ...`` until ``size`` is covered."""
    n = 1 if size <= tile else 1 + math.ceil((size - tile) / stride)
    return tuple(i * stride for i in range(n))


def _per_axis(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def plan_tiles(image_size: Sequence[int], tile_size: Sequence[int], step: int | Sequence[int]) -> list[tuple[int, ...]]:
    """Output-tile starts per axis covering ``image_size`` with tiles of ``tile_size``.

    Starts are multiples of ``step`` (the pooling grid; an int or one per axis), so stride = ``tile``
    rounded down to a multiple of ``step``.
    """
    plans = []
    for size, tile, step in zip(image_size, tile_size, _per_axis(step, len(image_size))):
        stride = (tile // step) * step
        if stride < 1:
            raise ValueError(f"output tile {tile} is smaller than the pooling step {step}; choose a larger tile")
        plans.append(_axis_plan(size, tile, stride))
    return plans


def tile_regions(size: int, starts: Sequence[int], tile: int) -> list[tuple[int, int]]:
    """``(start, keep)`` per tile along one axis: tile ``i`` fills output ``[start, start + keep)``.

    Each tile keeps what lies before the next tile's start (the last one: up to its end),
    clipped to ``size``: the kept regions partition ``[0, size)``, so every output pixel is
    written exactly once.
    """
    ends = list(starts[1:]) + [starts[-1] + tile]
    return [(p, min(e, size) - p) for p, e in zip(starts, ends)]


def _axis_candidates(size: int, geometry: UNetGeometry, axis: int, margin: int) -> list[tuple[int, int, int]]:
    """``(computed, input tile, output tile)`` along one axis: per number of tiles covering ``size``, the
    smallest output tile (larger ones of the same count compute more and hold more)."""
    step = geometry.axis_step(axis)
    if geometry.padding == "valid":
        first = geometry.axis_min_input_size(axis) - 2 * margin
        first += max(0, math.ceil((step - first) / step)) * step  # stride >= step
    else:
        first = step
    found: dict[int, tuple[int, int, int]] = {}
    for t in range(first, max(size, first) + step, step):
        n = len(_axis_plan(size, t, (t // step) * step))
        found.setdefault(n, (n * (t + 2 * margin), t + 2 * margin, t))
    return sorted(found.values(), key=lambda c: c[1])


def auto_tile_size(
    image_size: Sequence[int], geometry: UNetGeometry, margin: int | Sequence[int], max_input_voxels: int
) -> tuple[int, ...]:
    """Choose the output tile per axis that minimises computed input voxels.

    Among the tiles whose input ``prod(t + 2 * margin)`` fits ``max_input_voxels``, pick the one
    minimising ``prod(n_tiles(t) * (t + 2 * margin))``: the voxels computed (context included) to cover
    the image. Axes are chosen jointly, so an anisotropic volume (few sections, a small z margin) gets a
    tile that is thin where the image is thin and wide in-plane. When nothing fits, the smallest tile.
    """
    margins = _per_axis(margin, len(image_size))
    per_axis = [_axis_candidates(size, geometry, axis, m) for axis, (size, m) in enumerate(zip(image_size, margins))]
    best: list = []

    def search(axis: int, voxels: int, cost: int, chosen: tuple[int, ...]) -> None:
        if axis == len(per_axis):
            if not best or (cost, voxels) < tuple(best[:2]):
                best[:] = [cost, voxels, chosen]
            return
        for computed, inputs, tile in per_axis[axis]:  # ascending input: once one overflows, all later ones do
            if voxels * inputs > max_input_voxels:
                break
            search(axis + 1, voxels * inputs, cost * computed, chosen + (tile,))

    search(0, 1, 1, ())
    return best[2] if best else tuple(c[0][2] for c in per_axis)


def context_margin(geometry: UNetGeometry, context: int | Sequence[int] | None, spatial_dims: int | None = None) -> tuple[int, ...]:
    """Input pixels added on each side of an output tile, per axis: the valid network's margins; for a
    ``"same"`` network ``context`` (an int or one per axis; default the pooling steps).

    Raises:
        ValueError: a negative ``context``, or one with the wrong number of axes.
    """
    n = spatial_dims or geometry.spatial_dims or 1
    if geometry.padding == "valid":
        return geometry.margins(n)
    margin = geometry.steps(n) if context is None else _per_axis(context, n)
    if len(margin) != n or min(margin) < 0:
        raise ValueError(f"context must be >= 0, an int or one per axis ({n}), got {context}")
    return margin


def parse_tile_size(tile_size: int | Sequence[int] | str, geometry: UNetGeometry, spatial_dims: int) -> str | tuple[int, ...]:
    """``"auto"``, or the output tile per axis, checked against the network.

    Raises:
        ValueError: another string, the wrong number of values, or (valid network) a tile that is
            not a valid output size (naming the nearest larger valid tile).
    """
    if isinstance(tile_size, str):
        if tile_size != "auto":
            raise ValueError(f"tile_size must be 'auto', an int or one int per axis, got {tile_size!r}")
        return tile_size
    tile = (int(tile_size),) * spatial_dims if isinstance(tile_size, int) else tuple(int(t) for t in tile_size)
    if len(tile) != spatial_dims or min(tile) < 1:
        raise ValueError(f"tile_size needs {spatial_dims} positive values, got {tile_size}")
    if geometry.padding == "valid":
        margins = geometry.margins(spatial_dims)
        padded = [t + 2 * m for t, m in zip(tile, margins)]
        if not geometry.is_valid(padded):
            near = geometry.output_size(geometry.nearest_valid_input_size(padded))
            raise ValueError(f"output tile {tile} is not a valid output size of this network; nearest larger valid tile: {tuple(near)}")
    return tile


def max_input_voxels(network: TiledNetwork, memory_budget_mb: float) -> int:
    """Input voxels per network call that fit ``memory_budget_mb``: a rough peak of ~6 float32
    activation maps of the top level's width (``features[0]``) per input voxel."""
    return int(memory_budget_mb * 2**20 / (4 * 6 * network.features[0]))


@dataclass(frozen=True)
class TilePlan:
    """How an image (or a block) of ``size`` is cut into tiles.

    Attributes:
        size: spatial size of the output, pixels per axis.
        tile: output tile per axis; the input tile is ``tile + 2 * margin``.
        margin: context pixels on each side of an output tile, per axis.
        starts: output-tile starts per axis (multiples of the pooling step).
        batch_size: tiles per network call.
        valid: the network's convolutions are unpadded (else the centre of each output is kept).
    """

    size: tuple[int, ...]
    tile: tuple[int, ...]
    margin: tuple[int, ...]
    starts: tuple[tuple[int, ...], ...]
    batch_size: int
    valid: bool

    @property
    def extent(self) -> tuple[int, ...]:
        """The output the tiles cover per axis (``>= size``): the last start plus the tile."""
        return tuple(s[-1] + t for s, t in zip(self.starts, self.tile))

    @property
    def input_extent(self) -> tuple[int, ...]:
        """Input pixels per axis the tiles read: ``extent + 2 * margin`` (the padded image)."""
        return tuple(e + 2 * m for e, m in zip(self.extent, self.margin))

    def pads(self) -> list[tuple[int, int]]:
        """``(low, high)`` padding per axis that turns an image of ``size`` into the input the tiles read."""
        return [(m, m + e - s) for e, s, m in zip(self.extent, self.size, self.margin)]

    def regions(self) -> list[tuple[tuple[int, int], ...]]:
        """Per tile, ``(start, keep)`` per axis (:func:`tile_regions`): they partition the output."""
        return list(itertools.product(*[tile_regions(*a) for a in zip(self.size, self.starts, self.tile)]))


def check_tile_values(batch_size: int = 4, memory_budget_mb: float = 1024.0, padding_mode: str = "reflect") -> None:
    """The tile settings that need no network.

    Raises:
        ValueError: ``batch_size < 1``, ``memory_budget_mb <= 0`` or an unknown ``padding_mode``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if memory_budget_mb <= 0:
        raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    if padding_mode not in PAD_MODES:
        raise ValueError(f"padding_mode must be one of {PAD_MODES}, got {padding_mode!r}")


def check_tile_settings(
    network: nn.Module,
    tile_size: int | Sequence[int] | str = "auto",
    batch_size: int = 4,
    memory_budget_mb: float = 1024.0,
    context: int | None = None,
    padding_mode: str = "reflect",
) -> str | tuple[int, ...]:
    """Check the tile settings against the network before any work; return the parsed ``tile_size``.

    Raises:
        ValueError: a bad ``tile_size`` (:func:`parse_tile_size`), ``batch_size < 1``,
            ``memory_budget_mb <= 0``, a negative ``context`` or an unknown ``padding_mode``.
    """
    net = unwrap(network)
    check_tile_values(batch_size, memory_budget_mb, padding_mode)
    context_margin(net.geometry, context, net.spatial_dims)
    return parse_tile_size(tile_size, net.geometry, net.spatial_dims)


def make_plan(
    network: nn.Module,
    size: Sequence[int],
    tile_size: int | Sequence[int] | str = "auto",
    batch_size: int = 4,
    memory_budget_mb: float = 1024.0,
    context: int | None = None,
) -> TilePlan:
    """The tile plan for an image or block of spatial ``size`` (pure: reads only the network's contract).

    ``"auto"`` sizes one tile to fit ``memory_budget_mb`` (:func:`auto_tile_size`); the batch is
    then cut to the tiles that fit it too (at least 1).

    Raises:
        ValueError: as :func:`check_tile_settings`.
    """
    net = unwrap(network)
    geometry = net.geometry
    tile = check_tile_settings(network, tile_size, batch_size, memory_budget_mb, context)
    size = tuple(int(s) for s in size)
    margin = context_margin(geometry, context, net.spatial_dims)
    cap = max_input_voxels(net, memory_budget_mb)
    if tile == "auto":
        tile = auto_tile_size(size, geometry, margin, cap)
    batch = max(1, min(batch_size, cap // math.prod(t + 2 * m for t, m in zip(tile, margin))))
    starts = tuple(plan_tiles(size, tile, geometry.steps(net.spatial_dims)))
    return TilePlan(size, tuple(tile), margin, starts, batch, geometry.padding == "valid")


def network_memory_format(network: nn.Module, spatial_dims: int) -> torch.memory_format:
    """``torch.channels_last`` (2D) or ``torch.channels_last_3d`` (3D) when the network's convolution
    weights are in it (after ``network.to(memory_format=...)``, :func:`pipeline.networks.memory_format`), so
    tiles reach oneDNN/cuDNN's channels-last kernels without reorders; else contiguous."""
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(spatial_dims)
    weight = next((p for p in network.parameters() if p.ndim == spatial_dims + 2 and p.shape[1] > 1 and p.shape[2:].numel() > 1), None)
    if fmt is not None and weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=fmt):
        return fmt
    return torch.contiguous_format


def run_tiles(
    padded: torch.Tensor,
    network: nn.Module,
    plan: TilePlan,
    *,
    out_device: torch.device | str | None = None,
    amp: bool | None = None,
    amp_dtype: torch.dtype = torch.bfloat16,
    progress: bool = False,
    network_args: Sequence[Any] = (),
    network_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Run ``network`` over the tiles of ``plan`` and stitch their outputs.

    Args:
        padded: ``(N, C, *plan.input_extent)``, the images already extended past their borders
            (:meth:`TilePlan.pads`), in the network's dtype.
        network: called as ``network(tiles, *network_args, **network_kwargs)`` on batches of
            ``(n, C, *input tile)`` under ``torch.inference_mode``, in its memory format
            (:func:`network_memory_format`).
        plan: from :func:`make_plan`.
        out_device: where the output is gathered (default: ``padded``'s device).
        amp: ``torch.autocast`` with ``amp_dtype``; default (``None``): on CUDA only (CPU bf16
            is slower without AMX).
        progress: a tqdm bar over batches.

    Returns:
        ``(N, out_channels, *plan.size)`` float32 (also under autocast): a normal tensor, not an
        inference tensor, so callers may modify it in place.
    """
    net_device = next(network.parameters()).device
    out_device = padded.device if out_device is None else torch.device(out_device)
    memory_format = network_memory_format(network, padded.ndim - 2)
    if amp is None:
        amp = net_device.type == "cuda"
    n_images = padded.shape[0]
    queue = [(i, region) for region in plan.regions() for i in range(n_images)]
    batches = range(0, len(queue), plan.batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="tiles", unit="batch")
    out = None
    with torch.inference_mode(), torch.autocast(net_device.type, dtype=amp_dtype, enabled=bool(amp)):
        for first in batches:
            chunk = queue[first : first + plan.batch_size]
            window = lambda region: tuple(slice(p, p + t + 2 * m) for (p, _), t, m in zip(region, plan.tile, plan.margin))  # noqa: E731
            batch = torch.stack([padded[i][(slice(None),) + window(region)] for i, region in chunk])
            batch = batch.to(net_device, non_blocking=True).contiguous(memory_format=memory_format)
            pred = network(batch, *network_args, **(network_kwargs or {}))
            if not plan.valid:  # keep the centre of a same-padded tile
                pred = pred[(slice(None), slice(None)) + tuple(slice(m, m + t) for t, m in zip(plan.tile, plan.margin))]
            if out is None:
                with torch.inference_mode(False):
                    out = torch.empty((n_images, pred.shape[1], *plan.size), dtype=torch.float32, device=out_device)
            for (i, region), tile_out in zip(chunk, pred):
                # abutting output tiles: each writes only its own region (tile_regions)
                dest = (i, slice(None)) + tuple(slice(p, p + k) for p, k in region)
                out[dest] = tile_out[(slice(None),) + tuple(slice(0, k) for _, k in region)].to(out_device)
    return out
