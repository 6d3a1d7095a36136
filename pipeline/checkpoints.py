"""Checkpoints: reading them safely, checking them against a network, saving, and resuming.

- :func:`read_checkpoint` / :func:`load_checkpoint` / :func:`check_state_dict`: ``torch.load`` with
  ``weights_only=True``, errors that name the file; the network's recorded architecture
  (:meth:`pipeline.networks.UNet.get_extra_state`), parameter shapes and finite weights;
  :func:`load_weights_only`, the one rule for every weights file read, also :func:`load_bioimageio`'s (a
  bioimage.io package of this pipeline as the network it holds, no code of the package run).
- :class:`CheckpointSaver`: MONAI's saver, made atomic (save before remove), refusing non-finite
  values, and writing the final checkpoint only when a run completes.
- :func:`latest_checkpoint` / :func:`check_resume`: which checkpoint ``resume: true`` reads, and
  whether it fits the run.
- :func:`init_weights` / :data:`PRETRAINED`: ``init_from``, training that starts from shipped
  pretrained weights or from another run's checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path
from typing import IO, Any

import torch
from monai.handlers import CheckpointSaver as _MonaiCheckpointSaver

from pipeline.checks import optional
from pipeline.networks import UNet

#: what to do when a checkpoint does not fit the network built for it
ARCHITECTURE_ADVICE = (
    "Training (resume): use the training run's network (the same overlay, or features=..., padding=..., norm=..., "
    "loss_name=... as in training). Inference, evaluation, ckpt_export: the network is the checkpoint's own record; "
    "set architecture=None (ckpt_export: checkpoint=F with ckpt_file=F, the same file F)"
)


def read_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or non-PyTorch file; a file holding Python objects other than
            tensors and plain containers (refused: unpickling them could run code).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; train first (python -m monai.bundle run training ...) "
            "or pass the file as checkpoint=<file>"
        )
    return load_weights_only(path, f"checkpoint {str(path)!r}", holds="it holds",
                             fix="Re-save only the weights: torch.save(model.state_dict(), path)",
                             unreadable="it is truncated or not a PyTorch checkpoint",
                             retry="copy it again or pass another file as checkpoint=<file>")


def load_weights_only(source: str | os.PathLike | IO[bytes], what: str, *, holds: str, fix: str, unreadable: str,
                      retry: str) -> Any:
    """The one rule for every weights file this project reads (checkpoints; bioimage.io packages,
    :func:`load_bioimageio`): ``torch.load(source, map_location="cpu", weights_only=True)``, so
    nothing but tensors and plain containers is ever unpickled, and a file holding anything else is refused, never
    loaded with ``weights_only=False`` (that would run whatever code the file names).

    Args:
        source: a path or a binary stream.
        what: the file as the errors name it (``"checkpoint 'model.pt'"``).
        holds: the subject of the refusal (``"it holds"``).
        fix: the sentence that ends the refusal.
        unreadable: what a truncated or non-PyTorch file is (``"it is truncated or not a PyTorch checkpoint"``).
        retry: what to do then.

    Raises:
        ValueError: ``"refusing to load {what}: {holds} Python objects other than tensors and plain containers, and
            unpickling them could run arbitrary code (...). {fix}"``; ``"{what} cannot be read: {unreadable}
            (torch's reason); {retry}"``.
    """
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"refusing to load {what}: {holds} Python objects other than tensors and plain containers, and unpickling "
            f"them could run arbitrary code (torch.load weights_only=True refused it). {fix}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{what} cannot be read: {unreadable} ({str(err).splitlines()[0]}); {retry}") from None


def model_state(state: Any, key: str = "model") -> Any:
    """The network's weights in what :func:`read_checkpoint` returned: ``state[key]`` of a resume checkpoint
    (``{"model": ..., "optimizer": ..., ...}``), else the state itself (a plain ``state_dict``)."""
    return state[key] if isinstance(state, dict) and isinstance(state.get(key), dict) else state


def load_checkpoint(network: torch.nn.Module, path: str | os.PathLike, key: str = "model") -> torch.nn.Module:
    """Load a checkpoint's weights into ``network`` strictly, with ``torch.load(weights_only=True)``.

    Accepts a bare ``state_dict`` (``model.pt``, ``model_final.pt``) or a resume checkpoint holding
    it under ``key``. Every way this can go wrong gets an error that names the file and what to do
    (:func:`read_checkpoint`, :func:`check_state_dict`):

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated or non-PyTorch file; a file holding Python objects other than
            tensors (refused: unpickling them could run code); a checkpoint of another architecture
            (the recorded settings that differ, or the mismatching parameters and their shapes);
            non-finite weights.
    """
    state = model_state(read_checkpoint(path), key)
    check_state_dict(network, state, path)
    network.load_state_dict(state)
    return network


def network_from_checkpoint(path: str | os.PathLike, architecture: dict | None = None, key: str = "model") -> torch.nn.Module:
    """Build the :class:`pipeline.networks.UNet` a checkpoint was trained as, and load its weights.

    The architecture (spatial dims, channels, features, padding, norm, convolutions per level,
    kernel size) is the record every ``UNet.state_dict()`` carries (``_extra_state``), so inference
    and evaluation need no network keys. ``architecture`` (``UNet``'s arguments) is for checkpoints
    saved without that record; given with a checkpoint that has one, the two must agree.

    ``path`` may also be a bioimage.io package exported by this pipeline (a ``.zip``, its ``rdf.yaml`` /
    ``bioimageio.yaml`` or unpacked folder: :func:`load_bioimageio`).

    Returns:
        The network in eval mode, weights loaded (as :func:`load_checkpoint` checks them).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_checkpoint`; no architecture recorded or given;
            an ``architecture`` that is not a dict of ``UNet``'s arguments.
    """
    if Path(path).exists() and is_bioimageio(path):
        network = load_bioimageio(path)
        diff = network.architecture_diff({"architecture": architecture}) if architecture is not None else []
        if diff:
            raise ValueError(f"bioimage.io package {str(path)!r} holds another architecture than the architecture given "
                             f"({'; '.join(diff)}); set architecture=None")
        return network
    state = model_state(read_checkpoint(path), key)
    extra = state.get("_extra_state") if isinstance(state, dict) else None
    recorded = extra.get("architecture") if isinstance(extra, dict) else None
    if architecture is None and recorded is None:
        raise ValueError(
            f"checkpoint {str(path)!r} records no architecture (saved by an older version or not from "
            "pipeline.networks.UNet); give the training run's network, e.g. "
            "architecture={'features': [16, 32, 64, 128, 256], 'padding': 'valid', 'norm': None, 'out_channels': 2}"
        )
    settings = recorded if architecture is None else architecture
    if not isinstance(settings, dict):
        raise ValueError(f"architecture must be a dict of pipeline.networks.UNet's arguments, got {settings!r}")
    try:
        network = UNet(**{**settings, "dropout": 0.0})  # dropout: no weight, no effect in eval mode
    except TypeError as err:
        raise ValueError(f"architecture {settings} is not a set of pipeline.networks.UNet's arguments: {err}") from None
    check_state_dict(network, state, path)  # a given architecture is checked against the record too
    network.load_state_dict(state)
    return network.eval()


def is_bioimageio(path: str | os.PathLike) -> bool:
    """A bioimage.io package: a ``.zip``, a ``rdf.yaml`` / ``bioimageio.yaml`` file, or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        return any((path / n).is_file() for n in ("rdf.yaml", "bioimageio.yaml"))
    return path.suffix == ".zip" or path.name.endswith(("rdf.yaml", "bioimageio.yaml"))


def load_bioimageio(source: str | os.PathLike) -> UNet:
    """Read a bioimage.io package of this architecture (:func:`pipeline.bioimageio.export_bioimageio`) back as the
    :class:`pipeline.networks.UNet` it holds (logits, eval mode), for the bundle's inference.

    No code from the package runs: the architecture must be ``pipeline.export.ProbabilityUNet`` (:mod:`pipeline.export`'s),
    the U-Net is built here from its recorded arguments, and its ``pytorch_state_dict`` weights are read with
    ``torch.load(weights_only=True)`` (:func:`load_weights_only`, the rule of checkpoints) and checked as a checkpoint is
    (:func:`check_state_dict`: architecture, shapes, finite values).

    Raises:
        ValueError: naming the package: not a valid bioimage.io model description (``bioimageio.spec``'s message);
            no ``pytorch_state_dict`` weights (a TorchScript-only package) or weights of another architecture (run
            those with ``bioimageio.core``); weights that are missing, truncated, not a PyTorch file, altered (their
            sha256 differs from the recorded one), of Python objects other than tensors (a pickled model or any
            other object: refused, since unpickling them could run arbitrary code), or that do not fit the
            recorded architecture.
    """
    import hashlib
    import io

    from bioimageio.spec import InvalidDescr, load_model_description
    from bioimageio.spec.utils import download

    package = f"bioimage.io package {str(source)!r}"
    descr = load_model_description(str(source), perform_io_checks=False)
    if isinstance(descr, InvalidDescr):
        raise ValueError(f"{str(source)!r} is not a valid bioimage.io model: {descr.validation_summary.format()}")
    weights = descr.weights.pytorch_state_dict
    if weights is None:
        others = [f for f, w in descr.weights if w is not None]
        raise ValueError(
            f"{package} holds no pytorch_state_dict weights (only {', '.join(others) or 'none'}): the bundle rebuilds the "
            "U-Net from pytorch_state_dict weights of pipeline.export.ProbabilityUNet; run this package with "
            "bioimageio.core (bioimageio predict), or export the checkpoint again (em-unet export)")
    arch = getattr(weights, "architecture", None)
    where = (getattr(arch, "import_from", None), str(getattr(arch, "callable", "")))
    if where != ("pipeline.export", "ProbabilityUNet"):
        raise ValueError(
            f"{package} holds no pytorch_state_dict weights of pipeline.export.ProbabilityUNet (found "
            f"{where[0]}.{where[1]}): only packages exported by this pipeline load into the bundle; run others with "
            "bioimageio.core (bioimageio predict)")
    kwargs = dict(arch.kwargs)
    try:
        network = UNet(**{**kwargs, "dropout": 0.0})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{package} records architecture arguments {kwargs} that pipeline.networks.UNet does not take: "
                         f"{err}") from None
    name = f"its pytorch_state_dict weights ({weights.source})"
    located = weights.source.absolute() if hasattr(weights.source, "absolute") else weights.source  # in the zip or folder
    try:
        if hasattr(located, "exists") and not located.exists():  # bioimageio.spec 0.5.12 fails on a missing zip member
            raise FileNotFoundError(str(weights.source))
        data = download(weights.source, sha256=None).read()  # the checksum is compared below, after the safe load
    except OSError as err:
        raise ValueError(f"{package} cannot be read: {name} are missing ({type(err).__name__}: {err}); copy the package "
                         "again or export it again (em-unet export)") from None
    state = load_weights_only(
        io.BytesIO(data), package, holds=f"{name} are not a plain state dict (tensors by name): they hold",
        fix="Export the package again from its checkpoint (em-unet export, pipeline.bioimageio.export_bioimageio); run a "
            "package from elsewhere with bioimageio.core",
        unreadable=f"{name} are truncated or not a PyTorch file", retry="copy the package again or export it again")
    if weights.sha256 is not None and hashlib.sha256(data).hexdigest() != weights.sha256:
        raise ValueError(f"{package} cannot be read: {name} are not the ones it was written with (their sha256 differs "
                         "from the one it records): altered or copied incompletely; copy the package again or export it again")
    if isinstance(state, dict) and state and all(isinstance(k, str) and k.startswith("unet.") for k in state):
        state = {k[len("unet."):]: v for k, v in state.items()}  # ProbabilityUNet's state_dict is the UNet's under unet.
    check_state_dict(network, state, source)
    network.load_state_dict(state)
    return network.eval()


def check_state_dict(network: torch.nn.Module, state: Any, path: str | os.PathLike) -> None:
    """Check, without loading, that the ``state_dict`` read from ``path`` fits ``network``.

    In this order: a state_dict of tensors (plus the network's ``_extra_state``); the recorded
    architecture (:meth:`pipeline.networks.UNet.architecture_diff`: padding, norm, features, channels,
    depth, kernels), which catches networks whose parameters have equal shapes; the parameter
    names and shapes; finite values (a run that diverged saves NaN weights).

    Raises:
        ValueError: naming the file and what differs, or the parameters with non-finite values.
    """
    extra = {k: v for k, v in state.items() if k.endswith("_extra_state")} if isinstance(state, dict) else {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for k, v in state.items() if k not in extra):
        raise ValueError(f"checkpoint {str(path)!r} holds no state_dict of tensors (found {type(state).__name__})")
    diff = network.architecture_diff(extra["_extra_state"]) if "_extra_state" in extra and hasattr(network, "architecture_diff") else []
    own = {k: v for k, v in network.state_dict().items() if not k.endswith("_extra_state")}
    state = {k: v for k, v in state.items() if k not in extra}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if diff or missing or unexpected or mismatched:
        lines = diff + [f"{k}: checkpoint {tuple(state[k].shape)}, network {tuple(own[k].shape)}" for k in mismatched[:4]]
        lines += [f"{k}: missing from the checkpoint" for k in missing[:3]]
        lines += [f"{k}: not in the network" for k in unexpected[:3]]
        raise ValueError(
            f"checkpoint {str(path)!r} was trained with another architecture ({len(diff)} setting(s) differ, "
            f"{len(mismatched)} shape mismatch(es), {len(missing)} missing, {len(unexpected)} unexpected parameter(s)): "
            + "; ".join(lines) + ". " + ARCHITECTURE_ADVICE
        )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"checkpoint {str(path)!r} holds non-finite weights (NaN or Inf) in {len(bad)} of {len(state)} tensors, "
            f"e.g. {', '.join(bad[:3])}: the training run diverged. Use an earlier checkpoint, or train again with a "
            "lower learning_rate"
        )


def latest_checkpoint(ckpt_dir: str) -> str:
    """The most recently written resume checkpoint ``checkpoint_epoch=<N>.pt`` (or ``_iteration=<N>``).

    "Most recent" is by modification time, then by N. The largest N alone would be wrong when a
    fresh (non-resume) run trains into a folder that still holds an earlier, longer run's
    checkpoint: ``checkpoint_epoch=16.pt`` of the old run would win over the new run's
    ``checkpoint_epoch=4.pt``. A higher-numbered checkpoint passed over is logged.

    Raises:
        FileNotFoundError: there is none, saying what to do.
    """
    found = []
    for path in Path(ckpt_dir).glob("checkpoint_*=*.pt"):
        match = re.fullmatch(r"checkpoint_(epoch|iteration)=(\d+)\.pt", path.name)
        if match:
            found.append((path.stat().st_mtime_ns, int(match.group(2)), str(path)))
    if not found:
        raise FileNotFoundError(
            f"resume=true but {ckpt_dir} holds no checkpoint_epoch=<N>.pt; train once without resume "
            "(checkpoints are written every ckpt_interval epochs) or point ckpt_dir at that run's models folder"
        )
    _, number, chosen = max(found)
    older = sorted(p for _, n, p in found if n > number)
    if older:
        logging.getLogger(__name__).warning(
            "resuming from %s, the most recently written checkpoint; %s written earlier (by another run) "
            "has a higher number and is not used", chosen, ", ".join(older))
    return chosen


def _optimizer_kind(param_group: dict) -> str:
    return "sgd" if "momentum" in param_group and "betas" not in param_group else "adam" if "betas" in param_group else "unknown"


def check_resume(ckpt_dir: str | os.PathLike, network: Any, optimizer_name: str) -> str:
    """Before ``resume: true`` touches anything: the checkpoint it will read must fit this run.

    Reads the newest ``checkpoint_epoch=<N>.pt`` (:func:`pipeline.checkpoints.latest_checkpoint`) with
    ``weights_only=True`` and checks the network's recorded architecture, parameter shapes and finite
    weights (:func:`pipeline.checkpoints.check_state_dict`), and that its optimizer is ``optimizer_name``
    (``sgd`` | ``adam``, told apart by their settings: ``momentum`` or ``betas``).

    Returns:
        The checkpoint's path.

    Raises:
        FileNotFoundError: no resume checkpoint in ``ckpt_dir``.
        ValueError: naming the file and what differs (network settings, shapes, optimizer), with
            the keys to set; nothing is loaded or written.
    """
    path = latest_checkpoint(ckpt_dir)
    state = read_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "trainer") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a resume checkpoint (it holds no {', '.join(missing)}); resume reads checkpoint_epoch=<N>.pt files written by training")
    check_state_dict(getattr(network, "module", network), state["model"], path)
    saved = _optimizer_kind(state["optimizer"]["param_groups"][0])
    own = str(optimizer_name)
    if saved != own:
        raise ValueError(
            f"checkpoint {path} was trained with the {saved} optimizer, but this run builds {own}; resume with "
            f"optimizer_name={saved!r} (as that run), or start a new run with another ckpt_dir=<folder>"
        )
    return str(path)


#: ``init_from`` names of weights the package ships in ``pipeline/pretrained/``, with how they are made. The file
#: of ``synthetic`` is made by ``scripts/pretrain_synthetic.py``; it is shipped once it is measured to help
#: (issue 17) and until then is missing, which :func:`pretrained_path` reports
PRETRAINED = {
    "synthetic": ("synthetic_unet16_valid_bn.pt",
                  "the CPU recipe's network (configs/em_cpu.yaml: features [16, 32, 64, 128, 256], valid, "
                  "BatchNorm, 2 output channels) trained on the embedded synthetic EM default by "
                  "scripts/pretrain_synthetic.py"),
}


def pretrained_path(name: str) -> Path:
    """The file of a shipped pretrained network (:data:`PRETRAINED`).

    Raises:
        ValueError: an unknown name, listing the known ones.
        FileNotFoundError: the file is not in this installation (say how to make it).
    """
    if name not in PRETRAINED:
        raise ValueError(f"init_from {name!r} names no shipped weights; valid: {', '.join(PRETRAINED)}, a checkpoint "
                         "path, or null (random initial weights)")
    path = Path(__file__).resolve().parent / "pretrained" / PRETRAINED[name][0]
    if not path.is_file():
        raise FileNotFoundError(f"init_from {name!r}: {path} is missing from this installation; make it with "
                                "python scripts/pretrain_synthetic.py, or set init_from=None")
    return path


def init_weights(network: torch.nn.Module, init_from: str | os.PathLike | None) -> str | None:
    """Start training from earlier weights: the bundle key ``init_from`` (a pre-flight check, then the load).

    Args:
        network: the network to be trained (a ``DistributedDataParallel`` wrapper is unwrapped).
        init_from: ``None`` (keep the random initial weights), a name of :data:`PRETRAINED`
            (``"synthetic"``), or the path of a checkpoint (``model.pt``, ``model_final.pt`` or a
            resume checkpoint, whose ``model`` is used). The optimizer and schedule start afresh, as
            in fine-tuning; ``resume: true`` loads its own checkpoint over these weights.

    Returns:
        The file the weights were read from, or ``None``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: an unknown name; a file that cannot be read; weights of another architecture
            (the settings that differ, and the keys to set), non-finite weights.
    """
    if optional(init_from) in (None, ""):
        return None
    path = pretrained_path(str(init_from)) if str(init_from) in PRETRAINED else Path(init_from)
    if not path.is_file():
        raise FileNotFoundError(f"init_from {str(init_from)!r}: no such file; valid: {', '.join(PRETRAINED)}, a "
                                "checkpoint path, or null")
    target = getattr(network, "module", network)
    state = model_state(read_checkpoint(path))
    try:
        check_state_dict(target, state, path)
    except ValueError as err:
        what = PRETRAINED[str(init_from)][1] if str(init_from) in PRETRAINED else "the network it was trained as"
        message = str(err).replace(ARCHITECTURE_ADVICE, "").rstrip(". ")
        raise ValueError(f"init_from {str(init_from)!r}: {message}. It holds {what}: build the network to match "
                         "(features=..., padding=..., norm=..., loss_name=...), or set init_from=None") from None
    target.load_state_dict(state)
    logging.getLogger(__name__).info("initial weights from %s (init_from %s)", path, init_from)
    return str(path)


class CheckpointSaver(_MonaiCheckpointSaver):
    """MONAI's ``CheckpointSaver``, made safe against a kill at any moment: same arguments.

    MONAI writes checkpoints in place (``atomic=False``), and ignite deletes the old checkpoint
    *before* writing the new one (``n_saved``, and MONAI's final checkpoint). A run killed at the
    wrong moment is then left with a truncated file, or with none at all. Here every file is written
    to a temporary name in the same folder and renamed (ignite's ``DiskSaver(atomic=True)``, which
    also makes it group/other-readable as a plain save would), and an old file is deleted only
    after its successor is complete. So a complete checkpoint is on disk at every instant.

    Two more guarantees (docs/reliability.md): no checkpoint with non-finite values (NaN/Inf, a
    diverged run) is ever written: the save raises ``FloatingPointError`` and the earlier file
    stays; and the final checkpoint is written only when the run completes. MONAI also writes it
    when the run raises (``exception_raised``), so a failed resume or a diverged run would replace
    an earlier run's finished ``model_final.pt``; here a failed run keeps it and re-raises.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                _save_before_remove(checkpoint.save_handler)

    def exception_raised(self, engine, e: Exception) -> None:
        """Write nothing for a failed run (the last resume checkpoint is what it leaves); re-raise."""
        logging.getLogger(__name__).error(
            "the run failed (%s); no final checkpoint was written, and earlier checkpoints in %s are kept",
            type(e).__name__, self.save_dir)
        raise e


def _save_before_remove(handler) -> None:
    """Make a MONAI/ignite ``DiskSaver`` atomic, and postpone its deletions until after the next save."""

    class SaveBeforeRemove(type(handler)):
        def __call__(self, checkpoint, filename, metadata=None) -> None:
            bad = _non_finite(checkpoint)
            if bad:
                raise FloatingPointError(
                    f"refusing to save {filename}: {len(bad)} tensor(s) hold NaN or Inf (e.g. {', '.join(bad[:3])}); "
                    "the run diverged. Earlier checkpoints are kept; lower learning_rate and train again"
                )
            super().__call__(checkpoint, filename, metadata)
            written = getattr(self, "filename", None) or filename  # MONAI's saver may fix the name
            for old in self._pending:
                if (getattr(self, "filename", None) or old) != written:
                    super().remove(old)
            self._pending = []

        def remove(self, filename: str) -> None:
            self._pending.append(filename)

    handler.__class__ = SaveBeforeRemove
    handler._atomic = True
    handler._pending = []


def _non_finite(tree, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) checkpoint dict that hold NaN or Inf."""
    if isinstance(tree, torch.Tensor):
        return [prefix or "tensor"] if tree.is_floating_point() and not bool(torch.isfinite(tree).all()) else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [name for key, value in items for name in _non_finite(value, f"{prefix}.{key}" if prefix else str(key))]
