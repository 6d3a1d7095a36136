"""Sinks that hold the whole prediction in memory: the logits as a tensor (:class:`TensorSink`, MONAI's
inferer contract), or files written at the end (:class:`FilesSink`, the in-memory side of the bundle).

The streaming side, a resumable zarr store written block by block, is :class:`pipeline.engine.store.ZarrSink`;
both encode results by one rule (:func:`pipeline.transforms.post.encode_logits`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.engine.blocks import BlockLayout
from pipeline.engine.settings import TileSettings
from pipeline.instances import make_instances, parse_rules
from pipeline.io import stem, write_image
from pipeline.io.common import NO_FLOAT_SUFFIXES, READ_ONLY_SUFFIXES, _suffix
from pipeline.transforms.post import OUTPUTS, check_output_settings, class_probabilities, encode_logits


class TensorSink:
    """The logits ``(out_channels, *spatial)`` float32 as one tensor on ``device`` (default: where the source lies)."""

    def __init__(self, device: Any = None) -> None:
        self.out_device, self.out, self.nodata = device, None, None

    def open(self, source: Any, network: nn.Module, settings: TileSettings, layout: BlockLayout) -> list[tuple[int, ...]]:
        self.shape, self.out, self.nodata = layout.shape, None, None
        return layout.indices()

    def write(self, box: tuple[list[int], list[int]], logits: torch.Tensor, nodata: np.ndarray | None) -> None:
        lo, hi = box
        region = tuple(slice(s, h) for s, h in zip(lo, hi))
        if tuple(lo) == (0,) * len(lo) and tuple(hi) == self.shape:  # one block: the whole image
            self.out = logits
        else:
            if self.out is None:
                self.out = torch.empty((logits.shape[0], *self.shape), dtype=torch.float32, device=logits.device)
            self.out[(slice(None), *region)] = logits
        if nodata is not None:
            if self.nodata is None:
                self.nodata = np.zeros(self.shape, dtype=bool)
            self.nodata[region] = nodata

    def close(self, client: Any = None) -> torch.Tensor:
        return self.out


def file_targets(source: str | Path, output_dir: str | Path, write: Sequence[str], rules: Sequence[str] = (),
                 output_ext: str | None = None) -> dict[str, Path]:
    """The output file of each ``write`` entry for the input file ``source``:
    ``output_dir/{probabilities,masks}/<input name>`` and ``instances/<rule>/<input name>``.

    Files keep the input's name and format; formats that cannot hold float32 or uint32 (PNG) get TIFF, and
    formats read but not written (JPEG, BMP) get TIFF for all. ``output_ext`` forces one format.
    """
    src = Path(str(source))
    name = stem(src)
    ome = src.name.lower().endswith((".ome.tif", ".ome.tiff"))  # stem() drops ".ome": keep an OME-TIFF one
    ext = output_ext or (".ome" if ome else "") + _suffix(src)
    wide, narrow = (".tif" if ext in NO_FLOAT_SUFFIXES else ext), (".tif" if ext in READ_ONLY_SUFFIXES else ext)
    out = Path(output_dir)
    found = {"probabilities": out / "probabilities" / f"{name}{wide}", "mask": out / "masks" / f"{name}{narrow}"}
    found.update({f"instances/{rule}": out / "instances" / rule / f"{name}{wide}" for rule in rules})
    return {what: path for what, path in found.items() if what.split("/")[0] in write}


class FilesSink(TensorSink):
    """The whole prediction of one input file, written at the end next to nothing but its own name
    (:func:`file_targets`): the per-pixel results of :func:`pipeline.transforms.post.encode_logits` (two classes:
    foreground probability float32 and mask 0/255; more: all class probabilities ``(C, *spatial)`` and the
    arg-max class) and, per rule of ``instances``, uint32 ids (:func:`pipeline.instances.make_instances`). In a
    container the dataset is named after what it holds. Every write is atomic (:func:`pipeline.io.write_image`).

    Args:
        output_dir: folder that receives ``probabilities/``, ``masks/`` and ``instances/``.
        source: the input file (its name, and the format of the outputs).
        meta: the input's meta as read (:class:`pipeline.transforms.LoadSectiond`): spacing, affine, and
            ``axes_reversed`` (NIfTI: results are written back in the file's axis order).
        write: any of ``"probabilities"``, ``"mask"``, ``"instances"``.
        threshold: probability above which a pixel is foreground (two classes).
        instances: ``{name: rule}`` (:func:`pipeline.instances.parse_rules`), used when ``write`` lists instances.
        output_ext: one output format for all (e.g. ``".nii.gz"``); default the input's.
        overwrite: replace existing outputs.

    Raises:
        ValueError: bad ``write``, ``threshold`` or ``instances`` (at construction); at the end, an instance rule
            that reads a class the network does not predict.
    """

    out_device = "cpu"

    def __init__(
        self, output_dir: str | Path, source: str | Path, meta: Mapping | None = None, write: Sequence[str] = OUTPUTS,
        threshold: float = 0.5, instances: Any = None, output_ext: str | None = None, overwrite: bool = False,
    ) -> None:
        super().__init__("cpu")
        self.write_names = check_output_settings(write, threshold, instances)
        self.rules = parse_rules(instances) if "instances" in self.write_names else {}
        self.targets = file_targets(source, output_dir, self.write_names, list(self.rules), output_ext)
        self.meta, self.threshold, self.overwrite = dict(meta or {}), float(threshold), bool(overwrite)

    def close(self, client: Any = None) -> dict[str, Path]:
        """Write every target; return them by what they hold."""
        logits, nodata, meta = super().close(), self.nodata, dict(self.meta)
        meta.pop("filename_or_obj", None)
        meta.pop("nodata", None)
        if meta.get("axes_reversed"):  # NIfTI: back to the file's (x, y, z)
            logits = logits.permute(0, *reversed(range(1, logits.ndim)))
            nodata = None if nodata is None else nodata.transpose()
        outputs = encode_logits(logits, self.threshold, [w for w in self.write_names if w in OUTPUTS], nodata)
        if self.rules:  # from the probabilities as written: NaN without data (id 0 there), as ZarrSink's instances
            values = class_probabilities(logits).cpu().numpy()
            values = values if nodata is None else np.where(nodata[None], np.float32(np.nan), values)
            for rule_name, rule in self.rules.items():
                outputs[f"instances/{rule_name}"] = make_instances(values, rule)
        classes = max(2, int(logits.shape[0]))
        for what, path in self.targets.items():
            spatial = {"spatial_shape": list(logits.shape[1:])} if what == "probabilities" and classes > 2 else {}
            write_image(outputs[what], path, meta={**meta, **spatial, "dataset": what.split("/")[-1]}, overwrite=self.overwrite)
        return self.targets
