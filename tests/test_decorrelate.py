import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff._stats import clipped_mean_std
from jaxdiff.convolve import convolve
from jaxdiff.decorrelate import (
    decorrelate,
    decorrelate_spatial,
    decorrelation_filter,
    difference_psf,
    grid_shape,
)
from tests.utils import assert_allclose

N = 256
B = 16  # border excluded from the statistics


def _gaussian(sigma, size=21):
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    g = np.exp(-(x**2 + y**2) / (2 * sigma**2))
    return g / g.sum()


def _rho(a, r):
    a = a[B:-B, B:-B]
    return float(np.mean(a[:, : a.shape[1] - r] * a[:, r:]) / np.mean(a * a))


def _clipped_var(a):
    inner = jnp.asarray(a[B:-B, B:-B])
    return float(clipped_mean_std(inner, jnp.isfinite(inner))[1]) ** 2


@pytest.fixture(scope="module")
def noise_difference():
    """Science noise (svar 1) minus the kernel-convolved template noise (tvar 100)."""
    gen = np.random.default_rng(7)
    kernel = _gaussian(2.46)
    s = gen.normal(0, 1.0, size=(N, N))
    t = gen.normal(0, 10.0, size=(N, N))
    return s - np.asarray(convolve(jnp.asarray(t), jnp.asarray(kernel))), kernel


def test_grid_shape_covers_image_and_kernel():
    assert grid_shape((256, 100), 21, 31) == (288, 140)  # 286 and 130 rounded up to even 2-3-5-7 lengths


def test_filter_is_one_at_zero_frequency_and_real():
    c = decorrelation_filter(jnp.asarray(_gaussian(2.0) * 1.3), 0.5, 2.0, (64, 64))
    assert c.shape == (64, 33) and c.dtype == jnp.float64
    assert float(c[0, 0]) == 1.0
    assert np.all(np.asarray(c) >= 1.0 - 1e-12)


@pytest.mark.parametrize("ksum", [1.0, 0.7])
def test_variance_weights_identity(ksum):
    kernel = jnp.asarray(_gaussian(2.2) * ksum)
    v_u, v_c = 0.3, 1.7
    _, var, _ = decorrelate(jnp.zeros((40, 50)), jnp.full((40, 50), v_u), jnp.full((40, 50), v_c), kernel, v_u, v_c)
    assert_allclose(var, jnp.full((40, 50), v_u + v_c * ksum**2))


def test_delta_kernel_leaves_image_unchanged(rng):
    image = rng.normal(size=(40, 50))
    image[3, 4] = np.nan
    delta = jnp.zeros((7, 7)).at[3, 3].set(1.0)
    out, var, c = decorrelate(jnp.asarray(image), jnp.ones((40, 50)), jnp.ones((40, 50)), delta, 1.0, 2.0)
    assert_allclose(out, image, rtol=0, atol=1e-12)
    assert_allclose(var, jnp.full((40, 50), 2.0))
    assert np.isnan(out[3, 4])
    assert_allclose(c[c.shape[0] // 2, c.shape[1] // 2], 1.0)


def test_noise_only_difference_is_whitened(noise_difference):
    raw, kernel = noise_difference
    assert min(_rho(raw, r) for r in (1, 2, 3)) > 0.2
    ones = jnp.ones((N, N))
    out, var, _ = decorrelate(jnp.asarray(raw), ones, 100 * ones, jnp.asarray(kernel), 1.0, 100.0)
    out = np.asarray(out)
    assert max(abs(_rho(out, r)) for r in range(1, 11)) < 0.1
    assert_allclose(np.mean(var), 101.0, rtol=1e-10)
    assert abs(_clipped_var(out) / 101.0 - 1) < 0.05


def test_spatial_variant_with_constant_inputs_equals_constant(noise_difference):
    raw, kernel = noise_difference
    ones = jnp.ones((N, N))
    ref, ref_var, ref_c = decorrelate(jnp.asarray(raw), ones, 100 * ones, jnp.asarray(kernel), 1.0, 100.0)
    nodes = jnp.array([32.0, 96.0, 160.0, 224.0])
    kernels = jnp.broadcast_to(jnp.asarray(kernel), (4, 4, 21, 21))
    out, var, c = decorrelate_spatial(
        jnp.asarray(raw), ones, 100 * ones, kernels, jnp.ones((4, 4)), jnp.full((4, 4), 100.0), nodes, nodes
    )
    assert_allclose(out, ref, rtol=0, atol=1e-6)
    assert_allclose(var, ref_var, rtol=1e-6)
    assert_allclose(c[2, 1], ref_c, rtol=0, atol=1e-12)
    out = np.asarray(out)
    assert max(abs(_rho(out, r)) for r in range(1, 11)) < 0.1
    assert abs(_clipped_var(out) / np.mean(np.asarray(var)) - 1) < 0.05


def test_spatial_variant_interpolates_between_different_nodes(rng):
    image = jnp.asarray(rng.normal(size=(64, 64)))
    ones = jnp.ones((64, 64))
    kernels = jnp.stack([jnp.asarray(_gaussian(1.5, 9)), jnp.asarray(_gaussian(2.5, 9))]).reshape(1, 2, 9, 9)
    nodes_x, nodes_y = jnp.array([16.0, 48.0]), jnp.array([32.0])
    v_u, v_c = jnp.ones((1, 2)), jnp.full((1, 2), 4.0)
    out, var, _ = decorrelate_spatial(image, ones, 4 * ones, kernels, v_u, v_c, nodes_x, nodes_y)
    left = decorrelate(image, ones, 4 * ones, kernels[0, 0], 1.0, 4.0)
    right = decorrelate(image, ones, 4 * ones, kernels[0, 1], 1.0, 4.0)
    assert_allclose(out[:, :17], left[0][:, :17])
    assert_allclose(out[:, 48:], right[0][:, 48:])
    assert_allclose(out[:, 32], 0.5 * (left[0][:, 32] + right[0][:, 32]))
    # Clamped beyond the nodes, each side keeps its own exact weights.
    assert_allclose(var[:, :17], left[1][:, :17])
    assert_allclose(var[:, 48:], right[1][:, 48:])


def test_preconvolution_score_variance_is_total_over_nea(rng):
    psf = _gaussian(2.4, 25)
    kernel = _gaussian(2.45, 21)
    nea = 1.0 / np.sum(psf**2)
    ones = jnp.ones((N, N))
    s = rng.normal(size=(N, N))
    t = rng.normal(size=(N, N))
    score = np.asarray(convolve(jnp.asarray(s), jnp.asarray(psf))) - np.asarray(
        convolve(jnp.asarray(t), jnp.asarray(kernel))
    )
    out, var, _ = decorrelate(
        jnp.asarray(score), ones, ones, jnp.asarray(kernel), 1.0, 1.0, preconv_kernel=jnp.asarray(psf)
    )
    assert abs(float(np.mean(var)) * nea / 2.0 - 1) < 0.05
    assert abs(_clipped_var(np.asarray(out)) / float(np.mean(var)) - 1) < 0.1
    # K = P exactly: Ĉ_s = 1 and the score variance is (v_u + v_c)/NEA.
    _, exact, _ = decorrelate(
        jnp.asarray(score), ones, ones, jnp.asarray(psf), 1.0, 1.0, preconv_kernel=jnp.asarray(psf)
    )
    assert_allclose(exact, jnp.full((N, N), 2.0 / nea))


def test_difference_psf_is_normalised_and_sharpened():
    psf = jnp.asarray(_gaussian(2.4, 25))
    _, _, c = decorrelate(
        jnp.zeros((64, 64)), jnp.ones((64, 64)), jnp.ones((64, 64)), jnp.asarray(_gaussian(1.5)), 1.0, 1.0
    )
    out = difference_psf(psf, c)
    assert out.shape == psf.shape
    assert_allclose(jnp.sum(out), 1.0)
    # Decorrelation boosts high frequencies: the peak rises.
    assert float(out[12, 12]) > float(psf[12, 12])


def test_decorrelate_jit_equals_eager_without_retrace(rng):
    image = jnp.asarray(rng.normal(size=(48, 40)))
    ones = jnp.ones((48, 40))
    kernel = jnp.asarray(_gaussian(1.8, 11))

    @eqx.debug.assert_max_traces(max_traces=1)
    def run(im, v_c):
        return decorrelate(im, ones, ones, kernel, 1.0, v_c)

    jitted = eqx.filter_jit(run)
    for a, b in zip(jitted(image, jnp.asarray(3.0)), decorrelate(image, ones, ones, kernel, 1.0, 3.0), strict=True):
        assert_allclose(a, b, rtol=0, atol=1e-12)
    jitted(image * 2, jnp.asarray(4.0))


def test_variance_levels_equal_separate_levels():
    from jaxdiff._finalize import variance_level, variance_levels

    rng = np.random.default_rng(3)
    planes = [rng.gamma(5.0, s, size=(300, 310)).astype(np.float32) for s in (1.0, 4.0)]
    goods = [rng.uniform(size=(300, 310)) > f for f in (0.1, 0.6)]
    together = variance_levels(planes, goods)
    for level, v, g in zip(together, planes, goods, strict=True):
        assert float(level) == float(variance_level(v, g))
    assert abs(float(together[1]) / float(together[0]) - 4.0) < 0.1


@pytest.mark.parametrize("shape", [(1080, 40), (270, 36), (97, 20)])
def test_power_spectrum_in_row_blocks_equals_the_fft(shape, rng):
    """|rfft2|² of the centred kernel, built in blocks of rows (a divisor of the grid's rows where one is near the
    block size, else with a remainder block), equals numpy's transform of the kernel placed at the origin."""
    from jaxdiff.decorrelate import _power_spectrum, _row_block

    kernel = rng.normal(size=(7, 7))
    grid = np.zeros(shape)
    h = 3
    for v in range(-h, h + 1):  # element [h + v, h + u] is offset (u, v): wrap it around the origin
        for u in range(-h, h + 1):
            grid[v % shape[0], u % shape[1]] = kernel[h + v, h + u]
    expected = np.abs(np.fft.rfft2(grid)) ** 2
    out = np.asarray(_power_spectrum(jnp.asarray(kernel, jnp.float32), shape, block=64))
    assert out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4 * expected.max())
    assert shape[0] % _row_block(shape[0], 64) == 0 or _row_block(shape[0], 64) == 64
    assert _row_block(4320, 256) == 240 and _row_block(2160, 256) == 240 and _row_block(1080, 256) == 216
