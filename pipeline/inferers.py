"""Overlap-tile inference with mirror padding (Ronneberger et al. 2015, Fig. 2), as a MONAI inferer.

A valid-convolution U-Net sees ``margin`` pixels of context on each side of every
output pixel. To predict an image of any size, the image is mirror-padded by the
margin, cut into input tiles whose *output* tiles abut, and the outputs are
stitched (:mod:`pipeline.tiling`, the tile engine shared with streaming). Tile origins
are kept on the pooling grid, so the stitched result equals one forward pass over the
whole padded image up to float rounding: no blending and no seams.

MONAI's ``sliding_window_inference`` assumes an output of the input's size and
mis-stitches a valid network; this module is its counterpart for such networks.
A ``"same"``-padded network is served by the same code: each tile is given a
context margin of your choosing, and only the central part of its output is kept.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Sequence

import torch
from monai.inferers import Inferer
from torch import nn

from pipeline.tiling import PAD_MODES, make_plan, mirror_pad, run_tiles, unwrap

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- inference
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
            predicted section by section along the first spatial axis, sections batched.

    Returns:
        ``(B, out_channels, *spatial)`` float32 on ``device`` (default: the input's device).

    Raises:
        ValueError: the network lacks :class:`pipeline.tiling.TiledNetwork`'s attributes; inputs of
            the wrong rank, channel count or empty; non-finite pixels; bad tile settings.
        TypeError: complex inputs.
    """
    net = unwrap(network)
    nd = net.spatial_dims
    if inputs.ndim == nd + 3 and nd == 2:  # (B, C, Z, Y, X) through a 2D network: sections as a batch
        b, c, z = inputs.shape[:3]
        flat = inputs.permute(0, 2, 1, 3, 4).reshape(b * z, c, *inputs.shape[3:])
        out = overlap_tile_inference(
            flat, network, tile_size=tile_size, batch_size=batch_size, padding_mode=padding_mode,
            context=context, memory_budget_mb=memory_budget_mb, device=device, progress=progress,
            amp=amp, amp_dtype=amp_dtype, network_args=network_args, network_kwargs=network_kwargs,
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
    if 0 in inputs.shape:
        raise ValueError(f"cannot predict an empty input of shape {tuple(inputs.shape)}")
    if inputs.is_complex():
        raise TypeError(f"input dtype {inputs.dtype} is not supported; give a real image (bool, integer or floating point)")
    plan = make_plan(network, inputs.shape[2:], tile_size, batch_size, memory_budget_mb, context)
    weight_dtype = next(network.parameters()).dtype
    if inputs.dtype != weight_dtype:  # uint8 sections, float16 files, ...: computed in the network's dtype
        inputs = inputs.to(weight_dtype)
    bad = (~torch.isfinite(inputs)).sum().item() if inputs.is_floating_point() else 0
    if bad:
        raise ValueError(
            f"input has {bad} non-finite pixel(s) (NaN or Inf) of {inputs.numel()}; replace them first, "
            "e.g. with monai.transforms.NormalizeIntensity on finite values or numpy.nan_to_num"
        )
    padded = mirror_pad(inputs, plan.pads(), padding_mode)
    return run_tiles(
        padded, network, plan, out_device=inputs.device if device is None else device, amp=amp, amp_dtype=amp_dtype,
        progress=progress, network_args=network_args, network_kwargs=network_kwargs,
    )


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
            f"adapt_norm re-estimates BatchNorm statistics, but {type(unwrap(network)).__name__} has no BatchNorm "
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


def _dihedral(x: torch.Tensor, k: int, flip: bool, inverse: bool = False, z_flip: bool = False) -> torch.Tensor:
    """One of the 8 symmetries of the square on the last two axes (or its inverse), with ``z_flip`` also
    the flip of the third-last axis (the section axis of a volume)."""
    if not inverse:
        x = x.flip(-1) if flip else x
        x = x.flip(-3) if z_flip else x
        return torch.rot90(x, k, dims=(-2, -1))
    x = torch.rot90(x, -k, dims=(-2, -1))
    x = x.flip(-3) if z_flip else x
    return x.flip(-1) if flip else x


def tta_transforms(network: nn.Module, inputs: torch.Tensor) -> list[tuple[int, bool, bool]]:
    """``(k, flip, z_flip)`` of the test-time augmentation: the 8 flips/rotations in-plane, and for a 3D
    network on a volume each of them also flipped along z (16)."""
    volume = unwrap(network).spatial_dims == 3 and inputs.ndim == 5
    return [(k, flip, z) for z in ((False, True) if volume else (False,)) for k, flip in DIHEDRAL]


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
        tta: average the outputs over the 8 flips/rotations of the last two axes (in-plane), each
            inverted exactly (the paper averaged rotated versions); a 3D network also averages each of
            them flipped along z (16 passes). Outputs (logits) are averaged as the network returns them.
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
        total, group = None, tta_transforms(network, inputs)
        for k, flip, z_flip in group:
            pred = overlap_tile_inference(_dihedral(inputs, k, flip, z_flip=z_flip), network, **settings)
            pred = _dihedral(pred, k, flip, inverse=True, z_flip=z_flip)
            total = pred if total is None else total + pred
        return total / len(group)
