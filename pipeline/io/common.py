"""Names and metadata shared by the readers, the writers and the containers: format suffixes, file
stems and MONAI's meta keys."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.utils import MetaKeys

TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_WRITE_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".mrc", ".png")
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
ZARR_SUFFIXES = (".zarr",)  # a folder: zarr v2 or v3, an OME-Zarr image
N5_SUFFIXES = (".n5",)  # a folder: N5 (read and written through tensorstore)
STORE_SUFFIXES = ZARR_SUFFIXES + N5_SUFFIXES  # containers that are folders
CONTAINER_SUFFIXES = HDF5_SUFFIXES + STORE_SUFFIXES  # files (folders) of named datasets
SUPPORTED_SUFFIXES = TIFF_SUFFIXES + NIFTI_SUFFIXES + SITK_WRITE_SUFFIXES + CONTAINER_SUFFIXES
SLICE_SUFFIXES = (".png", ".tif", ".tiff")
# PNG/JPEG too: MONAI's PILReader returns them transposed (x, y); ours keep numpy (y, x) order
SITK_READ_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".mrc", ".png", ".jpg", ".jpeg", ".bmp")
READ_ONLY_SUFFIXES = (".jpg", ".jpeg", ".bmp")  # read; outputs of such inputs are written as TIFF
NO_FLOAT_SUFFIXES = (".png",) + READ_ONLY_SUFFIXES  # cannot hold float32 probabilities
_COMPRESSED = (".mha", ".mhd", ".nrrd", ".nhdr")
_IMAGEJ_DTYPES = (np.uint8, np.uint16, np.int16, np.float32)


def _suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem(path: str | os.PathLike) -> str:
    """The file name without its format suffix (``.nii.gz``, ``.ome.tif`` and ``.ome.zarr`` count as
    one): the name every output of that input gets. ``vol.1.tif`` -> ``vol.1``."""
    name = Path(path).name
    name = name[: len(name) - len(_suffix(path))] if _suffix(path) else name
    return name[:-4] if name.lower().endswith(".ome") else name


def _existing_file(path: str | os.PathLike) -> Path:
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return Path(path)


def _base_meta(shape: Sequence[int], spacing: Sequence[float], channel_last: bool) -> dict:
    """MONAI's expected meta keys, with the array-aligned affine ``diag(spacing)``."""
    affine = np.diag([*map(float, spacing), 1.0])
    return {
        "spacing": np.asarray(spacing, dtype=float),
        MetaKeys.AFFINE: affine,
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(shape[:-1] if channel_last else shape),
        MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if channel_last else float("nan"),  # nan == "no_channel"
    }
