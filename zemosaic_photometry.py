"""Photometry of frames: gains from stars, and the display white balance.

Works on arrays only (no files, no phases). Tiles are matched in :mod:`zemosaic_tile_photometry`.

Frames (:class:`FrameNormaliser`, the normalisation of a master tile): the
brightest usable stars of the reference frame are measured with apertures in every aligned
frame; each frame's gain is a weighted ratio of sums of the star fluxes, one grey gain unless the
channels differ significantly, then measured again against the average of the frames of the
reference's colour balance, and frames of one other balance share its colour.

The **white balance** of the display products: neutral sky, stars white on average.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from zemosaic_utils import (block_mean, mad_sigma, median_last_axis, nonzero_indices, sigma_clipped_stats,
                            sky_level, smooth_nan_planes, subsample, to_numpy)

logger = logging.getLogger(__name__)



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
# A star's R and B colours scatter by several per cent between frames, hence their larger floor
# per channel: with the mono floor in every channel, the brightest few stars would take all the
# weight and their colour errors would pass for colour terms.
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
    while a large one (another night's colour balance, several times its uncertainty) is still
    corrected.
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
    flux between R and B with a star's position on the Bayer grid (by tens of per cent per star at
    the Seestar's sampling): their errors are strongly correlated. The covariance from the stars'
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
    the same colour balance), leaving itself out, which averages those errors down: the
    per-channel gains of frames of another balance come out more precise, and closer to the
    stars' own colours, than against the reference alone.

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


class FrameNormaliser:
    """Measures frames one at a time against one reference and turns the measures into coefficients.

    ``method`` is the tile's normalisation (``zemosaic_config.NORMALIZE_METHODS``): ``linear_fit``
    measures star gains against the reference's stars, found once here (:func:`photometric_gain`),
    ``sky_mean`` sky offsets (:func:`sky_mean_coefficients`), ``none`` nothing. A frame is measured
    by :meth:`measure` as soon as it is on the reference's canvas (the alignment's threads measure
    each frame as it lands, so the stacking need not read the stack again);
    :meth:`coefficients` then turns the measures of the frames kept into ``(gains, offsets)``. The
    reference frame is held until :meth:`release`.
    """

    def __init__(self, reference, method: str = "linear_fit", xp=np):
        self.reference, self.method, self.xp = reference, method, xp
        self.n_channels = reference.shape[-1]
        self.stars = None
        if method == "linear_fit":
            self.stars = find_reference_stars(reference, xp)
            logger.debug("linear_fit: %d reference stars, FWHM %.2f px", self.stars.ys.size, self.stars.fwhm)

    def measure(self, frame):
        """Return what :meth:`coefficients` needs of ``frame`` (on the reference's canvas)."""
        if self.method == "linear_fit":
            return photometric_gain(frame, self.reference, self.xp, self.stars)
        if self.method == "sky_mean":
            return sky_mean_coefficients(frame, self.reference, self.xp)
        return None

    def release(self) -> None:
        """Let the reference frame go: every frame is measured (a frame's worth of memory)."""
        self.reference = None

    def coefficients(self, measured: list, reference_index: int):
        """Return ``(gains, offsets)``, each ``(N, C)``, from ``measured``: :meth:`measure` of every frame
        in stack order (anything at ``reference_index``).

        ``linear_fit``: star gains against the reference, then measured again against the average
        of the frames of the reference's colour balance (:func:`refine_star_gains`); a frame
        without a usable fit keeps the identity.
        """
        n, n_ch = len(measured), self.n_channels
        gains, offsets = np.ones((n, n_ch)), np.zeros((n, n_ch))
        others = [i for i in range(n) if i != reference_index]
        if self.method == "sky_mean":
            for i in others:
                gains[i], offsets[i] = measured[i]
        if self.method != "linear_fit":
            return gains, offsets
        fits = {}
        for i in others:
            fit, found = measured[i]
            if fit is None:
                logger.debug("linear_fit: degenerate fit (%s); using identity", found)
                continue
            _log_fit("linear_fit", fit)
            gains[i], offsets[i], fits[i] = fit.gains, found, fit
        return refine_star_gains(gains, offsets, fits, self.stars, reference_index)


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

    The sky is the per-channel mode (:func:`zemosaic_utils.sky_level`). Stars are pixels standing
    out of their surroundings (the
    image minus a ``smooth_px`` Gaussian, so nebulosity does not count as star light) by
    ``star_kappa`` noise sigmas in every channel, below 80 % of each channel's maximum (saturated
    cores have lost their colour). Each channel's gain makes the median star pixel grey. With
    fewer than 50 star pixels the brightest 1 % of the sky-subtracted pixels stand in. An image
    larger than ``max_pixels`` is measured on a block-averaged copy, which keeps every star's
    light and colour and costs a fraction of the smoothing at full size.
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
    # the nebula in its colour and tints the sky.
    sky = np.array([sky_level(subsample(sample[:, c], 200_000)) for c in range(n_ch)])
    noise = np.array([sigma_clipped_stats(sample[:, c])[1] for c in range(n_ch)])
    # Channel planes throughout: each plane is smoothed and compared contiguously, with no
    # (H, W, C) float64 temporary to interleave and compare over the short channel axis.
    detail = [image[..., c] - smooth
              for c, smooth in enumerate(smooth_nan_planes([image[..., c] for c in range(n_ch)], smooth_px))]
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
