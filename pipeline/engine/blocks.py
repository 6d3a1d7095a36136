"""Blocks: how an image is cut into blocks, and one block predicted (read with its halo, then the tile engine).

Exactness. Block starts along the network axes are multiples of the axis's ``geometry.steps()`` (the
pooling grid). A block is read with a halo of the axis's margin (plus the tile round-up), mirrored about
the *image* border where it leaves the image (:func:`pipeline.engine.sources.axis_map`, the index map of
:func:`pipeline.tiling.mirror_pad`), and its tiles start at the block start. Every output pixel thus sees
the input window and pooling phase it has in one pass over the whole padded image: any block layout gives
the same result up to float rounding, a whole image in memory being the layout of one block. (A
``"same"`` network needs an explicit ``tile_size`` dividing the block size.)
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.engine.settings import TileSettings
from pipeline.engine.sources import axis_map
from pipeline.tiling import make_plan, run_tiles, unwrap

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockLayout:
    """How an image of spatial ``shape`` is cut into blocks of ``block`` output pixels per axis.

    ``stack_axes`` leading spatial axes are not seen by the network (the sections of a stack through a 2D
    network); their pixels are batched.
    """

    shape: tuple[int, ...]
    block: tuple[int, ...]
    stack_axes: int

    @property
    def grid(self) -> tuple[int, ...]:
        """Blocks per axis."""
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.block))

    @property
    def chunks(self) -> tuple[int, ...]:
        """The block clipped to the image: the chunk shape of a store written block by block."""
        return tuple(min(b, s) for b, s in zip(self.block, self.shape))

    def indices(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*map(range, self.grid)))

    def box(self, index: Sequence[int]) -> tuple[list[int], list[int]]:
        """``(lo, hi)``: the pixels of block ``index`` per axis, ``[lo, hi)``."""
        lo = [i * b for i, b in zip(index, self.block)]
        return lo, [min(s + b, n) for s, b, n in zip(lo, self.block, self.shape)]


def block_layout(network: nn.Module, spatial: Sequence[int], block_size: int | Sequence[int] | None = None) -> BlockLayout:
    """The blocks of an image of ``spatial`` size for ``network``.

    Args:
        block_size: output pixels per block and axis, or one int for the network axes (a stack's section
            axis then gets 1); network axes are rounded up to multiples of ``geometry.steps()`` (logged).
            None: one block, the whole image.

    Raises:
        ValueError: a ``block_size`` of the wrong length or not positive.
    """
    net = unwrap(network)
    shape, nd = tuple(int(s) for s in spatial), net.spatial_dims
    k = len(shape) - nd
    if block_size is None:
        return BlockLayout(shape, shape, k)
    block = [1] * k + [int(block_size)] * nd if isinstance(block_size, int) else [int(b) for b in block_size]
    if len(block) != len(shape) or min(block) < 1:
        raise ValueError(f"block_size needs {len(shape)} positive values for an image of shape {shape}, got {block_size}")
    steps = net.geometry.steps(nd)
    rounded = block[:k] + [math.ceil(b / step) * step for b, step in zip(block[k:], steps)]
    if rounded != block:
        logger.warning("block size %s rounded up to %s (multiples of the pooling steps %s)", block, rounded, steps)
    return BlockLayout(shape, tuple(rounded), k)


def run_block(
    network: nn.Module, source: Any, settings: TileSettings, layout: BlockLayout, index: Sequence[int], out_device: Any = None,
    progress: bool = False, network_args: Sequence[Any] = (), network_kwargs: dict | None = None,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """Predict block ``index``: read it with its halo from ``source``, run the tiles (:func:`pipeline.tiling.run_tiles`).

    Returns:
        The logits ``(out_channels, *block)`` float32 on ``out_device`` (default: where the source's block
        lies), and the block's no-data mask ``(*block)`` (bool) or None.
    """
    k = layout.stack_axes
    lo, hi = layout.box(index)
    tiles = make_plan(network, [h - s for s, h in zip(lo[k:], hi[k:])], settings.tile_size, settings.batch_size,
                      settings.memory_budget_mb, settings.context)
    maps = [(np.arange(lo[a], hi[a]), None) for a in range(k)]
    maps += [axis_map(s - m, s + e + m, n, settings.padding_mode) for s, e, n, m in zip(lo[k:], tiles.extent, layout.shape[k:], tiles.margin)]
    x, nodata = source.read(maps)
    if nodata is not None:
        nodata = nodata[(slice(None),) * k + tuple(slice(m, m + n) for n, m in zip(tiles.size, tiles.margin))]
    x = torch.as_tensor(x)
    images = (x.movedim(1, 0) if k else x[None]).to(next(network.parameters()).dtype)  # (N, C, *padded)
    logits = run_tiles(images.contiguous(), network, tiles, out_device=out_device, amp=settings.amp_for(network),
                       amp_dtype=settings.amp_dtype, progress=progress, network_args=network_args, network_kwargs=network_kwargs)
    return (logits.movedim(0, 1) if k else logits[0]), nodata
