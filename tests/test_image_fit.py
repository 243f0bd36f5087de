"""The whole-overlap kernel fit for alert-sized cut-outs (fit_region="image")."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import convolve2d

import jaxdiff as jd
from jaxdiff import basis as _basis
from jaxdiff._image_fit import separable_valid, stamps_can_fit
from jaxdiff.batch import subtract_batch, unstack

CONFIG = jd.SubtractConfig(do_subtract_background=True, do_scale_variance=False, do_decorrelation=False)


def _figures(cutouts, result):
    """Per cut-out: std of difference/√variance away from the transient and off EDGE, and the PSF-weighted
    transient flux over the true one."""
    d = result.difference
    img, var, mask = np.asarray(d.image), np.asarray(d.variance), np.asarray(d.mask)
    n, ny, nx = img.shape
    edge = (mask & (1 << jd.MASK_PLANES["EDGE"])) != 0
    yy, xx = np.mgrid[:ny, :nx]
    c = (ny - 1) // 2
    far = np.hypot(xx - c, yy - c) > 8
    z = img / np.sqrt(var)
    stds = np.array([np.std(z[i][far & ~edge[i]]) for i in range(n)])
    psf = np.asarray(jax.vmap(lambda p: p.image())(d.psf))
    h = psf.shape[-1] // 2
    cut = img[:, c - h : c + h + 1, c - h : c + h + 1]
    flux = np.sum(psf * cut, axis=(1, 2)) / np.sum(psf**2, axis=(1, 2))
    return stds, flux / cutouts.transient_flux


def test_auto_fits_the_whole_cutout_when_no_stamp_fits():
    c = jd.sim.simulate_cutouts(1, seed=3)
    t, s = unstack(c.templates, 1)[0], unstack(c.sciences, 1)[0]
    assert not stamps_can_fit(s.shape, 21, CONFIG)
    with pytest.raises(jd.InsufficientKernelSourcesError) as info:
        jd.AlardLuptonSubtract(CONFIG, fit_region="stamps").run(t, s, None)
    assert info.value.n_sources == 0
    res = jd.AlardLuptonSubtract(CONFIG).run(t, s, None)
    md = res.metadata
    assert md["fit_region"] == "image" and md["status"] == 0
    assert md["n_stamps"] == 0 and md["n_fit_pixels"] > 1000
    assert np.all(np.isfinite(np.asarray(res.difference.image)))
    # the kernel is spatially constant: only the constant spatial term is non-zero
    coeffs = np.asarray(res.psf_matching_kernel.coefficients)
    assert np.all(coeffs[:, 1:] == 0) and np.any(coeffs[:, 0] != 0)
    # forced on a larger image, the image fit is used and reported there too
    pair = jd.sim.simulate_pair((128, 128), seed=1, n_stars=40)
    md = jd.AlardLuptonSubtract(fit_region="image").run(pair.template, pair.science, pair.sources).metadata
    assert md["fit_region"] == "image" and md["kernel_sum"] == pytest.approx(1.0, abs=0.02)


def test_separable_valid_is_valid_mode_convolution(rng):
    fx, fy, mix = _basis.alard_lupton_factors(9, jnp.array([1.0, 2.0]), (2, 1), orthonormalize=False)
    groups = _basis.x_factor_groups((2, 1))
    image = rng.normal(size=(30, 25))
    planes, order = separable_valid(jnp.asarray(image), fx, fy, groups, (np.ones((22, 17)),))
    assert planes.shape == (fx.shape[0] + 1, 22, 17)
    for i, r in enumerate(order):
        kernel = np.outer(np.asarray(fy[r]), np.asarray(fx[r]))
        np.testing.assert_allclose(np.asarray(planes[i]), convolve2d(image, kernel, mode="valid"), atol=1e-12)
    np.testing.assert_array_equal(np.asarray(planes[-1]), 1.0)


@pytest.mark.slow
def test_image_fit_jit_vmap_grad():
    """vmap equals a loop; the difference is differentiable in the science pixels (finite differences)."""
    c = jd.sim.simulate_cutouts(3, seed=5)
    batch = subtract_batch(c.templates, c.sciences, c.sources, CONFIG)
    for i, (t, s, src) in enumerate(zip(*(unstack(x, 3) for x in (c.templates, c.sciences, c.sources)), strict=True)):
        one = jd.subtract(t, s, src, CONFIG)
        np.testing.assert_allclose(
            np.asarray(one.difference.image), np.asarray(batch.difference.image[i]), rtol=1e-5, atol=1e-3
        )
    t, s, src = (unstack(x, 3)[0] for x in (c.templates, c.sciences, c.sources))
    s64 = jd.Exposure(np.asarray(s.image, np.float64), np.asarray(s.variance, np.float64), s.mask, s.psf)
    t64 = jd.Exposure(np.asarray(t.image, np.float64), np.asarray(t.variance, np.float64), t.mask, t.psf)
    weight = jnp.asarray(np.random.default_rng(0).normal(size=s.shape))

    def loss(image):
        e = eqx.tree_at(lambda x: x.image, s64, image)
        return jnp.sum(weight * jnp.nan_to_num(jd.subtract(t64, e, src, CONFIG).difference.image))

    grad = eqx.filter_grad(loss)(s64.image)
    assert np.all(np.isfinite(np.asarray(grad)))
    direction = jnp.asarray(np.random.default_rng(1).normal(size=s.shape))
    eps = 1e-3
    fd = (loss(s64.image + eps * direction) - loss(s64.image - eps * direction)) / (2 * eps)
    assert float(jnp.sum(grad * direction)) == pytest.approx(float(fd), rel=1e-4)


def _check_cutouts(n: int, seed: int):
    c = jd.sim.simulate_cutouts(n, seed=seed)
    result = subtract_batch(c.templates, c.sciences, c.sources, CONFIG)
    assert np.all(np.asarray(result.metadata["status"]) == 0)
    stds, ratio = _figures(c, result)
    # noise / √variance away from the transient: within 10 % of 1
    assert np.median(stds) == pytest.approx(1.0, abs=0.1)
    assert np.mean(np.abs(stds - 1) < 0.1) >= 0.9
    # transient flux: unbiased to 2 % over the batch, and within 5 % for 85 % of the cut-outs (the rest are
    # faint scenes that pin the kernel poorly, or a bright star beside the transient)
    assert np.median(ratio) == pytest.approx(1.0, abs=0.02)
    assert np.mean(np.abs(ratio - 1) < 0.05) >= 0.85
    return stds, ratio


def test_cutouts_batched():
    _check_cutouts(50, seed=2)


@pytest.mark.slow
def test_thousand_cutouts_in_one_batched_call():
    """1000 simulated 63² alert pairs with a transient, in one vmapped call."""
    stds, ratio = _check_cutouts(1000, seed=1)
    assert len(stds) == 1000
