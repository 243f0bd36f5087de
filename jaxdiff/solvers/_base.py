"""Solver interface and the shared dense symmetric solve."""

import abc

import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from .._types import Array, Float


class AbstractSolver(abc.ABC):
    """Minimises χ²(θ) = θᵀMθ − 2bᵀθ (+ const) for the global spatial kernel + background."""

    @abc.abstractmethod
    def solve(
        self, M: Float[Array, "m m"], b: Float[Array, " m"], precond: Float[Array, "m m"] | None = None
    ) -> tuple[Float[Array, " m"], Float[Array, ""]]:
        """Returns (θ, condition number of M)."""


def condition_number(M: Float[Array, "m m"]) -> Float[Array, ""]:
    """λ_max/λ_min of a symmetric matrix (negative or inf when it is singular or indefinite)."""
    ev = jnp.linalg.eigvalsh(0.5 * (M + M.T))
    return ev[-1] / ev[0]


def symmetric_solve(M: Float[Array, "m m"], b: Float[Array, " m"]) -> Float[Array, " m"]:
    """Solve Mθ = b for symmetric positive (semi-)definite M.

    Jacobi-scales M (D^-1/2 M D^-1/2), tries Cholesky, and falls back to an eigen pseudo-inverse that
    drops eigenvalues ≤ m·ε·λ_max (ε of the solve dtype). The fallback is chosen with a `where` on
    sanitised operands so that gradients stay finite on the branch not taken.
    """
    m = M.shape[-1]
    d = jnp.diagonal(M)
    d = jnp.where(d > 0, d, 1.0)
    s = 1.0 / jnp.sqrt(d)
    Ms = M * s[:, None] * s[None, :]
    Ms = 0.5 * (Ms + Ms.T)
    bs = b * s
    L = jnp.linalg.cholesky(Ms)
    chol_ok = jnp.all(jnp.isfinite(L))
    L_safe = jnp.where(chol_ok, L, jnp.eye(m, dtype=M.dtype))
    y = solve_triangular(L_safe, bs, lower=True)
    x_chol = solve_triangular(L_safe.T, y, lower=False)
    # The stand-in for the branch not taken has distinct eigenvalues: eigh's derivative divides by their
    # differences, and a degenerate stand-in (the identity) turns the zero tangent into 0·∞ = NaN.
    distinct = jnp.diag(jnp.arange(1, m + 1, dtype=M.dtype))
    ev, V = jnp.linalg.eigh(jnp.where(chol_ok, distinct, Ms))
    eps = jnp.finfo(M.dtype).eps
    keep = ev > m * eps * jnp.max(jnp.abs(ev))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, ev, 1.0), 0.0)
    x_pinv = V @ (inv * (V.T @ bs))
    x = jnp.where(chol_ok, x_chol, x_pinv)
    return x * s
