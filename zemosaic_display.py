"""Display products of a linear mosaic: the auto-stretch, north-up orientation, preview PNG, 16-bit TIFF.

The science FITS stays linear in the sensor's colours (:mod:`zemosaic_fits`); what a person looks at
is made here: the sky made grey, the white balance of :func:`zemosaic_photometry.white_balance`
applied, one asinh curve on the luminance (colours keep their ratios), turned north up / east left.
Files are written atomically (:func:`zemosaic_files.write_atomic`).
"""

from __future__ import annotations

import functools
import io
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from astropy.wcs import WCS

import zemosaic_fits as zfits
from zemosaic_files import write_atomic
from zemosaic_utils import (_percentiles_gpu, bilinear_gather, block_mean, channel_planes, mad_sigma, map_threads,
                            over_channels, scatter_channels, sky_level, subsample)

__all__ = [
    "display_orientation",
    "north_up",
    "read_png_size",
    "stretch_for_display",
    "stretch_unit",
    "write_display_tiff",
    "write_preview_png",
]

# --------------------------------------------------------------------------
# Previews
# --------------------------------------------------------------------------


def _asinh_softness(background: float, target: float = 0.25) -> float:
    """Asinh strength that lifts the normalised ``background`` level to ``target``."""
    if background <= 0.0:
        return 100.0
    if background >= target:
        return 1e-3  # already bright: stay (almost) linear

    def lifted(beta: float) -> float:
        return math.asinh(beta * background) / math.asinh(beta)

    low, high = math.log(1e-3), math.log(1e7)
    for _ in range(60):  # bisection in log space; lifted() grows with beta
        middle = 0.5 * (low + high)
        low, high = (middle, high) if lifted(math.exp(middle)) < target else (low, middle)
    return math.exp(0.5 * (low + high))


def _display_levels(luminance: np.ndarray) -> tuple[float, float, float] | None:
    """(black, white, background) of the finite luminance values, or None if none."""
    samples = luminance[np.isfinite(luminance)].astype(np.float64)
    if samples.size == 0:
        return None
    background = float(np.median(samples))
    sigma = float(mad_sigma(samples, np, background))
    # The 0th percentile is the minimum: one partition of the samples gives it and the white point.
    lowest, white = _percentiles_gpu(samples, 0.0, 99.8, np)
    # Black just under the sky so noise stays visible instead of clipping half of it.
    black = max(lowest, background - 2.8 * sigma)
    if white <= black:
        white = max(float(samples.max()), black + 1e-6)
    if white <= black:  # float rounding on huge values
        white = black + 1.0
    return black, white, background


@dataclass(frozen=True)
class _DisplayCurve:
    """The display stretch of one image, measured once and applied band by band.

    ``sky``/``gains``/``grey``: each channel becomes ``(value - sky) * gain + grey`` (None: as
    is); then black and white points and the asinh strength ``beta``, on the luminance.
    """

    sky: np.ndarray | None
    gains: np.ndarray | None
    grey: float
    black: float
    white: float
    beta: float

    def balanced(self, image: np.ndarray) -> np.ndarray:
        """Return ``image`` with a grey sky and the white balance applied (float32)."""
        if self.sky is None:
            return image
        return ((image - self.sky) * self.gains + self.grey).astype(np.float32)

    def _stretched_planes(self, band: np.ndarray) -> tuple[list, np.ndarray]:
        """Return a band's channel planes after the balance and the curve, and their per-pixel peak.

        Computed on channel planes: the same values as on the ``(h, W, C)`` band, where NumPy
        would loop over runs of C values for every operand broadcast along the channels.
        """
        planes = [band[..., c] for c in range(band.shape[2])]
        if self.sky is not None:
            planes = [((p - self.sky[c]) * self.gains[c] + self.grey).astype(np.float32) for c, p in enumerate(planes)]
        scaled = [np.clip((p - self.black) / (self.white - self.black), 0.0, None) for p in planes]
        level = functools.reduce(np.add, scaled) / np.float32(len(scaled))  # = mean over channels
        with np.errstate(invalid="ignore", divide="ignore"):
            gain = np.where(level > 0, np.arcsinh(self.beta * level) / (math.asinh(self.beta) * level), 0.0)
        stretched = [p * gain for p in scaled]
        return stretched, functools.reduce(np.maximum, stretched)

    def overexposed(self, band: np.ndarray) -> np.ndarray:
        """Return the ``(h, W)`` bool pixels of a band that the curve takes past the white point."""
        with np.errstate(invalid="ignore"):
            return self._stretched_planes(band)[1] > 1.0

    def apply(self, band: np.ndarray, white: np.ndarray | None = None) -> np.ndarray:
        """Return a band of rows stretched to float32 ``(h, W, 3)`` in [0, 1].

        A pixel past the white point keeps its hue (its colour was measured); ``white``
        (``(h, W)`` bool) pixels are white (:func:`_saturated_stars`: their colour was not).
        """
        stretched, peak = self._stretched_planes(band)
        with np.errstate(invalid="ignore", divide="ignore"):
            # A channel above 1 would clip and shift the hue: scale the pixel down instead.
            stretched = [np.where(peak > 1.0, p / peak, p) for p in stretched]
        if white is not None:
            stretched = [np.where(white, 1.0, p) for p in stretched]
        out = np.empty(band.shape[:2] + (3,), np.float32)
        for c in range(3):  # mono is replicated to RGB
            p = np.nan_to_num(stretched[min(c, len(stretched) - 1)], nan=0.0, posinf=0.0, neginf=0.0)
            out[..., c] = np.clip(p, 0.0, 1.0)
        return out


#: How far a saturated star's white disc reaches past its clipped core, in core radii: its glare
#: past the white point, not the nebula it may sit in (the demo's star in its bright nebula).
_GLARE_REACH = 2.0


def _saturated_stars(image: np.ndarray, curve: _DisplayCurve, saturated: np.ndarray) -> np.ndarray:
    """Return the ``(H, W)`` bool pixels shown white: each saturated star's overexposed disc.

    Each clipped core grows over the pixels past the white point that touch it, out to
    :data:`_GLARE_REACH` core radii: they are the same star's glare, and hue-kept they are a ring
    of its brightest channel around a white core (a one-pixel blue ring around the synthetic
    stars that clipped; 1,019 pixels around the real subs' saturated stars, 7 once grown).
    """
    from scipy import ndimage

    white = saturated.copy()
    labels, _ = ndimage.label(saturated)
    h, w = saturated.shape
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        reach = int(np.ceil(_GLARE_REACH * math.sqrt(np.sum(labels[box] == k) / math.pi))) + 1
        window = (slice(max(box[0].start - reach, 0), min(box[0].stop + reach, h)),
                  slice(max(box[1].start - reach, 0), min(box[1].stop + reach, w)))
        core = labels[window] == k
        near = ndimage.distance_transform_edt(~core) <= reach
        grown, _ = ndimage.label(core | (near & curve.overexposed(image[window])))
        white[window] |= grown == grown[core][0]
    return white


def _display_curve(image: np.ndarray, wb_gains: Sequence[float] | None) -> _DisplayCurve | None:
    """Measure the display stretch of a float32 ``(H, W, C)`` image on a subsample; None if no data."""
    channels = image.shape[2]
    # A quarter of a million pixels is plenty for a display stretch: on the demo mosaic, levels
    # within 0.2 % of a million pixels' in a fifth of the time.
    sample = subsample(image, 250_000)
    sky = gains = None
    grey = 0.0
    if channels > 1 and np.isfinite(sample).any():
        # Display only: shift each channel so the sky is grey. A one-shot-colour camera's raw
        # balance (green-heavy for a Seestar) would otherwise tint the whole preview. The sky is
        # the mode, as for the white balance: a median of a nebula-filled field sits on the
        # nebula and leaves the sky tinted the nebula's complementary colour.
        levels = np.array([sky_level(sample[..., c].ravel()) for c in range(channels)])
        if np.all(np.isfinite(levels)):
            sky, grey = levels.astype(np.float32), float(levels.mean())
            gains = np.ones(channels, np.float32) if wb_gains is None else np.asarray(wb_gains, np.float32)
    curve = _DisplayCurve(sky, gains, grey, 0.0, 1.0, 1.0)
    balanced = curve.balanced(sample)
    levels = _display_levels(over_channels(np.add, balanced) / np.float32(balanced.shape[2]))
    if levels is None:
        return None
    black, white, background = levels
    return _DisplayCurve(sky, gains, grey, black, white,
                         _asinh_softness((background - black) / (white - black)))


#: Rows per band of the display stretch: a few MB of temporaries per band stay in cache, and the
#: bands run on every core (NumPy releases the GIL).
_STRETCH_BAND_ROWS = 128


def _stretched(image_hwc: np.ndarray, wb_gains, finish: Callable, dtype, saturated=None) -> np.ndarray:
    """Return ``finish(stretched band)`` for every band of rows, as one ``(H, W, 3)`` ``dtype`` array."""
    image = zfits.as_hwc_float32(image_hwc)
    height, width = image.shape[:2]
    output = np.zeros((height, width, 3), dtype=dtype)
    curve = _display_curve(image, wb_gains)
    if curve is None:
        return output
    white = None if saturated is None or not saturated.any() else _saturated_stars(image, curve, saturated)

    def band(r0):
        rows = slice(r0, r0 + _STRETCH_BAND_ROWS)
        output[rows] = finish(curve.apply(image[rows], None if white is None else white[rows]))

    map_threads(band, range(0, height, _STRETCH_BAND_ROWS))
    return output


def stretch_unit(image_hwc: np.ndarray, wb_gains: Sequence[float] | None = None,
                 saturated: np.ndarray | None = None) -> np.ndarray:
    """Auto-stretch an image to float32 ``(H, W, 3)`` in [0, 1] for display products.

    The sky is first made grey (a per-channel offset); ``wb_gains`` (one per channel, measured
    by :func:`zemosaic_photometry.white_balance`) then scale each channel's light above the sky,
    so stars come out white. Black point just below the sky background (median - 2.8 sigma,
    robust), white point at the 99.8th percentile, both measured on the luminance of a subsample
    of the finite pixels; then one asinh curve applied to the luminance and the same gain to
    every channel, so colours keep their ratios. NaN -> black; mono is replicated to RGB.
    ``saturated`` (``(H, W)`` bool: pixels clipped in the frames,
    :func:`zemosaic_worker.mosaic_saturated`) are white, and so is the rest of their star past
    the white point (:func:`_saturated_stars`).
    """
    return _stretched(image_hwc, wb_gains, lambda band: band, np.float32, saturated)


def stretch_for_display(image_hwc: np.ndarray, wb_gains: Sequence[float] | None = None,
                        dtype: Any = np.uint8, saturated: np.ndarray | None = None) -> np.ndarray:
    """Auto-stretch an image to ``(H, W, 3)`` integers (uint8 or uint16) for display.

    See :func:`stretch_unit` for the stretch; the full integer range spans black to white.
    """
    top = np.iinfo(dtype).max
    return _stretched(image_hwc, wb_gains, lambda band: np.rint(band * top).astype(dtype), dtype, saturated)


# A grid within this angle of a multiple of 90 degrees is only flipped/transposed for display:
# exact and cheap, where resampling would soften the image for no visible gain.
_ORIENTATION_TOLERANCE_DEG = 0.5


def display_orientation(wcs: WCS) -> np.ndarray:
    """Return the 2x2 matrix taking pixel offsets ``(dx, dy)`` to display offsets ``(du, dv)``.

    Display axes: ``u`` to the right, ``v`` down (row 0 of a PNG is its top), one display
    pixel per image pixel, north up (-v) and east left (-u). Measured at the WCS reference
    point from the sky positions of its neighbouring pixels, so any CD matrix (rotation,
    mirror) is handled.
    """
    celestial = wcs if wcs.is_celestial else wcs.celestial
    x0, y0 = (float(v) - 1.0 for v in celestial.wcs.crpix)
    ra, dec = celestial.pixel_to_world_values(np.array([x0, x0 + 1, x0]), np.array([y0, y0, y0 + 1]))
    east = (np.asarray(ra[1:]) - ra[0] + 180.0) % 360.0 - 180.0  # wrap across RA = 0
    east = east * math.cos(math.radians(float(dec[0])))
    north = np.asarray(dec[1:]) - dec[0]
    sky = np.array([east, north])  # columns: sky offset of one pixel along x, along y (deg)
    scale = math.sqrt(abs(np.linalg.det(sky)))
    return -sky / scale


def _signed_permutation(matrix: np.ndarray) -> np.ndarray | None:
    """The signed permutation matrix within the tolerance angle of ``matrix``, or None."""
    rounded = np.rint(matrix)
    if not (np.abs(rounded).sum(axis=0) == 1).all() or not (np.abs(rounded).sum(axis=1) == 1).all():
        return None
    return rounded if np.abs(matrix - rounded).max() < math.sin(
        math.radians(_ORIENTATION_TOLERANCE_DEG)) else None


def _permuted(image: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """Apply a signed permutation display matrix with flips and a transpose (no resampling)."""
    if perm[0, 1] != 0:  # u follows y and v follows x: swap the array's rows and columns
        image = image.transpose(1, 0, 2)
        col_sign, row_sign = perm[0, 1], perm[1, 0]
    else:
        col_sign, row_sign = perm[0, 0], perm[1, 1]
    return image[::-1 if row_sign < 0 else 1, ::-1 if col_sign < 0 else 1]


#: Output pixels per band of the north-up resampling: the gather's temporaries stay in cache.
_RESAMPLE_BAND_PIXELS = 65_536


def _resampled(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Resample ``image`` (bilinear, NaN outside) through the display matrix of any angle.

    ``map_coordinates``' ``order=1``/``cval=nan`` rules through the co-add's gather
    (:func:`zemosaic_utils.bilinear_gather`), one gather per band of output rows for all channels,
    the bands on every core; the coordinates exist for one band at a time, however large the
    mosaic.
    """
    height, width, n_ch = image.shape
    corners = matrix @ np.array([[0, width - 1, 0, width - 1], [0, 0, height - 1, height - 1]], float)
    low = corners.min(axis=1)
    out_w, out_h = (int(math.ceil(v)) + 1 for v in corners.max(axis=1) - low)
    # Output (u, v) -> input (x, y) = inv(M) ((u, v) + low).
    inverse = np.linalg.inv(matrix)
    origin = inverse @ low
    planes = channel_planes(image, np)
    out = np.empty((out_h, out_w, n_ch), np.float32)
    rows = max(1, _RESAMPLE_BAND_PIXELS // out_w)
    u = np.arange(out_w, dtype=np.float64)[None, :]

    def band(r0):
        r1 = min(out_h, r0 + rows)
        v = np.arange(r0, r1, dtype=np.float64)[:, None]
        x = inverse[0, 0] * u + inverse[0, 1] * v + origin[0]
        y = inverse[1, 0] * u + inverse[1, 1] * v + origin[1]
        scatter_channels(out[r0:r1], bilinear_gather(planes, (height, width), y, x, np, nan_outside=True))

    map_threads(band, range(0, out_h, rows))
    return out


def north_up(image_hwc: np.ndarray, wcs: WCS) -> np.ndarray:
    """Return ``image_hwc`` turned for display: north up, east left (row 0 = top).

    ``wcs`` gives the orientation (any image of the same grid, also a block-averaged one, turns
    the same way). A grid close to a multiple of 90 degrees is flipped/transposed exactly;
    otherwise the image is resampled bilinearly onto a north-up grid, NaN where there is no data.
    """
    image = zfits.as_hwc_float32(image_hwc)
    matrix = display_orientation(wcs)
    perm = _signed_permutation(matrix)
    return _permuted(image, perm) if perm is not None else _resampled(image, matrix)


def _encode_png(rgb: np.ndarray) -> bytes:
    """Return the 8-bit RGB PNG bytes of an ``(H, W, 3)`` uint8 image (Pillow, fast compression)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _display_image(image_hwc: np.ndarray, wcs: WCS | None, max_size: int | None,
                   saturated: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Block-average to at most ``max_size`` px (None: full size) and turn north up when a WCS is given.

    Returns ``(image, saturated)``: the ``saturated`` mask goes the same way (a display pixel is
    saturated when any pixel it is made of was), None without one.
    """
    image = zfits.as_hwc_float32(image_hwc)
    factor = 1
    if max_size is not None:
        if int(max_size) < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        factor = -(-max(image.shape[:2]) // int(max_size))

    def shown(plane_or_image):
        if factor > 1:
            plane_or_image = block_mean(plane_or_image, factor)
        return plane_or_image if wcs is None else north_up(plane_or_image, wcs)

    if saturated is None:
        return shown(image), None
    # The mask goes the same way as a plane of its own: averaged and turned exactly alike.
    with np.errstate(invalid="ignore"):
        return shown(image), shown(np.asarray(saturated, np.float32)[..., None])[..., 0] > 0


def _resolved(wb_gains):
    """Return the white balance gains, calling ``wb_gains`` first when it is a function."""
    return wb_gains() if callable(wb_gains) else wb_gains


def write_preview_png(path: str | os.PathLike, image_hwc: np.ndarray,
                      max_size: int = 2048, wb_gains: Sequence[float] | None = None,
                      wcs: WCS | None = None, saturated: np.ndarray | None = None) -> None:
    """Write a stretched RGB PNG preview whose longer side is at most ``max_size``.

    The image is block-averaged (NaN-aware) by the smallest integer factor that
    fits, turned north up / east left when ``wcs`` (the image's WCS) is given,
    stretched with :func:`stretch_for_display` (white balanced with ``wb_gains``)
    and written atomically. ``wb_gains`` may be a function that returns the gains: it is called
    once the image is turned, so that they can be measured meanwhile. ``saturated``: the
    ``(H, W)`` bool pixels shown white (:func:`stretch_unit`).
    """
    image, saturated = _display_image(image_hwc, wcs, max_size, saturated)
    png = _encode_png(stretch_for_display(image, _resolved(wb_gains), saturated=saturated))
    write_atomic(path, lambda fh: fh.write(png))


def write_display_tiff(path: str | os.PathLike, image_hwc: np.ndarray, wcs: WCS | None = None,
                       wb_gains: Sequence[float] | None = None, saturated: np.ndarray | None = None) -> None:
    """Write the full-size display image: 16-bit RGB TIFF, stretched, white balanced, north up.

    The product a person edits further (GIMP, Photoshop, Siril): the same stretch as the
    preview, with 65536 levels so further curves do not posterise. Written atomically.
    ``wb_gains`` and ``saturated``: as for :func:`write_preview_png`.
    """
    import tifffile  # only the display export needs it

    image, saturated = _display_image(image_hwc, wcs, None, saturated)
    rgb = stretch_for_display(image, _resolved(wb_gains), dtype=np.uint16, saturated=saturated)
    write_atomic(path, lambda fh: tifffile.imwrite(fh, rgb, photometric="rgb",
                                                    software="ZeMosaic"))


def read_png_size(path: str | os.PathLike) -> tuple[int, int]:
    """Return (width, height) from a PNG file's IHDR chunk; ValueError if not a PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:  # reads the header only
            if image.format == "PNG":
                return image.size
    except UnidentifiedImageError:
        pass
    raise ValueError(f"{os.fspath(path)} is not a PNG file")
