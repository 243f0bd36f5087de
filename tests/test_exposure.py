"""Exposure: a pytree under jit, vmap and filter_grad; validation at construction."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff as jd
from tests.utils import assert_allclose


def _exposure(rng, shape=(21, 25), sigma=1.6, xy0=(3, -4)) -> jd.Exposure:
    image = rng.normal(size=shape)
    variance = rng.uniform(0.5, 2.0, size=shape)
    mask = rng.integers(0, 4, size=shape)
    return jd.Exposure(image, variance, mask=mask, psf=jd.GaussianPsf(sigma, 9), xy0=xy0, photo_calib=0.5)


def _chi2(exposure: jd.Exposure, amplitude=3.0):
    """Chi-square of a PSF-shaped star at the image centre: depends on the image and the PSF width."""
    k = exposure.psf.size
    ny, nx = exposure.shape
    y0, x0 = (ny - k) // 2, (nx - k) // 2
    stamp = exposure.image[y0 : y0 + k, x0 : x0 + k]
    var = exposure.variance[y0 : y0 + k, x0 : x0 + k]
    return jnp.sum((stamp - amplitude * exposure.psf.image()) ** 2 / var)


@pytest.mark.parametrize("psf", [None, "gaussian", "image", "grid"])
def test_pytree_round_trip(rng, psf):
    kernel = jd.GaussianPsf(1.3, 7).image()
    psfs = {
        None: None,
        "gaussian": jd.GaussianPsf(1.3, 7),
        "image": kernel,
        "grid": jd.GridPsf(jnp.stack([jnp.stack([kernel, kernel])] * 2), (0, 0, 10, 10)),
    }
    exposure = jd.Exposure(rng.normal(size=(6, 8)), np.ones((6, 8)), psf=psfs[psf], xy0=(2, 5), photo_calib=3.0)
    leaves, treedef = jax.tree_util.tree_flatten(exposure)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(back) is jd.Exposure and type(back.psf) is type(exposure.psf)
    assert jax.tree_util.tree_structure(back) == treedef
    for a, b in zip(jax.tree_util.tree_leaves(back), leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.mask_planes == exposure.mask_planes
    if psf == "image":
        assert isinstance(exposure.psf, jd.ImagePsf)


def test_defaults_and_attributes(rng):
    exposure = jd.Exposure(rng.normal(size=(5, 7)), np.ones((5, 7)))
    assert exposure.mask.dtype == jnp.int32 and not np.any(exposure.mask)
    assert exposure.psf is None and exposure.wcs is None
    assert exposure.mask_planes == tuple(jd.MASK_PLANES.items())
    np.testing.assert_array_equal(exposure.xy0, [0, 0])
    assert float(exposure.photo_calib) == 1.0
    assert exposure.shape == (5, 7)
    assert jd.Exposure(np.ones((5, 7)), np.ones((5, 7)), xy0=(10, 20)).bbox == (10, 20, 16, 24)


def test_jit_matches_eager_and_does_not_retrace(rng):
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def f(exposure):
        return _chi2(exposure) + jnp.sum(exposure.mask) + exposure.xy0[0] * exposure.photo_calib

    first = _exposure(rng)
    second = _exposure(rng, sigma=2.2, xy0=(100, 7))
    for exposure in (first, second):
        expected = _chi2(exposure) + jnp.sum(exposure.mask) + exposure.xy0[0] * exposure.photo_calib
        assert_allclose(f(exposure), expected)


def test_jax_jit_accepts_exposure(rng):
    exposure = _exposure(rng)
    assert_allclose(jax.jit(_chi2)(exposure), _chi2(exposure))


def test_vmap_over_stacked_pair_matches_loop(rng):
    e1 = _exposure(rng, sigma=1.2, xy0=(0, 0))
    e2 = _exposure(rng, sigma=2.0, xy0=(5, 9))
    stacked = jax.tree.map(lambda *a: jnp.stack(a), e1, e2)
    assert stacked.image.shape == (2, 21, 25) and stacked.xy0.shape == (2, 2)

    def f(exposure):
        return _chi2(exposure) + exposure.xy0[1] + exposure.psf.sigma()

    assert_allclose(jax.vmap(f)(stacked), jnp.stack([f(e1), f(e2)]))


def test_filter_grad_matches_finite_differences(rng):
    exposure = _exposure(rng)
    grad = eqx.filter_grad(_chi2)(exposure)
    assert grad.mask is None and grad.xy0 is None

    k, (ny, nx) = exposure.psf.size, exposure.shape
    y0, x0 = (ny - k) // 2, (nx - k) // 2
    model = 3.0 * exposure.psf.image()
    stamp = exposure.image[y0 : y0 + k, x0 : x0 + k]
    var = exposure.variance[y0 : y0 + k, x0 : x0 + k]
    expected = jnp.zeros(exposure.shape).at[y0 : y0 + k, x0 : x0 + k].set(2 * (stamp - model) / var)
    assert_allclose(grad.image, expected, atol=1e-12)

    def chi2_of_width(width):
        return _chi2(eqx.tree_at(lambda e: e.psf.width, exposure, width))

    h = 1e-5
    width = exposure.psf.width
    fd = (chi2_of_width(width + h) - chi2_of_width(width - h)) / (2 * h)
    assert abs(float(fd)) > 1e-3
    assert_allclose(grad.psf.width, fd, rtol=1e-6)


def test_variance_shape_mismatch_raises():
    with pytest.raises(ValueError, match="variance shape"):
        jd.Exposure(np.zeros((4, 5)), np.ones((5, 4)))


def test_construction_checks_shapes_not_values():
    """Values are the task's to check (`test_task.py`): construction copies nothing to the host, so it stays cheap
    inside programs and for cut-outs."""
    variance = np.ones((4, 5))
    variance[2, 3] = -1.0
    assert float(jd.Exposure(np.zeros((4, 5)), variance).variance[2, 3]) == -1.0


def test_nan_variance_allowed_where_image_is_nan():
    image = np.zeros((4, 5))
    variance = np.ones((4, 5))
    image[1, 1] = variance[1, 1] = np.nan
    assert np.isnan(jd.Exposure(image, variance).variance[1, 1])


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="mask shape"):
        jd.Exposure(np.zeros((4, 5)), np.ones((4, 5)), mask=np.zeros((4, 4), np.int32))


def test_even_sized_psf_raises():
    with pytest.raises(ValueError, match="PSF image.*odd"):
        jd.Exposure(np.zeros((9, 9)), np.ones((9, 9)), psf=np.full((4, 4), 1 / 16))


def test_unnormalised_psf_raises():
    with pytest.raises(ValueError, match="PSF image.*sum 1"):
        jd.Exposure(np.zeros((9, 9)), np.ones((9, 9)), psf=2 * jd.GaussianPsf(1.0, 5).image())


def test_fractional_xy0_raises():
    with pytest.raises(ValueError, match="xy0"):
        jd.Exposure(np.zeros((4, 5)), np.ones((4, 5)), xy0=(0.5, 1))


def test_one_dimensional_image_raises():
    with pytest.raises(ValueError, match="image must be 2-D"):
        jd.Exposure(np.zeros(5), np.ones(5))


def test_exposure_from_numpy_compiles_nothing_per_shape():
    """Numpy planes go to the device without a program per shape and dtype (`jnp.asarray` compiled five for an
    exposure read from FITS, a missing mask compiled a fill and an int16 mask a conversion: a fresh process paid
    them for every new image size)."""
    from jax import monitoring

    def build(shape, **kwargs):
        rng = np.random.default_rng(0)
        psf = np.zeros((9, 9), np.float32)
        psf[4, 4] = 1.0
        planes = rng.normal(size=shape).astype(np.float32), np.ones(shape, np.float32)
        return jd.Exposure(*planes, psf=psf, **kwargs)

    events = []

    def on_duration(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    monitoring.register_event_duration_secs_listener(on_duration)
    variants = {
        (37, 43): dict(mask=np.zeros((37, 43), np.int32), xy0=np.array([3, 4])),
        (38, 41): dict(xy0=(3, 4), photo_calib=2.5),  # no mask: zeros made on the host
        (39, 42): dict(mask=np.zeros((39, 42), np.int16), xy0=[1.0, 2.0]),  # converted on the host
        (40, 44): dict(mask=np.zeros((40, 44), ">i4")),  # FITS byte order
    }
    for shape, kwargs in variants.items():
        exposure = build(shape, **kwargs)
        assert exposure.image.shape == shape and exposure.mask.dtype == jnp.int32 and exposure.xy0.dtype == jnp.int32
    assert events == []
    assert exposure.mask.shape == (40, 44) and int(exposure.mask.sum()) == 0
