"""Forward model: a transient's flux and position from the difference image, with Cramér–Rao errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff import forward

SIZE = 21
ROW, COL = 64, 66  # array pixel nearest the transient
TRUE = (2500.0, 12345 + COL + 0.3, 67890 + ROW - 0.3)  # flux, x, y (parent pixels)  # flux, x, y (parent pixels)


def test_shifted_psf_moves_the_centroid_and_keeps_the_sum():
    psf = jd.GaussianPsf(2.0, 31).image()
    img = forward.shifted_psf(psf, 0.3, -0.45, SIZE)
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE // 2
    total = float(jnp.sum(img))
    np.testing.assert_allclose(total, float(jnp.sum(psf)), rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(img * xx)) / total, 0.3, atol=1e-4)
    np.testing.assert_allclose(float(jnp.sum(img * yy)) / total, -0.45, atol=1e-4)


@pytest.fixture(scope="module")
def subtraction():
    """One subtraction of a pair whose science has a transient at TRUE (flux in science counts)."""
    pair = jd.sim.reference_pair((128, 128), n_stars=30, seed=2, flux_range=(3000, 8000), template_border=8)
    sci = pair.science
    x0, y0 = sci.xy0
    flux, x, y = TRUE
    stamp = forward.shifted_psf(sci.psf.image(), x - (x0 + COL), y - (y0 + ROW), SIZE)
    image = sci.image.at[ROW - 10 : ROW + 11, COL - 10 : COL + 11].add(flux * stamp)
    science = jd.Exposure(image, sci.variance, sci.mask, sci.psf, sci.xy0, sci.photo_calib, mask_planes=sci.mask_planes)
    result = jd.subtract(pair.template, science, pair.sources, jd.SubtractConfig())
    assert int(result.metadata["status"]) == int(jd.RESULTS.successful)
    return result


def _fit(stamp, psf_image, init):
    return forward.fit_point_source(stamp, psf_image, init)


def test_fit_recovers_the_injected_transient(subtraction):
    d = subtraction.difference
    x0, y0 = 12345.0 + COL, 67890.0 + ROW
    stamp = forward.cut_stamp(d, x0, y0, SIZE)
    psf_image = d.psf.image()
    fit = jax.jit(_fit)(stamp, psf_image, jnp.array([2000.0, x0, y0]))
    pulls = (np.asarray(fit.params) - np.asarray(TRUE)) / np.asarray(fit.errors)
    assert np.all(np.abs(pulls) < 4), pulls
    assert float(fit.errors[1]) < 0.1  # a bright transient is located to a tenth of a pixel


@pytest.mark.slow  # 400 vmapped L-BFGS fits: several minutes on 2 CPU cores
def test_pulls_over_noise_realisations_are_standard_normal(subtraction):
    """400 noise draws on the transient's stamp (kernel, PSF and variance fixed by the subtraction)."""
    d = subtraction.difference
    base = forward.cut_stamp(d, TRUE[1], TRUE[2], SIZE)
    psf_image = d.psf.image()
    truth = jnp.asarray(TRUE)
    clean = forward.model(truth, base, psf_image)
    n = 400
    noise = jax.random.normal(jax.random.key(0), (n, SIZE, SIZE), clean.dtype) * jnp.sqrt(base.variance)
    stamps = jax.vmap(lambda e: forward.Stamp(clean + e, base.variance, base.template, base.good, base.x0, base.y0))(
        noise
    )
    init = jnp.broadcast_to(jnp.array([0.8 * TRUE[0], TRUE[1] + 0.4, TRUE[2] - 0.4]), (n, 3))
    fits = jax.jit(jax.vmap(_fit, in_axes=(0, None, 0)))(stamps, psf_image, init)
    pulls = (np.asarray(fits.params) - np.asarray(TRUE)) / np.asarray(fits.errors)
    assert np.all(np.isfinite(pulls))
    mean, std = pulls.mean(axis=0), pulls.std(axis=0, ddof=1)
    assert np.all(np.abs(mean) < 0.2), mean
    assert np.all(np.abs(std - 1) < 0.2), std
    chi2 = np.asarray(fits.chi2)
    dof = SIZE * SIZE - 3
    assert abs(chi2.mean() / dof - 1) < 0.05
