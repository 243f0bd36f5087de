"""Alard–Lupton decorrelation of a difference image in Fourier space (ALGORITHM §11, §12).

The filter Ĉ(ν) = √[(v_u + v_c κ₀²)/(v_u + v_c |K̂(ν)|²)] whitens the noise of D = U − κ ∗ C (U, C: the
unconvolved and the convolved image, with pixel variances v_u, v_c); the preconvolution (score) variant is
Ĉ_s(ν) = (v_u + v_c κ₀²)/(v_u + v_c |K̂|²/|P̂|²). Filters and their variance weights are computed in
`_types.solve_dtype()`; image transforms keep the image's dtype. Grids are centre-origin: a kernel's centre sits
at index (0, 0), so the filters are real and even.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.signal import convolve2d

from ._types import Array, Float, Image, Kernel, Scalar, solve_dtype
from .convolve import next_fast_len


def grid_shape(image_shape: tuple[int, int], k: int, psf_size: int) -> tuple[int, int]:
    """FFT grid of the decorrelation: per axis (sum of the two largest of {k, PSF size, image size}) − 1,
    rounded up to an even fast FFT length.

    Arguments:
        image_shape: (ny, nx).
        k: kernel side.
        psf_size: PSF side (use k when there is no PSF).

    Returns:
        (Ny, Nx).
    """
    return tuple(next_fast_len(sum(sorted((k, psf_size, n))[1:]) - 1) for n in image_shape)


def _centred_spectrum(kernel: Kernel, shape: tuple[int, int]):
    """rfft2 of an odd-sized kernel zero-padded to `shape` with its centre at index (0, 0).

    Evaluated as two small DFT matrix products (k taps per axis) instead of a transform of the padded grid:
    no grid-sized real copy and no roll, and the cost is linear in the grid size.
    """
    ky, kx = kernel.shape
    ny, nx = shape
    dtype = jnp.result_type(kernel.dtype, jnp.float32)
    ey = _dft_matrix(ny, ky, dtype, full=True)  # (ny, ky)
    ex = _dft_matrix(nx, kx, dtype, full=False)  # (nx//2 + 1, kx)
    return ey @ (kernel.astype(dtype) @ ex.T)


def _power_spectrum(kernel: Kernel, shape: tuple[int, int], block: int = 256):
    """|rfft2|² of a centred kernel on the grid `shape`, evaluated in blocks of rows (`lax.map`): only the
    real result is ever grid-sized (a grid-sized complex spectrum is twice as large)."""
    ky, kx = kernel.shape
    ny, nx = shape
    dtype = jnp.result_type(kernel.dtype, jnp.float32)
    ey = _dft_matrix(ny, ky, dtype, full=True)  # (ny, ky)
    a = kernel.astype(dtype) @ _dft_matrix(nx, kx, dtype, full=False).T  # (ky, nx//2 + 1)

    def rows(e):
        z = e @ a
        return jnp.real(z) ** 2 + jnp.imag(z) ** 2

    return lax.map(rows, ey, batch_size=_row_block(ny, block))


def _row_block(n: int, block: int) -> int:
    """A block of rows that divides n (FFT grids are 5-smooth, so one lies within a factor 2 below `block`): then
    `lax.map` has no remainder batch, whose concatenation with the others copies the grid-sized result."""
    if n <= block:
        return n
    return next((b for b in range(block, block // 2, -1) if n % b == 0), block)


def _dft_matrix(n: int, k: int, dtype, full: bool):
    """exp(−2πi ν t / n) for frequencies ν (all n, or the rfft half) and centred taps t = −k//2 .. k//2."""
    nu = np.arange(n if full else n // 2 + 1)
    taps = np.arange(k) - k // 2
    phase = 2 * np.pi * np.mod(np.outer(nu, taps), n) / n  # reduced mod n: exact phases for large grids
    return jnp.asarray(np.exp(-1j * phase), jnp.result_type(dtype, jnp.complex64))


def _half_plane_weights(shape: tuple[int, int], dtype) -> Float[Array, " nxh"]:
    """How often each rfft column occurs on the full grid, divided by the grid size (for means over ν)."""
    ny, nx = shape
    w = np.full(nx // 2 + 1, 2.0)
    w[0] = 1.0
    if nx % 2 == 0:
        w[-1] = 1.0
    return jnp.asarray(w / (ny * nx), dtype)


def _spectra(kernel, v_u, v_c, shape, preconv_kernel):
    """(Ĉ, ĉ_n, ĉ_r) on the rfft grid: the image filter and the filters seen by the unconvolved and the
    convolved image's noise (ĉ_n = Ĉ, ĉ_r = K̂Ĉ; preconvolution: ĉ_n = P̂Ĉ_s, ĉ_r = K̂Ĉ_s)."""
    dtype = solve_dtype()
    kernel = kernel.astype(dtype)
    v_u = jnp.asarray(v_u, dtype)
    v_c = jnp.asarray(v_c, dtype)
    k_hat = _centred_spectrum(kernel, shape)
    k2 = jnp.real(k_hat) ** 2 + jnp.imag(k_hat) ** 2
    target = v_u + v_c * jnp.sum(kernel) ** 2
    if preconv_kernel is None:
        c_hat = jnp.sqrt(target / (v_u + v_c * k2)).at[0, 0].set(1.0)
        c_n = c_hat
    else:
        p_hat = _centred_spectrum(preconv_kernel.astype(dtype), shape)
        p2 = jnp.maximum(jnp.real(p_hat) ** 2 + jnp.imag(p_hat) ** 2, 1000 * jnp.finfo(dtype).tiny)
        c_hat = (target / (v_u + v_c * k2 / p2)).at[0, 0].set(1.0)
        c_n = p_hat * c_hat
    return c_hat, c_n, k_hat * c_hat


def _filter_and_weights(kernel, v_u, v_c, shape, preconv_kernel, dtype=None):
    """(Ĉ, w₁, w₂) from real arrays only: |ĉ_n|² = Ĉ² (× |P̂|²) and |ĉ_r|² = |K̂|² Ĉ², so no complex
    filter products are formed on the grid (the same numbers as `_spectra` + `_mean_cross`).

    `dtype`: of the grid-sized arrays (default `solve_dtype()`); the sums w₁, w₂ accumulate in `solve_dtype()`.
    """
    acc = solve_dtype()
    dtype = acc if dtype is None else dtype
    target = jnp.asarray(v_u, acc) + jnp.asarray(v_c, acc) * jnp.sum(kernel.astype(acc)) ** 2
    kernel = kernel.astype(dtype)
    v_u = jnp.asarray(v_u, dtype)
    v_c = jnp.asarray(v_c, dtype)
    target = target.astype(dtype)
    k2 = _power_spectrum(kernel, shape)
    w = _half_plane_weights(shape, dtype)
    if preconv_kernel is None:
        c_hat = jnp.sqrt(target / (v_u + v_c * k2)).at[0, 0].set(1.0)
        n2 = c_hat**2
    else:
        p2_raw = _power_spectrum(preconv_kernel.astype(dtype), shape)
        p2 = jnp.maximum(p2_raw, 1000 * jnp.finfo(dtype).tiny)
        c_hat = (target / (v_u + v_c * k2 / p2)).at[0, 0].set(1.0)
        n2 = p2_raw * c_hat**2
    w1 = jnp.sum(w * n2, dtype=acc)
    w2 = jnp.sum(w * k2 * c_hat**2, dtype=acc)
    return c_hat, w1, w2


def decorrelation_filter(
    kernel: Kernel,
    v_u: Scalar | float,
    v_c: Scalar | float,
    shape: tuple[int, int],
    preconv_kernel: Kernel | None = None,
) -> Float[Array, "gy gxh"]:
    """The decorrelation filter Ĉ (real, even) on the rfft grid of `shape`.

    Arguments:
        kernel: the matching kernel κ at the reference position, (k, k), k odd, centred.
        v_u: variance of the unconvolved image (science when the template was convolved).
        v_c: variance of the convolved image.
        shape: the FFT grid (Ny, Nx), static (see `grid_shape`).
        preconv_kernel: the preconvolution PSF P (odd-sized, unit sum) for the score filter Ĉ_s; None: plain.

    Returns:
        Ĉ with shape (Ny, Nx // 2 + 1) in `solve_dtype()`; Ĉ(0) = 1.
    """
    return _spectra(kernel, v_u, v_c, shape, preconv_kernel)[0]


def _mean_cross(a, b, shape) -> Scalar:
    """mean over the full grid of Re(a·b*), from rfft half-plane arrays."""
    w = _half_plane_weights(shape, jnp.real(a).dtype)
    return jnp.sum(w * jnp.real(a * jnp.conj(b)))


def _real_filter(c_hat, shape, size: int) -> Kernel:
    """The real-space filter c, centred in an odd size × size array.

    Only size² values of the inverse transform are needed: they are evaluated as DFT matrix products over the
    rfft half plane (the spectrum is real and even), without a grid-sized inverse transform.
    """
    ny, nx = shape
    ey = jnp.conj(_dft_matrix(ny, size, c_hat.dtype, full=True)).T  # (size, ny): exp(+2πi ν y / ny)
    ex = jnp.conj(_dft_matrix(nx, size, c_hat.dtype, full=False))  # (nx//2 + 1, size)
    w = _half_plane_weights(shape, c_hat.dtype) * (ny * nx)  # 1 or 2: each rfft column's multiplicity
    # Ĉ is real: two real products, no grid-sized complex copy of it
    partial = jax.lax.complex(jnp.real(ey) @ c_hat, jnp.imag(ey) @ c_hat)  # (size, nx//2 + 1)
    return jnp.real((partial * w[None, :]) @ ex) / (ny * nx)


def _filter_size(k: int, shape: tuple[int, int]) -> int:
    size = min(2 * k + 1, *shape)
    return size if size % 2 else size - 1


def _apply(image: Image, c_hat, shape) -> Image:
    """c ∗ image on the zero-padded grid, non-finite pixels first set to the mean of the finite ones and
    restored afterwards."""
    finite = jnp.isfinite(image)
    acc = solve_dtype()
    n = jnp.maximum(jnp.sum(finite, dtype=jnp.int32), 1)
    mean = (jnp.sum(jnp.where(finite, image, 0.0), dtype=acc) / n).astype(image.dtype)
    filled = jnp.where(finite, image, mean)
    ny, nx = image.shape
    padded = jnp.pad(filled, ((0, shape[0] - ny), (0, shape[1] - nx)))
    out = jnp.fft.irfft2(jnp.fft.rfft2(padded) * c_hat.astype(image.dtype), s=shape)[:ny, :nx]
    return jnp.where(finite, out.astype(image.dtype), image)


def decorrelate(
    image: Image,
    var_u: Image,
    var_c: Image,
    kernel: Kernel,
    v_u: Scalar | float,
    v_c: Scalar | float,
    preconv_kernel: Kernel | None = None,
    psf_size: int | None = None,
) -> tuple[Image, Image, Kernel]:
    """Decorrelate a difference image with a fixed kernel (ALGORITHM §11; §12 with `preconv_kernel`).

    Arguments:
        image: the difference D, (ny, nx); non-finite pixels are kept as they are.
        var_u: variance plane of the unconvolved image (ny, nx).
        var_c: variance plane of the convolved image, before convolution (ny, nx).
        kernel: matching kernel κ at the reference position, (k, k), k odd.
        v_u, v_c: scalar variance levels of the unconvolved and convolved image.
        preconv_kernel: preconvolution PSF P for the score image (odd size, unit sum); None: plain.
        psf_size: PSF side for the grid (static); default the preconvolution kernel's size, else k.

    Returns:
        (image, variance, c): the decorrelated image; its variance var_u·w₁ + var_c·w₂ with
        w₁ = mean_ν|ĉ_n|², w₂ = mean_ν|ĉ_r|²; and the real-space filter c (odd size min(2k + 1, grid), centred)
        for convolving the PSF (`difference_psf`).
    """
    k = kernel.shape[0]
    if psf_size is None:
        psf_size = k if preconv_kernel is None else preconv_kernel.shape[0]
    shape = grid_shape(image.shape, k, psf_size)
    # The plain filter on the grid in the image's precision (at least float32): a float32 image meets it as
    # float32 anyway, and grid-sized float64 arrays would be among the largest temporaries of a large image. The
    # score filter divides |K̂|² by |P̂|², which both underflow float32 at high frequencies: it stays float64.
    grid_dtype = jnp.result_type(image.dtype, jnp.float32) if preconv_kernel is None else None
    c_hat, w1, w2 = _filter_and_weights(kernel, v_u, v_c, shape, preconv_kernel, grid_dtype)
    out = _apply(image, c_hat, shape)
    variance = var_u * w1.astype(var_u.dtype) + var_c * w2.astype(var_c.dtype)
    return out, variance, _real_filter(c_hat, shape, _filter_size(k, shape))


def difference_psf(psf_image: Kernel, c_image: Kernel) -> Kernel:
    """PSF of the decorrelated difference: P ∗ c cropped to P's size and renormalised to unit sum.

    Arguments:
        psf_image: the PSF before decorrelation (odd size).
        c_image: the real-space decorrelation filter (odd size, centred), from `decorrelate`.

    Returns:
        The PSF image, P's shape and dtype.
    """
    dtype = solve_dtype()
    out = convolve2d(psf_image.astype(dtype), c_image.astype(dtype), mode="same")
    return (out / jnp.sum(out)).astype(psf_image.dtype)


def _bilinear_weights(pos: Float[Array, " n"], nodes: Float[Array, " g"]) -> Float[Array, "g n"]:
    """Bilinear (tent) weights of each node at each position, clamped beyond the outermost nodes."""
    if nodes.shape[0] == 1:
        return jnp.ones((1, pos.shape[0]), pos.dtype)
    return jax.vmap(lambda e: jnp.interp(pos, nodes, e))(jnp.eye(nodes.shape[0], dtype=pos.dtype))


def _quadratic_form(gram, by, bx) -> Image:
    """w[y, x] = Σ β_g β_g′ G[g, g′] with β_(j, i)(x, y) = by[j, y] · bx[i, x]; gram shaped (gy, gx, gy, gx)."""
    a = jnp.einsum("jy,jiJI,Jy->yiI", by, gram, by)
    return jnp.einsum("ix,yiI,Ix->yx", bx, a, bx)


def decorrelate_spatial(
    image: Image,
    var_u: Image,
    var_c: Image,
    kernels: Float[Array, "gy gx k k"],
    v_u: Float[Array, "gy gx"],
    v_c: Float[Array, "gy gx"],
    node_x: Float[Array, " gx"],
    node_y: Float[Array, " gy"],
    preconv_kernel: Kernel | None = None,
    psf_size: int | None = None,
) -> tuple[Image, Image, Float[Array, "gy gx m m"]]:
    """Spatially varying decorrelation: D′(x) = Σ_g β_g(x) (c_g ∗ D)(x) with bilinear node weights β_g
    (ALGORITHM §11, "Spatially varying variant").

    Arguments:
        image: the difference D, (ny, nx).
        var_u, var_c: variance planes of the unconvolved and the convolved image (ny, nx).
        kernels: matching kernel at each node, (gy, gx, k, k).
        v_u, v_c: variance levels at each node, (gy, gx).
        node_x: node columns in array pixel coordinates, increasing, (gx,).
        node_y: node rows in array pixel coordinates, increasing, (gy,).
        preconv_kernel: preconvolution PSF for the score variant; None: plain.
        psf_size: PSF side for the grid (static); default the preconvolution kernel's size, else k.

    Returns:
        (image, variance, c): the decorrelated image; the variance var_u·w₁ + var_c·w₂ with the exact
        w(x) = βᵀGβ from the Gram matrices of the node filters; and the real-space filter of each node.
    """
    gy, gx, k, _ = kernels.shape
    if psf_size is None:
        psf_size = k if preconv_kernel is None else preconv_kernel.shape[0]
    shape = grid_shape(image.shape, k, psf_size)
    spectra = jax.vmap(lambda kk, a, b: _spectra(kk, a, b, shape, preconv_kernel))
    c_hat, c_n, c_r = spectra(kernels.reshape(gy * gx, k, k), v_u.reshape(-1), v_c.reshape(-1))
    gram = jax.vmap(jax.vmap(lambda a, b: _mean_cross(a, b, shape), (None, 0)), (0, None))
    g1 = gram(c_n, c_n).reshape(gy, gx, gy, gx)
    g2 = gram(c_r, c_r).reshape(gy, gx, gy, gx)

    dtype = solve_dtype()
    ny, nx = image.shape
    by = _bilinear_weights(jnp.arange(ny, dtype=dtype), node_y.astype(dtype))
    bx = _bilinear_weights(jnp.arange(nx, dtype=dtype), node_x.astype(dtype))

    def add_node(acc, node):
        c, j, i = node
        return acc + (by[j][:, None] * bx[i][None, :]).astype(image.dtype) * _apply(image, c, shape), None

    jj, ii = np.divmod(np.arange(gy * gx), gx)
    out, _ = lax.scan(add_node, jnp.zeros_like(image), (c_hat, jnp.asarray(jj), jnp.asarray(ii)))
    out = jnp.where(jnp.isfinite(image), out, image)
    w1 = _quadratic_form(g1, by, bx)
    w2 = _quadratic_form(g2, by, bx)
    variance = var_u * w1.astype(var_u.dtype) + var_c * w2.astype(var_c.dtype)
    size = _filter_size(k, shape)
    filters = jax.vmap(lambda c: _real_filter(c, shape, size))(c_hat).reshape(gy, gx, size, size)
    return out, variance, filters
