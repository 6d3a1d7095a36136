"""The prediction engine: a source, the tile engine, a sink -- the one path of every prediction.

::

    source (reading, axes, normalisation, NaN rule)      pipeline.engine.sources
      -> blocks, each read with its halo, mirrored         pipeline.engine.blocks  (one block when it fits)
      -> tiles through the network                         pipeline.tiling.run_tiles (autocast, channels-last)
      -> sink (encoding, threshold, classes, instances,   pipeline.engine.sinks (tensor, files at the end)
               exports, overlay, output checks)            pipeline.engine.store (resumable zarr, Dask)

:func:`predict` runs it; :class:`TileSettings` carries the tile, block, precision, TTA and AdaBN settings.
Adapters: :class:`pipeline.inferers.OverlapTileInferer` (MONAI's inferer contract on tensors),
:func:`predict_files` (the inference bundle, in memory or streaming), :func:`pipeline.streaming.predict_zarr`.
"""

from pipeline.engine.blocks import BlockLayout, block_layout, run_block
from pipeline.engine.run import predict
from pipeline.engine.files import OutputSettings, ReadSettings, predict_files, split_options
from pipeline.engine.settings import TileSettings
from pipeline.engine.sinks import FilesSink, TensorSink, file_targets
from pipeline.engine.sources import ImageSource, TensorSource
from pipeline.engine.store import MARKERS, ZarrSink

__all__ = [
    "MARKERS", "BlockLayout", "FilesSink", "ImageSource", "OutputSettings", "ReadSettings", "TensorSink", "TensorSource",
    "TileSettings", "ZarrSink", "block_layout", "file_targets", "predict", "predict_files", "run_block", "split_options",
]
