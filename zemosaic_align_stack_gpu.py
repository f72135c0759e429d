"""CuPy backend of master-tile stacking.

The maths lives in :mod:`zemosaic_align_stack` (kernels written against ``xp``); this module only
moves row chunks of the stack to the device and back, sizes the chunks to free VRAM, and turns any
device error into :class:`zemosaic_utils.GpuBackendError` so the worker can stack that tile on the
CPU with one WARNING. Passing ``xp=numpy`` runs this exact code path on the CPU (tests do).
"""

from __future__ import annotations

import logging

import numpy as np

from zemosaic_align_stack import (CPU_BLOCK_BYTES, StackParams, rows_for_budget, stack_in_chunks,
                                  winsorize_block)
from zemosaic_utils import GpuBackendError, free_gpu_memory_bytes, gpu_available, gpu_unavailable_reason

logger = logging.getLogger(__name__)

# Fraction of free VRAM one chunk's working set may use: leaves room for CuPy's pool and other work.
_VRAM_FRACTION = 0.5


def _cupy():
    """Return the cupy module, or raise GpuBackendError when no usable GPU is present."""
    if not gpu_available():
        raise GpuBackendError(f"GPU not available: {gpu_unavailable_reason()}")
    import cupy

    return cupy


def _winsorize_chunk(data_gpu, low_high_limits, xp=None):
    """Return the winsorized copy of a device ``(N, ...)`` chunk.

    NaN-aware quantiles (valid-sample counts) are used only when the chunk holds non-finite values;
    an all-finite chunk takes the plain path with fixed quantile positions.
    """
    xp = xp or _cupy()
    has_nonfinite = not bool(xp.all(xp.isfinite(data_gpu)))
    return winsorize_block(data_gpu, low_high_limits, xp, has_nonfinite)[0]


def stack_in_chunks_gpu(stack, gains, offsets, weights, params: StackParams, xp=None,
                        budget_bytes=None, progress=None, noise_sigmas=None):
    """Run :func:`zemosaic_align_stack.stack_in_chunks` on the GPU; same arguments and results.

    Raises :class:`GpuBackendError` on any device failure (including out of memory after the
    chunk size was halved down to 16 rows).
    """
    xp = xp or _cupy()
    on_numpy = xp is np
    if budget_bytes is None:
        budget_bytes = CPU_BLOCK_BYTES if on_numpy else int(free_gpu_memory_bytes() * _VRAM_FRACTION)
    to_device = (lambda a: a) if on_numpy else xp.asarray
    to_host = (lambda a: a) if on_numpy else (lambda a: a.get())
    n, _h, w, c = stack.shape
    rows = rows_for_budget(n, w, c, budget_bytes)
    while True:
        try:
            return stack_in_chunks(stack, gains, offsets, weights, params, xp, rows_per_chunk=rows,
                                   to_device=to_device, to_host=to_host, progress=progress,
                                   noise_sigmas=noise_sigmas)
        except Exception as exc:
            if on_numpy:
                raise
            if ("OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc).lower()) and rows > 16:
                rows //= 2
                xp.get_default_memory_pool().free_all_blocks()
                logger.debug("GPU out of memory while stacking; retrying with %d-row chunks", rows)
                continue
            raise GpuBackendError(f"GPU stacking failed: {exc}") from exc
