"""Issue 20: the bioimage.io package (export -> bioimageio.core's test_model -> import -> the bundle's
predictions), the TorchScript export's embedded config, the ``em-unet`` console commands end to end, and a
bundle that runs from any working directory."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from pipeline.io import write_image
from pipeline.networks import UNet
from pipeline.synthetic import make_stack, to_uint8

from conftest import CONFIGS, FEATURES, INFER, ROOT, TINY_TRAIN

EM_UNET = Path(sys.executable).with_name("em-unet")


def em_unet(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed console command (``pip install -e .`` makes it), output captured."""
    assert EM_UNET.is_file(), f"{EM_UNET} is missing: install the package (pip install -e .) to get the em-unet command"
    env = dict(os.environ, PYTHONUNBUFFERED="1", BIOIMAGEIO_CACHE_PATH=str(cwd / ".bioimageio_cache"))
    proc = subprocess.run([str(EM_UNET), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``em-unet train`` on the tiny synthetic settings (1 epoch), and a labelled 3-section TIFF stack."""
    tmp = tmp_path_factory.mktemp("console")
    ok(em_unet("train", *TINY_TRAIN, "--num_epochs", "1", "--val_interval", "1", "--ckpt_dir", str(tmp / "models"),
               "--output_dir", str(tmp / "eval"), "--data_cache_dir", str(tmp / "data"), cwd=tmp))
    image, label = make_stack((3, 70, 90), seed=3)
    write_image(to_uint8(image), tmp / "stack.tif", meta={"spacing": [50.0, 4.0, 4.0]})
    write_image(label, tmp / "labels.tif")
    return tmp


@pytest.mark.slow
def test_console_train_predict_export_import_evaluate(trained):
    """One command exports a package that passes bioimageio.core's test_model (offline cache); the package
    loads back into the bundle, whose predictions then equal the checkpoint's within 1e-5; the TorchScript
    file embeds the architecture it holds; evaluate scores the stack."""
    import bioimageio.spec
    from monai.data import load_net_with_metadata

    from pipeline.checkpoints import network_from_checkpoint

    tmp = trained
    ckpt = tmp / "models/model_final.pt"
    ok(em_unet("predict", "stack.tif", "--model", str(ckpt), "-o", "from_checkpoint", cwd=tmp))
    exported = ok(em_unet("export", "--model", str(ckpt), "-o", "export", cwd=tmp))
    assert "bioimageio.core test_model: passed" in exported.stdout + exported.stderr
    package, script = tmp / "export/em_unet.bioimageio.zip", tmp / "export/model.ts"

    descr = bioimageio.spec.load_model_description(str(package), perform_io_checks=False)
    (image,), (pred,) = descr.inputs, descr.outputs
    assert [(a.size.min, a.size.step) for a in image.axes[2:]] == [(240, 1), (240, 1)]  # any size from 2 x 112 + 16
    assert [(a.size.offset, a.halo) for a in pred.axes[2:]] == [(0, 112), (0, 112)]  # the input's size; halo 92 + 15 -> 112
    assert [str(c) for c in pred.axes[1].channel_names] == ["membrane", "interior"]
    assert descr.cite[0].doi == "10.1007/978-3-319-24574-4_28"
    with zipfile.ZipFile(package) as archive:
        test_in, test_out = (np.load(io.BytesIO(archive.read(f"test_{k}.npy"))) for k in ("input", "output"))
    assert test_in.shape == (1, 1, 252, 252) and test_out.shape == (1, 2, 252, 252)
    np.testing.assert_allclose(test_out.sum(1), 1.0, atol=1e-5)  # soft-max probabilities inside the model

    network = network_from_checkpoint(package)
    original = network_from_checkpoint(ckpt)
    assert network.architecture == original.architecture
    assert all(torch.equal(a, b) for a, b in zip(network.state_dict().values(), original.state_dict().values()) if torch.is_tensor(a))
    ok(em_unet("predict", "stack.tif", "--model", str(package), "-o", "from_package", cwd=tmp))
    a = tifffile.imread(tmp / "from_checkpoint/probabilities/stack.tif")
    b = tifffile.imread(tmp / "from_package/probabilities/stack.tif")
    assert a.shape == (3, 70, 90)
    np.testing.assert_allclose(b, a, atol=1e-5)
    assert np.array_equal(tifffile.imread(tmp / "from_checkpoint/masks/stack.tif"), tifffile.imread(tmp / "from_package/masks/stack.tif"))

    scripted, meta, extra = load_net_with_metadata(str(script), more_extra_files=("inference.json",))
    config = json.loads(extra["inference.json"])
    assert config["architecture"]["features"] == FEATURES  # not train.yaml's 64..1024
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 2
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == ["16*n+172", "16*n+172"]
    x = torch.randn(1, 1, 220, 252)
    with torch.inference_mode():
        assert (scripted(x) - original(x)).abs().max().item() <= 1e-5

    again = em_unet("export", "--model", str(ckpt), "-o", "export", "--format", "torchscript", cwd=tmp)
    assert again.returncode != 0 and "exist already" in again.stderr and "--overwrite true" in again.stderr

    ok(em_unet("evaluate", "--model", str(ckpt), "--images", "stack.tif", "--labels", "labels.tif", "-o", "evaluation", cwd=tmp))
    report = json.loads((tmp / "evaluation/report.json").read_text())
    assert len(report["samples"]) == 3 and 0.0 <= report["mean"]["pixel_error"] <= 1.0


@pytest.mark.slow
def test_anisotropic_3d_network_exports_and_loads_back(tmp_path):
    """A 3D network of the anisotropic scheme (40 x 4 x 4 nm): z gets its own halo (margin 8 + 1 -> 10, its pooling
    step is 2) and smallest input (22), test_model passes (on a test input smaller than that minimum: bioimage.io pads
    it by the halo), and the package loads back as the same network."""
    import bioimageio.spec

    from pipeline.bioimageio import export_bioimageio
    from pipeline.checkpoints import load_bioimageio
    from pipeline.geometry import propose_scheme

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, features=[2, 4, 8, 16, 32], norm="batch", **propose_scheme([10, 1, 1])).eval()
    package = export_bioimageio(net, tmp_path / "m.zip", sample_size=188)  # runs test_model, raises if it fails
    descr = bioimageio.spec.load_model_description(package, perform_io_checks=False)
    assert [(str(a.id), a.size.min, a.size.step) for a in descr.inputs[0].axes[2:]] == [("z", 22, 1), ("y", 240, 1), ("x", 240, 1)]
    assert [(a.size.offset, a.halo) for a in descr.outputs[0].axes[2:]] == [(0, 10), (0, 112), (0, 112)]
    back = load_bioimageio(package)
    x = torch.randn(1, 1, 20, 204, 188)
    with torch.inference_mode():
        assert back.architecture == net.architecture and torch.equal(back(x), net(x))


# ---------------------------------------------------------------- issue 32: bioimage.io's own predict, and its weights
def _receptive_reach(net: UNet, shape: tuple[int, ...]) -> list[int]:
    """Per spatial axis, the farthest input pixel (from the output pixel's centre, either side) that any output pixel
    depends on: autograd over one pooling period of output positions (the rest repeat it), weights made positive (no
    dead paths)."""
    g, dims = net.geometry, net.spatial_dims
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(p.abs() + 0.01)
    x = torch.randn(1, 1, *shape, requires_grad=True)
    y = net(x)
    reach = []
    for axis in range(dims):
        margin, step, widest = g.margins(dims)[axis], g.steps(dims)[axis], 0
        for j in range(step):
            index = [0, 0] + [slice(None)] * dims
            index[2 + axis] = j
            grad, = torch.autograd.grad(y[tuple(index)].sum(), x, retain_graph=True)
            used = grad[0, 0].abs().sum(tuple(a for a in range(dims) if a != axis)).nonzero().flatten()
            widest = max(widest, j + margin - int(used.min()), int(used.max()) - j - margin)
        reach.append(widest)
    return reach


def test_package_halo_covers_every_output_pixels_context():
    """A valid U-Net's output pixel sees margin + step - 1 px on one side (107 for the paper's network, whose margin is
    92: the pooling grid makes the receptive field depend on the pixel's phase); the package's halo covers it and is a
    multiple of the step (112), so bioimage.io's tiles keep the pooling grid. The anisotropic 3D scheme: z too."""
    from pipeline.bioimageio import package_tiling
    from pipeline.geometry import propose_scheme

    torch.manual_seed(0)
    for net in (UNet(features=[2, 4, 8, 16, 32]).eval(),
                UNet(spatial_dims=3, features=[2, 4, 8, 16, 32], **propose_scheme([10, 1, 1])).eval()):
        g, dims = net.geometry, net.spatial_dims
        halos, mins = package_tiling(net)
        shape = tuple(m + s for m, s in zip(g.min_input_sizes(dims), g.steps(dims)))  # outputs of a whole period
        reach = _receptive_reach(net, shape)
        assert reach == [m + s - 1 for m, s in zip(g.margins(dims), g.steps(dims))], reach
        assert all(r <= h and h % s == 0 and m == 2 * h + s for r, h, m, s in zip(reach, halos, mins, g.steps(dims)))
    assert package_tiling(UNet(features=FEATURES)) == ((112, 112), (240, 240))
    assert package_tiling(UNet(features=FEATURES, padding="same")) == ((0, 0), (1, 1))


def test_exported_model_is_the_pipelines_prediction_for_any_size():
    """ProbabilityUNet (the packaged model, scripted or not) takes any size and returns the input's size, equal to
    the pipeline's overlap-tile prediction (mirror padding, soft-max) of the same input; its state_dict is the U-Net's."""
    from pipeline.export import ProbabilityUNet
    from pipeline.inferers import OverlapTileInferer

    torch.manual_seed(0)
    model = ProbabilityUNet(features=FEATURES).eval()
    assert list(model.state_dict()) == ["unet." + k for k in model.unet.state_dict()]
    scripted = torch.jit.script(model)
    for shape in [(1, 5), (37, 50), (200, 200), (252, 261)]:
        x = torch.randn(1, 1, *shape)
        with torch.inference_mode():
            ours = torch.softmax(OverlapTileInferer(tile_size=52)(x, model.unet), 1)
            out = model(x)
            assert out.shape == (1, 2, *shape)
            torch.testing.assert_close(out, ours, rtol=0, atol=1e-5)
            torch.testing.assert_close(scripted(x), out, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_bioimageio_predict_equals_the_pipeline_untiled_any_size_and_tiled(tmp_path):
    """bioimage.io's own predict (bioimageio.core) on an exported package: sizes that are not valid for the U-Net (252,
    250 x 301: the model pads itself) and a tiled prediction (blocksize_parameter) equal the pipeline's prediction
    with the same checkpoint (atol 1e-5, float rounding; the tiny network's probabilities vary by ~0.5 across
    pixels, a shifted pooling grid changes them by up to 0.7).

    Normalisation is made identical: untiled, bioimageio.core pads the image by the halo *before* its
    zero_mean_unit_variance (statistics over the padded image), so that case feeds an image normalised beforehand
    (skip_preprocessing) and checks the raw image against that order; tiled, it normalises the whole image first, as
    the pipeline does. Tiles keep the pooling grid when the image and the block are multiples of 16."""
    from bioimageio.core import create_prediction_pipeline, predict
    from bioimageio.spec import load_model_description

    from pipeline.bioimageio import _normalize, export_bioimageio
    from pipeline.inferers import OverlapTileInferer
    from pipeline.synthetic import make_image

    torch.manual_seed(0)
    net = UNet(features=FEATURES).eval()
    package = export_bioimageio(net, tmp_path / "m.zip")  # bioimageio.core's test_model passes on it
    descr = load_model_description(package)
    assert descr.inputs[0].pad.mode == "reflect"  # read back as written (bioimageio.spec drops a default mode)
    pipeline = create_prediction_pipeline(descr, devices=["cpu"])

    def ours(image: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(OverlapTileInferer()(torch.from_numpy(image), net), 1).numpy()

    def theirs(image: np.ndarray, **options) -> np.ndarray:
        return predict(model=pipeline, inputs={"image": image}, **options).members["prediction"].data.values

    for shape in [(252, 252), (250, 301)]:
        raw = (make_image(shape, seed=2)[0] * 255).astype(np.float32)[None, None]
        x = _normalize(raw, 1e-6)
        np.testing.assert_allclose(theirs(x, skip_preprocessing=True), ours(x), rtol=0, atol=1e-5)
        padded = np.pad(raw, [(0, 0), (0, 0), (112, 112), (112, 112)], mode="reflect")  # bioimageio.core's order
        x_padded_stats = ((raw - padded.mean()) / (padded.std() + 1e-6)).astype(np.float32)
        np.testing.assert_allclose(theirs(raw), ours(x_padded_stats), rtol=0, atol=1e-4)
    raw = (make_image((512, 384), seed=3)[0] * 255).astype(np.float32)[None, None]
    tiled = theirs(raw, blocksize_parameter=112)  # blocks of 240 + 112 = 352 px, 16 blocks
    assert tiled.shape == (1, 2, 512, 384)
    np.testing.assert_allclose(tiled, ours(_normalize(raw, 1e-6)), rtol=0, atol=1e-5)


def _rewrite_package(package: Path, target: Path, weights: bytes | None = b"", state_dict: bool = True) -> Path:
    """A copy of ``package`` with ``weights.pt`` replaced (``weights``; None: left out; b"": unchanged) and its
    recorded sha256 updated, or without its pytorch_state_dict weights (``state_dict=False``)."""
    import hashlib

    import yaml

    with zipfile.ZipFile(package) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    rdf = yaml.safe_load(files["rdf.yaml"])
    if weights is None:
        del files["weights.pt"]
    elif weights:
        files["weights.pt"] = weights
        rdf["weights"]["pytorch_state_dict"]["sha256"] = hashlib.sha256(weights).hexdigest()
    if not state_dict:
        del rdf["weights"]["pytorch_state_dict"], files["weights.pt"]
        rdf["weights"]["torchscript"].pop("parent", None)
    files["rdf.yaml"] = yaml.safe_dump(rdf).encode()
    with zipfile.ZipFile(target, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return target


class _RunsCode:
    """Unpickling this creates the file it names: it shows whether loading ran code from the package."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_load_bioimageio_refuses_weights_that_are_not_a_plain_state_dict(tmp_path):
    """A package whose pytorch_state_dict weights are a pickle of Python objects (or a pickled model) is refused with a
    message that names the package, says the weights are not a plain state dict and never advises weights_only=False;
    nothing in it runs. A TorchScript-only package, missing, truncated or altered weights: each its own message naming
    the package. The package as exported loads back with weights equal to the network's."""
    from pipeline.bioimageio import export_bioimageio
    from pipeline.checkpoints import load_bioimageio
    from pipeline.export import ProbabilityUNet

    torch.manual_seed(0)
    net = UNet(features=FEATURES).eval()
    package = Path(export_bioimageio(net, tmp_path / "m.zip", test=False))
    back = load_bioimageio(package)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), net.state_dict().values()) if torch.is_tensor(a))

    def refusal(weights: bytes | None = b"", state_dict: bool = True, name: str = "bad.zip") -> str:
        bad = _rewrite_package(package, tmp_path / name, weights, state_dict)
        with pytest.raises(ValueError) as info:
            load_bioimageio(bad)
        message = str(info.value)
        assert f"bioimage.io package {str(bad)!r}" in message and "weights_only=False" not in message, message
        return message

    def saved(obj) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return buffer.getvalue()

    marker = tmp_path / "code_ran"
    state = {f"unet.{k}": v for k, v in net.state_dict().items()}
    message = refusal(saved({**state, "hook": _RunsCode(marker)}))
    assert ("its pytorch_state_dict weights (weights.pt) are not a plain state dict (tensors by name): they hold Python "
            "objects" in message and "could run arbitrary code" in message and "Export the package again" in message)
    assert not marker.exists()
    model = ProbabilityUNet(**net.architecture)
    assert "are not a plain state dict (tensors by name)" in refusal(saved(model), name="model.zip")  # a pickled model
    assert "holds no pytorch_state_dict weights (only torchscript)" in refusal(state_dict=False, name="ts.zip")
    assert "its pytorch_state_dict weights (weights.pt) are missing" in refusal(None, name="missing.zip")
    whole = saved(state)
    assert "weights (weights.pt) are truncated or not a PyTorch file" in refusal(whole[: len(whole) // 2], name="cut.zip")
    altered = _rewrite_package(package, tmp_path / "altered.zip")
    with zipfile.ZipFile(altered) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    files["weights.pt"] = saved({k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in state.items()})
    with zipfile.ZipFile(altered, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    with pytest.raises(ValueError, match=r"altered.zip'.*weights \(weights.pt\) are not the ones it was written with"):
        load_bioimageio(altered)


def test_console_help_lists_keys_and_refuses_misspelt_ones(capsys):
    from pipeline import cli

    files = [str(CONFIGS / "inference.yaml")]
    text = cli.build_parser("predict", files).format_help()
    assert "--tile_size" in text and "(default: auto)" in text and "output tile" in text
    assert "--checkpoint VALUE, --model VALUE" in text and "--output_dir VALUE, -o VALUE" in text
    command, run_id, configs, metas, overrides, _ = cli.parse(
        ["predict", "stack.tif", "--model", "m.pt", "-o", "out", "--tile_size", "388", "--config", "em_cpu",
         "--set", "tile_settings#progress=False"])
    assert (command, run_id) == ("predict", "run")
    assert configs == [INFER, str(ROOT / "configs/em_cpu.yaml")]
    assert metas == [str(CONFIGS / "metadata.json")]
    assert overrides == {"checkpoint": "m.pt", "output_dir": "out", "tile_size": 388, "input_path": "stack.tif",
                         "tile_settings#progress": False}
    assert cli.parse(["export", "--format", "bioimageio"])[1] == "export_bioimageio"
    with pytest.raises(SystemExit):
        cli.parse(["train", "--num_epoch", "3"])
    err = capsys.readouterr().err
    assert "unknown argument(s): --num_epoch (did you mean --num_epochs" in err and "; 3" not in err
    train_help = " ".join(cli.build_parser("train", [str(CONFIGS / "train.yaml")]).format_help().split())
    assert "--resume VALUE resume: true continues from the newest" in train_help  # the comment block above the key
    assert "--ckpt_dir VALUE model.pt (best), model_final.pt, resume checkpoints (default: <bundle_root>/models)" in train_help
    with pytest.raises(SystemExit):
        cli.parse(["train", "--config", "no_such_overlay"])
    assert "quickstart" in capsys.readouterr().err  # the shipped overlays are listed


@pytest.mark.slow
def test_bundle_copied_out_runs_from_any_working_directory(tmp_path):
    """bundle_root is the folder above the config's configs/: the copied bundle writes into itself."""
    copy = tmp_path / "b"
    shutil.copytree(ROOT / "bundles/em_unet", copy, ignore=shutil.ignore_patterns("models", "data", "eval", "predictions", "export"))
    torch.manual_seed(0)
    torch.save(UNet(features=FEATURES).state_dict(), tmp_path / "model.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "../b/configs/inference.yaml",
                           "--checkpoint", str(tmp_path / "model.pt")], cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(p.relative_to(copy).parts[:2] for p in copy.rglob("*.tif"))
    assert ("data", "synthetic") in written and ("predictions", "probabilities") in written
    assert not any(elsewhere.iterdir())


def test_metadata_matches_the_network_of_every_shipped_overlay():
    """metadata.json merged with an overlay's fragment states the network that overlay trains: channels in and
    out, and the valid spatial-shape formulas (MONAI's verify_net_in_out checks channels only)."""
    from monai.bundle import ConfigParser

    from pipeline.export import bundle_metadata, network_data_format

    for overlay in [None, *sorted((ROOT / "configs").glob("*.yaml"))]:
        files = [str(CONFIGS / "train.yaml")] + ([str(overlay)] if overlay else [])
        parser = ConfigParser()
        parser.read_config(files)
        network = parser.get_parsed_content("network_def")
        stated = bundle_metadata(files)[0]["network_data_format"]
        derived = network_data_format(network)
        for side, name in (("inputs", "image"), ("outputs", "pred")):
            for key in ("num_channels", "spatial_shape"):
                assert stated[side][name][key] == derived[side][name][key], (overlay, side, key)
            assert len(stated[side][name]["channel_def"]) == derived[side][name]["num_channels"], (overlay, side)


def test_verify_metadata_for_every_shipped_overlay(tmp_path):
    """MONAI's verify_metadata (JSON schema) on metadata.json merged with each overlay's fragment. The schema is a
    download (metadata.json's `schema` URL): read from $MONAI_META_SCHEMA or fetched; skipped offline."""
    pytest.importorskip("jsonschema", reason="verify_metadata needs jsonschema (pip install jsonschema)")
    from monai.bundle import verify_metadata
    from monai.apps import download_url

    from pipeline.export import bundle_metadata

    schema = Path(os.environ.get("MONAI_META_SCHEMA", tmp_path / "schema.json"))
    if not schema.is_file():
        try:
            download_url(json.loads((CONFIGS / "metadata.json").read_text())["schema"], filepath=str(schema), progress=False)
        except Exception as err:  # noqa: BLE001 - no network: nothing to validate against
            pytest.skip(f"the metadata schema cannot be downloaded here ({type(err).__name__}); set MONAI_META_SCHEMA to a copy")
    for overlay in [None, *sorted((ROOT / "configs").glob("*.yaml"))]:
        files = [str(CONFIGS / "train.yaml")] + ([str(overlay)] if overlay else [])
        merged = tmp_path / f"{Path(str(overlay)).stem}_merged.json"
        merged.write_text(json.dumps(bundle_metadata(files)[0]))
        verify_metadata(meta_file=str(merged), filepath=str(schema))  # raises on a schema violation


def test_required_packages_cover_the_dependencies():
    """metadata.json's required_packages_version names every runtime dependency of pyproject.toml."""
    import re
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=~! ]", d)[0].lower().replace("_", "-") for d in deps}
    listed = {k.lower().replace("_", "-") for k in json.loads((CONFIGS / "metadata.json").read_text())["required_packages_version"]}
    missing = names - listed - {"torch", "monai", "numpy"}  # monai_version, pytorch_version, numpy_version
    assert not missing, f"metadata.json required_packages_version lacks {sorted(missing)}"
