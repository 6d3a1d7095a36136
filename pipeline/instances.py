"""Instances from a prediction: connected components of a foreground (objects: mitochondria, nuclei) and a
seeded watershed of a boundary map (cells and neurons that touch), in 2D per section or in 3D.

The rules, as :class:`InstanceRule` holds them:

- ``components``: the connected components (face connectivity: 4 in 2D, 6 in 3D) of ``p > threshold``,
  ``p`` the probability of ``channel``; components smaller than ``min_size`` pixels are dropped.
- ``watershed``: ``b`` the probability of the boundary class ``channel``. The *interior* is ``b < threshold``;
  the *seeds* are the connected components of the interior pixels farther than ``seed_distance`` (px, or
  physical units with a ``spacing``; Euclidean) from any non-interior pixel (background pixels, below, are not
  interior), which cuts the thin necks where two cells' interiors meet through a gap in the boundary; seeds smaller
  than ``min_size`` are dropped. Every pixel is then flooded from the seeds over the relief ``b``
  (``skimage.segmentation.watershed``, face connectivity), except pixels whose ``background_channel``
  probability is > 0.5 (they stay 0); with ``fill: false`` the boundary pixels (``b >= threshold``) are set
  back to 0 afterwards. torch-em's and elf's boundary watersheds use seeds from distance
  maps in the same way (Beier et al. 2017; Wolny et al. 2020, PlantSeg).

Ids are uint32, 0 = no object, unique over the whole image or stack (``mode: 2d`` labels each section
on its own, with ids that continue from section to section). :mod:`pipeline.streaming` labels blocks of
volumes larger than memory by the same rules and merges ids across block faces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

METHODS = ("watershed", "components")
MODES = ("2d", "3d")


@dataclass(frozen=True)
class InstanceRule:
    """How one kind of instance is made from the class probabilities (see the module docstring).

    Args:
        method: ``watershed`` (cells, from a boundary class) or ``components`` (objects, from a foreground class).
        channel: the class used: the boundary class for ``watershed`` (default 0: the membrane of a
            two-class network), the object class for ``components`` (default 1: the foreground).
        threshold: ``components``: object where ``p > threshold``; ``watershed``: interior where ``b < threshold``.
        seed_distance: ``watershed``: seeds lie farther than this from the boundary (px, or the units of
            ``spacing``).
        min_size: objects (``components``) or seeds (``watershed``) of fewer pixels are dropped.
        background_channel: ``watershed``: pixels of this class (probability > 0.5) stay 0 (the background
            class of a three-class instance target); None floods every pixel (cells fill the image).
        mode: ``2d`` (each section of a stack on its own) or ``3d``.
        fill: ``watershed``: True floods the boundary pixels too (cells fill the image, as CREMI's neuron labels);
            False leaves the pixels with ``b >= threshold`` 0 afterwards (cells are their interiors, split where the
            flooding meets, as ISBI 2012's labels with their membranes).
    """

    method: str = "watershed"
    channel: int | None = None
    threshold: float = 0.5
    seed_distance: float = 2.0
    min_size: int = 0
    background_channel: int | None = None
    mode: str = "2d"
    fill: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"instance method {self.method!r} is unknown; valid: {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise ValueError(f"instance mode {self.mode!r} is unknown; valid: {', '.join(MODES)}")
        if not 0 <= float(self.threshold) <= 1:
            raise ValueError(f"instance threshold must be in [0, 1], got {self.threshold}")
        if float(self.seed_distance) < 0 or int(self.min_size) < 0:
            raise ValueError(f"seed_distance and min_size must be >= 0, got {self.seed_distance}, {self.min_size}")
        if self.channel is None:
            object.__setattr__(self, "channel", 0 if self.method == "watershed" else 1)

    @property
    def channels(self) -> list[int]:
        """The classes this rule reads."""
        return [self.channel] + ([] if self.background_channel is None else [self.background_channel])


def parse_rules(rules: Mapping[str, Any] | None) -> dict[str, InstanceRule]:
    """``{name: InstanceRule}`` from the bundle key ``instances`` (``{name: {method: ..., ...}}``; None or ``{}``: none).

    Raises:
        ValueError: not a mapping of names to settings, an unknown setting (naming the valid ones) or value.
    """
    if rules is None or (isinstance(rules, Mapping) and not rules):
        return {}
    if not isinstance(rules, Mapping):
        raise ValueError(f"instances must map names to rules, e.g. {{'cells': {{'method': 'watershed'}}}}, got {rules!r}")
    known = [f.name for f in fields(InstanceRule)]
    out = {}
    for name, spec in rules.items():
        spec = {"method": spec} if isinstance(spec, str) else dict(spec or {})
        unknown = sorted(set(spec) - set(known))
        if unknown or not str(name).isidentifier():
            raise ValueError(f"instances[{name!r}]: {'unknown settings ' + str(unknown) if unknown else 'a name of letters, digits and _'}; "
                             f"valid settings: {', '.join(known)}")
        try:
            out[str(name)] = InstanceRule(**spec)
        except (TypeError, ValueError) as err:
            raise ValueError(f"instances[{name!r}]: {err}") from None
    return out


def default_rules(label_mode: str = "binary", num_classes: int = 2) -> dict[str, dict]:
    """The instances a target implies: cells by a watershed of the boundary class (binary and instance targets:
    class 0 of two, or class 1 of three with class 0 as background); none for classes (name them)."""
    if label_mode == "classes":
        return {}
    if num_classes == 3:
        return {"cells": {"method": "watershed", "channel": 1, "background_channel": 0}}
    return {"cells": {"method": "watershed", "channel": 0}}


def rule_settings(rule: InstanceRule) -> dict:
    """The rule as plain values (recorded with streaming outputs)."""
    return asdict(rule)


# ---------------------------------------------------------------- the rules on arrays in memory
def _sizes_at_least(labels: np.ndarray, min_size: int) -> np.ndarray:
    if min_size <= 1 or labels.max(initial=0) == 0:
        return labels
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def _consecutive(labels: np.ndarray) -> np.ndarray:
    """Ids 1..n in order of first appearance in raster order (0 kept), uint32."""
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids != 0
    order = np.argsort(first[keep], kind="stable")
    lut = np.zeros(int(ids.max(initial=0)) + 1, np.uint32) if ids.size else np.zeros(1, np.uint32)
    lut[ids[keep][order]] = np.arange(1, keep.sum() + 1, dtype=np.uint32)
    return lut[labels]


def components(foreground: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Connected components (face connectivity) of a boolean array, 2D or 3D, components of fewer than
    ``min_size`` pixels dropped; int64 ids (not yet consecutive)."""
    labels, _ = ndi.label(np.asarray(foreground, bool), structure=ndi.generate_binary_structure(np.ndim(foreground), 1))
    return _sizes_at_least(labels.astype(np.int64), int(min_size))


def seeds(boundary: np.ndarray, threshold: float = 0.5, seed_distance: float = 2.0, min_size: int = 0,
          spacing: Sequence[float] | None = None, background: np.ndarray | None = None) -> np.ndarray:
    """The watershed's seeds (see the module docstring): components of the interior (``boundary < threshold``,
    not ``background``) farther than ``seed_distance`` from its outside; int64 ids."""
    interior = np.asarray(boundary) < threshold
    if background is not None:
        interior &= ~np.asarray(background, bool)
    return components(_far_inside(interior, seed_distance, spacing), min_size)


def _ball(radius: float, nd: int, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Boolean footprint of the offsets within Euclidean ``radius`` (in the units of ``spacing``)."""
    sp = np.ones(nd) if spacing is None else np.asarray(spacing, float)
    grids = np.meshgrid(*[np.arange(-int(radius / s), int(radius / s) + 1) * s for s in sp], indexing="ij")
    return sum(g**2 for g in grids) <= radius**2 + 1e-9


def _far_inside(interior: np.ndarray, distance: float, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Interior pixels farther than ``distance`` from every non-interior pixel of the array: the interior
    minus the dilation of its outside by a ball of that radius (what ``distance_transform_edt(interior) >
    distance`` means, without its artefact when an array holds no outside pixel at all). Local: a window
    grown by ``ceil(distance)`` gives its core exactly."""
    if distance <= 0:
        return interior
    near = ndi.binary_dilation(~interior, structure=_ball(distance, interior.ndim, spacing))
    return interior & ~near


def watershed(boundary: np.ndarray, markers: np.ndarray, background: np.ndarray | None = None,
              origin: Sequence[int] | None = None, full_shape: Sequence[int] | None = None) -> np.ndarray:
    """Flood ``boundary`` from ``markers`` (face connectivity, ``skimage.segmentation.watershed``); ``background``
    pixels stay 0. Equal values are flooded in the order of their index in the whole volume (``full_shape``,
    the array sitting at ``origin`` in it; default: the array itself), so that a block's window floods its
    plateaus as the whole volume does (skimage alone breaks ties by queue order, which depends on the window)."""
    from skimage.segmentation import watershed as flood

    relief = np.asarray(boundary, np.float32)
    origin = [0] * relief.ndim if origin is None else list(origin)
    full_shape = relief.shape if full_shape is None else tuple(full_shape)
    strides = np.cumprod((1,) + tuple(full_shape[:0:-1]))[::-1]
    index = sum((np.arange(n) + o).reshape([-1 if a == k else 1 for a in range(relief.ndim)]) * int(st)
                for k, (n, o, st) in enumerate(zip(relief.shape, origin, strides)))
    order = np.lexsort((np.broadcast_to(index, relief.shape).ravel(), relief.ravel()))
    rank = np.empty(relief.size, np.int64)
    rank[order] = np.arange(relief.size)
    mask = None if background is None else ~np.asarray(background, bool)
    return flood(rank.reshape(relief.shape), markers=markers, mask=mask, connectivity=1).astype(np.int64)


def _without_data(p: np.ndarray, rule: InstanceRule) -> np.ndarray:
    """The rule's class probability with no-data pixels (NaN: the input had none there) made to hold no object: a
    boundary (1) for the watershed, background (0) for components; in memory and block by block alike."""
    return np.where(np.isnan(p), np.float32(1.0 if rule.method == "watershed" else 0.0), p)


def _apply(rule: InstanceRule, probs: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
    """One rule on ``probs (C, *spatial)`` of one section or volume (int64 ids; 0 where the probabilities are NaN)."""
    nodata = np.isnan(probs[rule.channel])
    p = _without_data(probs[rule.channel], rule)
    if rule.method == "components":
        return components(p > rule.threshold, rule.min_size)
    background = None if rule.background_channel is None else probs[rule.background_channel] > 0.5
    ids = watershed(p, seeds(p, rule.threshold, rule.seed_distance, rule.min_size, spacing, background), background)
    return np.where(nodata, 0, ids) if rule.fill else np.where(p < rule.threshold, ids, 0)


def make_instances(probabilities: np.ndarray, rule: InstanceRule, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Instance ids of one image or stack by ``rule``.

    Args:
        probabilities: class probabilities ``(C, Y, X)`` or ``(C, Z, Y, X)``
            (:func:`pipeline.transforms.class_probabilities`); NaN where the input had no data (id 0 there).
        rule: the :class:`InstanceRule`.
        spacing: pixel spacing per spatial axis (``seed_distance`` is in its units); None: 1.

    Returns:
        uint32 ids ``(*spatial)``, 0 = none, consecutive in raster order, unique over the stack.

    Raises:
        ValueError: a channel the probabilities do not have.
    """
    probs = np.asarray(probabilities, dtype=np.float32)
    if max(rule.channels) >= probs.shape[0]:
        raise ValueError(f"the instance rule reads class {max(rule.channels)}, but the network predicts {probs.shape[0]} "
                         "classes (set the rule's channel)")
    spatial = probs.shape[1:]
    if rule.mode == "3d" or len(spatial) == 2:
        return _consecutive(_apply(rule, probs, spacing))
    out, offset = np.zeros(spatial, np.int64), 0
    for z in range(spatial[0]):  # 2d: each section, ids continued
        section = _apply(rule, probs[:, z], None if spacing is None else spacing[1:])
        out[z] = np.where(section > 0, section + offset, 0)
        offset = max(offset, int(out[z].max(initial=0)))
    return _consecutive(out)


# ---------------------------------------------------------------- block by block: volumes larger than memory
def _grid(shape: Sequence[int], block: Sequence[int]) -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.product(*(range(-(-s // b)) for s, b in zip(shape, block))))


def _box(index: Sequence[int], block: Sequence[int], shape: Sequence[int], halo: Sequence[int] = ()) -> tuple[list[int], list[int], list[int], list[int]]:
    """The block's ``lo, hi`` and its window ``wlo, whi`` grown by ``halo`` per axis (clipped to the volume)."""
    halo = list(halo) or [0] * len(shape)
    lo = [i * b for i, b in zip(index, block)]
    hi = [min(s + b, n) for s, b, n in zip(lo, block, shape)]
    return lo, hi, [max(s - h, 0) for s, h in zip(lo, halo)], [min(e + h, n) for e, h, n in zip(hi, halo, shape)]


def _relief(source, window: tuple[slice, ...], rule: InstanceRule) -> np.ndarray:
    """The probability of the rule's class in ``window``: read from stored class probabilities ``(C, *spatial)``,
    or from a stored foreground probability ``(*spatial)`` (class 1 of two; class 0 is its complement)."""
    if source.ndim > len(window):
        return _without_data(np.asarray(source[(rule.channel, *window)], np.float32), rule)
    values = np.asarray(source[window], np.float32)
    return _without_data(values if rule.channel == 1 else 1.0 - values, rule)


def _by_section(fn, arr: np.ndarray, sections: bool) -> np.ndarray:
    return np.stack([fn(a) for a in arr]) if sections else fn(arr)


def _block_mask(source, rule: InstanceRule, index, block, shape, sections: bool) -> np.ndarray:
    """The pixels to label in a block's core: objects (``components``) or seeds (``watershed``), the seeds'
    distance test read with a halo of ``ceil(seed_distance)`` so that the core is exact."""
    nd = len(shape)
    reach = int(np.ceil(rule.seed_distance)) if rule.method == "watershed" and rule.seed_distance > 0 else 0
    halo = [0 if (sections and a == 0) else reach for a in range(nd)]
    lo, hi, wlo, whi = _box(index, block, shape, halo)
    p = _relief(source, tuple(slice(a, b) for a, b in zip(wlo, whi)), rule)
    if rule.method == "components":
        mask = p > rule.threshold
    else:
        mask = _by_section(lambda a: _far_inside(a, rule.seed_distance), p < rule.threshold, sections)
    return mask[tuple(slice(a - w, b - w) for a, b, w in zip(lo, hi, wlo))]


def _structure(nd: int, sections: bool) -> np.ndarray:
    s = ndi.generate_binary_structure(nd, 1)
    if sections:  # 2d mode on a stack: no links between sections
        s[0], s[2] = False, False
    return s


def _label_block(source, rule: InstanceRule, index, block, shape, sections: bool, local) -> tuple[int, np.ndarray]:
    """Pass 1: label a block's core on its own; write the local ids; return their number and sizes."""
    mask = _block_mask(source, rule, index, block, shape, sections)
    labels, n = ndi.label(mask, structure=_structure(len(shape), sections))
    lo, hi, _, _ = _box(index, block, shape)
    local[tuple(slice(a, b) for a, b in zip(lo, hi))] = labels.astype(np.uint32)
    return n, np.bincount(labels.ravel(), minlength=n + 1)


def _face_pairs(local, index, block, shape, offsets: dict, sections: bool) -> np.ndarray:
    """Pairs of global ids that touch across the faces between block ``index`` and its next neighbours."""
    lo, hi, _, _ = _box(index, block, shape)
    out = []
    for axis in range(len(shape)):
        if (sections and axis == 0) or hi[axis] >= shape[axis]:
            continue
        nxt = tuple(i + (a == axis) for a, i in enumerate(index))
        here = tuple(slice(hi[axis] - 1, hi[axis]) if a == axis else slice(s, e) for a, (s, e) in enumerate(zip(lo, hi)))
        there = tuple(slice(hi[axis], hi[axis] + 1) if a == axis else slice(s, e) for a, (s, e) in enumerate(zip(lo, hi)))
        a, b = np.asarray(local[here]).ravel().astype(np.int64), np.asarray(local[there]).ravel().astype(np.int64)
        both = (a > 0) & (b > 0)
        out.append(np.stack([a[both] + offsets[index], b[both] + offsets[nxt]], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _offsets(counts: dict) -> dict:
    """Where each block's ids start among all blocks' ids (block ``b``'s id ``l`` is ``offsets[b] + l``)."""
    offsets, total = {}, 0
    for index in sorted(counts):
        offsets[index], total = total, total + counts[index]
    return offsets


def _merge(counts: dict, sizes: dict, offsets: dict, pairs: np.ndarray, min_size: int) -> np.ndarray:
    """The look-up table from global ids (``offsets[b] + l``) to final ids: a union-find over the face pairs
    (``scipy.sparse.csgraph.connected_components``), objects below ``min_size`` pixels dropped."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = sum(counts.values()) + 1  # node 0: background
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) else coo_matrix((n, n))
    _, comp = connected_components(graph, directed=False)
    size = np.zeros(n)
    for index in counts:
        size[offsets[index] + 1 : offsets[index] + 1 + counts[index]] = sizes[index][1:]
    comp_size = np.bincount(comp, weights=size, minlength=comp.max() + 1)
    keep = comp_size >= max(min_size, 1)
    keep[comp[0]] = False
    final = np.zeros(comp.max() + 1, np.uint64)
    final[keep] = np.arange(1, keep.sum() + 1, dtype=np.uint64)
    return final[comp]


def _relabel_block(local, out, index, block, shape, offset: int, lut: np.ndarray) -> None:
    lo, hi, _, _ = _box(index, block, shape)
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    ids = np.asarray(local[region]).astype(np.int64)
    out[region] = np.where(ids > 0, lut[ids + offset], 0).astype(out.dtype)


def _flood_block(source, seeds, out, rule: InstanceRule, index, block, shape, halo: Sequence[int]) -> None:
    """Watershed of a block's window (core + ``halo``) from the global seeds; the core is written."""
    lo, hi, wlo, whi = _box(index, block, shape, halo)
    window = tuple(slice(a, b) for a, b in zip(wlo, whi))
    relief = _relief(source, window, rule)
    nodata = np.isnan(np.asarray(source[(0, *window)] if source.ndim > len(window) else source[window], np.float32))
    markers = np.asarray(seeds[window]).astype(np.int64)
    if rule.mode == "2d" and len(shape) == 3:
        flooded = np.stack([watershed(r, m, None, wlo[1:], shape[1:]) for r, m in zip(relief, markers)])
    else:
        flooded = watershed(relief, markers, None, wlo, shape)
    flooded = np.where(relief < rule.threshold, flooded, 0) if not rule.fill else np.where(nodata, 0, flooded)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = flooded[tuple(slice(a - w, b - w) for a, b, w in zip(lo, hi, wlo))].astype(out.dtype)


def label_zarr(store: str, source: str, rule: InstanceRule, name: str, block: Sequence[int], halo: int = 64,
               client: Any = None, class_axis: bool = False) -> str:
    """Instances of a stored foreground probability, block by block, with the ids of objects that cross block
    faces merged: the same instances as :func:`make_instances` over the whole volume, up to a relabelling.

    ``components``, and the watershed's seeds, are exact: each block is labelled on its own (the seeds'
    distance test reads a halo of ``ceil(seed_distance)``), the ids that touch across block faces are
    joined by a union-find over the face pairs, objects below ``min_size`` are dropped by their global size.
    The watershed then floods each block's window, the block grown by ``halo`` px, from the global seeds and
    keeps the block: equal to the whole-volume flood wherever no pixel's flooding path leaves that window
    (cells narrower than ``halo``).

    Args:
        store: path of the zarr group (a :func:`pipeline.streaming.predict_zarr` output).
        source: the array in it holding the foreground probability (class 1 of two), ``(Y, X)`` or ``(Z, Y, X)``, or
            with ``class_axis`` the probabilities of every class ``(C, *spatial)``.
        rule: an :class:`InstanceRule` reading one class (of two: 0, the boundary = 1 - p, or 1, p), without
            ``background_channel``.
        name: the result is written to ``instances/<name>`` (uint32) in the group.
        block: block size per axis (the prediction's blocks).
        halo: px around a block that its watershed sees.
        client: a ``distributed.Client`` to run the per-block passes on, or None (this process).

    Returns:
        The array's path inside the group.

    Raises:
        ValueError: a rule reading other classes, or more ids than uint32 holds.
    """
    import zarr

    from pipeline.io.containers import every_chunk

    group = zarr.open_group(store, mode="r+")
    src = group[source]
    classes = src.shape[0] if class_axis else 2
    if rule.channel >= classes or rule.background_channel is not None:
        raise ValueError(f"instances {name!r}: block-wise instances read one stored class probability: set a channel "
                         f"0..{classes - 1}, and no background_channel")
    shape, block = tuple(src.shape[1:] if class_axis else src.shape), tuple(int(b) for b in block)
    sections = rule.mode == "2d" and len(shape) == 3
    chunks = tuple(min(b, s) for b, s in zip(block, shape))
    tmp = f"_instances_tmp/{name}"
    group.create_array(f"{tmp}/local", shape=shape, chunks=chunks, dtype="uint32", fill_value=0, overwrite=True)
    blocks = _grid(shape, block)

    def run(fn, items):
        if client is None:
            return [fn(i) for i in items]
        return client.gather(client.map(fn, items, pure=False))

    counts, sizes = {}, {}
    results = run(lambda i: _label_block(zarr.open_group(store, mode="r")[source], rule, i, block, shape, sections,
                                         zarr.open_group(store, mode="r+")[f"{tmp}/local"]), blocks)
    for index, (n, sz) in zip(blocks, results):
        counts[index], sizes[index] = n, sz
    offsets = _offsets(counts)
    pairs = np.concatenate([np.zeros((0, 2), np.int64)] + run(
        lambda i: _face_pairs(zarr.open_group(store, mode="r")[f"{tmp}/local"], i, block, shape, offsets, sections), blocks))
    lut = _merge(counts, sizes, offsets, pairs, rule.min_size)
    if lut.max(initial=0) > np.iinfo(np.uint32).max:
        raise ValueError(f"instances {name!r}: {lut.max()} objects do not fit uint32 ids")
    target = f"instances/{name}"
    stage = group.create_array(f"{tmp}/seeds" if rule.method == "watershed" else target, shape=shape, chunks=chunks,
                               dtype="uint32", fill_value=0, overwrite=True)
    run(lambda i: _relabel_block(zarr.open_group(store, mode="r")[f"{tmp}/local"], every_chunk(zarr.open_group(store, mode="r+")[stage.path]),
                                 i, block, shape, offsets[i], lut), blocks)
    if rule.method == "watershed":
        group.create_array(target, shape=shape, chunks=chunks, dtype="uint32", fill_value=0, overwrite=True)
        pad = [0 if (sections and a == 0) else int(halo) for a in range(len(shape))]
        run(lambda i: _flood_block(zarr.open_group(store, mode="r")[source], zarr.open_group(store, mode="r")[f"{tmp}/seeds"],
                                   every_chunk(zarr.open_group(store, mode="r+")[target]), rule, i, block, shape, pad), blocks)
    del group["_instances_tmp"]
    return target
