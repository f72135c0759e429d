"""FITS input/output for ZeMosaic: frames in, mosaic and master tiles out (display products: zemosaic_display).

Conventions shared with the rest of the project:

* in memory an image is ``float32`` shaped ``(H, W, C)`` (C = 3 for RGB,
  1 for mono); on disk FITS stores ``(C, H, W)``;
* NaN means "no data";
* a WCS is a 2-D celestial :class:`astropy.wcs.WCS`, written with a CD matrix.

Input frames are only ever opened read-only (``memmap=False``) and every
problem with one is reported as :class:`FrameError`, whose text is a short
reason a scan report can show next to the file name.  Outputs are written
atomically (hidden temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import stat
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, SingularMatrixError

from zemosaic_files import write_atomic
from zemosaic_utils import mad_sigma, median_last_axis, nonzero_indices

logger = logging.getLogger(__name__)

__all__ = [
    "BAYER_PATTERNS",
    "Frame",
    "FrameError",
    "FrameInfo",
    "debayer_bilinear",
    "load_frame",
    "read_frame_info",
    "saturated_pixels",
    "saturation_level",
    "read_header_info",
    "read_image_fits",
    "read_saturated_mask",
    "card_text",
    "header_float",
    "observation_cards",
    "write_plane_fits",
    "validate_wcs",
    "wcs_to_cd_header",
    "as_hwc_float32",
    "write_fits_atomic",
    "write_image_fits",
]

#: Bayer patterns understood by :func:`debayer_bilinear` (top-left 2x2, row by row).
BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
#: Pattern of the Seestar S50 sensor as read by astropy (row 0 first).
SEESTAR_BAYER_PATTERN = "GRBG"
#: Plausible pixel scale range in degrees per pixel (0.01 arcsec .. 1 degree).
MIN_PIXEL_SCALE_DEG = 0.01 / 3600.0
MAX_PIXEL_SCALE_DEG = 1.0

_FITS_SIGNATURE = b"SIMPLE  ="
# Cards that describe the celestial WCS (and SIP distortion) in a header.
_WCS_KEY_RE = re.compile(
    r"^(WCSAXES|WCSNAME|CRPIX\d|CRVAL\d|CTYPE\d|CUNIT\d|CD\d_\d|PC\d_\d|CDELT\d|CROTA\d"
    r"|PV\d_\d+|PS\d_\d+|LONPOLE|LATPOLE|RADESYS|EQUINOX|EPOCH"
    r"|A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_DMAX|B_DMAX|(A|B|AP|BP)_\d+_\d+)$")
# Cards a caller may not override: they define the data layout.
_STRUCTURAL_KEY_RE = re.compile(
    r"^(SIMPLE|XTENSION|BITPIX|NAXIS\d*|EXTEND|BZERO|BSCALE|BLANK|PCOUNT|GCOUNT|END|EXTNAME)$")


class FrameError(Exception):
    """A frame that must be skipped; ``str(e)`` is a short human reason."""


#: What astropy raises reading a damaged file, caught around its calls on a file's bytes only:
#: OSError (truncated, unreadable, no END card), VerifyError and ValueError (a card it cannot
#: parse), KeyError, TypeError and AttributeError (structural cards missing or of the wrong type:
#: NAXIS3 absent, BITPIX or BZERO not a number, an HDU it cannot size).
_DAMAGED_FITS = (OSError, fits.VerifyError, ValueError, KeyError, TypeError, AttributeError)
# WCS cards that astropy reads itself before wcslib sees the header (wcslib reports bad values of
# the others as ValueErrors): CTYPEn must be text, the SIP orders numbers up to this (astropy
# allocates (order + 1)^2 coefficients; solvers write orders of 2 to 5).
_WCS_TEXT_KEY_RE = re.compile(r"^CTYPE\d$")
_SIP_ORDER_KEY_RE = re.compile(r"^(A|B|AP|BP)_ORDER$")
_MAX_SIP_ORDER = 9


@dataclass
class Frame:
    """A loaded frame: ``data`` is float32 ``(H, W, C)``, ``wcs`` 2-D celestial."""

    path: str
    data: np.ndarray
    header: fits.Header
    wcs: WCS
    #: ``(H, W)`` bool: pixels whose value in some channel comes from a saturated raw sample
    #: (:func:`saturated_pixels`); None when the frame has no saturation level.
    saturated: np.ndarray | None = None
    #: The raw level (physical units) taken as saturation (:func:`saturation_level`), or None.
    saturation: float | None = None
    #: With ``keep_cfa``: the raw Bayer mosaic ``(H, W)``, NaN at the hot pixels (not data), and
    #: its pattern; None for other frames.
    cfa: np.ndarray | None = None
    bayer_pattern: str | None = None


@dataclass
class FrameInfo:
    """What the header of a frame says, read without touching the pixels.

    ``n_channels`` is the channel count :func:`load_frame` will return with
    ``debayer=True`` (3 for a Bayer frame); ``bayer_pattern`` is the
    effective pattern (XBAYROFF/YBAYROFF applied) or None.
    """

    path: str
    header: fits.Header
    wcs: WCS | None
    shape_hw: tuple[int, int]
    n_channels: int
    bayer_pattern: str | None
    date_obs: str | None
    exptime: float | None
    wcs_problem: str | None = None


# --------------------------------------------------------------------------
# Opening and inspecting files
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_astropy() -> Iterator[None]:
    # Truncation and header fix-ups are detected and reported by this module as
    # FrameError; astropy's own warnings would only repeat them once per file.
    # (catch_warnings is process-global; losing a warning in a thread is harmless.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        yield


def _file_size_after_signature_check(path: str) -> int:
    try:
        # A FIFO or a device would block open() or read forever: look before opening.
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise FrameError("not a regular file (a pipe, device or socket); not opened")
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(len(_FITS_SIGNATURE))
    except OSError as exc:
        raise FrameError(f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise FrameError("empty file")
    if head != _FITS_SIGNATURE:
        raise FrameError("not a FITS file")
    return size


@contextlib.contextmanager
def _open_fits(path: str) -> Iterator[tuple[fits.HDUList, int]]:
    """Open ``path`` read-only without memory mapping; yield (hdul, file size)."""
    size = _file_size_after_signature_check(path)
    try:
        # Read-only mode and no memmap: inputs are never modified or kept open.
        hdul = fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=True)
    except _DAMAGED_FITS as exc:
        raise FrameError(f"truncated or corrupt FITS: {exc}") from exc
    try:
        yield hdul, size
    finally:
        hdul.close()


def _find_image_hdu(hdul: fits.HDUList) -> tuple[int, Any]:
    """Index and HDU of the first HDU holding an image (primary or extension)."""
    index = 0
    while True:
        try:
            hdu = hdul[index]
            naxis = int(hdu.header.get("NAXIS", 0) or 0)
        except IndexError:
            break
        except _DAMAGED_FITS as exc:
            raise FrameError(f"truncated or corrupt FITS: {exc}") from exc
        image_kinds = (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)
        if isinstance(hdu, image_kinds) and naxis > 0:
            return index, hdu
        index += 1
    raise FrameError("no image data")


def _parsed_header(hdu: Any) -> fits.Header:
    """Return a copy of an HDU's header with every card parsed.

    astropy parses a card when it is first read, and fixes what it can of a non-standard card
    when it formats the header (as reading its WCS does): a card that it can neither fix nor
    parse (a non-printable character, a malformed value) would otherwise fail wherever the
    header is read later.
    """
    try:
        header = hdu.header.copy()
        header.tostring()
        for card in header.cards:
            _ = card.value
    except _DAMAGED_FITS as exc:
        raise FrameError(f"truncated or corrupt FITS: {exc}") from exc
    return header


def _axis_lengths(header: fits.Header) -> list[int]:
    naxis = header.get("NAXIS", 0)
    lengths = [header.get(f"NAXIS{i}") for i in range(1, int(naxis) + 1)]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths):
        raise FrameError(f"invalid image dimensions {lengths}")
    return lengths


def _layout(header: fits.Header) -> tuple[tuple[int, int], str, int]:
    """Return ((H, W), layout, planes); layout is '2d', 'chw' or 'hwc'."""
    lengths = _axis_lengths(header)
    numpy_shape = tuple(reversed(lengths))
    if len(lengths) == 2:
        return (lengths[1], lengths[0]), "2d", 1
    if len(lengths) == 3:
        n1, n2, n3 = lengths
        if n3 in (1, 3):
            return (n2, n1), "chw", n3
        if n1 == 3:  # numpy (H, W, 3): unusual for FITS, but some tools write it
            return (n3, n2), "hwc", 3
    raise FrameError(f"unsupported image dimensions {numpy_shape}")


def _check_data_present(hdul: fits.HDUList, index: int, hdu: Any,
                        header: fits.Header, file_size: int) -> None:
    # astropy only warns about (or fails late on) short data; compare sizes here
    # so the header-only scan already rejects truncated files.
    if isinstance(hdu, fits.CompImageHDU):
        return
    bitpix = header.get("BITPIX")
    if bitpix not in (8, 16, 32, 64, -32, -64):
        raise FrameError(f"unsupported BITPIX {bitpix!r}")
    needed = abs(bitpix) // 8 * math.prod(_axis_lengths(header))
    try:
        start = hdul.fileinfo(index)["datLoc"]  # reads the HDUs after it too
    except _DAMAGED_FITS as exc:
        raise FrameError(f"truncated or corrupt FITS: {exc}") from exc
    if start + needed > file_size:
        present = max(file_size - start, 0)
        raise FrameError(
            f"truncated or corrupt FITS: {present} of {needed} data bytes present")


def wcs_card_problem(header: fits.Header) -> str | None:
    """Return why a header's WCS cards cannot be handed to astropy's WCS, or None.

    These are the cards astropy itself reads (wcslib reports bad values of the others, and
    astropy raises ValueError or KeyError for them): a CTYPE that is not text, a SIP order that
    is not a number from 0 to :data:`_MAX_SIP_ORDER` or comes without CTYPE1 and CTYPE2.
    """
    for key, value in header.items():
        if _WCS_TEXT_KEY_RE.match(key) and not isinstance(value, str):
            return f"{key} is not text ({value!r})"
        if _SIP_ORDER_KEY_RE.match(key):
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not 0 <= value <= _MAX_SIP_ORDER:
                return f"{key} is not a SIP order ({value!r})"
            if "CTYPE1" not in header or "CTYPE2" not in header:
                return f"{key} without CTYPE1 and CTYPE2"
    return None


def _wcs_from_header(header: fits.Header) -> WCS:
    """Celestial 2-D WCS of ``header`` (not validated)."""
    if not any(_WCS_TEXT_KEY_RE.match(key) for key in header):
        # What astropy concludes too, after a millisecond: a raw sub's scan is mostly this.
        raise FrameError("no celestial WCS")
    problem = wcs_card_problem(header)
    if problem is not None:
        raise FrameError(f"invalid WCS: {problem}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            full = WCS(header)
    except SingularMatrixError as exc:
        raise FrameError("singular CD matrix") from exc
    except (ValueError, KeyError) as exc:  # what astropy documents; wcslib's errors are ValueErrors
        raise FrameError(f"invalid WCS: {exc}") from exc
    if not full.has_celestial:
        raise FrameError("no celestial WCS")
    _reject_zeroed_cd(header, full)
    return _as_icrs(full.celestial)


def _as_icrs(wcs: WCS) -> WCS:
    """Return ``wcs`` with an FK5 (J2000) frame read as ICRS, which it is within 0.03": far below
    a pixel. Every product then states one frame (``RADESYS = 'ICRS'``), whatever the frames'
    headers said (the Seestar writes FK5), and no reader converts between the two."""
    equinox = wcs.wcs.equinox
    if wcs.wcs.radesys.strip().upper() == "FK5" and (equinox == 2000.0 or not np.isfinite(equinox)):
        wcs.wcs.radesys = "ICRS"
        wcs.wcs.equinox = np.nan
        wcs.wcs.set()
    return wcs


def _reject_zeroed_cd(header: fits.Header, full: WCS) -> None:
    # wcslib's 'cdfix' (needed for CD headers on 3-D cubes) turns an all-zero
    # CD row/column into unity, which would hide a failed plate solution: check
    # the celestial CD block exactly as written in the header.
    axes = (full.wcs.lng + 1, full.wcs.lat + 1)
    keys = [[f"CD{i}_{j}" for j in axes] for i in axes]
    if not any(key in header for row in keys for key in row):
        return
    try:
        matrix = np.array([[float(header.get(key, 0.0)) for key in row] for row in keys])
    except (TypeError, ValueError) as exc:
        raise FrameError(f"invalid WCS: non-numeric CD card ({exc})") from exc
    if np.all(np.isfinite(matrix)) and abs(np.linalg.det(matrix)) == 0.0:
        raise FrameError("singular CD matrix")


def _bayer_pattern(header: fits.Header, layout: str) -> str | None:
    """Effective Bayer pattern of a 2-D frame, or None for mono/colour data."""
    if layout != "2d":
        return None
    value = header.get("BAYERPAT")
    text = str(value).strip().upper() if value is not None else ""
    if text in ("", "NONE", "MONO"):
        if "SEESTAR" not in str(header.get("INSTRUME", "")).upper():
            return None
        text = SEESTAR_BAYER_PATTERN
    if text not in BAYER_PATTERNS:
        raise FrameError(f"unsupported Bayer pattern {value!r}")
    return _shift_pattern(text, header.get("XBAYROFF", 0), header.get("YBAYROFF", 0))


def _shift_pattern(pattern: str, x_offset: Any, y_offset: Any) -> str:
    # Image pixel (0, 0) sits on sensor pixel (XBAYROFF, YBAYROFF): odd offsets
    # move the 2x2 pattern by one column / row.
    try:
        dx, dy = int(x_offset) % 2, int(y_offset) % 2
    except (TypeError, ValueError, OverflowError):
        logger.debug("Ignoring non-integer Bayer offsets %r, %r", x_offset, y_offset)
        return pattern
    return "".join(pattern[2 * ((r + dy) % 2) + (c + dx) % 2] for r in (0, 1) for c in (0, 1))


def header_float(header: Mapping[str, Any], *keys: str) -> float | None:
    """Return the first of ``keys`` whose card holds a finite number, as a float, or None.

    Text, booleans and NaN do not count: a header card written as ``'30'`` or ``T`` is not a
    measurement the pipeline can rely on.
    """
    for key in keys:
        value = header.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _header_wcs(header: fits.Header, shape_hw: tuple[int, int]) -> WCS:
    """The validated celestial WCS of a header; :class:`FrameError` says why there is none."""
    wcs = _wcs_from_header(header)
    validate_wcs(wcs, shape_hw)
    return wcs


def _inspect(path: str, hdul: fits.HDUList, size: int,
             require_wcs: bool = True, read_wcs: bool = True) -> tuple[FrameInfo, int, str]:
    """Build the FrameInfo of an open file; also return HDU index and layout.

    Without ``read_wcs`` (the caller has the frame's WCS) the header's WCS is not parsed:
    ``info.wcs`` is None.
    """
    index, hdu = _find_image_hdu(hdul)
    header = _parsed_header(hdu)
    shape_hw, layout, planes = _layout(header)
    _check_data_present(hdul, index, hdu, header, size)
    wcs, wcs_problem = None, None
    try:
        wcs = _header_wcs(header, shape_hw) if read_wcs else None
    except FrameError as exc:
        if require_wcs:
            raise
        wcs_problem = str(exc)
    return _frame_info(path, header, shape_hw, layout, planes, wcs, wcs_problem), index, layout


def _frame_info(path, header, shape_hw, layout, planes, wcs, wcs_problem) -> FrameInfo:
    """Return the :class:`FrameInfo` of a frame whose header, layout and WCS were read."""
    pattern = _bayer_pattern(header, layout)
    date_obs = header.get("DATE-OBS")
    return FrameInfo(path=path, header=header, wcs=wcs, shape_hw=shape_hw,
                     n_channels=3 if pattern else planes, bayer_pattern=pattern,
                     date_obs=str(date_obs) if date_obs is not None else None,
                     exptime=header_float(header, "EXPTIME", "EXPOSURE"), wcs_problem=wcs_problem)


def read_frame_info(path: str | os.PathLike, require_wcs: bool = True) -> FrameInfo:
    """Read and check a frame's header only (fast enough to scan hundreds of files).

    Checks that the file is a complete FITS image with 2-D or 3-D data of a
    supported layout and, with ``require_wcs``, a valid celestial WCS (without
    it a missing or broken WCS gives ``info.wcs = None`` and its reason in
    ``info.wcs_problem``: the frame can still be plate-solved).  Raises
    :class:`FrameError` with a short reason otherwise.
    """
    path = os.fspath(path)
    with _quiet_astropy(), _open_fits(path) as (hdul, size):
        info, _, _ = _inspect(path, hdul, size, require_wcs)
    return info


def read_header_info(path: str | os.PathLike) -> FrameInfo:
    """Return a frame's :class:`FrameInfo` from its first header alone, for planning a run.

    Ten times faster than :func:`read_frame_info` (no data size check, no card-by-card parse):
    a frame with data or cards the run cannot use passes here and is skipped by the run. Its WCS
    is read when the header has one (``wcs_problem`` says why not otherwise). Raises
    :class:`FrameError` when the file is not FITS or its first header has no image shape.
    """
    path = os.fspath(path)
    with _quiet_astropy():
        try:
            with open(path, "rb") as fh:
                header = fits.Header.fromfile(fh)
        except _DAMAGED_FITS as exc:
            raise FrameError(f"unreadable FITS header: {exc}") from exc
        shape_hw, layout, planes = _layout(header)
        wcs, wcs_problem = None, None
        try:
            wcs = _header_wcs(header, shape_hw)
        except FrameError as exc:
            wcs_problem = str(exc)
    return _frame_info(path, header, shape_hw, layout, planes, wcs, wcs_problem)


# --------------------------------------------------------------------------
# Pixel data
# --------------------------------------------------------------------------


def _read_pixels(hdul: fits.HDUList, index: int, header: fits.Header) -> np.ndarray:
    """Physical pixel values (BSCALE/BZERO applied) as a float32 copy; blanks -> NaN."""
    try:
        raw = hdul[index].data
    except _DAMAGED_FITS as exc:
        raise FrameError(f"truncated or corrupt FITS: {exc}") from exc
    expected = tuple(reversed(_axis_lengths(header)))
    if raw is None or raw.shape != expected:
        got = None if raw is None else raw.shape
        raise FrameError(f"truncated or corrupt FITS: data shape {got}, header says {expected}")
    data = raw.astype(np.float32, copy=True)
    if np.issubdtype(raw.dtype, np.integer) and isinstance(header.get("BLANK"), int):
        # astropy already maps BLANK to NaN for scaled data; unscaled and
        # unsigned-via-BZERO integers still carry the physical blank value.
        blank = header["BLANK"] * header.get("BSCALE", 1) + header.get("BZERO", 0)
        data[raw == blank] = np.nan
    if not np.issubdtype(raw.dtype, np.integer):  # integers convert to finite floats
        data[~np.isfinite(data)] = np.nan  # +-inf is as useless as NaN: "no data"
    return data


def _check_has_signal(data: np.ndarray) -> None:
    finite = np.isfinite(data)
    if not finite.any():
        raise FrameError("no finite pixels")
    if not np.any(finite & (data != 0)):
        raise FrameError("all pixels are zero")


def _shifted(padded: np.ndarray, pad: int, dy: int, dx: int, shape: tuple[int, int]) -> np.ndarray:
    return padded[pad + dy:pad + dy + shape[0], pad + dx:pad + dx + shape[1]]


def _ring_median(padded: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Median of the eight same-colour neighbours (two pixels away) of pixels ``(ys, xs)``.

    ``padded`` is the mosaic padded by 3 pixels; ``ys``/``xs`` index the unpadded mosaic and may
    step one pixel outside it.
    """
    ring = np.stack([padded[ys + 3 + dy, xs + 3 + dx] for dy in (-2, 0, 2) for dx in (-2, 0, 2)
                     if (dy, dx) != (0, 0)], axis=-1)
    return median_last_axis(ring)


def correct_hot_pixels(raw: np.ndarray, kappa: float = 8.0, neighbour_fraction: float = 0.2):
    """Return ``(cleaned Bayer mosaic, number of pixels replaced)``.

    A raw pixel is hot when it stands more than ``kappa`` noise sigmas above the median of its
    eight same-colour neighbours (two pixels away) while its four direct neighbours (other colours)
    are not raised with it: a star's light spreads over the direct neighbours (more than half of
    its peak for a 2.7 px FWHM), a hot pixel's does not. Hot pixels get the same-colour median.
    Done on the raw mosaic because bilinear debayering would spread each one into a coloured
    3x3 blotch that stack rejection can no longer recognise.
    """
    data = np.asarray(raw, dtype=np.float32)
    shape = data.shape
    if min(shape) < 6:
        return data, 0
    padded = np.pad(data, 3, mode="reflect")  # mirror about the edge pixel: keeps the Bayer parity
    cross = sum(_shifted(padded, 3, dy, dx, shape) for dy, dx in ((-2, 0), (2, 0), (0, -2), (0, 2))) / 4.0
    rough = data - cross
    sample = rough[::3, ::3]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return data, 0
    # Noise of (pixel - mean of 4) is sigma * sqrt(1 + 1/4): recover the pixel sigma from it.
    sigma = float(mad_sigma(sample)) / math.sqrt(1.25)
    if sigma <= 0:
        return data, 0
    # Cheap pre-selection: only pixels well above their same-colour cross can be hot (stars too);
    # the exact 8-neighbour median is computed for those few only.
    with np.errstate(invalid="ignore"):
        ys, xs = nonzero_indices(rough > 0.5 * kappa * sigma)
    if ys.size == 0:
        return data, 0
    med = _ring_median(padded, ys, xs)
    excess = data[ys, xs] - med
    # Mean excess of the four direct neighbours over their own same-colour ring medians.
    direct = sum(padded[ys + 3 + dy, xs + 3 + dx] - _ring_median(padded, ys + dy, xs + dx)
                 for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))) / 4.0
    with np.errstate(invalid="ignore"):
        hot = (excess > kappa * sigma) & (direct < neighbour_fraction * excess)
    cleaned = data.copy()
    cleaned[ys[hot], xs[hot]] = med[hot]
    return cleaned, int(hot.sum())


def _hot_pixels_corrected(data: np.ndarray, layout: str, pattern: str | None, hot_pixels: bool) -> np.ndarray:
    """Return a raw Bayer mosaic with :func:`correct_hot_pixels` applied when asked; other data as is."""
    if layout == "2d" and pattern and hot_pixels:
        data, n_hot = correct_hot_pixels(data)
        logger.debug("Hot pixel correction: %d pixel(s) replaced", n_hot)
    return data


def _to_hwc(data: np.ndarray, layout: str, pattern: str | None, debayer: bool) -> np.ndarray:
    if layout == "2d":
        if pattern and debayer:
            return debayer_bilinear(data, pattern)
        return data[:, :, np.newaxis]
    if layout == "chw":
        return np.ascontiguousarray(np.moveaxis(data, 0, -1))
    return data  # already (H, W, 3)


#: Fraction of the top of an integer format taken as saturated when the header names no level.
#: The shared real Seestar subs' clipped star cores sit at 65469-65526 in the 10 s frames (no
#: pixel lies between 62854 and 65469) and at 65535 in the 20 s ones: the full well is reached
#: short of the format's top. 99 % of 65535 is 64880.
INTEGER_SATURATION_FRACTION = 0.99


def _integer_top(header: Mapping[str, Any]) -> float | None:
    """Return the largest physical value an integer FITS image can hold (BZERO/BSCALE applied), or None."""
    bitpix = header.get("BITPIX")
    if not isinstance(bitpix, int) or bitpix <= 0:
        return None
    stored = 255 if bitpix == 8 else 2 ** (bitpix - 1) - 1
    scale = header_float(header, "BSCALE") or 1.0
    zero = header_float(header, "BZERO") or 0.0
    return zero + scale * stored if scale > 0 else zero


def saturation_level(header: Mapping[str, Any], override: float = 0.0) -> float | None:
    """Return the raw level (physical units) at and above which a frame's pixels are saturated.

    ``override`` (the ``saturation_level`` setting) wins when above 0; then the header's
    ``DATAMAX`` or ``SATURATE``; then :data:`INTEGER_SATURATION_FRACTION` of the top of the
    frame's integer format. None for a floating-point frame without those cards: nothing is
    known to clip.
    """
    if override and override > 0:
        return float(override)
    level = header_float(header, "DATAMAX", "SATURATE")
    if level is not None and level > 0:
        return level
    top = _integer_top(header)
    return None if top is None else INTEGER_SATURATION_FRACTION * top


def saturated_pixels(data: np.ndarray, level: float | None, bayer: bool) -> np.ndarray | None:
    """Return the ``(H, W)`` bool mask of the pixels that a sample at or above ``level`` reaches.

    ``data`` is a raw Bayer mosaic ``(H, W)`` (``bayer``: every pixel of the bilinear debayer whose
    3x3 neighbourhood holds a clipped sample, as every colour of it is interpolated from there),
    or ``(H, W)``/``(H, W, C)`` data (a pixel clipped in any channel). None without a level.
    """
    if level is None:
        return None
    with np.errstate(invalid="ignore"):
        clipped = np.asarray(data) >= level
    if clipped.ndim == 3:
        clipped = np.any(clipped, axis=2)
    if not bayer or not clipped.any():
        return clipped
    grown = clipped.copy()
    ys, xs = nonzero_indices(clipped)
    h, w = clipped.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grown[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)] = True
    return grown


def load_frame(path: str | os.PathLike, debayer: bool = True, hot_pixels: bool = True,
               wcs: WCS | None = None, require_wcs: bool = True, saturation_override: float = 0.0,
               keep_cfa: bool = False) -> Frame:
    """Load a frame as float32 ``(H, W, C)`` with its header and celestial WCS.

    2-D Bayer data (BAYERPAT card, or a Seestar INSTRUME defaulting to GRBG)
    is demosaiced to RGB when ``debayer`` is true, otherwise returned as the
    raw mosaic ``(H, W, 1)``.  2-D data without Bayer information is mono,
    ``(3, H, W)`` cubes become ``(H, W, 3)``.  Non-finite pixels become NaN.
    With ``hot_pixels`` a Bayer mosaic gets :func:`correct_hot_pixels` (before debayering).
    The file is opened read-only and closed before returning.  Raises
    :class:`FrameError` for anything that makes the frame unusable.
    ``wcs`` (a plate solution found elsewhere) replaces the header's WCS, which
    then need not exist; without ``require_wcs`` a frame with no usable WCS
    loads with ``wcs = None`` (to be plate-solved).
    The saturated pixels are flagged as the frame is loaded (``Frame.saturated``, after the
    hot pixels are corrected: a stuck pixel is not a clipped star), at
    :func:`saturation_level` (``saturation_override``: the ``saturation_level`` setting).
    With ``keep_cfa`` a Bayer frame also keeps its raw mosaic (``Frame.cfa``), hot pixels as NaN:
    Bayer drizzle drops them instead of using the replaced values.
    """
    path = os.fspath(path)
    with _quiet_astropy(), _open_fits(path) as (hdul, size):
        info, index, layout = _inspect(path, hdul, size, require_wcs and wcs is None, read_wcs=wcs is None)
        data = _read_pixels(hdul, index, info.header)
    _check_has_signal(data)
    raw, data = data, _hot_pixels_corrected(data, layout, info.bayer_pattern, hot_pixels)
    cfa = None
    if keep_cfa and layout == "2d" and info.bayer_pattern:
        cfa = raw if data is raw else np.where(data != raw, np.float32(np.nan), raw)
    level = saturation_level(info.header, saturation_override)
    planes = data if layout != "chw" else np.moveaxis(data, 0, -1)
    saturated = saturated_pixels(planes, level, bool(info.bayer_pattern) and debayer)
    image = _to_hwc(data, layout, info.bayer_pattern, debayer)
    logger.debug("Loaded %s: %s, Bayer %s", path, image.shape, info.bayer_pattern)
    return Frame(path=path, data=image, header=info.header, wcs=wcs if wcs is not None else info.wcs,
                 saturated=saturated, saturation=level, cfa=cfa,
                 bayer_pattern=info.bayer_pattern if cfa is not None else None)


# Bilinear weights of the 3x3 neighbourhood: only the ratio of weights matters, and
# small integers keep the float64 sums exact.
_KERNEL_RB = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float64)
_KERNEL_G = np.array([[0, 1, 0], [1, 4, 1], [0, 1, 0]], dtype=np.float64)


def _bayer_taps(pattern: str, py: int, px: int, colour: str) -> list[tuple[int, int, float]]:
    """Return the ``(dy, dx, weight)`` neighbours of ``colour`` around Bayer cell position ``(py, px)``.

    In raster order, the order in which a 3x3 correlation adds them.
    """
    kernel = _KERNEL_G if colour == "G" else _KERNEL_RB
    return [(dy, dx, float(kernel[dy + 1, dx + 1]))
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)
            if kernel[dy + 1, dx + 1] and pattern[2 * ((py + dy) % 2) + (px + dx) % 2] == colour]


def _padded_subgrids(raw: np.ndarray, with_validity: bool = True) -> tuple[dict, dict]:
    """Return the four Bayer sub-grids of ``raw`` as float64 values and 0/1 validity, padded.

    Sub-grid ``(qy, qx)`` is ``raw[qy::2, qx::2]``, contiguous, with a border of "no sample"
    (value 0, validity 0) one pixel wide all round, so that a neighbour beyond the frame edge is
    an ordinary neighbour with weight 0. NaN samples are no sample either. Without
    ``with_validity`` (every sample finite) the values are copied as they are and no validity is
    returned.
    """
    h, w = raw.shape
    values, valid = {}, {}
    for qy in (0, 1):
        for qx in (0, 1):
            sub = raw[qy::2, qx::2]
            inner = (slice(1, 1 + sub.shape[0]), slice(1, 1 + sub.shape[1]))
            values[qy, qx] = np.zeros(((h + 1) // 2 + 2, (w + 1) // 2 + 2))
            if not with_validity:
                values[qy, qx][inner] = sub
                continue
            ok = np.isfinite(sub)
            values[qy, qx][inner] = np.where(ok, sub, 0.0)
            valid[qy, qx] = np.zeros_like(values[qy, qx])
            valid[qy, qx][inner] = ok
    return values, valid


def _neighbour_slices(key: str, py: int, px: int, colour: str, ny: int, nx: int):
    """Yield ``(sub-grid, slice, weight)`` of each tap of ``colour`` at cell position ``(py, px)``.

    Neighbour row ``py + dy`` is row ``(py + dy) // 2 + i`` of sub-grid ``(py + dy) % 2``.
    """
    for dy, dx, k in _bayer_taps(key, py, px, colour):
        oy, ox = 1 + (py + dy) // 2, 1 + (px + dx) // 2
        yield ((py + dy) % 2, (px + dx) % 2), np.s_[oy:oy + ny, ox:ox + nx], k


def _debayer_masked(raw: np.ndarray, key: str) -> np.ndarray:
    """The normalised convolution with NaN samples and the frame edges left out (any size)."""
    h, w = raw.shape
    # float64 keeps sum(w * v) / sum(w) bit-exact for float32 / 16-bit input.
    values, valid = _padded_subgrids(raw)
    rgb = np.empty((h, w, 3), dtype=np.float32)
    for py in (0, 1):
        for px in (0, 1):
            ny, nx = len(range(py, h, 2)), len(range(px, w, 2))
            if ny == 0 or nx == 0:
                continue
            for channel, colour in enumerate("RGB"):
                total = weight = 0.0
                for q, window, k in _neighbour_slices(key, py, px, colour, ny, nx):
                    total = total + k * values[q][window]
                    weight = weight + k * valid[q][window]
                rgb[py::2, px::2, channel] = np.divide(total, weight, out=np.full((ny, nx), np.nan),
                                                       where=weight > 0)
    return rgb


#: Rows of 2x2 cells per band of the debayer.
_DEBAYER_BAND_CELLS = 64


def _debayer_finite(raw: np.ndarray, key: str) -> np.ndarray:
    """The normalised convolution of a mosaic with every sample finite, at least 4x4 pixels.

    Away from the edges every colour's taps weigh 4 in all (see the kernels), so the sum is
    divided by 4 with no weight map (exact, as 4 is a power of two); the first and last rows and
    columns, where taps fall outside the frame, are taken from :func:`_debayer_masked` of a strip
    that starts on an even row or column (the Bayer phase is kept).
    """
    h, w = raw.shape
    values, _ = _padded_subgrids(raw, with_validity=False)
    rgb = np.empty((h, w, 3), dtype=np.float32)
    # Bands of cell rows: each sum's float64 temporaries stay in the CPU caches.
    for r0 in range(0, (h + 1) // 2, _DEBAYER_BAND_CELLS):
        for py in (0, 1):
            ny = min(len(range(py, h, 2)), r0 + _DEBAYER_BAND_CELLS) - r0
            for px in (0, 1):
                nx = len(range(px, w, 2))
                for channel, colour in enumerate("RGB"):
                    total = 0.0
                    for q, (rows, cols), k in _neighbour_slices(key, py, px, colour, ny, nx):
                        total = total + k * values[q][rows.start + r0:rows.stop + r0, cols]
                    total *= 0.25
                    rgb[2 * r0 + py:2 * (r0 + ny) + py:2, px::2, channel] = total
    last_row, last_col = (h - 3) & ~1, (w - 3) & ~1
    rgb[0] = _debayer_masked(raw[:3], key)[0]
    rgb[-1] = _debayer_masked(raw[last_row:], key)[-1]
    rgb[:, 0] = _debayer_masked(raw[:, :3], key)[:, 0]
    rgb[:, -1] = _debayer_masked(raw[:, last_col:], key)[:, -1]
    return rgb


def debayer_bilinear(raw: np.ndarray, pattern: str = "GRBG") -> np.ndarray:
    """Bilinear demosaic of a 2-D Bayer mosaic into float32 ``(H, W, 3)`` RGB.

    Each colour is the weighted mean of the samples of that colour in the 3x3
    neighbourhood (normalised convolution), so a constant-colour field comes
    out exactly constant on every channel, edges included, and NaN samples
    are simply left out (a pixel with no valid neighbour becomes NaN).
    ``pattern`` gives the top-left 2x2 cell row by row: RGGB, BGGR, GRBG, GBRG.

    Computed per position in the 2x2 cell on the four colour sub-grids: each
    output pixel adds only the 1, 2 or 4 neighbours that carry the colour, not
    a full 3x3 convolution of every channel (same sums in the same order, so
    the same values). A mosaic with no NaN (the usual raw frame) needs no
    weight map inside the edges: half the work.
    """
    key = pattern.strip().upper() if isinstance(pattern, str) else pattern
    if key not in BAYER_PATTERNS:
        raise ValueError(
            f"unsupported Bayer pattern {pattern!r}: expected one of {', '.join(BAYER_PATTERNS)}")
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise ValueError(f"a Bayer mosaic must be 2-D, got shape {raw.shape}")
    if min(raw.shape) >= 4 and np.isfinite(raw).all():
        return _debayer_finite(raw, key)
    return _debayer_masked(raw, key)


# --------------------------------------------------------------------------
# WCS
# --------------------------------------------------------------------------


def _raw_wcs_numbers(wcs: WCS) -> np.ndarray:
    """CRVAL, CRPIX and the linear-part numbers exactly as stored (for finiteness)."""
    prm = wcs.wcs
    parts = [np.ravel(prm.crval), np.ravel(prm.crpix)]
    if prm.has_cd():
        parts.append(np.ravel(prm.cd))
    else:
        parts.append(np.ravel(prm.cdelt))
        if prm.has_pc():
            parts.append(np.ravel(prm.pc))
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts])


def _linear_matrix(wcs: WCS) -> np.ndarray:
    """Pixel -> intermediate world matrix in degrees per pixel (CD, or CDELT*PC)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            return np.asarray(wcs.pixel_scale_matrix, dtype=np.float64)
    except SingularMatrixError as exc:
        raise FrameError("singular CD matrix") from exc
    except ValueError as exc:  # wcslib's errors (astropy.wcs.WcsError)
        raise FrameError(f"invalid WCS: {exc}") from exc


def validate_wcs(wcs: WCS, shape_hw: tuple[int, int]) -> None:
    """Raise :class:`FrameError` unless ``wcs`` is a usable celestial 2-D WCS.

    Checks: 2-D celestial axes; finite CRVAL, CRPIX and CD (or PC*CDELT);
    non-singular linear part; pixel scale between 0.01 arcsec/px and
    1 deg/px; the centre of an image of ``shape_hw`` maps to finite sky
    coordinates.
    """
    if not isinstance(wcs, WCS) or not wcs.has_celestial:
        raise FrameError("no celestial WCS")
    if wcs.naxis != 2 or not wcs.is_celestial:
        raise FrameError(f"WCS is not 2-D celestial ({wcs.naxis} axes)")
    if not np.all(np.isfinite(_raw_wcs_numbers(wcs))):
        raise FrameError("non-finite WCS values (CRVAL, CRPIX or CD)")
    matrix = _linear_matrix(wcs)
    singular = np.linalg.svd(matrix, compute_uv=False)
    if not np.all(np.isfinite(singular)) or singular[-1] <= 1e-10 * singular[0]:
        raise FrameError("singular CD matrix")
    if singular[-1] < MIN_PIXEL_SCALE_DEG or singular[0] > MAX_PIXEL_SCALE_DEG:
        scale = math.sqrt(abs(np.linalg.det(matrix))) * 3600.0
        raise FrameError(
            f"implausible pixel scale {scale:.4g} arcsec/px "
            "(expected 0.01 arcsec/px to 1 deg/px)")
    height, width = shape_hw
    try:
        world = wcs.pixel_to_world_values((width - 1) / 2.0, (height - 1) / 2.0)
    except ValueError as exc:  # wcslib's errors (astropy.wcs.WcsError)
        raise FrameError(f"WCS cannot place the image centre on the sky: {exc}") from exc
    if not np.all(np.isfinite(world)):
        raise FrameError("WCS maps the image centre to no sky position")


def wcs_to_cd_header(wcs: WCS) -> fits.Header:
    """The celestial WCS as header cards with a CD matrix (no PC/CDELT).

    Keeps SIP distortion ('-SIP' CTYPEs and A_/B_/AP_/BP_ coefficients),
    RADESYS and EQUINOX; time cards (DATE-OBS, MJDREF...) are left out since
    they do not describe the pixel-to-sky mapping.
    """
    celestial = wcs if wcs.is_celestial else wcs.celestial
    if celestial.naxis != 2:
        raise ValueError("wcs has no 2-D celestial part")
    matrix = _linear_matrix(celestial)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        source = celestial.to_header(relax=True)
    cd_cards = [fits.Card(f"CD{i + 1}_{j + 1}", float(matrix[i, j]),
                          "Linear transformation matrix element (deg/px)")
                for i in range(2) for j in range(2)]
    header = fits.Header()
    for card in source.cards:
        key = card.keyword
        if re.match(r"^(PC\d_\d|CDELT\d|CROTA\d)$", key):
            continue
        if _WCS_KEY_RE.match(key):
            header.append(card)
        if key == "CRPIX2":
            header.extend(cd_cards)
    if "CD1_1" not in header:
        header.extend(cd_cards)
    return header


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def write_fits_atomic(path: str | os.PathLike, hdul: fits.HDUList) -> None:
    """Write ``hdul`` to ``path`` atomically; the destination is never half-written.

    On any exception the temporary file is removed, the previous content of
    ``path`` (if any) is left untouched and the exception is re-raised.
    """
    # CHECKSUM/DATASUM let a reader (fitsverify, astropy checksum=True) prove the file is whole.
    write_atomic(path, lambda fh: hdul.writeto(fh, checksum=True))


def as_hwc_float32(image: np.ndarray) -> np.ndarray:
    """Return an image as float32 ``(H, W, C)`` (C = 1 or 3); a 2-D image gets one channel."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"expected an (H, W, C) image with C = 1 or 3, got shape {array.shape}")
    return array


def _card_entries(cards: Mapping[str, Any] | Sequence[Sequence[Any]]) -> list[tuple]:
    if isinstance(cards, Mapping):
        entries = []
        for key, value in cards.items():
            if isinstance(value, tuple) and len(value) == 2:
                entries.append((key, value[0], value[1]))
            else:
                entries.append((key, value, None))
        return entries
    return [(c[0], c[1], c[2] if len(c) > 2 else None) for c in cards]


def card_text(text: Any, limit: int | None = 68) -> str:
    """Return ``text`` as FITS card text: printable ASCII ('?' for the rest), at most ``limit``.

    FITS headers hold ASCII only; astropy refuses anything else when the file is written, so a
    folder or object name with an accent would otherwise make the write fail.
    """
    return "".join(c if " " <= c <= "~" else "?" for c in str(text))[:limit]


def _add_provenance(header: fits.Header, cards: Any) -> None:
    """Add caller cards: dict {key: value | (value, comment)} or [(key, value[, comment])].

    Text values and comments are made ASCII-safe (:func:`card_text`): a non-ASCII file name
    must not stop a run at its last step.
    """
    for key, value, comment in _card_entries(cards):
        # Long values still go out whole (astropy continues them on CONTINUE cards).
        if isinstance(value, str):
            value = card_text(value, None)
        if isinstance(comment, str):
            comment = card_text(comment, None)
        upper = str(key).upper()
        if _STRUCTURAL_KEY_RE.match(upper) or _WCS_KEY_RE.match(upper):
            raise ValueError(f"header card {key!r} is reserved (data layout or WCS)")
        if upper in ("HISTORY", "COMMENT"):
            header.append(fits.Card(upper, value))
        else:
            header[key] = (value, comment)


def _sky_header(wcs: WCS) -> fits.Header:
    """The celestial WCS cards with the reference frame stated (RADESYS, EQUINOX).

    Siril drops the sky coordinates of a file without EQUINOX when it saves it again, and a
    reader without RADESYS has to guess the frame: both are always written.
    """
    header = wcs_to_cd_header(wcs)
    frame = str(header.get("RADESYS", "") or "ICRS").strip().upper()
    header["RADESYS"] = (frame, "reference frame of the sky coordinates")
    if "EQUINOX" not in header:
        header["EQUINOX"] = (2000.0, "equinox of the coordinates (J2000)")
    return header


def _colour_axis_cards(header: fits.Header) -> None:
    """Make the WCS of a ``(C, H, W)`` cube 3-D: axis 3 numbers the colour planes (1 = R).

    With ``WCSAXES = 2`` on 3-D data astropy builds a 3-axis WCS anyway and warns; a declared
    third axis (as Siril writes its RGB files) matches the data for every reader.
    """
    header["WCSAXES"] = (3, "celestial axes plus the colour plane axis")
    header.set("CTYPE3", "RGB", "colour plane: 1 = red, 2 = green, 3 = blue", after="CTYPE2")
    header.set("CRPIX3", 1.0, "reference plane", after="CRPIX2")
    header.set("CRVAL3", 1.0, "number of the reference plane", after="CRVAL2")
    header.set("CD3_3", 1.0, "one plane per pixel along axis 3", after="CD2_2")


def _fits_dtype(dtype) -> np.dtype:
    """Return ``dtype`` in FITS byte order (big-endian) when it is a float; as it is otherwise
    (astropy writes unsigned integers through BZERO)."""
    dtype = np.dtype(dtype)
    return dtype.newbyteorder(">") if dtype.kind == "f" else dtype


def _image_hdu(data: np.ndarray, wcs: WCS, header_cards: Any, primary: bool) -> fits.PrimaryHDU:
    """Return an HDU of ``data`` (2-D or ``(C, H, W)``) with its WCS and provenance cards.

    Float data is copied in FITS byte order (big-endian): astropy writes it as it is, where it
    would byteswap the caller's array in place and back, two passes and a hazard for any thread
    reading that array meanwhile (two files written at once from one array, such as a coverage
    map, would get wrong checksums).
    """
    data = np.ascontiguousarray(data, dtype=_fits_dtype(data.dtype))
    hdu = fits.PrimaryHDU(data) if primary else fits.ImageHDU(data)
    if primary:
        hdu.header["DATE"] = (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "UTC date this file was written")
        hdu.header["ORIGIN"] = ("ZeMosaic", "program that wrote this file")
    hdu.header.extend(_sky_header(wcs))
    if data.ndim == 3:
        _colour_axis_cards(hdu.header)
    if header_cards:
        _add_provenance(hdu.header, header_cards)
    return hdu


#: Extension holding the saturated pixels of a tile or mosaic (uint8, 1 = saturated).
SATURATED_EXTNAME = "SATURATED"


def _plane_extension(plane: np.ndarray, shape_hw, wcs: WCS, name: str, dtype) -> Any:
    """Return an ``EXTNAME = name`` image extension of an ``(H, W)`` plane of the image's shape."""
    plane = np.asarray(plane, dtype=dtype)
    if plane.shape != tuple(shape_hw):
        raise ValueError(f"{name.lower()} shape {plane.shape} does not match image {tuple(shape_hw)}")
    extension = _image_hdu(plane, wcs, None, False)
    extension.header["EXTNAME"] = name
    return extension


def write_image_fits(path: str | os.PathLike, image_hwc: np.ndarray, wcs: WCS,
                     coverage: np.ndarray | None = None,
                     header_cards: Mapping[str, Any] | Sequence[Sequence[Any]] | None = None,
                     dtype: Any = np.float32, saturated: np.ndarray | None = None) -> None:
    """Write an image as ``(C, H, W)`` FITS (float32, or ``dtype``) with a CD-matrix WCS, atomically.

    ``header_cards`` (dict ``{key: value | (value, comment)}`` or a list of
    ``(key, value[, comment])``) adds provenance cards; layout and WCS keys are
    refused.  ``coverage`` (H, W) goes to a float32 'COVERAGE' extension with
    the same celestial WCS, ``saturated`` (H, W bool) to a uint8 'SATURATED' one
    (:func:`read_saturated_mask`).  The WCS declares a third (colour plane) axis, the
    frame (RADESYS, EQUINOX), and every HDU carries CHECKSUM/DATASUM.
    """
    image = as_hwc_float32(image_hwc)
    planes = np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=_fits_dtype(dtype))
    hdus = [_image_hdu(planes, wcs, header_cards, True)]
    if coverage is not None:
        hdus.append(_plane_extension(coverage, image.shape[:2], wcs, "COVERAGE", np.float32))
    if saturated is not None:
        hdus.append(_plane_extension(saturated, image.shape[:2], wcs, SATURATED_EXTNAME, np.uint8))
    write_fits_atomic(path, fits.HDUList(hdus))


def read_saturated_mask(path: str | os.PathLike) -> np.ndarray | None:
    """Return the ``(H, W)`` bool saturated pixels a file written by :func:`write_image_fits` holds, or None."""
    with _quiet_astropy(), _open_fits(os.fspath(path)) as (hdul, _):
        try:
            hdu = hdul[SATURATED_EXTNAME]
        except KeyError:
            return None
        return np.asarray(hdu.data) > 0


def write_plane_fits(path: str | os.PathLike, plane_hw: np.ndarray, wcs: WCS,
                     header_cards: Mapping[str, Any] | Sequence[Sequence[Any]] | None = None,
                     dtype: Any = np.float32) -> None:
    """Write one 2-D plane (a channel, a coverage map) as a single-HDU FITS with its WCS.

    The form every peer reads alike: SWarp and Montage take the first plane of a cube and list
    every extension with a WCS as another image, so per-channel and coverage files are plain.
    """
    plane = np.ascontiguousarray(plane_hw, dtype=_fits_dtype(dtype))
    if plane.ndim != 2:
        raise ValueError(f"expected a 2-D plane, got shape {plane.shape}")
    write_fits_atomic(path, fits.HDUList([_image_hdu(plane, wcs, header_cards, True)]))


# Observation cards copied from the frames into tiles and mosaic when the frames agree.
_SHARED_OBSERVATION_KEYS = ("OBJECT", "TELESCOP", "INSTRUME", "FILTER", "FOCALLEN", "XPIXSZ")
_OBSERVATION_COMMENTS = {
    "DATE-OBS": "UTC start of the first exposure", "DATE-END": "UTC end of the last exposure",
    "EXPTIME": "[s] total integration time", "MJD-OBS": "MJD of DATE-OBS",
    "MJD-END": "MJD of DATE-END", "NCOMBINE": "number of frames combined",
    "OBJECT": "target", "TELESCOP": "telescope", "INSTRUME": "camera", "FILTER": "filter",
    "FOCALLEN": "[mm] focal length", "XPIXSZ": "[um] pixel size",
}


def _exposure_span(header: Mapping[str, Any]) -> tuple[Any, Any, float, int] | None:
    """Return ``(start, end, exposure s, frames)`` of a frame or stack header; None without DATE-OBS.

    A stack's header (DATE-END, NCOMBINE) gives its whole span; a frame's ends EXPTIME later.
    """
    from astropy.time import Time, TimeDelta

    try:
        start = Time(str(header["DATE-OBS"]), format="isot", scale="utc")
    except (KeyError, ValueError):
        return None
    exptime = header_float(header, "EXPTIME", "EXPOSURE") or 0.0
    try:
        end = Time(str(header["DATE-END"]), format="isot", scale="utc")
    except (KeyError, ValueError):
        end = start + TimeDelta(exptime, format="sec")
    count = header.get("NCOMBINE", 1)
    return start, end, exptime, count if isinstance(count, int) and count > 0 else 1


def _common_value(values: list) -> Any:
    """The value the headers agree on; for text that differs, the distinct values joined."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) == 1:
        return distinct[0]
    if all(isinstance(v, str) for v in distinct):
        return card_text(", ".join(distinct))
    return None  # numbers that differ (two focal lengths): no single true value to write


def observation_cards(headers: Sequence[Mapping[str, Any]]) -> list[tuple]:
    """Return the observation cards of a stack of ``headers`` (frames, or stacks of frames).

    DATE-OBS is the first start, DATE-END the last end, EXPTIME the total integration in seconds
    and NCOMBINE the number of frames; OBJECT, TELESCOP, INSTRUME, FILTER, FOCALLEN and XPIXSZ
    are copied when present (distinct texts are joined). Values are printable ASCII.
    """
    spans = [s for s in (_exposure_span(h) for h in headers) if s is not None]
    cards: list[tuple] = []
    if spans:
        first, last = min(s[0] for s in spans), max(s[1] for s in spans)
        # MJD-OBS/MJD-END as well: without them astropy's WCS 'datfix' adds them and warns.
        cards += [("DATE-OBS", first.isot), ("DATE-END", last.isot),
                  ("MJD-OBS", round(float(first.mjd), 8)), ("MJD-END", round(float(last.mjd), 8)),
                  ("EXPTIME", round(float(sum(s[2] for s in spans)), 3))]
    cards.append(("NCOMBINE", int(sum(s[3] for s in spans)) if spans else len(headers)))
    for key in _SHARED_OBSERVATION_KEYS:
        values = [h[key] for h in headers if key in h and not isinstance(h[key], bool)]
        value = _common_value([card_text(v) if isinstance(v, str) else v for v in values]) \
            if values else None
        if value is not None:
            cards.append((key, value))
    return [(key, value, _OBSERVATION_COMMENTS[key]) for key, value in cards]


def wcs_as_written(wcs: WCS) -> WCS:
    """Return the WCS that :func:`read_image_fits` gives back for a file written with ``wcs``.

    Header cards hold 16 significant digits: an image used both from memory and, in a later
    run, from its file must be used with the same WCS to give the same result bit for bit.
    """
    return wcs_from_text(wcs_to_cd_header(wcs).tostring())


def wcs_from_text(text: str) -> WCS:
    """Return the celestial WCS of header text (``wcs_to_cd_header(wcs).tostring()``).

    Text is how a WCS travels between processes unchanged: a pickled astropy WCS is rebuilt
    from a header of its own, with PC/CDELT cards in place of the CD matrix.
    """
    with _quiet_astropy():
        return _wcs_from_header(fits.Header.fromstring(text))


def read_image_fits(path: str | os.PathLike
                    ) -> tuple[np.ndarray, WCS, np.ndarray | None, fits.Header]:
    """Read a file written by :func:`write_image_fits`.

    Returns (image float32 (H, W, C), celestial WCS, coverage (H, W) float32
    or None, primary header).  Raises :class:`FrameError` on unreadable files.
    """
    path = os.fspath(path)
    with _quiet_astropy(), _open_fits(path) as (hdul, size):
        header = hdul[0].header.copy()
        shape_hw, layout, _ = _layout(header)
        _check_data_present(hdul, 0, hdul[0], header, size)
        data = _read_pixels(hdul, 0, header)
        try:
            cov_hdu = hdul["COVERAGE"]
        except KeyError:
            cov_hdu = None
        coverage = None if cov_hdu is None else cov_hdu.data.astype(np.float32, copy=True)
    wcs = _header_wcs(header, shape_hw)
    return _to_hwc(data, layout, None, False), wcs, coverage, header
