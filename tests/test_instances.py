"""Instances from predictions (pipeline.instances): the rules on hand-made maps, ids over stacks, the
writer in every format, and the instances quickstart through the bundle CLI."""

import numpy as np
import pytest
import tifffile
import torch

from pipeline.instances import InstanceRule, make_instances, parse_rules
from pipeline.io import read_image


def two_cells_with_a_gap():
    """Boundary probability of two 7 x 7 cells side by side whose membrane has a 1-px gap (row 5)."""
    b = np.ones((11, 19), np.float32)
    b[2:9, 2:9] = 0.1   # cell A: columns 2-8
    b[2:9, 10:17] = 0.1  # cell B: columns 10-16, membrane column 9
    b[5, 9] = 0.3        # the gap: below the threshold, so A and B touch through one pixel
    return b


def probs_of(boundary):
    return np.stack([boundary, 1 - boundary])


def test_components_merge_through_a_gap_and_the_watershed_splits_there():
    b = two_cells_with_a_gap()
    merged = make_instances(probs_of(b), InstanceRule("components"))
    assert merged.max() == 1 and (merged > 0).sum() == 2 * 49 + 1
    split = make_instances(probs_of(b), InstanceRule("watershed", seed_distance=1.0))
    assert split.dtype == np.uint32 and split.max() == 2
    assert (split[2:9, 2:9] == 1).all() and (split[2:9, 10:17] == 2).all()  # each cell whole, ids in raster order
    assert split.min() == 1  # cells fill the image: membranes go to their nearest basin
    interiors = make_instances(probs_of(b), InstanceRule("watershed", seed_distance=1.0, fill=False))
    assert np.array_equal(interiors, np.where(b < 0.5, split, 0))  # the membrane stays 0; the gap goes to a cell
    no_seed_cut = make_instances(probs_of(b), InstanceRule("watershed", seed_distance=0.0))
    assert no_seed_cut.max() == 1  # seeds that are the whole interior keep the gap: one cell


def test_min_size_threshold_and_background_channel():
    fg = np.zeros((10, 10), np.float32)
    fg[1:4, 1:4] = 0.9  # 9 px
    fg[6:8, 6:8] = 0.7  # 4 px
    fg[6, 1] = 0.55     # 1 px
    assert make_instances(probs_of(1 - fg), InstanceRule("components")).max() == 3
    assert make_instances(probs_of(1 - fg), InstanceRule("components", min_size=4)).max() == 2
    assert make_instances(probs_of(1 - fg), InstanceRule("components", threshold=0.6, min_size=5)).max() == 1
    # three classes: background (0), boundary (1), interior (2); background pixels stay 0
    probs = np.zeros((3, 10, 10), np.float32)
    probs[0] = 1.0
    probs[:, 1:9, 1:9] = np.array([0.0, 0.2, 0.8])[:, None, None]
    probs[:, 1:9, 4] = np.array([0.0, 0.9, 0.1])[:, None]  # a membrane splits the object in two
    ids = make_instances(probs, InstanceRule("watershed", channel=1, background_channel=0, seed_distance=0.5))
    assert ids.max() == 2 and (ids[0] == 0).all() and (ids[:, 0] == 0).all() and (ids[1:9, 1:4] == 1).all()


def test_stacks_2d_sections_get_continued_ids_and_3d_links_sections():
    b = np.stack([two_cells_with_a_gap()] * 3)
    probs = probs_of(b)
    per_section = make_instances(probs, InstanceRule("watershed", seed_distance=1.0, mode="2d"))
    assert sorted(np.unique(per_section).tolist()) == [1, 2, 3, 4, 5, 6]
    assert per_section[2, 5, 5] == 5 and per_section[2, 5, 12] == 6
    volume = make_instances(probs, InstanceRule("watershed", seed_distance=1.0, mode="3d"))
    assert volume.max() == 2 and (volume[:, 5, 5] == 1).all() and (volume[:, 5, 12] == 2).all()


def test_rules_from_the_bundle_key_and_their_errors():
    rules = parse_rules({"cells": "watershed", "mito": {"method": "components", "channel": 2, "min_size": 20}})
    assert rules["cells"] == InstanceRule("watershed", channel=0) and rules["mito"].channel == 2
    with pytest.raises(ValueError, match=r"instances\['cells'\]: unknown settings \['seed'\]; valid settings: method, channel"):
        parse_rules({"cells": {"seed": 3}})
    with pytest.raises(ValueError, match=r"instance method 'flood' is unknown; valid: watershed, components"):
        parse_rules({"cells": {"method": "flood"}})
    with pytest.raises(ValueError, match=r"reads class 2, but the network predicts 2 classes"):
        make_instances(np.zeros((2, 4, 4)), InstanceRule("components", channel=2))


@pytest.mark.parametrize("name", ["stack.tif", "img.png", "vol.nii.gz", "vol.h5"])
def test_writer_writes_instances_in_the_inputs_format(tmp_path, name):
    from pipeline.engine import BlockLayout, FilesSink
    from pipeline.transforms import LoadSectiond, class_probabilities
    from pipeline.io import write_image

    shape = (11, 19) if name.endswith(".png") else (2, 11, 19)
    b = np.broadcast_to(two_cells_with_a_gap(), shape).copy()
    write_image((b * 255).astype(np.uint8), tmp_path / name)
    image = LoadSectiond("image")({"image": str(tmp_path / name)})["image"]
    logits = torch.from_numpy(np.log(probs_of(b) + 1e-6))  # soft-max gives the probabilities back
    if image.meta.get("axes_reversed"):
        logits = logits.permute(0, *reversed(range(1, logits.ndim)))
    sink = FilesSink(tmp_path / "out", tmp_path / name, image.meta, write=["mask", "instances"],
                     instances={"cells": {"method": "watershed", "seed_distance": 1.0}})
    spatial = tuple(logits.shape[1:])
    sink.open(None, None, None, BlockLayout(spatial, spatial, 0))
    sink.write(([0] * len(spatial), list(spatial)), logits, None)
    out = sink.close()["instances/cells"]
    assert out.parent.name == "cells" and out.suffix == (".tif" if name.endswith(".png") else out.suffix)
    ids, _ = read_image(out)
    expected = make_instances(class_probabilities(torch.from_numpy(np.log(probs_of(b) + 1e-6))).numpy(),
                              InstanceRule("watershed", seed_distance=1.0))
    assert ids.dtype == np.uint32 and np.array_equal(np.squeeze(ids), expected)


@pytest.mark.slow
def test_instances_quickstart_trains_and_writes_cells_and_mitochondria(tmp_path):
    """configs/instances_quickstart.yaml at tiny settings: training shows instances in TensorBoard, inference
    writes uint32 cells and mitochondria next to a class-index mask."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import FEATURES_ARG, INFER, ROOT, TRAIN, bundle, train_args

    overlay = str(ROOT / "configs" / "instances_quickstart.yaml")
    tiny = ["--features", FEATURES_ARG, "--num_images", "3", "--num_val", "1", "--image_size", "[128,128]",
            "--patch_size", "[188,188]", "--num_epochs", "1", "--val_interval", "1"]
    proc = bundle(*train_args(tmp_path, *tiny, configs=(TRAIN, overlay)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "eval"), size_guidance={"images": 0})
    events.Reload()
    assert {"validation/cells_0", "validation/mitochondria_0"} <= set(events.Tags()["images"])
    assert {"val_dice_cytoplasm", "val_dice_membrane", "val_dice_mitochondria"} <= set(events.Tags()["scalars"])
    proc = bundle("run", "--config_file", str([INFER, overlay]), "--checkpoint", str(tmp_path / "models" / "model_final.pt"),
                  "--output_dir", str(tmp_path / "pred"), "--data_cache_dir", str(tmp_path / "stackdata"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (stack,) = (tmp_path / "stackdata").glob("stack_*.tif")
    for rule in ("cells", "mitochondria"):
        ids = tifffile.imread(tmp_path / "pred" / "instances" / rule / stack.name)
        assert ids.dtype == np.uint32 and ids.shape == (8, 256, 256)
    mask = tifffile.imread(tmp_path / "pred" / "masks" / stack.name)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1, 2}


def same_up_to_relabelling(a, b):
    """True when one id map turns ``a`` into ``b`` and back (0 to 0)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (len(pairs[0]) == len(np.unique(a)) == len(np.unique(b))) and all((x == 0) == (y == 0) for x, y in pairs.T)


def stored_volume(tmp_path, shape=(3, 128, 128), seed=3):
    """A zarr group holding a noisy foreground probability of a synthetic stack, and that probability."""
    import zarr

    from pipeline.synthetic import make_targets

    rng = np.random.default_rng(seed)
    fg = (make_targets(shape, seed=seed)["label"] > 0).astype(np.float32)
    from scipy import ndimage as ndi

    prob = np.clip(ndi.gaussian_filter(fg, (0, 1.0, 1.0)) + 0.12 * rng.standard_normal(shape), 0, 1).astype(np.float32)
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="w")
    group.create_array("probabilities", shape=shape, chunks=(1, 40, 40), dtype="float32")[...] = prob
    return str(tmp_path / "out.zarr"), prob


@pytest.mark.parametrize("rule", [
    InstanceRule("components", min_size=30, mode="2d"), InstanceRule("components", threshold=0.9, min_size=30, mode="3d"),
    InstanceRule("watershed", seed_distance=2.0, min_size=5, mode="2d"), InstanceRule("watershed", seed_distance=1.5, mode="3d"),
    InstanceRule("watershed", seed_distance=2.0, mode="2d", fill=False),
])
def test_block_by_block_equals_the_whole_volume_up_to_relabelling(tmp_path, rule):
    """label_zarr on 3 x 3 x 3 blocks (objects cross block faces everywhere; noise makes small objects that
    min_size drops by their merged size) gives the in-memory instances."""
    import zarr

    from pipeline.instances import label_zarr

    store, prob = stored_volume(tmp_path)
    whole = make_instances(probs_of(1 - prob), rule)
    assert whole.max() > 5
    path = label_zarr(store, "probabilities", rule, "cells", block=(1, 40, 40), halo=48)
    blocks = np.asarray(zarr.open_group(store, mode="r")[path][...])
    assert blocks.dtype == np.uint32 and "_instances_tmp" not in zarr.open_group(store, mode="r")
    assert same_up_to_relabelling(whole, blocks)


@pytest.mark.slow
def test_streaming_instances_on_a_dask_cluster_equal_the_in_memory_run(tmp_path):
    """predict_zarr with write [instances] on a real LocalCluster (blocks of 48 px): its probabilities are the
    in-memory inferer's (to float rounding), and its instances, made block by block, are those of the whole
    stack from the same probabilities, up to a relabelling."""
    import zarr

    from pipeline.inferers import OverlapTileInferer
    from pipeline.networks import UNet
    from pipeline.streaming import predict_zarr
    from pipeline.synthetic import make_stack
    from pipeline.transforms import NormalizeSectionsd, class_probabilities

    torch.manual_seed(0)
    net = UNet(features=[4, 8, 16], dropout=0.0).eval()
    image, _ = make_stack((2, 120, 120), seed=5)
    x = NormalizeSectionsd("image")({"image": torch.from_numpy(image)[None]})["image"]
    with torch.no_grad():
        probs = class_probabilities(OverlapTileInferer()(x[None], net)[0]).numpy()  # (2, Z, Y, X), in memory
    t = float(np.median(probs[1]))  # an untrained network: thresholds at its median make many objects
    rules = {"cells": {"method": "watershed", "seed_distance": 1.0, "threshold": 1 - t},
             "blobs": {"method": "components", "channel": 1, "threshold": t, "min_size": 4}}
    out = predict_zarr(net, image, tmp_path / "s.zarr", block_size=48, write=["instances"], instances=rules,
                       scheduler="local", n_workers=2, threads_per_worker=1, instance_halo=32)
    group = zarr.open_group(str(out), mode="r")
    stored = np.asarray(group["probabilities"][...])
    np.testing.assert_allclose(stored, probs[1], atol=1e-5)
    for name, rule in parse_rules(rules).items():
        expected = make_instances(np.stack([1 - stored, stored]), rule)
        assert expected.max() > 10
        assert same_up_to_relabelling(expected, np.asarray(group[f"instances/{name}"][...]))
