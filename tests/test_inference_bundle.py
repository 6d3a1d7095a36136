"""The inference bundle predicts TIFF stacks, PNG sections and NIfTI volumes exactly as the
inferer does in Python, keeps shape/spacing/affine, and TorchScript export matches eager."""


import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from monai.transforms import NormalizeIntensity

from pipeline.inferers import OverlapTileInferer
from pipeline.io import read_image, write_image
from pipeline.networks import UNet
from pipeline.synthetic import make_stack, to_uint8

from conftest import CONFIGS, EVALUATE, FEATURES, INFER, bundle

def infer(tmp_path, input_path, out, *extra):
    return bundle(
        "run", "--config_file", INFER, "--checkpoint", str(tmp_path / "model.pt"), "--input_path", str(input_path),
        "--output_dir", str(out), *extra,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    net = UNet(features=FEATURES).eval()
    torch.save(net.state_dict(), tmp / "model.pt")
    stack = to_uint8(make_stack((3, 70, 90), seed=3)[0])
    inputs = tmp / "inputs"
    write_image(stack, inputs / "stack.tif", meta={"spacing": [50.0, 4.0, 4.0]})
    affine = np.diag([4.0, 4.0, 50.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 2.0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stack.transpose(2, 1, 0)), affine), inputs / "vol.nii.gz")
    for i in range(2):
        write_image(stack[i], inputs / f"sec_{i}.png")
    proc = infer(tmp, inputs, tmp / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, net, stack


def expected_probability(net, section_stack):
    """The inferer's probability, each section normalised on its own (as the bundle does)."""
    sections = torch.as_tensor(section_stack, dtype=torch.float32).reshape(-1, *section_stack.shape[-2:])
    x = torch.stack([NormalizeIntensity()(s) for s in sections]).reshape(section_stack.shape)[None, None]
    with torch.inference_mode():
        logits = OverlapTileInferer()(x, net)
    return torch.softmax(logits, 1)[0, 1].numpy()


@pytest.mark.slow
def test_tiff_stack(setup):
    tmp, net, stack = setup
    prob = tifffile.imread(tmp / "out/probabilities/stack.tif")
    assert prob.dtype == np.float32 and prob.shape == (3, 70, 90)
    np.testing.assert_allclose(prob, expected_probability(net, stack), atol=1e-5)
    mask, meta = read_image(tmp / "out/masks/stack.tif")
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, prob > 0.5)
    np.testing.assert_allclose(meta["spacing"], [50.0, 4.0, 4.0])


@pytest.mark.slow
def test_png_sections(setup):
    tmp, net, stack = setup
    for i in range(2):
        prob = tifffile.imread(tmp / f"out/probabilities/sec_{i}.tif")  # PNG cannot hold float32
        np.testing.assert_allclose(prob, expected_probability(net, stack[i]), atol=1e-5)
        mask, _ = read_image(tmp / f"out/masks/sec_{i}.png")
        assert mask.shape == (70, 90) and np.array_equal(mask == 255, prob > 0.5)


@pytest.mark.slow
def test_nifti_volume_keeps_axes_and_affine(setup):
    tmp, net, stack = setup
    src = nib.load(tmp / "inputs/vol.nii.gz")
    for name in ("probabilities", "masks"):
        out = nib.load(tmp / f"out/{name}/vol.nii.gz")
        assert out.shape == (90, 70, 3)
        np.testing.assert_allclose(out.affine, src.affine)
    prob = nib.load(tmp / "out/probabilities/vol.nii.gz").get_fdata().transpose(2, 1, 0)
    # sections are the NIfTI's last axis: predicted like the TIFF stack's pages
    np.testing.assert_allclose(prob, expected_probability(net, stack), atol=1e-5)


@pytest.mark.slow
def test_refuses_to_overwrite_and_bad_checkpoint(setup, tmp_path):
    tmp, _, _ = setup
    before = (tmp / "out/masks/stack.tif").read_bytes()
    proc = infer(tmp, tmp / "inputs/stack.tif", tmp / "out")
    assert proc.returncode != 0 and "exist already" in proc.stderr and "--overwrite true" in proc.stderr
    assert (tmp / "out/masks/stack.tif").read_bytes() == before
    wrong = bundle("run", "--config_file", INFER, "--checkpoint", str(tmp / "model.pt"), "--input_path",
                   str(tmp / "inputs/stack.tif"), "--output_dir", str(tmp_path / "o"),
                   "--architecture", "{'features': [64, 128, 256, 512, 1024]}")  # the paper's widths, given explicitly
    assert wrong.returncode != 0 and "trained with another architecture" in wrong.stderr
    assert "encoder.0.0.weight: checkpoint (4, 1, 3, 3), network (64, 1, 3, 3)" in wrong.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchscript_export_matches_eager(setup):
    tmp, net, _ = setup
    ts = tmp / "model.ts"
    proc = bundle(
        "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(tmp / "model.pt"), "--config_file", INFER,
        "--meta_file", str(CONFIGS / "metadata.json"), "--checkpoint", str(tmp / "model.pt"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripted = torch.jit.load(str(ts))
    x = torch.randn(2, 1, 220, 252)
    with torch.inference_mode():
        assert (scripted(x) - net(x)).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_evaluate_bundle_report_and_overlays(setup, tmp_path):
    import csv
    import json

    from pipeline import metrics

    tmp, net, stack = setup
    labels = (make_stack((3, 70, 90), seed=3)[1]).astype(np.uint8)
    write_image(labels, tmp_path / "labels.tif")
    proc = bundle(
        "run", "--config_file", EVALUATE, "--checkpoint", str(tmp / "model.pt"),
        "--images", str(tmp / "inputs/stack.tif"), "--labels", str(tmp_path / "labels.tif"), "--eval_slices", "[1,3]",
        "--output_dir", str(tmp_path / "ev"), "--key_metric_name", "pixel_error",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "ev/report.csv")))
    assert [(r["file"], r["slice"]) for r in rows] == [("stack.tif", "1"), ("stack.tif", "2"), ("mean", "")]
    prob = expected_probability(net, stack)
    for z, row in zip((1, 2), rows):
        expected = metrics.evaluate(prob[z], labels[z] > 0)
        for key in ("pixel_error", "v_rand", "v_info", "warping_error", "dice"):
            assert float(row[key]) == pytest.approx(expected[key], abs=1e-4), key
    report = json.loads((tmp_path / "ev/report.json").read_text())
    assert report["mean"]["pixel_error"] == pytest.approx(float(rows[2]["pixel_error"]))
    assert f"pixel_error: {report['mean']['pixel_error']:.4f}" in proc.stdout + proc.stderr  # the key metric
    assert sorted(p.name for p in (tmp_path / "ev/overlays").iterdir()) == ["stack_z0001.png", "stack_z0002.png"]


@pytest.mark.slow
def test_streaming_switch_writes_zarr_equal_to_in_memory(setup, tmp_path):
    import zarr

    tmp, _, _ = setup
    proc = infer(tmp, tmp / "inputs/stack.tif", tmp_path / "z", "--streaming", "true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    group = zarr.open_group(str(tmp_path / "z/stack.zarr"), mode="r")
    streamed = group["probabilities"][:]
    in_memory = tifffile.imread(tmp / "out/probabilities/stack.tif")
    assert streamed.shape == in_memory.shape == (3, 70, 90)
    assert np.abs(streamed - in_memory).max() <= 1e-5
    assert np.array_equal(group["mask"][:], tifffile.imread(tmp / "out/masks/stack.tif"))
