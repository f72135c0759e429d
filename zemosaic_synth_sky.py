"""Analytic sky of the synthetic Seestar S50 data generator (:mod:`zemosaic_synth`).

This module holds what does not depend on how a night is observed: the analytic
RGB sky (:class:`SkyModel`, drawn by :func:`build_sky_model`), the star colour
helpers, the TAN WCS helpers and the pixel-to-pixel mapping between two WCS, and
the Bayer helpers the raw renderer needs.  :mod:`zemosaic_synth` plans the frames,
renders and writes them, and re-exports the public names defined here.

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

Determinism: stars and nebula are drawn from ``numpy.random.default_rng`` seeded
with ``[seed, _STREAM_STARS]`` and ``[seed, _STREAM_NEBULA]``.  All stream ids of
the generator (including the frame ones used by :mod:`zemosaic_synth`) are defined
here, in one table, so that they stay distinct.

Public API (see the individual docstrings)
------------------------------------------
``SkyModel``, ``build_sky_model``, ``make_tan_wcs``, ``wcs_to_header``,
``footprint_overlap``, ``bayer_channel_map`` and the constants below.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

logger = logging.getLogger(__name__)

__all__ = [
    "PIXEL_SCALE_ARCSEC",
    "BAYER_PATTERN",
    "CHANNEL_NAMES",
    "DEFAULT_FWHM_PX",
    "DEFAULT_STAR_DENSITY",
    "DEFAULT_MAG_RANGE",
    "DEFAULT_MAG_REF",
    "DEFAULT_PEAK_AT_MAG_REF",
    "make_tan_wcs",
    "wcs_to_header",
    "footprint_overlap",
    "bayer_channel_map",
    "SkyModel",
    "build_sky_model",
]

# --------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------

#: Seestar S50: 2.9 um pixels (IMX462) behind a 250 mm focal length -> ~2.39"/px.
PIXEL_SCALE_ARCSEC = 2.39
BAYER_PATTERN = "GRBG"
CHANNEL_NAMES = ("R", "G", "B")

DEFAULT_FWHM_PX = 2.7
DEFAULT_STAR_DENSITY = 6000.0  # stars per square degree down to DEFAULT_MAG_RANGE[1]
DEFAULT_MAG_RANGE = (6.0, 16.0)
#: Peak (G channel) ADU of a star of magnitude ``DEFAULT_MAG_REF``; with the range
#: above, stars brighter than mag ~6.7 exceed 65535 ADU and saturate.
DEFAULT_MAG_REF = 7.0
DEFAULT_PEAK_AT_MAG_REF = 50000.0

# Random stream identifiers: one independent generator per purpose (see the module
# docs here and in zemosaic_synth).  Kept together so that they stay distinct.
_STREAM_STARS = 1
_STREAM_NEBULA = 2
_STREAM_FRAMES = 3
_STREAM_HOT = 4
_STREAM_SATELLITE = 5
_STREAM_CATALOGUE = 6
_STREAM_POINTING = 7
_STREAM_NOISE = 100


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
    a grid of WCS round trips and check it; per-pixel WCS calls would dominate the
    generation time otherwise.
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
        handled separately): a third of the channel evaluations of a full RGB render.
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


#: Astrometry.net index files whose stars :func:`catalogue_stars` reads (Tycho-2, 22'-85' quads:
#: the scales that solve a Seestar field).
CATALOGUE_INDEX_SCALES = ("07", "08", "09", "10")


def _index_star_table(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(unit vectors (N, 3), MAG_VT (N,))`` of an astrometry.net index file.

    The star kd-tree stores each position as three native-endian uint32 scaled into the
    tree's bounding box (``kdtree_range_stars``: lower corner, upper corner, scale); the
    magnitudes are a tag-along column.
    """
    with fits.open(path, memmap=True) as hdul:
        names = {hdu.columns.names[0]: hdu for hdu in hdul[1:] if hasattr(hdu, "columns")}
        box = np.frombuffer(names["kdtree_range_stars"].data.tobytes(), dtype="<f8")
        packed = np.frombuffer(names["kdtree_data_stars"].data.tobytes(), dtype="<u4").reshape(-1, 3)
        mag = np.asarray(names["MAG_VT"].data["MAG_VT"], dtype=np.float64)
    return box[:3] + packed / box[6], mag


def catalogue_stars(ra_deg: float, dec_deg: float, radius_deg: float,
                    index_paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(ra, dec, mag)`` of the catalogue stars within ``radius_deg`` of a position.

    Read from astrometry.net index files (the Tycho-2 ones: positions and ``MAG_VT``), so
    frames rendered with these stars are solvable by a plate solver using the same files.
    A star held by several files is kept once.
    """
    centre = np.array([math.cos(math.radians(dec_deg)) * math.cos(math.radians(ra_deg)),
                       math.cos(math.radians(dec_deg)) * math.sin(math.radians(ra_deg)),
                       math.sin(math.radians(dec_deg))])
    cos_r = math.cos(math.radians(radius_deg))
    vectors, mags = [], []
    for path in index_paths:
        xyz, mag = _index_star_table(path)
        near = xyz @ centre >= cos_r
        vectors.append(xyz[near])
        mags.append(mag[near])
    xyz = np.concatenate(vectors) if vectors else np.zeros((0, 3))
    mag = np.concatenate(mags) if mags else np.zeros(0)
    # The files are cut from one catalogue: the same star has the same stored position.
    _, first = np.unique(np.round(xyz * 2e6).astype(np.int64), axis=0, return_index=True)
    xyz, mag = xyz[np.sort(first)], mag[np.sort(first)]
    ra = np.degrees(np.arctan2(xyz[:, 1], xyz[:, 0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(xyz[:, 2], -1.0, 1.0)))
    return ra, dec, mag


def _with_catalogue(ra, dec, mag, bv, catalogue, limit_mag, truth_wcs, shape, rng):
    """Return the random stars fainter than ``limit_mag`` plus the catalogue stars on the grid."""
    cat_ra, cat_dec, cat_mag = (np.asarray(a, float) for a in catalogue)
    cu, cv = truth_wcs.wcs_world2pix(cat_ra, cat_dec, 0)
    inside = (cu >= -0.5) & (cu < shape[1] - 0.5) & (cv >= -0.5) & (cv < shape[0] - 0.5)
    cat_ra, cat_dec, cat_mag = cat_ra[inside], cat_dec[inside], cat_mag[inside]
    cat_bv = np.clip(rng.normal(0.7, 0.35, cat_ra.size), -0.3, 2.0)
    faint = mag >= limit_mag
    return (np.concatenate([cat_ra, ra[faint]]), np.concatenate([cat_dec, dec[faint]]),
            np.concatenate([cat_mag, mag[faint]]), np.concatenate([cat_bv, bv[faint]]))


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
    catalogue: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    catalogue_limit_mag: float = 11.0,
) -> SkyModel:
    """Draw a random (but seed-deterministic) sky on the given truth grid.

    Star count = ``star_density`` x truth area (deg^2); magnitudes follow
    ``dN/dm ~ 10**(0.3 m)`` between ``mag_range``; peak G ADU =
    ``peak_at_mag_ref * 10**(-0.4 (m - mag_ref))``.  Nebula sizes and positions are
    relative to the truth grid, so "small" and "full" datasets look alike.
    ``catalogue`` (``ra, dec, mag`` of real stars, see :func:`catalogue_stars`)
    replaces the random stars brighter than ``catalogue_limit_mag``: the sky then has
    the real bright stars where they are, and a plate solver recognises it.
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
    ra, dec = truth_wcs.wcs_pix2world(u, v, 0)
    if catalogue is not None:
        ra, dec, mag, bv = _with_catalogue(ra, dec, mag, bv, catalogue, catalogue_limit_mag,
                                           truth_wcs, (ht, wt), np.random.default_rng([seed, _STREAM_CATALOGUE]))
    peak_g = peak_at_mag_ref * 10.0 ** (-0.4 * (mag - mag_ref))
    amp = _bv_to_rgb(bv) * peak_g[:, None]

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
