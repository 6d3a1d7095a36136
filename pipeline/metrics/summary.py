"""All scores of one slice or stack at once (:func:`evaluate`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.metrics.common import ISBI_THRESHOLDS, WARPING_THRESHOLDS, _check_pair, _check_threshold
from pipeline.metrics.pixel import dice, iou, pixel_error
from pipeline.metrics.rand import _nanmean0, adapted_rand_error, _rand_from_sums, _v_curves, best_over_thresholds
from pipeline.metrics.warping import _warping_counts, warping_error


# --------------------------------------------------------------------------- all at once


def evaluate(prob, label, threshold: float = 0.5, *,
             thresholds: Sequence[float] = ISBI_THRESHOLDS, sweep: bool = True,
             warping: bool = True, sweep_warping: bool = False) -> dict[str, float]:
    """All scores for one slice ``(H, W)`` or a stack ``(Z, H, W)`` (scored per slice).

    Keys (at ``threshold``): ``pixel_error``, ``dice``, ``iou`` (foreground),
    ``dice_membrane``, ``iou_membrane``, ``v_rand``, ``v_rand_merge``, ``v_rand_split``,
    ``v_info``, ``v_info_merge``, ``v_info_split`` (thinned, official form),
    ``v_rand_unthinned``, ``v_info_unthinned``, ``adapted_rand_error`` (4-connected
    cells, SNEMI3D form; :func:`~pipeline.metrics.adapted_rand_error`); with ``warping``: ``warping_error`` and
    ``warping_error_splits_mergers``.

    With ``sweep`` (over ``thresholds``, default :data:`ISBI_THRESHOLDS`):
    ``v_rand_max``/``v_rand_max_threshold``, ``v_info_max``/``v_info_max_threshold``
    (the official ISBI 2012 scores), ``rand_error_2012`` (``1 -`` max unthinned V_rand,
    micro-averaged) and ``pixel_error_2012`` (``1 -`` max foreground F1). With
    ``sweep_warping`` also ``warping_error_2012`` (minimum splits-and-mergers warping
    error over :data:`WARPING_THRESHOLDS`; slow: one warp per threshold and slice).
    """
    p, g = _check_pair(prob, label)
    t = _check_threshold(threshold)
    ths = [_check_threshold(x) for x in thresholds] if sweep else []
    out: dict[str, float] = {
        "pixel_error": pixel_error(p, g, t),
        "dice": dice(p, g, t),
        "iou": iou(p, g, t),
        "dice_membrane": dice(p, g, t, target="membrane"),
        "iou_membrane": iou(p, g, t, target="membrane"),
    }
    all_th = [t] + ths
    rand, info, _ = _v_curves(p, g, all_th, thin=True)
    r = _nanmean0(rand)  # (T, 3)
    i = _nanmean0(info)
    out.update(v_rand=float(r[0, 0]), v_rand_merge=float(r[0, 1]), v_rand_split=float(r[0, 2]),
               v_info=float(i[0, 0]), v_info_merge=float(i[0, 1]), v_info_split=float(i[0, 2]))
    rand_u, info_u, sums_u = _v_curves(p, g, all_th, thin=False)
    out["v_rand_unthinned"] = float(_nanmean0(rand_u)[0, 0])
    out["v_info_unthinned"] = float(_nanmean0(info_u)[0, 0])
    out["adapted_rand_error"] = adapted_rand_error(p, g, t)
    if ths:
        def best(curve):
            if np.all(np.isnan(curve)):
                return float("nan"), float("nan")
            k = int(np.nanargmax(curve))
            return float(curve[k]), float(ths[k])

        out["v_rand_max"], out["v_rand_max_threshold"] = best(r[1:, 0])
        out["v_info_max"], out["v_info_max_threshold"] = best(i[1:, 0])
        pooled = sums_u[:, 1:].sum(axis=0)  # micro average over slices
        micro = np.array([_rand_from_sums(*s).score for s in pooled])
        out["rand_error_2012"] = 1.0 - best(micro)[0]
        out["pixel_error_2012"] = 1.0 - max(dice(p, g, x) for x in ths)
    if warping:
        counts = _warping_counts(p, g, t, 4, classify=True)
        out["warping_error"] = float(np.mean([c[1] / c[0] for c in counts]))
        out["warping_error_splits_mergers"] = float(np.mean([c[2] / c[0] for c in counts]))
    if sweep_warping:
        out["warping_error_2012"] = best_over_thresholds(
            warping_error, p, g, WARPING_THRESHOLDS, splits_and_mergers_only=True)[0]
    return out
