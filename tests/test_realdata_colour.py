"""Real Seestar subs of one field from two nights: one colour balance across the mosaic.

The shared frames (``../shared/realdata/ngc7023``: four 10 s subs of 2024, two 20 s subs of 2025
rotated ~120 deg, without WCS) see the sky through different colour balances. Where only one
night covers, the mosaic's colours come from that night's frames alone, so a normalisation that
does not bring every frame to one balance shows up as a colour step between the regions.

Measured on the same stars, which removes the spread of the stars' own colours: the stars'
fluxes in the mosaic (aperture photometry, R, G, B) against their fluxes in the raw frames of a
night give a colour transfer (R/G, B/G) that must be the same wherever the stars are; for stars
covered by night 2 only it is taken against night 2's fluxes carried to night 1's balance by the
ratio of the two nights' fluxes on the stars both nights cover.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import zemosaic_astrometry as za
import zemosaic_fits as zf
import zemosaic_worker as zw
from zemosaic_config import MosaicConfig

from realdata import NGC7023 as REALDATA
pytestmark = pytest.mark.skipif(not REALDATA.is_dir(), reason="shared real Seestar frames not present")

R_AP, R_IN, R_OUT = 5, 8, 12
_YY, _XX = np.mgrid[-R_OUT:R_OUT + 1, -R_OUT:R_OUT + 1]
_RR = np.hypot(_XX, _YY)


def _aperture_rgb(image, x, y):
    """Return sky-subtracted aperture fluxes (C,) at ``(x, y)``; None at an edge, NaN or a
    saturated or non-positive star."""
    if not (np.isfinite(x) and np.isfinite(y)):
        return None
    x0, y0 = int(round(float(x))), int(round(float(y)))
    h, w = image.shape[:2]
    if not (R_OUT <= x0 < w - R_OUT and R_OUT <= y0 < h - R_OUT):
        return None
    box = image[y0 - R_OUT:y0 + R_OUT + 1, x0 - R_OUT:x0 + R_OUT + 1]
    if not np.isfinite(box).all():
        return None
    sky = np.median(box[(_RR >= R_IN) & (_RR <= R_OUT)], axis=0)
    flux = (box[_RR <= R_AP] - sky).sum(axis=0)
    return flux if np.all(flux > 0) else None


def _frames(out, report):
    """Return ``(night, wcs, debayered data)`` of every frame the run used."""
    cache = za.WcsCache(str(out / zw.CACHE_DIR / zw.WCS_CACHE_DIR))
    frames = []
    for entry in report.used_frame_wcs():
        info = zf.read_frame_info(entry["path"], require_wcs=False)
        wcs = info.wcs if entry["wcs"] == "header" else cache.get(za.file_sha256(entry["path"])).wcs
        data = zf.load_frame(entry["path"], wcs=wcs).data
        frames.append((1 if "2024" in Path(entry["path"]).name else 2, wcs, data))
    return frames


def _star_rows(mosaic, wcs, frames):
    """Return per star ``(mosaic fluxes, {night: mean raw fluxes})`` for unsaturated stars."""
    stars = za.detect_stars(mosaic.mean(axis=2), max_stars=600)
    ra, dec = wcs.all_pix2world(stars[:, 0], stars[:, 1], 0)
    rows = []
    for (x, y), a, d in zip(stars, ra, dec):
        flux = _aperture_rgb(mosaic, x, y)
        if flux is None or flux[1] < 2000:
            continue
        per_night = {1: [], 2: []}
        for night, frame_wcs, data in frames:
            fx, fy = (float(v) for v in frame_wcs.all_world2pix(a, d, 0))
            raw = _aperture_rgb(data, fx, fy)
            if raw is not None and data[int(round(fy)), int(round(fx))].max() < 60000:
                per_night[night].append(raw)
        nights = {n: np.mean(v, axis=0) for n, v in per_night.items() if v}
        if nights:
            rows.append((flux, nights))
    return rows


def _transfer(rows, region, scale=None):
    """Return a region's colour transfer ``(R/G, B/G)`` of mosaic fluxes over raw-night fluxes.

    Ratios of sums over the region's stars (the same estimator as the frame gains): a median of
    per-star ratios is biased by the noise of the faint stars' raw fluxes in single subs.
    """
    night = 2 if region == {2} else 1
    picked = [(m, c) for m, c in rows if set(c) == region]
    mosaic = np.sum([m for m, _c in picked], axis=0)
    raw = np.sum([c[night] * (1 if scale is None else scale) for _m, c in picked], axis=0)
    ratio = mosaic / raw
    return np.array([ratio[0] / ratio[1], ratio[2] / ratio[1]]), len(picked)


@pytest.fixture(scope="module")
def colour_transfer(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "out"
    result = zw.run_mosaic(MosaicConfig(input_folder=str(REALDATA), output_folder=str(out)))
    assert len(result.report.frames_used) == 6
    mosaic, wcs, _coverage, _header = zf.read_image_fits(out / zw.MOSAIC_NAME)
    rows = _star_rows(mosaic, wcs, _frames(out, result.report))
    both = [c for _m, c in rows if len(c) == 2]
    # Night 2's raw fluxes carried to night 1's balance: per channel, from the stars both cover.
    night2_to_1 = np.sum([c[1] for c in both], axis=0) / np.sum([c[2] for c in both], axis=0)
    t1, n1 = _transfer(rows, {1})
    t2, n2 = _transfer(rows, {2}, night2_to_1)
    tb, nb = _transfer(rows, {1, 2})
    return {"nights": np.array([night2_to_1[0] / night2_to_1[1], night2_to_1[2] / night2_to_1[1]]),
            "night1_only": t1, "night2_only": t2, "both": tb, "counts": [n1, n2, nb]}


def _steps(colour_transfer):
    return {region: colour_transfer[region] / colour_transfer["night1_only"] - 1
            for region in ("night2_only", "both")}


def _describe(colour_transfer):
    return json.dumps({k: np.round(v, 4).tolist() for k, v in colour_transfer.items()})


def test_the_two_nights_really_differ_in_colour(colour_transfer):
    """The data carry the problem: the nights' raw R/G or B/G differ by well over 3 %."""
    assert min(colour_transfer["counts"]) >= 50
    assert np.max(np.abs(colour_transfer["nights"] - 1)) > 0.1, _describe(colour_transfer)


def test_star_colours_follow_one_balance_within_twelve_percent(colour_transfer):
    """Frames of the other night get per-channel gains: the regions' colours stay together.

    With one grey gain per frame the night-2-only region was 26 % redder and 40 % bluer.
    """
    for region, step in _steps(colour_transfer).items():
        assert np.all(np.abs(step) < 0.12), (region, step, _describe(colour_transfer))


@pytest.mark.xfail(reason="measured steps of up to 7-8 % in R/G or B/G between the regions: the "
                          "frame gains of the two 20 s subs are measured to only 1-4 % per channel "
                          "and per-star colours scatter widely on single subs", strict=False)
def test_star_colours_agree_within_three_percent(colour_transfer):
    for region, step in _steps(colour_transfer).items():
        assert np.all(np.abs(step) < 0.03), (region, step, _describe(colour_transfer))
