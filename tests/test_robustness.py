"""Bad frames, busy output folders and interrupted runs (issue 9), on small synthetic data."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
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
    skipped = {Path(s["path"]).name: s["reason"] for s in bad_run["result"].report["frames_skipped"]}
    assert set(skipped) == set(bad_run["expected"])
    for name, words in bad_run["expected"].items():
        assert words in skipped[name], (name, skipped[name])
    assert len(bad_run["result"].report["frames_used"]) == 6


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
    assert len(result.report["frames_used"]) == 6
    # A second run there skips the first run's tiles as products, not as frames to stack.
    again = _run(folder, folder)
    assert len(again.report["frames_used"]) == 6


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
    assert {Path(s["path"]).name: s["reason"] for s in result.report["frames_skipped"]} == \
        {"zero_shifted.fits": "all pixels are zero"}
    _, _, coverage, _ = read_image_fits(tmp_path / "out" / zw.TILES_DIR / "master_tile_000.fits")
    _, _, clean_coverage, _ = read_image_fits(dataset["clean_out"] / zw.TILES_DIR / "master_tile_000.fits")
    # Its footprint 0.04 deg (60 px) north is not in the tile: the tile is no larger than the
    # clean one (the reference may differ: the skipped frame still moved the panel's centre).
    assert coverage.size <= clean_coverage.size and np.mean(coverage > 0) > 0.9
