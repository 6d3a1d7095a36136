"""The one prediction engine: the same options give the same result in memory and block by block (streaming),
for sigmoid (1 channel), 2-class and N-class networks and every output kind; TTA and AdaBN included."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from pipeline.engine import (
    ImageSource, OutputSettings, ReadSettings, TensorSink, TensorSource, TileSettings, block_layout, predict, predict_files,
)
from pipeline.engine.files import open_lazy
from pipeline.io import channel_first, read_image
from pipeline.networks import UNet

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the machine is shared

KINDS = {"sigmoid": 1, "two-class": 2, "three-class": 3}
RULES = {
    "sigmoid": {"cells": {"method": "watershed", "channel": 0, "threshold": 0.5, "seed_distance": 1.0}},
    "two-class": {"objects": {"method": "components", "channel": 1, "threshold": 0.45}},
    "three-class": {"mito": {"method": "components", "channel": 2, "threshold": 0.3}},
}


def _net(out_channels: int, **kwargs) -> UNet:
    torch.manual_seed(out_channels)
    return UNet(features=(2, 4, 8), out_channels=out_channels, dropout=0.0, **kwargs).eval()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    volume = (np.random.default_rng(0).random((2, 45, 61)) * 200 + 20).astype(np.float32)
    volume[1] *= 0.3  # sections differ: normalisation is per section
    tifffile.imwrite(tmp / "stack.tif", volume, photometric="minisblack")
    return tmp / "stack.tif"


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Instance ids equal up to a renumbering (block-wise ids are merged in another order)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (a == 0).sum() == (b == 0).sum() and np.array_equal(a == 0, b == 0) and \
        len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("write", [("probabilities",), ("mask",), ("probabilities", "mask", "instances")], ids="+".join)
def test_streaming_equals_in_memory(stack, tmp_path, kind, write):
    net = _net(KINDS[kind])
    outputs = OutputSettings(write=write, threshold=0.3, instances=RULES[kind] if "instances" in write else None)
    [files] = predict_files(net, [str(stack)], tmp_path / "memory", outputs=outputs)
    [store] = predict_files(net, [str(stack)], tmp_path / "stream", streaming=True, outputs=outputs,
                            settings=TileSettings(block_size=(1, 32, 32)))
    group = zarr.open_group(str(store), mode="r")
    classes = max(2, KINDS[kind])
    expected = [w for w in write if w != "instances"] + ([f"instances/{r}" for r in RULES[kind]] if "instances" in write else [])
    assert sorted(files) == sorted(expected)
    for what, path in files.items():
        array, meta = read_image(path)
        if what == "probabilities":
            got = channel_first(array, meta, path)[0] if classes > 2 else array
            stored = group["probabilities"][...]
            assert got.dtype == np.float32 and got.shape == stored.shape == ((classes,) if classes > 2 else ()) + (2, 45, 61)
            assert np.abs(got - stored).max() <= 1e-5
            if classes == 2:  # the mask rule, on the probability
                assert np.array_equal(group["mask"][...] if "mask" in group else (stored > 0.3) * 255, (stored > 0.3) * 255)
        elif what == "mask":
            stored = group["mask"][...]
            assert array.dtype == np.uint8 and np.array_equal(array, stored)
            assert set(np.unique(stored)) <= ({0, 255} if classes == 2 else set(range(classes)))
        else:
            stored = group[what][...]
            assert array.dtype == np.uint32 and stored.dtype == np.uint32 and _same_partition(array, stored), what
            assert stored.max() > 0, "a rule that finds nothing compares nothing"


def test_n_class_probabilities_sum_to_one_and_the_mask_is_their_argmax(stack, tmp_path):
    [store] = predict_files(_net(3), [str(stack)], tmp_path, streaming=True, settings=TileSettings(block_size=(1, 32, 32)))
    group = zarr.open_group(str(store), mode="r")
    probs = group["probabilities"][...]
    assert group["probabilities"].chunks == (3, 1, 32, 32)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(group["mask"][...], probs.argmax(0))
    assert len(np.unique(group["mask"][...])) > 1


@pytest.mark.parametrize("write", [("probabilities",), ("mask",)], ids="+".join)
def test_the_overlay_follows_the_threshold(stack, tmp_path, write):
    """The overlay's red pixels are the mask's foreground at --threshold, also when only probabilities are stored."""
    net = _net(2)
    [store] = predict_files(net, [str(stack)], tmp_path, streaming=True,
                            outputs=OutputSettings(write=write, threshold=0.3, overlay=True, export="none"))
    [reference] = predict_files(net, [str(stack)], tmp_path / "ref", streaming=True, outputs=OutputSettings(threshold=0.3, overlay=True))
    png = np.asarray(Image.open(store.with_name("stack_overlay.png")))
    assert np.array_equal(png, np.asarray(Image.open(reference.with_name("stack_overlay.png"))))
    mask = zarr.open_group(str(reference), mode="r")["mask"][1]  # the middle section
    red = (png[..., 0].astype(int) - png[..., 1]) > 50
    assert np.array_equal(red, mask > 0) and 0 < red.mean() < 1


def test_tta_is_the_same_in_memory_and_block_by_block(stack, tmp_path):
    """TTA averages each tile's flips (pipeline.engine.tta.FlipAverage): seamless, and the same for any block layout."""
    net = _net(2)
    settings = TileSettings(tta=True)
    [files] = predict_files(net, [str(stack)], tmp_path / "memory", settings=settings, outputs=OutputSettings(write=("probabilities",)))
    [store] = predict_files(net, [str(stack)], tmp_path / "stream", streaming=True, settings=settings.replace(block_size=(1, 32, 32)),
                            outputs=OutputSettings(write=("probabilities",)))
    got = read_image(files["probabilities"])[0]
    assert np.abs(got - zarr.open_group(str(store), mode="r")["probabilities"][...]).max() <= 1e-5
    [base] = predict_files(net, [str(stack)], tmp_path / "base", outputs=OutputSettings(write=("probabilities",)))
    assert np.abs(read_image(base["probabilities"])[0] - got).max() > 1e-3  # TTA changes the result


def test_adapt_norm_needs_the_whole_image_and_is_refused_before_any_output(stack, tmp_path):
    """AdaBN's statistics are those of the tiles of one pass: block by block they would differ, so it is refused."""
    net = _net(2, norm="batch")
    with pytest.raises(ValueError, match=r"adapt_norm=True estimates BatchNorm statistics over the tiles of the whole image"):
        predict_files(net, [str(stack)], tmp_path / "stream", streaming=True, settings=TileSettings(adapt_norm=True))
    with pytest.raises(ValueError, match=r"needs the image as one block"):
        predict(ImageSource(open_lazy(net, str(stack), ReadSettings())), net, TileSettings(adapt_norm=True, block_size=32), TensorSink())
    assert not (tmp_path / "stream").exists()
    [files] = predict_files(net, [str(stack)], tmp_path / "memory", settings=TileSettings(adapt_norm=True))
    assert files["mask"].exists()


def test_any_block_layout_equals_one_block(stack):
    """The engine's exactness: blocks of any size, read with their halo, give the whole image's logits."""
    net = _net(3)
    reading = ReadSettings()
    whole = predict(ImageSource(open_lazy(net, str(stack), reading)), net, TileSettings(), TensorSink())
    for block in [(1, 16, 16), (2, 48, 32), (1, 45, 61)]:
        blocks = predict(ImageSource(open_lazy(net, str(stack), reading)), net, TileSettings(block_size=block), TensorSink())
        assert blocks.shape == whole.shape == (3, 2, 45, 61)
        assert (blocks - whole).abs().max() <= 1e-5, block


def test_tensor_source_refuses_nan_and_gives_the_layout(stack):
    net = _net(1)
    with pytest.raises(ValueError, match=r"input has 1 non-finite pixel\(s\) \(NaN or Inf\) of 100, the first at \(y, x\) \(2, 3\)"):
        x = torch.zeros(1, 10, 10)
        x[0, 2, 3] = float("nan")
        predict(TensorSource(x), net, TileSettings(), TensorSink())
    layout = block_layout(net, (3, 50, 70), 18)  # rounded up to the pooling step, 4
    assert layout.block == (1, 20, 20) and layout.grid == (3, 3, 4) and layout.box((2, 2, 3)) == ([2, 40, 60], [3, 50, 70])


@pytest.mark.parametrize("kind", ["sigmoid", "three-class"])
def test_no_data_gives_the_same_instances_in_memory_and_streaming(tmp_path, kind):
    """fill_nan: pixels without data are NaN probabilities, mask 0 and instance id 0, and the instances around them
    are made from the same probabilities in memory and block by block (a reviewer found them differing)."""
    volume = (np.random.default_rng(1).random((2, 45, 61)) * 200 + 20).astype(np.float32)
    volume[1, 10:30, 20:40] = np.nan  # a region of no data
    tifffile.imwrite(tmp_path / "holes.tif", volume, photometric="minisblack")
    net = _net(KINDS[kind])
    rules = {**RULES["sigmoid"], "filled": {"method": "watershed", "channel": 0, "threshold": 0.5, "seed_distance": 1.0,
                                            "fill": False}} if kind == "sigmoid" else RULES[kind]
    outputs = OutputSettings(write=("probabilities", "mask", "instances"), threshold=0.3, instances=rules)
    reading = ReadSettings(fill_nan=True)
    [files] = predict_files(net, [str(tmp_path / "holes.tif")], tmp_path / "memory", reading=reading, outputs=outputs)
    [store] = predict_files(net, [str(tmp_path / "holes.tif")], tmp_path / "stream", streaming=True, reading=reading,
                            outputs=outputs, settings=TileSettings(block_size=(1, 32, 32)))
    group = zarr.open_group(str(store), mode="r")
    hole = np.zeros((2, 45, 61), bool)
    hole[1, 10:30, 20:40] = True
    assert np.array_equal(read_image(files["mask"])[0], group["mask"][...]) and not group["mask"][...][hole].any()
    for rule in rules:
        ids, stored = read_image(files[f"instances/{rule}"])[0], group[f"instances/{rule}"][...]
        assert not ids[hole].any() and not stored[hole].any(), rule
        assert _same_partition(ids, stored) and stored.max() > 0, rule
