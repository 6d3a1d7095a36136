"""Faults: SIGKILL during training then resume, SIGKILL during inference, atomic checkpoints."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
from ignite.engine import Engine

from pipeline.checkpoints import CheckpointSaver, latest_checkpoint
from pipeline.io import read_image
from pipeline.networks import UNet
from pipeline.synthetic import make_stack, to_uint8

from conftest import FEATURES, INFER, ROOT, TINY_TRAIN, train_args

# 5 synthetic images, 2 for validation -> 3 iterations per epoch; 4 epochs; a checkpoint per epoch
TINY = [*TINY_TRAIN, "--num_epochs", "4", "--val_interval", "2", "--ckpt_interval", "1"]


def train_cmd(tmp, *extra):
    return [sys.executable, "-m", "monai.bundle", *train_args(tmp, *TINY, *extra)]


def start(cmd, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc, ready, timeout=300):
    """SIGKILL the process group as soon as ``ready()`` holds; fail if the process ends first."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, "the run ended before the fault could be injected"
        assert time.time() - t0 < timeout, "timed out waiting for the moment to kill"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_kill_9_during_training_then_resume(tmp_path):
    log = open(tmp_path / "first.log", "w")
    proc = start(train_cmd(tmp_path), log)
    kill_when(proc, lambda: (tmp_path / "models/checkpoint_epoch=2.pt").is_file())
    saved = sorted(p.name for p in (tmp_path / "models").glob("checkpoint_*.pt"))
    # n_saved=1: the old file goes only after its successor is complete, so one or two are on disk
    assert saved in (["checkpoint_epoch=2.pt"], ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"], ["checkpoint_epoch=3.pt"]), saved
    saved = saved[-1:]
    killed_at = torch.load(tmp_path / "models" / saved[0], weights_only=True)["trainer"]["iteration"] // 3
    assert not (tmp_path / "models/model_final.pt").exists()

    resumed = subprocess.run(train_cmd(tmp_path, "--resume", "true"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    first_epoch = killed_at + 1
    assert f"Epoch: {first_epoch}/4" in out and f"Epoch: {first_epoch - 1}/4," not in out  # at most one interval redone
    final = torch.load(tmp_path / "models/checkpoint_epoch=4.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 4 * 3  # the same total as an uninterrupted run
    net = UNet(features=FEATURES)
    net.load_state_dict(torch.load(tmp_path / "models/model_final.pt", weights_only=True))  # complete and loadable
    own = net.state_dict()
    assert own.pop("_extra_state") == final["model"].pop("_extra_state")  # the architecture record
    torch.testing.assert_close(own, final["model"])
    names = sorted(p.name for p in (tmp_path / "models").iterdir())  # no temporary files; a next resume reads epoch 4
    # (the killed run's last checkpoint stays: ignite's n_saved only tracks files of its own process)
    assert names[-3:] == ["checkpoint_epoch=4.pt", "model.pt", "model_final.pt"] and len(names) <= 4, names
    assert latest_checkpoint(tmp_path / "models").endswith("checkpoint_epoch=4.pt")


@pytest.mark.slow
def test_kill_9_during_inference_leaves_no_corrupt_output(tmp_path):
    torch.manual_seed(0)
    torch.save(UNet(features=FEATURES).state_dict(), tmp_path / "model.pt")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(12):
        tifffile.imwrite(inputs / f"s{i:02d}.tif", to_uint8(make_stack((2, 300, 300), seed=i)[0]), photometric="minisblack")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", INFER,
           "--checkpoint", str(tmp_path / "model.pt"), "--input_path", str(inputs), "--output_dir", str(out),
           "--write", "['probabilities']"]
    log = open(tmp_path / "infer.log", "w")
    proc = start(cmd, log)
    written = lambda: sorted((out / "probabilities").glob("s*.tif")) if (out / "probabilities").is_dir() else []
    kill_when(proc, lambda: len(written()) >= 2)
    done = written()
    assert 2 <= len(done) < 12, "kill the run while it is predicting"
    for path in done:  # every file under an output name is complete
        array, _ = read_image(path)
        assert array.shape == (2, 300, 300) and np.isfinite(array).all()
    leftovers = [p.name for p in (out / "probabilities").iterdir() if p not in done]
    assert len(leftovers) <= 1 and all(n.startswith(".s") and n.endswith(".tmp") for n in leftovers), leftovers

    rerun = subprocess.run(cmd + ["--overwrite", "true"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert [p.name for p in written()] == [f"s{i:02d}.tif" for i in range(12)]


def test_checkpoint_saver_is_atomic(tmp_path):
    """A save that fails half-way leaves the previous checkpoint byte-identical and no temporary file."""
    net = UNet(features=FEATURES)
    saver = CheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_final=True, final_filename="model_final.pt")
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    before = (tmp_path / "model_final.pt").read_bytes()
    saved, own = torch.load(tmp_path / "model_final.pt", weights_only=True), net.state_dict()
    assert saved.pop("_extra_state") == own.pop("_extra_state")
    torch.testing.assert_close(saved, own)

    class Exploding(torch.nn.Module):  # raises while torch.save is writing the file
        def state_dict(self, *a, **k):
            return {"w": torch.zeros(1000), "boom": _Unpicklable()}

    failing = CheckpointSaver(save_dir=str(tmp_path), save_dict={"model": Exploding()}, save_final=True, final_filename="model_final.pt")
    engine = Engine(lambda e, b: None)
    failing.attach(engine)
    with pytest.raises(Exception, match="cannot pickle"):
        engine.run([0], max_epochs=1)
    assert (tmp_path / "model_final.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_final.pt"]


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("cannot pickle this on purpose")


def test_resume_picks_the_latest_run_not_the_largest_epoch(tmp_path, caplog):
    """A fresh run into a folder holding an older, longer run's checkpoint resumes from its own."""
    models = tmp_path / "models"
    models.mkdir()
    old, new = models / "checkpoint_epoch=16.pt", models / "checkpoint_epoch=4.pt"
    for path, mtime in ((old, 1_000_000), (new, 2_000_000)):
        path.write_bytes(b"")
        os.utime(path, (mtime, mtime))
    (models / "checkpoint_notes=1.txt").write_bytes(b"")  # not a checkpoint
    with caplog.at_level("WARNING"):
        assert latest_checkpoint(str(models)) == str(new)
    assert "checkpoint_epoch=16.pt" in caplog.text and "not used" in caplog.text
    os.utime(old, (3_000_000, 3_000_000))  # the higher number is also the newer one: it wins, silently
    caplog.clear()
    assert latest_checkpoint(str(models)) == str(old)
    assert caplog.text == ""
