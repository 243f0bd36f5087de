"""Delta-function kernel basis and its Laplacian regularisation (ALGORITHM §5.3)."""

import jax.numpy as jnp
import numpy as np

from .._types import Array, Basis, Float, solve_dtype
from ._normalise import normalise

LAPLACIAN_STENCIL = ((1.0, 4.0, 1.0), (4.0, -20.0, 4.0), (1.0, 4.0, 1.0))
"""Nine-point Laplacian, to be divided by 6 (ip_diffim's central-difference stencil)."""


def delta_function(k: int) -> Basis:
    """Delta-function basis: one image per kernel pixel, centre first, normalised as §5.2.

    Arguments:
        k: kernel side (odd, static).

    Returns:
        Basis images, shape (k², k, k), in the solve dtype: B_0 = δ_centre, then (δ_i − δ_centre)/√2 for
        the other pixels in row-major order. Every B_b, b ≥ 1, sums to 0 (they are not orthogonal).
    """
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel size k={k} is not allowed; use an odd size")
    centre = (k * k) // 2
    order = np.concatenate([[centre], np.delete(np.arange(k * k), centre)])
    one_hot = jnp.eye(k * k, dtype=solve_dtype())[order]
    return normalise(one_hot.reshape(k * k, k, k))


def _laplacian(images: Basis) -> Basis:
    """The stencil applied to each image with zero outside it (a k² × k² operator on kernel pixels)."""
    k = images.shape[-1]
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1)))
    out = jnp.zeros_like(images)
    for dy, row in enumerate(LAPLACIAN_STENCIL):
        for dx, weight in enumerate(row):
            out = out + weight * padded[:, dy : dy + k, dx : dx + k]
    return out / 6.0


def regularization_matrix(
    k: int, basis: Basis, *, lambda_value: float = 0.2, border_penalty: float = 3.0
) -> Float[Array, "n n"]:
    """Smoothness penalty λ·H on basis coefficients: cᵀ(λH)c = λ Σ_p (w_p (L K)_p)², K = Σ c_b B_b.

    L is the nine-point Laplacian on kernel pixels with zeros outside the kernel (so L is invertible and
    H positive definite on the span of the basis: every non-zero kernel is penalised, mostly at its edge);
    w_p is `border_penalty` on the outermost ring of pixels and 1 inside.

    Arguments:
        k: kernel side (static); must match the basis.
        basis: basis images, shape (n, k, k), e.g. `delta_function(k)`.
        lambda_value: λ (config `lambda_value`, 0.2).
        border_penalty: w on border pixels (config `regularization_border_penalty`, 3.0).

    Returns:
        λH, shape (n, n), symmetric positive semi-definite, in the basis dtype; the caller adds the zero
        row and column of the background terms.
    """
    if basis.shape[1:] != (k, k):
        raise ValueError(f"basis has shape {basis.shape} but k={k}; give images of shape (n, {k}, {k})")
    weight = np.full((k, k), border_penalty)
    weight[1:-1, 1:-1] = 1.0
    smooth = (_laplacian(basis) * jnp.asarray(weight, dtype=basis.dtype)).reshape(basis.shape[0], -1)
    return lambda_value * (smooth @ smooth.T)
