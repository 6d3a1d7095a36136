"""Every command line in README.md and the bundle README runs, as written, with tiny settings.

Each ``python -m monai.bundle ...`` / ``torchrun ...`` line of a ``bash`` block is run from the
repository root with its own keys and config files. Only what a test must change is changed:
inputs named as placeholders (``stack.tif``, ISBI paths) point at small synthetic files, output
folders at a temporary folder, and training runs are shrunk (narrow network, 96 x 96 images, one
epoch). A command that stops working, or a key it uses that disappears, fails here. The
``python -m monai.bundle`` commands run as forked children of the tests' bundle zygote
(``conftest.bundle``: the same CLI entry point with MONAI's imports done once); ``torchrun`` runs as is.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import zarr

from pipeline.io import write_image
from pipeline.synthetic import make_stack, to_uint8

from conftest import FEATURES_ARG, ROOT, bundle

DOCS = ("README.md", "bundles/em_unet/docs/README.md")


def readme_commands() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every bundle or torchrun command in the docs' bash blocks, in order."""
    found = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):  # the quickstart line installs first; a line may chain two runs
                    part = part.strip()
                    if "monai.bundle" in part or part.startswith("torchrun"):
                        found.append((doc, shlex.split(part)))
    return found


def _split(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The words before the first ``--key``, and the ``--key value`` pairs in order."""
    first = next(i for i, a in enumerate(argv) if a.startswith("--") and not a.startswith("--nproc"))
    head, rest = argv[:first], argv[first:]
    keys = {rest[i][2:]: rest[i + 1] for i in range(0, len(rest), 2)}
    return head, keys


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The docs' placeholder inputs, each in its own format (a small synthetic EM stack)."""
    tmp = tmp_path_factory.mktemp("readme")
    image, label = make_stack((30, 96, 96), seed=4)
    raw = to_uint8(image[:3])
    tifffile.imwrite(tmp / "train-volume.tif", to_uint8(image), photometric="minisblack")
    tifffile.imwrite(tmp / "train-labels.tif", (label * 255).astype(np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp / "stack.tif", raw, photometric="minisblack")
    nib.save(nib.Nifti1Image(raw.transpose(2, 1, 0), np.diag([4.0, 4.0, 40.0, 1.0])), tmp / "volume.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(raw), str(tmp / "volume.mha"))
    for z, section in enumerate(raw):
        write_image(section, tmp / "sections" / f"s{z}.png")
    with h5py.File(tmp / "sample.h5", "w") as f:
        f["raw"], f["labels"] = raw, (label[:3] * 255).astype(np.uint8)
    zarr.create_array(str(tmp / "volume.zarr"), shape=raw.shape, dtype="uint8")[...] = raw
    group = zarr.open_group(str(tmp / "image.ome.zarr"), mode="w", zarr_format=2)
    group.create_array("0", shape=raw.shape, dtype="uint8")[...] = raw
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [40.0, 4.0, 4.0]}]}]}]
    write_image(raw, tmp / "volume.n5", meta={"dataset": "raw", "spacing": [40.0, 4.0, 4.0]})
    hyper = raw[None, :, None]  # (T, Z, C, Y, X) = (1, 3, 1, 96, 96): a Fiji hyperstack
    tifffile.imwrite(tmp / "hyperstack.tif", hyper, imagej=True, metadata={"axes": "TZCYX", "spacing": 0.04})
    rgb = np.stack([raw[0], raw[1], raw[2]], -1)  # colour: R, G and B differ
    with tifffile.TiffWriter(tmp / "slide.ome.tif", ome=True) as tif:
        tif.write(rgb, subifds=1, tile=(64, 64), photometric="rgb", metadata={"axes": "YXS", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tif.write(rgb[::2, ::2], subfiletype=1, tile=(64, 64), photometric="rgb")
    return tmp


def _adapt(argv: list[str], tmp, inputs) -> list[str]:
    head, keys = _split(argv)
    if head[0] == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", *head[1:]]
    else:
        head = [sys.executable, *head[1:]]
    files = keys.get("config_file", "")
    is_training = "run" in head and "training" in head
    if "input_path" in keys:  # the placeholder's own name and format (path/to/stack.tif: stack.tif)
        keys["input_path"] = str(inputs / os.path.basename(keys["input_path"].rstrip("/")))
    if "images" in keys:
        keys["images"] = str(inputs / "train-volume.tif")
    if "labels" in keys:
        keys["labels"] = str(inputs / "train-labels.tif")
    if "dataset_dir" in keys or "isbi2012.yaml" in files:
        keys["dataset_dir"] = str(inputs)
    if is_training:
        keys.update({"ckpt_dir": str(tmp / "models"), "output_dir": str(tmp / "eval"), "data_cache_dir": str(tmp / "data"),
                     "features": FEATURES_ARG, "image_size": "[96,96]", "num_images": "5", "num_val": "2",
                     "num_epochs": "1", "val_interval": "1"})
        keys["patch_size"] = "[96,96]" if "seed_variant" in files else "[220,220]"
        if "em3d" in files:  # volumes: the smallest valid 3D crop of the command's scheme, from small synthetic stacks
            from pipeline.geometry import UNetGeometry, propose_scheme

            scheme = UNetGeometry(**propose_scheme(json.loads(keys.get("spacing", "[10,1,1]"))))
            keys.update({"image_size": "[20,96,96]", "patch_size": str(list(scheme.min_input_sizes())).replace(" ", ""),
                         "features": "[2,4,8,16,32]"})
        if "em_cpu" in files:  # the recipe starts from the pretrained 16..256 network, which the narrow one cannot take
            keys["init_from"] = "null"
    elif "verify_net_in_out" in head:  # checks the network against the metadata: nothing to redirect
        pass
    elif "export.yaml" in files:  # the bioimage.io package of the first training command's checkpoint
        keys.update({"checkpoint": str(inputs / "model.pt"), "output_dir": str(tmp / "out")})
    elif "ckpt_export" in head:
        keys.update({"filepath": str(tmp / "model.ts"), "ckpt_file": str(inputs / "model.pt"), "checkpoint": str(inputs / "model.pt")})
    else:  # inference and evaluation: the checkpoint of the first training command with the same overlay
        keys.update({"checkpoint": str(inputs / checkpoint_name(files)), "output_dir": str(tmp / "out"), "data_cache_dir": str(tmp / "data")})
    return head + [w for k, v in keys.items() for w in (f"--{k}", v)]


def checkpoint_name(config_files: str) -> str:
    """Inference with an overlay that changes the network's outputs needs a network trained with it."""
    if "instances_quickstart" in config_files:
        return "model_instances.pt"
    return "model_em3d.pt" if "em3d" in config_files else "model.pt"


COMMANDS = readme_commands()


def test_the_docs_hold_the_commands_this_file_runs():
    kinds = [" ".join(a for a in argv[:6] if not a.startswith("--")) for _, argv in COMMANDS]
    assert len(COMMANDS) >= 12, kinds
    assert any("torchrun" in k for k in kinds) and any("export_bioimageio" in k for k in kinds)
    assert any("verify_net_in_out" in k for k in kinds)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[f"{d.split('/')[0]}-{i}" for i, (d, _) in enumerate(COMMANDS)])
def test_readme_command_runs(index, inputs, tmp_path):
    doc, argv = COMMANDS[index]
    files = _split(argv)[1].get("config_file", "")
    name = checkpoint_name(files)
    if not (inputs / name).exists():  # the first training command (with the same overlay) feeds the others
        first = next(a for _, a in COMMANDS if "training" in a and a[0] != "torchrun"
                     and checkpoint_name(_split(a)[1].get("config_file", "")) == name)
        cmd = _adapt(first, inputs / f"first_{name}", inputs)
        proc = bundle(*cmd[3:], timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (inputs / f"first_{name}/models/model.pt").rename(inputs / name)
    cmd = _adapt(argv, tmp_path, inputs)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if cmd[1:3] == ["-m", "monai.bundle"]:  # through the tests' bundle zygote (conftest.bundle): the same CLI, imports done once
        proc = bundle(*cmd[3:], env=env, timeout=600)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    teardown = argv[0] == "torchrun" and "terminate called without an active exception" in log and all(
        f"em_unet ddp: rank {r}/2 finished" in log for r in range(2))  # the known gloo teardown abort (bundle README)
    assert proc.returncode == 0 or teardown, f"{doc}: {shlex.join(argv)}\n{proc.stderr[-3000:]}"
    if "training" in argv:
        assert (tmp_path / "models/model_final.pt").is_file()
    elif "ckpt_export" in argv:
        assert (tmp_path / "model.ts").is_file()
    elif "export_bioimageio" in argv:
        assert (tmp_path / "out/em_unet.bioimageio.zip").is_file() and "test_model: passed" in log
    elif "verify_net_in_out" in argv:
        assert "data shape of network is verified with no error" in proc.stdout + proc.stderr
    elif "--images" in argv:
        assert (tmp_path / "out/report.csv").is_file()
    elif "--streaming" in argv:
        assert any((tmp_path / "out").glob("*.zarr"))
    else:  # one probability and one mask file per input file, named after it
        name = os.path.basename(argv[argv.index("--input_path") + 1].rstrip("/")) if "--input_path" in argv else None
        probabilities, masks = (sorted(p.name for p in (tmp_path / "out" / what).iterdir()) for what in ("probabilities", "masks"))
        assert len(probabilities) == len(masks) >= 1
        if name and "." in name:
            assert all(p.startswith(name.split(".")[0]) for p in probabilities + masks), (name, probabilities)
