#!/usr/bin/env python
"""Segmentation quality for a fixed training budget: the paper's recipe against a plain MONAI baseline.

Both methods train on ISBI 2012 sections 0-19 for the same wall-clock budget (``--minutes`` each,
counted from the first training iteration, so data loading and caching are not charged) with the
same number of CPU threads, then predict the held-out sections 20-24:

(a) ``paper``     the bundle (``bundles/em_unet``) with ``configs/isbi2012.yaml`` and
    ``configs/isbi2012_cpu.yaml``: valid U-Net 16..256 with BatchNorm, 572x572 tiles, batch 1,
    Adam 1e-3 with polynomial decay (``lr_power``) whose horizon is the budget, weighted
    cross-entropy with the border weight map, elastic deformation. It runs as
    ``python -m monai.bundle run training`` in a subprocess with one extra overlay written here,
    which sets a huge ``num_epochs``, turns periodic validation off (the baseline does not
    validate either, and the final weights are scored) and adds three handlers to the trainer:
    set the learning rate from the time spent, stop when the budget is spent, and write the
    iteration count. ``model_final.pt`` (the weights
    at the deadline) is predicted with ``pipeline.inferers.OverlapTileInferer``, with the recipe's
    ``adapt_norm`` (BatchNorm statistics re-estimated on each section: AdaBN).
(b) ``monai``     ``monai.networks.nets.BasicUNet`` (default features), ``DiceCELoss``, random
    256x256 crops with flips on both axes, batch 4, Adam 1e-3, in a subprocess of this script;
    predicted with ``monai.inferers.SlidingWindowInferer(roi 256, overlap 0.25, sw_batch_size 4)``.

Scores (``pipeline.metrics``, foreground = cell interior, threshold 0.5, per section and averaged
over the 5 sections): pixel error, V_rand and V_info after border thinning (the official ISBI 2012
form), warping error, Dice; plus V_rand maximised over the thresholds 0.0..1.0 (per-section mean
at each threshold, then the maximum, as Fiji does).

Usage::

    python scripts/benchmark_quality.py                          # 20 min per method, 2 threads
    python scripts/benchmark_quality.py --minutes 0.5 --json out.json
    python scripts/benchmark_quality.py --methods b --work-dir /tmp/bq
    python scripts/benchmark_quality.py --work-dir /tmp/bq --score-only --paper-set adapt_norm=false
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE_CONFIGS = ["bundles/em_unet/configs/train.yaml", "configs/isbi2012.yaml", "configs/isbi2012_cpu.yaml"]
VAL_SLICES = (20, 25)  # [start, stop): sections 20-24 held out, 0-19 train
LABELS = {"a": "(a) paper recipe, CPU widths", "b": "(b) MONAI BasicUNet baseline"}
PAPER_TABLE1 = dict(warping_error=0.000353, rand_error=0.0382, pixel_error=0.0611)
COLUMNS = [  # key, header, format
    ("pixel_error", "pixel err", "{:.4f}"), ("v_rand", "V_rand", "{:.4f}"), ("v_info", "V_info", "{:.4f}"),
    ("warping_error", "warp err", "{:.6f}"), ("dice", "Dice", "{:.4f}"), ("v_rand_max", "V_rand max", "{:.4f}"),
    ("iterations", "iters", "{:d}"), ("train_seconds", "train s", "{:.0f}"),
]


def default_data_dir() -> Path:
    env = os.environ.get("EM_DATA_DIR")
    return Path(env) / "isbi2012" if env else REPO.parent / "shared" / "data" / "isbi2012"


def load_isbi(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 25 training sections, normalised per section as in training, and their 0/1 labels."""
    from monai.transforms import NormalizeIntensity

    from pipeline.io import read_image

    images, _ = read_image(data_dir / "train-volume.tif")
    labels, _ = read_image(data_dir / "train-labels.tif")
    if images.shape != labels.shape or images.ndim != 3 or images.shape[0] < VAL_SLICES[1]:
        sys.exit(f"unexpected ISBI data in {data_dir}: volume {images.shape}, labels {labels.shape}")
    norm = NormalizeIntensity()
    images = np.stack([np.asarray(norm(s.astype(np.float32))) for s in images])
    return images, (labels > 0).astype(np.float32)


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_logged(cmd: list[str], log: Path, threads: int, timeout: float) -> None:
    print(f"  $ {' '.join(cmd)}\n  log: {log}", flush=True)
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=thread_env(threads), stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        sys.exit(f"training subprocess failed ({rc}); last lines of {log}:\n" + "\n".join(tail))


# ---------------------------------------------------------------- (a) the bundle
def train_paper(args, work: Path) -> dict:
    import yaml

    base = yaml.safe_load((REPO / BUNDLE_CONFIGS[0]).read_text())
    training = base["training"]
    at = [i for i, item in enumerate(training) if "@train#trainer.run()" in item]
    if len(at) != 1:
        sys.exit(f"{BUNDLE_CONFIGS[0]}: expected one '@train#trainer.run()' in `training`, got {training}")
    stats = work / "stats.json"
    ev = "ignite.engine.Events"
    # No expression may contain the word "import" (MONAI then parses it raw, @references and all),
    # so the stats path, which might, enters as a config value (a lambda's default argument).
    hooks = [  # the clock starts at STARTED (after the dataset is cached), as in the baseline
        f"$@train#trainer.add_event_handler({ev}.STARTED, lambda e: setattr(e.state, 't0', time.time()))",
        # the recipe's polynomial decay (lr_power) runs over the time budget instead of num_epochs
        f"$@train#trainer.add_event_handler({ev}.ITERATION_STARTED, lambda e, s=@budget_seconds, lr=@learning_rate, "
        "p=@lr_power: [g.update(lr=lr * max(0.0, 1.0 - (time.time() - e.state.t0) / s) ** p) "
        "for g in @optimizer.param_groups])",
        f"$@train#trainer.add_event_handler({ev}.ITERATION_COMPLETED, lambda e, s=@budget_seconds: "
        "e.terminate() if time.time() - e.state.t0 > s else None)",
        f"$@train#trainer.add_event_handler({ev}.COMPLETED, lambda e, p=@budget_stats, o=@optimizer: open(p, 'w').write("
        "json.dumps(dict(iterations=e.state.iteration, epochs=e.state.epoch, train_seconds=time.time() - e.state.t0, "
        "final_lr=o.param_groups[0]['lr']))))",
    ]
    overlay = {"imports": base["imports"] + ["$import time", "$import json"],
               "budget_seconds": args.minutes * 60.0, "budget_stats": str(stats),
               "num_epochs": 1_000_000, "val_interval": 1_000_000_000,
               "training": training[: at[0]] + hooks + training[at[0]:]}
    (work / "budget.yaml").write_text(yaml.safe_dump(overlay, width=1000))
    configs = [str(REPO / c) for c in BUNDLE_CONFIGS] + [str(work / "budget.yaml")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(configs),
           "--dataset_dir", str(args.data_dir), "--val_slices", repr(list(VAL_SLICES)),
           "--ckpt_dir", str(work / "models"), "--output_dir", str(work / "eval"),
           "--data_cache_dir", str(work / "cache")]
    for key, value in args.paper_set.items():
        cmd += [f"--{key}", json.dumps(value).replace(" ", "")]
    run_logged(cmd, work / "train.log", args.threads, timeout=args.minutes * 90 + 900)
    return json.loads(stats.read_text())


def predict_paper(args, work: Path, images: np.ndarray):
    import torch
    from monai.bundle import ConfigParser

    from pipeline.inferers import OverlapTileInferer

    parser = ConfigParser()
    parser.read_config([str(REPO / c) for c in BUNDLE_CONFIGS])  # its `$import` lines run when parsed
    for key, value in args.paper_set.items():
        parser[key] = value
    net = parser.get_parsed_content("network_def")
    state = torch.load(work / "models" / "model_final.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"] if isinstance(state.get("model"), dict) else state)
    return net, OverlapTileInferer(adapt_norm=bool(parser.get_parsed_content("adapt_norm")))


# ---------------------------------------------------------------- (b) the MONAI baseline
def baseline_net():
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)


def train_baseline_here(args) -> None:
    """Runs inside the subprocess: trains until the budget is spent, saves model.pt + stats.json."""
    import torch
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandFlipd, RandSpatialCropd
    from monai.utils import set_determinism

    torch.set_num_threads(args.threads)
    set_determinism(seed=0)
    out = Path(args.baseline_out)
    images, labels = load_isbi(args.data_dir)
    train = [{"image": images[z][None], "label": labels[z][None]} for z in range(len(images)) if
             not VAL_SLICES[0] <= z < VAL_SLICES[1]]
    keys = ["image", "label"]
    transform = Compose([RandSpatialCropd(keys, roi_size=(256, 256), random_size=False),
                         RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1)])
    loader = DataLoader(Dataset(train, transform), batch_size=4, shuffle=True, num_workers=0)
    net = baseline_net()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    iterations, epochs, t0 = 0, 0, time.time()  # epochs: started ones, as ignite's state.epoch
    while time.time() - t0 <= args.minutes * 60.0:
        epochs += 1
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            iterations += 1
            if iterations % 10 == 0:
                print(f"iteration {iterations} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
            if time.time() - t0 > args.minutes * 60.0:
                break
    seconds = time.time() - t0
    torch.save(net.state_dict(), out / "model.pt")
    (out / "stats.json").write_text(json.dumps(dict(iterations=iterations, epochs=epochs, train_seconds=seconds)))


def train_baseline(args, work: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--baseline-out", str(work), "--minutes", repr(args.minutes),
           "--threads", str(args.threads), "--data-dir", str(args.data_dir)]
    run_logged(cmd, work / "train.log", args.threads, timeout=args.minutes * 90 + 900)
    return json.loads((work / "stats.json").read_text())


def predict_baseline(args, work: Path, images: np.ndarray):
    import torch
    from monai.inferers import SlidingWindowInferer

    net = baseline_net()
    net.load_state_dict(torch.load(work / "model.pt", map_location="cpu", weights_only=True))
    return net, SlidingWindowInferer(roi_size=(256, 256), sw_batch_size=4, overlap=0.25)


# ---------------------------------------------------------------- scoring and report
def score(net, inferer, images: np.ndarray, labels: np.ndarray) -> dict:
    """Foreground probabilities of the validation sections and their averaged scores."""
    import torch

    from pipeline.metrics import dice, evaluate

    net.eval()
    val = range(*VAL_SLICES)
    t0 = time.time()
    with torch.no_grad():
        prob = np.stack([torch.softmax(inferer(torch.from_numpy(images[z][None, None]), net), 1)[0, 1].numpy()
                         for z in val]).astype(np.float64)
    infer_seconds = time.time() - t0
    gt = labels[VAL_SLICES[0]:VAL_SLICES[1]]
    # a stack is scored slice by slice and averaged (macro), except Dice, which evaluate() pools
    res = evaluate(prob, gt, sweep=True, warping=True)
    res["dice"] = float(np.mean([dice(p, g) for p, g in zip(prob, gt)]))
    res["infer_seconds"] = infer_seconds
    return res


def print_report(results: dict) -> dict:
    widths = [max(len(h), 10) for _, h, _ in COLUMNS]
    name_w = max(len(v) for v in LABELS.values())
    print("\nISBI 2012, trained on sections 0-19, scored on 20-24 (threshold 0.5, mean over sections)")
    print(f"{'method':<{name_w}}  " + "  ".join(f"{h:>{w}}" for (_, h, _), w in zip(COLUMNS, widths)))
    for m, r in results.items():
        cells = [f.format(r[k]) if isinstance(r.get(k), (int, float)) else "-" for k, _, f in COLUMNS]
        print(f"{LABELS[m]:<{name_w}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    print("pixel err, V_rand (thinned), V_info (thinned), warp err: at threshold 0.5; V_rand max: best over "
          "thresholds 0.0..1.0; iters: (a) batch 1 x 572^2, (b) batch 4 x 256^2.")
    print(f"Paper, Table 1 (Ronneberger et al. 2015): warping error {PAPER_TABLE1['warping_error']}, Rand error "
          f"{PAPER_TABLE1['rand_error']}, pixel error {PAPER_TABLE1['pixel_error']} -- measured on the challenge's "
          "hidden test labels with the 2012 definitions, not on sections 20-24: for orientation only.")
    targets = {}
    if "a" in results and "b" in results:
        a, b = results["a"], results["b"]
        targets = {"v_rand": a["v_rand"] > b["v_rand"], "pixel_error": a["pixel_error"] < b["pixel_error"]}
        met = all(targets.values())
        print(f"Target (a beats b on V_rand and pixel error): {'met' if met else 'not met'} "
              f"(V_rand {a['v_rand']:.4f} vs {b['v_rand']:.4f}: {'yes' if targets['v_rand'] else 'no'}; "
              f"pixel error {a['pixel_error']:.4f} vs {b['pixel_error']:.4f}: "
              f"{'yes' if targets['pixel_error'] else 'no'})")
        targets["met"] = met
    return targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="training budget per method (default 20)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for training and inference (default 2)")
    ap.add_argument("--methods", nargs="+", choices=("a", "b"), default=["a", "b"],
                    help="a: paper recipe (bundle), b: MONAI BasicUNet baseline")
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(),
                    help="folder with train-volume.tif and train-labels.tif (default: $EM_DATA_DIR/isbi2012 "
                         "or <repo>/../shared/data/isbi2012)")
    ap.add_argument("--work-dir", type=Path, default=None, help="checkpoints and logs (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--paper-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override bundle keys for (a), values in YAML, e.g. dropout=0 elastic_prob=0.5")
    ap.add_argument("--score-only", action="store_true",
                    help="score the models an earlier run left in --work-dir, without training (e.g. with other --paper-set "
                         "inference keys such as adapt_norm=false)")
    ap.add_argument("--baseline-out", default=None, help=argparse.SUPPRESS)  # internal: the (b) training subprocess
    args = ap.parse_args()
    import yaml

    try:
        args.paper_set = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.paper_set)}
    except ValueError:
        ap.error(f"--paper-set takes KEY=VALUE items, got {args.paper_set}")
    if args.score_only and not args.work_dir:
        ap.error("--score-only needs the --work-dir of an earlier run")
    if args.minutes <= 0 or args.threads < 1:
        ap.error("--minutes must be > 0 and --threads >= 1")
    args.data_dir = args.data_dir.expanduser().resolve()
    missing = [f for f in ("train-volume.tif", "train-labels.tif") if not (args.data_dir / f).is_file()]
    if missing:
        sys.exit(f"ISBI 2012 data not found: {', '.join(missing)} missing in {args.data_dir}. Fetch it with "
                 "scripts/fetch_isbi2012.py, or point --data-dir / $EM_DATA_DIR at it.")
    if args.baseline_out:
        return train_baseline_here(args)

    import torch

    torch.set_num_threads(args.threads)
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="benchmark_quality_"))).resolve()
    images, labels = load_isbi(args.data_dir)
    print(f"data: {args.data_dir} {images.shape}; budget {args.minutes:g} min per method, "
          f"{args.threads} threads; work dir {work}", flush=True)
    trainers = {"a": (train_paper, predict_paper), "b": (train_baseline, predict_baseline)}
    results = {}
    for m in args.methods:
        mdir = work / m
        train, predict = trainers[m]
        if args.score_only:
            stats = json.loads((mdir / "stats.json").read_text())
            print(f"\n{LABELS[m]}: the model trained earlier in {mdir}", flush=True)
        else:
            mdir.mkdir(parents=True, exist_ok=True)
            print(f"\n{LABELS[m]}: training for {args.minutes:g} min", flush=True)
            t0 = time.time()
            stats = train(args, mdir)
            stats["wall_seconds"] = time.time() - t0
        print(f"  {stats['iterations']} iterations in {stats['train_seconds']:.0f} s; scoring sections 20-24", flush=True)
        results[m] = {**stats, **score(*predict(args, mdir, images), images, labels)}
    targets = print_report(results)
    if args.json:
        payload = dict(minutes=args.minutes, threads=args.threads, data_dir=str(args.data_dir), work_dir=str(work),
                       val_slices=list(VAL_SLICES), paper_set=args.paper_set, methods={LABELS[m]: r for m, r in results.items()},
                       targets=targets, paper_table1=PAPER_TABLE1)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
