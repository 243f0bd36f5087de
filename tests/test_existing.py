"""Subtraction with a given kernel (ip_diffim's SimplifiedSubtractTask, useExistingKernel)."""

import numpy as np
import pytest

import jaxdiff as jd


@pytest.fixture(scope="module")
def pair():
    return jd.sim.simulate_pair((160, 160), seed=4, n_stars=60, template_sigma=1.6, science_sigma=2.2)


@pytest.fixture(scope="module")
def full(pair):
    return jd.AlardLuptonSubtract().run(pair.template, pair.science, pair.sources)


def test_given_kernel_reproduces_the_full_fit(pair, full):
    task = jd.AlardLuptonSubtract()
    # the same sources as the fit, whose footprints the noise model keeps out of the variance estimates
    again = task.run_with_kernel(pair.template, pair.science, full.psf_matching_kernel, sources=pair.sources)
    np.testing.assert_allclose(
        np.asarray(again.difference.image), np.asarray(full.difference.image), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(np.asarray(again.difference.variance), np.asarray(full.difference.variance), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(again.difference.mask), np.asarray(full.difference.mask))
    md = again.metadata
    assert md["fit_region"] == "existing_kernel" and md["flux_scale"] == 1.0
    assert md["kernel_sum"] == pytest.approx(full.metadata["kernel_sum"], rel=1e-12)
    # the background is refitted on the whole image: the true sky difference (about 100 counts) to 1 count
    truth = pair.truth.background_science - md["kernel_sum"] * pair.truth.background_template
    bg_again = np.asarray(again.background_model.image(pair.science.shape, pair.science.xy0))
    assert np.median(np.abs(bg_again - truth)) < 1.0


def test_flux_scale_is_fitted(pair, full):
    """A kernel scaled by 0.8 is scaled back: s ≈ 1.25 and nearly the same difference. (The whole image prefers a
    kernel sum 0.8 % below the stamps' 1.001 for this pair, whose true flux scale is 1.)"""
    kernel = full.psf_matching_kernel
    scaled = jd.SpatialKernel(kernel.basis, 0.8 * kernel.coefficients, kernel.box, kernel.order, kernel.model)
    task = jd.AlardLuptonSubtract()
    fixed = task.run_with_kernel(pair.template, pair.science, scaled)
    refit = task.run_with_kernel(pair.template, pair.science, scaled, fit_flux_scale=True)
    assert fixed.metadata["flux_scale"] == 1.0
    assert refit.metadata["flux_scale"] == pytest.approx(1.25, rel=0.015)
    assert refit.metadata["kernel_sum"] == pytest.approx(1.0, rel=0.015)
    d_full, d_refit = np.asarray(full.difference.image), np.asarray(refit.difference.image)
    good = np.isfinite(d_full)
    scatter = np.std(d_full[good])
    assert np.std((d_refit - d_full)[good]) < 0.1 * scatter
    # without the scale the under-scaled kernel leaves the stars in the difference
    assert np.std((np.asarray(fixed.difference.image) - d_full)[good]) > 0.2 * scatter


def test_pure_function_matches_the_task(pair, full):
    res = jd.subtract_with_kernel(pair.template, pair.science, full.psf_matching_kernel, sources=pair.sources)
    np.testing.assert_allclose(np.asarray(res.difference.image), np.asarray(full.difference.image), atol=1e-4)
    assert int(res.metadata["status"]) == 0
