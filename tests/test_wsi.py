"""Axes by name (ImageJ hyperstacks, OME), pyramid levels, colour, and whole-slide streaming with
multiscale exports (pipeline.io.axes, pipeline.io.pyramids, pipeline.streaming)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from pipeline import streaming
from pipeline.data import datalist_from_path
from pipeline.inferers import OverlapTileInferer
from pipeline.io import channel_first, probe_image, read_image, write_image
from pipeline.io.axes import plan_axes
from pipeline.io.lazy import LazySource
from pipeline.io.pyramids import levels, tissue_mask
from pipeline.io.readers import colour_to_grey
from pipeline.networks import UNet
from pipeline.transforms import LoadSectiond, NormalizeSectionsd, foreground_probability


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the machine is shared


# ---------------------------------------------------------------- the axis rule
@pytest.mark.parametrize(
    "axes, shape, planned, letters",
    [
        ("TZCYX", (1, 5, 2, 8, 9), (5, 8, 9, 2), "ZYXC"),  # ImageJ hyperstack, one time point, 2 channels
        ("TZCYX", (4, 1, 1, 8, 9), (4, 8, 9), "TYX"),  # a time series of frames: predicted as sections
        ("TCZYX", (1, 1, 6, 8, 9), (6, 8, 9), "ZYX"),  # OME order, grey
        ("SYX", (3, 8, 9), (8, 9, 3), "YXC"),  # planar RGB
        ("YXS", (8, 9, 3), (8, 9, 3), "YXC"),  # contiguous RGB
        ("QYX", (7, 8, 9), (7, 8, 9), "ZYX"),  # tifffile's unknown axis: sections
        (["t", "c", "z", "y", "x"], (1, 3, 4, 8, 9), (4, 8, 9, 3), "ZYXC"),  # NGFF names
        ("YXZ", (8, 9, 5), (5, 8, 9), "ZYX"),  # sections last in the file: moved first
        (None, (1, 5, 8, 9, 1), (5, 8, 9), "ZYX"),  # unnamed (ilastik): singletons dropped
    ],
)
def test_axis_plan_reads_blocks_of_an_arange_array(axes, shape, planned, letters):
    stored = np.arange(np.prod(shape)).reshape(shape)
    plan = plan_axes(shape, axes, list(range(1, len(shape) + 1)), "f.tif")
    assert plan.shape(shape) == planned and plan.axes == letters
    whole = plan.read(stored)
    assert whole.shape == planned
    names = [a.lower() for a in axes] if axes else None
    if names:  # each planned value is the stored value at the named position
        y, x = names.index("y"), names.index("x")
        index = [0] * len(shape)
        index[y], index[x] = 3, 4
        section = next((i for i, a in enumerate(names) if a in "ztq" and shape[i] > 1), None)
        if section is not None:
            index[section] = 1
        channel = next((i for i, a in enumerate(names) if a in "cs" and shape[i] > 1), None)
        if channel is not None:
            index[channel] = 1
        at = ((1,) if section is not None else ()) + (3, 4) + ((1,) if channel is not None else ())
        assert whole[at] == stored[tuple(index)]
        spatial_axes = ([section] if section is not None else []) + [y, x]
        assert plan.spacing == tuple(float(a + 1) for a in spatial_axes)
    spatial = len(planned) - plan.channel_last
    box = [slice(1, 3)] * (spatial - 2) + [slice(2, 7), slice(3, 8)]
    expected = whole[tuple(box)]
    assert np.array_equal(plan.read(stored, box), expected)  # a block read through the plan = a crop of the whole


@pytest.mark.parametrize(
    "axes, shape, match",
    [
        ("TZCYX", (3, 5, 1, 8, 9), r"several section axes \(T, Z\)"),
        ("CSYX", (2, 3, 8, 9), "two channel axes"),
        ("RYX", (4, 8, 9), "axis R of several values"),
        ("ZCX", (4, 2, 9), "no Y and X axes"),
    ],
)
def test_axis_plan_refuses_what_is_not_one_image(axes, shape, match):
    with pytest.raises(ValueError, match=f"f.tif has axes {axes} .*{match}"):
        plan_axes(shape, axes, None, "f.tif")


def test_imagej_hyperstack_read_by_axis_names(tmp_path):
    """A Fiji TZCYX hyperstack with 2 channels, and a time-lapse of frames, read in memory and lazily."""
    hyper = np.arange(1 * 4 * 2 * 6 * 7, dtype=np.uint16).reshape(1, 4, 2, 6, 7)
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, hyper, imagej=True, metadata={"axes": "TZCYX", "spacing": 0.05}, resolution=(1 / 0.004, 1 / 0.004))
    array, meta = read_image(path)
    assert array.shape == (4, 6, 7, 2) and meta["tiff_axes"] == "ZYXC"
    np.testing.assert_allclose(meta["spacing"], [0.05, 0.004, 0.004], rtol=1e-6)
    first, _ = channel_first(array, meta, path)
    assert np.array_equal(first, np.moveaxis(hyper[0], 1, 0))  # (C, Z, Y, X)
    assert probe_image(path).shape == (4, 6, 7, 2) and probe_image(path).channels == 2
    lazy = LazySource(path, 2, 2)
    assert lazy.spatial == (4, 6, 7) and np.array_equal(lazy.read((slice(1, 3), slice(0, 6), slice(2, 5))), first[:, 1:3, :, 2:5])

    frames = np.arange(5 * 6 * 7, dtype=np.uint8).reshape(5, 1, 1, 6, 7)
    tifffile.imwrite(tmp_path / "frames.tif", frames, imagej=True, metadata={"axes": "TZCYX"})
    array, meta = read_image(tmp_path / "frames.tif")
    assert array.shape == (5, 6, 7) and np.array_equal(array, frames[:, 0, 0]) and meta["tiff_axes"] == "TYX"
    write_image(array, tmp_path / "out.tif", meta)  # outputs keep the input's axes: frames, not slices
    with tifffile.TiffFile(tmp_path / "out.tif") as tif:
        assert tif.series[0].axes == "TYX" and tif.imagej_metadata["frames"] == 5
    both = np.zeros((3, 4, 1, 6, 7), np.uint8)
    tifffile.imwrite(tmp_path / "both.tif", both, imagej=True, metadata={"axes": "TZCYX"})
    with pytest.raises(ValueError, match=r"both.tif has axes TZYX \(3, 4, 6, 7\): several section axes"):
        read_image(tmp_path / "both.tif")


def _slide(path, height=600, width=800, seed=0):
    """A pyramidal RGB OME-TIFF (3 levels, 0.25 um pixels): pale background and a disc of 'tissue'."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 235, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    disc = (yy - height * 0.45) ** 2 + (xx - width * 0.4) ** 2 < (min(height, width) * 0.28) ** 2
    image[disc] = rng.integers(60, 200, (int(disc.sum()), 3), dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        options = {"tile": (128, 128), "photometric": "rgb"}
        tif.write(image, subifds=2, metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25}, **options)
        tif.write(image[::2, ::2], subfiletype=1, **options)
        tif.write(image[::4, ::4], subfiletype=1, **options)
    return image, disc


def test_pyramid_levels_in_memory_lazily_and_in_datalists(tmp_path):
    path = tmp_path / "slide.ome.tif"
    image, _ = _slide(path)
    for level, step in ((0, 1), (1, 2), (2, 4)):
        array, meta = read_image(path, key=level)
        assert np.array_equal(array, image[::step, ::step]) and np.allclose(meta["spacing"], [0.25 * step] * 2)
        lazy = LazySource(path, 2, 3, key=str(level))
        assert np.array_equal(lazy.read((slice(10, 40), slice(5, 50))), np.moveaxis(image[::step, ::step][10:40, 5:50], -1, 0))
        assert lazy.spacing == (0.25 * step, 0.25 * step)
    assert datalist_from_path(path, level=1) == [{"image": str(path), "image_dataset": "1"}]
    loaded = LoadSectiond(keys="image")({"image": str(path), "image_dataset": "2"})["image"]
    assert tuple(loaded.shape) == (3, 150, 200)
    with pytest.raises(ValueError, match=r"slide.ome.tif has no pyramid level 3; its levels are 0: \(600, 800, 3\), 1: \(300, 400, 3\), 2: \(150, 200, 3\)"):
        read_image(path, key=3)
    with pytest.raises(ValueError, match="slide.ome.tif is a TIFF file, which holds no named datasets; .*not 'raw'"):
        datalist_from_path(path, key="raw")
    with pytest.raises(ValueError, match="--input_key 'raw' and --level 1 both given"):
        datalist_from_path(path, key="raw", level=1)


def test_colour_to_grey_rule():
    rgb = np.array([[[10, 100, 7]], [[10, 50, 7]], [[10, 0, 7]]], dtype=np.uint8)  # (3, 1, 3): pixels (10,10,10), (100,50,0), (7,7,7)
    assert colour_to_grey(rgb, luminance=False) is None
    grey = colour_to_grey(rgb, luminance=True)
    assert grey.dtype == np.float32 and grey.shape == (1, 1, 3)
    np.testing.assert_allclose(grey[0, 0], [10.0, 0.2125 * 100 + 0.7154 * 50, 7.0], rtol=1e-6)
    assert grey[0, 0, 0] == 10 and grey[0, 0, 2] == 7  # grey pixels exactly
    same = np.repeat(np.arange(12, dtype=np.uint16).reshape(1, 3, 4), 3, 0)
    assert np.array_equal(colour_to_grey(same, luminance=False), same[:1]) and colour_to_grey(same, True).dtype == np.uint16


def _net(in_channels):
    torch.manual_seed(0)
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=2, features=(2, 4, 8), dropout=0.0).eval()


def _in_memory(net, image_chw):
    x = NormalizeSectionsd(keys="x")({"x": torch.from_numpy(image_chw.astype(np.float32))})["x"]
    with torch.no_grad():
        return foreground_probability(OverlapTileInferer()(x[None], net)[0]).numpy()


@pytest.mark.slow
def test_whole_slide_streaming_exports_and_tissue_rule(tmp_path):
    """An RGB pyramidal OME-TIFF through predict_files: equal to in-memory prediction; exported as a tiled
    pyramidal OME-TIFF (its input's kind) with the input's pixel size, an overlay PNG; with the tissue
    rule, background blocks are skipped and the others are unchanged."""
    path = tmp_path / "slide.ome.tif"
    image, disc = _slide(path)
    net = _net(3)
    expected = _in_memory(net, np.moveaxis(image, -1, 0))
    out = tmp_path / "out"
    [store] = streaming.predict_files(net, [str(path)], out, block_size=256, overlay=True)
    prob = zarr.open_group(str(store), mode="r")["probabilities"][...]
    assert np.abs(prob - expected).max() <= 1e-5
    _, meta = read_image(store, key="mask")  # the streaming store keeps the slide's pixel size
    assert np.allclose(meta["spacing"], [0.25, 0.25])
    assert sorted(p.name for p in out.iterdir()) == ["slide.zarr", "slide_mask.ome.tif", "slide_overlay.png", "slide_probabilities.ome.tif"]
    with tifffile.TiffFile(out / "slide_probabilities.ome.tif") as tif:
        series = tif.series[0]
        assert tif.is_ome and series.pages[0].is_tiled and [lv.shape for lv in series.levels] == [(600, 800), (300, 400)]
        assert np.array_equal(series.asarray(), prob)
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata and 'PhysicalSizeXUnit="µm"' in tif.ome_metadata  # the input's unit
        np.testing.assert_allclose(series.levels[1].asarray(), prob.reshape(300, 2, 400, 2).mean((1, 3)), rtol=1e-6)
    array, meta = read_image(out / "slide_mask.ome.tif")
    mask = zarr.open_group(str(store), mode="r")["mask"][...]
    assert np.array_equal(array, mask) and np.allclose(meta["spacing"], [0.25, 0.25])
    overlay = np.asarray(Image.open(out / "slide_overlay.png"))
    assert overlay.shape == (600, 800, 3)
    lo, hi = np.percentile(image, [1, 99])  # the documented rule: 1st-99th percentile to 0-255, mask 40% red
    base = np.clip((image.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255
    blend = np.where((mask > 0)[..., None], 0.6 * base + 0.4 * np.array([255, 0, 0], np.float32), base)
    assert 0 < (mask > 0).mean() < 1 and np.abs(overlay.astype(np.float32) - blend).max() <= 1

    tissue = tmp_path / "tissue"
    [store] = streaming.predict_files(net, [str(path)], tissue, block_size=128, skip_background=True, export="ome-zarr")
    skipped = zarr.open_group(str(store), mode="r")["probabilities"][...]
    predicted = ~np.isnan(skipped)
    assert predicted[disc].all() and 0.3 < 1 - predicted.mean() < 0.8  # every tissue pixel; a good part skipped
    assert np.abs(skipped[predicted] - expected[predicted]).max() <= 1e-5
    pyramid = levels(tissue / "slide.ome.zarr")
    assert [a.shape for a in pyramid] == [(600, 800), (300, 400)]
    assert np.array_equal(pyramid[0][...], skipped, equal_nan=True)
    assert np.array_equal(levels(tissue / "slide.ome.zarr", "mask")[0][...], zarr.open_group(str(store))["mask"][...])
    axes = zarr.open_group(str(tissue / "slide.ome.zarr"), mode="r").attrs.asdict()["ome"]["multiscales"][0]["axes"]
    assert [(a["name"], a.get("unit")) for a in axes] == [("y", "micrometer"), ("x", "micrometer")]
    array, meta = read_image(tissue / "slide.ome.zarr")  # our reader opens the export: the image, its scale
    assert array.shape == (600, 800) and np.allclose(meta["spacing"], [0.25, 0.25])
    assert tissue_mask(np.full((3, 4, 4), 200, np.uint8)).sum() == 0  # a blank slide holds no tissue


def test_tissue_rule_from_a_pyramid_level_thumbnail(tmp_path, monkeypatch):
    """With a thumbnail of at most 100 pixels, the 600 x 800 slide's rule reads pyramid level 2 (4x) strided
    by 4 (16x in all): blocks are mapped to the thumbnail at that scale, so every tissue pixel is predicted."""
    from pipeline.io.pyramids import thumbnail

    path = tmp_path / "slide.ome.tif"
    image, disc = _slide(path)
    net = _net(3)
    image_small, factor = thumbnail(LazySource(path, 2, 3), 8)
    assert factor == 8 and np.array_equal(image_small, np.moveaxis(image[::4, ::4][::2, ::2], -1, 0))  # level 2, every 2nd pixel
    from pipeline.engine import store as zarr_store

    monkeypatch.setattr(zarr_store, "THUMBNAIL", 50)
    [store] = streaming.predict_files(net, [str(path)], tmp_path / "out", block_size=128, skip_background=True, export="none")
    predicted = ~np.isnan(zarr.open_group(str(store), mode="r")["probabilities"][...])
    assert predicted[disc].all() and 0.3 < 1 - predicted.mean() < 0.8


def test_colour_for_a_grey_network_streaming(tmp_path):
    """A grey image saved as RGB streams as grey (= the grey file); true colour is refused before any output
    unless rgb_to_grey, which predicts the luminance as in-memory reading does."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 255, (70, 90), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    tifffile.imwrite(tmp_path / "grey_rgb.tif", np.repeat(grey[..., None], 3, -1), photometric="rgb")
    colour = rng.integers(0, 255, (70, 90, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "colour.tif", colour, photometric="rgb")
    net = _net(1)
    [a] = streaming.predict_files(net, [str(tmp_path / "grey.tif")], tmp_path / "a", block_size=64)
    [b] = streaming.predict_files(net, [str(tmp_path / "grey_rgb.tif")], tmp_path / "b", block_size=64)
    assert np.array_equal(zarr.open_group(str(a))["probabilities"][...], zarr.open_group(str(b))["probabilities"][...])
    with pytest.raises(ValueError, match=r"colour.tif: pixels \[0:70, 0:\] are colour .*rgb_to_grey=True"):
        streaming.predict_files(net, [str(tmp_path / "colour.tif")], tmp_path / "c", block_size=64)
    assert not (tmp_path / "c").exists()
    [c] = streaming.predict_files(net, [str(tmp_path / "colour.tif")], tmp_path / "c", block_size=64, rgb_to_grey=True)
    loaded = LoadSectiond(keys="image", rgb_to_grey=True)({"image": str(tmp_path / "colour.tif")})["image"].numpy()
    expected = _in_memory(net, loaded)
    assert np.abs(zarr.open_group(str(c))["probabilities"][...] - expected).max() <= 1e-5


def test_whole_slide_options_refused_with_the_option_to_change(tmp_path):
    from pipeline.cli import in_bundle_words
    from pipeline.engine import OutputSettings, predict_files

    tifffile.imwrite(tmp_path / "in.tif", np.zeros((40, 50), np.uint8))
    with pytest.raises(ValueError, match=r"overlay=True, export='ome-tiff' applies to block-by-block prediction only; pass streaming=True") as err:
        predict_files(_net(1), [str(tmp_path / "in.tif")], tmp_path / "out", outputs=OutputSettings(export="ome-tiff", overlay=True))
    assert "--overlay true, --export ome-tiff applies to block-by-block prediction only; pass --streaming true" in in_bundle_words(str(err.value))
    with pytest.raises(ValueError, match=r"export must be one of auto, none, ome-zarr, ome-tiff, hdf5; got 'png'"):
        OutputSettings(export="png")
    assert not (tmp_path / "out").exists()
    tifffile.imwrite(tmp_path / "grey.tif", np.zeros((40, 50), np.uint8))
    with pytest.raises(ValueError, match=r"grey.tif: skip_background applies to RGB whole-slide images .* it has 1 channel\(s\); set skip_background=False"):
        streaming.predict_files(_net(1), [str(tmp_path / "grey.tif")], tmp_path / "out", skip_background=True)
    assert not (tmp_path / "out").exists()  # refused before any output


def test_tissue_rule_says_what_it_skips(tmp_path, caplog):
    """Grey EM stored as RGB is refused by the tissue rule; with a coloured annotation box it passes the grey test
    (it is colour) and the blocks outside the box are skipped: a warning says how many, and what to do."""
    from pipeline.synthetic import make_image, to_uint8

    grey = to_uint8(make_image((384, 384), seed=0)[0])
    rgb = np.stack([grey] * 3, -1)
    tifffile.imwrite(tmp_path / "grey.tif", rgb, photometric="rgb")
    with pytest.raises(ValueError, match=r"grey.tif: the tissue rule reads colour saturation, but this RGB image is grey"):
        streaming.predict_files(_net(3), [str(tmp_path / "grey.tif")], tmp_path / "out", skip_background=True)
    rgb[10:60, 10:60] = (230, 20, 20)  # a red annotation box (1.7% of the pixels)
    tifffile.imwrite(tmp_path / "boxed.tif", rgb, photometric="rgb")
    with caplog.at_level("WARNING"):
        [store] = streaming.predict_files(_net(3), [str(tmp_path / "boxed.tif")], tmp_path / "out", skip_background=True,
                                          block_size=128)
    done = zarr.open_group(str(store), mode="r")["probabilities"][...]
    assert np.isfinite(done[:128, :128]).all() and np.isnan(done[128:, 128:]).all()  # the box's block only
    assert ("boxed.tif: skip_background: 8 of 9 blocks (89%) hold no tissue by the tissue rule (colour saturation) and are "
            "not predicted (probability NaN, mask 0)") in caplog.text
    assert not (tmp_path / "out" / "grey.zarr").exists()
