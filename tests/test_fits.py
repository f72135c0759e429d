"""Tests for zemosaic_fits: frame loading, debayer, WCS checks, atomic writes."""

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zemosaic_files as zfiles  # noqa: E402
import zemosaic_fits as zf  # noqa: E402
from zemosaic_fits import FrameError  # noqa: E402

SCALE_DEG = 2.4 / 3600.0  # Seestar S50 pixel scale


def wcs_cards(shape_hw, cd=None, sip=False):
    """Plate-solution cards (TAN, CD matrix) for an image of ``shape_hw``."""
    height, width = shape_hw
    cd = cd if cd is not None else ((-SCALE_DEG, 0.0), (0.0, SCALE_DEG))
    suffix = "-SIP" if sip else ""
    cards = {
        "CTYPE1": "RA---TAN" + suffix, "CTYPE2": "DEC--TAN" + suffix,
        "CRVAL1": 83.82, "CRVAL2": -5.39,
        "CRPIX1": width / 2.0 + 0.5, "CRPIX2": height / 2.0 + 0.5,
        "CD1_1": cd[0][0], "CD1_2": cd[0][1], "CD2_1": cd[1][0], "CD2_2": cd[1][1],
        "RADESYS": "ICRS",
    }
    if sip:
        cards.update({"A_ORDER": 2, "B_ORDER": 2, "A_2_0": 2e-7, "B_0_2": -3e-7})
    return cards


def write_frame(path, data, shape_hw=None, wcs=True, **extra):
    """Write ``data`` with astropy (uint16 data gets BZERO automatically)."""
    hdu = fits.PrimaryHDU(data)
    if wcs:
        shape_hw = shape_hw or data.shape[-2:]
        hdu.header.update(wcs_cards(shape_hw, **({"cd": extra.pop("cd")} if "cd" in extra else {})))
    hdu.header.update(extra)
    hdu.writeto(path)
    return path


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def mosaic_from_planes(r, g, b, pattern):
    """Sample full-resolution colour planes through a Bayer filter."""
    planes = {"R": r, "G": g, "B": b}
    raw = np.empty(r.shape, dtype=np.float32)
    for position, letter in enumerate(pattern):
        dy, dx = divmod(position, 2)
        raw[dy::2, dx::2] = planes[letter][dy::2, dx::2]
    return raw


# --------------------------------------------------------------------------
# Loading pixel data
# --------------------------------------------------------------------------


def test_uint16_bzero_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 65536, size=(24, 32), dtype=np.uint16)
    data[0, 0], data[0, 1] = 0, 65535
    path = write_frame(tmp_path / "u16.fits", data)
    header = fits.getheader(path)
    assert header["BITPIX"] == 16 and header["BZERO"] == 32768
    frame = zf.load_frame(path)
    assert frame.data.dtype == np.float32 and frame.data.shape == (24, 32, 1)
    np.testing.assert_array_equal(frame.data[..., 0], data.astype(np.float32))
    assert frame.data[0, 1, 0] == 65535.0


def test_int16_input(tmp_path):
    data = np.arange(-300, 300, dtype=np.int16).reshape(20, 30)
    frame = zf.load_frame(write_frame(tmp_path / "i16.fits", data))
    np.testing.assert_array_equal(frame.data[..., 0], data.astype(np.float32))


def test_float32_input_non_finite_become_nan(tmp_path):
    data = np.linspace(1, 2, 20 * 30, dtype=np.float32).reshape(20, 30)
    data[3, 4], data[5, 6], data[7, 8] = np.nan, np.inf, -np.inf
    frame = zf.load_frame(write_frame(tmp_path / "f32.fits", data))
    assert np.isnan(frame.data[[3, 5, 7], [4, 6, 8], 0]).all()
    assert np.isfinite(frame.data).sum() == data.size - 3
    assert frame.data[0, 0, 0] == np.float32(1.0)


def test_bscale_bzero_applied(tmp_path):
    physical = (100.0 + 0.5 * np.arange(-50, 50)).reshape(10, 10)
    hdu = fits.PrimaryHDU(physical.copy())  # scale() works in place
    hdu.scale("int16", bscale=0.5, bzero=100.0)
    hdu.header.update(wcs_cards((10, 10)))
    hdu.writeto(tmp_path / "scaled.fits")
    header = fits.getheader(tmp_path / "scaled.fits")
    assert header["BSCALE"] == 0.5 and header["BZERO"] == 100.0 and header["BITPIX"] == 16
    frame = zf.load_frame(tmp_path / "scaled.fits")
    np.testing.assert_array_equal(frame.data[..., 0], physical.astype(np.float32))


def test_blank_integer_pixels_become_nan(tmp_path):
    data = np.full((10, 12), 500, dtype=np.int16)
    data[2, 3] = -32768
    frame = zf.load_frame(write_frame(tmp_path / "blank.fits", data, BLANK=-32768))
    assert np.isnan(frame.data[2, 3, 0]) and np.isfinite(frame.data).sum() == data.size - 1


def test_chw_cube_becomes_hwc(tmp_path):
    cube = np.stack([np.full((12, 16), v, dtype=np.float32) for v in (1.0, 2.0, 3.0)])
    cube[1, 4, 5] = 9.0
    frame = zf.load_frame(write_frame(tmp_path / "cube.fits", cube))
    assert frame.data.shape == (12, 16, 3)
    np.testing.assert_array_equal(frame.data[0, 0], [1.0, 2.0, 3.0])
    assert frame.data[4, 5, 1] == 9.0
    assert frame.wcs.naxis == 2 and frame.wcs.is_celestial


def test_hwc_cube_accepted(tmp_path):
    image = np.zeros((12, 16, 3), dtype=np.float32) + np.array([1.0, 2.0, 3.0], np.float32)
    hdu = fits.PrimaryHDU(image)
    # FITS axis 1 is the colour axis here, so the sky lives on axes 2 (x) and 3 (y).
    cards = wcs_cards((12, 16))
    renamed = {k.replace("2", "3").replace("1", "2") if k[:2] in ("CT", "CR") else k: v
               for k, v in cards.items() if not k.startswith("CD")}
    hdu.header.update(renamed)
    hdu.header.update({"CD2_2": -SCALE_DEG, "CD3_3": SCALE_DEG, "CD1_1": 1.0})
    hdu.writeto(tmp_path / "hwc.fits")
    info = zf.read_frame_info(tmp_path / "hwc.fits")
    assert info.shape_hw == (12, 16) and info.n_channels == 3
    frame = zf.load_frame(tmp_path / "hwc.fits")
    assert frame.data.shape == (12, 16, 3)
    np.testing.assert_array_equal(frame.data[5, 7], [1.0, 2.0, 3.0])


def test_bayer_frame_is_debayered(tmp_path):
    rng = np.random.default_rng(2)
    raw = rng.integers(100, 4000, size=(20, 24), dtype=np.uint16)
    path = write_frame(tmp_path / "bayer.fits", raw, BAYERPAT="RGGB")
    frame = zf.load_frame(path)
    assert frame.data.shape == (20, 24, 3)
    np.testing.assert_array_equal(frame.data, zf.debayer_bilinear(raw.astype(np.float32), "RGGB"))
    assert zf.load_frame(path, debayer=False).data.shape == (20, 24, 1)


def test_seestar_without_bayerpat_defaults_to_grbg(tmp_path):
    raw = np.arange(1, 20 * 24 + 1, dtype=np.uint16).reshape(20, 24)
    path = write_frame(tmp_path / "seestar.fits", raw, INSTRUME="Seestar S50",
                       EXPTIME=10.0, **{"DATE-OBS": "2024-03-01T21:00:00"})
    info = zf.read_frame_info(path)
    assert (info.bayer_pattern, info.n_channels, info.shape_hw) == ("GRBG", 3, (20, 24))
    assert info.exptime == 10.0 and info.date_obs == "2024-03-01T21:00:00"
    frame = zf.load_frame(path)
    np.testing.assert_array_equal(frame.data, zf.debayer_bilinear(raw.astype(np.float32), "GRBG"))


def test_bayer_offsets_shift_pattern(tmp_path):
    raw = np.ones((8, 8), dtype=np.uint16)
    info = zf.read_frame_info(write_frame(tmp_path / "off.fits", raw, BAYERPAT="RGGB",
                                          XBAYROFF=1, YBAYROFF=0))
    assert info.bayer_pattern == "GRBG"


def test_mono_frame_info(tmp_path):
    info = zf.read_frame_info(write_frame(tmp_path / "mono.fits", np.ones((10, 14), np.float32)))
    assert (info.shape_hw, info.n_channels, info.bayer_pattern) == ((10, 14), 1, None)
    assert info.exptime is None and info.date_obs is None


# --------------------------------------------------------------------------
# Debayer
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", zf.BAYER_PATTERNS)
@pytest.mark.parametrize("shape", [(16, 20), (7, 9)])
def test_debayer_constant_colour_is_exact_everywhere(pattern, shape):
    colour = np.array([1234.5678, 0.123457, 65535.0], dtype=np.float32)
    planes = [np.full(shape, c, dtype=np.float32) for c in colour]
    rgb = zf.debayer_bilinear(mosaic_from_planes(*planes, pattern), pattern)
    assert rgb.dtype == np.float32 and rgb.shape == shape + (3,)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], colour[channel])


@pytest.mark.parametrize("pattern", zf.BAYER_PATTERNS)
def test_debayer_smooth_gradient_is_accurate(pattern):
    y, x = np.mgrid[0:64, 0:80].astype(np.float64)
    r = 1000 + 6 * x + 3 * y + 40 * np.sin(x / 15.0)
    g = 2000 - 2 * x + 5 * y + 30 * np.cos(y / 12.0)
    b = 500 + 0.02 * (x - 40) ** 2 + 4 * y
    truth = np.stack([r, g, b], axis=-1).astype(np.float32)
    rgb = zf.debayer_bilinear(mosaic_from_planes(*truth.transpose(2, 0, 1), pattern), pattern)
    relative = np.abs(rgb[2:-2, 2:-2] - truth[2:-2, 2:-2]) / truth[2:-2, 2:-2]
    assert relative.max() < 0.01
    # A purely linear field is reproduced exactly (to rounding) in the interior.
    linear = np.stack([1000 + 6 * x + 3 * y] * 3, axis=-1).astype(np.float32)
    out = zf.debayer_bilinear(mosaic_from_planes(*linear.transpose(2, 0, 1), pattern), pattern)
    np.testing.assert_allclose(out[1:-1, 1:-1], linear[1:-1, 1:-1], rtol=1e-6)


def test_debayer_nan_sample_is_left_out():
    raw = np.full((10, 10), 100.0, dtype=np.float32)
    raw[5, 5] = np.nan
    rgb = zf.debayer_bilinear(raw, "RGGB")
    # (5, 5) is a blue site: no other blue sample lies in its 3x3 neighbourhood.
    assert np.isnan(rgb[5, 5, 2])
    assert np.isfinite(rgb).sum() == rgb.size - 1
    assert np.all(rgb[np.isfinite(rgb)] == 100.0)  # neighbours just ignore the NaN


def _debayer_by_convolution(raw, pattern):
    """The definition: per colour, a 3x3 normalised convolution of its samples (float64)."""
    from scipy import ndimage

    kernels = {"G": np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], float),
               "RB": np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], float)}
    values = raw.astype(np.float64)
    finite = np.isfinite(values)
    values[~finite] = 0.0
    rgb = np.empty(raw.shape + (3,), np.float32)
    for channel, colour in enumerate("RGB"):
        mask = np.zeros(raw.shape, bool)
        for position, letter in enumerate(pattern):
            mask[position // 2::2, position % 2::2] |= letter == colour
        mask &= finite
        kernel = kernels["G" if colour == "G" else "RB"]
        total = ndimage.correlate(values * mask, kernel, mode="constant", cval=0.0)
        weight = ndimage.correlate(mask.astype(float), kernel, mode="constant", cval=0.0)
        rgb[..., channel] = np.divide(total, weight, out=np.full_like(total, np.nan), where=weight > 0)
    return rgb


@pytest.mark.parametrize("pattern", zf.BAYER_PATTERNS)
def test_debayer_is_the_normalised_convolution_bit_for_bit(pattern):
    """Edges, odd sizes, NaN samples, 16-bit and float data: the same bytes as the definition.

    Finite mosaics of 4x4 pixels or more take the path without a weight map (edges patched), in
    bands of 64 cell rows (131 rows: 66 cell rows in two bands, the last cell row a half one).
    """
    rng = np.random.default_rng(11)
    for shape in [(1, 1), (1, 2), (2, 1), (3, 3), (4, 4), (4, 5), (7, 4), (5, 7), (6, 9), (33, 50), (131, 7)]:
        integers = rng.integers(0, 65536, shape).astype(np.float32)
        wide = (rng.random(shape) * 10.0 ** rng.integers(-6, 6, shape)).astype(np.float32)
        holes = rng.normal(1000, 50, shape).astype(np.float32)
        holes[rng.random(shape) < 0.3] = np.nan
        for raw in (integers, wide, holes):
            assert zf.debayer_bilinear(raw, pattern).tobytes() == _debayer_by_convolution(raw, pattern).tobytes()


def test_debayer_rejects_unknown_pattern():
    with pytest.raises(ValueError, match="RGGB, BGGR, GRBG, GBRG"):
        zf.debayer_bilinear(np.zeros((4, 4)), "RGBG")


def test_debayer_full_frame_of_flat_colours_is_flat():
    raw = np.empty((1080, 1920), np.float32)  # GRBG: G R on even rows, B G on odd rows
    raw[0::2, 0::2], raw[0::2, 1::2], raw[1::2, 0::2], raw[1::2, 1::2] = 200.0, 100.0, 300.0, 200.0
    rgb = zf.debayer_bilinear(raw, "GRBG")
    assert rgb.shape == (1080, 1920, 3) and rgb.dtype == np.float32
    np.testing.assert_array_equal(rgb.reshape(-1, 3).min(axis=0), [100.0, 200.0, 300.0])
    np.testing.assert_array_equal(rgb.reshape(-1, 3).max(axis=0), [100.0, 200.0, 300.0])


# --------------------------------------------------------------------------
# Frames that must be skipped
# --------------------------------------------------------------------------


def _good_bytes(tmp_path):
    data = np.arange(1, 40 * 50 + 1, dtype=np.uint16).reshape(40, 50)
    return write_frame(tmp_path / "good.fits", data).read_bytes()


def _truncated_data(tmp_path):
    good = _good_bytes(tmp_path)
    (tmp_path / "bad.fits").write_bytes(good[:len(good) - 2000])


def _truncated_header(tmp_path):
    (tmp_path / "bad.fits").write_bytes(_good_bytes(tmp_path)[:1000])


def _text_file(tmp_path):
    (tmp_path / "bad.fits").write_text("this is not an image\n" * 10)


def _empty_file(tmp_path):
    (tmp_path / "bad.fits").write_bytes(b"")


def _no_wcs(tmp_path):
    write_frame(tmp_path / "bad.fits", np.ones((10, 10), np.float32), wcs=False)


def _singular_cd(tmp_path):
    write_frame(tmp_path / "bad.fits", np.ones((10, 10), np.float32),
                cd=((1e-4, 2e-4), (2e-4, 4e-4)))


def _zero_cd(tmp_path):
    write_frame(tmp_path / "bad.fits", np.ones((10, 10), np.float32),
                cd=((0.0, 0.0), (0.0, 0.0)))


def _huge_scale(tmp_path):
    write_frame(tmp_path / "bad.fits", np.ones((10, 10), np.float32),
                cd=((-2.0, 0.0), (0.0, 2.0)))


def _tiny_scale(tmp_path):
    write_frame(tmp_path / "bad.fits", np.ones((10, 10), np.float32),
                cd=((-1e-9, 0.0), (0.0, 1e-9)))


def _all_zero(tmp_path):
    write_frame(tmp_path / "bad.fits", np.zeros((10, 10), np.uint16))


def _all_nan(tmp_path):
    write_frame(tmp_path / "bad.fits", np.full((10, 10), np.nan, np.float32))


def _four_d(tmp_path):
    write_frame(tmp_path / "bad.fits", np.ones((2, 3, 10, 10), np.float32), shape_hw=(10, 10))


def _header_only(tmp_path):
    hdu = fits.PrimaryHDU()
    hdu.header.update(wcs_cards((10, 10)))
    hdu.writeto(tmp_path / "bad.fits")


@pytest.mark.parametrize("make, reason, header_detects", [
    (_truncated_data, "truncated or corrupt FITS", True),
    (_truncated_header, "truncated or corrupt FITS", True),
    (_text_file, "not a FITS file", True),
    (_empty_file, "empty file", True),
    (_no_wcs, "no celestial WCS", True),
    (_singular_cd, "singular CD matrix", True),
    (_zero_cd, "singular CD matrix", True),
    (_huge_scale, "implausible pixel scale", True),
    (_tiny_scale, "implausible pixel scale", True),
    (_four_d, "unsupported image dimensions", True),
    (_header_only, "no image data", True),
    (_all_zero, "all pixels are zero", False),
    (_all_nan, "no finite pixels", False),
])
def test_bad_frames_raise_frame_error(tmp_path, make, reason, header_detects):
    make(tmp_path)
    path = tmp_path / "bad.fits"
    with pytest.raises(FrameError) as info:
        zf.load_frame(path)
    assert reason in str(info.value)
    if header_detects:
        with pytest.raises(FrameError, match=reason):
            zf.read_frame_info(path)
    else:
        zf.read_frame_info(path)  # the header alone is fine


def test_missing_file_is_frame_error(tmp_path):
    with pytest.raises(FrameError, match="cannot read file"):
        zf.read_frame_info(tmp_path / "absent.fits")


def test_load_frame_does_not_modify_input(tmp_path):
    raw = np.arange(1, 20 * 24 + 1, dtype=np.uint16).reshape(20, 24)
    path = write_frame(tmp_path / "in.fits", raw, BAYERPAT="GRBG")
    before, mtime = sha256(path), os.stat(path).st_mtime_ns
    frame = zf.load_frame(path)
    frame.data[:] = 0  # the returned array is a private copy
    zf.read_frame_info(path)
    assert sha256(path) == before and os.stat(path).st_mtime_ns == mtime
    assert zf.load_frame(path).data.max() > 0


# --------------------------------------------------------------------------
# WCS helpers
# --------------------------------------------------------------------------


def test_validate_wcs_accepts_good_and_rejects_non_celestial():
    good = WCS(fits.Header(wcs_cards((10, 10))))
    zf.validate_wcs(good, (10, 10))
    linear = WCS(naxis=2)
    with pytest.raises(FrameError, match="no celestial WCS"):
        zf.validate_wcs(linear, (10, 10))


def test_validate_wcs_rejects_non_finite_crval():
    wcs = WCS(fits.Header(wcs_cards((10, 10))))
    wcs.wcs.crval = [np.nan, 5.0]
    with pytest.raises(FrameError, match="non-finite"):
        zf.validate_wcs(wcs, (10, 10))


def test_wcs_to_cd_header_keeps_sip_and_uses_cd():
    wcs = WCS(fits.Header(wcs_cards((40, 50), cd=((-SCALE_DEG, 1e-5), (2e-5, SCALE_DEG)),
                                    sip=True)))
    header = zf.wcs_to_cd_header(wcs)
    assert header["CTYPE1"] == "RA---TAN-SIP" and header["A_2_0"] == 2e-7
    assert header["B_0_2"] == -3e-7 and header["RADESYS"] == "ICRS"
    assert header["CD1_2"] == 1e-5 and header["CD2_1"] == 2e-5
    assert not any(k.startswith(("PC", "CDELT")) for k in header)
    rebuilt = WCS(header)
    pixels = np.array([[0.0, 0.0], [49.0, 39.0], [10.5, 30.25]])
    np.testing.assert_allclose(rebuilt.all_pix2world(pixels, 0), wcs.all_pix2world(pixels, 0),
                               rtol=0, atol=1e-10)


def test_wcs_to_cd_header_from_pc_cdelt():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [10.0, 20.0]
    wcs.wcs.crpix = [5.0, 5.0]
    wcs.wcs.cdelt = [-2e-3, 2e-3]
    wcs.wcs.pc = [[0.0, 1.0], [1.0, 0.0]]
    header = zf.wcs_to_cd_header(wcs)
    assert (header["CD1_1"], header["CD1_2"], header["CD2_1"], header["CD2_2"]) == (
        0.0, -2e-3, 2e-3, 0.0)
    assert "PC1_1" not in header and "CDELT1" not in header


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def test_write_fits_atomic_success_leaves_no_temp_file(tmp_path, monkeypatch):
    seen = []
    original = fits.HDUList.writeto

    def spying_writeto(self, fileobj, *args, **kwargs):
        seen.append(os.path.basename(fileobj.name))
        return original(self, fileobj, *args, **kwargs)

    monkeypatch.setattr(fits.HDUList, "writeto", spying_writeto)
    path = tmp_path / "out.fits"
    zf.write_fits_atomic(path, fits.HDUList([fits.PrimaryHDU(np.ones((3, 4), np.float32))]))
    assert seen[0].startswith(".") and seen[0].endswith(".tmp")
    assert os.listdir(tmp_path) == ["out.fits"]
    np.testing.assert_array_equal(fits.getdata(path), np.ones((3, 4)))


def test_write_fits_atomic_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.fits"
    fits.PrimaryHDU(np.full((3, 4), 7.0, np.float32)).writeto(path)
    before = sha256(path)

    def failing_writeto(self, fileobj, *args, **kwargs):
        fileobj.write(b"SIMPLE  =   half written")
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", failing_writeto)
    with pytest.raises(OSError, match="disk full"):
        zf.write_fits_atomic(path, fits.HDUList([fits.PrimaryHDU(np.zeros((3, 4)))]))
    assert sha256(path) == before
    assert os.listdir(tmp_path) == ["out.fits"]


def test_image_fits_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    image = rng.random((30, 40, 3)).astype(np.float32)
    image[0, :5] = np.nan
    coverage = rng.integers(0, 9, size=(30, 40)).astype(np.float32)
    wcs = WCS(fits.Header(wcs_cards((30, 40), cd=((-SCALE_DEG, 1e-6), (1e-6, SCALE_DEG)))))
    path = tmp_path / "mosaic.fits"
    zf.write_image_fits(path, image, wcs, coverage=coverage,
                        header_cards=[("CREATOR", "ZeMosaic", "software"), ("NFRAMES", 12)])
    raw_header = fits.getheader(path)
    assert raw_header["BITPIX"] == -32 and raw_header["NAXIS3"] == 3
    assert "CD1_1" in raw_header and "PC1_1" not in raw_header and "CDELT1" not in raw_header
    # FITS cards hold 16 significant digits, hence approx.
    assert fits.getheader(path, "COVERAGE")["CD2_2"] == pytest.approx(SCALE_DEG, rel=1e-15)

    out, out_wcs, out_cov, header = zf.read_image_fits(path)
    assert out.dtype == np.float32 and out.shape == (30, 40, 3)
    np.testing.assert_array_equal(out, image)  # NaN positions compare equal too
    np.testing.assert_array_equal(out_cov, coverage)
    assert header["CREATOR"] == "ZeMosaic" and header["NFRAMES"] == 12
    assert header.comments["CREATOR"] == "software"
    pixels = np.array([[0.0, 0.0], [39.0, 29.0], [12.5, 7.5]])
    np.testing.assert_allclose(out_wcs.wcs_pix2world(pixels, 0), wcs.wcs_pix2world(pixels, 0),
                               rtol=0, atol=1e-12)


def test_image_fits_mono_without_coverage(tmp_path):
    image = np.linspace(0, 1, 12 * 10, dtype=np.float32).reshape(12, 10, 1)
    wcs = WCS(fits.Header(wcs_cards((12, 10))))
    zf.write_image_fits(tmp_path / "m.fits", image, wcs, header_cards={"NOTE": ("x", "y")})
    out, _, coverage, header = zf.read_image_fits(tmp_path / "m.fits")
    assert out.shape == (12, 10, 1) and coverage is None and header["NOTE"] == "x"
    np.testing.assert_array_equal(out, image)


def test_image_fits_refuses_reserved_cards(tmp_path):
    wcs = WCS(fits.Header(wcs_cards((4, 4))))
    with pytest.raises(ValueError, match="NAXIS"):
        zf.write_image_fits(tmp_path / "x.fits", np.ones((4, 4, 3)), wcs, header_cards={"NAXIS": 2})
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------
# Previews
# --------------------------------------------------------------------------


def test_correct_hot_pixels_fixes_hot_pixels_not_stars():
    from zemosaic_fits import correct_hot_pixels

    rng = np.random.default_rng(5)
    h, w = 200, 160
    yy, xx = np.mgrid[:h, :w]
    colour_of = np.zeros((h, w), int)  # GRBG: 0=R, 1=G, 2=B
    colour_of[0::2, 0::2] = 1
    colour_of[0::2, 1::2] = 0
    colour_of[1::2, 0::2] = 2
    colour_of[1::2, 1::2] = 1
    raw = 1000.0 + rng.normal(0, 10, (h, w))
    stars = []
    for _ in range(40):
        y, x = rng.uniform(5, h - 5), rng.uniform(5, w - 5)
        rgb = np.array([1.0, rng.uniform(0.5, 1.0), rng.uniform(0.3, 1.2)])
        peak = rng.uniform(300, 20000)
        psf = peak * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (2.7 / 2.355) ** 2))
        raw += psf * rgb[colour_of]
        stars.append((int(round(y)), int(round(x))))
    hot = set()
    while len(hot) < 25:
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        if min(abs(y - sy) + abs(x - sx) for sy, sx in stars) > 8:
            hot.add((y, x))
    truth = raw.copy()
    for y, x in hot:
        raw[y, x] += rng.uniform(500, 30000)
    cleaned, n = correct_hot_pixels(raw.astype(np.float32))
    assert n == len(hot)
    changed = set(zip(*np.nonzero(cleaned != raw.astype(np.float32))))
    assert changed == hot
    for y, x in hot:  # replaced by the same-colour neighbourhood, close to the true value
        assert abs(cleaned[y, x] - truth[y, x]) < 60


def test_an_interrupt_right_after_the_temp_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM arrives as an exception at any point of an atomic write, even between creating the
    temporary file and writing to it: the folder must be left as it was."""
    import builtins

    real_open = builtins.open

    def open_then_interrupt(*args, **kwargs):
        real_open(*args, **kwargs).close()
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        zfiles.write_text_atomic(tmp_path / "manifest.json", "{}")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_one_array_written_to_several_fits_files_at_once(tmp_path):
    """The writers never byteswap the caller's array in place: written from four threads at once,
    every file passes its checksum and holds the array's values, and the array is unchanged."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import make_tan_wcs

    plane = np.random.default_rng(3).normal(100, 5, (1500, 1200)).astype(np.float32)
    before = plane.tobytes()
    wcs = make_tan_wcs(10.0, 20.0, plane.shape)
    paths = [tmp_path / f"p{k}.fits" for k in range(4)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda p: zf.write_plane_fits(p, plane, wcs.deepcopy()), paths))
    assert plane.tobytes() == before
    for p in paths:
        with fits.open(p, checksum=True) as hdul:  # a failed checksum is a warning: errors here
            np.testing.assert_array_equal(hdul[0].data, plane)
