"""Seamless mosaics under an alt-az night's light pollution (sky backgrounds from differences).

The scene (``photometry_truth.gradient_scene_options``): 2x2 panels whose sky levels differ by up
to 20 %, each with its own gradient fixed to the sensor (6-18 % of the sky peak to peak, either
sign, plus a light dome), panel 2 observed on two "nights" of opposite gradients, nebulosity
crossing every overlap, the field turning. Every figure is measured against the truth.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

import photometry_truth as pt
import zemosaic_background as zbg
import zemosaic_fits as zf
import zemosaic_synth
import zemosaic_worker as zw
from zemosaic_config import config_from_dict

STEP_LIMIT_SIGMA = 0.3  # the target for a seam, in sky sigmas of one panel's stack


def _scene(root, nebula=True):
    options = pt.gradient_scene_options(size="small", overlap=0.3, frames_per_panel=8)
    options["nebula"] = nebula
    zemosaic_synth.generate_dataset(root, **options)
    return root


def _run(root, out, **changes):
    config = config_from_dict({"input_folder": str(root / "frames"), "output_folder": str(out),
                               "num_processing_workers": 1, **changes})
    result = zw.run_mosaic(config)
    mosaic, wcs, _cov, header = zf.read_image_fits(result.paths["mosaic"])
    return {"mosaic": mosaic, "wcs": wcs, "header": header, "out": out, "report": result.report.to_dict()}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    base = tmp_path_factory.mktemp("gradients")
    root = _scene(base / "scene")
    run = _run(root, base / "out")
    shape = run["mosaic"].shape[:2]
    run.update(root=root, shape=shape, truth=pt.truth_on_grid(root, run["wcs"], shape),
               feet=pt.master_tile_footprints(run["out"], run["wcs"], shape, min_frames=3))
    run["base"] = base
    return run


def test_no_seam_steps_across_tile_edges(scene):
    steps = pt.seam_steps(scene["mosaic"], scene["truth"], scene["feet"])
    assert len(steps) >= 8  # every tile's edges inside its neighbours
    worst = max(abs(s["step_sigma"]) for s in steps)
    assert worst < STEP_LIMIT_SIGMA, steps


def test_constant_sky_offsets_leave_steps_on_this_scene(scene):
    """The scene is hard enough to fail the previous design (one offset per frame and per tile)."""
    old = _run(scene["root"], scene["base"] / "offsets", background_model_order=0, assembly_feather_px=0.0)
    steps = pt.seam_steps(old["mosaic"], scene["truth"], scene["feet"])
    assert max(abs(s["step_sigma"]) for s in steps) > 2.0


def _corrected_tiles(run, shape):
    """The master tiles of a run with the gains and backgrounds the report gives them, on the mosaic grid."""
    model = run["report"]["tile_background_model"]
    images = []
    for path, entry in zip(sorted(Path(run["out"], zw.TILES_DIR).glob("master_tile_0*.fits")),
                           sorted(run["report"]["tiles"], key=lambda e: e["index"])):
        image, wcs, coverage, _hdr = zf.read_image_fits(path)
        on_grid, _ = zw.reproject_and_coadd([image], [wcs], run["wcs"], shape, [coverage])
        background = zbg.BackgroundModels(np.array([entry["background"]]), model["order"],
                                          tuple(model["origin_yx"]), model["scale_px"])
        # The models live on the grid the overlaps were measured on (the report names it).
        y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
        x_m, y_m = zf.wcs_from_text(model["grid_wcs"]).world_to_pixel_values(*run["wcs"].pixel_to_world_values(x, y))
        images.append(on_grid * np.asarray(entry["gain_rgb"]) - background.values(0, y_m, x_m))
    return images


def _overlap_medians(run, feet, truth):
    """Median of the corrected tiles' difference over 32 px blocks of each overlap (ADU, per channel)."""
    images = _corrected_tiles(run, truth.shape[:2])
    stars = binary_dilation(pt._star_pixels(truth), iterations=3)
    medians = []
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            both = feet[i] & feet[j] & ~stars
            if both.sum() < 5000:
                continue
            blocks = zw.block_mean(np.where(both[..., None], images[i] - images[j], np.nan), 32)
            solid = zw.block_mean(both[..., None].astype(np.float32), 32)[..., 0] > 0.5
            medians.append(np.nanmedian(blocks[solid], axis=0))
    return np.array(medians)


@pytest.mark.parametrize("order, limit", [(1, 0.3), (2, 0.15)])
def test_tiles_agree_in_their_overlaps_after_matching(scene, order, limit):
    """What feathering would hide: the tiles' own disagreement in their overlaps, in sky sigmas.

    A plane (the default) cannot follow two panels' different light domes: a quarter of a sigma
    is left in the worst overlap; a quadric (order 2) follows them.
    """
    run = scene if order == 1 else _run(scene["root"], scene["base"] / f"order{order}",
                                        background_model_order=order)
    noise = pt.pixel_noise(scene["mosaic"] - scene["truth"] * pt.star_scale(scene["mosaic"], scene["truth"]),
                           np.isfinite(scene["mosaic"]).all(axis=-1) & ~pt._star_pixels(scene["truth"]))
    medians = _overlap_medians(run, scene["feet"], scene["truth"])
    assert len(medians) >= 5
    assert np.abs(medians / noise).max() < limit, medians / noise


def test_frames_of_two_nights_get_their_own_gradients(scene):
    """Panel 2's two nights have opposite vertical gradients (18 % and -10 % of the sky): the frame
    models' vertical slopes differ by what the truth says, once the frames' gains are applied."""
    meta = json.loads((scene["root"] / "truth" / "truth.json").read_text())
    truth_frames = {f["file"]: f for f in meta["frames"]}
    tile = next(t for t in scene["report"]["tiles"]
                if Path(t["frame_photometry"][0]["path"]).name.startswith("Light_panel02"))
    image, *_ = zf.read_image_fits(Path(scene["out"], tile["file"]))
    height, width = image.shape[:2]
    scale = max(height, width) / 2.0
    v_term = zbg.model_terms(1).index((0, 1))
    found, expected = [], []
    for frame in tile["frame_photometry"]:
        truth = truth_frames[Path(frame["path"]).name]
        gain = frame["gain_rgb"][1]
        # sky factor 1 + gy * (y / (H - 1) - 1/2) on the pedestal: a slope of pedestal * gy / (H - 1) per row
        frame_height = meta["frame_shape"][0]
        expected.append(gain * truth["sky_pedestal_rgb"][1] * truth["sky_gradient"][1] / (frame_height - 1))
        found.append(frame["background"][1][v_term] / scale)
    found, expected = np.array(found), np.array(expected)
    # Up to their common part (the models average zero), the slopes are the truth's within 3 %.
    assert np.ptp(expected) > 0.1  # the nights really differ
    np.testing.assert_allclose(found - found.mean(), expected - expected.mean(), atol=0.03 * np.ptp(expected))


def test_nebula_is_kept_whole(scene):
    """The same scene without its nebula, through the same pipeline: each mosaic divided by its own
    flux scale (from its stars), their difference is the nebula as the pipeline renders it,
    background models and all, plus the smooth difference of the two runs' remaining skies. Fitted
    as ``k * nebula + a quadric``, k is the fraction of the nebula's flux kept: 1 within 2 %."""
    flat_root = _scene(scene["base"] / "flat", nebula=False)
    flat = _run(flat_root, scene["base"] / "flat_out")
    assert flat["mosaic"].shape == scene["mosaic"].shape
    flat_truth = pt.truth_on_grid(flat_root, flat["wcs"], scene["shape"])
    difference = (scene["mosaic"] / pt.star_scale(scene["mosaic"], scene["truth"])
                  - flat["mosaic"] / pt.star_scale(flat["mosaic"], flat_truth))
    nebula = pt.nebula_on_grid(scene["root"], scene["wcs"], scene["shape"])
    stars = binary_dilation(pt._star_pixels(scene["truth"]), iterations=2)
    usable = (np.all(np.isfinite(difference), axis=-1) & ~stars).astype(float)
    count = pt._blocks(usable, np.sum)
    solid = count >= 0.5 * pt.BLOCK ** 2

    def block_means(image):
        return pt._blocks(np.nan_to_num(image) * usable, np.sum)[solid] / count[solid]

    rows, cols = (block_means(g.astype(float)) for g in np.mgrid[0:scene["shape"][0], 0:scene["shape"][1]])
    smooth = np.stack(pt._poly_terms(scene["shape"], 2, rows, cols), axis=1)
    for c in range(3):
        design = np.column_stack([smooth, block_means(nebula[..., c])])
        coefficients, *_ = np.linalg.lstsq(design, block_means(difference[..., c]), rcond=None)
        assert coefficients[-1] == pytest.approx(1.0, abs=0.02), c


def test_panel_gains_within_one_percent(scene):
    _scales, spread = pt.panel_star_scales(scene["mosaic"], scene["truth"], scene["feet"])
    assert spread < 0.01


def test_two_pass_moves_no_tile_and_keeps_the_seams(scene, caplog):
    """The seed's Two-Pass contract on this scene: the tiles already agree, so every gain stays 1."""
    tiles = []
    for k, path in enumerate(sorted(Path(scene["out"], zw.TILES_DIR).glob("master_tile_0*.fits"))):
        image, wcs, coverage, _hdr = zf.read_image_fits(path)
        tiles.append(zw.MasterTile(k, image, coverage, wcs, str(path), [], "", "cpu"))
    pass_one, _cov = zw.assemble_mosaic(zw.Run(config_from_dict({})), tiles, scene["wcs"], scene["shape"])
    with caplog.at_level("INFO", logger="zemosaic_worker"):
        two_pass, _cov = zw.assemble_mosaic(zw.Run(config_from_dict({"two_pass_coverage_renorm": True})),
                                            tiles, scene["wcs"], scene["shape"])
    assert "[TwoPass] tile gains: 1.0000, 1.0000, 1.0000, 1.0000" in caplog.text
    np.testing.assert_array_equal(two_pass, pass_one)


def test_final_background_extraction_flattens_the_sky_and_says_so(scene):
    """Off by default; on, the sky left in the mosaic (the panels' mean gradient) is taken away and
    the header and the report record it."""
    assert scene["header"]["BKGEXTR"] is False
    tiles_dir = Path(scene["out"], zw.TILES_DIR)
    out = scene["base"] / "extracted"
    out.mkdir()
    (out / zw.TILES_DIR).mkdir()
    for path in tiles_dir.iterdir():  # the tiles and their manifest: extraction does not change the tiles
        (out / zw.TILES_DIR / path.name).write_bytes(path.read_bytes())
    flat = _run(scene["root"], out, final_background_extraction=True)
    assert flat["header"]["BKGEXTR"] is True and flat["header"]["BKGXORD"] == 2
    assert flat["report"]["background_extraction"]["order"] == 2
    scale = pt.star_scale(scene["mosaic"], scene["truth"])
    usable = np.all(np.isfinite(scene["mosaic"]), axis=-1) & ~pt._star_pixels(scene["truth"])
    before = pt.background_fit(scene["mosaic"] - scale * scene["truth"], usable)
    after = pt.background_fit(flat["mosaic"] - scale * scene["truth"], usable)
    spread = [np.ptp(np.nanpercentile(b[usable], [2, 98], axis=0), axis=0) for b in (before, after)]
    assert np.all(spread[1] < 0.2 * spread[0]), spread
