"""The run planner (``--plan``): from the headers alone, what the run then does, and its cost."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import zemosaic_astrometry as za
import zemosaic_executor as zexec
import zemosaic_fits as zf
import zemosaic_plan as zplan
import zemosaic_synth
import zemosaic_worker as zw
from realdata import NGC7023 as REAL_SUBS
from test_astrometry import _TruthSolver, unsolved_small  # noqa: F401  (a fixture)
from zemosaic_config import MosaicConfig


@pytest.fixture(scope="module")
def with_wcs(tmp_path_factory):
    """2 x 2 panels of three small frames that carry their WCS."""
    root = tmp_path_factory.mktemp("plan")
    return zemosaic_synth.generate_dataset(root, panels=(2, 2), frames_per_panel=3, seed=8)["frames_dir"]


def test_the_plan_of_raw_subs_names_the_panels_tiles_and_solver_runs_the_run_then_makes(
        unsolved_small, tmp_path, monkeypatch):  # noqa: F811
    info, _truths, by_content = unsolved_small
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / "o"))
    plan = zplan.plan_run(config)
    assert not (tmp_path / "o").exists()  # a plan writes nothing
    assert (plan.frames, plan.with_wcs, plan.to_solve, plan.panels) == (8, 0, 8, 2)
    assert [t.frames for t in plan.tiles] == [4, 4]
    solver = _TruthSolver(by_content)
    monkeypatch.setattr(za, "solver_from_config", lambda config: (solver, None))
    report = zw.run_mosaic(config).report
    assert len(report.tiles) == len(plan.tiles) and [t["frames"] for t in report.tiles] == [4, 4]
    assert solver.calls == plan.solver_runs == 4  # an anchor and a check per panel


def test_frames_with_a_wcs_give_the_mosaic_size_and_the_disk_the_run_takes(with_wcs, tmp_path):
    config = MosaicConfig(input_folder=with_wcs, output_folder=str(tmp_path / "o"))
    plan = zplan.plan_run(config)
    assert (plan.with_wcs, plan.to_solve, plan.solver_runs, len(plan.tiles)) == (12, 0, 0, 4)
    report = zw.run_mosaic(config).report
    _channels, height, width = report.mosaic_shape
    assert abs(plan.mosaic_hw[0] / height - 1) < 0.05 and abs(plan.mosaic_hw[1] / width - 1) < 0.05
    written = sum(p.stat().st_size for p in (tmp_path / "o").rglob("*") if p.is_file())
    assert 0.7 < plan.disk_bytes / written < 1.3, (plan.disk_bytes, written)
    assert plan.seconds["solve"] == 0 and all(v >= 0 for v in plan.seconds.values())


@pytest.mark.parametrize("scale", [1, 2])
def test_the_plan_counts_a_bayer_drizzled_stack_s_pixel_weights(with_wcs, tmp_path, monkeypatch, scale):
    # Under Bayer drizzle each tile's aligned stack has a second stack beside it, the pixel
    # weights (float16), on a grid ``scale`` times finer: the plan's stack bytes are what the run allocates
    # (tiles one at a time, in this process, to see the allocations).
    settings = {"stacking_cfa_method": "bayer_drizzle", "drizzle_scale": scale, "num_processing_workers": 1}
    config = MosaicConfig(input_folder=with_wcs, output_folder=str(tmp_path / "o"), **settings)
    debayer = zplan.plan_run(MosaicConfig(input_folder=with_wcs, output_folder=str(tmp_path / "o"),
                                          num_processing_workers=1))
    plan = zplan.plan_run(config)
    assert [t.stack_bytes for t in plan.tiles] == [1.5 * scale ** 2 * t.stack_bytes for t in debayer.tiles]
    # ...and their time: the drizzle's measured factor over the debayer's.
    assert plan.seconds["master_tiles"] == pytest.approx(
        zplan.COSTS.drizzle_tile_factor * debayer.seconds["master_tiles"], rel=1e-9)
    allocated, allocate = [], zexec.allocate_stacks

    def recorded(layouts, *args, **kwargs):
        allocated.append(sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in layouts))
        return allocate(layouts, *args, **kwargs)

    monkeypatch.setattr(zexec, "allocate_stacks", recorded)
    zw.run_mosaic(config)
    assert len(allocated) == len(plan.tiles)
    for planned, made in zip(sorted(t.stack_bytes for t in plan.tiles), sorted(allocated)):
        assert abs(planned / made - 1) < 0.15, (planned, made)


def test_the_plan_reads_headers_only(with_wcs, tmp_path):
    """A frame with a complete header and half its data is planned (the run skips it, having
    read its size): the plan never reads past the headers."""
    frames = tmp_path / "frames"
    shutil.copytree(with_wcs, frames)
    damaged = sorted(frames.iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
    config = MosaicConfig(input_folder=str(frames), output_folder=str(tmp_path / "o"))
    assert zplan.plan_run(config).frames == 12
    with pytest.raises(zf.FrameError, match="truncated"):
        zf.read_frame_info(damaged)
    (frames / "notes.fits").write_text("not FITS at all")
    plan = zplan.plan_run(config)
    assert plan.frames == 12 and [os.path.basename(p) for p, _ in plan.unreadable] == ["notes.fits"]


@pytest.mark.skipif(not REAL_SUBS.is_dir(), reason="no shared real subs")
def test_header_info_is_the_scan_s_on_the_real_subs():
    for path in sorted(REAL_SUBS.glob("*.fit")):
        full, header_only = zf.read_frame_info(path, require_wcs=False), zf.read_header_info(path)
        for field in ("shape_hw", "n_channels", "bayer_pattern", "date_obs", "exptime", "wcs_problem"):
            assert getattr(full, field) == getattr(header_only, field), (path.name, field)
        assert (full.wcs is None) == (header_only.wcs is None)
        if full.wcs is not None:
            assert full.wcs.to_header_string() == header_only.wcs.to_header_string()


def test_plan_on_the_command_line_prints_within_80_columns_and_writes_nothing(with_wcs, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"input_folder": with_wcs, "output_folder": str(tmp_path / "o")}))
    done = subprocess.run([sys.executable, "-m", "zemosaic_worker", str(cfg), "--plan"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("Plan (from the headers of 12 file(s)")
    for label in ("frames:", "panels, tiles:", "largest stack:", "mosaic:", "time:", "peak memory:", "disk:"):
        assert any(line.strip().startswith(label) for line in lines), label
    assert max(len(line) for line in lines) <= 80
    assert not (tmp_path / "o").exists()


def test_a_frame_without_wcs_or_pointing_counts_as_a_blind_solve(with_wcs, tmp_path):
    from astropy.io import fits

    frames = tmp_path / "frames"
    shutil.copytree(with_wcs, frames)
    first = sorted(frames.iterdir())[0]
    with fits.open(first) as hdul:
        header, data = hdul[0].header.copy(), hdul[0].data
    for key in [k for k in header if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD", "CDELT", "PC"))] + ["RA", "DEC"]:
        header.remove(key, ignore_missing=True, remove_all=True)
    fits.PrimaryHDU(data, header).writeto(frames / "Light_blind.fits")
    plan = zplan.plan_run(MosaicConfig(input_folder=str(frames), output_folder=str(tmp_path / "o")))
    assert (plan.frames, plan.blind, plan.with_wcs, plan.to_solve, plan.solver_runs) == (13, 1, 12, 1, 1)
    assert sum(t.frames for t in plan.tiles) == 12
    assert "no pointing:     1" in zplan.format_plan(plan)
