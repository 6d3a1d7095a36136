"""Block-by-block (streaming) prediction of images and volumes larger than memory into a resumable zarr store,
in process or on a Dask cluster: adapters over the prediction engine (:mod:`pipeline.engine`).

:func:`predict_zarr` predicts one source (a zarr array or group, a TIFF read through ``tifffile``'s zarr store,
HDF5, N5, or an in-memory array) into one store; :func:`predict_files` predicts inputs into
``output_dir/<name>.zarr`` after checking all of them. The store, its resume rule, exports and overlay are
:class:`pipeline.engine.store.ZarrSink`'s; exactness (any block layout equals one pass over the whole image) is
:mod:`pipeline.engine.blocks`'.

Memory. Peak memory follows the block and tile sizes, not the volume: the statistics pass holds a band of
:data:`~pipeline.transforms.intensity.STATS_BAND` pixels (float64, twice with temporaries); a block holds its
input with halo (float32, ``prod(block + 2 * margin)`` per channel), its logits (``out_channels`` x block,
float32) and the activations of one batch of tiles (bounded by ``memory_budget_mb``); markers take a byte per
block. A Dask worker holds one block per thread and one copy of the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from pipeline.engine.files import default_block_size, open_lazy, output_path, predict_files as _predict_files, run_all, split_options, zarr_sink
from pipeline.engine.sources import ImageSource
from pipeline.engine.store import MARKERS

__all__ = ["MARKERS", "output_path", "predict_files", "predict_zarr"]


def predict_zarr(
    network: nn.Module, source: Any, output: str | os.PathLike, *, key: str | None = None,
    statistics: tuple[np.ndarray, np.ndarray] | None = None, **options: Any,
) -> Path:
    """Predict ``source`` block by block into the zarr group ``output`` (resumable).

    Args:
        network: a :class:`pipeline.networks.UNet`, used in eval mode.
        source: a zarr array, group (OME-Zarr: full resolution; else its only array) or path to one; a TIFF,
            HDF5 or N5 path; or an in-memory array. Shape ``(Y, X)`` or ``(Z, Y, X)`` for a 2D network,
            ``(Z, Y, X)`` for a 3D one, with a leading channel axis when ``in_channels > 1``.
        output: the zarr group (:class:`pipeline.engine.store.ZarrSink`).
        key: the dataset of an HDF5 or zarr source, or the pyramid level of a TIFF or OME-Zarr image.
        statistics: the source's normalisation statistics when already computed.
        options: of :class:`pipeline.engine.TileSettings` (``block_size`` default
            :func:`~pipeline.engine.files.default_block_size`), :class:`~pipeline.engine.ReadSettings`,
            :class:`~pipeline.engine.OutputSettings` (``export`` default None here) and the cluster
            (``scheduler``, ``n_workers``, ``threads_per_worker``, ``connect_timeout``).

    Returns:
        The output path.

    Raises:
        TypeError: an unknown option. FileNotFoundError: the source path does not exist.
        ValueError: bad options or source; an output with other shapes, dtypes or settings.
        ConnectionError: the scheduler cannot be reached within ``connect_timeout``.
    """
    options.setdefault("export", None)
    settings, reading, outputs, cluster = split_options(options)
    if settings.block_size is None:
        settings = settings.replace(block_size=default_block_size(network))
    src = ImageSource(open_lazy(network, source, reading, key), reading.normalize, reading.fill_nan, statistics)
    return run_all(network, [(lambda: src, zarr_sink(output, outputs))], settings, cluster)[0]


def predict_files(network: nn.Module, sources: Sequence[Any], output_dir: str | os.PathLike, **options: Any) -> list[Path]:
    """:func:`pipeline.engine.predict_files` with ``streaming=True`` and flat options (as :func:`predict_zarr`;
    ``export`` defaults to ``"auto"``): each input into ``output_dir/<name>.zarr`` (:func:`output_path`)."""
    settings, reading, outputs, cluster = split_options(options)
    return _predict_files(network, sources, output_dir, streaming=True, settings=settings, reading=reading, outputs=outputs, **cluster)
