"""Containers of named datasets: HDF5 (``h5py``) and zarr v2/v3 stores, OME-Zarr images included.

EM volumes mostly arrive this way: CREMI and ilastik exports and pytorch-3dunet's inputs are HDF5
files holding ``raw`` / ``labels`` datasets; large volumes are zarr stores (napari, neuroglancer).

A dataset is named by its path inside the container (``raw``, ``volumes/raw``). With no name, the
only dataset is used; an OME-Zarr image (a group with ``multiscales``) counts as one dataset, its
full-resolution level. Several datasets and no name is an error listing them.

Axes and spacing. OME-Zarr (NGFF 0.4 / 0.5) names its axes (``t``, ``c``, ``z``, ``y``, ``x``) and
gives the physical scale of each; singleton ``t`` and ``c`` are dropped and a ``c`` of several channels moves last (the readers'
channel-last rule, :func:`pipeline.io.channel_first`). Other datasets are ``(Z, Y, X)`` or ``(Y, X)``
(leading singleton axes dropped), with spacing from the attributes ``resolution`` (CREMI, in nm) or
``element_size_um`` (ilastik, Fiji), in array-axis order, else 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr

from pipeline.io.common import HDF5_SUFFIXES, ZARR_SUFFIXES, _base_meta, _suffix

SPACING_ATTRIBUTES = ("resolution", "element_size_um", "spacing")


def is_container(path: str | os.PathLike) -> bool:
    """An HDF5 file or a zarr store (by suffix)."""
    return _suffix(path) in HDF5_SUFFIXES + ZARR_SUFFIXES


def _multiscales(attrs: dict) -> list | None:
    return attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")


def list_datasets(path: str | os.PathLike) -> list[str]:
    """The names of the array datasets in a container (an OME-Zarr image: its full-resolution level;
    a zarr array store: ``[""]``).

    Raises:
        FileNotFoundError: no such file or store.
        ValueError: the container cannot be opened.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"container not found: {path}")
    kind = "an HDF5 file" if _suffix(path) in HDF5_SUFFIXES else "a zarr array"
    try:
        if _suffix(path) in HDF5_SUFFIXES:
            names: list[str] = []
            with h5py.File(path, "r") as f:
                f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            return sorted(names)
        node = zarr.open(str(path), mode="r")
    except json.JSONDecodeError as err:
        raise ValueError(f"could not open {path} as {kind}: its metadata is corrupt ({err}); copy the dataset again") from err
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no zarr array or group found at {path}: {err}") from err
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"could not open {path} as {kind}: {type(err).__name__}: {err}") from err
    if isinstance(node, zarr.Array):
        return [""]
    scales = _multiscales(node.attrs.asdict())
    if scales:
        return [scales[0]["datasets"][0]["path"]]
    return sorted(name for name, member in node.members(max_depth=None) if isinstance(member, zarr.Array))


def choose_dataset(path: str | os.PathLike, key: str | None) -> str:
    """The dataset to read: ``key`` (checked), or the only one.

    Raises:
        ValueError: ``key`` names no dataset, or several datasets and no ``key``; both list the datasets.
    """
    names = list_datasets(path)
    key = None if key is None else str(key)  # a key typed as 1 on the command line arrives as an int
    if key is None:
        if len(names) == 1:
            return names[0]
        listing = ", ".join(repr(n) for n in names[:10]) + (" ..." if len(names) > 10 else "")
        raise ValueError(
            f"{path} holds {len(names)} datasets ({listing}); name the one to read (--input_key for inference, --image_key / --label_key for evaluation, key= in Python)" if names else
            f"{path} holds no dataset (no array inside)"
        )
    key = key.strip("/")
    if key not in names and not _is_level(path, key):
        raise ValueError(f"{path} has no dataset {key!r}; it holds {', '.join(repr(n) for n in names) or 'none'}")
    return key


def _is_level(path: str | os.PathLike, key: str) -> bool:
    """``key`` is a resolution level of an OME-Zarr image."""
    if _suffix(path) not in ZARR_SUFFIXES:
        return False
    node = zarr.open(str(path), mode="r")
    if not isinstance(node, zarr.Group):
        return False
    scales = _multiscales(node.attrs.asdict())
    return bool(scales) and key in [d["path"] for d in scales[0]["datasets"]]


def open_dataset(path: str | os.PathLike, key: str | None = None) -> tuple[Any, dict]:
    """Open a dataset lazily: ``(array, info)``, ``array`` an ``h5py.Dataset`` (its file stays open) or a
    ``zarr.Array``; ``info`` holds ``dataset`` (the name), ``axes`` (OME-Zarr axis names, else None)
    and ``spacing`` (one value per array axis).

    Raises:
        FileNotFoundError, ValueError: as :func:`choose_dataset`.
    """
    key = choose_dataset(path, key)
    if _suffix(path) in HDF5_SUFFIXES:
        array = h5py.File(path, "r")[key]
        attrs, axes = dict(array.attrs), None
        spacing = _attribute_spacing(attrs, tuple(array.shape))
    else:
        root = zarr.open(str(path), mode="r")
        array = root if isinstance(root, zarr.Array) else root[key]
        axes, spacing = None, _attribute_spacing(array.attrs.asdict(), tuple(array.shape))
        scales = None if isinstance(root, zarr.Array) else _multiscales(root.attrs.asdict())
        if scales:
            axes = [a["name"] if isinstance(a, dict) else a for a in scales[0].get("axes", [])] or None
            level = next(d for d in scales[0]["datasets"] if d["path"] == key)
            scale = next((t["scale"] for t in level.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
            spacing = [float(s) for s in scale] if scale and len(scale) == array.ndim else spacing
    return array, {"dataset": key, "axes": axes, "spacing": spacing}


def _attribute_spacing(attrs: dict, shape: tuple[int, ...]) -> list[float]:
    """One spacing per array axis from the first spacing attribute; one value short is the spatial
    axes' (the missing axis: a trailing singleton channel, else a leading one), else 1."""
    ndim = len(shape)
    for name in SPACING_ATTRIBUTES:
        value = attrs.get(name)
        if value is not None and np.size(value) in (ndim, ndim - 1):
            values = [float(v) for v in np.ravel(value)]
            if len(values) == ndim:
                return values
            return values + [1.0] if shape[-1] == 1 else [1.0] + values
    return [1.0] * ndim


def plan_axes(shape: tuple[int, ...], info: dict, path: str | os.PathLike) -> tuple[tuple, list[int], list[float], bool]:
    """How a dataset of ``shape`` becomes ``(Z, Y, X)`` / ``(Y, X)`` with channels last, without reading it:
    ``(index, order, spacing, channel_last)``: read ``array[index]``, then move its axes to ``order``.

    OME axes: a singleton ``t`` or ``c`` is dropped, ``c`` of several channels moves last. Unnamed axes:
    a trailing singleton (a channel of 1, as ilastik writes) and leading singletons are dropped.

    Raises:
        ValueError: axes that cannot be read as an image (a ``t`` of several time points, other than 2
            or 3 spatial axes), naming the file, the dataset and the axes found.
    """
    axes, spacing = info["axes"], list(info["spacing"])
    found = "".join(axes) if axes else "?" * len(shape)
    where = f"{path}" + (f" dataset {info['dataset']!r}" if info["dataset"] else "")
    if axes:
        keep = [i for i, a in enumerate(axes) if not (a in ("t", "c") and shape[i] == 1)]  # grey: no channel axis
        if any(axes[i] == "t" for i in keep):
            raise ValueError(f"{where} has axes {found} {shape} with several time points; save one time point to predict it")
        names = [axes[i] for i in keep]
        channel_last = "c" in names
        order = [i for i, a in enumerate(names) if a != "c"] + ([names.index("c")] if channel_last else [])
        spacing = [spacing[keep[i]] for i in order if names[i] != "c"]
    else:
        lead, end = 0, len(shape)
        if end >= 3 and shape[-1] == 1:  # a trailing singleton channel (ilastik's (Z, Y, X, 1) exports)
            end -= 1
        while end - lead > 3 and shape[lead] == 1:
            lead += 1
        keep, channel_last = list(range(lead, end)), False
        order, spacing = list(range(len(keep))), spacing[lead:end]
    spatial = len(keep) - channel_last
    if spatial not in (2, 3):
        raise ValueError(
            f"{where} has axes {found} {shape}: an image is (Y, X) or (Z, Y, X); save one such dataset (channels of "
            "several values only in OME-Zarr, as an axis named 'c')"
        )
    index = tuple(slice(None) if i in keep else 0 for i in range(len(shape)))
    return index, order, spacing, channel_last


def planned_shape(shape: tuple[int, ...], index: tuple, order: list[int]) -> tuple[int, ...]:
    """The shape :func:`plan_axes` gives a dataset of ``shape``."""
    kept = [n for n, i in zip(shape, index) if isinstance(i, slice)]
    return tuple(kept[i] for i in order)


def read_container(path: str | os.PathLike, key: str | None = None) -> tuple[np.ndarray, dict]:
    """Read a container's dataset into ``(array, meta)`` as :func:`pipeline.io.read_image` does for files:
    ``(Z, Y, X)`` or ``(Y, X)``, channels last, ``meta["spacing"]``, ``meta["dataset"]``.

    Raises:
        FileNotFoundError, ValueError: as :func:`open_dataset` and :func:`plan_axes`.
    """
    array, info = open_dataset(path, key)
    try:
        index, order, spacing, channel_last = plan_axes(tuple(int(n) for n in array.shape), info, path)
        data = np.transpose(np.asarray(array[index]), order)
    finally:
        if isinstance(array, h5py.Dataset):
            array.file.close()
    meta = _base_meta(data.shape, spacing, channel_last)
    meta.update({"dataset": info["dataset"], "filename_or_obj": str(path)})
    return data, meta


def write_container(array: np.ndarray, path: Path, meta: dict, channel_last: bool) -> None:
    """Write ``array`` as one dataset of a new container at ``path`` (HDF5 file or zarr v3 store), named
    ``meta["dataset"]`` (default ``"data"``), gzip/zstd-compressed, with ``resolution`` (the spacing, array-axis
    order) as an attribute. Used by :func:`pipeline.io.write_image`, which makes the write atomic."""
    key = str(meta.get("dataset") or "data")
    spatial = array.ndim - channel_last
    spacing = [float(s) for s in np.ravel(meta.get("spacing", [1.0] * spatial))][-spatial:]
    if _suffix(path) in HDF5_SUFFIXES:
        with h5py.File(path, "w") as f:
            dataset = f.create_dataset(key, data=array, compression="gzip", chunks=True)
            dataset.attrs["resolution"] = spacing
        return
    group = zarr.open_group(str(path), mode="w")
    dataset = group.create_array(key, shape=array.shape, dtype=array.dtype, chunks=tuple(min(n, 256) for n in array.shape))
    dataset[...] = array
    dataset.attrs["resolution"] = spacing
