"""Plate solving and frame WCS: astrometry.net or ASTAP, star matching to a solved frame, a cache.

A Seestar sub carries no plate solution, only the commanded pointing (``RA``/``DEC``, up to
~0.3 deg off) and the optics (``FOCALLEN``, ``XPIXSZ``). This module gives such a frame a WCS:

* :func:`solve_frame` runs an offline solver on a 2x2 superpixel copy of the frame written to a
  temporary folder (the input file is never touched), with the pointing and the pixel scale as
  hints and a time limit, and returns a TAN WCS at full resolution. Two backends:
  :class:`AstrometryNetSolver` (astrometry.net's ``solve-field`` with its Tycho-2 index files,
  about a second per Seestar sub with hints) and :class:`AstapSolver` (ASTAP's command line).
* :func:`wcs_from_star_match` gives a frame the WCS its star match to an already solved frame
  implies: solving costs seconds, matching a fraction of one, so a group solves one frame and
  matches the others.
* :class:`WcsCache` keeps every frame's WCS keyed by the file's content hash, so a second run over
  the same frames solves nothing.

Star lists come from :func:`detect_stars` (Source Extractor's algorithm through ``sep``).
Coordinates follow NumPy/astropy: 0-based pixel ``(x, y)`` with ``x`` the column.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS

from zemosaic_files import write_text_atomic
from zemosaic_fits import header_float

logger = logging.getLogger(__name__)

#: Binning applied before solving: a Seestar's stars are 2-3 px wide, so a 2x2 superpixel keeps
#: them and makes source extraction four times cheaper (the GRBG cell becomes one grey pixel).
SOLVE_BINNING = 2
#: Folders searched for astrometry.net index files when its config file names none.
DEFAULT_INDEX_DIRS = ("/usr/share/astrometry", "/usr/local/astrometry/data",
                      "/usr/local/share/astrometry", "/opt/homebrew/share/astrometry")
_ASTROMETRY_CONFIGS = ("/etc/astrometry.cfg", "/usr/local/astrometry/etc/astrometry.cfg",
                       "/usr/local/etc/astrometry.cfg", "/opt/homebrew/etc/astrometry.cfg")
INSTALL_HINT = ("install a plate solver: on Debian/Ubuntu `sudo apt-get install astrometry.net "
                "astrometry-data-tycho2-07-littleendian astrometry-data-tycho2-08-littleendian "
                "astrometry-data-tycho2-09-littleendian astrometry-data-tycho2-10-19-littleendian`"
                " (or `make system-deps`); on macOS/Windows install ASTAP and set "
                "astap_executable_path")
#: Fewer stars than this and a frame is not worth a solver run (clouds, a dark or a flat).
MIN_STARS_TO_SOLVE = 8
# A star match is trusted when this many stars agree to within this many pixels (full frame).
_MIN_MATCHED_STARS = 8
_MATCH_TOLERANCE_PX = 2.0
# Window half-size and Gaussian weight (px) of the full-resolution centroids of alignment stars:
# a Seestar star (FWHM 2.5-4 px) and its sky border fit in the window.
_CENTROID_RADIUS_PX = 5
_CENTROID_SIGMA_PX = 1.5
# Width (px) of the Tukey weights that settle a triangle match before its refinement: twice the
# match tolerance, so that every star the refinement may keep counts, with a smooth weight.
_SETTLE_WIDTH_PX = 2.0 * _MATCH_TOLERANCE_PX
# The settling fit stops when no star moves by more than this (px), or after so many rounds.
_SETTLE_STEP_PX = 1e-9
_SETTLE_ROUNDS = 100
# Bin (px) of the vote for the shift a guessed transform misses: twice the match tolerance.
_SHIFT_BIN_PX = 2.0 * _MATCH_TOLERANCE_PX


class SolveError(Exception):
    """A frame could not be given a WCS; the message is the reason shown to the user."""


class MatchError(SolveError):
    """Two star lists could not be matched: too few stars, no consistent transform, or too few
    stars agreeing with it. The frame is plate-solved on its own, or aligned by its WCS."""


# --------------------------------------------------------------------------------------------------
# Header hints
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolveHints:
    """What the header says about where a frame points and its pixel scale (None = unknown)."""

    ra_deg: float | None = None
    dec_deg: float | None = None
    scale_arcsec: float | None = None  # full-resolution pixel scale

    @property
    def has_position(self) -> bool:
        return self.ra_deg is not None and self.dec_deg is not None


def _sexagesimal(text, hours: bool):
    """Return degrees from ``'HH MM SS.s'`` / ``'+DD MM SS'`` text, or None."""
    try:
        parts = [float(p) for p in str(text).replace(":", " ").split()]
    except ValueError:
        return None
    if not 1 <= len(parts) <= 3:
        return None
    sign = -1.0 if str(text).strip().startswith("-") else 1.0
    value = sum(abs(p) / 60.0**i for i, p in enumerate(parts))
    return sign * value * (15.0 if hours else 1.0)


def hints_from_header(header) -> SolveHints:
    """Return the pointing (``RA``/``DEC`` in degrees, else ``OBJCTRA``/``OBJCTDEC`` text) and the
    pixel scale (206.265 * ``XPIXSZ`` [um] / ``FOCALLEN`` [mm], or ``SCALE``/``PIXSCALE``) of a frame.
    """
    ra, dec = header_float(header, "RA"), header_float(header, "DEC")
    if ra is None or dec is None:
        ra = _sexagesimal(header.get("OBJCTRA", ""), hours=True) if "OBJCTRA" in header else None
        dec = _sexagesimal(header.get("OBJCTDEC", ""), hours=False) if "OBJCTDEC" in header else None
    if dec is not None and not -90.0 <= dec <= 90.0:
        ra = dec = None
    pixel_um, focal_mm = header_float(header, "XPIXSZ"), header_float(header, "FOCALLEN")
    scale = None
    if pixel_um and focal_mm and pixel_um > 0 and focal_mm > 0:
        scale = 206.264806 * pixel_um / focal_mm
    else:
        scale = header_float(header, "SCALE") or header_float(header, "PIXSCALE")
    return SolveHints(None if ra is None else ra % 360.0, dec, scale)


# --------------------------------------------------------------------------------------------------
# Images and stars
# --------------------------------------------------------------------------------------------------


def superpixel_image(data, factor: int = SOLVE_BINNING) -> np.ndarray:
    """Return the ``factor`` x ``factor``-binned grey image of a frame: ``(H, W)`` raw Bayer or ``(H, W, C)``.

    A 2x2-binned Bayer cell holds one pixel of each colour, so the result is a grey image at half
    resolution. NaN stays NaN (a bin with a NaN sample is NaN). ``factor=1``: the channels' mean.
    """
    image = np.asarray(data, dtype=np.float32)
    if image.ndim == 2:
        image = image[:, :, None]
    b = factor
    h, w = (image.shape[0] // b) * b, (image.shape[1] // b) * b
    # Sums of strided views of each channel's plane: NumPy reduces a short axis (the 2x2 cell, the
    # 3 colours) element by element, and views that keep the colours innermost as well; this runs
    # on every frame.
    planes = [image[:, :, c] for c in range(image.shape[2])]
    grey = sum(sum(plane[dy:h:b, dx:w:b] for dy in range(b) for dx in range(b)) for plane in planes)
    return (grey * np.float32(1.0 / (b * b * image.shape[2]))).astype(np.float32, copy=False)


def detect_stars(image2d, max_stars: int = 150, threshold_sigma: float = 5.0, min_pixels: int = 5) -> np.ndarray:
    """Return ``(N, 2)`` star positions ``(x, y)``, brightest first, at most ``max_stars``.

    Background and noise from a mesh of up to 64 px; sources above ``threshold_sigma`` with at least
    ``min_pixels`` pixels. Saturated and very extended sources (flagged blends, truncated at the edge) are kept
    out: their centroids are the least precise and matching needs precision, not completeness.
    """
    import sep

    data = np.ascontiguousarray(image2d, dtype=np.float32)
    mask = ~np.isfinite(data)
    if mask.all():
        return np.zeros((0, 2))
    if mask.any():
        data = np.where(mask, np.float32(np.nanmedian(data)), data)  # detection only
    # A 64-px mesh follows a sky gradient; small images get a finer one so that nebulosity
    # does not inflate the noise estimate (at least six meshes across the short side).
    mesh = int(np.clip(min(data.shape) // 6, 16, 64))
    background = sep.Background(data, mask=mask, bw=mesh, bh=mesh)
    residual = data - background.back()
    try:
        sources = sep.extract(residual, threshold_sigma, err=background.globalrms, mask=mask,
                              minarea=min_pixels)
    except Exception as exc:
        # sep reports its own limits (too many pixels above the threshold, too many blended
        # objects) as plain Exceptions: a field it cannot extract has no stars for us. Any
        # subclass (TypeError, ValueError, MemoryError...) is a bug or the machine's, not the field's.
        if type(exc) is not Exception:
            raise
        logger.debug("star detection failed: %s", exc)
        return np.zeros((0, 2))
    keep = (sources["flag"] & (sep.OBJ_TRUNC | sep.OBJ_MERGED)) == 0
    keep &= sources["peak"] < 0.95 * float(np.nanmax(data))
    sources = sources[keep]
    order = np.argsort(-sources["flux"])[:max_stars]
    return np.column_stack([sources["x"][order], sources["y"][order]]).astype(np.float64)


def refine_centroids(image, xy, radius: int = _CENTROID_RADIUS_PX, sigma: float = _CENTROID_SIGMA_PX,
                     rounds: int = 4) -> np.ndarray:
    """Return ``(N, 2)`` star positions ``(x, y)`` refined on a full-resolution image.

    ``image`` is ``(H, W)`` or ``(H, W, C)`` (its channels are summed); ``xy`` are approximate
    positions (e.g. found on superpixels). Each star's light above the median of its window's
    border, weighted by a Gaussian of ``sigma`` px around the current position, gives the next
    position (a windowed centroid, as SExtractor's XWIN; ``rounds`` iterations). A star whose
    window leaves the image, holds no data or no light, or whose centroid runs away by more than
    ``radius`` keeps its approximate position.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    refined = xy.copy()
    h, w = image.shape[:2]
    cx, cy = np.rint(xy[:, 0]).astype(np.int64), np.rint(xy[:, 1]).astype(np.int64)
    inside = np.flatnonzero((cx >= radius) & (cx < w - radius) & (cy >= radius) & (cy < h - radius))
    if inside.size == 0:
        return refined
    dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    cx, cy = cx[inside, None, None], cy[inside, None, None]
    windows = np.asarray(image[cy + dy, cx + dx], dtype=np.float64)
    if windows.ndim == 4:
        windows = windows.sum(axis=-1)
    border = np.maximum(np.abs(dy), np.abs(dx)) == radius
    light = np.clip(windows - np.median(windows[:, border], axis=1)[:, None, None], 0.0, None)
    px, py = (cx + dx).astype(np.float64), (cy + dy).astype(np.float64)
    x, y = xy[inside, 0].copy(), xy[inside, 1].copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        for _ in range(rounds):
            weight = light * np.exp(-((px - x[:, None, None]) ** 2 + (py - y[:, None, None]) ** 2)
                                    / (2.0 * sigma**2))
            total = weight.sum(axis=(1, 2))
            x = (weight * px).sum(axis=(1, 2)) / total
            y = (weight * py).sum(axis=(1, 2)) / total
    good = np.isfinite(x) & np.isfinite(y) & (np.abs(x - xy[inside, 0]) <= radius) \
        & (np.abs(y - xy[inside, 1]) <= radius)
    refined[inside[good], 0], refined[inside[good], 1] = x[good], y[good]
    return refined


def _binned_to_full(xy, factor: int = SOLVE_BINNING) -> np.ndarray:
    """Return full-resolution pixel positions of superpixel positions (0-based centres)."""
    return np.asarray(xy, dtype=np.float64) * factor + (factor - 1) / 2.0


# --------------------------------------------------------------------------------------------------
# WCS helpers
# --------------------------------------------------------------------------------------------------


def _tangent_plane(ra0, dec0) -> WCS:
    """Return a TAN WCS with unit CD at ``(ra0, dec0)``: its pixels are intermediate degrees."""
    tan = WCS(naxis=2)
    tan.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    tan.wcs.crval = [ra0, dec0]
    tan.wcs.crpix = [0.0, 0.0]
    tan.wcs.cd = np.eye(2)
    tan.wcs.set()
    return tan


def tan_wcs_from_points(x, y, ra, dec, centre_xy) -> WCS:
    """Return the TAN WCS (CD matrix) that best maps pixels ``(x, y)`` to ``(ra, dec)``.

    The tangent point is the sky position nearest ``centre_xy``; the linear part is a least-squares
    fit in that tangent plane, so the result is exact for points that already follow a TAN
    projection and the best linear approximation for anything else (a SIP solution, say).
    """
    x, y, ra, dec = (np.asarray(v, dtype=np.float64) for v in (x, y, ra, dec))
    nearest = int(np.argmin(np.hypot(x - centre_xy[0], y - centre_xy[1])))
    crval = (float(ra[nearest]), float(dec[nearest]))
    for _ in range(2):  # refit once with the tangent point at the fitted centre
        xi, eta = _tangent_plane(*crval).wcs_world2pix(ra, dec, 0)
        design = np.column_stack([x - centre_xy[0], y - centre_xy[1], np.ones_like(x)])
        coef_xi, *_ = np.linalg.lstsq(design, xi, rcond=None)
        coef_eta, *_ = np.linalg.lstsq(design, eta, rcond=None)
        cd = np.array([coef_xi[:2], coef_eta[:2]])
        crval = tuple(float(v) for v in _tangent_plane(*crval).wcs_pix2world(
            [[coef_xi[2], coef_eta[2]]], 0)[0])
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = crval
    wcs.wcs.crpix = [centre_xy[0] + 1.0, centre_xy[1] + 1.0]
    wcs.wcs.cd = cd
    wcs.wcs.radesys = "ICRS"
    wcs.wcs.set()
    return wcs


def _grid(shape_hw, n: int = 9):
    """Return ``(x, y)`` of an ``n x n`` grid of pixel positions spanning a frame."""
    h, w = shape_hw
    gx, gy = np.meshgrid(np.linspace(0, w - 1, n), np.linspace(0, h - 1, n))
    return gx.ravel(), gy.ravel()


def wcs_pixel_offset(wcs_a, wcs_b, shape_hw) -> float:
    """Return the median distance (pixels of ``b``) between where two WCSs put a frame's pixels."""
    x, y = _grid(shape_hw)
    ra, dec = wcs_a.all_pix2world(x, y, 0)
    xb, yb = wcs_b.all_world2pix(ra, dec, 0)
    return float(np.median(np.hypot(xb - x, yb - y)))


def rescale_binned_wcs(wcs_binned, shape_hw, factor: int = SOLVE_BINNING) -> WCS:
    """Return the full-resolution TAN WCS of a frame from the WCS of its ``factor``-binned copy.

    Fitted through a grid of full-resolution pixels, so a SIP solution of the binned image becomes
    its best TAN approximation at full resolution (the one this module hands out).
    """
    x, y = _grid(shape_hw)
    ra, dec = wcs_binned.all_pix2world((x - (factor - 1) / 2.0) / factor,
                                       (y - (factor - 1) / 2.0) / factor, 0)
    h, w = shape_hw
    return tan_wcs_from_points(x, y, ra, dec, ((w - 1) / 2.0, (h - 1) / 2.0))


def _read_wcs_text(path: str) -> WCS:
    """Return the celestial WCS of a header file (a FITS header, or ASTAP's text .wcs file).

    A file astropy cannot read as a header with a WCS (a card it cannot parse, a WCS card of the
    wrong type, a WCS wcslib rejects) raises :class:`SolveError`.
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        header = _solution_header(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            wcs = WCS(header, relax=True)
    except (ValueError, KeyError, fits.VerifyError) as exc:  # astropy's documented errors
        raise SolveError(f"unreadable solution file: {exc}") from exc
    if not wcs.has_celestial:
        raise SolveError("the solver wrote no celestial WCS")
    return wcs.celestial


def _solution_header(raw: bytes) -> fits.Header:
    """Return a solution file's header, ready for astropy's WCS.

    Its non-standard cards are fixed as astropy fixes them when it formats a header (before
    anything reads them), the image size cards go (the WCS does not need them, and nothing here
    checks them against the image), and its WCS cards are checked
    (:func:`zemosaic_fits.wcs_card_problem`: :class:`SolveError`). A card astropy cannot parse
    raises its ``ValueError`` or ``VerifyError``.
    """
    from zemosaic_fits import wcs_card_problem

    header = fits.Header.fromstring(raw.decode("ascii", errors="replace"),
                                    sep="" if b"\n" not in raw[:2880] else "\n")
    header.tostring()
    for key in {k for k in header if k.startswith("NAXIS")}:
        header.remove(key, remove_all=True)
    problem = wcs_card_problem(header)
    if problem is not None:
        raise SolveError(f"unreadable solution file: {problem}")
    return header


# --------------------------------------------------------------------------------------------------
# Solvers
# --------------------------------------------------------------------------------------------------


def _write_solver_input(image2d, folder: str) -> str:
    """Write a grey float32 image for a solver; NaN becomes the median (solvers know no NaN)."""
    data = np.asarray(image2d, dtype=np.float32)
    if not np.isfinite(data).all():
        data = np.where(np.isfinite(data), data, np.float32(np.nanmedian(data)))
    path = os.path.join(folder, "frame.fits")
    fits.PrimaryHDU(data).writeto(path)
    return path


def _run(command, timeout_s: float, cwd: str) -> subprocess.CompletedProcess:
    """Run a solver process with a time limit; its output is kept for DEBUG only."""
    logger.debug("solver: %s", " ".join(command))
    # Its temporary files go into the frame's own work folder, which goes with them whatever
    # ends the solve (a time limit, Ctrl-C: the process is killed, then the folder removed).
    env = {**os.environ, "TMPDIR": cwd, "TMP": cwd, "TEMP": cwd}
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL, env=env)
    except subprocess.TimeoutExpired as exc:
        raise SolveError(f"plate solving timed out after {timeout_s:.0f} s") from exc
    except OSError as exc:
        raise SolveError(f"cannot run the plate solver {command[0]}: {exc.strerror or exc}") from exc
    logger.debug("solver exit %d; output tail: %s", done.returncode, (done.stdout or "")[-600:])
    return done


def astrometry_index_dirs() -> list[str]:
    """Return the folders holding astrometry.net index files (its config's ``add_path`` first)."""
    folders = []
    for cfg in _ASTROMETRY_CONFIGS:
        try:
            with open(cfg) as fh:
                folders += [line.split(None, 1)[1].strip() for line in fh
                            if line.strip().startswith("add_path") and len(line.split()) > 1]
        except OSError:
            continue
    folders += list(DEFAULT_INDEX_DIRS)
    seen = []
    for folder in folders:
        if folder not in seen and glob.glob(os.path.join(folder, "index-*.fits")):
            seen.append(folder)
    return seen


class AstrometryNetSolver:
    """astrometry.net's ``solve-field``, offline, with the index files found on this machine."""

    name = "astrometry.net"

    def __init__(self, executable: str = "solve-field", search_radius_deg: float = 3.0):
        self.executable = executable
        self.search_radius_deg = search_radius_deg

    def unavailable_reason(self) -> str | None:
        """Return why this solver cannot run here, or None when it can."""
        if shutil.which(self.executable) is None:
            return f"{self.executable} not found"
        if not astrometry_index_dirs():
            return "no astrometry.net index files found"
        return None

    def solve(self, image2d, hints: SolveHints, timeout_s: float, workdir: str) -> WCS:
        """Return the WCS of ``image2d`` (pixel scale hint in its own pixels)."""
        path = _write_solver_input(image2d, workdir)
        command = [self.executable, "--overwrite", "--no-plots", "--no-verify", "--no-remove-lines",
                   "--new-fits", "none", "--index-xyls", "none", "--rdls", "none",
                   "--corr", "none", "--match", "none", "--solved", "none", "--axy", "none",
                   "--temp-axy", "--crpix-center", "--tweak-order", "2", "--downsample", "1",
                   "--objs", "100", "--cpulimit", str(max(1, int(timeout_s)))]
        if hints.scale_arcsec:
            command += ["--scale-units", "arcsecperpix",
                        "--scale-low", f"{0.85 * hints.scale_arcsec:.4f}",
                        "--scale-high", f"{1.15 * hints.scale_arcsec:.4f}"]
        if hints.has_position:
            command += ["--ra", f"{hints.ra_deg:.6f}", "--dec", f"{hints.dec_deg:.6f}",
                        "--radius", f"{self.search_radius_deg:g}"]
        # An own engine config: the index folders found here (the system config's and the usual
        # places) and the time limit, whatever the machine's config says.
        config = os.path.join(workdir, "astrometry.cfg")
        with open(config, "w") as fh:
            fh.write(f"cpulimit {max(1, int(timeout_s))}\nautoindex\n")
            fh.writelines(f"add_path {folder}\n" for folder in astrometry_index_dirs())
        _run(command + ["--temp-dir", workdir, "--config", config, path], timeout_s + 5.0, workdir)
        solution = os.path.join(workdir, "frame.wcs")
        if not os.path.exists(solution):
            raise SolveError("astrometry.net found no solution")
        return _read_wcs_text(solution)


class AstapSolver:
    """ASTAP's command line (``astap -f FILE -ra H -spd DEG+90 -fov DEG -r DEG -wcs``)."""

    name = "ASTAP"

    def __init__(self, executable: str, database: str = "", search_radius_deg: float = 3.0):
        self.executable = executable
        self.database = database
        self.search_radius_deg = search_radius_deg

    def unavailable_reason(self) -> str | None:
        """Return why this solver cannot run here, or None when it can."""
        if not (os.path.isfile(self.executable) and os.access(self.executable, os.X_OK)) \
                and shutil.which(self.executable) is None:
            return f"ASTAP executable not found: {self.executable}"
        return None

    def solve(self, image2d, hints: SolveHints, timeout_s: float, workdir: str) -> WCS:
        """Return the WCS of ``image2d`` (pixel scale hint in its own pixels)."""
        path = _write_solver_input(image2d, workdir)
        base = os.path.join(workdir, "solution")
        command = [self.executable, "-f", path, "-o", base, "-wcs", "-z", "1",
                   "-r", f"{self.search_radius_deg:g}"]
        if hints.scale_arcsec:
            command += ["-fov", f"{hints.scale_arcsec * np.shape(image2d)[0] / 3600.0:.4f}"]
        if hints.has_position:
            command += ["-ra", f"{hints.ra_deg / 15.0:.6f}", "-spd", f"{hints.dec_deg + 90.0:.6f}"]
        if self.database:
            command += ["-d", self.database]
        done = _run(command, timeout_s, workdir)
        solution = base + ".wcs"
        if not os.path.exists(solution):
            raise SolveError(f"ASTAP found no solution ({_astap_error(base + '.ini', done)})")
        return _read_wcs_text(solution)


def _astap_error(ini_path: str, done) -> str:
    """Return ASTAP's reason for a failure (its .ini ``ERROR=`` line or its exit code)."""
    try:
        with open(ini_path, errors="replace") as fh:
            for line in fh:
                if line.startswith("ERROR="):
                    return line.split("=", 1)[1].strip() or f"exit {done.returncode}"
    except OSError:
        pass
    return f"exit {done.returncode}"


def solver_from_config(config):
    """Return ``(solver, None)`` for the configured solver, or ``(None, reason)`` when none runs.

    ASTAP when ``astap_executable_path`` is set, astrometry.net's ``solve-field`` otherwise.
    """
    radius = config.astap_default_search_radius
    if config.astap_executable_path:
        solver = AstapSolver(config.astap_executable_path, config.astap_data_directory_path, radius)
    else:
        solver = AstrometryNetSolver(search_radius_deg=radius)
    reason = solver.unavailable_reason()
    return (None, reason) if reason else (solver, None)


def solve_frame(solver, data, hints: SolveHints, timeout_s: float) -> WCS:
    """Plate-solve one frame (raw Bayer ``(H, W)`` or ``(H, W, C)``); returns its full-res TAN WCS.

    The solver sees a 2x2 superpixel copy in a temporary folder that is removed afterwards.
    Raises :class:`SolveError` with the solver's reason.
    """
    binned = superpixel_image(data)
    scaled = SolveHints(hints.ra_deg, hints.dec_deg,
                        None if hints.scale_arcsec is None else hints.scale_arcsec * SOLVE_BINNING)
    with tempfile.TemporaryDirectory(prefix="zemosaic_solve_") as workdir:
        wcs_binned = solver.solve(binned, scaled, timeout_s, workdir)
    return rescale_binned_wcs(wcs_binned, np.shape(data)[:2])


# --------------------------------------------------------------------------------------------------
# WCS from a star match
# --------------------------------------------------------------------------------------------------


def _fit_affine(src, dst, weights=None) -> np.ndarray:
    """Return the 3x3 least-squares affine matrix taking ``src`` (N, 2) to ``dst`` (N, 2).

    ``weights`` (N,): each pair's weight in the fit (default: all equal).
    """
    design = np.column_stack([src, np.ones(len(src))])
    if weights is not None:
        root = np.sqrt(weights)[:, None]
        design, dst = design * root, dst * root
    coef, *_ = np.linalg.lstsq(design, dst, rcond=None)
    return np.vstack([coef.T, [0.0, 0.0, 1.0]])


def _fit_similarity(src, dst, weights=None) -> np.ndarray:
    """Return the 3x3 least-squares similarity (rotation, scale, shift) taking ``src`` to ``dst``.

    Frames of one camera differ by a field rotation and a dither (the scale only by refraction):
    with a few dozen stars, the two parameters an affine fit adds only carry their noise.
    ``weights`` (N,): each pair's weight in the fit (default: all equal).
    """
    x, y = src[:, 0], src[:, 1]
    one, zero = np.ones_like(x), np.zeros_like(x)
    rows_x, rows_y = np.column_stack([x, -y, one, zero]), np.column_stack([y, x, zero, one])
    values_x, values_y = dst[:, 0], dst[:, 1]
    if weights is not None:
        root = np.sqrt(weights)
        rows_x, rows_y = rows_x * root[:, None], rows_y * root[:, None]
        values_x, values_y = values_x * root, values_y * root
    design = np.vstack([rows_x, rows_y])
    (a, b, tx, ty), *_ = np.linalg.lstsq(design, np.concatenate([values_x, values_y]), rcond=None)
    return np.array([[a, -b, tx], [b, a, ty], [0.0, 0.0, 1.0]])


_TRANSFORM_FITS = {"affine": _fit_affine, "similarity": _fit_similarity}


def _apply(matrix, xy) -> np.ndarray:
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def match_stars(frame_stars, reference_stars, guess=None, model: str = "affine") -> tuple[np.ndarray, int, float]:
    """Return ``(3x3 matrix frame -> reference pixels, matched stars, rms px)`` from two star lists.

    Triangle matching (astroalign) finds the transform; it is settled by a smooth robust fit
    (:func:`_settle_match`) and then refined by least squares on every star that lands within
    2 px of a reference star, until the set of matched stars stops changing. The result is the
    fit to that set: precise (all stars, not RANSAC's sample) and the same on every run, whichever
    triangles astroalign's unseeded RANSAC drew. ``model`` is the fitted transform, ``"affine"``
    or ``"similarity"``. ``guess`` (an affine matrix frame -> reference, e.g. :func:`wcs_affine`
    of two solved frames) is refined first and saves the triangle matching when enough stars
    agree with it. Raises :class:`MatchError`.
    """
    if len(frame_stars) < 5 or len(reference_stars) < 5:
        raise MatchError(f"star matching failed: too few stars ({len(frame_stars)} and "
                         f"{len(reference_stars)})")
    matrix = pairs = None
    if guess is not None:
        matrix, pairs = _match_from_guess(np.asarray(guess, dtype=np.float64), frame_stars,
                                          reference_stars, model)
    if pairs is None:
        start = _settle_match(_triangle_match(frame_stars, reference_stars), frame_stars,
                              reference_stars, model)
        matrix, pairs = _refine_match(start, frame_stars, reference_stars, model)
    residual = _apply(matrix, frame_stars[pairs[0]]) - reference_stars[pairs[1]]
    return matrix, len(pairs[0]), float(np.sqrt(np.mean(np.sum(residual**2, axis=1))))


def _match_from_guess(guess, frame_stars, reference_stars, model: str):
    """Return ``(matrix, pairs)`` refined from ``guess``, or ``(None, None)`` when it fits no stars.

    A guess that misses by a shift alone (a dither, tracking drift: the transform of another frame
    of the same pointing) is corrected by :func:`_shift_vote` first, which costs far less than
    matching triangles.
    """
    try:
        return _refine_match(guess, frame_stars, reference_stars, model)
    except MatchError as exc:
        logger.debug("the guessed transform does not fit the stars (%s)", exc)
    shifted = _shift_vote(guess, frame_stars, reference_stars)
    if shifted is not None:
        try:
            return _refine_match(_settle_match(shifted, frame_stars, reference_stars, model),
                                 frame_stars, reference_stars, model)
        except MatchError as exc:
            logger.debug("nor does it shifted (%s); matching triangles", exc)
    return None, None


def _shift_vote(matrix, frame_stars, reference_stars) -> np.ndarray | None:
    """Return ``matrix`` with the shift that brings most stars onto reference stars added, or None.

    Every pair of a moved frame star and a reference star votes for its offset, in bins of
    :data:`_SHIFT_BIN_PX`; pairs of the same star agree and pile up in one bin (with a few hundred
    stars, random pairs put a fraction of a vote in each). The shift is the median offset of the
    pairs within one bin of the fullest one, which needs :data:`_MIN_MATCHED_STARS` of them. A
    rotation the guess misses spreads the offsets, so it finds only small ones (a fraction of a
    degree); the refinement then fits the rest.
    """
    moved = _apply(matrix, frame_stars)
    offsets = (reference_stars[None, :, :] - moved[:, None, :]).reshape(-1, 2)
    cells = np.floor(offsets / _SHIFT_BIN_PX).astype(np.int64)
    cells -= cells.min(axis=0)
    keys = cells[:, 0] * (int(cells[:, 1].max()) + 1) + cells[:, 1]
    peak = np.bincount(keys).argmax()
    centre = offsets[keys == peak].mean(axis=0)
    near = offsets[np.all(np.abs(offsets - centre) <= _SHIFT_BIN_PX, axis=1)]
    if len(near) < _MIN_MATCHED_STARS:
        return None
    shifted = matrix.copy()
    shifted[:2, 2] += np.median(near, axis=0)
    return shifted


def _triangle_match(frame_stars, reference_stars) -> np.ndarray:
    """Return astroalign's similarity transform frame -> reference (3x3). Raises :class:`MatchError`.

    astroalign documents two failures of a match: ``MaxIterError`` (no transform found) and
    ``ValueError`` (fewer than 3 stars in a list). Its ``TypeError`` means input it cannot read:
    a bug of the caller, not a failed match, and it propagates.
    """
    import astroalign

    try:
        transform, _ = astroalign.find_transform(frame_stars, reference_stars, max_control_points=50)
    except (astroalign.MaxIterError, ValueError) as exc:
        raise MatchError(f"star matching failed: {exc}") from exc
    matrix = np.asarray(transform.params, dtype=np.float64)
    if not np.all(np.isfinite(matrix)):  # a degenerate fit, e.g. of stars on a line
        raise MatchError("star matching failed: no finite transform")
    return matrix


def _settle_match(matrix, frame_stars, reference_stars, model: str) -> np.ndarray:
    """Return the transform a Tukey-weighted least-squares fit converges to from ``matrix``.

    astroalign's RANSAC starts from a randomly drawn triangle, so its transform differs from run
    to run by a fraction of a pixel; the 2 px fixed point of :func:`_refine_match` could follow
    that start when a star lies near the tolerance. Each round here weighs every frame star by
    its distance ``d`` to the nearest reference star, ``(1 - (d / w)^2)^2`` within
    ``w`` = :data:`_SETTLE_WIDTH_PX` (no star's weight jumps as the transform moves), until no
    star moves by :data:`_SETTLE_STEP_PX`: from any of RANSAC's starts it ends on the same
    transform, far closer than the refinement's tolerance can tell apart, so the refinement
    starts from the same place on every run.
    """
    from scipy.spatial import cKDTree

    tree, fit = cKDTree(reference_stars), _TRANSFORM_FITS[model]
    for _ in range(_SETTLE_ROUNDS):
        moved = _apply(matrix, frame_stars)
        dist, idx = tree.query(moved, distance_upper_bound=_SETTLE_WIDTH_PX)
        ok = np.flatnonzero(np.isfinite(dist))
        if ok.size < _MIN_MATCHED_STARS:
            return matrix  # the refinement reports too few agreeing stars
        weights = (1.0 - (dist[ok] / _SETTLE_WIDTH_PX) ** 2) ** 2
        settled = fit(frame_stars[ok], reference_stars[idx[ok]], weights)
        step = float(np.max(np.abs(_apply(settled, frame_stars) - moved)))
        matrix = settled
        if step <= _SETTLE_STEP_PX:
            break
    return matrix


def wcs_affine(wcs_from, shape_from, wcs_to) -> np.ndarray | None:
    """Return the 3x3 affine matrix that best maps pixels of ``wcs_from`` to pixels of ``wcs_to``.

    A least-squares fit on a 9x9 grid spanning the ``shape_from`` frame; None when fewer than
    three grid points map to finite pixels (frames on opposite sides of the sky).
    """
    x, y = _grid(shape_from)
    xt, yt = wcs_to.all_world2pix(*wcs_from.all_pix2world(x, y, 0), 0)
    ok = np.isfinite(xt) & np.isfinite(yt)
    if ok.sum() < 3:
        return None
    return _fit_affine(np.column_stack([x, y])[ok], np.column_stack([xt, yt])[ok])


def _refine_match(matrix, frame_stars, reference_stars, model: str = "affine", max_rounds: int = 10):
    """Return ``(matrix, (frame indices, reference indices))``: the least-squares fit to its own matches.

    The ``model`` transform is refitted on the stars it matches within 2 px until they stay the same
    (a set still changing after ``max_rounds`` keeps the last fit). Raises :class:`MatchError`
    when too few stars agree.
    """
    from scipy.spatial import cKDTree

    tree = cKDTree(reference_stars)
    pairs = None
    for _ in range(max_rounds):
        dist, idx = tree.query(_apply(matrix, frame_stars), distance_upper_bound=_MATCH_TOLERANCE_PX)
        ok = np.flatnonzero(np.isfinite(dist))
        if ok.size < _MIN_MATCHED_STARS:
            raise MatchError(f"star matching failed: only {ok.size} stars agree")
        if pairs is not None and np.array_equal(ok, pairs[0]) and np.array_equal(idx[ok], pairs[1]):
            break
        pairs = (ok, idx[ok])
        matrix = _TRANSFORM_FITS[model](frame_stars[ok], reference_stars[idx[ok]])
    return matrix, pairs


def wcs_from_star_match(frame_stars, frame_shape_hw, reference_stars, reference_wcs, guess=None) -> WCS:
    """Return the TAN WCS a frame gets from its star match to a solved reference frame.

    Star positions are full-resolution pixels of each frame. The frame's pixels are carried into
    the reference through the fitted affine transform and onto the sky through the reference WCS.
    ``guess``: see :func:`match_stars`.
    """
    matrix, n, rms = match_stars(frame_stars, reference_stars, guess)
    x, y = _grid(frame_shape_hw)
    ref_xy = _apply(matrix, np.column_stack([x, y]))
    ra, dec = reference_wcs.all_pix2world(ref_xy[:, 0], ref_xy[:, 1], 0)
    h, w = frame_shape_hw
    logger.debug("star match: %d stars, rms %.2f px", n, rms)
    return tan_wcs_from_points(x, y, ra, dec, ((w - 1) / 2.0, (h - 1) / 2.0))


def frame_stars(data, binning: int = SOLVE_BINNING, min_pixels: int = 5) -> np.ndarray:
    """Return a frame's stars (full-resolution ``(x, y)``) found on its superpixel image.

    The 2x2 default suits raw Bayer data and plate solving; ``binning=1`` finds the stars of a
    debayered frame at full resolution, two to three times more precisely. ``min_pixels``: see
    :func:`detect_stars`.
    """
    return _binned_to_full(detect_stars(superpixel_image(data, binning), min_pixels=min_pixels), binning)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


def file_sha256(path: str) -> str:
    """Return the hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CachedWcs:
    """A WCS from the cache and how it was first obtained (``solved`` or ``matched to NAME``)."""

    wcs: WCS
    source: str
    solve_s: float | None


class WcsCache:
    """Frame WCSs in a folder, one JSON file per frame content hash (``<sha256>.json``)."""

    def __init__(self, folder: str):
        self.folder = folder

    def _path(self, digest: str) -> str:
        return os.path.join(self.folder, f"{digest}.json")

    def get(self, digest: str) -> CachedWcs | None:
        """Return the cached WCS of a frame, or None (absent or unreadable: solved again)."""
        try:
            with open(self._path(digest), encoding="utf-8") as fh:
                entry = json.load(fh)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AstropyWarning)
                wcs = WCS(fits.Header.fromstring(entry["wcs"], sep="\n"))
            return CachedWcs(wcs.celestial, str(entry["source"]), entry.get("solve_s"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.debug("ignoring unreadable WCS cache entry %s: %s", digest, exc)
            return None

    def put(self, digest: str, wcs: WCS, source: str, solve_s: float | None) -> None:
        """Store a frame's WCS (atomically: a crash leaves the old entry or none)."""
        from zemosaic_fits import wcs_to_cd_header

        os.makedirs(self.folder, exist_ok=True)
        entry = {"wcs": wcs_to_cd_header(wcs).tostring(sep="\n"), "source": source,
                 "solve_s": None if solve_s is None else round(float(solve_s), 3),
                 "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_text_atomic(self._path(digest), json.dumps(entry, indent=1))
