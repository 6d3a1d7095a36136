"""Segmentation metrics of the ISBI 2012 EM challenge, plus pixel error, Dice and IoU, and object scores.

Split by family: :mod:`.pixel` (pixel error, Dice, IoU), :mod:`.rand` (V_rand, V_info),
:mod:`.warping` (warping error), :mod:`.summary` (:func:`evaluate`, all at once), :mod:`.common`
(thresholds, input checks, segments), :mod:`.objects` (instances against instance ground truth in
2D or 3D: matching at IoU thresholds and average precision as StarDist reports them, adapted Rand
error and VI split/merge; per-class Dice and IoU; see its docstring for the definitions). Every name below is importable from ``pipeline.metrics``.

Conventions
-----------
* ``label``: ground truth, binary, ``(H, W)`` or a stack ``(Z, H, W)``. Cell interior
  (foreground) is ``255``, ``1`` or ``True``; membrane (boundary) is ``0``.
* ``prob``: the network's foreground (cell-interior) probability, same shape, values in
  ``[0, 1]``. This is the ISBI 2012 submission format: "values between 0 (100% membrane
  certainty) and 1 (100% non-membrane certainty)".
* A prediction is binarised as ``prob > threshold`` (strictly greater, as in Fiji); the
  label as ``label > 0``.
* Stacks are scored slice by slice (all ISBI metrics are 2-D); how slices are combined is
  stated per function.

Definitions follow the reference implementation the challenge used, Fiji's Trainable
Weka Segmentation library by I. Arganda-Carreras (``fiji/Trainable_Segmentation``,
``src/main/java/trainableSegmentation/metrics/{RandError,VariationOfInformation,
WarpingError,PixelError}.java``), and the challenge paper: Arganda-Carreras et al. (2015),
"Crowdsourcing the creation of image segmentation algorithms for connectomics", Front.
Neuroanat. 9:142.

Segments (V_rand, V_info)
  Connected components of the binarised foreground with **4-connectivity**, for the
  prediction and for the ground truth alike (Fiji: ``Utils.connectedComponents(..., 4)``).

Foreground restriction
  Only pixels that are foreground in the ground truth are scored (GT membrane, label 0,
  is ignored). Prediction pixels with label 0 (predicted membrane) that fall inside the
  GT foreground each count as a *singleton segment* of their own (Fiji's ``p_i0`` terms).

Border thinning (``thin=True``, the final official metric)
  Before scoring, the predicted membrane is thinned to 1-pixel lines by a watershed of
  the binarised prediction seeded with its 4-connected components (Fiji:
  ``WatershedTransform2D(binaryProposal, 4)``); only the watershed lines remain label 0.
  The Fiji script ``Segmentation evaluation after border thinning`` calls these "the
  final official metrics for the ISBI-2012 challenge". ``thin=False`` gives the
  original 2012 foreground-restricted scores.

V_rand (foreground-restricted Rand F-score)
  With ``p_ij`` the joint distribution of (predicted segment i, GT segment j) over GT
  foreground pixels, ``s_i``/``t_j`` its marginals (predicted membrane as singletons)::

      V_rand = sum p_ij^2 / (0.5 sum s_i^2 + 0.5 sum t_j^2)
      merge score (= Fiji "precision") = sum p_ij^2 / sum s_i^2
      split score (= Fiji "recall")    = sum p_ij^2 / sum t_j^2

  Pairs are counted with self-pairs (the "N^2 normalisation" of Fiji's
  ``getForegroundRestrictedRandIndexStatsN2``). ``V_rand = 1 - adapted Rand error``.

Adapted Rand error (SNEMI3D / CREMI)
  ``1 - F`` of the Rand precision and recall between the 4-connected cells of the
  prediction and of the ground truth, with scikit-image's ``adapted_rand_error``: ground-truth
  boundary pixels are ignored, the predicted boundary is one ordinary segment and self-pairs
  are not counted, so a prediction whose membranes are too thick is penalised (V_rand,
  which thins them, is not). Stacks: mean of the per-slice errors.

V_info (foreground-restricted information-theoretic score)
  ``I(S;T)`` the mutual information of the same joint distribution (natural log)::

      V_info = 2 I(S;T) / (H(S) + H(T))
      merge score (= Fiji "precision") = I(S;T) / H(T)
      split score (= Fiji "recall")    = I(S;T) / H(S)

  (Fiji: ``VariationOfInformation.foregroundRestrictedFscore``, the harmonic mean of the
  two, which equals the formula above.)

Maximal over thresholds
  The score is evaluated at thresholds ``0.0, 0.1, ..., 1.0`` and the best value is
  kept (Fiji: ``getMaximalVRandAfterThinning(0.0, 1.0, 0.1, true)``,
  ``getMaximalVInfoAfterThinning(0.0, 1.0, 0.1)``). Fiji builds the thresholds by
  repeated addition of 0.1, so the last one is ``0.9999999999999999``, not 1.0;
  :data:`ISBI_THRESHOLDS` reproduces that list exactly. Stacks: at each threshold the
  score is the mean of the per-slice scores (Fiji's ``perSliceAverage=true``), then the
  maximum over thresholds is taken.

Warping error (Jain et al. 2010, "Boundary learning by optimization with topological
constraints", CVPR)
  The ground truth ``L*`` is warped toward the binarised prediction ``T`` by flipping
  *simple points* only (pixels whose flip changes no topology), greedily, most confident
  prediction pixels first (``|prob - threshold|``, descending, as in Fiji
  ``WarpingError.simplePointWarp2d``); the error is the fraction of pixels where the
  warped ground truth and ``T`` still disagree: ``D(T || L*) = min_{L <| L*} |T - L|^2 / N``.
  Digital topology: foreground 4-adjacency, background 8-adjacency (the complementary
  pair; "We use the 4-adjacency for foreground and the 8-adjacency for background",
  imagej.net Topology preserving warping error). The image outside its border counts as
  background (membrane), as in Fiji's zero-padding. With ``splits_and_mergers_only=True``
  only the remaining disagreements classified as splits or mergers count (Fiji
  ``classifyMismatches2d``): the "Minimum Splits and Mergers Warping error" of the 2012
  leaderboard is the minimum of that over thresholds ``0.0 .. 0.9``.

Pixel error
  Fraction of pixels whose binarised prediction differs from the label (Fiji
  ``PixelError.getMetricValue``). The 2012 leaderboard's "pixel error" was instead
  ``1 - max_threshold F1(foreground)``; :func:`dice` at each threshold gives that F1.

Differences from other implementations
  * scikit-image ``adapted_rand_error`` (SNEMI3D convention) does not count self-pairs and
    treats label 0 of the test image as one ordinary segment; ``rand_scores(...,
    count_self_pairs=False)`` on a prediction whose zeros are relabelled as singletons
    equals ``1 - are`` exactly. Its returned precision/recall are swapped relative to
    its docstring (scikit-image issue #6485). ``variation_of_information`` returns the
    two conditional entropies in bits; :func:`info_terms` gives them in nats.
  * Fiji tests simplicity by embedding the 3x3 patch in an otherwise empty 3x3x3 cube
    (``simple2DBertrand`` -> ``simple3d(input, 6)``); here the standard 2-D test (both
    topological numbers equal 1, Bertrand & Malandain 1994) is used, checked against a
    global count of components. Ties and the processing order of the greedy warp can
    make the two differ by a few pixels.
  * Fiji returns V_info = 0 when both segmentations are a single segment; here 1.0.
"""

from pipeline.metrics.objects import AP_THRESHOLDS, average_precision, class_scores, instance_scores, matching, object_scores
from pipeline.metrics.common import ISBI_THRESHOLDS, WARPING_THRESHOLDS, binarize_label, segment, thin_boundaries
from pipeline.metrics.pixel import dice, iou, pixel_error
from pipeline.metrics.rand import Scores, adapted_rand_error, best_over_thresholds, info_scores, info_terms, rand_scores, v_info, v_rand
from pipeline.metrics.summary import evaluate
from pipeline.metrics.warping import classify_mismatches, simple_point_lut, simple_point_warp, warping_error

__all__ = [
    "AP_THRESHOLDS",
    "average_precision",
    "class_scores",
    "instance_scores",
    "matching",
    "object_scores",
    "ISBI_THRESHOLDS",
    "WARPING_THRESHOLDS",
    "Scores",
    "binarize_label",
    "segment",
    "thin_boundaries",
    "pixel_error",
    "dice",
    "iou",
    "rand_scores",
    "info_scores",
    "info_terms",
    "v_rand",
    "v_info",
    "adapted_rand_error",
    "best_over_thresholds",
    "simple_point_lut",
    "simple_point_warp",
    "classify_mismatches",
    "warping_error",
    "evaluate",
]
