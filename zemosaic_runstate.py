"""The state a run keeps in its output folder: the lock, the master-tile manifest, the clean-up.

One run per output folder: :func:`acquire_output_lock` holds an OS lock on
``<output>/.zemosaic.lock`` for the whole run. The OS drops it when the process dies, however it
dies, so a lock file left by a crashed run is simply taken over. The file names the holder (pid,
host, start time, input folder) so that a second run can say who is in the way.

Resume: :class:`TileManifest` (``master_tiles/manifest.json``) records each finished master tile
under a key made of its frames' content hashes, their WCSs and the stacking settings
(:func:`tile_key`), with the tile file's own hash; a rerun reuses a tile only when all of them
match. Written after every tile, atomically, so a crash loses at most the tile being stacked.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import socket

import numpy as np

import zemosaic_astrometry as zastro
from zemosaic_files import write_text_atomic

logger = logging.getLogger(__name__)

LOCK_NAME = ".zemosaic.lock"
MANIFEST_NAME = "manifest.json"
_MANIFEST_VERSION = 1

try:  # POSIX
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

# The settings a master tile depends on (besides its frames and their WCSs): the one list of them
# (tests/test_architecture.py checks that the tile task reads no other). `use_gpu_phase5` is not
# one: the GPU runs the same kernels (docs/architecture.md, "CPU and GPU"), so either backend's
# tile serves the other.
TILE_SETTINGS = ("stacking_normalize_method", "stacking_weighting_method",
                 "stacking_rejection_algorithm", "stacking_kappa_low", "stacking_kappa_high",
                 "stacking_winsor_limits", "stacking_final_combine_method",
                 "stacking_kappa_max_iterations", "align_method", "correct_hot_pixels",
                 "saturation_level", "stacking_cfa_method", "drizzle_scale", "drizzle_pixfrac",
                 "drizzle_kernel", "background_model_order", "frame_screening",
                 "screen_min_star_fraction", "screen_max_fwhm_ratio", "screen_max_background_ratio",
                 "screen_kappa")


class OutputFolderBusy(Exception):
    """Another run holds the output folder; the message names the folder and that run."""


def _try_lock(fd: int) -> bool:
    """Take the OS lock on ``fd`` without waiting; False when another process holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError:
        return False


def _read_holder(path: str) -> dict:
    """Return what a lock file says about its holder ({} when unreadable or empty)."""
    try:
        with open(path, encoding="utf-8") as fh:
            holder = json.load(fh)
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another ZeMosaic run"
    return (f"another ZeMosaic run (pid {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}, input {holder.get('input_folder')})")


class OutputLock:
    """The lock of one output folder, held from :func:`acquire_output_lock` to :meth:`release`."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        # Remove first (POSIX): a run that opens the old file meanwhile sees it replaced and retries.
        if fcntl is not None:
            _remove_quietly(self.path)
        os.close(self._fd)
        self._fd = None
        if fcntl is None:
            _remove_quietly(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def acquire_output_lock(folder: str, input_folder: str) -> OutputLock:
    """Lock ``folder`` for this run; raise :class:`OutputFolderBusy` when another run holds it.

    A lock file whose process is gone (a crash, a kill -9) is taken over with one WARNING.
    """
    path = os.path.join(folder, LOCK_NAME)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if not _try_lock(fd):
            os.close(fd)
            raise OutputFolderBusy(f"output folder {folder} is in use by {_describe(_read_holder(path))};"
                                   " wait for it to finish or choose another output folder")
        if fcntl is not None and not _same_file(fd, path):
            os.close(fd)  # the holder released (and removed) it while we opened it: try again
            continue
        stale = _read_holder(path)
        if stale:
            logger.warning("Taking over the output folder from an earlier run that did not end "
                           "(pid %s, started %s)", stale.get("pid"), stale.get("started"))
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "input_folder": os.path.abspath(input_folder)}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode("utf-8"))
        return OutputLock(path, fd)
    raise OutputFolderBusy(f"output folder {folder}: could not take its lock {LOCK_NAME}")


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def remove_dead_run_files(folders) -> int:
    """Remove the temporary files (``.*.tmp``) a dead run left in ``folders``; returns how many.

    Only called under the folder's lock: no live run owns them.
    """
    removed = 0
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            path = os.path.join(folder, name)
            if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(path):
                _remove_quietly(path)
                removed += 1
    return removed


# --------------------------------------------------------------------------------------------------
# Master-tile manifest
# --------------------------------------------------------------------------------------------------


#: Sky positions in a tile key are rounded to this (degrees): 1.5e-4 px at the Seestar's
#: 2.4"/px, far below what changes a stacked pixel, far above the last bits in which one WCS
#: differs from itself written to the cache and read back.
WCS_KEY_ROUND_DEG = 1e-7


def wcs_key(wcs, shape_hw) -> list:
    """Return what a tile key keeps of a frame's WCS: the sky positions ``[ra, dec]`` of a 3x3
    grid of its pixels (corners, edge centres, centre), rounded to :data:`WCS_KEY_ROUND_DEG`.

    The values, not the text: a frame's WCS as solved, as read from the solve cache, as matched
    and as found in its header give the same key when they place the frame the same way.
    """
    height, width = shape_hw
    x, y = np.meshgrid([0.0, (width - 1) / 2.0, width - 1.0], [0.0, (height - 1) / 2.0, height - 1.0])
    ra, dec = wcs.pixel_to_world_values(x.ravel(), y.ravel())
    steps = np.round(np.column_stack([np.mod(ra, 360.0), dec]) / WCS_KEY_ROUND_DEG)
    return steps.astype(np.int64).tolist()


def tile_key(frame_digests, frame_wcs_keys, config, version: str) -> str:
    """Return the key of a master tile: what its pixels depend on, hashed. ``frame_wcs_keys``:
    :func:`wcs_key` of each frame."""
    settings = {name: getattr(config, name) for name in TILE_SETTINGS}
    payload = json.dumps({"frames": list(frame_digests), "wcs": list(frame_wcs_keys),
                          "settings": settings, "version": version}, sort_keys=True, default=list)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class TileManifest:
    """The finished master tiles of an output folder: ``{file name: entry}`` (see module doc)."""

    def __init__(self, tiles_dir: str):
        self.tiles_dir = tiles_dir
        self.path = os.path.join(tiles_dir, MANIFEST_NAME)
        self.entries: dict[str, dict] = {}
        try:
            with open(self.path, encoding="utf-8") as fh:
                data = json.load(fh)
            if data.get("version") == _MANIFEST_VERSION and isinstance(data.get("tiles"), dict):
                self.entries = data["tiles"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            logger.warning("Ignoring an unreadable tile manifest %s (%s): tiles are rebuilt",
                           self.path, exc)

    def reusable(self, name: str, key: str) -> dict | None:
        """Return the entry of tile ``name`` when it was built from ``key`` and its file is intact."""
        entry = self.entries.get(name)
        if not isinstance(entry, dict) or entry.get("key") != key:
            return None
        try:
            intact = zastro.file_sha256(os.path.join(self.tiles_dir, name)) == entry.get("sha256")
        except OSError:
            intact = False
        return entry if intact else None

    def record(self, name: str, key: str, **details) -> None:
        """Record a tile just written (and save the manifest)."""
        sha = zastro.file_sha256(os.path.join(self.tiles_dir, name))
        self.entries[name] = {"key": key, "sha256": sha, **details}
        self.save()

    def keep_only(self, names) -> None:
        """Forget every tile but ``names`` and remove their files: they belong to an earlier run."""
        names = set(names)
        stale = {n for n in os.listdir(self.tiles_dir)
                 if n.startswith("master_tile_") and n.endswith(".fits")} - names
        for name in sorted(stale):
            _remove_quietly(os.path.join(self.tiles_dir, name))
        if stale:
            logger.info("Removed %d master tile(s) of an earlier run: %s", len(stale),
                        ", ".join(sorted(stale)))
        self.entries = {n: e for n, e in self.entries.items() if n in names}
        self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(
            {"version": _MANIFEST_VERSION, "tiles": self.entries}, indent=1))
