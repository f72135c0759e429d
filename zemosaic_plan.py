"""A run planned from the frames' headers alone: panels, tiles, frames to solve, and its cost.

``python -m zemosaic_worker CONFIG.json --plan`` prints :func:`format_plan` of
:func:`plan_run`: what the run would do with the frames of ``input_folder`` and an estimate of
its time, peak memory and disk on this machine, without reading a pixel (a second or so for
2,000 frames). The frames are grouped as the run groups them, by the pointing in their headers
(their WCS where they have one); the costs are :data:`COSTS`, measured on the reference machine
by ``benchmarks/bench_plan.py``, which also prints the plan beside the run it predicts.

What the headers cannot say is estimated on the safe side: a group whose frames span more than
one short session may be turned by field rotation, so its canvas is taken as its frames' long
side squared; frames the run will skip (damaged data, an unsolvable field) are counted in.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass

import numpy as np

import zemosaic_drizzle as zdriz
import zemosaic_executor as zexec
import zemosaic_fits as zfits
import zemosaic_quality as zq
import zemosaic_worker as zw
from zemosaic_utils import unit_vectors, usable_cores


@dataclass(frozen=True)
class MachineCosts:
    """What the pipeline's steps cost on the reference machine (``benchmarks/bench_plan.py``).

    Seconds are core-seconds of one step; ``*_per_mpx`` per million pixels (a frame's for the
    tiles, the mosaic's for the assembly); bytes are resident memory.
    """

    scan_s: float = 0.005  # read and check one frame's header and WCS
    solver_run_s: float = 1.5  # load, detect stars, one solve-field run
    match_s: float = 0.05  # load, detect stars (26 + 13 ms), match to the anchor from the previous frame
    tile_s_per_mpx: float = 0.26  # load, align, normalise, reject, combine one frame
    # Master tiles under Bayer drizzle over the debayer's at scale 1: 1.96x and 2.08x in two runs
    # of `bench_drizzle.py --tile` (50 full-size raw subs); scale 2 costs more, unmeasured.
    drizzle_tile_factor: float = 2.0
    parallel_efficiency: float = 0.7  # speed-up per worker beyond the first (tiles, solve groups)
    assembly_s_per_mpx: float = 0.5  # grid, assembly, Two-Pass and writing, per mosaic pixel
    process_bytes: int = 300 * 2**20  # one process with NumPy, astropy, SciPy loaded
    tile_work_planes: int = 8  # canvas-size float32 planes per channel a tile holds beside its stack
    assembly_planes: int = 10  # mosaic-size float32 planes per channel the assembly holds


COSTS = MachineCosts()
_BYTES = 4  # float32
# A session shorter than this turns too little under an alt-az mount to widen a tile's canvas.
_UNTURNED_SESSION_H = 0.5


@dataclass
class TilePlan:
    """One master tile to build: its frames and the size of its aligned stack (``sample_bytes`` per
    sample: more than a float32's under Bayer drizzle, whose pixel weights are a second stack)."""

    frames: int
    canvas_hw: tuple[int, int]
    channels: int
    sample_bytes: int = _BYTES

    @property
    def frame_bytes(self) -> int:
        """Bytes of one float32 frame on the tile's canvas."""
        return self.canvas_hw[0] * self.canvas_hw[1] * self.channels * _BYTES

    @property
    def stack_bytes(self) -> int:
        return self.frames * self.canvas_hw[0] * self.canvas_hw[1] * self.channels * self.sample_bytes


@dataclass
class RunPlan:
    """What a run of a configuration would do and take (see the module doc)."""

    files: int
    unreadable: list[tuple[str, str]]
    frames: int
    with_wcs: int
    to_solve: int
    solver_runs: int
    blind: int  # frames with neither a WCS nor a pointing: solved blind, left out of the tiles' plan
    cached_solutions: int
    panels: int
    tiles: list[TilePlan]
    mosaic_hw: tuple[int, int]
    workers: int
    ram_budget: int
    seconds: dict[str, float]
    peak_bytes: int
    disk_bytes: int
    disk_cache_bytes: int
    plan_s: float = 0.0
    drizzled: bool = False  # the tiles are Bayer-drizzled (MachineCosts.drizzle_tile_factor)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())


def plan_run(config, costs: MachineCosts = COSTS) -> RunPlan:
    """Return the :class:`RunPlan` of ``config`` on this machine, from the frames' headers."""
    t0 = time.perf_counter()
    paths = zw.list_input_files(config.input_folder, config.output_folder)
    records, unreadable = [], []
    for path in paths:
        try:
            records.append(zw.frame_record(zfits.read_header_info(path), config.force_resolve_existing_wcs))
        except zfits.FrameError as exc:
            unreadable.append((path, str(exc)))
    blind = sum(r.ra is None or r.dec is None for r in records)  # solved blind, placed after
    records = [r for r in records if r.ra is not None and r.dec is not None]
    if not records:
        raise zw.PipelineError(f"no frame with a WCS or a pointing (RA/DEC) in {config.input_folder}")
    threshold = config.cluster_panel_threshold or zw.automatic_panel_threshold(records)
    panels = zw.group_by_position(records, threshold)
    groups = [chunk for g in panels for chunk in zw.split_group(g, config.max_raw_per_master_tile)]
    # Bayer drizzle at scale 2 stacks and assembles on a grid twice as fine: four times the pixels.
    scale = zdriz.grid_scale(config)
    weighted = config.stacking_cfa_method == "bayer_drizzle"  # the pixel weights beside the frames
    sample_bytes = _BYTES + (np.dtype(zdriz.WEIGHT_DTYPE).itemsize if weighted else 0)
    tiles = [_tile_plan([records[i] for i in g], scale, sample_bytes) for g in groups]
    solver_runs, to_solve, solve_groups = _solver_runs(records)
    workers = 1 if len(tiles) < 2 else min(zexec.resolve_workers(config.num_processing_workers), len(tiles))
    budget = zexec.stack_ram_budget()
    mosaic_hw = tuple(scale * n for n in _mosaic_shape(records))
    plan = RunPlan(files=len(paths), unreadable=unreadable, frames=len(records) + blind,
                   with_wcs=sum(r.wcs is not None for r in records), to_solve=to_solve + blind,
                   solver_runs=solver_runs + blind, blind=blind, cached_solutions=_cached_solutions(config),
                   panels=len(panels), tiles=tiles, mosaic_hw=mosaic_hw, workers=workers,
                   ram_budget=budget, seconds={}, peak_bytes=0, disk_bytes=0, disk_cache_bytes=0,
                   drizzled=weighted)
    solve_threads = min(solve_groups, zexec.resolve_workers(config.num_processing_workers)) or 1
    _estimate(plan, records, costs, solve_threads)
    plan.plan_s = time.perf_counter() - t0
    return plan


def _solver_runs(records) -> tuple[int, int, int]:
    """Return ``(solver runs, frames to solve or match, groups to solve)``: per pointing group,
    one run for its anchor unless a frame has a WCS already, one more to check its matches unless
    two have."""
    threshold = zw.automatic_panel_threshold(records)
    runs = to_solve = groups = 0
    for group in zw.group_by_position(records, threshold):
        missing = sum(records[i].wcs is None for i in group)
        if missing:
            to_solve += missing
            groups += 1
            runs += min(missing, max(0, 2 - (len(group) - missing)))
    return runs, to_solve, groups


def _tangent_plane(records, scale_deg: float):
    """Return ``project(ra, dec) -> (n, 2)`` pixel offsets (east, north) on the tangent plane at
    the frames' mean centre."""
    centre = unit_vectors([r.ra for r in records], [r.dec for r in records]).mean(axis=0)
    centre /= np.linalg.norm(centre)
    east = np.cross([0.0, 0.0, 1.0], centre)
    east = east / np.linalg.norm(east) if np.linalg.norm(east) > 1e-9 else np.array([0.0, 1.0, 0.0])
    north = np.cross(centre, east)

    def project(ra, dec) -> np.ndarray:
        vec = unit_vectors(ra, dec)
        along = vec @ centre
        return np.degrees(np.stack([vec @ east / along, vec @ north / along], axis=1)) / scale_deg

    return project


def _offsets_px(records, scale_deg: float) -> np.ndarray:
    """Return the ``(n, 2)`` tangent-plane offsets (pixels) of the frames' centres from their mean."""
    return _tangent_plane(records, scale_deg)([r.ra for r in records], [r.dec for r in records])


def _scale_deg(records) -> float:
    scales = [r.pixel_scale_deg() for r in records]
    scales = [s for s in scales if s]
    return float(np.median(scales)) if scales else 2.4 / 3600.0  # a Seestar S50's


def _turned(records) -> bool:
    """Return True when the frames may be turned against each other (several or long sessions)."""
    sessions = zq.observing_sessions([r.info.date_obs for r in records], [r.info.exptime for r in records])
    if len(sessions) > 1:
        return True
    dates = [r.info.date_obs for r in records if r.info.date_obs]
    try:
        hours = [np.datetime64(d, "s").astype(np.int64) / 3600.0 for d in dates]
    except ValueError:
        return True
    return bool(hours) and max(hours) - min(hours) > _UNTURNED_SESSION_H


def _tile_plan(records, scale: int = 1, sample_bytes: int = _BYTES) -> TilePlan:
    """Return a group's tile: its canvas holds every frame's footprint (see the module doc),
    ``scale`` times finer under Bayer drizzle, ``sample_bytes`` per sample (:class:`TilePlan`)."""
    h, w = records[0].info.shape_hw
    spread = np.ptp(_offsets_px(records, _scale_deg(records)), axis=0) if len(records) > 1 else np.zeros(2)
    if _turned(records):
        h = w = max(h, w)
    return TilePlan(len(records), (scale * (int(h + spread[1]) + 4), scale * (int(w + spread[0]) + 4)),
                    records[0].info.n_channels, sample_bytes)


def _mosaic_shape(records) -> tuple[int, int]:
    """Return the north-up mosaic's ``(H, W)``: the corners of the frames with a WCS, and the
    centre of each other frame plus a frame's diagonal (its turn on the sky is not known before
    solving), on the tangent plane at the frames' mean centre."""
    h, w = records[0].info.shape_hw
    project = _tangent_plane(records, _scale_deg(records))
    centres = project([r.ra for r in records], [r.dec for r in records])
    half = math.hypot(h, w) / 2.0
    low, high = [], []
    corners = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1]], float)
    for r, centre in zip(records, centres):
        if r.wcs is None:
            low.append(centre - half)
            high.append(centre + half)
            continue
        placed = project(*r.wcs.pixel_to_world_values(corners[:, 0], corners[:, 1]))
        low.append(placed.min(axis=0))
        high.append(placed.max(axis=0))
    extent = np.max(high, axis=0) - np.min(low, axis=0)
    return int(extent[1]) + 1, int(extent[0]) + 1


def _cached_solutions(config) -> int:
    """Return how many plate solutions the output folder's cache holds (matched to the frames by
    their content, which the plan does not read)."""
    try:
        return sum(name.endswith(".json") for name in os.listdir(zw.wcs_cache_folder(config)))
    except OSError:
        return 0


def _speedup(workers: int, costs: MachineCosts) -> float:
    """Return how much faster ``workers`` at once run than one, on this machine's cores."""
    return 1.0 + costs.parallel_efficiency * (min(workers, usable_cores()) - 1)


def _estimate(plan: RunPlan, records, costs: MachineCosts, solve_threads: int) -> None:
    """Fill in the plan's seconds per phase, peak memory and disk (pointing groups are solved
    ``solve_threads`` at once)."""
    frame_mpx = records[0].info.shape_hw[0] * records[0].info.shape_hw[1] / 1e6
    matched = max(0, plan.to_solve - plan.solver_runs)
    speedup = _speedup(plan.workers, costs)
    mosaic_mpx = plan.mosaic_hw[0] * plan.mosaic_hw[1] / 1e6
    plan.seconds = {
        "scan": plan.frames * costs.scan_s,
        "solve": (plan.solver_runs * costs.solver_run_s + matched * costs.match_s)
        / _speedup(solve_threads, costs),
        "master_tiles": sum(t.frames for t in plan.tiles) * frame_mpx * costs.tile_s_per_mpx / speedup
        * (costs.drizzle_tile_factor if plan.drizzled else 1.0),
        "assembly": mosaic_mpx * costs.assembly_s_per_mpx,
    }
    share = plan.ram_budget // max(plan.workers, 1)
    per_tile = [min(t.stack_bytes, share) + costs.tile_work_planes * t.frame_bytes
                for t in plan.tiles]
    tile_phase = costs.process_bytes * (1 + (plan.workers if plan.workers > 1 else 0)) + \
        sum(sorted(per_tile)[-plan.workers:])
    channels = plan.tiles[0].channels
    assembly = costs.process_bytes + costs.assembly_planes * channels * _BYTES * int(mosaic_mpx * 1e6)
    plan.peak_bytes = max(tile_phase, assembly)
    tile_files = sum((t.channels + 1) * _BYTES * t.canvas_hw[0] * t.canvas_hw[1] for t in plan.tiles)
    # Mosaic FITS (channels + coverage), coverage FITS, 16-bit TIFF; the preview is small.
    products = int(mosaic_mpx * 1e6) * ((channels + 1) * _BYTES + _BYTES + channels * 2)
    plan.disk_bytes = tile_files + products
    plan.disk_cache_bytes = max((t.stack_bytes for t in plan.tiles if t.stack_bytes > share), default=0) \
        * min(plan.workers, len(plan.tiles))


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def format_plan(plan: RunPlan) -> str:
    """Return the plan as the command line prints it, every line within 80 columns."""
    sizes = [t.frames for t in plan.tiles]
    largest = max(plan.tiles, key=lambda t: t.stack_bytes)
    share = plan.ram_budget // max(plan.workers, 1)
    where = "in RAM" if largest.stack_bytes <= share else f"on disk (RAM budget {_size(share)})"
    lines = [f"Plan (from the headers of {plan.files} file(s), {plan.plan_s:.1f} s):",
             f"  frames:          {plan.frames}: {plan.with_wcs} with a WCS, {plan.to_solve} to solve or match"]
    if plan.unreadable:
        path, reason = plan.unreadable[0]
        lines += [f"  unreadable:      {len(plan.unreadable)}, the first {os.path.basename(path)[:40]}",
                  f"                   ({reason[:58]})"]
    if plan.blind:
        lines.append(f"  no pointing:     {plan.blind} (no RA/DEC: solved blind, not in the tiles below)")
    if plan.to_solve:
        cached = f"; {plan.cached_solutions} in the cache" if plan.cached_solutions else ""
        lines.append(f"  plate solving:   about {plan.solver_runs} solver run(s), the others matched{cached}")
    lines += [f"  panels, tiles:   {plan.panels} panel(s), {len(plan.tiles)} master tile(s) of "
              f"{min(sizes)}-{max(sizes)} frames",
              f"  largest stack:   {largest.frames} x {largest.canvas_hw[1]} x {largest.canvas_hw[0]} px, "
              f"{_size(largest.stack_bytes)}",
              f"                   {where}",
              f"  mosaic:          up to {plan.mosaic_hw[1]} x {plan.mosaic_hw[0]} px",
              f"  tile workers:    {plan.workers} on {usable_cores()} core(s)",
              f"  time:            about {_duration(plan.total_s)}",
              *(f"    {phase.replace('_', ' '):<15}{_duration(seconds)}" for phase, seconds in plan.seconds.items()),
              f"  peak memory:     about {_size(plan.peak_bytes)}",
              f"  disk:            about {_size(plan.disk_bytes)} in the output folder"]
    if plan.disk_cache_bytes:
        lines.append(f"                   and {_size(plan.disk_cache_bytes)} more while stacking")
    return "\n".join(lines)


def plan_to_dict(plan: RunPlan) -> dict:
    """Return the plan as JSON-able data (for the benchmark's table)."""
    data = dataclasses.asdict(plan)
    data["total_s"] = plan.total_s
    return data
