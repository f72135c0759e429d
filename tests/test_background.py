"""Background models solved from overlap differences, the feathered co-add and the final extraction.

The scenes here have a known truth: every image is one sky (a nebula, stars) plus its own
polynomial background plus noise; the models must return each background up to the one
polynomial the differences cannot see (the images' mean), never the sky.
"""

import numpy as np
import pytest

import zemosaic_background as zbg
import zemosaic_utils as zu
from conftest import make_tan_wcs

SHAPE = (600, 1000)
BLOCK = 20


def _sky(y, x):
    """A bright nebula (two blobs, one large) and a faint ridge: what must never read as background."""
    return (1000.0 + 400.0 * np.exp(-((x - 420) ** 2 + (y - 260) ** 2) / (2 * 150.0**2))
            + 250.0 * np.exp(-((x - 800) ** 2 + (y - 450) ** 2) / (2 * 60.0**2))
            + 80.0 * np.exp(-((y - 0.3 * x - 100) ** 2) / (2 * 25.0**2)))


def _scene(n, order, seed=0, footprints=True, noise=1.0):
    """Block levels of ``n`` images sharing one sky, each with its own random background of ``order``.

    Returns ``(BlockLevels, true models)``; each image covers a random part of the frame (a
    dithered, rotated field covers most of the canvas, not all of it).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SHAPE[0]:BLOCK, 0:SHAPE[1]:BLOCK].astype(float)
    y, x = (yy + (BLOCK - 1) / 2).ravel(), (xx + (BLOCK - 1) / 2).ravel()
    truth = zbg.BackgroundModels.zeros(n, 3, order, SHAPE)
    coefficients = rng.normal(0.0, 40.0, truth.coefficients.shape)
    truth = zbg.BackgroundModels(coefficients, order, truth.origin, truth.scale)
    levels = np.empty((y.size, n, 3))
    for i in range(n):
        levels[:, i] = _sky(y, x)[:, None] * np.array([1.0, 0.8, 0.6]) + truth.values(i, y, x)
        levels[:, i] += rng.normal(0.0, noise, (y.size, 3))
        if footprints:
            cut = rng.uniform(0, 300)
            levels[(x < cut) | (y > SHAPE[0] - cut / 3), i] = np.nan
    return zbg.BlockLevels(levels, y, x), truth


def _centred(models):
    return models.coefficients - models.coefficients.mean(axis=0)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_models_are_the_backgrounds_up_to_their_mean(order):
    blocks, truth = _scene(12, order)
    found = zbg.solve_models(blocks, order, SHAPE)
    assert found.coefficients.shape == truth.coefficients.shape
    expected = zbg.BackgroundModels(_centred(truth), order, truth.origin, truth.scale)
    error = np.stack([found.image(k, SHAPE) - expected.image(k, SHAPE) for k in range(12)])
    # Backgrounds of tens of ADU come back to a tenth of the blocks' 1 ADU noise; the worst is
    # at a corner where the image has no data, the quadric's terms extrapolated there.
    assert np.sqrt(np.mean(error**2)) < 0.15
    assert np.abs(error).max() < (0.6 if order < 2 else 1.5)
    assert np.abs(found.coefficients.mean(axis=0)).max() < 1e-6  # the gauge: models average zero


def test_a_trail_and_a_bright_blob_in_one_image_do_not_move_its_model():
    blocks, truth = _scene(10, 1, seed=3)
    y, x = blocks.y, blocks.x
    trail = np.abs(y - 0.5 * x - 50) < 15
    blocks.levels[trail, 4] += 800.0  # a satellite in image 4
    blocks.levels[(x - 300) ** 2 + (y - 300) ** 2 < 40**2, 7] += 300.0  # a halo in image 7
    found = zbg.solve_models(blocks, 1, SHAPE)
    assert np.abs(found.coefficients - _centred(truth)).max() < 0.3


def test_an_image_overlapping_nothing_keeps_a_zero_model():
    blocks, truth = _scene(5, 1, seed=5, footprints=False)
    blocks.levels[:, 2] = np.nan
    blocks.levels[blocks.x > 900, 2] = 1234.0  # only where no other image is
    for i in (0, 1, 3, 4):
        blocks.levels[blocks.x > 900, i] = np.nan
    found = zbg.solve_models(blocks, 1, SHAPE)
    assert np.all(found.coefficients[2] == 0.0)
    others = [0, 1, 3, 4]
    expected = truth.coefficients[others] - truth.coefficients[others].mean(axis=0)
    assert np.abs(found.coefficients[others] - expected).max() < 0.2


def test_rows_values_and_refit_in_another_frame_agree():
    _blocks, truth = _scene(3, 2, seed=1)
    rows = truth.rows(100, 140, 50, x0=300)
    yy, xx = np.mgrid[100:140, 300:350]
    np.testing.assert_allclose(rows[1], truth.values(1, yy, xx), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(truth.image(2, SHAPE)[7, 9], truth.values(2, 7, 9), rtol=1e-6)
    # The same model in a frame shifted by (20, -35) px and scaled by 1.01: exact for an affine map.
    y_there, x_there = np.meshgrid(np.linspace(0, 500, 9), np.linspace(0, 800, 9), indexing="ij")
    y_here, x_here = 1.01 * y_there + 20.0, 1.01 * x_there - 35.0
    moved = truth.in_frame(1, (520, 820), y_here.ravel(), x_here.ravel(), y_there.ravel(), x_there.ravel())
    np.testing.assert_allclose(moved.values(0, 250.0, 400.0), truth.values(1, 1.01 * 250 + 20, 1.01 * 400 - 35),
                               rtol=1e-9)
    np.testing.assert_allclose(truth.scaled([1.0, 2.0, 0.5]).values(1, 5, 5), 2.0 * truth.values(1, 5, 5))


def test_stack_block_levels_measure_whole_blocks_times_the_gains():
    rng = np.random.default_rng(2)
    stack = rng.normal(100.0, 1.0, (3, 64, 96, 3)).astype(np.float32)
    stack[1, :10] = np.nan  # half a block row without data
    levels = zbg.stack_block_levels(stack, np.array([[1.0] * 3, [2.0] * 3, [0.5] * 3]), 16)
    assert levels.levels.shape == (4 * 6, 3, 3)
    np.testing.assert_allclose(levels.levels[0, 0], stack[0, :16, :16].mean(axis=(0, 1)), rtol=1e-5)
    np.testing.assert_allclose(levels.levels[6, 1], 2.0 * stack[1, 16:32, :16].mean(axis=(0, 1)), rtol=1e-5)
    assert np.all(np.isnan(levels.levels[:6, 1]))  # partly covered blocks do not count
    assert levels.y[0] == 7.5 and levels.x[1] == 23.5


def test_frame_models_flatten_the_differences_of_an_aligned_stack():
    """Three frames of one nebula, each with its own gradient (as the field turns under a fixed
    horizon): after subtraction their differences are noise, and the nebula is untouched."""
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(float)
    sky = _sky(yy, xx)
    planes = [0.0 * xx, 60.0 * (xx / SHAPE[1] - 0.5) - 30.0 * (yy / SHAPE[0] - 0.5),
              45.0 * (yy / SHAPE[0] - 0.5) + 20.0]
    rng = np.random.default_rng(4)
    stack = np.stack([(sky + p)[..., None] + rng.normal(0, 3.0, SHAPE + (3,)) for p in planes]).astype(np.float32)
    models = zbg.frame_models(stack, None, 1)
    flattened = stack - np.stack([models.image(k, SHAPE) for k in range(3)])
    mean_plane = np.mean(planes, axis=0)
    for k in range(3):
        residual = zu.block_mean((flattened[k, ..., 1] - (sky + mean_plane))[..., None], 50)
        # Block means of 3 ADU pixel noise scatter by 0.06 ADU: no plane is left, nor any nebula.
        assert np.abs(residual).max() < 0.3


def test_feather_ramp_rises_from_the_trusted_edge_over_its_width():
    coverage = np.zeros((300, 300), np.float32)
    coverage[:, 20:] = 2.0
    coverage[:, 30:] = 10.0
    ramp = zu.feather_ramp(coverage, 100.0, solid=2.5)
    assert ramp[150, 25] == pytest.approx(zu.FEATHER_FLOOR)  # stacked from too few frames
    assert ramp[150, 30] == pytest.approx(zu.FEATHER_FLOOR)  # its first trusted pixel
    assert ramp[150, 40] == pytest.approx(0.5 - 0.5 * np.cos(np.pi * 11 / 100), abs=1e-5)
    assert ramp[150, 80] == pytest.approx(0.5, abs=0.02)  # half way
    assert ramp[150, 160] == 1.0 and ramp[0, 160] < 1.0  # the array's border is an edge too
    assert np.all(np.diff(ramp[150, 30:131]) >= 0)
    # A wide ramp's distance is measured on 4 px blocks: within 3 px, 0.02 of a 256 px ramp.
    wide = zu.feather_ramp(coverage, 256.0, solid=2.5)
    assert wide[150, 158] == pytest.approx(0.5, abs=0.02)


def _two_tiles(offset=(0.0, 0.0)):
    wcs_out = make_tan_wcs(10.0, 20.0, (120, 300))
    tiles, wcs_list = [], []
    for k, dx in enumerate((-60, 60)):
        wcs = make_tan_wcs(10.0 + dx * 2.39 / 3600 / np.cos(np.radians(20)), 20.0, (120, 200))
        image = np.full((120, 200, 1), 100.0 + 10.0 * k, np.float32)
        tiles.append(image)
        wcs_list.append(wcs)
    return tiles, wcs_list, wcs_out


@pytest.mark.parametrize("engine", ["fast", "reproject"])
def test_feathered_coadd_spreads_a_difference_over_the_overlap_and_keeps_coverage(engine):
    """Tiles of 100 and 110 ADU overlapping by 80 px: without feathers the mosaic jumps at each tile's
    edge; with them it goes from one to the other smoothly, and the coverage is unchanged."""
    tiles, wcs_list, wcs_out = _two_tiles()
    weights = [np.full((120, 200), 5.0, np.float32)] * 2
    feathers = [zu.feather_ramp(w, 60.0) for w in weights]
    plain, cov_plain = zu.reproject_and_coadd(tiles, wcs_list, wcs_out, (120, 300), weights, engine=engine)
    soft, cov_soft = zu.reproject_and_coadd(tiles, wcs_list, wcs_out, (120, 300), weights, engine=engine,
                                            feathers=feathers)
    np.testing.assert_allclose(cov_soft, cov_plain, rtol=1e-5, atol=1e-5)
    row_plain, row_soft = plain[60, 10:290, 0], soft[60, 10:290, 0]
    assert np.max(np.abs(np.diff(row_plain))) > 4.0  # a 5 ADU step at an edge
    assert np.max(np.abs(np.diff(row_soft))) < 0.5  # spread over the overlap
    assert sorted([row_soft[0], row_soft[-1]]) == pytest.approx([100.0, 110.0], abs=1e-3)


def test_feathered_coadd_gpu_path_against_reproject_and_the_truth(numpy_as_gpu):
    """NumPy standing in for CuPy, the GPU entry point makes the CPU engine's very call: comparing the
    two proves nothing. It is checked against astropy reproject's engine and the scene's truth.

    Tile 1 (110 ADU, left) has its last 30 columns stacked from too few frames (weight 2 < 3)
    where they overlap tile 0 (100 ADU): there tile 0's trusted pixels stand alone (exactly 100)
    while both weights count in the coverage (7)."""
    tiles, wcs_list, wcs_out = _two_tiles()
    weights = [np.full((120, 200), 5.0, np.float32) for _ in range(2)]
    weights[1][:, 170:] = 2.0
    feathers = [zu.feather_ramp(w, 60.0, 2.5) for w in weights]
    args = (tiles, wcs_list, wcs_out, (120, 300), weights)
    gpu, cov = zu.reproject_and_coadd(*args, feathers=feathers, trusted_weight=3, use_gpu=True)
    ref, cov_ref = zu.reproject_and_coadd(*args, feathers=feathers, trusted_weight=3, engine="reproject")
    gpu, cov, ref, cov_ref = gpu[..., 0], cov[..., 0], ref[..., 0], cov_ref[..., 0]
    # Measured: 0.15 ADU at worst (the footprints' edge pixels), 2e-5 ADU at the 99th percentile.
    np.testing.assert_allclose(gpu, ref, atol=0.3)
    assert np.percentile(np.abs(gpu - ref), 99) < 1e-3
    np.testing.assert_allclose(cov, cov_ref, atol=0.3)
    x_in_1 = wcs_list[1].world_to_pixel_values(*wcs_out.pixel_to_world_values(np.arange(300), np.full(300, 60.0)))[0]
    x_in_0 = wcs_list[0].world_to_pixel_values(*wcs_out.pixel_to_world_values(np.arange(300), np.full(300, 60.0)))[0]
    only_1, only_0 = x_in_0 < -1, x_in_1 > 200
    weak_1 = (x_in_1 > 171) & (x_in_1 < 198) & (x_in_0 > 2)
    assert only_1.sum() > 50 and only_0.sum() > 50 and weak_1.sum() > 20
    rows = slice(5, 115)
    np.testing.assert_allclose(gpu[rows][:, only_1], 110.0, atol=1e-4)
    np.testing.assert_allclose(gpu[rows][:, only_0], 100.0, atol=1e-4)
    np.testing.assert_allclose(gpu[rows][:, weak_1], 100.0, atol=1e-4)
    np.testing.assert_allclose(cov[rows][:, weak_1], 7.0, atol=1e-4)
    np.testing.assert_allclose(cov[rows][:, only_0 | only_1], 5.0, atol=1e-4)
    assert np.all(np.diff(gpu[60]) <= 1e-4)  # from 110 down to 100, never back


def test_extraction_flattens_a_gradient_and_keeps_the_nebula():
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]].astype(float)
    nebula = 400.0 * np.exp(-((xx - 420) ** 2 + (yy - 260) ** 2) / (2 * 90.0**2))
    gradient = 0.08 * xx - 0.05 * yy + 3e-5 * (xx - 500) ** 2
    rng = np.random.default_rng(7)
    mosaic = (1000.0 + nebula + gradient)[..., None] + rng.normal(0.0, 5.0, SHAPE + (3,))
    mosaic[:40, :100] = np.nan
    flat, extraction = zbg.extract_background(mosaic.astype(np.float32), 2)
    sky = nebula < 1.0
    residual = flat[..., 1] - nebula
    ok = np.isfinite(residual)
    # What is left on the sky is its noise (5-95 % of a 5 ADU Gaussian: 16.4 ADU) plus its level.
    assert np.ptp(np.percentile(residual[sky & ok], [5, 95])) < 18.0
    assert abs(np.mean(residual[sky & ok]) - np.mean((1000 + gradient)[sky & ok])) < 2.0  # the sky's level kept
    flux = np.nansum((flat[..., 1] - np.median(flat[..., 1][sky & ok]))[nebula > 20]) / nebula[nebula > 20].sum()
    assert flux == pytest.approx(1.0, abs=0.02)
    # The nebula's wings stand above the blocks' 0.1 ADU noise out to 350 px: about half the field.
    assert 0.3 < extraction.sky_fraction < 0.7


@pytest.mark.parametrize("gpu_path", [False, True])
def test_stacking_subtracts_each_frames_background_row_chunk_by_chunk(gpu_path, monkeypatch):
    """The stack of frames with their backgrounds subtracted in the row chunks is the stack of the
    frames corrected beforehand (small chunks: the models are evaluated on each chunk's rows)."""
    import zemosaic_align_stack as stk
    from zemosaic_align_stack_gpu import stack_in_chunks_gpu

    if gpu_path:
        monkeypatch.setattr(zu, "get_xp", lambda use_gpu=False: np)
    rng = np.random.default_rng(8)
    shape = (5, 70, 90, 3)
    models = zbg.BackgroundModels(rng.normal(0, 20, (5, 3, 6)), 2, *zbg._frame_of(shape[1:3]))
    frames = rng.normal(500.0, 5.0, shape).astype(np.float32)
    frames[2, :20, :30] = np.nan
    gains = rng.uniform(0.9, 1.1, (5, 3))
    params = stk.StackParams("winsorized_sigma_clip", 3.0, 3.0, (0.05, 0.05), "mean", 5)
    corrected = (frames * gains[:, None, None, :] - np.stack([models.image(k, shape[1:3]) for k in range(5)]))
    expected = stk.stack_in_chunks(corrected.astype(np.float32), None, None, None, params, rows_per_chunk=16)
    if gpu_path:
        found = stack_in_chunks_gpu(frames, gains, np.zeros((5, 3)), None, params, backgrounds=models,
                                    budget_bytes=40_000)
    else:
        found = stk.stack_in_chunks(frames, gains, np.zeros((5, 3)), None, params, rows_per_chunk=16,
                                    backgrounds=models)
    np.testing.assert_allclose(found[0], expected[0], rtol=1e-5, atol=2e-3)
    np.testing.assert_array_equal(found[1], expected[1])
