"""Shared pieces of the metrics: threshold lists, input checks, segments from probabilities."""

from __future__ import annotations


import numpy as np
from scipy import ndimage


def _fiji_thresholds(start: float, stop: float, step: float) -> tuple[float, ...]:
    """Thresholds exactly as Fiji's ``for (th = start; th <= stop; th += step)`` makes them."""
    out = []
    th = start
    while th <= stop:
        out.append(th)
        th += step
    return tuple(out)


#: Thresholds of the ISBI 2012 "maximal over thresholds" scores: 0.0, 0.1, ..., 0.9999999999999999.
ISBI_THRESHOLDS: tuple[float, ...] = _fiji_thresholds(0.0, 1.0, 0.1)
#: Thresholds of the 2012 "Minimum Splits and Mergers Warping error": 0.0, 0.1, ..., 0.9.
WARPING_THRESHOLDS: tuple[float, ...] = _fiji_thresholds(0.0, 0.9, 0.1)

_STRUCT4 = ndimage.generate_binary_structure(2, 1)
_STRUCT8 = ndimage.generate_binary_structure(2, 2)


# --------------------------------------------------------------------------- input checks


def _check_prob(prob, name: str = "prob") -> np.ndarray:
    arr = np.asarray(prob)
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(
            f"{name} must be a real-valued array of foreground probabilities in [0, 1]; "
            f"got dtype {arr.dtype}"
        )
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be 2-D (H, W) or a 3-D stack (Z, H, W); got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; probabilities must be in [0, 1]")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < 0.0 or hi > 1.0:
        hint = " (an 8-bit image? divide it by 255)" if hi > 1.0 and hi <= 255.0 else ""
        raise ValueError(
            f"{name} must hold foreground probabilities in [0, 1]; found values in "
            f"[{lo:g}, {hi:g}]{hint}"
        )
    return arr


def binary_foreground(values: np.ndarray, name: str = "mask") -> np.ndarray:
    """The one binarisation rule of the pipeline, for masks to train on and labels to score:
    booleans as they are; numbers with one value (0: all background, else all foreground) or two
    values ``{0, v}`` (``v`` is foreground: 0/1, 0/255, 0/65535, ...), any integer or float dtype.
    :class:`pipeline.transforms.BinarizeMask` adds thresholds, values and colours on top.

    Raises:
        ValueError: ``"cannot binarize a <name> with N distinct values (...)"``; callers add the
            file name and how to choose the foreground.
    """
    arr = np.asarray(values)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"cannot binarize a {name} of dtype {arr.dtype}: give booleans or numbers")
    found = np.unique(arr)
    if found.size == 1:
        return arr != 0
    if found.size == 2 and found[0] == 0:
        return arr == found[1]
    shown = ", ".join(f"{v:g}" for v in found[:6].tolist()) + (", ..." if found.size > 6 else "")
    raise ValueError(
        f"cannot binarize a {name} with {found.size} distinct values ({shown}): a binary {name} holds booleans "
        "or two values {0, v} (v = foreground)"
    )


def binarize_label(label, name: str = "label") -> np.ndarray:
    """Binary ground truth as a bool array (True = cell interior), by :func:`binary_foreground`:
    bool, or numbers with values ``{0, v}`` (0 = membrane). Anything else (a third value, e.g.
    ``{0, 1, 255}``, or an instance label image) raises ``ValueError``.
    """
    arr = np.asarray(label)
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be 2-D (H, W) or a 3-D stack (Z, H, W); got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    try:
        return binary_foreground(arr, name)
    except ValueError as err:
        raise ValueError(f"{err}; binarize it first, e.g. with pipeline.transforms.BinarizeMask(threshold=...)") from None


def _check_pair(prob, label) -> tuple[np.ndarray, np.ndarray]:
    p = _check_prob(prob)
    g = binarize_label(label)
    if p.shape != g.shape:
        raise ValueError(
            f"prediction and label shapes differ: prob {p.shape} vs label {g.shape}; both "
            "must be the same (H, W) image or (Z, H, W) stack"
        )
    return p, g


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not (0.0 <= t <= 1.0):
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
    return t


def _check_segmentation(seg, name: str) -> np.ndarray:
    arr = np.asarray(seg)
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer label image (0 = boundary/background, >0 = segment "
            f"ids); got dtype {arr.dtype}"
        )
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must have non-negative labels; found minimum {arr.min()}")
    return arr


def _slices(arr: np.ndarray) -> np.ndarray:
    return arr[None] if arr.ndim == 2 else arr


# --------------------------------------------------------------------------- segments


def _components(fg: np.ndarray) -> np.ndarray:
    """4-connected components of one 2-D boolean slice (int32 labels, 0 = background)."""
    return ndimage.label(fg, structure=_STRUCT4)[0]


def thin_boundaries(seg: np.ndarray) -> np.ndarray:
    """Thin the background (label 0) of a 2-D segmentation to 1-pixel watershed lines.

    The background is flooded from the segments (4-connectivity, a plateau is flooded in
    breadth-first order from the basins); where two segments meet a one-pixel line of
    label 0 remains. This mirrors Fiji's ``WatershedTransform2D(binaryProposal, 4)`` used
    by the ISBI "after thinning" scores (ties may be broken differently, by a pixel).
    A segmentation without segments is returned unchanged.
    """
    from skimage.segmentation import watershed

    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise ValueError(f"thin_boundaries works on one 2-D slice; got shape {seg.shape}")
    if seg.max() == 0 or seg.min() > 0:
        return seg.copy()
    relief = (seg == 0).astype(np.uint8)
    return watershed(relief, markers=seg, connectivity=1, watershed_line=True)


def segment(prob, threshold: float = 0.5, *, thin: bool = False) -> np.ndarray:
    """Segments of a prediction: 4-connected components of ``prob > threshold``.

    Returns int32 labels (0 = membrane). For a stack ``(Z, H, W)`` each slice is labelled
    on its own (ids restart at 1 per slice). ``thin=True`` also applies
    :func:`thin_boundaries` (the ISBI "after thinning" segmentation).
    """
    p = _check_prob(prob)
    t = _check_threshold(threshold)
    out = np.zeros(p.shape, np.int32)
    out3 = _slices(out)
    for z, sl in enumerate(_slices(p)):
        s = _components(sl > t)
        out3[z] = thin_boundaries(s) if thin else s
    return out
