"""Object-level scores: instance segmentations against instance ground truth (2D or 3D), and classes.

- :func:`matching`: one-to-one matching of predicted and true objects at an IoU threshold, and the
  counts and ratios StarDist reports (``stardist/matching.py``, Schmidt et al. 2018; Weigert et al.
  2020): ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``f1 = 2 TP / (2 TP + FP + FN)``,
  ``accuracy = TP / (TP + FP + FN)`` (the "average precision" of the 2018 Data Science Bowl at one
  threshold), ``mean_matched_iou`` (mean IoU of the matched pairs) and ``mean_true_iou`` (their sum over
  the true objects), ``panoptic_quality`` (Kirillov et al. 2019). The matching maximises the number of
  pairs with ``IoU >= threshold`` and, among those, their summed IoU (StarDist's costs, solved with
  ``scipy.optimize.linear_sum_assignment`` per connected group of candidate pairs, which is exact).
- :func:`average_precision`: the mean of ``accuracy`` over IoU thresholds 0.5, 0.55, ..., 0.95 (DSB 2018).
- :func:`instance_scores`: adapted Rand error (SNEMI3D / CREMI, ``skimage.metrics.adapted_rand_error``) and
  the variation of information split into its split and merge parts (Meila 2007; CREMI:
  ``VI split = H(pred | true)``, ``VI merge = H(true | pred)``, in bits, ``skimage.metrics.variation_of_information``),
  true background (id 0) ignored; 2D or 3D arrays alike.
- :func:`class_scores`: Dice and IoU per class of class maps, by class value (never renumbered); a class absent
  from both maps is NaN (absent), one predicted but not in the truth scores 0.

Ids are any non-negative integers (0 = background); the arrays of one call have the same shape.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

#: IoU thresholds of the average precision (0.5:0.05:0.95)
AP_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _ids(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integer ids (0 = background); got dtype {arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and arr.min() < 0:
        raise ValueError(f"{name} must be >= 0; found {arr.min()}")
    return arr.astype(np.int64, copy=False)


def _pair(true, pred) -> tuple[np.ndarray, np.ndarray]:
    """Both id arrays, renumbered 0..n (0 kept for background): skimage's scores allocate tables by the
    largest id, and CREMI's uint64 ids reach 2**40 and more."""
    t, p = _ids(true, "true"), _ids(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"true {t.shape} and pred {p.shape} differ in shape")
    return _consecutive(t), _consecutive(p)


def _consecutive(a: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..n in sorted order, 0 kept (``skimage.segmentation.relabel_sequential``), int64."""
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(np.asarray(a).astype(np.int64, copy=False))[0]


def _overlaps(true: np.ndarray, pred: np.ndarray):
    """Object ids, sizes and the overlapping pairs with their IoU (objects only, background left out)."""
    t_ids, t = np.unique(true, return_inverse=True)
    p_ids, p = np.unique(pred, return_inverse=True)
    t, p = t.ravel(), p.ravel()
    t_size, p_size = np.bincount(t, minlength=t_ids.size), np.bincount(p, minlength=p_ids.size)
    pairs, counts = np.unique(t * p_ids.size + p, return_counts=True)
    ti, pi = pairs // p_ids.size, pairs % p_ids.size
    keep = (t_ids[ti] != 0) & (p_ids[pi] != 0)
    ti, pi, counts = ti[keep], pi[keep], counts[keep]
    iou = counts / (t_size[ti] + p_size[pi] - counts)
    t_obj, p_obj = t_ids != 0, p_ids != 0
    # renumber objects 0..n-1
    t_new = np.cumsum(t_obj) - 1
    p_new = np.cumsum(p_obj) - 1
    return int(t_obj.sum()), int(p_obj.sum()), t_new[ti], p_new[pi], iou


def _match(n_true: int, n_pred: int, ti: np.ndarray, pi: np.ndarray, iou: np.ndarray, threshold: float) -> np.ndarray:
    """IoUs of the matched pairs at ``threshold`` (StarDist's costs, per connected group of candidates)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    cand = iou >= threshold
    ti, pi, iou = ti[cand], pi[cand], iou[cand]
    if not ti.size:
        return np.zeros(0)
    graph = coo_matrix((np.ones(ti.size), (ti, n_true + pi)), shape=(n_true + n_pred,) * 2)
    _, group = connected_components(graph, directed=False)
    matched = []
    order = np.argsort(group[ti], kind="stable")
    ti, pi, iou = ti[order], pi[order], iou[order]
    bounds = np.flatnonzero(np.diff(group[ti])) + 1
    for a, b, s in zip(np.split(ti, bounds), np.split(pi, bounds), np.split(iou, bounds)):
        if a.size == 1:
            matched.append(s)
            continue
        rows, r = np.unique(a, return_inverse=True)
        cols, c = np.unique(b, return_inverse=True)
        scores = np.zeros((rows.size, cols.size))
        scores[r, c] = s
        n = min(rows.size, cols.size)
        ri, ci = linear_sum_assignment(-(scores >= threshold).astype(float) - scores / (2 * n))
        ok = scores[ri, ci] >= threshold
        matched.append(scores[ri, ci][ok])
    return np.concatenate(matched)


def _ratios(tp: int, fp: int, fn: int, matched_sum: float, n_true: int) -> dict[str, float]:
    def div(a, b):
        return float(a / b) if b else 0.0

    return dict(precision=div(tp, tp + fp), recall=div(tp, tp + fn), f1=div(2 * tp, 2 * tp + fp + fn),
                accuracy=div(tp, tp + fp + fn), mean_matched_iou=div(matched_sum, tp), mean_true_iou=div(matched_sum, n_true),
                panoptic_quality=div(matched_sum, tp + fp / 2 + fn / 2))


def matching(true, pred, threshold: float = 0.5) -> dict[str, float]:
    """Match predicted to true objects at ``IoU >= threshold`` (see the module docstring).

    Args:
        true, pred: instance ids of one image or volume, the same shape (0 = background).
        threshold: the IoU a pair needs, in (0, 1].

    Returns:
        ``threshold, n_true, n_pred, tp, fp, fn, precision, recall, f1, accuracy, mean_matched_iou,
        mean_true_iou, panoptic_quality``.

    Raises:
        ValueError: non-integer or negative ids, different shapes, a threshold outside (0, 1].
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"the IoU threshold must be in (0, 1], got {threshold}")
    n_true, n_pred, ti, pi, iou = _overlaps(*_pair(true, pred))
    ious = _match(n_true, n_pred, ti, pi, iou, threshold)
    tp = int(ious.size)
    fp, fn = n_pred - tp, n_true - tp
    return dict(threshold=float(threshold), n_true=n_true, n_pred=n_pred, tp=tp, fp=fp, fn=fn,
                **_ratios(tp, fp, fn, float(ious.sum()), n_true))


def average_precision(true, pred, thresholds: Sequence[float] = AP_THRESHOLDS) -> dict[str, float]:
    """``average_precision``: the mean of :func:`matching`'s ``accuracy`` over ``thresholds`` (DSB 2018,
    default 0.5:0.05:0.95), with ``accuracy_<t>`` per threshold; the overlaps are computed once."""
    n_true, n_pred, ti, pi, iou = _overlaps(*_pair(true, pred))
    out = {}
    for t in thresholds:
        tp = int(_match(n_true, n_pred, ti, pi, iou, t).size)
        out[f"accuracy_{t:g}"] = _ratios(tp, n_pred - tp, n_true - tp, 0.0, n_true)["accuracy"]
    out["average_precision"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


def instance_scores(true, pred) -> dict[str, float]:
    """Adapted Rand error and VI (split, merge, total; bits) of an instance segmentation, 2D or 3D; true
    background (0) is ignored, predicted background is one segment (SNEMI3D / CREMI)."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    t, p = _pair(true, pred)
    if not (t > 0).any():
        return dict(adapted_rand_error=float("nan"), vi_split=float("nan"), vi_merge=float("nan"), vi=float("nan"))
    are = float(adapted_rand_error(t, p, ignore_labels=(0,))[0])
    split, merge = (float(v) for v in variation_of_information(t, p, ignore_labels=(0,)))  # bits: H(p|t), H(t|p)
    return dict(adapted_rand_error=are, vi_split=split, vi_merge=merge, vi=split + merge)


def object_scores(true, pred, threshold: float = 0.5) -> dict[str, float]:
    """All object scores at once: :func:`instance_scores`, :func:`matching` at ``threshold`` (its counts and
    ratios) and :func:`average_precision`."""
    out = instance_scores(true, pred)
    out.update({k: v for k, v in matching(true, pred, threshold).items() if k != "threshold"})
    out.update(average_precision(true, pred))
    return out


def class_scores(pred, true, num_classes: int, names: Sequence[str] | None = None) -> dict[str, float]:
    """Dice and IoU of every class of two class maps, compared by class value: class ``k`` is the pixels of value
    ``k`` (``0 .. num_classes - 1``) in both maps. Class values are never renumbered (instance ids are, for the
    other scores): a section whose label lacks a class is scored against that class's own value.

    Empty classes follow nnU-Net's ``compute_metrics`` (NaN when ``TP + FP + FN == 0``), not MONAI's ``DiceMetric(
    ignore_empty=True)`` (NaN whenever the label lacks the class): a class absent from both maps is *absent*, NaN,
    and left out of the means; a class absent from ``true`` but predicted scores 0 (its pixels are all false
    positives); one in ``true`` but not predicted scores 0.

    Args:
        pred, true: class maps of one section or volume, the same shape, integers ``0 .. num_classes - 1``
            (``true`` after the label's own mapping, :func:`pipeline.labels.class_indices`).
        num_classes: the number of classes.
        names: one name per class (default ``class_<k>``).

    Returns:
        ``dice_<name>`` and ``iou_<name>`` per class (NaN: absent), then ``mean_dice`` / ``mean_iou`` over the
        classes present (in either map).

    Raises:
        ValueError: non-integer or negative values, values ``>= num_classes``, different shapes, not one name per class.
    """
    p, t = _ids(pred, "pred"), _ids(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"true {t.shape} and pred {p.shape} differ in shape")
    names = list(names) if names is not None else [f"class_{k}" for k in range(num_classes)]
    if num_classes < 1 or len(names) != num_classes:
        raise ValueError(f"num_classes={num_classes} needs one name per class, got names={names}")
    for arr, name in ((p, "pred"), (t, "true")):
        outside = (arr < 0) | (arr >= num_classes)  # uint64 above the int64 range wraps to negative
        if outside.any():
            found = np.unique(arr[outside])
            raise ValueError(f"{name} holds class values {found[:6].tolist()} outside 0 .. {num_classes - 1} "
                             f"(num_classes={num_classes})")
    n_pred = np.bincount(p.ravel(), minlength=num_classes)
    n_true = np.bincount(t.ravel(), minlength=num_classes)
    inter = np.bincount(t.ravel()[p.ravel() == t.ravel()], minlength=num_classes)
    out: dict[str, float] = {}
    for k, name in enumerate(names):
        total = int(n_pred[k] + n_true[k])
        out[f"dice_{name}"] = 2 * int(inter[k]) / total if total else float("nan")
        out[f"iou_{name}"] = int(inter[k]) / (total - int(inter[k])) if total else float("nan")
    present = [n for k, n in enumerate(names) if n_pred[k] + n_true[k]]
    out["mean_dice"] = float(np.mean([out[f"dice_{n}"] for n in present])) if present else float("nan")
    out["mean_iou"] = float(np.mean([out[f"iou_{n}"] for n in present])) if present else float("nan")
    return out
