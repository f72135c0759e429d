"""Display products: the stretch, its levels, the preview PNG."""

import os

import numpy as np
import pytest

import zemosaic_display as zd


def decode_png(path):
    """Return ``(width, height, pixels)`` of an 8-bit RGB PNG file."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return image.width, image.height, np.asarray(image)


def test_preview_png_downsampled_and_nan_black(tmp_path):
    rng = np.random.default_rng(5)
    image = (100 + 10 * rng.standard_normal((300, 500, 3))).astype(np.float32)
    image[150:160, 200:210] += 5000  # a star
    image[:40, :40] = np.nan
    path = tmp_path / "preview.png"
    zd.write_preview_png(path, image, max_size=128)
    assert zd.read_png_size(path) == (125, 75)  # factor ceil(500 / 128) = 4
    width, height, pixels = decode_png(path)
    assert (width, height) == (125, 75)
    assert np.all(pixels[:10, :10] == 0)  # blocks entirely NaN
    assert pixels[10:, 10:].mean() > 10  # the sky is lifted above black
    assert pixels[37:40, 50:52].min() > 200  # the star is bright
    assert os.listdir(tmp_path) == ["preview.png"]


def test_preview_png_small_image_not_resized(tmp_path):
    image = np.random.default_rng(6).random((20, 30, 1)).astype(np.float32)
    zd.write_preview_png(tmp_path / "p.png", image)
    width, height, pixels = decode_png(tmp_path / "p.png")
    assert (width, height) == (30, 20)
    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])  # mono -> grey


def test_read_png_size_rejects_non_png(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png at all, really not")
    with pytest.raises(ValueError, match="not a PNG"):
        zd.read_png_size(tmp_path / "x.png")


def test_stretch_is_linked_and_handles_nan():
    rng = np.random.default_rng(7)
    image = (50 + rng.random((40, 40, 3))).astype(np.float32)
    image[5, 5] = [400.0, 400.0, 400.0]  # neutral star
    image[6, 6] = [400.0, 200.0, 100.0]  # red star
    image[7, 7] = np.nan
    out = zd.stretch_for_display(image)
    assert out.dtype == np.uint8 and out.shape == (40, 40, 3)
    assert np.all(out[7, 7] == 0)
    assert out[5, 5, 0] == out[5, 5, 1] == out[5, 5, 2] > 200
    red = out[6, 6].astype(int)
    assert red[0] > red[1] > red[2]  # colour order kept by the linked stretch
    assert np.all(zd.stretch_for_display(np.full((4, 4, 3), np.nan)) == 0)


def test_display_levels_ignore_nan_footprints():
    """The black and white points of a tile with NaN borders are those of its pixels with data."""
    rng = np.random.default_rng(4)
    data = rng.gamma(3.0, 40.0, (60, 50)).astype(np.float32)
    holed = np.full((60, 70), np.nan, np.float32)
    holed[:, 10:60] = data
    from zemosaic_utils import mad_sigma

    black, white, background = zd._display_levels(holed)
    assert (black, white, background) == zd._display_levels(data)
    values = data.ravel().astype(np.float64)
    assert white == np.percentile(values, 99.8) and background == np.median(values)
    assert black == max(values.min(), background - 2.8 * mad_sigma(values))


def test_sky_stays_grey_beside_a_large_nebula():
    """A red nebula over 40 % of the field must not move the sky levels: the sky stays grey in the
    display. A per-channel median moved G by a noise sigma and the sky came out 40 % apart between
    channels (0.26 / 0.18 / 0.18); the mode keeps them within 5 % (1-2 grey levels of 255)."""
    rng = np.random.default_rng(3)
    image = np.array([900.0, 1000.0, 800.0]) + rng.normal(0, 10, (200, 200, 3))
    image[:, :80] += np.array([400.0, 60.0, 40.0])  # the nebula, far above the sky noise
    out = zd.stretch_unit(image.astype(np.float32))
    sky = out[:, 120:].reshape(-1, 3).mean(axis=0)
    assert np.ptp(sky) < 0.05 * sky.mean(), sky


def test_north_up_resampling_is_scipys_affine_transform():
    """The banded gather gives what ndimage.affine_transform (order 1, NaN outside) gives."""
    from scipy import ndimage

    rng = np.random.default_rng(4)
    image = rng.normal(100.0, 10.0, (300, 170, 3)).astype(np.float32)
    image[:, :3] = np.nan  # a footprint edge
    angle = np.radians(17.0)
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shown = zd._resampled(image, matrix)
    corners = matrix @ np.array([[0, 169, 0, 169], [0, 0, 299, 299]], float)
    low = corners.min(axis=1)
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    inverse = swap @ np.linalg.inv(matrix) @ swap
    expected = np.stack([ndimage.affine_transform(image[..., c], inverse, offset=inverse @ low[::-1],
                                                  output_shape=shown.shape[:2], order=1,
                                                  mode="constant", cval=np.nan) for c in range(3)], -1)
    assert np.array_equal(np.isnan(shown), np.isnan(expected))
    assert np.isfinite(shown).mean() > 0.4
    np.testing.assert_allclose(shown, expected, rtol=1e-5, equal_nan=True)
