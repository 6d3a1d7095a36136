"""Object-level scores (pipeline.metrics.objects) on hand-made cases, and the evaluation bundle scoring
instances of whole stacks and classes through the CLI."""

import json

import numpy as np
import pytest
import tifffile

from pipeline.metrics import average_precision, class_scores, instance_scores, matching


def strip(*runs, n=20):
    """A 1 x n label image with id k on [start, stop) for the k-th run (k = 1, 2, ...)."""
    a = np.zeros((1, n), np.int64)
    for k, (start, stop) in enumerate(runs, start=1):
        a[0, start:stop] = k
    return a


def test_matching_counts_and_ratios_by_hand():
    true = strip((0, 4), (8, 12))
    pred = strip((0, 4), (8, 10), (16, 17))  # A exactly (IoU 1), half of B (IoU 0.5), a stray pixel
    m = matching(true, pred, 0.5)
    assert (m["tp"], m["fp"], m["fn"], m["n_true"], m["n_pred"]) == (2, 1, 0, 2, 3)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0 and m["f1"] == pytest.approx(0.8)
    assert m["accuracy"] == pytest.approx(2 / 3) and m["mean_matched_iou"] == pytest.approx(0.75)
    assert m["mean_true_iou"] == pytest.approx(0.75) and m["panoptic_quality"] == pytest.approx(1.5 / 2.5)
    m = matching(true, pred, 0.55)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1) and m["f1"] == pytest.approx(0.4)
    ap = average_precision(true, pred)
    assert ap["accuracy_0.5"] == pytest.approx(2 / 3) and ap["accuracy_0.95"] == pytest.approx(1 / 4)
    assert ap["average_precision"] == pytest.approx((2 / 3 + 9 / 4) / 10)


def test_matching_is_optimal_where_greedy_is_not():
    """X-p has the highest IoU (0.43), but X-q (0.40) and Y-p (0.33) give two matches at 0.3."""
    true = strip((0, 10), (10, 16))
    pred = np.zeros_like(true)
    pred[0, 4:14], pred[0, 0:4] = 1, 2
    m = matching(true, pred, 0.3)
    assert m["tp"] == 2 and m["mean_matched_iou"] == pytest.approx((4 / 10 + 4 / 12) / 2)
    assert matching(true, pred, 0.42)["tp"] == 1  # only X-p is left


def test_matching_is_invariant_to_ids_and_dtypes_in_3d():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 6, (3, 8, 8))
    pred = np.where(rng.random((3, 8, 8)) < 0.9, true, 0)
    relabelled = np.array([0, 10**12, 7, 3, 99, 5], np.uint64)[pred]
    a, b = matching(true, pred, 0.5), matching(true.astype(np.uint16), relabelled, 0.5)
    assert a == b and a["tp"] == 5
    huge = true.astype(np.uint64) * 2**40  # CREMI-like ids: skimage's tables would need terabytes unrenumbered
    assert instance_scores(huge, relabelled) == pytest.approx(instance_scores(true, pred))


def test_instance_scores_of_a_split_and_a_merge():
    one = np.ones((4, 4), np.int64)
    halves = one.copy()
    halves[:, 2:] = 2
    s = instance_scores(one, halves)  # the prediction splits the one true object
    assert s["vi_split"] == pytest.approx(1.0) and s["vi_merge"] == pytest.approx(0.0)
    recall = (2 * 64 - 16) / (256 - 16)  # skimage's pair counts without self-pairs
    assert s["adapted_rand_error"] == pytest.approx(1 - 2 * recall / (1 + recall))
    m = instance_scores(halves, one)  # ... and merges two in 3D: the same numbers swapped
    assert m["vi_merge"] == pytest.approx(1.0) and m["vi_split"] == pytest.approx(0.0)
    assert instance_scores(halves[None], halves[None])["adapted_rand_error"] == pytest.approx(0.0)


def test_class_scores_by_hand():
    s = class_scores(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 2]), 3, ["bg", "membrane", "mito"])
    assert s["dice_bg"] == pytest.approx(2 / 3) and s["iou_bg"] == pytest.approx(1 / 2)
    assert s["dice_membrane"] == pytest.approx(0.8) and s["iou_membrane"] == pytest.approx(2 / 3)
    assert s["dice_mito"] == 1.0 and s["mean_dice"] == pytest.approx((2 / 3 + 0.8 + 1) / 3)


@pytest.mark.slow
def test_evaluate_bundle_scores_instances_of_whole_stacks_as_the_api_does(tmp_path):
    """--label_mode instances --eval_volumes true: the report's object scores of sections [1, 3) of a stack equal
    those of the inference bundle's instances (same checkpoint) against the labels, through the metrics API."""
    import torch

    from conftest import EVALUATE, INFER, bundle
    from pipeline.metrics import object_scores
    from pipeline.networks import UNet
    from pipeline.synthetic import make_targets, to_uint8

    stack = make_targets((4, 96, 96), seed=2)
    tifffile.imwrite(tmp_path / "stack.tif", to_uint8(stack["image"]), photometric="minisblack")
    tifffile.imwrite(tmp_path / "cells.tif", stack["cells"].astype(np.uint64) * 2**33, photometric="minisblack")  # CREMI-like
    torch.manual_seed(0)
    torch.save(UNet(features=[4, 8, 16, 32, 64]).state_dict(), tmp_path / "model.pt")
    proc = bundle("run", "--config_file", INFER, "--checkpoint", str(tmp_path / "model.pt"), "--output_dir", str(tmp_path / "p0"),
                  "--input_path", str(tmp_path / "stack.tif"), "--write", "[probabilities]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    median = float(np.median(tifffile.imread(tmp_path / "p0" / "probabilities" / "stack.tif")))  # an untrained network
    rule = f"{{cells: {{method: watershed, seed_distance: 1.0, threshold: {1 - median:.6f}}}}}"
    proc = bundle("run", "--config_file", EVALUATE, "--checkpoint", str(tmp_path / "model.pt"), "--output_dir", str(tmp_path / "ev"),
                  "--images", str(tmp_path / "stack.tif"), "--labels", str(tmp_path / "cells.tif"), "--label_mode", "instances",
                  "--eval_volumes", "true", "--eval_slices", "[1,3]", "--instances", rule)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "ev" / "report.json").read_text())["samples"]
    assert row["slice"] == [1, 3] and (tmp_path / "ev" / "overlays" / "stack_z0001-0003.png").is_file()
    proc = bundle("run", "--config_file", INFER, "--checkpoint", str(tmp_path / "model.pt"), "--output_dir", str(tmp_path / "pr"),
                  "--input_path", str(tmp_path / "stack.tif"), "--write", "[instances]", "--instances", rule)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = tifffile.imread(tmp_path / "pr" / "instances" / "cells" / "stack.tif")[1:3]
    expected = object_scores(stack["cells"][1:3].astype(np.int64) * 2**33, ids.astype(np.int64))
    assert row["cells_n_pred"] > 10
    for key, value in expected.items():
        assert row[f"cells_{key}"] == pytest.approx(value, abs=1e-9), key
