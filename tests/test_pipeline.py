"""End-to-end: synthetic Seestar frames with known truth through the whole pipeline."""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.ndimage import binary_erosion

import photometry_truth as pt
import zemosaic_synth
import zemosaic_worker as zw
from zemosaic_config import config_from_dict
from zemosaic_fits import read_image_fits

ROOT = Path(__file__).resolve().parents[1]
FRAMES_PER_PANEL = 5
BAD_FILES = {
    "bad_truncated.fits": "truncated",
    "bad_text.fits": "not a FITS",
    "bad_nowcs.fits": "no celestial WCS",
    "bad_zero.fits": "zero",
    "bad_singular.fits": "singular",
}
# Frames without a usable WCS are plate-solved or star-matched: these two hold noise only, so
# neither works and they are skipped with the reason (with or without a solver installed).
UNSOLVABLE = ("bad_nowcs.fits", "bad_singular.fits")


def _checksums(folder):
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
            for p in sorted(map(str, Path(folder).rglob("*"))) if Path(p).is_file()}


def _add_bad_files(frames_dir):
    """Write the five kinds of unusable input next to good frames."""
    good = sorted(Path(frames_dir).glob("Light_*.fits"))[0]
    with fits.open(good) as hdul:
        header, data = hdul[0].header.copy(), hdul[0].data.copy()
    noise = np.random.default_rng(3).normal(1000.0, 30.0, data.shape).astype(np.uint16)
    blob = good.read_bytes()
    (Path(frames_dir) / "bad_truncated.fits").write_bytes(blob[: len(blob) // 2])
    (Path(frames_dir) / "bad_text.fits").write_text("this is not a FITS file\n")
    nowcs = header.copy()
    for key in list(nowcs):
        if key.startswith(("CTYPE", "CRVAL", "CRPIX", "CD1_", "CD2_", "CUNIT")):
            del nowcs[key]
    fits.PrimaryHDU(noise, nowcs).writeto(Path(frames_dir) / "bad_nowcs.fits")
    fits.PrimaryHDU(np.zeros_like(data), header).writeto(Path(frames_dir) / "bad_zero.fits")
    singular = header.copy()
    singular["CD1_1"], singular["CD1_2"] = singular["CD2_1"], singular["CD2_2"]
    fits.PrimaryHDU(noise, singular).writeto(Path(frames_dir) / "bad_singular.fits")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One run on a 2x2-panel dataset with bad files, the output folder inside the input folder."""
    root = tmp_path_factory.mktemp("e2e")
    info = zemosaic_synth.generate_dataset(root, panels=(2, 2), frames_per_panel=FRAMES_PER_PANEL,
                                           seed=7, size="small")
    frames_dir = Path(info["frames_dir"])
    _add_bad_files(frames_dir)
    out = frames_dir / "zemosaic_out"
    # A FITS left by an earlier run in the output folder must not be read as an input frame.
    (out / "master_tiles").mkdir(parents=True)
    with fits.open(sorted(frames_dir.glob("Light_*.fits"))[0]) as hdul:
        hdul[0].header["ZMVERS"] = zw.__version__
        hdul.writeto(out / "master_tiles" / "master_tile_999.fits")
    before = _checksums(frames_dir)
    before = {k: v for k, v in before.items() if "zemosaic_out" not in k}
    config = config_from_dict({"input_folder": str(frames_dir), "output_folder": str(out)})
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    progress = []
    try:
        result = zw.run_mosaic(config, progress=lambda *a: progress.append(a))
    finally:
        logging.getLogger().removeHandler(handler)
    return {"root": root, "info": info, "frames_dir": frames_dir, "out": out, "result": result,
            "before": before, "records": records, "progress": progress}


def test_outputs_exist_with_expected_layout(run):
    out = run["out"]
    with fits.open(out / "zemosaic_mosaic.fits") as hdul:
        assert hdul[0].header["BITPIX"] == -32 and hdul[0].data.ndim == 3 and hdul[0].data.shape[0] == 3
        assert "CD1_1" in hdul[0].header and "PC1_1" not in hdul[0].header
        assert hdul["COVERAGE"].header["BITPIX"] == -32
        assert hdul["COVERAGE"].data.shape == hdul[0].data.shape[1:]
    assert (out / "zemosaic_mosaic_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tiles = sorted((out / "master_tiles").glob("master_tile_0*.fits"))
    assert [t.name for t in tiles] == [f"master_tile_{i:03d}.fits" for i in range(4)]
    with fits.open(tiles[0]) as hdul:
        assert hdul[0].header["NFRAMES"] == FRAMES_PER_PANEL
        assert hdul[0].header["REJALGO"] == "winsorized_sigma_clip"
        assert hdul["COVERAGE"].data.max() == FRAMES_PER_PANEL
    report = json.loads((out / "zemosaic_run.json").read_text())
    assert report["version"] == zw.__version__
    assert len(report["frames_used"]) == 4 * FRAMES_PER_PANEL
    assert len(report["tiles"]) == 4
    assert set(report["timings_s"]) >= set(zw.PHASES)
    assert report["backends"]["assembly"] == "cpu"
    assert report["config"]["stacking_rejection_algorithm"] == "winsorized_sigma_clip"
    assert not list(out.rglob(".*.tmp"))
    stacks = out / zw.CACHE_DIR / zw.STACK_CACHE_DIR
    assert not stacks.exists() or not list(stacks.iterdir())
    assert {e["wcs"] for e in report["frame_wcs"]} == {"header"}
    assert len(report["frame_wcs"]) == len(report["frames_used"])


def test_progress_reports_every_phase(run):
    phases = {p[0] for p in run["progress"]}
    assert phases >= set(zw.PHASES)
    scan = [p for p in run["progress"] if p[0] == "scan" and p[2] > 1]
    assert scan[-1][1] == scan[-1][2]


def test_bad_inputs_skipped_with_reason_and_one_warning(run):
    report = run["result"].report
    skipped = {Path(s["path"]).name: s["reason"] for s in report.frames_skipped}
    assert set(skipped) == set(BAD_FILES)
    for name, words in BAD_FILES.items():
        assert words.lower() in skipped[name].lower(), (name, skipped[name])
        if name in UNSOLVABLE:
            assert "plate" in skipped[name], skipped[name]
        warnings = [r for r in run["records"] if r.levelno == logging.WARNING and name in r.getMessage()]
        assert len(warnings) == 1, name
    assert not any("master_tile_999" in p for p in report.frames_used)


def test_inputs_never_modified(run):
    after = {k: v for k, v in _checksums(run["frames_dir"]).items() if "zemosaic_out" not in k}
    assert after == run["before"]


def _truth_on_mosaic(run):
    mosaic, wcs, coverage, _hdr = read_image_fits(run["out"] / "zemosaic_mosaic.fits")
    # The analytic sky model at the mosaic's pixel centres: a truth not made by the co-add under test.
    truth = pt.truth_on_grid(run["root"], wcs, mosaic.shape[:2])
    return mosaic, truth, coverage, wcs


def _block_mean(a, b=16):
    h, w = a.shape[0] // b * b, a.shape[1] // b * b
    return a[:h, :w].reshape(h // b, b, w // b, b, *a.shape[2:]).mean(axis=(1, 3))


def _fit_channels(mosaic, truth, coverage):
    """Per-channel least squares mosaic = a * truth + b on 16x16 block means of covered pixels.

    Block means conserve flux whatever the PSF, so resampling blur cannot bias the slope.
    """
    solid = _block_mean(binary_erosion(coverage >= FRAMES_PER_PANEL - 1, iterations=2).astype(float)) == 1
    fits_ = []
    for c in range(3):
        m = _block_mean(np.nan_to_num(mosaic[..., c]))[solid]
        t = _block_mean(np.nan_to_num(truth[..., c]))[solid]
        a, b = np.polyfit(t, m, 1)
        resid = m - (a * t + b)
        # Typical residual against the signal's range (saturated star cores are the outliers).
        fits_.append((a, b, np.percentile(np.abs(resid), 90) / np.ptp(np.percentile(m, [1, 99]))))
    return fits_


def test_flux_scale_and_colour_match_truth(run):
    mosaic, truth, coverage, _ = _truth_on_mosaic(run)
    fitted = _fit_channels(mosaic, truth, coverage)
    meta = json.loads((run["root"] / "truth" / "truth.json").read_text())
    clearest = [max(f["transparency"] for f in meta["frames"] if f["panel"] == p) for p in range(4)]
    gains = np.array([a for a, _b, _r in fitted])
    # Tiles are scaled to their clearest frame: the flux scale sits within those frames' range.
    assert np.all(gains > min(clearest) - 0.02) and np.all(gains < max(clearest) + 0.02), (gains, clearest)
    assert np.all(np.abs(gains - 1) < 0.06)
    assert gains[0] / gains[1] == pytest.approx(1.0, abs=0.02)  # R/G
    assert gains[2] / gains[1] == pytest.approx(1.0, abs=0.02)  # B/G
    assert all(r < 0.03 for *_x, r in fitted)  # the linear model explains the mosaic


def test_coverage_sum_of_weights_and_zero_outside(run):
    mosaic, _truth, coverage, wcs = _truth_on_mosaic(run)
    assert np.array_equal(coverage == 0, np.all(np.isnan(mosaic), axis=-1))
    assert coverage.max() > FRAMES_PER_PANEL + 1  # overlaps add tile coverages
    info = run["info"]
    ones, frame_wcs = [], []
    for path in info["frame_paths"]:
        hdr = fits.getheader(path)
        from astropy.wcs import WCS

        frame_wcs.append(WCS(hdr))
        ones.append(np.ones((hdr["NAXIS2"], hdr["NAXIS1"]), np.float32))
    union = sum(pt.resample_bilinear(o, w, wcs, coverage.shape) for o, w in zip(ones, frame_wcs))
    outside = binary_erosion(union == 0, iterations=3)
    assert outside.sum() > 0 and np.all(coverage[outside] == 0)
    inside = binary_erosion(union >= 1, iterations=3)
    assert np.all(coverage[inside] > 0)
    # The grid covers every frame: no frame corner falls outside the mosaic.
    for w, o in zip(frame_wcs, ones):
        h, wd = o.shape
        world = w.pixel_to_world_values([0, wd - 1, 0, wd - 1], [0, 0, h - 1, h - 1])
        x, y = wcs.world_to_pixel_values(*world)
        assert np.all((x > -1) & (x < coverage.shape[1]) & (y > -1) & (y < coverage.shape[0]))


def test_seams_are_small(run):
    """Overlaps (two or more tiles) sit at the same level as single-tile areas after matching."""
    mosaic, truth, coverage, _ = _truth_on_mosaic(run)
    fitted = _fit_channels(mosaic, truth, coverage)
    ok = np.all(np.isfinite(mosaic), axis=-1) & np.all(np.isfinite(truth), axis=-1)
    single = ok & (coverage > 0.8 * FRAMES_PER_PANEL) & (coverage < 1.2 * FRAMES_PER_PANEL)
    overlap = ok & (coverage > 1.8 * FRAMES_PER_PANEL)
    assert single.sum() > 1000 and overlap.sum() > 1000
    for c, (a, b, _r) in enumerate(fitted):
        resid = mosaic[..., c] - (a * truth[..., c] + b)
        noise = 1.4826 * np.median(np.abs(resid[single] - np.median(resid[single])))
        step = abs(np.median(resid[overlap]) - np.median(resid[single]))
        assert step < 0.2 * noise


def test_split_group_caps_tile_size():
    group = list(range(10))
    assert zw.split_group(group, 0) == [group]
    assert zw.split_group(group, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert zw.split_group(group, 10) == [group]


def test_cancel_leaves_no_mosaic(tmp_path):
    import threading

    info = zemosaic_synth.generate_dataset(tmp_path / "d", panels=(1, 2), frames_per_panel=3, seed=2)
    out = tmp_path / "out"
    cancel = threading.Event()

    def progress(phase, done, total, message):
        if phase == "master_tiles" and done >= 2:
            cancel.set()

    config = config_from_dict({"input_folder": info["frames_dir"], "output_folder": str(out)})
    with pytest.raises(zw.Cancelled):
        zw.run_mosaic(config, progress=progress, cancel=cancel)
    assert not (out / "zemosaic_mosaic.fits").exists()
    assert not list(out.rglob("*.tmp"))


def _cli(config_path, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "zemosaic_worker", str(config_path), *extra],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_cli_success_prints_summary(run, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"input_dir": str(run["frames_dir"]), "output_dir": str(tmp_path / "o"),
                               "stacking_rejection_algorithm": "kappa_sigma"}))
    proc = _cli(cfg, "--log-level", "WARNING")
    assert proc.returncode == 0, proc.stderr
    # The first run's outputs now sit inside the input folder: recognised and skipped.
    assert "frames used:    20" in proc.stdout and "not a raw frame" in proc.stdout
    assert (tmp_path / "o" / "zemosaic_mosaic.fits").exists()


@pytest.mark.parametrize("case, code, words", [
    ("missing_input", 1, "input folder not found"),
    ("no_frames", 1, "no usable frame"),
    ("unwritable_output", 1, "output folder is not writable"),
    ("bad_value", 2, "stacking_kappa_low = -2"),
    ("bad_json", 2, "line"),
])
def test_cli_failures_one_line_no_traceback(tmp_path, case, code, words):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "notes.fits").write_text("not a frame")
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("x")
    settings = {"input_folder": str(inp), "output_folder": str(tmp_path / "out")}
    if case == "missing_input":
        settings["input_folder"] = str(tmp_path / "nope")
    elif case == "unwritable_output":
        settings["output_folder"] = str(blocker / "sub")
    elif case == "bad_value":
        settings["stacking_kappa_low"] = -2
    cfg = tmp_path / "c.json"
    cfg.write_text("{ not json" if case == "bad_json" else json.dumps(settings))
    proc = _cli(cfg)
    assert proc.returncode == code
    assert words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("zemosaic: error")]) == 1


def test_cli_debug_shows_traceback_and_mt_coverage(tmp_path):
    info = zemosaic_synth.generate_dataset(tmp_path / "d", panels=(1, 1), frames_per_panel=3, seed=7,
                                           size="small")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"input_folder": info["frames_dir"], "output_folder": str(tmp_path / "o")}))
    proc = _cli(cfg, "--log-level", "DEBUG")
    assert proc.returncode == 0, proc.stderr
    assert "DEBUG zemosaic_master_tile: MT_COVERAGE: propagate_mask=True (tile 000, 3 frames)" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = tmp_path / "missing"
    cfg.write_text(json.dumps({"input_folder": str(missing), "output_folder": str(tmp_path / "o2")}))
    proc = _cli(cfg, "--log-level", "DEBUG")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"zemosaic_worker.PipelineError: input folder not found: {missing}" in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"zemosaic: error: input folder not found: {missing}"
