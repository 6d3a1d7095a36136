"""Checks that the bundle configs run before any work starts.

MONAI's bundle CLI accepts any ``--key value``: a misspelt key (``--num_epoch 3``) silently
adds a new, unused entry and the run goes on with the default. :func:`check_cli_keys` catches
that; :func:`check_hyperparameters` rejects values outside their valid range;
:func:`check_writable_dir` fails before training or prediction when an output folder cannot
be written, instead of after the first epoch or the first image.

The configs call these in their ``initialize`` section, e.g.::

    initialize:
      - "$pipeline.config.check_cli_keys()"
      - "$pipeline.checks.check_hyperparameters(learning_rate=@learning_rate, num_epochs=@num_epochs)"
"""

from __future__ import annotations

import ast
import difflib
import json
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from pipeline import data, io
from pipeline.checks import optional
from pipeline.labels import check_label_mode, class_indices, instance_ids
from pipeline.losses import LOSSES, make_loss, output_channels
from pipeline.metrics.common import binary_foreground

logger = logging.getLogger(__name__)

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
    return [part.strip().strip("'\"") for part in text.strip("[]").split(",") if part.strip().strip("'\"")]


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


#: training keys that describe the network; inference and evaluation read it from the checkpoint instead
TRAINING_NETWORK_KEYS = ("features", "padding", "norm", "loss_name", "out_channels", "dropout")


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
        end_errors_with_their_cause()
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
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            if key in TRAINING_NETWORK_KEYS and "architecture" in known:
                hint = " (inference and evaluation build the network from the checkpoint's recorded architecture: drop it)"
            hints.append(f"--{key}{hint}")
        raise ValueError(
            f"unknown config key(s): {'; '.join(hints)}. Keys must name an entry of the config files "
            f"({', '.join(files) or 'none given'}); nested entries are written with '#', e.g. "
            "--train#dataloader#num_workers 2. To add a new key on purpose, put it in an overlay file."
        )


def _root_of(config_file: Any) -> str | None:
    """The bundle folder of a config file: the parent of its ``configs/`` folder (MONAI's layout), else its folder."""
    files = _config_files(config_file) if config_file else []
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


def innermost_cause(error: BaseException) -> BaseException:
    """The error at the bottom of ``error``'s chain of causes (MONAI wraps every config error in its own)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def end_errors_with_their_cause() -> None:
    """Make a failed ``python -m monai.bundle`` run print its cause as the last line.

    MONAI wraps every error of a config expression in ``RuntimeError: Failed to evaluate
    ConfigExpression ...`` followed by the expression, so the traceback's last lines hide the
    message that says what to fix. This wraps ``sys.excepthook`` (once): the traceback is printed as
    before, then ``error: <type>: <message>`` of the innermost cause. :func:`check_cli_keys`, the
    first check of every bundle config, calls it when this process is the bundle CLI.
    """
    previous = sys.excepthook
    if getattr(previous, "ends_with_cause", False):
        return

    def hook(kind, value, traceback) -> None:
        previous(kind, value, traceback)
        cause = innermost_cause(value)
        words = in_bundle_words(str(cause))
        if cause is not value or words != str(cause):
            print(f"\nerror: {type(cause).__name__}: {words}", file=sys.stderr)

    hook.ends_with_cause = True
    sys.excepthook = hook


#: library parameter -> bundle key, for the messages of library functions (which name their own parameters):
#: the one table between the two vocabularies. Names not listed are the same on both sides.
BUNDLE_KEYS = {"key": "input_key", "settings": "tile_settings", "sources": "input_path", "directory": "data_cache_dir"}
#: parameters a library message may name as ``name=value``, spelt ``--key value`` at the command line
PARAMETERS = (
    "fill_nan", "rgb_to_grey", "overwrite", "streaming", "skip_background", "overlay", "export", "allow_missing_chunks",
    "tiff_series", "threshold", "write", "instances", "tile_size", "block_size", "memory_budget_mb", "adapt_norm", "tta",
    "scheduler", "key", "normalize", "padding_mode", "batch_size", "context", "label_mode", "num_classes",
    "class_values", "loss_name", "spacing", "level", "image_key", "label_key", "directory", "architecture", "features",
    "padding", "norm", "checkpoint", "ckpt_file", "ckpt_dir", "init_from", "learning_rate", "optimizer_name",
    "output_dir", "package", "torchscript",
)
_PARAMETER = re.compile(r"(?<![\w\-.])(" + "|".join(PARAMETERS) + r")=(True|False|None|'[^']*'|\"[^\"]*\"|[^\s;,)]+)")
_VALUE = {"True": "true", "False": "false", "None": "null"}


def in_bundle_words(message: str) -> str:
    """A library message in the bundle's words: ``pass fill_nan=True`` -> ``pass --fill_nan true``
    (:data:`PARAMETERS`, renamed by :data:`BUNDLE_KEYS`).

    >>> in_bundle_words("pass fill_nan=True to predict around them; export='png'")
    'pass --fill_nan true to predict around them; --export png'
    >>> in_bundle_words("directory='/tmp/x' is a file; set tiff_series=None, or class_values=[0, 255] (level=N)")
    '--data_cache_dir /tmp/x is a file; set --tiff_series null, or --class_values [0, 255] (--level N)'
    """
    def spell(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        return f"--{BUNDLE_KEYS.get(name, name)} {_VALUE.get(value, value.strip(chr(39) + chr(34)))}"

    return _PARAMETER.sub(spell, message)


def check_spacing(spacing: Any, spatial_dims: int) -> None:
    """``--spacing``: None, or one positive number per axis of the network (``[z, y, x]`` for 3D), also accepted
    with one value more than a 2D network's axes (a stack's ``[z, y, x]``: its sections use ``[y, x]``).

    Raises:
        ValueError: naming the key, what was given and what is valid.
    """
    spacing = optional(spacing)
    if spacing is None:
        return
    values = list(spacing) if isinstance(spacing, (list, tuple)) else None
    ok = values is not None and len(values) in (spatial_dims, spatial_dims + 1 if spatial_dims == 2 else spatial_dims) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values)
    if not ok:
        axes = "[z, y, x]" if spatial_dims == 3 else "[y, x] (or a stack's [z, y, x])"
        raise ValueError(f"--spacing {spacing!r} must be {spatial_dims} positive numbers, the voxel size {axes} in one unit "
                         f"(spatial_dims is {spatial_dims}), e.g. [40, 4, 4] for 40 nm sections of 4 nm pixels")


def check_loss(loss_name: str, out_channels: int, label_mode: str = "binary", num_classes: int = 2, class_values: Any = None) -> None:
    """The training loss fits the labels (:func:`pipeline.labels.check_label_mode`) and the network's output
    channels (``num_classes`` for the soft-max losses, 1 for ``bce``).

    Raises:
        ValueError: an unknown ``--loss_name`` or ``--label_mode``, label settings that do not fit together, or
            ``--out_channels`` that does not fit, naming the value that does.
    """
    if loss_name not in LOSSES:
        raise ValueError(f"unknown loss {loss_name!r}; valid choices: {', '.join(LOSSES)} (--loss_name)")
    check_label_mode(label_mode, num_classes, loss_name, class_values)
    expected = output_channels(loss_name, num_classes)
    if out_channels != expected:
        raise ValueError(
            f"--loss_name {loss_name} with --num_classes {num_classes} needs {expected} output channel(s), but --out_channels "
            f"is {out_channels}; set --out_channels {expected} (or leave it to its default)"
        )
    make_loss(loss_name, out_channels)


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


# ---------------------------------------------------------------- runs
def check_datalists(**datalists: Any) -> None:
    """Evaluate a run's datalists before anything else is written and refuse an empty training list.

    Run first in training's checks: building a datalist reads (and checks) every image/label pair,
    or writes the synthetic default into a folder that :mod:`pipeline.synthetic` owns, so a bad
    dataset or a foreign ``--data_cache_dir`` fails before checkpoints or TensorBoard files exist.

    Raises:
        ValueError: a datalist that is not a list of items, one whose paths hold ``::`` (a ``#`` that
            MONAI rewrote, :func:`check_paths`; e.g. ``--dataset_dir d#1``), or an empty ``train`` list.
    """
    for name, items in datalists.items():
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, dict) for i in items):
            raise ValueError(f"{name}_datalist must be a list of {{'image': ..., 'label': ...}} items, got {type(items).__name__}")
        check_paths(**{f"{name}_datalist (a {key} path)": path for item in items[:1] for key, path in item.items() if isinstance(path, str)})
    if "train" in datalists and not datalists["train"]:
        raise ValueError("train_datalist is empty: there is nothing to train on; check --num_images / --num_val or the dataset keys")


def check_labels(
    datalist: Sequence[dict], mask_threshold: float | None = None, label_mode: str = "binary", num_classes: int = 2,
    class_values: Any = None,
) -> None:
    """Every label file (or container dataset) of a datalist reads by ``label_mode``'s rule, checked on the
    whole file before any output: binary masks by the one binarisation rule
    (:func:`pipeline.metrics.common.binary_foreground`; skipped with a ``--mask_threshold``, which binarises
    any values), instance ids by :func:`pipeline.labels.instance_ids`, classes by
    :func:`pipeline.labels.class_indices`. A bad value in one section would otherwise stop a run halfway,
    or pass unseen when no single section holds all values.

    Raises:
        ValueError: naming the label file, the values found, and the key to set.
    """
    if label_mode == "binary" and mask_threshold is not None:
        return
    seen = set()
    for item in datalist:
        if "label" not in item or (item["label"], item.get("label_dataset")) in seen:
            continue
        seen.add((item["label"], item.get("label_dataset")))
        array, meta = io.read_cached(item["label"], item.get("label_dataset"))
        array = io.channel_first(array, meta, item["label"])[0]  # a grey label saved as RGB: one channel
        if array.shape[0] > 1:
            raise ValueError(
                f"{item['label']}: the label has {array.shape[0]} channels that differ (a colour-coded mask?); save it "
                "as one channel of values (0 = background)"
            )
        try:
            if label_mode == "instances":
                instance_ids(array)
            elif label_mode == "classes":
                class_indices(array, num_classes, class_values)
            else:
                binary_foreground(array, "label")
        except ValueError as err:
            hint = ""
            if label_mode == "binary":
                many = np.issubdtype(array.dtype, np.integer)
                hint = ("; set --mask_threshold T (foreground = value > T), or --foreground_invert true if 0 is the foreground"
                        + ("; a label of object ids is --label_mode instances, one of classes --label_mode classes "
                           "--num_classes N" if many else ""))
            raise ValueError(f"{item['label']}: {err}{hint}" + (" (--label_mode binary)" if label_mode == "binary" else "")) from None
