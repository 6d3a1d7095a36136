"""Streaming prediction of one EM volume stored three ways: TIFF, HDF5 and OME-Zarr. Peak memory and
time per format, and whether the outputs equal the TIFF path's.

Writes a synthetic uint8 ``(Z, Y, X)`` volume of ``--gigabytes`` (sections of ``--plane`` x ``--plane``
pixels, written section by section, cycling through 8 distinct synthetic sections) as a multi-page BigTIFF, an HDF5 dataset ``raw`` (chunks 1 x 256 x 256,
gzip) and an OME-Zarr image (NGFF 0.5, chunks 1 x 512 x 512, by ``ome-zarr``), then predicts each with
``pipeline.streaming.predict_zarr`` (the 2D paper network with features 4..64, fixed random weights,
1024-pixel blocks) in a subprocess, and reports wall time, megavoxels per second, the subprocess's peak
RSS and the largest difference from the TIFF output. Usage (results: ``docs/benchmarks.md``)::

    python scripts/benchmark_containers.py --gigabytes 2 --workdir /tmp/containers_bench
    python scripts/benchmark_containers.py --gigabytes 0.05 --workdir /tmp/containers_small   # minutes
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEATURES = (4, 8, 16, 32, 64)


DISTINCT = 8  # synthetic sections are slow to make at 4096 px: the volume cycles through this many


@functools.lru_cache(maxsize=DISTINCT)
def _section(seed: int, plane: int) -> np.ndarray:
    from pipeline.synthetic import make_stack, to_uint8

    image, _ = make_stack((1, plane, plane), seed=seed)
    return to_uint8(image)[0]


def write_volumes(work: Path, sections: int, plane: int) -> dict[str, tuple[str, str | None]]:
    import dask.array as da
    import h5py
    import tifffile
    import zarr
    from ome_zarr.writer import write_image

    tiff, h5, ome = work / "volume.tif", work / "volume.h5", work / "volume.ome.zarr"
    with tifffile.TiffWriter(tiff, bigtiff=True) as tif, h5py.File(h5, "w") as f:
        raw = f.create_dataset("raw", shape=(sections, plane, plane), dtype="uint8", chunks=(1, 256, 256), compression="gzip")
        raw.attrs["resolution"] = [40.0, 4.0, 4.0]
        store = zarr.open_group(str(ome), mode="w")
        for z in range(sections):
            section = _section(z % DISTINCT, plane)
            tif.write(section, photometric="minisblack", contiguous=True)
            raw[z] = section
            if z == 0:
                write_image(da.zeros((sections, plane, plane), np.uint8, chunks=(1, 512, 512)), store, scaler=None, scale_factors=[], axes="zyx",
                            scale={"z": 40.0, "y": 4.0, "x": 4.0}, storage_options={"chunks": (1, 512, 512)}, compute=True)
                level = store[store.attrs.asdict()["ome"]["multiscales"][0]["datasets"][0]["path"]]
            level[z] = section
    return {"tiff": (str(tiff), None), "hdf5": (str(h5), "raw"), "ome-zarr": (str(ome), None)}


def _child(source: str, key: str | None, out: str, threads: int) -> dict:
    import torch

    from _machine import peak_rss_mb
    from pipeline.networks import UNet
    from pipeline.streaming import predict_zarr

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, features=FEATURES, dropout=0.0).eval()
    start = time.perf_counter()
    predict_zarr(net, source, out, key=key, block_size=1024, write=("probabilities",), overwrite=True)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=2.0)
    parser.add_argument("--plane", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/containers_bench")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
        source, key, out = args.child
        print(json.dumps(_child(source, None if key == "-" else key, out, args.threads)))
        return
    sys.path.insert(0, str(ROOT))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sections = max(1, round(args.gigabytes * 2**30 / args.plane**2))
    start = time.perf_counter()
    sources = write_volumes(work, sections, args.plane)  # (the children's peak RSS excludes this process's)
    print(f"volume ({sections}, {args.plane}, {args.plane}) uint8 = {sections * args.plane**2 / 2**30:.2f} GiB, written in {time.perf_counter() - start:.0f} s")
    print("| format | wall s | Mvox/s | peak RSS MB | max diff to TIFF |\n| --- | --- | --- | --- | --- |")
    import zarr

    reference = None
    for name, (source, key) in sources.items():
        out = work / f"out_{name}.zarr"
        cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", source, key or "-", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(f"| {name} | failed: {proc.stderr[-300:]!r} | | | |")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        prob = zarr.open_group(str(out), mode="r")["probabilities"]
        if reference is None:
            reference, diff = prob, 0.0
        else:
            diff = max(float(np.abs(prob[z] - reference[z]).max()) for z in range(prob.shape[0]))
        mvox = sections * args.plane**2 / 1e6
        print(f"| {name} | {result['seconds']:.0f} | {mvox / result['seconds']:.2f} | {result['peak_rss_mb']:.0f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
