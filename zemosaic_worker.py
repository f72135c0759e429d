"""The classic ZeMosaic pipeline: scan, group, master tiles, grid, assembly, write.

``run_mosaic(config, progress=None, cancel=None)`` runs it; ``python -m zemosaic_worker
CONFIG.json`` is the command line. See DESIGN.md section 3 for the phases and outputs.

Progress goes through one callback ``progress(phase, done, total, message)``; cancellation through
a ``threading.Event`` checked between frames and tiles. Logging uses this module's logger only; the
CLI (here) and the GUI configure where it goes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

import numpy as np

import zemosaic_align_stack as stk
import zemosaic_fits as zfits
from zemosaic_config import ConfigError, MosaicConfig, config_to_dict, load_config
from zemosaic_utils import (GpuBackendError, compute_pixel_mapping, gpu_available,
                            gpu_unavailable_reason, reproject_and_coadd)

__version__ = "0.1.0"

logger = logging.getLogger(__name__)

MOSAIC_NAME = "zemosaic_mosaic.fits"
PREVIEW_NAME = "zemosaic_mosaic_preview.png"
REPORT_NAME = "zemosaic_run.json"
TILES_DIR = "master_tiles"
CACHE_DIR = ".zemosaic_cache"

PHASES = ("scan", "group", "master_tiles", "grid", "assembly", "write")

def _stack_ram_budget() -> int:
    """Return the bytes an aligned stack may take in RAM: 40 % of the memory available now.

    Larger stacks go to a disk-backed cache in the output folder; 4 GB when /proc is unreadable.
    """
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 2 // 5
    except OSError:
        pass
    return 4 * 2**30


class PipelineError(Exception):
    """A run cannot go on; the message is a one-line reason for the user."""


class Cancelled(Exception):
    """The run was cancelled by the user."""


@dataclass
class FrameRecord:
    """A frame that passed the scan: its header information and sky centre."""

    info: zfits.FrameInfo
    ra: float
    dec: float

    @property
    def path(self) -> str:
        return self.info.path


@dataclass
class MasterTile:
    """A stacked group: image ``(H, W, C)``, coverage (frames per pixel) and WCS."""

    index: int
    image: np.ndarray
    coverage: np.ndarray
    wcs: object
    path: str
    frames: list
    reference: str
    backend: str


@dataclass
class RunReport:
    """What a run did; saved as ``zemosaic_run.json``."""

    config: dict
    frames_used: list = field(default_factory=list)
    frames_skipped: list = field(default_factory=list)
    tiles: list = field(default_factory=list)
    backends: dict = field(default_factory=dict)
    timings_s: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    mosaic_shape: list = field(default_factory=list)
    version: str = __version__

    def skip(self, path: str, reason: str) -> None:
        """Record a skipped frame and say so once at WARNING."""
        logger.warning("Skipping %s: %s", os.path.basename(path), reason)
        self.frames_skipped.append({"path": path, "reason": reason})
        if path in self.frames_used:
            self.frames_used.remove(path)

    def to_dict(self) -> dict:
        """Return the report as a JSON-able dict."""
        return {
            "version": self.version,
            "config": self.config,
            "frames_used": self.frames_used,
            "frames_skipped": self.frames_skipped,
            "tiles": self.tiles,
            "mosaic_shape": self.mosaic_shape,
            "backends": self.backends,
            "timings_s": {k: round(v, 3) for k, v in self.timings_s.items()},
            "outputs": self.outputs,
        }


class _Context:
    """Per-run plumbing: progress callback, cancellation and phase timing."""

    def __init__(self, progress, cancel):
        self._progress = progress
        self._cancel = cancel

    def report(self, phase, done, total, message=""):
        if self._progress is not None:
            self._progress(phase, done, total, message)

    def check_cancel(self):
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("cancelled by user")


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
    found = []
    for root, dirs, files in os.walk(input_folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not _is_inside(os.path.join(root, d), output_folder))
        for name in files:
            if name.startswith(".") or ".fit" not in name.lower():
                continue
            if name.lower().rsplit(".", 1)[-1] in ("fit", "fits", "fts"):
                found.append(os.path.join(root, name))
    return sorted(found)


def scan_frames(config: MosaicConfig, report: RunReport, ctx: _Context) -> list[FrameRecord]:
    """Phase 1: read every candidate file's header and WCS; bad files are skipped with a reason."""
    paths = list_input_files(config.input_folder, config.output_folder)
    records = []
    for i, path in enumerate(paths):
        ctx.check_cancel()
        try:
            info = zfits.read_frame_info(path)
            if "ZMVERS" in info.header:
                raise zfits.FrameError("a ZeMosaic output (master tile or mosaic), not a raw frame")
        except zfits.FrameError as exc:
            report.skip(path, str(exc))
        else:
            h, w = info.shape_hw
            ra, dec = info.wcs.pixel_to_world_values((w - 1) / 2.0, (h - 1) / 2.0)
            records.append(FrameRecord(info, float(ra), float(dec)))
            report.frames_used.append(path)
        ctx.report("scan", i + 1, len(paths), os.path.basename(path))
    logger.info("Scan: %d usable frame(s), %d skipped", len(records), len(report.frames_skipped))
    return records


# --------------------------------------------------------------------------------------------------
# Phase 2: grouping
# --------------------------------------------------------------------------------------------------


def _unit_vectors(ra_deg, dec_deg) -> np.ndarray:
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def automatic_panel_threshold(records: list[FrameRecord]) -> float:
    """Return a grouping threshold (degrees): a quarter of the median short side of the field.

    Dithers move a frame by a few per cent of its field; mosaic panels are typically 70-90 % of a
    field apart, so a quarter of the short side separates them with margin on both sides.
    """
    short_sides = []
    for r in records:
        scale = np.sqrt(abs(np.linalg.det(r.info.wcs.pixel_scale_matrix)))
        short_sides.append(min(r.info.shape_hw) * scale)
    return 0.25 * float(np.median(short_sides))


def group_by_position(records: list[FrameRecord], threshold_deg: float) -> list[list[int]]:
    """Return groups of record indices: connected components of centres closer than the threshold.

    Groups are ordered by their first frame; frames inside a group keep the scan (time) order.
    """
    n = len(records)
    vec = _unit_vectors([r.ra for r in records], [r.dec for r in records])
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


def group_frames(records, config: MosaicConfig) -> list[list[int]]:
    """Phase 2: panels by sky position, then the ``max_raw_per_master_tile`` cap."""
    threshold = config.cluster_panel_threshold or automatic_panel_threshold(records)
    panels = group_by_position(records, threshold)
    groups = [chunk for g in panels for chunk in split_group(g, config.max_raw_per_master_tile)]
    logger.info("Grouping: %d panel(s) -> %d master tile(s) (threshold %.3f deg)",
                len(panels), len(groups), threshold)
    return groups


# --------------------------------------------------------------------------------------------------
# Phase 3: master tiles
# --------------------------------------------------------------------------------------------------


def _reference_index(records: list[FrameRecord]) -> int:
    """Return the index of the frame whose centre is nearest the group's mean centre."""
    vec = _unit_vectors([r.ra for r in records], [r.dec for r in records])
    centre = vec.mean(axis=0)
    return int(np.argmax(vec @ centre))


def _allocate_stack(shape, cache_dir: str):
    """Return a float32 array of ``shape``: in RAM, or disk-backed when it is too large."""
    nbytes = int(np.prod(shape)) * 4
    if nbytes <= _stack_ram_budget():
        return np.empty(shape, np.float32)
    os.makedirs(cache_dir, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".stack_", suffix=".tmp", delete=False)
    handle.close()
    logger.info("Aligned stack of %.1f GB goes to a disk cache in %s", nbytes / 2**30, cache_dir)
    return np.memmap(handle.name, dtype=np.float32, mode="w+", shape=shape)


def _release_stack(stack) -> None:
    """Delete the file behind a disk-backed stack."""
    if isinstance(stack, np.memmap):
        name = stack.filename
        del stack
        try:
            os.remove(name)
        except OSError:
            pass


def _load_and_align_group(records, config, report, ctx, cache_dir, tile_label):
    """Load, debayer and align a group's frames; returns ``(stack, used records, tile WCS)``.

    The reference (the frame nearest the group centre) is loaded first and sits in slot 0; the
    others are aligned one at a time onto its canvas in a preallocated stack, so memory holds at
    most one raw frame besides the stack. Frames that fail to load or align are skipped with their
    reason.
    """
    ref_i = _reference_index(records)
    order = [ref_i] + [i for i in range(len(records)) if i != ref_i]
    reference = canvas = stack = None
    used = []
    for done, i in enumerate(order):
        ctx.check_cancel()
        rec = records[i]
        try:
            frame = zfits.load_frame(rec.path, hot_pixels=config.correct_hot_pixels)
            if reference is None:
                reference = frame.data
                canvas = stk.group_canvas(frame.wcs, reference.shape[:2],
                                          [(r.info.wcs, r.info.shape_hw) for r in records])
                stack = _allocate_stack((len(records),) + canvas.shape + reference.shape[2:], cache_dir)
                aligned = stk.place_reference(reference, canvas)
            else:
                if frame.data.shape[2] != reference.shape[2]:
                    raise stk.AlignmentError("channel count differs from the reference frame")
                aligned = stk.align_frame(frame.data, reference, config.align_method, frame.wcs,
                                          propagate_mask=True, canvas=canvas)
        except (zfits.FrameError, stk.AlignmentError) as exc:
            report.skip(rec.path, str(exc))
            continue
        stack[len(used)] = aligned
        used.append(rec)
        ctx.report("master_tiles", done + 1, len(order), f"{tile_label}: aligned {os.path.basename(rec.path)}")
    if not used:
        return None, [], None
    return stack, used, canvas.wcs


def _photometric_reference(gains, offsets):
    """Return coefficients rescaled to the level of the most transparent frame of the group.

    Normalisation maps every frame onto the geometric reference; clouds and haze only dim a frame,
    so the frame needing the smallest gain is the clearest and its level is the best estimate of
    the true flux. The rescale is one number for all channels (haze is grey): per-channel noise in
    that one frame's gains must not tint the tile.
    """
    scale = float(np.min(np.mean(gains, axis=1)))
    return gains / scale, offsets / scale


def _stack_group(stack, n_used, config, use_gpu, tile_label):
    """Normalise, weight, reject and combine an aligned stack; returns ``(image, coverage, backend)``."""
    view = stack[:n_used]
    gains, offsets = stk.normalization_coefficients(view, 0, config.stacking_normalize_method)
    if config.stacking_normalize_method == "linear_fit":
        gains, offsets = _photometric_reference(gains, offsets)
    # One noise measurement per frame serves the weights and the rejection's noise floor.
    sigmas = stk.frame_noise_sigmas(view, gains)
    weights = None
    if config.stacking_weighting_method == "noise_variance":
        weights = stk.noise_variance_weights(view, gains, sigmas=sigmas)
    params = stk.StackParams(config.stacking_rejection_algorithm, config.stacking_kappa_low,
                             config.stacking_kappa_high, tuple(config.stacking_winsor_limits),
                             config.stacking_final_combine_method,
                             config.stacking_kappa_max_iterations)
    if use_gpu:
        from zemosaic_align_stack_gpu import stack_in_chunks_gpu

        try:
            image, coverage = stack_in_chunks_gpu(view, gains, offsets, weights, params, noise_sigmas=sigmas)
            return image, coverage, "gpu"
        except GpuBackendError as exc:
            logger.warning("%s: GPU stacking failed (%s); stacking this tile on CPU", tile_label, exc)
    image, coverage = stk.stack_in_chunks(view, gains, offsets, weights, params, noise_sigmas=sigmas)
    return image, coverage, "cpu"


def _tile_header_cards(config, used, reference, backend) -> list:
    """Return the provenance cards written into a master tile."""
    return [
        ("ZMVERS", __version__, "ZeMosaic version"),
        ("NFRAMES", len(used), "frames stacked"),
        ("REFFRAME", os.path.basename(reference)[:68], "alignment reference frame"),
        ("NORMMETH", config.stacking_normalize_method, "normalisation"),
        ("WEIGMETH", config.stacking_weighting_method, "frame weighting"),
        ("REJALGO", config.stacking_rejection_algorithm, "pixel rejection"),
        ("KAPPALO", float(config.stacking_kappa_low), "rejection kappa low"),
        ("KAPPAHI", float(config.stacking_kappa_high), "rejection kappa high"),
        ("WINSORLO", float(config.stacking_winsor_limits[0]), "winsor limit low"),
        ("WINSORHI", float(config.stacking_winsor_limits[1]), "winsor limit high"),
        ("COMBINE", config.stacking_final_combine_method, "final combine"),
        ("QUANTMTH", "sorted-nan-aware", "NaN-safe winsor quantiles"),
        ("STACKBE", backend, "stacking backend"),
    ]


def build_master_tile(index, records, config, report, ctx, tiles_dir, use_gpu) -> MasterTile | None:
    """Phase 3 for one group: align, stack and write ``master_tile_NNN.fits``; None if nothing stacks."""
    label = f"tile {index:03d}"
    cache_dir = os.path.join(config.output_folder, CACHE_DIR)
    logger.debug("MT_COVERAGE: propagate_mask=True (%s, %d frames)", label, len(records))
    stack, used, tile_wcs = _load_and_align_group(records, config, report, ctx, cache_dir, label)
    if not used:
        logger.warning("%s: no frame could be loaded; tile dropped", label)
        return None
    try:
        image, coverage, backend = _stack_group(stack, len(used), config, use_gpu, label)
    finally:
        _release_stack(stack)
    path = os.path.join(tiles_dir, f"master_tile_{index:03d}.fits")
    zfits.write_image_fits(path, image, tile_wcs, coverage=coverage,
                           header_cards=_tile_header_cards(config, used, used[0].path, backend))
    logger.info("%s: %d frame(s) stacked (%s, %s)", label, len(used),
                config.stacking_rejection_algorithm, backend)
    return MasterTile(index, image, coverage, tile_wcs, path, [r.path for r in used],
                      used[0].path, backend)


def build_master_tiles(records, groups, config, report, ctx) -> list[MasterTile]:
    """Phase 3: one master tile per group."""
    tiles_dir = os.path.join(config.output_folder, TILES_DIR)
    os.makedirs(tiles_dir, exist_ok=True)
    use_gpu = config.use_gpu_phase5 and gpu_available()
    tiles = []
    for gi, group in enumerate(groups):
        ctx.check_cancel()
        tile = build_master_tile(len(tiles), [records[i] for i in group], config, report, ctx,
                                 tiles_dir, use_gpu)
        if tile is not None:
            tiles.append(tile)
            report.tiles.append({"index": tile.index, "file": os.path.relpath(tile.path, config.output_folder),
                                 "frames": len(tile.frames), "reference": tile.reference,
                                 "backend": tile.backend})
        ctx.report("master_tiles", gi + 1, len(groups), f"tile {gi + 1}/{len(groups)} done")
    report.backends["master_tiles"] = "gpu" if any(t.backend == "gpu" for t in tiles) else "cpu"
    return tiles


# --------------------------------------------------------------------------------------------------
# Phase 4: grid
# --------------------------------------------------------------------------------------------------


def mosaic_grid(tiles: list[MasterTile]):
    """Phase 4: the optimal TAN grid over all tiles (auto-rotated); returns ``(wcs, (H, W))``."""
    from reproject.mosaicking import find_optimal_celestial_wcs

    wcs, shape = find_optimal_celestial_wcs([(t.image.shape[:2], t.wcs) for t in tiles],
                                            projection="TAN", auto_rotate=True)
    return wcs, tuple(int(s) for s in shape)


# --------------------------------------------------------------------------------------------------
# Phase 5: assembly
# --------------------------------------------------------------------------------------------------


def downsampled_wcs(wcs, factor: int):
    """Return the WCS of an output grid sampled every ``factor`` pixels (CD matrix scaled)."""
    small = wcs.deepcopy()
    if small.wcs.has_cd():
        small.wcs.cd = small.wcs.cd * factor
    else:
        small.wcs.cdelt = small.wcs.cdelt * factor
    small.wcs.crpix = (np.asarray(wcs.wcs.crpix) - 1.0) / factor + 1.0
    small.wcs.set()
    return small


@dataclass
class LowResTiles:
    """Every tile resampled alone onto a coarse copy of the output grid (for photometric matching)."""

    images: list  # (h, w, C) float32 per tile, NaN outside
    weights: list  # (h, w) float32 per tile
    factor: int


def low_res_tiles(tiles: list[MasterTile], wcs_out, shape_out, max_side: int = 800) -> LowResTiles:
    """Return the tiles on a grid sampled every ``factor`` output pixels (long side <= ``max_side``).

    Matching statistics need overlaps, not resolution: the coarse grid makes them cheap.
    """
    factor = max(1, int(np.ceil(max(shape_out) / max_side)))
    small_wcs = downsampled_wcs(wcs_out, factor)
    small_shape = (int(np.ceil(shape_out[0] / factor)), int(np.ceil(shape_out[1] / factor)))
    images, weights = [], []
    for t in tiles:
        image, weight = reproject_and_coadd([t.image], [t.wcs], small_wcs, small_shape, [t.coverage])
        images.append(image)
        weights.append(np.min(weight, axis=-1))
    return LowResTiles(images, weights, factor)


def _overlap_pixels(low: LowResTiles, i: int, j: int):
    """Return the mask of coarse pixels where tiles i and j both have solid (>= half-max) weight."""
    wi, wj = low.weights[i], low.weights[j]
    both = (wi > 0.5 * wi.max()) & (wj > 0.5 * wj.max())
    return both & np.all(np.isfinite(low.images[i]) & np.isfinite(low.images[j]), axis=-1)


def _pair_offsets(low: LowResTiles, gains, offsets=None):
    """Return pairwise ``(i, j, d_ij[C], n_ij)``: median of tile i minus tile j in their overlap."""
    pairs = []
    n = len(low.images)
    for i in range(n):
        for j in range(i + 1, n):
            both = _overlap_pixels(low, i, j)
            count = int(both.sum())
            if count >= 20:
                diff = low.images[i][both] * gains[i] - low.images[j][both] * gains[j]
                pairs.append((i, j, np.median(diff, axis=0), count))
    return pairs


def _smooth_nan(image2d, sigma):
    """Gaussian smoothing that ignores NaN (normalised convolution); NaN stays NaN."""
    from scipy.ndimage import gaussian_filter

    if sigma <= 0:
        return image2d
    valid = np.isfinite(image2d)
    num = gaussian_filter(np.where(valid, image2d, 0.0), sigma)
    den = gaussian_filter(valid.astype(np.float64), sigma)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid & (den > 0.05), num / den, np.nan)


def _pair_slope(x, y, n_bins: int = 24):
    """Return the slope of ``y ~ s * x + c`` through bin medians, or None when x has no range.

    Binning on x (quantile bins) and fitting the bin medians ignores stars and outliers and keeps
    the noise in x from flattening the slope; a pair whose overlap is flat sky carries no gain
    information and gives None.
    """
    order = np.argsort(x)
    bins = np.array_split(order, n_bins)
    bx = np.array([np.median(x[b]) for b in bins if b.size])
    by = np.array([np.median(y[b]) for b in bins if b.size])
    noise = 1.4826 * np.median(np.abs(np.diff(x[order]))) / np.sqrt(2) + 1e-12
    if bx.size < 4 or (bx[-2] - bx[1]) < 20 * noise / np.sqrt(max(1, x.size // n_bins)):
        return None
    slope, _c = np.polyfit(bx, by, 1)
    return float(slope) if np.isfinite(slope) and slope > 0 else None


def _pair_gains(low: LowResTiles, sigma_px: float):
    """Return pairwise ``(i, j, log(s_ij), n_ij)`` with ``tile_i ~ s_ij * tile_j`` in the overlap.

    Compared on the luminance smoothed by ``sigma_px`` (output pixels), which removes the noise
    and the small PSF differences between tiles and keeps the nebulosity that carries the gain.
    """
    sigma = sigma_px / low.factor
    lum = [np.mean(img, axis=-1) for img in low.images]
    pairs = []
    n = len(lum)
    for i in range(n):
        for j in range(i + 1, n):
            both = _overlap_pixels(low, i, j)
            if int(both.sum()) < 50:
                continue
            # Smooth both tiles over the same support (their overlap only): a tile smoothed over
            # its own footprint would average towards its own interior and bias the comparison.
            li = _smooth_nan(np.where(both, lum[i], np.nan), sigma)
            lj = _smooth_nan(np.where(both, lum[j], np.nan), sigma)
            ok = both & np.isfinite(li) & np.isfinite(lj)
            slope = _pair_slope(lj[ok], li[ok]) if ok.sum() >= 50 else None
            if slope is not None:
                pairs.append((i, j, np.array([np.log(slope)]), int(ok.sum())))
    return pairs


def _solve_pairwise(n_tiles, pairs, n_values, anchor):
    """Return ``(n_tiles, n_values)`` x with ``x_i - x_j ~ d_ij`` (weighted least squares, x_anchor = 0).

    Tiles not connected to the anchor through overlaps keep 0. Two Huber re-weighting rounds damp
    an overlap whose statistic was pulled by a bad region.
    """
    solution = np.zeros((n_tiles, n_values))
    if not pairs:
        return solution
    a = np.zeros((len(pairs) + 1, n_tiles))
    for k, (i, j, _d, _n) in enumerate(pairs):
        a[k, i], a[k, j] = 1.0, -1.0
    a[-1, anchor] = 1.0
    base_w = np.array([np.sqrt(n) for *_x, n in pairs] + [1e3])
    for c in range(n_values):
        b = np.array([d[c] for _i, _j, d, _n in pairs] + [0.0])
        w = base_w.copy()
        for _ in range(3):
            sol, *_ = np.linalg.lstsq(a * w[:, None], b * w, rcond=None)
            resid = np.abs(a @ sol - b)[:-1]
            scale = 1.4826 * np.median(resid) + 1e-12
            huber = np.minimum(1.0, 2.0 * scale / np.maximum(resid, 1e-12))
            w = np.concatenate([base_w[:-1] * huber, base_w[-1:]])
        solution[:, c] = sol
    return solution


def _best_connected(n_tiles, pairs) -> int:
    """Return the tile with the largest total overlap (the anchor of the solutions)."""
    links = np.zeros(n_tiles)
    for i, j, _d, n in pairs:
        links[i] += n
        links[j] += n
    return int(np.argmax(links))


def background_offsets(low: LowResTiles, gains=None) -> np.ndarray:
    """Return per-tile, per-channel offsets to subtract so tile skies agree in the overlaps.

    Solved once on the host from the coarse tiles (medians of overlaps, robust least squares
    anchored on the best-connected tile), so every backend applies exactly the same correction.
    ``gains`` (per tile) are applied to the tiles before comparing them.
    """
    n = len(low.images)
    n_ch = low.images[0].shape[-1]
    gains = np.ones(n) if gains is None else np.asarray(gains)
    pairs = _pair_offsets(low, gains)
    offsets = _solve_pairwise(n, pairs, n_ch, _best_connected(n, pairs))
    logger.debug("Background offsets per tile: %s", np.round(offsets, 2).tolist())
    return offsets


def coadd_channels(tile_images, wcs_list, wcs_out, shape_out, weights, mappings, engine,
                   use_gpu, label="Assembly", gpu_xp=None):
    """Co-add ``(H, W, C)`` tiles with one backend for all channels.

    Returns ``(mosaic (H, W, C), coverage (H, W, C), gpu_all)``. With the GPU asked for, every
    channel runs on the GPU (one pass: the channels share coordinates and gathers); if that fails,
    one WARNING and every channel is re-run on the CPU, so a result never mixes backends across
    channels. ``gpu_xp`` replaces CuPy (tests pass NumPy to run the GPU code path without a GPU).
    """
    gpu_all = bool(use_gpu and engine == "fast")
    if gpu_all:
        try:
            mosaic, coverage = reproject_and_coadd(tile_images, wcs_list, wcs_out, shape_out,
                                                   weights, engine, True, mappings, gpu_xp=gpu_xp)
        except GpuBackendError as exc:
            logger.warning("%s GPU reprojection failed on one or more channels; rerunning all "
                           "channels on CPU to avoid mixed backend (%s)", label, exc)
            gpu_all = False
    if not gpu_all:
        mosaic, coverage = reproject_and_coadd(tile_images, wcs_list, wcs_out, shape_out, weights,
                                               engine, False, mappings)
    for c in range(coverage.shape[-1]):
        logger.debug("%s channel %d gpu=%s cov_stats(min,max)=(%.3g,%.3g)", label, c, gpu_all,
                     float(coverage[..., c].min()), float(coverage[..., c].max()))
    return mosaic, coverage, gpu_all


@dataclass
class AssemblyInputs:
    """What both assembly passes share: tiles, output grid, pixel mappings and backend choice."""

    tiles: list
    wcs_out: object
    shape_out: tuple
    mappings: list
    engine: str
    use_gpu: bool
    gpu_xp: object = None

    def coadd(self, gains, offsets, label):
        """Co-add ``gain * tile - offset`` for every channel; returns ``(mosaic, coverage (H,W,C), gpu_all)``."""
        images = [t.image * np.float32(gains[k]) - offsets[k].astype(np.float32)
                  for k, t in enumerate(self.tiles)]
        return coadd_channels(images, [t.wcs for t in self.tiles], self.wcs_out,
                              self.shape_out, [t.coverage for t in self.tiles], self.mappings,
                              self.engine, self.use_gpu, label, self.gpu_xp)


def tile_gains(low: LowResTiles, offsets, sigma_px: float, gain_clip) -> np.ndarray:
    """Return one gain per tile, the same for every channel, that evens out tile brightness.

    Each overlap gives the brightness ratio of its two tiles (smoothed luminance, offsets
    applied); the log-ratios are solved jointly — comparing each tile with the pass-1 mosaic of
    its neighbours one tile at a time would overshoot, as both sides of a seam move. The gains are
    divided by their median (most tiles are right, so the flux scale stays) and clipped to
    ``gain_clip``. One gain for R, G and B: a per-channel gain is how colour casts are born.
    """
    shifted = LowResTiles([img - off.astype(np.float32) for img, off in zip(low.images, offsets)],
                          low.weights, low.factor)
    n = len(low.images)
    pairs = _pair_gains(shifted, sigma_px)
    log_g = -_solve_pairwise(n, pairs, 1, _best_connected(n, pairs))[:, 0]
    log_g -= np.median(log_g)
    return np.clip(np.exp(log_g), gain_clip[0], gain_clip[1])


def run_second_pass_coverage_renorm(inputs: AssemblyInputs, low: LowResTiles, offsets, config):
    """Two-Pass: gains per tile from the pass-1 tiles, new offsets, then a second co-add.

    Returns ``(mosaic (H,W,C), coverage (H,W), gains, gpu_all)``. Backends never mix across
    channels (see :func:`coadd_channels`); one summary line names the backend used.
    """
    gains = tile_gains(low, offsets, config.two_pass_cov_sigma_px, config.two_pass_cov_gain_clip)
    logger.info("[TwoPass] tile gains: %s", ", ".join(f"{g:.4f}" for g in gains))
    offsets2 = background_offsets(low, gains) if config.match_background else offsets * gains[:, None]
    mosaic, coverage, gpu_all = inputs.coadd(gains, offsets2, "[TwoPass]")
    logger.info("[TwoPass] Two-pass reprojection backend: gpu_all=%s", gpu_all)
    return mosaic, np.min(coverage, axis=-1), gains, gpu_all


def assemble_mosaic(tiles, wcs_out, shape_out, config, report, ctx, gpu_xp=None):
    """Phase 5: background matching, the co-add of every channel, optionally Two-Pass.

    Returns ``(mosaic (H, W, C), coverage (H, W))``.
    """
    n_ch = tiles[0].image.shape[2]
    n = len(tiles)
    need_low = config.match_background or config.two_pass_coverage_renorm
    low = low_res_tiles(tiles, wcs_out, shape_out) if need_low and n > 1 else None
    offsets = background_offsets(low) if (config.match_background and low is not None) \
        else np.zeros((n, n_ch))
    ctx.check_cancel()
    mappings = []
    for k, t in enumerate(tiles):
        mappings.append(compute_pixel_mapping(t.wcs, t.image.shape[:2], wcs_out, shape_out)
                        if config.assembly_engine == "fast" else None)
        ctx.report("assembly", k + 1, n + 2, "pixel mapping")
    use_gpu = config.use_gpu_phase5
    if use_gpu and gpu_xp is None and not gpu_available():
        logger.warning("GPU asked for assembly but not usable (%s); using CPU", gpu_unavailable_reason())
        use_gpu = False
    inputs = AssemblyInputs(tiles, wcs_out, shape_out, mappings, config.assembly_engine, use_gpu, gpu_xp)
    mosaic, coverage, gpu_all = inputs.coadd(np.ones(n), offsets, "Assembly")
    coverage = np.min(coverage, axis=-1)  # channels share tile weights: their coverages agree
    ctx.report("assembly", n + 1, n + 2, "pass 1 done")
    report.backends["assembly"] = "gpu" if gpu_all else "cpu"
    if config.two_pass_coverage_renorm and low is not None:
        ctx.check_cancel()
        mosaic, coverage, gains, gpu_all = run_second_pass_coverage_renorm(inputs, low, offsets, config)
        report.backends["two_pass"] = "gpu" if gpu_all else "cpu"
        for entry, gain in zip(report.tiles, gains):
            entry["two_pass_gain"] = round(float(gain), 5)
    ctx.report("assembly", n + 2, n + 2, "co-add done")
    return mosaic, coverage


# --------------------------------------------------------------------------------------------------
# Phase 6: outputs
# --------------------------------------------------------------------------------------------------


def _write_json_atomic(path: str, payload: dict) -> None:
    """Write JSON through a temporary file and a rename, so the file is whole or absent."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_outputs(mosaic, coverage, wcs_out, config, report, tiles) -> dict:
    """Write the mosaic FITS, its preview PNG and the run report; returns their paths."""
    out = config.output_folder
    paths = {"mosaic": os.path.join(out, MOSAIC_NAME), "preview": os.path.join(out, PREVIEW_NAME),
             "report": os.path.join(out, REPORT_NAME)}
    cards = [("ZMVERS", __version__, "ZeMosaic version"),
             ("NTILES", len(tiles), "master tiles co-added"),
             ("NFRAMES", len(report.frames_used), "frames used"),
             ("ASMENG", config.assembly_engine, "assembly engine"),
             ("ASMBE", report.backends.get("assembly", "cpu"), "assembly backend")]
    zfits.write_image_fits(paths["mosaic"], mosaic, wcs_out, coverage=coverage, header_cards=cards)
    zfits.write_preview_png(paths["preview"], mosaic)
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


@dataclass
class RunResult:
    """What :func:`run_mosaic` returns: output paths, the report and the mosaic's shape."""

    paths: dict
    report: dict
    elapsed_s: float


def run_mosaic(config: MosaicConfig, progress=None, cancel: threading.Event | None = None) -> RunResult:
    """Run the whole pipeline on ``config.input_folder``; outputs go to ``config.output_folder``.

    ``progress(phase, done, total, message)`` is called as work advances; setting ``cancel`` stops
    the run between frames and tiles with :class:`Cancelled` and no mosaic written. Raises
    :class:`PipelineError` with a one-line reason when the run cannot produce a mosaic.
    """
    t_start = time.perf_counter()
    _check_folders(config)
    ctx = _Context(progress, cancel)
    report = RunReport(config=config_to_dict(config))
    timings = report.timings_s

    def timed(name, fn, *args):
        ctx.report(name, 0, 1, "starting")
        t0 = time.perf_counter()
        result = fn(*args)
        timings[name] = time.perf_counter() - t0
        return result

    try:
        records = timed("scan", scan_frames, config, report, ctx)
        if not records:
            raise PipelineError(f"no usable frame in {config.input_folder} "
                                f"({len(report.frames_skipped)} skipped)")
        groups = timed("group", group_frames, records, config)
        ctx.report("group", 1, 1, f"{len(groups)} group(s)")
        tiles = timed("master_tiles", build_master_tiles, records, groups, config, report, ctx)
        if not tiles:
            raise PipelineError("no master tile could be built: every frame was skipped")
        ctx.check_cancel()
        wcs_out, shape_out = timed("grid", mosaic_grid, tiles)
        ctx.report("grid", 1, 1, f"{shape_out[1]} x {shape_out[0]} px")
        report.mosaic_shape = [tiles[0].image.shape[2], *shape_out]
        mosaic, coverage = timed("assembly", assemble_mosaic, tiles, wcs_out, shape_out, config,
                                 report, ctx)
        ctx.check_cancel()
        paths = timed("write", write_outputs, mosaic, coverage, wcs_out, config, report, tiles)
        ctx.report("write", 1, 1, "outputs written")
    finally:
        shutil.rmtree(os.path.join(config.output_folder, CACHE_DIR), ignore_errors=True)
    timings["total"] = time.perf_counter() - t_start
    _write_json_atomic(paths["report"], report.to_dict())
    return RunResult(paths, report.to_dict(), timings["total"])


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


class _TerminalProgress:
    """Turns progress callbacks into a one-line progress bar with ETA on a terminal."""

    def __init__(self, stream=sys.stderr, width=28):
        self.stream = stream
        self.width = width
        self.enabled = stream.isatty()
        self._phase = None
        self._t0 = time.perf_counter()
        self._last = 0.0

    def __call__(self, phase, done, total, message=""):
        now = time.perf_counter()
        if phase != self._phase:
            self._phase, self._t0 = phase, now
        if not self.enabled or (now - self._last < 0.1 and done < total):
            return
        self._last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        eta = (now - self._t0) / frac * (1 - frac) if 0 < frac < 1 else 0.0
        line = f"\r{phase:<13}[{bar}] {done}/{total} ETA {eta:4.0f}s {message[:40]:<40}"
        self.stream.write(line)
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def format_summary(result: RunResult) -> str:
    """Return the human-readable end-of-run summary."""
    rep = result.report
    lines = [
        f"ZeMosaic {rep['version']}: mosaic done in {result.elapsed_s:.1f} s",
        f"  frames used:    {len(rep['frames_used'])}",
        f"  frames skipped: {len(rep['frames_skipped'])}",
    ]
    for s in rep["frames_skipped"]:
        lines.append(f"    - {os.path.basename(s['path'])}: {s['reason']}")
    lines.append(f"  master tiles:   {len(rep['tiles'])}")
    lines.append(f"  size:           {rep['mosaic_shape'][2]} x {rep['mosaic_shape'][1]} px, "
                 f"{rep['mosaic_shape'][0]} channel(s), assembly on {rep['backends'].get('assembly')}")
    for key in ("mosaic", "preview", "report"):
        lines.append(f"  {key + ':':<15} {result.paths[key]}")
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in rep["timings_s"].items() if k != "total")
    lines.append(f"  timings:        {phases}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command line: ``python -m zemosaic_worker CONFIG.json [--log-level LEVEL]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m zemosaic_worker",
                                     description="Build a mosaic from plate-solved frames.")
    parser.add_argument("config", help="JSON configuration file (input_folder, output_folder, ...)")
    parser.add_argument("--log-level", choices=["ERROR", "WARNING", "INFO", "DEBUG"], type=str.upper,
                        help="log level (default: logging_level from the configuration)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level or "INFO", format="%(levelname)s %(name)s: %(message)s")
    debug = args.log_level == "DEBUG"
    try:
        config = load_config(args.config)
        level = args.log_level or config.logging_level
        logging.getLogger().setLevel(level)
        debug = level == "DEBUG"
        result = run_mosaic(config, progress=_TerminalProgress())
    except (ConfigError, PipelineError) as exc:
        _report_failure(exc, debug)
        return 2 if isinstance(exc, ConfigError) else 1
    except Cancelled:
        print("zemosaic: cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nzemosaic: interrupted; no mosaic written", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: one line unless debugging
        _report_failure(exc, debug, unexpected=True)
        return 1
    print(format_summary(result))
    return 0


def _report_failure(exc, debug, unexpected=False):
    """Print a one-line failure reason; the traceback only at DEBUG."""
    if debug:
        logger.exception("run failed")
    kind = f"{type(exc).__name__}: " if unexpected else ""
    print(f"zemosaic: error: {kind}{exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
