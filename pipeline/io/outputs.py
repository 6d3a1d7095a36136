"""Where outputs may go: no output replaces an input or another input's output (checked before any work)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
        return st.st_dev, st.st_ino
    except OSError:
        return None


def check_outputs(
    outputs: dict[str, Sequence[str | os.PathLike]], shared: Sequence[str | os.PathLike] = (), key: str = "output_dir"
) -> None:
    """Refuse outputs that would replace an input or collide with each other, before any work.

    Args:
        outputs: ``{input path: [its output paths]}`` for every input of the run.
        shared: outputs of the run as a whole (a report), checked against the inputs only.
        key: the command-line key that chooses the outputs, for the message.

    An output is refused when it is an input (the same path, through a symbolic link, or a hard
    link), lies inside an input (a zarr folder) or holds one (an output folder replaced as a
    whole), whatever ``overwrite`` says. Two inputs whose outputs have the same path (``a.png`` and
    ``a.tif`` both give ``probabilities/a.tif``) are refused too: one would silently replace the
    other.

    Raises:
        ValueError: naming the input(s) and output, and what to do.
    """
    real = {_real(i): Path(i) for i in outputs}  # one lookup per output, not one per (output, input) pair
    inodes = {n: Path(i) for i in outputs if (n := _inode(Path(i))) is not None}  # hard links
    holders = {parent: given for r, given in real.items() for parent in r.parents}
    writers: dict[Path, list[str]] = {}
    for source, targets in [*outputs.items(), ("", shared)]:
        for target in map(Path, targets):
            real_out = _real(target)
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
                    f"predicting would destroy the input, so nothing was written (overwrite or not). "
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
