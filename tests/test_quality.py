"""Frame quality measures, screening and the reference choice (zemosaic_quality).

A synthetic group (the project's generator, small frames): eight normal frames, a cloudy one
(transparency 0.3 and a sky 1.6 times brighter), one crossed by a satellite and a defocused one
(FWHM twice the others'). Screening must leave out exactly the cloudy and the defocused frames,
each for its own reason; the trail frame stays in but is never the reference. On the shared real
subs nothing is left out and no trail is seen.
"""

import dataclasses
import json
import math
import re

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import zemosaic_align_stack as zas
import zemosaic_fits as zf
import zemosaic_quality as zq
import zemosaic_synth as zs
from zemosaic_config import ConfigError, MosaicConfig
from zemosaic_utils import mad_sigma, sky_level

from realdata import NGC7023 as REALDATA

N_NORMAL = 8
CLOUD, TRAIL, DEFOCUS = N_NORMAL, N_NORMAL + 1, N_NORMAL + 2
NORMAL = list(range(N_NORMAL))
SEED = 5


def _render_over(path, model, entry, shape, transparency, sky_factor, hot, index):
    """Write a new raw frame over ``path`` (same header and WCS) from ``model``."""
    header = fits.getheader(path)
    raw = zs.make_bayer_frame(model, WCS(header), shape, transparency=transparency,
                              sky_pedestal_rgb=np.asarray(entry["sky_pedestal_rgb"]) * sky_factor,
                              rng=np.random.default_rng([SEED, 99, index]), hot_pixels=hot)
    fits.PrimaryHDU(data=raw, header=header).writeto(path, overwrite=True)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    """Return ``(dataset folder, truth metadata, frames, star lists, qualities)`` of the synthetic group."""
    out = tmp_path_factory.mktemp("quality")
    # Four times the default star density: a small frame then lists about as many stars (~90) as
    # a full Seestar frame does (the star finder keeps 150), so a cloud shows in the star measures
    # as it would there.
    ds = zs.generate_dataset(out, panels=(1, 1), frames_per_panel=N_NORMAL + 3, seed=SEED,
                             size="small", satellite_frame=TRAIL, star_density=4 * zs.DEFAULT_STAR_DENSITY)
    meta = json.loads(open(ds["truth_json"]).read())
    model = zs.load_sky_model(out)
    hot = (np.array([p[0] for p in meta["hot_pixels"]]), np.array([p[1] for p in meta["hot_pixels"]]),
           np.array(meta["hot_pixel_adu"]))
    shape = ds["frame_shape"]
    _render_over(ds["frame_paths"][CLOUD], model, meta["frames"][CLOUD], shape, 0.3, 1.6, hot, CLOUD)
    defocused = dataclasses.replace(model, fwhm_px=2.0 * model.fwhm_px)
    _render_over(ds["frame_paths"][DEFOCUS], defocused, meta["frames"][DEFOCUS], shape,
                 meta["frames"][DEFOCUS]["transparency"], 1.0, hot, DEFOCUS)
    frames = [zf.load_frame(p).data for p in ds["frame_paths"]]
    stars = [zas.alignment_stars(f) for f in frames]
    qualities = [zq.frame_quality(f, s) for f, s in zip(frames, stars)]
    return out, meta, frames, stars, qualities


# --------------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------------


def test_fwhm_tells_the_defocused_frame(group):
    *_, qualities = group
    normal = [qualities[i].fwhm_px for i in NORMAL]
    # The generator's PSF has FWHM 2.7 px; bilinear debayering widens it by ~0.3 px.
    assert all(2.7 <= f <= 3.3 for f in normal), normal
    assert np.ptp(normal) < 0.1  # the same seeing in every frame: the measure's own scatter
    assert 1.7 <= qualities[DEFOCUS].fwhm_px / np.median(normal) <= 2.1
    assert all(q.n_measured >= zq.MIN_FWHM_STARS for q in qualities)
    assert all(1.0 <= q.elongation < 1.15 for q in qualities)  # round stars


@pytest.mark.parametrize("sigma_x, sigma_y, angle", [(1.15, 1.15, 0.0), (2.3, 2.3, 0.0), (1.5, 1.0, 0.6)])
def test_adaptive_moments_are_exact_on_gaussians(sigma_x, sigma_y, angle):
    d = np.arange(2 * zq.STAR_RADIUS_PX + 1) - zq.STAR_RADIUS_PX
    yy, xx = np.meshgrid(d, d, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * (xx - 0.3) + s * (yy + 0.4), -s * (xx - 0.3) + c * (yy + 0.4)  # off the pixel centre
    light = 800.0 * np.exp(-u**2 / (2 * sigma_x**2) - v**2 / (2 * sigma_y**2))
    variance, elongation, flux = zq.adaptive_moments(light[None], np.zeros((1, 2)))
    assert variance[0] == pytest.approx(sigma_x * sigma_y, rel=1e-3)
    assert elongation[0] == pytest.approx(sigma_x / sigma_y, rel=1e-3)
    assert flux[0] == pytest.approx(800.0 * 2 * math.pi * sigma_x * sigma_y, rel=0.03)


def test_background_and_noise_match_the_noiseless_truth(group):
    out, meta, frames, _, qualities = group
    model = zs.load_sky_model(out)
    for i in (0, 3, 5):
        expected = zs.expected_frame_rgb(out, i, model)
        truth_sky = sky_level(expected.mean(axis=-1).ravel())
        # The truth of the noise: the spread of the frame about its noiseless expectation. The
        # measure reads it exactly on that residual; on the frame, what its second differences
        # keep of the faint stars and the nebula's texture adds 12-15 %: within 25 %.
        residual = (frames[i] - expected).mean(axis=-1)
        truth_noise = float(mad_sigma(residual.ravel()))
        q = qualities[i]
        assert truth_noise < q.noise < 1.25 * truth_noise, (i, q.noise, truth_noise)
        # The noise widens the nebula's skewed distribution of levels, whose peak moves up a
        # little (0.5 sigma on these frames): the sky level, not the pedestal, to a noise sigma.
        assert abs(q.background - truth_sky) < q.noise, (i, q.background, truth_sky)
        assert len(q.background_rgb) == 3
        assert q.background == pytest.approx(np.mean(q.background_rgb), abs=q.noise)


def test_cloud_dims_the_stars_and_brightens_the_sky(group):
    *_, qualities = group
    normal = [qualities[i] for i in NORMAL]
    cloud = qualities[CLOUD]
    assert cloud.background > 1.5 * max(q.background for q in normal)
    assert cloud.n_stars < min(q.n_stars for q in normal)
    # Transparency 0.3 (0.32 of the clear frames'): the faint stars drop out of the list, so the
    # measured ones' typical flux falls less, and their light, number times flux, to about half.
    assert cloud.star_light < 0.55 * min(q.star_light for q in normal)
    assert cloud.star_flux < min(q.star_flux for q in normal)


def test_trail_flag_finds_the_satellite_and_nothing_else(group):
    _, meta, _, _, qualities = group
    assert [i for i, q in enumerate(qualities) if q.trail] == [TRAIL]
    q = qualities[TRAIL]
    sat = meta["frames"][TRAIL]["satellite"]
    truth_angle = math.degrees(math.atan2(sat["y1"] - sat["y0"], sat["x1"] - sat["x0"])) % 180.0
    assert abs((q.trail_angle_deg - truth_angle + 90.0) % 180.0 - 90.0) < 2.0
    assert q.trail_fraction > 0.9
    assert q.trail_length_px > 0.9 * math.hypot(sat["x1"] - sat["x0"], sat["y1"] - sat["y0"])
    assert all(qualities[i].trail_fraction < 0.2 for i in NORMAL)


def test_no_trail_on_nan_borders_hot_pixels_or_dense_stars(group, tmp_path):
    out, meta, frames, _, _ = group
    frame = frames[0]
    h, w = frame.shape[:2]
    # A rotated footprint in a larger canvas, NaN around it: its straight edges are not trails.
    yy, xx = np.mgrid[0:h, 0:w]
    u = (xx - w / 2) * math.cos(0.2) + (yy - h / 2) * math.sin(0.2)
    v = -(xx - w / 2) * math.sin(0.2) + (yy - h / 2) * math.cos(0.2)
    bordered = np.where(((np.abs(u) < 0.4 * w) & (np.abs(v) < 0.4 * h))[..., None], frame, np.nan)
    uncorrected = zf.load_frame(out / "frames" / meta["frames"][0]["file"], hot_pixels=False).data
    dense = zs.generate_dataset(tmp_path, panels=(1, 1), frames_per_panel=1, seed=7, size="small",
                                satellite=False, star_density=10 * zs.DEFAULT_STAR_DENSITY)
    crowded = zf.load_frame(dense["frame_paths"][0]).data
    for image in (bordered, uncorrected, crowded, np.full_like(frame, np.nan)):
        q = zq.frame_quality(image, zas.alignment_stars(image))
        assert not q.trail and q.trail_fraction < 0.2


def test_quality_is_strict_json(group):
    *_, qualities = group
    for q in qualities:
        data = q.to_dict()
        assert json.loads(json.dumps(data, allow_nan=False)) == data
        assert set(data) == {f.name for f in dataclasses.fields(q)} | {"star_light"}
    empty = zq.frame_quality(np.full((64, 64, 3), np.nan, np.float32), np.zeros((0, 2)))
    assert empty.n_stars == 0 and math.isnan(empty.fwhm_px) and empty.star_light == 0.0
    assert empty.to_dict()["fwhm_px"] is None and empty.to_dict()["trail"] is False


def test_mono_frame(group):
    _, _, frames, stars, qualities = group
    mono = zq.frame_quality(frames[0][..., 1:2], stars[0])
    assert mono.background_rgb == ()
    assert mono.fwhm_px == pytest.approx(qualities[0].fwhm_px, rel=0.1)


# --------------------------------------------------------------------------------------------------
# Screening
# --------------------------------------------------------------------------------------------------


def test_screening_leaves_out_the_cloudy_and_the_defocused_frames(group):
    *_, qualities = group
    screened = zq.screen_frames(qualities, MosaicConfig())
    assert sorted(screened) == [CLOUD, DEFOCUS]
    number = r"\d+(\.\d+)?"
    assert re.fullmatch(rf"FWHM {number} px against the group's {number} px \(limit {number} px\)",
                        screened[DEFOCUS])
    assert "star light" in screened[CLOUD] and "background" in screened[CLOUD]
    assert "FWHM" not in screened[CLOUD]


def test_screening_thresholds_and_switch(group):
    *_, qualities = group
    assert zq.screen_frames(qualities, MosaicConfig(frame_screening=False)) == {}
    assert zq.screen_frames([qualities[CLOUD], qualities[DEFOCUS]], MosaicConfig()) == {}
    # Looser limits keep the frames in: each test is its ratio's.
    lenient = MosaicConfig(screen_max_fwhm_ratio=2.5, screen_max_background_ratio=2.0,
                           screen_min_star_fraction=0.1)
    assert zq.screen_frames(qualities, lenient) == {}
    # A kappa wider than the group's spread keeps them in too.
    assert zq.screen_frames(qualities, MosaicConfig(screen_kappa=1000.0)) == {}


def _quality(n_stars=150, fwhm=2.7, flux=1e4, background=900.0, trail=False):
    return zq.FrameQuality(n_stars=n_stars, n_measured=min(n_stars, 140), fwhm_px=fwhm, elongation=1.05,
                           star_flux=flux, background=background, background_rgb=(), noise=20.0,
                           trail=trail, trail_fraction=0.9 if trail else 0.0,
                           trail_length_px=400.0 if trail else 0.0, trail_angle_deg=math.nan)


def test_screening_needs_both_the_ratio_and_the_spread():
    # A steady group: the ratio decides; a frame 40 % brighter stays, 60 % goes.
    steady = [_quality(background=900.0 + k) for k in range(6)]
    assert zq.screen_frames(steady + [_quality(background=1260.0)], MosaicConfig()) == {}
    assert list(zq.screen_frames(steady + [_quality(background=1440.0)], MosaicConfig())) == [6]
    # The sky brightening steadily over the night (a ramp to twice the first level): never an outlier.
    ramp = [_quality(background=900.0 * (1 + k / 9)) for k in range(10)]
    assert zq.screen_frames(ramp, MosaicConfig()) == {}
    # Too few stars, or too little star light: with the numbers in the reasons.
    few = steady + [_quality(n_stars=400), _quality(n_stars=160)]
    assert zq.screen_frames(few, MosaicConfig()) == {}
    few = steady + [_quality(n_stars=60), _quality(n_stars=120)]
    assert zq.screen_frames(few, MosaicConfig()) == {
        6: "stars 60 against the group's 150 (limit 75); "
           "star light 600,000 ADU against the group's 1,400,000 ADU (limit 700,000 ADU)"}
    dim = steady + [_quality(flux=4000.0)]
    assert zq.screen_frames(dim, MosaicConfig()) == {
        6: "star light 560,000 ADU against the group's 1,400,000 ADU (limit 700,000 ADU)"}
    # A frame not measured (no FWHM) is not screened for its FWHM.
    assert zq.screen_frames(steady + [_quality(fwhm=math.nan)], MosaicConfig()) == {}


# --------------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------------


def test_trail_frame_is_kept_but_never_the_reference(group):
    *_, qualities = group
    screened = zq.screen_frames(qualities, MosaicConfig())
    assert TRAIL not in screened
    for others in ([0, 1, 2, 3], [CLOUD, DEFOCUS, 4, 5], [7, 6]):
        chosen, reason = zq.choose_reference(qualities, [TRAIL] + others, screened)
        assert chosen not in (TRAIL, CLOUD, DEFOCUS)
        assert f"frame {TRAIL} has a trail" in reason
    chosen, reason = zq.choose_reference(qualities, [CLOUD, DEFOCUS, 2], screened)
    assert chosen == 2 and f"frame {CLOUD} is screened out" in reason


def test_reference_by_score_ties_to_the_nearest():
    qualities = [_quality(), _quality(n_stars=148, fwhm=2.68), _quality(n_stars=150, fwhm=2.2),
                 _quality(n_stars=300)]
    # Within 5 % of each other: the nearest the centre.
    assert zq.choose_reference(qualities, [0, 1])[0] == 0
    assert zq.choose_reference(qualities, [1, 0])[0] == 1
    # Sharper stars (score +51 %): the second nearest wins, and the reason says why.
    chosen, reason = zq.choose_reference(qualities, [0, 2, 1], names=["a.fit", "b.fit", "c.fit", "d.fit"])
    assert chosen == 2
    assert reason.startswith("c.fit (2nd nearest the centre): 150 stars, FWHM 2.20 px, the best score")
    assert "a.fit scores 20.58 (150 stars, FWHM 2.70 px)" in reason
    # Twice the stars at the same FWHM.
    assert zq.choose_reference(qualities, [0, 1, 3])[0] == 3


def test_reference_when_every_candidate_is_unfit():
    qualities = [_quality(trail=True), _quality(trail=True), _quality()]
    chosen, reason = zq.choose_reference(qualities, [0, 1, 2], screened={2: "FWHM ..."})
    assert chosen == 0 and "none of the 3 frames nearest the centre is fit" in reason
    chosen, _ = zq.choose_reference(qualities, [2, 1], screened={2: "FWHM ...", 1: "stars ..."})
    assert chosen == 2  # all screened out: the nearest
    with pytest.raises(ValueError):
        zq.choose_reference(qualities, [])


def test_centre_order():
    ra = [10.0, 10.2, 10.1, 9.7]
    dec = [20.0, 20.0, 20.05, 20.0]
    assert zq.centre_order(ra, dec) == [0, 2, 1, 3]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("frame_screening", 1),
    ("screen_min_star_fraction", 0.0),
    ("screen_min_star_fraction", 1.5),
    ("screen_max_fwhm_ratio", 0.9),
    ("screen_max_background_ratio", "2"),
    ("screen_kappa", 0),
    ("screen_kappa", float("nan")),
])
def test_screening_keys_are_validated(key, value):
    with pytest.raises(ConfigError) as info:
        MosaicConfig(**{key: value})
    assert info.value.key == key and key in str(info.value) and "expected" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Real subs
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not REALDATA.is_dir(), reason="shared real Seestar frames not present")
def test_real_subs_are_all_kept_and_show_no_trail():
    paths = sorted(REALDATA.glob("*.fit"))
    assert len(paths) == 6
    qualities = []
    for path in paths:
        frame = zf.load_frame(path, require_wcs=False).data
        qualities.append(zq.frame_quality(frame, zas.alignment_stars(frame)))
    assert zq.screen_frames(qualities, MosaicConfig()) == {}
    assert not any(q.trail for q in qualities)
    assert all(q.n_stars >= 100 and q.n_measured >= 100 for q in qualities)
    assert all(2.2 <= q.fwhm_px <= 3.3 for q in qualities)  # Seestar: 2-3 px
    # The two nights: a bright sky in 2024 (10 s), a dark one in 2025 (20 s).
    assert all(700 < q.background < 800 for q in qualities[:4])
    assert all(90 < q.background < 130 for q in qualities[4:])


def test_pipeline_leaves_out_the_cloud_and_the_defocus_and_centres_on_no_trail(group, tmp_path, monkeypatch):
    """The whole run: the cloudy and the defocused frames are skipped with their reasons in the
    report, every other frame is stacked, and the trail frame, made the nearest the centre, is
    passed over as the reference (the reason says so)."""
    import zemosaic_worker as zw
    from zemosaic_config import config_from_dict

    out, *_ = group
    real_order = zq.centre_order
    monkeypatch.setattr(zq, "centre_order",
                        lambda ra, dec: [TRAIL] + [i for i in real_order(ra, dec) if i != TRAIL])
    config = config_from_dict({"input_folder": str(out / "frames"), "output_folder": str(tmp_path / "run"),
                               "num_processing_workers": 1})
    zw.run_mosaic(config)
    report = json.loads((tmp_path / "run" / "zemosaic_run.json").read_text())
    name = lambda k: f"Light_panel00_{k:03d}.fits"  # noqa: E731
    skipped = {p["path"].split("/")[-1]: p["reason"] for p in report["frames_skipped"]}
    assert set(skipped) == {name(CLOUD), name(DEFOCUS)}, skipped
    assert skipped[name(CLOUD)].startswith("screened out: ") and "star light" in skipped[name(CLOUD)]
    assert "FWHM" in skipped[name(DEFOCUS)]
    (tile,) = report["tiles"]
    assert tile["frames"] == N_NORMAL + 1
    assert not tile["reference"].endswith(name(TRAIL))
    assert f"{name(TRAIL)} has a trail" in tile["reference_reason"]
    trail_entry = next(f for f in tile["frame_photometry"] if f["path"].endswith(name(TRAIL)))
    assert trail_entry["quality"]["trail"] is True
