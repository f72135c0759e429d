"""The whole pipeline beside Siril on the same synthetic frames: frames/s, peak RSS, phases.

Run: ``.venv/bin/python benchmarks/bench_pipeline.py [--data DIR] [--frames-per-panel N]
[--workers N] [--no-siril]``. The dataset (full-size synthetic Seestar frames, 2x2 panels) is
generated when DIR holds none. ``--real`` runs raw subs as the telescope writes them instead (no
WCS, so the solve phase runs): the shared real subs (``../shared/realdata/ngc7023``, when
present) and a look-alike of a real two-night field (:func:`look_alike`, made once under
``--real-data``), each with the default worker count beside Siril.

Rows:

* ZeMosaic end to end (scan, master tiles, grid, assembly, write; no plate solving: the frames
  carry their WCS) with ``num_processing_workers`` 1 (in-process) and N (a process pool; default
  one per core). Peak RSS is sampled every 10 ms over the process and its worker processes.
* Siril 1.0.6 (``siril-cli``), panel by panel as Siril stacks one field at a time: ``convert
  ... -debayer``, ``register``, ``stack r_... rej w 3 3 -norm=addscale``. Its frames/s count
  only the frames it registered and stacked: a frame it fails to register is counted against it.

Each row runs in a fresh child process (``_measure.run_child``), so peak RSS is its own.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zemosaic_synth  # noqa: E402
from _measure import (fmt, load_warning, print_table, report_result, rss_tree_bytes,  # noqa: E402
                      run_child, run_python_worker, siril_env)
from zemosaic_config import config_from_dict  # noqa: E402
from zemosaic_executor import resolve_workers  # noqa: E402
from zemosaic_worker import PHASES, run_mosaic  # noqa: E402

# Siril reports its own execution time for these commands (convert reports none).
SIRIL_PHASES = ("register", "stack")


class PhaseMemory:
    """Samples RSS (process and workers) in a thread; keeps the peak per phase named by progress."""

    def __init__(self):
        self.phase = "start"
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = rss_tree_bytes()
            if rss is not None:
                self.peak[self.phase] = max(self.peak.get(self.phase, 0), rss)
            time.sleep(0.01)

    def progress(self, phase, done, total, message=""):
        self.phase = phase

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def zemosaic_worker(frames_dir: str, workers: int) -> int:
    """Child side: one pipeline run; prints the RESULT line (timings, peaks, frames)."""
    with tempfile.TemporaryDirectory() as out:
        config = config_from_dict({"input_folder": frames_dir, "output_folder": out,
                                   "num_processing_workers": workers})
        with PhaseMemory() as mem:
            t0 = time.perf_counter()
            result = run_mosaic(config, progress=mem.progress)
            total = time.perf_counter() - t0
    report = result.report
    report_result(wall_s=total, timings=report.timings_s, peaks=mem.peak,
                  frames_used=len(report.frames_used), tiles=len(report.tiles),
                  executor=report.backends.get("tile_executor", "?"))
    return 0


# --------------------------------------------------------------------------------------------------
# Siril
# --------------------------------------------------------------------------------------------------

SIRIL_SCRIPT = """requires 1.0.0
setext fits
convert light -debayer -out=work
cd work
register light
stack r_light rej w 3 3 -norm=addscale -out=result
"""


def _siril_command_seconds(log: str) -> dict[str, float]:
    """Return each script command's own 'Execution time' (s) from a Siril log."""
    seconds: dict[str, float] = {}
    command = None
    for line in log.splitlines():
        m = re.search(r"Running command: (\w+)", line)
        if m:
            command = m.group(1)
            continue
        m = re.search(r"log: Execution time: (?:(\d+) min )?([\d.]+) (ms|s)", line)
        if m and command in SIRIL_PHASES:
            value = float(m.group(2)) / (1000.0 if m.group(3) == "ms" else 1.0)
            seconds[command] = seconds.get(command, 0.0) + 60 * float(m.group(1) or 0) + value
            command = None
    return seconds


def _siril_panels(frames_dir: str) -> dict[str, list[str]]:
    """Return the frames of each panel: the synthetic datasets' ``Light_panelPP_NNN.fits`` by
    panel, any other folder (real subs of one field) as one panel."""
    panels: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(frames_dir, "Light_panel*_*.fits"))):
        panels.setdefault(os.path.basename(path).split("_")[1], []).append(path)
    if not panels:
        frames = sorted(p for p in glob.glob(os.path.join(frames_dir, "*")) if p.lower().endswith((".fit", ".fits")))
        panels = {"field": frames} if frames else {}
    return panels


def run_siril(exe: str, frames_dir: str, work: str) -> dict:
    """Convert, register and stack each panel with Siril; returns the totals over the panels."""
    panels = _siril_panels(frames_dir)
    totals = {"frames": 0, "registered": 0, "failed": 0, "wall_s": 0.0, "peak_rss_bytes": 0,
              "phases": dict.fromkeys(SIRIL_PHASES, 0.0), "errors": [], "panels": len(panels)}
    for name, paths in panels.items():
        folder = os.path.join(work, name)
        os.makedirs(folder)
        for path in paths:
            os.symlink(path, os.path.join(folder, os.path.basename(path)))
        with open(os.path.join(folder, "run.ssf"), "w") as fh:
            fh.write(SIRIL_SCRIPT)
        run = run_child([exe, "-d", folder, "-s", os.path.join(folder, "run.ssf")], env=siril_env(folder))
        log = run.stdout + run.stderr
        totals["frames"] += len(paths)
        totals["wall_s"] += run.wall_s
        totals["peak_rss_bytes"] = max(totals["peak_rss_bytes"], run.peak_rss_bytes)
        m = re.search(r"Total: (\d+) failed, (\d+) registered", log)
        stacked = os.path.exists(os.path.join(folder, "work", "result.fits"))
        registered = int(m.group(2)) if m and stacked else 0
        totals["registered"] += registered
        totals["failed"] += len(paths) - registered
        for phase, s in _siril_command_seconds(log).items():
            totals["phases"][phase] += s
        if not stacked:
            totals["errors"].append(f"panel {name}: no stack (exit {run.returncode}): {run.tail(3)}")
    return totals


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _zemosaic_row(frames_dir: str, workers: int) -> dict:
    run = run_python_worker(os.path.abspath(__file__), ["--worker", frames_dir, workers])
    if not run.ok or not run.result:
        raise SystemExit(f"ZeMosaic run with {workers} worker(s) failed:\n{run.tail()}")
    return {**run.result, "peak_rss_bytes": max(run.peak_rss_bytes,
                                                max(run.result["peaks"].values(), default=0))}


REAL_SUBS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "shared", "realdata", "ngc7023")


def look_alike(root: str) -> str:
    """Return the frames folder of issue 22's look-alike of a real two-night field (made once).

    50 full-size raw subs without WCS of one field, the real Tycho-2 stars where they are: 25 of
    one night, then 25 of a night whose field is turned 70 deg (an alt-az mount on another
    night), each night drifting 1 deg. The nights share the seed (the same faint stars), so their
    noise draws repeat: a speed benchmark's data, not a test of stacking.
    """
    folder = os.path.join(root, "look-alike")
    frames = os.path.join(folder, "frames")
    if os.path.exists(os.path.join(folder, "done")):
        return frames
    os.makedirs(frames, exist_ok=True)
    for night, (turn, start) in enumerate(((0.0, "2024-07-30T22:00:00"), (70.0, "2024-07-31T22:30:00")), 1):
        info = zemosaic_synth.generate_dataset(os.path.join(folder, f"night{night}"), panels=(1, 1),
                                               frames_per_panel=25, seed=7, size="full", write_wcs=False,
                                               star_catalog="tycho2", pointing_error_deg=0.05,
                                               base_rotation_deg=turn, rotation_drift_deg=1.0, start_time=start)
        for path in info["frame_paths"]:
            os.symlink(path, os.path.join(frames, f"night{night}_{os.path.basename(path)}"))
    open(os.path.join(folder, "done"), "w").close()
    return frames


def compare(frames_dir: str, worker_counts, siril: str | None, title: str) -> None:
    """Run ZeMosaic (one row per worker count) and Siril on one folder of frames; print the tables."""
    n_frames = sum(len(paths) for paths in _siril_panels(frames_dir).values())
    print(f"{title}: {n_frames} frames in {frames_dir}", flush=True)
    rows, zm = [], {}
    for workers in worker_counts:
        zm[workers] = _zemosaic_row(frames_dir, workers)
        print(f"  ZeMosaic, {workers} worker(s): {zm[workers]['wall_s']:.2f} s", flush=True)
    sr = None
    if siril:
        with tempfile.TemporaryDirectory(prefix="bench_siril_") as work:
            sr = run_siril(siril, frames_dir, work)
        print(f"  Siril: {sr['wall_s']:.2f} s", flush=True)
    siril_fps = sr["registered"] / sr["wall_s"] if sr and sr["wall_s"] else None
    for workers, r in zm.items():
        fps = r["frames_used"] / r["wall_s"]
        rows.append([f"ZeMosaic, {workers} worker(s) ({r['executor']})", n_frames, r["frames_used"],
                     f"{r['wall_s']:.2f}", f"{fps:.2f}",
                     fmt(fps / siril_fps if siril_fps else None, ".2f") + "x",
                     f"{r['peak_rss_bytes'] / 2**20:.0f}"])
    if sr:
        rows.append(["Siril convert+register+stack", sr["frames"], sr["registered"],
                     f"{sr['wall_s']:.2f}", fmt(siril_fps, ".2f"), "1.00x",
                     f"{sr['peak_rss_bytes'] / 2**20:.0f}"])
    print()
    print_table(["method", "frames in", "stacked", "wall s", "frames/s", "vs Siril", "peak RSS MB"],
                rows, title=f"{title}, end to end (frames/s = frames stacked / wall s)")

    print()
    phase_rows = []
    for phase in PHASES:
        cells = [phase]
        for r in zm.values():
            t = r["timings"].get(phase, 0.0)
            peak = r["peaks"].get(phase)
            cells += [f"{t:.2f}", f"{t / r['wall_s']:.0%}", fmt(peak / 2**20 if peak else None, ".0f")]
        phase_rows.append(cells)
    headers = ["phase"]
    for workers in zm:
        headers += [f"{workers}w s", f"{workers}w share", f"{workers}w peak MB"]
    print_table(headers, phase_rows, title="ZeMosaic per phase (peak RSS: process + workers)")
    if sr:
        print()
        other = sr["wall_s"] - sum(sr["phases"].values())
        split = [[p, f"{s:.2f}", f"{s / sr['wall_s']:.0%}"] for p, s in sr["phases"].items()]
        split.append(["convert + debayer, start-up", f"{other:.2f}", f"{other / sr['wall_s']:.0%}"])
        print_table(["Siril phase", "s", "share"], split,
                    title=f"Siril per phase (its own execution times, {sr['panels']} panels)")
        print(f"- Siril registered {sr['registered']} of {sr['frames']} frames ({sr['failed']} failed)")
        for error in sr["errors"]:
            print(f"- Siril: {error}")
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo/data", help="dataset folder (generated if empty)")
    parser.add_argument("--frames-per-panel", type=int, default=6)
    parser.add_argument("--size", default="full", choices=["full", "small"])
    parser.add_argument("--workers", type=int, default=0, help="N for the parallel row (0 = cores)")
    parser.add_argument("--no-siril", action="store_true", help="leave Siril out")
    parser.add_argument("--real", action="store_true",
                        help="raw subs without WCS instead: the shared real subs and the two-night look-alike")
    parser.add_argument("--real-data", default="/tmp/zemosaic-bench/pipeline",
                        help="where --real keeps its look-alike (made once)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return zemosaic_worker(args.worker[0], int(args.worker[1]))
    n_workers = resolve_workers(args.workers)
    warning = load_warning()
    if warning:
        print(warning)
    siril = None if args.no_siril else shutil.which("siril-cli")
    print(f"{os.cpu_count()} cores; Siril: {siril or 'not installed or left out (skipped)'}", flush=True)
    if args.real:
        if os.path.isdir(REAL_SUBS):
            compare(REAL_SUBS, [n_workers], siril, "Shared real subs (ngc7023, two nights, 2 without WCS)")
        else:
            print(f"no shared real subs at {REAL_SUBS} (skipped)")
        compare(look_alike(args.real_data), [n_workers], siril,
                "Look-alike: 50 raw subs without WCS, two nights, the second turned 70 deg")
        return 0
    frames_dir = os.path.abspath(os.path.join(args.data, "frames"))
    if not os.path.isdir(frames_dir):
        print(f"generating the dataset in {args.data} ...", flush=True)
        zemosaic_synth.generate_dataset(args.data, panels=(2, 2), frames_per_panel=args.frames_per_panel,
                                        seed=1, size=args.size)
    compare(frames_dir, sorted({1, n_workers}), siril, f"Synthetic frames with WCS ({args.size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
