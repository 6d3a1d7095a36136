"""Loading and writing: files and sections of stacks in (the one read path), predictions out (MONAI ``transforms/io``)."""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from pipeline.data import read_cached
from pipeline.io import channel_first, read_image, stem, write_image
from pipeline.io.common import NO_FLOAT_SUFFIXES, READ_ONLY_SUFFIXES, _suffix
from pipeline.transforms.post import check_output_settings, encode_prediction, foreground_probability


class LoadSectiond(MapTransform):
    """Load the files named under ``keys`` as channel-first ``MetaTensor``s ``(C, *spatial)``: the one
    read path of training, evaluation and in-memory inference.

    Axes follow :func:`pipeline.io.channel_first`: colour samples first, spatial axes ``(Z,) Y, X``
    (NIfTI's ``(x, y, z)`` reversed, marked ``meta["axes_reversed"]`` so that
    :class:`WritePredictiond` writes predictions back in the file's order). When the item has a
    ``slice_key`` entry ``z``, only section ``z`` is returned, so stacks give 2D training samples;
    those files are decoded once for all their sections (:func:`pipeline.data.read_cached`). A whole
    file keeps its reader's meta (spacing, affine, origin, ... in the file's axis order) for writing.

    Args:
        keys: keys holding file paths (``image``, ``label``).
        slice_key: key of the section index; absent or None means the whole file.
        tiff_series: the series of TIFF files of several (:func:`pipeline.io.choose_tiff_series`).
        rgb_to_grey: RGB(A) images become grey by luminance (:func:`pipeline.io.readers.colour_to_grey`), for a
            1-channel network; grey images saved as colour (R = G = B) are read as grey either way.

    Raises:
        ValueError: a section out of range; an array that is not an image (:func:`pipeline.io.channel_first`);
            the readers' errors (:func:`pipeline.io.read_image`).
    """

    def __init__(
        self, keys: KeysCollection, slice_key: str = "slice", tiff_series: int | None = None, allow_missing_keys: bool = False,
        rgb_to_grey: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slice_key, self.tiff_series, self.rgb_to_grey = slice_key, tiff_series, bool(rgb_to_grey)

    def __call__(self, data: Mapping[Hashable, str]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        z = d.get(self.slice_key)
        for key in self.key_iterator(d):
            path = str(d[key])
            dataset = d.get(f"{key}_dataset")  # inside an HDF5 / zarr container (pipeline.data datalists)
            cached = z is not None and self.tiff_series is None  # sections: decode the file once
            array, meta = read_cached(path, dataset) if cached else read_image(path, tiff_series=self.tiff_series, key=dataset)
            array, reversed_axes = channel_first(array, meta, path, self.rgb_to_grey)
            spacing = [float(v) for v in np.asarray(meta.get("spacing", [1.0] * (array.ndim - 1)), dtype=float).ravel()]
            spacing = (spacing[::-1] if reversed_axes else spacing)[-(array.ndim - 1):]
            if z is None:
                meta = {**meta, "filename_or_obj": path, "axes_reversed": reversed_axes}
                d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), meta=meta)
                continue
            if array.ndim != 4 or not -array.shape[1] <= z < array.shape[1]:
                sections = array.shape[1] if array.ndim == 4 else 0
                raise ValueError(f"{path}: section {z} out of range, the file has {sections} sections")
            section = np.array(array[:, z], copy=True)  # the cached file stays read-only
            d[key] = MetaTensor(
                torch.from_numpy(section),
                affine=torch.diag(torch.tensor([*spacing[1:], 1.0], dtype=torch.float64)),
                meta={"filename_or_obj": path, "spacing": spacing[1:], "slice": int(z)},
            )
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
        ome = src.name.lower().endswith((".ome.tif", ".ome.tiff"))  # stem() drops ".ome": keep an OME-TIFF one
        ext = self.output_ext or (".ome" if ome else "") + _suffix(src)
        # PNG holds no float32 (probabilities go to TIFF); JPEG/BMP are read, not written (both go to TIFF)
        suffixes = {"probabilities": ".tif" if ext in NO_FLOAT_SUFFIXES else ext, "mask": ".tif" if ext in READ_ONLY_SUFFIXES else ext}
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
        nodata = meta.pop("nodata", None)  # NormalizeSectionsd(fill_nan=True): no-data pixels of the input
        nodata = None if nodata is None else np.asarray(nodata.cpu() if hasattr(nodata, "cpu") else nodata, dtype=bool)
        for key in self.key_iterator(d):
            prob = foreground_probability(d[key])
            if meta.get("axes_reversed"):  # NIfTI: back to the file's (x, y, z)
                prob = prob.permute(*reversed(range(prob.ndim)))
                nodata = None if nodata is None else nodata.transpose()
            outputs = encode_prediction(prob, self.threshold, self.write, nodata)
            for what, path in targets.items():  # in a container: a dataset named after what it holds
                write_image(outputs[what], path, meta={**meta, "dataset": what}, overwrite=self.overwrite)
        return d
