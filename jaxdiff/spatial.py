"""2-D polynomial spatial terms (Chebyshev of the first kind, or monomials) on normalised coordinates.

Terms are ordered by total degree, x before y: 1, T1(x'), T1(y'), T2(x'), T1(x')T1(y'), T2(y'), ...
with x' = 2(x - x_c)/W over the box's continuous extent (ALGORITHM §8.1). Every term is a product
of a function of x and a function of y, so whole-image term planes are outer products.
"""

import jax.numpy as jnp

from ._types import Array, Float


def n_terms(order: int) -> int:
    """Number of terms of total degree ≤ order: (order + 1)(order + 2)/2."""
    return (order + 1) * (order + 2) // 2


def exponents(order: int) -> tuple[tuple[int, int], ...]:
    """(i, j) degrees in x and y of each term, in the canonical order."""
    return tuple((d - j, j) for d in range(order + 1) for j in range(d + 1))


def normalise(x, y, box: Float[Array, "4"]):
    """Map parent coordinates to [-1, 1] over a box (x0, y0, width, height) of pixel-centred cells."""
    x0, y0, w, h = box[0], box[1], box[2], box[3]
    xc = x0 + (w - 1) / 2
    yc = y0 + (h - 1) / 2
    return 2 * (x - xc) / w, 2 * (y - yc) / h


def _chebyshev_1d(t, order: int):
    out = [jnp.ones_like(t), t]
    for _ in range(2, order + 1):
        out.append(2 * t * out[-1] - out[-2])
    return jnp.stack(out[: order + 1])


def _power_1d(t, order: int):
    return jnp.stack([t**i for i in range(order + 1)])


def basis_1d(t, order: int, model: str = "chebyshev1"):
    """1-D polynomials 0..order at t: shape (order + 1, *t.shape)."""
    if model == "chebyshev1":
        return _chebyshev_1d(t, order)
    if model == "polynomial":
        return _power_1d(t, order)
    raise ValueError(f"spatial model {model!r} is not allowed; use 'chebyshev1' or 'polynomial'")


def terms(x, y, box, order: int, model: str = "chebyshev1") -> Float[Array, "nterm ..."]:
    """Spatial terms at positions (x, y) (any broadcastable shapes), shape (n_terms, *shape).

    Arguments:
        x, y: parent coordinates.
        box: (x0, y0, width, height) of the science bounding box.
        order: total polynomial order (static).
        model: "chebyshev1" or "polynomial" (static).
    """
    xn, yn = normalise(jnp.asarray(x), jnp.asarray(y), box)
    xn, yn = jnp.broadcast_arrays(xn, yn)
    px = basis_1d(xn, order, model)
    py = basis_1d(yn, order, model)
    return jnp.stack([px[i] * py[j] for i, j in exponents(order)])


def separable_terms(box, shape: tuple[int, int], xy0, order: int, model: str = "chebyshev1"):
    """Per-axis factors of the term planes over an array: (tx (nterm, nx), ty (nterm, ny)).

    Term p at pixel [r, c] equals ty[p, r] * tx[p, c]; pixel [r, c] sits at parent (c + x0, r + y0).
    """
    ny, nx = shape
    dtype = jnp.result_type(box.dtype, jnp.float32)
    xs = jnp.arange(nx, dtype=dtype) + xy0[0]
    ys = jnp.arange(ny, dtype=dtype) + xy0[1]
    xn, _ = normalise(xs, jnp.zeros_like(xs) + box[1], box)
    _, yn = normalise(jnp.zeros_like(ys) + box[0], ys, box)
    px = basis_1d(xn, order, model)
    py = basis_1d(yn, order, model)
    ex = exponents(order)
    return jnp.stack([px[i] for i, _ in ex]), jnp.stack([py[j] for _, j in ex])
