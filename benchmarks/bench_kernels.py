"""Hand-written kernels against the library routine each replaces, at the pipeline's real sizes.

One line per kernel: its time, the library's, the ratio (library / ours: > 1 means ours is
faster) and whether the two agree. A kernel stays in the code only where the ratio is >= 2 on
a path that runs per frame, per block or per tile (issue 24); see benchmarks/README.md.

    .venv/bin/python benchmarks/bench_kernels.py [--repeat K]

Sizes: a Seestar frame is 1080 x 1920 RGB float32; a stacking block is what
``zemosaic_align_stack.rows_for_budget`` gives for ``CPU_BLOCK_BYTES``; a preview is 2048 px on
its long side. Single-threaded timings (best of K).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import zemosaic_align_stack as stk  # noqa: E402
import zemosaic_utils as zu  # noqa: E402

H, W, C = 1080, 1920, 3
ROWS = []


def best(fn, repeat):
    out, times = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def line(name, where, ours, lib, repeat, agree):
    t_ours, r_ours = best(ours, repeat)
    t_lib, r_lib = best(lib, repeat)
    ok = agree(r_ours, r_lib)
    ROWS.append((name, where, t_ours, t_lib, t_lib / t_ours if t_ours else float("inf"), ok))
    print(f"{name:<38} {where:<9} {t_ours * 1e3:10.2f} {t_lib * 1e3:10.2f} {t_lib / t_ours:7.2f}x  {ok}",
          flush=True)


def equal(a, b):
    return bool(np.array_equal(a, b, equal_nan=True))


def close(rtol):
    return lambda a, b: bool(np.allclose(a, b, rtol=rtol, atol=0, equal_nan=True))


def block(rng, n, nan_margin=True):
    rows = stk.rows_for_budget(n, W, C, stk.CPU_BLOCK_BYTES)
    b = rng.normal(100.0, 5.0, (n, rows, W, C)).astype(np.float32)
    if nan_margin:  # dithered frames: NaN margins of a few columns
        for i in range(n):
            b[i, :, : int(rng.integers(0, 40))] = np.nan
    return b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    k = ap.parse_args().repeat
    rng = np.random.default_rng(0)
    print(f"{'routine':<38} {'runs':<9} {'ours ms':>10} {'library ms':>10} {'ratio':>8}  agree")

    # Frame-axis sort of a stacking block: the sorting network (<= 16 frames) vs np.sort.
    limit, stk._SORT_NETWORK_MAX = stk._SORT_NETWORK_MAX, 64  # time the network beyond its limit too
    for n in (3, 6, 8, 10, 16):
        b = block(rng, n)
        line(f"sort_frames N={n} {b.shape[1]}x{W}x{C}", "per block", lambda: stk.sort_frames(b),
             lambda: np.sort(b, axis=0), k, equal)
    stk._SORT_NETWORK_MAX = limit
    # Quantiles from the sort vs nanquantile (CuPy has no nanquantile).
    b = block(rng, 20)
    srt, n_valid = stk._sort_and_count(b, np)
    line(f"sorted_quantile N=20 {b.shape[1]} rows", "per block",
         lambda: stk.sorted_quantile(srt, n_valid, 0.5, np),
         lambda: np.nanquantile(b, 0.5, axis=0), 1, close(1e-6))

    # Window max/min of the consensus signal map: 7x7 on a full frame, one channel.
    from scipy.ndimage import maximum_filter, minimum_filter
    plane = rng.normal(0, 1, (H, W)).astype(np.float32)
    size = 2 * stk.SIGNAL_RADIUS_PX + 1
    line(f"_window_extreme max {size}x{size} {H}x{W}", "per group",
         lambda: stk._window_extreme(plane, size, np.maximum), lambda: maximum_filter(plane, size), k, equal)
    line(f"_window_extreme min {size}x{size} {H}x{W}", "per group",
         lambda: stk._window_extreme(plane, size, np.minimum), lambda: minimum_filter(plane, size), k, equal)

    # Clipped statistics of 120 000 values (sky and noise of a frame) vs astropy.
    from astropy.stats import sigma_clipped_stats as astropy_scs
    vals = rng.normal(100, 5, 120_000)
    vals[rng.integers(0, vals.size, 2000)] += rng.uniform(50, 5000, 2000)
    line("sigma_clipped_stats 120k (np.median)", "per frame", lambda: zu.sigma_clipped_stats(vals),
         lambda: astropy_scs(vals, sigma=3.0, maxiters=5, stdfunc="mad_std")[1:],
         k, lambda a, b: bool(np.allclose(a, b, rtol=1e-3)))

    # Median of star annuli (photometry) vs np.median.
    ann = rng.normal(100, 5, (300, 3, 980)).astype(np.float32)  # star annuli (photometry)
    line("median_last_axis 300x3x980", "per frame", lambda: zu.median_last_axis(ann),
         lambda: np.median(ann, axis=-1), k, equal)
    ring = rng.normal(100, 5, (200_000, 8)).astype(np.float32)  # hot-pixel rings (zemosaic_fits)
    line("median_last_axis 200000x8", "per frame", lambda: zu.median_last_axis(ring),
         lambda: np.median(ring, axis=-1), k, equal)

    # nonzero of a sparse stacking mask; channel fold vs a reduction over the channel axis.
    b = block(rng, 20, nan_margin=False)
    mask = np.abs(b - 100) > 15
    line("nonzero_indices sparse block", "per block", lambda: zu.nonzero_indices(mask),
         lambda: np.nonzero(mask), k, lambda a, c: all(np.array_equal(x, y) for x, y in zip(a, c)))
    valid = np.isfinite(b)
    import operator
    line("over_channels(and) block", "per block", lambda: zu.over_channels(operator.and_, valid),
         lambda: np.all(valid, axis=-1), k, equal)

    # NaN-aware block mean (preview, tiles) vs reshape + nanmean of the padded image.
    img = rng.normal(0, 1, (2 * H, 3 * W // 2, C)).astype(np.float32)
    img[:100] = np.nan
    f = 4

    def lib_block_mean():
        hh, ww = -(-img.shape[0] // f) * f, -(-img.shape[1] // f) * f
        pad = np.full((hh, ww, C), np.nan, np.float32)
        pad[:img.shape[0], :img.shape[1]] = img
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(pad.reshape(hh // f, f, ww // f, f, C), axis=(1, 3)).astype(np.float32)

    line(f"block_mean x{f} {img.shape[0]}x{img.shape[1]}", "per tile", lambda: zu.block_mean(img, f),
         lib_block_mean, k, lambda a, b: bool(np.allclose(a, b, rtol=0, atol=1e-6, equal_nan=True)))

    # Bilinear gather of a full frame (warp) vs map_coordinates(order=1), finite frame.
    from scipy.ndimage import map_coordinates
    frame = rng.normal(100, 5, (H, W, C)).astype(np.float32)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    ys, xs = yy * 0.9998 + 3.3, xx * 1.0001 - 2.7
    planes = zu.channel_planes(frame, np)

    def ours_gather():
        return zu.bilinear_gather(planes, (H, W), ys, xs, np, nan_outside=True)

    def lib_gather():
        return [map_coordinates(frame[..., c], [ys, xs], order=1, mode="constant", cval=np.nan, prefilter=False)
                for c in range(C)]

    def agree_gather(a, b):
        b = np.stack([p.ravel() for p in b])  # (C, n) as bilinear_gather returns
        return bool(np.allclose(np.asarray(a), b, rtol=1e-5, atol=1e-3, equal_nan=True))

    line(f"bilinear_gather {H}x{W}x{C}", "per frame", ours_gather, lib_gather, k, agree_gather)


if __name__ == "__main__":
    main()
