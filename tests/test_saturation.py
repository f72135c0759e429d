"""Saturated pixels: flagged as frames load, carried to the tiles and the mosaic, shown white."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from astropy.io import fits
from scipy import ndimage

import zemosaic_display as zdisp
import zemosaic_fits as zfits
import zemosaic_master_tile as zmt
import zemosaic_synth
import zemosaic_worker as zw
from conftest import make_tan_wcs
from zemosaic_config import config_from_dict

from realdata import NGC7023

SEESTAR_LEVEL = 0.99 * 65535


def _write_raw(path, data, **cards):
    """Write a 2-D uint16 GRBG frame as a Seestar writes it (BITPIX 16, BZERO 32768)."""
    header = fits.Header({"BAYERPAT": "GRBG", **cards})
    hdu = fits.PrimaryHDU(np.asarray(data, np.uint16), header=header)
    hdu.writeto(path)
    return path


def test_saturation_level_from_the_cards_else_the_integer_range():
    assert zfits.saturation_level(fits.Header({"BITPIX": 16, "BZERO": 32768})) == pytest.approx(SEESTAR_LEVEL)
    assert zfits.saturation_level(fits.Header({"BITPIX": 16})) == pytest.approx(0.99 * 32767)
    assert zfits.saturation_level(fits.Header({"BITPIX": 8})) == pytest.approx(0.99 * 255)
    assert zfits.saturation_level(fits.Header({"BITPIX": 16, "BZERO": 32768, "DATAMAX": 60000})) == 60000
    assert zfits.saturation_level(fits.Header({"BITPIX": -32, "SATURATE": 1.5})) == 1.5
    assert zfits.saturation_level(fits.Header({"BITPIX": -32})) is None  # floats: nothing known to clip
    assert zfits.saturation_level(fits.Header({"BITPIX": 16, "DATAMAX": 60000}), override=50000) == 50000


def test_a_clipped_raw_sample_flags_every_pixel_its_debayer_reaches():
    raw = np.full((12, 12), 1000.0, np.float32)
    raw[5, 7] = 65535
    mask = zfits.saturated_pixels(raw, SEESTAR_LEVEL, bayer=True)
    expected = np.zeros((12, 12), bool)
    expected[4:7, 6:9] = True
    np.testing.assert_array_equal(mask, expected)
    rgb = np.full((4, 4, 3), 10.0)
    rgb[1, 2, 2] = 70000  # one channel clipped is enough
    assert np.argwhere(zfits.saturated_pixels(rgb, 65000, bayer=False)).tolist() == [[1, 2]]
    assert zfits.saturated_pixels(raw, None, bayer=True) is None


def test_load_flags_a_clipped_star_core_but_not_a_stuck_pixel(tmp_path):
    rng = np.random.default_rng(3)
    raw = rng.normal(1000, 20, (40, 40))
    yy, xx = np.mgrid[:40, :40]
    raw += 200000 * np.exp(-((yy - 20.3) ** 2 + (xx - 12.6) ** 2) / (2 * 1.3 ** 2))  # a star, clipped
    raw[30, 31] = 65535  # a hot pixel: corrected before flagging
    path = _write_raw(tmp_path / "f.fits", np.clip(raw, 0, 65535))
    frame = zfits.load_frame(path, require_wcs=False)
    assert frame.saturation == pytest.approx(SEESTAR_LEVEL)
    clipped = np.argwhere(np.clip(raw, 0, 65535) >= SEESTAR_LEVEL)
    flagged = np.argwhere(frame.saturated)
    assert len(clipped) >= 4
    assert {tuple(p) for p in clipped if tuple(p) != (30, 31)} <= {tuple(p) for p in flagged}
    assert not frame.saturated[29:32, 30:33].any()
    # Flagged pixels are the clipped core grown by one pixel, nothing farther.
    core = ndimage.binary_dilation(np.clip(raw, 0, 65535) >= SEESTAR_LEVEL, np.ones((3, 3)))
    core[29:32, 30:33] = False
    np.testing.assert_array_equal(frame.saturated, core)
    unflagged = zfits.load_frame(path, require_wcs=False, saturation_override=70000)
    assert not unflagged.saturated.any()


class _Rec:
    def __init__(self, wcs):
        self.wcs = wcs


def test_a_tile_pixel_is_saturated_when_half_the_frames_covering_it_clipped():
    wcs = make_tan_wcs(10.0, 20.0, (30, 30))
    shifted = make_tan_wcs(10.0, 20.0, (30, 30))
    shifted.wcs.crpix = [shifted.wcs.crpix[0] - 5, shifted.wcs.crpix[1]]  # its x = 5 is the others' 10
    shifted.wcs.set()
    tile = make_tan_wcs(10.0, 20.0, (30, 30))
    tile.wcs.crpix = [tile.wcs.crpix[0] + 0.5, tile.wcs.crpix[1] + 0.5]  # frame pixel 10 -> tile 10.5
    tile.wcs.set()
    measures = [zmt.FrameMeasures(None, None, None, (np.array([10]), np.array([10])), 64880.0),
                zmt.FrameMeasures(None, None, None, (np.array([10]), np.array([5])), 64880.0),
                zmt.FrameMeasures(None, None, None, (np.zeros(0, int), np.zeros(0, int)), 64880.0),
                zmt.FrameMeasures(None, None, None, (np.array([20]), np.array([20])), 64880.0)]
    coverage = np.full((30, 30), 4.0)
    coverage[20:, 20:] = 2.0
    mask = zmt.saturated_in_tile([_Rec(wcs), _Rec(shifted), _Rec(wcs), _Rec(wcs)], measures, tile, coverage)
    # Frames 0 and 1 saw the same star at tile (10.5, 10.5): 2 of 4, the four pixels around it.
    assert mask[10:12, 10:12].all()
    # One frame of the 2 covering (20.5, 20.5): half.
    assert mask[20:22, 20:22].all()
    assert mask.sum() == 8
    # One frame of 4 is not half.
    alone = zmt.saturated_in_tile([_Rec(wcs)] * 4, [measures[3]] + [measures[2]] * 3, tile, np.full((30, 30), 4.0))
    assert not alone.any()
    assert zmt.saturated_in_tile([_Rec(wcs)], [zmt.FrameMeasures(None, None, None)], wcs, coverage) is None


def test_stretch_turns_a_saturated_star_white_and_keeps_the_others_colours():
    rng = np.random.default_rng(8)
    image = (np.array([100.0, 100.0, 100.0]) + rng.normal(0, 2, (200, 200, 3))).astype(np.float32)
    blue = np.array([0.6, 0.8, 1.0], np.float32)
    yy, xx = np.mgrid[:200, :200]
    for (y, x), peak in (((20, 20), 200.0), ((60, 60), 200000.0), ((20, 60), 20000.0)):
        image += peak * blue[None, None] * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.0)[..., None]
    saturated = np.hypot(yy - 20, xx - 60) <= 1.5  # the third star's core clipped in the frames
    before = zdisp.stretch_unit(image)
    after = zdisp.stretch_unit(image, saturated=saturated)
    for unsaturated in ((slice(15, 26), slice(15, 26)), (slice(55, 66), slice(55, 66))):
        np.testing.assert_array_equal(after[unsaturated], before[unsaturated])
    assert after[20, 20, 2] > after[20, 20, 0] + 0.05  # a faint blue star: blue
    assert after[60, 60, 2] > after[60, 60, 0] + 0.2  # far past white but not clipped: its hue kept
    # Saturated: white, and so is the rest of that star past the white point; without the mask
    # its pixels just past white keep their hue: a blue ring.
    third = before[15:26, 55:66].max(axis=2) >= 1.0
    assert third.sum() > 1
    assert after[15:26, 55:66][third].min() == 1.0
    assert before[15:26, 55:66][third].min() < 0.9


@pytest.fixture(scope="module")
def clipped_run(tmp_path_factory):
    """4 small frames with stars bright enough to clip (37-44 raw pixels each), mosaicked."""
    root = tmp_path_factory.mktemp("saturation")
    info = zemosaic_synth.generate_dataset(root, panels=(1, 1), frames_per_panel=4, seed=7, size="small",
                                           mag_range=(-1, 13), satellite=False)
    out = root / "out"
    zw.run_mosaic(config_from_dict({"input_folder": info["frames_dir"], "output_folder": str(out)}))
    return info, out


def _clipped_sky_positions(info):
    """Return the ``(ra, dec)`` of every raw pixel at or above the level, per frame."""
    found = []
    for path in info["frame_paths"]:
        with fits.open(path) as hdul:
            ys, xs = np.nonzero(hdul[0].data >= SEESTAR_LEVEL)
            found.append(np.column_stack(zfits.read_frame_info(path).wcs.pixel_to_world_values(xs, ys)))
    return found


def test_the_mosaic_flags_the_stars_that_clipped_and_shows_them_white(clipped_run):
    info, out = clipped_run
    mosaic_path = out / zw.MOSAIC_NAME
    header = fits.getheader(mosaic_path)
    assert header["SATURATE"] == pytest.approx(SEESTAR_LEVEL, abs=0.01)
    assert fits.getheader(out / "master_tiles" / "master_tile_000.fits")["SATURATE"] == header["SATURATE"]
    image, wcs, _, _ = zfits.read_image_fits(mosaic_path)
    saturated = zfits.read_saturated_mask(mosaic_path)
    assert saturated.shape == image.shape[:2] and saturated.sum() > 0
    per_frame = [np.column_stack(wcs.world_to_pixel_values(p[:, 0], p[:, 1])) for p in _clipped_sky_positions(info)]
    everywhere = np.vstack(per_frame)
    flagged = np.argwhere(saturated)[:, ::-1]  # (x, y)
    # Every flagged pixel is near a clipped raw pixel: the debayer's neighbour, then the four
    # pixels reached on the tile and again on the mosaic, each at most a diagonal away (3 x 1.42).
    # Every raw pixel clipped in at least 3 of the 4 frames (within 1.5 px) is flagged.
    nearest = np.min(np.hypot(*(flagged[:, None, :] - everywhere[None, :, :]).transpose(2, 0, 1)), axis=1)
    assert nearest.max() < 4.3
    for x, y in everywhere:
        frames_clipped = sum(np.any(np.hypot(p[:, 0] - x, p[:, 1] - y) < 1.5) for p in per_frame)
        if frames_clipped >= 3:
            assert saturated[int(np.floor(y)):int(np.floor(y)) + 2, int(np.floor(x)):int(np.floor(x)) + 2].any()
    # The display: white where saturated, no clipped single-colour pixel right around it.
    shown = zdisp.north_up(saturated.astype(np.float32)[..., None], wcs)[..., 0] > 0
    display = tifffile.imread(out / zw.OUTPUT_NAMES["display"]).astype(float) / 65535
    assert display[shown].min() > 0.999
    ring = ndimage.binary_dilation(shown, iterations=3) & ~shown
    peak, low = display.max(axis=2), display.min(axis=2)
    assert np.sum(ring & (peak >= 0.99) & (low < 0.8 * peak)) <= 0.05 * ring.sum()


@pytest.mark.skipif(not NGC7023.is_dir(), reason="the shared real subs are absent")
def test_the_real_subs_clipped_cores_are_flagged_at_the_default_level():
    # The 10 s subs' cores clip at 65469-65526, short of 65535: the default level catches them.
    for path in sorted(Path(NGC7023).glob("*.fit")):
        frame = zfits.load_frame(path, require_wcs=False)
        raw = fits.getdata(path)
        assert frame.saturation == pytest.approx(SEESTAR_LEVEL)
        assert raw.max() > frame.saturation
        assert frame.saturated[raw >= 65000].all()
        assert 10 <= frame.saturated.sum() <= 400


def test_a_saturated_star_in_an_overexposed_nebula_leaves_the_nebula_its_colour():
    # The demo's case: a star clipped inside a nebula bright enough to pass the white point. Only
    # the star's glare (a few core radii) turns white; the nebula stays red.
    rng = np.random.default_rng(9)
    image = (100.0 + rng.normal(0, 2, (300, 300, 3))).astype(np.float32)
    yy, xx = np.mgrid[:300, :300]
    image += 5000.0 * np.array([1.0, 0.3, 0.2], np.float32) * np.exp(
        -((yy - 150) ** 2 + (xx - 150) ** 2) / (2 * 30.0 ** 2))[..., None]
    image += 200000.0 * np.exp(-((yy - 150) ** 2 + (xx - 150) ** 2) / 4.0)[..., None]
    saturated = np.hypot(yy - 150, xx - 150) <= 1.5
    before = zdisp.stretch_unit(image)
    after = zdisp.stretch_unit(image, saturated=saturated)
    overexposed_nebula = (before.max(axis=2) >= 1.0) & (np.hypot(yy - 150, xx - 150) > 10)
    assert overexposed_nebula.sum() > 500  # the nebula itself is past the white point
    np.testing.assert_array_equal(after[overexposed_nebula], before[overexposed_nebula])
    assert after[saturated].min() == 1.0
