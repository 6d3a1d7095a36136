"""Deterministic generator of EM-like images and membrane labels (ISBI 2012 style).

The project's embedded default dataset. Neurites are tubes crossing the section:
loosely packed disks of log-normal size whose power diagram (a weighted Voronoi
tessellation), seen through a smooth random warp, gives bubble-like cells, big
dendrite-like ones among small axon-like ones. Walls become dark membranes whose
thickness varies per boundary and along it, with thicker junctions. Interiors get
a per-cell grey level, mottled and granular texture, vesicles and mitochondria
(dark, but labelled interior); then noise, blur, stain clouds, uneven illumination.
In a stack, tubes drift and change calibre with depth, so cells move, grow, shrink,
appear and vanish continuously. Labels: 255 = cell interior, 0 = membrane. Defaults
match ISBI 2012 (4 nm pixels): membrane fraction 0.22 (ISBI 0.224), ~130 cells per
512 x 512 section (ISBI 114-131), labelled membrane thickness median 6 px (ISBI 6).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch.distributed as dist
from scipy import ndimage as ndi
from scipy.signal import fftconvolve
from scipy.spatial import cKDTree
from scipy.special import expit

from pipeline.io import replace_atomically

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump whenever the output for a given seed changes
_BLOCK, _K = 8, 8  # blocks of _BLOCK x _BLOCK pixels share a list of _K candidate cells
_DENSITY = 3.0  # candidate disks per cell_diameter^2, before thinning
_RADIUS, _SIZE_SPREAD = 0.25, 1.0  # median disk radius / cell_diameter; log-normal sigma
_TIERS, _OVERLAP = 6, 0.8  # placement rounds (largest disks first); allowed overlap factor


def _check_shape(shape: Any, ndim: int, what: str) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of ints, or raise ValueError saying what is valid."""
    axes, example = ("(Y, X)", "(256, 256)") if ndim == 2 else ("(Z, Y, X)", "(8, 256, 256)")
    dims = tuple(shape) if isinstance(shape, (tuple, list, np.ndarray)) else ()
    ints = all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in dims)
    if len(dims) != ndim or not ints or min(dims) < 1:
        raise ValueError(f"{what}: shape must be {ndim} positive ints {axes}, e.g. {example}; got {shape!r}")
    return tuple(int(s) for s in dims)


@dataclass(frozen=True)
class _Rendering:
    """The rendering parameters of :func:`make_image`, :func:`make_stack` and :func:`make_targets`, all keyword
    arguments but ``z_step`` (plain values, as YAML configs give them), with their defaults; see :func:`make_image`."""

    cell_diameter: float = 50.0
    membrane_thickness: tuple[float, float] = (3.0, 8.0)
    noise: float = 0.1
    blur_sigma: float = 0.7
    blob_density: float = 1.0

    @classmethod
    def of(cls, caller: str, params: dict[str, Any]) -> _Rendering:
        """The rendering ``params`` name; another name raises ``TypeError`` as a wrong keyword of ``caller`` does."""
        unknown = [name for name in params if name not in cls.__dataclass_fields__]
        if unknown:
            raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
        return cls(**params)

    def check(self, z_step: float) -> None:
        """Raise ValueError for out-of-range parameters (``z_step`` too)."""
        t = np.asarray(self.membrane_thickness, float) if np.ndim(self.membrane_thickness) == 1 else np.zeros(0)
        if not (t.shape == (2,) and 0 < t[0] <= t[1]):
            raise ValueError(f"membrane_thickness must be (min, max) px, 0 < min <= max; got {self.membrane_thickness!r}")
        for name, value in (("cell_diameter", self.cell_diameter), ("z_step", z_step)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 px, got {value!r}")
        if not (self.noise >= 0 and self.blur_sigma >= 0 and self.blob_density >= 0):
            raise ValueError(f"noise, blur_sigma, blob_density must be >= 0; got {self.noise!r}, {self.blur_sigma!r}, {self.blob_density!r}")


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], scale) -> np.ndarray:
    """Unit-variance random field over ``shape``, correlation length ``scale`` (array units, per axis)."""
    step = np.maximum(np.broadcast_to(np.asarray(scale, float), (len(shape),)) / 2.0, 0.05)
    field = ndi.gaussian_filter(rng.standard_normal([int((n - 1) / s) + 3 for n, s in zip(shape, step)]), 1.0)
    for axis, (n, s) in enumerate(zip(shape, step)):  # separable linear upsampling, axis by axis
        pos = 1.0 + np.arange(n) / s
        i0 = pos.astype(int)
        w = (pos - i0).reshape((-1,) + (1,) * (field.ndim - axis - 1))
        field = np.take(field, i0, axis) * (1 - w) + np.take(field, i0 + 1, axis) * w
    return ((field - field.mean()) / (field.std() + 1e-9)).astype(np.float32)


def _grain(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Unit-variance fine-grained noise: white noise blurred with ``sigma`` px."""
    field = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return field / (field.std() + 1e-9)


def _ring(radius: float, width: float) -> np.ndarray:
    """Kernel of a ring (a vesicle's membrane) of unit peak."""
    r = int(np.ceil(radius + 3 * width))
    return np.exp(-0.5 * ((np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) - radius) / width) ** 2).astype(np.float32)


def _tubes(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, d: float) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(n, 2)`` and radii ``(n,)`` of loosely packed disks in the box ``[lo, hi)``.

    Candidates are placed in rounds, largest first; a disk is dropped when it
    overlaps (beyond a tolerance) a disk kept earlier or, within its round, one of
    higher random priority (Matern type-II thinning); vectorised with k-d trees.
    """
    n = max(int(rng.poisson(_DENSITY * np.prod(hi - lo) / d**2)), 2)
    pts = lo + (hi - lo) * rng.random((n, 2))
    radius = _RADIUS * d * np.exp(_SIZE_SPREAD * rng.standard_normal(n))
    priority, kept = rng.random(n), np.zeros(0, int)
    for cand in np.array_split(np.argsort(-radius, kind="stable"), _TIERS):
        if len(kept) and len(cand):
            reach = _OVERLAP * (radius[cand].max() + radius[kept].max())
            sdm = cKDTree(pts[cand]).sparse_distance_matrix(cKDTree(pts[kept]), reach, output_type="ndarray")
            clash = sdm["v"] < _OVERLAP * (radius[cand[sdm["i"]]] + radius[kept[sdm["j"]]])
            cand = np.delete(cand, np.unique(sdm["i"][clash]))
        if len(cand):
            i, j = cKDTree(pts[cand]).query_pairs(2 * _OVERLAP * radius[cand].max(), output_type="ndarray").T
            clash = np.hypot(*(pts[cand[i]] - pts[cand[j]]).T) < _OVERLAP * (radius[cand[i]] + radius[cand[j]])
            kept = np.concatenate([kept, np.delete(cand, np.where(priority[cand[i]] < priority[cand[j]], i, j)[clash])])
    return pts[kept], radius[kept]


def _tessellate(sites, weight, u_thick, t_lo, t_hi, qx, qy, t_mod):
    """Power diagram of ``sites`` (power = squared distance + ``weight``) at warped pixel coordinates.

    Returns the pixel's cell, the cell across its nearest wall, the signed distance
    (px, > 0 inside) to that wall's membrane edge, corrected for the local stretch
    of the warp so that membranes keep their thickness, and half the wall thickness.
    """
    (hp, wp), b = qx.shape, _BLOCK
    nby, nbx, k = hp // b, wp // b, min(_K, len(sites))
    tree = cKDTree(np.column_stack([sites, np.sqrt(weight - weight.min())]))  # lifted: exact power kNN
    centre = (slice(b // 2, None, b), slice(b // 2, None, b))
    q = np.column_stack([qx[centre].ravel(), qy[centre].ravel(), np.zeros(nby * nbx)])
    idx = tree.query(q, k=list(range(1, k + 1)))[1].T.reshape(k, nby, 1, nbx, 1)
    full = lambda a: np.broadcast_to(a, (k, nby, b, nbx, b)).reshape(k, hp, wp)  # noqa: E731
    cand, sx, sy, su, f = (full(a) for a in (idx, sites[idx, 0], sites[idx, 1], u_thick[idx], weight[idx]))
    f = f + (qx - sx) ** 2 + (qy - sy) ** 2
    j0 = np.argmin(f, axis=0)[None]
    cell = np.take_along_axis(cand, j0, 0)[0]
    x0, y0, u0 = sites[cell, 0], sites[cell, 1], u_thick[cell]
    bis = (f - f.min(0)) / (2 * np.hypot(sx - x0, sy - y0) + 1e-3)  # distances to the walls
    np.put_along_axis(bis, j0, np.inf, 0)
    t_lo, t_span = np.float32(t_lo), np.float32(t_hi - t_lo)
    walls = bis - (0.5 * t_lo + 0.5 * t_span * np.modf(su + u0)[0]) * t_mod  # random thickness per pair
    partner = np.take_along_axis(cand, np.argmin(walls, axis=0)[None], 0)[0]
    half = (0.5 * t_lo + 0.5 * t_span * np.modf(u_thick[partner] + u0)[0]) * t_mod
    nx, ny = sites[partner, 0] - x0, sites[partner, 1] - y0  # wall normal, warped space
    (dxy, dxx), (dyy, dyx) = (np.gradient(a) for a in (qx, qy))
    stretch = np.hypot(nx * dxx + ny * dyx, nx * dxy + ny * dyy) / (np.hypot(nx, ny) + 1e-6)
    return cell, partner, (walls.min(0) + half) / np.maximum(stretch, 0.3) - half, half


def _paint_mitochondria(img, mito, cell, margin, xx, yy, z, d, ids=None) -> None:
    """Draw into ``img`` (in place) the sections at depth ``z`` of ellipsoidal organelles; where a
    mitochondrion covers more than half a pixel, write its number (1-based, the same in every section)
    into ``ids``."""
    cut = np.flatnonzero(np.abs(mito[:, 2] - z) < mito[:, 5])
    for number, (cx, cy, cz, a, b, c, angle, kind, phase) in zip(cut + 1, mito[cut]):
        shrink = np.sqrt(1 - ((z - cz) / c) ** 2)
        a, b, ix, iy = a * shrink, b * shrink, int(cx), int(cy)
        if b < 2 or margin[iy, ix] < 0.5 * b:  # too small, or centre not well inside a cell
            continue
        sl = (slice(max(iy - int(a) - 2, 0), iy + int(a) + 3), slice(max(ix - int(a) - 2, 0), ix + int(a) + 3))
        dx, dy = xx[sl] - cx, yy[sl] - cy
        u, v = dx * np.cos(angle) + dy * np.sin(angle), dy * np.cos(angle) - dx * np.sin(angle)
        edge = (1 - np.sqrt((u / a) ** 2 + (v / b) ** 2)) * b  # ~ px inside the outline
        alpha = np.clip(edge + 0.5, 0, 1) * ((cell[sl] == cell[iy, ix]) & (margin[sl] > 1))  # kept in its cell
        if kind < 0.85:  # mitochondrion: dark double membrane, cristae across the long axis
            val = np.where(edge < 2.2, 0.22, 0.42 + 0.07 * np.cos(2 * np.pi * u / (0.1 * d) + phase))
            if ids is not None:
                ids[sl][alpha > 0.5] = number
        else:  # dense body
            val = 0.26 + 0.04 * np.cos(v)
        img[sl] = img[sl] * (1 - alpha) + alpha * val


def _render(rng, depth, height, width, look: _Rendering, z_step: float, targets=None):
    """Render ``depth`` sections of one synthetic volume: float32 images, uint8 labels; with a dict
    ``targets``, also its ``cells`` and ``mitochondria`` (uint32 ids, 0 = none) and ``classes`` (uint8:
    0 cytoplasm, 1 membrane, 2 mitochondria), from the same random numbers (the images do not change)."""
    d, (t_lo, t_hi), zs = float(look.cell_diameter), look.membrane_thickness, np.arange(depth) * float(z_step)
    hp, wp = -(-height // _BLOCK) * _BLOCK, -(-width // _BLOCK) * _BLOCK
    lo, hi = np.array([-d, -d]), np.array([wp + d, hp + d])
    centres, radii = _tubes(rng, lo, hi, d)
    n = len(radii)
    drift = 0.12 * rng.standard_normal((n, 2))  # neurites run obliquely through the stack
    period, phase = d * rng.uniform(0.5, 1.5, n), rng.uniform(0, 2 * np.pi, n)  # calibre varies along z
    u_thick, u_dark = rng.random(n).astype(np.float32), rng.random(n).astype(np.float32)
    grey = (0.6 + 0.035 * rng.standard_normal(n)).astype(np.float32)
    vesicle_rate = look.blob_density * (0.0005 + 0.004 * rng.random(n) ** 2)  # terminals are full of them
    zscale, vol = d / z_step, (depth, hp, wp)
    wx, wy = (  # smooth warp of the coordinates, two octaves: cell walls bend and wiggle
        sum(a * d * _smooth(rng, vol, (zscale * s, s * d, s * d)) for a, s in ((0.15, 0.8), (0.04, 0.3)))
        for _ in range(2)
    )
    t_mod = np.clip(1 + 0.15 * _smooth(rng, vol, (0.5 * zscale, 0.4 * d, 0.4 * d)), 0.5, 1.5)
    z_lo, z_hi = zs[0] - d, zs[-1] + d  # mitochondria: 3D ellipsoids, cut by each section
    n_mito = int(rng.poisson(look.blob_density * 0.3 * width * height * (z_hi - z_lo) / d**3))
    mito = np.column_stack([
        rng.random(n_mito) * width, rng.random(n_mito) * height, rng.uniform(z_lo, z_hi, n_mito),
        d * rng.uniform(0.3, 0.6, n_mito), d * rng.uniform(0.14, 0.28, n_mito), d * rng.uniform(0.4, 1.0, n_mito),
        rng.uniform(0, np.pi, n_mito), rng.random(n_mito), rng.uniform(0, 2 * np.pi, n_mito),
    ])
    kernels = [(_ring(0.06 * d, 0.016 * d), 0.22), (_ring(0.09 * d, 0.018 * d), 0.18)]
    round_r = 0.05 * d  # cell corners are rounded with this radius, so junctions thicken
    core_w, mem_level = rng.uniform(0.45, 0.9), rng.uniform(0.18, 0.28)  # staining varies between samples

    images, labels = np.empty((depth, height, width), np.float32), np.empty((depth, height, width), np.uint8)
    if targets is not None:
        targets.update(cells=np.zeros((depth, height, width), np.uint32), mitochondria=np.zeros((depth, height, width), np.uint32))
    yy, xx = np.mgrid[0:hp, 0:wp].astype(np.float32)
    for k, z in enumerate(zs):
        sites = (lo + np.mod(centres + drift * z - lo, hi - lo)).astype(np.float32)  # wrap within the box
        weight = -((radii * (0.75 + 0.4 * np.sin(z / period + phase))) ** 2).astype(np.float32)
        cell, partner, margin, half = _tessellate(sites, weight, u_thick, t_lo, t_hi, xx + wx[k], yy + wy[k], t_mod[k])
        core = margin > round_r
        margin = np.where(core, margin, round_r - ndi.distance_transform_edt(~core)).astype(np.float32)
        labels[k] = np.where(margin[:height, :width] < 0, 0, 255)

        img = grey[cell] + 0.05 * _smooth(rng, (hp, wp), 0.15 * d) + 0.08 * _grain(rng, (hp, wp), 0.8)
        img -= 0.15 * np.clip(_grain(rng, (hp, wp), 1.2) - 0.8, 0, None)  # dark granules
        for kernel, amp in kernels:
            hits = (rng.random((hp, wp)) < vesicle_rate[cell]) & (margin > 0.1 * d)
            img -= amp * fftconvolve(hits.astype(np.float32), kernel, mode="same")
        ids = None if targets is None else np.zeros((hp, wp), np.uint32)
        _paint_mitochondria(img, mito, cell, margin, xx, yy, z, d, ids)
        if targets is not None:  # a tube is one cell through the stack: its index + 1 is its id
            targets["cells"][k] = np.where(labels[k] > 0, cell[:height, :width] + 1, 0)
            targets["mitochondria"][k] = np.where(labels[k] > 0, ids[:height, :width], 0)
        # stain: dark along each wall's middle and from ~1 px inside the label's membrane edge
        mem = np.maximum(expit((0.5 - margin - (1 - core_w) * half) / 0.4), expit(-(margin + 1.2) / 0.5))
        mem = np.maximum(mem, 0.15 * expit(-margin / 0.7))
        img = img * (1 - mem) + mem * (mem_level + 0.1 * np.modf(u_dark[cell] + u_dark[partner])[0])
        img += look.noise * np.sqrt(np.clip(img, 0.01, None) / 0.5) * rng.standard_normal((hp, wp), dtype=np.float32)
        if look.blur_sigma > 0:
            img = ndi.gaussian_filter(img, look.blur_sigma)
        img -= 0.12 * np.clip(_smooth(rng, (hp, wp), 1.2 * d) - 0.8, 0, None)  # dark stain clouds
        gain = (1 + 0.06 * rng.standard_normal()) * (1 + 0.1 * _smooth(rng, (hp, wp), 2 * d))
        images[k] = np.clip(img * gain, 0, 1)[:height, :width]
    if targets is not None:
        targets["classes"] = np.where(targets["mitochondria"] > 0, 2, np.where(labels > 0, 0, 1)).astype(np.uint8)
    return images, labels


#: what :func:`make_targets` gives besides the image and its binary label
TARGETS = ("cells", "mitochondria", "classes")
#: the folder of each array of :func:`write_dataset`
FOLDERS = {"image": "images", "label": "labels", **{t: t for t in TARGETS}}
#: the labels of :func:`write_dataset` that each ``label_mode`` trains on
LABELS_OF_MODE = {"binary": "label", "instances": "cells", "classes": "classes"}


def make_targets(shape: tuple[int, ...] = (256, 256), seed: int = 0, **params: Any) -> dict[str, np.ndarray]:
    """One synthetic section ``(Y, X)`` or stack ``(Z, Y, X)`` with all its labels.

    The image and ``label`` are those of :func:`make_image` / :func:`make_stack` for the same arguments;
    besides them:

    - ``cells``: uint32 instance ids of the cells' interiors (0 on membranes), one id per neurite through
      the whole stack (3D instances);
    - ``mitochondria``: uint32 ids of the mitochondria (ellipsoids cut by the sections; dense bodies are
      not mitochondria), 0 elsewhere;
    - ``classes``: uint8 class map, 0 = cytoplasm, 1 = membrane, 2 = mitochondrion.

    Args:
        shape: ``(Y, X)`` or ``(Z, Y, X)``.
        seed, **params: as :func:`make_image` (2D) or :func:`make_stack` (3D, ``z_step`` too).

    Returns:
        ``{"image", "label", "cells", "mitochondria", "classes"}``.
    """
    z_step = params.pop("z_step", 20.0)
    if len(shape) == 2:
        height, width = _check_shape(shape, 2, "make_targets")
        depth, z_step = 1, 1.0  # one section: z_step plays no part
    else:
        depth, height, width = _check_shape(shape, 3, "make_targets")
    look = _Rendering.of("make_targets", params)
    look.check(z_step)
    out: dict[str, np.ndarray] = {}
    out["image"], out["label"] = _render(np.random.default_rng(seed), depth, height, width, look, z_step, targets=out)
    return {k: v[0] for k, v in out.items()} if len(shape) == 2 else out


def make_image(shape: tuple[int, int] = (256, 256), seed: int = 0, **rendering: Any) -> tuple[np.ndarray, np.ndarray]:
    """Generate one EM-like section and its membrane label.

    Args:
        shape: ``(Y, X)`` size in pixels.
        seed: seed of ``numpy.random.default_rng``; same seed, bit-identical arrays.
        cell_diameter: typical cell diameter in px; the default 50 matches ISBI 2012
            at its 4 nm pixels (~33 cells per 256 x 256, ~130 per 512 x 512).
        membrane_thickness: ``(min, max)`` labelled membrane thickness in px, drawn
            per cell boundary and modulated smoothly (+-15%) along it.
        noise: std of the signal-dependent noise, before blurring (0: none).
        blur_sigma: Gaussian blur sigma in px (0: none).
        blob_density: multiplier on the density of vesicles and mitochondria (0: none).

    Returns:
        ``(image, label)``: float32 ``(Y, X)`` in [0, 1] and uint8 ``(Y, X)`` with
        255 = cell interior, 0 = membrane (ISBI 2012 convention).

    Raises:
        ValueError: ``shape`` is not 2 positive ints, or a parameter is out of range.
    """
    look = _Rendering.of("make_image", rendering)
    height, width = _check_shape(shape, 2, "make_image")
    look.check(1.0)
    images, labels = _render(np.random.default_rng(seed), 1, height, width, look, 1.0)
    return images[0], labels[0]


def make_stack(shape: tuple[int, int, int] = (8, 256, 256), seed: int = 0, *, z_step: float = 20.0,
               **rendering: Any) -> tuple[np.ndarray, np.ndarray]:
    """Generate a z-coherent stack of EM-like sections, slices of one volume.

    Args:
        shape: ``(Z, Y, X)`` size.
        seed: seed of ``numpy.random.default_rng``; same seed, bit-identical arrays.
        z_step: depth between sections in in-plane px (cells drift, and their calibre
            changes, over depths ~cell_diameter). The default 20 mimics ISBI 2012's
            50 nm sections: neighbouring labels agree on ~73% of pixels (ISBI 72%),
            membrane IoU ~0.30 (ISBI 0.23-0.31); z_step=5 gives 89% / 0.65.
        cell_diameter, membrane_thickness, noise, blur_sigma, blob_density: as in
            :func:`make_image`.

    Returns:
        ``(image, label)``: float32 ``(Z, Y, X)`` in [0, 1] and uint8 ``(Z, Y, X)``
        in {0, 255}, as in :func:`make_image`.

    Raises:
        ValueError: ``shape`` is not 3 positive ints, or a parameter is out of range.
    """
    look = _Rendering.of("make_stack", rendering)
    dims = _check_shape(shape, 3, "make_stack")
    look.check(z_step)
    return _render(np.random.default_rng(seed), *dims, look, z_step)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a float image in [0, 1] to uint8 0..255 (rounded), as :func:`write_dataset` stores it."""
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


OWNER_FILE = ".pipeline-synthetic"  # marks a folder that this module created and may rewrite


def claim_folder(directory: str | os.PathLike) -> Path:
    """Make sure the synthetic writers may write into ``directory``, and mark it as theirs.

    They rewrite and delete files there (``img_NNN.tif`` of an earlier, larger dataset), so they
    only use a folder they created: one that does not exist yet or is empty (it is then created and
    marked with ``OWNER_FILE``), or one already marked (or holding a ``manifest.json`` of this
    module, from before the mark existed).

    Raises:
        FileExistsError: the folder holds anything else, naming it (``directory``, the bundle key ``data_cache_dir``)
            and some of its entries.
        NotADirectoryError: the path is a file.
    """
    root = Path(directory)
    if (root / OWNER_FILE).is_file():
        return root
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"directory={str(root)!r} is a file; give a folder for the synthetic data")
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if entries and not _own_manifest(root / "manifest.json"):
        raise FileExistsError(
            f"directory={str(root)!r} holds files that the synthetic-data writer did not make ({', '.join(entries[:5])}"
            f"{', ...' if len(entries) > 5 else ''}); it writes only into an empty or new folder, or one it made, "
            "because it replaces and deletes files there. Nothing was changed. Choose another directory "
            "(to train on your own images, set train_datalist / val_datalist, e.g. with configs/isbi2012.yaml)"
        )
    root.mkdir(parents=True, exist_ok=True)
    replace_atomically(root / OWNER_FILE, lambda tmp: tmp.write_text("written by pipeline.synthetic; it may rewrite this folder\n"))
    return root


def _own_manifest(path: Path) -> bool:
    try:
        return "generator_version" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def write_dataset(
    directory: str | os.PathLike,
    n_images: int = 40,
    shape: tuple[int, ...] = (256, 256),
    seed: int = 0,
    label_mode: str = "binary",
    rendering: dict[str, Any] | None = None,
    **params: Any,
) -> list[dict[str, str]]:
    """Write synthetic images (or stacks) and labels as TIFFs; return a MONAI datalist.

    Image ``i`` is ``make_targets(shape, seed + i, **params)``'s (``make_image`` / ``make_stack``), whatever ``n_images``,
    stored as ``directory/images/img_{i:03d}.tif`` (uint8, :func:`to_uint8`) and its
    labels (:func:`make_targets`) under the same name in ``labels/`` (uint8, 0 = membrane,
    255 = interior), ``cells/`` and ``mitochondria/`` (uint32 instance ids) and ``classes/``
    (uint8: 0 cytoplasm, 1 membrane, 2 mitochondrion). The datalist's ``label`` is the folder
    ``label_mode`` trains on (:data:`LABELS_OF_MODE`: binary ``labels/``, instances ``cells/``,
    classes ``classes/``). ``directory/manifest.json`` is written last; a call whose arguments and
    :data:`GENERATOR_VERSION` match it, with all files present, writes nothing. Only a folder
    that this module made is written to (:func:`claim_folder`).

    Args:
        directory: output folder (created if needed).
        n_images: number of image/label pairs (>= 1).
        shape: ``(Y, X)`` size of each image, or ``(Z, Y, X)``: z-coherent stacks (multi-page TIFFs), for
            3D networks; ``z_step`` in ``params`` sets the section spacing in pixels (:func:`make_stack`).
        seed: seed of image 0.
        label_mode: ``binary``, ``instances`` or ``classes``: which labels the datalist names.
        rendering, **params: :func:`make_image` / :func:`make_stack`'s keywords (JSON-serialisable), as a dict and/or keywords.

    Returns:
        ``[{"image": path, "label": path}, ...]`` with ``str`` paths, in index order.

    Raises:
        ValueError: ``n_images`` is not a positive int, or ``shape`` or a parameter is invalid.
        FileExistsError: ``directory`` holds files that this module did not write.

    In a ``torch.distributed`` job of several processes, rank 0 writes while the others wait at a
    barrier; then every rank returns the same datalist.
    """
    params = {**(rendering or {}), **params}
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}")
    if not (isinstance(shape, (tuple, list, np.ndarray)) and len(shape) in (2, 3)):
        raise ValueError(f"write_dataset: shape must be 2 positive ints (Y, X), e.g. (256, 256), or 3 (Z, Y, X) for stacks, "
                         f"e.g. (24, 256, 256); got {shape!r}")
    shape = _check_shape(shape, len(shape), "write_dataset")
    if label_mode not in LABELS_OF_MODE:
        raise ValueError(f"label_mode={label_mode!r} is unknown; valid: {', '.join(LABELS_OF_MODE)}")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # several processes (DDP): rank 0 writes, the others wait, then find it up to date (no write races)
        written = _write_dataset(directory, n_images, shape, seed, params) if dist.get_rank() == 0 else None
        dist.barrier()
        datalist = written or _write_dataset(directory, n_images, shape, seed, params)
    else:
        datalist = _write_dataset(directory, n_images, shape, seed, params)
    return [{"image": item["image"], "label": item[LABELS_OF_MODE[label_mode]]} for item in datalist]


def _write_dataset(directory: str | os.PathLike, n_images: int, shape: tuple[int, ...], seed: int, params: dict) -> list[dict[str, str]]:
    """Write (or find up to date) the images and every label folder; items name them all."""
    root, names = Path(directory), [f"img_{i:03d}.tif" for i in range(n_images)]
    datalist = [{key: str(root / sub / f) for key, sub in FOLDERS.items()} for f in names]
    manifest = json.dumps({"generator_version": GENERATOR_VERSION, "n_images": int(n_images), "shape": list(shape),
                           "seed": int(seed), "params": params, "folders": FOLDERS}, indent=2, sort_keys=True)
    manifest_path = root / "manifest.json"
    claim_folder(root)
    if manifest_path.is_file() and manifest_path.read_text() == manifest:
        if all(os.path.exists(p) for entry in datalist for p in entry.values()):
            logger.debug("synthetic dataset in %s is up to date (%d images)", root, n_images)
            return datalist
    logger.info("writing %d synthetic %s images to %s", n_images, "x".join(map(str, shape)), root)
    manifest_path.unlink(missing_ok=True)  # the folder is incomplete until the manifest is back
    for sub in FOLDERS.values():
        (root / sub).mkdir(parents=True, exist_ok=True)
        for stale in (root / sub).glob("img_[0-9][0-9][0-9].tif"):
            if stale.name not in names:  # left by an earlier, larger dataset
                stale.unlink()
    for i, entry in enumerate(datalist):
        arrays = make_targets(shape, seed + i, **params)
        arrays["image"] = to_uint8(arrays["image"])
        for what, path in entry.items():
            replace_atomically(Path(path), lambda tmp: tifffile.imwrite(tmp, arrays[what]))
    replace_atomically(manifest_path, lambda tmp: tmp.write_text(manifest))
    return datalist


def write_default_stack(directory: str | os.PathLike, shape: tuple[int, int, int] = (8, 256, 256), seed: int = 1000,
                        z_step: float = 20.0) -> str:
    """Write the default input of the inference bundle, a synthetic EM stack (:func:`make_stack` with ``z_step``),
    as a uint8 TIFF.

    Returns the file's path; the name holds the shape, seed, ``z_step`` (when not the default 20) and generator
    version, so an existing file is reused as it is. Only a folder that this module made is written to
    (:func:`claim_folder`, which raises ``FileExistsError`` otherwise).
    """
    shape = _check_shape(shape, 3, "write_default_stack")
    root = Path(directory)
    step = "" if float(z_step) == 20.0 else f"_z{float(z_step):g}"
    path = claim_folder(root) / f"stack_{'x'.join(map(str, shape))}_seed{seed}{step}_v{GENERATOR_VERSION}.tif"
    if not path.exists():
        image, _ = make_stack(shape, seed=seed, z_step=float(z_step))
        replace_atomically(path, lambda tmp: tifffile.imwrite(tmp, to_uint8(image)))
    return str(path)
