"""Basis normalisation (ALGORITHM §5.2): the first image sums to 1, every other one to 0 with unit L2 norm.

The rule, in list order: B_0 is divided by its sum; an image b ≥ 1 with sum s, |s| > 1.19e-7, becomes
image / s − B_0 (sum 0); images already summing to zero are left as they are; then every b ≥ 1 is divided
by its L2 norm. The rule is linear in the images once the sums are known, so it is also offered as a
mixing matrix for bases built from separable factors.
"""

import jax.numpy as jnp

from .._types import Array, Basis, Float

SUM_TOLERANCE = 1.19e-7
"""Images whose |sum| is at most this are taken to sum to zero already (float32 epsilon, as ip_diffim)."""


def _affine(sums: Float[Array, " n"]) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    """Scale a_b and B_0 weight c_b of the rule B'_b = a_b raw_b − c_b B_0 (before the L2 step)."""
    big = jnp.abs(sums) > SUM_TOLERANCE
    # A guarded denominator keeps the unused branch finite, so gradients through `where` stay finite.
    safe = jnp.where(big, sums, 1.0)
    scale = jnp.where(big, 1.0 / safe, 1.0).at[0].set(1.0 / sums[0])
    shift = big.astype(sums.dtype).at[0].set(0.0)
    return scale, shift


def _inverse_norms(flat: Float[Array, "n npix"]) -> Float[Array, " n"]:
    """1/‖row‖ for rows b ≥ 1 and 1 for row 0, which keeps its unit sum."""
    norms = jnp.sqrt(jnp.sum(flat**2, axis=1))
    return (1.0 / norms).at[0].set(1.0)


def normalise(images: Basis) -> Basis:
    """Apply the §5.2 normalisation to a list of kernel images.

    Arguments:
        images: raw basis images, shape (n, k, k); image 0 must have a non-zero sum.

    Returns:
        The normalised images, same shape and dtype: ΣB_0 = 1; ΣB_b = 0 and ‖B_b‖₂ = 1 for b ≥ 1
        (an image that becomes identically zero gives NaNs, i.e. a degenerate input list).
    """
    n = images.shape[0]
    scale, shift = _affine(jnp.sum(images, axis=(1, 2)))
    b0 = images[0] * scale[0]
    out = scale[:, None, None] * images - shift[:, None, None] * b0
    inv = _inverse_norms(out.reshape(n, -1))
    return out * inv[:, None, None]


def normalisation_matrix(images: Basis) -> Float[Array, "n n"]:
    """The §5.2 normalisation as a matrix N: normalise(images)[b] = Σ_r N[b, r] images[r].

    Arguments:
        images: raw basis images, shape (n, k, k); meant for short lists (n × n matrix products).

    Returns:
        N, shape (n, n), in the images' dtype.
    """
    n = images.shape[0]
    flat = images.reshape(n, -1)
    scale, shift = _affine(jnp.sum(flat, axis=1))
    mix = jnp.diag(scale) - jnp.outer(shift, jnp.zeros(n, flat.dtype).at[0].set(scale[0]))
    inv = _inverse_norms(mix @ flat)
    return mix * inv[:, None]
