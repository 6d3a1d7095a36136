"""Overlap-tile inference with mirror padding (Ronneberger et al. 2015, Fig. 2), as a MONAI inferer.

A valid-convolution U-Net sees ``margin`` pixels of context on each side of every output pixel. To
predict an image of any size, the image is mirror-padded by the margin, cut into input tiles whose
*output* tiles abut, and the outputs are stitched. Tile origins are kept on the pooling grid, so the
stitched result equals one forward pass over the whole padded image up to float rounding: no blending
and no seams. This module is MONAI's ``Inferer`` contract over the prediction engine
(:func:`pipeline.engine.predict`, a :class:`~pipeline.engine.TensorSource` into a :class:`~pipeline.engine.TensorSink`).

MONAI's ``sliding_window_inference`` assumes an output of the input's size and mis-stitches a valid
network; this module is its counterpart for such networks. A ``"same"``-padded network is served by
the same code: each tile is given a context margin of your choosing, and only the central part of its
output is kept.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from monai.inferers import Inferer
from torch import nn

from pipeline.engine import TensorSink, TensorSource, TileSettings, predict
from pipeline.engine.tta import adapted_batchnorm, tta_transforms
from pipeline.tiling import unwrap

__all__ = ["OverlapTileInferer", "adapted_batchnorm", "overlap_tile_inference", "tta_transforms"]


def overlap_tile_inference(
    inputs: torch.Tensor, network: nn.Module, settings: TileSettings | None = None, *, device: torch.device | str | None = None,
    network_args: Sequence[Any] = (), network_kwargs: dict[str, Any] | None = None, **options: Any,
) -> torch.Tensor:
    """Predict ``inputs`` tile by tile (:func:`pipeline.engine.predict`, the whole image as one block).

    Args:
        inputs: ``(B, C, *spatial)``, normalised. With a 2D network and 3 spatial axes, the stack is
            predicted section by section along the first spatial axis, sections batched.
        settings: :class:`pipeline.engine.TileSettings`, or its fields as ``options``.
        device: where the output is gathered (default: the input's device).
        network_args, network_kwargs: passed to every ``network(tiles, *args, **kwargs)`` call.

    Returns:
        ``(B, out_channels, *spatial)`` float32 on ``device``.

    Raises:
        ValueError: the network lacks :class:`pipeline.tiling.TiledNetwork`'s attributes; inputs of the wrong
            rank, channel count or empty; non-finite pixels; bad tile settings.
        TypeError: complex inputs.
    """
    settings = settings or TileSettings(**options)
    net = unwrap(network)
    nd = net.spatial_dims
    if inputs.ndim != nd + 2 and not (nd == 2 and inputs.ndim == 5):
        raise ValueError(
            f"a {nd}D network needs inputs of shape (B, C, {nd} spatial axes)"
            + (" or (B, C, Z, Y, X) for a stack" if nd == 2 else "")
            + f"; got shape {tuple(inputs.shape)}"
        )
    if inputs.shape[1] != net.in_channels:
        raise ValueError(f"network expects {net.in_channels} input channel(s), got {inputs.shape[1]} (shape {tuple(inputs.shape)})")
    outputs = [predict(TensorSource(image), network, settings, TensorSink(device), network_args=network_args,
                       network_kwargs=network_kwargs) for image in inputs]
    return torch.stack(outputs) if len(outputs) > 1 else outputs[0][None]


class OverlapTileInferer(Inferer):
    """Overlap-tile inference with mirror padding, as a MONAI ``Inferer`` over :func:`pipeline.engine.predict`.

    The geometry comes from the network (:class:`pipeline.networks.UNet`). For a valid network, tiles abut
    exactly and the result equals one pass over the whole padded image. For a ``"same"`` network, each
    output tile gets ``context`` pixels of extra input on each side, and only its centre is kept.

    Args:
        tile_size, batch_size, padding_mode, context, memory_budget_mb, amp, amp_dtype, progress: as in
            :class:`pipeline.engine.TileSettings`.
        tta: average each tile's outputs over the 8 flips/rotations of the last two axes (a 3D network: each
            also flipped along z, 16 passes), each inverted exactly (:class:`pipeline.engine.tta.FlipAverage`).
        adapt_norm: re-estimate the network's BatchNorm statistics on this call's input before predicting it
            (AdaBN, Li et al. 2016): one extra pass over the same tiles with the BatchNorm layers in training
            mode, then the prediction in eval mode with those statistics, so every tile is normalised alike
            and the result stays seamless. The network's own statistics and modes are restored afterwards.
            Needs BatchNorm layers (``norm="batch"``).
        device: where the output is gathered (default: the input's device).

    Tiles run under ``torch.inference_mode``, in the network's memory format (channels-last after
    ``network.to(memory_format=torch.channels_last)``, as the bundle configs do).

    Raises:
        ValueError: ``batch_size < 1``, ``memory_budget_mb <= 0`` or an unknown ``padding_mode`` (at construction).
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
        self.settings = TileSettings(tile_size=tile_size, batch_size=batch_size, padding_mode=padding_mode, context=context,
                                     memory_budget_mb=memory_budget_mb, amp=amp, amp_dtype=amp_dtype, tta=tta,
                                     adapt_norm=adapt_norm, progress=progress)
        self.device = device

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Predict ``inputs`` ``(B, C, *spatial)``; returns ``(B, out_channels, *spatial)``.

        Extra ``args`` and ``kwargs`` are passed on to every ``network(tiles, *args, **kwargs)`` call,
        as MONAI's inferers do."""
        return overlap_tile_inference(inputs, network, self.settings, device=self.device, network_args=args, network_kwargs=kwargs)
