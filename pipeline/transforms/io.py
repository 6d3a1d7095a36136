"""Loading: files and sections of stacks in, the one read path (MONAI ``transforms/io``); predictions go out through
the engine's sinks (:mod:`pipeline.engine.sinks`)."""

from __future__ import annotations

from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from pipeline.io import channel_first, read_cached, read_image


class LoadSectiond(MapTransform):
    """Load the files named under ``keys`` as channel-first ``MetaTensor``s ``(C, *spatial)``: the one
    read path of training, evaluation and in-memory inference.

    Axes follow :func:`pipeline.io.channel_first`: colour samples first, spatial axes ``(Z,) Y, X``
    (NIfTI's ``(x, y, z)`` reversed, marked ``meta["axes_reversed"]`` so that
    :class:`pipeline.engine.FilesSink` writes predictions back in the file's order). When the item has a
    ``slice_key`` entry ``z``, only section ``z`` is returned, so stacks give 2D training samples (an entry
    ``slices`` = ``[start, stop)`` returns those sections as a stack);
    those files are decoded once for all their sections (:func:`pipeline.io.read_cached`). A whole
    file keeps its reader's meta (spacing, affine, origin, ... in the file's axis order) for writing.

    Args:
        keys: keys holding file paths (``image``, ``label``).
        slice_key: key of the section index; absent or None means the whole file.
        tiff_series: the series of TIFF files of several (:func:`pipeline.io.choose_tiff_series`).
        rgb_to_grey: RGB(A) images become grey by luminance (:func:`pipeline.io.readers.colour_to_grey`), for a
            1-channel network; grey images saved as colour (R = G = B) are read as grey either way.
        allow_missing_chunks: read the chunks a zarr / N5 / HDF5 dataset does not store as its fill value; else such
            a dataset is refused (:func:`pipeline.io.containers.check_chunks`).

    Raises:
        ValueError: a section out of range; an array that is not an image (:func:`pipeline.io.channel_first`);
            the readers' errors (:func:`pipeline.io.read_image`).
    """

    def __init__(
        self, keys: KeysCollection, slice_key: str = "slice", tiff_series: int | None = None, allow_missing_keys: bool = False,
        rgb_to_grey: bool = False, allow_missing_chunks: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slice_key, self.tiff_series, self.rgb_to_grey = slice_key, tiff_series, bool(rgb_to_grey)
        self.allow_missing_chunks = bool(allow_missing_chunks)

    def __call__(self, data: Mapping[Hashable, str]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        z = d.get(self.slice_key)
        slices = d.get(f"{self.slice_key}s")  # [start, stop): a range of sections, kept as a stack
        for key in self.key_iterator(d):
            path = str(d[key])
            dataset = d.get(f"{key}_dataset")  # inside an HDF5 / zarr container (pipeline.data datalists)
            cached = z is not None and self.tiff_series is None  # sections: decode the file once
            holes = self.allow_missing_chunks
            array, meta = read_cached(path, dataset, holes) if cached else read_image(path, self.tiff_series, dataset, holes)
            array, reversed_axes = channel_first(array, meta, path, self.rgb_to_grey)
            spacing = [float(v) for v in np.asarray(meta.get("spacing", [1.0] * (array.ndim - 1)), dtype=float).ravel()]
            spacing = (spacing[::-1] if reversed_axes else spacing)[-(array.ndim - 1):]
            if z is None and slices is not None:
                start, stop = (int(v) for v in slices)
                if array.ndim != 4 or not 0 <= start < stop <= array.shape[1]:
                    raise ValueError(f"{path}: sections [{start}, {stop}) out of range, the file has "
                                     f"{array.shape[1] if array.ndim == 4 else 0} sections")
                array = array[:, start:stop]
                meta = {**meta, "slices": [start, stop]}
            if z is None:
                meta = {**meta, "filename_or_obj": path, "axes_reversed": reversed_axes}
                d[key] = MetaTensor(torch.from_numpy(torch_ready(array)), meta=meta)
                continue
            if array.ndim != 4 or not -array.shape[1] <= z < array.shape[1]:
                sections = array.shape[1] if array.ndim == 4 else 0
                raise ValueError(f"{path}: section {z} out of range, the file has {sections} sections")
            section = np.array(torch_ready(array[:, z]), copy=True)  # the cached file stays read-only
            d[key] = MetaTensor(
                torch.from_numpy(section),
                affine=torch.diag(torch.tensor([*spacing[1:], 1.0], dtype=torch.float64)),
                meta={"filename_or_obj": path, "spacing": spacing[1:], "slice": int(z)},
            )
        return d


def torch_ready(array: np.ndarray) -> np.ndarray:
    """``array`` in a dtype ``torch.from_numpy`` takes: native byte order, and the canonical NumPy type of
    its kind and size (TIFF readers return ``numpy.ulonglong`` for uint64, which torch refuses although
    it takes ``numpy.uint64``: CREMI's uint64 neuron ids)."""
    dt = array.dtype
    native = np.dtype(f"{dt.kind}{dt.itemsize}") if dt.kind in "biufc" else dt
    return np.ascontiguousarray(array, dtype=native)
