"""The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015), in 2D and 3D.

One class serves both the paper's network (unpadded "valid" convolutions,
centre-cropped skip connections, 572x572 -> 388x388), the widespread padded
variant (``padding="same"``, usually with BatchNorm), and the 3D U-Net (Cicek et al.
2016) with per-axis kernels and pooling for anisotropic serial-section stacks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.geometry import PADDING_MODES, UNetGeometry, _plain

NORMS = (None, "batch", "instance")


def _norm_layer(norm: str | None, spatial_dims: int, channels: int) -> nn.Module | None:
    if norm is None:
        return None
    if norm == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)


class ConvBlock(nn.Sequential):
    """``convs`` x (conv k x k -> [norm] -> ReLU); the bias is dropped when normalised. ``kernel_size`` is an
    int or one odd size per axis."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, convs: int, kernel_size: int | tuple[int, ...], padding: str,
        norm: str | None,
    ) -> None:
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        pad = 0 if padding == "valid" else (kernel_size // 2 if isinstance(kernel_size, int) else tuple(k // 2 for k in kernel_size))
        layers: list[nn.Module] = []
        for i in range(convs):
            layers.append(conv(in_channels if i == 0 else out_channels, out_channels, kernel_size, padding=pad, bias=norm is None))
            norm_layer = _norm_layer(norm, spatial_dims, out_channels)
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net returning logits, shape ``(B, in_channels, *spatial) -> (B, out_channels, *out_spatial)``.

    With ``padding="valid"`` (the paper) ``out_spatial`` is smaller than the input by
    ``2 * geometry.margin`` per axis and the input size must be valid (see
    :mod:`pipeline.geometry`); ``network.geometry`` answers which sizes are. With
    ``padding="same"`` the output has the input's size. Sizes that are not divisible by
    ``2 ** depth`` are still accepted: pooling floors odd sizes, and the up-sampled
    decoder tensor, then one pixel short of its skip connection, is zero-padded at the
    end of that axis before the concatenation (as the common PyTorch implementation
    does).

    The paper's settings are the defaults: 2D, 1 input channel, 2 output classes,
    features 64..1024, two 3x3 convolutions per level, no normalisation, dropout at the
    end of the contracting path, 2x2 stride-2 up-convolutions that halve the channels,
    a final 1x1 convolution, and He-normal initialisation with std ``sqrt(2 / N)``,
    ``N = k ** spatial_dims * in_channels`` (paper, section 3). That network has 23
    convolution layers and 31,030,658 parameters and maps 572x572 to 388x388.

    Anisotropic 3D (serial-section EM): ``kernel_size`` and ``pool`` per level and per axis, as
    nnU-Net's plans and pytorch-3dunet allow, e.g. ``pool=[[1, 2, 2]] * 3 + [[2, 2, 2]]`` with
    ``kernel_size=[[1, 3, 3]] * 3 + [[3, 3, 3]] * 2`` for 40 x 4 x 4 nm voxels
    (:func:`pipeline.geometry.propose_scheme`); each level's up-convolution has its pooling factor as
    kernel and stride. The geometry (valid sizes, margins per axis) follows: ``(22, 252, 252)`` ->
    ``(6, 68, 68)`` for that scheme.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the input image.
        out_channels: channels of the logits (2 for soft-max, 1 for a sigmoid).
        features: channels at each level, top to bottom; ``len(features) - 1`` poolings.
        padding: ``"valid"`` (the paper) or ``"same"``.
        norm: None (the paper), ``"batch"`` or ``"instance"``.
        dropout: dropout probability after the bottleneck (0 disables it).
        convs_per_level: convolutions in each block (the paper: 2).
        kernel_size: odd kernel size of the block convolutions (the paper: 3): an int, one per axis, or one
            entry per level (``len(features)``), each an int or one per axis (:class:`pipeline.geometry.UNetGeometry`).
        pool: max-pooling factors: None (2x2, the paper), an int, one per axis, or one entry per pooling
            (``len(features) - 1``), each an int or one per axis.

    Raises:
        ValueError: bad settings, or per-axis entries whose length is not ``spatial_dims``.
    """

    __jit_unused_properties__ = ["margin"]  # TorchScript export (ckpt_export) compiles forward only

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        features: Sequence[int] = (64, 128, 256, 512, 1024),
        padding: str = "valid",
        norm: str | None = None,
        dropout: float = 0.5,
        convs_per_level: int = 2,
        kernel_size: int | Sequence = 3,
        pool: int | Sequence | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if padding not in PADDING_MODES:
            raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        features = tuple(int(f) for f in features)
        if len(features) < 2 or any(f < 1 for f in features):
            raise ValueError(f"features needs at least two positive channel counts, got {features}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.features = features
        self.padding = padding
        self.geometry = UNetGeometry(len(features) - 1, convs_per_level, _plain(kernel_size), padding, _plain(pool))
        if self.geometry.spatial_dims not in (None, spatial_dims):
            raise ValueError(f"kernel_size {_plain(kernel_size)} / pool {_plain(pool)} give {self.geometry.spatial_dims} values per "
                             f"axis; spatial_dims is {spatial_dims}")
        depth = len(features) - 1
        kernels, pools = self.geometry._kernels, self.geometry._pools  # per level: int or one per axis

        block = dict(spatial_dims=spatial_dims, convs=convs_per_level, padding=padding, norm=norm)
        conv_t = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        max_pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        # pools[0] is the identity: level 0 is not pooled (a ModuleList zipped with the encoder scripts in TorchScript)
        self.pools = nn.ModuleList([nn.Identity()] + [max_pool(p) for p in pools])
        self.encoder = nn.ModuleList(
            ConvBlock(in_channels=c_in, out_channels=c_out, kernel_size=kernels[level], **block)
            for level, (c_in, c_out) in enumerate(zip((in_channels,) + features[:-1], features))
        )
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        levels_up = range(depth - 1, -1, -1)  # decoder levels, bottom-most first
        self.upconvs = nn.ModuleList(conv_t(features[lv + 1], features[lv + 1] // 2, pools[lv], stride=pools[lv]) for lv in levels_up)
        self.decoder = nn.ModuleList(
            ConvBlock(in_channels=features[lv] + features[lv + 1] // 2, out_channels=features[lv], kernel_size=kernels[lv], **block)
            for lv in levels_up
        )
        self.head = conv(features[0], out_channels, 1)
        self._init_weights()
        #: what a checkpoint must match (dropout does not change the weights' meaning)
        self.architecture = {
            "spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": out_channels,
            "features": list(features), "padding": padding, "norm": norm,
            "convs_per_level": convs_per_level, "kernel_size": _plain(kernel_size),
        }
        if pool is not None:  # recorded only when set: checkpoints of the paper's 2x2 pooling read as before
            self.architecture["pool"] = _plain(pool)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        state_dict.setdefault(prefix + "_extra_state", None)  # a checkpoint from before the record still loads
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict:
        """Saved in every ``state_dict`` as ``_extra_state``: ``{"architecture": {...}}`` (plain values,
        so ``torch.load(weights_only=True)`` reads it back)."""
        return {"architecture": dict(self.architecture)}

    def architecture_diff(self, state: dict | None) -> list[str]:
        """The settings in which an ``_extra_state`` record differs from this network, as
        ``"padding: checkpoint 'same', network 'valid'"``; empty for a record from before
        architectures were saved (then only parameter shapes can be checked)."""
        recorded = (state or {}).get("architecture")
        if recorded is None:
            return []
        keys = list(self.architecture) + [k for k in recorded if k not in self.architecture]  # "pool": absent = None
        return [f"{k}: checkpoint {recorded.get(k)!r}, network {self.architecture.get(k)!r}" for k in keys
                if recorded.get(k) != self.architecture.get(k)]

    def set_extra_state(self, state: dict | None) -> None:
        """Check a loaded checkpoint's recorded architecture against this network's.

        Raises:
            ValueError: naming each setting that differs, since parameters of equal shapes can
                still mean another network (``padding="same"`` vs ``"valid"``).
        """
        diff = self.architecture_diff(state)
        if diff:
            raise ValueError(
                "the checkpoint was trained with another architecture (" + "; ".join(diff) + "); build the network "
                "it records (pipeline.checkpoints.network_from_checkpoint) or the training run's one"
            )

    def _init_weights(self) -> None:
        """He-normal: std = sqrt(2 / N), N = k^d * in_channels (paper, section 3); zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                c_in = m.in_channels
                fan_in = math.prod(m.kernel_size) * c_in
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def margin(self) -> int | tuple[int, ...]:
        """Pixels lost on each side of each axis (92 for the paper's valid network); one per axis,
        ``geometry.margins()``, when the axes differ (anisotropic schemes)."""
        margins = self.geometry.margins(self.spatial_dims)
        return margins[0] if len(set(margins)) == 1 else margins

    def output_size(self, input_size: int | Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for a spatial input size (raises ``ValueError`` when invalid)."""
        return self.geometry.output_size(input_size)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected input of shape (B, C, {', '.join('*' * self.spatial_dims)}) with "
                f"{self.spatial_dims} spatial dims, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        if self.padding == "valid":
            self.geometry.check_input_size(x.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        skips: list[torch.Tensor] = []
        for pool, block in zip(self.pools, self.encoder):
            x = block(pool(x))
            skips.append(x)
        x = self.dropout(skips.pop())
        for upconv, block in zip(self.upconvs, self.decoder):
            x = upconv(x)
            skip = skips.pop()
            if self.padding == "valid":  # centre-crop the skip to the up-sampled size
                for d in range(2, skip.dim()):
                    skip = skip.narrow(d, (skip.shape[d] - x.shape[d]) // 2, x.shape[d])
            elif skip.shape[2:] != x.shape[2:]:  # odd sizes: zero-pad the end of x
                pad: list[int] = []
                for d in range(x.dim() - 1, 1, -1):
                    pad += [0, skip.shape[d] - x.shape[d]]
                x = F.pad(x, pad)
            x = block(torch.cat([skip, x], dim=1))
        return self.head(x)


def memory_format(spatial_dims: int, channels_last: bool) -> torch.memory_format:
    """The memory format for ``network.to(memory_format=...)``: ``torch.channels_last`` (2D) or
    ``torch.channels_last_3d`` (3D) when ``channels_last``, else ``torch.contiguous_format``
    (``torch.channels_last`` on a 3D network fails: "required rank 4 tensor")."""
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
