#!/usr/bin/env python
"""Speed of the synthetic EM generator (pipeline.synthetic): seconds per image and per stack.

The generator writes the default training data of every quickstart run, so it must stay cheap
next to training (an earlier unit test asserted < 0.5 s per 256 x 256 image; wall-clock limits
belong here, not in the test suite). Each size is generated ``--repeats`` times after one
warm-up call; the table gives the median and the range.

Usage::

    python scripts/benchmark_synthetic.py                      # 256^2, 512^2 images; an 8 x 256^2 stack
    python scripts/benchmark_synthetic.py --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_model  # noqa: E402

from pipeline.synthetic import make_image, make_stack  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    fn(0)  # warm-up
    out = []
    for seed in range(1, repeats + 1):
        start = time.perf_counter()
        fn(seed)
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cases = [
        ("image 256 x 256", lambda s: make_image((256, 256), seed=s)),
        ("image 512 x 512", lambda s: make_image((512, 512), seed=s)),
        ("stack 8 x 256 x 256", lambda s: make_stack((8, 256, 256), seed=s)),
    ]
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, {args.repeats} repeats")
    print("| what | median s | min s | max s |")
    print("| --- | --- | --- | --- |")
    for name, fn in cases:
        t = timed(fn, args.repeats)
        print(f"| {name} | {statistics.median(t):.3f} | {min(t):.3f} | {max(t):.3f} |")


if __name__ == "__main__":
    main()
