"""Whole-slide prediction: this pipeline's streaming path vs MONAI's own whole-slide path, one run.

Writes a synthetic RGB pyramidal TIFF (``--size`` x ``--size`` pixels, 4 levels, tissue on ~40% of it:
textured ellipses on a pale background, made tile by tile so that memory stays small) and predicts it
at level 0 with one network (the paper's valid-convolution U-Net, features 4..64, 3 input channels,
fixed random weights) by:

- ``pipeline``: ``pipeline.streaming.predict_files`` (1024 px blocks, per-slide normalisation statistics,
  exact overlap-tile with mirror padding, the tissue rule ``skip_background``), then its export to tiled
  pyramidal OME-TIFFs (probabilities and mask), timed apart, in a subprocess;
- ``monai``: ``monai.inferers.PatchInferer`` with ``WSISlidingWindowSplitter`` (the OpenSlide WSI reader,
  level 0; MONAI's ``tifffile`` backend decodes the whole level for every patch, and cuCIM needs a GPU) and ``ZarrAvgMerger`` (a zarr store on disk), on 500 px patches, each reflected by the 92 px
  margin (a valid network needs it; 500 divides the slide size, as the splitter does not pad edge
  patches of a WSI), without tissue skipping (MONAI has no tissue rule), in a subprocess.

The MONAI path needs OpenSlide in the benchmark's environment (not a project dependency):
``pip install openslide-python openslide-bin``.

Each run reports wall time, throughput (megapixels of the slide per second) and peak RSS (the
subprocess's ``VmHWM``). Usage (the recorded run: ``docs/benchmarks.md``)::

    python scripts/benchmark_wsi.py --size 30000 --threads 2 --workdir /tmp/wsi_bench
    python scripts/benchmark_wsi.py --size 4000 --workdir /tmp/wsi_small      # a minute, to try it

``--size`` must be a multiple of 500 (MONAI's patches).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEATURES = (4, 8, 16, 32, 64)
TILE = 512
PATCH = 500  # MONAI's patches: 4 + 16 n (a valid output size of this network), dividing --size


def _pixels(y0: int, x0: int, h: int, w: int, step: int, size: int) -> np.ndarray:
    """RGB uint8 of the slide's region (level-0 coordinates ``y0, x0``, ``h x w`` samples every ``step``)."""
    yy = (y0 + np.arange(h) * step)[:, None].astype(np.float64)
    xx = (x0 + np.arange(w) * step)[None, :].astype(np.float64)
    tissue = np.zeros((h, w), bool)
    for cy, cx, ry, rx in ((0.3, 0.3, 0.22, 0.25), (0.68, 0.62, 0.27, 0.3), (0.35, 0.8, 0.15, 0.12)):
        tissue |= ((yy / size - cy) / ry) ** 2 + ((xx / size - cx) / rx) ** 2 < 1
    texture = (np.sin(yy / 23.0) * np.cos(xx / 17.0) + np.sin((yy + xx) / 41.0)) * 0.25 + 0.5
    hashed = ((yy.astype(np.int64) * 73856093) ^ (xx.astype(np.int64) * 19349663)) % 97 / 97.0
    value = np.clip(texture * 0.8 + hashed * 0.2, 0, 1)
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[..., 0] = np.where(tissue, 120 + 100 * value, 238)
    rgb[..., 1] = np.where(tissue, 40 + 90 * value, 236)
    rgb[..., 2] = np.where(tissue, 110 + 80 * value, 240)
    return rgb


def write_slide(path: Path, size: int, levels: int = 4) -> float:
    """Write the synthetic slide (tiled, zlib, reduced-resolution pages); return the tissue fraction of a thumbnail."""
    import tifffile

    def tiles(step: int):
        n = -(-size // step)
        for y in range(0, n, TILE):
            for x in range(0, n, TILE):
                yield _pixels(y * step, x * step, min(TILE, n - y), min(TILE, n - x), step, size)

    with tifffile.TiffWriter(path, bigtiff=True) as tif:  # levels as pages after the image: OpenSlide's generic TIFF, tifffile
        options = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "zlib"}
        tif.write(tiles(1), shape=(size, size, 3), dtype=np.uint8, **options)
        for k in range(1, levels):
            n = -(-size // 2**k)
            tif.write(tiles(2**k), shape=(n, n, 3), dtype=np.uint8, subfiletype=1, **options)
    small = _pixels(0, 0, size // 16, size // 16, 16, size)
    return float((small[..., 0] != 238).mean())


def network():
    import torch

    from pipeline.networks import UNet

    torch.manual_seed(0)
    return UNet(spatial_dims=2, in_channels=3, out_channels=2, features=FEATURES, dropout=0.0).eval()


def run_pipeline(slide: str, out: str, threads: int) -> dict:
    import torch

    from pipeline import streaming

    import logging

    torch.set_num_threads(threads)
    done: list[float] = []

    class Done(logging.Handler):  # the time the last block was written (predict_zarr logs it), before the export
        def emit(self, record):
            if "blocks done" in record.getMessage():
                done.append(time.perf_counter())

    logging.getLogger("pipeline.streaming").addHandler(Done())
    logging.getLogger("pipeline.streaming").setLevel(logging.INFO)
    start = time.perf_counter()
    streaming.predict_files(network(), [slide], out, block_size=1024, skip_background=True, export="ome-tiff", overwrite=True)
    end = time.perf_counter()
    return {"predict": done[0] - start, "export": end - done[0], "seconds": end - start}


def run_monai(slide: str, out: str, threads: int) -> dict:
    import torch
    import torch.nn.functional as F
    from monai.data import WSIReader
    from monai.inferers import PatchInferer, WSISlidingWindowSplitter
    from monai.inferers.merger import ZarrAvgMerger

    torch.set_num_threads(threads)
    net = network()
    margin = net.geometry.margin

    class Reflect(torch.nn.Module):  # a MONAI user's way to run a valid network on patches: pad each patch
        def forward(self, x):
            x = x.float()
            x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True).clamp_min(1e-6)
            return torch.softmax(net(F.pad(x, (margin,) * 4, mode="reflect")), 1)[:, 1:]

    inferer = PatchInferer(
        splitter=WSISlidingWindowSplitter(patch_size=PATCH, overlap=0.0, reader=WSIReader(backend="openslide", level=0)),
        merger_cls=ZarrAvgMerger, store=os.path.join(out, "monai.zarr"), value_dtype="float32", count_dtype="uint8",
        batch_size=4,
    )
    start = time.perf_counter()
    with torch.no_grad():
        inferer(slide, Reflect())
    seconds = time.perf_counter() - start
    return {"predict": seconds, "export": 0.0, "seconds": seconds}


def _child(which: str, slide: str, out: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--slide", slide, "--out", out, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        return {"error": proc.stderr[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=30000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/wsi_bench")
    parser.add_argument("--which", default="pipeline,monai")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--slide", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size % PATCH:
        parser.error(f"--size must be a multiple of {PATCH}, got {args.size}")
    if args.child:
        sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
        from _machine import peak_rss_mb
        result = (run_pipeline if args.child == "pipeline" else run_monai)(args.slide, args.out, args.threads)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    slide = work / f"slide_{args.size}.tif"
    if not slide.exists():
        start = time.perf_counter()
        tissue = write_slide(slide, args.size)
        print(f"wrote {slide} ({slide.stat().st_size / 2**20:.0f} MiB, tissue {tissue:.0%}) in {time.perf_counter() - start:.0f} s")
    megapixels = args.size**2 / 1e6
    print("| path | predict s | export s | total s | Mpx/s (slide, total) | peak RSS MB |\n| --- | --- | --- | --- | --- | --- |")
    for which in args.which.split(","):
        out = work / f"out_{which}"
        out.mkdir(exist_ok=True)
        result = _child(which, str(slide), str(out), args.threads)
        if "error" in result:
            print(f"| {which} | failed: {result['error'][-300:]!r} | | | | |")
            continue
        print(f"| {which} | {result['predict']:.0f} | {result['export']:.0f} | {result['seconds']:.0f} | "
              f"{megapixels / result['seconds']:.2f} | {result['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
