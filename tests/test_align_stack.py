"""Stacking kernels: NaN footprints, rejection against slow references, CPU/GPU-path parity."""

import re
import time
from pathlib import Path

import numpy as np
import pytest

import zemosaic_align_stack as stk
import zemosaic_photometry as zph
import zemosaic_align_stack_gpu as stk_gpu

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["winsorized_sigma_clip", "kappa_sigma", "none"]


def _random_stack(rng, n=9, h=24, w=20, c=3, nan_borders=True, outliers=True):
    stack = rng.normal(100.0, 5.0, (n, h, w, c)).astype(np.float32)
    if nan_borders:
        for i in range(n):
            cut = int(rng.integers(0, w // 3))
            stack[i, :, :cut] = np.nan if i % 2 else stack[i, :, :cut]
            stack[i, :, w - cut:] = np.nan if i % 3 == 0 else stack[i, :, w - cut:]
        stack[:, 0, 0] = np.nan  # one pixel without any sample
        stack[:-1, 1, 0] = np.nan  # one pixel with a single sample
    if outliers:
        idx = rng.integers(0, n * h * w, 40)
        stack.reshape(n, h * w, c)[idx // (h * w), idx % (h * w)] += 500.0
    return stack


def _slow_winsorized(stack, weights, kl, kh, limits, combine, noise, signal):
    """Per-pixel reference with plain loops (the specification, written out).

    Each round: centre = median of the kept samples; every sample is tested against the winsorized
    standard deviation (ddof=1, unbiased for Gaussian noise) of the *other* kept samples, raised to
    its frame's noise sigma combined with SIGNAL_SPREAD times the consensus's local contrast;
    pixels with fewer than three kept samples are left alone.
    """
    n, h, w, c = stack.shape
    out = np.full((h, w, c), np.nan)
    var = stk._gaussian_winsor_variance(limits)
    for y in range(h):
        for x in range(w):
            for ch in range(c):
                v = stack[:, y, x, ch].astype(np.float64)
                wt = weights[:, ch] if weights is not None else np.ones(n)
                ok = np.isfinite(v)
                v, wt, floor = v[ok], wt[ok], noise[ok, ch]
                if v.size == 0:
                    continue
                for _ in range(5):  # rounds on the survivors, as the pipeline does
                    if v.size < 3:
                        break
                    lo, hi = np.quantile(v, [limits[0], 1 - limits[1]])
                    centre = np.median(v)
                    wins = np.clip(v, lo, hi)
                    sigma = np.array([np.std(np.delete(wins, j), ddof=1) for j in range(v.size)]) / np.sqrt(var)
                    spread = stk.SIGNAL_SPREAD * signal[y, x, ch]
                    sigma = np.maximum(sigma, np.sqrt(floor**2 + spread**2))
                    keep = (v >= centre - kl * sigma) & (v <= centre + kh * sigma)
                    if keep.all():
                        break
                    v, wt, floor = v[keep], wt[keep], floor[keep]
                out[y, x, ch] = np.median(v) if combine == "median" else np.sum(v * wt) / np.sum(wt)
    return out


def test_seed_nan_borders_three_frames():
    """The founding test: NaN left/right borders never colour the tile or dilute the centre."""
    h, w = 20, 30
    base = np.array([100.0, 80.0, 60.0], np.float32)
    frames = []
    for i, scale in enumerate([1.0, 1.1, 0.9]):
        f = np.broadcast_to(base * scale, (h, w, 3)).copy()
        f[:, : 3 + 2 * i] = np.nan
        f[:, w - 3 - 2 * i:] = np.nan
        frames.append(f)
    img, cov = stk.stack_winsorized_sigma_clip(frames)
    centre = img[:, 8:22]
    assert np.all(np.isfinite(centre))
    assert np.allclose(centre, base * 1.0, rtol=1e-5)  # mean of 1.0, 1.1, 0.9
    assert np.all(np.isnan(img[:, :3])) and np.all(np.isnan(img[:, -3:]))
    assert np.all(cov[:, 8:22] == 3) and np.all(cov[:, :3] == 0)
    # Partially covered columns keep the colour of the frames that cover them: no pink edge.
    partial = img[:, 3:7]
    ratios = partial / partial[..., 1:2]
    assert np.allclose(ratios, base / base[1], rtol=1e-5)


@pytest.mark.parametrize("combine", ["mean", "median"])
def test_winsorized_matches_slow_reference(rng, combine):
    stack = _random_stack(rng)
    # A star whose core differs by +-20 % between frames: its floor is set by the signal term.
    stack[:, 9:13, 6:10] += 2000.0 * rng.uniform(0.8, 1.2, (stack.shape[0], 1, 1, 1)).astype(np.float32)
    weights = rng.uniform(0.3, 1.0, (stack.shape[0], 3))
    params = stk.StackParams("winsorized_sigma_clip", 2.5, 3.0, (0.1, 0.05), combine)
    noise = rng.uniform(2.0, 4.0, (stack.shape[0], 3))  # below the stack's noise (5): both sigmas act
    img, _ = stk.stack_in_chunks(stack, None, None, weights if combine == "mean" else None, params,
                                 rows_per_chunk=7, noise_sigmas=noise)
    ref = _slow_winsorized(stack, weights if combine == "mean" else None, 2.5, 3.0, (0.1, 0.05), combine,
                           noise, _consensus_signal(stack))
    assert np.array_equal(np.isnan(img), np.isnan(ref))
    ok = np.isfinite(ref)
    assert np.max(np.abs(img[ok] - ref[ok]) / np.abs(ref[ok])) < 1e-5


def test_chunks_stacked_in_threads_give_the_same_bytes(rng):
    stack = _random_stack(rng, h=60)
    params = stk.StackParams("winsorized_sigma_clip", 3.0, 3.0, (0.05, 0.05), "mean")
    noise = np.full((stack.shape[0], 3), 5.0)
    results, calls = [], []
    for threads in (1, 3):
        done = []
        results.append(stk.stack_in_chunks(stack, None, None, None, params, rows_per_chunk=7,
                                           noise_sigmas=noise, threads=threads,
                                           progress=lambda r, h: done.append(r)))
        calls.append(done)
    # In order, every chunk of each pass (the statistics, then the stacking).
    assert calls[0] == calls[1] == [7, 14, 21, 28, 35, 42, 49, 56, 60] * 2
    assert results[0][0].tobytes() == results[1][0].tobytes()
    assert results[0][1].tobytes() == results[1][1].tobytes()


class _CountingStack:
    """An aligned stack that counts the row chunks read from it, each read as slow as a disk's."""

    def __init__(self, data):
        self.data, self.shape, self.reads = data, data.shape, 0

    def __getitem__(self, key):
        self.reads += 1
        time.sleep(0.02)
        return self.data[key]


class _Stop(Exception):
    pass


@pytest.mark.parametrize("threads", [1, 3])
def test_an_exception_from_progress_stops_the_stacking_within_the_chunks_started(rng, threads):
    """A cancel raised from ``progress`` must not wait for the rest of the tile: the chunks not
    yet started are dropped (a thread pool's map would otherwise run every one of them)."""
    stack = _CountingStack(_random_stack(rng, h=200))
    params = stk.StackParams("winsorized_sigma_clip", 3.0, 3.0, (0.05, 0.05), "mean")
    noise = np.full((stack.shape[0], 3), 5.0)

    def stop(done, total):
        raise _Stop()

    with pytest.raises(_Stop):
        stk.stack_in_chunks(stack, None, None, None, params, rows_per_chunk=2, noise_sigmas=noise,
                            threads=threads, progress=stop)
    # 100 chunks per pass; stopped after the first, with the running ones finishing.
    assert stack.reads <= 4 * threads


def test_sorted_quantile_matches_nanquantile(rng):
    stack = _random_stack(rng, n=11)
    srt, n_valid = stk._sort_and_count(stack, np)
    for q in (0.0, 0.05, 0.5, 0.9, 1.0):
        got = stk.sorted_quantile(srt, n_valid, q, np)
        with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
            ref = np.nanquantile(stack, q, axis=0)
        assert np.allclose(got, ref, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("combine", ["mean", "median"])
def test_gpu_code_path_with_numpy_recovers_the_truth(rng, numpy_as_gpu, algorithm, combine):
    n, h, w = 12, 40, 33
    truth = rng.uniform(100.0, 200.0, (h, w, 3)).astype(np.float32)
    gains = rng.uniform(0.9, 1.1, (n, 3))
    offsets = rng.normal(0, 3, (n, 3))
    weights = rng.uniform(0.2, 1.0, (n, 3))
    # Raw frames that normalise exactly to the truth, with footprint edges and a corner no frame sees.
    stack = ((truth[None] - offsets[:, None, None]) / gains[:, None, None]).astype(np.float32)
    stack[:3, :, :5] = np.nan
    stack[:, :2, -2:] = np.nan
    if algorithm != "none":  # one cosmic ray or trail sample in 40 pixels: rejection must drop it
        ys, xs = rng.integers(2, h, 33), rng.integers(5, w - 2, 33)
        stack[rng.integers(0, n, 33), ys, xs] += 5000.0
    params = stk.StackParams(algorithm, 3.0, 3.0, (0.05, 0.05), combine)
    image, coverage = stk_gpu.stack_in_chunks_gpu(stack, gains, offsets, weights, params,
                                                  budget_bytes=200_000, noise_sigmas=np.ones((n, 3)))
    expected_coverage = np.full((h, w), n, np.float32)
    expected_coverage[:, :5] = n - 3
    expected_coverage[:2, -2:] = 0
    np.testing.assert_array_equal(coverage, expected_coverage)
    seen = expected_coverage > 0
    assert np.all(np.isnan(image[~seen]))
    np.testing.assert_allclose(image[seen], truth[seen], rtol=2e-6)


def test_a_bug_on_the_gpu_stacking_path_propagates(rng, numpy_as_gpu, monkeypatch):
    def bug(*args, **kwargs):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(stk_gpu, "stack_in_chunks", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        stk_gpu.stack_in_chunks_gpu(_random_stack(rng, n=5), None, None, None, stk.StackParams())


def test_winsorize_chunk_plain_and_nan_paths_agree(rng, numpy_as_gpu):
    block = rng.normal(0, 1, (15, 10, 10, 1)).astype(np.float32)
    plain = stk_gpu._winsorize_chunk(block, (0.1, 0.1))
    assert np.allclose(plain, stk._winsorize_block_numpy(block, (0.1, 0.1)))
    holed = block.copy()
    holed[0, 0, 0, 0] = np.nan
    out = stk_gpu._winsorize_chunk(holed, (0.1, 0.1))
    assert np.isnan(out[0, 0, 0, 0])
    assert np.allclose(out[:, 1:], plain[:, 1:])


def test_kappa_sigma_rejects_outlier_and_keeps_nan_pixel():
    stack = np.full((10, 2, 2, 1), 50.0, np.float32) + np.arange(10, dtype=np.float32)[:, None, None, None] * 0.1
    stack[3, 0, 0, 0] = 5000.0
    stack[:, 1, 1, 0] = np.nan
    img, cov = stk.stack_in_chunks(stack, None, None, None, stk.StackParams("kappa_sigma", 3, 3))
    clean = np.delete(stack[:, 0, 0, 0], 3).mean()
    assert img[0, 0, 0] == pytest.approx(clean, rel=1e-6)
    assert np.isnan(img[1, 1, 0]) and cov[1, 1] == 0


def test_winsorized_front_door_is_stack_in_chunks(rng):
    """The pipeline's door for winsorized rejection: the same numbers as the chunked stacker."""
    stack = _random_stack(rng, n=7)
    gains, offsets = rng.uniform(0.9, 1.1, (7, 3)), rng.normal(0, 2, (7, 3))
    weights, noise = rng.uniform(0.3, 1.0, (7, 3)), rng.uniform(2.0, 4.0, (7, 3))
    params = stk.StackParams("winsorized_sigma_clip", 2.5, 3.5, (0.1, 0.05), "median", 2)
    door = stk.stack_winsorized_sigma_clip(stack, weights, 2.5, 3.5, (0.1, 0.05), "median", max_iterations=2,
                                           gains=gains, offsets=offsets, noise_sigmas=noise)
    chunks = stk.stack_in_chunks(stack, gains, offsets, weights, params, noise_sigmas=noise)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(door, chunks))


def test_trail_and_hot_pixels_rejected(rng):
    n, h, w = 15, 40, 40
    sigma = 4.0
    truth = 300.0
    stack = rng.normal(truth, sigma, (n, h, w, 3)).astype(np.float32)
    stack[4, 18:21, :, :] += 3000.0  # satellite trail in one frame
    hot = rng.integers(0, h * w, 30)
    stack[rng.integers(0, n, 30), hot // w, hot % w, :] = 60000.0
    img, _ = stk.stack_winsorized_sigma_clip(stack)
    residual = img - truth
    noise_of_mean = sigma / np.sqrt(n)
    affected = np.zeros((h, w), bool)
    affected[18:21] = True
    affected[hot // w, hot % w] = True
    # An outlier that survived would leave >= 3000/15 = 200 ADU; the noise of the mean is ~1 ADU.
    assert np.abs(residual[affected]).max() < 5 * noise_of_mean
    assert abs(residual[affected].mean()) < 3 * noise_of_mean / np.sqrt(affected.sum() * 3)
    assert residual[affected].std() < 1.3 * residual[~affected].std()


def test_linear_fit_recovers_transparency(rng):
    h, w = 200, 200
    yy, xx = np.mgrid[:h, :w]
    signal = 400 * np.exp(-((yy - 100) ** 2 + (xx - 90) ** 2) / (2 * 30.0**2))
    stars = np.zeros((h, w))
    stars[rng.integers(0, h, 80), rng.integers(0, w, 80)] = rng.uniform(500, 5000, 80)
    sky_ref, sky_frame = np.array([900, 1000, 800.0]), np.array([950, 1080, 830.0])
    colour = np.array([1.0, 0.8, 0.6])
    truth = (signal + stars)[..., None] * colour
    ref = (truth + sky_ref + rng.normal(0, 3, (h, w, 3))).astype(np.float32)
    frame = (0.8 * truth + sky_frame + rng.normal(0, 3, (h, w, 3))).astype(np.float32)
    frame[:, :20] = np.nan  # outside the footprint
    gains, offsets = zph.linear_fit_coefficients(frame, ref)
    assert np.allclose(gains, 1 / 0.8, rtol=0.02)
    normalised = frame * gains + offsets
    assert np.allclose(np.nanmedian(normalised - ref, axis=(0, 1)), 0, atol=1.0)


def test_linear_fit_degenerate_falls_back_to_identity(caplog):
    flat = np.full((50, 50, 3), 7.0, np.float32)
    with caplog.at_level("DEBUG", logger="zemosaic_photometry"):
        gains, offsets = zph.linear_fit_coefficients(flat, flat * 2)
    assert np.all(gains == 1) and np.all(offsets == 0)
    assert "degenerate" in caplog.text


def test_noise_weights_best_frame_is_one(rng):
    stack = np.stack([rng.normal(0, s, (60, 60, 3)) for s in (1.0, 2.0, 4.0)]).astype(np.float32)
    stack[1, :, :10] = np.nan
    weights = stk.noise_variance_weights(stack)
    assert weights.shape == (3, 3)
    assert np.allclose(weights[0], 1.0)
    assert np.allclose(weights[1], 0.25, rtol=0.15) and np.allclose(weights[2], 1 / 16, rtol=0.15)


def test_pink_band_regression(rng):
    """RGB frames with NaN footprints and different per-channel skies: edges keep the interior colour."""
    h, w, n = 80, 120, 8
    sky = np.array([900.0, 1000.0, 800.0])
    frames = []
    for i in range(n):
        pedestal = sky * (1 + 0.05 * i) + np.array([30.0, -20.0, 10.0]) * i
        f = (pedestal + rng.normal(0, 2.0, (h, w, 3))).astype(np.float32)
        f[:, : 5 + 4 * i] = np.nan
        f[:, w - 3 * i - 1:] = np.nan
        frames.append(f)
    stack = np.stack(frames)
    gains, offsets = stk.normalization_coefficients(stack, 0, "linear_fit")
    img, _ = stk.stack_in_chunks(stack, gains, offsets, None, stk.StackParams())
    interior = np.nanmedian(img[:, 50:70], axis=(0, 1))
    edges = np.concatenate([img[:, :40], img[:, -40:]], axis=1)
    edge_colour = np.nanmedian(edges, axis=(0, 1))
    assert np.all(np.isfinite(edge_colour))
    assert np.allclose(edge_colour, interior, atol=1.0)  # noise of a median of many pixels << 1


def test_xp_names_exist_in_cupy():
    cupy = pytest.importorskip("cupy")
    names = set()
    for module in ("zemosaic_align_stack.py", "zemosaic_align_stack_gpu.py", "zemosaic_utils.py"):
        names |= set(re.findall(r"\bxp\.([A-Za-z_][A-Za-z0-9_]*)", (ROOT / module).read_text()))
    missing = sorted(n for n in names if not hasattr(cupy, n))
    assert not missing, f"names used through xp but absent from CuPy: {missing}"
    import cupyx.scipy.ndimage

    assert hasattr(cupyx.scipy.ndimage, "map_coordinates")


@pytest.mark.gpu
def test_real_cupy_parity(rng):
    import zemosaic_utils as zu

    if not zu.gpu_available():
        pytest.skip(f"no usable GPU: {zu.gpu_unavailable_reason()}")
    stack = _random_stack(rng, n=12, h=64, w=48)
    for algorithm in ALGORITHMS:
        params = stk.StackParams(algorithm)
        cpu = stk.stack_in_chunks(stack, None, None, None, params)
        gpu = stk_gpu.stack_in_chunks_gpu(stack, None, None, None, params)
        ok = np.isfinite(cpu[0])
        assert np.array_equal(ok, np.isfinite(gpu[0]))
        assert np.max(np.abs(cpu[0][ok] - gpu[0][ok]) / np.abs(cpu[0][ok])) < 1e-5


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 8, 11, 16, 17, 24, 25])
def test_sort_frames_is_numpy_sort_along_the_frames(rng, n):
    """The sorting network for few frames gives exactly ``np.sort(axis=0)``: NaN last, inf before it."""
    block = rng.normal(0, 1, (n, 7, 9, 3)).astype(np.float32)
    block[rng.random(block.shape) < 0.2] = np.nan
    block[rng.random(block.shape) < 0.02] = np.inf
    block[rng.random(block.shape) < 0.02] = -np.inf
    block[:, 0, 0] = np.nan  # a pixel with no data
    block[:, 0, 1] = 1.5  # ties
    np.testing.assert_array_equal(stk.sort_frames(block), np.sort(block, axis=0))
    finite = rng.normal(0, 1, (n, 4, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(stk.sort_frames(finite), np.sort(finite, axis=0))


@pytest.mark.parametrize("size", [3, 5, 7, 9])
def test_window_extremes_are_scipys_maximum_and_minimum_filters(rng, size):
    from scipy.ndimage import maximum_filter, minimum_filter

    plane = rng.normal(0, 1, (61, 47)).astype(np.float32)
    plane[10:14, 20:22] = 5.0  # a plateau: ties
    np.testing.assert_array_equal(stk._window_extreme(plane, size, np.maximum), maximum_filter(plane, size))
    np.testing.assert_array_equal(stk._window_extreme(plane, size, np.minimum), minimum_filter(plane, size))


def _consensus_signal(normalised):
    """The definition: the signal map of each pixel's median over all frames with data (NaN where
    fewer than three have some), its noise the median image's clipped sigma."""
    count = np.sum(np.isfinite(normalised), axis=0)
    with np.errstate(all="ignore"), pytest.warns(RuntimeWarning):
        median = np.nanmedian(normalised, axis=0)
    median = np.where(count >= 3, median, np.nan).astype(np.float32)
    noise = [stk.sigma_clipped_stats(stk.subsample(median, stk._FLOOR_SUBSAMPLE)[..., c])[1] for c in range(3)]
    return stk.signal_map(median, noise)


def test_consensus_signal_is_the_median_of_all_frames_whatever_the_threads(monkeypatch):
    rng = np.random.default_rng(4)
    n, h, w = 7, 60, 80
    stack = rng.normal(1000, 10, (n, h, w, 3)).astype(np.float32)
    for i in range(n):
        stack[i, :int(rng.integers(0, 12))] = np.nan
        stack[i, :, w - 12 + int(rng.integers(0, 12)):] = np.nan
    stack[2, 30:40, 10:20, 1] = np.nan
    gains, offsets = 1 + 0.02 * rng.random((n, 3)), rng.random((n, 3))
    normalised = stack * gains[:, None, None, :].astype(np.float32) + offsets[:, None, None, :].astype(np.float32)
    expected = _consensus_signal(normalised)
    seen = []
    monkeypatch.setattr(stk, "signal_map", lambda frame, noise, threads=1, f=stk.signal_map:
                        seen.append(f(frame, noise)) or seen[-1])
    params = stk.StackParams()
    for threads in (1, 2, 3):
        stk.stack_in_chunks(stack, gains, offsets, None, params, rows_per_chunk=9, threads=threads)
        np.testing.assert_allclose(seen[-1], expected, rtol=1e-5, atol=1e-3)
    assert seen[0].tobytes() == seen[1].tobytes() == seen[2].tobytes()
