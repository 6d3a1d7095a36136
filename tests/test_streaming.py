"""Streaming (block-wise, resumable, Dask) prediction equals in-memory overlap-tile prediction."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tifffile
import torch
import zarr

from pipeline import streaming
from pipeline.transforms import intensity
from pipeline.inferers import OverlapTileInferer
from pipeline.io import read_image
from pipeline.networks import UNet
from pipeline.streaming import predict_zarr
from pipeline.synthetic import make_stack, to_uint8
from pipeline.transforms import NormalizeSectionsd, foreground_probability

from conftest import infer, tiny_net



def _net(**kwargs) -> UNet:
    torch.manual_seed(0)
    return UNet(**{"features": (2, 4, 8), "dropout": 0.0, **kwargs})


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the machine is shared


def _in_memory(net, volume, **kwargs) -> np.ndarray:
    """Foreground probability of the whole volume: NormalizeSectionsd, then OverlapTileInferer."""
    x = torch.from_numpy(volume.astype(np.float32))
    x = NormalizeSectionsd(keys="x")({"x": x[None] if net.in_channels == 1 else x})["x"]
    with torch.no_grad():
        logits = OverlapTileInferer(**kwargs)(x[None], net.eval())[0]
    return foreground_probability(logits).numpy()


def _read(path, name="probabilities") -> np.ndarray:
    return zarr.open_group(str(path), mode="r")[name][...]


def _check(expected, path, threshold=0.5):
    got = _read(path)
    assert got.shape == expected.shape and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5
    mask, sure = _read(path, "mask"), np.abs(expected - threshold) > 1e-5
    assert mask.dtype == np.uint8 and np.array_equal(mask[sure], (expected[sure] > threshold).astype(np.uint8) * 255)
    assert _read(path, streaming.MARKERS).all()


@pytest.mark.parametrize(
    "kind, shape, block, tile, net_kwargs",
    [
        ("numpy", (3, 45, 61), (2, 24, 32), "auto", {}),  # stack; no axis a multiple of the block
        ("tiff", (45, 61), (16, 24), (8, 12), {}),  # 2D image, several tiles per block
        ("zarr", (13, 19, 22), (8, 8, 12), "auto", {"spatial_dims": 3, "features": (2, 4)}),  # 3D network
        ("numpy", (2, 2, 30, 21), (1, 16, 16), 8, {"in_channels": 2}),  # channel-first, 2 channels
    ],
)
def test_streaming_equals_in_memory(tmp_path, kind, shape, block, tile, net_kwargs):
    net = _net(**net_kwargs)
    volume = (np.random.default_rng(0).random(shape) * 200 + 20).astype(np.float32)
    volume[0, :5] += 300  # uneven sections: normalisation must be per section
    source = volume
    if kind == "tiff":
        source = tmp_path / "image.tif"
        tifffile.imwrite(source, volume, tile=(16, 16))
    elif kind == "zarr":
        source = tmp_path / "volume.zarr"
        zarr.create_array(str(source), shape=shape, chunks=(5, 7, 9), dtype="float32")[...] = volume
    expected = _in_memory(net, volume, tile_size=tile)
    out = predict_zarr(net, source, tmp_path / "out.zarr", block_size=block, tile_size=tile)
    _check(expected, out)
    spatial = shape[1:] if net.in_channels > 1 else shape
    assert zarr.open_group(str(out), mode="r")["probabilities"].chunks == tuple(min(b, s) for b, s in zip(block, spatial))


@pytest.mark.parametrize("channels_last, amp", [(True, False), (False, True), (True, True)])
def test_streaming_equals_in_memory_channels_last_and_bf16(tmp_path, channels_last, amp):
    """One tile engine: both paths run the tiles in the network's memory format and under the same
    autocast (bf16 on CPU), and agree within bf16 rounding; fp32 contiguous is the reference."""
    net = _net(features=(8, 16, 32))
    volume = (np.random.default_rng(1).random((2, 40, 52)) * 200 + 20).astype(np.float32)
    reference = _in_memory(net, volume, tile_size=8)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    seen = []
    net.encoder[1].register_forward_pre_hook(  # 8 channels in: a 1-channel tile is trivially both formats
        lambda _, args: seen.append((args[0].is_contiguous(memory_format=torch.channels_last), torch.is_autocast_enabled("cpu")))
    )
    in_memory = _in_memory(net, volume, tile_size=8, amp=amp)
    n_memory = len(seen)
    out = predict_zarr(net, volume, tmp_path / "out.zarr", block_size=(1, 16, 24), tile_size=8, amp=amp)
    assert n_memory > 0 and len(seen) > n_memory
    assert set(seen) == {(channels_last, amp)}  # every tile of both paths, in both settings
    tolerance = 2e-2 if amp else 1e-5  # bf16 keeps 8 bits of mantissa
    assert np.abs(_read(out) - in_memory).max() <= tolerance
    assert np.abs(in_memory - reference).max() <= tolerance
    assert zarr.open_group(str(out), mode="r").attrs["streaming"]["settings"]["amp"] == ("bfloat16" if amp else None)


def test_ome_zarr_group_uses_full_resolution(tmp_path):
    net = _net()
    volume = np.random.default_rng(5).random((2, 20, 24)).astype(np.float32)
    group = zarr.open_group(str(tmp_path / "image.ome.zarr"), mode="w")
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}, {"path": "1"}]}]
    group.create_array("0", shape=(1, 1, 2, 20, 24), chunks=(1, 1, 1, 10, 12), dtype="float32")[...] = volume[None, None]
    group.create_array("1", shape=(1, 1, 2, 10, 12), dtype="float32")
    out = predict_zarr(net, tmp_path / "image.ome.zarr", tmp_path / "o.zarr", block_size=(1, 12, 12))
    _check(_in_memory(net, volume, tile_size="auto"), out)


class RecordingArray:
    """A lazy array that remembers the largest read."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.largest = array, array.shape, array.dtype, 0

    def __getitem__(self, index):
        out = self.array[index]
        self.largest = max(self.largest, out.size)
        return out


def test_reads_are_bounded_by_block_and_band(tmp_path, monkeypatch):
    monkeypatch.setattr(intensity, "STATS_BAND", 200)  # statistics read 5 rows of 40 at a time
    net = _net()  # margin 20
    volume = np.random.default_rng(6).random((2, 100, 40)).astype(np.float32)
    source = RecordingArray(volume)
    out = predict_zarr(net, source, tmp_path / "o.zarr", block_size=(1, 16, 40), tile_size=16)
    _check(_in_memory(net, volume, tile_size="auto"), out)
    assert source.largest <= (16 + 2 * 20) * 40 < volume[0].size  # one block with halo, not a section


def test_constant_padding_and_block_rounding(tmp_path):
    net = _net()
    volume = np.random.default_rng(1).random((2, 30, 27)).astype(np.float32)
    expected = _in_memory(net, volume, tile_size="auto", padding_mode="constant")
    out = predict_zarr(net, volume, tmp_path / "o.zarr", block_size=(1, 10, 13), padding_mode="constant")  # -> 12, 16
    _check(expected, out)
    assert _read(out, streaming.MARKERS).shape == (2, 3, 2)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Killed while streaming an OME-Zarr stack, resumed: only the unmarked blocks are computed, and the
    store and its OME-Zarr export (pyramid and label image) equal an uninterrupted run's bit for bit."""
    from ome_zarr.writer import write_image

    volume = (np.random.default_rng(2).random((4, 40, 50)) * 255).astype(np.uint8)
    source, out = tmp_path / "src.ome.zarr", tmp_path / "out.zarr"
    write_image(volume, zarr.open_group(str(source), mode="w"), scale_factors=None, axes="zyx", scale={"z": 40.0, "y": 4.0, "x": 4.0},
                storage_options={"chunks": (1, 20, 25)})
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time, torch
        from pipeline.networks import UNet
        from pipeline.streaming import predict_zarr
        torch.set_num_threads(1)
        torch.manual_seed(0)
        net = UNet(features=(2, 4, 8), dropout=0.0)
        forward = net.forward
        net.forward = lambda x: (time.sleep(0.2), forward(x))[1]  # slow enough to be interrupted
        predict_zarr(net, {str(source)!r}, {str(out)!r}, block_size=(1, 24, 32), export="auto")
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, done = time.monotonic() + 60, 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / streaming.MARKERS / "zarr.json").exists():
                done = int(_read(out, streaming.MARKERS).sum())
                if done >= 3:
                    break
            time.sleep(0.05)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert 3 <= done, err.decode()[-2000:]
    markers = _read(out, streaming.MARKERS)
    assert markers.sum() < markers.size, "the run finished before it could be interrupted"
    pending = {tuple(int(i) for i in idx) for idx in np.argwhere(markers == 0)}

    computed = []
    from pipeline.engine import run as engine_run

    real = engine_run.run_block
    monkeypatch.setattr(engine_run, "run_block", lambda net, src, settings, layout, idx, *a: (computed.append(tuple(idx)), real(net, src, settings, layout, idx, *a))[1])
    net = _net()
    assert not (tmp_path / "out.ome.zarr").exists()  # exported after the last block only
    predict_zarr(net, source, out, block_size=(1, 24, 32), export="auto")
    assert set(computed) == pending and len(computed) == len(pending)
    computed.clear()
    predict_zarr(net, source, out, block_size=(1, 24, 32), export="auto")  # complete: nothing left to do
    assert computed == []

    reference = predict_zarr(net, source, tmp_path / "ref.zarr", block_size=(1, 24, 32), export="ome-zarr")
    for name in ("probabilities", "mask"):
        assert np.array_equal(_read(out, name), _read(reference, name), equal_nan=True), name
    from pipeline.io.pyramids import levels

    for label in (None, "mask"):
        got, want = levels(tmp_path / "out.ome.zarr", label), levels(tmp_path / "ref.ome.zarr", label)
        assert [a.shape for a in got] == [a.shape for a in want] == [(4, 40, 50)]  # smaller than a level: one
        assert all(np.array_equal(a[...], b[...], equal_nan=True) for a, b in zip(got, want)), label


def test_dask_local_cluster_equals_single_process(tmp_path):
    pytest.importorskip("distributed")
    net = _net()
    volume = np.random.default_rng(3).random((2, 30, 40)).astype(np.float32)
    single = predict_zarr(net, volume, tmp_path / "single.zarr", block_size=(1, 24, 32))
    multi = predict_zarr(
        net, volume, tmp_path / "dask.zarr", block_size=(1, 24, 32), scheduler="local", n_workers=2, threads_per_worker=1
    )
    assert np.abs(_read(single) - _read(multi)).max() <= 1e-6
    assert np.array_equal(_read(single, "mask"), _read(multi, "mask"))
    assert _read(multi, streaming.MARKERS).all()


def test_bad_sources(tmp_path):
    net = _net()
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        predict_zarr(net, tmp_path / "missing.zarr", tmp_path / "o.zarr")
    four_d = tmp_path / "4d.zarr"
    zarr.create_array(str(four_d), shape=(2, 3, 8, 8), dtype="float32")
    with pytest.raises(ValueError, match="4d.zarr has axes \\?\\?\\?\\? \\(2, 3, 8, 8\\): 4 axes left"):
        predict_zarr(net, four_d, tmp_path / "o.zarr")
    with pytest.raises(ValueError, match="3D network"):
        predict_zarr(_net(spatial_dims=3, features=(2, 4)), np.zeros((8, 8), np.float32), tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()


def test_existing_output_is_refused_or_resumed(tmp_path):
    net = _net()
    volume = np.random.default_rng(4).random((2, 20, 24)).astype(np.float32)
    out = predict_zarr(net, volume, tmp_path / "o.zarr", block_size=(1, 24, 24), write=("probabilities",))
    before = _read(out)
    with pytest.raises(ValueError, match=r"exists with shape \(2, 20, 24\).*needs shape \(3, 20, 24\)"):
        predict_zarr(net, np.concatenate([volume, volume[:1]]), out, block_size=(1, 24, 24), write=("probabilities",))
    with pytest.raises(ValueError, match="other settings.*threshold"):
        predict_zarr(net, volume, out, block_size=(1, 24, 24), write=("probabilities",), threshold=0.3)
    with pytest.raises(ValueError, match="without a 'mask' array"):
        predict_zarr(net, volume, out, block_size=(1, 24, 24))
    np.testing.assert_array_equal(_read(out), before)  # refused outputs are untouched
    predict_zarr(net, volume[:1], out, block_size=(1, 24, 24), overwrite=True)
    assert _read(out).shape == (1, 20, 24) and _read(out, "mask").shape == (1, 20, 24)


def test_unreachable_scheduler_fails_fast(tmp_path):
    pytest.importorskip("distributed")
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="tcp://127.0.0.1:1"):
        predict_zarr(_net(), np.zeros((1, 8, 8), np.float32), tmp_path / "o.zarr", scheduler="tcp://127.0.0.1:1", connect_timeout=3)
    assert time.monotonic() - start < 10


def test_predict_files_reads_the_statistics_once(tmp_path, monkeypatch):
    """predict_files' NaN check is the statistics pass predict_zarr needs: one pass per source, same result."""
    volume = (np.random.default_rng(3).random((2, 30, 40)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "v.tif", volume, photometric="minisblack")
    calls = []
    from pipeline.engine import sources

    real = sources.section_stats
    monkeypatch.setattr(sources, "section_stats", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    net = _net()
    [out] = streaming.predict_files(net, [str(tmp_path / "v.tif")], tmp_path / "out", block_size=(1, 32, 32))
    assert len(calls) == 1
    _check(_in_memory(net, volume), out)


# ------------------------------------------------------------------ inputs of one stem, TIFF series, zarr chunks
def test_streaming_inputs_of_one_stem_get_distinct_outputs(tmp_path):
    """vol.1.tif and vol.2.tif used to share vol.zarr (the second 'resumed' the first's prediction)."""
    torch.save(tiny_net().state_dict(), tmp_path / "model.pt")
    (tmp_path / "in").mkdir()
    stacks = [to_uint8(make_stack((2, 40, 44), seed=s)[0]) for s in (1, 2)]
    for i, stack in enumerate(stacks, 1):
        tifffile.imwrite(tmp_path / "in" / f"vol.{i}.tif", stack, photometric="minisblack")
    proc = infer(tmp_path, "--input_path", str(tmp_path / "in"), "--streaming", "true", "--block_size", "[1,32,32]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vol.1.zarr", "vol.2.zarr"]
    for i, stack in enumerate(stacks, 1):
        expected = predict_zarr(tiny_net(), stack, tmp_path / f"ref{i}.zarr", block_size=(1, 32, 32))
        got = zarr.open_group(str(tmp_path / "out" / f"vol.{i}.zarr"), mode="r")["probabilities"][...]
        np.testing.assert_allclose(got, zarr.open_group(str(expected), mode="r")["probabilities"][...], atol=1e-5)  # channels-last
    one, two = (zarr.open_group(str(tmp_path / "out" / f"vol.{i}.zarr"), mode="r")["probabilities"][...] for i in (1, 2))
    assert np.abs(one - two).max() > 0.1  # two predictions, not one twice


def two_series(path, second):
    with tifffile.TiffWriter(path) as tif:
        tif.write(to_uint8(make_stack((3, 52, 48), seed=5)[0]), photometric="minisblack")
        tif.write(second, photometric="minisblack")


def test_tiff_series_chooses_the_series_in_memory_and_streaming(tmp_path):
    second = to_uint8(make_stack((2, 40, 44), seed=6)[0])
    two_series(tmp_path / "two.tif", second)
    tifffile.imwrite(tmp_path / "one.tif", second, photometric="minisblack")
    array, _ = read_image(tmp_path / "two.tif", tiff_series=1)
    np.testing.assert_array_equal(array, second)
    torch.save(tiny_net().state_dict(), tmp_path / "model.pt")
    for name, extra in (("two.tif", ["--tiff_series", "1"]), ("one.tif", [])):
        proc = infer(tmp_path, "--input_path", str(tmp_path / name), *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    got, _ = read_image(tmp_path / "out/probabilities/two.tif")
    want, _ = read_image(tmp_path / "out/probabilities/one.tif")
    assert got.shape == (2, 40, 44)
    np.testing.assert_array_equal(got, want)
    streamed = predict_zarr(tiny_net(), str(tmp_path / "two.tif"), tmp_path / "s.zarr", block_size=(1, 32, 32), tiff_series=1)
    reference = predict_zarr(tiny_net(), second, tmp_path / "r.zarr", block_size=(1, 32, 32))
    np.testing.assert_array_equal(zarr.open_group(str(streamed))["probabilities"][...], zarr.open_group(str(reference))["probabilities"][...])


def test_allow_missing_chunks_predicts_them_from_the_fill_value(tmp_path):
    volume = np.random.default_rng(0).random((2, 40, 44), dtype=np.float32)
    zarr.create_array(str(tmp_path / "v.zarr"), shape=volume.shape, chunks=(1, 20, 22), dtype="float32", fill_value=0)[...] = volume
    (tmp_path / "v.zarr" / "c" / "1" / "0" / "1").unlink()
    holey = volume.copy()
    holey[1, :20, 22:] = 0  # what zarr reads there
    with pytest.raises(ValueError, match=r"1 of 8 chunks are missing.*c/1/0/1"):  # a zarr.Array passed in, too
        predict_zarr(tiny_net(), zarr.open_array(str(tmp_path / "v.zarr"), mode="r"), tmp_path / "o.zarr")
    got = predict_zarr(tiny_net(), str(tmp_path / "v.zarr"), tmp_path / "o.zarr", block_size=(1, 32, 32), allow_missing_chunks=True)
    want = predict_zarr(tiny_net(), holey, tmp_path / "w.zarr", block_size=(1, 32, 32))
    np.testing.assert_array_equal(zarr.open_group(str(got))["probabilities"][...], zarr.open_group(str(want))["probabilities"][...])


def test_exports_beside_the_store_are_checked_with_it(tmp_path):
    """The exports and overlay are outputs like the store: a rerun takes up those its store records, other
    existing ones need overwrite, and an HDF5 file holding other datasets is never replaced."""
    import h5py

    tifffile.imwrite(tmp_path / "v.tif", to_uint8(make_stack((2, 40, 44), seed=0)[0]), photometric="minisblack")
    out, options = tmp_path / "out", {"block_size": (1, 32, 32), "export": "hdf5", "overlay": True}
    streaming.predict_files(_net(), [str(tmp_path / "v.tif")], out, **options)
    assert zarr.open_group(str(out / "v.zarr")).attrs["exported"] == ["v.h5", "v_overlay.png"]
    streaming.predict_files(_net(), [str(tmp_path / "v.tif")], out, **options)  # resumed: its own exports rewritten
    with h5py.File(out / "v.h5") as f:
        want = f["probabilities"][...]
        assert sorted(f) == ["mask", "probabilities"]
    np.testing.assert_array_equal(want, _read(out / "v.zarr"))

    import shutil

    shutil.rmtree(out / "v.zarr")  # the files beside it are no longer recorded as this run's
    with pytest.raises(FileExistsError, match=r"2 output file\(s\) exist already, e.g. \[.*v.h5', .*v_overlay.png'\]"):
        streaming.predict_files(_net(), [str(tmp_path / "v.tif")], out, **options)
    assert not (out / "v.zarr").exists()
    streaming.predict_files(_net(), [str(tmp_path / "v.tif")], out, overwrite=True, **options)
    with h5py.File(out / "v.h5", "r+") as f:
        f["curated"] = np.ones((2, 40, 44), np.uint8)
    with pytest.raises(FileExistsError, match=r"v.h5 exists and holds curated, which this run does not write"):
        streaming.predict_files(_net(), [str(tmp_path / "v.tif")], out, overwrite=True, **options)
    with h5py.File(out / "v.h5") as f:
        assert sorted(f) == ["curated", "mask", "probabilities"]
        np.testing.assert_array_equal(f["probabilities"][...], want)
