"""Volumes as volumes (issue 19): 2D vs anisotropic 3D U-Nets on serial-section stacks.

Three parts, each printing a table (docs/benchmarks.md keeps the results):

``flops``    computed / needed FLOPs of the 3D overlap-tile plan on a volume (default 64 x 1024 x 1024): the
             FLOPs of all tiles over those of one pass over the whole mirror-padded volume (what exact
             overlap-tile must equal), counted by ``torch.utils.flop_counter`` on meta tensors (no compute),
             for the anisotropic scheme of a spacing and for the isotropic 3D U-Net, at several memory budgets
             (the ``"auto"`` tile of :func:`pipeline.tiling.make_plan`); and the z-planes each computes for a
             30-section stack. Seconds.
``speed``    inference seconds per megavoxel of a synthetic stack: the 2D CPU-recipe network section by section,
             and the em3d network, contiguous vs channels-last(-3D). Random weights (speed does not depend on them).
``quality``  2D vs 3D at equal CPU training time (``--minutes``), per seed: each trained through the bundle CLI
             (2D: train.yaml + configs/em_cpu.yaml from scratch, sections of the training stacks; 3D:
             train.yaml + configs/em3d.yaml, 3D crops of them), then scored on held-out sections: Dice of the
             cell interior, V_rand (thinned, per section) and pixel error at threshold 0.5, AdaBN as in both
             recipes, no TTA. Data: synthetic stacks with sections 10 px apart (5 training stacks of
             24 x 256 x 256, 2 test stacks of other seeds), and with ``--isbi DIR`` ISBI 2012 as a 25-section
             stack of 50 nm sections (spacing 12.5 x 1 x 1): sections 0-14 train, 20-24 are scored (the 3D network
             reads sections 15-24 as its input, images only).

    python scripts/benchmark_3d.py flops
    python scripts/benchmark_3d.py speed --threads 2
    python scripts/benchmark_3d.py quality --minutes 5 --seeds 0 1 --isbi ../shared/data/isbi2012 --work-dir /tmp/b3d
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.geometry import propose_scheme  # noqa: E402
from pipeline.networks import UNet, memory_format  # noqa: E402
from pipeline.tiling import make_plan  # noqa: E402

CPU_FEATURES = (16, 32, 64, 128, 256)  # the CPU recipe's widths (configs/em_cpu.yaml)
EM3D_FEATURES = (8, 16, 32, 64, 128)  # configs/em3d.yaml


def forward_flops(net: torch.nn.Module, size) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, net.in_channels, *size, device="meta"))
    return counter.get_total_flops()


def cmd_flops(args) -> None:
    shape = tuple(args.volume)
    nets = {
        f"anisotropic {args.spacing}": UNet(spatial_dims=3, features=CPU_FEATURES, dropout=0.0, **propose_scheme(args.spacing)),
        "isotropic 3D": UNet(spatial_dims=3, features=CPU_FEATURES, dropout=0.0),
    }
    print(f"volume {shape}, widths {list(CPU_FEATURES)}: computed / needed FLOPs of the auto tile plan\n")
    print("| network | margins (z, y, x) | memory budget | tile (output) | tiles | computed / needed | z-planes for 30 sections |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, net in nets.items():
        net = net.to("meta").eval()
        g = net.geometry
        m = g.margins(3)
        whole = g.nearest_valid_input_size([s + 2 * mi for s, mi in zip(shape, m)])
        needed = forward_flops(net, whole)
        z_planes = g.nearest_valid_input_size((30 + 2 * m[0], g.min_input_sizes(3)[1], g.min_input_sizes(3)[2]))[0]
        for budget in args.budgets:
            plan = make_plan(net, shape, "auto", batch_size=1, memory_budget_mb=budget)
            tile_in = tuple(t + 2 * mi for t, mi in zip(plan.tile, plan.margin))
            n = math.prod(len(s) for s in plan.starts)
            computed = n * forward_flops(net, tile_in)
            print(f"| {name} | {m} | {budget} MB | {plan.tile} | {n} | {computed / needed:.3f} | {z_planes} ({z_planes / 30:.1f}x) |")
    print("\nneeded: one pass over the whole volume mirror-padded to the next valid size (what the tiles must equal).")


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (oneDNN primitives, allocations)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def cmd_speed(args) -> None:
    from pipeline.inferers import OverlapTileInferer
    from pipeline.synthetic import make_stack

    torch.set_num_threads(args.threads)
    image, _ = make_stack(tuple(args.stack), seed=0, z_step=10.0)
    x = torch.from_numpy((image - image.mean()) / image.std())[None, None]
    mvox = x.numel() / 1e6
    print(f"stack {tuple(args.stack)} ({mvox:.1f} Mvoxel), {args.threads} threads, best of {args.repeats}\n")
    print("| network | memory format | s / Mvoxel |")
    print("| --- | --- | --- |")
    torch.manual_seed(0)
    nets = {"2D CPU recipe (16..256), per section": UNet(features=CPU_FEATURES, norm="batch", dropout=0.0),
            "3D em3d (8..128, anisotropic)": UNet(spatial_dims=3, features=EM3D_FEATURES, norm="batch", dropout=0.0,
                                                   **propose_scheme([10.0, 1.0, 1.0]))}
    inferer = OverlapTileInferer()
    for name, net in nets.items():
        net.eval()
        for channels_last in (False, True):
            net.to(memory_format=memory_format(net.spatial_dims, channels_last))
            with torch.inference_mode():
                seconds = _time(lambda: inferer(x, net), args.repeats)
            fmt = ("channels-last" if net.spatial_dims == 2 else "channels-last-3D") if channels_last else "contiguous"
            print(f"| {name} | {fmt} | {seconds / mvox:.2f} |")


# ---------------------------------------------------------------- quality
def _bundle_train(configs: list[str], keys: dict, log: Path, threads: int) -> None:
    import os

    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr([str(REPO / c) for c in configs])]
    for k, v in keys.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"training failed ({rc}); see {log}")


def _datasets(args, work: Path) -> dict:
    import tifffile

    from pipeline.synthetic import make_stack, to_uint8

    data = {}
    syn = work / "synthetic"
    for split, seeds in (("train", range(100, 105)), ("test", range(200, 202))):
        (syn / split / "images").mkdir(parents=True, exist_ok=True)
        (syn / split / "labels").mkdir(parents=True, exist_ok=True)
        for s in seeds:
            path = syn / split / "images" / f"stack_{s}.tif"
            if not path.exists():
                image, label = make_stack((24, 256, 256), seed=s, z_step=10.0)
                tifffile.imwrite(syn / split / "labels" / path.name, label)
                tifffile.imwrite(path, to_uint8(image))
    data["synthetic"] = dict(images=syn / "train/images", labels=syn / "train/labels", spacing=[10.0, 1.0, 1.0],
                             val_files=1, test=sorted((syn / "test/images").iterdir()), test_labels=syn / "test/labels",
                             scored=None)
    if args.isbi:
        isbi = Path(args.isbi)
        data["isbi2012"] = dict(images=isbi / "train-volume.tif", labels=isbi / "train-labels.tif", spacing=[12.5, 1.0, 1.0],
                                val_slices=[15, 25], test=[isbi / "train-volume.tif"], test_labels=isbi / "train-labels.tif",
                                scored=(15, 25, 5))  # predict sections 15-24, score the last 5 (20-24)
    return data


def _predict(ckpt: Path, image: np.ndarray) -> np.ndarray:
    from pipeline.checkpoints import network_from_checkpoint
    from pipeline.inferers import OverlapTileInferer

    net = network_from_checkpoint(str(ckpt), None).eval()
    x = torch.from_numpy(image.astype(np.float32))
    x = (x - x.mean(dim=(1, 2), keepdim=True)) / x.std(dim=(1, 2), keepdim=True, correction=0).clamp_min(1e-8)
    with torch.inference_mode():
        logits = OverlapTileInferer(adapt_norm=True)(x[None, None], net)
    return torch.softmax(logits, 1)[0, 1].numpy()


def cmd_quality(args) -> None:
    import tifffile

    from pipeline.metrics import dice, pixel_error, v_rand

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    record = work / "results.json"
    results = json.loads(record.read_text()) if record.exists() else {}
    for dataset, d in _datasets(args, work).items():
        split = {"val_files": d["val_files"]} if "val_files" in d else {"val_slices": json.dumps(d["val_slices"]).replace(" ", "")}
        for method in ("2d", "3d"):
            for seed in args.seeds:
                key = f"{dataset}/{method}/seed={seed}/minutes={args.minutes:g}"
                if key in results:
                    continue
                run = work / key.replace("=", "").replace("/", "_")
                keys = dict(images=d["images"], labels=d["labels"], seed=seed, train_minutes=args.minutes, num_epochs=100000,
                            val_interval=1000000000, ckpt_dir=run / "models", output_dir=run / "eval", data_cache_dir=run / "cache",
                            **split)
                if method == "2d":
                    configs = ["bundles/em_unet/configs/train.yaml", "configs/em_cpu.yaml"]
                    keys["init_from"] = "null"  # both from scratch: the architectures compared, not a pretrained start
                else:
                    configs = ["bundles/em_unet/configs/train.yaml", "configs/em3d.yaml"]
                    keys["spacing"] = json.dumps(d["spacing"]).replace(" ", "")
                print(f"{key}: training for {args.minutes:g} min", flush=True)
                _bundle_train(configs, keys, work / f"{run.name}.log", args.threads)
                scores = []
                for path in d["test"]:
                    image = tifffile.imread(path)
                    label = tifffile.imread(Path(d["test_labels"]) / path.name) if Path(d["test_labels"]).is_dir() else tifffile.imread(d["test_labels"])
                    if d["scored"]:
                        a, b, n = d["scored"]
                        image, label = image[a:b], label[a:b]
                    t0 = time.perf_counter()
                    prob = _predict(run / "models/model_final.pt", image)
                    seconds = time.perf_counter() - t0
                    if d["scored"]:
                        prob, label = prob[-n:], label[-n:]
                    scores.append(dict(dice=float(np.mean([dice(p, g) for p, g in zip(prob, label)])),
                                       v_rand=v_rand(prob, label), pixel_error=pixel_error(prob, label),
                                       s_per_mvoxel=seconds / (image.size / 1e6)))
                results[key] = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
                record.write_text(json.dumps(results, indent=1, sort_keys=True))
                print(f"  {results[key]}", flush=True)
    print(f"\n{args.minutes:g} CPU minutes of training each, {args.threads} threads; mean +- sd over seeds {args.seeds}\n")
    print("| data | method | Dice | V_rand | pixel error | prediction s / Mvoxel | seeds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for dataset in sorted({k.split("/")[0] for k in results}):
        for method in ("2d", "3d"):
            rows = [v for k, v in results.items() if k.startswith(f"{dataset}/{method}/") and k.endswith(f"minutes={args.minutes:g}")]
            if rows:
                cell = lambda m: f"{np.mean([r[m] for r in rows]):.4f} +- {np.std([r[m] for r in rows], ddof=1) if len(rows) > 1 else 0:.4f}"  # noqa: E731
                print(f"| {dataset} | {method} | {cell('dice')} | {cell('v_rand')} | {cell('pixel_error')} | "
                      f"{np.mean([r['s_per_mvoxel'] for r in rows]):.2f} | {len(rows)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    f = sub.add_parser("flops", help="computed / needed FLOPs of 3D tile plans")
    f.add_argument("--volume", type=int, nargs=3, default=[64, 1024, 1024])
    f.add_argument("--spacing", type=float, nargs=3, default=[10.0, 1.0, 1.0])
    f.add_argument("--budgets", type=float, nargs="+", default=[1024, 4096, 16384, 65536], help="memory budgets, MB")
    s = sub.add_parser("speed", help="inference seconds per megavoxel")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--stack", type=int, nargs=3, default=[24, 512, 512])
    s.add_argument("--repeats", type=int, default=2)
    q = sub.add_parser("quality", help="2D vs 3D at equal CPU training time")
    q.add_argument("--minutes", type=float, default=5.0)
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--isbi", default=None, help="folder with ISBI 2012's train-volume.tif and train-labels.tif")
    q.add_argument("--work-dir", required=True, help="stacks, checkpoints, logs and results.json (resumable)")
    args = ap.parse_args()
    {"flops": cmd_flops, "speed": cmd_speed, "quality": cmd_quality}[args.part](args)


if __name__ == "__main__":
    main()
