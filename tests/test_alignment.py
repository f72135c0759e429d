"""Alignment: astroalign conventions, NaN footprints, WCS fallback, canvas, and the worker's tile step."""

import logging
import threading

import numpy as np
import pytest

import zemosaic_align_stack as stk
from conftest import make_tan_wcs

SHAPE = (200, 160)


def _star_field(wcs, shape, seed=1, n=120, noise=3.0):
    """RGB frame of stars fixed on the sky (RA/Dec), rendered through ``wcs``."""
    rng = np.random.default_rng(seed)
    sky_rng = np.random.default_rng(99)  # same stars for every frame
    ra = 10.0 + sky_rng.uniform(-0.09, 0.09, n)
    dec = 20.0 + sky_rng.uniform(-0.09, 0.09, n)
    flux = 10 ** sky_rng.uniform(2.5, 4.5, n)
    x, y = wcs.world_to_pixel_values(ra, dec)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.full(shape, 100.0)
    for xi, yi, f in zip(x, y, flux):
        if -5 < xi < shape[1] + 5 and -5 < yi < shape[0] + 5:
            img += f * np.exp(-((xx - xi) ** 2 + (yy - yi) ** 2) / (2 * 1.2**2))
    img = img + rng.normal(0, noise, shape)
    return np.stack([img, 0.8 * img, 0.6 * img], axis=-1).astype(np.float32)


def test_astroalign_footprint_polarity_is_true_where_no_data():
    """Pin astroalign's convention: its footprint is True where there is NO data (our NaN)."""
    import astroalign

    ref_wcs = make_tan_wcs(10.0, 20.0, SHAPE)
    src_wcs = make_tan_wcs(10.0, 20.0, SHAPE, rotation_deg=8.0)
    ref, src = _star_field(ref_wcs, SHAPE)[..., 1], _star_field(src_wcs, SHAPE, seed=2)[..., 1]
    _registered, footprint = astroalign.register(src, ref, propagate_mask=True)
    assert footprint.dtype == bool
    assert not footprint[SHAPE[0] // 2, SHAPE[1] // 2]  # centre: data
    assert footprint[0, 0] and footprint[-1, -1]  # rotated corners: no data


def test_align_frame_nan_outside_footprint_matches_astroalign():
    import astroalign

    ref_wcs = make_tan_wcs(10.0, 20.0, SHAPE)
    src_wcs = make_tan_wcs(10.002, 20.003, SHAPE, rotation_deg=8.0)
    ref, src = _star_field(ref_wcs, SHAPE), _star_field(src_wcs, SHAPE, seed=2)
    aligned = stk.align_frame(src, ref, "astroalign")
    assert aligned.dtype == np.float32 and aligned.shape == ref.shape
    _reg, footprint = astroalign.register(src[..., 1], ref[..., 1], propagate_mask=True)
    ours = np.isnan(aligned[..., 1])
    assert np.all(np.isnan(aligned).any(axis=-1) == np.isnan(aligned).all(axis=-1))
    # Same footprint up to the one-pixel edge band where interpolation conventions differ.
    assert np.mean(ours != footprint) < 0.02
    interior = ~ours
    resid = aligned[interior] - ref[interior]
    assert np.median(np.abs(resid)) < 3 * 3.0  # noise level: stars line up


def test_wcs_method_agrees_with_star_matching():
    ref_wcs = make_tan_wcs(10.0, 20.0, SHAPE)
    src_wcs = make_tan_wcs(10.003, 19.998, SHAPE, rotation_deg=5.0)
    ref, src = _star_field(ref_wcs, SHAPE), _star_field(src_wcs, SHAPE, seed=3)
    by_stars = stk.align_frame(src, ref, "astroalign")
    by_wcs = stk.align_frame(src, ref, "wcs", src_wcs, ref_wcs)
    both = np.isfinite(by_stars) & np.isfinite(by_wcs)
    assert both.mean() > 0.8
    bright = both & (ref > 400)
    assert np.median(np.abs(by_stars[bright] - by_wcs[bright]) / ref[bright]) < 0.05


def test_failed_frames_are_reported_not_raised():
    ref_wcs = make_tan_wcs(10.0, 20.0, SHAPE)
    ref = _star_field(ref_wcs, SHAPE)
    blank = np.random.default_rng(0).normal(100, 3, ref.shape).astype(np.float32)  # no stars
    aligned, failed = stk.align_images_in_group([ref, blank], 0)
    assert aligned[0] is not None and aligned[1] is None
    assert failed and failed[0][0] == 1 and "star matching failed" in failed[0][1]
    # With WCSs the same frame falls back to reprojection.
    aligned, failed = stk.align_images_in_group([ref, blank], 0, wcs_list=[ref_wcs, ref_wcs])
    assert not failed and aligned[1] is not None


class _Unreadable(Exception):
    """What the loader of a broken file raises in these tests (the worker's is a FrameError)."""


def _lazy_group(loaded):
    """Five frames, the reference at index 1: a loader whose file is broken (2), a frame without
    stars or WCS (3, cannot be aligned), and loaders that append their index to ``loaded``."""
    pointings = [(10.0, 20.0, 0.0), (10.002, 19.999, 3.0), None, None, (9.999, 20.002, -4.0)]
    wcs_list = [None if p is None else make_tan_wcs(p[0], p[1], SHAPE, rotation_deg=p[2]) for p in pointings]
    data = {i: _star_field(w, SHAPE, seed=10 + i) for i, w in enumerate(wcs_list) if w is not None}
    data[3] = np.random.default_rng(3).normal(100, 3, SHAPE + (3,)).astype(np.float32)

    def loader(i):
        def load():
            loaded.append(i)
            if i == 2:
                raise _Unreadable("truncated file")
            return data[i]
        return load

    canvas = stk.group_canvas(wcs_list[1], SHAPE, [(w, SHAPE) for w in wcs_list if w is not None])
    return [loader(i) for i in range(5)], wcs_list, canvas, data


def test_lazy_frames_in_threads_fill_the_same_stack_as_in_memory_frames():
    loaded = []
    loaders, wcs_list, canvas, data = _lazy_group(loaded)
    stacks, calls = [], []
    for threads in (1, 2):
        out = np.full((5,) + canvas.shape + (3,), -1.0, np.float32)
        aligned, failed = stk.align_images_in_group(
            loaders, 1, wcs_list, canvas=canvas, out=out, threads=threads, skip=(_Unreadable,),
            on_frame=lambda i, ok: calls.append((i, ok)))
        assert [i for i, _ in failed] == [2, 3] and failed[0][1] == "truncated file"
        assert "star matching failed" in failed[1][1]
        assert [a is None for a in aligned] == [False, False, True, True, False]
        # Packed in order into the first three slots (frames go straight into their own slot of
        # a stack in RAM, then move down past the failed ones: the slots after are scratch).
        assert [aligned[i] for i in (0, 1, 4)] == [0, 1, 2]
        assert np.all(out[3] == -1.0)  # frame 3 failed before its warp wrote anything
        oy, ox = canvas.offset
        assert np.array_equal(out[1, oy:oy + SHAPE[0], ox:ox + SHAPE[1]], data[1])
        assert 0.7 < np.isfinite(out[[0, 2]]).mean() < 1.0  # NaN outside each footprint
        stacks.append(out)
    assert calls == 2 * [(0, True), (1, True), (2, False), (3, False), (4, True)]
    assert sorted(loaded) == sorted(2 * [0, 1, 2, 3, 4])  # each frame loaded once per run
    assert stacks[0][:3].tobytes() == stacks[1][:3].tobytes()  # the same stack whatever the threads
    in_memory, failed = stk.align_images_in_group([data[0], data[1], data[4]], 1,
                                                  [wcs_list[i] for i in (0, 1, 4)], canvas=canvas)
    assert not failed
    assert np.stack(in_memory).tobytes() == stacks[0][:3].tobytes()


def test_an_exception_from_on_frame_stops_the_alignment():
    loaded = []
    loaders, wcs_list, canvas, _ = _lazy_group(loaded)

    class Cancelled(Exception):
        pass

    def cancel_after_the_first(i, ok):
        if i == 1:
            raise Cancelled("cancelled by user")

    with pytest.raises(Cancelled):
        stk.align_images_in_group(loaders, 1, wcs_list, canvas=canvas, skip=(_Unreadable,),
                                  on_frame=cancel_after_the_first)
    assert loaded == [1, 0]  # the reference, then frame 0; nothing after the cancellation


def test_group_canvas_holds_rotated_frames():
    ref_wcs = make_tan_wcs(10.0, 20.0, SHAPE)
    frames = [(make_tan_wcs(10.0, 20.0, SHAPE, rotation_deg=r), SHAPE) for r in (0.0, 6.0, -6.0)]
    canvas = stk.group_canvas(ref_wcs, SHAPE, frames)
    assert canvas.shape[0] > SHAPE[0] and canvas.shape[1] > SHAPE[1]
    for wcs, (h, w) in frames:
        x, y = canvas.wcs.world_to_pixel_values(*wcs.pixel_to_world_values([0, w - 1, 0, w - 1], [0, 0, h - 1, h - 1]))
        assert np.all((x >= -0.5) & (x <= canvas.shape[1] - 0.5) & (y >= -0.5) & (y <= canvas.shape[0] - 0.5))
    ref = _star_field(ref_wcs, SHAPE)
    placed = stk.place_reference(ref, canvas)
    oy, ox = canvas.offset
    assert np.array_equal(placed[oy:oy + SHAPE[0], ox:ox + SHAPE[1]], ref)
    assert np.isnan(placed[0, 0]).all()


def test_worker_logs_mt_coverage_and_falls_back_to_cpu(tmp_path, caplog, monkeypatch):
    import zemosaic_align_stack_gpu
    import zemosaic_synth
    import zemosaic_worker as zw
    from zemosaic_config import MosaicConfig
    from zemosaic_utils import GpuBackendError

    info = zemosaic_synth.generate_dataset(tmp_path / "d", panels=(1, 1), frames_per_panel=3, seed=4)
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / "o"))
    run = zw.Run(config)
    records = zw.scan_frames(run)

    def broken(*args, **kwargs):
        raise GpuBackendError("injected device error")

    monkeypatch.setattr(zemosaic_align_stack_gpu, "stack_in_chunks_gpu", broken)
    (tmp_path / "o" / "tiles").mkdir(parents=True)
    with caplog.at_level(logging.DEBUG, logger="zemosaic_master_tile"):
        tile = zw.build_master_tile(zw.TileTask(0, records, config, str(tmp_path / "o" / "tiles"),
                                                use_gpu=True), run).tile
    assert "MT_COVERAGE: propagate_mask=True" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stacking this tile on CPU" in warnings[0].getMessage()
    assert tile.backend == "cpu" and tile.coverage.max() == 3
    h, w = tile.image.shape[:2]
    assert np.isfinite(tile.image[h // 4:3 * h // 4, w // 4:3 * w // 4]).all()
    assert np.isfinite(tile.image).mean() > 270 * 480 / (h * w) - 0.02  # the canvas holds every frame


def test_disk_backed_stack_gives_the_same_tile(tmp_path, monkeypatch):
    import zemosaic_executor as zexec
    import zemosaic_synth
    import zemosaic_worker as zw
    from zemosaic_config import MosaicConfig

    info = zemosaic_synth.generate_dataset(tmp_path / "d", panels=(1, 1), frames_per_panel=3, seed=5)
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / "o"))
    run = zw.Run(config)
    records = zw.scan_frames(run)
    (tmp_path / "o").mkdir()
    in_ram = zw.build_master_tile(zw.TileTask(0, records, config, str(tmp_path / "o"), False),
                                  run).tile
    monkeypatch.setattr(zexec, "stack_ram_budget", lambda: 1024)
    on_disk = zw.build_master_tile(zw.TileTask(1, records, config, str(tmp_path / "o"), False),
                                   run).tile
    assert in_ram.image.tobytes() == on_disk.image.tobytes()
    assert in_ram.coverage.tobytes() == on_disk.coverage.tobytes()
    stacks = tmp_path / "o" / zw.CACHE_DIR / zw.STACK_CACHE_DIR
    assert stacks.exists() and not list(stacks.iterdir())
    # Cancelled after its first aligned frame, a tile leaves no stack file behind either.
    cancel = threading.Event()
    run = zw.Run(config, progress=lambda phase, done, total, message: cancel.set(), cancel=cancel)
    with pytest.raises(zw.Cancelled):
        zw.build_master_tile(zw.TileTask(2, records, config, str(tmp_path / "o"), False), run)
    assert not list(stacks.iterdir())


def test_warp_is_map_coordinates_for_all_channels_at_once():
    """One gather for every channel gives map_coordinates' values and exactly its NaN footprint."""
    import scipy.ndimage

    rng = np.random.default_rng(7)
    image = rng.normal(100.0, 10.0, (40, 56, 3)).astype(np.float32)
    image[rng.integers(0, 40, 25), rng.integers(0, 56, 25)] = np.nan  # isolated source NaN
    image[:, :2] = np.nan  # a NaN border, as an aligned frame has
    angle = np.radians(4.0)
    matrix = np.array([[np.cos(angle), -np.sin(angle), 2.3], [np.sin(angle), np.cos(angle), -3.7], [0, 0, 1]])
    y, x = stk.affine_source_coords(matrix, (48, 64))
    # Whole-pixel samples, on the last row and column among them: where the edge rules bite.
    y[:4], x[:, :4] = np.round(y[:4]), np.round(x[:, :4])
    y[10, 5:20], x[11, 5:20] = 39.0, 55.0
    ours = stk.warp_image(image, y, x, band_pixels=200)
    coords = np.stack([y, x])
    theirs = np.stack([scipy.ndimage.map_coordinates(image[..., c], coords, order=1, mode="constant",
                                                     cval=np.nan) for c in range(3)], axis=-1)
    assert ours.dtype == np.float32
    assert np.array_equal(np.isnan(ours), np.isnan(theirs))
    assert 0.1 < np.isnan(ours).mean() < 0.6
    ok = np.isfinite(theirs)
    assert np.max(np.abs(ours[ok] - theirs[ok]) / np.abs(theirs[ok])) < 1e-6


def test_affine_warp_makes_its_coordinates_band_by_band_with_the_same_bytes():
    rng = np.random.default_rng(8)
    image = rng.normal(100.0, 10.0, (40, 56, 3)).astype(np.float32)
    image[:, :3] = np.nan
    angle = np.radians(-2.5)
    matrix = np.array([[np.cos(angle), -np.sin(angle), 1.7], [np.sin(angle), np.cos(angle), -2.2], [0, 0, 1]])
    whole = stk.warp_image(image, *stk.affine_source_coords(matrix, (47, 61)))
    for band_pixels in (61, 200, 10_000):
        assert stk.warp_affine(image, matrix, (47, 61), band_pixels=band_pixels).tobytes() == whole.tobytes()


def test_star_match_is_a_repeatable_least_squares_fixed_point():
    """The refined match is the fit to the stars it matches, and RANSAC in front of it is seeded."""
    import zemosaic_astrometry as za

    rng = np.random.default_rng(8)
    ref = np.column_stack([rng.uniform(0, 1900, 150), rng.uniform(0, 1060, 150)])
    angle = np.radians(2.0)
    true = np.array([[np.cos(angle), -np.sin(angle), 12.0], [np.sin(angle), np.cos(angle), -7.5], [0, 0, 1]])
    frame = (ref - true[:2, 2]) @ np.linalg.inv(true[:2, :2]).T + rng.normal(0, 0.05, ref.shape)
    results = []
    for shift in (0.0, 0.4, -0.7):  # starting transforms off by up to 0.7 px, as RANSAC's draws may be
        start = true.copy()
        start[:2, 2] += shift
        results.append(za._refine_match(start, frame, ref)[0])
    assert all(np.array_equal(results[0], r) for r in results[1:])
    assert np.allclose(results[0], true, atol=0.02)
    for _ in range(3):
        assert np.array_equal(za.match_stars(frame, ref)[0], results[0])


def test_same_input_gives_the_same_master_tile_bit_for_bit(tmp_path):
    import zemosaic_synth
    import zemosaic_worker as zw
    from zemosaic_config import MosaicConfig

    info = zemosaic_synth.generate_dataset(tmp_path / "d", panels=(1, 1), frames_per_panel=4, seed=6)
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / "o"))
    run = zw.Run(config)
    report = run.report
    records = zw.scan_frames(run)
    (tmp_path / "o").mkdir()
    # The second aligns its frames and stacks its chunks three at a time, in threads: the same tile.
    tiles = [zw.build_master_tile(zw.TileTask(i, records, config, str(tmp_path / "o"), False,
                                              threads=1 + 2 * i), run)
             for i in range(2)]
    assert not report.frames_skipped and not tiles[0].skipped and not tiles[1].skipped
    assert tiles[0].tile.image.tobytes() == tiles[1].tile.image.tobytes()
    assert tiles[0].tile.coverage.tobytes() == tiles[1].tile.coverage.tobytes()
    assert tiles[0].tile.coverage.max() == 4


def test_a_guess_from_the_wcs_gives_the_triangle_match(monkeypatch):
    """A close guess skips the triangles and ends on the same fit, and so does one off by a dither
    (its shift found by the offsets' vote); one off by a rotation falls back to the triangles."""
    import zemosaic_astrometry as za

    rng = np.random.default_rng(9)
    ref = np.column_stack([rng.uniform(0, 1060, 120), rng.uniform(0, 1900, 120)])
    angle = np.radians(-3.0)
    true = np.array([[np.cos(angle), -np.sin(angle), -20.0], [np.sin(angle), np.cos(angle), 9.0], [0, 0, 1]])
    frame = (ref - true[:2, 2]) @ np.linalg.inv(true[:2, :2]).T + rng.normal(0, 0.05, ref.shape)
    by_triangles = stk.find_star_transform(frame, ref)
    close, dithered = true.copy(), true.copy()
    close[:2, 2] += 0.8
    dithered[:2, 2] += [40.0, -73.0]
    turn = np.radians(20.0)
    wrong = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]]) @ true
    calls = []
    triangle_match = za._triangle_match
    monkeypatch.setattr(za, "_triangle_match", lambda *a: calls.append(1) or triangle_match(*a))
    assert np.array_equal(stk.find_star_transform(frame, ref, close), by_triangles) and not calls
    assert np.array_equal(stk.find_star_transform(frame, ref, dithered), by_triangles) and not calls
    assert np.array_equal(stk.find_star_transform(frame, ref, wrong), by_triangles) and calls
