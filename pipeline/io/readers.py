"""Reading image files: MONAI readers (TIFF stacks, SimpleITK formats), header probes, :func:`read_image`.

See :mod:`pipeline.io` for the axis-order rule shared with the writers.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import h5py
import nibabel as nib
import numpy as np
import SimpleITK as sitk
import tifffile
from monai.data.image_reader import ImageReader, NibabelReader, _copy_compatible_dict, _stack_images
from monai.data.utils import is_no_channel, is_supported_format, orientation_ras_lps
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from pipeline.io.common import (
    NIFTI_SUFFIXES,
    SITK_READ_SUFFIXES,
    SLICE_SUFFIXES,
    TIFF_SUFFIXES,
    _base_meta,
    _existing_file,
    _suffix,
)
from pipeline.io.containers import is_container, open_dataset, plan_axes, planned_shape, read_container

logger = logging.getLogger(__name__)

_TIFF_CORRUPT = re.compile(r"corrupt|invalid page offset|circular reference", re.IGNORECASE)


@dataclass
class LoadedImage:
    """An eagerly loaded image, as returned by the readers' ``read``."""

    array: np.ndarray
    meta: dict


class _EagerReader(ImageReader):
    """``verify_suffix``/``read``/``get_data`` shared by readers that load eagerly via ``_load``."""

    suffixes: tuple[str, ...] = ()

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """Return True if every file name has one of ``self.suffixes``."""
        return is_supported_format(filename, [s.lstrip(".") for s in self.suffixes])

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs) -> LoadedImage | list[LoadedImage]:
        """Read one file, or several (stacked as channels by ``get_data``, as MONAI's readers do).

        Raises:
            FileNotFoundError: a file does not exist. ValueError: a file is corrupt or unreadable.
        """
        images = [self._load(_existing_file(name)) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: LoadedImage | Sequence[LoadedImage]) -> tuple[np.ndarray, dict]:
        """Return ``(array, meta)``; several images are stacked at a new axis 0 as channels."""
        arrays, meta = [], {}
        for image in ensure_tuple(img):
            arrays.append(image.array)
            _copy_compatible_dict(image.meta, meta)
        return _stack_images(arrays, meta), meta

    def _load(self, path: Path) -> LoadedImage:
        raise NotImplementedError


class _TiffLogCatcher(logging.Handler):
    """Collects tifffile log records that mean a corrupt/truncated file (tifffile only logs those)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if _TIFF_CORRUPT.search(record.getMessage()):
            self.messages.append(record.getMessage())


class TiffSeriesError(ValueError):
    """A TIFF whose series cannot be read as one image without a choice (see :func:`choose_tiff_series`)."""


def choose_tiff_series(tif: tifffile.TiffFile, path: str | os.PathLike, series: int | None, stack: bool = True) -> int | None:
    """Which series of an open TIFF to read: its index, or None to stack same-shape series along Z.

    Args:
        tif: the open file.
        path: its path, for messages.
        series: the series asked for (bundle key ``tiff_series``), or None.
        stack: whether same-shape series may be stacked (the eager reader); a lazy reader cannot.

    Raises:
        TiffSeriesError: ``series`` is out of range, or the file holds several series and none was
            chosen (unless ``stack`` and all have one shape and dtype); the message lists them.
    """
    found = tif.series
    listing = "; ".join(f"series {i}: shape {tuple(s.shape)} {s.dtype} axes {s.axes}" for i, s in enumerate(found))
    if series is not None:
        if isinstance(series, bool) or not isinstance(series, int) or not 0 <= series < len(found):
            raise TiffSeriesError(f"{path}: --tiff_series {series!r} is not a series of this file; it holds {len(found)} ({listing})")
        return series
    if len(found) == 1:
        return 0
    if stack and all(s.shape == found[0].shape and s.dtype == found[0].dtype for s in found):
        return None
    raise TiffSeriesError(
        f"{path} holds {len(found)} TIFF series ({listing}); one run reads one image per file, so the others would "
        "silently not be predicted. Choose one with --tiff_series N (0-based), or save each series as a file of its own"
    )


class TiffStackReader(_EagerReader):
    """Read single- and multi-page TIFF with tifffile: ``(Z, Y, X)`` stack or ``(Y, X)`` page.

    Sample/channel axes (RGB, ImageJ ``C``) go last with ``original_channel_dim=-1``. A file of
    several same-shape series (e.g. pages written with ``append=True``) is stacked along Z. Spacing
    comes from tifffile's JSON description (``{"spacing": [...]}``, written by :func:`write_image`) or
    OME-TIFF metadata (``PhysicalSizeX/Y/Z``), ImageJ metadata (``spacing`` for Z, resolution tags for Y/X),
    else 1.0; plain DPI tags are ignored.
    Truncated files raise ValueError (data past end of file, or tifffile's corruption log messages).

    A file holding several series of *different* shapes (an image and its thumbnail, two
    acquisitions) is refused with a list of its series unless ``series`` chooses one: reading
    only the first would silently leave the others unpredicted.

    Args:
        series: the 0-based series to read (the bundle key ``tiff_series``); None reads the only
            series, or stacks same-shape series.
    """

    suffixes = TIFF_SUFFIXES

    def __init__(self, series: int | None = None) -> None:
        super().__init__()
        self.series = series

    def _load(self, path: Path) -> LoadedImage:
        catcher, tiff_log = _TiffLogCatcher(), logging.getLogger("tifffile")
        tiff_log.addHandler(catcher)
        try:
            with tifffile.TiffFile(path) as tif:
                chosen = choose_tiff_series(tif, path, self.series)
                series = tif.series
                if chosen is None:
                    array, axes = np.stack([s.asarray() for s in series]), "Q" + series[0].axes
                else:
                    array, axes = series[chosen].asarray(), series[chosen].axes
                size = path.stat().st_size
                if any(o + n > size for p in tif.pages for o, n in zip(p.dataoffsets, p.databytecounts)):
                    raise ValueError("pixel data extends past the end of the file (truncated)")
                known = self._spacing_by_axis(tif)
                unit = (tif.imagej_metadata or {}).get("unit")
        except TiffSeriesError:
            raise
        except Exception as err:  # TiffFileError, struct.error, OSError, ... from a damaged file
            raise ValueError(
                f"could not read {path} as TIFF: {type(err).__name__}: {err} (the file is truncated or "
                "corrupt; copy it again)"
            ) from err
        finally:
            tiff_log.removeHandler(catcher)
        if catcher.messages:
            raise ValueError(f"could not read {path} as TIFF: truncated or corrupt ({catcher.messages[0]})")
        channel = [i for i, a in enumerate(axes) if a in "SC"]
        if len(channel) > 1 or array.ndim - len(channel) > 3:
            raise ValueError(f"could not read {path} as TIFF: unsupported axes {axes!r} (max 3 spatial + 1 channel)")
        if channel:
            array, axes = np.moveaxis(array, channel[0], -1), axes.replace(axes[channel[0]], "") + axes[channel[0]]
        spatial = axes[:-1] if channel else axes
        if isinstance(known, list):
            spacing = known if len(known) == len(spatial) else [1.0] * len(spatial)
        else:
            spacing = [known.get(a, 1.0) for a in spatial]
        meta = {**_base_meta(array.shape, spacing, bool(channel)), "tiff_axes": axes}
        meta.update({"unit": unit} if unit else {})
        logger.debug("read TIFF %s: shape %s axes %s spacing %s", path, array.shape, axes, spacing)
        return LoadedImage(array, meta)

    @staticmethod
    def _spacing_by_axis(tif: tifffile.TiffFile) -> list[float] | dict[str, float]:
        if tif.is_shaped and tif.shaped_metadata and "spacing" in tif.shaped_metadata[0]:
            return [float(s) for s in tif.shaped_metadata[0]["spacing"]]
        if tif.is_ome and tif.ome_metadata:  # OME-TIFF: PhysicalSizeX/Y/Z of the first image's Pixels
            pixels = next((e for e in ElementTree.fromstring(tif.ome_metadata).iter() if e.tag.endswith("Pixels")), None)
            if pixels is not None:
                return {a: float(pixels.get(f"PhysicalSize{a}")) for a in "XYZ" if pixels.get(f"PhysicalSize{a}")}
        if not tif.is_imagej:
            return {}
        spacing, tags = {"Z": float(tif.imagej_metadata.get("spacing", 1.0))}, tif.pages.first.tags
        for axis, tag in (("X", "XResolution"), ("Y", "YResolution")):
            if tag in tags and tags[tag].value[0]:
                spacing[axis] = tags[tag].value[1] / tags[tag].value[0]  # rational pixels/unit -> unit/pixel
        return spacing


class SimpleITKReader(_EagerReader):
    """Read anything SimpleITK reads; arrays in ``sitk.GetArrayFromImage`` order ``(z, y, x)``.

    ``read`` takes any SimpleITK format; ``verify_suffix`` (LoadImage's automatic choice only) claims
    ``suffixes``. Meta: ``spacing`` in array-axis order (reversed ITK order); ``origin`` and
    ``direction`` as ITK reports them (LPS frame, direction columns = ITK index axes x, y, z); an
    ``affine`` from array indices to world. Vector pixels become a trailing channel axis.

    Args:
        suffixes: suffixes claimed by ``verify_suffix``.
        affine_lps_to_ras: express the affine in RAS (like ``NibabelReader``/MONAI's ``ITKReader``).
    """

    def __init__(self, suffixes: Sequence[str] = SITK_READ_SUFFIXES, affine_lps_to_ras=True):
        super().__init__()
        self.suffixes, self.affine_lps_to_ras = tuple(suffixes), affine_lps_to_ras

    def _load(self, path: Path) -> LoadedImage:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise ValueError(f"could not read {path} as {_suffix(path) or 'image'} with SimpleITK: {err}") from err
        array, dim = sitk.GetArrayFromImage(image), image.GetDimension()
        spacing_itk = np.asarray(image.GetSpacing(), dtype=float)
        origin = np.asarray(image.GetOrigin(), dtype=float)
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)
        affine = np.eye(dim + 1)
        affine[:dim, :dim] = (direction * spacing_itk)[:, ::-1]  # columns follow the reversed array axes
        affine[:dim, dim] = origin
        affine = orientation_ras_lps(affine) if self.affine_lps_to_ras else affine
        meta = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys() if not k.startswith("ITK_")}
        meta.update(_base_meta(array.shape, spacing_itk[::-1].copy(), image.GetNumberOfComponentsPerPixel() > 1))
        meta.update({"origin": origin, "direction": direction, MetaKeys.AFFINE: affine})
        meta[MetaKeys.ORIGINAL_AFFINE] = affine.copy()
        meta[MetaKeys.SPACE] = SpaceKeys.RAS if self.affine_lps_to_ras else SpaceKeys.LPS
        return LoadedImage(array, meta)


def register_readers() -> None:
    """Make ``LoadImage(reader="TiffStackReader")``/``"SimpleITKReader"`` work (idempotent; run on import).

    MONAI resolves reader names in ``monai.transforms.io.array.SUPPORTED_READERS``; every default
    ``LoadImage()`` also registers its entries (later entries are tried first).
    """
    from monai.transforms.io.array import SUPPORTED_READERS

    SUPPORTED_READERS.setdefault("tiffstackreader", TiffStackReader)
    SUPPORTED_READERS.setdefault("simpleitkreader", SimpleITKReader)


register_readers()


@dataclass
class ImageInfo:
    """What a file holds, read from its header only (:func:`probe_image`).

    Attributes:
        shape: the array shape as read, channels included (TIFF: the chosen series).
        channels: the size of the channel axis (TIFF samples ``S`` or ``C``, vector pixels); 1 without one.
        dtype: the pixel type.
        axes: the axes as the format names them (TIFF, e.g. ``"SYX"``; else ``""``).
    """

    shape: tuple[int, ...]
    channels: int
    dtype: np.dtype
    axes: str = ""


def probe_image(path: str | os.PathLike, tiff_series: int | None = None, key: str | None = None) -> ImageInfo:
    """Read only the header of an image file: shape, channels, dtype (and TIFF axes).

    Raises:
        TiffSeriesError: as :func:`choose_tiff_series`; also ``tiff_series`` given for a file that
            is not a TIFF.
        ValueError: the header cannot be read.
    """
    path, suffix = Path(path), _suffix(path)
    if tiff_series is not None and suffix not in TIFF_SUFFIXES:
        raise TiffSeriesError(f"--tiff_series {tiff_series} applies to TIFF files, but {path} is not one; set tiff_series null")
    if is_container(path):  # its errors name the dataset and the axes found
        array, info = open_dataset(path, key)
        try:
            index, order, _, channel_last = plan_axes(tuple(int(n) for n in array.shape), info, path)
            shape, dtype = planned_shape(tuple(int(n) for n in array.shape), index, order), np.dtype(array.dtype)
        finally:
            if isinstance(array, h5py.Dataset):
                array.file.close()
        return ImageInfo(shape, shape[-1] if channel_last else 1, dtype)
    try:
        if suffix in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tif:
                chosen = choose_tiff_series(tif, path, tiff_series)
                series = tif.series[0 if chosen is None else chosen]
                shape = ((len(tif.series),) if chosen is None else ()) + tuple(series.shape)
                channels = math.prod(n for a, n in zip(series.axes, series.shape) if a in "SC")
                return ImageInfo(shape, channels, np.dtype(series.dtype), ("Q" if chosen is None else "") + series.axes)
        if suffix in NIFTI_SUFFIXES:
            header = nib.load(str(path)).header
            shape = tuple(int(n) for n in header.get_data_shape())
            return ImageInfo(shape, math.prod(shape[3:]), np.dtype(header.get_data_dtype()))
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        channels = reader.GetNumberOfComponents()
        shape = tuple(reversed(reader.GetSize())) + ((channels,) if channels > 1 else ())
        dtype = sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())).dtype
        return ImageInfo(shape, channels, np.dtype(dtype))
    except TiffSeriesError:
        raise
    except Exception as err:
        raise ValueError(
            f"could not read the header of {path} ({suffix or 'no suffix'}): {type(err).__name__}: {err}; the file is "
            "damaged, or its pixel layout is one the readers do not support (convert it to a plain grey TIFF)"
        ) from err


def is_grey_colour(channels_first: np.ndarray) -> bool:
    """An RGB(A) array ``(3 or 4, ...)`` whose R, G and B are equal: a grey image saved as colour."""
    c = channels_first
    return c.shape[0] in (3, 4) and np.array_equal(c[0], c[1]) and np.array_equal(c[0], c[2])


def check_channels(path: str | os.PathLike, info: ImageInfo, in_channels: int, pixels: Callable[[], np.ndarray] | None = None) -> None:
    """Refuse a file whose channels (:func:`probe_image`) are not the network's ``in_channels``.

    A grey image saved as RGB(A) (R = G = B) passes for a 1-channel network when ``pixels`` is given
    (a function returning the file's array, channels last): :func:`channel_first` reads it as grey.

    Raises:
        ValueError: naming the file, its shape and axes, and what to do.
    """
    if info.channels == in_channels:
        return
    hint = "convert it to the network's channels (e.g. colour to grey; a grey image saved as RGB is read as grey in memory, not when streaming)"
    if in_channels == 1 and info.channels in (3, 4) and pixels is not None:
        if is_grey_colour(np.moveaxis(pixels(), -1, 0)):
            return
        hint = "R, G and B differ: convert it to grey first (e.g. skimage.color.rgb2gray), or train a network on colour"
    if info.axes.lstrip("Q").startswith("S") and in_channels == 1:  # planar samples: maybe a small stack
        hint = ("tifffile stores a (3 or 4, Y, X) array written without photometric='minisblack' as one planar RGB(A) "
                "page; if these are sections, save it again with tifffile.imwrite(path, array, photometric='minisblack'), "
                "else convert it to grey")
    raise ValueError(
        f"{path} has {info.channels} channel(s) (shape {info.shape}{', TIFF axes ' + info.axes if info.axes else ''}), "
        f"but the network takes {in_channels}; {hint}"
    )


def read_image(path: str | os.PathLike, tiff_series: int | None = None, key: str | None = None) -> tuple[np.ndarray, dict]:
    """Read an image file, or a directory of 2D PNG/TIFF slices, into ``(array, meta)``.

    TIFF uses :class:`TiffStackReader`, NIfTI MONAI's ``NibabelReader`` (``meta["spacing"]`` added
    from the affine), anything else :class:`SimpleITKReader`. A directory becomes a ``(Z, Y, X)``
    stack of its ``.png``/``.tif``/``.tiff`` files (hidden ones skipped) in natural order (``s2``
    before ``s10``), with ``meta["filenames"]``. ``tiff_series`` chooses a series of a TIFF file
    (:class:`TiffStackReader`); files of several series refuse to be read without it.

    Raises:
        FileNotFoundError: the path does not exist (or a directory holds no slices).
        ValueError: a file cannot be decoded, or slices are not 2D images of one shape.
        TiffSeriesError: a TIFF of several series and no (or a wrong) ``tiff_series``.

    Containers (HDF5, zarr, OME-Zarr: :mod:`pipeline.io.containers`) are read from their dataset ``key``
    (default: the only one).
    """
    path = Path(path)
    if is_container(path):
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        return read_container(path, key)
    if path.is_dir():
        return _read_folder(path)
    suffix = _suffix(_existing_file(path))
    if suffix in NIFTI_SUFFIXES:
        reader = NibabelReader(mmap=False)
        try:
            array, meta = reader.get_data(reader.read(str(path)))
        except Exception as err:
            raise ValueError(f"could not read {path} as NIfTI: {type(err).__name__}: {err}") from err
        array, rank = np.asarray(array), len(meta[MetaKeys.SPATIAL_SHAPE])
        meta["spacing"] = np.sqrt((np.asarray(meta[MetaKeys.AFFINE])[:rank, :rank] ** 2).sum(0))
    else:
        eager = TiffStackReader(series=tiff_series) if suffix in TIFF_SUFFIXES else SimpleITKReader()
        array, meta = eager.get_data(eager.read(path))
    meta["filename_or_obj"] = str(path)
    return array, meta


def channel_first(array: np.ndarray, meta: dict, path: str | os.PathLike) -> tuple[np.ndarray, bool]:
    """The one axis rule of the pipeline: a file's array, as :func:`read_image` returns it, as
    ``(C, *spatial)`` with the spatial axes in ``(Z,) Y, X`` order.

    Channels: colour samples, which the readers put last (``meta["original_channel_dim"] == -1``),
    move first; a grey image gets a channel of 1, and so does a grey image saved as colour (RGB or
    RGBA with R = G = B: the alpha channel is ignored). Sections: TIFF and SimpleITK arrays are already
    ``(Z, Y, X)``; NIfTI arrays are nibabel's ``(x, y, z)``, so their spatial axes are reversed, and the
    returned flag says so (writers reverse the prediction back, :class:`pipeline.transforms.WritePredictiond`).
    Training, evaluation and in-memory inference all read through this (:class:`pipeline.transforms.LoadSectiond`).

    Returns:
        ``(array, reversed)``: a view where possible.

    Raises:
        ValueError: not 2 or 3 spatial axes, naming the file, its shape and the axes found.
    """
    channel_last = not is_no_channel(meta.get(MetaKeys.ORIGINAL_CHANNEL_DIM, float("nan")))
    spatial = array.ndim - channel_last
    if spatial not in (2, 3):
        axes = "".join("?" * (spatial - 3)) + "ZYX"[-spatial:] if spatial > 0 else ""
        raise ValueError(
            f"{path}: cannot interpret an array of shape {tuple(array.shape)} (axes {axes + ('C' if channel_last else '')}); "
            "an image is (Y, X) or (Z, Y, X), with colour samples last"
        )
    out = np.moveaxis(array, -1, 0) if channel_last else array[None]
    if is_grey_colour(out):
        out = out[:1]
    reverse = _suffix(path) in NIFTI_SUFFIXES
    if reverse:
        out = out.transpose(0, *range(out.ndim - 1, 0, -1))
    return out, reverse


def _read_folder(directory: Path) -> tuple[np.ndarray, dict]:
    files = [f for f in directory.iterdir() if f.is_file() and f.name[0] != "." and _suffix(f) in SLICE_SUFFIXES]
    files.sort(key=lambda f: [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", f.name)])
    if not files:
        raise FileNotFoundError(f"no {'/'.join(SLICE_SUFFIXES)} slices found in directory {directory}")
    slices = [read_image(f) for f in files]
    first, first_meta = slices[0]
    for f, (arr, meta) in zip(files, slices):
        if len(meta[MetaKeys.SPATIAL_SHAPE]) != 2:
            raise ValueError(f"{f} is not a 2D image (shape {arr.shape}); slice folders need 2D PNG/TIFF files")
        if arr.shape != first.shape:
            raise ValueError(f"slice {f} has shape {arr.shape} but {files[0].name} has {first.shape}")
    array = np.stack([arr for arr, _ in slices])
    channel_last = not is_no_channel(first_meta[MetaKeys.ORIGINAL_CHANNEL_DIM])
    meta = _base_meta(array.shape, [1.0, *first_meta["spacing"][-2:]], channel_last)
    meta.update({"filenames": [f.name for f in files], "filename_or_obj": str(directory)})
    return array, meta
