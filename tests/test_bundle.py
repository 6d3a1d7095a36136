"""End-to-end: the real bundle CLI trains, writes a checkpoint and TensorBoard events."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.networks import UNet

from conftest import CONFIGS, ROOT, TINY_TRAIN, bundle, train_args

def run_bundle(tmp_path, *overrides, run_id="training", check=True):
    proc = bundle(*train_args(tmp_path, *TINY, *overrides, run_id=run_id))
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


TINY = [*TINY_TRAIN, "--num_epochs", "2", "--val_interval", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("loss_name, channels", [("dice_ce", 2), ("bce", 1)])
def test_train_bundle_end_to_end(tmp_path, loss_name, channels):
    run_bundle(tmp_path, "--loss_name", loss_name, "--out_channels", str(channels))
    best, final = tmp_path / "models/model.pt", tmp_path / "models/model_final.pt"
    assert best.is_file() and final.is_file()

    net = UNet(out_channels=channels, features=(4, 8, 16, 32, 64))
    state = torch.load(final, map_location="cpu", weights_only=True)
    net.load_state_dict(state)  # strict: same architecture, every key present
    assert any(not torch.equal(state[k], v) for k, v in UNet(out_channels=channels, features=(4, 8, 16, 32, 64)).state_dict().items() if isinstance(v, torch.Tensor))

    events = EventAccumulator(str(tmp_path / "eval"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "learning_rate", "val_mean_dice", "val_dice_membrane", "val_dice_interior"} <= tags
    # image panels (input | label | prediction | weight map) for the 2 validation samples
    assert set(events.Tags()["images"]) == {"validation/sample_0", "validation/sample_1"}
    panel = events.Images("validation/sample_0")[0]
    assert (panel.height, panel.width) == (96, 4 * 96 + 4 * 2)
    assert len(events.Scalars("train_loss")) == 2 * 3  # 2 epochs x 3 training images, batch 1
    assert [e.step for e in events.Scalars("val_mean_dice")] == [1, 2]
    assert events.Scalars("learning_rate")[0].value == pytest.approx(0.001)
    # the mean Dice is the mean of the two per-class scores
    for mean, a, b in zip(*(events.Scalars(t) for t in ("val_mean_dice", "val_dice_membrane", "val_dice_interior"))):
        assert mean.value == pytest.approx((a.value + b.value) / 2, abs=1e-5)


@pytest.mark.slow
def test_run_id_run_and_bad_patch_size(tmp_path):
    proc = run_bundle(tmp_path / "bad", "--patch_size", "[221,220]", run_id="run", check=False)
    assert proc.returncode != 0
    assert "axis 0: 221 (nearest valid: 220 or 236)" in proc.stderr
    run_bundle(tmp_path, "--num_epochs", "1", run_id="run")
    assert (tmp_path / "models/model_final.pt").is_file()


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(tmp_path):
    run_bundle(tmp_path, "--weight_w0", "10", "--loss_name", "weighted_ce")
    assert (tmp_path / "models/checkpoint_epoch=2.pt").is_file()
    ckpt = torch.load(tmp_path / "models/checkpoint_epoch=2.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(ckpt) and ckpt["trainer"]["iteration"] == 2 * 3
    second = run_bundle(tmp_path, "--loss_name", "weighted_ce", "--num_epochs", "3", "--resume", "true")
    log = second.stdout + second.stderr
    assert "Epoch: 3/3" in log and "Epoch: 1/3" not in log and "Epoch: 2/3" not in log
    assert (tmp_path / "models/checkpoint_epoch=3.pt").is_file()  # the newest is what a next resume reads
    fresh = run_bundle(tmp_path / "other", "--resume", "true", check=False)
    assert fresh.returncode != 0 and "holds no checkpoint_epoch=<N>.pt" in fresh.stderr


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path):
    """--seed makes a run reproducible: the initial weights are drawn after seeding (the pre-flight
    builds the network, so set_determinism runs before it), as are shuffling and augmentation."""
    finals = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        run_bundle(tmp_path / name, "--num_epochs", "1", "--seed", seed)
        finals.append(torch.load(tmp_path / name / "models/model_final.pt", weights_only=True))
    a, b, c = finals
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    assert not torch.equal(a["head.weight"], c["head.weight"])


OVERLAYS = [None, *sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_verify_net_in_out_for_every_shipped_overlay(overlay):
    """MONAI's own check of the network against the bundle metadata, for train.yaml and every overlay in
    configs/; an overlay that changes channels or sizes ships a metadata fragment beside it
    (configs/<name>_metadata.json), merged after metadata.json with --meta_file "['...', '...']"."""
    from monai.bundle import verify_net_in_out

    configs = [str(CONFIGS / "train.yaml")] + ([str(ROOT / "configs" / overlay)] if overlay else [])
    meta = [str(CONFIGS / "metadata.json")]
    if overlay and (ROOT / "configs" / overlay.replace(".yaml", "_metadata.json")).is_file():
        meta.append(str(ROOT / "configs" / overlay.replace(".yaml", "_metadata.json")))
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=configs, n=2)  # raises on a mismatch
    if overlay == "seed_variant.yaml":  # the fragment is what makes it pass
        with pytest.raises(ValueError, match="output channel number `1` doesn't match: `2`"):
            verify_net_in_out(net_id="network_def", meta_file=meta[:1], config_file=configs, n=2)
