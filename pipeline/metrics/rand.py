"""Rand and information-theoretic scores: V_rand and V_info (ISBI 2012), their sweeps over thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np

from pipeline.metrics.common import ISBI_THRESHOLDS, _check_pair, _check_segmentation, _check_threshold, _components, _slices, thin_boundaries


# --------------------------------------------------------------------------- Rand / VI


class Scores(NamedTuple):
    """An F-score with its two sides. ``precision`` = merge score, ``recall`` = split score.

    Unpacks as ``score, precision, recall`` (the order of skimage's adapted_rand_error).
    """

    score: float
    precision: float
    recall: float

    @property
    def merge(self) -> float:
        """Merge score (1 = no false merges); Fiji's "precision"."""
        return self.precision

    @property
    def split(self) -> float:
        """Split score (1 = no false splits); Fiji's "recall"."""
        return self.recall


@dataclass(frozen=True)
class _Contingency:
    n: int  # GT-foreground pixels
    a: np.ndarray  # GT segment sizes (within GT foreground)
    b: np.ndarray  # predicted segment sizes (label > 0, within GT foreground)
    nij: np.ndarray  # non-zero joint counts (pred > 0)
    n0: int  # predicted-membrane pixels within GT foreground (singletons)


def _contingency(pred_seg: np.ndarray, gt_seg: np.ndarray) -> _Contingency:
    mask = gt_seg > 0
    g = gt_seg[mask].astype(np.int64, copy=False)
    p = pred_seg[mask].astype(np.int64, copy=False)
    n = int(g.size)
    _, a = np.unique(g, return_counts=True)
    inside = p > 0
    n0 = int(n - np.count_nonzero(inside))
    g1, p1 = g[inside], p[inside]
    if p1.size:
        _, b = np.unique(p1, return_counts=True)
        _, nij = np.unique(g1 * (int(p1.max()) + 1) + p1, return_counts=True)
    else:
        b = nij = np.zeros(0, np.int64)
    return _Contingency(n, a.astype(np.float64), b.astype(np.float64), nij.astype(np.float64), n0)


def _rand_sums(c: _Contingency, count_self_pairs: bool = True) -> tuple[float, float, float]:
    """(sum_ij n_ij^2, sum_i t_i^2, sum_j s_j^2) in pixel-pair counts, singletons included."""
    s_ab = float(c.nij @ c.nij) + c.n0
    s_t = float(c.a @ c.a)
    s_s = float(c.b @ c.b) + c.n0
    if not count_self_pairs:
        s_ab, s_t, s_s = s_ab - c.n, s_t - c.n, s_s - c.n
    return s_ab, s_t, s_s


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else num / den


def _rand_from_sums(s_ab: float, s_t: float, s_s: float) -> Scores:
    if s_t + s_s == 0:
        return Scores(float("nan"), float("nan"), float("nan"))
    return Scores(2.0 * s_ab / (s_t + s_s), _ratio(s_ab, s_s), _ratio(s_ab, s_t))


def _segmentation_contingency(pred_seg, gt_seg) -> _Contingency:
    """Check two label images of one shape and return their foreground-restricted contingency."""
    p = _check_segmentation(pred_seg, "pred_seg")
    g = _check_segmentation(gt_seg, "gt_seg")
    if p.shape != g.shape:
        raise ValueError(f"pred_seg shape {p.shape} differs from gt_seg shape {g.shape}")
    return _contingency(p, g)


def rand_scores(pred_seg, gt_seg, *, count_self_pairs: bool = True) -> Scores:
    """Foreground-restricted Rand scores ``(V_rand, merge, split)`` of two label images.

    ``gt_seg``: ground-truth segments, 0 = boundary (ignored). ``pred_seg``: predicted
    segments, 0 = predicted boundary; inside the GT foreground every such pixel is its own
    singleton segment. Any shape (one slice, or one volume scored as a whole).

    ``count_self_pairs=True`` (default) is the ISBI/Fiji "N^2" normalisation. With
    ``False`` pairs of a pixel with itself are not counted (the SNEMI3D / scikit-image
    ``adapted_rand_error`` convention); then ``V_rand == 1 - are`` of
    ``skimage.metrics.adapted_rand_error(gt, pred')`` where ``pred'`` has its zeros
    (inside the GT foreground) relabelled as distinct singletons.

    Returns NaN scores when the ground truth has no foreground.
    """
    c = _segmentation_contingency(pred_seg, gt_seg)
    if c.n == 0:
        return Scores(float("nan"), float("nan"), float("nan"))
    return _rand_from_sums(*_rand_sums(c, count_self_pairs))


def _xlogx_sum(counts: np.ndarray, n: int) -> float:
    q = counts[counts > 0] / n
    return float(np.sum(q * np.log(q)))


def _info_from_contingency(c: _Contingency) -> dict[str, float]:
    n = c.n
    extra = c.n0 / n * np.log(n) if c.n0 else 0.0  # n0 singletons, each of probability 1/n
    h_t = -_xlogx_sum(c.a, n)
    h_s = -_xlogx_sum(c.b, n) + extra
    h_st = -_xlogx_sum(c.nij, n) + extra
    mi = min(max(h_s + h_t - h_st, 0.0), h_s, h_t)
    return {
        "h_gt": h_t,
        "h_pred": h_s,
        "h_joint": h_st,
        "mutual_information": mi,
        "h_gt_given_pred": max(h_st - h_s, 0.0),
        "h_pred_given_gt": max(h_st - h_t, 0.0),
        "variation_of_information": max(2.0 * h_st - h_s - h_t, 0.0),
    }


def info_terms(pred_seg, gt_seg) -> dict[str, float]:
    """Foreground-restricted entropies (nats) behind :func:`info_scores`.

    Keys: ``h_gt`` H(T), ``h_pred`` H(S), ``h_joint`` H(S,T), ``mutual_information``,
    ``h_gt_given_pred`` H(T|S) (merge error), ``h_pred_given_gt`` H(S|T) (split error),
    ``variation_of_information`` H(T|S) + H(S|T). Same pixel conventions as
    :func:`rand_scores` (GT 0 ignored, predicted 0 = singletons).
    """
    c = _segmentation_contingency(pred_seg, gt_seg)
    if c.n == 0:
        nan = float("nan")
        return dict.fromkeys(
            ["h_gt", "h_pred", "h_joint", "mutual_information", "h_gt_given_pred",
             "h_pred_given_gt", "variation_of_information"], nan)
    return _info_from_contingency(c)


def _info_scores_from_terms(t: dict[str, float]) -> Scores:
    h_s, h_t, mi = t["h_pred"], t["h_gt"], t["mutual_information"]
    if np.isnan(h_s):
        return Scores(float("nan"), float("nan"), float("nan"))
    score = 1.0 if h_s + h_t == 0 else 2.0 * mi / (h_s + h_t)
    return Scores(score, _ratio(mi, h_t), _ratio(mi, h_s))


def info_scores(pred_seg, gt_seg) -> Scores:
    """Foreground-restricted information-theoretic scores ``(V_info, merge, split)``.

    ``V_info = 2 I(S;T) / (H(S) + H(T))``, merge = ``I/H(T)``, split = ``I/H(S)``, over GT
    foreground pixels with predicted-boundary pixels as singletons (see module docs).
    Degenerate ratios 0/0 are 1.0 (e.g. one GT segment predicted as one segment scores
    1.0; Fiji returns 0 there). NaN when the ground truth has no foreground.
    """
    return _info_scores_from_terms(info_terms(pred_seg, gt_seg))


# --------------------------------------------------------------------------- V_rand / V_info


def _slice_contingency(prob2d, gt2d_lab, threshold, thin) -> _Contingency:
    seg = _components(prob2d > threshold)
    if thin:
        seg = thin_boundaries(seg)
    return _contingency(seg, gt2d_lab)


def _gt_labels(g: np.ndarray) -> list[np.ndarray]:
    return [_components(sl) for sl in _slices(g)]


def _v_curves(p, g, thresholds, thin) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-slice, per-threshold V_rand, V_info and pooled Rand sums.

    Returns ``rand (Z, T, 3)``, ``info (Z, T, 3)`` (score, merge, split) and
    ``sums (Z, T, 3)`` (s_ab, s_t, s_s).
    """
    ps = _slices(p)
    gts = _gt_labels(g)
    nz, nt = len(ps), len(thresholds)
    rand = np.full((nz, nt, 3), np.nan)
    info = np.full((nz, nt, 3), np.nan)
    sums = np.zeros((nz, nt, 3))
    for z in range(nz):
        for k, th in enumerate(thresholds):
            c = _slice_contingency(ps[z], gts[z], th, thin)
            if c.n == 0:
                continue
            s = _rand_sums(c)
            sums[z, k] = s
            rand[z, k] = _rand_from_sums(*s)
            info[z, k] = _info_scores_from_terms(_info_from_contingency(c))
    return rand, info, sums


def _nanmean0(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        cnt = np.sum(~np.isnan(x), axis=0)
        tot = np.nansum(x, axis=0)
        return np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)


def v_rand(prob, label, threshold: float = 0.5, *, thin: bool = True,
           average: str = "macro", return_parts: bool = False):
    """Foreground-restricted Rand F-score V_rand at one threshold (higher is better).

    ``thin=True`` thins the predicted membrane first (the final official ISBI 2012
    metric); ``thin=False`` gives the original foreground-restricted score (the 2012
    leaderboard's "Rand error" was ``1 - max over thresholds`` of it, micro-averaged).
    Stacks: ``average="macro"`` (default, Fiji's ``perSliceAverage=true``) averages the
    per-slice F-scores; ``"micro"`` pools the pair counts of all slices first. Slices
    without GT foreground are skipped. ``return_parts=True`` returns a :class:`Scores`
    ``(V_rand, merge, split)`` (parts averaged the same way) instead of the float.
    """
    p, g = _check_pair(prob, label)
    t = _check_threshold(threshold)
    if average not in ("macro", "micro"):
        raise ValueError(f"average must be 'macro' or 'micro'; got {average!r}")
    rand, _, sums = _v_curves(p, g, [t], thin)
    if average == "micro":
        res = _rand_from_sums(*sums[:, 0].sum(axis=0))
    else:
        res = Scores(*(float(v) for v in _nanmean0(rand[:, 0])))
    return res if return_parts else res.score


def v_info(prob, label, threshold: float = 0.5, *, thin: bool = True, return_parts: bool = False):
    """Foreground-restricted information-theoretic score V_info at one threshold.

    ``thin`` as in :func:`v_rand`. Stacks: mean of the per-slice scores (Fiji). Slices
    without GT foreground are skipped. ``return_parts=True`` returns
    :class:`Scores` ``(V_info, merge, split)``.
    """
    p, g = _check_pair(prob, label)
    t = _check_threshold(threshold)
    _, info, _ = _v_curves(p, g, [t], thin)
    res = Scores(*(float(v) for v in _nanmean0(info[:, 0])))
    return res if return_parts else res.score


def adapted_rand_error(prob, label, threshold: float = 0.5) -> float:
    """Adapted Rand error of the 4-connected cells, per slice, averaged (lower is better).

    The SNEMI3D / CREMI form, computed by ``skimage.metrics.adapted_rand_error``: the
    ground-truth cells are the 4-connected components of ``label``'s foreground (its
    boundary pixels, label 0, are ignored), the predicted cells those of
    ``prob > threshold``; unlike :func:`v_rand`, the predicted boundary (label 0) is one
    ordinary segment, and self-pairs are not counted. ``are = 1 - F`` of the Rand
    precision and recall (Arganda-Carreras et al. 2015, Front. Neuroanat. 9:142).

    Args:
        prob: foreground probabilities, one slice ``(H, W)`` or a stack ``(Z, H, W)``.
        label: ground truth of the same shape (foreground = cell interior).
        threshold: ``prob > threshold`` is foreground.

    Returns:
        The mean over slices with ground-truth foreground; NaN when no slice has any.
    """
    from skimage.metrics import adapted_rand_error as skimage_are

    p, g = _check_pair(prob, label)
    t = _check_threshold(threshold)
    errors = [skimage_are(gt, _components(ps > t))[0] for ps, gt in zip(_slices(p), _gt_labels(g)) if gt.any()]
    return float(np.mean(errors)) if errors else float("nan")


def best_over_thresholds(metric: Callable[..., float], prob, label,
                         thresholds: Sequence[float] = ISBI_THRESHOLDS, *,
                         mode: str | None = None, **kwargs) -> tuple[float, float]:
    """Best value of ``metric(prob, label, threshold=t, **kwargs)`` over ``thresholds``.

    Returns ``(best_value, best_threshold)``. ``mode`` is ``"max"`` or ``"min"``; by
    default it is ``"min"`` for error metrics (:func:`pixel_error`, :func:`warping_error`)
    and ``"max"`` for scores. Ties go to the first threshold (Fiji keeps the first
    strictly better value); NaN values are skipped; all-NaN gives ``(nan, nan)``.

    The ISBI 2012 scores are ``best_over_thresholds(v_rand, prob, label)`` and
    ``best_over_thresholds(v_info, prob, label)``.
    """
    if mode is None:
        mode = "max" if getattr(metric, "higher_is_better", True) else "min"
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min'; got {mode!r}")
    ths = [_check_threshold(t) for t in thresholds]
    if not ths:
        raise ValueError("thresholds is empty")
    _check_pair(prob, label)
    values = np.array([metric(prob, label, threshold=t, **kwargs) for t in ths], dtype=float)
    if np.all(np.isnan(values)):
        return float("nan"), float("nan")
    filled = np.where(np.isnan(values), -np.inf if mode == "max" else np.inf, values)
    i = int(np.argmax(filled) if mode == "max" else np.argmin(filled))
    return float(values[i]), float(ths[i])
