"""Deterministic synthetic Seestar S50 data for ZeMosaic demos, tests and benchmarks.

This module fabricates a small "observing night" with a Seestar S50 smart telescope:
a mosaic of ``nx x ny`` panels, each observed with a few 10 s sub-exposures, written
as raw GRBG Bayer ``uint16`` FITS frames with a plate-solved TAN WCS (CD matrix) -
i.e. exactly the kind of input ZeMosaic has to turn into an RGB mosaic.  Next to the
frames it writes the *truth*: the noiseless RGB sky on its own TAN grid plus JSON
metadata describing every frame (transparency, sky pedestal, rotation, dither, ...).

Sky model
---------
The sky is an analytic :class:`SkyModel` defined on a "truth" TAN grid centred on
(``ra_center``, ``dec_center``) with the same pixel scale as the frames:

* stars with a power-law magnitude distribution (``dN/dm ~ 10**(0.3 m)``), a
  circular Gaussian PSF (FWHM ~2.7 px) and per-star colours derived from a B-V
  colour index through a black-body approximation (a few blue stars, mostly
  yellow/orange ones); the brightest ones saturate;
* a coloured nebula: reddish H-alpha-like emission blobs, filaments and an arc, a
  bright compact core, and bluish reflection blobs;
* a smooth, sky-fixed linear background gradient (per colour channel).

Everything is evaluated analytically at the sky position of each pixel centre, for
the truth grid and for every frame alike: stars are projected through the target
WCS and rendered at their exact sub-pixel positions, and the smooth components are
analytic functions of truth-pixel coordinates.  Frame pixel -> truth pixel mapping
between two TAN projections (same sphere, two tangent planes) is *exactly* a plane
homography, so it is fitted once per frame from a handful of WCS round trips and
then applied to millions of pixels cheaply (verified against the WCS; we fall back
to per-pixel WCS calls if a WCS with distortions ever makes it non-projective).

Units and the frame model
-------------------------
Truth values are ADU of one debayered frame pixel, per colour channel, for a frame
with transparency 1.0, *excluding* that frame's own additive sky pedestal::

    frame_rgb(pixel) ~= transparency * truth_rgb(sky position of pixel) + sky_pedestal_rgb

Each raw Bayer pixel samples only its own colour channel of that expectation
(GRBG: row 0 = G R G R ..., row 1 = B G B G ...).  On top of it come sensor-fixed
hot pixels, a satellite trail in exactly one frame, Poisson noise (gain in e-/ADU)
and Gaussian read noise, then rounding and clipping to 0..65535.

Determinism: every random choice is drawn from ``numpy.random.default_rng`` seeded
with ``[seed, <stream id>(, <frame index>)]``, so a given seed always produces the
same bytes, and independent streams (stars, nebula, layout, noise of frame *i*, ...)
do not perturb each other when an option changes.

Public API (see the individual docstrings)
------------------------------------------
``generate_dataset``, ``load_truth``, ``load_sky_model``, ``expected_frame_rgb``,
``build_sky_model``, ``SkyModel``, ``make_tan_wcs``, ``wcs_to_header``,
``bayer_channel_map``, ``expected_bayer_frame``, ``make_bayer_frame``,
``footprint_overlap``, ``main`` (CLI: ``python -m zemosaic_synth OUTDIR ...``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------

#: Seestar S50: 2.9 um pixels (IMX462) behind a 250 mm focal length -> ~2.39"/px.
PIXEL_SCALE_ARCSEC = 2.39
#: numpy shapes (rows, cols) of a frame: the Seestar sensor is used in portrait mode.
FRAME_SHAPES = {"full": (1920, 1080), "small": (480, 270)}
BAYER_PATTERN = "GRBG"
CHANNEL_NAMES = ("R", "G", "B")

DEFAULT_RA_CENTER = 83.8  # deg, Orion-ish
DEFAULT_DEC_CENTER = -5.4  # deg
DEFAULT_OVERLAP = 0.20  # fraction of the frame size shared by neighbouring panels
DEFAULT_SKY_PEDESTAL_RGB = (900.0, 1000.0, 800.0)  # ADU, nominal per-channel sky level
DEFAULT_PEDESTAL_JITTER = 0.06  # +-6 % common, +-2 % per channel, per frame
DEFAULT_TRANSPARENCY_RANGE = (0.90, 1.00)
DEFAULT_GAIN = 0.8  # e-/ADU
DEFAULT_READ_NOISE = 3.0  # ADU rms
DEFAULT_FWHM_PX = 2.7
DEFAULT_STAR_DENSITY = 6000.0  # stars per square degree down to DEFAULT_MAG_RANGE[1]
DEFAULT_MAG_RANGE = (6.0, 16.0)
#: Peak (G channel) ADU of a star of magnitude ``DEFAULT_MAG_REF``; with the range
#: above, stars brighter than mag ~6.7 exceed 65535 ADU and saturate.
DEFAULT_MAG_REF = 7.0
DEFAULT_PEAK_AT_MAG_REF = 50000.0
DEFAULT_EXPTIME = 10.0  # s
DEFAULT_START_TIME = "2024-01-15T20:00:00"
DEFAULT_ROTATION_DRIFT_DEG = 6.0  # field rotation accumulated over the whole run
DEFAULT_ROTATION_JITTER_DEG = 0.05
DEFAULT_DITHER_PX_FULL = 40.0  # scaled by the frame size for size="small"
DEFAULT_HOT_PIXEL_DENSITY = 1.0 / 15000.0  # hot pixels per sensor pixel
DEFAULT_TRUTH_MARGIN_PX_FULL = 32

# Random stream identifiers: one independent generator per purpose (see module doc).
_STREAM_STARS = 1
_STREAM_NEBULA = 2
_STREAM_FRAMES = 3
_STREAM_HOT = 4
_STREAM_SATELLITE = 5
_STREAM_NOISE = 100

_FRAME_NAME_PREFIX = "Light_panel"

_KNOWN_OPTIONS = {
    "pixel_scale_arcsec": PIXEL_SCALE_ARCSEC,
    "ra_center": DEFAULT_RA_CENTER,
    "dec_center": DEFAULT_DEC_CENTER,
    "overlap": DEFAULT_OVERLAP,
    "base_rotation_deg": 0.0,
    "rotation_drift_deg": DEFAULT_ROTATION_DRIFT_DEG,
    "rotation_jitter_deg": DEFAULT_ROTATION_JITTER_DEG,
    "dither_px": None,  # None -> DEFAULT_DITHER_PX_FULL scaled to the frame size
    "transparency_range": DEFAULT_TRANSPARENCY_RANGE,
    "sky_pedestal_rgb": DEFAULT_SKY_PEDESTAL_RGB,
    "pedestal_jitter": DEFAULT_PEDESTAL_JITTER,
    "gain": DEFAULT_GAIN,
    "read_noise": DEFAULT_READ_NOISE,
    "noise": True,
    "hot_pixels": True,  # True -> density default, False/0 -> none, int -> that many
    "satellite": True,
    "satellite_frame": None,  # None -> random frame index
    "fwhm_px": DEFAULT_FWHM_PX,
    "star_density": DEFAULT_STAR_DENSITY,
    "mag_range": DEFAULT_MAG_RANGE,
    "nebula": True,
    "exptime": DEFAULT_EXPTIME,
    "start_time": DEFAULT_START_TIME,
    "object_name": "Synthetic Orion",
}


# --------------------------------------------------------------------------------------
# WCS helpers
# --------------------------------------------------------------------------------------


def make_tan_wcs(
    ra: float,
    dec: float,
    rotation_deg: float,
    shape: Sequence[int],
    pixel_scale_arcsec: float = PIXEL_SCALE_ARCSEC,
    crpix: Sequence[float] | None = None,
) -> WCS:
    """Build a plate-solve-like 2-D TAN WCS with a CD matrix.

    Parameters
    ----------
    ra, dec : float
        Sky position (deg) of the reference pixel.
    rotation_deg : float
        Position angle of the image +y axis, degrees East of North (0 = North up,
        East left, the usual non-mirrored sky orientation).
    shape : (ny, nx)
        numpy shape of the image; only used to place the default reference pixel.
    pixel_scale_arcsec : float
        Pixel scale in arcsec per pixel.
    crpix : (crpix1, crpix2), optional
        FITS (1-based) reference pixel; defaults to the image centre.
    """
    ny, nx = int(shape[0]), int(shape[1])
    if crpix is None:
        crpix = ((nx + 1) / 2.0, (ny + 1) / 2.0)
    s = pixel_scale_arcsec / 3600.0
    th = math.radians(rotation_deg)
    c, n = math.cos(th), math.sin(th)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [float(ra) % 360.0, float(dec)]
    w.wcs.crpix = [float(crpix[0]), float(crpix[1])]
    # Determinant -s**2: RA grows to the left when North is up (sky seen from inside).
    w.wcs.cd = np.array([[-s * c, s * n], [s * n, s * c]])
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    w.wcs.set()
    return w


def wcs_to_header(wcs: WCS, header: fits.Header | None = None) -> fits.Header:
    """Write ``wcs`` as plain TAN keywords with a CD matrix (no PC/CDELT).

    astropy's ``WCS.to_header`` always emits PC + CDELT; plate solvers used by
    Seestar tools write CD matrices, so we write the keywords ourselves to look like
    the real thing (and to exercise CD handling downstream).
    """
    h = fits.Header() if header is None else header
    cd = wcs.wcs.cd if wcs.wcs.has_cd() else wcs.pixel_scale_matrix
    h["CTYPE1"] = ("RA---TAN", "gnomonic projection")
    h["CTYPE2"] = ("DEC--TAN", "gnomonic projection")
    h["CUNIT1"] = "deg"
    h["CUNIT2"] = "deg"
    h["CRVAL1"] = (float(wcs.wcs.crval[0]), "[deg] RA of reference pixel")
    h["CRVAL2"] = (float(wcs.wcs.crval[1]), "[deg] Dec of reference pixel")
    h["CRPIX1"] = (float(wcs.wcs.crpix[0]), "reference pixel (1-based)")
    h["CRPIX2"] = (float(wcs.wcs.crpix[1]), "reference pixel (1-based)")
    h["CD1_1"] = float(cd[0, 0])
    h["CD1_2"] = float(cd[0, 1])
    h["CD2_1"] = float(cd[1, 0])
    h["CD2_2"] = float(cd[1, 1])
    h["RADESYS"] = "ICRS"
    h["EQUINOX"] = 2000.0
    return h


def _fit_homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Direct linear transform (Hartley-normalised) fit of ``dst ~ H @ src``."""

    def _norm(p: np.ndarray) -> np.ndarray:
        c = p.mean(axis=0)
        d = np.mean(np.hypot(p[:, 0] - c[0], p[:, 1] - c[1]))
        k = math.sqrt(2.0) / max(d, 1e-12)
        return np.array([[k, 0.0, -k * c[0]], [0.0, k, -k * c[1]], [0.0, 0.0, 1.0]])

    ts, td = _norm(src), _norm(dst)
    s = np.c_[src, np.ones(len(src))] @ ts.T
    d = np.c_[dst, np.ones(len(dst))] @ td.T
    n = len(src)
    a = np.zeros((2 * n, 9))
    a[0::2, 0:3] = -s
    a[0::2, 6:9] = s * d[:, [0]]
    a[1::2, 3:6] = -s
    a[1::2, 6:9] = s * d[:, [1]]
    _, _, vt = np.linalg.svd(a)
    hn = vt[-1].reshape(3, 3)
    h = np.linalg.inv(td) @ hn @ ts
    return h / h[2, 2]


def _apply_homography(h: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    u = (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w
    v = (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w
    return u, v


class _PixelMap:
    """Map 0-based pixel coordinates of one WCS to 0-based pixel coordinates of another.

    Two TAN projections are related by an exact plane homography, so we fit one on
    a grid of WCS round trips and check it; per-pixel WCS calls (~0.5 s per million
    pixels) would dominate the generation time otherwise.
    """

    def __init__(self, src_wcs: WCS, src_shape: Sequence[int], dst_wcs: WCS, tol_px: float = 1e-4):
        self.src_wcs, self.dst_wcs = src_wcs, dst_wcs
        ny, nx = int(src_shape[0]), int(src_shape[1])
        gx, gy = np.meshgrid(np.linspace(-1.0, nx, 9), np.linspace(-1.0, ny, 9))
        gx, gy = gx.ravel(), gy.ravel()
        gu, gv = self._direct(gx, gy)
        self.h = _fit_homography(np.c_[gx, gy], np.c_[gu, gv])
        # Independent check points (not on the fit grid).
        cx, cy = np.meshgrid(np.linspace(0.3, nx - 1.3, 7), np.linspace(0.7, ny - 1.7, 7))
        cx, cy = cx.ravel(), cy.ravel()
        cu, cv = self._direct(cx, cy)
        hu, hv = _apply_homography(self.h, cx, cy)
        err = float(np.max(np.hypot(hu - cu, hv - cv)))
        self.exact = bool(np.isfinite(err) and err < tol_px)
        if not self.exact:
            logger.warning("pixel map is not projective (max err %.3g px); using per-pixel WCS", err)

    def _direct(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ra, dec = self.src_wcs.all_pix2world(x, y, 0)
        u, v = self.dst_wcs.all_world2pix(ra, dec, 0)
        return np.asarray(u, float), np.asarray(v, float)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.exact:
            return _apply_homography(self.h, x, y)
        return self._direct(x, y)


def footprint_overlap(wcs_a: WCS, wcs_b: WCS, shape: Sequence[int], shape_b: Sequence[int] | None = None,
                      step: int = 4) -> float:
    """Fraction of frame A's footprint that frame B also covers (0..1).

    Samples A's pixel grid every ``step`` pixels, maps the samples into B through the
    sky, and counts how many land inside B.
    """
    ny, nx = int(shape[0]), int(shape[1])
    by, bx = (ny, nx) if shape_b is None else (int(shape_b[0]), int(shape_b[1]))
    xs, ys = np.meshgrid(np.arange(0, nx, step) + 0.5 * (step - 1), np.arange(0, ny, step) + 0.5 * (step - 1))
    u, v = _PixelMap(wcs_a, shape, wcs_b)(xs.ravel(), ys.ravel())
    inside = (u >= -0.5) & (u <= bx - 0.5) & (v >= -0.5) & (v <= by - 0.5)
    return float(np.mean(inside))


# --------------------------------------------------------------------------------------
# Bayer helpers
# --------------------------------------------------------------------------------------


def bayer_channel_map(shape: Sequence[int], pattern: str = BAYER_PATTERN) -> np.ndarray:
    """Return an ``int8`` array (0=R, 1=G, 2=B) giving the colour sampled by each pixel.

    ``pattern`` lists the colours of the top-left 2x2 cell row by row, e.g. "GRBG":
    row 0 = G R G R ..., row 1 = B G B G ...
    """
    cell = _bayer_cell(pattern)
    ny, nx = int(shape[0]), int(shape[1])
    tiled = np.tile(cell, ((ny + 1) // 2, (nx + 1) // 2))
    return np.ascontiguousarray(tiled[:ny, :nx])


def _bayer_cell(pattern: str) -> np.ndarray:
    p = pattern.upper()
    if len(p) != 4 or set(p) - set("RGB") or p.count("G") != 2:
        raise ValueError(f"unsupported Bayer pattern {pattern!r}")
    idx = {"R": 0, "G": 1, "B": 2}
    return np.array([[idx[p[0]], idx[p[1]]], [idx[p[2]], idx[p[3]]]], dtype=np.int8)


# --------------------------------------------------------------------------------------
# Sky model
# --------------------------------------------------------------------------------------


def _bv_to_rgb(bv: np.ndarray, boost: float = 1.3) -> np.ndarray:
    """Relative R, G, B responses (G = 1) of stars with colour index ``bv``.

    Temperature from Ballesteros' (2012) B-V formula, then black-body ratios at the
    effective wavelengths of the three channels.  ``boost`` > 1 exaggerates colours a
    little so that the demo mosaic visibly has blue and orange stars.
    """
    bv = np.asarray(bv, float)
    temp = 4600.0 * (1.0 / (0.92 * bv + 1.7) + 1.0 / (0.92 * bv + 0.62))
    lam = np.array([0.600, 0.530, 0.460])  # um, R G B
    x = 14387.77 / (lam[None, :] * temp[:, None])
    planck = lam[None, :] ** -5 / np.expm1(x)
    ratio = (planck / planck[:, [1]]) ** boost
    return ratio


@dataclass
class SkyModel:
    """Analytic RGB sky, in ADU of a debayered pixel at transparency 1 (no pedestal).

    Attributes
    ----------
    truth_wcs, truth_shape
        The truth grid (TAN, CD matrix, North up) the smooth components refer to.
    fwhm_px
        Gaussian PSF FWHM in pixels (same in all frames, so frames match the truth).
    star_ra, star_dec, star_mag, star_bv : (N,) arrays
        Star catalogue.  ``star_amp`` (N, 3) holds the PSF peak ADU per channel.
    gradient
        ``{"g0": [3], "gx": [3], "gy": [3]}``: background ``g0 + gx*nu + gy*nv``
        where nu, nv run from -1 to +1 across the truth grid (x and y).
    emission_rgb, reflection_rgb
        Colours of the two nebula families.
    emission_blobs, reflection_blobs : (K, 6) arrays
        Elliptical Gaussians ``(u0, v0, sigma_major, sigma_minor, angle_rad, amp)``
        in truth-pixel coordinates.
    arcs : (M, 7) array
        Gaussian ridges along circle arcs ``(uc, vc, radius, width, amp,
        angle_centre_rad, half_span_rad)`` (emission colour).
    waves : (P, 3) array and ``wave_amp``
        Plane waves ``(ku, kv, phase)`` modulating the emission by
        ``1 + wave_amp * mean(sin(ku*u + kv*v + phase))`` to give it some texture.
    """

    truth_wcs: WCS
    truth_shape: tuple[int, int]
    fwhm_px: float
    star_ra: np.ndarray
    star_dec: np.ndarray
    star_mag: np.ndarray
    star_bv: np.ndarray
    star_amp: np.ndarray
    gradient: dict[str, list[float]]
    emission_rgb: np.ndarray
    reflection_rgb: np.ndarray
    emission_blobs: np.ndarray
    reflection_blobs: np.ndarray
    arcs: np.ndarray
    waves: np.ndarray
    wave_amp: float = 0.0
    _row_chunk: int = field(default=256, repr=False)

    # -- derived -----------------------------------------------------------------------
    @property
    def sigma_px(self) -> float:
        return self.fwhm_px / (2.0 * math.sqrt(2.0 * math.log(2.0)))

    @property
    def n_stars(self) -> int:
        return int(len(self.star_ra))

    def stamp_radius(self) -> int:
        """Half size of the star stamps: where the brightest PSF drops below 0.02 ADU."""
        amax = float(np.max(self.star_amp)) if self.n_stars else 1.0
        return int(math.ceil(self.sigma_px * math.sqrt(2.0 * math.log(max(amax, 1.0) / 0.02)))) + 1

    # -- serialisation -------------------------------------------------------------------
    def params_dict(self) -> dict[str, Any]:
        """JSON-friendly description of everything except the star table and WCS."""
        return {
            "fwhm_px": self.fwhm_px,
            "truth_shape": list(self.truth_shape),
            "gradient": {k: [float(x) for x in v] for k, v in self.gradient.items()},
            "emission_rgb": [float(x) for x in self.emission_rgb],
            "reflection_rgb": [float(x) for x in self.reflection_rgb],
            "emission_blobs": self.emission_blobs.tolist(),
            "reflection_blobs": self.reflection_blobs.tolist(),
            "arcs": self.arcs.tolist(),
            "waves": self.waves.tolist(),
            "wave_amp": self.wave_amp,
            "blob_columns": ["u0", "v0", "sigma_major", "sigma_minor", "angle_rad", "amp"],
            "arc_columns": ["uc", "vc", "radius", "width", "amp", "angle_centre_rad", "half_span_rad"],
        }

    def star_table(self) -> fits.BinTableHDU:
        """Star catalogue as a FITS binary table (extension ``STARS``)."""
        u, v = self.truth_wcs.wcs_world2pix(self.star_ra, self.star_dec, 0)
        cols = [
            fits.Column("RA", "D", unit="deg", array=self.star_ra),
            fits.Column("DEC", "D", unit="deg", array=self.star_dec),
            fits.Column("X_TRUTH", "D", unit="pix", array=u),
            fits.Column("Y_TRUTH", "D", unit="pix", array=v),
            fits.Column("MAG", "E", array=self.star_mag),
            fits.Column("BV", "E", array=self.star_bv),
            fits.Column("PEAK_R", "D", unit="adu", array=self.star_amp[:, 0]),
            fits.Column("PEAK_G", "D", unit="adu", array=self.star_amp[:, 1]),
            fits.Column("PEAK_B", "D", unit="adu", array=self.star_amp[:, 2]),
        ]
        hdu = fits.BinTableHDU.from_columns(cols, name="STARS")
        hdu.header["FWHM_PX"] = (self.fwhm_px, "Gaussian PSF FWHM [px]")
        hdu.header["COMMENT"] = "Total flux per channel = PEAK * 2*pi*sigma**2, sigma = FWHM/2.3548"
        return hdu

    @classmethod
    def from_parts(cls, truth_wcs: WCS, params: dict[str, Any], stars: Any) -> "SkyModel":
        """Rebuild a model from :meth:`params_dict` output and a ``STARS`` table."""
        amp = np.stack([np.asarray(stars["PEAK_R"], float), np.asarray(stars["PEAK_G"], float),
                        np.asarray(stars["PEAK_B"], float)], axis=1)
        return cls(
            truth_wcs=truth_wcs,
            truth_shape=tuple(int(x) for x in params["truth_shape"]),  # type: ignore[arg-type]
            fwhm_px=float(params["fwhm_px"]),
            star_ra=np.asarray(stars["RA"], float),
            star_dec=np.asarray(stars["DEC"], float),
            star_mag=np.asarray(stars["MAG"], float),
            star_bv=np.asarray(stars["BV"], float),
            star_amp=amp,
            gradient={k: list(v) for k, v in params["gradient"].items()},
            emission_rgb=np.asarray(params["emission_rgb"], float),
            reflection_rgb=np.asarray(params["reflection_rgb"], float),
            emission_blobs=np.asarray(params["emission_blobs"], float).reshape(-1, 6),
            reflection_blobs=np.asarray(params["reflection_blobs"], float).reshape(-1, 6),
            arcs=np.asarray(params["arcs"], float).reshape(-1, 7),
            waves=np.asarray(params["waves"], float).reshape(-1, 3),
            wave_amp=float(params["wave_amp"]),
        )

    # -- smooth components ---------------------------------------------------------------
    def eval_smooth(self, u: np.ndarray, v: np.ndarray, channels: Sequence[int] = (0, 1, 2)) -> np.ndarray:
        """Nebula + gradient at truth-pixel coordinates ``(u, v)``.

        Returns an array of shape ``(len(channels),) + u.shape`` (float64).
        """
        u = np.asarray(u, float)
        v = np.asarray(v, float)
        out = np.empty((len(channels),) + u.shape)
        if u.size == 0:
            return out
        ht, wt = self.truth_shape
        hu, hv = 0.5 * (wt - 1), 0.5 * (ht - 1)
        nu = (u - hu) / hu
        nv = (v - hv) / hv
        g0, gx, gy = (np.asarray(self.gradient[k], float) for k in ("g0", "gx", "gy"))
        for i, c in enumerate(channels):
            out[i] = g0[c] + gx[c] * nu + gy[c] * nv
        # Cheap culling: the caller passes compact chunks, so skip components whose
        # 6-sigma box misses the chunk entirely (their contribution is < 1e-4 ADU).
        box = (float(u.min()), float(u.max()), float(v.min()), float(v.max()))
        em = self._sum_blobs(u, v, self.emission_blobs, box)
        for arc in self.arcs:
            a = self._arc(u, v, arc, box)
            if a is not None:
                em = a if em is None else em + a
        if em is not None:
            if self.wave_amp and len(self.waves):
                mod = np.zeros_like(u)
                for ku, kv, ph in self.waves:
                    mod += np.sin(ku * u + kv * v + ph)
                em *= 1.0 + (self.wave_amp / len(self.waves)) * mod
            for i, c in enumerate(channels):
                out[i] += self.emission_rgb[c] * em
        rf = self._sum_blobs(u, v, self.reflection_blobs, box)
        if rf is not None:
            for i, c in enumerate(channels):
                out[i] += self.reflection_rgb[c] * rf
        return out

    @staticmethod
    def _sum_blobs(u: np.ndarray, v: np.ndarray, blobs: np.ndarray, box: tuple[float, ...]) -> np.ndarray | None:
        acc = None
        for u0, v0, sa, sb, ang, amp in blobs:
            r = 6.0 * sa
            if u0 + r < box[0] or u0 - r > box[1] or v0 + r < box[2] or v0 - r > box[3]:
                continue
            ca, sn = math.cos(ang), math.sin(ang)
            du = u - u0
            dv = v - v0
            p = (du * ca + dv * sn) * (1.0 / sa)
            q = (dv * ca - du * sn) * (1.0 / sb)
            f = np.exp(-0.5 * (p * p + q * q))
            f *= amp
            acc = f if acc is None else acc + f
        return acc

    @staticmethod
    def _arc(u: np.ndarray, v: np.ndarray, arc: np.ndarray, box: tuple[float, ...]) -> np.ndarray | None:
        uc, vc, rad, wid, amp, ang0, half = (float(x) for x in arc)
        r = rad + 6.0 * wid
        if uc + r < box[0] or uc - r > box[1] or vc + r < box[2] or vc - r > box[3]:
            return None
        du = u - uc
        dv = v - vc
        rr = np.hypot(du, dv)
        # Angular window: cos^2 taper over +-half_span around angle_centre, so the arc
        # fades smoothly instead of ending abruptly (keeps the field smooth).
        dth = np.angle(np.exp(1j * (np.arctan2(dv, du) - ang0)))
        win = np.where(np.abs(dth) < half, np.cos(0.5 * np.pi * dth / half) ** 2, 0.0)
        return amp * win * np.exp(-0.5 * ((rr - rad) / wid) ** 2)

    # -- stars -------------------------------------------------------------------------
    def _star_pixels(self, wcs: WCS) -> tuple[np.ndarray, np.ndarray]:
        x, y = wcs.all_world2pix(self.star_ra, self.star_dec, 0)
        return np.asarray(x, float), np.asarray(y, float)

    def _splat_stars(self, wcs: WCS, shape: Sequence[int], chan_of_pixel: np.ndarray | None,
                     channels: Sequence[int]) -> list[np.ndarray]:
        """Render Gaussian PSFs point-sampled at pixel centres.

        ``chan_of_pixel`` (H, W) selects, for a Bayer render, which channel amplitude
        each pixel takes (one output image); otherwise one image per channel.
        Point sampling (instead of pixel integration) is what makes "value at a pixel
        centre = model at that sky position" exact, which the tests rely on.
        """
        ny, nx = int(shape[0]), int(shape[1])
        nout = 1 if chan_of_pixel is not None else len(channels)
        acc = [np.zeros(ny * nx) for _ in range(nout)]
        if self.n_stars == 0:
            return acc
        x, y = self._star_pixels(wcs)
        rad = self.stamp_radius()
        keep = np.isfinite(x) & np.isfinite(y) & (x > -rad - 1) & (x < nx + rad) & (y > -rad - 1) & (y < ny + rad)
        idx = np.nonzero(keep)[0]
        offs = np.arange(-rad, rad + 1)
        inv2s2 = 1.0 / (2.0 * self.sigma_px ** 2)
        batch = 4096
        for start in range(0, len(idx), batch):
            sel = idx[start:start + batch]
            xs, ys = x[sel], y[sel]
            ix = np.rint(xs).astype(np.int64)
            iy = np.rint(ys).astype(np.int64)
            px = ix[:, None, None] + offs[None, None, :]
            py = iy[:, None, None] + offs[None, :, None]
            g = np.exp(-((px - xs[:, None, None]) ** 2 + (py - ys[:, None, None]) ** 2) * inv2s2)
            px, py = np.broadcast_arrays(px, py)
            star = np.broadcast_to(np.arange(len(sel))[:, None, None], px.shape)
            ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
            px, py, g, star = px[ok], py[ok], g[ok], star[ok]
            flat = py * nx + px
            amp = self.star_amp[sel]
            if chan_of_pixel is not None:
                w = g * amp[star, chan_of_pixel.ravel()[flat]]
                acc[0] += np.bincount(flat, weights=w, minlength=ny * nx)
            else:
                for k, c in enumerate(channels):
                    acc[k] += np.bincount(flat, weights=g * amp[star, c], minlength=ny * nx)
        return acc

    # -- renderers -----------------------------------------------------------------------
    def render_rgb(self, wcs: WCS, shape: Sequence[int], *, stars: bool = True, smooth: bool = True) -> np.ndarray:
        """Model RGB (float32, shape (H, W, 3)) at the pixel centres of an image with ``wcs``.

        Truth units: transparency 1, no sky pedestal.  ``stars`` / ``smooth`` select
        the components (useful to find star-free regions in tests).
        """
        ny, nx = int(shape[0]), int(shape[1])
        out = np.zeros((ny, nx, 3), np.float32)
        if smooth:
            pmap = _PixelMap(wcs, shape, self.truth_wcs)
            xs = np.arange(nx, dtype=float)
            for r0 in range(0, ny, self._row_chunk):
                r1 = min(ny, r0 + self._row_chunk)
                gx, gy = np.meshgrid(xs, np.arange(r0, r1, dtype=float))
                u, v = pmap(gx, gy)
                out[r0:r1] = np.moveaxis(self.eval_smooth(u, v), 0, -1)
        if stars:
            for c, img in enumerate(self._splat_stars(wcs, shape, None, (0, 1, 2))):
                out[..., c] += img.reshape(ny, nx).astype(np.float32)
        return out

    def render_truth(self) -> np.ndarray:
        """The truth image itself, float32 shape (3, H, W), on :attr:`truth_wcs`."""
        return np.ascontiguousarray(np.moveaxis(self.render_rgb(self.truth_wcs, self.truth_shape), -1, 0))

    def render_bayer(self, wcs: WCS, shape: Sequence[int], pattern: str = BAYER_PATTERN) -> np.ndarray:
        """Model value of each raw pixel's own colour channel (float64, shape (H, W)).

        Only one channel is evaluated per pixel (the four Bayer sub-lattices are
        handled separately), which is 3x cheaper than a full RGB render.
        """
        ny, nx = int(shape[0]), int(shape[1])
        cell = _bayer_cell(pattern)
        out = np.zeros((ny, nx))
        pmap = _PixelMap(wcs, shape, self.truth_wcs)
        for dy in (0, 1):
            for dx in (0, 1):
                c = int(cell[dy, dx])
                xs = np.arange(dx, nx, 2, dtype=float)
                ys = np.arange(dy, ny, 2, dtype=float)
                if xs.size == 0 or ys.size == 0:
                    continue
                for r0 in range(0, ys.size, self._row_chunk):
                    yy = ys[r0:r0 + self._row_chunk]
                    gx, gy = np.meshgrid(xs, yy)
                    u, v = pmap(gx, gy)
                    out[dy + 2 * r0:dy + 2 * (r0 + yy.size):2, dx::2] = self.eval_smooth(u, v, (c,))[0]
        chan = bayer_channel_map(shape, pattern)
        out += self._splat_stars(wcs, shape, chan, (0, 1, 2))[0].reshape(ny, nx)
        return out


def build_sky_model(
    truth_wcs: WCS,
    truth_shape: Sequence[int],
    seed: int = 0,
    *,
    pixel_scale_arcsec: float = PIXEL_SCALE_ARCSEC,
    fwhm_px: float = DEFAULT_FWHM_PX,
    star_density: float = DEFAULT_STAR_DENSITY,
    mag_range: Sequence[float] = DEFAULT_MAG_RANGE,
    mag_ref: float = DEFAULT_MAG_REF,
    peak_at_mag_ref: float = DEFAULT_PEAK_AT_MAG_REF,
    nebula: bool = True,
) -> SkyModel:
    """Draw a random (but seed-deterministic) sky on the given truth grid.

    Star count = ``star_density`` x truth area (deg^2); magnitudes follow
    ``dN/dm ~ 10**(0.3 m)`` between ``mag_range``; peak G ADU =
    ``peak_at_mag_ref * 10**(-0.4 (m - mag_ref))``.  Nebula sizes and positions are
    relative to the truth grid, so "small" and "full" datasets look alike.
    """
    ht, wt = int(truth_shape[0]), int(truth_shape[1])
    rng = np.random.default_rng([seed, _STREAM_STARS])
    area_deg2 = ht * wt * (pixel_scale_arcsec / 3600.0) ** 2
    n = int(rng.poisson(star_density * area_deg2))
    u = rng.uniform(-0.5, wt - 0.5, n)
    v = rng.uniform(-0.5, ht - 0.5, n)
    m1, m2 = float(mag_range[0]), float(mag_range[1])
    alpha = 0.3
    span = 10.0 ** (alpha * (m2 - m1)) - 1.0
    mag = m1 + np.log10(1.0 + rng.uniform(0.0, 1.0, n) * span) / alpha
    # Colour index: ~15 % hot blue stars, the rest yellow/orange (B-V ~ 0.9 +- 0.3).
    blue = rng.uniform(0.0, 1.0, n) < 0.15
    bv = np.where(blue, rng.normal(0.0, 0.12, n), rng.normal(0.9, 0.3, n))
    bv = np.clip(bv, -0.3, 2.0)
    peak_g = peak_at_mag_ref * 10.0 ** (-0.4 * (mag - mag_ref))
    amp = _bv_to_rgb(bv) * peak_g[:, None]
    ra, dec = truth_wcs.wcs_pix2world(u, v, 0)

    nrng = np.random.default_rng([seed, _STREAM_NEBULA])
    hu, hv = 0.5 * (wt - 1), 0.5 * (ht - 1)
    lsc = 0.5 * min(wt, ht)  # nebula length scale

    def _pos(fr: float) -> tuple[float, float]:
        return hu + nrng.uniform(-fr, fr) * hu, hv + nrng.uniform(-fr, fr) * hv

    em_blobs, rf_blobs, arcs, waves = [], [], [], []
    wave_amp = 0.0
    if nebula:
        # Bright compact core (dynamic range, like M42's trapezium region).
        cu, cv = _pos(0.15)
        em_blobs.append([cu, cv, 0.06 * lsc, 0.045 * lsc, nrng.uniform(0, np.pi), 1800.0])
        # Broad diffuse emission blobs and a few elongated filaments.
        for _ in range(5):
            bu, bv_ = _pos(0.6)
            sa = nrng.uniform(0.15, 0.35) * lsc
            em_blobs.append([bu, bv_, sa, sa * nrng.uniform(0.5, 1.0), nrng.uniform(0, np.pi),
                             nrng.uniform(120.0, 400.0)])
        for _ in range(3):
            bu, bv_ = _pos(0.6)
            sa = nrng.uniform(0.25, 0.45) * lsc
            em_blobs.append([bu, bv_, sa, sa / nrng.uniform(5.0, 8.0), nrng.uniform(0, np.pi),
                             nrng.uniform(150.0, 350.0)])
        # A Barnard's-loop-like arc.
        au, av = _pos(0.3)
        arcs.append([au, av, nrng.uniform(0.7, 1.0) * lsc, nrng.uniform(0.05, 0.08) * lsc,
                     nrng.uniform(100.0, 200.0), nrng.uniform(-np.pi, np.pi), nrng.uniform(0.6, 1.0)])
        # Bluish reflection nebulae.
        for _ in range(3):
            bu, bv_ = _pos(0.6)
            sa = nrng.uniform(0.08, 0.2) * lsc
            rf_blobs.append([bu, bv_, sa, sa * nrng.uniform(0.5, 1.0), nrng.uniform(0, np.pi),
                             nrng.uniform(100.0, 300.0)])
        # Low-frequency texture on the emission (wavelengths 0.2-0.6 of the scale).
        for _ in range(4):
            k = 2.0 * np.pi / (nrng.uniform(0.2, 0.6) * lsc)
            th = nrng.uniform(0, 2 * np.pi)
            waves.append([k * math.cos(th), k * math.sin(th), nrng.uniform(0, 2 * np.pi)])
        wave_amp = 0.35
    # Sky-fixed background gradient, strictly positive: |gx| + |gy| < g0.
    g0 = nrng.uniform(25.0, 45.0, 3)
    gx = nrng.uniform(-12.0, 12.0, 3)
    gy = nrng.uniform(-12.0, 12.0, 3)

    model = SkyModel(
        truth_wcs=truth_wcs,
        truth_shape=(ht, wt),
        fwhm_px=float(fwhm_px),
        star_ra=np.asarray(ra, float),
        star_dec=np.asarray(dec, float),
        star_mag=mag,
        star_bv=bv,
        star_amp=amp,
        gradient={"g0": g0.tolist(), "gx": gx.tolist(), "gy": gy.tolist()},
        emission_rgb=np.array([1.0, 0.25, 0.35]),  # H-alpha + some H-beta/[OIII]: red-pink
        reflection_rgb=np.array([0.45, 0.65, 1.0]),  # scattered starlight: blue
        emission_blobs=np.asarray(em_blobs, float).reshape(-1, 6),
        reflection_blobs=np.asarray(rf_blobs, float).reshape(-1, 6),
        arcs=np.asarray(arcs, float).reshape(-1, 7),
        waves=np.asarray(waves, float).reshape(-1, 3),
        wave_amp=wave_amp,
    )
    logger.debug("sky model: %d stars, %d emission blobs, %d reflection blobs", n, len(em_blobs), len(rf_blobs))
    return model


# --------------------------------------------------------------------------------------
# Frame synthesis
# --------------------------------------------------------------------------------------


def expected_bayer_frame(
    model: SkyModel,
    wcs: WCS,
    shape: Sequence[int],
    *,
    transparency: float = 1.0,
    sky_pedestal_rgb: Sequence[float] = DEFAULT_SKY_PEDESTAL_RGB,
    pattern: str = BAYER_PATTERN,
) -> np.ndarray:
    """Noiseless, defect-free raw frame (float64, (H, W)): ``t*model + pedestal`` per site."""
    raw = model.render_bayer(wcs, shape, pattern)
    raw *= float(transparency)
    raw += np.asarray(sky_pedestal_rgb, float)[bayer_channel_map(shape, pattern)]
    return raw


def _satellite_image(shape: Sequence[int], trail: dict[str, float]) -> np.ndarray:
    """Gaussian-profile straight line from (x0, y0) to (x1, y1) across the frame."""
    ny, nx = int(shape[0]), int(shape[1])
    x0, y0, x1, y1 = trail["x0"], trail["y0"], trail["x1"], trail["y1"]
    length = math.hypot(x1 - x0, y1 - y0)
    nxv, nyv = -(y1 - y0) / length, (x1 - x0) / length  # unit normal
    sig = trail["width_px"] / 2.3548
    yy, xx = np.mgrid[0:ny, 0:nx]
    d = (xx - x0) * nxv + (yy - y0) * nyv
    return trail["peak_adu"] * np.exp(-0.5 * (d / sig) ** 2)


def make_bayer_frame(
    model: SkyModel,
    wcs: WCS,
    shape: Sequence[int],
    *,
    transparency: float = 1.0,
    sky_pedestal_rgb: Sequence[float] = DEFAULT_SKY_PEDESTAL_RGB,
    pattern: str = BAYER_PATTERN,
    noise: bool = True,
    gain: float = DEFAULT_GAIN,
    read_noise: float = DEFAULT_READ_NOISE,
    rng: np.random.Generator | None = None,
    hot_pixels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    satellite: dict[str, float] | None = None,
) -> np.ndarray:
    """Render one raw ``uint16`` Bayer frame.

    ``hot_pixels`` is ``(ys, xs, adu)``: dark-current excess added at those sensor
    positions.  ``satellite`` is a dict with ``x0, y0, x1, y1, width_px, peak_adu``
    (sensor pixels), added in the sensor plane (not dimmed by transparency).
    With ``noise=True`` the signal gets Poisson noise (``gain`` e-/ADU) plus Gaussian
    read noise (``read_noise`` ADU rms); the result is rounded and clipped to 0..65535.
    """
    raw = expected_bayer_frame(model, wcs, shape, transparency=transparency,
                               sky_pedestal_rgb=sky_pedestal_rgb, pattern=pattern)
    if satellite is not None:
        raw += _satellite_image(shape, satellite)
    if hot_pixels is not None:
        ys, xs, adu = hot_pixels
        np.add.at(raw, (np.asarray(ys, int), np.asarray(xs, int)), np.asarray(adu, float))
    if noise:
        if rng is None:
            rng = np.random.default_rng()
        # Photon (and dark) noise is Poisson in electrons, not in ADU.
        electrons = rng.poisson(np.clip(raw, 0.0, None) * gain)
        raw = electrons / gain
        raw += rng.standard_normal(raw.shape) * read_noise
    return np.clip(np.rint(raw), 0, 65535).astype(np.uint16)


# --------------------------------------------------------------------------------------
# Dataset generation
# --------------------------------------------------------------------------------------


@dataclass
class _FramePlan:
    """Everything decided about one frame before rendering it."""

    index: int
    panel: int
    ix: int
    iy: int
    wcs: WCS
    transparency: float
    pedestal: np.ndarray
    rotation_deg: float
    dither_px: tuple[float, float]
    date_obs: str
    name: str
    satellite: dict[str, float] | None = None

    def to_meta(self) -> dict[str, Any]:
        """Per-frame entry of truth.json."""
        return {
            "file": self.name,
            "index": self.index,
            "panel": self.panel,
            "panel_ix": self.ix,
            "panel_iy": self.iy,
            "date_obs": self.date_obs,
            "transparency": self.transparency,
            "sky_pedestal_rgb": [float(x) for x in self.pedestal],
            "rotation_deg": self.rotation_deg,
            "dither_px": [float(self.dither_px[0]), float(self.dither_px[1])],
            "center_ra": float(self.wcs.wcs.crval[0]),
            "center_dec": float(self.wcs.wcs.crval[1]),
            "has_satellite": self.satellite is not None,
            "satellite": None if self.satellite is None else {k: float(v) for k, v in self.satellite.items()},
        }


def _frame_header(pl: _FramePlan, opt: dict[str, Any]) -> fits.Header:
    """Seestar-like FITS header of one raw frame, with the plate-solved CD-matrix WCS."""
    hdr = fits.Header()
    hdr["OBJECT"] = str(opt["object_name"])
    hdr["INSTRUME"] = "Seestar S50"
    hdr["TELESCOP"] = "Seestar S50"
    hdr["DATE-OBS"] = (pl.date_obs, "UTC start of exposure")
    # MJD-OBS consistent with DATE-OBS stops wcslib's 'datfix' warning on every read.
    hdr["MJD-OBS"] = (_mjd(pl.date_obs), "[d] MJD of DATE-OBS")
    hdr["EXPTIME"] = (float(opt["exptime"]), "[s] exposure time")
    hdr["BAYERPAT"] = (BAYER_PATTERN, "Bayer colour filter pattern")
    hdr["XBAYROFF"] = 0
    hdr["YBAYROFF"] = 0
    hdr["XBINNING"] = 1
    hdr["YBINNING"] = 1
    hdr["XPIXSZ"] = (2.9, "[um] pixel size")
    hdr["YPIXSZ"] = (2.9, "[um] pixel size")
    hdr["FOCALLEN"] = (250.0, "[mm] focal length")
    hdr["GAIN"] = (80, "sensor gain setting (Seestar units)")
    hdr["EGAIN"] = (float(opt["gain"]), "[e-/ADU] electrons per ADU")
    hdr["FILTER"] = "IRCUT"
    hdr["CCD-TEMP"] = 20.0
    hdr["RA"] = (float(pl.wcs.wcs.crval[0]), "[deg] pointing RA")
    hdr["DEC"] = (float(pl.wcs.wcs.crval[1]), "[deg] pointing Dec")
    wcs_to_header(pl.wcs, hdr)
    hdr["HISTORY"] = "Synthetic frame written by zemosaic_synth"
    return hdr


def _truth_header(truth_wcs: WCS, opt: dict[str, Any], seed: int) -> fits.Header:
    """Header of truth.fits: the 2-D celestial TAN/CD WCS plus a plain colour-plane axis."""
    thdr = fits.Header()
    wcs_to_header(truth_wcs, thdr)
    # A plain pixel axis for the colour planes keeps WCS(header) valid in 3-D;
    # use WCS(header).celestial (or naxis=2) for the sky part.
    thdr["CTYPE3"] = ""
    thdr["CRPIX3"] = 1.0
    thdr["CRVAL3"] = 1.0
    thdr["CD3_3"] = 1.0
    thdr["PLANE1"] = "R"
    thdr["PLANE2"] = "G"
    thdr["PLANE3"] = "B"
    thdr["BUNIT"] = ("adu", "frame ADU at transparency 1, no pedestal")
    thdr["OBJECT"] = str(opt["object_name"])
    thdr["FWHM_PX"] = (float(opt["fwhm_px"]), "[px] Gaussian PSF FWHM")
    thdr["SEED"] = int(seed)
    return thdr


def _mjd(iso: str) -> float:
    delta = _dt.datetime.fromisoformat(iso) - _dt.datetime(1858, 11, 17)
    return round(delta.days + delta.seconds / 86400.0 + delta.microseconds / 86400e6, 8)


def _parse_size(size: str) -> tuple[int, int]:
    try:
        return FRAME_SHAPES[size]
    except KeyError:
        raise ValueError(f"size must be one of {sorted(FRAME_SHAPES)}, got {size!r}") from None


def _plan_satellite(rng: np.random.Generator, shape: Sequence[int]) -> dict[str, float]:
    """A straight trail through a point near the centre, clipped to the frame edges."""
    ny, nx = int(shape[0]), int(shape[1])
    px = nx / 2 + rng.uniform(-0.25, 0.25) * nx
    py = ny / 2 + rng.uniform(-0.25, 0.25) * ny
    # Keep it away from the axes so it is not mistaken for a row/column defect.
    phi = rng.uniform(0.15, np.pi / 2 - 0.15) + rng.integers(0, 2) * np.pi / 2
    dx, dy = math.cos(phi), math.sin(phi)
    ts = []
    for t in ((-0.5 - px) / dx, (nx - 0.5 - px) / dx, (-0.5 - py) / dy, (ny - 0.5 - py) / dy):
        x, y = px + t * dx, py + t * dy
        if -0.5 - 1e-9 <= x <= nx - 0.5 + 1e-9 and -0.5 - 1e-9 <= y <= ny - 0.5 + 1e-9:
            ts.append(t)
    t0, t1 = min(ts), max(ts)
    return {
        "x0": px + t0 * dx, "y0": py + t0 * dy, "x1": px + t1 * dx, "y1": py + t1 * dy,
        "width_px": float(rng.uniform(2.5, 4.0)), "peak_adu": float(rng.uniform(3000.0, 8000.0)),
    }


def generate_dataset(
    outdir: str | os.PathLike[str],
    panels: Sequence[int] = (2, 2),
    frames_per_panel: int = 4,
    seed: int = 0,
    size: str = "small",
    **options: Any,
) -> dict[str, Any]:
    """Write a synthetic Seestar mosaic dataset and its truth.

    Parameters
    ----------
    outdir
        Output folder; creates ``outdir/frames/`` (the input FITS frames,
        ``Light_panel{PP}_{NNN}.fits``, names sort in time order) and, next to it,
        ``outdir/truth/`` with ``truth.fits`` (primary HDU: float32 (3, H, W) RGB on a
        North-up TAN/CD grid; extension ``STARS``: the star catalogue) and
        ``truth.json`` (per-frame metadata, hot pixels, gain, layout, model params).
    panels : (nx, ny)
        Mosaic layout; panel ``P = iy*nx + ix`` is observed in that order.
    frames_per_panel : int
        Sub-exposures per panel (frames are ``exptime`` seconds apart, back to back).
    seed : int
        Everything is derived from it; same seed -> identical bytes.
    size : "small" | "full"
        ``"full"`` = 1080 x 1920 px frames, ``"small"`` = 270 x 480 px at the same
        pixel scale (smaller footprint; dithers and hot pixel count scale with it).
    **options
        Keyword overrides, defaults in brackets: ``pixel_scale_arcsec`` [2.39],
        ``ra_center`` [83.8], ``dec_center`` [-5.4], ``overlap`` [0.2],
        ``base_rotation_deg`` [0], ``rotation_drift_deg`` [6] (linear over the run),
        ``rotation_jitter_deg`` [0.05], ``dither_px`` [40 full / 10 small, max radius],
        ``transparency_range`` [(0.9, 1.0)], ``sky_pedestal_rgb`` [(900, 1000, 800)],
        ``pedestal_jitter`` [0.06], ``gain`` [0.8 e-/ADU], ``read_noise`` [3 ADU],
        ``noise`` [True], ``hot_pixels`` [True | False | count], ``satellite``
        [True], ``satellite_frame`` [random], ``fwhm_px`` [2.7], ``star_density``
        [6000/deg^2], ``mag_range`` [(6, 16)], ``nebula`` [True], ``exptime`` [10],
        ``start_time`` ["2024-01-15T20:00:00"], ``object_name``.

    Returns
    -------
    dict with ``frames_dir``, ``truth_dir``, ``truth_fits``, ``truth_json``,
    ``n_frames``, ``frame_paths`` (list of str, time order), ``truth_shape``,
    ``frame_shape``, ``seconds``.
    """
    t_start = time.perf_counter()
    unknown = set(options) - set(_KNOWN_OPTIONS)
    if unknown:
        raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
    opt = dict(_KNOWN_OPTIONS)
    opt.update(options)

    nxp, nyp = (int(panels[0]), int(panels[1]))
    if nxp < 1 or nyp < 1:
        raise ValueError(f"panels must be >= 1x1, got {panels!r}")
    if int(frames_per_panel) < 1:
        raise ValueError("frames_per_panel must be >= 1")
    fpp = int(frames_per_panel)
    if not 0.0 <= float(opt["overlap"]) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {opt['overlap']!r}")
    shape = _parse_size(size)
    fh, fw = shape
    size_factor = fw / FRAME_SHAPES["full"][1]
    scale = float(opt["pixel_scale_arcsec"])
    dither = float(opt["dither_px"]) if opt["dither_px"] is not None else DEFAULT_DITHER_PX_FULL * size_factor
    n_frames = nxp * nyp * fpp

    out = Path(outdir)
    frames_dir = out / "frames"
    truth_dir = out / "truth"
    frames_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    # Stale frames from a previous, larger run would silently join the new dataset.
    stale = sorted(frames_dir.glob(f"{_FRAME_NAME_PREFIX}*.fits"))
    for old in stale:
        old.unlink()
    if stale:
        logger.info("removed %d frames of a previous run from %s", len(stale), frames_dir)

    # ---- layout: panel centres on a provisional North-up grid centred on the target
    ra0, dec0 = float(opt["ra_center"]), float(opt["dec_center"])
    prov = make_tan_wcs(ra0, dec0, 0.0, (1, 1), scale, crpix=(1.0, 1.0))  # pixel 0 = target
    step_x, step_y = (1.0 - opt["overlap"]) * fw, (1.0 - opt["overlap"]) * fh
    th0 = math.radians(float(opt["base_rotation_deg"]))
    rng = np.random.default_rng([seed, _STREAM_FRAMES])
    lo, hi = (float(x) for x in opt["transparency_range"])
    ped0 = np.asarray(opt["sky_pedestal_rgb"], float)
    jit = float(opt["pedestal_jitter"])
    t0 = _dt.datetime.fromisoformat(str(opt["start_time"]))
    width = max(3, len(str(n_frames - 1)))

    plans: list[_FramePlan] = []
    panel_uv: list[tuple[float, float]] = []  # undithered panel centres, provisional pixels
    for p in range(nxp * nyp):
        ix, iy = p % nxp, p // nxp
        ox = (ix - (nxp - 1) / 2.0) * step_x
        oy = (iy - (nyp - 1) / 2.0) * step_y
        # The layout is laid out along the frame axes at the base rotation angle.
        pu = ox * math.cos(th0) + oy * math.sin(th0)
        pv = -ox * math.sin(th0) + oy * math.cos(th0)
        panel_uv.append((pu, pv))
        for k in range(fpp):
            i = p * fpp + k
            # Dither: uniform in a disc of radius `dither` px.
            r = dither * math.sqrt(rng.uniform())
            a = rng.uniform(0.0, 2.0 * np.pi)
            ddx, ddy = r * math.cos(a), r * math.sin(a)
            # Alt-az field rotation: drifts steadily over the whole run, plus jitter.
            frac = i / (n_frames - 1) if n_frames > 1 else 0.0
            rot = (float(opt["base_rotation_deg"]) + float(opt["rotation_drift_deg"]) * frac
                   + rng.normal(0.0, float(opt["rotation_jitter_deg"])))
            ra, dec = prov.wcs_pix2world([[pu + ddx, pv + ddy]], 0)[0]
            transp = float(rng.uniform(lo, hi))
            common = rng.uniform(-jit, jit)
            ped = ped0 * (1.0 + common) * (1.0 + rng.uniform(-jit / 3.0, jit / 3.0, 3))
            date = (t0 + _dt.timedelta(seconds=float(opt["exptime"]) * i)).isoformat(timespec="milliseconds")
            plans.append(_FramePlan(
                index=i, panel=p, ix=ix, iy=iy, wcs=make_tan_wcs(ra, dec, rot, shape, scale),
                transparency=transp, pedestal=ped, rotation_deg=float(rot), dither_px=(ddx, ddy),
                date_obs=date, name=f"{_FRAME_NAME_PREFIX}{p:02d}_{i:0{width}d}.fits",
            ))

    # ---- truth grid: bounding box of all frame footprints + a margin, North up
    corners = np.array([[-0.5, -0.5], [fw - 0.5, -0.5], [fw - 0.5, fh - 0.5], [-0.5, fh - 0.5]])
    cu, cv = [], []
    for pl in plans:
        ra_c, dec_c = pl.wcs.wcs_pix2world(corners, 0).T
        u, v = prov.wcs_world2pix(ra_c, dec_c, 0)
        cu.extend(u)
        cv.extend(v)
    # The margin (> star stamp radius) guarantees that no star outside the truth grid
    # can contribute light to a frame pixel.
    margin = max(8, int(round(DEFAULT_TRUTH_MARGIN_PX_FULL * size_factor)))
    u0 = int(math.floor(min(cu))) - margin
    v0 = int(math.floor(min(cv))) - margin
    tw = int(math.ceil(max(cu))) + margin - u0 + 1
    th = int(math.ceil(max(cv))) + margin - v0 + 1
    truth_wcs = make_tan_wcs(ra0, dec0, 0.0, (th, tw), scale, crpix=(1.0 - u0, 1.0 - v0))

    model = build_sky_model(truth_wcs, (th, tw), seed, pixel_scale_arcsec=scale, fwhm_px=float(opt["fwhm_px"]),
                            star_density=float(opt["star_density"]), mag_range=opt["mag_range"],
                            nebula=bool(opt["nebula"]))

    # ---- sensor defects
    if opt["hot_pixels"] is True:
        n_hot = max(4, int(round(fh * fw * DEFAULT_HOT_PIXEL_DENSITY)))
    else:
        n_hot = int(opt["hot_pixels"] or 0)
    hrng = np.random.default_rng([seed, _STREAM_HOT])
    # Unique sensor positions, away from the very edge so neighbours exist for tests.
    flat = hrng.choice((fh - 4) * (fw - 4), size=n_hot, replace=False) if n_hot else np.zeros(0, int)
    hot_y = (flat // (fw - 4) + 2).astype(int)
    hot_x = (flat % (fw - 4) + 2).astype(int)
    hot_adu = hrng.uniform(3000.0, 30000.0, n_hot)
    hot = (hot_y, hot_x, hot_adu) if n_hot else None

    sat_index = None
    if opt["satellite"]:
        srng = np.random.default_rng([seed, _STREAM_SATELLITE])
        sat_index = int(opt["satellite_frame"]) if opt["satellite_frame"] is not None else int(
            srng.integers(0, n_frames))
        if not 0 <= sat_index < n_frames:
            raise ValueError(f"satellite_frame {sat_index} outside 0..{n_frames - 1}")
        plans[sat_index].satellite = _plan_satellite(srng, shape)

    # ---- frames
    frame_paths: list[str] = []
    for pl in plans:
        raw = make_bayer_frame(
            model, pl.wcs, shape, transparency=pl.transparency, sky_pedestal_rgb=pl.pedestal,
            noise=bool(opt["noise"]), gain=float(opt["gain"]), read_noise=float(opt["read_noise"]),
            rng=np.random.default_rng([seed, _STREAM_NOISE, pl.index]), hot_pixels=hot,
            satellite=pl.satellite,
        )
        path = frames_dir / pl.name
        # A uint16 array makes astropy write BITPIX=16 with BZERO=32768, like Seestar.
        fits.PrimaryHDU(data=raw, header=_frame_header(pl, opt)).writeto(path, overwrite=True)
        frame_paths.append(str(path))
        logger.debug("wrote %s", path)

    # ---- truth
    truth = model.render_truth()
    thdr = _truth_header(truth_wcs, opt, seed)
    truth_fits = truth_dir / "truth.fits"
    fits.HDUList([fits.PrimaryHDU(data=truth, header=thdr), model.star_table()]).writeto(truth_fits, overwrite=True)

    meta = {
        "generator": "zemosaic_synth",
        "seed": int(seed),
        "size": size,
        "frame_shape": [fh, fw],
        "pixel_scale_arcsec": scale,
        "bayer_pattern": BAYER_PATTERN,
        "exptime": float(opt["exptime"]),
        "gain_e_per_adu": float(opt["gain"]),
        "read_noise_adu": float(opt["read_noise"]),
        "noise": bool(opt["noise"]),
        "truth_units": "ADU of a debayered frame pixel per channel at transparency 1, excluding the sky pedestal; "
                       "frame_rgb ~= transparency * truth_rgb + sky_pedestal_rgb",
        "truth_shape": [th, tw],
        "truth_fits": "truth.fits",
        "layout": {
            "panels": [nxp, nyp],
            "frames_per_panel": fpp,
            "overlap": float(opt["overlap"]),
            "ra_center": ra0,
            "dec_center": dec0,
            "base_rotation_deg": float(opt["base_rotation_deg"]),
            "rotation_drift_deg": float(opt["rotation_drift_deg"]),
            "dither_px": dither,
            "panel_order": "P = iy * nx + ix, observed in increasing P",
            "panel_centers": [
                {"panel": p, "ix": p % nxp, "iy": p // nxp, "ra": float(rd[0]), "dec": float(rd[1])}
                for p, rd in enumerate(prov.wcs_pix2world(np.asarray(panel_uv, float).reshape(-1, 2), 0))
            ],
        },
        "frames": [pl.to_meta() for pl in plans],
        "satellite_frame": sat_index,
        "hot_pixels": [[int(y), int(x)] for y, x in zip(hot_y, hot_x)],
        "hot_pixel_adu": [float(a) for a in hot_adu],
        "n_stars": model.n_stars,
        "sky_model": model.params_dict(),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.items()},
    }
    truth_json = truth_dir / "truth.json"
    truth_json.write_text(json.dumps(meta, indent=1))

    dt = time.perf_counter() - t_start
    logger.info("wrote %d frames to %s and truth %s in %.1f s", n_frames, frames_dir, truth_fits, dt)
    return {
        "frames_dir": str(frames_dir),
        "truth_dir": str(truth_dir),
        "truth_fits": str(truth_fits),
        "truth_json": str(truth_json),
        "n_frames": n_frames,
        "frame_paths": frame_paths,
        "frame_shape": (fh, fw),
        "truth_shape": (th, tw),
        "seconds": dt,
    }


# --------------------------------------------------------------------------------------
# Loading helpers (used by tests)
# --------------------------------------------------------------------------------------


def _truth_paths(outdir: str | os.PathLike[str]) -> tuple[Path, Path]:
    d = Path(outdir) / "truth"
    return d / "truth.fits", d / "truth.json"


def load_truth(outdir: str | os.PathLike[str]) -> tuple[np.ndarray, WCS, dict[str, Any]]:
    """Return ``(truth_rgb float32 (H, W, 3), celestial WCS, metadata dict)``."""
    tf, tj = _truth_paths(outdir)
    with fits.open(tf) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float32)
        wcs = WCS(hdul[0].header, naxis=2)
    meta = json.loads(tj.read_text())
    return np.ascontiguousarray(np.moveaxis(data, 0, -1)), wcs, meta


def load_sky_model(outdir: str | os.PathLike[str]) -> SkyModel:
    """Rebuild the analytic :class:`SkyModel` of a generated dataset."""
    tf, tj = _truth_paths(outdir)
    meta = json.loads(tj.read_text())
    with fits.open(tf) as hdul:
        wcs = WCS(hdul[0].header, naxis=2)
        stars = {k: np.array(hdul["STARS"].data[k]) for k in ("RA", "DEC", "MAG", "BV", "PEAK_R", "PEAK_G", "PEAK_B")}
    return SkyModel.from_parts(wcs, meta["sky_model"], stars)


def _frame_entry(meta: dict[str, Any], frame: int | str) -> dict[str, Any]:
    if isinstance(frame, (int, np.integer)):
        return meta["frames"][int(frame)]
    name = Path(str(frame)).name
    for f in meta["frames"]:
        if f["file"] == name:
            return f
    raise KeyError(f"frame {frame!r} not in truth.json")


def expected_frame_rgb(outdir: str | os.PathLike[str], frame: int | str, model: SkyModel | None = None,
                       *, include_pedestal: bool = True) -> np.ndarray:
    """Expected noiseless debayered RGB (float32, (H, W, 3)) of one frame.

    ``transparency * model + sky_pedestal`` at every pixel centre (no hot pixels,
    no satellite).  ``frame`` is an index or a file name; pass ``model`` (from
    :func:`load_sky_model`) to avoid reloading it for many frames.
    """
    meta = json.loads(_truth_paths(outdir)[1].read_text())
    entry = _frame_entry(meta, frame)
    if model is None:
        model = load_sky_model(outdir)
    hdr = fits.getheader(Path(outdir) / "frames" / entry["file"])
    wcs = WCS(hdr)
    shape = (int(hdr["NAXIS2"]), int(hdr["NAXIS1"]))
    rgb = model.render_rgb(wcs, shape)
    rgb *= np.float32(entry["transparency"])
    if include_pedestal:
        rgb += np.asarray(entry["sky_pedestal_rgb"], np.float32)
    return rgb


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _panels_arg(text: str) -> tuple[int, int]:
    parts = text.lower().replace("*", "x").split("x")
    try:
        if len(parts) != 2:
            raise ValueError
        nx, ny = int(parts[0]), int(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NXxNY such as 2x2, got {text!r}") from None
    if nx < 1 or ny < 1:
        raise argparse.ArgumentTypeError(f"panel counts must be >= 1, got {text!r}")
    return nx, ny


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return n


def main(argv: Iterable[str] | None = None) -> int:
    """Command line entry point; returns the process exit code."""
    ap = argparse.ArgumentParser(
        prog="zemosaic_synth",
        description="Write a deterministic synthetic Seestar S50 mosaic dataset (frames + truth).",
    )
    ap.add_argument("outdir", help="output folder (frames/ and truth/ are created inside)")
    ap.add_argument("--panels", type=_panels_arg, default=(2, 2), metavar="NXxNY", help="panel layout (default 2x2)")
    ap.add_argument("--frames-per-panel", type=_positive_int, default=4, metavar="N", help="frames per panel (4)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (0)")
    ap.add_argument("--size", choices=sorted(FRAME_SHAPES), default="small",
                    help="frame size: full = 1080x1920, small = 270x480 (small)")
    ap.add_argument("--no-noise", action="store_true", help="write noiseless frames")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    res = generate_dataset(args.outdir, panels=args.panels, frames_per_panel=args.frames_per_panel,
                           seed=args.seed, size=args.size, noise=not args.no_noise)
    plural = "" if res["n_frames"] == 1 else "s"
    print(f"wrote {res['n_frames']} frame{plural} ({args.panels[0]}x{args.panels[1]} panels x {args.frames_per_panel}, "
          f"{args.size}) to {res['frames_dir']}; truth: {res['truth_fits']} ({res['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
