"""Tests for zemosaic_synth: determinism, frame format, Bayer sampling, truth consistency."""

import datetime as dt
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

import zemosaic_synth as zs

REPO = Path(__file__).resolve().parents[1]
SMALL_SHAPE = (480, 270)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """The default small dataset: 2x2 panels x 4 frames, noise, hot pixels, satellite."""
    out = tmp_path_factory.mktemp("synth_noisy")
    res = zs.generate_dataset(out, panels=(2, 2), frames_per_panel=4, seed=0, size="small")
    res["outdir"] = out
    return res


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """Noiseless, defect-free small dataset for exact comparisons."""
    out = tmp_path_factory.mktemp("synth_clean")
    res = zs.generate_dataset(out, panels=(2, 2), frames_per_panel=2, seed=7, size="small",
                              noise=False, hot_pixels=False, satellite=False)
    res["outdir"] = out
    return res


def _read(path):
    with fits.open(path) as hdul:
        return np.array(hdul[0].data), hdul[0].header.copy()


# --------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    kw = dict(panels=(2, 1), frames_per_panel=2, size="small")
    a = zs.generate_dataset(tmp_path / "a", seed=11, **kw)
    b = zs.generate_dataset(tmp_path / "b", seed=11, **kw)
    c = zs.generate_dataset(tmp_path / "c", seed=12, **kw)
    assert a["n_frames"] == b["n_frames"] == c["n_frames"] == 4
    for pa, pb, pc in zip(a["frame_paths"], b["frame_paths"], c["frame_paths"]):
        assert Path(pa).name == Path(pb).name == Path(pc).name
        assert Path(pa).read_bytes() == Path(pb).read_bytes()
        assert Path(pa).read_bytes() != Path(pc).read_bytes()
    assert Path(a["truth_fits"]).read_bytes() == Path(b["truth_fits"]).read_bytes()
    assert Path(a["truth_json"]).read_text() == Path(b["truth_json"]).read_text()
    da, _ = _read(a["frame_paths"][0])
    dc, _ = _read(c["frame_paths"][0])
    # Not just a tiny change: the noise and the sky are different.
    assert np.mean(np.abs(da.astype(float) - dc.astype(float))) > 10.0


def test_regenerating_removes_stale_frames(tmp_path):
    zs.generate_dataset(tmp_path, panels=(1, 1), frames_per_panel=3, size="small")
    res = zs.generate_dataset(tmp_path, panels=(1, 1), frames_per_panel=2, size="small")
    assert sorted(os.listdir(res["frames_dir"])) == sorted(Path(p).name for p in res["frame_paths"])
    assert len(res["frame_paths"]) == 2


# --------------------------------------------------------------------------------------
# Frame format and metadata
# --------------------------------------------------------------------------------------


def test_frame_format(noisy):
    assert noisy["n_frames"] == 16 and len(noisy["frame_paths"]) == 16
    assert Path(noisy["frames_dir"]).name == "frames"
    # Truth lives next to, not inside, the frames folder.
    assert Path(noisy["truth_fits"]).parent.parent == Path(noisy["frames_dir"]).parent
    assert sorted(os.listdir(noisy["frames_dir"])) == [Path(p).name for p in noisy["frame_paths"]]

    raw_hdr = fits.getheader(noisy["frame_paths"][0])
    assert raw_hdr["BITPIX"] == 16 and raw_hdr["BZERO"] == 32768 and raw_hdr["BSCALE"] == 1
    data, hdr = _read(noisy["frame_paths"][0])
    assert data.dtype == np.uint16
    assert data.shape == SMALL_SHAPE
    assert hdr["BAYERPAT"] == "GRBG"
    assert hdr["EXPTIME"] == 10.0
    assert hdr["INSTRUME"] == "Seestar S50"
    assert hdr["XBINNING"] == 1 and hdr["FOCALLEN"] == 250
    assert hdr["CTYPE1"] == "RA---TAN" and hdr["CTYPE2"] == "DEC--TAN"
    for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2"):
        assert key in hdr
    for key in ("PC1_1", "CDELT1", "CDELT2"):
        assert key not in hdr
    w = WCS(hdr)
    assert w.has_celestial and w.wcs.has_cd()
    scale = math.sqrt(abs(np.linalg.det(w.pixel_scale_matrix))) * 3600.0
    assert scale == pytest.approx(2.39, abs=0.005)
    # Reference pixel at the frame centre and pointing close to the layout centre.
    assert hdr["CRPIX1"] == pytest.approx((270 + 1) / 2) and hdr["CRPIX2"] == pytest.approx((480 + 1) / 2)
    assert abs(hdr["CRVAL1"] - 83.8) < 1.0 and abs(hdr["CRVAL2"] + 5.4) < 1.0
    # Realistic levels: sky pedestal ~800-1000 ADU, nothing above 65535 by construction.
    assert 600 < np.median(data) < 1300


def test_date_obs_in_name_order_10s_apart(noisy):
    dates = [dt.datetime.fromisoformat(fits.getheader(p)["DATE-OBS"]) for p in noisy["frame_paths"]]
    steps = {(b - a).total_seconds() for a, b in zip(dates, dates[1:])}
    assert steps == {10.0}
    names = [Path(p).name for p in noisy["frame_paths"]]
    assert names == sorted(names)


def test_truth_files_and_metadata(noisy):
    truth, wcs, meta = zs.load_truth(noisy["outdir"])
    assert truth.dtype == np.float32 and truth.ndim == 3 and truth.shape[2] == 3
    assert list(truth.shape[:2]) == meta["truth_shape"]
    assert wcs.naxis == 2 and wcs.wcs.has_cd()
    hdr = fits.getheader(noisy["truth_fits"])
    assert hdr["NAXIS"] == 3 and hdr["NAXIS3"] == 3 and "CD1_1" in hdr and "PC1_1" not in hdr
    assert WCS(hdr).celestial.wcs.has_cd()  # the 3-D header is valid too
    # The truth covers every frame footprint (with margin).
    for p in noisy["frame_paths"][::5]:
        fw = WCS(fits.getheader(p))
        corners = np.array([[-0.5, -0.5], [269.5, -0.5], [269.5, 479.5], [-0.5, 479.5]])
        u, v = wcs.all_world2pix(*fw.all_pix2world(corners, 0).T, 0)
        assert u.min() > 0 and v.min() > 0 and u.max() < truth.shape[1] - 1 and v.max() < truth.shape[0] - 1
    # Truth is non-negative, has a positive background and some saturating stars.
    assert truth.min() > 0
    assert truth.max() > 65535
    frames = meta["frames"]
    assert len(frames) == 16
    assert [f["file"] for f in frames] == [Path(p).name for p in noisy["frame_paths"]]
    for f in frames:
        for key in ("panel", "transparency", "sky_pedestal_rgb", "rotation_deg", "dither_px",
                    "center_ra", "center_dec", "has_satellite", "date_obs"):
            assert key in f
        assert 0.9 <= f["transparency"] <= 1.0
        r, g, b = f["sky_pedestal_rgb"]
        assert 800 < r < 1000 and 900 < g < 1100 and 700 < b < 900
        assert math.hypot(*f["dither_px"]) <= 10.0 + 1e-9
    assert [f["panel"] for f in frames] == [p for p in range(4) for _ in range(4)]
    # Pedestals and transparencies vary from frame to frame (background matching needed).
    peds = np.array([f["sky_pedestal_rgb"] for f in frames])
    assert peds[:, 1].std() > 10.0
    assert np.ptp([f["transparency"] for f in frames]) > 0.03
    assert meta["gain_e_per_adu"] == pytest.approx(0.8) and meta["read_noise_adu"] == pytest.approx(3.0)
    assert meta["layout"]["panels"] == [2, 2]
    assert json.loads(Path(noisy["truth_json"]).read_text()) == meta


def test_rotation_drifts_and_matches_wcs(noisy):
    _, _, meta = zs.load_truth(noisy["outdir"])
    rots = []
    for f, p in zip(meta["frames"], noisy["frame_paths"]):
        cd = WCS(fits.getheader(p)).wcs.cd
        rot = math.degrees(math.atan2(cd[0, 1], cd[1, 1]))
        assert rot == pytest.approx(f["rotation_deg"], abs=1e-6)
        rots.append(rot)
    # ~6 degrees of field rotation accumulated over the run, growing steadily.
    assert 5.0 < rots[-1] - rots[0] < 7.0
    assert np.corrcoef(np.arange(len(rots)), rots)[0, 1] > 0.99


def test_panel_overlaps(noisy):
    first = [WCS(fits.getheader(noisy["frame_paths"][4 * p])) for p in range(4)]
    # Panels: P = iy*nx + ix -> (0,1) and (2,3) are horizontal neighbours, (0,2), (1,3) vertical.
    for a, b in ((0, 1), (2, 3), (0, 2), (1, 3)):
        ov = zs.footprint_overlap(first[a], first[b], SMALL_SHAPE)
        assert 0.10 <= ov <= 0.30, (a, b, ov)
    assert zs.footprint_overlap(first[0], first[3], SMALL_SHAPE) < 0.10
    # Frames of the same panel mostly overlap, but not perfectly (dither + rotation).
    same = zs.footprint_overlap(first[0], WCS(fits.getheader(noisy["frame_paths"][3])), SMALL_SHAPE)
    assert 0.85 < same < 0.999


# --------------------------------------------------------------------------------------
# Bayer sampling and truth consistency (noiseless frames)
# --------------------------------------------------------------------------------------


def test_bayer_channel_map():
    cmap = zs.bayer_channel_map((4, 6))
    assert cmap[0].tolist() == [1, 0, 1, 0, 1, 0]  # G R G R
    assert cmap[1].tolist() == [2, 1, 2, 1, 2, 1]  # B G B G
    assert np.array_equal(cmap[2:], cmap[:2])


def test_bayer_sites_sample_their_channel(clean):
    model = zs.load_sky_model(clean["outdir"])
    for idx in (0, clean["n_frames"] - 1):
        raw, _ = _read(clean["frame_paths"][idx])
        exp = zs.expected_frame_rgb(clean["outdir"], idx, model)  # includes t and pedestal
        ref = np.clip(np.rint(exp), 0, 65535)
        sites = {  # GRBG: (row parity, col parity) -> channel
            (0, 0): 1, (0, 1): 0, (1, 0): 2, (1, 1): 1,
        }
        for (dy, dx), c in sites.items():
            got = raw[dy::2, dx::2].astype(float)
            want = ref[dy::2, dx::2, c]
            diff = np.abs(got - want)
            assert diff.max() <= 1.0  # float32 vs float64 rounding at .5 boundaries only
            assert np.mean(diff == 0) > 0.999
        # A swapped pattern would be caught: R sites are far from the green channel.
        assert np.mean(np.abs(raw[0::2, 1::2] - ref[0::2, 1::2, 1])) > 30.0
        assert np.mean(np.abs(raw[1::2, 0::2] - ref[1::2, 0::2, 1])) > 30.0


def test_expected_frame_rgb_by_name_and_without_pedestal(clean):
    _, _, meta = zs.load_truth(clean["outdir"])
    name = meta["frames"][1]["file"]
    a = zs.expected_frame_rgb(clean["outdir"], name)
    b = zs.expected_frame_rgb(clean["outdir"], 1, include_pedestal=False)
    ped = np.array(meta["frames"][1]["sky_pedestal_rgb"], np.float32)
    np.testing.assert_allclose(a - b, np.broadcast_to(ped, a.shape), rtol=0, atol=0.05)


def _frame_vs_truth(outdir, idx, path):
    truth, twcs, meta = zs.load_truth(outdir)
    f = meta["frames"][idx]
    t, s = f["transparency"], np.array(f["sky_pedestal_rgb"])
    raw, hdr = _read(path)
    wcs = WCS(hdr)
    model = zs.load_sky_model(outdir)
    # Star-free pixels: stars-only render below 0.05 ADU within +-3 px.
    star_only = model.render_rgb(wcs, raw.shape, smooth=False).max(axis=-1)
    free = ndimage.maximum_filter(star_only, size=7) < 0.05
    free[:2] = free[-2:] = False
    free[:, :2] = free[:, -2:] = False
    ys, xs = np.nonzero(free)
    sel = np.arange(0, ys.size, 3)
    ys, xs = ys[sel], xs[sel]
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    u, v = twcs.all_world2pix(ra, dec, 0)
    chan = zs.bayer_channel_map(raw.shape)[ys, xs]
    tv = np.empty(ys.size)
    for c in range(3):
        m = chan == c
        tv[m] = ndimage.map_coordinates(truth[..., c], [v[m], u[m]], order=1, mode="nearest")
    return raw[ys, xs].astype(float), tv, t, s[chan], free.mean()


def test_noiseless_frame_matches_truth(clean):
    for idx in (0, 3, clean["n_frames"] - 1):
        got, tv, t, ped, free_frac = _frame_vs_truth(clean["outdir"], idx, clean["frame_paths"][idx])
        assert free_frac > 0.3 and got.size > 5000
        signal = (got - ped) / t
        # Within 1 % of the truth signal, plus the 0.5 ADU rounding of the raw value.
        err = np.abs(signal - tv)
        assert np.all(err <= 0.01 * tv + 0.6 / t)
        assert np.median(err / tv) < 0.01
        # The check has teeth: ignoring the transparency would fail it.
        if t < 0.98:
            assert np.median(np.abs((got - ped) - tv) / tv) > 0.015


def test_model_render_matches_truth_exactly(clean):
    """Frame-grid render of the model vs bilinear samples of the truth grid (no rounding)."""
    truth, twcs, _ = zs.load_truth(clean["outdir"])
    model = zs.load_sky_model(clean["outdir"])
    wcs = WCS(fits.getheader(clean["frame_paths"][2]))
    rgb = model.render_rgb(wcs, SMALL_SHAPE, stars=False)
    ys, xs = np.mgrid[0:480:7, 0:270:7]
    u, v = twcs.all_world2pix(*wcs.all_pix2world(xs.ravel(), ys.ravel(), 0), 0)
    for c in range(3):
        tv = ndimage.map_coordinates(truth[..., c], [v, u], order=1)
        smooth = model.eval_smooth(u, v, (c,))[0]
        fv = rgb[ys.ravel(), xs.ravel(), c]
        # The smooth model sampled at the frame pixels = smooth model at the truth position.
        np.testing.assert_allclose(fv, smooth, rtol=1e-5)
        # And the truth image agrees with it where stars do not contribute.
        ok = np.abs(tv - smooth) < 0.02 * smooth + 5
        assert ok.mean() > 0.9


def test_star_flux_scale_frame_vs_truth(clean):
    """Aperture fluxes of isolated stars agree between frame, truth and the catalogue."""
    truth, twcs, meta = zs.load_truth(clean["outdir"])
    model = zs.load_sky_model(clean["outdir"])
    f = meta["frames"][0]
    t, ped = f["transparency"], np.array(f["sky_pedestal_rgb"])
    raw, hdr = _read(clean["frame_paths"][0])
    wcs = WCS(hdr)
    smooth = model.render_rgb(wcs, raw.shape, stars=False)
    chan = zs.bayer_channel_map(raw.shape)
    x, y = wcs.all_world2pix(model.star_ra, model.star_dec, 0)
    tu, tv = twcs.all_world2pix(model.star_ra, model.star_dec, 0)
    peak = model.star_amp.max(axis=1)
    cand = np.nonzero((peak > 1500) & (peak < 30000) & (x > 12) & (x < 257) & (y > 12) & (y < 467))[0]
    sigma = model.sigma_px
    checked = 0
    for i in cand:
        d = np.hypot(x - x[i], y - y[i])
        if np.any((d < 14) & (d > 0) & (peak > 0.002 * peak[i])):
            continue  # not isolated
        analytic = 2 * np.pi * sigma ** 2 * model.star_amp[i]
        yy, xx = np.mgrid[-7:8, -7:8]
        ap = yy ** 2 + xx ** 2 <= 49
        py, px = int(round(y[i])) + yy[ap], int(round(x[i])) + xx[ap]
        sig = (raw[py, px] - ped[chan[py, px]]) / t - smooth[py, px, chan[py, px]]
        qy, qx = int(round(tv[i])) + yy[ap], int(round(tu[i])) + xx[ap]
        tsm = model.eval_smooth(qx.astype(float), qy.astype(float))
        for c, weight in ((0, 4.0), (1, 2.0), (2, 4.0)):  # Bayer site density per channel
            m = chan[py, px] == c
            frame_flux = weight * sig[m].sum()
            truth_flux = (truth[qy, qx, c] - tsm[c]).sum()
            assert frame_flux == pytest.approx(analytic[c], rel=0.02)
            assert truth_flux == pytest.approx(analytic[c], rel=0.01)
        checked += 1
    assert checked >= 2


# --------------------------------------------------------------------------------------
# Noise and defects
# --------------------------------------------------------------------------------------


def test_noise_level_matches_gain_and_read_noise(noisy):
    _, _, meta = zs.load_truth(noisy["outdir"])
    model = zs.load_sky_model(noisy["outdir"])
    f = meta["frames"][1]
    raw, hdr = _read(noisy["frame_paths"][1])
    exp = zs.expected_bayer_frame(model, WCS(hdr), raw.shape, transparency=f["transparency"],
                                  sky_pedestal_rgb=f["sky_pedestal_rgb"])
    resid = raw - exp
    hot = np.zeros(raw.shape, bool)
    hot[tuple(np.array(meta["hot_pixels"]).T)] = True
    ok = (exp < 3000) & ~ndimage.binary_dilation(hot, iterations=1)
    if f["has_satellite"]:
        pytest.skip("satellite frame")
    predicted = np.sqrt(exp[ok] / 0.8 + 3.0 ** 2)
    z = resid[ok] / predicted
    assert abs(np.mean(z)) < 0.05
    assert np.std(z) == pytest.approx(1.0, rel=0.05)


def test_hot_pixels_are_sensor_fixed(noisy):
    _, _, meta = zs.load_truth(noisy["outdir"])
    hot = np.array(meta["hot_pixels"])
    amps = np.array(meta["hot_pixel_adu"])
    assert len(hot) >= 4 and hot.shape[1] == 2
    assert len({tuple(p) for p in hot.tolist()}) == len(hot)
    for p in noisy["frame_paths"]:
        raw, _ = _read(p)
        raw = raw.astype(float)
        for (y, x), a in zip(hot, amps):
            # Same-colour neighbours are 2 px away in a Bayer mosaic.
            neigh = np.median([raw[y - 2, x], raw[y + 2, x], raw[y, x - 2], raw[y, x + 2]])
            if neigh > 20000:
                continue  # hot pixel under a saturated star
            assert raw[y, x] - neigh > 0.5 * a


def test_satellite_trail_in_exactly_one_frame(noisy):
    _, _, meta = zs.load_truth(noisy["outdir"])
    flagged = [f["index"] for f in meta["frames"] if f["has_satellite"]]
    assert len(flagged) == 1 and meta["satellite_frame"] == flagged[0]
    trail = meta["frames"][flagged[0]]["satellite"]
    assert trail["peak_adu"] >= 3000 and 2 <= trail["width_px"] <= 5
    model = zs.load_sky_model(noisy["outdir"])
    s = np.linspace(0.1, 0.9, 40)
    ty = np.rint(trail["y0"] + s * (trail["y1"] - trail["y0"])).astype(int)
    tx = np.rint(trail["x0"] + s * (trail["x1"] - trail["x0"])).astype(int)
    excess = []
    for f, p in zip(meta["frames"], noisy["frame_paths"]):
        raw, hdr = _read(p)
        exp = zs.expected_bayer_frame(model, WCS(hdr), raw.shape, transparency=f["transparency"],
                                      sky_pedestal_rgb=f["sky_pedestal_rgb"])
        excess.append(np.median(raw[ty, tx] - exp[ty, tx]))
    excess = np.array(excess)
    assert excess[flagged[0]] > 0.5 * trail["peak_adu"]
    others = np.delete(excess, flagged[0])
    assert np.all(np.abs(others) < 30.0)


# --------------------------------------------------------------------------------------
# Sky gradients, light domes, two nights in one panel, per-panel sky levels
# --------------------------------------------------------------------------------------

GRADIENT_KW = dict(panels=(2, 1), frames_per_panel=3, seed=4, size="small", noise=False,
                   hot_pixels=False, satellite=False)
TWO_NIGHTS = [(0.02, 0.12, 0.04), [(-0.03, 0.15, 0.03), (0.04, -0.10)]]
LEVELS = [0.8, 1.2]


@pytest.fixture(scope="module")
def domed(tmp_path_factory):
    """Noiseless 2x1 x 3 frames: a dome in panel 0, two nights in panel 1, sky levels 0.8 / 1.2;
    and the same scene without the new options."""
    out = tmp_path_factory.mktemp("synth_domed")
    new = zs.generate_dataset(out / "new", panel_sky_gradient=TWO_NIGHTS, panel_sky_level=LEVELS, **GRADIENT_KW)
    old = zs.generate_dataset(out / "old", **GRADIENT_KW)
    return {"new": new, "old": old, "root": out}


def test_sky_gradient_plane_dome():
    plane = zs.sky_gradient_plane((5, 7), (0.0, 0.0, 0.04))
    assert plane[2, 3] == pytest.approx(1.0)
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        assert plane[y, x] == pytest.approx(1.04)
    np.testing.assert_array_equal(zs.sky_gradient_plane((5, 7), (0.1, -0.2, 0.0)),
                                  zs.sky_gradient_plane((5, 7), (0.1, -0.2)))
    tilted = zs.sky_gradient_plane((5, 7), (0.1, -0.2, 0.03))
    assert tilted[0, -1] - tilted[0, 0] == pytest.approx(0.1)
    assert tilted[-1, 3] - tilted[0, 3] == pytest.approx(-0.2)


def test_domed_frames_are_expected_frame_rgb(domed):
    """Noise off: every Bayer site is the rounded expectation, dome, two nights and levels included."""
    root = Path(domed["new"]["truth_dir"]).parent
    model = zs.load_sky_model(root)
    cmap = zs.bayer_channel_map(SMALL_SHAPE)
    for idx, path in enumerate(domed["new"]["frame_paths"]):
        raw, _ = _read(path)
        exp = zs.expected_frame_rgb(root, idx, model)
        want = np.clip(np.rint(np.take_along_axis(exp, cmap[..., None], axis=-1)[..., 0]), 0, 65535)
        diff = np.abs(raw - want)
        assert diff.max() <= 1.0 and np.mean(diff == 0) > 0.999


def test_two_nights_split_and_recorded_gradients(domed):
    _, _, meta = zs.load_truth(Path(domed["new"]["truth_dir"]).parent)
    grads = [f["sky_gradient"] for f in meta["frames"]]
    # Panel 0: one domed gradient, 3 values; panel 1: its first ceil(3/2) = 2 frames in time
    # order take the first night's gradient, the last frame the second (no dome: 2 values).
    assert grads[:3] == [[0.02, 0.12, 0.04]] * 3
    assert grads[3:] == [[-0.03, 0.15, 0.03]] * 2 + [[0.04, -0.10]]
    assert meta["options"]["panel_sky_level"] == LEVELS
    # The two nights differ in the frames themselves: the sky's vertical slope changes sign.
    root = Path(domed["new"]["truth_dir"]).parent
    slopes = []
    for idx in (3, 4, 5):
        sky = zs.expected_frame_rgb(root, idx) - zs.expected_frame_rgb(root, idx, include_pedestal=False)
        slopes.append(float(np.mean(sky[-20:, :, 1]) - np.mean(sky[:20, :, 1])))
    assert slopes[0] > 0 and slopes[1] > 0 and slopes[2] < 0


def test_sky_level_scales_the_pedestal_only(domed):
    """Same seed with and without the options: pedestals scaled by the panel's level, the rest equal."""
    _, _, new = zs.load_truth(Path(domed["new"]["truth_dir"]).parent)
    _, _, old = zs.load_truth(Path(domed["old"]["truth_dir"]).parent)
    for fn, fo in zip(new["frames"], old["frames"]):
        level = LEVELS[fn["panel"]]
        assert fn["sky_level"] == level and "sky_level" not in fo and "sky_gradient" not in fo
        np.testing.assert_allclose(fn["sky_pedestal_rgb"], np.array(fo["sky_pedestal_rgb"]) * level, rtol=1e-12)
        assert fn["transparency"] == fo["transparency"] and fn["center_ra"] == fo["center_ra"]
    assert "panel_sky_level" not in old["options"] and "panel_sky_gradient" not in old["options"]


def test_zero_dome_is_the_old_two_value_gradient(tmp_path):
    kw = dict(panels=(1, 1), frames_per_panel=1, seed=2, size="small")
    a = zs.generate_dataset(tmp_path / "a", panel_sky_gradient=[(0.05, -0.1)], **kw)
    b = zs.generate_dataset(tmp_path / "b", panel_sky_gradient=[(0.05, -0.1, 0.0)], **kw)
    assert Path(a["frame_paths"][0]).read_bytes() == Path(b["frame_paths"][0]).read_bytes()
    assert json.loads(Path(b["truth_json"]).read_text())["frames"][0]["sky_gradient"] == [0.05, -0.1]


def test_gradient_and_level_validation(tmp_path):
    kw = dict(panels=(1, 1), frames_per_panel=1, size="small")
    with pytest.raises(ValueError, match="positive"):
        zs.generate_dataset(tmp_path, panel_sky_gradient=[(1.2, 0.9)], **kw)
    with pytest.raises(ValueError, match="positive"):  # a negative dome darkens the corners below 0
        zs.generate_dataset(tmp_path, panel_sky_gradient=[(0.5, 0.5, -0.6)], **kw)
    with pytest.raises(ValueError, match="positive"):
        zs.generate_dataset(tmp_path, panel_sky_gradient=[[(0.1, 0.1), (1.5, 1.0)]], **kw)
    with pytest.raises(ValueError, match="2 gradients"):
        zs.generate_dataset(tmp_path, panel_sky_gradient=[[(0.1, 0.1)] * 3], **kw)
    with pytest.raises(ValueError, match="one number per panel"):
        zs.generate_dataset(tmp_path, panel_sky_level=[1.0, 1.1], **kw)
    with pytest.raises(ValueError, match="> 0"):
        zs.generate_dataset(tmp_path, panel_sky_level=[0.0], **kw)
    # A positive dome lifts the sky: a tilt the plane alone could not take is fine with it.
    assert zs._gradient_min((1.9, 0.0, 0.5)) > 0 and zs._gradient_min((2.1, 0.0)) < 0


# --------------------------------------------------------------------------------------
# API errors and CLI
# --------------------------------------------------------------------------------------


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="unknown option"):
        zs.generate_dataset(tmp_path, panels=(1, 1), frames_per_panel=1, bogus=1)
    with pytest.raises(ValueError, match="size"):
        zs.generate_dataset(tmp_path, panels=(1, 1), frames_per_panel=1, size="huge")


def test_cli_writes_files(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = zs.main([str(out), "--panels", "2x1", "--frames-per-panel", "2", "--seed", "3", "--size", "small"])
    assert rc == 0
    msg = capsys.readouterr().out
    assert "wrote 4 frames" in msg and "truth.fits" in msg
    frames = sorted((out / "frames").glob("*.fits"))
    assert len(frames) == 4
    assert (out / "truth" / "truth.fits").is_file() and (out / "truth" / "truth.json").is_file()
    meta = json.loads((out / "truth" / "truth.json").read_text())
    assert meta["layout"]["panels"] == [2, 1] and meta["seed"] == 3


def test_cli_bad_panels_is_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        zs.main([str(tmp_path), "--panels", "2by2"])
    assert exc.value.code == 2
    assert "NXxNY" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        zs.main([str(tmp_path), "--panels", "0x2"])


def test_python_dash_m(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "zemosaic_synth", str(out), "--panels", "1x1",
                           "--frames-per-panel", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 frame " in proc.stdout
    assert len(list((out / "frames").glob("Light_panel*.fits"))) == 1
