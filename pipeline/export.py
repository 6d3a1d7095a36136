"""Export a trained checkpoint for other tools, and read such exports back.

- :func:`network_data_format`: the bundle metadata's ``network_data_format`` (MONAI bundle spec) of a
  :class:`pipeline.networks.UNet`, from its recorded architecture: channels and the spatial-shape
  formulas (``"16*n+172"`` in, ``"16*n-12"`` out for the paper's valid network of depth 4).
- :func:`bundle_metadata`: ``metadata.json`` merged with the fragment an overlay ships beside it
  (``configs/<overlay>_metadata.json``), as ``--meta_file "['...', '...']"`` merges them.
- :func:`export_torchscript`: a scripted network with the config it was run with embedded (all files
  and overrides merged, the architecture written out) and the metadata of that network.
- :class:`ProbabilityUNet`: the exported model; bioimage.io packages of it are :mod:`pipeline.bioimageio`'s.

The exported model computes probabilities (:class:`ProbabilityUNet`: soft-max over the classes, or a
sigmoid for one channel), so a package is complete without this project's post-processing.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from pipeline.networks import UNet
from pipeline.tiling import mirror_index

#: Ronneberger, Fischer, Brox (MICCAI 2015), the paper this network implements
PAPER = "Ronneberger O., Fischer P., Brox T. U-Net: Convolutional Networks for Biomedical Image Segmentation. MICCAI 2015, LNCS 9351, pp. 234-241"
PAPER_DOI = "10.1007/978-3-319-24574-4_28"
AXES = {2: ("y", "x"), 3: ("z", "y", "x")}


class ProbabilityUNet(nn.Module):
    """The exported model: :class:`pipeline.networks.UNet` for an input of any size, followed by its activation:
    ``(B, C_in, *spatial)`` -> probabilities ``(B, C_out, *spatial)`` of the input's size, a soft-max over the
    channels (``out_channels`` >= 2) or a sigmoid (1 channel, BCE-trained). Its ``state_dict`` is the UNet's under
    ``unet.`` (no other parameters).

    A valid network mirror-pads its input (``reflect``, the pipeline's default) by its margin before each axis and up
    to the next valid size after it, and keeps the first ``spatial`` outputs: its pooling grid starts one margin
    before the input, as the pipeline's overlap-tile prediction's does (:mod:`pipeline.tiling`), so the output
    equals the pipeline's prediction of the same (normalised) input up to float rounding. A ``"same"`` network
    runs as it is.

    Args: those of :class:`pipeline.networks.UNet` (``dropout`` is ignored: it is exported in eval mode).
    """

    def __init__(self, **architecture: Any) -> None:
        super().__init__()
        self.unet = UNet(**{**architecture, "dropout": 0.0})
        self.softmax = self.unet.out_channels > 1
        dims, geometry = self.unet.spatial_dims, self.unet.geometry
        self.pad = self.unet.padding == "valid"
        self.margins = list(geometry.margins(dims))
        self.steps = list(geometry.steps(dims))
        self.min_sizes = list(geometry.min_input_sizes(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x.dim() - len(self.margins)
        sizes = [int(x.shape[first + axis]) for axis in range(len(self.margins))]
        if self.pad:
            for axis in range(len(sizes)):
                n, margin, step, low = sizes[axis], self.margins[axis], self.steps[axis], self.min_sizes[axis]
                valid = low + step * max(0, (n + 2 * margin - low + step - 1) // step)  # smallest valid size >= n + 2 margin
                x = x.index_select(first + axis, mirror_index(n, margin, valid - n - margin, "reflect").to(x.device))
        logits = self.unet(x)
        if self.pad:
            for axis in range(len(sizes)):
                logits = logits.narrow(first + axis, 0, sizes[axis])
        if self.softmax:
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)


def shape_formulas(network: UNet) -> tuple[list[str], list[str]]:
    """Valid input and output sizes per axis as MONAI's metadata writes them (``n`` >= 1):
    ``(["16*n+172", ...], ["16*n-12", ...])`` for the paper's valid network (188, 204, ... -> 4, 20, ...);
    ``"16*n"`` both ways for a padded one (any size works; multiples of the pooling step avoid padding)."""
    geometry, dims = network.geometry, network.spatial_dims
    steps = geometry.steps(dims)
    if network.padding != "valid":
        return [f"{s}*n" for s in steps], [f"{s}*n" for s in steps]

    def formula(step: int, offset: int) -> str:
        return f"{step}*n" + (f"+{offset}" if offset > 0 else f"-{-offset}" if offset < 0 else "")

    mins, margins = geometry.min_input_sizes(dims), geometry.margins(dims)
    return ([formula(s, m - s) for s, m in zip(steps, mins)],
            [formula(s, m - s - 2 * g) for s, m, g in zip(steps, mins, margins)])


def network_data_format(network: UNet, channel_def: dict | None = None) -> dict:
    """The ``network_data_format`` of MONAI's bundle metadata for ``network`` (shapes :func:`shape_formulas`;
    input ``image`` float32 with its channels, output ``pred`` with ``channel_def``)."""
    inputs, outputs = shape_formulas(network)
    return {
        "inputs": {"image": {
            "type": "image", "format": "magnitude", "modality": "EM", "num_channels": network.in_channels,
            "spatial_shape": inputs, "dtype": "float32", "value_range": [], "is_patch_data": True,
            "channel_def": {str(i): "image" for i in range(network.in_channels)},
        }},
        "outputs": {"pred": {
            "type": "image", "format": "segmentation", "num_channels": network.out_channels,
            "spatial_shape": outputs, "dtype": "float32", "value_range": [], "is_patch_data": True,
            "channel_def": channel_def or {str(i): f"class {i} (logit)" for i in range(network.out_channels)},
        }},
    }


def metadata_fragment(overlay: str | os.PathLike) -> Path | None:
    """The metadata fragment an overlay ships beside it (``configs/x.yaml`` -> ``configs/x_metadata.json``), or None."""
    path = Path(overlay)
    fragment = path.with_name(path.stem + "_metadata.json")
    return fragment if fragment.is_file() else None


def bundle_metadata(config_files: Sequence[str | os.PathLike], meta_file: str | os.PathLike | None = None) -> tuple[dict, list[str]]:
    """``metadata.json`` (beside the first config file, or ``meta_file``) merged with the fragment of each
    overlay that has one. Returns the merged dict and the files read (for ``--meta_file``)."""
    files = [Path(meta_file) if meta_file else Path(config_files[0]).parent / "metadata.json"]
    files += [f for f in (metadata_fragment(c) for c in config_files[1:]) if f is not None]
    from monai.bundle import ConfigParser

    names = [str(f) for f in files]
    return ConfigParser.load_config_files(names), names  # merged as --meta_file merges them ('#' ids set nested entries)


def merged_config(config_files: Sequence[str | os.PathLike], overrides: dict | None = None) -> dict:
    """The raw config MONAI runs: the files merged in order (later ids replace earlier ones, ``a#b`` ids
    set nested entries) and then ``overrides``; expressions are kept as written."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    for key, value in (overrides or {}).items():
        parser[key] = value
    return copy.deepcopy(parser.get())


def export_torchscript(network: UNet, filepath: str | os.PathLike, config: dict | None = None, metadata: dict | None = None,
                       overwrite: bool = False) -> str:
    """Script ``network`` (``torch.jit.script``: every valid input size works, unlike tracing) and save it with
    MONAI's ``save_net_with_metadata``, embedding ``metadata.json`` (``metadata`` with the network's own
    ``network_data_format``) and ``inference.json``: ``config`` with ``architecture`` set to the network's
    record, so the file says which network it holds (``monai.data.load_net_with_metadata`` reads both back).

    Returns the path written (``.ts`` added when there is no suffix), replaced atomically.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is false (:func:`pipeline.io.check_outputs`).
    """
    from monai.data import save_net_with_metadata

    from pipeline.io import check_outputs, replace_atomically

    filepath = Path(filepath)
    if not filepath.suffix:
        filepath = filepath.with_suffix(".ts")
    check_outputs({}, [filepath], "torchscript", overwrite=overwrite)
    meta = copy.deepcopy(metadata or {})
    channel_def = ((meta.get("network_data_format") or {}).get("outputs", {}).get("pred", {}).get("channel_def"))
    if not isinstance(channel_def, dict) or len(channel_def) != network.out_channels:  # metadata of another overlay
        channel_def = None
    meta["network_data_format"] = network_data_format(network, channel_def)
    config = copy.deepcopy(config or {})
    config.pop("_meta_", None)
    config["architecture"] = dict(network.architecture)
    scripted = torch.jit.script(network.eval())

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            save_net_with_metadata(scripted, stream, meta_values=meta,
                                   more_extra_files={"inference.json": json.dumps(config).encode()})

    replace_atomically(filepath, save)
    print(f"wrote {filepath} (TorchScript; embeds inference.json and metadata.json)")
    return str(filepath)
