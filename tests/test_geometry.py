import pytest

from pipeline.geometry import UNetGeometry, crop_slices

PAPER = UNetGeometry()


def test_paper_sizes():
    assert PAPER.output_size(572) == (388,)
    assert PAPER.output_size(188) == (4,)
    assert PAPER.output_size((700, 1084)) == (516, 900)
    assert PAPER.input_size(388) == (572,)
    assert PAPER.margin == 92
    assert PAPER.min_input_size == 188
    assert PAPER.step == 16


def test_valid_sizes_are_16k_plus_124():
    valid = [s for s in range(1, 1200) if PAPER.is_valid(s)]
    assert valid == [16 * k + 124 for k in range(4, 68)]
    assert all(PAPER.output_size(s) == (s - 184,) for s in valid)


def test_invalid_size_names_neighbours():
    with pytest.raises(ValueError, match=r"axis 1: 573 \(nearest valid: 572 or 588\)"):
        PAPER.check_input_size((572, 573))
    with pytest.raises(ValueError, match=r"100 \(nearest valid: 188 \(the smallest\)\)"):
        PAPER.output_size(100)
    with pytest.raises(ValueError, match="nearest reachable output sizes: \\[388, 404\\]"):
        PAPER.input_size(390)


def test_3d_anisotropic_and_other_depths():
    g3 = UNetGeometry(depth=3)
    assert g3.margin == 44 and g3.min_input_size == 92 and g3.step == 8
    assert g3.output_size((92, 100, 132)) == (4, 12, 44)
    assert UNetGeometry(depth=2).output_size((44, 48, 60)) == (4, 8, 20)
    assert UNetGeometry(depth=1, convs_per_level=3, kernel_size=5).margin == 24  # 12 + 2 * 12 + 12 lost per axis
    same = UNetGeometry(padding="same")
    assert same.margin == 0 and same.output_size((37, 5)) == (37, 5) and same.is_valid(1)


def test_nearest_valid_input_size():
    assert PAPER.nearest_valid_input_size((573, 10)) == (588, 188)
    assert PAPER.nearest_valid_input_size(573, round_up=False) == (572,)
    assert PAPER.valid_neighbours(572) == (572, 572)


def test_bad_parameters():
    with pytest.raises(ValueError, match="padding must be one of \\('valid', 'same'\\)"):
        UNetGeometry(padding="full")
    with pytest.raises(ValueError, match="odd"):
        UNetGeometry(kernel_size=4)


def test_crop_slices_on_arange():
    import numpy as np

    a = np.arange(7 * 9).reshape(7, 9)
    c = a[crop_slices(a.shape, (3, 5))]
    assert c.tolist() == [[20, 21, 22, 23, 24], [29, 30, 31, 32, 33], [38, 39, 40, 41, 42]]
    with pytest.raises(ValueError, match="larger"):
        crop_slices((3,), (4,))
