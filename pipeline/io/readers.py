"""Reading image files: MONAI readers (TIFF stacks, SimpleITK formats), header probes, :func:`read_image`.

TIFF specifics (series, pyramid levels, axes, spacing) live in :mod:`pipeline.io.tiff`. See
:mod:`pipeline.io` for the axis-order rule shared with the writers.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path

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
from pipeline.io.containers import dataset_plan, is_container, open_dataset, read_container
from pipeline.io.tiff import AxesError, TiffSeriesError, read_tiff, tiff_level, tiff_plan


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

    Axes are read by their names (:func:`~pipeline.io.tiff.tiff_plan`, :mod:`pipeline.io.axes`): ImageJ hyperstacks
    (``TZCYX``: singleton axes dropped, ``C`` last, a ``T`` of frames as sections when there is no ``Z``),
    OME-TIFF ``TCZYX``, RGB samples.

    Args:
        series: the 0-based series to read (the bundle key ``tiff_series``); None reads the only
            series, or stacks same-shape series.
        level: the pyramid level of the series (bundle key ``level``; 0: full resolution).
    """

    suffixes = TIFF_SUFFIXES

    def __init__(self, series: int | None = None, level: int = 0) -> None:
        super().__init__()
        self.series, self.level = series, level

    def _load(self, path: Path) -> LoadedImage:
        return LoadedImage(*read_tiff(path, self.series, self.level))


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
        shape: the array shape as the readers return it (:mod:`pipeline.io.axes`), channels last.
        channels: the size of the channel axis (TIFF samples ``S`` or ``C``, vector pixels); 1 without one.
        dtype: the pixel type.
        axes: the stored axes as the format names them (TIFF e.g. ``"SYX"``, OME-Zarr ``"CYX"``, ``"?"`` per unnamed axis; ``""`` for other formats).
        stored_shape: the stored array's shape (for messages; ``shape`` for other formats).
        colour: the channels are colour samples (R, G, B(, A): :mod:`pipeline.io.axes`), which ``rgb_to_grey`` may
            turn grey; False for channels (ImageJ / OME ``C``, ilastik ``c``). Formats without axis names (PNG, JPEG,
            vector pixels of SimpleITK formats): True.
    """

    shape: tuple[int, ...]
    channels: int
    dtype: np.dtype
    axes: str = ""
    stored_shape: tuple[int, ...] | None = None
    colour: bool = True


def probe_image(path: str | os.PathLike, tiff_series: int | None = None, key: str | None = None) -> ImageInfo:
    """Read only the header of an image file: shape, channels, dtype (and the stored axes), as the readers
    will return the array (:mod:`pipeline.io.axes`; channels last).

    Args:
        key: the dataset of a container, or the pyramid level of a TIFF or OME-Zarr image.

    Raises:
        TiffSeriesError: as :func:`~pipeline.io.tiff.choose_tiff_series`; also ``tiff_series`` given for a file that
            is not a TIFF.
        ValueError: the header cannot be read; axes that are not one image; no such level or dataset.
    """
    path, suffix = Path(path), _suffix(path)
    if tiff_series is not None and suffix not in TIFF_SUFFIXES:
        raise TiffSeriesError(f"tiff_series={tiff_series} applies to TIFF files, but {path} is not one; set tiff_series=None")
    if is_container(path):  # its errors name the dataset and the axes found
        array, info = open_dataset(path, key)
        try:
            plan = dataset_plan(array, info, path)
            shape, dtype = plan.shape(array.shape), np.dtype(array.dtype)
        finally:
            if isinstance(array, h5py.Dataset):
                array.file.close()
        return ImageInfo(shape, shape[-1] if plan.channel_last else 1, dtype, plan.found, tuple(int(n) for n in array.shape), plan.colour)
    try:
        if suffix in TIFF_SUFFIXES:
            level = tiff_level(path, key)
            with tifffile.TiffFile(path) as tif:
                chosen, image, plan = tiff_plan(tif, path, tiff_series, level)
                stored = (len(tif.series), *tif.series[0].shape) if chosen is None else image.shape
                shape = plan.shape(stored)
                dtype = tif.series[0 if chosen is None else chosen].dtype
                return ImageInfo(shape, shape[-1] if plan.channel_last else 1, np.dtype(dtype), plan.found, tuple(stored), plan.colour)
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
    except (TiffSeriesError, AxesError):
        raise
    except Exception as err:
        if suffix in TIFF_SUFFIXES and isinstance(err, ValueError) and str(path) in str(err):
            raise  # our own messages (level, key)
        raise ValueError(
            f"could not read the header of {path} ({suffix or 'no suffix'}): {type(err).__name__}: {err}; the file is "
            "damaged, or its pixel layout is one the readers do not support (convert it to a plain grey TIFF)"
        ) from err


LUMINANCE = (0.2125, 0.7154, 0.0721)  # ITU-R BT.709 weights of R, G, B, as skimage.color.rgb2gray


def colour_to_grey(channels_first: np.ndarray, luminance: bool) -> np.ndarray | None:
    """An RGB(A) array ``(3 or 4, ...)`` as one grey channel ``(1, ...)``, or None.

    The rule (in-memory and streamed reading alike): where R = G = B the grey value is R, exactly (a grey
    image saved as colour; alpha ignored); elsewhere, with ``luminance``, ``0.2125 R + 0.7154 G + 0.0721 B``
    (ITU-R BT.709, the weights of ``skimage.color.rgb2gray``, in the file's intensity scale, float32).
    Returns the input's first channel (its dtype) when every pixel is grey; None when a pixel is colour
    and ``luminance`` is off.
    """
    c = channels_first
    equal = (c[0] == c[1]) & (c[0] == c[2])
    if equal.all():
        return c[:1]
    if not luminance:
        return None
    r, g, b = (c[i].astype(np.float32) for i in range(3))
    grey = np.float32(LUMINANCE[0]) * r + np.float32(LUMINANCE[1]) * g + np.float32(LUMINANCE[2]) * b
    return np.where(equal, r, grey)[None]


def check_channels(
    path: str | os.PathLike, info: ImageInfo, in_channels: int, pixels: Callable[[], np.ndarray] | None = None, rgb_to_grey: bool = False
) -> None:
    """Refuse a file whose channels (:func:`probe_image`) are not the network's ``in_channels``.

    A grey image saved as RGB(A) (R = G = B) passes for a 1-channel network when ``pixels`` is given
    (a function returning the file's array, channels last): :func:`channel_first` reads it as grey; not a
    planar RGB TIFF (stored axes ``SYX``), which is how tifffile saves a 3-section stack by default: refused
    with the fix. Any RGB(A) colour passes with ``rgb_to_grey``. Channels that are not colour (``info.colour``
    False: ImageJ / OME ``C``, ilastik ``c``) are never mixed into grey: refused, ``rgb_to_grey`` too, with how to
    save sections stored as channels as a stack.

    Raises:
        ValueError: naming the file, its shape and axes, and what to do.
    """
    colour = info.colour and info.channels in (3, 4)
    if info.channels == in_channels or (rgb_to_grey and in_channels == 1 and colour):
        return
    hint = "convert it to the network's channels (e.g. colour to grey, or rgb_to_grey=True for a 1-channel network)"
    if not info.colour and info.channels > 1:
        hint = _channels_hint(path, info, in_channels, rgb_to_grey)
    planar = info.colour and info.axes.lstrip("Q").startswith("S")  # tifffile's planar RGB: maybe a small stack
    if in_channels == 1 and colour and pixels is not None and not planar:
        if colour_to_grey(np.moveaxis(pixels(), -1, 0), luminance=False) is not None:  # grey saved as colour
            return
        hint = "R, G and B differ: pass rgb_to_grey=True to predict its luminance, convert it to grey, or train a network on colour"
    if planar and in_channels == 1:
        hint = (f"tifffile stores a ({info.channels}, Y, X) array written without photometric='minisblack' as one planar "
                f"RGB(A) page, so these may well be {info.channels} sections: then save it again with "
                "tifffile.imwrite(path, array, photometric='minisblack') (rgb_to_grey=True would mix them into one image). "
                "Only if it truly is one colour image of R, G and B planes, pass rgb_to_grey=True to predict its luminance")
    raise ValueError(
        f"{path} has {info.channels} channel(s) (shape {info.stored_shape or info.shape}{', stored axes ' + info.axes if info.axes else ''}), "
        f"but the network takes {in_channels}; {hint}"
    )


def _channels_hint(path: str | os.PathLike, info: ImageInfo, in_channels: int, rgb_to_grey: bool) -> str:
    """What to do with channels that are not colour (:func:`check_channels`): sections stored as channels are
    saved again as a stack; channels need a network trained on them."""
    n, letter = info.channels, "S" if "S" in info.axes.upper() else "C"
    what = f"its {n} planes are channels by the file's own metadata (axis {letter}), not RGB colour"
    if in_channels != 1:
        return f"{what}; use a network trained on {n} channels, or save the {in_channels} channel(s) it takes"
    if _suffix(path) in TIFF_SUFFIXES:
        resave = ("in Fiji, Image > Hyperstacks > Re-order Hyperstack... (channels <-> slices) and save; in Python, "
                  + ("tifffile.imwrite(path, tifffile.imread(path), imagej=True, metadata={'axes': 'ZYX'})"
                     if info.axes == "CYX" else "tifffile.imwrite(path, array, imagej=True, metadata={'axes': 'ZYX'}) of its (Z, Y, X) array"))
    else:
        resave = "write the dataset again with that axis named as sections (z), e.g. ilastik axistags 'zyx', OME-Zarr axes z, y, x"
    return (
        ("rgb_to_grey=True applies to RGB colour only, and " if rgb_to_grey else "") + what
        + (": their luminance would mix them" if rgb_to_grey else ", so rgb_to_grey=True does not apply")
        + f". If they are {n} sections stored as channels, save the file again as a stack ({resave}); a 2D network then "
        f"predicts each section, a 3D network the stack. If they are channels, predict with a network trained on {n} "
        "channels" + ("; if they are R, G and B, convert the file to grey" if n in (3, 4) else "")
    )


def read_image(
    path: str | os.PathLike, tiff_series: int | None = None, key: str | None = None, allow_missing_chunks: bool = False
) -> tuple[np.ndarray, dict]:
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

    Containers (HDF5, zarr, N5, OME-Zarr: :mod:`pipeline.io.containers`) are read from their dataset ``key``
    (default: the only one; of an OME-Zarr image, a level), refused when chunks are missing unless
    ``allow_missing_chunks`` (:func:`pipeline.io.containers.check_chunks`). For a TIFF, ``key`` is the pyramid
    level (:func:`~pipeline.io.tiff.tiff_level`; 0 or None: full resolution).
    """
    path = Path(path)
    if is_container(path):
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        return read_container(path, key, allow_missing_chunks)
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
        eager = TiffStackReader(series=tiff_series, level=tiff_level(path, key)) if suffix in TIFF_SUFFIXES else SimpleITKReader()
        array, meta = eager.get_data(eager.read(path))
    meta["filename_or_obj"] = str(path)
    return array, meta


def channel_first(array: np.ndarray, meta: dict, path: str | os.PathLike, rgb_to_grey: bool = False) -> tuple[np.ndarray, bool]:
    """The one axis rule of the pipeline: a file's array, as :func:`read_image` returns it, as
    ``(C, *spatial)`` with the spatial axes in ``(Z,) Y, X`` order.

    Channels: colour samples, which the readers put last (``meta["original_channel_dim"] == -1``),
    move first; a grey image gets a channel of 1, and so does a grey image saved as colour (RGB or
    RGBA with R = G = B: the alpha channel is ignored); with ``rgb_to_grey`` (bundle key, for a
    1-channel network) any RGB(A) image becomes grey by :func:`colour_to_grey`'s rule. Channels that are not
    colour (``meta["colour"]`` False: ImageJ / OME ``C``, ilastik ``c``; :mod:`pipeline.io.axes`) are kept as they
    are, never mixed. Sections: TIFF and SimpleITK arrays are already
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
    if out.shape[0] in (3, 4) and meta.get("colour", True):
        grey = colour_to_grey(out, rgb_to_grey)
        out = out if grey is None else grey
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


@lru_cache(maxsize=8)
def _read_cached(path: str, mtime: float, key: str | None, allow_missing_chunks: bool) -> tuple[np.ndarray, dict]:
    array, meta = read_image(path, key=key, allow_missing_chunks=allow_missing_chunks)
    array.setflags(write=False)  # shared between sections: never modified in place
    return array, meta


def read_cached(path: str | Path, key: str | None = None, allow_missing_chunks: bool = False) -> tuple[np.ndarray, dict]:
    """:func:`pipeline.io.read_image` with a small cache, so that the sections of one stack
    decode the file once (the cache is keyed on the path, its modification time, the dataset ``key``
    of a container and ``allow_missing_chunks``)."""
    p = Path(path)
    if not p.exists() or (p.is_dir() and not is_container(p)):
        raise FileNotFoundError(f"image file not found: {p}")
    return _read_cached(str(p), p.stat().st_mtime, key, bool(allow_missing_chunks))
