"""FITS input/output of Exposure: LSST multi-extension layout, single-HDU fallback, atomic writes."""

import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import jaxdiff as jd
from tests.utils import REAL_DATA, assert_allclose


def _wcs(shape) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.1, 2.2]
    wcs.wcs.crpix = [shape[1] / 2 + 0.3, shape[0] / 2 - 1.7]
    wcs.wcs.cd = [[-5.0e-5, 1.0e-6], [2.0e-6, 5.0e-5]]
    return wcs


def _exposure(rng, dtype=np.float32, psf=None) -> jd.Exposure:
    shape = (37, 52)
    image = rng.normal(size=shape).astype(dtype)
    variance = rng.uniform(0.5, 2.0, size=shape).astype(dtype)
    planes = {**jd.MASK_PLANES, "STREAK": 12, "INJECTED_TEMPLATE": 9}
    mask = rng.integers(0, 1 << 13, size=shape).astype(np.int32)
    return jd.Exposure(
        image,
        variance,
        mask=mask,
        psf=jd.ImagePsf(jd.GaussianPsf(1.7, 15).image()) if psf is None else psf,
        xy0=(123, -45),
        photo_calib=0.3125,
        wcs=_wcs(shape),
        mask_planes=planes,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_keeps_every_field(tmp_path, rng, dtype):
    exposure = _exposure(rng, dtype)
    path = tmp_path / "exp.fits"
    jd.write_exposure(path, exposure)
    back = jd.read_exposure(path)

    assert back.image.dtype == dtype and back.variance.dtype == dtype and back.mask.dtype == np.int32
    np.testing.assert_array_equal(back.image, exposure.image)
    np.testing.assert_array_equal(back.variance, exposure.variance)
    np.testing.assert_array_equal(back.mask, exposure.mask)
    assert dict(back.mask_planes) == dict(exposure.mask_planes)
    assert dict(back.mask_planes)["STREAK"] == 12
    assert isinstance(back.psf, jd.ImagePsf)
    assert_allclose(back.psf.image(), exposure.psf.image(), rtol=1e-6)
    np.testing.assert_array_equal(back.xy0, [123, -45])
    assert float(back.photo_calib) == 0.3125

    pix = np.array([[0.0, 0.0], [51.0, 36.0], [10.5, 20.25], [-3.0, 40.0]])
    assert_allclose(back.wcs.wcs_pix2world(pix, 0), exposure.wcs.wcs_pix2world(pix, 0), rtol=1e-12)


def test_file_follows_lsst_layout(tmp_path, rng):
    path = tmp_path / "exp.fits"
    jd.write_exposure(path, _exposure(rng))
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE", "PSF"]
        assert hdul[0].data is None
        assert hdul["IMAGE"].header["LTV1"] == -123 and hdul["IMAGE"].header["LTV2"] == 45
        assert hdul["MASK"].header["MP_NO_DATA"] == 8
        assert hdul["MASK"].header["MP_DETECTED_NEGATIVE"] == 6
        assert hdul["MASK"].data.dtype.kind == "i" and hdul["MASK"].data.dtype.itemsize == 4


def test_gaussian_psf_round_trips_as_gaussian(tmp_path, rng):
    exposure = _exposure(rng, np.float64, psf=jd.GaussianPsf(1.37, 13))
    path = tmp_path / "g.fits"
    jd.write_exposure(path, exposure)
    back = jd.read_exposure(path)
    assert isinstance(back.psf, jd.GaussianPsf) and back.psf.size == 13
    assert float(back.psf.width) == 1.37
    assert_allclose(back.psf.image(), exposure.psf.image())


def test_optional_hdus_default(tmp_path, rng):
    image = rng.normal(size=(64, 64)).astype(np.float32)
    path = tmp_path / "image_only.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name="IMAGE")]).writeto(path)
    back = jd.read_exposure(path)
    np.testing.assert_array_equal(back.image, image)
    np.testing.assert_array_equal(back.mask, 0)
    assert back.mask_planes == tuple(jd.MASK_PLANES.items())
    assert back.psf is None and back.wcs is None
    np.testing.assert_array_equal(back.xy0, [0, 0])
    assert float(back.photo_calib) == 1.0
    assert np.ptp(np.asarray(back.variance)) == 0 and float(back.variance[0, 0]) > 0


def test_single_hdu_variance_estimate_matches_noise(tmp_path, rng):
    sigma = 3.0
    ny, nx = 200, 300
    yy, xx = np.mgrid[:ny, :nx]
    background = 1000.0 + 0.8 * xx - 0.5 * yy
    image = background + rng.normal(0.0, sigma, size=(ny, nx))
    image[17, 40] = np.nan
    image[150:153, 10:13] += 5000.0  # a star: the IQR ignores it
    path = tmp_path / "plain.fits"
    fits.PrimaryHDU(image).writeto(path)
    back = jd.read_exposure(path)
    assert back.image.dtype == np.float64
    variance = np.asarray(back.variance)
    assert np.ptp(variance) == 0
    assert abs(variance[0, 0] / sigma**2 - 1) < 0.03
    np.testing.assert_array_equal(back.mask, 0)


def test_missing_file_raises_file_not_found(tmp_path):
    path = tmp_path / "nope.fits"
    with pytest.raises(FileNotFoundError, match="nope.fits"):
        jd.read_exposure(path)


def test_non_fits_file_raises_value_error(tmp_path):
    path = tmp_path / "notes.fits"
    path.write_text("these are not the pixels you are looking for\n" * 100)
    with pytest.raises(ValueError, match="notes.fits.*FITS"):
        jd.read_exposure(path)


@pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")
def test_truncated_file_raises_value_error(tmp_path, rng):
    path = tmp_path / "cut.fits"
    jd.write_exposure(path, _exposure(rng))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.fits"):
        jd.read_exposure(path)


def test_invalid_planes_raise_value_error_naming_file(tmp_path):
    path = tmp_path / "negvar.fits"
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(np.zeros((8, 8)), name="IMAGE")]
    fits.HDUList(hdus + [fits.ImageHDU(-np.ones((8, 8)), name="VARIANCE")]).writeto(path)
    with pytest.raises(ValueError, match="negvar.fits.*variance"):
        jd.read_exposure(path)


def test_file_without_image_raises_value_error(tmp_path):
    path = tmp_path / "table.fits"
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="D", array=np.arange(3.0))])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    with pytest.raises(ValueError, match="table.fits.*no image"):
        jd.read_exposure(path)


def test_mismatched_variance_hdu_raises_value_error(tmp_path):
    path = tmp_path / "bad.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(np.zeros((8, 8)), name="IMAGE"),
            fits.ImageHDU(np.ones((8, 9)), name="VARIANCE"),
        ]
    ).writeto(path)
    with pytest.raises(ValueError, match="bad.fits.*VARIANCE shape"):
        jd.read_exposure(path)


def test_failed_write_leaves_nothing_behind(tmp_path, rng, monkeypatch):
    target = tmp_path / "out.fits"
    target.write_bytes(b"previous contents")

    def boom(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", boom)
    with pytest.raises(OSError, match="disk full"):
        jd.write_exposure(target, _exposure(rng))
    assert target.read_bytes() == b"previous contents"
    assert sorted(os.listdir(tmp_path)) == ["out.fits"]

    fresh = tmp_path / "fresh.fits"
    with pytest.raises(OSError, match="disk full"):
        jd.write_exposure(fresh, _exposure(rng))
    assert sorted(os.listdir(tmp_path)) == ["out.fits"]


def test_write_replaces_existing_file(tmp_path, rng):
    target = tmp_path / "out.fits"
    target.write_bytes(b"previous contents")
    exposure = _exposure(rng)
    jd.write_exposure(str(target), exposure)
    np.testing.assert_array_equal(jd.read_exposure(target).image, exposure.image)
    assert sorted(os.listdir(tmp_path)) == ["out.fits"]


@pytest.mark.data
def test_reads_real_decam_single_hdu():
    path = REAL_DATA / "sfft_decam_decorr" / "input" / "DEC-OBS04a.mini.fits"
    if not path.exists():
        pytest.skip("real data not present")
    exposure = jd.read_exposure(path)
    header = fits.getheader(path)
    assert exposure.shape == (256, 256) and exposure.image.dtype == np.float64
    assert exposure.wcs is not None and exposure.wcs.has_celestial
    np.testing.assert_array_equal(exposure.xy0, [-header["LTV1"], -header["LTV2"]])
    # The header's AVSIG is the pipeline's sky noise in ADU; resampling correlates the noise, so allow 15 %.
    assert abs(np.sqrt(float(exposure.variance[0, 0])) / header["AVSIG"] - 1) < 0.15
