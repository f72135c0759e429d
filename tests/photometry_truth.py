"""Photometric figures of a mosaic against the synthetic truth (shared by tests and benchmarks).

A mosaic made from ``zemosaic_synth`` frames should equal ``a_c * truth_c + b_c`` per channel,
with the same ``a_c`` in every panel. The figures here say how far it is from that:

* panel gain spread: the largest deviation of a panel's flux scale from the median panel's;
* colour ratio spread: the largest relative spread of R/G or B/G between panels;
* seam step: the largest jump of the residual (mosaic minus the fitted truth) across a tile edge,
  in units of the sky noise of one pixel.

:func:`perfect_mosaic` gives what a flawless pipeline would make of the same scene (the truth,
scaled, with noise like the mosaic's): its figures are the precision of these measurements.

Scales are fitted on 16x16 block means, which conserve flux whatever the PSF, so resampling blur
does not bias them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter

import zemosaic_synth
import zemosaic_fits as zfits
from zemosaic_fits import read_image_fits
from zemosaic_utils import reproject_and_coadd

BLOCK = 16
SATURATION_SAFE = 20000.0  # truth ADU: with the sky, well below the 16-bit ceiling


def truth_on_grid(dataset_root, wcs, shape):
    """Return the noiseless truth ``(H, W, 3)`` resampled onto a mosaic grid."""
    truth, truth_wcs, _meta = zemosaic_synth.load_truth(dataset_root)
    return np.stack([reproject_and_coadd([truth[..., c]], [truth_wcs], wcs, shape)[0]
                     for c in range(3)], axis=-1)


def tile_footprints(tiles, wcs, shape):
    """Return one boolean ``(H, W)`` per tile ``(coverage, wcs)``: where its coverage is solid."""
    feet = []
    for coverage, tile_wcs in tiles:
        cov = np.nan_to_num(reproject_and_coadd([coverage], [tile_wcs], wcs, shape)[0])
        feet.append(cov > 0.75 * coverage.max())
    return feet


def master_tile_footprints(out_dir, wcs, shape):
    """Footprints of the master tiles a run wrote in ``out_dir/master_tiles``."""
    tiles = []
    for path in sorted(Path(out_dir, "master_tiles").glob("master_tile_0*.fits")):
        _img, tile_wcs, coverage, _hdr = read_image_fits(path)
        tiles.append((coverage, tile_wcs))
    return tile_footprints(tiles, wcs, shape)


def _blocks(a, reduce=np.mean):
    h, w = a.shape[0] // BLOCK * BLOCK, a.shape[1] // BLOCK * BLOCK
    return reduce(a[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK, *a.shape[2:]), axis=(1, 3))


def _robust_line(t, m, rounds=5, kappa=3.0):
    """``(a, b)`` of ``m = a * t + b`` by least squares with kappa-sigma clipping of outliers."""
    keep = np.ones(t.size, bool)
    for _ in range(rounds):
        a, b = np.polyfit(t[keep], m[keep], 1)
        resid = m - (a * t + b)
        sigma = _robust_sigma(resid[keep])
        new = np.abs(resid) <= kappa * sigma
        if np.array_equal(new, keep) or new.sum() < 10:
            break
        keep = new
    return np.array([a, b])


def _fit(mosaic, truth, region):
    """Per-channel ``(a, b)`` of ``mosaic = a * truth + b`` on the blocks lying wholly in region.

    Blocks holding a star bright enough to saturate a frame are left out (the truth has no
    ceiling), and blocks whose residual is an outlier (a star cut by the block edge with a
    different PSF) are clipped.
    """
    solid = (_blocks(region.astype(float)) == 1) & (_blocks(np.nan_to_num(truth).max(axis=-1), np.max)
                                                    < SATURATION_SAFE)
    fits_ = []
    for c in range(mosaic.shape[-1]):
        m = _blocks(np.nan_to_num(mosaic[..., c]))[solid]
        t = _blocks(np.nan_to_num(truth[..., c]))[solid]
        fits_.append(_robust_line(t, m))
    return np.array(fits_)


def _robust_sigma(values):
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def panel_figures(mosaic, truth, feet):
    """Return the photometric figures of ``mosaic`` (dict, see the module docstring)."""
    ok = np.all(np.isfinite(mosaic), axis=-1) & np.all(np.isfinite(truth), axis=-1)
    count = np.sum(feet, axis=0)
    single = ok & (count == 1)
    panels = []
    for foot in feet:
        region = binary_erosion(foot & single, iterations=2)
        panels.append(_fit(mosaic, truth, region)[:, 0])
    scales = np.array(panels)  # (n_panels, C)
    lum = scales.mean(axis=1)
    ratios = np.stack([scales[:, 0] / scales[:, 1], scales[:, 2] / scales[:, 1]], axis=1)
    whole = _fit(mosaic, truth, binary_erosion(ok & (count >= 1), iterations=2))
    return {
        "panel_scale": lum / np.median(lum),
        "panel_ratios": ratios,
        "gain_spread": float(np.max(np.abs(lum / np.median(lum) - 1))),
        "colour_spread": float(np.max(np.ptp(ratios, axis=0) / ratios.mean(axis=0))),
        "mosaic_ratios": (float(whole[0, 0] / whole[1, 0]), float(whole[2, 0] / whole[1, 0])),
        "seam_step": seam_step(mosaic, truth, feet, whole, single),
    }


def _clipped_mean(values, kappa=3.0, rounds=5):
    """Mean after kappa-sigma clipping: on noise, 1.25x more precise than the median."""
    for _ in range(rounds):
        mean, sigma = values.mean(), values.std()
        keep = np.abs(values - mean) <= kappa * sigma
        if keep.all():
            break
        values = values[keep]
    return float(values.mean())


def _star_pixels(truth):
    """Pixels on or next to a star of the truth: its luminance above a 6 px Gaussian background."""
    lum = np.nan_to_num(truth.mean(axis=-1))
    return binary_dilation(lum - gaussian_filter(lum, 6) > 2.0, iterations=2)


def coefficient_figures(dataset_root, tiles):
    """Brightness and colour figures of the tiles from the run's own coefficients, free of noise.

    ``tiles`` are the run report's tile entries: each frame's ``gain_rgb`` and ``weight_rgb``
    (``frame_photometry``), the tile's ``gain_rgb`` and ``two_pass_gain``. A frame's light is its
    true transparency times its panel's colour (``truth.json``), so a tile's level in channel c is
    ``tile gain * sum_k(w_k g_k t_k) / sum_k(w_k)``: what the mosaic holds of that panel, up to
    the truth's own scale. Returns the keys of :func:`panel_figures` about levels and colours.
    """
    import json

    meta = json.loads((Path(dataset_root) / "truth" / "truth.json").read_text())
    light = {f["file"]: f["transparency"] * np.asarray(f["gain_rgb"], float) for f in meta["frames"]}
    levels = []
    for tile in tiles:
        frames = tile["frame_photometry"]
        weights = np.array([f["weight_rgb"] for f in frames])
        stacked = np.sum(weights * np.array([f["gain_rgb"] for f in frames])
                         * np.array([light[Path(f["path"]).name] for f in frames]), axis=0) / weights.sum(axis=0)
        levels.append(stacked * np.asarray(tile["gain_rgb"]) * tile.get("two_pass_gain", 1.0))
    scales = np.array(levels)
    lum = scales.mean(axis=1)
    ratios = np.stack([scales[:, 0] / scales[:, 1], scales[:, 2] / scales[:, 1]], axis=1)
    return {"panel_scale": lum / np.median(lum), "panel_ratios": ratios,
            "gain_spread": float(np.max(np.abs(lum / np.median(lum) - 1))),
            "colour_spread": float(np.max(np.ptp(ratios, axis=0) / ratios.mean(axis=0)))}


def seam_step(mosaic, truth, feet, fitted, single, band_px=40, min_pixels=2000):
    """Largest residual jump across a tile edge, in sky-noise units (per pixel, per channel).

    For each overlapping pair of tiles, the mean residual (clipped) of the overlap and of each
    tile's own area within ``band_px`` of it are compared; the truth fitted on the whole mosaic is
    removed first, so only the mismatch between tiles is left. Star pixels are left out (their
    residuals measure PSF differences, not levels), and so are pairs with less than
    ``min_pixels`` in any part (corner overlaps): there the noise, not the seam, sets the figure.
    A perfect mosaic scores 0.07-0.12 on the test scenes (``test_figures_resolve_the_targets``).
    """
    stars = _star_pixels(truth)
    worst = 0.0
    for c in range(mosaic.shape[-1]):
        resid = mosaic[..., c] - (fitted[c, 0] * truth[..., c] + fitted[c, 1])
        noise = _robust_sigma(resid[single & ~stars])
        clean = np.isfinite(resid) & ~stars
        for i in range(len(feet)):
            for j in range(i + 1, len(feet)):
                near = binary_dilation(feet[i] & feet[j], iterations=band_px)
                parts = [feet[i] & feet[j] & clean] + [near & single & feet[k] & clean for k in (i, j)]
                if min(int(p.sum()) for p in parts) < min_pixels:
                    continue
                levels = [_clipped_mean(resid[p]) for p in parts]
                worst = max(worst, float(np.ptp(levels)) / noise)
    return worst


def perfect_mosaic(mosaic, truth, seed, scale=0.95, offset=2500.0):
    """Return ``scale * truth + offset`` plus noise like the mosaic's, where the mosaic has data.

    The noise has the mosaic's per-channel sigma (robust, of mosaic minus truth) and its pixel-scale
    correlation (white noise smoothed by a 0.7 px Gaussian, as two bilinear resamplings leave it).
    """
    rng = np.random.default_rng(seed)
    ok = np.all(np.isfinite(mosaic), axis=-1) & np.all(np.isfinite(truth), axis=-1)
    noise = np.stack([gaussian_filter(rng.normal(0, 1, ok.shape), 0.7) for _ in range(mosaic.shape[-1])], -1)
    sigma = [_robust_sigma((mosaic[..., c] - truth[..., c])[ok]) for c in range(mosaic.shape[-1])]
    noise *= np.array(sigma) / noise[ok].std(axis=0)
    return np.where(ok[..., None], scale * truth + offset + noise, np.nan).astype(np.float32)


def aligned_panel(out_dir, frames: int, seed: int, size: str = "small", **options):
    """Return ``(stack (N, H, W, 3), true gains (N,))`` of one synthetic panel aligned onto its first
    frame through the WCSs; transparency 0.84-1.0 and a drifting sky, so the gains are grey and known.
    """
    import json

    import zemosaic_align_stack as stk

    info = zemosaic_synth.generate_dataset(out_dir, panels=(1, 1), frames_per_panel=frames, seed=seed,
                                           size=size, transparency_range=(0.84, 1.0),
                                           pedestal_jitter=0.08, **options)
    meta = json.loads(Path(info["truth_json"]).read_text())
    loaded = [zfits.load_frame(p) for p in info["frame_paths"]]
    ref = loaded[0]
    canvas = stk.group_canvas(ref.wcs, ref.data.shape[:2], [(f.wcs, f.data.shape[:2]) for f in loaded])
    stack = np.stack([stk.place_reference(ref.data, canvas)]
                     + [stk.align_frame(f.data, ref.data, "wcs", f.wcs, canvas=canvas) for f in loaded[1:]])
    transparency = np.array([f["transparency"] for f in meta["frames"]])
    return stack, transparency[0] / transparency  # true gains onto frame 0: grey
