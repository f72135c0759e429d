"""The seam-step and nebula-flux measurements of ``photometry_truth`` read what they should.

Two grids stand for a mosaic's. One small hard scene (``gradient_scene_options``, 2x2 panels of
480x270 frames, overlap 0.3, 3 frames a panel, noiseless), its truth grid as the mosaic grid and
a tile's footprint where all 3 of its panel's frames cover: its edges are 3-5 segments long, so
a step there is known to ~0.1 sigma. And two long tiles side by side on a sky of the generator's
(edges of 26 segments, like full-size frames'), where a step is known to ~0.04 sigma. On both: a
perfect mosaic (the truth, scaled, plus noise like a mosaic's) has no step and loses no nebula
flux; an offset added to one tile reads as that step at its edges only; a smooth global gradient
is no step; nebula taken away reads as lost. The overlap dips (``overlap_dips``) of a perfect
mosaic, and of one with a smooth global gradient, are ~0; a dip added in one overlap reads as
itself there only.
"""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import photometry_truth as pt
import zemosaic_synth

NOISE_ADU = 15.0


def _frame_feet(info, wcs, shape):
    """Per panel, the grid pixels that every one of its frames covers."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    ra, dec = wcs.all_pix2world(cols.ravel(), rows.ravel(), 0)
    fh, fw = info["frame_shape"]
    per_panel = info["n_frames"] // 4
    feet = []
    for p in range(4):
        inside = np.ones(rows.size, bool)
        for path in info["frame_paths"][p * per_panel:(p + 1) * per_panel]:
            x, y = WCS(fits.getheader(path)).all_world2pix(ra, dec, 0)
            inside &= (x > -0.5) & (x < fw - 0.5) & (y > -0.5) & (y < fh - 0.5)
        feet.append(inside.reshape(shape))
    return feet


def _with_perfect(truth, feet, **extra):
    """A scene dict: ``truth``, ``feet``, a perfect mosaic (NaN off the tiles) and its pixel sigma."""
    covered = np.any(feet, axis=0)
    rng = np.random.default_rng(1)
    noisy = np.where(covered[..., None], truth + rng.normal(0.0, NOISE_ADU, truth.shape), np.nan)
    perfect = pt.perfect_mosaic(noisy, truth, seed=2)
    clean = np.isfinite(perfect).all(axis=-1) & ~pt._star_pixels(truth) & (np.sum(feet, axis=0) == 1)
    sigma = pt.pixel_noise(perfect - (0.95 * truth + 2500.0), clean)
    return {"truth": truth, "feet": feet, "perfect": perfect, "sigma": sigma, "shape": truth.shape[:2], **extra}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """The generated 2x2 scene, its truth grid, nebula and footprints, and a perfect mosaic."""
    root = tmp_path_factory.mktemp("seam_truth")
    options = pt.gradient_scene_options(size="small", overlap=0.3, frames_per_panel=3)
    info = zemosaic_synth.generate_dataset(root, noise=False, hot_pixels=False, satellite=False, **options)
    truth, wcs, _meta = zemosaic_synth.load_truth(root)
    feet = _frame_feet(info, wcs, truth.shape[:2])
    return _with_perfect(truth, feet, root=root, wcs=wcs, nebula=pt.nebula_on_grid(root, wcs, truth.shape[:2]))


@pytest.fixture(scope="module")
def long_pair():
    """Two 430x1660 px tiles, 2 degrees apart in angle, overlapping by ~100 px, on a generated sky."""
    shape = (1700, 760)
    wcs = zemosaic_synth.make_tan_wcs(83.8, -5.4, 0.0, shape, zemosaic_synth.PIXEL_SCALE_ARCSEC)
    model = zemosaic_synth.build_sky_model(wcs, shape, seed=3)
    truth = np.moveaxis(model.render_truth(), 0, -1)
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(float)
    feet = []
    for centre, angle in ((215.0, 1.0), (545.0, -1.0)):
        t = np.radians(angle)
        u = (cols - centre) * np.cos(t) + (rows - 850.0) * np.sin(t)
        v = (rows - 850.0) * np.cos(t) - (cols - centre) * np.sin(t)
        feet.append((np.abs(u) < 215.0) & (np.abs(v) < 830.0))
    return _with_perfect(truth, feet)


def _steps(scene, mosaic):
    return pt.seam_steps(np.asarray(mosaic, np.float32), scene["truth"], scene["feet"])


def _ratio(scene, mosaic):
    return pt.nebula_flux_ratio(mosaic, scene["root"], scene["wcs"], scene["shape"], truth=scene["truth"],
                                nebula=scene["nebula"])


def _offset(scene, tile, size_sigma):
    return scene["perfect"] + np.where(scene["feet"][tile][..., None], size_sigma * scene["sigma"], 0.0)


def _global_gradient(scene):
    """Tilt, dome and a cubic term a quadratic background cannot take: ~100 sigma across the grid."""
    h, w = scene["shape"]
    rows, cols = np.mgrid[0:h, 0:w]
    x, y = 2.0 * cols / (w - 1) - 1.0, 2.0 * rows / (h - 1) - 1.0
    sky = 60.0 * x - 40.0 * y + 50.0 * (x ** 2 + y ** 2) + 40.0 * y ** 3
    return scene["perfect"] + sky[..., None] * (scene["sigma"] / NOISE_ADU)


def _all_z(edges):
    return np.array([e["step_sigma_rgb"] for e in edges])


def test_scene_options_are_the_hard_scene(scene):
    opts = pt.gradient_scene_options(size="full", frames_per_panel=10)
    assert opts["size"] == "full" and opts["frames_per_panel"] == 10 and "overlap" not in opts
    assert min(opts["panel_sky_level"]) == pytest.approx(0.8) and max(opts["panel_sky_level"]) == pytest.approx(1.2)
    two_nights = [g for g in opts["panel_sky_gradient"] if isinstance(g, list)]
    assert len(two_nights) == 1 and two_nights[0][0][1] * two_nights[0][1][1] < 0
    # Overlaps ~80 px wide or more (left-right) and the nebula crossing every one of them.
    for i, j, axis in ((0, 1, 1), (2, 3, 1), (0, 2, 0), (1, 3, 0)):
        both = scene["feet"][i] & scene["feet"][j]
        width = both.sum(axis=axis)
        assert np.median(width[width > 0]) >= 60
        assert np.percentile(scene["nebula"][both][:, 0], 90) > 10 * NOISE_ADU


def test_perfect_mosaic_has_no_step_and_all_its_nebula(scene):
    edges = _steps(scene, scene["perfect"])
    pairs = {(i, j) for i, j in ((0, 1), (2, 3), (0, 2), (1, 3))}
    assert {(e["tile"], e["other"]) for e in edges} >= pairs | {(j, i) for i, j in pairs}
    assert all(e["n_segments"] >= 3 for e in edges)
    z = _all_z(edges)
    assert np.sqrt(np.mean(z ** 2)) < 0.1 and np.abs(z).max() < 0.3
    ratio = _ratio(scene, scene["perfect"])
    assert ratio["worst_deviation"] < 0.005
    np.testing.assert_allclose(ratio["scale_rgb"], 0.95, rtol=0.003)
    assert min(ratio["n_pixels"]) > 10000


def test_offset_on_one_tile_reads_as_its_step(scene):
    edges = _steps(scene, _offset(scene, 1, 3.0))
    mine = [e for e in edges if e["tile"] == 1]
    assert len(mine) == 2
    np.testing.assert_allclose(_all_z(mine), 3.0, rtol=0.1)
    assert np.abs(_all_z([e for e in edges if e["tile"] != 1])).max() < 0.3


def test_smooth_global_gradient_is_no_step(scene):
    z = _all_z(_steps(scene, _global_gradient(scene)))
    assert np.sqrt(np.mean(z ** 2)) < 0.1 and np.abs(z).max() < 0.3


def test_lost_nebula_reads_as_a_ratio(scene):
    ratio = _ratio(scene, scene["perfect"] - 0.95 * 0.2 * scene["nebula"])
    np.testing.assert_allclose(ratio["ratio_rgb"], 0.8, atol=0.01)


def test_long_edges_perfect_offset_and_gradient(long_pair):
    perfect = _steps(long_pair, long_pair["perfect"])
    assert [(e["tile"], e["other"]) for e in perfect] == [(0, 1), (1, 0)]
    assert all(e["n_segments"] >= 24 for e in perfect)
    assert np.abs(_all_z(perfect)).max() < 0.1
    offset = _steps(long_pair, _offset(long_pair, 0, 2.0))
    np.testing.assert_allclose(_all_z(offset)[0], 2.0, rtol=0.1)
    assert np.abs(_all_z(offset)[1]).max() < 0.1
    assert np.abs(_all_z(_steps(long_pair, _global_gradient(long_pair)))).max() < 0.1


def _dips(scene, mosaic):
    return {d["tiles"]: d for d in pt.overlap_dips(np.asarray(mosaic, np.float32), scene["truth"], scene["feet"])}


def test_overlap_dips_read_a_dip_in_one_overlap(scene):
    """Perfect: within 0.06 sigma on the four side-by-side pairs (the corner pair is left out)."""
    for mosaic in (scene["perfect"], _global_gradient(scene)):
        dips = _dips(scene, mosaic)
        assert set(dips) == {(0, 1), (2, 3), (0, 2), (1, 3)}
        assert all(min(d["n_blocks"]) >= 5 for d in dips.values())
        assert max(abs(d["dip_sigma"]) for d in dips.values()) < 0.15
    count = np.sum(scene["feet"], axis=0)
    both = scene["feet"][0] & scene["feet"][1] & (count == 2)
    dips = _dips(scene, scene["perfect"] - np.where(both[..., None], 2.0 * scene["sigma"], 0.0))
    np.testing.assert_allclose(dips[(0, 1)]["dip_sigma_rgb"], -2.0, atol=0.15)
    assert max(abs(d["dip_sigma"]) for k, d in dips.items() if k != (0, 1)) < 0.15


def test_panel_star_scales_read_a_tile_gain(scene):
    """Per tile, the scale from the 10-20 stars where it alone covers: ~0.5 % each on this scene."""
    _scales, spread = pt.panel_star_scales(scene["perfect"], scene["truth"], scene["feet"])
    assert spread < 0.01
    brighter = np.where(scene["feet"][2][..., None], 1.05 * scene["perfect"], scene["perfect"])
    scales, spread = pt.panel_star_scales(brighter, scene["truth"], scene["feet"])
    assert spread == pytest.approx(0.05, abs=0.01)
    np.testing.assert_allclose(scales[2] / np.median(scales, axis=0), 1.05, atol=0.01)
