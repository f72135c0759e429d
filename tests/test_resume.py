"""Resuming a run on raw subs: tile keys follow the WCS values, however each WCS was obtained."""

import threading

import numpy as np
import pytest
from astropy.wcs import WCS

import zemosaic_astrometry as za
import zemosaic_fits as zf
import zemosaic_runstate as zrun
import zemosaic_worker as zw
from test_astrometry import _TruthSolver, unsolved_small  # noqa: F401  (a fixture)
from zemosaic_config import MosaicConfig


def test_a_wcs_and_its_cached_copy_give_the_same_key():
    """A solved WCS whose CD element needs 16 digits is written to the cache's header text as 15:
    the copy read back differs in its last bit, and in its text, but not in a tile key."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval, wcs.wcs.crpix = [315.4, 68.16], [540.5, 960.5]
    wcs.wcs.cd = [[-6.4e-4, 7.164767483709003e-06], [7.2e-06, 6.4e-4]]  # a real solution's digits
    wcs.wcs.set()
    shape = (1920, 1080)
    cache_copy = zf.wcs_from_text(zf.wcs_to_cd_header(wcs).tostring())
    assert zf.wcs_to_cd_header(cache_copy).tostring() != zf.wcs_to_cd_header(wcs).tostring()
    assert zrun.wcs_key(wcs, shape) == zrun.wcs_key(cache_copy, shape)
    # A WCS that places the frame 0.01 px elsewhere is another key.
    moved = wcs.deepcopy()
    moved.wcs.crpix = np.asarray(moved.wcs.crpix) + [0.01, 0.0]
    moved.wcs.set()
    assert zrun.wcs_key(moved, shape) != zrun.wcs_key(wcs, shape)


def _cancel_after_one_tile(config) -> None:
    """Run ``config`` and cancel it once its first master tile is done."""
    cancel = threading.Event()

    def progress(phase, done, total, message=""):
        if phase == "master_tiles" and message.endswith(" done"):
            cancel.set()

    with pytest.raises(zw.Cancelled):
        zw.run_mosaic(config, progress=progress, cancel=cancel)


def test_raw_subs_interrupted_after_the_first_tile_resume_from_the_cache(unsolved_small, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    """The first run plate-solves and matches, and is cancelled once a tile is written; the second
    reads every WCS from the solve cache and must reuse that tile; a third reuses both."""
    info, _truths, by_content = unsolved_small
    solver = _TruthSolver(by_content)
    monkeypatch.setattr(za, "solver_from_config", lambda config: (solver, None))
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / "o"),
                          num_processing_workers=1)
    _cancel_after_one_tile(config)
    assert solver.calls > 0

    again = _TruthSolver(by_content)
    monkeypatch.setattr(za, "solver_from_config", lambda config: (again, None))
    second = zw.run_mosaic(config).report
    assert again.calls == 0 and {e["wcs"] for e in second.to_dict()["frame_wcs"]} == {"cache"}
    assert [t["reused"] for t in second.tiles] == [True, False]
    third = zw.run_mosaic(config).report
    assert [t["reused"] for t in third.tiles] == [True, True]


@pytest.fixture(scope="module")
def four_tiles(tmp_path_factory):
    """2 x 2 panels of three small frames: four tiles, two running at once on a pool of two."""
    import zemosaic_synth

    root = tmp_path_factory.mktemp("four")
    return zemosaic_synth.generate_dataset(root, panels=(2, 2), frames_per_panel=3, seed=4)["frames_dir"]


def test_a_tile_cancelled_once_its_frames_are_aligned_stops_before_writing(four_tiles, tmp_path):
    """The stacking after the alignment reads the stack a frame or a block of rows at a time, and
    checks for a cancel at each read: a tile cancelled there writes nothing."""
    config = MosaicConfig(input_folder=four_tiles, output_folder=str(tmp_path / "o"))
    records = zw.scan_frames(zw.Run(config))[:3]
    cancel, reads_after = threading.Event(), []

    def cancel_at_the_last_aligned_frame(phase, done, total, message=""):
        if ": aligned " in message and done == total:
            cancel.set()

    run = zw.Run(config, progress=cancel_at_the_last_aligned_frame, cancel=cancel)
    original = run.check_cancel

    def counting_check():
        if cancel.is_set():
            reads_after.append(1)
        original()

    run.check_cancel = counting_check
    (tmp_path / "o").mkdir()
    with pytest.raises(zw.Cancelled):
        zw.build_master_tile(zw.TileTask(0, records, config, str(tmp_path / "o"), False), run)
    assert reads_after == [1]  # the first read after the cancel stopped it
    assert not list((tmp_path / "o").glob("master_tile_*.fits"))


def test_cancel_on_the_pool_keeps_every_written_tile_in_the_manifest_and_reuses_it(four_tiles, tmp_path):
    """Cancelled once the first of four tiles is done, with a second one running: each tile file
    left in the folder is in the manifest, and the next run reuses exactly those tiles and makes
    the mosaic a run without a cancel makes."""
    config = MosaicConfig(input_folder=four_tiles, output_folder=str(tmp_path / "o"),
                          num_processing_workers=2)
    _cancel_after_one_tile(config)
    tiles_dir = tmp_path / "o" / zw.TILES_DIR
    written = sorted(p.name for p in tiles_dir.glob("master_tile_*.fits"))
    recorded = sorted(zrun.TileManifest(str(tiles_dir)).entries)
    assert written == recorded and 1 <= len(written) < 4
    resumed = zw.run_mosaic(config).report
    assert [zw.tile_name(t["index"]) for t in resumed.tiles if t["reused"]] == written
    straight = zw.run_mosaic(config.replace(output_folder=str(tmp_path / "s"))).report
    image = zf.read_image_fits(tmp_path / "o" / zw.MOSAIC_NAME)[0]
    assert np.array_equal(image, zf.read_image_fits(tmp_path / "s" / zw.MOSAIC_NAME)[0], equal_nan=True)
    assert len(straight.tiles) == 4
