"""bioimage.io model packages (spec 0.5, via ``bioimageio.spec``) of a trained network.

- :func:`export_bioimageio`: a package that ilastik, deepImageJ, napari, QuPath and ``bioimageio.core`` open: the
  model :class:`pipeline.export.ProbabilityUNet` (probabilities of the input's size), its TorchScript and state-dict
  weights, the halo bioimage.io's tiling needs (:func:`package_tiling`), test tensors, a cover and the paper.

Such a package loads back as the network it holds through :func:`pipeline.checkpoints.load_bioimageio` (weights read
by the checkpoints' rule, ``weights_only=True``; no code of the package is run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.export import AXES, PAPER, PAPER_DOI, ProbabilityUNet
from pipeline.networks import UNet

def _sample(network: UNet, sample_input: str | os.PathLike | None, size: int) -> np.ndarray:
    """A test input: ``(1, C, *spatial)`` float32 raw grey values of a size the package takes: ``size`` per in-plane
    axis, at least the package's smallest input (:func:`package_tiling`; a ``"same"`` network: the valid size nearest
    ``size``), the smallest size in z; from the centre of ``sample_input`` (its first channel and middle sections) or
    of a synthetic EM image."""
    from pipeline.io import read_image
    from pipeline.synthetic import make_image, make_stack

    dims, g = network.spatial_dims, network.geometry
    mins, steps = g.min_input_sizes(dims), g.steps(dims)
    halos = package_tiling(network)[0]
    if network.padding == "valid":  # the package's model takes any size from its smallest input
        mins, steps = package_tiling(network)[1], (1,) * dims
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
            rule = (f"twice its halo, {halos[axis]}, plus the pooling step" if network.padding == "valid"
                    else f"valid sizes: {mins[axis]} + {steps[axis]} * n")
            raise ValueError(f"sample_input {str(sample_input)!r} is {n} px along axis {axis}; the package needs at least "
                             f"{mins[axis]} ({rule})")
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
    steps, margins = network.geometry.steps(dims), network.geometry.margins(dims)
    halos, mins = package_tiling(network)
    axes = AXES[dims]
    per_axis = " / ".join
    if network.padding == "valid":
        sizes = f"any, at least {per_axis(map(str, mins))} px ({'/'.join(axes)})"
        geometry = (
            f"Unpadded (valid) convolutions: the U-Net sees {per_axis(map(str, margins))} px of context per side. The model "
            f"mirror-pads its input (reflect) by that margin and to a valid size and keeps the input's extent, so the "
            f"output has the input's size and equals the pipeline's overlap-tile prediction of the same normalised image. "
            f"The output declares a halo of {per_axis(map(str, halos))} px (the widest context of a pixel, "
            f"{per_axis(str(m + s - 1) for m, s in zip(margins, steps))} px, rounded up to the pooling step "
            f"{per_axis(map(str, steps))}): bioimage.io tools pad an image by it (reflect) and overlap tiles by it. Tiles "
            f"whose size is a multiple of {per_axis(map(str, steps))} (bioimageio.core: `blocksize_parameter` a multiple "
            f"of it) on an image whose size is one keep the U-Net's pooling grid and give exactly the untiled result; "
            f"otherwise the last tile of an axis is computed on another pooling grid: a prediction as valid, but not the "
            f"same numbers (a U-Net with poolings is shift-equivariant only by multiples of the step).")
    else:
        sizes = ", ".join(f"{a}: {m} + {s} n" for a, m, s in zip(axes, mins, steps)) + " (n >= 0)"
        geometry = "Padded convolutions: the output has the input's size."
    return f"""# {name}

{description}

The U-Net of Ronneberger, Fischer and Brox (MICCAI 2015, doi:{PAPER_DOI}), exported by the EM U-Net pipeline
(a MONAI bundle). Architecture (as its checkpoint records it): `{json.dumps(network.architecture)}`.

## Inputs and outputs

- Input `image`: {network.in_channels} grey channel(s), axes {"/".join(axes)}; sizes {sizes}.
  Preprocessing: zero mean, unit variance per sample, channel and section (as in training).
- Output `prediction`: probabilities of {", ".join(channel_names)}
  ({"soft-max" if network.out_channels > 1 else "sigmoid"} inside the model), the input's size.
- {geometry}

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
    recorded arguments: the U-Net that mirror-pads its input by the margin itself, so its output has the input's
    size and equals the pipeline's overlap-tile prediction); input ``image`` (batch, channel, [z,] y, x) of any size
    from the package minimum (:func:`package_tiling`: ``ParameterizedSize(min=240, step=1)`` for the paper's
    network, reflect padding declared); output ``prediction`` of the input's size with the halo bioimage.io's
    tiling must overlap (112 px for the paper's network: the margin, 92, plus the pooling step less one, rounded
    up to the step); preprocessing ``zero_mean_unit_variance`` over the in-plane axes (per sample, channel and
    section, as training normalises); the activation inside the model;
    test input and output tensors (``.npy``); a cover (input | prediction PNG); the paper as citation
    (doi 10.1007/978-3-319-24574-4_28); ``license`` and ``authors``.

    Args:
        network: the trained network (e.g. :func:`pipeline.checkpoints.network_from_checkpoint`).
        output_path: the ``.zip`` to write.
        authors: names, or dicts of bioimage.io's author fields (``name``, ``affiliation``, ``orcid``, ...).
        channel_names: one per output channel (default: membrane, interior for 2 channels).
        sample_input: an image or stack to crop the test tensor from (default: a synthetic EM image).
        sample_size: in-plane size of the test input (at least the package minimum, within the sample).
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


def package_tiling(network: UNet) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The halo and the smallest input per axis that a package of a valid ``network`` declares, so that bioimage.io's
    tiling (``bioimageio.core``'s ``predict`` with ``blocksize_parameter``) reproduces the pipeline's prediction:
    ``((112, 112), (240, 240))`` for the paper's network (margin 92, pooling step 16).

    The halo is the widest context any output pixel has: its margin plus ``step - 1`` (a pixel's receptive field
    depends on where it lies on the pooling grid: 92 px on one side and up to 107 on the other for the paper's network),
    rounded up to a multiple of the step so that tiles keep the pipeline's pooling grid. The smallest input is
    ``2 * halo + step``: a tile keeps at least one step of output, and tiles whose size is a multiple of the step
    start on the grid. ``((0, ...), min_input_sizes)`` for a ``"same"`` network."""
    dims, g = network.spatial_dims, network.geometry
    if network.padding != "valid":
        return (0,) * dims, tuple(g.min_input_sizes(dims))
    steps, margins = g.steps(dims), g.margins(dims)
    halos = tuple(s * -(-(m + s - 1) // s) for m, s in zip(margins, steps))
    return halos, tuple(2 * h + s for h, s in zip(halos, steps))


def _tensor_descriptions(tmp: Path, network: UNet, eps: float, channel_names: list[str]) -> tuple[list, list]:
    """The package's input ``image`` and output ``prediction``, with their test tensors in ``tmp``.

    A valid network's package: input sizes ``ParameterizedSize(min, step=1)`` (any size from :func:`package_tiling`'s
    minimum, 240 for the paper's network), mirror padding declared (``reflect``, the pipeline's); output of the input's
    size (``SizeReference``, offset 0) with the halo of :func:`package_tiling` (``SpaceOutputAxisWithHalo``, 112):
    ``bioimageio.core`` pads a whole image by the halo and crops it from the output, and overlaps tiles by it. A
    ``"same"`` network's: ``ParameterizedSize(min, step)`` of its geometry, output of the input's size, no halo."""
    import bioimageio.spec.model.v0_5 as spec

    dims = network.spatial_dims
    axes = AXES[dims]
    valid = network.padding == "valid"
    halos, mins = package_tiling(network)
    steps = (1,) * dims if valid else network.geometry.steps(dims)
    names = ["image"] if network.in_channels == 1 else [f"image_{i}" for i in range(network.in_channels)]
    batch, channel = spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(n) for n in names])
    in_axes = [batch, channel] + [
        spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=m, step=s)) for a, m, s in zip(axes, mins, steps)]

    def size(a: str):
        return spec.SizeReference(tensor_id=spec.TensorId("image"), axis_id=spec.AxisId(a), offset=0)

    out_axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in channel_names])] + [
        spec.SpaceOutputAxisWithHalo(id=spec.AxisId(a), size=size(a), halo=h) if h
        else spec.SpaceOutputAxis(id=spec.AxisId(a), size=size(a)) for a, h in zip(axes, halos)]
    inputs = [spec.InputTensorDescr(
        id=spec.TensorId("image"), axes=in_axes, test_tensor=spec.FileDescr(source=tmp / "test_input.npy"),
        description="raw grey values (any range)",
        # mode given explicitly: bioimageio.spec 0.5.12 leaves a default out when saving, and reads `pad: {}` back as zeros
        pad=spec.ReflectPadding(mode="reflect"),
        preprocessing=[
            spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
            spec.ZeroMeanUnitVarianceDescr(kwargs=spec.ZeroMeanUnitVarianceKwargs(
                axes=[spec.AxisId(a) for a in ("y", "x")], eps=eps)),
        ],
    )]
    outputs = [spec.OutputTensorDescr(
        id=spec.TensorId("prediction"), axes=out_axes, test_tensor=spec.FileDescr(source=tmp / "test_output.npy"),
        description="probabilities per class, the input's size" + (
            f"; tiles: crop the halo ({halos[-1]} px), sizes multiples of {network.geometry.steps(dims)[-1]} keep "
            "the pooling grid" if valid else ""),
    )]
    return inputs, outputs


def _model_description(tmp: Path, network: UNet, eps: float, channel_names: list[str], *, name: str, description: str,
                       authors: Sequence[dict | str], license: str, tags: Sequence[str]):
    """The bioimage.io ``ModelDescr`` of the files in ``tmp`` (:func:`_write_package_files`): tensors, both weights
    (``pytorch_state_dict`` of ``pipeline.export.ProbabilityUNet`` with the network's recorded arguments, and its
    TorchScript), the paper as citation, ``authors``, ``license``, ``tags``, the architecture, margin, halo and
    smallest input (:func:`package_tiling`) as config."""
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
    halos, min_sizes = package_tiling(network)
    doc = tmp / "README.md"
    people = [spec.Author(name=a) if isinstance(a, str) else spec.Author(**a) for a in authors]
    return spec.ModelDescr(
        name=name, description=description, authors=people,
        cite=[spec.CiteEntry(text=PAPER, doi=spec.Doi(PAPER_DOI))],
        license=spec.LicenseId(license), documentation=spec.FileDescr(source=doc),
        covers=[spec.FileDescr(source=tmp / "cover.png")], tags=list(tags),
        inputs=inputs, outputs=outputs, weights=weights,
        config={"em_unet": {"architecture": network.architecture, "margin": list(margins), "halo": list(halos),
                            "min_input_size": list(min_sizes)}},
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
