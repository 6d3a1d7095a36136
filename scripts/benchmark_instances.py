#!/usr/bin/env python
"""Instances after prediction (issue 18): thresholding + connected components against the seeded watershed.

For each dataset a trained checkpoint predicts the sections (overlap-tile, AdaBN when the network has
BatchNorm, as the CPU recipe validates); then the foreground probability becomes instances by

- (i) ``components``: 4-connected components of ``p > 0.5`` (what the ISBI scores call cells);
- (ii) ``watershed``: :class:`pipeline.instances.InstanceRule` (seeds farther than ``--seed-distance`` px
  inside ``boundary < 0.5``, flooded over the boundary probability), per section; filling the membranes
  (``fill: true``, the default) or leaving them 0 (``fill: false``, as the ground truth does);

and each is scored against the ground-truth cells of every section (ISBI 2012: the 4-connected regions of
the interior; synthetic: the generator's cell ids) by the adapted Rand error (skimage, mean over sections)
and, for objects, F1 at IoU 0.5 (:func:`pipeline.metrics.matching`); a reference row scores the components of the
true foreground itself (the floor of any method that keeps the membranes). Timing: seconds per megapixel of the
network (its prediction) and of each post-processing, and their ratio, medians over ``--repeats``.

Datasets:

- ``synthetic``: ``--synthetic-images`` 512 x 512 images of ``pipeline.synthetic`` (seeds 20000..), not used
  in any training, with ``--synthetic-checkpoint`` (default: the shipped pretrained weights when present);
- ``isbi``: sections ``--sections`` (default 20-24, the report sections of docs/benchmarks.md) of ISBI 2012
  (``--data-dir``), with ``--isbi-checkpoint`` (a network trained on sections 0-14).

Usage::

    python scripts/benchmark_instances.py --isbi-checkpoint runs/isbi/models/model_final.pt
    python scripts/benchmark_instances.py --datasets synthetic --synthetic-checkpoint bundles/em_unet/models/model_final.pt
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

from pipeline.checkpoints import network_from_checkpoint  # noqa: E402
from pipeline.inferers import OverlapTileInferer  # noqa: E402
from pipeline.instances import InstanceRule, components, make_instances  # noqa: E402
from pipeline.metrics import matching  # noqa: E402
from pipeline.transforms import NormalizeSectionsd, class_probabilities  # noqa: E402


def synthetic(n: int):
    from pipeline.synthetic import make_targets

    items = [make_targets((512, 512), seed=20000 + i) for i in range(n)]
    return np.stack([t["image"] for t in items]), np.stack([t["cells"] for t in items]).astype(np.int64)


def isbi(data_dir: Path, sections: tuple[int, int]):
    import tifffile
    from scipy import ndimage as ndi

    image = tifffile.imread(data_dir / "train-volume.tif")[sections[0]:sections[1]].astype(np.float32)
    label = tifffile.imread(data_dir / "train-labels.tif")[sections[0]:sections[1]] > 0
    cells = np.stack([ndi.label(s)[0] for s in label]).astype(np.int64)  # 4-connected regions of the interior
    return image, cells


def predict(network, image: np.ndarray, adapt: bool) -> np.ndarray:
    """The probabilities of both classes ``(2, Z, Y, X)`` of a stack, sections normalised on their own."""
    x = NormalizeSectionsd("image")({"image": torch.from_numpy(image)[None]})["image"]
    with torch.inference_mode():
        return class_probabilities(OverlapTileInferer(adapt_norm=adapt)(x[None], network)[0]).numpy()


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def score(truth: np.ndarray, ids: np.ndarray) -> tuple[float, float]:
    """Mean adapted Rand error and mean F1 at IoU 0.5 over sections."""
    from skimage.metrics import adapted_rand_error

    are = [adapted_rand_error(t, p)[0] for t, p in zip(truth, ids)]
    f1 = [matching(t, p, 0.5)["f1"] for t, p in zip(truth, ids)]
    return float(np.mean(are)), float(np.mean(f1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["synthetic", "isbi"], choices=["synthetic", "isbi"])
    ap.add_argument("--synthetic-checkpoint", type=Path, default=REPO / "pipeline" / "pretrained" / "synthetic_unet16_valid_bn.pt")
    ap.add_argument("--synthetic-images", type=int, default=5)
    ap.add_argument("--isbi-checkpoint", type=Path, default=None)
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("EM_DATA_DIR", REPO.parent / "shared" / "data")) / "isbi2012")
    ap.add_argument("--sections", type=int, nargs=2, default=[20, 25])
    ap.add_argument("--seed-distance", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, {args.threads} threads, median of {args.repeats}")
    print("| dataset | method | adapted Rand error | F1 at IoU 0.5 | s per MP | x network |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.datasets:
        checkpoint = args.synthetic_checkpoint if name == "synthetic" else args.isbi_checkpoint
        if checkpoint is None or not Path(checkpoint).is_file():
            print(f"| {name} | skipped: no checkpoint ({checkpoint}) | | | | |")
            continue
        if name == "isbi" and not (args.data_dir / "train-volume.tif").is_file():
            print(f"| {name} | skipped: no ISBI 2012 data in {args.data_dir} | | | | |")
            continue
        image, truth = synthetic(args.synthetic_images) if name == "synthetic" else isbi(args.data_dir, tuple(args.sections))
        network = network_from_checkpoint(str(checkpoint)).eval()
        adapt = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in network.modules())
        megapixels = image.size / 1e6
        t_net, probs = timed(lambda: predict(network, image, adapt), args.repeats)
        print(f"| {name} ({image.shape[0]} x {image.shape[1]} x {image.shape[2]}) | network{' + AdaBN' if adapt else ''} | | | "
              f"{t_net / megapixels:.2f} | 1 |")
        floor, _ = score(truth, np.stack([components(t > 0) for t in truth]))
        print(f"| {name} | (reference: components of the true foreground) | {floor:.4f} | | | |")
        rules = {"components": None,
                 f"watershed (seed_distance {args.seed_distance:g})": InstanceRule("watershed", seed_distance=args.seed_distance),
                 "watershed, fill false": InstanceRule("watershed", seed_distance=args.seed_distance, fill=False)}
        for method, rule in rules.items():
            if rule is None:
                fn = lambda: np.stack([components(p > 0.5) for p in probs[1]])  # noqa: E731
            else:
                fn = lambda rule=rule: make_instances(probs, rule)  # noqa: E731
            t, ids = timed(fn, args.repeats)
            are, f1 = score(truth, ids)
            print(f"| {name} | {method} | {are:.4f} | {f1:.3f} | {t / megapixels:.3f} | {t / t_net:.3f} |")


if __name__ == "__main__":
    main()
