"""Thousands of frames: seconds per frame, peak RSS and disk per phase at 100, 500 and 2,000 raw subs.

Run: ``.venv/bin/python benchmarks/bench_scale.py [--frames 100,500,2000] [--data DIR]``.

Each night is synthetic raw subs as a Seestar writes them: full size, no WCS, the real Tycho-2
stars where they are (so they plate-solve; needs ``solve-field`` and its index files, as
``make system-deps`` installs), 2x2 panels of N/4 frames, pointing off by up to 0.05 deg. They
are made once under ``DIR/<N>`` (default ``/tmp/zemosaic-bench/scale``, outside the repository;
2,000 frames are 8 GB). Each night runs once, default settings, in a child process of its own
(``run_mosaic`` with progress): the seconds of each phase from the run report, the peak RSS of
each phase (the process and its workers, sampled every 10 ms) and the peak disk the output
folder held during it (its tiles and caches, sampled every 0.5 s).

The last table asks issue 22's question: is the time linear in N (each phase's seconds per
frame at the largest N within 20 % of the smallest's) and is the memory flat?
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import zemosaic_synth  # noqa: E402
from _measure import fmt, load_warning, print_table, report_result, run_python_worker  # noqa: E402
from bench_pipeline import PhaseMemory  # noqa: E402
from zemosaic_config import config_from_dict  # noqa: E402
from zemosaic_worker import PHASES, run_mosaic  # noqa: E402

# The phases as the table groups them (grouping is instant; the grid is part of the assembly).
PHASE_GROUPS = {"scan": ("scan",), "solve": ("solve",), "master tiles": ("group", "master_tiles"),
                "assembly": ("grid", "assembly", "write")}


def _folder_bytes(folder: str) -> int:
    """Return the bytes of the files under ``folder`` (files removed while walking are left out)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class PhaseDisk(PhaseMemory):
    """:class:`PhaseMemory` that also keeps the peak bytes an output folder holds per phase."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder, self.disk_peak = folder, {}
        self._disk_thread = threading.Thread(target=self._sample_disk, daemon=True)

    def _sample_disk(self):
        while not self._stop.is_set():
            used = _folder_bytes(self.folder)
            self.disk_peak[self.phase] = max(self.disk_peak.get(self.phase, 0), used)
            time.sleep(0.5)

    def __enter__(self):
        self._disk_thread.start()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._disk_thread.join()


def night(root: str, n: int) -> str:
    """Return the frames folder of the ``n``-frame night (written on first use)."""
    folder = os.path.join(root, str(n))
    if not os.path.exists(os.path.join(folder, "done")):
        t0 = time.perf_counter()
        zemosaic_synth.generate_dataset(folder, panels=(2, 2), frames_per_panel=n // 4, seed=22, size="full",
                                        write_wcs=False, star_catalog="tycho2", pointing_error_deg=0.05)
        open(os.path.join(folder, "done"), "w").close()
        print(f"{n} frames written in {time.perf_counter() - t0:.0f} s")
    return os.path.join(folder, "frames")


def worker(frames_dir: str) -> int:
    """Child side: one default run of the night; prints the RESULT line."""
    with tempfile.TemporaryDirectory(prefix="zm_bench_scale_") as out:
        config = config_from_dict({"input_folder": frames_dir, "output_folder": out})
        with PhaseDisk(out) as sampler:
            t0 = time.perf_counter()
            result = run_mosaic(config, progress=sampler.progress)
            wall = time.perf_counter() - t0
    report = result.report
    report_result(wall_s=wall, timings=report.timings_s, peaks=sampler.peak, disk=sampler.disk_peak,
                  frames=len(report.frames_used), skipped=len(report.frames_skipped), tiles=len(report.tiles))
    return 0


def _seconds(run: dict, parts) -> float:
    """Return a run's seconds in the phases ``parts`` (None: end to end)."""
    return run["wall_s"] if parts is None else sum(run["timings"].get(p, 0.0) for p in parts)


def _peak(run: dict, key: str, parts) -> float:
    """Return a run's peak ``key`` ("peaks": RSS, "disk": bytes) over the phases ``parts`` (None: all)."""
    values = run[key]
    return max((values.get(p, 0) for p in (values if parts is None else parts)), default=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", default="100,500,2000", help="comma-separated night sizes")
    parser.add_argument("--data", default="/tmp/zemosaic-bench/scale")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    from zemosaic_astrometry import AstrometryNetSolver

    reason = AstrometryNetSolver().unavailable_reason()
    if reason:
        print(f"bench_scale: the nights have no WCS and need a plate solver ({reason}); `make system-deps`")
        return 1
    warning = load_warning()
    if warning:
        print(warning)
    assert set(p for parts in PHASE_GROUPS.values() for p in parts) == set(PHASES)
    sizes = sorted(int(v) for v in args.frames.split(","))
    runs = {}
    for n in sizes:
        frames = night(args.data, n)
        child = run_python_worker(os.path.abspath(__file__), ["--worker", frames])
        if not child.ok or not child.result:
            raise SystemExit(f"{n} frames: the run failed:\n{child.tail()}")
        runs[n] = child.result
    rows = []
    for n, run in runs.items():
        for phase, parts in [*PHASE_GROUPS.items(), ("end to end", None)]:
            rows.append([str(n), phase, fmt(_seconds(run, parts), ".1f"),
                         fmt(_seconds(run, parts) / run["frames"], ".3f"),
                         fmt(_peak(run, "peaks", parts) / 2**20, ".0f"), fmt(_peak(run, "disk", parts) / 2**20, ".0f")])
    print_table(["frames", "phase", "seconds", "s/frame", "peak RSS MB", "peak disk MB"], rows,
                title=f"Raw subs without WCS, 2x2 panels, default settings, {os.cpu_count()} cores "
                      f"(frames used: {', '.join(str(r['frames']) for r in runs.values())})")
    if len(runs) > 1:
        small, large = runs[sizes[0]], runs[sizes[-1]]
        lines = []
        for phase, parts in [*PHASE_GROUPS.items(), ("end to end", None)]:
            ratio = (_seconds(large, parts) / large["frames"]) / (_seconds(small, parts) / small["frames"])
            rss = _peak(large, "peaks", parts) / max(1, _peak(small, "peaks", parts))
            lines.append([phase, fmt(ratio), "yes" if ratio <= 1.2 else "no", fmt(rss)])
        print()
        print_table(["phase", f"s/frame at {sizes[-1]} / at {sizes[0]}", "within 20 %",
                     f"peak RSS at {sizes[-1]} / at {sizes[0]}"], lines, title="Linear in N? Flat in memory?")
    return 0


if __name__ == "__main__":
    sys.exit(main())
