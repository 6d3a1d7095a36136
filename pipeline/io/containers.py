"""Containers of named datasets: HDF5 (``h5py``), zarr v2/v3 stores (OME-Zarr images included) and N5
stores (``tensorstore``; zarr 3 no longer reads N5).

EM volumes mostly arrive this way: CREMI and ilastik exports and pytorch-3dunet's inputs are HDF5
files holding ``raw`` / ``labels`` datasets; large volumes are zarr stores (napari, neuroglancer).

A dataset is named by its path inside the container (``raw``, ``volumes/raw``). With no name, the
only dataset is used; an OME-Zarr image (a group with ``multiscales``) counts as one dataset, its
full-resolution level. Several datasets and no name is an error listing them.

Axes and spacing. OME-Zarr (NGFF 0.4 / 0.5) names its axes (``t``, ``c``, ``z``, ``y``, ``x``) and
gives the physical scale of each; they are read by the one axis rule (:mod:`pipeline.io.axes`): singleton
``t`` and ``c`` dropped, a ``c`` of several channels last. Other datasets are ``(Z, Y, X)`` or ``(Y, X)``
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

from pipeline.io.axes import AxisPlan, plan_axes
from pipeline.io.common import HDF5_SUFFIXES, N5_SUFFIXES, STORE_SUFFIXES, ZARR_SUFFIXES, _base_meta, _suffix

SPACING_ATTRIBUTES = ("resolution", "element_size_um", "spacing")


def is_container(path: str | os.PathLike) -> bool:
    """An HDF5 file, a zarr or an N5 store (by suffix)."""
    return _suffix(path) in HDF5_SUFFIXES + STORE_SUFFIXES


# ---------------------------------------------------------------- N5 (tensorstore)
def _n5_datasets(path: Path) -> list[str]:
    """The datasets of an N5 store: folders whose ``attributes.json`` has ``dimensions`` (the N5 spec)."""
    names = []
    for attrs in sorted(path.rglob("attributes.json")):
        try:
            meta = json.loads(attrs.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"could not open {path} as an N5 store: {attrs} is corrupt ({err}); copy the dataset again") from err
        if "dimensions" in meta:
            names.append(attrs.parent.relative_to(path).as_posix().strip("."))
    return names


def _n5_open(path: Path, key: str) -> tuple[Any, dict]:
    """An N5 dataset as a tensorstore array in C order ``(..., Z, Y, X)`` (N5 lists dimensions x first, as
    BigDataViewer, z5py and zarr 2's ``N5Store`` read them reversed), and its attributes."""
    import tensorstore as ts

    folder = path / key
    attrs = json.loads((folder / "attributes.json").read_text())
    array = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folder)}}, read=True).result()
    return N5Array(array.T), attrs


class N5Array:
    """A tensorstore array with numpy's ``shape``/``dtype``/``ndim`` and reading ``__getitem__``."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.shape = tuple(int(n) for n in store.shape)
        self.dtype = np.dtype(store.dtype.numpy_dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.store[index].read().result()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)


def _n5_spacing(attrs: dict, ndim: int) -> list[float]:
    """Spacing in C order from N5 attributes: ``resolution`` or ``pixelResolution.dimensions`` (x first)."""
    value = attrs.get("resolution")
    pixel = attrs.get("pixelResolution")
    if value is None and isinstance(pixel, dict):
        value = pixel.get("dimensions")
    if value is not None and len(value) == ndim:
        return [float(v) for v in reversed(value)]
    return [1.0] * ndim


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
    if _suffix(path) in N5_SUFFIXES:
        return _n5_datasets(path)
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
            f"{path} holds {len(names)} datasets ({listing}); name the one to read: key=<name> (image_key=<name> / label_key=<name> for images and labels)" if names else
            f"{path} holds no dataset (no array inside)"
        )
    key = key.strip("/")
    if key in names:
        return key
    level = _level_path(path, key)
    if level is None:
        raise ValueError(f"{path} has no dataset {key!r}; it holds {', '.join(repr(n) for n in names) or 'none'}")
    return level


def _level_path(path: str | os.PathLike, key: str) -> str | None:
    """The path of the OME-Zarr level ``key`` names: a level's path (``"1"``), or its index in the
    multiscales (``"1"`` for ``scale1/image``: the bundle key ``level``); None if not an OME-Zarr level."""
    if _suffix(path) not in ZARR_SUFFIXES:
        return None
    node = zarr.open(str(path), mode="r")
    if not isinstance(node, zarr.Group):
        return None
    scales = _multiscales(node.attrs.asdict())
    paths = [d["path"] for d in scales[0]["datasets"]] if scales else []
    if key in paths:
        return key
    if key.isdigit() and int(key) < len(paths):
        return paths[int(key)]
    return None


def open_dataset(path: str | os.PathLike, key: str | None = None) -> tuple[Any, dict]:
    """Open a dataset lazily: ``(array, info)``, ``array`` an ``h5py.Dataset`` (its file stays open) or a
    ``zarr.Array``; ``info`` holds ``dataset`` (the name), ``axes`` (OME-Zarr axis names, else None)
    and ``spacing`` (one value per array axis).

    Raises:
        FileNotFoundError, ValueError: as :func:`choose_dataset`.
    """
    key = choose_dataset(path, key)
    if _suffix(path) in N5_SUFFIXES:
        try:
            array, attrs = _n5_open(Path(path), key)
        except Exception as err:
            raise ValueError(f"could not open {path} dataset {key!r} as N5: {type(err).__name__}: {err}") from err
        return array, {"dataset": key, "axes": None, "spacing": _n5_spacing(attrs, array.ndim)}
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
    unit = None
    if axes and scales:  # NGFF: the unit of the x axis
        unit = next((a.get("unit") for a in scales[0]["axes"] if isinstance(a, dict) and a.get("name") == "x"), None)
    return array, {"dataset": key, "axes": axes, "spacing": spacing, "unit": unit}


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


def dataset_plan(array: Any, info: dict, path: str | os.PathLike) -> AxisPlan:
    """The axis plan (:func:`pipeline.io.axes.plan_axes`) of a dataset opened by :func:`open_dataset`."""
    where = f"{path}" + (f" dataset {info['dataset']!r}" if info["dataset"] else "")
    return plan_axes(tuple(int(n) for n in array.shape), info["axes"], info["spacing"], where)


def read_container(path: str | os.PathLike, key: str | None = None) -> tuple[np.ndarray, dict]:
    """Read a container's dataset into ``(array, meta)`` as :func:`pipeline.io.read_image` does for files:
    ``(Z, Y, X)`` or ``(Y, X)``, channels last, ``meta["spacing"]``, ``meta["dataset"]``.

    Raises:
        FileNotFoundError, ValueError: as :func:`open_dataset` and :func:`plan_axes`.
    """
    array, info = open_dataset(path, key)
    try:
        plan = dataset_plan(array, info, path)
        data = plan.read(array)
    finally:
        if isinstance(array, h5py.Dataset):
            array.file.close()
    meta = _base_meta(data.shape, list(plan.spacing), plan.channel_last)
    meta.update({"dataset": info["dataset"], "filename_or_obj": str(path)})
    return data, meta


def write_container(array: np.ndarray, path: Path, meta: dict, channel_last: bool) -> None:
    """Write ``array`` as one dataset of a new container at ``path`` (HDF5 file or zarr v3 store), named
    ``meta["dataset"]`` (default ``"data"``), gzip/zstd-compressed, with ``resolution`` (the spacing, array-axis
    order) as an attribute. Used by :func:`pipeline.io.write_image`, which makes the write atomic."""
    key = str(meta.get("dataset") or "data")
    spatial = array.ndim - channel_last
    spacing = [float(s) for s in np.ravel(meta.get("spacing", [1.0] * spatial))][-spatial:]
    if _suffix(path) in N5_SUFFIXES:
        import tensorstore as ts

        shape = list(reversed(array.shape))  # N5 lists dimensions x first
        spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(path / key)}, "metadata": {
            "dimensions": shape, "blockSize": [min(n, 256) for n in shape], "dataType": np.dtype(array.dtype).name,
            "compression": {"type": "gzip"}}, "create": True, "delete_existing": True}
        ts.open(spec).result().write(np.ascontiguousarray(array).T).result()
        (path / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
        attrs_file = path / key / "attributes.json"
        attrs_file.write_text(json.dumps({**json.loads(attrs_file.read_text()), "resolution": [1.0] * channel_last + spacing[::-1]}))
        return
    if _suffix(path) in HDF5_SUFFIXES:
        with h5py.File(path, "w") as f:
            dataset = f.create_dataset(key, data=array, compression="gzip", chunks=True)
            dataset.attrs["resolution"] = spacing
        return
    group = zarr.open_group(str(path), mode="w")
    dataset = group.create_array(key, shape=array.shape, dtype=array.dtype, chunks=tuple(min(n, 256) for n in array.shape))
    dataset[...] = array
    dataset.attrs["resolution"] = spacing
