"""Frame weights come from each frame's own noise, not from what resampling did to it (issue 20)."""

import json

import numpy as np
import pytest

import zemosaic_align_stack as stk
import zemosaic_synth
import zemosaic_utils as zu
import zemosaic_worker as zw
from zemosaic_config import config_from_dict


def _shifted_noise_frames(rng, shifts, shape=(300, 300), sigma=20.0, sky=1000.0):
    """Frames of pure sky noise (equal sigma) and each one's aligned copy at a sub-pixel shift.

    Returns ``(raw frames, aligned stack)``; the first frame, the reference, is not resampled.
    """
    raw = [rng.normal(sky, sigma, shape + (3,)).astype(np.float32) for _ in shifts]
    aligned = []
    for frame, (dy, dx) in zip(raw, shifts):
        matrix = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])
        aligned.append(frame if dy == dx == 0 else stk.warp_affine(frame, matrix, shape))
    return raw, np.stack(aligned)


SHIFTS = [(0.0, 0.0), (0.5, 0.5), (0.1, 0.4), (0.3, 0.05), (0.45, 0.2), (0.25, 0.5)]


def test_equal_noise_frames_get_equal_weights_whatever_their_shifts(rng):
    raw, aligned = _shifted_noise_frames(rng, SHIFTS)
    before = np.array([stk.image_noise_sigmas(f) for f in raw])
    weights = stk.noise_variance_weights(None, sigmas=before)
    assert weights.min() > 0.97, weights
    # Measured after resampling, the half-pixel shift smooths the noise 2x in sigma: the
    # reference, not resampled, weighed a quarter of it.
    after = stk.noise_variance_weights(aligned)
    assert after[0].max() < 0.3 and after[1].min() == 1.0


def _binned_sigma(image, factor=6):
    """Noise of ``factor`` x ``factor`` block means: resampling moves noise between neighbouring
    pixels but keeps it at scales beyond a few pixels, where faint signal is detected."""
    return stk.sigma_clipped_stats(zu.block_mean(image[..., 1:2], factor, full_blocks_only=True)[..., 0])[1]


def test_stack_noise_reaches_the_sqrt_n_prediction(rng):
    """Equal-noise frames stacked with weights from their own noise reach >= 0.9 of the sqrt(N)
    noise reduction (on block means, where the frames' noise is equal whatever their shifts);
    weights from the aligned frames' pixel noise favoured the smoothest frames and lost more."""
    raw, aligned = _shifted_noise_frames(rng, SHIFTS)
    predicted = np.median([_binned_sigma(frame) for frame in aligned]) / np.sqrt(len(aligned))
    params = stk.StackParams()
    efficiency = {}
    for name, sigmas in (("before warp", np.array([stk.image_noise_sigmas(f) for f in raw])),
                         ("after warp", None)):
        weights = stk.noise_variance_weights(aligned, sigmas=sigmas)
        image, _ = stk.stack_in_chunks(aligned, None, None, weights, params)
        efficiency[name] = predicted / _binned_sigma(image[6:-6, 6:-6])
    assert efficiency["before warp"] >= 0.9, efficiency
    assert efficiency["after warp"] < efficiency["before warp"] - 0.05, efficiency


@pytest.fixture(scope="module")
def one_panel(tmp_path_factory):
    """A one-panel run of six frames of equal transparency and sky (so equal noise), dithered."""
    root = tmp_path_factory.mktemp("weights")
    info = zemosaic_synth.generate_dataset(root, panels=(1, 1), frames_per_panel=6, seed=11, size="small",
                                           transparency_range=(1.0, 1.0), pedestal_jitter=0.0,
                                           satellite=False)
    out = root / "out"
    zw.run_mosaic(config_from_dict({"input_folder": info["frames_dir"], "output_folder": str(out)}))
    return json.loads((out / "zemosaic_run.json").read_text())


def test_pipeline_weights_of_equal_frames_agree_within_3_percent(one_panel):
    """The reference (not resampled) weighs as much as the others. Each weight is 1 / (noise x
    gain)^2 of its frame; the gains of equally transparent frames scatter by ~1 % (star
    photometry), and the noise of the small frames' B (a quarter of their pixels) by ~1 %."""
    (tile,) = one_panel["tiles"]
    frames = tile["frame_photometry"]
    weights = np.array([f["weight_rgb"] for f in frames])
    noise = np.array([f["noise_rgb"] for f in frames])
    gains = np.array([f["gain_rgb"] for f in frames])
    assert len(weights) == 6
    assert np.all(noise > 0) and np.all(np.ptp(noise, axis=0) < 0.025 * noise.min(axis=0)), noise
    assert weights[:, 1].min() > 0.97, weights
    expected = 1 / (noise * gains) ** 2
    np.testing.assert_allclose(weights, expected / expected.max(axis=0), rtol=1e-3)
