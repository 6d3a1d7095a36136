"""MONAI transforms for EM masks: binarization and one-hot conversion of predictions.

Array transforms take ``(C, *spatial)`` arrays or tensors; each has a dictionary
counterpart (suffix ``d``), as in MONAI.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_tensor


class BinarizeMask(Transform):
    """Turn a mask stored in any common way into a float foreground mask ``(1, *spatial)`` of 0/1.

    Understood without options: booleans; two values ``{0, v}`` (``v`` is foreground:
    0/1, 0/255, ...); a single value (all background if 0, else all foreground). Masks
    with more values need ``threshold`` (foreground = value > threshold) or
    ``foreground_values``. A multi-channel mask whose channels are equal (grey saved as
    RGB) is reduced to one channel; one whose channels differ (a colour-coded mask)
    needs ``foreground_values`` given as colours, one value per channel.

    Args:
        threshold: foreground where ``value > threshold``.
        foreground_values: values (or colours) that count as foreground.
        invert: swap foreground and background after the rule above (ISBI 2012 stores
            cell interiors as 255; set ``invert=True`` to make membranes the foreground).
    """

    def __init__(
        self,
        threshold: float | None = None,
        foreground_values: Sequence[float] | Sequence[Sequence[float]] | None = None,
        invert: bool = False,
    ) -> None:
        if threshold is not None and foreground_values is not None:
            raise ValueError("give either threshold or foreground_values, not both")
        if foreground_values is not None and len(foreground_values) == 0:
            raise ValueError("foreground_values is empty; list at least one value that counts as foreground")
        self.threshold = threshold
        self.foreground_values = foreground_values
        self.invert = invert

    def __call__(self, mask: torch.Tensor | np.ndarray) -> torch.Tensor:
        m = convert_to_tensor(mask, track_meta=True)
        if m.ndim < 2:
            raise ValueError(f"expected a channel-first mask (C, *spatial), got shape {tuple(m.shape)}")
        channels = m.shape[0]
        if self.foreground_values is not None and isinstance(self.foreground_values[0], (list, tuple)):
            colours = torch.as_tensor(self.foreground_values, dtype=m.dtype, device=m.device)
            if colours.shape[1] != channels:
                raise ValueError(
                    f"foreground colours have {colours.shape[1]} components but the mask has {channels} channel(s)"
                )
            view = (slice(None), slice(None)) + (None,) * (m.ndim - 1)
            fg = (m.unsqueeze(0) == colours[view]).all(dim=1).any(dim=0, keepdim=True)
        else:
            if channels > 1:
                if not bool((m == m[:1]).all()):
                    raise ValueError(
                        f"mask has {channels} channels that differ (a colour-coded mask?); convert it to one "
                        "channel of labels, or pass foreground_values as colours, e.g. [[255, 0, 0]]"
                    )
                m = m[:1]
            fg = self._rule(m)
        if self.invert:
            fg = ~fg
        out = fg.to(torch.float32)
        return out

    def _rule(self, m: torch.Tensor) -> torch.Tensor:
        if self.threshold is not None:
            return m > self.threshold
        if self.foreground_values is not None:
            return torch.isin(m, torch.as_tensor(self.foreground_values, dtype=m.dtype, device=m.device))
        if m.dtype == torch.bool:
            return m.clone()
        values = torch.unique(m)
        if len(values) == 1:
            return m != 0
        if len(values) == 2 and values[0] == 0:
            return m == values[1]
        shown = ", ".join(f"{v:g}" for v in values[:6].tolist()) + (", ..." if len(values) > 6 else "")
        raise ValueError(
            f"cannot binarize a mask with {len(values)} distinct values ({shown}): masks are understood "
            "as booleans or two values {0, v}; pass threshold= (foreground = value > threshold) or "
            "foreground_values=[...]"
        )


class BinarizeMaskd(MapTransform):
    """Dictionary wrapper of :class:`BinarizeMask`."""

    def __init__(
        self,
        keys: KeysCollection,
        threshold: float | None = None,
        foreground_values: Sequence[float] | Sequence[Sequence[float]] | None = None,
        invert: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.binarize = BinarizeMask(threshold, foreground_values, invert)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.binarize(d[key])
            except ValueError as e:
                name = getattr(d[key], "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{name}: {e}") from e
        return d


class LogitsToOneHot(Transform):
    """Logits ``(C, *spatial)`` to a one-hot hard prediction with at least two channels.

    ``C == 1`` (a sigmoid network): foreground where the logit is > 0, returned as
    ``[background, foreground]``. ``C > 1`` (a soft-max network): one-hot of the arg-max.
    """

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        x = convert_to_tensor(logits, track_meta=True)
        if x.shape[0] == 1:
            fg = (x > 0).to(torch.float32)
            return torch.cat([1.0 - fg, fg], dim=0)
        idx = x.argmax(dim=0, keepdim=True)
        return torch.zeros_like(x, dtype=torch.float32).scatter_(0, idx, 1.0)


class LogitsToOneHotd(MapTransform):
    """Dictionary wrapper of :class:`LogitsToOneHot`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.convert = LogitsToOneHot()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.convert(d[key])
        return d


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _filename(data: Mapping[Hashable, torch.Tensor], key: Hashable) -> str:
    return str(getattr(data[key], "meta", {}).get("filename_or_obj", ""))


class StackAxisFirstd(MapTransform):
    """Put the section axis of a volume first, as TIFF stacks and SimpleITK arrays already are.

    MONAI's ``NibabelReader`` returns NIfTI arrays as ``(C, x, y, z)``; a 2D network predicts
    sections, which are the last axis there. This reverses the spatial axes of NIfTI volumes
    to ``(C, z, y, x)`` and marks the image (``meta["stack_axis_reversed"]``) so that
    :class:`WritePredictiond` writes the prediction back in the file's own order.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim == 4 and _filename(d, key).lower().endswith(NIFTI_SUFFIXES):
                d[key] = img.permute(0, 3, 2, 1).contiguous()
                d[key].meta["stack_axis_reversed"] = True
        return d


class WritePredictiond(MapTransform):
    """Write a prediction next to nothing but its own name: ``output_dir/{probabilities,masks}/<input name>``.

    ``pred`` holds logits ``(C, *spatial)`` for the image in ``image_key`` (whose meta gives
    the file name, spacing and affine). The foreground probability (soft-max channel 1, or
    the sigmoid of a single channel) is written as float32; the mask as uint8 0/255
    (foreground = probability > ``threshold``). Files keep the input's name and format;
    formats that cannot hold float32 (PNG) get TIFF probabilities. Existing files are
    refused unless ``overwrite`` is set; every write is atomic (:func:`pipeline.io.write_image`).

    Args:
        keys: the prediction key (``"pred"``).
        output_dir: folder that receives ``probabilities/`` and ``masks/``.
        image_key: key of the input image, for the name and meta.
        write: any of ``"probabilities"``, ``"mask"``.
        output_ext: force one output format (e.g. ``".nii.gz"``); default the input's.
        threshold: probability above which a pixel is foreground.
        overwrite: replace existing outputs.
    """

    OUTPUTS = ("probabilities", "mask")

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        image_key: str = "image",
        write: Sequence[str] = ("probabilities", "mask"),
        output_ext: str | None = None,
        threshold: float = 0.5,
        overwrite: bool = False,
    ) -> None:
        super().__init__(keys)
        unknown = set(write) - set(self.OUTPUTS)
        if unknown or not write:
            raise ValueError(f"write must list some of {self.OUTPUTS}, got {list(write)}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.output_dir, self.image_key, self.write = output_dir, image_key, tuple(write)
        self.output_ext, self.threshold, self.overwrite = output_ext, threshold, overwrite

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        from pathlib import Path

        from pipeline.io import write_image

        d = dict(data)
        image = d[self.image_key]
        meta = dict(getattr(image, "meta", {}))
        src = Path(str(meta.get("filename_or_obj", "prediction.tif")))
        name = src.name[: -len(".nii.gz")] if src.name.lower().endswith(".nii.gz") else src.stem
        ext = self.output_ext or (".nii.gz" if src.name.lower().endswith(".nii.gz") else src.suffix.lower())
        meta.pop("filename_or_obj", None)
        for key in self.key_iterator(d):
            logits = d[key].detach().float().cpu()
            prob = torch.softmax(logits, 0)[1] if logits.shape[0] > 1 else torch.sigmoid(logits[0])
            if meta.get("stack_axis_reversed"):
                prob = prob.permute(*reversed(range(prob.ndim)))
            outputs = {
                "probabilities": (prob.numpy().astype(np.float32), ".tif" if ext == ".png" else ext),
                "mask": ((prob > self.threshold).numpy().astype(np.uint8) * 255, ext),
            }
            for what in self.write:
                array, suffix = outputs[what]
                folder = "probabilities" if what == "probabilities" else "masks"
                write_image(array, Path(self.output_dir) / folder / f"{name}{suffix}", meta=meta, overwrite=self.overwrite)
        return d
