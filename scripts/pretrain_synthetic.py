#!/usr/bin/env python
"""Make the shipped pretrained weights (``init_from: synthetic``): the CPU recipe's network trained on synthetic EM.

Runs the bundle's training with ``configs/em_cpu.yaml`` (the network: features 16..256, valid
convolutions, BatchNorm, 2 output channels) and ``configs/pretrain_synthetic.yaml`` (200 synthetic
512 x 512 images from ``pipeline.synthetic``, a fixed number of epochs, seed 0), then copies
``model_final.pt`` to ``pipeline/pretrained/synthetic_unet16_valid_bn.pt`` and writes
``synthetic_unet16_valid_bn.json`` beside it (command, epochs, seconds, torch version, sha256).

The data are generated from seeds and the run is a fixed number of epochs, so the weights depend on
the code, the seed, the torch build and the number of threads only; ``--check`` trains again into a
temporary folder and compares the result bit for bit with the shipped file.

Usage::

    python scripts/pretrain_synthetic.py                      # ~1 h on 2 cores (20 epochs x 192 iterations)
    python scripts/pretrain_synthetic.py --num_epochs 1 --out /tmp/pre.pt   # a short run elsewhere
    python scripts/pretrain_synthetic.py --check              # reproduce and compare with the shipped file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["bundles/em_unet/configs/train.yaml", "configs/em_cpu.yaml", "configs/pretrain_synthetic.yaml"]
SHIPPED = REPO / "pipeline" / "pretrained" / "synthetic_unet16_valid_bn.pt"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(work: Path, threads: int, extra: list[str]) -> tuple[Path, list[str], float]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr([str(REPO / c) for c in CONFIGS]),
           "--ckpt_dir", str(work / "models"), "--output_dir", str(work / "eval"),
           "--data_cache_dir", str(work / "data"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return work / "models" / "model_final.pt", cmd, time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the weights depend on it; default 2)")
    ap.add_argument("--num_epochs", type=int, default=None, help="override the overlay's num_epochs")
    ap.add_argument("--out", type=Path, default=SHIPPED, help=f"where the weights go (default {SHIPPED})")
    ap.add_argument("--work-dir", type=Path, default=None, help="training folder (default: a temporary one)")
    ap.add_argument("--check", action="store_true", help="train again and compare with the file recorded at --out")
    args = ap.parse_args()
    import torch

    extra = ["--num_epochs", str(args.num_epochs)] if args.num_epochs else []
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="pretrain_synthetic_"))
    made, cmd, seconds = train(work, args.threads, extra)
    if args.check:
        record = json.loads(args.out.with_suffix(".json").read_text())
        same = sha256(made) == record["sha256"]
        print(f"{made}: sha256 {sha256(made)}; recorded {record['sha256']}: {'identical' if same else 'DIFFERENT'}")
        sys.exit(0 if same else 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(made, args.out)
    record = dict(made=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), seconds=round(seconds),
                  command=" ".join(cmd[1:]).replace(str(work), "<work>").replace(str(REPO) + "/", ""),
                  configs=CONFIGS, num_epochs=args.num_epochs, threads=args.threads, torch=torch.__version__,
                  bytes=args.out.stat().st_size, sha256=sha256(args.out))
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({record['bytes'] / 1e6:.1f} MB) and its record {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
