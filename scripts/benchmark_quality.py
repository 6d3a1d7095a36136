#!/usr/bin/env python
"""Segmentation quality on ISBI 2012 at a fixed CPU budget: the project's recipe against two peers, over seeds.

Protocol (issue 17). The 25 labelled sections (0-24 of the challenge's 30) are split once, and nothing is chosen on the
sections that are reported:

- sections 0-14 train every method (each method holds out of them what its own recipe holds out);
- sections 15-19 choose settings: ``--phase tune`` (default budget 10 minutes) scores them;
- sections 20-24 are reported: ``--phase final`` (default budget 20 minutes) scores them, with
  settings frozen beforehand.

Every (phase, method, variant, seed, budget, threads) run is recorded in ``--json`` as soon as it
completes, and a later call skips the runs already recorded, so the comparison (hours of
machine time on 2 cores) can be spread over sessions and survive an interruption. ``--report``
prints the tables from the JSON alone.

Methods (each trains for ``--minutes`` of wall-clock time with ``--threads`` CPU threads, counted
from its first training iteration; ``--seed`` sets the initial weights, the data order and the
augmentation):

``paper``     the bundle: ``python -m monai.bundle run training`` with ``bundles/em_unet/configs/train.yaml``
    and ``configs/em_cpu.yaml`` (the documented CPU recipe, as the bundle README gives it for one's
    own data: ``--images``, ``--labels``, ``--val_slices``), its time budget ``--train_minutes`` (the
    polynomial learning-rate decay runs over it; validation off; the final weights are scored). ``--variant NAME --set KEY=VALUE ...`` records a variant
    with other bundle keys. Predicted with ``pipeline.inferers.OverlapTileInferer`` with the
    recipe's ``adapt_norm`` (AdaBN), with and without the 8-fold test-time augmentation (``tta``).
``monai``     ``monai.networks.nets.BasicUNet`` (default features) with ``DiceCELoss``, random 256x256
    crops with flips, batch 4, Adam 1e-3; predicted with ``SlidingWindowInferer(256, overlap 0.25)``.
``torch_em``  torch-em's documented 2D boundary recipe for ISBI 2012
    (``experiments/neuron-segmentation/isbi2012/train_boundaries_2d.py``): ``UNet2d`` (depth 4,
    32 initial features, sigmoid), ``DiceLoss`` on the membrane map, 512x512 patches, batch 1,
    AdamW 1e-4 with ReduceLROnPlateau, its default augmentations, 2 of its training sections
    (13-14) held out for validation and the best checkpoint scored, as its trainer does;
    predicted with ``torch_em.util.prediction.predict_with_padding``. It runs in its own
    environment (``--torch-em-python``), not a project dependency; create it with::

        python -m venv .venv-bench
        .venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1 torch-em==0.10.9

    (torch-em's logger needs torchvision, and PyPI's torchvision does not import beside the CPU
    build of torch 2.13.0; torch 2.14.1 + torchvision 0.29.1 run on the CPU.) Differences from the
    script: ``mixed_precision=False`` and ``num_workers=0`` (a CPU run, as the other methods), the
    membrane labels as its boundary target (the challenge's labels; its script derives boundaries
    from a 3D re-segmentation not shipped with the challenge data). Its trainer compiles the model
    (``torch.compile``, its default with torch 2); the compilation counts as training time.

Scores (``pipeline.metrics``, foreground = cell interior, per section and averaged over the 5
sections of the phase): pixel error, V_rand and V_info after border thinning (the official ISBI
2012 form), adapted Rand error of 4-connected cells (SNEMI3D / CREMI form), warping error, Dice.
Each at threshold 0.5 and at a threshold chosen on the training sections 0-14 (the one with the
best mean V_rand over 0.1 .. 0.9 on them; no scored section takes part); the paper recipe also at its
own ``threshold`` key when that is not 0.5 (chosen on the tune sections 15-19, over seeds, from the
per-threshold curves recorded as ``eval_curve``), which ``--compare paper/recipe:tta:<t>`` checks.

Usage::

    python scripts/benchmark_quality.py --phase tune --methods paper --seeds 0 1 2
    python scripts/benchmark_quality.py --phase tune --methods paper --variant w0_20 --set weight_w0=20
    python scripts/benchmark_quality.py --phase final --methods paper monai torch_em --seeds 0 1 2
    python scripts/benchmark_quality.py --phase tune --variant synthetic_0min --set init_from=synthetic --minutes 0
    python scripts/benchmark_quality.py --phase final --recipe gpu --seeds 0 1 2 --minutes 60  # the paper's widths, GPU
    python scripts/benchmark_quality.py --report                       # tables from the JSON alone
    python scripts/benchmark_quality.py --phase tune --minutes 0.3 --json /tmp/q.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's `pipeline`, also when another one is installed (a frozen copy)
RECIPES = {  # the bundle's configs of each recipe: the CPU recipe (documented default) and the paper's, for a GPU
    "cpu": ["bundles/em_unet/configs/train.yaml", "configs/em_cpu.yaml"],
    "gpu": ["bundles/em_unet/configs/train.yaml", "configs/isbi2012.yaml"],
}
#: keys that do not change what is trained (data, bookkeeping, budget): left out of a recipe's hash
NOT_RECIPE = {"dataset_dir", "images", "labels", "val_slices", "val_files", "image_key", "label_key", "datalist",
              "datalists", "train_datalist", "val_datalist", "num_images", "num_val", "image_size", "data_cache_dir",
              "num_epochs", "val_interval", "ckpt_interval", "log_interval", "train_minutes", "resume",
              "seed", "imports", "bundle_root", "ckpt_dir", "output_dir", "device", "rank", "world_size",
              "distributed_setup", "summary_writer", "flags", "checks", "initialize", "training", "run",
              "checkpointing", "validate", "train"}
BUNDLE_CONFIGS = RECIPES["cpu"]
TRAIN, TUNE, REPORT = (0, 15), (15, 20), (20, 25)  # [start, stop) section ranges
PHASES = {"tune": dict(sections=TUNE, minutes=10.0), "final": dict(sections=REPORT, minutes=20.0)}
TORCH_EM_VAL = (13, 15)  # torch-em holds out the last sections of its training data for validation
METHODS = ("paper", "monai", "torch_em")
MODES = {"paper": ("plain", "tta"), "monai": ("plain",), "torch_em": ("plain",)}
CURVE_THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))
DEFAULT_JSON = REPO / "docs" / "benchmark_quality_runs.json"
DEFAULT_PEER_PYTHON = REPO / ".venv-bench" / "bin" / "python"
PEER_ENV_MISSING = ("torch-em's environment not found: {} (--torch-em-python). Create it with\n  python -m venv "
                    ".venv-bench && .venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1 torch-em==0.10.9")
METRICS = [  # key, header, format, better
    ("pixel_error", "pixel err", "{:.4f}", "min"), ("v_rand", "V_rand", "{:.4f}", "max"),
    ("v_info", "V_info", "{:.4f}", "max"), ("adapted_rand_error", "adapted RE", "{:.4f}", "min"),
    ("warping_error", "warp err", "{:.5f}", "min"), ("dice", "Dice", "{:.4f}", "max"),
]


def default_data_dir() -> Path:
    env = os.environ.get("EM_DATA_DIR")
    return Path(env) / "isbi2012" if env else REPO.parent / "shared" / "data" / "isbi2012"


def sections(span: tuple[int, int]) -> list[int]:
    return list(range(*span))


def load_isbi(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 25 labelled sections, normalised per section as in training, and their 0/1 labels (1 = interior)."""
    from monai.transforms import NormalizeIntensity

    from pipeline.io import read_image

    images, _ = read_image(data_dir / "train-volume.tif")
    labels, _ = read_image(data_dir / "train-labels.tif")
    if images.shape != labels.shape or images.ndim != 3 or images.shape[0] < REPORT[1]:
        sys.exit(f"unexpected ISBI data in {data_dir}: volume {images.shape}, labels {labels.shape}")
    norm = NormalizeIntensity()
    images = np.stack([np.asarray(norm(s.astype(np.float32))) for s in images])
    return images, (labels > 0).astype(np.float32)


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    if BUNDLE_CONFIGS is RECIPES["cpu"]:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def run_logged(cmd: list, log: Path, threads: int, timeout: float) -> float:
    """Runs ``cmd`` with its output in ``log``; returns the CPU seconds the subprocess used."""
    print(f"  $ {' '.join(map(str, cmd))}\n  log: {log}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "w") as f:
        try:
            rc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=thread_env(threads), stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        sys.exit(f"training subprocess failed ({rc}); last lines of {log}:\n" + "\n".join(tail))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


# ---------------------------------------------------------------- paper: the bundle's recipe
def train_paper(args, work: Path, seed: int, settings: dict) -> dict:
    import shutil

    import yaml

    if args.minutes == 0:  # zero-shot: the initial weights, untrained
        from pipeline.checkpoints import PRETRAINED, pretrained_path

        source = settings.get("init_from")
        if not source:
            sys.exit("--minutes 0 scores the initial weights untrained: name them with --set init_from=...")
        (work / "models").mkdir(exist_ok=True)
        shutil.copyfile(pretrained_path(source) if source in PRETRAINED else source, work / "models" / "model_final.pt")
        return dict(iterations=0, epochs=0, train_seconds=0.0, cpu_seconds=0.0)
    base = yaml.safe_load((REPO / BUNDLE_CONFIGS[0]).read_text())
    training = base["training"]
    at = [i for i, item in enumerate(training) if "@train#trainer.run()" in item]
    if len(at) != 1:
        sys.exit(f"{BUNDLE_CONFIGS[0]}: expected one '@train#trainer.run()' in `training`, got {training}")
    stats = work / "stats.json"
    # No expression may contain the word "import" (MONAI then parses it raw, @references and all),
    # so the stats path, which might, enters as a config value (a lambda's default argument).
    hook = ("$@train#trainer.add_event_handler(ignite.engine.Events.COMPLETED, lambda e, p=@budget_stats: open(p, 'w')"
            ".write(json.dumps(dict(iterations=e.state.iteration, epochs=e.state.epoch, "
            "train_seconds=e.state.train_seconds))))")
    overlay = {"imports": base["imports"] + ["$import json"], "budget_stats": str(stats),
               "num_epochs": 1_000_000, "val_interval": 1_000_000_000,  # the budget ends the run; no validation
               "training": training[: at[0]] + [hook] + training[at[0]:]}
    (work / "budget.yaml").write_text(yaml.safe_dump(overlay, width=1000))
    configs = [str(REPO / c) for c in BUNDLE_CONFIGS] + [str(work / "budget.yaml")]
    # val_slices [15, 25] leaves sections 0-14 for training
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(configs),
           "--images", args.data_dir / "train-volume.tif", "--labels", args.data_dir / "train-labels.tif",
           "--val_slices", repr([TRAIN[1], REPORT[1]]), "--seed", seed, "--train_minutes", repr(args.minutes),
           "--ckpt_dir", work / "models", "--output_dir", work / "eval", "--data_cache_dir", work / "cache"]
    for key, value in settings.items():
        cmd += [f"--{key}", json.dumps(value).replace(" ", "")]
    cpu = run_logged(cmd, work / "train.log", args.threads, timeout=args.minutes * 90 + 900)
    return {**json.loads(stats.read_text()), "cpu_seconds": cpu}


def predictor_paper(args, work: Path, settings: dict, mode: str):
    import torch
    from monai.bundle import ConfigParser

    from pipeline.inferers import OverlapTileInferer

    parser = ConfigParser()
    parser.read_config([str(REPO / c) for c in BUNDLE_CONFIGS])  # its `$import` lines run when parsed
    for key, value in settings.items():
        parser[key] = value
    net = parser.get_parsed_content("network_def")
    state = torch.load(work / "models" / "model_final.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"] if isinstance(state.get("model"), dict) else state)
    device = "cuda" if BUNDLE_CONFIGS is RECIPES["gpu"] and torch.cuda.is_available() else "cpu"
    net.to(device).eval()
    inferer = OverlapTileInferer(adapt_norm=bool(parser.get_parsed_content("adapt_norm")), tta=mode == "tta")
    images = args.isbi[0]
    return lambda z: torch.softmax(inferer(torch.from_numpy(images[z][None, None]).to(device), net), 1)[0, 1].cpu().numpy()


# ---------------------------------------------------------------- monai: a plain MONAI user
def baseline_net():
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)


def train_monai_here(args) -> None:
    """Runs inside the subprocess: trains until the budget is spent, saves model.pt + stats.json."""
    import torch
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss
    from monai.transforms import Compose, RandFlipd, RandSpatialCropd
    from monai.utils import set_determinism

    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    out = Path(args.monai_out)
    images, labels = load_isbi(args.data_dir)
    train = [{"image": images[z][None], "label": labels[z][None]} for z in sections(TRAIN)]
    keys = ["image", "label"]
    transform = Compose([RandSpatialCropd(keys, roi_size=(256, 256), random_size=False),
                         RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1)])
    transform.set_random_state(seed=args.seed)
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


def train_monai(args, work: Path, seed: int, settings: dict) -> dict:
    cmd = [sys.executable, Path(__file__).resolve(), "--monai-out", work, "--seed-here", seed,
           "--minutes", repr(args.minutes), "--threads", args.threads, "--data-dir", args.data_dir]
    cpu = run_logged(cmd, work / "train.log", args.threads, timeout=args.minutes * 90 + 900)
    return {**json.loads((work / "stats.json").read_text()), "cpu_seconds": cpu}


def predictor_monai(args, work: Path, settings: dict, mode: str):
    import torch
    from monai.inferers import SlidingWindowInferer

    net = baseline_net()
    net.load_state_dict(torch.load(work / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    inferer = SlidingWindowInferer(roi_size=(256, 256), sw_batch_size=4, overlap=0.25)
    images = args.isbi[0]
    return lambda z: torch.softmax(inferer(torch.from_numpy(images[z][None, None]), net), 1)[0, 1].numpy()


# ---------------------------------------------------------------- torch_em: torch-em's recipe, own environment
def train_torch_em_here(args) -> None:
    """Runs inside the subprocess, in torch-em's environment (no `pipeline`, no MONAI there)."""
    import random
    from functools import partial

    import h5py
    import tifffile
    import torch
    import torch_em
    from torch_em.model import UNet2d
    from torch_em.trainer import DefaultTrainer
    from torch_em.util.prediction import predict_with_padding

    class BudgetSpent(Exception):
        pass

    budget = args.minutes * 60.0

    class BudgetTrainer(DefaultTrainer):  # stops after the optimizer step that spends the budget
        t0 = None  # set when fit() starts: torch-em's default torch.compile counts as training time

        def _backprop(self, loss):
            super()._backprop(loss)
            if time.time() - self.t0 > budget:
                raise BudgetSpent

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.torch_em_out)
    raw = tifffile.imread(args.data_dir / "train-volume.tif")
    labels = tifffile.imread(args.data_dir / "train-labels.tif")
    with h5py.File(out / "isbi.h5", "w") as f:
        f["raw"] = raw
        f["labels/membranes"] = (labels == 0).astype("float32")  # the boundary target: 1 = membrane
    normalization = partial(torch_em.transform.raw.normalize, minval=0, maxval=255)
    common = dict(raw_paths=str(out / "isbi.h5"), raw_key="raw", label_paths=str(out / "isbi.h5"),
                  label_key="labels/membranes", patch_shape=[1, 512, 512], ndim=2, raw_transform=normalization,
                  batch_size=1, num_workers=0, shuffle=True)
    train_loader = torch_em.default_segmentation_loader(**common, rois=np.s_[TRAIN[0]:TORCH_EM_VAL[0], :, :])
    val_loader = torch_em.default_segmentation_loader(**common, rois=np.s_[TORCH_EM_VAL[0]:TORCH_EM_VAL[1], :, :])
    model = UNet2d(in_channels=1, out_channels=1, final_activation="Sigmoid")
    loss = torch_em.loss.DiceLoss()
    trainer = torch_em.default_segmentation_trainer(
        name="boundary-model", model=model, train_loader=train_loader, val_loader=val_loader, loss=loss,
        metric=loss, learning_rate=1e-4, mixed_precision=False, log_image_interval=50, device="cpu",
        save_root=str(out), trainer_class=BudgetTrainer)
    trainer.t0 = time.time()
    try:
        trainer.fit(iterations=10**9)
    except BudgetSpent:
        pass
    seconds = time.time() - trainer.t0
    best = Path(trainer.checkpoint_folder) / "best.pt"
    if not best.is_file():
        sys.exit(f"torch-em finished no epoch within the budget: no {best}")
    state = torch.load(best, map_location="cpu", weights_only=False)
    prefix = "_orig_mod."  # the weights of torch-em's default compiled model
    model.load_state_dict({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state["model_state"].items()})
    model.eval()
    wanted = [int(z) for z in args.predict_sections.split(",")]
    with torch.no_grad():
        boundary = np.stack([predict_with_padding(model, normalization(raw[z].astype("float32")), (16, 16), "cpu")
                             for z in wanted])
    np.save(out / "interior.npy", (1.0 - boundary.reshape(len(wanted), *raw.shape[1:])).astype(np.float32))
    (out / "predicted_sections.json").write_text(json.dumps(wanted))
    (out / "stats.json").write_text(json.dumps(dict(
        iterations=trainer.iteration + 1, epochs=trainer.epoch, train_seconds=seconds, best_epoch=state.get("epoch"),
        torch=torch.__version__, torch_em=torch_em.__version__)))


def train_torch_em(args, work: Path, seed: int, settings: dict) -> dict:
    peer = Path(args.torch_em_python)
    if not peer.is_file():
        sys.exit(PEER_ENV_MISSING.format(peer))
    wanted = sections(TRAIN) + sections(PHASES[args.phase]["sections"])
    cmd = [peer, Path(__file__).resolve(), "--torch-em-out", work, "--seed-here", seed, "--minutes", repr(args.minutes),
           "--threads", args.threads, "--data-dir", args.data_dir, "--predict-sections", ",".join(map(str, wanted))]
    cpu = run_logged(cmd, work / "train.log", args.threads, timeout=args.minutes * 90 + 900)
    return {**json.loads((work / "stats.json").read_text()), "cpu_seconds": cpu}


def predictor_torch_em(args, work: Path, settings: dict, mode: str):
    probs = np.load(work / "interior.npy")  # predicted in torch-em's environment, after training
    index = {z: k for k, z in enumerate(json.loads((work / "predicted_sections.json").read_text()))}
    return lambda z: probs[index[z]]


TRAINERS = {"paper": (train_paper, predictor_paper), "monai": (train_monai, predictor_monai),
            "torch_em": (train_torch_em, predictor_torch_em)}


# ---------------------------------------------------------------- scoring
def score_at(prob: np.ndarray, gt: np.ndarray, threshold: float) -> dict:
    from pipeline.metrics import dice, evaluate

    res = evaluate(prob, gt, threshold, sweep=False, warping=True)
    res["dice"] = float(np.mean([dice(p, g, threshold) for p, g in zip(prob, gt)]))  # per section, as the rest
    return {k: float(v) for k, v in res.items()}


def threshold_curve(prob: np.ndarray, gt: np.ndarray) -> dict:
    """Mean V_rand, pixel error and adapted Rand error over the sections, at CURVE_THRESHOLDS."""
    from pipeline.metrics import adapted_rand_error, pixel_error, v_rand

    return {f"{t:.1f}": dict(v_rand=v_rand(prob, gt, t), pixel_error=pixel_error(prob, gt, t),
                             adapted_rand_error=adapted_rand_error(prob, gt, t)) for t in CURVE_THRESHOLDS}


def recipe_threshold(settings: dict, configs: list[str] | None = None) -> float:
    """The threshold the paper recipe predicts with: the variant's or the merged recipe's ``threshold`` key (chosen on
    the tune sections; the bundle's inference and evaluation read it), else 0.5."""
    import yaml

    merged: dict = {}
    for c in configs or BUNDLE_CONFIGS:
        merged.update(yaml.safe_load((REPO / c).read_text()))
    return float(settings.get("threshold", merged.get("threshold", 0.5)))


def choose_threshold(curve: dict) -> float:
    """The threshold with the best mean V_rand on the training sections (ties: the one nearest 0.5)."""
    return float(max(curve, key=lambda t: (curve[t]["v_rand"], -abs(float(t) - 0.5))))


def score_run(args, method: str, work: Path, settings: dict) -> dict:
    import torch

    labels = args.isbi[1]
    train_z, eval_z = sections(TRAIN), sections(PHASES[args.phase]["sections"])
    out = {}
    for mode in MODES[method]:
        predict = TRAINERS[method][1](args, work, settings, mode)
        t0 = time.time()
        with torch.no_grad():
            train_p = np.stack([predict(z) for z in train_z]).astype(np.float64)
            eval_p = np.stack([predict(z) for z in eval_z]).astype(np.float64)
        infer_seconds = time.time() - t0
        np.savez_compressed(work / f"probabilities_{mode}.npz", train=train_p.astype(np.float16),
                            eval=eval_p.astype(np.float16), train_sections=train_z, eval_sections=eval_z)
        curve = threshold_curve(train_p, labels[TRAIN[0]:TRAIN[1]])
        chosen = choose_threshold(curve)
        gt = labels[eval_z[0]:eval_z[-1] + 1]
        out[mode] = {"0.5": score_at(eval_p, gt, 0.5), "chosen": {**score_at(eval_p, gt, chosen), "threshold": chosen},
                     "train_curve": curve, "eval_curve": threshold_curve(eval_p, gt),
                     "infer_seconds_all_sections": infer_seconds}
        fixed = recipe_threshold(settings) if method == "paper" else 0.5
        if fixed != 0.5:  # the recipe's own threshold, chosen on the tune sections
            out[mode][f"{fixed:g}"] = {**score_at(eval_p, gt, fixed), "threshold": fixed}
        print(f"  {mode}: V_rand {out[mode]['0.5']['v_rand']:.4f} pixel error {out[mode]['0.5']['pixel_error']:.4f} "
              f"at 0.5; threshold chosen on sections 0-14: {chosen:.1f} -> V_rand {out[mode]['chosen']['v_rand']:.4f} "
              f"pixel error {out[mode]['chosen']['pixel_error']:.4f}", flush=True)
    return out


# ---------------------------------------------------------------- the record (resumable)
def run_key(phase: str, method: str, variant: str, seed: int, minutes: float, threads: int) -> str:
    return f"{phase}/{method}/{variant}/seed={seed}/minutes={minutes:g}/threads={threads}"


def load_runs(path: Path) -> dict:
    if not path.is_file():
        return {"runs": {}}
    return json.loads(path.read_text())


def save_runs(path: Path, runs: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1, sort_keys=True))
    os.replace(tmp, path)  # a run recorded is never half-written


def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()} cores, {cpu}"


#: hashes of recipes whose configs changed but train bit for bit alike, and the hash they train as. Checked by training
#: 1 epoch of the CPU recipe on ISBI sections 0-1 (seed 0) at both commits and comparing every weight
#: (docs/benchmarks.md, "Final phase"): 6daa91c0 is e476d92's 52426658 plus issue 19's neutral keys (spatial_dims 2,
#: kernel_size 3, pool null, spacing null, in-plane flip axes) and MirrorPadd in place of BorderPadd + SpatialPadd.
SAME_TRAINING = {"6daa91c0": "52426658"}


def recipe_sha(configs: list[str] | None = None) -> str:
    """Short hash of what the recipe trains: its merged config keys, except data, bookkeeping and budget
    (``NOT_RECIPE``), plus the training augmentation. Comments, file names and key order do not count,
    so a reorganised recipe that trains the same keeps its hash; a variant is its settings over it."""
    import hashlib

    import yaml

    merged: dict = {}
    for c in configs or BUNDLE_CONFIGS:
        merged.update(yaml.safe_load((REPO / c).read_text()))
    recipe = {k: v for k, v in merged.items() if k not in NOT_RECIPE}
    recipe["train#random_transforms"] = merged["train"]["random_transforms"]
    sha = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:8]
    return SAME_TRAINING.get(sha, sha)


def record_run(path: Path, key: str, record: dict) -> None:
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:  # another process may record runs meanwhile
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = load_runs(path)
        runs["runs"][key] = record
        save_runs(path, runs)


def rescore(args, runs: dict) -> None:
    """Score the recorded runs of this phase again from the weights in their work folders (the
    training stats stay): for scores added after a run was recorded."""
    for key, rec in sorted(runs["runs"].items()):
        if (rec["phase"], rec["minutes"], rec["threads"]) != (args.phase, args.minutes, args.threads) or \
                rec["method"] not in args.methods or rec["seed"] not in args.seeds or \
                (rec["method"] == "paper" and rec["variant"] != args.variant):
            continue
        work = args.work_dir / key.replace("=", "")
        print(f"\n{key}: scoring again from {work}", flush=True)
        rec.update(scores=score_run(args, rec["method"], work, rec["settings"]),
                   rescored=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        record_run(args.json, key, rec)


def run_one(args, method: str, seed: int, runs: dict) -> None:
    import torch

    variant = args.variant if method == "paper" else "default"
    settings = args.set if method == "paper" else {}
    recipe = recipe_sha() if method == "paper" else None
    key = run_key(args.phase, method, variant, seed, args.minutes, args.threads)
    known = runs["runs"].get(key)
    if known is not None:
        if (known["settings"], known.get("recipe_sha")) != (settings, recipe):
            sys.exit(f"{key} is recorded with the settings {known['settings']} over the recipe "
                     f"{known.get('recipe_sha')}, not {settings} over {recipe} ({', '.join(BUNDLE_CONFIGS[1:])} "
                     "changed?): name this variant otherwise (--variant)")
        print(f"{key}: recorded {known['finished']}, skipped", flush=True)
        return
    work = args.work_dir / key.replace("=", "")
    work.mkdir(parents=True, exist_ok=True)
    print(f"\n{key}: training for {args.minutes:g} min ({work})", flush=True)
    started, load_before = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), os.getloadavg()[0]
    t0 = time.time()
    stats = TRAINERS[method][0](args, work, seed, settings)
    stats.update(wall_seconds=time.time() - t0, load_average_1min=[load_before, os.getloadavg()[0]])
    print(f"  {stats['iterations']} iterations in {stats['train_seconds']:.0f} s "
          f"({stats['cpu_seconds'] / max(stats['wall_seconds'], 1e-9):.2f} CPU s per s); scoring", flush=True)
    if disturbed(stats, args.threads):
        print(f"  WARNING: the run had {cpu_share(stats):.2f} CPU s per s of its {args.threads} threads: something else ran; "
              "the report marks it (*). Delete its record and run it again on a quiet machine", flush=True)
    record = dict(phase=args.phase, method=method, variant=variant, settings=settings, recipe_sha=recipe, seed=seed,
                  minutes=args.minutes, threads=args.threads, started=started,
                  finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), machine=machine(),
                  torch=stats.pop("torch", torch.__version__), stats=stats,
                  eval_sections=list(PHASES[args.phase]["sections"]),
                  scores=score_run(args, method, work, settings))
    record_run(args.json, key, record)
    print(f"  recorded in {args.json}", flush=True)


# ---------------------------------------------------------------- report
#: a run whose training process got less than this share of its threads' CPU time shared the machine (the same
#: recipe gets 1.94-1.98 CPU s per s on 2 threads alone; a session's tests running beside it gave 1.66)
QUIET_SHARE = 0.9


def cpu_share(stats: dict) -> float:
    return stats["cpu_seconds"] / max(stats["wall_seconds"], 1e-9)


def disturbed(stats: dict, threads: int) -> bool:
    """Whether a run's training got less than ``QUIET_SHARE`` of ``threads`` cores (zero-shot runs train nothing)."""
    return stats.get("iterations", 0) > 0 and cpu_share(stats) < QUIET_SHARE * threads


def _mean_sd(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def configurations(runs: dict, phase: str) -> dict:
    """(method, variant, minutes, threads, mode, policy) -> per-seed score dicts of one phase."""
    groups: dict = {}
    for rec in runs["runs"].values():
        if rec["phase"] != phase:
            continue
        for mode, by_policy in rec["scores"].items():
            for policy in [p for p in by_policy if p not in ("train_curve", "eval_curve", "infer_seconds_all_sections")]:
                name = (rec["method"], rec["variant"], rec["minutes"], rec["threads"], mode, policy)
                groups.setdefault(name, {})[rec["seed"]] = {**by_policy[policy], "iterations": rec["stats"]["iterations"],
                                                            "disturbed": disturbed(rec["stats"], rec["threads"])}
    return groups


def label(name: tuple) -> str:
    method, variant, minutes, threads, mode, policy = name
    who = method if variant == "default" else f"{method}/{variant}"
    return f"{who} {mode} t={policy} ({minutes:g} min, {threads} thr)"


def print_report(runs: dict, phase: str) -> None:
    groups = configurations(runs, phase)
    if not groups:
        print(f"no {phase} runs recorded")
        return
    shown = PHASES[phase]["sections"]
    print(f"\nISBI 2012, phase {phase}: trained on sections 0-14, scored on {shown[0]}-{shown[1] - 1}; mean +- sd over "
          "seeds (sample sd), per section averages")
    width = max(len(label(n)) for n in groups)
    print(f"{'configuration':<{width}}  seeds  " + "  ".join(f"{h:>17}" for _, h, _, _ in METRICS) + "  iterations")
    for name in sorted(groups):
        per_seed = groups[name]
        cells = []
        for key, _, fmt, _ in METRICS:
            m, s = _mean_sd([r[key] for r in per_seed.values()])
            cells.append(f"{fmt.format(m)} +- {fmt.format(s) if s == s else '-'}")
        its = _mean_sd([r["iterations"] for r in per_seed.values()])[0]
        print(f"{label(name):<{width}}  {len(per_seed):>5}  " + "  ".join(f"{c:>17}" for c in cells) + f"  {its:>10.0f}")
    print("t=0.5: threshold 0.5; t=chosen: the threshold with the best mean V_rand on the training sections 0-14; "
          "t=<other>: the recipe's own threshold (its `threshold` key, chosen on the tune sections 15-19); "
          "tta: 8 flips/rotations averaged; adapted RE: adapted Rand error of 4-connected cells (SNEMI3D form)")
    print("\nper seed (pixel error / V_rand / adapted Rand error):")
    for name in sorted(groups):
        print(f"  {label(name):<{width}}  " + "   ".join(
            f"seed {s}{'*' if r['disturbed'] else ''}: {r['pixel_error']:.4f} / {r['v_rand']:.4f} / {r['adapted_rand_error']:.4f}"
            for s, r in sorted(groups[name].items())))
    if any(r["disturbed"] for g in groups.values() for r in g.values()):
        print(f"  * the run's training had less than {QUIET_SHARE:.0%} of its threads' CPU time (the machine was shared)")


def compare(runs: dict, phase: str, ours: tuple, peers: list[tuple]) -> None:
    """Done-when check (issue 17): ours beats each peer on mean V_rand and mean pixel error by more than one pooled
    sd, sqrt((sd_a^2 + sd_b^2) / 2), over at least 3 seeds each ("decisive")."""
    groups = configurations(runs, phase)
    if ours not in groups:
        return
    for peer in peers:
        if peer not in groups:
            continue
        print(f"\n{label(ours)} against {label(peer)}:")
        for key, better in (("v_rand", "max"), ("pixel_error", "min")):
            a_m, a_s = _mean_sd([r[key] for r in groups[ours].values()])
            b_m, b_s = _mean_sd([r[key] for r in groups[peer].values()])
            pooled = float(np.sqrt((a_s ** 2 + b_s ** 2) / 2))
            gain = (a_m - b_m) if better == "max" else (b_m - a_m)
            seeds = min(len(groups[ours]), len(groups[peer]))
            verdict = "too few seeds (< 3)" if seeds < 3 else "decisive" if gain > pooled else "not decisive"
            print(f"  {key}: {a_m:.4f} vs {b_m:.4f}, gain {gain:+.4f}, pooled sd {pooled:.4f} -> {verdict} "
                  f"({len(groups[ours])} vs {len(groups[peer])} seeds)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=tuple(PHASES), default="tune",
                    help="tune: score sections 15-19 (choosing settings); final: score 20-24 (settings frozen)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=["paper"],
                    help="paper: the bundle's recipe; monai: BasicUNet + DiceCE; torch_em: torch-em's recipe (own env)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                    help="seeds of initial weights, data order and augmentation (default 0 1 2)")
    ap.add_argument("--minutes", type=float, default=None, help="training budget per run (default: tune 10, final 20)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for training and inference (default 2)")
    ap.add_argument("--recipe", choices=tuple(RECIPES), default="cpu",
                    help="cpu: the documented CPU recipe (configs/em_cpu.yaml); gpu: the paper's full-width recipe "
                         "(configs/isbi2012.yaml), on a GPU when one is visible")
    ap.add_argument("--variant", default=None, help="name of the paper variant recorded (default: recipe, the "
                    "bundle's documented recipe; with --recipe gpu: gpu_recipe)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="bundle keys of the paper variant, values in YAML, e.g. weight_w0=20 batch_size=2")
    ap.add_argument("--data-dir", type=Path, default=default_data_dir(),
                    help="folder with train-volume.tif and train-labels.tif (default: $EM_DATA_DIR/isbi2012 "
                         "or <repo>/../shared/data/isbi2012)")
    ap.add_argument("--work-dir", type=Path, default=None, help="checkpoints, logs (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"the record of runs (default {DEFAULT_JSON})")
    ap.add_argument("--torch-em-python", default=str(DEFAULT_PEER_PYTHON),
                    help="python of torch-em's environment (default .venv-bench/bin/python)")
    ap.add_argument("--report", action="store_true", help="print the tables of the recorded runs and exit")
    ap.add_argument("--rescore", action="store_true", help="score the recorded runs of --phase/--methods/--seeds/"
                    "--variant again from the weights in --work-dir (the training stats stay)")
    ap.add_argument("--compare", default="paper/recipe:tta:0.5",
                    help="the configuration checked against the peers (at 0.5 and at their chosen thresholds) in the report: "
                         "method/variant:mode:threshold policy (0.5, chosen, or the recipe's own threshold, e.g. 0.6)")
    # internal: the training subprocesses
    ap.add_argument("--monai-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--torch-em-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed-here", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--predict-sections", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.seed = args.seed_here
    if args.monai_out or args.torch_em_out:
        args.data_dir = args.data_dir.expanduser().resolve()
        return train_monai_here(args) if args.monai_out else train_torch_em_here(args)
    import yaml

    try:
        args.set = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    except ValueError:
        ap.error(f"--set takes KEY=VALUE items, got {args.set}")
    global BUNDLE_CONFIGS
    BUNDLE_CONFIGS = RECIPES[args.recipe]
    args.variant = args.variant or {"cpu": "recipe", "gpu": "gpu_recipe"}[args.recipe]
    if args.set and args.variant in ("recipe", "gpu_recipe"):
        ap.error("--set changes the recipe: name the variant with --variant")
    args.minutes = PHASES[args.phase]["minutes"] if args.minutes is None else args.minutes
    if args.minutes < 0 or (args.minutes == 0 and args.methods != ["paper"]) or args.threads < 1:
        ap.error("--minutes must be > 0 (0: --methods paper with --set init_from=..., scored untrained) and --threads >= 1")
    if args.rescore and args.work_dir is None:
        ap.error("--rescore needs the --work-dir of the recorded runs")
    args.json = args.json.expanduser().resolve()
    runs = load_runs(args.json)
    if args.report:
        for phase in PHASES:
            print_report(runs, phase)
            who, mode, policy = args.compare.split(":")
            method, _, variant = who.partition("/")
            compare(runs, phase, (method, variant or "default", PHASES[phase]["minutes"], args.threads, mode, policy),
                    [(m, "default", PHASES[phase]["minutes"], args.threads, "plain", p)
                     for m in ("monai", "torch_em") for p in ("0.5", "chosen")])
        return
    args.data_dir = args.data_dir.expanduser().resolve()
    missing = [f for f in ("train-volume.tif", "train-labels.tif") if not (args.data_dir / f).is_file()]
    if missing:
        sys.exit(f"ISBI 2012 data not found: {', '.join(missing)} missing in {args.data_dir}. Fetch it with "
                 "scripts/fetch_isbi2012.py, or point --data-dir / $EM_DATA_DIR at it.")
    if "torch_em" in args.methods and not args.rescore and not Path(args.torch_em_python).is_file():
        sys.exit(PEER_ENV_MISSING.format(args.torch_em_python))
    import torch

    torch.set_num_threads(args.threads)
    args.work_dir = (args.work_dir or Path(tempfile.mkdtemp(prefix="benchmark_quality_"))).resolve()
    args.isbi = load_isbi(args.data_dir)
    print(f"data: {args.data_dir} {args.isbi[0].shape}; phase {args.phase}, {args.minutes:g} min per run, "
          f"{args.threads} threads; record {args.json}; work dir {args.work_dir}", flush=True)
    if args.rescore:
        return rescore(args, runs)
    for seed in args.seeds:  # seeds outermost: an interrupted series has every method at the same seeds
        for method in args.methods:
            run_one(args, method, seed, runs)
    print_report(load_runs(args.json), args.phase)


if __name__ == "__main__":
    main()
