"""End-to-end: the real bundle CLI trains, writes a checkpoint and TensorBoard events."""

import re

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline.checkpoints import load_checkpoint
from pipeline.networks import UNet

from conftest import CONFIGS, FEATURES, ROOT, TINY_TRAIN, bundle, train_args

def run_bundle(tmp_path, *overrides, run_id="training", check=True):
    proc = bundle(*train_args(tmp_path, *TINY, *overrides, run_id=run_id))
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


TINY = [*TINY_TRAIN, "--num_epochs", "2", "--val_interval", "1"]


def train(tmp, *extra):
    """A tiny training run, validated every second epoch (the resume and NaN-loss tests)."""
    return bundle(*train_args(tmp, *TINY_TRAIN, "--val_interval", "2", *extra))


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
    assert set(events.Tags()["images"]) == {f"validation/{kind}_{i}" for kind in ("sample", "cells") for i in (0, 1)}  # panels, instances
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


@pytest.mark.slow
def test_init_from_starts_training_from_those_weights(tmp_path):
    """--init_from: training starts from a checkpoint's weights (fine-tuning); one of another
    architecture is refused by the pre-flight, naming the key, before anything is written."""
    run_bundle(tmp_path / "a", "--num_epochs", "1", "--seed", "0")
    start = torch.load(tmp_path / "a/models/model_final.pt", weights_only=True)
    # a learning rate of 1e-12 keeps the weights where they started, to ~1e-11 (Adam steps ~ lr)
    run_bundle(tmp_path / "b", "--num_epochs", "1", "--seed", "1", "--learning_rate", "1e-12",
               "--init_from", str(tmp_path / "a/models/model_final.pt"))
    tuned = torch.load(tmp_path / "b/models/model_final.pt", weights_only=True)
    scratch = UNet(features=(4, 8, 16, 32, 64)).state_dict()  # a fresh network: far from `start`
    assert torch.allclose(tuned["head.weight"], start["head.weight"], atol=1e-9)
    assert all(torch.allclose(tuned[k], start[k], atol=1e-9) for k in start if k.endswith("weight"))
    assert not torch.allclose(scratch["head.weight"], start["head.weight"], atol=1e-3)
    wrong = run_bundle(tmp_path / "c", "--features", "[8,16,32,64,128]", "--init_from",
                       str(tmp_path / "a/models/model_final.pt"), check=False)
    assert wrong.returncode != 0
    assert "init_from" in wrong.stderr and "features: checkpoint [4, 8, 16, 32, 64], network [8, 16, 32, 64, 128]" in wrong.stderr
    assert not (tmp_path / "c/models").exists() or not any((tmp_path / "c/models").iterdir())


def test_init_from_names_and_missing_files(tmp_path):
    from pipeline.checkpoints import init_weights, pretrained_path

    net = UNet(features=(4, 8, 16, 32, 64))
    before = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    assert init_weights(net, None) is None and init_weights(net, "null") is None
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if isinstance(v, torch.Tensor))
    with pytest.raises(FileNotFoundError, match="nothing.pt': no such file; valid: synthetic, a checkpoint path, or null"):
        init_weights(net, str(tmp_path / "nothing.pt"))
    with pytest.raises(ValueError, match="'imagenet' names no shipped weights; valid: synthetic"):
        pretrained_path("imagenet")


def test_shipped_pretrained_weights_match_their_record_and_load_into_the_cpu_recipe():
    """pipeline/pretrained/: the weights are the file scripts/pretrain_synthetic.py recorded (sha256), and
    init_from synthetic puts them into the network of configs/em_cpu.yaml."""
    import hashlib
    import json

    from pipeline.checkpoints import init_weights, pretrained_path

    path = pretrained_path("synthetic")
    record = json.loads(path.with_suffix(".json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"] and path.stat().st_size < 10e6
    net = UNet(features=(16, 32, 64, 128, 256), padding="valid", norm="batch", dropout=0.0)
    init_weights(net, "synthetic")
    state = torch.load(path, weights_only=True)
    assert torch.equal(net.state_dict()["head.weight"], state["head.weight"])


def test_training_time_budget_counts_iterations_and_decays_the_rate():
    """train_minutes: the budget counts training iterations only (not what runs between epochs, such
    as validation), sets lr = lr0 * (1 - spent / budget) ** power before each iteration, and stops
    the run after the iteration that spends it."""
    import time

    from ignite.engine import Engine, Events

    from pipeline.handlers import TrainingTimeBudget

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.5)
    budget = TrainingTimeBudget(minutes=0.1 / 60, optimizer=optimizer, learning_rate=0.01, power=0.9)
    seen = []

    def step(engine, batch):
        seen.append((optimizer.param_groups[0]["lr"], budget.spent))
        time.sleep(0.01)

    engine = Engine(step)
    budget.attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: time.sleep(0.3))  # "validation": 3x the budget
    engine.run(range(2), max_epochs=1000)
    assert seen[0] == (0.01, 0.0)  # the first iteration trains at the full rate
    assert all(lr == 0.01 * (1 - spent / 0.1) ** 0.9 for lr, spent in seen)
    assert [lr for lr, _ in seen] == sorted((lr for lr, _ in seen), reverse=True)
    assert len(seen) > 2  # the sleeps between epochs were not charged: more than one epoch ran
    assert 0.1 <= engine.state.train_seconds < 0.1 + 0.05 and seen[-1][1] < 0.1  # stopped once spent
    with pytest.raises(ValueError, match="train_minutes must be a positive number"):
        TrainingTimeBudget(minutes=0, optimizer=optimizer, learning_rate=0.01)


@pytest.mark.slow
def test_train_on_a_stack_named_by_images_and_labels(tmp_path):
    """The own-data keys: --images/--labels/--val_slices train on a stack's sections, and the
    synthetic default is not written."""
    import numpy as np
    import tifffile

    from pipeline.synthetic import make_image, to_uint8

    pairs = [make_image((96, 96), seed) for seed in range(5)]
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([to_uint8(image) for image, _ in pairs]))
    tifffile.imwrite(tmp_path / "labels.tif", np.stack([label for _, label in pairs]))
    run_bundle(tmp_path, "--num_epochs", "2", "--images", str(tmp_path / "stack.tif"),
               "--labels", str(tmp_path / "labels.tif"), "--val_slices", "[3,5]")
    events = EventAccumulator(str(tmp_path / "eval"))
    events.Reload()
    assert len(events.Scalars("train_loss")) == 2 * 3  # sections 0-2 train, 3-4 validate
    assert set(events.Tags()["images"]) == {f"validation/{kind}_{i}" for kind in ("sample", "cells") for i in (0, 1)}
    assert not (tmp_path / "data").exists()  # no synthetic dataset was written


@pytest.mark.slow
def test_bundle_zygote_child_behaves_as_a_fresh_process(tmp_path):
    """The tests' bundle runs (forked from ``tests/bundle_zygote.py``) end as ``python -m monai.bundle``
    does in a fresh interpreter: same exit status, same last error line (pipeline.config's excepthook),
    stdout and stderr apart, in the request's environment."""
    import os
    import subprocess
    import sys

    from pathlib import Path

    import monai

    import conftest

    if conftest.ZYGOTE is None:
        pytest.skip("the zygote is off (EM_UNET_TEST_ZYGOTE=0 or no os.fork)")
    args = ["run", "training", "--config_file", str(CONFIGS / "train.yaml"), "--num_epoch", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", EM_UNET_PROBE="zygote")
    forked = bundle(*args, env=env)
    fresh = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert forked.returncode == fresh.returncode == 1
    last = [p.stderr.strip().splitlines()[-1] for p in (forked, fresh)]
    assert last[0] == last[1] and last[0].startswith("error: ValueError: unknown config key(s): --num_epoch (did you mean --num_epochs?)")
    (tmp_path / "probe.json").write_text(
        """{"probe": "$print(__import__('os').environ['EM_UNET_PROBE'], __import__('os').getcwd(), __import__('sys').argv[0])"}""")
    probe = bundle("run", "probe", "--config_file", str(tmp_path / "probe.json"), env=env)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().splitlines()[-1] == f"zygote {ROOT} {Path(monai.__file__).parent / 'bundle/__main__.py'}"


# ------------------------------------------------------------------ resume, diverged training
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


@pytest.mark.slow
def test_evaluate_classes_scores_each_class_by_its_value_and_reports_absent_classes(tmp_path):
    """--label_mode classes, --class_values [0,100,200] of --num_classes 3, labels {0, 200} (classes {0, 2}) in section 0
    and {0} in section 1, a network that calls every pixel class 2: class 1 is absent from every section (NaN, count 0,
    'absent' in the log), class 2 is scored by its value in both sections; whole-stack scores pool the sections."""
    import csv
    import json

    import tifffile

    from conftest import EVALUATE

    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "stack.tif", rng.integers(0, 256, (2, 96, 96), dtype=np.uint8), photometric="minisblack")
    label = np.zeros((2, 96, 96), np.uint8)
    label[0, :, 48:] = 200  # section 0: 4608 pixels of class 0, 4608 of class 2; section 1: 9216 of class 0
    tifffile.imwrite(tmp_path / "classes.tif", label, photometric="minisblack")
    network = UNet(features=FEATURES, out_channels=3)
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))  # class 2 everywhere
    torch.save(network.state_dict(), tmp_path / "model.pt")
    args = ["run", "--config_file", EVALUATE, "--checkpoint", str(tmp_path / "model.pt"), "--images", str(tmp_path / "stack.tif"),
            "--labels", str(tmp_path / "classes.tif"), "--label_mode", "classes", "--num_classes", "3",
            "--class_values", "[0,100,200]", "--class_names", "[bg,membrane,mito]"]
    proc = bundle(*args, "--output_dir", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "ev/report.json").read_text())
    s0, s1 = report["samples"]
    # section 0: bg in the label (4608), never predicted: 0; mito: TP 4608 of pred 9216 + label 4608 -> Dice 2/3, IoU 1/2
    assert (s0["dice_bg"], s0["dice_mito"], s0["iou_mito"]) == pytest.approx((0.0, 2 / 3, 0.5))
    assert s0["mean_dice"] == pytest.approx(1 / 3) and s0["mean_iou"] == pytest.approx(1 / 4)
    # section 1: mito predicted, absent from the label: 0 (not NaN); membrane absent from both: NaN in both sections
    assert (s1["dice_bg"], s1["dice_mito"], s1["mean_dice"]) == (0.0, 0.0, 0.0)
    assert all(s[k] is None for s in (s0, s1) for k in ("dice_membrane", "iou_membrane"))  # strict JSON: null
    mean, count = report["mean"], report["count"]
    assert (mean["dice_bg"], mean["dice_mito"], mean["iou_mito"], mean["mean_dice"]) == pytest.approx((0.0, 1 / 3, 1 / 4, 1 / 6))
    assert mean["dice_membrane"] is None and (count["dice_bg"], count["dice_membrane"], count["dice_mito"]) == (2, 0, 2)
    rows = list(csv.DictReader(open(tmp_path / "ev/report.csv")))
    assert [r["file"] for r in rows] == ["stack.tif", "stack.tif", "mean"] and rows[0]["dice_membrane"] == "nan"
    assert float(rows[2]["dice_mito"]) == pytest.approx(1 / 3) and rows[2]["dice_membrane"] == "nan"
    assert ("evaluation report: mean_dice=0.1667, mean_iou=0.1250, dice_bg=0.0000, dice_membrane=absent (in 0 of 2), "
            "dice_mito=0.3333") in proc.stdout + proc.stderr
    # the stack scored whole: bg 13824 in the label, none predicted; mito TP 4608 / (18432 + 4608) -> Dice 2/5, IoU 1/4
    proc = bundle(*args, "--output_dir", str(tmp_path / "ev3d"), "--eval_volumes", "true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whole,) = json.loads((tmp_path / "ev3d/report.json").read_text())["samples"]
    assert (whole["dice_bg"], whole["dice_mito"], whole["iou_mito"], whole["mean_dice"]) == pytest.approx((0.0, 0.4, 0.25, 0.2))
    assert whole["dice_membrane"] is None
