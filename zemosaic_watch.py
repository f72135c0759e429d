"""Live mode: a run kept open on a folder the telescope is writing into (``--watch``, Live).

:func:`watch` polls the input folder. A frame counts once it has settled (the same size and
modification time at two polls in a row: the telescope has finished writing it); when
``watch_batch_frames`` settled frames are new, or ``watch_batch_seconds`` after the first of
them, the pipeline runs again on the whole folder. Each run is an ordinary
:func:`zemosaic_worker.run_mosaic` with ``resume = auto``: the solve cache gives the frames
solved before their WCS, the tile manifest gives back every tile whose frames did not change,
so only the new frames are solved or matched and only their tiles are stacked again; the
mosaic, preview and report are rewritten atomically, the last good one staying until then.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import zemosaic_worker as zw

logger = logging.getLogger(__name__)

#: Seconds between two looks at the input folder.
POLL_S = 2.0


@dataclass
class WatchState:
    """What live mode has seen of the input folder."""

    sizes: dict[str, tuple[int, float]] = field(default_factory=dict)  # last poll: size, mtime
    done: set[str] = field(default_factory=set)  # settled frames a run has included
    pending_since: float | None = None  # when the oldest settled frame not yet run was seen
    batches: int = 0
    last: zw.RunResult | None = None

    def settled_new(self, config) -> list[str]:
        """Poll the folder; return the frames that have settled and no run has included yet."""
        now = {}
        for path in zw.list_input_files(config.input_folder, config.output_folder):
            try:
                st = os.stat(path)
            except OSError:  # removed between the listing and the look
                continue
            now[path] = (st.st_size, st.st_mtime)
        settled = [p for p, seen in now.items() if self.sizes.get(p) == seen and p not in self.done]
        self.sizes = now
        return settled


def batch_due(state: WatchState, new: list[str], config, clock: float) -> bool:
    """Return True when the settled new frames make a batch: the frames already there when the
    watch started, then enough new ones, or the first of them waited long enough."""
    if not new:
        state.pending_since = None
        return False
    if state.pending_since is None:
        state.pending_since = clock
    return not state.done or len(new) >= config.watch_batch_frames \
        or clock - state.pending_since >= config.watch_batch_seconds


def watch(config, progress=None, cancel: threading.Event | None = None, on_batch=None, stop=None,
          poll_s: float = POLL_S) -> WatchState:
    """Make the mosaic of ``config.input_folder`` again after each batch of new frames.

    Runs until ``cancel`` is set (a run in progress stops as a cancelled run does; the mosaic of
    the batch before stays) or ``stop()`` returns True between polls; returns what was seen and
    made. ``on_batch(result)`` is called after each mosaic. A batch whose run cannot make a
    mosaic (:class:`zemosaic_worker.PipelineError`: no usable frame yet) is logged and the
    watch goes on; the frames come back in the next batch.
    """
    config = config.replace(resume="auto")
    state = WatchState()
    logger.info("Live: watching %s (a mosaic every %d new frame(s) or %.0f s after the first)",
                config.input_folder, config.watch_batch_frames, config.watch_batch_seconds)
    while not (cancel is not None and cancel.is_set()) and not (stop is not None and stop()):
        new = state.settled_new(config)
        if batch_due(state, new, config, time.monotonic()):
            _run_batch(state, new, config, progress, cancel, on_batch)
        if cancel is not None:
            cancel.wait(poll_s)
        else:
            time.sleep(poll_s)
    if cancel is not None and cancel.is_set():
        raise zw.Cancelled("live mode stopped by the user")
    return state


def _run_batch(state: WatchState, new: list[str], config, progress, cancel, on_batch) -> None:
    """Run the pipeline once on the folder; the settled frames ``new`` count as done."""
    t0 = time.perf_counter()
    try:
        result = zw.run_mosaic(config, progress=progress, cancel=cancel)
    except zw.PipelineError as exc:
        logger.warning("Live: no mosaic from the %d frame(s) so far (%s); waiting for more",
                       len(state.done) + len(new), exc)
        state.done.update(new)
        state.pending_since = None
        return
    state.done.update(new)
    state.pending_since, state.batches, state.last = None, state.batches + 1, result
    report = result.report
    logger.info("Live: batch %d, %d new frame(s), %d used in all; %d of %d tile(s) reused; "
                "mosaic rewritten in %.1f s", state.batches, len(new), len(report.frames_used),
                sum(t["reused"] for t in report.tiles), len(report.tiles), time.perf_counter() - t0)
    if on_batch is not None:
        on_batch(result)
