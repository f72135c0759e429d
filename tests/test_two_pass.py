"""Assembly: background matching, Two-Pass gains and the never-mix-backends policy."""

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


def _truth_sky(wcs, shape):
    """A smooth coloured nebula plus a gradient, evaluated in sky coordinates (no resampling)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    ra, dec = wcs.pixel_to_world_values(xx, yy)
    u, v = (ra - 10.0) * np.cos(np.radians(20.0)) * 3600 / 2.39, (dec - 20.0) * 3600 / 2.39
    neb = (300 * np.exp(-((u - 40) ** 2 + (v + 30) ** 2) / (2 * 120.0**2))
           + 200 * np.exp(-((u + 120) ** 2 + (v - 100) ** 2) / (2 * 70.0**2))
           + 150 * np.exp(-((u - 150) ** 2 + (v - 160) ** 2) / (2 * 90.0**2)))
    grad = 0.05 * u + 0.03 * v
    colour = np.array([1.0, 0.55, 0.7])
    return (neb[..., None] * colour + grad[..., None] + 50).astype(np.float32)


def _tiles(gain_errors, seed=0, noise=1.0):
    """Four master tiles in a 2x2 layout (~20 % overlap) with per-tile gain errors and sky levels."""
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


def _assemble(tiles, gpu_xp=None, **changes):
    config = MosaicConfig(**changes)
    wcs, shape = zw.mosaic_grid(tiles)
    report = zw.RunReport(config={})
    report.tiles = [{} for _ in tiles]
    mosaic, coverage = zw.assemble_mosaic(tiles, wcs, shape, config, report, zw._Context(None, None), gpu_xp)
    return mosaic, coverage, wcs, shape, report


def _tile_footprints(tiles, wcs, shape):
    return [np.nan_to_num(zu.reproject_and_coadd([t.coverage], [t.wcs], wcs, shape)[0]) > 5 for t in tiles]


def _scale_near_seams(mosaic, wcs, shape, tiles):
    """Fitted flux scale (mosaic vs truth) of each tile's exclusive area within 40 px of a seam."""
    truth = _truth_sky(wcs, shape)
    feet = _tile_footprints(tiles, wcs, shape)
    count = np.sum(feet, axis=0)
    seam = binary_dilation(count >= 2, iterations=40)
    scales = []
    for k, foot in enumerate(feet):
        region = foot & (count == 1) & seam & np.all(np.isfinite(mosaic), axis=-1)
        m, t = mosaic[region].mean(axis=-1), truth[region].mean(axis=-1)
        scales.append(np.polyfit(t, m, 1)[0])
    return np.array(scales)


def _colour_ratios(mosaic, wcs, shape):
    truth = _truth_sky(wcs, shape)
    ok = np.all(np.isfinite(mosaic), axis=-1)
    a = [np.polyfit(truth[ok][:, c], mosaic[ok][:, c], 1)[0] for c in range(3)]
    return np.array([a[0] / a[1], a[2] / a[1]])


def test_background_matching_removes_sky_steps():
    tiles = _tiles([1.0, 1.0, 1.0, 1.0])
    on, *_ = _assemble(tiles)
    off, _cov, wcs, shape, _ = _assemble(tiles, match_background=False)
    truth = _truth_sky(wcs, shape)
    for mosaic, limit in ((on, 1.0), (off, None)):
        ok = np.all(np.isfinite(mosaic), axis=-1)
        resid = (mosaic - truth)[ok]
        spread = np.percentile(resid, 99, axis=0) - np.percentile(resid, 1, axis=0)
        if limit is None:
            assert np.all(spread > 20)  # unmatched skies differ by 5 % steps (45-50 ADU)
        else:
            assert np.all(spread < 6 * limit)  # matched: noise-level residuals only


def test_two_pass_reduces_gain_step_and_keeps_colour(caplog):
    tiles = _tiles([1.0, 1.12, 1.0, 1.0])
    pass1, cov1, wcs, shape, _ = _assemble(tiles)
    with caplog.at_level(logging.INFO, logger="zemosaic_worker"):
        pass2, cov2, *_rest, report = _assemble(tiles, two_pass_coverage_renorm=True)
    step1 = _scale_near_seams(pass1, wcs, shape, tiles)
    step2 = _scale_near_seams(pass2, wcs, shape, tiles)
    others = [0, 2, 3]
    gap1 = abs(step1[1] - np.mean(step1[others]))
    gap2 = abs(step2[1] - np.mean(step2[others]))
    assert gap1 > 0.1
    assert gap2 < gap1 / 5, (step1, step2)
    assert np.allclose(step2[others], 1.0, atol=0.01)  # the flux scale of the good tiles is kept
    assert np.allclose(_colour_ratios(pass2, wcs, shape), _colour_ratios(pass1, wcs, shape), rtol=0.005)
    assert np.array_equal(cov1, cov2)  # Two-Pass changes values, not coverage
    assert "[TwoPass] Two-pass reprojection backend: gpu_all=False" in caplog.text
    assert report.tiles[1]["two_pass_gain"] == pytest.approx(1 / 1.12, rel=0.02)


def test_two_pass_without_gain_errors_changes_little():
    tiles = _tiles([1.0, 1.0, 1.0, 1.0])
    pass1, *_ = _assemble(tiles)
    pass2, *_ = _assemble(tiles, two_pass_coverage_renorm=True)
    ok = np.isfinite(pass1)
    signal_range = np.percentile(pass1[ok], 99) - np.percentile(pass1[ok], 1)
    change = np.abs(pass2[ok] - pass1[ok]) / signal_range
    assert np.percentile(change, 99) < 0.005


def test_gain_clip_limits_two_pass_gains():
    tiles = _tiles([1.0, 1.6, 1.0, 1.0])
    *_x, report = _assemble(tiles, two_pass_coverage_renorm=True, two_pass_cov_gain_clip=(0.85, 1.18))
    assert report.tiles[1]["two_pass_gain"] == pytest.approx(0.85)


def _channel_lines(records, label):
    pattern = re.compile(re.escape(label) + r" channel (\d) gpu=(True|False) cov_stats\(min,max\)=\(([^,]+),([^)]+)\)")
    return [pattern.search(r.getMessage()).groups() for r in records if pattern.search(r.getMessage())]


def test_gpu_failure_on_one_channel_reruns_all_on_cpu(caplog, monkeypatch):
    tiles = _tiles([1.0, 1.12, 1.0, 1.0])
    cpu, cov_cpu, *_ = _assemble(tiles, two_pass_coverage_renorm=True)
    monkeypatch.setenv(zu.GPU_FAIL_CHANNELS_ENV, "1")
    with caplog.at_level(logging.DEBUG, logger="zemosaic_worker"):
        mixed, cov_mixed, *_rest, report = _assemble(tiles, gpu_xp=np, use_gpu_phase5=True,
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


def test_gpu_code_path_with_numpy_matches_cpu(caplog):
    tiles = _tiles([1.0, 1.0, 1.0, 1.0])
    cpu, cov_cpu, *_ = _assemble(tiles)
    with caplog.at_level(logging.DEBUG, logger="zemosaic_worker"):
        gpu, cov_gpu, *_rest, report = _assemble(tiles, gpu_xp=np, use_gpu_phase5=True)
    assert report.backends["assembly"] == "gpu"
    assert [g for _c, g, *_ in _channel_lines(caplog.records, "Assembly")] == ["True"] * 3
    ok = np.isfinite(cpu)
    assert np.array_equal(ok, np.isfinite(gpu))
    assert np.max(np.abs(gpu[ok] - cpu[ok]) / np.abs(cpu[ok])) < 1e-5
    assert np.allclose(cov_gpu, cov_cpu, rtol=1e-5)
