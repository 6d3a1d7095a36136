"""Blocks on a Dask cluster: every worker predicts blocks with its own copy of the network and writes them
into the sink itself (a block is a whole chunk, so no two writers share one).

The network, settings, source handle and sink are scattered once to every worker; each worker copies the
network to its device once (a per-process cache keyed by a fingerprint of the weights) and runs
``torch.set_num_threads(threads_per_worker)``. A worker holds one block per thread and one copy of the
network (and, for an in-memory source only, a copy of that array).
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Any

from torch import nn

from pipeline.engine.blocks import BlockLayout, run_block
from pipeline.engine.settings import TileSettings
from pipeline.engine.store import fingerprint

logger = logging.getLogger(__name__)

_CACHE: dict[Any, nn.Module] = {}  # per worker process: network copies by (fingerprint, device)
_CACHE_LOCK = threading.Lock()


def connect(scheduler: Any, n_workers: int = 2, threads_per_worker: int = 1, timeout: float = 5.0) -> tuple[Any, list]:
    """``(client, things to close)`` for ``scheduler``: ``"local"`` starts a ``LocalCluster`` of ``n_workers``
    processes of ``threads_per_worker`` threads (forked from a forkserver that imported torch and this module
    once, unless dask is configured for another start method); an address or a ``distributed.Client`` uses an
    existing cluster.

    Raises:
        ValueError: a ``scheduler`` of another kind.
        ConnectionError: an address that cannot be reached within ``timeout`` seconds.
    """
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


def setup_worker(threads: int) -> int:
    """Run once on every Dask worker: ``torch.set_num_threads(threads)``, and glibc's malloc back to its
    default thresholds. Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand memory back
    to the OS), which also freezes the mmap threshold at 128 KiB: every tile's activations were then
    mapped and unmapped afresh, and a worker spent 1.8x the time of the same blocks in process, most
    of it in page faults (``docs/benchmarks.md``). Without glibc (macOS, musl) only the threads are set."""
    import torch

    torch.set_num_threads(threads)
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: glibc's dynamic ceiling (64-bit)
        libc.mallopt(-1, 64 * 2**20)  # M_TRIM_THRESHOLD: twice that, as glibc's dynamic rule
    except (OSError, AttributeError):
        pass
    return threads


def _worker_block(network: nn.Module, token: str, source: Any, settings: TileSettings, layout: BlockLayout, sink: Any,
                  index: tuple[int, ...]) -> tuple[int, ...]:
    """Dask task: predict one block with this worker's cached copy of the network, write it into the sink."""
    key = (token, str(settings.device or "cpu"))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = copy.deepcopy(network).to(settings.device or "cpu").eval()
    logits, nodata = run_block(_CACHE[key], source, settings, layout, index, sink.out_device)
    sink.write(layout.box(index), logits, nodata)
    return index


def run_on_cluster(client: Any, network: nn.Module, source: Any, settings: TileSettings, layout: BlockLayout, sink: Any,
                   pending: list[tuple[int, ...]]) -> None:
    """Predict the ``pending`` blocks on ``client``'s workers; a block's error is raised here."""
    if not pending:
        return
    from distributed import as_completed

    threads = max(client.nthreads().values(), default=1)
    client.run(setup_worker, threads)
    shared = [client.scatter(obj, broadcast=True, hash=False) for obj in (copy.deepcopy(network).cpu(), source, settings, layout, sink)]
    token = fingerprint(network)
    futures = [client.submit(_worker_block, shared[0], token, *shared[1:], index, pure=False) for index in pending]
    done = as_completed(futures)
    if settings.progress:
        from tqdm import tqdm

        done = tqdm(done, total=len(futures), desc="blocks", unit="block")
    for future in done:
        future.result()  # re-raises a block's error here
