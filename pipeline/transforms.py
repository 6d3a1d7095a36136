"""MONAI transforms for EM masks: binarization and one-hot conversion of predictions.

Array transforms take ``(C, *spatial)`` arrays or tensors; each has a dictionary
counterpart (suffix ``d``), as in MONAI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import convert_to_tensor


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
        from pipeline.data import read_cached, section_axis

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


class NormalizeSectionsd(MapTransform):
    """Zero mean, unit variance per channel and per 2D section.

    ``(C, H, W)`` is normalised per channel; ``(C, Z, H, W)`` per channel and section, as a
    2D network sees a stack section by section (EM sections differ in brightness and
    contrast). A constant section becomes zeros.
    """

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = convert_to_tensor(d[key], track_meta=True).float()
            flat = x.reshape(*x.shape[: 2 if x.ndim == 4 else 1], -1)
            mean = flat.mean(-1, keepdim=True)
            std = flat.std(-1, unbiased=False, keepdim=True)
            d[key] = ((flat - mean) / torch.where(std > 0, std, torch.ones_like(std))).reshape(x.shape)
        return d


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
        from pipeline.data import section_axis

        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim == 4 and section_axis(_filename(d, key)) == -1:
                d[key] = img.permute(0, 3, 2, 1).contiguous()
                d[key].meta["stack_axis_reversed"] = True
        return d


#: what the prediction writers (:class:`WritePredictiond`, :func:`pipeline.streaming.predict_zarr`) write
OUTPUTS = ("probabilities", "mask")


def foreground_probability(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Foreground probability of logits whose channel axis is ``dim`` (removed): soft-max channel 1,
    or the sigmoid of a single channel. ``(C, *spatial) -> (*spatial)`` with ``dim=0``."""
    logits = logits.detach().float()
    if logits.shape[dim] > 1:
        return torch.softmax(logits, dim).select(dim, 1)
    return torch.sigmoid(logits.select(dim, 0))


def check_output_settings(write: Sequence[str], threshold: float) -> tuple[str, ...]:
    """The writers' one rule: ``write`` lists some of :data:`OUTPUTS`; ``threshold`` in [0, 1].

    Raises:
        ValueError: naming the bad value and the valid ones.
    """
    from pipeline.config import check_hyperparameters

    if not write or set(write) - set(OUTPUTS):
        raise ValueError(f"write must list some of {OUTPUTS}, got {list(write)}")
    check_hyperparameters(threshold=threshold)
    return tuple(write)


def encode_prediction(probability: torch.Tensor, threshold: float, write: Sequence[str] = OUTPUTS) -> dict[str, np.ndarray]:
    """The files' contents from a foreground probability: ``probabilities`` as float32, ``mask`` as
    uint8 0/255 (foreground where ``probability > threshold``), for each name in ``write``."""
    prob = probability.detach().float().cpu().numpy()
    encode = {"probabilities": lambda: prob.astype(np.float32, copy=False), "mask": lambda: (prob > threshold).astype(np.uint8) * 255}
    return {name: encode[name]() for name in write}


class ForegroundProbabilityd(MapTransform):
    """Replace logits ``(C, *spatial)`` under ``keys`` by the foreground probability ``(1, *spatial)``."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = foreground_probability(convert_to_tensor(d[key]))[None]
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
        from pipeline.io import _suffix, stem

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
        from pipeline.io import write_image

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


# ---------------------------------------------------------------- paper augmentation
class RandElasticGridd(RandomizableTransform, MapTransform):
    """Elastic deformation of the paper (section 3.1): random displacement vectors on a coarse
    grid, drawn from ``N(0, sigma)`` pixels, interpolated bicubically to every pixel.

    The same field warps every key; each key has its own interpolation (``"bicubic"`` or
    ``"bilinear"`` for images and weight maps, ``"nearest"`` for labels). Samples that fall
    outside the image are mirrored. Works on ``(C, H, W)`` and ``(C, D, H, W)`` (the 3D field
    is interpolated trilinearly, as ``grid_sample`` has no tricubic mode). Reproducible under
    ``set_random_state`` / ``monai.utils.set_determinism``.

    Args:
        keys: keys to warp.
        sigma: standard deviation of the control-point displacements, in pixels (paper: 10).
        grid_size: control points per axis, corners included (paper: 3).
        mode: interpolation per key (a string or one per key).
        prob: probability of warping a sample.
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float = 10.0,
        grid_size: int = 3,
        mode: str | Sequence[str] = "bilinear",
        prob: float = 1.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if sigma < 0 or grid_size < 2:
            raise ValueError(f"sigma must be >= 0 and grid_size >= 2, got sigma={sigma}, grid_size={grid_size}")
        modes = (mode,) * len(self.keys) if isinstance(mode, str) else tuple(mode)
        if len(modes) != len(self.keys) or not set(modes) <= {"bicubic", "bilinear", "nearest"}:
            raise ValueError(f"mode must be one of bicubic/bilinear/nearest, one per key; got {mode!r} for keys {self.keys}")
        self.sigma, self.grid_size, self.modes = float(sigma), int(grid_size), modes
        self._coarse: np.ndarray | None = None

    def randomize(self, spatial_dims: int) -> None:
        super().randomize(None)
        self._coarse = self.R.normal(0.0, self.sigma, (spatial_dims,) + (self.grid_size,) * spatial_dims)

    def displacement(self, spatial_shape: Sequence[int]) -> torch.Tensor:
        """The dense field ``(ndim, *spatial)`` in pixels from the last drawn control points."""
        coarse = torch.as_tensor(self._coarse, dtype=torch.float32)[None]
        mode = "bicubic" if len(spatial_shape) == 2 else "trilinear"
        return torch.nn.functional.interpolate(coarse, size=tuple(spatial_shape), mode=mode, align_corners=True)[0]

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = d[self.first_key(d)]
        spatial = tuple(first.shape[1:])
        self.randomize(len(spatial))
        if not self._do_transform:
            return d
        disp = self.displacement(spatial)
        # sampling positions in pixels, then normalised to [-1, 1] (align_corners=True)
        axes = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in spatial], indexing="ij")
        coords = [(a + u) * 2.0 / max(s - 1, 1) - 1.0 for a, u, s in zip(axes, disp, spatial)]
        grid = torch.stack(coords[::-1], dim=-1)[None]  # grid_sample wants (x, y[, z]) order
        for key, mode in zip(self.key_iterator(d), self.modes):
            img = convert_to_tensor(d[key], track_meta=True)
            if mode == "bicubic" and len(spatial) == 3:
                mode = "bilinear"
            warped = torch.nn.functional.grid_sample(
                img[None].float(), grid.to(img.device), mode=mode, padding_mode="reflection", align_corners=True
            )[0]
            out = warped.to(img.dtype) if not img.dtype.is_floating_point else warped
            d[key] = MetaTensor(out, meta=getattr(img, "meta", {})) if isinstance(img, MetaTensor) else out
        return d


# ---------------------------------------------------------------- border weight map
def border_weight_map(foreground: np.ndarray, w0: float = 10.0, sigma: float = 5.0, class_balance: bool = True) -> np.ndarray:
    """The paper's weight map (eq. 2): ``w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))``.

    ``d1``, ``d2`` are the distances to the nearest and the second nearest cell, the cells
    being the connected components of the foreground; ``w_c`` balances the class
    frequencies (``n_pixels / (2 * n_class)``, so its mean is 1; 1 everywhere when
    ``class_balance`` is False or only one class is present). Distances to a cell are
    computed with scipy's Euclidean distance transform inside the cell's bounding box
    grown by ``6 * sigma``; farther away the border term is below ``w0 * exp(-18)``.

    Args:
        foreground: boolean array ``(*spatial)``, True for cell interiors.

    Returns:
        float32 array of the input's shape.
    """
    from scipy import ndimage as ndi

    fg = np.asarray(foreground).astype(bool)
    instances, n = ndi.label(fg)
    d1 = np.full(fg.shape, np.inf)
    d2 = np.full(fg.shape, np.inf)
    reach = int(np.ceil(6 * sigma))
    for i, box in enumerate(ndi.find_objects(instances), start=1):
        window = tuple(slice(max(b.start - reach, 0), min(b.stop + reach, s)) for b, s in zip(box, fg.shape))
        d = ndi.distance_transform_edt(instances[window] != i)
        w1, w2 = d1[window], d2[window]
        d2[window] = np.minimum(w2, np.maximum(w1, d))
        d1[window] = np.minimum(w1, d)
    border = np.zeros(fg.shape) if n < 2 else w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    wc = np.ones(fg.shape)
    n_fg = int(fg.sum())
    if class_balance and 0 < n_fg < fg.size:
        wc = np.where(fg, fg.size / (2.0 * n_fg), fg.size / (2.0 * (fg.size - n_fg)))
    return (wc + border).astype(np.float32)


class BorderWeightMapd(MapTransform):
    """Write the paper's weight map of a binary label ``(1, *spatial)`` to ``weight_key``.

    Compute it before augmentation (it is deterministic, so a ``CacheDataset`` keeps it),
    then warp and crop it with the label: the bundle's configs crop ``label`` and
    ``weight`` to the network's output size in the same transform.
    """

    def __init__(
        self, keys: KeysCollection, weight_key: str = "weight", w0: float = 10.0, sigma: float = 5.0,
        class_balance: bool = True, allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if w0 < 0 or sigma <= 0:
            raise ValueError(f"w0 must be >= 0 and sigma > 0, got w0={w0}, sigma={sigma}")
        self.weight_key, self.w0, self.sigma, self.class_balance = weight_key, w0, sigma, class_balance

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = convert_to_tensor(d[key], track_meta=True)
            if label.shape[0] != 1:
                raise ValueError(f"the weight map needs a one-channel binary label, got shape {tuple(label.shape)}")
            w = border_weight_map(label[0].cpu().numpy() > 0.5, self.w0, self.sigma, self.class_balance)
            weight = torch.from_numpy(w)[None]
            d[self.weight_key] = MetaTensor(weight, meta=dict(label.meta)) if isinstance(label, MetaTensor) else weight
        return d
