"""A file, zarr store or in-memory array opened lazily as ``(C, *spatial)``: what block-by-block
prediction (:mod:`pipeline.streaming`) reads, in process or on Dask workers.

TIFF is read through ``tifffile``'s zarr store (one series, full resolution), zarr arrays and groups
(OME-Zarr: the full-resolution level) through ``zarr``; samples and channels are interpreted as for
in-memory reading (:func:`pipeline.io.readers.probe_image`, :func:`~pipeline.io.readers.check_channels`).
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile
import zarr

from pipeline.io.common import HDF5_SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIXES, _suffix
from pipeline.io.containers import open_dataset
from pipeline.io.readers import check_channels, choose_tiff_series, probe_image


class LazySource:
    """A lazily opened, picklable source array seen as ``(C, *spatial)``.

    Paths are reopened wherever the object is unpickled (a Dask worker); in-memory arrays
    (numpy, zarr, dask ...) travel as they are.
    """

    def __init__(self, source: Any, spatial_dims: int, in_channels: int, tiff_series: int | None = None, key: str | None = None) -> None:
        self.array, self.tiff_series, self.key = None, tiff_series, None if key is None else str(key)
        if isinstance(source, (str, os.PathLike)):
            self.path = os.fspath(source)
            self.kind = "tiff" if self.path.lower().endswith(TIFF_SUFFIXES) else "hdf5" if _suffix(self.path) in HDF5_SUFFIXES else "zarr"
            if self.kind == "zarr" and _suffix(self.path) not in ZARR_SUFFIXES and not os.path.isdir(self.path):
                raise ValueError(
                    f"{self.path}: block-by-block prediction reads TIFF, HDF5 and zarr / OME-Zarr, not "
                    f"{_suffix(self.path) or 'files without a suffix'}; predict it in memory (without streaming)"
                )
            if "://" not in self.path and not os.path.exists(self.path):
                raise FileNotFoundError(f"source {self.kind} store {self.path} does not exist")
        else:
            self.path, self.kind = None, "array"
            self.array = source if hasattr(source, "shape") and hasattr(source, "__getitem__") else np.asarray(source)
        if self.kind == "tiff":  # the same reading of samples/channels as in-memory prediction
            check_channels(self.path, probe_image(self.path, tiff_series), in_channels)
        shape = tuple(int(s) for s in self.open().shape)
        name = self.path or f"{type(self.array).__name__} source"
        channel = in_channels > 1
        allowed = (2, 3) if spatial_dims == 2 else (3,)
        self.lead = 0
        while len(shape) - self.lead > max(allowed) + channel and shape[self.lead] == 1:
            self.lead += 1  # OME-Zarr style singleton t/c axes
        core = shape[self.lead :]
        if len(core) - channel not in allowed or (channel and core[0] != in_channels):
            want = " or ".join(("(C, " if channel else "(") + ", ".join("ZYX"[3 - n :]) + ")" for n in allowed)
            raise ValueError(
                f"{name} has shape {shape} ({len(shape)} dims), but a {spatial_dims}D network with "
                f"{in_channels} input channel(s) needs {want}" + (f" with C = {in_channels}" if channel else "")
            )
        self.channel, self.channels = channel, in_channels
        self.spatial = core[1:] if channel else core
        self.dtype = np.dtype(self.open().dtype)

    def open(self) -> Any:
        if self.array is None:
            try:
                if self.kind == "tiff":
                    with tifffile.TiffFile(self.path) as tif:
                        series = choose_tiff_series(tif, self.path, self.tiff_series, stack=False)
                    self.array = zarr.open_array(tifffile.imread(self.path, aszarr=True, series=series, level=0), mode="r")
                else:  # HDF5 or zarr: the dataset `key`, or the only one (OME-Zarr: full resolution)
                    self.array, _ = open_dataset(self.path, self.key)
            except (ValueError, FileNotFoundError):
                raise
            except Exception as err:
                raise ValueError(f"could not open {self.path} as a {self.kind} array: {type(err).__name__}: {err}") from err
        return self.array

    def missing_chunks(self) -> tuple[int, int, list[str]]:
        """``(missing, total, names)`` of the stored chunks (shards) of a zarr source: zarr reads a
        chunk that is not stored as the fill value, so a deleted block would be predicted from zeros.
        ``names`` are the missing chunks' files for a local store (at most 5), else empty."""
        array = self.open()
        if self.kind == "tiff" or not hasattr(array, "nchunks_initialized"):  # a zarr store, or a zarr.Array passed in
            return 0, 0, []
        total, stored = int(array.nchunks), int(array.nchunks_initialized)
        if stored >= total:
            return 0, total, []
        names, root = [], getattr(array.store, "root", None)
        if root is not None:
            grid = [math.ceil(n / c) for n, c in zip(array.shape, array.shards or array.chunks)]
            for coords in itertools.product(*map(range, grid)):
                key = array.metadata.encode_chunk_key(coords)
                if not (Path(root) / array.path / key).exists():
                    names.append(f"{key} (array index {coords})")
                    if len(names) == 5:
                        break
        return total - stored, total, names

    def check_complete(self) -> None:
        """Raise ``ValueError`` if a zarr source has chunks missing (see :meth:`missing_chunks`)."""
        missing, total, names = self.missing_chunks()
        if missing:
            raise ValueError(
                f"{self.path or 'the zarr array'}: {missing} of {total} chunks are missing from the zarr array"
                + (f", e.g. {', '.join(names)}" if names else "")
                + f"; zarr reads a chunk that is not stored as the fill value ({array_fill(self.open())}). A chunk is "
                "missing when it was deleted or lost in a copy, but zarr also skips writing chunks that equal the fill "
                "value (blank regions) unless told otherwise. If the dataset is complete, pass --allow_missing_chunks "
                "true to predict those regions from the fill value; else copy the dataset again"
            )

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
        """Read ``index`` (spatial slices) as ``(C, *box)``."""
        prefix = (0,) * self.lead + ((slice(None),) if self.channel else ())
        out = np.asarray(self.open()[prefix + tuple(index)])
        return out if self.channel else out[None]


def array_fill(array: Any) -> Any:
    """The fill value of a zarr array (what zarr returns for a chunk that is not stored)."""
    return getattr(getattr(array, "metadata", None), "fill_value", getattr(array, "fill_value", None))
