#!/usr/bin/env python
"""Benchmark block-wise streaming prediction (``pipeline.streaming.predict_zarr``, issue 6 item 4).

Three measurements (``--only`` picks some), each run of ``predict_zarr`` in a fresh subprocess of this
script, so that its peak RSS is its own:

``scaling``  peak RSS predicting a volume (``--scale-shape``, default 32 x 1024 x 1024) and one
    ``--scale-factor`` (4) times larger along Z; target: peak(4x) / peak(1x) <= 1.1. Both results
    (``write=("probabilities", "mask")``) are written, as ``predict_zarr`` does by default.
``big``      a >= 2 GB uint8 volume (``--big-shape``, default 2048 x 1024 x 1024 = 2.15 GB) predicted
    with peak RSS <= 1.5 GB (1.5e9 bytes = 1431 MiB). Only the mask is written (``--big-write mask``):
    float32 probabilities of a 2.15 GB uint8 input would be 8.6 GB before compression.
``dask``     the same volume (``--dask-shape``, default 64 x 512 x 512) through a wider network
    (``--dask-features``, default 16..256, so that compute dominates) on a ``LocalCluster`` of 1 and of
    ``--dask-workers`` (2) single-thread worker processes; target: speed-up >= 1.7x. An in-process
    single-thread run (``scheduler=None``) is added as the no-Dask reference (``--no-baseline`` drops
    it). The cluster is started with ``pipeline.engine.distributed.connect("local", ...)``, exactly what
    ``predict_zarr(scheduler="local")`` does, and handed to ``predict_zarr`` as a client, so that the
    cluster start (forkserver that imports torch, worker processes) and close are timed apart from
    the prediction; the speed-up is reported for both "predict only" and "end to end" (start +
    predict + close). Worker peak RSS and CPU seconds come from ``client.run`` (``getrusage`` in each
    worker) after the prediction.

Every run: a valid (paper-style) ``UNet(features=...)``, ``torch.manual_seed(0)``, ``dropout=0``,
``eval()``; ``predict_zarr`` with its defaults otherwise (``tile_size="auto"``, ``batch_size=4``,
``memory_budget_mb=1024``, ``normalize=True`` -- so the timed call includes the statistics pass
over the whole input, timed separately as "stats s" by wrapping ``pipeline.engine.sources.section_stats``).
Blocks are ``(1, B, B)`` (``--block``, default 1024; ``--dask-block``, default 512): the 2D network
runs on the sections of the stack. Scaling and big runs use ``--threads`` torch threads (default 1:
on a shared 2-core machine 2 threads were *slower*, 0.6 against 0.95 MPix/s, since every OpenMP
barrier waits for a descheduled thread; ``--threads 2`` on an idle machine); Dask workers and the
in-process reference always use 1 (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``).

Peak RSS = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the subprocess at its end: the whole
process (Python, torch, the network, the prediction), not just the prediction; "RSS before" is
``VmRSS`` just before ``predict_zarr`` is called, so "peak - before" is the prediction's own share.
For Dask runs the subprocess is the client (and scheduler); the workers' own peaks are listed apart.

Inputs are synthetic uint8 zarr arrays (zarr v3, default compressor, chunks ``(1, C, C)``,
``--chunk`` default 512) created in ``--work-dir`` chunk by chunk (smooth sinusoids plus Gaussian
noise, deterministic per chunk), so creating them never holds more than one chunk. With ``--keep``
inputs and outputs are kept, and a later run with the same ``--work-dir`` reuses complete inputs of
the same shape and chunks (creating the 2.15 GB input takes ~2.5 min; it does not compress).

"others busy" is the share of the machine's cores used by other processes during the timed
``predict_zarr`` call (``/proc/stat`` busy time minus the CPU time the subprocess and, for Dask, its
workers spent in that call): the machine may be shared. "CPU s" is the subprocess's CPU time from
just before the call (Dask: cluster start included) plus, for Dask, each worker's CPU time since it
started.

Usage::

    python scripts/benchmark_streaming.py --quick                  # validation, tiny sizes (~1.5 min, mostly start-up)
    python scripts/benchmark_streaming.py --json /tmp/streaming.json   # ~40 min on 2 cores (big run ~30 min)
    python scripts/benchmark_streaming.py --only dask --dask-shape 128 512 512
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MEASUREMENTS = ("scaling", "big", "dask")
TARGETS = dict(rss_ratio=1.1, big_rss_bytes=1.5e9, big_min_bytes=2e9, speedup=1.7)
MIB = 2**20


# ---------------------------------------------------------------- machine facts
from _machine import cpu_model, fmt, machine_busy_seconds, status_kb  # noqa: E402  (scripts/ is on sys.path)


def _cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


def _worker_usage() -> dict:
    """Run on each Dask worker (``client.run``): its own peak RSS (KiB) and CPU seconds."""
    import resource as r

    ru = r.getrusage(r.RUSAGE_SELF)
    return dict(peak_kb=ru.ru_maxrss, cpu_s=ru.ru_utime + ru.ru_stime)


# ---------------------------------------------------------------- synthetic input
def _content(seed: int, box: tuple[slice, slice, slice]) -> np.ndarray:
    """uint8 chunk at ``box`` (global coordinates): smooth sinusoids plus Gaussian noise, deterministic."""
    z, y, x = (np.arange(s.start, s.stop, dtype=np.float32) for s in box)
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    smooth = 60 * np.sin(y / 37 + z / 11) * np.cos(x / 53 - z / 17) + 40 * np.sin((x + y) / 101)
    rng = np.random.default_rng([seed, box[0].start, box[1].start, box[2].start])
    noise = rng.standard_normal(tuple(s.stop - s.start for s in box), dtype=np.float32) * 15
    return np.clip(128 + smooth + noise, 0, 255).astype(np.uint8)


def make_volume(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], seed: int = 0) -> tuple[float, bool]:
    """Create (or reuse) the uint8 zarr array ``path``; returns (seconds, reused)."""
    import zarr

    if path.exists():
        try:
            arr = zarr.open_array(str(path), mode="r")
            info = arr.attrs.asdict().get("benchmark_volume", {})
            if (tuple(arr.shape) == shape and tuple(arr.chunks) == chunks and arr.dtype == np.uint8
                    and info.get("complete") and info.get("seed") == seed):
                return 0.0, True
        except Exception:  # noqa: BLE001 - anything unreadable is recreated
            pass
        shutil.rmtree(path)
    t = time.perf_counter()
    arr = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="uint8", fill_value=0)
    grid = [range(0, s, c) for s, c in zip(shape, chunks)]
    for z0 in grid[0]:
        for y0 in grid[1]:
            for x0 in grid[2]:
                box = tuple(slice(o, min(o + c, s)) for o, c, s in zip((z0, y0, x0), chunks, shape))
                arr[box] = _content(seed, box)
    arr.attrs["benchmark_volume"] = dict(seed=seed, complete=True)
    return time.perf_counter() - t, False


# ---------------------------------------------------------------- child (one measured run)
def run_child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from pipeline.engine import distributed, sources
    from pipeline.networks import UNet
    from pipeline.streaming import MARKERS, predict_zarr

    torch.manual_seed(0)
    net = UNet(features=tuple(spec["features"]), dropout=0.0).eval()
    stats_seconds = []
    real_stats = sources.section_stats

    def timed_stats(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real_stats(*args, **kwargs)
        finally:
            stats_seconds.append(time.perf_counter() - t)

    sources.section_stats = timed_stats  # timing only; the call is unchanged
    kwargs = dict(block_size=spec["block"], write=tuple(spec["write"]), overwrite=True)
    result = dict(threads=spec["threads"], torch_threads=torch.get_num_threads())
    cpu0 = _cpu_seconds()
    if spec["scheduler"] is None:
        rss_before = status_kb("VmRSS")
        busy0, t = machine_busy_seconds(), time.perf_counter()
        predict_zarr(net, spec["source"], spec["output"], **kwargs)
        seconds, busy1 = time.perf_counter() - t, machine_busy_seconds()
        ours = _cpu_seconds() - cpu0
        result.update(seconds=seconds)
    else:
        t = time.perf_counter()
        client, owned = distributed.connect("local", spec["workers"], 1, 30.0)  # as predict_zarr(scheduler="local")
        client.wait_for_workers(spec["workers"])
        start = time.perf_counter() - t
        rss_before = status_kb("VmRSS")
        before = client.run(_worker_usage)
        self0, busy0, t = _cpu_seconds(), machine_busy_seconds(), time.perf_counter()
        predict_zarr(net, spec["source"], spec["output"], scheduler=client, threads_per_worker=1, **kwargs)
        seconds, busy1 = time.perf_counter() - t, machine_busy_seconds()
        usage = client.run(_worker_usage)
        ours = _cpu_seconds() - self0 + sum(u["cpu_s"] - before.get(w, {"cpu_s": 0.0})["cpu_s"] for w, u in usage.items())
        threads = client.run(torch.get_num_threads)  # the worker's event-loop thread
        task_threads = client.gather([client.submit(torch.get_num_threads, pure=False, workers=[w], allow_other_workers=False)
                                      for w in usage])  # a task thread, where blocks ran
        t = time.perf_counter()
        for thing in owned:
            thing.close()
        close = time.perf_counter() - t
        result.update(seconds=seconds, start_seconds=start, close_seconds=close,
                      worker_peak_mb=[u["peak_kb"] / 1024 for u in usage.values()],
                      worker_cpu_s=[u["cpu_s"] for u in usage.values()], worker_torch_threads=sorted(threads.values()),
                      worker_task_torch_threads=sorted(task_threads))
    import zarr

    group = zarr.open_group(spec["output"], mode="r")
    markers = group[MARKERS][...]
    result.update(
        blocks=int(markers.size), blocks_done=int(markers.sum()), stats_seconds=sum(stats_seconds),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_before_mb=rss_before / 1024 if rss_before else None, cpu_s=_cpu_seconds() - cpu0,
        others_busy=None if busy0 is None else max(busy1 - busy0 - ours, 0.0) / seconds / os.cpu_count(),
    )
    return result


# ---------------------------------------------------------------- parent
def run_measured(spec: dict) -> dict | None:
    """Run ``spec`` in a fresh subprocess; returns its result (plus the subprocess's wall time) or None."""
    threads = str(spec["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    output = Path(spec["output"])
    if output.exists():
        shutil.rmtree(output)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"! {spec['label']} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    r = json.loads(lines[-1][7:])
    r.update(spec=spec, subprocess_seconds=elapsed)
    return r


def describe(r: dict) -> dict:
    """Derived figures of one result."""
    s = r["spec"]
    pixels = math.prod(s["shape"])
    return dict(
        pixels=pixels, gb=pixels / 1e9, mpix_s=pixels / r["seconds"] / 1e6,
        end_to_end=r["seconds"] + r.get("start_seconds", 0.0) + r.get("close_seconds", 0.0),
    )


def render_table(results: list[dict]) -> str:
    cols = ["measurement", "run", "input shape", "input GB", "blocks (done)", "network", "writes", "threads / workers",
            "predict s", "stats s", "MPix/s", "cluster start + close s", "peak RSS MiB", "RSS before MiB",
            "peak - before MiB", "worker peak RSS MiB", "CPU s (incl. workers)", "others busy"]
    rows = []
    for r in results:
        s, d = r["spec"], describe(r)
        feats = "..".join(map(str, (s["features"][0], s["features"][-1])))
        workers = f"{s['workers']} x 1 thread (Dask)" if s["scheduler"] else f"{s['threads']} thread(s), in process"
        cluster = f"{r['start_seconds']:.1f} + {r['close_seconds']:.1f}" if "start_seconds" in r else "-"
        rows.append([
            s["measurement"], s["label"], "x".join(map(str, s["shape"])), f"{d['gb']:.3f}",
            f"{r['blocks']} ({r['blocks_done']})", f"UNet {feats}, block {'x'.join(map(str, s['block']))}",
            "+".join(s["write"]), workers, f"{r['seconds']:.1f}", f"{r['stats_seconds']:.1f}", f"{d['mpix_s']:.3f}", cluster,
            f"{r['peak_rss_mb']:.0f}", fmt(r["rss_before_mb"], ".0f"),
            fmt(r["peak_rss_mb"] - r["rss_before_mb"] if r["rss_before_mb"] else None, ".0f"),
            ", ".join(f"{m:.0f}" for m in r["worker_peak_mb"]) if "worker_peak_mb" in r else "-",
            f"{r['cpu_s'] + sum(r.get('worker_cpu_s', [])):.1f}", fmt(r["others_busy"], ".0%"),
        ])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(value: float | None, limit: float, upper: bool = True) -> str:
    if value is None:
        return "n/a"
    return "met" if (value <= limit if upper else value >= limit) else "NOT met"


def render_targets(results: list[dict]) -> list[str]:
    by = {r["spec"]["label"]: r for r in results}
    lines = ["targets (a benchmark, not a test):"]
    scaling = [r for r in results if r["spec"]["measurement"] == "scaling"]
    base, large = (scaling[0], scaling[-1]) if len(scaling) == 2 else (None, None)
    if base and large:
        ratio = large["peak_rss_mb"] / base["peak_rss_mb"]
        own = [r["peak_rss_mb"] - r["rss_before_mb"] if r["rss_before_mb"] else None for r in (base, large)]
        factor = math.prod(large["spec"]["shape"]) / math.prod(base["spec"]["shape"])
        lines.append(f"  scaling  peak RSS {factor:g}x volume / 1x volume <= {TARGETS['rss_ratio']}: "
                     f"{large['peak_rss_mb']:.0f} / {base['peak_rss_mb']:.0f} MiB = {ratio:.3f}  "
                     f"{verdict(ratio, TARGETS['rss_ratio'])}   (peak - before: {fmt(own[0], '.0f')} -> {fmt(own[1], '.0f')} MiB)")
    big = by.get("big")
    if big:
        gb = describe(big)["gb"]
        peak_bytes = big["peak_rss_mb"] * MIB
        size_ok = gb * 1e9 >= TARGETS["big_min_bytes"]
        lines.append(f"  big      input {gb:.2f} GB {'>=' if size_ok else '<'} 2 GB; peak RSS {peak_bytes / 1e9:.3f} GB "
                     f"({big['peak_rss_mb']:.0f} MiB) <= 1.5 GB: "
                     f"{verdict(peak_bytes, TARGETS['big_rss_bytes']) if size_ok else 'n/a (input < 2 GB)'}")
    dask = [r for r in results if r["spec"]["scheduler"] == "local"]
    one = next((r for r in dask if r["spec"]["workers"] == 1), None)
    two = next((r for r in dask if r["spec"]["workers"] > 1), None)
    ref = by.get("in-process 1 thread")
    if one and two:
        n = two["spec"]["workers"]
        sp = one["seconds"] / two["seconds"]
        e1, e2 = describe(one)["end_to_end"], describe(two)["end_to_end"]
        cpu1 = one["cpu_s"] + sum(one["worker_cpu_s"])
        cpu2 = two["cpu_s"] + sum(two["worker_cpu_s"])
        lines.append(f"  dask     speed-up {n} workers vs 1 (predict only) >= {TARGETS['speedup']}: "
                     f"{one['seconds']:.1f} / {two['seconds']:.1f} s = {sp:.2f}x  {verdict(sp, TARGETS['speedup'], upper=False)}")
        lines.append(f"  dask     speed-up {n} workers vs 1 (end to end, cluster start + close included) >= {TARGETS['speedup']}: "
                     f"{e1:.1f} / {e2:.1f} s = {e1 / e2:.2f}x  {verdict(e1 / e2, TARGETS['speedup'], upper=False)}")
        lines.append(f"  dask     CPU seconds (client + workers): 1 worker {cpu1:.1f}, {n} workers {cpu2:.1f}; "
                     f"others busy {fmt(one['others_busy'], '.0%')} / {fmt(two['others_busy'], '.0%')}")
        if ref:
            lines.append(f"  dask     overhead of Dask, 1 worker vs in-process 1 thread: {one['seconds']:.1f} / {ref['seconds']:.1f} s "
                         f"= {one['seconds'] / ref['seconds']:.2f}x (predict only), {e1 / ref['seconds']:.2f}x (end to end)")
    return lines


def compare_outputs(paths: list[Path], names: tuple[str, ...]) -> dict:
    """Max |difference| of each result between the first output and the others, read chunk row by chunk row."""
    import zarr

    out = {}
    first = zarr.open_group(str(paths[0]), mode="r")
    for other in paths[1:]:
        g = zarr.open_group(str(other), mode="r")
        for name in names:
            a, b = first[name], g[name]
            worst = 0.0
            for z0 in range(0, a.shape[0], a.chunks[0]):
                x, y = a[z0 : z0 + a.chunks[0]].astype(np.float64), b[z0 : z0 + a.chunks[0]].astype(np.float64)
                worst = max(worst, float(np.nanmax(np.abs(x - y))) if x.size else 0.0)
            out[f"{other.name} {name}"] = worst
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes for validation (seconds to a minute); targets are not meaningful")
    p.add_argument("--only", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS), help="measurements to run")
    p.add_argument("--work-dir", type=Path, default=None, help="folder for inputs and outputs [a temporary folder]")
    p.add_argument("--keep", action="store_true", help="keep inputs and outputs in --work-dir (and reuse complete inputs there)")
    p.add_argument("--scale-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None, help="1x volume [32 1024 1024; quick 2 128 128]")
    p.add_argument("--scale-factor", type=int, default=4, help="the larger volume has this many times the sections")
    p.add_argument("--scale-write", nargs="+", choices=("probabilities", "mask"), default=["probabilities", "mask"])
    p.add_argument("--big-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None, help="big volume [2048 1024 1024; quick 8 256 256]")
    p.add_argument("--big-write", nargs="+", choices=("probabilities", "mask"), default=["mask"])
    p.add_argument("--block", type=int, default=None, help="block (= output chunk) Y and X for scaling/big [1024; quick 128]")
    p.add_argument("--chunk", type=int, default=None, help="input chunk Y and X (Z: 1) [512; quick 64]")
    p.add_argument("--features", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="U-Net widths for scaling/big")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and OMP/MKL threads) for scaling/big runs")
    p.add_argument("--dask-shape", type=int, nargs=3, metavar=("Z", "Y", "X"), default=None, help="Dask volume [64 512 512; quick 8 256 256]")
    p.add_argument("--dask-block", type=int, default=None, help="block Y and X for the Dask runs [512; quick 128]")
    p.add_argument("--dask-features", type=int, nargs="+", default=None, help="U-Net widths for the Dask runs [16 32 64 128 256; quick 4 8 16 32 64]")
    p.add_argument("--dask-workers", type=int, default=2, help="workers of the parallel run (1 thread each), against 1 worker")
    p.add_argument("--no-baseline", action="store_true", help="skip the in-process single-thread reference of the Dask runs")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    defaults = dict(scale_shape=[2, 128, 128] if q else [32, 1024, 1024], big_shape=[8, 256, 256] if q else [2048, 1024, 1024],
                    block=128 if q else 1024, chunk=64 if q else 512, dask_shape=[8, 256, 256] if q else [64, 512, 512],
                    dask_block=128 if q else 512, dask_features=[4, 8, 16, 32, 64] if q else [16, 32, 64, 128, 256])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.keep and args.work_dir is None:
        p.error("--keep needs --work-dir")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return 0

    import torch
    import zarr

    header = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), cpu=cpu_model(), cores=os.cpu_count(),
        python=platform.python_version(), torch=torch.__version__, zarr=zarr.__version__,
        command="python " + " ".join([sys.argv[0]] + (sys.argv[1:] if argv is None else list(argv))),
    )
    try:
        import distributed

        header["distributed"] = distributed.__version__
    except ImportError:
        header["distributed"] = None
    print(f"# {header['date']}  {header['cpu']}, {header['cores']} cores; python {header['python']}, torch {header['torch']}, "
          f"zarr {header['zarr']}, distributed {header['distributed']}", flush=True)
    print(f"# {header['command']}", flush=True)

    tmp = None
    if args.work_dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_streaming_")
        work = Path(tmp)
    else:
        work = args.work_dir
        work.mkdir(parents=True, exist_ok=True)
    chunks = (1, args.chunk, args.chunk)
    plans = []  # (measurement, label, shape, features, block, write, threads, scheduler, workers)
    if "scaling" in args.only:
        z, y, x = args.scale_shape
        for label, shape in (("scale 1x", (z, y, x)), (f"scale {args.scale_factor}x", (z * args.scale_factor, y, x))):
            plans.append(("scaling", label, shape, args.features, args.block, args.scale_write, args.threads, None, 1))
    if "big" in args.only:
        plans.append(("big", "big", tuple(args.big_shape), args.features, args.block, args.big_write, args.threads, None, 1))
    if "dask" in args.only:
        shape = tuple(args.dask_shape)
        if not args.no_baseline:
            plans.append(("dask", "in-process 1 thread", shape, args.dask_features, args.dask_block, ["probabilities", "mask"], 1, None, 1))
        plans.append(("dask", "dask 1 worker", shape, args.dask_features, args.dask_block, ["probabilities", "mask"], 1, "local", 1))
        plans.append(("dask", f"dask {args.dask_workers} workers", shape, args.dask_features, args.dask_block,
                      ["probabilities", "mask"], 1, "local", args.dask_workers))

    results = []
    try:
        for step, (measurement, label, shape, features, block, write, threads, scheduler, workers) in enumerate(plans):
            name = "x".join(map(str, shape))
            source = work / f"input_{name}_c{args.chunk}.zarr"
            seconds, reused = make_volume(source, tuple(shape), tuple(min(c, s) for c, s in zip(chunks, shape)))
            gb = math.prod(shape) / 1e9
            print(f"# input {name} uint8 ({gb:.3f} GB): {'reused' if reused else f'created in {seconds:.1f} s'}", flush=True)
            output = work / f"output_{label.replace(' ', '_')}_{name}.zarr"
            spec = dict(measurement=measurement, label=label, shape=list(shape), features=list(features), block=[1, block, block],
                        write=list(write), threads=threads, scheduler=scheduler, workers=workers,
                        source=str(source), output=str(output))
            r = run_measured(spec)
            if r is None:
                continue
            results.append(r)
            d = describe(r)
            extra = (f", cluster start {r['start_seconds']:.1f} s + close {r['close_seconds']:.1f} s, worker peak "
                     + "/".join(f"{m:.0f}" for m in r["worker_peak_mb"]) + " MiB, worker torch threads "
                     + "/".join(map(str, r["worker_task_torch_threads"]))) if "start_seconds" in r else ""
            print(f"  {label:22s} {r['seconds']:8.1f} s (stats {r['stats_seconds']:.1f} s)  {d['mpix_s']:7.3f} MPix/s  "
                  f"{r['blocks_done']}/{r['blocks']} blocks  peak RSS {r['peak_rss_mb']:6.0f} MiB (before {fmt(r['rss_before_mb'], '.0f')})"
                  f"  others busy {fmt(r['others_busy'], '.0%')}{extra}", flush=True)
            if not args.keep and measurement != "dask":
                shutil.rmtree(output, ignore_errors=True)
                if all(tuple(later[2]) != tuple(shape) for later in plans[step + 1 :]):
                    shutil.rmtree(source, ignore_errors=True)
        dask_outputs = [Path(r["spec"]["output"]) for r in results if r["spec"]["measurement"] == "dask"]
        diffs = compare_outputs(dask_outputs, ("probabilities", "mask")) if len(dask_outputs) > 1 else {}
    finally:
        if not args.keep:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                for path in work.glob("*.zarr"):
                    if path.name.startswith(("input_", "output_")):
                        shutil.rmtree(path, ignore_errors=True)

    print()
    print(render_table(results))
    print()
    if diffs:
        print(f"Dask outputs against {dask_outputs[0].name}: " + ", ".join(f"{k} max |diff| {v:.2g}" for k, v in diffs.items()))
    for line in render_targets(results):
        print(line)
    if args.quick:
        print("(--quick: tiny sizes; the targets are only meaningful for a full run)")
    if args.json:
        args.json.write_text(json.dumps(dict(header=header, results=results, dask_output_diffs=diffs), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
