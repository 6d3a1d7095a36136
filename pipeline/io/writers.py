"""Writing image files atomically in the input's format: :func:`write_image`, :func:`write_folder`.

See :mod:`pipeline.io` for the axis-order rule shared with the readers.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
from monai.utils import MetaKeys

from pipeline.io.common import _COMPRESSED, _IMAGEJ_DTYPES, CONTAINER_SUFFIXES, NIFTI_SUFFIXES, SLICE_SUFFIXES, SUPPORTED_SUFFIXES, TIFF_SUFFIXES, _suffix
from pipeline.io.containers import write_container

logger = logging.getLogger(__name__)


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary name beside ``path``, then rename it onto ``path``.

    Readers never see a half-written file, and a failed ``write`` leaves an existing ``path``
    untouched and no temporary file behind. The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _prepare(array: Any, meta: dict | None) -> tuple[np.ndarray, dict, bool]:
    """Return ``(numpy array without a singleton channel, meta, channel_last)``."""
    meta = dict(getattr(array, "meta", None) or {}) if meta is None else meta
    array = np.asarray(array.detach().cpu().numpy() if hasattr(array, "detach") else array)
    array = array.astype(np.uint8) if array.dtype == bool else array
    shape = meta.get(MetaKeys.SPATIAL_SHAPE)
    spatial = tuple(int(s) for s in np.asarray(shape).ravel()) if shape is not None else None
    if array.ndim != (len(spatial) if spatial else min(array.ndim, 3)) + 1:
        return array, meta, False
    if array.shape[:-1] == spatial:  # channel-last, as our readers return RGB
        return (array[..., 0], meta, False) if array.shape[-1] == 1 else (array, meta, True)
    if array.shape[0] == 1:  # singleton channel-first (EnsureChannelFirst); spatial_shape may be stale
        return array[0], meta, False
    if array.shape[1:] == spatial:
        return np.moveaxis(array, 0, -1), meta, True
    raise ValueError(f"cannot tell the channel axis of an array of shape {array.shape} (spatial_shape={shape})")


def _spacing(meta: dict, n: int) -> list[float]:
    """Spacing of the last ``n`` array axes from ``meta['spacing']`` or the affine; default 1.0."""
    found: list[float] = []
    if meta.get("spacing") is not None:
        found = [float(s) for s in np.asarray(meta["spacing"], dtype=float).ravel()]
    elif meta.get(MetaKeys.AFFINE) is not None:
        found = list(np.sqrt((np.asarray(meta[MetaKeys.AFFINE], dtype=float)[:-1, :-1] ** 2).sum(0)))
    return ([1.0] * n + found)[-n:]


def _write_tiff(array: np.ndarray, path: Path, meta: dict, channel_last: bool) -> None:
    n = array.ndim - channel_last
    spacing, rgb = _spacing(meta, n), channel_last and array.shape[-1] in (3, 4)
    kwargs: dict[str, Any] = {"photometric": "rgb" if rgb else "minisblack"}
    kwargs["planarconfig"] = "contig" if channel_last else None
    imagej_rgb = rgb and array.shape[-1] == 3 and array.dtype == np.uint8
    time = n == 3 and str(meta.get("tiff_axes", "")).startswith("T")  # a time-lapse read frame by frame: written as frames
    spatial = ("T" if time else "Z") + "YX" if n == 3 else "YX"
    if path.name.lower().endswith((".ome.tif", ".ome.tiff")):  # OME-TIFF: physical sizes in the OME-XML
        axes = spatial + ("S" if channel_last else "")
        sizes = {f"PhysicalSize{a}": float(v) for a, v in zip(spatial, spacing) if a != "T"}
        tifffile.imwrite(path, array, ome=True, metadata={"axes": axes, **sizes}, **kwargs)
    elif array.dtype.type in _IMAGEJ_DTYPES and n in (2, 3) and (not channel_last or imagej_rgb):
        ij_meta: dict[str, Any] = {"axes": spatial + ("S" if channel_last else "")}
        ij_meta.update({"spacing": spacing[0]} if n == 3 and not time else {})
        ij_meta.update({"unit": meta["unit"]} if meta.get("unit") else {})
        resolution = (1 / spacing[-1], 1 / spacing[-2])  # TIFF tags: pixels per unit, X first
        tifffile.imwrite(path, array, imagej=True, resolution=resolution, metadata=ij_meta, **kwargs)
    else:  # dtypes ImageJ cannot store: tifffile's JSON description keeps shape and spacing
        tifffile.imwrite(path, array, metadata={"spacing": spacing}, **kwargs)


def _write_nifti(array: np.ndarray, path: Path, meta: dict, channel_last: bool) -> None:
    affine, given = np.eye(4), meta.get(MetaKeys.AFFINE)
    if given is not None:
        given = np.asarray(given, dtype=float)
        r = min(given.shape[0] - 1, 3)
        affine[:r, :r], affine[:r, 3] = given[:r, :r], given[:r, -1]
    else:
        np.fill_diagonal(affine[:3, :3], _spacing(meta, 3) if array.ndim >= 3 else [*_spacing(meta, 2), 1.0])
    nib.save(nib.Nifti1Image(array, affine, dtype=array.dtype), str(path))


def _write_sitk(array: np.ndarray, path: Path, meta: dict, channel_last: bool) -> None:
    if _suffix(path) == ".png" and array.ndim - channel_last != 2:  # SimpleITK would keep slice 0 only
        raise ValueError(f"PNG holds one 2D image, got shape {array.shape}; write to a directory for one per slice")
    image = sitk.GetImageFromArray(array, isVector=channel_last)
    dim = image.GetDimension()
    image.SetSpacing([float(s) for s in _spacing(meta, dim)[::-1]])
    for key, size, setter in (("origin", dim, image.SetOrigin), ("direction", dim * dim, image.SetDirection)):
        value = meta.get(key)
        value = None if value is None else np.asarray(value.detach().cpu() if hasattr(value, "detach") else value, dtype=float)
        if value is not None and value.size == size:  # numpy, or torch tensors after a DataLoader's collation
            setter([float(v) for v in value.ravel()])
    try:
        sitk.WriteImage(image, str(path), _suffix(path) in _COMPRESSED)
    except RuntimeError as err:
        what = f"a {array.dtype} {array.shape} array as {path.name}"
        raise ValueError(f"SimpleITK could not write {what}: {err}") from err


def _writer_for(path: str | os.PathLike) -> Callable[[np.ndarray, Path, dict, bool], None]:
    suffix = _suffix(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"cannot write {path}: unsupported suffix {suffix or '(none)'!r}; supported suffixes are "
            f"{', '.join(SUPPORTED_SUFFIXES)} (or a directory path ending in '/' for one file per slice)"
        )
    if suffix in CONTAINER_SUFFIXES:
        return write_container
    return _write_tiff if suffix in TIFF_SUFFIXES else _write_nifti if suffix in NIFTI_SUFFIXES else _write_sitk


def _commit(moves: dict[Path, Path], overwrite: bool) -> None:
    """Move finished temp files onto their targets with ``os.replace`` (same filesystem: atomic)."""
    clash = [str(dst) for dst in moves.values() if dst.exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{', '.join(clash[:5])} already exist(s); pass overwrite=True to replace")
    for src, dst in moves.items():
        if dst.is_dir() and src.is_dir():  # a zarr store replaced (overwrite): os.replace needs the name free
            shutil.rmtree(dst)
        os.replace(src, dst)


def write_image(array: Any, path: str | os.PathLike, meta: dict | None = None, overwrite: bool = False) -> Path:
    """Atomically write an array in the format given by the suffix of ``path``.

    ``array`` (numpy, torch or MetaTensor, whose ``.meta`` is used if ``meta`` is None) is written in
    its own axis order. With ``ndim`` = spatial rank + 1 (rank from ``meta['spatial_shape']``, else 3) a
    singleton channel is squeezed and other channels become samples/vector pixels. Spacing comes from
    ``meta['spacing']`` (array-axis order) or the affine. TIFF: ImageJ stack (Z spacing + resolution
    tags) for uint8/uint16/int16/float32, tifffile JSON description otherwise. NIfTI: ``meta['affine']``
    (else ``diag(spacing)``). SimpleITK formats: spacing, ``meta['origin']``/``meta['direction']`` if
    given. Booleans become uint8. The file is written under its real name in a hidden temp directory
    next to the target (so the suffix picks the format and ``.mhd``/``.nhdr`` data files come along),
    then moved with ``os.replace``; on failure the destination is untouched. A path ending in ``/`` or
    an existing directory goes to :func:`write_folder` with ``meta['filenames']``.

    Returns:
        The written path (the directory for folder output).

    Raises:
        FileExistsError: the target exists and ``overwrite`` is False.
        ValueError: unsupported suffix, or the array cannot be stored in that format.
    """
    if _suffix(path) not in CONTAINER_SUFFIXES and (os.fspath(path).endswith(("/", os.sep)) or Path(path).is_dir()):
        arr, meta, _ = _prepare(array, meta)
        names = list(meta.get("filenames") or [f"slice_{i:04d}.tif" for i in range(arr.shape[0])])
        write_folder(arr, path, names, overwrite=overwrite, meta=meta)
        return Path(path)
    path, writer = Path(path), _writer_for(path)
    arr, meta, channel_last = _prepare(array, meta)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        writer(arr, tmp_dir / path.name, meta, channel_last)
        produced = sorted(tmp_dir.iterdir(), key=lambda f: f.name == path.name)  # header/main file last
        _commit({f: path.parent / f.name for f in produced}, overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %s %s %s", path, arr.shape, arr.dtype)
    return path


def write_folder(
    array: Any, directory: str | os.PathLike, names: Sequence[str], overwrite: bool = False, meta: dict | None = None
) -> list[Path]:
    """Write a ``(Z, Y, X[, C])`` stack as one 2D ``.png``/``.tif`` file per slice, named ``names[i]``.

    Slices go to a temp directory inside ``directory`` and are moved into place only after all were
    written, so a failure leaves ``directory`` as it was. ``meta`` gives spacing (last two axes) and
    the channel layout as in :func:`write_image`.

    Raises:
        FileExistsError: any target exists and ``overwrite`` is False (nothing is written).
        ValueError: not a stack, wrong number of names, or names not plain .png/.tif/.tiff file names.
    """
    arr, meta, channel_last = _prepare(array, meta)
    directory = Path(directory)
    if len(names) != arr.shape[0] or arr.ndim - channel_last != 3:
        raise ValueError(f"need a 3D stack with one name per slice; got shape {arr.shape} and {len(names)} names")
    bad = [n for n in names if Path(n).name != n or _suffix(n) not in SLICE_SUFFIXES]
    if bad:
        raise ValueError(f"slice names must be plain file names ending in {', '.join(SLICE_SUFFIXES)}; got {bad[:5]}")
    clash = [n for n in names if (directory / n).exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{directory}: {clash[:5]} already exist; pass overwrite=True to replace")
    directory.mkdir(parents=True, exist_ok=True)
    slice_meta = {"spacing": _spacing(meta, 3)[-2:], **({"unit": meta["unit"]} if meta.get("unit") else {})}
    tmp_dir = Path(tempfile.mkdtemp(prefix=".slices.tmp-", dir=directory))
    try:
        for name, plane in zip(names, arr):
            _writer_for(name)(plane, tmp_dir / name, slice_meta, channel_last)
        _commit({tmp_dir / n: directory / n for n in names}, overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("wrote %d slices to %s", len(names), directory)
    return [directory / n for n in names]
