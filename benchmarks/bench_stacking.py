"""Stacking speed, peak memory and agreement: ZeMosaic rejection beside astropy and Siril.

Run: ``.venv/bin/python benchmarks/bench_stacking.py [--quick]``.

Synthetic aligned Seestar frames (1920x1080 RGB float32; ``--quick``: 480x270) with NaN footprint
borders of varying width (dither shift + field rotation, as alignment leaves them), a satellite
trail in one frame and hot pixels in every frame, are stacked with N = 20 and 50 frames
(``--quick``: 10 and 20) by:

* ZeMosaic ``stack_in_chunks`` with each rejection (winsorized_sigma_clip, kappa_sigma, none;
  combine mean), on every core (chunks in threads, as the pipeline stacks a lone tile), the GPU
  code path (``stack_in_chunks_gpu``) run with NumPy standing in for
  CuPy and, when a CUDA GPU is usable, with CuPy;
* astropy ``sigma_clip(axis=0, sigma=3, maxiters=5, masked=True)`` + mean on the same stack;
* Siril (``siril-cli``, when installed): ``stack frame_ rej w 3 3 -nonorm`` on the same frames
  written as FITS (NaN written as 0: Siril 1.0 has no "no data" value and turns NaN into garbage).

Two fidelity tables follow (``--fidelity`` prints only them): the residual a satellite trail in
one of N = 3 and 5 frames leaves after each rejection (in units of the single-frame noise sigma),
and the precision of the ``linear_fit`` gains against the synthetic truth (``zemosaic_synth``
panels whose frames differ by a grey transparency of 0.84-1.0 and a drifting sky: sky-dominated
10 s subs; full-size frames, ``--quick``: 270x480): rms and largest ``|gain / true gain - 1|`` per
channel and of the gains' R/G and B/G (a colour cast).

Every method runs in a fresh child process; the table gives the wall time of the stacking call
(Siril: its own reported stack time, which includes reading the FITS files), the peak RSS of the
process (the Python rows hold the whole stack in memory: see "stack MB"), the time ratio to ZeMosaic
winsorized, and the max absolute difference to the ZeMosaic result named in "ref" on pixels that
every frame covers and on the partially covered border, plus the mean leftover of the outliers
(|result - truth| on trail and hot pixels; a plain mean leaves about outlier/N).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from datetime import date

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from zemosaic_utils import usable_cores  # noqa: E402
from _measure import (fmt, load_warning, numpy_as_gpu, print_table, report_result, rss_now_bytes, run_child,  # noqa: E402
                      run_python_worker, siril_env)

FULL_SHAPE = (1920, 1080)  # numpy (rows, cols) of a Seestar S50 frame (portrait)
QUICK_SHAPE = (480, 270)
FULL_NS = (20, 50)
QUICK_NS = (10, 20)
TARGET_PEAK_BYTES = 2.5e9  # ZeMosaic winsorized, N = 50 full-size frames
SKY = (0.10, 0.12, 0.09)  # per-channel sky level (Siril expects float data in [0, 1])
NOISE = 0.01
TRAIL_FRAME = 1  # the reference (frame 0) is clean, as a pipeline reference usually is
NO_OUTLIER = np.iinfo(np.int16).max

# method key -> (label, ZeMosaic reference it is compared with)
METHODS = {
    "zm-winsorized": ("ZeMosaic winsorized_sigma_clip", None),
    "zm-kappa": ("ZeMosaic kappa_sigma", "zm-winsorized"),
    "zm-none": ("ZeMosaic none (mean)", "zm-winsorized"),
    "zm-gpupath-numpy": ("ZeMosaic GPU code path, xp=numpy", "zm-winsorized"),
    "zm-cupy": ("ZeMosaic GPU (CuPy)", "zm-winsorized"),
    "astropy": ("astropy sigma_clip + mean", "zm-kappa"),
    "siril": ("Siril winsorized (rej w 3 3)", "zm-winsorized"),
}
ZM_REJECTION = {"zm-winsorized": "winsorized_sigma_clip", "zm-kappa": "kappa_sigma", "zm-none": "none",
                "zm-gpupath-numpy": "winsorized_sigma_clip", "zm-cupy": "winsorized_sigma_clip"}


# --------------------------------------------------------------------------------------------------
# Synthetic aligned frames
# --------------------------------------------------------------------------------------------------


def _star_field(shape, rng, n_stars):
    """Return the noiseless truth ``(H, W, 3)``: sky + Gaussian stars of varied colour."""
    h, w = shape
    truth = np.empty((h, w, 3), np.float32)
    truth[:] = np.asarray(SKY, np.float32)
    sigma = 1.8
    half = int(math.ceil(4 * sigma))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    for _ in range(n_stars):
        y, x = rng.uniform(half, h - half - 1), rng.uniform(half, w - half - 1)
        amp = math.exp(rng.uniform(math.log(0.01), math.log(0.6)))
        colour = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.3, 0.3, 3)
        iy, ix = int(y), int(x)
        psf = np.exp(-((yy - (y - iy)) ** 2 + (xx - (x - ix)) ** 2) / (2 * sigma**2))
        truth[iy - half:iy + half + 1, ix - half:ix + half + 1] += (amp * psf[..., None] * colour).astype(np.float32)
    return truth


def _footprint(shape, shift_yx, rotation_deg):
    """Return the valid mask of a frame resampled onto the reference after a dither and a rotation."""
    h, w = shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    th = math.radians(rotation_deg)
    c, s = math.cos(th), math.sin(th)
    y = np.arange(h, dtype=np.float32)[:, None] - cy
    x = np.arange(w, dtype=np.float32)[None, :] - cx
    xs = c * x + s * y + cx - shift_yx[1]
    ys = -s * x + c * y + cy - shift_yx[0]
    return (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)


def _trail(shape, rng):
    """Return a satellite trail image ``(H, W)`` crossing the whole frame."""
    h, w = shape
    y0, y1 = rng.uniform(0.2 * h, 0.8 * h, 2)
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    slope = (y1 - y0) / (w - 1)
    dist = np.abs(y - (y0 + slope * x)) / math.sqrt(1 + slope * slope)
    return (0.25 * np.exp(-0.5 * (dist / 1.2) ** 2)).astype(np.float32)


def generate_stack(path_dir, n, shape, seed=7):
    """Write ``stack.npy`` ``(N, H, W, 3)``, ``truth.npy`` and ``outliers.npy`` into ``path_dir``.

    ``outliers.npy`` (int16 ``(H, W, 3)``) holds, per pixel and channel, the first frame with a
    trail or hot pixel there (``NO_OUTLIER`` for none), so any prefix of N frames knows its outliers.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    scale = w / FULL_SHAPE[1]
    truth = _star_field(shape, rng, int(300 * scale * scale) + 20)
    outliers = np.full((h, w, 3), NO_OUTLIER, np.int16)
    trail = _trail(shape, rng)
    stack = np.lib.format.open_memmap(os.path.join(path_dir, "stack.npy"), "w+", np.float32, (n, h, w, 3))
    n_hot = max(10, int(h * w / 15000))
    for i in range(n):
        frame = rng.standard_normal((h, w, 3), dtype=np.float32)
        frame *= NOISE
        frame += truth
        ys, xs, cs = rng.integers(0, h, n_hot), rng.integers(0, w, n_hot), rng.integers(0, 3, n_hot)
        frame[ys, xs, cs] = rng.uniform(0.8, 1.0, n_hot).astype(np.float32)
        outliers[ys, xs, cs] = np.minimum(outliers[ys, xs, cs], i)
        if i == TRAIL_FRAME:
            frame += trail[..., None]
            outliers[trail > 3 * NOISE] = np.minimum(outliers[trail > 3 * NOISE], i)
        if i > 0:  # the reference frame covers its own grid entirely
            shift = rng.uniform(-40, 40, 2) * scale
            valid = _footprint(shape, shift, rng.uniform(-2.0, 2.0))
            frame[~valid] = np.nan
        stack[i] = frame
    stack.flush()
    del stack
    np.save(os.path.join(path_dir, "truth.npy"), truth)
    np.save(os.path.join(path_dir, "outliers.npy"), outliers)


def load_frames(path, n):
    """Return the first ``n`` frames of an ``.npy`` stack, read into memory (no memory map).

    Reading instead of mapping keeps the file's pages out of the child's RSS.
    """
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read_header(fh)
        count = n * int(np.prod(shape[1:]))
        data = np.fromfile(fh, dtype=dtype, count=count)
    return data.reshape((n,) + tuple(shape[1:]))


# --------------------------------------------------------------------------------------------------
# Workers (run in child processes)
# --------------------------------------------------------------------------------------------------


def _stack_zemosaic(method, stack):
    """Return the ZeMosaic stack of ``stack`` with the rejection of ``method`` (combine mean)."""
    import zemosaic_align_stack as zas

    params = zas.StackParams(ZM_REJECTION[method], 3.0, 3.0, (0.05, 0.05), "mean", 5)
    if method == "zm-gpupath-numpy":
        from zemosaic_align_stack_gpu import stack_in_chunks_gpu

        numpy_as_gpu()
        return stack_in_chunks_gpu(stack, None, None, None, params)[0]
    if method == "zm-cupy":
        from zemosaic_align_stack_gpu import stack_in_chunks_gpu

        return stack_in_chunks_gpu(stack, None, None, None, params)[0]
    # Every core, as the pipeline stacks a tile that has the machine to itself; Siril does too.
    return zas.stack_in_chunks(stack, None, None, None, params, xp=np, threads=usable_cores())[0]


def _stack_astropy(stack):
    """Return astropy's iterative sigma clip (median centre, std, 3 sigma, 5 rounds) + mean."""
    from astropy.stats import sigma_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Input data contains invalid values (NaNs)": intended
        clipped = sigma_clip(stack, sigma=3, maxiters=5, axis=0, masked=True)
        return np.ma.filled(clipped.mean(axis=0).astype(np.float32), np.nan)


def worker(method, data_dir, n, out_path, repeat=1):
    """Load ``n`` frames, stack them with ``method`` (timed, best of ``repeat``), save the image."""
    stack = load_frames(os.path.join(data_dir, "stack.npy"), n)
    if method == "astropy":
        import astropy.stats  # noqa: F401  (import time is not stacking time)
    else:
        import zemosaic_align_stack  # noqa: F401
    rss_loaded = rss_now_bytes()
    wall = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        image = _stack_astropy(stack) if method == "astropy" else _stack_zemosaic(method, stack)
        wall = min(wall, time.perf_counter() - t0)
    np.save(out_path, np.asarray(image, np.float32))
    report_result(wall_s=wall, rss_loaded_bytes=rss_loaded)


# --------------------------------------------------------------------------------------------------
# Siril
# --------------------------------------------------------------------------------------------------


def write_siril_frames(data_dir, n_max, ns):
    """Write the frames as Siril wants them (``frame_00001.fit``..., float32 ``(3, H, W)``).

    One folder per N holds links to the first N files, so each is a sequence of its own.
    NaN is written as 0, Siril's "no data" after registration.
    """
    from astropy.io import fits

    all_dir = os.path.join(data_dir, "siril_all")
    os.makedirs(all_dir, exist_ok=True)
    stack = np.load(os.path.join(data_dir, "stack.npy"), mmap_mode="r")
    for i in range(n_max):
        chw = np.nan_to_num(np.transpose(stack[i], (2, 0, 1)), nan=0.0).astype(np.float32)
        fits.writeto(os.path.join(all_dir, f"frame_{i + 1:05d}.fit"), chw, overwrite=True)
    dirs = {}
    for n in ns:
        d = os.path.join(data_dir, f"siril_{n}")
        os.makedirs(d, exist_ok=True)
        for i in range(n):
            name = f"frame_{i + 1:05d}.fit"
            os.symlink(os.path.join(all_dir, name), os.path.join(d, name))
        dirs[n] = d
    return dirs


def _siril_seconds(log: str) -> float | None:
    """Return the stack command's own 'Execution time' from a Siril log, or None."""
    m = re.search(r"log: Execution time: (?:(\d+) min )?([\d.]+) (ms|s)", log)
    if not m:
        return None
    minutes = float(m.group(1) or 0)
    value = float(m.group(2)) / (1000.0 if m.group(3) == "ms" else 1.0)
    return 60 * minutes + value


def run_siril(exe, seq_dir):
    """Stack a folder's sequence with Siril's winsorized rejection.

    Returns ``(image (H, W, 3) or None, measured dict, note)``. The script holds only ``requires``
    and ``stack`` (the frames already form a sequence by their names), so the process is the
    stack command plus Siril's start-up; the wall column uses Siril's own stack time.
    """
    from astropy.io import fits

    script = os.path.join(seq_dir, "stack.ssf")
    with open(script, "w") as fh:
        fh.write("requires 1.0.0\nstack frame_ rej w 3 3 -nonorm -out=result\n")
    run = run_child([exe, "-d", seq_dir, "-s", script], env=siril_env(seq_dir))
    result = os.path.join(seq_dir, "result.fit")
    if not run.ok or not os.path.exists(result):
        return None, None, f"siril-cli failed (exit {run.returncode}): {run.tail(5)}"
    own = _siril_seconds(run.stdout + run.stderr)
    image = np.transpose(fits.getdata(result).astype(np.float32), (1, 2, 0))
    measured = {"wall_s": own if own is not None else run.wall_s, "process_wall_s": run.wall_s,
                "peak_rss_bytes": run.peak_rss_bytes, "rss_loaded_bytes": None}
    return image, measured, None


# --------------------------------------------------------------------------------------------------
# Fidelity: rejection with few frames, gain precision against the synthetic truth
# --------------------------------------------------------------------------------------------------

TRAIL_SIGMA = 0.01  # noise of the trail frames, as NOISE
FIDELITY_NS = (3, 5)


def trail_residuals(ns=FIDELITY_NS, shape=(200, 300), seed=11):
    """Return table rows: what a trail in one of N frames leaves after each rejection.

    N frames of sky + Gaussian noise, the trail of :func:`_trail` (25 sigma at its core) in frame
    1; columns: mean and largest ``|result - truth|`` over the trail's pixels (trail > 0.5 sigma)
    and at its core (trail > 10 sigma), in noise sigmas.
    """
    import zemosaic_align_stack as zas

    rng = np.random.default_rng(seed)
    trail = _trail(shape, rng)
    rows = []
    for n in ns:
        stack = (np.asarray(SKY, np.float32) + TRAIL_SIGMA * rng.standard_normal((n,) + shape + (3,),
                                                                                 dtype=np.float32))
        stack[1] += trail[..., None]
        for rejection in ("winsorized_sigma_clip", "kappa_sigma", "none"):
            params = zas.StackParams(rejection, 3.0, 3.0, (0.05, 0.05), "mean", 5)
            image = zas.stack_in_chunks(stack, None, None, None, params)[0]
            resid = np.abs(image - np.asarray(SKY, np.float32)) / TRAIL_SIGMA
            on, core = trail > 0.5 * TRAIL_SIGMA, trail > 10 * TRAIL_SIGMA
            rows.append([rejection, n, fmt(float(resid[on].mean()), ".2f"), fmt(float(resid[on].max()), ".2f"),
                         fmt(float(resid[core].mean()), ".2f"), fmt(float(resid[core].max()), ".2f")])
    return rows


def _aligned_panel(out_dir, seed, size, frames):
    """Return ``(stack, true gains)`` of a synthetic panel aligned onto its first frame (WCS)."""
    import photometry_truth

    return photometry_truth.aligned_panel(out_dir, frames, seed, size)


def gain_precision(size="full", panels=2, frames=6):
    """Return ``(row, seconds)``: the ``linear_fit`` gains against the truth over a few panels.

    Row cells: rms and largest ``|gain / true - 1|`` per channel (R, G, B), rms of the gains'
    R/G and B/G minus 1 over all frames but each panel's reference; seconds spent fitting.
    """
    import zemosaic_align_stack as zas

    errors, fit_s = [], 0.0
    for seed in range(panels):
        with tempfile.TemporaryDirectory(prefix="zemosaic_bench_gain_") as tmp:
            stack, truth = _aligned_panel(tmp, seed, size, frames)
        t0 = time.perf_counter()
        gains, _ = zas.normalization_coefficients(stack, 0, "linear_fit")
        fit_s += time.perf_counter() - t0
        errors.append(gains[1:] / truth[1:, None])
    rel = np.concatenate(errors)
    rms = np.sqrt(np.mean((rel - 1) ** 2, axis=0))
    worst = np.max(np.abs(rel - 1), axis=0)
    colour = np.sqrt(np.mean((rel[:, [0, 2]] / rel[:, 1:2] - 1) ** 2, axis=0))
    pct = lambda v: fmt(100 * float(v), ".2f")  # noqa: E731
    return [size, f"{panels}x{frames}", *map(pct, rms), *map(pct, worst), *map(pct, colour)], fit_s


def print_fidelity(quick: bool):
    """Print the trail-residual and gain-precision tables."""
    print_table(["rejection", "N", "trail mean", "trail max", "core mean", "core max"], trail_residuals(),
                title="Trail in one of N frames: |result - truth| in noise sigmas (trail > 0.5 sigma; "
                      "core > 10 sigma)")
    print()
    row, seconds = gain_precision("small" if quick else "full", 4 if quick else 2, 8 if quick else 6)
    print_table(["frames", "panels", "rms R %", "rms G %", "rms B %", "max R %", "max G %", "max B %",
                 "R/G rms %", "B/G rms %"], [row],
                title=f"linear_fit gains vs truth (transparency 0.84-1.0, drifting sky; fits took {seconds:.1f} s)")


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _compare(image, ref, full_mask):
    """Return max |image - ref| on fully covered and on partially covered pixels (finite in both)."""
    both = np.isfinite(image) & np.isfinite(ref)
    diff = np.abs(image - ref)
    inner = both & full_mask[..., None]
    border = both & ~full_mask[..., None]
    return (float(diff[inner].max()) if inner.any() else None,
            float(diff[border].max()) if border.any() else None)


def _gpu_state():
    """Return ``(usable, reason)`` for a CUDA GPU, as ZeMosaic sees it."""
    import zemosaic_utils

    return zemosaic_utils.gpu_available(), zemosaic_utils.gpu_unavailable_reason()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="480x270 frames, N = 10 and 20")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per method, the best is kept (default: 3 with --quick, else 2)")
    parser.add_argument("--fidelity", action="store_true", help="only the trail and gain-precision tables")
    parser.add_argument("--worker", nargs=4, metavar=("METHOD", "DATA", "N", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        method, data_dir, n, out = args.worker
        worker(method, data_dir, int(n), out, args.repeat or 1)
        return 0
    if args.fidelity:
        print_fidelity(args.quick)
        return 0

    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    ns = QUICK_NS if args.quick else FULL_NS
    repeat = args.repeat or (3 if args.quick else 2)
    gpu_ok, gpu_reason = _gpu_state()
    siril = shutil.which("siril-cli")
    print(f"bench_stacking: N = {ns} frames of {shape[0]}x{shape[1]} RGB float32, {os.cpu_count()} CPU cores, "
          f"best of {repeat} timed run(s), load average {os.getloadavg()[0]:.2f}, {date.today().isoformat()}")
    print(f"  CuPy GPU: {'available' if gpu_ok else 'skipped (' + str(gpu_reason) + ')'}")
    print(f"  Siril: {siril or 'not installed (skipped)'}")
    warning = load_warning()
    if warning:
        print(f"  {warning}")

    methods = ["zm-winsorized", "zm-kappa", "zm-none", "zm-gpupath-numpy"]
    methods += ["zm-cupy"] if gpu_ok else []
    methods += ["astropy"]
    rows = []
    notes = []
    with tempfile.TemporaryDirectory(prefix="zemosaic_bench_stack_") as tmp:
        t0 = time.perf_counter()
        generate_stack(tmp, max(ns), shape)
        print(f"  generated {max(ns)} frames in {time.perf_counter() - t0:.1f} s")
        truth = np.load(os.path.join(tmp, "truth.npy"))
        first_outlier = np.load(os.path.join(tmp, "outliers.npy"))
        siril_dirs = {}
        if siril:
            siril_dirs = write_siril_frames(tmp, max(ns), ns)
        for n in ns:
            frames = np.load(os.path.join(tmp, "stack.npy"), mmap_mode="r")[:n]
            full_mask = np.all(np.isfinite(frames[..., 0]), axis=0)
            del frames
            stack_mb = n * shape[0] * shape[1] * 3 * 4 / 2**20
            outlier_mask = first_outlier < n
            images, measured = {}, {}
            for method in methods:
                out = os.path.join(tmp, f"{method}_{n}.npy")
                run = run_python_worker(__file__, ["--repeat", repeat, "--worker", method, tmp, n, out])
                if not run.ok:
                    notes.append(f"{METHODS[method][0]} N={n} failed: {run.tail(5)}")
                    continue
                images[method] = np.load(out)
                measured[method] = dict(run.result, peak_rss_bytes=run.peak_rss_bytes)
                print(f"  N={n:<3} {METHODS[method][0]:<34} {run.result['wall_s']:8.2f} s", flush=True)
            if siril:
                image, m, why = run_siril(siril, siril_dirs[n])
                if image is None:
                    notes.append(f"Siril N={n}: {why}")
                else:
                    images["siril"], measured["siril"] = image, m
                    print(f"  N={n:<3} {METHODS['siril'][0]:<34} {m['wall_s']:8.2f} s "
                          f"(siril-cli process {m['process_wall_s']:.2f} s)", flush=True)
            base = measured.get("zm-winsorized", {}).get("wall_s")
            for method in methods + (["siril"] if siril else []):
                if method not in images:
                    continue
                label, ref = METHODS[method]
                m = measured[method]
                d_full, d_border = _compare(images[method], images[ref], full_mask) \
                    if ref in images else (None, None)
                err = np.abs(images[method] - truth)[outlier_mask & np.isfinite(images[method])]
                rows.append([label, n, fmt(m["wall_s"]), fmt(m["peak_rss_bytes"] / 2**20, ".0f"),
                             fmt(stack_mb if method != "siril" else None, ".0f", "-"),
                             fmt(m["wall_s"] / base if base else None, ".2f") + "x",
                             {None: "-"}.get(ref, ref), fmt(d_full, ".2e", "-"), fmt(d_border, ".2e", "-"),
                             fmt(float(err.mean()) if err.size else None, ".4f")])
                if method == "zm-winsorized" and n == 50 and not args.quick:
                    peak = m["peak_rss_bytes"]
                    notes.append(f"ZeMosaic winsorized N=50 peak RSS {peak / 2**20:.0f} MiB (stack itself "
                                 f"{stack_mb:.0f} MiB) vs target 2.5 GB ({TARGET_PEAK_BYTES / 2**20:.0f} MiB): "
                                 f"{'PASS' if peak <= TARGET_PEAK_BYTES else 'FAIL'}")
            if "zm-none" in images:
                clean = full_mask[..., None] & ~outlier_mask
                floor = float(np.abs(images["zm-none"] - truth)[clean].mean())
                notes.append(f"N={n}: noise floor (mean |plain mean - truth| on clean pixels) = {floor:.4f}")
    print()
    headers = ["method", "N", "wall s", "peak RSS MB", "stack MB", "time ratio", "ref",
               "max|d| full px", "max|d| border px", "outlier resid"]
    print_table(headers, rows, title="Stacking (combine mean; time ratio = wall / ZeMosaic winsorized "
                                     "wall, same N)")
    print()
    if args.quick:
        notes.append("--quick: the 2.5 GB peak-RSS target (N=50 full size) is checked by the full run only")
    notes.append("peak RSS: whole child process; the Python rows hold the full stack in memory (stack MB), "
                 "Siril reads its FITS files in blocks")
    notes.append("Siril: wall = Siril's own 'Execution time' of the stack command (includes reading the FITS "
                 "files from the page cache); NaN written as 0 (Siril 1.0 has no NaN support), so its "
                 "border pixels are stacked with zeros")
    notes.append("astropy sigma_clip (median centre, std including the tested sample, 3 sigma, 5 rounds) is "
                 "the classic form of ZeMosaic kappa_sigma (which tests each sample against the others' "
                 "spread), hence compared with it")
    for note in notes:
        print(f"- {note}")
    print()
    print_fidelity(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
