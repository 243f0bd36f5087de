import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import spatial
from jaxdiff.convolve import _axis_plan, convolve, convolve_spatial, next_fast_len
from tests.utils import assert_allclose

EDGE = 4
PRESERVE = 1 << 9


def _brute_force(image, variance, mask, kernels, tx, ty, valid, edge_bit, preserve_bits):
    """Direct per-pixel sums of ALGORITHM §9 in float64."""
    p, k, _ = kernels.shape
    h = k // 2
    ny, nx = image.shape
    out = np.empty((ny, nx))
    vout = np.empty((ny, nx))
    mout = np.empty((ny, nx), mask.dtype)
    for r in range(ny):
        for c in range(nx):
            inside = h <= r < ny - h and h <= c < nx - h
            if not inside or not valid[r - h : r + h + 1, c - h : c + h + 1].all():
                out[r, c], vout[r, c] = image[r, c], variance[r, c]
                mout[r, c] = mask[r, c] | (1 << edge_bit)
                continue
            kern = np.einsum("p,pij->ij", ty[:, r] * tx[:, c], kernels)
            # box[v', u'] = input at (r - v, c - u) with v' = h + v: flip the window.
            box = image[r - h : r + h + 1, c - h : c + h + 1][::-1, ::-1]
            vbox = variance[r - h : r + h + 1, c - h : c + h + 1][::-1, ::-1]
            # A non-finite pixel anywhere in the box makes the output NaN (ALGORITHM §9).
            out[r, c] = np.sum(kern * box) if np.isfinite(box).all() else np.nan
            vout[r, c] = np.sum(kern**2 * vbox) if np.isfinite(vbox).all() else np.nan
            ored = np.bitwise_or.reduce(mask[r - h : r + h + 1, c - h : c + h + 1].ravel())
            mout[r, c] = (ored & ~preserve_bits) | (mask[r, c] & preserve_bits)
    return out, vout, mout


def _case(rng, order, ny=40, nx=50, k=7):
    p = spatial.n_terms(order)
    image = rng.normal(10.0, 3.0, size=(ny, nx))
    variance = rng.uniform(0.5, 2.0, size=(ny, nx))
    mask = np.zeros((ny, nx), np.int32)
    mask[12, 20] = 1 << 0
    mask[25, 30] = PRESERVE | (1 << 2)
    image[30, 10] = np.nan
    variance[8, 40] = np.inf
    valid = np.ones((ny, nx), bool)
    valid[:, 45:] = False
    kernels = rng.normal(size=(p, k, k)) / k
    box = jnp.array([100.0, 200.0, nx, ny])
    tx, ty = spatial.separable_terms(box, (ny, nx), jnp.array([100, 200]), order)
    return image, variance, mask, valid, kernels, np.asarray(tx), np.asarray(ty)


@pytest.mark.parametrize(
    ("order", "spare_bits", "interior"),
    [(0, (), 0), (1, (), 0), (2, (), 0), (1, (20, 21, 22), 0), (2, (20, 21, 22), 2), (1, (20, 21, 22), 3)],
)
def test_spatial_convolution_equals_brute_force(rng, order, spare_bits, interior):
    """Also with the box tests carried in spare mask bits (cleared from the result), with and without an
    interior crop (interior < h leaves kept pixels whose box leaves the array: EDGE there)."""
    image, variance, mask, valid, kernels, tx, ty = _case(rng, order)
    got = convolve_spatial(
        jnp.asarray(image),
        jnp.asarray(variance),
        jnp.asarray(mask),
        jnp.asarray(kernels),
        jnp.asarray(tx),
        jnp.asarray(ty),
        valid=jnp.asarray(valid),
        edge_bit=EDGE,
        preserve_bits=PRESERVE,
        interior=interior,
        spare_bits=spare_bits,
    )
    crop = (slice(interior, image.shape[0] - interior), slice(interior, image.shape[1] - interior))
    ref = [r[crop] for r in _brute_force(image, variance, mask, kernels, tx, ty, valid, EDGE, PRESERVE)]
    for a, b in zip(got[:2], ref[:2], strict=True):
        a = np.asarray(a)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert np.isnan(b).any()
        assert_allclose(np.where(np.isnan(a), 0, a), np.where(np.isnan(b), 0, b), rtol=0, atol=1e-10)
    np.testing.assert_array_equal(np.asarray(got[2]), ref[2])
    assert got[0].dtype == image.dtype and got[2].dtype == mask.dtype


def test_spare_bits_outside_the_mask_dtype_are_refused(rng):
    image, variance, mask, valid, kernels, tx, ty = _case(rng, 1)
    args = [jnp.asarray(a) for a in (image, variance, mask, kernels, tx, ty)]
    with pytest.raises(ValueError, match="spare_bits"):
        convolve_spatial(*args, edge_bit=EDGE, spare_bits=(20, 21, 31))
    args[2] = args[2].astype(jnp.int16)
    with pytest.raises(ValueError, match="bits 0..14 of the int16 mask"):
        convolve_spatial(*args, edge_bit=EDGE, spare_bits=(13, 14, 15))


def test_one_hot_kernel_shifts_by_plus_one_in_x(rng):
    image = jnp.asarray(rng.normal(size=(20, 30)))
    kernel = jnp.zeros((5, 5)).at[2, 3].set(1.0)  # (u, v) = (1, 0)
    out = convolve(image, kernel)
    assert_allclose(out[:, 1:], image[:, :-1])
    assert_allclose(out[:, 0], jnp.zeros(20), atol=1e-12)


def test_fixed_convolution_matches_direct_sum_with_zero_outside(rng):
    scipy_signal = pytest.importorskip("scipy.signal")
    image = rng.normal(size=(61, 37))
    kernel = rng.normal(size=(9, 9))
    assert_allclose(convolve(jnp.asarray(image), jnp.asarray(kernel)), scipy_signal.convolve2d(image, kernel, "same"))


def test_tiled_convolution_matches_direct_sum(rng):
    scipy_signal = pytest.importorskip("scipy.signal")
    image = rng.normal(size=(1100, 40))  # several overlap-save tiles along y
    kernel = rng.normal(size=(21, 21))
    got = convolve(jnp.asarray(image), jnp.asarray(kernel))
    assert_allclose(got, scipy_signal.convolve2d(image, kernel, "same"), rtol=0, atol=1e-10)


def test_offset_is_exact(rng):
    image, variance, mask, _, kernels, tx, ty = _case(rng, 1)
    image = np.nan_to_num(image)
    args = [jnp.asarray(a) for a in (image, variance, mask, kernels, tx, ty)]
    plain = convolve_spatial(*args, edge_bit=EDGE)
    shifted = convolve_spatial(*args, edge_bit=EDGE, offset=7.5)
    assert_allclose(shifted[0], plain[0], rtol=0, atol=1e-10)


def test_delta_kernel_reproduces_input_and_flux_scales_with_kernel_sum(rng):
    image = jnp.asarray(rng.normal(size=(30, 30)))
    delta = jnp.zeros((1, 5, 5)).at[0, 2, 2].set(2.5)
    ones = jnp.ones((1, 30))
    out, var, _ = convolve_spatial(
        image, jnp.ones((30, 30)), jnp.zeros((30, 30), jnp.int32), delta, ones, ones, edge_bit=EDGE
    )
    assert_allclose(out[2:-2, 2:-2], 2.5 * image[2:-2, 2:-2])
    assert_allclose(var[2:-2, 2:-2], jnp.full((26, 26), 6.25))


def test_jit_vmap_grad_and_no_retrace(rng):
    image, variance, mask, _, kernels, tx, ty = _case(rng, 1, ny=36, nx=44, k=5)
    image = np.nan_to_num(image)
    variance = np.nan_to_num(variance, posinf=1.0)
    args = [jnp.asarray(a) for a in (image, variance, mask, kernels, tx, ty)]

    @eqx.debug.assert_max_traces(max_traces=1)
    def run(*a):
        return convolve_spatial(*a, edge_bit=EDGE)

    jitted = eqx.filter_jit(run)
    eager = convolve_spatial(*args, edge_bit=EDGE)
    for a, b in zip(jitted(*args), eager, strict=True):
        assert_allclose(a, b, rtol=0, atol=1e-12)
    jitted(args[0] + 1.0, *args[1:])

    stack = jnp.stack([args[0], 2 * args[0]])
    batched = jax.vmap(lambda im: convolve_spatial(im, *args[1:], edge_bit=EDGE)[0])(stack)
    assert_allclose(batched[1], convolve_spatial(stack[1], *args[1:], edge_bit=EDGE)[0], rtol=0, atol=1e-12)

    w = jnp.asarray(rng.normal(size=image.shape))

    def loss(im, ker):
        return jnp.sum(w * convolve_spatial(im, args[1], args[2], ker, args[4], args[5], edge_bit=EDGE)[0])

    g_im, g_k = jax.grad(loss, argnums=(0, 1))(args[0], args[3])
    eps = 1e-6
    for idx in [(12, 13), (3, 3)]:
        d = jnp.zeros_like(args[0]).at[idx].set(eps)
        fd = (loss(args[0] + d, args[3]) - loss(args[0] - d, args[3])) / (2 * eps)
        assert_allclose(g_im[idx], fd, rtol=1e-6, atol=1e-8)
    d = jnp.zeros_like(args[3]).at[1, 2, 3].set(eps)
    fd = (loss(args[0], args[3] + d) - loss(args[0], args[3] - d)) / (2 * eps)
    assert_allclose(g_k[1, 2, 3], fd, rtol=1e-6)


def test_float32_images_stay_float32(rng):
    image = jnp.asarray(rng.normal(size=(32, 32)), jnp.float32)
    k = jnp.ones((1, 5, 5), jnp.float32) / 25
    ones = jnp.ones((1, 32))
    out = convolve_spatial(image, jnp.ones_like(image), jnp.zeros((32, 32), jnp.int32), k, ones, ones, edge_bit=EDGE)
    assert out[0].dtype == jnp.float32 and out[1].dtype == jnp.float32


def test_next_fast_len_is_even_and_smooth():
    for n in (1, 7, 277, 4117):
        m = next_fast_len(n)
        assert m >= n and m % 2 == 0
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        assert m == 1
    # image-sized grids take the factor 7 (2072 → 2100, not 2160); overlap-save tiles stay at 2-3-5 lengths
    assert next_fast_len(2072) == 2100 and next_fast_len(2072, (2, 3, 5)) == 2160
    assert _axis_plan(2048, 15, 1024) == (720, 690, 3)  # with 7 allowed it would be (560, 530, 4)


def test_interior_is_the_crop_of_the_full_result(rng):
    image, variance, mask, valid, kernels, tx, ty = _case(rng, 1)
    args = [jnp.asarray(a) for a in (image, variance, mask, kernels, tx, ty)]
    full = convolve_spatial(*args, valid=jnp.asarray(valid), edge_bit=EDGE, preserve_bits=PRESERVE)
    inner = convolve_spatial(*args, valid=jnp.asarray(valid), edge_bit=EDGE, preserve_bits=PRESERVE, interior=3)
    for a, b in zip(inner, full, strict=True):
        assert a.shape == (image.shape[0] - 6, image.shape[1] - 6)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[3:-3, 3:-3])


def test_tiles_in_both_axes_equal_one_tile(rng):
    """Overlap-save tiles whose last row and column of tiles overlap their neighbours (1100 × 1150 is no multiple
    of the tiles' outputs) give the single-tile result, for polynomial weights of degree 1."""
    from jaxdiff.convolve import _plan, _spatial_apply

    ny, nx, h = 1100, 1150, 10
    image = jnp.asarray(rng.normal(size=(ny, nx)))
    kernels = jnp.asarray(rng.normal(size=(3, 2 * h + 1, 2 * h + 1)))
    ty, tx = jnp.linspace(-1.0, 1.0, ny), jnp.linspace(-1.0, 1.0, nx)
    wy = jnp.stack([jnp.ones(ny), ty, jnp.ones(ny)])
    wx = jnp.stack([jnp.ones(nx), jnp.ones(nx), tx])
    tiled_plan = _plan((ny, nx), h)
    assert all(n_tiles > 1 and n_tiles * out > n for (_, out, n_tiles), n in zip(tiled_plan, (ny, nx), strict=True))
    tiled = _spatial_apply(image, kernels, wy, wx, 1, tiled_plan)
    single = _spatial_apply(image, kernels, wy, wx, 1, _plan((ny, nx), h, max_tile=0))
    assert_allclose(tiled, single, rtol=0, atol=1e-9)
