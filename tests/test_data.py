"""Datalists from stacks, folders and volumes; section loading; errors before training."""

import nibabel as nib
import numpy as np
import pytest
import tifffile

from pipeline.data import datalist_from_path, make_datalists
from pipeline.io import write_image
from pipeline.transforms import LoadSectiond


def _stack(z=6, y=5, x=7):
    return np.arange(z * y * x, dtype=np.uint8).reshape(z, y, x)


def test_stack_pair_sections_and_contiguous_validation(tmp_path):
    img, lab = _stack(), (_stack() % 2 * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "vol.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    train, val = make_datalists(tmp_path / "vol.tif", tmp_path / "lab.tif", val_slices=[4, 6])
    assert [d["slice"] for d in train] == [0, 1, 2, 3] and [d["slice"] for d in val] == [4, 5]
    item = LoadSectiond(["image", "label"])(val[1])
    assert item["image"].shape == (1, 5, 7)
    assert np.array_equal(item["image"][0].numpy(), img[5]) and np.array_equal(item["label"][0].numpy(), lab[5])
    assert item["image"].meta["slice"] == 5


def test_nifti_volume_sections_along_last_axis(tmp_path):
    img = _stack()  # (z, y, x)
    nib.save(nib.Nifti1Image(img.transpose(2, 1, 0), np.eye(4)), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image((img.transpose(2, 1, 0) > 100).astype(np.uint8), np.eye(4)), tmp_path / "l.nii.gz")
    train, val = make_datalists(tmp_path / "v.nii.gz", tmp_path / "l.nii.gz", val_slices=[5, 6])
    assert len(train) == 5 and val[0]["slice"] == 5
    section = LoadSectiond(["image"])(val[0])["image"][0].numpy()
    assert np.array_equal(section, img[5])  # section 5 of nibabel's z axis, in (y, x) as TIFF sections
    # the one read path: the whole volume (inference) has the same sections in the same orientation
    whole = LoadSectiond(["image"])({"image": str(tmp_path / "v.nii.gz")})["image"]
    assert whole.shape == (1, 6, 5, 7) and np.array_equal(whole[0].numpy(), img) and whole.meta["axes_reversed"]


def test_folders_matched_by_name_and_split_by_file(tmp_path):
    for name in ("a", "b", "c"):
        write_image(_stack()[0], tmp_path / "img" / f"{name}.png")
        write_image((_stack()[0] > 10).astype(np.uint8) * 255, tmp_path / "lab" / f"{name}.tif")
    train, val = make_datalists(tmp_path / "img", tmp_path / "lab", val_files=1)
    assert [d["image"][-5:] for d in train] == ["a.png", "b.png"] and val[0]["label"].endswith("c.tif")
    assert "slice" not in train[0]
    loaded = LoadSectiond(["image"])(train[0])["image"]
    assert loaded.shape == (1, 5, 7) and np.array_equal(loaded[0].numpy(), _stack()[0])


def test_errors_name_the_problem(tmp_path):
    tifffile.imwrite(tmp_path / "vol.tif", _stack())
    tifffile.imwrite(tmp_path / "lab.tif", _stack(z=5))
    with pytest.raises(ValueError, match=r"vol.tif has shape \(6, 5, 7\) but its label .*lab.tif has \(5, 5, 7\)"):
        make_datalists(tmp_path / "vol.tif", tmp_path / "lab.tif")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files .* in image folder .*empty"):
        make_datalists(tmp_path / "empty", tmp_path / "lab.tif")
    for name in ("a", "b"):
        write_image(_stack()[0], tmp_path / "i" / f"{name}.png")
    write_image(_stack()[0], tmp_path / "l" / "a.png")
    write_image(_stack()[0], tmp_path / "l" / "z.png")
    with pytest.raises(ValueError, match=r"no label for \['b.png'\]; no image for \['z.png'\]"):
        make_datalists(tmp_path / "i", tmp_path / "l")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="bad.tif"):
        make_datalists(tmp_path / "bad.tif", tmp_path / "bad.tif")
    with pytest.raises(ValueError, match="leaves no training data"):
        tifffile.imwrite(tmp_path / "lab6.tif", _stack())
        make_datalists(tmp_path / "vol.tif", tmp_path / "lab6.tif", val_slices=[0, 6])
    with pytest.raises(ValueError, match=r"val_slices \[20, 25\] select no section of the stacks in .*vol.tif: their sections are 0..5; give --val_slices"):
        make_datalists(tmp_path / "vol.tif", tmp_path / "lab6.tif", val_slices=[20, 25])
    with pytest.raises(ValueError, match=r"val_slices \[0, 1\] select no section .*: it holds 2D images only, which have no sections; give --val_files"):
        make_datalists(tmp_path / "i", tmp_path / "i", val_slices=[0, 1])
    with pytest.raises(FileNotFoundError, match="input path not found"):
        datalist_from_path(tmp_path / "nope")
