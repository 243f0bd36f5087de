"""Alard–Lupton Gaussian × monomial kernel basis (ALGORITHM §5.1, §5.2).

Alard & Lupton (1998, ApJ 503, 325); widths and sizes as LSST ip_diffim's `generateAlardLuptonBasisList`.
Every raw image is a product of a function of the column offset and one of the row offset, so the basis is
also returned as 1-D factors plus one mixing matrix (normalisation and QR are linear maps), which lets the
stamp fits convolve with 1-D passes (§16).
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

from .._types import Array, Basis, Float, Int, Kernel, Vector, solve_dtype
from ._normalise import normalisation_matrix, normalise

BASIS_MODES = ("config", "convolution", "deconvolution")
"""Names of the width cases of §5.1, indexed by the code of `alard_lupton_widths_traced`."""


def _scaled_widths(xp, sigma_x, sigma_y, sig_gauss, beta, min_sig, min_sig_deconv):
    """§5.1 table for concrete (xp = numpy) or traced (xp = jax.numpy) widths: (widths, mode code)."""
    convolution = sigma_y > sigma_x
    big = xp.maximum(sigma_x, sigma_y)
    small = xp.minimum(sigma_x, sigma_y)
    d2 = big * big - small * small
    positive = d2 > 0
    # Root guarded at 0 so that d/dσ stays finite for equal widths.
    root = xp.where(positive, xp.sqrt(xp.where(positive, d2, 1.0)), 0.0)
    floor = xp.where(convolution, min_sig, min_sig_deconv)
    kernel_sigma = xp.maximum(floor, root)
    first = xp.maximum(floor, kernel_sigma / beta)
    scaled = first * beta ** xp.arange(len(sig_gauss))
    equal = sigma_x == sigma_y
    widths = xp.where(equal, xp.asarray(sig_gauss, dtype=scaled.dtype), scaled)
    code = xp.where(equal, 0, xp.where(convolution, 1, 2))
    return widths, code


def alard_lupton_widths(
    sigma_x: float | None,
    sigma_y: float | None,
    *,
    sig_gauss: tuple[float, ...] = (0.7, 1.5, 3.0),
    beta: float = 2.0,
    min_sig: float = 0.7,
    min_sig_deconv: float = 0.4,
    scale_by_fwhm: bool = True,
) -> tuple[Float[Array, " ngauss"], str]:
    """Gaussian widths of the AL basis from concrete PSF widths (§5.1).

    Arguments:
        sigma_x: PSF σ (pixels) of the image that is convolved (X), or None if unknown.
        sigma_y: PSF σ (pixels) of the image it is matched to (Y), or None if unknown.
        sig_gauss: widths used when not scaling (config `al_sig_gauss`); its length is the number of widths.
        beta: ratio of successive widths (`al_gauss_beta`).
        min_sig: smallest width when convolving (`al_min_sig`).
        min_sig_deconv: smallest width when deconvolving (`al_min_sig_deconv`).
        scale_by_fwhm: scale the widths with the PSFs (`scale_by_fwhm`); False gives `sig_gauss`.

    Returns:
        (widths, mode): widths in the solve dtype, mode one of `BASIS_MODES`. With mode "config" from a
        missing width or `scale_by_fwhm=False`, the caller uses `kernel_size` from the config.
    """
    dtype = solve_dtype()
    if sigma_x is None or sigma_y is None or not scale_by_fwhm:
        return jnp.asarray(sig_gauss, dtype=dtype), BASIS_MODES[0]
    widths, code = _scaled_widths(
        np, np.float64(sigma_x), np.float64(sigma_y), sig_gauss, beta, min_sig, min_sig_deconv
    )
    return jnp.asarray(widths, dtype=dtype), BASIS_MODES[int(code)]


def alard_lupton_widths_traced(
    sigma_x: Float[Array, ""],
    sigma_y: Float[Array, ""],
    *,
    sig_gauss: tuple[float, ...] = (0.7, 1.5, 3.0),
    beta: float = 2.0,
    min_sig: float = 0.7,
    min_sig_deconv: float = 0.4,
    scale_by_fwhm: bool = True,
) -> tuple[Float[Array, " ngauss"], Int[Array, ""]]:
    """`alard_lupton_widths` for traced PSF widths (jit, vmap, grad): branches by `jnp.where`.

    Arguments:
        sigma_x, sigma_y: PSF σ (pixels) of X and Y, scalars (may be traced); None when an image has no PSF.
        sig_gauss, beta, min_sig, min_sig_deconv, scale_by_fwhm: as `alard_lupton_widths` (static).

    Returns:
        (widths, code): widths in the solve dtype, differentiable in σ (finite for equal widths);
        code indexes `BASIS_MODES` (0 config, 1 convolution, 2 deconvolution).
    """
    dtype = solve_dtype()
    if not scale_by_fwhm or sigma_x is None or sigma_y is None:  # §5.1: a missing width uses the config widths
        return jnp.asarray(sig_gauss, dtype=dtype), jnp.asarray(0)
    sx = jnp.asarray(sigma_x, dtype=dtype)
    sy = jnp.asarray(sigma_y, dtype=dtype)
    return _scaled_widths(jnp, sx, sy, sig_gauss, beta, min_sig, min_sig_deconv)


def kernel_size(widths, *, fwhm_scaling: float = 6.0, size_min: int = 21, size_max: int = 35) -> int:
    """Kernel side from concrete basis widths (§5.1): int(fwhm_scaling · largest), made odd, clamped.

    Arguments:
        widths: concrete Gaussian widths (pixels), e.g. from `alard_lupton_widths`.
        fwhm_scaling: `kernel_size_fwhm_scaling` (6.0).
        size_min, size_max: `kernel_size_min`, `kernel_size_max` (21, 35; odd).

    Returns:
        The odd kernel side k as a Python int.
    """
    k = int(fwhm_scaling * float(np.max(np.asarray(widths, dtype=np.float64))))
    if k % 2 == 0:
        k += 1
    return min(max(k, size_min), size_max)


def _exponents(degree: int) -> tuple[tuple[int, int], ...]:
    """(x, y) exponents of the monomials of degree ≤ degree: 1, x, y, x², xy, y², x³, …"""
    return tuple((d - j, j) for d in range(degree + 1) for j in range(d + 1))


def _raw_factors(k: int, sigmas, degrees: tuple[int, ...]) -> tuple[Float[Array, "nraw k"], Float[Array, "nraw k"]]:
    """Column and row factors of the raw images: unit-sum Gaussian × (u/h)^i, × (v/h)^j."""
    if k < 3 or k % 2 == 0:
        raise ValueError(f"kernel size k={k} is not allowed; use an odd size of at least 3")
    dtype = solve_dtype()
    sigmas = jnp.asarray(sigmas, dtype=dtype)
    if sigmas.shape != (len(degrees),):
        raise ValueError(
            f"sigmas has shape {sigmas.shape} but degrees={degrees} needs shape ({len(degrees)},); "
            "give one width per degree"
        )
    h = (k - 1) // 2
    offsets = jnp.arange(-h, h + 1, dtype=dtype)
    gauss = jnp.exp(-0.5 * (offsets[None, :] / sigmas[:, None]) ** 2)
    gauss = gauss / jnp.sum(gauss, axis=1, keepdims=True)
    # Monomials in x' = u/h, not u/σ (§5.2).
    powers = (offsets / h)[None, :] ** jnp.arange(max(degrees) + 1)[:, None]
    which, px, py = np.array([(i, ex, ey) for i, degree in enumerate(degrees) for ex, ey in _exponents(degree)]).T
    return gauss[which] * powers[px], gauss[which] * powers[py]


def _orthonormal_rest(flat: Float[Array, "n npix"]) -> tuple[Float[Array, "m npix"], Float[Array, "m m"]]:
    """QR of rows 1…n−1 (as columns), R's diagonal positive: (Qᵀ, R).

    The constant unit vector goes first into the factorisation, so the Q columns after it are orthogonal
    to it (zero sums) to round-off; R is the block of the rows' own columns. In float64 the factorisation is
    Cholesky QR applied twice (R = chol(AᵀA), Q = A R⁻¹, then once more on Q): as accurate as Householder
    for a matrix this well conditioned (about 200 for the default basis), and made of a Gram matrix, two
    small Cholesky factorisations and triangular solves, where LAPACK's QR woke BLAS threads that then spun
    beside XLA's for the rest of the subtraction. In float32 the Gram matrix's squared condition number is
    too much, and it is Householder (LAPACK) with R's diagonal made positive.
    """
    ones = jnp.full((flat.shape[1], 1), flat.shape[1] ** -0.5, flat.dtype)
    a = jnp.concatenate([ones, flat[1:].T], axis=1)
    if a.dtype == jnp.float64:
        q, r1 = _cholesky_qr(a)
        q, r2 = _cholesky_qr(q)
        r = r2 @ r1
    else:
        q, r = jnp.linalg.qr(a)
        sign = jnp.where(jnp.diag(r) < 0, -1.0, 1.0).astype(r.dtype)
        q, r = q * sign[None, :], r * sign[:, None]
    return q[:, 1:].T, r[1:, 1:]


def _solve_lower(lower, b):
    """X with L X = b for a small lower-triangular L (m, m) and b (m, k), by forward substitution.

    Written with XLA operations (a loop over the m rows) instead of LAPACK's trsm: jaxlib runs trsm through
    OpenBLAS, whose worker threads, once woken by a matrix this size, spin beside XLA's for the rest of the
    subtraction.
    """

    def row(i, x):  # rows ≥ i of x are still zero, so L[i] · x sums over the solved rows only
        return x.at[i].set((b[i] - lower[i] @ x) / lower[i, i])

    return lax.fori_loop(0, lower.shape[0], row, jnp.zeros_like(b))


def _cholesky_qr(a):
    """(Q, R) with A = QR from R = chol(AᵀA)ᵀ (upper, positive diagonal) and Q = A R⁻¹."""
    r = jnp.linalg.cholesky(a.T @ a).T
    q = _solve_lower(r.T, a.T).T
    return q, r


def alard_lupton(k: int, sigmas, degrees: tuple[int, ...] = (4, 2, 2), orthonormalize: bool = True) -> Basis:
    """Alard–Lupton basis images (§5.2): Gaussians × monomials, normalised, optionally orthonormalised.

    Arguments:
        k: kernel side (odd, static); element [h + v, h + u] is the offset (u, v).
        sigmas: Gaussian widths in pixels, shape (len(degrees),); may be traced and differentiated.
        degrees: largest monomial degree of each Gaussian (static; `al_deg_gauss`).
        orthonormalize: replace B_1…B_{n−1} by an orthonormal basis of their span (jaxdiff default).

    Returns:
        Basis images, shape (n, k, k) with n = Σ (d+1)(d+2)/2 (27 for the defaults), in the solve dtype:
        ΣB_0 = 1 (B_0 the narrowest plain Gaussian), ΣB_b = 0 and ‖B_b‖₂ = 1 for b ≥ 1.
    """
    fx, fy = _raw_factors(k, sigmas, degrees)
    basis = normalise(fy[:, :, None] * fx[:, None, :])
    if not orthonormalize:
        return basis
    n = basis.shape[0]
    rest, _ = _orthonormal_rest(basis.reshape(n, -1))
    return jnp.concatenate([basis[:1], rest.reshape(n - 1, k, k)])


def x_factor_groups(degrees: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Raw images sharing their column factor (same Gaussian, same power of u): (first raw index of each
    distinct factor, distinct-factor index of every raw image). Static; 11 distinct of 27 for (4, 2, 2)."""
    keys = [(i, ex) for i, degree in enumerate(degrees) for ex, _ in _exponents(degree)]
    distinct = list(dict.fromkeys(keys))
    return tuple(keys.index(d) for d in distinct), tuple(distinct.index(key) for key in keys)


def alard_lupton_factors(
    k: int, sigmas, degrees: tuple[int, ...] = (4, 2, 2), orthonormalize: bool = True
) -> tuple[Float[Array, "nraw k"], Float[Array, "nraw k"], Float[Array, "n nraw"]]:
    """The AL basis in separable form: raw 1-D factors and the mixing matrix (§16 "Stamps").

    Arguments:
        k, sigmas, degrees, orthonormalize: as `alard_lupton`.

    Returns:
        (fx, fy, mix): raw image r is fy[r][:, None] * fx[r][None, :] (rows v, columns u), and
        `einsum('br,rv,ru->bvu', mix, fy, fx)` equals `alard_lupton(k, sigmas, degrees, orthonormalize)`
        to round-off.
    """
    fx, fy = _raw_factors(k, sigmas, degrees)
    raw = fy[:, :, None] * fx[:, None, :]
    mix = normalisation_matrix(raw)
    if not orthonormalize:
        return fx, fy, mix
    n = mix.shape[0]
    _, r = _orthonormal_rest(mix @ raw.reshape(n, -1))
    # Q = A R⁻¹ with A = rawᵀ mix_restᵀ, so Qᵀ = R⁻ᵀ mix_rest raw.
    rest = _solve_lower(r.T, mix[1:])
    return fx, fy, jnp.concatenate([mix[:1], rest])


def combine(basis: Basis, coeffs: Vector) -> Kernel:
    """Kernel image Σ_b coeffs[b] · basis[b].

    Arguments:
        basis: basis images, shape (n, k, k).
        coeffs: coefficients, shape (n,).

    Returns:
        The kernel image, shape (k, k).
    """
    return jnp.tensordot(coeffs, basis, axes=1)
