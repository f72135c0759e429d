"""What other tools read in the products: orientation, DATE/ORIGIN, one frame (ICRS), COVERAGE."""

import time

import numpy as np
import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

import zemosaic_fits as zf
import zemosaic_synth
import zemosaic_worker as zw
from zemosaic_config import MosaicConfig


def _wcs(radesys="ICRS", equinox=None):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval, wcs.wcs.crpix = [315.4, 68.16], [20.5, 15.5]
    wcs.wcs.cd = [[-6.6e-4, 0.0], [0.0, 6.6e-4]]
    wcs.wcs.radesys = radesys
    if equinox is not None:
        wcs.wcs.equinox = equinox
    wcs.wcs.set()
    return wcs


def test_products_carry_date_origin_icrs_and_a_named_coverage(tmp_path):
    path = tmp_path / "m.fits"
    zf.write_image_fits(path, np.ones((30, 40, 3), np.float32), _wcs(), coverage=np.ones((30, 40)))
    with fits.open(path) as hdul:
        primary, coverage = hdul[0].header, hdul[1].header
        written = Time(primary["DATE"], format="isot", scale="utc")
        assert abs(written.unix - time.time()) < 120
        assert primary["ORIGIN"] == "ZeMosaic"
        assert primary["RADESYS"] == coverage["RADESYS"] == "ICRS"
        assert coverage["EXTNAME"] == "COVERAGE"


def test_an_fk5_j2000_frame_is_read_as_icrs(tmp_path):
    path = tmp_path / "frame.fits"
    header = _wcs("FK5", 2000.0).to_header()
    fits.PrimaryHDU(np.ones((30, 40), np.float32), header=header).writeto(path)
    wcs = zf.read_frame_info(str(path)).wcs
    assert wcs.wcs.radesys == "ICRS"
    # The same pixels, the same sky: only the label changed.
    np.testing.assert_allclose(wcs.pixel_to_world_values(3.0, 7.0),
                               _wcs("FK5", 2000.0).pixel_to_world_values(3.0, 7.0), atol=1e-12)


@pytest.fixture(scope="module")
def turned_field(tmp_path_factory):
    """Two panels whose frames are turned 35 degrees on the sky, as an alt-az mount leaves them."""
    root = tmp_path_factory.mktemp("turned")
    return zemosaic_synth.generate_dataset(root, panels=(2, 1), frames_per_panel=3, seed=4, size="small",
                                           base_rotation_deg=35.0, rotation_drift_deg=0.0)


def _rotation_deg(wcs) -> float:
    cd = wcs.pixel_scale_matrix
    return float(np.degrees(np.arctan2(cd[1, 0], cd[1, 1])))


@pytest.mark.parametrize("final_grid, north_up", [("north_up", True), ("rotated", False)])
def test_final_grid_north_up_or_rotated(turned_field, tmp_path, final_grid, north_up):
    out = tmp_path / "o"
    result = zw.run_mosaic(MosaicConfig(input_folder=turned_field["frames_dir"], output_folder=str(out),
                                        final_grid=final_grid, num_processing_workers=1))
    _, wcs, _, _ = zf.read_image_fits(result.paths["mosaic"])
    cd = wcs.pixel_scale_matrix
    if north_up:
        assert abs(_rotation_deg(wcs)) < 1e-6 and cd[0, 0] < 0 < cd[1, 1]  # north up, east left
    else:
        assert abs(_rotation_deg(wcs)) > 5.0  # turned with the frames to the smallest canvas
