"""Tile-to-tile photometry on synthetic Seestar scenes with known truth, and the display white balance.

Scenes: 2x2 panels of 480x270 frames, sky-dominated (sky ~3000 ADU), transparency 0.84-1.00, sky
pedestal jitter +-6 %; panel 1's signal 12 % too bright; panels 2 and 3 from a second night with
R and B gains 0.9 / 1.1 against G. Figures from ``photometry_truth``.
"""

import json

import numpy as np
import pytest

import photometry_truth as pt
import zemosaic_display as zdisp
import zemosaic_fits as zfits
import zemosaic_photometry as zph
import zemosaic_synth
import zemosaic_worker as zw
from zemosaic_config import config_from_dict

SCENE = {"transparency_range": (0.84, 1.0), "sky_pedestal_rgb": (2700.0, 3000.0, 2400.0),
         "pedestal_jitter": 0.06}


def _run(root, panel_gain_rgb):
    info = zemosaic_synth.generate_dataset(root, panels=(2, 2), frames_per_panel=4, seed=5,
                                           size="small", panel_gain_rgb=panel_gain_rgb, **SCENE)
    out = root / "out"
    config = config_from_dict({"input_folder": info["frames_dir"], "output_folder": str(out)})
    result = zw.run_mosaic(config)
    mosaic, wcs, _cov, header = zfits.read_image_fits(result.paths["mosaic"])
    truth = pt.truth_on_grid(root, wcs, mosaic.shape[:2])
    feet = pt.master_tile_footprints(out, wcs, mosaic.shape[:2])
    report = result.report.to_dict()
    return {"mosaic": mosaic, "truth": truth, "feet": feet, "wcs": wcs, "header": header,
            "report": report, "out": out, "root": root,
            "figures": pt.panel_figures(mosaic, truth, feet),
            "coefficients": pt.coefficient_figures(root, report["tiles"])}


@pytest.fixture(scope="module")
def bright_panel(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("bright"), [1.0, 1.12, 1.0, 1.0])


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("nights"), [1.0, 1.0, (0.9, 1.0, 1.1), (0.9, 1.0, 1.1)])


def _load_tiles(out):
    tiles = []
    for k, path in enumerate(sorted((out / "master_tiles").glob("master_tile_0*.fits"))):
        image, wcs, coverage, _hdr = zfits.read_image_fits(path)
        tiles.append(zw.MasterTile(k, image, coverage, wcs, str(path), [], "", "cpu"))
    return tiles


def _two_pass(scene, **changes):
    tiles = _load_tiles(scene["out"])
    config = config_from_dict({"two_pass_coverage_renorm": True, **changes})
    run = zw.Run(config)
    shape = scene["mosaic"].shape[:2]
    mosaic, _cov = zw.assemble_mosaic(run, tiles, scene["wcs"], shape)
    return mosaic, [run.report.tile_entry(t.index)["two_pass_gain"] for t in tiles]


def test_panel_twelve_percent_off_brought_within_one_percent(bright_panel):
    figures = bright_panel["figures"]
    assert figures["gain_spread"] < 0.01, figures["panel_scale"]
    gains = np.array([np.mean(t["gain_rgb"]) for t in bright_panel["report"]["tiles"]])
    # Every tile sits at the level of its clearest frame, and panel 1 is 12 % too bright: the gains
    # must undo both, tile by tile (the tiles are in panel order), to the precision of the frame
    # gains that set each tile's level (about 1 % for these small frames).
    meta = json.loads((bright_panel["root"] / "truth" / "truth.json").read_text())
    clearest = np.zeros(4)
    for frame in meta["frames"]:
        clearest[frame["panel"]] = max(clearest[frame["panel"]], frame["transparency"])
    expected = 1.0 / (clearest * np.array([1.0, 1.12, 1.0, 1.0]))
    assert np.allclose(gains / np.median(gains), expected / np.median(expected), rtol=0.02), \
        (gains, expected)


def test_two_nights_panel_brightness_and_colour(two_nights):
    figures = two_nights["figures"]
    # Panels of different colour balance have no single brightness ratio (it depends on the
    # colour of the light compared): within 2 % here, against 8 % unmatched.
    assert figures["gain_spread"] < 0.02, figures["panel_scale"]
    # Without colour terms the spread is ~12 % (the nights differ by 0.9 / 1.1 in R and B).
    assert figures["colour_spread"] < 0.09, figures["panel_ratios"]


def test_colour_ratios_equal_within_one_percent_one_night(bright_panel):
    """Panel colours as the run's own coefficients make them (free of the mosaic's noise, which
    a colour figure on the mosaic cannot resolve below 1-2.5 % on these small scenes)."""
    figures = bright_panel["coefficients"]
    assert figures["colour_spread"] <= 0.01 and figures["gain_spread"] <= 0.01, figures


@pytest.mark.xfail(reason="0.75 % on this scene, but not in general: over seeds 5-12 of the same scene "
                          "the spread is 0.75-3.2 % (mean 2.1 %); each pair of overlapping tiles "
                          "measures its colour ratio to 0.5-3 %", strict=False)
def test_colour_ratios_equal_within_one_percent_two_nights(two_nights):
    figures = two_nights["coefficients"]
    assert figures["colour_spread"] <= 0.01, figures


@pytest.fixture(scope="module")
def two_nights_full_size(tmp_path_factory):
    """The two-night scene with frames of the Seestar's size (1080 x 1920 px, 4 per panel)."""
    root = tmp_path_factory.mktemp("nights_full")
    info = zemosaic_synth.generate_dataset(root, panels=(2, 2), frames_per_panel=4, seed=5, size="full",
                                           panel_gain_rgb=[1.0, 1.0, (0.9, 1.0, 1.1), (0.9, 1.0, 1.1)], **SCENE)
    config = config_from_dict({"input_folder": info["frames_dir"], "output_folder": str(root / "out")})
    return root, zw.run_mosaic(config).report.to_dict()


@pytest.mark.slow
def test_full_size_frames_reach_one_percent_between_panels_and_half_a_percent_per_frame(two_nights_full_size):
    """Where the overlaps are as wide as a real mosaic's, the two nights' panels agree in colour and
    brightness within 1 % (0.90 % here; 0.33-0.90 % over seeds 5-12, against 0.75-3.2 % on the
    small frames, whose overlaps hold too few stars), and the frames' gains match their true
    transparencies to 0.5 % rms (0.20 % here, 0.12-0.28 % over seeds 5-12; the largest single error
    is 0.59 %; the gains are grey: one night per panel)."""
    import json

    root, report = two_nights_full_size
    figures = pt.coefficient_figures(root, report["tiles"])
    assert figures["colour_spread"] <= 0.01 and figures["gain_spread"] <= 0.01, figures
    meta = json.loads((root / "truth" / "truth.json").read_text())
    transparency = {f["file"]: f["transparency"] for f in meta["frames"]}
    errors = []
    for tile in report["tiles"]:
        levels = np.array([np.asarray(f["gain_rgb"]) * transparency[f["path"].rsplit("/", 1)[-1]]
                           for f in tile["frame_photometry"]])
        errors.append(levels / np.median(levels, axis=0) - 1)
    errors = np.concatenate(errors)
    assert np.sqrt(np.mean(errors**2)) <= 0.005 and np.max(np.abs(errors)) <= 0.01, errors


def test_two_nights_colour_within_two_percent(two_nights):
    """Without colour terms the panels of the two nights would be 11 % apart in R/G and B/G."""
    figures = two_nights["coefficients"]
    assert figures["colour_spread"] < 0.02 and figures["gain_spread"] < 0.01, figures


def test_seams_below_three_tenths_of_sky_noise(bright_panel, two_nights):
    for scene in (bright_panel, two_nights):
        assert scene["figures"]["seam_step"] <= 0.3


def test_figures_resolve_the_targets(bright_panel):
    """The seam and brightness figures are precise enough to test 0.3 sigma and 1 %: a perfect
    mosaic of the same scene, with the same noise, scores far below both."""
    for seed in range(3):
        perfect = pt.perfect_mosaic(bright_panel["mosaic"], bright_panel["truth"], seed)
        figures = pt.panel_figures(perfect, bright_panel["truth"], bright_panel["feet"])
        assert figures["seam_step"] < 0.15 and figures["gain_spread"] < 0.006, figures


def test_two_pass_never_worse_than_pass_one_and_deterministic(bright_panel):
    pass1 = bright_panel["figures"]
    mosaic, gains = _two_pass(bright_panel)
    again, gains_again = _two_pass(bright_panel)
    assert gains == gains_again and np.array_equal(mosaic, again, equal_nan=True)
    pass2 = pt.panel_figures(mosaic, bright_panel["truth"], bright_panel["feet"])
    # On these small 4-frame tiles the tile levels move by ~0.3 % and one Two-Pass gain by ~1 % when
    # every frame's alignment moves by 0.03 px (measured), hence the margins.
    assert pass2["gain_spread"] <= pass1["gain_spread"] + 0.003
    assert pass2["seam_step"] <= pass1["seam_step"] + 0.05
    assert all(abs(g - 1) < 0.015 for g in gains), gains  # pass-1 tiles agree: nothing to move


def test_white_balance_recorded_not_applied(bright_panel):
    header, report = bright_panel["header"], bright_panel["report"]
    gains = [header["WBGAINR"], header["WBGAING"], header["WBGAINB"]]
    assert gains == pytest.approx(report["white_balance"]["gains_rgb"], abs=1e-4)
    assert gains[1] == 1.0 and report["white_balance"]["source"] == "stars"
    # The FITS stays in the sensor's colours: its colour ratios follow the truth, not the gains.
    r_g, b_g = bright_panel["figures"]["mosaic_ratios"]
    assert r_g == pytest.approx(1.0, abs=0.03) and b_g == pytest.approx(1.0, abs=0.03)


def _star_image(response, sky=(900.0, 1000.0, 800.0), seed=1):
    """Grey stars seen through a sensor colour ``response`` on a coloured sky, with noise."""
    rng = np.random.default_rng(seed)
    image = np.zeros((300, 300, 3), np.float32)
    yy, xx = np.mgrid[:300, :300]
    for _ in range(150):
        y, x, flux = rng.uniform(5, 295), rng.uniform(5, 295), 10 ** rng.uniform(3, 4.3)
        star = flux / (2 * np.pi * 1.5**2) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * 1.5**2))
        image += star[..., None] * np.asarray(response, np.float32)
    image += np.asarray(sky, np.float32) + rng.normal(0, 5, image.shape).astype(np.float32)
    image[:10] = np.nan  # no data stays no data
    return image


def test_white_balance_makes_stars_white():
    response = (0.8, 1.0, 0.9)  # a green-heavy one-shot-colour sensor
    wb = zph.white_balance(_star_image(response))
    assert wb.source == "stars"
    assert wb.gains == pytest.approx([1 / 0.8, 1.0, 1 / 0.9], rel=0.01)
    assert wb.sky == pytest.approx([900, 1000, 800], abs=2)


def test_stretch_with_white_balance_has_neutral_sky_and_white_stars():
    image = _star_image((0.8, 1.0, 0.9))
    wb = zph.white_balance(image)
    rgb = zdisp.stretch_for_display(image, wb.gains).astype(float)
    plain = zdisp.stretch_for_display(image).astype(float)
    # The sky: pixels well away from every star (none of their channels 3 sigma above the sky).
    from scipy.ndimage import binary_dilation

    starlit = binary_dilation(np.any(image - np.array([900.0, 1000.0, 800.0]) > 15.0, axis=-1), iterations=3)
    sky = np.median(rgb[20:][~starlit[20:]], axis=0)
    assert np.ptp(sky) <= 2  # neutral sky
    lum = rgb.mean(axis=-1)
    stars = (lum > np.percentile(lum, 99)) & (lum < 250)
    assert np.ptp(rgb[stars].mean(axis=0)) < 0.03 * rgb[stars].mean()  # white on average
    assert np.ptp(plain[stars].mean(axis=0)) > np.ptp(rgb[stars].mean(axis=0))
    assert np.all(rgb[:10] == 0)  # NaN is black


def test_colour_terms_shrink_together_keeping_their_ratios():
    """A tile of another night whose G term is imprecise: its R, G and B terms are damped by one
    factor, so the colour ratios between its channels stay as measured (a G term shrunk alone,
    to a third here, moved R/G and B/G by ~1 %)."""
    import zemosaic_tile_photometry as zp

    d = np.array([0.0, np.log(1.10), np.log(0.99), np.log(0.90)])  # grey, then R, G, B
    sigma = np.array([0.01, 0.006, 0.02, 0.008])
    pairs = [(0, 1, d, sigma), (0, 2, d, sigma), (1, 2, np.zeros(4), sigma)]
    colour = zp._colour_terms(3, pairs, 1)
    relative = colour[0] - colour[1]  # tile 0 against the others, per channel
    measured = -(d[1:] - d[0])
    factor = relative / measured
    assert np.allclose(factor, factor[0], rtol=1e-6) and 0.9 < factor[0] <= 1.0, factor


def test_a_large_colour_change_is_applied_even_when_measured_coarsely():
    """Another night's balance (B 15 % off) measured to 3 % per pair: applied, not dropped."""
    import zemosaic_tile_photometry as zp

    d = np.array([0.0, 0.0, 0.0, np.log(1.15)])  # tile 0 ~ s * tile 1: grey, then R, G, B
    pairs = [(0, 1, d, np.full(4, 0.03)), (0, 2, d, np.full(4, 0.03)), (1, 2, np.zeros(4), np.full(4, 0.03))]
    colour = zp._colour_terms(3, pairs, 1)
    relative_b = np.exp(colour[1, 2] - colour[0, 2])  # tile 1's B gain over tile 0's
    assert abs(relative_b - 1.15) < 0.02
    assert np.allclose(colour[1], colour[2]) and abs(colour[0, 0] - colour[1, 0]) < 1e-9


def test_colour_terms_at_their_noise_are_not_applied():
    import zemosaic_tile_photometry as zp

    d = np.array([0.0, 0.02, 0.0, -0.03])
    pairs = [(0, 1, d, np.full(4, 0.03)), (0, 2, d, np.full(4, 0.03)), (1, 2, np.zeros(4), np.full(4, 0.03))]
    assert np.all(zp._colour_terms(3, pairs, 1) == 0.0)
