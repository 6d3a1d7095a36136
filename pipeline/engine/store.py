"""The resumable zarr store: a sink that writes each block as it comes, on one machine or from Dask workers.

The group holds one array per result plus ``blocks_done`` (uint8, one chunk per block). A block's marker
is written after its data (zarr's local store writes each chunk atomically), so a restarted run recomputes
only unmarked blocks and ends identical to an uninterrupted one. The output is created complete (arrays,
settings, statistics) in a temporary folder and renamed into place; one whose arrays or settings differ
is refused unless ``overwrite``. Two runs must not write to one output at once. The normalisation
statistics are kept in the attributes, so a resumed run skips their pass.

Results are those of the in-memory writer (:func:`pipeline.transforms.post.encode_logits`): two classes
give the foreground probability ``(*spatial)`` and the mask 0/255 at ``threshold``; more classes give all
class probabilities ``(C, *spatial)`` and the arg-max class index. After the last block: instances
(:func:`pipeline.instances.label_zarr`, ids merged across blocks), exports for viewers
(:mod:`pipeline.io.pyramids`) and the overlay PNG.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile
import torch
import zarr
from torch import nn

from pipeline.engine.blocks import BlockLayout
from pipeline.engine.settings import TileSettings
from pipeline.instances import label_zarr, parse_rules, rule_settings
from pipeline.io import stem
from pipeline.io.axes import OME_TIFF_UNITS
from pipeline.io.containers import every_chunk
from pipeline.io.lazy import LazySource
from pipeline.io.outputs import check_outputs
from pipeline.tiling import unwrap
from pipeline.transforms.post import OUTPUTS, check_output_settings, encode_logits

logger = logging.getLogger(__name__)

MARKERS = "blocks_done"
#: what a store may hold (paths inside it, fnmatch patterns): its arrays, instances, an instance rule's work space
STORE_MEMBERS = frozenset({"probabilities", "mask", MARKERS, "instances", "instances/*", "_instances_tmp", "_instances_tmp/*"})
#: what an OME-Zarr export holds: its levels and the mask as label image (pipeline.io.pyramids.write_ome_zarr)
OME_ZARR_MEMBERS = frozenset({"s[0-9]*", "labels", "labels/mask", "labels/mask/s[0-9]*"})
THUMBNAIL = 2048  # pixels a side of the overlay PNG and of the tissue rule's thumbnail
EXPORTS = ("auto", "none", "ome-zarr", "ome-tiff", "hdf5")


def fingerprint(network: nn.Module) -> str:
    """SHA-1 of the network's class, geometry and weights (names, dtypes, shapes, values)."""
    net = unwrap(network)
    digest = hashlib.sha1(f"{type(net).__qualname__}{net.geometry}".encode())
    for name, tensor in net.state_dict().items():
        if not isinstance(tensor, torch.Tensor):  # _extra_state: the architecture, already in the geometry
            digest.update(f"{name}{tensor}".encode())
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}{t.dtype}{tuple(tensor.shape)}".encode() + t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stored_outputs(write: Sequence[str]) -> tuple[str, ...]:
    """The per-pixel arrays a store holds (and exports): those ``write`` lists, and the probabilities whenever
    it lists instances (they are made from them)."""
    return tuple(n for n in OUTPUTS if n in write or (n == "probabilities" and "instances" in write))


def check_export(export: str | None) -> None:
    """Raises ``ValueError`` for an ``export`` that is none of :data:`EXPORTS` (or None)."""
    if export is not None and export not in EXPORTS:
        raise ValueError(f"export must be one of {', '.join(EXPORTS)}; got {export!r}")


def resolve_export(export: str | None, src: LazySource) -> str | None:
    """``export`` checked (:func:`check_export`), with ``"auto"`` resolved by the source's kind (OME-Zarr ->
    ``"ome-zarr"``; an OME-TIFF or pyramidal TIFF -> ``"ome-tiff"``; HDF5 -> ``"hdf5"``; else None)."""
    check_export(export)
    if export != "auto":
        return None if export == "none" else export
    if src.kind == "hdf5":
        return "hdf5"
    if src.kind == "zarr" and src.path and getattr(src.plan, "found", "?").strip("?"):  # named axes: OME-Zarr
        return "ome-zarr"
    if src.kind == "tiff":
        with tifffile.TiffFile(src.path) as tif:
            series = tif.series[src.tiff_series or 0]
            if tif.is_ome or len(series.levels) > 1:
                return "ome-tiff"
    return None


def export_paths(output: str | os.PathLike, export: str | None, overlay: bool, write: Sequence[str]) -> list[Path]:
    """The files written next to ``output`` for ``export`` and ``overlay``."""
    path = Path(output)
    name = stem(path)
    out = []
    if export == "ome-zarr":
        out.append(path.with_name(f"{name}.ome.zarr"))
    if export == "ome-tiff":
        out += [path.with_name(f"{name}_{n}.ome.tif") for n in OUTPUTS if n in write]
    if export == "hdf5":
        out.append(path.with_name(f"{name}.h5"))
    if overlay:
        out.append(path.with_name(f"{name}_overlay.png"))
    return out


def recorded_exports(output: str | os.PathLike) -> list[Path]:
    """The exports and overlay an existing store at ``output`` records having written (none when there is no such
    store): a later run of it may replace them without ``overwrite``, as it resumes the store."""
    path = Path(output)
    try:
        names = zarr.open_group(str(path), mode="r").attrs.asdict().get("exported", [])
    except Exception:  # no store, or not one: nothing recorded
        return []
    return [path.with_name(str(n)) for n in names if str(n) == Path(str(n)).name]


def find_tissue(src: LazySource) -> tuple[np.ndarray, int]:
    """The tissue rule (:func:`pipeline.io.pyramids.tissue_mask`) on a thumbnail of ``src`` at most
    :data:`THUMBNAIL` pixels a side: the mask and the thumbnail's downsampling factor. Checked before any output.

    Raises:
        ValueError: naming the source: not RGB(A), grey stored as RGB, or no tissue anywhere (nothing would be predicted).
    """
    from pipeline.io.pyramids import thumbnail, tissue_mask

    name = src.path or "the source"
    if src.stored_channels not in (3, 4):
        raise ValueError(
            f"{name}: skip_background applies to RGB whole-slide images (the tissue rule reads colour "
            f"saturation), but it has {src.stored_channels} channel(s); set skip_background=False"
        )
    image, factor = thumbnail(_colour(src), max(1, math.ceil(max(src.spatial[-2:]) / THUMBNAIL)))
    try:
        tissue = tissue_mask(image)
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
    if not tissue.any():
        raise ValueError(f"{name}: skip_background found no tissue (the tissue rule: colour saturation above Otsu's "
                         "threshold), so nothing would be predicted; set skip_background=False to predict every block")
    return tissue, factor


def _colour(src: LazySource) -> LazySource:
    """The source with its own colour channels (a colour file read as grey for a 1-channel network: as RGB)."""
    return src if not src.grey else LazySource(src.path, len(src.spatial), src.stored_channels, src.tiff_series, src.key)


class ZarrSink:
    """Block results into the zarr group ``output`` as they come (resumable), then instances, exports, overlay.

    Args:
        output: local path of the zarr group written: ``probabilities`` (float32, NaN until written; ``(C,
            *spatial)`` for more than two classes), ``mask`` (uint8: 0/255, or the class index) and
            ``blocks_done`` (uint8 per block).
        write: any of ``"probabilities"``, ``"mask"``, ``"instances"``.
        threshold: foreground where probability > ``threshold`` (two classes).
        instances: ``{name: rule}`` (:func:`pipeline.instances.parse_rules`), made when ``write`` lists
            instances, after the last block, into ``instances/<name>`` (uint32), ids merged across blocks.
        instance_halo: px around a block that its watershed sees.
        overwrite: replace an existing output; otherwise a matching one is resumed.
        export: ``"ome-zarr"``, ``"ome-tiff"``, ``"hdf5"``, ``"auto"`` (as the input) or None/``"none"``
            (:func:`export_paths`).
        overlay: ``<name>_overlay.png``: the input at most :data:`THUMBNAIL` pixels a side (a stack: its
            middle section) with the mask's foreground (any class but 0) in red.
        skip_background: predict only blocks that hold tissue (:func:`pipeline.io.pyramids.tissue_mask`, RGB
            sources); skipped blocks are marked done and keep the fill values (probability NaN, mask 0).

    Raises:
        ValueError: bad ``write``, ``threshold``, ``instances`` or ``export`` (at construction); from
            :meth:`open`, an output with other arrays or settings, a rule or export the network's classes do
            not allow, ``skip_background`` on a grey source.
    """

    out_device = "cpu"

    def __init__(
        self, output: str | os.PathLike, write: Sequence[str] = OUTPUTS, threshold: float = 0.5, instances: Any = None,
        instance_halo: int = 64, overwrite: bool = False, export: str | None = None, overlay: bool = False,
        skip_background: bool = False,
    ) -> None:
        self.write_names = check_output_settings(write, threshold, instances)
        check_export(export)
        self.path, self.threshold, self.overwrite = Path(output), float(threshold), bool(overwrite)
        self.rules = parse_rules(instances) if "instances" in self.write_names else {}
        self.instance_halo, self.export, self.overlay = int(instance_halo), export, bool(overlay)
        self.skip_background = bool(skip_background)
        self.stored = stored_outputs(self.write_names)

    def outputs(self, lazy: LazySource) -> dict[str, Any]:
        """What :func:`pipeline.io.outputs.check_outputs` needs of this sink for ``lazy``: ``targets`` (the store
        and its exports), ``own`` (the store, resumed, and the exports it records) and ``datasets`` (what each
        container may hold)."""
        exports = export_paths(self.path, resolve_export(self.export, lazy), self.overlay, self.stored)
        datasets = {self.path: STORE_MEMBERS, **{t: OUTPUTS for t in exports if t.suffix == ".h5"},
                    **{t: OME_ZARR_MEMBERS for t in exports if t.name.endswith(".ome.zarr")}}
        return {"targets": [self.path, *exports], "own": [self.path, *recorded_exports(self.path)], "datasets": datasets}

    def __getstate__(self) -> dict:  # what a Dask worker needs to write blocks
        return {k: v for k, v in self.__dict__.items() if k not in ("source", "_tissue")}

    def open(self, source: Any, network: nn.Module, settings: TileSettings, layout: BlockLayout) -> list[tuple[int, ...]]:
        """Create (or resume) the store; return the blocks without a marker."""
        net = unwrap(network)
        self.classes = max(2, int(net.out_channels))
        for name, rule in self.rules.items():
            if rule.channel >= self.classes or rule.background_channel is not None:
                raise ValueError(f"instances {name!r}: block-wise instances read one stored class probability (channel 0.."
                                 f"{self.classes - 1} of this network), without background_channel")
        self.source, self.layout = source, layout
        lazy = source.lazy
        found = self.outputs(lazy)  # also checked by predict_files for all inputs first
        check_outputs({lazy.path: found["targets"]} if lazy.path else {}, () if lazy.path else found["targets"],
                      overwrite=self.overwrite, own=found["own"], datasets=found["datasets"])
        self.export = resolve_export(self.export, lazy)
        if self.classes > 2 and self.export in ("ome-zarr", "ome-tiff") and "probabilities" in self.stored:
            raise ValueError(f"export={self.export!r} writes one image per result, but this network predicts {self.classes} "
                             "classes (probabilities (C, *spatial)); export 'hdf5' or 'none', or write only the mask")
        if self.skip_background:
            self.tissue(lazy)
        classes = (self.classes,) if self.classes > 2 else ()
        arrays = {"probabilities": (classes + layout.shape, classes + layout.chunks, "float32", float("nan")),
                  "mask": (layout.shape, layout.chunks, "uint8", 0)}
        arrays = {name: spec for name, spec in arrays.items() if name in self.stored}
        arrays[MARKERS] = (layout.grid, (1,) * len(layout.grid), "uint8", 0)
        tile = settings.tile_size
        record = {
            "shape": list(layout.shape), "source_dtype": str(lazy.dtype), "block_size": list(layout.block),
            "write": sorted(self.stored), "threshold": self.threshold, "normalize": source.normalize, "fill_nan": source.fill_nan,
            "padding_mode": settings.padding_mode, "context": settings.context, "tile_size": tile if isinstance(tile, str) else list(tile),
            "network": fingerprint(network), "amp": str(settings.amp_dtype).removeprefix("torch.") if settings.amp_for(network) else None,
            "source": lazy.identity(), "rgb_to_grey": lazy.rgb_to_grey, "skip_background": self.skip_background,
            "classes": self.classes, "tta": bool(settings.tta),
        }
        group, resumed = self._open_group(arrays, record, source, lazy.spacing)
        stats = group.attrs.asdict()["streaming"]
        if source.normalize:
            source._stats = tuple(np.asarray(stats[key], dtype=np.float64) for key in ("mean", "std"))
        done = np.asarray(group[MARKERS][...])
        pending = [i for i in layout.indices() if not done[i]]
        if self.skip_background and pending:
            pending = self._skip_background(lazy, group, pending)
        logger.info("%s: %d blocks of %s, %d to predict%s", self.path, done.size, layout.block, len(pending), " (resumed)" if resumed else "")
        return pending

    def _open_group(self, arrays: dict, settings: dict, source: Any, spacing: Sequence[float] | None) -> tuple[Any, bool]:
        path = self.path
        if path.exists() and not self.overwrite:
            return self._resume(arrays, settings), True
        mean, std = source.statistics()  # first: a source it refuses (non-finite pixels) leaves no output folder behind
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            group = zarr.open_group(str(tmp), mode="w")
            for name, (shape, chunks, dtype, fill) in arrays.items():
                array = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
                if spacing is not None and name != MARKERS:  # as the containers' convention: pipeline.io.containers
                    array.attrs["resolution"] = [float(v) for v in spacing]
            record = {"settings": settings, "mean": None if mean is None else mean.tolist(), "std": None if std is None else std.tolist()}
            group.attrs.update({"streaming": record})
            if path.exists():  # overwrite=True
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return zarr.open_group(str(path), mode="r+"), False

    def _resume(self, arrays: dict, settings: dict) -> Any:
        path = self.path
        try:
            group = zarr.open_group(str(path), mode="r+")
        except Exception as err:
            raise ValueError(f"output {path} exists and is not a zarr group ({err}); pass overwrite=True to replace it") from err
        for name, (shape, chunks, dtype, _) in arrays.items():
            if name not in group:
                raise ValueError(f"output {path} exists without a {name!r} array; pass overwrite=True to replace it")
            have = group[name]
            if tuple(have.shape) != shape or np.dtype(have.dtype) != np.dtype(dtype) or tuple(have.chunks) != chunks:
                raise ValueError(
                    f"output {path}/{name} exists with shape {tuple(have.shape)}, dtype {have.dtype}, chunks "
                    f"{tuple(have.chunks)}, but this prediction needs shape {shape}, dtype {np.dtype(dtype)}, chunks "
                    f"{chunks}; pass overwrite=True to replace it or choose another output"
                )
        old = group.attrs.asdict().get("streaming", {}).get("settings")
        if old != settings:
            diff = sorted(k for k in settings if (old or {}).get(k) != settings[k])
            if "source" in diff and settings["source"] is not None:
                was = ((old or {}).get("source") or {}).get("path", "an unrecorded input")
                raise ValueError(
                    f"output {path} holds the prediction of another input ({was}), or of this input "
                    f"({settings['source']['path']}) before it changed; resuming would mix them. Pass overwrite=True "
                    "to replace it, or choose another output"
                )
            raise ValueError(f"output {path} was written with other settings (they differ in: {', '.join(diff)}); pass overwrite=True "
                             "to replace it")
        return group

    def tissue(self, lazy: LazySource) -> tuple[np.ndarray, int]:
        """:func:`find_tissue` of the source, found once (by the check before any output, or at :meth:`open`)."""
        if getattr(self, "_tissue", None) is None:
            self._tissue = find_tissue(lazy)
        return self._tissue

    def _skip_background(self, lazy: LazySource, group: Any, pending: list) -> list:
        """Mark blocks without tissue (:meth:`tissue`) done; return the others."""
        tissue, factor = self.tissue(lazy)
        keep = []
        for index in pending:
            lo = self.layout.box(index)[0][-2:]
            window = tuple(slice(s // factor, max(s // factor + 1, math.ceil((s + b) / factor))) for s, b in zip(lo, self.layout.block[-2:]))
            if tissue[window].any():
                keep.append(index)
            else:
                group[MARKERS][tuple(index)] = 1  # background: nothing to write (probability NaN, mask 0)
        skipped = len(pending) - len(keep)
        if skipped:  # said where a person sees it: these blocks stay NaN
            logger.warning("%s: skip_background: %d of %d blocks (%.0f%%) hold no tissue by the tissue rule (colour saturation) and "
                           "are not predicted (probability NaN, mask 0); if this is not a brightfield slide (e.g. grey EM with "
                           "coloured annotations), predict with skip_background=False", lazy.path or "the source", skipped,
                           len(pending), 100 * skipped / len(pending))
        return keep

    def write(self, box: tuple[list[int], list[int]], logits: torch.Tensor, nodata: np.ndarray | None) -> None:
        """Write one block's results, then its marker (a marked block is complete)."""
        lo, hi = box
        group = zarr.open_group(str(self.path), mode="r+")
        region = tuple(slice(s, h) for s, h in zip(lo, hi))
        for name, values in encode_logits(logits, self.threshold, self.stored, nodata).items():
            every_chunk(group[name])[(slice(None),) * (values.ndim - len(region)) + region] = values  # blank ones too
        group[MARKERS][tuple(s // b for s, b in zip(lo, self.layout.block))] = 1
        logger.debug("block (pixels %s..%s) written", lo, hi)

    def close(self, client: Any = None) -> Path:
        """After the last block: instances (on ``client``'s workers when given), exports and the overlay; returns the
        output path."""
        group = zarr.open_group(str(self.path), mode="r")
        if not np.asarray(group[MARKERS][...]).all():
            raise RuntimeError(f"{self.path}: blocks are missing; no instances or exports made")
        logger.info("%s: all %d blocks done", self.path, group[MARKERS].size)
        self._instances(client)
        if self.export or self.overlay:
            self._finish(group)
        self.source.close()
        return self.path

    def _instances(self, client: Any) -> None:
        """Instances by each rule; a rule already made with the same settings (recorded in the attributes) is skipped."""
        if not self.rules:
            return
        group = zarr.open_group(str(self.path), mode="r+")
        done = dict(group.attrs.get("instances", {}))
        for name, rule in self.rules.items():
            settings = {**rule_settings(rule), "halo": self.instance_halo}
            if done.get(name) == settings and f"instances/{name}" in group:
                continue
            logger.info("%s: instances %r (%s)", self.path, name, rule.method)
            label_zarr(str(self.path), "probabilities", rule, name, self.layout.block, self.instance_halo, client, self.classes > 2)
            done[name] = settings
            group.attrs["instances"] = done

    def _finish(self, group: Any) -> None:
        """The exports and the overlay of a complete output (:mod:`pipeline.io.pyramids`)."""
        from pipeline.io import pyramids

        lazy = self.source.lazy
        names = [n for n in OUTPUTS if n in self.stored]
        spacing = lazy.spacing or (1.0,) * len(lazy.spatial)
        targets = export_paths(self.path, self.export, self.overlay, names)
        zarr.open_group(str(self.path), mode="r+").attrs["exported"] = [t.name for t in targets]  # checked free: ours now
        unit = lazy.unit  # an NGFF unit name, or None (then none is written)
        if self.export == "ome-zarr":
            pyramids.write_ome_zarr(group, targets[0], spacing, names, unit)
        elif self.export == "hdf5":
            pyramids.write_hdf5(group, targets[0], spacing, names)
        elif self.export == "ome-tiff":
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.pyramid-", dir=self.path.parent))
            try:
                for name, target in zip(names, targets):
                    pyramid = pyramids.write_ome_zarr(group, tmp / f"{name}.ome.zarr", spacing, [name], unit)
                    pyramids.write_ome_tiff(pyramids.levels(pyramid), target, spacing, OME_TIFF_UNITS.get(unit or ""))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.overlay:
            image, factor = pyramids.thumbnail(_colour(lazy), max(1, math.ceil(max(lazy.spatial[-2:]) / THUMBNAIL)))
            pyramids.write_overlay(image, self._thumbnail_foreground(group, factor), targets[-1])
        logger.info("%s: exported %s", self.path, ", ".join(str(t) for t in targets))

    def _thumbnail_foreground(self, group: Any, factor: int) -> np.ndarray:
        """The mask's foreground (any class but 0) on the thumbnail's pixels, from the mask or, when only the
        probabilities are stored, by the same rule (:func:`pipeline.transforms.post.encode_logits`)."""
        shape = self.layout.shape
        middle = ((shape[0] // 2,) if len(shape) == 3 else ()) + (slice(0, shape[-2], factor), slice(0, shape[-1], factor))
        if "mask" in group:
            return np.asarray(group["mask"][middle]) > 0
        prob = np.asarray(group["probabilities"][(slice(None),) * (self.classes > 2) + middle])
        if self.classes > 2:
            return np.nan_to_num(prob, nan=-1.0).argmax(0) > 0
        return prob > self.threshold
