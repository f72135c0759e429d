"""Array backends, pixel mapping between WCSs and the reproject-and-coadd front door.

Everything numeric here is written once against an array namespace ``xp`` (NumPy or CuPy) and the
matching ``ndimage`` module (``scipy.ndimage`` or ``cupyx.scipy.ndimage``), so the CPU and GPU
engines run the same maths and the GPU code path can be tested with NumPy standing in for CuPy.

Conventions (see DESIGN.md): images are float32, NaN means "no data", coverage is a sum of weights
(float32, 0 where there is no data) in the same units on every backend.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

logger = logging.getLogger(__name__)

#: Environment variable for fault injection in tests: a comma-separated list of channel indices on
#: which the GPU co-add engine raises :class:`GpuBackendError` (see :func:`gpu_reproject_and_coadd_impl`).
GPU_FAIL_CHANNELS_ENV = "ZEMOSAIC_GPU_FAIL_CHANNELS"

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
    """Return the array namespace for a backend: CuPy when ``use_gpu`` and a GPU is usable, else NumPy."""
    if use_gpu and gpu_available():
        import cupy

        return cupy
    return np


def get_ndimage(xp):
    """Return the ``ndimage`` module that matches an array namespace."""
    if xp is np:
        return scipy.ndimage
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage


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
    an array without any finite value gives ``(nan, nan)``. ``xp`` defaults to the array's module.
    Every GPU normalisation goes through here so none of them can collapse on NaN footprints.
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


def _interp_matrix(n_full: int, step: int, n_coarse: int, xp=np):
    """Return the ``(n_full, n_coarse)`` matrix of 1-D linear interpolation from a coarse grid.

    Bilinear interpolation of a regular grid is separable, so the full-resolution map is
    ``Wy @ grid @ Wx.T``: two small matrix products instead of a gather per pixel.
    """
    pos = np.arange(n_full, dtype=np.float64) / step
    lo = np.minimum(np.floor(pos).astype(np.int64), n_coarse - 2) if n_coarse > 1 else np.zeros(n_full, np.int64)
    frac = pos - lo
    mat = np.zeros((n_full, n_coarse), dtype=np.float64)
    rows = np.arange(n_full)
    if n_coarse == 1:
        mat[:, 0] = 1.0
    else:
        mat[rows, lo] = 1.0 - frac
        mat[rows, lo + 1] = frac
    return xp.asarray(mat)


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

    ``row_start``/``row_stop`` index rows of the bounding box (not of the output array).
    """
    rows, cols = mapping.shape
    n_cy, n_cx = mapping.y_in.shape
    wy = _interp_matrix(rows, mapping.step, n_cy, xp)[row_start:row_stop]
    wx = _interp_matrix(cols, mapping.step, n_cx, xp)
    y_in = wy @ xp.asarray(mapping.y_in) @ wx.T
    x_in = wy @ xp.asarray(mapping.x_in) @ wx.T
    return y_in, x_in


# --------------------------------------------------------------------------------------------------
# Co-addition
# --------------------------------------------------------------------------------------------------


def _rows_per_chunk(n_cols: int, budget_bytes: int, bytes_per_pixel: int = 64) -> int:
    """Return how many rows of ``n_cols`` pixels fit a memory budget (at least 1)."""
    return max(1, int(budget_bytes // max(1, n_cols * bytes_per_pixel)))


def _accumulate_tile(sum_wi, sum_w, data, weight, mapping: PixelMapping, xp, ndimage,
                     rows_per_chunk: int) -> None:
    """Add one input image, resampled through ``mapping``, into the running sums.

    Data and weight are resampled as ``w * I`` and ``w`` (normalised convolution): no data (NaN)
    only removes weight, it is never turned into a value, so tile edges do not darken.
    """
    finite = xp.isfinite(data)
    # NaN carries no weight; zero it only inside the product so sums stay finite.
    w = xp.where(finite, weight, 0).astype(xp.float32)
    wi = xp.where(finite, data * weight, 0).astype(xp.float32)
    rows, _cols = mapping.shape
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(rows, r0 + rows_per_chunk)
        y_in, x_in = mapping_coordinates(mapping, r0, r1, xp)
        coords = xp.stack([y_in, x_in])
        res_wi = ndimage.map_coordinates(wi, coords, order=1, mode="constant", cval=0.0)
        res_w = ndimage.map_coordinates(w, coords, order=1, mode="constant", cval=0.0)
        out = (slice(mapping.y0 + r0, mapping.y0 + r1), slice(mapping.x0, mapping.x1))
        sum_wi[out] += res_wi
        sum_w[out] += res_w


def _coadd_fast(data_list, weights_list, mappings, shape_out, xp, ndimage, rows_per_chunk,
                fail=False):
    """Mean co-add with the ``fast`` engine on backend ``xp``; returns ``(mosaic, coverage)`` on xp.

    Sums are accumulated in float64; the mosaic is NaN where coverage == 0.
    """
    if fail:
        raise GpuBackendError("injected GPU failure (fault injection)")
    sum_wi = xp.zeros(shape_out, dtype=xp.float64)
    sum_w = xp.zeros(shape_out, dtype=xp.float64)
    for data, weight, mapping in zip(data_list, weights_list, mappings):
        if mapping is None:
            continue
        data = xp.asarray(data, dtype=xp.float32)
        weight = xp.ones(data.shape, xp.float32) if weight is None else xp.asarray(weight, xp.float32)
        _accumulate_tile(sum_wi, sum_w, data, weight, mapping, xp, ndimage, rows_per_chunk)
    # Tiny negative sums can appear from float rounding in bilinear weights; they mean "no data".
    coverage = xp.where(sum_w > 1e-6, sum_w, 0.0)
    coverage = xp.nan_to_num(coverage, nan=0.0, posinf=0.0, neginf=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mosaic = xp.where(coverage > 0, sum_wi / xp.where(coverage > 0, coverage, 1.0), xp.nan)
    return mosaic.astype(xp.float32), coverage.astype(xp.float32)


def _injected_gpu_failure(channel: int | None) -> bool:
    """Return True when fault injection asks the GPU engine to fail on ``channel``."""
    spec = os.environ.get(GPU_FAIL_CHANNELS_ENV, "").strip()
    if not spec or channel is None:
        return False
    return str(channel) in {s.strip() for s in spec.split(",")}


def gpu_reproject_and_coadd_impl(data_list, wcs_list, shape_out, **kwargs):
    """Run the ``fast`` co-add engine on the GPU; returns host float32 ``(mosaic, coverage)``.

    Keyword arguments: ``wcs_out`` (required), ``weights_list``, ``mappings`` (precomputed
    :class:`PixelMapping` per input), ``channel`` (used by fault injection), ``xp`` (array module;
    NumPy lets tests run this code path without a GPU), ``fail_channels`` (fault injection, like the
    ``ZEMOSAIC_GPU_FAIL_CHANNELS`` environment variable).

    Coverage is the sum of weights (never divided by the number of inputs), non-finite values
    sanitised to 0. Rows are processed in chunks sized to free VRAM; on out-of-memory the chunk
    size is halved and retried; any device error ends as :class:`GpuBackendError`.
    """
    wcs_out = kwargs["wcs_out"]
    channel = kwargs.get("channel")
    fail_channels = kwargs.get("fail_channels")
    fail = (channel in fail_channels) if fail_channels is not None else _injected_gpu_failure(channel)
    xp = kwargs.get("xp")
    if xp is None:
        if not gpu_available():
            raise GpuBackendError(f"GPU not available: {gpu_unavailable_reason()}")
        import cupy as xp
    weights_list = kwargs.get("weights_list") or [None] * len(data_list)
    mappings = kwargs.get("mappings") or [
        compute_pixel_mapping(w, d.shape, wcs_out, shape_out) for d, w in zip(data_list, wcs_list)
    ]
    ndimage = get_ndimage(xp)
    budget = free_gpu_memory_bytes() // 4 if xp is not np else 256 * 2**20
    rows = _rows_per_chunk(shape_out[1], budget)
    while True:
        try:
            mosaic, coverage = _coadd_fast(data_list, weights_list, mappings, shape_out, xp, ndimage,
                                           rows, fail=fail)
            return to_numpy(mosaic), to_numpy(coverage)
        except GpuBackendError:
            raise
        except Exception as exc:
            if _is_out_of_memory(exc) and rows > 16:
                rows //= 2
                logger.debug("GPU out of memory; retrying co-add with %d-row chunks", rows)
                continue
            raise GpuBackendError(f"GPU co-add failed: {exc}") from exc


def _is_out_of_memory(exc: Exception) -> bool:
    """Return True for a CuPy/CUDA out-of-memory error."""
    return "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower()


def reproject_and_coadd(data_list, wcs_list, wcs_out, shape_out, weights_list=None, engine="fast",
                        use_gpu=False, mappings=None, channel=None, gpu_xp=None):
    """Co-add 2-D images onto an output grid with a weighted mean; returns ``(mosaic, coverage)``.

    Parameters
    ----------
    data_list : list of 2-D float arrays (NaN = no data)
    wcs_list : list of celestial WCS, one per image
    wcs_out, shape_out : the output grid
    weights_list : list of 2-D weight maps (e.g. master-tile coverage) or None for unit weights
    engine : ``"fast"`` (coarse-grid pixel mapping + bilinear resampling, CPU or GPU) or
        ``"reproject"`` (astropy reproject's ``reproject_and_coadd`` with ``reproject_interp``)
    use_gpu : run the ``fast`` engine on CuPy; raises :class:`GpuBackendError` when that fails
    mappings : precomputed :class:`PixelMapping` per image (saves recomputing them per channel)
    channel : channel index, for logs and fault injection
    gpu_xp : array module replacing CuPy on the GPU path (NumPy in tests without a GPU)

    Returns
    -------
    mosaic : float32 ``shape_out``, NaN where coverage == 0
    coverage : float32 ``shape_out``, the sum of weights (> 1 where inputs overlap)
    """
    n = len(data_list)
    weights_list = list(weights_list) if weights_list is not None else [None] * n
    if engine == "reproject":
        return _coadd_with_reproject(data_list, wcs_list, wcs_out, shape_out, weights_list)
    if engine != "fast":
        raise ValueError(f"engine = {engine!r} is not allowed: expected 'fast' or 'reproject'")
    if mappings is None:
        mappings = [compute_pixel_mapping(w, d.shape, wcs_out, shape_out)
                    for d, w in zip(data_list, wcs_list)]
    if use_gpu:
        return gpu_reproject_and_coadd_impl(data_list, wcs_list, shape_out, wcs_out=wcs_out,
                                            weights_list=weights_list, mappings=mappings,
                                            channel=channel, xp=gpu_xp)
    rows = _rows_per_chunk(shape_out[1], 256 * 2**20)
    mosaic, coverage = _coadd_fast(data_list, weights_list, mappings, shape_out, np,
                                   scipy.ndimage, rows)
    return mosaic, coverage


def _coadd_with_reproject(data_list, wcs_list, wcs_out, shape_out, weights_list):
    """Reference engine: astropy reproject's ``reproject_and_coadd`` with ``reproject_interp``."""
    from reproject import reproject_interp
    from reproject.mosaicking import reproject_and_coadd as rp_coadd

    inputs = [(np.asarray(d, np.float64), w) for d, w in zip(data_list, wcs_list)]
    weights = None
    if any(w is not None for w in weights_list):
        weights = [np.ones(d.shape) if w is None else np.asarray(w, np.float64)
                   for d, w in zip(data_list, weights_list)]
    mosaic, footprint = rp_coadd(inputs, wcs_out, shape_out=tuple(shape_out), input_weights=weights,
                                 reproject_function=reproject_interp, combine_function="mean")
    footprint = np.nan_to_num(footprint, nan=0.0, posinf=0.0, neginf=0.0)
    mosaic = np.where(footprint > 0, mosaic, np.nan)
    return mosaic.astype(np.float32), footprint.astype(np.float32)
