"""Solvers for the kernel normal equations: closed-form least squares and optax."""

from ._base import AbstractSolver as AbstractSolver
from ._base import condition_number as condition_number
from ._base import symmetric_solve as symmetric_solve
from ._least_squares import LeastSquares as LeastSquares
from ._optax import OptaxSolver as OptaxSolver
