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


def test_raw_subs_interrupted_after_the_first_tile_resume_from_the_cache(unsolved_small, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    """The first run plate-solves and matches, and is cancelled once a tile is written; the second
    reads every WCS from the solve cache and must reuse that tile; a third reuses both."""
    info, _truths, by_content = unsolved_small
    solver = _TruthSolver(by_content)
    monkeypatch.setattr(za, "solver_from_config", lambda config: (solver, None))
    config = MosaicConfig(input_folder=info["frames_dir"], output_folder=str(tmp_path / "o"),
                          num_processing_workers=1)
    cancel = threading.Event()

    def cancel_after_one_tile(phase, done, total, message=""):
        if phase == "master_tiles" and message.endswith(" done"):
            cancel.set()

    with pytest.raises(zw.Cancelled):
        zw.run_mosaic(config, progress=cancel_after_one_tile, cancel=cancel)
    assert solver.calls > 0

    again = _TruthSolver(by_content)
    monkeypatch.setattr(za, "solver_from_config", lambda config: (again, None))
    second = zw.run_mosaic(config).report
    assert again.calls == 0 and {e["wcs"] for e in second.to_dict()["frame_wcs"]} == {"cache"}
    assert [t["reused"] for t in second.tiles] == [True, False]
    third = zw.run_mosaic(config).report
    assert [t["reused"] for t in third.tiles] == [True, True]
