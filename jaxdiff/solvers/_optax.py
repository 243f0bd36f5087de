"""Gradient-descent solver with optax, preconditioned so that it matches the closed form."""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.scipy.linalg import solve_triangular

from ._base import AbstractSolver, condition_number


def _default_optimizer():
    return optax.adam(optax.cosine_decay_schedule(0.05, 1000, alpha=1e-4))


_DEFAULT = _default_optimizer()


@dataclasses.dataclass(frozen=True)
class OptaxSolver(AbstractSolver):
    """Minimise the variance-weighted χ² with an optax optimizer.

    The unknowns are reparametrised as θ = L_A⁻ᵀ(sψ) with L_A the Cholesky factor of a
    stamp-averaged preconditioner A (ALGORITHM §8.3), which brings the condition number from
    10⁴–10⁷ down to order 1 so that first-order methods converge.

    Arguments:
        optimizer: an `optax.GradientTransformation` (build it once and reuse it: it is part of the
            static configuration). Default: Adam with a cosine schedule 0.05 → 5e-6.
        steps: number of optimisation steps (static).
    """

    optimizer: optax.GradientTransformation = _DEFAULT
    steps: int = 1000

    def solve(self, M, b, precond=None):
        m = M.shape[-1]
        A = M if precond is None else precond
        A = 0.5 * (A + A.T) + jnp.eye(m, dtype=M.dtype) * (1e-12 * jnp.trace(A) / m)
        L = jnp.linalg.cholesky(A)
        Lb = solve_triangular(L, b, lower=True)
        s = jnp.sqrt(jnp.mean(Lb**2))
        s = jnp.where(s > 0, s, 1.0)

        def theta_of(psi):
            return solve_triangular(L.T, s * psi, lower=False)

        def loss(psi):
            th = theta_of(psi)
            return (th @ (M @ th) - 2.0 * (b @ th)) / s**2

        theta0 = jnp.zeros(m, M.dtype).at[0].set(1.0)
        psi0 = (L.T @ theta0) / s
        opt_state = self.optimizer.init(psi0)

        def step(carry, _):
            psi, state = carry
            g = jax.grad(loss)(psi)
            updates, state = self.optimizer.update(g, state, psi)
            return (optax.apply_updates(psi, updates), state), None

        (psi, _), _ = lax.scan(step, (psi0, opt_state), None, length=self.steps)
        return theta_of(psi), condition_number(M)
