"""Time of the GRBG debayer of one full Seestar frame (1080 x 1920), the per-frame cost of loading.

Run: ``.venv/bin/python benchmarks/bench_debayer.py [--repeats N]``. Prints the best and the median
of N runs of :func:`zemosaic_fits.debayer_bilinear` (the tests check what it computes, not how fast).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import zemosaic_fits as zf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    raw = np.random.default_rng(3).integers(0, 65535, size=(1080, 1920)).astype(np.float32)
    zf.debayer_bilinear(raw, "GRBG")  # first call pays for page faults and imports
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        zf.debayer_bilinear(raw, "GRBG")
        times.append(time.perf_counter() - t0)
    print(f"debayer_bilinear GRBG 1080x1920: best {min(times) * 1000:.1f} ms, "
          f"median {statistics.median(times) * 1000:.1f} ms over {args.repeats} runs")


if __name__ == "__main__":
    main()
