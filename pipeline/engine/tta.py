"""Test-time augmentation and AdaBN: what the engine does to the network, not to the data.

Flips and rotations are applied to every *tile* (:class:`FlipAverage`). A valid network's input tile has an
even size at every pooling, so a flipped tile pools the same pixel pairs: the averaged output at a pixel
does not depend on the tile (or block) it lies in, and the stitched result stays seamless, equal in memory
and block by block.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn

from pipeline.tiling import unwrap

DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))


def dihedral(x: torch.Tensor, k: int, flip: bool, inverse: bool = False, z_flip: bool = False) -> torch.Tensor:
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


class FlipAverage(nn.Module):
    """``network`` averaged over :func:`tta_transforms` of its input ``(N, C, *tile)``, each output inverted
    exactly (the paper averaged rotated versions). Logits are averaged as the network returns them.

    The wrapped network stays reachable as ``module`` (:func:`pipeline.tiling.unwrap` finds its geometry).
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.module = network

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        group = tta_transforms(self.module, x)
        total = None
        for k, flip, z_flip in group:
            out = dihedral(self.module(dihedral(x, k, flip, z_flip=z_flip), *args, **kwargs), k, flip, inverse=True, z_flip=z_flip)
            total = out if total is None else total + out
        return total / len(group)


@contextlib.contextmanager
def adapted_batchnorm(network: nn.Module, estimate: Callable[[], Any]):
    """Within the block, ``network``'s BatchNorm layers use statistics estimated by ``estimate()``.

    ``estimate`` runs the network over the data to adapt to (outputs discarded) with every
    BatchNorm layer in training mode, its running statistics reset and averaged over all
    batches (``momentum=None``); the block then runs with all BatchNorm layers in eval mode.
    On exit, the statistics, momenta and the training flags of every module are restored.

    Raises:
        ValueError: the network has no BatchNorm layer.
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
