"""The one prediction loop: :func:`predict` runs a source through the tile engine, block by block, into a sink
(:mod:`pipeline.engine`'s picture), in this process or on a Dask cluster."""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.engine.blocks import BlockLayout, block_layout, run_block
from pipeline.engine.settings import TileSettings
from pipeline.engine.tta import FlipAverage, adapted_batchnorm


class Sink(Protocol):
    """Where predicted blocks go (:mod:`pipeline.engine.sinks`, :mod:`pipeline.engine.store`)."""

    out_device: Any

    def open(self, source: Any, network: nn.Module, settings: TileSettings, layout: BlockLayout) -> list[tuple[int, ...]]:
        """Check and prepare the outputs (before any is written); return the blocks still to predict."""

    def write(self, box: tuple[list[int], list[int]], logits: torch.Tensor, nodata: np.ndarray | None) -> None:
        """Take one block's logits ``(out_channels, *block)``."""

    def close(self, client: Any = None) -> Any:
        """Finish the outputs (work that reads them may run on ``client``, a Dask cluster); return the result."""


def check_adapt_norm(settings: TileSettings, whole: bool) -> None:
    """AdaBN estimates BatchNorm statistics over the tiles of one pass in this process: it needs the image as one
    block (``whole``); block by block, or on a Dask cluster, the statistics would depend on the blocks.

    Raises:
        ValueError: ``settings.adapt_norm`` and not ``whole``.
    """
    if settings.adapt_norm and not whole:
        raise ValueError("adapt_norm=True estimates BatchNorm statistics over the tiles of the whole image in this process: "
                         "it needs the image as one block (block_size=None, streaming=False), not blocks or a Dask cluster")


def predict(
    source: Any, network: nn.Module, settings: TileSettings, sink: Sink, *, client: Any = None,
    network_args: Sequence[Any] = (), network_kwargs: dict | None = None,
) -> Any:
    """Predict ``source`` with ``network`` into ``sink``, block by block: the one prediction path.

    Args:
        source: a :class:`~pipeline.engine.sources.TensorSource` or :class:`~pipeline.engine.sources.ImageSource`.
        network: a :class:`pipeline.networks.UNet` (anything :func:`pipeline.tiling.unwrap` accepts), in the
            mode the caller chose (eval for prediction).
        settings: tiles, blocks, precision, TTA and AdaBN (:class:`TileSettings`).
        sink: where the logits of each block go (:mod:`pipeline.engine.sinks`, :class:`pipeline.engine.store.ZarrSink`).
        client: a ``distributed.Client``: blocks run on its workers (:mod:`pipeline.engine.distributed`).
        network_args, network_kwargs: passed to every ``network(tiles, *args, **kwargs)`` call (in process).

    Returns:
        What ``sink.close()`` returns.

    Raises:
        ValueError: tile or block settings that do not fit the network; AdaBN on more than one block
            (:func:`check_adapt_norm`); what the source and sink refuse.
    """
    settings = settings.checked(network)
    layout = block_layout(network, source.spatial, settings.block_size)
    check_adapt_norm(settings, client is None and len(layout.indices()) == 1)
    pending = sink.open(source, network, settings, layout)
    model = FlipAverage(network) if settings.tta else network
    if client is not None:
        from pipeline.engine.distributed import run_on_cluster

        run_on_cluster(client, model, source, settings, layout, sink, pending)
        return sink.close(client)
    many = len(layout.indices()) > 1

    def run(index: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray | None]:
        return run_block(model, source, settings, layout, index, sink.out_device, settings.progress and not many,
                         network_args, network_kwargs)

    estimate = (lambda: [run(i) for i in layout.indices()]) if settings.adapt_norm else None
    with adapted_batchnorm(network, estimate) if estimate else contextlib.nullcontext():
        for index in _progress(pending, settings.progress and many):
            logits, nodata = run(index)
            sink.write(layout.box(index), logits, nodata)
    return sink.close()


def _progress(items: Any, progress: bool, total: int | None = None) -> Any:
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc="blocks", unit="block")
