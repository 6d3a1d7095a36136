#!/usr/bin/env python
"""Training throughput: the bundle's trainer iteration against a bare forward/backward/step loop.

For each ``--setup``, in one process:

``bare``     the network, loss and optimizer that the bundle config builds, in a plain loop over
             one fixed batch (taken from the bundle's own data loader): ``zero_grad``,
             forward, loss, backward, ``step``. Forward, backward and step are timed separately too.
``trainer``  the bundle's ``SupervisedTrainer`` exactly as ``python -m monai.bundle run training``
             builds it (``bundles/em_unet/configs/train.yaml`` + the setup's overlay): data loader,
             random transforms (crop, elastic deformation, flips, ...), weight map, loss,
             handlers (log, TensorBoard, progress bar, LR schedule). It stops after ``--iterations``.
``data``     the bundle's data loader alone: the transforms' cost per batch.

The time of an iteration is measured from one ITERATION_COMPLETED to the next, and
``--warmup`` iterations are skipped. Each figure is the median. The ratio is
trainer / bare (target <= 1.10). Setups:

``quickstart``  configs/quickstart.yaml: widths 16..256, 380x380 tiles, batch 1, Adam.
``paper``       the paper's network: widths 64..1024, 572x572 tiles, batch 1, SGD 0.99, weighted CE
                with the border weight map. Slow on a CPU (~10 s per iteration on 2 cores).

Usage::

    python scripts/benchmark_training.py                                 # quickstart, 12 iterations
    python scripts/benchmark_training.py --setups quickstart paper --iterations 6 --warmup 2
    python scripts/benchmark_training.py --channels-last                 # network in channels_last
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from _machine import cpu_model  # noqa: E402

SETUPS = {
    "quickstart": (["configs/quickstart.yaml"], {}),
    "paper": ([], {"loss_name": "weighted_ce", "patch_size": [572, 572]}),
}


def build(setup: str, work: Path, channels_last: bool):
    from monai.bundle import ConfigParser

    overlays, values = SETUPS[setup]
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles/em_unet/configs/train.yaml")] + [str(REPO / o) for o in overlays])
    values = {**values, "ckpt_dir": str(work / "models"), "output_dir": str(work / "eval"),
              "data_cache_dir": str(work / "data"), "num_epochs": 1000, "val_interval": 1000,
              "bundle_root": str(REPO / "bundles/em_unet")}
    for key, value in values.items():
        parser[key] = value
    parser.parse()
    parser.get_parsed_content("initialize")
    if channels_last:
        parser.get_parsed_content("network").to(memory_format=torch.channels_last)
    return parser


def median_intervals(stamps: list[float], warmup: int) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]
    return statistics.median(gaps)


def time_trainer(parser, iterations: int, warmup: int) -> float:
    from ignite.engine import Events

    trainer = parser.get_parsed_content("train#trainer")
    stamps: list[float] = []

    def stamp(engine):
        stamps.append(time.perf_counter())
        if len(stamps) > iterations + warmup:
            engine.terminate()

    trainer.add_event_handler(Events.STARTED, lambda e: stamps.append(time.perf_counter()))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, stamp)
    trainer.run()
    return median_intervals(stamps, warmup)


def time_data(parser, iterations: int, warmup: int) -> float:
    loader = parser.get_parsed_content("train#dataloader")
    stamps = [time.perf_counter()]
    it = iter(loader)
    for _ in range(iterations + warmup):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
        stamps.append(time.perf_counter())
    return median_intervals(stamps, warmup)


def time_bare(parser, iterations: int, warmup: int, channels_last: bool) -> dict:
    net = parser.get_parsed_content("network")
    loss_fn = parser.get_parsed_content("loss")
    optimizer = parser.get_parsed_content("optimizer")
    prepare = parser.get_parsed_content("train#trainer").prepare_batch
    device = parser.get_parsed_content("device")
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    image, target = prepare(batch, device)
    plain = lambda x: x.as_tensor() if hasattr(x, "as_tensor") else x  # noqa: E731 (no MetaTensor overhead)
    image, target = plain(image), plain(target)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    net.train()
    parts = {"forward": [], "backward": [], "step": []}
    stamps = [time.perf_counter()]
    for _ in range(iterations + warmup):
        optimizer.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = loss_fn(net(image), target)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        stamps.append(t3)
        for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[k].append(v)
    out = {k: statistics.median(v[warmup:]) for k, v in parts.items()}
    out["iteration"] = median_intervals(stamps, warmup)
    out["batch"] = int(image.shape[0])
    out["tile"] = list(image.shape[2:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", nargs="+", choices=list(SETUPS), default=["quickstart"])
    ap.add_argument("--iterations", type=int, default=12, help="timed iterations per measurement (default 12)")
    ap.add_argument("--warmup", type=int, default=3, help="iterations skipped first (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--channels-last", action="store_true", help="network and input in channels_last")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for setup in args.setups:
        with tempfile.TemporaryDirectory() as tmp:
            parser = build(setup, Path(tmp), args.channels_last)
            data = time_data(parser, args.iterations, args.warmup)
            bare = time_bare(parser, args.iterations, args.warmup, args.channels_last)
            # the trainer gets a fresh network/optimizer state from the same config
            parser = build(setup, Path(tmp) / "t", args.channels_last)
            trainer = time_trainer(parser, args.iterations, args.warmup)
        rows.append(dict(setup=setup, tile=bare["tile"], batch=bare["batch"], data=data, forward=bare["forward"],
                         backward=bare["backward"], step=bare["step"], bare=bare["iteration"], trainer=trainer,
                         ratio=trainer / bare["iteration"], samples_per_s=bare["batch"] / trainer))
    head = ["setup", "tile", "batch", "data s/it", "fwd s", "bwd s", "step s", "bare s/it", "trainer s/it",
            "trainer/bare", "samples/s"]
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_model()}; "
          f"{torch.get_num_threads()} torch threads; torch {torch.__version__}; python {platform.python_version()}; "
          f"channels_last={args.channels_last}")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['setup']} | {'x'.join(map(str, r['tile']))} | {r['batch']} | {r['data']:.3f} | {r['forward']:.3f} | "
              f"{r['backward']:.3f} | {r['step']:.3f} | {r['bare']:.3f} | {r['trainer']:.3f} | {r['ratio']:.3f} | "
              f"{r['samples_per_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
