"""Tests of pipeline.metrics: ISBI 2012 scores, warping error, pixel metrics, bad input."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import adapted_rand_error, variation_of_information

from pipeline import metrics as M
from pipeline.metrics.warping import _OFFSETS

S4 = ndimage.generate_binary_structure(2, 1)
S8 = ndimage.generate_binary_structure(2, 2)


def grid(h=40, w=40, step=10, width=2):
    """Ground truth: cells (True) separated by straight membranes (False) of `width` px."""
    g = np.ones((h, w), bool)
    for k in range(step // 2, h, step):
        g[k:k + width, :] = False
    for k in range(step // 2, w, step):
        g[:, k:k + width] = False
    return g


def shift(a, dy=0, dx=0):
    """Shift by one pixel, replicating the edge (no wrap-around)."""
    out = a
    if dx:
        out = np.concatenate([out[:, :1], out[:, :-1]], axis=1)
    if dy:
        out = np.concatenate([out[:1], out[:-1]], axis=0)
    return out


def relabel_zeros_as_singletons(pred, gt):
    """Give every predicted-0 pixel inside the GT foreground its own new label."""
    out = pred.astype(np.int64).copy()
    sel = (out == 0) & (gt > 0)
    out[sel] = out.max() + 1 + np.arange(np.count_nonzero(sel))
    return out


def blocky_labels(rng, shape, block, nlab, zero=True):
    small = rng.integers(0 if zero else 1, nlab, (shape[0] // block + 1, shape[1] // block + 1))
    return np.kron(small, np.ones((block, block), np.int64))[: shape[0], : shape[1]]


# --------------------------------------------------------------------------- thresholds, labels


def test_thresholds_are_fijis():
    assert len(M.ISBI_THRESHOLDS) == 11
    assert M.ISBI_THRESHOLDS[0] == 0.0
    assert M.ISBI_THRESHOLDS[-1] == pytest.approx(1.0) and M.ISBI_THRESHOLDS[-1] < 1.0
    assert len(M.WARPING_THRESHOLDS) == 10 and M.WARPING_THRESHOLDS[-1] == pytest.approx(0.9)


@pytest.mark.parametrize(
    "label",
    [
        np.array([[0, 255], [255, 0]], np.uint8),
        np.array([[0, 1], [1, 0]], np.int32),
        np.array([[0.0, 1.0], [1.0, 0.0]]),
        np.array([[False, True], [True, False]]),
    ],
)
def test_label_encodings(label):
    np.testing.assert_array_equal(M.binarize_label(label), [[False, True], [True, False]])


def test_single_valued_labels():
    assert M.binarize_label(np.full((2, 2), 255, np.uint8)).all()
    assert not M.binarize_label(np.zeros((2, 2))).any()


def test_segment_uses_4_connectivity_per_slice():
    prob = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], float)
    seg = M.segment(prob)
    assert seg.max() == 2  # diagonal neighbours are separate segments
    stack = M.segment(np.stack([prob, prob]))
    assert stack.shape == (2, 3, 3) and stack[1].max() == 2


# --------------------------------------------------------------------------- pixel metrics


def test_pixel_error_dice_iou_by_hand():
    label = np.array([[255, 255, 0, 0]] * 4, np.uint8)  # 8 foreground pixels
    prob = np.zeros((4, 4))
    prob[:, 0] = 0.9  # 4 true positives
    prob[0, 2] = 0.7  # 1 false positive
    prob[1, 1] = 0.5  # not > 0.5: a false negative like the other 3 of column 1
    assert M.pixel_error(prob, label) == 5 / 16
    assert M.dice(prob, label) == pytest.approx(2 * 4 / (5 + 8))
    assert M.iou(prob, label) == pytest.approx(4 / (5 + 8 - 4))
    # membrane class: predicted membrane 11 px, true membrane 8 px, overlap 7
    assert M.dice(prob, label, target="membrane") == pytest.approx(2 * 7 / (11 + 8))
    assert M.iou(prob, label, target="membrane") == pytest.approx(7 / 12)
    assert M.pixel_error(prob, label, threshold=0.4) == 4 / 16


def test_dice_of_two_empty_masks_is_one():
    assert M.dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    assert M.iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0


# --------------------------------------------------------------------------- Rand / VI


def test_rand_and_info_by_hand_merge():
    gt = np.array([[1, 1], [2, 2]])
    pred = np.ones((2, 2), int)  # the two cells merged
    r = M.rand_scores(pred, gt)
    # sum t^2 = 2^2 + 2^2 = 8, sum s^2 = 16, sum p^2 = 8 (pair counts incl. self pairs)
    assert r == pytest.approx((16 / 24, 8 / 16, 1.0))
    assert r.merge == r.precision and r.split == r.recall
    i = M.info_scores(pred, gt)  # H(T) = ln 2, H(S) = 0, I = 0
    assert i.score == 0.0 and i.merge == 0.0 and i.split == 1.0
    assert M.info_terms(pred, gt)["h_gt_given_pred"] == pytest.approx(np.log(2))


def test_perfect_segmentation_scores_one():
    gt = np.array([[1, 1, 0, 2], [1, 1, 0, 2]])
    pred = np.array([[5, 5, 5, 9], [5, 5, 0, 9]])  # differs only on GT boundary pixels
    assert M.rand_scores(pred, gt) == pytest.approx((1.0, 1.0, 1.0))
    assert M.info_scores(pred, gt) == pytest.approx((1.0, 1.0, 1.0))


def test_predicted_boundary_pixels_are_singletons():
    rng = np.random.default_rng(3)
    gt = blocky_labels(rng, (30, 40), 5, 6)
    pred = blocky_labels(rng, (30, 40), 4, 5)  # contains zeros
    single = relabel_zeros_as_singletons(pred, gt)
    assert M.rand_scores(pred, gt) == pytest.approx(M.rand_scores(single, gt))
    assert M.info_scores(pred, gt) == pytest.approx(M.info_scores(single, gt))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block", [1, 6])
def test_rand_matches_skimage(seed, block):
    """V_rand without self-pairs == 1 - skimage adapted Rand error.

    Definitional differences, both documented in rand_scores: (1) ISBI counts self
    pairs ("N^2" normalisation), skimage does not, so the cross-check uses
    count_self_pairs=False; (2) ISBI makes predicted-0 pixels singletons, skimage treats
    0 in the test image as one segment, so the skimage input gets its zeros relabelled.
    Also, skimage 0.26 returns precision and recall swapped relative to its docstring
    (scikit-image issue #6485): its "precision" is sum p^2 / sum t^2, our split score.
    """
    rng = np.random.default_rng(seed)
    gt = blocky_labels(rng, (60, 70), block, 7)  # 0 = ignored GT boundary
    pred = blocky_labels(rng, (60, 70), block, 5)
    ours = M.rand_scores(pred, gt, count_self_pairs=False)
    are, sk_a, sk_b = adapted_rand_error(gt, relabel_zeros_as_singletons(pred, gt))
    assert ours.score == pytest.approx(1.0 - are, rel=1e-12)
    assert (ours.recall, ours.precision) == pytest.approx((sk_a, sk_b), rel=1e-12)
    # with self pairs (the ISBI definition) the score moves by O(1/segment size)
    isbi = M.rand_scores(pred, gt)
    assert isbi.score >= ours.score
    if block > 1:
        assert isbi.score - ours.score < 0.02


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("block", [1, 6])
def test_vi_matches_skimage(seed, block):
    """Conditional entropies equal skimage's (bits -> nats) on the GT-foreground pixels."""
    rng = np.random.default_rng(seed)
    gt = blocky_labels(rng, (50, 60), block, 6)
    pred = blocky_labels(rng, (50, 60), block, 8)
    terms = M.info_terms(pred, gt)
    fg = gt > 0
    h_split, h_merge = variation_of_information(gt[fg], relabel_zeros_as_singletons(pred, gt)[fg])
    assert terms["h_pred_given_gt"] == pytest.approx(h_split * np.log(2), rel=1e-9, abs=1e-12)
    assert terms["h_gt_given_pred"] == pytest.approx(h_merge * np.log(2), rel=1e-9, abs=1e-12)
    # V_info from the same quantities
    mi = terms["h_gt"] - terms["h_gt_given_pred"]
    assert M.info_scores(pred, gt).score == pytest.approx(2 * mi / (terms["h_gt"] + terms["h_pred"]))


# --------------------------------------------------------------------------- V_rand / V_info


def test_v_scores_of_perfect_prediction():
    g = grid()
    for thin in (True, False):
        assert M.v_rand(g.astype(float), g, thin=thin) == pytest.approx(1.0)
        assert M.v_info(g.astype(float), g, thin=thin) == pytest.approx(1.0)


def test_thinning_forgives_thick_predicted_membranes():
    g = grid(width=2)
    thick = ndimage.binary_erosion(g, S4, border_value=1)  # membranes 4 px wide
    prob = thick.astype(float)
    assert M.v_rand(prob, g, thin=False) < 0.99
    assert M.v_rand(prob, g, thin=True) == pytest.approx(1.0)
    assert M.v_info(prob, g, thin=True) == pytest.approx(1.0)
    seg = M.segment(prob, thin=True)
    assert (seg == 0).sum() < (~thick).sum()


def test_v_rand_penalises_merge_and_max_over_thresholds():
    g = grid()
    prob = g * 0.9 + 0.05
    prob[25:27, 9:13] = 0.6  # weak membrane: a merge at threshold 0.5, not at 0.7
    assert M.v_rand(prob, g, 0.5) < 0.95
    assert M.v_rand(prob, g, 0.7) == pytest.approx(1.0)
    best, th = M.best_over_thresholds(M.v_rand, prob, g)
    assert best == pytest.approx(1.0) and th == pytest.approx(0.6)  # first threshold >= 0.6
    best_i, _ = M.best_over_thresholds(M.v_info, prob, g)
    assert best_i == pytest.approx(1.0)


def test_best_over_thresholds_minimises_errors():
    g = grid()
    prob = g * 0.6 + 0.2  # foreground 0.8, membrane 0.2
    val, th = M.best_over_thresholds(M.pixel_error, prob, g)
    assert val == 0.0 and th == pytest.approx(0.2)  # first threshold with no error
    val, th = M.best_over_thresholds(M.pixel_error, prob, g, mode="max")
    assert val > 0.0


def test_stacks_are_scored_per_slice():
    g = grid()
    bad = g.copy()
    bad[25:27, 9:13] = True
    probs = np.stack([g, bad]).astype(float)
    labels = np.stack([g, g])
    per = [M.v_rand(probs[i], g) for i in range(2)]
    assert M.v_rand(probs, labels) == pytest.approx(np.mean(per))
    assert M.v_rand(probs, labels, average="micro") != pytest.approx(np.mean(per))
    assert M.v_info(probs, labels) == pytest.approx(np.mean([M.v_info(probs[i], g) for i in range(2)]))
    assert M.warping_error(probs, labels) == pytest.approx(M.warping_error(probs[1], g) / 2)


# --------------------------------------------------------------------------- warping error


def _counts(img, fg_conn):
    p = np.pad(img, 1)
    return (ndimage.label(p, S4 if fg_conn == 4 else S8)[1],
            ndimage.label(~p, S8 if fg_conn == 4 else S4)[1])


@pytest.mark.parametrize("fg_conn", [4, 8])
def test_simple_point_lut_matches_global_topology(fg_conn):
    """A flip is 'simple' iff it keeps the numbers of fg and bg components (2-D)."""
    lut = M.simple_point_lut(fg_conn)
    rng = np.random.default_rng(fg_conn)
    for _ in range(25):
        img = rng.random((6, 6)) < rng.uniform(0.3, 0.7)
        base = _counts(img, fg_conn)
        p = np.pad(img, 1).astype(int)
        for y in range(6):
            for x in range(6):
                code = sum(p[y + 1 + dy, x + 1 + dx] << b for b, (dy, dx) in enumerate(_OFFSETS))
                flipped = img.copy()
                flipped[y, x] = ~flipped[y, x]
                assert bool(lut[code]) == (_counts(flipped, fg_conn) == base)


def test_warp_preserves_topology_and_reduces_disagreement():
    rng = np.random.default_rng(7)
    g = grid(48, 48, 12, 2)
    prob = np.clip(ndimage.gaussian_filter(g.astype(float), 1) + rng.normal(0, 0.3, g.shape), 0, 1)
    warped = M.simple_point_warp(g, prob)
    assert _counts(warped, 4) == _counts(g, 4)
    assert np.count_nonzero(warped != (prob > 0.5)) < np.count_nonzero(g != (prob > 0.5))


def test_warping_error_identical_is_zero():
    g = grid()
    assert M.warping_error(g.astype(float), g) == 0.0
    assert M.warping_error(g * 0.8 + 0.1, g) == 0.0


@pytest.mark.parametrize("dy,dx", [(0, 1), (1, 0), (1, 1)])
def test_one_pixel_boundary_shift_costs_nothing(dy, dx):
    g = grid()
    pred = shift(g, dy, dx)
    assert M.pixel_error(pred.astype(float), g) > 0.1
    assert M.warping_error(pred.astype(float), g) == 0.0


def test_shifted_closed_cell_costs_nothing():
    g = np.zeros((30, 30), bool)
    g[8:20, 6:18] = True  # one cell in membrane
    g[22:27, 22:27] = True  # another
    pred = shift(g, 1, 1)
    assert M.warping_error(pred.astype(float), g) == 0.0


def test_merge_costs_and_is_classified_as_merge():
    g = grid()
    pred = g.copy()
    pred[25:27, 9:13] = True  # 4-px gap in a 2-px membrane: two cells merged
    err = M.warping_error(pred.astype(float), g)
    assert err == 4 / g.size  # one pixel per gap column must stay to keep the cells apart
    assert M.warping_error(pred.astype(float), g, splits_and_mergers_only=True) == err
    _, _, counts = M.classify_mismatches(M.simple_point_warp(g, pred.astype(float)), pred)
    assert counts["merge"] == 4 and counts["split"] == 0


def test_split_costs_and_is_classified_as_split():
    g = grid()
    pred = g.copy()
    pred[7:15, 10] = False  # a membrane cutting a cell in two
    err = M.warping_error(pred.astype(float), g)
    assert err > 0
    _, _, counts = M.classify_mismatches(M.simple_point_warp(g, pred.astype(float)), pred)
    assert counts["split"] >= 1 and counts["merge"] == 0
    assert M.warping_error(pred.astype(float), g, splits_and_mergers_only=True) > 0


def test_spurious_blobs_cost_but_are_neither_splits_nor_mergers():
    g = grid()
    hole = g.copy()
    hole[9:12, 9:12] = False  # membrane blob inside a cell
    assert M.warping_error(hole.astype(float), g) == 9 / g.size
    assert M.warping_error(hole.astype(float), g, splits_and_mergers_only=True) == 0.0
    thick = np.ones((40, 40), bool)
    thick[15:25, :] = False
    blob = thick.copy()
    blob[19:21, 10:12] = True  # isolated foreground object inside the membrane
    assert M.warping_error(blob.astype(float), thick) == 4 / thick.size
    _, _, counts = M.classify_mismatches(M.simple_point_warp(thick, blob.astype(float)), blob)
    assert counts["object_addition"] == 4


# --------------------------------------------------------------------------- evaluate


def test_evaluate_reports_all_scores():
    g = grid()
    prob = g * 0.9 + 0.05
    prob[25:27, 9:13] = 0.6
    out = M.evaluate(prob, g)
    assert out["pixel_error"] == M.pixel_error(prob, g)
    assert out["v_rand"] == pytest.approx(M.v_rand(prob, g))
    assert out["v_info"] == pytest.approx(M.v_info(prob, g))
    assert out["v_rand_max"] == pytest.approx(1.0) and out["v_info_max"] == pytest.approx(1.0)
    assert out["warping_error"] == pytest.approx(M.warping_error(prob, g))
    assert out["warping_error_splits_mergers"] == pytest.approx(out["warping_error"])
    assert out["pixel_error_2012"] == pytest.approx(0.0)
    assert out["rand_error_2012"] == pytest.approx(0.0)
    stack = M.evaluate(np.stack([prob, prob]), np.stack([g, g]), sweep=False, warping=False)
    assert stack["v_rand"] == pytest.approx(out["v_rand"])


# --------------------------------------------------------------------------- bad input


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"shapes differ: prob \(4, 4\) vs label \(4, 5\)"):
        M.pixel_error(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"2-D \(H, W\) or a 3-D stack"):
        M.v_rand(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="2-D"):
        M.warping_error(np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 4)))


@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_probabilities_outside_unit_interval(bad):
    prob = np.full((3, 3), 0.5)
    prob[1, 1] = bad
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]; found values in"):
        M.v_info(prob, np.ones((3, 3)))


def test_uint8_prediction_gets_a_hint_and_nan_is_rejected():
    with pytest.raises(ValueError, match="divide it by 255"):
        M.dice(np.full((3, 3), 255, np.uint8), np.ones((3, 3)))
    prob = np.full((3, 3), 0.5)
    prob[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        M.pixel_error(prob, np.ones((3, 3)))


@pytest.mark.parametrize("label", [[[0, 1], [255, 0]], [[0, 128], [255, 0]], [[1, 7], [7, 1]]])
def test_non_binary_labels(label):
    with pytest.raises(ValueError, match=r"cannot binarize a label with [23] distinct values .* two values \{0, v\}.*BinarizeMask"):
        M.warping_error(np.zeros((2, 2)), np.array(label))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int64, np.float32])
def test_one_binarisation_rule_for_masks_and_labels(dtype):
    """{0, v} with v foreground, any dtype: the same answer from the training transform and the metrics."""
    from pipeline.transforms import BinarizeMask

    label = np.array([[0, 7], [7, 0]], dtype)
    expected = [[False, True], [True, False]]
    np.testing.assert_array_equal(M.binarize_label(label), expected)
    np.testing.assert_array_equal(BinarizeMask()(label[None])[0].numpy().astype(bool), expected)
    if dtype != np.uint8:  # a threshold on every wider dtype (torch has no '>' for uint16/32/64)
        soft = np.array([[0, 40000], [30000, 9]]).astype(dtype)
        np.testing.assert_array_equal(BinarizeMask(threshold=32767)(soft[None])[0].numpy().astype(bool), [[False, True], [False, False]])


def test_other_bad_arguments():
    p, g = np.zeros((3, 3)), np.ones((3, 3))
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        M.v_rand(p, g, threshold=1.2)
    with pytest.raises(ValueError, match="target must be 'foreground' or 'membrane'"):
        M.dice(p, g, target="cells")
    with pytest.raises(ValueError, match="integer label image"):
        M.rand_scores(np.zeros((2, 2)), np.ones((2, 2), int))
    with pytest.raises(ValueError, match="non-negative"):
        M.info_scores(-np.ones((2, 2), int), np.ones((2, 2), int))
    with pytest.raises(ValueError, match="average must be"):
        M.v_rand(p, g, average="mean")


def test_adapted_rand_error_by_hand():
    # ground truth: two 2-pixel cells A = {0, 1}, B = {3, 4}; pixel 2 is membrane (ignored)
    label = np.array([[1, 1, 0, 1, 1]])
    assert M.adapted_rand_error(label.astype(float), label) == 0.0
    # one predicted cell over everything: pairs (no self-pairs) inside A and B: 2 + 2 = 4 of
    # the 12 pairs of the predicted cell -> precision 1 (= 4 / 4 GT pairs), recall 4/12, F = 0.5
    assert M.adapted_rand_error(np.ones((1, 5)), label) == pytest.approx(0.5)
    # the predicted membrane is one segment: A and B predicted as membrane except pixel 0 and 4
    # -> segments {0}, {1, 2, 3} (label 0), {4}: pairs in A and B: none -> F = 0, error 1
    assert M.adapted_rand_error(np.array([[1.0, 0, 0, 0, 1]]), label) == pytest.approx(1.0)
    # a stack is the mean of its slices; a slice without ground-truth cells is skipped
    stack_p = np.stack([np.ones((1, 5)), label.astype(float), np.ones((1, 5))])
    stack_g = np.stack([label, label, np.zeros((1, 5), int)])
    assert M.adapted_rand_error(stack_p, stack_g) == pytest.approx(0.25)
    assert M.evaluate(np.ones((1, 5)), label, sweep=False, warping=False)["adapted_rand_error"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- classes (label_mode classes)


def test_class_scores_compare_class_values_and_report_absent_classes():
    """Class values are compared as they are, never renumbered per section: with class 1 absent from the label
    {0, 2}, calling every class-2 pixel class 1 is wrong, not a relabelling; a class absent from label and
    prediction is NaN (absent) and left out of the means; one predicted but absent from the label scores 0."""
    label = np.array([[0, 2], [2, 2]])
    nan = float("nan")
    perfect = M.class_scores(label, label, 3)
    assert perfect == pytest.approx(dict(dice_class_0=1.0, iou_class_0=1.0, dice_class_1=nan, iou_class_1=nan, dice_class_2=1.0,
                                         iou_class_2=1.0, mean_dice=1.0, mean_iou=1.0), nan_ok=True)
    # class 2 called class 1: class 0 right (Dice 2*1/(1+1)); class 1 predicted on 3 pixels, in the label on none:
    # 2*0/(3+0) = 0; class 2 in the label on 3 pixels, predicted on none: 0; mean over the 3 present classes
    renamed = M.class_scores(np.array([[0, 1], [1, 1]]), label, 3, ["bg", "membrane", "mito"])
    assert renamed == pytest.approx(dict(dice_bg=1.0, iou_bg=1.0, dice_membrane=0.0, iou_membrane=0.0, dice_mito=0.0, iou_mito=0.0,
                                         mean_dice=1 / 3, mean_iou=1 / 3))
    # every pixel class 1: class 0 (label 1 pixel, predicted 0) 0, class 1 (predicted 4, label 0) 0, class 2 (label 3) 0
    assert M.class_scores(np.ones((2, 2), np.uint8), label, 3)["mean_dice"] == 0.0
    # one class-2 pixel called 1: class 2: TP 2, |pred| 2 + |label| 3 -> Dice 4/5, IoU 2/3; class 1: 0/(1+0) = 0
    part = M.class_scores(np.array([[0, 1], [2, 2]]), label, 3)
    assert part["dice_class_2"] == pytest.approx(0.8) and part["iou_class_2"] == pytest.approx(2 / 3)
    assert part["dice_class_1"] == 0.0 and part["mean_dice"] == pytest.approx((1 + 0 + 0.8) / 3)
    assert part["mean_iou"] == pytest.approx((1 + 0 + 2 / 3) / 3)


def test_class_scores_of_a_stack_pool_its_sections():
    """A (Z, H, W) stack scored whole: counts pooled over its sections (class 2 only in section 0, class 1 in none)."""
    label = np.stack([[[0, 2], [2, 2]], [[0, 0], [0, 0]]])
    pred = np.stack([[[0, 2], [2, 0]], [[0, 0], [0, 2]]])
    s = M.class_scores(pred, label, 3)
    # class 0: label 5 pixels, pred 5, TP 4 -> Dice 8/10, IoU 4/6; class 2: label 3, pred 3, TP 2 -> Dice 4/6, IoU 2/4
    assert s["dice_class_0"] == pytest.approx(0.8) and s["iou_class_0"] == pytest.approx(4 / 6)
    assert s["dice_class_2"] == pytest.approx(4 / 6) and s["iou_class_2"] == pytest.approx(0.5)
    assert np.isnan(s["dice_class_1"]) and np.isnan(s["iou_class_1"])
    assert s["mean_dice"] == pytest.approx((0.8 + 4 / 6) / 2) and s["mean_iou"] == pytest.approx((4 / 6 + 0.5) / 2)


def test_class_scores_bad_input():
    label = np.array([[0, 2], [2, 2]])
    with pytest.raises(ValueError, match=r"pred holds class values \[3\] outside 0 \.\. 2 \(num_classes=3\)"):
        M.class_scores(np.array([[0, 3], [2, 2]]), label, 3)
    with pytest.raises(ValueError, match=r"true holds class values \[2\] outside 0 \.\. 1"):
        M.class_scores(np.zeros((2, 2), int), label, 2)
    with pytest.raises(ValueError, match=r"num_classes=3 needs one name per class"):
        M.class_scores(label, label, 3, ["bg", "mito"])
    with pytest.raises(ValueError, match=r"differ in shape"):
        M.class_scores(label[:1], label, 3)
    with pytest.raises(ValueError, match=r"must be integer ids"):
        M.class_scores(label.astype(float), label, 3)
