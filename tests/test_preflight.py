"""Issue 14: the right outcomes where the product used to lose data or give silent results.

The refusals are rows of the bad-input matrix (tests/test_reliability.py); here are the cases
whose right outcome is a result: a value parsed the right way, a resumed run's learning rates,
the chosen TIFF series, distinct outputs for inputs of one stem, a diverged run that keeps
the earlier checkpoints.
"""

import os
import re

import numpy as np
import pytest
import tifffile
import torch
import yaml
import zarr

from pipeline import checks, config
from pipeline.io.outputs import check_outputs
from pipeline.checkpoints import load_checkpoint
from pipeline.io import read_image
from pipeline.optim import PolynomialDecay
from pipeline.networks import UNet
from pipeline.streaming import predict_zarr
from pipeline.synthetic import OWNER_FILE, make_stack, to_uint8, write_dataset

from conftest import CONFIGS, FEATURES, INFER, ROOT, TINY_TRAIN, bundle, train_args

TINY = [*TINY_TRAIN, "--val_interval", "2"]


def train(tmp, *extra):
    return bundle(*train_args(tmp, *TINY, *extra))


def infer(tmp, *extra):
    return bundle("run", "--config_file", INFER, "--checkpoint", str(tmp / "model.pt"),
                  "--output_dir", str(tmp / "out"), *extra)


def tiny_net(**kwargs):
    torch.manual_seed(0)
    return UNet(features=FEATURES, **kwargs).eval()


# ------------------------------------------------------------------ booleans
def test_flags_accept_the_six_spellings_and_nothing_else():
    words = {"true": True, "True": True, "1": True, 1: True, True: True,
             "false": False, "False": False, "0": False, 0: False, False: False}
    for value, expected in words.items():
        assert checks.flags(overwrite=value) == {"overwrite": expected}
    for bad in ("yes", "TRUE", "no", "", 2, 1.0, None, "t"):
        with pytest.raises(ValueError, match=re.escape(f"not a boolean: --overwrite {bad!r}")):
            checks.flags(overwrite=bad)
    with pytest.raises(ValueError, match=r"--tta 'on', --resume 'off'"):  # every bad key at once
        checks.flags(tta="on", resume="off", streaming="false")


@pytest.mark.parametrize("name", ["train.yaml", "multi_gpu_train.yaml", "inference.yaml", "evaluate.yaml"])
def test_every_boolean_key_is_read_through_flags(name):
    """A boolean key is only ever used as @flags['key']: its raw value appears in the flags line alone."""
    text = (CONFIGS / name).read_text()
    merged = yaml.safe_load((CONFIGS / "train.yaml").read_text()) if name == "multi_gpu_train.yaml" else {}
    merged.update(yaml.safe_load(text))
    flag_line = merged["flags"]
    booleans = [k for k, v in merged.items() if "#" not in k and (isinstance(v, bool) or k in ("amp", "resume", "streaming"))]
    assert booleans, name
    for key in booleans:
        assert f"{key}=@{key}" in flag_line, f"{name}: boolean key {key} is not parsed by flags"
        uses = [line for line in text.splitlines() if re.search(rf"@{key}\b", line) and not line.lstrip().startswith("flags:")]
        assert not uses, f"{name}: raw boolean @{key} used outside flags: {uses}"
    parsed = " ".join(yaml.safe_load((CONFIGS / f).read_text())["flags"] for f in ("train.yaml", "inference.yaml", "evaluate.yaml"))
    for overlay in (ROOT / "configs").glob("*.yaml"):  # overlays set values only; the entry config that uses them parses them
        for key, value in yaml.safe_load(overlay.read_text()).items():
            if isinstance(value, bool):
                assert f"{key}=@{key}" in parsed, (overlay, key)


@pytest.mark.slow
def test_resume_false_does_not_resume_and_a_longer_resume_continues_the_schedule(tmp_path):
    """--resume false (lower case) trains afresh; --resume true --num_epochs 8 after a 4-epoch run with
    lr_power 0.9 trains epochs 5-8 at the 8-epoch schedule's rates (not 0), and the weights change."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = train(tmp_path, "--num_epochs", "4", "--lr_power", "0.9", "--resume", "false")
    assert first.returncode == 0, first.stderr[-3000:]  # the old bug: 'false' resumed, and found no checkpoint
    final4 = torch.load(tmp_path / "models/model_final.pt", weights_only=True)
    second = train(tmp_path, "--num_epochs", "8", "--lr_power", "0.9", "--resume", "true")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Epoch: 5/8" in second.stderr + second.stdout and "Epoch: 4/8," not in second.stderr + second.stdout

    events = EventAccumulator(str(tmp_path / "eval"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("learning_rate")}
    expected = {e + 1: 1e-3 * (1 - e / 4) ** 0.9 for e in range(4)} | {e + 1: 1e-3 * (1 - e / 8) ** 0.9 for e in range(4, 8)}
    assert sorted(logged) == list(range(1, 9))
    np.testing.assert_allclose([logged[k] for k in sorted(logged)], [expected[k] for k in sorted(expected)], rtol=1e-5)
    final8 = torch.load(tmp_path / "models/model_final.pt", weights_only=True)
    assert not torch.equal(final8["head.weight"], final4["head.weight"])  # epochs 5-8 trained


def test_polynomial_decay_matches_torch_and_resumes_to_a_longer_run():
    param = [torch.nn.Parameter(torch.zeros(1))]
    ours, torchs = torch.optim.SGD(param, lr=0.1), torch.optim.SGD(param, lr=0.1)
    a, b = PolynomialDecay(ours, 4, 0.9), torch.optim.lr_scheduler.PolynomialLR(torchs, total_iters=4, power=0.9)
    for _ in range(4):
        assert ours.param_groups[0]["lr"] == pytest.approx(torchs.param_groups[0]["lr"], rel=1e-12)
        ours.step(), torchs.step(), a.step(), b.step()
    assert ours.param_groups[0]["lr"] == 0.0
    longer = torch.optim.SGD(param, lr=0.1)
    c = PolynomialDecay(longer, 8, 0.9)
    longer.load_state_dict(ours.state_dict())  # lr 0, as the finished run left it
    c.load_state_dict(a.state_dict())
    assert c.last_epoch == 4 and longer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**0.9, rel=1e-12)


# ------------------------------------------------------------------ diverged training
@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_earlier_checkpoints(tmp_path):
    done = train(tmp_path, "--num_epochs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    models = tmp_path / "models"
    before = {p.name: p.read_bytes() for p in models.glob("model*.pt")}
    assert sorted(before) == ["model.pt", "model_final.pt"]
    diverged = train(tmp_path, "--num_epochs", "3", "--learning_rate", "1000000", "--optimizer_name", "sgd")
    assert diverged.returncode != 0
    message = re.search(r"training stopped: the loss became (nan|inf) at epoch (\d+), iteration (\d+) \(learning rate 1e\+06\)", diverged.stderr)
    assert message, diverged.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in models.glob("model*.pt")} == before  # best and final of the earlier run
    for path in models.glob("*.pt"):  # whatever is on disk is finite
        state = torch.load(path, weights_only=True)
        state = state.get("model", state)
        assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor)), path
    net = load_checkpoint(UNet(features=FEATURES), models / "model_final.pt")
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------ checkpoints record the architecture
def test_checkpoints_record_the_architecture_and_older_ones_still_load(tmp_path):
    state = tiny_net(padding="same", norm="batch").state_dict()
    assert state["_extra_state"] == {"architecture": {
        "spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": FEATURES, "padding": "same",
        "norm": "batch", "convs_per_level": 2, "kernel_size": 3}}
    torch.save(state, tmp_path / "same.pt")
    with pytest.raises(ValueError, match=r"padding: checkpoint 'same', network 'valid'; norm: checkpoint 'batch', network 'instance'"):
        load_checkpoint(UNet(features=FEATURES, norm="instance"), tmp_path / "same.pt")  # instance norm: no buffers
    legacy = {k: v for k, v in tiny_net().state_dict().items() if k != "_extra_state"}  # saved before the record
    torch.save(legacy, tmp_path / "legacy.pt")
    loaded = load_checkpoint(UNet(features=FEATURES), tmp_path / "legacy.pt")
    assert torch.equal(loaded.head.weight, legacy["head.weight"])


@pytest.mark.slow
def test_inference_builds_the_network_the_checkpoint_records(tmp_path):
    """No network keys at inference: a same-padded, batch-normalised, 1-channel checkpoint is predicted
    as that network (equal to OverlapTileInferer on it); a legacy checkpoint with --architecture."""
    from pipeline.checkpoints import network_from_checkpoint
    from pipeline.inferers import OverlapTileInferer
    from pipeline.transforms import NormalizeSectionsd, foreground_probability

    net = tiny_net(padding="same", norm="batch", out_channels=1)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    stack = to_uint8(make_stack((2, 40, 44), seed=7)[0])
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    proc = infer(tmp_path, "--input_path", str(tmp_path / "stack.tif"), "--write", "['probabilities']")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, _ = read_image(tmp_path / "out/probabilities/stack.tif")
    x = NormalizeSectionsd(keys="x")({"x": torch.from_numpy(stack[None].astype(np.float32))})["x"]
    want = foreground_probability(OverlapTileInferer()(x[None], net)[0]).numpy()
    assert got.shape == (2, 40, 44) and np.abs(got - want).max() <= 1e-5

    legacy = {k: v for k, v in tiny_net().state_dict().items() if k != "_extra_state"}
    torch.save(legacy, tmp_path / "legacy.pt")
    with pytest.raises(ValueError, match=r"legacy.pt' records no architecture"):
        network_from_checkpoint(tmp_path / "legacy.pt")
    rebuilt = network_from_checkpoint(tmp_path / "legacy.pt", {"features": FEATURES})
    assert not rebuilt.training and torch.equal(rebuilt.head.weight, legacy["head.weight"])


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


# ------------------------------------------------------------------ TIFF series, zarr chunks
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
