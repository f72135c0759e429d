"""Photometric fidelity across panels on synthetic scenes (issue 13): ZeMosaic vs plain co-adds.

Run: ``.venv/bin/python benchmarks/bench_photometry.py [--frames-per-panel N] [--keep DIR]
[--seeds 5-12 [--sweep-size full]]``.

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
0 and its mean, which divides by every tile, is rescaled here to the tiles present). Figures (see ``tests/photometry_truth.py``): largest deviation of a
panel's flux scale from the median panel's, largest relative spread of R/G or B/G between
panels, largest residual step across a tile edge in sky-noise units, the mosaic's R/G and B/G
against the truth's. After the table, the panels' brightness and colour spreads as the run's own
coefficients make them (``photometry_truth.coefficient_figures``), free of the mosaic's noise;
with ``--seeds 5-12`` also the two-night scene's spreads over those seeds (``--sweep-size
full``: with frames of the Seestar's size, whose overlaps are as wide as a real mosaic's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _measure import siril_env  # noqa: E402
import photometry_truth as pt  # noqa: E402
import zemosaic_fits as zfits  # noqa: E402
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


def scene(name, options, frames_per_panel, work):
    """Generate a scene, run ZeMosaic on it and measure every method; returns table rows."""
    root = Path(work, name.replace(" ", "_").replace("%", "pc").replace("+", ""))
    zemosaic_synth.generate_dataset(root, panels=(2, 2), frames_per_panel=frames_per_panel,
                                    seed=5, size="small", **BASE, **options)
    out = root / "out"
    config = config_from_dict({"input_folder": str(root / "frames"), "output_folder": str(out)})
    result = zw.run_mosaic(config)
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
        zemosaic_synth.generate_dataset(root, panels=(2, 2), frames_per_panel=frames_per_panel,
                                        seed=seed, size=size, **BASE, **SCENES["two nights"])
        config = config_from_dict({"input_folder": str(root / "frames"), "output_folder": str(root / "out")})
        own = pt.coefficient_figures(root, zw.run_mosaic(config).report.to_dict()["tiles"])
        colour.append(own["colour_spread"])
        lines.append(f"two nights, {size} frames, seed {seed:>3}: gain spread {100 * own['gain_spread']:.2f}%, "
                     f"colour spread {100 * own['colour_spread']:.2f}%")
    lines.append(f"colour spread over {len(seeds)} seeds: {100 * min(colour):.2f}-{100 * max(colour):.2f}%, "
                 f"mean {100 * float(np.mean(colour)):.2f}%")
    return lines


def _seed_range(text):
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames-per-panel", type=int, default=4)
    parser.add_argument("--keep", help="folder for the scenes (default: a temporary one)")
    parser.add_argument("--seeds", type=_seed_range, default=[],
                        help="also sweep the two-night scene over these seeds (e.g. 5-12)")
    parser.add_argument("--sweep-size", choices=("small", "full"), default="small",
                        help="frame size of the seed sweep (full: 1080 x 1920 px, about 25 s a seed)")
    args = parser.parse_args(argv)
    work = args.keep or tempfile.mkdtemp(prefix="zm_bench_photo_")
    print("siril-cli:", shutil.which("siril-cli") or "not installed (skipped)")
    header = (f"{'scene':<15} {'method':<19} {'gain spread':>11} {'colour spread':>13} "
              f"{'seam step':>9} {'mosaic R/G':>10} {'B/G':>6}")
    lines = [header, "-" * len(header)]
    notes = []
    try:
        for name, options in SCENES.items():
            rows, gains, wb, own = scene(name, options, args.frames_per_panel, work)
            for scene_name, label, f in rows:
                lines.append(f"{scene_name:<15} {label:<19} {100 * f['gain_spread']:>10.2f}% "
                             f"{100 * f['colour_spread']:>12.2f}% {f['seam_step']:>8.2f}σ "
                             f"{f['mosaic_ratios'][0]:>10.3f} {f['mosaic_ratios'][1]:>6.3f}")
            notes.append(f"{name}: Two-Pass gains {', '.join(f'{g:.4f}' for g in gains)}; "
                         f"white balance R,G,B {wb}; from the run's own coefficients: gain spread "
                         f"{100 * own['gain_spread']:.2f}%, colour spread {100 * own['colour_spread']:.2f}%")
            print("\n".join(lines[-len(rows):]), flush=True)
        sweep = seed_sweep(args.seeds, args.frames_per_panel, work, args.sweep_size) if args.seeds else []
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(lines))
    print()
    print("\n".join(notes))
    if sweep:
        print()
        print("\n".join(sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
