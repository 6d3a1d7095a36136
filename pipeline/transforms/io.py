"""Loading and writing: sections of stacks and volumes in, predictions out (MONAI ``transforms/io``)."""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from pipeline.data import read_cached, section_axis
from pipeline.io import stem, write_image
from pipeline.io.readers import _suffix
from pipeline.transforms.post import check_output_settings, encode_prediction, foreground_probability


class LoadSectiond(MapTransform):
    """Load the files named under ``keys`` as channel-first ``MetaTensor``s ``(C, *spatial)``.

    When the item has a ``slice_key`` entry ``z``, only section ``z`` of the stack or volume
    is returned (axis from :func:`pipeline.data.section_axis`), so stacks give 2D training
    samples; decoded files are cached, so a stack is read once for all its sections.
    Colour images (channel-last in the file) get their channels first.

    Args:
        keys: keys holding file paths (``image``, ``label``).
        slice_key: key of the section index; absent or None means the whole file.
    """

    def __init__(self, keys: KeysCollection, slice_key: str = "slice", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slice_key = slice_key

    def __call__(self, data: Mapping[Hashable, str]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        z = d.get(self.slice_key)
        for key in self.key_iterator(d):
            path = str(d[key])
            array, meta = read_cached(path)
            channel_last = not (isinstance(meta.get("original_channel_dim"), float) or meta.get("original_channel_dim") is None)
            spacing = list(np.asarray(meta.get("spacing", [1.0] * array.ndim), dtype=float).ravel())
            if z is not None:
                axis = section_axis(path)
                if not -array.shape[axis] <= z < array.shape[axis]:
                    raise ValueError(f"{path}: section {z} out of range, the file has {array.shape[axis]} sections")
                array = np.take(array, z, axis=axis)
                spacing.pop(axis)
            array = np.moveaxis(array, -1, 0) if channel_last else array[None]
            spacing = spacing[-(array.ndim - 1):]
            d[key] = MetaTensor(
                torch.from_numpy(np.array(array, copy=True)),  # the cached file stays read-only
                affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)),
                meta={"filename_or_obj": path, "spacing": [float(v) for v in spacing], **({} if z is None else {"slice": int(z)})},
            )
        return d


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
            if img.ndim == 4 and section_axis(_filename(d, key)) == -1:
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
        self.output_dir, self.image_key, self.write = output_dir, image_key, check_output_settings(write, threshold)
        self.output_ext, self.threshold, self.overwrite = output_ext, threshold, overwrite

    def targets(self, source: str) -> dict[str, Path]:
        """The output file of each ``write`` entry for the input file ``source``."""
        src = Path(str(source))
        name = stem(src)
        ext = self.output_ext or _suffix(src)
        suffixes = {"probabilities": ".tif" if ext == ".png" else ext, "mask": ext}  # PNG cannot hold float32
        folders = {"probabilities": "probabilities", "mask": "masks"}
        return {what: Path(self.output_dir) / folders[what] / f"{name}{suffixes[what]}" for what in self.write}

    def check_free(self, sources: Sequence[str]) -> None:
        """Before a run: refuse (``FileExistsError``) if any output of any input exists, unless ``overwrite``.

        Checking every target first means a run never writes some outputs and then stops at an
        existing one.
        """
        if self.overwrite:
            return
        taken = [str(t) for s in sources for t in self.targets(s).values() if t.exists()]
        if taken:
            raise FileExistsError(
                f"{len(taken)} output file(s) exist already, e.g. {taken[:3]}; nothing was written. Pass "
                "--overwrite true to replace them, or choose another --output_dir"
            )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d[self.image_key]
        meta = dict(getattr(image, "meta", {}))
        targets = self.targets(meta.get("filename_or_obj", "prediction.tif"))
        meta.pop("filename_or_obj", None)
        for key in self.key_iterator(d):
            prob = foreground_probability(d[key])
            if meta.get("stack_axis_reversed"):
                prob = prob.permute(*reversed(range(prob.ndim)))
            outputs = encode_prediction(prob, self.threshold, self.write)
            for what, path in targets.items():
                write_image(outputs[what], path, meta=meta, overwrite=self.overwrite)
        return d
