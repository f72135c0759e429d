"""The shared real Seestar subs (``../shared/realdata/ngc7023``) and their independent WCSs.

Used by the tests and the benchmarks; the frames are read where they lie, never copied.
"""

from __future__ import annotations

import json
from pathlib import Path

from astropy.wcs import WCS

NGC7023 = Path(__file__).resolve().parents[1].parent / "shared" / "realdata" / "ngc7023"


def reference_frames() -> dict:
    """Return ``reference_wcs.json``'s entries by file name (sha256, reference_wcs, ...)."""
    return json.loads((NGC7023 / "reference_wcs.json").read_text())["frames"]


def reference_wcs(entry) -> WCS:
    """Return the TAN WCS of one ``reference_wcs.json`` entry."""
    ref = entry["reference_wcs"]
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ref["CRVAL1"], ref["CRVAL2"]]
    wcs.wcs.crpix = [ref["CRPIX1"], ref["CRPIX2"]]
    wcs.wcs.cd = [[ref["CD1_1"], ref["CD1_2"]], [ref["CD2_1"], ref["CD2_2"]]]
    wcs.wcs.set()
    return wcs
