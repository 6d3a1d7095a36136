"""Small ignite/MONAI glue used by the bundle configs."""

from __future__ import annotations

import csv
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Events
from ignite.metrics import Metric
from monai.handlers import from_engine
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from pipeline import metrics
from pipeline.instances import make_instances, parse_rules
from pipeline.io import replace_atomically, stem
from pipeline.optim import polynomial_decay


def select_channel(keys: Sequence[str], channel: int) -> Callable:
    """An ``output_transform`` that keeps one channel of each decollated item.

    ``MeanDice(output_transform=select_channel(["pred", "label"], 0))`` scores class 0
    alone (with ``include_background=True``), which is how the bundle logs per-class Dice.
    """
    get = from_engine(list(keys))

    def transform(output):
        return tuple([item[channel : channel + 1] for item in items] for items in get(output))

    return transform


def class_names(label_mode: str = "binary", num_classes: int = 2, names: Sequence[str] | None = None) -> list[str]:
    """Names of the target's classes: ``names`` when given (one per class), else ``membrane, interior``
    (binary, instances of 2 classes), ``background, boundary, interior`` (instances of 3) or ``class_0, ...``.

    Raises:
        ValueError: ``names`` not one per class (``--class_names``).
    """
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != num_classes:
            raise ValueError(f"--class_names needs {num_classes} names (--num_classes), got {names}")
        return names
    if label_mode in ("binary", "instances") and num_classes == 2:
        return ["membrane", "interior"]
    if label_mode == "instances":
        return ["background", "boundary", "interior"]
    return [f"class_{k}" for k in range(num_classes)]


def class_dice_metrics(label_mode: str = "binary", num_classes: int = 2, names: Sequence[str] | None = None) -> dict:
    """``{"val_dice_<class>": MeanDice}`` for every class of the target (:func:`class_names`): the per-class
    Dice the training bundle logs at each validation (one-hot ``pred`` and ``label``)."""
    from monai.handlers import MeanDice

    return {f"val_dice_{name}": MeanDice(include_background=True, output_transform=select_channel(["pred", "label"], k))
            for k, name in enumerate(class_names(label_mode, num_classes, names))}


class LearningRateLogger:
    """Write each optimizer group's learning rate to TensorBoard at every epoch's start.

    Args:
        summary_writer: the writer shared with ``TensorBoardStatsHandler``.
        optimizer: the trainer's optimizer.
        tag: scalar tag (``/{group}`` is appended when there are several groups).
    """

    def __init__(self, summary_writer: SummaryWriter, optimizer, tag: str = "learning_rate") -> None:
        self.writer = summary_writer
        self.optimizer = optimizer
        self.tag = tag

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine) -> None:
        groups = self.optimizer.param_groups
        for i, group in enumerate(groups):
            tag = self.tag if len(groups) == 1 else f"{self.tag}/{i}"
            self.writer.add_scalar(tag, group["lr"], engine.state.epoch)
        self.writer.flush()


class TensorBoardImages:
    """Log input | label | prediction [| weight map] panels for the first samples of each run.

    Attach to an evaluator: at each of its first ``n_samples`` iterations (batch size 1
    expected) it writes one grey-scale panel under ``{tag}/sample_{i}`` at the evaluator's
    epoch (the trainer's epoch when run by ``ValidationHandler``). Each part is scaled to
    [0, 1] on its own; label and prediction are shown as class indices (the arg-max of their
    one-hot channels: the foreground of two classes). A 3D sample shows its middle section.

    With ``instances`` (``{name: rule}``, :func:`pipeline.instances.parse_rules`), each sample also gets
    ``{tag}/{name}_{i}``: the instances of the prediction by that rule over the image, each in its colour.

    Args:
        summary_writer: the writer shared with the other TensorBoard handlers.
        n_samples: samples to show per run.
        tag: tag prefix.
        instances: instance rules to show (None: none).
    """

    def __init__(self, summary_writer: SummaryWriter, n_samples: int = 3, tag: str = "validation", instances=None) -> None:
        self.writer, self.n_samples, self.tag = summary_writer, n_samples, tag
        self.rules = parse_rules(instances)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @staticmethod
    def _plane(x):
        x = torch.as_tensor(x).detach().float().cpu()
        while x.ndim > 2:  # drop channel / batch axes, take the middle section of a volume
            x = x[x.shape[0] // 2] if x.ndim > 3 or x.shape[0] > 1 else x[0]
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)

    def __call__(self, engine) -> None:
        index = (engine.state.iteration - 1) % engine.state.epoch_length
        if index >= self.n_samples:
            return
        # MONAI engines decollate: state.output / state.batch are lists of per-sample dicts;
        # the output holds image, label and pred, the batch every loaded key (weight too)
        item, sample = engine.state.output[0], engine.state.batch[0]
        parts = [item["image"], _class_map(item["label"]), _class_map(item["pred"])]
        if "weight" in sample:
            parts.append(sample["weight"])
        planes = [self._plane(p) for p in parts]
        height = max(p.shape[0] for p in planes)
        planes = [torch.nn.functional.pad(p, (0, 2, 0, height - p.shape[0]), value=1.0) for p in planes]
        panel = torch.cat(planes, dim=1)[None]
        self.writer.add_image(f"{self.tag}/sample_{index}", panel, engine.state.epoch, dataformats="CHW")
        for name, rule in self.rules.items():  # instances of the (hard) prediction over the image, each its colour
            pred = torch.as_tensor(item["pred"]).detach().float().cpu().numpy()
            if pred.shape[0] == 1:
                pred = np.concatenate([1 - pred, pred])
            ids = make_instances(pred, rule)
            self.writer.add_image(f"{self.tag}/{name}_{index}", instance_overlay(self._plane(item["image"]).numpy(), self._middle(ids)),
                                  engine.state.epoch, dataformats="HWC")
        self.writer.flush()

    @staticmethod
    def _middle(ids: np.ndarray) -> np.ndarray:
        return ids[ids.shape[0] // 2] if ids.ndim > 2 else ids


def instance_overlay(grey: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """RGB ``(H, W, 3)`` float in [0, 1]: the grey image with each instance blended in its own colour
    (colours drawn from a fixed seed per id; id 0 keeps the image)."""
    ids = np.asarray(ids)
    palette = np.random.default_rng(0).uniform(0.2, 1.0, (int(ids.max(initial=0)) + 1, 3))
    rgb = np.repeat(np.clip(np.asarray(grey, np.float32), 0, 1)[..., None], 3, axis=-1)
    inside = ids > 0
    rgb[inside] = (1 - alpha) * rgb[inside] + alpha * palette[ids[inside]]
    return rgb


def _class_map(x: torch.Tensor) -> torch.Tensor:
    """A one-hot ``(C, *spatial)`` as class indices ``(1, *spatial)`` (one channel stays as it is)."""
    x = torch.as_tensor(x)
    return x.argmax(0, keepdim=True).float() if x.shape[0] > 1 else x


class EMMetric(Metric):
    """An ignite metric: the mean over samples of a :mod:`pipeline.metrics` score.

    ``output_transform`` must give ``(preds, labels)``: lists of foreground probabilities
    ``(1, *spatial)`` (see :class:`pipeline.transforms.ForegroundProbabilityd`) and binary
    labels ``(1, *spatial)``. Usable as a MONAI engine's ``key_val_metric`` or
    ``additional_metrics``. Samples whose score is undefined (NaN) are left out of the mean.

    Args:
        metric: a score of :mod:`pipeline.metrics`: pixel_error, v_rand, v_info,
            warping_error, dice or iou.
        threshold: probability threshold of the foreground.
    """

    METRICS = ("pixel_error", "v_rand", "v_info", "warping_error", "dice", "iou")

    def __init__(self, metric: str = "v_rand", threshold: float = 0.5, output_transform: Callable | None = None) -> None:
        if metric not in self.METRICS:
            raise ValueError(f"unknown EM metric {metric!r}; valid choices: {', '.join(self.METRICS)}")
        self.score, self.threshold = getattr(metrics, metric), threshold
        super().__init__(output_transform=output_transform or from_engine(["pred", "label"]))

    def reset(self) -> None:
        self._scores: list[float] = []

    def update(self, output) -> None:
        for prob, label in zip(*output):
            self._scores.append(float(self.score(prob[0].cpu().numpy(), label[0].cpu().numpy(), self.threshold)))

    def compute(self) -> float:
        return float(np.nanmean(self._scores)) if self._scores else float("nan")


def evaluation_key_metric(label_mode: str = "binary", name: str = "v_rand", threshold: float = 0.5) -> dict | None:
    """The evaluator's key metric: ``{name: EMMetric(name, threshold)}`` for binary labels; None for instances
    and classes, whose scores :class:`EvaluationReport` computes once and logs."""
    return {name: EMMetric(name, threshold)} if label_mode == "binary" else None


class EvaluationReport:
    """Per-sample scores as CSV and JSON, and an overlay PNG per sample, written at the end of a run.

    By ``label_mode`` (:mod:`pipeline.labels`):

    - ``binary``: ``pred`` is a foreground probability ``(1, *spatial)`` and ``label`` binary; each row holds
      every score of :func:`pipeline.metrics.evaluate`; the overlay shows the image in grey, false
      foreground (predicted interior on a membrane) in red and missed foreground (predicted membrane
      inside a cell) in blue.
    - ``instances``: ``pred`` holds the class probabilities ``(C, *spatial)``, ``label`` instance ids; for each
      rule of ``instances`` (:mod:`pipeline.instances`) the row holds ``<rule>_<score>`` of
      :func:`pipeline.metrics.object_scores` (adapted Rand error, VI split/merge, matching at ``iou_threshold``,
      average precision), on the whole sample (a stack or volume in 3D); the overlay shows the first rule's
      instances, each in its colour.
    - ``classes``: ``pred`` as for instances, ``label`` class indices (after ``--class_values``); the row holds
      :func:`pipeline.metrics.class_scores` of the arg-max, by class value: a class absent from a sample's label
      and prediction is NaN there (absent); the overlay marks wrong pixels in red.

    After the samples comes the row ``mean``: of every score over the samples where it is defined (NaN left out);
    the JSON holds it as ``mean``, and as ``count`` how many samples that is (for classes: the samples where the
    class is present). The log line shows the means (for classes: ``mean_dice``, ``mean_iou``
    and each class's Dice, ``absent`` where no sample has the class), with ``(in n of N)`` where a score is
    defined in fewer samples than all. A stack's overlay shows its middle section. Files are written atomically.

    Args:
        output_dir: folder for ``report.csv``, ``report.json`` and ``overlays/``.
        threshold: probability threshold of the foreground (binary).
        sweep: also score V_rand / V_info at their best threshold (binary; slower).
        label_mode, num_classes: what the labels hold (the bundle keys of these names).
        names: the class names (``--class_names``; :func:`class_names`).
        instances: ``{name: rule}`` (instances mode).
        iou_threshold: the IoU of a matched object pair (instances mode).
    """

    def __init__(self, output_dir: str, threshold: float = 0.5, sweep: bool = True, label_mode: str = "binary",
                 instances=None, num_classes: int = 2, names: Sequence[str] | None = None,
                 iou_threshold: float = 0.5) -> None:
        self.output_dir, self.threshold, self.sweep = output_dir, threshold, sweep
        self.label_mode, self.num_classes, self.iou_threshold = label_mode, int(num_classes), float(iou_threshold)
        self.rules = parse_rules(instances) if label_mode == "instances" else {}
        if label_mode == "instances" and not self.rules:
            raise ValueError("--label_mode instances scores instances made by --instances, which names no rule")
        self.names = class_names(label_mode, self.num_classes, names) if label_mode == "classes" else None
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine) -> None:
        for item in engine.state.output:
            pred, label = item["pred"].detach().float().cpu().numpy(), item["label"][0].cpu().numpy()
            meta = getattr(item["image"], "meta", {})
            name = Path(str(meta.get("filename_or_obj", f"sample{len(self.rows)}"))).name
            section = meta.get("slice", meta.get("slices"))  # a section, or a range [start, stop) of a stack
            if section is not None:
                section = [int(v) for v in section] if np.ndim(section) else int(section)
            row = {"file": name, "slice": section}
            image = item["image"][0].cpu().numpy()
            if self.label_mode == "binary":
                prob = pred[0]
                row.update(metrics.evaluate(prob, label, self.threshold, sweep=self.sweep))
                rgb = self._grey(image)
                fg, truth = prob > self.threshold, label > 0.5
                rgb[fg & ~truth] = (1.0, 0.1, 0.1)
                rgb[~fg & truth] = (0.1, 0.3, 1.0)
            elif self.label_mode == "instances":
                first = None
                for rule_name, rule in self.rules.items():
                    ids = make_instances(pred, rule)
                    first = ids if first is None else first
                    scores = metrics.object_scores(label.astype(np.int64), ids, self.iou_threshold)
                    row.update({f"{rule_name}_{k}": v for k, v in scores.items()})
                rgb = instance_overlay(self._grey(image)[..., 0], first)
            else:
                classes = pred.argmax(0)
                row.update(metrics.class_scores(classes, label.astype(np.int64), self.num_classes, self.names))
                rgb = self._grey(image)
                rgb[classes != label] = (1.0, 0.1, 0.1)
            self.rows.append(row)
            rgb = rgb[rgb.shape[0] // 2] if rgb.ndim == 4 else rgb  # a stack: its middle section
            png = Image.fromarray((rgb * 255).astype(np.uint8))
            replace_atomically(self.overlay_path(name, section), lambda p: png.save(p, format="PNG"))

    @staticmethod
    def _grey(image: np.ndarray) -> np.ndarray:
        lo, hi = np.percentile(image, [1, 99])
        grey = np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1)
        return np.stack([grey] * 3, axis=-1)

    def overlay_path(self, image: str, section: int | Sequence[int] | None = None) -> Path:
        """``output_dir/overlays/<image name without suffix>[_z<section>|_z<start>-<stop>].png``."""
        if section is None:
            part = ""
        elif isinstance(section, (list, tuple)):
            part = f"_z{int(section[0]):04d}-{int(section[1]):04d}"
        else:
            part = f"_z{int(section):04d}"
        return Path(self.output_dir) / "overlays" / f"{stem(image)}{part}.png"

    def outputs(self, datalist: Sequence[dict]) -> dict[str, list[Path]]:
        """``{input: [its overlays]}`` for every item's image and label (labels have none), for
        :func:`pipeline.io.check_outputs` before the run writes anything."""
        found: dict[str, list[Path]] = {}
        for item in datalist:
            found.setdefault(str(item["image"]), []).append(
                self.overlay_path(Path(item["image"]).name, item.get("slice", item.get("slices"))))
            found.setdefault(str(item["label"]), [])
        return found

    @property
    def reports(self) -> list[Path]:
        """The files written once per run: ``report.csv``, ``report.json``."""
        return [Path(self.output_dir) / "report.csv", Path(self.output_dir) / "report.json"]

    def write(self, engine) -> None:
        if not self.rows:
            return
        keys = list(self.rows[0])
        scores = [k for k in keys if k not in ("file", "slice") and isinstance(self.rows[0][k], (int, float))]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a score undefined in every row stays NaN
            mean = {k: float(np.nanmean([r[k] for r in self.rows])) for k in scores}
        count = {k: int(sum(np.isfinite(float(r[k])) for r in self.rows)) for k in scores}  # the samples of each mean

        def write_csv(path):
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(self.rows)
                writer.writerow({"file": "mean", "slice": None, **mean})

        csv_path, json_path = self.reports
        replace_atomically(csv_path, write_csv)
        report = _strict_json({"mean": mean, "count": count, "samples": self.rows})  # NaN (undefined, absent): null
        replace_atomically(json_path, lambda p: p.write_text(json.dumps(report, indent=1, allow_nan=False)))
        shown = ["mean_dice", "mean_iou", *(f"dice_{n}" for n in self.names)] if self.label_mode == "classes" else scores[:8]

        def summary(k):
            n, value = count[k], "absent" if count[k] == 0 and self.label_mode == "classes" else f"{mean[k]:.4f}"
            return f"{k}={value}" + (f" (in {n} of {len(self.rows)})" if n < len(self.rows) else "")

        engine.logger.info("evaluation report: %s", ", ".join(summary(k) for k in shown))


def _strict_json(tree: Any) -> Any:
    """``tree`` with every non-finite float as None, so that it is strict JSON (``null``; Python's ``NaN`` is not)."""
    if isinstance(tree, (dict, list, tuple)):
        items = tree.items() if isinstance(tree, dict) else enumerate(tree)
        found = {k: _strict_json(v) for k, v in items}
        return found if isinstance(tree, dict) else list(found.values())
    return None if isinstance(tree, (float, np.floating)) and not np.isfinite(tree) else tree


class StopOnNonFiniteLoss:
    """Stop training at the first iteration whose loss is NaN or Inf, with where and a hint.

    Its ``ITERATION_COMPLETED`` check runs before the epoch's checkpoint saves. In a distributed
    run the ranks agree (an all-reduce of the flag), so all of them stop together. Raises
    ``FloatingPointError`` naming the epoch, iteration and learning rate; the run exits non-zero and writes no checkpoint from then
    on (:class:`pipeline.checkpoints.CheckpointSaver`), so the last finite resume checkpoint and the earlier runs'
    ``model.pt`` / ``model_final.pt`` stay. (ignite's ``TerminateOnNan`` ends the run as if it had
    completed, with exit code 0.)

    Args:
        optimizer: the trainer's optimizer, for the learning rate in the message.
    """

    def __init__(self, optimizer=None) -> None:
        self.optimizer = optimizer

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        output = engine.state.output
        loss = float((output[0] if isinstance(output, (list, tuple)) else output)["loss"])
        if idist.get_world_size() > 1:  # every rank stops together, or the others would wait forever
            elsewhere = float(idist.all_reduce(torch.tensor(0.0 if math.isfinite(loss) else 1.0), op="MAX"))
            loss = float("nan") if elsewhere and math.isfinite(loss) else loss
        if math.isfinite(loss):
            return
        lr = f"learning rate {self.optimizer.param_groups[0]['lr']:g}" if self.optimizer is not None else ""
        raise FloatingPointError(
            f"training stopped: the loss became {loss} at epoch {engine.state.epoch}, iteration "
            f"{engine.state.iteration} ({lr}); the run diverged. Lower --learning_rate (e.g. by 10x), or use "
            "--optimizer_name adam; no checkpoint was written from this point, earlier ones are kept"
        )


class TrainingTimeBudget:
    """Train for a time budget instead of a number of epochs, the learning rate decaying over it.

    The bundle key ``train_minutes``. The budget counts the seconds of training iterations only:
    from fetching a batch (``GET_BATCH_STARTED``) to the end of the step (``ITERATION_COMPLETED``),
    so building the dataset cache, validation and checkpoint saves are not charged. Before each
    iteration every optimizer group's learning rate is set to
    ``learning_rate * (1 - spent / budget) ** power``: the polynomial ("poly") schedule of
    :class:`pipeline.optim.PolynomialDecay`, over the budget instead of over ``num_epochs``. After
    the iteration that spends the budget the trainer terminates (ignite then completes the run, so
    ``model_final.pt`` is saved). ``num_epochs`` stays an upper bound.

    A resumed run (``resume: true``) gets a budget of its own. In a distributed run rank 0's clock
    decides (broadcast every iteration), so all ranks use the same learning rate and stop together.
    ``engine.state.train_seconds`` holds the seconds spent.

    Args:
        minutes: the budget, > 0.
        optimizer: the trainer's optimizer.
        learning_rate: the rate at the start (the bundle's ``learning_rate``).
        power: the decay's exponent (the bundle's ``lr_power``; 0 keeps the rate constant).

    Raises:
        ValueError: a budget that is not a positive number, or a negative ``power``.
    """

    def __init__(self, minutes: float, optimizer, learning_rate: float, power: float = 0.9) -> None:
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not 0 < minutes < math.inf:
            raise ValueError(f"train_minutes must be a positive number of minutes (or null: train num_epochs), got {minutes!r}")
        if power < 0:
            raise ValueError(f"lr_power must be >= 0, got {power!r}")
        self.budget, self.optimizer = 60.0 * float(minutes), optimizer
        self.learning_rate, self.power = float(learning_rate), float(power)
        self.spent, self.agreed, self._start = 0.0, 0.0, None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self._begin)
        engine.add_event_handler(Events.ITERATION_STARTED, self._set_rate)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._end)

    def _reset(self, engine) -> None:
        self.spent, self.agreed, self._start = 0.0, 0.0, None
        engine.state.train_seconds = 0.0

    def _begin(self, engine) -> None:
        self._start = time.perf_counter()

    def _set_rate(self, engine) -> None:
        rate = self.learning_rate * polynomial_decay(self.agreed / self.budget, self.power)
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    def _end(self, engine) -> None:
        if self._start is not None:
            self.spent += time.perf_counter() - self._start
            self._start = None
        engine.state.train_seconds = self.spent
        # one collective per iteration: rank 0's seconds, used for this stop and the next rate
        self.agreed = float(idist.broadcast(torch.tensor(self.spent, dtype=torch.float64), src=0)) \
            if idist.get_world_size() > 1 else self.spent
        if self.agreed >= self.budget:
            engine.terminate()


def attach(engine, *handlers) -> None:
    """``handler.attach(engine)`` for each handler that is not ``None`` (a config component disabled
    with ``_disabled_``, e.g. a file-writing handler on a rank other than 0)."""
    for handler in handlers:
        if handler is not None:
            handler.attach(engine)


def close(writer: SummaryWriter | None) -> None:
    """Close a TensorBoard writer (``None``: there is none on this rank)."""
    if writer is not None:
        writer.close()


def leave_process_group(pause_s: float = 0.2) -> None:
    """End a DDP rank: destroy the process group, then leave the GIL free for ``pause_s`` seconds.

    No barrier: no rank needs one (checkpoints are rank 0's, written locally, and torchrun waits for every
    rank). The pause lets gloo's worker threads release their last work. Without it ~1 run in 20 aborted at exit
    ("terminate called without an active exception"; gdb: ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` /
    ``~AsyncAllgatherWork`` -> decref of a Python tensor -> ``take_gil``): a worker thread that still waits for the
    GIL when Python finalises is made to exit inside C++, which is ``std::terminate``.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    time.sleep(pause_s)
