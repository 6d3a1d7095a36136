"""Block-wise (streaming) and Dask-distributed overlap-tile prediction of large volumes.

:func:`predict_zarr` predicts a 2D image, a ``(Z, Y, X)`` stack or a 3D volume read lazily
(zarr array or group, TIFF through ``tifffile``'s zarr store, or an in-memory array) and
writes the foreground probability (float32) and/or mask (uint8 0/255) block by block into
a zarr group.

Exactness. Block starts along the network axes are multiples of the axis's ``geometry.steps()`` (the
pooling grid). A block is read with a halo of the axis's margin (plus the tile round-up),
mirrored about the *volume* border where it leaves the volume, with the index map of
:func:`pipeline.tiling.mirror_pad`, and its tiles start at the block start. Every output
pixel thus sees the input window and pooling phase it has in
:class:`~pipeline.inferers.OverlapTileInferer` over the whole volume: results agree to float
rounding. (A ``"same"`` network needs an explicit ``tile_size`` dividing the block size.)

Normalisation (``normalize=True``) is :class:`pipeline.transforms.NormalizeSectionsd`'s: zero
mean, unit std per channel and 2D section (z index; the whole image in 2D). A first lazy
pass reads the source in bands and merges per-section mean and variance in float64 (Chan
et al.'s pairwise update); blocks are normalised in float32 with them. The statistics are
kept in the output's attributes, so a resumed run skips that pass.

Resume. The group holds one array per result plus ``blocks_done`` (uint8, one chunk per
block). A block's marker is written after its data (zarr's local store writes each chunk
atomically), so a restarted run recomputes only unmarked blocks and ends identical to an
uninterrupted one. The output is created complete (arrays, settings, statistics) in a
temporary folder and renamed into place; one whose arrays or settings differ is refused
unless ``overwrite=True``. Two runs must not write to one output at once.

Memory. Peak memory follows the block and tile sizes, not the volume: the statistics pass
holds a band of ``STATS_BAND`` pixels (float64, twice with temporaries); a block holds its
input with halo (float32, ``prod(block + 2 * margin)`` per channel), its logits
(``out_channels`` x block, float32) and the activations of one batch of tiles (bounded by
``memory_budget_mb`` as in ``OverlapTileInferer``); markers take a byte per block. A Dask
worker holds one block per thread and one copy of the network (and, for an in-memory
source only, a copy of that array).

Distributed. ``scheduler="local"`` starts a ``LocalCluster`` (``n_workers`` processes of
``threads_per_worker`` threads, forked from a forkserver that imported torch and this module
once, unless dask is configured for another start method); an address or a
``distributed.Client`` uses an existing cluster. Network, plan and source handle are scattered once to every worker; each worker
copies the network to its device once (per-process cache keyed by a fingerprint of the
weights), sets ``torch.set_num_threads(threads_per_worker)`` and writes its blocks into the
zarr output itself: a block is a whole chunk, so no two writers share a chunk.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile
import torch
import zarr
from torch import nn

from pipeline.io.outputs import check_outputs
from pipeline.instances import label_zarr, parse_rules, rule_settings
from pipeline.io import stem
from pipeline.io.axes import OME_TIFF_UNITS
from pipeline.io.lazy import LazySource
from pipeline.tiling import check_tile_settings, make_plan, mirror_index, run_tiles, unwrap
from pipeline.transforms import OUTPUTS, check_output_settings, encode_prediction, foreground_probability

logger = logging.getLogger(__name__)

MARKERS = "blocks_done"
STATS_BAND = 2**22  # pixels read at once by the statistics pass
_CACHE: dict[Any, nn.Module] = {}  # per worker process: network copies by (fingerprint, device)
_CACHE_LOCK = threading.Lock()


# ---------------------------------------------------------------- sources
def section_stats(source: LazySource, fill_nan: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per channel and section mean and std (population), float64 arrays ``(C, sections)``; with
    ``fill_nan``, of the finite pixels only (no-data left out, as ``NormalizeSectionsd(fill_nan=True)``)."""
    three = len(source.spatial) == 3
    z_size, y_size, x_size = source.spatial if three else (1, *source.spatial)
    plane = y_size * x_size
    zs = max(1, min(z_size, STATS_BAND // max(plane, 1)))
    rows = y_size if plane <= STATS_BAND else max(1, STATS_BAND // x_size)
    c = source.channels
    count, mean, m2 = (np.zeros((c, z_size)) for _ in range(3))
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite pixels are reported below
        for z0, y0 in itertools.product(range(0, z_size, zs), range(0, y_size, rows)):
            index = ((slice(z0, z0 + zs),) if three else ()) + (slice(y0, y0 + rows), slice(None))
            piece = source.read(index).astype(np.float64)
            piece = piece.reshape(c, piece.shape[1] if three else 1, -1)
            z = slice(z0, z0 + piece.shape[1])
            finite = np.isfinite(piece) if fill_nan else np.ones(piece.shape, bool)
            n = finite.sum(-1)
            pm = np.where(finite, piece, 0).sum(-1) / np.maximum(n, 1)
            pm2 = np.where(finite, (piece - pm[..., None]) ** 2, 0).sum(-1)
            total, delta = count[:, z] + n, pm - mean[:, z]
            share = np.divide(n, total, out=np.zeros_like(delta), where=total > 0)
            m2[:, z] += pm2 + delta**2 * count[:, z] * share
            mean[:, z] += delta * share
            count[:, z] = total
        if fill_nan:  # a section of no-data only: mean 0, std 1 (it is all filled)
            mean, m2, count = np.where(count > 0, mean, 0.0), np.where(count > 0, m2, 0.0), np.where(count > 0, count, 1)
        std = np.sqrt(m2 / count)
    bad = np.argwhere(~np.isfinite(mean) | ~np.isfinite(std))
    if len(bad):
        raise ValueError(
            f"{source.path or 'the source'} has non-finite pixels (NaN or Inf) in (channel, section) {bad[:5].tolist()}; "
            "pass fill_nan=True (--fill_nan true) to predict them as no-data, or replace them (e.g. with 0) and save it again"
        )
    return mean, std


# ---------------------------------------------------------------- one block
@dataclass
class _Plan:
    """Everything a block needs besides the network and the source (scattered once)."""

    output: str
    shape: tuple[int, ...]  # spatial shape of the volume
    block: tuple[int, ...]
    stack_axes: int  # leading spatial axes the network does not see (a 2D network on a stack)
    tile_size: Any
    batch_size: int
    padding_mode: str
    context: int | None
    memory_budget_mb: float
    write: tuple[str, ...]
    threshold: float
    mean: np.ndarray | None  # (C, sections) or None: no normalisation
    std: np.ndarray | None
    device: str | None
    amp: bool
    amp_dtype: torch.dtype
    fill_nan: bool


def _mirror(start: int, stop: int, n: int, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Source indices of positions ``start..stop-1`` on an axis of length ``n`` (as ``mirror_pad``), and for
    ``"constant"`` which are inside (the rest become zeros)."""
    index = mirror_index(n, -start, stop - n, mode).numpy()
    return index, (np.arange(start, stop) >= 0) & (np.arange(start, stop) < n) if mode == "constant" else None


def _predict_block(network: nn.Module, source: LazySource, plan: _Plan, index: tuple[int, ...]) -> None:
    """Predict block ``index`` with the tile engine (:mod:`pipeline.tiling`), write its results, then its marker."""
    k = plan.stack_axes
    lo = [i * b for i, b in zip(index, plan.block)]
    hi = [min(s + b, n) for s, b, n in zip(lo, plan.block, plan.shape)]
    tiles = make_plan(network, [h - s for s, h in zip(lo[k:], hi[k:])], plan.tile_size, plan.batch_size, plan.memory_budget_mb, plan.context)
    # the block's input: its tiles' extent plus the margin, mirrored about the *volume* border
    maps = [(np.arange(lo[a], hi[a]), None) for a in range(k)]
    maps += [_mirror(s - m, s + e + m, n, plan.padding_mode) for s, e, n, m in zip(lo[k:], tiles.extent, plan.shape[k:], tiles.margin)]
    box = [slice(int(i.min()), int(i.max()) + 1) for i, _ in maps]
    raw = source.read(box)
    x = raw[np.ix_(np.arange(raw.shape[0]), *[i - b.start for (i, _), b in zip(maps, box)])].astype(np.float32)
    if plan.mean is not None:
        sec = maps[0][0] if len(plan.shape) == 3 else np.zeros(1, dtype=int)
        view = (..., None, None) if len(plan.shape) == 3 else (..., None)  # (C, Z', 1, 1) or (C, 1, 1)
        mean, std = plan.mean[:, sec].astype(np.float32), plan.std[:, sec].astype(np.float32)
        x = (x - mean[view]) / np.where(std > 0, std, np.float32(1))[view]
    for axis, (_, inside) in enumerate(maps, start=1):
        if inside is not None and not inside.all():  # constant padding: zeros after normalisation
            x = x * inside.reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    nodata = None
    if not np.isfinite(x).all():
        if not plan.fill_nan:
            raise ValueError(f"block {index} (pixels {lo}..{hi}) has non-finite values (NaN or Inf); replace them first")
        nodata = ~np.isfinite(x).all(0)
        x = np.where(np.isfinite(x), x, np.float32(0))
        nodata = nodata[tuple(slice(None) for _ in range(k)) + tuple(slice(m, m + n) for n, m in zip(tiles.size, tiles.margin))]
    images = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, 1, 0) if k else x[None]))
    logits = run_tiles(images, network, tiles, out_device="cpu", amp=plan.amp, amp_dtype=plan.amp_dtype)
    prob = foreground_probability(logits, dim=1)
    group = zarr.open_group(plan.output, mode="r+")
    region = tuple(slice(s, h) for s, h in zip(lo, hi))
    for name, values in encode_prediction(prob if k else prob[0], plan.threshold, plan.write, nodata).items():
        group[name][region] = values
    group[MARKERS][tuple(index)] = 1  # after the data: a marked block is complete
    logger.debug("block %s (pixels %s..%s) written", index, lo, hi)


def _worker_block(network: nn.Module, token: str, source: LazySource, plan: _Plan, index: tuple[int, ...]) -> tuple[int, ...]:
    """Dask task: predict one block with this worker's cached copy of the network."""
    key = (token, plan.device or "cpu")
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = copy.deepcopy(network).to(plan.device or "cpu").eval()
    _predict_block(_CACHE[key], source, plan, index)
    return index


def _setup_worker(threads: int) -> int:
    """Run once on every Dask worker: ``torch.set_num_threads(threads)``, and glibc's malloc back to its
    default thresholds. Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand memory back
    to the OS), which also freezes the mmap threshold at 128 KiB: every tile's activations were then
    mapped and unmapped afresh, and a worker spent 1.8x the time of the same blocks in process, most
    of it in page faults (``docs/benchmarks.md``). Without glibc (macOS, musl) only the threads are set."""
    torch.set_num_threads(threads)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: glibc's dynamic ceiling (64-bit)
        libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD: twice that, as glibc's dynamic rule
    except (OSError, AttributeError):
        pass
    return threads


# ---------------------------------------------------------------- output store
def fingerprint(network: nn.Module) -> str:
    """SHA-1 of the network's class, geometry and weights (names, dtypes, shapes, values)."""
    net = unwrap(network)
    digest = hashlib.sha1(f"{type(net).__qualname__}{net.geometry}".encode())
    for name, tensor in net.state_dict().items():
        if not isinstance(tensor, torch.Tensor):  # _extra_state: the architecture, already in the geometry
            digest.update(f"{name}{tensor}".encode())
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}{t.dtype}{tuple(tensor.shape)}".encode() + t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _open_output(path: Path, arrays: dict, settings: dict, overwrite: bool, stats: Any, spacing: Sequence[float] | None = None) -> tuple[Any, bool]:
    """Return ``(group, resumed)``; ``stats()`` is called only when the output is created, whose arrays get the
    source's ``spacing`` as their ``resolution`` attribute (read back by :func:`pipeline.io.read_image`)."""
    if path.exists() and not overwrite:
        try:
            group = zarr.open_group(str(path), mode="r+")
        except Exception as err:
            raise ValueError(f"output {path} exists and is not a zarr group ({err}); pass overwrite=True to replace it") from err
        for name, (shape, chunks, dtype, _) in arrays.items():
            if name not in group:
                raise ValueError(f"output {path} exists without a {name!r} array; pass overwrite=True to replace it")
            have = group[name]
            if tuple(have.shape) != shape or np.dtype(have.dtype) != np.dtype(dtype) or tuple(have.chunks) != chunks:
                raise ValueError(
                    f"output {path}/{name} exists with shape {tuple(have.shape)}, dtype {have.dtype}, chunks "
                    f"{tuple(have.chunks)}, but this prediction needs shape {shape}, dtype {np.dtype(dtype)}, chunks "
                    f"{chunks}; pass overwrite=True to replace it or choose another output"
                )
        old = group.attrs.asdict().get("streaming", {}).get("settings")
        if old != settings:
            diff = sorted(k for k in settings if (old or {}).get(k) != settings[k])
            if "source" in diff and settings["source"] is not None:
                was = ((old or {}).get("source") or {}).get("path", "an unrecorded input")
                raise ValueError(
                    f"output {path} holds the prediction of another input ({was}), or of this input "
                    f"({settings['source']['path']}) before it changed; resuming would mix them. Pass overwrite=True "
                    "(--overwrite true) to replace it, or choose another output"
                )
            raise ValueError(f"output {path} was written with other settings ({', '.join(diff)} differ); pass overwrite=True to replace it")
        return group, True
    mean, std = stats()  # first: a source it refuses (non-finite pixels) leaves no output folder behind
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        group = zarr.open_group(str(tmp), mode="w")
        for name, (shape, chunks, dtype, fill) in arrays.items():
            array = group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
            if spacing is not None and name != MARKERS:  # as the containers' convention: pipeline.io.containers
                array.attrs["resolution"] = [float(v) for v in spacing]
        record = {"settings": settings, "mean": None if mean is None else mean.tolist(), "std": None if std is None else std.tolist()}
        group.attrs.update({"streaming": record})
        if path.exists():  # overwrite=True
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return zarr.open_group(str(path), mode="r+"), False


def _client(scheduler: Any, n_workers: int, threads_per_worker: int, timeout: float) -> tuple[Any, list]:
    """Return ``(client, things to close)``; an unreachable address raises ``ConnectionError``."""
    from distributed import Client, LocalCluster

    if isinstance(scheduler, Client):
        return scheduler, []
    if scheduler == "local":
        import multiprocessing

        import dask
        from distributed.utils import get_mp_context

        method = dask.config.get("distributed.worker.multiprocessing-method")
        if method == "spawn" and "forkserver" in multiprocessing.get_all_start_methods():
            method = "forkserver"  # workers fork from one process that imported torch and this module once
        quiet = {  # sampling threads that took CPU from the other worker on a small machine (docs/benchmarks.md)
            "distributed.worker.profile.enabled": False,
            "distributed.admin.system-monitor.gil.enabled": False,
        }
        with dask.config.set({"distributed.worker.multiprocessing-method": method, **quiet}):
            if method == "forkserver":
                get_mp_context().set_forkserver_preload(["distributed", "numpy", "torch", "zarr", __name__])
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True, dashboard_address=None)
        client = Client(cluster)
        return client, [client, cluster]
    if not isinstance(scheduler, str):
        raise ValueError(f"scheduler must be None, 'local', an address like 'tcp://host:8786' or a distributed.Client, got {scheduler!r}")
    try:
        client = Client(scheduler, timeout=timeout)
        return client, [client]
    except (OSError, TimeoutError) as err:
        raise ConnectionError(f"could not connect to the Dask scheduler at {scheduler} within {timeout:g} s: {err}") from err


# ---------------------------------------------------------------- entry point
def predict_zarr(
    network: nn.Module,
    source: Any,
    output: str | os.PathLike,
    *,
    block_size: int | Sequence[int] | None = None,
    tile_size: int | Sequence[int] | str = "auto",
    batch_size: int = 4,
    write: Sequence[str] = OUTPUTS,
    threshold: float = 0.5,
    normalize: bool = True,
    padding_mode: str = "reflect",
    context: int | None = None,
    memory_budget_mb: float = 1024.0,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = False,
    scheduler: Any = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    connect_timeout: float = 5.0,
    tiff_series: int | None = None,
    allow_missing_chunks: bool = False,
    key: str | None = None,
    fill_nan: bool = False,
    amp: bool | None = None,
    amp_dtype: torch.dtype = torch.bfloat16,
    rgb_to_grey: bool = False,
    skip_background: bool = False,
    export: str | None = None,
    overlay: bool = False,
    statistics: tuple[np.ndarray, np.ndarray] | None = None,
    instances: Any = None,
    instance_halo: int = 64,
) -> Path:
    """Predict ``source`` block by block into the zarr group ``output`` (resumable).

    Args:
        network: a :class:`pipeline.networks.UNet` (anything with ``geometry``, ``spatial_dims``,
            ``in_channels`` and ``features``), used in eval mode.
        source: a zarr array, group (OME-Zarr: full resolution; else its only array) or path to
            one; a TIFF path (read lazily through ``tifffile``'s zarr store); or an in-memory
            array. Shape ``(Y, X)`` or ``(Z, Y, X)`` for a 2D network, ``(Z, Y, X)`` for a 3D one,
            with a leading channel axis when ``in_channels > 1``; leading singleton axes are dropped.
        output: local path of the zarr group written: ``probabilities`` (float32, NaN until written),
            ``mask`` (uint8 0/255) and ``blocks_done`` (uint8 per block).
        block_size: output block (= chunk) per spatial axis, or one int for the network axes
            (a stack's section axis then gets 1). Network axes are rounded up to multiples of
            the axis's ``geometry.steps()``. Default 1024 (2D network) or (64, 512, 512) (3D: thin where an
            anisotropic network's z margin is small, wide in-plane where its margin is the paper's 92 px).
        tile_size, batch_size, padding_mode, context, memory_budget_mb: as in
            :class:`pipeline.inferers.OverlapTileInferer`, applied within each block.
        write: any of ``"probabilities"``, ``"mask"``.
        threshold: foreground where probability > ``threshold``.
        normalize: per-section zero mean / unit std (:class:`~pipeline.transforms.NormalizeSectionsd`).
        device: where blocks run (default: the network's device; ``"cpu"`` on Dask workers).
        overwrite: replace an existing output; otherwise a matching one is resumed.
        progress: tqdm bar over blocks.
        scheduler: None (this process), ``"local"`` (a new ``LocalCluster``), a scheduler
            address or a ``distributed.Client``.
        n_workers, threads_per_worker: the ``LocalCluster``; ``threads_per_worker`` also sets
            ``torch.set_num_threads`` on every worker.
        connect_timeout: seconds to reach a scheduler address.
        tiff_series: the series of a TIFF source of several (:func:`pipeline.io.choose_tiff_series`).
        key: the dataset of an HDF5 or zarr source (default: its only one; OME-Zarr: full resolution), or the
            pyramid level of a TIFF or OME-Zarr image (``"0"``: full resolution).
        rgb_to_grey: an RGB(A) source for a 1-channel network is read as its luminance
            (:func:`pipeline.io.readers.colour_to_grey`); without it, only a grey image saved as colour is read
            (as grey) and colour pixels are refused by the statistics pass, before the output exists.
        skip_background: predict only blocks that hold tissue by :func:`pipeline.io.pyramids.tissue_mask`'s
            rule (RGB sources) on a thumbnail of at most :data:`THUMBNAIL` pixels a side; skipped blocks are
            marked done and keep the fill values (probability NaN: not predicted; mask 0).
        export: after the last block, also write the results for viewers (:mod:`pipeline.io.pyramids`):
            ``"ome-zarr"`` (``<name>.ome.zarr`` next to ``output``: an NGFF image with a pyramid, the mask as
            its label image), ``"ome-tiff"`` (``<name>_probabilities.ome.tif`` / ``<name>_mask.ome.tif``: tiled
            pyramidal OME-TIFF), ``"auto"`` (the input's kind: OME-Zarr for OME-Zarr, OME-TIFF for a
            pyramidal or OME-TIFF, ``<name>.h5`` for HDF5, else nothing) or None. ``"hdf5"``: ``<name>.h5``
            with datasets ``probabilities`` / ``mask``.
        instances: ``{name: rule}`` (:func:`pipeline.instances.parse_rules`), made when ``write`` lists instances,
            after the last block, into ``instances/<name>`` (uint32) by :func:`pipeline.instances.label_zarr`: block by
            block, ids merged across block faces (the probabilities are stored for them). Rules read class 0 or 1.
        instance_halo: px around a block that its watershed sees (:func:`pipeline.instances.label_zarr`).
        statistics: ``section_stats(source, fill_nan)`` when already computed (:func:`predict_files`), so that
            the source is not read twice for them; used only when ``normalize``.
        overlay: after the last block, write ``<name>_overlay.png``: the input at most :data:`THUMBNAIL`
            pixels a side (a stack: its middle section) with the mask in red.
        fill_nan: NaN/Inf pixels are no-data: left out of the statistics, predicted as 0 (the mean), written
            as probability NaN and mask 0 (:class:`pipeline.transforms.NormalizeSectionsd`); else an error.
        allow_missing_chunks: predict chunks missing from a zarr source from zarr's fill value;
            by default they are an error (:meth:`LazySource.check_complete`).
        amp, amp_dtype: ``torch.autocast`` for the tiles, as in ``OverlapTileInferer`` (default: on
            CUDA only); recorded with the output's settings. Tiles take the network's memory format
            (channels-last after ``network.to(memory_format=torch.channels_last)``). TTA and AdaBN are
            in-memory only: they need the whole image (``OverlapTileInferer``).

    Returns:
        The output path.

    Raises:
        FileNotFoundError: the source path does not exist or holds no zarr array.
        ValueError: bad arguments or source; an output with other shapes, dtypes or settings.
        ConnectionError: the scheduler address cannot be reached within ``connect_timeout``.
    """
    net = unwrap(network)
    geometry = net.geometry
    write = check_output_settings(write, threshold, instances)
    rules = parse_rules(instances) if "instances" in write else {}
    for rule_name, rule in rules.items():
        if rule.channel not in (0, 1) or rule.background_channel is not None:
            raise ValueError(f"--instances {rule_name!r}: streaming stores the foreground probability (class 1 of two); a rule "
                             "reads channel 0 (its boundary) or 1, without background_channel")
    stored = stored_outputs(write)
    tile_size = check_tile_settings(network, tile_size, batch_size, memory_budget_mb, context, padding_mode)
    src = LazySource(source, net.spatial_dims, net.in_channels, tiff_series, key, rgb_to_grey)
    if not allow_missing_chunks:
        src.check_complete()
    export = resolve_export(export, src)
    if skip_background:
        _check_tissue_rule(src)
    shape, nd = src.spatial, net.spatial_dims
    k = len(shape) - nd
    if block_size is None:
        block_size = 1024 if nd == 2 else [64, 512, 512]
    block = [1] * k + [int(block_size)] * nd if isinstance(block_size, int) else [int(b) for b in block_size]
    if len(block) != len(shape) or min(block) < 1:
        raise ValueError(f"block_size needs {len(shape)} positive values for a volume of shape {shape}, got {block_size}")
    steps = geometry.steps(nd)
    rounded = block[:k] + [math.ceil(b / step) * step for b, step in zip(block[k:], steps)]
    if rounded != block:
        logger.warning("block size %s rounded up to %s (multiples of the pooling steps %s)", block, rounded, steps)
    block = tuple(rounded)
    grid = tuple(math.ceil(s / b) for s, b in zip(shape, block))
    chunks = tuple(min(b, s) for b, s in zip(block, shape))
    token = fingerprint(network)
    if amp is None:  # as run_tiles decides, for the device the blocks run on
        run_on = torch.device(device) if device is not None else (torch.device("cpu") if scheduler is not None else next(network.parameters()).device)
        amp = run_on.type == "cuda"
    amp = bool(amp)
    settings = {
        "shape": list(shape), "source_dtype": str(src.dtype), "block_size": list(block), "write": sorted(stored),
        "threshold": threshold, "normalize": normalize, "fill_nan": bool(fill_nan), "padding_mode": padding_mode, "context": context,
        "tile_size": tile_size if isinstance(tile_size, str) else list(tile_size), "network": token,
        "amp": str(amp_dtype).removeprefix("torch.") if amp else None,
        "source": src.identity(), "rgb_to_grey": bool(rgb_to_grey), "skip_background": bool(skip_background),
    }
    arrays = {"probabilities": (shape, chunks, "float32", float("nan")), "mask": (shape, chunks, "uint8", 0)}
    arrays = {name: spec for name, spec in arrays.items() if name in stored}
    arrays[MARKERS] = (grid, (1,) * len(grid), "uint8", 0)
    path = Path(output)
    client, owned = (None, []) if scheduler is None else _client(scheduler, n_workers, threads_per_worker, connect_timeout)
    try:  # the scheduler is reached before any work, so a bad address fails fast
        group, resumed = _open_output(path, arrays, settings, overwrite, lambda: statistics if normalize and statistics is not None else _statistics(src, normalize, fill_nan), src.spacing)
        record = group.attrs.asdict()["streaming"]
        mean, std = (None if record[key] is None else np.asarray(record[key], dtype=np.float64) for key in ("mean", "std"))
        done = np.asarray(group[MARKERS][...])
        pending = [i for i in itertools.product(*map(range, grid)) if not done[i]]
        if skip_background and pending:
            pending = _skip_background(src, group, block, pending)
        logger.info("%s: %d blocks of %s, %d to predict%s", path, done.size, block, len(pending), " (resumed)" if resumed else "")
        plan = _Plan(str(path), shape, block, k, tile_size, batch_size, padding_mode, context, memory_budget_mb,
                     stored, threshold, mean, std, device, amp, amp_dtype, bool(fill_nan))
        if client is None:
            was_training = network.training
            model = network.eval() if device is None else copy.deepcopy(network).to(device).eval()
            try:
                for index in _progress(pending, progress):
                    _predict_block(model, src, plan, index)
            finally:
                network.train(was_training)
        elif pending:
            from distributed import as_completed

            client.run(_setup_worker, threads_per_worker)
            net_f, src_f, plan_f = (client.scatter(obj, broadcast=True, hash=False) for obj in (copy.deepcopy(network).cpu(), src, plan))
            futures = [client.submit(_worker_block, net_f, token, src_f, plan_f, i, pure=False) for i in pending]
            for future in _progress(as_completed(futures), progress, len(futures)):
                future.result()  # re-raises a block's error here
        _instances(path, rules, block, instance_halo, client)
    finally:
        for thing in owned:
            thing.close()
    logger.info("%s: all %d blocks done", path, math.prod(grid))
    if export or overlay:
        _finish(src, zarr.open_group(str(path), mode="r"), path, export, overlay, [n for n in OUTPUTS if n in stored])
    src.close()
    return path


THUMBNAIL = 2048  # pixels a side of the overlay PNG and of the tissue rule's thumbnail


def stored_outputs(write: Sequence[str]) -> tuple[str, ...]:
    """The per-pixel arrays a streaming output holds (and exports): those ``write`` lists, and the
    probabilities whenever it lists instances (they are made from them)."""
    return tuple(n for n in OUTPUTS if n in write or (n == "probabilities" and "instances" in write))


def _instances(path: Path, rules: dict, block: Sequence[int], halo: int, client: Any) -> None:
    """Instances of a complete output by each rule (:func:`pipeline.instances.label_zarr`); a rule already made
    with the same settings (recorded in the group's attributes) is skipped, so a resumed run does not redo it."""
    if not rules:
        return
    group = zarr.open_group(str(path), mode="r+")
    if not np.asarray(group[MARKERS][...]).all():
        raise RuntimeError(f"{path}: blocks are missing; no instances made")
    done = dict(group.attrs.get("instances", {}))
    for name, rule in rules.items():
        settings = {**rule_settings(rule), "halo": int(halo)}
        if done.get(name) == settings and f"instances/{name}" in group:
            continue
        logger.info("%s: instances %r (%s)", path, name, rule.method)
        label_zarr(str(path), "probabilities", rule, name, block, halo, client)
        done[name] = settings
        group.attrs["instances"] = done


def _statistics(src: LazySource, normalize: bool, fill_nan: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The normalisation statistics; without normalisation, a colour check of every pixel when the
    source is RGB for a 1-channel network (so that colour is refused before the output exists)."""
    if normalize:
        return section_stats(src, fill_nan)
    if src.grey and not src.rgb_to_grey:
        section_stats(src, fill_nan=True)
    return None, None


def resolve_export(export: str | None, src: LazySource) -> str | None:
    """``export`` checked, with ``"auto"`` resolved by the source's kind (OME-Zarr -> ``"ome-zarr"``; an
    OME-TIFF or pyramidal TIFF -> ``"ome-tiff"``; HDF5 -> ``"hdf5"``; else None: the zarr store is the output).

    Raises:
        ValueError: an unknown value, naming the valid ones.
    """
    valid = (None, "none", "auto", "ome-zarr", "ome-tiff", "hdf5")
    if export not in valid:
        raise ValueError(f"--export must be one of auto, none, ome-zarr, ome-tiff, hdf5; got {export!r}")
    if export != "auto":
        return None if export == "none" else export
    if src.kind == "hdf5":
        return "hdf5"
    if src.kind == "zarr" and src.path and getattr(src.plan, "found", "?").strip("?"):  # named axes: OME-Zarr
        return "ome-zarr"
    if src.kind == "tiff":
        with tifffile.TiffFile(src.path) as tif:
            series = tif.series[src.tiff_series or 0]
            if tif.is_ome or len(series.levels) > 1:
                return "ome-tiff"
    return None


def export_paths(output: str | os.PathLike, export: str | None, overlay: bool, write: Sequence[str]) -> list[Path]:
    """The files :func:`predict_zarr` writes next to ``output`` for ``export`` and ``overlay``."""
    path = Path(output)
    name = stem(path)
    out = []
    if export == "ome-zarr":
        out.append(path.with_name(f"{name}.ome.zarr"))
    if export == "ome-tiff":
        out += [path.with_name(f"{name}_{n}.ome.tif") for n in OUTPUTS if n in write]
    if export == "hdf5":
        out.append(path.with_name(f"{name}.h5"))
    if overlay:
        out.append(path.with_name(f"{name}_overlay.png"))
    return out


def _check_tissue_rule(src: LazySource) -> None:
    """Refuse ``skip_background`` for a source that is not RGB(A) (before any output)."""
    if src.stored_channels not in (3, 4):
        raise ValueError(
            f"{src.path or 'the source'}: --skip_background applies to RGB whole-slide images (the tissue rule reads colour "
            f"saturation), but it has {src.stored_channels} channel(s); set --skip_background false"
        )


def _colour(src: LazySource) -> LazySource:
    """The source with its own colour channels (a colour file read as grey for a 1-channel network: as RGB)."""
    return src if not src.grey else LazySource(src.path, len(src.spatial), src.stored_channels, src.tiff_series, src.key)


def _skip_background(src: LazySource, group: Any, block: tuple[int, ...], pending: list) -> list:
    """Mark blocks without tissue (:func:`pipeline.io.pyramids.tissue_mask`) done; return the others."""
    from pipeline.io.pyramids import thumbnail, tissue_mask

    image, factor = thumbnail(_colour(src), max(1, math.ceil(max(src.spatial[-2:]) / THUMBNAIL)))
    tissue = tissue_mask(image)
    keep = []
    for index in pending:
        lo = [i * b for i, b in zip(index, block)][-2:]
        window = tuple(slice(s // factor, max(s // factor + 1, math.ceil((s + b) / factor))) for s, b in zip(lo, block[-2:]))
        if tissue[window].any():
            keep.append(index)
        else:
            group[MARKERS][tuple(index)] = 1  # background: nothing to write (probability NaN, mask 0)
    logger.info("skip_background: %d of %d blocks hold tissue", len(keep), len(pending))
    return keep


def _finish(src: LazySource, group: Any, path: Path, export: str | None, overlay: bool, names: list[str]) -> None:
    """The exports and the overlay of a complete output (:mod:`pipeline.io.pyramids`)."""
    from pipeline.io import pyramids

    if not np.asarray(group[MARKERS][...]).all():
        raise RuntimeError(f"{path}: blocks are missing; nothing exported")
    spacing = src.spacing or (1.0,) * len(src.spatial)
    targets = export_paths(path, export, overlay, names)
    unit = src.unit  # an NGFF unit name, or None (then none is written)
    if export == "ome-zarr":
        pyramids.write_ome_zarr(group, targets[0], spacing, names, unit)
    elif export == "hdf5":
        pyramids.write_hdf5(group, targets[0], spacing, names)
    elif export == "ome-tiff":
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.pyramid-", dir=path.parent))
        try:
            for name, target in zip(names, targets):
                pyramid = pyramids.write_ome_zarr(group, tmp / f"{name}.ome.zarr", spacing, [name], unit)
                pyramids.write_ome_tiff(pyramids.levels(pyramid), target, spacing, OME_TIFF_UNITS.get(unit or ""))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if overlay:
        image, factor = pyramids.thumbnail(_colour(src), max(1, math.ceil(max(src.spatial[-2:]) / THUMBNAIL)))
        mask = group["mask"] if "mask" in group else None
        if mask is None:
            prob = group["probabilities"]
            fg = np.asarray(prob[_middle(prob.shape, factor)]) > 0.5
        else:
            fg = np.asarray(mask[_middle(mask.shape, factor)]) > 0
        pyramids.write_overlay(image, fg, targets[-1])
    logger.info("%s: exported %s", path, ", ".join(str(t) for t in targets))


def _middle(shape: Sequence[int], factor: int) -> tuple:
    """The strided index of a thumbnail: the middle section of a stack, every ``factor``-th pixel."""
    return ((shape[0] // 2,) if len(shape) == 3 else ()) + (slice(0, shape[-2], factor), slice(0, shape[-1], factor))


def output_path(output_dir: str | os.PathLike, source: str | os.PathLike) -> Path:
    """The zarr output of one input: ``output_dir/<input name without its suffix>.zarr``
    (:func:`pipeline.io.stem`: ``vol.1.tif`` -> ``vol.1.zarr``)."""
    return Path(output_dir) / f"{stem(source)}.zarr"


def _source_and_key(source: Any) -> tuple[Any, str | None]:
    """A datalist item ``{"image": path, "image_dataset": key}`` or a bare source."""
    return (source["image"], source.get("image_dataset")) if isinstance(source, dict) else (source, None)


def check_sources(
    network: nn.Module, sources: Sequence[Any], tiff_series: int | None = None, allow_missing_chunks: bool = False, rgb_to_grey: bool = False
) -> list[LazySource]:
    """Open every source as :func:`predict_zarr` would, before any work: shape and channels for the
    network, the TIFF series and level, the container dataset, and (unless ``allow_missing_chunks``) no zarr chunk missing.

    Args:
        sources: paths, arrays, or datalist items ``{"image": path, "image_dataset": key}``.

    Returns:
        The opened sources, in order.

    Raises:
        FileNotFoundError, ValueError: as :func:`predict_zarr`, naming the source.
    """
    net = unwrap(network)
    opened = []
    for source in sources:
        path, key = _source_and_key(source)
        src = LazySource(path, net.spatial_dims, net.in_channels, tiff_series, key, rgb_to_grey)
        if not allow_missing_chunks:
            src.check_complete()
        src.close()
        opened.append(src)
    return opened


def predict_files(network: nn.Module, sources: Sequence[Any], output_dir: str | os.PathLike, **kwargs: Any) -> list[Path]:
    """:func:`predict_zarr` for each input into its :func:`output_path`, after checking that no
    output (the zarr store, its exports and overlay) replaces an input or another input's output
    (:func:`pipeline.io.outputs.check_outputs`) and that every source opens (series, levels, datasets, missing
    chunks) and, when normalising without ``fill_nan`` or reading colour as grey, holds no NaN/Inf or colour
    pixels (a statistics pass per source, ~2% of the prediction's time) before the first block is predicted.

    Args:
        sources: paths, or datalist items ``{"image": path, "image_dataset": key}`` (:func:`pipeline.data.datalist_from_path`).
        kwargs: :func:`predict_zarr`'s options (``export`` defaults to ``"auto"`` here).

    Returns:
        The output paths, in input order.
    """
    kwargs.setdefault("export", "auto")
    pairs = [_source_and_key(s) for s in sources]
    opened = check_sources(network, sources, kwargs.get("tiff_series"), kwargs.get("allow_missing_chunks", False), kwargs.get("rgb_to_grey", False))
    outputs = {}
    for (path, _), src in zip(pairs, opened):
        if kwargs.get("skip_background"):
            _check_tissue_rule(src)
        target = output_path(output_dir, path)
        extra = export_paths(target, resolve_export(kwargs["export"], src), kwargs.get("overlay", False), stored_outputs(kwargs.get("write", OUTPUTS)))
        outputs[str(path)] = [target, *extra]
    check_outputs(outputs)
    fill_nan, normalize = kwargs.get("fill_nan", False), kwargs.get("normalize", True)
    statistics: list = [None] * len(opened)
    for i, src in enumerate(opened):  # NaN/Inf (or colour pixels read as grey) in any input: before the first output
        if (normalize and not fill_nan) or (src.grey and not src.rgb_to_grey):
            stats = section_stats(src, fill_nan)
            statistics[i] = stats if normalize else None  # reused: the source is read once for them
            src.close()
    kwargs["allow_missing_chunks"] = True  # checked just now, for every source: not listed again per source
    return [predict_zarr(network, p, output_path(output_dir, p), key=key, statistics=stats, **kwargs)
            for (p, key), stats in zip(pairs, statistics)]


def _progress(items: Any, progress: bool, total: int | None = None) -> Any:
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc="blocks", unit="block")
