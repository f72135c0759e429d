"""Sky backgrounds: a low-order polynomial per image, solved from the differences of overlaps.

Light pollution, moonlight and airglow add a smooth background that differs from one frame to the
next (an alt-az mount keeps the horizon fixed in the sensor while the field turns, and the sky
brightens as the target sinks) and from one panel to the next. The sky itself (stars, nebulae,
galaxies) is the same in every image of a place, so it cancels in the difference of two
overlapping images: what remains is the difference of their backgrounds. Each image's model is a
2-D polynomial per channel (order 0, 1 or 2), and all models are solved together from every
overlap at once: one linear least-squares problem, reweighted so that stars cut differently by
the seeing, trails and clipped cores do not count. A difference fixes the models only up to one
polynomial shared by all the images: the models of each connected set of images are made to
average zero, so the mosaic keeps the mean of its images' backgrounds, and an image that overlaps
nothing keeps a model of zero.

The same models serve the frames of a master tile (on the tile's canvas) and the tiles of the
mosaic (on the output grid). :func:`extract_background` is the optional last step for a flat sky:
one model of the mosaic itself fitted on its sky, away from stars and objects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from zemosaic_config import BACKGROUND_ORDERS
from zemosaic_utils import block_mean, map_threads

logger = logging.getLogger(__name__)

#: Tukey biweight cut, in robust sigmas of the residuals: a block further out carries no weight.
_TUKEY_CUT = 5.0
_ITERATIONS = 10
#: An image needs this many blocks shared with other images per model term to get a model.
_MIN_BLOCKS_PER_TERM = 4
#: Ridge on each image's normal equations, relative to its own diagonal: it pins what the
#: differences cannot fix (the shared polynomial, an image that overlaps nothing) at no visible
#: cost to what they do fix (a relative bias of this size).
_RIDGE = 1e-6
#: Blocks a tile's canvas is cut into for its frames' levels: enough for a well-determined plane.
_TARGET_BLOCKS = 2000
_BLOCK_PX_LIMITS = (8, 64)


def model_terms(order: int) -> tuple:
    """Return the ``(power of u, power of v)`` of each term of a model of ``order``, constant first."""
    if order not in BACKGROUND_ORDERS:
        raise ValueError(f"background model order must be one of {BACKGROUND_ORDERS}, got {order!r}")
    return tuple((a, total - a) for total in range(order + 1) for a in range(total, -1, -1))


@dataclass(frozen=True)
class BackgroundModels:
    """One polynomial background per image and channel, in a pixel frame the images share.

    ``coefficients`` ``(n, C, K)`` multiply the terms ``u**a * v**b`` (:func:`model_terms`) of
    ``u = (x - origin[1]) / scale``, ``v = (y - origin[0]) / scale``, ``(y, x)`` pixel coordinates
    of the shared frame (a tile's canvas, or the mosaic's output grid).
    """

    coefficients: np.ndarray
    order: int
    origin: tuple
    scale: float

    @classmethod
    def zeros(cls, n: int, n_ch: int, order: int, shape_hw) -> "BackgroundModels":
        """Return models of zero for ``n`` images on a frame of ``shape_hw``."""
        return cls(np.zeros((n, n_ch, len(model_terms(order)))), order, *_frame_of(shape_hw))

    def __len__(self) -> int:
        return self.coefficients.shape[0]

    def _uv(self, y, x, xp=np):
        return (xp.asarray(x, xp.float64) - self.origin[1]) / self.scale, \
            (xp.asarray(y, xp.float64) - self.origin[0]) / self.scale

    def terms(self, y, x) -> np.ndarray:
        """Return the ``(K, ...)`` terms of the models at pixel coordinates ``y``, ``x``."""
        u, v = self._uv(y, x)
        return np.stack([u ** a * v ** b for a, b in model_terms(self.order)])

    def values(self, k: int, y, x) -> np.ndarray:
        """Return image ``k``'s background ``(..., C)`` at pixel coordinates ``y``, ``x``."""
        return np.moveaxis(np.tensordot(self.coefficients[k], self.terms(y, x), axes=(1, 0)), 0, -1)

    def centre_values(self) -> np.ndarray:
        """Return the ``(n, C)`` backgrounds at the frame's origin (the constant terms)."""
        return self.coefficients[..., 0].copy()

    def rows(self, r0: int, r1: int, width: int, xp=np, dtype=np.float32, x0: int = 0):
        """Return every image's background on rows ``r0:r1``, columns ``x0:x0 + width``: ``(n, r1 - r0, width, C)``."""
        return self.row_model(width, xp, dtype, x0)(r0, r1)

    def row_model(self, width: int, xp=np, dtype=np.float32, x0: int = 0):
        """Return ``rows(r0, r1)``: :meth:`rows` on columns ``x0:x0 + width``, for one block of rows after another.

        A sum over the powers ``b`` of ``v`` of a whole-row profile per image (its terms' ``u**a``
        times their coefficients) times ``v**b`` per row: every operation on the full block runs
        along whole rows, a few per pixel whatever the order. The profiles depend on the columns
        only and are made once: a stack of 50 frames is read in blocks of two rows, for which
        making them again cost as much as the block (5.4 s of a 53 s tile on one core).
        """
        u, _ = self._uv(0, np.arange(x0, x0 + width))
        terms = model_terms(self.order)
        profiles = [xp.asarray(sum(self.coefficients[:, None, :, k] * (u ** a)[None, :, None]
                                   for k, (a, pb) in enumerate(terms) if pb == b), dtype)[:, None]
                    for b in range(self.order + 1)]  # (n, 1, width, C) each

        def rows(r0: int, r1: int):
            _, v = self._uv(np.arange(r0, r1), 0)
            out = xp.empty((profiles[0].shape[0], r1 - r0, width, profiles[0].shape[-1]), dtype)
            out[...] = profiles[0]
            for b in range(1, self.order + 1):
                out += xp.asarray(v ** b, dtype)[None, :, None, None] * profiles[b]
            return out

        return rows

    def image(self, k: int, shape_hw, dtype=np.float32) -> np.ndarray:
        """Return image ``k``'s background on the frame's rows and columns ``(H, W, C)``."""
        return self.select([k]).rows(0, int(shape_hw[0]), int(shape_hw[1]), np, dtype)[0]

    def on_finer_grid(self, factor: int) -> "BackgroundModels":
        """Return the same models on a grid ``factor`` times finer (pixel ``x`` here covers
        ``factor * x .. factor * x + factor - 1`` there): the same background at every point."""
        shift = (factor - 1) / 2.0
        origin = (factor * self.origin[0] + shift, factor * self.origin[1] + shift)
        return BackgroundModels(self.coefficients.copy(), self.order, origin, factor * self.scale)

    def select(self, indices) -> "BackgroundModels":
        """Return the models of the images ``indices``, in that order."""
        return BackgroundModels(self.coefficients[list(indices)], self.order, self.origin, self.scale)

    def scaled(self, factors) -> "BackgroundModels":
        """Return the models times ``factors`` (``(n,)`` or ``(n, C)``): the background of ``factor * image``."""
        f = np.asarray(factors, np.float64)
        f = f.reshape(len(self), -1)[:, :, None]
        return BackgroundModels(self.coefficients * f, self.order, self.origin, self.scale)

    def in_frame(self, k: int, shape_hw, y_here, x_here, y_there, x_there) -> "BackgroundModels":
        """Return image ``k``'s model in another pixel frame of ``shape_hw`` (one image).

        ``(y_there, x_there)`` are points of the other frame, ``(y_here, x_here)`` the same points
        in this one; the model is refitted there by least squares (exact where the two frames are
        related by an affine map, as a tile's pixels and the output grid's nearly are).
        """
        values = self.values(k, y_here, x_here)  # (P, C)
        target = BackgroundModels.zeros(1, values.shape[-1], self.order, shape_hw)
        terms = target.terms(np.asarray(y_there, np.float64), np.asarray(x_there, np.float64)).T  # (P, K)
        solution, *_ = np.linalg.lstsq(terms, values, rcond=None)
        return BackgroundModels(solution.T[None], self.order, target.origin, target.scale)

    def to_dict(self) -> dict:
        """Return the models as JSON-able values (for the run report)."""
        return {"order": self.order, "origin_yx": [float(v) for v in self.origin], "scale_px": float(self.scale),
                "terms_uv": [list(t) for t in model_terms(self.order)]}


def _frame_of(shape_hw) -> tuple:
    """Return ``(origin, scale)`` of a frame of ``shape_hw``: its centre, half its longer side."""
    h, w = int(shape_hw[0]), int(shape_hw[1])
    return ((h - 1) / 2.0, (w - 1) / 2.0), max(1.0, max(h, w) / 2.0)


@dataclass(frozen=True)
class BlockLevels:
    """The mean of each image over each block of a shared pixel frame, the input of :func:`solve_models`.

    ``levels`` ``(B, n, C)`` (NaN where an image does not cover the whole block), ``y``/``x``
    ``(B,)`` the block centres in pixels of the frame, ``weights`` ``(B, n)`` or None: each
    image's prior weight per block (its inverse noise variance up to a factor).
    """

    levels: np.ndarray
    y: np.ndarray
    x: np.ndarray
    weights: np.ndarray | None = None


def block_px_for(shape_hw, target_blocks: int = _TARGET_BLOCKS) -> int:
    """Return the block side that cuts a frame of ``shape_hw`` into about ``target_blocks`` blocks."""
    side = int(np.sqrt(float(shape_hw[0]) * float(shape_hw[1]) / target_blocks))
    return int(np.clip(side, *_BLOCK_PX_LIMITS))


def frame_block_levels(frame, block_px: int) -> np.ndarray:
    """Return the ``(by, bx, C)`` means of an aligned ``(H, W, C)`` frame over its ``block_px`` blocks
    (NaN where it does not cover the whole block), one frame's part of :class:`BlockLevels`.

    A block counts for a frame only where the frame covers all of it, so that two frames are
    compared on the same pixels. Block means keep a star's light whatever the seeing, so it
    cancels between frames.
    """
    return block_mean(np.asarray(frame, np.float32), block_px, full_blocks_only=True)


def block_levels(per_frame, gains, block_px: int, origin=(0, 0)) -> BlockLevels:
    """Return the :class:`BlockLevels` of frames from their :func:`frame_block_levels` times ``gains`` ``(N, C)``.

    ``origin``: where the frames' pixel frame starts on the one they were measured on (a canvas
    cut after its frames were measured), so that the block centres are in the frame the models
    are solved for.
    """
    n_ch = per_frame[0].shape[-1]
    gains = np.ones((len(per_frame), n_ch)) if gains is None else np.asarray(gains, np.float64)
    levels = np.stack([lv.reshape(-1, n_ch) for lv in per_frame], axis=1) * gains[None]
    by, bx = per_frame[0].shape[:2]
    yy, xx = np.mgrid[0:by, 0:bx]
    centre = (block_px - 1) / 2.0
    return BlockLevels(levels, (yy * block_px + centre - origin[0]).ravel().astype(np.float64),
                       (xx * block_px + centre - origin[1]).ravel().astype(np.float64))


def stack_block_levels(stack, gains, block_px: int, threads: int = 1) -> BlockLevels:
    """Return the :class:`BlockLevels` of every frame of an aligned ``(N, H, W, C)`` stack times ``gains`` ``(N, C)``
    (:func:`frame_block_levels`, ``threads`` frames at once)."""
    per_frame = map_threads(lambda i: frame_block_levels(stack[i], block_px), range(stack.shape[0]), threads)
    return block_levels(per_frame, gains, block_px)


def frame_models(stack, gains, order: int, threads: int = 1) -> BackgroundModels:
    """Return the background models of the frames of an aligned stack (times ``gains``) on its canvas."""
    shape = stack.shape[1:3]
    return solve_models(stack_block_levels(stack, gains, block_px_for(shape), threads), order, shape, threads)


def solve_models(blocks: BlockLevels, order: int, shape_hw, threads: int = 1) -> BackgroundModels:
    """Return the background models of the images of ``blocks`` on a frame of ``shape_hw``.

    Solved from the blocks two or more images share, per channel: each image's level minus its
    model must agree with the others' at every block (the block's own sky is a free unknown,
    eliminated from the normal equations), by iteratively reweighted least squares with Tukey's
    biweight. Images that share too few blocks get a model of zero; the models of each set of
    images connected by shared blocks average zero.
    """
    n, n_ch = blocks.levels.shape[1:]
    models = BackgroundModels.zeros(n, n_ch, order, shape_hw)
    if n < 2:
        return models
    phi = models.terms(blocks.y, blocks.x).T  # (B, K)
    prior = np.ones(blocks.levels.shape[:2]) if blocks.weights is None else np.asarray(blocks.weights, np.float64)
    solved = map_threads(lambda c: _solve_channel(blocks.levels[:, :, c].astype(np.float64), prior, phi),
                         range(n_ch), threads)
    coefficients = np.stack(solved, axis=1)  # (n, C, K)
    return BackgroundModels(coefficients, order, models.origin, models.scale)


def _solve_channel(levels, prior, phi) -> np.ndarray:
    """Return the ``(n, K)`` model coefficients of one channel (see :func:`solve_models`)."""
    n_terms = phi.shape[1]
    valid = np.isfinite(levels) & (prior > 0)
    shared = valid.sum(axis=1) >= 2
    levels, prior, phi, valid = levels[shared], prior[shared], phi[shared], valid[shared]
    enough = valid.sum(axis=0) >= _MIN_BLOCKS_PER_TERM * n_terms
    valid &= enough[None, :]
    coefficients = np.zeros((levels.shape[1], n_terms))
    if not enough.any() or not valid.any():
        return coefficients
    values = np.where(valid, levels, 0.0)
    base = np.where(valid, prior, 0.0)
    weight = base.copy()
    for iteration in range(_ITERATIONS):
        new = _weighted_solution(values, weight, phi)
        residual, sigma = _residuals(values, weight, base, phi, new)
        # A wide cut first: the unweighted start may be far off for an image with a trail, and a
        # narrow cut then would reject its good blocks instead of the trail.
        cut = _TUKEY_CUT * (2.0 if iteration < 2 else 1.0)
        weight = base * _tukey(residual, sigma, cut)
        done = np.max(np.abs(new - coefficients)) <= 1e-4 * max(float(np.min(sigma)), 1e-12)
        coefficients = new
        if done:
            break
    return _centred(coefficients, valid, enough)


def _weighted_solution(values, weight, phi) -> np.ndarray:
    """Solve the normal equations of ``sum_b sum_i w_bi (L_bi - phi_b c_i - S_b)^2`` with ``S_b`` eliminated."""
    b, n = values.shape
    k = phi.shape[1]
    total = weight.sum(axis=1)
    live = total > 0
    values, weight, phi, total = values[live], weight[live], phi[live], total[live]
    outer = (phi[:, :, None] * phi[:, None, :]).reshape(len(total), k * k)
    own = (weight.T @ outer).reshape(n, k, k)  # each image's own normal matrix
    u = (weight / np.sqrt(total)[:, None])[:, :, None] * phi[:, None, :]  # (B, n, K)
    u = u.reshape(len(total), n * k)
    normal = -(u.T @ u)
    rhs = ((weight * values).T @ phi).ravel()
    rhs -= u.T @ ((weight * values).sum(axis=1) / np.sqrt(total))
    for i in range(n):
        block = slice(i * k, (i + 1) * k)
        normal[block, block] += own[i] + _RIDGE * np.diag(np.diag(own[i]) + 1e-12)
    return np.linalg.solve(normal, rhs).reshape(n, k)


def _residuals(values, weight, base, phi, coefficients):
    """Return each block's residuals from its images' weighted mean, standardised, and each image's robust sigma.

    The sigma is per image (never below the median image's): an image whose start is off by a
    trail has larger residuals everywhere, which must not all read as outliers.
    """
    corrected = values - phi @ coefficients.T
    live = base > 0
    w = np.where(weight > 0, weight, base * 1e-6)  # a rejected sample still has a residual to test
    sky = (w * corrected).sum(axis=1) / np.maximum(w.sum(axis=1), 1e-300)
    count = live.sum(axis=1)
    # A residual from the mean of m equal samples has (1 - 1/m) of their variance.
    residual = (corrected - sky[:, None]) / np.sqrt(np.maximum(1.0 - 1.0 / np.maximum(count, 2), 0.5))[:, None]
    scaled = np.where(live, residual * np.sqrt(base), 0.0)  # in units of one prior weight's noise
    sigma = np.array([1.4826 * float(np.median(np.abs(scaled[live[:, i], i]))) if live[:, i].any() else 0.0
                      for i in range(scaled.shape[1])])
    floor = float(np.median(sigma[sigma > 0])) if np.any(sigma > 0) else 0.0
    return scaled, np.maximum(sigma, floor)


def _tukey(residual, sigma, cut: float = _TUKEY_CUT) -> np.ndarray:
    """Return Tukey's biweight of residuals ``(B, n)`` with per-image ``sigma`` ``(n,)`` (0 beyond ``cut`` sigmas)."""
    t = residual / (cut * np.where(sigma > 0, sigma, np.inf))[None, :]
    return np.where(np.abs(t) < 1.0, (1.0 - t * t) ** 2, 0.0)


def _centred(coefficients, valid, enough) -> np.ndarray:
    """Return the coefficients with each connected set of modelled images averaging zero."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    together = csr_matrix((valid.T.astype(np.float64) @ valid.astype(np.float64)) > 0)
    _count, label = connected_components(together, directed=False)
    out = coefficients.copy()
    for group in np.unique(label[enough]):
        members = (label == group) & enough
        out[members] -= coefficients[members].mean(axis=0)
    out[~enough] = 0.0
    return out


# --------------------------------------------------------------------------------------------------
# The optional last step: one smooth background of the whole mosaic
# --------------------------------------------------------------------------------------------------

#: Block side (px) the mosaic's sky is measured on; a block median ignores its stars.
_EXTRACTION_BLOCK_PX = 64
#: Blocks further above the model than this many robust sigmas are objects (nebulae, galaxies,
#: star halos) and are left out; below it, further than :data:`_EXTRACTION_LOW_KAPPA`.
_EXTRACTION_HIGH_KAPPA = 2.0
_EXTRACTION_LOW_KAPPA = 4.0
_EXTRACTION_ROUNDS = 12


@dataclass(frozen=True)
class Extraction:
    """A mosaic's fitted background (one image of :class:`BackgroundModels`, zero on average over
    its sky) and the fraction of the sampled blocks taken for sky."""

    model: BackgroundModels
    sky_fraction: float

    def to_dict(self) -> dict:
        """Return what the run report records of the extraction."""
        return {**self.model.to_dict(), "coefficients": np.round(self.model.coefficients[0], 4).tolist(),
                "sky_fraction": round(self.sky_fraction, 3)}


def extract_background(mosaic, order: int) -> tuple[np.ndarray, Extraction]:
    """Return ``(mosaic minus its smooth background, the extraction)`` for a flat sky.

    The background is a polynomial of ``order`` per channel fitted to the medians of
    :data:`_EXTRACTION_BLOCK_PX` blocks; blocks standing above the fit (objects: their light is
    only ever added to the sky) are left out round after round, each channel's and the
    luminance's alike, so what is taken away is sky alone. The model averages zero over the sky
    blocks, so the sky keeps its level and only its slope and curvature go.
    """
    h, w, n_ch = mosaic.shape
    medians, y, x = _block_medians(mosaic, _EXTRACTION_BLOCK_PX)
    usable = np.all(np.isfinite(medians), axis=1)
    model = BackgroundModels.zeros(1, n_ch, order, (h, w))
    terms = model.terms(y, x).T  # (B, K)
    sky = usable.copy()
    for _ in range(_EXTRACTION_ROUNDS):
        if sky.sum() < 2 * terms.shape[1]:
            break
        coefficients, *_ = np.linalg.lstsq(terms[sky], medians[sky], rcond=None)  # (K, C)
        residual = medians - terms @ coefficients
        # The noise from the side below the fit, which objects (only ever added light) do not
        # reach: a sigma from both sides of what is left would shrink round after round.
        below = np.where(residual[sky] < 0, -residual[sky], np.nan)
        sigma = 1.4826 * np.nanmedian(below, axis=0)
        scaled = residual / np.where(sigma > 0, sigma, np.inf)
        new = usable & np.all(scaled < _EXTRACTION_HIGH_KAPPA, axis=1) & np.all(scaled > -_EXTRACTION_LOW_KAPPA, axis=1)
        if np.array_equal(new, sky):
            break
        sky = new
    else:
        coefficients, *_ = np.linalg.lstsq(terms[sky], medians[sky], rcond=None)
    if sky.sum() < 2 * terms.shape[1]:
        return mosaic, Extraction(model, 0.0)
    coefficients = coefficients.T.copy()  # (C, K)
    coefficients[:, 0] -= (terms[sky] @ coefficients.T).mean(axis=0)
    fitted = BackgroundModels(coefficients[None], order, model.origin, model.scale)
    flat = np.empty_like(mosaic)
    band = 256
    for r0 in range(0, h, band):
        r1 = min(h, r0 + band)
        flat[r0:r1] = mosaic[r0:r1] - fitted.rows(r0, r1, w)[0]
    return flat, Extraction(fitted, float(sky.sum()) / max(1, int(usable.sum())))


def _block_medians(image, block: int):
    """Return ``(medians (B, C), y (B,), x (B,))`` of the ``block`` x ``block`` squares of an image
    holding data in at least half their pixels (NaN-aware), with the squares' centres."""
    h, w, n_ch = image.shape
    by, bx = h // block, w // block
    medians = np.full((by, bx, n_ch), np.nan)
    for row in range(by):
        strip = image[row * block:(row + 1) * block, :bx * block].reshape(block, bx, block, n_ch)
        cells = np.moveaxis(strip, 1, 0).reshape(bx, block * block, n_ch)
        enough = np.sum(np.all(np.isfinite(cells), axis=2), axis=1) >= block * block // 2
        if enough.any():
            medians[row, enough] = np.nanmedian(cells[enough], axis=1)
    yy, xx = np.mgrid[0:by, 0:bx]
    centre = (block - 1) / 2.0
    return medians.reshape(-1, n_ch), (yy * block + centre).ravel().astype(float), \
        (xx * block + centre).ravel().astype(float)
