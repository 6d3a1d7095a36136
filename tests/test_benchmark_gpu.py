"""scripts/benchmark_gpu.py: its FLOP accounting is exact, and it runs end to end on CPU (bf16 autocast)."""

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark_gpu  # noqa: E402

from pipeline.networks import UNet  # noqa: E402


def paper_figure1_flops() -> int:
    """Conv FLOPs of one 572x572 forward pass, layer by layer from Fig. 1 of the paper."""
    convs = [  # (C_in, C_out, kernel, output side)
        (1, 64, 3, 570), (64, 64, 3, 568), (64, 128, 3, 282), (128, 128, 3, 280),
        (128, 256, 3, 138), (256, 256, 3, 136), (256, 512, 3, 66), (512, 512, 3, 64),
        (512, 1024, 3, 30), (1024, 1024, 3, 28),
        (1024, 512, 2, 28), (1024, 512, 3, 54), (512, 512, 3, 52),  # up-conv 2x2: 28 -> 56
        (512, 256, 2, 52), (512, 256, 3, 102), (256, 256, 3, 100),
        (256, 128, 2, 100), (256, 128, 3, 198), (128, 128, 3, 196),
        (128, 64, 2, 196), (128, 64, 3, 390), (64, 64, 3, 388),
        (64, 2, 1, 388),
    ]
    # a 2x2 stride-2 up-convolution costs 2 * C_in * C_out per input pixel and kernel tap
    return sum(2 * k * k * ci * co * side * side for ci, co, k, side in convs)


def test_forward_flops_of_the_paper_network_match_figure_1():
    with torch.device("meta"):
        net = UNet(features=(64, 128, 256, 512, 1024), padding="valid", dropout=0.0)
    flops = benchmark_gpu.forward_flops(net, (1, 1, 572, 572), torch.device("meta"))
    assert flops == paper_figure1_flops()
    assert 250e9 < flops < 350e9  # "about 300 GFLOP per 572x572 tile forward" (issue 7)


def test_runs_on_cpu_with_bf16_autocast_and_counts_every_tile(tmp_path):
    features = [4, 8, 16, 32, 64]
    argv = ["--device", "cpu", "--dtype", "bf16", "--features", *map(str, features), "--tile", "188",
            "--batch", "2", "--image", "400", "--infer-tile", "196", "--infer-batch", "4", "--iterations", "2",
            "--warmup", "1", "--repeats", "1", "--matmul-size", "256", "--matmul-repeats", "2",
            "--json", str(tmp_path / "out.json")]
    result = benchmark_gpu.main(argv)
    rows = {r["part"]: r for r in result["rows"]}
    assert list(rows) == ["matmul", "train", "infer"]
    assert rows["matmul"]["flops"] == 2 * 256**3
    net = UNet(features=features, padding="valid", dropout=0.0)
    # training: 3 forward passes' worth per iteration, on the batch of 2 tiles of 188^2
    assert rows["train"]["flops"] == 3 * benchmark_gpu.forward_flops(net, (2, 1, 188, 188), torch.device("cpu"))
    # inference: 400 px in 196 px output tiles is 3 x 3 tiles, each 196 + 2 * 92 = 380 px in
    assert net.geometry.margin == 92
    assert rows["infer"]["flops"] == 9 * benchmark_gpu.forward_flops(net, (1, 1, 380, 380), torch.device("cpu"))
    assert "3 network call(s)" in rows["infer"]["detail"]  # batches of 4, 4 and 1 tiles
    for part in ("train", "infer"):
        r = rows[part]
        assert r["fraction"] == pytest.approx(r["flops_per_s"] / rows["matmul"]["flops_per_s"])
        assert math.isfinite(r["seconds"]) and r["seconds"] > 0
    assert rows["infer"]["megapixels_per_s"] == pytest.approx(400**2 / rows["infer"]["seconds"] / 1e6)
    assert (tmp_path / "out.json").stat().st_size > 0


def test_an_invalid_tile_is_refused_with_the_nearest_valid_sizes():
    with pytest.raises(ValueError, match="572"):
        benchmark_gpu.parse_args(["--tile", "570"])


def test_paired_reference_brackets_every_timed_unit(capsys):
    """--paired: one matmul rate per timed unit; the fraction is the median of unit rate / that rate."""
    argv = ["--device", "cpu", "--dtype", "fp32", "--features", "4", "8", "16", "32", "64", "--tile", "188",
            "--image", "300", "--infer-tile", "196", "--iterations", "3", "--warmup", "1", "--repeats", "2",
            "--matmul-size", "128", "--matmul-repeats", "2", "--paired", "0.05"]
    rows = {r["part"]: r for r in benchmark_gpu.main(argv)["rows"]}
    for part, units in (("train", 3), ("infer", 2)):
        r = rows[part]
        assert len(r["paired_matmul"]) == len(r["paired_fractions"]) == units
        assert all(m > 0 for m in r["paired_matmul"])
        expected = [r["flops"] / t / m for t, m in zip(r["paired_seconds"], r["paired_matmul"])]
        assert r["paired_fractions"] == pytest.approx(expected)
        assert r["fraction"] == pytest.approx(statistics.median(expected))
        assert r["seconds"] == pytest.approx(statistics.median(r["paired_seconds"]))
    out = capsys.readouterr().out
    assert ">= 0.9 (CPU fp32)" in out and "(bf16 GPU: >= 0.4)" in out and "units " in out
