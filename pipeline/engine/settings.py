"""The settings of one prediction: how the tile engine cuts and runs tiles, and how large a block is."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from pipeline.tiling import check_tile_settings, check_tile_values


@dataclass(frozen=True)
class TileSettings:
    """One value for everything :func:`pipeline.engine.predict` needs besides the source, network and sink.

    Attributes:
        tile_size: the *output* tile per axis (int or one per network axis; a valid output size of a valid
            network, e.g. 388 or 516 for the paper's), or ``"auto"``: the tile that computes the fewest
            pixels within ``memory_budget_mb`` (:func:`pipeline.tiling.auto_tile_size`).
        batch_size: tiles per network call, at most (fewer when ``memory_budget_mb`` holds fewer).
        padding_mode: how the image is extended past its border: ``"reflect"`` (the paper's mirroring),
            ``"symmetric"``, ``"replicate"`` or ``"constant"`` (zeros).
        context: input pixels added on each side of a ``"same"`` network's tile (default its pooling steps).
        memory_budget_mb: rough activation budget of one batch of tiles (MiB).
        block_size: output pixels per block and spatial axis (or one int for the network axes; a stack's
            section axis then gets 1), rounded up to the pooling steps; None: the whole image is one block.
        device: where blocks run (default: the network's device; ``"cpu"`` on Dask workers).
        amp: ``torch.autocast`` with ``amp_dtype`` for the tiles; None: on CUDA only.
        amp_dtype: ``torch.bfloat16`` or ``torch.float16``.
        tta: average each tile's logits over the 8 in-plane flips/rotations (a 3D network: also flipped in z,
            16), each inverted exactly (:class:`pipeline.engine.tta.FlipAverage`).
        adapt_norm: re-estimate the BatchNorm statistics on the whole input first (AdaBN, Li et al. 2016;
            :func:`pipeline.engine.tta.adapted_batchnorm`); in process only.
        progress: tqdm bars over tile batches (one block) or over blocks.

    Raises:
        ValueError: at construction, ``batch_size < 1``, ``memory_budget_mb <= 0`` or an unknown
            ``padding_mode``; from :meth:`checked`, a tile or context that does not fit the network.
    """

    tile_size: int | Sequence[int] | str = "auto"
    batch_size: int = 4
    padding_mode: str = "reflect"
    context: int | Sequence[int] | None = None
    memory_budget_mb: float = 1024.0
    block_size: int | Sequence[int] | None = None
    device: Any = None
    amp: bool | None = None
    amp_dtype: torch.dtype = torch.bfloat16
    tta: bool = False
    adapt_norm: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        check_tile_values(self.batch_size, self.memory_budget_mb, self.padding_mode)

    def checked(self, network: nn.Module) -> TileSettings:
        """These settings with ``tile_size`` parsed against ``network`` (:func:`pipeline.tiling.check_tile_settings`)."""
        tile = check_tile_settings(network, self.tile_size, self.batch_size, self.memory_budget_mb, self.context, self.padding_mode)
        return dataclasses.replace(self, tile_size=tile)

    def replace(self, **changes: Any) -> TileSettings:
        return dataclasses.replace(self, **changes)

    def amp_for(self, network: nn.Module) -> bool:
        """Whether the tiles run under autocast: ``amp``, or by default on CUDA only (for the device the blocks run on)."""
        if self.amp is not None:
            return bool(self.amp)
        device = torch.device(self.device) if self.device is not None else next(network.parameters()).device
        return device.type == "cuda"
