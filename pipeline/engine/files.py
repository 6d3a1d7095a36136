"""Files in, files out: :func:`predict_files`, the one prediction component of the inference bundle.

Each input becomes an :class:`~pipeline.engine.sources.ImageSource` (read whole in memory, or lazily block by
block with ``streaming``) and goes through :func:`pipeline.engine.predict` into a sink: files written at the
end (:class:`~pipeline.engine.sinks.FilesSink`) or a resumable zarr store
(:class:`~pipeline.engine.store.ZarrSink`). Both encode by one rule, so the same options give the same results.

Everything that can be refused is refused before the first output is written: every output against every
input and each other (:func:`pipeline.io.outputs.check_outputs`), existing outputs without ``overwrite``
(in memory; a streaming store is resumed), every input's header, channels and chunks, and NaN/Inf or
colour pixels (streaming: the statistics pass, whose result is reused; in memory: a scan of floating-point
files).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from pipeline import io
from pipeline.engine.run import check_adapt_norm, predict
from pipeline.engine.settings import TileSettings
from pipeline.engine.sinks import FilesSink, file_targets
from pipeline.engine.sources import ImageSource
from pipeline.engine.store import ZarrSink, check_export
from pipeline.instances import parse_rules
from pipeline.io.containers import is_container
from pipeline.io.lazy import LazySource
from pipeline.io.outputs import check_outputs
from pipeline.tiling import unwrap
from pipeline.transforms.intensity import check_finite
from pipeline.transforms.post import OUTPUTS, check_output_settings


@dataclass(frozen=True)
class ReadSettings:
    """How inputs are read.

    Attributes:
        tiff_series: the series of a TIFF of several (:func:`pipeline.io.choose_tiff_series`).
        rgb_to_grey: RGB(A) inputs become grey by luminance for a 1-channel network.
        normalize: zero mean, unit std per channel and section (:func:`pipeline.transforms.intensity.section_stats`).
        fill_nan: NaN/Inf pixels are no-data (left out of the statistics, predicted as 0, written as
            probability NaN and mask 0); else they are refused.
        allow_missing_chunks: read the chunks a zarr / N5 / HDF5 input does not store as its fill value and predict
            them (in memory and streaming); else such an input is refused before any output, naming the chunks
            (:func:`pipeline.io.containers.check_chunks`).
    """

    tiff_series: int | None = None
    rgb_to_grey: bool = False
    normalize: bool = True
    fill_nan: bool = False
    allow_missing_chunks: bool = False


@dataclass(frozen=True)
class OutputSettings:
    """What is written (:class:`~pipeline.engine.sinks.FilesSink`, :class:`~pipeline.engine.store.ZarrSink`).

    Attributes:
        write: any of ``"probabilities"``, ``"mask"``, ``"instances"``.
        threshold: foreground where its probability > ``threshold`` (two classes).
        instances: ``{name: rule}`` (:func:`pipeline.instances.parse_rules`), when ``write`` lists instances.
        instance_halo: px around a block that its watershed sees (streaming).
        overwrite: replace existing outputs (in memory: else refused; streaming: else resumed).
        output_ext: one format for all outputs (in memory), e.g. ``".nii.gz"``; default the input's.
        export, overlay, skip_background: block-by-block prediction only (:class:`~pipeline.engine.store.ZarrSink`).

    Raises:
        ValueError: bad ``write``, ``threshold``, ``instances`` or ``export``.
    """

    write: Sequence[str] = OUTPUTS
    threshold: float = 0.5
    instances: Any = None
    instance_halo: int = 64
    overwrite: bool = False
    output_ext: str | None = None
    export: str | None = "auto"
    overlay: bool = False
    skip_background: bool = False

    def __post_init__(self) -> None:
        check_output_settings(self.write, self.threshold, self.instances)
        check_export(self.export)

    def streaming_only(self) -> list[str]:
        """The block-by-block options set here (refused in memory)."""
        on = [f"{k}=True" for k in ("overlay", "skip_background") if getattr(self, k)]
        return on + ([f"export={self.export!r}"] if self.export not in (None, "auto", "none") else [])


#: options of a Dask cluster (:func:`pipeline.engine.distributed.connect`)
CLUSTER = {"scheduler": None, "n_workers": 2, "threads_per_worker": 1, "connect_timeout": 5.0}


def split_options(options: dict[str, Any]) -> tuple[TileSettings, ReadSettings, OutputSettings, dict[str, Any]]:
    """Flat keyword options sorted into the settings they belong to (and the cluster's).

    Raises:
        TypeError: an option none of them has, naming the closest ones.
    """
    kinds = (TileSettings, ReadSettings, OutputSettings)
    fields = {f.name: kind for kind in kinds for f in dataclasses.fields(kind)}
    found: dict[Any, dict] = {kind: {} for kind in kinds}
    cluster = dict(CLUSTER)
    for name, value in options.items():
        if name in cluster:
            cluster[name] = value
        elif name in fields:
            found[fields[name]][name] = value
        else:
            close = difflib.get_close_matches(name, [*fields, *cluster], n=3)
            raise TypeError(f"unexpected option {name!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return (*(kind(**found[kind]) for kind in kinds), cluster)


def output_path(output_dir: str | os.PathLike, source: str | os.PathLike) -> Path:
    """The zarr store of one input: ``output_dir/<input name without its suffix>.zarr`` (``vol.1.tif`` -> ``vol.1.zarr``)."""
    return Path(output_dir) / f"{io.stem(source)}.zarr"


def _item(source: Any) -> tuple[Any, str | None]:
    """A datalist item ``{"image": path, "image_dataset": key}`` or a bare source."""
    return (source["image"], source.get("image_dataset")) if isinstance(source, dict) else (source, None)


def open_lazy(network: nn.Module, source: Any, reading: ReadSettings, key: str | None = None) -> LazySource:
    """``source`` opened block by block for ``network`` (its dimensions and channels), with no chunk of a zarr / N5 /
    HDF5 dataset missing unless ``reading.allow_missing_chunks`` (the rule of :func:`check_file` too).

    Raises:
        FileNotFoundError, ValueError: naming the source (:class:`pipeline.io.lazy.LazySource`).
    """
    net = unwrap(network)
    lazy = LazySource(source, net.spatial_dims, net.in_channels, reading.tiff_series, key, reading.rgb_to_grey)
    if not reading.allow_missing_chunks:
        lazy.check_complete()
    lazy.close()
    return lazy


def check_file(network: nn.Module, path: str, reading: ReadSettings, key: str | None = None) -> None:
    """An input to be read whole: its header (:func:`pipeline.io.probe_image`; the dataset of a container), the
    TIFF series, a container's chunks (none missing unless ``allow_missing_chunks``: the streaming rule,
    :func:`pipeline.io.containers.check_chunks`) and the channels ``network`` takes; a floating-point file is read
    once and refused if it holds NaN or Inf (:func:`pipeline.transforms.intensity.check_finite`; with ``fill_nan`` a
    warning).

    Raises:
        ValueError: naming the file, what is wrong and what to do.
    """
    info = io.probe_image(path, reading.tiff_series, key)
    io.containers.check_stored(path, key, reading.allow_missing_chunks)
    loaded: list = []  # the file read at most once, for the colour test and the NaN scan

    def read() -> tuple:
        loaded[:] = loaded or [io.read_image(path, reading.tiff_series, key, reading.allow_missing_chunks)]
        return loaded[0]

    io.check_channels(path, info, unwrap(network).in_channels, pixels=lambda: read()[0], rgb_to_grey=reading.rgb_to_grey)
    if info.dtype.kind == "f":
        array, meta = read()
        check_finite(np.isfinite(io.channel_first(array, meta, path)[0]).all(0), path, reading.fill_nan)


def load_image(network: nn.Module, path: str, reading: ReadSettings, key: str | None = None) -> tuple[LazySource, dict]:
    """An input read whole by the read path of training (:class:`pipeline.transforms.LoadSectiond`): the array as
    a :class:`~pipeline.io.lazy.LazySource` and the file's meta (for writing the results back)."""
    from pipeline.transforms.io import LoadSectiond

    load = LoadSectiond(keys="image", tiff_series=reading.tiff_series, rgb_to_grey=reading.rgb_to_grey,
                        allow_missing_chunks=reading.allow_missing_chunks)
    image = load({"image": path, "image_dataset": key})["image"]
    net = unwrap(network)
    return LazySource(image.numpy(), net.spatial_dims, net.in_channels), dict(image.meta)


def predict_files(
    network: nn.Module,
    sources: Sequence[Any],
    output_dir: str | os.PathLike,
    *,
    streaming: bool = False,
    settings: TileSettings | None = None,
    reading: ReadSettings | None = None,
    outputs: OutputSettings | None = None,
    scheduler: Any = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    connect_timeout: float = 5.0,
) -> list[Any]:
    """Predict every input into ``output_dir``, in memory or block by block, after checking all of them.

    Args:
        network: a :class:`pipeline.networks.UNet`, predicted in eval mode (its mode is restored after).
        sources: paths, arrays (streaming), or datalist items ``{"image": path, "image_dataset": key}``
            (:func:`pipeline.data.datalist_from_path`).
        streaming: block by block into ``output_dir/<name>.zarr`` (:func:`output_path`), resumable, with bounded
            memory; else each input is read whole and its files written at the end (:func:`~pipeline.engine.sinks.file_targets`).
        settings, reading, outputs: :class:`TileSettings`, :class:`ReadSettings`, :class:`OutputSettings`.
        scheduler, n_workers, threads_per_worker, connect_timeout: a Dask cluster for the blocks (streaming;
            :func:`pipeline.engine.distributed.connect`); None: this process.

    Returns:
        Per input, the zarr store's path (streaming) or ``{what: file}`` (in memory).

    Raises:
        ValueError, FileExistsError, FileNotFoundError: naming the file and the option to change, before any
            output is written. ConnectionError: an unreachable scheduler.
    """
    settings, reading, outputs = settings or TileSettings(), reading or ReadSettings(), outputs or OutputSettings()
    items = [_item(s) for s in sources]
    if not streaming and (outputs.streaming_only() or scheduler is not None):
        on = outputs.streaming_only() + ([f"scheduler={scheduler!r}"] if scheduler is not None else [])
        raise ValueError(f"{', '.join(on)} applies to block-by-block prediction only; pass streaming=True, or leave "
                         f"{'it' if len(on) == 1 else 'them'} out to predict in memory")
    check_adapt_norm(settings, not streaming)
    if streaming:
        pairs = _streaming_sinks(network, items, output_dir, reading, outputs)
        settings = settings if settings.block_size is not None else settings.replace(block_size=default_block_size(network))
    else:
        pairs = _file_sinks(network, items, output_dir, reading, outputs)

    def source_of(index: int) -> Any:  # in memory: each input read at its turn
        if pairs[index][0] is not None:
            return pairs[index][0]
        (path, key), sink = items[index], pairs[index][1]
        lazy, sink.meta = load_image(network, path, reading, key)
        return ImageSource(lazy, reading.normalize, reading.fill_nan, name=str(path))

    cluster = {"scheduler": scheduler, "n_workers": n_workers, "threads_per_worker": threads_per_worker, "connect_timeout": connect_timeout}
    return run_all(network, [(lambda i=i: source_of(i), sink) for i, (_, sink) in enumerate(pairs)], settings, cluster)


def default_block_size(network: nn.Module) -> int | list[int]:
    """Blocks of 1024 px for a 2D network, ``[64, 512, 512]`` for a 3D one (thin where an anisotropic network's
    z margin is small, wide in-plane where its margin is the paper's 92 px)."""
    return 1024 if unwrap(network).spatial_dims == 2 else [64, 512, 512]


def run_all(network: nn.Module, jobs: Sequence[tuple[Any, Any]], settings: TileSettings, cluster: dict[str, Any]) -> list[Any]:
    """:func:`pipeline.engine.predict` for each ``(source factory, sink)``, with ``network`` in eval mode (restored
    after; copied to ``settings.device`` when given) and, when ``cluster["scheduler"]`` is set, on a Dask cluster."""
    model = network if settings.device is None else copy.deepcopy(network).to(settings.device)
    was_training = network.training
    client, owned = (None, []) if cluster.get("scheduler") is None else _connect(**cluster)
    try:
        model.eval()
        results = []
        for make_source, sink in jobs:
            results.append(predict(make_source(), model, settings, sink, client=client))
        return results
    finally:
        network.train(was_training)
        for thing in owned:
            thing.close()


def _connect(scheduler: Any, n_workers: int, threads_per_worker: int, connect_timeout: float) -> tuple[Any, list]:
    from pipeline.engine.distributed import connect

    return connect(scheduler, n_workers, threads_per_worker, connect_timeout)


def _file_sinks(network: nn.Module, items: list, output_dir: Any, reading: ReadSettings, outputs: OutputSettings) -> list:
    """In memory: a :class:`FilesSink` per input, checked (outputs free unless ``overwrite``; headers, channels, NaN)."""
    rules = list(parse_rules(outputs.instances)) if "instances" in outputs.write else []
    targets = {str(p): list(file_targets(p, output_dir, outputs.write, rules, outputs.output_ext).values()) for p, _ in items}
    ours = {*OUTPUTS, *rules}  # a container output holds one dataset, named after what it holds
    containers = {t: ours for ts in targets.values() for t in ts if is_container(t)}
    check_outputs(targets, overwrite=outputs.overwrite, datasets=containers)
    for path, key in items:
        check_file(network, str(path), reading, key)
    return [(None, FilesSink(output_dir, path, None, outputs.write, outputs.threshold, outputs.instances, outputs.output_ext,
                             outputs.overwrite)) for path, _ in items]


def zarr_sink(path: str | os.PathLike, outputs: OutputSettings) -> ZarrSink:
    return ZarrSink(path, outputs.write, outputs.threshold, outputs.instances, outputs.instance_halo, outputs.overwrite,
                    outputs.export, outputs.overlay, outputs.skip_background)


def _streaming_sinks(network: nn.Module, items: list, output_dir: Any, reading: ReadSettings, outputs: OutputSettings) -> list:
    """Streaming: every input opened and a :class:`ZarrSink` for it, outputs checked, then each input's tissue rule
    (``skip_background``) and statistics pass (NaN/Inf, colour read as grey) before the first store exists; both
    are reused."""
    lazies = [open_lazy(network, path, reading, key) for path, key in items]
    targets: dict[str, list] = {}
    datasets: dict[Path, Any] = {}
    own: list[Path] = []
    sinks = []
    for (path, _), lazy in zip(items, lazies):
        sinks.append(zarr_sink(output_path(output_dir, path if lazy.path else "array"), outputs))
        found = sinks[-1].outputs(lazy)
        targets[str(path) if lazy.path else f"array {len(targets)}"] = found["targets"]
        own += found["own"]
        datasets.update(found["datasets"])
    check_outputs(targets, overwrite=outputs.overwrite, own=own, datasets=datasets)
    pairs = []
    for lazy, sink in zip(lazies, sinks):
        if outputs.skip_background:
            sink.tissue(lazy)  # not RGB, grey, or no tissue anywhere: refused before the first output
        source = ImageSource(lazy, reading.normalize, reading.fill_nan)
        if (reading.normalize and not reading.fill_nan) or (lazy.grey and not lazy.rgb_to_grey):
            source.statistics()  # NaN/Inf (or colour read as grey) in any input: before the first output
            lazy.close()
        pairs.append((source, sink))
    return pairs
