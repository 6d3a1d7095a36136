"""Containers (HDF5, zarr v2/v3, OME-Zarr) through every path, and metadata kept per format.

The reference is the same stack as a plain TIFF: every container path must give the same prediction.
"""

from __future__ import annotations

import csv
from pathlib import Path

import h5py
import json
import re
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
from pipeline.transforms import LoadSectiond

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


# ---------------------------------------------------------------- missing data: one rule in every reading path
HOLES = {  # kind: (the unit's name in the message, units in all)
    "zarr2-dot": ("1.0.1 (array index (1, 0, 1))", "8 chunks"),
    "zarr2-slash": ("1/0/1 (array index (1, 0, 1))", "8 chunks"),
    "zarr3": ("c/1/0/1 (array index (1, 0, 1))", "8 chunks"),
    "zarr3-sharded": ("c/1/0/0 (array index (1, 0, 0))", "2 shards"),
    "n5": ("1/0/1 (array index (1, 0, 1))", "8 chunks"),
    "hdf5": ("the chunk at (1, 0, 22) (array index (1, 0, 1))", "8 chunks"),
}


def holey(tmp, kind):
    """A (2, 40, 44) volume (values 1..) in chunks (1, 20, 22) (shards (1, 40, 44)) of ``kind`` whose unit at array index
    (1, 0, 1) (the shard (1, 0, 0)) is not stored; returns ``(path, key, what the readers give with the hole: 0 there)``."""
    volume = np.arange(1, 2 * 40 * 44 + 1, dtype=np.float32).reshape(2, 40, 44)
    hole = (1, slice(0, 40), slice(None)) if kind == "zarr3-sharded" else (1, slice(0, 20), slice(22, 44))
    expected = volume.copy()
    expected[hole] = 0
    if kind == "hdf5":
        path, key = tmp / "holey.h5", "raw"
        with h5py.File(path, "w") as f:
            dataset = f.create_dataset(key, shape=volume.shape, chunks=(1, 20, 22), dtype="float32")
            dataset[0], dataset[1, 20:], dataset[1, :20, :22] = volume[0], volume[1, 20:], volume[1, :20, :22]  # one chunk never written
        return path, key, expected
    if kind == "n5":
        write_n5_by_hand(tmp / "holey.n5", "raw", volume, block=(1, 20, 22), resolution_xyz=[1.0, 1.0, 1.0])
        (tmp / "holey.n5" / "raw" / "1" / "0" / "1").unlink()  # x 1, y 0, z 1 (N5 lists x first)
        return tmp / "holey.n5", "raw", expected
    options = {"zarr2-dot": {"zarr_format": 2}, "zarr2-slash": {"zarr_format": 2, "chunk_key_encoding": {"name": "v2", "separator": "/"}},
               "zarr3": {}, "zarr3-sharded": {"shards": (1, 40, 44)}}[kind]
    path = tmp / f"{kind}.zarr"
    array = zarr.create_array(str(path), shape=volume.shape, chunks=(1, 20, 22), dtype="float32", fill_value=0, **options)
    array[...] = volume
    (path / HOLES[kind][0].split(" ")[0]).unlink()
    return path, None, expected


@pytest.mark.parametrize("kind", list(HOLES))
def test_missing_chunks_are_refused_alike_by_every_reading_path(tmp_path, kind):
    """Whole-file reading (inference in memory, training and evaluation datalists), the pre-flight check and block-by-block
    reading refuse a dataset with a chunk (shard) not stored, naming it; allow_missing_chunks=True reads the fill value there."""
    from pipeline.engine import ReadSettings
    from pipeline.engine.files import check_file
    from pipeline.io.containers import check_stored

    path, key, expected = holey(tmp_path, kind)
    name, units = HOLES[kind]
    where = re.escape(path.name + (f" dataset '{key}'" if key else ""))
    pattern = rf"{where}: 1 of {units} are missing from the (zarr array|N5 dataset|HDF5 dataset), e.g\. {re.escape(name)};.*" \
              r"fill value \(0(\.0)?\).*pass allow_missing_chunks=True to read them as the fill value"
    net = UNet(features=FEATURES)
    readers = {
        "read_image": lambda: read_image(path, key=key),
        "check_stored": lambda: check_stored(path, key),
        "check_file (in memory, pre-flight)": lambda: check_file(net, str(path), ReadSettings(), key),
        "LoadSectiond": lambda: LoadSectiond(keys="image")({"image": str(path), "image_dataset": key}),
        "streaming": lambda: LazySource(path, 2, 1, key=key).check_complete(),
        "datalists": lambda: paired_items(path, path, image_key=key, label_key=key),
    }
    messages = {}
    for what, read in readers.items():
        with pytest.raises(ValueError, match=pattern) as err:
            read()
        messages[what] = str(err.value)
    assert len(set(messages.values())) == 1, messages  # one rule, one message
    array, _ = read_image(path, key=key, allow_missing_chunks=True)
    assert np.array_equal(array, expected)
    check_file(net, str(path), ReadSettings(allow_missing_chunks=True), key)
    loaded = LoadSectiond(keys="image", allow_missing_chunks=True)({"image": str(path), "image_dataset": key})["image"]
    assert np.array_equal(loaded.numpy()[0], expected)
    lazy = LazySource(path, 2, 1, key=key)
    assert np.array_equal(lazy.read((slice(0, 2), slice(0, 40), slice(0, 44)))[0], expected)
    assert len(paired_items(path, path, image_key=key, label_key=key, allow_missing_chunks=True)) == 2


def test_missing_chunks_in_memory_as_streaming_and_blank_chunks_written_or_nan_filled(tmp_path):
    """In memory and streaming refuse alike before any output, and with allow_missing_chunks predict the same values: those
    of the volume with zeros in the hole. The writers store blank chunks (no false holes); holes of a NaN-filled array read
    as NaN, left to the non-finite rule (fill_nan)."""
    from pipeline.engine import ReadSettings, predict_files
    from pipeline.streaming import predict_files as stream_files

    path, _, expected = holey(tmp_path, "zarr2-slash")
    net = UNet(features=FEATURES)
    with pytest.raises(ValueError, match=r"zarr2-slash.zarr: 1 of 8 chunks are missing .* e\.g\. 1/0/1"):
        predict_files(net, [str(path)], tmp_path / "memory")
    with pytest.raises(ValueError, match=r"zarr2-slash.zarr: 1 of 8 chunks are missing .* e\.g\. 1/0/1"):
        stream_files(net, [str(path)], tmp_path / "stream")
    assert not (tmp_path / "memory").exists() and not (tmp_path / "stream").exists()
    [files] = predict_files(net, [str(path)], tmp_path / "memory", reading=ReadSettings(allow_missing_chunks=True))
    [store] = stream_files(net, [str(path)], tmp_path / "stream", allow_missing_chunks=True, export=None)
    write_image(expected, tmp_path / "filled.tif")
    [want] = predict_files(net, [str(tmp_path / "filled.tif")], tmp_path / "want")
    memory, _ = read_image(files["probabilities"])
    np.testing.assert_array_equal(memory, read_image(want["probabilities"])[0])
    assert np.abs(zarr.open_group(str(store), mode="r")["probabilities"][...] - memory).max() <= 1e-5

    blank = np.zeros((2, 300, 40), np.float32)
    blank[0] = 1  # section 1 blank: its chunks equal the fill value, and are stored all the same
    for suffix in (".zarr", ".n5"):
        write_image(blank, tmp_path / f"blank{suffix}")
        assert np.array_equal(read_image(tmp_path / f"blank{suffix}")[0], blank)

    nan = zarr.create_array(str(tmp_path / "nan.zarr"), shape=(2, 40, 44), chunks=(1, 20, 22), dtype="float32", fill_value=np.nan)
    nan[...] = 1.0
    (tmp_path / "nan.zarr" / "c" / "1" / "0" / "1").unlink()
    array, _ = read_image(tmp_path / "nan.zarr")
    assert np.isnan(array[1, :20, 22:]).all() and (array[1, 20:] == 1).all()
    with pytest.raises(ValueError, match=r"nan.zarr has 440 non-finite pixel\(s\) \(NaN or Inf\) of 3520, the first at \(z, y, x\) \(1, 0, 22\) in section\(s\) 1 \(440\); pass fill_nan=True"):
        predict_files(net, [str(tmp_path / "nan.zarr")], tmp_path / "nan")


@pytest.mark.slow
def test_cli_in_memory_refuses_a_missing_shard_and_predicts_it_with_allow_missing_chunks(data, tmp_path):
    """The bundle in memory: a zarr v3 array with a missing shard is refused before any output (in the bundle's words);
    --allow_missing_chunks true predicts the hole from the fill value, as the library does."""
    from pipeline.engine import ReadSettings, predict_files

    tmp, *_ = data
    path, _, expected = holey(tmp_path, "zarr3-sharded")
    proc = infer(tmp, path, tmp_path / "out")
    assert proc.returncode != 0
    assert re.search(r"zarr3-sharded.zarr: 1 of 2 shards are missing from the zarr array, e\.g\. c/1/0/0 .*pass "
                     r"--allow_missing_chunks true to read them as the fill value", proc.stderr.splitlines()[-1])
    assert not (tmp_path / "out").exists()
    proc = infer(tmp, path, tmp_path / "out", "--allow_missing_chunks", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    net = UNet(features=FEATURES)
    net.load_state_dict(torch.load(tmp / "model.pt"))
    write_image(expected, tmp_path / "filled.tif")
    [want] = predict_files(net, [str(tmp_path / "filled.tif")], tmp_path / "want", reading=ReadSettings())
    np.testing.assert_allclose(read_image(tmp_path / "out/probabilities/zarr3-sharded.zarr")[0],
                               read_image(want["probabilities"])[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- axis names from the file's own metadata
def _axistags(keys):
    flags = {"c": 1, "t": 8}
    return json.dumps({"axes": [{"key": k, "typeFlags": flags.get(k, 2), "resolution": 0, "description": ""} for k in keys]})


def _named(tmp, fmt, names, stored):
    """``stored`` written as one dataset of ``fmt`` whose metadata names its axes ``names`` (C order, as the array is read)."""
    if fmt == "ilastik-h5":
        with h5py.File(tmp / "a.h5", "w") as f:
            f["data"] = stored
            f["data"].attrs["axistags"] = _axistags(names)
        return tmp / "a.h5"
    if fmt in ("zarr3-dimension_names", "zarr2-xarray"):
        v3 = fmt.startswith("zarr3")
        array = zarr.create_array(str(tmp / "a.zarr"), shape=stored.shape, dtype=stored.dtype, zarr_format=3 if v3 else 2,
                                  dimension_names=list(names) if v3 else None)
        array[...] = stored
        if not v3:
            array.attrs["_ARRAY_DIMENSIONS"] = list(names)  # xarray's convention
        return tmp / "a.zarr"
    block = tmp / "a.n5" / "data" / Path(*["0"] * stored.ndim)  # one block of any rank, from the spec
    block.parent.mkdir(parents=True)
    (tmp / "a.n5" / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
    header = struct.pack(">HH", 0, stored.ndim) + struct.pack(f">{stored.ndim}I", *stored.shape[::-1])
    block.write_bytes(header + stored.astype(stored.dtype.newbyteorder(">")).tobytes())  # x fastest: C order
    attrs_file = tmp / "a.n5" / "data" / "attributes.json"
    attrs = {"dimensions": list(stored.shape[::-1]), "blockSize": list(stored.shape[::-1]), "dataType": stored.dtype.name,
             "compression": {"type": "raw"}}
    if fmt == "n5-axes":  # n5-ij / N5 "axes": x first
        attrs["axes"] = list(names)[::-1]
    elif fmt == "n5-imagej":  # Fiji's N5 export: dimensions x, y[, c][, z][, t]
        sizes = dict(zip(names, stored.shape))
        attrs.update(numChannels=sizes.get("c", 1), numSlices=sizes.get("z", 1), numFrames=sizes.get("t", 1), pixelWidth=1.0)
    else:  # ilastik's N5 export: axistags in the array's (C) order
        attrs["axistags"] = _axistags(names)
    attrs_file.write_text(json.dumps(attrs))
    return tmp / "a.n5"


AXES = [  # format, names (C order), stored shape, planned shape, planned letters, stored -> planned
    ("ilastik-h5", "yxc", (96, 96, 3), (96, 96, 3), "YXC", lambda a: a),  # the file: not 96 sections of 96 x 3
    ("ilastik-h5", "cyx", (3, 40, 44), (40, 44, 3), "YXC", lambda a: np.moveaxis(a, 0, -1)),
    ("ilastik-h5", "zyx", (5, 40, 44), (5, 40, 44), "ZYX", lambda a: a),
    ("ilastik-h5", "tzyxc", (1, 4, 40, 44, 1), (4, 40, 44), "ZYX", lambda a: a[0, ..., 0]),
    ("ilastik-h5", "xyz", (44, 40, 5), (5, 40, 44), "ZYX", lambda a: a.transpose(2, 1, 0)),
    ("zarr3-dimension_names", "cyx", (3, 40, 44), (40, 44, 3), "YXC", lambda a: np.moveaxis(a, 0, -1)),
    ("zarr2-xarray", ["y", "x", "channel"], (40, 44, 2), (40, 44, 2), "YXC", lambda a: a),
    ("zarr3-dimension_names", ["dim_0", "dim_1", "dim_2"], (5, 40, 44), (5, 40, 44), "ZYX", lambda a: a),  # not axis names: unnamed
    ("n5-axes", "cyx", (3, 40, 44), (40, 44, 3), "YXC", lambda a: np.moveaxis(a, 0, -1)),
    ("n5-axes", "zyx", (5, 40, 44), (5, 40, 44), "ZYX", lambda a: a),
    ("n5-imagej", "zcyx", (4, 2, 40, 44), (4, 40, 44, 2), "ZYXC", lambda a: np.moveaxis(a, 1, -1)),
    ("n5-imagej", "tyx", (3, 40, 44), (3, 40, 44), "TYX", lambda a: a),
    ("n5-ilastik", "cyx", (3, 40, 44), (40, 44, 3), "YXC", lambda a: np.moveaxis(a, 0, -1)),
]


@pytest.mark.parametrize("fmt, names, stored_shape, planned, letters, plan", AXES)
def test_axis_names_from_container_metadata_in_memory_and_streaming(tmp_path, fmt, names, stored_shape, planned, letters, plan):
    """ilastik axistags, zarr dimension names, N5 axes and Fiji's N5 attributes name the axes, read by the one axis rule:
    in memory and block by block alike (a 3-channel network reads the channels, a 1-channel network is refused alike)."""
    from pipeline.io import channel_first
    from pipeline.io.containers import dataset_plan, open_dataset

    stored = np.arange(np.prod(stored_shape), dtype=np.uint16).reshape(stored_shape)
    path = _named(tmp_path, fmt, names, stored)
    array, meta = read_image(path)
    assert array.shape == planned and np.array_equal(array, plan(stored))
    opened, info = open_dataset(path)
    assert dataset_plan(opened, info, path).axes == letters
    if isinstance(opened, h5py.Dataset):
        opened.file.close()
    channels = planned[-1] if letters.endswith("C") else 1
    assert probe_image(path).channels == channels and probe_image(path).shape == planned
    first, _ = channel_first(array, meta, path, rgb_to_grey=True)  # channels, not colour: never mixed
    assert first.shape[0] == channels
    lazy = LazySource(path, 2, channels)
    box = tuple(slice(1, n - 1) for n in lazy.spatial)
    assert np.array_equal(lazy.read(box), first[(slice(None), *box)])
    if channels > 1:
        from pipeline.engine import ReadSettings
        from pipeline.engine.files import check_file

        with pytest.raises(ValueError) as memory:
            check_file(UNet(features=FEATURES), str(path), ReadSettings(rgb_to_grey=True))
        with pytest.raises(ValueError) as streaming:
            LazySource(path, 2, 1, rgb_to_grey=True)
        assert str(memory.value) == str(streaming.value)
        assert f"has {channels} channel(s)" in str(memory.value) and "rgb_to_grey=True applies to RGB colour only" in str(memory.value)


def test_ome_zarr_channels_are_colour_only_when_marked_red_green_blue(tmp_path):
    """An OME-Zarr image's c of 3 is colour (rgb_to_grey takes its luminance) when its omero channels are red, green and
    blue (bioformats2raw's colour slides); without that mark its channels are refused for a 1-channel network."""
    rgb = np.random.default_rng(0).integers(0, 255, (3, 40, 44), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", np.moveaxis(rgb, 0, -1), photometric="rgb")
    for marked in (True, False):
        group = zarr.open_group(str(tmp_path / f"{marked}.ome.zarr"), mode="w")
        group.create_array("0", shape=rgb.shape, dtype="uint8")[...] = rgb
        group.attrs["multiscales"] = [{"version": "0.4", "axes": ["c", "y", "x"], "datasets": [{"path": "0"}]}]
        if marked:
            group.attrs["omero"] = {"channels": [{"color": c, "label": n} for c, n in zip(("FF0000", "00FF00", "0000FF"), "RGB")]}
    grey = LoadSectiond(keys="image", rgb_to_grey=True)({"image": str(tmp_path / "True.ome.zarr")})["image"].numpy()
    assert np.array_equal(grey, LoadSectiond(keys="image", rgb_to_grey=True)({"image": str(tmp_path / "rgb.tif")})["image"].numpy())
    assert np.array_equal(LazySource(tmp_path / "True.ome.zarr", 2, 1, rgb_to_grey=True).read((slice(0, 40), slice(0, 44))), grey)
    with pytest.raises(ValueError, match=r"False.ome.zarr has 3 channel\(s\) .*channels by the file's own metadata \(axis C\)"):
        LazySource(tmp_path / "False.ome.zarr", 2, 1, rgb_to_grey=True)
