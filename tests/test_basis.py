"""Kernel bases (ALGORITHM §5): widths, sizes, AL images, normalisation, delta functions, regularisation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import convolve2d

from jaxdiff import basis
from jaxdiff._psf import gaussian_image
from tests.utils import assert_allclose

SIGMAS = (0.7, 1.5, 3.0)
ROOT2 = np.sqrt(2.0)

# §5.1: (σ_X, σ_Y, widths, mode, k); the last three rows are the preconvolution cases (Y = S ⊗ S).
WIDTH_TABLE = [
    (2.0, 2.4, (0.7, 1.4, 2.8), "convolution", 21),
    (2.4, 2.8, (0.7211, 1.4422, 2.8844), "convolution", 21),
    (2.0, 2.8, (0.9798, 1.9596, 3.9192), "convolution", 23),
    (2.4, 2.4, (0.7, 1.5, 3.0), "config", 21),
    (9.5, 2.8, (4.539, 9.078, 18.156), "deconvolution", 35),
    (2.0, 2.4 * ROOT2, (1.371, 2.742, 5.485), "convolution", 33),
    (2.4, 2.4 * ROOT2, (1.2, 2.4, 4.8), "convolution", 29),
    (2.8, 2.4 * ROOT2, (0.959, 1.918, 3.837), "convolution", 23),
]


def _flat(images):
    return np.asarray(images).reshape(images.shape[0], -1)


@pytest.mark.parametrize(("sx", "sy", "widths", "mode", "k"), WIDTH_TABLE)
def test_widths_and_size_follow_the_table(sx, sy, widths, mode, k):
    got, got_mode = basis.alard_lupton_widths(sx, sy)
    assert got_mode == mode
    assert_allclose(got, widths, rtol=2e-3)
    assert basis.kernel_size(got) == k


def test_missing_width_or_no_scaling_gives_the_config_widths():
    for args, kwargs in [((None, 2.4), {}), ((2.0, None), {}), ((2.0, 2.8), {"scale_by_fwhm": False})]:
        widths, mode = basis.alard_lupton_widths(*args, **kwargs)
        assert mode == "config"
        assert_allclose(widths, SIGMAS)


def test_width_floors_apply_to_near_equal_psfs():
    conv, _ = basis.alard_lupton_widths(2.0, 2.01)
    deconv, _ = basis.alard_lupton_widths(2.01, 2.0)
    assert_allclose(conv, (0.7, 1.4, 2.8))
    assert_allclose(deconv, (0.4, 0.8, 1.6))


def test_kernel_size_is_odd_and_clamped():
    assert basis.kernel_size((1.0, 2.0, 4.0)) == 25  # int(24) even → 25
    assert basis.kernel_size((1.0, 2.0, 4.1)) == 25  # int(24.6)
    assert basis.kernel_size((0.1, 0.2, 0.4)) == 21
    assert basis.kernel_size((10.0, 20.0, 40.0)) == 35
    assert basis.kernel_size((1.0, 2.0, 4.0), size_min=3, size_max=99, fwhm_scaling=2.0) == 9


@pytest.mark.parametrize(("sx", "sy", "widths", "mode", "k"), WIDTH_TABLE)
def test_traced_widths_equal_the_concrete_ones(sx, sy, widths, mode, k):
    del widths, k
    expected, _ = basis.alard_lupton_widths(sx, sy)
    got, code = jax.jit(basis.alard_lupton_widths_traced)(sx, sy)
    assert_allclose(got, expected)
    assert basis.BASIS_MODES[int(code)] == mode


def test_traced_widths_have_finite_gradients_also_for_equal_psfs():
    def largest(sx, sy):
        return basis.alard_lupton_widths_traced(sx, sy)[0][-1]

    grad = jax.grad(largest, argnums=(0, 1))
    gx, gy = grad(2.4, 2.4)
    assert np.isfinite(gx) and np.isfinite(gy)
    gx, gy = grad(2.0, 2.8)  # largest = 2·sqrt(σ_Y² − σ_X²)
    root = np.sqrt(2.8**2 - 2.0**2)
    assert_allclose([gx, gy], [-2 * 2.0 / root, 2 * 2.8 / root])


def test_al_basis_has_27_images_with_the_sum_and_norm_properties():
    b = basis.alard_lupton(21, jnp.asarray(SIGMAS))
    assert b.shape == (27, 21, 21)
    assert b.dtype == jnp.float64
    sums = np.asarray(b.sum(axis=(1, 2)))
    assert_allclose(sums[0], 1.0, rtol=1e-14)
    assert np.max(np.abs(sums[1:])) < 1e-12
    assert_allclose(np.linalg.norm(_flat(b)[1:], axis=1), 1.0, rtol=1e-12)
    gram = _flat(b)[1:] @ _flat(b)[1:].T
    assert np.max(np.abs(gram - np.eye(26))) < 1e-12


def test_basis_size_follows_the_degrees():
    assert basis.alard_lupton(9, jnp.asarray([1.0, 2.0]), degrees=(2, 1)).shape == (6 + 3, 9, 9)
    assert basis.alard_lupton(9, jnp.asarray([1.0]), degrees=(0,)).shape == (1, 9, 9)


def test_first_image_is_the_narrowest_unit_sum_gaussian():
    for ortho in (True, False):
        b = basis.alard_lupton(21, jnp.asarray(SIGMAS), orthonormalize=ortho)
        assert_allclose(b[0], gaussian_image(0.7, 0.7, 21), atol=1e-15)


def test_raw_images_are_normalised_by_the_sum_rule():
    b = basis.alard_lupton(15, jnp.asarray(SIGMAS), orthonormalize=False)
    h = 7
    t = np.arange(-h, h + 1) / h
    g = [np.asarray(gaussian_image(s, s, 15)) for s in SIGMAS]
    # x'·G_0 sums to zero: only divided by its norm; x' runs along columns (u).
    odd = t[None, :] * g[0]
    assert_allclose(b[1], odd / np.linalg.norm(odd), atol=1e-14)
    assert_allclose(b[1][:, ::-1], -b[1], atol=1e-14)
    assert_allclose(b[2], b[1].T, atol=1e-14)
    # x'²·G_0 has a positive sum s: image/s − B_0, then unit norm.
    even = t[None, :] ** 2 * g[0]
    even = even / even.sum() - g[0]
    assert_allclose(b[3], even / np.linalg.norm(even), atol=1e-14)
    # The plain second Gaussian (index 15) becomes G_1 − G_0 over its norm.
    diff = g[1] - g[0]
    assert_allclose(b[15], diff / np.linalg.norm(diff), atol=1e-14)


def test_orthonormalisation_keeps_the_span_and_is_qr_in_list_order():
    sig = jnp.asarray((1.2, 2.4, 4.8))
    ortho = _flat(basis.alard_lupton(29, sig))
    plain = _flat(basis.alard_lupton(29, sig, orthonormalize=False))
    assert_allclose(ortho[0], plain[0], atol=0.0, rtol=0.0)
    q = ortho[1:].T
    residual = plain[1:].T - q @ (q.T @ plain[1:].T)
    assert np.max(np.abs(residual)) < 1e-12
    r = q.T @ plain[1:].T  # R of A = QR: upper triangular with a positive diagonal
    assert np.max(np.abs(np.tril(r, -1))) < 1e-12
    assert np.all(np.diag(r) > 0)


def test_orthonormalisation_equals_householder_qr():
    """The float64 Cholesky QR gives the Q of a Householder QR with R's diagonal made positive."""
    sig = jnp.asarray((0.7, 1.4, 2.8))
    for k in (21, 35):
        ortho = _flat(basis.alard_lupton(k, sig))
        plain = _flat(basis.alard_lupton(k, sig, orthonormalize=False))
        ones = np.full((plain.shape[1], 1), plain.shape[1] ** -0.5)
        q, r = np.linalg.qr(np.concatenate([ones, plain[1:].T], axis=1))
        q = q * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
        assert_allclose(ortho[1:], q[:, 1:].T, rtol=0, atol=1e-13)


def test_separable_factors_reproduce_the_basis():
    for k, sig, ortho in [(21, SIGMAS, True), (21, SIGMAS, False), (35, (4.539, 9.078, 18.156), True)]:
        fx, fy, mix = basis.alard_lupton_factors(k, jnp.asarray(sig), orthonormalize=ortho)
        assert fx.shape == fy.shape == (27, k)
        assert mix.shape == (27, 27)
        rebuilt = jnp.einsum("br,rv,ru->bvu", mix, fy, fx)
        expected = basis.alard_lupton(k, jnp.asarray(sig), orthonormalize=ortho)
        assert np.max(np.abs(np.asarray(rebuilt - expected))) < 1e-11


def test_basis_gradient_matches_finite_differences():
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(27, 15, 15)))

    @jax.jit
    def loss(sig):
        b = basis.alard_lupton(15, sig)
        return jnp.sum(weights * b) + jnp.sum(b**3)

    sig = jnp.asarray((0.9, 1.8, 3.6))
    grad = jax.grad(loss)(sig)
    eps = 1e-6
    numeric = [(loss(sig.at[i].add(eps)) - loss(sig.at[i].add(-eps))) / (2 * eps) for i in range(3)]
    assert np.all(np.isfinite(grad))
    assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_gradient_through_traced_widths_matches_finite_differences():
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(27, 21, 21)))

    @jax.jit
    def loss(sx, sy):
        widths, _ = basis.alard_lupton_widths_traced(sx, sy)
        return jnp.sum(weights * basis.alard_lupton(21, widths))

    gx, gy = jax.grad(loss, argnums=(0, 1))(2.0, 2.8)
    eps = 1e-6
    nx = (loss(2.0 + eps, 2.8) - loss(2.0 - eps, 2.8)) / (2 * eps)
    ny = (loss(2.0, 2.8 + eps) - loss(2.0, 2.8 - eps)) / (2 * eps)
    assert_allclose([gx, gy], [nx, ny], rtol=1e-6)
    assert np.all(np.isfinite(jax.grad(loss, argnums=(0, 1))(2.4, 2.4)))


def test_jit_and_vmap_equal_eager():
    stack = jnp.asarray([SIGMAS, (0.7, 1.4, 2.8), (1.2, 2.4, 4.8)])
    make = lambda s: basis.alard_lupton(21, s)
    eager = np.stack([make(s) for s in stack])
    assert_allclose(jax.jit(make)(stack[1]), eager[1], atol=1e-14)
    assert_allclose(jax.vmap(make)(stack), eager, atol=1e-13)
    fac = lambda s: basis.alard_lupton_factors(21, s)[2]
    assert_allclose(jax.vmap(fac)(stack), np.stack([fac(s) for s in stack]), atol=1e-12)


def test_jitted_basis_does_not_retrace_for_new_sigmas():
    make = eqx.filter_jit(eqx.debug.assert_max_traces(lambda s: basis.alard_lupton(21, s), max_traces=1))
    make(jnp.asarray(SIGMAS))
    make(jnp.asarray((0.8, 1.6, 3.2)))


def test_float32_without_x64():
    with jax.enable_x64(False):
        b = basis.alard_lupton(21, jnp.asarray(SIGMAS, dtype=jnp.float32))
        assert b.dtype == jnp.float32
        flat = _flat(b)
        assert abs(flat[0].sum() - 1.0) < 1e-6
        assert np.max(np.abs(flat[1:].sum(axis=1))) < 1e-5
        assert np.max(np.abs(flat[1:] @ flat[1:].T - np.eye(26))) < 1e-5
        widths, code = basis.alard_lupton_widths_traced(2.0, 2.8)
        assert widths.dtype == jnp.float32 and int(code) == 1


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="k=20"):
        basis.alard_lupton(20, jnp.asarray(SIGMAS))
    with pytest.raises(ValueError, match="degrees"):
        basis.alard_lupton(21, jnp.asarray((1.0, 2.0)))
    with pytest.raises(ValueError, match="k=4"):
        basis.delta_function(4)
    with pytest.raises(ValueError, match="k=7"):
        basis.regularization_matrix(7, basis.delta_function(5))


def test_normalise_matches_a_direct_implementation(rng):
    images = rng.normal(size=(6, 5, 5))
    images[0] += 1.0
    images[2] -= images[2].mean()  # already sums to zero: only scaled to unit norm
    expected = [images[0] / images[0].sum()]
    for img in images[1:]:
        s = img.sum()
        out = img / s - expected[0] if abs(s) > 1.19e-7 else img
        expected.append(out / np.linalg.norm(out))
    got = basis.normalise(jnp.asarray(images))
    assert_allclose(got, np.stack(expected), atol=1e-13)
    mix = basis.normalisation_matrix(jnp.asarray(images))
    assert_allclose(mix @ _flat(images), _flat(got), atol=1e-13)


def test_delta_basis_is_centre_first_then_differences():
    k = 5
    b = np.asarray(basis.delta_function(k))
    assert b.shape == (25, 5, 5)
    centre = np.zeros((k, k))
    centre[2, 2] = 1.0
    assert_allclose(b[0], centre, atol=0.0)
    others = [i for i in range(k * k) if i != 12]
    for b_index, pixel in enumerate(others, start=1):
        delta = np.zeros(k * k)
        delta[pixel] = 1.0
        assert_allclose(b[b_index], (delta.reshape(k, k) - centre) / ROOT2, atol=1e-15)
    assert_allclose(b.sum(axis=(1, 2))[1:], 0.0, atol=1e-15)
    assert_allclose(np.linalg.norm(_flat(b)[1:], axis=1), 1.0)


def test_delta_basis_spans_every_kernel(rng):
    k = 7
    kernel = rng.normal(size=(k, k))
    flat = kernel.ravel()
    coeffs = np.concatenate([[flat.sum()], ROOT2 * np.delete(flat, k * k // 2)])
    assert_allclose(basis.combine(basis.delta_function(k), jnp.asarray(coeffs)), kernel, atol=1e-13)


def test_combine_is_the_weighted_sum(rng):
    b = basis.alard_lupton(11, jnp.asarray(SIGMAS))
    coeffs = rng.normal(size=27)
    assert_allclose(basis.combine(b, jnp.asarray(coeffs)), np.einsum("b,bij->ij", coeffs, b), atol=1e-14)


def _brute_penalty(kernel, lam, border):
    lap = convolve2d(kernel, np.asarray(basis.LAPLACIAN_STENCIL) / 6.0, mode="same")
    weight = np.full(kernel.shape, border)
    weight[1:-1, 1:-1] = 1.0
    return lam * np.sum((weight * lap) ** 2)


def test_regularisation_is_the_weighted_laplacian_penalty(rng):
    k = 7
    for b in (basis.delta_function(k), basis.alard_lupton(k, jnp.asarray(SIGMAS))):
        h = np.asarray(basis.regularization_matrix(k, b, lambda_value=0.3, border_penalty=2.5))
        assert_allclose(h, h.T, atol=0.0, rtol=0.0)
        assert np.min(np.linalg.eigvalsh(h)) > -1e-12
        for _ in range(3):
            c = rng.normal(size=b.shape[0])
            kernel = np.asarray(basis.combine(b, jnp.asarray(c)))
            assert_allclose(c @ h @ c, _brute_penalty(kernel, 0.3, 2.5))


def test_regularisation_annihilates_no_kernel():
    # With zeros outside the kernel the nine-point Laplacian is invertible: even a constant kernel is
    # penalised (at its edge), so H is positive definite on the delta basis.
    k = 9
    b = basis.delta_function(k)
    h = np.asarray(basis.regularization_matrix(k, b))
    assert np.min(np.linalg.eigvalsh(h)) > 1e-4
    const = np.concatenate([[k * k], np.full(k * k - 1, ROOT2)])  # kernel = 1 everywhere
    assert_allclose(basis.combine(b, jnp.asarray(const)), np.ones((k, k)), atol=1e-13)
    assert const @ h @ const > 0


def test_border_penalty_only_weighs_the_outer_ring(rng):
    k = 9
    b = basis.delta_function(k)
    h1 = np.asarray(basis.regularization_matrix(k, b, border_penalty=1.0))
    h3 = np.asarray(basis.regularization_matrix(k, b, border_penalty=3.0))
    inner = np.zeros((k, k))
    inner[3:-3, 3:-3] = rng.normal(size=(k - 6, k - 6))  # its Laplacian vanishes on the border ring
    edge = np.zeros((k, k))
    edge[0, 4] = 1.0
    for kernel, same in ((inner, True), (edge, False)):
        flat = kernel.ravel()
        c = np.concatenate([[flat.sum()], ROOT2 * np.delete(flat, k * k // 2)])
        p1, p3 = c @ h1 @ c, c @ h3 @ c
        if same:
            assert_allclose(p3, p1)
        else:
            assert p3 > 5 * p1
    assert_allclose(basis.regularization_matrix(k, b, lambda_value=0.4), 2 * h3, rtol=1e-14)


def test_smooth_kernels_cost_less_than_rough_ones(rng):
    k = 15
    b = basis.delta_function(k)
    h = np.asarray(basis.regularization_matrix(k, b))
    smooth = np.asarray(gaussian_image(2.0, 2.0, k))
    rough = rng.normal(size=(k, k))
    rough *= np.linalg.norm(smooth) / np.linalg.norm(rough)

    def penalty(kernel):
        flat = kernel.ravel()
        c = np.concatenate([[flat.sum()], ROOT2 * np.delete(flat, k * k // 2)])
        return c @ h @ c

    assert penalty(smooth) < 0.05 * penalty(rough)


def test_missing_psf_width_uses_the_config_widths_also_when_traced():
    # §5.1: an exposure without a PSF (plain FITS) gives no width; both routes fall back to al_sig_gauss
    for fn in (basis.alard_lupton_widths, basis.alard_lupton_widths_traced):
        widths, mode = fn(None, 2.4, sig_gauss=(0.7, 1.5, 3.0))
        np.testing.assert_array_equal(np.asarray(widths), [0.7, 1.5, 3.0])
        assert mode in ("config", 0)
