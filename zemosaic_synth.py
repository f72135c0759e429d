"""Deterministic synthetic Seestar S50 data for ZeMosaic demos, tests and benchmarks.

This module fabricates a small "observing night" with a Seestar S50 smart telescope:
a mosaic of ``nx x ny`` panels, each observed with a few 10 s sub-exposures, written
as raw GRBG Bayer ``uint16`` FITS frames with a plate-solved TAN WCS (CD matrix) -
i.e. exactly the kind of input ZeMosaic has to turn into an RGB mosaic.  Next to the
frames it writes the *truth*: the noiseless RGB sky on its own TAN grid plus JSON
metadata describing every frame (transparency, sky pedestal, rotation, dither, ...).

The analytic sky itself (stars, nebula, background gradient), the WCS helpers and
the Bayer helpers live in :mod:`zemosaic_synth_sky` (see its docstring for the sky
model); this module plans the frames, renders and writes them and the truth, and
re-exports the public names of :mod:`zemosaic_synth_sky`.

Units and the frame model
-------------------------
Truth values are ADU of one debayered frame pixel, per colour channel, for a frame
with transparency 1.0, *excluding* that frame's own additive sky pedestal::

    frame_rgb(pixel) ~= transparency * gain_rgb * truth_rgb(sky position of pixel) + sky_pedestal_rgb

``gain_rgb`` is 1 unless the ``panel_gain_rgb`` option gives a panel another signal gain. The
pedestal is flat unless ``panel_sky_gradient`` shapes it (a gradient and a light dome fixed to the
sensor, see ``sky_gradient_plane``); ``panel_sky_level`` scales it per panel.

Each raw Bayer pixel samples only its own colour channel of that expectation
(GRBG: row 0 = G R G R ..., row 1 = B G B G ...).  On top of it come sensor-fixed
hot pixels, a satellite trail in one frame (or in chosen frames), Poisson noise (gain in e-/ADU)
and Gaussian read noise, then rounding and clipping to 0..65535.

Determinism: every random choice is drawn from ``numpy.random.default_rng`` seeded
with ``[seed, <stream id>(, <frame index>)]``, so a given seed always produces the
same bytes, and independent streams (stars, nebula, layout, noise of frame *i*, ...)
do not perturb each other when an option changes.

Public API (see the individual docstrings)
------------------------------------------
``generate_dataset``, ``load_truth``, ``load_sky_model``, ``expected_frame_rgb``,
``expected_bayer_frame``, ``make_bayer_frame``, ``main`` (CLI:
``python -m zemosaic_synth OUTDIR ...``); re-exported from :mod:`zemosaic_synth_sky`:
``build_sky_model``, ``SkyModel``, ``make_tan_wcs``, ``wcs_to_header``,
``bayer_channel_map``, ``footprint_overlap``.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from zemosaic_synth_sky import (
    _STREAM_FRAMES,
    _STREAM_HOT,
    _STREAM_NOISE,
    _STREAM_POINTING,
    _STREAM_SATELLITE,
    CATALOGUE_INDEX_SCALES,
    catalogue_stars,
    BAYER_PATTERN,
    CHANNEL_NAMES,
    DEFAULT_FWHM_PX,
    DEFAULT_MAG_RANGE,
    DEFAULT_MAG_REF,
    DEFAULT_PEAK_AT_MAG_REF,
    DEFAULT_STAR_DENSITY,
    PIXEL_SCALE_ARCSEC,
    SkyModel,
    bayer_channel_map,
    build_sky_model,
    footprint_overlap,
    make_tan_wcs,
    wcs_to_header,
)

logger = logging.getLogger(__name__)

__all__ = [
    # defined here
    "FRAME_SHAPES",
    "DEFAULT_RA_CENTER",
    "DEFAULT_DEC_CENTER",
    "DEFAULT_OVERLAP",
    "DEFAULT_SKY_PEDESTAL_RGB",
    "DEFAULT_PEDESTAL_JITTER",
    "DEFAULT_TRANSPARENCY_RANGE",
    "DEFAULT_GAIN",
    "DEFAULT_READ_NOISE",
    "DEFAULT_EXPTIME",
    "DEFAULT_START_TIME",
    "DEFAULT_ROTATION_DRIFT_DEG",
    "DEFAULT_ROTATION_JITTER_DEG",
    "DEFAULT_DITHER_PX_FULL",
    "DEFAULT_HOT_PIXEL_DENSITY",
    "DEFAULT_TRUTH_MARGIN_PX_FULL",
    "expected_bayer_frame",
    "make_bayer_frame",
    "generate_dataset",
    "load_truth",
    "load_sky_model",
    "expected_frame_rgb",
    "sky_gradient_plane",
    "SATELLITE_FRAME_MODES",
    "main",
    # re-exported from zemosaic_synth_sky
    "PIXEL_SCALE_ARCSEC",
    "BAYER_PATTERN",
    "CHANNEL_NAMES",
    "DEFAULT_FWHM_PX",
    "DEFAULT_STAR_DENSITY",
    "DEFAULT_MAG_RANGE",
    "DEFAULT_MAG_REF",
    "DEFAULT_PEAK_AT_MAG_REF",
    "SkyModel",
    "build_sky_model",
    "make_tan_wcs",
    "wcs_to_header",
    "footprint_overlap",
    "bayer_channel_map",
]

# --------------------------------------------------------------------------------------
# Defaults (the sky ones, pixel scale and Bayer pattern are in zemosaic_synth_sky)
# --------------------------------------------------------------------------------------

#: numpy shapes (rows, cols) of a frame: the Seestar sensor is used in portrait mode.
FRAME_SHAPES = {"full": (1920, 1080), "small": (480, 270)}

DEFAULT_RA_CENTER = 83.8  # deg, Orion-ish
DEFAULT_DEC_CENTER = -5.4  # deg
DEFAULT_OVERLAP = 0.20  # fraction of the frame size shared by neighbouring panels
DEFAULT_SKY_PEDESTAL_RGB = (900.0, 1000.0, 800.0)  # ADU, nominal per-channel sky level
DEFAULT_PEDESTAL_JITTER = 0.06  # +-6 % common, +-2 % per channel, per frame
DEFAULT_TRANSPARENCY_RANGE = (0.90, 1.00)
DEFAULT_GAIN = 0.8  # e-/ADU
DEFAULT_READ_NOISE = 3.0  # ADU rms
DEFAULT_EXPTIME = 10.0  # s
DEFAULT_START_TIME = "2024-01-15T20:00:00"
DEFAULT_ROTATION_DRIFT_DEG = 6.0  # field rotation accumulated over the whole run
DEFAULT_ROTATION_JITTER_DEG = 0.05
DEFAULT_DITHER_PX_FULL = 40.0  # scaled by the frame size for size="small"
DEFAULT_HOT_PIXEL_DENSITY = 1.0 / 15000.0  # hot pixels per sensor pixel
DEFAULT_TRUTH_MARGIN_PX_FULL = 32

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
    "panel_gain_rgb": None,  # None -> 1 everywhere; else one number or (r, g, b) per panel
    "gain": DEFAULT_GAIN,
    "read_noise": DEFAULT_READ_NOISE,
    "noise": True,
    "hot_pixels": True,  # True -> density default, False/0 -> none, int -> that many
    "satellite": True,
    "satellite_frame": None,  # None -> random frame index; int, list of ints, "central", "first_noncentral"
    "fwhm_px": DEFAULT_FWHM_PX,
    "star_density": DEFAULT_STAR_DENSITY,
    "mag_range": DEFAULT_MAG_RANGE,
    "nebula": True,
    "exptime": DEFAULT_EXPTIME,
    "start_time": DEFAULT_START_TIME,
    "object_name": "Synthetic Orion",
    "star_catalog": None,  # None -> random stars; "tycho2" or index file paths -> real bright stars
    "write_wcs": True,
    "pointing_error_deg": 0.0,
}

# Optional options: recorded in truth.json only when set, so that leaving them unset changes no
# byte of a dataset.
_OPTIONAL_OPTIONS = {
    "satellite_panels": None,  # panels whose frame gets a trail for satellite_frame "central"/...
    "panel_sky_gradient": None,  # None -> flat sky pedestal; else per panel (gx, gy[, dome]) or two of them
    "panel_sky_level": None,  # None -> 1; else one factor per panel on its frames' sky pedestal
}
_KNOWN_OPTIONS.update(_OPTIONAL_OPTIONS)

#: ``satellite_frame`` values that pick a frame per panel from the planned frame centres.
SATELLITE_FRAME_MODES = ("central", "first_noncentral")


# --------------------------------------------------------------------------------------
# Frame synthesis
# --------------------------------------------------------------------------------------


def expected_bayer_frame(
    model: SkyModel,
    wcs: WCS,
    shape: Sequence[int],
    *,
    transparency: float | Sequence[float] = 1.0,
    sky_pedestal_rgb: Sequence[float] = DEFAULT_SKY_PEDESTAL_RGB,
    pattern: str = BAYER_PATTERN,
    sky_gradient: Sequence[float] | None = None,
) -> np.ndarray:
    """Noiseless, defect-free raw frame (float64, (H, W)): ``t*model + pedestal`` per site.

    ``transparency`` is one number or one per channel (R, G, B): a coloured transparency
    models a night whose extinction or colour response differs. ``sky_gradient`` ``(gx, gy)`` or
    ``(gx, gy, dome)`` shapes the pedestal across the sensor (:func:`sky_gradient_plane`).
    """
    raw = model.render_bayer(wcs, shape, pattern)
    if np.ndim(transparency) == 0:
        raw *= float(transparency)
    else:
        raw *= np.asarray(transparency, float)[bayer_channel_map(shape, pattern)]
    pedestal = np.asarray(sky_pedestal_rgb, float)[bayer_channel_map(shape, pattern)]
    if sky_gradient is not None:
        pedestal *= sky_gradient_plane(shape, sky_gradient)
    raw += pedestal
    return raw


def sky_gradient_plane(shape: Sequence[int], gradient: Sequence[float]) -> np.ndarray:
    """Return the ``(H, W)`` factor ``1 + gx*x + gy*y + dome*2*(x**2 + y**2)`` of a frame's sky.

    ``x = col / (W-1) - 1/2`` and ``y = row / (H-1) - 1/2`` run from -1/2 to 1/2 across the
    sensor. ``gradient`` is ``(gx, gy)`` or ``(gx, gy, dome)``: light pollution or moonlight
    brightening the sky by the fraction ``gx`` from the left to the right edge and ``gy`` from the
    first to the last row, and a light dome ``dome`` (0 at the centre, ``dome`` at the corners).
    It multiplies the frame's sky pedestal and is fixed to the sensor, as the horizon is for an
    alt-az mount.
    """
    ny, nx = int(shape[0]), int(shape[1])
    gx, gy, dome = _gradient_terms(gradient)
    x = np.linspace(-0.5, 0.5, nx) if nx > 1 else np.zeros(1)
    y = np.linspace(-0.5, 0.5, ny) if ny > 1 else np.zeros(1)
    plane = 1.0 + gx * x[None, :] + gy * y[:, None]
    if dome:
        plane += dome * 2.0 * (x[None, :] ** 2 + y[:, None] ** 2)
    return plane


def _gradient_terms(gradient: Sequence[float]) -> tuple[float, float, float]:
    """Return ``(gx, gy, dome)`` of a 2- or 3-value sky gradient (dome 0 when absent)."""
    terms = [float(g) for g in gradient]
    if len(terms) not in (2, 3):
        raise ValueError(f"a sky gradient is (gx, gy) or (gx, gy, dome), got {gradient!r}")
    return terms[0], terms[1], terms[2] if len(terms) == 3 else 0.0


def _gradient_min(gradient: Sequence[float]) -> float:
    """Smallest value of :func:`sky_gradient_plane` over the sensor, exactly.

    The factor is ``1 + f(x; gx) + f(y; gy)`` with ``f(t; g) = g*t + 2*dome*t**2``, so its minimum
    is 1 plus the minimum of each 1-D quadratic on [-1/2, 1/2] (an end or the clipped vertex).
    """
    gx, gy, dome = _gradient_terms(gradient)
    total = 1.0
    for g in (gx, gy):
        ts = [-0.5, 0.5] + ([float(np.clip(-g / (4.0 * dome), -0.5, 0.5))] if dome > 0 else [])
        total += min(g * t + 2.0 * dome * t * t for t in ts)
    return total


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
    transparency: float | Sequence[float] = 1.0,
    sky_pedestal_rgb: Sequence[float] = DEFAULT_SKY_PEDESTAL_RGB,
    pattern: str = BAYER_PATTERN,
    noise: bool = True,
    gain: float = DEFAULT_GAIN,
    read_noise: float = DEFAULT_READ_NOISE,
    rng: np.random.Generator | None = None,
    hot_pixels: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    satellite: dict[str, float] | None = None,
    sky_gradient: Sequence[float] | None = None,
) -> np.ndarray:
    """Render one raw ``uint16`` Bayer frame.

    ``hot_pixels`` is ``(ys, xs, adu)``: dark-current excess added at those sensor
    positions.  ``satellite`` is a dict with ``x0, y0, x1, y1, width_px, peak_adu``
    (sensor pixels), added in the sensor plane (not dimmed by transparency).
    ``sky_gradient`` ``(gx, gy)`` or ``(gx, gy, dome)``: see :func:`sky_gradient_plane`.
    With ``noise=True`` the signal gets Poisson noise (``gain`` e-/ADU) plus Gaussian
    read noise (``read_noise`` ADU rms); the result is rounded and clipped to 0..65535.
    """
    raw = expected_bayer_frame(model, wcs, shape, transparency=transparency,
                               sky_pedestal_rgb=sky_pedestal_rgb, pattern=pattern,
                               sky_gradient=sky_gradient)
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
    pointing: tuple[float, float] = (0.0, 0.0)
    satellite: dict[str, float] | None = None
    gain_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)
    sky_gradient: tuple[float, ...] | None = None
    sky_level: float | None = None

    def to_meta(self) -> dict[str, Any]:
        """Per-frame entry of truth.json (``sky_gradient``, ``sky_level`` only when the frame has one)."""
        meta = {
            "file": self.name,
            "index": self.index,
            "panel": self.panel,
            "panel_ix": self.ix,
            "panel_iy": self.iy,
            "date_obs": self.date_obs,
            "transparency": self.transparency,
            "gain_rgb": [float(x) for x in self.gain_rgb],
            "sky_pedestal_rgb": [float(x) for x in self.pedestal],
            "rotation_deg": self.rotation_deg,
            "dither_px": [float(self.dither_px[0]), float(self.dither_px[1])],
            "center_ra": float(self.wcs.wcs.crval[0]),
            "center_dec": float(self.wcs.wcs.crval[1]),
            "pointing_ra": float(self.pointing[0]),
            "pointing_dec": float(self.pointing[1]),
            "has_satellite": self.satellite is not None,
            "satellite": None if self.satellite is None else {k: float(v) for k, v in self.satellite.items()},
        }
        if self.sky_gradient is not None:
            meta["sky_gradient"] = [float(g) for g in self.sky_gradient]
        if self.sky_level is not None:
            meta["sky_level"] = float(self.sky_level)
        return meta


def _frame_header(pl: _FramePlan, opt: dict[str, Any]) -> fits.Header:
    """Seestar-like FITS header of one raw frame, with the plate-solved CD-matrix WCS.

    With ``write_wcs`` off the header is what the telescope writes: no WCS, and ``RA``/``DEC``
    the commanded pointing of the panel (off by ``pointing_error_deg``), not the frame centre.
    """
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
    hdr["RA"] = (float(pl.pointing[0]), "[deg] pointing RA")
    hdr["DEC"] = (float(pl.pointing[1]), "[deg] pointing Dec")
    if opt["write_wcs"]:
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


def _catalogue_paths(star_catalog: Any) -> list[str]:
    """Return the index files of a ``star_catalog`` option: ``"tycho2"`` (found on this machine)
    or explicit paths. Raises FileNotFoundError with what to install when there are none."""
    if star_catalog != "tycho2":
        return [str(p) for p in ([star_catalog] if isinstance(star_catalog, (str, os.PathLike))
                                 else star_catalog)]
    from zemosaic_astrometry import INSTALL_HINT, astrometry_index_dirs

    paths = sorted(p for folder in astrometry_index_dirs() for scale in CATALOGUE_INDEX_SCALES
                   for p in Path(folder).glob(f"index-*{scale}*.fits")
                   if f"tycho2-{scale}" in p.name or f"41{scale}" in p.name)
    if not paths:
        raise FileNotFoundError(f"star_catalog='tycho2' needs astrometry.net's Tycho-2 index files: {INSTALL_HINT}")
    return [str(p) for p in paths]


def _panel_gains(spec: Any, n_panels: int) -> list[tuple[float, float, float]]:
    """Return one (r, g, b) signal gain per panel from the ``panel_gain_rgb`` option."""
    if spec is None:
        return [(1.0, 1.0, 1.0)] * n_panels
    if len(spec) != n_panels:
        raise ValueError(f"panel_gain_rgb needs one entry per panel ({n_panels}), got {len(spec)}")
    gains = [tuple(float(g) for g in np.broadcast_to(np.asarray(e, float), (3,))) for e in spec]
    if not all(g > 0 for rgb in gains for g in rgb):
        raise ValueError(f"panel_gain_rgb entries must be > 0, got {spec!r}")
    return gains


def _panel_sky_gradients(spec: Any, n_panels: int) -> list[list[tuple[float, ...]] | None]:
    """Return, per panel, its list of sky gradients (one, or two for two nights) or None.

    An entry of ``panel_sky_gradient`` is one number (``gx = gy``), ``(gx, gy)``, ``(gx, gy,
    dome)`` or a list of two of those. A gradient is kept as 2 values when its dome is 0, so a
    dataset without domes records (and renders) exactly what its 2-value gradients give.
    """
    if spec is None:
        return [None] * n_panels
    if len(spec) != n_panels:
        raise ValueError(f"panel_sky_gradient needs one entry per panel ({n_panels}), got {len(spec)}")
    panels = []
    for entry in spec:
        nights = list(entry) if _is_two_nights(entry) else [entry]
        panels.append([_one_gradient(g) for g in nights])
    if not all(_gradient_min(g) > 0.0 for nights in panels for g in nights):
        raise ValueError(f"panel_sky_gradient entries must keep the sky positive over the sensor, got {spec!r}")
    return panels


def _is_two_nights(entry: Any) -> bool:
    """Whether a ``panel_sky_gradient`` entry is a list of two gradients, not one gradient."""
    if not isinstance(entry, (list, tuple, np.ndarray)) or len(entry) == 0 or np.ndim(entry[0]) == 0:
        return False
    if len(entry) != 2:
        raise ValueError(f"a two-night panel_sky_gradient entry holds 2 gradients, got {entry!r}")
    return True


def _one_gradient(entry: Any) -> tuple[float, ...]:
    """``(gx, gy)`` or, with a non-zero dome, ``(gx, gy, dome)`` of one gradient entry."""
    values = np.atleast_1d(np.asarray(entry, float))
    if values.size == 1:
        values = np.repeat(values, 2)
    gx, gy, dome = _gradient_terms(values)
    return (gx, gy, dome) if dome else (gx, gy)


def _frame_gradient(nights: list[tuple[float, ...]] | None, k: int, fpp: int) -> tuple[float, ...] | None:
    """Sky gradient of a panel's ``k``-th frame: a two-night panel's first ``ceil(fpp/2)`` frames
    take its first gradient, the others its second."""
    if nights is None:
        return None
    return nights[0] if len(nights) == 1 or k < (fpp + 1) // 2 else nights[1]


def _panel_sky_levels(spec: Any, n_panels: int) -> list[float] | None:
    """Return one sky-pedestal factor per panel from ``panel_sky_level`` (None when not set)."""
    if spec is None:
        return None
    if np.ndim(spec) != 1 or len(spec) != n_panels:
        raise ValueError(f"panel_sky_level needs one number per panel ({n_panels}), got {spec!r}")
    levels = [float(x) for x in spec]
    if not all(x > 0 for x in levels):
        raise ValueError(f"panel_sky_level entries must be > 0, got {spec!r}")
    return levels


def _central_frame(plans: Sequence["_FramePlan"]) -> int:
    """Return the position in ``plans`` of the frame whose centre is nearest their mean centre."""
    ra, dec = (np.radians([pl.wcs.wcs.crval[k] for pl in plans]) for k in (0, 1))
    vec = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
    return int(np.argmax(vec @ vec.mean(axis=0)))


def _satellite_frames(spec: Any, panels: Any, plans: Sequence["_FramePlan"], fpp: int,
                      rng: np.random.Generator) -> list[int]:
    """Return the indices of the frames that get a satellite trail (``satellite_frame``).

    ``None``: one random frame; an int or a list of ints: those frames; ``"central"``: in each
    panel of ``panels`` (default: every panel) the frame whose centre is nearest the panel's mean
    centre, the frame a stacker centring its reference picks; ``"first_noncentral"``: the panel's
    first frame in time order other than that one.
    """
    n_frames = len(plans)
    if spec is None:
        return [int(rng.integers(0, n_frames))]
    if isinstance(spec, str):
        if spec not in SATELLITE_FRAME_MODES:
            raise ValueError(f"satellite_frame must be an index, a list or one of {SATELLITE_FRAME_MODES}, "
                             f"got {spec!r}")
        chosen = range(n_frames // fpp) if panels is None else [int(p) for p in panels]
        frames = []
        for p in chosen:
            if not 0 <= p < n_frames // fpp:
                raise ValueError(f"satellite_panels entry {p} outside 0..{n_frames // fpp - 1}")
            central = _central_frame(plans[p * fpp:(p + 1) * fpp])
            k = central if spec == "central" else (1 if central == 0 else 0)
            frames.append(p * fpp + k)
        return frames
    frames = [int(spec)] if np.ndim(spec) == 0 else [int(i) for i in spec]
    for i in frames:
        if not 0 <= i < n_frames:
            raise ValueError(f"satellite_frame {i} outside 0..{n_frames - 1}")
    return frames


def _recorded_options(opt: dict[str, Any]) -> dict[str, Any]:
    """Return the options as truth.json records them: the later ones only when set."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in opt.items()
            if k not in _OPTIONAL_OPTIONS or v != _OPTIONAL_OPTIONS[k]}


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
        ``pedestal_jitter`` [0.06], ``panel_gain_rgb`` [None: one number or an (r, g, b)
        triple per panel multiplying that panel's signal, not its sky: a panel observed
        through other extinction or on another night with another colour balance;
        recorded per frame as ``gain_rgb``], ``gain`` [0.8 e-/ADU], ``read_noise`` [3 ADU],
        ``noise`` [True], ``hot_pixels`` [True | False | count], ``satellite``
        [True], ``satellite_frame`` [random; an index or a list of indices: a trail in each;
        ``"central"``: in the frame of each panel whose centre is nearest the panel's mean
        centre; ``"first_noncentral"``: in each panel's first other frame],
        ``satellite_panels`` [every panel: the panels the two last modes put a trail in],
        ``panel_sky_gradient`` [None: flat sky; else one entry per panel shaping its frames'
        sky pedestal across the sensor: ``(gx, gy)`` or ``(gx, gy, dome)`` (a light dome), see
        :func:`sky_gradient_plane`, or a list of two of those, "two nights in one panel": the
        panel's first ``ceil(frames_per_panel / 2)`` frames take the first, the others the
        second; recorded per frame as ``sky_gradient``, 2 values when its dome is 0, else 3],
        ``panel_sky_level`` [None: 1; else one factor per panel multiplying its frames' sky
        pedestal, the sky brightening as the altitude changes; recorded per frame as
        ``sky_level``, and already included in its ``sky_pedestal_rgb``], ``fwhm_px`` [2.7],
        ``star_density`` [6000/deg^2], ``mag_range`` [(6, 16)], ``nebula`` [True], ``exptime`` [10],
        ``start_time`` ["2024-01-15T20:00:00"], ``object_name``, ``star_catalog``
        [None: random stars; ``"tycho2"`` or index file paths: the real stars brighter than
        mag 11 where they are, read from astrometry.net index files, so the frames can be
        plate-solved], ``write_wcs`` [True; False: no WCS in the headers, as a Seestar writes
        them], ``pointing_error_deg`` [0: ``RA``/``DEC`` = the panel centre; > 0: off by up to
        that much, the same for a panel's frames].

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
    panel_gains = _panel_gains(opt["panel_gain_rgb"], nxp * nyp)
    panel_gradients = _panel_sky_gradients(opt["panel_sky_gradient"], nxp * nyp)
    panel_levels = _panel_sky_levels(opt["panel_sky_level"], nxp * nyp)
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
    prng = np.random.default_rng([seed, _STREAM_POINTING])
    for p in range(nxp * nyp):
        ix, iy = p % nxp, p // nxp
        ox = (ix - (nxp - 1) / 2.0) * step_x
        oy = (iy - (nyp - 1) / 2.0) * step_y
        # The layout is laid out along the frame axes at the base rotation angle.
        pu = ox * math.cos(th0) + oy * math.sin(th0)
        pv = -ox * math.sin(th0) + oy * math.cos(th0)
        panel_uv.append((pu, pv))
        # Commanded pointing of the panel: the mount's own idea of where it points.
        err = float(opt["pointing_error_deg"]) * 3600.0 / scale * prng.uniform(0.0, 1.0)
        ang = prng.uniform(0.0, 2.0 * np.pi)
        pointing = tuple(float(x) for x in prov.wcs_pix2world(
            [[pu + err * math.cos(ang), pv + err * math.sin(ang)]], 0)[0])
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
            level = None if panel_levels is None else panel_levels[p]
            if level is not None:
                ped = ped * level
            date = (t0 + _dt.timedelta(seconds=float(opt["exptime"]) * i)).isoformat(timespec="milliseconds")
            plans.append(_FramePlan(
                index=i, panel=p, ix=ix, iy=iy, wcs=make_tan_wcs(ra, dec, rot, shape, scale),
                transparency=transp, pedestal=ped, rotation_deg=float(rot), dither_px=(ddx, ddy),
                date_obs=date, name=f"{_FRAME_NAME_PREFIX}{p:02d}_{i:0{width}d}.fits",
                pointing=pointing,
                gain_rgb=panel_gains[p],
                sky_gradient=_frame_gradient(panel_gradients[p], k, fpp),
                sky_level=level,
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

    catalogue = None
    if opt["star_catalog"]:
        radius = 0.5 * math.hypot(th, tw) * scale / 3600.0
        catalogue = catalogue_stars(ra0, dec0, radius, _catalogue_paths(opt["star_catalog"]))
    model = build_sky_model(truth_wcs, (th, tw), seed, pixel_scale_arcsec=scale, fwhm_px=float(opt["fwhm_px"]),
                            star_density=float(opt["star_density"]), mag_range=opt["mag_range"],
                            nebula=bool(opt["nebula"]), catalogue=catalogue)

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
        sat_frames = _satellite_frames(opt["satellite_frame"], opt["satellite_panels"], plans, fpp, srng)
        for i in sat_frames:  # one draw per trail, in this order: one trail, one draw
            plans[i].satellite = _plan_satellite(srng, shape)
        # One trail is recorded as its index (as truth.json records a single trail); several as the list.
        multiple = isinstance(opt["satellite_frame"], str) or np.ndim(opt["satellite_frame"]) > 0
        sat_index = sat_frames if multiple else sat_frames[0]

    # ---- frames
    frame_paths: list[str] = []
    for pl in plans:
        raw = make_bayer_frame(
            model, pl.wcs, shape, transparency=pl.transparency * np.asarray(pl.gain_rgb),
            sky_pedestal_rgb=pl.pedestal,
            noise=bool(opt["noise"]), gain=float(opt["gain"]), read_noise=float(opt["read_noise"]),
            rng=np.random.default_rng([seed, _STREAM_NOISE, pl.index]), hot_pixels=hot,
            satellite=pl.satellite, sky_gradient=pl.sky_gradient,
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
                       "frame_rgb ~= transparency * gain_rgb * truth_rgb + sky_pedestal_rgb",
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
        "options": _recorded_options(opt),
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

    ``transparency * gain_rgb * model + sky_pedestal`` at every pixel centre (no hot pixels,
    no satellite); the pedestal shaped by the frame's ``sky_gradient`` (2 or 3 values, see
    :func:`sky_gradient_plane`) when it has one, and scaled by its ``sky_level`` (recorded within
    ``sky_pedestal_rgb``).  ``frame`` is an index or a file name; pass ``model`` (from
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
    rgb *= np.float32(entry["transparency"]) * np.asarray(entry.get("gain_rgb", (1.0, 1.0, 1.0)), np.float32)
    if include_pedestal:
        pedestal = np.asarray(entry["sky_pedestal_rgb"], np.float32)
        if entry.get("sky_gradient") is not None:
            rgb += sky_gradient_plane(shape, entry["sky_gradient"]).astype(np.float32)[..., None] * pedestal
        else:
            rgb += pedestal
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
    ap.add_argument("--real-sky", action="store_true",
                    help="put the real Tycho-2 stars where they are (needs astrometry.net's index files)")
    ap.add_argument("--no-wcs", action="store_true",
                    help="write headers as a Seestar does: no WCS, RA/DEC the commanded pointing")
    ap.add_argument("--pointing-error", type=float, default=0.0, metavar="DEG",
                    help="commanded pointing off by up to DEG degrees per panel (0)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = ap.parse_args(None if argv is None else list(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    res = generate_dataset(args.outdir, panels=args.panels, frames_per_panel=args.frames_per_panel,
                           seed=args.seed, size=args.size, noise=not args.no_noise,
                           star_catalog="tycho2" if args.real_sky else None,
                           write_wcs=not args.no_wcs, pointing_error_deg=args.pointing_error)
    plural = "" if res["n_frames"] == 1 else "s"
    print(f"wrote {res['n_frames']} frame{plural} ({args.panels[0]}x{args.panels[1]} panels x {args.frames_per_panel}, "
          f"{args.size}) to {res['frames_dir']}; truth: {res['truth_fits']} ({res['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
