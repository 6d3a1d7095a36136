"""Containers of named datasets: HDF5 (``h5py``), zarr v2/v3 stores (OME-Zarr images included) and N5
stores (``tensorstore``; zarr 3 no longer reads N5).

EM volumes mostly arrive this way: CREMI and ilastik exports and pytorch-3dunet's inputs are HDF5
files holding ``raw`` / ``labels`` datasets; large volumes are zarr stores (napari, neuroglancer).

A dataset is named by its path inside the container (``raw``, ``volumes/raw``). With no name, the
only dataset is used; an OME-Zarr image (a group with ``multiscales``) counts as one dataset, its
full-resolution level. Several datasets and no name is an error listing them.

Axes and spacing. OME-Zarr (NGFF 0.4 / 0.5) names its axes (``t``, ``c``, ``z``, ``y``, ``x``) and
gives the physical scale of each; other datasets may name theirs too (ilastik ``axistags``, zarr
``dimension_names``, N5 ``axes`` and Fiji's ImageJ attributes: :func:`pipeline.io.axes.metadata_axes`). Named
axes are read by the one axis rule (:mod:`pipeline.io.axes`): singleton ``t`` and ``c`` dropped, a ``c`` of
several channels last. Unnamed datasets are ``(Z, Y, X)`` or ``(Y, X)`` (leading singleton axes dropped), with
spacing from the attributes ``resolution`` (CREMI, in nm) or ``element_size_um`` (ilastik, Fiji), in array-axis
order, else 1.

Missing data, one rule for every path (:func:`check_chunks`): zarr (v2, v3, sharded), N5 and HDF5 read a chunk
that is not stored as the fill value, so a chunk lost in a copy would be read -- and predicted -- as a blank
region. A dataset with chunks (shards) missing is refused, naming them, unless ``allow_missing_chunks=True``;
whole-file reading (:func:`read_container`), the pre-flight check (:func:`check_stored`) and block-by-block
reading (:class:`pipeline.io.lazy.LazySource`) all use it. A dataset whose fill value is NaN is exempt: its holes
read as NaN, which the non-finite rule refuses (or, with ``fill_nan``, treats as no-data), as the tissue rule's
skipped blocks are meant to be read.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr

from pipeline.io.axes import AxisPlan, metadata_axes, plan_axes
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
    return N5Array(array.T, folder, attrs), attrs


class N5Array:
    """A tensorstore array with numpy's ``shape``/``dtype``/``ndim`` and reading ``__getitem__``; ``folder`` and
    ``attrs`` (its ``attributes.json``) locate its blocks (:func:`missing_chunks`)."""

    def __init__(self, store: Any, folder: Path | None = None, attrs: dict | None = None) -> None:
        self.store, self.folder, self.attrs = store, folder, attrs or {}
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
    """Open a dataset lazily: ``(array, info)``, ``array`` an ``h5py.Dataset`` (its file stays open), a
    ``zarr.Array`` or an :class:`N5Array`; ``info`` holds ``dataset`` (the name), ``axes`` (the axis names of
    its metadata: OME-Zarr, ilastik, zarr, N5 / Fiji; else None), ``spacing`` (one value per array axis) and
    ``colour`` (an OME-Zarr image whose channels are marked red, green, blue: :func:`_omero_colour`).

    Raises:
        FileNotFoundError, ValueError: as :func:`choose_dataset`.
    """
    key = choose_dataset(path, key)
    if _suffix(path) in N5_SUFFIXES:
        try:
            array, attrs = _n5_open(Path(path), key)
        except Exception as err:
            raise ValueError(f"could not open {path} dataset {key!r} as N5: {type(err).__name__}: {err}") from err
        axes = metadata_axes(attrs, array.ndim, n5=True)
        return array, {"dataset": key, "axes": axes, "spacing": _n5_spacing(attrs, array.ndim), "colour": None}
    scales, colour = None, None
    if _suffix(path) in HDF5_SUFFIXES:
        array = h5py.File(path, "r")[key]
        attrs = dict(array.attrs)
        axes, spacing = metadata_axes(attrs, array.ndim), _attribute_spacing(attrs, tuple(array.shape))
    else:
        root = zarr.open(str(path), mode="r")
        array = root if isinstance(root, zarr.Array) else root[key]
        attrs = array.attrs.asdict()
        names = getattr(array.metadata, "dimension_names", None)
        axes, spacing = metadata_axes(attrs, array.ndim, dimension_names=names), _attribute_spacing(attrs, tuple(array.shape))
        group = None if isinstance(root, zarr.Array) else root.attrs.asdict()
        scales = None if group is None else _multiscales(group)
        if scales:
            axes = [a["name"] if isinstance(a, dict) else a for a in scales[0].get("axes", [])] or None
            level = next(d for d in scales[0]["datasets"] if d["path"] == key)
            scale = next((t["scale"] for t in level.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
            spacing = [float(s) for s in scale] if scale and len(scale) == array.ndim else spacing
            colour = _omero_colour(group)
    unit = None
    if axes and scales:  # NGFF: the unit of the x axis
        unit = next((a.get("unit") for a in scales[0]["axes"] if isinstance(a, dict) and a.get("name") == "x"), None)
    return array, {"dataset": key, "axes": axes, "spacing": spacing, "unit": unit, "colour": colour}


#: OME-Zarr ``omero`` channel colours and labels that mark a channel axis as colour (R, G, B in order, alpha optional)
RGB_COLOURS, RGB_LABELS = ("FF0000", "00FF00", "0000FF"), (("r", "g", "b"), ("red", "green", "blue"))


def _omero_colour(group: dict) -> bool | None:
    """True when an OME-Zarr image's ``omero`` channels are 3 or 4 and the first three are red, green and blue (their
    ``color`` FF0000, 00FF00, 0000FF, or their ``label`` R, G, B / Red, Green, Blue): the channels of an RGB image
    (bioformats2raw writes a colour slide so). None otherwise: channels (:mod:`pipeline.io.axes`)."""
    omero = group.get("omero") or group.get("ome", {}).get("omero") or {}
    channels = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(channels, list) or len(channels) not in (3, 4) or not all(isinstance(c, dict) for c in channels):
        return None
    colours = tuple(str(c.get("color", "")).upper().lstrip("#")[:6] for c in channels[:3])
    labels = tuple(str(c.get("label", "")).strip().lower() for c in channels[:3])
    return True if colours == RGB_COLOURS or labels in RGB_LABELS else None


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
    return plan_axes(tuple(int(n) for n in array.shape), info["axes"], info["spacing"], _where(path, info["dataset"]), info.get("colour"))


def _where(path: str | os.PathLike, dataset: str | None) -> str:
    return f"{path}" + (f" dataset {dataset!r}" if dataset else "")


def fill_value(array: Any) -> Any:
    """What a chunk that is not stored reads as: the fill value of a zarr array or HDF5 dataset (N5: 0)."""
    if isinstance(array, h5py.Dataset):
        return array.fillvalue
    if isinstance(array, N5Array):
        return 0
    return getattr(getattr(array, "metadata", None), "fill_value", getattr(array, "fill_value", None))


def missing_chunks(array: Any, limit: int = 5) -> tuple[int, int, str, list[str]]:
    """``(missing, total, unit, names)``: the storage units (``"chunks"``, or ``"shards"`` of a sharded zarr v3
    array) of a zarr array (v2 or v3, any key separator), N5 dataset (local) or HDF5 dataset that are not stored,
    of ``total``; ``names`` (at most ``limit``): their keys and grid indices where the store is a local folder
    (zarr, N5) or their offsets (HDF5). Other arrays: ``(0, 0, "chunks", [])``."""
    if isinstance(array, h5py.Dataset):
        return _hdf5_missing(array, limit)
    if isinstance(array, N5Array):
        return _n5_missing(array, limit)
    if not hasattr(array, "nchunks_initialized"):
        return 0, 0, "chunks", []
    unit_shape = tuple(array.shards or array.chunks)
    per_unit = math.prod(s // c for s, c in zip(unit_shape, array.chunks))
    grid = [math.ceil(n / c) for n, c in zip(array.shape, unit_shape)]
    total, stored = math.prod(grid), int(array.nchunks_initialized) // per_unit
    unit = "shards" if array.shards else "chunks"
    if stored >= total:
        return 0, total, unit, []
    names, root = [], getattr(array.store, "root", None)
    if root is not None:
        for coords in itertools.product(*map(range, grid)):
            key = array.metadata.encode_chunk_key(coords)
            if not (Path(root) / array.path / key).exists():
                names.append(f"{key} (array index {coords})")
                if len(names) == limit:
                    break
    return total - stored, total, unit, names


def _n5_missing(array: N5Array, limit: int) -> tuple[int, int, str, list[str]]:
    """N5 blocks are files ``<dataset>/<x>/<y>/<z>`` (grid index, x first) of a local store."""
    dims, block = array.attrs.get("dimensions"), array.attrs.get("blockSize")
    if array.folder is None or not dims or not block:
        return 0, 0, "chunks", []
    grid = [math.ceil(n / b) for n, b in zip(dims, block)]  # x first
    total, missing, names = math.prod(grid), 0, []
    for coords in itertools.product(*map(range, grid)):
        if not array.folder.joinpath(*map(str, coords)).is_file():
            missing += 1
            if len(names) < limit:
                names.append(f"{'/'.join(map(str, coords))} (array index {tuple(coords[::-1])})")
    return missing, total, "chunks", names


def _hdf5_missing(dataset: h5py.Dataset, limit: int) -> tuple[int, int, str, list[str]]:
    """HDF5 allocates a chunk when it is first written; one never written reads as the fill value (a contiguous
    dataset never written: its one block)."""
    if dataset.size == 0:
        return 0, 0, "chunks", []
    if dataset.chunks is None:
        stored = dataset.id.get_offset() is not None or dataset.id.get_storage_size() > 0
        return (0 if stored else 1), 1, "chunks", [] if stored else ["the whole dataset (never written)"]
    grid = [math.ceil(n / c) for n, c in zip(dataset.shape, dataset.chunks)]
    total, stored = math.prod(grid), int(dataset.id.get_num_chunks())
    if stored >= total:
        return 0, total, "chunks", []
    offsets: set = set()
    if hasattr(dataset.id, "chunk_iter"):  # HDF5 >= 1.12.3: one pass over the chunk index
        dataset.id.chunk_iter(lambda info: offsets.add(tuple(int(o) for o in info.chunk_offset)))
    else:
        offsets = {tuple(int(o) for o in dataset.id.get_chunk_info(i).chunk_offset) for i in range(stored)}
    names = []
    for coords in itertools.product(*map(range, grid)):
        offset = tuple(i * c for i, c in zip(coords, dataset.chunks))
        if offset not in offsets:
            names.append(f"the chunk at {offset} (array index {coords})")
            if len(names) == limit:
                break
    return total - stored, total, "chunks", names


def every_chunk(array: Any) -> Any:
    """The zarr array set to store every chunk it is written, blank ones too (zarr skips chunks equal to the fill
    value by default), so that what this pipeline writes reads back as complete by :func:`check_chunks`."""
    return array.with_config({"write_empty_chunks": True})


def check_chunks(array: Any, where: str, allow_missing_chunks: bool = False) -> None:
    """The missing-data rule (module docstring): refuse ``array`` (opened by :func:`open_dataset`, or a zarr array)
    when chunks are not stored, unless ``allow_missing_chunks`` or its fill value is NaN.

    Raises:
        ValueError: naming ``where``, how many chunks (shards) are missing and which, the fill value they would be
            read as, and ``allow_missing_chunks=True``.
    """
    fill = fill_value(array)
    if allow_missing_chunks or (isinstance(fill, (float, np.floating)) and np.isnan(fill)):
        return
    missing, total, unit, names = missing_chunks(array)
    if not missing:
        return
    kind, reader = (("HDF5 dataset", "HDF5") if isinstance(array, h5py.Dataset) else ("N5 dataset", "N5")
                    if isinstance(array, N5Array) else ("zarr array", "zarr"))
    why = ("it was never written (an interrupted or partial export)" if reader == "HDF5" else
           f"it was deleted or lost in a copy, but some writers (zarr by default, tensorstore) also skip {unit} that "
           "equal the fill value (blank regions)")
    raise ValueError(
        f"{where}: {missing} of {total} {unit} are missing from the {kind}" + (f", e.g. {', '.join(names)}" if names else "")
        + f"; {reader} reads a {unit[:-1]} that is not stored as the fill value ({fill}), so those regions would be read "
        f"as blank. A {unit[:-1]} is missing when {why}. If the dataset is complete, pass allow_missing_chunks=True to "
        "read them as the fill value; else " + ("export the dataset again" if reader == "HDF5" else "copy the dataset again")
    )


def check_stored(path: str | os.PathLike, key: str | None = None, allow_missing_chunks: bool = False) -> None:
    """:func:`check_chunks` of a container's dataset ``key`` (nothing for other files): the pre-flight check of a
    file that is read whole later.

    Raises:
        FileNotFoundError, ValueError: as :func:`open_dataset` and :func:`check_chunks`.
    """
    if not is_container(path) or allow_missing_chunks:
        return
    array, info = open_dataset(path, key)
    try:
        check_chunks(array, _where(path, info["dataset"]))
    finally:
        if isinstance(array, h5py.Dataset):
            array.file.close()


def read_container(path: str | os.PathLike, key: str | None = None, allow_missing_chunks: bool = False) -> tuple[np.ndarray, dict]:
    """Read a container's dataset into ``(array, meta)`` as :func:`pipeline.io.read_image` does for files:
    ``(Z, Y, X)`` or ``(Y, X)``, channels last, ``meta["spacing"]``, ``meta["dataset"]``, ``meta["colour"]``
    (channels that are colour, :mod:`pipeline.io.axes`); its chunks checked first (:func:`check_chunks`).

    Raises:
        FileNotFoundError, ValueError: as :func:`open_dataset`, :func:`check_chunks` and :func:`plan_axes`.
    """
    array, info = open_dataset(path, key)
    try:
        plan = dataset_plan(array, info, path)
        check_chunks(array, _where(path, info["dataset"]), allow_missing_chunks)
        data = plan.read(array)
    finally:
        if isinstance(array, h5py.Dataset):
            array.file.close()
    meta = _base_meta(data.shape, list(plan.spacing), plan.channel_last)
    meta.update({"dataset": info["dataset"], "filename_or_obj": str(path), "colour": plan.colour})
    return data, meta


def write_container(array: np.ndarray, path: Path, meta: dict, channel_last: bool) -> None:
    """Write ``array`` as one dataset of a new container at ``path`` (HDF5 file or zarr v3 store), named
    ``meta["dataset"]`` (default ``"data"``), gzip/zstd-compressed, with ``resolution`` (the spacing, array-axis
    order) as an attribute, every chunk stored (blank ones too: :func:`check_chunks`). Used by
    :func:`pipeline.io.write_image`, which makes the write atomic."""
    key = str(meta.get("dataset") or "data")
    spatial = array.ndim - channel_last
    spacing = [float(s) for s in np.ravel(meta.get("spacing", [1.0] * spatial))][-spatial:]
    if _suffix(path) in N5_SUFFIXES:
        import tensorstore as ts

        shape = list(reversed(array.shape))  # N5 lists dimensions x first
        spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(path / key)}, "metadata": {
            "dimensions": shape, "blockSize": [min(n, 256) for n in shape], "dataType": np.dtype(array.dtype).name,
            "compression": {"type": "gzip"}}, "create": True, "delete_existing": True,
            "store_data_equal_to_fill_value": True}  # every block stored: complete by the missing-data rule
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
    every_chunk(dataset)[...] = array
    dataset.attrs["resolution"] = spacing
