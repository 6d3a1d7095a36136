"""Export a trained checkpoint for other tools, and read such exports back.

- :func:`network_data_format`: the bundle metadata's ``network_data_format`` (MONAI bundle spec) of a
  :class:`pipeline.networks.UNet`, from its recorded architecture: channels and the spatial-shape
  formulas (``"16*n+172"`` in, ``"16*n-12"`` out for the paper's valid network of depth 4).
- :func:`bundle_metadata`: ``metadata.json`` merged with the fragment an overlay ships beside it
  (``configs/<overlay>_metadata.json``), as ``--meta_file "['...', '...']"`` merges them.
- :func:`export_torchscript`: a scripted network with the config it was run with embedded (all files
  and overrides merged, the architecture written out) and the metadata of that network.
- :func:`export_bioimageio`: a BioImage Model Zoo package (bioimage.io spec 0.5, via ``bioimageio.spec``)
  that ilastik, deepImageJ, napari and QuPath open; :func:`load_bioimageio` reads one of this architecture back.

The exported model computes probabilities (:class:`ProbabilityUNet`: soft-max over the classes, or a
sigmoid for one channel), so a package is complete without this project's post-processing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.networks import UNet

#: Ronneberger, Fischer, Brox (MICCAI 2015), the paper this network implements
PAPER = "Ronneberger O., Fischer P., Brox T. U-Net: Convolutional Networks for Biomedical Image Segmentation. MICCAI 2015, LNCS 9351, pp. 234-241"
PAPER_DOI = "10.1007/978-3-319-24574-4_28"
AXES = {2: ("y", "x"), 3: ("z", "y", "x")}


class ProbabilityUNet(nn.Module):
    """:class:`pipeline.networks.UNet` followed by its activation: ``(B, C_in, *spatial)`` ->
    probabilities ``(B, C_out, *out_spatial)``, a soft-max over the channels (``out_channels`` >= 2) or a
    sigmoid (1 channel, BCE-trained). Its ``state_dict`` is the UNet's under ``unet.``.

    Args: those of :class:`pipeline.networks.UNet` (``dropout`` is ignored: it is exported in eval mode).
    """

    def __init__(self, **architecture: Any) -> None:
        super().__init__()
        self.unet = UNet(**{**architecture, "dropout": 0.0})
        self.softmax = self.unet.out_channels > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.unet(x)
        if self.softmax:
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)


def shape_formulas(network: UNet) -> tuple[list[str], list[str]]:
    """Valid input and output sizes per axis as MONAI's metadata writes them (``n`` >= 1):
    ``(["16*n+172", ...], ["16*n-12", ...])`` for the paper's valid network (188, 204, ... -> 4, 20, ...);
    ``"16*n"`` both ways for a padded one (any size works; multiples of the pooling step avoid padding)."""
    geometry, dims = network.geometry, network.spatial_dims
    steps = geometry.steps(dims)
    if network.padding != "valid":
        return [f"{s}*n" for s in steps], [f"{s}*n" for s in steps]

    def formula(step: int, offset: int) -> str:
        return f"{step}*n" + (f"+{offset}" if offset > 0 else f"-{-offset}" if offset < 0 else "")

    mins, margins = geometry.min_input_sizes(dims), geometry.margins(dims)
    return ([formula(s, m - s) for s, m in zip(steps, mins)],
            [formula(s, m - s - 2 * g) for s, m, g in zip(steps, mins, margins)])


def network_data_format(network: UNet, channel_def: dict | None = None) -> dict:
    """The ``network_data_format`` of MONAI's bundle metadata for ``network`` (shapes :func:`shape_formulas`;
    input ``image`` float32 with its channels, output ``pred`` with ``channel_def``)."""
    inputs, outputs = shape_formulas(network)
    return {
        "inputs": {"image": {
            "type": "image", "format": "magnitude", "modality": "EM", "num_channels": network.in_channels,
            "spatial_shape": inputs, "dtype": "float32", "value_range": [], "is_patch_data": True,
            "channel_def": {str(i): "image" for i in range(network.in_channels)},
        }},
        "outputs": {"pred": {
            "type": "image", "format": "segmentation", "num_channels": network.out_channels,
            "spatial_shape": outputs, "dtype": "float32", "value_range": [], "is_patch_data": True,
            "channel_def": channel_def or {str(i): f"class {i} (logit)" for i in range(network.out_channels)},
        }},
    }


def metadata_fragment(overlay: str | os.PathLike) -> Path | None:
    """The metadata fragment an overlay ships beside it (``configs/x.yaml`` -> ``configs/x_metadata.json``), or None."""
    path = Path(overlay)
    fragment = path.with_name(path.stem + "_metadata.json")
    return fragment if fragment.is_file() else None


def bundle_metadata(config_files: Sequence[str | os.PathLike], meta_file: str | os.PathLike | None = None) -> tuple[dict, list[str]]:
    """``metadata.json`` (beside the first config file, or ``meta_file``) merged with the fragment of each
    overlay that has one. Returns the merged dict and the files read (for ``--meta_file``)."""
    files = [Path(meta_file) if meta_file else Path(config_files[0]).parent / "metadata.json"]
    files += [f for f in (metadata_fragment(c) for c in config_files[1:]) if f is not None]
    from monai.bundle import ConfigParser

    names = [str(f) for f in files]
    return ConfigParser.load_config_files(names), names  # merged as --meta_file merges them ('#' ids set nested entries)


def merged_config(config_files: Sequence[str | os.PathLike], overrides: dict | None = None) -> dict:
    """The raw config MONAI runs: the files merged in order (later ids replace earlier ones, ``a#b`` ids
    set nested entries) and then ``overrides``; expressions are kept as written."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    for key, value in (overrides or {}).items():
        parser[key] = value
    return copy.deepcopy(parser.get())


def export_torchscript(network: UNet, filepath: str | os.PathLike, config: dict | None = None, metadata: dict | None = None,
                       overwrite: bool = False) -> str:
    """Script ``network`` (``torch.jit.script``: every valid input size works, unlike tracing) and save it with
    MONAI's ``save_net_with_metadata``, embedding ``metadata.json`` (``metadata`` with the network's own
    ``network_data_format``) and ``inference.json``: ``config`` with ``architecture`` set to the network's
    record, so the file says which network it holds (``monai.data.load_net_with_metadata`` reads both back).

    Returns the path written (``.ts`` added when there is no suffix), replaced atomically.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is false (:func:`pipeline.io.check_outputs`).
    """
    from monai.data import save_net_with_metadata

    from pipeline.io import check_outputs, replace_atomically

    filepath = Path(filepath)
    if not filepath.suffix:
        filepath = filepath.with_suffix(".ts")
    check_outputs({}, [filepath], "torchscript", overwrite=overwrite)
    meta = copy.deepcopy(metadata or {})
    channel_def = ((meta.get("network_data_format") or {}).get("outputs", {}).get("pred", {}).get("channel_def"))
    if not isinstance(channel_def, dict) or len(channel_def) != network.out_channels:  # metadata of another overlay
        channel_def = None
    meta["network_data_format"] = network_data_format(network, channel_def)
    config = copy.deepcopy(config or {})
    config.pop("_meta_", None)
    config["architecture"] = dict(network.architecture)
    scripted = torch.jit.script(network.eval())

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as stream:
            save_net_with_metadata(scripted, stream, meta_values=meta,
                                   more_extra_files={"inference.json": json.dumps(config).encode()})

    replace_atomically(filepath, save)
    print(f"wrote {filepath} (TorchScript; embeds inference.json and metadata.json)")
    return str(filepath)


# ---------------------------------------------------------------- bioimage.io (spec 0.5)

def _sample(network: UNet, sample_input: str | os.PathLike | None, size: int) -> np.ndarray:
    """A test input: ``(1, C, *spatial)`` float32 raw grey values, the valid size nearest ``size`` per in-plane
    axis (the smallest valid size in z), from the centre of ``sample_input`` (its first channel and middle
    sections) or of a synthetic EM image."""
    from pipeline.io import read_image
    from pipeline.synthetic import make_image, make_stack

    dims, g = network.spatial_dims, network.geometry
    mins, steps = g.min_input_sizes(dims), g.steps(dims)
    wanted = [m if (dims == 3 and i == 0) else m + steps[i] * max(0, round((size - m) / steps[i])) for i, m in enumerate(mins)]
    if sample_input is None:
        shape = tuple(w + (2 if dims == 3 and i == 0 else 32) for i, w in enumerate(wanted))
        image = make_image(shape, seed=123)[0] if dims == 2 else make_stack(shape, seed=123)[0]
        image = (image * 255).astype(np.float32)
    else:
        image, _ = read_image(sample_input)
        image = np.asarray(image, dtype=np.float32)
        if image.ndim == dims + 1 and image.shape[-1] in (3, 4):  # colour last: grey by the mean
            image = image[..., :3].mean(-1)
        while image.ndim > dims:  # a stack for a 2D network: its middle section
            image = image[image.shape[0] // 2]
        if image.ndim != dims:
            raise ValueError(f"sample_input {str(sample_input)!r} has shape {image.shape}; a {dims}D network needs a {dims}D image")
    out = []
    for axis, (n, w) in enumerate(zip(image.shape, wanted)):
        if n < mins[axis]:
            raise ValueError(f"sample_input {str(sample_input)!r} is {n} px along axis {axis}; the network needs at least "
                             f"{mins[axis]} (valid sizes: {mins[axis]} + {steps[axis]} * n)")
        out.append(min(w, mins[axis] + steps[axis] * ((n - mins[axis]) // steps[axis])))
    start = [(n - o) // 2 for n, o in zip(image.shape, out)]
    crop = image[tuple(slice(s, s + o) for s, o in zip(start, out))]
    return np.ascontiguousarray(crop[None, None], dtype=np.float32).repeat(network.in_channels, axis=1)


def _normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """The package's preprocessing, as bioimage.io's ``zero_mean_unit_variance`` over the in-plane axes:
    per sample, channel and section (pipeline.transforms.NormalizeSectionsd), ``(x - mean) / (std + eps)``."""
    mean = x.mean(axis=(-2, -1), keepdims=True)
    std = x.std(axis=(-2, -1), keepdims=True)
    return ((x - mean) / (std + eps)).astype(np.float32)


def _cover(image: np.ndarray, probabilities: np.ndarray, path: Path, channel: int) -> None:
    """``input | prediction`` PNG: the test input's centre (grey) beside the probability of ``channel``."""
    import imageio.v3 as iio

    img = image[0, 0] if image.ndim == 4 else image[0, 0, image.shape[2] // 2]
    prob = probabilities[0, channel] if probabilities.ndim == 4 else probabilities[0, channel, probabilities.shape[2] // 2]
    crop = [(a - b) // 2 for a, b in zip(img.shape, prob.shape)]
    img = img[crop[0]:crop[0] + prob.shape[0], crop[1]:crop[1] + prob.shape[1]]
    lo, hi = np.percentile(img, (0.5, 99.5))
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)
    gap = np.ones((prob.shape[0], 4))
    panel = (np.concatenate([grey, gap, np.clip(prob, 0, 1)], axis=1) * 255).astype(np.uint8)
    iio.imwrite(path, panel)


def _documentation(network: UNet, name: str, description: str, channel_names: list[str]) -> str:
    dims = network.spatial_dims
    mins, steps = network.geometry.min_input_sizes(dims), network.geometry.steps(dims)
    margins = network.geometry.margins(dims)
    axes = AXES[dims]
    sizes = ", ".join(f"{a}: {m} + {s} n" for a, m, s in zip(axes, mins, steps))
    return f"""# {name}

{description}

The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015, doi:{PAPER_DOI}), exported by the EM U-Net pipeline
(a MONAI bundle). Architecture (as its checkpoint records it): `{json.dumps(network.architecture)}`.

## Inputs and outputs

- Input `image`: {network.in_channels} grey channel(s), axes {"/".join(axes)}; valid sizes {sizes} (n >= 0).
  Preprocessing: zero mean, unit variance per sample, channel and section (as in training).
- Output `prediction`: probabilities of {", ".join(channel_names)}
  ({"soft-max" if network.out_channels > 1 else "sigmoid"} inside the model).
- {"Unpadded (valid) convolutions: the output is " + " / ".join(str(2 * m) for m in margins) + " px smaller than the input per axis, centred (a halo of " + " / ".join(map(str, margins)) + " px per side). Tile with overlapping inputs (overlap-tile, mirror padding at the image border) to predict a whole image." if network.padding == "valid" else "Padded convolutions: the output has the input's size."}

## Validation

The test input and output in this package are a crop of the sample given at export (by default a synthetic EM
image) and its prediction by the exported weights; `bioimageio.core`'s `test_model` passed on them at
export. Segmentation quality on real EM (ISBI 2012 sections held out from training and tuning) is reported in the
pipeline's `docs/benchmarks.md`.

## Limitations

Trained for EM sections at the pixel size of its training data; other pixel sizes, modalities or staining need
fine-tuning. Not for clinical use.
"""


def export_bioimageio(
    network: UNet,
    output_path: str | os.PathLike,
    *,
    name: str = "EM U-Net (Ronneberger 2015)",
    description: str = "U-Net for cell-membrane segmentation in electron-microscopy sections",
    authors: Sequence[dict | str] = ("EM U-Net pipeline contributors",),
    license: str = "Apache-2.0",
    tags: Sequence[str] = ("unet", "segmentation", "electron-microscopy", "membranes", "pytorch"),
    channel_names: Sequence[str] | None = None,
    sample_input: str | os.PathLike | None = None,
    sample_size: int = 252,
    documentation: str | os.PathLike | None = None,
    test: bool = True,
    overwrite: bool = False,
) -> str:
    """Write ``network`` as a bioimage.io model package (spec 0.5, a ``.zip``) with ``bioimageio.spec``.

    The package holds: TorchScript weights (``torch.jit.script`` of :class:`ProbabilityUNet`) and
    ``pytorch_state_dict`` weights (architecture ``pipeline.export.ProbabilityUNet`` with the network's
    recorded arguments); input ``image`` (batch, channel, [z,] y, x) with ``ParameterizedSize(min, step)`` per
    axis from the network's geometry; output ``prediction`` whose spatial sizes are ``SizeReference``\\ s to the
    input with ``offset = -2 * margin`` (-184 for the paper's network: a valid network's output is smaller; the
    margin, 92, is the halo a consumer's tiling must overlap); preprocessing ``zero_mean_unit_variance`` over the
    in-plane axes (per sample, channel and section, as training normalises); the activation inside the model;
    test input and output tensors (``.npy``); a cover (input | prediction PNG); the paper as citation
    (doi 10.1007/978-3-319-24574-4_28); ``license`` and ``authors``.

    Args:
        network: the trained network (e.g. :func:`pipeline.checkpoints.network_from_checkpoint`).
        output_path: the ``.zip`` to write.
        authors: names, or dicts of bioimage.io's author fields (``name``, ``affiliation``, ``orcid``, ...).
        channel_names: one per output channel (default: membrane, interior for 2 channels).
        sample_input: an image or stack to crop the test tensor from (default: a synthetic EM image).
        sample_size: in-plane size of the test input (rounded to a valid size, within the sample).
        documentation: a markdown file (default: one written from the architecture).
        test: run ``bioimageio.core.test_model`` on the written package and raise if it fails.
        overwrite: replace an existing ``output_path``.

    Returns:
        The package path.

    Raises:
        FileExistsError: ``output_path`` exists and ``overwrite`` is false (:func:`pipeline.io.check_outputs`).
        ValueError: a sample that is too small or of the wrong dimensionality; a description that
            ``bioimageio.spec`` rejects (its validation message); a package that fails ``test_model``.
    """
    from bioimageio.spec import save_bioimageio_package

    from pipeline.io import check_outputs

    output_path = Path(output_path)
    check_outputs({}, [output_path], "package", overwrite=overwrite)
    network = network.eval().cpu()
    channel_names = _channel_names(network, channel_names)
    model = ProbabilityUNet(**network.architecture)
    model.unet.load_state_dict(network.state_dict())
    model.eval()
    eps = 1e-6

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _write_package_files(tmp, network, model, eps, sample_input=sample_input, sample_size=sample_size,
                             documentation=documentation, name=name, description=description, channel_names=channel_names)
        descr = _model_description(tmp, network, eps, channel_names, name=name, description=description, authors=authors,
                                   license=license, tags=tags)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        partial = output_path.with_name(output_path.name + ".partial.zip")
        try:
            save_bioimageio_package(descr, output_path=partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    if test:
        _test_package(partial)
    os.replace(partial, output_path)
    print(f"wrote {output_path}" + (" (bioimageio.core test_model: passed)" if test else " (not tested: test=False)"))
    return str(output_path)


def _channel_names(network: UNet, channel_names: Sequence[str] | None) -> list[str]:
    """The output channels' names as bioimage.io identifiers (default: membrane, interior for 2 channels);
    ``ValueError`` unless there is one per output channel."""
    if channel_names is None:
        channel_names = {1: ["interior"], 2: ["membrane", "interior"]}.get(
            network.out_channels, [f"class_{i}" for i in range(network.out_channels)])
    channel_names = [re.sub(r"[^A-Za-z0-9_]", "_", str(c)) for c in channel_names]
    if len(channel_names) != network.out_channels:
        raise ValueError(f"channel_names has {len(channel_names)} names; the network has {network.out_channels} output channels")
    return channel_names


def _write_package_files(tmp: Path, network: UNet, model: ProbabilityUNet, eps: float, *, sample_input: str | os.PathLike | None,
                         sample_size: int, documentation: str | os.PathLike | None, name: str, description: str,
                         channel_names: list[str]) -> None:
    """Write into ``tmp`` the files a package holds: the test tensors (``test_input.npy``, ``test_output.npy``: the
    model's probabilities), ``cover.png``, the weights (``weights.pt``, ``weights_torchscript.pt``), ``README.md``."""
    test_in = _sample(network, sample_input, sample_size)
    with torch.inference_mode():
        test_out = model(torch.from_numpy(_normalize(test_in, eps))).numpy()
    np.save(tmp / "test_input.npy", test_in)
    np.save(tmp / "test_output.npy", test_out)
    _cover(test_in, test_out, tmp / "cover.png", channel=network.out_channels - 1)
    torch.save(model.state_dict(), tmp / "weights.pt")
    torch.jit.script(model).save(str(tmp / "weights_torchscript.pt"))
    doc = tmp / "README.md"
    if documentation is not None:
        shutil.copyfile(documentation, doc)
    else:
        doc.write_text(_documentation(network, name, description, channel_names))


def _tensor_descriptions(tmp: Path, network: UNet, eps: float, channel_names: list[str]) -> tuple[list, list]:
    """The package's input ``image`` (``ParameterizedSize`` axes, preprocessing) and output ``prediction``
    (``SizeReference`` axes to the input, ``-2 * margin`` for a valid network), with their test tensors in ``tmp``."""
    import bioimageio.spec.model.v0_5 as spec

    dims = network.spatial_dims
    axes = AXES[dims]
    g = network.geometry
    mins, steps, margins = g.min_input_sizes(dims), g.steps(dims), g.margins(dims)
    names = ["image"] if network.in_channels == 1 else [f"image_{i}" for i in range(network.in_channels)]
    batch, channel = spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(n) for n in names])
    in_axes = [batch, channel] + [
        spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=m, step=s)) for a, m, s in zip(axes, mins, steps)]
    valid = network.padding == "valid"
    out_axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in channel_names])] + [
        spec.SpaceOutputAxis(id=spec.AxisId(a), size=spec.SizeReference(
            tensor_id=spec.TensorId("image"), axis_id=spec.AxisId(a), offset=-2 * m if valid else 0))
        for a, m in zip(axes, margins)]
    inputs = [spec.InputTensorDescr(
        id=spec.TensorId("image"), axes=in_axes, test_tensor=spec.FileDescr(source=tmp / "test_input.npy"),
        description="raw grey values (any range)",
        preprocessing=[
            spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
            spec.ZeroMeanUnitVarianceDescr(kwargs=spec.ZeroMeanUnitVarianceKwargs(
                axes=[spec.AxisId(a) for a in ("y", "x")], eps=eps)),
        ],
    )]
    outputs = [spec.OutputTensorDescr(
        id=spec.TensorId("prediction"), axes=out_axes, test_tensor=spec.FileDescr(source=tmp / "test_output.npy"),
        description="probabilities per class" + (f"; valid convolutions: {2 * margins[-1]} px smaller than the input per "
                                                 f"in-plane axis (halo {margins[-1]})" if valid else ""),
    )]
    return inputs, outputs


def _model_description(tmp: Path, network: UNet, eps: float, channel_names: list[str], *, name: str, description: str,
                       authors: Sequence[dict | str], license: str, tags: Sequence[str]):
    """The bioimage.io ``ModelDescr`` of the files in ``tmp`` (:func:`_write_package_files`): tensors, both weights
    (``pytorch_state_dict`` of ``pipeline.export.ProbabilityUNet`` with the network's recorded arguments, and its
    TorchScript), the paper as citation, ``authors``, ``license``, ``tags``, the architecture and margin as config."""
    import bioimageio.spec.model.v0_5 as spec

    inputs, outputs = _tensor_descriptions(tmp, network, eps, channel_names)
    kwargs = {k: v for k, v in network.architecture.items()}
    weights = spec.WeightsDescr(
        pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
            source=tmp / "weights.pt",
            architecture=spec.ArchitectureFromLibraryDescr(
                import_from="pipeline.export", callable=spec.Identifier("ProbabilityUNet"), kwargs=kwargs),
            pytorch_version=spec.Version(torch.__version__.split("+")[0]),
        ),
        torchscript=spec.TorchscriptWeightsDescr(
            source=tmp / "weights_torchscript.pt", pytorch_version=spec.Version(torch.__version__.split("+")[0]),
            parent="pytorch_state_dict"),
    )
    margins = network.geometry.margins(network.spatial_dims)
    doc = tmp / "README.md"
    people = [spec.Author(name=a) if isinstance(a, str) else spec.Author(**a) for a in authors]
    return spec.ModelDescr(
        name=name, description=description, authors=people,
        cite=[spec.CiteEntry(text=PAPER, doi=spec.Doi(PAPER_DOI))],
        license=spec.LicenseId(license), documentation=spec.FileDescr(source=doc),
        covers=[spec.FileDescr(source=tmp / "cover.png")], tags=list(tags),
        inputs=inputs, outputs=outputs, weights=weights,
        config={"em_unet": {"architecture": network.architecture, "margin": list(margins)}},
    )


def _test_package(partial: Path) -> None:
    """:func:`run_test_model` on the written package; if it fails, delete the package and raise ``ValueError``."""
    summary = run_test_model(partial)
    if summary.status != "passed":
        partial.unlink()
        raise ValueError(f"the bioimage.io package failed bioimageio.core's test_model: {summary.format() if hasattr(summary, 'format') else summary}")


def run_test_model(source: str | os.PathLike):
    """``bioimageio.core.test_model`` on a package (TorchScript and state-dict weights; batch sizes and the
    valid input sizes it tries), on the CPU. Returns its ``ValidationSummary`` (``.status == "passed"``)."""
    from bioimageio.core import test_model

    return test_model(str(source), devices=["cpu"])


def is_bioimageio(path: str | os.PathLike) -> bool:
    """A bioimage.io package: a ``.zip``, a ``rdf.yaml`` / ``bioimageio.yaml`` file, or a folder holding one."""
    path = Path(path)
    if path.is_dir():
        return any((path / n).is_file() for n in ("rdf.yaml", "bioimageio.yaml"))
    return path.suffix == ".zip" or path.name.endswith(("rdf.yaml", "bioimageio.yaml"))


def load_bioimageio(source: str | os.PathLike) -> UNet:
    """Read a bioimage.io package of this architecture (:func:`export_bioimageio`) back as the
    :class:`pipeline.networks.UNet` it holds (logits, eval mode), for the bundle's inference.

    Raises:
        ValueError: not a valid bioimage.io model description (``bioimageio.spec``'s message); a package
            without ``pytorch_state_dict`` weights of ``pipeline.export.ProbabilityUNet`` (another
            architecture: predict with ``bioimageio.core`` instead).
    """
    from bioimageio.spec import InvalidDescr, load_model_description

    descr = load_model_description(str(source), perform_io_checks=False)
    if isinstance(descr, InvalidDescr):
        raise ValueError(f"{str(source)!r} is not a valid bioimage.io model: {descr.validation_summary.format()}")
    weights = descr.weights.pytorch_state_dict
    arch = getattr(weights, "architecture", None) if weights is not None else None
    where = (getattr(arch, "import_from", None), str(getattr(arch, "callable", "")))
    if where != ("pipeline.export", "ProbabilityUNet"):
        raise ValueError(
            f"{str(source)!r} holds no pytorch_state_dict weights of pipeline.export.ProbabilityUNet (found "
            f"{where[0]}.{where[1]}): only packages exported by this pipeline load into the bundle; run others with "
            "bioimageio.core (bioimageio predict)")
    from bioimageio.core.backends.pytorch_backend import load_torch_model

    model = load_torch_model(weights, load_state=True, devices=["cpu"])
    return model.unet.eval()
