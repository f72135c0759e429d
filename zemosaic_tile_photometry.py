"""Photometry of master tiles: gains and offsets from their overlaps, and the Two-Pass gains.

Works on arrays only (no files, no phases). The assembly resamples every tile alone onto a
coarse copy of the mosaic grid (:class:`LowResTiles`); this module compares the tiles where they
overlap and solves, for all tiles together,

* per-tile, per-channel **gains**: from the signal in the overlaps, compared at full resolution
  on block means (:func:`block_pair_slopes`; on the coarse grid, from stars and nebulosity well
  above the sky, where an overlap is too small), never from sky-dominated pixels alone, whose
  level says nothing about a gain. One grey gain per tile, plus a per-channel colour term where
  the overlaps measure one beyond doubt (another night's colour balance; shrunk towards grey by
  how far it stands above its noise); elsewhere the tile's gain stays grey, since a colour term
  at the level of its noise would only tint the tile;
* per-tile, per-channel **background models** (:mod:`zemosaic_background`: polynomials solved from
  the tiles' differences in the overlaps) that bring the skies and their gradients together;
* the **Two-Pass** gain: one per tile, for every channel, from the pass-1-corrected tiles, each
  overlap measured in cells along it above each tile's own sky plane (so neither a gradient nor an
  artefact in one tile reads as a gain), kept at 1 where the tiles already agree within their
  uncertainty or within 1 %, or where most of a tile's overlap area does not support the move.

Every solution is a weighted least-squares fit of pairwise differences ``x_i - x_j ~ d_ij``,
anchored on the best-connected tile, then centred on the median tile (most tiles are right, so
the flux scale and the colour balance of the majority are kept). Everything is deterministic.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

import zemosaic_background as zbg
from zemosaic_utils import block_mean, mad_sigma, sigma_clipped_stats, smooth_nan

logger = logging.getLogger(__name__)

#: Chi-square (over the colour channels, p = 0.001 for two) above which a tile's colour terms are
#: applied. Below it they are noise, and applying them would tint the tiles of one night.
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
#: Side (output pixels) of the blocks two tiles are compared on at full resolution: block means
#: keep each star's flux whatever the PSF of either tile, and average the noise down.
BLOCK_PX = 16
#: Fewest blocks an overlap needs for the full-resolution comparison.
_MIN_BLOCKS = 30
_MIN_SIGNAL = 20
_JACKKNIFE_CHUNKS = 10
#: Blocks across an overlap Two-Pass compares it on (see :func:`_two_pass_block_px`).
TWO_PASS_BLOCKS_ACROSS = 8
_TWO_PASS_MIN_BLOCK_PX = 4
#: A cell measuring its ratio less precisely than this holds too little signal to count.
_CELL_MAX_SIGMA = 0.02
#: Uncertainty of a cell's ratio that its formal sigma misses (sky structure, sky gradients, PSF
#: and sampling differences between the tiles), added to it in quadrature so that the errors of
#: the informative cells, whose formal sigmas are far smaller, match their sigmas.
_CELL_SYSTEMATIC = 0.01


# --------------------------------------------------------------------------------------------------
# Tiles: gains and offsets from the overlaps
# --------------------------------------------------------------------------------------------------


@dataclass
class LowResTiles:
    """Every tile resampled alone onto a coarse copy of the output grid (for photometric matching)."""

    images: list  # (h, w, C) float32 per tile, NaN outside
    weights: list  # (h, w) float32 per tile
    factor: int  # output pixels per coarse pixel

    @property
    def shape_out(self) -> tuple:
        """The output grid's shape these coarse pixels cover (full-resolution pixels)."""
        h, w = self.images[0].shape[:2]
        return h * self.factor, w * self.factor

    def centres(self) -> tuple:
        """Return the ``(y, x)`` output-grid pixel coordinates ``(h, w)`` of the coarse pixels' centres."""
        h, w = self.images[0].shape[:2]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        centre = (self.factor - 1) / 2.0
        return yy * self.factor + centre, xx * self.factor + centre

    def corrected(self, gains, backgrounds: zbg.BackgroundModels) -> "LowResTiles":
        """Return the tiles with ``gain * tile - background`` applied (per tile, per channel)."""
        y, x = self.centres()
        images = [(img * np.asarray(g, np.float32) - backgrounds.values(k, y, x)).astype(np.float32)
                  for k, (img, g) in enumerate(zip(self.images, gains))]
        return LowResTiles(images, self.weights, self.factor)


@dataclass
class TileMatch:
    """Photometric corrections of the tiles: co-add ``gains[k] * tile_k - background_k``.

    ``backgrounds`` are on the output grid's pixels (full resolution).
    """

    gains: np.ndarray  # (n, C)
    backgrounds: zbg.BackgroundModels
    colour_applied: np.ndarray  # (n,) bool: the tile's gains differ per channel

    @classmethod
    def identity(cls, n: int, n_ch: int, shape_out) -> "TileMatch":
        """Return the corrections that change nothing."""
        return cls(np.ones((n, n_ch)), zbg.BackgroundModels.zeros(n, n_ch, 0, shape_out), np.zeros(n, bool))


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






def overlap_widths(low: LowResTiles) -> np.ndarray:
    """Return the ``(n,)`` width in output pixels of each tile's narrowest overlap with another (inf: none).

    An overlap's width is twice the largest distance of its pixels from its edge: the width of a
    strip, the shorter side of a rectangle.
    """
    from scipy.ndimage import distance_transform_edt

    widths = np.full(len(low.images), np.inf)
    for i, j, both in _overlapping_pairs(low):
        width = 2.0 * float(distance_transform_edt(np.pad(both, 1)).max()) * low.factor
        widths[i], widths[j] = min(widths[i], width), min(widths[j], width)
    return widths


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
    smooth = smooth_nan(masked, sigma_coarse)
    return smooth - smooth_nan(masked, BACKGROUND_SCALE * max(sigma_coarse, 1.0))


def _robust_plane_slope(x, y, rows, cols, start: float | None = None):
    """Return the slope ``s`` of ``y ~ s * x + c + a * row + b * col`` and the kept samples, or None.

    Least squares, starting from ``start`` (a slope known to be close) or else from the ratio of
    the brightest fifth's excess over the median in both (a slope no noise or outlier can throw
    far), with samples more than 4 robust sigmas off the fitted plane dropped until the set is
    stable. The plane absorbs the sky steps and gradients master tiles carry near their edges.
    """
    if start is None:
        dx, dy = x - np.median(x), y - np.median(y)
        top = (dx + dy) >= np.percentile(dx + dy, 80)
        if not (dx[top].sum() > 0 and dy[top].sum() > 0):
            return None
        start = dy[top].sum() / dx[top].sum()
    design = np.column_stack([x, np.ones_like(x), rows, cols])
    resid = y - start * x
    keep = np.abs(resid - np.median(resid)) <= 4.0 * mad_sigma(resid)
    for _ in range(10):
        if keep.sum() < _MIN_BLOCKS:
            return None
        coef, *_ = np.linalg.lstsq(design[keep], y[keep], rcond=None)
        resid = y - design @ coef
        new_keep = np.abs(resid) <= 4.0 * max(float(mad_sigma(resid[keep])), 1e-12)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return (float(coef[0]), keep) if coef[0] > 0 else None


def block_pair_slopes(image_i, image_j):
    """Return ``(log s[V], sigma[V])`` with ``tile_i ~ s * tile_j`` from full-resolution images, or None.

    ``image_i``/``image_j`` are ``(H, W, C)`` on the same grid (the box of their overlap, NaN where
    a tile has no data). V = 1 + C: the luminance (mean of the channels), then each channel, as
    :func:`_pair_slope` returns them (``sigma[1:]`` for each channel's slope relative to the
    luminance's). Each is a robust plane fit of :data:`BLOCK_PX` block means
    (:func:`_robust_plane_slope`); the sigmas are a jackknife over ten contiguous sets of blocks.
    Block means at full resolution keep each star's whole flux whatever the PSF of either tile,
    so this measures the per-channel ratio more precisely than the coarse-grid statistic of
    :func:`_pair_slope`, which serves where an overlap holds too few blocks.
    """
    bi, bj = (block_mean(image, BLOCK_PX, full_blocks_only=True) for image in (image_i, image_j))
    ok = np.all(np.isfinite(bi) & np.isfinite(bj), axis=-1)
    if ok.sum() < _MIN_BLOCKS:
        return None
    rows, cols = (v.astype(np.float64) / 10.0 for v in np.nonzero(ok))
    x = np.column_stack([bj[ok].mean(axis=-1), bj[ok]]).astype(np.float64)
    y = np.column_stack([bi[ok].mean(axis=-1), bi[ok]]).astype(np.float64)
    fits = [_robust_plane_slope(x[:, v], y[:, v], rows, cols) for v in range(x.shape[1])]
    if any(f is None for f in fits):
        return None
    slopes = np.log([f[0] for f in fits])
    loo = []
    for chunk in np.array_split(np.arange(x.shape[0]), _JACKKNIFE_CHUNKS):
        keep = np.ones(x.shape[0], bool)
        keep[chunk] = False
        found = [_robust_plane_slope(x[keep, v], y[keep, v], rows[keep], cols[keep]) for v in range(x.shape[1])]
        if any(f is None for f in found):
            return None
        loo.append(np.log([f[0] for f in found]))
    loo = np.array(loo)
    loo[:, 1:] -= loo[:, :1]
    sigma = _jackknife_sigma(loo)
    return (slopes, np.maximum(sigma, 1e-6)) if np.all(np.isfinite(sigma)) else None


def _pair_gains(low: LowResTiles, sigma_coarse: float, per_channel: bool, full_resolution=None):
    """Return pairwise ``(i, j, log s_ij[V], sigma_ij[V])`` with ``tile_i ~ s_ij * tile_j``.

    V = 1 (the luminance, mean of the channels) or, with ``per_channel``, 1 + C (the luminance
    then each channel); see :func:`_pair_slope` for what the sigmas mean. ``full_resolution``, a
    function of ``(i, j, overlap mask on the coarse grid)`` returning ``((y0, x0), (tile i, tile j))``:
    both tiles at full resolution on the box of their overlap whose first output pixel is
    ``(y0, x0)``, lets each pair be measured by
    :func:`block_pair_slopes`; the coarse grid serves where that finds too few blocks.
    """
    pairs = []
    for i, j, both in _overlapping_pairs(low):
        if full_resolution is not None and per_channel:
            found = block_pair_slopes(*full_resolution(i, j, both)[1])
            if found is not None:
                pairs.append((i, j, found[0], found[1]))
                continue
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


#: Coarse pixels the tiles' background models are solved on, at most (a low-order model needs few).
_BACKGROUND_BLOCKS = 40_000


def background_models(low: LowResTiles, gains=None, order: int = 1) -> zbg.BackgroundModels:
    """Return the tiles' background models (output-grid pixels) that make their skies agree in the overlaps.

    ``gains`` (``(n,)`` or ``(n, C)``) are applied to the tiles before comparing them. Solved from
    the coarse pixels where two or more tiles have solid coverage (half their peak or more), each
    tile weighted by its coverage there (:func:`zemosaic_background.solve_models`).
    """
    n = len(low.images)
    n_ch = low.images[0].shape[-1]
    gains = np.ones((n, n_ch)) if gains is None else np.broadcast_to(
        np.asarray(gains, float).reshape(n, -1), (n, n_ch))
    solid = [(w > 0.5 * w.max()) & np.all(np.isfinite(img), axis=-1) for img, w in zip(low.images, low.weights)]
    shared = np.sum(solid, axis=0) >= 2
    step = max(1, int(np.ceil(np.sqrt(shared.sum() / _BACKGROUND_BLOCKS))))
    keep = np.zeros_like(shared)
    keep[::step, ::step] = shared[::step, ::step]
    y, x = (c[keep] for c in low.centres())
    levels = np.stack([np.where(ok[keep][:, None], img[keep] * g, np.nan)
                       for img, ok, g in zip(low.images, solid, gains)], axis=1)
    weights = np.stack([np.where(ok[keep], w[keep], 0.0) for ok, w in zip(solid, low.weights)], axis=1)
    models = zbg.solve_models(zbg.BlockLevels(levels, y, x, weights), order, low.shape_out)
    logger.debug("Tile backgrounds at the grid centre: %s", np.round(models.centre_values(), 2).tolist())
    return models


def _centred(log_values, sigma):
    """Centre log-gains on the median of the tiles that have a solution (finite sigma)."""
    known = np.all(np.isfinite(sigma), axis=1)
    if known.any():
        log_values = log_values - np.median(log_values[known], axis=0)
    log_values[~known] = 0.0
    return log_values


def tile_gains(low: LowResTiles, per_channel: bool = True, full_resolution=None):
    """Return ``(gains (n, C), colour_applied (n,))`` that even out tile brightness and colour.

    The grey gain of each tile comes from the luminance of the overlaps; the colour term of each
    channel from the channel's ratio to the luminance in the same overlaps, applied where it is
    significant (:func:`_colour_terms`); the other tiles stay grey. ``full_resolution``: see
    :func:`_pair_gains`.
    """
    n = len(low.images)
    n_ch = low.images[0].shape[-1]
    pairs = _pair_gains(low, MATCH_SIGMA_COARSE_PX, per_channel and n_ch > 1, full_resolution)
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
    """Per-tile, per-channel log colour terms (each channel's gain over the luminance's; 0 where not significant).

    A tile whose colour terms are not significant together (chi-square :data:`COLOUR_CHI2`) stays
    grey.
    """
    colour_pairs = [(i, j, d[1:] - d[0], 1 / s[1:]) for i, j, d, s in pairs]
    n_ch = len(colour_pairs[0][2])
    log_c, sig_c = _solve_pairwise(n, colour_pairs, n_ch, anchor)
    sig_c = _anchor_free(sig_c, anchor)
    # Not centred over channels: grey + colour is each channel's own gain ratio (the luminance
    # of a coloured object moves with the channels' gains, so grey is not their mean).
    log_c = -_centred(log_c, sig_c)
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = np.sum((log_c / sig_c) ** 2, axis=1)
    significant = np.isfinite(chi2) & (chi2 > COLOUR_CHI2) & np.all(np.isfinite(sig_c), axis=1)
    logger.debug("Colour terms %s, sigma %s", np.round(log_c, 4).tolist(), np.round(sig_c, 4).tolist())
    # Shrink a tile's terms together by 1 - C / chi2: a colour barely above its noise is damped,
    # a large one applied almost in full. One factor for all channels keeps the ratios between
    # them: a shrink per channel (by its own k^2 / (k^2 + sigma^2)) would damp an imprecise
    # channel's term more than the others' and so move the tile's R/G and B/G.
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = np.clip(1.0 - log_c.shape[1] / chi2, 0.0, 1.0)
    return np.where(significant[:, None], log_c * shrink[:, None], 0.0)


def match_tiles(low: LowResTiles, match_gains: bool = True, match_backgrounds: bool = True,
                full_resolution=None, order: int = 1) -> TileMatch:
    """Solve gains (from the overlaps' signal) and then background models of ``order`` of all tiles together.

    ``full_resolution`` (see :func:`_pair_gains`) lets the gains be measured at full resolution.
    """
    n = len(low.images)
    n_ch = low.images[0].shape[-1]
    gains, colour = tile_gains(low, True, full_resolution) if match_gains else (np.ones((n, n_ch)), np.zeros(n, bool))
    backgrounds = background_models(low, gains, order) if match_backgrounds else \
        zbg.BackgroundModels.zeros(n, n_ch, order, low.shape_out)
    return TileMatch(gains, backgrounds, colour)


def two_pass_gains(low: LowResTiles, match: TileMatch, sigma_px: float, gain_clip,
                   full_resolution=None) -> np.ndarray:
    """Return one Two-Pass gain per tile (the same for every channel) from the pass-1 tiles.

    The pass-1 corrections are applied first. Each overlap is measured in cells
    (:func:`overlap_cell_ratios`: at full resolution through ``full_resolution``, as for
    :func:`_pair_gains`, else on the coarse grid; on blocks no wider than ``sigma_px`` output
    pixels); its luminance ratio is the mean of the cells that agree (:func:`_pair_ratio`), and
    the ratios are solved jointly. A tile keeps gain 1 when its gain is not significant (within
    :data:`TWO_PASS_SIGNIFICANCE` sigmas or :data:`TWO_PASS_MIN_CHANGE` of 1), when it agrees
    with every neighbour within :data:`TWO_PASS_MIN_CHANGE`, or when most of its overlap area
    does not support the move (:func:`_supported_moves`); if the gains would not reduce the
    disagreement of the overlaps (chi-square), all stay 1. Clipped to ``gain_clip``.
    """
    n = len(low.images)
    overlaps = _two_pass_overlaps(low, match, sigma_px, full_resolution)
    pairs = _two_pass_pairs(overlaps)
    gains = np.ones(n)
    if not pairs:
        return gains
    weighted = [(i, j, d, 1 / s) for i, j, d, s in pairs]
    anchor = _best_connected(n, weighted)
    log_s, sigma = _solve_pairwise(n, weighted, 1, anchor)
    sigma = _anchor_free(sigma, anchor)
    log_g = -_centred(log_s, sigma)[:, 0]
    negligible = np.abs(log_g) < np.maximum(TWO_PASS_SIGNIFICANCE * sigma[:, 0], TWO_PASS_MIN_CHANGE)
    log_g[negligible | _agreeing_tiles(n, pairs)] = 0.0
    log_g[~_supported_moves(n, overlaps, log_g)] = 0.0
    log_g = np.log(np.clip(np.exp(log_g), gain_clip[0], gain_clip[1]))
    if _chi2(pairs, log_g) >= _chi2(pairs, np.zeros(n)):
        return gains
    return np.exp(log_g)


def _two_pass_overlaps(low: LowResTiles, match: TileMatch, sigma_px: float, full_resolution):
    """Return ``(i, j, cells)`` for every overlap of the pass-1-corrected tiles measured in cells.

    Full resolution first; the coarse grid (the same estimator, on its overlap pixels only) where
    the full-resolution overlap holds too few blocks or none is given.
    """
    shifted = low.corrected(match.gains, match.backgrounds)
    overlaps = []
    for i, j, both in _overlapping_pairs(shifted):
        rows, cols = np.nonzero(both)
        block_px = _two_pass_block_px(low.factor * min(np.ptp(rows) + 1, np.ptp(cols) + 1), sigma_px)
        cells = None
        if full_resolution is not None:
            (y0, x0), images = full_resolution(i, j, both)
            cells = overlap_cell_ratios(*(image * np.asarray(match.gains[k], np.float32)
                                          - match.backgrounds.select([k]).rows(y0, y0 + image.shape[0], image.shape[1],
                                                                               x0=x0)[0]
                                          for image, k in zip(images, (i, j))), block_px)
        if cells is None:
            coarse = (np.where(both[..., None], shifted.images[k], np.nan) for k in (i, j))
            cells = overlap_cell_ratios(*coarse, max(1, round(block_px / low.factor)), low.factor**2)
        if cells is not None:
            overlaps.append((i, j, cells))
    return overlaps


def _two_pass_pairs(overlaps):
    """Return ``(i, j, log s_ij[1], sigma_ij[1])`` of the overlaps whose cells agree on a ratio."""
    pairs = []
    for i, j, cells in overlaps:
        found = _pair_ratio(cells)
        if found is not None:
            pairs.append((i, j, np.array([found[0]]), np.array([found[1]])))
    logger.debug("[TwoPass] overlap ratios: %s",
                 [(i, j, round(float(np.exp(d[0])), 4), round(float(s[0]), 4)) for i, j, d, s in pairs])
    return pairs


def _two_pass_block_px(across_px: float, sigma_px: float) -> int:
    """Block side (output pixels) Two-Pass compares an overlap ``across_px`` wide on.

    :data:`TWO_PASS_BLOCKS_ACROSS` blocks across the overlap, so that its cells hold enough blocks
    for a plane fit, and no wider than the Two-Pass smoothing radius; never below
    :data:`_TWO_PASS_MIN_BLOCK_PX`: smaller blocks split stars, and how a star's light divides
    between blocks depends on the PSF, which differs between tiles.
    """
    return int(max(_TWO_PASS_MIN_BLOCK_PX, min(across_px // TWO_PASS_BLOCKS_ACROSS, sigma_px)))


@dataclass
class CellRatios:
    """Luminance ratios ``tile_i ~ s * tile_j`` measured alone in each sub-area (cell) of one overlap."""

    log_s: np.ndarray  # (K,)
    sigma: np.ndarray  # (K,) formal uncertainty of each log s
    area: np.ndarray  # (K,) output pixels of the blocks each fit kept

    def informative(self) -> np.ndarray:
        """Boolean (K,): the cells that hold enough signal to measure the ratio."""
        return self.sigma < _CELL_MAX_SIGMA


def overlap_cell_ratios(image_i, image_j, block_px: int, pixel_area: float = 1.0) -> CellRatios | None:
    """Return the luminance ratio ``tile_i ~ s * tile_j`` of each cell of an overlap, or None.

    ``image_i``/``image_j``: ``(H, W, C)`` on the same grid, NaN where a tile has no data;
    ``pixel_area``: output pixels per pixel of that grid. The luminance is block-averaged
    (``block_px``, full blocks only) and the overlap cut along its length into cells about as
    long as it is wide (:func:`_cell_blocks`). Each cell is fitted alone
    (:func:`_symmetric_plane_slope`), so the ratio is measured on the signal above each tile's
    own sky plane (tiles with different gradients and offsets differ by a plane, which the fit
    takes, not the ratio), and an artefact in one tile (a trail, a halo, a hot column) moves at
    most the few cells it crosses, where it is clipped or, left in, makes the cell disagree with
    the others.
    """
    lum_i, lum_j = (block_mean(np.mean(image, axis=-1, keepdims=True), block_px,
                               full_blocks_only=True)[..., 0].astype(np.float64) for image in (image_i, image_j))
    ok = np.isfinite(lum_i) & np.isfinite(lum_j)
    if ok.sum() < _MIN_BLOCKS:
        return None
    found = []
    for rows, cols in _cell_blocks(ok):
        # rows and columns scaled to tenths: a well-conditioned fit
        fit = _symmetric_plane_slope(lum_j[rows, cols], lum_i[rows, cols], rows / 10.0, cols / 10.0)
        if fit is not None:
            found.append((fit[0], fit[1], fit[2] * block_px**2 * pixel_area))
    if not found:
        return None
    return CellRatios(*(np.array(v, dtype=float) for v in zip(*found)))


def _symmetric_plane_slope(x, y, rows, cols):
    """Return ``(log s, sigma, samples kept)`` of ``y ~ s * x + plane``, whichever tile is x; or None.

    The geometric mean of the fits of y on x and of x on y (:func:`_robust_plane_slope`): noise
    in the regressor flattens a fit's slope, by several per cent in a cell of little signal, and
    always towards y being the fainter tile; the two fits are flattened by about as much in
    opposite directions. The sigma is the mean of the two fits' formal uncertainties.
    """
    if x.size < _MIN_BLOCKS:
        return None
    # Both fits start from 1, what the pass-1-corrected tiles should measure: a start from the
    # brightest samples is thrown by an artefact in one tile, which is among them. The clipping
    # rounds judge every sample against the latest fit, so a real gain error brings back the
    # stars the first round dropped.
    forward, backward = (_robust_plane_slope(a, b, rows, cols, start=1.0) for a, b in ((x, y), (y, x)))
    if forward is None or backward is None:
        return None
    keep = forward[1] & backward[1]
    sigma = 0.5 * (_plane_slope_sigma(x, y, rows, cols, forward[1]) / forward[0]
                   + _plane_slope_sigma(y, x, rows, cols, backward[1]) / backward[0])
    return 0.5 * (math.log(forward[0]) - math.log(backward[0])), sigma, int(keep.sum())


def _cell_blocks(ok):
    """Yield ``(rows, cols)`` of the valid blocks of each cell: the overlap cut across its length.

    Cells are about as long as the overlap is wide, and hold at least twice :data:`_MIN_BLOCKS`
    blocks where the overlap is narrow.
    """
    rows, cols = np.nonzero(ok)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    along = rows if height >= width else cols
    across = min(height, width)
    length = max(across, -(-2 * _MIN_BLOCKS // across))
    n_cells = max(1, int(round((np.ptp(along) + 1) / length)))
    edges = np.linspace(along.min(), along.max() + 1, n_cells + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (along >= lo) & (along < hi)
        yield rows[inside], cols[inside]


def _plane_slope_sigma(x, y, rows, cols, keep) -> float:
    """Formal uncertainty of the slope of ``y ~ s * x + c + a * row + b * col`` on the ``keep`` samples.

    The residual scatter is the MAD-sigma, so a few outliers left in do not hide the noise.
    """
    design = np.column_stack([x, np.ones_like(x), rows, cols])[keep]
    coef, *_ = np.linalg.lstsq(design, y[keep], rcond=None)
    scatter = float(mad_sigma(y[keep] - design @ coef))
    cov = np.linalg.pinv(design.T @ design)
    return scatter * math.sqrt(max(float(cov[0, 0]), 0.0))


def _pair_ratio(cells: CellRatios):
    """Return ``(log s, sigma)`` of an overlap from its cells, or None where they do not agree.

    The informative cells that agree with their median (within three sigmas, formal and
    :data:`_CELL_SYSTEMATIC` together) are averaged, weighted by those sigmas; the overlap counts
    only if they hold most of the informative area: otherwise what the cells measure is not one
    gain. The sigma is the larger of the weighted mean's and the agreeing cells' scatter.
    """
    good = cells.informative()
    if not good.any():
        return None
    log_s, area = cells.log_s[good], cells.area[good]
    sigma = np.hypot(cells.sigma[good], _CELL_SYSTEMATIC)
    agree = np.abs(log_s - np.median(log_s)) <= 3.0 * sigma
    if area[agree].sum() <= 0.5 * area.sum():
        return None
    weights = 1.0 / sigma[agree] ** 2
    spread = float(mad_sigma(log_s[agree])) / math.sqrt(agree.sum()) if agree.sum() >= 3 else 0.0
    return float(np.sum(weights * log_s[agree]) / weights.sum()), max(weights.sum() ** -0.5, spread)


def _agreeing_tiles(n_tiles, pairs) -> np.ndarray:
    """Boolean (n,): tiles every one of whose overlaps agrees within :data:`TWO_PASS_MIN_CHANGE`."""
    agreeing = np.ones(n_tiles, bool)
    for i, j, d, *_x in pairs:
        if abs(d[0]) >= TWO_PASS_MIN_CHANGE:
            agreeing[i] = agreeing[j] = False
    return agreeing


def _supported_moves(n_tiles, overlaps, log_g) -> np.ndarray:
    """Boolean (n,): tiles kept at 1, or whose move most of their informative overlap area agrees with.

    ``overlaps``: ``(i, j, cells)``, those whose cells disagree included (their area does not
    support a move). A cell of an overlap with tile m implies the log gain tile k needs to match
    m there (with m's own move); it supports k's move when it has the same sign and is within
    half of it in size.
    """
    support, total = np.zeros(n_tiles), np.zeros(n_tiles)
    for i, j, cells in overlaps:
        good = cells.informative()
        for k, implied in ((i, log_g[j] - cells.log_s[good]), (j, log_g[i] + cells.log_s[good])):
            agrees = (np.sign(implied) == np.sign(log_g[k])) & \
                (np.abs(implied - log_g[k]) <= 0.5 * abs(log_g[k]))
            support[k] += cells.area[good][agrees].sum()
            total[k] += cells.area[good].sum()
    return (log_g == 0) | (support > 0.5 * total)


def _chi2(pairs, log_g):
    """Disagreement of the overlaps after gains ``exp(log_g)``: sum of squared pair residuals."""
    return float(sum(((d[0] + log_g[i] - log_g[j]) / s[0]) ** 2 for i, j, d, s in pairs))
