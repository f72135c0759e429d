"""Pixel mapping and the reproject-and-coadd engines against astropy reproject."""

import warnings

import numpy as np
import pytest
from scipy.ndimage import binary_erosion

import zemosaic_utils as zu
from conftest import make_tan_wcs


def _sky(shape, phase=0.0):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (200 + 0.1 * xx + 0.05 * yy + 20 * np.sin(xx / 17.0 + phase) * np.cos(yy / 23.0)).astype(np.float32)


def _two_tiles(sip=None):
    shape = (300, 220)
    wcs_list = [make_tan_wcs(10.0, 20.0, shape, 0.0, sip=sip), make_tan_wcs(10.04, 20.05, shape, 7.0, sip=sip)]
    data = [_sky(shape), _sky(shape, 1.0)]
    weights = [np.full(shape, 3.0, np.float32), np.full(shape, 2.0, np.float32)]
    out_shape = (420, 330)
    wcs_out = make_tan_wcs(10.02, 20.025, out_shape, 3.0)
    return data, wcs_list, weights, wcs_out, out_shape


def test_pixel_mapping_matches_exact_transform_with_sip():
    shape = (300, 220)
    w_in = make_tan_wcs(10.0, 20.0, shape, 4.0, sip=2e-5)
    w_out = make_tan_wcs(10.01, 20.01, (400, 300), -3.0)
    m = zu.compute_pixel_mapping(w_in, shape, w_out, (400, 300))
    assert m is not None and m.max_error_px <= zu.MAPPING_TOLERANCE_PX
    y, x = zu.mapping_coordinates(m, 0, m.shape[0])
    rows = np.arange(m.y0, m.y1, 7)
    cols = np.arange(m.x0, m.x1, 5)
    gy, gx = np.meshgrid(rows, cols, indexing="ij")
    world = w_out.pixel_to_world_values(gx, gy)
    ex_x, ex_y = w_in.world_to_pixel_values(*world)
    got_y = y[(rows - m.y0)][:, (cols - m.x0)]
    got_x = x[(rows - m.y0)][:, (cols - m.x0)]
    assert np.max(np.hypot(got_y - ex_y, got_x - ex_x)) < 0.01


def test_pixel_mapping_none_when_disjoint():
    w_in = make_tan_wcs(10.0, 20.0, (100, 100))
    w_out = make_tan_wcs(50.0, -20.0, (100, 100))
    assert zu.compute_pixel_mapping(w_in, (100, 100), w_out, (100, 100)) is None


def test_small_box_reads_only_its_window_with_the_same_result(monkeypatch):
    # A tile resampled onto a small box (an overlap) gathers from the window it can reach; the
    # result must be the one every pixel's columns give, bit for bit, NaN and edges included.
    data, wcs_list, weights, wcs_out, _ = _two_tiles(1e-5)
    data[0][40:60, 100:130] = np.nan
    box = (slice(150, 260), slice(0, 120))  # crosses the first tile's left edge
    box_wcs, box_shape = wcs_out.slice(box), (110, 120)
    mapping = zu.compute_pixel_mapping(wcs_list[0], data[0].shape, box_wcs, box_shape)
    y0, x0, h, w = zu._source_window(mapping, data[0].shape)
    assert h * w < 0.5 * data[0].size and x0 == 0
    windowed = zu.reproject_and_coadd(data[:1], wcs_list[:1], box_wcs, box_shape, weights[:1])
    monkeypatch.setattr(zu, "_source_window", lambda m, shape: (0, 0) + tuple(shape))
    whole = zu.reproject_and_coadd(data[:1], wcs_list[:1], box_wcs, box_shape, weights[:1])
    assert np.isfinite(whole[0]).sum() > 1000 and np.isnan(whole[0]).sum() > 100
    np.testing.assert_array_equal(windowed[0], whole[0])
    np.testing.assert_array_equal(windowed[1], whole[1])


@pytest.mark.parametrize("case", ["one", "mosaic", "ra wrap", "near the pole"])
def test_optimal_grid_covers_every_image(case):
    """The mosaic grid holds every corner of every image (to the half pixel its rounded size may
    leave), at the finest of their pixel scales."""
    rng = np.random.default_rng(len(case))
    centres = {"one": [(10.0, 20.0)], "mosaic": [(10.0, 20.0), (10.4, 20.1), (10.1, 20.45), (10.5, 20.5)],
               "ra wrap": [(359.9, 1.0), (0.15, 1.2)], "near the pole": [(45.0, 89.7), (200.0, 89.6)]}[case]
    inputs = []
    for ra, dec in centres:
        shape = (int(rng.integers(300, 1200)), int(rng.integers(300, 1200)))
        inputs.append((shape, make_tan_wcs(ra, dec, shape, float(rng.uniform(-180, 180)), scale_deg=2.4 / 3600)))
    grid, (h, w) = zu.optimal_celestial_grid(inputs)
    for (ny, nx), wcs in inputs:
        corners = wcs.all_pix2world([-0.5, nx - 0.5, nx - 0.5, -0.5], [-0.5, -0.5, ny - 0.5, ny - 0.5], 0)
        x, y = grid.all_world2pix(*corners, 0)
        assert (x >= -1.0 - 1e-6).all() and (x <= w + 1e-6).all()
        assert (y >= -1.0 - 1e-6).all() and (y <= h + 1e-6).all()
    from astropy.wcs.utils import proj_plane_pixel_scales
    assert np.allclose(proj_plane_pixel_scales(grid), 2.4 / 3600)


def test_channels_with_their_own_footprints_coadd_as_they_would_alone():
    """Channels sharing their pixels gather one weight plane; a channel with holes of its own, its
    own weights: either way each channel is what co-adding it alone gives, byte for byte."""
    data, wcs_list, weights, wcs_out, out_shape = _two_tiles()
    shared = [np.stack([d, d * 0.5, d + 3.0], axis=-1) for d in data]
    own = [s.copy() for s in shared]
    own[1][40:90, 30:70, 1] = np.nan
    for images in (shared, own):
        mosaic, coverage = zu.reproject_and_coadd(images, wcs_list, wcs_out, out_shape, weights)
        for c in range(3):
            alone, cov_alone = zu.reproject_and_coadd([im[..., c] for im in images], wcs_list, wcs_out,
                                                      out_shape, weights)
            assert mosaic[..., c].tobytes() == alone.tobytes()
            assert coverage[..., c].tobytes() == cov_alone.tobytes()
    assert not np.array_equal(np.isnan(mosaic[..., 1]), np.isnan(mosaic[..., 0]))


@pytest.mark.parametrize("sip", [None, 1e-5])
def test_fast_engine_matches_reproject(sip):
    data, wcs_list, weights, wcs_out, out_shape = _two_tiles(sip)
    m_fast, c_fast = zu.reproject_and_coadd(data, wcs_list, wcs_out, out_shape, weights, engine="fast")
    m_ref, c_ref = zu.reproject_and_coadd(data, wcs_list, wcs_out, out_shape, weights, engine="reproject")
    assert m_fast.dtype == np.float32 and c_fast.dtype == np.float32
    # Interior of each coverage level (tile edges differ by construction: reproject trims a pixel).
    for level in (2.0, 3.0, 5.0):
        inner = binary_erosion(np.isclose(c_ref, level), iterations=3)
        assert inner.sum() > 1000
        rel = np.abs(m_fast[inner] - m_ref[inner]) / np.abs(m_ref[inner])
        assert rel.max() < 1e-3
        assert np.allclose(c_fast[inner], level, atol=1e-4)
    assert c_fast.max() == pytest.approx(5.0, abs=1e-4)  # sum of weights, > 1 in the overlap
    outside = binary_erosion(c_ref == 0, iterations=3)
    assert np.all(c_fast[outside] == 0) and np.all(np.isnan(m_fast[outside]))


def test_gpu_engine_with_numpy_matches_reproject(numpy_as_gpu):
    data, wcs_list, weights, wcs_out, out_shape = _two_tiles()
    m_ref, c_ref = zu.reproject_and_coadd(data, wcs_list, wcs_out, out_shape, weights, engine="reproject")
    data[0][50:80, 40:90] = np.nan  # a hole in tile 0: no weight there, tile 1 alone
    m_gpu, c_gpu = zu.gpu_reproject_and_coadd_impl(data, wcs_list, wcs_out, out_shape, weights)
    hole = np.nan_to_num(zu.reproject_and_coadd([np.isnan(data[0]).astype(np.float32)], wcs_list[:1],
                                                wcs_out, out_shape, engine="reproject")[0]) > 0
    for level in (2.0, 3.0, 5.0):  # interiors of each coverage level, away from the hole
        inner = binary_erosion(np.isclose(c_ref, level) & ~hole, iterations=3)
        assert inner.sum() > 1000
        assert np.max(np.abs(m_gpu[inner] - m_ref[inner]) / np.abs(m_ref[inner])) < 1e-3
        assert np.allclose(c_gpu[inner], level, atol=1e-4)
    levels = [binary_erosion(np.isclose(c_ref, level), iterations=2) for level in (3.0, 5.0)]
    inside_hole = binary_erosion(hole, iterations=3) & (levels[0] | levels[1])
    assert inside_hole.sum() > 500
    assert np.allclose(c_gpu[inside_hole], c_ref[inside_hole] - 3.0, atol=1e-4)  # tile 0 weighs 0
    assert np.all(np.isnan(m_gpu[inside_hole & (c_ref < 4)]))  # where tile 0 was alone: no data
    assert c_gpu.max() == pytest.approx(5.0, abs=1e-4)  # coverage is a sum of weights


def _coadd_with(monkeypatch, kernel):
    """Run the GPU co-add (NumPy standing in) with ``_coadd_fast`` replaced by ``kernel``."""
    data, wcs_list, weights, wcs_out, out_shape = _two_tiles()
    monkeypatch.setattr(zu, "_coadd_fast", kernel)
    return zu.gpu_reproject_and_coadd_impl(data, wcs_list, wcs_out, out_shape, weights)


def test_device_error_in_the_gpu_engine_is_a_backend_error(monkeypatch, numpy_as_gpu):
    runtime = pytest.importorskip("cupy.cuda.runtime")

    def device_lost(*args, **kwargs):
        raise runtime.CUDARuntimeError(719)  # cudaErrorLaunchFailure

    with pytest.raises(zu.GpuBackendError, match="GPU co-add failed: cudaErrorLaunchFailure"):
        _coadd_with(monkeypatch, device_lost)


def test_device_errors_are_cuda_and_memory_errors_only():
    cupy = pytest.importorskip("cupy")
    errors = zu.device_errors()
    for kind in (MemoryError, cupy.cuda.memory.OutOfMemoryError, cupy.cuda.runtime.CUDARuntimeError,
                 cupy.cuda.driver.CUDADriverError):
        assert issubclass(kind, errors), kind
    for bug in (TypeError, ValueError, IndexError, AttributeError, RuntimeError, NotImplementedError):
        assert not issubclass(bug, errors), bug


def test_a_bug_on_the_gpu_engine_path_propagates(monkeypatch, numpy_as_gpu):
    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s)")

    with pytest.raises(TypeError, match="unsupported operand"):
        _coadd_with(monkeypatch, bug)


def test_out_of_memory_halves_the_gpu_chunk_and_retries(monkeypatch, numpy_as_gpu):
    data, wcs_list, weights, wcs_out, out_shape = _two_tiles()
    expected = zu.reproject_and_coadd(data, wcs_list, wcs_out, out_shape, weights)
    real, rows_tried = zu._coadd_fast, []

    def tight(data_list, weights_list, mappings, shape_out, xp, rows, trusted_weight=None, feathers=None):
        rows_tried.append(rows)
        if rows > 40:
            raise MemoryError("out of memory")
        return real(data_list, weights_list, mappings, shape_out, xp, rows, trusted_weight, feathers)

    mosaic, coverage = _coadd_with(monkeypatch, tight)
    assert rows_tried == [rows_tried[0] // 2**k for k in range(len(rows_tried))]
    assert rows_tried[-1] <= 40 < rows_tried[-2]
    np.testing.assert_array_equal(mosaic, expected[0])
    np.testing.assert_array_equal(coverage, expected[1])


@pytest.mark.gpu
def test_real_cupy_coadd_matches_cpu():
    if not zu.gpu_available():
        pytest.skip(f"no usable GPU: {zu.gpu_unavailable_reason()}")
    data, wcs_list, weights, wcs_out, out_shape = _two_tiles(sip=1e-5)
    data[0][50:80, 40:90] = np.nan
    m_cpu, c_cpu = zu.reproject_and_coadd(data, wcs_list, wcs_out, out_shape, weights)
    m_gpu, c_gpu = zu.reproject_and_coadd(data, wcs_list, wcs_out, out_shape, weights, use_gpu=True)
    ok = np.isfinite(m_cpu)
    assert np.array_equal(ok, np.isfinite(m_gpu))
    assert np.max(np.abs(m_gpu[ok] - m_cpu[ok]) / np.abs(m_cpu[ok])) < 1e-5
    assert np.allclose(c_gpu, c_cpu, rtol=1e-5, atol=1e-6)
    assert c_gpu.max() == pytest.approx(5.0, abs=1e-4)


def test_percentiles_gpu_nan_safe():
    a = np.arange(100, dtype=np.float32).reshape(10, 10)
    assert zu._percentiles_gpu(a, 10, 90, xp=np) == pytest.approx(tuple(np.percentile(a, [10, 90])))
    b = a.copy()
    b[:, :5] = np.nan
    b[0, 9] = np.inf
    lo, hi = zu._percentiles_gpu(b, 10, 90, xp=np)
    ref = np.nanpercentile(np.where(np.isfinite(b), b, np.nan), [10, 90])
    assert (lo, hi) == pytest.approx(tuple(ref))
    assert all(np.isnan(zu._percentiles_gpu(np.full((3, 3), np.nan), 5, 95, xp=np)))


def test_get_xp_without_gpu_says_why():
    assert zu.get_xp(False) is np
    if zu.gpu_available():
        pytest.skip("a GPU is present")
    with pytest.raises(zu.GpuBackendError, match="GPU not available: "):
        zu.get_xp(True)
    assert isinstance(zu.gpu_unavailable_reason(), str)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigma_clipped_stats_ignore_stars_and_no_data(dtype):
    rng = np.random.default_rng(11)
    v = rng.normal(100, 5, 120_001).astype(dtype)
    v[:6000] += 400  # stars
    v[rng.integers(0, v.size, 12_000)] = np.nan
    med, sigma = zu.sigma_clipped_stats(v)
    assert abs(med - 100) < 0.1 and abs(sigma - 5) < 0.1
    assert np.isnan(zu.sigma_clipped_stats(np.array([1.0, np.nan, 2.0]))).all()  # fewer than 3 values


@pytest.mark.parametrize("factor", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("full_blocks_only", [False, True])
def test_block_mean_is_the_nan_mean_of_each_block(factor, full_blocks_only):
    """Blocks cut at the edges, NaN pixels and channels of their own: the mean of the valid pixels."""
    rng = np.random.default_rng(factor)
    image = rng.normal(1000, 30, (37, 53, 3)).astype(np.float32)
    image[rng.random(image.shape) < 0.1] = np.nan
    image[:6, :9] = np.nan
    h, w = -(-37 // factor) * factor, -(-53 // factor) * factor
    padded = np.full((h, w, 3), np.nan)
    padded[:37, :53] = image
    blocks = padded.reshape(h // factor, factor, w // factor, factor, 3)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmean(blocks, axis=(1, 3))
    if full_blocks_only:
        expected[~np.isfinite(blocks).all(axis=(1, 3))] = np.nan
    result = zu.block_mean(image, factor, full_blocks_only, band_rows=2)
    assert result.shape == expected.shape and result.dtype == np.float32
    np.testing.assert_array_equal(np.isnan(result), np.isnan(expected))
    np.testing.assert_allclose(result, expected, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("shape", [(7,), (5, 9), (4, 3, 8), (6, 2, 5, 3), (0, 4)])
def test_nonzero_indices_are_numpys(shape):
    mask = np.random.default_rng(len(shape)).random(shape) > 0.7
    expected = np.nonzero(mask)
    got = zu.nonzero_indices(mask)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("length", [0, 1, 2, 7, 1200])
def test_median_last_axis_is_numpys_median_bit_for_bit(length):
    rng = np.random.default_rng(length)
    values = rng.normal(1000, 30, (40, 3, length)).astype(np.float32)
    if length:
        values[5, 1, length // 2] = np.nan
        values[7, :, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.median(values, axis=-1)
    got = zu.median_last_axis(values)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if length == 0:  # NumPy's NaN of an empty median is negative; NaN all the same
        assert np.isnan(got).all()
    else:
        assert got.tobytes() == expected.tobytes()


def test_pixel_noise_sigma_ignores_sky_structure_and_integer_steps(rng):
    """The noise of a plane with a gradient, a nebula and stars, rounded to integer ADU as raw
    frames are: within 1 % of the truth, where the pixels' own clipped spread is several times it."""
    h, w = 600, 400
    yy, xx = np.mgrid[:h, :w]
    sky = 1000 + 0.8 * yy + 300 * np.exp(-((yy - 300) ** 2 + (xx - 200) ** 2) / (2 * 80.0**2))
    stars = np.zeros((h, w))
    stars[rng.integers(5, h - 5, 300), rng.integers(5, w - 5, 300)] = rng.uniform(500, 5000, 300)
    for sigma in (8.0, 40.0):
        plane = np.round(sky + stars + rng.normal(0, sigma, (h, w)))
        assert zu.pixel_noise_sigma(plane) == pytest.approx(sigma, rel=0.01)
        assert zu.sigma_clipped_stats(plane)[1] > 2 * sigma
    plane[:, :50] = np.nan  # no data is left out
    assert zu.pixel_noise_sigma(plane) == pytest.approx(40.0, rel=0.015)


@pytest.mark.parametrize("engine", ["fast", "gpu path", "reproject"])
def test_samples_below_the_trusted_weight_yield_where_a_trusted_one_exists(engine, numpy_as_gpu):
    """A tile's edge stacked from two frames (a trail survived there) yields to an overlapping tile
    of six frames; alone, it stands as it is; coverage still counts every frame."""
    shape = (60, 80)
    shifted_ra = 10.0 + 30 * 2.39 / 3600 / np.cos(np.radians(20))
    wcs_a, wcs_b = make_tan_wcs(10.0, 20.0, shape), make_tan_wcs(shifted_ra, 20.0, shape)
    a = np.full(shape, 500.0, np.float32)  # the untrusted edge carries a trail: 500 against 100
    b = np.full(shape, 100.0, np.float32)
    weights = [np.full(shape, 2.0, np.float32), np.full(shape, 6.0, np.float32)]
    wcs_out = make_tan_wcs(10.0 + 15 * 2.39 / 3600 / np.cos(np.radians(20)), 20.0, (60, 120))
    if engine == "gpu path":
        mosaic, coverage = zu.gpu_reproject_and_coadd_impl([a, b], [wcs_a, wcs_b], wcs_out, (60, 120), weights,
                                                           trusted_weight=3)
    else:
        mosaic, coverage = zu.reproject_and_coadd([a, b], [wcs_a, wcs_b], wcs_out, (60, 120), weights,
                                                  engine=engine, trusted_weight=3)
    both = binary_erosion(coverage > 7.5, iterations=2)
    only_a = binary_erosion((coverage > 1.5) & (coverage < 2.5), iterations=2)
    assert both.sum() > 500 and only_a.sum() > 200
    np.testing.assert_allclose(mosaic[both], 100.0, rtol=1e-5)
    np.testing.assert_allclose(coverage[both], 8.0, rtol=1e-4)
    np.testing.assert_allclose(mosaic[only_a], 500.0, rtol=1e-5)
    plain, _ = zu.reproject_and_coadd([a, b], [wcs_a, wcs_b], wcs_out, (60, 120), weights, engine="fast")
    np.testing.assert_allclose(plain[both], 200.0, rtol=1e-5)  # without the rule: (2*500 + 6*100) / 8
