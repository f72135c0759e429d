"""Photometric figures of a mosaic against the synthetic truth (shared by tests and benchmarks).

A mosaic made from ``zemosaic_synth`` frames should equal ``a_c * truth_c + b_c`` per channel,
with the same ``a_c`` in every panel. The figures here say how far it is from that:

* panel gain spread: the largest deviation of a panel's flux scale from the median panel's;
* colour ratio spread: the largest relative spread of R/G or B/G between panels;
* seam step: the largest jump of the residual (mosaic minus the fitted truth) across a tile edge,
  in units of the sky noise of one pixel.

On scenes whose sky differs from panel to panel (:func:`gradient_scene_options`: light pollution
of an alt-az night), where a smooth background rides on the truth:

* :func:`seam_steps`: the background step across each tile edge, extrapolated to the edge from
  either side so that a smooth slope is no step, in sky sigmas of one panel's stack
  (:func:`residual_seam_steps` measures them on any residual image, so on real mosaics too);
* :func:`overlap_dips`: the level of each overlap against its two tiles' own areas beside it,
  the disagreement a feathered join spreads over the overlap instead of leaving as a step;
* :func:`nebula_flux_ratio`: the fraction of the truth's nebula flux the mosaic holds;
* :func:`panel_star_scales`: each tile's flux scale from its stars' aperture fluxes, which no sky
  gradient moves.

:func:`perfect_mosaic` gives what a flawless pipeline would make of the same scene (the truth,
scaled, with noise like the mosaic's): its figures are the precision of these measurements.

Scales are fitted on 16x16 block means, which conserve flux whatever the PSF, so resampling blur
does not bias them; the figures of gradient scenes take theirs from aperture photometry instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import (binary_dilation, binary_erosion, distance_transform_edt, gaussian_filter, label,
                           map_coordinates)

import zemosaic_synth
import zemosaic_fits as zfits
from zemosaic_fits import read_image_fits

BLOCK = 16
SATURATION_SAFE = 20000.0  # truth ADU: with the sky, well below the 16-bit ceiling

#: The hard alt-az scene of :func:`gradient_scene_options`: per-panel sky levels (x the pedestal),
#: and per-panel sensor-fixed sky gradients ``(gx, gy, dome)``; panel 2 is two nights whose
#: vertical gradients have opposite signs.
GRADIENT_SKY_RGB = (2700.0, 3000.0, 2400.0)
GRADIENT_SKY_LEVELS = (0.8, 1.0, 1.2, 1.1)
GRADIENT_PANELS = (
    (0.03, 0.12, 0.03),
    (-0.05, -0.08, 0.02),
    [(0.02, 0.18, 0.04), (-0.04, -0.10, 0.02)],
    (0.05, 0.06, 0.03),
)


def gradient_scene_options(size="small", overlap=None, frames_per_panel=8, seed=21):
    """Keyword arguments of ``zemosaic_synth.generate_dataset`` for the standard hard scene.

    A real alt-az night's light pollution: 2x2 panels, sky ~3000 ADU (transparency 0.84-1.0,
    pedestal jitter +-6 %), per-panel sky levels 0.8-1.2x (the altitude changes), per-panel sky
    gradients fixed to the sensor of 6-18 % of the sky peak to peak vertically (either sign),
    up to +-5 % horizontally and a 2-4 % light dome, panel 2 observed on two nights with opposite
    vertical gradients; the default field rotation drift, nebula on. ``size`` is ``"small"``
    (480x270 frames, for tests) or ``"full"`` (1920x1080, for benchmarks); ``overlap`` None keeps
    the generator's default (0.2).
    """
    kwargs = {"panels": (2, 2), "frames_per_panel": int(frames_per_panel), "seed": int(seed),
              "size": size, "transparency_range": (0.84, 1.0), "sky_pedestal_rgb": GRADIENT_SKY_RGB,
              "pedestal_jitter": 0.06, "panel_sky_level": list(GRADIENT_SKY_LEVELS),
              "panel_sky_gradient": [list(g) if isinstance(g, list) else g for g in GRADIENT_PANELS],
              "nebula": True}
    if overlap is not None:
        kwargs["overlap"] = float(overlap)
    return kwargs


def truth_on_grid(dataset_root, wcs, shape):
    """Return the noiseless truth ``(H, W, 3)`` on a mosaic grid: the dataset's analytic sky model
    rendered at the grid's pixel centres (never resampled with the co-add under test)."""
    return zemosaic_synth.load_sky_model(dataset_root).render_rgb(wcs, shape)


def resample_bilinear(image, image_wcs, wcs, shape):
    """``image`` (2-D) sampled bilinearly at the pixel centres of a ``(wcs, shape)`` grid, 0 outside.

    SciPy's ``map_coordinates`` at astropy's exact pixel positions: a reference independent of the
    pipeline's co-add."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    x, y = image_wcs.world_to_pixel_values(*wcs.pixel_to_world_values(xx, yy))
    return map_coordinates(np.nan_to_num(np.asarray(image, np.float64)), [y, x], order=1, mode="constant",
                           cval=0.0)


def tile_footprints(tiles, wcs, shape, min_frames=None):
    """Return one boolean ``(H, W)`` per tile ``(coverage, wcs)``: where its coverage is solid.

    Solid is above 3/4 of the tile's largest coverage, or, with ``min_frames``, at least that many
    frames in the coverage resampled (bilinearly) onto the grid, as the co-add's
    ``trusted_weight`` reads it.
    """
    feet = []
    for coverage, tile_wcs in tiles:
        cov = resample_bilinear(coverage, tile_wcs, wcs, shape)
        feet.append(cov > 0.75 * coverage.max() if min_frames is None else cov >= min_frames)
    return feet


def master_tile_footprints(out_dir, wcs, shape, min_frames=None):
    """Footprints of the master tiles a run wrote in ``out_dir/master_tiles`` (see :func:`tile_footprints`).

    ``min_frames=3`` gives where a tile's pixels hold their own in the co-add: its pixels stacked
    from fewer frames yield to another tile's (``MIN_REJECTION_FRAMES``); :func:`seam_steps`
    wants those footprints.
    """
    tiles = []
    for path in sorted(Path(out_dir, "master_tiles").glob("master_tile_0*.fits")):
        _img, tile_wcs, coverage, _hdr = read_image_fits(path)
        tiles.append((coverage, tile_wcs))
    return tile_footprints(tiles, wcs, shape, min_frames)


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


# --------------------------------------------------------------------------------------
# Seam steps and nebula flux against the truth
# --------------------------------------------------------------------------------------

#: Aperture photometry radii (px): the star's aperture, and the sky annulus's inner and outer radii.
#: 6 px holds a Seestar star whole even after the resamplings' blur.
APERTURE_PX = (6.0, 9.0, 13.0)


def star_positions(truth, min_peak=150.0, isolation_px=16.0):
    """Grid positions ``(x, y)`` (int arrays) of the truth's stars fit to set a flux scale.

    Local maxima of the truth's G channel above its 4 px Gaussian smoothing by over ``min_peak``,
    unsaturated (every channel under ``SATURATION_SAFE``), with room for the sky annulus, and with
    no pixel that saturates nor a star of over 10 % of their peak within ``isolation_px`` (a
    fainter neighbour's light is in both images alike).
    """
    from scipy.ndimage import maximum_filter
    from scipy.spatial import cKDTree

    g = np.nan_to_num(truth[..., 1])
    excess = g - gaussian_filter(g, 4.0)
    peaks = (excess == maximum_filter(excess, size=5)) & (excess > 0.1 * min_peak)
    ys, xs = np.nonzero(peaks)
    height = excess[ys, xs]
    tree = cKDTree(np.column_stack([xs, ys]))
    saturated = np.column_stack(np.nonzero(np.nan_to_num(truth).max(axis=-1) >= SATURATION_SAFE)[::-1])
    far = np.full(len(xs), np.inf) if not len(saturated) else cKDTree(saturated).query(np.column_stack([xs, ys]))[0]
    room = int(APERTURE_PX[2]) + 2
    h, w = g.shape
    keep = []
    for k in np.nonzero((height > min_peak) & (far > isolation_px) & (xs >= room) & (ys >= room)
                        & (xs < w - room) & (ys < h - room))[0]:
        near = tree.query_ball_point([xs[k], ys[k]], isolation_px)
        if all(n == k or height[n] <= 0.1 * height[k] for n in near):
            keep.append(k)
    return xs[keep], ys[keep]


def aperture_fluxes(image, x, y):
    """Per star and channel ``(N, C)``: the light within ``APERTURE_PX[0]`` of ``(x, y)`` above the
    mean of the annulus around it (NaN where a pixel of the stamp is not finite). Linear in the
    image, so a neighbour's light, in both images alike, cancels in their ratio."""
    r_ap, r_in, r_out = APERTURE_PX
    half = int(np.ceil(r_out))
    offs = np.arange(-half, half + 1)
    dist = np.hypot(offs[None, :], offs[:, None])
    aperture, annulus = dist <= r_ap, (dist >= r_in) & (dist <= r_out)
    rows = np.asarray(y, int)[:, None, None] + offs[None, :, None]
    cols = np.asarray(x, int)[:, None, None] + offs[None, None, :]
    out = np.empty((len(rows), image.shape[-1]))
    for c in range(image.shape[-1]):
        stamp = image[rows, cols, c].astype(np.float64)
        sky = stamp[:, annulus].mean(axis=1)
        out[:, c] = (stamp[:, aperture] - sky[:, None]).sum(axis=1)
    return out


def _robust_ratio(t, m, rounds=5, kappa=3.0):
    """``a`` of ``m = a * t`` by least squares through the origin, kappa-sigma clipped."""
    keep = np.isfinite(t) & np.isfinite(m)
    a = np.nan
    for _ in range(rounds):
        if keep.sum() < 3:
            break
        a = float(np.sum(m[keep] * t[keep]) / np.sum(t[keep] ** 2))
        resid = np.where(np.isfinite(m), m - a * t, np.inf)
        new = keep & (np.abs(resid) <= kappa * _robust_sigma(resid[keep]))
        if np.array_equal(new, keep) or new.sum() < 5:
            break
        keep = new
    return a


def star_scale(mosaic, truth, region=None):
    """Per channel ``a_c`` of ``mosaic = a_c * truth`` from the stars alone (``region``: of the stars
    whose position lies there; all by default).

    Aperture photometry (:func:`aperture_fluxes`: a local sky from an annulus, so no background,
    sky gradient or lost nebula enters) of the stars of :func:`star_positions` in both images,
    and a robust ratio of the fluxes.
    """
    x, y = star_positions(truth)
    if region is not None:
        inside = region[y, x]
        x, y = x[inside], y[inside]
    fm, ft = aperture_fluxes(mosaic, x, y), aperture_fluxes(truth, x, y)
    return np.array([_robust_ratio(ft[:, c], fm[:, c]) for c in range(mosaic.shape[-1])])


def panel_star_scales(mosaic, truth, feet):
    """Flux scale of each tile from its stars where it alone covers (``(n_tiles, C)``), and the
    largest deviation of a tile's mean scale from the median tile's: a gain spread that sky
    gradients left in the mosaic cannot move (unlike :func:`panel_figures`' block fits)."""
    count = np.sum(feet, axis=0)
    scales = np.array([star_scale(mosaic, truth, foot & (count == 1)) for foot in feet])
    lum = scales.mean(axis=1)
    return scales, float(np.max(np.abs(lum / np.median(lum) - 1)))


def _poly_terms(shape, order, rows=None, cols=None):
    """Monomials ``x**p * y**q`` (p + q <= order) of coordinates scaled to [-1, 1] on ``shape``.

    At the given pixel ``rows``/``cols`` (float arrays), or on the whole grid; returns a list.
    """
    h, w = shape
    if rows is None:
        rows, cols = np.mgrid[0:h, 0:w].astype(float)
    x = 2.0 * cols / max(w - 1, 1) - 1.0
    y = 2.0 * rows / max(h - 1, 1) - 1.0
    return [x ** p * y ** q for p in range(order + 1) for q in range(order + 1 - p)]


def _robust_lstsq(design, values, rounds=8, kappa=3.0):
    """Least-squares coefficients of ``values ~ design @ c`` with kappa-sigma clipping."""
    keep = np.ones(values.size, bool)
    for _ in range(rounds):
        coef = np.linalg.lstsq(design[keep], values[keep], rcond=None)[0]
        resid = values - design @ coef
        new = np.abs(resid) <= kappa * max(_robust_sigma(resid[keep]), 1e-12)
        if np.array_equal(new, keep) or new.sum() < design.shape[1] * 4:
            break
        keep = new
    return coef


def background_fit(image, usable, blocks=None, order=2, min_fraction=0.5):
    """A robust 2-D polynomial of degree ``order`` (coordinates scaled to [-1, 1]) through the
    16x16 block means of ``image`` (H, W, C) over its ``usable`` pixels, per channel; returns it
    evaluated on the grid (float64).

    The blocks used have at least ``min_fraction`` of their pixels usable, and are allowed by
    ``blocks`` (a boolean per block) when given; their position is their usable pixels' mean.
    """
    h, w = image.shape[0] // BLOCK * BLOCK, image.shape[1] // BLOCK * BLOCK
    u = usable[:h, :w].astype(float)
    n = _blocks(u, np.sum)
    ok = (n >= min_fraction * BLOCK ** 2) & (True if blocks is None else blocks)
    rows, cols = (_blocks(g.astype(float) * u, np.sum)[ok] / n[ok] for g in np.mgrid[0:h, 0:w])
    design = np.stack(_poly_terms(image.shape[:2], order, rows, cols), axis=1)
    grid = _poly_terms(image.shape[:2], order)
    out = np.empty(image.shape, np.float64)
    for c in range(image.shape[-1]):
        means = _blocks(np.nan_to_num(image[:h, :w, c]) * u, np.sum)[ok] / n[ok]
        coef = _robust_lstsq(design, means)
        out[..., c] = sum(k * t for k, t in zip(coef, grid))
    return out


def truth_residual(mosaic, truth, usable, blocks=None, order=2):
    """``(R, a_c)``: ``R = mosaic - (a_c * truth + P_c)``, ``a_c`` from the stars (:func:`star_scale`),
    ``P_c`` by :func:`background_fit` of ``mosaic - a_c * truth`` on the ``usable`` pixels."""
    scale = star_scale(mosaic, truth)
    rest = mosaic - scale * truth
    return rest - background_fit(rest, usable, blocks, order), scale


def pixel_noise(resid, mask, lag=4):
    """Per-pixel noise of ``resid`` (H, W, C) on ``mask``: per channel, the robust sigma of the
    differences of pixels ``lag`` apart (across and along rows, both in ``mask``) over sqrt(2).

    Pixels 4 apart are beyond the correlation resampling leaves between neighbours, and too close
    for gradients or offsets to matter, so this is the white-noise sigma of one pixel.
    """
    sig = []
    for c in range(resid.shape[-1]):
        r = resid[..., c]
        diffs = [(r[:, lag:] - r[:, :-lag])[mask[:, lag:] & mask[:, :-lag]],
                 (r[lag:] - r[:-lag])[mask[lag:] & mask[:-lag]]]
        sig.append(_robust_sigma(np.concatenate(diffs)) / np.sqrt(2.0))
    return np.array(sig)


def _signed_distance(foot):
    """Distance to the edge of ``foot`` (px): + inside, - outside, +-0.5 on the pixels either side."""
    return np.where(foot, distance_transform_edt(foot) - 0.5, 0.5 - distance_transform_edt(~foot))


def _edge_segments(edge, segment_px):
    """Label the pixels of ``edge`` (boolean) with segments about ``segment_px`` long (0 = none).

    Each 8-connected piece is cut along its principal axis into equal parts.
    """
    pieces, n_pieces = label(edge, structure=np.ones((3, 3)))
    seg = np.zeros(edge.shape, np.int32)
    next_id = 1
    for k in range(1, n_pieces + 1):
        ys, xs = np.nonzero(pieces == k)
        pts = np.column_stack([ys, xs]).astype(float)
        pts -= pts.mean(axis=0)
        axis = np.linalg.svd(pts, full_matrices=False)[2][0] if len(pts) > 1 else np.array([1.0, 0.0])
        t = pts @ axis
        length = t.max() - t.min() + 1.0
        n = max(1, int(round(length / segment_px)))
        seg[ys, xs] = next_id + np.minimum(((t - t.min()) / length * n).astype(int), n - 1)
        next_id += n
    return seg


def _segment_steps(resid, s, seg_of, samples, min_samples):
    """Per segment, per channel: inside minus outside value at s = 0 of robust line fits of the
    residual against the signed distance ``s``, one per side. Returns ``(n_segments, C)``."""
    ids = seg_of[samples]
    sv, rv = s[samples], resid[samples]
    steps = []
    for k in np.unique(ids[ids > 0]):
        mine = ids == k
        inside, outside = mine & (sv > 0), mine & (sv < 0)
        if inside.sum() < min_samples or outside.sum() < min_samples:
            continue
        steps.append([_robust_line(sv[inside], rv[inside, c])[1] - _robust_line(sv[outside], rv[outside, c])[1]
                      for c in range(resid.shape[-1])])
    return np.array(steps).reshape(-1, resid.shape[-1])


def _bounding_box(mask, margin):
    """Slices of the bounding box of ``mask``'s True pixels grown by ``margin`` (clipped)."""
    ys, xs = np.nonzero(mask)
    return (slice(max(0, ys.min() - margin), ys.max() + margin + 1),
            slice(max(0, xs.min() - margin), xs.max() + margin + 1))


def _edge_steps(resid, s, edge, usable, band_px, segment_px, min_samples):
    """Segment steps ``(n, C)`` of one edge (see :func:`seam_steps`): its ``usable`` pixels within
    ``band_px`` go to the segment of their nearest ``edge`` pixel."""
    seg = _edge_segments(edge, segment_px)
    nearest = distance_transform_edt(~edge, return_indices=True)[1]
    return _segment_steps(resid, s, seg[nearest[0], nearest[1]], usable & (np.abs(s) <= band_px), min_samples)


def _clean_residual(mosaic, truth, order):
    """``(R, clean)``: :func:`truth_residual` fitted on the star-free pixels where both images have
    data (``clean``), and those pixels."""
    ok = np.all(np.isfinite(mosaic), axis=-1) & np.all(np.isfinite(truth), axis=-1)
    clean = ok & ~_star_pixels(truth)
    return truth_residual(mosaic, truth, clean, order=order)[0], clean


def seam_steps(mosaic, truth, feet, band_px=45, segment_px=64, order=2, exclusive=True, min_samples=150):
    """Background steps across the tile edges against the truth, in sky sigmas (see
    :func:`residual_seam_steps`, which measures them).

    The residual is ``R = mosaic - (a_c * truth + P_c)`` (:func:`truth_residual`: ``a_c`` from
    the stars' aperture fluxes, ``P_c`` a robust 2-D polynomial of degree ``order`` over the whole
    mosaic's star-free pixels, so one smooth global gradient may remain), on the star-free pixels
    (:func:`_star_pixels`) where mosaic and truth have data; ``feet`` are the tiles' footprints
    (booleans, see :func:`master_tile_footprints` with ``min_frames=3``).
    """
    resid, clean = _clean_residual(mosaic, truth, order)
    return residual_seam_steps(resid, clean, feet, band_px, segment_px, exclusive, min_samples)


def residual_seam_steps(resid, clean, feet, band_px=45, segment_px=64, exclusive=True, min_samples=150):
    """Steps of a residual ``resid`` (H, W, C) across footprint edges: one dict per edge of a
    footprint in another footprint, in sky sigmas.

    Needs no truth: any image whose smooth background and sources are removed will do (a real
    mosaic minus a smooth fit of its own sky). Each edge of footprint i's (``feet``: booleans)
    that lies in footprint j's is measured on the ``clean`` pixels of j's footprint within
    ``band_px`` of the edge (signed distance s: + inside i, - outside; with ``exclusive``, only
    pixels no third footprint covers). The edge is cut into segments about ``segment_px`` long,
    each sample going to its nearest edge pixel's; per segment and side a robust straight line of
    R against s is evaluated at s = 0, so a smooth slope is no step; the segment's step is inside
    minus outside (segments with under ``min_samples`` samples a side are left out). The edge's
    step is the median over its segments, per channel, divided by the sky noise per pixel:
    :func:`pixel_noise` of R (differences of pixels 4 apart) over the clean pixels in exactly one
    footprint.

    Returns ``[{"tile": i, "other": j, "step_sigma": the worst channel's step (signed),
    "step_sigma_rgb": [...], "step_adu_rgb": [...], "step_err_sigma_rgb": the steps' standard
    errors from their segments' scatter, "n_segments": n}, ...]``, edges with no segment left
    out.
    """
    count = np.sum(feet, axis=0)
    sigma = pixel_noise(resid, clean & (count == 1))
    edges = []
    for i, foot in enumerate(feet):
        s = _signed_distance(foot)
        boundary = foot & ~binary_erosion(foot)
        for j, other in enumerate(feet):
            region = other & (count - foot - other == 0) if exclusive else other
            edge = boundary & region
            if j == i or not edge.any():
                continue
            box = _bounding_box(edge, band_px + 2)
            steps = _edge_steps(resid[box], s[box], edge[box], region[box] & clean[box], band_px,
                                segment_px, min_samples)
            if len(steps):
                edges.append(_edge_entry(i, j, steps, sigma))
    return edges


def _edge_entry(i, j, steps, sigma):
    """One entry of :func:`residual_seam_steps` from its segments' steps ``(n, C)`` (ADU)."""
    adu = np.median(steps, axis=0)
    # Standard error of a median: 1.253 sigma / sqrt(n), sigma from the segments' own scatter.
    err = 1.2533 * 1.4826 * np.median(np.abs(steps - adu), axis=0) / np.sqrt(len(steps))
    z = adu / sigma
    return {"tile": i, "other": j, "step_sigma": float(z[np.argmax(np.abs(z))]),
            "step_sigma_rgb": [float(v) for v in z], "step_adu_rgb": [float(v) for v in adu],
            "step_err_sigma_rgb": [float(v) for v in err / sigma], "n_segments": int(len(steps))}


def overlap_dips(mosaic, truth, feet, block_px=64, side_px=150, order=2, min_fill=0.25, min_blocks=3):
    """The level of each pairwise overlap against the two tiles' own areas beside it, in sky sigmas.

    A feathered join spreads what two tiles disagree on over their overlap: a dip (or a bump)
    there instead of a step at an edge, which :func:`seam_steps` (straight lines either side of
    an edge, 45 px wide) may not see. The residual R is :func:`seam_steps`' (the truth scaled by
    the stars and a smooth global order-``order`` background removed, star pixels left out),
    averaged in ``block_px`` x ``block_px`` blocks separately in each part of a pair (i, j): the
    overlap (pixels in exactly those two footprints) and each tile's exclusive area (its
    footprint alone) within ``side_px`` of the overlap; a block counts in a part with at least
    ``min_fill`` of its pixels there. The dip is the median of the overlap's blocks minus the
    mean of the two sides' medians, per channel, over the sky noise per pixel
    (:func:`pixel_noise`, as :func:`residual_seam_steps`). Pairs with fewer than ``min_blocks``
    blocks in any part (corner overlaps) are left out; a smooth slope across the join cancels.

    Returns ``[{"tiles": (i, j), "dip_sigma": the worst channel's dip (signed), "dip_sigma_rgb":
    [...], "dip_adu_rgb": [...], "n_blocks": [overlap, side i, side j]}, ...]``.
    """
    resid, clean = _clean_residual(mosaic, truth, order)
    count = np.sum(feet, axis=0)
    sigma = pixel_noise(resid, clean & (count == 1))
    dips = []
    for i in range(len(feet)):
        for j in range(i + 1, len(feet)):
            both = feet[i] & feet[j] & (count == 2)
            if not both.any():
                continue
            near = distance_transform_edt(~both) <= side_px
            parts = [both & clean] + [feet[k] & (count == 1) & near & clean for k in (i, j)]
            blocks = [_block_means(resid, part, block_px, min_fill) for part in parts]
            if min(len(b) for b in blocks) < min_blocks:
                continue
            level, side_i, side_j = (np.median(b, axis=0) for b in blocks)
            adu = level - 0.5 * (side_i + side_j)
            z = adu / sigma
            dips.append({"tiles": (i, j), "dip_sigma": float(z[np.argmax(np.abs(z))]),
                         "dip_sigma_rgb": [float(v) for v in z], "dip_adu_rgb": [float(v) for v in adu],
                         "n_blocks": [len(b) for b in blocks]})
    return dips


def _block_means(resid, mask, block_px, min_fill):
    """Means of ``resid`` (H, W, C) over the ``mask`` pixels of each ``block_px`` square block that
    has at least ``min_fill`` of its pixels in ``mask``: ``(n_blocks, C)`` (the grid padded)."""
    pad = ((0, -resid.shape[0] % block_px), (0, -resid.shape[1] % block_px))
    m = np.pad(mask, pad)
    r = np.pad(np.where(mask[..., None], resid, 0.0), pad + ((0, 0),))
    nh, nw = m.shape[0] // block_px, m.shape[1] // block_px
    n = m.reshape(nh, block_px, nw, block_px).sum(axis=(1, 3))
    sums = r.reshape(nh, block_px, nw, block_px, -1).sum(axis=(1, 3), dtype=np.float64)
    keep = n >= min_fill * block_px ** 2
    return sums[keep] / n[keep][:, None]


def nebula_on_grid(dataset_root, wcs, shape):
    """The truth's extended emission alone (no stars, no sky gradient), ``(H, W, 3)`` on a grid,
    in truth units (:meth:`zemosaic_synth.SkyModel.render_rgb` of its model without gradient)."""
    import dataclasses

    model = zemosaic_synth.load_sky_model(dataset_root)
    flat = {k: [0.0, 0.0, 0.0] for k in model.gradient}
    return dataclasses.replace(model, gradient=flat).render_rgb(wcs, shape, stars=False)


def nebula_flux_ratio(mosaic, dataset_root, wcs, shape, truth=None, nebula=None, level=0.05,
                      free_level=0.005, order=2):
    """Fraction of the truth's nebula flux the mosaic holds, per channel (1.0: nothing lost).

    On the mosaic grid: the truth (:func:`truth_on_grid`) and its emission alone
    (:func:`nebula_on_grid`), both in truth units, which a mosaic holds scaled by ``a_c``
    (frame = transparency * gain * truth + pedestal). ``a_c`` comes from the stars' aperture
    fluxes, and a smooth background ``P_c`` (2-D polynomial of degree ``order``) from the
    star-free pixels of the 16x16 blocks where the nebula is under ``free_level`` of its peak in
    every channel (:func:`truth_residual`). Over the nebula region (nebula above ``level`` of its
    peak, star pixels and the surroundings of saturating stars left out) the ratio is
    ``sum(mosaic - P_c - a_c * (truth - nebula)) / (a_c * sum(nebula))``. Sky left in the mosaic
    beyond ``P_c`` (a seam, a tile's own gradient) counts as nebula gained or lost.

    Returns ``{"ratio_rgb": [...], "worst_deviation": max |ratio - 1|, "scale_rgb": [a_c],
    "n_pixels": [...]}``.
    """
    truth = truth_on_grid(dataset_root, wcs, shape) if truth is None else truth
    nebula = nebula_on_grid(dataset_root, wcs, shape) if nebula is None else nebula
    ok = np.all(np.isfinite(mosaic), axis=-1) & np.all(np.isfinite(truth), axis=-1)
    peak = nebula.reshape(-1, 3).max(axis=0)
    stars = _star_pixels(truth)
    free = _blocks((nebula < free_level * peak).all(axis=-1).astype(float)) == 1
    resid, scale = truth_residual(mosaic, truth, ok & ~stars, free, order)
    saturating = binary_dilation(np.nan_to_num(truth).max(axis=-1) >= SATURATION_SAFE, iterations=6)
    usable = ok & ~stars & ~saturating
    ratios, counts = [], []
    for c, a in enumerate(scale):
        region = usable & (nebula[..., c] > level * peak[c])
        held = resid[..., c][region] + a * nebula[..., c][region]
        ratios.append(float(np.sum(held) / (a * np.sum(nebula[..., c][region], dtype=np.float64))))
        counts.append(int(region.sum()))
    return {"ratio_rgb": ratios, "worst_deviation": float(np.max(np.abs(np.array(ratios) - 1.0))),
            "scale_rgb": [float(a) for a in scale], "n_pixels": counts}


def perfect_mosaic(mosaic, truth, seed, scale=0.95, offset=2500.0, sigma=None):
    """Return ``scale * truth + offset`` plus noise like the mosaic's, where the mosaic has data.

    The noise has the mosaic's per-channel sigma (robust, of mosaic minus truth; or ``sigma``, one
    per channel, where sky gradients left in the mosaic would inflate that, e.g. its
    :func:`pixel_noise`) and its pixel-scale correlation (white noise smoothed by a 0.7 px
    Gaussian, as two bilinear resamplings leave it).
    """
    rng = np.random.default_rng(seed)
    ok = np.all(np.isfinite(mosaic), axis=-1) & np.all(np.isfinite(truth), axis=-1)
    noise = np.stack([gaussian_filter(rng.normal(0, 1, ok.shape), 0.7) for _ in range(mosaic.shape[-1])], -1)
    if sigma is None:
        sigma = [_robust_sigma((mosaic[..., c] - truth[..., c])[ok]) for c in range(mosaic.shape[-1])]
    noise *= np.asarray(sigma, float) / noise[ok].std(axis=0)
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


def _ring_apertures(image, x, y, radius):
    """Per star and channel ``(N, C)``: the light within ``radius`` of ``(x, y)`` above the mean of
    the ring from 2 to 2 radii + 3 px around it (NaN samples of the ring left out)."""
    half = int(np.ceil(radius * 2 + 3))
    offs = np.arange(-half, half + 1)
    dist = np.hypot(offs[None, :], offs[:, None])
    inner, ring = dist <= radius, (dist >= radius * 2) & (dist <= radius * 2 + 3)
    rows = np.asarray(y, int)[:, None, None] + offs[None, :, None]
    cols = np.asarray(x, int)[:, None, None] + offs[None, None, :]
    out = np.empty((len(rows), image.shape[-1]))
    for c in range(image.shape[-1]):
        stamp = image[rows, cols, c].astype(np.float64)
        out[:, c] = (stamp[:, inner] - np.nanmean(stamp[:, ring], axis=1)[:, None]).sum(axis=1)
    return out


def star_colour_errors(mosaic, truth, scale=1, radius_px=1.5, min_peak=600.0):
    """Per isolated unsaturated star of the truth: its ``(R/G, B/G)`` on the mosaic over the truth's, minus 1.

    Measured in apertures of ``radius_px`` frame pixels (``scale`` mosaic pixels each, for a grid
    finer than the frames'): 1.5 is a star's core, where a debayer's interpolation moves the
    colours; 5 holds nearly all its light. Returns ``(N, 2)``, stars with no data left out.
    """
    region = np.all(np.isfinite(mosaic), axis=2)
    x, y = star_positions(truth, min_peak=min_peak / scale ** 2, isolation_px=16.0 * scale)
    keep = region[y, x]
    x, y = x[keep], y[keep]
    m, t = _ring_apertures(mosaic, x, y, radius_px * scale), _ring_apertures(truth, x, y, radius_px * scale)
    errors = np.column_stack([(m[:, c] / m[:, 1]) / (t[:, c] / t[:, 1]) - 1.0 for c in (0, 2)])
    return errors[np.all(np.isfinite(errors), axis=1)]
