"""Where outputs may go, checked before any work by every writer of the pipeline (predictions, streaming stores and
their exports, overlays, reports, TorchScript files, packages): no output replaces an input or another input's output,
an existing output is replaced only with ``overwrite``, and a container holding datasets the run does not write is
never replaced (its other datasets would be lost)."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Collection, Mapping, Sequence

#: entries of a container folder that are its metadata, not datasets (zarr v2, v3, N5)
_METADATA = frozenset({".zgroup", ".zattrs", ".zmetadata", "zarr.json", "attributes.json"})


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
        return st.st_dev, st.st_ino
    except OSError:
        return None


def _is_array(folder: Path) -> bool:
    """A zarr (v2, v3) or N5 array: a folder whose metadata describes an array (chunks below it are not members)."""
    return ((folder / ".zarray").is_file() or '"array"' in _read(folder / "zarr.json")
            or '"dimensions"' in _read(folder / "attributes.json"))


def members(path: str | os.PathLike) -> list[str] | None:
    """The groups and datasets of an existing container, by path inside it (``"labels"``, ``"labels/mask"``,
    ``"labels/mask/s0"``): an HDF5 file's (all levels), a zarr or N5 folder's (folders down to the arrays; metadata
    files, hidden entries and chunks left out; another folder lists its entries, and a zarr array at ``path`` is
    one member, ``"(a zarr array)"``). None when ``path`` does not exist or is a file that is not HDF5."""
    path = Path(path)
    if path.is_dir():
        if _is_array(path):
            return ["(a zarr array)"]
        found, todo = [], [path]
        while todo:
            for entry in sorted(todo.pop().iterdir()):
                if entry.name in _METADATA or entry.name.startswith("."):
                    continue
                found.append(entry.relative_to(path).as_posix())
                if entry.is_dir() and not _is_array(entry):
                    todo.append(entry)
        return sorted(found)
    if not path.is_file():
        return None
    import h5py

    names: list[str] = []
    try:
        with h5py.File(path, "r") as f:
            f.visit(names.append)
    except OSError:
        return None
    return sorted(names)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def check_outputs(
    outputs: Mapping[str, Sequence[str | os.PathLike]], shared: Sequence[str | os.PathLike] = (), key: str = "output_dir",
    *, overwrite: bool | None = None, own: Sequence[str | os.PathLike] = (),
    datasets: Mapping[str | os.PathLike, Collection[str]] | None = None,
) -> None:
    """Refuse outputs that would replace an input, collide with each other or replace what they should not,
    before any work. The one check of every writer's outputs.

    Args:
        outputs: ``{input path: [its output paths]}`` for every input of the run.
        shared: outputs of the run as a whole (a report, an export), checked against the inputs only.
        key: the command-line key that chooses the outputs, for the message.
        overwrite: False: an existing output (file or folder) is refused unless it is in ``own``; True: it may be
            replaced; None: not checked here (a writer that replaces its own results, an evaluation's report).
        own: outputs the run may take up as its own without ``overwrite`` (a streaming store it resumes, the
            exports that store records having written).
        datasets: ``{container output: what this writer puts in such a file}`` (HDF5, zarr, N5), as paths inside
            it or ``fnmatch`` patterns (``"instances/*"``): an existing container holding anything else
            (:func:`members`) is refused whatever ``overwrite`` says, since replacing it would lose that.

    An output is refused when it is an input (the same path, through a symbolic link, or a hard
    link), lies inside an input (a zarr folder) or holds one (an output folder replaced as a
    whole), whatever ``overwrite`` says. Two inputs whose outputs have the same path (``a.png`` and
    ``a.tif`` both give ``probabilities/a.tif``) are refused too: one would silently replace the
    other; so are two outputs of one input, or of the run, on one path (a package and a TorchScript file).

    Raises:
        ValueError: an output that is (in) an input, written by two inputs or twice, naming them and what to do.
        FileExistsError: existing outputs without ``overwrite``, or a container holding other datasets.
    """
    real = {_real(i): Path(i) for i in outputs}  # one lookup per output, not one per (output, input) pair
    inodes = {n: Path(i) for i in outputs if (n := _inode(Path(i))) is not None}  # hard links
    holders = {parent: given for r, given in real.items() for parent in r.parents}
    writers: dict[Path, list[str]] = {}
    for source, targets in [*outputs.items(), ("", shared)]:
        seen: dict[Path, Path] = {}
        for target in map(Path, targets):
            real_out = _real(target)
            if real_out in seen:
                raise ValueError(f"outputs {seen[real_out]} and {target} of one run are the same file: one would replace "
                                 f"the other, so nothing was written. Give them different paths")
            seen[real_out] = target
            if source:
                writers.setdefault(real_out, []).append(str(source))
            given, how = real.get(real_out) or inodes.get(_inode(target) or (-1, -1)), "is"
            if given is None:
                given, how = next((real[p] for p in real_out.parents if p in real), None), "lies inside"
            if given is None:
                given, how = holders.get(real_out), "holds"
            if given is not None:
                linked = how == "is" and os.path.abspath(target) != os.path.abspath(given)
                raise ValueError(
                    f"output {target} {how} the input {given}{' (through a link)' if linked else ''}: "
                    f"writing it would destroy the input, so nothing was written (overwrite or not). "
                    f"Choose another --{key}"
                )
    clashes = {out: srcs for out, srcs in writers.items() if len(set(srcs)) > 1}
    if clashes:
        out, srcs = next(iter(clashes.items()))
        raise ValueError(
            f"{len(clashes)} output(s) would be written by more than one input, e.g. {out} by "
            f"{' and '.join(sorted(set(srcs)))}; nothing was written. Rename one of the inputs (outputs are named "
            f"after the input without its suffix), or predict them into separate --{key}s"
        )
    if overwrite is not None:
        _check_existing([t for ts in [*outputs.values(), shared] for t in ts], overwrite, own, datasets or {}, key)


def _check_existing(targets: Sequence[str | os.PathLike], overwrite: bool, own: Sequence[str | os.PathLike],
                    datasets: Mapping[str | os.PathLike, Collection[str]], key: str) -> None:
    for target, ours in datasets.items():
        foreign = [m for m in members(target) or () if not any(fnmatch.fnmatchcase(m, p) for p in ours)]
        foreign = [m for m in foreign if not any(m.startswith(f + "/") for f in foreign)]  # a group, not all it holds
        if foreign:
            shown = ", ".join(sorted(p.replace("[0-9]*", "<n>") for p in ours if not p.startswith("_") and not p.endswith("/*")))
            raise FileExistsError(
                f"{target} exists and holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}, which this run "
                f"does not write (it writes {shown}): replacing it would lose them, so nothing was written "
                f"(overwrite or not). Choose another {key}=<path>, or move the file"
            )
    mine = {_real(p) for p in own}
    taken = [str(t) for t in targets if os.path.lexists(t) and _real(t) not in mine]
    if taken and not overwrite:
        raise FileExistsError(f"{len(taken)} output file(s) exist already, e.g. {taken[:3]}; nothing was written. Pass "
                              f"overwrite=True to replace them, or choose another {key}=<path>")
