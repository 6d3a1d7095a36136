"""Overlap-tile inference with mirror padding (Ronneberger et al. 2015, Fig. 2).

A valid-convolution U-Net sees ``margin`` pixels of context on each side of every
output pixel. To predict an image of any size, the image is mirror-padded by the
margin, cut into input tiles whose *output* tiles abut, and the outputs are
stitched. Tile origins are kept on the pooling grid (multiples of ``2 ** depth``
from the padded origin), so the stitched result equals one forward pass over the
whole padded image up to float rounding: no blending and no seams.

MONAI's ``sliding_window_inference`` assumes an output of the input's size and
mis-stitches a valid network; this module is its counterpart for such networks.
A ``"same"``-padded network is served by the same code: each tile is given a
context margin of your choosing, and only the central part of its output is kept.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from typing import Any, Sequence

import torch
from monai.inferers import Inferer
from torch import nn

from pipeline.geometry import UNetGeometry

logger = logging.getLogger(__name__)

PAD_MODES = ("reflect", "symmetric", "replicate", "constant")


# ---------------------------------------------------------------- padding
def _mirror_index(n: int, lo: int, hi: int, mode: str) -> torch.Tensor:
    """Indices into an axis of length ``n`` that pad it by ``lo``/``hi`` (any amount)."""
    i = torch.arange(-lo, n + hi)
    if mode == "replicate" or n == 1:
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
            x = x.index_select(axis, _mirror_index(x.shape[axis], lo, hi, mode).to(x.device))
    return x


# ---------------------------------------------------------------- tile plans
def _axis_plan(size: int, tile: int, stride: int) -> tuple[int, ...]:
    """Output-tile starts along one axis: ``0, stride, 2*stride, ...`` until ``size`` is covered."""
    n = 1 if size <= tile else 1 + math.ceil((size - tile) / stride)
    return tuple(i * stride for i in range(n))


def plan_tiles(image_size: Sequence[int], tile_size: Sequence[int], step: int) -> list[tuple[int, ...]]:
    """Output-tile starts per axis covering ``image_size`` with tiles of ``tile_size``.

    Starts are multiples of ``step`` (the pooling grid), so stride = ``tile`` rounded down
    to a multiple of ``step``.
    """
    plans = []
    for size, tile in zip(image_size, tile_size):
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


def auto_tile_size(
    image_size: Sequence[int], geometry: UNetGeometry, margin: int, max_input_voxels: int
) -> tuple[int, ...]:
    """Choose the output tile per axis that minimises computed input pixels.

    Per axis, among the output tiles ``t`` whose input tile ``t + 2 * margin`` fits the
    memory cap, pick the one minimising ``n_tiles(t) * (t + 2 * margin)``: the pixels
    computed (context included) to cover that axis.
    """
    cap = max(int(max_input_voxels ** (1.0 / len(image_size))), 1)
    step = geometry.step
    tiles = []
    for size in image_size:
        if geometry.padding == "valid":
            first = geometry.min_input_size - 2 * margin
            first += max(0, math.ceil((step - first) / step)) * step  # stride >= step
            candidates = range(first, max(size, first) + step, step)
        else:
            candidates = range(step, max(size, step) + step, step)
        best = None
        for t in candidates:
            if t + 2 * margin > cap and best is not None:
                break
            stride = (t // step) * step
            cost = len(_axis_plan(size, t, stride)) * (t + 2 * margin)
            if best is None or cost < best[0]:
                best = (cost, t)
        tiles.append(best[1])
    return tuple(tiles)


# ---------------------------------------------------------------- inference
def _unwrap(network: nn.Module) -> nn.Module:
    """The module that carries ``geometry`` behind DDP/DataParallel/compile wrappers."""
    for attr in ("module", "_orig_mod"):
        while hasattr(network, attr) and not hasattr(network, "geometry"):
            network = getattr(network, attr)
    return network


def overlap_tile_inference(
    inputs: torch.Tensor,
    network: nn.Module,
    *,
    tile_size: int | Sequence[int] | str = "auto",
    batch_size: int = 4,
    padding_mode: str = "reflect",
    context: int | None = None,
    memory_budget_mb: float = 1024.0,
    device: torch.device | str | None = None,
    progress: bool = False,
    amp: bool | None = None,
    amp_dtype: torch.dtype = torch.bfloat16,
    network_args: Sequence[Any] = (),
    network_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Predict ``inputs`` tile by tile; see :class:`OverlapTileInferer` for the arguments.
    ``network_args`` / ``network_kwargs`` are passed to every ``network(tiles, *args, **kwargs)`` call.

    Args:
        inputs: ``(B, C, *spatial)``. With a 2D network and 3 spatial axes, the stack is
            predicted slice by slice along the first spatial axis, slices batched.

    Returns:
        ``(B, out_channels, *spatial)`` on ``device`` (default: the input's device).
    """
    net = _unwrap(network)
    geometry: UNetGeometry = getattr(net, "geometry", None)
    if geometry is None:
        raise ValueError(f"network {type(net).__name__} has no `geometry`; use pipeline.networks.UNet")
    nd = net.spatial_dims
    if inputs.ndim == nd + 3 and nd == 2:  # (B, C, Z, Y, X) through a 2D network
        b, c, z = inputs.shape[:3]
        flat = inputs.permute(0, 2, 1, 3, 4).reshape(b * z, c, *inputs.shape[3:])
        out = overlap_tile_inference(
            flat, network, tile_size=tile_size, batch_size=batch_size, padding_mode=padding_mode,
            context=context, memory_budget_mb=memory_budget_mb, device=device, progress=progress,
            amp=amp, amp_dtype=amp_dtype,
        )
        return out.reshape(b, z, out.shape[1], *out.shape[2:]).permute(0, 2, 1, 3, 4)
    if inputs.ndim != nd + 2:
        raise ValueError(
            f"a {nd}D network needs inputs of shape (B, C, {nd} spatial axes)"
            + (" or (B, C, Z, Y, X) for a stack" if nd == 2 else "")
            + f"; got shape {tuple(inputs.shape)}"
        )
    if inputs.shape[1] != net.in_channels:
        raise ValueError(f"network expects {net.in_channels} input channel(s), got {inputs.shape[1]} (shape {tuple(inputs.shape)})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if 0 in inputs.shape:
        raise ValueError(f"cannot predict an empty input of shape {tuple(inputs.shape)}")
    if inputs.is_complex():
        raise TypeError(f"input dtype {inputs.dtype} is not supported; give a real image (bool, integer or floating point)")
    weight_dtype = next(network.parameters()).dtype
    if inputs.dtype != weight_dtype:  # uint8 sections, float16 files, ...: computed in the network's dtype
        inputs = inputs.to(weight_dtype)
    bad = (~torch.isfinite(inputs)).sum().item() if inputs.is_floating_point() else 0
    if bad:
        raise ValueError(
            f"input has {bad} non-finite pixel(s) (NaN or Inf) of {inputs.numel()}; replace them first, "
            "e.g. with monai.transforms.NormalizeIntensity on finite values or numpy.nan_to_num"
        )

    spatial = tuple(inputs.shape[2:])
    valid = geometry.padding == "valid"
    if valid:
        margin = geometry.margin
    else:
        margin = geometry.step if context is None else int(context)
        if margin < 0:
            raise ValueError(f"context must be >= 0, got {context}")
    # rough peak of activations per input voxel: ~6 float32 maps of the top level's width
    max_voxels = int(memory_budget_mb * 2**20 / (4 * 6 * net.features[0]))
    if tile_size == "auto":  # the tile is sized for one tile per call; batching fills what is left
        tile = auto_tile_size(spatial, geometry, margin, max_voxels)
    elif isinstance(tile_size, str):
        raise ValueError(f"tile_size must be 'auto', an int or one int per axis, got {tile_size!r}")
    else:
        tile = (tile_size,) * nd if isinstance(tile_size, int) else tuple(int(t) for t in tile_size)
        if len(tile) != nd:
            raise ValueError(f"tile_size needs {nd} values, got {tile}")
        if valid:
            net_in = tuple(t + 2 * margin for t in tile)
            if not geometry.is_valid(net_in):
                near = [geometry.output_size(geometry.nearest_valid_input_size(t + 2 * margin))[0] for t in tile]
                raise ValueError(f"output tile {tile} is not a valid output size of this network; nearest larger valid tile: {tuple(near)}")
    tile_voxels = math.prod(t + 2 * margin for t in tile)
    batch_size = max(1, min(batch_size, max_voxels // tile_voxels))
    starts = plan_tiles(spatial, tile, geometry.step)
    extent = [s[-1] + t for s, t in zip(starts, tile)]
    padded = mirror_pad(inputs, [(margin, margin + e - s) for e, s in zip(extent, spatial)], padding_mode)

    out_device = inputs.device if device is None else torch.device(device)
    net_device = next(network.parameters()).device
    # tiles follow the network's memory format: a network moved to channels_last (as the bundle
    # configs do) gets channels_last tiles, so oneDNN/cuDNN run their NHWC kernels without reorders
    weight = next((p for p in network.parameters() if p.ndim == 4 and p.shape[1] > 1), None)
    nhwc = inputs.ndim == 4 and weight is not None and not weight.is_contiguous() and weight.is_contiguous(
        memory_format=torch.channels_last
    )
    memory_format = torch.channels_last if nhwc else torch.contiguous_format
    if amp is None:  # mixed precision by default on CUDA only (CPU bf16 is slower without AMX)
        amp = net_device.type == "cuda"
    out = None
    n_images = inputs.shape[0]
    regions = list(itertools.product(*[tile_regions(*a) for a in zip(spatial, starts, tile)]))
    queue = [(i, region) for region in regions for i in range(n_images)]
    iterator = range(0, len(queue), batch_size)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="tiles", unit="batch")
    with torch.inference_mode(), torch.autocast(net_device.type, dtype=amp_dtype, enabled=bool(amp)):
        for first in iterator:
            chunk = queue[first : first + batch_size]
            batch = torch.stack(
                [padded[i][(slice(None),) + tuple(slice(p, p + t + 2 * margin) for (p, _), t in zip(reg, tile))] for i, reg in chunk]
            ).to(net_device, non_blocking=True).contiguous(memory_format=memory_format)
            pred = network(batch, *network_args, **(network_kwargs or {}))
            if not valid:  # keep the centre of a same-padded tile
                pred = pred[(slice(None), slice(None)) + tuple(slice(margin, margin + t) for t in tile)]
            if out is None:  # float32 even under autocast; a normal tensor (not an inference tensor), so
                with torch.inference_mode(False):  # callers may modify it in place (TTA sums, MONAI post-processing)
                    out = torch.empty((n_images, pred.shape[1], *spatial), dtype=torch.float32, device=out_device)
            for (i, reg), tile_out in zip(chunk, pred):
                # abutting output tiles: each writes only its own region (tile_regions)
                dest = (i, slice(None)) + tuple(slice(p, p + k) for p, k in reg)
                out[dest] = tile_out[(slice(None),) + tuple(slice(0, k) for _, k in reg)].to(out_device)
    return out


@contextlib.contextmanager
def adapted_batchnorm(network: nn.Module, estimate):
    """Within the block, ``network``'s BatchNorm layers use statistics estimated by ``estimate()``.

    ``estimate`` runs the network over the data to adapt to (outputs discarded) with every
    BatchNorm layer in training mode, its running statistics reset and averaged over all
    batches (``momentum=None``); the block then runs with all BatchNorm layers in eval mode.
    On exit, the statistics, momenta and the training flags of every module are restored.
    """
    bns = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError(
            f"adapt_norm re-estimates BatchNorm statistics, but {type(_unwrap(network)).__name__} has no BatchNorm "
            "layer; build the network with norm='batch', or set adapt_norm=False"
        )
    modes = [(m, m.training) for m in network.modules()]
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)}) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the estimation batches
            m.train()
        estimate()
        for m in bns:
            m.eval()
        yield
    finally:
        for m, momentum, buffers in saved:
            m.momentum = momentum
            with torch.no_grad():
                for k, v in m.named_buffers(recurse=False):
                    v.copy_(buffers[k])
        for m, training in modes:
            m.training = training


DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


def _dihedral(x: torch.Tensor, k: int, flip: bool, inverse: bool = False) -> torch.Tensor:
    """One of the 8 symmetries of the square on the last two axes (or its inverse)."""
    if not inverse:
        x = x.flip(-1) if flip else x
        return torch.rot90(x, k, dims=(-2, -1))
    x = torch.rot90(x, -k, dims=(-2, -1))
    return x.flip(-1) if flip else x


class OverlapTileInferer(Inferer):
    """Overlap-tile inference with mirror padding, as a MONAI ``Inferer``.

    The geometry comes from the network (:class:`pipeline.networks.UNet`). For a valid
    network, tiles abut exactly and the result equals one pass over the whole padded
    image. For a ``"same"`` network, each output tile gets ``context`` pixels of extra
    input on each side, and only its centre is kept.

    Args:
        tile_size: the *output* tile size (int or one per axis; for a valid network it
            must be a valid output size, e.g. 388 or 516 for the paper's network), or
            ``"auto"``: per axis the tile that minimises computed pixels, within
            ``memory_budget_mb``.
        batch_size: tiles per network call, at most; fewer when ``memory_budget_mb`` holds fewer.
        padding_mode: how the image is extended past its border: ``"reflect"`` (the
            paper's mirroring), ``"symmetric"``, ``"replicate"`` or ``"constant"``.
        context: for ``"same"`` networks, the context margin in pixels (default ``2**depth``).
        memory_budget_mb: rough activation budget: ``"auto"`` sizes one tile to fit it, and
            the batch is cut to what fits.
        tta: average the outputs over the 8 flips/rotations of the last two axes, each
            inverted exactly (the paper averaged rotated versions). Outputs (logits) are
            averaged as the network returns them.
        device: where the output is gathered (default: the input's device).
        progress: show a tqdm progress bar over tile batches.
        amp: run the network under ``torch.autocast`` with ``amp_dtype``; default (``None``): on
            CUDA only. The output is float32 either way.
        amp_dtype: ``torch.bfloat16`` (default) or ``torch.float16``.
        adapt_norm: re-estimate the network's BatchNorm statistics on this call's input before
            predicting it (AdaBN, Li et al. 2016): one extra pass over the same tiles with the
            BatchNorm layers in training mode, then the prediction in eval mode with those
            statistics, so every tile is normalised alike and the result stays seamless. The
            network's own statistics and modes are restored afterwards. For sections whose grey
            values differ from the training data (other stack regions, other sessions). Needs
            BatchNorm layers (``norm="batch"``).

    Tiles run under ``torch.inference_mode``. They take the network's memory format: after
    ``network.to(memory_format=torch.channels_last)`` (the bundle configs do this) the tiles are
    channels-last too.
    """

    def __init__(
        self,
        tile_size: int | Sequence[int] | str = "auto",
        batch_size: int = 4,
        padding_mode: str = "reflect",
        context: int | None = None,
        memory_budget_mb: float = 1024.0,
        tta: bool = False,
        device: torch.device | str | None = None,
        progress: bool = False,
        amp: bool | None = None,
        amp_dtype: torch.dtype = torch.bfloat16,
        adapt_norm: bool = False,
    ) -> None:
        super().__init__()
        if padding_mode not in PAD_MODES:
            raise ValueError(f"padding_mode must be one of {PAD_MODES}, got {padding_mode!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
        self.tta, self.adapt_norm = tta, adapt_norm
        self.kwargs: dict[str, Any] = dict(
            tile_size=tile_size, batch_size=batch_size, padding_mode=padding_mode, context=context,
            memory_budget_mb=memory_budget_mb, device=device, progress=progress, amp=amp, amp_dtype=amp_dtype,
        )

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Predict ``inputs`` ``(B, C, *spatial)``; returns ``(B, out_channels, *spatial)``.

        Extra ``args`` and ``kwargs`` are passed on to every ``network(tiles, *args, **kwargs)`` call,
        as MONAI's inferers do."""
        settings = {**self.kwargs, "network_args": args, "network_kwargs": kwargs}
        if self.adapt_norm:
            with adapted_batchnorm(network, lambda: overlap_tile_inference(inputs, network, **settings)):
                return self._predict(inputs, network, settings)
        return self._predict(inputs, network, settings)

    def _predict(self, inputs: torch.Tensor, network: nn.Module, settings: dict) -> torch.Tensor:
        if not self.tta:
            return overlap_tile_inference(inputs, network, **settings)
        total = None
        for k, flip in DIHEDRAL:
            pred = overlap_tile_inference(_dihedral(inputs, k, flip), network, **settings)
            pred = _dihedral(pred, k, flip, inverse=True)
            total = pred if total is None else total + pred
        return total / len(DIHEDRAL)
