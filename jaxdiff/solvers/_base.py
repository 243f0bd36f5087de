"""Solver interface and the shared dense symmetric solve."""

import abc

import jax
import jax.numpy as jnp
from jax import lax
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
    """λ_max/λ_min of a symmetric matrix (negative or inf when it is singular or indefinite).

    Each extreme eigenvalue is found by bisection on Sylvester's inertia: λ_min is the largest σ for which
    M − σI has a Cholesky factor, λ_max the smallest σ for which σI − M has one, both inside the
    Gershgorin interval. `_BISECTIONS` halvings of that interval leave an absolute error below 2⁻⁶⁰ of
    ‖M‖∞, under the round-off of any eigenvalue routine. LAPACK's eigvalsh gives the same numbers, but it
    woke BLAS threads that then spun beside XLA's for the rest of the subtraction; these small Cholesky
    factorisations did not (measured on two cores).
    """
    M = 0.5 * (M + M.T)
    eye = jnp.eye(M.shape[-1], dtype=M.dtype)
    radius = jnp.max(jnp.sum(jnp.abs(M), axis=1))
    signed = jnp.stack([M, -M])  # λ_min(M) and λ_min(−M) = −λ_max(M), bisected together

    def step(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        factors = jnp.linalg.cholesky(signed - mid[:, None, None] * eye)
        definite = jnp.all(jnp.isfinite(factors), axis=(1, 2))
        return jnp.where(definite, mid, lo), jnp.where(definite, hi, mid)

    start = jnp.broadcast_to(radius, (2,))
    lo, hi = lax.fori_loop(0, _BISECTIONS, step, (-start, start))
    lam_min, neg_lam_max = 0.5 * (lo + hi)
    return -neg_lam_max / lam_min


_BISECTIONS = 64


def _scaled_cholesky_solve(M, b):
    """Jacobi scaling s = diag(M)^-1/2 and the Cholesky solve of the scaled system (one matrix):
    (x_chol, Cholesky succeeded, scaled M, scaled b, s); x_chol is a stand-in where Cholesky failed."""
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
    return solve_triangular(L_safe.T, y, lower=False), chol_ok, Ms, bs, s


def _eigen_solve(Ms, bs, chol_ok):
    """Pseudo-inverse solve of the scaled system (one matrix), dropping eigenvalues ≤ m·ε·λ_max."""
    m = Ms.shape[-1]
    # The stand-in for the branch not taken has distinct eigenvalues: eigh's derivative divides by their
    # differences, and a degenerate stand-in (the identity) turns the zero tangent into 0·∞ = NaN.
    distinct = jnp.diag(jnp.arange(1, m + 1, dtype=Ms.dtype))
    ev, V = jnp.linalg.eigh(jnp.where(chol_ok, distinct, Ms))
    eps = jnp.finfo(Ms.dtype).eps
    keep = ev > m * eps * jnp.max(jnp.abs(ev))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, ev, 1.0), 0.0)
    return V @ (inv * (V.T @ bs))


def symmetric_solve(M: Float[Array, "*batch m m"], b: Float[Array, "*batch m"]) -> Float[Array, "*batch m"]:
    """Solve Mθ = b for symmetric positive (semi-)definite M, or for a batch of them (leading axes).

    Jacobi-scales M (D^-1/2 M D^-1/2), tries Cholesky, and falls back to an eigen pseudo-inverse that
    drops eigenvalues ≤ m·ε·λ_max (ε of the solve dtype). The fallback runs only when a Cholesky failed
    (a `lax.cond` over the whole batch: eigh of 1024 stamp matrices took 60 ms on two cores, and jaxlib's
    LAPACK eigh wakes BLAS threads that then spin beside XLA's); where it runs, it is chosen per matrix with
    a `where` on sanitised operands so that gradients stay finite on the branch not taken. Under `vmap` the
    `cond` becomes a select, and both run.
    """
    batch = M.shape[:-2]
    chol, eigen = _scaled_cholesky_solve, _eigen_solve
    for _ in batch:
        chol, eigen = jax.vmap(chol), jax.vmap(eigen)
    x_chol, chol_ok, Ms, bs, s = chol(M, b)

    def fallback():
        return jnp.where(chol_ok[..., None], x_chol, eigen(Ms, bs, chol_ok))

    x = lax.cond(jnp.all(chol_ok), lambda: x_chol, fallback)
    return x * s
