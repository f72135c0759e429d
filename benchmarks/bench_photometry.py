"""Photometric fidelity across panels on synthetic scenes (issue 13): ZeMosaic vs plain co-adds.

Run: ``.venv/bin/python benchmarks/bench_photometry.py [--frames-per-panel N] [--keep DIR]
[--scenes "sky-dominated,two nights,gradients,gradients full"] [--real [DIR]]
[--seeds 5-12 [--sweep-size full]]``; ``--montage-toy`` only checks the Montage peer on two toy
tiles. With ``--keep``, a rerun in the same folder reuses the generated scenes.

Scenes (2x2 panels of 480x270 synthetic Seestar frames, sky-dominated: sky ~3000 ADU, frame
transparency 0.84-1.00, sky pedestal jitter +-6 %):

* ``sky-dominated``: nothing else;
* ``panel +12 %``: panel 1's signal 12 % brighter (another night's extinction);
* ``two nights``: panels 2 and 3 with R and B gains 0.9 / 1.1 against G.

Rows: a perfect mosaic (the truth, scaled, with noise like ZeMosaic's: the figures' own floor),
ZeMosaic pass 1 (default settings), ZeMosaic with Two-Pass, reproject's
``reproject_and_coadd`` mean co-add of the same master tiles without any matching, and Siril
(``stack ... -norm=addscale`` of the master tiles registered on the mosaic grid) when
``siril-cli`` is installed (Siril 1.0 has no "no data" value: the tiles' outsides are written as
0 and its mean, which divides by every tile, is rescaled here to the tiles present), and
Montage's background matching when its binaries are installed (``mBgModel`` fits a plane per tile
to the overlaps' differences, ``mBackground`` subtracts it; "-l": levels only, no slopes; the
corrected tiles are co-added like the reproject mean, see :func:`montage_bgmodel`). Montage
matches backgrounds only: gains stay as they are, and its planes soak up part of a gain mismatch
times the scene's large-scale light (nebula, gradient), per channel. Figures (see
``tests/photometry_truth.py``): largest deviation of a panel's flux scale from the median
panel's, largest relative spread of R/G or B/G between panels, largest residual step across a
tile edge in sky-noise units, the mosaic's R/G and B/G against the truth's. After the table,
the panels' brightness and colour spreads as the run's own coefficients make them
(``photometry_truth.coefficient_figures``), free of the mosaic's noise; with ``--seeds 5-12``
also the two-night scene's spreads over those seeds (``--sweep-size full``: with frames of the
Seestar's size, whose overlaps are as wide as a real mosaic's).

Gradient scenes (``gradients``: 8 small frames a panel, overlap 0.3; ``gradients full``: 10
frames of 1080x1920 a panel; ``photometry_truth.gradient_scene_options``: per-panel sky levels
and sensor-fixed gradients, one panel of two nights): one ZeMosaic run per setting
(:data:`GRADIENT_RUNS`, "constant offsets (before)" being order 0 without feathering), the peers
on the default run's master tiles; figures in :func:`gradient_scene`. ``--real``: the shared
real subs of two nights, run before and after the sky models (:data:`REAL_RUNS`), with the
steps at the edges of each night's region measured on the mosaic minus a smooth fit of its own
sky (:func:`real_subs`); the runs' previews are listed for a look.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _measure import MontageError, run_montage, siril_env  # noqa: E402
import photometry_truth as pt  # noqa: E402
import zemosaic_astrometry as za  # noqa: E402
import zemosaic_fits as zfits  # noqa: E402
import zemosaic_quality as zq  # noqa: E402
import zemosaic_synth  # noqa: E402
import zemosaic_worker as zw  # noqa: E402
from zemosaic_config import config_from_dict  # noqa: E402

BASE = {"transparency_range": (0.84, 1.0), "sky_pedestal_rgb": (2700.0, 3000.0, 2400.0),
        "pedestal_jitter": 0.06}
SCENES = {
    "sky-dominated": {},
    "panel +12 %": {"panel_gain_rgb": [1.0, 1.12, 1.0, 1.0]},
    "two nights": {"panel_gain_rgb": [1.0, 1.0, (0.9, 1.0, 1.1), (0.9, 1.0, 1.1)]},
}
#: The alt-az light-pollution scenes (``photometry_truth.gradient_scene_options``), small and full size.
GRADIENT_SCENES = {
    "gradients": pt.gradient_scene_options(size="small", overlap=0.3, frames_per_panel=8),
    "gradients full": pt.gradient_scene_options(size="full", frames_per_panel=10),
}
CONSTANT_OFFSETS = {"background_model_order": 0, "assembly_feather_px": 0.0}
#: ZeMosaic's runs of a gradient scene: row label, output folder, settings changed.
GRADIENT_RUNS = (
    ("ZeMosaic", "out", {}),
    ("ZeMosaic order 2", "out_order2", {"background_model_order": 2}),
    ("constant offsets (before)", "out_offsets", CONSTANT_OFFSETS),
    ("ZeMosaic Two-Pass", "out_two_pass", {"two_pass_coverage_renorm": True}),
)
#: ZeMosaic's runs of the real subs: label, output folder, settings changed.
REAL_RUNS = (
    ("after (default)", "after", {}),
    ("order 2", "order2", {"background_model_order": 2}),
    ("before (constant offsets)", "before", CONSTANT_OFFSETS),
)
REAL_SUBS = Path(ROOT).parent / "shared" / "realdata" / "ngc7023"
SYNTH_SOURCES = ("zemosaic_synth.py", "zemosaic_synth_sky.py")


def load_master_tiles(out_dir):
    """Return the master tiles a run wrote, as :class:`zemosaic_worker.MasterTile`."""
    tiles = []
    for k, path in enumerate(sorted(Path(out_dir, zw.TILES_DIR).glob("master_tile_0*.fits"))):
        image, wcs, coverage, _hdr = zfits.read_image_fits(path)
        tiles.append(zw.MasterTile(k, image, coverage, wcs, str(path), [], "", "cpu"))
    return tiles


def zemosaic_two_pass(tiles, wcs, shape):
    """Assemble the tiles with Two-Pass on; returns ``(mosaic, tile gains)``."""
    config = config_from_dict({"two_pass_coverage_renorm": True})
    run = zw.Run(config)
    mosaic, _cov = zw.assemble_mosaic(run, tiles, wcs, shape)
    return mosaic, [run.report.tile_entry(t.index)["two_pass_gain"] for t in tiles]


def reproject_mean(tiles, wcs, shape):
    """Plain weighted-mean co-add of the tiles with reproject (no matching of any kind)."""
    from reproject import reproject_interp
    from reproject.mosaicking import reproject_and_coadd

    channels = []
    for c in range(3):
        data, _fp = reproject_and_coadd([(t.image[..., c], t.wcs) for t in tiles], wcs,
                                        shape_out=shape, input_weights=[t.coverage for t in tiles],
                                        reproject_function=reproject_interp, combine_function="mean")
        channels.append(data)
    mosaic = np.stack(channels, axis=-1).astype(np.float32)
    mosaic[mosaic == 0] = np.nan  # reproject fills no-data with 0
    return mosaic


def siril_addscale(tiles, wcs, shape, work):
    """Siril ``-norm=addscale`` mean stack of the tiles resampled on the mosaic grid, or None."""
    exe = shutil.which("siril-cli")
    if exe is None:
        return None
    from zemosaic_utils import reproject_and_coadd

    from astropy.io import fits

    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    present = np.zeros(shape, np.float32)
    for k, t in enumerate(tiles):
        image, _cov = reproject_and_coadd([t.image], [t.wcs], wcs, shape, [t.coverage])
        present += np.all(np.isfinite(image), axis=-1)
        # Siril 1.0 has no "no data" value: 0 is the closest (its rejection ignores it poorly).
        # Siril's float images live in [0, 1].
        scaled = np.nan_to_num(np.moveaxis(image, -1, 0)) / 65535.0
        fits.PrimaryHDU(scaled.astype(np.float32)).writeto(
            work / f"in_{k + 1}.fit", overwrite=True)
    script = work / "stack.ssf"
    script.write_text("requires 1.0.0\nconvert tile -out=.\n"
                      "stack tile_ rej n -norm=addscale -out=siril_result\n")
    subprocess.run([exe, "-d", str(work), "-s", str(script)], capture_output=True, text=True,
                   timeout=600, check=False, env=siril_env(work))
    result = work / "siril_result.fit"
    if not result.exists():
        return None
    with fits.open(result) as hdul:
        data = np.moveaxis(hdul[0].data.astype(np.float32), 0, -1) * 65535.0
    # Siril's mean divides by every tile, zeros included: rescale to the tiles present.
    with np.errstate(invalid="ignore", divide="ignore"):
        data = data * (len(tiles) / present)[..., None]
    data[present == 0] = np.nan
    return data


MONTAGE_CHANNELS = ("R", "G", "B")
TOY_NOISE = 1.0  # ADU, of the toy tiles of montage_toy_check


def _montage_header(wcs, shape):
    """Return a FITS header of a celestial WCS with the image size Montage's programs read."""
    from astropy.io import fits

    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = -64
    header["NAXIS"] = 2
    header["NAXIS1"] = int(shape[1])
    header["NAXIS2"] = int(shape[0])
    celestial = wcs.celestial
    if celestial.sip is not None or celestial.has_distortion:
        raise ValueError("Montage's header here needs a distortion-free WCS (no SIP)")
    header.extend(celestial.to_header(relax=False), update=True)
    # astropy writes PCi_j with CDELT = 1 when the grid's WCS has its scale in the PC matrix;
    # mImgtbl then reports CDELT = 1 deg/px (and mOverlaps sizes the images with it): write the
    # pixel-to-sky matrix as CDi_j, which Montage reads as the scale and rotation.
    for key in ("CDELT1", "CDELT2", "PC1_1", "PC1_2", "PC2_1", "PC2_2"):
        header.remove(key, ignore_missing=True)
    cd = celestial.pixel_scale_matrix
    for i in range(2):
        for j in range(2):
            header[f"CD{i + 1}_{j + 1}"] = float(cd[i, j])
    return header


def montage_corrected_tiles(tiles, wcs, shape, work, level_only=False):
    """Montage's background matching of the tiles on the mosaic grid, one channel at a time.

    Each tile is resampled on the mosaic grid (``zemosaic_utils.reproject_and_coadd`` with its
    coverage, as the Siril row), cut to its bounding box (the mosaic's WCS with CRPIX shifted:
    what ``mProjExec`` would write, so Montage's reprojection step is the identity) and written as
    a 2-D FITS per channel with NaN where the tile has no data (Montage's blank pixels). Then, in
    each channel's folder::

        mImgtbl proj images.tbl
        mOverlaps images.tbl diffs.tbl
        mDiffExec -n -p proj diffs.tbl mosaic.hdr diffs
        mFitExec diffs.tbl fits.tbl diffs
        mBgModel images.tbl fits.tbl corrections.tbl
        mBgExec -n -p proj images.tbl corrections.tbl corr

    ``-n``: no ``_area.fits`` companions (every pixel weighs the same in the differences; the
    co-add below weighs by coverage; ``mDiff`` still writes an area image of each difference).
    ``level_only``: ``mBgModel -l`` (offsets, no slopes).

    Returns ``(images, coverages, corrections)``: per tile the corrected ``(H, W, 3)`` float32
    image on the mosaic grid (NaN outside the tile), its resampled coverage, and per channel
    ``{tile index: (A, B, C)}`` from Montage's ``corrections.tbl`` (``mBackground`` subtracts the
    plane ``A*x + B*y + C``, x/y in pixels from CRPIX: the same sky point in every cutout), or
    None without Montage. Raises :class:`_measure.MontageError` with Montage's message when a
    step fails.
    """
    if shutil.which("mBgModel") is None:
        return None
    from astropy.io import fits
    from zemosaic_utils import reproject_and_coadd

    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    mosaic_header = _montage_header(wcs, shape)
    resampled, coverages, boxes = [], [], []
    for t in tiles:
        image, cov = reproject_and_coadd([t.image], [t.wcs], wcs, shape, [t.coverage])
        image, cov = np.asarray(image, np.float32), np.asarray(cov, np.float32)
        if cov.ndim == 3:  # coverage per channel: the co-add's weights are 2-D
            image[~(cov > 0)] = np.nan
            cov = cov.max(axis=-1)
        image[~(cov > 0)] = np.nan
        rows = np.flatnonzero(np.any(np.isfinite(image), axis=(1, 2)))
        cols = np.flatnonzero(np.any(np.isfinite(image), axis=(0, 2)))
        resampled.append(image)
        coverages.append(cov)
        boxes.append(None if rows.size == 0 else (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1))
    kept = [k for k, box in enumerate(boxes) if box is not None]
    corrected = [np.full(shape + (3,), np.nan, np.float32) for _ in tiles]
    corrections = {}
    for c, band in enumerate(MONTAGE_CHANNELS):
        cdir = work / band
        for sub in ("proj", "diffs", "corr"):
            (cdir / sub).mkdir(parents=True)
        # ASCII header template, one card a line, as Montage's .hdr files are.
        (cdir / "mosaic.hdr").write_text(
            "\n".join(card.image.rstrip() for card in mosaic_header.cards) + "\nEND\n")
        for k in kept:
            y0, y1, x0, x1 = boxes[k]
            header = _montage_header(wcs[y0:y1, x0:x1], (y1 - y0, x1 - x0))
            header["BITPIX"] = -32
            fits.PrimaryHDU(resampled[k][y0:y1, x0:x1, c], header=header).writeto(
                cdir / "proj" / f"tile_{k:03d}.fits")
        status = run_montage(["mImgtbl", "proj", "images.tbl"], cwd=cdir)
        if status.get("count") != len(kept) or status.get("badfits", 0):
            raise MontageError(f"mImgtbl ({band}) read {status.get('count')} of {len(kept)} "
                               f"tiles: {status}")
        if len(kept) > 1:
            run_montage(["mOverlaps", "images.tbl", "diffs.tbl"], cwd=cdir)
            run_montage(["mDiffExec", "-n", "-p", "proj", "diffs.tbl", "mosaic.hdr", "diffs"],
                        cwd=cdir)
            status = run_montage(["mFitExec", "diffs.tbl", "fits.tbl", "diffs"], cwd=cdir)
            if not status.get("count"):  # failed/missing ones: pairs whose overlap is all blank
                raise MontageError(f"mFitExec ({band}): no overlap could be fitted: {status}")
            run_montage(["mBgModel", *(["-l"] if level_only else []), "images.tbl", "fits.tbl",
                         "corrections.tbl"], cwd=cdir)
            status = run_montage(["mBgExec", "-n", "-p", "proj", "images.tbl", "corrections.tbl",
                                  "corr"], cwd=cdir)
            if status.get("failed", 0):
                raise MontageError(f"mBgExec ({band}): {status['failed']} image(s) failed: "
                                   f"{status}")
            names = {int(r["cntr"]): r["fname"] for r in _read_montage_table(cdir / "images.tbl")}
            corrections[band] = {int(Path(names[int(r["id"])]).stem.split("_")[1]):
                                 (r["a"], r["b"], r["c"])
                                 for r in _read_montage_table(cdir / "corrections.tbl")}
            out_dir = cdir / "corr"
        else:  # one tile: nothing to match
            out_dir = cdir / "proj"
        for k in kept:
            y0, y1, x0, x1 = boxes[k]
            path = out_dir / f"tile_{k:03d}.fits"
            if not path.exists():  # (mBgExec copies an image without overlaps unchanged)
                path = cdir / "proj" / f"tile_{k:03d}.fits"
            with fits.open(path) as hdul:
                corrected[k][y0:y1, x0:x1, c] = hdul[0].data.astype(np.float32)
    return corrected, coverages, corrections


def _read_montage_table(path):
    """Return the rows of a Montage IPAC table as dicts (numbers as float, blanks as "").

    IPAC tables are fixed-width: a value lies under its column's name, between the ``|`` of the
    first header line (values may hold spaces, e.g. ``cra`` "10h 00m 17.46s", or be blank).
    """
    bars, rows = None, []
    for line in Path(path).read_text().splitlines():
        if line.startswith("\\") or not line.strip():
            continue
        if line.startswith("|"):
            if bars is None:
                bars = [i for i, ch in enumerate(line) if ch == "|"]
                names = [line[a + 1:b].strip() for a, b in zip(bars, bars[1:])]
            continue
        cells = [line[a + 1:b + 1] for a, b in zip(bars, bars[1:])]
        cells[-1] = line[bars[-2] + 1:]  # the last value may run past the last bar
        rows.append({n: _montage_number(v.strip()) for n, v in zip(names, cells)})
    return rows


def _montage_number(text):
    try:
        return float(text)
    except ValueError:
        return text


def montage_bgmodel(tiles, wcs, shape, work, level_only=False):
    """Montage ``mBgModel`` + ``mBackground`` background matching, co-added; ``(H, W, 3)`` or None.

    The corrected tiles (:func:`montage_corrected_tiles`) are co-added here with the project's
    ``zemosaic_utils.reproject_and_coadd`` on the mosaic grid (the identity mapping), weighted by
    the tiles' coverage like the reproject-mean row, rather than with Montage's ``mAdd``: the row
    then differs from the reproject mean by Montage's background matching only. None when Montage
    is not installed.
    """
    result = montage_corrected_tiles(tiles, wcs, shape, work, level_only)
    if result is None:
        return None
    from zemosaic_utils import reproject_and_coadd

    corrected, coverages, _corrections = result
    mosaic, _cov = reproject_and_coadd(corrected, [wcs] * len(corrected), wcs, shape, coverages)
    return np.asarray(mosaic, np.float32)


def _slug(name):
    return name.replace(" ", "_").replace("%", "pc").replace("+", "")


def cached_dataset(root, **kwargs):
    """Generate ``zemosaic_synth.generate_dataset(root, **kwargs)`` unless ``root`` already holds it.

    ``root/scene.json`` records the arguments and a hash of the generator's source, written once
    the frames are complete: a rerun with the same ``--keep`` folder skips the generation, a
    changed generator or scene generates again.
    """
    root = Path(root)
    stamp = json.dumps({"options": kwargs, "generator": hashlib.sha256(
        b"".join(Path(ROOT, name).read_bytes() for name in SYNTH_SOURCES)).hexdigest()},
        sort_keys=True, default=list)
    if (root / "scene.json").exists() and (root / "scene.json").read_text() == stamp:
        return root
    for sub in ("frames", "truth"):
        shutil.rmtree(root / sub, ignore_errors=True)
    zemosaic_synth.generate_dataset(root, **kwargs)
    (root / "scene.json").write_text(stamp)
    return root


def run_zemosaic(input_folder, out, **changes):
    """Run the pipeline into a fresh ``out`` (no tile of an earlier run reused); ``(result, wall s)``."""
    shutil.rmtree(out, ignore_errors=True)
    config = config_from_dict({"input_folder": str(input_folder), "output_folder": str(out), **changes})
    t0 = time.perf_counter()
    result = zw.run_mosaic(config)
    return result, time.perf_counter() - t0


def truth_grid(root, out, wcs, shape):
    """What the gradient figures measure against on a run's grid: truth, nebula, tile footprints."""
    return {"wcs": wcs, "shape": shape, "root": root, "truth": pt.truth_on_grid(root, wcs, shape),
            "nebula": pt.nebula_on_grid(root, wcs, shape),
            "feet": pt.master_tile_footprints(out, wcs, shape, min_frames=3)}


def gradient_figures(mosaic, grid):
    """The gradient scene's figures of one mosaic (see :func:`gradient_scene`)."""
    truth, feet = grid["truth"], grid["feet"]
    steps = np.abs([e["step_sigma"] for e in pt.seam_steps(mosaic, truth, feet)])
    dips = pt.overlap_dips(mosaic, truth, feet)
    nebula = pt.nebula_flux_ratio(mosaic, grid["root"], grid["wcs"], grid["shape"], truth=truth,
                                  nebula=grid["nebula"])
    return {"worst_step": float(steps.max()) if len(steps) else np.nan,
            "median_step": float(np.median(steps)) if len(steps) else np.nan,
            "nebula": nebula["worst_deviation"], "nebula_rgb": nebula["ratio_rgb"],
            "star_spread": pt.panel_star_scales(mosaic, truth, feet)[1],
            "dip": max((abs(d["dip_sigma"]) for d in dips), default=np.nan),
            "n_edges": len(steps), "n_overlaps": len(dips)}


def perfect_like(mosaic, grid):
    """A flawless mosaic of the scene (:func:`photometry_truth.perfect_mosaic`) with the mosaic's pixel
    noise: the figures' own floor."""
    truth = grid["truth"]
    ok = np.all(np.isfinite(mosaic), axis=-1) & np.all(np.isfinite(truth), axis=-1)
    resid = pt.truth_residual(mosaic, truth, ok)[0]
    sigma = pt.pixel_noise(resid, ok & (np.sum(grid["feet"], axis=0) == 1))
    return pt.perfect_mosaic(mosaic, truth, 0, sigma=sigma)


def _same_grid(wcs, shape, grid):
    return tuple(shape) == tuple(grid["shape"]) and wcs.to_header_string() == grid["wcs"].to_header_string()


def zemosaic_rows(root, grid_of):
    """Run each :data:`GRADIENT_RUNS` setting on the scene's frames; yields ``(label, mosaic, grid, wall s)``.

    ``grid_of(out, wcs, shape)`` gives the measuring grid; the first (default) run's serves the
    others when their grids are the same (the same frames make the same grid and tiles).
    """
    grid = None
    for label, folder, changes in GRADIENT_RUNS:
        result, wall = run_zemosaic(root / "frames", root / folder, **changes)
        mosaic, wcs, _cov, _hdr = zfits.read_image_fits(result.paths["mosaic"])
        if grid is None or not _same_grid(wcs, mosaic.shape[:2], grid):
            grid = grid_of(root / folder, wcs, mosaic.shape[:2])
        yield label, mosaic, grid, wall


def peer_mosaics(out, grid):
    """The peers' mosaics of a run's master tiles (label, mosaic); a failing Montage is reported."""
    tiles = load_master_tiles(out)
    wcs, shape = grid["wcs"], grid["shape"]
    yield "reproject mean", reproject_mean(tiles, wcs, shape)
    siril = siril_addscale(tiles, wcs, shape, out.parent / "siril")
    if siril is not None:
        yield "Siril addscale", siril
    for label, level_only in (("Montage mBgModel", False), ("Montage mBgModel -l", True)):
        try:
            montage = montage_bgmodel(tiles, wcs, shape, out.parent / f"montage{'_l' * level_only}",
                                      level_only=level_only)
        except MontageError as exc:
            print(f"{label}: {exc}", flush=True)
            continue
        if montage is not None:
            yield label, montage


def gradient_scene(name, work):
    """Generate (or reuse) a gradient scene, run ZeMosaic's settings and the peers; table rows.

    Every ZeMosaic row is its own run of the same frames (output folder per setting); the peers
    co-add the default run's master tiles. Figures per row (``tests/photometry_truth.py``):
    worst and median |seam step| over the tile edges (``seam_steps``), the nebula flux ratio's
    worst deviation from 1 over R, G, B (``nebula_flux_ratio``), the tiles' star-scale spread
    (``panel_star_scales``) and the worst overlap dip (``overlap_dips``). Returns ``[(label,
    figures, wall s or None)]``, the floor (a perfect mosaic) first.
    """
    root = cached_dataset(Path(work, _slug(name)), **GRADIENT_SCENES[name])
    rows, default = [], None
    for label, mosaic, grid, wall in zemosaic_rows(root, lambda out, w, s: truth_grid(root, out, w, s)):
        if default is None:
            default = grid
            rows.append(("perfect (floor)", gradient_figures(perfect_like(mosaic, grid), grid), None))
            print(_gradient_line(name, *rows[-1]), flush=True)
        rows.append((label, gradient_figures(mosaic, grid), wall))
        print(_gradient_line(name, *rows[-1]), flush=True)
        del mosaic
    for label, mosaic in peer_mosaics(root / GRADIENT_RUNS[0][1], default):
        rows.append((label, gradient_figures(mosaic, default), None))
        print(_gradient_line(name, *rows[-1]), flush=True)
    return rows


GRADIENT_HEADER = (f"{'scene':<15} {'method':<26} {'worst |step|':>12} {'median |step|':>13} "
                   f"{'nebula dev':>10} {'star scales':>11} {'overlap dip':>11} {'run s':>6}")


def _gradient_line(scene_name, label, f, wall):
    return (f"{scene_name:<15} {label:<26} {f['worst_step']:>11.2f}σ {f['median_step']:>12.2f}σ "
            f"{100 * f['nebula']:>9.2f}% {100 * f['star_spread']:>10.2f}% {f['dip']:>10.2f}σ "
            f"{'' if wall is None else f'{wall:.1f}':>6}")


# --------------------------------------------------------------------------------------
# The real subs: steps at the edges of each night's region, without a truth
# --------------------------------------------------------------------------------------

def _robust_sigma(values):
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def star_pixels(mosaic, ok, kappa=5.0, grow_px=4):
    """Pixels of stars (and their wings) in a real mosaic: luminance over ``kappa`` sigmas above
    a median-filtered copy (7x7 on 2x2 bins: 14 px, wider than any star but the brightest
    cores), grown by ``grow_px``."""
    from scipy.ndimage import binary_dilation, median_filter

    lum = mosaic.mean(axis=-1, dtype=np.float32)
    lum = np.where(ok, lum, np.median(lum[ok]))
    h, w = lum.shape[0] // 2 * 2, lum.shape[1] // 2 * 2
    binned = lum[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    smooth = np.repeat(np.repeat(median_filter(binned, size=7), 2, axis=0), 2, axis=1)
    smooth = np.pad(smooth, ((0, lum.shape[0] - h), (0, lum.shape[1] - w)), mode="edge")
    excess = lum - smooth
    return binary_dilation(ok & (excess > kappa * _robust_sigma(excess[ok])), iterations=grow_px)


def sky_residual(mosaic, order=2):
    """``(R, clean)``: a real mosaic minus a robust smooth 2-D polynomial of degree ``order``
    (``photometry_truth.background_fit``) through its own star-free pixels, and those pixels."""
    ok = np.all(np.isfinite(mosaic), axis=-1)
    clean = ok & ~star_pixels(mosaic, ok)
    return mosaic - pt.background_fit(mosaic, clean, order=order), clean


def frame_footprint(frame_wcs, frame_shape, wcs, shape):
    """Boolean ``shape`` mask of the mosaic pixels whose centre falls in a frame (its WCS, (H, W))."""
    fh, fw = frame_shape
    xs, ys = np.linspace(-0.5, fw - 0.5, 64), np.linspace(-0.5, fh - 0.5, 64)
    border = np.concatenate([np.column_stack([xs, np.full_like(xs, y)]) for y in (ys[0], ys[-1])]
                            + [np.column_stack([np.full_like(ys, x), ys]) for x in (xs[0], xs[-1])])
    bx, by = wcs.all_world2pix(*frame_wcs.all_pix2world(border[:, 0], border[:, 1], 0), 0)
    x0, x1 = max(0, int(np.floor(bx.min())) - 2), min(shape[1], int(np.ceil(bx.max())) + 3)
    y0, y1 = max(0, int(np.floor(by.min())) - 2), min(shape[0], int(np.ceil(by.max())) + 3)
    rows, cols = np.mgrid[y0:y1, x0:x1]
    x, y = frame_wcs.all_world2pix(*wcs.all_pix2world(cols.ravel(), rows.ravel(), 0), 0)
    foot = np.zeros(shape, bool)
    foot[y0:y1, x0:x1] = ((x > -0.5) & (x < fw - 0.5) & (y > -0.5) & (y < fh - 0.5)).reshape(rows.shape)
    return foot


def night_footprints(out, report, wcs, shape):
    """Each night's union of its frames' footprints on the mosaic grid, nights in time order.

    The frames the run used, their WCS from their header or, for a frame the run solved or
    matched, from the run's WCS cache; nights are ``zemosaic_quality.observing_sessions`` of
    their DATE-OBS and EXPTIME. Returns ``(footprints, frames per night)``.
    """
    cache = za.WcsCache(str(Path(out, zw.CACHE_DIR, zw.WCS_CACHE_DIR)))
    frames = []
    for entry in report.used_frame_wcs():
        info = zfits.read_frame_info(entry["path"], require_wcs=False)
        frame_wcs = info.wcs if entry["wcs"] == "header" else cache.get(za.file_sha256(entry["path"])).wcs
        frames.append((info, frame_wcs))
    nights = sorted(zq.observing_sessions([i.date_obs for i, _ in frames], [i.exptime for i, _ in frames]),
                    key=lambda s: min(str(frames[k][0].date_obs) for k in s))
    feet = [np.any([frame_footprint(frames[k][1], frames[k][0].shape_hw, wcs, shape) for k in night], axis=0)
            for night in nights]
    return feet, [len(n) for n in nights]


def real_subs(folder, work):
    """Run :data:`REAL_RUNS` on the real subs; returns ``(lines, previews)``.

    No truth: the residual is the mosaic minus a smooth fit of its own sky (:func:`sky_residual`),
    measured across the edges of each night's region inside the other's
    (``photometry_truth.residual_seam_steps``), per channel, in sky sigmas per pixel.
    """
    lines, previews = [], []
    for label, folder_name, changes in REAL_RUNS:
        out = Path(work, "real", folder_name)
        result, wall = run_zemosaic(folder, out, **changes)
        mosaic, wcs, _cov, _hdr = zfits.read_image_fits(result.paths["mosaic"])
        feet, counts = night_footprints(out, result.report, wcs, mosaic.shape[:2])
        resid, clean = sky_residual(mosaic)
        for e in sorted(pt.residual_seam_steps(resid, clean, feet), key=lambda e: -e["tile"]):
            edge = f"night {e['tile'] + 1}'s edge in night {e['other'] + 1}"
            lines.append(f"{label:<26} {edge:<24} {e['n_segments']:>8} "
                         + " ".join(f"{z:>+6.2f}±{dz:.2f}σ" for z, dz in zip(e["step_sigma_rgb"],
                                                                          e["step_err_sigma_rgb"]))
                         + f" {abs(e['step_sigma']):>6.2f}σ {wall:>6.1f}")
            print(lines[-1], flush=True)
        previews.append((label, result.paths["preview"]))
    nights = ", ".join(f"night {k + 1}: {n} frames" for k, n in enumerate(counts))
    return [f"real subs: {folder} ({nights})", REAL_HEADER, "-" * len(REAL_HEADER)] + lines, previews


REAL_HEADER = (f"{'run':<26} {'edge':<24} {'segments':>8} {'R':>12} {'G':>12} {'B':>12} {'worst':>7} "
               f"{'run s':>6}")


def scene(name, options, frames_per_panel, work):
    """Generate a scene, run ZeMosaic on it and measure every method; returns table rows."""
    root = cached_dataset(Path(work, _slug(name)), panels=(2, 2), frames_per_panel=frames_per_panel,
                          seed=5, size="small", **BASE, **options)
    out = root / "out"
    result, _wall = run_zemosaic(root / "frames", out)
    mosaic, wcs, _cov, header = zfits.read_image_fits(result.paths["mosaic"])
    shape = mosaic.shape[:2]
    truth = pt.truth_on_grid(root, wcs, shape)
    feet = pt.master_tile_footprints(out, wcs, shape)
    tiles = load_master_tiles(out)
    two_pass, gains = zemosaic_two_pass(tiles, wcs, shape)
    methods = [("perfect (floor)", pt.perfect_mosaic(mosaic, truth, 0)),
               ("ZeMosaic", mosaic), ("ZeMosaic Two-Pass", two_pass),
               ("reproject mean", reproject_mean(tiles, wcs, shape))]
    siril = siril_addscale(tiles, wcs, shape, root / "siril")
    if siril is not None:
        methods.append(("Siril addscale", siril))
    montage = montage_bgmodel(tiles, wcs, shape, root / "montage")
    if montage is not None:
        methods += [("Montage mBgModel", montage),
                    ("Montage mBgModel -l", montage_bgmodel(tiles, wcs, shape, root / "montage_l",
                                                            level_only=True))]
    rows = [(name, label, pt.panel_figures(image, truth, feet)) for label, image in methods]
    wb = [header.get(k) for k in ("WBGAINR", "WBGAING", "WBGAINB")]
    return rows, gains, wb, pt.coefficient_figures(root, result.report.to_dict()["tiles"])


def seed_sweep(seeds, frames_per_panel, work, size="small"):
    """Return lines: the two-night scene's panel spreads from the run's own coefficients, per seed.

    One seed's figure depends on where that scene's stars fall in the overlaps; the spread over
    seeds is what the method achieves.
    """
    lines, colour = [], []
    for seed in seeds:
        root = Path(work, f"two_nights_{size}_seed{seed}")
        cached_dataset(root, panels=(2, 2), frames_per_panel=frames_per_panel, seed=seed, size=size,
                       **BASE, **SCENES["two nights"])
        result = run_zemosaic(root / "frames", root / "out")[0]
        own = pt.coefficient_figures(root, result.report.to_dict()["tiles"])
        colour.append(own["colour_spread"])
        lines.append(f"two nights, {size} frames, seed {seed:>3}: gain spread {100 * own['gain_spread']:.2f}%, "
                     f"colour spread {100 * own['colour_spread']:.2f}%")
    lines.append(f"colour spread over {len(seeds)} seeds: {100 * min(colour):.2f}-{100 * max(colour):.2f}%, "
                 f"mean {100 * float(np.mean(colour)):.2f}%")
    return lines


def _seed_range(text):
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def _scene_names(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = {**SCENES, **GRADIENT_SCENES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scene(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(known)}")
    return names


def montage_toy_check(work=None) -> int:
    """Check :func:`montage_corrected_tiles` on two overlapping toy tiles; 0 when it passes.

    A 200 x 320 px grid (TAN, 3.75"/px, turned 10 degrees) of sky (a gentle gradient) and stars;
    tile 0 covers rows 0-189 and columns 0-199, tile 1 rows 10-199 and columns 120-319 with
    ``50 + 0.1 x`` ADU added (x: mosaic column; per channel times the channel's gain
    1 / 0.9 / 1.1), noise ``TOY_NOISE`` (1 ADU). After Montage the tiles' difference in the
    overlap must be level and flat within the noise (~0.013 ADU, ~0.0007 ADU/px: the limits are
    0.1 ADU and 5 % of the added slope).
    """
    from astropy.wcs import WCS

    height, width = 200, 320
    grid = WCS(naxis=2)
    grid.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    grid.wcs.crval = [150.0, 30.0]
    grid.wcs.crpix = [width / 2 + 0.5, height / 2 + 0.5]
    grid.wcs.cdelt = [-3.75 / 3600, 3.75 / 3600]
    turn = np.radians(10.0)  # a rotated grid, as a mosaic's often is
    grid.wcs.pc = [[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    truth = 1000.0 + 0.5 * xx + 0.2 * yy
    for y, x in rng.uniform((0, 0), (height, width), (60, 2)):
        truth += 2000.0 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 4.0)
    plane = 50.0 + 0.1 * xx
    channel_gains = (1.0, 0.9, 1.1)

    def toy_tile(k, rows, cols, extra):
        image = np.stack([g * (truth + extra) + rng.normal(0, TOY_NOISE, truth.shape)
                          for g in channel_gains], axis=-1)[rows, cols].astype(np.float32)
        return zw.MasterTile(k, image, np.ones(image.shape[:2], np.float32), grid[rows, cols], "",
                             [], "", "cpu")

    tiles = [toy_tile(0, slice(0, 190), slice(0, 200), 0.0),
             toy_tile(1, slice(10, 200), slice(120, 320), plane)]
    work = Path(work or tempfile.mkdtemp(prefix="zm_montage_toy_"))
    try:
        result = montage_corrected_tiles(tiles, grid, (height, width), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if result is None:
        print("Montage is not installed (mBgModel not found)")
        return 1
    corrected, _cov, corrections = result
    overlap = np.s_[15:185, 125:195]
    ok = True
    for c, band in enumerate(MONTAGE_CHANNELS):
        before = channel_gains[c] * plane[overlap]
        after = corrected[1][overlap + (c,)] - corrected[0][overlap + (c,)]
        slope, level = np.polyfit(xx[overlap].ravel() - 160.0, after.ravel(), 1)
        passed = abs(level) < 0.1 and abs(slope) < 0.05 * 0.1 * channel_gains[c]
        ok &= passed
        print(f"{band}: added {before.min():.1f}-{before.max():.1f} ADU; after Montage the overlap "
              f"difference is {level:+.3f} ADU at column 160, slope {slope:+.4f} ADU/px, "
              f"rms {np.std(after):.2f} ADU; Montage's planes (A, B, C): "
              + "; ".join(f"{pa:+.4f}, {pb:+.5f}, {pc:+.2f}"
                          for _k, (pa, pb, pc) in sorted(corrections[band].items()))
              + ("" if passed else "  FAILED"))
    return 0 if ok else 1


def _arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames-per-panel", type=int, default=4,
                        help="frames per panel of the issue-13 scenes (the gradient scenes have their own)")
    parser.add_argument("--keep", help="folder for the scenes and runs, kept (default: a temporary one); "
                                       "a rerun with the same folder reuses the generated scenes")
    parser.add_argument("--seeds", type=_seed_range, default=[],
                        help="also sweep the two-night scene over these seeds (e.g. 5-12)")
    parser.add_argument("--sweep-size", choices=("small", "full"), default="small",
                        help="frame size of the seed sweep (full: 1080 x 1920 px, about 25 s a seed)")
    parser.add_argument("--scenes", type=_scene_names, default=None,
                        help="comma-separated scenes to run (default: " + ", ".join(SCENES).replace("%", "%%")
                             + ", or none with --real); also: " + ", ".join(GRADIENT_SCENES))
    parser.add_argument("--real", nargs="?", const=str(REAL_SUBS), metavar="DIR",
                        help=f"also run the real subs in DIR (default {REAL_SUBS}) before and after "
                             "the sky models, and measure the steps at each night's edges")
    parser.add_argument("--montage-toy", action="store_true",
                        help="only check Montage's background matching on two toy tiles, one with "
                             "a plane added, and exit")
    args = parser.parse_args(argv)
    if args.scenes is None:
        args.scenes = [] if args.real else list(SCENES)
    return args


def issue13_lines(names, frames_per_panel, work):
    """Run the issue-13 scenes; returns ``(table lines, notes)``."""
    header = (f"{'scene':<15} {'method':<19} {'gain spread':>11} {'colour spread':>13} "
              f"{'seam step':>9} {'mosaic R/G':>10} {'B/G':>6}")
    lines, notes = [header, "-" * len(header)], []
    for name in names:
        rows, gains, wb, own = scene(name, SCENES[name], frames_per_panel, work)
        for scene_name, label, f in rows:
            lines.append(f"{scene_name:<15} {label:<19} {100 * f['gain_spread']:>10.2f}% "
                         f"{100 * f['colour_spread']:>12.2f}% {f['seam_step']:>8.2f}σ "
                         f"{f['mosaic_ratios'][0]:>10.3f} {f['mosaic_ratios'][1]:>6.3f}")
        notes.append(f"{name}: Two-Pass gains {', '.join(f'{g:.4f}' for g in gains)}; "
                     f"white balance R,G,B {wb}; from the run's own coefficients: gain spread "
                     f"{100 * own['gain_spread']:.2f}%, colour spread {100 * own['colour_spread']:.2f}%")
        print("\n".join(lines[-len(rows):]), flush=True)
    return lines, notes


def gradient_lines(names, work):
    """Run the gradient scenes; returns the table's lines."""
    lines, ratios = [GRADIENT_HEADER, "-" * len(GRADIENT_HEADER)], []
    for name in names:
        rows = gradient_scene(name, work)
        lines += [_gradient_line(name, *row) for row in rows]
        ratios += [f"{name:<15} {label:<26} " + " ".join(f"{r:>7.3f}" for r in f["nebula_rgb"])
                   for label, f, _wall in rows]
    return lines + ["", f"{'nebula flux ratio':<42} {'R':>7} {'G':>7} {'B':>7}"] + ratios


def _keep_previews(previews, work, kept):
    """The previews' paths, copied out of a temporary ``work`` folder first (``kept`` False)."""
    if kept:
        return previews
    folder = Path(tempfile.mkdtemp(prefix="zm_bench_real_previews_"))
    copies = []
    for label, path in previews:
        copy = folder / f"{_slug(label.split(' (')[0])}_{Path(path).name}"
        shutil.copy2(path, copy)
        copies.append((label, str(copy)))
    return copies


def main(argv=None) -> int:
    args = _arguments(argv)
    if args.montage_toy:
        return montage_toy_check()
    work = args.keep or tempfile.mkdtemp(prefix="zm_bench_photo_")
    print("siril-cli:", shutil.which("siril-cli") or "not installed (skipped)")
    print("Montage mBgModel:", shutil.which("mBgModel") or "not installed (skipped)")
    old = [n for n in args.scenes if n in SCENES]
    new = [n for n in args.scenes if n in GRADIENT_SCENES]
    sections, notes, previews = [], [], []
    try:
        if old:
            lines, notes = issue13_lines(old, args.frames_per_panel, work)
            sections.append(lines)
        if new:
            sections.append(gradient_lines(new, work))
        if args.real and Path(args.real).is_dir():
            lines, previews = real_subs(args.real, work)
            previews = _keep_previews(previews, work, bool(args.keep))
            sections.append(lines + [f"preview, {label}: {path}" for label, path in previews])
        elif args.real:
            sections.append([f"real subs: {args.real} not found (skipped)"])
        if args.seeds:
            sections.append(seed_sweep(args.seeds, args.frames_per_panel, work, args.sweep_size))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for lines in sections[:1] + [notes] * bool(notes) + sections[1:]:
        print()
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
