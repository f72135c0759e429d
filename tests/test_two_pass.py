"""Assembly: background matching, tile gains, Two-Pass gains and the never-mix-backends policy."""

import dataclasses
import functools
import logging
import re

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

import zemosaic_utils as zu
import zemosaic_worker as zw
from conftest import make_tan_wcs
from zemosaic_config import MosaicConfig

TILE_SHAPE = (240, 180)
SKY = np.array([900.0, 1000.0, 800.0])


def _truth_sky(wcs, shape, stars=True):
    """A smooth coloured nebula, a gradient and stars, evaluated in sky coordinates (no resampling).

    ``stars=False`` returns ``(sky without stars, mask of pixels away from stars)``: resampling
    changes a star's peak, so comparisons with the truth are made away from stars.
    """
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ra, dec = wcs.pixel_to_world_values(xx, yy)
    u, v = (ra - 10.0) * np.cos(np.radians(20.0)) * 3600 / 2.39, (dec - 20.0) * 3600 / 2.39
    neb = (300 * np.exp(-((u - 40) ** 2 + (v + 30) ** 2) / (2 * 120.0**2))
           + 200 * np.exp(-((u + 120) ** 2 + (v - 100) ** 2) / (2 * 70.0**2))
           + 150 * np.exp(-((u - 150) ** 2 + (v - 160) ** 2) / (2 * 90.0**2)))
    grad = 0.05 * u + 0.03 * v
    colour = np.array([1.0, 0.55, 0.7])
    smooth = neb[..., None] * colour + grad[..., None] + 50
    star_light = _stars(u, v)
    if not stars:
        return smooth.astype(np.float32), star_light.max(axis=-1) < 0.5
    return (smooth + star_light).astype(np.float32)


_STAR_CACHE = {}


def _stars(u, v, n=150, fwhm=3.0):
    """A fixed star field (Gaussian PSF, white-ish colours) in the same sky coordinates."""
    key = (u.shape, float(u[0, 0]), float(v[0, 0]), float(u[-1, -1]), float(v[-1, -1]))
    if key not in _STAR_CACHE:
        _STAR_CACHE[key] = _render_stars(u, v, n, fwhm)
    return _STAR_CACHE[key]


def _render_stars(u, v, n, fwhm):
    rng = np.random.default_rng(99)
    su, sv = rng.uniform(-260, 260, n), rng.uniform(-200, 200, n)
    flux = 10 ** rng.uniform(2.0, 4.0, n)
    colour = rng.uniform(0.8, 1.2, (n, 3))
    sig2 = (fwhm / 2.355) ** 2
    out = np.zeros(u.shape + (3,))
    for k in range(n):
        near = (np.abs(u - su[k]) < 8) & (np.abs(v - sv[k]) < 8)
        if near.any():
            r2 = (u[near] - su[k]) ** 2 + (v[near] - sv[k]) ** 2
            out[near] += (flux[k] / (2 * np.pi * sig2) * np.exp(-r2 / (2 * sig2)))[:, None] * colour[k]
    return out


def _tiles(gain_errors, seed=0, noise=1.0):
    """Four master tiles in a 2x2 layout (~20 % overlap) with per-tile gain errors and sky levels.

    Fresh copies of a scene made once per module (tests may paint artefacts into them).
    """
    return [dataclasses.replace(t, image=t.image.copy(), coverage=t.coverage.copy())
            for t in _scene_tiles(tuple(gain_errors), seed, noise)]


@functools.lru_cache(maxsize=None)
def _scene_tiles(gain_errors, seed, noise):
    rng = np.random.default_rng(seed)
    scale = 2.39 / 3600
    step_x, step_y = 0.8 * TILE_SHAPE[1] * scale, 0.8 * TILE_SHAPE[0] * scale
    tiles = []
    for k in range(4):
        ra = 10.0 + (k % 2 - 0.5) * step_x / np.cos(np.radians(20.0))
        dec = 20.0 + (k // 2 - 0.5) * step_y
        wcs = make_tan_wcs(ra, dec, TILE_SHAPE, rotation_deg=2.0 * k)
        sky = SKY * (1 + 0.05 * k)
        image = gain_errors[k] * _truth_sky(wcs, TILE_SHAPE) + sky
        image = (image + rng.normal(0, noise, image.shape)).astype(np.float32)
        coverage = np.full(TILE_SHAPE, 10.0, np.float32)
        image[:3] = np.nan  # footprint edge, as alignment leaves it
        coverage[:3] = 0
        tiles.append(zw.MasterTile(k, image, coverage, wcs, f"t{k}", [], "", "cpu"))
    return tiles


def _with_sky_planes(tiles, planes):
    """Add to each tile its own sky plane: ``(in x, in y)`` peak to peak, in fractions of the sky."""
    yy, xx = np.mgrid[: TILE_SHAPE[0], : TILE_SHAPE[1]]
    for tile, (in_x, in_y) in zip(tiles, planes):
        plane = in_x * (xx / (TILE_SHAPE[1] - 1) - 0.5) + in_y * (yy / (TILE_SHAPE[0] - 1) - 0.5)
        tile.image += (plane[..., None] * SKY).astype(np.float32)
    return tiles


#: Sky planes of 6-12 % of the sky peak to peak along each axis (16-18 % corner to corner), of
#: either sign, a different one in every tile.
GRADIENTS = [(0.10, -0.06), (-0.12, 0.06), (0.06, 0.12), (-0.08, -0.10)]


def _satellite_trail(image):
    """A bright trail (300 ADU, 3 px wide) crossing the tile at 10 degrees, along most of its lower overlap."""
    yy, xx = np.mgrid[: TILE_SHAPE[0], : TILE_SHAPE[1]]
    distance = (yy - 25) * np.cos(np.radians(10)) - (xx - 60) * np.sin(np.radians(10))
    image += (300 * np.exp(-0.5 * (distance / 1.3) ** 2))[..., None].astype(np.float32)


def _star_halo(image):
    """A wide halo (300 ADU, sigma 20 px) in the overlap, as a bright star's glow in one tile only."""
    yy, xx = np.mgrid[: TILE_SHAPE[0], : TILE_SHAPE[1]]
    image += (300 * np.exp(-((yy - 25) ** 2 + (xx - 90) ** 2) / (2 * 20.0**2)))[..., None].astype(np.float32)


def _hot_column(image):
    """A column 300 ADU too bright along the whole tile, inside its overlap with the tile beside it."""
    image[:, 160] += 300.0


@functools.lru_cache(maxsize=None)
def _assembled(gain_errors, seed=0, noise=1.0, **changes):
    """:func:`_assemble` of the unmodified scene ``_tiles(gain_errors, seed, noise)``, made once per
    module: ``(tiles, mosaic, coverage, wcs, shape, report)``, the arrays read-only."""
    tiles = _tiles(gain_errors, seed, noise)
    mosaic, coverage, wcs, shape, report = _assemble(tiles, **changes)
    mosaic.flags.writeable = coverage.flags.writeable = False
    return tiles, mosaic, coverage, wcs, shape, report


@pytest.fixture(scope="module", autouse=True)
def _free_the_scenes():
    yield
    _scene_tiles.cache_clear()
    _assembled.cache_clear()
    _STAR_CACHE.clear()


def _assemble(tiles, **changes):
    config = MosaicConfig(**changes)
    wcs, shape = zw.mosaic_grid(tiles)
    run = zw.Run(config)
    mosaic, coverage = zw.assemble_mosaic(run, tiles, wcs, shape)
    return mosaic, coverage, wcs, shape, run.report


def _tile_footprints(tiles, wcs, shape, reach=False):
    """Where each tile's solid coverage (10 frames, from row 3 on) lies on the grid, from the WCSs
    alone (not the co-add under test): every bilinear neighbour solid; ``reach``: any neighbour
    inside the tile at all."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    world = wcs.pixel_to_world_values(xx, yy)
    h, w = TILE_SHAPE
    feet = []
    for t in tiles:
        x, y = t.wcs.world_to_pixel_values(*world)
        if reach:
            feet.append((y > -1) & (y < h) & (x > -1) & (x < w))
        else:
            feet.append((y >= 3) & (y <= h - 1) & (x >= 0) & (x <= w - 1))
    return feet


def _scale_near_seams(mosaic, wcs, shape, tiles):
    """Fitted flux scale (mosaic vs truth) of each tile's exclusive area within 40 px of a seam."""
    truth, dark = _truth_sky(wcs, shape, stars=False)
    feet = _tile_footprints(tiles, wcs, shape)
    count = np.sum(feet, axis=0)
    seam = binary_dilation(count >= 2, iterations=40)
    scales = []
    for k, foot in enumerate(feet):
        region = foot & (count == 1) & seam & np.all(np.isfinite(mosaic), axis=-1) & dark
        m, t = mosaic[region].mean(axis=-1), truth[region].mean(axis=-1)
        scales.append(np.polyfit(t, m, 1)[0])
    return np.array(scales)


def _colour_ratios(mosaic, wcs, shape):
    truth, dark = _truth_sky(wcs, shape, stars=False)
    ok = np.all(np.isfinite(mosaic), axis=-1) & dark
    a = [np.polyfit(truth[ok][:, c], mosaic[ok][:, c], 1)[0] for c in range(3)]
    return np.array([a[0] / a[1], a[2] / a[1]])


def test_background_matching_removes_sky_steps():
    _t, on, *_ = _assembled((1.0, 1.0, 1.0, 1.0))
    _t, off, _cov, wcs, shape, _ = _assembled((1.0, 1.0, 1.0, 1.0), match_background=False)
    truth, dark = _truth_sky(wcs, shape, stars=False)
    for mosaic, limit in ((on, 1.0), (off, None)):
        ok = np.all(np.isfinite(mosaic), axis=-1) & dark
        resid = (mosaic - truth)[ok]
        spread = np.percentile(resid, 99, axis=0) - np.percentile(resid, 1, axis=0)
        if limit is None:
            assert np.all(spread > 20)  # unmatched skies differ by 5 % steps (45-50 ADU)
        else:
            assert np.all(spread < 6 * limit)  # matched: noise-level residuals only


def test_two_pass_reduces_gain_step_and_keeps_colour(caplog):
    """Two-Pass alone (pass-1 gain matching off) evens out a tile 12 % too bright."""
    tiles, pass1, cov1, wcs, shape, _ = _assembled((1.0, 1.12, 1.0, 1.0), intertile_photometric_match=False)
    with caplog.at_level(logging.INFO, logger="zemosaic_worker"):
        pass2, cov2, *_rest, report = _assemble(tiles, two_pass_coverage_renorm=True,
                                                intertile_photometric_match=False)
    step1 = _scale_near_seams(pass1, wcs, shape, tiles)
    step2 = _scale_near_seams(pass2, wcs, shape, tiles)
    others = [0, 2, 3]
    gap1 = abs(step1[1] - np.mean(step1[others]))
    gap2 = abs(step2[1] - np.mean(step2[others]))
    assert gap1 > 0.05  # part of the 12 % step is smooth nebula, which the background planes take up
    assert gap2 < gap1 / 5, (step1, step2)
    assert np.allclose(step2[others], 1.0, atol=0.01)  # the flux scale of the good tiles is kept
    assert np.allclose(_colour_ratios(pass2, wcs, shape), _colour_ratios(pass1, wcs, shape), rtol=0.005)
    assert np.array_equal(cov1, cov2)  # Two-Pass changes values, not coverage
    assert "[TwoPass] Two-pass reprojection backend: gpu_all=False" in caplog.text
    assert report.tiles[1]["two_pass_gain"] == pytest.approx(1 / 1.12, rel=0.02)


def test_pass_one_gains_fix_the_step_and_two_pass_keeps_them():
    """Pass-1 tile gains remove the 12 % step; Two-Pass then finds agreement and moves nothing."""
    tiles, pass1, _c1, wcs, shape, report1 = _assembled((1.0, 1.12, 1.0, 1.0))
    _t, pass2, _c2, *_rest, report2 = _assembled((1.0, 1.12, 1.0, 1.0), two_pass_coverage_renorm=True)
    step1 = _scale_near_seams(pass1, wcs, shape, tiles)
    assert np.allclose(step1, 1.0, atol=0.005), step1
    assert report1.tiles[1]["gain_rgb"] == pytest.approx([1 / 1.12] * 3, rel=0.005)
    assert [e["two_pass_gain"] for e in report2.tiles] == [1.0] * 4
    assert np.array_equal(pass1, pass2, equal_nan=True)


def test_two_pass_never_worse_than_pass_one():
    """Tiles within 2 %: Two-Pass may keep or improve the agreement of pass 1, never degrade it."""
    for match in (True, False):
        tiles, pass1, _c, wcs, shape, _r = _assembled((1.0, 1.02, 0.985, 1.0), 3, 3.0,
                                                      intertile_photometric_match=match)
        _t, pass2, *_x, report = _assembled((1.0, 1.02, 0.985, 1.0), 3, 3.0, intertile_photometric_match=match,
                                            two_pass_coverage_renorm=True)
        spread1 = np.ptp(_scale_near_seams(pass1, wcs, shape, tiles))
        spread2 = np.ptp(_scale_near_seams(pass2, wcs, shape, tiles))
        assert spread2 <= spread1 + 0.002, (match, spread1, spread2)
        gains = np.array([e["two_pass_gain"] for e in report.tiles])
        assert np.all(np.abs(gains - 1) < 0.03), gains


def test_two_pass_is_deterministic():
    tiles = _tiles([1.0, 1.05, 0.97, 1.0], seed=4)
    runs = [_assemble(tiles, intertile_photometric_match=False, two_pass_coverage_renorm=True)
            for _ in range(2)]
    assert [e["two_pass_gain"] for e in runs[0][-1].tiles] == [e["two_pass_gain"] for e in runs[1][-1].tiles]
    assert np.array_equal(runs[0][0], runs[1][0], equal_nan=True)


def test_two_pass_without_gain_errors_changes_little():
    _t, pass1, *_ = _assembled((1.0, 1.0, 1.0, 1.0))
    _t, pass2, *_ = _assembled((1.0, 1.0, 1.0, 1.0), two_pass_coverage_renorm=True)
    ok = np.isfinite(pass1)
    signal_range = np.percentile(pass1[ok], 99) - np.percentile(pass1[ok], 1)
    change = np.abs(pass2[ok] - pass1[ok]) / signal_range
    assert np.percentile(change, 99) < 0.005


def test_gain_clip_limits_two_pass_gains():
    tiles = _tiles([1.0, 1.6, 1.0, 1.0])
    *_x, report = _assemble(tiles, two_pass_coverage_renorm=True, two_pass_cov_gain_clip=(0.85, 1.18),
                            intertile_photometric_match=False)
    assert report.tiles[1]["two_pass_gain"] == pytest.approx(0.85)


def _channel_lines(records, label):
    pattern = re.compile(re.escape(label) + r" channel (\d) gpu=(True|False) cov_stats\(min,max\)=\(([^,]+),([^)]+)\)")
    return [pattern.search(r.getMessage()).groups() for r in records if pattern.search(r.getMessage())]


def test_gpu_failure_on_one_channel_reruns_all_on_cpu(caplog, monkeypatch, numpy_as_gpu):
    tiles, cpu, cov_cpu, *_ = _assembled((1.0, 1.12, 1.0, 1.0), two_pass_coverage_renorm=True)
    real_gpu_coadd = zu.gpu_reproject_and_coadd_impl

    def fails_on_green(data_list, *args, **kwargs):
        # The device gives out while the channels are on it: the whole GPU pass fails.
        if np.ndim(data_list[0]) == 3 and np.shape(data_list[0])[-1] > 1:
            raise zu.GpuBackendError("GPU co-add failed: device lost on channel 1")
        return real_gpu_coadd(data_list, *args, **kwargs)

    monkeypatch.setattr(zu, "gpu_reproject_and_coadd_impl", fails_on_green)
    with caplog.at_level(logging.DEBUG, logger="zemosaic_worker"):
        mixed, cov_mixed, *_rest, report = _assemble(tiles, use_gpu_phase5=True,
                                                     two_pass_coverage_renorm=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().startswith("[TwoPass] GPU reprojection failed on one or more channels; "
                                      "rerunning all channels on CPU to avoid mixed backend")
            for r in warnings if "[TwoPass]" in r.getMessage()] == [True]
    lines = _channel_lines(caplog.records, "[TwoPass]")
    final = lines[-3:]
    assert [g for _c, g, *_ in final] == ["False"] * 3  # all three channels on one backend
    assert "[TwoPass] Two-pass reprojection backend: gpu_all=False" in caplog.text
    assert report.backends["two_pass"] == "cpu"
    assert np.array_equal(np.isnan(mixed), np.isnan(cpu))
    assert np.allclose(mixed, cpu, equal_nan=True, rtol=1e-6)
    maxima = [float(mx) for *_x, mx in final]
    assert max(maxima) / min(maxima) < 1.01  # coverage in the same units on every channel
    assert max(maxima) > 10  # a sum of weights: overlaps add tile coverages


def test_gpu_code_path_with_numpy_is_chosen_and_matches_the_truth(caplog, numpy_as_gpu):
    """With NumPy standing in for CuPy the GPU co-add makes the CPU engine's very call, so comparing
    it with the CPU mosaic proves nothing: the assembly must pick the GPU backend for every channel,
    and its mosaic must match the truth (sky steps matched away) and the frames' coverage."""
    tiles = _tiles([1.0, 1.0, 1.0, 1.0])
    with caplog.at_level(logging.DEBUG, logger="zemosaic_worker"):
        gpu, cov_gpu, wcs, shape, report = _assemble(tiles, use_gpu_phase5=True)
    assert report.backends["assembly"] == "gpu"
    assert [g for _c, g, *_ in _channel_lines(caplog.records, "Assembly")] == ["True"] * 3
    truth, dark = _truth_sky(wcs, shape, stars=False)
    ok = np.all(np.isfinite(gpu), axis=-1) & dark
    resid = (gpu - truth)[ok]
    spread = np.percentile(resid, 99, axis=0) - np.percentile(resid, 1, axis=0)
    assert np.all(spread < 6.0), spread  # noise-level residuals only (unmatched: > 20 ADU)
    # Every tile holds 10 frames: the coverage is 10 for each tile there, 0 where none reaches.
    inside = np.sum(_tile_footprints(tiles, wcs, shape), axis=0)
    reached = np.sum(_tile_footprints(tiles, wcs, shape, reach=True), axis=0)
    for n in (1, 2):
        solid = (inside == n) & (reached == n)
        assert solid.sum() > 1000
        np.testing.assert_allclose(cov_gpu[solid], 10.0 * n, rtol=1e-4)
    assert np.all(cov_gpu[reached == 0] == 0) and np.all(np.isnan(gpu[reached == 0]))


def _two_pass_gains(tiles):
    """Two-Pass gains of ``tiles`` with pass-1 gain matching off (its gains are then the truth, 1)."""
    *_x, report = _assemble(tiles, two_pass_coverage_renorm=True, intertile_photometric_match=False)
    return [e["two_pass_gain"] for e in report.tiles]


def test_two_pass_does_not_read_sky_gradients_as_gains():
    """Tiles that differ only in their sky planes (6-18 % of the sky): no tile is moved."""
    assert _two_pass_gains(_with_sky_planes(_tiles([1.0, 1.0, 1.0, 1.0]), GRADIENTS)) == [1.0] * 4


@pytest.mark.parametrize("artefact", [_satellite_trail, _star_halo, _hot_column])
def test_two_pass_ignores_an_artefact_in_one_overlap(artefact):
    """An unrejected trail, halo or hot column in one tile's overlap does not move the tile."""
    tiles = _tiles([1.0, 1.0, 1.0, 1.0])
    artefact(tiles[3].image)
    assert _two_pass_gains(tiles) == [1.0] * 4


def test_two_pass_corrects_a_residual_gain_despite_gradients():
    """One tile 6 % too bright, every tile with its own sky plane: corrected to within 1 %, the others kept."""
    gains = _two_pass_gains(_with_sky_planes(_tiles([1.0, 1.0, 1.06, 1.0]), GRADIENTS))
    assert gains[2] * 1.06 == pytest.approx(1.0, abs=0.01), gains
    assert gains[:2] + gains[3:] == [1.0] * 3
