"""Tests for pipeline.io: MONAI readers for TIFF stacks / SimpleITK formats and atomic writers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from monai.data import PILReader
from monai.transforms import EnsureChannelFirst, LoadImage

from pipeline.io import (
    SUPPORTED_SUFFIXES,
    SimpleITKReader,
    TiffStackReader,
    read_image,
    write_folder,
    write_image,
)
from pipeline.io.outputs import check_outputs

SPACING = (2.5, 0.37, 0.25)  # (z, y, x), anisotropic like serial-section EM


def _stack(dtype, shape=(5, 12, 17), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


def _no_temp_left(directory) -> bool:
    return not [p for p in directory.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("suffix", [".tif", ".nii.gz", ".mha", ".nrrd"])
def test_round_trip_exact_with_spacing(tmp_path, dtype, suffix):
    array = _stack(dtype)
    path = tmp_path / f"vol{suffix}"
    assert write_image(array, path, meta={"spacing": SPACING}) == path
    back, meta = read_image(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(meta["spacing"], SPACING, rtol=1e-6)
    assert meta["filename_or_obj"] == str(path)
    assert _no_temp_left(tmp_path)


def test_nifti_preserves_affine(tmp_path):
    affine = np.array([[0.0, 0.0, -0.25, 10.0], [0.0, 0.37, 0.0, -4.0], [2.5, 0.0, 0.0, 7.5], [0, 0, 0, 1]])
    array = _stack(np.float32)
    write_image(array, tmp_path / "vol.nii.gz", meta={"affine": affine})
    back, meta = read_image(tmp_path / "vol.nii.gz")
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(meta["affine"], affine, atol=1e-6)
    np.testing.assert_allclose(meta["spacing"], [2.5, 0.37, 0.25], rtol=1e-6)


def test_sitk_origin_direction_and_companion_files(tmp_path):
    array = _stack(np.int16)
    meta = {"spacing": SPACING, "origin": [1.0, 2.0, 3.0], "direction": np.eye(3)[[1, 0, 2]]}
    write_image(array, tmp_path / "vol.mhd", meta=meta)  # header + separate data file, both moved into place
    back, got = read_image(tmp_path / "vol.mhd")
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(got["origin"], meta["origin"])
    np.testing.assert_allclose(got["direction"], meta["direction"])
    assert _no_temp_left(tmp_path)


def test_loadimage_tiff_stack_vs_pilreader(tmp_path):
    pages = _stack(np.uint8, shape=(5, 12, 17))
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, pages)
    img = LoadImage(reader=TiffStackReader(), image_only=True)(path)
    assert tuple(img.shape) == (5, 12, 17)
    np.testing.assert_array_equal(img.numpy(), pages)
    # Why we need our reader: MONAI's PILReader silently returns only the first page (and transposed).
    pil = LoadImage(reader=PILReader(), image_only=True)(path)
    assert tuple(pil.shape) == (17, 12)
    np.testing.assert_array_equal(pil.numpy(), pages[0].T)
    # Registered by name, and picked automatically for .tif by a default LoadImage().
    for loader in (LoadImage(reader="TiffStackReader", image_only=True), LoadImage(image_only=True)):
        np.testing.assert_array_equal(loader(path).numpy(), pages)


def test_loadimage_tiff_channel_first_and_write_back(tmp_path):
    pages = _stack(np.uint16)
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    write_image(pages, src, meta={"spacing": SPACING})
    img = EnsureChannelFirst()(LoadImage(reader=TiffStackReader(), image_only=True)(src))
    assert tuple(img.shape) == (1, 5, 12, 17)
    write_image(img, dst)  # MetaTensor: singleton channel squeezed, its meta supplies spacing
    with tifffile.TiffFile(dst) as tif:
        assert len(tif.pages) == 5
        np.testing.assert_array_equal(tif.asarray(), pages)
    np.testing.assert_allclose(read_image(dst)[1]["spacing"], SPACING, rtol=1e-6)


def test_rgb_tiff_is_channel_last(tmp_path):
    rgb = _stack(np.uint8, shape=(12, 17, 3))
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    array, meta = read_image(tmp_path / "rgb.tif")
    assert array.shape == (12, 17, 3) and meta["original_channel_dim"] == -1
    assert tuple(meta["spatial_shape"]) == (12, 17)
    img = LoadImage(reader=TiffStackReader(), image_only=True, ensure_channel_first=True)(tmp_path / "rgb.tif")
    assert tuple(img.shape) == (3, 12, 17)
    write_image(array, tmp_path / "rgb2.tif", meta=meta)
    np.testing.assert_array_equal(read_image(tmp_path / "rgb2.tif")[0], rgb)


def test_appended_pages_are_one_stack(tmp_path):
    pages = _stack(np.uint8)
    for page in pages:
        tifffile.imwrite(tmp_path / "app.tif", page, append=True)  # one tifffile series per page
    np.testing.assert_array_equal(read_image(tmp_path / "app.tif")[0], pages)


def test_loadimage_simpleitk_mha(tmp_path):
    array = _stack(np.float32)
    write_image(array, tmp_path / "vol.mha", meta={"spacing": SPACING})
    img = EnsureChannelFirst()(LoadImage(reader=SimpleITKReader(), image_only=True)(tmp_path / "vol.mha"))
    assert tuple(img.shape) == (1, 5, 12, 17)
    np.testing.assert_array_equal(img[0].numpy(), array)
    np.testing.assert_allclose(img.meta["spacing"], SPACING, rtol=1e-6)
    np.testing.assert_allclose(img.pixdim, SPACING, rtol=1e-6)  # affine in array-axis order
    auto = LoadImage(image_only=True)(tmp_path / "vol.mha")  # registered, auto-selected by suffix
    np.testing.assert_array_equal(auto.numpy(), array)
    by_name = LoadImage(reader="SimpleITKReader", image_only=True, ensure_channel_first=True)(tmp_path / "vol.mha")
    write_image(by_name, tmp_path / "back.mha")  # MetaTensor in, channel squeezed, spacing kept
    back, meta = read_image(tmp_path / "back.mha")
    np.testing.assert_array_equal(back, array)
    np.testing.assert_allclose(meta["spacing"], SPACING, rtol=1e-6)


def test_png_folder_round_trip(tmp_path):
    stack = _stack(np.uint8, shape=(3, 12, 17))
    names = ["s1.png", "s2.png", "s10.png"]  # natural order, not lexicographic
    write_folder(stack, tmp_path / "in", names)
    array, meta = read_image(tmp_path / "in")
    np.testing.assert_array_equal(array, stack)
    assert meta["filenames"] == names
    write_image(array, f"{tmp_path / 'out'}/", meta=meta)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(names)
    np.testing.assert_array_equal(read_image(tmp_path / "out")[0], stack)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_folder(stack, tmp_path / "out", names)
    write_image(stack[0, :5], tmp_path / "out" / "s3.png")  # a slice of another shape
    with pytest.raises(ValueError, match="s3.png"):
        read_image(tmp_path / "out")


def test_overwrite_refusal_leaves_file_identical(tmp_path):
    path = tmp_path / "vol.tif"
    write_image(_stack(np.uint8), path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_image(_stack(np.uint8, seed=1), path)
    assert path.read_bytes() == before
    write_image(_stack(np.uint8, seed=1), path, overwrite=True)
    np.testing.assert_array_equal(read_image(path)[0], _stack(np.uint8, seed=1))
    assert _no_temp_left(tmp_path)


def test_failed_write_keeps_existing_file(tmp_path):
    path = tmp_path / "img.png"
    write_image(_stack(np.uint8, shape=(12, 17)), path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="png"):
        write_image(_stack(np.float64, shape=(12, 17)), path, overwrite=True)  # PNG cannot store float64
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="2D"):
        write_image(_stack(np.uint8), tmp_path / "stack.png")  # SimpleITK alone would keep slice 0 only
    assert _no_temp_left(tmp_path) and not (tmp_path / "stack.png").exists()


@pytest.mark.parametrize("imagej", [False, True])
def test_truncated_tiff_raises_value_error(tmp_path, imagej):
    full, cut = tmp_path / "full.tif", tmp_path / "cut.tif"
    tifffile.imwrite(full, _stack(np.uint8), imagej=imagej)
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{cut}.*TIFF"):
        read_image(cut)
    # Through LoadImage, pass the reader at call time or let it auto-select by suffix: with
    # LoadImage(reader=...) MONAI falls back to the other registered readers on error, and
    # SimpleITK/PIL then silently return the first page of the damaged file.
    for load in (lambda: LoadImage(image_only=True)(cut), lambda: LoadImage()(cut, reader=TiffStackReader())):
        with pytest.raises(ValueError, match="cut.tif"):
            load()


def test_corrupt_mha_and_missing_file(tmp_path):
    (tmp_path / "bad.mha").write_bytes(b"not an image" * 10)
    with pytest.raises(ValueError, match="bad.mha"):
        read_image(tmp_path / "bad.mha")
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        read_image(tmp_path / "missing.tif")


def test_unknown_suffix_lists_supported(tmp_path):
    with pytest.raises(ValueError, match="unsupported suffix") as err:
        write_image(_stack(np.uint8), tmp_path / "vol.xyz")
    for suffix in SUPPORTED_SUFFIXES:
        assert suffix in str(err.value)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ outputs vs inputs
def test_check_outputs_hard_link_inside_and_collisions(tmp_path):
    (tmp_path / "in.tif").write_bytes(b"x")
    os.link(tmp_path / "in.tif", tmp_path / "hard.tif")
    with pytest.raises(ValueError, match=r"output .*hard.tif is the input .*in.tif \(through a link\)"):
        check_outputs({str(tmp_path / "in.tif"): [tmp_path / "hard.tif"]})
    (tmp_path / "v.zarr").mkdir()
    with pytest.raises(ValueError, match=r"lies inside the input .*v.zarr"):
        check_outputs({str(tmp_path / "v.zarr"): [tmp_path / "v.zarr" / "probabilities"]})
    with pytest.raises(ValueError, match=r"report.csv is the input"):
        check_outputs({str(tmp_path / "report.csv"): []}, shared=[tmp_path / "report.csv"])
    check_outputs({"a.tif": ["o/a.tif"], "b.tif": ["o/b.tif"]}, shared=["o/report.csv"])  # distinct: fine


# ---------------------------------------------------------------- colour is what the file says is colour
def test_sections_stored_as_imagej_channels_are_refused_with_how_to_resave_never_mixed(tmp_path):
    """tifffile.imwrite(path, (3, Y, X), imagej=True) writes an ImageJ hyperstack of channels=3. For a 1-channel network it
    is refused in memory and streaming alike, rgb_to_grey=True too (it would mix 3 sections into one image), with how to
    save it as a stack; saved as advised, it reads as the 3 sections."""
    import torch

    from pipeline.engine import ReadSettings, predict_files
    from pipeline.engine.files import check_file
    from pipeline.io import channel_first, probe_image
    from pipeline.io.lazy import LazySource
    from pipeline.networks import UNet
    from pipeline.streaming import predict_files as stream_files

    stack = _stack(np.uint8, (3, 40, 44))
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, stack, imagej=True)
    with tifffile.TiffFile(path) as tif:
        assert tif.imagej_metadata["channels"] == 3 and tif.series[0].axes == "CYX"
    torch.manual_seed(0)
    net = UNet(features=[4, 8, 16, 32, 64]).eval()
    advice = (r"ij.tif has 3 channel\(s\) \(shape \(3, 40, 44\), stored axes CYX\), but the network takes 1; {}"
              r"If they are 3 sections stored as channels, save the file again as a stack \(in Fiji, Image > Hyperstacks > "
              r"Re-order Hyperstack\.\.\. \(channels <-> slices\) and save; in Python, tifffile\.imwrite\(path, "
              r"tifffile\.imread\(path\), imagej=True, metadata=\{{'axes': 'ZYX'\}}\)\); a 2D network then predicts each "
              r"section, a 3D network the stack\. If they are channels, predict with a network trained on 3 channels")
    why = {False: r"its 3 planes are channels by the file's own metadata \(axis C\), not RGB colour, so rgb_to_grey=True does not apply\. ",
           True: r"rgb_to_grey=True applies to RGB colour only, and its 3 planes are channels by the file's own metadata \(axis C\), "
                 r"not RGB colour: their luminance would mix them\. "}
    for rgb_to_grey, text in why.items():
        messages = []
        for refuse in (lambda: check_file(net, str(path), ReadSettings(rgb_to_grey=rgb_to_grey)),
                       lambda: predict_files(net, [str(path)], tmp_path / "memory", reading=ReadSettings(rgb_to_grey=rgb_to_grey)),
                       lambda: LazySource(path, 2, 1, rgb_to_grey=rgb_to_grey),
                       lambda: stream_files(net, [str(path)], tmp_path / "stream", rgb_to_grey=rgb_to_grey)):
            with pytest.raises(ValueError, match=advice.format(text)) as err:
                refuse()
            messages.append(str(err.value))
        assert len(set(messages)) == 1  # in memory and streaming: one message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ij.tif"]  # nothing written
    array, meta = read_image(path)
    assert meta["colour"] is False and np.array_equal(channel_first(array, meta, path, rgb_to_grey=True)[0], stack)  # never mixed
    tifffile.imwrite(path, tifffile.imread(path), imagej=True, metadata={"axes": "ZYX"})  # the advice, as given
    array, meta = read_image(path)
    assert np.array_equal(array, stack) and meta["tiff_axes"] == "ZYX" and probe_image(path).channels == 1
    check_file(net, str(path), ReadSettings())
    assert LazySource(path, 2, 1).spatial == (3, 40, 44)


def test_rgb_to_grey_applies_to_colour_the_file_declares(tmp_path):
    """Colour is photometric RGB (contiguous or planar) or an ImageJ composite whose lookup tables are red, green, blue:
    rgb_to_grey gives the same luminance for each, in memory and streaming. Samples that are not RGB (minisblack with
    extra samples) and plain minisblack pages (sections) are not colour."""
    from pipeline.io import channel_first, probe_image
    from pipeline.io.lazy import LazySource
    from pipeline.io.readers import colour_to_grey

    rgb = _stack(np.uint8, (3, 40, 44))
    luminance = colour_to_grey(rgb, luminance=True)
    tifffile.imwrite(tmp_path / "contig.tif", np.moveaxis(rgb, 0, -1), photometric="rgb")
    tifffile.imwrite(tmp_path / "planar.tif", rgb, photometric="rgb", planarconfig="separate")
    luts = [np.zeros((3, 256), np.uint8) for _ in range(3)]
    for i, lut in enumerate(luts):
        lut[i] = np.arange(256)
    tifffile.imwrite(tmp_path / "composite.tif", rgb, imagej=True, metadata={"axes": "CYX", "mode": "composite", "LUTs": luts})
    for name in ("contig.tif", "planar.tif", "composite.tif"):
        array, meta = read_image(tmp_path / name)
        assert meta["colour"] is True and probe_image(tmp_path / name).colour
        np.testing.assert_array_equal(channel_first(array, meta, name, rgb_to_grey=True)[0], luminance)
        np.testing.assert_array_equal(LazySource(tmp_path / name, 2, 1, rgb_to_grey=True).read((slice(0, 40), slice(0, 44))), luminance)
    tifffile.imwrite(tmp_path / "extra.tif", np.moveaxis(rgb, 0, -1), photometric="minisblack", extrasamples=["unspecified"] * 2)
    assert probe_image(tmp_path / "extra.tif").axes == "YXS" and not probe_image(tmp_path / "extra.tif").colour
    with pytest.raises(ValueError, match=r"extra.tif has 3 channel\(s\) .*channels by the file's own metadata \(axis S\)"):
        LazySource(tmp_path / "extra.tif", 2, 1, rgb_to_grey=True)
    tifffile.imwrite(tmp_path / "pages.tif", rgb, photometric="minisblack")
    assert probe_image(tmp_path / "pages.tif").shape == (3, 40, 44) and np.array_equal(read_image(tmp_path / "pages.tif")[0], rgb)
