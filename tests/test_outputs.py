"""Outputs other tools read right: orientation of the display products, FITS layout and
provenance, the coverage and per-channel files, and what Siril, SWarp and Montage read."""

import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import zemosaic_display as zdisp
import zemosaic_fits as zfits
import zemosaic_synth
import zemosaic_worker as zw
from conftest import make_tan_wcs
from zemosaic_config import config_from_dict

SHAPE = (120, 160)
RA0, DEC0 = 150.0, 30.0


def _sky_gradients(wcs, shape=SHAPE):
    """Image whose red is the Dec offset (arcmin) and green the east offset: orientation truth."""
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    east = (ra - RA0) * np.cos(np.radians(DEC0)) * 60.0
    return np.stack([(dec - DEC0) * 60.0, east, np.zeros_like(east)], axis=-1).astype(np.float32)


def _mirrored_wcs():
    wcs = make_tan_wcs(RA0, DEC0, SHAPE)
    wcs.wcs.cd = wcs.wcs.cd @ np.diag([-1.0, 1.0])  # east to the right of the raw pixel grid
    return wcs


@pytest.mark.parametrize("wcs", [make_tan_wcs(RA0, DEC0, SHAPE),
                                 make_tan_wcs(RA0, DEC0, SHAPE, rotation_deg=90.0),
                                 make_tan_wcs(RA0, DEC0, SHAPE, rotation_deg=180.0),
                                 make_tan_wcs(RA0, DEC0, SHAPE, rotation_deg=30.0),
                                 _mirrored_wcs()],
                         ids=["north-up", "rot90", "rot180", "rot30", "mirrored"])
def test_north_up_puts_north_on_top_and_east_left(wcs):
    shown = zdisp.north_up(_sky_gradients(wcs), wcs)
    north, east = shown[:, :, 0], shown[:, :, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN corner rows of rot30
        rows, cols = np.nanmean(north, axis=1), np.nanmean(east, axis=0)
    # One pixel is 2.39": per display row north drops, per column east drops, by ~0.04'.
    assert np.nanmedian(np.diff(rows)) == pytest.approx(-2.39 / 60, rel=0.02)
    assert np.nanmedian(np.diff(cols)) == pytest.approx(-2.39 / 60, rel=0.02)
    assert np.isfinite(shown).mean() > 0.45  # rot30 adds empty corners, nothing more


def test_north_up_is_exact_for_grids_aligned_with_the_axes():
    wcs = make_tan_wcs(RA0, DEC0, SHAPE, rotation_deg=90.0)
    image = _sky_gradients(wcs)
    shown = zdisp.north_up(image, wcs)
    assert shown.shape == (SHAPE[1], SHAPE[0], 3)
    assert sorted(shown.ravel().tolist()) == sorted(image.ravel().tolist())


def _read_png(path):
    from PIL import Image  # Pillow reads the file back as any viewer would
    return np.asarray(Image.open(path).convert("RGB"))


def test_preview_png_star_in_the_north_east_shows_top_left(tmp_path):
    wcs = make_tan_wcs(RA0, DEC0, SHAPE)  # standard grid: north is +y (the last FITS row)
    image = np.full(SHAPE + (3,), 100.0, np.float32) + np.random.default_rng(1).normal(0, 1, SHAPE + (3,))
    x, y = wcs.world_to_pixel_values(RA0 + 0.03, DEC0 + 0.02)  # north-east of the centre
    image[int(round(float(y))) - 2:int(round(float(y))) + 3,
          int(round(float(x))) - 2:int(round(float(x))) + 3] = 5000.0
    zdisp.write_preview_png(tmp_path / "p.png", image, wcs=wcs)
    png = _read_png(tmp_path / "p.png").astype(float).sum(axis=2)
    rows, cols = np.nonzero(png == png.max())
    row, col = rows.mean(), cols.mean()  # the star's centre
    assert row < SHAPE[0] / 2 and col < SHAPE[1] / 2
    assert (row, col) == (SHAPE[0] - 1 - round(float(y)), round(float(x)))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One small run (2 panels x 3 frames) with per-channel files and the 16-bit copy."""
    root = tmp_path_factory.mktemp("outputs")
    info = zemosaic_synth.generate_dataset(root, panels=(2, 1), frames_per_panel=3, seed=11,
                                           size="small")
    out = root / "out"
    config = config_from_dict({"input_folder": info["frames_dir"], "output_folder": str(out),
                               "save_channel_files": True, "save_final_as_uint16": True})
    result = zw.run_mosaic(config)
    frames = sorted(Path(info["frames_dir"]).glob("*.fits"))
    return {"out": out, "result": result, "frames": [fits.getheader(f) for f in frames]}


def test_fits_wcs_matches_data_without_warnings(outputs):
    out = outputs["out"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any astropy warning fails the test
        for name, axes in [(zw.MOSAIC_NAME, 3), (zw.COVERAGE_NAME, 2), ("zemosaic_mosaic_R.fits", 2),
                           (zw.UINT16_NAME, 3), ("master_tiles/master_tile_000.fits", 3)]:
            with fits.open(out / name, checksum=True) as hdul:  # checksum=True verifies them
                header = hdul[0].header
                assert WCS(header).naxis == axes == header["NAXIS"]
                assert "CHECKSUM" in header and "DATASUM" in header
                assert header["RADESYS"] == "ICRS" and header["EQUINOX"] == 2000.0
                assert header["BUNIT"] in ("adu", "")
        with fits.open(out / zw.MOSAIC_NAME) as hdul:
            assert hdul[0].header["CTYPE3"] == "RGB"
            assert WCS(hdul["COVERAGE"].header).naxis == 2
            coverage = fits.getdata(out / zw.COVERAGE_NAME)
            np.testing.assert_array_equal(coverage, hdul["COVERAGE"].data)
            np.testing.assert_array_equal(fits.getdata(out / "zemosaic_mosaic_G.fits"), hdul[0].data[1])
    image, wcs, cov, _ = zfits.read_image_fits(out / zw.MOSAIC_NAME)
    assert wcs.naxis == 2 and image.shape[2] == 3 and cov.shape == image.shape[:2]


def test_provenance_in_mosaic_and_tile_headers(outputs):
    frames = outputs["frames"]
    header = fits.getheader(outputs["out"] / zw.MOSAIC_NAME)
    assert header["NCOMBINE"] == len(frames) == 6
    assert header["EXPTIME"] == pytest.approx(sum(f["EXPTIME"] for f in frames))
    assert header["DATE-OBS"].startswith(min(f["DATE-OBS"] for f in frames)[:19])
    assert header["DATE-END"] > header["DATE-OBS"]
    for key in ("OBJECT", "TELESCOP", "INSTRUME", "FILTER", "FOCALLEN", "XPIXSZ"):
        assert header[key] == frames[0][key]
    history = [str(h) for h in header["HISTORY"]]
    assert history[0] == f"ZeMosaic {zw.__version__}"
    assert 'stacking_rejection_algorithm = "winsorized_sigma_clip"' in history
    tile = fits.getheader(outputs["out"] / "master_tiles" / "master_tile_000.fits")
    assert tile["NCOMBINE"] == 3 and tile["EXPTIME"] == pytest.approx(3 * frames[0]["EXPTIME"])
    assert any(h.startswith("ZeMosaic") for h in tile["HISTORY"])
    assert all(" " <= c <= "~" for c in header.tostring())


def test_card_text_is_printable_ascii():
    assert zfits.card_text("Nébuleuse\tM42", 10) == "N?buleuse?"


def test_display_tiff_is_16_bit_rgb_north_up_like_the_preview(outputs):
    import tifffile
    out = outputs["out"]
    tif = tifffile.imread(out / zw.DISPLAY_NAME)
    image, wcs, _, _ = zfits.read_image_fits(out / zw.MOSAIC_NAME)
    assert tif.dtype == np.uint16 and tif.ndim == 3 and tif.shape[2] == 3
    assert tif.max() > 60000 and len(np.unique(tif)) > 1000  # more levels than 8 bits hold
    shown = zdisp.north_up(image, wcs)
    assert tif.shape[:2] == shown.shape[:2]
    no_data = ~np.isfinite(shown).all(axis=2)
    assert no_data.any() and (tif[no_data] == 0).all() and (tif[~no_data].max(axis=1) > 0).mean() > 0.99
    png = _read_png(out / zw.PREVIEW_NAME)
    assert png.shape == tif.shape  # small mosaic: the preview is full size too
    assert np.abs(png.astype(float) - tif / 257.0).max() <= 1.0


def test_uint16_copy_is_linear_with_zero_for_no_data(outputs):
    out = outputs["out"]
    with fits.open(out / zw.UINT16_NAME) as hdul:
        data, header = hdul[0].data, hdul[0].header
    image = fits.getdata(out / zw.MOSAIC_NAME)
    assert data.dtype == np.uint16
    np.testing.assert_array_equal(data == 0, ~np.isfinite(image))
    back = header["LINZERO"] + header["LINSCALE"] * (data.astype(float) - 1)
    finite = np.isfinite(image)
    assert np.abs(back[finite] - image[finite]).max() <= header["LINSCALE"]
    report = json.loads((out / zw.REPORT_NAME).read_text())
    assert report["outputs"]["uint16"] == zw.UINT16_NAME and report["outputs"]["channel_B"]


# --------------------------------------------------------------------------------------------------
# Peers: what Siril, SWarp and Montage read (skipped where they are not installed)
# --------------------------------------------------------------------------------------------------


def _program(*names):
    for name in names:
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip(f"{names[0]} is not installed (scripts/install_system_deps.sh peers)")


@pytest.mark.slow
def test_siril_reads_three_layers_and_keeps_the_sky_coordinates(outputs, tmp_path):
    siril = _program("siril-cli")
    out = outputs["out"]
    script = tmp_path / "check.ssf"
    script.write_text(f"requires 1.0.0\nload {zw.MOSAIC_NAME}\nsave {tmp_path}/resaved\n"
                      f"load {zw.UINT16_NAME}\nstat\n")
    # A configuration of its own: Siril keeps settings (the FITS extension, for one) across runs.
    proc = subprocess.run([siril, "-d", str(out), "-s", str(script)], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")})
    log = proc.stdout + proc.stderr
    assert "3 layer(s)" in log, log
    with fits.open(out / zw.MOSAIC_NAME) as hdul:
        width, height = hdul[0].header["NAXIS1"], hdul[0].header["NAXIS2"]
        truth_wcs = WCS(hdul[0].header).celestial
        green = hdul[0].data[1]
    assert f"{width}x{height} pixels" in log
    # Siril 1.0 does not skip NaN in its statistics: the 16-bit copy (0 = no data) gives them.
    median = float(log.split("Green layer: Mean:")[1].split("Median:")[1].split(",")[0])
    header = fits.getheader(out / zw.UINT16_NAME)
    assert header["LINZERO"] + header["LINSCALE"] * (median - 1) == pytest.approx(
        np.nanmedian(np.where(np.isfinite(green), green, header["LINZERO"] - header["LINSCALE"])),
        rel=0.02)
    resaved = fits.getheader(tmp_path / "resaved.fit")
    assert resaved["CTYPE1"] == "RA---TAN" and resaved["EQUINOX"] == 2000.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        siril_wcs = WCS(resaved).celestial
    np.testing.assert_allclose(siril_wcs.pixel_to_world_values(100, 200),
                               truth_wcs.pixel_to_world_values(100, 200), atol=1e-6)


@pytest.mark.slow
def test_swarp_resamples_a_channel_with_the_coverage_as_weight(outputs, tmp_path):
    swarp = _program("swarp", "SWarp")
    out = outputs["out"]
    proc = subprocess.run([swarp, str(out / "zemosaic_mosaic_R.fits"), "-IMAGEOUT_NAME",
                           str(tmp_path / "r.fits"), "-WEIGHTOUT_NAME", str(tmp_path / "w.fits"),
                           "-WEIGHT_TYPE", "MAP_WEIGHT", "-WEIGHT_IMAGE", str(out / zw.COVERAGE_NAME),
                           "-SUBTRACT_BACK", "N", "-WRITE_XML", "N", "-VERBOSE_TYPE", "QUIET"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    ours = fits.getdata(out / "zemosaic_mosaic_R.fits")
    theirs = fits.getdata(tmp_path / "r.fits")
    # SWarp resamples onto its own north-up grid: the same flux and sky level.
    assert np.nansum(theirs) == pytest.approx(np.nansum(ours), rel=0.005)
    assert np.median(theirs[theirs != 0]) == pytest.approx(np.nanmedian(ours), rel=0.01)
    assert fits.getheader(tmp_path / "r.fits")["EXPTIME"] == fits.getheader(out / zw.MOSAIC_NAME)["EXPTIME"]


@pytest.mark.slow
def test_montage_lists_the_channels_and_projects_one(outputs, tmp_path):
    mimgtbl, mproject = _program("mImgtbl"), _program("mProject")
    out = outputs["out"]
    folder = tmp_path / "channels"
    folder.mkdir()
    for colour in "RGB":
        shutil.copy(out / f"zemosaic_mosaic_{colour}.fits", folder)
    subprocess.run([mimgtbl, str(folder), str(tmp_path / "images.tbl")], check=True,
                   capture_output=True, timeout=60)
    rows = [line.split() for line in (tmp_path / "images.tbl").read_text().splitlines()
            if line.strip() and line.lstrip()[0].isdigit()]
    header = fits.getheader(out / zw.MOSAIC_NAME)
    assert len(rows) == 3
    for row in rows:  # cntr ra dec, cra and cdec (3 words each), naxis1 naxis2
        assert (int(row[9]), int(row[10])) == (header["NAXIS1"], header["NAXIS2"])
    template = tmp_path / "grid.hdr"  # Montage's own grid over the images it listed
    subprocess.run([_program("mMakeHdr"), str(tmp_path / "images.tbl"), str(template)],
                   check=True, capture_output=True, timeout=60)
    subprocess.run([mproject, str(folder / "zemosaic_mosaic_R.fits"), str(tmp_path / "p.fits"),
                    str(template)], check=True, capture_output=True, timeout=120)
    ours = fits.getdata(out / "zemosaic_mosaic_R.fits")
    theirs = fits.getdata(tmp_path / "p.fits")
    assert np.nanmedian(theirs) == pytest.approx(np.nanmedian(ours), rel=0.005)
    assert np.nansum(theirs) == pytest.approx(np.nansum(ours), rel=0.01)
