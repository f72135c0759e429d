"""Shared fixtures: synthetic WCSs and small images with known truth."""

import os
import sys

import numpy as np
import pytest
from astropy.wcs import WCS

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SEESTAR_SCALE_DEG = 2.39 / 3600.0


def make_tan_wcs(ra, dec, shape_hw, rotation_deg=0.0, scale_deg=SEESTAR_SCALE_DEG, sip=None):
    """Return a TAN (or TAN-SIP) WCS with a CD matrix centred on an image of ``shape_hw``."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [shape_hw[1] / 2 + 0.5, shape_hw[0] / 2 + 0.5]
    c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    w.wcs.cd = scale_deg * np.array([[-c, s], [s, c]])
    if sip:
        from astropy.wcs import Sip

        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], a[3, 0] = sip, -0.5 * sip, 1e-3 * sip
        b[0, 2], b[1, 1], b[0, 3] = sip, 0.3 * sip, -1e-3 * sip
        w.sip = Sip(a, b, None, None, w.wcs.crpix)
    w.wcs.set()
    return w


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


@pytest.fixture
def numpy_as_gpu(monkeypatch):
    """Run the GPU code paths with NumPy standing in for CuPy (no GPU needed)."""
    import zemosaic_utils
    import zemosaic_worker

    monkeypatch.setattr(zemosaic_utils, "get_xp", lambda use_gpu=False: np)
    monkeypatch.setattr(zemosaic_worker, "gpu_available", lambda: True)
    return np
