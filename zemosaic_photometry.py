"""Photometry: frame gains from stars, tile gains and offsets from overlaps, display white balance.

Works on arrays only (no files, no phases).

Frames (:func:`star_normalisation`, the ``linear_fit`` normalisation of a master tile): the
brightest usable stars of the reference frame are measured with apertures in every aligned
frame; each frame's gain is a weighted ratio of sums of the star fluxes, one grey gain unless the
channels differ significantly, then measured again against the average of the frames of the
reference's colour balance, and frames of one other balance share its colour.

Tiles: the assembly resamples every tile alone onto a coarse copy of the mosaic grid
(:class:`LowResTiles`); this module compares the tiles where they overlap and solves, for all
tiles together,

* per-tile, per-channel **gains**: from the signal in the overlaps, compared at full resolution
  on block means (:func:`block_pair_slopes`; on the coarse grid, from stars and nebulosity well
  above the sky, where an overlap is too small), never from sky-dominated pixels alone, whose
  level says nothing about a gain. One grey gain per tile, plus a per-channel colour term where
  the overlaps measure one beyond doubt (another night's colour balance; shrunk towards grey by
  how far it stands above its noise); elsewhere the tile's gain stays grey, since a colour term
  at the level of its noise would only tint the tile;
* per-tile, per-channel **offsets** that bring the skies together;
* the **Two-Pass** gain: one per tile, for every channel, from the pass-1-corrected tiles, each
  overlap measured in cells along it above each tile's own sky plane (so neither a gradient nor an
  artefact in one tile reads as a gain), kept at 1 where the tiles already agree within their
  uncertainty or within 1 %, or where most of a tile's overlap area does not support the move;
* the **white balance** of the display products (neutral sky, stars white on average).

Every solution is a weighted least-squares fit of pairwise differences ``x_i - x_j ~ d_ij``,
anchored on the best-connected tile, then centred on the median tile (most tiles are right, so
the flux scale and the colour balance of the majority are kept). Everything is deterministic.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from zemosaic_utils import (block_mean, mad_sigma, map_threads, median_last_axis, nonzero_indices,
                            sigma_clipped_stats, sky_level, subsample, to_numpy)

logger = logging.getLogger(__name__)

#: Chi-square (over the colour channels, p = 0.001 for two) above which a tile's colour terms are
#: applied. Below it they are noise: applying them tinted the tiles of one night by ~1 %.
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
#: Uncertainty of a cell's ratio that its formal sigma misses. Measured on the synthetic test
#: scenes (equal gains, 4-6 px blocks): cells of formal sigma 0.1-0.3 % scatter about the truth
#: by 0.75 % rms, 1.2 % when the tiles carry sky gradients of up to 12 %; with this added, the
#: errors of all informative cells are 1.0-1.1 of their sigmas (rms).
_CELL_SYSTEMATIC = 0.01


# --------------------------------------------------------------------------------------------------
# Frames: gains from the stars of the reference
# --------------------------------------------------------------------------------------------------

# A fitted gain outside this range means the fit latched on something other than the sky
# (clouds, a satellite, a nearly empty overlap): identity is the safer answer.
_GAIN_LIMITS = (0.2, 5.0)

#: Pixels of a frame its sky statistics are measured on (a strided subsample).
_SAMPLE = 120_000

# Photometric normalisation from stars. The scale between two frames is measured on the signal:
# bright unsaturated stars found on the reference and measured at the same (aligned) positions in
# the frame. A median of per-pixel ratios of excess over sky is biased differently in every
# channel by the noise of its denominator (a colour cast of several per cent on sky-dominated
# frames); a ratio of sums of star fluxes is not.

#: Full-well level of the raw frames (ADU): Seestar subs are 16-bit.
SATURATION_ADU = 65535.0
# A star is left out when any aperture pixel, in any channel of either frame, exceeds this fraction
# of the saturation level: debayering and resampling spread a clipped core over its neighbours, so
# the pixels around it are wrong before they reach the level themselves.
_SATURATION_FRACTION = 0.8
# ... or when its top is flat: at least this many aperture pixels within 1 % of the brightest
# (an unsaturated PSF has at most four, when it is centred between four pixels).
_FLAT_TOP_PIXELS = 5
_DETECT_SNR = 10.0  # reference stars: luminance peak this many noise sigmas above the sky
_MAX_STARS = 300  # the brightest ones; more add little precision and cost a gather per frame
_COLOUR_MIN_STARS = 20  # fewer matched stars: one grey gain, whatever the channels measure
_MIN_STARS = 8  # fewer matched stars: the gain comes from bright pixels instead
# Aperture radius in FWHM of the reference's stars: the fraction of a star's flux outside the
# aperture must not change with the seeing of the frame (2.5 FWHM holds 99.5 % of a Moffat-4 PSF,
# and 10 % worse seeing moves that by 0.3 %); a larger one only adds sky noise.
_APERTURE_FWHM = 2.5
_APERTURE_LIMITS_PX = (4, 12)
# Local sky annulus, inner and outer distance beyond the aperture: wide, because the noise of its
# median enters the flux multiplied by the aperture area.
_ANNULUS_PX = (3, 15)
# Relative error of a star's flux that no sky noise explains: the fraction of an undersampled star's
# light that falls on the R or B pixels (every second row and column) depends on where it falls on
# the Bayer grid, by 2 exp(-2 pi^2 sigma^2 / 4) per axis (0.3 % at FWHM 2.7 px, 6 % at FWHM 2 px),
# and the G pixels' denser grid makes G's error far smaller; plus flat-field and PSF differences.
# Measured per star between the frames of the shared real subs, the R and B colours scatter by
# several per cent. With 0.5 % for every channel the brightest few stars took all the weight and
# their colour errors passed for colour terms (35 of 200 simulated 12-star frames tinted).
_STAR_SYSTEMATIC = 0.005
_STAR_SYSTEMATIC_RGB = (0.03, 0.01, 0.03)
_STAR_CLIP = 5.0  # per-star ratio outliers (hot pixel, trail, variable star), in robust sigmas
#: Relative uncertainty below which a channel's own gain is used as measured (see _channel_gains).
GAIN_PRECISION = 0.005
# Per-channel gains are used only when the channels differ significantly (chi^2 of their spread
# about the grey gain, 2 degrees of freedom for RGB, p = 0.001) and by more than 1 %: star
# photometry on debayered, resampled frames is not trusted below that (flux moves between channels
# with a star's position on the Bayer grid), and clouds and haze are grey anyway.
_COLOUR_CHI2 = 13.8
_COLOUR_MIN = 0.01


@dataclass(frozen=True)
class ReferenceStars:
    """Stars of a reference frame and their apertures (computed once per group).

    ``ys``/``xs``: integer peak positions; ``aperture``/``annulus``: ``(dy, dx)`` offset arrays of
    the aperture disc and the local-sky annulus; ``flux``/``noise``: ``(n, C)`` reference fluxes
    and their sky noise (:func:`aperture_fluxes`); ``fwhm``: the median FWHM (px) the aperture
    was sized from.
    """

    ys: np.ndarray
    xs: np.ndarray
    aperture: tuple
    annulus: tuple
    flux: np.ndarray
    noise: np.ndarray
    fwhm: float


@dataclass(frozen=True)
class GainFit:
    """Photometric scale of a frame against the reference.

    ``gains`` ``(C,)`` multiply the frame; ``sigmas`` ``(C,)`` are the relative 1-sigma
    uncertainties of the per-channel estimates and ``grey_sigma`` that of the grey gain (NaN when
    not measured); ``grey`` says one gain serves every channel; ``n_stars`` stars were used (0:
    bright pixels, or no signal); ``method`` is ``"stars"``, ``"pixels"`` or ``"sky"`` (gain 1).
    A star fit keeps what it was made from: the frame's ``flux`` and ``noise`` ``(n, C)`` at the
    reference's stars (NaN where unusable), its ``sky`` ``(C,)``, the ``measured`` per-channel
    ratios and the ``grey_gain``, so the gain can be measured again against other frames, the
    colour shared with frames of the same balance and the offsets follow (:func:`refine_star_gains`).
    """

    gains: np.ndarray
    sigmas: np.ndarray
    grey_sigma: float
    grey: bool
    n_stars: int
    method: str
    flux: np.ndarray | None = None
    noise: np.ndarray | None = None
    sky: np.ndarray | None = None
    measured: np.ndarray | None = None
    grey_gain: float = float("nan")


def _disc_offsets(r_in: float, r_out: float):
    """Return the ``(dy, dx)`` integer offsets with ``r_in <= distance < r_out`` (r_in < 0: a disc)."""
    r = int(math.ceil(r_out))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    dist = np.hypot(dy, dx)
    sel = (dist >= r_in) & (dist < r_out) if r_in >= 0 else dist < r_out
    return dy[sel], dx[sel]


def _local_maxima(snr, threshold: float, margin: int, xp):
    """Return ``(ys, xs, values)`` of the pixels above ``threshold`` that beat their 8 neighbours.

    Ties go to the first pixel in raster order, so a flat top yields one peak. ``margin`` pixels
    along the edges are skipped (their apertures would leave the image).
    """
    h, w = snr.shape
    inner = snr[margin:h - margin, margin:w - margin] > threshold  # NaN compares False
    ys, xs = nonzero_indices(inner, xp)
    ys, xs = ys + margin, xs + margin
    v = snr[ys, xs]
    peak = xp.ones(v.shape, dtype=bool)
    for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)):
        n = snr[ys + dy, xs + dx]
        earlier = dy < 0 or (dy == 0 and dx < 0)
        peak &= (v > n) if earlier else (v >= n)
    return ys[peak], xs[peak], v[peak]


def _half_max_area(excess, ys, xs, xp, radius: int = 6):
    """Return, per peak, the number of pixels within ``radius`` at or above half its maximum.

    ``pi (FWHM / 2)^2`` for a round PSF: a size that needs no fit and that noise barely moves on
    bright stars.
    """
    dy, dx = _disc_offsets(-1, radius + 0.5)
    box = excess[ys[:, None] + xp.asarray(dy)[None], xs[:, None] + xp.asarray(dx)[None]]
    return xp.sum(box >= 0.5 * excess[ys, xs][:, None], axis=1)


def aperture_fluxes(image, stars: ReferenceStars, xp=np, saturation: float = SATURATION_ADU):
    """Return ``(flux, noise)``, each ``(n, C)``: aperture fluxes over the local sky and their sky noise.

    The local sky is the median of the annulus (neighbouring stars barely move it, a sky gradient
    cancels); ``noise`` is the annulus MAD-sigma times the square root of the aperture area — the
    relative sky noise of each flux, which sets how far a star's ratio may stray. A star's flux is
    NaN (unusable) when its aperture or annulus holds no-data pixels, when any aperture pixel is
    near ``saturation`` in any channel, or when its top is flat.
    """
    ys, xs = xp.asarray(stars.ys)[:, None], xp.asarray(stars.xs)[:, None]
    ap = image[ys + xp.asarray(stars.aperture[0])[None], xs + xp.asarray(stars.aperture[1])[None]]
    an = image[ys + xp.asarray(stars.annulus[0])[None], xs + xp.asarray(stars.annulus[1])[None]]
    an = xp.ascontiguousarray(xp.moveaxis(an, 1, 2))  # (n, C, annulus pixels): medians along rows
    sky = median_last_axis(an, xp)  # (n, C); NaN when the annulus leaves the footprint
    noise = 1.4826 * median_last_axis(xp.abs(an - sky[..., None]), xp) * math.sqrt(ap.shape[1])
    excess = ap - sky[:, None]
    flux = xp.sum(excess, axis=1)
    top = xp.max(excess, axis=1)
    flat = xp.sum(excess >= 0.99 * top[:, None], axis=1) >= _FLAT_TOP_PIXELS
    bad = flat | (xp.max(ap, axis=1) > _SATURATION_FRACTION * saturation)
    bad = xp.any(bad, axis=1, keepdims=True) | ~xp.isfinite(flux) | (top <= 0)
    return xp.where(bad, xp.nan, flux), noise


def _star_like(excess, ys, xs, xp):
    """Return which peaks are star-like: a 3x3 core well above every part of the ring 4-6 px out.

    Noise peaks on nebulosity pass the detection threshold but are as bright as their
    surroundings, and a satellite trail crosses the ring twice at its own brightness; a star (FWHM
    up to ~6 px) leaves at most a quarter of its core signal on the ring's brighter tenth.
    """
    cy, cx = _disc_offsets(-1, 1.5)
    ry, rx = _disc_offsets(4, 6)
    core = xp.mean(excess[ys[:, None] + xp.asarray(cy)[None], xs[:, None] + xp.asarray(cx)[None]], axis=1)
    ring = excess[ys[:, None] + xp.asarray(ry)[None], xs[:, None] + xp.asarray(rx)[None]]
    return xp.percentile(ring, 90, axis=1) < 0.25 * core


def find_reference_stars(reference, xp=np, saturation: float = SATURATION_ADU,
                         max_stars: int = _MAX_STARS) -> ReferenceStars:
    """Return the :class:`ReferenceStars` of an ``(H, W, C)`` frame: its brightest usable stars.

    Star-like peaks of the mean over channels of the sky-subtracted signal-to-noise, above
    ``_DETECT_SNR``, of about the size of the brightest unsaturated ones; the aperture radius is
    ``_APERTURE_FWHM`` times their median FWHM. Stars whose reference flux is unusable
    (saturated, flat-topped, at a footprint edge) are dropped.
    """
    n_ch = reference.shape[-1]
    sub = subsample(reference, _SAMPLE)
    snr = xp.zeros(reference.shape[:2], dtype=xp.float32)
    excess = xp.zeros(reference.shape[:2], dtype=xp.float32)
    for c in range(n_ch):
        sky, sigma = sigma_clipped_stats(sub[..., c], xp)
        if not (np.isfinite(sky) and np.isfinite(sigma) and sigma > 0):
            return _no_stars(n_ch)
        excess += reference[..., c] - sky
        snr += (reference[..., c] - sky) / (sigma * n_ch)
    margin = _APERTURE_LIMITS_PX[1] + _ANNULUS_PX[1] + 1
    ys, xs, peak = _local_maxima(snr, _DETECT_SNR, margin, xp)
    order = xp.argsort(-peak)
    ys, xs = ys[order], xs[order]
    star_like = xp.nonzero(_star_like(excess, ys, xs, xp))[0]
    ys, xs = ys[star_like], xs[star_like]
    unclipped = xp.max(reference[ys, xs], axis=-1) < _SATURATION_FRACTION * saturation
    if not bool(xp.any(unclipped)):
        return _no_stars(n_ch)
    # Every star has the frame's PSF: peaks much sharper (hot pixels, cosmic rays) or broader
    # (blends, galaxies) than the brightest unsaturated ones are not measured.
    area = _half_max_area(excess, ys, xs, xp)
    typical = float(xp.median(area[xp.nonzero(unclipped)[0][:50]]))
    same_psf = xp.nonzero((area >= 0.5 * typical) & (area <= 2.5 * typical))[0]
    ys, xs = ys[same_psf], xs[same_psf]
    fwhm = 2.0 * math.sqrt(typical / math.pi)
    r_ap = min(max(_APERTURE_FWHM * fwhm, _APERTURE_LIMITS_PX[0]), _APERTURE_LIMITS_PX[1])
    aperture = _disc_offsets(-1, r_ap)
    annulus = _disc_offsets(r_ap + _ANNULUS_PX[0], r_ap + _ANNULUS_PX[1])
    stars = ReferenceStars(ys, xs, aperture, annulus, None, None, fwhm)
    flux, noise = aperture_fluxes(reference, stars, xp, saturation)
    usable = xp.nonzero(xp.all(xp.isfinite(flux), axis=1))[0][:max_stars]
    return ReferenceStars(ys[usable], xs[usable], aperture, annulus, flux[usable], noise[usable], fwhm)


def _no_stars(n_ch: int) -> ReferenceStars:
    """Return an empty :class:`ReferenceStars` (no signal to measure)."""
    empty = np.zeros(0, dtype=np.int64)
    none = np.zeros((0, n_ch))
    return ReferenceStars(empty, empty, (empty, empty), (empty, empty), none, none, float("nan"))


def ratio_of_sums(num, den, num_noise, den_noise, systematic: float = _STAR_SYSTEMATIC):
    """Return ``(ratio, relative sigma, n_used, influence)`` of a weighted ``sum(w num) / sum(w den)``.

    ``num``/``den`` are matched fluxes (1-D, finite, ``den > 0``), ``num_noise``/``den_noise``
    their sky noise. A ratio of sums has no errors-in-variables bias: the noise of ``den`` enters
    linearly, not through a division per star as in a median of ratios. The weights
    ``w = F / V`` (``F`` the star's mean brightness, ``V`` the variance of ``num - ratio * den``)
    are the optimal ones for sky-limited stars, so a crowd of faint stars does not drown the
    bright ones; ``F`` averages both frames, so its noise correlates with ``num`` and ``den``
    alike and the bias it leaves is ~(1 - ratio) / SNR^2, far below the precision.

    Stars whose residual is more than ``_STAR_CLIP`` robust sigmas off in units of its noise (a hot
    pixel taken for a star, a trail across one) are dropped until the set is stable, starting from
    the median of the stars' own ratios, which contaminated stars cannot move while they are fewer
    than half. The uncertainty is the sandwich estimate from the residuals: ``influence`` holds each
    star's relative contribution to the error (0 for dropped stars; sigma = its norm), so the
    covariance of two estimates from the same stars is the dot product of their influences.
    NaN with fewer than 3 stars.
    """
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    ratio = float(np.median(num / den))
    keep = np.ones(num.size, dtype=bool)
    for _ in range(10):
        var = np.asarray(num_noise, np.float64) ** 2 + (ratio * np.asarray(den_noise)) ** 2 \
            + (systematic * num) ** 2
        var = np.maximum(var, np.finfo(np.float64).tiny)  # noiseless data
        z = (num - ratio * den) / np.sqrt(var)
        new_keep = np.abs(z) <= _STAR_CLIP * mad_sigma(z[keep], np, 0.0)
        if new_keep.sum() < 3:
            return float("nan"), float("nan"), int(new_keep.sum()), np.zeros(num.size)
        w = np.where(new_keep, 0.5 * (num / ratio + den) / var, 0.0)
        ratio = float(np.sum(w * num) / np.sum(w * den))
        stable = np.array_equal(new_keep, keep)
        keep = new_keep
        if stable:
            break
    n = int(keep.sum())
    influence = w * (num - ratio * den) / float(np.sum(w * den)) / ratio * math.sqrt(n / max(n - 1, 1))
    return ratio, float(np.sqrt(np.sum(influence**2))), n, influence


def _channel_gains(gains, sigmas, grey: float):
    """Return the per-channel gains to apply, or None when the grey gain serves every channel.

    Clouds and haze are grey, so the channels get their own gains only when they differ from the
    grey gain significantly (``_COLOUR_CHI2``) and by more than ``_COLOUR_MIN``: a frame taken
    through another colour balance (another night, another altitude). A channel measured to
    ``GAIN_PRECISION`` keeps its gain as measured; a less precise one has its colour term shrunk
    towards grey by ``c^2 / (c^2 + sigma^2)``, so that a term near its noise cannot tint the frame
    while a large one (15-25 % between the two nights of the shared real subs, measured to 1-4 %)
    is still corrected.
    """
    if gains.size < 2 or not np.all(np.isfinite(sigmas)):
        return None
    colour = gains / grey - 1
    chi2 = float(np.sum((colour / np.maximum(sigmas, 1e-12)) ** 2))
    if chi2 <= _COLOUR_CHI2 or float(np.max(np.abs(colour))) <= _COLOUR_MIN:
        return None
    shrink = np.where(sigmas <= GAIN_PRECISION, 1.0, colour**2 / (colour**2 + sigmas**2))
    return grey * (1 + colour * shrink)


def _grey_gain(gains, influences):
    """Return ``(grey gain, relative sigma)``: the least-variance mean of correlated channel gains.

    The channel estimates share their stars, and bilinear debayering of undersampled stars moves
    flux between R and B with a star's position on the Bayer grid (by tens of per cent per star on
    real Seestar subs): their errors are strongly correlated. The covariance from the stars'
    influences gives the weights ``C^-1 1 / (1' C^-1 1)`` that cancel what the channels share.
    """
    cov = influences @ influences.T
    cov += np.eye(gains.size) * 1e-9 * max(float(np.trace(cov)), 1e-30)  # a channel may be exact
    weights = np.linalg.solve(cov, np.ones(gains.size))
    weights /= weights.sum()
    return float(weights @ gains), float(np.sqrt(max(weights @ cov @ weights, 0.0)))


def star_gain_fit(frame, stars: ReferenceStars, xp=np, saturation: float = SATURATION_ADU):
    """Return the :class:`GainFit` of ``frame`` from the stars of the reference, or None (< _MIN_STARS)."""
    if stars.ys.size < _MIN_STARS:
        return None
    flux, noise = (to_numpy(a) for a in aperture_fluxes(frame, stars, xp, saturation))
    return fit_star_fluxes(to_numpy(stars.flux), to_numpy(stars.noise), flux, noise)


def fit_star_fluxes(ref, ref_noise, flux, noise):
    """Return the :class:`GainFit` that brings star fluxes ``flux`` to ``ref``, or None (< _MIN_STARS).

    ``ref``/``flux`` ``(n, C)`` are the same stars' fluxes in the reference and the frame, with
    their sky noise; NaN marks a star unusable in either. Per channel a :func:`ratio_of_sums`; one
    grey gain unless the channels differ significantly (:func:`_channel_gains`).
    """
    matched = np.all(np.isfinite(flux) & (flux > 0) & np.isfinite(noise) & np.isfinite(ref)
                     & np.isfinite(ref_noise), axis=1)
    if int(matched.sum()) < _MIN_STARS:
        return None
    systematic = _STAR_SYSTEMATIC_RGB if ref.shape[1] == 3 else (_STAR_SYSTEMATIC,) * ref.shape[1]
    fits = [ratio_of_sums(ref[matched, c], flux[matched, c], ref_noise[matched, c], noise[matched, c],
                          systematic[c]) for c in range(ref.shape[1])]
    gains = np.array([f[0] for f in fits])
    sigmas = np.array([f[1] for f in fits])
    n_used = min(f[2] for f in fits)
    if n_used < _MIN_STARS or not np.all(np.isfinite(gains) & np.isfinite(sigmas)):
        return None
    grey, grey_sigma = _grey_gain(gains, np.array([f[3] for f in fits]))
    # A handful of stars cannot tell a colour term from their own colour errors (Bayer phase, a
    # hot pixel in one aperture): with fewer than _COLOUR_MIN_STARS the frame stays grey.
    channel_gains = _channel_gains(gains, sigmas, grey) if n_used >= _COLOUR_MIN_STARS else None
    applied = np.full(gains.size, grey) if channel_gains is None else channel_gains
    return GainFit(applied, sigmas, grey_sigma, channel_gains is None, n_used, "stars", flux, noise,
                   measured=gains, grey_gain=grey)


def _bright_pixel_gain(f, r, sky_f, sig_f, sky_r, sig_r, xp):
    """Return one grey gain from the pixels well above the sky in both frames, or None (< 25 pixels).

    The fallback when too few stars match (nebula-only fields): a ratio of sums of the excess
    luminance, on pixels selected by both frames' signal-to-noise alike, so the selection favours
    neither frame's noise.
    """
    ef, er = f - xp.asarray(sky_f), r - xp.asarray(sky_r)
    snr_f, snr_r = xp.mean(ef / xp.asarray(sig_f), axis=-1), xp.mean(er / xp.asarray(sig_r), axis=-1)
    # Bright in both (a trail or hot pixel is bright in one frame only), and on average well
    # above the threshold so that noise hardly decides which pixels count.
    bright = (snr_f > 5.0) & (snr_r > 5.0) & (snr_f + snr_r > 20.0)
    if int(xp.sum(bright)) < 25:
        return None
    return float(xp.sum(er[bright]) / xp.sum(ef[bright]))


def photometric_gain(frame, reference, xp=np, stars: ReferenceStars | None = None,
                     saturation: float = SATURATION_ADU):
    """Return ``(GainFit, offsets (C,))`` so that ``gains * frame + offsets`` ~ reference, or ``(None, reason)``.

    The gain comes from the stars of the reference (:func:`find_reference_stars`, pass ``stars``
    to reuse them across frames), or from bright pixels when fewer than ``_MIN_STARS`` match, or is
    1 when neither has signal. The offsets match the sky levels (clipped medians of the jointly
    valid pixels) per channel. ``(None, reason)`` for degenerate data: flat or non-finite
    statistics, or a gain outside ``_GAIN_LIMITS``.
    """
    n_ch = frame.shape[-1]
    f_sub, r_sub = subsample(frame, _SAMPLE), subsample(reference, _SAMPLE)
    joint = functools.reduce(xp.logical_and, [xp.isfinite(f_sub[..., c]) & xp.isfinite(r_sub[..., c])
                                               for c in range(n_ch)])  # not all(axis=-1): 3-wide runs
    f, r = f_sub[joint], r_sub[joint]
    if f.shape[0] < 100:
        return None, "fewer than 100 jointly valid pixels"
    stats = np.array([sigma_clipped_stats(a[:, c], xp) for a in (f, r) for c in range(n_ch)])
    sky_f, sig_f, sky_r, sig_r = stats[:n_ch, 0], stats[:n_ch, 1], stats[n_ch:, 0], stats[n_ch:, 1]
    if not np.all(np.isfinite(stats)) or np.any(stats[:, 1] <= 0):
        return None, "flat or non-finite statistics"
    stars = find_reference_stars(reference, xp, saturation) if stars is None else stars
    fit = star_gain_fit(frame, stars, xp, saturation)
    if fit is None:
        gain = _bright_pixel_gain(f, r, sky_f, sig_f, sky_r, sig_r, xp)
        nan = np.full(n_ch, np.nan)
        fit = GainFit(np.full(n_ch, 1.0 if gain is None else gain), nan, float("nan"), True, 0,
                      "sky" if gain is None else "pixels")
    if not np.all(np.isfinite(fit.gains) & (fit.gains >= _GAIN_LIMITS[0]) & (fit.gains <= _GAIN_LIMITS[1])):
        return None, f"gain {fit.gains} outside {_GAIN_LIMITS}"
    return replace(fit, sky=sky_f), sky_r - fit.gains * sky_f


def linear_fit_coefficients(frame, reference, xp=np, stars: ReferenceStars | None = None,
                            saturation: float = SATURATION_ADU):
    """Return per-channel ``(gain, offset)`` arrays so that ``gain * frame + offset`` ~ reference.

    See :func:`photometric_gain`: the gain is measured on stars (one grey gain unless the channels
    are precise and really differ), the offsets on the sky. Degenerate fits fall back to identity
    with a DEBUG line.
    """
    n_ch = frame.shape[-1]
    fit, offsets = photometric_gain(frame, reference, xp, stars, saturation)
    if fit is None:
        logger.debug("linear_fit: degenerate fit (%s); using identity", offsets)
        return np.ones(n_ch), np.zeros(n_ch)
    _log_fit("linear_fit", fit)
    return fit.gains, offsets


def _log_fit(label, fit: GainFit) -> None:
    logger.debug("%s: gains %s from %s (%d stars, sigma grey %.4f, per channel %s, %s)", label,
                 np.round(fit.gains, 5), fit.method, fit.n_stars, fit.grey_sigma, np.round(fit.sigmas, 4),
                 "grey" if fit.grey else "per channel")


def _averaged_fluxes(fluxes, noises, gains, frames):
    """Return ``(flux, noise)`` ``(n, C)``: the stars' normalised fluxes averaged over ``frames``.

    A star counts in the frames where it was measured (NaN elsewhere); NaN where none measured it.
    """
    flux = np.stack([fluxes[k] * gains[k] for k in frames])
    var = np.stack([(noises[k] * gains[k]) ** 2 for k in frames])
    count = np.sum(np.isfinite(flux) & np.isfinite(var), axis=0)
    ok = np.isfinite(flux) & np.isfinite(var)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.sum(np.where(ok, flux, 0.0), axis=0) / count, np.nan)
        noise = np.where(count > 0, np.sqrt(np.sum(np.where(ok, var, 0.0), axis=0)) / count, np.nan)
    return mean, noise


def refine_star_gains(gains, offsets, fits: dict, stars: ReferenceStars, reference_index: int):
    """Return ``(gains, offsets)`` with every star fit measured again against the average of frames.

    A single frame's star colours are uncertain by 5-10 % each on undersampled Seestar subs (where
    a star falls on the Bayer grid changes its R and B), so gains measured against the reference
    alone carry the reference's own colour errors into every frame. Here each frame is measured
    against the mean normalised fluxes of the reference and the frames found grey against it (of
    the same colour balance), leaving itself out, which averages those errors down: on the shared
    real subs, the other night's per-channel gains become 1.3-2.2 % precise instead of 1.5-4.5 %,
    and move by 5-7 % in R/G and B/G, towards the colours of the stars measured on the raw frames.

    ``fits`` maps frame index to its :class:`GainFit` against the reference; frames without a
    star fit and the reference keep their coefficients. With fewer than two frames of the
    reference's balance nothing changes.
    """
    star_fits = {i: f for i, f in fits.items() if f.method == "stars" and f.flux is not None}
    balance = [reference_index] + [i for i, f in star_fits.items() if f.grey]
    if len(balance) < 2:
        return gains, offsets
    fluxes = {reference_index: to_numpy(stars.flux), **{i: f.flux for i, f in star_fits.items()}}
    noises = {reference_index: to_numpy(stars.noise), **{i: f.noise for i, f in star_fits.items()}}
    refits = {}
    for i, fit in star_fits.items():
        against = [k for k in balance if k != i]
        again = fit_star_fluxes(*_averaged_fluxes(fluxes, noises, gains, against), fit.flux, fit.noise)
        if again is not None:
            _log_fit(f"linear_fit (frame {i} against {len(against)} frames)", again)
            refits[i] = again
    new_gains = gains.copy()
    for i, again in refits.items():
        new_gains[i] = again.gains
    for members, colour in _shared_colours(refits):
        for i in members:
            new_gains[i] = refits[i].grey_gain * colour
    logger.debug("linear_fit: gains after the second pass %s", np.round(new_gains, 5).tolist())
    keep = np.all((new_gains >= _GAIN_LIMITS[0]) & (new_gains <= _GAIN_LIMITS[1]), axis=1)
    offsets = offsets.copy()
    for i in refits:
        if keep[i]:
            offsets[i] = offsets[i] + (gains[i] - new_gains[i]) * star_fits[i].sky
    return np.where(keep[:, None], new_gains, gains), offsets


def _shared_colours(refits: dict):
    """Yield ``(frames, colour (C,))``: one colour balance for frames that measure the same one.

    A colour balance belongs to a night (altitude, sky, instrument), not to a frame, and each
    frame measures it with the colour noise of its own stars. Frames whose colour terms (each
    channel's measured gain over the grey gain, in log) agree within ``_COLOUR_CHI2`` are grouped,
    greedily in frame order; a group of two or more gets the weighted mean of its terms, shrunk
    and tested like a single frame's (:func:`_channel_gains` with the mean's uncertainty).
    """
    groups = []  # [frames, sum of w * term, sum of w]
    for i in sorted(refits):
        fit = refits[i]
        if fit.grey or fit.measured is None:
            continue
        term, weight = np.log(fit.measured / fit.grey_gain), 1.0 / np.maximum(fit.sigmas, 1e-6) ** 2
        for group in groups:
            mean, mean_sigma = group[1] / group[2], 1.0 / np.sqrt(group[2])
            if np.sum((term - mean) ** 2 / (1.0 / weight + mean_sigma**2)) <= _COLOUR_CHI2:
                group[0].append(i)
                group[1] = group[1] + weight * term
                group[2] = group[2] + weight
                break
        else:
            groups.append([[i], weight * term, weight])
    for frames, sum_wt, sum_w in groups:
        if len(frames) < 2:
            continue
        colour = _channel_gains(np.exp(sum_wt / sum_w), 1.0 / np.sqrt(sum_w), 1.0)
        logger.debug("linear_fit: frames %s share one colour balance %s", frames,
                     None if colour is None else np.round(colour, 4).tolist())
        yield frames, (np.ones(sum_w.size) if colour is None else colour)


def sky_mean_coefficients(frame, reference, xp=np):
    """Return per-channel ``(gain=1, offset)`` matching the frame's sky level to the reference's."""
    n_ch = frame.shape[-1]
    offsets = np.zeros(n_ch)
    f_sub, r_sub = subsample(frame, _SAMPLE), subsample(reference, _SAMPLE)
    for c in range(n_ch):
        joint = xp.isfinite(f_sub[..., c]) & xp.isfinite(r_sub[..., c])
        sky_f, _ = sigma_clipped_stats(f_sub[..., c][joint], xp)
        sky_r, _ = sigma_clipped_stats(r_sub[..., c][joint], xp)
        if np.isfinite(sky_f) and np.isfinite(sky_r):
            offsets[c] = sky_r - sky_f
    return np.ones(n_ch), offsets


def star_normalisation(stack, reference_index, xp=np, threads: int = 1):
    """Return ``(gains, offsets)``, each ``(N, C)``, bringing every frame of a stack to the reference.

    Star gains against the reference's stars (found once for the group, measured in every frame,
    ``threads`` frames at once), then measured again against the average of the frames of the
    reference's colour balance (:func:`refine_star_gains`); a frame without a usable fit keeps
    the identity.
    """
    n, n_ch = stack.shape[0], stack.shape[-1]
    gains, offsets = np.ones((n, n_ch)), np.zeros((n, n_ch))
    reference = stack[reference_index]
    stars = find_reference_stars(reference, xp)
    logger.debug("linear_fit: %d reference stars, FWHM %.2f px", stars.ys.size, stars.fwhm)
    fits = {}
    others = [i for i in range(n) if i != reference_index]
    measured = map_threads(lambda i: photometric_gain(stack[i], reference, xp, stars), others, threads)
    for i, (fit, found) in zip(others, measured):
        if fit is None:
            logger.debug("linear_fit: degenerate fit (%s); using identity", found)
            continue
        _log_fit("linear_fit", fit)
        gains[i], offsets[i], fits[i] = fit.gains, found, fit
    return refine_star_gains(gains, offsets, fits, stars, reference_index)


# --------------------------------------------------------------------------------------------------
# Tiles: gains and offsets from the overlaps
# --------------------------------------------------------------------------------------------------


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
    return _smooth_nan_planes([image2d], sigma)[0]


def _smooth_nan_planes(planes, sigma) -> list:
    """Return :func:`_smooth_nan` of every plane, their Gaussians computed at once on every core.

    Planes with the same pixels of data (the channels of an image) share one Gaussian of that
    footprint instead of one each.
    """
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return list(planes)
    valid = [np.isfinite(p) for p in planes]
    footprint = [0 if k and np.array_equal(v, valid[0]) else k for k, v in enumerate(valid)]
    inputs = [np.where(v, p, 0.0) for p, v in zip(planes, valid)] + \
        [valid[k].astype(np.float64) for k in sorted(set(footprint))]
    smoothed = map_threads(lambda a: gaussian_filter(a, sigma), inputs)
    dens = dict(zip(sorted(set(footprint)), smoothed[len(planes):]))
    with np.errstate(invalid="ignore", divide="ignore"):
        return [np.where(v & (dens[f] > 0.05), num / dens[f], np.nan)
                for v, num, f in zip(valid, smoothed[:len(planes)], footprint)]


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
    On the synthetic test scenes this measures the per-channel ratio of two tiles to about 1 %,
    where the coarse-grid statistic of :func:`_pair_slope` scattered by 3-5 %.
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
    function of ``(i, j, overlap mask on the coarse grid)`` returning both tiles at full
    resolution on the box of their overlap, lets each pair be measured by
    :func:`block_pair_slopes`; the coarse grid serves where that finds too few blocks.
    """
    pairs = []
    for i, j, both in _overlapping_pairs(low):
        if full_resolution is not None and per_channel:
            found = block_pair_slopes(*full_resolution(i, j, both))
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
    # them; shrinking each channel by its own k^2 / (k^2 + sigma^2) pulled a tile's imprecise G
    # term to a third and so moved its R/G and B/G by ~1 % (2.4 % mean colour spread over eight
    # synthetic two-night scenes, against 2.1 % now).
    with np.errstate(divide="ignore", invalid="ignore"):
        shrink = np.clip(1.0 - log_c.shape[1] / chi2, 0.0, 1.0)
    return np.where(significant[:, None], log_c * shrink[:, None], 0.0)


def match_tiles(low: LowResTiles, match_gains: bool = True, match_offsets: bool = True,
                full_resolution=None) -> TileMatch:
    """Solve gains (from the overlaps' signal) and then offsets (sky) of all tiles together.

    ``full_resolution`` (see :func:`_pair_gains`) lets the gains be measured at full resolution.
    """
    n = len(low.images)
    n_ch = low.images[0].shape[-1]
    gains, colour = tile_gains(low, True, full_resolution) if match_gains else (np.ones((n, n_ch)), np.zeros(n, bool))
    offsets = background_offsets(low, gains) if match_offsets else np.zeros((n, n_ch))
    return TileMatch(gains, offsets, colour)


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
    shifted = low.corrected(match.gains, match.offsets)
    overlaps = []
    for i, j, both in _overlapping_pairs(shifted):
        rows, cols = np.nonzero(both)
        block_px = _two_pass_block_px(low.factor * min(np.ptp(rows) + 1, np.ptp(cols) + 1), sigma_px)
        cells = None
        if full_resolution is not None:
            images = full_resolution(i, j, both)
            cells = overlap_cell_ratios(*(image * np.asarray(match.gains[k], np.float32)
                                          - np.asarray(match.offsets[k], np.float32)
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


# --------------------------------------------------------------------------------------------------
# White balance for display
# --------------------------------------------------------------------------------------------------


@dataclass
class WhiteBalance:
    """Display white balance: ``(image - sky) * gains``; gains normalised to G = 1."""

    gains: np.ndarray  # (C,)
    sky: np.ndarray  # (C,)
    source: str  # "stars", "bright pixels" or "none"


def white_balance(image_hwc, star_kappa: float = 20.0, smooth_px: float = 8.0,
                  max_pixels: int = 4_000_000) -> WhiteBalance:
    """Measure the display white balance of a linear RGB image: neutral sky, stars white on average.

    The sky is the per-channel mode (:func:`zemosaic_utils.sky_level`). Stars are pixels standing out of their surroundings (the
    image minus a ``smooth_px`` Gaussian, so nebulosity does not count as star light) by
    ``star_kappa`` noise sigmas in every channel, below 80 % of each channel's maximum (saturated
    cores have lost their colour). Each channel's gain makes the median star pixel grey. With
    fewer than 50 star pixels the brightest 1 % of the sky-subtracted pixels stand in. An image
    larger than ``max_pixels`` is measured on a block-averaged copy (4.3 s -> 1.5 s on the demo
    mosaic; gains within 2 %).
    """
    image = np.asarray(image_hwc, np.float32)
    factor = int(np.ceil(np.sqrt(image.shape[0] * image.shape[1] / max_pixels)))
    if factor > 1:  # block means keep every star's light and colour; the smoothing costs far less
        image = block_mean(image, factor)
    n_ch = image.shape[-1]
    if n_ch < 3 or not np.isfinite(image).any():
        return WhiteBalance(np.ones(n_ch), np.zeros(n_ch), "none")
    sample = image[::2, ::2].reshape(-1, n_ch)
    # The sky is the mode (zemosaic_utils.sky_level): a median of a nebula-filled field sits on
    # the nebula in its colour (36 ADU too high in R on the demo mosaic) and tints the sky.
    sky = np.array([sky_level(subsample(sample[:, c], 200_000)) for c in range(n_ch)])
    noise = np.array([sigma_clipped_stats(sample[:, c])[1] for c in range(n_ch)])
    # Channel planes throughout: an (H, W, C) float64 detail image cost more to interleave and
    # compare over its short channel axis than the smoothing itself.
    detail = [image[..., c] - smooth
              for c, smooth in enumerate(_smooth_nan_planes([image[..., c] for c in range(n_ch)], smooth_px))]
    with np.errstate(invalid="ignore"):
        stars = functools.reduce(np.logical_and, [
            (detail[c] > star_kappa * noise[c]) & (image[..., c] < 0.8 * np.nanmax(image[..., c]))
            for c in range(n_ch)])
    source = "stars"
    flux = np.stack([plane[stars] for plane in detail], axis=-1)
    if stars.sum() < 50:
        above = image - sky
        lum = np.mean(above, axis=-1)
        finite = np.isfinite(lum)
        stars = finite & (lum >= np.percentile(lum[finite], 99)) & np.all(above > 0, axis=-1)
        source = "bright pixels"
        flux = above[stars]
    if stars.sum() < 10:
        return WhiteBalance(np.ones(n_ch), sky, "none")
    share = np.median(flux / flux.mean(axis=1, keepdims=True), axis=0)
    gains = share[1] / share if n_ch == 3 else 1.0 / share
    logger.info("Display white balance from %d %s: gains R,G,B = %s", int(stars.sum()), source,
                ", ".join(f"{g:.4f}" for g in gains))
    return WhiteBalance(gains.astype(np.float64), sky.astype(np.float64), source)
