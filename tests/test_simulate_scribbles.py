"""Tests for scripts/simulate_scribbles.py: dense labels -> seeded strokes at a fraction of the pixels.

Hand-checkable bands (a straight membrane whose midline is known) and synthetic EM sections
(pipeline.synthetic) with their true classes and cell instances.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi
from skimage.measure import regionprops
from skimage.morphology import skeletonize

from pipeline.synthetic import make_stack, make_targets

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "simulate_scribbles.py"


def _load_script():
    name = "simulate_scribbles"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


ss = _load_script()


@pytest.fixture(scope="module")
def section():
    """A synthetic 256 x 256 EM section: ``(classes, cells)``, class 0 = membrane, 1 = cell (ISBI order)."""
    targets = make_targets((256, 256), seed=3)
    return ss.classes_from_binary(targets["label"]), targets["cells"]


def _band(height: int, width: int, top: int, thickness: int) -> np.ndarray:
    """Class map: a horizontal membrane (class 0) in rows ``top .. top + thickness - 1``, cell (class 1) elsewhere."""
    classes = np.ones((height, width), np.uint8)
    classes[top : top + thickness] = 0
    return classes


def _brush_mask(width: int) -> np.ndarray:
    offsets = ss.brush(width)
    mask = np.zeros((width, width), bool)
    mask[offsets[:, 0] + (width - 1) // 2, offsets[:, 1] + (width - 1) // 2] = True
    return mask


# --- the parts ---------------------------------------------------------------------------------------------

def test_brush_is_a_disk_width_px_across():
    assert [len(ss.brush(w)) for w in (1, 2, 3, 4, 5)] == [1, 4, 9, 12, 21]
    assert sorted(map(tuple, ss.brush(3).tolist())) == [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert _brush_mask(5).tolist() == [[False, True, True, True, False]] + [[True] * 5] * 3 + [[False, True, True, True, False]]


def test_class_shares_are_equal_in_pixels_and_water_filled():
    assert ss.class_shares([500, 500], 101).tolist() == [51, 50]
    assert ss.class_shares([10, 1000], 100).tolist() == [10, 90]  # the small class gives all it has
    assert ss.class_shares([10, 1000, 30], 300).tolist() == [10, 260, 30]
    assert ss.class_shares([3, 4], 100).tolist() == [3, 4]  # more than there is: everything


def test_classes_from_binary_follows_isbi_convention():
    label = np.array([[0, 255], [255, 0]], np.uint8)  # 0 = membrane, 255 = cell interior
    assert ss.classes_from_binary(label).tolist() == [[0, 1], [1, 0]]
    assert ss.classes_from_binary(np.array([0, 1, 1]), foreground_value=1).tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match=r"also holds \[3\]"):
        ss.classes_from_binary(np.array([0, 3, 255]))


# --- the strokes on hand-checkable bands ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_membrane_stroke_on_a_band_covers_its_midline_three_px_wide(seed):
    # membrane rows 18..22 (midline 20), 64 columns; 1% of 2560 px = 26, 13 per class
    classes = _band(40, 64, 18, 5)
    scribbles = ss.simulate_scribbles(classes, 0.01, seed, width=3)
    membrane = scribbles == 1
    assert 5 <= membrane.sum() <= 13
    # skeletonize bends the midline in the band's last columns; away from the ends every scribbled column is
    # exactly the 3 px centred on the midline
    for column in range(3, 60):
        assert np.flatnonzero(membrane[:, column]).tolist() in ([], [19, 20, 21]), column
    assert np.all(classes[scribbles > 0] == scribbles[scribbles > 0] - 1)


def test_wider_brush_on_a_thicker_band():
    classes = _band(48, 64, 18, 9)  # membrane rows 18..26, midline 22
    scribbles = ss.simulate_scribbles(classes, 0.02, 5, width=5)
    rows, columns = np.nonzero(scribbles[:, 4:60] == 1)
    assert rows.size and set(rows.tolist()) == {20, 21, 22, 23, 24}
    assert np.bincount(columns).max() == 5


@pytest.mark.parametrize("dtype", [bool, np.int8, np.uint16, np.int64, np.uint64])
def test_any_integer_dtype_gives_the_same_scribbles(dtype):
    classes = _band(40, 64, 18, 5)
    np.testing.assert_array_equal(ss.simulate_scribbles(classes.astype(dtype), 0.05, 3),
                                  ss.simulate_scribbles(classes, 0.05, 3))


def test_fraction_one_labels_every_pixel_with_its_class(section):
    classes, _ = section
    np.testing.assert_array_equal(ss.simulate_scribbles(classes, 1.0, 0), classes + 1)


# --- the strokes on synthetic EM -------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.005, 0.02, 0.10])
def test_every_scribble_is_true_and_the_fraction_is_met(section, fraction):
    classes, _ = section
    scribbles = ss.simulate_scribbles(classes, fraction, 7)
    assert scribbles.dtype == np.uint8 and scribbles.shape == classes.shape
    labelled = scribbles > 0
    np.testing.assert_array_equal(scribbles[labelled] - 1, classes[labelled])
    target = round(fraction * classes.size)
    shares = ss.class_shares(np.bincount(classes.ravel()), target)
    got = np.bincount(scribbles.ravel(), minlength=3)[1:]
    brush = len(ss.brush(3))
    assert np.all((shares - brush < got) & (got <= shares)), (got, shares)  # each class within one brush below
    assert abs(labelled.sum() / target - 1) <= 0.10
    assert got[0] > 0 and got[1] > 0


def test_three_classes_each_get_an_equal_share():
    targets = make_targets((256, 256), seed=3)
    classes = targets["classes"]  # 0 = cytoplasm, 1 = membrane, 2 = mitochondrion
    counts = np.bincount(classes.ravel(), minlength=3)
    assert counts.min() > 1000
    scribbles = ss.simulate_scribbles(classes, 0.03, 0, num_classes=3)
    labelled = scribbles > 0
    np.testing.assert_array_equal(scribbles[labelled] - 1, classes[labelled])
    got = np.bincount(scribbles.ravel(), minlength=4)[1:]
    shares = ss.class_shares(counts, round(0.03 * classes.size))
    assert shares.tolist() == [655, 655, 656]  # 1966 px: the smallest class is served first and rounds up
    assert np.all((shares - 9 < got) & (got <= shares)), (got, shares)


@pytest.mark.parametrize("width", [3, 5])
def test_strokes_are_width_px_wide(section, width):
    classes, _ = section
    scribbles = ss.simulate_scribbles(classes, 0.02, 0, width=width)
    for value in (1, 2):
        mask = scribbles == value
        # every scribbled pixel lies in a whole brush of scribbles, and nothing is wider than width + 1
        np.testing.assert_array_equal(ndi.binary_opening(mask, _brush_mask(width)), mask)
        assert not ndi.binary_erosion(mask, np.ones((width + 2, width + 2), bool)).any()
        # thickness across a stroke, 2 * (distance from its middle to its edge) - 1: width (3.47 on diagonals for 3)
        components, n = ndi.label(mask, np.ones((3, 3)))
        depth = ndi.maximum(ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1], components, np.arange(1, n + 1))
        assert width <= np.median(2 * np.asarray(depth) - 1) <= width + 0.5


def test_membrane_strokes_run_along_the_membrane_midline(section):
    classes, _ = section
    scribbles = ss.simulate_scribbles(classes, 0.02, 1)
    membrane = scribbles == 1
    midline = skeletonize(classes == 0)
    # a membrane stroke is the 3 x 3 brush moved along the midline
    assert not (membrane & ~ndi.binary_dilation(midline, np.ones((3, 3), bool))).any()
    lengths = [r.major_axis_length for r in regionprops(ndi.label(membrane, np.ones((3, 3)))[0])]
    assert len(lengths) >= 3 and np.median(lengths) >= 4 * 3  # strokes, not dots


def test_cell_strokes_never_cross_a_membrane(section):
    classes, _ = section
    scribbles = ss.simulate_scribbles(classes, 0.02, 2)
    regions, _ = ndi.label(classes == 1, np.ones((3, 3)))  # the cell class's connected regions
    components, n = ndi.label(scribbles == 2, np.ones((3, 3)))
    assert n >= 5
    for i in range(1, n + 1):
        assert np.unique(regions[components == i]).size == 1
    # on the band: strokes above it and below it, none touching both
    classes = _band(40, 64, 18, 5)
    scribbles = ss.simulate_scribbles(classes, 0.2, 0)
    components, n = ndi.label(scribbles == 2, np.ones((3, 3)))
    assert scribbles[:18].any() and scribbles[23:].any()
    for i in range(1, n + 1):
        rows = np.nonzero(components == i)[0]
        assert rows.max() < 18 or rows.min() > 22


def test_seeded_and_section_by_section():
    _, label = make_stack((3, 96, 96), seed=11)
    classes = ss.classes_from_binary(label)
    first = ss.simulate_scribbles(classes, 0.05, 4)
    np.testing.assert_array_equal(first, ss.simulate_scribbles(classes, 0.05, 4))
    assert (first != ss.simulate_scribbles(classes, 0.05, 5)).any()
    assert (first[0] != first[1]).any()
    only = ss.simulate_scribbles(classes, 0.05, 4, sections=[2])
    np.testing.assert_array_equal(only[2], first[2])  # a section's scribbles do not depend on the others
    assert not only[:2].any()
    np.testing.assert_array_equal(ss.simulate_scribbles(classes[0], 0.05, 4), first[0])  # an image is section 0


# --- bad input -----------------------------------------------------------------------------------------------

_GOOD = _band(40, 64, 18, 5)
_BAD = {
    "fraction zero": (dict(fraction=0.0), r"fraction must be in \(0, 1\]"),
    "fraction negative": (dict(fraction=-0.1), r"fraction must be in \(0, 1\]"),
    "fraction above one": (dict(fraction=1.5), r"fraction must be in \(0, 1\]"),
    "fraction nan": (dict(fraction=float("nan")), r"fraction must be in \(0, 1\]"),
    "fraction a percent string": (dict(fraction="2%"), r"fraction must be in \(0, 1\]"),
    "seed negative": (dict(seed=-1), r"seed must be an int >= 0"),
    "width zero": (dict(width=0), r"width must be an int >= 1"),
    "width float": (dict(width=2.5), r"width must be an int >= 1"),
    "length zero": (dict(length=0), r"length must be > 0"),
    "float label": (dict(classes=_GOOD.astype(np.float32)), r"integer array of class indices.*float32"),
    "negative class": (dict(classes=_GOOD.astype(np.int8) - 1), r"class indices 0\.\.N-1 \(>= 0\), got values in -1\.\.0"),
    "binary 0/255 label": (dict(classes=_GOOD * np.uint8(255)), r"at most 255 classes.*classes_from_binary"),
    "gap in the classes": (dict(classes=_GOOD * np.uint8(2)), r"class 1 has no pixels in the image"),
    "class above num_classes": (dict(classes=_GOOD * np.uint8(2), num_classes=2), r"class indices in 0\.\.1.*foreground_value"),
    "one class": (dict(classes=np.zeros((8, 8), np.uint8)), r"at least 2 classes"),
    "class with no pixels": (dict(classes=np.ones((8, 8), np.uint8), num_classes=2), r"class 0 has no pixels in the image"),
    "4D label": (dict(classes=_GOOD[None, None]), r"\(Y, X\) image or \(Z, Y, X\) stack"),
    "section out of range": (dict(classes=_GOOD[None], sections=[1]), r"section indices must be in 0\.\.0"),
}


@pytest.mark.parametrize("case", list(_BAD), ids=list(_BAD))
def test_bad_input_is_refused(case):
    change, message = _BAD[case]
    kwargs = dict(classes=_GOOD, fraction=0.02, seed=0) | change
    with pytest.raises(ValueError, match=message):
        ss.simulate_scribbles(**kwargs)


def test_a_stack_section_without_a_class_is_named():
    classes = np.stack([_GOOD, np.ones_like(_GOOD)])
    with pytest.raises(ValueError, match=r"class 0 has no pixels in section 1"):
        ss.simulate_scribbles(classes, 0.02, 0)


# --- the command line --------------------------------------------------------------------------------------------

def test_cli_writes_an_imagej_tiff_of_the_labels_shape(tmp_path):
    _, label = make_stack((3, 96, 96), seed=11)  # uint8, 0 = membrane, 255 = cell
    tifffile.imwrite(tmp_path / "labels.tif", label, imagej=True)
    out = tmp_path / "out" / "scribbles.tif"
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "labels.tif"), str(out), "--fraction", "0.05",
                          "--seed", "4", "--sections", "1:3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    with tifffile.TiffFile(out) as tif:
        assert tif.is_imagej
        scribbles = tif.asarray()
    assert scribbles.shape == (3, 96, 96) and scribbles.dtype == np.uint8
    assert set(np.unique(scribbles).tolist()) == {0, 1, 2}
    expected = ss.simulate_scribbles(ss.classes_from_binary(label), 0.05, 4, sections=[1, 2])
    np.testing.assert_array_equal(scribbles, expected)
    assert not scribbles[0].any()
    rows = [line.split() for line in run.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == ["1", "2"]
    for row, z in zip(rows, (1, 2)):
        per = np.bincount(expected[z].ravel(), minlength=3) / expected[z].size
        assert [float(v) for v in row[1:]] == pytest.approx([1 - per[0], per[1], per[2]], abs=5e-5)


def test_cli_class_index_label_and_its_refusals(tmp_path):
    classes = make_targets((96, 96), seed=2)["classes"]  # all three classes present
    tifffile.imwrite(tmp_path / "classes.tif", classes)
    out = tmp_path / "scribbles.tif"
    ok = ss.main([str(tmp_path / "classes.tif"), str(out), "--num_classes", "3", "--width", "1"])
    assert ok == 0
    np.testing.assert_array_equal(tifffile.imread(out), ss.simulate_scribbles(classes, 0.02, 0, 1, num_classes=3))
    # the same label read as binary 0/255 is refused with a pointer to --num_classes
    run = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "classes.tif"), str(tmp_path / "x.tif")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "give num_classes" in run.stderr and not (tmp_path / "x.tif").exists()
    assert ss.main([str(tmp_path / "classes.tif"), str(tmp_path / "x.tif"), "--num_classes", "3", "--fraction", "0"]) == 2
    assert ss.main([str(tmp_path / "classes.tif"), str(tmp_path / "x.tif"), "--num_classes", "3", "--sections", "0:1"]) == 2
    assert not (tmp_path / "x.tif").exists()
