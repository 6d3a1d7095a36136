"""What is about the bundle's config files themselves, checked before any work starts.

MONAI's bundle CLI accepts any key of an overlay file: a misspelt one (``num_epoch: 3``) silently adds a new,
unused entry and the run goes on with the default; :func:`check_overlay_keys` catches that (and
:func:`pipeline.cli.check_cli_keys`, with it, the keys of the command line). :func:`bundle_root`
finds the bundle's folder from the config file given; :func:`check_paths` refuses paths MONAI's parser
rewrote; :func:`check_writable_dir` fails before training or prediction when an output folder cannot be
written. Value ranges and booleans are :mod:`pipeline.checks`'; the checks of a run's data are
:mod:`pipeline.data`'s; how errors are printed at the command line is :mod:`pipeline.cli`'s.
"""

from __future__ import annotations

import ast
import difflib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

logger = logging.getLogger(__name__)

#: options of ``python -m monai.bundle run`` itself, not config keys
BUNDLE_RUN_OPTIONS = frozenset(
    {"config_file", "meta_file", "logging_file", "init_id", "run_id", "final_id", "tracking", "args_file", "id", "runner_id"}
)


def config_file_list(value: Any) -> list[str]:
    """``--config_file`` as MONAI accepts it: a path, a comma-separated list, or a list literal."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return [part.strip().strip("'\"") for part in text.strip("[]").split(",") if part.strip().strip("'\"")]


def flat_keys(tree: Any, prefix: str = "") -> set[str]:
    """Every ``a#b#0`` path of a config tree, as MONAI's ``#`` ids spell them."""
    keys: set[str] = set()
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        path = f"{prefix}{key}"
        keys.add(path)
        keys |= flat_keys(value, path + "#")
    return keys


def read_config(path: str) -> dict:
    text = Path(path).read_text()
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    return data if isinstance(data, dict) else {}


def cli_overrides(argv: Sequence[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs of a ``monai.bundle`` command line (after the command)."""
    out: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            out[key.replace("-", "_")] = value  # fire, behind the bundle CLI, reads --a-b as a_b
        i += 1
    return out


_REFERENCE = re.compile(r"[@%]([A-Za-z_][\w#]*)")


def _references(tree: Any) -> set[str]:
    """The ids a config tree refers to (``@id``, ``@a#b``, ``%id``) and their leading parts."""
    found: set[str] = set()
    if isinstance(tree, str):
        for ref in _REFERENCE.findall(tree):
            parts = ref.split("#")
            found |= {"#".join(parts[: i + 1]) for i in range(len(parts))}
    elif isinstance(tree, dict):
        for value in tree.values():
            found |= _references(value)
    elif isinstance(tree, list):
        for value in tree:
            found |= _references(value)
    return found


def check_overlay_keys(config_files: Sequence[str | os.PathLike]) -> None:
    """Refuse a key of an overlay file (a config file after the first) that names nothing: not an entry of any
    config of the bundle (the first file's folder: train, inference, evaluate, ... -- an overlay may serve them
    all), nor of an earlier file, nor an id that one of the files uses (``@key``). A misspelt key
    (``num_epoch: 1``) would otherwise add an unused entry and the run would go on with the default.

    Raises:
        ValueError: naming the overlay, its unknown key(s) and the closest known ones.
    """
    files = [str(f) for f in config_files if Path(f).is_file()]
    if len(files) < 2:
        return
    folder = Path(files[0]).parent
    bundle = [f for f in sorted(folder.glob("*.yaml")) + sorted(folder.glob("*.json")) if not f.name.endswith("metadata.json")]
    trees = {f: read_config(f) for f in files}
    known = set(BUNDLE_RUN_OPTIONS).union(*(flat_keys(read_config(str(f))) for f in bundle), *map(_references, trees.values()))
    for path in files[1:]:
        unknown = [k for k in trees[path] if str(k) not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), sorted(k for k in known if k.count("#") == str(key).count("#")), n=3, cutoff=0.6)
                hints.append(f"{key}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ValueError(
                f"{path}: unknown key(s): {'; '.join(hints)}. A key of an overlay must name an entry of the bundle's "
                f"configs ({folder}) or be used by the configs (@key); nothing was run"
            )
        known |= flat_keys(trees[path])


def _root_of(config_file: Any) -> str | None:
    """The bundle folder of a config file: the parent of its ``configs/`` folder (MONAI's layout), else its folder."""
    files = config_file_list(config_file) if config_file else []
    if not files:
        return None
    folder = Path(files[0]).parent
    return str(folder.parent if folder.name == "configs" else folder)


def bundle_root(default: str = "bundles/em_unet") -> str:
    """The bundle's folder, found from the config file MONAI was given, so a bundle runs from any working
    directory and when copied out of this repository (``bundle_root`` of the configs).

    MONAI gives a config no path of its own; this reads it from the caller: the ``ConfigWorkflow`` being
    run (``python -m monai.bundle run``, :mod:`pipeline.cli`), else the ``config_file`` of a
    ``monai.bundle`` function on the stack (``ckpt_export``, ``verify_net_in_out``), else ``--config_file`` of
    ``sys.argv``. The first config file decides: ``x/configs/train.yaml`` -> ``x``; relative stays relative,
    so ``bundles/em_unet/configs/train.yaml`` from the repository root gives ``bundles/em_unet`` as before.
    ``default`` when none is found (a ``ConfigParser`` built by hand). ``--bundle_root`` overrides it all.
    """
    import inspect

    from monai.bundle import ConfigWorkflow

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")  # (a ConfigParser's getattr would resolve config ids: only workflows)
            root = owner.config_root_path if isinstance(owner, ConfigWorkflow) else None
            if root is not None:
                root = Path(root)
                return str(root.parent if root.name == "configs" else root)
            if frame.f_globals.get("__name__", "").startswith("monai.bundle"):
                for name in ("config_file_", "config_file"):
                    found = _root_of(frame.f_locals.get(name))
                    if found:
                        return found
            frame = frame.f_back
    finally:
        del frame
    found = _root_of(cli_overrides(sys.argv[1:]).get("config_file")) if "monai" in sys.argv[0] else None
    return found or default


def check_writable_dir(*paths: str | os.PathLike | None) -> None:
    """Fail early unless each folder exists and is writable, or could be created.

    Nothing is created: the folder (or, when it does not exist yet, its nearest existing
    ancestor) is proved writable with a temporary file that is removed again, so a run that
    fails later leaves no empty output folder behind.

    Raises:
        NotADirectoryError: the path, or one of its ancestors, is a file.
        PermissionError: the folder (or the ancestor it would be created in) cannot be written.
    """
    for path in paths:
        if path is None:
            continue
        folder = Path(path).absolute()
        probe = folder
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise NotADirectoryError(
                f"output folder {str(path)!r} cannot be used: {str(probe)!r} is a file, not a folder; choose another folder"
            )
        try:
            with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-test-"):
                pass
        except OSError as err:
            where = "" if probe == folder else f" (it would be created in {str(probe)!r})"
            raise PermissionError(
                f"output folder {str(path)!r} is not writable{where}: {err.strerror}; choose a folder you can write to"
            ) from None


# ---------------------------------------------------------------- paths
def check_paths(**paths: Any) -> None:
    """Refuse path keys that MONAI's bundle parser has silently changed.

    The parser rewrites ``#`` in *every* config value to ``::`` (``#`` is its old id separator:
    ``monai.bundle.ReferenceResolver.normalize_id``), so ``--ckpt_dir exp#2/models`` would
    write to ``exp::2/models``. A path holding ``::`` is therefore refused (``None`` is skipped).

    Raises:
        ValueError: naming the key, the path as the parser left it, and what to do.
    """
    bad = [f"--{key} {str(p)!r}" for key, p in paths.items() if p is not None and "::" in str(p)]
    if bad:
        raise ValueError(
            f"path(s) {', '.join(bad)} contain '::': MONAI's bundle parser rewrites '#' in config values to "
            "'::' (its id separator), so a path typed with '#' would silently become another path. Use paths "
            "without '#' (or '::'): rename the folder or file, e.g. with '-' in place of '#'"
        )
