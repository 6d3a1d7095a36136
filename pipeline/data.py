"""Datalists: which files (and which sections of them) a run reads.

Training items are dictionaries ``{"image": path, "label": path}`` for 2D files, plus
``"slice": z`` for a section of a stack or volume, and ``"image_dataset"`` / ``"label_dataset"``
for the dataset inside an HDF5 or zarr container; :class:`pipeline.transforms.LoadSectiond`
reads them. Every pair is checked (existence, readability, matching shapes) when the
datalist is built, before any training starts, and errors name the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline import io
from pipeline.config import check_paths
from pipeline.io import SUPPORTED_SUFFIXES, TIFF_SUFFIXES, channel_first, read_cached, stem
from pipeline.io.tiff import tiff_level
from pipeline.io.common import STORE_SUFFIXES, _suffix
from pipeline.io.containers import choose_dataset, is_container
from pipeline.labels import class_indices, instance_ids
from pipeline.metrics.common import binary_foreground

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = tuple(sorted(set(SUPPORTED_SUFFIXES) | {".mrc", ".jpg", ".jpeg", ".bmp"}))


def _hash_hint(path: Path) -> str:
    """A note for a path that MONAI's bundle parser changed ('#' typed, '::' read)."""
    return "; it holds '::', which is how MONAI's bundle parser rewrites a '#' typed in a config value" if "::" in str(path) else ""


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and _suffix(path) in STORE_SUFFIXES


def _image_files(path: str | Path, what: str) -> list[Path]:
    p = Path(path)
    if _is_zarr(p):  # a zarr or N5 store is one image (a container of datasets)
        return [p]
    if p.is_file():
        if _suffix(p) not in IMAGE_SUFFIXES:
            raise ValueError(f"{what} {p}: unsupported format {_suffix(p)!r}; supported: {', '.join(IMAGE_SUFFIXES)}")
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"{what} path not found: {p} (give an image file or a folder of images)" + _hash_hint(p))
    files = sorted(
        f for f in p.iterdir()
        if not f.name.startswith(".") and ((f.is_file() and _suffix(f) in IMAGE_SUFFIXES) or _is_zarr(f))
    )
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {what} folder {p}")
    return files


def datalist_from_path(path: str | Path, key: str | None = None, level: int | None = None) -> list[dict[str, str]]:
    """``[{"image": file}, ...]`` for one image file or every image file of a folder (sorted).

    A folder of 2D PNG/TIFF sections gives one item per file, so each prediction keeps its
    section's name. Hidden files are skipped. An HDF5 file or a ``.zarr`` store (the path itself, or
    one in the folder) is one item with ``"image_dataset"``: ``key``, or its only dataset.
    ``level`` (bundle key) picks a pyramid level of whole-slide TIFF / OME-TIFF / SVS files and OME-Zarr
    images (0: full resolution), recorded as the item's ``"image_dataset"``.

    Raises:
        FileNotFoundError: no such path, or a folder without images.
        ValueError: an unsupported format; a container without ``key`` and several datasets, or without ``key``;
            ``key`` and ``level`` both given; a level the file does not have.
    """
    if level is not None:
        if key is not None:
            raise ValueError(f"--input_key {key!r} and --level {level!r} both given: a dataset of a container or a pyramid level, set one")
        if isinstance(level, bool) or not str(level).isdigit():
            raise ValueError(f"--level must be a pyramid level 0, 1, 2, ... (0: full resolution), got {level!r}")
        key = str(level)
    return [_with_dataset({"image": str(f)}, "image", key) for f in _image_files(path, "input")]


def _with_dataset(item: dict, field: str, key: str | None) -> dict:
    """``item`` plus ``"<field>_dataset"`` when ``item[field]`` is a container (the dataset chosen now,
    so that a missing or ambiguous one fails before anything runs), or a TIFF given a pyramid level."""
    if is_container(item[field]):
        return {**item, f"{field}_dataset": choose_dataset(item[field], key)}
    if key is not None and _suffix(item[field]) in TIFF_SUFFIXES:
        return {**item, f"{field}_dataset": str(tiff_level(item[field], key))}
    return item


def _pair(images: list[Path], labels: list[Path]) -> list[tuple[Path, Path]]:
    """Pair image and label files: by position for single files, by name (stem) for folders."""
    if len(images) == 1 and len(labels) == 1:
        return [(images[0], labels[0])]
    by_stem = {stem(f): f for f in labels}
    pairs, missing = [], []
    for image in images:
        label = by_stem.pop(stem(image), None)
        (pairs.append((image, label)) if label is not None else missing.append(image.name))
    if missing or by_stem:
        raise ValueError(
            f"image and label files do not match ({len(images)} images, {len(labels)} labels): "
            + (f"no label for {missing[:5]}" if missing else "")
            + ("; " if missing and by_stem else "")
            + (f"no image for {sorted(f.name for f in by_stem.values())[:5]}" if by_stem else "")
            + ". Labels must have the image's file name (any supported suffix)."
        )
    return pairs


def paired_items(
    images: str | Path,
    labels: str | Path,
    sections: Sequence[int] | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    volumes: bool = False,
    outside: bool = False,
    sections_key: str = "eval_slices",
    allow_missing_chunks: bool = False,
) -> list[dict]:
    """Every item of an image/label pair of stacks, volumes, files or folders, checked.

    Items are ``{"image", "label"}`` for 2D files and ``{"image", "label", "slice"}`` for the
    sections of 3D files, in file then section order. ``sections = [start, stop)`` keeps only the
    sections of 3D files in that range (2D files, which have none, are dropped then). With ``volumes``,
    a 3D file is one item, whole or, with ``sections``, ``{"image", "label", "slices": [start, stop]}``
    (clipped to the file; files with no section in the range are dropped); with ``outside`` too, the parts of each
    3D file before and after the range (3D training around validation sections). In HDF5 and zarr
    containers the datasets ``image_key`` / ``label_key`` are read (default: the only one); images and
    labels may be two datasets of one file. A zarr / N5 / HDF5 dataset with chunks missing is refused unless
    ``allow_missing_chunks`` (:func:`pipeline.io.containers.check_chunks`; the readers then take the same value).

    Raises:
        FileNotFoundError: a path does not exist or a folder holds no images.
        ValueError: unreadable or unpaired files, image/label shape mismatches, empty images.
    """
    items = []
    for image, label in _pair(_image_files(images, "image"), _image_files(labels, "label")):
        item = _with_dataset(_with_dataset({"image": str(image), "label": str(label)}, "image", image_key), "label", label_key)
        img, img_meta = read_cached(image, item.get("image_dataset"), allow_missing_chunks)
        lab, lab_meta = read_cached(label, item.get("label_dataset"), allow_missing_chunks)
        # compared in the pipeline's axis order (channel_first), so a NIfTI image pairs with a TIFF label
        shape, lab_shape = channel_first(img, img_meta, image)[0].shape[1:], channel_first(lab, lab_meta, label)[0].shape[1:]
        if shape != lab_shape:
            raise ValueError(f"image {image} has shape {shape} but its label {label} has {lab_shape}")
        if min(shape) == 0:
            raise ValueError(f"image {image} is empty (shape {shape})")
        if len(shape) == 2:
            items.append(item)
        elif volumes:
            start, stop = (0, shape[0]) if sections is None else (max(int(sections[0]), 0), min(int(sections[1]), shape[0]))
            ranges = [(0, min(start, shape[0])), (max(stop, 0), shape[0])] if outside and sections is not None else [(start, stop)]
            for a, b in ranges:
                if a < b:
                    items.append(item if (a, b) == (0, shape[0]) else {**item, "slices": [a, b]})
        else:
            items.extend({**item, "slice": z} for z in range(shape[0]))
    if volumes:
        if not items:
            raise ValueError(f"no section of {images} lies {'outside' if outside else 'in'} {list(sections)} ({sections_key})")
        return items
    if sections is not None:
        start, stop = sections
        kept = [item for item in items if start <= item.get("slice", -1) < stop]
        if not kept:
            found = sorted({item["slice"] for item in items if "slice" in item})
            raise ValueError(
                f"no section of {images} lies in [{start}, {stop}): "
                + (f"its sections are {found[0]}..{found[-1]}" if found else "it holds 2D images only, which have no sections")
            )
        items = kept
    return items


def make_datalists(
    images: str | Path,
    labels: str | Path,
    val_slices: Sequence[int] | None = None,
    val_files: int | Sequence[str] | None = None,
    image_key: str | None = None,
    label_key: str | None = None,
    volumes: bool = False,
    allow_missing_chunks: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Training and validation datalists from image/label stacks, volumes or folders.

    Args:
        images: a stack/volume file (multi-page TIFF, NIfTI, MHA, ...), a 2D image file, or
            a folder of such files.
        labels: the same for the labels; folder files are matched to images by name.
        val_slices: ``[start, stop)`` of the sections (of every stack) kept for validation:
            adjacent EM sections are correlated, so a contiguous range avoids leakage.
        val_files: validate on whole files instead: their names, or the number of files
            (the last ones, in sorted order).
        image_key, label_key: the datasets inside HDF5 / zarr containers (:func:`paired_items`).
        volumes: items are whole stacks / volumes (a 3D network): ``val_slices`` validates on that range of
            each and trains on the sections before and after it (``"slices": [start, stop)`` items).
        allow_missing_chunks: read container datasets with chunks missing (:func:`paired_items`).

    Returns:
        ``(train, val)`` lists of :func:`paired_items` items.

    Raises:
        FileNotFoundError, ValueError: as :func:`paired_items`; also for an empty training
            split, a section range outside the stacks, or both split options given.
    """
    if val_slices is not None and val_files is not None:
        raise ValueError("give either val_slices or val_files, not both")
    if val_slices is not None and (len(val_slices) != 2 or not 0 <= val_slices[0] < val_slices[1]):
        raise ValueError(f"val_slices must be [start, stop) with 0 <= start < stop, got {list(val_slices)}")
    if volumes:
        return _volume_datalists(images, labels, val_slices, val_files, image_key, label_key, allow_missing_chunks)
    items = paired_items(images, labels, image_key=image_key, label_key=label_key, allow_missing_chunks=allow_missing_chunks)
    val_names = _validation_files(list(dict.fromkeys(Path(i["image"]).name for i in items)), val_files)
    if val_slices is not None and not any(val_slices[0] <= i.get("slice", -1) < val_slices[1] for i in items):
        found = sorted({i["slice"] for i in items if "slice" in i})
        raise ValueError(f"val_slices {list(val_slices)} select no section of the stacks in {images}: "
                         + (f"their sections are {found[0]}..{found[-1]}; give --val_slices [start, stop) within them"
                            if found else "it holds 2D images only, which have no sections; give --val_files instead"))

    def in_val(item: dict) -> bool:
        if Path(item["image"]).name in val_names:
            return True
        return val_slices is not None and val_slices[0] <= item.get("slice", -1) < val_slices[1]

    train = [i for i in items if not in_val(i)]
    val = [i for i in items if in_val(i)]
    if not train:
        raise ValueError("the split leaves no training data; choose a smaller validation range")
    logger.info("datalists: %d training and %d validation items", len(train), len(val))
    return train, val


def _validation_files(names: list[str], val_files: int | Sequence[str] | None) -> set[str]:
    """The file names ``val_files`` selects among ``names`` (sorted order): the last ``val_files`` of them, or those named.

    Raises:
        ValueError: a count out of range, or names that are not among the images.
    """
    if isinstance(val_files, int):
        if not 0 <= val_files < len(names):
            raise ValueError(f"val_files={val_files} must be in [0, {len(names) - 1}] for {len(names)} files")
        return set(names[len(names) - val_files:])
    chosen = set(val_files or ())
    if chosen - set(names):
        raise ValueError(f"val_files names files that are not images: {sorted(chosen - set(names))}")
    return chosen


def _volume_datalists(images, labels, val_slices, val_files, image_key, label_key, holes=False) -> tuple[list[dict], list[dict]]:
    """:func:`make_datalists` for a 3D network: whole stacks / volumes, or their parts around ``val_slices``."""
    keys = dict(image_key=image_key, label_key=label_key, volumes=True, sections_key="val_slices", allow_missing_chunks=holes)
    items = paired_items(images, labels, **keys)
    flat = [i["image"] for i in items if read_cached(i["image"], i.get("image_dataset"), holes)[0].ndim < 3]
    if flat:
        raise ValueError(f"a 3D network (spatial_dims 3) trains on stacks and volumes; {flat[0]} is a 2D image "
                         f"({len(flat)} of {len(items)} files). Give (Z, Y, X) files, or train a 2D network (--spatial_dims 2)")
    if val_slices is not None:
        train = paired_items(images, labels, sections=val_slices, outside=True, **keys)
        val = paired_items(images, labels, sections=val_slices, **keys)
    else:
        names = [Path(i["image"]).name for i in items]
        chosen = _validation_files(list(dict.fromkeys(names)), val_files)
        train = [i for i, n in zip(items, names) if n not in chosen]
        val = [i for i, n in zip(items, names) if n in chosen]
    if not train:
        raise ValueError("the split leaves no training data; choose a smaller validation range")
    logger.info("datalists: %d training and %d validation volumes", len(train), len(val))
    return train, val


# ---------------------------------------------------------------- checks of a run's data
def check_datalists(**datalists: Any) -> None:
    """Evaluate a run's datalists before anything else is written and refuse an empty training list.

    Run first in training's checks: building a datalist reads (and checks) every image/label pair,
    or writes the synthetic default into a folder that :mod:`pipeline.synthetic` owns, so a bad
    dataset or a foreign ``--data_cache_dir`` fails before checkpoints or TensorBoard files exist.

    Raises:
        ValueError: a datalist that is not a list of items, one whose paths hold ``::`` (a ``#`` that
            MONAI rewrote, :func:`check_paths`; e.g. ``--dataset_dir d#1``), or an empty ``train`` list.
    """
    for name, items in datalists.items():
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, dict) for i in items):
            raise ValueError(f"{name}_datalist must be a list of {{'image': ..., 'label': ...}} items, got {type(items).__name__}")
        check_paths(**{f"{name}_datalist (a {key} path)": path for item in items[:1] for key, path in item.items() if isinstance(path, str)})
    if "train" in datalists and not datalists["train"]:
        raise ValueError("train_datalist is empty: there is nothing to train on; check --num_images / --num_val or the dataset keys")


def check_labels(
    datalist: Sequence[dict], mask_threshold: float | None = None, label_mode: str = "binary", num_classes: int = 2,
    class_values: Any = None, allow_missing_chunks: bool = False,
) -> None:
    """Every label file (or container dataset) of a datalist reads by ``label_mode``'s rule, checked on the
    whole file before any output: binary masks by the one binarisation rule
    (:func:`pipeline.metrics.common.binary_foreground`; skipped with a ``--mask_threshold``, which binarises
    any values), instance ids by :func:`pipeline.labels.instance_ids`, classes by
    :func:`pipeline.labels.class_indices`. A bad value in one section would otherwise stop a run halfway,
    or pass unseen when no single section holds all values.

    Raises:
        ValueError: naming the label file, the values found, and the key to set.
    """
    if label_mode == "binary" and mask_threshold is not None:
        return
    seen = set()
    for item in datalist:
        if "label" not in item or (item["label"], item.get("label_dataset")) in seen:
            continue
        seen.add((item["label"], item.get("label_dataset")))
        array, meta = io.read_cached(item["label"], item.get("label_dataset"), allow_missing_chunks)
        array = io.channel_first(array, meta, item["label"])[0]  # a grey label saved as RGB: one channel
        if array.shape[0] > 1:
            raise ValueError(
                f"{item['label']}: the label has {array.shape[0]} channels that differ (a colour-coded mask?); save it "
                "as one channel of values (0 = background)"
            )
        try:
            if label_mode == "instances":
                instance_ids(array)
            elif label_mode == "classes":
                class_indices(array, num_classes, class_values)
            else:
                binary_foreground(array, "label")
        except ValueError as err:
            hint = ""
            if label_mode == "binary":
                many = np.issubdtype(array.dtype, np.integer)
                hint = ("; set --mask_threshold T (foreground = value > T), or --foreground_invert true if 0 is the foreground"
                        + ("; a label of object ids is --label_mode instances, one of classes --label_mode classes "
                           "--num_classes N" if many else ""))
            raise ValueError(f"{item['label']}: {err}{hint}" + (" (--label_mode binary)" if label_mode == "binary" else "")) from None
