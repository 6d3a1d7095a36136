"""Checks that the bundle configs run before any work starts.

MONAI's bundle CLI accepts any ``--key value``: a misspelt key (``--num_epoch 3``) silently
adds a new, unused entry and the run goes on with the default. :func:`check_cli_keys` catches
that; :func:`check_hyperparameters` rejects values outside their valid range;
:func:`check_writable_dir` fails before training or prediction when an output folder cannot
be written, instead of after the first epoch or the first image.

The configs call these in their ``initialize`` section, e.g.::

    initialize:
      - "$pipeline.config.check_cli_keys()"
      - "$pipeline.config.check_hyperparameters(learning_rate=@learning_rate, num_epochs=@num_epochs)"
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import yaml

#: options of ``python -m monai.bundle run`` itself, not config keys
BUNDLE_RUN_OPTIONS = frozenset(
    {"config_file", "meta_file", "logging_file", "init_id", "run_id", "final_id", "tracking", "args_file", "id", "runner_id"}
)


def _config_files(value: Any) -> list[str]:
    """``--config_file`` as MONAI accepts it: a path, a comma-separated list, or a list literal."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(text)]
        except (ValueError, SyntaxError):
            pass
    return [part.strip() for part in text.strip("[]").split(",") if part.strip()]


def _flat_keys(tree: Any, prefix: str = "") -> set[str]:
    """Every ``a#b#0`` path of a config tree, as MONAI's ``#`` ids spell them."""
    keys: set[str] = set()
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        path = f"{prefix}{key}"
        keys.add(path)
        keys |= _flat_keys(value, path + "#")
    return keys


def _read_config(path: str) -> dict:
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


def check_cli_keys(argv: Sequence[str] | None = None) -> None:
    """Raise if a ``--key`` of a ``python -m monai.bundle`` command names nothing in its configs.

    ``argv`` defaults to ``sys.argv`` when this process is the bundle CLI (otherwise, e.g. when a
    ``ConfigWorkflow`` is built in Python, there is nothing to check). Known keys are every id of
    every file in ``--config_file`` (``#`` paths included, e.g. ``train#dataloader#num_workers``),
    the ``--args_file``'s keys and the CLI's own options.

    Raises:
        ValueError: naming the unknown key(s), the closest known ones and the config files read.
    """
    if argv is None:
        if "monai" not in sys.argv[0] or "bundle" not in sys.argv[0]:
            return
        argv = sys.argv[1:]
    overrides = cli_overrides(argv)
    if "args_file" in overrides:
        overrides = {**_read_config(overrides["args_file"]), **overrides}
    files = _config_files(overrides.get("config_file", ""))
    known = set(BUNDLE_RUN_OPTIONS)
    for path in files:
        if Path(path).is_file():
            known |= _flat_keys(_read_config(path))
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        hints = []
        for key in unknown:
            same_depth = sorted(k for k in known if k.count("#") == key.count("#"))
            close = difflib.get_close_matches(key, same_depth, n=3, cutoff=0.6)
            hints.append(f"--{key}" + (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""))
        raise ValueError(
            f"unknown config key(s): {'; '.join(hints)}. Keys must name an entry of the config files "
            f"({', '.join(files) or 'none given'}); nested entries are written with '#', e.g. "
            "--train#dataloader#num_workers 2. To add a new key on purpose, put it in an overlay file."
        )


def _check(name: str, value: Any, low: float | None, high: float | None, low_open: bool, high_open: bool, integer: bool) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        return f"{name}={value!r} must be {'an integer' if integer else 'a number'}"
    if math.isnan(value) or math.isinf(value):
        return f"{name}={value!r} must be finite"
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if lo_ok and hi_ok:
        return None
    lo = "-inf" if low is None else low
    hi = "inf" if high is None else high
    return f"{name}={value!r} is out of range; valid: {'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"


#: name: (low, high, low_open, high_open, integer)
RANGES: dict[str, tuple] = {
    "learning_rate": (0, None, True, False, False),
    "momentum": (0, 1, False, True, False),
    "num_epochs": (1, None, False, False, True),
    "batch_size": (1, None, False, False, True),
    "val_interval": (1, None, False, False, True),
    "ckpt_interval": (1, None, False, False, True),
    "log_interval": (1, None, False, False, True),
    "dropout": (0, 1, False, True, False),
    "lr_power": (0, None, False, False, False),
    "elastic_prob": (0, 1, False, False, False),
    "elastic_sigma": (0, None, False, False, False),
    "weight_w0": (0, None, False, False, False),
    "weight_sigma": (0, None, True, False, False),
    "num_workers": (0, None, False, False, True),
    "n_workers": (1, None, False, False, True),
    "threads_per_worker": (1, None, False, False, True),
    "threshold": (0, 1, False, False, False),
    "num_val": (0, None, False, False, True),
    "num_images": (1, None, False, False, True),
}


def check_hyperparameters(**values: Any) -> None:
    """Raise ``ValueError`` listing every value outside its range in :data:`RANGES` (``None`` is skipped).

    >>> check_hyperparameters(learning_rate=-0.01)
    Traceback (most recent call last):
    ValueError: invalid hyper-parameter(s): learning_rate=-0.01 is out of range; valid: (0, inf]
    """
    errors = []
    for name, value in values.items():
        if name not in RANGES:
            raise KeyError(f"no range is defined for {name!r}; known: {', '.join(RANGES)}")
        error = _check(name, value, *RANGES[name])
        if error:
            errors.append(error)
    if errors:
        raise ValueError("invalid hyper-parameter(s): " + "; ".join(errors))


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


def check_streaming_options(streaming: bool, **options: bool) -> None:
    """Refuse options that block-by-block streaming prediction does not apply (``tta``, ``adapt_norm``)."""
    on = [k for k, v in options.items() if v]
    if streaming and on:
        raise ValueError(
            f"{', '.join(on)} cannot be used with streaming: true (block-by-block prediction into zarr "
            f"does not apply {'it' if len(on) == 1 else 'them'}); set {' and '.join(k + ' false' for k in on)}, "
            "or streaming false to predict in memory"
        )
