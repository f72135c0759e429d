"""Wall time and peak memory of each pipeline phase on the demo dataset.

Run: ``.venv/bin/python benchmarks/bench_pipeline.py [--data DIR] [--frames-per-panel N]``.
The dataset is generated (full-size synthetic Seestar frames, 2x2 panels) when DIR holds none.
Prints one table: phase, wall time, share of the run, peak RSS seen during the phase.
Peak RSS is sampled every 10 ms from /proc (Linux); elsewhere the column reads n/a.
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
from _measure import rss_now_bytes  # noqa: E402
from zemosaic_config import config_from_dict  # noqa: E402
from zemosaic_worker import PHASES, run_mosaic  # noqa: E402


class PhaseMemory:
    """Samples RSS in a thread and keeps the peak per phase named by the progress callback."""

    def __init__(self):
        self.phase = "start"
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = rss_now_bytes()
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo/data", help="dataset folder (generated if empty)")
    parser.add_argument("--frames-per-panel", type=int, default=6)
    parser.add_argument("--size", default="full", choices=["full", "small"])
    args = parser.parse_args(argv)
    frames_dir = os.path.join(args.data, "frames")
    if not os.path.isdir(frames_dir):
        print(f"generating the demo dataset in {args.data} ...")
        zemosaic_synth.generate_dataset(args.data, panels=(2, 2), frames_per_panel=args.frames_per_panel,
                                        seed=1, size=args.size)
    n_frames = len([f for f in os.listdir(frames_dir) if f.lower().endswith((".fit", ".fits"))])
    with tempfile.TemporaryDirectory() as out:
        config = config_from_dict({"input_folder": frames_dir, "output_folder": out})
        with PhaseMemory() as mem:
            t0 = time.perf_counter()
            result = run_mosaic(config, progress=mem.progress)
            total = time.perf_counter() - t0
    timings = result.report.timings_s
    print(f"\nZeMosaic pipeline on {n_frames} frames ({args.size}), "
          f"{len(result.report.tiles)} tiles, mosaic {result.report.mosaic_shape}")
    print(f"{'phase':<14}{'wall s':>9}{'share':>8}{'peak RSS MB':>13}")
    for phase in PHASES:
        t = timings.get(phase, 0.0)
        peak = mem.peak.get(phase)
        peak_txt = f"{peak / 2**20:13.0f}" if peak else f"{'n/a':>13}"
        print(f"{phase:<14}{t:9.2f}{t / total:8.1%}{peak_txt}")
    overall = max(mem.peak.values()) if mem.peak else None
    print(f"{'total':<14}{total:9.2f}{1:8.0%}" + (f"{overall / 2**20:13.0f}" if overall else f"{'n/a':>13}"))
    print(f"throughput: {n_frames / total:.2f} frames/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
