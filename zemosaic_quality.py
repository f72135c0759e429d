"""Frame quality: measures per frame, screening of a group's outliers, and the reference choice.

Every frame gets its star list once (:func:`zemosaic_align_stack.alignment_stars`);
:func:`frame_quality` measures on it and on the frame what a screening needs — star count, FWHM,
star light, sky background and noise, and whether a satellite or aircraft trail crosses the
frame — on the star list and a subsample of the pixels, so that it costs little next to
loading the frame.
:func:`screen_frames` names the frames of a group far outside the group's distribution (cloud,
defocus, wind, twilight), each with its reason; :func:`choose_reference` picks the group's
reference among the frames nearest its centre by quality. A trail alone never excludes a frame
(the stack's rejection removes it); it only keeps the frame from being the reference.

Conventions (docs/architecture.md): frames are float32 ``(H, W, C)`` in ADU, NaN means "no data"; every
statistic here ignores NaN.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import scipy.ndimage
import scipy.spatial

import zemosaic_astrometry as zastro
from zemosaic_photometry import SATURATION_ADU
from zemosaic_utils import mad_sigma, pixel_noise_sigma, sky_level, subsample, unit_vectors

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Star measures
# --------------------------------------------------------------------------------------------------

#: Half side (px) of the window a star is measured in: 3.5 sigma of a PSF twice the Seestar's
#: (FWHM 5.4 px) still fits, so a defocused frame measures its own FWHM, not the window's.
STAR_RADIUS_PX = 8
#: Fewest well-measured stars for a FWHM; with fewer it is NaN.
MIN_FWHM_STARS = 5
# A star is measured when its peak stands this many sky sigmas above its local sky: fainter ones
# add noise to the median and nothing else.
_STAR_MIN_SNR = 10.0
# Any window pixel in any channel above this fraction of full well: a clipped, flattened core
# (debayering spreads it over the neighbours), whose size is not the PSF's.
_SATURATION_FRACTION = 0.8
# Rounds of the adaptive Gaussian weight; a Gaussian star is exact after one, a Moffat or noisy
# one settles within three.
_MOMENT_ROUNDS = 4
# Pixels the sky is measured on: enough for its level to a hundredth of the noise and the noise to
# half a per cent, and far fewer than a frame holds, so that measuring the sky stays cheap.
_SKY_SAMPLE = 20_000

_GAUSS_FWHM = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class FrameQuality:
    """What :func:`frame_quality` measured on one frame (ADU of the luminance: the channels' mean).

    Stars: ``n_stars``, the length of the frame's star list (the star finder keeps its 150
    brightest, so a rich field reads 150 however deep the frame is); ``n_measured``, the
    isolated, unsaturated stars peaking 10 sky sigmas or more, behind ``fwhm_px`` (their median
    FWHM, of the geometric mean of the axes for elongated stars; NaN with fewer than
    :data:`MIN_FWHM_STARS`), ``elongation`` (their median major/minor axis ratio) and
    ``star_flux`` (their geometric mean flux; NaN when none is measured);
    :attr:`star_light` combines the last two. Sky: ``background``, its level
    (``background_rgb`` per channel, empty for a mono frame), and ``noise``, one pixel's sigma.
    Trail: ``trail`` when a long straight streak crosses the frame; ``trail_fraction``, the
    share of the best candidate line's chord through the frame that bright pixels cover (0
    without a candidate), ``trail_length_px`` the covered length and ``trail_angle_deg`` the
    line's angle from the x axis (towards +y; NaN without a candidate).
    """

    n_stars: int
    n_measured: int
    fwhm_px: float
    elongation: float
    star_flux: float
    background: float
    background_rgb: tuple
    noise: float
    trail: bool
    trail_fraction: float
    trail_length_px: float
    trail_angle_deg: float

    @property
    def star_light(self) -> float:
        """Return the light of the measured stars: their number times their typical flux (ADU).

        A cloud dims every star and loses the faint ones: with a full star list (150 stars, the
        same ones in every frame) the typical flux falls with the transparency, with a short one
        the number falls too. Their product follows the transparency in both cases, where the flux
        alone misses a short list's lost stars and the count alone a full list's dimmed ones.
        """
        return self.n_measured * self.star_flux if self.n_measured else 0.0  # no star: no light

    def to_dict(self) -> dict:
        """Return the measures, :attr:`star_light` too, as a JSON-able dict (NaN as None: strict JSON)."""
        fields = {key: _json_value(value) for key, value in asdict(self).items()}
        return {**fields, "star_light": _json_value(self.star_light)}


def _json_value(value):
    """Return ``value`` for strict JSON: floats rounded to 4 decimals, NaN as None."""
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(value) else round(float(value), 4)
    return value


def frame_quality(image, stars) -> FrameQuality:
    """Return the :class:`FrameQuality` of a debayered float32 ``(H, W, C)`` frame.

    ``stars`` is the frame's ``(N, 2)`` star list ``(x, y)``
    (:func:`zemosaic_align_stack.alignment_stars`): the measures come from the stars the
    alignment finds anyway, never from a detection of their own.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[:, :, None]
    stars = np.asarray(stars, dtype=np.float64).reshape(-1, 2)
    background, background_rgb, noise = sky_measures(image)
    fwhm, elongation, flux, n_measured = star_measures(image, stars, noise)
    fraction, length, angle = trail_evidence(image)
    return FrameQuality(
        n_stars=len(stars), n_measured=n_measured, fwhm_px=fwhm, elongation=elongation,
        star_flux=flux, background=background, background_rgb=background_rgb, noise=noise,
        trail=is_trail(fraction, length, image.shape[:2]), trail_fraction=fraction,
        trail_length_px=length, trail_angle_deg=angle)


def sky_measures(image) -> tuple[float, tuple, float]:
    """Return ``(background, background per channel, noise)`` of an ``(H, W, C)`` frame.

    Both are the luminance's (the channels' mean), measured on about ``_SKY_SAMPLE`` pixels.
    The background is :func:`zemosaic_utils.sky_level` of a strided subsample (the sky's peak: a
    nebula over much of the field does not pull it up); the noise is
    :func:`zemosaic_utils.pixel_noise_sigma` of whole rows, one every few (second differences
    along them cancel a nebula or a gradient, which the plain spread of the pixels would count
    as noise; the stacking weights measure the same way).
    """
    height, width = image.shape[:2]
    sample = subsample(image, _SKY_SAMPLE)
    background_rgb = tuple(sky_level(sample[..., c]) for c in range(image.shape[2])) \
        if image.shape[2] > 1 else ()
    rows = image[::max(1, height * width // _SKY_SAMPLE)]
    noise = pixel_noise_sigma(_luminance(rows), n_max=_SKY_SAMPLE)
    return sky_level(_luminance(sample)), background_rgb, noise


def _luminance(image) -> np.ndarray:
    """Return the channels' mean of an ``(h, w, C)`` image (a strided view is read once per channel)."""
    total = np.array(image[..., 0], dtype=np.float32)
    for c in range(1, image.shape[2]):
        total += image[..., c]
    return total / np.float32(image.shape[2])


def star_measures(image, stars, noise: float) -> tuple[float, float, float, int]:
    """Return ``(FWHM px, elongation, flux, stars measured)`` over the well-measured stars.

    Each star's size comes from its second moments under a Gaussian weight that adapts to the
    star (a matched weight: the moments of a Gaussian PSF come out exact, and noise far from
    the core has no say), measured on the luminance above the median of its window's border.
    Stars near another listed star, with a window off the frame or on no-data pixels, saturated,
    fainter than ``_STAR_MIN_SNR`` sky sigmas at their peak, or whose moments do not settle are
    not measured. FWHM and elongation are the measured stars' medians (NaN with fewer than
    :data:`MIN_FWHM_STARS`), the flux their geometric mean (NaN without any).
    """
    windows, offsets = _isolated_star_windows(image, stars, STAR_RADIUS_PX)
    if len(windows) == 0:
        return math.nan, math.nan, math.nan, 0
    r = STAR_RADIUS_PX
    luminance = windows.mean(axis=-1)
    border = np.maximum(np.abs(np.arange(-r, r + 1))[:, None], np.abs(np.arange(-r, r + 1))[None, :]) == r
    light = luminance - np.median(luminance[:, border], axis=1)[:, None, None]
    unsaturated = windows.max(axis=(1, 2, 3)) < _SATURATION_FRACTION * SATURATION_ADU
    bright = light[:, r - 1:r + 2, r - 1:r + 2].max(axis=(1, 2)) >= _STAR_MIN_SNR * noise
    sigma2, elongation, flux = adaptive_moments(light, offsets)
    good = unsaturated & bright & np.isfinite(sigma2) & (sigma2 > 0) & (flux > 0)
    n_good = int(good.sum())
    if n_good == 0:
        return math.nan, math.nan, math.nan, 0
    # A geometric mean: the stars' fluxes span decades, and a mean of them would be the few
    # brightest stars' (whichever the dithering keeps in the frame). Even of a few stars: the
    # star light of a frame that kept 3 must not be unknown, it is low.
    typical_flux = float(np.exp(np.mean(np.log(flux[good]))))
    if n_good < MIN_FWHM_STARS:
        return math.nan, math.nan, typical_flux, n_good
    # A pixel integrates the PSF over its area: the measured variance holds 1/12 px^2 of it.
    fwhm = _GAUSS_FWHM * np.sqrt(np.maximum(sigma2[good] - 1.0 / 12.0, 0.0))
    return float(np.median(fwhm)), float(np.median(elongation[good])), typical_flux, n_good


def _isolated_star_windows(image, stars, radius: int):
    """Return ``(windows (n, k, k, C), offsets (n, 2))`` of the stars with no listed star nearby.

    ``k = 2 radius + 1``, centred on each star's nearest pixel; ``offsets`` are the stars'
    positions ``(x, y)`` relative to that pixel. A window off the frame or holding a NaN is left
    out, and so are stars closer than ``radius`` to another: their moments would be a blend's.
    """
    h, w = image.shape[:2]
    if len(stars) == 0:
        return np.zeros((0, 2 * radius + 1, 2 * radius + 1, image.shape[2]), np.float32), np.zeros((0, 2))
    if len(stars) > 1:
        nearest = scipy.spatial.cKDTree(stars).query(stars, k=2)[0][:, 1]
    else:
        nearest = np.full(len(stars), np.inf)
    cx, cy = np.rint(stars[:, 0]).astype(np.int64), np.rint(stars[:, 1]).astype(np.int64)
    keep = (nearest > radius) & (cx >= radius) & (cx < w - radius) & (cy >= radius) & (cy < h - radius)
    cx, cy = cx[keep], cy[keep]
    d = np.arange(-radius, radius + 1)
    windows = image[cy[:, None, None] + d[None, :, None], cx[:, None, None] + d[None, None, :]]
    finite = np.isfinite(windows).all(axis=(1, 2, 3))
    offsets = stars[keep] - np.column_stack([cx, cy])
    return windows[finite], offsets[finite]


def adaptive_moments(light, offsets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return per star ``(sigma^2 px^2, elongation, flux)`` from Gaussian-weighted second moments.

    ``light``: ``(n, k, k)`` sky-subtracted windows centred on pixel ``k // 2``; ``offsets``:
    ``(n, 2)`` first guesses of the centres ``(x, y)`` relative to it. A Gaussian weight of
    variance ``s2`` turns a Gaussian star of variance ``v`` into moments of variance
    ``m = v s2 / (v + s2)``, so ``v = m s2 / (s2 - m)``; the weight then takes the star's own
    variance (a matched filter), and the flux is the weighted sum times ``(v + s2) / s2``. For an
    elongated star ``v`` is the product of its axes' sigmas. Exact for Gaussians of sigma 1-2.5 px;
    a star wider than the window holds reads smaller (sigma 5 px: 4.8). Stars whose moments do not
    settle (no positive variance, or a centre that runs off by 2 px) get NaN.
    """
    n, k = light.shape[0], light.shape[1]
    d = np.arange(k, dtype=np.float64) - k // 2
    x0, y0 = offsets[:, 0].copy(), offsets[:, 1].copy()
    s2 = np.full(n, 1.5**2)
    max_s2 = (k / 2 / 2.5) ** 2  # the window's half side must hold 2.5 weight sigmas
    with np.errstate(invalid="ignore", divide="ignore"):
        for _ in range(_MOMENT_ROUNDS):
            gx = np.exp(-(d[None, :] - x0[:, None]) ** 2 / (2 * s2[:, None]))  # (n, k) along x
            gy = np.exp(-(d[None, :] - y0[:, None]) ** 2 / (2 * s2[:, None]))  # (n, k) along y
            weighted = light * gy[:, :, None] * gx[:, None, :]
            total = weighted.sum(axis=(1, 2))
            x0 = np.einsum("nyx,x->n", weighted, d) / total
            y0 = np.einsum("nyx,y->n", weighted, d) / total
            dx, dy = d[None, :] - x0[:, None], d[None, :] - y0[:, None]
            mxx = np.einsum("nyx,nx->n", weighted, dx**2) / total
            myy = np.einsum("nyx,ny->n", weighted, dy**2) / total
            mxy = np.einsum("nyx,ny,nx->n", weighted, dy, dx) / total
            m = 0.5 * (mxx + myy)
            weight = s2
            v = np.where((m > 0) & (m < weight), m * weight / (weight - m), np.nan)
            # A star wider than the window holds is measured under the widest weight it allows.
            s2 = np.clip(np.where(np.isfinite(v), v, weight), 0.25, max_s2)
        # Principal axes of the measured moments, each deconvolved from the weight like m.
        half_diff = np.sqrt(0.25 * (mxx - myy) ** 2 + mxy**2)
        major, minor = m + half_diff, m - half_diff
        elongation = np.sqrt((major * weight / (weight - major)) / (minor * weight / (weight - minor)))
        flux = total * (v + weight) / weight
    settled = np.isfinite(v) & (np.abs(x0 - offsets[:, 0]) < 2) & (np.abs(y0 - offsets[:, 1]) < 2) \
        & (total > 0)
    return tuple(np.where(settled, x, np.nan) for x in (v, elongation, flux))


# --------------------------------------------------------------------------------------------------
# Trails
# --------------------------------------------------------------------------------------------------

#: The trail search runs on superpixels binned to about this many pixels across the short side
#: (4x4 on a Seestar frame): a satellite trail (3-6 px wide) stays a line 1-2 superpixels wide,
#: and the search costs the same on any frame size.
TRAIL_GRID_PX = 270
#: A trail: bright pixels along one straight line cover at least this fraction of the line's
#: chord through the frame, over at least :data:`TRAIL_MIN_LENGTH` of its short side.
TRAIL_MIN_FRACTION = 0.5
TRAIL_MIN_LENGTH = 0.25
# Side (superpixels) of the box whose mean is the local background of the search: wide next to
# a trail, narrow next to nebulosity, whose structure it removes.
_TRAIL_BOX = 7
# Bright: this many sigmas of the background-subtracted superpixels above 0.
_TRAIL_KAPPA = 4.0
# A piece of trail is a connected group of bright superpixels this long at least and this many
# times longer than wide: stars and noise are round, even in blends of a few.
_PIECE_MIN_LENGTH = 8.0
_PIECE_MIN_ASPECT = 4.0
# Distance (superpixels) from the line within which a bright superpixel belongs to it, and within
# which the points of a coarse Hough line refine it.
_LINE_HALF_WIDTH = 1.5
_REFINE_PX = 4.0
_HOUGH_ANGLES = 180
# Points the Hough transform votes with at most (a bright trail of a full frame has ~2 000): its
# (points x angles) table stays a few tens of MB on any frame.
_HOUGH_POINTS = 20_000


def trail_evidence(image) -> tuple[float, float, float]:
    """Return ``(fraction, length px, angle deg)`` of the best straight streak across a frame.

    On superpixels (:data:`TRAIL_GRID_PX`), minus their local mean, bright pixels are grouped
    into connected pieces; the long thin ones (trail pieces: stars, hot pixels and noise are
    round) vote for the lines through them (a Hough transform), and the best line, refined to
    its pixels, is measured: the share of its chord through the frame that bright pixels cover
    (fraction), that length in frame pixels, and its angle from the x axis. Pixels near the
    frame's edges or its no-data (NaN) area are never bright: a footprint's edge is a line too.
    ``(0, 0, NaN)`` when no piece is long and thin.
    """
    factor = max(1, round(min(image.shape[:2]) / TRAIL_GRID_PX))
    # The green plane alone (the middle channel; a mono frame's only one): the densest Bayer
    # samples, and a satellite shines in sunlight, in every colour. One plane to bin, not three.
    channel = image.shape[2] // 2
    grey = zastro.superpixel_image(image[..., channel:channel + 1], factor)
    bright, inner = _bright_superpixels(grey)
    points = _trail_piece_points(bright)
    if len(points) == 0:
        return 0.0, 0.0, math.nan
    centre, direction = _refined_line(points, *_hough_line(points))
    covered, chord = _line_coverage(bright, inner, centre, direction)
    fraction = covered / chord if chord else 0.0
    angle = math.degrees(math.atan2(direction[1], direction[0])) % 180.0
    return float(fraction), float(covered * factor), angle


def is_trail(fraction: float, length_px: float, shape_hw) -> bool:
    """Return True when :func:`trail_evidence`'s figures make a trail that crosses the frame."""
    return fraction >= TRAIL_MIN_FRACTION and length_px >= TRAIL_MIN_LENGTH * min(shape_hw)


def _bright_superpixels(grey) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(bright, inner)`` masks of a superpixel image (NaN: no data).

    ``inner``: pixels whose whole background box holds data inside the frame; ``bright``: inner
    pixels more than ``_TRAIL_KAPPA`` robust sigmas above their box's mean.
    """
    valid = np.isfinite(grey)
    if not valid.any():
        return np.zeros(grey.shape, bool), np.zeros(grey.shape, bool)
    # Any number stands in for no data: a pixel whose box reaches it is not inner, never bright.
    fill = np.where(valid, grey, np.float32(0.0))
    residual = fill - scipy.ndimage.uniform_filter(fill, _TRAIL_BOX, mode="nearest")
    # Outside the frame counts as no data (cval 0): the frame's edges are excluded as NaN's are.
    inner = scipy.ndimage.uniform_filter(valid.astype(np.float32), _TRAIL_BOX, mode="constant") > 0.999
    values = subsample(residual[inner], _SKY_SAMPLE)
    if values.size < 3:
        return np.zeros(grey.shape, bool), inner
    sigma = float(mad_sigma(values))
    return inner & (residual > _TRAIL_KAPPA * sigma), inner


def _trail_piece_points(bright) -> np.ndarray:
    """Return the ``(n, 2)`` coordinates ``(x, y)`` of the bright pixels in long thin pieces."""
    labels, n = scipy.ndimage.label(bright, structure=np.ones((3, 3)))
    if n == 0:
        return np.zeros((0, 2))
    ys, xs = np.nonzero(labels)
    lab = labels[ys, xs]
    count = np.bincount(lab, minlength=n + 1).astype(np.float64)
    count[0] = 1.0
    mx, my = (np.bincount(lab, v, n + 1) / count for v in (xs, ys))
    dx, dy = xs - mx[lab], ys - my[lab]
    cxx, cyy, cxy = (np.bincount(lab, v, n + 1) / count for v in (dx * dx, dy * dy, dx * dy))
    half_diff = np.sqrt(0.25 * (cxx - cyy) ** 2 + cxy**2)
    # A uniform segment of length L has variance L^2 / 12 along itself (1/12 across, per pixel).
    length = np.sqrt(12.0 * (0.5 * (cxx + cyy) + half_diff))
    width = np.sqrt(12.0 * np.maximum(0.5 * (cxx + cyy) - half_diff, 0.0) + 1.0)
    piece = (length >= _PIECE_MIN_LENGTH) & (length >= _PIECE_MIN_ASPECT * width)
    piece[0] = False
    chosen = piece[lab]
    return np.column_stack([xs[chosen], ys[chosen]]).astype(np.float64)


def _hough_line(points) -> tuple[float, float]:
    """Return ``(theta, rho)`` of the line through most points: ``x cos theta + y sin theta = rho``."""
    points = points[::max(1, -(-len(points) // _HOUGH_POINTS))]  # every k-th: a line keeps its share
    theta = np.arange(_HOUGH_ANGLES) * (np.pi / _HOUGH_ANGLES)
    rho = points[:, 0:1] * np.cos(theta)[None] + points[:, 1:2] * np.sin(theta)[None]  # (n, angles)
    offset = math.ceil(np.abs(rho).max()) + 1
    bins = np.rint(rho + offset).astype(np.int64)  # 1-superpixel bins
    n_bins = 2 * offset + 1
    votes = np.bincount((bins + n_bins * np.arange(_HOUGH_ANGLES)[None]).ravel(),
                        minlength=n_bins * _HOUGH_ANGLES)
    # Two neighbouring bins: a line between bin centres must not split its votes.
    votes = votes.reshape(_HOUGH_ANGLES, n_bins)
    votes[:, :-1] += votes[:, 1:]
    best = int(np.argmax(votes))
    a, b = divmod(best, n_bins)
    return float(theta[a]), float(b - offset + 0.5)


def _refined_line(points, theta: float, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(centre, unit direction)`` of the line fitted to the points near ``(theta, rho)``.

    The Hough bins are coarse (1 degree: 2.4 superpixels at the ends of a Seestar frame's
    diagonal): the principal axis of the points within ``_REFINE_PX`` of the coarse line, twice
    (the second round about the first's line), is the trail's own.
    """
    normal = np.array([math.cos(theta), math.sin(theta)])
    centre = points[np.abs(points @ normal - rho) <= _REFINE_PX].mean(axis=0)
    direction = np.array([-normal[1], normal[0]])
    for _ in range(2):
        across = (points - centre) @ np.array([-direction[1], direction[0]])
        selected = points[np.abs(across) <= _REFINE_PX]
        if len(selected) < 2:
            break
        centre = selected.mean(axis=0)
        direction = np.linalg.eigh(np.cov((selected - centre).T))[1][:, -1]
    return centre, direction


def _line_coverage(bright, inner, centre, direction) -> tuple[int, int]:
    """Return ``(covered, chord)`` in superpixels along a line through the frame's inner part.

    ``chord``: unit steps along the line that fall on inner pixels; ``covered``: those with a
    bright pixel within ``_LINE_HALF_WIDTH`` across the line.
    """
    h, w = bright.shape
    reach = int(math.hypot(h, w)) + 1
    t = np.arange(-reach, reach + 1, dtype=np.float64)
    normal = np.array([-direction[1], direction[0]])
    offsets = np.arange(-_LINE_HALF_WIDTH, _LINE_HALF_WIDTH + 0.01, 0.5)
    x = centre[0] + t[:, None] * direction[0] + offsets[None] * normal[0]
    y = centre[1] + t[:, None] * direction[1] + offsets[None] * normal[1]
    xi, yi = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    on = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    xi, yi = np.where(on, xi, 0), np.where(on, yi, 0)
    chord = on[:, offsets.size // 2] & inner[yi[:, offsets.size // 2], xi[:, offsets.size // 2]]
    covered = chord & (on & bright[yi, xi]).any(axis=1)
    return int(covered.sum()), int(chord.sum())


# --------------------------------------------------------------------------------------------------
# Screening
# --------------------------------------------------------------------------------------------------

#: Fewest frames a group needs for screening: a distribution of two says nothing about either.
MIN_SCREEN_FRAMES = 3


@dataclass(frozen=True)
class _Test:
    """One screening test: a measure, the side that is bad, and how its reason reads."""

    measure: str  # FrameQuality attribute
    high_is_bad: bool
    ratio_key: str  # the configuration key of the ratio to the group's median
    label: str
    unit: str
    digits: int


# Cloud, fog and dew: fewer stars, fainter (the star list keeps the 150 brightest, so a rich field
# keeps its count under a cloud and its stars' light tells); defocus and wind: wider stars; cloud
# lit by the ground, the Moon or twilight: a brighter sky.
_TESTS = (
    _Test("n_stars", False, "screen_min_star_fraction", "stars", "", 0),
    _Test("star_light", False, "screen_min_star_fraction", "star light", " ADU", 0),
    _Test("fwhm_px", True, "screen_max_fwhm_ratio", "FWHM", " px", 2),
    _Test("background", True, "screen_max_background_ratio", "background", " ADU", 0),
)


#: A pause longer than this between two frames starts a new observing session (another night,
#: or the same field after others).
SESSION_GAP_HOURS = 2.0


def observing_sessions(dates_obs: Sequence[str | None], exptimes: Sequence[float | None]) -> list[list[int]]:
    """Return the frames' indices grouped by observing session, each in time order.

    A session is a run of frames of one exposure time with no pause longer than
    :data:`SESSION_GAP_HOURS`: screening compares a frame with its own session, since another
    night's sky (it may be several times brighter) and another exposure's star light are not
    a defect. Frames without a date form one session per exposure time.
    """
    def when(date):
        try:
            return np.datetime64(date, "s").astype(np.int64) / 3600.0 if date else math.nan
        except ValueError:
            return math.nan

    hours = [when(d) for d in dates_obs]
    exposure = [round(float(e), 3) if e is not None else -1.0 for e in exptimes]
    order = sorted(range(len(hours)), key=lambda i: (exposure[i], math.isnan(hours[i]), hours[i]))
    sessions: list[list[int]] = []
    for i in order:
        last = sessions[-1][-1] if sessions else None
        same = last is not None and exposure[last] == exposure[i] and (
            (math.isnan(hours[i]) and math.isnan(hours[last]))
            or abs(hours[i] - hours[last]) <= SESSION_GAP_HOURS)
        if same:
            sessions[-1].append(i)
        else:
            sessions.append([i])
    return sessions


def screen_frames(qualities: Sequence[FrameQuality], settings) -> dict[int, str]:
    """Return ``{index: reason}`` for the frames of a group far outside the group's distribution.

    ``qualities``: the :func:`frame_quality` of each frame of one group; ``settings``: a
    :class:`zemosaic_config.MosaicConfig` (``frame_screening`` and the ``screen_*`` keys). A
    frame is left out when a measure is beyond both ``screen_kappa`` robust sigmas (MAD) of the
    group's values from their median (far outside the spread: a slow drift of the sky over the
    night never is) and a ratio to the median (so far that it matters: in a steady group the
    spread is tiny): star count or :attr:`FrameQuality.star_light` below
    ``screen_min_star_fraction`` of the median (cloud, fog, dew), FWHM above
    ``screen_max_fwhm_ratio`` times it (defocus, wind), background above
    ``screen_max_background_ratio`` times it (lit cloud, twilight, the Moon).
    A trail is never a reason (the stack's rejection removes it). Screening off, or fewer than
    :data:`MIN_SCREEN_FRAMES` frames: nothing is left out. Reasons read, for example,
    ``"FWHM 5.56 px against the group's 3.04 px (limit 4.56 px)"``; several are joined by ``"; "``.
    """
    if not settings.frame_screening or len(qualities) < MIN_SCREEN_FRAMES:
        return {}
    reasons: dict[int, list[str]] = {}
    for test in _TESTS:
        values = np.array([getattr(q, test.measure) for q in qualities], dtype=np.float64)
        limit, median = _screen_limit(values, getattr(settings, test.ratio_key), settings.screen_kappa,
                                      test.high_is_bad)
        if not math.isfinite(limit):
            continue
        outside = values > limit if test.high_is_bad else values < limit
        for i in np.flatnonzero(outside):
            reasons.setdefault(int(i), []).append(_screen_reason(test, values[i], median, limit))
    screened = {i: "; ".join(texts) for i, texts in sorted(reasons.items())}
    logger.debug("screening: %d of %d frames left out", len(screened), len(qualities))
    return screened


def _screen_limit(values, ratio: float, kappa: float, high_is_bad: bool) -> tuple[float, float]:
    """Return ``(limit, median)`` of one measure over a group (NaN when too few frames measured it).

    The limit is the farther of ``median +- kappa * MAD-sigma`` and ``ratio * median``.
    """
    finite = values[np.isfinite(values)]
    if finite.size < MIN_SCREEN_FRAMES:
        return math.nan, math.nan
    median = float(np.median(finite))
    spread = kappa * float(mad_sigma(finite))
    if high_is_bad:
        return max(median + spread, ratio * median), median
    return min(median - spread, ratio * median), median


def _screen_reason(test: _Test, value: float, median: float, limit: float) -> str:
    """Return a reason such as ``"stars 12 against the group's 20 (limit 10)"``."""
    def show(x):
        return f"{x:,.{test.digits}f}{test.unit}"  # thousands grouped: star light runs to millions

    return f"{test.label} {show(value)} against the group's {show(median)} (limit {show(limit)})"


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------

#: Frames nearest the group centre the reference is chosen from: close enough that the tile's
#: grid stays centred, enough to find one without a trail or a cloud.
REFERENCE_CANDIDATES = 5
#: Scores within this fraction of the best are equal: the nearest the centre of them is taken.
#: The FWHM of equal frames scatters by 1-2 %, which moves the score by 2-4 %.
REFERENCE_TIE = 0.05


def centre_order(ra_deg, dec_deg) -> list[int]:
    """Return the indices of frames (centres in degrees) nearest their mean centre first.

    ``centre_order(...)[:REFERENCE_CANDIDATES]`` are the candidates of :func:`choose_reference`.
    """
    vectors = unit_vectors(np.asarray(ra_deg, np.float64), np.asarray(dec_deg, np.float64))
    closeness = vectors @ vectors.mean(axis=0)
    return [int(i) for i in np.argsort(-closeness, kind="stable")]


def reference_score(quality: FrameQuality) -> float:
    """Return a frame's merit as a reference: stars per PSF area, ``n_stars / FWHM^2`` (0 without FWHM).

    More stars match more surely and sharper ones place them more precisely; a frame with the
    same stars at 10 % better FWHM scores 21 % higher, one with 10 % more stars at the same FWHM
    10 %.
    """
    if not math.isfinite(quality.fwhm_px) or quality.fwhm_px <= 0:
        return 0.0
    return quality.n_stars / quality.fwhm_px**2


def choose_reference(qualities: Sequence[FrameQuality], candidates: Sequence[int],
                     screened: Mapping[int, str] | None = None,
                     names: Sequence[str] | None = None) -> tuple[int, str]:
    """Return ``(index, reason)``: the best reference among ``candidates`` and why.

    ``candidates``: frame indices (into ``qualities``) nearest the group centre first (e.g.
    ``centre_order(...)[:REFERENCE_CANDIDATES]``); ``screened``: :func:`screen_frames`' result;
    ``names``: how the reason calls each frame (default ``"frame <index>"``). A candidate with a
    trail or screened out is passed over while another is left; among the others the one with
    the best :func:`reference_score`, where scores within :data:`REFERENCE_TIE` of the best count
    as equal and the nearest the centre wins. Every candidate passed over: the nearest one not
    screened out (else the nearest), and the reason says so.
    """
    candidates = [int(i) for i in candidates]
    if not candidates:
        raise ValueError("choose_reference needs at least one candidate frame")
    screened = screened or {}
    label = (lambda i: names[i]) if names is not None else (lambda i: f"frame {i}")
    passed_over = {i: _unfit_reason(qualities[i], screened.get(i)) for i in candidates}
    eligible = [i for i in candidates if passed_over[i] is None]
    if not eligible:
        fallback = next((i for i in candidates if i not in screened), candidates[0])
        return fallback, (f"{label(fallback)}, the nearest the centre not screened out: none of the "
                          f"{len(candidates)} frames nearest the centre is fit ("
                          + ", ".join(f"{label(i)} {passed_over[i]}" for i in candidates) + ")")
    scores = {i: reference_score(qualities[i]) for i in eligible}
    best = max(scores.values())
    chosen = next(i for i in eligible if scores[i] >= (1.0 - REFERENCE_TIE) * best)
    return chosen, _reference_reason(qualities, candidates, chosen, scores, passed_over, label)


def _unfit_reason(quality: FrameQuality, screen_reason: str | None) -> str | None:
    """Return why a frame cannot be the reference (screened out, a trail), or None when it can."""
    if screen_reason is not None:
        return "is screened out"  # the screening's own reason is in the frame's report entry
    if quality.trail:
        return "has a trail"
    return None


def _reference_reason(qualities, candidates, chosen, scores, passed_over, label) -> str:
    """Return the reason of a choice: the chosen frame's figures, against whom, and who was passed over."""
    q = qualities[chosen]
    rank = candidates.index(chosen) + 1
    where = "the nearest the centre" if rank == 1 else f"{_ordinal(rank)} nearest the centre"
    text = f"{label(chosen)} ({where}): {q.n_stars} stars, FWHM {q.fwhm_px:.2f} px"
    best = max(scores, key=lambda i: (scores[i], -candidates.index(i)))
    among = f"of the {len(candidates)} frames nearest the centre"
    if len(scores) == 1:
        text += f", the only fit one {among}"
    elif best == chosen:
        text += f", the best score (stars / FWHM^2: {scores[chosen]:.2f}) {among}"
    else:
        b = qualities[best]
        text += (f", within {REFERENCE_TIE:.0%} of the best score (stars / FWHM^2: {scores[chosen]:.2f} "
                 f"against {scores[best]:.2f} for {label(best)}: {b.n_stars} stars, FWHM {b.fwhm_px:.2f} px) "
                 f"{among}")
    nearer = [i for i in candidates[:rank - 1] if i in scores]
    text += "".join(f"; {label(i)} scores {scores[i]:.2f} ({qualities[i].n_stars} stars, FWHM "
                    f"{qualities[i].fwhm_px:.2f} px)" for i in nearer)
    unfit = [f"{label(i)} {reason}" for i, reason in passed_over.items() if reason is not None]
    return "; ".join([text] + unfit)


def _ordinal(n: int) -> str:
    """Return ``"2nd"``, ``"3rd"``, ``"4th"``... for a rank."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
