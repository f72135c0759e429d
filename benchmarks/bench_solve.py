"""Plate solving: seconds per solved frame, and "solve few, match many" against solving every frame.

Run: ``.venv/bin/python benchmarks/bench_solve.py [--panels 2x2] [--frames-per-panel 12] [--data DIR]
[--no-solve-every]``; issue 22's night: ``--panels 3x3 --frames-per-panel 40 --no-solve-every``.

Two tables:

1. astrometry.net (``solve-field``, 2x2 superpixel, hints from the header) on the shared real
   Seestar subs (``../shared/realdata/ngc7023``, when present) and on synthetic frames of the real
   sky: seconds per frame and the distance to the reference solution (median over the frame, px).
2. The solve phase on a synthetic night written as a Seestar writes it (no WCS, pointing off by up
   to 0.25 deg; 48 full-size frames by default): frames per second and accuracy against the truth
   of ZeMosaic's "solve few, match many" and of solving every frame, side by side, with the
   share of the machine's cores each kept busy (this process, its workers and the solver runs).

``--data DIR`` keeps the synthetic frames in ``DIR/<panels>x<frames>-seed<seed>`` (made on first
use) instead of a temporary folder: a 360-frame night takes minutes to write.

Needs astrometry.net and its Tycho-2 index files (``make system-deps``); exits with a message
otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import zemosaic_astrometry as za  # noqa: E402
import zemosaic_fits as zf  # noqa: E402
import zemosaic_solve as zsolve  # noqa: E402
import zemosaic_synth  # noqa: E402
import zemosaic_worker as zw  # noqa: E402
from _measure import fmt, load_warning, print_table  # noqa: E402
from astropy.wcs import WCS  # noqa: E402
from realdata import NGC7023 as REALDATA, reference_frames, reference_wcs  # noqa: E402
from zemosaic_config import MosaicConfig  # noqa: E402
from zemosaic_synth_sky import make_tan_wcs  # noqa: E402
from zemosaic_utils import usable_cores  # noqa: E402



def _synthetic_truths(info) -> dict[str, WCS]:
    meta = json.loads(Path(info["truth_json"]).read_text())
    return {path: make_tan_wcs(fr["center_ra"], fr["center_dec"], fr["rotation_deg"],
                               info["frame_shape"], meta["pixel_scale_arcsec"])
            for fr, path in zip(meta["frames"], info["frame_paths"])}


def solve_each(paths, truths, solver) -> list[tuple[str, float | None, float | None]]:
    """Return ``(name, seconds, offset px)`` of solving every frame on its own (None: failed)."""
    rows = []
    for path in paths:
        raw = zf.load_frame(path, debayer=False, require_wcs=False)
        hints = za.hints_from_header(raw.header)
        t0 = time.perf_counter()
        try:
            wcs = za.solve_frame(solver, raw.data, hints, 60)
        except za.SolveError:
            rows.append((os.path.basename(path), None, None))
            continue
        seconds = time.perf_counter() - t0
        rows.append((os.path.basename(path), seconds,
                     za.wcs_pixel_offset(wcs, truths[path], raw.data.shape[:2])))
    return rows


def _cpu_seconds() -> float:
    """Return the CPU time of this process and of its finished children (workers, solver runs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def solve_phase(frames_dir, truths, force_solve_all: bool):
    """Run the solve phase; return ``(seconds, solver runs, offsets px, frames, CPU seconds)``."""
    with tempfile.TemporaryDirectory(prefix="zm_bench_solve_") as out:
        config = MosaicConfig(input_folder=frames_dir, output_folder=out)
        run = zw.Run(config)
        records = zw.scan_frames(run)
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        if force_solve_all:
            state = zsolve._Solving(za.solver_from_config(config)[0], run, len(records),
                                   zw.wcs_cache_folder(config))
            for r in records:
                state.solve(r)
            runs = state.solves
        else:
            records = zw.solve_frames(run, records)
            runs = sum(r.wcs_source == "solved" for r in records)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    offsets = [za.wcs_pixel_offset(r.wcs, truths[r.path], r.info.shape_hw) for r in records
               if r.wcs is not None]
    return seconds, runs, np.array(offsets), len(records), cpu


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--panels", default="2x2")
    parser.add_argument("--frames-per-panel", type=int, default=12)
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--data", help="folder keeping the synthetic frames between runs")
    parser.add_argument("--no-solve-every", action="store_true",
                        help="leave out the row that solves every frame (minutes per hundred frames)")
    args = parser.parse_args(argv)
    solver = za.AstrometryNetSolver()
    reason = solver.unavailable_reason()
    if reason:
        print(f"bench_solve: no plate solver ({reason}); {za.INSTALL_HINT}")
        return 1
    warning = load_warning()
    if warning:
        print(warning)
    nx, ny = (int(v) for v in args.panels.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="zm_bench_sky_") as scratch:
        info = _dataset(args.data or scratch, (nx, ny), args.frames_per_panel, args.seed)
        truths = _synthetic_truths(info)
        rows = []
        if REALDATA.is_dir():
            real_truths = {str(REALDATA / n): reference_wcs(e) for n, e in reference_frames().items()}
            for name, sec, off in solve_each(sorted(real_truths), real_truths, solver):
                rows.append(["real " + name[-28:], fmt(sec), fmt(off, ".3f")])
        for name, sec, off in solve_each(info["frame_paths"][::args.frames_per_panel], truths, solver):
            rows.append(["synthetic " + name, fmt(sec), fmt(off, ".3f")])
        print_table(["frame", "solve s", "offset px"], rows,
                    "astrometry.net solve-field per frame (2x2 superpixel, RA/DEC and scale hints); "
                    "offset = median distance to the reference solution")
        print()
        table, cores = [], usable_cores()
        methods = [("ZeMosaic: solve few, match many", False)]
        if not args.no_solve_every:
            methods.append(("solve every frame", True))
        for label, force in methods:
            seconds, runs, offsets, n, cpu = solve_phase(info["frames_dir"], truths, force)
            table.append([label, str(n), str(runs), fmt(seconds, ".1f"), fmt(seconds / n, ".3f"),
                          f"{100 * cpu / seconds / cores:.0f}%", fmt(float(np.median(offsets)), ".3f"),
                          fmt(float(offsets.max()), ".3f")])
        print_table(["method", "frames", "solver runs", "seconds", "s/frame", "cores busy", "median px",
                     "max px"], table,
                    f"Solve phase on {info['n_frames']} full-size frames without WCS ({args.panels} panels, "
                    f"{cores} cores); accuracy against the true WCS")
        if len(table) == 2:
            print(f"speed-up of solve few, match many: {float(table[1][3]) / float(table[0][3]):.1f}x")
    return 0


def _dataset(root: str, panels, frames_per_panel: int, seed: int) -> dict:
    """Return the synthetic night's ``generate_dataset`` info, written under ``root`` on first use."""
    folder = os.path.join(root, f"{panels[0]}x{panels[1]}x{frames_per_panel}-seed{seed}")
    done = os.path.join(folder, "info.json")
    if os.path.exists(done):
        return json.loads(Path(done).read_text())
    t0 = time.perf_counter()
    info = zemosaic_synth.generate_dataset(folder, panels=panels, frames_per_panel=frames_per_panel,
                                           seed=seed, size="full", star_catalog="tycho2",
                                           write_wcs=False, pointing_error_deg=0.25, satellite=False)
    print(f"{info['n_frames']} synthetic real-sky frames written in {time.perf_counter() - t0:.0f} s")
    Path(done).write_text(json.dumps(info, default=str))
    return info


if __name__ == "__main__":
    sys.exit(main())
