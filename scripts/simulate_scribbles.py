#!/usr/bin/env python
"""Simulate an annotator's scribbles from dense labels: seeded strokes covering a given fraction of pixels.

Sparse-annotation benchmarks (train on scribbles, score against the dense labels) need scribbles that
anyone can reproduce. This script turns a dense class map into strokes of a brush ``width`` px wide,
the way a person scribbles in napari or ilastik: membrane strokes run along membranes, cell strokes run
through the middle of cells, and every class gets its share.

Output convention (napari ``Labels`` layer, ilastik scribbles): uint8, ``0`` = unlabelled, ``k + 1`` =
class ``k``. An ISBI 2012 label (uint8, 0 = membrane, 255 = cell interior) is first read as class 0 =
membrane (scribble value 1) and class 1 = cell (scribble value 2), see :func:`classes_from_binary`;
a class-index label (``0 .. N-1``) is used as it is.

How strokes are made, per section and per class ``k`` (the same code for every class; membrane strokes
follow membranes because the skeleton of a membrane is its midline, and cell strokes stay inside cells
because the skeleton of a cell is its medial axis):

1. The class mask is thinned to its skeleton (``skimage.morphology.skeletonize``) and pruned to the
   pixels where the whole brush (below) fits inside the class (an erosion of the mask by the brush),
   so that first strokes keep off the other classes as a careful annotator's do. Where no skeleton
   pixel is that deep (a class thinner than the brush everywhere), the whole skeleton is used.
2. A stroke starts at a random skeleton pixel not yet scribbled (a seeded permutation) and walks along
   8-connected skeleton pixels, first one way then the other from its start, for a path length drawn
   uniformly in ``[length / 2, 3 * length / 2]`` px. At a fork it takes the branch closest to its
   current heading (a running mean of its last steps; random tie-break), so strokes run straight
   through membrane junctions. A walk stops early at a dead end or where it meets a scribbled pixel.
3. The path is painted with a disk brush ``width`` px across (pixels whose centre lies within
   ``width / 2`` of the path pixel's centre, see :func:`brush`), clipped to the class mask: a stroke
   never crosses into another class, and it is narrower only where the class itself is.
4. When the skeleton runs out before the class has its share (high fractions), the skeleton of the
   class's still-unscribbled pixels is taken, without pruning, and strokes continue there (rounds);
   ``fraction = 1`` labels every pixel.

Amount: a section of ``P`` pixels gets ``T = round(fraction * P)`` scribbled pixels, shared between the
classes **equally in pixels** (people scribble each class about as much, whatever its area); a class
with fewer pixels than its share gives it all and the rest is shared among the others (water-filling),
so the total stays ``T`` while ``T`` <= ``P``. Stroke counts then follow from the classes' geometry.
Each class's last stroke is cut short along its path, so that a class gets between its share minus
one brush (``B`` = :func:`brush` pixel count, 9 for ``width = 3``) and its share, never more: the section
total is within ``C * B`` pixels below ``T`` (``C`` classes), e.g. 18 px of 1311 (1.4%) for a 512 x 512
section at 0.5% with ``width = 3``, and the tests hold every case to +-10% relative.

Reproducibility: section ``z`` of a stack draws from ``numpy.random.default_rng([seed, z])`` (a 2D image
is section 0), so the scribbles of a section depend only on the seed, its index and its own labels:
the same whether the whole stack or a range of it (``--sections``) is scribbled. Same inputs and seed,
identical output; the output may change when skimage's skeletonize changes.

The simulator sees classes, not instances: two cells that touch through a gap in a label's membrane
are one region of the cell class, and a stroke may run from one into the other (never through a
membrane pixel). A first-round stroke stays in one 8-connected region of its class.

Speed (2-core AMD EPYC, shared; one 512 x 512 section, ``width = 3``, medians of 7 over two runs):
0.04-0.07 s at 0.5%, 0.05-0.08 s at 2%, 0.06-0.09 s at 10% (synthetic and ISBI 2012 sections alike;
two skeletonizations are most of it); the 25 ISBI training sections at 2% take 1.2-1.7 s, and
``fraction = 1`` about 1 s a section.

Usage::

    python scripts/simulate_scribbles.py LABELS OUT [--fraction 0.02] [--seed 0] [--width 3] [--length 40]
                                         [--foreground_value 255 | --num_classes N] [--sections a:b]

    python scripts/simulate_scribbles.py ../shared/data/isbi2012/train-labels.tif scribbles.tif --fraction 0.02
    python scripts/simulate_scribbles.py classes.tif scribbles.tif --num_classes 3 --sections 0:10 --seed 1

``LABELS`` is a TIFF (a section ``(Y, X)`` or a stack ``(Z, Y, X)``); by default a binary label with
cell/object = 255 (``--foreground_value``), or with ``--num_classes N`` a class-index label. ``OUT`` is
an ImageJ uint8 TIFF of the label's shape; sections outside ``--sections`` stay 0 (unlabelled). A table
gives, per section, the scribbled fraction of its pixels in all and per class.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from skimage.morphology import skeletonize

__all__ = ["brush", "classes_from_binary", "class_shares", "simulate_scribbles", "main"]

# the 8 neighbours of a pixel, (dy, dx), and their unit directions
_NEIGHBOURS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
_UNIT = [(dy / math.hypot(dy, dx), dx / math.hypot(dy, dx)) for dy, dx in _NEIGHBOURS]


def brush(width: int) -> np.ndarray:
    """Pixel offsets ``(B, 2)`` (dy, dx) of a round brush ``width`` px across.

    The pixels of a ``width x width`` block whose centres lie within ``width / 2`` of the block's centre,
    offset so that the painted pixel is the block's centre (odd ``width``) or the pixel just above-left
    of it (even ``width``). ``width`` 1, 2, 3, 4, 5 give 1, 4, 9, 12, 21 pixels.

    Raises:
        ValueError: ``width`` is not an int >= 1.
    """
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width < 1:
        raise ValueError(f"width must be an int >= 1 (brush diameter in px), got {width!r}")
    u = np.arange(width) - (width - 1) / 2
    dy, dx = np.nonzero(u[:, None] ** 2 + u[None, :] ** 2 <= (width / 2) ** 2)
    return np.stack([dy, dx], axis=1) - (width - 1) // 2


def classes_from_binary(label: np.ndarray, foreground_value: int = 255) -> np.ndarray:
    """Class indices ``uint8`` of a binary label: ``0`` -> class 0, ``foreground_value`` -> class 1.

    For ISBI 2012 (0 = membrane, 255 = cell interior) class 0 is the membrane and class 1 the cell, so
    the scribbles mark membranes 1 and cells 2.

    Args:
        label: integer array of any shape with values in ``{0, foreground_value}``.
        foreground_value: the value of the object / cell interior, > 0.

    Raises:
        ValueError: ``foreground_value`` is not a positive int, ``label`` is not an integer array, or it
            holds other values (the first few are named).
    """
    if isinstance(foreground_value, bool) or not isinstance(foreground_value, (int, np.integer)) or foreground_value <= 0:
        raise ValueError(f"foreground_value must be an int > 0, got {foreground_value!r}")
    label = np.asarray(label)
    if not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        raise ValueError(f"a binary label must be an integer array, got dtype {label.dtype}")
    values = np.unique(label)
    other = values[(values != 0) & (values != foreground_value)]
    if other.size:
        raise ValueError(f"a binary label holds only 0 and foreground_value={foreground_value}; this one also holds "
                         f"{other[:5].tolist()}{' ...' if other.size > 5 else ''} (a class-index label? give num_classes)")
    return (label == foreground_value).astype(np.uint8)


def class_shares(counts: Iterable[int], total: int) -> np.ndarray:
    """Split ``total`` scribbled pixels between classes equally, each capped by its pixel count.

    Water-filling: the classes are served from the smallest count up, each taking the (rounded up)
    equal share of what is left, or all its pixels if it has fewer; the shares sum to
    ``min(total, sum(counts))``.

    Args:
        counts: ``(C,)`` pixels of each class.
        total: pixels to scribble, >= 0.

    Returns:
        ``(C,)`` int64 shares.
    """
    counts = np.asarray(list(counts), dtype=np.int64)
    shares = np.zeros_like(counts)
    left = int(total)
    for i, k in enumerate(np.argsort(counts, kind="stable")):
        shares[k] = min(int(counts[k]), -(-left // (len(counts) - i)))
        left -= int(shares[k])
    return shares


def _check_classes(classes: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, int]:
    """Validate a class map ``(Y, X)`` / ``(Z, Y, X)``; return it and the number of classes."""
    classes = np.asarray(classes)
    if classes.ndim not in (2, 3) or 0 in classes.shape:
        raise ValueError(f"classes must be a non-empty (Y, X) image or (Z, Y, X) stack, got shape {classes.shape}")
    if not (np.issubdtype(classes.dtype, np.integer) or classes.dtype == bool):
        raise ValueError(f"classes must be an integer array of class indices 0..N-1, got dtype {classes.dtype}")
    low, high = int(classes.min()), int(classes.max())
    if low < 0:
        raise ValueError(f"classes must be class indices 0..N-1 (>= 0), got values in {low}..{high}")
    if num_classes is None:
        num_classes = high + 1
    elif isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"scribbles need at least 2 classes, got num_classes={num_classes} (max class index {high})")
    if num_classes > 255:
        raise ValueError(f"at most 255 classes fit the uint8 scribble values 1..255, got num_classes={num_classes} "
                         "(a binary 0/255 label? convert it with classes_from_binary / --foreground_value)")
    if high >= num_classes:
        raise ValueError(f"classes must be class indices in 0..{num_classes - 1}, got values in {low}..{high} "
                         "(a binary 0/255 label? convert it with classes_from_binary / --foreground_value)")
    return classes, int(num_classes)


def _walk(start: int, walkable: bytearray, width_p: int, steps: int, rng: np.random.Generator) -> list[int]:
    """Flat indices of a stroke's path along ``walkable`` pixels, through ``start``, at most ``steps + 1`` long.

    Walks forward from ``start``, then backward from it in the opposite heading; at each step it takes the
    walkable 8-neighbour closest to its heading (ties broken at random) and clears it in ``walkable``.
    ``walkable`` is a padded image of row length ``width_p`` with a zero border, so no bound checks.
    """
    offsets = [dy * width_p + dx for dy, dx in _NEIGHBOURS]
    walkable[start] = 0

    def extend(pos: int, heading: tuple[float, float] | None, budget: int) -> tuple[list[int], tuple | None]:
        path, first = [], None
        jitter = rng.random(budget * 8) * 1e-3
        for s in range(budget):
            best, best_score = -1, -9.0
            for j, off in enumerate(offsets):
                if walkable[pos + off]:
                    uy, ux = _UNIT[j]
                    score = (uy * heading[0] + ux * heading[1] if heading else 0.0) + jitter[s * 8 + j]
                    if score > best_score:
                        best, best_score = j, score
            if best < 0:
                break
            pos += offsets[best]
            walkable[pos] = 0
            path.append(pos)
            uy, ux = _UNIT[best]
            if first is None:
                first = (uy, ux)
            heading = (uy, ux) if heading is None else (0.5 * heading[0] + 0.5 * uy, 0.5 * heading[1] + 0.5 * ux)
        return path, first

    forward, first = extend(start, None, steps)
    backward = []
    if first is not None and len(forward) < steps:
        backward, _ = extend(start, (-first[0], -first[1]), steps - len(forward))
    return backward[::-1] + [start] + forward


def _scribble_class(mask: np.ndarray, share: int, offsets: np.ndarray, length: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Scribbled pixels (bool, the shape of ``mask``) of one class: strokes until ``share`` pixels.

    ``mask`` is the class mask padded with a zero border wider than the brush; ``offsets`` are the
    brush's flat offsets in it. See the module docstring for the rounds, the pruning to where the
    brush fits and the cut of the last stroke.
    """
    width_p = mask.shape[1]
    flat_mask = mask.ravel()
    done = np.zeros(mask.size, dtype=bool)
    count = 0
    for round_ in range(mask.size):  # each round makes progress or ends the loop
        if count >= share:
            break
        if round_ == 0:
            skeleton = skeletonize(mask)
            fits = flat_mask.copy()  # the brush centred here lies inside the class (the pad is wider than it)
            for off in offsets:
                fits &= np.roll(flat_mask, -int(off))
            deep = skeleton & fits.reshape(mask.shape)
            skeleton = deep if deep.any() else skeleton
        else:
            region = mask & ~done.reshape(mask.shape)
            skeleton = skeletonize(region)
            if not skeleton.any():
                skeleton = region
        walk_bytes = bytearray(skeleton.astype(np.uint8).ravel().tobytes())
        walkable = np.frombuffer(walk_bytes, dtype=np.uint8)  # a writable view of walk_bytes
        walkable[done] = 0
        count_before = count
        for start in rng.permutation(np.flatnonzero(walkable)):
            if not walk_bytes[start]:
                continue
            steps = int(rng.uniform(length / 2, 3 * length / 2))
            path = np.asarray(_walk(int(start), walk_bytes, width_p, steps, rng))
            pixels = (path[:, None] + offsets[None, :]).ravel()
            step = np.repeat(np.arange(len(path)), len(offsets))
            keep = flat_mask[pixels] & ~done[pixels]
            pixels, step = pixels[keep], step[keep]
            pixels, first = np.unique(pixels, return_index=True)  # first occurrence = earliest step
            step = step[first]
            gained = np.cumsum(np.bincount(step, minlength=len(path)))
            n_steps = int(np.searchsorted(gained, share - count, side="right"))
            new = pixels[step < n_steps]
            done[new] = True
            walkable[new] = 0
            count += len(new)
            if n_steps < len(path):  # cut short: the class has its share, within one brush
                return done.reshape(mask.shape)
        if count == count_before:
            break
    return done.reshape(mask.shape)


def _scribble_section(classes: np.ndarray, num_classes: int, fraction: float, width: int, length: float,
                      rng: np.random.Generator, where: str) -> np.ndarray:
    """Scribbles ``(Y, X)`` uint8 of one class map ``(Y, X)``; ``where`` names the section in errors."""
    classes = classes.astype(np.int16)  # < 256 classes, checked; any integer dtype (uint64, bool) comes in
    counts = np.bincount(classes.ravel(), minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"class {int(empty[0])} has no pixels in {where} (classes present: "
                         f"{np.flatnonzero(counts).tolist()} of 0..{num_classes - 1}); every class needs pixels to scribble")
    shares = class_shares(counts, round(fraction * classes.size))
    pad = width // 2 + 1
    padded = np.pad(classes, pad, constant_values=-1)  # a border of no class
    offsets = brush(width)
    flat_offsets = offsets[:, 0] * padded.shape[1] + offsets[:, 1]
    out = np.zeros(padded.shape, dtype=np.uint8)
    for k in range(num_classes):
        if shares[k]:
            out[_scribble_class(padded == k, int(shares[k]), flat_offsets, length, rng)] = k + 1
    return out[pad:-pad, pad:-pad]


def simulate_scribbles(classes: np.ndarray, fraction: float, seed: int, width: int = 3, *, length: float = 40.0,
                       num_classes: int | None = None, sections: Iterable[int] | None = None) -> np.ndarray:
    """Scribbles of a dense class map: strokes ``width`` px wide covering ``fraction`` of each section.

    See the module docstring for the method, the share of each class and the tolerance.

    Args:
        classes: ``(Y, X)`` or ``(Z, Y, X)`` integer class indices ``0 .. num_classes - 1`` (a binary
            0/255 label goes through :func:`classes_from_binary` first).
        fraction: the fraction of each section's pixels to scribble, in ``(0, 1]``.
        seed: seeds ``numpy.random.default_rng([seed, z])`` for section ``z`` (0 for an image).
        width: brush diameter in px (int >= 1).
        length: mean stroke path length in px (> 0); each stroke's is uniform in
            ``[length / 2, 3 * length / 2]``, shorter where the skeleton ends.
        num_classes: number of classes; default ``classes.max() + 1``.
        sections: indices of the sections of a stack to scribble (default all); the others stay 0.

    Returns:
        uint8 scribbles of the shape of ``classes``: 0 = unlabelled, ``k + 1`` = class ``k``; every
        scribbled pixel carries its pixel's class.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]``, ``seed`` / ``width`` / ``length`` / ``num_classes`` out of range,
            ``classes`` not a 2D/3D integer array of class indices, a section index out of range, or a
            class without pixels in a scribbled section (the message names the section and class).
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer, np.floating)) \
            or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1] (the share of pixels to scribble), got {fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    brush(width)  # validates width
    if isinstance(length, bool) or not isinstance(length, (int, float, np.integer, np.floating)) or not length > 0:
        raise ValueError(f"length must be > 0 px (mean stroke length), got {length!r}")
    classes, num_classes = _check_classes(classes, num_classes)
    stack = classes if classes.ndim == 3 else classes[None]
    chosen = range(len(stack)) if sections is None else [int(z) for z in sections]
    bad = [z for z in chosen if not 0 <= z < len(stack)]
    if bad:
        raise ValueError(f"section indices must be in 0..{len(stack) - 1}, got {bad[:5]}")
    out = np.zeros(stack.shape, dtype=np.uint8)
    for z in chosen:
        where = f"section {z}" if classes.ndim == 3 else "the image"
        rng = np.random.default_rng([int(seed), z])
        out[z] = _scribble_section(stack[z], num_classes, float(fraction), int(width), float(length), rng, where)
    return out if classes.ndim == 3 else out[0]


def _parse_sections(text: str, depth: int) -> range:
    """``"a:b"`` (Python slice, either end optional) or ``"a"`` -> the section indices of ``depth`` sections."""
    try:
        parts = [int(p) if p.strip() else None for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or parts[0] is None and len(parts) == 1:
        raise ValueError(f"--sections takes a:b (or a single index), got {text!r}")
    if len(parts) == 1:
        parts = [parts[0], parts[0] + 1 if parts[0] != -1 else None]
    chosen = range(depth)[slice(*parts)]
    if not chosen:
        raise ValueError(f"--sections {text} selects none of the {depth} sections")
    return chosen


def _table(classes: np.ndarray, scribbles: np.ndarray, num_classes: int, chosen: Iterable[int]) -> str:
    """Per section: scribbled fraction of its pixels, in all and per class (value k + 1)."""
    head = ["section", "labelled"] + [f"class {k} (={k + 1})" for k in range(num_classes)]
    rows = [head]
    stack = scribbles if scribbles.ndim == 3 else scribbles[None]
    for z in chosen:
        n = stack[z].size
        per = np.bincount(stack[z].ravel(), minlength=num_classes + 1)
        rows.append([str(z), f"{(n - per[0]) / n:.4f}"] + [f"{per[k + 1] / n:.4f}" for k in range(num_classes)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    import tifffile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labels", type=Path, help="label TIFF, (Y, X) or (Z, Y, X)")
    parser.add_argument("out", type=Path, help="scribble TIFF to write (uint8 ImageJ, 0 = unlabelled, k+1 = class k)")
    parser.add_argument("--fraction", type=float, default=0.02, help="fraction of each section's pixels to scribble (default 0.02)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--width", type=int, default=3, help="brush diameter in px (default 3)")
    parser.add_argument("--length", type=float, default=40.0, help="mean stroke length in px (default 40)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--foreground_value", type=int, default=None,
                      help="binary label: 0 -> class 0 (membrane), this value -> class 1 (cell); the default, with 255")
    kind.add_argument("--num_classes", type=int, default=None, help="class-index label with values 0..N-1")
    parser.add_argument("--sections", default=None, help="sections a:b of a stack to scribble (others stay 0)")
    args = parser.parse_args(argv)
    try:
        label = tifffile.imread(args.labels)
        label = np.squeeze(label) if label.ndim > 3 else label
        if args.num_classes is None:
            classes = classes_from_binary(label, 255 if args.foreground_value is None else args.foreground_value)
        else:
            classes = label
        classes, num_classes = _check_classes(classes, args.num_classes if args.num_classes is not None else 2)
        if args.sections is not None and classes.ndim != 3:
            raise ValueError(f"--sections needs a (Z, Y, X) stack; {args.labels} is {classes.shape}")
        depth = classes.shape[0] if classes.ndim == 3 else 1
        chosen = range(depth) if args.sections is None else _parse_sections(args.sections, depth)
        scribbles = simulate_scribbles(classes, args.fraction, args.seed, args.width, length=args.length,
                                       num_classes=num_classes, sections=chosen if classes.ndim == 3 else None)
    except (ValueError, OSError) as error:
        print(f"simulate_scribbles: {error}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    try:
        tifffile.imwrite(tmp, scribbles, imagej=True, metadata={"axes": "ZYX" if scribbles.ndim == 3 else "YX"})
        os.replace(tmp, args.out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{args.labels} -> {args.out}: {scribbles.shape} uint8, fraction {args.fraction}, seed {args.seed}, "
          f"width {args.width}, length {args.length:g}")
    print(_table(classes, scribbles, num_classes, chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
