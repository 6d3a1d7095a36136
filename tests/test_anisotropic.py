"""Anisotropic 3D: per-axis geometry (hand-computed), the network it builds, exact overlap-tile in 3D."""

import numpy as np
import pytest
import torch

from conftest import ROOT
from pipeline.geometry import UNetGeometry, propose_scheme
from pipeline.inferers import OverlapTileInferer, tta_transforms
from pipeline.networks import UNet, memory_format
from pipeline.tiling import auto_tile_size, make_plan, mirror_pad

# serial sections, 40 x 4 x 4 nm: in-plane pooling until the voxel is roughly isotropic (nnU-Net's rule)
SCHEME = {"pool": [[1, 2, 2]] * 3 + [[2, 2, 2]], "kernel_size": [[1, 3, 3]] * 3 + [[3, 3, 3]] * 2}


def test_scheme_from_spacing():
    assert propose_scheme([40, 4, 4]) == SCHEME
    # 12.5x (ISBI 2012's 50 nm sections, 4 nm pixels): the same; isotropic voxels: the paper's 3D U-Net
    assert propose_scheme([50, 4, 4]) == SCHEME
    assert propose_scheme([1, 1, 1], depth=2) == {"pool": [[2, 2, 2]] * 2, "kernel_size": [[3, 3, 3]] * 3}
    # 3x: z is pooled from the second level on (spacing 12 vs 8 after one in-plane pooling)
    assert propose_scheme([12, 4, 4], depth=3) == {"pool": [[1, 2, 2], [2, 2, 2], [2, 2, 2]],
                                                   "kernel_size": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]}
    with pytest.raises(ValueError, match="positive"):
        propose_scheme([0, 4, 4])


def test_anisotropic_geometry_by_hand():
    g = UNetGeometry(**SCHEME)
    # z: levels 0-2 have kernel 1 and no pooling (no loss); level 3 loses 2 * 2, pools by 2; the bottom
    # loses 4; up x2, level 3 loses 4: 22 -> 18 -> 9 -> 5 -> 10 -> 6, so the z margin is (22 - 6) / 2 = 8
    assert g.output_size((22, 252, 252)) == (6, 68, 68)
    assert g.margins() == (8, 92, 92) and g.steps() == (2, 16, 16) and g.min_input_sizes() == (18, 188, 188)
    assert g.spatial_dims == 3 and not g.isotropic
    assert [s for s in range(1, 40) if g.is_valid((s, 188, 188))] == list(range(18, 40, 2))
    assert g.input_size((6, 68, 68)) == (22, 252, 252)
    with pytest.raises(ValueError, match="use margins"):
        g.margin
    # the paper's 2D geometry is unchanged; an isotropic one holds for any number of axes
    paper = UNetGeometry()
    assert paper.margins(2) == (92, 92) and paper.output_size((572, 572)) == (388, 388) and paper.margin == 92


def test_invalid_anisotropic_size_names_the_nearest_per_axis():
    g = UNetGeometry(**SCHEME)
    with pytest.raises(ValueError, match=r"axis 0 \(z\): 21 \(nearest valid: 20 or 22\); axis 1 \(y\): 250 \(nearest valid: "
                                         r"236 or 252\)\. Valid sizes per axis: axis 0 \(z\): 18 \+ 2 \* n; axis 1 \(y\): 188"):
        g.check_input_size((21, 250, 252))
    with pytest.raises(ValueError, match=r"axis 0 \(z\): 9 \(nearest valid: 18 \(the smallest\)\)"):
        g.output_size((9, 188, 188))
    with pytest.raises(ValueError, match="expected 3 spatial sizes, got 2"):
        g.output_size((188, 188))
    with pytest.raises(ValueError, match="5 entries"):
        UNetGeometry(kernel_size=[[1, 3, 3]] * 2)
    with pytest.raises(ValueError, match="one length"):
        UNetGeometry(kernel_size=[1, 3, 3], pool=[2, 2])
    with pytest.raises(ValueError, match="odd"):
        UNetGeometry(kernel_size=[1, 2, 3])
    with pytest.raises(ValueError, match="spatial_dims is 2"):
        UNet(spatial_dims=2, **SCHEME)


def test_network_follows_the_scheme():
    net = UNet(spatial_dims=3, features=(2, 4, 8, 16, 32), dropout=0.0, **SCHEME).eval()
    assert net.encoder[0][0].kernel_size == (1, 3, 3) and net.encoder[3][0].kernel_size == (3, 3, 3)
    assert [m.kernel_size for m in net.pools[1:]] == [(1, 2, 2)] * 3 + [(2, 2, 2)]
    assert [u.stride for u in net.upconvs] == [(2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2)]  # bottom first
    with torch.inference_mode():
        assert net(torch.zeros(1, 1, 22, 188, 204)).shape == (1, 2, 6, 4, 20)
    # the architecture record carries the scheme: a checkpoint of another pooling is refused by name
    other = UNet(spatial_dims=3, features=(2, 4, 8, 16, 32), dropout=0.0, kernel_size=SCHEME["kernel_size"], pool=[[1, 2, 2]] * 4)
    with pytest.raises(ValueError, match="pool: checkpoint"):
        other.load_state_dict(net.state_dict())
    # the paper's network: parameters as before
    assert sum(p.numel() for p in UNet().parameters()) == 31_030_658


def whole_pass(net, x):
    """One pass over the volume mirror-padded by the margins of each axis, to the next valid size, cropped back."""
    g, m = net.geometry, net.geometry.margins(3)
    size = x.shape[2:]
    padded = g.nearest_valid_input_size([s + 2 * mi for s, mi in zip(size, m)])
    p = mirror_pad(x, [(mi, ps - s - mi) for ps, s, mi in zip(padded, size, m)])
    return net(p)[(..., *[slice(0, s) for s in size])]


@pytest.mark.parametrize("tile, channels_last", [((4, 20, 36), False), ((6, 36, 20), True), ("auto", False)])
def test_overlap_tile_3d_equals_a_whole_volume_pass(tile, channels_last):
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, features=(2, 4, 8, 16, 32), norm="batch", dropout=0.0, **SCHEME).eval()
    net.to(memory_format=memory_format(3, channels_last))
    x = torch.randn(1, 1, 11, 45, 70)  # odd sizes, a few sections: mirrored in z by 8, in-plane by 92
    with torch.inference_mode():
        tiled = OverlapTileInferer(tile_size=tile, batch_size=2, memory_budget_mb=16)(x, net)
        ref = whole_pass(net, x)
    assert tiled.shape == (1, 2, 11, 45, 70)
    assert (tiled - ref).abs().max().item() <= 1e-4


def test_auto_tiles_are_thin_in_z_and_wide_in_plane():
    g = UNetGeometry(**SCHEME)
    # 30 sections of 1024 x 1024: one tile spans all sections (46 input planes), in-plane as wide as fits
    assert auto_tile_size((30, 1024, 1024), g, (8, 92, 92), 46 * 700 * 700) == (30, 516, 516)
    # 64 sections within 8.8 M input voxels: computed voxels, z tiles x in-plane tiles x inputs:
    # (32, 212, 260): 2 * 48 * (5 * 396) * (4 * 444) = 338 M; (32, 212, 212): 376 M; (64, 140, 140):
    # 80 * (8 * 324) ** 2 = 537 M; (8, 420, 420): 8 * 24 * (3 * 604) ** 2 = 630 M (a cube cap of 206 px per
    # axis fits no in-plane tile at all)
    assert auto_tile_size((64, 1024, 1024), g, (8, 92, 92), 24 * 604 * 604) == (32, 212, 260)
    # a 30 x 90 x 100 volume in one (30, 100, 100) tile: the margins of each axis, y extended by the tile's 10 extra px
    plan = make_plan(UNet(spatial_dims=3, features=(2, 4, 8, 16, 32), **SCHEME), (30, 90, 100), tile_size=(30, 100, 100))
    assert plan.margin == (8, 92, 92) and plan.pads() == [(8, 8), (92, 102), (92, 92)]


def test_tta_flips_z_for_a_3d_network_and_is_inverted_exactly():
    class Identity3d(torch.nn.Module):  # same-padded identity: TTA of an equivariant map is the map
        def __init__(self):
            super().__init__()
            self.geometry, self.spatial_dims, self.in_channels, self.features = UNetGeometry(0, padding="same"), 3, 1, (1,)
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return torch.cat([x, x * torch.arange(x.shape[-3], dtype=x.dtype).view(-1, 1, 1)], 1) * self.w

    x = torch.randn(1, 1, 5, 16, 16)
    net = Identity3d()
    assert len(tta_transforms(net, x)) == 16
    with torch.inference_mode():
        y = OverlapTileInferer(tile_size=(5, 16, 16), context=0, tta=True)(x, net)  # TTA of each tile: here the image
    assert torch.allclose(y[:, 0], x[:, 0], atol=1e-6)
    # channel 1 depends on the z index: each z-flipped pass sees z reversed, so the mean is the mean index 2
    assert torch.allclose(y[:, 1], x[:, 0] * 2.0, atol=1e-5)


def test_in_plane_elastic_warps_every_section_alike():
    import numpy as np

    from pipeline.transforms import RandElasticGridd

    vol = torch.arange(3 * 40 * 50, dtype=torch.float32).reshape(1, 3, 40, 50) % 50  # x coordinate, every section
    vol = vol + 1000 * torch.arange(3).view(1, 3, 1, 1)  # plus 1000 z: z must not mix
    t = RandElasticGridd(keys="image", sigma=4.0, mode="bilinear", in_plane=True)
    t.set_random_state(0)
    out = t({"image": vol})["image"]
    # no displacement along z: each section keeps its own 1000 z offset; one field: sections differ only by it
    assert torch.allclose(out[0, 1] - out[0, 0], torch.full((40, 50), 1000.0), atol=1e-3)
    assert torch.allclose(out[0, 2] - out[0, 0], torch.full((40, 50), 2000.0), atol=1e-3)
    assert not torch.allclose(out[0, 0], vol[0, 0])  # and it did warp
    # the same draw as the 2D transform on one section: a 2D field, the same random numbers
    t2 = RandElasticGridd(keys="image", sigma=4.0, mode="bilinear")
    t2.set_random_state(0)
    assert np.allclose(t2({"image": vol[:, 0]})["image"][0], out[0, 0], atol=1e-4)


def test_weight_map_distances_follow_the_spacing():
    from pipeline.labels import weight_map

    cells = torch.zeros(3, 1, 9, dtype=torch.int64)
    cells[0, 0, :4], cells[0, 0, 5:] = 1, 2  # two cells 1 px apart in-plane, in section 0
    cells[2, 0, :] = 3  # a third one two sections away
    classes = (cells > 0).long().numpy()
    iso = weight_map(classes, cells.numpy(), w0=10, sigma=5, class_balance=False)
    aniso = weight_map(classes, cells.numpy(), w0=10, sigma=5, class_balance=False, spacing=[10, 1, 1])
    # the gap pixel (0, 0, 4): d1 = d2 = 1 in-plane either way; cell 3 is 2 voxels away, or 20 px with the spacing
    assert aniso[0, 0, 4] == pytest.approx(1 + 10 * np.exp(-4 / 50), rel=1e-5)
    # section 1 (between cells 1/2 and 3): d1 = d2 = 1 voxel, or 10 px
    assert iso[1, 0, 0] == pytest.approx(1 + 10 * np.exp(-4 / 50), rel=1e-5)
    assert aniso[1, 0, 0] == pytest.approx(1 + 10 * np.exp(-400 / 50), rel=1e-4)


def test_volume_datalists_train_around_the_validation_sections(tmp_path):
    import tifffile

    from pipeline.data import make_datalists

    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.zeros((12, 8, 8), np.uint8))
        tifffile.imwrite(tmp_path / f"{name}_l.tif", np.zeros((12, 8, 8), np.uint8))
    (tmp_path / "img").mkdir(), (tmp_path / "lab").mkdir()
    for name in ("a", "b"):
        (tmp_path / f"{name}.tif").rename(tmp_path / "img" / f"{name}.tif")
        (tmp_path / f"{name}_l.tif").rename(tmp_path / "lab" / f"{name}.tif")
    train, val = make_datalists(tmp_path / "img", tmp_path / "lab", val_slices=[4, 7], volumes=True)
    assert [(i["image"][-5:], i["slices"]) for i in train] == [("a.tif", [0, 4]), ("a.tif", [7, 12]), ("b.tif", [0, 4]), ("b.tif", [7, 12])]
    assert [(i["image"][-5:], i["slices"]) for i in val] == [("a.tif", [4, 7]), ("b.tif", [4, 7])]
    train, val = make_datalists(tmp_path / "img", tmp_path / "lab", val_files=1, volumes=True)
    assert [i["image"][-5:] for i in train] == ["a.tif"] and [i["image"][-5:] for i in val] == ["b.tif"] and "slices" not in val[0]
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="flat.tif is a 2D image.*--spatial_dims 2"):
        make_datalists(tmp_path / "flat.tif", tmp_path / "flat.tif", volumes=True)


def test_streaming_3d_equals_in_memory(tmp_path):
    from pipeline.streaming import predict_zarr

    torch.manual_seed(4)
    net = UNet(spatial_dims=3, features=(2, 4, 8, 16, 32), norm="batch", dropout=0.0, **SCHEME).eval()
    vol = np.random.default_rng(0).normal(size=(13, 70, 90)).astype(np.float32)
    out = predict_zarr(net, vol, tmp_path / "out.zarr", block_size=(6, 32, 48), tile_size=(4, 20, 20), normalize=False,
                       write=("probabilities",))
    import zarr

    streamed = np.asarray(zarr.open_group(str(out), mode="r")["probabilities"])
    with torch.inference_mode():
        ref = torch.softmax(OverlapTileInferer(tile_size=(6, 36, 36))(torch.from_numpy(vol)[None, None], net), 1)[0, 1].numpy()
    assert streamed.shape == (13, 70, 90)
    assert np.abs(streamed - ref).max() <= 1e-5


@pytest.mark.slow
def test_em3d_bundle_trains_and_predicts_volumes(tmp_path):
    """configs/em3d.yaml end to end on tiny settings: 3D crops of synthetic stacks, validation on a whole volume, then
    the inference bundle (channels-last-3D, the network rebuilt from the checkpoint) equals the inferer in memory."""
    import tifffile

    from conftest import INFER, TRAIN, bundle, train_args
    from pipeline.checkpoints import network_from_checkpoint

    em3d = str(ROOT / "configs/em3d.yaml")
    tiny = ["--features", "[2,4,8,16,32]", "--image_size", "[20,64,64]", "--num_images", "3", "--num_val", "1",
            "--patch_size", "[18,188,188]", "--num_epochs", "1", "--val_interval", "1"]
    bad = bundle(*train_args(tmp_path / "bad", *tiny[:-6], "--patch_size", "[19,190,188]", configs=(TRAIN, em3d)))
    assert bad.returncode != 0
    assert "axis 0 (z): 19 (nearest valid: 18 or 20); axis 1 (y): 190 (nearest valid: 188 or 204)" in bad.stderr
    assert not (tmp_path / "bad/models").exists() or not any((tmp_path / "bad/models").iterdir())
    run = bundle(*train_args(tmp_path, *tiny, configs=(TRAIN, em3d)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "val_mean_dice" in run.stderr + run.stdout
    ckpt = tmp_path / "models/model_final.pt"
    net = network_from_checkpoint(str(ckpt), None).eval()
    assert net.spatial_dims == 3 and net.geometry.margins() == (8, 92, 92)
    stack = tifffile.imread(sorted((tmp_path / "data/images").iterdir())[0])
    assert stack.shape == (20, 64, 64)
    pred = bundle("run", "--config_file", str([INFER, em3d]), "--checkpoint", str(ckpt), "--input_path",
                  str(sorted((tmp_path / "data/images").iterdir())[0]), "--output_dir", str(tmp_path / "out"), "--adapt_norm", "false")
    assert pred.returncode == 0, pred.stderr[-3000:]
    written = tifffile.imread(next((tmp_path / "out/probabilities").iterdir()))
    x = torch.from_numpy(stack.astype(np.float32))
    x = (x - x.mean(dim=(1, 2), keepdim=True)) / x.std(dim=(1, 2), keepdim=True, correction=0)  # NormalizeSectionsd
    with torch.inference_mode():
        ref = torch.softmax(OverlapTileInferer()(x[None, None], net), 1)[0, 1].numpy()
    assert written.shape == (20, 64, 64) and np.abs(written - ref).max() <= 1e-4
