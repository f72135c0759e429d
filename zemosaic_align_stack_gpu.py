"""CuPy backend of master-tile stacking.

The maths lives in :mod:`zemosaic_align_stack` (kernels written against ``xp``); this module only
moves row chunks of the stack to the device and back, sizes the chunks to free VRAM, and turns a
device error (CUDA, out of memory) into :class:`zemosaic_utils.GpuBackendError` so the worker can
stack that tile on the CPU with one WARNING; any other error is a bug and propagates. The array
namespace comes from :func:`zemosaic_utils.get_xp` (tests monkeypatch it to run this exact code
path with NumPy).
"""

from __future__ import annotations

import logging

import numpy as np

import zemosaic_utils as zu
from zemosaic_align_stack import CPU_BLOCK_BYTES, StackParams, rows_for_budget, stack_in_chunks, winsorize_block

logger = logging.getLogger(__name__)

# Fraction of free VRAM one chunk's working set may use: leaves room for CuPy's pool and other work.
_VRAM_FRACTION = 0.5


def _winsorize_chunk(data_gpu, low_high_limits):
    """Return the winsorized copy of a device ``(N, ...)`` chunk.

    NaN-aware quantiles (valid-sample counts) are used only when the chunk holds non-finite values;
    an all-finite chunk takes the plain path with fixed quantile positions.
    """
    xp = zu.get_xp(use_gpu=True)
    has_nonfinite = not bool(xp.all(xp.isfinite(data_gpu)))
    return winsorize_block(data_gpu, low_high_limits, xp, has_nonfinite)[0]


def stack_in_chunks_gpu(stack, gains, offsets, weights, params: StackParams, budget_bytes=None,
                        progress=None, noise_sigmas=None, backgrounds=None, pixel_weights=None):
    """Run :func:`zemosaic_align_stack.stack_in_chunks` on the GPU; same arguments and results.

    Raises :class:`GpuBackendError` when no GPU is usable or the device fails (out of memory
    included, after the chunk size was halved down to 16 rows).
    """
    xp = zu.get_xp(use_gpu=True)
    on_numpy = xp is np
    if budget_bytes is None:
        budget_bytes = CPU_BLOCK_BYTES if on_numpy else int(zu.free_gpu_memory_bytes() * _VRAM_FRACTION)
    to_device = (lambda a: a) if on_numpy else xp.asarray
    to_host = (lambda a: a) if on_numpy else (lambda a: a.get())
    n, _h, w, c = stack.shape
    rows = rows_for_budget(n, w, c, budget_bytes)
    return zu.halving_rows_on_oom(
        lambda r: stack_in_chunks(stack, gains, offsets, weights, params, xp, rows_per_chunk=r,
                                  to_device=to_device, to_host=to_host, progress=progress,
                                  noise_sigmas=noise_sigmas, backgrounds=backgrounds,
                                  pixel_weights=pixel_weights),
        rows, xp, "stacking")
