"""Closed-form least squares (the default solver)."""

import dataclasses

from ._base import AbstractSolver, condition_number, symmetric_solve


@dataclasses.dataclass(frozen=True)
class LeastSquares(AbstractSolver):
    """Closed-form solution of the normal equations: Jacobi scaling, Cholesky, eigen fallback."""

    def solve(self, M, b, precond=None):
        del precond
        return symmetric_solve(M, b), condition_number(M)
