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

Single subs measure a star's colour to 5-20 % (where an undersampled star falls on the Bayer grid
changes its R and B), so each figure is a median over the stars bright in every frame that
covers them: a ratio of sums is carried by the few brightest stars and scatters by 4-6 %
(bootstrap over the stars), a median over all stars is biased by the faint ones' noise. The
medians' own bootstrap sigma, 2-4 %, is the precision of these figures.
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
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not REALDATA.is_dir(), reason="shared real Seestar frames not present")]

R_AP, R_IN, R_OUT = 5, 8, 12
BRIGHT_ADU = 2000.0  # G aperture flux a star needs in every raw frame that covers it
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


def _bright(rows):
    """The rows of stars bright in every night that covers them (see BRIGHT_ADU)."""
    return [(m, c) for m, c in rows if min(flux[1] for flux in c.values()) >= BRIGHT_ADU]


def _night_ratio(rows):
    """Per channel, the median over stars both nights cover of night 1's raw flux over night 2's."""
    return np.median([c[1] / c[2] for _m, c in rows if len(c) == 2], axis=0)


def _transfer(rows, region, scale=None):
    """Return a region's colour transfer ``(R/G, B/G)`` of mosaic fluxes over raw-night fluxes.

    The median over the region's stars of each star's transfer (see the module docstring).
    """
    night = 2 if region == {2} else 1
    picked = [(m, c) for m, c in rows if set(c) == region]
    ratio = np.array([m / (c[night] * (1 if scale is None else scale)) for m, c in picked])
    colour = np.stack([ratio[:, 0] / ratio[:, 1], ratio[:, 2] / ratio[:, 1]], axis=1)
    return np.median(colour, axis=0), len(picked)


def _figures(rows):
    """Return the night ratio's colour and the three regions' transfers, with their star counts."""
    night2_to_1 = _night_ratio(rows)
    t1, n1 = _transfer(rows, {1})
    t2, n2 = _transfer(rows, {2}, night2_to_1)
    tb, nb = _transfer(rows, {1, 2})
    return {"nights": np.array([night2_to_1[0] / night2_to_1[1], night2_to_1[2] / night2_to_1[1]]),
            "night1_only": t1, "night2_only": t2, "both": tb, "counts": [n1, n2, nb]}


def _bootstrap_sigma(rows, draws=200):
    """Bootstrap sigma (resampling the stars) of the steps between the regions."""
    rng = np.random.default_rng(0)
    steps = [_steps(_figures([rows[i] for i in rng.integers(0, len(rows), len(rows))]))
             for _ in range(draws)]
    return {region: np.std([s[region] for s in steps], axis=0) for region in steps[0]}


@pytest.fixture(scope="module")
def colour_transfer(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "out"
    result = zw.run_mosaic(MosaicConfig(input_folder=str(REALDATA), output_folder=str(out)))
    assert len(result.report.frames_used) == 6
    mosaic, wcs, _coverage, _header = zf.read_image_fits(out / zw.MOSAIC_NAME)
    rows = _bright(_star_rows(mosaic, wcs, _frames(out, result.report)))
    figures = _figures(rows)
    figures["sigma"] = _bootstrap_sigma(rows)
    return figures


def _steps(colour_transfer):
    return {region: colour_transfer[region] / colour_transfer["night1_only"] - 1
            for region in ("night2_only", "both")}


def _describe(colour_transfer):
    return json.dumps({k: (np.round(v, 4).tolist() if k != "sigma" else
                           {r: np.round(x, 4).tolist() for r, x in v.items()})
                       for k, v in colour_transfer.items()})


def test_the_two_nights_really_differ_in_colour(colour_transfer):
    """The data carry the problem: the nights' raw R/G or B/G differ by well over 3 %."""
    assert min(colour_transfer["counts"]) >= 50
    assert np.max(np.abs(colour_transfer["nights"] - 1)) > 0.1, _describe(colour_transfer)


def test_star_colours_follow_one_balance_within_six_percent(colour_transfer):
    """Frames of the other night get per-channel gains: the regions' colours stay together.

    With one grey gain per frame the night-2-only region was 26 % redder and 40 % bluer; with
    per-channel gains against the reference frame alone, and star cores clipped by the rejection,
    up to 7 % apart.
    """
    for region, step in _steps(colour_transfer).items():
        assert np.all(np.abs(step) < 0.06), (region, step, _describe(colour_transfer))


def test_star_colours_agree_within_three_percent(colour_transfer):
    """Measured: +1.3 % and +1.7 % (night 2 only), -1.0 % and -1.0 % (both nights) in R/G and B/G,
    each with a bootstrap sigma of 2-3 %, so six single subs show 3 % but cannot confirm it with
    margin. With a 0.5 % per-star error floor in every channel (the few brightest stars carried the
    star ratios) the steps were 0.0 %, -1.3 %, -2.2 % and -4.3 %."""
    for region, step in _steps(colour_transfer).items():
        assert np.all(np.abs(step) < 0.03), (region, step, _describe(colour_transfer))
