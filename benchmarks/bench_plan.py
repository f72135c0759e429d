"""The run planner (``--plan``) beside the runs it predicts: seconds per phase, peak memory, disk.

Run: ``.venv/bin/python benchmarks/bench_plan.py [--data DIR] [--headers N] [--quick]``.

Datasets (made once under DIR, default ``/tmp/zemosaic-bench/plan``, outside the repository):

* ``wcs``: 2x2 panels x 10 full-size synthetic frames that carry their WCS;
* ``raw``: the same scene as the telescope writes it, no WCS (plate-solved; needs solve-field
  and the Tycho-2 index files, otherwise skipped), real stars from the index files;
* ``real``: the six shared real subs of ``../shared/realdata/ngc7023`` (two nights, two
  without WCS), when present.

Each is planned, then run once in a child process (peak RSS sampled every 10 ms over the
process and its workers, disk: the output folder after the run). The plan's own speed is timed
on N header-only copies of a raw sub's header (default 2,000), 3x3 pointings with dithers.
The last table gives the costs (``zemosaic_plan.MachineCosts``) these runs measure, to compare
with the constants the planner uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402

import zemosaic_plan as zplan  # noqa: E402
import zemosaic_synth  # noqa: E402
from _measure import fmt, load_warning, print_table, report_result, run_python_worker  # noqa: E402
from bench_pipeline import PhaseMemory  # noqa: E402
from zemosaic_config import config_from_dict  # noqa: E402
from zemosaic_worker import run_mosaic  # noqa: E402

REAL_SUBS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "shared", "realdata", "ngc7023")
PHASE_GROUPS = {"scan": ("scan",), "solve": ("solve",), "master_tiles": ("group", "master_tiles"),
                "assembly": ("grid", "assembly", "write")}


def _dataset(root: str, name: str, quick: bool) -> str | None:
    """Return the frames folder of dataset ``name`` (made on first use), None when unavailable."""
    if name == "real":
        return REAL_SUBS if os.path.isdir(REAL_SUBS) else None
    folder = os.path.join(root, f"{name}{'-quick' if quick else ''}")
    frames = os.path.join(folder, "frames")
    if os.path.isdir(frames) and os.path.exists(os.path.join(folder, "done")):
        return frames
    options = {}
    if name == "raw":
        from zemosaic_astrometry import AstrometryNetSolver, SolveError

        try:
            AstrometryNetSolver()
        except SolveError:
            return None
        options = {"write_wcs": False, "star_catalog": "tycho2"}
    zemosaic_synth.generate_dataset(folder, panels=(2, 2), frames_per_panel=4 if quick else 10, seed=3,
                                    size="full", **options)
    open(os.path.join(folder, "done"), "w").close()
    return frames


def _disk_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def worker(frames_dir: str) -> int:
    """Child side: plan, then run; prints the RESULT line."""
    with tempfile.TemporaryDirectory() as out:
        config = config_from_dict({"input_folder": frames_dir, "output_folder": out})
        plan = zplan.plan_run(config)
        with PhaseMemory() as mem:
            result = run_mosaic(config, progress=mem.progress)
        disk = _disk_bytes(out)
    report = result.report
    report_result(plan=zplan.plan_to_dict(plan), timings=report.timings_s, peaks=mem.peak, disk_bytes=disk,
                  frames=len(report.frames_used), tiles=len(report.tiles),
                  mosaic_hw=list(report.mosaic_shape[1:]) if report.mosaic_shape else None,
                  solver_runs=sum(e["wcs"] == "solved" for e in report.to_dict()["frame_wcs"]))
    return 0


def _headers_folder(root: str, n: int) -> str:
    """Return a folder of ``n`` header-only copies of a raw sub's header (made on first use)."""
    folder = os.path.join(root, f"headers-v2-{n}")
    if os.path.exists(os.path.join(folder, "done")):
        return folder
    os.makedirs(folder, exist_ok=True)
    header = fits.Header({"SIMPLE": True, "BITPIX": 16, "NAXIS": 2, "NAXIS1": 1080, "NAXIS2": 1920,
                          "BZERO": 32768, "BAYERPAT": "GRBG", "INSTRUME": "Seestar S50", "EXPTIME": 10.0,
                          "XPIXSZ": 2.9, "FOCALLEN": 250.0})
    rng = np.random.default_rng(1)
    for i in range(n):
        panel = i * 9 // n
        # Panels 0.55 deg apart on the sky (a Seestar field is 0.72 x 1.28 deg).
        header["RA"] = 315.0 + 0.55 / np.cos(np.radians(68.9)) * (panel % 3) + rng.normal(0, 0.005)
        header["DEC"] = 68.0 + 0.9 * (panel // 3) + rng.normal(0, 0.005)
        header["DATE-OBS"] = str(np.datetime64("2024-07-30T22:00:00") + np.timedelta64(11 * i, "s"))
        # Header-only: the plan reads no pixel (the run would skip these files as truncated).
        with open(os.path.join(folder, f"Light_{i:05d}.fit"), "wb") as fh:
            fh.write(header.tostring().encode("ascii"))
    open(os.path.join(folder, "done"), "w").close()
    return folder


def _measured_costs(run: dict, frame_mpx: float) -> dict:
    """Return the costs one run measures, comparable with :class:`zemosaic_plan.MachineCosts`."""
    t, plan = run["timings"], run["plan"]
    h, w = run["mosaic_hw"]
    frames = run["frames"]
    return {"scan_s": t.get("scan", 0) / max(frames, 1),
            "tile_s_per_mpx (x speed-up)": t.get("master_tiles", 0) / (frames * frame_mpx)
            * (1 + zplan.COSTS.parallel_efficiency * (min(plan["workers"], os.cpu_count()) - 1)),
            "assembly_s_per_mpx": sum(t.get(p, 0) for p in PHASE_GROUPS["assembly"]) / (h * w / 1e6)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/zemosaic-bench/plan")
    parser.add_argument("--headers", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="4 frames per panel instead of 10")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    warning = load_warning()
    if warning:
        print(warning)
    rows, cost_rows = [], []
    for name in ("wcs", "raw", "real"):
        frames = _dataset(args.data, name, args.quick)
        if frames is None:
            print(f"{name}: skipped (no solve-field with index files, or no shared real subs)")
            continue
        child = run_python_worker(os.path.abspath(__file__), ["--worker", frames])
        if not child.ok or not child.result:
            raise SystemExit(f"{name}: the run failed:\n{child.tail()}")
        run = child.result
        plan = run["plan"]
        for phase, parts in PHASE_GROUPS.items():
            measured = sum(run["timings"].get(p, 0.0) for p in parts)
            rows.append([name, phase, fmt(plan["seconds"][phase], ".1f"), fmt(measured, ".1f"),
                         fmt(plan["seconds"][phase] / measured if measured > 0.05 else None)])
        peak = max(max(run["peaks"].values(), default=0), child.peak_rss_bytes)
        rows.append([name, "peak memory (MB)", fmt(plan["peak_bytes"] / 2**20, ".0f"), fmt(peak / 2**20, ".0f"),
                     fmt(plan["peak_bytes"] / peak)])
        rows.append([name, "disk (MB)", fmt(plan["disk_bytes"] / 2**20, ".0f"),
                     fmt(run["disk_bytes"] / 2**20, ".0f"), fmt(plan["disk_bytes"] / run["disk_bytes"])])
        rows.append([name, "solver runs", str(plan["solver_runs"]), str(run["solver_runs"]), ""])
        rows.append([name, "tiles / mosaic px", f"{len(plan['tiles'])} / {plan['mosaic_hw'][1]}x{plan['mosaic_hw'][0]}",
                     f"{run['tiles']} / {run['mosaic_hw'][1]}x{run['mosaic_hw'][0]}", ""])
        frame_hw = plan["tiles"][0]["canvas_hw"]
        costs = _measured_costs(run, 1080 * 1920 / 1e6 if frame_hw[0] > 1000 else frame_hw[0] * frame_hw[1] / 1e6)
        cost_rows += [[name, key, fmt(value, ".3f")] for key, value in costs.items()]
    print_table(["dataset", "what", "plan", "run", "plan/run"], rows,
                title="Plan against the run (seconds unless named)")
    folder = _headers_folder(args.data, args.headers)
    config = config_from_dict({"input_folder": folder, "output_folder": tempfile.mkdtemp()})
    t0 = time.perf_counter()
    plan = zplan.plan_run(config)
    plan_s = time.perf_counter() - t0
    print_table(["frames", "plan s", "ms/frame", "panels", "tiles", "solver runs"],
                [[str(plan.frames), fmt(plan_s), fmt(plan_s / plan.frames * 1000), str(plan.panels),
                  str(len(plan.tiles)), str(plan.solver_runs)]],
                title="The plan's own speed, header-only raw subs")
    print(zplan.format_plan(plan))
    print_table(["dataset", "cost", "measured"], cost_rows,
                title=f"Costs measured (planner's: {json.dumps(zplan.COSTS.__dict__)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
