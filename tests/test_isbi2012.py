"""Training on the real ISBI 2012 data with the real configs (skipped when the data is absent)."""

import os
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TRAIN, bundle, train_args

DATA = Path(os.environ.get("EM_DATA_DIR", ROOT.parent / "shared" / "data")) / "isbi2012"
pytestmark = pytest.mark.skipif(
    not (DATA / "train-volume.tif").is_file(),
    reason=f"ISBI 2012 data not found in {DATA} (set EM_DATA_DIR to the folder holding isbi2012/)",
)


@pytest.mark.slow
def test_paper_recipe_loss_falls_on_isbi(tmp_path):
    configs = (TRAIN, str(ROOT / "configs/isbi2012.yaml"), str(ROOT / "configs/em_cpu.yaml"))
    proc = bundle(*train_args(
        tmp_path, "--dataset_dir", str(DATA), "--train_minutes", "null",  # the CPU recipe, 3 epochs instead of 20 minutes,
        "--init_from", "null",  # from random weights: the recipe's pieces learn (the pretrained start is benchmarked)
        "--num_epochs", "3", "--val_interval", "3", "--log_interval", "1", configs=configs,
    ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"train_loss: ([0-9.]+)", proc.stdout + proc.stderr)]
    assert len(losses) == 3 * 20  # 20 training sections (0-19), batch 1
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.85 * first, (first, last)
    assert (tmp_path / "models/model.pt").is_file()
