"""The classic ZeMosaic pipeline: scan, group, master tiles, grid, assembly, write.

``run_mosaic(config, progress=None, cancel=None)`` runs it; ``python -m zemosaic_worker
CONFIG.json`` is the command line. See docs/architecture.md for the phases and outputs.

Each phase takes the run's :class:`Run`: its settings, its :class:`RunReport` (what the run did,
returned to the caller as such and written as ``zemosaic_run.json``), the progress callback
``progress(phase, done, total, message)`` and the cancellation ``threading.Event``, checked between
frames and tiles. Logging uses this module's logger only; the CLI (:mod:`zemosaic_cli`) and the GUI
configure where it goes.
"""

from __future__ import annotations

if __name__ == "__main__":
    # ``python -m zemosaic_worker CONFIG.json``: the command line lives in zemosaic_cli, which
    # imports this module as a library. It starts before this module's own imports, so that
    # Ctrl-C while NumPy and astropy load ends it with one line too (zemosaic_cli.main).
    import sys

    from zemosaic_cli import main

    sys.exit(main())

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits

import zemosaic_align_stack as stk
import zemosaic_astrometry as zastro
import zemosaic_background as zbg
import zemosaic_display as zdisp
import zemosaic_executor as zexec
import zemosaic_fits as zfits
import zemosaic_photometry as zph
import zemosaic_tile_photometry as ztp
import zemosaic_runstate as zrun
import zemosaic_solve as zsolve
from zemosaic_config import ConfigError, MosaicConfig, config_to_dict
from zemosaic_files import write_text_atomic
from zemosaic_executor import Cancelled  # noqa: F401  (part of this module's API)
from zemosaic_master_tile import (CACHE_DIR, STACK_CACHE_DIR, MasterTile, TileTask,  # noqa: F401  (API)
                                  build_master_tile, saturation_card, settings_history, tile_name)
from zemosaic_utils import (GpuBackendError, block_mean, compute_pixel_mapping, feather_ramp, gpu_available,
                            gpu_unavailable_reason, map_threads, optimal_celestial_grid, over_channels,
                            pixels_reached, reproject_and_coadd, unit_vectors)
from zemosaic_version import __version__

logger = logging.getLogger(__name__)

MOSAIC_NAME = "zemosaic_mosaic.fits"
PREVIEW_NAME = "zemosaic_mosaic_preview.png"
REPORT_NAME = "zemosaic_run.json"
COVERAGE_NAME = "zemosaic_mosaic_coverage.fits"
DISPLAY_NAME = "zemosaic_mosaic_display.tif"
LOG_NAME = "zemosaic_run.log"
CHANNEL_NAME = "zemosaic_mosaic_{}.fits"
UINT16_NAME = "zemosaic_mosaic_uint16.fits"
# The outputs every run writes, by report key.
OUTPUT_NAMES = {"mosaic": MOSAIC_NAME, "coverage": COVERAGE_NAME, "preview": PREVIEW_NAME,
                "display": DISPLAY_NAME, "report": REPORT_NAME}
TILES_DIR = "master_tiles"
WCS_CACHE_DIR = "wcs"

PHASES = ("scan", "solve", "group", "master_tiles", "grid", "assembly", "write")

class PipelineError(Exception):
    """A run cannot go on; the message is a one-line reason for the user."""


@dataclass
class FrameRecord:
    """A frame that passed the scan: its header, WCS and sky centre.

    ``wcs`` is None until the frame is plate-solved; ``ra``/``dec`` are then the commanded pointing
    (None when the header has none). ``wcs_source`` says how the WCS was obtained: ``header``,
    ``solved``, ``matched to NAME`` or ``cache``.
    """

    info: zfits.FrameInfo
    ra: float | None
    dec: float | None
    wcs: object = None
    wcs_source: str = ""
    solve_s: float | None = None
    solve_error: str | None = None
    cache_origin: str | None = None
    digest: str | None = None

    @property
    def path(self) -> str:
        return self.info.path

    def content_digest(self) -> str:
        """Return the SHA-256 of the frame's file (read once per run): the WCS cache and the
        tile manifest are keyed by it."""
        if self.digest is None:
            self.digest = zastro.file_sha256(self.path)
        return self.digest

    def set_wcs(self, wcs, source: str, solve_s: float | None = None) -> None:
        """Give the frame its WCS; its centre moves to where the WCS puts it."""
        h, w = self.info.shape_hw
        ra, dec = wcs.pixel_to_world_values((w - 1) / 2.0, (h - 1) / 2.0)
        self.wcs, self.wcs_source, self.solve_s = wcs, source, solve_s
        self.ra, self.dec = float(ra), float(dec)

    def pixel_scale_deg(self) -> float | None:
        """Return the pixel scale from the WCS, else from the header's optics, else None."""
        if self.wcs is not None:
            return float(np.sqrt(abs(np.linalg.det(self.wcs.pixel_scale_matrix))))
        scale = zastro.hints_from_header(self.info.header).scale_arcsec
        return None if scale is None else scale / 3600.0


@dataclass
class RunReport:
    """What a run did: frames used and skipped (with reasons), how each frame got its WCS, the
    tiles and their corrections, backends, timings and outputs; saved as ``zemosaic_run.json``."""

    config: dict
    frames_used: list = field(default_factory=list)
    frames_skipped: list = field(default_factory=list)
    frame_wcs: dict = field(default_factory=dict)
    tiles: list = field(default_factory=list)
    backends: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    mosaic_shape: list = field(default_factory=list)
    white_balance: dict = field(default_factory=dict)
    tile_background_model: dict = field(default_factory=dict)
    background_extraction: dict = field(default_factory=dict)
    version: str = __version__

    def skip(self, path: str, reason: str, quiet: bool = False) -> None:
        """Record a skipped frame and say so once at WARNING (at DEBUG when ``quiet``)."""
        logger.log(logging.DEBUG if quiet else logging.WARNING, "Skipping %s: %s",
                   os.path.basename(path), reason)
        self.frames_skipped.append({"path": path, "reason": reason})
        if path in self.frames_used:
            self.frames_used.remove(path)

    def tile_entry(self, index: int) -> dict:
        """Return the report entry of master tile ``index``, a new one when it has none yet."""
        for entry in self.tiles:
            if entry.get("index") == index:
                return entry
        self.tiles.append({"index": index})
        return self.tiles[-1]

    def used_frame_wcs(self) -> list[dict]:
        """Return how each used frame got its WCS: ``[{"path", "wcs", "solve_s", ...}]``."""
        return [dict(path=p, **self.frame_wcs[p]) for p in self.frames_used if p in self.frame_wcs]

    def to_dict(self) -> dict:
        """Return the report as a JSON-able dict (written as ``zemosaic_run.json``)."""
        return {
            "version": self.version,
            "config": self.config,
            "frames_used": self.frames_used,
            "frames_skipped": self.frames_skipped,
            "frame_wcs": self.used_frame_wcs(),
            "tiles": self.tiles,
            "mosaic_shape": self.mosaic_shape,
            "backends": self.backends,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "outputs": self.outputs,
            "white_balance": self.white_balance,
            "tile_background_model": self.tile_background_model,
            "background_extraction": self.background_extraction,
        }


class Run:
    """One run's state, handed to every phase: settings, report, progress and cancellation.

    ``progress(phase, done, total, message)`` is the caller's callback (None: nobody listens);
    ``cancel`` a :class:`threading.Event` that stops the run at the next frame or tile.
    """

    def __init__(self, config: MosaicConfig, report: RunReport | None = None, progress=None,
                 cancel: threading.Event | None = None):
        self.config = config
        self.report = report if report is not None else RunReport(config=config_to_dict(config))
        self.progress, self.cancel = progress, cancel

    def advance(self, phase: str, done: int, total: int, message: str = "") -> None:
        """Tell the progress callback how far ``phase`` is."""
        if self.progress is not None:
            self.progress(phase, done, total, message)

    def check_cancel(self) -> None:
        """Raise :class:`Cancelled` when the user asked the run to stop."""
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled by user")

    def timed(self, phase: str, fn, *args):
        """Return ``fn(*args)``, its duration recorded as the phase's timing."""
        self.advance(phase, 0, 1, "starting")
        t0 = time.perf_counter()
        result = fn(*args)
        self.report.timings_s[phase] = time.perf_counter() - t0
        return result


# --------------------------------------------------------------------------------------------------
# Phase 1: scan
# --------------------------------------------------------------------------------------------------


def _is_inside(path: str, folder: str) -> bool:
    """Return True when ``path`` is ``folder`` or lies under it."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def list_input_files(input_folder: str, output_folder: str) -> list[str]:
    """Return the sorted FITS files (``*.fit*``, recursive) of the input folder.

    The output folder is left out when it lies inside the input folder, and so are hidden files
    (temporary files of an atomic write start with a dot).
    """
    # When the output folder is the input folder, only its own products folder is left out;
    # the user's subfolders of frames are still scanned.
    own = os.path.join(output_folder, TILES_DIR) if _is_inside(input_folder, output_folder) \
        else output_folder
    found = []
    for root, dirs, files in os.walk(input_folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not _is_inside(os.path.join(root, d), own))
        for name in files:
            if name.startswith(".") or ".fit" not in name.lower():
                continue
            if name.lower().rsplit(".", 1)[-1] in ("fit", "fits", "fts"):
                found.append(os.path.join(root, name))
    return sorted(found)


def scan_frames(run: Run) -> list[FrameRecord]:
    """Phase 1: read every candidate file's header and WCS; bad files are skipped with a reason."""
    config, report = run.config, run.report
    paths = list_input_files(config.input_folder, config.output_folder)
    records = []
    for i, path in enumerate(paths):
        run.check_cancel()
        try:
            info = zfits.read_frame_info(path, require_wcs=False)
            if "ZMVERS" in info.header:
                raise zfits.FrameError("a ZeMosaic output (master tile or mosaic), not a raw frame")
        except zfits.FrameError as exc:
            report.skip(path, str(exc))
        else:
            records.append(frame_record(info, config.force_resolve_existing_wcs))
            report.frames_used.append(path)
        run.advance("scan", i + 1, len(paths), os.path.basename(path))
    records = _skip_odd_geometry(records, report)
    logger.info("Scan: %d usable frame(s), %d skipped, %d to plate-solve", len(records),
                len(report.frames_skipped), sum(r.wcs is None for r in records))
    return records


def _skip_odd_geometry(records: list[FrameRecord], report: RunReport) -> list[FrameRecord]:
    """Return the frames of the most common size and channel count; skip the others.

    A frame of another size or channel count would size a tile's canvas or become its reference
    (a small mono frame among colour frames dropped its panel's good frames); the frames of one
    session share the sensor, so the majority is the session.
    """
    if len(records) < 2:
        return records
    counts = Counter((r.info.shape_hw, r.info.n_channels) for r in records)
    (shape, n_ch), _ = counts.most_common(1)[0]
    kept = []
    for r in records:
        (h, w), channels = r.info.shape_hw, r.info.n_channels
        if (h, w) != shape:
            report.skip(r.path, f"frame size {w}x{h} px differs from the other frames' "
                                f"{shape[1]}x{shape[0]} px")
        elif channels != n_ch:
            report.skip(r.path, f"{channels} channel(s) where the other frames have {n_ch}")
        else:
            kept.append(r)
    return kept


def frame_record(info: zfits.FrameInfo, force_resolve: bool) -> FrameRecord:
    """Return the record of a scanned frame: with its header WCS, or its pointing to solve from."""
    hints = zastro.hints_from_header(info.header)
    record = FrameRecord(info, hints.ra_deg, hints.dec_deg)
    if info.wcs is not None and not force_resolve:
        record.set_wcs(info.wcs, "header")
    return record


def workers_lost(what: str, exc: zexec.WorkersLost) -> PipelineError:
    """Return the error that stops a run whose ``what`` ("tile", "star detection") workers died."""
    return PipelineError(f"the {what} worker processes stopped ({exc}): one was killed (out of memory?) "
                         "or could not start. A script that calls run_mosaic must do it under "
                         "'if __name__ == \"__main__\":' (worker processes import the script); "
                         "num_processing_workers = 1 runs everything in this process")


def solve_frames(run: Run, records: list[FrameRecord]) -> list[FrameRecord]:
    """Phase 1b: give every frame without a usable WCS one (:mod:`zemosaic_solve`); returns the
    frames that have one. Frames are grouped by pointing with the grouping rule of phase 2."""
    threshold = automatic_panel_threshold(records)
    try:
        return zsolve.solve_frames(run, records, wcs_cache_folder(run.config),
                                   lambda placed: group_by_position(placed, threshold))
    except zexec.WorkersLost as exc:
        raise workers_lost("star detection", exc) from exc


def wcs_cache_folder(config) -> str:
    """Return the folder of the plate-solution cache (kept from run to run)."""
    return os.path.join(config.output_folder, CACHE_DIR, WCS_CACHE_DIR)


# --------------------------------------------------------------------------------------------------
# Phase 2: grouping
# --------------------------------------------------------------------------------------------------

# A frame whose pixel scale differs from the others' median by more than this is skipped.
_SCALE_TOLERANCE = 0.10


def leave_out_misfits(run: Run, records: list[FrameRecord]) -> list[FrameRecord]:
    """Return the frames fit to size a tile: the others are skipped with their reason.

    Runs once every frame has its WCS and before anything is sized: a frame with another pixel
    scale, or one that overlaps no other frame (a wrong plate solution or pointing, often
    degrees away), would otherwise stretch a tile's canvas or the mosaic grid over empty sky.
    """
    if len(records) < 2:
        return records
    report = run.report
    scales = np.array([r.pixel_scale_deg() for r in records])
    median = float(np.median(scales))
    kept = []
    for r, scale in zip(records, scales):
        if abs(scale / median - 1.0) > _SCALE_TOLERANCE:
            report.skip(r.path, f"pixel scale {scale * 3600:.2f}\"/px differs from the other "
                                f"frames' {median * 3600:.2f}\"/px")
        else:
            kept.append(r)
    return _leave_out_isolated(kept, report) if len(kept) >= 2 else kept


def _leave_out_isolated(records: list[FrameRecord], report: RunReport) -> list[FrameRecord]:
    """Skip the frames that overlap no other frame; returns the rest."""
    from scipy.spatial import cKDTree

    vec = unit_vectors([r.ra for r in records], [r.dec for r in records])
    chord, _ = cKDTree(vec).query(vec, k=2)
    nearest = np.degrees(2.0 * np.arcsin(np.minimum(chord[:, 1] / 2.0, 1.0)))
    kept = []
    for r, sep in zip(records, nearest):
        # Two fields of the same size can only overlap when their centres are closer than
        # their diagonal, whatever their rotation.
        diagonal = float(np.hypot(*r.info.shape_hw)) * r.pixel_scale_deg()
        if sep >= diagonal:
            report.skip(r.path, f"overlaps no other frame: {sep:.2f} deg from the nearest one, "
                                f"a field is {diagonal:.2f} deg across (wrong WCS or pointing?)")
        else:
            kept.append(r)
    return kept


def automatic_panel_threshold(records: list[FrameRecord]) -> float:
    """Return a grouping threshold (degrees): a quarter of the median short side of the field.

    Dithers move a frame by a few per cent of its field; mosaic panels are typically 70-90 % of a
    field apart, so a quarter of the short side separates them with margin on both sides.
    """
    short_sides = [min(r.info.shape_hw) * r.pixel_scale_deg() for r in records
                   if r.pixel_scale_deg() is not None]
    # Without a WCS or optics in any header: a Seestar's field (0.72 deg short side).
    return 0.25 * float(np.median(short_sides)) if short_sides else 0.18


def group_by_position(records: list[FrameRecord], threshold_deg: float) -> list[list[int]]:
    """Return groups of record indices: connected components of centres closer than the threshold.

    Groups are ordered by their first frame; frames inside a group keep the scan (time) order.
    """
    n = len(records)
    vec = unit_vectors([r.ra for r in records], [r.dec for r in records])
    cos_thr = np.cos(np.radians(threshold_deg))
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        close = np.nonzero(vec[i + 1:] @ vec[i] >= cos_thr)[0] + i + 1
        for j in close:
            parent[find(int(j))] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def split_group(group: list[int], max_per_tile: int) -> list[list[int]]:
    """Return a group split into consecutive chunks of at most ``max_per_tile`` (0 = no cap)."""
    if max_per_tile <= 0 or len(group) <= max_per_tile:
        return [group]
    return [group[i:i + max_per_tile] for i in range(0, len(group), max_per_tile)]


def group_frames(run: Run, records: list[FrameRecord]) -> list[list[int]]:
    """Phase 2: panels by sky position, then the ``max_raw_per_master_tile`` cap."""
    config = run.config
    threshold = config.cluster_panel_threshold or automatic_panel_threshold(records)
    panels = group_by_position(records, threshold)
    groups = [chunk for g in panels for chunk in split_group(g, config.max_raw_per_master_tile)]
    logger.info("Grouping: %d panel(s) -> %d master tile(s) (threshold %.3f deg)",
                len(panels), len(groups), threshold)
    run.advance("group", 1, 1, f"{len(groups)} group(s)")
    return groups


# --------------------------------------------------------------------------------------------------
# Phase 3: master tiles
# --------------------------------------------------------------------------------------------------


def _tile_key(members, config) -> str:
    """Return the manifest key of a group's tile: its frames' contents and WCSs, the settings."""
    wcs_keys = [zrun.wcs_key(r.wcs, r.info.shape_hw) for r in members]
    return zrun.tile_key([r.content_digest() for r in members], wcs_keys, config, __version__)


def _reuse_tile(index, entry, tiles_dir, report) -> MasterTile:
    """Return a tile a previous run finished, read back from its file (its skips replayed)."""
    path = os.path.join(tiles_dir, tile_name(index))
    image, wcs, coverage, _ = zfits.read_image_fits(path)
    for skipped in entry.get("skipped", []):
        report.skip(skipped["path"], skipped["reason"])
    logger.info("tile %03d: reused from an earlier run (%d frame(s))", index, len(entry["frames"]))
    return MasterTile(index, image, coverage, wcs, path, list(entry["frames"]), entry["reference"],
                      entry["backend"], entry.get("frame_photometry", []), entry.get("reference_reason", ""),
                      zfits.read_saturated_mask(path))


def _finished_tile(task: TileTask, outcome, report) -> MasterTile | None:
    """Return the tile of a finished task, or None; its skipped frames go into the report.

    A task that failed (an error in a worker, a worker that died) drops its tile: every frame of
    the group is skipped with the reason, and the run goes on with the other tiles.
    """
    if outcome.error is not None:
        logger.warning("%s failed (%s); its frames are skipped", task.label, outcome.error)
        for r in task.records:
            report.skip(r.path, f"{task.label} failed: {outcome.error}", quiet=True)
        return None
    result = outcome.result
    for skipped in result.skipped:
        report.skip(skipped["path"], skipped["reason"])
    if result.tile is None:
        logger.warning("%s: no frame could be loaded; tile dropped", task.label)
        return None
    return dataclasses.replace(result.tile, wcs=zfits.wcs_from_text(result.tile.wcs))


def _run_tile_tasks(run, todo, manifest, n_groups: int):
    """Run the tile tasks ``[(task, manifest key)]`` on the configured executor; returns the tiles.

    Each tile is recorded in the manifest as soon as it is written, whatever order they finish in.
    """
    config, report = run.config, run.report
    try:
        executor = zexec.make_executor(config.dask_scheduler, config.num_processing_workers, len(todo))
    except (OSError, TimeoutError) as exc:
        raise PipelineError(f"cannot start the tile workers (dask_scheduler = "
                            f"{config.dask_scheduler!r}): {exc}") from exc
    report.backends["tile_executor"] = executor.name
    logger.info("Master tiles: %d to build on %s (%d worker(s))", len(todo), executor.name,
                executor.workers)
    # Cores the tile workers leave idle (fewer tiles than cores) align and stack in threads.
    threads = 1 if config.dask_scheduler else \
        max(1, zexec.resolve_workers(config.num_processing_workers) // executor.workers)
    for task, _ in todo:
        task.ram_share, task.threads = executor.memory_share, threads
    flag = zexec.CancelFlag(os.path.join(todo[0][0].cache_dir, ".cancel"))
    tiles = []
    try:
        for k, outcome in enumerate(executor.run(build_master_tile, [t for t, _ in todo], run, flag)):
            task, key = todo[outcome.index]
            tile = _finished_tile(task, outcome, report)
            if tile is not None:
                manifest.record(tile_name(task.index), key, frames=tile.frames,
                                reference=tile.reference, backend=tile.backend,
                                skipped=outcome.result.skipped,
                                frame_photometry=tile.frame_photometry,
                                reference_reason=tile.reference_reason)
                tiles.append(tile)
            run.advance("master_tiles", n_groups - len(todo) + k + 1, n_groups, f"{task.label} done")
    except zexec.WorkersLost as exc:
        raise workers_lost("tile", exc) from exc
    except zexec.NoDiskSpace as exc:
        raise PipelineError(str(exc)) from exc
    finally:
        executor.close()
    return tiles


def build_master_tiles(run, records, groups) -> list[MasterTile]:
    """Phase 3: one master tile per group; tiles an interrupted run finished are reused.

    Tile ``k`` is group ``k``'s. Tiles to build run on the executor the configuration names
    (:mod:`zemosaic_executor`); the result is the same bit for bit whichever runs them. Every
    tile is recorded in the manifest as soon as it is written; with ``resume = auto`` a tile whose
    frames, WCSs and settings match its manifest entry is read back instead of stacked again.
    Tile files of an earlier run that this run does not make are removed.
    """
    config, report = run.config, run.report
    tiles_dir = os.path.join(config.output_folder, TILES_DIR)
    os.makedirs(tiles_dir, exist_ok=True)
    manifest = zrun.TileManifest(tiles_dir)
    use_gpu = config.use_gpu_phase5 and gpu_available()
    finished, todo, reused = [], [], set()
    for gi, group in enumerate(groups):
        run.check_cancel()
        members = [records[i] for i in group]
        key = _tile_key(members, config)
        entry = manifest.reusable(tile_name(gi), key) if config.resume == "auto" else None
        if entry is None:
            todo.append((TileTask(gi, members, config, tiles_dir, use_gpu), key))
            continue
        finished.append(_reuse_tile(gi, entry, tiles_dir, report))
        reused.add(gi)
        run.advance("master_tiles", len(finished), len(groups), f"tile {gi:03d} reused")
    if todo:
        finished += _run_tile_tasks(run, todo, manifest, len(groups))
    tiles = sorted(finished, key=lambda t: t.index)
    for t in tiles:
        report.tiles.append({"index": t.index, "file": os.path.relpath(t.path, config.output_folder),
                             "frames": len(t.frames), "reference": t.reference,
                             "reference_reason": t.reference_reason,
                             "backend": t.backend, "reused": t.index in reused,
                             "frame_photometry": t.frame_photometry})
    manifest.keep_only(os.path.basename(t.path) for t in tiles)
    report.backends["master_tiles"] = "gpu" if any(t.backend == "gpu" for t in tiles) else "cpu"
    return tiles


# --------------------------------------------------------------------------------------------------
# Phase 4: grid
# --------------------------------------------------------------------------------------------------


def mosaic_grid(tiles: list[MasterTile], final_grid: str = "north_up"):
    """Phase 4: the optimal TAN grid over all tiles; returns ``(wcs, (H, W))``.

    ``final_grid``: ``"north_up"`` (north up, east left: the FITS looks like the preview in any
    viewer) or ``"rotated"`` (turned to the smallest canvas around the tiles).
    """
    return optimal_celestial_grid([(t.image.shape[:2], t.wcs) for t in tiles],
                                  auto_rotate=final_grid == "rotated")


# --------------------------------------------------------------------------------------------------
# Phase 5: assembly
# --------------------------------------------------------------------------------------------------


def downsampled_wcs(wcs, factor: int):
    """Return the WCS of the grid whose pixel k is the mean of pixels ``k*f .. k*f+f-1``.

    Block centres sit at ``k*f + (f-1)/2`` (0-based), hence ``crpix' = (crpix - 0.5)/f + 0.5``.
    """
    small = wcs.deepcopy()
    if small.wcs.has_cd():
        small.wcs.cd = small.wcs.cd * factor
    else:
        small.wcs.cdelt = small.wcs.cdelt * factor
    small.wcs.crpix = (np.asarray(wcs.wcs.crpix) - 0.5) / factor + 0.5
    small.wcs.set()
    return small


def low_res_tiles(tiles: list[MasterTile], wcs_out, shape_out, max_side: int = 800) -> ztp.LowResTiles:
    """Return the tiles on a grid of ``factor`` x ``factor`` output-pixel blocks (long side <= ``max_side``).

    Matching statistics need overlaps, not resolution: the coarse grid makes them cheap. Each tile
    is block-averaged before it is resampled, so a coarse pixel holds the light of its whole block
    (a star's flux is kept) instead of one sample that may miss the star.
    """
    factor = max(1, int(np.ceil(max(shape_out) / max_side)))
    small_wcs = downsampled_wcs(wcs_out, factor)
    small_shape = (int(np.ceil(shape_out[0] / factor)), int(np.ceil(shape_out[1] / factor)))
    images, weights = [], []
    for t in tiles:
        image, coverage, wcs = t.image, t.coverage, t.wcs
        if factor > 1:
            image = block_mean(t.image, factor)
            coverage = block_mean(t.coverage[..., None], factor)[..., 0]
            wcs = downsampled_wcs(t.wcs, factor)
        image, weight = reproject_and_coadd([image], [wcs], small_wcs, small_shape,
                                            [np.nan_to_num(coverage)])
        images.append(image)
        weights.append(over_channels(np.minimum, weight))
    return ztp.LowResTiles(images, weights, factor)


@dataclass
class AssemblyInputs:
    """What both assembly passes share: tiles, output grid, pixel mappings, feathers and backend choice.

    ``match_wcs``/``match_shape``: the grid the tiles' overlaps are measured on and their
    background models live on (:func:`assemble_mosaic`); the output grid when None.
    """

    tiles: list
    wcs_out: object
    shape_out: tuple
    mappings: list
    engine: str
    use_gpu: bool
    feathers: list | None = None
    match_wcs: object = None
    match_shape: tuple | None = None

    def __post_init__(self):
        if self.match_wcs is None:
            self.match_wcs, self.match_shape = self.wcs_out, self.shape_out

    def coadd(self, gains, backgrounds: zbg.BackgroundModels, label):
        """Co-add ``gain * tile - background`` (per tile, per channel); returns ``(mosaic, coverage (H,W,C), gpu_all)``.

        ``backgrounds`` are on the overlaps' grid (``match_wcs``); each is refitted on its tile's
        own pixels.
        """
        def rows(v, k):  # whole rows: a (C,) operand makes NumPy loop over runs of C values
            return stk.frame_rows(np.asarray(v)[None], self.tiles[k].image.shape[1], np.float32, np)[0]

        def corrected(k):
            image = self.tiles[k].image * rows(gains[k], k)
            if np.any(backgrounds.coefficients[k]):
                image -= tile_background(self.tiles[k], backgrounds, k, self.match_wcs)
            return image

        images = map_threads(corrected, range(len(self.tiles)))
        return coadd_channels(self, images, label)


def tile_background(tile, backgrounds: zbg.BackgroundModels, k: int, wcs_out, points: int = 12) -> np.ndarray:
    """Return tile ``k``'s background model (on the output grid) on the tile's own pixels, ``(H, W, C)``.

    Refitted from a grid of ``points`` x ``points`` tile pixels mapped onto the output grid through
    the WCSs: a polynomial stays one of the same order under the near-affine map between them.
    """
    h, w = tile.image.shape[:2]
    y_t, x_t = (a.ravel() for a in np.meshgrid(np.linspace(0, h - 1, points), np.linspace(0, w - 1, points),
                                                indexing="ij"))
    x_o, y_o = wcs_out.world_to_pixel_values(*tile.wcs.pixel_to_world_values(x_t, y_t))
    return backgrounds.in_frame(k, (h, w), y_o, x_o, y_t, x_t).image(0, (h, w))


def tile_feathers(tiles, low: ztp.LowResTiles, width_px: float) -> list | None:
    """Return each tile's :func:`zemosaic_utils.feather_ramp`, over ``width_px`` or its narrowest overlap if less.

    The ramp starts where the tile's pixels are stacked from enough frames to be trusted (see
    :func:`coadd_channels`); a tile that overlaps nothing is not feathered. None: no feathering.
    """
    if width_px <= 0 or low is None:
        return None
    widths = np.minimum(ztp.overlap_widths(low), width_px)
    logger.debug("Feather widths per tile (px): %s", np.round(widths, 1).tolist())
    return map_threads(lambda k: None if not np.isfinite(widths[k]) else
                       feather_ramp(tiles[k].coverage, widths[k], stk.MIN_REJECTION_FRAMES - 0.5),
                       range(len(tiles)))


def coadd_channels(inputs: AssemblyInputs, tile_images, label="Assembly"):
    """Co-add ``(H, W, C)`` images, one per tile of ``inputs``, with one backend for all channels.

    Returns ``(mosaic (H, W, C), coverage (H, W, C), gpu_all)``. With the GPU asked for, every
    channel runs on the GPU (one pass: the channels share coordinates and gathers); if that fails,
    one WARNING and every channel is re-run on the CPU, so a result never mixes backends across
    channels.
    """
    def coadd(use_gpu):
        # A tile's pixels stacked from fewer frames than rejection needs (its dithered edges)
        # yield to a tile that rejected: a trail there survived its own stack.
        return reproject_and_coadd(tile_images, [t.wcs for t in inputs.tiles], inputs.wcs_out,
                                   inputs.shape_out, [t.coverage for t in inputs.tiles],
                                   engine=inputs.engine, use_gpu=use_gpu, mappings=inputs.mappings,
                                   trusted_weight=stk.MIN_REJECTION_FRAMES, feathers=inputs.feathers)

    gpu_all = bool(inputs.use_gpu and inputs.engine == "fast")
    if gpu_all:
        try:
            mosaic, coverage = coadd(True)
        except GpuBackendError as exc:
            logger.warning("%s GPU reprojection failed on one or more channels; rerunning all "
                           "channels on CPU to avoid mixed backend (%s)", label, exc)
            gpu_all = False
    if not gpu_all:
        mosaic, coverage = coadd(False)
    for c in range(coverage.shape[-1] if logger.isEnabledFor(logging.DEBUG) else 0):
        logger.debug("%s channel %d gpu=%s cov_stats(min,max)=(%.3g,%.3g)", label, c, gpu_all,
                     float(coverage[..., c].min()), float(coverage[..., c].max()))
    return mosaic, coverage, gpu_all


def run_second_pass_coverage_renorm(inputs: AssemblyInputs, low: ztp.LowResTiles,
                                    match: ztp.TileMatch, config):
    """Two-Pass: one gain per tile (all channels) from the pass-1 tiles, new offsets, a second co-add.

    Returns ``(mosaic (H,W,C), coverage (H,W), gains, gpu_all)``. The gains multiply the pass-1
    gains; they stay 1 where the pass-1 tiles already agree (see
    :func:`zemosaic_tile_photometry.two_pass_gains`). Backends never mix across channels (see
    :func:`coadd_channels`); one summary line names the backend used.
    """
    gains = ztp.two_pass_gains(low, match, config.two_pass_cov_sigma_px, config.two_pass_cov_gain_clip,
                               overlap_images(inputs.tiles, low, inputs.match_wcs, inputs.match_shape))
    logger.info("[TwoPass] tile gains: %s", ", ".join(f"{g:.4f}" for g in gains))
    total = match.gains * gains[:, None]
    backgrounds = ztp.background_models(low, total, config.background_model_order) if config.match_background \
        else match.backgrounds.scaled(gains)
    mosaic, coverage, gpu_all = inputs.coadd(total, backgrounds, "[TwoPass]")
    logger.info("[TwoPass] Two-pass reprojection backend: gpu_all=%s", gpu_all)
    return mosaic, over_channels(np.minimum, coverage), gains, gpu_all


def overlap_images(tiles: list[MasterTile], low: ztp.LowResTiles, wcs_out, shape_out):
    """Return a function of ``(i, j, coarse overlap mask)`` giving tiles i and j at full resolution.

    Both are resampled alone onto the box of the output grid that holds their overlap (NaN where a
    tile has no data), returned with the box's first output pixel ``(y0, x0)``, for
    :func:`zemosaic_tile_photometry.block_pair_slopes` (pass 1) and
    :func:`zemosaic_tile_photometry.overlap_cell_ratios` (Two-Pass).
    """
    def images(i, j, both):
        rows, cols = np.nonzero(both)
        f = low.factor
        y0, y1 = rows.min() * f, min((rows.max() + 1) * f, shape_out[0])
        x0, x1 = cols.min() * f, min((cols.max() + 1) * f, shape_out[1])
        box_wcs = wcs_out.slice((slice(y0, y1), slice(x0, x1)))
        return (y0, x0), tuple(reproject_and_coadd([tiles[k].image], [tiles[k].wcs], box_wcs, (y1 - y0, x1 - x0))[0]
                               for k in (i, j))
    return images


def _tile_match(tiles, low, config, wcs_out, shape_out) -> ztp.TileMatch:
    """Pass-1 photometric corrections: gains and background models solved from the overlaps, or none."""
    n, n_ch = len(tiles), tiles[0].image.shape[2]
    if low is None:
        return ztp.TileMatch.identity(n, n_ch, shape_out)
    return ztp.match_tiles(low, config.intertile_photometric_match, config.match_background,
                           overlap_images(tiles, low, wcs_out, shape_out), config.background_model_order)


def _record_match(report, tiles, match: ztp.TileMatch, wcs_out, shape_out) -> None:
    """Write each tile's pass-1 gains and background into its entry of the run report.

    ``offset_rgb`` is the background subtracted at the tile's centre; ``background`` its model's
    coefficients on the grid the overlaps were measured on, ``wcs_out`` (the report's
    ``tile_background_model`` says how to read them, that grid's WCS and shape included).
    """
    report.tile_background_model = {**match.backgrounds.to_dict(),
                                    "grid_wcs": zfits.wcs_to_cd_header(wcs_out).tostring(),
                                    "grid_shape": [int(v) for v in shape_out]}
    for k, (tile, gains, colour) in enumerate(zip(tiles, match.gains, match.colour_applied)):
        h, w = tile.image.shape[:2]
        x, y = wcs_out.world_to_pixel_values(*tile.wcs.pixel_to_world_values((w - 1) / 2.0, (h - 1) / 2.0))
        entry = report.tile_entry(tile.index)
        entry["gain_rgb"] = [round(float(g), 5) for g in gains]
        entry["offset_rgb"] = [round(float(o), 3) for o in match.backgrounds.values(k, float(y), float(x))]
        entry["background"] = np.round(match.backgrounds.coefficients[k], 4).tolist()
        entry["gain_per_channel"] = bool(colour)


def assemble_mosaic(run, tiles, wcs_out, shape_out):
    """Phase 5: tile gains and offsets from the overlaps, the co-add of every channel, optionally Two-Pass.

    Returns ``(mosaic (H, W, C), coverage (H, W))``; each tile's corrections go into its entry
    of the run report.
    """
    config, report = run.config, run.report
    n = len(tiles)
    need_low = config.match_background or config.intertile_photometric_match \
        or config.two_pass_coverage_renorm
    # The overlaps are measured on the grid turned to the tiles (the smallest canvas), whatever
    # the output's orientation: its blocks follow the tiles' edges, so the gains and backgrounds
    # do not depend on how the mosaic is turned for viewing.
    match_wcs, match_shape = (wcs_out, shape_out) if config.final_grid == "rotated" \
        else mosaic_grid(tiles, "rotated")
    low = low_res_tiles(tiles, match_wcs, match_shape) if need_low and n > 1 else None
    match = _tile_match(tiles, low, config, match_wcs, match_shape)
    _record_match(report, tiles, match, match_wcs, match_shape)
    run.check_cancel()
    mappings = []
    for k, t in enumerate(tiles):
        mappings.append(compute_pixel_mapping(t.wcs, t.image.shape[:2], wcs_out, shape_out)
                        if config.assembly_engine == "fast" else None)
        run.advance("assembly", k + 1, n + 2, "pixel mapping")
    use_gpu = config.use_gpu_phase5
    if use_gpu and not gpu_available():
        logger.warning("GPU asked for assembly but not usable (%s); using CPU", gpu_unavailable_reason())
        use_gpu = False
    inputs = AssemblyInputs(tiles, wcs_out, shape_out, mappings, config.assembly_engine, use_gpu,
                            tile_feathers(tiles, low, config.assembly_feather_px), match_wcs, match_shape)
    mosaic, coverage, gpu_all = inputs.coadd(match.gains, match.backgrounds, "Assembly")
    coverage = over_channels(np.minimum, coverage)  # channels share tile weights: their coverages agree
    run.advance("assembly", n + 1, n + 2, "pass 1 done")
    report.backends["assembly"] = "gpu" if gpu_all else "cpu"
    if config.two_pass_coverage_renorm and low is not None:
        run.check_cancel()
        mosaic, coverage, gains, gpu_all = run_second_pass_coverage_renorm(inputs, low, match, config)
        report.backends["two_pass"] = "gpu" if gpu_all else "cpu"
        for tile, gain in zip(tiles, gains):
            report.tile_entry(tile.index)["two_pass_gain"] = round(float(gain), 5)
    if config.final_background_extraction:
        mosaic, extraction = zbg.extract_background(mosaic, config.final_background_order)
        report.background_extraction = extraction.to_dict()
        logger.info("Background extraction: order %d fitted on %.0f %% of the mosaic's blocks",
                    config.final_background_order, 100 * extraction.sky_fraction)
    run.advance("assembly", n + 2, n + 2, "co-add done")
    return mosaic, coverage


# --------------------------------------------------------------------------------------------------
# Phase 6: outputs
# --------------------------------------------------------------------------------------------------


def _write_json_atomic(path: str, payload: dict) -> None:
    """Write JSON through a temporary file and a rename, so the file is whole or absent."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def _white_balance_cards(report, mosaic) -> tuple[list, list]:
    """Measure the display white balance; return ``(FITS cards, gains)`` and fill the report.

    The science FITS stays in the sensor's colours: the gains are recorded, not applied.
    """
    wb = zph.white_balance(mosaic)
    report.white_balance = {"gains_rgb": [round(float(g), 5) for g in wb.gains],
                            "sky_rgb": [round(float(s), 3) for s in wb.sky], "source": wb.source,
                            "applied_to": "preview only"}
    names = ("WBGAINR", "WBGAING", "WBGAINB") if len(wb.gains) == 3 else ()
    cards = [(name, round(float(g), 5), "display white balance gain (not applied here)")
             for name, g in zip(names, wb.gains)]
    return cards, wb.gains


def _mosaic_cards(config, report, tiles) -> list:
    """Return the provenance cards of the mosaic: program, observation (from the tiles), settings."""
    tile_headers = []
    for t in tiles:
        try:
            tile_headers.append(fits.getheader(t.path))
        except OSError as exc:  # the mosaic is still right; only the dates would be missing
            logger.warning("Cannot read the header of %s (%s): its dates are left out", t.path, exc)
    return [("ZMVERS", __version__, "ZeMosaic version"),
            ("NTILES", len(tiles), "master tiles co-added"),
            ("NFRAMES", len(report.frames_used), "frames used"),
            ("BUNIT", "adu", "linear, sensor units after normalisation"),
            *zfits.observation_cards(tile_headers),
            ("ASMENG", config.assembly_engine, "assembly engine"),
            ("ASMBE", report.backends.get("assembly", "cpu"), "assembly backend"),
            ("BKGORDER", config.background_model_order, "sky model order of frames and tiles"),
            ("FEATHER", config.assembly_feather_px, "[px] tile edge fade-in width"),
            ("BKGEXTR", bool(report.background_extraction), "smooth background removed from the mosaic"),
            *([("BKGXORD", config.final_background_order, "order of the removed background")]
              if report.background_extraction else []),
            *saturation_card(h.get("SATURATE") for h in tile_headers),
            *settings_history(config)]


def mosaic_saturated(tiles, wcs_out, mosaic) -> np.ndarray | None:
    """Return the ``(H, W)`` bool pixels of the mosaic saturated in some tile, or None when no tile knows.

    Each tile's saturated pixels are carried onto the output grid through the two WCSs
    (:func:`zemosaic_utils.pixels_reached`); pixels without data stay unflagged.
    """
    masks = [t for t in tiles if t.saturated is not None]
    if not masks:
        return None
    shape = mosaic.shape[:2]
    saturated = np.zeros(shape, bool)
    for tile in masks:
        ys, xs = np.nonzero(tile.saturated)
        saturated.reshape(-1)[pixels_reached(ys, xs, tile.wcs, wcs_out, shape)] = True
    return saturated & np.all(np.isfinite(mosaic), axis=2)


def _uint16_copy(mosaic) -> tuple[np.ndarray, list]:
    """Return the mosaic scaled linearly to 1..65535 (0 = no data) and the cards giving the scale."""
    low, high = float(np.nanmin(mosaic)), float(np.nanmax(mosaic))
    scale = (high - low) / 65534.0 if high > low else 1.0
    scaled = np.where(np.isfinite(mosaic), np.rint((mosaic - low) / scale) + 1.0, 0.0)
    cards = [("LINZERO", low, "value = LINZERO + LINSCALE * (pixel - 1)"),
             ("LINSCALE", scale, "pixel 0 = no data")]
    return scaled.astype(np.uint16), cards


def write_outputs(run, mosaic, coverage, wcs_out, tiles) -> dict:
    """Phase 6: write the mosaic FITS (linear, sensor colours), its coverage and display products.

    Display products (preview PNG, 16-bit TIFF) are white balanced and turned north up; the FITS
    files keep the mosaic grid and its WCS. Returns ``{output key: path}`` (the report's path
    included; :func:`run_mosaic` writes it last) and names the outputs in the report.
    """
    config, report = run.config, run.report
    out = config.output_folder
    paths = {key: os.path.join(out, name) for key, name in OUTPUT_NAMES.items()}
    cards = _mosaic_cards(config, report, tiles)
    saturated = mosaic_saturated(tiles, wcs_out, mosaic)
    # A thread per file while the white balance is measured: the display products are turned north
    # up meanwhile, the FITS file waits for the balance's cards without holding them up, and while
    # one file compresses or sums (releasing the GIL) another stretches. WCSs: copies (not thread-safe).
    preview_wcs, display_wcs, coverage_wcs = (wcs_out.deepcopy() for _ in range(3))
    with ThreadPoolExecutor(1, thread_name_prefix="white-balance") as pool:
        balance = pool.submit(_white_balance_cards, report, mosaic)
        map_threads(lambda write: write(), [
            lambda: zdisp.write_display_tiff(paths["display"], mosaic, wcs=display_wcs,
                                             wb_gains=lambda: balance.result()[1], saturated=saturated),
            lambda: zfits.write_plane_fits(paths["coverage"], coverage, coverage_wcs, header_cards=[
                ("BUNIT", "", "sum of weights: frames x tile weight"), *cards[:3]]),
            lambda: zdisp.write_preview_png(paths["preview"], mosaic, wcs=preview_wcs,
                                            wb_gains=lambda: balance.result()[1], saturated=saturated),
            lambda: zfits.write_image_fits(paths["mosaic"], mosaic, wcs_out, coverage=coverage,
                                           header_cards=cards + balance.result()[0],
                                           saturated=saturated)], threads=4)
    if config.save_channel_files and mosaic.shape[2] == 3:
        for c, colour in enumerate("RGB"):
            paths[f"channel_{colour}"] = os.path.join(out, CHANNEL_NAME.format(colour))
            zfits.write_plane_fits(paths[f"channel_{colour}"], mosaic[:, :, c], wcs_out,
                                   header_cards=cards + [("CHANNEL", colour, "colour plane")])
    if config.save_final_as_uint16:
        paths["uint16"] = os.path.join(out, UINT16_NAME)
        scaled, scale_cards = _uint16_copy(mosaic)
        zfits.write_image_fits(paths["uint16"], scaled, wcs_out, header_cards=cards + scale_cards,
                               dtype=np.uint16)
    report.outputs = {k: os.path.basename(v) for k, v in paths.items()}
    report.outputs["master_tiles"] = [os.path.relpath(t.path, out) for t in tiles]
    return paths


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _check_folders(config: MosaicConfig) -> None:
    """Raise PipelineError when the input folder is missing or the output folder is unwritable."""
    if not config.input_folder:
        raise PipelineError("no input folder given (input_folder)")
    if not os.path.isdir(config.input_folder):
        raise PipelineError(f"input folder not found: {config.input_folder}")
    if not config.output_folder:
        raise PipelineError("no output folder given (output_folder)")
    try:
        os.makedirs(config.output_folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=config.output_folder, prefix=".", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise PipelineError(f"output folder is not writable: {config.output_folder} ({exc.strerror or exc})")
    check_solver_paths(config)


def check_solver_paths(config: MosaicConfig) -> None:
    """Raise ConfigError, naming the key, for an ASTAP path that points nowhere: the run would
    otherwise go on without a solver and skip every frame that needs one."""
    program = config.astap_executable_path
    if program and not (os.path.isfile(program) and os.access(program, os.X_OK)):
        raise ConfigError(f"astap_executable_path: no program at {program} (give ASTAP's executable, "
                          "or leave it empty to use astrometry.net's solve-field)",
                          key="astap_executable_path", value=program)
    folder = config.astap_data_directory_path
    if folder and not os.path.isdir(folder):
        raise ConfigError(f"astap_data_directory_path: no folder at {folder} (give the folder of "
                          "ASTAP's star database, or leave it empty)",
                          key="astap_data_directory_path", value=folder)


def _take_output_folder(config: MosaicConfig) -> zrun.OutputLock:
    """Lock the output folder for this run, then clear what an earlier run left there.

    Raises PipelineError when another run holds the folder. Under the lock: the temporary files
    of a dead run are removed, and so are the previous run's mosaic products and report, so the
    folder never shows one run's mosaic beside another run's report (master tiles stay until
    this run knows which it reuses; see :func:`build_master_tiles`).
    """
    out = config.output_folder
    try:
        lock = zrun.acquire_output_lock(out, config.input_folder)
    except zrun.OutputFolderBusy as exc:
        raise PipelineError(str(exc)) from None
    try:
        shutil.rmtree(os.path.join(out, CACHE_DIR, STACK_CACHE_DIR), ignore_errors=True)
        dead = zrun.remove_dead_run_files([out, os.path.join(out, TILES_DIR),
                                           os.path.join(out, CACHE_DIR, WCS_CACHE_DIR)])
        if dead:
            logger.info("Removed %d temporary file(s) left by an interrupted run", dead)
        previous = sorted(n for n in os.listdir(out) if os.path.isfile(os.path.join(out, n))
                          and (n.startswith("zemosaic_mosaic") or n == REPORT_NAME))
        for name in previous:
            os.remove(os.path.join(out, name))
        if previous:
            logger.info("Removed the previous run's outputs: %s", ", ".join(previous))
    except BaseException:
        lock.release()
        raise
    return lock


@dataclass
class RunResult:
    """What :func:`run_mosaic` returns: ``{output key: path}``, the run's :class:`RunReport`
    and the run's duration in seconds."""

    paths: dict
    report: RunReport
    elapsed_s: float


def run_mosaic(config: MosaicConfig, progress=None, cancel: threading.Event | None = None) -> RunResult:
    """Run the whole pipeline on ``config.input_folder``; outputs go to ``config.output_folder``.

    ``progress(phase, done, total, message)`` is called as work advances; setting ``cancel`` stops
    the run between frames and tiles with :class:`Cancelled` and no mosaic written. Raises
    :class:`PipelineError` with a one-line reason when the run cannot produce a mosaic.
    """
    t_start = time.perf_counter()
    _check_folders(config)
    lock = _take_output_folder(config)
    run = Run(config, progress=progress, cancel=cancel)
    report = run.report
    try:
        records = run.timed("scan", scan_frames, run)
        records = run.timed("solve", solve_frames, run, records)
        records = leave_out_misfits(run, records)
        if not records:
            raise PipelineError(f"no usable frame in {config.input_folder} "
                                f"({len(report.frames_skipped)} skipped)")
        groups = run.timed("group", group_frames, run, records)
        zexec.warm_up(config.dask_scheduler, config.num_processing_workers, len(groups))
        tiles = run.timed("master_tiles", build_master_tiles, run, records, groups)
        if not tiles:
            raise PipelineError("no master tile could be built: every frame was skipped")
        run.check_cancel()
        wcs_out, shape_out = run.timed("grid", mosaic_grid, tiles, config.final_grid)
        run.advance("grid", 1, 1, f"{shape_out[1]} x {shape_out[0]} px")
        report.mosaic_shape = [tiles[0].image.shape[2], *shape_out]
        mosaic, coverage = run.timed("assembly", assemble_mosaic, run, tiles, wcs_out, shape_out)
        run.check_cancel()
        paths = run.timed("write", write_outputs, run, mosaic, coverage, wcs_out, tiles)
        run.advance("write", 1, 1, "outputs written")
        report.timings_s["total"] = time.perf_counter() - t_start
        _write_json_atomic(paths["report"], report.to_dict())
    finally:
        # Disk-backed stacks are scratch; the WCS cache beside them is kept for the next run.
        shutil.rmtree(os.path.join(config.output_folder, CACHE_DIR, STACK_CACHE_DIR),
                      ignore_errors=True)
        lock.release()
    return RunResult(paths, report, report.timings_s["total"])

