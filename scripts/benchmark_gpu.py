#!/usr/bin/env python
"""Paper-width U-Net training and inference as fractions of the device's matrix-product rate (issue 7).

One command for a GPU machine (it also runs on CPU, small, as a check of the script itself):

    python scripts/benchmark_gpu.py                        # CUDA if present: bf16, paper widths, 572 tiles
    python scripts/benchmark_gpu.py --dtype fp16 --channels-last --batch 4 --json out.json
    python scripts/benchmark_gpu.py --device cpu --features 8 16 32 64 128 --tile 188 --image 512 \\
        --iterations 2 --warmup 1 --matmul-size 512   # seconds on a CPU

What is measured, in this order, in one process:

- ``matmul``: ``torch.mm`` of two ``--matmul-size`` square matrices in ``--dtype``, best of
  ``--matmul-repeats`` (the reference rate; 2 n^3 FLOPs each).
- ``train``: the paper's iteration on random data: valid U-Net (``--features``, no dropout so that
  the work is fixed), ``--batch`` tiles of ``--tile``^2, the weighted soft-max cross-entropy of
  ``pipeline.losses``, SGD momentum 0.99, under autocast in ``--dtype`` (a ``GradScaler`` for fp16).
  Median seconds per iteration after ``--warmup``. FLOPs per iteration = 3 x the forward conv FLOPs
  (backward computes the input and the weight gradients, each about one forward).
- ``infer``: ``pipeline.inferers.OverlapTileInferer`` (mirror padding, ``--infer-tile`` output
  tiles, batch ``--infer-batch``, autocast in ``--dtype``) on one ``--image``^2 image held in host
  memory, output copied back to the host, as in real use. Median of ``--repeats`` calls. FLOPs are
  the conv FLOPs of the tiles it really computes (context margins included), counted in an extra
  untimed call; megapixels/s count image pixels.

Conv FLOPs are counted by forward hooks (``benchmark_inference.FlopCounter``: ``2 k C_in C_out``
per output element; bias, ReLU, pooling and copies not counted). Targets (issue 7, on a GPU):
training >= 0.4 and inference >= 0.5 of the bf16 matmul rate; on a CPU in fp32, inference of the
paper-width network on large tiles >= 0.9 of the fp32 matmul rate.

``--paired SECONDS`` is for shared machines, whose matmul rate drifts by tens of percent within
seconds: each timed training iteration and inference call is then bracketed by ``torch.mm`` run
back to back for SECONDS before and after it, and its fraction is taken against the mean of those
two rates. The fraction reported is the median over the timed units, with their range.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402
from benchmark_inference import PAPER_FEATURES, FlopCounter  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TARGETS = {"train": 0.4, "infer": 0.5}
CPU_FP32_TARGETS = {"infer": 0.9}  # issue 7 item 3: paper widths, large tiles


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Best FLOP/s of ``torch.mm`` on two ``size`` square matrices."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


class PairedMatmul:
    """Sustained ``torch.mm`` rate right before and after each timed unit (``--paired SECONDS``).

    With ``seconds`` 0 (the default) it measures nothing and ``summary`` adds nothing.
    """

    def __init__(self, args, device: torch.device, dtype: torch.dtype):
        self.device, self.seconds, self.flop = device, args.paired, 2 * args.matmul_size**3
        if self.seconds:
            self.a = torch.randn(args.matmul_size, args.matmul_size, device=device, dtype=dtype)
            self.b = torch.randn(args.matmul_size, args.matmul_size, device=device, dtype=dtype)
        self.rates: list[float] = []  # per unit: mean of the rates before and after it

    def sustained(self) -> float:
        sync(self.device)
        t, k = time.perf_counter(), 0
        while k == 0 or time.perf_counter() - t < self.seconds:
            torch.mm(self.a, self.b)
            sync(self.device)
            k += 1
        return k * self.flop / (time.perf_counter() - t)

    @contextlib.contextmanager
    def around(self, timed: bool = True):
        if not (self.seconds and timed):
            yield
            return
        before = self.sustained()
        yield
        self.rates.append((before + self.sustained()) / 2)

    def summary(self, flops: float, times: list[float]) -> dict:
        if not self.seconds:
            return {}
        fractions = [flops / t / m for t, m in zip(times, self.rates)]
        return dict(fraction=statistics.median(fractions), paired_fractions=fractions, paired_matmul=self.rates,
                    paired_seconds=times)


def make_network(features, device: torch.device, channels_last: bool, compile_: bool):
    from pipeline.networks import UNet

    net = UNet(in_channels=1, out_channels=2, features=features, padding="valid", dropout=0.0).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net, (torch.compile(net) if compile_ else net)


def forward_flops(net, shape, device: torch.device) -> int:
    """Conv FLOPs of one forward pass of ``net`` on a batch of ``shape``."""
    with FlopCounter(net) as fc, torch.inference_mode():
        net(torch.zeros(shape, device=device))
    return fc.flops


def bench_train(args, device: torch.device, dtype: torch.dtype) -> dict:
    from pipeline.losses import make_loss

    net, run_net = make_network(args.features, device, args.channels_last, args.compile)
    shape = (args.batch, 1, args.tile, args.tile)
    out = net.geometry.output_size((args.tile, args.tile))
    gen = torch.Generator(device="cpu").manual_seed(0)
    image = torch.randn(shape, generator=gen).to(device)
    if args.channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    label = torch.randint(0, 2, (args.batch, 1, *out), generator=gen).float()
    weight = 1.0 + 9.0 * torch.rand((args.batch, 1, *out), generator=gen)
    target = torch.cat([label, weight], 1).to(device)
    loss_fn = make_loss("weighted_ce", 2)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.99)
    amp = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    flops = 3 * forward_flops(net, shape, device)
    net.train()
    times, losses, paired = [], [], PairedMatmul(args, device, dtype)
    for i in range(args.warmup + args.iterations):
        timed = i >= args.warmup
        with paired.around(timed):
            sync(device)
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                loss = loss_fn(run_net(image), target)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sync(device)
            if timed:
                times.append(time.perf_counter() - t)
                losses.append(loss.item())
    s = statistics.median(times)
    if not all(math.isfinite(v) for v in losses):
        raise RuntimeError(f"training produced a non-finite loss: {losses}")
    return dict(part="train", seconds=s, flops=flops, flops_per_s=flops / s, iterations_per_s=1 / s,
                megapixels_per_s=args.batch * math.prod(out) / s / 1e6, detail=f"batch {args.batch} x {args.tile}^2",
                **paired.summary(flops, times))


def bench_infer(args, device: torch.device, dtype: torch.dtype) -> dict:
    from pipeline.inferers import OverlapTileInferer

    net, run_net = make_network(args.features, device, args.channels_last, args.compile)
    net.eval()
    image = torch.randn((1, 1, args.image, args.image), generator=torch.Generator().manual_seed(1))
    inferer = OverlapTileInferer(tile_size=args.infer_tile, batch_size=args.infer_batch,
                                 amp=dtype != torch.float32, amp_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
    with FlopCounter(net) as fc:  # the eager network: its hooks see every tile
        out = inferer(image, net)
    if run_net is not net:  # compiled: compile before timing (the eager FLOP pass above is the warm-up otherwise)
        inferer(image, run_net)
    if out.shape != (1, 2, args.image, args.image) or out.device.type != "cpu" or not torch.isfinite(out).all():
        raise RuntimeError(f"unexpected inference output: shape {tuple(out.shape)} on {out.device}")
    times, paired = [], PairedMatmul(args, device, dtype)
    for _ in range(args.repeats):
        with paired.around():
            sync(device)
            t = time.perf_counter()
            inferer(image, run_net)
            sync(device)
            times.append(time.perf_counter() - t)
    s = statistics.median(times)
    tiles = sum(fc.calls.values())
    return dict(part="infer", seconds=s, flops=fc.flops, flops_per_s=fc.flops / s, iterations_per_s=1 / s,
                megapixels_per_s=args.image**2 / s / 1e6,
                detail=f"{args.image}^2 image, {args.infer_tile}^2 output tiles, {tiles} network call(s)",
                **paired.summary(fc.flops, times))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--features", type=int, nargs="+", default=list(PAPER_FEATURES))
    p.add_argument("--tile", type=int, default=572, help="training input tile (a valid input size)")
    p.add_argument("--batch", type=int, default=1, help="training tiles per iteration (paper: 1)")
    p.add_argument("--image", type=int, default=4096, help="side of the inference image")
    p.add_argument("--infer-tile", type=int, default=1028, help="inference output tile")
    p.add_argument("--infer-batch", type=int, default=4)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="timed inference calls")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--matmul-repeats", type=int, default=10)
    p.add_argument("--paired", type=float, default=0.0, metavar="SECONDS",
                   help="bracket each timed unit by SECONDS of sustained matmul and take fractions against those (0: off)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--parts", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from pipeline.networks import UNet

    with torch.device("meta"):
        geometry = UNet(features=args.features, padding="valid", dropout=0.0).geometry
    geometry.check_input_size(args.tile)  # a clear error for a tile the valid network cannot take
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model()}, {torch.get_num_threads()} threads"
    mm = matmul_rate(device, dtype, args.matmul_size, args.matmul_repeats)
    rows = [dict(part="matmul", seconds=2 * args.matmul_size**3 / mm, flops=2 * args.matmul_size**3, flops_per_s=mm,
                 detail=f"{args.matmul_size}^3 {args.dtype}")]
    for part in args.parts:
        rows.append((bench_train if part == "train" else bench_infer)(args, device, dtype))
        rows[-1].setdefault("fraction", rows[-1]["flops_per_s"] / mm)  # paired: already the median of its units
        rows[-1]["target"] = TARGETS[part]
    print(f"\n{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {name}; torch {torch.__version__}; "
          f"python {platform.python_version()}; dtype {args.dtype}; features {args.features}; "
          f"channels_last={args.channels_last}; compile={args.compile}; "
          + (f"x matmul: median over timed units, each against {args.paired:g} s of matmul before and after it"
             if args.paired else "x matmul: against the best matmul above"))
    head = ["part", "what", "s", "TFLOP", "TFLOP/s", "x matmul", "target", "it/s", "MP/s"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        frac = r.get("fraction")
        cpu_target = CPU_FP32_TARGETS.get(r["part"]) if device.type == "cpu" and dtype == torch.float32 else None
        if frac is None:
            verdict = "-"
        elif cpu_target is not None:
            verdict = f">= {cpu_target} (CPU fp32) {'met' if frac >= cpu_target else 'not met'}"
        elif device.type != "cuda" or dtype != torch.bfloat16:  # the targets are for a GPU in bf16
            verdict = f"(bf16 GPU: >= {r['target']})"
        else:
            verdict = f">= {r['target']} {'met' if frac >= r['target'] else 'not met'}"
        if "paired_fractions" in r:
            verdict += f"; units {min(r['paired_fractions']):.2f}-{max(r['paired_fractions']):.2f}"
        print(f"| {r['part']} | {r['detail']} | {r['seconds']:.4f} | {r['flops'] / 1e12:.4f} | {r['flops_per_s'] / 1e12:.3f} | "
              f"{'-' if frac is None else f'{frac:.2f}'} | {verdict} | {r.get('iterations_per_s', 0):.2f} | "
              f"{r.get('megapixels_per_s', 0):.2f} |")
    result = dict(device=name, torch=torch.__version__, args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  rows=rows)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
