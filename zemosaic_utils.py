"""Array backends, pixel mapping between WCSs and the reproject-and-coadd front door.

Everything numeric here is written once against an array namespace ``xp`` (NumPy or CuPy), so the
CPU and GPU engines run the same maths and the GPU code path can be tested with NumPy standing in for CuPy.

Conventions (see docs/architecture.md): images are float32, NaN means "no data", coverage is a sum of weights
(float32, 0 where there is no data) in the same units on every backend.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

from zemosaic_config import ASSEMBLY_ENGINES, require_choice

logger = logging.getLogger(__name__)

# Maximum interpolation error (pixels) tolerated for the coarse-grid pixel mapping.
MAPPING_TOLERANCE_PX = 0.01
# Coarse-grid step (output pixels) tried first; halved until the mapping meets the tolerance.
MAPPING_COARSE_STEP = 32


class GpuBackendError(RuntimeError):
    """A GPU computation failed (no device, out of memory, driver error).

    Callers catch this one type and redo the work on the CPU with one WARNING.
    """


# --------------------------------------------------------------------------------------------------
# Array backends
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def gpu_unavailable_reason() -> str | None:
    """Return why no usable CUDA GPU is available, or None when one is.

    Cached: probing the driver is slow and the answer does not change during a run.
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA installation
        return f"CuPy is not installed or failed to import ({exc.__class__.__name__})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device found"
        cupy.zeros(1, dtype=cupy.float32).sum().item()  # forces a context and a kernel launch
    except Exception as exc:
        return f"CUDA device not usable: {exc}"
    return None


def gpu_available() -> bool:
    """Return True when CuPy imports and a CUDA device runs a kernel."""
    return gpu_unavailable_reason() is None


def get_xp(use_gpu: bool = False):
    """Return the array namespace of a backend: NumPy, or CuPy when ``use_gpu``.

    Raises :class:`GpuBackendError` naming the reason when the GPU is asked for and none is
    usable: a caller that asked for the GPU must know it did not get it. Every GPU code path
    takes its namespace from here (tests monkeypatch it to run those paths with NumPy).
    """
    if not use_gpu:
        return np
    reason = gpu_unavailable_reason()
    if reason is not None:
        raise GpuBackendError(f"GPU not available: {reason}")
    import cupy

    return cupy


@functools.lru_cache(maxsize=1)
def device_errors() -> tuple[type, ...]:
    """Return the exception types of a failing device: out of memory, CUDA runtime and driver
    errors, kernel compilation. Anything else raised on a GPU path is a bug and propagates."""
    types = [MemoryError]  # CuPy's OutOfMemoryError is one
    for module, name in (("cupy_backends.cuda.api.runtime", "CUDARuntimeError"),
                         ("cupy_backends.cuda.api.driver", "CUDADriverError"),
                         ("cupy.cuda.compiler", "CompileException"),
                         ("cupy_backends.cuda.libs.nvrtc", "NVRTCError"),
                         ("cupy_backends.cuda.libs.cublas", "CUBLASError")):
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # CuPy or one of its CUDA libraries is not installed
            continue
    return tuple(types)


def _is_out_of_memory(exc: BaseException) -> bool:
    """Return True for an out-of-memory error of the host or the device."""
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def halving_rows_on_oom(compute, rows: int, xp, what: str):
    """Return ``compute(rows)``, halving ``rows`` (down to 16) while the device runs out of memory.

    Any other device error, or out of memory at 16 rows, raises :class:`GpuBackendError`
    (``"GPU <what> failed: ..."``); an error that is not a device error propagates unchanged.
    """
    while True:
        try:
            return compute(rows)
        except device_errors() as exc:
            if _is_out_of_memory(exc) and rows > 16:
                rows //= 2
                if hasattr(xp, "get_default_memory_pool"):
                    xp.get_default_memory_pool().free_all_blocks()
                logger.debug("GPU out of memory during %s; retrying with %d-row chunks", what, rows)
                continue
            raise GpuBackendError(f"GPU {what} failed: {exc}") from exc


def to_numpy(array) -> np.ndarray:
    """Return a host NumPy array for a NumPy or CuPy array."""
    if isinstance(array, np.ndarray):
        return array
    return array.get()


def free_gpu_memory_bytes() -> int:
    """Return the free memory of the current CUDA device plus CuPy's cached free blocks."""
    import cupy

    free, _total = cupy.cuda.Device().mem_info
    return int(free + cupy.get_default_memory_pool().free_bytes())


def _percentiles_gpu(arr2d, p_low: float, p_high: float, xp=None) -> tuple[float, float]:
    """Return the ``p_low`` and ``p_high`` percentiles (0-100) of an array, ignoring NaN and inf.

    NaN-aware percentiles are used only when the array holds non-finite values (they are slower);
    an array without any finite value gives ``(nan, nan)``. ``xp`` defaults to the array's module
    (NumPy or CuPy: one rule for both, since a plain percentile of an image with NaN footprints is
    NaN). The display stretch takes its black and white points from here
    (:func:`zemosaic_fits.stretch_unit`).
    """
    if xp is None:
        xp = np if isinstance(arr2d, np.ndarray) else __import__("cupy")
    flat = xp.ravel(arr2d)
    finite = xp.isfinite(flat)
    if not bool(xp.all(finite)):
        # NaN-aware: keep the finite values only (CuPy has no nanpercentile); inf is not a value.
        flat = flat[finite]
        if flat.size == 0:
            return float("nan"), float("nan")
    lo, hi = xp.percentile(flat, [p_low, p_high])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------------
# Cores
# --------------------------------------------------------------------------------------------------


def usable_cores() -> int:
    """Return how many cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def map_threads(fn, items, threads: int | None = None) -> list:
    """Return ``[fn(item) for item in items]``, computed on ``threads`` threads (None: one per core).

    For NumPy work on independent pieces (bands of rows, channels, frames): NumPy and SciPy's
    filters release the GIL in their loops, so the pieces run on every core. Exceptions propagate.
    """
    items = list(items)
    threads = min(usable_cores() if threads is None else max(1, threads), len(items))
    if threads < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


# --------------------------------------------------------------------------------------------------
# Robust statistics
# --------------------------------------------------------------------------------------------------


def over_channels(op, array):
    """Return ``op`` folded over the last (channel) axis: ``op(op(a[..., 0], a[..., 1]), a[..., 2])``.

    NumPy reduces a short last axis element by element; one element-wise operation per channel
    runs along whole planes instead. The order of the operations is the reduction's, so sums come
    out the same.
    """
    result = array[..., 0]
    for c in range(1, array.shape[-1]):
        result = op(result, array[..., c])
    return result


def nonzero_indices(mask, xp=np) -> tuple:
    """Return ``xp.nonzero(mask)``, the same index arrays, through the flat indices.

    NumPy's ``nonzero`` of an N-D mask works out every coordinate of every element it scans; the
    flat indices and ``unravel_index`` work out only those of the elements found (a sparse 4-D
    stacking mask finds few).
    """
    return xp.unravel_index(xp.flatnonzero(mask), mask.shape)


def mad_sigma(values, xp=np, centre=None, axis=None):
    """Return the MAD-sigma ``1.4826 * median(|values - centre|)`` (centre: the median) along ``axis``.

    The Gaussian-equivalent sigma that a few outliers barely move.
    """
    if centre is None:
        centre = xp.median(values, axis=axis, keepdims=axis is not None)
    return 1.4826 * xp.median(xp.abs(values - centre), axis=axis)


def subsample(array, n_max: int):
    """Return a strided view of about ``n_max`` values at most, for statistics that need no more.

    A 1-D array keeps every k-th value; an ``(H, W, ...)`` image every k-th row and column.
    """
    if array.ndim == 1:
        return array[::max(1, array.size // n_max)]
    stride = max(1, int(math.sqrt(array.shape[0] * array.shape[1] / n_max)))
    return array[::stride, ::stride]


def block_mean(image: np.ndarray, factor: int, full_blocks_only: bool = False,
               band_rows: int = 256) -> np.ndarray:
    """NaN-aware ``factor`` x ``factor`` block average of an ``(H, W, C)`` image (edges padded with no data).

    A block averages its valid pixels, or with ``full_blocks_only`` is NaN unless every pixel of
    it holds data (two images compared block by block must then cover the same area in each).
    """
    height, width, channels = image.shape
    out_h, out_w = -(-height // factor), -(-width // factor)
    if full_blocks_only:
        return _full_block_means(image, factor, out_h, out_w)
    result = np.empty((out_h, out_w, channels), dtype=np.float32)

    # Bands of output rows bound the temporary memory on very large mosaics, and run on every core.
    # Each channel's block sums add the factor**2 strided sub-grids: every operation runs along a
    # whole row (a reduction over the block axes would run along 2-3 pixels at a time).
    def band(top):
        rows = min(band_rows, out_h - top)
        source = image[top * factor:(top + rows) * factor]
        for c in range(channels):
            valid = np.isfinite(source[..., c])
            values = np.where(valid, source[..., c], np.float32(0))
            total = np.zeros((rows, out_w))
            count = np.zeros((rows, out_w), np.int32)
            for dy in range(factor):
                for dx in range(factor):
                    part = values[dy::factor, dx::factor]
                    total[:part.shape[0], :part.shape[1]] += part
                    count[:part.shape[0], :part.shape[1]] += valid[dy::factor, dx::factor]
            result[top:top + rows, :, c] = np.divide(total, count, out=np.full(total.shape, np.nan),
                                                     where=count > 0)

    map_threads(band, range(0, out_h, band_rows))
    return result


def _full_block_means(image, factor: int, out_h: int, out_w: int) -> np.ndarray:
    """Return :func:`block_mean` with ``full_blocks_only``: a NaN anywhere in a block makes it NaN,
    as it does in a sum, so the blocks are summed as they are, rows first (whole rows at a time),
    then columns; the blocks cut by the image's edge are NaN."""
    height, width, channels = image.shape
    by, bx = height // factor, width // factor
    result = np.full((out_h, out_w, channels), np.nan, np.float32)
    if by and bx:
        inner = np.asarray(image[:by * factor, :bx * factor], np.float32)
        rows = inner.reshape(by, factor, bx * factor * channels).sum(axis=1, dtype=np.float64)
        result[:by, :bx] = rows.reshape(by, bx, factor, channels).sum(axis=2) / (factor * factor)
    return result


def sky_level(values) -> float:
    """Return the sky level of a field's pixel values: the centre of their main peak (NaN if none).

    The sky is the most common level, while a median is pulled up by whatever covers much of the
    field (a nebula over 40 % of it moved a channel's median by a noise sigma, which tints a
    stretched sky). The peak is found by the half-sample mode (halving the sorted sample to its
    densest half), then refined as the median of the values within one noise sigma of it (the sigma
    from the side below, where only sky and noise are), three times: the mode alone is noisy.
    """
    v = np.sort(np.asarray(values, np.float64)[np.isfinite(values)])
    if v.size == 0:
        return float("nan")
    peak = v
    while peak.size > 3:
        half = (peak.size + 1) // 2
        start = int(np.argmin(peak[half - 1:] - peak[:peak.size - half + 1]))
        peak = peak[start:start + half]
    level = float(np.median(peak))
    below = level - v[v <= level]
    sigma = 1.4826 * float(np.median(below)) if below.size else 0.0
    for _ in range(3):
        window = v[(v >= level - sigma) & (v <= level + sigma)]
        if sigma <= 0 or window.size == 0:
            break
        level = float(np.median(window))
    return level


def _sorted_median(sorted_values, axis: int = 0):
    """Return the median of values sorted along ``axis``, as ``np.median`` computes it (the middle pair's mean)."""
    n = sorted_values.shape[axis]
    k = n // 2
    if n % 2:
        return sorted_values.take(k, axis=axis)
    return (sorted_values.take(k - 1, axis=axis) + sorted_values.take(k, axis=axis)) / 2


def median_last_axis(values, xp=np):
    """Return ``xp.median(values, axis=-1)`` through a sort: the same values, NaN where a row has NaN.

    NumPy sorts short float rows with SIMD but selects (``median``'s partition) element by
    element: star annuli and pixel rings, many short rows, are medianed faster by a sort.
    """
    if values.shape[-1] == 0:
        return xp.full(values.shape[:-1], xp.nan, values.dtype)
    ordered = xp.sort(values, axis=-1)  # NaN sorts last
    return xp.where(xp.isnan(ordered[..., -1]), xp.float32(xp.nan), _sorted_median(ordered, axis=-1))


def sigma_clipped_stats(values, xp=np, kappa: float = 3.0, iterations: int = 5):
    """Return ``(median, sigma)`` of the finite values after iterative kappa-sigma clipping.

    Sigma comes from the MAD (:func:`mad_sigma`, scaled to a Gaussian sigma) so stars barely
    move it; fewer than three finite values give ``(nan, nan)``. Written against ``xp`` (astropy's
    ``sigma_clipped_stats`` takes no CuPy array).
    """
    v = values[xp.isfinite(values)]
    if v.size < 3:
        return float("nan"), float("nan")
    for _ in range(iterations):
        med = xp.median(v)
        sigma = mad_sigma(v, xp, med)
        keep = xp.abs(v - med) <= kappa * sigma
        if bool(xp.all(keep)) or int(xp.sum(keep)) < 3:
            return float(med), float(sigma)  # v is unchanged: these are its statistics
        v = v[keep]
    med = xp.median(v)
    return float(med), float(mad_sigma(v, xp, med))


def smooth_nan(image2d, sigma):
    """Gaussian smoothing that ignores NaN (normalised convolution); NaN stays NaN."""
    return smooth_nan_planes([image2d], sigma)[0]


def smooth_nan_planes(planes, sigma) -> list:
    """Return :func:`smooth_nan` of every plane, their Gaussians computed at once on every core.

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


#: Standard deviation of a unit Gaussian cut at +-3 sigma: what a 3-sigma clip leaves of it.
_CLIPPED_GAUSSIAN_STD_3 = 0.98658
#: Pixels apart of the two samples of a noise difference: beyond the reach of a bilinear debayer
#: (+-1 pixel) and of a bilinear resampling (+1), so the two share no raw pixel.
NOISE_LAG_PX = 4


def pixel_noise_sigma(plane, n_max: int = 120_000, xp=np) -> float:
    """Return the Gaussian sigma of a 2-D plane's pixel noise, NaN when it cannot be measured.

    From second differences ``a - 2 b + c`` of pixels :data:`NOISE_LAG_PX` apart along rows (about
    ``n_max`` of them): a sky gradient cancels in them, nebulosity or a galaxy nearly, where they
    widen the spread of the pixels themselves; the three samples are independent however the image
    was debayered or resampled. The sigma is the standard deviation of the differences after
    3-sigma clipping (from the MAD), corrected for the clip, over sqrt(6): unlike a MAD it is not
    quantised by integer ADU (a 2 % step at 40 ADU of noise), and stars, hot pixels and trails are
    clipped.
    """
    h, w = plane.shape
    lag = NOISE_LAG_PX
    if w <= 2 * lag:
        return float("nan")
    rows = xp.asarray(plane[::max(1, int(h * (w - 2 * lag) // max(1, n_max)))], dtype=xp.float64)
    d = (rows[:, :-2 * lag] + rows[:, 2 * lag:] - 2.0 * rows[:, lag:-lag]).ravel()
    d = d[xp.isfinite(d)]
    if d.size < 10:
        return float("nan")
    start = subsample(d, 20_000)  # the clip's starting point only: a rough sigma will do
    centre = float(xp.median(start))
    sigma = float(mad_sigma(start, xp, centre))
    for _ in range(5):
        kept = d[xp.abs(d - centre) <= 3.0 * sigma]
        if kept.size < 10:
            break
        new_sigma = float(xp.std(kept)) / _CLIPPED_GAUSSIAN_STD_3
        centre = float(xp.mean(kept))
        if abs(new_sigma - sigma) <= 1e-4 * sigma:
            sigma = new_sigma
            break
        sigma = new_sigma
    return sigma / math.sqrt(6.0)


# --------------------------------------------------------------------------------------------------
# Pixel mapping between two celestial WCSs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixelMapping:
    """Input-pixel coordinates of an output bounding box, sampled on a coarse regular grid.

    ``y_in[i, j]``/``x_in[i, j]`` are the 0-based input coordinates of output pixel
    ``(y0 + i * step, x0 + j * step)``; the full-resolution map is the bilinear interpolation of
    this grid (see :func:`mapping_coordinates`), which :func:`compute_pixel_mapping` checked
    against the exact transform.
    """

    y0: int
    y1: int
    x0: int
    x1: int
    step: int
    y_in: np.ndarray
    x_in: np.ndarray
    max_error_px: float

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(rows, cols)`` of the output bounding box."""
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def slices(self) -> tuple[slice, slice]:
        """Slices of the bounding box in the output array."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def _exact_input_coords(wcs_in, wcs_out, y_out, x_out) -> tuple[np.ndarray, np.ndarray]:
    """Return exact input pixel coordinates (SIP included) of output pixel coordinates."""
    world = wcs_out.pixel_to_world_values(x_out, y_out)
    x_in, y_in = wcs_in.world_to_pixel_values(*world)
    return np.asarray(y_in, dtype=np.float64), np.asarray(x_in, dtype=np.float64)


def pixels_reached(ys, xs, wcs_in, wcs_out, shape_out) -> np.ndarray:
    """Return the flat indices (unique) of the ``shape_out`` pixels that input pixels ``(ys, xs)`` reach.

    Each input pixel lands between four output pixels (through the two WCSs); all four are
    reached, as a bilinear resampling spreads it over them. For a few pixels (saturated star
    cores): a full pixel mapping would cost a frame's worth of coordinates.
    """
    if len(ys) == 0:
        return np.zeros(0, np.int64)
    x_out, y_out = wcs_out.world_to_pixel_values(*wcs_in.pixel_to_world_values(
        np.asarray(xs, np.float64), np.asarray(ys, np.float64)))
    ok = np.isfinite(x_out) & np.isfinite(y_out)
    y0, x0 = np.floor(y_out[ok]).astype(np.int64), np.floor(x_out[ok]).astype(np.int64)
    h, w = shape_out
    rows = np.concatenate([y0, y0, y0 + 1, y0 + 1])
    cols = np.concatenate([x0, x0 + 1, x0, x0 + 1])
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    return np.unique(rows[inside] * w + cols[inside])


def output_bounding_box(wcs_in, shape_in, wcs_out, shape_out, margin: int = 2):
    """Return ``(y0, y1, x0, x1)`` of the output pixels an input image can touch, or None.

    The input's border (sampled every few pixels, so field rotation and distortion are followed)
    is projected onto the output grid; the box is clipped to the output shape.
    """
    ny, nx = shape_in
    n_side = 64
    ys = np.linspace(-0.5, ny - 0.5, n_side)
    xs = np.linspace(-0.5, nx - 0.5, n_side)
    border_y = np.concatenate([ys, ys, np.full(n_side, -0.5), np.full(n_side, ny - 0.5)])
    border_x = np.concatenate([np.full(n_side, -0.5), np.full(n_side, nx - 0.5), xs, xs])
    world = wcs_in.pixel_to_world_values(border_x, border_y)
    xo, yo = wcs_out.world_to_pixel_values(*world)
    ok = np.isfinite(xo) & np.isfinite(yo)
    if not ok.any():
        return None
    y0 = max(int(np.floor(yo[ok].min())) - margin, 0)
    y1 = min(int(np.ceil(yo[ok].max())) + margin + 1, shape_out[0])
    x0 = max(int(np.floor(xo[ok].min())) - margin, 0)
    x1 = min(int(np.ceil(xo[ok].max())) + margin + 1, shape_out[1])
    if y1 <= y0 or x1 <= x0:
        return None
    return y0, y1, x0, x1


def _interp_weights(n_full: int, step: int, n_coarse: int, xp=np):
    """Return ``(lo, hi, frac)``: 1-D linear interpolation of ``n_full`` points from a coarse grid.

    Point ``k`` (at coarse position ``k / step``) is ``(1 - frac) * node[lo] + frac * node[hi]``.
    Bilinear interpolation of a regular grid is separable: along the columns, then the rows.
    """
    pos = np.arange(n_full, dtype=np.float64) / step
    lo = np.clip(np.floor(pos).astype(np.int64), 0, max(n_coarse - 2, 0))
    hi = np.minimum(lo + 1, n_coarse - 1)
    return xp.asarray(lo), xp.asarray(hi), xp.asarray(pos - lo)


def _coarse_grid(wcs_in, wcs_out, box, step):
    """Return coarse node positions and exact input coordinates at those nodes."""
    y0, y1, x0, x1 = box
    n_cy = (y1 - y0 - 1) // step + 2
    n_cx = (x1 - x0 - 1) // step + 2
    node_y = y0 + step * np.arange(n_cy, dtype=np.float64)
    node_x = x0 + step * np.arange(n_cx, dtype=np.float64)
    gy, gx = np.meshgrid(node_y, node_x, indexing="ij")
    y_in, x_in = _exact_input_coords(wcs_in, wcs_out, gy, gx)
    return y_in, x_in


def _mapping_error(mapping: PixelMapping, wcs_in, wcs_out) -> float:
    """Return the max interpolation error (px) at cell centres, where bilinear error peaks."""
    if mapping.step == 1:
        return 0.0
    rows, cols = mapping.shape
    rng = np.random.default_rng(12345)  # fixed sample: the check must be reproducible
    n = min(400, rows * cols)
    cy = (rng.integers(0, max(1, (rows - 1) // mapping.step), n) + 0.5) * mapping.step
    cx = (rng.integers(0, max(1, (cols - 1) // mapping.step), n) + 0.5) * mapping.step
    cy = np.minimum(cy, rows - 1)
    cx = np.minimum(cx, cols - 1)
    y_ex, x_ex = _exact_input_coords(wcs_in, wcs_out, cy + mapping.y0, cx + mapping.x0)
    grid = np.stack([mapping.y_in, mapping.x_in])
    coords = np.stack([cy / mapping.step, cx / mapping.step])
    y_ap = scipy.ndimage.map_coordinates(grid[0], coords, order=1)
    x_ap = scipy.ndimage.map_coordinates(grid[1], coords, order=1)
    err = np.hypot(y_ap - y_ex, x_ap - x_ex)
    err = err[np.isfinite(err)]
    return float(err.max()) if err.size else 0.0


def compute_pixel_mapping(wcs_in, shape_in, wcs_out, shape_out, step: int = MAPPING_COARSE_STEP,
                          tolerance_px: float = MAPPING_TOLERANCE_PX) -> PixelMapping | None:
    """Return the output->input pixel mapping of an input image on an output grid, or None.

    The exact transform (astropy, SIP included) is evaluated on a coarse grid over the output
    bounding box of the input; the grid is refined (step halved) until bilinear interpolation of it
    matches the exact transform within ``tolerance_px`` at test points, down to the exact transform
    at every pixel (``step == 1``). None when the input does not touch the output grid.
    """
    box = output_bounding_box(wcs_in, shape_in, wcs_out, shape_out)
    if box is None:
        return None
    while True:
        y_in, x_in = _coarse_grid(wcs_in, wcs_out, box, step)
        mapping = PixelMapping(*box, step=step, y_in=y_in, x_in=x_in, max_error_px=0.0)
        err = _mapping_error(mapping, wcs_in, wcs_out)
        if err <= tolerance_px or step == 1:
            return PixelMapping(*box, step=step, y_in=y_in, x_in=x_in, max_error_px=err)
        logger.debug("pixel mapping step %d off by %.3g px; refining", step, err)
        step = max(1, step // 2)


def mapping_coordinates(mapping: PixelMapping, row_start: int, row_stop: int, xp=np):
    """Return full-resolution input coordinates ``(y_in, x_in)`` for rows of a mapping's box.

    ``row_start``/``row_stop`` index rows of the bounding box (not of the output array). Only the
    coarse rows these rows need are interpolated; element-wise arithmetic rather than matrix
    products, so threads co-adding bands at once do not contend for a BLAS.
    """
    rows, cols = mapping.shape
    n_cy, n_cx = mapping.y_in.shape
    lo_y, hi_y, fy = (a[row_start:row_stop] for a in _interp_weights(rows, mapping.step, n_cy, xp))
    lo_x, hi_x, fx = _interp_weights(cols, mapping.step, n_cx, xp)
    first = int(lo_y.min()) if lo_y.size else 0
    needed = slice(first, (int(hi_y.max()) + 1) if hi_y.size else first)
    fy = fy[:, None]

    def interpolate(grid):
        grid = xp.asarray(grid)[needed]
        across = grid[:, lo_x] * (1.0 - fx) + grid[:, hi_x] * fx
        return across[lo_y - first] * (1.0 - fy) + across[hi_y - first] * fy

    return interpolate(mapping.y_in), interpolate(mapping.x_in)


# --------------------------------------------------------------------------------------------------
# The mosaic grid
# --------------------------------------------------------------------------------------------------


def optimal_celestial_grid(inputs, auto_rotate: bool = True):
    """Return ``(wcs, (H, W))``: the TAN grid that covers images ``[(shape_hw, celestial WCS), ...]``.

    astropy reproject's ``find_optimal_celestial_wcs``: its centre is the mean direction of the
    images' reference points, its pixels the smallest of the images' pixel scales, and with
    ``auto_rotate`` it is turned so that the smallest rectangle around every image's corners lies
    along its axes.
    """
    from reproject.mosaicking import find_optimal_celestial_wcs

    wcs, shape = find_optimal_celestial_wcs(list(inputs), projection="TAN", auto_rotate=auto_rotate)
    return wcs, (int(shape[0]), int(shape[1]))


# --------------------------------------------------------------------------------------------------
# Co-addition
# --------------------------------------------------------------------------------------------------


def _rows_per_chunk(n_cols: int, budget_bytes: int, bytes_per_pixel: int = 96) -> int:
    """Return how many rows of ``n_cols`` pixels fit a memory budget (at least 1)."""
    return max(1, int(budget_bytes // max(1, n_cols * bytes_per_pixel)))


def _as_hwc(array, xp):
    """Return a float32 ``(H, W, C)`` view of a 2-D or 3-D image on backend ``xp``."""
    array = xp.asarray(array, dtype=xp.float32)
    return array[..., None] if array.ndim == 2 else array


def _weighted_planes(data, weight, xp, feather=None):
    """Return the float32 planes an input adds to the co-add, and whether its channels share a weight.

    The planes are ``[w, w I_0 .. w I_{C-1}]`` when every channel has data at the same pixels (one
    weight plane serves them all: a third fewer gathers), ``[w_0 .. w_{C-1}, w_0 I_0 ..]``
    otherwise; each is ``(H + 2) * (W + 2)`` long, the image bordered by one pixel of zeros (see
    :func:`bilinear_gather`). NaN carries no weight: it is zeroed only inside the products, never
    turned into a value. With a ``feather`` factor the combining weights are ``w * feather`` and
    the plain weights ``w`` (what the coverage sums) follow them.
    """
    h, w_px, c = data.shape
    finite = [xp.isfinite(data[..., k]) for k in range(c)]
    shared = all(bool(xp.array_equal(finite[0], f)) for f in finite[1:])
    n_weights = 1 if shared else c
    combining = weight if feather is None else weight * feather
    n_planes = n_weights + c + (0 if feather is None else n_weights)
    planes = xp.zeros((n_planes, h + 2, w_px + 2), xp.float32)
    inner = (slice(1, h + 1), slice(1, w_px + 1))
    for k in range(c):
        if k < n_weights:
            planes[(k,) + inner] = xp.where(finite[k], combining, xp.float32(0))
            if feather is not None:
                planes[(n_weights + c + k,) + inner] = xp.where(finite[k], weight, xp.float32(0))
        planes[(n_weights + k,) + inner] = xp.where(finite[k], data[..., k] * combining, xp.float32(0))
    return planes.reshape(n_planes, -1), shared


def channel_planes(image, xp):
    """Return a contiguous float32 ``(C, H * W)`` copy of an ``(H, W, C)`` image, a plane per channel."""
    image = xp.asarray(image, dtype=xp.float32)
    return xp.ascontiguousarray(xp.moveaxis(image, -1, 0)).reshape(image.shape[-1], -1)


def bilinear_gather(planes, shape_in, y, x, xp, nan_outside: bool = False, window=None):
    """Return bilinear samples ``(K, n)`` of ``(K, H * W)`` planes at coordinates ``y``, ``x``.

    Written with ``take`` on the planes: four gathers of one index array serve every channel (and
    the weight) where ``map_coordinates`` would compute them again per quantity, on NumPy and CuPy
    alike. The planes are channel-major so that every product runs along the ``n`` samples rather
    than broadcasting a weight over a short channel axis.

    With ``nan_outside`` (alignment, display) it is ``scipy.ndimage.map_coordinates`` with
    ``order=1, mode="constant", cval=nan``: NaN outside ``[0, n - 1]`` on either axis, and NaN
    wherever one of the four neighbours is NaN, even one of weight 0 (a sample on the last row
    or column takes its neighbours from the row or column before).

    Without it (the co-add) each plane is the image bordered by one pixel of zeros,
    ``(H + 2) * (W + 2)`` long (:func:`_weighted_planes`): outside the image counts as 0 (with
    weight 0), interpolated up to a pixel beyond the edge pixel centres as astropy's reproject
    does, so a tile's weight falls off smoothly at its border. Coordinates are clamped to the
    border, where every corner but the zeros has weight 0: no bounds test per corner.

    ``window`` ``(y0, x0, h, w)``: the planes hold only that window of the ``shape_in`` image
    (the pixels the coordinates can reach, :func:`_source_window`, bordered by zeros too);
    coordinates stay those of the whole image, so the result is the same as with every pixel's
    planes.
    """
    h, w = shape_in
    wy0, wx0, wh, ww = window if window is not None else (0, 0, h, w)
    y = y.ravel()
    x = x.ravel()
    if nan_outside:
        inside = (y >= 0) & (y <= h - 1) & (x >= 0) & (x <= w - 1)
        y0f = xp.clip(xp.floor(y), 0, max(h - 2, 0))
        x0f = xp.clip(xp.floor(x), 0, max(w - 2, 0))
        stride = ww
        # An image one pixel high or wide has no second row or column: its own stands in (weight 0).
        step_y, step_x = min(h - 1, 1), min(w - 1, 1)
    else:  # bordered planes: the window's row -1 and column -1 are the border's
        y = xp.clip(y - (wy0 - 1), 0, wh + 1)
        x = xp.clip(x - (wx0 - 1), 0, ww + 1)
        y0f = xp.minimum(xp.floor(y), wh)
        x0f = xp.minimum(xp.floor(x), ww)
        wy0 = wx0 = 0
        stride = ww + 2
        step_y = step_x = 1
    fy = (y - y0f).astype(xp.float32)
    fx = (x - x0f).astype(xp.float32)
    base = (y0f.astype(xp.int64) - wy0) * stride + (x0f.astype(xp.int64) - wx0)
    out = None
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            # In place: a fresh product array per corner costs more than the product.
            term = xp.take(planes, base + (dy * step_y * stride + dx * step_x), axis=1)
            term *= wy * wx
            if out is None:
                out = term
            else:
                out += term
    if nan_outside:
        out[:, ~inside] = xp.float32(xp.nan)
    return out


def scatter_channels(out, samples) -> None:
    """Write ``(C, n)`` samples into an ``(..., C)`` array of ``n`` pixels, channel by channel."""
    for k in range(samples.shape[0]):
        out[..., k] = samples[k].reshape(out.shape[:-1])


def affine_source_coords(matrix: np.ndarray, shape_hw, xp=np, first_row: int = 0, first_col: int = 0):
    """Return source coordinates ``(y, x)`` of every reference pixel under an affine matrix.

    ``first_row``, ``first_col``: the coordinates of rows ``first_row .. first_row + H - 1`` and
    columns ``first_col ..`` (a window of a larger grid).
    """
    h, w = shape_hw
    yy = xp.arange(first_row, first_row + h, dtype=xp.float64)[:, None]
    xx = xp.arange(first_col, first_col + w, dtype=xp.float64)[None, :]
    x_src = matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2]
    y_src = matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2]
    return y_src, x_src


# Pixels resampled per gather: a band this size keeps the gather's temporaries in the CPU caches.
_WARP_BAND_PIXELS = 32_768


def warp_image(image, y_src, x_src, xp=np, band_pixels: int = _WARP_BAND_PIXELS, out=None):
    """Resample an ``(H, W, C)`` image at source coordinates with bilinear interpolation.

    One gather per row band serves every channel (:func:`zemosaic_utils.bilinear_gather`, the
    co-add's kernel), with ``map_coordinates``'s ``order=1``/``cval=nan`` edge rules: pixels
    outside the source footprint (and next to source NaN) are NaN — the footprint propagates
    (``propagate_mask=True`` in the seeds' words); zeros there became coloured bands after
    normalisation. ``out``: the ``(H, W, C)`` float32 array to write into (default: a new one).
    """
    return _warp_bands(image, y_src.shape, lambda r0, r1, c0, c1: (y_src[r0:r1, c0:c1], x_src[r0:r1, c0:c1]),
                       xp, band_pixels, out)


def warp_affine(image, matrix: np.ndarray, shape_hw, xp=np, band_pixels: int = _WARP_BAND_PIXELS, out=None):
    """Return :func:`warp_image` at :func:`affine_source_coords` of ``matrix`` on a ``shape_hw`` grid.

    The same values; the coordinates exist for one band at a time (two float64 frames fewer to
    write and read back), and only for the columns where the band meets the frame: the rest is
    NaN, as the gather would make it (a turned frame covers half of each row of its canvas).
    """
    return _warp_bands(image, shape_hw,
                       lambda r0, r1, c0, c1: affine_source_coords(matrix, (r1 - r0, c1 - c0), xp, r0, c0),
                       xp, band_pixels, out, lambda r0, r1: _affine_columns(matrix, image.shape[:2], r0, r1,
                                                                            shape_hw[1]))


def _affine_columns(matrix, shape_source, r0: int, r1: int, width: int) -> tuple[int, int]:
    """Return the columns ``(c0, c1)`` of rows ``r0:r1`` whose affine source position may be in the frame.

    Along a row the source position moves linearly with the column, so each row's columns inside
    the frame's ``[0, h - 1] x [0, w - 1]`` are an interval; the band takes them all, and a
    column more each side for rounding.
    """
    h, w = shape_source
    rows = np.arange(r0, r1, dtype=np.float64)
    start, stop = np.zeros(rows.size), np.full(rows.size, width - 1.0)
    for axis, top in ((0, w - 1.0), (1, h - 1.0)):
        slope, base = matrix[axis, 0], matrix[axis, 1] * rows + matrix[axis, 2]
        if slope == 0:  # the same source position along the row: all of it or none
            start = np.where((base < 0) | (base > top), np.inf, start)
            continue
        a, b = (0.0 - base) / slope, (top - base) / slope
        start, stop = np.maximum(start, np.minimum(a, b)), np.minimum(stop, np.maximum(a, b))
    inside = start <= stop
    if not inside.any():
        return 0, 0
    return max(0, int(np.floor(start[inside].min())) - 1), min(width, int(np.ceil(stop[inside].max())) + 2)


def _warp_bands(image, shape_hw, band_coords, xp, band_pixels: int, out=None, columns=None):
    """Return the ``shape_hw`` warp of ``image``, gathering at ``band_coords(r0, r1, c0, c1)`` band by
    band (into ``out`` when given); ``columns(r0, r1)`` gives each band's columns ``(c0, c1)`` that
    may meet the frame (None: all), the others are NaN."""
    h, w = shape_hw
    n_ch = image.shape[2]
    rows_per_chunk = max(1, band_pixels // w)
    planes = channel_planes(image, xp)
    out = xp.empty((h, w, n_ch), dtype=xp.float32) if out is None else out
    for r0 in range(0, h, rows_per_chunk):
        r1 = min(h, r0 + rows_per_chunk)
        c0, c1 = (0, w) if columns is None else columns(r0, r1)
        out[r0:r1, :c0] = xp.float32(xp.nan)
        out[r0:r1, max(c0, c1):] = xp.float32(xp.nan)
        if c1 > c0:
            y, x = band_coords(r0, r1, c0, c1)
            scatter_channels(out[r0:r1, c0:c1], bilinear_gather(planes, image.shape[:2], y, x, xp, nan_outside=True))
    return out


def _source_window(mapping: PixelMapping, shape_in) -> tuple[int, int, int, int]:
    """Return ``(y0, x0, h, w)``: the window of an input that the mapping's coordinates can reach.

    The full-resolution coordinates interpolate the coarse grid's nodes, so they lie within the
    nodes' range; one pixel more on each side holds every bilinear neighbour. A tile resampled
    onto a small box (the overlap of two tiles) then costs the box, not the whole tile.
    """
    h, w = shape_in
    ys, xs = np.asarray(mapping.y_in), np.asarray(mapping.x_in)
    if not (np.isfinite(ys).all() and np.isfinite(xs).all()):
        return 0, 0, h, w
    y0 = int(min(max(np.floor(ys.min()) - 1, 0), h))
    y1 = int(max(min(np.floor(ys.max()) + 3, h), y0))
    x0 = int(min(max(np.floor(xs.min()) - 1, 0), w))
    x1 = int(max(min(np.floor(xs.max()) + 3, w), x0))
    return y0, x0, y1 - y0, x1 - x0


#: A feathered weight never falls below this fraction: where one tile alone has data, it stays.
FEATHER_FLOOR = 1e-3


def feather_ramp(coverage, width_px: float, solid: float = 0.0) -> np.ndarray:
    """Return a tile's weight factor ``(H, W)`` in (0, 1]: a raised cosine over ``width_px`` from its edge.

    The edge is that of where its ``coverage`` exceeds ``solid`` (or of where it has any, when
    nothing does): the factor is :data:`FEATHER_FLOOR` outside, rises as ``(1 - cos(pi d /
    width)) / 2`` with the distance ``d`` inside, and is 1 from ``width_px`` on. Two tiles
    feathered so hand over smoothly across their overlap instead of at one tile's edge.
    """
    cover = np.nan_to_num(np.asarray(coverage, np.float32))
    inside = cover > solid
    if not inside.any():
        inside = cover > 0
    if width_px <= 0 or not inside.any():
        return np.where(inside, np.float32(1.0), np.float32(FEATHER_FLOOR))
    t = np.clip(_edge_distance(inside, width_px) / float(width_px), 0.0, 1.0)
    ramp = np.maximum(0.5 - 0.5 * np.cos(np.pi * t), FEATHER_FLOOR).astype(np.float32)
    return np.where(inside, ramp, np.float32(FEATHER_FLOOR))


def _edge_distance(inside, width_px: float) -> np.ndarray:
    """Return each pixel's distance (px) to the nearest pixel outside ``inside`` or beyond the array.

    A ramp hundreds of pixels wide needs no pixel precision: for wide ramps the distance is
    measured on blocks of up to 1/64 of the width (a block inside where all its pixels are) and
    interpolated back, which is several times cheaper than at full resolution on a large tile.
    """
    factor = int(max(1, min(8, width_px // 64)))
    if factor == 1:
        return scipy.ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
    h, w = inside.shape
    hb, wb = -(-h // factor), -(-w // factor)
    padded = np.zeros((hb * factor, wb * factor), bool)
    padded[:h, :w] = inside
    blocks = padded.reshape(hb, factor, wb, factor).all(axis=(1, 3))
    # The array's border is outside too: a footprint that reaches it ends there.
    coarse = scipy.ndimage.distance_transform_edt(np.pad(blocks, 1))[1:-1, 1:-1] * factor
    return scipy.ndimage.zoom(coarse, (h / hb, w / wb), order=1, grid_mode=True, mode="nearest")[:h, :w]


@dataclass(frozen=True)
class _CoaddInput:
    """One input of the co-add, ready to gather: its weighted planes (of its source window)."""

    planes: object
    shared_weight: bool  # one weight plane for every channel
    shape_in: tuple
    window: tuple
    mapping: PixelMapping
    feathered: bool = False  # the planes end with the plain (unfeathered) weights


def _coadd_input(data, weight, mapping: PixelMapping, xp, feather=None) -> _CoaddInput | None:
    """Return an input prepared for :func:`_accumulate_rows`, or None when it reaches no pixel."""
    shape_in = np.shape(data)[:2]
    window = _source_window(mapping, shape_in)
    if window[2] == 0 or window[3] == 0:
        return None
    crop = (slice(window[0], window[0] + window[2]), slice(window[1], window[1] + window[3]))
    data = _as_hwc(data[crop], xp)
    weight = xp.ones(data.shape[:2], xp.float32) if weight is None else \
        xp.nan_to_num(xp.asarray(weight[crop], xp.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if feather is not None:
        feather = xp.asarray(feather[crop], xp.float32)
    return _CoaddInput(*_weighted_planes(data, weight, xp, feather), shape_in, window, mapping, feather is not None)


@dataclass(frozen=True)
class _SumLayout:
    """Where a band's float64 sums keep what (each a block of C planes, C channels).

    ``[sum w, sum w I]`` always (w: the combining weight); then ``sum`` of the plain weights
    (the coverage) when feathered; then the trusted samples' ``[sum w, sum w I]`` with a
    trusted weight.
    """

    n_ch: int
    feathered: bool
    trusted: bool

    @property
    def planes(self) -> int:
        return self.n_ch * (2 + self.feathered + 2 * self.trusted)

    @property
    def coverage(self) -> slice:
        start = 2 * self.n_ch
        return slice(start, start + self.n_ch) if self.feathered else slice(0, self.n_ch)

    @property
    def trusted_sums(self) -> slice:
        start = self.n_ch * (2 + self.feathered)
        return slice(start, start + 2 * self.n_ch)


def _accumulate_rows(sums, r0: int, r1: int, source: _CoaddInput, xp, layout: _SumLayout,
                     trusted_weight=None) -> None:
    """Add one input, resampled, into ``sums``: the ``(layout.planes, r1 - r0, W)`` float64 output rows r0..r1.

    With ``trusted_weight``, the samples whose (resampled, plain) weight reaches it are added
    into the trusted sums too.
    """
    mapping = source.mapping
    a, b = max(r0, mapping.y0), min(r1, mapping.y1)
    if a >= b:
        return
    y_in, x_in = mapping_coordinates(mapping, a - mapping.y0, b - mapping.y0, xp)
    sampled = bilinear_gather(source.planes, source.shape_in, y_in, x_in, xp, window=source.window)
    sampled = sampled.reshape(-1, b - a, mapping.x1 - mapping.x0)
    rows, cols = slice(a - r0, b - r0), slice(mapping.x0, mapping.x1)
    n_ch = layout.n_ch
    n_w = 1 if source.shared_weight else n_ch
    combined = sampled[:n_w + n_ch]
    plain = sampled[n_w + n_ch:] if source.feathered else sampled[:n_w]
    _add_planes(sums[:2 * n_ch], rows, cols, combined, n_ch, source.shared_weight)
    if layout.feathered:
        sums[layout.coverage, rows, cols] += plain
    if trusted_weight is not None:
        trusted = plain >= trusted_weight
        combined = xp.where(trusted if source.shared_weight else xp.concatenate([trusted, trusted]), combined, 0.0)
        _add_planes(sums[layout.trusted_sums], rows, cols, combined, n_ch, source.shared_weight)


def _add_planes(sums, rows, cols, sampled, n_ch: int, shared_weight: bool) -> None:
    """Add gathered ``[w, w*I]`` planes into ``(2C, ...)`` sums (one ``w`` plane for all channels when shared)."""
    if shared_weight:
        sums[:n_ch, rows, cols] += sampled[:1]
        sums[n_ch:, rows, cols] += sampled[1:]
    else:
        sums[:, rows, cols] += sampled


def _coadd_fast(data_list, weights_list, mappings, shape_out, xp, rows_per_chunk, trusted_weight=None,
                feathers=None):
    """Mean co-add with the ``fast`` engine on backend ``xp``.

    Returns ``(mosaic (H, W, C), coverage (H, W, C))`` on ``xp``, float32; the mosaic is NaN where
    coverage == 0. The output is made band by band of ``rows_per_chunk`` rows, every input
    added into the band's float64 sums in turn, so the sums never take the whole mosaic's memory.
    On the CPU the bands run on every core (NumPy's gathers and sums release the GIL); each band's
    result does not depend on the others, so it is the same for any number of threads.
    ``trusted_weight``, ``feathers``: see :func:`reproject_and_coadd`.
    """
    n_ch = np.shape(data_list[0])[-1] if np.ndim(data_list[0]) == 3 else 1
    feathers = [None] * len(data_list) if feathers is None else \
        [np.ones(np.shape(d)[:2], np.float32) if f is None else f for d, f in zip(data_list, feathers)]
    layout = _SumLayout(n_ch, any(f is not None for f in feathers), trusted_weight is not None)
    todo = [(d, w, m, f) for d, w, m, f in zip(data_list, weights_list, mappings, feathers) if m is not None]
    prepare = lambda item: _coadd_input(item[0], item[1], item[2], xp, item[3])  # noqa: E731
    inputs = map_threads(prepare, todo) if xp is np else [prepare(item) for item in todo]
    inputs = [source for source in inputs if source is not None]
    height, width = shape_out
    mosaic = xp.empty((height, width, n_ch), xp.float32)
    coverage = xp.empty((height, width, n_ch), xp.float32)

    def band(r0):
        r1 = min(height, r0 + rows_per_chunk)
        sums = xp.zeros((layout.planes, r1 - r0, width), dtype=xp.float64)
        for source in inputs:
            _accumulate_rows(sums, r0, r1, source, xp, layout, trusted_weight)
        mosaic[r0:r1], coverage[r0:r1] = _normalised_sums(sums, layout, xp)

    starts = range(0, height, rows_per_chunk)
    if xp is np:
        map_threads(band, starts)
    else:  # one device stream: the bands run in turn
        for r0 in starts:
            band(r0)
    return mosaic, coverage


def _normalised_sums(sums, layout: _SumLayout, xp):
    """Return float32 ``(mosaic, coverage)`` ``(rows, W, C)`` of a band from its planes of sums
    (see :class:`_SumLayout`).

    The trusted samples' mean stands wherever they have weight. Tiny weight sums are float
    rounding at the very edge of a footprint: they mean "no data".
    """
    n_ch = layout.n_ch
    shape = sums.shape[1:] + (n_ch,)
    mosaic, coverage = xp.empty(shape, xp.float32), xp.empty(shape, xp.float32)
    plain = sums[layout.coverage]
    for k in range(n_ch):
        sum_w, sum_wi = sums[k], sums[n_ch + k]
        solid = (plain[k] > 1e-6) & (sum_w > 0)
        mosaic[..., k] = xp.where(solid, sum_wi / xp.where(solid, sum_w, 1.0), xp.nan)
        coverage[..., k] = xp.where(solid, plain[k], 0.0)
        if layout.trusted:
            trusted_w, trusted_wi = sums[layout.trusted_sums][k], sums[layout.trusted_sums][n_ch + k]
            lead = solid & (trusted_w > 0)
            mosaic[..., k] = xp.where(lead, trusted_wi / xp.where(lead, trusted_w, 1.0), mosaic[..., k])
    return mosaic, coverage


def _squeeze_like(inputs, mosaic, coverage):
    """Return 2-D results for 2-D inputs (one channel), 3-D otherwise."""
    if np.ndim(inputs[0]) == 2:
        return mosaic[..., 0], coverage[..., 0]
    return mosaic, coverage


def _coadd_bytes_per_pixel(n_ch: int, trusted_weight, feathered: bool = False) -> int:
    """Return the working bytes per output pixel of a band of :func:`_coadd_fast`."""
    return 32 * (_SumLayout(n_ch, feathered, trusted_weight is not None).planes + 2)


def gpu_reproject_and_coadd_impl(data_list, wcs_list, wcs_out, shape_out, weights_list=None,
                                 mappings=None, trusted_weight=None, feathers=None):
    """Run the ``fast`` co-add engine on the GPU; returns host float32 ``(mosaic, coverage)``.

    ``data_list`` holds 2-D images or ``(H, W, C)`` images (all channels in one pass, sharing the
    coordinates and gathers); ``weights_list`` a weight map per image (None: unit weights);
    ``mappings`` a precomputed :class:`PixelMapping` per image.

    Coverage is the sum of weights (never divided by the number of inputs), non-finite values
    sanitised to 0. Rows are processed in chunks sized to free VRAM; on out-of-memory the chunk
    size is halved and retried; a device error ends as :class:`GpuBackendError`.
    """
    xp = get_xp(use_gpu=True)
    n_ch = 1 if np.ndim(data_list[0]) == 2 else np.shape(data_list[0])[-1]
    weights_list = weights_list or [None] * len(data_list)
    mappings = mappings or [
        compute_pixel_mapping(w, np.shape(d)[:2], wcs_out, shape_out) for d, w in zip(data_list, wcs_list)
    ]
    # NumPy standing in for CuPy uses the CPU engine's small chunks (see reproject_and_coadd).
    budget = free_gpu_memory_bytes() // 4 if xp is not np else 16 * 2**20
    rows = _rows_per_chunk(shape_out[1], budget, _coadd_bytes_per_pixel(n_ch, trusted_weight, feathers is not None))
    mosaic, coverage = halving_rows_on_oom(
        lambda r: _coadd_fast(data_list, weights_list, mappings, shape_out, xp, r, trusted_weight, feathers),
        rows, xp, "co-add")
    return _squeeze_like(data_list, to_numpy(mosaic), to_numpy(coverage))


def reproject_and_coadd(data_list, wcs_list, wcs_out, shape_out, weights_list=None, engine="fast",
                        use_gpu=False, mappings=None, trusted_weight=None, feathers=None):
    """Co-add images onto an output grid with a weighted mean; returns ``(mosaic, coverage)``.

    Parameters
    ----------
    data_list : list of 2-D, or ``(H, W, C)``, float arrays (NaN = no data)
    wcs_list : list of celestial WCS, one per image
    wcs_out, shape_out : the output grid
    weights_list : list of 2-D weight maps (e.g. master-tile coverage) or None for unit weights
    engine : ``"fast"`` (coarse-grid pixel mapping + bilinear resampling, CPU or GPU) or
        ``"reproject"`` (astropy reproject's ``reproject_and_coadd`` with ``reproject_interp``)
    use_gpu : run the ``fast`` engine on CuPy; raises :class:`GpuBackendError` when that fails
    mappings : precomputed :class:`PixelMapping` per image
    trusted_weight : samples whose (resampled) weight is below it count only where no sample
        reaches it; their weight still counts in the coverage. With master-tile coverage as the
        weights and the frames rejection needs, a tile's edge stacked from one or two frames
        (nothing rejected there: a satellite trail survives) yields to a tile that rejected.
    feathers : list of 2-D factors in (0, 1] (or None entries) multiplying each input's weight in
        the mean only (:func:`feather_ramp`): the coverage stays the sum of the plain weights

    Returns
    -------
    mosaic : float32 ``shape_out`` (+ ``(C,)`` for 3-D inputs), NaN where coverage == 0
    coverage : float32, same shape: the sum of weights (> 1 where inputs overlap)
    """
    n = len(data_list)
    weights_list = list(weights_list) if weights_list is not None else [None] * n
    if engine == "reproject":
        return _coadd_with_reproject(data_list, wcs_list, wcs_out, shape_out, weights_list, trusted_weight,
                                     feathers)
    require_choice("engine", engine, ASSEMBLY_ENGINES)
    if mappings is None:
        mappings = [compute_pixel_mapping(w, np.shape(d)[:2], wcs_out, shape_out)
                    for d, w in zip(data_list, wcs_list)]
    if use_gpu:
        return gpu_reproject_and_coadd_impl(data_list, wcs_list, wcs_out, shape_out, weights_list,
                                            mappings, trusted_weight, feathers)
    n_ch = 1 if np.ndim(data_list[0]) == 2 else np.shape(data_list[0])[-1]
    # Small chunks (a few MB of temporaries) stay in cache and reuse freed memory: measured
    # faster on the CPU than large ones, whose fresh allocations cost page faults.
    rows = _rows_per_chunk(shape_out[1], 16 * 2**20, _coadd_bytes_per_pixel(n_ch, trusted_weight, feathers is not None))
    mosaic, coverage = _coadd_fast(data_list, weights_list, mappings, shape_out, np, rows, trusted_weight,
                                   feathers)
    return _squeeze_like(data_list, mosaic, coverage)


def _coadd_with_reproject(data_list, wcs_list, wcs_out, shape_out, weights_list, trusted_weight=None,
                          feathers=None):
    """Reference engine: astropy reproject's ``reproject_and_coadd`` with ``reproject_interp``.

    ``trusted_weight`` and ``feathers`` (see :func:`reproject_and_coadd`) are applied to the input
    weights: a second co-add of the trusted pixels alone stands wherever it has data; with
    feathers the mean uses the feathered weights and a co-add of the plain weights gives the
    coverage.
    """
    if np.ndim(data_list[0]) == 3:  # one call per channel, as reproject takes 2-D images
        results = [_coadd_with_reproject([d[..., c] for d in data_list], wcs_list, wcs_out,
                                         shape_out, weights_list, trusted_weight, feathers)
                   for c in range(np.shape(data_list[0])[-1])]
        return np.stack([m for m, _ in results], -1), np.stack([c for _, c in results], -1)
    weights = [np.ones(np.shape(d)) if w is None else np.nan_to_num(np.asarray(w, np.float64))
               for d, w in zip(data_list, weights_list)]
    combining = weights if feathers is None else [w if f is None else w * f for w, f in zip(weights, feathers)]
    mosaic, coverage = _reproject_mean(data_list, wcs_list, wcs_out, shape_out, combining)
    if feathers is not None:
        coverage = _reproject_mean(data_list, wcs_list, wcs_out, shape_out, weights)[1]
    if trusted_weight is not None:
        trusted = [np.where(w >= trusted_weight, c, 0.0) for w, c in zip(weights, combining)]
        lead, lead_coverage = _reproject_mean(data_list, wcs_list, wcs_out, shape_out, trusted)
        mosaic = np.where(lead_coverage > 0, lead, mosaic)
    return mosaic, coverage


def _reproject_mean(data_list, wcs_list, wcs_out, shape_out, weights):
    """Return reproject's weighted mean of 2-D images and its sum of weights, float32, NaN where none."""
    from reproject import reproject_interp
    from reproject.mosaicking import reproject_and_coadd as rp_coadd

    inputs = [(np.asarray(d, np.float64), w) for d, w in zip(data_list, wcs_list)]
    mosaic, footprint = rp_coadd(inputs, wcs_out, shape_out=tuple(shape_out), input_weights=weights,
                                 reproject_function=reproject_interp, combine_function="mean")
    footprint = np.nan_to_num(footprint, nan=0.0, posinf=0.0, neginf=0.0)
    mosaic = np.where(footprint > 0, mosaic, np.nan)
    return mosaic.astype(np.float32), footprint.astype(np.float32)


def unit_vectors(ra_deg, dec_deg) -> np.ndarray:
    """Return the unit vectors ``(N, 3)`` of sky positions given in degrees."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)
