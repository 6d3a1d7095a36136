"""Multiscale outputs of block-by-block prediction, for viewers: OME-Zarr and tiled pyramidal OME-TIFF,
an overlay PNG, and the tissue rule that lets whole-slide prediction skip background.

- :func:`write_ome_zarr`: the probabilities as an NGFF image (0.5, zarr v3) with a pyramid of 2x
  downsamplings in ``y`` and ``x`` (local mean) and the mask as its NGFF label image ``labels/mask``
  (nearest), written by ``ome-zarr`` from dask arrays over the streaming store: memory bounded by chunks.
  napari (napari-ome-zarr), neuroglancer and QuPath open it.
- :func:`write_ome_tiff`: each output as a tiled (256 x 256), zlib-compressed pyramidal OME-TIFF, the
  levels as SubIFDs (the OME-TIFF pyramid layout of Bio-Formats 6 / QuPath), written tile by tile from
  the OME-Zarr levels by ``tifffile``.
- :func:`write_hdf5`: the store's arrays as datasets of an HDF5 file (an HDF5 input's kind).
- :func:`thumbnail`, :func:`tissue_mask`, :func:`write_overlay`: a downsampled view of a source (its
  TIFF pyramid level when it has one), the tissue rule, and an RGB PNG of input and mask.

Levels: halved until the longest side of a section is at most :data:`SMALLEST` pixels.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile
import zarr

SMALLEST = 512  # the coarsest level's longest side is at most this
TILE = 256


def scale_factors(shape: Sequence[int]) -> list[int]:
    """The 2x downsampling factors (2, 4, ...) that take ``(Y, X)`` (the last two axes) to at most :data:`SMALLEST`."""
    longest = max(int(n) for n in shape[-2:])
    return [2**k for k in range(1, max(1, math.ceil(math.log2(max(longest, 1) / SMALLEST))) + 1)] if longest > SMALLEST else []


def write_ome_zarr(store: Any, path: str | os.PathLike, spacing: Sequence[float], names: Sequence[str], unit: str | None = None) -> Path:
    """Write the streaming store's ``probabilities`` (and ``mask``) as an OME-Zarr image at ``path``.

    Args:
        store: the zarr group of :func:`pipeline.streaming.predict_zarr` (complete).
        path: the ``.ome.zarr`` folder written (replaced atomically: written next to it, then renamed).
        spacing: per spatial axis ``(Z,) Y, X``, in ``unit``.
        names: the arrays to write (``probabilities``, ``mask``).
        unit: an NGFF unit name (e.g. ``"micrometer"``, ``"nanometer"``), or None.

    Returns:
        ``path``. The image is ``probabilities`` when written, else ``mask``; with both, the mask is the
        label image ``labels/mask``.
    """
    import dask
    import dask.array as da
    from ome_zarr.scale import Methods
    from ome_zarr.writer import write_image, write_labels

    path = Path(path)
    first = store[names[0]]
    axes = "zyx"[3 - first.ndim :]
    scale = {a: float(s) for a, s in zip(axes, spacing)}
    units = {a: unit for a in axes} if unit else None
    factors = scale_factors(first.shape)  # [] : one level (None would be ome-zarr's default 2, 4, 8, 16)
    chunks = tuple(min(n, c) for n, c in zip(first.shape, (1,) * (first.ndim - 2) + (1024, 1024)))
    options = {"chunks": chunks}
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w")
    image = names[0]
    data = da.from_zarr(store[image], chunks=chunks)
    method = Methods.LOCAL_MEAN if image == "probabilities" else Methods.NEAREST
    # one chunk at a time (memory bounded by a chunk, not the threads' queue), every chunk stored (blank ones too:
    # pipeline.io.containers.every_chunk)
    with dask.config.set(scheduler="synchronous"), zarr.config.set({"array.write_empty_chunks": True}):
        write_image(data, group, scaler=None, scale_factors=factors, method=method, axes=axes, scale=scale, axes_units=units,
                    storage_options=options, name=image)
        if "mask" in names and image != "mask":
            mask = da.from_zarr(store["mask"], chunks=chunks)
            write_labels(mask, group, name="mask", scaler=None, scale_factors=factors, axes=axes, scale=scale, axes_units=units,
                         storage_options=options, label_metadata={"source": {"image": "../../"}})  # NGFF image-label: its image
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def write_hdf5(store: Any, path: str | os.PathLike, spacing: Sequence[float], names: Sequence[str]) -> Path:
    """Copy the streaming store's arrays into an HDF5 file at ``path`` (datasets named as the arrays, gzip,
    the store's chunks, ``resolution`` = ``spacing``), chunk row by chunk row, atomically."""
    import h5py

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for name in names:
                array = store[name]
                dataset = f.create_dataset(name, shape=array.shape, dtype=array.dtype, chunks=tuple(array.chunks), compression="gzip")
                dataset.attrs["resolution"] = [float(v) for v in spacing]
                step = array.chunks[0]
                for start in range(0, array.shape[0], step):
                    dataset[start : start + step] = array[start : start + step]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def levels(path: str | os.PathLike, label: str | None = None) -> list[Any]:
    """The zarr arrays of an OME-Zarr image's levels (or of its label image ``label``), finest first."""
    group = zarr.open_group(str(path), mode="r")
    if label:
        group = group["labels"][label]
    attrs = group.attrs.asdict()
    scales = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    return [group[d["path"]] for d in scales[0]["datasets"]]


def _tiles(array: Any):
    """Tiles of ``array`` (``(Y, X)`` or ``(Z, Y, X)``) in TIFF order, read a band of rows at a time."""
    planes = [()] if array.ndim == 2 else [(z,) for z in range(array.shape[0])]
    height, width = array.shape[-2:]
    for plane in planes:
        for y in range(0, height, TILE):
            band = np.asarray(array[plane + (slice(y, y + TILE), slice(None))])
            for x in range(0, width, TILE):
                yield band[:, x : x + TILE]


def write_ome_tiff(arrays: Sequence[Any], path: str | os.PathLike, spacing: Sequence[float], unit: str | None = None) -> Path:
    """Write a pyramid (``arrays``: levels finest first, ``(Y, X)`` or ``(Z, Y, X)``) as a tiled pyramidal
    OME-TIFF at ``path`` (BigTIFF, zlib, 256 x 256 tiles, levels as SubIFDs), atomically.

    ``spacing`` (per spatial axis, in ``unit``, e.g. ``"µm"``) becomes ``PhysicalSizeX/Y/Z``.
    """
    path = Path(path)
    first = arrays[0]
    axes = "ZYX"[3 - first.ndim :]
    metadata: dict[str, Any] = {"axes": axes}
    for a, s in zip(axes, spacing):
        metadata[f"PhysicalSize{a}"] = float(s)
        if unit:
            metadata[f"PhysicalSize{a}Unit"] = unit
    options = {"tile": (TILE, TILE), "compression": "zlib", "photometric": "minisblack"}
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            tif.write(_tiles(first), shape=first.shape, dtype=first.dtype, subifds=len(arrays) - 1, metadata=metadata, **options)
            for level in arrays[1:]:
                tif.write(_tiles(level), shape=level.shape, dtype=level.dtype, subfiletype=1, **options)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def thumbnail(source: Any, factor: int) -> tuple[np.ndarray, int]:
    """A ``(C, Y', X')`` view of a :class:`pipeline.io.lazy.LazySource` downsampled at least ``factor`` times in
    ``y`` and ``x`` (2D sources; the middle section of a stack), and its downsampling: from the TIFF pyramid
    level of the largest downsampling ``d`` not above ``factor`` when it has one, strided by
    ``ceil(factor / d)``; else strided by ``factor`` (every pixel of the thumbnail is a pixel of the source).
    """
    from pipeline.io.lazy import LazySource

    level, down, step = source, 1, factor
    if source.kind == "tiff" and source.level == 0:
        with tifffile.TiffFile(source.path) as tif:
            chosen = 0 if source.tiff_series is None else source.tiff_series
            shapes = [lv.shape for lv in tif.series[chosen].levels]
        y = -2 - source.plan.channel_last
        full = source.plan.shape(shapes[0])
        for index, shape in enumerate(shapes[1:], start=1):
            if len(shape) != len(shapes[0]):
                break
            d = full[y] / source.plan.shape(shape)[y]
            if d != int(d) or d > factor:
                break
            level, down = LazySource(source.path, 2, source.channels, source.tiff_series, str(index), source.rgb_to_grey), int(d)
        step = math.ceil(factor / down)
    spatial = level.spatial
    box = ((slice(spatial[0] // 2, spatial[0] // 2 + 1),) if len(spatial) == 3 else ()) + (
        slice(0, spatial[-2], step), slice(0, spatial[-1], step))
    out = level.read(box)
    return (out[:, 0] if len(spatial) == 3 else out), down * step


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """The tissue rule for brightfield whole-slide images: a pixel of a thumbnail ``(3 or 4, Y, X)`` is
    tissue where its HSV saturation exceeds Otsu's threshold of the thumbnail's saturation (as CLAM's
    tissue segmentation, Lu et al. 2021, without its median blur), dilated by one pixel. A uniform thumbnail
    (one value) holds no tissue; one of a single colour is all tissue.

    Raises:
        ValueError: a thumbnail that is not RGB(A), or grey stored as RGB (R, G and B within 2% of the image's
            value range of each other in 99.5% of its pixels: saturation cannot tell tissue from background).
    """
    from scipy import ndimage
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    if rgb.shape[0] not in (3, 4):
        raise ValueError(f"the tissue rule needs an RGB image, got {rgb.shape[0]} channel(s); set skip_background=False")
    colour = np.asarray(rgb[:3], dtype=np.float32)
    value_range = float(colour.max() - colour.min())
    if value_range == 0:
        return np.zeros(colour.shape[1:], bool)
    if np.percentile(colour.max(0) - colour.min(0), 99.5) <= 0.02 * value_range:
        raise ValueError("the tissue rule reads colour saturation, but this RGB image is grey (R, G and B within 2% of its "
                         "range of each other in 99.5% of its pixels), so it cannot tell tissue from background; set "
                         "skip_background=False to predict every block")
    saturation = rgb2hsv(np.moveaxis(rgb[:3], 0, -1))[..., 1]
    if np.ptp(saturation) == 0:
        return np.ones(saturation.shape, bool)
    return ndimage.binary_dilation(saturation > threshold_otsu(saturation))


def write_overlay(image: np.ndarray, mask: np.ndarray, path: str | os.PathLike) -> Path:
    """An RGB PNG of ``image`` (``(C, Y, X)``, grey or RGB, scaled to 0-255 by its 1st-99th percentile) with the
    mask (``(Y, X)``, nonzero = foreground) blended in red at 40%."""
    from PIL import Image

    rgb = np.moveaxis(image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, 0), 0, -1).astype(np.float32)
    finite = np.isfinite(rgb)
    lo, hi = np.percentile(rgb[finite], [1, 99]) if finite.any() else (0.0, 1.0)
    rgb = np.clip((np.where(finite, rgb, lo) - lo) / max(hi - lo, 1e-12), 0, 1) * 255
    fg = np.asarray(mask) > 0
    h, w = min(rgb.shape[0], fg.shape[0]), min(rgb.shape[1], fg.shape[1])  # strided views may differ by a pixel
    rgb, fg = rgb[:h, :w], fg[:h, :w]
    rgb[fg] = 0.6 * rgb[fg] + 0.4 * np.array([255, 0, 0], np.float32)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return Path(path)
