"""Fidelity of master-tile stacking against known truth (issue 13).

Rejection: outliers must go with 3-10 frames, clean samples must stay.
"""

import numpy as np
import pytest

import zemosaic_align_stack as stk
import zemosaic_align_stack_gpu as stk_gpu

ALGORITHMS = ["winsorized_sigma_clip", "kappa_sigma"]


# --------------------------------------------------------------------------------------------------
# Rejection with few frames
# --------------------------------------------------------------------------------------------------


def _noise_stack(rng, n, h=40, w=40, sigma=5.0, level=300.0):
    return rng.normal(level, sigma, (n, h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_outlier_among_three_frames_rejected(rng, algorithm):
    sigma, truth = 5.0, 300.0
    stack = _noise_stack(rng, 3, sigma=sigma, level=truth)
    hot = np.zeros(stack.shape[1:3], bool)
    hot[::4, ::3] = True
    stack[1][hot] += 400.0  # 80 sigma: a hot pixel or cosmic ray in one of three frames
    img, _ = stk.stack_in_chunks(stack, None, None, None, stk.StackParams(algorithm))
    plain, _ = stk.stack_in_chunks(stack, None, None, None, stk.StackParams("none"))
    assert np.all(np.abs(plain[hot] - truth) > 100)  # without rejection: outlier / 3
    # Rejected: the mean of the two clean samples, whose noise is sigma / sqrt(2).
    assert np.max(np.abs(img[hot] - truth)) < 4.5 * sigma / np.sqrt(2)
    clean = np.mean(np.delete(stack, 1, axis=0), axis=0)[hot]
    assert np.mean(np.isclose(img[hot], clean, rtol=1e-6)) > 0.99


@pytest.mark.parametrize("n_frames", [3, 5])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_trail_in_one_frame_rejected(rng, n_frames, algorithm):
    sigma, truth = 5.0, 300.0
    h, w = 48, 64
    stack = _noise_stack(rng, n_frames, h, w, sigma, truth)
    yy, xx = np.mgrid[:h, :w]
    dist = np.abs(yy - (10 + 0.45 * xx)) / np.hypot(1, 0.45)
    trail = 2000.0 * np.exp(-0.5 * (dist / 1.2) ** 2)  # a satellite, 400 sigma at its core
    stack[1] += trail[..., None].astype(np.float32)
    img, _ = stk.stack_in_chunks(stack, None, None, None, stk.StackParams(algorithm))
    residual = (img - truth) / sigma
    # Left in, the trail would leave 2000 / N at its core (80-130 sigma). Its faint wings (below
    # ~3 sigma) cannot be told from noise and leave at most 3 sigma / N.
    for low, high in ((0.5, 3.0), (3.0, 10.0), (10.0, np.inf)):
        band = (trail >= low * sigma) & (trail < high * sigma)
        assert abs(residual[band].mean()) < 0.6, (low, residual[band].mean())
        assert np.sqrt(np.mean(residual[band] ** 2)) < 1.2
    core = trail > 10 * sigma  # only the clean frames' mean is left: noise sigma / sqrt(N - 1)
    assert np.sqrt(np.mean(residual[core] ** 2)) < 1.15 / np.sqrt(n_frames - 1)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_false_rejection_rate_on_gaussian_noise(rng, algorithm):
    """Pure Gaussian noise, kappa 3: few clean samples rejected for N = 3, 5, 10, 50."""
    params = stk.StackParams(algorithm, 3.0, 3.0)
    one_round = stk._winsorized_round if algorithm == "winsorized_sigma_clip" else stk._kappa_sigma_round
    rates = {}
    for n in (3, 5, 10, 50):
        block = _noise_stack(rng, n, 60, 60)
        floor = stk._noise_floor(stk.frame_noise_sigmas(block), block.shape, block.dtype, np)
        keep = stk._iterative_keep(block, params, np, one_round, floor)
        rates[n] = 1.0 - keep.mean()
    # Gaussian tails beyond 3 sigma hold 0.27 %; the estimated sigmas add a little.
    assert all(rate < 0.01 for rate in rates.values()), rates


def test_clean_three_frames_keep_every_sample():
    """Three samples within the noise: nothing is rejected, the result is their plain mean."""
    base = np.full((6, 6, 3), 1000.0, np.float32)
    stack = np.stack([base - 4.0, base + 1.0, base + 9.0])  # 9 ADU apart with sigma 5
    for algorithm in ALGORITHMS:
        img, _ = stk.stack_in_chunks(stack, None, None, None, stk.StackParams(algorithm),
                                     noise_sigmas=np.full((3, 3), 5.0))
        assert np.allclose(img, 1002.0)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_kappa_low_and_high_are_honoured(algorithm):
    """A 6-sigma sample goes with kappa 3 on its side, stays with kappa 10."""
    values = np.array([99.0, 100.0, 101.0, 100.5, 99.5], np.float32)
    stack = np.broadcast_to(values[:, None, None, None], (5, 2, 2, 1)).copy()
    stack[4, 0, 0, 0] = 106.0  # high
    stack[4, 1, 1, 0] = 94.0  # low
    noise = np.full((5, 1), 1.0)
    mean_without = values[:4].mean()

    def stacked(kl, kh):
        return stk.stack_in_chunks(stack, None, None, None, stk.StackParams(algorithm, kl, kh),
                                   noise_sigmas=noise)[0][..., 0]

    img = stacked(3.0, 10.0)
    assert img[0, 0] == pytest.approx((mean_without * 4 + 106.0) / 5)  # high kept
    assert img[1, 1] == pytest.approx(mean_without)  # low rejected
    img = stacked(10.0, 3.0)
    assert img[0, 0] == pytest.approx(mean_without)
    assert img[1, 1] == pytest.approx((mean_without * 4 + 94.0) / 5)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gpu_code_path_with_numpy_matches_cpu_few_frames(rng, algorithm):
    stack = _noise_stack(rng, 4, 30, 20)
    stack[2, 5:9] += 900.0
    stack[0, :, :6] = np.nan
    noise = rng.uniform(3.0, 6.0, (4, 3))
    params = stk.StackParams(algorithm)
    cpu = stk.stack_in_chunks(stack, None, None, None, params, noise_sigmas=noise)
    gpu = stk_gpu.stack_in_chunks_gpu(stack, None, None, None, params, xp=np, budget_bytes=50_000,
                                      noise_sigmas=noise)
    for a, b in zip(cpu, gpu):
        assert np.array_equal(a, b, equal_nan=True)
