"""``em-unet``: the bundle's workflows as a command line for people.

::

    em-unet train --config quickstart                         # = python -m monai.bundle run training --config_file "[train.yaml, quickstart.yaml]"
    em-unet predict stack.tif --model models/model.pt -o out/ # = ... run --config_file inference.yaml --input_path ... --checkpoint ... --output_dir ...
    em-unet evaluate --model models/model.pt --images v.tif --labels l.tif
    em-unet export --model models/model.pt -o export/ [--format bioimageio|torchscript|both]
    em-unet predict --help                                    # every key of the configs, with its meaning and default

Each ``--key value`` is the bundle key of that name, parsed as ``python -m monai.bundle`` parses it (``fire``);
``--set id=value`` reaches nested ids (``--set train#dataloader#num_workers=2``). The command builds the same
config files and overrides and hands them to ``monai.bundle.run`` (MONAI's ``ConfigWorkflow``): no workflow
logic lives here. ``--config NAME`` merges an overlay (``configs/NAME.yaml`` of the repository, or a path) and
its metadata fragment. The bundle is the one beside this package (``bundles/em_unet``), or ``$EM_UNET_BUNDLE``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.config import BUNDLE_RUN_OPTIONS, config_file_list, flat_keys, read_config, check_overlay_keys, cli_overrides

#: command -> (the bundle config, its run id, what it does)
COMMANDS = {
    "train": ("train.yaml", "training", "train a U-Net (python -m monai.bundle run training)"),
    "predict": ("inference.yaml", "run", "predict images, stacks or folders by overlap-tile inference"),
    "evaluate": ("evaluate.yaml", "run", "score a checkpoint on labelled images (ISBI 2012 metrics)"),
    "export": ("export.yaml", "run", "export a checkpoint as a bioimage.io package and/or TorchScript"),
}
#: ``em-unet export --format`` -> the run id of export.yaml
EXPORT_FORMATS = {"both": "run", "bioimageio": "export_bioimageio", "torchscript": "export_torchscript"}
#: config entries that are workflow parts, not settings
NOT_OPTIONS = {"imports", "initialize", "run", "finalize", "checks", "flags", "training"}


def bundle_dir() -> Path:
    """The bundle folder: ``$EM_UNET_BUNDLE``, else ``bundles/em_unet`` beside this package (a source checkout
    or an editable install)."""
    env = os.environ.get("EM_UNET_BUNDLE")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "bundles" / "em_unet"


def overlay_path(name: str) -> Path:
    """An overlay by path, or by name from the repository's ``configs/`` (``quickstart`` -> ``configs/quickstart.yaml``).

    Raises:
        FileNotFoundError: neither exists; the message lists the shipped overlays.
    """
    path = Path(name)
    if path.is_file():
        return path
    shipped = bundle_dir().parents[1] / "configs"
    candidate = shipped / (name if name.endswith((".yaml", ".json")) else name + ".yaml")
    if candidate.is_file():
        return candidate
    names = sorted(p.stem for p in shipped.glob("*.yaml"))
    raise FileNotFoundError(f"--config {name!r}: no such file, and no overlay of that name in {shipped} "
                            f"(shipped: {', '.join(names) or 'none'})")


def _comment(value: str) -> tuple[str, str]:
    """Split ``value   # comment`` outside quotes."""
    quote = None
    for i, ch in enumerate(value):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or value[i - 1] in " \t"):
            return value[:i].rstrip(), value[i + 1:].strip()
    return value.rstrip(), ""


def config_keys(path: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """Top-level keys of a config file that are settings: ``{key: (default as written, comment)}``.

    The comment is the key line's trailing ``# ...`` plus the indented comment lines right below it.
    Workflow parts (components with ``_target_``, lists of expressions, ``imports``, ``checks``, ...) are left out.
    """
    text = Path(path).read_text()
    tree = yaml.safe_load(text) or {}
    lines = text.splitlines()
    out: dict[str, tuple[str, str]] = {}
    for i, line in enumerate(lines):
        if not line or line[0] in " #-" or ":" not in line:
            continue
        key, _, rest = line.partition(":")
        if key not in tree or key in NOT_OPTIONS:
            continue
        value = tree[key]
        if isinstance(value, dict) and "_target_" in value:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) or (isinstance(v, str) and v[:1] in "$@") for v in value):
            continue
        if isinstance(value, dict) and any(isinstance(v, dict) and "_target_" in v for v in value.values()):
            continue
        default, comment = _comment(rest.strip())
        notes = [comment] if comment else []
        for more in lines[i + 1:]:
            if more.startswith(" ") and more.strip().startswith("#"):
                notes.append(more.strip()[1:].strip())
            else:
                break
        if not notes:  # the comment block right above the key (not a "# ---- section" header)
            above = []
            for prev in reversed(lines[:i]):
                if not prev.startswith("#") or prev.startswith("# ---"):
                    break
                above.insert(0, prev[1:].strip())
            notes = above
        out[key] = (_show_default(default) if default else "(empty)", " ".join(notes))
    return out


def _show_default(default: str) -> str:
    """A default as a person reads it: ``$@bundle_root + '/models'`` -> ``<bundle_root>/models``; other
    expressions are marked as computed."""
    import re

    text = default.strip('"')
    match = re.fullmatch(r"\$@(\w+) \+ '([^']*)'", text)
    if match:
        return f"<{match[1]}>{match[2]}"
    return f"computed: {text[1:]}" if text.startswith("$") else default


def _parse_value(value: str) -> Any:
    """As ``python -m monai.bundle`` (``fire``) parses a ``--key value``: Python literals, else the string."""
    from fire.parser import DefaultParseValue

    return DefaultParseValue(value)


def _resolve(command: str, overlays: Sequence[str]) -> list[str]:
    files = [str(bundle_dir() / "configs" / COMMANDS[command][0])]
    return files + [str(overlay_path(o)) for o in overlays]


def build_parser(command: str, config_files: Sequence[str]) -> argparse.ArgumentParser:
    """The parser of one command: its own options and one ``--key`` per setting of ``config_files`` (later files
    give the default shown), with the key's comment as help."""
    parser = argparse.ArgumentParser(
        prog=f"em-unet {command}", allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{COMMANDS[command][2]}.\nConfigs: {', '.join(config_files)}\n"
                    "Each --key is the bundle key of that name (values as python -m monai.bundle parses them; "
                    "booleans true/false).",
    )
    parser.add_argument("--config", action="append", default=[], metavar="OVERLAY",
                        help="merge an overlay after the bundle config: a path or a name of configs/ (quickstart, em_cpu, "
                             "isbi2012, em3d, seed_variant, ...); repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="ID=VALUE",
                        help="any config id, nested ones with '#': --set train#dataloader#num_workers=2")
    parser.add_argument("--traceback", action="store_true", help="print the full traceback of an error")
    if command == "predict":
        parser.add_argument("input_path", nargs="?", default=argparse.SUPPRESS,
                            help="an image, stack, container or folder (bundle key input_path; none: a synthetic stack)")
    if command == "export":
        parser.add_argument("--format", choices=sorted(EXPORT_FORMATS), default="both",
                            help="what to write: the bioimage.io package, the TorchScript file, or both (the run id of export.yaml)")
    keys: dict[str, tuple[str, str]] = {}
    for path in config_files:
        for key, (default, comment) in config_keys(path).items():
            keys[key] = (default, comment or (keys.get(key) or ("", ""))[1])
    group = parser.add_argument_group("bundle keys")
    aliases = {"checkpoint": ["--model"], "output_dir": ["-o"]} if command != "train" else {}
    for key, (default, comment) in keys.items():
        if key == "input_path" and command == "predict":
            continue
        hidden = default.startswith(("computed", "@")) and not comment and key not in aliases
        help_text = argparse.SUPPRESS if hidden else f"{comment} (default: {default})" if comment else f"(default: {default})"
        group.add_argument(f"--{key}", *aliases.get(key, []), dest=key, default=argparse.SUPPRESS, metavar="VALUE",
                           help=help_text.replace("%", "%%") if help_text is not argparse.SUPPRESS else help_text)
    parser.set_defaults(_keys=sorted(keys))
    return parser


def parse(argv: Sequence[str]) -> tuple[str, str, list[str], list[str], dict[str, Any], bool]:
    """``(command, run_id, config_files, meta_files, overrides, traceback)`` of an ``em-unet`` command line.

    Raises:
        SystemExit: ``--help``, or a usage error (unknown command or key, with the closest keys).
    """
    from pipeline.export import bundle_metadata

    top = argparse.ArgumentParser(prog="em-unet", description=__doc__.split("\n\n")[0] + " Commands: " + ", ".join(
        f"{c} ({d[2]})" for c, d in COMMANDS.items()) + ". `em-unet COMMAND --help` lists its keys.")
    top.add_argument("command", choices=sorted(COMMANDS))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top.parse_args(list(argv[:1]) or ["--help"])
    command, rest = argv[0], list(argv[1:])
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", action="append", default=[])
    known, _ = pre.parse_known_args(rest)
    try:
        files = _resolve(command, known.config)
        check_overlay_keys(files)  # as python -m monai.bundle does (check_cli_keys)
    except (FileNotFoundError, ValueError) as err:
        top.error(str(err))
    parser = build_parser(command, files)
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        options = [o for a in parser._actions for o in a.option_strings]
        hints = []
        for u in [u for i, u in enumerate(unknown) if u.startswith("-") or i == 0 or not unknown[i - 1].startswith("-")]:
            close = difflib.get_close_matches(u.split("=")[0], options, n=3, cutoff=0.6) if u.startswith("-") else []
            hints.append(u + (f" (did you mean {', '.join(close)}?)" if close else ""))
        parser.error("unknown argument(s): " + "; ".join(hints) + f". `em-unet {command} --help` lists the keys")
    values = vars(args)
    overrides = {k: _parse_value(values[k]) for k in values.pop("_keys") if k in values}
    if "input_path" in values:
        overrides["input_path"] = values["input_path"]
    for item in values["set"]:
        key, eq, value = item.partition("=")
        if not eq or not key:
            parser.error(f"--set {item!r}: write ID=VALUE, e.g. --set train#dataloader#num_workers=2")
        overrides[key] = _parse_value(value)
    run_id = COMMANDS[command][1]
    if command == "export":
        run_id = EXPORT_FORMATS[values["format"]]
        overrides.setdefault("config_files", [str(bundle_dir() / "configs" / "inference.yaml")] + files[1:])
    metas = bundle_metadata(files)[1]
    return command, run_id, files, metas, overrides, values["traceback"]


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
        overrides = {**read_config(overrides["args_file"]), **overrides}
    files = config_file_list(overrides.get("config_file", ""))
    check_overlay_keys(files)
    known = set(BUNDLE_RUN_OPTIONS)
    for path in files:
        if Path(path).is_file():
            known |= flat_keys(read_config(path))
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
            "--train#dataloader#num_workers 2. To add a new key on purpose, put it in an overlay file that uses it (@key)."
        )


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
    "out_channels", "fill_nan", "rgb_to_grey", "overwrite", "streaming", "skip_background", "overlay", "export", "allow_missing_chunks",
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``em-unet``; returns the exit status (0, or 1 after an error, whose innermost cause is printed last)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command, run_id, files, metas, overrides, show_traceback = parse(argv)
    from monai.bundle import run

    logging_file = Path(files[0]).parent / "logging.conf"
    try:
        run(run_id=run_id, config_file=files, meta_file=metas,
            logging_file=str(logging_file) if logging_file.is_file() else None, **overrides)
    except Exception as err:  # noqa: BLE001 - a person reads the cause, not MONAI's wrapper
        cause = innermost_cause(err)
        if show_traceback:
            traceback.print_exc()
        print(f"em-unet {command}: error: {type(cause).__name__}: {in_bundle_words(str(cause))}", file=sys.stderr)
        if not show_traceback:
            print("(--traceback shows where)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
