"""Pixel-level scores: pixel error, Dice and IoU."""

from __future__ import annotations


import numpy as np

from pipeline.metrics.common import _check_pair, _check_threshold


# --------------------------------------------------------------------------- pixel metrics


def pixel_error(prob, label, threshold: float = 0.5) -> float:
    """Fraction of pixels where ``prob > threshold`` disagrees with ``label > 0``.

    Over a stack this is the mean of the per-slice errors (= the overall fraction).
    """
    p, g = _check_pair(prob, label)
    t = _check_threshold(threshold)
    return float(np.mean((p > t) != g))


pixel_error.higher_is_better = False  # type: ignore[attr-defined]


def _overlap(prob, label, threshold, target) -> tuple[int, int, int]:
    p, g = _check_pair(prob, label)
    t = _check_threshold(threshold)
    pred = p > t
    if target == "membrane":
        pred, g = ~pred, ~g
    elif target != "foreground":
        raise ValueError(f"target must be 'foreground' or 'membrane'; got {target!r}")
    tp = int(np.count_nonzero(pred & g))
    return tp, int(np.count_nonzero(pred)), int(np.count_nonzero(g))


def dice(prob, label, threshold: float = 0.5, *, target: str = "foreground") -> float:
    """Dice coefficient (= pixel F1) of ``prob > threshold`` against the label.

    ``target="foreground"`` scores cell interior (the positive class of Fiji's pixel
    F-score), ``"membrane"`` the boundary class. Stacks are pooled (micro average). Both
    masks empty gives 1.0.
    """
    tp, npred, ngt = _overlap(prob, label, threshold, target)
    return 1.0 if npred + ngt == 0 else 2.0 * tp / (npred + ngt)


def iou(prob, label, threshold: float = 0.5, *, target: str = "foreground") -> float:
    """Intersection over union (Jaccard) of ``prob > threshold`` against the label.

    Same conventions as :func:`dice`.
    """
    tp, npred, ngt = _overlap(prob, label, threshold, target)
    union = npred + ngt - tp
    return 1.0 if union == 0 else tp / union
