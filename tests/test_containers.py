"""Containers (HDF5, zarr v2/v3, OME-Zarr) through every path, and metadata kept per format.

The reference is the same stack as a plain TIFF: every container path must give the same prediction.
"""

from __future__ import annotations

import csv

import h5py
import json
import struct

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch
import zarr

from pipeline.data import make_datalists, paired_items
from pipeline.io import probe_image, read_image, write_image
from pipeline.io.lazy import LazySource
from pipeline.networks import UNet
from pipeline.synthetic import make_stack, to_uint8

from conftest import EVALUATE, FEATURES, INFER, bundle


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("containers")
    torch.manual_seed(0)
    torch.save(UNet(features=FEATURES).state_dict(), tmp / "model.pt")
    image, label = make_stack((3, 60, 70), seed=2)
    raw, lab = to_uint8(image), (label * 255).astype(np.uint8)
    tifffile.imwrite(tmp / "stack.tif", raw, photometric="minisblack")
    tifffile.imwrite(tmp / "labels.tif", lab, photometric="minisblack")
    with h5py.File(tmp / "sample.h5", "w") as f:  # CREMI / pytorch-3dunet style
        f["raw"] = raw
        f["raw"].attrs["resolution"] = [40.0, 4.0, 4.0]
        f["labels"] = lab
    zarr.create_array(str(tmp / "v3.zarr"), shape=raw.shape, dtype="uint8", chunks=(1, 32, 32))[...] = raw
    zarr.create_array(str(tmp / "v2.zarr"), shape=raw.shape, dtype="uint8", chunks=(1, 32, 32), zarr_format=2)[...] = raw
    group = zarr.open_group(str(tmp / "img.ome.zarr"), mode="w", zarr_format=2)  # NGFF 0.4: t, c, z, y, x
    group.create_array("0", shape=(1, 1, *raw.shape), dtype="uint8")[...] = raw[None, None]
    axes = [{"name": n, "type": t} for n, t in zip("tczyx", ("time", "channel", "space", "space", "space"))]
    group.attrs["multiscales"] = [{"version": "0.4", "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 40.0, 4.0, 4.0]}]}]}]
    write_n5_by_hand(tmp / "sample.n5", "volumes/raw", raw, block=(1, 32, 32), resolution_xyz=[4.0, 4.0, 40.0])
    proc = infer(tmp, tmp / "stack.tif", tmp / "ref")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference, _ = read_image(tmp / "ref/probabilities/stack.tif")
    return tmp, raw, lab, reference


def write_n5_by_hand(path, key, array, block, resolution_xyz):
    """An N5 dataset written from the spec (not by the library that reads it): ``dimensions`` and
    ``blockSize`` x first, raw blocks of a big-endian header (mode 0, ndim, block dims x first) and the
    block's big-endian values with x fastest; edge blocks truncated."""
    (path / key).mkdir(parents=True)
    (path / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
    (path / key / "attributes.json").write_text(json.dumps({
        "dimensions": list(array.shape[::-1]), "blockSize": list(block[::-1]), "dataType": array.dtype.name,
        "compression": {"type": "raw"}, "resolution": resolution_xyz}))
    grid = [range(0, n, b) for n, b in zip(array.shape, block)]
    for z0 in grid[0]:
        for y0 in grid[1]:
            for x0 in grid[2]:
                piece = array[z0 : z0 + block[0], y0 : y0 + block[1], x0 : x0 + block[2]]
                where = path / key / str(x0 // block[2]) / str(y0 // block[1])
                where.mkdir(parents=True, exist_ok=True)
                header = struct.pack(">HH", 0, 3) + struct.pack(">III", *piece.shape[::-1])
                (where / str(z0 // block[0])).write_bytes(header + piece.astype(array.dtype.newbyteorder(">")).tobytes())


def infer(tmp, input_path, out, *extra):
    return bundle("run", "--config_file", INFER, "--checkpoint", str(tmp / "model.pt"), "--input_path", str(input_path),
                  "--output_dir", str(out), *extra)


def test_reading_containers_names_axes_and_spacing(data):
    tmp, raw, lab, _ = data
    with pytest.raises(ValueError, match=r"sample.h5 holds 2 datasets \('labels', 'raw'\); name the one to read: key=<name> \(image_key=<name>"):
        read_image(tmp / "sample.h5")
    with pytest.raises(ValueError, match=r"sample.h5 has no dataset 'volumes/raw'; it holds 'labels', 'raw'"):
        read_image(tmp / "sample.h5", key="volumes/raw")
    array, meta = read_image(tmp / "sample.h5", key="raw")
    assert np.array_equal(array, raw) and list(meta["spacing"]) == [40.0, 4.0, 4.0] and meta["dataset"] == "raw"
    for store in ("v3.zarr", "v2.zarr"):
        assert np.array_equal(read_image(tmp / store)[0], raw)
    array, meta = read_image(tmp / "sample.n5")  # its only dataset, volumes/raw; N5's x-first order reversed
    assert np.array_equal(array, raw) and list(meta["spacing"]) == [40.0, 4.0, 4.0] and meta["dataset"] == "volumes/raw"
    lazy = LazySource(tmp / "sample.n5", 2, 1)
    assert np.array_equal(lazy.read((slice(1, 3), slice(5, 40), slice(30, 70))), raw[None, 1:3, 5:40, 30:70])
    array, meta = read_image(tmp / "img.ome.zarr")  # t and c of size 1 dropped, the scale read
    assert np.array_equal(array, raw) and list(meta["spacing"]) == [40.0, 4.0, 4.0]
    assert probe_image(tmp / "img.ome.zarr").shape == raw.shape and probe_image(tmp / "sample.h5", key="labels").dtype == np.uint8


@pytest.mark.parametrize("suffix", [".h5", ".zarr", ".n5"])
def test_container_round_trip(tmp_path, suffix):
    array = np.random.default_rng(0).random((2, 9, 11)).astype(np.float32)
    write_image(array, tmp_path / f"out{suffix}", meta={"spacing": [30.0, 5.0, 5.0], "dataset": "probabilities"})
    back, meta = read_image(tmp_path / f"out{suffix}")
    assert np.array_equal(back, array) and list(meta["spacing"]) == [30.0, 5.0, 5.0] and meta["dataset"] == "probabilities"
    with pytest.raises(FileExistsError):
        write_image(array, tmp_path / f"out{suffix}")
    write_image(array * 2, tmp_path / f"out{suffix}", meta={"dataset": "probabilities"}, overwrite=True)
    assert np.array_equal(read_image(tmp_path / f"out{suffix}")[0], array * 2)


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("sample.h5", ["--input_key", "raw"]), ("v3.zarr", []), ("v2.zarr", []), ("img.ome.zarr", []), ("sample.n5", []),
])
def test_cli_predicts_containers_in_memory_as_the_tiff(data, tmp_path, name, extra):
    tmp, raw, _, reference = data
    proc = infer(tmp, tmp / name, tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    suffix = "." + name.split(".")[-1]
    stem = name.split(".")[0]
    prob, meta = read_image(tmp_path / f"probabilities/{stem}{suffix}")
    mask, _ = read_image(tmp_path / f"masks/{stem}{suffix}")
    assert prob.shape == raw.shape and np.abs(prob - reference).max() <= 1e-5
    assert np.array_equal(mask, (prob > 0.5).astype(np.uint8) * 255)
    assert meta["dataset"] == "probabilities"
    if name != "v3.zarr" and name != "v2.zarr":  # the input's spacing goes with the output
        assert list(meta["spacing"]) == [40.0, 4.0, 4.0]


@pytest.mark.slow
def test_cli_container_without_key_is_refused_before_any_output_and_streaming_reads_it(data, tmp_path):
    tmp, raw, _, reference = data
    proc = infer(tmp, tmp / "sample.h5", tmp_path / "none")
    assert proc.returncode != 0 and "holds 2 datasets ('labels', 'raw')" in proc.stderr.splitlines()[-1]
    assert not (tmp_path / "none").exists()
    proc = infer(tmp, tmp / "sample.h5", tmp_path / "s", "--input_key", "raw", "--streaming", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    group = zarr.open_group(str(tmp_path / "s/sample.zarr"), mode="r")
    assert np.abs(group["probabilities"][...] - reference).max() <= 1e-5
    assert group.attrs["streaming"]["settings"]["source"]["dataset"] == "raw"
    exported, meta = read_image(tmp_path / "s/sample.h5", key="probabilities")  # --export auto: the input's kind
    assert np.array_equal(exported, group["probabilities"][...]) and list(meta["spacing"]) == [40.0, 4.0, 4.0]
    assert np.array_equal(read_image(tmp_path / "s/sample.h5", key="mask")[0], group["mask"][...])


@pytest.mark.slow
def test_cli_evaluates_images_and_labels_of_one_hdf5_file_as_the_tiffs(data, tmp_path):
    tmp, *_ = data
    reports = {}
    for name, args in {
        "tiff": ["--images", str(tmp / "stack.tif"), "--labels", str(tmp / "labels.tif")],
        "h5": ["--images", str(tmp / "sample.h5"), "--labels", str(tmp / "sample.h5"), "--image_key", "raw", "--label_key", "labels"],
    }.items():
        proc = bundle("run", "--config_file", EVALUATE, "--checkpoint", str(tmp / "model.pt"), "--output_dir", str(tmp_path / name), *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[name] = [{k: v for k, v in row.items() if k != "file"} for row in csv.DictReader(open(tmp_path / name / "report.csv"))]
    assert len(reports["tiff"]) == 4 and reports["h5"] == reports["tiff"]  # 3 sections and the mean


def test_datalists_from_containers_and_mixed_formats(data, tmp_path):
    tmp, raw, lab, _ = data
    train, val = make_datalists(tmp / "sample.h5", tmp / "sample.h5", val_slices=[2, 3], image_key="raw", label_key="labels")
    assert [i["slice"] for i in train] == [0, 1] and val[0]["image_dataset"] == "raw" and val[0]["label_dataset"] == "labels"
    import nibabel as nib  # a NIfTI image pairs with a TIFF label: shapes compared in the pipeline's (z, y, x)

    nib.save(nib.Nifti1Image(raw.transpose(2, 1, 0), np.eye(4)), tmp_path / "stack.nii.gz")
    assert len(paired_items(tmp_path / "stack.nii.gz", tmp / "labels.tif")) == 3


@pytest.mark.slow
def test_cli_keeps_origin_and_direction_of_simpleitk_formats(data, tmp_path):
    tmp, raw, *_ = data
    for suffix in (".mha", ".nrrd"):
        image = sitk.GetImageFromArray(raw)
        image.SetSpacing((4.0, 5.0, 40.0))
        image.SetOrigin((1.0, 2.0, 3.0))
        image.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
        sitk.WriteImage(image, str(tmp_path / f"vol{suffix}"))
        proc = infer(tmp, tmp_path / f"vol{suffix}", tmp_path / suffix[1:])
        assert proc.returncode == 0, proc.stderr[-3000:]
        for what in ("probabilities", "masks"):
            out = sitk.ReadImage(str(tmp_path / suffix[1:] / what / f"vol{suffix}"))
            assert out.GetOrigin() == (1.0, 2.0, 3.0) and out.GetSpacing() == (4.0, 5.0, 40.0)
            assert out.GetDirection() == (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


@pytest.mark.slow
def test_grey_saved_as_rgb_is_grey_and_jpeg_outputs_go_to_tiff(data, tmp_path):
    """A grey image saved as RGB (R = G = B) predicts as the grey one; a JPEG section's outputs are TIFF."""
    tmp, raw, *_ = data
    sitk.WriteImage(sitk.GetImageFromArray(raw[1]), str(tmp_path / "grey.png"))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([raw[1]] * 3, -1), isVector=True), str(tmp_path / "grey_rgb.png"))
    sitk.WriteImage(sitk.GetImageFromArray(raw[1]), str(tmp_path / "sec.jpg"))
    for name in ("grey.png", "grey_rgb.png", "sec.jpg"):
        proc = infer(tmp, tmp_path / name, tmp_path / "out")
        assert proc.returncode == 0, proc.stderr[-3000:]
    grey, _ = read_image(tmp_path / "out/probabilities/grey.tif")
    as_rgb, _ = read_image(tmp_path / "out/probabilities/grey_rgb.tif")
    assert grey.shape == raw[1].shape and np.array_equal(grey, as_rgb)
    assert (tmp_path / "out/masks/grey_rgb.png").is_file()
    jpeg, _ = read_image(tmp_path / "out/probabilities/sec.tif")  # JPEG is lossy: close to, not equal to, the PNG's
    assert jpeg.shape == raw[1].shape and (tmp_path / "out/masks/sec.tif").is_file()
    assert np.mean(np.abs(jpeg - grey)) < 0.05


@pytest.mark.slow
def test_fill_nan_predicts_around_no_data_in_memory_and_streaming(data, tmp_path):
    """--fill_nan true: NaN pixels are left out of the section statistics, predicted as the section mean,
    and written as probability NaN / mask 0; elsewhere the prediction is the one of the filled image."""
    tmp, raw, *_ = data
    stack = raw.astype(np.float32)
    stack[1, :20, :30] = np.nan
    tifffile.imwrite(tmp_path / "aligned.tif", stack, photometric="minisblack")
    for out, extra in (("mem", []), ("stream", ["--streaming", "true"])):
        proc = infer(tmp, tmp_path / "aligned.tif", tmp_path / out, "--fill_nan", "true", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    prob, _ = read_image(tmp_path / "mem/probabilities/aligned.tif")
    mask, _ = read_image(tmp_path / "mem/masks/aligned.tif")
    streamed = zarr.open_group(str(tmp_path / "stream/aligned.zarr"), mode="r")
    nodata = np.isnan(stack)
    assert np.isnan(prob[nodata]).all() and np.isfinite(prob[~nodata]).all() and (mask[nodata] == 0).all()
    assert np.isnan(streamed["probabilities"][...][nodata]).all() and (streamed["mask"][...][nodata] == 0).all()
    assert np.nanmax(np.abs(streamed["probabilities"][...] - prob)) <= 1e-5
    # the filled image: section 1 normalised on its finite pixels, no-data at its mean
    filled = stack.copy()
    filled[1][nodata[1]] = np.nanmean(stack[1])
    tifffile.imwrite(tmp_path / "filled.tif", filled, photometric="minisblack")
    proc = infer(tmp, tmp_path / "filled.tif", tmp_path / "filled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    want, _ = read_image(tmp_path / "filled/probabilities/filled.tif")
    assert np.abs(prob[0] - want[0]).max() <= 1e-5 and np.abs(prob[2] - want[2]).max() <= 1e-5


def test_ome_tiff_physical_sizes_round_trip(tmp_path):
    array = (np.random.default_rng(1).random((3, 20, 24)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "other.ome.tif", array, ome=True,  # as a microscope's software writes it
                     metadata={"axes": "ZYX", "PhysicalSizeX": 2.0, "PhysicalSizeY": 3.0, "PhysicalSizeZ": 50.0})
    back, meta = read_image(tmp_path / "other.ome.tif")
    assert np.array_equal(back, array) and list(meta["spacing"]) == [50.0, 3.0, 2.0]
    write_image(back, tmp_path / "ours.ome.tif", meta=meta)
    with tifffile.TiffFile(tmp_path / "ours.ome.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "ZYX"
    again, meta = read_image(tmp_path / "ours.ome.tif")
    assert np.array_equal(again, array) and list(meta["spacing"]) == [50.0, 3.0, 2.0]


def test_container_edge_cases_from_the_trial(tmp_path):
    """An OME-Zarr level typed as a number; ilastik's (Z, Y, X, 1); an OME-TIFF input keeps its kind;
    streaming names the formats it reads."""
    from pipeline.io.containers import choose_dataset
    from pipeline.streaming import predict_zarr
    from pipeline.engine import file_targets

    group = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w")
    for level, size in (("0", 20), ("1", 10)):
        group.create_array(level, shape=(2, size, size), dtype="uint8")[...] = int(level) + 1
    group.attrs["multiscales"] = [{"version": "0.4", "axes": ["z", "y", "x"], "datasets": [{"path": "0"}, {"path": "1"}]}]
    assert choose_dataset(tmp_path / "img.ome.zarr", 1) == "1"  # MONAI parses --input_key 1 as an int
    assert read_image(tmp_path / "img.ome.zarr", key=1)[0].shape == (2, 10, 10)
    with h5py.File(tmp_path / "ilastik.h5", "w") as f:
        f["data"] = np.arange(2 * 5 * 6, dtype=np.uint8).reshape(2, 5, 6, 1)
    array, _ = read_image(tmp_path / "ilastik.h5")
    assert array.shape == (2, 5, 6) and probe_image(tmp_path / "ilastik.h5").shape == (2, 5, 6)
    targets = file_targets(str(tmp_path / "a.ome.tif"), tmp_path / "out", ("probabilities", "mask"))
    assert [p.name for p in targets.values()] == ["a.ome.tif", "a.ome.tif"]
    write_image(np.zeros((5, 6), np.uint8), tmp_path / "s.png")
    with pytest.raises(ValueError, match=r"s.png: block-by-block prediction reads TIFF, HDF5, N5 and zarr / OME-Zarr, not .png"):
        predict_zarr(UNet(features=FEATURES), str(tmp_path / "s.png"), tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()


def test_review_findings_spacing_of_dropped_axes_and_nan_in_a_later_streaming_input(tmp_path):
    """(Z, Y, X, 1) with a 3-value resolution keeps (Z, Y, X) spacing; a NaN in the second of two streaming
    inputs is refused before the first output exists."""
    from pipeline.streaming import predict_files

    with h5py.File(tmp_path / "ilastik.h5", "w") as f:
        f["data"] = np.zeros((2, 5, 6, 1), np.uint8)
        f["data"].attrs["resolution"] = [40.0, 4.0, 5.0]
    array, meta = read_image(tmp_path / "ilastik.h5")
    assert array.shape == (2, 5, 6) and list(meta["spacing"]) == [40.0, 4.0, 5.0]
    good = np.random.default_rng(0).random((2, 40, 44)).astype(np.float32)
    bad = good.copy()
    bad[1, 3, 4] = np.nan
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", good, photometric="minisblack")
    tifffile.imwrite(tmp_path / "in" / "b.tif", bad, photometric="minisblack")
    with pytest.raises(ValueError, match=r"b.tif has 1 non-finite pixel\(s\) \(NaN or Inf\) of 3520 in section\(s\) 1 \(1\); pass fill_nan=True"):
        predict_files(UNet(features=FEATURES), [str(tmp_path / "in" / n) for n in ("a.tif", "b.tif")], tmp_path / "out")
    assert not (tmp_path / "out").exists()
