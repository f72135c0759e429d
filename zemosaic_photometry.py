"""Tile photometry: gains and offsets between master tiles, Two-Pass gains, display white balance.

Works on arrays only (no files, no phases). The assembly resamples every tile alone onto a coarse
copy of the mosaic grid (:class:`LowResTiles`); this module compares the tiles where they overlap
and solves, for all tiles together,

* per-tile, per-channel **gains**: from the signal in the overlaps (stars and nebulosity well
  above the sky), never from sky-dominated pixels, whose level says nothing about a gain. One grey
  gain per tile, plus a per-channel colour term where the overlaps measure it precisely enough
  (below :data:`COLOUR_SIGMA_MAX`, and shrunk towards grey when it is near its noise);
  elsewhere the tile's gain stays grey, since a noisy colour term would tint the tile;
* per-tile, per-channel **offsets** that bring the skies together;
* the **Two-Pass** gain: one per tile, for every channel, from the pass-1-corrected tiles, kept at
  1 where the tiles already agree within their uncertainty;
* the **white balance** of the display products (neutral sky, stars white on average).

Every solution is a weighted least-squares fit of pairwise differences ``x_i - x_j ~ d_ij``,
anchored on the best-connected tile, then centred on the median tile (most tiles are right, so
the flux scale and the colour balance of the majority are kept). Everything is deterministic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from zemosaic_align_stack import sigma_clipped_stats

logger = logging.getLogger(__name__)

#: Largest uncertainty (1 sigma, relative) of a tile's colour term for it to be applied.
COLOUR_SIGMA_MAX = 0.012
#: Chi-square (over the colour channels, p = 0.001 for two) above which a tile's colour terms are
#: applied even when less precise than :data:`COLOUR_SIGMA_MAX`.
COLOUR_CHI2 = 13.8
#: Significance (in sigma) a Two-Pass gain needs to differ from 1.
TWO_PASS_SIGNIFICANCE = 3.0
#: Smallest Two-Pass correction applied. Pass 1 has already matched the gains from the stars at
#: full precision; the Two-Pass comparison, smoothed wider, has a systematic floor of several
#: tenths of a per cent (sky structure near tile edges), so a smaller correction is more likely
#: to move tiles apart than together.
TWO_PASS_MIN_CHANGE = 0.01
#: Smoothing of the coarse tiles before comparing them (coarse pixels): evens out small PSF and
#: sampling differences between tiles without washing the stars into the noise.
MATCH_SIGMA_COARSE_PX = 1.0
#: Pixels added around the signal so that it holds whole stars (see :func:`_signal_groups`).
APERTURE_GROW = 2
#: Width of the local background removed before comparing tiles, in smoothing widths.
BACKGROUND_SCALE = 4.0
#: A pixel counts as signal when it is this many noise sigmas above the sky in both tiles.
SIGNAL_KAPPA = 8.0
_MIN_OVERLAP = 50
_MIN_SIGNAL = 20
_JACKKNIFE_CHUNKS = 10


@dataclass
class LowResTiles:
    """Every tile resampled alone onto a coarse copy of the output grid (for photometric matching)."""

    images: list  # (h, w, C) float32 per tile, NaN outside
    weights: list  # (h, w) float32 per tile
    factor: int  # output pixels per coarse pixel

    def corrected(self, gains, offsets) -> "LowResTiles":
        """Return the tiles with ``gain * tile - offset`` applied (per tile, per channel)."""
        images = [img * np.asarray(g, np.float32) - np.asarray(o, np.float32)
                  for img, g, o in zip(self.images, gains, offsets)]
        return LowResTiles(images, self.weights, self.factor)


@dataclass
class TileMatch:
    """Photometric corrections of the tiles: co-add ``gains[k] * tile_k - offsets[k]``."""

    gains: np.ndarray  # (n, C)
    offsets: np.ndarray  # (n, C)
    colour_applied: np.ndarray  # (n,) bool: the tile's gains differ per channel


# --------------------------------------------------------------------------------------------------
# Overlaps and pairwise statistics
# --------------------------------------------------------------------------------------------------


def _overlap_pixels(low: LowResTiles, i: int, j: int):
    """Return the mask of coarse pixels where tiles i and j both have solid (>= half-max) weight."""
    wi, wj = low.weights[i], low.weights[j]
    both = (wi > 0.5 * wi.max()) & (wj > 0.5 * wj.max())
    return both & np.all(np.isfinite(low.images[i]) & np.isfinite(low.images[j]), axis=-1)


def _overlapping_pairs(low: LowResTiles, min_pixels: int = _MIN_OVERLAP):
    """Yield ``(i, j, mask)`` for every pair of tiles sharing at least ``min_pixels`` coarse pixels."""
    n = len(low.images)
    for i in range(n):
        for j in range(i + 1, n):
            both = _overlap_pixels(low, i, j)
            if int(both.sum()) >= min_pixels:
                yield i, j, both


def _smooth_nan(image2d, sigma):
    """Gaussian smoothing that ignores NaN (normalised convolution); NaN stays NaN."""
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return image2d
    valid = np.isfinite(image2d)
    num = gaussian_filter(np.where(valid, image2d, 0.0), sigma)
    den = gaussian_filter(valid.astype(np.float64), sigma)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid & (den > 0.05), num / den, np.nan)


def _pair_offsets(low: LowResTiles, gains):
    """Return pairwise ``(i, j, d_ij[C], w_ij)``: median of ``g_i*tile_i - g_j*tile_j`` in the overlap.

    ``gains`` is ``(n, C)``; the weight is ``sqrt(overlap pixels)``.
    """
    pairs = []
    for i, j, both in _overlapping_pairs(low, 20):
        diff = low.images[i][both] * gains[i] - low.images[j][both] * gains[j]
        pairs.append((i, j, np.median(diff, axis=0), np.sqrt(both.sum())))
    return pairs


def _group_ratio(x, y, bright, faint):
    """``(mean_B y - mean_F y) / (mean_B x - mean_F x)`` per column: the slope between two groups."""
    dx = x[bright].mean(axis=0) - x[faint].mean(axis=0)
    dy = y[bright].mean(axis=0) - y[faint].mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(dx > 0, dy / dx, np.nan)


def _signal_groups(x, y, ok, slope):
    """Return ``(bright, faint)`` 2-D masks: signal well above the sky in both tiles, and sky.

    The noise is measured on ``y - slope * x``, where the sky and the signal cancel and only the
    noise of the two tiles (and any gain mismatch, which makes the estimate cautious) is left.
    The signal mask is grown by :data:`APERTURE_GROW` pixels so that it holds each star's whole
    light (an aperture), not just the core above the threshold: how much of a star lies above a
    threshold depends on its PSF and sampling, which differ between tiles; its total light does not.
    """
    from scipy.ndimage import binary_dilation

    sky_x, sky_y = np.median(x[ok]), np.median(y[ok])
    noise = sigma_clipped_stats((y - slope * x)[ok])[1]
    if not noise > 0:
        return None, None
    noise_x = noise / np.sqrt(1.0 + slope**2)  # both tiles about as noisy, once scaled
    with np.errstate(invalid="ignore"):
        core = ok & (x - sky_x > SIGNAL_KAPPA * noise_x) & (y - sky_y > SIGNAL_KAPPA * slope * noise_x)
        bright = binary_dilation(core, iterations=APERTURE_GROW) & ok
        faint = ok & ~binary_dilation(bright, iterations=APERTURE_GROW) & (x <= sky_x) & (y <= sky_y)
    return bright, faint


def _jackknife_sigma(loo):
    """Jackknife standard error from leave-one-out estimates ``(K, V)``."""
    k = loo.shape[0]
    return np.sqrt((k - 1) / k * np.sum((loo - loo.mean(axis=0)) ** 2, axis=0))


def _pair_slope(x, y, ok):
    """Return ``(log s[V], sigma[V])`` with ``y ~ s * x + c`` from the signal, or None without signal.

    ``x``, ``y``: ``(h, w, V)`` smoothed values of the two tiles, valid where ``ok``;
    plane 0 is the luminance, which picks the pixels; the other columns (channels) are measured
    on the same pixels. ``sigma[0]`` is the uncertainty of the luminance slope, ``sigma[1:]`` that
    of each channel's slope *relative to the luminance's* (their colour term): measured on the
    same pixels, most of their errors cancel in the ratio.

    The slope is the ratio of the signal (pixels at least :data:`SIGNAL_KAPPA` noise sigmas above
    the sky in *both* tiles: selecting on both keeps the noise of either from biasing the ratio)
    to the sky (the faint half of the pixels): a group estimator, unaffected by the sky level and,
    unlike a fit through all pixels, not dominated by sky pixels that carry no gain information.
    Three rounds, each slope sharpening the next one's noise estimate; the first is the ratio of
    the two tiles' brightest percent above their medians, good enough to find the signal. The
    sigmas are a jackknife over contiguous chunks of the signal, so correlated pixels are not
    counted as independent.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    lx, ly = x[..., 0], y[..., 0]
    top_x = np.percentile(lx[ok], 99) - np.median(lx[ok])
    top_y = np.percentile(ly[ok], 99) - np.median(ly[ok])
    slope = top_y / top_x if top_x > 0 and top_y > 0 else 1.0
    for _ in range(3):
        bright, faint = _signal_groups(lx, ly, ok, slope)
        if bright is None or bright.sum() < _MIN_SIGNAL or faint.sum() < _MIN_SIGNAL:
            return None
        slope = _group_ratio(lx, ly, bright, faint)
        if not slope > 0:
            return None
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    bright, faint = bright.ravel(), faint.ravel()
    slopes = _group_ratio(x, y, bright, faint)
    if not np.all(slopes > 0):
        return None
    loo = []
    for chunk in np.array_split(np.flatnonzero(bright), _JACKKNIFE_CHUNKS):
        keep = bright.copy()
        keep[chunk] = False
        loo.append(np.log(_group_ratio(x, y, keep, faint)))
    loo = np.array(loo)
    loo[:, 1:] -= loo[:, :1]  # colour terms: each channel against the luminance
    sigma = _jackknife_sigma(loo)
    if not np.all(np.isfinite(sigma)):
        return None
    return np.log(slopes), np.maximum(sigma, 1e-6)


def _overlap_detail(plane, both, sigma_coarse):
    """Return ``plane`` on the overlap, smoothed by ``sigma_coarse``, minus its local background.

    Both tiles are smoothed over the same support (their overlap only): a tile smoothed over its
    own footprint would average towards its own interior and bias the comparison. The background
    (a Gaussian :data:`BACKGROUND_SCALE` times wider) goes because master tiles carry sky steps
    and gradients near their edges, where the overlaps are: against a signal of a few tens of ADU,
    a sky difference of 10 ADU that varies across the overlap would bias the gain by tens of
    per cent. Stars and small-scale nebulosity stay.
    """
    masked = np.where(both, plane, np.nan)
    smooth = _smooth_nan(masked, sigma_coarse)
    return smooth - _smooth_nan(masked, BACKGROUND_SCALE * max(sigma_coarse, 1.0))


def _pair_gains(low: LowResTiles, sigma_coarse: float, per_channel: bool):
    """Return pairwise ``(i, j, log s_ij[V], sigma_ij[V])`` with ``tile_i ~ s_ij * tile_j``.

    V = 1 (the luminance, mean of the channels) or, with ``per_channel``, 1 + C (the luminance
    then each channel); see :func:`_pair_slope` for what the sigmas mean.
    """
    pairs = []
    for i, j, both in _overlapping_pairs(low):
        columns = []
        for tile in (low.images[i], low.images[j]):
            planes = [np.mean(tile, axis=-1)]
            if per_channel:
                planes += [tile[..., c] for c in range(tile.shape[-1])]
            columns.append(np.stack([_overlap_detail(p, both, sigma_coarse) for p in planes], axis=-1))
        ok = both & np.all(np.isfinite(columns[0]) & np.isfinite(columns[1]), axis=-1)
        found = _pair_slope(columns[1], columns[0], ok) if ok.sum() >= _MIN_OVERLAP else None
        if found is not None:
            pairs.append((i, j, found[0], found[1]))
    return pairs


# --------------------------------------------------------------------------------------------------
# Joint solutions
# --------------------------------------------------------------------------------------------------


def _best_connected(n_tiles, pairs) -> int:
    """Return the tile with the largest total overlap weight (the anchor of the solutions)."""
    links = np.zeros(n_tiles)
    for i, j, _d, w in pairs:
        links[i] += np.max(np.where(np.isfinite(w), w, 0.0))
        links[j] += np.max(np.where(np.isfinite(w), w, 0.0))
    return int(np.argmax(links))


def _solve_pairwise(n_tiles, pairs, n_values, anchor):
    """Return ``(x, sigma)``, each ``(n_tiles, n_values)``, with ``x_i - x_j ~ d_ij`` and x_anchor = 0.

    ``pairs`` hold ``(i, j, d_ij[V], w_ij)``, w a weight (1/sigma) per value or one for all.
    Weighted least squares; two Huber re-weighting rounds damp an overlap whose statistic was
    pulled by a bad region. ``sigma`` is the formal uncertainty of x relative to the anchor. Tiles
    not connected to the anchor through overlaps keep 0 (sigma inf).
    """
    solution = np.zeros((n_tiles, n_values))
    sigma = np.full((n_tiles, n_values), np.inf)
    if not pairs:
        return solution, sigma
    a = np.zeros((len(pairs) + 1, n_tiles))
    for k, (i, j, _d, _w) in enumerate(pairs):
        a[k, i], a[k, j] = 1.0, -1.0
    a[-1, anchor] = 1.0
    weights = np.array([np.broadcast_to(w, (n_values,)) for *_x, w in pairs], dtype=float)
    for c in range(n_values):
        base_w = np.append(np.where(np.isfinite(weights[:, c]), weights[:, c], 0.0), 1e6)
        b = np.array([d[c] for _i, _j, d, _w in pairs] + [0.0])
        w = base_w.copy()
        for _ in range(3):
            sol, *_ = np.linalg.lstsq(a * w[:, None], b * w, rcond=None)
            resid = np.abs(a @ sol - b)[:-1] * base_w[:-1]  # in units of each pair's sigma
            huber = np.minimum(1.0, 2.0 / np.maximum(resid, 1e-12))
            w = np.append(base_w[:-1] * huber, base_w[-1])
        solution[:, c] = sol
        sigma[:, c] = _formal_sigma(a, w)
    connected = _connected_to(anchor, n_tiles, [(i, j) for i, j, *_x in pairs])
    solution[~connected] = 0.0
    sigma[~connected] = np.inf
    return solution, sigma


def _anchor_free(sigma, anchor):
    """Return ``sigma`` with the anchor's (pinned to ~0) replaced by the median of the others'.

    The solution is centred on the median tile afterwards, so the anchor is known about as well
    as a typical tile, not perfectly.
    """
    sigma = sigma.copy()
    others = np.delete(sigma, anchor, axis=0)
    finite = np.isfinite(others)
    if finite.any():
        sigma[anchor] = np.median(np.where(finite, others, np.nan), axis=0) if finite.all() else \
            np.nanmax(np.where(finite, others, np.nan), axis=0)
    return sigma


def _formal_sigma(a, w):
    """Standard errors of a weighted least-squares solution with design ``a`` and weights ``w``."""
    aw = a * w[:, None]
    cov = np.linalg.pinv(aw.T @ aw)
    return np.sqrt(np.clip(np.diag(cov), 0.0, None))


def _connected_to(anchor, n_tiles, edges):
    """Boolean mask of the tiles linked to ``anchor`` through ``edges``."""
    seen = np.zeros(n_tiles, bool)
    seen[anchor] = True
    changed = True
    while changed:
        changed = False
        for i, j in edges:
            if seen[i] != seen[j]:
                seen[i] = seen[j] = changed = True
    return seen


def background_offsets(low: LowResTiles, gains=None) -> np.ndarray:
    """Return per-tile, per-channel offsets to subtract so tile skies agree in the overlaps.

    ``gains`` (``(n,)`` or ``(n, C)``) are applied to the tiles before comparing them. Medians of
    the overlaps, robust least squares anchored on the best-connected tile, offsets centred on
    the median tile.
    """
    n = len(low.images)
    n_ch = low.images[0].shape[-1]
    gains = np.ones((n, n_ch)) if gains is None else np.broadcast_to(
        np.asarray(gains, float).reshape(n, -1), (n, n_ch))
    pairs = _pair_offsets(low, gains)
    offsets, _sigma = _solve_pairwise(n, pairs, n_ch, _best_connected(n, pairs))
    offsets -= np.median(offsets, axis=0)
    logger.debug("Background offsets per tile: %s", np.round(offsets, 2).tolist())
    return offsets


def _centred(log_values, sigma):
    """Centre log-gains on the median of the tiles that have a solution (finite sigma)."""
    known = np.all(np.isfinite(sigma), axis=1)
    if known.any():
        log_values = log_values - np.median(log_values[known], axis=0)
    log_values[~known] = 0.0
    return log_values


def tile_gains(low: LowResTiles, per_channel: bool = True):
    """Return ``(gains (n, C), colour_applied (n,))`` that even out tile brightness and colour.

    The grey gain of each tile comes from the luminance of the overlaps; the colour term of each
    channel from the channel's ratio to the luminance in the same overlaps. A colour term is kept
    only where its uncertainty is below :data:`COLOUR_SIGMA_MAX`; the other tiles stay grey.
    """
    n = len(low.images)
    n_ch = low.images[0].shape[-1]
    pairs = _pair_gains(low, MATCH_SIGMA_COARSE_PX, per_channel and n_ch > 1)
    anchor = _best_connected(n, [(i, j, d, 1 / s[0]) for i, j, d, s in pairs])
    grey_pairs = [(i, j, d[:1], 1 / s[:1]) for i, j, d, s in pairs]
    log_grey, sig_grey = _solve_pairwise(n, grey_pairs, 1, anchor)
    log_g = -_centred(log_grey, sig_grey)  # tile_i ~ s * tile_j: tile i needs 1/s
    gains = np.repeat(np.exp(log_g), n_ch, axis=1)
    colour_applied = np.zeros(n, bool)
    if per_channel and n_ch > 1 and pairs:
        colour = _colour_terms(n, pairs, anchor)
        colour_applied = np.any(colour != 0, axis=1)
        gains = gains * np.exp(colour)
    logger.debug("Tile gains (per channel): %s", np.round(gains, 4).tolist())
    return gains, colour_applied


def _colour_terms(n, pairs, anchor):
    """Per-tile, per-channel log colour terms (each channel's gain over the luminance's; 0 where imprecise).

    A tile whose colour terms are less precise than :data:`COLOUR_SIGMA_MAX` stays grey.
    """
    colour_pairs = [(i, j, d[1:] - d[0], 1 / s[1:]) for i, j, d, s in pairs]
    n_ch = len(colour_pairs[0][2])
    log_c, sig_c = _solve_pairwise(n, colour_pairs, n_ch, anchor)
    sig_c = _anchor_free(sig_c, anchor)
    # Not centred over channels: grey + colour is each channel's own gain ratio (the luminance
    # of a coloured object moves with the channels' gains, so grey is not their mean).
    log_c = -_centred(log_c, sig_c)
    precise = np.all(sig_c < COLOUR_SIGMA_MAX, axis=1)
    # A less precise tile still gets a colour change it measures beyond doubt (another night's
    # colour balance: ten per cent and more, against a few per cent of noise).
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = np.sum((log_c / sig_c) ** 2, axis=1)
    significant = np.isfinite(chi2) & (chi2 > COLOUR_CHI2) & np.all(np.isfinite(sig_c), axis=1)
    logger.debug("Colour terms %s, sigma %s", np.round(log_c, 4).tolist(), np.round(sig_c, 4).tolist())
    # Shrink each term by k^2 / (k^2 + sigma^2): a term at the noise level would only swap the
    # tile's colour error for noise, a large measured term is applied in full.
    shrunk = log_c * log_c**2 / (log_c**2 + sig_c**2)
    return np.where((precise | significant)[:, None], shrunk, 0.0)


def match_tiles(low: LowResTiles, match_gains: bool = True, match_offsets: bool = True) -> TileMatch:
    """Solve gains (from the overlaps' signal) and then offsets (sky) of all tiles together."""
    n = len(low.images)
    n_ch = low.images[0].shape[-1]
    gains, colour = tile_gains(low) if match_gains else (np.ones((n, n_ch)), np.zeros(n, bool))
    offsets = background_offsets(low, gains) if match_offsets else np.zeros((n, n_ch))
    return TileMatch(gains, offsets, colour)


def two_pass_gains(low: LowResTiles, match: TileMatch, sigma_px: float, gain_clip) -> np.ndarray:
    """Return one Two-Pass gain per tile (the same for every channel) from the pass-1 tiles.

    The pass-1 corrections are applied first; the luminance ratios of the overlaps (smoothed by
    ``sigma_px`` output pixels) are solved jointly. A gain that is not significant (within
    :data:`TWO_PASS_SIGNIFICANCE` sigmas or :data:`TWO_PASS_MIN_CHANGE` of 1) stays 1, so tiles that already agree are not moved;
    if the gains would not reduce the disagreement of the overlaps (chi-square), all stay 1.
    Clipped to ``gain_clip``.
    """
    n = len(low.images)
    shifted = low.corrected(match.gains, match.offsets)
    pairs = _pair_gains(shifted, max(sigma_px / low.factor, MATCH_SIGMA_COARSE_PX), False)
    gains = np.ones(n)
    if not pairs:
        return gains
    weighted = [(i, j, d, 1 / s) for i, j, d, s in pairs]
    anchor = _best_connected(n, weighted)
    log_s, sigma = _solve_pairwise(n, weighted, 1, anchor)
    sigma = _anchor_free(sigma, anchor)
    log_g = -_centred(log_s, sigma)[:, 0]
    negligible = np.abs(log_g) < np.maximum(TWO_PASS_SIGNIFICANCE * sigma[:, 0], TWO_PASS_MIN_CHANGE)
    log_g[negligible] = 0.0
    log_g = np.log(np.clip(np.exp(log_g), gain_clip[0], gain_clip[1]))
    if _chi2(pairs, log_g) >= _chi2(pairs, np.zeros(n)):
        return gains
    return np.exp(log_g)


def _chi2(pairs, log_g):
    """Disagreement of the overlaps after gains ``exp(log_g)``: sum of squared pair residuals."""
    return float(sum(((d[0] + log_g[i] - log_g[j]) / s[0]) ** 2 for i, j, d, s in pairs))


# --------------------------------------------------------------------------------------------------
# White balance for display
# --------------------------------------------------------------------------------------------------


@dataclass
class WhiteBalance:
    """Display white balance: ``(image - sky) * gains``; gains normalised to G = 1."""

    gains: np.ndarray  # (C,)
    sky: np.ndarray  # (C,)
    source: str  # "stars", "bright pixels" or "none"


def white_balance(image_hwc, star_kappa: float = 20.0, smooth_px: float = 8.0) -> WhiteBalance:
    """Measure the display white balance of a linear RGB image: neutral sky, stars white on average.

    The sky is the per-channel median. Stars are pixels standing out of their surroundings (the
    image minus a ``smooth_px`` Gaussian, so nebulosity does not count as star light) by
    ``star_kappa`` noise sigmas in every channel, below 80 % of each channel's maximum (saturated
    cores have lost their colour). Each channel's gain makes the median star pixel grey. With
    fewer than 50 star pixels the brightest 1 % of the sky-subtracted pixels stand in.
    """
    image = np.asarray(image_hwc, np.float32)
    n_ch = image.shape[-1]
    if n_ch < 3 or not np.isfinite(image).any():
        return WhiteBalance(np.ones(n_ch), np.zeros(n_ch), "none")
    sample = image[::2, ::2].reshape(-1, n_ch)
    sky = np.nanmedian(sample, axis=0)
    noise = np.array([sigma_clipped_stats(sample[:, c])[1] for c in range(n_ch)])
    above = image - sky
    detail = np.stack([image[..., c] - _smooth_nan(image[..., c], smooth_px) for c in range(n_ch)], -1)
    peak = np.nanmax(image, axis=(0, 1))
    with np.errstate(invalid="ignore"):
        stars = np.all(detail > star_kappa * noise, axis=-1) & np.all(image < 0.8 * peak, axis=-1)
    source = "stars"
    if stars.sum() < 50:
        lum = np.mean(above, axis=-1)
        finite = np.isfinite(lum)
        stars = finite & (lum >= np.percentile(lum[finite], 99)) & np.all(above > 0, axis=-1)
        source = "bright pixels"
        detail = above
    if stars.sum() < 10:
        return WhiteBalance(np.ones(n_ch), sky, "none")
    flux = detail[stars]
    share = np.median(flux / flux.mean(axis=1, keepdims=True), axis=0)
    gains = share[1] / share if n_ch == 3 else 1.0 / share
    logger.info("Display white balance from %d %s: gains R,G,B = %s", int(stars.sum()), source,
                ", ".join(f"{g:.4f}" for g in gains))
    return WhiteBalance(gains.astype(np.float64), sky.astype(np.float64), source)
