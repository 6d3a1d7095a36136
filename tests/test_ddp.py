"""Multi-process (DDP) training: multi_gpu_train.yaml merged over train.yaml, launched with torchrun.

The end-to-end tests start 2 real processes on CPU (gloo backend) for a tiny 2-epoch run.
"""

import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from monai.bundle import ConfigParser

from pipeline.networks import UNet

from conftest import MULTI, ROOT, TINY_TRAIN, TRAIN

# 5 images, 2 of them for validation -> 3 training images
TINY = [*TINY_TRAIN, "--num_epochs", "2", "--val_interval", "1"]
N_TRAIN, NPROC = 3, 2
RANK0_ONLY = "$@rank > 0"  # the overlay's _disabled_ value of a rank-0-only handler


def torchrun(ckpt_dir, output_dir, data_dir, *overrides, nproc=NPROC):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "monai.bundle", "run", "training",
        "--config_file", str([TRAIN, MULTI]),
        "--ckpt_dir", str(ckpt_dir), "--output_dir", str(output_dir), "--data_cache_dir", str(data_dir),
        *TINY, *overrides,
    ]
    # CPU and gloo even where GPUs exist; one thread per process on a small machine
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    finished = all(f"em_unet ddp: rank {r}/{nproc} finished" in log for r in range(nproc))
    if proc.returncode != 0 and finished and "terminate called without an active exception" in log:
        # gloo's exit race (bundle README): made unlikely by multi_gpu_train.yaml's finalize (0 in 56 runs,
        # ~1 in 20 before), not impossible; after every rank has finished: the assertions on the outputs still run
        warnings.warn(f"torchrun: a rank aborted in teardown after finishing (rc {proc.returncode})")
        return log
    assert proc.returncode == 0, log[-6000:]
    return log


def assert_both_ranks_finished(log, nproc=NPROC):
    for rank in range(nproc):
        assert log.count(f"em_unet ddp: rank {rank}/{nproc} finished") == 1, log[-3000:]


def test_train_yaml_is_rank_aware_and_the_overlay_only_sets_the_rank():
    """train.yaml's writers carry `_disabled_: "$@rank > 0"`; the overlay redefines no list of train.yaml."""
    base = ConfigParser()
    base.read_config(TRAIN)
    every_rank = {"ValidationHandler", "pipeline.handlers.StopOnNonFiniteLoss"}  # the others log or write files
    # the learning rate: an epoch schedule or a time budget (one of the two, on every rank)
    by_budget = {"LrScheduleHandler": "$pipeline.checks.optional(@train_minutes) is not None",
                 "pipeline.handlers.TrainingTimeBudget": "$pipeline.checks.optional(@train_minutes) is None"}
    for handler in base["train#handlers"]:
        expected = None if handler["_target_"] in every_rank else by_budget.get(handler["_target_"], RANK0_ONLY)
        assert handler.get("_disabled_") == expected, handler["_target_"]
    for handler in base["validate#handlers"]:  # all of them log or write files
        assert handler.get("_disabled_") == RANK0_ONLY, handler["_target_"]
    assert base["checkpointing#saver#_disabled_"] == RANK0_ONLY
    assert base["rank"] == 0 and base["initialize"][0] == "@distributed_setup" and base["distributed_setup"] == []

    overlay = ConfigParser.load_config_file(MULTI)
    assert set(overlay) == {
        "device", "rank", "world_size", "network", "distributed_setup", "finalize",
        "train#sampler", "train#dataloader#sampler", "train#dataloader#shuffle",
        "validate#sampler", "validate#dataloader#sampler", "validate#evaluator#network",
    }
    parser = ConfigParser()
    parser.read_config([TRAIN, MULTI])
    assert parser["train#dataloader#shuffle"] is False and parser["train#dataloader#sampler"] == "@train#sampler"
    assert parser["validate#dataloader#sampler"] == "@validate#sampler"


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One 2-process, 2-epoch run; returns its folders and log."""
    root = tmp_path_factory.mktemp("ddp")
    log = torchrun(root / "models", root / "eval", root / "data")
    return root, log


@pytest.mark.slow
def test_torchrun_two_processes(ddp_run):
    root, log = ddp_run
    assert_both_ranks_finished(log)

    # checkpointing on rank 0 only: one set of files, plain (unwrapped) state dicts
    models = root / "models"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_epoch=2.pt", "model.pt", "model_final.pt"]
    for name in ("model.pt", "model_final.pt"):
        state = torch.load(models / name, map_location="cpu", weights_only=True)
        assert not any(k.startswith("module.") for k in state)
        UNet(out_channels=2, features=(4, 8, 16, 32, 64)).load_state_dict(state)  # strict
    ckpt = torch.load(models / "checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"])
    # DistributedSampler: each rank runs ceil(3 / 2) = 2 iterations per epoch (3 single-process),
    # the odd image padded by repeating one
    per_epoch = math.ceil(N_TRAIN / NPROC)
    assert ckpt["trainer"]["epoch_length"] == per_epoch and ckpt["trainer"]["iteration"] == 2 * per_epoch

    # logging on rank 0 only (ranks > 0 log warnings only)
    assert log.count("Train completed, saved final checkpoint") == 1
    assert log.count("SupervisedTrainer - INFO - Engine run resuming") == 1  # the trainer's start line
    assert log.count("Epoch[1] Metrics") == 1 and log.count("Epoch[2] Metrics") == 1
    assert "Epoch: 1/2, Iter: 2/2" in log and f"Iter: {per_epoch + 1}/" not in log

    # TensorBoard on rank 0 only: one event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events_files = list((root / "eval").glob("events.out.tfevents.*"))
    assert len(events_files) == 1, events_files
    events = EventAccumulator(str(root / "eval"))
    events.Reload()
    assert len(events.Scalars("train_loss")) == 2 * per_epoch
    # validation is split too (1 of the 2 images per rank), its metrics gathered from both ranks
    assert [e.step for e in events.Scalars("val_mean_dice")] == [1, 2]
    assert set(events.Tags()["images"]) == {"validation/sample_0", "validation/cells_0"}  # rank 0's share

    # the synthetic data was written once, completely
    data = root / "data"
    assert (data / "manifest.json").is_file() and not list(data.rglob("*.tmp"))
    assert len(list((data / "images").glob("*.tif"))) == 5


@pytest.mark.slow
def test_torchrun_resume(ddp_run, tmp_path):
    root, _ = ddp_run
    shutil.copytree(root / "models", tmp_path / "models")
    log = torchrun(tmp_path / "models", tmp_path / "eval", root / "data", "--num_epochs", "3", "--resume", "true")
    assert_both_ranks_finished(log)
    assert "Restored all variables" in log
    assert "Epoch: 3/3" in log and "Epoch: 1/3" not in log and "Epoch: 2/3" not in log
    ckpt = torch.load(tmp_path / "models/checkpoint_epoch=3.pt", map_location="cpu", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 3 * math.ceil(N_TRAIN / NPROC)
