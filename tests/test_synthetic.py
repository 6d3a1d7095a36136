"""Tests of the synthetic EM generator (pipeline.synthetic).

Reference numbers, measured on ISBI 2012 train-labels / train-volume (25 x 512 x 512
here): membrane (label 0) fraction 0.224; mean intensity under membrane 0.33, under interior
0.54 (difference 0.20); adjacent sections' labels agree on 72% of pixels, membrane IoU
0.23-0.31 (unrelated sections: ~65%, ~0.13). Synthetic at the defaults, 256 x 256,
seeds 0-39: membrane fraction mean 0.232 (0.147-0.274); interior minus membrane mean
intensity 0.205 (min 0.133); default stacks: adjacent agreement 0.73, IoU 0.29 (other
seed: 0.63, 0.13).
"""

import json
import os

import numpy as np
import pytest
import tifffile

from pipeline import synthetic
from pipeline.synthetic import OWNER_FILE, make_image, make_stack, to_uint8, write_dataset

ISBI_MEMBRANE_FRACTION = 0.224


def _membrane_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a == 0, b == 0
    return (a & b).sum() / (a | b).sum()


@pytest.fixture(scope="module")
def samples():
    return [make_image((256, 256), seed) for seed in range(8)]


def test_same_seed_is_bit_identical_and_seeds_differ():
    image, label = make_image((96, 128), seed=3)
    image2, label2 = make_image((96, 128), seed=3)
    assert np.array_equal(image, image2) and np.array_equal(label, label2)
    other, other_label = make_image((96, 128), seed=4)
    assert not np.array_equal(image, other) and not np.array_equal(label, other_label)


def test_no_global_random_state_is_used():
    state = np.random.get_state()
    make_image((32, 32), seed=0)
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]


@pytest.mark.parametrize("shape", [(256, 256), (100, 37), (1, 1), (7, 300)])
def test_dtypes_shapes_and_ranges(shape):
    image, label = make_image(shape, seed=1)
    assert image.shape == label.shape == shape
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert set(np.unique(label)) <= {0, 255}


def test_labels_are_exactly_0_and_255(samples):
    for _, label in samples:
        assert set(np.unique(label).tolist()) == {0, 255}


def test_membrane_fraction_is_isbi_like(samples):
    fractions = [np.mean(label == 0) for _, label in samples]
    assert abs(np.mean(fractions) - ISBI_MEMBRANE_FRACTION) < 0.05
    assert all(0.12 < f < 0.35 for f in fractions), fractions


def test_membranes_are_darker_than_interiors(samples):
    for image, label in samples:  # measured: mean 0.205, min 0.133 over seeds 0-39 (ISBI: 0.205)
        assert image[label == 255].mean() - image[label == 0].mean() > 0.12


def test_dark_blobs_overlap_membrane_intensity():
    """Organelles put interior pixels in the membranes' intensity range (ISBI: 9.1%, here ~6%)."""

    def overlap(**params):
        image, label = make_image((256, 256), seed=5, **params)
        return np.mean(image[label == 255] < np.median(image[label == 0]))

    with_blobs, without = overlap(), overlap(blob_density=0.0)
    assert with_blobs > 0.03 and with_blobs > 1.5 * without


def test_parameters_change_the_output():
    _, big = make_image((256, 256), seed=2, cell_diameter=100.0)
    _, thin = make_image((256, 256), seed=2, membrane_thickness=(2.0, 3.0))
    _, default = make_image((256, 256), seed=2)
    assert np.mean(big == 0) < np.mean(default == 0)
    assert np.mean(thin == 0) < np.mean(default == 0)


def test_stack_dtypes_determinism_and_coherence():
    image, label = make_stack((4, 256, 256), seed=0)
    assert image.shape == label.shape == (4, 256, 256)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.min() >= 0 and image.max() <= 1 and set(np.unique(label).tolist()) == {0, 255}
    again = make_stack((4, 256, 256), seed=0)
    assert np.array_equal(image, again[0]) and np.array_equal(label, again[1])
    _, other = make_stack((4, 256, 256), seed=100)
    adjacent = [np.mean(label[i] == label[i + 1]) for i in range(3)]
    unrelated = [np.mean(label[i] == other[i]) for i in range(4)]
    # default z_step (ISBI-like 50 nm sections): seeds 0-9 gave agreement 0.73 vs 0.63, IoU 0.29 vs 0.13
    assert np.mean(adjacent) > np.mean(unrelated) + 0.05
    assert np.mean([_membrane_iou(label[i], label[i + 1]) for i in range(3)]) > 0.22
    assert np.mean([_membrane_iou(label[i], other[i]) for i in range(4)]) < 0.18
    _, close = make_stack((3, 256, 256), seed=0, z_step=5.0)  # thin sections: ~0.89 agreement
    assert min(np.mean(close[i] == close[i + 1]) for i in range(2)) > 0.85
    assert np.mean(close == 0) == pytest.approx(np.mean(label == 0), abs=0.06)


def test_write_dataset_round_trip_and_reuse(tmp_path):
    datalist = write_dataset(tmp_path / "ds", n_images=3, shape=(64, 80), seed=7)
    assert [sorted(entry) for entry in datalist] == [["image", "label"]] * 3
    for i, entry in enumerate(datalist):
        assert isinstance(entry["image"], str) and entry["image"].endswith(f"images/img_{i:03d}.tif")
        assert entry["label"].endswith(f"labels/img_{i:03d}.tif")
        image, label = make_image((64, 80), seed=7 + i)
        stored_image, stored_label = tifffile.imread(entry["image"]), tifffile.imread(entry["label"])
        assert stored_image.dtype == np.uint8 and np.array_equal(stored_image, to_uint8(image))
        assert stored_label.dtype == np.uint8 and np.array_equal(stored_label, label)
    files = [p for entry in datalist for p in entry.values()] + [str(tmp_path / "ds" / "manifest.json")]
    mtimes = {p: os.stat(p).st_mtime_ns for p in files}
    assert write_dataset(tmp_path / "ds", n_images=3, shape=(64, 80), seed=7) == datalist
    assert {p: os.stat(p).st_mtime_ns for p in files} == mtimes  # nothing rewritten
    assert not list((tmp_path / "ds").rglob("*.tmp"))


def test_write_dataset_regenerates_on_change(tmp_path):
    root = tmp_path / "ds"
    write_dataset(root, n_images=3, shape=(48, 48), seed=0)
    first = tifffile.imread(root / "images" / "img_001.tif")
    smaller = write_dataset(root, n_images=2, shape=(48, 48), seed=0)
    assert len(smaller) == 2 and not (root / "images" / "img_002.tif").exists()  # stale file removed
    assert np.array_equal(tifffile.imread(smaller[1]["image"]), first)  # image i uses seed + i
    (root / "labels" / "img_000.tif").unlink()  # a missing file triggers regeneration
    write_dataset(root, n_images=2, shape=(48, 48), seed=0)
    assert (root / "labels" / "img_000.tif").exists()
    shifted = write_dataset(root, n_images=2, shape=(48, 48), seed=1)
    assert np.array_equal(tifffile.imread(shifted[0]["image"]), first)


def test_write_dataset_manifest_records_version(tmp_path):
    write_dataset(tmp_path, n_images=1, shape=(32, 32), seed=0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["generator_version"] == synthetic.GENERATOR_VERSION
    assert manifest["n_images"] == 1 and manifest["shape"] == [32, 32] and manifest["seed"] == 0


@pytest.mark.parametrize("shape", [(256,), (8, 256, 256), (0, 64), (-1, 64), (64.0, 64), "64x64", 64, None])
def test_make_image_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"make_image: shape must be 2 positive ints \(Y, X\)"):
        make_image(shape)


@pytest.mark.parametrize("shape", [(256, 256), (0, 64, 64), (2, 64, 64, 1), (2.5, 64, 64)])
def test_make_stack_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match=r"make_stack: shape must be 3 positive ints \(Z, Y, X\)"):
        make_stack(shape)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"membrane_thickness": (8.0, 3.0)}, "membrane_thickness"),
        ({"membrane_thickness": 4.0}, "membrane_thickness"),
        ({"cell_diameter": 0.0}, "cell_diameter"),
        ({"noise": -0.1}, "noise"),
    ],
)
def test_bad_parameters_raise(params, message):
    with pytest.raises(ValueError, match=message):
        make_image((32, 32), **params)
    with pytest.raises(ValueError, match="z_step"):
        make_stack((2, 32, 32), z_step=0.0)


def test_write_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_images"):
        write_dataset(tmp_path, n_images=0)
    with pytest.raises(ValueError, match=r"shape must be 2 positive ints \(Y, X\), e.g. \(256, 256\), or 3 \(Z, Y, X\)"):
        write_dataset(tmp_path, n_images=1, shape=(4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"shape must be 3 positive ints \(Z, Y, X\)"):
        write_dataset(tmp_path, n_images=1, shape=(4, 0, 4))


# ------------------------------------------------------------------ the synthetic cache folder
def test_synthetic_writer_claims_only_its_own_folders(tmp_path):
    write_dataset(tmp_path / "new", n_images=2, shape=(32, 32))
    assert (tmp_path / "new" / OWNER_FILE).is_file()
    legacy = tmp_path / "legacy"  # written before the owner mark existed: its manifest proves it
    write_dataset(legacy, n_images=3, shape=(32, 32))
    (legacy / OWNER_FILE).unlink()
    items = write_dataset(legacy, n_images=2, shape=(32, 32))
    assert len(items) == 2 and (legacy / OWNER_FILE).is_file() and not (legacy / "images" / "img_002.tif").exists()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "manifest.json").write_text('{"mine": 1}')
    with pytest.raises(FileExistsError, match=r"user' holds files that the synthetic-data writer did not make \(manifest.json\)"):
        write_dataset(tmp_path / "user", n_images=1, shape=(32, 32))
    assert sorted(p.name for p in (tmp_path / "user").iterdir()) == ["manifest.json"]
