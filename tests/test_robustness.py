"""Bad frames, busy output folders and interrupted runs (issue 9), on small synthetic data."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import zemosaic_synth
import zemosaic_worker as zw
from zemosaic_config import config_from_dict
from zemosaic_fits import read_image_fits

ROOT = Path(__file__).resolve().parents[1]
# Sort like the originals: the good frames keep their order, so the stacks are bit-identical.
NON_ASCII = ("_é", "_星", "_🔭")


def _checksums(folder):
    """Content hashes of the regular files (the 20 GB sparse one by its size and head only)."""
    return {str(p): hashlib.sha256(p.open("rb").read(1 << 24)).hexdigest() + str(p.stat().st_size)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _run(frames, out, **settings):
    config = config_from_dict({"input_folder": str(frames), "output_folder": str(out), **settings})
    return zw.run_mosaic(config)


def _mosaic(out):
    image, _, coverage, _ = read_image_fits(Path(out) / zw.MOSAIC_NAME)
    return image, coverage


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A 1x2-panel set of 3 small frames per panel with non-ASCII names, and its clean mosaic."""
    root = tmp_path_factory.mktemp("robust")
    info = zemosaic_synth.generate_dataset(root / "synth", panels=(1, 2), frames_per_panel=3,
                                           seed=11, size="small")
    frames = root / "frames"
    frames.mkdir()
    for k, src in enumerate(sorted(Path(info["frames_dir"]).glob("*.fits"))):
        shutil.copy(src, frames / f"{src.stem}{NON_ASCII[k % 3]}.fits")
    clean = _run(frames, root / "clean_out")
    return {"root": root, "frames": frames, "clean": clean, "clean_out": root / "clean_out"}


def _bad_frames(folder, good):
    """Write next to the good frames one file for each frame problem of issue 9; returns names."""
    with fits.open(good) as hdul:
        header, data = hdul[0].header.copy(), hdul[0].data.copy()
    for name, dra in (("missolved_3deg.fits", 3.0), ("missolved_10deg.fits", 10.0),
                      ("missolved_180deg.fits", 180.0)):
        moved = header.copy()
        moved["CRVAL1"] = (moved["CRVAL1"] + dra) % 360.0
        fits.PrimaryHDU(data, moved).writeto(folder / name)
    zero = header.copy()
    for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
        zero[key] = zero[key] * 10.0
    fits.PrimaryHDU(np.zeros_like(data), zero).writeto(folder / "zero_10x_scale.fits")
    mono = header.copy()
    del mono["BAYERPAT"]
    fits.PrimaryHDU(np.zeros((201, 298), np.float32) + 1000.0, mono).writeto(folder / "small_mono.fits")
    fits.PrimaryHDU(data.astype(np.float32)[None], mono).writeto(folder / "mono_same_size.fits")
    # A header claiming 100000 x 100000 px over a sparse file of that size: nothing is read.
    huge = fits.PrimaryHDU(np.zeros((2, 2), np.uint16), header.copy()).header
    huge["NAXIS1"], huge["NAXIS2"] = 100_000, 100_000
    path = folder / "huge_header.fits"
    path.write_bytes(huge.tostring().encode("ascii"))
    with open(path, "r+b") as fh:
        fh.truncate(2880 * int(np.ceil((len(huge.tostring()) + 2 * 100_000 ** 2) / 2880)))
    os.mkfifo(folder / "pipe.fits")
    return {
        "missolved_3deg.fits": "overlaps no other frame", "missolved_10deg.fits": "overlaps no other frame",
        "missolved_180deg.fits": "overlaps no other frame",
        "zero_10x_scale.fits": "pixel scale 23.90\"/px differs from the other frames' 2.39\"/px",
        "small_mono.fits": "frame size 298x201 px differs from the other frames' 270x480 px",
        "mono_same_size.fits": "1 channel(s) where the other frames have 3",
        "huge_header.fits": "frame size 100000x100000 px differs",
        "pipe.fits": "not a regular file",
    }


@pytest.fixture(scope="module")
def bad_run(dataset):
    """The clean frames plus every kind of bad frame, in one run."""
    frames = dataset["root"] / "bad_frames"
    shutil.copytree(dataset["frames"], frames)
    expected = _bad_frames(frames, sorted(frames.glob("Light_*.fits"))[0])
    before = _checksums(frames)
    t0 = time.perf_counter()
    result = _run(frames, dataset["root"] / "bad_out")
    return {"frames": frames, "expected": expected, "before": before, "result": result,
            "out": dataset["root"] / "bad_out", "elapsed": time.perf_counter() - t0}


def test_every_bad_frame_skipped_with_its_reason(bad_run):
    skipped = {Path(s["path"]).name: s["reason"] for s in bad_run["result"].report.frames_skipped}
    assert set(skipped) == set(bad_run["expected"])
    for name, words in bad_run["expected"].items():
        assert words in skipped[name], (name, skipped[name])
    assert len(bad_run["result"].report.frames_used) == 6


def test_bad_frames_leave_the_mosaic_as_without_them(dataset, bad_run):
    """Skipped frames size nothing: same tiles, same grid, same pixels as the clean run."""
    image, coverage = _mosaic(bad_run["out"])
    clean_image, clean_coverage = _mosaic(dataset["clean_out"])
    assert image.shape == clean_image.shape
    np.testing.assert_array_equal(image, clean_image)
    np.testing.assert_array_equal(coverage, clean_coverage)
    assert np.mean(coverage > 0) > 0.8  # the grid holds the data, not empty sky


def test_inputs_untouched_and_non_ascii_names_in_the_tile_header(dataset, bad_run):
    assert _checksums(bad_run["frames"]) == bad_run["before"]
    with fits.open(bad_run["out"] / zw.TILES_DIR / "master_tile_000.fits") as hdul:
        reference = hdul[0].header["REFFRAME"]
    assert reference.startswith("Light_panel") and reference.isascii()


def test_output_folder_equal_to_input_folder_scans_subfolders(dataset, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(dataset["frames"], folder / "night1")
    result = _run(folder, folder)
    assert len(result.report.frames_used) == 6
    # A second run there skips the first run's tiles as products, not as frames to stack.
    again = _run(folder, folder)
    assert len(again.report.frames_used) == 6


def test_frame_failing_at_load_leaves_no_empty_footprint(dataset, tmp_path):
    """All zeros, a fifth of a field off: it joins a panel and is only found out when loaded."""
    frames = tmp_path / "frames"
    shutil.copytree(dataset["frames"], frames)
    good = sorted(frames.glob("Light_panel00_*.fits"))[0]
    with fits.open(good) as hdul:
        header, data = hdul[0].header.copy(), hdul[0].data
    header["CRVAL2"] = header["CRVAL2"] + 0.04
    fits.PrimaryHDU(np.zeros_like(data), header).writeto(frames / "zero_shifted.fits")
    result = _run(frames, tmp_path / "out")
    assert {Path(s["path"]).name: s["reason"] for s in result.report.frames_skipped} == \
        {"zero_shifted.fits": "all pixels are zero"}
    _, _, coverage, _ = read_image_fits(tmp_path / "out" / zw.TILES_DIR / "master_tile_000.fits")
    _, _, clean_coverage, _ = read_image_fits(dataset["clean_out"] / zw.TILES_DIR / "master_tile_000.fits")
    # Its footprint 0.04 deg (60 px) north is not in the tile: the tile is no larger than the
    # clean one (the reference may differ: the skipped frame still moved the panel's centre).
    assert coverage.size <= clean_coverage.size and np.mean(coverage > 0) > 0.9


# --------------------------------------------------------------------------------------------------
# One run per output folder, interrupted runs, stale outputs
# --------------------------------------------------------------------------------------------------


def _cli(config_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "zemosaic_worker", str(config_path),
                             "--log-level", "WARNING"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _config_file(tmp_path, frames, out, **settings):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"input_folder": str(frames), "output_folder": str(out), **settings}))
    return path


def _wait_for(path, proc, timeout=120.0):
    t0 = time.perf_counter()
    while not Path(path).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.perf_counter() - t0 < timeout
        time.sleep(0.01)


def test_second_run_into_a_busy_output_folder_refuses(dataset, tmp_path):
    import zemosaic_runstate as zrun

    out = tmp_path / "out"
    out.mkdir()
    with zrun.acquire_output_lock(str(out), "/somewhere/else"):
        proc = _cli(_config_file(tmp_path, dataset["frames"], out))
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    errors = [line for line in stderr.splitlines() if line.startswith("zemosaic: error")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert f"output folder {out} is in use" in errors[0]
    assert f"pid {os.getpid()}" in errors[0] and "/somewhere/else" in errors[0]
    assert not (out / zw.MOSAIC_NAME).exists() and not (out / zw.TILES_DIR).exists()
    # Released: the folder is free again and no lock file is left behind.
    assert not (out / zrun.LOCK_NAME).exists()


def test_sigterm_exits_143_with_one_line_and_no_partial_output(dataset, tmp_path):
    out = tmp_path / "out"
    proc = _cli(_config_file(tmp_path, dataset["frames"], out))
    _wait_for(out / zw.TILES_DIR / "manifest.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == ["zemosaic: terminated (SIGTERM); no mosaic written"]
    assert not (out / zw.MOSAIC_NAME).exists() and not (out / zw.REPORT_NAME).exists()
    assert not list(out.rglob("*.tmp")) and not (out / ".zemosaic.lock").exists()


def test_rerun_after_a_crash_reuses_finished_tiles_and_gives_the_same_mosaic(dataset, tmp_path,
                                                                          caplog):
    out = tmp_path / "out"
    # One tile after the other, so the crash comes after the first tile and before the second.
    proc = _cli(_config_file(tmp_path, dataset["frames"], out, num_processing_workers=1))
    _wait_for(out / zw.TILES_DIR / "manifest.json", proc)
    proc.kill()  # like a crash or a power cut: nothing is unwound
    proc.communicate()
    assert (out / ".zemosaic.lock").exists()
    manifest = json.loads((out / zw.TILES_DIR / "manifest.json").read_text())
    assert list(manifest["tiles"]) == ["master_tile_000.fits"]
    # What a crash in the middle of an atomic write leaves behind.
    leftover = out / zw.TILES_DIR / ".master_tile_001.fits.0123456789abcdef.tmp"
    leftover.write_bytes(b"half a tile")
    with caplog.at_level("INFO"):
        result = _run(dataset["frames"], out)
    assert "Taking over the output folder from an earlier run" in caplog.text
    assert not leftover.exists() and not (out / ".zemosaic.lock").exists()
    assert [t["reused"] for t in result.report.tiles] == [True, False]
    report = json.loads((out / zw.REPORT_NAME).read_text())
    assert [t["reused"] for t in report["tiles"]] == [True, False]
    image, coverage = _mosaic(out)
    clean_image, clean_coverage = _mosaic(dataset["clean_out"])
    np.testing.assert_array_equal(image, clean_image)
    np.testing.assert_array_equal(coverage, clean_coverage)
    assert result.report.frames_used == dataset["clean"].report.frames_used
    # resume = off rebuilds every tile, to the same mosaic.
    again = _run(dataset["frames"], out, resume="off")
    assert [t["reused"] for t in again.report.tiles] == [False, False]
    np.testing.assert_array_equal(_mosaic(out)[0], clean_image)


def test_outputs_of_an_earlier_run_are_removed(dataset, tmp_path):
    out = tmp_path / "out"
    first = _run(dataset["frames"], out, max_raw_per_master_tile=2)
    assert len(first.report.tiles) == 4
    second = _run(dataset["frames"], out)
    assert len(second.report.tiles) == 2
    names = sorted(p.name for p in (out / zw.TILES_DIR).iterdir())
    assert names == ["manifest.json", "master_tile_000.fits", "master_tile_001.fits"]
    # A rerun that fails leaves no mosaic of the run before beside it.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(zw.PipelineError, match="no usable frame"):
        _run(empty, out)
    assert not (out / zw.MOSAIC_NAME).exists() and not (out / zw.REPORT_NAME).exists()
    assert not list(out.glob("zemosaic_mosaic*"))
