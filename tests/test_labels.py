"""Label modes (pipeline.labels): instance ids and classes to targets, their weight maps, every integer
dtype, and training runs on them through the bundle CLI."""

import math

import numpy as np
import pytest
import tifffile
import torch

from pipeline.labels import class_indices, instance_targets, touching, weight_map
from pipeline.transforms import BorderWeightMapd, LabelsToTargetd, LoadSectiond, border_weight_map

# two cells touching along column 3|4, a third one apart, background elsewhere
IDS = np.array([
    [1, 1, 1, 1, 2, 2, 0, 0],
    [1, 1, 1, 1, 2, 2, 0, 3],
    [1, 1, 1, 1, 2, 2, 0, 3],
])
TWO = np.array([  # 0: background and the boundary between touching instances, 1: interior
    [1, 1, 1, 0, 0, 1, 0, 0],
    [1, 1, 1, 0, 0, 1, 0, 1],
    [1, 1, 1, 0, 0, 1, 0, 1],
])
THREE = np.array([  # 0 background, 1 boundary (next to another id or the background), 2 interior
    [2, 2, 2, 1, 1, 1, 0, 0],
    [2, 2, 2, 1, 1, 1, 0, 1],
    [2, 2, 2, 1, 1, 1, 0, 1],
])


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_instance_targets_by_hand_in_every_integer_dtype(dtype):
    classes, cells = instance_targets(IDS.astype(dtype), 2)
    assert np.array_equal(classes, TWO) and np.array_equal(cells, np.where(TWO == 1, IDS, 0))
    classes, cells = instance_targets(IDS.astype(dtype), 3)
    assert np.array_equal(classes, THREE) and np.array_equal(cells, np.where(THREE == 2, IDS, 0))


def test_instance_targets_in_3d_and_with_huge_ids():
    ids = np.zeros((3, 4, 4), np.uint64)
    ids[:2] = 2**40  # one object in sections 0-1, another in section 2: they touch across z
    ids[2] = 7
    classes, _ = instance_targets(ids, 2)
    assert classes[:, 0, 0].tolist() == [1, 0, 0] and classes[1:].sum() == 0  # both faces of the z contact
    assert touching(ids).sum() == 32 and touching(ids, background=True).sum() == 32


def test_cells_separated_by_membranes_give_exactly_the_binary_mask():
    """ISBI's convention: instance ids of cells with membranes 0 between them give, with 2 classes, the
    binary mask and the weight map of the binary mode (whose cells are the mask's components)."""
    from pipeline.synthetic import make_targets

    t = make_targets((96, 96), seed=3)
    classes, cells = instance_targets(t["cells"], 2)
    assert np.array_equal(classes, t["label"] > 0)
    assert np.allclose(weight_map(classes, cells), border_weight_map(t["label"] > 0), atol=1e-6)


def test_weight_map_of_touching_instances_uses_the_instances():
    # two touching instances: one connected component, yet two cells for eq. 2
    ids = np.zeros((5, 12), np.int64)
    ids[:, :6], ids[:, 6:] = 4, 9
    classes, cells = instance_targets(ids, 2)
    w = weight_map(classes, cells, w0=10, sigma=5, class_balance=False)
    assert w[2, 5] == pytest.approx(1 + 10 * math.exp(-(1 + 2) ** 2 / 50))  # 1 px to cell 4, 2 px to cell 9's interior
    assert np.allclose(border_weight_map(ids > 0, class_balance=False), 1.0)  # as one component: no border term


def test_weight_map_balances_three_classes():
    classes = np.array([0] * 6 + [1] * 3 + [2] * 1)
    w = weight_map(classes, None)
    assert w.tolist() == pytest.approx([10 / 18] * 6 + [10 / 9] * 3 + [10 / 3])
    assert w.mean() == pytest.approx(1.0)


def test_class_indices_by_value_list_and_mapping():
    values = np.array([[0, 128, 255], [255, 0, 128]], np.uint8)
    assert class_indices(values, 3, [0, 128, 255]).tolist() == [[0, 1, 2], [2, 0, 1]]
    assert class_indices(values, 2, {0: 0, 128: 1, 255: 1}).tolist() == [[0, 1, 1], [1, 0, 1]]
    assert class_indices(np.array([2, 0, 1], np.uint16), 3).tolist() == [2, 0, 1]


@pytest.mark.parametrize("dtype", ["<u8", ">u8", "<u4", ">u2", ">i4", "<f4", ">f8"])
def test_load_section_reads_every_dtype_and_byte_order(tmp_path, dtype):
    """CREMI stores neuron ids as uint64, which TIFF readers return as numpy.ulonglong (torch refused it);
    big-endian arrays (NRRD, some TIFFs) too."""
    values = (np.arange(2 * 6 * 5).reshape(2, 6, 5) * 3).astype(dtype)
    path = tmp_path / "lab.tif"
    tifffile.imwrite(path, values)
    out = LoadSectiond("label")({"label": str(path), "slice": 1})["label"]
    assert out.shape == (1, 6, 5) and np.array_equal(out[0].numpy(), values[1])


def test_labels_to_target_and_weight_map_transforms():
    d = {"label": torch.from_numpy(IDS.astype(np.int32))[None]}
    out = BorderWeightMapd("label", w0=10, sigma=5, class_balance=False)(LabelsToTargetd("label", "instances", 3)(d))
    assert out["label"].dtype == torch.float32 and np.array_equal(out["label"][0].numpy(), THREE)
    assert "cells" not in out  # used by the weight map, then dropped
    expected = weight_map(THREE, np.where(THREE == 2, IDS, 0), 10, 5, False)
    assert np.allclose(out["weight"][0].numpy(), expected)
    binary = LabelsToTargetd("label")({"label": torch.tensor([[[0, 255], [255, 255]]], dtype=torch.uint8)})
    assert binary["label"].tolist() == [[[0.0, 1.0], [1.0, 1.0]]]


@pytest.mark.slow
@pytest.mark.parametrize("mode, dtype, num_classes", [("instances", np.uint64, 2), ("instances", np.uint32, 3), ("classes", np.uint8, 4)])
def test_train_on_instance_ids_and_classes_through_the_cli(tmp_path, mode, dtype, num_classes):
    """The issue's cases: a CREMI-style stack of uint64 (and uint32) neuron ids and a label of classes 0-3
    train through the bundle; the network has one output per class and TensorBoard a Dice per class."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import FEATURES_ARG, bundle, train_args
    from pipeline.synthetic import make_targets, to_uint8

    stack = make_targets((4, 96, 96), seed=1)
    if mode == "instances":
        label = stack["cells"].astype(dtype) * (2**33 if dtype == np.uint64 else 1)  # CREMI-like: large uint64 ids
    else:
        label = (stack["classes"] + (stack["classes"] == 0) * 3 * (np.arange(96) > 60)).astype(dtype)  # 0-3
    assert len(np.unique(label)) > (10 if mode == "instances" else 3)
    tifffile.imwrite(tmp_path / "stack.tif", to_uint8(stack["image"]), photometric="minisblack")  # 4 pages, not RGBA
    tifffile.imwrite(tmp_path / "labels.tif", label, photometric="minisblack")
    proc = bundle(*train_args(tmp_path, "--features", FEATURES_ARG, "--num_epochs", "1", "--val_interval", "1", "--patch_size", "[188,188]",
                              "--images", str(tmp_path / "stack.tif"), "--labels", str(tmp_path / "labels.tif"),
                              "--val_slices", "[3,4]", "--label_mode", mode, "--num_classes", str(num_classes),
                              "--loss_name", "weighted_ce"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "models" / "model_final.pt", weights_only=True)
    assert state["head.weight"].shape[0] == num_classes
    events = EventAccumulator(str(tmp_path / "eval"))
    events.Reload()
    names = {2: ["membrane", "interior"], 3: ["background", "boundary", "interior"], 4: [f"class_{k}" for k in range(4)]}
    assert {f"val_dice_{n}" for n in names[num_classes]} <= set(events.Tags()["scalars"])
