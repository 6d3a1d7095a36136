"""What a label file means: binary masks, instance ids or class values, and the targets made from them.

Plain NumPy, no torch: the pre-flight checks (:func:`pipeline.data.check_labels`) and the training
transforms (:class:`pipeline.transforms.LabelsToTargetd`) read labels by these same rules.

``label_mode`` (a bundle key) says how a label image is read:

- ``binary``: a mask, by the one binarisation rule (:func:`pipeline.metrics.common.binary_foreground`);
  targets: class 1 = foreground (cell interior in ISBI 2012), class 0 = the rest.
- ``instances``: one id per object (neurons of CREMI, cells, nuclei), any integer dtype (uint64 too),
  0 = background / boundary; 2D or 3D. Targets (:func:`instance_targets`): with ``num_classes: 2``,
  class 1 = the interior of an instance and class 0 = background and the boundaries between touching
  instances (ISBI 2012's convention, so a label of cells separated by membranes gives exactly its
  binary mask); with ``num_classes: 3``, class 0 = background, 1 = the boundary of every instance
  (its pixels next to another id or the background), 2 = interior (torch-em's boundary + foreground
  targets as one soft-max). The paper's border weight map (eq. 2) takes the instances as its cells.
- ``classes``: semantic classes, values ``0 .. num_classes - 1`` or mapped by ``class_values``
  (a list ``[v0, v1, ...]``: value ``v_k`` is class ``k``; or a mapping ``{value: class}``).

Errors name what was found and the key to set; callers add the file name.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

LABEL_MODES = ("binary", "instances", "classes")
_INT64_MAX = np.iinfo(np.int64).max


def check_label_mode(label_mode: str, num_classes: int, loss_name: str | None = None, class_values: Any = None) -> None:
    """The label settings of a run fit together.

    Raises:
        ValueError: an unknown ``label_mode``; ``num_classes`` below 2, or other than 2 or 3 with
            ``instances``; ``class_values`` outside ``classes`` mode or not one class per value; the loss
            ``bce`` (one sigmoid channel) with more than 2 classes.
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode={label_mode!r} is unknown; valid: {', '.join(LABEL_MODES)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2 (background counts as a class)")
    if label_mode == "binary" and num_classes != 2:
        raise ValueError(f"label_mode='binary' has 2 classes, got num_classes={num_classes}; for more, set label_mode='classes'")
    if label_mode == "instances" and num_classes not in (2, 3):
        raise ValueError(
            f"label_mode='instances' makes 2 classes (boundary, interior) or 3 (background, boundary, interior), "
            f"got num_classes={num_classes}"
        )
    if class_values is not None:
        if label_mode != "classes":
            raise ValueError(f"class_values={class_values!r} maps values to classes of label_mode='classes', not of "
                             f"label_mode={label_mode!r}; set class_values=None")
        classes = sorted(_mapping(class_values).values())
        if classes != sorted(set(classes)) or not set(classes) <= set(range(num_classes)):
            raise ValueError(
                f"class_values={class_values!r} must give each value one class in 0..{num_classes - 1} "
                f"(num_classes={num_classes}), e.g. [0, 128, 255] for classes 0, 1, 2"
            )
    if loss_name == "bce" and num_classes > 2:
        raise ValueError(f"loss_name='bce' predicts one foreground channel; with num_classes={num_classes} use dice_ce or weighted_ce")


def _mapping(class_values: Any) -> dict[int, int]:
    """``class_values`` as ``{value: class}``: a list ``[v0, v1, ...]`` maps ``v_k`` to ``k``."""
    if isinstance(class_values, Mapping):
        items = class_values.items()
    elif isinstance(class_values, Sequence) and not isinstance(class_values, str):
        items = ((v, k) for k, v in enumerate(class_values))
    else:
        raise ValueError(f"class_values={class_values!r} must be a list [v0, v1, ...] or a mapping {{value: class}}")
    try:
        return {int(v): int(k) for v, k in items}
    except (TypeError, ValueError):
        raise ValueError(f"class_values={class_values!r} must hold integers") from None


def _shown(values: np.ndarray, limit: int = 6) -> str:
    found = np.unique(values)
    text = ", ".join(f"{v:g}" for v in found[:limit].tolist()) + (", ..." if found.size > limit else "")
    return f"{found.size} distinct values ({text})"


def _integers(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        kind = "booleans" if arr.dtype == bool else f"dtype {arr.dtype}"
        raise ValueError(
            f"{what} must be integers (uint8 .. uint64, int8 .. int64); the label holds {kind} ({_shown(arr)})"
            + ("; a mask of booleans is label_mode='binary'" if arr.dtype == bool else "; save it with an integer dtype")
        )
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise ValueError(f"{what} must be >= 0 (0 = background); the label holds negative values (minimum {arr.min()})")
    if arr.size and arr.dtype == np.uint64 and arr.max() > _INT64_MAX:
        raise ValueError(f"{what} above 2**63 - 1 are not supported (maximum {arr.max()}); relabel the ids consecutively")
    return arr.astype(np.int64, copy=False)


def instance_ids(values: Any) -> np.ndarray:
    """Instance ids as int64 (0 = background or boundary), from any integer dtype, 2D or 3D.

    Raises:
        ValueError: booleans or floats, negative values, or uint64 ids above the int64 range.
    """
    return _integers(values, "instance ids (label_mode='instances')")


def class_indices(values: Any, num_classes: int, class_values: Any = None) -> np.ndarray:
    """Class indices ``0 .. num_classes - 1`` (int64) of a label of class values.

    Args:
        values: the label image, integers.
        num_classes: the number of classes (bundle key ``num_classes``).
        class_values: ``None`` (the values are the classes), a list ``[v0, v1, ...]`` (value ``v_k`` is
            class ``k``) or a mapping ``{value: class}``.

    Raises:
        ValueError: floats or negative values; values that are no class, naming them and the keys.
    """
    arr = _integers(values, "class values (label_mode='classes')")
    if class_values is None:
        if arr.size and arr.max() >= num_classes:
            raise ValueError(
                f"the label holds {_shown(arr)}, more than num_classes={num_classes} allows (0 .. {num_classes - 1}); "
                "set num_classes=N, or class_values=[v0, v1, ...] to map stored values to classes"
            )
        return arr
    mapping = _mapping(class_values)
    found = np.unique(arr)
    unknown = [int(v) for v in found if int(v) not in mapping]
    if unknown:
        raise ValueError(
            f"the label holds {_shown(arr)}; {unknown[:6]} {'is' if len(unknown) == 1 else 'are'} not in "
            f"class_values={class_values!r}: list every stored value"
        )
    lut = np.array([mapping[int(v)] for v in found], dtype=np.int64)
    return lut[np.searchsorted(found, arr)]


def touching(ids: np.ndarray, background: bool = False) -> np.ndarray:
    """Pixels of an instance with a face neighbour (4 in 2D, 6 in 3D) of another instance; with
    ``background``, also of the background (id 0). Both sides of a contact are marked, as
    ``skimage.segmentation.find_boundaries(mode="inner")`` does, without its ``ndi`` dilation
    (this runs per training sample)."""
    ids = np.asarray(ids)
    out = np.zeros(ids.shape, bool)
    for axis in range(ids.ndim):
        lo = tuple(slice(None, -1) if a == axis else slice(None) for a in range(ids.ndim))
        hi = tuple(slice(1, None) if a == axis else slice(None) for a in range(ids.ndim))
        a, b = ids[lo], ids[hi]
        differ = a != b if background else (a != b) & (a > 0) & (b > 0)
        out[lo] |= differ & (a > 0)
        out[hi] |= differ & (b > 0)
    return out


def instance_targets(ids: Any, num_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Soft-max targets and the cells of the weight map from instance ids (see the module docstring).

    Args:
        ids: instance ids ``(*spatial)``, 2D or 3D, any integer dtype (0 = background / boundary).
        num_classes: 2 (0 = background and boundaries between touching instances, 1 = interior) or
            3 (0 = background, 1 = boundary of every instance, 2 = interior).

    Returns:
        ``(classes, cells)``: int64 class indices, and the ids on the interior pixels only (0
        elsewhere), the cells of the paper's border weight map (eq. 2).
    """
    ids = instance_ids(ids)
    if num_classes not in (2, 3):
        raise ValueError(f"instance targets have 2 or 3 classes, got {num_classes}")
    boundary = touching(ids, background=num_classes == 3)
    interior = (ids > 0) & ~boundary
    classes = interior.astype(np.int64) * (num_classes - 1)
    if num_classes == 3:
        classes[boundary] = 1
    return classes, np.where(interior, ids, 0)


def weight_map(classes: np.ndarray, cells: np.ndarray | None, w0: float = 10.0, sigma: float = 5.0,
               class_balance: bool = True, spacing: Sequence[float] | None = None) -> np.ndarray:
    """The paper's weight map (Ronneberger et al. 2015, eq. 2): ``w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``.

    ``d1``, ``d2`` are the distances (px) to the nearest and the second nearest cell, the cells being
    the nonzero ids of ``cells`` (no border term when ``cells`` is None or holds fewer than 2);
    ``w_c`` balances the frequencies of the classes present (``n_pixels / (K n_c)`` for the ``K``
    classes present, so its mean is 1; 1 everywhere when ``class_balance`` is False). Distances to a
    cell are computed with scipy's Euclidean distance transform inside the cell's bounding box grown
    by ``6 sigma``; farther away the border term is below ``w0 exp(-18)``. In 3D the distances are
    Euclidean in units of the finest axis when ``spacing`` is given (serial sections 10x thicker than a
    pixel: the next cell through z is 10 px away), else in voxels.

    Args:
        classes: class indices ``(*spatial)``.
        cells: instance ids ``(*spatial)`` (any integers, relabelled here), or None.
        spacing: voxel size per axis (any unit), or None (isotropic).

    Returns:
        float32 array of the classes' shape.
    """
    from scipy import ndimage as ndi

    classes = np.asarray(classes)
    wc = np.ones(classes.shape)
    if class_balance:
        present, inverse, counts = np.unique(classes, return_inverse=True, return_counts=True)
        if present.size > 1:
            wc = (classes.size / (present.size * counts.astype(np.float64)))[inverse.reshape(classes.shape)]
    if cells is None:
        return wc.astype(np.float32)
    from skimage.segmentation import relabel_sequential

    cells = relabel_sequential(np.asarray(cells).astype(np.int64, copy=False))[0]  # consecutive ids: find_objects' list stays short
    n = int(cells.max()) if cells.size else 0
    if n < 2:
        return wc.astype(np.float32)
    d1 = np.full(classes.shape, np.inf)
    d2 = np.full(classes.shape, np.inf)
    if spacing is not None and len(spacing) != classes.ndim:
        raise ValueError(f"spacing {list(spacing)} needs one value per axis of the label, shape {classes.shape}")
    sampling = [1.0] * classes.ndim if spacing is None else [float(v) / min(float(v) for v in spacing) for v in spacing]
    reach = [int(np.ceil(6 * sigma / a)) for a in sampling]
    for i, box in enumerate(ndi.find_objects(cells), start=1):
        if box is None:
            continue
        window = tuple(slice(max(b.start - r, 0), min(b.stop + r, s)) for b, s, r in zip(box, classes.shape, reach))
        d = ndi.distance_transform_edt(cells[window] != i, sampling=sampling)
        w1, w2 = d1[window], d2[window]
        d2[window] = np.minimum(w2, np.maximum(w1, d))
        d1[window] = np.minimum(w1, d)
    return (wc + w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))).astype(np.float32)
