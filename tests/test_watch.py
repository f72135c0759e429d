"""Live mode (``--watch``): frames arriving in batches end in the mosaic a one-shot run makes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import zemosaic_synth
import zemosaic_watch as zwatch
import zemosaic_worker as zw
from test_astrometry import _TruthSolver, unsolved_small  # noqa: F401  (a fixture)
from zemosaic_config import MosaicConfig
from zemosaic_fits import read_image_fits
from zemosaic_utils import pixel_noise_sigma

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """2 x 2 panels x 3 small frames, the frames of one panel after the other (time order)."""
    info = zemosaic_synth.generate_dataset(tmp_path_factory.mktemp("night"), panels=(2, 2),
                                           frames_per_panel=3, seed=21)
    return sorted(Path(info["frames_dir"]).iterdir())


def _arrive(path: Path, folder: Path) -> None:
    """Put a frame into the watched folder as a whole (written hidden, then renamed)."""
    hidden = folder / f".{path.name}.part"
    shutil.copyfile(path, hidden)
    os.replace(hidden, folder / path.name)


def _watch_fed(config, live: Path, batches) -> list:
    """Watch ``live`` while the frames of each batch arrive, the next batch once a mosaic holds
    every frame so far; returns each mosaic's report."""
    reports, fed = [], []
    arrived = threading.Condition()

    def on_batch(result):
        with arrived:
            reports.append(result.report)
            arrived.notify_all()

    def feed():
        for batch in batches:
            for path in batch:
                _arrive(path, live)
                fed.append(path)
            with arrived:
                arrived.wait_for(lambda: reports and len(reports[-1].frames_used) == len(fed), timeout=120)

    feeder = threading.Thread(target=feed)
    feeder.start()
    zwatch.watch(config, on_batch=on_batch, stop=lambda: not feeder.is_alive(), poll_s=0.05)
    feeder.join()
    return reports


def test_frames_fed_a_panel_at_a_time_give_the_one_shot_mosaic_restacking_only_changed_tiles(night, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    config = MosaicConfig(input_folder=str(live), output_folder=str(tmp_path / "out"),
                          watch_batch_frames=3, watch_batch_seconds=0.5, num_processing_workers=1)
    reports = _watch_fed(config, live, [night[3 * panel:3 * panel + 3] for panel in range(4)])
    assert len(reports[-1].frames_used) == 12 and len(reports) >= 4
    # Each batch stacks again only the tiles whose frames changed since the batch before.
    for before, after in zip(reports, reports[1:]):
        for tile in after.tiles:
            unchanged = any(_same_frames(tile, old) for old in before.tiles)
            assert tile["reused"] == unchanged, (tile["index"], tile["frames"])
    assert sum(t["reused"] for t in reports[-1].tiles) >= 3  # the last panel's tile alone is new

    one_shot = zw.run_mosaic(config.replace(output_folder=str(tmp_path / "once"))).report
    assert [_paths(t) for t in one_shot.tiles] == [_paths(t) for t in reports[-1].tiles]
    watched = read_image_fits(tmp_path / "out" / zw.MOSAIC_NAME)[0]
    once = read_image_fits(tmp_path / "once" / zw.MOSAIC_NAME)[0]
    assert np.array_equal(np.isnan(watched), np.isnan(once))
    green = once[..., 1]
    sky_sigma = pixel_noise_sigma(np.where(np.isfinite(green), green, np.nanmedian(green)))
    assert sky_sigma > 0 and np.nanmax(np.abs(watched - once)) <= 0.1 * sky_sigma


def _paths(tile: dict) -> list:
    return sorted(row["path"] for row in tile["frame_photometry"])


def _same_frames(tile: dict, old: dict) -> bool:
    return tile["index"] == old["index"] and _paths(tile) == _paths(old)


def test_a_frame_counts_once_it_has_stopped_growing_and_batches_follow_the_two_keys(tmp_path):
    config = MosaicConfig(input_folder=str(tmp_path), output_folder=str(tmp_path / "out"),
                          watch_batch_frames=3, watch_batch_seconds=60)
    state = zwatch.WatchState()
    frame = tmp_path / "Light_001.fits"
    frame.write_bytes(b"x" * 2880)
    assert state.settled_new(config) == []  # seen once
    with open(frame, "ab") as fh:
        fh.write(b"x" * 2880)  # still being written
    assert state.settled_new(config) == []
    assert state.settled_new(config) == [str(frame)]
    # The frames there at the start make the first batch at once.
    assert zwatch.batch_due(state, [str(frame)], config, clock=0.0)
    state.done.add(str(frame))
    state.pending_since = None
    assert not zwatch.batch_due(state, ["a", "b"], config, clock=10.0)  # 2 of 3, 0 s of 60
    assert not zwatch.batch_due(state, ["a", "b"], config, clock=69.0)
    assert zwatch.batch_due(state, ["a", "b"], config, clock=70.0)  # 60 s after the first came
    state.pending_since = None
    assert zwatch.batch_due(state, ["a", "b", "c"], config, clock=71.0)  # 3 frames


def test_watch_on_the_command_line_ends_with_ctrl_c_keeping_the_last_mosaic(night, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    for path in night[:3]:
        _arrive(path, live)
    out = tmp_path / "out"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"input_folder": str(live), "output_folder": str(out),
                               "num_processing_workers": 1}))
    proc = subprocess.Popen([sys.executable, "-m", "zemosaic_worker", str(cfg), "--watch"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Ctrl-C once the first mosaic's summary is out (the report is written just before it).
    errors, summary = [], threading.Event()

    def read(stream, lines, mark=None):
        for line in stream:
            lines.append(line)
            if mark is not None and "mosaic done" in line:
                mark.set()

    readers = [threading.Thread(target=read, args=(proc.stdout, [], summary), daemon=True),
               threading.Thread(target=read, args=(proc.stderr, errors), daemon=True)]
    for reader in readers:
        reader.start()
    summary.wait(timeout=120)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    for reader in readers:
        reader.join(timeout=10)
    stderr = "".join(errors)
    assert proc.returncode == 130, stderr[-2000:]
    assert summary.is_set() and (out / zw.REPORT_NAME).exists()
    assert stderr.strip().endswith("zemosaic: live mode stopped after 1 mosaic(s); the last one stays in the "
                                   "output folder")
    assert "Traceback" not in stderr and (out / zw.MOSAIC_NAME).exists()


def test_raw_subs_arriving_later_are_matched_to_the_frames_solved_before(unsolved_small, tmp_path,  # noqa: F811
                                                                         monkeypatch):
    """Frames without WCS: a batch's new frames of a panel already solved take their WCS from a
    star match to the cached solutions, so the live run solves as often as a one-shot run, and
    its mosaic is the one-shot mosaic of the same plate solutions."""
    import zemosaic_astrometry as za

    info, _truths, by_content = unsolved_small
    solver = _TruthSolver(by_content)
    monkeypatch.setattr(za, "solver_from_config", lambda config: (solver, None))
    frames = [Path(p) for p in info["frame_paths"]]  # panel 0's four, then panel 1's
    live = tmp_path / "live"
    live.mkdir()
    config = MosaicConfig(input_folder=str(live), output_folder=str(tmp_path / "out"),
                          watch_batch_frames=2, watch_batch_seconds=0.5, num_processing_workers=1)
    reports = _watch_fed(config, live, [frames[:2], frames[2:6], frames[6:]])
    assert len(reports[-1].frames_used) == 8
    live_calls = solver.calls
    solver.calls = 0
    zw.run_mosaic(config.replace(output_folder=str(tmp_path / "fresh")))
    assert live_calls == solver.calls == 4  # an anchor and a check per panel, live or not
    # The one-shot run that had the same plate solutions (their cache, not the tiles): which
    # frames a run solves and which it matches depends on what it saw, and a WCS 0.05 px
    # elsewhere moves the stars of the mosaic grid by as much.
    once_config = config.replace(output_folder=str(tmp_path / "once"))
    shutil.copytree(zw.wcs_cache_folder(config), zw.wcs_cache_folder(once_config))
    once_report = zw.run_mosaic(once_config).report
    assert not any(t["reused"] for t in once_report.tiles)
    assert [_paths(t) for t in once_report.tiles] == [_paths(t) for t in reports[-1].tiles]
    watched = read_image_fits(tmp_path / "out" / zw.MOSAIC_NAME)[0]
    once = read_image_fits(tmp_path / "once" / zw.MOSAIC_NAME)[0]
    green = once[..., 1]
    sky_sigma = pixel_noise_sigma(np.where(np.isfinite(green), green, np.nanmedian(green)))
    both = np.isfinite(watched) & np.isfinite(once)
    assert both.sum() > 0.95 * np.isfinite(once).sum()
    assert np.max(np.abs(watched - once)[both]) <= 0.1 * sky_sigma
