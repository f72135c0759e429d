"""Phase 3 for one group of frames: a master tile, as a task any executor can run.

:func:`build_master_tile` loads a group's frames, measures each once (stars, quality, noise),
chooses the reference by quality, aligns the frames onto its canvas, measuring each as it
lands there (:class:`AlignedMeasures`), screens them, and normalises, weights, rejects and
combines them (:mod:`zemosaic_align_stack`), on the CPU or the
GPU; it writes ``master_tiles/master_tile_NNN.fits``. The worker (:mod:`zemosaic_worker`) runs the
tasks, keeps the manifest and reuses finished tiles.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

import zemosaic_align_stack as stk
import zemosaic_background as zbg
import zemosaic_drizzle as zdriz
import zemosaic_executor as zexec
import zemosaic_fits as zfits
import zemosaic_photometry as zph
import zemosaic_quality as zq
from zemosaic_config import MosaicConfig, config_to_dict
from zemosaic_utils import GpuBackendError, pixels_reached
from zemosaic_version import __version__

logger = logging.getLogger(__name__)

#: The output folder's cache (plate solutions, disk-backed stacks), and the stacks' folder in it.
CACHE_DIR = ".zemosaic_cache"
STACK_CACHE_DIR = "stacks"


@dataclass
class TileTask:
    """Everything one master tile needs, picklable: a task for any executor (:mod:`zemosaic_executor`).

    ``ram_share``: how many tile tasks may run at once on one machine (they share its RAM budget);
    ``threads``: the cores the task may use (frames aligned, chunks stacked at once).
    Workers read the frames and write the tile through these paths.
    """

    index: int
    records: list
    config: MosaicConfig
    tiles_dir: str
    use_gpu: bool
    ram_share: int = 1
    threads: int = 1

    @property
    def label(self) -> str:
        return f"tile {self.index:03d}"

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.config.output_folder, CACHE_DIR, STACK_CACHE_DIR)


@dataclass
class MasterTile:
    """A stacked group: image ``(H, W, C)``, coverage (frames per pixel), WCS, and how it was stacked.

    ``wcs``: the tile's WCS. A tile task sends it back as the CD header text its file holds
    (it crosses processes unchanged); the caller turns it into the WCS, the one a resumed run
    reads from the file, so both give the same mosaic. ``frame_photometry``: per stacked frame,
    the gains, offsets, weights and noise it was stacked with and its quality
    (:func:`_frame_photometry`), for the run report; ``reference_reason``: why its reference was
    chosen; ``saturated``: ``(H, W)`` bool, the pixels saturated in at least half the frames
    that cover them (:func:`saturated_in_tile`), or None when no frame had a saturation level.
    """

    index: int
    image: np.ndarray
    coverage: np.ndarray
    wcs: object
    path: str
    frames: list
    reference: str
    backend: str
    frame_photometry: list = field(default_factory=list)
    reference_reason: str = ""
    saturated: np.ndarray | None = None


@dataclass
class TileResult:
    """What a tile task returns: its tile (None when no frame could be used, its WCS as header
    text) and the frames it skipped (``{"path", "reason"}``), for the caller's report."""

    tile: MasterTile | None
    skipped: list


def tile_name(index: int) -> str:
    """Return the file name of master tile ``index``."""
    return f"master_tile_{index:03d}.fits"


@dataclass(frozen=True)
class FrameMeasures:
    """What is measured once on a frame as loaded (before resampling): its stars
    (:func:`zemosaic_align_stack.alignment_stars`), its quality (:mod:`zemosaic_quality`), its
    ``(C,)`` noise (:func:`zemosaic_align_stack.image_noise_sigmas`) and its saturated pixels
    ``(ys, xs)`` (:func:`zemosaic_fits.saturated_pixels`) at its raw ``saturation`` level (both
    None when it has no saturation level)."""

    stars: np.ndarray
    quality: zq.FrameQuality
    noise: np.ndarray
    saturated: tuple | None = None
    saturation: float | None = None


def measure_frame(data, saturated=None, saturation=None) -> FrameMeasures:
    """Return the :class:`FrameMeasures` of a loaded ``(H, W, C)`` frame (``saturated``: its ``(H, W)``
    mask at the raw level ``saturation``)."""
    stars = stk.alignment_stars(data)
    points = None if saturated is None else tuple(a.astype(np.int32) for a in np.nonzero(saturated))
    return FrameMeasures(stars, zq.frame_quality(data, stars), stk.image_noise_sigmas(data), points,
                         saturation)


def _load_measured(rec, config, mosaics: dict | None = None, key=None):
    """Return ``(debayered data, FrameMeasures)`` of a group's frame.

    With ``mosaics`` (Bayer drizzle) the frame's raw mosaic and pattern go into ``mosaics[key]``
    (``(None, None)`` for a frame without one). Raises :class:`zemosaic_fits.FrameError` when the
    frame cannot be used.
    """
    frame = zfits.load_frame(rec.path, hot_pixels=config.correct_hot_pixels, wcs=rec.wcs,
                             saturation_override=config.saturation_level, keep_cfa=mosaics is not None)
    if mosaics is not None:
        mosaics[key] = (frame.cfa, frame.bayer_pattern)
    return frame.data, measure_frame(frame.data, frame.saturated, frame.saturation)


def _measuring_loader(rec, config, measures: dict, key, loaded: dict, mosaics: dict | None):
    """Return a loader of ``rec`` that puts its :class:`FrameMeasures` in ``measures[key]``.

    A frame already in ``loaded`` (and measured) is handed over from there instead of read again.
    """
    def load():
        if key in loaded:
            return loaded.pop(key)
        data, measures[key] = _load_measured(rec, config, mosaics, key)
        return data
    return load


def _drizzle_resampler(config, mosaics: dict, order: list, weights):
    """Return ``resample(k)`` for :func:`zemosaic_align_stack.align_images_in_group` under Bayer
    drizzle: frame ``k`` (record ``order[k]``) drizzled from its raw mosaic, which it releases,
    its pixel weights (:func:`zemosaic_drizzle.pixel_weights`) written into ``weights[k]``."""
    scale = config.drizzle_scale
    pixfrac = config.drizzle_pixfrac or zdriz.default_pixfrac(scale)

    def resample(k):
        def keep(found):
            weights[k] = found
        return zdriz.bayer_resampler(*mosaics.pop(order[k]), scale, pixfrac, config.drizzle_kernel, keep)
    return resample


def _reference_candidates(records, config, ctx, skipped, measures: dict, loaded: dict, mosaics=None):
    """Load and measure the frames nearest the group centre; returns ``(candidates, unloadable)``.

    ``candidates``: the indices of up to :data:`zemosaic_quality.REFERENCE_CANDIDATES` of them that
    loaded, nearest first, their data left in ``loaded`` for the alignment; ``unloadable``: those
    that failed to load on the way, appended to ``skipped`` with the reason.
    """
    candidates, unloadable = [], set()
    for i in zq.centre_order([r.ra for r in records], [r.dec for r in records]):
        if len(candidates) == zq.REFERENCE_CANDIDATES:
            break
        ctx.check_cancel()
        try:
            loaded[i], measures[i] = _load_measured(records[i], config, mosaics, i)
        except zfits.FrameError as exc:
            skipped.append({"path": records[i].path, "reason": str(exc)})
            unloadable.add(i)
            continue
        candidates.append(i)
    return candidates, unloadable


def _screened_positions(group, measures: list, config) -> dict:
    """Return ``{position: reason}`` of the aligned frames of ``group`` that screening leaves out.

    Frames are compared within their observing session (:func:`zemosaic_quality.observing_sessions`:
    a night's sky and an exposure's star light are not another's); the reference, in position 0,
    is the tile's grid and stays.
    """
    sessions = zq.observing_sessions([r.info.date_obs for r in group], [r.info.exptime for r in group])
    screened = {}
    for session in sessions:
        found = zq.screen_frames([measures[p].quality for p in session], config)
        screened.update({session[k]: reason for k, reason in found.items() if session[k] != 0})
    return screened


class AlignedMeasures:
    """What the stacking needs of each aligned frame besides its pixels, measured as it lands on the canvas.

    Called by :func:`zemosaic_align_stack.align_images_in_group` in its aligning threads
    (``measure``), the reference first: the normalisation's measure against the reference
    (:class:`zemosaic_photometry.FrameNormaliser`), the sky's block means
    (:func:`zemosaic_background.frame_block_levels`) and the noise of the aligned samples
    (:func:`zemosaic_align_stack.image_noise_sigmas`), each on a frame still in memory. So the
    stacking reads the stack only for its own two passes: a disk-cached stack of hundreds of
    frames, which the page cache cannot hold, was read five times. A Bayer-drizzled frame at
    ``scale`` > 1 is normalised and its sky measured on its own grid
    (:func:`zemosaic_drizzle.measurement_frame`); its noise is that of the finer grid's samples.
    Measures are kept by alignment position; :meth:`normalisation`, :meth:`sky_blocks` and
    :meth:`noise` take the positions of the frames stacked, in stack order.
    """

    def __init__(self, method: str, scale: int):
        self.method, self.scale = method, scale
        self.normaliser, self.block_px = None, None
        self.found, self.blocks, self.sigmas = {}, {}, {}

    def __call__(self, position: int, frame) -> None:
        # Kept for the reference only, without a copy: it is the stack's first frame, whose slot
        # packing never reuses (a frame is moved only to a slot after the reference's).
        measured = frame if self.scale == 1 else zdriz.measurement_frame(frame, self.scale)
        if position == 0:  # the reference: its canvas is the tile's, and each frame is measured against it
            self.block_px = zbg.block_px_for(measured.shape[:2])
            self.normaliser = zph.FrameNormaliser(measured, self.method)
        else:
            self.found[position] = self.normaliser.measure(measured)
        self.blocks[position] = zbg.frame_block_levels(measured, self.block_px)
        self.sigmas[position] = stk.image_noise_sigmas(frame)

    def normalisation(self, positions: list):
        """Return the ``(gains, offsets)`` of the frames at ``positions`` (the reference first)."""
        return self.normaliser.coefficients([self.found.get(p) for p in positions], 0)

    def done(self) -> None:
        """Let the reference frame go: every frame is aligned and measured."""
        self.normaliser.release()

    def sky_blocks(self, positions: list, gains, origin=(0, 0)) -> zbg.BlockLevels:
        """Return the sky's :class:`zemosaic_background.BlockLevels` of the frames at ``positions`` times
        ``gains``, their centres from ``origin`` (where a cut canvas starts on the measured one)."""
        return zbg.block_levels([self.blocks[p] for p in positions], gains, self.block_px, origin)

    def noise(self, positions: list, gains) -> np.ndarray:
        """Return the ``(N, C)`` noise of the aligned frames at ``positions`` once normalised by ``gains``
        (:func:`zemosaic_align_stack.frame_noise_sigmas` without reading the stack)."""
        return stk.filled_noise_sigmas(np.array([self.sigmas[p] for p in positions]) * gains)


@dataclass
class AlignedGroup:
    """A group's frames on the tile's canvas, from :func:`_load_and_align_group`.

    ``stack`` ``(N, H, W, C)`` (in RAM or on disk) and ``pixel_weights`` (Bayer drizzle, else
    None); ``used`` the records stacked and ``measures`` their :class:`FrameMeasures`, in stack
    order; ``aligned`` their :class:`AlignedMeasures`, ``positions`` where each was in it, and
    ``origin`` where the stack's canvas starts on the one they were measured on (a canvas cut
    to the frames stacked); ``reference_reason`` why the reference was chosen.
    """

    stack: object
    pixel_weights: object
    used: list
    tile_wcs: object
    measures: list
    reference_reason: str
    aligned: AlignedMeasures | None = None
    positions: list = field(default_factory=list)
    origin: tuple = (0, 0)


def _pack_frames(stacks, keep: list) -> None:
    """Move the frames at positions ``keep`` (ascending) to the front of each of ``stacks`` (None: none), in order."""
    for stack in stacks:
        for new, old in enumerate(keep):
            if stack is not None and new != old:
                stack[new] = stack[old]


def _aligned_stacks(n: int, shape, task: TileTask, drizzled: bool):
    """Return ``(stack, pixel weights)`` for ``n`` aligned frames of ``shape`` ``(H, W, C)``.

    Under Bayer drizzle the weights (:func:`zemosaic_drizzle.pixel_weights`) are a second stack of
    the same shape, in :data:`zemosaic_drizzle.WEIGHT_DTYPE`, in RAM or on disk with the frames
    (:func:`zemosaic_executor.allocate_stacks`: the RAM budget counts both). Without it, the
    weights are None.
    """
    layouts = [((n,) + tuple(shape), np.float32)] + ([((n,) + tuple(shape), zdriz.WEIGHT_DTYPE)] if drizzled else [])
    stacks = zexec.allocate_stacks(layouts, task.cache_dir, task.ram_share)
    return stacks[0], stacks[1] if drizzled else None


def _release_stacks(*stacks) -> None:
    """Release the files behind disk-backed stacks (None: nothing)."""
    for stack in stacks:
        if stack is not None:
            zexec.release_stack(stack)


def _load_and_align_group(task: TileTask, ctx, skipped: list):
    """Load, measure, screen and align a group's frames.

    Returns an :class:`AlignedGroup` (the weights None unless Bayer-drizzled: :func:`_aligned_stacks`). The
    reference is chosen by quality among the frames nearest the group centre
    (:func:`zemosaic_quality.choose_reference`: no trail, most stars, sharpest) and sits in slot
    0; the others are loaded, measured and aligned onto its canvas by
    :func:`zemosaic_align_stack.align_images_in_group`, ``task.threads`` at a time, into a
    preallocated (possibly disk-backed) stack, their stars found once for both. Frames that fail
    to load or align, or that screening leaves out (:func:`_screened_positions`), are appended to
    ``skipped`` with their reason. Each frame is measured for the stacking as it is aligned
    (:class:`AlignedMeasures`).
    """
    records, config = task.records, task.config
    measures, loaded = {}, {}
    # Bayer drizzle: the raw mosaics, from loading to resampling; the tile grid is finer.
    mosaics = {} if config.stacking_cfa_method == "bayer_drizzle" else None
    scale = zdriz.grid_scale(config)
    candidates, unloadable = _reference_candidates(records, config, ctx, skipped, measures, loaded, mosaics)
    if not candidates:
        return AlignedGroup(None, None, [], None, [], "")
    ref_i, reason = zq.choose_reference({i: measures[i].quality for i in candidates}, candidates,
                                        names=[os.path.basename(r.path) for r in records])
    logger.debug("%s: reference %s", task.label, reason)
    order = [ref_i] + [i for i in range(len(records)) if i != ref_i and i not in unloadable]
    group = [records[i] for i in order]
    reference = loaded.pop(ref_i)
    shape_ref = reference.shape[:2]
    # Sized by every frame of the group: their pixels are not read yet.
    canvas = stk.group_canvas(group[0].wcs, shape_ref, [(r.wcs, r.info.shape_hw) for r in records])
    stack, weights = _aligned_stacks(len(group), (scale * canvas.shape[0], scale * canvas.shape[1])
                                     + reference.shape[2:], task, mosaics is not None)
    packed = [0]  # frames aligned so far: the slot of the next one in the stack
    aligned_measures = AlignedMeasures(config.stacking_normalize_method, scale)

    def on_frame(k, ok):
        ctx.check_cancel()
        if ok:
            if weights is not None and packed[0] != k:  # its weights follow its frame's slot
                weights[packed[0]] = weights[k]
            packed[0] += 1
            ctx.advance("master_tiles", len(unloadable) + k + 1, len(records),
                        f"{task.label}: aligned {os.path.basename(group[k].path)}")

    try:
        aligned, failed = stk.align_images_in_group(
            [reference] + [_measuring_loader(records[i], config, measures, i, loaded, mosaics) for i in order[1:]],
            0, [r.wcs for r in group], config.align_method, canvas=canvas, out=stack,
            reference_stars=measures[ref_i].stars, threads=task.threads, on_frame=on_frame,
            skip=(zfits.FrameError,), stars_of=lambda k: measures[order[k]].stars,
            resample=None if mosaics is None else _drizzle_resampler(config, mosaics, order, weights),
            measure=aligned_measures)
    except BaseException:  # a cancel or an error: a disk-backed stack's file goes with it
        _release_stacks(stack, weights)
        raise
    aligned_measures.done()
    skipped += [{"path": group[k].path, "reason": why} for k, why in failed]
    ok = [k for k, frame in enumerate(aligned) if frame is not None]
    used, used_measures = [group[k] for k in ok], [measures[order[k]] for k in ok]
    screened = _screened_positions(used, used_measures, config)
    if screened:
        skipped += [{"path": used[p].path, "reason": f"screened out: {why}"} for p, why in screened.items()]
        keep = [p for p in range(len(used)) if p not in screened]
        _pack_frames((stack, weights), keep)
        used, used_measures, ok = [used[p] for p in keep], [used_measures[p] for p in keep], [ok[p] for p in keep]
    origin = (0, 0)
    if len(used) < len(records):
        footprints = [(r.wcs, r.info.shape_hw) for r in used]
        if weights is not None:
            weights = stk.crop_canvas(weights, canvas, group[0].wcs, shape_ref, footprints, scale)[0]
        cut_from = canvas
        stack, canvas = stk.crop_canvas(stack, canvas, group[0].wcs, shape_ref, footprints, scale)
        origin = (cut_from.offset[0] - canvas.offset[0], cut_from.offset[1] - canvas.offset[1])
    tile_wcs = canvas.wcs if mosaics is None else zdriz.output_canvas(canvas, scale).wcs
    return AlignedGroup(stack, weights, used, tile_wcs, used_measures, reason, aligned_measures, ok, origin)


def _photometric_reference(gains, offsets):
    """Return coefficients rescaled to the level of the most transparent frame of the group.

    Normalisation maps every frame onto the geometric reference; clouds and haze only dim a frame,
    so the frame needing the smallest gain is the clearest and its level is the best estimate of
    the true flux. The rescale is one number for all channels (haze is grey): per-channel noise in
    that one frame's gains must not tint the tile.
    """
    scale = float(np.min(np.mean(gains, axis=1)))
    return gains / scale, offsets / scale


def _frame_photometry(used, gains, offsets, weights, backgrounds, measures) -> list:
    """Return, per stacked frame, ``{"path", "gain_rgb", "offset_rgb", "weight_rgb", "noise_rgb",
    "quality"}`` and, with background models, ``"background"`` (its coefficients per channel)
    (JSON-able; ``offset_rgb``: what was added at the canvas centre; ``noise_rgb``: its noise
    sigma in ADU as loaded; ``quality``: its :class:`zemosaic_quality.FrameQuality`)."""
    n, n_ch = gains.shape
    weights = np.ones((n, n_ch)) if weights is None else weights
    if backgrounds is not None:
        offsets = offsets - backgrounds.centre_values()
    rows = [{"path": r.path, "gain_rgb": [round(float(v), 6) for v in g],
             "offset_rgb": [round(float(v), 3) for v in o], "weight_rgb": [round(float(v), 6) for v in w],
             "noise_rgb": [round(float(v), 3) for v in m.noise], "quality": m.quality.to_dict()}
            for r, g, o, w, m in zip(used, gains, offsets, weights, measures)]
    if backgrounds is not None:
        for row, coefficients in zip(rows, backgrounds.coefficients):
            row["background"] = np.round(coefficients, 3).tolist()
    return rows


def _stack_group(group: AlignedGroup, config, use_gpu, tile_label, threads=1, check_cancel=lambda: None, scale=1):
    """Normalise, weight, reject and combine an aligned group's stack, ``threads`` chunks at once.

    The coefficients come from what was measured on each frame as it was aligned
    (:class:`AlignedMeasures`); the stack itself is read by the rejection and the combine only.
    The frames' noise as loaded (:class:`FrameMeasures`, before resampling) sets the weights, so
    that frames of equal noise weigh the same whatever their sub-pixel shifts (resampling lowers a
    frame's pixel noise by up to 2x, and the reference is not resampled). The rejection's floor is
    the spread of the aligned samples. Returns ``(image, coverage, backend, (gains, offsets,
    weights, backgrounds))``, the coefficients per frame (``backgrounds``:
    :class:`zemosaic_background.BackgroundModels` on the canvas, or None without normalisation).
    ``check_cancel()`` runs before every read of the stack (:class:`zemosaic_executor.CheckedStack`):
    a cancelled tile stops at its next block of rows, within a second. ``scale`` > 1: a
    Bayer-drizzled stack on a finer grid, whose gains and sky models were measured on each frame's
    own grid.
    """
    n, aligned, positions = len(group.used), group.aligned, group.positions
    noise = np.array([m.noise for m in group.measures])
    view = zexec.CheckedStack(group.stack[:n], check_cancel)
    pixel_weights = group.pixel_weights
    if pixel_weights is not None:
        pixel_weights = zexec.CheckedStack(pixel_weights[:n], check_cancel)
    gains, offsets = aligned.normalisation(positions)
    if config.stacking_normalize_method == "linear_fit":
        gains, offsets = _photometric_reference(gains, offsets)
    backgrounds = None
    if config.stacking_normalize_method != "none":
        # The sky of each frame is matched by its background model, solved from the differences
        # of all the frames (offsets to one reference frame would carry its gradient into all).
        shape = (-(-view.shape[1] // scale), -(-view.shape[2] // scale))
        backgrounds = zbg.solve_models(aligned.sky_blocks(positions, gains, group.origin),
                                       config.background_model_order, shape, threads)
        if scale > 1:
            backgrounds = backgrounds.on_finer_grid(scale)
        offsets = np.zeros_like(offsets)
    sigmas = aligned.noise(positions, gains)
    weights = None
    if config.stacking_weighting_method == "noise_variance":
        weights = stk.noise_variance_weights(view, gains, sigmas=stk.filled_noise_sigmas(noise * gains))
    params = stk.StackParams(config.stacking_rejection_algorithm, config.stacking_kappa_low,
                             config.stacking_kappa_high, tuple(config.stacking_winsor_limits),
                             config.stacking_final_combine_method,
                             config.stacking_kappa_max_iterations,
                             zdriz.SIGNAL_SPREAD if config.stacking_cfa_method == "bayer_drizzle" else None)
    if use_gpu:
        from zemosaic_align_stack_gpu import stack_in_chunks_gpu

        try:
            image, coverage = stack_in_chunks_gpu(view, gains, offsets, weights, params, noise_sigmas=sigmas,
                                                  backgrounds=backgrounds, pixel_weights=pixel_weights)
            return image, coverage, "gpu", (gains, offsets, weights, backgrounds)
        except GpuBackendError as exc:
            logger.warning("%s: GPU stacking failed (%s); stacking this tile on CPU", tile_label, exc)
    image, coverage = _stack_on_cpu(view, gains, offsets, weights, params, sigmas, threads, backgrounds,
                                    pixel_weights)
    return image, coverage, "cpu", (gains, offsets, weights, backgrounds)


def _stack_on_cpu(stack, gains, offsets, weights, p, sigmas, threads, backgrounds, pixel_weights=None):
    """Return ``(image, coverage)``; winsorized rejection, the default, goes through its front door."""
    if p.rejection != "winsorized_sigma_clip":
        return stk.stack_in_chunks(stack, gains, offsets, weights, p, noise_sigmas=sigmas, threads=threads,
                                   backgrounds=backgrounds, pixel_weights=pixel_weights)
    return stk.stack_winsorized_sigma_clip(stack, weights, p.kappa_low, p.kappa_high, p.winsor_limits,
                                           p.combine, max_iterations=p.max_iterations, gains=gains,
                                           offsets=offsets, noise_sigmas=sigmas, threads=threads,
                                           backgrounds=backgrounds, pixel_weights=pixel_weights,
                                           signal_spread=p.signal_spread)


#: Share of a Bayer-drizzled tile's footprint that may lack some colour before the run warns.
_DRIZZLE_GAP_WARNING = 0.01


def _warn_of_colour_gaps(label: str, image, n_frames: int, scale: int) -> float:
    """Warn when a Bayer-drizzled tile has pixels no frame gave a sample of some colour; returns their share.

    Each frame drops its red and blue samples on a quarter of the finer grid's pixels at scale 2
    (about 37 % with dithers and field rotation): a few frames leave holes, which stay no data
    (nothing is interpolated), and the mosaic shows them as such.
    """
    footprint = np.any(np.isfinite(image), axis=2)
    gaps = footprint & ~np.all(np.isfinite(image), axis=2)
    share = float(gaps.sum() / max(1, footprint.sum()))
    if share > _DRIZZLE_GAP_WARNING:
        logger.warning("%s: Bayer drizzle left %.1f %% of the tile without a sample of some colour "
                       "(%d frame(s) at drizzle_scale %d); those pixels are no data: more frames%s "
                       "fill them", label, 100 * share, n_frames, scale, " or drizzle_scale 1" if scale > 1 else "")
    return share


def saturated_in_tile(used, measures, tile_wcs, coverage) -> np.ndarray | None:
    """Return the ``(H, W)`` bool pixels of a tile saturated in at least half the frames covering them.

    Each frame's saturated pixels (flagged as it was loaded) are carried onto the tile through
    the frame's and the tile's WCSs (:func:`zemosaic_utils.pixels_reached`: a pixel or two of
    plate-solution error is within the four pixels each one reaches). Half, because a star that
    clipped in a few sharp frames only is stacked from the others, which did not; ``coverage``
    counts the frames at each pixel. None when no frame had a saturation level.
    """
    if all(m.saturated is None for m in measures):
        return None
    count = np.zeros(coverage.shape, np.uint16)
    flat = count.reshape(-1)
    for rec, m in zip(used, measures):
        if m.saturated is not None and rec.wcs is not None:
            flat[pixels_reached(*m.saturated, rec.wcs, tile_wcs, coverage.shape)] += 1
    return (count > 0) & (2 * count >= coverage)


def settings_history(config) -> list:
    """Return HISTORY cards naming the program version and every setting of the run."""
    lines = [f"ZeMosaic {__version__}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in config_to_dict(config).items()]
    return [("HISTORY", zfits.card_text(line, 72)) for line in lines]


def saturation_card(levels) -> list:
    """Return the ``SATURATE`` card of the lowest raw saturation level among ``levels`` (None: unknown), or none."""
    known = [float(v) for v in levels if v is not None]
    return [("SATURATE", round(min(known), 3), "[adu] raw saturation level; mask: SATURATED")] \
        if known else []


def _tile_header_cards(config, used, reference, backend, measures) -> list:
    """Return the provenance cards written into a master tile."""
    return [
        ("ZMVERS", __version__, "ZeMosaic version"),
        ("NFRAMES", len(used), "frames stacked"),
        ("BUNIT", "adu", "linear, sensor units after normalisation"),
        *zfits.observation_cards([r.info.header for r in used]),
        ("REFFRAME", zfits.card_text(os.path.basename(reference)), None),
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
        *saturation_card(m.saturation for m in measures),
        *settings_history(config),
    ]


def build_master_tile(task: TileTask, ctx) -> TileResult:
    """Phase 3 for one group, a tile task: align, stack and write ``master_tile_NNN.fits``.

    ``ctx`` gives progress and cancellation (the :class:`Run` in this process, a
    :class:`zemosaic_executor.WorkerContext` elsewhere). Frames that cannot be used are listed in
    the result, for the caller's report.
    """
    config, label = task.config, task.label
    skipped: list = []
    logger.debug("MT_COVERAGE: propagate_mask=True (%s, %d frames)", label, len(task.records))
    group = _load_and_align_group(task, ctx, skipped)
    used, tile_wcs, measures = group.used, group.tile_wcs, group.measures
    if not used:
        return TileResult(None, skipped)
    scale = zdriz.grid_scale(config)
    try:
        image, coverage, backend, coefficients = _stack_group(group, config, task.use_gpu, label, task.threads,
                                                             ctx.check_cancel, scale)
    finally:
        _release_stacks(group.stack, group.pixel_weights)
    if config.stacking_cfa_method == "bayer_drizzle":
        _warn_of_colour_gaps(label, image, len(used), scale)
    saturated = saturated_in_tile(used, measures, tile_wcs, coverage)
    zfits.write_image_fits(os.path.join(task.tiles_dir, tile_name(task.index)), image, tile_wcs,
                           coverage=coverage, saturated=saturated,
                           header_cards=_tile_header_cards(config, used, used[0].path, backend, measures))
    logger.info("%s: %d frame(s) stacked (%s, %s)", label, len(used),
                config.stacking_rejection_algorithm, backend)
    # The tile is used with the WCS its file holds, as a resumed run reads it: same mosaic.
    return TileResult(MasterTile(task.index, image, coverage, zfits.wcs_to_cd_header(tile_wcs).tostring(),
                                 os.path.join(task.tiles_dir, tile_name(task.index)), [r.path for r in used],
                                 used[0].path, backend, _frame_photometry(used, *coefficients, measures),
                                 group.reference_reason, saturated), skipped)
