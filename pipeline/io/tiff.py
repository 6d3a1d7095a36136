"""TIFF files with ``tifffile``: series, pyramid levels, axes, spacing and units, and reading one image.

:class:`pipeline.io.readers.TiffStackReader` (MONAI) and :func:`pipeline.io.read_image` read through
:func:`read_tiff`; :func:`pipeline.io.probe_image` and the lazy reader (:mod:`pipeline.io.lazy`) through
:func:`tiff_plan`. See :mod:`pipeline.io` for the axis-order rule.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import tifffile

from pipeline.io.axes import AxisPlan, ngff_unit, plan_axes
from pipeline.io.common import _base_meta

logger = logging.getLogger(__name__)

_TIFF_CORRUPT = re.compile(r"corrupt|invalid page offset|circular reference", re.IGNORECASE)


class _TiffLogCatcher(logging.Handler):
    """Collects tifffile log records that mean a corrupt/truncated file (tifffile only logs those)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if _TIFF_CORRUPT.search(record.getMessage()):
            self.messages.append(record.getMessage())


class TiffSeriesError(ValueError):
    """A TIFF whose series cannot be read as one image without a choice (see :func:`choose_tiff_series`)."""


def choose_tiff_series(tif: tifffile.TiffFile, path: str | os.PathLike, series: int | None, stack: bool = True) -> int | None:
    """Which series of an open TIFF to read: its index, or None to stack same-shape series along Z.

    Args:
        tif: the open file.
        path: its path, for messages.
        series: the series asked for (bundle key ``tiff_series``), or None.
        stack: whether same-shape series may be stacked (the eager reader); a lazy reader cannot.

    Raises:
        TiffSeriesError: ``series`` is out of range, or the file holds several series and none was
            chosen (unless ``stack`` and all have one shape and dtype); the message lists them.
    """
    found = tif.series
    listing = "; ".join(f"series {i}: shape {tuple(s.shape)} {s.dtype} axes {s.axes}" for i, s in enumerate(found))
    if series is not None:
        if isinstance(series, bool) or not isinstance(series, int) or not 0 <= series < len(found):
            raise TiffSeriesError(f"{path}: tiff_series={series!r} is not a series of this file; it holds {len(found)} ({listing})")
        return series
    if len(found) == 1:
        return 0
    if stack and all(s.shape == found[0].shape and s.dtype == found[0].dtype for s in found):
        return None
    raise TiffSeriesError(
        f"{path} holds {len(found)} TIFF series ({listing}); one run reads one image per file, so the others would "
        "silently not be predicted. Choose one with tiff_series=N (0-based), or save each series as a file of its own"
    )


class AxesError(ValueError):
    """Stored axes that cannot be read as one image (:func:`pipeline.io.axes.plan_axes`)."""


def tiff_level(path: str | os.PathLike, key: Any) -> int:
    """The pyramid level a key (bundle keys ``level`` / ``input_key``) names in a TIFF file: None -> 0.

    Raises:
        ValueError: a key that is not a level number (a TIFF holds no named datasets).
    """
    if key is None:
        return 0
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and key >= 0:
        return int(key)
    if isinstance(key, str) and key.strip().isdigit():
        return int(key)
    raise ValueError(
        f"{path} is a TIFF file, which holds no named datasets; its key picks a pyramid level (key=N or level=N), "
        f"0 (full resolution), 1, ..., not {key!r}"
    )


def tiff_unit(tif: tifffile.TiffFile) -> str | None:
    """The length unit of a TIFF's pixel sizes as an NGFF name: OME ``PhysicalSizeXUnit`` (default µm when a
    size is given), ImageJ ``unit``; None if unknown."""
    if tif.is_ome and tif.ome_metadata:
        pixels = next((e for e in ElementTree.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")), None)
        if pixels is not None and pixels.get("PhysicalSizeX"):
            return ngff_unit(pixels.get("PhysicalSizeXUnit", "µm"))
    return ngff_unit((tif.imagej_metadata or {}).get("unit"))


def _spacing_by_axis(tif: tifffile.TiffFile) -> list[float] | dict[str, float]:
    """The pixel sizes a TIFF records: our writer's JSON (a list, spatial axes), else OME or ImageJ metadata by axis."""
    if tif.is_shaped and tif.shaped_metadata and "spacing" in tif.shaped_metadata[0]:
        return [float(s) for s in tif.shaped_metadata[0]["spacing"]]
    if tif.is_ome and tif.ome_metadata:  # OME-TIFF: PhysicalSizeX/Y/Z of the first image's Pixels
        pixels = next((e for e in ElementTree.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")), None)
        if pixels is not None:
            return {a: float(pixels.get(f"PhysicalSize{a}")) for a in "XYZ" if pixels.get(f"PhysicalSize{a}")}
    if not tif.is_imagej:
        return {}
    spacing, tags = {"Z": float(tif.imagej_metadata.get("spacing", 1.0))}, tif.pages.first.tags
    for axis, tag in (("X", "XResolution"), ("Y", "YResolution")):
        if tag in tags and tags[tag].value[0]:
            spacing[axis] = tags[tag].value[1] / tags[tag].value[0]  # rational pixels/unit -> unit/pixel
    return spacing


def tiff_plan(tif: tifffile.TiffFile, path: str | os.PathLike, series: int | None, level: int = 0, stack: bool = True) -> tuple[int | None, Any, AxisPlan]:
    """``(series index or None, the chosen level's tifffile series, axis plan)`` of an open TIFF.

    ``None`` stacks same-shape series along Z (:func:`choose_tiff_series`); ``level`` is a pyramid level of the
    chosen series (whole-slide TIFF, OME-TIFF SubIFDs, SVS), with the spacing scaled by its downsampling.
    Axes are read by name (:mod:`pipeline.io.axes`): ImageJ ``TZCYX`` hyperstacks, OME ``TCZYX``, RGB samples.

    Raises:
        TiffSeriesError: as :func:`choose_tiff_series`.
        ValueError: ``level`` out of range (listing the levels); :class:`AxesError`: axes not one image.
    """
    chosen = choose_tiff_series(tif, path, series, stack)
    known = _spacing_by_axis(tif)
    if chosen is None:
        if level:
            raise ValueError(f"{path}: a stack of {len(tif.series)} series has no pyramid level {level}; choose a series (tiff_series=N)")
        image, axes, shape, full = None, "Q" + tif.series[0].axes, (len(tif.series), *tif.series[0].shape), None
    else:
        levels = tif.series[chosen].levels
        if not 0 <= level < len(levels):
            listing = ", ".join(f"{i}: {tuple(lv.shape)}" for i, lv in enumerate(levels))
            raise ValueError(f"{path} has no pyramid level {level}; its levels are {listing} (level=N)")
        image, full = levels[level], levels[0]
        axes, shape = image.axes, tuple(image.shape)
    factor = [1.0 if full is None else full.shape[a] / n for a, n in enumerate(shape)]
    spacing = [known.get(a, 1.0) * f for a, f in zip(axes, factor)] if isinstance(known, dict) else None
    try:
        plan = plan_axes(shape, axes, spacing, f"{path}" + (f" (pyramid level {level})" if level else ""), _colour(tif, image, axes))
    except ValueError as err:
        raise AxesError(str(err)) from None
    if isinstance(known, list) and len(known) == len(plan.spacing):  # our writer's JSON: the spatial axes' spacing
        plan = dataclasses.replace(plan, spacing=tuple(known))
    return chosen, image, plan


#: photometric interpretations whose samples tifffile decodes as R, G, B (YCbCr JPEG tiles included)
RGB_PHOTOMETRIC = ("RGB", "YCBCR")


def _colour(tif: tifffile.TiffFile, image: Any, axes: str) -> bool | None:
    """Whether a TIFF's channel axis is colour (:mod:`pipeline.io.axes`): samples ``S`` of a photometric RGB
    (or YCbCr) image are, other samples (minisblack with extra samples, CMYK) are not; an ImageJ ``C`` axis is
    colour only when its lookup tables are red, green and blue (a composite made from an RGB image); None: the
    rule's default by the axis name."""
    if "S" in axes:
        keyframe = (image if image is not None else tif.series[0]).keyframe
        return getattr(keyframe.photometric, "name", str(keyframe.photometric)) in RGB_PHOTOMETRIC
    if "C" in axes and tif.is_imagej:
        luts = (tif.imagej_metadata or {}).get("LUTs")
        if isinstance(luts, (list, tuple)) and len(luts) in (3, 4):
            ramps = [np.asarray(lut) for lut in luts[:3]]
            if all(r.shape == (3, 256) for r in ramps):
                ramp = np.arange(256)
                return all(np.array_equal(r[i], ramp) and not np.delete(r, i, 0).any() for i, r in enumerate(ramps))
    return None


def read_tiff(path: Path, series: int | None = None, level: int = 0) -> tuple[np.ndarray, dict]:
    """A TIFF file's image as ``(array, meta)`` (:class:`pipeline.io.readers.TiffStackReader`: ``series``, ``level``).

    Raises:
        TiffSeriesError: as :func:`choose_tiff_series`. AxesError: axes that are not one image.
        ValueError: a truncated or corrupt file; ``level`` out of range.
    """
    catcher, tiff_log = _TiffLogCatcher(), logging.getLogger("tifffile")
    tiff_log.addHandler(catcher)
    try:
        with tifffile.TiffFile(path) as tif:
            chosen, image, plan = tiff_plan(tif, path, series, level)
            stored = np.stack([s.asarray() for s in tif.series]) if chosen is None else image.asarray()
            size = path.stat().st_size
            if any(o + n > size for p in tif.pages for o, n in zip(p.dataoffsets, p.databytecounts)):
                raise ValueError("pixel data extends past the end of the file (truncated)")
            unit = (tif.imagej_metadata or {}).get("unit")
    except (TiffSeriesError, AxesError):
        raise
    except Exception as err:  # TiffFileError, struct.error, OSError, ... from a damaged file
        raise ValueError(
            f"could not read {path} as TIFF: {type(err).__name__}: {err} (the file is truncated or "
            "corrupt; copy it again)"
        ) from err
    finally:
        tiff_log.removeHandler(catcher)
    if catcher.messages:
        raise ValueError(f"could not read {path} as TIFF: truncated or corrupt ({catcher.messages[0]})")
    array = plan.read(stored)
    meta = {**_base_meta(array.shape, list(plan.spacing), plan.channel_last), "tiff_axes": plan.axes, "colour": plan.colour}
    meta.update({"unit": unit} if unit else {})
    meta.update({"level": level} if level else {})
    logger.debug("read TIFF %s: shape %s axes %s (stored %s) spacing %s", path, array.shape, plan.axes, plan.found, plan.spacing)
    return array, meta
