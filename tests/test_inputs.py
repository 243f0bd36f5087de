"""Plain FITS in, a good difference out: PSF estimation, gain/read noise/saturation/valid range/mask options,
`--config`, and `--align` onto the science WCS (`jaxdiff._inputs`, `jaxdiff._align`, the command line)."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

import jaxdiff as jd
from jaxdiff._cli import _detections, _match, main
from jaxdiff._mask import as_plane_table, plane_bit
from jaxdiff.sim import simulate_pair

FLUX_SCALE = 1.1
SAT = 1 << plane_bit(as_plane_table(jd.MASK_PLANES), "SAT")
BAD = 1 << plane_bit(as_plane_table(jd.MASK_PLANES), "BAD")
NO_DATA = 1 << plane_bit(as_plane_table(jd.MASK_PLANES), "NO_DATA")


def _wcs(shape, rotation_deg=0.0, shift=(0.0, 0.0)):
    """A TAN WCS with 0.2″ pixels; the template's differs by a rotation about the centre and a pixel shift."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2 + 0.5 + shift[0], shape[0] / 2 + 0.5 + shift[1]]
    scale = 0.2 / 3600
    t = np.deg2rad(rotation_deg)
    w.wcs.cd = scale * np.array([[-np.cos(t), np.sin(t)], [np.sin(t), np.cos(t)]])
    return w


@pytest.fixture(scope="module")
def pair():
    return simulate_pair((256, 256), seed=11, n_stars=150, n_transients=6, flux_scale=FLUX_SCALE, sky_gradient=0.0)


def _plain(path, image, wcs=None):
    header = None if wcs is None else wcs.to_header()
    fits.PrimaryHDU(np.asarray(image, np.float32), header=header).writeto(path, overwrite=True)


def _sky(pair, d):
    """Empty sky: pixels where neither image's stars reach 0.5 % of the noise."""
    t = pair.truth
    s_src = t.noiseless_science - t.background_science
    t_src = t.noiseless_template - t.background_template
    quiet = (s_src < 0.005 * np.sqrt(np.asarray(pair.science.variance))) & (
        t_src < 0.005 * np.sqrt(np.asarray(pair.template.variance))
    )
    good = quiet & ((np.asarray(d.mask) & (NO_DATA | BAD | SAT | (1 << plane_bit(d.mask_planes, "EDGE")))) == 0)
    return good


def test_plain_fits_cli(pair, tmp_path, capsys):
    """Single-HDU FITS with no PSF, variance or mask: PSFs are measured, the difference's noise/√variance in
    empty sky is within 5 % of 1 and the injected transients are found."""
    _plain(tmp_path / "sci.fits", pair.science.image)
    _plain(tmp_path / "tmpl.fits", pair.template.image)
    out = tmp_path / "diff.fits"
    assert main(["subtract", str(tmp_path / "sci.fits"), str(tmp_path / "tmpl.fits"), "-o", str(out)]) == 0
    capsys.readouterr()
    d = jd.read_exposure(out)
    good = _sky(pair, d)
    assert good.sum() > 5000
    z = np.asarray(d.image)[good] / np.sqrt(np.asarray(d.variance)[good])
    assert np.std(z) == pytest.approx(1.0, abs=0.05)
    x, y, _ = _detections(d)
    t = pair.truth
    found = _match(t.transients_x, t.transients_y, x, y, 2.0) >= 0
    assert found.sum() >= len(found) - 1, (found, t.transients_flux)


def test_plain_fits_gain_read_noise_saturation(pair, tmp_path, capsys):
    """gain/read noise make the variance max(image, 0)/gain + (rn/gain)²; saturation → SAT; valid range →
    NO_DATA; a mask image → BAD; a FWHM replaces the PSF estimate."""
    sci = np.asarray(pair.science.image, np.float64)
    peak = float(np.max(sci))
    _plain(tmp_path / "sci.fits", sci)
    _plain(tmp_path / "tmpl.fits", pair.template.image)
    bad = np.zeros(sci.shape, np.int16)
    bad[10:14, 200:210] = 1
    fits.PrimaryHDU(bad).writeto(tmp_path / "bad.fits")
    out = tmp_path / "diff.fits"
    args = ["subtract", str(tmp_path / "sci.fits"), str(tmp_path / "tmpl.fits"), "-o", str(out)]
    args += ["--science-gain", "2.0", "--science-read-noise", "6.0", "--science-saturation", str(0.5 * peak)]
    args += ["--science-valid", "-100", str(0.9 * peak), "--science-mask", str(tmp_path / "bad.fits")]
    args += ["--template-gain", "1.0", "--template-read-noise", "5.0", "--template-psf", str(2.0 * 2.3548)]
    args += ["--no-decorrelate", "-v"]
    assert main(args) == 0
    text = capsys.readouterr().out
    d = jd.read_exposure(out)
    mask = np.asarray(d.mask)
    assert np.all(mask[sci >= 0.5 * peak] & SAT)
    assert np.all(mask[sci > 0.9 * peak] & NO_DATA)
    assert np.all(mask[10:14, 200:210] & BAD)
    # the options by themselves, through the Python API: the documented variance and masks
    e = jd.exposure_from_arrays(sci, gain=2.0, read_noise=6.0, saturation=0.5 * peak, psf=4.7)
    expected = np.maximum(sci, 0) / 2.0 + (6.0 / 2.0) ** 2
    np.testing.assert_allclose(np.asarray(e.variance), expected, rtol=1e-6)
    assert np.array_equal((np.asarray(e.mask) & SAT) != 0, sci >= 0.5 * peak)
    assert float(e.psf.fwhm()) == pytest.approx(4.7, rel=0.01)
    # the variance is right: the science variance factor stays near 1 (no DETECTED planes, Poisson noise with
    # gain 1 in the simulation: gain 2 halves the Poisson term, so the factor is not 1 there)
    assert "science_variance_factor" in text


def test_gain_gives_the_right_noise(pair):
    """The simulation's gain is 1 e⁻/count and read noise 5 counts: with those, the variance factor is 1."""
    sci = np.asarray(pair.science.image, np.float64)
    e = jd.exposure_from_arrays(sci, gain=1.0, read_noise=5.0, psf=2.4 * 2.3548)
    ratio = np.asarray(e.variance, np.float64) / np.asarray(pair.science.variance, np.float64)
    assert np.mean(ratio) == pytest.approx(1.0, abs=0.01)  # per pixel the image's own noise scatters it
    r = jd.AlardLuptonSubtract(mode="convolveTemplate").run(pair.template, e)
    assert r.metadata["science_variance_factor"] == pytest.approx(1.0, abs=0.03)


def test_psf_estimate(pair):
    for e, sigma in ((pair.science, 2.4), (pair.template, 2.0)):
        psf = jd.estimate_psf(np.asarray(e.image), np.asarray(e.variance))
        assert isinstance(psf, jd.ImagePsf)
        assert float(psf.sigma()) == pytest.approx(sigma, rel=0.03)


def test_psf_estimate_fails_clearly(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _plain(tmp_path / "noise.fits", rng.normal(100, 5, (128, 128)))
    _plain(tmp_path / "noise2.fits", rng.normal(100, 5, (128, 128)))
    rc = main(["subtract", str(tmp_path / "noise.fits"), str(tmp_path / "noise2.fits"), "-o", str(tmp_path / "d.fits")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "noise.fits" in err and "--science-psf" in err


def test_config_file(pair, tmp_path):
    from jaxdiff._inputs import config_from_file

    (tmp_path / "c.toml").write_text('mode = "convolveScience"\nal_sig_gauss = [0.8, 1.6, 3.2]\nsolver = "optax"\n')
    cfg = config_from_file(tmp_path / "c.toml")
    assert cfg.mode == "convolveScience" and cfg.al_sig_gauss == (0.8, 1.6, 3.2)
    assert isinstance(cfg.solver, jd.OptaxSolver)
    (tmp_path / "c.yaml").write_text("subtract:\n  kernel_size: 25\n  do_decorrelation: false\n")
    pytest.importorskip("yaml")
    cfg = config_from_file(tmp_path / "c.yaml")
    assert cfg.kernel_size == 25 and cfg.do_decorrelation is False
    (tmp_path / "bad.toml").write_text("kernel_sise = 25\n")
    with pytest.raises(ValueError, match="kernel_sise"):
        config_from_file(tmp_path / "bad.toml")


def test_config_file_cli(pair, tmp_path, capsys):
    _plain(tmp_path / "sci.fits", pair.science.image)
    _plain(tmp_path / "tmpl.fits", pair.template.image)
    (tmp_path / "c.toml").write_text('mode = "convolveTemplate"\ndo_decorrelation = false\n')
    args = ["subtract", str(tmp_path / "sci.fits"), str(tmp_path / "tmpl.fits"), "-o", str(tmp_path / "d.fits")]
    assert main([*args, "--config", str(tmp_path / "c.toml")]) == 0
    assert "convolveTemplate (not decorrelated)" in capsys.readouterr().out
    (tmp_path / "bad.toml").write_text("nonsense = 1\n")
    assert main([*args, "--config", str(tmp_path / "bad.toml")]) == 1
    assert "nonsense" in capsys.readouterr().err


def _template_on_rotated_grid(pair, rotation_deg, shift):
    """The template's sky rendered on a grid rotated and shifted against the science's (same stars and noise
    model), by resampling the simulated aligned template with reproject itself would be circular: instead the
    simulation's noiseless template is resampled (smooth, band-limited enough) and fresh noise added."""
    from reproject import reproject_interp

    shape = pair.template.shape
    w_s = _wcs(shape)
    w_t = _wcs(shape, rotation_deg, shift)
    noiseless = pair.truth.noiseless_template
    rendered, _ = reproject_interp((noiseless, w_s), w_t, shape_out=shape, order="bicubic")
    rendered = np.nan_to_num(rendered, nan=float(np.median(noiseless)))
    rng = np.random.default_rng(99)
    var = np.maximum(rendered, 0) + 25.0
    return rendered + rng.normal(0, np.sqrt(var)), w_s, w_t


def test_align_rotated_template(pair, tmp_path, capsys):
    """A template on a grid rotated by 7° and shifted by (3.4, −2.7) px gives the same difference (within
    noise) as the aligned template, through `--align`; without --align the WCS mismatch is an error."""
    rotated, w_s, w_t = _template_on_rotated_grid(pair, 7.0, (3.4, -2.7))
    _plain(tmp_path / "sci.fits", pair.science.image, w_s)
    _plain(tmp_path / "tmpl_aligned.fits", pair.template.image, w_s)
    _plain(tmp_path / "tmpl_rot.fits", rotated, w_t)
    common = ["--science-psf", str(2.4 * 2.3548), "--template-psf", str(2.0 * 2.3548), "--subtract-background"]
    sci = str(tmp_path / "sci.fits")
    assert main(["subtract", sci, str(tmp_path / "tmpl_aligned.fits"), "-o", str(tmp_path / "d0.fits"), *common]) == 0
    assert main(["subtract", sci, str(tmp_path / "tmpl_rot.fits"), "-o", str(tmp_path / "d1.fits"), *common]) == 1
    assert "WCS" in capsys.readouterr().err
    args = ["subtract", sci, str(tmp_path / "tmpl_rot.fits"), "-o", str(tmp_path / "d1.fits"), "--align", *common]
    assert main(args) == 0
    capsys.readouterr()
    d0, d1 = jd.read_exposure(tmp_path / "d0.fits"), jd.read_exposure(tmp_path / "d1.fits")
    ok = _sky(pair, d0) & ((np.asarray(d1.mask) & (NO_DATA | (1 << plane_bit(d1.mask_planes, "EDGE")))) == 0)
    assert ok.sum() > 5000
    z0 = np.asarray(d0.image)[ok] / np.sqrt(np.asarray(d0.variance)[ok])
    z1 = np.asarray(d1.image)[ok] / np.sqrt(np.asarray(d1.variance)[ok])
    assert np.std(z1) == pytest.approx(np.std(z0), rel=0.15)
    assert abs(np.mean(z0)) < 0.1 and abs(np.mean(z1)) < 0.1
    # the transients come out alike
    t = pair.truth
    for d in (d0, d1):
        x, y, _ = _detections(d)
        assert (_match(t.transients_x, t.transients_y, x, y, 2.0) >= 0).sum() >= len(t.transients_x) - 1
    # uncovered corners of the rotated template are NO_DATA
    assert np.any(np.asarray(d1.mask) & NO_DATA)


def test_align_needs_wcs(pair):
    with pytest.raises(ValueError, match="no WCS"):
        jd.align_template(pair.template, pair.science)
