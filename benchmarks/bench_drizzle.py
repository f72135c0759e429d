"""Star colours, sharpness, noise and speed of ``debayer`` against Bayer drizzle (issue 21).

Run: ``.venv/bin/python benchmarks/bench_drizzle.py [--frames N] [--fwhm 1.6,2.0,2.4]``;
``--real``: the shared real subs; ``--tile``: what a master tile of 50 full-size raw subs costs.

Synthetic undersampled frames with known star colours (``zemosaic_synth``: one panel of N small
frames, dithered and turning with the field, stars of the given FWHM; made once and cached in
``/tmp/zemosaic-bench/drizzle``) are mosaicked with each method, and each isolated unsaturated
star of the truth is measured on the mosaic and on the noiseless truth rendered on the mosaic's
grid (``tests/photometry_truth.py``) at the same place:

* colour error: the star's R/G (and B/G) on the mosaic over the truth's, divided by the same
  ratio of the whole image's flux scales (16-px block means, which conserve flux whatever the
  PSF), minus 1; the median over stars (a bias of star colours against the diffuse light) and
  the rms; in a core aperture of 1.5 frame pixels and in a wide one of 5;
* FWHM: the median of the stars' G second moments, in frame pixels;
* noise: the G sky noise of one mosaic pixel (4-pixel differences), in ADU;
* seconds per frame of the master tiles.

Siril 1.0 has no Bayer drizzle on CFA sequences: its ``register -drizzle`` upsamples the
registered debayered frames two times (an interpolated grid, not a drop of each sample into its
own colour), so it has no row here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import photometry_truth as pt  # noqa: E402
import zemosaic_fits as zfits  # noqa: E402
import zemosaic_synth  # noqa: E402
import zemosaic_worker as zw  # noqa: E402
from zemosaic_config import config_from_dict  # noqa: E402
from zemosaic_utils import pixel_noise_sigma  # noqa: E402

CACHE = Path("/tmp/zemosaic-bench/drizzle")
METHODS = (("debayer", "debayer", 1), ("bayer drizzle x1", "bayer_drizzle", 1),
           ("bayer drizzle x2", "bayer_drizzle", 2))


def dataset(frames: int, fwhm: float, seed: int) -> Path:
    """Return the root of the cached dataset, making it first when absent."""
    root = CACHE / f"f{frames}-fwhm{fwhm}-s{seed}-d40k"
    if not (root / "truth" / "truth.json").is_file():
        zemosaic_synth.generate_dataset(root, panels=(1, 1), frames_per_panel=frames, seed=seed, size="small",
                                        fwhm_px=fwhm, satellite=False, nebula=False, star_density=40000)
    return root


def _fwhm(image, x, y, scale):
    """Return the median G FWHM of the stars at ``(x, y)``, in frame pixels (second moments)."""
    half = 4 * scale
    offs = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(offs, offs, indexing="ij")
    widths = []
    for sx, sy in zip(x, y):
        stamp = image[sy - half:sy + half + 1, sx - half:sx + half + 1, 1].astype(np.float64)
        stamp = stamp - np.nanmedian(image[sy - 3 * half:sy + 3 * half, sx - 3 * half:sx + 3 * half, 1])
        stamp = np.where(np.isfinite(stamp) & (stamp > 0), stamp, 0.0)
        if stamp.sum() <= 0:
            continue
        second = (stamp * (xx ** 2 + yy ** 2)).sum() / stamp.sum() / 2.0
        widths.append(2.3548 * np.sqrt(second) / scale)
    return float(np.median(widths)) if widths else float("nan")


def measure(root: Path, out: Path, scale: int) -> dict:
    """Return the figures of the mosaic in ``out`` against the truth of ``root``."""
    mosaic, wcs, _, _ = zfits.read_image_fits(out / zw.MOSAIC_NAME)
    truth = pt.truth_on_grid(root, wcs, mosaic.shape[:2])
    region = np.all(np.isfinite(mosaic), axis=2)
    x, y = pt.star_positions(truth, min_peak=600.0 / scale ** 2, isolation_px=16.0 * scale)
    inside = region[y, x]
    row = {"stars": int(inside.sum()), "fwhm_px": _fwhm(mosaic, x[inside], y[inside], scale)}
    for name, radius in (("core", 1.5), ("wide", 5.0)):
        errors = pt.star_colour_errors(mosaic, truth, scale, radius)
        for k, colour in enumerate("RB"):
            error = errors[:, k]
            row[f"{name}_{colour}G_median"] = float(np.median(error))
            row[f"{name}_{colour}G_rms"] = float(1.4826 * np.median(np.abs(error - np.median(error))))
    row["noise_adu"] = float(pixel_noise_sigma(np.where(region, mosaic[..., 1], np.nan)))
    return row


def run(root: Path, method: str, scale: int) -> tuple[Path, float]:
    """Mosaic ``root`` with a CFA method; returns the output folder and the master tiles' seconds."""
    out = root / f"out-{method}-{scale}"
    config = config_from_dict({"input_folder": str(root / "frames"), "output_folder": str(out), "resume": "off",
                               "stacking_cfa_method": method, "drizzle_scale": scale})
    result = zw.run_mosaic(config)
    return out, float(result.report.timings_s["master_tiles"])


def resampling_seconds(repeats: int = 3) -> dict:
    """Return the best seconds of putting one full-size frame (1080 x 1920, turned 17 degrees) on
    its canvas: bilinear resampling of the debayered frame, and Bayer drizzle at scales 1 and 2
    (its pixel weights kept, as a tile does)."""
    import zemosaic_align_stack as stk
    import zemosaic_drizzle as zdriz

    rng = np.random.default_rng(0)
    raw = rng.normal(1000.0, 10.0, (1080, 1920)).astype(np.float32)
    rgb = zfits.debayer_bilinear(raw, "GRBG")
    canvas = stk.Canvas((1600, 2300), (260, 190))
    turn = np.array([[np.cos(0.3), -np.sin(0.3), 150.0], [np.sin(0.3), np.cos(0.3), -500.0], [0, 0, 1.0]])
    mapping = stk.FrameMapping(turn)
    steps = {"bilinear (debayered)": lambda: stk.resample_bilinear(rgb, mapping, canvas)}
    for scale in (1, 2):
        resample = zdriz.bayer_resampler(raw, "GRBG", scale, zdriz.default_pixfrac(scale), "square",
                                         keep_weights=lambda weights: None)
        steps[f"bayer drizzle x{scale}"] = lambda r=resample: r(rgb, mapping, canvas)
    best = {}
    for name, step in steps.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return best


def _with_reference_wcs(folder: Path) -> Path:
    """Return a folder of copies of the shared real subs whose headers hold their independent WCSs.

    The second registration of the same frames: ``reference_wcs.json``'s astrometry.net solutions
    (TAN, CD) in place of the header's WCS, or where there was none. The subs are read where they
    lie and copied only here, outside the repository.
    """
    from astropy.io import fits

    import realdata

    out = CACHE / "real-reference-wcs"
    out.mkdir(parents=True, exist_ok=True)
    for name, entry in realdata.reference_frames().items():
        target = out / name
        if target.is_file():
            continue
        with fits.open(folder / name) as hdul:
            header = hdul[0].header.copy()
            wcs_keys = ("CD", "PC", "CRPIX", "CRVAL", "CTYPE", "CUNIT", "CDELT", "CROTA", "A_", "B_", "AP_", "BP_")
            for key in [k for k in header if k.startswith(wcs_keys)]:
                del header[key]
            header.update(zfits.wcs_to_cd_header(realdata.reference_wcs(entry)))
            fits.PrimaryHDU(hdul[0].data, header).writeto(target)
    return out


def _real_star_colours(out: Path, reference: tuple | None, radius: float, scale: int):
    """Return ``(sky positions (N, 2), R/G and B/G (N, 2), G flux (N,))`` of the bright unsaturated
    stars of a mosaic.

    Stars are found on the mosaic of ``reference`` (its ``(mosaic, wcs)``) or, without one, on
    this mosaic; they are measured here at the same sky positions.
    """
    from scipy.ndimage import gaussian_filter, maximum_filter

    mosaic, wcs, _, _ = zfits.read_image_fits(out / zw.MOSAIC_NAME)
    saturated = zfits.read_saturated_mask(out / zw.MOSAIC_NAME)
    if reference is None:
        g = np.nan_to_num(mosaic[..., 1])
        excess = g - gaussian_filter(g, 6.0 * scale)
        peaks = (excess == maximum_filter(excess, size=9 * scale)) & (excess > 300.0) \
            & (g < 30000) & ~np.asarray(saturated if saturated is not None else np.zeros_like(g, bool))
        ys, xs = np.nonzero(peaks)
        sky = np.column_stack(wcs.pixel_to_world_values(xs, ys))
    else:
        sky = reference
    xs, ys = wcs.world_to_pixel_values(sky[:, 0], sky[:, 1])
    xs, ys = np.rint(xs).astype(int), np.rint(ys).astype(int)
    room = int(3 * radius * scale) + 4
    inside = (xs > room) & (ys > room) & (xs < mosaic.shape[1] - room) & (ys < mosaic.shape[0] - room)
    colours, green = np.full((len(sky), 2), np.nan), np.full(len(sky), np.nan)
    flux = pt._ring_apertures(mosaic, xs[inside], ys[inside], radius * scale)
    colours[inside] = flux[:, [0, 2]] / flux[:, 1:2]
    green[inside] = flux[:, 1]
    return sky, colours, green


def real_registrations(radius: float = 1.5) -> list:
    """Return, per CFA method, how much the real subs' star colours move between two registrations.

    The same six shared subs mosaicked twice: WCSs as the pipeline finds them (header, solved,
    matched), and the independent reference solutions. Per star (found on the first mosaic,
    measured on both at the same sky position, core aperture), the robust rms of the relative
    change of R/G and B/G: what the registration alone changes in the colours.
    """
    import realdata

    if not realdata.NGC7023.is_dir():
        return []
    second = _with_reference_wcs(realdata.NGC7023)
    rows = []
    for label, method, scale in METHODS:
        outs = []
        for tag, folder in (("found", realdata.NGC7023), ("reference", second)):
            out = CACHE / f"real-{tag}-{method}-{scale}"
            zw.run_mosaic(config_from_dict({"input_folder": str(folder), "output_folder": str(out), "resume": "off",
                                            "stacking_cfa_method": method, "drizzle_scale": scale}))
            outs.append(out)
        sky, first, _ = _real_star_colours(outs[0], None, radius, scale)
        _, again, _ = _real_star_colours(outs[1], sky, radius, scale)
        change = again / first - 1.0
        ok = np.all(np.isfinite(change), axis=1) & np.all(first > 0, axis=1)
        rms = [float(1.4826 * np.median(np.abs(c - np.median(c)))) for c in change[ok].T]
        rows.append({"method": label, "stars": int(ok.sum()), "RG_rms": rms[0], "BG_rms": rms[1]})
    return rows


def real_frame_scatter(radius: float = 1.5, bright: int = 100) -> list:
    """Return, per CFA method, how much the real subs' star colours scatter from one frame to the next.

    Each of the six shared subs is mosaicked alone (with its independent reference WCS, so no
    solve is involved), and every bright unsaturated star of the six-frame debayered mosaic is
    measured on each single-frame mosaic at its sky position (core aperture). Each frame's colours
    are divided by their median over the stars (the two nights' colour balances differ by 20 %:
    that is the normalisation's job, not the resampling's). Per star, the standard deviation of
    R/G (and B/G) over the frames, relative to its median: how much where a star falls on the
    Bayer grid moves its colour, beside its photon noise (the same photons under either method).
    The median over the ``bright`` brightest stars (G core flux in the six-frame mosaic), where
    photon noise weighs least.
    """
    import realdata

    if not realdata.NGC7023.is_dir():
        return []
    folder = _with_reference_wcs(realdata.NGC7023)
    whole = CACHE / "real-found-debayer-1"
    if not (whole / zw.MOSAIC_NAME).exists():
        zw.run_mosaic(config_from_dict({"input_folder": str(realdata.NGC7023), "output_folder": str(whole)}))
    sky, _, green = _real_star_colours(whole, None, radius, 1)
    order = np.argsort(-np.nan_to_num(green, nan=-np.inf))[:bright]
    sky = sky[order]
    rows = []
    for label, method, scale in METHODS[:2]:  # a single frame at scale 2 leaves most cores without some colour
        per_frame = []
        for name in sorted(p.name for p in folder.iterdir()):
            alone = CACHE / "real-alone" / name
            alone.mkdir(parents=True, exist_ok=True)
            if not (alone / name).exists():
                os.symlink(folder / name, alone / name)
            out = CACHE / f"real-alone-{method}-{scale}" / name
            if not (out / zw.MOSAIC_NAME).exists():
                zw.run_mosaic(config_from_dict({"input_folder": str(alone), "output_folder": str(out),
                                                "stacking_cfa_method": method, "drizzle_scale": scale}))
            per_frame.append(_real_star_colours(out, sky, radius, scale)[1])
        colours = np.stack(per_frame)  # (frames, stars, 2)
        colours = colours / np.nanmedian(np.where(colours > 0, colours, np.nan), axis=1, keepdims=True)
        seen = np.sum(np.all(np.isfinite(colours) & (colours > 0), axis=2), axis=0)
        keep = seen >= 3  # on at least three frames
        values = colours[:, keep]
        scatter = np.nanstd(values, axis=0, ddof=1) / np.nanmedian(values, axis=0)
        rows.append({"method": label, "stars": int(keep.sum()), "RG_scatter": float(np.median(scatter[:, 0])),
                     "BG_scatter": float(np.median(scatter[:, 1]))})
    return rows


def tile_costs(root: str = "/tmp/zemosaic-bench/pipeline") -> list:
    """Return, per CFA method at scale 1, the master tiles' seconds and the run's peak RSS on the
    look-alike of a real two-night field (``bench_pipeline.look_alike``: 50 full-size raw subs, the
    second night turned 70 deg), each run in a child process of its own, one after the other."""
    from _measure import run_python_worker
    from bench_pipeline import look_alike

    frames = look_alike(root)
    rows = []
    for label, method, scale in METHODS[:2]:
        run = run_python_worker(os.path.abspath(__file__), ["--tile-worker", frames, method])
        if not run.ok or not run.result:
            raise SystemExit(f"{label} on the look-alike failed:\n{run.tail()}")
        rows.append({"method": label, "master_tiles_s": run.result["master_tiles_s"],
                     "peak_rss_mb": run.peak_rss_bytes / 2**20})
    return rows


def _tile_worker(frames: str, method: str) -> None:
    """Child of :func:`tile_costs`: one run on ``frames`` with ``method``; prints its RESULT line."""
    from _measure import report_result

    out = CACHE / f"tile-{method}"
    result = zw.run_mosaic(config_from_dict({"input_folder": frames, "output_folder": str(out), "resume": "off",
                                             "stacking_cfa_method": method}))
    report_result(master_tiles_s=float(result.report.timings_s["master_tiles"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--fwhm", default="1.6,2.0,2.4")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--real", action="store_true",
                        help="only the shared real subs: two registrations, and frame-to-frame scatter")
    parser.add_argument("--tile", action="store_true",
                        help="only the cost of a 50-frame master tile of full-size raw subs, per method")
    parser.add_argument("--tile-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tile_worker:
        _tile_worker(*args.tile_worker)
        return
    if args.tile:
        rows = tile_costs()
        print(f"{'method':18} {'master tiles s':>14} {'x debayer':>9} {'peak RSS MB':>11}  (50-frame look-alike)")
        for row in rows:
            print(f"{row['method']:18} {row['master_tiles_s']:14.1f} "
                  f"{row['master_tiles_s'] / rows[0]['master_tiles_s']:8.2f}x {row['peak_rss_mb']:11.0f}")
        return
    if args.real:
        print(f"{'method':18} {'stars':>5} {'R/G moves':>10} {'B/G moves':>10}  (core, between two registrations)")
        for row in real_registrations():
            print(f"{row['method']:18} {row['stars']:5d} {100 * row['RG_rms']:9.1f}% {100 * row['BG_rms']:9.1f}%")
        for radius, name in ((1.5, "core"), (5.0, "wide")):
            print(f"\n{'method':18} {'stars':>5} {'R/G scatter':>11} {'B/G scatter':>11}  "
                  f"({name} aperture {radius:g} px, from frame to frame, the 100 brightest)")
            for row in real_frame_scatter(radius):
                print(f"{row['method']:18} {row['stars']:5d} {100 * row['RG_scatter']:10.1f}% "
                      f"{100 * row['BG_scatter']:10.1f}%")
        return
    rows = []
    print(f"{'fwhm':>5} {'method':18} {'stars':>5} {'core R/G':>16} {'core B/G':>16} {'wide R/G':>16} "
          f"{'wide B/G':>16} {'FWHM':>5} {'noise':>6} {'s/frame':>7}")
    for fwhm in (float(v) for v in args.fwhm.split(",")):
        root = dataset(args.frames, fwhm, args.seed)
        for label, method, scale in METHODS:
            out, seconds = run(root, method, scale)
            row = {"fwhm_truth": fwhm, "method": label, **measure(root, out, scale),
                   "s_per_frame": seconds / args.frames}
            rows.append(row)
            cells = [f"{100 * row[f'{k}_median']:+5.1f}% ±{100 * row[f'{k}_rms']:4.1f}%"
                     for k in ("core_RG", "core_BG", "wide_RG", "wide_BG")]
            print(f"{fwhm:5.1f} {label:18} {row['stars']:5d} {' '.join(f'{c:>16}' for c in cells)} "
                  f"{row['fwhm_px']:5.2f} {row['noise_adu']:6.1f} {row['s_per_frame']:7.3f}")
    seconds = resampling_seconds()
    print("\none full-size frame onto its canvas (best of 3):")
    for name, value in seconds.items():
        print(f"  {name:22} {value:6.3f} s  ({value / seconds['bilinear (debayered)']:.1f}x bilinear)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "resampling_s": seconds}, indent=1))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
