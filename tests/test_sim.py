"""Tests of the simulated pairs (`jaxdiff.sim`)."""

import math

import numpy as np
import pytest

from jaxdiff import GaussianPsf, GridPsf, ImagePsf
from jaxdiff._mask import plane_bit
from jaxdiff._psf import FWHM_PER_SIGMA, gaussian_image
from jaxdiff.sim import reference_pair, simulate_pair
from tests.utils import assert_allclose


def _bit(exposure, name):
    return 1 << plane_bit(exposure.mask_planes, name)


def _local(exposure, x, y):
    """Array (row, col) of the pixel nearest parent (x, y)."""
    x0, y0 = np.asarray(exposure.xy0)
    return int(np.floor(y + 0.5)) - int(y0), int(np.floor(x + 0.5)) - int(x0)


def _isolated_brightest(truth, min_separation):
    x, y, f = truth.stars_x, truth.stars_y, truth.stars_flux
    # Chebyshev distance: square stamps of side < min_separation do not overlap
    d = np.maximum(abs(x[:, None] - x[None, :]), abs(y[:, None] - y[None, :])) + np.eye(len(x)) * 1e9
    isolated = np.flatnonzero(d.min(axis=1) > min_separation)
    return isolated[np.argmax(f[isolated])]


def test_same_seed_gives_identical_arrays_and_new_seed_differs():
    kw = dict(shape=(96, 128), n_stars=30, n_transients=2, sigma_variation=0.1, template_border=5)
    a, b, c = simulate_pair(seed=3, **kw), simulate_pair(seed=3, **kw), simulate_pair(seed=4, **kw)
    for name in ("template", "science"):
        for plane in ("image", "variance", "mask"):
            pa, pb, pc = (np.asarray(getattr(getattr(p, name), plane)) for p in (a, b, c))
            np.testing.assert_array_equal(pa, pb)
            if plane != "mask":
                assert not np.array_equal(pa, pc)
    np.testing.assert_array_equal(np.asarray(a.sources.x), np.asarray(b.sources.x))
    np.testing.assert_array_equal(np.asarray(a.template.psf.images), np.asarray(b.template.psf.images))
    np.testing.assert_array_equal(a.truth.transients_x, b.truth.transients_x)
    assert not np.array_equal(a.truth.stars_x, c.truth.stars_x)
    r1, r2 = reference_pair((64, 64), n_stars=5, seed=1), reference_pair((64, 64), n_stars=5, seed=1)
    np.testing.assert_array_equal(np.asarray(r1.science.image), np.asarray(r2.science.image))


@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_noise_matches_variance_plane(gain):
    pair = simulate_pair((256, 256), n_stars=80, gain=gain, read_noise=7.0, sky_gradient=0.3, seed=2)
    for image, noiseless in (
        (pair.science, pair.truth.noiseless_science),
        (pair.template, pair.truth.noiseless_template),
    ):
        var = np.asarray(image.variance, np.float64)
        assert_allclose(var, noiseless / gain + 49.0, rtol=1e-6)
        r = (np.asarray(image.image, np.float64) - noiseless) / np.sqrt(var)
        assert abs(r.std() - 1) < 0.02
        assert abs(r.mean()) < 0.02


def test_sky_is_a_plane_with_the_requested_gradient():
    pair = simulate_pair((128, 160), n_stars=0, sky_science=300.0, sky_gradient=0.2, xy0=(40, 70))
    sky = pair.truth.background_science
    assert_allclose(sky.mean(), 300.0, rtol=1e-9)
    # the far corners reach ±gradient up to the half-pixel between the last centre and the edge
    assert_allclose(sky[-1, -1] / 300.0 - 1, 0.2 * (1 - 0.5 / 128 - 0.5 / 160), rtol=1e-9)
    assert_allclose(sky[0, 0] / 300.0 - 1, -0.2 * (1 - 0.5 / 128 - 0.5 / 160), rtol=1e-9)
    assert_allclose(np.diff(sky, 2, axis=1), 0.0, atol=1e-9)


def test_star_fluxes_follow_the_power_law_and_range():
    pair = simulate_pair((512, 512), n_stars=4000, flux_range=(100.0, 1e5), flux_slope=-2.0, seed=5)
    f = pair.truth.stars_flux
    assert f.min() >= 100.0 and f.max() <= 1e5
    # dN/dF ∝ F^-2 on [a, b]: P(F < 2a) = (1/a − 1/2a)/(1/a − 1/b)
    expected = 0.5 / (1 - 100.0 / 1e5)
    assert abs(np.mean(f < 200.0) - expected) < 0.03
    x, y = pair.truth.stars_x, pair.truth.stars_y
    assert x.min() >= 20 and x.max() <= 511 - 20 and y.min() >= 20 and y.max() <= 511 - 20


@pytest.mark.parametrize("flux_scale, shift", [(1.0, (0.0, 0.0)), (1.7, (0.3, -0.4))])
def test_isolated_star_science_flux_is_flux_scale_times_template_flux(flux_scale, shift):
    pair = simulate_pair(
        (256, 256),
        n_stars=25,
        flux_range=(2e4, 2e5),
        flux_scale=flux_scale,
        shift=shift,
        seed=7,
        read_noise=3.0,
    )
    truth = pair.truth
    i = _isolated_brightest(truth, 25)
    x, y, f = truth.stars_x[i], truth.stars_y[i], truth.stars_flux[i]
    h = truth.psf_science.size // 2

    def aperture(exposure, background, xc, yc):
        r, c = _local(exposure, xc, yc)
        box = (slice(r - h, r + h + 1), slice(c - h, c + h + 1))
        return float(np.sum(np.asarray(exposure.image, np.float64)[box] - background[box]))

    science = aperture(pair.science, truth.background_science, x + shift[0], y + shift[1])
    template = aperture(pair.template, truth.background_template, x, y)
    noise = math.sqrt((2 * h + 1) ** 2 * 300.0 + flux_scale * f)
    assert abs(science - flux_scale * f) < 5 * noise
    assert abs(template - f) < 5 * noise
    assert abs(science / template - flux_scale) < 0.03 * flux_scale
    np.testing.assert_allclose(np.asarray(pair.sources.x), truth.stars_x + shift[0])
    np.testing.assert_allclose(np.asarray(pair.sources.flux), truth.stars_flux)


def test_stars_are_rendered_with_the_returned_gaussian_psf():
    pair = simulate_pair((128, 128), n_stars=1, sky_template=0.0, sky_science=0.0, shift=(0.25, -0.35), seed=1)
    truth = pair.truth
    assert isinstance(pair.science.psf, GaussianPsf) and pair.science.psf.size == 21
    x, y, f = truth.stars_x[0] + 0.25, truth.stars_y[0] - 0.35, truth.stars_flux[0]
    r, c = _local(pair.science, x, y)
    stamp = truth.noiseless_science[r - 10 : r + 11, c - 10 : c + 11]
    expected = f * np.asarray(gaussian_image(2.4, 2.4, 21, x - np.floor(x + 0.5), y - np.floor(y + 0.5)))
    assert_allclose(stamp, expected, rtol=1e-9, atol=1e-9 * f)
    assert_allclose(truth.noiseless_science.sum(), f, rtol=1e-12)


def test_transients_only_in_science_at_truth_positions():
    kw = dict(shape=(200, 200), n_stars=40, seed=11, template_border=6)
    plain, with_transients = simulate_pair(**kw), simulate_pair(n_transients=4, **kw)
    truth = with_transients.truth
    assert len(truth.transients_x) == 4 and len(plain.truth.transients_x) == 0
    np.testing.assert_array_equal(truth.noiseless_template, plain.truth.noiseless_template)
    np.testing.assert_array_equal(np.asarray(with_transients.template.image), np.asarray(plain.template.image))
    added = truth.noiseless_science - plain.truth.noiseless_science
    assert_allclose(added.sum(), truth.transients_flux.sum(), rtol=1e-9)
    for x, y, f in zip(truth.transients_x, truth.transients_y, truth.transients_flux, strict=True):
        r, c = _local(with_transients.science, x, y)
        h = truth.psf_science.size // 2
        assert added[r - h : r + h + 1, c - h : c + h + 1].sum() >= f * (1 - 1e-9)
        assert np.argmax(added[r - 3 : r + 4, c - 3 : c + 4]) == 3 * 7 + 3
    assert len(with_transients.sources) == 40


def test_no_data_regions_are_flagged_and_zeroed_in_the_template():
    border = 8
    pair = simulate_pair((120, 150), n_stars=20, template_border=border, no_data_regions=((10, 20, 40, 35),))
    mask = np.asarray(pair.template.mask)
    flagged = (mask & _bit(pair.template, "NO_DATA")) != 0
    expected = np.zeros(mask.shape, bool)
    expected[20 + border : 35 + border, 10 + border : 40 + border] = True
    np.testing.assert_array_equal(flagged, expected)
    assert np.all(np.asarray(pair.template.image)[expected] == 0)
    assert np.all(np.asarray(pair.template.image)[~expected] != 0)
    assert not np.any(np.asarray(pair.science.mask) & _bit(pair.science, "NO_DATA"))


def test_detected_covers_the_stars():
    pair = simulate_pair((128, 128), n_stars=10, flux_range=(1e4, 1e5), seed=4)
    detected = (np.asarray(pair.science.mask) & _bit(pair.science, "DETECTED")) != 0
    for x, y in zip(np.asarray(pair.sources.x), np.asarray(pair.sources.y), strict=True):
        assert detected[_local(pair.science, x, y)]
    assert detected.mean() < 0.5


def test_template_border_geometry():
    pair = simulate_pair((100, 140), n_stars=15, template_border=12, xy0=(1000, 2000), seed=6)
    assert pair.science.shape == (100, 140) and pair.template.shape == (124, 164)
    np.testing.assert_array_equal(np.asarray(pair.science.xy0), [1000, 2000])
    np.testing.assert_array_equal(np.asarray(pair.template.xy0), [988, 1988])
    # the same star sits at the same parent pixel in both images
    truth = pair.truth
    i = _isolated_brightest(truth, 15)
    for exposure, noiseless, bg in (
        (pair.science, truth.noiseless_science, truth.background_science),
        (pair.template, truth.noiseless_template, truth.background_template),
    ):
        r, c = _local(exposure, truth.stars_x[i], truth.stars_y[i])
        window = (noiseless - bg)[r - 2 : r + 3, c - 2 : c + 3]
        assert np.argmax(window) == 12
    # the template's border has sky too
    assert np.all(truth.noiseless_template[:12] > 0)


@pytest.mark.parametrize("variation", [0.1, 0.2])
def test_varying_psf_width_changes_by_the_requested_fraction(variation):
    pair = simulate_pair((256, 256), n_stars=5, sigma_variation=variation, xy0=(50, 60), seed=3)
    psf = pair.science.psf
    assert isinstance(psf, GridPsf) and psf.images.shape[:2] == (5, 5)
    x0, y0, x1, y1 = pair.science.bbox
    centre = float(psf.sigma(0.5 * (x0 + x1), 0.5 * (y0 + y1)))
    low, high = float(psf.sigma(x0, y0)), float(psf.sigma(x1, y1))
    assert abs(centre / 2.4 - 1) < 0.02
    assert abs(high / centre - (1 + variation)) < 0.03 * (1 + variation)
    assert abs(low / centre - (1 - variation)) < 0.03 * (1 - variation)
    assert abs((high - low) / centre - 2 * variation) < 0.03
    tpsf = pair.template.psf
    tx0, ty0, tx1, ty1 = pair.template.bbox
    assert abs(float(tpsf.sigma(tx1, ty1)) / float(tpsf.sigma(tx0, ty0)) - (1 + variation) / (1 - variation)) < 0.03


def test_varying_psf_stars_have_the_grid_psf_width():
    pair = simulate_pair((256, 256), n_stars=12, sigma_variation=0.2, flux_range=(1e4, 2e4), sky_template=0, seed=8)
    truth = pair.truth
    psf = pair.template.psf
    i = _isolated_brightest(truth, 30)
    x, y = truth.stars_x[i], truth.stars_y[i]
    r, c = _local(pair.template, x, y)
    h = psf.size // 2
    stamp = truth.noiseless_template[r - h : r + h + 1, c - h : c + h + 1]
    # moments of the rendered star (about its centroid) against the PSF model there
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1].astype(float)
    w = stamp / stamp.sum()
    mx, my = (w * xx).sum(), (w * yy).sum()
    sigma_star = math.sqrt(0.5 * (w * ((xx - mx) ** 2 + (yy - my) ** 2)).sum())
    img = np.asarray(psf.image(x, y), np.float64)
    sigma_psf = math.sqrt(0.5 * (img * (xx**2 + yy**2)).sum())
    assert abs(sigma_star / sigma_psf - 1) < 0.02


def test_ellipticity_variation_makes_elliptical_psfs():
    pair = simulate_pair((128, 128), n_stars=2, ellipticity_variation=0.3)
    psf = pair.science.psf
    x0, y0, x1, y1 = pair.science.bbox
    sx, sy = (float(v) for v in psf.sigma_xy(x1, y0))  # e1 > 0 at large x: wider along x
    assert sx > 1.1 * sy
    cx, cy = (float(v) for v in psf.sigma_xy(0.5 * (x0 + x1), 0.5 * (y0 + y1)))
    assert abs(cx / cy - 1) < 0.01


def test_moffat_fwhm_equals_the_requested_one():
    sigma = 6.0 / FWHM_PER_SIGMA  # half maximum exactly 3 px from the centre
    pair = simulate_pair((128, 128), n_stars=3, psf_model="moffat", science_sigma=sigma, moffat_beta=2.5)
    psf = pair.science.psf
    assert isinstance(psf, ImagePsf)
    img = np.asarray(psf.image(), np.float64)
    h = psf.size // 2
    assert abs(img[h, h + 3] / img[h, h] - 0.5) < 0.01
    assert abs(img[h - 3, h] / img[h, h] - 0.5) < 0.01
    # wider wings than a Gaussian of the same FWHM
    gauss = np.asarray(gaussian_image(sigma, sigma, psf.size))
    assert img[h, h + 8] / img[h, h] > 5 * gauss[h, h + 8] / gauss[h, h]


def test_moffat_half_maximum_radius_for_any_width():
    pair = simulate_pair((128, 128), n_stars=1, psf_model="moffat", science_sigma=2.4, psf_size=41)
    img = np.asarray(pair.science.psf.image(), np.float64)
    h = 20
    row = img[h, h:] / img[h, h]
    # log-linear interpolation of the half-maximum crossing between whole pixels
    k = int(np.argmax(row < 0.5))
    t = math.log(row[k - 1] / 0.5) / math.log(row[k - 1] / row[k])
    fwhm = 2 * (k - 1 + t)
    assert abs(fwhm / (FWHM_PER_SIGMA * 2.4) - 1) < 0.02


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="psf_model"):
        simulate_pair((64, 64), psf_model="airy")
    with pytest.raises(ValueError, match="sigma_variation"):
        simulate_pair((64, 64), sigma_variation=1.5)
    with pytest.raises(ValueError, match="sky_gradient"):
        simulate_pair((64, 64), sky_gradient=1.0)


@pytest.mark.parametrize("border", [0, 20])
def test_reference_pair_geometry_and_variance(border):
    n = 0.7
    pair = reference_pair(template_border=border, science_noise=n, template_noise=2 * n, seed=4, noise_seed=9)
    sci, tpl, truth = pair.science, pair.template, pair.truth
    assert sci.shape == (256, 256) and tpl.shape == (256 + 2 * border, 256 + 2 * border)
    np.testing.assert_array_equal(np.asarray(sci.xy0), [12345, 67890])
    np.testing.assert_array_equal(np.asarray(tpl.xy0), [12345 - border, 67890 - border])
    assert sci.image.dtype == np.float64
    x, y, f = truth.stars_x, truth.stars_y, truth.stars_flux
    assert len(x) == 20 and np.all((f >= 500) & (f < 1000))
    assert np.all((x >= 12345 + 16) & (x < 12345 + 256 - 16) & (y >= 67890 + 16) & (y < 67890 + 256 - 16))
    for exposure, noiseless, noise, sigma in (
        (sci, truth.noiseless_science, n, 2.4),
        (tpl, truth.noiseless_template, 2 * n, 2.0),
    ):
        assert isinstance(exposure.psf, GaussianPsf) and exposure.psf.size == 31
        assert_allclose(exposure.psf.width, sigma)
        assert_allclose(exposure.variance, np.sqrt(np.abs(noiseless)) + noise**2)
        resid = np.asarray(exposure.image) - noiseless
        assert abs(resid.mean()) < 1e-12
        assert abs(resid.std() / noise - 1) < 0.02
        assert_allclose(noiseless.sum(), f.sum(), rtol=1e-12)
        detected = (np.asarray(exposure.mask) & _bit(exposure, "DETECTED")) != 0
        np.testing.assert_array_equal(detected, noiseless > 5 * noise)
        i = _isolated_brightest(truth, 31)
        r, c = _local(exposure, x[i], y[i])
        stamp = noiseless[r - 15 : r + 16, c - 15 : c + 16]
        dx, dy = x[i] - np.floor(x[i] + 0.5), y[i] - np.floor(y[i] + 0.5)
        assert_allclose(stamp, f[i] * np.asarray(gaussian_image(sigma, sigma, 31, dx, dy)), atol=1e-9)
    np.testing.assert_allclose(np.asarray(pair.sources.x), x)
    np.testing.assert_allclose(np.asarray(pair.sources.flux), f)


def test_reference_pair_stars_do_not_depend_on_the_border_and_noise_on_its_seed():
    a = reference_pair(seed=2, noise_seed=5)
    b = reference_pair(seed=2, noise_seed=5, template_border=20)
    c = reference_pair(seed=2, noise_seed=6)
    np.testing.assert_array_equal(a.truth.stars_x, b.truth.stars_x)
    np.testing.assert_array_equal(a.truth.noiseless_science, c.truth.noiseless_science)
    assert_allclose(a.truth.noiseless_template, b.truth.noiseless_template[20:-20, 20:-20])
    assert not np.array_equal(np.asarray(a.science.image), np.asarray(c.science.image))
    # the two images carry independent noise
    ra = np.asarray(a.science.image) - a.truth.noiseless_science
    rt = np.asarray(a.template.image) - a.truth.noiseless_template
    assert abs(np.corrcoef(ra.ravel(), rt.ravel())[0, 1]) < 0.02


@pytest.mark.parametrize("sigma, width", [(2.0, 7), (2.4, 8), (2.8, 10)])
def test_reference_pair_edge_border(sigma, width):
    pair = reference_pair(
        (64, 80), n_stars=2, science_sigma=sigma, template_sigma=sigma, add_edge=True, add_detected=False
    )
    for exposure in (pair.science, pair.template):
        edge = (np.asarray(exposure.mask) & _bit(exposure, "EDGE")) != 0
        expected = np.ones(exposure.shape, bool)
        expected[width:-width, width:-width] = False
        np.testing.assert_array_equal(edge, expected)
        assert not np.any(np.asarray(exposure.mask) & _bit(exposure, "DETECTED"))


def test_reference_pair_background_is_the_chebyshev_polynomial():
    coeffs = (2.2, 2.1, 2.0, 1.2, 1.1, 1.0)
    plain = reference_pair((48, 64), xy0=(123, 456), n_stars=3)
    pair = reference_pair((48, 64), xy0=(123, 456), n_stars=3, background=coeffs)
    bg = np.asarray(pair.science.image) - np.asarray(plain.science.image)
    assert_allclose(bg, pair.truth.background_science, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(pair.template.image), np.asarray(plain.template.image))
    np.testing.assert_array_equal(np.asarray(pair.science.variance), np.asarray(plain.science.variance))
    # explicit Chebyshev T0..T2 on x' = 2(x − x_c)/W, y' = 2(y − y_c)/H
    xs = 2 * (np.arange(64) + 123 - (123 + 31.5)) / 64
    ys = 2 * (np.arange(48) + 456 - (456 + 23.5)) / 48
    xn, yn = np.meshgrid(xs, ys)
    expected = 2.2 + 2.1 * xn + 2.0 * yn + 1.2 * (2 * xn**2 - 1) + 1.1 * xn * yn + 1.0 * (2 * yn**2 - 1)
    assert_allclose(pair.truth.background_science, expected, atol=1e-12)
