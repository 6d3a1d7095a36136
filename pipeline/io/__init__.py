"""Image I/O: MONAI readers for TIFF stacks and SimpleITK formats (:mod:`.readers`), atomic writers (:mod:`.writers`).

MONAI 1.6.1 cannot read multi-page TIFF without ``itk`` (``PILReader`` silently returns page 1,
transposed), hence the :class:`~monai.data.image_reader.ImageReader` subclasses below.

Axis order -- the one rule here: **arrays keep the file's native numpy order**: TIFF ``(Z, Y, X)``
(one page ``(Y, X)``, RGB channel-last), SimpleITK formats ``sitk.GetArrayFromImage`` order
``(z, y, x)``, NIfTI nibabel's ``(i, j, k)`` (MONAI ``NibabelReader``, unchanged). ``meta["spacing"]``
is in *array-axis order* (``(sz, sy, sx)``) and ``meta["affine"]`` maps array indices to world.
Writers never reorient, so read -> ``EnsureChannelFirst`` -> :func:`write_image` keeps the axis order::

    LoadImage(reader=TiffStackReader())              # or reader="TiffStackReader" (registered below)
    LoadImage(reader="pipeline.io.SimpleITKReader")  # dotted paths always work
    LoadImage().register(TiffStackReader())

Importing this module adds ``tiffstackreader``/``simpleitkreader`` to MONAI's ``SUPPORTED_READERS``;
a plain ``LoadImage()`` then picks them first for the suffixes their ``verify_suffix`` claims
(formats no built-in reader handles without ``itk``/``pynrrd``, and PNG/JPEG, which MONAI's ``PILReader`` transposes; NIfTI stays with MONAI).

Caveat (MONAI behaviour): if a reader passed as ``LoadImage(reader=...)`` raises, LoadImage silently
tries every other registered reader, and for a truncated TIFF SimpleITK or PIL return page 1. To see
the error use :func:`read_image`, a plain ``LoadImage()`` or ``LoadImage()(path, reader=TiffStackReader())``.
"""

__all__ = [
    "CONTAINER_SUFFIXES", "HDF5_SUFFIXES", "ZARR_SUFFIXES", "NIFTI_SUFFIXES", "SITK_READ_SUFFIXES", "SITK_WRITE_SUFFIXES", "SLICE_SUFFIXES", "SUPPORTED_SUFFIXES", "TIFF_SUFFIXES",
    "ImageInfo", "LoadedImage", "check_outputs", "channel_first", "SimpleITKReader", "TiffSeriesError", "TiffStackReader", "check_channels", "choose_tiff_series",
    "probe_image", "read_cached", "read_image", "register_readers", "stem", "replace_atomically", "write_folder", "write_image",
]

from pipeline.io.common import (
    CONTAINER_SUFFIXES,
    HDF5_SUFFIXES,
    NIFTI_SUFFIXES,
    SITK_READ_SUFFIXES,
    SITK_WRITE_SUFFIXES,
    SLICE_SUFFIXES,
    SUPPORTED_SUFFIXES,
    TIFF_SUFFIXES,
    ZARR_SUFFIXES,
    stem,
)
from pipeline.io.readers import (
    ImageInfo,
    LoadedImage,
    SimpleITKReader,
    TiffStackReader,
    channel_first,
    check_channels,
    probe_image,
    read_cached,
    read_image,
    register_readers,
)
from pipeline.io.tiff import TiffSeriesError, choose_tiff_series
from pipeline.io.outputs import check_outputs
from pipeline.io.writers import replace_atomically, write_folder, write_image
