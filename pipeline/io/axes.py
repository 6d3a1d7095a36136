"""The one place that decides which axis of a stored array holds sections, which holds channels
and what is dropped: for TIFF (tifffile's axis letters, ImageJ hyperstacks and OME-TIFF included),
OME-Zarr (NGFF axis names) and unnamed HDF5 / zarr datasets.

The plan is made from the header alone (shape, axis names, spacing), so a lazy reader reads blocks
through it and an eager reader the whole array, with one rule:

- named axes (TIFF ``TZCYXS``..., OME ``tczyx``): ``Y`` and ``X`` are the image plane; every other
  axis of size 1 is dropped; a channel axis (``C``, or TIFF samples ``S``) of several values goes last;
  one axis of several values among ``Z``, ``T`` (time), ``I``/``Q`` (tifffile's generic sequences) is
  the section axis -- a time series of 2D frames is predicted frame by frame, as a stack. Two such
  axes (a ``T`` of several time points *and* a ``Z`` of several sections), two channel axes, or any
  other axis of several values is refused, naming the file and the axes found.
- unnamed axes (plain HDF5 / zarr datasets): a trailing singleton (ilastik's ``(Z, Y, X, 1)``) and
  leading singletons are dropped; the rest are ``(Z, Y, X)`` or ``(Y, X)``, no channel.

Axis names come from the file's own metadata (:func:`metadata_axes` for containers): OME-Zarr ``axes``, ilastik
``axistags``, zarr ``dimension_names`` / xarray's ``_ARRAY_DIMENSIONS``, N5 ``axes`` and Fiji's N5 (n5-ij)
``numChannels`` / ``numSlices`` / ``numFrames``; TIFF's from tifffile (ImageJ, OME, samples).

Colour: a channel axis is *colour* (R, G, B(, A)) only when the file says so -- TIFF samples ``S`` (photometric
RGB), or channels a file marks as red, green and blue. Every other channel axis (ImageJ / OME ``C``, ilastik
``c``) holds channels, which are never mixed into grey (``rgb_to_grey`` is for colour only).

The planned array is ``(Z, Y, X)`` or ``(Y, X)`` with channels last, the readers' channel-last rule;
:func:`pipeline.io.channel_first` then moves channels first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

SECTION_AXES = frozenset("ztiq")  # z; t (time); i, q: tifffile's generic image sequence / unknown axis
CHANNEL_AXES = frozenset("cs")  # c; s: TIFF samples (RGB)


@dataclass(frozen=True)
class AxisPlan:
    """How a stored array of ``shape`` is read as ``(Z, Y, X)`` / ``(Y, X)`` with channels last.

    Attributes:
        index: per stored axis, ``slice(None)`` (kept) or ``0`` (a dropped singleton).
        order: the kept axes (numbered after dropping) in planned order.
        spacing: per planned spatial axis, in the stored unit.
        channel_last: whether the planned array ends with a channel axis.
        axes: the planned axes' letters, e.g. ``"ZYXC"``; ``T`` for a section axis that is time (``"TYX"``).
        found: the stored axes as named (``"?"`` for unnamed), for messages.
        colour: the channel axis holds colour samples (R, G, B(, A): module docstring), not channels.
    """

    index: tuple
    order: tuple[int, ...]
    spacing: tuple[float, ...]
    channel_last: bool
    axes: str
    found: str
    colour: bool = False

    def shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The planned shape of a stored array of ``shape``."""
        kept = [int(n) for n, i in zip(shape, self.index) if isinstance(i, slice)]
        return tuple(kept[i] for i in self.order)

    def read(self, array: Any, box: Sequence[slice] | None = None) -> np.ndarray:
        """Read ``array`` (numpy, h5py, zarr, tifffile's zarr store) through the plan; ``box`` slices the
        planned *spatial* axes (default: all), so only that block is read."""
        index = list(self.index)
        if box is not None:
            kept = [a for a, i in enumerate(self.index) if isinstance(i, slice)]
            spatial = self.order[:-1] if self.channel_last else self.order
            for planned, sl in zip(spatial, box):
                index[kept[planned]] = sl
        return np.transpose(np.asarray(array[tuple(index)]), self.order)


def plan_axes(
    shape: Sequence[int], axes: Sequence[str] | str | None, spacing: Sequence[float] | None, where: str, colour: bool | None = None
) -> AxisPlan:
    """Plan how to read a stored array (module docstring for the rule).

    Args:
        shape: the stored shape.
        axes: one name per stored axis (tifffile letters or NGFF names, any case), or None.
        spacing: one value per stored axis (None: 1 each).
        where: the file (and dataset) for messages.
        colour: whether the channel axis is colour; None: TIFF samples ``S`` are, ``C`` is not.

    Raises:
        ValueError: axes that cannot be read as one image, naming ``where``, the axes and the shape.
    """
    shape = tuple(int(n) for n in shape)
    spacing = [1.0] * len(shape) if spacing is None else [float(s) for s in spacing]
    names = [str(a).lower() for a in axes] if axes else None
    found = "".join(a.upper() if len(a) == 1 else f"[{a}]" for a in names) if names else "?" * len(shape)
    if names is not None and len(names) != len(shape):
        raise ValueError(f"{where}: {len(names)} axis names ({found}) for an array of shape {shape}")

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"{where} has axes {found} {shape}: {why}; an image is (Y, X) or (Z, Y, X), channels optional "
            "(save such a dataset, e.g. one time point or one channel set)"
        )

    if names is None:
        lead, end = 0, len(shape)
        if end >= 3 and shape[-1] == 1:  # a trailing singleton channel (ilastik's (Z, Y, X, 1) exports)
            end -= 1
        while end - lead > 3 and shape[lead] == 1:
            lead += 1
        if end - lead not in (2, 3):
            raise refuse(f"{end - lead} axes left after dropping singletons")
        index = tuple(slice(None) if lead <= a < end else 0 for a in range(len(shape)))
        planned = "ZYX"[3 - (end - lead) :]
        return AxisPlan(index, tuple(range(end - lead)), tuple(spacing[lead:end]), False, planned, found)

    if "y" not in names or "x" not in names:
        raise refuse("no Y and X axes")
    big = {a: n for a, n in enumerate(shape) if n > 1 or names[a] in ("y", "x")}
    sections = [a for a in big if names[a] in SECTION_AXES]
    channels = [a for a in big if names[a] in CHANNEL_AXES]
    other = [a for a in big if a not in sections + channels and names[a] not in ("y", "x")]
    if other:
        raise refuse(f"axis {', '.join(found[a] for a in other)} of several values is neither sections, channels nor the plane")
    if len(sections) > 1:
        raise refuse(f"several section axes ({', '.join(names[a].upper() for a in sections)}), e.g. time points and sections")
    if len(channels) > 1:
        raise refuse("two channel axes (C and S)")
    keep = sorted(big)
    wanted = sections + [names.index("y"), names.index("x")] + channels
    order = tuple(keep.index(a) for a in wanted)
    index = tuple(slice(None) if a in big else 0 for a in range(len(shape)))
    section = ("T" if names[sections[0]] == "t" else "Z") if sections else ""  # a time-lapse stays T (written back so)
    letters = section + "YX" + ("C" if channels else "")
    colour = bool(channels) and (names[channels[0]] == "s" if colour is None else bool(colour))
    return AxisPlan(index, order, tuple(spacing[a] for a in wanted if a not in channels), bool(channels), letters, found, colour)


#: axis names files spell otherwise (xarray, zarr ``dimension_names``) -> the rule's names
AXIS_SYNONYMS = {"time": "t", "channel": "c", "channels": "c"}


def _known_names(names: Any, ndim: int) -> list[str] | None:
    """``names`` lower-cased (synonyms mapped) if they are one known axis name per axis, with Y and X; else None."""
    if not isinstance(names, (list, tuple)) or len(names) != ndim or not all(isinstance(n, str) for n in names):
        return None
    out = [AXIS_SYNONYMS.get(n.strip().lower(), n.strip().lower()) for n in names]
    return out if set(out) <= set("tczyx") and {"y", "x"} <= set(out) and len(set(out)) == ndim else None


def metadata_axes(attrs: dict, ndim: int, n5: bool = False, dimension_names: Sequence[str] | None = None) -> list[str] | None:
    """The axis names a container dataset's own metadata gives, one per axis of the array as read (C order), or None.

    - ilastik / vigra ``axistags`` (HDF5, N5 and zarr datasets): a JSON ``{"axes": [{"key": "y", ...}, ...]}``
      in the array's order, read as written (an axis the rule cannot place is refused by :func:`plan_axes`).
    - zarr v3 ``dimension_names`` and xarray's ``_ARRAY_DIMENSIONS`` (zarr v2), in the array's order; used when every
      name is one of ``t c z y x`` (``time``, ``channel``), so that names such as ``dim_0`` leave the axes unnamed.
    - N5 (``n5``): an ``axes`` attribute (as n5-ij reads it), and Fiji's ImageJ metadata (n5-ij ``numChannels``,
      ``numSlices``, ``numFrames``: dimensions ``x, y[, c][, z][, t]``, those of 1 left out); N5 lists them x first,
      so they are reversed. BigDataViewer / n5-viewer datasets (``s0``, ``downsamplingFactors``) are 3D ``x, y, z``:
      unnamed, which reads them as ``(Z, Y, X)``.
    """
    tags = attrs.get("axistags")
    if isinstance(tags, bytes):
        tags = tags.decode("utf-8", "replace")
    if isinstance(tags, str):
        try:
            keys = [str(a["key"]) for a in json.loads(tags)["axes"]]
        except (ValueError, KeyError, TypeError):
            keys = None
        if keys:
            return [AXIS_SYNONYMS.get(k.lower(), k.lower()) for k in keys]
    for names in (dimension_names, attrs.get("_ARRAY_DIMENSIONS")):
        known = _known_names(list(names) if isinstance(names, (list, tuple)) else names, ndim)
        if known:
            return known
    if not n5:
        return None
    known = _known_names(attrs.get("axes"), ndim)
    if known:
        return known[::-1]
    counts = [attrs.get(k) for k in ("numChannels", "numSlices", "numFrames")]
    if all(isinstance(n, int) and n >= 1 for n in counts):
        names = ["x", "y"] + [a for a, n in zip("czt", counts) if n > 1]
        if len(names) == ndim:
            return names[::-1]
    return None


#: length units as files spell them -> NGFF (OME-Zarr) unit names
NGFF_UNITS = {
    "µm": "micrometer", "\u00b5m": "micrometer", "um": "micrometer", "micron": "micrometer", "microns": "micrometer",
    "micrometer": "micrometer", "nm": "nanometer", "nanometer": "nanometer", "mm": "millimeter", "millimeter": "millimeter",
    "å": "angstrom", "angstrom": "angstrom", "m": "meter", "meter": "meter", "pm": "picometer", "picometer": "picometer",
}
#: NGFF unit names -> OME-TIFF ``PhysicalSize*Unit`` symbols
OME_TIFF_UNITS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "angstrom": "Å", "meter": "m", "picometer": "pm"}


def ngff_unit(unit: Any) -> str | None:
    """A length unit as a file spells it (``"µm"``, ``"micron"``, ``"nm"``, ``"nanometer"`` ...) as its NGFF
    name, or None when unknown or absent."""
    return NGFF_UNITS.get(str(unit).strip().lower()) if unit else None
