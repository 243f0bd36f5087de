"""PSF models: images, adaptive-moment widths, pytree behaviour and validation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from jaxdiff._psf import FWHM_PER_SIGMA, adaptive_moments, gaussian_image, host_sigma_xy
from tests.utils import assert_allclose


def _grid_psf() -> jd.GridPsf:
    nodes = [[gaussian_image(s + 0.3 * j, s, 11) for j in range(3)] for s in (1.2, 1.8)]
    return jd.GridPsf(jnp.asarray(nodes), (0.0, 0.0, 100.0, 50.0))


@pytest.mark.parametrize(
    "psf",
    [jd.GaussianPsf(1.4, 9), jd.ImagePsf(gaussian_image(1.1, 1.5, 9)), _grid_psf()],
    ids=lambda p: type(p).__name__,
)
def test_pytree_round_trip(psf):
    leaves, treedef = jax.tree_util.tree_flatten(psf)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(back) is type(psf) and back.size == psf.size
    np.testing.assert_array_equal(back.image(), psf.image())


@pytest.mark.parametrize("size", [21, 23, 25])
@pytest.mark.parametrize("sigma", [1.0, 1.23456, 2.1])
def test_gaussian_width_from_adaptive_moments(sigma, size):
    psf = jd.GaussianPsf(sigma, size)
    image = psf.image()
    assert image.shape == (size, size)
    assert_allclose(jnp.sum(image), 1.0)
    h = (size - 1) // 2
    assert int(jnp.argmax(image)) == h * size + h
    assert_allclose(psf.fwhm(), FWHM_PER_SIGMA * sigma)

    measured = jd.ImagePsf(image)
    sx, sy = measured.sigma_xy()
    for s in (sx, sy):
        assert abs(float(FWHM_PER_SIGMA * s) / (2.3548 * sigma) - 1) < 0.01
    assert abs(float(measured.sigma()) / sigma - 1) < 0.01
    assert abs(float(measured.fwhm()) / (2.3548 * sigma) - 1) < 0.01


def test_adaptive_moments_resolve_each_axis():
    ixx, iyy = adaptive_moments(gaussian_image(1.3, 2.4, 25))
    assert_allclose(jnp.sqrt(ixx), 1.3, rtol=1e-3)
    assert_allclose(jnp.sqrt(iyy), 2.4, rtol=1e-3)


def test_adaptive_moments_ignore_offset_centre():
    ixx, iyy = adaptive_moments(gaussian_image(1.7, 1.7, 25, dx=0.4, dy=-0.3))
    assert_allclose(jnp.sqrt(ixx), 1.7, rtol=1e-3)
    assert_allclose(jnp.sqrt(iyy), 1.7, rtol=1e-3)


def test_adaptive_moments_of_empty_image_are_nan():
    ixx, iyy = adaptive_moments(jnp.zeros((9, 9)))
    assert np.isnan(ixx) and np.isnan(iyy)


def test_host_moments_equal_the_traced_ones():
    """The host path (numpy, used by the plan and the quality figures so that they compile nothing) gives the
    traced moments, for one image, a batch with an empty image in it, and each PSF model."""
    images = np.stack([gaussian_image(1.3, 2.4, 25, dx=0.3), gaussian_image(3.1, 2.2, 25), np.zeros((25, 25))])
    host = np.stack(adaptive_moments(images.astype(np.float64), xp=np), axis=-1)
    traced = np.stack(jax.vmap(adaptive_moments)(jnp.asarray(images)), axis=-1)
    assert np.isnan(host[2]).all() and np.isnan(traced[2]).all()
    assert_allclose(host[:2], traced[:2], rtol=1e-5)  # float64 on the host, float32 traced
    for psf in (jd.GaussianPsf(1.4, 15), jd.ImagePsf(gaussian_image(1.1, 1.5, 15)), _grid_psf()):
        assert_allclose(host_sigma_xy(psf), np.asarray(jnp.stack(psf.sigma_xy())), rtol=1e-5)
    grid = _grid_psf()
    for xy in ((10.0, 40.0), (None, None)):  # the grid's host interpolation is the traced one
        host = grid._interpolate(*xy, np)
        assert isinstance(host, np.ndarray) and host.dtype == grid.images.dtype
        assert_allclose(host, jax.jit(lambda p, xy=xy: p.image(*xy))(grid), rtol=1e-6)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), jd.GaussianPsf(1.2, 9), jd.GaussianPsf(2.0, 9))
    assert_allclose(host_sigma_xy(stacked, batched=True), [[1.2, 1.2], [2.0, 2.0]], rtol=1e-6)


def test_gaussian_psf_jit_vmap_and_grad():
    widths = jnp.array([1.1, 1.9, 2.6])

    def centre(width):
        return jd.GaussianPsf(width, 15).image()[7, 7]

    loop = jnp.stack([centre(w) for w in widths])
    assert_allclose(jax.jit(jax.vmap(centre))(widths), loop)

    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[jd.GaussianPsf(w, 15) for w in widths])
    assert_allclose(jax.vmap(lambda p: p.image()[7, 7])(stacked), loop)

    psf = jd.GaussianPsf(1.6, 15)
    grad = eqx.filter_grad(lambda p: p.image()[7, 7])(psf)
    h = 1e-6
    fd = (centre(1.6 + h) - centre(1.6 - h)) / (2 * h)
    assert_allclose(grad.width, fd, rtol=1e-6)
    assert_allclose(eqx.filter_grad(lambda p: p.sigma())(psf).width, 1.0)


def test_grid_psf_interpolates_between_nodes():
    psf = _grid_psf()
    nodes = psf.images
    assert_allclose(psf.image(0.0, 0.0), nodes[0, 0])
    assert_allclose(psf.image(100.0, 50.0), nodes[1, 2])
    assert_allclose(psf.image(50.0, 0.0), nodes[0, 1])
    mid = psf.image(25.0, 25.0)
    expected = 0.25 * (nodes[0, 0] + nodes[0, 1] + nodes[1, 0] + nodes[1, 1])
    assert_allclose(mid, expected / jnp.sum(expected))
    assert_allclose(jnp.sum(psf.image(73.0, 11.0)), 1.0)
    # outside the node box the nearest edge is used
    assert_allclose(psf.image(-40.0, 80.0), nodes[1, 0])


def test_grid_psf_sigma_varies_with_position():
    psf = _grid_psf()
    assert float(psf.sigma(0.0, 0.0)) < float(psf.sigma(100.0, 50.0))
    assert_allclose(psf.sigma(0.0, 0.0), 1.2, rtol=1e-3)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.full((4, 4), 1 / 16), "odd"),
        (np.full((3, 5), 1 / 15), "square and odd"),
        (np.full(5, 0.2), "2-D"),
        (2 * np.asarray(gaussian_image(1.0, 1.0, 7)), "sum 1"),
        (np.where(np.eye(5) > 0, np.nan, 0.05), "non-finite"),
    ],
)
def test_image_psf_validation(array, match):
    with pytest.raises(ValueError, match=f"PSF image.*{match}"):
        jd.ImagePsf(array)


@pytest.mark.parametrize("sigma, size, match", [(1.0, 8, "odd"), (1.0, 1, "odd"), (0.0, 7, "positive")])
def test_gaussian_psf_validation(sigma, size, match):
    with pytest.raises(ValueError, match=f"GaussianPsf.*{match}"):
        jd.GaussianPsf(sigma, size)


def test_gaussian_psf_default_size_covers_four_sigma():
    assert jd.GaussianPsf(2.1).size == 2 * 9 + 1
