"""The bad-input matrix of docs/reliability.md: every row is one case here.

Each case prepares its inputs in ``tmp_path``, then runs the bad action, which must raise the
expected exception with a message matching the row's pattern, and must leave ``tmp_path``
exactly as it was (no new, changed or removed file: nothing half-written). Bundle rows run the
real ``python -m monai.bundle`` CLI; their error is the process's stderr.
"""

import json
import re
from pathlib import Path

import h5py

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
import zarr

from pipeline import checks, cli, config, data, metrics
from pipeline.inferers import OverlapTileInferer
from pipeline.checkpoints import latest_checkpoint, load_checkpoint
from pipeline.io import read_image, write_image
from pipeline.losses import make_loss
from pipeline.optim import make_optimizer
from pipeline.networks import UNet
from pipeline.streaming import predict_files, predict_zarr
from pipeline.synthetic import make_image, to_uint8
from pipeline.transforms import BinarizeMask

from conftest import EVALUATE, FEATURES, FEATURES_ARG, INFER, ROOT, TRAIN, bundle, train_args

DOC = ROOT / "docs" / "reliability.md"
ROWS: dict = {}


class BundleError(Exception):
    """A bundle command that failed; the message is the end of its stderr."""


def row(name, exc, pattern):
    def register(fn):
        ROWS[name] = (fn, exc, pattern)
        return fn

    return register


def net():
    torch.manual_seed(0)
    return UNet(features=FEATURES).eval()


def run(*args):
    """A bundle command that must fail: raise its stderr as :class:`BundleError`."""
    proc = bundle(*args, timeout=300)
    if proc.returncode != 0:
        raise BundleError(proc.stderr)
    return proc


def train(tmp, *extra):
    return lambda: run(*train_args(tmp, "--features", FEATURES_ARG, "--data_cache_dir", str(tmp / "cache"), "--num_epochs", "1", *extra))


def tiny_checkpoint(tmp, features=FEATURES):
    torch.manual_seed(0)
    torch.save(UNet(features=features).state_dict(), tmp / "model.pt")
    return tmp / "model.pt"


def infer(tmp, *extra, config_file=INFER):
    return lambda: run(
        "run", "--config_file", config_file,
        "--checkpoint", str(tmp / "model.pt"), "--output_dir", str(tmp / "out"), *extra,
    )


def sections(tmp, n=2, shape=(40, 44)):
    stack = np.stack([to_uint8(make_image(shape, seed=i)[0]) for i in range(n)])
    tifffile.imwrite(tmp / "stack.tif", stack, photometric="minisblack")
    return tmp / "stack.tif"


# ------------------------------------------------------------------ inferer (Python API)
@row("tile-size-invalid", ValueError, r"output tile \(50, 50\) is not a valid output size.*nearest larger valid tile: \(52, 52\)")
def _(tmp):
    return lambda: OverlapTileInferer(tile_size=50)(torch.zeros(1, 1, 60, 60), net())


@row("image-wrong-dims", ValueError, r"2D network needs inputs of shape \(B, C, 2 spatial axes\).*got shape \(60, 60\)")
def _(tmp):
    return lambda: OverlapTileInferer()(torch.zeros(60, 60), net())


@row("image-wrong-channels", ValueError, r"network expects 1 input channel\(s\), got 3")
def _(tmp):
    return lambda: OverlapTileInferer()(torch.zeros(1, 3, 60, 60), net())


@row("image-nan-inf", ValueError, r"input has 2 non-finite pixel\(s\) \(NaN or Inf\) of 3600, the first at \(y, x\) \(3, 4\); pass fill_nan=True")
def _(tmp):
    x = torch.zeros(1, 1, 60, 60)
    x[0, 0, 3, 4], x[0, 0, 5, 6] = float("nan"), float("inf")
    return lambda: OverlapTileInferer()(x, net())


@row("image-empty", ValueError, r"cannot predict an empty input of shape \(1, 0, 60\)")
def _(tmp):
    return lambda: OverlapTileInferer()(torch.zeros(1, 1, 0, 60), net())


@row("image-complex-dtype", TypeError, r"input dtype torch.complex64 is not supported; give a real image")
def _(tmp):
    return lambda: OverlapTileInferer()(torch.zeros(1, 1, 60, 60, dtype=torch.complex64), net())


@row("inferer-bad-settings", ValueError, r"padding_mode must be one of .*reflect.*got 'mirror'")
def _(tmp):
    return lambda: OverlapTileInferer(padding_mode="mirror")


@row("adapt-norm-without-batchnorm", ValueError, r"adapt_norm re-estimates BatchNorm statistics, but UNet has no BatchNorm layer; build the network with norm='batch'")
def _(tmp):
    return lambda: OverlapTileInferer(adapt_norm=True)(torch.zeros(1, 1, 60, 60), net())


# ------------------------------------------------------------------ files (Python API)
@row("tiff-truncated", ValueError, r"could not read .*cut.tif as TIFF: .*truncated")
def _(tmp):
    sections(tmp, n=4)
    blob = (tmp / "stack.tif").read_bytes()
    (tmp / "cut.tif").write_bytes(blob[: len(blob) * 2 // 3])
    return lambda: read_image(tmp / "cut.tif")


@row("nifti-truncated", ValueError, r"could not read .*cut.nii.gz as NIfTI: EOFError")
def _(tmp):
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((30, 30, 4), dtype=np.float32), np.eye(4)), tmp / "v.nii.gz")
    blob = (tmp / "v.nii.gz").read_bytes()
    (tmp / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    return lambda: read_image(tmp / "cut.nii.gz")


@row("mha-corrupt", ValueError, r"could not read .*bad.mha as \.mha with SimpleITK")
def _(tmp):
    (tmp / "bad.mha").write_text("ObjectType = Image\nNDims = 2\nDimSize = 40 40\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n")
    return lambda: read_image(tmp / "bad.mha")


@row("zarr-corrupt", ValueError, r"could not open .*a.zarr as a zarr array: its metadata is corrupt")
def _(tmp):
    zarr.open_array(str(tmp / "a.zarr"), mode="w", shape=(2, 40, 40), chunks=(1, 40, 40), dtype="f4")[:] = 1
    (tmp / "a.zarr" / "zarr.json").write_text("{garbage")
    return lambda: predict_zarr(net(), str(tmp / "a.zarr"), tmp / "out.zarr")


@row("file-missing", FileNotFoundError, r"image file not found: .*nope.tif")
def _(tmp):
    return lambda: read_image(tmp / "nope.tif")


@row("folder-missing", FileNotFoundError, r"input path not found: .*nope \(give an image file or a folder of images\)")
def _(tmp):
    return lambda: data.datalist_from_path(tmp / "nope")


@row("folder-empty", FileNotFoundError, r"no image files .* in image folder .*empty")
def _(tmp):
    (tmp / "empty").mkdir()
    sections(tmp)
    return lambda: data.make_datalists(tmp / "empty", tmp / "stack.tif")


@row("image-label-shape-mismatch", ValueError, r"stack.tif has shape \(4, 40, 44\) but its label .*lab.tif has \(2, 40, 44\)")
def _(tmp):
    sections(tmp, n=4)
    tifffile.imwrite(tmp / "lab.tif", np.zeros((2, 40, 44), np.uint8))
    return lambda: data.make_datalists(tmp / "stack.tif", tmp / "lab.tif")


@row("image-label-count-mismatch", ValueError, r"no label for \['b.png'\]; no image for \['z.png'\]")
def _(tmp):
    img = np.zeros((20, 20), np.uint8)
    for folder, names in (("images", "ab"), ("labels", "az")):
        for n in names:
            write_image(img, tmp / folder / f"{n}.png")
    return lambda: data.make_datalists(tmp / "images", tmp / "labels")


@row("mask-many-values", ValueError, r"cannot binarize a mask with 3 distinct values \(0, 128, 255\).*pass threshold=.*or foreground_values=")
def _(tmp):
    return lambda: BinarizeMask()(np.array([[[0, 128, 255]]], dtype=np.uint8))


@row("mask-colour-coded", ValueError, r"mask has 3 channels that differ \(a colour-coded mask\?\); .*pass foreground_values as colours")
def _(tmp):
    mask = np.zeros((3, 4, 4), np.uint8)
    mask[0, :2], mask[1, 2:] = 255, 255
    return lambda: BinarizeMask()(mask)


@row("write-existing-output", FileExistsError, r"out.tif already exists; pass overwrite=True to replace it")
def _(tmp):
    write_image(np.zeros((8, 8), np.uint8), tmp / "out.tif")
    return lambda: write_image(np.ones((8, 8), np.uint8), tmp / "out.tif")


@row("zarr-output-other-settings", ValueError, r"output .*out.zarr was written with other settings .*threshold.*pass overwrite=True")
def _(tmp):
    image = np.random.default_rng(0).random((1, 40, 40), dtype=np.float32)
    predict_zarr(net(), image, tmp / "out.zarr", block_size=(1, 32, 32))
    return lambda: predict_zarr(net(), image, tmp / "out.zarr", block_size=(1, 32, 32), threshold=0.7)


@row("dask-scheduler-unreachable", ConnectionError, r"could not connect to the Dask scheduler at tcp://127.0.0.1:9 within 2 s")
def _(tmp):
    image = np.zeros((1, 40, 40), np.float32)
    return lambda: predict_zarr(net(), image, tmp / "out.zarr", scheduler="tcp://127.0.0.1:9", connect_timeout=2)


# ------------------------------------------------------------------ metrics, losses, checkpoints (Python API)
@row("metric-shape-mismatch", ValueError, r"prediction and label shapes differ: prob \(10, 10\) vs label \(10, 12\)")
def _(tmp):
    return lambda: metrics.evaluate(np.zeros((10, 10)), np.zeros((10, 12)))


@row("metric-probability-range", ValueError, r"prob must hold foreground probabilities in \[0, 1\]; found values in \[1.5, 1.5\]")
def _(tmp):
    return lambda: metrics.pixel_error(np.full((10, 10), 1.5), np.zeros((10, 10)))


@row("metric-label-not-binary", ValueError, r"cannot binarize a label with 3 distinct values \(0, 1, 2\): a binary label holds booleans or two values \{0, v\}")
def _(tmp):
    return lambda: metrics.pixel_error(np.zeros((4, 4)), np.arange(16).reshape(4, 4) % 3)


@row("loss-unknown-name", ValueError, r"unknown loss 'dice'; valid choices: dice_ce, bce, weighted_ce")
def _(tmp):
    return lambda: make_loss("dice")


@row("optimizer-negative-lr", ValueError, r"learning_rate=-0.01 is out of range; valid: \(0, inf\]")
def _(tmp):
    return lambda: make_optimizer("sgd", net().parameters(), -0.01)


@row("checkpoint-other-architecture", ValueError, r"model.pt' was trained with another architecture .*encoder.0.0.weight: checkpoint \(8, 1, 3, 3\), network \(4, 1, 3, 3\).*features=\.\.\., padding=\.\.\., norm=\.\.\., loss_name=\.\.\.")
def _(tmp):
    tiny_checkpoint(tmp, features=[8, 16, 32, 64, 128])
    return lambda: load_checkpoint(net(), tmp / "model.pt")


@row("checkpoint-python-objects", ValueError, r"refusing to load checkpoint .*evil.pt.*could run arbitrary code")
def _(tmp):
    torch.save({"model": {}, "hook": OverlapTileInferer}, tmp / "evil.pt")
    return lambda: load_checkpoint(net(), tmp / "evil.pt")


@row("resume-without-checkpoint", FileNotFoundError, r"resume=true but .*models holds no checkpoint_epoch=<N>.pt")
def _(tmp):
    (tmp / "models").mkdir()
    return lambda: latest_checkpoint(tmp / "models")


# ------------------------------------------------------------------ bundle CLI
@row("cli-misspelt-key", BundleError, r"unknown config key\(s\): --num_epoch \(did you mean --num_epochs\?\)")
def _(tmp):
    return train(tmp, "--num_epoch", "3")


@row("cli-negative-learning-rate", BundleError, r"learning_rate=-0.001 is out of range; valid: \(0, inf\]")
def _(tmp):
    return train(tmp, "--learning_rate", "-0.001")


@row("cli-dropout-out-of-range", BundleError, r"dropout=1.5 is out of range; valid: \[0, 1\)")
def _(tmp):
    return train(tmp, "--dropout", "1.5")


@row("cli-unknown-optimizer", BundleError, r"unknown optimizer 'adamw'; valid choices: sgd, adam")
def _(tmp):
    return train(tmp, "--optimizer_name", "adamw")


@row("cli-invalid-patch-size", BundleError, r"573.*nearest valid: 572 or 588")
def _(tmp):
    return train(tmp, "--patch_size", "[573,572]")


@row("cli-3d-invalid-patch-size", BundleError, r"axis 0 \(z\): 19 \(nearest valid: 18 or 20\); axis 1 \(y\): 190 \(nearest valid: "
                                              r"188 or 204\)\. Valid sizes per axis: axis 0 \(z\): 18 \+ 2 \* n")
def _(tmp):
    return lambda: run(*train_args(tmp, "--features", "[2,4,8,16,32]", "--data_cache_dir", str(tmp / "cache"), "--patch_size",
                                   "[19,190,188]", configs=(TRAIN, str(ROOT / "configs/em3d.yaml"))))


@row("cli-3d-spacing-wrong-length", BundleError, r"--spacing \[10, 1\] must be 3 positive numbers, the voxel size \[z, y, x\]")
def _(tmp):
    return lambda: run(*train_args(tmp, "--spacing", "[10,1]", "--data_cache_dir", str(tmp / "cache"),
                                   configs=(TRAIN, str(ROOT / "configs/em3d.yaml"))))


@row("cli-3d-network-2d-images", BundleError, r"a 3D network \(spatial_dims 3\) trains on stacks and volumes; .*flat.tif is a 2D "
                                             r"image .*--spatial_dims 2")
def _(tmp):
    tifffile.imwrite(tmp / "flat.tif", to_uint8(make_image((40, 44), seed=0)[0]))
    return lambda: run(*train_args(tmp, "--features", "[2,4,8,16,32]", "--images", str(tmp / "flat.tif"), "--labels",
                                   str(tmp / "flat.tif"), configs=(TRAIN, str(ROOT / "configs/em3d.yaml"))))


@row("cli-unwritable-output", BundleError, r"output folder .*blocker/models' cannot be used: .*blocker' is a file")
def _(tmp):
    (tmp / "blocker").write_text("a file, not a folder")
    return train(tmp, "--ckpt_dir", str(tmp / "blocker" / "models"))


@row("cli-checkpoint-truncated", BundleError, r"checkpoint .*model.pt' cannot be read: it is truncated or not a PyTorch checkpoint")
def _(tmp):
    blob = tiny_checkpoint(tmp).read_bytes()
    (tmp / "model.pt").write_bytes(blob[: len(blob) // 2])
    sections(tmp)
    return infer(tmp, "--input_path", str(tmp / "stack.tif"))


@row("cli-checkpoint-other-architecture", BundleError, r"trained with another architecture .*checkpoint \(8, 1, 3, 3\), network \(4, 1, 3, 3\).*set --architecture null")
def _(tmp):
    tiny_checkpoint(tmp, features=[8, 16, 32, 64, 128])
    sections(tmp)
    return infer(tmp, "--input_path", str(tmp / "stack.tif"), "--architecture", f"{{'features': {FEATURES}}}")


@row("cli-evaluate-no-section-in-range", BundleError, r"no section of .*stack.tif lies in \[5, 9\): its sections are 0..1")
def _(tmp):
    tiny_checkpoint(tmp)
    sections(tmp)
    tifffile.imwrite(tmp / "labels.tif", np.full((2, 40, 44), 255, np.uint8), photometric="minisblack")
    return infer(tmp, "--images", str(tmp / "stack.tif"), "--labels", str(tmp / "labels.tif"), "--eval_slices", "[5,9]",
                 config_file=EVALUATE)


@row("cli-stack-nan-outside-the-tissue", BundleError, r"aligned.tif has 4000 non-finite pixel\(s\) \(NaN or Inf\) of 24000, the first at \(z, y, x\) \(1, 0, 0\) in section\(s\) 1 \(4000\); pass --fill_nan true")
def _(tmp):
    tiny_checkpoint(tmp)
    stack = tifffile.imread(sections(tmp, n=3, shape=(80, 100))).astype(np.float32)
    stack[1].flat[:4000] = np.nan  # an aligned section with no data around the tissue
    tifffile.imwrite(tmp / "aligned.tif", stack, photometric="minisblack")
    return infer(tmp, "--input_path", str(tmp / "aligned.tif"))


@row("cli-input-missing", BundleError, r"input path not found: .*missing.tif")
def _(tmp):
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "missing.tif"))


@row("cli-existing-prediction", BundleError, r"1 output file\(s\) exist already, e.g. \[.*masks/stack.tif'\]; nothing was written. Pass --overwrite true")
def _(tmp):
    tiny_checkpoint(tmp)
    sections(tmp)
    write_image(np.zeros((2, 40, 44), np.uint8), tmp / "out" / "masks" / "stack.tif")  # the second output written
    return infer(tmp, "--input_path", str(tmp / "stack.tif"))


@row("cli-streaming-with-adapt-norm", BundleError, r"--adapt_norm true estimates BatchNorm statistics over the tiles of the whole image in this process: it needs the image as one block \(--block_size null, --streaming false\)")
def _(tmp):
    tiny_checkpoint(tmp)
    sections(tmp)
    return infer(tmp, "--input_path", str(tmp / "stack.tif"), "--streaming", "true", "--adapt_norm", "true")


@row("cli-evaluate-label-not-binary", BundleError, r"lab.tif.*3 distinct values \(0, 1, 2\)")
def _(tmp):
    tiny_checkpoint(tmp)
    sections(tmp)
    tifffile.imwrite(tmp / "lab.tif", (np.arange(2 * 40 * 44).reshape(2, 40, 44) % 3).astype(np.uint8))
    return infer(tmp, "--images", str(tmp / "stack.tif"), "--labels", str(tmp / "lab.tif"), config_file=EVALUATE)


# ------------------------------------------------------------------ issue 14: data loss and silent results
@row("cli-boolean-not-strict", BundleError, r"not a boolean: --overwrite 'yes'; valid values are true or false \(also True, False, 1, 0\)")
def _(tmp):
    tiny_checkpoint(tmp)
    sections(tmp)
    return infer(tmp, "--input_path", str(tmp / "stack.tif"), "--overwrite", "yes")


@row("cli-overwrite-false-lowercase", BundleError, r"2 output file\(s\) exist already.*nothing was written")
def _(tmp):
    tiny_checkpoint(tmp)
    sections(tmp)
    for folder in ("masks", "probabilities"):  # an earlier run's predictions
        write_image(np.zeros((2, 40, 44), np.uint8), tmp / "out" / folder / "stack.tif")
    return infer(tmp, "--input_path", str(tmp / "stack.tif"), "--overwrite", "false")


@row("cli-output-is-the-input", BundleError, r"output .*X/masks/stack.tif is the input .*X/masks/stack.tif: writing it would destroy the input.*overwrite or not.*--output_dir")
def _(tmp):
    tiny_checkpoint(tmp)
    (tmp / "X" / "masks").mkdir(parents=True)
    sections(tmp).rename(tmp / "X" / "masks" / "stack.tif")
    return lambda: run(
        "run", "--config_file", INFER, "--checkpoint", str(tmp / "model.pt"),
        "--input_path", str(tmp / "X" / "masks" / "stack.tif"), "--output_dir", str(tmp / "X"), "--overwrite", "true")


@row("cli-output-is-the-input-through-a-link", BundleError, r"output .*out/masks/stack.tif is the input .*data/stack.tif \(through a link\)")
def _(tmp):
    tiny_checkpoint(tmp)
    (tmp / "data").mkdir()
    sections(tmp).rename(tmp / "data" / "stack.tif")
    (tmp / "out").mkdir()
    (tmp / "out" / "masks").symlink_to(tmp / "data")  # the masks folder is the data folder
    return infer(tmp, "--input_path", str(tmp / "data" / "stack.tif"), "--overwrite", "true")


@row("cli-streaming-output-is-the-input", BundleError, r"output .*vol.zarr is the input .*vol.zarr")
def _(tmp):
    tiny_checkpoint(tmp)
    zarr.create_array(str(tmp / "out" / "vol.zarr"), shape=(2, 40, 44), chunks=(1, 40, 44), dtype="uint8")[...] = 7
    return infer(tmp, "--input_path", str(tmp / "out" / "vol.zarr"), "--streaming", "true", "--overwrite", "true")


@row("cli-train-cache-dir-holds-user-files", BundleError, r"--data_cache_dir .*images holds files that the synthetic-data writer did not make \(img_000.tif, img_001.tif\).*Nothing was changed")
def _(tmp):
    (tmp / "images").mkdir()
    for i in range(2):  # the user's own images, named as the synthetic writer names its files
        tifffile.imwrite(tmp / "images" / f"img_{i:03d}.tif", np.full((20, 20), i, np.uint8))
    return train(tmp, "--data_cache_dir", str(tmp / "images"))


def labelled_stack(tmp, labels):
    """``stack.tif`` (uint8 noise) and ``lab.tif`` (``labels``, their dtype kept): 2 sections of 40 x 44."""
    tifffile.imwrite(tmp / "stack.tif", np.random.default_rng(0).integers(0, 255, (2, 40, 44), dtype=np.uint8))
    tifffile.imwrite(tmp / "lab.tif", labels, photometric="minisblack")
    return ["--images", str(tmp / "stack.tif"), "--labels", str(tmp / "lab.tif"), "--val_slices", "[1,2]"]


def cell_ids(dtype=np.uint32, n=6):
    """Instance ids 1..n in vertical bands, 2 sections of 40 x 44."""
    return np.broadcast_to(1 + np.arange(44) * n // 44, (2, 40, 44)).astype(dtype)


@row("cli-train-instance-ids-as-binary", BundleError, r"lab.tif: cannot binarize a label with 44 distinct values \(1, 2, 3, 4, 5, 6, \.\.\.\).*--label_mode instances.*--label_mode classes --num_classes N")
def _(tmp):
    return train(tmp, *labelled_stack(tmp, cell_ids(np.uint32, 44)))


@row("cli-train-negative-instance-ids", BundleError, r"lab.tif: instance ids \(--label_mode instances\) must be >= 0 \(0 = background\); the label holds negative values \(minimum -1\)")
def _(tmp):
    ids = cell_ids(np.int32)
    ids[1, :5] = -1
    return train(tmp, *labelled_stack(tmp, ids), "--label_mode", "instances")


@row("cli-train-float-instance-label", BundleError, r"lab.tif: instance ids \(--label_mode instances\) must be integers .*; the label holds dtype float32 \(7 distinct values \(0, 1, 2, 3, 4, 5, \.\.\.\)\); save it with an integer dtype")
def _(tmp):
    ids = cell_ids(np.float32)
    ids[0, 0, 0] = 0
    return train(tmp, *labelled_stack(tmp, ids), "--label_mode", "instances")


@row("cli-train-more-classes-than-num-classes", BundleError, r"lab.tif: the label holds 4 distinct values \(0, 1, 2, 3\), more than --num_classes 3 allows \(0 \.\. 2\); set --num_classes N, or --class_values \[v0, v1, \.\.\.\]")
def _(tmp):
    return train(tmp, *labelled_stack(tmp, cell_ids(np.uint8, 4) - 1), "--label_mode", "classes", "--num_classes", "3")


@row("cli-train-value-not-in-class-values", BundleError, r"lab.tif: the label holds 3 distinct values \(0, 128, 255\); \[128\] is not in --class_values \[0, 255\]")
def _(tmp):
    values = np.array([0, 128, 255], np.uint8)[cell_ids(np.uint8, 3) - 1]
    return train(tmp, *labelled_stack(tmp, values), "--label_mode", "classes", "--class_values", "[0,255]")


@row("cli-train-bce-with-classes", BundleError, r"--loss_name bce predicts one foreground channel; with --num_classes 4 use dice_ce or weighted_ce")
def _(tmp):
    return train(tmp, "--label_mode", "classes", "--num_classes", "4", "--loss_name", "bce")


@row("cli-train-instances-of-4-classes", BundleError, r"--label_mode instances makes 2 classes \(boundary, interior\) or 3 \(background, boundary, interior\), got --num_classes 4")
def _(tmp):
    return train(tmp, "--label_mode", "instances", "--num_classes", "4")


@row("cli-inference-cache-dir-holds-user-files", BundleError, r"--data_cache_dir .*mine holds files that the synthetic-data writer did not make \(notes.txt\)")
def _(tmp):
    tiny_checkpoint(tmp)
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("mine")
    return infer(tmp, "--data_cache_dir", str(tmp / "mine"))


@row("cli-colliding-output-names", BundleError, r"1 output\(s\) would be written by more than one input, e.g. .*probabilities/a.tif by .*a.png and .*a.tif; nothing was written")
def _(tmp):
    image = to_uint8(make_image((40, 44), seed=0)[0])
    write_image(image, tmp / "in" / "a.png")
    write_image(image, tmp / "in" / "a.tif")
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "in"), "--overwrite", "true")


@row("cli-streaming-colliding-output-names", BundleError, r"would be written by more than one input, e.g. .*vol.zarr by .*vol.tif and .*vol.tiff")
def _(tmp):
    (tmp / "in").mkdir()
    sections(tmp).rename(tmp / "in" / "vol.tif")
    sections(tmp).rename(tmp / "in" / "vol.tiff")
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "in"), "--streaming", "true")


@row("streaming-resume-from-another-input", ValueError, r"output .*vol.zarr holds the prediction of another input \(.*a.zarr\), or of this input \(.*b.zarr\) before it changed")
def _(tmp):
    for name, seed in (("a", 0), ("b", 1)):
        zarr.create_array(str(tmp / f"{name}.zarr"), shape=(2, 40, 44), chunks=(1, 40, 44), dtype="float32")[...] = np.random.default_rng(seed).random((2, 40, 44))
    predict_zarr(net(), str(tmp / "a.zarr"), tmp / "vol.zarr", block_size=(1, 32, 32))
    return lambda: predict_zarr(net(), str(tmp / "b.zarr"), tmp / "vol.zarr", block_size=(1, 32, 32))


@row("cli-checkpoint-same-padding-into-valid", BundleError, r"trained with another architecture \(1 setting\(s\) differ, 0 shape mismatch.*padding: checkpoint 'same', network 'valid'")
def _(tmp):
    torch.manual_seed(0)
    torch.save(UNet(features=FEATURES, padding="same").state_dict(), tmp / "model.pt")  # the same parameter shapes
    sections(tmp)
    return infer(tmp, "--input_path", str(tmp / "stack.tif"), "--architecture", f"{{'features': {FEATURES}, 'padding': 'valid'}}")


@row("checkpoint-non-finite-weights", ValueError, r"model.pt' holds non-finite weights \(NaN or Inf\) in 1 of .* tensors, e.g. head.bias: the training run diverged")
def _(tmp):
    model = net()
    model.head.bias.data[0] = float("nan")
    torch.save(model.state_dict(), tmp / "model.pt")
    return lambda: load_checkpoint(net(), tmp / "model.pt")


@row("cli-checkpoint-non-finite-weights", BundleError, r"holds non-finite weights \(NaN or Inf\)")
def _(tmp):
    model = net()
    model.encoder[0][0].weight.data[:] = float("inf")
    torch.save(model.state_dict(), tmp / "model.pt")
    sections(tmp)
    return infer(tmp, "--input_path", str(tmp / "stack.tif"))


@row("cli-tiff-several-series", BundleError, r"two.tif holds 2 TIFF series \(series 0: shape \(4, 96, 96\) uint8 .*series 1: shape \(2, 64, 64\) uint8.*Choose one with --tiff_series N")
def _(tmp):
    two_series(tmp / "two.tif")
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "two.tif"))


@row("cli-streaming-tiff-several-series", BundleError, r"two.tif holds 2 TIFF series .*Choose one with --tiff_series N")
def _(tmp):
    two_series(tmp / "two.tif")
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "two.tif"), "--streaming", "true")


@row("tiff-several-series-read", ValueError, r"two.tif holds 2 TIFF series .*Choose one with tiff_series=N")
def _(tmp):
    two_series(tmp / "two.tif")
    return lambda: read_image(tmp / "two.tif")


@row("cli-tiff-series-out-of-range", BundleError, r"two.tif: --tiff_series 2 is not a series of this file; it holds 2")
def _(tmp):
    two_series(tmp / "two.tif")
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "two.tif"), "--tiff_series", "2")


@row("cli-zarr-missing-chunks", BundleError, r"vol.zarr: 1 of 8 chunks are missing from the zarr array, e.g. c/1/0/1 \(array index \(1, 0, 1\)\).*--allow_missing_chunks true")
def _(tmp):
    holey_zarr(tmp / "vol.zarr")
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "vol.zarr"), "--streaming", "true")


@row("zarr-missing-chunks", ValueError, r"1 of 8 chunks are missing")
def _(tmp):
    holey_zarr(tmp / "vol.zarr")
    return lambda: predict_zarr(net(), str(tmp / "vol.zarr"), tmp / "out.zarr", block_size=(1, 32, 32))


@row("cli-evaluate-label-third-value-in-one-section", BundleError, r"lab.tif: cannot binarize a label with 3 distinct values \(0, 1, 255\).*--mask_threshold")
def _(tmp):
    tiny_checkpoint(tmp)
    sections(tmp)
    labels = np.zeros((2, 40, 44), np.uint8)
    labels[0, :10], labels[1, :10], labels[1, 20:] = 1, 255, 0  # {0, 1} in section 0, {0, 255} in section 1
    tifffile.imwrite(tmp / "lab.tif", labels, photometric="minisblack")
    return infer(tmp, "--images", str(tmp / "stack.tif"), "--labels", str(tmp / "lab.tif"), config_file=EVALUATE)


@row("cli-path-with-hash", BundleError, r"--ckpt_dir '.*exp::2/models'.*contain '::': MONAI's bundle parser rewrites '#' in config values to '::'")
def _(tmp):
    return train(tmp, "--ckpt_dir", str(tmp / "exp#2" / "models"))


@row("cli-resume-other-architecture", BundleError, r"checkpoint_epoch=1.pt' was trained with another architecture \(1 setting\(s\) differ.*features: checkpoint \[4, 8, 16, 32, 64\], network \[8, 16, 32, 64, 128\]")
def _(tmp):
    trained(tmp)
    return train(tmp, "--resume", "true", "--features", "[8,16,32,64,128]")


@row("cli-resume-other-loss", BundleError, r"out_channels: checkpoint 2, network 1")
def _(tmp):
    trained(tmp)
    return train(tmp, "--resume", "true", "--loss_name", "bce", "--out_channels", "1")


@row("cli-loss-without-its-channels", BundleError, r"--loss_name bce with --num_classes 2 needs 1 output channel\(s\), but got --out_channels 2; set --out_channels 1")
def _(tmp):
    return train(tmp, "--loss_name", "bce", "--out_channels", "2")


@row("cli-inference-given-network-keys", BundleError, r"unknown config key\(s\): --features \(inference and evaluation build the network from the checkpoint's recorded architecture: drop it\)")
def _(tmp):
    tiny_checkpoint(tmp)
    sections(tmp)
    return lambda: run("run", "--config_file", INFER, "--features", FEATURES_ARG, "--checkpoint", str(tmp / "model.pt"),
                       "--input_path", str(tmp / "stack.tif"), "--output_dir", str(tmp / "out"))


@row("cli-inference-checkpoint-without-architecture", BundleError, r"model.pt' records no architecture .*--architecture")
def _(tmp):
    state = UNet(features=FEATURES).state_dict()
    del state["_extra_state"]
    torch.save(state, tmp / "model.pt")
    sections(tmp)
    return infer(tmp, "--input_path", str(tmp / "stack.tif"))


@row("cli-resume-other-optimizer", BundleError, r"checkpoint .*checkpoint_epoch=1.pt was trained with the adam optimizer, but this run builds sgd; resume with --optimizer_name adam")
def _(tmp):
    trained(tmp)
    return train(tmp, "--resume", "true", "--optimizer_name", "sgd")


@row("cli-folder-one-input-wrong-channels", BundleError, r"b_rgb.png has 3 channel\(s\) \(shape \(40, 44, 3\)\), but the network takes 1; R, G and B differ: pass --rgb_to_grey true to predict its luminance")
def _(tmp):
    image = to_uint8(make_image((40, 44), seed=0)[0])
    write_image(image, tmp / "in" / "a.png")  # predicted first if nothing were checked before
    colour = np.stack([image, image[::-1], image[:, ::-1]], -1)  # true colour (a grey image saved as RGB is read as grey)
    write_image(colour, tmp / "in" / "b_rgb.png", meta={"spatial_shape": (40, 44)})
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "in"))


@row("cli-folder-one-input-non-finite", BundleError, r"b_nan.tif has 1 non-finite pixel\(s\) \(NaN or Inf\) of 1760, the first at \(y, x\) \(3, 4\); pass --fill_nan true")
def _(tmp):
    image = make_image((40, 44), seed=0)[0].astype(np.float32)
    write_image(image, tmp / "in" / "a.tif")
    image[3, 4] = np.nan
    write_image(image, tmp / "in" / "b_nan.tif")
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "in"))


@row("cli-tiff-rgb-samples", BundleError, r"stack3.tif has 3 channel\(s\) \(shape \(3, 40, 44\), stored axes SYX\), but the network takes 1; .*photometric='minisblack'")
def _(tmp):
    tifffile.imwrite(tmp / "stack3.tif", np.arange(3, dtype=np.uint8)[:, None, None] * np.ones((3, 40, 44), np.uint8))  # one planar RGB page
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "stack3.tif"))


@row("cli-streaming-tiff-rgb-samples", BundleError, r"stack3.tif has 3 channel\(s\) .*stored axes SYX.*photometric='minisblack'")
def _(tmp):
    tifffile.imwrite(tmp / "stack3.tif", np.zeros((3, 40, 44), np.uint8))
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "stack3.tif"), "--streaming", "true")


@row("streaming-level-out-of-range", ValueError, r"slide.tif has no pyramid level 2; its levels are 0: \(64, 80, 3\), 1: \(32, 40, 3\) \(level=N\)")
def _(tmp):
    rgb = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp / "slide.tif") as tif:
        tif.write(rgb, tile=(32, 32), photometric="rgb", subifds=1)
        tif.write(rgb[::2, ::2], tile=(32, 32), photometric="rgb", subfiletype=1)
    return lambda: predict_files(UNet(in_channels=3, features=FEATURES).eval(), [{"image": str(tmp / "slide.tif"), "image_dataset": "2"}], tmp / "out")


@row("hyperstack-time-points-and-sections", ValueError, r"hs.tif has axes TZYX \(2, 3, 40, 44\): several section axes \(T, Z\)")
def _(tmp):
    tifffile.imwrite(tmp / "hs.tif", np.zeros((2, 3, 1, 40, 44), np.uint8), imagej=True, metadata={"axes": "TZCYX"})
    return lambda: predict_files(net(), [str(tmp / "hs.tif")], tmp / "out")


@row("streaming-colour-for-grey-network", ValueError, r"rgb.tif: pixels \[0:\d+, 0:\] are colour \(R, G and B differ\), but the network takes 1 channel; pass rgb_to_grey=True")
def _(tmp):
    tifffile.imwrite(tmp / "rgb.tif", np.random.default_rng(0).integers(0, 255, (40, 44, 3), dtype=np.uint8), photometric="rgb")
    return lambda: predict_files(net(), [str(tmp / "rgb.tif")], tmp / "out")


@row("streaming-tissue-rule-on-grey", ValueError, r"grey.tif: skip_background applies to RGB whole-slide images .*set skip_background=False")
def _(tmp):
    tifffile.imwrite(tmp / "grey.tif", np.zeros((40, 44), np.uint8))
    return lambda: predict_files(net(), [str(tmp / "grey.tif")], tmp / "out", skip_background=True)


@row("cli-streaming-tissue-rule-on-grey-rgb", BundleError, r"section.tif: the tissue rule reads colour saturation, but this RGB image is grey .*set --skip_background false")
def _(tmp):
    grey = to_uint8(make_image((64, 72), seed=0)[0])
    tifffile.imwrite(tmp / "section.tif", np.stack([grey] * 3, -1), photometric="rgb")  # an EM section saved as RGB
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "section.tif"), "--streaming", "true", "--skip_background", "true", "--rgb_to_grey", "true")


@row("streaming-tissue-rule-finds-no-tissue", ValueError, r"blank.tif: skip_background found no tissue .*nothing would be predicted; set skip_background=False")
def _(tmp):
    tifffile.imwrite(tmp / "blank.tif", np.full((64, 72, 3), 235, np.uint8), photometric="rgb")
    return lambda: predict_files(UNet(in_channels=3, features=FEATURES).eval(), [str(tmp / "blank.tif")], tmp / "out", skip_background=True)


@row("streaming-source-non-finite", ValueError, r"a.zarr has 1 non-finite pixel\(s\) \(NaN or Inf\) of \d+ in section\(s\) 1 \(1\); pass fill_nan=True")
def _(tmp):
    volume = np.ones((2, 40, 44), np.float32)
    volume[1, 5, 6] = np.inf
    zarr.create_array(str(tmp / "a.zarr"), shape=volume.shape, chunks=(1, 40, 44), dtype="float32")[...] = volume
    return lambda: predict_zarr(net(), str(tmp / "a.zarr"), tmp / "out.zarr")


@row("export-existing-output", FileExistsError, r"1 output file\(s\) exist already, e.g. \[.*pkg.zip'\]; nothing was written. Pass overwrite=True to replace them, or choose another package=<path>")
def _(tmp):
    from pipeline.bioimageio import export_bioimageio

    (tmp / "pkg.zip").write_bytes(b"an earlier export")
    return lambda: export_bioimageio(net(), tmp / "pkg.zip", test=False)


@row("metric-class-out-of-range", ValueError, r"pred holds class values \[3\] outside 0 \.\. 2 \(num_classes=3\)")
def _(tmp):
    return lambda: metrics.class_scores(np.array([[0, 3], [2, 2]]), np.array([[0, 2], [2, 2]]), 3)


@row("export-sample-too-small", ValueError, r"sample_input .*small.tif' is 100 px along axis 0; the package needs at least 240 \(twice its halo, 112, plus the pooling step\)")
def _(tmp):
    from pipeline.bioimageio import export_bioimageio

    tifffile.imwrite(tmp / "small.tif", to_uint8(make_image((100, 120), seed=0)[0]))
    return lambda: export_bioimageio(net(), tmp / "pkg.zip", sample_input=tmp / "small.tif", test=False)


def console(tmp, *args):
    """An ``em-unet`` command that must fail: raise its stderr as :class:`BundleError`."""
    import subprocess
    import sys

    def action():
        proc = subprocess.run([str(Path(sys.executable).with_name("em-unet")), *args], cwd=tmp, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise BundleError(proc.stderr)

    return action


@row("bioimageio-pickled-weights", ValueError, r"^(?!.*weights_only=False)refusing to load bioimage\.io package .*pkg\.zip': its "
     r"pytorch_state_dict weights \(weights\.pt\) are not a plain state dict \(tensors by name\): they hold Python objects "
     r".*could run arbitrary code")
def _(tmp):
    import hashlib
    import io
    import zipfile

    import yaml

    from pipeline.bioimageio import export_bioimageio
    from pipeline.checkpoints import load_bioimageio

    export_bioimageio(net(), tmp / "exported.zip", test=False)
    with zipfile.ZipFile(tmp / "exported.zip") as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    buffer = io.BytesIO()
    torch.save({"model": net().state_dict(), "hook": OverlapTileInferer}, buffer)  # a class: unpickling it imports code
    files["weights.pt"] = buffer.getvalue()
    rdf = yaml.safe_load(files["rdf.yaml"])
    rdf["weights"]["pytorch_state_dict"]["sha256"] = hashlib.sha256(files["weights.pt"]).hexdigest()
    files["rdf.yaml"] = yaml.safe_dump(rdf).encode()
    with zipfile.ZipFile(tmp / "pkg.zip", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    (tmp / "exported.zip").unlink()
    return lambda: load_bioimageio(tmp / "pkg.zip")


@row("console-misspelt-key", BundleError, r"em-unet train: error: unknown argument\(s\): --num_epoch \(did you mean --num_epochs")
def _(tmp):
    return console(tmp, "train", "--num_epoch", "3")


@row("console-overlay-misspelt-key", BundleError, r"em-unet: error: mine.yaml: unknown key\(s\): num_epoch \(did you mean num_epochs\?\)")
def _(tmp):
    (tmp / "mine.yaml").write_text("num_epoch: 1\n")
    return console(tmp, "train", "--config", "mine.yaml")


@row("cli-overlay-misspelt-key", BundleError, r"mine.yaml: unknown key\(s\): num_epoch \(did you mean num_epochs\?\)")
def _(tmp):
    (tmp / "mine.yaml").write_text("num_epoch: 1\n")
    return lambda: run("run", "training", "--config_file", f"['{TRAIN}','{tmp / 'mine.yaml'}']", "--bundle_root", str(tmp))


@row("console-export-torchscript-onto-its-checkpoint", BundleError, r"output .*D/model.pt is the input .*D/model.pt: writing it would destroy the input, so nothing was written \(overwrite or not\)")
def _(tmp):
    (tmp / "D").mkdir()
    tiny_checkpoint(tmp).rename(tmp / "D" / "model.pt")
    return console(tmp, "export", "--model", "D/model.pt", "--format", "torchscript", "--torchscript", "D/model.pt", "--overwrite", "true")


@row("console-export-package-onto-its-checkpoint", BundleError, r"output D/model.pt is the input .*/model.pt \(through a link\): writing it would destroy the input")
def _(tmp):
    (tmp / "D").mkdir()
    tiny_checkpoint(tmp)
    (tmp / "D" / "model.pt").symlink_to(tmp / "model.pt")
    return console(tmp, "export", "--model", str(tmp / "model.pt"), "--format", "bioimageio", "--package", "D/model.pt", "--overwrite", "true")


@row("console-export-package-and-torchscript-on-one-path", BundleError, r"outputs E/same.zip and E/same.zip of one run are the same file: one would replace the other, so nothing was written")
def _(tmp):
    tiny_checkpoint(tmp)
    return console(tmp, "export", "--model", "model.pt", "--package", "E/same.zip", "--torchscript", "E/same.zip", "--overwrite", "true")


@row("console-export-package-onto-itself", BundleError, r"output .*pkg.zip is the input .*pkg.zip: writing it would destroy the input")
def _(tmp):
    (tmp / "pkg.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # (an empty zip: the check comes before reading it)
    return console(tmp, "export", "--model", "pkg.zip", "--format", "bioimageio", "--package", "pkg.zip", "--overwrite", "true")


# ------------------------------------------------------------------ what a run writes beside its outputs (issue 32)


@row("cli-streaming-export-over-users-ome-zarr", BundleError, r"1 output file\(s\) exist already, e.g. \[.*out/stack.ome.zarr'\]; nothing was written. Pass --overwrite true")
def _(tmp):
    tiny_checkpoint(tmp)
    zarr.open_group(str(tmp / "out" / "stack.ome.zarr"), mode="w").create_array("s0", shape=(2, 8, 8), dtype="uint8")
    return infer(tmp, "--input_path", str(sections(tmp)), "--streaming", "true", "--export", "ome-zarr")


@row("cli-streaming-export-over-users-ome-zarr-labels", BundleError, r"out/stack.ome.zarr exists and holds labels/curated, which this run does not write \(it writes labels, labels/mask, labels/mask/s<n>, s<n>\).*overwrite or not")
def _(tmp):
    tiny_checkpoint(tmp)
    group = zarr.open_group(str(tmp / "out" / "stack.ome.zarr"), mode="w")
    group.create_array("s0", shape=(2, 40, 44), dtype="float32")  # an earlier export of ours ...
    group.create_group("labels").create_array("curated", shape=(2, 40, 44), dtype="uint8")  # ... where the user painted labels
    return infer(tmp, "--input_path", str(sections(tmp)), "--streaming", "true", "--export", "ome-zarr", "--overwrite", "true")


@row("cli-streaming-export-over-another-tools-ome-zarr", BundleError, r"out/stack.ome.zarr exists and holds 0, which this run does not write .*overwrite or not")
def _(tmp):
    tiny_checkpoint(tmp)
    zarr.open_group(str(tmp / "out" / "stack.ome.zarr"), mode="w").create_array("0", shape=(2, 8, 8), dtype="uint8")  # levels 0, 1, ...
    return infer(tmp, "--input_path", str(sections(tmp)), "--streaming", "true", "--export", "ome-zarr", "--overwrite", "true")


@row("cli-streaming-export-over-users-ome-tiff", BundleError, r"exist already, e.g. \[.*out/stack_probabilities.ome.tif'\]")
def _(tmp):
    tiny_checkpoint(tmp)
    (tmp / "out").mkdir()
    tifffile.imwrite(tmp / "out" / "stack_probabilities.ome.tif", np.zeros((2, 8, 8), np.float32), ome=True)
    return infer(tmp, "--input_path", str(sections(tmp)), "--streaming", "true", "--export", "ome-tiff")


@row("cli-streaming-overlay-over-users-png", BundleError, r"exist already, e.g. \[.*out/stack_overlay.png'\]")
def _(tmp):
    tiny_checkpoint(tmp)
    write_image(np.zeros((8, 8), np.uint8), tmp / "out" / "stack_overlay.png")
    return infer(tmp, "--input_path", str(sections(tmp)), "--streaming", "true", "--overlay", "true")


@row("cli-streaming-hdf5-export-into-users-file", BundleError, r"out/sample.h5 exists and holds curated, labels, which this run does not write \(it writes mask, probabilities\): replacing it would lose them.*overwrite or not")
def _(tmp):
    import h5py

    tiny_checkpoint(tmp)
    (tmp / "out").mkdir()
    with h5py.File(tmp / "out" / "sample.h5", "w") as f:
        f["labels"], f["curated"] = np.ones((2, 40, 44), np.uint8), np.zeros((2, 40, 44), np.uint8)
    write_image(np.stack([to_uint8(make_image((40, 44), seed=i)[0]) for i in range(2)]), tmp / "data" / "sample.h5", meta={"dataset": "raw"})
    return infer(tmp, "--input_path", str(tmp / "data" / "sample.h5"), "--streaming", "true", "--export", "hdf5", "--overwrite", "true")


@row("cli-streaming-store-over-users-zarr-group", BundleError, r"out/stack.zarr exists and holds raw, which this run does not write .*overwrite or not")
def _(tmp):
    tiny_checkpoint(tmp)
    zarr.open_group(str(tmp / "out" / "stack.zarr"), mode="w").create_array("raw", shape=(2, 8, 8), dtype="uint8")
    return infer(tmp, "--input_path", str(sections(tmp)), "--streaming", "true", "--overwrite", "true")


@row("cli-predict-into-users-hdf5", BundleError, r"out/masks/sample.h5 exists and holds curated, which this run does not write")
def _(tmp):
    import h5py

    tiny_checkpoint(tmp)
    write_image(np.stack([to_uint8(make_image((40, 44), seed=i)[0]) for i in range(2)]), tmp / "data" / "sample.h5", meta={"dataset": "raw"})
    (tmp / "out" / "masks").mkdir(parents=True)
    with h5py.File(tmp / "out" / "masks" / "sample.h5", "w") as f:
        f["mask"], f["curated"] = np.ones((2, 40, 44), np.uint8), np.zeros((2, 40, 44), np.uint8)
    return infer(tmp, "--input_path", str(tmp / "data" / "sample.h5"), "--write", "[mask]", "--overwrite", "true")


@row("cli-zarr-missing-shard-in-memory", BundleError, r"vol.zarr: 1 of 2 shards are missing from the zarr array, e\.g\. c/1/0/0 \(array index \(1, 0, 0\)\).*pass --allow_missing_chunks true")
def _(tmp):
    zarr.create_array(str(tmp / "vol.zarr"), shape=(2, 40, 44), shards=(1, 40, 44), chunks=(1, 20, 22), dtype="float32")[...] = 1.0
    (tmp / "vol.zarr" / "c" / "1" / "0" / "0").unlink()  # one shard lost in a copy
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "vol.zarr"))


@row("zarr-v2-missing-chunk-in-memory", ValueError, r"v2.zarr: 1 of 8 chunks are missing from the zarr array, e\.g\. 1/0/1 \(array index \(1, 0, 1\)\).*pass allow_missing_chunks=True")
def _(tmp):
    from pipeline.engine import predict_files as predict_in_memory

    zarr.create_array(str(tmp / "v2.zarr"), shape=(2, 40, 44), chunks=(1, 20, 22), dtype="float32", zarr_format=2,
                      chunk_key_encoding={"name": "v2", "separator": "/"})[...] = 1.0
    (tmp / "v2.zarr" / "1" / "0" / "1").unlink()
    return lambda: predict_in_memory(net(), [str(tmp / "v2.zarr")], tmp / "out")


@row("hdf5-chunk-never-written-in-datalists", ValueError, r"raw.h5 dataset 'raw': 1 of 8 chunks are missing from the HDF5 dataset, e\.g\. the chunk at \(1, 0, 22\) \(array index \(1, 0, 1\)\).*pass allow_missing_chunks=True")
def _(tmp):
    with h5py.File(tmp / "raw.h5", "w") as f:
        raw = f.create_dataset("raw", shape=(2, 40, 44), chunks=(1, 20, 22), dtype="float32")
        raw[0], raw[1, 20:], raw[1, :20, :22] = 1.0, 1.0, 1.0  # the chunk [1, :20, 22:] never written
        f["labels"] = np.zeros((2, 40, 44), np.uint8)
    return lambda: data.make_datalists(tmp / "raw.h5", tmp / "raw.h5", val_slices=[1, 2], image_key="raw", label_key="labels")


@row("cli-train-hdf5-chunk-never-written", BundleError, r"raw.h5 dataset 'raw': 1 of 8 chunks are missing from the HDF5 dataset.*pass --allow_missing_chunks true")
def _(tmp):
    with h5py.File(tmp / "raw.h5", "w") as f:
        raw = f.create_dataset("raw", shape=(2, 40, 44), chunks=(1, 20, 22), dtype="float32")
        raw[0], raw[1, 20:], raw[1, :20, :22] = 1.0, 1.0, 1.0
        f["labels"] = np.zeros((2, 40, 44), np.uint8)
    return train(tmp, "--images", str(tmp / "raw.h5"), "--labels", str(tmp / "raw.h5"), "--image_key", "raw", "--label_key", "labels",
                 "--val_slices", "[1,2]")


@row("ilastik-axistags-channels-for-grey-network", ValueError, r"il.h5 has 3 channel\(s\) \(shape \(96, 96, 3\), stored axes YXC\), but the network takes 1; its 3 planes are channels by the file's own metadata \(axis C\), not RGB colour")
def _(tmp):
    with h5py.File(tmp / "il.h5", "w") as f:  # ilastik names the axes: y, x, c (not 96 sections of 96 x 3)
        f["data"] = np.zeros((96, 96, 3), np.uint8)
        f["data"].attrs["axistags"] = json.dumps({"axes": [{"key": k, "typeFlags": 1 if k == "c" else 2} for k in "yxc"]})
    return lambda: predict_files(net(), [str(tmp / "il.h5")], tmp / "out")


@row("cli-imagej-channels-with-rgb-to-grey", BundleError, r"ij.tif has 3 channel\(s\) \(shape \(3, 40, 44\), stored axes CYX\), but the network takes 1; --rgb_to_grey true applies to RGB colour only, and its 3 planes are channels .*: their luminance would mix them\. If they are 3 sections stored as channels, save the file again as a stack \(in Fiji, Image > Hyperstacks > Re-order Hyperstack")
def _(tmp):
    stack = np.stack([to_uint8(make_image((40, 44), seed=i)[0]) for i in range(3)])
    tifffile.imwrite(tmp / "ij.tif", stack, imagej=True)  # tifffile's ImageJ default for (3, Y, X): channels=3
    tiny_checkpoint(tmp)
    return infer(tmp, "--input_path", str(tmp / "ij.tif"), "--rgb_to_grey", "true")


def two_series(path):
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((4, 96, 96), np.uint8), photometric="minisblack")
        tif.write(np.ones((2, 64, 64), np.uint8), photometric="minisblack")


def holey_zarr(path):
    zarr.create_array(str(path), shape=(2, 40, 44), chunks=(1, 20, 22), dtype="float32")[...] = 1.0
    (path / "c" / "1" / "0" / "1").unlink()


TRAINED: dict = {}


def trained(tmp):
    """A finished 1-epoch run's models folder (adam, widths 4..64), copied into ``tmp/models``."""
    import shutil

    if "models" not in TRAINED:
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="trained-"))
        train(base, "--image_size", "[96,96]", "--num_images", "3", "--num_val", "1", "--patch_size", "[220,220]",
              "--optimizer_name", "adam", "--val_interval", "1")()
        TRAINED["models"] = base / "models"
    shutil.copytree(TRAINED["models"], tmp / "models")


def snapshot(folder: Path) -> dict:
    """Every path under ``folder``: files by size and modification time, folders by existence."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_row(name, tmp_path):
    make, exc, pattern = ROWS[name]
    action = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(exc) as info:
        action()
    assert re.search(pattern, str(info.value), re.S), f"{name}: message does not match {pattern!r}:\n{str(info.value)[-3000:]}"
    after = snapshot(tmp_path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{name}: files were created, changed or removed: {changed}"


def test_doc_matrix_lists_every_row():
    """docs/reliability.md has one table row per case here, by name, and nothing else."""
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", DOC.read_text(), re.M)
    assert sorted(documented) == sorted(ROWS) and len(documented) == len(set(documented))
    assert len(ROWS) >= 25


def test_accepted_inputs_image_smaller_than_tile_and_integer_dtypes():
    """Not errors: an image smaller than one tile is mirrored to the tile (output = input size),
    and integer/bool/float16 images are computed in the network's dtype, equal to float32 input."""
    model = net()
    image = torch.as_tensor(to_uint8(make_image((9, 13), seed=1)[0]))[None, None]
    out = OverlapTileInferer(tile_size=20)(image, model)
    assert out.shape == (1, 2, 9, 13)
    torch.testing.assert_close(out, OverlapTileInferer(tile_size=20)(image.float(), model), rtol=0, atol=0)
    assert OverlapTileInferer()(image > 127, model).dtype == torch.float32


def test_config_check_helpers():
    """The checks the configs run, on their own: CLI parsing forms and ranges."""
    assert config.cli_overrides(["run", "training", "--a", "1", "--b=2", "--flag", "--c", "x"]) == {"a": "1", "b": "2", "flag": "", "c": "x"}
    train_yaml, quick, isbi = ROOT / TRAIN, ROOT / "configs/quickstart.yaml", ROOT / "configs/isbi2012.yaml"
    cli.check_cli_keys(["run", "--config_file", f"['{train_yaml}','{quick}']", "--train#dataloader#num_workers", "2"])
    with pytest.raises(ValueError, match=r"--val_slice \(did you mean --val_slices, --val_files\?\)"):
        cli.check_cli_keys(["run", "--config_file", f"{train_yaml},{isbi}", "--val_slice", "[0,5]"])
    with pytest.raises(ValueError, match=r"num_epochs=0 is out of range; valid: \[1, inf\]; momentum=1 is out of range"):
        checks.check_hyperparameters(num_epochs=0, momentum=1, learning_rate=None)
    with pytest.raises(ValueError, match=r"batch_size=2.5 must be an integer"):
        checks.check_hyperparameters(batch_size=2.5)
