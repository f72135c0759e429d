"""A master tile measures each frame as it is aligned, so that the stacking reads its stack only to stack it.

The normalisation, the sky models and the aligned noise come from :class:`zemosaic_master_tile.AlignedMeasures`,
taken in the alignment threads on each frame while it is in memory. Checked against the same measures
taken from the stack afterwards (the drivers that read it frame by frame), on a canvas cut after a
frame failed, and by counting what a disk-cached stack gives back while the tile is stacked.
"""

import json
import os

import numpy as np
import pytest

import zemosaic_align_stack as stk
import zemosaic_background as zbg
import zemosaic_executor as zexec
import zemosaic_fits as zfits
import zemosaic_master_tile as zmt
import zemosaic_synth
import zemosaic_worker as zw
from zemosaic_config import config_from_dict


@pytest.fixture(scope="module")
def two_gradients(tmp_path_factory):
    """8 small frames, dithers up to 60 px, the sky tilted one way in the first 4 and another in the last 4."""
    root = tmp_path_factory.mktemp("aligned_measures")
    info = zemosaic_synth.generate_dataset(root, panels=(1, 1), frames_per_panel=8, seed=3, size="small",
                                           dither_px=60, satellite=False,
                                           panel_sky_gradient=[[(0.08, 0.03), (-0.06, 0.05)]])
    truth = json.loads(open(info["truth_json"]).read())
    return root, truth


def _run(root, name, monkeypatch, fail=None, **settings):
    """Run the pipeline in this process; returns what ``_stack_group`` got: the group and its stack."""
    seen = {}
    load, stack_group = zmt._load_measured, zmt._stack_group

    def failing_load(rec, *args, **kwargs):
        if os.path.basename(rec.path) == fail:
            raise zfits.FrameError("unreadable (test)")
        return load(rec, *args, **kwargs)

    def capture(group, *args):
        seen["group"], seen["stack"] = group, np.array(group.stack[:len(group.used)])
        return stack_group(group, *args)

    monkeypatch.setattr(zmt, "_load_measured", failing_load)
    monkeypatch.setattr(zmt, "_stack_group", capture)
    zw.run_mosaic(config_from_dict({"input_folder": str(root / "frames"), "output_folder": str(root / name),
                                    "num_processing_workers": 1, **settings}))
    return seen["group"], seen["stack"]


def test_measures_taken_while_aligning_are_the_stack_s_own_on_a_canvas_cut_after_a_frame_failed(
        two_gradients, monkeypatch):
    root, truth = two_gradients
    # The frame dithered farthest towards the canvas origin widens it most there: when it fails,
    # the canvas is cut by tens of pixels after every other frame was measured on the wide one.
    far = min(truth["frames"], key=lambda f: min(f["dither_px"]))
    group, stack = _run(root, "cut", monkeypatch, fail=far["file"])
    assert len(group.used) == 7 and max(np.abs(group.origin)) >= 10, group.origin
    aligned = group.aligned
    gains, _ = aligned.normalisation(group.positions)
    own_gains, _ = stk.normalization_coefficients(stack, 0, "linear_fit")
    np.testing.assert_allclose(gains, own_gains, rtol=1e-3)

    np.testing.assert_allclose(aligned.noise(group.positions, gains), stk.frame_noise_sigmas(stack, gains),
                               rtol=0.02)

    order = config_from_dict({}).background_model_order
    models = zbg.solve_models(aligned.sky_blocks(group.positions, gains, group.origin), order, stack.shape[1:3])
    own = zbg.frame_models(stack, gains, order)
    ys, xs = np.mgrid[0:stack.shape[1]:20, 0:stack.shape[2]:20]
    spread = np.ptp([own.values(k, ys, xs) for k in range(len(own))], axis=0).mean()
    assert spread > 20  # the two nights' tilts differ by tens of ADU across the canvas
    for k in range(len(own)):
        np.testing.assert_allclose(models.values(k, ys, xs), own.values(k, ys, xs), atol=0.02 * spread)


def test_a_disk_cached_stack_is_read_twice_while_its_tile_is_stacked(two_gradients, monkeypatch, caplog):
    # The rejection's statistics and the combine: one read each. The normalisation, the sky
    # models and the noise read it three more times before they were measured while aligning.
    root, _ = two_gradients
    caplog.set_level("INFO", logger="zemosaic_executor")
    monkeypatch.setattr(zexec, "STACK_RAM_MAX", 1)
    read = {"bytes": 0, "stacking": False}
    read_into, stack_group = zexec._StackFile.read_into, zmt._stack_group

    def counting(self, offset, out):
        read["bytes"] += out.nbytes if read["stacking"] else 0
        return read_into(self, offset, out)

    def stacking(group, *args):
        read["stacking"] = True
        try:
            return stack_group(group, *args)
        finally:
            read["stacking"] = False

    monkeypatch.setattr(zexec._StackFile, "read_into", counting)
    monkeypatch.setattr(zmt, "_stack_group", stacking)
    seen = {}
    original = zmt._release_stacks
    monkeypatch.setattr(zmt, "_release_stacks", lambda *stacks: (seen.setdefault("shape", stacks[0].shape),
                                                                 original(*stacks)))
    zw.run_mosaic(config_from_dict({"input_folder": str(root / "frames"), "output_folder": str(root / "disk"),
                                    "num_processing_workers": 1}))
    assert "goes to a disk cache" in caplog.text
    stack_bytes = int(np.prod(seen["shape"])) * 4
    assert 1.9 * stack_bytes <= read["bytes"] <= 2.1 * stack_bytes, read["bytes"] / stack_bytes
