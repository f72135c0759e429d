"""Plate solving and frame WCSs: hints, WCS fits, star matching, the cache, the solve phase.

The first tests need no solver (known WCSs, synthetic star lists, a fake ASTAP program, the solve
phase with a stand-in solver). The last ones run astrometry.net for real on synthetic frames of
the real sky and on the shared real Seestar subs; they skip where the solver is not installed.
"""

import hashlib
import json
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import zemosaic_astrometry as za
import zemosaic_fits as zf
import zemosaic_synth
import zemosaic_worker as zw
from zemosaic_config import MosaicConfig
from zemosaic_fits import read_image_fits
from zemosaic_synth_sky import make_tan_wcs

from realdata import NGC7023 as REALDATA, reference_frames, reference_wcs
SOLVER_REASON = za.AstrometryNetSolver().unavailable_reason()
needs_solver = pytest.mark.skipif(SOLVER_REASON is not None, reason=f"no plate solver: {SOLVER_REASON}")


def _seestar_header(**extra):
    header = fits.Header()
    header.update({"RA": 315.57084, "DEC": 68.282778, "FOCALLEN": 250, "XPIXSZ": 2.9, **extra})
    return header


def _frame_truth_wcs(meta_frame, shape_hw, scale=2.39):
    return make_tan_wcs(meta_frame["center_ra"], meta_frame["center_dec"], meta_frame["rotation_deg"],
                        shape_hw, scale)


# --------------------------------------------------------------------------------------------------
# Hints, WCS fits, star matching
# --------------------------------------------------------------------------------------------------


def test_hints_from_a_seestar_header():
    hints = za.hints_from_header(_seestar_header())
    assert hints.ra_deg == pytest.approx(315.57084) and hints.dec_deg == pytest.approx(68.282778)
    assert hints.scale_arcsec == pytest.approx(2.3927, abs=1e-3)  # 206.265 * 2.9 / 250


def test_hints_from_sexagesimal_text_and_missing_values():
    header = fits.Header({"OBJCTRA": "21 01 37.0", "OBJCTDEC": "-68 10 00"})
    hints = za.hints_from_header(header)
    assert hints.ra_deg == pytest.approx(315.404167, abs=1e-5)
    assert hints.dec_deg == pytest.approx(-68.166667, abs=1e-5)
    assert hints.scale_arcsec is None
    assert not za.hints_from_header(fits.Header()).has_position


def test_tan_fit_recovers_a_known_wcs_exactly():
    truth = make_tan_wcs(83.8, -5.4, 37.0, (1920, 1080), 2.39)
    x, y = np.meshgrid(np.linspace(0, 1079, 7), np.linspace(0, 1919, 7))
    ra, dec = truth.all_pix2world(x.ravel(), y.ravel(), 0)
    fitted = za.tan_wcs_from_points(x.ravel(), y.ravel(), ra, dec, (539.5, 959.5))
    assert za.wcs_pixel_offset(fitted, truth, (1920, 1080)) < 1e-6
    assert fitted.wcs.has_cd()


def test_binned_solution_rescaled_to_full_resolution():
    truth = make_tan_wcs(315.5, 68.2, -120.0, (1920, 1080), 2.39)
    binned = truth.deepcopy()
    binned.wcs.cd = truth.wcs.cd * 2
    # Superpixel j covers full pixels 2j and 2j+1: FITS crpix_full = 2 crpix_binned - 0.5.
    binned.wcs.crpix = (np.asarray(truth.wcs.crpix) + 0.5) / 2
    binned.wcs.set()
    full = za.rescale_binned_wcs(binned, (1920, 1080))
    assert za.wcs_pixel_offset(full, truth, (1920, 1080)) < 1e-6


def _star_field(rng, n=120, shape=(1920, 1080)):
    return np.column_stack([rng.uniform(20, shape[1] - 20, n), rng.uniform(20, shape[0] - 20, n)])


def test_star_match_gives_the_frame_wcs_to_a_tenth_of_a_pixel():
    rng = np.random.default_rng(1)
    reference_wcs = make_tan_wcs(83.8, -5.4, 0.0, (1920, 1080), 2.39)
    frame_wcs = make_tan_wcs(83.85, -5.35, 11.0, (1920, 1080), 2.39)  # dithered and rotated
    sky = reference_wcs.all_pix2world(_star_field(rng, 400, (2600, 1800)) - [360, 340], 0)
    ref_xy = reference_wcs.all_world2pix(sky, 0)
    frame_xy = frame_wcs.all_world2pix(sky, 0)

    def inside(xy):
        return (xy[:, 0] > 0) & (xy[:, 0] < 1079) & (xy[:, 1] > 0) & (xy[:, 1] < 1919)

    ref_stars = ref_xy[inside(ref_xy)]
    frame_stars = frame_xy[inside(frame_xy)] + rng.normal(0, 0.08, (inside(frame_xy).sum(), 2))
    matched = za.wcs_from_star_match(frame_stars, (1920, 1080), ref_stars, reference_wcs)
    assert za.wcs_pixel_offset(matched, frame_wcs, (1920, 1080)) < 0.1


def test_star_match_fails_cleanly_on_unrelated_stars():
    rng = np.random.default_rng(2)
    with pytest.raises(za.SolveError, match="star|stars"):
        za.match_stars(_star_field(rng), _star_field(rng))
    with pytest.raises(za.SolveError, match="too few stars"):
        za.match_stars(_star_field(rng, 3), _star_field(rng))


def test_detect_stars_finds_gaussian_stars_to_a_twentieth_of_a_pixel():
    rng = np.random.default_rng(3)
    gx, gy = np.meshgrid(np.arange(30, 300, 50.0), np.arange(30, 400, 55.0))
    truth = np.column_stack([gx.ravel(), gy.ravel()]) + rng.uniform(-0.5, 0.5, (gx.size, 2))
    yy, xx = np.mgrid[0:400, 0:300]
    image = rng.normal(1000.0, 10.0, (400, 300))
    for x, y in truth:
        image += 2000.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.2**2))
    found = za.detect_stars(image)
    assert len(found) == len(truth)
    dist = np.min(np.hypot(found[:, None, 0] - truth[None, :, 0], found[:, None, 1] - truth[None, :, 1]), axis=1)
    assert np.median(dist) < 0.05


# --------------------------------------------------------------------------------------------------
# Cache and solver selection
# --------------------------------------------------------------------------------------------------


def test_cache_round_trip_and_unreadable_entries(tmp_path):
    cache = za.WcsCache(str(tmp_path / "wcs"))
    truth = make_tan_wcs(10.0, 20.0, 5.0, (100, 80), 2.39)
    cache.put("abc", truth, "matched to x.fit", None)
    hit = cache.get("abc")
    assert hit.source == "matched to x.fit" and hit.solve_s is None
    assert za.wcs_pixel_offset(hit.wcs, truth, (100, 80)) < 1e-6
    (tmp_path / "wcs" / "bad.json").write_text("{ truncated")
    assert cache.get("bad") is None and cache.get("missing") is None


def _fake_astap(tmp_path, body):
    script = tmp_path / "astap"
    script.write_text(f"#!{sys.executable}\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_astap_backend_command_line_and_solution(tmp_path):
    truth = make_tan_wcs(315.5, 68.2, 30.0, (960, 540), 4.79)
    header_text = truth.to_header().tostring()
    script = _fake_astap(tmp_path, f"""
import sys, json
args = sys.argv[1:]
out = args[args.index("-o") + 1]
json.dump(args, open(out + ".args", "w"))
open(out + ".wcs", "w").write({header_text!r})
""")
    config = MosaicConfig(astap_executable_path=script)
    solver, reason = za.solver_from_config(config)
    assert reason is None and solver.name == "ASTAP"
    image = np.random.default_rng(0).normal(100, 5, (1920, 1080))
    wcs = za.solve_frame(solver, image, za.hints_from_header(_seestar_header()), 10)
    full_truth = za.rescale_binned_wcs(truth, (1920, 1080))
    assert za.wcs_pixel_offset(wcs, full_truth, (1920, 1080)) < 1e-6


def test_astap_failure_reason_is_reported(tmp_path):
    script = _fake_astap(tmp_path, """
import sys
args = sys.argv[1:]
out = args[args.index("-o") + 1]
open(out + ".ini", "w").write("PLTSOLVD=F\\nERROR=No solution found\\n")
sys.exit(1)
""")
    solver, _ = za.solver_from_config(MosaicConfig(astap_executable_path=script))
    with pytest.raises(za.SolveError, match="No solution found"):
        za.solve_frame(solver, np.ones((100, 100)), za.SolveHints(), 10)


def test_solver_temporary_files_stay_in_the_frames_work_folder(tmp_path, monkeypatch):
    """solve-field's own temporary files (its --temp-dir, and $TMPDIR for what it starts) live in
    the frame's work folder, which is removed even when the solve is interrupted."""
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    script = _fake_astap(tmp_path, """
import os, sys
args = sys.argv[1:]
temp_dir = args[args.index("--temp-dir") + 1]
open(os.path.join(temp_dir, "tmp.solve-field.axy"), "w").write("x")
open(os.path.join(os.environ["TMPDIR"], "tmp.child"), "w").write("x")
raise KeyboardInterrupt
""")
    monkeypatch.setattr(za, "astrometry_index_dirs", lambda: [str(tmp_path)])
    solver = za.AstrometryNetSolver(script)
    with pytest.raises(za.SolveError):
        za.solve_frame(solver, np.ones((100, 100)), za.SolveHints(), 10)
    assert list(system_tmp.iterdir()) == []


def test_missing_astap_is_named():
    solver, reason = za.solver_from_config(MosaicConfig(astap_executable_path="/nowhere/astap"))
    assert solver is None and "/nowhere/astap" in reason


# --------------------------------------------------------------------------------------------------
# The solve phase with a stand-in solver (runs everywhere)
# --------------------------------------------------------------------------------------------------


class _TruthSolver:
    """Returns each frame's true WCS (binned), recognised by the frame's pixels; counts its calls."""

    name = "truth"

    def __init__(self, frames):
        self.by_content = frames
        self.calls = 0

    def solve(self, image2d, hints, timeout_s, workdir):
        self.calls += 1
        key = hashlib.sha256(np.ascontiguousarray(image2d, np.float32).tobytes()).hexdigest()
        full = self.by_content[key]
        binned = full.deepcopy()
        binned.wcs.cd = full.wcs.cd * 2
        binned.wcs.crpix = (np.asarray(full.wcs.crpix) + 0.5) / 2
        binned.wcs.set()
        return binned


@pytest.fixture(scope="module")
def unsolved_small(tmp_path_factory):
    """Two panels x four small frames written as a Seestar writes them: no WCS, panel pointing."""
    import zemosaic_fits as zf

    root = tmp_path_factory.mktemp("unsolved")
    info = zemosaic_synth.generate_dataset(root, panels=(2, 1), frames_per_panel=4, seed=11,
                                           size="small", write_wcs=False, pointing_error_deg=0.02,
                                           satellite=False, star_density=20000.0)
    meta = json.loads(Path(info["truth_json"]).read_text())
    truths, by_content = {}, {}
    for fr, path in zip(meta["frames"], info["frame_paths"]):
        truths[path] = _frame_truth_wcs(fr, info["frame_shape"])
        raw = zf.load_frame(path, debayer=False, hot_pixels=True, require_wcs=False).data
        key = hashlib.sha256(za.superpixel_image(raw).tobytes()).hexdigest()
        by_content[key] = truths[path]
    return info, truths, by_content


def _solve_phase(info, out, solver, monkeypatch):
    monkeypatch.setattr(za, "solver_from_config", lambda config: (solver, None))
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(out))
    progress = []
    run = zw.Run(config, zw.RunReport(config={}), progress=lambda *a: progress.append(a))
    records = zw.solve_frames(run, zw.scan_frames(run))
    return records, run.report, progress


def test_solve_few_match_many(unsolved_small, tmp_path, monkeypatch):
    info, truths, by_content = unsolved_small
    solver = _TruthSolver(by_content)
    records, report, progress = _solve_phase(info, tmp_path / "o", solver, monkeypatch)
    assert len(records) == 8 and not report.frames_skipped
    # One anchor and one check per panel; the other six frames star-matched.
    assert solver.calls == 4
    sources = [r.wcs_source for r in records]
    assert sources.count("solved") == 4 and sum(s.startswith("matched to ") for s in sources) == 4
    for r in records:
        assert za.wcs_pixel_offset(r.wcs, truths[r.path], r.info.shape_hw) < 0.3, r.wcs_source
    solve_progress = [p for p in progress if p[0] == "solve"]
    assert solve_progress[-1][1] == solve_progress[-1][2] == 8

    # A second run solves nothing: every WCS comes from the cache, unchanged.
    again = _TruthSolver(by_content)
    records2, report2, _ = _solve_phase(info, tmp_path / "o", again, monkeypatch)
    assert again.calls == 0 and {r.wcs_source for r in records2} == {"cache"}
    for r1, r2 in zip(records, records2):
        assert za.wcs_pixel_offset(r1.wcs, r2.wcs, r1.info.shape_hw) < 1e-6
    assert {e["wcs"] for e in report2.to_dict()["frame_wcs"]} == {"cache"}


def test_a_group_matches_triangles_once_then_follows_its_frames(unsolved_small, tmp_path, monkeypatch):
    """Each frame's match to its anchor starts from the previous frame's: of the six matched frames
    of two panels, only the first of each is matched by its triangles, and every match is as
    close to the truth as before (the shared tolerance of the solve tests)."""
    info, truths, by_content = unsolved_small
    calls = []
    triangle_match = za._triangle_match
    monkeypatch.setattr(za, "_triangle_match", lambda *a: calls.append(1) or triangle_match(*a))
    records, _report, _ = _solve_phase(info, tmp_path / "o", _TruthSolver(by_content), monkeypatch)
    matched = [r for r in records if r.wcs_source.startswith("matched to ")]
    assert len(matched) == 4  # of 8: two frames of each panel are solved (anchor, check)
    assert len(calls) == 2
    for r in records:
        assert za.wcs_pixel_offset(r.wcs, truths[r.path], r.info.shape_hw) < 0.3, r.wcs_source


class _OneBadSolveSolver(_TruthSolver):
    """The truth solver, but its solve number ``bad`` (counting from 1) is 3 px off."""

    def __init__(self, frames, bad):
        super().__init__(frames)
        self.bad, self.off_keys = bad, []

    def solve(self, image2d, hints, timeout_s, workdir):
        wcs = super().solve(image2d, hints, timeout_s, workdir)
        if self.calls == self.bad:
            self.off_keys.append(hashlib.sha256(np.ascontiguousarray(image2d, np.float32).tobytes()).hexdigest())
            wcs.wcs.crpix = np.asarray(wcs.wcs.crpix) + [1.5, 0.0]  # 3 px at full resolution
            wcs.wcs.set()
        return wcs


def test_a_check_solve_that_alone_disagrees_is_outvoted(unsolved_small, tmp_path, monkeypatch, caplog):
    """A group's check solve 3 px from the star matches gets a second check; that one agrees, so
    the matches stand and the odd frame takes its match instead of its plate solution (not the
    40 solver runs of solving the whole group frame by frame)."""
    info, truths, by_content = unsolved_small
    solver = _OneBadSolveSolver(by_content, bad=2)  # the first group's check
    monkeypatch.setattr(za, "solver_from_config", lambda config: (solver, None))
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / "o"),
                          num_processing_workers=1)  # the groups one after the other
    run = zw.Run(config, zw.RunReport(config={}))
    records = zw.solve_frames(run, zw.scan_frames(run))
    assert solver.calls == 5 and len(records) == 8  # anchor, check, second check; anchor, check
    for r in records:
        assert za.wcs_pixel_offset(r.wcs, truths[r.path], r.info.shape_hw) < 0.3, r.wcs_source
    assert [r.wcs_source for r in records].count("solved") == 4
    assert any("takes its star match" in m for m in caplog.messages)


def test_a_cancel_while_star_lists_are_found_stops_the_solve_phase(unsolved_small, tmp_path, monkeypatch):
    """Cancelled while the worker processes find star lists and the groups plate-solve: the phase
    ends with Cancelled within seconds, no thread of it is left, and no cancel flag stays behind
    (the next run's workers would stop at once)."""
    info, _truths, by_content = unsolved_small
    cancel = threading.Event()

    class CancellingSolver(_SlowTruthSolver):
        def solve(self, *args):
            cancel.set()  # the user presses Cancel while the anchors are solved
            return super().solve(*args)

    solver = CancellingSolver(by_content)
    monkeypatch.setattr(za, "solver_from_config", lambda config: (solver, None))
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / "o"),
                          num_processing_workers=2)
    run = zw.Run(config, zw.RunReport(config={}), cancel=cancel)
    records = zw.scan_frames(run)
    threads_before = threading.active_count()
    t0 = time.monotonic()
    with pytest.raises(zw.Cancelled):
        zw.solve_frames(run, records)
    assert time.monotonic() - t0 < 5.0
    assert solver.calls <= 2  # no solve started after the cancel
    assert threading.active_count() <= threads_before
    assert not list((tmp_path / "o").rglob(".cancel*"))


class _FailingSolver(_TruthSolver):
    """A :class:`_TruthSolver` that cannot solve the frames whose content key it is given."""

    def __init__(self, frames, unsolvable):
        super().__init__(frames)
        self.unsolvable, self.solved = unsolvable, []

    def solve(self, image2d, hints, timeout_s, workdir):
        key = hashlib.sha256(np.ascontiguousarray(image2d, np.float32).tobytes()).hexdigest()
        self.solved.append(key)
        if key in self.unsolvable:
            self.calls += 1
            raise za.SolveError("no solution found")
        return super().solve(image2d, hints, timeout_s, workdir)


def test_matches_that_fail_the_check_are_neither_kept_nor_cached(unsolved_small, tmp_path, monkeypatch):
    """Star matches 7 px off fail the group's check: every frame is then plate-solved once, one
    that cannot be solved is skipped, and the rerun from the cache uses the same frames with the
    same WCSs (no rejected match is read back)."""
    info, truths, by_content = unsolved_small
    real_match = za.wcs_from_star_match

    def off_by_7px(*args, **kwargs):
        wcs = real_match(*args, **kwargs)
        wcs.wcs.crpix = np.asarray(wcs.wcs.crpix) + [7.0, 0.0]
        wcs.wcs.set()
        return wcs

    monkeypatch.setattr(za, "wcs_from_star_match", off_by_7px)
    unsolvable = {sorted(by_content)[3]}
    solver = _FailingSolver(by_content, unsolvable)
    records, report, _ = _solve_phase(info, tmp_path / "o", solver, monkeypatch)
    assert len(solver.solved) == 8 and len(set(solver.solved)) == 8  # each frame solved once
    assert len(records) == 7 and len(report.frames_skipped) == 1
    assert {r.wcs_source for r in records} == {"solved"}
    for r in records:
        assert za.wcs_pixel_offset(r.wcs, truths[r.path], r.info.shape_hw) < 0.3

    again = _FailingSolver(by_content, unsolvable)
    records2, report2, _ = _solve_phase(info, tmp_path / "o", again, monkeypatch)
    assert again.solved == sorted(unsolvable)  # only the frame the cache has nothing for
    assert [r.path for r in records2] == [r.path for r in records]
    assert [s["path"] for s in report2.frames_skipped] == [s["path"] for s in report.frames_skipped]
    for r1, r2 in zip(records, records2):
        assert za.wcs_pixel_offset(r1.wcs, r2.wcs, r1.info.shape_hw) < 1e-6


def test_a_bug_in_star_matching_stops_the_solve_phase(unsolved_small, tmp_path, monkeypatch):
    info, _truths, by_content = unsolved_small

    def buggy(*args, **kwargs):
        raise TypeError("a bug in matching")

    import astroalign

    monkeypatch.setattr(astroalign, "find_transform", buggy)
    with pytest.raises(TypeError, match="a bug in matching"):
        _solve_phase(info, tmp_path / "o", _TruthSolver(by_content), monkeypatch)


def test_a_bug_in_star_matching_stops_the_alignment(tmp_path, monkeypatch):
    info = zemosaic_synth.generate_dataset(tmp_path / "d", panels=(1, 1), frames_per_panel=3,
                                           seed=3, size="small")

    def buggy(*args, **kwargs):
        raise TypeError("a bug in matching")

    monkeypatch.setattr(za, "_refine_match", buggy)
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / "o"),
                          num_processing_workers=1)
    with pytest.raises(TypeError, match="a bug in matching"):
        zw.run_mosaic(config)


def test_without_a_solver_frames_are_skipped_with_one_warning(unsolved_small, tmp_path, monkeypatch, caplog):
    info, _truths, _ = unsolved_small
    monkeypatch.setattr(za, "solver_from_config", lambda config: (None, "solve-field not found"))
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / "o"))
    with pytest.raises(zw.PipelineError, match="no usable frame"):
        zw.run_mosaic(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == 30]
    assert len(warnings) == 1 and "apt-get install astrometry.net" in warnings[0]
    assert "8 frame(s)" in warnings[0]


def test_a_frame_that_keeps_its_header_wcs_anchors_the_others(unsolved_small, tmp_path, monkeypatch):
    """With one frame per panel carrying a WCS, nothing is solved but the checks."""
    info, truths, by_content = unsolved_small
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, path in enumerate(info["frame_paths"]):
        with fits.open(path) as hdul:
            if i % 4 == 1:
                hdul[0].header.extend(truths[path].to_header(), update=True)
            hdul.writeto(frames / Path(path).name)
    solver = _TruthSolver(by_content)
    records, _report, _ = _solve_phase({"frames_dir": str(frames)}, tmp_path / "o", solver, monkeypatch)
    assert [r.wcs_source for r in records].count("header") == 2
    assert solver.calls == 2  # the two checks
    for r in records:
        truth = truths[str(Path(info["frames_dir"]) / Path(r.path).name)]
        assert za.wcs_pixel_offset(r.wcs, truth, r.info.shape_hw) < 0.3


# --------------------------------------------------------------------------------------------------
# astrometry.net for real
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_solver
def test_synthetic_real_sky_frames_solved_and_mosaic_astrometry_true(tmp_path):
    info = zemosaic_synth.generate_dataset(tmp_path / "d", panels=(2, 1), frames_per_panel=3, seed=5,
                                           size="full", star_catalog="tycho2", write_wcs=False,
                                           pointing_error_deg=0.25, satellite=False)
    out = tmp_path / "o"
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(out))
    result = zw.run_mosaic(config)
    report = result.report
    assert len(report.frames_used) == 6 and not report.frames_skipped
    sources = [e["wcs"] for e in report.used_frame_wcs()]
    assert sources.count("solved") >= 2 and any(s.startswith("matched to") for s in sources)
    assert all(e["solve_s"] is not None for e in report.used_frame_wcs() if e["wcs"] == "solved")
    # Every frame's WCS against the truth, from the cache the run left.
    meta = json.loads(Path(info["truth_json"]).read_text())
    cache = za.WcsCache(str(out / zw.CACHE_DIR / zw.WCS_CACHE_DIR))
    for fr, path in zip(meta["frames"], info["frame_paths"]):
        wcs = cache.get(za.file_sha256(path)).wcs
        assert za.wcs_pixel_offset(wcs, _frame_truth_wcs(fr, (1920, 1080)), (1920, 1080)) < 0.3
    # The mosaic's astrometry: where its WCS puts the catalogue stars is where they are.
    mosaic, wcs, coverage, _ = read_image_fits(out / "zemosaic_mosaic.fits")
    offsets = _star_offsets(mosaic, wcs, coverage, Path(info["truth_fits"]))
    assert len(offsets) >= 20 and np.median(offsets) < 0.3

    # A rerun uses the cache: no solver process is started.
    def no_process(*args, **kwargs):
        raise AssertionError(f"a process was started: {args[0]}")

    import unittest.mock

    with unittest.mock.patch.object(subprocess, "run", no_process):
        again = zw.run_mosaic(config)
    assert {e["wcs"] for e in again.report.used_frame_wcs()} == {"cache"}


def _star_offsets(mosaic, wcs, coverage, truth_fits):
    """Return the distances (px) between catalogue stars' centroids in a mosaic and their WCS position."""
    with fits.open(truth_fits) as hdul:
        stars = hdul["STARS"].data
    lum = mosaic.mean(axis=2)  # NaN where any channel has no data
    x, y = wcs.all_world2pix(stars["RA"], stars["DEC"], 0)
    peak = stars["PEAK_G"]
    h, w = lum.shape
    offsets = []
    for xi, yi, p in zip(x, y, peak):
        if not (2000 < p < 30000) or not (10 < xi < w - 10 and 10 < yi < h - 10):
            continue
        x0, y0 = int(round(xi)), int(round(yi))
        if coverage[y0, x0] < 2:
            continue
        box = lum[y0 - 5:y0 + 6, x0 - 5:x0 + 6]
        if not np.isfinite(box).all():
            continue
        box = box - np.median(box)
        box = np.clip(box, 0, None)
        yy, xx = np.mgrid[-5:6, -5:6]
        cx, cy = (box * xx).sum() / box.sum(), (box * yy).sum() / box.sum()
        offsets.append(np.hypot(x0 + cx - xi, y0 + cy - yi))
    return np.array(offsets)


@pytest.mark.slow
@needs_solver
@pytest.mark.skipif(not REALDATA.is_dir(), reason="shared real Seestar frames not present")
def test_real_seestar_subs_of_two_nights_all_reach_the_mosaic(tmp_path):
    reference = reference_frames()
    out = tmp_path / "o"
    # force_resolve: every frame is solved or matched here, none taken from another program.
    config = MosaicConfig(input_folder=str(REALDATA), output_folder=str(out),
                          force_resolve_existing_wcs=True)
    result = zw.run_mosaic(config)
    assert len(result.report.frames_used) == 6 and not result.report.frames_skipped
    cache = za.WcsCache(str(out / zw.CACHE_DIR / zw.WCS_CACHE_DIR))
    for name, entry in reference.items():
        path = REALDATA / name
        assert za.file_sha256(str(path)) == entry["sha256"]  # inputs byte-identical
        wcs = cache.get(entry["sha256"]).wcs
        truth = reference_wcs(entry)
        centre_wcs = wcs.pixel_to_world(539.5, 959.5)
        assert centre_wcs.separation(truth.pixel_to_world(539.5, 959.5)).arcsec < 1.0, name
        assert za.wcs_pixel_offset(wcs, truth, (1920, 1080)) < 0.3, name
    sources = [e["wcs"] for e in result.report.used_frame_wcs()]
    assert sources.count("solved") <= 3  # solve few, match many


def _gaussian_stars(rng, n, shape=(400, 600), fwhm=2.6, sky=1000.0, noise=10.0):
    """Return ``(image (H, W, 3), true (x, y))``: round Gaussian stars at random sub-pixel positions."""
    h, w = shape
    xy = np.column_stack([rng.uniform(20, w - 20, n), rng.uniform(20, h - 20, n)])
    sigma = fwhm / 2.3548
    yy, xx = np.mgrid[-8:9, -8:9]
    image = np.full((h, w), sky)
    for (x, y), flux in zip(xy, np.exp(rng.uniform(np.log(2e3), np.log(5e4), n))):
        ix, iy = int(x), int(y)
        image[iy - 8:iy + 9, ix - 8:ix + 9] += flux / (2 * np.pi * sigma**2) * np.exp(
            -((xx - (x - ix)) ** 2 + (yy - (y - iy)) ** 2) / (2 * sigma**2))
    image = image + rng.normal(0, noise, image.shape)
    return np.repeat(image[..., None], 3, axis=2).astype(np.float32), xy


def test_refined_centroids_recover_sub_pixel_positions_from_rough_ones():
    rng = np.random.default_rng(4)
    image, truth = _gaussian_stars(rng, 60)
    rough = truth + rng.uniform(-1.0, 1.0, truth.shape)  # e.g. 2x2 superpixel positions
    refined = za.refine_centroids(image, rough)
    error = np.hypot(*(refined - truth).T)
    from scipy.spatial import cKDTree

    neighbour, _ = cKDTree(truth).query(truth, k=2)
    alone = neighbour[:, 1] > 12  # a neighbour in the window pulls the centroid, as it would any
    assert np.median(error) < 0.02 and np.max(error[alone]) < 0.1, np.sort(error[alone])[-5:]
    # A star too near the edge, or in no data, keeps its rough position.
    edge = za.refine_centroids(image, np.array([[2.0, 2.0]]))
    assert np.array_equal(edge, [[2.0, 2.0]])
    blank = image.copy()
    blank[:] = np.nan
    assert np.array_equal(za.refine_centroids(blank, rough[:3]), rough[:3])


def test_alignment_stars_on_superpixels_are_as_precise_as_at_full_resolution():
    """A dense frame's alignment stars come from 2x2 superpixels, refined at full resolution: they
    must land on the true positions as well as a full-resolution detection does."""
    import zemosaic_align_stack as zas

    rng = np.random.default_rng(5)
    image, truth = _gaussian_stars(rng, 220)
    fast = zas.alignment_stars(image)
    full = za.frame_stars(image, binning=1)
    assert len(fast) >= zas._SUPERPIXEL_STARS

    def errors(found):
        from scipy.spatial import cKDTree

        dist, _ = cKDTree(truth).query(found)
        return dist[dist < 1.0]

    assert len(errors(fast)) >= 0.9 * len(fast)
    assert np.median(errors(fast)) <= 1.1 * np.median(errors(full)), (np.median(errors(fast)), np.median(errors(full)))


class _SlowTruthSolver(_TruthSolver):
    """The truth solver, taking 0.3 s per run like a short solve-field; records when each ran."""

    def __init__(self, frames):
        super().__init__(frames)
        self.spans, self._lock = [], threading.Lock()

    def solve(self, image2d, hints, timeout_s, workdir):
        start = time.monotonic()
        time.sleep(0.3)
        wcs = super().solve(image2d, hints, timeout_s, workdir)
        with self._lock:
            self.spans.append((start, time.monotonic()))
        return wcs


def test_pointing_groups_are_solved_at_once_with_the_same_result(unsolved_small, tmp_path, monkeypatch):
    """Two panels with two workers: their solver runs overlap in time, and every frame gets the
    WCS, source and skip it gets with one worker."""
    info, _truths, by_content = unsolved_small
    outcomes = {}
    for workers in (1, 2):
        solver = _SlowTruthSolver(by_content)
        monkeypatch.setattr(za, "solver_from_config", lambda config: (solver, None))
        config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / f"o{workers}"),
                              num_processing_workers=workers)
        run = zw.Run(config, zw.RunReport(config={}))
        records = zw.solve_frames(run, zw.scan_frames(run))
        outcomes[workers] = ({r.path: (r.wcs_source, zf.wcs_to_cd_header(r.wcs).tostring()) for r in records},
                             run.report.frames_skipped, solver.calls)
        overlaps = sum(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(solver.spans)
                       for b0, b1 in solver.spans[i + 1:])
        assert (overlaps > 0) == (workers == 2), solver.spans
    assert outcomes[1] == outcomes[2]
    assert outcomes[1][2] == 4 and len(outcomes[1][0]) == 8
