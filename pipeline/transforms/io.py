"""Loading and writing: files and sections of stacks in (the one read path), predictions out (MONAI ``transforms/io``)."""

from __future__ import annotations

from pathlib import Path
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from pipeline.io import channel_first, read_cached, read_image, stem, write_image
from pipeline.io.common import NO_FLOAT_SUFFIXES, READ_ONLY_SUFFIXES, _suffix
from pipeline.instances import make_instances, parse_rules
from pipeline.transforms.post import OUTPUTS, check_output_settings, class_probabilities, encode_classes, encode_prediction


class LoadSectiond(MapTransform):
    """Load the files named under ``keys`` as channel-first ``MetaTensor``s ``(C, *spatial)``: the one
    read path of training, evaluation and in-memory inference.

    Axes follow :func:`pipeline.io.channel_first`: colour samples first, spatial axes ``(Z,) Y, X``
    (NIfTI's ``(x, y, z)`` reversed, marked ``meta["axes_reversed"]`` so that
    :class:`WritePredictiond` writes predictions back in the file's order). When the item has a
    ``slice_key`` entry ``z``, only section ``z`` is returned, so stacks give 2D training samples (an entry
    ``slices`` = ``[start, stop)`` returns those sections as a stack);
    those files are decoded once for all their sections (:func:`pipeline.io.read_cached`). A whole
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
        slices = d.get(f"{self.slice_key}s")  # [start, stop): a range of sections, kept as a stack
        for key in self.key_iterator(d):
            path = str(d[key])
            dataset = d.get(f"{key}_dataset")  # inside an HDF5 / zarr container (pipeline.data datalists)
            cached = z is not None and self.tiff_series is None  # sections: decode the file once
            array, meta = read_cached(path, dataset) if cached else read_image(path, tiff_series=self.tiff_series, key=dataset)
            array, reversed_axes = channel_first(array, meta, path, self.rgb_to_grey)
            spacing = [float(v) for v in np.asarray(meta.get("spacing", [1.0] * (array.ndim - 1)), dtype=float).ravel()]
            spacing = (spacing[::-1] if reversed_axes else spacing)[-(array.ndim - 1):]
            if z is None and slices is not None:
                start, stop = (int(v) for v in slices)
                if array.ndim != 4 or not 0 <= start < stop <= array.shape[1]:
                    raise ValueError(f"{path}: sections [{start}, {stop}) out of range, the file has "
                                     f"{array.shape[1] if array.ndim == 4 else 0} sections")
                array = array[:, start:stop]
                meta = {**meta, "slices": [start, stop]}
            if z is None:
                meta = {**meta, "filename_or_obj": path, "axes_reversed": reversed_axes}
                d[key] = MetaTensor(torch.from_numpy(torch_ready(array)), meta=meta)
                continue
            if array.ndim != 4 or not -array.shape[1] <= z < array.shape[1]:
                sections = array.shape[1] if array.ndim == 4 else 0
                raise ValueError(f"{path}: section {z} out of range, the file has {sections} sections")
            section = np.array(torch_ready(array[:, z]), copy=True)  # the cached file stays read-only
            d[key] = MetaTensor(
                torch.from_numpy(section),
                affine=torch.diag(torch.tensor([*spacing[1:], 1.0], dtype=torch.float64)),
                meta={"filename_or_obj": path, "spacing": spacing[1:], "slice": int(z)},
            )
        return d


def torch_ready(array: np.ndarray) -> np.ndarray:
    """``array`` in a dtype ``torch.from_numpy`` takes: native byte order, and the canonical NumPy type of
    its kind and size (TIFF readers return ``numpy.ulonglong`` for uint64, which torch refuses although
    it takes ``numpy.uint64``: CREMI's uint64 neuron ids)."""
    dt = array.dtype
    native = np.dtype(f"{dt.kind}{dt.itemsize}") if dt.kind in "biufc" else dt
    return np.ascontiguousarray(array, dtype=native)


class WritePredictiond(MapTransform):
    """Write a prediction next to nothing but its own name: ``output_dir/{probabilities,masks,instances}/<input name>``.

    ``pred`` holds logits ``(C, *spatial)`` for the image in ``image_key`` (whose meta gives
    the file name, spacing and affine). A network of two classes (soft-max of 2 channels, or the
    sigmoid of 1) writes its foreground probability (class 1) as float32 and the mask as uint8 0/255
    (foreground = probability > ``threshold``); one of more classes writes the probabilities of all
    classes ``(C, *spatial)`` and the mask as the uint8 class index of the arg-max. ``instances``
    writes, per rule of ``instances`` (:mod:`pipeline.instances`), uint32 ids to
    ``instances/<rule name>/<input name>`` (in a container: the dataset ``<rule name>``).
    Files keep the input's name and format; formats that cannot hold float32 or uint32 (PNG) get
    TIFF. Existing files are refused unless ``overwrite`` is set; every write is atomic
    (:func:`pipeline.io.write_image`).

    Args:
        keys: the prediction key (``"pred"``).
        output_dir: folder that receives ``probabilities/``, ``masks/`` and ``instances/``.
        image_key: key of the input image, for the name and meta.
        write: any of ``"probabilities"``, ``"mask"``, ``"instances"``.
        output_ext: force one output format (e.g. ``".nii.gz"``); default the input's.
        threshold: probability above which a pixel is foreground (two classes).
        overwrite: replace existing outputs.
        instances: ``{name: rule}`` (:func:`pipeline.instances.parse_rules`), used when ``write`` lists instances.

    Raises:
        ValueError: bad ``write``, ``threshold`` or ``instances`` (at construction); an instance rule that reads a
            class the network does not predict.
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
        instances: Mapping | None = None,
    ) -> None:
        super().__init__(keys)
        self.output_dir, self.image_key, self.write = output_dir, image_key, check_output_settings(write, threshold, instances)
        self.output_ext, self.threshold, self.overwrite = output_ext, threshold, overwrite
        self.rules = parse_rules(instances) if "instances" in self.write else {}

    def targets(self, source: str) -> dict[str, Path]:
        """The output file of each ``write`` entry for the input file ``source`` (``instances/<rule>`` for instances)."""
        src = Path(str(source))
        name = stem(src)
        ome = src.name.lower().endswith((".ome.tif", ".ome.tiff"))  # stem() drops ".ome": keep an OME-TIFF one
        ext = self.output_ext or (".ome" if ome else "") + _suffix(src)
        # PNG holds no float32 or uint32 (probabilities, instances go to TIFF); JPEG/BMP are read, not written (all go to TIFF)
        wide, narrow = (".tif" if ext in NO_FLOAT_SUFFIXES else ext), (".tif" if ext in READ_ONLY_SUFFIXES else ext)
        out = Path(self.output_dir)
        found = {"probabilities": out / "probabilities" / f"{name}{wide}", "mask": out / "masks" / f"{name}{narrow}"}
        found.update({f"instances/{rule}": out / "instances" / rule / f"{name}{wide}" for rule in self.rules})
        return {what: path for what, path in found.items() if what.split("/")[0] in self.write}

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
            probs = class_probabilities(d[key])  # (C >= 2, *spatial)
            if meta.get("axes_reversed"):  # NIfTI: back to the file's (x, y, z)
                probs = probs.permute(0, *reversed(range(1, probs.ndim)))
                nodata = None if nodata is None else nodata.transpose()
            per_pixel = [w for w in self.write if w in OUTPUTS]
            if probs.shape[0] == 2:
                outputs = encode_prediction(probs[1], self.threshold, per_pixel, nodata)
            else:
                outputs = encode_classes(probs, per_pixel, nodata)
            if self.rules:
                values = probs.cpu().numpy()
                for rule_name, rule in self.rules.items():
                    ids = make_instances(values, rule)
                    outputs[f"instances/{rule_name}"] = ids if nodata is None else np.where(nodata, 0, ids).astype(np.uint32)
            for what, path in targets.items():  # in a container: a dataset named after what it holds
                spatial = {"spatial_shape": list(probs.shape[1:])} if what == "probabilities" and probs.shape[0] > 2 else {}
                write_image(outputs[what], path, meta={**meta, **spatial, "dataset": what.split("/")[-1]}, overwrite=self.overwrite)
        return d
