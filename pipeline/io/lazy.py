"""A file, zarr store or in-memory array opened lazily as ``(C, *spatial)``: what block-by-block
prediction (:mod:`pipeline.streaming`) reads, in process or on Dask workers.

TIFF is read through ``tifffile``'s zarr store (one series, one pyramid level), HDF5 through ``h5py``,
zarr arrays and groups (OME-Zarr: a level) through ``zarr``; axes, samples and channels are interpreted
as for in-memory reading (:mod:`pipeline.io.axes`, :func:`~pipeline.io.readers.check_channels`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile
import zarr

from pipeline.io.common import HDF5_SUFFIXES, N5_SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIXES, _suffix
from pipeline.io.containers import check_chunks, dataset_plan, open_dataset
from pipeline.io.axes import ngff_unit
from pipeline.io.readers import ImageInfo, check_channels, colour_to_grey
from pipeline.io.tiff import tiff_level, tiff_plan, tiff_unit


class LazySource:
    """A lazily opened, picklable source array seen as ``(C, *spatial)``.

    Files are read through the one axis rule (:mod:`pipeline.io.axes`), as in memory: TIFF (a series
    and pyramid level: whole-slide images, OME-TIFF, ImageJ hyperstacks) through ``tifffile``'s zarr
    store, HDF5 / zarr / OME-Zarr datasets. Paths are reopened wherever the object is unpickled (a
    Dask worker); in-memory arrays (numpy, zarr, dask ...) travel as they are, ``(C, *spatial)`` when
    ``in_channels > 1``, leading singleton axes dropped.

    Colour for a 1-channel network: an RGB(A) file is read as grey where R = G = B (a grey image saved as
    colour, as in memory); with ``rgb_to_grey`` every other pixel becomes its luminance
    (:func:`pipeline.io.readers.colour_to_grey`), else reading such a pixel raises ``ValueError``.

    Args:
        source: a path or an array.
        spatial_dims, in_channels: the network's.
        tiff_series: the series of a TIFF of several.
        key: the dataset of a container; the pyramid level of a TIFF or OME-Zarr image (0: full resolution).
        rgb_to_grey: colour to grey by luminance for a 1-channel network.
    """

    def __init__(
        self, source: Any, spatial_dims: int, in_channels: int, tiff_series: int | None = None, key: str | None = None,
        rgb_to_grey: bool = False,
    ) -> None:
        self.array, self.tiff_series, self.key = None, tiff_series, None if key is None else str(key)
        self.rgb_to_grey, self.plan, self.unit = bool(rgb_to_grey), None, None
        if isinstance(source, (str, os.PathLike)):
            self.path = os.fspath(source)
            suffix = _suffix(self.path)
            self.kind = "tiff" if suffix in TIFF_SUFFIXES else "hdf5" if suffix in HDF5_SUFFIXES else "n5" if suffix in N5_SUFFIXES else "zarr"
            if self.kind == "zarr" and _suffix(self.path) not in ZARR_SUFFIXES and not os.path.isdir(self.path):
                raise ValueError(
                    f"{self.path}: block-by-block prediction reads TIFF, HDF5, N5 and zarr / OME-Zarr, not "
                    f"{_suffix(self.path) or 'files without a suffix'}; predict it in memory (without streaming)"
                )
            if "://" not in self.path and not os.path.exists(self.path):
                raise FileNotFoundError(f"source {self.kind} store {self.path} does not exist")
            self.level = tiff_level(self.path, self.key) if self.kind == "tiff" else 0
        else:
            self.path, self.kind, self.level = None, "array", 0
            self.array = source if hasattr(source, "shape") and hasattr(source, "__getitem__") else np.asarray(source)
        stored = tuple(int(s) for s in self.open().shape)
        name = self.path or f"{type(self.array).__name__} source"
        allowed = (2, 3) if spatial_dims == 2 else (3,)
        if self.plan is not None:  # a file: the one axis rule
            planned = self.plan.shape(stored)
            channels = planned[-1] if self.plan.channel_last else 1
            self.stored_channels = channels
            self.spatial = planned[:-1] if self.plan.channel_last else planned
            planar = self.plan.found.lstrip("Q").startswith("S")  # tifffile's planar RGB: maybe 3 sections (check_channels)
            colour = self.plan.colour and channels in (3, 4)  # colour samples; other channels are never mixed into grey
            self.grey = in_channels == 1 and colour and (rgb_to_grey or not planar)  # colour read as grey
            if channels != in_channels and not self.grey:
                info = ImageInfo(planned, channels, np.dtype(self.open().dtype), self.plan.found, stored, self.plan.colour)
                check_channels(self.path, info, in_channels, rgb_to_grey=rgb_to_grey)
            if len(self.spatial) not in allowed:
                raise ValueError(
                    f"{name} holds a {len(self.spatial)}D image (shape {planned}, stored axes {self.plan.found} {stored}), "
                    f"but a {spatial_dims}D network needs " + (" or ".join(("(Z, Y, X)", "(Y, X)")[: len(allowed)][::-1]))
                )
        else:
            self.grey, channel = False, in_channels > 1
            lead = 0
            while len(stored) - lead > max(allowed) + channel and stored[lead] == 1:
                lead += 1  # singleton leading axes
            core = stored[lead:]
            if len(core) - channel not in allowed or (channel and core[0] != in_channels):
                want = " or ".join(("(C, " if channel else "(") + ", ".join("ZYX"[3 - n :]) + ")" for n in allowed)
                raise ValueError(
                    f"{name} has shape {stored} ({len(stored)} dims), but a {spatial_dims}D network with "
                    f"{in_channels} input channel(s) needs {want}" + (f" with C = {in_channels}" if channel else "")
                )
            self.lead, self.channel, self.stored_channels = lead, channel, in_channels
            self.spatial = core[1:] if channel else core
        self.channels = in_channels
        self.dtype = np.dtype(self.open().dtype)

    def open(self) -> Any:
        """The stored array (opened on first use; a TIFF level through tifffile's zarr store)."""
        if self.array is None:
            try:
                if self.kind == "tiff":
                    with tifffile.TiffFile(self.path) as tif:
                        series, _, self.plan = tiff_plan(tif, self.path, self.tiff_series, self.level, stack=False)
                        self.unit = tiff_unit(tif)
                    store = tifffile.imread(self.path, aszarr=True, series=series, level=self.level)
                    self.array = zarr.open_array(store, mode="r")
                else:  # HDF5 or zarr: the dataset `key`, or the only one (OME-Zarr: full resolution)
                    self.array, info = open_dataset(self.path, self.key)
                    self.plan, self.dataset = dataset_plan(self.array, info, self.path), info["dataset"]
                    self.unit = ngff_unit(info.get("unit"))
            except (ValueError, FileNotFoundError):
                raise
            except Exception as err:
                raise ValueError(f"could not open {self.path} as a {self.kind} array: {type(err).__name__}: {err}") from err
        return self.array

    def close(self) -> None:
        """Close an open HDF5 file (reopened on the next read)."""
        if self.kind == "hdf5" and self.array is not None:
            self.array.file.close()
            self.array = None

    @property
    def spacing(self) -> tuple[float, ...] | None:
        """The spatial spacing of a file source (``(Z,) Y, X``, in its unit; None for arrays)."""
        self.open()
        return None if self.plan is None else tuple(self.plan.spacing)

    def check_complete(self) -> None:
        """The missing-data rule of every reading path (:func:`pipeline.io.containers.check_chunks`): a container
        dataset (zarr, N5, HDF5) or a zarr array passed in with chunks not stored raises ``ValueError``
        naming them. A TIFF is not chunked storage that can lose chunks, nor is an in-memory array."""
        if self.kind != "tiff":
            array, dataset = self.open(), getattr(self, "dataset", None)
            check_chunks(array, (self.path + (f" dataset {dataset!r}" if dataset else "")) if self.path else "the zarr array")

    def identity(self) -> dict | None:
        """What the output records of its source, so that a resume never continues another input's
        prediction: the absolute path, the TIFF series and, for a file, its size and modification time
        (None for an in-memory array)."""
        if self.path is None:
            return None
        path = Path(self.path)
        record = {"path": str(path.absolute()) if "://" not in self.path else self.path, "tiff_series": self.tiff_series}
        if self.key:
            record["dataset"] = self.key
        if path.is_file():
            stat = path.stat()
            record.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        return record

    def __getstate__(self) -> dict:
        return {**self.__dict__, "array": self.array if self.kind == "array" else None}

    def read(self, index: Sequence[slice]) -> np.ndarray:
        """Read ``index`` (spatial slices) as ``(C, *box)``.

        Raises:
            ValueError: colour pixels (R, G, B not equal) for a 1-channel network without ``rgb_to_grey``.
        """
        array = self.open()
        if self.plan is None:
            prefix = (0,) * self.lead + ((slice(None),) if self.channel else ())
            out = np.asarray(array[prefix + tuple(index)])
            return out if self.channel else out[None]
        out = self.plan.read(array, index)
        out = np.moveaxis(out, -1, 0) if self.plan.channel_last else out[None]
        if self.grey:
            grey = colour_to_grey(out, self.rgb_to_grey)
            if grey is None:
                where = ", ".join(f"{s.start or 0}:{'' if s.stop is None else s.stop}" for s in index)
                raise ValueError(
                    f"{self.path}: pixels [{where}] are colour "
                    "(R, G and B differ), but the network takes 1 channel; pass rgb_to_grey=True to predict their "
                    "luminance (0.2125 R + 0.7154 G + 0.0721 B), convert the file to grey, or use a network trained on colour"
                )
            out = grey
        return out
