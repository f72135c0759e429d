"""Alignment, normalisation, weighting, rejection and combination of a group of frames.

The numeric kernels take an array namespace ``xp`` (NumPy or CuPy) and are the single
implementation of the stacking maths: :mod:`zemosaic_align_stack_gpu` only moves blocks to the
device and back. This module never imports CuPy.

Normalisation (``linear_fit``) measures each frame's gain on the signal — aperture fluxes of the
reference's bright unsaturated stars at the same aligned positions — as a weighted ratio of sums,
grey unless the channels are precise and really differ; each frame's sky background (a
polynomial per channel, :mod:`zemosaic_background`) is subtracted with it in the row chunks.
Rejection tests each sample against the median and the spread of the *other* samples of its
pixel, never less than its frame's noise, so that it works with 3-10 frames, nor less than the
spread expected near the stars of the consensus of all frames (their per-pixel median), which no
single frame's trail can enter.

Conventions: images are float32 ``(H, W, C)``; a stack is ``(N, H, W, C)``; NaN means "no data"
and is never turned into a number before stacking. Every statistic is NaN-aware.

Quantiles along the frame axis are computed from one sort (NaN sorts last in NumPy and CuPy) and
the count of valid samples, interpolated with ``take_along_axis``: the same result as
``nanquantile``, which sorts each pixel's samples on its own (and CuPy lacks), and one sort serves
every quantile.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import ndtri

import zemosaic_astrometry as zastro
from zemosaic_config import (ALIGN_METHODS, COMBINE_METHODS, NORMALIZE_METHODS, REJECTION_ALGORITHMS,
                             require_choice)
import zemosaic_photometry as zph
from zemosaic_utils import (affine_source_coords, compute_pixel_mapping, map_threads,  # noqa: F401  (API)
                            mapping_coordinates, nonzero_indices, over_channels, pixel_noise_sigma,
                            sigma_clipped_stats, subsample, warp_affine, warp_image)

logger = logging.getLogger(__name__)

#: Stars a frame must show on 2x2 superpixels for its alignment stars to be found there.
_SUPERPIXEL_STARS = 100


#: Samples a pixel needs for rejection: fewer are combined as they are (there is no telling the
#: odd one out), and fewer do not make a median that one frame cannot decide.
MIN_REJECTION_FRAMES = 3


class AlignmentError(Exception):
    """A frame could not be aligned onto the reference (its reason is the message)."""


@dataclass(frozen=True)
class StackParams:
    """Parameters of rejection and combination (keys as in the configuration)."""

    rejection: str = "winsorized_sigma_clip"
    kappa_low: float = 3.0
    kappa_high: float = 3.0
    winsor_limits: tuple[float, float] = (0.05, 0.05)
    combine: str = "mean"
    max_iterations: int = 5
    #: The share of a pixel's local contrast its samples may spread by (:class:`NoiseFloor`);
    #: None: :data:`SIGNAL_SPREAD`.
    signal_spread: float | None = None

    def __post_init__(self):
        require_choice("rejection", self.rejection, REJECTION_ALGORITHMS)
        require_choice("combine", self.combine, COMBINE_METHODS)


# --------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------


def alignment_stars(image) -> np.ndarray:
    """Return the ``(N, 2)`` star list ``(x, y)`` that aligns a debayered ``(H, W, C)`` frame.

    Found on 2x2 superpixels (a quarter of the pixels to scan: the detection holds the GIL, so
    it would not run in parallel threads) and centroided at full resolution
    (:func:`zemosaic_astrometry.refine_centroids`), which makes them as precise as a detection at
    full resolution: transforms within 0.01-0.02 px of the synthetic frames' true ones, in less
    time. A frame with fewer than ``_SUPERPIXEL_STARS`` stars on
    superpixels (small or sparse: fainter stars spread over too few superpixels) is searched at
    full resolution, where it finds a third more.
    """
    coarse = zastro.frame_stars(image, binning=2, min_pixels=3)
    if len(coarse) >= _SUPERPIXEL_STARS:
        return zastro.refine_centroids(image, coarse)
    return zastro.frame_stars(image, binning=1)


def find_star_transform(source_stars, reference_stars, guess=None) -> np.ndarray:
    """Return the 3x3 affine matrix taking reference pixel ``(x, y, 1)`` to source pixel coordinates.

    ``source_stars``/``reference_stars`` are ``(N, 2)`` star lists ``(x, y)``
    (:func:`alignment_stars`), so a group's reference is detected once, not once per frame.
    Matching is :func:`zemosaic_astrometry.match_stars` (astroalign's triangles, then a
    least-squares similarity fit on every matched star: the same transform on every run; frames of
    one camera differ by a rotation and a shift, and an affine fit's extra terms only add noise
    when a small frame has a few dozen stars); ``guess`` (source -> reference, from the WCSs) is
    tried before the triangles. Raises :class:`AlignmentError` with the reason when matching fails.
    """
    try:
        matrix, n_matched, rms = zastro.match_stars(source_stars, reference_stars, guess, "similarity")
    except zastro.SolveError as exc:
        raise AlignmentError(str(exc)) from exc
    logger.debug("star alignment: %d stars, rms %.2f px", n_matched, rms)
    # The match maps source -> reference; resampling needs reference -> source.
    return np.linalg.inv(matrix)


def wcs_source_coords(wcs_source, shape_source, wcs_reference, shape_reference, xp=np):
    """Return source coordinates ``(y, x)`` of every reference pixel from the two WCSs.

    Pixels whose position falls outside the source's bounding box get ``-2`` (outside the image,
    so resampling marks them as no data).
    """
    h, w = shape_reference
    y_src = xp.full((h, w), -2.0)
    x_src = xp.full((h, w), -2.0)
    mapping = compute_pixel_mapping(wcs_source, shape_source, wcs_reference, shape_reference)
    if mapping is None:
        raise AlignmentError("frame does not overlap the reference (WCS)")
    rows, cols = mapping.slices
    y_src[rows, cols], x_src[rows, cols] = mapping_coordinates(mapping, 0, mapping.shape[0], xp)
    return y_src, x_src


@dataclass(frozen=True)
class Canvas:
    """Output grid of an alignment: the reference grid grown to hold every frame of a group.

    Reference pixel ``(y, x)`` is canvas pixel ``(y + offset[0], x + offset[1])``; ``wcs`` is the
    reference WCS shifted accordingly (None when the reference has no WCS).
    """

    shape: tuple[int, int]
    offset: tuple[int, int] = (0, 0)
    wcs: object = None


def group_canvas(wcs_reference, shape_reference, frames, margin: int = 2) -> Canvas:
    """Return the :class:`Canvas` that holds every frame ``(wcs, (h, w))`` of a group.

    Dithers and field rotation move frames off the reference; a canvas of the reference's size
    would throw their overhanging parts away.
    """
    h, w = shape_reference
    y0, y1, x0, x1 = 0.0, h - 1.0, 0.0, w - 1.0
    for wcs, (fh, fw) in frames:
        world = wcs.pixel_to_world_values(np.array([0, fw - 1, 0, fw - 1]), np.array([0, 0, fh - 1, fh - 1]))
        xs, ys = wcs_reference.world_to_pixel_values(*world)
        if np.all(np.isfinite(xs)) and np.all(np.isfinite(ys)):
            y0, y1 = min(y0, ys.min()), max(y1, ys.max())
            x0, x1 = min(x0, xs.min()), max(x1, xs.max())
    oy, ox = int(np.ceil(-y0)) + margin if y0 < 0 else 0, int(np.ceil(-x0)) + margin if x0 < 0 else 0
    shape = (int(np.ceil(y1)) + oy + 1 + (margin if y1 > h - 1 else 0),
             int(np.ceil(x1)) + ox + 1 + (margin if x1 > w - 1 else 0))
    canvas_wcs = wcs_reference.deepcopy()
    canvas_wcs.wcs.crpix = [wcs_reference.wcs.crpix[0] + ox, wcs_reference.wcs.crpix[1] + oy]
    canvas_wcs.wcs.set()
    return Canvas(shape, (oy, ox), canvas_wcs)


def crop_canvas(stack, canvas: Canvas, wcs_reference, shape_reference, frames, scale: int = 1):
    """Return ``(stack view, canvas)`` cut to the canvas of ``frames`` ``(wcs, (h, w))``, those stacked.

    A group's canvas is sized before its frames are loaded; one skipped then (unreadable data, all
    zeros) must not leave its empty footprint in the tile. The canvas of the stacked frames is a
    window of the full one (same reference, same margin), so the view holds every aligned pixel.
    ``scale``: the stack is on a grid that many times finer than the canvas (Bayer drizzle).
    """
    used = group_canvas(wcs_reference, shape_reference, frames)
    dy, dx = scale * (canvas.offset[0] - used.offset[0]), scale * (canvas.offset[1] - used.offset[1])
    h, w = scale * used.shape[0], scale * used.shape[1]
    return stack[:, dy:dy + h, dx:dx + w], used


def place_reference(reference, canvas: Canvas, out=None):
    """Return the reference frame on its canvas (an exact copy, NaN around it), in ``out`` when given."""
    if out is None and canvas.shape == reference.shape[:2]:
        return np.asarray(reference, dtype=np.float32)
    if out is None:
        out = np.empty(canvas.shape + reference.shape[2:], np.float32)
    out.fill(np.nan)
    oy, ox = canvas.offset
    out[oy:oy + reference.shape[0], ox:ox + reference.shape[1]] = reference
    return out


@dataclass(frozen=True)
class FrameMapping:
    """Where a frame lies on a canvas: ``matrix`` (3x3 affine, canvas pixel -> frame pixel, from the
    star match) or, without one, the frame's ``wcs`` (through the canvas's WCS)."""

    matrix: np.ndarray | None = None
    wcs: object = None


def resample_bilinear(image, mapping: FrameMapping, canvas: Canvas, out=None):
    """Return ``image`` resampled onto the canvas through ``mapping`` (bilinear, NaN outside it)."""
    if mapping.matrix is not None:
        return warp_affine(image, mapping.matrix, canvas.shape, out=out)
    y_src, x_src = wcs_source_coords(mapping.wcs, image.shape[:2], canvas.wcs, canvas.shape)
    return warp_image(image, y_src, x_src, out=out)


def align_frame(image, reference, method="astroalign", wcs=None, wcs_reference=None,
                canvas: Canvas | None = None, reference_stars=None, out=None, image_stars=None,
                resample=resample_bilinear):
    """Return one ``(H, W, C)`` frame resampled onto the reference grid, NaN outside its footprint.

    ``method="astroalign"`` matches stars and falls back to the WCS when matching fails and both
    WCSs are given; ``method="wcs"`` uses the WCSs only. ``canvas`` (default: the reference grid)
    is the output grid. ``reference_stars`` (:func:`alignment_stars` of the reference) saves
    detecting them again for every frame of a group; ``image_stars``, those of ``image``, when the
    caller has them. ``out``: the canvas-sized float32 array to write into (default: a new one).
    ``resample(image, mapping, canvas, out)`` puts the frame on the canvas once its
    :class:`FrameMapping` is known (default: :func:`resample_bilinear`).
    Raises :class:`AlignmentError`.
    """
    require_choice("method", method, ALIGN_METHODS)
    canvas = canvas or Canvas(reference.shape[:2], (0, 0), wcs_reference)
    have_wcs = wcs is not None and canvas.wcs is not None
    if method == "astroalign":
        if reference_stars is None:
            reference_stars = alignment_stars(reference)
        # Canvas pixel (x, y) is reference pixel (x - offset_x, y - offset_y).
        shift = np.array([[1.0, 0.0, -canvas.offset[1]], [0.0, 1.0, -canvas.offset[0]], [0, 0, 1]])
        # Two WCSs already say roughly where the stars go: matching then needs no triangles.
        guess = zastro.wcs_affine(wcs, image.shape[:2], canvas.wcs) if have_wcs else None
        guess = None if guess is None else shift @ guess
        try:
            stars = alignment_stars(image) if image_stars is None else image_stars
            matrix = find_star_transform(stars, reference_stars, guess)
            return resample(image, FrameMapping(matrix @ shift), canvas, out)
        except AlignmentError as exc:
            if not have_wcs:
                raise
            logger.debug("%s; falling back to WCS reprojection", exc)
    if not have_wcs:
        raise AlignmentError("WCS alignment needs the WCS of the frame and of the reference")
    return resample(image, FrameMapping(wcs=wcs), canvas, out)


def _frame_data(frame):
    """Return a frame's ``(H, W, C)`` data: the array itself, or what its loader returns."""
    return frame() if callable(frame) else frame


def _own_canvas(canvas: Canvas, threads: int) -> Canvas:
    """Return ``canvas``, with a WCS of its own when frames are aligned in several threads.

    astropy's WCS objects are not thread-safe. The copy is made in the calling thread, the only
    one that reads the shared original.
    """
    if threads <= 1 or canvas.wcs is None:
        return canvas
    return replace(canvas, wcs=canvas.wcs.deepcopy())


def _results_in_order(pool, fn, jobs, depth: int):
    """Yield ``fn(*job)`` for every job in the order of ``jobs``, ``depth`` of them on ``pool`` at once.

    Whichever finishes first, the results come back in order, so what the caller builds from them
    does not depend on the number of threads; at most ``depth`` of them exist at a time. ``jobs``
    is consumed in the calling thread.
    """
    pending = deque()
    for job in jobs:
        pending.append(pool.submit(fn, *job))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _collect_aligned(attempt, n: int, canvas: Canvas, threads: int, out, on_frame, first: int = 0):
    """Run ``attempt(i, canvas)`` for frames ``0..n-1``, frame ``first`` before all others; returns
    ``(aligned, failed)``.

    ``attempt`` returns the aligned frame or the exception that makes it fail. Successes are
    packed into ``out`` in order when it is given (``aligned`` then holds their slots); an array
    ``out`` (a stack in RAM) has frame ``i`` written into ``out[i]`` by ``attempt`` itself, and
    is only packed when a frame before it failed.
    """
    threads = max(1, threads)
    aligned, failed, n_ok = [None] * n, [], 0
    done = {first: attempt(first, _own_canvas(canvas, threads))}  # in this thread, before the others start

    def run(i, own_canvas):
        return done.pop(i) if i in done else attempt(i, own_canvas)

    jobs = ((i, _own_canvas(canvas, threads)) for i in range(n))
    with ThreadPoolExecutor(threads, thread_name_prefix="align") as pool:
        for i, result in enumerate(_results_in_order(pool, run, jobs, threads)):
            if isinstance(result, Exception):
                failed.append((i, str(result)))
            else:
                if isinstance(out, np.ndarray):
                    if n_ok != i:  # earlier slots are done: frames arrive in order
                        out[n_ok] = out[i]
                    result = n_ok
                elif out is not None:
                    # The slot, not out[n_ok]: read back from a disk-backed stack, every frame
                    # would be held in memory again.
                    out[n_ok], result = result, n_ok
                aligned[i], n_ok = result, n_ok + 1
            if on_frame is not None:
                on_frame(i, aligned[i] is not None)
    return aligned, failed


def align_images_in_group(images, reference_index, wcs_list=None, method="astroalign", *, canvas=None,
                          out=None, reference_stars=None, threads: int = 1, on_frame=None, skip=(),
                          stars_of=None, resample=None, measure=None):
    """Align a group of ``(H, W, C)`` frames onto the frame at ``reference_index``.

    Parameters
    ----------
    images : list of float32 ``(H, W, C)`` arrays or loaders, zero-argument callables that return
        one; a loader is called when its frame's turn comes, so memory holds a few frames besides
        the result
    reference_index : index of the reference frame (placed on the canvas, not resampled)
    wcs_list : optional celestial WCS per frame; used by ``method="wcs"`` and as the per-frame
        fallback when star matching fails
    method : ``"astroalign"`` (star matching) or ``"wcs"`` (reprojection through the WCSs)
    canvas : the output grid (:func:`group_canvas`); default: the reference grid and WCS
    out : optional ``(N, H, W, C)`` array on the canvas (a disk-backed stack, say) that receives the
        aligned frames, packed in order; ``aligned`` then holds each frame's slot in it (an int)
    reference_stars : :func:`alignment_stars` of the reference, when the caller already has them
    threads : how many frames are loaded and aligned at once; the result is the same for any number
    on_frame : ``on_frame(index, ok)``, called in the calling thread after each frame in order, the
        reference included (``ok`` False: the frame failed); an exception it raises (a
        cancellation) stops the alignment and propagates
    skip : exception types which, raised by a loader, mean that its frame cannot be used
    stars_of : ``stars_of(index)``, called after the frame's loader, returns its
        :func:`alignment_stars` when the caller found them already (None: detected here)
    resample : ``resample(index)`` returns the ``resample(image, mapping, canvas, out)`` that puts
        frame ``index`` on the canvas (:func:`align_frame`), the reference's included (through
        the canvas's offset); None: bilinear, and the reference placed as it is
    measure : ``measure(index, frame)``, called in the aligning thread with each frame as it lands
        on the canvas (a frame in ``out`` may be moved to an earlier slot when one before it failed,
        so only the frames before any failure, the reference in slot 0 say, may be kept): what the caller
        measures on aligned frames without reading the stack back; the reference is aligned and
        measured before any other frame starts

    Returns
    -------
    aligned : list with a float32 ``(H, W, C)`` array per frame (its slot in ``out`` when given),
        None for frames that failed
    failed : list of ``(index, reason)`` for frames that could not be loaded or aligned

    A frame fails with :class:`AlignmentError` (no star match and no WCS to fall back on, or a
    channel count other than the reference's) or with an exception of ``skip``; any other exception
    propagates, and so does any failure to load the reference.
    """
    require_choice("method", method, ALIGN_METHODS)
    reference = np.asarray(_frame_data(images[reference_index]), dtype=np.float32)
    wcs_of = (lambda i: None) if wcs_list is None else wcs_list.__getitem__
    canvas = canvas or Canvas(reference.shape[:2], (0, 0), wcs_of(reference_index))
    if method == "astroalign" and reference_stars is None:
        reference_stars = alignment_stars(reference)  # once for the whole group

    def attempt(i, own_canvas):
        """Return frame ``i`` on the canvas (measured), or the exception that makes it fail."""
        aligned = put_on_canvas(i, own_canvas)
        if measure is not None and not isinstance(aligned, Exception):
            measure(i, aligned)
        return aligned

    def put_on_canvas(i, own_canvas):
        # Straight into a stack in RAM: no frame-sized copy and no fresh frame of memory each.
        slot = out[i] if isinstance(out, np.ndarray) else None
        if i == reference_index:
            if resample is None:
                return place_reference(reference, own_canvas, out=slot)
            oy, ox = own_canvas.offset
            return resample(i)(reference, FrameMapping(np.array([[1.0, 0, -ox], [0, 1.0, -oy], [0, 0, 1]])),
                               own_canvas, slot)
        try:
            image = _frame_data(images[i])
            if image.shape[2] != reference.shape[2]:
                raise AlignmentError("channel count differs from the reference frame")
            return align_frame(image, reference, method, wcs_of(i), canvas=own_canvas,
                               reference_stars=reference_stars, out=slot,
                               image_stars=None if stars_of is None else stars_of(i),
                               resample=resample_bilinear if resample is None else resample(i))
        except (AlignmentError, *skip) as exc:
            return exc

    return _collect_aligned(attempt, len(images), canvas, threads, out, on_frame, reference_index)


# --------------------------------------------------------------------------------------------------
# Normalisation and weights (per frame, per channel; computed on a subsample for speed)
# --------------------------------------------------------------------------------------------------


# Pixels per frame for the rejection's noise floor when the caller did not measure it: the
# MAD-sigma of 10 000 sky pixels is good to ~2 %, and measuring it must stay cheap next to
# stacking 50 full frames.
_FLOOR_SUBSAMPLE = 10_000
#: Spread expected between aligned frames of a pixel near a star, as a fraction of the star's
#: contrast (see :func:`signal_map`): seeing, sub-pixel alignment and the Bayer sampling of
#: undersampled stars change a star's core and wings by tens of per cent of its peak from frame
#: to frame (a FWHM 12 % smaller raises the peak by 25 %), more in R and B (one pixel in four,
#: whose interpolated peak depends on where the star falls on the Bayer grid) than in G. Without
#: it the rejection clips the sharpest frames' cores and the broadest frames' wings: up to 4 % of
#: the stars' flux with 3-6 synthetic frames (tests); on the shared real subs a 4-frame region's
#: stars lost 3 % in R and B against G with no term, 1.3 % with 0.25 and nothing with 0.5.
SIGNAL_SPREAD = 0.5
#: Radius (pixels) of the neighbourhood whose contrast sets a pixel's expected spread: a star's
#: wings, out to ~3 FWHM of a Seestar star.
SIGNAL_RADIUS_PX = 3


def normalization_coefficients(stack, reference_index, method="linear_fit", xp=np, threads: int = 1):
    """Return ``(gains, offsets)``, each ``(N, C)``, normalising every frame of a stack to the reference.

    ``linear_fit``: gains from the stars; ``sky_mean``: sky offsets only; ``none``: identity
    (:class:`zemosaic_photometry.FrameNormaliser`, ``threads`` frames measured at once).
    """
    require_choice("method", method, NORMALIZE_METHODS)
    normaliser = zph.FrameNormaliser(stack[reference_index], method, xp)
    measured = map_threads(lambda i: None if i == reference_index else normaliser.measure(stack[i]),
                           range(stack.shape[0]), threads)
    return normaliser.coefficients(measured, reference_index)


#: Pixel differences per frame whose spread sets its noise: 120 000 give sigma to ~0.3 %.
_NOISE_SUBSAMPLE = 120_000


def image_noise_sigmas(image, n_max: int = _NOISE_SUBSAMPLE, xp=np) -> np.ndarray:
    """Return the ``(C,)`` pixel noise sigma of an ``(H, W, C)`` image (NaN where not measurable).

    :func:`zemosaic_utils.pixel_noise_sigma` of each channel (about ``n_max`` pixel differences):
    the noise, which the sky's gradients and nebulosity do not widen. Measured on a frame before
    it is resampled, it is the frame's own noise; after, it depends on the frame's sub-pixel shift
    too (bilinear resampling averages neighbours: up to 2x less sigma at half-pixel shifts).
    """
    image = xp.asarray(image)
    return np.array([pixel_noise_sigma(image[..., c], n_max, xp) for c in range(image.shape[-1])], np.float64)


def frame_noise_sigmas(stack, gains=None, xp=np, n_max: int = _NOISE_SUBSAMPLE, threads: int = 1):
    """Return the ``(N, C)`` noise sigma of every frame of a stack after normalisation by ``gains``.

    Each is :func:`image_noise_sigmas` of the frame as it is in the stack: for aligned frames,
    the spread of their samples, which the rejection tests against. A frame or channel without an
    estimate gets the median of the others (0 when no frame has one), so it never becomes NaN
    downstream. ``threads`` frames are measured at once.
    """
    n, n_ch = stack.shape[0], stack.shape[-1]
    gains = np.ones((n, n_ch)) if gains is None else np.asarray(gains, dtype=np.float64)
    raw = map_threads(lambda i: image_noise_sigmas(stack[i], n_max, xp), range(n), threads)
    return filled_noise_sigmas(np.array(raw, dtype=np.float64).reshape(n, n_ch) * gains)


def filled_noise_sigmas(sigmas) -> np.ndarray:
    """Return ``(N, C)`` sigmas with each missing or non-positive one replaced by its channel's median
    (0 when no frame has one), so that none becomes NaN downstream."""
    sigmas = np.array(sigmas, dtype=np.float64)
    for c in range(sigmas.shape[1]):
        ok = np.isfinite(sigmas[:, c]) & (sigmas[:, c] > 0)
        sigmas[~ok, c] = np.median(sigmas[ok, c]) if ok.any() else 0.0
    return sigmas


def noise_variance_weights(stack, gains=None, xp=np, sigmas=None):
    """Return ``(N, C)`` weights ``1 / sigma^2`` of the normalised frames, the best frame = 1 per channel.

    ``sigmas``: each frame's noise in normalised units, best measured before the frames were
    resampled (:func:`image_noise_sigmas` times the gains), so that frames of equal noise weigh
    the same whatever their sub-pixel shifts; without it, :func:`frame_noise_sigmas` of ``stack``.
    """
    sigmas = frame_noise_sigmas(stack, gains, xp) if sigmas is None else np.asarray(sigmas, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        weights = 1.0 / sigmas**2
    weights[~np.isfinite(weights)] = 0.0
    best = weights.max(axis=0)
    best[best == 0] = 1.0
    weights = weights / best
    weights[:, (weights == 0).all(axis=0)] = 1.0  # a channel with no usable estimate: equal weights
    return weights


# --------------------------------------------------------------------------------------------------
# Rejection and combination kernels (one block of rows: (N, h, W, C))
# --------------------------------------------------------------------------------------------------


def _gaussian_winsor_variance(limits) -> float:
    """Return the variance of a unit Gaussian winsorized at quantiles ``(low, 1 - high)``.

    Dividing the winsorized variance by it gives an unbiased sigma for Gaussian noise.
    """
    q_lo, q_hi = limits[0], 1.0 - limits[1]
    if q_lo <= 0.0 and q_hi >= 1.0:
        return 1.0
    a = ndtri(q_lo) if q_lo > 0 else -np.inf
    b = ndtri(q_hi) if q_hi < 1 else np.inf

    def phi(z):
        return 0.0 if not np.isfinite(z) else math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)

    za = a if np.isfinite(a) else 0.0
    zb = b if np.isfinite(b) else 0.0
    # E[X^2] of the winsorized variable: truncated part + the clamped tails.
    inner = (q_hi - q_lo) + za * phi(a) - zb * phi(b)
    tails = q_lo * za * za + (1.0 - q_hi) * zb * zb
    mean = phi(a) - phi(b) + q_lo * za + (1.0 - q_hi) * zb
    return float(inner + tails - mean * mean)


def sorted_quantile(sorted_block, n_valid, q, xp):
    """Return the ``q`` quantile (linear interpolation) along axis 0 of a sorted block.

    ``sorted_block`` is sorted along axis 0 with NaN last; ``n_valid`` is the count of valid
    samples per pixel — an int when every sample is valid (the plain, faster path). Pixels with
    no valid sample give NaN.
    """
    if isinstance(n_valid, int):
        pos = q * (n_valid - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n_valid - 1)
        frac = pos - lo
        return sorted_block[lo] + (sorted_block[hi] - sorted_block[lo]) * frac
    pos = q * (n_valid - 1).astype(xp.float32)
    lo = xp.clip(xp.floor(pos), 0, None).astype(xp.int64)
    hi = xp.minimum(lo + 1, xp.maximum(n_valid - 1, 0))
    frac = (pos - lo).astype(sorted_block.dtype)
    v_lo = xp.take_along_axis(sorted_block, lo[None], axis=0)[0]
    v_hi = xp.take_along_axis(sorted_block, hi[None], axis=0)[0]
    out = v_lo + (v_hi - v_lo) * frac
    return xp.where(n_valid > 0, out, xp.nan)


#: Frames up to which a block is sorted by a compare-exchange network of whole-plane minimum and
#: maximum: NumPy sorts each pixel's few samples as a separate small, strided array. Beyond this
#: the network's compare-exchanges outnumber what that saves (benchmarks/bench_kernels.py).
_SORT_NETWORK_MAX = 8


@functools.lru_cache(maxsize=None)
def _merge_network(n: int) -> tuple:
    """Return the compare-exchange pairs ``(i, j)``, i < j, of Batcher's odd-even merge sort of n."""
    pairs, p = [], 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple(pairs)


def sort_frames(block, xp=np):
    """Return ``xp.sort(block, axis=0)``: each pixel's samples in order, NaN last.

    A block of at most :data:`_SORT_NETWORK_MAX` frames goes through a sorting network on whole
    planes (NaN as +inf, then the last ``count`` of each pixel set back to NaN): the same values.
    """
    n = block.shape[0]
    if n > _SORT_NETWORK_MAX:
        return xp.sort(block, axis=0)
    nan = xp.isnan(block)
    n_nan = xp.sum(nan, axis=0)
    has_nan = bool(xp.any(n_nan))
    planes = [xp.where(nan[i], xp.inf, block[i]) if has_nan else block[i].copy() for i in range(n)]
    for i, j in _merge_network(n):
        low = xp.minimum(planes[i], planes[j])
        xp.maximum(planes[i], planes[j], out=planes[j])
        planes[i] = low
    out = xp.stack(planes)
    if has_nan:
        rank = xp.arange(n).reshape((n,) + (1,) * (block.ndim - 1))
        out = xp.where(rank >= n - n_nan[None], xp.nan, out)
    return out


def _sort_and_count(block, xp, has_nonfinite=None):
    """Return ``(sorted block, n_valid)``: NaN sorts last; n_valid is an int for all-finite blocks."""
    if has_nonfinite is None:
        has_nonfinite = not bool(xp.all(xp.isfinite(block)))
    if not has_nonfinite:
        return sort_frames(block, xp), int(block.shape[0])
    block = xp.where(xp.isfinite(block), block, xp.nan)  # inf is not data either
    return sort_frames(block, xp), xp.sum(xp.isfinite(block), axis=0)


def winsorize_block(block, winsor_limits, xp=np, has_nonfinite=None):
    """Return ``(winsorized block, sorted block, n_valid)`` for a ``(N, ...)`` block.

    Valid samples are clamped to their per-pixel quantiles ``low`` and ``1 - high``; NaN stays NaN.
    """
    sorted_block, n_valid = _sort_and_count(block, xp, has_nonfinite)
    lo = sorted_quantile(sorted_block, n_valid, winsor_limits[0], xp)
    hi = sorted_quantile(sorted_block, n_valid, 1.0 - winsor_limits[1], xp)
    return xp.clip(block, lo[None], hi[None]), sorted_block, n_valid


def _winsorize_block_numpy(block, winsor_limits):
    """Return the winsorized copy of a NumPy ``(N, ...)`` block (NaN-safe, CPU)."""
    return winsorize_block(block, winsor_limits, np)[0]


def _moment_sums(dev, valid, xp):
    """Return the sums over axis 0 of the deviations and of their squares, valid samples only.

    ``dev`` holds deviations from the pixel's median, of the order of sigma, so the sum of squares
    has no cancellation; ``valid`` is None when every sample counts.
    """
    if valid is not None:
        dev = xp.where(valid, dev, 0)
    return xp.sum(dev, axis=0), xp.sum(dev * dev, axis=0)


def _leave_one_out_variance(w, s1, s2, n):
    """Return the unbiased variance of the *other* samples of a pixel, for samples at deviation ``w``.

    ``s1``/``s2`` are the pixel's sums of deviations and squares over its ``n`` samples (n >= 3).
    From ``sum_{j != i} (w_j - m_-i)^2 = sum_j (w_j - m)^2 - n / (n - 1) (w_i - m)^2``: no second
    pass over the samples. Negative round-off (a lone huge outlier) clamps to 0.
    """
    mean = s1 / n
    spread = s2 - s1 * mean - n / (n - 1) * (w - mean) ** 2
    return (spread / (n - 2)).clip(0, None)


def _clip_test(values, keep, centre, deviations, n_kept, scale, floor, params, xp):
    """Return the keep mask after testing every kept sample against the *other* samples' spread.

    A sample is rejected when it lies below ``centre - kappa_low * s`` or above
    ``centre + kappa_high * s``, where ``s`` is the larger of its frame's expected spread (the
    :class:`NoiseFloor`: the frame's noise, plus :data:`SIGNAL_SPREAD` of the pixel's signal above
    the sky; None for 0) and ``scale`` times the standard deviation of the pixel's other kept
    samples, computed from their (winsorized) deviations: ``deviations(column)`` returns them for a
    selection of pixels (``(slice(None),) + pixel index arrays``; None: the whole block). With 3-10
    frames an outlier
    inflates a standard deviation that includes it so much that it can never lie beyond 3 sigma
    of it; with 3 frames the two others' spread alone is a poor sigma (one degree of freedom),
    hence the floor. Pixels with fewer than three kept samples keep them all.

    Only samples beyond kappa times the floor can fail, so the spread is computed for those alone
    (and their pixels' deviations only for them): with the floor near the noise they are a few per
    thousand of the samples.
    """
    dev = values - centre[None]
    noise = 0 if floor is None else floor.sigma
    if params.kappa_low == params.kappa_high:  # one comparison fewer over the block
        candidate = xp.abs(dev) > params.kappa_high * noise
    else:
        candidate = (dev < -params.kappa_low * noise) | (dev > params.kappa_high * noise)
    if not isinstance(n_kept, int):  # an int count: every sample is kept
        candidate &= keep
    index = nonzero_indices(candidate, xp)
    if not isinstance(n_kept, int):
        index = tuple(i[n_kept[index[1:]] >= MIN_REJECTION_FRAMES] for i in index)
    elif n_kept < MIN_REJECTION_FRAMES:
        return keep
    if index[0].size == 0:
        return keep
    pixel = index[1:]
    valid = None if isinstance(n_kept, int) else keep
    if index[0].size * values.shape[0] < values.size:  # few candidates: sums over their pixels only
        column = (slice(None),) + pixel
        wdev = deviations(column)
        s1, s2 = _moment_sums(wdev, None if valid is None else valid[column], xp)
        tested = wdev[index[0], xp.arange(index[0].size)]
    else:
        wdev = deviations(None)
        s1, s2 = (t[pixel] for t in _moment_sums(wdev, valid, xp))
        tested = wdev[index]
    n = n_kept if isinstance(n_kept, int) else n_kept[pixel].astype(values.dtype)
    sigma = scale * xp.sqrt(_leave_one_out_variance(tested, s1, s2, n))
    if floor is not None:
        sigma = xp.maximum(sigma, floor.at(index, values.shape, xp))
    d = dev[index]
    rejected = (d < -params.kappa_low * sigma) | (d > params.kappa_high * sigma)
    keep = keep.copy()
    keep[tuple(i[rejected] for i in index)] = False
    return keep


def _combine(block, keep, weights, combine, xp, finite=False):
    """Return the combination of kept samples: weighted mean or median; NaN where none is kept.

    ``finite``: the block holds no NaN, so a zero weight alone leaves a sample out of the mean.
    """
    if combine == "median":
        masked = xp.where(keep, block, xp.nan)
        srt = sort_frames(masked, xp)
        return sorted_quantile(srt, xp.sum(keep, axis=0), 0.5, xp)
    w = xp.where(keep, weights, 0)
    wsum = xp.sum(w, axis=0)
    num = xp.sum((block if finite else xp.where(keep, block, 0)) * w, axis=0)
    return xp.where(wsum > 0, num / xp.where(wsum > 0, wsum, 1), xp.nan)


def _winsorized_round(values, keep, params, xp, masked, floor=None, stats=None):
    """One round of winsorized sigma clipping; returns the new keep mask.

    The kept samples are winsorized at their quantiles; the centre is their median. Each sample is
    tested against the winsorized standard deviation of the *other* kept samples, made unbiased for
    Gaussian noise and raised to ``floor``, the noise of its frame (:func:`_clip_test`).
    ``masked`` says whether ``values`` must first be masked with ``keep`` (False only on a first
    round, where ``keep`` is just "finite" and an all-finite block can take the plain quantile path).
    ``stats``: the first round's :class:`PixelStats` of the block, already measured (no sort).
    """
    current = xp.where(keep, values, xp.nan) if masked else values
    has_nonfinite = masked or not bool(xp.all(keep))
    if stats is not None:
        centre, low, high = stats.centre, stats.low, stats.high
        n_valid = stats.n_valid if has_nonfinite else int(values.shape[0])
    else:
        centre, low, high, n_valid = _sorted_statistics(current, params, xp, has_nonfinite)

    def deviations(column):
        """Winsorized deviations from the centre, for the pixels of ``column`` (None: all)."""
        if column is None:
            return xp.clip(current, low[None], high[None]) - centre[None]
        pixel = column[1:]
        return xp.clip(current[column], low[pixel], high[pixel]) - centre[pixel]

    scale = 1.0 / math.sqrt(_gaussian_winsor_variance(params.winsor_limits))
    return _clip_test(values, keep, centre, deviations, n_valid, scale, floor, params, xp)


def _kappa_sigma_round(values, keep, params, xp, masked=True, floor=None, stats=None):
    """One round of kappa-sigma clipping around the median of the kept samples.

    Each sample is tested against the standard deviation of the other kept samples, raised to the
    noise of its frame ``floor`` (:func:`_clip_test`). ``stats``: see :func:`_winsorized_round`.
    """
    current = xp.where(keep, values, xp.nan)
    n_kept = xp.sum(keep, axis=0)
    centre = sorted_quantile(sort_frames(current, xp), n_kept, 0.5, xp) if stats is None else stats.centre

    def deviations(column):
        """Deviations of the kept samples from the centre, for the pixels of ``column`` (None: all)."""
        if column is None:
            return current - centre[None]
        return current[column] - centre[column[1:]]

    return _clip_test(values, keep, centre, deviations, n_kept, 1.0, floor, params, xp)


def _iterative_keep(block, params, xp, one_round, floor=None, valid=None, stats=None):
    """Return the keep mask after rounds of ``one_round`` until no pixel changes (or the cap).

    Repeating the clip on the survivors matters: two outliers in one pixel (a trail crossing a hot
    pixel) inflate the first round's sigma enough to hide the smaller one. Only pixels whose mask
    changed in the previous round are recomputed — the others would give the same answer — so
    later rounds cost a tiny fraction of the first. ``floor`` is the :class:`NoiseFloor` of the
    block (:func:`_noise_floor`), or None; ``valid`` its finite mask, when the caller has it;
    ``stats`` its :class:`PixelStats`, when already measured (the first round then sorts nothing).
    """
    keep = xp.isfinite(block) if valid is None else valid
    new_keep = one_round(block, keep, params, xp, masked=False, floor=floor, stats=stats)
    active = nonzero_indices(xp.any(new_keep != keep, axis=0), xp)
    keep = new_keep
    for _ in range(params.max_iterations - 1):
        if active[0].size == 0:
            break
        index = (slice(None),) + active
        old = keep[index]
        sub_floor = None if floor is None else floor.columns(active)
        new = one_round(block[index], old, params, xp, masked=True, floor=sub_floor)
        keep[index] = new
        changed = xp.any(new != old, axis=0)
        active = tuple(a[changed] for a in active)
    return keep


@dataclass(frozen=True)
class NoiseFloor:
    """The least spread each sample of a block is tested against: ``sqrt(sigma^2 + (k S)^2)``.

    ``sigma`` is the noise of the sample's frame, broadcastable to the block (``(N, 1, W, C)``,
    or ``(N, n)`` for a flat selection of pixels); ``signal`` the local contrast around the pixel
    (:func:`signal_map`; ``(h, W, C)`` or ``(n,)``), or None; ``k`` is ``spread``.
    """

    sigma: object
    signal: object = None
    spread: float = SIGNAL_SPREAD

    def at(self, index, shape, xp):
        """Return the floor of the samples ``index`` (a tuple of index arrays into ``shape``)."""
        sigma = xp.broadcast_to(self.sigma, shape)[index]
        if self.signal is None:
            return sigma
        spread = self.spread * self.signal[index[1:]]
        return xp.sqrt(sigma * sigma + spread * spread)

    def columns(self, active):
        """Return the floor of the pixels ``active`` (index arrays ``(h, w, c)``), flattened."""
        signal = None if self.signal is None else self.signal[active]
        return NoiseFloor(self.sigma[:, 0, 0, :][:, active[2]], signal, self.spread)


def _window_extreme(plane, size: int, op):
    """Return ``op`` (``np.maximum`` or ``np.minimum``) over ``size`` x ``size`` windows of a finite plane.

    Equal to SciPy's ``maximum_filter``/``minimum_filter`` (edges mirrored as its ``reflect``
    mode), in a few whole-array operations rather than a loop over each window: per axis, spans
    of 1, 2, 4... samples are combined, and two overlapping spans cover each window (max and min
    do not mind overlaps).
    """
    r = size // 2
    out = np.pad(plane, r, mode="symmetric")
    for axis in (0, 1):
        n = out.shape[axis] - size + 1

        def part(a, start, length):
            return a[start:start + length] if axis == 0 else a[:, start:start + length]

        span, runs = 1, out
        while 2 * span <= size:
            runs = op(part(runs, 0, runs.shape[axis] - span), part(runs, span, runs.shape[axis] - span))
            span *= 2
        out = op(part(runs, 0, n), part(runs, size - span, n))
    return out


def signal_map(frame, noise, radius: int = SIGNAL_RADIUS_PX, threads: int = 1) -> np.ndarray:
    """Return ``(H, W, C)`` float32: the local contrast around each pixel of ``frame``.

    The contrast is the range (maximum minus minimum) of the 3x3-smoothed ``frame`` within
    ``radius`` pixels, lowered by twice the ``(C,)`` noise sigma, the range smoothed noise alone
    reaches: about 0 on the sky and on smooth nebulosity, where nothing but noise is expected and
    the rejection keeps its full strength; a star's peak above its surroundings on and near a star.
    No data counts as 0, and so does a channel whose noise is not finite. ``threads`` channels
    are filtered at once (SciPy's filters release the GIL).
    """
    from scipy.ndimage import uniform_filter

    out = np.zeros(frame.shape, np.float32)
    size = 2 * radius + 1

    def channel(c):
        if not np.isfinite(noise[c]):
            return
        plane = np.asarray(frame[..., c], np.float32)
        # No data is filled with a typical level (of a subsample: the filled pixels give 0 anyway).
        sample = subsample(plane, _FLOOR_SUBSAMPLE)
        fill = np.nanmedian(sample if np.isfinite(sample).any() else plane)
        smooth = uniform_filter(np.where(np.isfinite(plane), plane, fill), 3)
        contrast = _window_extreme(smooth, size, np.maximum) - _window_extreme(smooth, size, np.minimum) \
            - np.float32(2.0 * noise[c])
        out[..., c] = np.where(np.isfinite(plane), np.maximum(contrast, 0.0), 0.0)

    map_threads(channel, range(frame.shape[-1]), threads)
    return out


def _noise_floor(noise_sigmas, shape, dtype, xp, signal=None, spread=None):
    """Return the :class:`NoiseFloor` of a block of ``shape``, or None without ``noise_sigmas``.

    The noise is a full ``(N, 1, W, C)`` row per frame rather than ``(N, 1, 1, C)``: comparing a
    block with the latter makes NumPy loop over runs of C = 3 elements instead of whole rows.
    ``signal`` is the block's rows of the :func:`signal_map` (None: no signal term), ``spread`` its
    share (None: :data:`SIGNAL_SPREAD`).
    """
    if noise_sigmas is None:
        return None
    signal = None if signal is None else xp.asarray(signal, dtype=dtype)
    return NoiseFloor(frame_rows(noise_sigmas, shape[2], dtype, xp), signal,
                      SIGNAL_SPREAD if spread is None else spread)


def frame_rows(per_frame, width: int, dtype, xp):
    """Return ``(N, C)`` values per frame and channel as ``(N, 1, width, C)`` rows, to broadcast on blocks.

    An ``(N, 1, 1, C)`` operand makes NumPy loop over runs of C = 3 elements; whole rows let it
    run along the width.
    """
    values = xp.asarray(per_frame, dtype=dtype)
    n, c = values.shape
    values = values.reshape(n, 1, 1, c)
    return xp.ascontiguousarray(xp.broadcast_to(values, (n, 1, width, c)))


@dataclass(frozen=True)
class PixelStats:
    """Per-pixel statistics of all the valid samples of a stack (or block), from one sort.

    ``centre`` is their median, ``low``/``high`` their winsor quantiles (None unless the rejection
    is winsorized), ``n_valid`` their count, each ``(..., h, W, C)``. They serve the first round of
    rejection and the consensus the rejection protects (:func:`consensus_signal_map`).
    """

    centre: object
    low: object = None
    high: object = None
    n_valid: object = None

    def part(self, index, convert=lambda a: a) -> "PixelStats":
        """Return the statistics of ``arr[index]`` for each array, passed through ``convert``."""
        return PixelStats(*(None if a is None else convert(a[index])
                            for a in (self.centre, self.low, self.high, self.n_valid)))


def _sorted_statistics(block, params: StackParams, xp, has_nonfinite=None):
    """Return ``(centre, low, high, n_valid)`` of a block's valid samples along axis 0 (one sort).

    ``low``/``high`` are None unless ``params`` is winsorized; ``n_valid`` is an int when every
    sample is valid.
    """
    sorted_block, n_valid = _sort_and_count(block, xp, has_nonfinite)
    centre = sorted_quantile(sorted_block, n_valid, 0.5, xp)
    if params.rejection != "winsorized_sigma_clip":
        return centre, None, None, n_valid
    low = sorted_quantile(sorted_block, n_valid, params.winsor_limits[0], xp)
    high = sorted_quantile(sorted_block, n_valid, 1.0 - params.winsor_limits[1], xp)
    return centre, low, high, n_valid


def _covered_column_spans(valid, xp):
    """Return ``(before, covered, after)`` column slices of a block, or None.

    Dithered frames leave NaN margins in every row of a block, which would send the whole block
    down the per-pixel-count quantile path (a gather per quantile). Pixels are
    independent: the one run of columns every frame covers takes the plain path. None when no
    column, or every column, is covered.
    """
    full = xp.nonzero(over_channels(operator.and_, xp.all(valid, axis=(0, 1))))[0]
    if not full.size:
        return None
    a, b = int(full[0]), int(full[-1]) + 1
    if b - a != full.size or b - a == valid.shape[2]:
        return None
    return slice(0, a), slice(a, b), slice(b, None)


def block_statistics(block, params: StackParams, xp=np) -> PixelStats:
    """Return the :class:`PixelStats` of an ``(N, h, W, C)`` block, ``n_valid`` as an array."""
    valid = xp.isfinite(block)
    spans = _covered_column_spans(valid, xp) or (slice(None),)
    shape = block.shape[1:]
    out = [xp.empty(shape, block.dtype) for _ in range(3)] + [xp.empty(shape, xp.int32)]
    for cols in spans:
        part = block[:, :, cols]
        if not part.shape[2]:
            continue
        found = _sorted_statistics(part, params, xp, not bool(xp.all(valid[:, :, cols])))
        for target, value in zip(out, found):
            target[:, cols] = value
    return PixelStats(out[0], *(out[1:3] if params.rejection == "winsorized_sigma_clip" else (None, None)),
                      out[3])


def stack_block(block, weights, params: StackParams, xp=np, noise_sigmas=None, signal=None, stats=None,
                pixel_weights=None):
    """Reject and combine one ``(N, h, W, C)`` block; returns ``(image (h, W, C), coverage (h, W))``.

    ``weights`` is ``(N, C)`` (per frame and channel) or None; ``pixel_weights``, ``(N, h, W, C)``
    like the block or None, multiplies them sample by sample in the mean (a Bayer-drizzled frame's
    :func:`zemosaic_drizzle.pixel_weights`; the rejection and a median ignore it). ``noise_sigmas`` ``(N, C)`` is each
    frame's noise sigma in the block's units (:func:`frame_noise_sigmas`): the least spread a sample
    is tested against, which makes rejection work with 3-10 frames; ``signal``, the block's rows of
    the :func:`consensus_signal_map`, adds the spread expected near stars (:class:`NoiseFloor`), so
    their cores and wings are not clipped. ``stats``: the block's :class:`PixelStats`, when already
    measured. Pixels with fewer than three valid samples are the combination of what they have (no
    rejection); no valid sample gives NaN. Coverage counts the frames with data in the channel
    that has fewest (a debayered frame has the same footprint in every channel; a Bayer-drizzled
    one leaves some pixels without a sample of one colour).
    """
    valid = xp.isfinite(block)
    spans = _covered_column_spans(valid, xp) if params.rejection != "none" else None
    if spans is None:
        return _stack_columns(block, valid, weights, params, xp, noise_sigmas, signal, stats, pixel_weights)
    image = xp.empty(block.shape[1:], xp.float32)
    coverage = xp.empty(block.shape[1:3], xp.float32)
    for cols in spans:
        if block[:, :, cols].shape[2]:
            image[:, cols], coverage[:, cols] = _stack_columns(
                block[:, :, cols], valid[:, :, cols], weights, params, xp, noise_sigmas,
                None if signal is None else signal[:, cols],
                None if stats is None else stats.part((slice(None), cols)),
                None if pixel_weights is None else pixel_weights[:, :, cols])
    return image, coverage


def _stack_columns(block, valid, weights, params, xp, noise_sigmas, signal, stats=None, pixel_weights=None):
    """Return :func:`stack_block` of one block (``valid``: its finite mask), every column on the same path."""
    n = block.shape[0]
    w = frame_rows(np.ones((n, block.shape[-1])) if weights is None else weights, block.shape[2], block.dtype, xp)
    if pixel_weights is not None:
        w = w * pixel_weights
    floor = _noise_floor(noise_sigmas, block.shape, block.dtype, xp, signal, params.signal_spread)
    coverage = xp.min(xp.sum(valid, axis=0), axis=-1)
    # The rounds only ever drop samples of pixels with three or more kept (the first round takes
    # the mask as its own: it is not needed after them).
    if params.rejection == "winsorized_sigma_clip":
        keep = _iterative_keep(block, params, xp, _winsorized_round, floor, valid, stats)
    elif params.rejection == "kappa_sigma":
        keep = _iterative_keep(block, params, xp, _kappa_sigma_round, floor, valid, stats)
    else:
        keep = valid
    image = _combine(block, keep, w, params.combine, xp, finite=bool(xp.all(valid)))
    return image.astype(xp.float32), coverage.astype(xp.float32)


def rows_for_budget(n_frames: int, width: int, channels: int, budget_bytes: int) -> int:
    """Return how many rows a block may have so its working set fits ``budget_bytes``.

    A block's working set is about ten float32 copies of itself (input, sorted copy, winsorized
    deviations, their squares, the per-sample sigma, masks), so the estimate divides by ten.
    """
    per_row = n_frames * width * channels * 4 * 10
    return max(1, int(budget_bytes // max(1, per_row)))


#: Working-set budget of one block of rows on the CPU: small blocks stay in the CPU caches (the
#: result does not depend on it).
CPU_BLOCK_BYTES = 32 * 2**20


def stack_in_chunks(stack, gains, offsets, weights, params: StackParams, xp=np,
                    rows_per_chunk=None, budget_bytes=CPU_BLOCK_BYTES, to_device=None, to_host=None,
                    progress=None, noise_sigmas=None, threads: int = 1, backgrounds=None, pixel_weights=None):
    """Normalise, reject and combine an ``(N, H, W, C)`` stack in row chunks.

    ``stack`` may be a NumPy array or a disk-backed :class:`zemosaic_executor.DiskStack` (only
    the chunks being stacked are in memory). ``gains``/``offsets``/``weights`` are ``(N, C)`` or
    None; ``backgrounds`` (:class:`zemosaic_background.BackgroundModels` on the stack's canvas, or
    None) are subtracted after them. ``pixel_weights``: a stack like ``stack`` (or None) of
    per-sample weights for the mean (:func:`stack_block`), read a chunk at a time as it is.
    ``noise_sigmas`` ``(N, C)`` is the noise of each normalised frame (:func:`frame_noise_sigmas`);
    measured here when rejection needs it and it is not given.
    ``to_device``/``to_host`` move a chunk to the backend of ``xp`` and back (identity on the
    CPU). ``threads`` chunks are stacked at once on the CPU (NumPy releases the GIL; each chunk's
    rows depend on nothing else, so the result is the same for any number). ``progress(done_rows,
    total)`` is called after each chunk of each pass, in order, in the calling thread; an exception
    it raises (a cancel) stops the stacking, chunks not yet started are dropped.
    Returns host float32 ``(image (H, W, C), coverage (H, W))``.

    With rejection, a first pass over the chunks measures every pixel's :class:`PixelStats`: the
    consensus of all frames, whose stars the rejection protects (:func:`consensus_signal_map`), and
    the statistics of the first rejection round, which the second pass then does not sort again.
    """
    to_device = to_device or (lambda a: a)
    to_host = to_host or (lambda a: a)
    n, h, w, c = stack.shape
    rows = rows_per_chunk or rows_for_budget(n, w, c, budget_bytes)
    g = None if gains is None else frame_rows(np.asarray(gains), w, xp.float32, xp)
    # Offsets are all zero when background models match the skies: adding them is a pass for nothing.
    o = None if offsets is None or not np.any(offsets) else frame_rows(np.asarray(offsets), w, xp.float32, xp)
    background_rows = None if backgrounds is None else backgrounds.row_model(w, xp)

    def normalised(r0, r1):
        raw = np.asarray(stack[:, r0:r1], dtype=np.float32)
        if g is None or xp is not np:  # on the CPU the normalisation below makes the copy
            raw = np.ascontiguousarray(raw)
        block = to_device(raw)
        if g is None:  # the block may be a view of the stack: nothing in place
            return block if background_rows is None else block - background_rows(r0, r1)
        block = block * g  # NaN stays NaN; a new array, changed in place from here
        if o is not None:
            block += o
        if background_rows is not None:
            block -= background_rows(r0, r1)
        return block

    stats = signal = None
    if params.rejection != "none":
        if noise_sigmas is None:
            noise_sigmas = frame_noise_sigmas(stack, gains, n_max=_FLOOR_SUBSAMPLE)
        stats = _stack_statistics(normalised, (h, w, c), rows, params, xp, to_host, threads, progress)
        signal = consensus_signal_map(stats, threads)
    image = np.empty((h, w, c), np.float32)
    coverage = np.empty((h, w), np.float32)

    def chunk(r0, r1):
        img, cov = stack_block(normalised(r0, r1), weights, params, xp, noise_sigmas,
                               None if signal is None else to_device(signal[r0:r1]),
                               None if stats is None else stats.part(slice(r0, r1), to_device),
                               None if pixel_weights is None
                               else to_device(np.ascontiguousarray(pixel_weights[:, r0:r1], np.float32)))
        image[r0:r1], coverage[r0:r1] = to_host(img), to_host(cov)

    _over_row_chunks(chunk, h, rows, xp, threads, progress)
    return image, coverage


def _over_row_chunks(fn, h: int, rows: int, xp, threads: int, progress=None) -> None:
    """Run ``fn(r0, r1)`` on every chunk of ``rows`` rows of ``h``, ``threads`` at once on the CPU.

    ``progress(r1, h)`` is called after each chunk, in order, in the calling thread. A device keeps
    its context per thread: GPU chunks stay in the calling thread.
    """
    def run(r0):
        r1 = min(h, r0 + rows)
        fn(r0, r1)
        return r1

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="stack") as pool:
        finished = (pool.map if xp is np and threads > 1 else map)(run, range(0, h, rows))
        try:
            for r1 in finished:
                if progress is not None:
                    progress(r1, h)
        finally:
            if hasattr(finished, "close"):  # pool.map's: drops the chunks not started (a cancel)
                finished.close()


def _stack_statistics(normalised, shape, rows: int, params: StackParams, xp, to_host, threads: int,
                      progress=None) -> PixelStats:
    """Return the host :class:`PixelStats` of the normalised stack, ``normalised(r0, r1)`` a chunk at a time."""
    winsorized = params.rejection == "winsorized_sigma_clip"
    out = PixelStats(np.empty(shape, np.float32), *(np.empty(shape, np.float32) if winsorized else None
                                                    for _ in range(2)), np.empty(shape, np.int32))

    def chunk(r0, r1):
        found = block_statistics(normalised(r0, r1), params, xp)
        for target, value in zip((out.centre, out.low, out.high, out.n_valid),
                                 (found.centre, found.low, found.high, found.n_valid)):
            if target is not None:
                target[r0:r1] = to_host(value)

    _over_row_chunks(chunk, shape[0], rows, xp, threads, progress)
    return out




def consensus_signal_map(stats: PixelStats, threads: int = 1) -> np.ndarray:
    """Return the :func:`signal_map` of the per-pixel median of all frames, what rejection protects.

    A star is in most frames and so in their median; a satellite trail, a plane or a cosmic ray
    in one frame is not: one sample cannot move the median of three or more past the others. Any
    one frame's contrast (the reference's, say) would make its own trail "signal" and protect it.
    Pixels with fewer than :data:`MIN_REJECTION_FRAMES` samples (not rejected anyway) count as no
    data, so a two-frame pixel's trail does not raise its neighbours' floor. The noise is the
    median image's own clipped sigma. ``threads``: see :func:`signal_map`.
    """
    median = np.where(stats.n_valid >= MIN_REJECTION_FRAMES, stats.centre, np.float32(np.nan))
    sample = subsample(median, _FLOOR_SUBSAMPLE)
    noise = [sigma_clipped_stats(sample[..., c])[1] for c in range(median.shape[-1])]
    return signal_map(median, noise, threads=threads)


def stack_winsorized_sigma_clip(frames, weights=None, kappa_low=3.0, kappa_high=3.0,
                                winsor_limits=(0.05, 0.05), combine="mean", *, max_iterations=5,
                                gains=None, offsets=None, noise_sigmas=None, threads: int = 1,
                                backgrounds=None, progress=None, pixel_weights=None, signal_spread=None):
    """Stack aligned frames with winsorized sigma clipping on the CPU; returns ``(image, coverage)``.

    The front door of the default rejection, under the name the seeds give it:
    :func:`stack_in_chunks` with ``StackParams("winsorized_sigma_clip", ...)``. ``frames`` is a
    list of ``(H, W, C)`` arrays or an ``(N, H, W, C)`` stack (a disk-backed one is read a block
    at a time), NaN outside each footprint; ``gains``, ``offsets``, ``backgrounds`` and
    ``noise_sigmas`` are as for :func:`stack_in_chunks`, and so are ``threads``, ``progress`` and
    ``pixel_weights``; ``signal_spread`` is :class:`StackParams`'.
    A pixel without valid samples stays NaN.
    """
    if isinstance(frames, (list, tuple)):
        frames = np.stack([np.asarray(f, np.float32) for f in frames])
    params = StackParams("winsorized_sigma_clip", kappa_low, kappa_high, tuple(winsor_limits), combine,
                         max_iterations, signal_spread)
    return stack_in_chunks(frames, gains, offsets, weights, params, noise_sigmas=noise_sigmas,
                           threads=threads, backgrounds=backgrounds, progress=progress,
                           pixel_weights=pixel_weights)
